"""The eager relative attention: the Music Transformer's skew, then PyTorch's SDPA.

This is the reference every fused kernel is tested against, the CPU path, and the only path that
can return the softmax weights (for the attention plots).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel


def relative_logits(q: Tensor, rel_emb: Tensor) -> Tensor:
    """S_rel[b, h, i, j] = q[b, h, i] . rel_emb[h, min(i - j, R - 1)] for j <= i, via the skew.

    q: [B, H, T, D]; rel_emb: [H, R, D], row r embeds distance r. Entries above the diagonal
    are junk and must be masked by the caller.
    """
    T = q.size(-2)
    # Column c of qe holds distance T-1-c (clipped to the furthest embedding, R-1), so that
    # row i lists distances T-1 ... 0 left to right, the order the skew expects.
    dist = (T - 1 - torch.arange(T, device=q.device)).clamp_(max=rel_emb.size(1) - 1)
    qe = q @ rel_emb[:, dist].transpose(-1, -2)  # [B, H, T, T]
    # The skew turns "column = distance" into "column = key position" without a gather.
    # Example T=3, row i holds q_i.E[d] as i_d, columns are distances 2,1,0:
    #
    #   qe          pad one column left    reshape to (T+1) x T     drop the first row
    #   a2 a1 a0    0 a2 a1 a0             0  a2 a1                 a0 .  .
    #   b2 b1 b0    0 b2 b1 b0             a0 0  b2                 b1 b0 .
    #   c2 c1 c0    0 c2 c1 c0             b1 b0 0                  c2 c1 c0
    #                                      c2 c1 c0
    #
    # Now entry [i, j] is q_i.E[i - j] for every j <= i; "." marks junk above the diagonal.
    B, H = qe.shape[:2]
    return F.pad(qe, (1, 0)).reshape(B, H, T + 1, T)[:, :, 1:]


def relative_bias(q: Tensor, rel_emb: Tensor, rel_index: Tensor | None = None) -> Tensor:
    """The relative logits in SDPA's units (q scaled by 1/sqrt(D)): by the skew over a whole
    sequence, or, when decoding against cached keys, by picking rows of q E_r^T at `rel_index`
    ([Tq, Tk] clipped distances)."""
    qs = q * q.size(-1) ** -0.5
    if rel_index is None:
        return relative_logits(qs, rel_emb)
    qe = qs @ rel_emb.transpose(-1, -2)  # [B, H, Tq, R]
    return qe.gather(-1, rel_index.expand(*q.shape[:2], -1, -1))


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None,
           is_causal: bool, dropout_p: float, need_weights: bool) -> tuple[Tensor, Tensor | None]:
    """softmax(q k^T / sqrt(D) + bias, restricted to `mask`) @ v; also the weights if asked.

    mask: bool [Tq, Tk], True where a query may see a key (None: all keys, or the plain
    causal square when `is_causal`); bias: additive logits [B, H, Tq, Tk] or None.
    """
    if bias is not None and mask is not None:
        bias = bias.masked_fill(~mask, float("-inf"))  # keeps the dtype SDPA wants
        mask = None
    if not need_weights:
        # Fused kernels: the softmax weights are never materialised here.
        attn_mask = bias if bias is not None else mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                           is_causal=is_causal and attn_mask is None)
        return y, None
    scores = (q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5
    if bias is not None:
        scores = scores + bias
    if is_causal and mask is None and bias is None:
        Tq, Tk = scores.shape[-2:]
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril_()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return F.dropout(weights, dropout_p) @ v, weights


def decode_backends(device: torch.device):
    """SDPA backends for a growing-cache step: not cuDNN on CUDA, which builds a plan per new
    shape (pytorch#191576 measured tens of ms), and each step brings a new key length."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])
