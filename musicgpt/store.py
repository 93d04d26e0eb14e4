"""A token store: a corpus encoded once (`musicgpt prepare`) and read through memory maps.

`musicgpt train STORE` draws its windows from the store's shards instead of holding every
piece in each process: the pages are the operating system's, shared by every rank on a node.
A store is a folder:

    STORE/store.json      the manifest; only what it counts is committed (written atomically)
    STORE/shards/NNNNN.bin raw little-endian int16 token ids, pieces back to back, no EOS
    STORE/index.bin       one INDEX_DTYPE record per piece, in the order pieces were added
    STORE/paths.txt       one source path per line (UTF-8, undecodable bytes kept as such),
                          relative to the data folder, line k for index record k

The manifest is `{"format": "musicgpt-store-v1", "codec_config": {...}, "shard_tokens": N,
"shards": [committed tokens per shard], "pieces": P, "paths_bytes": B, "tags": [...],
"skipped": {path: why}, "data_dir": ...}`. An index record holds the piece's shard, its offset
and length in tokens within the shard, its tag (an index into "tags", -1 for none) and the
sha1 digest of its file name, which decides its side of the training/validation split for any
validation fraction exactly as `musicgpt.data.held_out` decides it for a folder. Bytes past
the counts the manifest gives (a killed `prepare`'s last batch) are not part of the store;
`musicgpt.prepare` cuts them off before it adds more.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np

from musicgpt import data
from musicgpt.errors import MusicGPTError
from musicgpt.vocab import CodecConfig

FORMAT = "musicgpt-store-v1"
MANIFEST = "store.json"
INDEX = "index.bin"
PATHS = "paths.txt"
SHARDS = "shards"
INDEX_DTYPE = np.dtype([("shard", "<i4"), ("offset", "<i8"), ("length", "<i4"), ("tag", "<i2"),
                        ("name_hash", "S20")])
TOKEN_DTYPE = np.dtype("<i2")


def is_store(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder holding a store manifest."""
    return (Path(path) / MANIFEST).is_file()


def shard_path(root: Path, number: int) -> Path:
    """The file of shard `number`."""
    return root / SHARDS / f"{number:05d}.bin"


def read_manifest(root: Path) -> dict:
    """The manifest of the store at `root`, or a one-line error if it is not a store of this format."""
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MusicGPTError(f"{root}: not a token store ({MANIFEST}: {getattr(e, 'strerror', None) or e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MusicGPTError(f"{root}: not a token store of format {FORMAT}")
    return manifest


class TokenStore:
    """A prepared store, read through memory maps opened on first use in each process."""

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)
        self.manifest = read_manifest(self.root)
        self.codec_config = CodecConfig.from_dict(self.manifest["codec_config"])
        self.tag_names = tuple(self.manifest.get("tags", ()))
        count = int(self.manifest["pieces"])
        self.index = (np.memmap(self.root / INDEX, dtype=INDEX_DTYPE, mode="r", shape=(count,)) if count
                      else np.zeros(0, INDEX_DTYPE))
        self._shards: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:
        # A DataLoader worker started by spawn maps the shards itself rather than receive copies.
        return {**self.__dict__, "_shards": {}}

    @property
    def num_tokens(self) -> int:
        return int(sum(self.manifest["shards"]))

    def shard(self, number: int) -> np.memmap:
        """Shard `number`'s committed tokens, mapped once per process."""
        if number not in self._shards:
            size = int(self.manifest["shards"][number])
            self._shards[number] = np.memmap(shard_path(self.root, number), dtype=TOKEN_DTYPE, mode="r",
                                             shape=(size,))
        return self._shards[number]

    def tokens(self, k: int) -> np.ndarray:
        """Piece `k`'s tokens (without EOS), a view of its shard."""
        row = self.index[k]
        return self.shard(int(row["shard"]))[int(row["offset"]):int(row["offset"]) + int(row["length"])]

    @cached_property
    def paths(self) -> list[str]:
        """Every piece's source path, relative to the data folder it was prepared from."""
        with open(self.root / PATHS, "rb") as f:
            text = f.read(int(self.manifest["paths_bytes"]))
        return text.decode("utf-8", "surrogateescape").splitlines()

    def split(self, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """(training, validation) piece numbers, in store order, as `data.split_files` splits the folder."""
        held = np.zeros(len(self), dtype=bool)
        held[data.held_out_digests(self.index["name_hash"], val_fraction)] = True
        return np.flatnonzero(~held), np.flatnonzero(held)

    def pieces(self, numbers: np.ndarray) -> list[data.Piece]:
        """`Piece`s for the given piece numbers; their tokens stay views of the shards (no copy)."""
        tags = self.index["tag"]
        return [data.Piece(Path(self.paths[k]), self.tokens(k), self.tag_names[tags[k]] if tags[k] >= 0 else None)
                for k in map(int, numbers)]

    def source(self, numbers: np.ndarray) -> StorePieces:
        """The pieces `numbers` as a `windows.PieceSource` for `TokenWindowDataset`."""
        return StorePieces(self, np.asarray(numbers, dtype=np.int64))


class StorePieces:
    """Some of a store's pieces as a `windows.PieceSource`: windows are cut from the memory-mapped
    shards, so a process holds the index's few columns, never the tokens."""

    def __init__(self, store: TokenStore, numbers: np.ndarray):
        rows = store.index[numbers]
        self.store, self.shards, self.offsets = store, rows["shard"].copy(), rows["offset"].copy()
        self.lengths = rows["length"].astype(np.int64)
        self.tag_names = store.tag_names
        self.tag_codes = rows["tag"].astype(np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def framed_slice(self, k: int, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of EOS + piece `k` + EOS, reading only those from the shard."""
        length, eos = int(self.lengths[k]), self.store.codec_config.eos_id
        start, stop = min(start, length + 2), min(stop, length + 2)
        out = np.empty(max(0, stop - start), dtype=np.int16)
        lo, hi = max(start, 1), min(stop, length + 1)  # the part inside the piece's tokens
        if hi > lo:
            first = int(self.offsets[k]) + lo - 1
            out[lo - start:hi - start] = self.store.shard(int(self.shards[k]))[first:first + hi - lo]
        if start == 0 and stop > 0:
            out[0] = eos
        if stop == length + 2 and start < stop:
            out[-1] = eos
        return out
