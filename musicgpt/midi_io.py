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

import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pretty_midi

from musicgpt.atomic import atomic_write
from musicgpt.errors import MidiReadError

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
    _read_checked(path)
    return _pretty_midi_from_file(path)


def write_midi(pm: pretty_midi.PrettyMIDI, path: str | os.PathLike) -> None:
    """Write `pm` to `path` atomically (`atomic.atomic_write`).

    Objects with one tempo and no lyrics or text events (everything `decode` makes) are
    written by `_smf_bytes`, ~20x faster than `pm.write`, which writes the rest.
    """
    data = _smf_bytes(pm)
    with atomic_write(path) as f:
        f.write(data) if data is not None else pm.write(f)


def apply_sustain(end: np.ndarray, cc_time: np.ndarray, cc_value: np.ndarray,
                  piece_end: float) -> np.ndarray:
    """Ends of notes released while the pedal (CC64 >= 64) is down, moved to the pedal lift.

    A pedal never lifted lifts at `piece_end`. Cutting a held note when its key is struck
    again is left to the codec, which does it for every note.
    """
    if len(cc_time) == 0:
        return end
    order = np.argsort(cc_time, kind="stable")
    t, down = cc_time[order], cc_value[order] >= 64
    # Time of the first lift at or after each pedal event: a reverse running minimum.
    lift = np.where(down, np.inf, t)
    next_lift = np.minimum.accumulate(lift[::-1])[::-1]
    next_lift[np.isinf(next_lift)] = piece_end
    k = np.searchsorted(t, end, side="right") - 1  # last pedal event at or before each release
    held = (k >= 0) & down[np.maximum(k, 0)]
    return np.where(held, np.maximum(end, next_lift[np.maximum(k, 0)]), end)


# A "part" is one instrument: (pitch, start, end, velocity, cc64 times, cc64 values).
Part = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _finish(parts: list[Part], source: str) -> Notes:
    """Apply each part's pedal, merge the parts and check the result is a usable piece."""
    merged = []
    for pitch, start, end, vel, cc_t, cc_v in parts:
        ok = (pitch >= 0) & (pitch < 128)  # only hand-built PrettyMIDI objects break this
        pitch, start, end, vel = pitch[ok], start[ok], end[ok], vel[ok]
        if len(pitch) == 0:
            continue
        piece_end = max(end.max(), cc_t.max() if len(cc_t) else 0.0)
        if not (np.isfinite(piece_end) and np.isfinite(start).all() and start.min() >= 0):
            raise MidiReadError(f"{source}: corrupt timing (negative or missing note times)")
        if piece_end > MAX_SECONDS:
            raise MidiReadError(
                f"{source}: lasts {piece_end:.0f} s, over the {MAX_SECONDS // 3600} hour limit "
                "(absurd tempo or corrupt delta times?)"
            )
        end = apply_sustain(np.maximum(end, start), cc_t, cc_v, piece_end)
        merged.append((pitch, start, end, vel))
    if not merged:
        raise MidiReadError(f"{source}: no notes")
    return Notes(*(np.concatenate(column) for column in zip(*merged)))


def _parts_from_pretty_midi(pm: pretty_midi.PrettyMIDI) -> list[Part]:
    if not any(i.notes for i in pm.instruments if not i.is_drum) and any(i.notes for i in pm.instruments):
        raise MidiReadError(f"{PM_SOURCE}: no notes (only drums, which are ignored)")
    parts = []
    for inst in pm.instruments:
        if inst.is_drum:
            continue  # drums are not piano music; the codec has no drum events
        n = np.array([(x.pitch, x.velocity) for x in inst.notes], dtype=np.int64).reshape(-1, 2)
        t = np.array([(x.start, x.end) for x in inst.notes], dtype=np.float64).reshape(-1, 2)
        cc = [(c.time, c.value) for c in inst.control_changes if c.number == SUSTAIN_CC]
        cc = np.array(cc, dtype=np.float64).reshape(-1, 2)
        parts.append((n[:, 0], t[:, 0], t[:, 1], n[:, 1], cc[:, 0], cc[:, 1]))
    return parts


def _parts_from_smf(data: bytes, path: Path) -> list[Part]:
    """Parts of a Standard MIDI File, one per (track, channel) that is not drums (channel 10)."""
    try:
        tpq, tempos, notes, pedal = _scan(data)
        notes = np.array(notes, dtype=np.int64).reshape(-1, 5)  # track, key, on, off, velocity
        pedal = np.array(pedal, dtype=np.int64).reshape(-1, 4)  # track, channel, tick, value
        tempos = np.array(tempos, dtype=np.int64).reshape(-1, 2)  # tick, microseconds/quarter
    except OverflowError:  # a variable-length value longer than MIDI's four bytes
        raise MidiReadError(f"{path}: corrupt MIDI (a delta time or length is too large)") from None
    except (IndexError, KeyError, ValueError) as e:
        raise _corrupt(path, e) from None
    to_seconds = _tick_to_seconds_fn(tempos[:, 0], tempos[:, 1], tpq, path)
    _check_tempos(tempos, int(notes[:, 3].max(initial=0)), path)
    note_group = notes[:, 0] * 16 + (notes[:, 1] >> 7)
    if len(notes) and (note_group % 16 == 9).all():
        raise MidiReadError(f"{path}: no notes (only drums on channel 10, which are ignored)")
    pedal_group = pedal[:, 0] * 16 + pedal[:, 1]
    parts = []
    for g in np.unique(note_group[note_group % 16 != 9]):
        n, cc = notes[note_group == g], pedal[pedal_group == g]
        parts.append((n[:, 1] & 127, to_seconds(n[:, 2]), to_seconds(n[:, 3]), n[:, 4],
                      to_seconds(cc[:, 2]), cc[:, 3].astype(np.float64)))
    return parts


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


