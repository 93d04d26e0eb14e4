"""Training and evaluation windows over encoded pieces, with style tags and fill-in-the-middle.

Each piece is framed as EOS + tokens + EOS. A training window is a pure function of (seed,
index): a piece drawn with probability proportional to its length, a start drawn uniformly,
optional augmentation; then, when the model has control tokens (`musicgpt.controls`), the piece's
tag in front (dropped in `tag_dropout` of windows, so the model also learns untagged music) and,
in `fim_rate` of windows, the prefix-suffix-middle order of `musicgpt.fim`. Being
index-deterministic makes resumed and distributed training reproducible without loader state.

Every window comes with the notes still sounding where it was cut (`musicgpt.keyboard`), so a
model that reads the keyboard knows them as a sampler's model does after a long prompt.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from musicgpt import codec
from musicgpt.controls import Controls
from musicgpt.data import Piece
from musicgpt.errors import MusicGPTError
from musicgpt.fim import fim_window
from musicgpt.keyboard import moved_sounding, sounding_before
from musicgpt.vocab import NUM_PITCHES, CodecConfig

IGNORE_INDEX = -100  # targets with this value (padding) do not count in the loss
Example = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs, targets, sounding notes [2, 128]


@dataclass
class Augment:
    """Random augmentation of a training window: transposition and time stretch."""

    max_transpose: int = 3  # semitones up or down, as in the Music Transformer
    max_stretch: float = codec.MAX_STRETCH  # time stretch factor in [1 - s, 1 + s]

    def __call__(self, tokens: np.ndarray, sounding: np.ndarray, rng: np.random.Generator,
                 config: CodecConfig) -> tuple[np.ndarray, np.ndarray]:
        """The window and the notes sounding before it, moved alike."""
        k = int(rng.integers(-self.max_transpose, self.max_transpose + 1))
        if k:
            tokens = codec.transpose(tokens, k, config)
        factor = float(rng.uniform(1 - self.max_stretch, 1 + self.max_stretch))
        return codec.time_stretch(tokens, factor, config), moved_sounding(sounding, k, factor)


def framed(piece: Piece, config: CodecConfig) -> np.ndarray:
    """EOS + the piece's tokens + EOS."""
    eos = np.array([config.eos_id], dtype=np.int16)
    return np.concatenate([eos, piece.tokens.astype(np.int16), eos])


def tag_ids(pieces: list[Piece], controls: Controls | None) -> list[int | None]:
    """Each piece's tag id under `controls` (None for an untagged piece or a tag it lacks)."""
    known = set(controls.tags) if controls is not None else set()
    return [controls.tag_id(p.tag) if p.tag in known else None for p in pieces]


