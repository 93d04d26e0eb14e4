"""The dataset pipeline: find MIDI files, encode them in parallel with a cache, tag and split them.

`musicgpt.windows` then cuts the pieces into training and evaluation windows.

Encoded pieces are cached as `.npy` token arrays keyed by the file's bytes and the codec
configuration, so a second run reads the cache instead of re-encoding and a changed file (or a
changed codec) is encoded afresh. Bad files are skipped and listed in one warning: files that
are not regular files or are too large are never opened, and a file whose encoding overruns the
time budget has its worker process killed, so no single file can stall a batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import signal
import stat
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np
from tqdm import tqdm

from musicgpt import codec, midi_io
from musicgpt.atomic import atomic_write
from musicgpt.errors import MidiReadError, MusicGPTError
from musicgpt.vocab import CodecConfig

MIDI_SUFFIXES = (".mid", ".midi")
IGNORE_INDEX = -100  # targets with this value (padding) do not count in the loss
MAX_FILE_BYTES = midi_io.MAX_FILE_BYTES  # what the reader accepts: larger files are skipped unread
# Seconds one file may take to encode before its worker is killed and the file skipped. Far
# above what any real piece needs, so only a pathological file (or a bug in the reader) hits it.
MAX_ENCODE_SECONDS = 60.0

Outcome = tuple[np.ndarray | None, str | None]  # (tokens, None) or (None, why the file was skipped)
Encoder = Callable[[Path, CodecConfig], np.ndarray]


def find_midi_files(folder: str | os.PathLike) -> list[Path]:
    """All .mid/.midi files under `folder`, recursively, in a stable sorted order.

    Entries that are not regular files (a FIFO, a device, a broken link) are listed too, for
    `encode_files` to skip with a reason; linked folders are not followed, so a link loop cannot
    make the walk endless.
    """
    root = Path(folder)
    if not root.is_dir():
        raise MusicGPTError(f"{root}: not a folder")
    files = sorted(Path(top, name) for top, _, names in os.walk(root)
                   for name in names if Path(name).suffix.lower() in MIDI_SUFFIXES)
    if not files:
        raise MusicGPTError(f"{root}: no .mid or .midi files found")
    return files


def file_problem(path: str | os.PathLike, max_bytes: int | None = MAX_FILE_BYTES) -> str | None:
    """Why `path` must not be read (not a regular file, larger than `max_bytes`), or None; never opens it."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"cannot read ({e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                 (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))
        kind = next((name for test, name in kinds if test(st.st_mode)), "special")
        return f"not a regular file ({kind})"
    if max_bytes is not None and st.st_size > max_bytes:
        return f"larger than {max_bytes / 2**20:g} MB"
    return None


def printable(text: str) -> str:
    """`text` with undecodable file-name bytes written as \\xNN escapes, so that it prints in any encoding."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file-name byte stands for
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def name_bytes(name: str) -> bytes:
    """A file name's bytes: UTF-8 for a decodable name, the original bytes for an undecodable one."""
    try:
        return name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogatepass")


def default_cache_dir() -> Path:
    """Where token arrays are cached: $MUSICGPT_CACHE, else ~/.cache/musicgpt/tokens."""
    env = os.environ.get("MUSICGPT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "musicgpt" / "tokens"


@dataclass
class Piece:
    """One encoded MIDI file, and its style tag if the folder layout (or tags file) gives one."""

    path: Path
    tokens: np.ndarray  # int16 token ids, without EOS
    tag: str | None = None


@dataclass
class Corpus:
    """The encoded pieces of a folder, plus the files that were skipped and why."""

    pieces: list[Piece]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    config: CodecConfig = field(default_factory=CodecConfig)

    @property
    def num_tokens(self) -> int:
        return int(sum(len(p.tokens) for p in self.pieces))

    @property
    def tags(self) -> tuple[str, ...]:
        """The pieces' distinct tags, sorted."""
        return tuple(sorted({p.tag for p in self.pieces if p.tag is not None}))


def _cache_key(data: bytes, config: CodecConfig) -> str:
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    h.update(data)
    return h.hexdigest()[:32]


def encode_one(path: Path, config: CodecConfig, encoder: Encoder | None = None) -> Outcome:
    """Encode one file with `encoder` (default `codec.encode`): (int16 tokens, None), or (None, why not)."""
    try:
        return (encoder or codec.encode)(path, config).astype(np.int16), None
    except MidiReadError as e:
        return None, str(e).removeprefix(f"{path}: ")
    except Exception as e:  # a reader crashing on a malformed file must not abort the batch
        return None, f"unreadable ({e.__class__.__name__}: {e})"


def _look_up(path: Path, cache: Path | None, config: CodecConfig,
             max_bytes: int | None) -> tuple[Outcome | None, str | None]:
    """(outcome, cache key): the outcome when the file is refused or cached, else None (encode it)."""
    problem = file_problem(path, max_bytes)
    if problem or cache is None:
        return ((None, problem) if problem else None), None
    try:
        with open(path, "rb") as f:  # read no more than the limit, even if the file grew since stat
            data = f.read(max_bytes + 1) if max_bytes is not None else f.read()
    except OSError as e:
        return (None, f"cannot read ({e.strerror or e})"), None
    if max_bytes is not None and len(data) > max_bytes:
        return (None, f"larger than {max_bytes / 2**20:g} MB"), None
    key = _cache_key(data, config)
    return _read_cache(cache, key, config), key


def _read_cache(cache: Path, key: str, config: CodecConfig) -> Outcome | None:
    """The cached outcome for `key`, or None when there is none or it is damaged (then it is re-encoded)."""
    npy, err = cache / f"{key}.npy", cache / f"{key}.err"
    if os.path.lexists(npy):
        tokens = _load_tokens(npy, config)
        if tokens is not None:
            return tokens, None
        try:
            npy.unlink()  # so that a later .err entry is not shadowed by the damaged array
        except OSError:
            pass
        return None
    if os.path.lexists(err) and not file_problem(err, 4096):
        try:
            return None, err.read_text(encoding="utf-8")
        except (OSError, ValueError):
            pass
    return None


def _load_tokens(npy: Path, config: CodecConfig) -> np.ndarray | None:
    """A cached token array, or None if the entry is damaged; its header is checked against the
    file's size before anything is allocated, and its ids against the codec's vocabulary."""
    if file_problem(npy, None):
        return None
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(npy, "rb") as f:
            reader = readers.get(np.lib.format.read_magic(f))
            if reader is None:
                return None
            shape, _, dtype = reader(f)
            payload = os.fstat(f.fileno()).st_size - f.tell()
            if dtype.kind != "i" or dtype.itemsize != 2 or len(shape) != 1 or shape[0] * 2 != payload:
                return None
            tokens = np.frombuffer(f.read(payload), dtype=dtype).astype(np.int16)
    except (OSError, ValueError, TypeError):
        return None
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= config.pad_id):
        return None  # PAD, EOS and ids past the vocabulary never occur in an encoded piece
    return tokens


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


def _serve(conn, config: CodecConfig, encoder: Encoder | None) -> None:
    """A worker's loop: encode each path the parent sends until it sends None or hangs up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills us
    while True:
        try:
            path = conn.recv()
        except (EOFError, OSError):
            return
        if path is None:
            return
        conn.send(encode_one(path, config, encoder))


class _Worker:
    """One encoding process fed through a pipe, so that the parent can kill it when a file overruns."""

    def __init__(self, ctx, config: CodecConfig, encoder: Encoder | None):
        self.conn, theirs = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(theirs, config, encoder), daemon=True)
        self.process.start()
        theirs.close()
        self.job: int | None = None
        self.deadline = math.inf

    def start(self, job: int, path: Path, max_seconds: float | None) -> None:
        self.job = job
        self.deadline = time.monotonic() + max_seconds if max_seconds is not None else math.inf
        self.conn.send(path)

    def result(self, max_seconds: float | None) -> tuple[Outcome, bool] | None:
        """(outcome, whether it is the file's verdict) once the job ends or overruns; None while it runs."""
        if self.conn.poll():
            try:
                return self.conn.recv(), True
            except (EOFError, OSError):
                pass  # it died; say how below
        elif self.process.is_alive():
            if time.monotonic() < self.deadline:
                return None
            return (None, f"took longer than {max_seconds:g} s to encode"), False
        self.process.join(1)
        return (None, f"crashed the encoder (exit code {self.process.exitcode})"), False

    def stop(self, kill: bool = False) -> None:
        """End the process: asked to when idle, killed when `kill` or busy."""
        if not kill and self.job is None and self.process.is_alive():
            try:
                self.conn.send(None)
                self.process.join(1)
            except OSError:
                pass
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def _encode_in_pool(paths: list[Path], todo: list[int], config: CodecConfig, encoder: Encoder | None,
                    workers: int, max_seconds: float | None) -> Iterator[tuple[int, Outcome, bool]]:
    """Encode paths[i] for each i in `todo` in worker processes: yields (i, outcome, final).

    A worker still busy past its file's deadline, or one that died, is killed and replaced, and
    the file's outcome says why with final False: a faster machine might manage, so it is not cached.
    """
    ctx = multiprocessing.get_context()
    queue = deque(todo)
    pool = [_Worker(ctx, config, encoder) for _ in range(min(workers, len(todo)))]
    try:
        while queue or any(w.job is not None for w in pool):
            for w in pool:
                if w.job is None and queue:
                    i = queue.popleft()
                    w.start(i, paths[i], max_seconds)
            busy = [w for w in pool if w.job is not None]
            timeout = min(w.deadline for w in busy) - time.monotonic()
            wait([x for w in busy for x in (w.conn, w.process.sentinel)],
                 None if timeout == math.inf else max(0.0, timeout))
            for k, w in enumerate(pool):
                done = w.result(max_seconds) if w.job is not None else None
                if done is None:
                    continue
                yield w.job, done[0], done[1]
                w.job = None
                if not done[1]:
                    w.stop(kill=True)
                    pool[k] = _Worker(ctx, config, encoder)
    finally:
        for w in pool:
            w.stop()


def encode_files(
    files: list[Path],
    config: CodecConfig | None = None,
    *,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    workers: int | None = None,
    progress: bool = True,
    max_seconds: float | None = MAX_ENCODE_SECONDS,
    max_bytes: int | None = MAX_FILE_BYTES,
    encoder: Encoder | None = None,
) -> Corpus:
    """Encode `files` in worker processes (cached); bad files are skipped and listed in one warning.

    A file larger than `max_bytes` or taking longer than `max_seconds` is skipped; `workers=1`
    encodes in this process, where no time limit is kept. `encoder` stands in for `codec.encode`
    (tests pass one that hangs); it must be picklable and its results are cached as codec.encode's.
    """
    config = config or CodecConfig()
    cache = (cache_dir or default_cache_dir()) if use_cache else None
    paths = [Path(f) for f in files]
    bar = tqdm(total=len(paths), desc="encoding MIDI", unit="file", disable=not progress, leave=False)
    outcomes: list[Outcome | None] = []
    keys: list[str | None] = []
    for path in paths:
        outcome, key = _look_up(path, cache, config, max_bytes)
        outcomes.append(outcome)
        keys.append(key)
        bar.update(outcome is not None)
    todo = [i for i, outcome in enumerate(outcomes) if outcome is None]
    if workers == 1:
        done = ((i, encode_one(paths[i], config, encoder), True) for i in todo)
    else:
        done = _encode_in_pool(paths, todo, config, encoder, workers or os.cpu_count() or 1, max_seconds)
    with contextlib.closing(done):  # on Ctrl-C too, the workers are ended here, not when collected
        for i, outcome, final in done:
            outcomes[i] = outcome
            if keys[i] is not None and final:
                _write_cache(cache, keys[i], *outcome)
            bar.update()
    bar.close()
    return _gather(paths, outcomes, config)


def _gather(paths: list[Path], outcomes: list[Outcome], config: CodecConfig) -> Corpus:
    """The corpus of the files that gave tokens, and one warning listing the others."""
    corpus = Corpus(pieces=[], config=config)
    for path, (tokens, problem) in zip(paths, outcomes):
        if tokens is None or len(tokens) == 0:
            corpus.skipped.append((path, problem or "no notes"))
        else:
            corpus.pieces.append(Piece(path, tokens))
    if corpus.skipped:
        listing = "; ".join(f"{p}: {why}" for p, why in corpus.skipped)
        print(printable(f"musicgpt: warning: skipped {len(corpus.skipped)} bad file(s): {listing}"), file=sys.stderr)
    return corpus


def encode_folder(folder: str | os.PathLike, config: CodecConfig | None = None, **kwargs) -> Corpus:
    """Find, encode and tag every MIDI file under `folder` (`musicgpt.tags`); see `encode_files`
    for the options."""
    from musicgpt.tags import tag_pieces

    corpus = encode_files(find_midi_files(folder), config, **kwargs)
    if not corpus.pieces:
        raise MusicGPTError(f"{folder}: none of the MIDI files could be read")
    tag_pieces(corpus.pieces, folder)
    return corpus


def split_files(pieces: list[Piece], val_fraction: float = 0.1) -> tuple[list[Piece], list[Piece]]:
    """Split by whole file, deterministically: files ordered by a hash of their name go to validation.

    Hashing the file name (not its position in the list) keeps a file on the same side of the
    split when other files are added or removed. With two or more files at least one validates.
    """
    held = held_out([p.path for p in pieces], val_fraction)
    return [p for k, p in enumerate(pieces) if k not in held], [p for k, p in enumerate(pieces) if k in held]


def split_paths(paths: list[Path], val_fraction: float = 0.1) -> tuple[list[Path], list[Path]]:
    """`split_files` for file paths alone (no encoding): (training, validation), in the given order."""
    held = held_out(paths, val_fraction)
    return [p for k, p in enumerate(paths) if k not in held], [p for k, p in enumerate(paths) if k in held]


def name_digest(path: str | os.PathLike) -> bytes:
    """The sha1 digest of a file's name (not its folder): what decides its side of the split."""
    return hashlib.sha1(name_bytes(Path(path).name)).digest()


def held_out(paths: list[Path], val_fraction: float) -> set[int]:
    """Indices of the paths whose file names hash lowest: the validation share of `split_files`."""
    digests = np.array([name_digest(p) for p in paths], dtype="S20")
    return {int(k) for k in held_out_digests(digests, val_fraction)}


def held_out_digests(digests: np.ndarray, val_fraction: float) -> np.ndarray:
    """Positions of the lowest `round(n * val_fraction)` name digests (at least one of two or more).

    A stable sort of the raw digests orders them as their hex strings, ties in list order; a
    token store ranks its pieces' stored digests with this same function (`musicgpt.store`).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise MusicGPTError(f"validation fraction must be in [0, 1), got {val_fraction}")
    n_val = round(len(digests) * val_fraction)
    if val_fraction > 0 and len(digests) >= 2:
        n_val = max(1, n_val)
    return np.argsort(np.asarray(digests, dtype="S20"), kind="stable")[:n_val]
