"""Atomic file writes for every file musicgpt writes: a reader sees the old file or the whole
new one, never half of one, and a symlink planted in a shared folder cannot redirect the write.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from musicgpt.errors import MusicGPTError

# Temp files are `.NAME.PID.RANDOM.tmp`: the random part (mkstemp's) makes the name impossible
# to plant a symlink at in advance; the pid lets `remove_stale_temp_files` tell a dead writer's
# leftovers from a live writer's file. Both are defined here so that they cannot drift apart.
_TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


def _temp_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}."


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere the only way is to set it and put it back (briefly visible to other threads).
    old = os.umask(0o077)
    os.umask(old)
    return old


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Yield a file to write `path`'s new contents to; on leaving, it replaces `path` whole.

    The temp file is created exclusively (never through a symlink) in `path`'s folder, which is
    made if missing, under an unpredictable name. It gets the usual `0o666 & ~umask`
    permissions and is fsynced before `os.replace`. If the block raises, the temp file is
    removed and `path` is left as it was. Write to the yielded file only: reopening the temp
    file by name would undo the protection. `mode` is "wb" (binary) or "w" (UTF-8 text).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = check_output_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name), suffix=_TEMP_SUFFIX)
    except OSError as e:
        raise MusicGPTError(f"{path}: cannot write here ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~current_umask())  # mkstemp makes 0600 files
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_file(path: str | os.PathLike) -> Path:
    """`path` as a file musicgpt may write, or a one-line error: not a folder, and its nearest
    existing ancestor a folder this process can write in (missing folders are made later)."""
    path = Path(path)
    if path.is_dir():
        raise MusicGPTError(f"{path}: is a folder; name a file to write")
    _check_writable_ancestor(path.parent, path)
    return path


def check_output_folder(path: str | os.PathLike) -> Path:
    """`path` as a folder musicgpt may write files in, or a one-line error (it need not exist)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MusicGPTError(f"{path}: exists and is not a folder")
    _check_writable_ancestor(path, path)
    return path


def _check_writable_ancestor(folder: Path, target: Path) -> None:
    ancestor = folder
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MusicGPTError(f"{target}: cannot be written, {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise MusicGPTError(f"{target}: cannot be written, no permission to write in {ancestor}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or a number we cannot judge: leave its file alone
    return True


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files that killed `atomic_write` callers left in `folder`; return them.

    A file whose writer is still running is kept. Temp names never pass for real files (they
    start with a dot and end in `.tmp`), but a killed run would otherwise leave one behind at
    every kill, as large as a checkpoint.
    """
    removed = []
    for p in Path(folder).glob(f".*{_TEMP_SUFFIX}"):
        m = _TEMP_NAME.match(p.name)
        if m and not p.is_symlink() and p.is_file() and not _process_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