def _scan(data: bytes) -> tuple[int, list, list, list]:
    """(ticks per quarter, tempos of the first track, notes, CC64 events) of a checked file.

    A small parser of our own rather than symusic: symusic pairs overlapping notes of a key
    first-in first-out and hides the order of events on one tick, so it cannot reproduce
    pretty_midi's notes; this one follows mido/pretty_midi rule for rule, over 10x faster.
    """
    header_len = struct.unpack(">I", data[4:8])[0]
    tpq = struct.unpack(">H", data[12:14])[0]
    tempos, notes, pedal = [], [], []
    pos, track = 8 + header_len, 0
    while pos + 8 <= len(data):
        length = struct.unpack(">I", data[pos + 4:pos + 8])[0]
        if data[pos:pos + 4] == b"MTrk":
            _scan_track(data, pos + 8, pos + 8 + length, track, tempos if track == 0 else None,
                        notes, pedal)
            track += 1
        pos += 8 + length
    return tpq, tempos, notes, pedal


def _scan_track(data: bytes, i: int, end: int, track: int, tempos: list | None,
                notes: list, pedal: list) -> None:
    """Append one track's notes (paired as pretty_midi pairs them), CC64 and tempo events."""
    tick, status, sounding = 0, None, {}
    while i < end:
        byte = data[i]
        i += 1
        delta = byte & 0x7F
        while byte & 0x80:
            byte = data[i]
            i += 1
            delta = (delta << 7) | (byte & 0x7F)
        tick += delta
        kind = data[i]
        if kind & 0x80:
            i += 1
            if kind == 0xFF:  # meta event; does not set the running status
                meta, (length, i) = data[i], _varint(data, i + 1)
                if meta == 0x51 and length >= 3 and tempos is not None:
                    tempos.append((tick, (data[i] << 16) | (data[i + 1] << 8) | data[i + 2]))
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
                    pedal.append((track, kind & 15, tick, value))
                continue
            key |= (kind & 15) << 7
            if high == 0x90 and value:
                sounding.setdefault(key, []).append((tick, value))
                continue
            started = sounding.pop(key, None)
            if started is None:
                continue
            if len(started) == 1 and started[0][0] != tick:
                notes.append((track, key, started[0][0], tick, started[0][1]))
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
               notes: list) -> None:
    """pretty_midi's NOTE_OFF rule: end every note of the key that began before this tick;
    the ones that began on this tick keep sounding if some note ended, else they are dropped."""
    ended = [(on, v) for on, v in started if on != tick]
    for on, velocity in ended:
        notes.append((track, key, on, tick, velocity))
    if ended and len(ended) < len(started):
        sounding[key] = [(on, v) for on, v in started if on == tick]


def _varint(data: bytes, i: int) -> tuple[int, int]:
    """(value, next index) of a MIDI variable-length quantity at data[i]."""
    value = 0
    while True:
        byte = data[i]
        i += 1
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, i


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
        ticks = ticks.astype(np.int64)
        k = np.searchsorted(seg_tick, ticks, side="right") - 1
        return seg_time[k] + seg_scale[k] * (ticks - seg_tick[k])

    return to_seconds


