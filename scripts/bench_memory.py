"""Activation memory each attention kernel keeps for the backward pass, counted, not timed.

Training memory past the weights and optimiser is mostly what autograd saves between the forward
and the backward. This counts it exactly: every tensor saved for the backward during one forward
(torch.autograd.graph.saved_tensors_hooks), each storage once, parameters left out. The models
run on PyTorch's "meta" device, where every op computes shapes only, so the count for `base` at
8192 tokens takes seconds on any machine and does not depend on it, and the Triton kernel (whose
custom operator has a shape-only version) is counted without a GPU. On meta SDPA always takes
its unfused math path, so plain causal SDPA (the baseline) is routed to the flash op, which saves
what CUDA's flash kernel saves (q, k, v, output, log-sum-exp); the eager skew's SDPA with a bias
stays on the math path, as on CPU (on CUDA the efficient-attention kernel saves less: the bias,
not the probabilities). FlexAttention and the peer refuse meta tensors (the GPU tables measure
them). Weights are bf16 here (on the GPU, autocast keeps fp32 weights and saves bf16 copies).

    python scripts/bench_memory.py --preset base --seq-lens 1024,2048,4096,8192
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the model pick "triton" off CUDA
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_attention  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from musicgpt.attention import AttentionPlan  # noqa: E402
from musicgpt.model import CausalSelfAttention, MusicGPT  # noqa: E402

VARIANTS = ("sdpa", "triton", "eager")
META = torch.device("meta")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="base")
    p.add_argument("--seq-lens", default="1024,2048,4096,8192")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--scopes", default="model,layer", help="comma list of model, layer")
    args = p.parse_args(argv)
    args.dropout, args.dtype = 0.0, "bf16"  # what bench_attention's builders read
    return args


@contextlib.contextmanager
def sdpa_as_flash():
    """Route the model's causal SDPA calls to the flash op (meta would decompose them)."""
    original = F.scaled_dot_product_attention

    def flash(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        if attn_mask is not None or dropout_p:
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                            is_causal=is_causal, **kw)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, is_causal=is_causal)[0]

    F.scaled_dot_product_attention = flash  # model.py looks it up on each call
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def saved_mib(run, params) -> float:
    """MiB of distinct storages autograd saves while `run()` runs its forward, params excluded."""
    skip = {p.untyped_storage()._cdata for p in params}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            saved[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(saved.values()) / 2**20


def workload(args, variant: str, scope: str, n: int):
    """The loss of one forward of `variant` on meta tensors, and the modules it trains."""
    cfg = bench_attention.model_config(args, variant, n)
    B = args.batch_size
    if scope == "layer":
        module = CausalSelfAttention(cfg).to(META, torch.bfloat16)
        x = torch.randn(B, n, cfg.n_embd, device=META, dtype=torch.bfloat16, requires_grad=True)
        causal = torch.ones(n, n, dtype=torch.bool, device=META).tril_()
        plan = {"sdpa": AttentionPlan.eager(causal=True),
                "eager": AttentionPlan.eager(causal),
                "triton": AttentionPlan.triton()}[variant]
        return lambda: module(x, plan)[0].float().square().mean(), module
    module = MusicGPT(cfg).to(META, torch.bfloat16)
    module.attn_impl = "eager" if variant == "sdpa" else variant
    idx = torch.zeros(B, n + 1, dtype=torch.long, device=META)
    return lambda: module(idx[:, :-1], idx[:, 1:]).loss, module


def count(args, variant: str, scope: str, n: int) -> float | None:
    if variant == "triton":
        from musicgpt.attention import triton_kernel

        if not triton_kernel.available():
            return None
    run, module = workload(args, variant, scope, n)
    with sdpa_as_flash():
        return saved_mib(run, list(module.parameters()))


def main(argv=None) -> None:
    args = parse_args(argv)
    lens = [int(n) for n in args.seq_lens.split(",")]
    variants = args.variants.split(",")
    names = {"sdpa": "plain causal flash", "triton": "Triton kernel",
             "eager": "eager skew (math SDPA)"}
    print(f"Preset `{args.preset}`, batch {args.batch_size}, bf16, counted on the meta device "
          f"(torch {torch.__version__}).\n")
    for scope in args.scopes.split(","):
        what = "whole model" if scope == "model" else "one attention layer"
        print(f"Saved for the backward, {what}, MiB (x plain causal flash):\n")
        print("| L | " + " | ".join(names.get(v, v) for v in variants) + " |")
        print("|---:|" + "---:|" * len(variants))
        for n in lens:
            mib = {v: count(args, v, scope, n) for v in variants}
            base = mib.get("sdpa")
            cells = ["n/a" if m is None else f"{m:,.0f}" + (f" ({m / base:.2f}x)" if base else "")
                     for m in mib.values()]
            print(f"| {n} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
