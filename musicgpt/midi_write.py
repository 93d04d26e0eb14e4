"""Writing MIDI bytes ourselves: the file `pretty_midi` would write for what `codec.decode` makes,
built directly (one tempo, notes, control changes), and always with valid delta times.
"""

from __future__ import annotations

import struct

import numpy as np
import pretty_midi

# A delta time has at most 4 bytes (28 bits), 77 hours at decode's 960 ticks a second. A longer
# gap is bridged by sequencer-specific meta events that carry MAX_DELTA ticks each, with the
# manufacturer id 0x7D reserved for non-commercial use, so no sequencer takes one for its own:
# DAWs skip them, pretty_midi ignores them, and a note-free event changes no note.
MAX_DELTA = 0x0FFFFFFF
_FILLER = b"\xff\xff\xff\x7f" + b"\xff\x7f\x01\x7d"  # delta MAX_DELTA, then the meta event
MAX_WRITE_TICK = 1 << 40  # 4096 fillers at most; later events are left to pm.write


def smf_bytes(pm: pretty_midi.PrettyMIDI) -> bytes | None:
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
    if meta[-1][0] > MAX_WRITE_TICK:
        return None
    for tick, _, event in meta:
        conductor += _delta_bytes(tick - last) + event
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
    if len(tick) and (tick.min() < 0 or tick.max() > MAX_WRITE_TICK):
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
    fillers = np.maximum(delta - 1, 0) // MAX_DELTA  # each carries MAX_DELTA ticks of a longer gap
    delta -= fillers * MAX_DELTA
    cols = [(delta >> shift) & 0x7F | 0x80 for shift in (21, 14, 7)] + [delta & 0x7F]
    used = [delta >= 1 << shift for shift in (21, 14, 7)] + [np.ones(len(delta), dtype=bool)] * 4
    table = np.stack(cols + [status[kind], np.clip(data1, 0, 127), np.clip(data2, 0, 127)], axis=1)
    used = np.stack(used, axis=1)
    out = table[used].astype(np.uint8)
    if fillers.any():
        sizes = used.sum(axis=1)
        at = np.repeat(np.cumsum(sizes) - sizes, fillers * len(_FILLER))  # before their event
        out = np.insert(out, at, np.tile(np.frombuffer(_FILLER, dtype=np.uint8), int(fillers.sum())))
    return out.tobytes()


def _delta_bytes(delta: int) -> bytes:
    """A delta time as MIDI bytes, gaps over MAX_DELTA ticks bridged by _FILLER events."""
    fillers = max(delta - 1, 0) // MAX_DELTA
    return _FILLER * fillers + _varint_bytes(delta - fillers * MAX_DELTA)


def _varint_bytes(value: int) -> bytes:
    out = [value & 0x7F]
    while value > 0x7F:
        value >>= 7
        out.append(0x80 | (value & 0x7F))
    return bytes(reversed(out))
