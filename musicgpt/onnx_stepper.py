"""Sampling on ONNX Runtime without torch: a `musicgpt.decode.Stepper` over exported step graphs.

`import torch` alone takes seconds and a tiny model's step is a hundred small operations, each
paying torch's dispatch cost; ONNX Runtime imports in a tenth of a second and runs the same
graph at under a microsecond of overhead per operation. The graphs are traced from the model
by `musicgpt.onnx_export` and kept in the user cache, keyed by the checkpoint's digest
(`musicgpt.backends`). With the default sampling the graph also draws the next token
(`step_and_draw`), so the decoding loop does no array work of its own per token.

This module imports neither torch nor the exporter: onnxruntime and numpy only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np

from musicgpt.controls import Controls
from musicgpt.decode import NUCLEUS_GROUPS, Nucleus
from musicgpt.errors import MusicGPTError
from musicgpt.keyboard import KEY_FEATURES, Keyboard, KeyTable, key_table
from musicgpt.vocab import CodecConfig

EXPORT_VERSION = 4  # bump when the graphs' inputs, outputs or kernels change
# ONNX Runtime fuses `q * scale` into the ring product as a FusedMatMul, whose kernel is several
# times slower than the plain MatMul for one query row against the whole ring.
DISABLED_OPTIMIZERS = ["MatMulScaleFusion"]
SHORT_PROMPT = 8  # prompts up to this long go through the step graph (no second session to load)
DRAW_INPUTS = ["mask", "noise", "temperature", "top_p", "groups", "pooled"]  # sample.onnx's, after `pos`
CHUNK = 128  # prompt tokens per chunk: a chunk's attention costs chunk x (window + chunk)
# Reading a prompt is a few large products, which a second core speeds up (a step is not).
PREFILL_THREADS = 2


def available() -> bool:
    """Whether onnxruntime, and onnx for torch to export with, are installed (`musicgpt[fast]`)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def ring_names(n_layer: int, prefix: str = "") -> list[str]:
    """The graphs' ring inputs (k0, v0, k1, ...) or, with prefix "new_", their new-key outputs."""
    return [f"{prefix}{kv}{i}" for i in range(n_layer) for kv in "kv"]


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes: what an export is checked against."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_export_meta(folder: str | Path) -> dict | None:
    """The meta.json of an export folder, or None if there is no complete export there."""
    try:
        meta = json.loads((Path(folder) / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("version") == EXPORT_VERSION else None


class OnnxStepper:
    """Runs an exported model one token per step, keeping the ring of past keys in numpy buffers.

    The step graph is bound once to the ring buffers and to preallocated outputs (ONNX Runtime
    reads and writes numpy memory in place), so a step copies only the new keys into the ring.
    """

    draw_rows = 1  # sample.onnx draws for one row

    def __init__(self, folder: str | Path, threads: int = 1, prefill_threads: int | None = None):
        self.folder = Path(folder)
        meta = read_export_meta(self.folder)
        if meta is None:
            raise MusicGPTError(f"{self.folder}: no ONNX export of this version here")
        self.window, self.n_layer = meta["window"], meta["n_layer"]
        self.n_head, self.d_head, self.vocab_size = meta["n_head"], meta["d_head"], meta["vocab_size"]
        self.slots = self.window - 1
        self.reach = self.n_layer * self.slots + 1  # prompt tokens that still matter
        self.threads = threads  # every graph's but the prompt's
        if prefill_threads is None:
            prefill_threads = max(threads, min(PREFILL_THREADS, os.cpu_count() or 1))
        self.prefill_threads = prefill_threads
        self.sessions = {}  # graph name -> session, each loaded when first needed
        self.table = None  # a model that reads the keyboard: what its token ids do to it
        if meta.get("keyboard"):
            self.table = self._key_table(meta["keyboard"])

    def _key_table(self, vocabulary) -> KeyTable:
        """What each token id does to the keyboard, from the vocabulary meta.json records."""
        try:
            controls = Controls.from_dict(vocabulary["controls"], CodecConfig.from_dict(vocabulary["codec"]))
        except (MusicGPTError, KeyError, TypeError):
            raise MusicGPTError(f"{self.folder / 'meta.json'}: its vocabulary is damaged; delete {self.folder} "
                                "and it is exported again") from None
        return key_table(controls, self.vocab_size)

    def session(self, name: str):
        """The ONNX Runtime session of one of the export's graphs, loaded on first use."""
        if name not in self.sessions:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.prefill_threads if name == "chunk.onnx" else self.threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            try:
                self.sessions[name] = ort.InferenceSession(str(self.folder / name), options,
                                                           providers=["CPUExecutionProvider"],
                                                           disabled_optimizers=DISABLED_OPTIMIZERS)
            except Exception as e:  # ONNX Runtime's error classes are not part of its public API
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise MusicGPTError(f"{self.folder / name}: cannot load this ONNX export ({first}); "
                                    f"delete {self.folder} and it is exported again") from None
        return self.sessions[name]

    def _allocate(self, batch: int) -> None:
        """Zeroed ring buffers for `batch` rows, the step's outputs, and the binding between them."""
        H, D, R = self.n_head, self.d_head, self.slots
        self.ring = []
        for _ in range(self.n_layer):
            self.ring += [np.zeros((batch, H, D, R), np.float32), np.zeros((batch, H, R, D), np.float32)]
        self.tokens = np.zeros((batch, 1), np.int64)
        self.notes = np.zeros((batch, 1, KEY_FEATURES), np.float32)
        self.pos_buffer = np.zeros((), np.int64)
        self.logits = np.zeros((batch, self.vocab_size), np.float32)
        self.new = [np.zeros((batch, H, 1, D), np.float32) for _ in self.ring]
        self.draw_binding = None  # bound to these buffers when first needed
        self._bind()

    def _bind(self) -> None:
        self.step_session = self.session("step.onnx" if len(self.tokens) == 1 else "rows.onnx")
        self.binding = self._io_binding(self.step_session, {}, {"logits": self.logits})

    def _io_binding(self, session, inputs: dict, outputs: dict):
        """`session` bound to these numpy buffers, plus the tokens, position, ring and new keys."""
        import onnxruntime as ort

        binding = session.io_binding()
        inputs = {"tokens": self.tokens, "pos": self.pos_buffer, **inputs,
                  **({"notes": self.notes} if self.table is not None else {}),
                  **dict(zip(ring_names(self.n_layer), self.ring))}
        for name, array in inputs.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        for name, array in {**outputs, **dict(zip(ring_names(self.n_layer, "new_"), self.new))}.items():
            binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(array))
        return binding

    def _write(self, new: list[np.ndarray], pos: int) -> None:
        """Put the new keys/values [B, H, T, D] of positions pos .. pos+T-1 into their slots."""
        slots = (pos + np.arange(new[0].shape[2])) % self.slots
        for i in range(self.n_layer):
            self.ring[2 * i][:, :, :, slots] = new[2 * i].transpose(0, 1, 3, 2)
            self.ring[2 * i + 1][:, :, slots, :] = new[2 * i + 1]

    def start(self, prompt: np.ndarray, batch: int) -> np.ndarray:
        whole = np.asarray(prompt, dtype=np.int64).reshape(-1)
        prompt = whole[-self.reach:]
        self._allocate(1)
        self.pos = 0
        self.keyboard = Keyboard(self.table) if self.table is not None else None
        if self.keyboard is not None:  # the keys the dropped head of a long prompt left down
            self.keyboard.follow(whole[:len(whole) - len(prompt)])
        if len(prompt) <= SHORT_PROMPT:
            for token in prompt:
                logits = self.step(np.array([token]))
        else:
            logits = self._prefill(prompt)
        if batch > 1:  # every row starts from the prompt's ring
            ring, pos = self.ring, self.pos
            self._allocate(batch)
            for mine, theirs in zip(self.ring, ring):
                mine[...] = theirs
            self.pos = pos
            if self.keyboard is not None:
                self.keyboard.reorder(np.zeros(batch, np.int64))
        return np.repeat(logits, batch, 0)

    def _prefill(self, prompt: np.ndarray) -> np.ndarray:
        size = min(CHUNK, self.slots)
        notes = self.keyboard.play_sequence(prompt)[None] if self.keyboard is not None else None
        for start in range(0, len(prompt), size):
            chunk = prompt[start:start + size]
            feeds = {"tokens": chunk[None], "pos": np.array(self.pos, np.int64),
                     **({"notes": notes[:, start:start + size]} if notes is not None else {}),
                     **dict(zip(ring_names(self.n_layer), self.ring))}
            logits, *new = self.session("chunk.onnx").run(None, feeds)
            self._write(new, self.pos)
            self.pos += len(chunk)
        return logits

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self.tokens[:, 0] = tokens
        self._play(tokens)
        self.pos_buffer[...] = self.pos
        self.step_session.run_with_iobinding(self.binding)
        self._keep_new()
        return self.logits.copy()

    def _play(self, tokens: np.ndarray) -> None:
        """The keyboard after the new tokens, into the graphs' `notes` (a model that reads it)."""
        if self.keyboard is not None:
            self.notes[:, 0] = self.keyboard.play(tokens)

    def _keep_new(self) -> None:
        """Write the step's new keys and values into the ring and move on one position."""
        slot = self.pos % self.slots  # one slot: plain indexing, several times faster than _write's
        for i in range(self.n_layer):
            self.ring[2 * i][:, :, :, slot] = self.new[2 * i][:, :, 0]
            self.ring[2 * i + 1][:, :, slot] = self.new[2 * i + 1][:, :, 0]
        self.pos += 1

    def step_and_draw(self, tokens: np.ndarray, mask: np.ndarray, noise: np.ndarray, temperature: float,
                      top_p: float, nucleus: Nucleus) -> np.ndarray:
        """Feed one row's new token and draw the next in the graph (`onnx_export.race_top_p`)
        from the logits plus `mask`, with the race's `noise`; top_p 1 keeps every token, and
        `nucleus` says what the nucleus ranks together."""
        if self.draw_binding is None:
            self._bind_draw()
        self.tokens[:, 0] = tokens
        self._play(tokens)
        self.pos_buffer[...] = self.pos
        inputs = self.draw_inputs
        inputs["mask"][...] = mask
        inputs["noise"][...] = noise
        inputs["temperature"][...] = temperature
        inputs["top_p"][...] = top_p if top_p < 1.0 else np.inf
        inputs["groups"][...] = nucleus.groups
        inputs["pooled"][...] = nucleus.pooled
        self.draw_session.run_with_iobinding(self.draw_binding)
        self._keep_new()
        return self.drawn.copy()

    def _bind_draw(self) -> None:
        self.draw_session = self.session("sample.onnx")
        V = self.vocab_size
        self.draw_inputs = {"mask": np.zeros((1, V), np.float32), "noise": np.ones((1, V), np.float32),
                            "temperature": np.ones((), np.float32), "top_p": np.ones((), np.float32),
                            "groups": np.zeros((NUCLEUS_GROUPS, V), np.float32),
                            "pooled": np.zeros((1, V), np.float32)}
        self.drawn = np.zeros(1, np.int64)
        self.draw_binding = self._io_binding(self.draw_session, self.draw_inputs, {"token": self.drawn})

    def reorder(self, rows: np.ndarray) -> None:
        if self.keyboard is not None:
            self.keyboard.reorder(rows)
        for buffer in self.ring:  # in place: the binding keeps pointing at these buffers
            buffer[...] = buffer[rows]
