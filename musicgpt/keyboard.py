"""Which keys are down, and for how long: the keyboard state a model with `sounding_notes` reads.

After every token the state is, per MIDI pitch, whether the key sounds and how long ago it was
struck (in seconds, capped at MAX_AGE_S). The model's input at a position gains a projection of
`[sounding (128), sounding * min(age, MAX_AGE_S) / MAX_AGE_S (128)]`, the state after that
position's token. A decoder has to remember which of hundreds of earlier NOTE_ONs are still
unreleased to know which NOTE_OFFs make sense; the state says it directly, so a note struck 500
tokens back is as easy to release as one struck 5 tokens back.

The state is read from the tokens a sequence holds, starting from the keys down before its first
token (`sounding_before`: a training or evaluation window cut from the middle of a piece starts with
the piece's notes still sounding, as a sampler's prompt does), or with no key down:
- NOTE_ON p puts key p down, struck now; NOTE_OFF p lifts it; TIME_SHIFT moves now on;
- EOS (a piece starts or ends) lifts every key;
- a fill-in-the-middle sequence (`musicgpt.fim`) is read in time order: the prefix, then the
  middle continuing from it; the suffix starts with no key down (what precedes it is unwritten).
  One infilling triple per sequence, as training and `musicgpt infill` make them.

Two implementations that tests hold equal: `note_features` reads whole sequences at once in
torch (training, evaluation); `Keyboard` follows one token at a time in numpy (every sampler,
the torch-free ONNX one included).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from musicgpt.controls import Controls
from musicgpt.vocab import NOTE_OFF, NOTE_ON, NUM_PITCHES, TIME_SHIFT, CodecConfig

KEY_FEATURES = 2 * NUM_PITCHES
MAX_AGE_S = 8.0  # ages past this read the same: long enough for any pedalled note

# What each token does to the keyboard.
OTHER, PRESS, LIFT, WAIT, CLEAR, SUFFIX, MIDDLE = range(7)


@dataclass(frozen=True)
class KeyTable:
    """Per token id: its action (OTHER, PRESS...), its pitch, the time steps it waits; and the step."""

    action: np.ndarray  # int64 [vocab]
    pitch: np.ndarray  # int64 [vocab], 0 where the token has no pitch
    steps: np.ndarray  # int64 [vocab]
    step_seconds: float

    @property
    def has_fim(self) -> bool:
        return bool((self.action == SUFFIX).any())


def key_table(controls: Controls, vocab_size: int | None = None) -> KeyTable:
    """The table of a model with these controls; ids past them (up to `vocab_size`) do nothing."""
    codec = controls.codec
    size = max(vocab_size or 0, controls.vocab_size)
    action = np.full(size, OTHER, np.int64)
    pitch = np.zeros(size, np.int64)
    steps = np.zeros(size, np.int64)
    action[NOTE_ON:NOTE_ON + NUM_PITCHES] = PRESS
    action[NOTE_OFF:NOTE_OFF + NUM_PITCHES] = LIFT
    pitch[:2 * NUM_PITCHES] = np.tile(np.arange(NUM_PITCHES), 2)
    action[TIME_SHIFT:codec.velocity_offset] = WAIT
    steps[TIME_SHIFT:codec.velocity_offset] = np.arange(1, codec.max_shift_steps + 1)
    action[codec.eos_id] = CLEAR
    if controls.fim:
        action[controls.fim_ids[1]] = SUFFIX
        action[controls.fim_ids[2]] = MIDDLE
    return KeyTable(action, pitch, steps, codec.step_seconds)


def features(sounding: np.ndarray, age_s: np.ndarray) -> np.ndarray:
    """The model's input from keys down (bool [..., 128]) and their ages in seconds."""
    out = np.empty((*sounding.shape[:-1], KEY_FEATURES), np.float32)
    down, age = out[..., :NUM_PITCHES], out[..., NUM_PITCHES:]
    down[...] = sounding
    np.clip(age_s, 0.0, MAX_AGE_S, out=age, casting="same_kind")
    age *= down
    age /= MAX_AGE_S
    return out


