"""Exporting a model's sampling step to ONNX, for `musicgpt.onnx_stepper` to run without torch.

Four graphs per checkpoint and window, all traced from the model's own layers
(`MusicGPT.embed` and `run_blocks`) with a ring kernel from `musicgpt.attention.ring`:
  - `step.onnx`: one new token for one row;
  - `sample.onnx`: the same, then the next token drawn in the graph (temperature and top-p: the
    default sampling, the graph run for every sampled token);
  - `rows.onnx`: the step for any number of rows (several samples, beams);
  - `chunk.onnx`: up to window - 1 new tokens of one row, for reading the prompt in a few calls.
A fixed size is a constant in the traced graph, a variable one is computed in it, so each graph
varies only what it must: the one-row step has 30 % fewer operations than the any-rows one.
Inputs: `tokens` [B, T] int64, `pos` (the position of the first new token) and the ring, one
`kN` [B, H, D, window-1] and `vN` [B, H, window-1, D] per layer; outputs: `logits` [B, V] for
the token after the last new one, and `new_kN` / `new_vN` [B, H, T, D], which the caller writes
into slots (pos + t) % (window - 1). `sample.onnx` also takes the draw's `mask` [1, V] (the
decoding rules, added to the logits), `noise` [1, V] (the race's Exp(1) draws), `temperature`,
`top_p`, `groups` [2, V] and `pooled` [1, V] (`musicgpt.decode.Nucleus`: what top-p ranks
together), and gives `token` [1] in place of the logits. A model that reads the keyboard state
(`sounding_notes`) takes `notes` [B, T, 256] after `pos` in every graph: the state after each
new token, which the stepper follows on the host (`musicgpt.keyboard`). `meta.json`, written
last, says what the folder holds.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from musicgpt.atomic import atomic_write
from musicgpt.attention.ring import RingChunk, RingStep
from musicgpt.decode import NUCLEUS_GROUPS, TINY
from musicgpt.errors import MusicGPTError
from musicgpt.keyboard import KEY_FEATURES
from musicgpt.model import MusicGPT
from musicgpt.onnx_stepper import DRAW_INPUTS, EXPORT_VERSION, ring_names

OPSET = 17


class StepGraph(nn.Module):
    """`MusicGPT` on one new token per row against a ring of past keys (`RingStep`)."""

    def __init__(self, model: MusicGPT, window: int):
        super().__init__()
        self.model, self.window = model, window

    def forward(self, tokens: Tensor, pos: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
        notes, ring = split_notes(self.model, inputs)
        kernel = RingStep(pos, ring, self.window - 1, self.model.config.d_head)
        logits, _ = self.model.run_blocks(self.model.embed(tokens, notes=notes), kernel, kernel, notes)
        return (logits[:, -1], *kernel.new)


def split_notes(model: MusicGPT, inputs: tuple[Tensor, ...]) -> tuple[Tensor | None, tuple[Tensor, ...]]:
    """(notes, ring) from a graph's inputs after `pos` (and the draw's): notes come first when
    the model reads the keyboard."""
    return (inputs[0], inputs[1:]) if model.keyboard is not None else (None, inputs)


def race_top_p(logits: Tensor, noise: Tensor, temperature: Tensor, top_p: Tensor, groups: Tensor,
               pooled: Tensor) -> Tensor:
    """The token each row draws from softmax(logits / temperature) cut to its top-p nucleus, by the
    exponential race against `noise`: `musicgpt.decode`'s sampling, written to run in a graph.

    Each row of `groups` [G, V] is cut to its own nucleus and keeps its probability; tokens in no
    group are never cut (`musicgpt.decode.Nucleus`). Within a group the tokens where `pooled` is 1
    are ranked as one candidate holding their summed probability. A candidate is kept when the
    ones more probable than it hold less than top_p, and every candidate as probable as the last
    one kept is kept too (the numpy filter keeps such ties by index).
    """
    probs = (logits / temperature).softmax(-1)  # [B, V]
    member = probs.unsqueeze(1) * groups  # [B, G, V]: each group's tokens
    mass = member.sum(-1, keepdim=True)
    share = member / mass.clamp(min=TINY)  # each group's own distribution
    pooled_share = (share * pooled).sum(-1, keepdim=True)
    candidates = torch.cat([share * (1.0 - pooled), pooled_share], -1)
    ranked = candidates.sort(-1, descending=True).values
    before = ranked.cumsum(-1) - ranked  # the mass ahead of each ranked candidate
    kept = (before < top_p).sum(-1, keepdim=True).clamp(min=1)
    threshold = ranked.gather(-1, kept - 1)
    as_ranked = torch.where(pooled > 0, pooled_share, share)  # each token's candidate's mass
    keep = torch.where(as_ranked >= threshold, share, 0.0)
    # The kept tokens of a group share the probability the whole group had.
    weights = (keep * (mass / keep.sum(-1, keepdim=True).clamp(min=TINY))).sum(1)
    ungrouped = probs * (1.0 - groups.amax(0))
    return ((weights + ungrouped) / noise).argmax(-1)


class SampleGraph(StepGraph):
    """`StepGraph` that also draws the next token (`race_top_p`) from its logits plus the
    decoding rules' `mask`, so a sampling loop needs no array work of its own."""

    def forward(self, tokens: Tensor, pos: Tensor, mask: Tensor, noise: Tensor, temperature: Tensor,
                top_p: Tensor, groups: Tensor, pooled: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
        logits, *new = super().forward(tokens, pos, *inputs)
        return (race_top_p(logits + mask, noise, temperature, top_p, groups, pooled), *new)


class ChunkGraph(nn.Module):
    """`MusicGPT` on several new tokens per row against a ring of past keys (`RingChunk`)."""

    def __init__(self, model: MusicGPT, window: int):
        super().__init__()
        self.model, self.window = model, window

    def forward(self, tokens: Tensor, pos: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
        notes, ring = split_notes(self.model, inputs)
        kernel = RingChunk(pos, ring, self.window - 1, tokens.size(1), self.model.config.max_rel_dist)
        logits, _ = self.model.run_blocks(self.model.embed(tokens, notes=notes), kernel, kernel, notes)
        return (logits[:, -1], *kernel.new)


def empty_ring(model: MusicGPT, batch: int, window: int) -> list[Tensor]:
    """Zeroed ring buffers (k0, v0, k1, v1, ...) in the layout the graphs take."""
    c = model.config
    ring = []
    for _ in range(c.n_layer):
        ring += [torch.zeros(batch, c.n_head, c.d_head, window - 1),
                 torch.zeros(batch, c.n_head, window - 1, c.d_head)]
    return ring


def _graph_bytes(graph: nn.Module, tokens: Tensor, ring: list[Tensor], *, rows: bool, new: bool) -> bytes:
    """The ONNX bytes of `graph`; `rows` and `new` make the batch and new-token axes dynamic. A
    fixed axis lets the tracer keep sizes as constants instead of computing them in the graph."""
    n_layer = len(ring) // 2
    notes = [] if graph.model.keyboard is None else [torch.zeros(*tokens.shape, KEY_FEATURES)]
    inputs = ["tokens", "pos", *(["notes"] if notes else []), *ring_names(n_layer)]
    outputs = ["logits", *ring_names(n_layer, "new_")]
    args = (tokens, torch.tensor(0), *notes, *ring)
    if isinstance(graph, SampleGraph):  # one row: the draw's inputs come after the position
        V = graph.model.config.vocab_size
        inputs[2:2] = DRAW_INPUTS
        outputs[0] = "token"
        args = (tokens, torch.tensor(0), torch.zeros(1, V), torch.ones(1, V), torch.tensor(1.0),
                torch.tensor(0.9), torch.zeros(NUCLEUS_GROUPS, V), torch.zeros(1, V), *notes, *ring)
    batch = {0: "batch"} if rows else {}
    axes = {"tokens": {**batch, **({1: "new"} if new else {})}, "logits": batch,
            **({"notes": {**batch, **({1: "new"} if new else {})}} if notes else {}),
            **{name: batch for name in ring_names(n_layer)},
            **{name: {**batch, **({2: "new"} if new else {})} for name in ring_names(n_layer, "new_")}}
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the tracer's notes on shapes it records as dynamic
        warnings.simplefilter("ignore")
        # The TorchScript exporter: seconds where the torch.export one takes a quarter of a minute.
        torch.onnx.export(graph, args, buffer, dynamo=False, opset_version=OPSET,
                          input_names=inputs, output_names=outputs, dynamic_axes=axes)
    return buffer.getvalue()


def export_onnx(model: MusicGPT, folder: str | Path, *, window: int | None = None, source: str = "") -> Path:
    """Write the graphs and `meta.json` for `model` (relative attention) into `folder`; `source`
    (the checkpoint's digest) is recorded in meta.json. Returns the folder."""
    if model.config.attention != "relative":
        raise MusicGPTError("the ONNX step needs a relative-attention model (absolute positions "
                            "cannot slide past the context)")
    c = model.config
    window = window or c.context_len
    if window < 2:
        raise MusicGPTError(f"the ONNX step needs a window of at least 2 tokens, got {window}")
    if model.wte.weight.dtype != torch.float32:  # the graphs run in float32; leave the caller's model be
        model = copy.deepcopy(model).float()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ring = empty_ring(model, 1, window)
    was_training = model.training
    try:  # the exporter puts a wrapper back in its own mode, and the model with it
        with torch.no_grad():
            one, two = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)
            graphs = {"step.onnx": _graph_bytes(StepGraph(model, window).eval(), one, ring, rows=False, new=False),
                      "rows.onnx": _graph_bytes(StepGraph(model, window).eval(), one, ring, rows=True, new=False),
                      "sample.onnx": _graph_bytes(SampleGraph(model, window).eval(), one, ring, rows=False, new=False),
                      "chunk.onnx": _graph_bytes(ChunkGraph(model, window).eval(), two, ring, rows=False, new=True)}
    finally:
        model.train(was_training)
    for name, data in graphs.items():
        with atomic_write(folder / name) as f:
            f.write(data)
    meta = {"version": EXPORT_VERSION, "source": source, "window": window, "n_layer": c.n_layer,
            "n_head": c.n_head, "d_head": c.d_head, "vocab_size": c.vocab_size,
            # What the token ids mean, for the stepper to follow the keyboard (None: not read).
            "keyboard": None if model.keyboard is None else {"codec": model.controls.codec.to_dict(),
                                                             "controls": model.controls.to_dict()}}
    with atomic_write(folder / "meta.json", "w") as f:
        json.dump(meta, f, indent=1)
    return folder
