"""Ablation: Music-Transformer relative attention vs learned absolute positions, same budget.

Trains both kinds with one preset, seed, data, step count, batch and sequence length (only
`TrainConfig.attention` differs), then scores each final (`last`) checkpoint with
`musicgpt.evaluate.loss_on_pieces` on the same non-overlapping windows of the validation split.

    python scripts/ablation.py --data midi_data --steps 300 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from musicgpt import checkpoint, data
from musicgpt.evaluate import loss_on_pieces
from musicgpt.train import TrainConfig, train

KINDS = ("relative", "absolute")


def run_one(attention: str, args: argparse.Namespace) -> dict:
    """Train one attention kind and return its training figures."""
    cfg = TrainConfig(
        data_dir=args.data, out=str(Path(args.out) / attention), preset=args.preset, attention=attention,
        max_steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup=args.warmup,
        eval_interval=args.eval_interval or args.steps, seed=args.seed, device="cpu", threads=args.threads,
    )
    t0 = time.time()
    run = train(cfg, progress=not args.quiet)
    seconds = time.time() - t0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [r for r in records if r.get("split") == "val"]
    return {"run": str(run), "train_seconds": seconds, "val_curve": [(r["step"], r["loss"]) for r in val]}


def score(run: str, seq_len: int, batch_size: int, data_dir: str, val_fraction: float) -> dict:
    """Held-out loss of a run's final checkpoint on every window of the validation split."""
    model, ckpt = checkpoint.load_model(Path(run) / "last.safetensors")
    corpus = data.encode_folder(data_dir, ckpt.codec_config, progress=False)
    _, val = data.split_files(corpus.pieces, val_fraction)
    nats, tokens, windows = loss_on_pieces(model, val, ckpt.codec_config, seq_len=seq_len, batch_size=batch_size,
                                           progress=False)
    return {"params": model.num_params(), "val_files": len(val), "windows": windows, "tokens": tokens,
            "nats": nats, "bits": nats / math.log(2), "perplexity": math.exp(nats)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="midi_data")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval-interval", type=int, help="steps between training-time validations (default: at the end)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--val-fraction", type=float, default=0.1, help="as in training (TrainConfig's default)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 when the machine is shared)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {}
    for kind in KINDS:
        results[kind] = run_one(kind, args)
        results[kind].update(score(results[kind]["run"], args.seq_len, args.batch_size, args.data, args.val_fraction))
    summary = {"machine": f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
               "args": vars(args), "results": results}
    out = Path(args.out) / "ablation.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")

    print(f"\n{args.preset}, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, seed {args.seed}; "
          f"{summary['machine']}")
    print("| attention | params | train s | val loss (nats/token) | bits/token | perplexity |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, r in results.items():
        print(f"| {kind} | {r['params'] / 1e6:.2f}M | {r['train_seconds']:.0f} | {r['nats']:.4f} | {r['bits']:.4f} "
              f"| {r['perplexity']:.2f} |")
    rel, ab = results["relative"]["nats"], results["absolute"]["nats"]
    print(f"relative - absolute = {rel - ab:+.4f} nats/token on {results['relative']['windows']} windows "
          f"({results['relative']['tokens']:,} targets) of {results['relative']['val_files']} validation files")
    print(f"written {out}")


if __name__ == "__main__":
    main()
