"""The musicgpt decoder: a GPT-2-style transformer with Music-Transformer relative attention.

One file, in the spirit of nanoGPT: the attention layer and the model, with a training `forward`
and a KV-cached `decode_step` for sampling. The configuration (`ModelConfig`, its size limits and
the named presets) lives in `musicgpt.model_config`, which needs no torch, and is re-exported here.
The attention kernels and caches live in `musicgpt.attention`; this file chooses a plan per call
and runs the layers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from musicgpt.attention import AttentionPlan, KeyValueCache, KVCache
from musicgpt.attention.eager import decode_backends
from musicgpt.attention.plan import band, distances, sequence_plan
from musicgpt.controls import Controls
from musicgpt.errors import MusicGPTError
from musicgpt.keyboard import CLEAR, KEY_FEATURES, LIFT, MAX_AGE_S, MIDDLE, PRESS, SUFFIX, WAIT, key_table
from musicgpt.model_config import (
    ATTENTION_KINDS,
    MAX_CONTEXT,
    MAX_EMBD,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_MLP_DIM,
    MAX_PARAMS,
    MAX_VOCAB,
    PRESETS,
    SIZE_LIMITS,
    ModelConfig,
    preset,
)
from musicgpt.vocab import NOTE_OFF, NUM_PITCHES

__all__ = [
    "CausalSelfAttention", "MLP", "Block", "KeyboardInput", "ModelOutput", "MusicGPT",
    # The configuration, from musicgpt.model_config, so that `from musicgpt.model import ...` finds it.
    "ModelConfig", "preset", "PRESETS", "ATTENTION_KINDS", "SIZE_LIMITS", "MAX_LAYERS", "MAX_HEADS",
    "MAX_EMBD", "MAX_MLP_DIM", "MAX_CONTEXT", "MAX_VOCAB", "MAX_PARAMS",
]


# ----------------------------------------------------------------------------- layers

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
        self.attn_dropout = cfg.attn_dropout
        self.rel_emb = (nn.Parameter(torch.zeros(cfg.n_head, cfg.max_rel_dist, cfg.d_head))
                        if cfg.attention == "relative" else None)

    def forward(self, x: Tensor, plan: AttentionPlan, cache: KeyValueCache | None = None,
                layer: int = 0) -> tuple[Tensor, Tensor | None]:
        """Output [B, T, C] and the attention weights when the plan asks for them."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.d_head).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.write(layer, k, v)
        dropout_p = self.attn_dropout if self.training else 0.0
        y, w = plan.attend(q, k, v, self.rel_emb, dropout_p)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C))), w


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

    def forward(self, x: Tensor, plan: AttentionPlan, cache: KeyValueCache | None = None,
                layer: int = 0) -> tuple[Tensor, Tensor | None]:
        a, w = self.attn(self.ln1(x), plan, cache, layer)
        x = x + a
        return x + self.mlp(self.ln2(x)), w


# The logit offset of a NOTE_OFF whose key is up, for a model with `sounding_releases`: a chance of
# e^-20 is none at all, while a stray such NOTE_OFF in training data still costs a bounded loss.
RELEASE_FLOOR = -20.0


