"""Steppers: the ways `musicgpt.generate` feeds a model one new token per step.

- `CachedStepper`: the model's growing KV cache (`MusicGPT.decode_step`), any device;
- `GraphStepper` over `GraphDecoder`: a fixed-shape ring cache whose step is replayed as one CUDA
  graph, since batch-1 sampling on a GPU is bound by kernel launches;
- `RecomputeStepper`: re-runs the whole visible context each step, the slow reference.

A relative-attention model keeps going past its window with a sliding window (distances, not
positions, are what it knows, so this is exact with respect to `forward(..., attn_window=W)`).
An absolute-position model cannot slide: when its cache is full, the most recent half context is
re-encoded at positions 0.. and decoding continues from there.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from musicgpt.attention import AttentionPlan, RingKVCache
from musicgpt.errors import MusicGPTError
from musicgpt.model import MusicGPT


class Stepper(Protocol):
    """What a decoding loop needs: logits for the next token, and beam reordering."""

    window: int

    def start(self, prompt: Tensor, batch: int) -> Tensor:
        """Encode the prompt [1, P] once for `batch` rows; logits [batch, V] for the next token."""

    def step(self, seq: Tensor, pos: int) -> Tensor:
        """Logits [B, V] for the token after seq[:, pos], which the stepper has not seen yet."""

    def reorder(self, rows: Tensor) -> None:
        """Row b continues old row rows[b] (beam search)."""


def receptive_field(model: MusicGPT, window: int) -> int:
    """Prompt tokens that can still influence the next ones: the receptive field of the stack."""
    if model.config.attention == "absolute":
        return model.config.context_len
    return model.config.n_layer * (window - 1) + 1


class CachedStepper:
    """Feeds the model one new token per step through its KV cache."""

    def __init__(self, model: MusicGPT, window: int):
        self.model, self.window = model, window
        self.full_at = model.config.context_len if model.config.attention == "absolute" else None

    def start(self, prompt: Tensor, batch: int) -> Tensor:
        self.cache = self.model.new_cache(1, window=self.window)
        logits = self._prefill(prompt[:, -receptive_field(self.model, self.window):])
        if batch > 1:
            self.cache.reorder(torch.zeros(batch, dtype=torch.long, device=prompt.device))
        return logits.expand(batch, -1)

    def _prefill(self, tokens: Tensor) -> Tensor:
        # Window-sized chunks keep each attention matrix at most window x 2 * window.
        for chunk in tokens.split(self.window, dim=1):
            logits = self.model.decode_step(chunk, self.cache)
        return logits[:, -1]

    def step(self, seq: Tensor, pos: int) -> Tensor:
        if self.full_at is not None and self.cache.length >= self.full_at:
            keep = max(1, self.full_at // 2)  # absolute positions cannot slide: re-encode
            self.cache = self.model.new_cache(seq.size(0), window=self.window)
            return self._prefill(seq[:, pos + 1 - keep:pos + 1])
        return self.model.decode_step(seq[:, pos:pos + 1], self.cache)[:, -1]

    def reorder(self, rows: Tensor) -> None:
        self.cache.reorder(rows)


class GraphStepper:
    """Feeds one new token per step through a `GraphDecoder` (graph=None: a CUDA graph on CUDA;
    False runs the same fixed-shape step eagerly)."""

    def __init__(self, model: MusicGPT, window: int, graph: bool | None = None):
        self.model, self.window, self.graph = model, window, graph

    def start(self, prompt: Tensor, batch: int) -> Tensor:
        self.decoder = GraphDecoder(self.model, batch, window=self.window, graph=self.graph)
        prompt = prompt[:, -receptive_field(self.model, self.window):]
        return self.decoder.prefill(prompt).expand(batch, -1)

    def step(self, seq: Tensor, pos: int) -> Tensor:
        return self.decoder.step(seq[:, pos])

    def reorder(self, rows: Tensor) -> None:
        self.decoder.reorder(rows)


class RecomputeStepper:
    """The slow reference: re-runs the model over the whole visible context every step."""

    def __init__(self, model: MusicGPT, window: int):
        self.model, self.window = model, window
        self.reach = receptive_field(model, window)

    def start(self, prompt: Tensor, batch: int) -> Tensor:
        return self._run(prompt[:, -self.reach:]).expand(batch, -1)

    def step(self, seq: Tensor, pos: int) -> Tensor:
        return self._run(seq[:, max(0, pos + 1 - self.reach):pos + 1])

    def _run(self, tokens: Tensor) -> Tensor:
        return self.model(tokens, attn_window=self.window).logits[:, -1]

    def reorder(self, rows: Tensor) -> None:
        pass  # nothing cached; the caller reorders the token buffer


class GraphDecoder:
    """Sampling steps of a relative-attention `MusicGPT`, one token per row, as one CUDA graph.

    `prefill(prompt)` then `step(token)` repeatedly; each returns logits [B, V] for the next token
    and equals `model.forward(all_tokens, attn_window=window)` there. graph=None captures a CUDA
    graph on CUDA and runs the same fixed-shape step eagerly elsewhere (what the CPU tests check).
    """

    def __init__(self, model: MusicGPT, batch_size: int = 1, window: int | None = None,
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
        self.graph = None
        if graph if graph is not None else p.device.type == "cuda":
            self._capture()

    @torch.no_grad()
    def _step(self) -> None:
        """Feed self.token at position cache.pos; write the logits into self.logits. Tensor ops
        on fixed buffers only: no host sync, no shape that depends on the position."""
        model, cache = self.model, self.cache
        dist = cache.begin()  # how far back each slot's key is
        plan = AttentionPlan.eager((dist <= cache.pos)[None],  # hide unwritten slots
                                   rel_index=dist.clamp(max=model.config.max_rel_dist - 1)[None])
        logits, _ = model.run_blocks(model.embed(self.token), plan, cache)
        self.logits.copy_(logits[:, -1])
        cache.commit()

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
        held = slice(cache.held - n, cache.held)
        self.cache.load(cache.k[:, :, :, held], cache.v[:, :, :, held], P)
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
