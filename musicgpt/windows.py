"""Training and evaluation windows over encoded pieces, with style tags and fill-in-the-middle.

Each piece is framed as EOS + tokens + EOS. A training window is a pure function of (seed,
index): a piece drawn with probability proportional to its length, a start drawn uniformly,
optional augmentation; then, when the model has control tokens (`musicgpt.controls`), the piece's
tag in front (dropped in `tag_dropout` of windows, so the model also learns untagged music) and,
in `fim_rate` of windows, the prefix-suffix-middle order of `musicgpt.fim`. Being
index-deterministic makes resumed and distributed training reproducible without loader state.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from musicgpt import codec
from musicgpt.controls import Controls
from musicgpt.data import Piece
from musicgpt.errors import MusicGPTError
from musicgpt.fim import fim_window
from musicgpt.vocab import CodecConfig

IGNORE_INDEX = -100  # targets with this value (padding) do not count in the loss
Example = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Augment:
    """Random augmentation of a training window: transposition and time stretch."""

    max_transpose: int = 3  # semitones up or down, as in the Music Transformer
    max_stretch: float = codec.MAX_STRETCH  # time stretch factor in [1 - s, 1 + s]

    def __call__(self, tokens: np.ndarray, rng: np.random.Generator, config: CodecConfig) -> np.ndarray:
        k = int(rng.integers(-self.max_transpose, self.max_transpose + 1))
        if k:
            tokens = codec.transpose(tokens, k, config)
        factor = float(rng.uniform(1 - self.max_stretch, 1 + self.max_stretch))
        return codec.time_stretch(tokens, factor, config)


def framed(piece: Piece, config: CodecConfig) -> np.ndarray:
    """EOS + the piece's tokens + EOS."""
    eos = np.array([config.eos_id], dtype=np.int16)
    return np.concatenate([eos, piece.tokens.astype(np.int16), eos])


def tag_ids(pieces: list[Piece], controls: Controls | None) -> list[int | None]:
    """Each piece's tag id under `controls` (None for an untagged piece or a tag it lacks)."""
    known = set(controls.tags) if controls is not None else set()
    return [controls.tag_id(p.tag) if p.tag in known else None for p in pieces]


def piece_weights(pieces: list[Piece], tag_weights: dict[str, float]) -> np.ndarray:
    """Each piece's weight from its tag (1 for tags not named); a named tag no piece has is an error."""
    unknown = sorted(set(tag_weights) - {p.tag for p in pieces})
    if unknown:
        known = sorted({p.tag for p in pieces if p.tag is not None})
        raise MusicGPTError(f"--tag-weight {unknown[0]}: no training piece has that tag "
                            f"(the tags are: {', '.join(known) or 'none'})")
    return np.array([tag_weights.get(p.tag, 1.0) for p in pieces], dtype=np.float64)


