"""The event vocabulary of the Performance-RNN style codec and its `CodecConfig`.

Default layout (step_ms=10, max_shift_steps=100, velocity_bins=32; vocab_size 390):

    ids        token          meaning
    0..127     NOTE_ON_p      key p (MIDI pitch) goes down
    128..255   NOTE_OFF_p     key p goes up
    256..355   TIME_SHIFT_n   time moves on by n = 1..100 steps of 10 ms (10 ms .. 1 s)
    356..387   VELOCITY_b     later NOTE_ONs play at velocity bin b = 0..31
    388        PAD            padding, never a musical event
    389        EOS            "<|endoftext|>": marks the start and end of a piece

With other settings the blocks keep this order: TIME_SHIFT has `max_shift_steps` ids,
VELOCITY has `velocity_bins` ids, then PAD and EOS. Velocity bin b holds the MIDI velocities
v in 1..127 with (v - 1) * velocity_bins // 127 == b and decodes to the middle of that range.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import cache

import numpy as np

from musicgpt.errors import MusicGPTError

NUM_PITCHES = 128
NOTE_ON = 0
NOTE_OFF = NUM_PITCHES
TIME_SHIFT = 2 * NUM_PITCHES
DEFAULT_VELOCITY = 64  # used by decode for NOTE_ONs that come before any VELOCITY token

# (lowest, highest) allowed value of each setting; the bounds keep every id inside int16.
_LIMITS = {"step_ms": (1, 1000), "max_shift_steps": (1, 10_000), "velocity_bins": (1, 127)}


@dataclass(frozen=True)
class CodecConfig:
    """Time step, longest single TIME_SHIFT and number of velocity bins; fixes the id layout."""

    step_ms: int = 10
    max_shift_steps: int = 100
    velocity_bins: int = 32

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            lo, hi = _LIMITS[f.name]
            # bool is an int subclass; True as a step size is a bug, not a setting.
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise MusicGPTError(f"codec config: {f.name} must be an integer, got {value!r}")
            if not lo <= value <= hi:
                raise MusicGPTError(f"codec config: {f.name} must be in {lo}..{hi}, got {value}")
            object.__setattr__(self, f.name, int(value))

    @property
    def step_seconds(self) -> float:
        return self.step_ms / 1000.0

    @property
    def velocity_offset(self) -> int:
        return TIME_SHIFT + self.max_shift_steps

    @property
    def pad_id(self) -> int:
        return self.velocity_offset + self.velocity_bins

    @property
    def eos_id(self) -> int:
        return self.pad_id + 1

    @property
    def vocab_size(self) -> int:
        return self.eos_id + 1

    def to_dict(self) -> dict:
        """Plain JSON-able settings, stored next to cached tokens and in checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CodecConfig:
        """The config saved by `to_dict`; missing keys take defaults, unknown keys are an error."""
        if not isinstance(d, dict):
            raise MusicGPTError(f"codec config: expected a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise MusicGPTError(f"codec config: unknown setting(s) {', '.join(map(repr, unknown))}")
        return cls(**d)

    def velocity_to_bin(self, velocity: np.ndarray) -> np.ndarray:
        """Velocity bin of each MIDI velocity (clipped to 1..127 first)."""
        v = np.clip(np.asarray(velocity, dtype=np.int64), 1, 127)
        return (v - 1) * self.velocity_bins // 127

    def bin_to_velocity(self, bins: np.ndarray) -> np.ndarray:
        """The MIDI velocity each bin decodes to: the middle of the velocities it holds."""
        return _bin_centres(self.velocity_bins)[np.asarray(bins, dtype=np.int64)]


@cache
def _bin_centres(bins: int) -> np.ndarray:
    v = np.arange(1, 128)
    b = (v - 1) * bins // 127
    lo = np.full(bins, 127)
    hi = np.zeros(bins, dtype=np.int64)
    np.minimum.at(lo, b, v)
    np.maximum.at(hi, b, v)
    return (lo + hi) // 2


@cache
def id_names(config: CodecConfig) -> tuple[str, ...]:
    """The readable name of every id, e.g. NOTE_ON_60, TIME_SHIFT_250ms, VELOCITY_19, EOS."""
    names = [f"NOTE_ON_{p}" for p in range(NUM_PITCHES)]
    names += [f"NOTE_OFF_{p}" for p in range(NUM_PITCHES)]
    names += [f"TIME_SHIFT_{n * config.step_ms}ms" for n in range(1, config.max_shift_steps + 1)]
    names += [f"VELOCITY_{b}" for b in range(config.velocity_bins)]
    return tuple(names + ["PAD", "EOS"])


@cache
def name_ids(config: CodecConfig) -> dict[str, int]:
    """Upper-cased name -> id, the inverse of `id_names` used by the parser."""
    return {name.upper(): i for i, name in enumerate(id_names(config))}