def _read_checked(path: Path) -> bytes:
    """The bytes of a file that at least looks like complete MIDI, else a MidiReadError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MidiReadError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise MidiReadError(f"{path}: is a folder, not a MIDI file") from None
    except OSError as e:
        raise MidiReadError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    if not data:
        raise MidiReadError(f"{path}: empty file (0 bytes)")
    if not data.startswith(b"MThd"):
        raise MidiReadError(f"{path}: not a MIDI file (bad header)")
    problem = _structure_problem(data)
    if problem:
        raise MidiReadError(f"{path}: {problem}")
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


def _smf_bytes(pm: pretty_midi.PrettyMIDI) -> bytes | None:
    """The file `pm.write` would write (same tracks, channels and events), or None when `pm`
    has tempo changes, lyrics or text events, which are left to pretty_midi."""
    times, bpm = pm.get_tempo_changes()
    if len(times) != 1 or times[0] != 0 or pm.lyrics or pm.text_events:
        return None
    tick_seconds = 60.0 / (bpm[0] * pm.resolution)

    def ticks(seconds) -> np.ndarray:  # the nearest tick, as pretty_midi's time_to_tick
        seconds = np.asarray(seconds, dtype=np.float64).reshape(-1)
        return np.rint(seconds / tick_seconds).astype(np.int64)

    meta = [(0, 1, b"\xff\x51\x03" + int(6e7 / bpm[0]).to_bytes(3, "big"))]
    signatures = pm.time_signature_changes
    if not signatures or min(ts.time for ts in signatures) > 0:
        meta.append((0, 2, b"\xff\x58\x04\x04\x02\x18\x08"))  # 4/4, as pretty_midi adds
    for ts in signatures:
        log2 = int(ts.denominator).bit_length() - 1
        meta.append((int(ticks(ts.time)[0]), 2, bytes([0xFF, 0x58, 4, ts.numerator, log2, 24, 8])))
    for ks in pm.key_signature_changes:
        mode, sharps = pretty_midi.key_number_to_mode_accidentals(ks.key_number)
        meta.append((int(ticks(ks.time)[0]), 3, bytes([0xFF, 0x59, 2, sharps & 0xFF, mode])))
    meta.sort(key=lambda e: (e[0], e[1]))
    conductor = bytearray()
    last = 0
    for tick, _, event in meta:
        conductor += _varint_bytes(tick - last) + event
        last = tick
    tracks = [bytes(conductor) + b"\x01\xff\x2f\x00"]

    channels = [c for c in range(16) if c != 9]
    for n, inst in enumerate(pm.instruments):
        channel = 9 if inst.is_drum else channels[n % len(channels)]
        head = b""
        if inst.name:
            name = inst.name.encode("latin-1", "replace")
            head = b"\x00\xff\x03" + _varint_bytes(len(name)) + name
        head += bytes([0, 0xC0 | channel, inst.program & 0x7F])
        events = _channel_events(inst, channel, ticks)
        if events is None:
            return None
        tracks.append(head + events + b"\x01\xff\x2f\x00")  # end of track one tick later

    out = bytearray(b"MThd" + struct.pack(">IHHH", 6, 1, len(tracks), pm.resolution))
    for track in tracks:
        out += b"MTrk" + struct.pack(">I", len(track)) + track
    return bytes(out)


def _channel_events(inst: pretty_midi.Instrument, channel: int, ticks) -> bytes | None:
    """Bends, controls and notes of one instrument as MIDI bytes, in pretty_midi's order."""
    notes = np.array([(x.start, x.end, x.pitch, x.velocity) for x in inst.notes]).reshape(-1, 4)
    bends = np.array([(b.time, b.pitch + 8192) for b in inst.pitch_bends]).reshape(-1, 2)
    ccs = np.array([(c.time, c.number, c.value) for c in inst.control_changes]).reshape(-1, 3)
    pitch, velocity = notes[:, 2].astype(np.int64), notes[:, 3].astype(np.int64)
    bend = bends[:, 1].astype(np.int64)
    number, value = ccs[:, 1].astype(np.int64), ccs[:, 2].astype(np.int64)
    tick = np.concatenate([ticks(bends[:, 0]), ticks(ccs[:, 0]), ticks(notes[:, 1]),
                           ticks(notes[:, 0])])
    if len(tick) and (tick.min() < 0 or tick.max() >= 1 << 28):
        return None  # pretty_midi raises its own error for these
    kind = np.repeat([0, 1, 2, 2], [len(bends), len(ccs), len(notes), len(notes)])
    status = np.array([0xE0, 0xB0, 0x90]) | channel
    data1 = np.concatenate([bend & 0x7F, number, pitch, pitch])
    data2 = np.concatenate([bend >> 7, value, np.zeros_like(pitch), velocity])  # off: velocity 0
    # pretty_midi's order at one tick: bends by value, controls by (number, value), notes by
    # (pitch, velocity), so a key's NOTE_OFF (velocity 0) comes before its next NOTE_ON.
    rank = np.concatenate([bend, number * 128 + value, pitch * 128, pitch * 128 + velocity])
    order = np.lexsort((rank, kind, tick))
    tick, kind, data1, data2 = tick[order], kind[order], data1[order], data2[order]
    delta = np.diff(tick, prepend=0)
    cols = [(delta >> shift) & 0x7F | 0x80 for shift in (21, 14, 7)] + [delta & 0x7F]
    used = [delta >= 1 << shift for shift in (21, 14, 7)] + [np.ones(len(delta), dtype=bool)] * 4
    table = np.stack(cols + [status[kind], np.clip(data1, 0, 127), np.clip(data2, 0, 127)], axis=1)
    return table[np.stack(used, axis=1)].astype(np.uint8).tobytes()


def _varint_bytes(value: int) -> bytes:
    out = [value & 0x7F]
    while value > 0x7F:
        value >>= 7
        out.append(0x80 | (value & 0x7F))
    return bytes(reversed(out))
