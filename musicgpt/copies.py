"""Memorisation check (`musicgpt stats --copies`): the longest run of notes a sample shares with a reference file.

Onsets are rounded to the codec's 10 ms steps exactly as `codec.encode` rounds them, so runs are
counted in the model's own view of the music. Notes are put in one order, by onset step and then
by pitch (a chord bottom up), and each note after the first becomes a symbol: its pitch step and
its onset step from the note before (exact, however long the pause). Transposing a passage or
moving it by whole steps leaves its symbols unchanged; velocities and note lengths are ignored.
A run of L equal symbols in a row is a run of L + 1 notes with the same intervals and rhythm. A
copy moved by a fraction of a step can round differently at some notes, which splits the run.

The search is exact (no hashing): every window of L symbols, in the references and in the
samples, carries a class number, equal for equal windows. Going from L to L + 1 pairs each class
with the next symbol and renumbers the pairs with one `np.unique`; windows whose class no longer
occurs on the other side (in a file other than the sample itself) are dropped, since a longer
window cannot match if its prefix does not. The work at length L is the number of windows of
length L still shared, which falls fast after the first few notes; a long verbatim copy costs
one cheap step per note.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musicgpt.codec import grid_steps
from musicgpt.midi_io import Notes

PITCH_SPAN = 256  # a pitch step (-127..127) + 128 fits below this, so (onset step, pitch step) packs in one int64
NO_FILE = -1  # the owner of a sample that is not one of the reference files
MATCHED = ("runs of consecutive notes with the same pitch intervals (any transposition) and the same onset steps "
           "on the 10 ms grid (any time shift), notes ordered by onset then pitch; velocities and lengths ignored")


@dataclass(frozen=True)
class Run:
    """A run shared by a sample and a reference file: its length, the file and where it starts in each."""

    length: int  # symbols in `longest_runs`, notes in `longest_copies`
    reference: int | None  # index of the reference file; None when nothing is shared
    sample_at: int  # first shared item's index in the sample
    reference_at: int  # ... and in the reference file


@dataclass(frozen=True)
class _Side:
    """Sequences laid end to end: the symbols, and each position's file and the end of that file."""

    symbols: np.ndarray
    file_of: np.ndarray
    end_of: np.ndarray
    starts: np.ndarray  # where each file begins