class TokenWindowDataset(torch.utils.data.Dataset):
    """Random windows of seq_len + 1 tokens; item `i` is a pure function of (seed, i).

    Windows that run off a piece's end are padded and their padded targets set to IGNORE_INDEX.
    """

    def __init__(self, pieces: list[Piece], seq_len: int, config: CodecConfig, *, augment: Augment | None = None,
                 seed: int = 0, controls: Controls | None = None, fim_rate: float = 0.0, tag_dropout: float = 0.0,
                 tag_weights: dict[str, float] | None = None):
        if not pieces:
            raise MusicGPTError("no pieces to train on")
        if fim_rate > 0 and (controls is None or not controls.fim):
            raise MusicGPTError("FIM windows need a model whose vocabulary has the FIM sentinels")
        self.pieces = [framed(p, config) for p in pieces]
        self.tags = tag_ids(pieces, controls)
        lengths = np.array([len(p) for p in self.pieces], dtype=np.float64)
        drawn = lengths * piece_weights(pieces, tag_weights or {})
        self.weights = drawn / drawn.sum()
        self.seq_len, self.config, self.augment, self.seed = seq_len, config, augment, seed
        self.controls, self.fim_rate, self.tag_dropout = controls, fim_rate, tag_dropout
        self.num_tokens = int(lengths.sum())

    def __len__(self) -> int:
        return max(1, self.num_tokens // self.seq_len)

    def __getitem__(self, index: int) -> Example:
        rng = np.random.default_rng([self.seed, index])
        k = int(rng.choice(len(self.pieces), p=self.weights))
        piece, need = self.pieces[k], self.seq_len + 1
        tagged = fim = False
        if self.controls is not None:  # both drawn whether used or not: the stream never shifts
            tagged = rng.random() >= self.tag_dropout and self.tags[k] is not None
            fim = rng.random() < self.fim_rate
        room = need - tagged - (3 if fim else 0)  # the tag and the three FIM sentinels
        # Take a little extra so a compressing time stretch still fills the window.
        take = room + room // 8 if self.augment else room
        start = int(rng.integers(0, max(1, len(piece) - room + 1)))
        window = piece[start:start + take]
        if self.augment:
            window = self.augment(window, rng, self.config)
        window = window[:room]
        if fim:
            window = fim_window(window, rng, self.config, self.controls.fim_ids)
        if tagged:
            window = np.concatenate([[self.tags[k]], window])
        return window_to_example(window, need, self.config.pad_id)


def window_to_example(window: np.ndarray, need: int, pad_id: int) -> Example:
    """Pad a window to `need` tokens and split it into (inputs, targets) with padding ignored."""
    buf = np.full(need, pad_id, dtype=np.int64)
    buf[: len(window)] = window
    x = torch.from_numpy(buf[:-1].copy())
    y = torch.from_numpy(buf[1:].copy())
    y[len(window) - 1 :] = IGNORE_INDEX
    return x, y


def eval_token_windows(pieces: list[Piece], seq_len: int, config: CodecConfig,
                       controls: Controls | None = None) -> Iterator[np.ndarray]:
    """The token windows `eval_windows` makes, at most seq_len + 1 tokens each."""
    for piece, tag in zip(pieces, tag_ids(pieces, controls)):
        tokens = framed(piece, config)
        # Every token is a target once: untagged windows overlap by the one token that predicts
        # the next window's first target; a tagged window's first target follows its tag.
        last = len(tokens) - (1 if tag is None else 0)
        for start in range(0, last, seq_len):
            if tag is None:
                yield tokens[start:start + seq_len + 1]
            else:
                yield np.concatenate([[tag], tokens[start:start + seq_len]])


def eval_windows(pieces: list[Piece], seq_len: int, config: CodecConfig,
                 controls: Controls | None = None) -> list[Example]:
    """Non-overlapping left-to-right windows covering every piece once (no augmentation), each
    behind its piece's tag when the model knows it."""
    return [window_to_example(w, seq_len + 1, config.pad_id)
            for w in eval_token_windows(pieces, seq_len, config, controls)]


def infill_windows(pieces: list[Piece], seq_len: int, config: CodecConfig, controls: Controls,
                   seed: int = 0) -> list[Example]:
    """Windows as `eval_windows` cuts them, each put in FIM order at random time cuts (a fixed
    seed), with only the middle's tokens as targets: the loss of writing a missing passage."""
    out = []
    for i, tokens in enumerate(eval_token_windows(pieces, seq_len - 3, config)):
        rng = np.random.default_rng([seed, i])
        window = fim_window(tokens, rng, config, controls.fim_ids)
        x, y = window_to_example(window, seq_len + 1, config.pad_id)
        y[: int(np.flatnonzero(window == controls.fim_ids[2])[0])] = IGNORE_INDEX  # middle only
        out.append((x, y))
    return out


def collate(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (inputs, targets) pairs into a batch."""
    xs, ys = zip(*examples)
    return torch.stack(xs), torch.stack(ys)


def batches(windows: list[Example], batch_size: int, limit: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Windows in batches; with `limit`, an evenly spread subset of that many windows."""
    if limit is not None and len(windows) > limit:
        windows = [windows[i * len(windows) // limit] for i in range(limit)]
    return [collate(windows[i:i + batch_size]) for i in range(0, len(windows), batch_size)]


def eval_batches(pieces: list[Piece], seq_len: int, config: CodecConfig, batch_size: int,
                 limit: int | None = None, controls: Controls | None = None) -> list[tuple[torch.Tensor, ...]]:
    """`eval_windows` in batches; with `limit`, an evenly spread subset of that many windows."""
    return batches(eval_windows(pieces, seq_len, config, controls), batch_size, limit)
