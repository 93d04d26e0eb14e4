"""Train the default model that ships with musicgpt, and export it as package data.

Anyone can rerun this on the committed `midi_data/` (pop, classical performances, scores; style
tags from the folders and `midi_data/tags.txt`). The recipe continues the model shipped before
(a `tiny` model trained on the 56 GiantMIDI-Piano performances alone, taken from git at
OLD_MODEL_COMMIT) in twelve `musicgpt train` stages, all `tiny` (0.74 M parameters; 0.78 M with
the keyboard input of stage 9), with style tags and fill-in-the-middle (FIM) windows at the
default rate 0.5:

1. 2,528 steps of a 3,000-step schedule on the whole corpus, 512-token windows, batch 8: the
   vocabulary grows by the five style tags and three FIM sentinels. (The shipped run was stopped
   there by hand: --stop-at reproduces it.)
2. 2,400 steps more with classical performances drawn 4 times as often (`--tag-weight`), a
   fresh warmup and cosine decay. (The shipped run also passed `--dropout 0` to stages 2 and 3,
   which `--init` ignored then, a bug since fixed: they trained with the model's dropout, 0.1, as
   this script now asks.)
3. A short stage on 1,024-token windows, so the model keeps notes in view twice as long.
4. 406 steps of a 1,400-step schedule on 1,024-token windows with classical performances drawn
   6 times as often (the shipped run was stopped there by hand, to anneal sooner: --stop-at).
5. 500 steps from stage 4's last checkpoint, a fresh short warmup and cosine decay, the same mix.
6. 1,200 steps from stage 5 as it shipped (its best checkpoint in fp16), classical performances
   drawn 10 times as often, on one thread (the other core was sampling and benchmarking).
7. 700 steps more from stage 6's best at half its learning rate, the same mix.
8. 1,200 steps more from stage 7's best at the same learning rate, the same mix.
9. 1,200 steps more from stage 8's best with the keyboard input added (`--sounding-notes`: which
   keys sound and for how long, its projection starting at zero), the same mix.
10. 1,200 steps more from stage 9's best, the same mix.
11. 1,200 steps more from stage 10's best, the same mix, each window now starting with the notes
    still sounding where it was cut (the code's behaviour since this stage; stages 9 and 10
    started every window with no key down).
12. 600 steps more from stage 11's best on two threads with `--sounding-releases`: the model gives
    a NOTE_OFF probability only where its key sounds.

The best stage-12 checkpoint is written in fp16 to musicgpt/default_model/ with every stage's
metrics.jsonl and loss.png beside it.

    python scripts/train_default_model.py --threads 2   # the shipped run (about 9 h on 2 CPU cores)
    python scripts/train_default_model.py --quick       # a few steps per stage, to check the pipeline
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
OLD_MODEL_COMMIT = "dd34a54"  # the last commit that shipped the GiantMIDI-only tiny model

STAGES = [
    ("stage1", dict(seq_len=512, batch_size=8, lr=1e-3, warmup=100, max_steps=3000, stop_at=2528, eval_interval=250,
                    seed=17)),
    ("stage2", dict(seq_len=512, batch_size=8, lr=8e-4, warmup=100, max_steps=2400, eval_interval=300,
                    tag_weight="classical=4", seed=18)),
    ("stage3", dict(seq_len=1024, batch_size=4, lr=3e-4, warmup=50, max_steps=400, eval_interval=100,
                    tag_weight="classical=4", seed=19)),
    ("stage4", dict(seq_len=1024, batch_size=4, lr=3e-4, warmup=50, max_steps=1400, stop_at=406, eval_interval=100,
                    tag_weight="classical=6", seed=20)),
    ("stage5", dict(seq_len=1024, batch_size=4, lr=2.5e-4, warmup=20, max_steps=500, eval_interval=100,
                    tag_weight="classical=6", seed=21)),
    ("stage6", dict(seq_len=1024, batch_size=4, lr=2e-4, warmup=20, max_steps=1200, eval_interval=100,
                    tag_weight="classical=10", seed=22, threads=1)),
    ("stage7", dict(seq_len=1024, batch_size=4, lr=1e-4, warmup=20, max_steps=700, eval_interval=100,
                    tag_weight="classical=10", seed=24, threads=1)),
    ("stage8", dict(seq_len=1024, batch_size=4, lr=1e-4, warmup=20, max_steps=1200, eval_interval=100,
                    tag_weight="classical=10", seed=26, threads=1)),
    ("stage9", dict(seq_len=1024, batch_size=4, lr=1e-4, warmup=20, max_steps=1200, eval_interval=100,
                    tag_weight="classical=10", seed=31, threads=1, sounding_notes=True)),
    ("stage10", dict(seq_len=1024, batch_size=4, lr=1e-4, warmup=20, max_steps=1200, eval_interval=100,
                     tag_weight="classical=10", seed=32, threads=1)),
    ("stage11", dict(seq_len=1024, batch_size=4, lr=1e-4, warmup=20, max_steps=1200, eval_interval=100,
                     tag_weight="classical=10", seed=33, threads=1)),
    ("stage12", dict(seq_len=1024, batch_size=4, lr=1e-4, warmup=20, max_steps=600, eval_interval=100,
                     tag_weight="classical=10", seed=34, threads=2, sounding_releases=True)),
]
INIT_FROM = {"stage1": None, "stage2": "stage1/last.safetensors", "stage3": "stage2/best.safetensors",
             "stage4": "stage3/best.safetensors", "stage5": "stage4/last.safetensors",
             "stage6": "stage5-export/model.safetensors", "stage7": "stage6/best.safetensors",
             "stage8": "stage7/best.safetensors", "stage9": "stage8/best.safetensors",
             "stage10": "stage9/best.safetensors", "stage11": "stage10/best.safetensors",
             "stage12": "stage11/best.safetensors"}
# Stage 6 continued the stage-5 model as it shipped: its best checkpoint exported in fp16.
EXPORTED = {"stage5-export": "stage5/best.safetensors"}


def old_model(runs: Path) -> Path:
    """The model shipped before, checked out of git into the runs folder."""
    dest = runs / "old-default" / "model.safetensors"
    dest.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".safetensors", ".json"):
        blob = subprocess.run(["git", "show", f"{OLD_MODEL_COMMIT}:musicgpt/default_model/model{suffix}"],
                              cwd=ROOT, check=True, capture_output=True).stdout
        dest.with_suffix(suffix).write_bytes(blob)
    return dest


def run_stage(out: Path, options: dict, init: Path, threads: int | None) -> float:
    """Run one `musicgpt train` stage as a subprocess; return its wall time in seconds."""
    cmd = ["musicgpt", "train", "midi_data/", "--out", str(out), "--init", str(init)]
    threads = options.pop("threads", threads)  # a stage run with its own thread count keeps it
    for key, value in options.items():  # True: a switch such as --sounding-notes
        cmd += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    if threads:
        cmd += ["--threads", str(threads)]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "musicgpt", *cmd[1:]], check=True, cwd=ROOT)
    return time.time() - t0


def export(runs: Path, walls: dict[str, float]) -> None:
    """Write the last stage's best checkpoint to the package in fp16, with every stage's curves."""
    from musicgpt.checkpoint import export_model

    final = runs / STAGES[-1][0]
    path = export_model(final / "best.safetensors", DEST / "model",
                        note={"stages": [dict(o, name=n) for n, o in STAGES], "wall_s": walls})
    for name, _ in STAGES:
        shutil.copy2(runs / name / "metrics.jsonl", DEST / f"metrics_{name}.jsonl")
        shutil.copy2(runs / name / "loss.png", DEST / f"loss_{name}.png")
    info = json.loads(path.with_suffix(".json").read_text())
    print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB): best validation "
          f"{info['state'].get('best_val'):.4f} nats/token")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=str(ROOT / "runs" / "default-model"), help="where the stage folders go")
    ap.add_argument("--threads", type=int, help="CPU threads for torch")
    ap.add_argument("--quick", action="store_true", help="a few steps per stage, nothing exported")
    ap.add_argument("--export-only", action="store_true", help="only export the finished stages in --runs")
    args = ap.parse_args()

    runs = Path(args.runs)
    walls: dict[str, float] = {}
    if not args.export_only:
        for name, options in STAGES:
            options = dict(options)
            if args.quick:
                options.update(max_steps=6, eval_interval=3, warmup=2)
                options.pop("stop_at", None)
            init = runs / INIT_FROM[name] if INIT_FROM[name] else old_model(runs)
            if init.parent.name in EXPORTED and not init.exists():
                from musicgpt.checkpoint import export_model

                export_model(runs / EXPORTED[init.parent.name], init.with_suffix(""))
            walls[name] = run_stage(runs / name, options, init, args.threads)
    if not args.quick:
        export(runs, walls)


if __name__ == "__main__":
    main()
