"""The dataset pipeline: find MIDI files, encode them in parallel with a cache, split, and window.

Encoded pieces are cached as `.npy` token arrays keyed by the file's bytes and the codec
configuration, so a second run reads the cache instead of re-encoding and a changed file (or a
changed codec) is encoded afresh. Bad files are skipped and listed in one warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from musicgpt import codec
from musicgpt.atomic import atomic_write
from musicgpt.errors import MidiReadError, MusicGPTError
from musicgpt.vocab import CodecConfig

MIDI_SUFFIXES = (".mid", ".midi")
IGNORE_INDEX = -100  # targets with this value (padding) do not count in the loss


def find_midi_files(folder: str | os.PathLike) -> list[Path]:
    """All .mid/.midi files under `folder`, recursively, in a stable sorted order."""
    root = Path(folder)
    if not root.is_dir():
        raise MusicGPTError(f"{root}: not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES and p.is_file())
    if not files:
        raise MusicGPTError(f"{root}: no .mid or .midi files found")
    return files


def default_cache_dir() -> Path:
    """Where token arrays are cached: $MUSICGPT_CACHE, else ~/.cache/musicgpt/tokens."""
    env = os.environ.get("MUSICGPT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "musicgpt" / "tokens"


@dataclass
class Piece:
    """One encoded MIDI file."""

    path: Path
    tokens: np.ndarray  # int16 token ids, without EOS


@dataclass
class Corpus:
    """The encoded pieces of a folder, plus the files that were skipped and why."""

    pieces: list[Piece]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    config: CodecConfig = field(default_factory=CodecConfig)

    @property
    def num_tokens(self) -> int:
        return int(sum(len(p.tokens) for p in self.pieces))


def _cache_key(data: bytes, config: CodecConfig) -> str:
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    h.update(data)
    return h.hexdigest()[:32]


def _encode_file(job: tuple[Path, Path | None, CodecConfig]) -> tuple[np.ndarray | None, str | None]:
    """Encode one file, reading and filling the cache; returns (tokens, None) or (None, problem)."""
    path, cache, config = job
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, f"cannot read ({e.strerror or e})"
    key = _cache_key(data, config)
    if cache is not None:
        hit = _read_cache(cache, key)
        if hit is not None:
            return hit
    try:
        tokens, problem = codec.encode(path, config).astype(np.int16), None
    except MidiReadError as e:
        tokens, problem = None, str(e).removeprefix(f"{path}: ")
    except Exception as e:  # a reader crashing on a malformed file must not abort the batch
        tokens, problem = None, f"unreadable ({e.__class__.__name__}: {e})"
    if cache is not None:
        _write_cache(cache, key, tokens, problem)
    return tokens, problem


def _read_cache(cache: Path, key: str) -> tuple[np.ndarray | None, str | None] | None:
    npy, err = cache / f"{key}.npy", cache / f"{key}.err"
    try:
        if npy.exists():
            return np.load(npy, allow_pickle=False), None
        if err.exists():
            return None, err.read_text()
    except (OSError, ValueError):
        pass  # a damaged cache entry is simply re-encoded
    return None


def _write_cache(cache: Path, key: str, tokens: np.ndarray | None, problem: str | None) -> None:
    try:
        if tokens is not None:
            with atomic_write(cache / f"{key}.npy") as f:
                np.save(f, tokens, allow_pickle=False)
        else:
            with atomic_write(cache / f"{key}.err", "w") as f:
                f.write(problem or "unreadable")
    except OSError:
        pass  # caching is an optimisation; a read-only cache folder must not stop training


def encode_files(
    files: list[Path],
    config: CodecConfig | None = None,
    *,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    workers: int | None = None,
    progress: bool = True,
) -> Corpus:
    """Encode `files` in parallel (cached); unreadable files are skipped and listed in one warning."""
    config = config or CodecConfig()
    cache = (cache_dir or default_cache_dir()) if use_cache else None
    jobs = [(Path(f), cache, config) for f in files]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    bar = tqdm(total=len(jobs), desc="encoding MIDI", unit="file", disable=not progress, leave=False)
    results: list[tuple[np.ndarray | None, str | None]] = []
    if workers <= 1 or len(jobs) < 8:
        for job in jobs:
            results.append(_encode_file(job))
            bar.update()
    else:
        with ProcessPoolExecutor(workers) as pool:
            for res in pool.map(_encode_file, jobs, chunksize=4):
                results.append(res)
                bar.update()
    bar.close()
    corpus = Corpus(pieces=[], config=config)
    for (path, _, _), (tokens, problem) in zip(jobs, results):
        if tokens is None or len(tokens) == 0:
            corpus.skipped.append((path, problem or "no notes"))
        else:
            corpus.pieces.append(Piece(path, tokens))
    if corpus.skipped:
        listing = "; ".join(f"{p}: {why}" for p, why in corpus.skipped)
        print(f"musicgpt: warning: skipped {len(corpus.skipped)} bad file(s): {listing}", file=sys.stderr)
    return corpus


def encode_folder(folder: str | os.PathLike, config: CodecConfig | None = None, **kwargs) -> Corpus:
    """Find and encode every MIDI file under `folder`; see `encode_files` for the options."""
    corpus = encode_files(find_midi_files(folder), config, **kwargs)
    if not corpus.pieces:
        raise MusicGPTError(f"{folder}: none of the MIDI files could be read")
    return corpus


def split_files(pieces: list[Piece], val_fraction: float = 0.1) -> tuple[list[Piece], list[Piece]]:
    """Split by whole file, deterministically: files ordered by a hash of their name go to validation.

    Hashing the file name (not its position in the list) keeps a file on the same side of the
    split when other files are added or removed. With two or more files at least one validates.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise MusicGPTError(f"validation fraction must be in [0, 1), got {val_fraction}")
    order = sorted(pieces, key=lambda p: hashlib.sha1(p.path.name.encode()).hexdigest())
    n_val = round(len(pieces) * val_fraction)
    if val_fraction > 0 and len(pieces) >= 2:
        n_val = max(1, n_val)
    val = set(id(p) for p in order[:n_val])
    return [p for p in pieces if id(p) not in val], [p for p in pieces if id(p) in val]


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


