"""Style tags from a data folder's layout: one tag per top-level subfolder, or as a tags file says.

    midi_data/classical/chopin/op10.mid   -> classical
    midi_data/pop/song.mid                -> pop
    midi_data/loose.mid                   -> no tag

A file `tags.txt` in the data folder overrides this. Each line is `PATTERN TAG`: a glob matched
against the file's path relative to the data folder (`*` does not cross `/`, `**` does), and a
tag name, or `-` for no tag. The first matching line wins; files no line matches keep their
folder's tag. Blank lines and lines starting with `#` are ignored:

    # midi_data/tags.txt: Bach's chorales and the folk tunes get their own tags
    scores/music21/bach/bwv846.mid  scores
    scores/music21/bach/**          chorale
    scores/music21/essenFolksong/** folk
    scratch/**                      -
"""

from __future__ import annotations

import os
import re
from fnmatch import translate
from pathlib import Path

from musicgpt.controls import TAG_NAME
from musicgpt.errors import MusicGPTError

TAGS_FILE = "tags.txt"


def folder_tag(relative: Path) -> str | None:
    """The tag of a file at `relative` (to the data folder): its top-level folder's name, made a
    valid tag name (other characters become '-'), or None for a file at the top."""
    if len(relative.parts) < 2:
        return None
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "-", relative.parts[0]).strip("-._+")[:64]
    return name if name and TAG_NAME.match(name) else None


def read_tags_file(path: Path) -> list[tuple[re.Pattern, str | None]]:
    """The (pattern, tag) rules of a tags file; a one-line error names a bad line."""
    rules = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not (parts[1] == "-" or TAG_NAME.match(parts[1])):
            raise MusicGPTError(f"{path}:{number}: expected 'PATTERN TAG' with a tag of letters, digits "
                                f"and _.+- (or '-' for none), got {line[:60]!r}")
        rules.append((glob_pattern(parts[0]), None if parts[1] == "-" else parts[1]))
    return rules


def glob_pattern(glob: str) -> re.Pattern:
    """A regular expression for a path glob in which `*` stays within one folder and `**` does not."""
    parts = [translate(piece)[4:-3].replace(".*", "[^/]*") for piece in glob.split("**")]
    return re.compile("^" + ".*".join(parts) + "$")


def tag_pieces(pieces: list, folder: str | os.PathLike) -> None:
    """Set each piece's `tag` from the folder layout and the folder's tags file, if any."""
    root = Path(folder)
    tags_file = root / TAGS_FILE
    rules = read_tags_file(tags_file) if tags_file.is_file() else []
    for piece in pieces:
        relative = Path(os.path.relpath(piece.path, root))
        piece.tag = folder_tag(relative)
        for pattern, tag in rules:
            if pattern.match(relative.as_posix()):
                piece.tag = tag
                break
