"""The musicgpt decoder: a GPT-2-style transformer with Music-Transformer relative attention.

One file, in the spirit of nanoGPT: a `ModelConfig`, named presets, the attention layer, the
model with a training `forward` and a KV-cached `decode_step` for sampling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from musicgpt import fast_attention
from musicgpt.errors import MusicGPTError

ATTENTION_KINDS = ("relative", "absolute")


@dataclass
class ModelConfig:
    """Sizes of the transformer; `attention="absolute"` is the learned-position ablation."""

    vocab_size: int = 390
    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 128
    mlp_dim: int = 512
    context_len: int = 256
    dropout: float = 0.1  # on embeddings, residual branches and the MLP
    attn_dropout: float | None = None  # on attention weights; None: the same as `dropout`
    max_rel_dist: int = 256
    attention: str = "relative"
    bias: bool = True

    def __post_init__(self) -> None:
        self._validate()

    @property
    def d_head(self) -> int:
        return self.n_embd // self.n_head

    @property
    def attention_dropout(self) -> float:
        """Dropout on the attention weights (`attn_dropout`, or `dropout` when unset)."""
        return self.dropout if self.attn_dropout is None else self.attn_dropout

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "") -> "ModelConfig":
        """Build a config from `to_dict()` output; `source` (e.g. a file name) prefixes errors."""
        prefix = f"{source}: " if source else ""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MusicGPTError(f"{prefix}unknown model config keys: {', '.join(unknown)}")
        try:
            return cls(**d)
        except MusicGPTError as e:
            raise MusicGPTError(f"{prefix}{e}") from None

    def _validate(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "mlp_dim", "context_len",
                     "max_rel_dist"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise MusicGPTError(f"model config: {name} must be a positive integer, "
                                    f"got {value!r}")
        if self.n_embd % self.n_head:
            raise MusicGPTError(f"model config: n_embd ({self.n_embd}) must be divisible by "
                                f"n_head ({self.n_head})")
        if self.attention not in ATTENTION_KINDS:
            kinds = ", ".join(ATTENTION_KINDS)
            raise MusicGPTError(f"model config: attention must be one of {kinds}, "
                                f"got {self.attention!r}")
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if name == "attn_dropout" and value is None:
                continue
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not 0.0 <= value < 1.0):
                raise MusicGPTError(f"model config: {name} must be in [0, 1), got {value!r}")
        if not isinstance(self.bias, bool):
            raise MusicGPTError(f"model config: bias must be true or false, got {self.bias!r}")


PRESETS: dict[str, ModelConfig] = {
    # Trains on a 2-core CPU in minutes.
    "tiny": ModelConfig(n_layer=3, n_head=4, n_embd=128, mlp_dim=512, context_len=256,
                        max_rel_dist=256),
    "small": ModelConfig(n_layer=4, n_head=8, n_embd=256, mlp_dim=1024, context_len=1024,
                         max_rel_dist=1024),
    # The Music Transformer piano model (Huang et al. 2018): 6 layers, 8 heads, width 512.
    "base": ModelConfig(n_layer=6, n_head=8, n_embd=512, mlp_dim=2048, context_len=2048,
                        max_rel_dist=2048),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A copy of preset `name` with some fields replaced, e.g. `preset("tiny", dropout=0.0)`."""
    if name not in PRESETS:
        raise MusicGPTError(f"unknown model preset {name!r} (choose from {', '.join(PRESETS)})")
    try:
        return dataclasses.replace(PRESETS[name], **overrides)
    except TypeError as e:  # an unknown field name
        raise MusicGPTError(f"model preset {name!r}: {e}") from None


# ----------------------------------------------------------------------------- attention core

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


