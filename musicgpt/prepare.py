"""`musicgpt prepare DATA_DIR --out STORE`: encode a folder into a token store (`musicgpt.store`).

Files are encoded in batches by `data.encode_files` (its worker pool, per-file cache, limits and
warning), so memory holds one batch of tokens at a time. Each batch is committed: its tokens
appended to the open shard and fsynced, its index records and paths appended and fsynced, then
the manifest rewritten atomically with the new counts. A killed run leaves at most one batch
past the counts; the next run cuts it off and goes on with the files the store lacks, so
resuming and growing (a folder with new files) are one operation. Files are known by their path
relative to the data folder: a known file is never encoded again, even if it changed. Bad files
are skipped with their reason (kept in the manifest's "skipped") and tried again on the next run,
where the token cache answers at once unless the file was repaired.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from musicgpt import data, store
from musicgpt.atomic import atomic_write, check_output_folder, remove_stale_temp_files
from musicgpt.errors import MusicGPTError
from musicgpt.tags import tag_pieces
from musicgpt.vocab import CodecConfig

SHARD_TOKENS = 2**24  # a shard is closed once it holds about this many tokens (32 MiB)
BATCH_FILES = 256  # files encoded and committed together
# Test hook: die (SIGKILL) while committing batch number K+1, after its tokens and index records
# are written but before the manifest counts them: what a killed `prepare` leaves behind.
KILL_ENV = "MUSICGPT_PREPARE_KILL_AFTER"


@dataclass
class PrepareResult:
    """What one `prepare_store` run did, and the store it left."""

    store: Path
    added: int = 0
    added_tokens: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    pieces: int = 0
    tokens: int = 0
    shards: int = 0


def open_manifest(out: Path, data_dir: Path, config: CodecConfig | None, shard_tokens: int) -> dict:
    """The store's manifest, a new one for a new store; its codec must be `config` when given."""
    if store.is_store(out):
        manifest = store.read_manifest(out)
        if config is not None and CodecConfig.from_dict(manifest["codec_config"]) != config:
            raise MusicGPTError(f"{out}: the store was encoded with codec {manifest['codec_config']}, "
                                f"not {config.to_dict()}")
        return manifest
    if out.exists() and any(p.name not in (store.SHARDS, store.INDEX, store.PATHS) and not p.name.startswith(".")
                                for p in out.iterdir()):
        raise MusicGPTError(f"{out}: exists and is not a token store; name a new folder or a store")
    return {"format": store.FORMAT, "codec_config": (config or CodecConfig()).to_dict(),
            "shard_tokens": shard_tokens, "shards": [], "pieces": 0, "paths_bytes": 0, "tags": [],
            "skipped": {}, "data_dir": str(data_dir)}


def cut_uncommitted(out: Path, manifest: dict) -> None:
    """Truncate the shards, index and paths to what the manifest counts; drop uncounted shards."""
    (out / store.SHARDS).mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    committed = manifest["shards"]
    for p in (out / store.SHARDS).glob("*.bin"):
        number = int(p.stem) if p.stem.isdigit() else -1
        if not 0 <= number < len(committed):
            p.unlink()
    sizes = [(store.shard_path(out, k), n * store.TOKEN_DTYPE.itemsize) for k, n in enumerate(committed)]
    sizes += [(out / store.INDEX, manifest["pieces"] * store.INDEX_DTYPE.itemsize),
              (out / store.PATHS, manifest["paths_bytes"])]
    for path, size in sizes:
        with open(path, "ab") as f:  # made if missing (a store killed before its first commit)
            if os.fstat(f.fileno()).st_size < size:
                raise MusicGPTError(f"{path}: shorter than the manifest says; the store is damaged")
            f.truncate(size)


def relative_name(path: Path, root: Path) -> str | None:
    """`path` relative to the data folder as stored in paths.txt, or None if it cannot be one line."""
    name = Path(os.path.relpath(path, root)).as_posix()
    return None if "\n" in name or "\r" in name else name


def append(path: Path, payload: bytes) -> None:
    """Append `payload` to `path` and make it durable before the manifest may count it."""
    with open(path, "ab") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


