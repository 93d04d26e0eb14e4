"""Pictures people would rather see than read: loss curves and piano rolls (matplotlib, no display)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on servers and in CI with no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from musicgpt.atomic import atomic_write


def save_figure(fig, path: str | os.PathLike, tight: bool = True) -> None:
    """Save a figure atomically (a reader never sees a half-written image) and close it.

    The format follows the file's suffix. tight=False keeps the figure's exact pixel size
    (figsize x dpi) instead of cropping to content.
    """
    path = Path(path)
    try:
        with atomic_write(path) as f:
            fig.savefig(f, format=path.suffix.lstrip(".").lower(), dpi=fig.dpi, bbox_inches="tight" if tight else None)
    finally:
        plt.close(fig)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file (damaged lines, e.g. from a killed run, are skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_loss_curves(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Draw training and validation loss (nats/token, with bits on the right axis) against step."""
    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    styles = (("train", dict(color="#9bb7d4", lw=1.2)), ("val", dict(color="#d1495b", lw=2, marker="o", ms=3)))
    for split, style in styles:
        rows = [r for r in records if r.get("split") == split]
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=f"{split} loss", **style)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    lo, hi = ax.get_ylim()
    twin = ax.twinx()
    twin.set_ylim(lo / math.log(2), hi / math.log(2))
    twin.set_ylabel("bits/token")
    val = [r for r in records if r.get("split") == "val"]
    if val:
        best = min(val, key=lambda r: r["loss"])
        ax.set_title(f"best validation {best['loss']:.3f} nats/token at step {best['step']}", fontsize=10)
    out = Path(out_png)
    save_figure(fig, out)
    return out


def draw_piano_roll(ax, pitch: np.ndarray, start: np.ndarray, end: np.ndarray, velocity: np.ndarray, *,
                    cmap="Blues") -> None:
    """Draw notes as rectangles (time across, pitch up) shaded by velocity onto `ax`."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    if len(pitch) == 0:
        ax.text(0.5, 0.5, "no notes", ha="center", va="center", transform=ax.transAxes, color="0.5")
        return
    rects = [Rectangle((s, p - 0.4), max(e - s, 1e-3), 0.8) for p, s, e in zip(pitch, start, end)]
    colours = plt.get_cmap(cmap)(0.35 + 0.65 * np.asarray(velocity) / 127.0)
    ax.add_collection(PatchCollection(rects, facecolors=colours, edgecolors="none"))
    ax.set_xlim(float(np.min(start)), float(np.max(end)))
    ax.set_ylim(float(np.min(pitch)) - 2, float(np.max(pitch)) + 2)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("pitch (MIDI)")


def label_pitch_axis(ax, low: float, high: float, color: str = "0.85") -> None:
    """Label the pitch axis with note names at each C (C4 = middle C) and draw faint lines there."""
    import pretty_midi

    cs = [p for p in range(int(math.ceil(low)), int(high) + 1) if p % 12 == 0]
    ax.set_yticks(cs, [pretty_midi.note_number_to_name(p) for p in cs])
    for p in cs:
        ax.axhline(p - 0.5, color=color, lw=0.6, zorder=0)


def plot_piano_roll(midi_path: str | os.PathLike, out_png: str | os.PathLike, title: str | None = None,
                    spans: Sequence[tuple[float, float]] = (), marks: Sequence[float] = ()) -> Path:
    """A piano-roll PNG of a MIDI file (notes of all non-drum instruments); each (start, end) of `spans`
    is shaded and the notes struck inside it drawn in orange (an infilled gap); each time of `marks` is
    a dashed red line (where a primer ends and the model takes over)."""
    from musicgpt.codec import load_midi

    pm = load_midi(midi_path)
    notes = [n for inst in pm.instruments if not inst.is_drum for n in inst.notes]
    pitch, start, end, velocity = (np.array([getattr(n, k) for n in notes], dtype=float)
                                   for k in ("pitch", "start", "end", "velocity"))
    inside = np.zeros(len(notes), dtype=bool)
    for a, b in spans:
        inside |= (start >= a) & (start < b)
    fig, ax = plt.subplots(figsize=(10, 3.6), dpi=110)
    for keep, cmap in ((~inside, "Blues"), (inside, "Oranges")):
        if keep.any() or not len(notes):
            draw_piano_roll(ax, pitch[keep], start[keep], end[keep], velocity[keep], cmap=cmap)
    if len(notes):  # each draw set the limits to its own notes
        ax.set_xlim(float(start.min()), float(end.max()))
        ax.set_ylim(float(pitch.min()) - 2, float(pitch.max()) + 2)
    for a, b in spans:
        ax.axvspan(a, b, color="#f4a261", alpha=0.15, zorder=0)
    for t in marks:
        ax.axvline(t, color="#d62828", lw=1.5, ls="--", zorder=3)
    ax.set_title(title or Path(midi_path).name, fontsize=10)
    ax.grid(alpha=0.2)
    out = Path(out_png)
    save_figure(fig, out)
    return out
