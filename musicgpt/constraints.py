"""What a sampled row may emit next, and when it ends: the musical rules of decoding.

The model proposes logits; these rules remove tokens a piece of piano music should not get
there:
  - PAD never, EOS never when a length was asked for;
  - NOTE_OFF only for a key that sounds: releasing a key that is up does nothing, and a small
    model spends a share of its releases on such near misses while the note it meant rings on;
  - from silence, no pause before the first note (`start_with_note`);
  - no pause that would leave more than `max_quiet` steps without a new NOTE_ON: a model can
    lock into 1-second TIME_SHIFTs and write a minute of silence;
  - no note held longer than `max_held` steps: a pause that would carry a sounding note past it
    is removed, and a row whose note has reached it must release it (its NOTE_OFF is the only
    token left), so the model sees the release in its own context. A model forgets notes
    struck before its context window, and they would otherwise ring to the end of the piece.
A row ends at EOS or when its music reaches `max_steps` time steps.

The bookkeeping (`RowState`) runs in plain Python on the token the decoding loop has chosen:
a few microseconds, where two dozen tiny array ops per token would cost more than the model's
step. The logits get one mask added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from musicgpt import codec
from musicgpt.vocab import NOTE_OFF, NUM_PITCHES, TIME_SHIFT, CodecConfig


@dataclass
class RowState:
    """One row so far: steps of music, steps since its last NOTE_ON (infinite before a piece from
    silence has its first note), and the keys sounding (key -> the step it was struck at)."""

    elapsed: int = 0
    quiet: float = 0
    struck: dict[int, int] = field(default_factory=dict)

    def copy(self) -> RowState:
        return RowState(self.elapsed, self.quiet, dict(self.struck))


@dataclass
class Rules:
    """The rules of one decoding run (see the module doc); steps are the codec's time steps."""

    max_new_tokens: int
    eos_id: int | None  # None: EOS does not end a row
    max_steps: float  # the music's length limit in steps (math.inf: none)
    config: CodecConfig
    banned: list[int]  # token ids never to emit
    start: RowState  # the state after the prompt
    max_quiet: float = math.inf  # steps without a new note (math.inf: no limit)
    max_held: float = math.inf  # steps a note may sound (math.inf: no limit)
    vocab_size: int = 0  # the model's, when control tokens follow the codec's (0: the codec's)
    release_sounding_only: bool = True  # NOTE_OFF only for keys that sound (False: any key)

    def __post_init__(self):
        self.vocab_size = max(self.vocab_size, self.config.vocab_size)
        self.steps = shift_steps(self.config, self.vocab_size)  # [V] steps each token moves time on
        self._steps = self.steps.tolist()
        self.base = np.zeros(self.vocab_size, dtype=np.float32)
        self.base[self.banned] = -np.inf

    def initial(self, rows: int) -> list[RowState]:
        return [self.start.copy() for _ in range(rows)]

    def mask_logits(self, logits: np.ndarray, rows: list[RowState]) -> np.ndarray:
        """Float32 logits [B, V] with every token the rules forbid for each row set to -inf."""
        return logits.astype(np.float32, copy=False) + self.mask(rows)

    def mask(self, rows: list[RowState]) -> np.ndarray:
        """What the rules add to each row's logits: 0, or -inf where a token is forbidden ([B, V];
        the shared [V] of fixed bans when no rule needs a row of its own)."""
        n, mask = self.config.max_shift_steps, None
        if self.release_sounding_only:
            mask = np.tile(self.base, (len(rows), 1))
            mask[:, NOTE_OFF:NOTE_OFF + NUM_PITCHES] = -np.inf
            for i, row in enumerate(rows):
                mask[i, [NOTE_OFF + key for key in row.struck]] = 0.0
        for i, row in enumerate(rows):
            oldest = row.elapsed - min(row.struck.values()) if row.struck else -1
            quiet_room = self.max_quiet - row.quiet if row.quiet < self.max_quiet else 0
            room = min(quiet_room, self.max_held - oldest)  # steps a pause may take
            if room >= n and oldest < self.max_held:
                continue  # most steps: only the fixed bans
            if mask is None:
                mask = np.tile(self.base, (len(rows), 1))
            if oldest >= self.max_held:  # a note has sounded max_held steps: release one now
                mask[i] = -np.inf
                for key, at in row.struck.items():
                    if row.elapsed - at >= self.max_held:
                        mask[i, NOTE_OFF + key] = 0.0
            else:  # TIME_SHIFT + k moves time on k + 1 steps
                mask[i, TIME_SHIFT + max(room, 0):TIME_SHIFT + n] = -np.inf
        return self.base if mask is None else mask

    def advance(self, rows: list[RowState], tokens: list[int]) -> None:
        """Update each row's state with its new token."""
        for row, token in zip(rows, tokens):
            if token < NOTE_OFF:
                row.struck[token] = row.elapsed
                row.quiet = 0
            elif token < NOTE_OFF + NUM_PITCHES:
                row.struck.pop(token - NOTE_OFF, None)
            elif token == self.config.eos_id:  # a new piece: nothing sounds
                row.struck.clear()
            else:
                row.elapsed += self._steps[token]
                row.quiet += self._steps[token]

    def ends(self, tokens, elapsed):
        """Whether each token ends its row, given the row's elapsed steps including it (ints,
        or arrays of candidates)."""
        # (no EOS rule: `tokens < 0` is False in the type of `tokens`, int or array)
        ended = tokens == self.eos_id if self.eos_id is not None else tokens < 0
        return ended | (elapsed >= self.max_steps)


def seconds_to_steps(seconds: float, config: CodecConfig) -> int:
    """Codec time steps covering `seconds`."""
    return math.ceil(seconds * 1000 / config.step_ms - 1e-9)


def shift_steps(config: CodecConfig, vocab_size: int = 0) -> np.ndarray:
    """[vocab_size] time steps by which each token moves time on (0 except TIME_SHIFTs)."""
    table = np.zeros(max(vocab_size, config.vocab_size), dtype=np.int64)
    table[TIME_SHIFT:TIME_SHIFT + config.max_shift_steps] = np.arange(1, config.max_shift_steps + 1)
    return table


def prompt_state(prompt: np.ndarray, config: CodecConfig) -> RowState:
    """The state after a prompt: the time since its last note struck, and its notes still
    sounding at its end, with their age."""
    notes = codec.decode_notes(prompt, config)
    end = round(codec.duration_seconds(prompt, config) * 1000 / config.step_ms)
    starts = np.rint(notes.start * 1000 / config.step_ms).astype(np.int64) - end  # <= 0
    sounding = notes.off_index < 0
    return RowState(quiet=-int(starts.max()) if len(starts) else 0,
                    struck=dict(zip(notes.pitch[sounding].tolist(), starts[sounding].tolist())))
