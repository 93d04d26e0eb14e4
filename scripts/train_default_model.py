"""Train the default model that ships with musicgpt, and export it as package data.

Anyone can rerun this. Data: the 56 expressive GiantMIDI-Piano performances in
midi_data/classical/giantmidi-piano/ (whole files held out for validation by the usual hash split; the
music21 scores, with their flat velocities and exact grid, are left out so the model learns
expressive playing). Two stages of `musicgpt train`, both with the `tiny` preset:

1. 1800 steps from scratch on 256-token windows (batch 16);
2. 900 steps fine-tuning stage 1's best checkpoint on 512-token windows (batch 8, `--init`),
   which doubles the context the model plays with: with 256 tokens (about 7 s of dense piano)
   it often lost track of notes it had started and never released them.

The best stage-2 checkpoint is written in fp16 to musicgpt/default_model/ with that run's
metrics.jsonl and loss.png beside it.

    python scripts/train_default_model.py --threads 1    # the shipped run (about 45 min on 2 CPU cores)
    python scripts/train_default_model.py --quick        # a few steps, to check the pipeline
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / "musicgpt" / "default_model"

STAGE1 = dict(preset="tiny", max_steps=1800, batch_size=16, seq_len=256, lr=0.002, warmup=150, eval_interval=250)
STAGE2 = dict(max_steps=900, batch_size=8, seq_len=512, lr=0.001, warmup=50, eval_interval=150)


def run_stage(data: str, out: Path, options: dict, seed: int, threads: int | None, init: Path | None) -> float:
    """Run one `musicgpt train` stage as a subprocess; return its wall time in seconds."""
    cmd = ["musicgpt", "train", data, "--out", str(out), "--seed", str(seed)]
    cmd += [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    if init:
        cmd += ["--init", str(init)]
    if threads:
        cmd += ["--threads", str(threads)]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "musicgpt", *cmd[1:]], check=True)
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "midi_data" / "classical" / "giantmidi-piano"))
    ap.add_argument("--runs", default=str(ROOT / "runs"), help="where the two run folders go")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, help="CPU threads (1 is fastest while other jobs run)")
    ap.add_argument("--quick", action="store_true", help="10 + 10 steps, nothing exported")
    ap.add_argument("--export-only", action="store_true", help="only export the finished runs in --runs")
    args = ap.parse_args()

    stage1, stage2 = dict(STAGE1), dict(STAGE2)
    if args.quick:
        stage1.update(max_steps=10, eval_interval=5)
        stage2.update(max_steps=10, eval_interval=5)
    runs = Path(args.runs)
    wall = None
    if not args.export_only:
        wall = run_stage(args.data, runs / "default-model", stage1, args.seed, args.threads, None)
        wall += run_stage(args.data, runs / "default-model-ctx512", stage2, args.seed, args.threads,
                          runs / "default-model" / "best.safetensors")
    if args.quick:
        return

    from musicgpt.checkpoint import export_model

    final = runs / "default-model-ctx512"
    path = export_model(final / "best.safetensors", DEST / "model", note={"stages": [stage1, stage2], "wall_s": wall})
    for name in ("metrics.jsonl", "loss.png"):
        shutil.copy2(final / name, DEST / name)
    shutil.copy2(runs / "default-model" / "metrics.jsonl", DEST / "metrics_stage1.jsonl")
    shutil.copy2(runs / "default-model" / "loss.png", DEST / "loss_stage1.png")
    info = json.loads(path.with_suffix(".json").read_text())
    print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB): best validation "
          f"{info['state'].get('best_val'):.4f} nats/token")


if __name__ == "__main__":
    main()