class TokenWindowDataset(torch.utils.data.Dataset):
    """Random windows of seq_len + 1 tokens; item `i` is a pure function of (seed, i).

    Each piece is framed as EOS + tokens + EOS. A piece is drawn with probability proportional
    to its length, then a window start uniformly; windows that run off the end are padded and
    their padded targets set to IGNORE_INDEX. Being index-deterministic makes resumed and
    distributed training reproducible without saving any loader state.
    """

    def __init__(
        self,
        pieces: list[Piece],
        seq_len: int,
        config: CodecConfig,
        *,
        augment: Augment | None = None,
        seed: int = 0,
    ):
        if not pieces:
            raise MusicGPTError("no pieces to train on")
        eos = np.array([config.eos_id], dtype=np.int16)
        self.pieces = [np.concatenate([eos, p.tokens.astype(np.int16), eos]) for p in pieces]
        lengths = np.array([len(p) for p in self.pieces], dtype=np.float64)
        self.weights = lengths / lengths.sum()
        self.seq_len, self.config, self.augment, self.seed = seq_len, config, augment, seed
        self.num_tokens = int(lengths.sum())

    def __len__(self) -> int:
        return max(1, self.num_tokens // self.seq_len)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        piece = self.pieces[rng.choice(len(self.pieces), p=self.weights)]
        need = self.seq_len + 1
        # Take a little extra so a compressing time stretch still fills the window.
        take = need + need // 8 if self.augment else need
        start = int(rng.integers(0, max(1, len(piece) - need + 1)))
        window = piece[start : start + take]
        if self.augment:
            window = self.augment(window, rng, self.config)
        return window_to_example(window[:need], need, self.config.pad_id)


def window_to_example(window: np.ndarray, need: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a window to `need` tokens and split it into (inputs, targets) with padding ignored."""
    buf = np.full(need, pad_id, dtype=np.int64)
    buf[: len(window)] = window
    x = torch.from_numpy(buf[:-1].copy())
    y = torch.from_numpy(buf[1:].copy())
    y[len(window) - 1 :] = IGNORE_INDEX
    return x, y


def eval_windows(pieces: list[Piece], seq_len: int, config: CodecConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows covering every validation piece once (no augmentation)."""
    eos = np.array([config.eos_id], dtype=np.int16)
    out = []
    for p in pieces:
        framed = np.concatenate([eos, p.tokens.astype(np.int16), eos])
        for start in range(0, len(framed) - 1, seq_len):
            out.append(window_to_example(framed[start : start + seq_len + 1], seq_len + 1, config.pad_id))
    return out


def collate(examples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (inputs, targets) pairs into a batch."""
    xs, ys = zip(*examples)
    return torch.stack(xs), torch.stack(ys)


def eval_batches(pieces: list[Piece], seq_len: int, config: CodecConfig, batch_size: int,
                 limit: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`eval_windows` in batches; with `limit`, an evenly spread subset of that many windows."""
    windows = eval_windows(pieces, seq_len, config)
    if limit is not None and len(windows) > limit:
        windows = [windows[i * len(windows) // limit] for i in range(limit)]
    return [collate(windows[i:i + batch_size]) for i in range(0, len(windows), batch_size)]
