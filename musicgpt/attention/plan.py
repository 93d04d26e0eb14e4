"""Which kernel computes attention for one model call, and the masks it needs: `AttentionPlan`.

A plan is built once per call (by `MusicGPT` or a decoder) and shared by every layer:
`AttentionPlan.eager(...)` runs the skew + SDPA with a boolean mask or the plain causal square,
`.flex(block_mask)` the FlexAttention kernel, `.triton()` the fused Triton kernel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from musicgpt.attention import eager, flex
from musicgpt.errors import MusicGPTError

IMPLS = ("auto", "eager", "flex", "triton")  # the kernels a user may ask `MusicGPT` for


@dataclass(frozen=True)
class AttentionPlan:
    """One choice of attention kernel with what it needs; build it with a named constructor."""

    kernel: str  # "eager", "flex" or "triton"
    mask: Tensor | None = None  # eager: bool [Tq, Tk], True where a query may see a key
    causal: bool = False  # eager: no mask tensor, the plain causal square
    rel_index: Tensor | None = None  # eager, decoding: clipped distances [Tq, Tk] to gather by
    need_weights: bool = False  # eager: also return the softmax weights
    block_mask: object | None = None  # flex: a FlexAttention BlockMask

    @classmethod
    def eager(cls, mask: Tensor | None = None, *, causal: bool = False,
              rel_index: Tensor | None = None, need_weights: bool = False) -> AttentionPlan:
        """The skew (or, with `rel_index`, a gather) and SDPA; `mask` None with `causal` False
        lets every query see every key (one token decoding against exactly its window)."""
        return cls("eager", mask, causal, rel_index, need_weights)

    @classmethod
    def flex(cls, block_mask) -> AttentionPlan:
        """FlexAttention under `block_mask` (`flex.causal_block_mask`), relative term in-kernel."""
        return cls("flex", block_mask=block_mask)

    @classmethod
    def triton(cls) -> AttentionPlan:
        """The fused Triton kernel: causal over the whole sequence, no window."""
        return cls("triton")

    def attend(self, q: Tensor, k: Tensor, v: Tensor, rel_emb: Tensor | None,
               dropout_p: float) -> tuple[Tensor, Tensor | None]:
        """Attention output [B, H, Tq, D] and, for an eager plan that needs them, the weights.

        rel_emb: [H, R, D] relative embeddings, or None for plain (absolute-position) attention.
        Only the eager kernel applies attention-weight dropout.
        """
        if self.kernel == "triton":
            from musicgpt.attention import triton_kernel  # imports Triton: only when asked for

            return triton_kernel.relative_triton_attention(q, k, v, rel_emb), None
        if self.kernel == "flex":
            return flex.relative_flex_attention(q, k, v, rel_emb, self.block_mask), None
        bias = None if rel_emb is None else eager.relative_bias(q, rel_emb, self.rel_index)
        return eager.attend(q, k, v, self.mask, bias, self.causal, dropout_p, self.need_weights)


def distances(offset: int, n_query: int, n_key: int, device: torch.device) -> Tensor:
    """[n_query, n_key] of query position minus key position, the first key `offset` back."""
    return (offset + torch.arange(n_query, device=device)[:, None]
            - torch.arange(n_key, device=device)[None, :])


def band(dist: Tensor, window: int | None) -> Tensor:
    """Causal (0 <= dist) and, with a window, only the `window` most recent keys."""
    return (dist >= 0) & (dist < window) if window is not None else dist >= 0


def choose_kernel(impl: str, device: torch.device, attn_dropout: bool, seq_len: int) -> str:
    """The kernel for a full-sequence relative forward over `seq_len` tokens: "eager", "flex" or
    "triton" (musicgpt.attention.triton_kernel).

    "auto" picks FlexAttention on CUDA for sequences of at least `flex.FLEX_MIN_LEN` tokens,
    unless attention-weight dropout is active: the fused kernels have no dropout, so auto never
    silently changes the regularisation. "flex" and "triton" force their kernel (attention-weight
    dropout is then skipped; residual, MLP and embedding dropout still apply); "eager" never
    fuses. The Triton kernel is opt-in until its GPU figures are in BENCHMARKS.md.
    """
    if impl not in IMPLS:
        raise MusicGPTError(f"attention implementation must be one of {', '.join(IMPLS)}, "
                            f"got {impl!r}")
    if impl == "triton":
        from musicgpt.attention import triton_kernel

        if not triton_kernel.available():
            raise MusicGPTError("attention implementation 'triton' needs Triton >= 3.2 installed")
        if device.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
            raise MusicGPTError("attention implementation 'triton' runs on CUDA (or on CPU under "
                                "TRITON_INTERPRET=1, for tests)")
        return "triton"
    if impl == "eager" or flex.flex_attention is None:
        if impl == "flex":
            raise MusicGPTError(f"attention implementation 'flex' needs torch >= 2.5 "
                                f"(FlexAttention), found {torch.__version__}")
        return "eager"
    long_enough = seq_len >= flex.FLEX_MIN_LEN
    if impl == "flex" or (device.type == "cuda" and not attn_dropout and long_enough):
        return "flex"
    return "eager"


def sequence_plan(impl: str, seq_len: int, device: torch.device, *, relative: bool,
                  window: int | None, attn_dropout: bool, need_weights: bool) -> AttentionPlan:
    """The plan for a forward over a whole sequence: `impl` as `choose_kernel` reads it, causal,
    and with a window each query sees only its `window` most recent keys. A plan that must
    return the weights, or one for absolute attention, stays eager."""
    kernel = "eager"
    if relative and not need_weights:
        kernel = choose_kernel(impl, device, attn_dropout, seq_len)
    if kernel == "triton" and window is None:
        return AttentionPlan.triton()
    if kernel != "eager" and flex.flex_attention is not None:  # flex, or triton with a window
        return AttentionPlan.flex(flex.causal_block_mask(seq_len, window, device))
    if relative or window is not None:
        return AttentionPlan.eager(band(distances(0, seq_len, seq_len, device), window),
                                   need_weights=need_weights)
    return AttentionPlan.eager(causal=True, need_weights=need_weights)
