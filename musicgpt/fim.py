"""Fill-in-the-middle (Bavarian et al. 2022) for event tokens: cut a window at time positions and
put it in prefix-suffix-middle order, so a left-to-right model learns to write a missing passage.

    FIM_PREFIX prefix FIM_SUFFIX suffix FIM_MIDDLE middle

Cuts fall just before a TIME_SHIFT token, so each part holds whole moments of the music: the
prefix ends with everything that happens at its last time step, and the middle and suffix each
start by moving time on. Training turns a share of windows (`--fim-rate`) into this order and
learns every token, as the paper does; `musicgpt infill` builds the same order from a piece and
samples the middle.
"""

from __future__ import annotations

import numpy as np

from musicgpt.vocab import TIME_SHIFT, CodecConfig

# The share of training windows in FIM order for a new run: at this rate the paper found it costs
# left-to-right loss almost nothing.
FIM_RATE = 0.5


def time_cuts(tokens: np.ndarray, config: CodecConfig) -> np.ndarray:
    """Positions where a window may be cut: every index holding a TIME_SHIFT, and its end. (Its
    start is not one: a window may begin in the middle of a moment.)"""
    shifts = np.flatnonzero((tokens >= TIME_SHIFT) & (tokens < config.velocity_offset))
    return np.unique(np.concatenate([shifts, [len(tokens)]]))


def psm(prefix: np.ndarray, suffix: np.ndarray, middle: np.ndarray, fim_ids: tuple[int, int, int]) -> np.ndarray:
    """The prefix-suffix-middle sequence of three parts."""
    pre, suf, mid = (np.array([i], dtype=np.int64) for i in fim_ids)
    return np.concatenate([pre, prefix, suf, suffix, mid, middle]).astype(np.int64)


def fim_window(tokens: np.ndarray, rng: np.random.Generator, config: CodecConfig,
               fim_ids: tuple[int, int, int]) -> np.ndarray:
    """`tokens` cut at two random time positions into prefix, middle and suffix, in PSM order
    (3 tokens longer). The middle is never empty when the window holds a TIME_SHIFT."""
    cuts = time_cuts(tokens, config)
    a, b = np.sort(rng.choice(cuts, size=2, replace=False)) if len(cuts) > 1 else (0, len(tokens))
    a, b = int(a), int(b)
    return psm(tokens[:a], tokens[b:], tokens[a:b], fim_ids)


def middle_start(sequence: np.ndarray, fim_ids: tuple[int, int, int]) -> int:
    """Index of the first middle token in a PSM sequence (len(sequence) if it has no FIM_MIDDLE)."""
    hits = np.flatnonzero(np.asarray(sequence) == fim_ids[2])
    return int(hits[0]) + 1 if len(hits) else len(sequence)
