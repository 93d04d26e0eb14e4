"""Which engine runs a sampling request: ONNX Runtime on the CPU when it is installed, else torch.

Both continue token sequences through `musicgpt.decode`'s loops, so a seed gives the same
tokens on either (up to float rounding in the last bits of the logits). The ONNX engine never
imports torch once its export exists; the first use of a checkpoint exports it (with torch, a
few seconds) into the user cache, keyed by the SHA-256 of the checkpoint file. Only exports this
program wrote are loaded: an ONNX file found beside a downloaded checkpoint would be native code's
input from a stranger, where the checkpoint itself is safetensors that is never unpickled.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from musicgpt.checkpoint_header import Checkpoint, check_vocabulary, peek_checkpoint
from musicgpt.errors import MusicGPTError
from musicgpt.onnx_stepper import OnnxStepper, available, file_digest, read_export_meta

BACKENDS = ("auto", "onnx", "torch")


class Engine:
    """A checkpoint's model ready to continue prompts: `generate(prompt, **options)` takes the
    options of `musicgpt.generate.generate` and returns the new tokens of each row."""

    def __init__(self, checkpoint: Checkpoint, backend: str, generate: Callable[..., list[np.ndarray]]):
        self.checkpoint, self.backend, self.generate = checkpoint, backend, generate


def check_backend_name(name: str) -> str:
    """`name` if it is one of BACKENDS, else a one-line error."""
    if name not in BACKENDS:
        raise MusicGPTError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def choose_backend(name: str, device: str, ckpt: Checkpoint | None) -> str:
    """"onnx" or "torch" for a request; `ckpt` is the header's description (None: unreadable)."""
    if check_backend_name(name) == "torch":
        return name
    reason = None
    if not available():
        reason = "onnxruntime and onnx are not installed (pip install 'musicgpt[fast]')"
    elif device != "cpu":
        reason = f"it runs on the CPU, not --device {device}"
    elif ckpt is not None and ckpt.model_config.attention != "relative":
        reason = "it needs a relative-attention model"
    if name == "onnx" and reason:
        raise MusicGPTError(f"--backend onnx: {reason}")
    return "torch" if reason or ckpt is None else "onnx"


def onnx_cache_dir() -> Path:
    """Where exports are kept: the `onnx` folder of musicgpt's cache (beside the token cache)."""
    from musicgpt.data import default_cache_dir

    return default_cache_dir() / "onnx"


def onnx_export_for(path: Path, ckpt: Checkpoint, window: int | None = None) -> Path:
    """The folder of the ONNX export of the checkpoint at `path`, exporting it first (this needs
    torch) if the cache holds none for these exact weights and window."""
    window = window or ckpt.model_config.context_len
    digest = file_digest(path)
    folder = onnx_cache_dir() / f"{digest[:32]}-w{window}"
    meta = read_export_meta(folder)
    if meta and meta.get("source") == digest and meta.get("window") == window:
        return folder
    from musicgpt.checkpoint import load_model
    from musicgpt.onnx_export import export_onnx

    model, _ = load_model(path)
    try:
        export_onnx(model, folder, window=window, source=digest)
    except OSError as e:
        raise MusicGPTError(f"{folder}: cannot write the ONNX export ({e.strerror or e}); "
                            f"use --backend torch or set MUSICGPT_CACHE") from None
    print(f"musicgpt: exported the model for ONNX Runtime once, to {folder}", file=sys.stderr)
    return folder


def load_engine(path: Path, *, backend: str = "auto", device: str = "cpu", threads: int | None = None,
                num_samples: int = 1) -> Engine:
    """The engine for the checkpoint at `path`. Threads: `threads`, else one for one or two
    samples (a one-token step of a small model is latency-bound), else the engine's choice."""
    ckpt = peek_checkpoint(path)
    if choose_backend(backend, device, ckpt) == "onnx":  # a readable header, so ckpt is not None
        check_vocabulary(ckpt)
        stepper = OnnxStepper(onnx_export_for(path, ckpt), threads=threads or _onnx_threads(num_samples))

        def run(prompt, **options) -> list[np.ndarray]:
            from musicgpt.decode import decode

            return decode(stepper, prompt, vocab_size=ckpt.model_config.vocab_size, **options)

        return Engine(ckpt, "onnx", run)
    return _torch_engine(path, device, threads, num_samples)


def _onnx_threads(num_samples: int) -> int:
    return 1 if num_samples <= 2 else 0  # 0: ONNX Runtime's default, one per core


def _torch_engine(path: Path, device: str, threads: int | None, num_samples: int) -> Engine:
    import torch

    from musicgpt.checkpoint import load_model
    from musicgpt.devices import pick_device
    from musicgpt.generate import generate

    device = pick_device(device)
    if device == "cpu" and (threads or num_samples <= 2):
        torch.set_num_threads(threads or 1)  # extra threads only add synchronisation here
    model, ckpt = load_model(path, device)
    return Engine(ckpt, "torch", lambda prompt, **options: generate(model, prompt, **options))
