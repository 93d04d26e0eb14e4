"""Choosing the torch device a command runs on, checked to be available."""

from __future__ import annotations

import torch

from musicgpt.errors import MusicGPTError


def pick_device(name: str) -> str:
    """'auto' (CUDA if present, else CPU), 'cpu', 'cuda[:N]' or 'mps', checked to be available."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MusicGPTError(f"--device {name} was asked for but CUDA is not available")
        return name
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise MusicGPTError("--device mps was asked for but MPS is not available")
        return name
    raise MusicGPTError(f"--device must be auto, cpu, cuda or mps, got {name!r}")
