"""Reading MIDI into note arrays (sustain pedal applied, drums dropped) and writing MIDI safely.

Files are read by a small parser of our own that follows mido/pretty_midi rule for rule
(tempo from the first track only; a NOTE_OFF ends every sounding note of its key; a note whose
NOTE_OFF follows it on the same tick is dropped) and converts ticks to seconds with
pretty_midi's float arithmetic, so `encode(path)` and `encode(pretty_midi.PrettyMIDI(path))`
see the same notes, and over 10x faster than pretty_midi reads. The sustain pedal applies per
(track, channel) here and per instrument for PrettyMIDI objects: the same unless a channel
changes program mid-track.
"""

from __future__ import annotations

import math
import os
import stat
import struct
import warnings
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pretty_midi

from musicgpt.atomic import atomic_write
from musicgpt.errors import MidiReadError
from musicgpt.midi_write import smf_bytes

# Real piano files are well under 1 MiB; at this size the reader still takes a few seconds and a
# few hundred MB, and a bigger file (or a device like /dev/zero) is refused before it is read.
MAX_FILE_BYTES = 16 << 20
MAX_SECONDS = 2 * 3600  # longer "pieces" come from absurd tempos or corrupt delta times
# Tempos real music uses lie far inside these (30..250 bpm in midi_data/); outside them a piece
# is smeared over hours or crushed into one chord, so the file is refused, not encoded.
MIN_BPM, MAX_BPM = 5, 2000
SUSTAIN_CC = 64
PM_SOURCE = "<PrettyMIDI>"  # how errors name a PrettyMIDI object passed instead of a path


@dataclass
class Notes:
    """Notes of all non-drum instruments merged, sounding ends after the sustain pedal."""

    pitch: np.ndarray  # int64, 0..127
    start: np.ndarray  # float64 seconds
    end: np.ndarray  # float64 seconds, >= start
    velocity: np.ndarray  # int64, 1..127

    def __len__(self) -> int:
        return len(self.pitch)


def subset(notes: Notes, keep: np.ndarray, shift: float = 0.0, until: float = math.inf) -> Notes:
    """The notes where `keep`, moved `shift` seconds earlier (not before 0), their ends at most `until`."""
    start = np.maximum(notes.start[keep] - shift, 0.0)
    end = np.maximum(np.minimum(notes.end[keep], until) - shift, start)
    return Notes(notes.pitch[keep], start, end, notes.velocity[keep])


