"""Musical statistics of a set of MIDI files against a reference set (`musicgpt stats`).

For each feature we build a distribution over each set and report their overlapping area (OA),
as Yang and Lerch (2020, "On the evaluation of generative models in music") do: the area under
min(p, q). Both distributions are histograms over the same fixed bins (below), normalised to
probability masses, so OA = sum over bins of min(p_i, q_i): 1 for identical distributions, 0
for disjoint ones. Fixed bins (rather than a kernel density estimate with a data-dependent
bandwidth) make OA comparable between runs and sets of any size. Values past the last bin edge
count in the last bin. Notes are read with the sustain pedal applied, drums dropped, and as a
piano sounds them (`midi_io.as_heard`: a re-struck key ends its pedal-held note), so real files
and decoded samples are measured alike. Each file is read once; `compare_sets(..., copies=True)`
also runs the memorisation check of `musicgpt.copies` on the same notes.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from musicgpt.copies import copies_report
from musicgpt.errors import MidiReadError, MusicGPTError
from musicgpt.midi_io import Notes, as_heard, read_notes, subset
from musicgpt.vocab import CodecConfig

GRID_S = CodecConfig().step_seconds  # onsets are grouped on the codec's grid: a hand's chord is one onset
PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
_LOG_TIME_BINS = np.logspace(-2, 1, 31)  # 10 ms .. 10 s, 10 bins per decade


@dataclass(frozen=True)
class Feature:
    """One statistic: how to compute its values from a file's notes, and the bins it is compared on."""

    name: str
    unit: str
    values: Callable[[Notes], np.ndarray]
    bins: np.ndarray
    per_file: bool = False  # one value per file (else one per note, onset or interval)
    log_x: bool = False


def _onsets(n: Notes) -> np.ndarray:
    return np.unique(np.rint(n.start / GRID_S)) * GRID_S


def _pitch_range(n: Notes) -> np.ndarray:
    return np.array([n.pitch.max() - n.pitch.min()], dtype=float)


def _pitch_class_entropy(n: Notes) -> np.ndarray:
    p = np.bincount(n.pitch % 12, minlength=12) / len(n)
    p = p[p > 0]
    return np.array([float(-(p * np.log2(p)).sum())])


def _polyphony(n: Notes) -> np.ndarray:
    """Notes sounding at each onset: begun at or before it and not yet ended."""
    t = _onsets(n) + GRID_S / 2  # half a step on: the notes of a grouped chord have all begun
    return (np.searchsorted(np.sort(n.start), t, side="right")
            - np.searchsorted(np.sort(n.end), t, side="right")).astype(float)


def _notes_per_second(n: Notes) -> np.ndarray:
    span = float(n.end.max() - n.start.min())
    return np.array([len(n) / max(span, GRID_S)])


FEATURES = (
    Feature("pitch_range", "semitones", _pitch_range, np.arange(0, 92, 4), per_file=True),
    Feature("pitch_class", "class", lambda n: (n.pitch % 12).astype(float), np.arange(13) - 0.5),
    Feature("pitch_class_entropy", "bits", _pitch_class_entropy, np.linspace(0, np.log2(12), 19), per_file=True),
    Feature("polyphony", "notes", _polyphony, np.arange(-0.5, 16.5, 1.0)),
    Feature("notes_per_second", "notes/s", _notes_per_second, np.arange(0, 32, 1.0), per_file=True),
    Feature("inter_onset_interval", "s", lambda n: np.diff(_onsets(n)), _LOG_TIME_BINS, log_x=True),
    Feature("duration", "s", lambda n: n.end - n.start, _LOG_TIME_BINS, log_x=True),
    Feature("velocity", "velocity", lambda n: n.velocity.astype(float), np.arange(0, 129, 8.0)),
)


