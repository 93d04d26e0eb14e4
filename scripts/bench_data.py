"""The data pipeline at 10^3..10^5 files: `prepare` throughput, `train` start-up and memory, time per window.

Builds synthetic corpora of small MIDI files (a few notes each, two style folders) under
--root, then for each size in ONE run: `prepare_store` throughput (files/s, notes/s, a fresh
token cache), the start-up of `musicgpt train STORE` from process start to the end of its first
step and that process's peak RSS, and the mean time of one training window from the store and,
for comparison, from the folder-backed dataset (pieces in memory; it now draws in O(log N) too),
beside the cost of the O(N) `rng.choice` draw both used before, which a window then paid on top.
Prints a markdown table naming the machine.

    python scripts/bench_data.py [--sizes 1000 10000 100000] [--root DIR (default: the temp folder)]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from musicgpt import data, prepare, store, windows
from musicgpt.controls import Controls

NOTES = 6  # notes per synthetic file
# The child: time and peak RSS at the end of the first training step, then exit at once.
CHILD = """
import json, os, resource, sys, time
from musicgpt import cli, train
step = train.train_step
def first(*a, **k):
    step(*a, **k)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("\\nFIRST_STEP " + json.dumps({"t": time.time(), "rss_kb": peak_kb}), file=sys.stderr, flush=True)
    os._exit(0)
train.train_step = first
sys.exit(cli.main(sys.argv[1:]))
"""


def midi_bytes(pitches: np.ndarray) -> bytes:
    """A format-0 MIDI file playing `pitches` one after another, an eighth note each."""
    events = b"".join(bytes([0, 0x90, p, 80, 120, 0x80, p, 0]) for p in pitches.tolist())
    track = events + b"\x00\xff\x2f\x00"
    return b"MThd" + struct.pack(">IHHH", 6, 0, 1, 240) + b"MTrk" + struct.pack(">I", len(track)) + track


def make_corpus(folder: Path, n: int) -> None:
    """`n` files in two style folders, 1000 to a sub-folder; kept if already complete."""
    if (folder / f".complete-{n}").exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        sub = folder / ("jazz", "pop")[i % 2] / f"{i // 1000:03d}"
        if i % 1000 < 2:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:06d}.mid").write_bytes(midi_bytes(rng.integers(40, 90, NOTES)))
    (folder / f".complete-{n}").touch()


def train_startup(store_dir: Path, run_dir: Path) -> tuple[float, float]:
    """(seconds from process start to the end of the first step, peak RSS in MB) of `musicgpt train`."""
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [str(store_dir), "--max-steps", "1", "--preset", "tiny", "--batch-size", "8", "--seq-len", "64",
            "--device", "cpu", "--threads", "1", "--out", str(run_dir)]
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, "train", *args], capture_output=True, text=True)
    if "FIRST_STEP " not in proc.stderr:
        raise SystemExit(f"train failed:\n{proc.stderr[-2000:]}")
    got = json.loads(proc.stderr.split("FIRST_STEP ", 1)[1].splitlines()[0])
    return got["t"] - t0, got["rss_kb"] / 1024


def per_window_ms(dataset, count: int = 2000) -> float:
    """Mean milliseconds of one `dataset[i]` over `count` spread indices."""
    indices = np.random.default_rng(0).integers(0, 10**9, count)
    t0 = time.perf_counter()
    for i in indices:
        dataset[int(i)]
    return (time.perf_counter() - t0) / count * 1e3


def choice_draw_ms(dataset, count: int = 500) -> float:
    """Mean milliseconds of the O(N) `rng.choice(n, p=weights)` draw the dataset used before the store."""
    weights = np.diff(dataset.cdf, prepend=0.0)
    t0 = time.perf_counter()
    for i in range(count):
        np.random.default_rng([1, i]).choice(len(weights), p=weights)
    return (time.perf_counter() - t0) / count * 1e3


def window_dataset(pieces, config, tags):
    return windows.TokenWindowDataset(pieces, 64, config, augment=windows.Augment(), seed=1,
                                      controls=Controls(config, True, tags), fim_rate=0.5, tag_dropout=0.1)


def bench_size(root: Path, n: int, folder_max: int) -> dict:
    """One row of the table for a corpus of `n` files."""
    midi, out = root / f"midi-{n}", root / f"store-{n}"
    make_corpus(midi, n)
    shutil.rmtree(out, ignore_errors=True)
    os.environ["MUSICGPT_CACHE"] = str(root / f"cache-{n}")
    shutil.rmtree(os.environ["MUSICGPT_CACHE"], ignore_errors=True)
    t0 = time.perf_counter()
    prepare.prepare_store(midi, out, progress=False)
    prep_s = time.perf_counter() - t0
    startup_s, rss_mb = train_startup(out, root / f"run-{n}")
    tokens = store.TokenStore(out)
    train_numbers, _ = tokens.split(0.1)
    dataset = window_dataset(tokens.source(train_numbers), tokens.codec_config, tokens.tag_names)
    row = dict(files=n, prep_files_s=n / prep_s, prep_notes_s=n * NOTES / prep_s, startup_s=startup_s,
               rss_mb=rss_mb, store_ms=per_window_ms(dataset), choice_ms=choice_draw_ms(dataset))
    if n <= folder_max:  # today's path: every piece in memory (read back from the token cache)
        corpus = data.encode_folder(midi, progress=False)
        train, _ = data.split_files(corpus.pieces, 0.1)
        row["folder_ms"] = per_window_ms(window_dataset(train, corpus.config, corpus.tags))
    print(f"done {n}: {row}", file=sys.stderr)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "musicgpt-bench")
    parser.add_argument("--folder-max", type=int, default=100000, help="largest size timed folder-backed too")
    args = parser.parse_args()
    rows = [bench_size(args.root, n, args.folder_max) for n in args.sizes]
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"Python {platform.python_version()}, numpy {np.__version__}\n")
    print("| files | prepare files/s | prepare notes/s | train start-up to first step (s) | train peak RSS (MB) "
          "| store ms/window | folder ms/window | rng.choice draw alone (before) ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        folder = f"{r['folder_ms']:.3f}" if "folder_ms" in r else "-"
        print(f"| {r['files']:,} | {r['prep_files_s']:,.0f} | {r['prep_notes_s']:,.0f} | {r['startup_s']:.2f} "
              f"| {r['rss_mb']:.0f} | {r['store_ms']:.3f} | {folder} | {r['choice_ms']:.3f} |")


if __name__ == "__main__":
    main()