class _Plan(NamedTuple):
    """What every layer needs for one call, computed once: masks and relative-distance indices."""

    mask: Tensor | None      # bool [Tq, Tk] or None
    is_causal: bool          # mask is None and the plain causal square applies
    rel_index: Tensor | None  # clipped distances [Tq, Tk] for the gather path (decode)
    need_weights: bool
    cache_slots: tuple[int, int, int] | None  # (write_at, first_key, end) in the KV cache
    block_mask: object | None = None  # a FlexAttention BlockMask: take the fused relative path
    triton: bool = False  # take musicgpt.triton_attention's fused causal kernel


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with optional learned relative-position logits.

    E_r (`rel_emb`) is learned per layer and per head, [n_head, max_rel_dist, d_head]: each head
    gets its own distance vocabulary (a beat-offset head, a previous-note head...). The cost is
    max_rel_dist * n_embd parameters per layer; compute is the same as one shared table.
    Distances past max_rel_dist - 1 use the furthest embedding (clipped), in `forward` and in
    `decode_step` alike, so a model still runs on sequences longer than it was trained on.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.attn_dropout = cfg.attention_dropout
        self.rel_emb = (nn.Parameter(torch.zeros(cfg.n_head, cfg.max_rel_dist, cfg.d_head))
                        if cfg.attention == "relative" else None)

    def forward(self, x: Tensor, plan: _Plan, cache: KVCache | None = None,
                layer: int = 0) -> tuple[Tensor, Tensor | None]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.d_head).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache._write(layer, k, v, plan.cache_slots)
        w = None
        if plan.triton:  # fused: the relative term is computed tile by tile in the kernel
            from musicgpt.triton_attention import relative_triton_attention

            y = relative_triton_attention(q, k, v, self.rel_emb)
        elif plan.block_mask is not None:  # fused: the relative term is added inside the kernel
            y = fast_attention.relative_flex_attention(q, k, v, self.rel_emb, plan.block_mask)
        else:
            y, w = self._attend(q, k, v, plan)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C))), w

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, plan: _Plan
                ) -> tuple[Tensor, Tensor | None]:
        """The eager path: relative logits by the skew (or a gather when decoding), then SDPA."""
        B = q.size(0)
        bias = None
        if self.rel_emb is not None:
            # Scale q once here so the bias is already in SDPA's 1/sqrt(D) units.
            qs = q * self.d_head ** -0.5
            if plan.rel_index is None:
                bias = relative_logits(qs, self.rel_emb)
            else:  # decode: queries against cached keys, pick E_r rows by distance directly
                qe = qs @ self.rel_emb.transpose(-1, -2)  # [B, H, Tq, R]
                bias = qe.gather(-1, plan.rel_index.expand(B, self.n_head, -1, -1))
        dropout_p = self.attn_dropout if self.training else 0.0
        return attend(q, k, v, plan.mask, bias, plan.is_causal, dropout_p, plan.need_weights)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_dim, bias=cfg.bias)
        self.out = nn.Linear(cfg.mlp_dim, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.out(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, plan: _Plan, cache: KVCache | None = None,
                layer: int = 0) -> tuple[Tensor, Tensor | None]:
        a, w = self.attn(self.ln1(x), plan, cache, layer)
        x = x + a
        return x + self.mlp(self.ln2(x)), w


# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """Keys and values of the most recent tokens for `MusicGPT.decode_step`, oldest first.

    Layout: one buffer [n_layer, B, n_head, capacity, d_head] each for keys and values, slots
    0..held-1 holding positions length-held .. length-1 in order. Capacity is the window plus
    some room; when a step does not fit, the newest window-1 keys move to the front (one copy
    every `room` tokens, so per-token cost stays flat) and a prefill chunk too large for the
    room grows the buffers. Keeping keys in time order (not a ring) keeps the returned
    attention rows readable and each step's keys one contiguous slice.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, d_head: int, window: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        if window <= 0:
            raise MusicGPTError(f"KV cache window must be positive, got {window}")
        self.window = window
        self.room = max(64, window // 4)
        shape = (n_layer, batch_size, n_head, window - 1 + self.room, d_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0  # tokens seen so far
        self.held = 0    # tokens whose keys are in slots [0, held)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def capacity(self) -> int:
        return self.k.size(3)

    def reorder(self, batch_indices: Tensor) -> None:
        """Row b becomes old row batch_indices[b] (beam search); the batch may grow or shrink."""
        idx = batch_indices.to(self.k.device)
        self.k = self.k.index_select(1, idx)
        self.v = self.v.index_select(1, idx)

    def _begin(self, n_new: int) -> tuple[int, int, int]:
        """Make room for n_new tokens; return (write_at, first_key, end) slots for this step."""
        if self.held + n_new > self.capacity:
            keep = min(self.held, self.window - 1)  # all the first new query can still see
            if keep + n_new > self.capacity:
                self._grow(keep + n_new + self.room)
            # clone: source and destination slices may overlap
            self.k[:, :, :, :keep] = self.k[:, :, :, self.held - keep:self.held].clone()
            self.v[:, :, :, :keep] = self.v[:, :, :, self.held - keep:self.held].clone()
            self.held = keep
        first = max(0, self.held - (self.window - 1))
        return self.held, first, self.held + n_new

    def _grow(self, capacity: int) -> None:
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:3], capacity, old.size(4))
            new[:, :, :, :self.held] = old[:, :, :, :self.held]
            setattr(self, name, new)

    def _write(self, layer: int, k: Tensor, v: Tensor,
               slots: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        """Store one layer's new keys/values; return the keys/values the new queries see."""
        write_at, first, end = slots
        self.k[layer, :, :, write_at:end] = k
        self.v[layer, :, :, write_at:end] = v
        return self.k[layer, :, :, first:end], self.v[layer, :, :, first:end]

    def _commit(self, n_new: int) -> None:
        self.held += n_new
        self.length += n_new


# ----------------------------------------------------------------------------- the model

def _decode_backends(device: torch.device):
    """SDPA backends for a KV-cache step: not cuDNN on CUDA, which builds a plan per new shape
    (pytorch#191576 measured tens of ms), and each step brings a new key length; elsewhere all."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


def _distances(offset: int, n_query: int, n_key: int, device: torch.device) -> Tensor:
    """[n_query, n_key] of query position minus key position, the first key `offset` back."""
    return (offset + torch.arange(n_query, device=device)[:, None]
            - torch.arange(n_key, device=device)[None, :])


def _band(dist: Tensor, window: int | None) -> Tensor:
    """Causal (0 <= dist) and, with a window, only the `window` most recent keys."""
    return (dist >= 0) & (dist < window) if window is not None else dist >= 0


class MusicGPT(nn.Module):
    """Decoder-only transformer over codec tokens, with tied input/output embeddings.

    `attn_impl` picks how `forward` computes relative attention: "auto" (the default) uses
    FlexAttention on CUDA for sequences longer than 2048 tokens unless attention-weight dropout is
    active (the measured crossover, `fast_attention.FLEX_MIN_LEN`), "eager" the skew + SDPA
    reference, "flex" forces FlexAttention, "triton" the fused Triton kernel (causal only: with
    `attn_window` it uses FlexAttention). A plain attribute, not saved with the weights;
    decode_step and return_attention always take the eager path.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = (nn.Embedding(config.context_len, config.n_embd)
                    if config.attention == "absolute" else None)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn_impl = "auto"
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) everywhere, residual output projections scaled down by
        1/sqrt(2 n_layer) so the residual stream's variance does not grow with depth."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=resid_std)
            nn.init.normal_(block.mlp.out.weight, std=resid_std)
            if block.attn.rel_emb is not None:
                nn.init.normal_(block.attn.rel_emb, std=0.02)

    def num_params(self) -> int:
        """Number of parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def _run_blocks(self, x: Tensor, plan: _Plan, cache: KVCache | None
                    ) -> tuple[Tensor, list[Tensor]]:
        attentions = []
        for i, block in enumerate(self.blocks):
            x, w = block(x, plan, cache, i)
            if w is not None:
                attentions.append(w)
        # Tied output embedding: logits reuse wte's weights (no separate lm_head parameter).
        return F.linear(self.ln_f(x), self.wte.weight), attentions

    def forward(self, idx: Tensor, targets: Tensor | None = None, *,
                attn_window: int | None = None, return_attention: bool = False):
        """Logits [B, T, V] and the cross-entropy loss (None without targets; -100 ignored).

        attn_window=W: each query sees only keys 0 <= i - j < W, the reference for
        sliding-window decoding. With return_attention, also a list per layer of [B, H, T, T]
        softmax weights.
        """
        T = idx.size(1)
        if attn_window is not None and attn_window <= 0:
            raise MusicGPTError(f"attention window must be positive, got {attn_window}")
        x = self.wte(idx)
        relative = self.wpe is None
        if not relative:
            if T > self.config.context_len:
                raise MusicGPTError(f"sequence of {T} tokens is longer than the absolute-attention "
                                    f"model's context of {self.config.context_len}")
            x = x + self.wpe(torch.arange(T, device=idx.device))
        if attn_window is not None and attn_window >= T:
            attn_window = None  # a window covering everything is plain causal attention
        attn_dropout = self.training and self.config.attention_dropout > 0
        kernel = (fast_attention.fused_kernel(self.attn_impl, idx.device, attn_dropout, T)
                  if relative and not return_attention else None)
        if kernel == "triton" and attn_window is None:
            plan = _Plan(None, False, None, False, None, triton=True)
        elif kernel is not None and fast_attention.flex_attention is not None:
            plan = _Plan(None, False, None, False, None,
                         fast_attention.causal_block_mask(T, attn_window, idx.device))
        elif relative or attn_window is not None:
            plan = _Plan(_band(_distances(0, T, T, idx.device), attn_window), False, None,
                         return_attention, None)
        else:
            plan = _Plan(None, True, None, return_attention, None)
        logits, attentions = self._run_blocks(self.drop(x), plan, None)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                   targets.reshape(-1), ignore_index=-100)
        return (logits, loss, attentions) if return_attention else (logits, loss)

    def new_cache(self, batch_size: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None, window: int | None = None) -> KVCache:
        """An empty KV cache for `decode_step`; device/dtype default to the model's weights'."""
        p = self.wte.weight
        return KVCache(self.config.n_layer, batch_size, self.config.n_head, self.config.d_head,
                       window if window is not None else self.config.context_len,
                       device or p.device, dtype or p.dtype)

    @torch.no_grad()
    def decode_step(self, idx_new: Tensor, cache: KVCache, return_attention: bool = False):
        """Logits [B, T_new, V] for tokens following those in `cache`, which it then holds.

        Equals `forward(all_tokens, attn_window=cache.window)` at these positions for any
        chunking. With return_attention also a list per layer of [B, H, T_new, T_keys] weights,
        whose key axis covers the last T_keys positions, ending at the newest token.
        """
        B, T = idx_new.shape
        if B != cache.batch_size:
            raise ValueError(f"batch of {B} does not match the cache's {cache.batch_size}")
        start = cache.length
        x = self.wte(idx_new)
        if self.wpe is not None:
            if start + T > self.config.context_len:
                raise MusicGPTError(f"absolute-attention model cannot decode past its context of "
                                    f"{self.config.context_len} tokens; recompute instead")
            x = x + self.wpe(torch.arange(start, start + T, device=idx_new.device))
        x = self.drop(x)
        slots = cache._begin(T)
        write_at, first, end = slots
        dist = _distances(write_at - first, T, end - first, idx_new.device)
        # A single new token sees exactly the keys kept for it, so it needs no mask.
        mask = _band(dist, cache.window) if T > 1 else None
        rel_index = None
        if self.wpe is None:
            rel_index = dist.clamp(0, self.config.max_rel_dist - 1)
        plan = _Plan(mask, False, rel_index, return_attention, slots)
        with _decode_backends(idx_new.device):
            logits, attentions = self._run_blocks(x, plan, cache)
        cache._commit(T)
        return (logits, attentions) if return_attention else logits
