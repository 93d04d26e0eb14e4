#!/usr/bin/env python
"""Print file count, notes, duration and size of a MIDI folder, per collection and in total.

A collection is the folder a file sits in, relative to DIR (e.g. ``scores/music21/bach``).

    python scripts/corpus_stats.py midi_data/
    python scripts/corpus_stats.py midi_data/ --markdown    # table for a README
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import symusic

MIDI_SUFFIXES = {".mid", ".midi"}


@dataclass
class Stats:
    """Totals over a set of MIDI files."""

    files: int = 0
    notes: int = 0
    seconds: float = 0.0
    bytes: int = 0

    def add(self, other: Stats) -> None:
        self.files += other.files
        self.notes += other.notes
        self.seconds += other.seconds
        self.bytes += other.bytes


def file_stats(path: Path) -> Stats:
    """Notes of all non-drum tracks and the end time in seconds of one MIDI file."""
    score = symusic.Score(str(path), ttype="second")
    notes = sum(len(track.notes) for track in score.tracks if not track.is_drum)
    return Stats(1, notes, float(score.end()), path.stat().st_size)


def collect(root: Path) -> tuple[dict[str, Stats], list[str]]:
    """Stats per collection under ``root`` and a list of files that could not be read."""
    per_collection: dict[str, Stats] = defaultdict(Stats)
    unreadable = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES):
        try:
            stats = file_stats(path)
        except Exception as exc:  # report every bad file rather than stop at the first
            unreadable.append(f"{path}: {exc}")
            continue
        per_collection[path.parent.relative_to(root).as_posix()].add(stats)
    return dict(sorted(per_collection.items())), unreadable


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60}h {minutes % 60:02d}m"


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def format_table(per_collection: dict[str, Stats], markdown: bool = False) -> str:
    """The stats as aligned text, or as a Markdown table, with a total row."""
    total = Stats()
    for stats in per_collection.values():
        total.add(stats)
    rows = [("collection", "files", "notes", "duration", "size")]
    for name, s in [*per_collection.items(), ("total", total)]:
        rows.append((name, f"{s.files:,}", f"{s.notes:,}", _duration(s.seconds), _size(s.bytes)))
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in rows]
        lines.insert(1, "|---|" + "---:|" * (len(rows[0]) - 1))
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="folder of MIDI files, searched recursively")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        print(f"corpus_stats: error: {args.dir}: not a folder", file=sys.stderr)
        return 1
    per_collection, unreadable = collect(args.dir)
    print(format_table(per_collection, args.markdown))
    for line in unreadable:
        print(f"warning: unreadable {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
