"""GPU fast paths: fused relative attention (FlexAttention) and graph-replayed one-token decoding.

Training: `relative_flex_attention` adds the Music-Transformer term inside a FlexAttention kernel.
The relative logits are precomputed per query and distance, R = (q / sqrt(D)) E_r^T of shape
[B, H, T, min(T, max_rel_dist)], and a `score_mod` gathers R[b, h, i, min(i - j, R - 1)]: no
bias indexed by key position, skew copy or mask is built, the BlockMask skips the tiles above the
diagonal, and SDPA's fallback to its non-flash kernels for a float mask is avoided.
Sampling: `GraphDecoder` runs the one-token decode step on fixed-shape buffers (a ring KV cache)
and replays it as one CUDA graph, since batch-1 sampling on a GPU is bound by kernel launches.
`musicgpt.model` keeps the eager skew as the reference and the CPU path.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
from torch import Tensor

from musicgpt.errors import MusicGPTError

try:  # FlexAttention arrived in torch 2.5; older versions keep the eager path.
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the installed torch
    create_block_mask = flex_attention = None

IMPLS = ("auto", "eager", "flex", "triton")


# Shortest sequence for which "auto" takes FlexAttention. Measured on an H200 (base preset, bf16,
# whole model forward + backward, BENCHMARKS.md "Attention kernels"): the eager skew was faster at
# 1024 and 2048 tokens (0.59x / 0.54x of flash SDPA against FlexAttention's 0.46x / 0.45x) with
# about the same memory; from 4096 on FlexAttention wins (0.21x vs 0.16x, and 2.9x vs 4.5x memory;
# at 8192 0.13x vs 0.08x and 3.0x vs 8.5x), as the skew's L x L tensors grow.
FLEX_MIN_LEN = 2049


def fused_kernel(impl: str, device: torch.device, attn_dropout: bool, seq_len: int) -> str | None:
    """Which fused kernel runs the full-sequence relative forward over `seq_len` tokens: "flex",
    "triton" (musicgpt.triton_attention) or None for the eager skew.

    "auto" picks FlexAttention on CUDA for sequences of at least FLEX_MIN_LEN tokens, unless
    attention-weight dropout is active: the fused kernels have no dropout, so auto never silently
    changes the regularisation. "flex" and "triton" force their kernel (attention-weight dropout is
    then skipped; residual, MLP and embedding dropout still apply); "eager" never fuses. The Triton
    kernel is opt-in until it is measured on a GPU.
    """
    if impl not in IMPLS:
        raise MusicGPTError(f"attention implementation must be one of {', '.join(IMPLS)}, "
                            f"got {impl!r}")
    if impl == "triton":
        from musicgpt import triton_attention

        if not triton_attention.available():
            raise MusicGPTError("attention implementation 'triton' needs Triton >= 3.2 installed")
        if device.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
            raise MusicGPTError("attention implementation 'triton' runs on CUDA (or on CPU under "
                                "TRITON_INTERPRET=1, for tests)")
        return "triton"
    if impl == "eager" or flex_attention is None:
        if impl == "flex":
            raise MusicGPTError(f"attention implementation 'flex' needs torch >= 2.5 "
                                f"(FlexAttention), found {torch.__version__}")
        return None
    if impl == "flex" or (device.type == "cuda" and not attn_dropout and seq_len >= FLEX_MIN_LEN):
        return "flex"
    return None


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


@lru_cache(maxsize=None)
def _compiled_flex():
    # One compiled wrapper for the process; torch.compile specialises it per shape itself.
    return torch.compile(flex_attention)


def relative_flex_attention(q: Tensor, k: Tensor, v: Tensor, rel_emb: Tensor, block_mask,
                            compiled: bool | None = None) -> Tensor:
    """softmax(q k^T / sqrt(D) + S_rel) v under `block_mask`, with S_rel added in the kernel.

    q, k, v: [B, H, T, D]; rel_emb: [H, R, D], row r embeds distance r (distances past R - 1 use
    row R - 1, as `model.relative_logits`). Gradients reach q, k, v and rel_emb (through the
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


# ----------------------------------------------------------------------------- graph decoding

class RingKVCache:
    """Keys and values of the last `window` positions in fixed buffers, position p in slot p % W.

    Same role as `model.KVCache`, but every step touches the same shapes and addresses (the
    write slot and the token count live on the device), which is what a CUDA graph needs.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, d_head: int, window: int,
                 device: torch.device, dtype: torch.dtype):
        if window <= 0:
            raise MusicGPTError(f"KV cache window must be positive, got {window}")
        self.window = window
        self.k = torch.zeros(n_layer, batch_size, n_head, window, d_head, device=device,
                             dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # tokens seen so far

    def reorder(self, rows: Tensor) -> None:
        """Row b becomes old row rows[b] (beam search), in place: the graph keeps its buffers."""
        if rows.numel() != self.k.size(1):
            raise ValueError(f"a fixed-shape cache keeps {self.k.size(1)} rows, got {rows.numel()}")
        rows = rows.to(self.k.device)
        self.k.copy_(self.k.index_select(1, rows))
        self.v.copy_(self.v.index_select(1, rows))

    def _write(self, layer: int, k: Tensor, v: Tensor, slot: Tensor) -> tuple[Tensor, Tensor]:
        """Store one layer's new key/value at `slot` ([1] long) and return all slots (the mask
        hides empty ones); `CausalSelfAttention` calls it as it calls KVCache._write."""
        self.k[layer].index_copy_(2, slot, k)
        self.v[layer].index_copy_(2, slot, v)
        return self.k[layer], self.v[layer]


class GraphDecoder:
    """Sampling steps of a relative-attention `MusicGPT`, one token per row, as one CUDA graph.

    `prefill(prompt)` then `step(token)` repeatedly; each returns logits [B, V] for the next token
    and equals `model.forward(all_tokens, attn_window=window)` there. graph=None captures a CUDA
    graph on CUDA and runs the same fixed-shape step eagerly elsewhere (what the CPU tests check).
    """

    def __init__(self, model, batch_size: int = 1, window: int | None = None,
                 graph: bool | None = None):
        if model.config.attention != "relative":
            raise MusicGPTError("graph decoding needs a relative-attention model (absolute "
                                "positions cannot slide past the context)")
        if model.training:
            raise ValueError("GraphDecoder needs a model in eval mode (call model.eval())")
        self.model = model
        cfg, p = model.config, model.wte.weight
        self.window = window if window is not None else cfg.context_len
        self.cache = RingKVCache(cfg.n_layer, batch_size, cfg.n_head, cfg.d_head, self.window,
                                 p.device, p.dtype)
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=p.device)
        self.logits = torch.zeros(batch_size, cfg.vocab_size, device=p.device, dtype=p.dtype)
        self._slots = torch.arange(self.window, device=p.device)
        self.graph = None
        if graph if graph is not None else p.device.type == "cuda":
            self._capture()

    @torch.no_grad()
    def _step(self) -> None:
        """Feed self.token at position cache.pos; write the logits into self.logits. Tensor ops
        on fixed buffers only: no host sync, no shape that depends on the position."""
        from musicgpt.model import _Plan  # model.py imports this module

        model, cache, W = self.model, self.cache, self.window
        dist = (cache.pos - self._slots) % W  # how far back each slot's key is
        plan = _Plan(mask=(dist <= cache.pos)[None], is_causal=False,  # hide unwritten slots
                     rel_index=dist.clamp(max=model.config.max_rel_dist - 1)[None],
                     need_weights=False, cache_slots=(cache.pos % W).view(1))
        logits, _ = model._run_blocks(model.drop(model.wte(self.token)), plan, cache)
        self.logits.copy_(logits[:, -1])
        cache.pos.add_(1)

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: library handles and kernel choices settle
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        self.cache.k.zero_()  # the warm-up wrote real steps; start clean
        self.cache.v.zero_()
        self.cache.pos.zero_()

    @torch.no_grad()
    def prefill(self, prompt: Tensor) -> Tensor:
        """Encode `prompt` [B, P] (or [1, P], shared by every row) with the model's ordinary
        KV-cached decode and load the keys the next token can see into the ring; logits [B', V]
        for the token after the prompt, B' = the prompt's rows."""
        B, P = prompt.shape
        if P == 0 or B not in (1, self.cache.k.size(1)):
            raise ValueError(f"prompt of shape {tuple(prompt.shape)} does not fit a decoder "
                             f"for batch {self.cache.k.size(1)} (at least one token per row)")
        cache = self.model.new_cache(B, window=self.window)
        for chunk in prompt.split(self.window, dim=1):
            logits = self.model.decode_step(chunk, cache)
        n = min(cache.held, self.window - 1)  # positions P-n .. P-1
        slots = torch.arange(P - n, P, device=prompt.device) % self.window
        ring = self.cache
        for mine, theirs in ((ring.k, cache.k), (ring.v, cache.v)):
            mine.zero_()
            mine[:, :, :, slots] = theirs[:, :, :, cache.held - n:cache.held]  # rows broadcast
        ring.pos.fill_(P)
        return logits[:, -1]

    def reorder(self, rows: Tensor) -> None:
        """Row b continues old row rows[b] (beam search); the number of rows stays the same."""
        self.cache.reorder(rows)

    def step(self, token: Tensor) -> Tensor:
        """Logits [B, V] for the token after `token` [B] (a copy, not the graph's buffer)."""
        self.token.copy_(token.view(-1, 1))
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        return self.logits.clone()
