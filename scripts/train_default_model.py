"""Train the default model that ships with musicgpt, and export it as package data.

Anyone can rerun this: it trains the `tiny` preset on the 56 expressive GiantMIDI-Piano
performances in midi_data/giantmidi-piano/ (whole files held out for validation by the usual
hash split; the music21 scores, with their flat velocities and exact grid, are left out so
the model learns expressive playing), then writes the best checkpoint in fp16 to musicgpt/default_model/ with the run's
metrics.jsonl and loss.png beside it.

    python scripts/train_default_model.py                 # the shipped run
    python scripts/train_default_model.py --max-steps 50  # a quick trial
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "midi_data" / "giantmidi-piano"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "default-model"))
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--max-steps", type=int, default=1800)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--eval-interval", type=int, default=250)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, help="CPU threads (1 is fastest while other jobs run)")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    ap.add_argument("--no-export", action="store_true", help="train only; leave musicgpt/default_model alone")
    args = ap.parse_args()

    cmd = [sys.executable, "-m", "musicgpt", "train", args.data, "--out", args.out, "--preset", args.preset,
           "--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--lr", str(args.lr), "--warmup", str(args.warmup), "--seed", str(args.seed),
           "--eval-interval", str(args.eval_interval), "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.resume:
        cmd = [sys.executable, "-m", "musicgpt", "train", args.data, "--resume", args.out]
    print("$ " + " ".join(cmd[1:]).replace("-m musicgpt", "musicgpt"), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    wall = time.time() - t0
    if args.no_export:
        return

    from musicgpt.checkpoint import export_model

    run = Path(args.out)
    path = export_model(run / "best.safetensors", DEST / "model", note={"command": " ".join(cmd[1:]), "session_wall_s": wall})
    for name in ("metrics.jsonl", "loss.png"):
        shutil.copy2(run / name, DEST / name)
    info = json.loads(path.with_suffix(".json").read_text())
    print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB): step {info['state'].get('step')}, "
          f"best validation {info['state'].get('best_val'):.4f} nats/token")


if __name__ == "__main__":
    main()