class StoreWriter:
    """Appends encoded batches to a store and commits each one (see the module docstring)."""

    def __init__(self, out: Path, manifest: dict):
        self.out, self.manifest = out, manifest
        self.batches = 0
        kill = os.environ.get(KILL_ENV)
        self.kill_after = int(kill) if kill else None

    def add(self, pieces: list[data.Piece], names: list[str]) -> None:
        """Append these pieces (with their relative names) and commit them."""
        m = self.manifest
        rows = np.zeros(len(pieces), dtype=store.INDEX_DTYPE)
        chunks: dict[int, list[bytes]] = {}
        for row, piece in zip(rows, pieces):
            if not m["shards"] or (m["shards"][-1] and m["shards"][-1] + len(piece.tokens) > m["shard_tokens"]):
                m["shards"].append(0)  # the open shard is full: start the next
            shard = len(m["shards"]) - 1
            row["shard"], row["offset"], row["length"] = shard, m["shards"][shard], len(piece.tokens)
            row["tag"], row["name_hash"] = self.tag_code(piece.tag), data.name_digest(piece.path)
            chunks.setdefault(shard, []).append(piece.tokens.astype(store.TOKEN_DTYPE).tobytes())
            m["shards"][shard] += len(piece.tokens)
        for shard, parts in chunks.items():
            append(store.shard_path(self.out, shard), b"".join(parts))
        append(self.out / store.INDEX, rows.tobytes())
        lines = "".join(f"{name}\n" for name in names).encode("utf-8", "surrogateescape")
        append(self.out / store.PATHS, lines)
        if self.kill_after is not None and self.batches == self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        m["pieces"] += len(pieces)
        m["paths_bytes"] += len(lines)
        self.commit()

    def tag_code(self, tag: str | None) -> int:
        """The index of `tag` in the manifest's tag list (added if new), -1 for none."""
        if tag is None:
            return -1
        if tag not in self.manifest["tags"]:
            self.manifest["tags"].append(tag)
        return self.manifest["tags"].index(tag)

    def commit(self) -> None:
        """Rewrite the manifest: what it counts is the store."""
        with atomic_write(self.out / store.MANIFEST, "w") as f:
            json.dump(self.manifest, f, indent=1)
        self.batches += 1


def known_names(out: Path, manifest: dict) -> set[str]:
    """The relative paths of the pieces already in the store."""
    if not manifest["pieces"]:
        return set()
    with open(out / store.PATHS, "rb") as f:
        return set(f.read(manifest["paths_bytes"]).decode("utf-8", "surrogateescape").splitlines())


def prepare_store(data_dir: str | os.PathLike, out: str | os.PathLike, *, config: CodecConfig | None = None,
                  workers: int | None = None, progress: bool = True, use_cache: bool = True,
                  batch_files: int = BATCH_FILES, shard_tokens: int = SHARD_TOKENS) -> PrepareResult:
    """Encode the MIDI files under `data_dir` that the store at `out` lacks and add them to it
    (making it if needed); a killed run resumes from its last committed batch."""
    root, out = Path(data_dir), check_output_folder(out)
    files = data.find_midi_files(root)
    manifest = open_manifest(out, root, config, shard_tokens)
    config = CodecConfig.from_dict(manifest["codec_config"])
    cut_uncommitted(out, manifest)
    writer, result = StoreWriter(out, manifest), PrepareResult(out)
    known = known_names(out, manifest)
    todo = [f for f in files if relative_name(f, root) not in known]
    bar = tqdm(total=len(todo), desc="preparing", unit="file", disable=not progress)
    for first in range(0, len(todo), batch_files):
        batch = todo[first:first + batch_files]
        named = [f for f in batch if relative_name(f, root) is not None]
        result.skipped += [(f, "its name holds a line break") for f in batch if relative_name(f, root) is None]
        corpus = data.encode_files(named, config, use_cache=use_cache, workers=workers, progress=False)
        tag_pieces(corpus.pieces, root)
        for path, why in corpus.skipped:
            manifest["skipped"][relative_name(path, root)] = why
        for piece in corpus.pieces:
            manifest["skipped"].pop(relative_name(piece.path, root), None)
        writer.add(corpus.pieces, [relative_name(p.path, root) for p in corpus.pieces])
        result.skipped += corpus.skipped
        result.added += len(corpus.pieces)
        result.added_tokens += corpus.num_tokens
        bar.update(len(batch))
        bar.set_postfix(pieces=manifest["pieces"], tokens=f"{sum(manifest['shards']):,}")
    bar.close()
    if not manifest["pieces"]:
        raise MusicGPTError(f"{root}: none of the MIDI files could be read")
    if not todo:
        writer.commit()  # a store whose first run was killed before any batch still gets its manifest
    result.pieces, result.tokens, result.shards = manifest["pieces"], sum(manifest["shards"]), len(manifest["shards"])
    return result
