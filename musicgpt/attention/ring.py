"""Attention against a ring of past keys held outside the model: the kernels of the exported step.

An exported decoding step (`musicgpt.onnx_export`) is a pure function: the caller owns the key
and value buffers and passes them in, and the graph returns only the new tokens' keys and
values, which the caller writes into its ring. Copying whole caches in and out of a graph every
token would cost more than the model. Each kernel here is both the `KeyValueCache` and the
`AttentionPlan` that `MusicGPT.run_blocks` calls, so the exported graph runs the model's own
layers and only the attention arithmetic is laid out for the ring.

The ring keeps the last R = window - 1 positions, position p in slot p % R, per layer: keys
transposed [B, H, D, R] (a query times them is one matrix product, no transpose per token) and
values [B, H, R, D]. The new token attends to the ring plus itself: `window` keys, as
`MusicGPT.forward(..., attn_window=window)` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def ring_positions(pos: Tensor, slots: int) -> Tensor:
    """The position held by each ring slot before position `pos` is written ([slots]; negative:
    never written)."""
    s = torch.arange(slots, device=pos.device)
    return pos - 1 - torch.remainder(pos - 1 - s, slots)


class RingKernel:
    """What both kernels share: the ring `past` (k0, v0, k1, v1, ...) and the new keys/values
    [B, H, T, D] each layer hands over, which become the graph's outputs."""

    def __init__(self, past: Sequence[Tensor], slots: int):
        self.past, self.slots, self.new = past, slots, []
        self.layer = 0

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Keep the new keys/values as outputs; the attention reads the ring itself."""
        self.layer = layer
        self.new += [k, v]
        return k, v

    def ring(self) -> tuple[Tensor, Tensor]:
        """This layer's ring keys [B, H, D, R] and values [B, H, R, D]."""
        return self.past[2 * self.layer], self.past[2 * self.layer + 1]


class RingStep(RingKernel):
    """One new token per row at position `pos`, against the ring `past` (k0, v0, k1, v1, ...).

    The relative term needs no gather: the distances of the slots, read in slot order, are the
    distances R .. 1 rotated by pos, so the per-distance logits are built in that order once and
    rotated with two slices.
    """

    def __init__(self, pos: Tensor, past: Sequence[Tensor], slots: int, d_head: int):
        # Sizes come in as numbers, not read off tensors, so a traced graph holds them as constants.
        super().__init__(past, slots)
        self.scale = d_head ** -0.5
        unwritten = ring_positions(pos, slots) < 0
        self.hidden = torch.where(unwritten, float("-inf"), 0.0)  # [R]: only before R tokens
        self.cut = slots - 1 - torch.remainder(pos - 1, slots)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, rel_emb: Tensor | None,
               dropout_p: float = 0.0) -> tuple[Tensor, None]:
        keys, values = self.ring()
        R = self.slots
        q = q * self.scale
        far = min(rel_emb.size(1) - 1, R)  # distances >= far share the last embedding
        # Embeddings of the distances far, far-1, ..., 1; all distances from R down to far use
        # the first, so the logits of distances R .. 1 are that one repeated, then the rest.
        table = torch.cat([rel_emb[:, far:far + 1], rel_emb[:, 1:far].flip(1)], 1)
        by_distance = q @ table.transpose(-1, -2)  # [B, H, 1, far]
        by_distance = torch.cat([by_distance[..., :1].expand(-1, -1, -1, R - far + 1),
                                 by_distance[..., 1:]], -1)  # distances R .. 1
        bias = torch.cat([by_distance[..., self.cut:], by_distance[..., :self.cut]], -1)
        scores_ring = q @ keys + bias + self.hidden
        scores_self = (q * (k + rel_emb[:, :1])).sum(-1, keepdim=True)  # distance 0
        w = torch.cat([scores_ring, scores_self], -1).softmax(-1)
        return w[..., :R] @ values + w[..., R:] * v, None


class RingChunk(RingKernel):
    """T new tokens per row at positions pos .. pos+T-1 (T < window), against the ring `past`:
    the prefill kernel. The ring is rotated into position order (oldest first) and the new keys
    appended, so every query row sees keys at consecutive distances and the relative logits
    come from the Music Transformer's skew instead of a gather over a [T, R + T] index."""

    def __init__(self, pos: Tensor, past: Sequence[Tensor], slots: int, n_new: int, max_rel_dist: int):
        super().__init__(past, slots)
        R, T = slots, n_new
        self.n_new, self.far = T, min(max_rel_dist - 1, R)
        self.oldest = torch.remainder(pos, R)  # the slot holding position pos - R
        # Key j holds position pos - R + j, so query i sees it at distance R + i - j.
        key = torch.arange(R + T, device=pos.device)
        offset = key[None, :] - torch.arange(T, device=pos.device)[:, None]
        visible = (offset >= 0) & (offset <= R) & (pos - R + key >= 0)[None, :]
        self.hidden = torch.where(visible, 0.0, float("-inf"))  # [T, R + T]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, rel_emb: Tensor | None,
               dropout_p: float = 0.0) -> tuple[Tensor, None]:
        keys, values = self.ring()
        R, T, far, cut = self.slots, self.n_new, self.far, self.oldest
        keys = torch.cat([keys[..., cut:], keys[..., :cut], k.transpose(-1, -2)], -1)  # [B, H, D, R + T]
        values = torch.cat([values[:, :, cut:], values[:, :, :cut], v], 2)
        q = q * q.size(-1) ** -0.5
        # Column c = j - i of the widened `by_distance` holds distance R - c: distances R .. far+1
        # share the furthest embedding, then far .. 0.
        by_distance = q @ rel_emb[:, :far + 1].flip(1).transpose(-1, -2)  # [B, H, T, far + 1]: far .. 0
        if far < R:  # (an empty expand would not export: ONNX Runtime broadcasts 1 against 0 to 1)
            by_distance = torch.cat([by_distance[..., :1].expand(-1, -1, -1, R - far), by_distance], -1)
        # The skew: shift row i right by i (pad T columns, flatten, re-cut rows one shorter), so
        # entry [i, j] is by_distance[i, j - i] for 0 <= j - i <= R; the rest is masked.
        B, H = q.shape[:2]
        flat = torch.cat([by_distance, by_distance.new_zeros(B, H, T, T)], -1).reshape(B, H, -1)
        bias = flat[..., :T * (R + T)].reshape(B, H, T, R + T)
        w = (q @ keys + bias + self.hidden).softmax(-1)
        return w @ values, None