def _side(arrays: Sequence[np.ndarray]) -> _Side:
    lens = np.array([len(a) for a in arrays], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    symbols = np.concatenate([np.asarray(a, dtype=np.int64) for a in arrays]) if len(arrays) else np.zeros(0, np.int64)
    return _Side(symbols, np.repeat(np.arange(len(arrays)), lens), np.repeat(starts[1:], lens), starts)


def onset_steps(notes: Notes) -> np.ndarray:
    """Each note's onset in 10 ms steps from the start of the file, rounded as the codec rounds it."""
    return grid_steps(notes.start)


def note_order(notes: Notes) -> np.ndarray:
    """The order runs are counted in: by onset step, then by pitch (stable for equal notes)."""
    return np.lexsort((notes.pitch, onset_steps(notes)))


def note_symbols(notes: Notes) -> np.ndarray:
    """One int64 per note after the first (in `note_order`): its onset step and pitch step from the note before."""
    order = note_order(notes)
    steps = onset_steps(notes)[order]
    return np.diff(steps) * PITCH_SPAN + np.diff(notes.pitch[order].astype(np.int64)) + 128


def _extend(pos: np.ndarray, cls: np.ndarray, length: int, side: _Side, sym: np.ndarray, kinds: int):
    """Windows of `length` symbols grown by one: those that fit in their file, keyed by (class, next symbol)."""
    keep = pos + length < side.end_of[pos]
    pos = pos[keep]
    return pos, cls[keep] * kinds + sym[pos + length]


def _per_class(n: int, cls: np.ndarray, values: np.ndarray, empty_lo: int, empty_hi: int):
    """Smallest and largest value in each of `n` classes (empty_lo, empty_hi where a class has none)."""
    lo, hi = np.full(n, empty_lo, np.int64), np.full(n, empty_hi, np.int64)
    np.minimum.at(lo, cls, values)
    np.maximum.at(hi, cls, values)
    return lo, hi


def longest_runs(samples: Sequence[np.ndarray], references: Sequence[np.ndarray],
                 excluded: Sequence[int | None] | None = None, progress: bool = False) -> list[Run]:
    """Each sample's longest run of consecutive symbols also found in a reference, never in `excluded[i]`, its own file.

    Of equally long runs the one starting first in the sample is given, in the first reference file holding it (the
    last, where the first is the sample's own).
    """
    from tqdm import tqdm

    ref, smp = _side(references), _side(samples)
    excluded = [None] * len(samples) if excluded is None else excluded
    owner = np.array([NO_FILE if e is None else e for e in excluded], np.int64)
    _, dense = np.unique(np.concatenate([ref.symbols, smp.symbols]), return_inverse=True)
    kinds = int(dense.max()) + 1 if len(dense) else 1
    rsym, ssym = dense[:len(ref.symbols)], dense[len(ref.symbols):]
    rpos, spos = np.arange(len(rsym)), np.arange(len(ssym))
    rcls, scls = np.zeros(len(rpos), np.int64), np.zeros(len(spos), np.int64)  # all windows of length 0 are equal
    best = np.zeros((len(samples), 4), np.int64)  # length, reference, sample_at, reference_at
    big = len(rsym) + len(owner) + 1
    file_at = np.append(ref.file_of, NO_FILE - 1)  # the file of a reference position; past either end: none
    bar = tqdm(total=len(samples), desc="copies", unit="sample", disable=not progress, leave=False)
    live, length = len(samples), 0
    while len(spos):
        rpos, rkey = _extend(rpos, rcls, length, ref, rsym, kinds)
        spos, skey = _extend(spos, scls, length, smp, ssym, kinds)
        _, cls = np.unique(np.concatenate([rkey, skey]), return_inverse=True)
        rcls, scls, n = cls[:len(rpos)], cls[len(rpos):], int(cls.max(initial=-1)) + 1
        first, last = _per_class(n, rcls, rpos, big, -1)  # files lie in order, so also the first and last file
        has_ref = last >= 0
        first_file, last_file = file_at[np.minimum(first, len(rsym))], file_at[last]
        sown = owner[smp.file_of[spos]]
        lo_owner, hi_owner = _per_class(n, scls, sown, big, NO_FILE - 1)
        rfile = ref.file_of[rpos]
        keep = (hi_owner[rcls] >= NO_FILE) & ((lo_owner[rcls] != rfile) | (hi_owner[rcls] != rfile))
        rpos, rcls = rpos[keep], rcls[keep]
        keep = has_ref[scls] & ((first_file[scls] != sown) | (last_file[scls] != sown))
        spos, scls, sown = spos[keep], scls[keep], sown[keep]
        length += 1
        who, at = np.unique(smp.file_of[spos], return_index=True)  # positions are sorted: `at` is each one's first
        c = scls[at]
        j = np.where(first_file[c] != sown[at], first[c], last[c])
        best[who] = np.stack([np.full(len(who), length), ref.file_of[j], spos[at] - smp.starts[who],
                              j - ref.starts[ref.file_of[j]]], axis=1)
        bar.update(live - len(who))
        live = len(who)
    bar.update(live)
    bar.close()
    return [Run(int(n), int(f) if n else None, int(i) if n else 0, int(j) if n else 0) for n, f, i, j in best]


def longest_copies(samples: Sequence[Notes], references: Sequence[Notes],
                   excluded: Sequence[int | None] | None = None, progress: bool = False) -> list[Run]:
    """Each sample's longest run of consecutive notes shared with a reference file, as the module docstring defines.

    A run of one note is shared by any two files with a note: it is reported as 1 note and no file.
    """
    excluded = [None] * len(samples) if excluded is None else excluded
    runs = longest_runs([note_symbols(n) for n in samples], [note_symbols(n) for n in references], excluded,
                        progress)
    with_notes = [k for k, n in enumerate(references) if len(n)]
    out = []
    for n, e, r in zip(samples, excluded, runs):
        if r.length:
            out.append(Run(r.length + 1, r.reference, r.sample_at, r.reference_at))
        else:  # one note in common at most: a lone note matches any other under transposition
            out.append(Run(int(len(n) > 0 and any(k != e for k in with_notes)), None, 0, 0))
    return out


def _name(path: Path, root: Path) -> str:
    """`path` as the user should look for it: relative to `root` when `root` is the folder it was found in."""
    try:
        return path.relative_to(root).as_posix() if root.is_dir() else path.name
    except ValueError:
        return str(path)


def _onset(notes: Notes, k: int) -> float:
    order = note_order(notes)
    return round(float(notes.start[order[k]]), 3) if len(order) else 0.0


def copies_report(sample_files: Sequence[Path], sample_notes: Sequence[Notes], reference_files: Sequence[Path],
                  reference_notes: Sequence[Notes], sample_root: str | os.PathLike, reference_root: str | os.PathLike,
                  progress: bool = False) -> dict:
    """The `copies` entry of `musicgpt stats --json`: each sample's longest shared run, then the median and maximum.

    A sample that is one of the reference files (the same file after resolving links) is not compared with itself.
    """
    index = {Path(p).resolve(): k for k, p in enumerate(reference_files)}
    excluded = [index.get(Path(p).resolve()) for p in sample_files]
    runs = longest_copies(sample_notes, reference_notes, excluded, progress)
    per = []
    for path, notes, r in zip(sample_files, sample_notes, runs):
        found = r.reference is not None
        per.append({
            "sample": _name(Path(path), Path(sample_root)), "notes": r.length,
            "reference": _name(Path(reference_files[r.reference]), Path(reference_root)) if found else None,
            "sample_note": r.sample_at, "reference_note": r.reference_at,
            "sample_time": _onset(notes, r.sample_at) if found else None,
            "reference_time": _onset(reference_notes[r.reference], r.reference_at) if found else None,
        })
    lengths = [r.length for r in runs]
    return {"matched": MATCHED, "samples": per,
            "median": float(statistics.median(lengths)) if lengths else None, "max": max(lengths, default=None)}


def format_copies(entry: dict) -> str:
    """The lines `musicgpt stats --copies` prints after the table: one per sample, then the median and maximum."""
    lines = []
    for s in entry["samples"]:
        if s["reference"] is not None:
            lines.append(f"{s['sample']}: {s['notes']:,} notes in a row also in {s['reference']} "
                         f"(sample note {s['sample_note']:,} at {s['sample_time']:.2f} s, "
                         f"reference note {s['reference_note']:,} at {s['reference_time']:.2f} s)")
        elif s["notes"]:  # a lone note is in every file with a note, once transposition is free
            lines.append(f"{s['sample']}: no two notes in a row in any reference file")
        else:
            lines.append(f"{s['sample']}: nothing to compare (no notes in the sample or in another reference file)")
    if entry["samples"]:
        top = max(entry["samples"], key=lambda s: s["notes"])
        lines.append(f"longest run shared with a reference file, per sample: median {entry['median']:g} notes, "
                     f"max {entry['max']:,} ({top['sample']}); notes are counted from 0 in onset-then-pitch order")
    return "\n".join(lines)
