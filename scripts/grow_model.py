"""Write a deeper copy of a checkpoint (`musicgpt.grow.deepen`) to train on with `musicgpt train --init`.

    python scripts/grow_model.py runs/stage6/best.safetensors runs/grown/model.safetensors --extra 1

The grown checkpoint predicts exactly what the original does (checked here on random tokens
before it is written); its training state records what it grew from.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from musicgpt.checkpoint import load_model, save_checkpoint
from musicgpt.grow import deepen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst", type=Path)
    ap.add_argument("--extra", type=int, default=1, help="blocks to add on top")
    args = ap.parse_args()
    model, ckpt = load_model(args.src)
    grown = deepen(model, args.extra).eval()
    seq = torch.randint(0, model.config.vocab_size, (2, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = (grown(seq).logits - model(seq).logits).abs().max().item()
    if gap > 1e-4:
        raise SystemExit(f"grown model differs from {args.src} by {gap:g} in its logits")
    state = {k: v for k, v in ckpt.state.items() if k in ("step", "tokens_seen", "best_val", "elapsed_s")}
    path = save_checkpoint(args.dst, grown, ckpt.codec_config, controls=ckpt.controls,
                           state={**state, "grown_from": str(args.src), "extra_layers": args.extra})
    params = sum(p.numel() for p in grown.parameters())
    print(f"{path}: {grown.config.n_layer} layers, {params / 1e6:.2f} M parameters (largest logit gap {gap:.1e})")


if __name__ == "__main__":
    main()