def as_heard(notes: Notes) -> Notes:
    """The notes a piano sounds: one per key and onset (the longest), each ended where its key
    is struck again. A pedal-held note re-struck is one string, not two notes at once; the codec
    cuts notes the same way, so this is what any model trained on its tokens can write."""
    order = np.lexsort((-notes.end, notes.start, notes.pitch))
    pitch, start, end = notes.pitch[order], notes.start[order], notes.end[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (pitch[1:] != pitch[:-1]) | (start[1:] != start[:-1])
    order, pitch, start, end = order[first], pitch[first], start[first], end[first]
    struck_again = np.zeros(len(order), dtype=bool)
    struck_again[:-1] = pitch[1:] == pitch[:-1]
    heard_end = notes.end.copy()
    heard_end[order] = np.where(struck_again, np.minimum(end, np.roll(start, -1)), end)
    keep = np.sort(order)  # back in the file's order
    return Notes(notes.pitch[keep], notes.start[keep], heard_end[keep], notes.velocity[keep])


def read_notes(midi: str | os.PathLike | pretty_midi.PrettyMIDI) -> Notes:
    """Notes of a MIDI file or a PrettyMIDI object, drums dropped, sustain pedal applied."""
    if isinstance(midi, pretty_midi.PrettyMIDI):
        return _finish(_parts_from_pretty_midi(midi), PM_SOURCE)
    path = Path(midi)
    data = _read_checked(path)
    return _finish(_parts_from_smf(data, path), str(path))


def load_midi(path: str | os.PathLike) -> pretty_midi.PrettyMIDI:
    """`pretty_midi.PrettyMIDI(path)` with a one-line MidiReadError for unreadable files."""
    path = Path(path)
    # Our scan first: it refuses what would stall pretty_midi (over-long variable-length numbers).
    _scan_checked(_read_checked(path), path)
    return _pretty_midi_from_file(path)


def write_midi(pm: pretty_midi.PrettyMIDI, path: str | os.PathLike) -> None:
    """Write `pm` to `path` atomically (`atomic.atomic_write`).

    Objects with one tempo and no lyrics or text events (everything `decode` makes) are
    written by `midi_write.smf_bytes`, much faster than `pm.write`, which writes the rest.
    """
    data = smf_bytes(pm)
    with atomic_write(path) as f:
        f.write(data) if data is not None else pm.write(f)


def apply_sustain(end: np.ndarray, cc_time: np.ndarray, cc_value: np.ndarray,
                  piece_end: float) -> np.ndarray:
    """Ends of notes released while the pedal (CC64 >= 64) is down, moved to the pedal lift.

    A pedal never lifted lifts at `piece_end`. Cutting a held note when its key is struck
    again is left to the codec, which does it for every note.
    """
    zeros = np.zeros(len(end), dtype=np.int64)
    return _sustain_by_part(end, zeros, np.zeros(len(cc_time), dtype=np.int64), cc_time, cc_value,
                            np.array([piece_end], dtype=np.float64))


# Parts are the instruments (PrettyMIDI) or (track, channel) pairs (files) the pedal applies to,
# flattened so that a file with a million of them costs no more than one with a single part:
# (group, pitch, start, end, velocity) per note, then (group, time, value) per CC64 event.
Parts = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _finish(parts: Parts, source: str) -> Notes:
    """Apply each part's pedal, merge the parts and check the result is a usable piece."""
    group, pitch, start, end, vel, cc_group, cc_t, cc_v = parts
    ok = (pitch >= 0) & (pitch < 128)  # only hand-built PrettyMIDI objects break this
    if not ok.all():
        group, pitch, start, end, vel = (a[ok] for a in (group, pitch, start, end, vel))
    if len(pitch) == 0:
        raise MidiReadError(f"{source}: no notes")
    # Dense part numbers by a lookup table, not np.unique: no sort, and the order is kept.
    present = np.zeros(int(max(group.max(), cc_group.max(initial=0))) + 1, dtype=bool)
    present[group] = True
    dense = np.cumsum(present) - 1
    group = dense[group]
    has_notes = present[cc_group]
    cc_group, cc_t, cc_v = dense[cc_group[has_notes]], cc_t[has_notes], cc_v[has_notes]
    piece_end = np.full(int(present.sum()), -np.inf)
    np.maximum.at(piece_end, group, end)
    np.maximum.at(piece_end, cc_group, cc_t)
    has_cc = np.zeros(len(piece_end), dtype=bool)
    has_cc[cc_group] = True
    piece_end = np.where(has_cc, piece_end, np.maximum(piece_end, 0.0))
    if not (np.isfinite(piece_end).all() and np.isfinite(start).all() and start.min() >= 0):
        raise MidiReadError(f"{source}: corrupt timing (negative or missing note times)")
    if piece_end.max() > MAX_SECONDS:
        raise MidiReadError(
            f"{source}: lasts {piece_end.max():.0f} s, over the {MAX_SECONDS // 3600} hour limit "
            "(absurd tempo or corrupt delta times?)"
        )
    end = _sustain_by_part(np.maximum(end, start), group, cc_group, cc_t, cc_v, piece_end)
    if len(group) > 1 and (group[1:] < group[:-1]).any():  # notes part by part, as they came
        order = np.argsort(group, kind="stable")
        pitch, start, end, vel = pitch[order], start[order], end[order], vel[order]
    return Notes(pitch, start, end, vel)


def _sustain_by_part(end: np.ndarray, group: np.ndarray, cc_group: np.ndarray, cc_time: np.ndarray,
                    cc_value: np.ndarray, piece_end: np.ndarray) -> np.ndarray:
    """`apply_sustain` for many parts at once: note i belongs to part group[i], pedal event j to
    cc_group[j], and a pedal never lifted in part g lifts at piece_end[g]. Linear after one sort."""
    if len(cc_time) == 0:
        return end
    order = np.lexsort((cc_time, cc_group))
    g, t, down = cc_group[order], cc_time[order], cc_value[order] >= 64
    n = len(t)
    # Index of the first lift at or after each pedal event: a reverse running minimum; one found
    # in a later part means this part's pedal never lifts.
    nxt = np.minimum.accumulate(np.where(down, n, np.arange(n))[::-1])[::-1]
    found = nxt < n
    found[found] = g[nxt[found]] == g[found]
    lift = np.where(found, t[np.minimum(nxt, n - 1)], piece_end[g])
    # The last pedal event of the note's part at or before each release: merge releases into the
    # sorted pedal events (pedal first on a tie) and carry the latest pedal index forward.
    is_note = np.repeat([False, True], [n, len(end)])
    merged = np.lexsort((is_note, np.concatenate([t, end]), np.concatenate([g, group])))
    latest = np.maximum.accumulate(np.where(is_note[merged], -1, merged))
    k = np.empty(len(end), dtype=np.int64)
    k[merged[is_note[merged]] - n] = latest[is_note[merged]]
    k_ok = np.maximum(k, 0)
    held = (k >= 0) & (g[k_ok] == group) & down[k_ok]
    return np.where(held, np.maximum(end, lift[k_ok]), end)


def _parts_from_pretty_midi(pm: pretty_midi.PrettyMIDI) -> Parts:
    if not any(i.notes for i in pm.instruments if not i.is_drum) and any(i.notes for i in pm.instruments):
        raise MidiReadError(f"{PM_SOURCE}: no notes (only drums, which are ignored)")
    notes, pedal = [], []
    for k, inst in enumerate(pm.instruments):
        if inst.is_drum:
            continue  # drums are not piano music; the codec has no drum events
        notes += [(k, x.pitch, x.start, x.end, x.velocity) for x in inst.notes]
        pedal += [(k, c.time, c.value) for c in inst.control_changes if c.number == SUSTAIN_CC]
    n = np.array(notes, dtype=np.float64).reshape(-1, 5)
    cc = np.array(pedal, dtype=np.float64).reshape(-1, 3)
    as_int = n[:, [0, 1, 4]].astype(np.int64)
    return (as_int[:, 0], as_int[:, 1], n[:, 2], n[:, 3], as_int[:, 2],
            cc[:, 0].astype(np.int64), cc[:, 1], cc[:, 2])


def _parts_from_smf(data: bytes, path: Path) -> Parts:
    """Parts of a Standard MIDI File, one per (track, channel) that is not drums (channel 10)."""
    tpq, tempos, notes, pedal = _scan_checked(data, path)
    to_seconds = _tick_to_seconds_fn(tempos[:, 0], tempos[:, 1], tpq, path)
    _check_tempos(tempos, int(notes[:, 2].max(initial=0)), path)
    group = notes[:, 0] >> 14  # track * 16 + channel
    drum = group % 16 == 9
    if len(notes) and drum.all():
        raise MidiReadError(f"{path}: no notes (only drums on channel 10, which are ignored)")
    if drum.any():
        notes, group = notes[~drum], group[~drum]
    return (group, (notes[:, 0] >> 7) & 127, to_seconds(notes[:, 1]), to_seconds(notes[:, 2]), notes[:, 0] & 127,
            pedal[:, 0] * 16 + pedal[:, 1], to_seconds(pedal[:, 2]), pedal[:, 3].astype(np.float64))


def _scan_checked(data: bytes, path: Path) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """`_scan` as int64 arrays, every fault of the events a one-line MidiReadError naming `path`."""
    try:
        tpq, tempos, notes, pedal = _scan(data)
    except (IndexError, KeyError, ValueError) as e:
        raise _corrupt(path, e) from None
    # Zero-copy views of the scanner's arrays: no second copy of a big file's notes.
    return (tpq, np.frombuffer(tempos, dtype=np.int64).reshape(-1, 2),  # tick, microseconds/quarter
            np.frombuffer(notes, dtype=np.int64).reshape(-1, 3),  # track, channel, key, velocity; on; off
            np.frombuffer(pedal, dtype=np.int64).reshape(-1, 4))  # track, channel, tick, value


def _check_tempos(tempos: np.ndarray, last_tick: int, path: Path) -> None:
    """Refuse a tempo outside MIN_BPM..MAX_BPM in force while notes sound (one after them is harmless)."""
    tick, mspq = tempos[:, 0], tempos[:, 1]
    in_force = np.append(tick[1:] != tick[:-1], True) & (tick < last_tick)  # last of a tick wins
    bad = mspq[in_force & ((mspq < 6e7 / MAX_BPM) | (mspq > 6e7 / MIN_BPM))]
    if len(bad):
        raise MidiReadError(f"{path}: absurd tempo ({bad[0]} microseconds per quarter note, {6e7 / bad[0]:.4g} bpm; "
                            f"music lies within {MIN_BPM}..{MAX_BPM} bpm)")


# Data bytes after each status byte (by high nibble for channel messages), as in the MIDI spec.
_CHANNEL_DATA = {0x80: 2, 0x90: 2, 0xA0: 2, 0xB0: 2, 0xC0: 1, 0xD0: 1, 0xE0: 2}
_SYSTEM_DATA = {0xF1: 1, 0xF2: 2, 0xF3: 1, 0xF6: 0, 0xF8: 0, 0xFA: 0, 0xFB: 0, 0xFC: 0, 0xFE: 0}


def _scan(data: bytes) -> tuple[int, array, array, array]:
    """(ticks per quarter, tempos of the first track, notes, CC64 events) of a checked file,
    the last three flat int64 arrays (a Python tuple per event would take ten times the memory);
    a note is (track << 18 | channel << 14 | key << 7 | velocity, on tick, off tick).

    A small parser of our own rather than symusic: symusic pairs overlapping notes of a key
    first-in first-out and hides the order of events on one tick, so it cannot reproduce
    pretty_midi's notes; this one follows mido/pretty_midi rule for rule, over 10x faster.
    """
    header_len, _, ntracks, tpq = struct.unpack(">IHHH", data[4:14])
    tempos, notes, pedal = array("q"), array("q"), array("q")
    pos, track = 8 + header_len, 0
    while track < ntracks:  # as mido: chunks after the header's count of tracks are not read
        length = struct.unpack(">I", data[pos + 4:pos + 8])[0]
        if data[pos:pos + 4] == b"MTrk":
            _scan_track(data, pos + 8, pos + 8 + length, track, tempos if track == 0 else None,
                        notes, pedal)
            track += 1
        pos += 8 + length
    return tpq, tempos, notes, pedal


def _scan_track(data: bytes, i: int, end: int, track: int, tempos: array | None,
                notes: array, pedal: array) -> None:
    """Append one track's notes (paired as pretty_midi pairs them), CC64 and tempo events."""
    tick, status, sounding = 0, None, {}
    while i < end:
        byte = data[i]
        if byte & 0x80:
            delta, i = _varint(data, i)
            tick += delta
        else:  # a one-byte delta time, the usual case
            tick += byte
            i += 1
        kind = data[i]
        if kind & 0x80:
            i += 1
            if kind == 0xFF:  # meta event; does not set the running status
                meta, (length, i) = data[i], _varint(data, i + 1)
                if meta == 0x51 and length >= 3 and tempos is not None:
                    tempos.extend((tick, (data[i] << 16) | (data[i + 1] << 8) | data[i + 2]))
                i += length
                continue
            status = kind
        elif status is None:
            raise ValueError("running status without a status byte")
        else:
            kind = status
            i += kind in (0xF0, 0xF7)  # mido reads and drops this byte before a sysex length
        high = kind & 0xF0
        if high == 0x90 or high == 0x80 or high == 0xB0:  # the events we keep; the hot path
            key, value = data[i], data[i + 1]
            i += 2
            if (key | value) & 0x80:
                raise ValueError("data byte above 127")
            if high == 0xB0:
                if key == SUSTAIN_CC:
                    pedal.extend((track, kind & 15, tick, value))
                continue
            key |= (kind & 15) << 7
            if high == 0x90 and value:
                sounding.setdefault(key, []).append((tick, value))
                continue
            started = sounding.pop(key, None)
            if started is None:
                continue
            if len(started) == 1 and started[0][0] != tick:
                notes.extend((track << 18 | key << 7 | started[0][1], started[0][0], tick))
            else:
                _end_notes(sounding, started, key, tick, track, notes)
        elif kind in (0xF0, 0xF7):  # sysex: skipped
            length, i = _varint(data, i)
            i += length
        else:
            size = _SYSTEM_DATA[kind] if kind >= 0xF0 else _CHANNEL_DATA[high]
            if any(byte & 0x80 for byte in data[i:i + size]):
                raise ValueError("data byte above 127")
            i += size
    if i != end:
        raise ValueError("track runs past its chunk")


def _end_notes(sounding: dict, started: list, key: int, tick: int, track: int,
               notes: array) -> None:
    """pretty_midi's NOTE_OFF rule: end every note of the key that began before this tick;
    the ones that began on this tick keep sounding if some note ended, else they are dropped."""
    ended = [(on, v) for on, v in started if on != tick]
    for on, velocity in ended:
        notes.extend((track << 18 | key << 7 | velocity, on, tick))
    if ended and len(ended) < len(started):
        sounding[key] = [(on, v) for on, v in started if on == tick]


def _varint(data: bytes, i: int) -> tuple[int, int]:
    """(value, next index) of a MIDI variable-length quantity at data[i]: at most 4 bytes, as the
    SMF specification says; an unbounded one would make a huge integer in quadratic time."""
    value = 0
    for k in range(i, i + 4):
        byte = data[k]
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, k + 1
    raise ValueError(f"a variable-length number at byte {i} is too large (longer than the 4 bytes MIDI allows)")


def _tick_to_seconds_fn(tick: np.ndarray, mspq: np.ndarray, res: int, path: Path):
    """Ticks -> seconds with pretty_midi's float arithmetic, so both readers agree bit for bit."""
    mspq = mspq.astype(np.float64)
    if (mspq <= 0).any():
        raise MidiReadError(f"{path}: corrupt tempo (0 microseconds per quarter note)")
    scale = 60.0 / ((6e7 / mspq) * res)
    # pretty_midi: the last tempo at tick 0 replaces the 120 bpm default, and a later tempo
    # equal to the one before it starts no new segment (which would change the rounding).
    at0 = tick == 0
    first = scale[at0][-1] if at0.any() else 60.0 / (120.0 * res)
    seg_tick = np.concatenate([[0], tick[~at0]])
    seg_scale = np.concatenate([[first], scale[~at0]])
    new = np.concatenate([[True], seg_scale[1:] != seg_scale[:-1]])
    seg_tick, seg_scale = seg_tick[new], seg_scale[new]
    seg_time = np.concatenate([[0.0], np.cumsum(seg_scale[:-1] * np.diff(seg_tick))])

    def to_seconds(ticks: np.ndarray) -> np.ndarray:
        ticks = ticks.astype(np.int64, copy=False)
        if len(seg_tick) == 1:  # one tempo: the same floats without four temporary arrays
            return seg_scale[0] * ticks
        k = np.searchsorted(seg_tick, ticks, side="right") - 1
        return seg_time[k] + seg_scale[k] * (ticks - seg_tick[k])

    return to_seconds


def _read_checked(path: Path) -> bytes:
    """The bytes of a file that at least looks like complete MIDI, else a MidiReadError."""
    data = read_regular_file(path)
    if not data:
        raise MidiReadError(f"{path}: empty file (0 bytes)")
    if not data.startswith(b"MThd"):
        raise MidiReadError(f"{path}: not a MIDI file (bad header)")
    problem = _structure_problem(data)
    if problem:
        raise MidiReadError(f"{path}: {problem}")
    return data


def read_regular_file(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES, what: str = "MIDI file") -> bytes:
    """The bytes of a regular file of at most `max_bytes`, else a one-line MidiReadError: a device
    such as /dev/zero would be read until memory runs out, and a FIFO would block."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once (fstat then refuses it); on
        # regular files it changes nothing. Checking the open descriptor leaves no race.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise MidiReadError(f"{path}: file not found") from None
    except OSError as e:
        raise MidiReadError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise MidiReadError(f"{path}: is a folder, not a {what}")
        if not stat.S_ISREG(st.st_mode):
            raise MidiReadError(f"{path}: not a regular file (a device, pipe or socket), not a {what}")
        if st.st_size > max_bytes:
            raise MidiReadError(f"{path}: {st.st_size} bytes, over the {max_bytes >> 20} MiB limit for a {what}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)  # bounded even if the file grows meanwhile
    except OSError as e:
        raise MidiReadError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise MidiReadError(f"{path}: over the {max_bytes >> 20} MiB limit for a {what}")
    return data


def _structure_problem(data: bytes) -> str | None:
    """Walk the chunk headers: catches truncation before any parser sees the file."""
    if len(data) < 14:
        return "truncated MIDI (header cut short)"
    header_len, fmt, ntracks, division = struct.unpack(">IHHH", data[4:14])
    if header_len < 6:
        return "not a MIDI file (bad header)"
    if fmt == 2:
        return "MIDI format 2 (independent sequences) is not supported; save it as format 0 or 1"
    if fmt > 2:
        return f"not a MIDI file (unknown format {fmt})"
    if division & 0x8000:
        return "SMPTE time division is not supported"
    if division == 0:
        return "corrupt MIDI header (0 ticks per quarter note)"
    pos, found = 8 + header_len, 0
    while found < ntracks:
        if pos + 8 > len(data):
            return f"truncated MIDI ({found} of {ntracks} tracks present)"
        kind, length = data[pos:pos + 4], struct.unpack(">I", data[pos + 4:pos + 8])[0]
        if pos + 8 + length > len(data):
            return f"truncated MIDI (track {found + 1} of {ntracks} is cut short)"
        found += kind == b"MTrk"  # other chunk types are allowed and skipped
        pos += 8 + length
    return None


def _pretty_midi_from_file(path: Path) -> pretty_midi.PrettyMIDI:
    with warnings.catch_warnings():  # the CLI promises one line on failure, not warnings
        warnings.simplefilter("ignore")
        try:
            return pretty_midi.PrettyMIDI(str(path))
        except Exception as e:
            raise _corrupt(path, e) from None


def _corrupt(path: Path, e: BaseException) -> MidiReadError:
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
    return MidiReadError(f"{path}: corrupt MIDI ({detail})")


# ---------------------------------------------------------------- writing
