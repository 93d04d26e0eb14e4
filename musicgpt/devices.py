"""Choosing the torch device a command runs on, checked to be available."""

from __future__ import annotations

from musicgpt.errors import MusicGPTError


def check_device_name(name: str) -> str:
    """`name` if it is one `pick_device` knows, else a one-line error; torch is not imported."""
    if name not in ("auto", "cpu", "mps") and not (isinstance(name, str) and name.startswith("cuda")):
        raise MusicGPTError(f"--device must be auto, cpu, cuda or mps, got {name!r}")
    return name


def pick_device(name: str) -> str:
    """'auto' (CUDA if present, else CPU), 'cpu', 'cuda[:N]' or 'mps', checked to be available.

    'cpu' is answered without importing torch (the ONNX sampler never needs it)."""
    if check_device_name(name) == "cpu":
        return name
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MusicGPTError(f"--device {name} was asked for but CUDA is not available")
        return name
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise MusicGPTError("--device mps was asked for but MPS is not available")
    return name
