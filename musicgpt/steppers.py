"""Steppers: the ways `musicgpt.generate` feeds a model one new token per step.

- `CachedStepper`: the model's growing KV cache (`MusicGPT.decode_step`), any device;
- `GraphStepper` over `GraphDecoder`: a fixed-shape ring cache whose step is replayed as one CUDA
  graph, since batch-1 sampling on a GPU is bound by kernel launches;
- `RecomputeStepper`: re-runs the whole visible context each step, the slow reference.

Each is a `musicgpt.decode.Stepper`: token ids in and float32 logits out as numpy arrays, so the
decoding loop itself (`musicgpt.decode`) is the same for every backend. For a model that reads
the keyboard state (`sounding_notes`), the cached steppers follow it with a
`musicgpt.keyboard.Keyboard` from the prompt's first token on, so a note struck before the model's
reach still sounds; the recompute reference tells the model the keys its hidden tokens left down.

A relative-attention model keeps going past its window with a sliding window (distances, not
positions, are what it knows, so this is exact with respect to `forward(..., attn_window=W)`).
An absolute-position model cannot slide: when its cache is full, the most recent half context is
re-encoded at positions 0.. and decoding continues from there.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from musicgpt.attention import AttentionPlan, RingKVCache
from musicgpt.errors import MusicGPTError
from musicgpt.keyboard import KEY_FEATURES, Keyboard, key_table
from musicgpt.model import MusicGPT


def receptive_field(model: MusicGPT, window: int) -> int:
    """Prompt tokens that can still influence the next ones: the receptive field of the stack."""
    if model.config.attention == "absolute":
        return model.config.context_len
    return model.config.n_layer * (window - 1) + 1


def host_logits(logits: Tensor) -> np.ndarray:
    """Float32 logits on the host, where `musicgpt.decode` chooses tokens."""
    return logits.float().cpu().numpy()


class KeyboardFeed:
    """The keyboard notes a model with `sounding_notes` reads, followed on the host (see
    `musicgpt.keyboard`); for any other model every method gives None."""

    def __init__(self, model: MusicGPT):
        self.table = key_table(model.controls, model.config.vocab_size) if model.keyboard is not None else None
        self.device = model.wte.weight.device

    def start(self, prompt: np.ndarray, kept: int, rows: int = 1) -> Tensor | None:
        """Notes [1, kept, 256] after each of the last `kept` tokens of `prompt` ([P]), the keys
        its dropped head left down included; then `rows` rows go on from it."""
        if self.table is None:
            return None
        self.keyboard = Keyboard(self.table)
        self.keyboard.follow(prompt[:len(prompt) - kept])
        notes = self.keyboard.play_sequence(prompt[len(prompt) - kept:])
        self.keyboard.reorder(np.zeros(rows, np.int64))
        return torch.from_numpy(notes)[None].to(self.device)

    def play(self, tokens: np.ndarray) -> Tensor | None:
        """Notes [B, 1, 256] after one new token per row."""
        if self.table is None:
            return None
        return torch.from_numpy(self.keyboard.play(tokens))[:, None].to(self.device)

    def reorder(self, rows: np.ndarray) -> None:
        if self.table is not None:
            self.keyboard.reorder(rows)


def chunks(tokens: Tensor, notes: Tensor | None, size: int) -> list[tuple[Tensor, Tensor | None]]:
    """Tokens [B, T] and their notes (or None) in pieces of at most `size` positions."""
    pieces = tokens.split(size, dim=1)
    return list(zip(pieces, notes.split(size, dim=1) if notes is not None else [None] * len(pieces)))


class CachedStepper:
    """Feeds the model one new token per step through its KV cache."""

    def __init__(self, model: MusicGPT, window: int):
        self.model, self.window = model, window
        self.device = model.wte.weight.device
        self.full_at = model.config.context_len if model.config.attention == "absolute" else None
        self.keys = KeyboardFeed(model)

    def start(self, prompt: np.ndarray, batch: int) -> np.ndarray:
        tokens = torch.as_tensor(prompt, device=self.device).view(1, -1)
        self.recent = tokens[:, -(self.full_at or 1):].expand(batch, -1)  # what an absolute model re-encodes
        self.cache = self.model.new_cache(1, window=self.window)
        prompt = np.asarray(prompt).reshape(-1)
        kept = min(len(prompt), receptive_field(self.model, self.window))
        logits = self._prefill(tokens[:, -kept:], self.keys.start(prompt, kept, batch))
        if batch > 1:
            self.cache.reorder(torch.zeros(batch, dtype=torch.long, device=self.device))
        return host_logits(logits.expand(batch, -1))

    def _prefill(self, tokens: Tensor, notes: Tensor | None = None) -> Tensor:
        # Window-sized chunks keep each attention matrix at most window x 2 * window.
        for chunk, chunk_notes in chunks(tokens, notes, self.window):
            logits = self.model.decode_step(chunk, self.cache, chunk_notes)
        return logits[:, -1]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        new = torch.as_tensor(tokens, device=self.device).view(-1, 1)
        if self.full_at is None:
            return host_logits(self.model.decode_step(new, self.cache, self.keys.play(tokens))[:, -1])
        self.recent = torch.cat([self.recent, new], 1)[:, -self.full_at:]
        if self.cache.length >= self.full_at:  # absolute positions cannot slide: re-encode
            keep = max(1, self.full_at // 2)
            self.cache = self.model.new_cache(len(tokens), window=self.window)
            return host_logits(self._prefill(self.recent[:, -keep:]))
        return host_logits(self.model.decode_step(new, self.cache)[:, -1])

    def reorder(self, rows: np.ndarray) -> None:
        self.keys.reorder(rows)
        rows = torch.as_tensor(rows, device=self.device)
        self.cache.reorder(rows)
        self.recent = self.recent.index_select(0, rows)


class GraphStepper:
    """Feeds one new token per step through a `GraphDecoder` (graph=None: a CUDA graph on CUDA;
    False runs the same fixed-shape step eagerly)."""

    def __init__(self, model: MusicGPT, window: int, graph: bool | None = None):
        self.model, self.window, self.graph = model, window, graph
        self.device = model.wte.weight.device
        self.keys = KeyboardFeed(model)

    def start(self, prompt: np.ndarray, batch: int) -> np.ndarray:
        self.decoder = GraphDecoder(self.model, batch, window=self.window, graph=self.graph)
        prompt = np.asarray(prompt).reshape(-1)
        kept = min(len(prompt), receptive_field(self.model, self.window))
        tokens = torch.as_tensor(prompt[-kept:], device=self.device).view(1, -1)
        return host_logits(self.decoder.prefill(tokens, self.keys.start(prompt, kept, batch)).expand(batch, -1))

    def step(self, tokens: np.ndarray) -> np.ndarray:
        notes = self.keys.play(tokens)
        return host_logits(self.decoder.step(torch.as_tensor(tokens, device=self.device), notes))

    def reorder(self, rows: np.ndarray) -> None:
        self.keys.reorder(rows)
        self.decoder.reorder(torch.as_tensor(rows, device=self.device))


class RecomputeStepper:
    """The slow reference: re-runs the model over the whole visible context every step, telling a
    model that reads the keyboard which keys the tokens no longer visible left down."""

    def __init__(self, model: MusicGPT, window: int):
        self.model, self.window = model, window
        self.device = model.wte.weight.device
        self.reach = receptive_field(model, window)
        self.table = key_table(model.controls, model.config.vocab_size) if model.keyboard is not None else None

    def start(self, prompt: np.ndarray, batch: int) -> np.ndarray:
        prompt = np.asarray(prompt).reshape(-1)
        self.seq = torch.as_tensor(prompt, device=self.device).view(1, -1)[:, -self.reach:].expand(batch, -1)
        self.before = Keyboard(self.table, batch) if self.table is not None else None
        if self.before is not None:
            self.before.follow(prompt[:len(prompt) - self.seq.size(1)])
        return self._run()

    def step(self, tokens: np.ndarray) -> np.ndarray:
        new = torch.as_tensor(tokens, device=self.device).view(-1, 1)
        seq = torch.cat([self.seq, new], 1)
        if self.before is not None and seq.size(1) > self.reach:
            self.before.play(seq[:, 0].cpu().numpy())
        self.seq = seq[:, -self.reach:]
        return self._run()

    def _run(self) -> np.ndarray:
        sounding = torch.from_numpy(self.before.sounding()).to(self.device) if self.before is not None else None
        return host_logits(self.model(self.seq, attn_window=self.window, sounding=sounding).logits[:, -1])

    def reorder(self, rows: np.ndarray) -> None:
        self.seq = self.seq.index_select(0, torch.as_tensor(rows, device=self.device))
        if self.before is not None:
            self.before.reorder(rows)


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
        self.notes = (torch.zeros(batch_size, 1, KEY_FEATURES, device=p.device)  # the keyboard after the token
                      if model.keyboard is not None else None)
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
        logits, _ = model.run_blocks(model.embed(self.token, notes=self.notes), plan, cache, self.notes)
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
    def prefill(self, prompt: Tensor, notes: Tensor | None = None) -> Tensor:
        """Encode `prompt` [B, P] (or [1, P], shared by every row) with the model's ordinary
        KV-cached decode and load the keys the next token can see into the ring; logits [B', V]
        for the token after the prompt, B' = the prompt's rows. `notes`: the keyboard after each
        prompt token, for a model that reads it."""
        B, P = prompt.shape
        if P == 0 or B not in (1, self.cache.k.size(1)):
            raise ValueError(f"prompt of shape {tuple(prompt.shape)} does not fit a decoder "
                             f"for batch {self.cache.k.size(1)} (at least one token per row)")
        cache = self.model.new_cache(B, window=self.window)
        for chunk, chunk_notes in chunks(prompt, notes, self.window):
            logits = self.model.decode_step(chunk, cache, chunk_notes)
        n = min(cache.held, self.window - 1)  # positions P-n .. P-1
        held = slice(cache.held - n, cache.held)
        self.cache.load(cache.k[:, :, :, held], cache.v[:, :, :, held], P)
        return logits[:, -1]

    def reorder(self, rows: Tensor) -> None:
        """Row b continues old row rows[b] (beam search); the number of rows stays the same."""
        self.cache.reorder(rows)

    def step(self, token: Tensor, notes: Tensor | None = None) -> Tensor:
        """Logits [B, V] for the token after `token` [B] (a copy, not the graph's buffer), given
        the keyboard `notes` [B, 1, 256] after it for a model that reads them."""
        self.token.copy_(token.view(-1, 1))
        if self.notes is not None:
            self.notes.copy_(notes.view_as(self.notes))
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        return self.logits.clone()