class KeyboardInput(nn.Module):
    """Which keys sound after each token, and for how long (`musicgpt.keyboard`), projected into
    the embedding. The projection starts at zero, so adding this input to a trained model leaves
    its predictions exactly as they were until it trains."""

    def __init__(self, cfg: ModelConfig, controls: Controls):
        super().__init__()
        self.proj = nn.Linear(KEY_FEATURES, cfg.n_embd, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.set_controls(controls, cfg.vocab_size)

    def set_controls(self, controls: Controls, vocab_size: int) -> None:
        """Read tokens by these controls' vocabulary (after the model's vocabulary grows)."""
        table = key_table(controls, vocab_size)
        device = self.proj.weight.device
        for name in ("action", "pitch", "steps"):  # not saved: they follow from the controls
            self.register_buffer(name, torch.as_tensor(getattr(table, name), device=device), persistent=False)
        self.step_seconds, self.has_fim = table.step_seconds, table.has_fim

    def forward(self, features: Tensor) -> Tensor:
        return self.proj(features.to(self.proj.weight.dtype))

    def read(self, idx: Tensor, sounding: Tensor | None = None) -> Tensor:
        """The features [B, T, 256] after each token of sequences [B, T]; `sounding` [B, 2, 128] is
        the state before them (`musicgpt.keyboard.sounding_before`), None for no key down."""
        order = self.time_order(idx) if self.has_fim else None
        tokens = idx if order is None else idx.gather(1, order)
        B, T = tokens.shape
        action, pitch = self.action[tokens], self.pitch[tokens]
        pos = torch.arange(T, device=idx.device).expand(B, T)
        pitches = torch.arange(NUM_PITCHES, device=idx.device)
        # For each key, the latest position that pressed it, lifted it, or lifted every key; a key
        # down before the sequence counts as pressed at position -1, and -2 stands for never.
        hit = pitch[..., None] == pitches
        pressed = torch.where((action == PRESS)[..., None] & hit, pos[..., None], -2).cummax(1).values
        if sounding is not None:
            pressed = torch.maximum(pressed, torch.where(sounding[:, None, 0] > 0, -1, -2))
        lifted = torch.where((action == LIFT)[..., None] & hit, pos[..., None], -2).cummax(1).values
        cleared = torch.where((action == CLEAR) | (action == SUFFIX), pos, -2).cummax(1).values
        down = pressed > torch.maximum(lifted, cleared[..., None])
        # Integer steps summed exactly, then seconds: a long half-precision sum would drift.
        now = torch.where(action == WAIT, self.steps[tokens], 0).cumsum(1).float() * self.step_seconds
        struck = now.gather(1, pressed.clamp(min=0).reshape(B, -1)).reshape(B, T, -1)
        if sounding is not None:  # struck before the sequence, on its clock
            struck = torch.where(pressed < 0, -sounding[:, None, 1].float(), struck)
        age = (now[..., None] - struck).clamp(0, MAX_AGE_S) / MAX_AGE_S
        features = torch.cat([down.float(), down * age], -1)
        if order is None:
            return features
        return torch.empty_like(features).scatter_(1, order[..., None].expand_as(features), features)

    def time_order(self, idx: Tensor) -> Tensor:
        """Positions in time order: a row holding FIM_SUFFIX at s and then FIM_MIDDLE at m is read
        as [0, s) + [m, T) + [s, m): prefix, middle, then the suffix (FIM_SUFFIX clears the keys)."""
        T = idx.size(1)
        pos = torch.arange(T, device=idx.device).expand_as(idx)
        return torch.argsort(pos + 2 * T * self.in_suffix(idx), dim=1)

    def in_suffix(self, idx: Tensor) -> Tensor:
        """Bool [B, T]: the positions from FIM_SUFFIX up to FIM_MIDDLE, where which keys sound is unknown."""
        T = idx.size(1)
        action = self.action[idx]
        pos = torch.arange(T, device=idx.device).expand_as(idx)
        s = torch.where(action == SUFFIX, pos, T).amin(1, keepdim=True)
        m = torch.where((action == MIDDLE) & (pos > s), pos, T).amin(1, keepdim=True)
        return (pos >= s) & (pos < m)

    def release_bias(self, notes: Tensor, vocab_size: int, free: Tensor | None = None) -> Tensor:
        """What `sounding_releases` adds to the logits [B, T, V] after keyboard `notes` [B, T, 256]:
        RELEASE_FLOOR on the NOTE_OFF of each key that is up, except at `free` positions [B, T]."""
        up = 1.0 - notes[..., :NUM_PITCHES].float()
        if free is not None:
            up = up * ~free[..., None]
        return F.pad(up * RELEASE_FLOOR, (NOTE_OFF, vocab_size - NOTE_OFF - NUM_PITCHES))


# ----------------------------------------------------------------------------- the model

class ModelOutput(NamedTuple):
    """What `MusicGPT.forward` returns: logits [B, T, V] and the loss (None without targets)."""

    logits: Tensor
    loss: Tensor | None


class MusicGPT(nn.Module):
    """Decoder-only transformer over codec tokens, with tied input/output embeddings.

    `attn_impl` picks how `forward` computes relative attention (`attention.choose_kernel`):
    "auto" (the default: FlexAttention on CUDA for long sequences without attention-weight
    dropout), "eager" (the skew + SDPA reference), "flex", or "triton" (the fused Triton kernel;
    causal only, so with `attn_window` it uses FlexAttention). A plain attribute, not saved with
    the weights; decoding and the attention weights always take the eager path.
    """

    def __init__(self, config: ModelConfig, controls: Controls | None = None):
        super().__init__()
        self.config = config
        # What the token ids mean: the keyboard input needs it (None: the default codec's events).
        self.controls = controls or Controls()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = (nn.Embedding(config.context_len, config.n_embd)
                    if config.attention == "absolute" else None)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn_impl = "auto"
        self._init_weights()
        self.keyboard = KeyboardInput(config, self.controls) if config.sounding_notes else None

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

    @torch.no_grad()
    def resize_vocab(self, vocab_size: int, id_map: dict[int, int], controls: Controls | None = None) -> None:
        """Grow the vocabulary to `vocab_size` ids, old id i becoming id_map[i] (every old id must
        be mapped); new ids start as fresh GPT-2-style embeddings, so fine-tuning can add tokens.
        `controls` says what the new ids mean."""
        old = self.wte.weight
        new = torch.empty(vocab_size, old.size(1), device=old.device, dtype=old.dtype).normal_(std=0.02)
        src, dst = zip(*sorted(id_map.items()))
        new[list(dst)] = old[list(src)]
        self.wte = nn.Embedding(vocab_size, old.size(1), device=old.device, dtype=old.dtype)
        self.wte.weight.copy_(new)
        self.config = ModelConfig.from_dict({**self.config.to_dict(), "vocab_size": vocab_size})
        self.controls = controls or self.controls
        if self.keyboard is not None:
            self.keyboard.set_controls(self.controls, vocab_size)

    # The two halves of every call, public for decoders that drive the layers themselves
    # (musicgpt.steppers.GraphDecoder): embed the tokens, then run the stack under one plan.

    def embed(self, idx: Tensor, start: int = 0, notes: Tensor | None = None) -> Tensor:
        """Token embeddings [B, T, C] (plus positions start.. for an absolute model, and the
        keyboard `notes` [B, T, 256] for a model with `sounding_notes`), dropped out."""
        x = self.wte(idx)
        if self.keyboard is not None:
            if notes is None:
                raise ValueError("this model reads the keyboard state: pass its notes (musicgpt.keyboard)")
            x = x + self.keyboard(notes)
        if self.wpe is not None:
            end = start + idx.size(1)
            if end > self.config.context_len:
                raise MusicGPTError(f"sequence of {end} tokens is longer than the absolute-attention "
                                    f"model's context of {self.config.context_len}")
            x = x + self.wpe(torch.arange(start, end, device=idx.device))
        return self.drop(x)

    def run_blocks(self, x: Tensor, plan: AttentionPlan, cache: KeyValueCache | None = None,
                   notes: Tensor | None = None, free: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """Logits [B, T, V] from embeddings, and each layer's weights if the plan returns them. A
        model with `sounding_releases` needs the keyboard `notes` the embeddings were made with
        (and, in training, `free`: the positions whose keys are unknown, a FIM suffix)."""
        attentions = []
        for i, block in enumerate(self.blocks):
            x, w = block(x, plan, cache, i)
            if w is not None:
                attentions.append(w)
        # Tied output embedding: logits reuse wte's weights (no separate lm_head parameter).
        logits = F.linear(self.ln_f(x), self.wte.weight)
        if self.config.sounding_releases:
            if notes is None:
                raise ValueError("this model releases only sounding keys: pass its notes (musicgpt.keyboard)")
            logits = logits + self.keyboard.release_bias(notes, logits.size(-1), free).to(logits.dtype)
        return logits, attentions

    def _sequence(self, idx: Tensor, attn_window: int | None, need_weights: bool,
                  sounding: Tensor | None = None
                  ) -> tuple[Tensor, list[Tensor]]:
        T = idx.size(1)
        if attn_window is not None and attn_window <= 0:
            raise MusicGPTError(f"attention window must be positive, got {attn_window}")
        if attn_window is not None and attn_window >= T:
            attn_window = None  # a window covering everything is plain causal attention
        notes = self.keyboard.read(idx, sounding) if self.keyboard is not None else None
        releases = self.config.sounding_releases and self.keyboard.has_fim
        free = self.keyboard.in_suffix(idx) if releases else None  # only the release floor needs it
        x = self.embed(idx, notes=notes)
        plan = sequence_plan(self.attn_impl, T, idx.device, relative=self.wpe is None,
                             window=attn_window, need_weights=need_weights,
                             attn_dropout=self.training and self.config.attn_dropout > 0)
        return self.run_blocks(x, plan, notes=notes, free=free)

    def forward(self, idx: Tensor, targets: Tensor | None = None, *,
                attn_window: int | None = None, sounding: Tensor | None = None) -> ModelOutput:
        """Logits [B, T, V] and the cross-entropy loss (None without targets; -100 ignored).

        attn_window=W: each query sees only keys 0 <= i - j < W, the reference for
        sliding-window decoding. sounding [B, 2, 128]: for a model that reads the keyboard, the
        notes sounding before `idx` (a window cut from a piece; `musicgpt.keyboard.sounding_before`).
        """
        logits, _ = self._sequence(idx, attn_window, need_weights=False, sounding=sounding)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                   targets.reshape(-1), ignore_index=-100)
        return ModelOutput(logits, loss)

    def forward_with_attention(self, idx: Tensor, *, attn_window: int | None = None
                               ) -> tuple[Tensor, list[Tensor]]:
        """Logits [B, T, V] and, per layer, the softmax weights [B, H, T, T] (eager path)."""
        return self._sequence(idx, attn_window, need_weights=True)

    def new_cache(self, batch_size: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None, window: int | None = None) -> KVCache:
        """An empty KV cache for `decode_step`; device/dtype default to the model's weights'."""
        p = self.wte.weight
        return KVCache(self.config.n_layer, batch_size, self.config.n_head, self.config.d_head,
                       window if window is not None else self.config.context_len,
                       device or p.device, dtype or p.dtype)

    @torch.no_grad()
    def decode_step(self, idx_new: Tensor, cache: KVCache, notes: Tensor | None = None) -> Tensor:
        """Logits [B, T_new, V] for tokens following those in `cache`, which it then holds.

        Equals `forward(all_tokens, attn_window=cache.window)` at these positions for any
        chunking. A model with `sounding_notes` needs the keyboard `notes` [B, T_new, 256] after
        these tokens, which a `musicgpt.keyboard.Keyboard` following the sequence gives.
        """
        return self._decode(idx_new, cache, False, notes)[0]

    @torch.no_grad()
    def decode_step_with_attention(self, idx_new: Tensor, cache: KVCache, notes: Tensor | None = None
                                   ) -> tuple[Tensor, list[Tensor]]:
        """`decode_step`'s logits and, per layer, [B, H, T_new, T_keys] weights whose key axis
        covers the last T_keys positions, ending at the newest token."""
        return self._decode(idx_new, cache, True, notes)

    def _decode(self, idx_new: Tensor, cache: KVCache, need_weights: bool, notes: Tensor | None
                ) -> tuple[Tensor, list[Tensor]]:
        B, T = idx_new.shape
        if B != cache.batch_size:
            raise ValueError(f"batch of {B} does not match the cache's {cache.batch_size}")
        if self.wpe is not None and cache.length + T > self.config.context_len:
            raise MusicGPTError(f"absolute-attention model cannot decode past its context of "
                                f"{self.config.context_len} tokens; recompute instead")
        x = self.embed(idx_new, start=cache.length, notes=notes)
        write_at, first, end = cache.begin(T)
        dist = distances(write_at - first, T, end - first, idx_new.device)
        # A single new token sees exactly the keys kept for it, so it needs no mask.
        mask = band(dist, cache.window) if T > 1 else None
        rel_index = dist.clamp(0, self.config.max_rel_dist - 1) if self.wpe is None else None
        plan = AttentionPlan.eager(mask, rel_index=rel_index, need_weights=need_weights)
        with decode_backends(idx_new.device):
            out = self.run_blocks(x, plan, cache, notes)
        cache.commit(T)
        return out
