"""Performance-RNN event codec: MIDI <-> NOTE_ON / NOTE_OFF / TIME_SHIFT / VELOCITY tokens.

Encoding (see musicgpt/vocab.py for the id table): all non-drum instruments are merged into one
piano part (drum tracks are dropped), the sustain pedal is applied per instrument, and times
are rounded to the nearest step (halves to even), counted from time 0 of the file. Per key a note ends where
the key is struck again (NOTE_OFF then NOTE_ON at that step); two notes of one key starting on
the same step become one (the longer, then the louder); a note shorter than a step lasts one.
At each step the events come in this order: every NOTE_OFF by ascending pitch, then the
NOTE_ONs by (velocity bin, pitch), a NOTE_ON preceded by VELOCITY only when the bin differs
from the last VELOCITY emitted. Gaps longer than `max_shift_steps` become several TIME_SHIFTs,
the longest first. `encode` emits no EOS; callers that join pieces add it.

Decoding accepts any sequence: PAD, EOS and unknown ids are skipped, a NOTE_OFF of a silent key
is ignored, a NOTE_ON of a sounding key ends the old note first, notes that end on the step
they start are dropped, and notes still sounding at the end close at the final time (one step
after their start if no time passed). NOTE_ONs before any VELOCITY play at velocity 64's bin.

`transpose` and `time_stretch` work on token windows as the trainer cuts them (EOS, PAD and
events whose partner lies outside the window are kept in place).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pretty_midi

from musicgpt.errors import MusicGPTError
from musicgpt.midi_io import Notes, load_midi, read_notes, read_regular_file, write_midi
from musicgpt.vocab import (
    DEFAULT_VELOCITY,
    NOTE_OFF,
    NUM_PITCHES,
    TIME_SHIFT,
    CodecConfig,
    id_names,
    name_ids,
)

__all__ = [
    "CodecConfig", "DecodedNotes", "count_notes", "decode", "decode_notes", "duration_seconds",
    "encode", "load_midi", "parse_token_names", "read_token_file", "time_stretch", "token_name", "token_names",
    "transpose", "truncate_seconds", "write_midi",
]

_DEFAULT = CodecConfig()
TEMPO_BPM = 120.0  # decode writes at 120 bpm, 480 ticks per quarter: every DAW opens that
RESOLUTION = 480
QUOTE_CHARS = 40  # an error quotes this much of a bad line: a token file may hold one huge line
MAX_STRETCH = 0.05  # time_stretch accepts factors in [1 - MAX_STRETCH, 1 + MAX_STRETCH]


@dataclass
class DecodedNotes:
    """Notes decoded from tokens, with the token positions that made each of them."""

    pitch: np.ndarray  # int64
    start: np.ndarray  # float64 seconds
    end: np.ndarray  # float64 seconds, > start
    velocity: np.ndarray  # int64 MIDI velocity, 1..127
    on_index: np.ndarray  # int64 index of the NOTE_ON token
    off_index: np.ndarray  # token that ended it (NOTE_OFF or re-striking NOTE_ON); -1: the end
    velocity_index: np.ndarray  # the VELOCITY token in force at the NOTE_ON; -1: none yet

    def __len__(self) -> int:
        return len(self.pitch)


@dataclass
class _StepNotes:
    """Notes on the step grid, the form encode builds tokens from and decode recovers."""

    pitch: np.ndarray
    on: np.ndarray  # steps
    off: np.ndarray  # steps, > on
    vbin: np.ndarray  # velocity bin
    on_index: np.ndarray | None = None
    off_index: np.ndarray | None = None
    velocity_index: np.ndarray | None = None


# ---------------------------------------------------------------- encode


def encode(midi: str | os.PathLike | pretty_midi.PrettyMIDI | Notes,
           config: CodecConfig | None = None) -> np.ndarray:
    """Tokens (int16, no EOS) of a MIDI file path, PrettyMIDI object or notes already read by
    `read_notes`; MidiReadError if the file is bad."""
    cfg = config or _DEFAULT
    notes = midi if isinstance(midi, Notes) else read_notes(midi)
    return _tokens(_StepNotes(
        notes.pitch, grid_steps(notes.start, cfg), grid_steps(notes.end, cfg), cfg.velocity_to_bin(notes.velocity),
    ), cfg)


def grid_steps(seconds: np.ndarray, config: CodecConfig | None = None) -> np.ndarray:
    """Times in seconds as whole steps of the codec's grid (int64), rounded exactly as `encode` rounds
    note times: anything that must agree with the tokens (infill's cut, the copies check) uses this."""
    per_step = 1000.0 / (config or _DEFAULT).step_ms
    return np.rint(np.asarray(seconds) * per_step).astype(np.int64)


def _tokens(notes: _StepNotes, cfg: CodecConfig) -> np.ndarray:
    """The canonical token sequence of notes on the step grid (see the module docstring)."""
    n = _canonical(notes)
    ev_time = np.concatenate([n.off, n.on])
    ev_is_on = np.repeat([False, True], len(n.pitch))
    ev_pitch = np.concatenate([n.pitch, n.pitch])
    ev_vbin = np.concatenate([np.zeros_like(n.vbin), n.vbin])  # NOTE_OFFs sort by pitch only
    order = np.lexsort((ev_pitch, ev_vbin, ev_is_on, ev_time))
    ev_time, ev_is_on, ev_pitch, ev_vbin = (a[order] for a in (ev_time, ev_is_on, ev_pitch, ev_vbin))

    new_bin = np.zeros(len(order), dtype=bool)
    new_bin[ev_is_on] = ~_same_as_previous(ev_vbin[ev_is_on])
    events = np.where(ev_is_on, ev_pitch, NOTE_OFF + ev_pitch)
    return _lay_out(np.diff(ev_time, prepend=0), cfg, [cfg.velocity_offset + ev_vbin, events],
                    [new_bin, np.ones(len(order), dtype=bool)])


def _lay_out(gap: np.ndarray, cfg: CodecConfig, columns: list, counts: list) -> np.ndarray:
    """Tokens event by event: the TIME_SHIFTs for the event's `gap` steps (full ones first),
    then its own slots (columns[k] emitted counts[k] times). One np.repeat does it all."""
    full, rest = np.divmod(gap, cfg.max_shift_steps)
    codes = np.stack([np.full(len(gap), TIME_SHIFT + cfg.max_shift_steps - 1),
                      TIME_SHIFT + rest - 1, *columns], axis=1)
    repeat = np.stack([full, rest > 0, *counts], axis=1).astype(np.int64)
    return np.repeat(codes.ravel(), repeat.ravel()).astype(np.int16)


def _canonical(n: _StepNotes) -> _StepNotes:
    """One note per (key, onset step), each at least one step long, cut where its key re-sounds."""
    order = np.lexsort((-n.vbin, -n.off, n.on, n.pitch))
    p, on, off, vbin = n.pitch[order], n.on[order], n.off[order], n.vbin[order]
    first = ~(_same_as_previous(p) & _same_as_previous(on))
    p, on, off, vbin = p[first], on[first], off[first], vbin[first]
    off = np.maximum(off, on + 1)
    off = np.where(_same_as_next(p), np.minimum(off, np.roll(on, -1)), off)
    return _StepNotes(p, on, off, vbin)


def _same_as_previous(a: np.ndarray) -> np.ndarray:
    """a[i] == a[i - 1], False for the first element (safe on empty arrays)."""
    return np.concatenate([np.zeros(min(len(a), 1), dtype=bool), a[1:] == a[:-1]])


def _same_as_next(a: np.ndarray) -> np.ndarray:
    """a[i] == a[i + 1], False for the last element (safe on empty arrays)."""
    return np.concatenate([a[1:] == a[:-1], np.zeros(min(len(a), 1), dtype=bool)])


# ---------------------------------------------------------------- decode


def decode_notes(tokens: Sequence[int] | np.ndarray,
                 config: CodecConfig | None = None) -> DecodedNotes:
    """The notes any token sequence stands for, with their token positions (see module doc)."""
    cfg = config or _DEFAULT
    n = _step_notes(tokens, cfg)
    step = cfg.step_seconds
    return DecodedNotes(n.pitch, n.on * step, n.off * step, cfg.bin_to_velocity(n.vbin),
                        n.on_index, n.off_index, n.velocity_index)


def _step_notes(tokens: Sequence[int] | np.ndarray, cfg: CodecConfig) -> _StepNotes:
    t = np.asarray(tokens, dtype=np.int64).ravel()
    idx = np.arange(len(t))
    is_shift = (t >= TIME_SHIFT) & (t < cfg.velocity_offset)
    is_vel = (t >= cfg.velocity_offset) & (t < cfg.pad_id)
    is_note = (t >= 0) & (t < TIME_SHIFT)
    time = np.cumsum(np.where(is_shift, t - TIME_SHIFT + 1, 0))  # step of every token
    end_time = int(time[-1]) if len(t) else 0
    last_vel = np.maximum.accumulate(np.where(is_vel, idx, -1)) if len(t) else idx

    # Pair per key: a NOTE_ON lasts until the next note token of its key, whatever it is.
    ev = idx[is_note]
    pitch = t[ev] % NUM_PITCHES
    order = np.lexsort((ev, pitch))
    ev, pitch = ev[order], pitch[order]
    nxt = np.where(_same_as_next(pitch), np.roll(ev, -1), -1)
    ons = t[ev] < NOTE_OFF
    ev, pitch, nxt = ev[ons], pitch[ons], nxt[ons]

    on = time[ev]
    off = np.where(nxt >= 0, time[np.maximum(nxt, 0)], end_time)
    off = np.where((nxt < 0) & (off == on), on + 1, off)  # open at the very end: one step
    keep = off > on  # a note ended on its own step was never heard
    ev, pitch, nxt, on, off = ev[keep], pitch[keep], nxt[keep], on[keep], off[keep]
    order = np.argsort(ev, kind="stable")  # notes in the order they were struck
    ev, pitch, nxt, on, off = ev[order], pitch[order], nxt[order], on[order], off[order]

    vel_index = last_vel[ev]
    default_bin = cfg.velocity_to_bin(DEFAULT_VELOCITY)
    vbin = np.where(vel_index >= 0, t[np.maximum(vel_index, 0)] - cfg.velocity_offset,
                    default_bin)
    return _StepNotes(pitch, on, off, vbin, ev, nxt, vel_index)


def decode(tokens: Sequence[int] | np.ndarray,
           config: CodecConfig | None = None) -> pretty_midi.PrettyMIDI:
    """A PrettyMIDI (one piano, program 0, 120 bpm) of any token sequence; never fails."""
    notes = decode_notes(tokens, config)
    return piano_midi(notes.pitch, notes.start, notes.end, notes.velocity)


def piano_midi(pitch: np.ndarray, start: np.ndarray, end: np.ndarray, velocity: np.ndarray) -> pretty_midi.PrettyMIDI:
    """A PrettyMIDI of these notes (seconds) on one piano, program 0, at 120 bpm."""
    pm = pretty_midi.PrettyMIDI(resolution=RESOLUTION, initial_tempo=TEMPO_BPM)
    piano = pretty_midi.Instrument(program=0, name="Piano")
    piano.notes = [
        pretty_midi.Note(velocity=v, pitch=p, start=s, end=e)
        for p, s, e, v in zip(pitch.tolist(), start.tolist(), end.tolist(), velocity.tolist())
    ]
    pm.instruments.append(piano)
    return pm


# ---------------------------------------------------------------- readable names


def token_name(token: int, config: CodecConfig | None = None) -> str:
    """Readable name of one id: NOTE_ON_60, NOTE_OFF_60, TIME_SHIFT_250ms, VELOCITY_19, PAD, EOS."""
    return token_names([token], config)[0]


def token_names(tokens: Iterable[int] | np.ndarray, config: CodecConfig | None = None) -> list[str]:
    """Readable names of ids; MusicGPTError for an id outside the vocabulary."""
    cfg = config or _DEFAULT
    names = id_names(cfg)
    ids = np.asarray(tokens, dtype=np.int64).ravel()
    bad = ids[(ids < 0) | (ids >= cfg.vocab_size)]
    if len(bad):
        raise MusicGPTError(f"token id {bad[0]} is outside the vocabulary (0..{cfg.vocab_size - 1})")
    return [names[i] for i in ids.tolist()]


def parse_token_names(names: Iterable[str], config: CodecConfig | None = None,
                      source: str = "") -> np.ndarray:
    """Ids (int16) of names, one per item (case-insensitive, blank items skipped)."""
    ids = name_ids(config or _DEFAULT)
    out = []
    for line_no, raw in enumerate(names, start=1):
        name = raw.strip()
        if not name:
            continue
        token = ids.get(name.upper())
        if token is None:
            shown = name if len(name) <= QUOTE_CHARS else name[:QUOTE_CHARS] + "..."
            raise MusicGPTError(f"{source or '<tokens>'}:{line_no}: unknown token {shown!r}")
        out.append(token)
    return np.array(out, dtype=np.int16)


MAX_TOKEN_FILE_BYTES = 64 << 20  # a token file of many hours of music is a few MB


def read_token_file(path: str | os.PathLike, config: CodecConfig | None = None) -> np.ndarray:
    """Ids of a token file written by `musicgpt encode` (one name per line); a one-line error
    for a file that is not a regular, UTF-8 text file of at most MAX_TOKEN_FILE_BYTES."""
    data = read_regular_file(path, MAX_TOKEN_FILE_BYTES, what="token file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MusicGPTError(f"{path}: not a token file (not UTF-8 text)") from None
    return parse_token_names(text.splitlines(), config, source=str(path))


# ---------------------------------------------------------------- measuring and cutting


def count_notes(tokens: Sequence[int] | np.ndarray, config: CodecConfig | None = None) -> int:
    """How many notes `decode` would play."""
    return len(_step_notes(tokens, config or _DEFAULT).pitch)


def duration_seconds(tokens: Sequence[int] | np.ndarray, config: CodecConfig | None = None) -> float:
    """Total of the TIME_SHIFTs, in seconds."""
    cfg = config or _DEFAULT
    t = np.asarray(tokens, dtype=np.int64)
    shifts = t[(t >= TIME_SHIFT) & (t < cfg.velocity_offset)]
    return float((shifts - TIME_SHIFT + 1).sum() * cfg.step_seconds)


def truncate_seconds(tokens: Sequence[int] | np.ndarray, seconds: float,
                     config: CodecConfig | None = None) -> np.ndarray:
    """The prefix holding the events strictly before `seconds` (for cutting a primer)."""
    cfg = config or _DEFAULT
    t = np.asarray(tokens)
    is_shift = (t >= TIME_SHIFT) & (t < cfg.velocity_offset)
    time_after = np.cumsum(np.where(is_shift, t.astype(np.int64) - TIME_SHIFT + 1, 0))
    limit = seconds * 1000.0 / cfg.step_ms
    # Time only grows, so the kept tokens are a prefix: stop at the first one reaching `limit`.
    return t[: int(np.searchsorted(time_after, limit, side="left"))]


# ---------------------------------------------------------------- augmentation


def transpose(tokens: Sequence[int] | np.ndarray, semitones: int,
              config: CodecConfig | None = None) -> np.ndarray:
    """Every NOTE_ON/NOTE_OFF moved by `semitones`; keys pushed outside 0..127 are dropped.

    Works on any window (EOS, PAD and notes cut by the window edges stay as they are). A dropped
    note loses its NOTE_ON and NOTE_OFF, a VELOCITY left governing no note goes too, and the
    TIME_SHIFTs around removed tokens are re-split as `encode` splits them.
    """
    cfg = config or _DEFAULT
    t = np.asarray(tokens, dtype=np.int64).ravel()
    is_note = (t >= 0) & (t < TIME_SHIFT)
    pitch = t % NUM_PITCHES + int(semitones)
    keep = ~is_note | ((pitch >= 0) & (pitch < NUM_PITCHES))
    moved = np.where(is_note, t + int(semitones), t)
    return _retime(moved[_drop_stale_velocities(t, keep, cfg)], cfg, 1.0)


def time_stretch(tokens: Sequence[int] | np.ndarray, factor: float,
                 config: CodecConfig | None = None) -> np.ndarray:
    """The window played `factor` times as long (0.95..1.05), TIME_SHIFTs re-quantised.

    Every event keeps its place in the sequence; its time from the window start is scaled and
    rounded, so no error builds up and each duration stays within about a step of factor times
    the original. Events at different steps stay at different steps, so no note vanishes.
    """
    if not 1 - MAX_STRETCH <= factor <= 1 + MAX_STRETCH:
        raise MusicGPTError(
            f"time_stretch factor must be in [{1 - MAX_STRETCH}, {1 + MAX_STRETCH}], got {factor}"
        )
    cfg = config or _DEFAULT
    return _retime(np.asarray(tokens, dtype=np.int64).ravel(), cfg, float(factor))


def _retime(t: np.ndarray, cfg: CodecConfig, factor: float) -> np.ndarray:
    """t with its TIME_SHIFTs rebuilt: other tokens in order at round(time * factor) steps, and
    the window's total time (trailing shifts included) scaled the same way."""
    is_shift = (t >= TIME_SHIFT) & (t < cfg.velocity_offset)
    time = np.cumsum(np.where(is_shift, t - TIME_SHIFT + 1, 0))
    events = t[~is_shift]
    times = np.append(time[~is_shift], time[-1] if len(t) else 0)  # last: the end of the window
    distinct, group = np.unique(times, return_inverse=True)
    scaled = np.rint(distinct * factor).astype(np.int64)
    # Two 1-step gaps shrunk by 0.95 may round onto one step; push such a time one step on
    # (a running max of scaled - rank) so every note keeps at least one step.
    rank = np.arange(len(distinct))
    scaled = np.maximum.accumulate(scaled - rank) + rank
    gap = np.diff(scaled[group], prepend=0)
    has_token = np.ones(len(times), dtype=bool)
    has_token[-1] = False  # the end of the window only brings its trailing shifts
    return _lay_out(gap, cfg, [np.append(events, 0)], [has_token])


def _drop_stale_velocities(t: np.ndarray, keep: np.ndarray, cfg: CodecConfig) -> np.ndarray:
    """`keep` less the VELOCITY tokens that governed NOTE_ONs which are all dropped, and those
    that now repeat the bin already in force."""
    idx = np.arange(len(t))
    is_vel = (t >= cfg.velocity_offset) & (t < cfg.pad_id)
    is_on = (t >= 0) & (t < NOTE_OFF)
    governor = np.maximum.accumulate(np.where(is_vel, idx, -1)) if len(t) else idx
    governed = is_on & (governor >= 0)
    before = np.bincount(governor[governed], minlength=len(t))
    after = np.bincount(governor[governed & keep], minlength=len(t))
    keep = keep & ~(is_vel & (before > 0) & (after == 0))
    kept_vel = np.flatnonzero(keep & is_vel)
    keep[kept_vel[_same_as_previous(t[kept_vel])]] = False
    return keep