def sounding_before(tokens: np.ndarray, config: CodecConfig) -> np.ndarray:
    """The keyboard after plain event tokens (a piece's, EOS-framed): float32 [2, 128], each key's
    down flag and how many seconds ago it was struck (0 for a key that is up)."""
    t = np.asarray(tokens, dtype=np.int64).reshape(-1)
    out = np.zeros((2, NUM_PITCHES), np.float32)
    if not len(t):
        return out
    pos = np.arange(len(t))
    is_shift = (t >= TIME_SHIFT) & (t < config.velocity_offset)
    elapsed = np.cumsum(np.where(is_shift, t - TIME_SHIFT + 1, 0))  # steps after each token
    cleared = pos[t == config.eos_id].max(initial=-1)
    pressed = np.full(NUM_PITCHES, -1)
    lifted = np.full(NUM_PITCHES, -1)
    is_on, is_off = (t >= NOTE_ON) & (t < NOTE_ON + NUM_PITCHES), (t >= NOTE_OFF) & (t < NOTE_OFF + NUM_PITCHES)
    np.maximum.at(pressed, t[is_on] - NOTE_ON, pos[is_on])
    np.maximum.at(lifted, t[is_off] - NOTE_OFF, pos[is_off])
    down = pressed > np.maximum(lifted, cleared)
    out[0] = down
    out[1] = np.where(down, (elapsed[-1] - elapsed[np.maximum(pressed, 0)]) * config.step_seconds, 0.0)
    return out


def moved_sounding(sounding: np.ndarray, semitones: int, stretch: float) -> np.ndarray:
    """`sounding_before`'s state for the window transposed and time-stretched as `musicgpt.codec`
    does it: keys pushed off the keyboard are dropped, ages scale with the stretch."""
    out = np.zeros_like(sounding)
    src = slice(max(0, -semitones), NUM_PITCHES - max(0, semitones))
    dst = slice(max(0, semitones), NUM_PITCHES - max(0, -semitones))
    out[:, dst] = sounding[:, src]
    out[1] *= stretch
    return out


class Keyboard:
    """The keyboard state of `rows` sequences, followed token by token (numpy, no torch)."""

    def __init__(self, table: KeyTable, rows: int = 1, sounding: np.ndarray | None = None):
        """`sounding`: the state before the first token (`sounding_before`), shared by every row; None: all up."""
        self.table = table
        self.down = np.zeros((rows, NUM_PITCHES), bool)
        self.struck = np.zeros((rows, NUM_PITCHES))  # in seconds, on each row's clock
        self.now = np.zeros(rows)
        if sounding is not None:
            self.down[:] = sounding[0] > 0
            self.struck[:] = -sounding[1]
        self.saved: list[tuple | None] = [None] * rows  # the prefix's state while a suffix is read

    def play(self, tokens: np.ndarray) -> np.ndarray:
        """Follow one token per row ([rows]); the features after it, float32 [rows, 256]."""
        for row, token in enumerate(np.asarray(tokens).reshape(-1)):
            self._move(row, token)
        return features(self.down, self.now[:, None] - self.struck)

    def follow(self, tokens: np.ndarray) -> None:
        """Follow a sequence shared by every row ([T]) without reading features (a dropped prefix)."""
        for token in np.asarray(tokens).reshape(-1):
            for row in range(len(self.now)):
                self._move(row, token)

    def sounding(self) -> np.ndarray:
        """Each row's state as `sounding_before` gives it: float32 [rows, 2, 128]."""
        age = np.where(self.down, self.now[:, None] - self.struck, 0.0)
        return np.stack([self.down, age], 1).astype(np.float32)

    def _move(self, row: int, token: int) -> None:
        t = self.table
        action, pitch = t.action[token], t.pitch[token]
        if action == PRESS:
            self.down[row, pitch] = True
            self.struck[row, pitch] = self.now[row]
        elif action == LIFT:
            self.down[row, pitch] = False
        elif action == WAIT:
            self.now[row] += t.steps[token] * t.step_seconds
        elif action == CLEAR:
            self.down[row] = False
        elif action == SUFFIX:
            self.saved[row] = (self.down[row].copy(), self.struck[row].copy(), self.now[row])
            self.down[row] = False
        elif action == MIDDLE and self.saved[row] is not None:
            self.down[row], self.struck[row], self.now[row] = self.saved[row]
            self.saved[row] = None

    def play_sequence(self, tokens: np.ndarray) -> np.ndarray:
        """Follow a sequence shared by every row ([T]); the features after each token, [T, 256]."""
        out = np.zeros((len(tokens), KEY_FEATURES), np.float32)
        for i, token in enumerate(np.asarray(tokens).reshape(-1)):
            out[i] = self.play(np.full(len(self.now), token))[0]
        return out

    def reorder(self, rows: np.ndarray) -> None:
        """Row b continues old row rows[b] (beam search)."""
        self.down, self.struck, self.now = self.down[rows], self.struck[rows], self.now[rows]
        self.saved = [self.saved[r] for r in rows]