def histogram(values: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Probability mass per bin (sums to 1; all zeros for no values); out-of-range values go to the end bins."""
    clipped = np.clip(values, bins[0], np.nextafter(bins[-1], -np.inf))
    counts = np.histogram(clipped, bins=bins)[0].astype(float)
    return counts / counts.sum() if counts.sum() else counts


def overlapping_area(p: np.ndarray, q: np.ndarray) -> float:
    """Area under min(p, q) of two probability mass vectors over the same bins."""
    return float(np.minimum(p, q).sum())


@dataclass
class SetStats:
    """Every feature's values over a set of files."""

    files: list[Path]
    values: dict[str, np.ndarray]
    skipped: list[str] = field(default_factory=list)  # "path: why"


def list_midi(path: str | os.PathLike) -> list[Path]:
    """A single MIDI file, or every MIDI file under a folder."""
    from musicgpt.data import find_midi_files

    p = Path(path)
    if p.is_file():
        return [p]
    if not p.exists():
        raise MusicGPTError(f"{p}: no such file or folder")
    return find_midi_files(p)


@dataclass
class NoteSet:
    """The notes of every readable file of a set, and the files skipped."""

    files: list[Path]
    notes: list[Notes]
    skipped: list[str] = field(default_factory=list)  # "path: why"


def read_set(files: list[Path], label: str = "", progress: bool = True) -> NoteSet:
    """Read every file; bad ones are skipped and listed in one warning, and none readable is an error."""
    from tqdm import tqdm

    from musicgpt.data import file_problem, printable

    read, notes, skipped = [], [], []
    for path in tqdm(files, desc=f"reading {label}".strip(), unit="file", disable=not progress, leave=False):
        problem = file_problem(path)  # a FIFO named *.mid would block the read for good
        if problem:
            skipped.append(f"{path}: {problem}")
            continue
        try:
            notes.append(as_heard(read_notes(path)))
        except MidiReadError as e:
            skipped.append(str(e))
            continue
        read.append(path)
    if skipped:
        listing = "; ".join(skipped)
        print(printable(f"musicgpt: warning: skipped {len(skipped)} bad file(s): {listing}"), file=sys.stderr)
    if not read:
        raise MusicGPTError(f"{label or 'input'}: none of the {len(files)} MIDI file(s) could be read")
    return NoteSet(read, notes, skipped)


def set_stats(notes: NoteSet) -> SetStats:
    """Every feature's values over a set of files already read."""
    values = {f.name: np.concatenate([f.values(n) for n in notes.notes]) if notes.notes else np.zeros(0)
              for f in FEATURES}
    return SetStats(notes.files, values, notes.skipped)


def collect(files: list[Path], label: str = "", progress: bool = True) -> SetStats:
    """Read every file (bad ones skipped and listed in one warning) and compute every feature."""
    return set_stats(read_set(files, label, progress))


def compare(samples: SetStats, reference: SetStats) -> dict:
    """Per feature: each set's mean, spread and histogram, and the OA of the two histograms."""
    out = {}
    for f in FEATURES:
        a, b = samples.values[f.name], reference.values[f.name]
        pa, pb = histogram(a, f.bins), histogram(b, f.bins)
        out[f.name] = {
            "unit": f.unit, "per_file": f.per_file, "bins": f.bins.tolist(),
            "oa": overlapping_area(pa, pb),
            "samples": _summary(a, pa), "reference": _summary(b, pb),
        }
    return out


def _summary(values: np.ndarray, hist: np.ndarray) -> dict:
    some = len(values) > 0  # e.g. no inter-onset intervals in a set of one-chord files
    return {"n": int(len(values)), "mean": float(values.mean()) if some else None,
            "std": float(values.std()) if some else None, "hist": hist.tolist()}


def excerpt(notes: Notes, start: float, end: float) -> Notes:
    """The notes struck in [start, end) seconds, moved to start at 0 (each keeps its full length)."""
    return subset(notes, (notes.start >= start) & (notes.start < end), shift=start)


def excerpts(notes: NoteSet, span: tuple[float, float]) -> NoteSet:
    """Every file's `excerpt` over `span`; files with no note struck in it are left out."""
    cut = [(f, excerpt(n, *span)) for f, n in zip(notes.files, notes.notes)]
    kept = [(f, n) for f, n in cut if len(n)]
    if not kept:
        raise MusicGPTError(f"no reference file has a note between {span[0]:g} and {span[1]:g} s")
    return NoteSet([f for f, _ in kept], [n for _, n in kept], notes.skipped)


def compare_sets(samples_dir: str | os.PathLike, reference_dir: str | os.PathLike, *,
                 progress: bool = True, copies: bool = False, reference_span: tuple[float, float] | None = None
                 ) -> dict:
    """The full report of `musicgpt stats`: both sets' files and skips, and `compare`'s figures.

    With `reference_span` (start, end) in seconds, the features of the reference are those of each
    file's excerpt over that span (like for like with samples of that length: a whole piece spans
    more of the keyboard than any minute of it). With `copies`, also each sample's longest run of
    notes shared with a reference file (`copies.copies_report`), always over whole files.
    """
    sample_files, reference_files = list_midi(samples_dir), list_midi(reference_dir)  # a bad path fails before work
    s = read_set(sample_files, str(samples_dir), progress)
    r = read_set(reference_files, str(reference_dir), progress)
    described = excerpts(r, reference_span) if reference_span else r
    report = {
        "samples": {"path": str(samples_dir), "files": len(s.files), "skipped": s.skipped},
        "reference": {"path": str(reference_dir), "files": len(described.files), "skipped": r.skipped,
                      "span": list(reference_span) if reference_span else None},
        "features": compare(set_stats(s), set_stats(described)),
    }
    if copies:
        report["copies"] = copies_report(s.files, s.notes, r.files, r.notes, samples_dir, reference_dir, progress)
    return report


def _cell(summary: dict, name: str) -> str:
    if summary["mean"] is None:
        return "-"
    if name == "pitch_class":  # a mean class means nothing: show the three commonest
        top = np.argsort(summary["hist"])[::-1][:3]
        return " ".join(PITCH_CLASSES[i] for i in top)
    return f"{summary['mean']:.3g} ± {summary['std']:.2g}"


def format_table(report: dict) -> str:
    """The table `musicgpt stats` prints: one row per feature, OA last."""
    s, r = report["samples"], report["reference"]
    span = f" {r['span'][0]:g}-{r['span'][1]:g} s" if r.get("span") else ""
    rows = [("feature", "unit", f"samples ({s['files']})", f"reference{span} ({r['files']})", "OA")]
    for name, f in report["features"].items():
        rows.append((name, f["unit"], _cell(f["samples"], name), _cell(f["reference"], name), f"{f['oa']:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    oa = [f["oa"] for f in report["features"].values()]
    lines.append(f"mean OA {np.mean(oa):.3f} (1 = same distributions as the reference, 0 = disjoint)")
    return "\n".join(lines)


def plot_report(report: dict, out: str | os.PathLike) -> Path:
    """One panel per feature: the two histograms side by side, OA in the title."""
    from musicgpt.plot import plt, save_figure

    feats = list(report["features"].items())
    cols, rows = 4, (len(feats) + 3) // 4
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), dpi=100, squeeze=False)
    log_scale = {f.name: f.log_x for f in FEATURES}
    for ax, (name, f) in zip(axes.ravel(), feats):
        edges = np.asarray(f["bins"])
        log_x = log_scale[name]
        left = np.log10(edges[:-1]) if log_x else edges[:-1]
        width = np.diff(np.log10(edges) if log_x else edges)
        for k, (who, colour) in enumerate((("samples", "#d1495b"), ("reference", "#2e86ab"))):
            ax.bar(left + width * (0.05 + 0.45 * k), f[who]["hist"], width=width * 0.45, align="edge",
                   color=colour, label=who)
        if log_x:
            ticks = [-2, -1, 0, 1]
            ax.set_xticks(ticks, [f"{10.0 ** t:g}" for t in ticks])
        if name == "pitch_class":
            ax.set_xticks(range(12), PITCH_CLASSES, fontsize=7)
        ax.set_title(f"{name}  OA {f['oa']:.2f}", fontsize=9)
        ax.set_xlabel(f["unit"], fontsize=8)
    for ax in axes.ravel()[len(feats):]:
        ax.axis("off")
    axes.ravel()[0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    out = Path(out)
    save_figure(fig, out)
    return out


def report_json(report: dict) -> str:
    """The report as JSON text (what `--json` prints)."""
    return json.dumps(report, indent=2)