class PieceSource(Protocol):
    """Pieces as `TokenWindowDataset` reads them: in memory (`PieceList`) or a token store's memory map."""

    lengths: np.ndarray  # tokens per piece, without EOS
    tag_names: tuple[str, ...]  # the tags that `tag_codes` index
    tag_codes: np.ndarray  # per piece, an index into `tag_names`, or -1 for none

    def framed_slice(self, k: int, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of piece `k` framed as EOS + tokens + EOS (clipped at its end)."""


class PieceList:
    """A `PieceSource` over encoded pieces held in memory."""

    def __init__(self, pieces: list[Piece], config: CodecConfig):
        self.framed = [framed(p, config) for p in pieces]
        self.lengths = np.array([len(p.tokens) for p in pieces], dtype=np.int64)
        self.tag_names = tuple(sorted({p.tag for p in pieces if p.tag is not None}))
        code = {name: k for k, name in enumerate(self.tag_names)}
        self.tag_codes = np.array([code.get(p.tag, -1) for p in pieces], dtype=np.int64)

    def framed_slice(self, k: int, start: int, stop: int) -> np.ndarray:
        return self.framed[k][start:stop]


def piece_weights(source: PieceSource, tag_weights: dict[str, float]) -> np.ndarray:
    """Each piece's weight from its tag (1 for tags not named); a named tag no piece has is an error."""
    present = [source.tag_names[c] for c in np.unique(source.tag_codes) if c >= 0]
    unknown = sorted(set(tag_weights) - set(present))
    if unknown:
        raise MusicGPTError(f"--tag-weight {unknown[0]}: no training piece has that tag "
                            f"(the tags are: {', '.join(sorted(present)) or 'none'})")
    per_code = np.array([*(tag_weights.get(t, 1.0) for t in source.tag_names), 1.0], dtype=np.float64)
    return per_code[source.tag_codes]  # code -1, no tag, takes the trailing 1.0


class TokenWindowDataset(torch.utils.data.Dataset):
    """Random windows of seq_len + 1 tokens; item `i` is a pure function of (seed, i).

    `pieces` is a list of `Piece`s or any `PieceSource` (a token store's memory map). A piece is
    drawn in O(log N) from a cumulative distribution made once, with the float operations of
    numpy's `Generator.choice(n, p=weights)`, so each window equals what `choice` would draw.
    Windows that run off a piece's end are padded and their padded targets set to IGNORE_INDEX.
    """

    def __init__(self, pieces: list[Piece] | PieceSource, seq_len: int, config: CodecConfig, *,
                 augment: Augment | None = None, seed: int = 0, controls: Controls | None = None,
                 fim_rate: float = 0.0, tag_dropout: float = 0.0, tag_weights: dict[str, float] | None = None):
        source = PieceList(pieces, config) if isinstance(pieces, list) else pieces
        if not len(source.lengths):
            raise MusicGPTError("no pieces to train on")
        if fim_rate > 0 and (controls is None or not controls.fim):
            raise MusicGPTError("FIM windows need a model whose vocabulary has the FIM sentinels")
        self.source = source
        known = set(controls.tags) if controls is not None else set()
        ids = [controls.tag_id(t) if t in known else -1 for t in source.tag_names]
        self.tags = np.array([*ids, -1], dtype=np.int64)[source.tag_codes]  # -1: no tag
        lengths = source.lengths.astype(np.float64) + 2  # framed
        drawn = lengths * piece_weights(source, tag_weights or {})
        weights = drawn / drawn.sum()
        self.cdf = weights.cumsum()  # as Generator.choice computes it, bit for bit
        self.cdf /= self.cdf[-1]
        self.seq_len, self.config, self.augment, self.seed = seq_len, config, augment, seed
        self.controls, self.fim_rate, self.tag_dropout = controls, fim_rate, tag_dropout
        self.num_tokens = int(lengths.sum())

    def __len__(self) -> int:
        return max(1, self.num_tokens // self.seq_len)

    def __getitem__(self, index: int) -> Example:
        rng = np.random.default_rng([self.seed, index])
        k = int(self.cdf.searchsorted(rng.random(), side="right"))
        size, need = int(self.source.lengths[k]) + 2, self.seq_len + 1
        tagged = fim = False
        if self.controls is not None:  # both drawn whether used or not: the stream never shifts
            tagged = bool(rng.random() >= self.tag_dropout and self.tags[k] >= 0)
            fim = rng.random() < self.fim_rate
        room = need - tagged - (3 if fim else 0)  # the tag and the three FIM sentinels
        # Take a little extra so a compressing time stretch still fills the window.
        take = room + room // 8 if self.augment else room
        start = int(rng.integers(0, max(1, size - room + 1)))
        window = self.source.framed_slice(k, start, start + take)
        sounding = sounding_before(self.source.framed_slice(k, 0, start), self.config)
        if self.augment:
            window, sounding = self.augment(window, sounding, rng, self.config)
        window = window[:room]
        if fim:
            window = fim_window(window, rng, self.config, self.controls.fim_ids)
        if tagged:
            window = np.concatenate([[self.tags[k]], window])
        return window_to_example(window, need, self.config.pad_id, sounding)


def window_to_example(window: np.ndarray, need: int, pad_id: int, sounding: np.ndarray | None = None) -> Example:
    """Pad a window to `need` tokens and split it into (inputs, targets) with padding ignored,
    plus the notes sounding before it (none if not given)."""
    buf = np.full(need, pad_id, dtype=np.int64)
    buf[: len(window)] = window
    x = torch.from_numpy(buf[:-1].copy())
    y = torch.from_numpy(buf[1:].copy())
    y[len(window) - 1 :] = IGNORE_INDEX
    if sounding is None:
        sounding = np.zeros((2, NUM_PITCHES), np.float32)
    return x, y, torch.from_numpy(np.asarray(sounding, np.float32))


def spread(total: int, limit: int | None) -> list[int] | None:
    """`limit` evenly spread numbers below `total` (None, meaning all, when there are no more than `limit`)."""
    return [i * total // limit for i in range(limit)] if limit is not None and total > limit else None


def eval_window_count(pieces: list[Piece], seq_len: int, controls: Controls | None = None) -> int:
    """How many windows `eval_token_windows` cuts, counted from the pieces' lengths alone."""
    return sum(len(window_starts(len(p.tokens), tag, seq_len)) for p, tag in zip(pieces, tag_ids(pieces, controls)))


def window_starts(length: int, tag: int | None, seq_len: int) -> range:
    """Where the evaluation windows of a piece of `length` tokens start in its framed tokens.

    Every token is a target once: untagged windows overlap by the one token that predicts the
    next window's first target; a tagged window's first target follows its tag.
    """
    return range(0, length + 2 - (1 if tag is None else 0), seq_len)


def eval_token_windows(pieces: list[Piece], seq_len: int, config: CodecConfig, controls: Controls | None = None,
                       only: list[int] | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(number, window, notes sounding before it) of the windows `eval_windows` makes, at most
    seq_len + 1 tokens each; with `only` (increasing numbers) just those, reading no other piece's tokens."""
    number, wanted = 0, set(only or ())
    for piece, tag in zip(pieces, tag_ids(pieces, controls)):
        starts = window_starts(len(piece.tokens), tag, seq_len)
        first = bisect_left(only, number) if only is not None else 0
        if only is not None and (first == len(only) or only[first] >= number + len(starts)):
            number += len(starts)
            continue
        tokens = framed(piece, config)
        for start in starts:
            if only is None or number in wanted:
                sounding = sounding_before(tokens[:start], config)
                if tag is None:
                    yield number, tokens[start:start + seq_len + 1], sounding
                else:
                    yield number, np.concatenate([[tag], tokens[start:start + seq_len]]), sounding
            number += 1


def eval_windows(pieces: list[Piece], seq_len: int, config: CodecConfig,
                 controls: Controls | None = None, limit: int | None = None) -> list[Example]:
    """Non-overlapping left-to-right windows covering every piece once (no augmentation), each
    behind its piece's tag when the model knows it; with `limit`, an evenly spread subset."""
    only = spread(eval_window_count(pieces, seq_len, controls), limit)
    return [window_to_example(w, seq_len + 1, config.pad_id, sounding)
            for _, w, sounding in eval_token_windows(pieces, seq_len, config, controls, only)]


def infill_windows(pieces: list[Piece], seq_len: int, config: CodecConfig, controls: Controls,
                   seed: int = 0, limit: int | None = None) -> list[Example]:
    """Windows as `eval_windows` cuts them, each put in FIM order at random time cuts (a fixed
    seed), with only the middle's tokens as targets: the loss of writing a missing passage.
    With `limit`, an evenly spread subset of them (each as it is in the whole set)."""
    out = []
    only = spread(eval_window_count(pieces, seq_len - 3), limit)
    for i, tokens, sounding in eval_token_windows(pieces, seq_len - 3, config, only=only):
        rng = np.random.default_rng([seed, i])
        window = fim_window(tokens, rng, config, controls.fim_ids)
        x, y, sounding = window_to_example(window, seq_len + 1, config.pad_id, sounding)
        y[: int(np.flatnonzero(window == controls.fim_ids[2])[0])] = IGNORE_INDEX  # middle only
        out.append((x, y, sounding))
    return out


def collate(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack (inputs, targets, sounding notes) examples into a batch."""
    return tuple(torch.stack(part) for part in zip(*examples))


def batches(windows: list[Example], batch_size: int, limit: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Windows in batches; with `limit`, an evenly spread subset of that many windows."""
    if limit is not None and len(windows) > limit:
        windows = [windows[i * len(windows) // limit] for i in range(limit)]
    return [collate(windows[i:i + batch_size]) for i in range(0, len(windows), batch_size)]


def eval_batches(pieces: list[Piece], seq_len: int, config: CodecConfig, batch_size: int,
                 limit: int | None = None, controls: Controls | None = None) -> list[tuple[torch.Tensor, ...]]:
    """`eval_windows` in batches; with `limit`, an evenly spread subset of that many windows, the
    others never cut (a large validation split costs nothing)."""
    return batches(eval_windows(pieces, seq_len, config, controls, limit), batch_size)
