"""Relative attention as a FlexAttention kernel, for training on long sequences on a GPU.

`relative_flex_attention` adds the Music-Transformer term inside a FlexAttention kernel.
The relative logits are precomputed per query and distance, R = (q / sqrt(D)) E_r^T of shape
[B, H, T, min(T, max_rel_dist)], and a `score_mod` gathers R[b, h, i, min(i - j, R - 1)]: no
bias indexed by key position, skew copy or mask is built, the BlockMask skips the tiles above the
diagonal, and SDPA's fallback to its non-flash kernels for a float mask is avoided.
`musicgpt.attention.eager` keeps the skew as the reference and the CPU path.
"""

from __future__ import annotations

from functools import cache, lru_cache

import torch
from torch import Tensor

try:  # FlexAttention arrived in torch 2.5; older versions keep the eager path.
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the installed torch
    create_block_mask = flex_attention = None

# Shortest sequence for which "auto" takes FlexAttention: below it the eager skew measured faster
# on an H200 with about the same memory (BENCHMARKS.md, "Attention kernels").
FLEX_MIN_LEN = 2049


@lru_cache(maxsize=16)
def _block_mask(n: int, window: int | None, device: str):
    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    def banded(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return create_block_mask(causal if window is None else banded, None, None, n, n,
                             device=device)


def causal_block_mask(n: int, window: int | None, device: torch.device):
    """The BlockMask of causal attention over n tokens, or of the `window` most recent keys.

    Cached: one forward builds it once for all layers and a training run once in total.
    """
    return _block_mask(n, window, str(device))


@cache
def _compiled_flex():
    # One compiled wrapper for the process; torch.compile specialises it per shape itself.
    return torch.compile(flex_attention)


def relative_flex_attention(q: Tensor, k: Tensor, v: Tensor, rel_emb: Tensor, block_mask,
                            compiled: bool | None = None) -> Tensor:
    """softmax(q k^T / sqrt(D) + S_rel) v under `block_mask`, with S_rel added in the kernel.

    q, k, v: [B, H, T, D]; rel_emb: [H, R, D], row r embeds distance r (distances past R - 1 use
    row R - 1, as `eager.relative_logits`). Gradients reach q, k, v and rel_emb (through the
    captured R, whose gradient FlexAttention accumulates in fp32). compiled: use the fused
    torch.compile kernel (default on CUDA); the uncompiled call is FlexAttention's unfused
    reference, which materialises the scores and is meant for CPU correctness tests.
    """
    n_rel = min(q.size(-2), rel_emb.size(1))  # distances >= T never occur
    rel = (q * q.size(-1) ** -0.5) @ rel_emb[:, :n_rel].transpose(-1, -2)

    def add_relative(score, b, h, q_idx, kv_idx):
        # Clamp below too: the kernel also scores masked entries (kv_idx > q_idx) of partly
        # masked blocks, and an out-of-range gather there would read out of bounds.
        return score + rel[b, h, q_idx, torch.clamp(q_idx - kv_idx, 0, n_rel - 1)]

    if compiled is None:
        compiled = q.device.type == "cuda"
    kernel = _compiled_flex() if compiled else flex_attention
    return kernel(q, k, v, score_mod=add_relative, block_mask=block_mask)
