"""Checkpoints: safetensors weights plus a JSON config, written atomically, never unpickled.

A checkpoint is one `NAME.safetensors` file holding the model weights (and, for `last`, the
optimizer state and random state for exact resumption) with the model and codec configuration
in its metadata, plus a human-readable `NAME.json` beside it. The safetensors file is the
source of truth: it is written to a temporary file and renamed, so a run killed mid-write
leaves the previous checkpoint intact.

Reading trusts nothing in the file. safetensors is what keeps a hostile file from running code:
nothing is ever unpickled. The SHA-256 saved with the metadata has no key, so anyone can
recompute it: it catches accidental damage (a flipped bit, a truncated copy), not tampering.
Everything else is checked before it can cost anything: the file is a regular file whose header
fits in it, the metadata is JSON of the expected types and bounded depth, the configuration is
within `musicgpt.model_config`'s size bounds, and every tensor's shape in the header equals the
shape the configuration implies (`expected_shapes`, found on the meta device without allocating),
all before a tensor is read or a model built.

The torch-free half (finding a checkpoint, reading and checking its header and metadata) lives in
`musicgpt.checkpoint_header`, so that a fast sampler reads a checkpoint's metadata without
importing torch; its names are re-exported here. This module adds what needs torch: the shape
check, the tensors and their checksum, saving, loading, building the model and resuming training.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch.overrides import TorchFunctionMode

from musicgpt.atomic import atomic_write
from musicgpt.checkpoint_header import (
    DEFAULT_MODEL_DIR,
    FORMAT,
    Checkpoint,
    check_vocabulary,
    choose_checkpoint,
    default_model_available,
    describe,
    json_kind,
    latest_run,
    peek_checkpoint,
    peek_codec_config,
    peek_controls,
    peek_model_config,
    read_checkpoint_meta,
    resolve_checkpoint,
)
from musicgpt.controls import Controls
from musicgpt.errors import CheckpointError
from musicgpt.model import ModelConfig, MusicGPT
from musicgpt.vocab import CodecConfig

__all__ = [
    "content_digest", "save_checkpoint", "expected_shapes", "check_shapes", "read_checkpoint_header",
    "load_checkpoint", "model_state", "build_model", "load_model", "restore_training", "export_model",
    # Torch-free, from musicgpt.checkpoint_header, so that `from musicgpt.checkpoint import ...` finds them.
    "DEFAULT_MODEL_DIR", "Checkpoint", "resolve_checkpoint", "latest_run", "default_model_available",
    "choose_checkpoint", "read_checkpoint_meta", "peek_checkpoint", "peek_model_config", "peek_codec_config",
    "peek_controls",
]

# Tensors besides the model's that a `last` checkpoint holds: optimizer state and random state.
EXTRA_TENSOR = re.compile(r"optim\.\d+\.\w+|rng\.torch|rng\.cuda\.\d+")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def content_digest(tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """SHA-256 of the metadata and every tensor's name, dtype, shape and bytes, against accidental damage.

    safetensors checks a file's structure but not its contents, so a flipped bit in the weights
    would otherwise load silently. It has no key, so anyone can recompute it: it does not detect
    tampering (the loader's own checks and safetensors' no-pickle format are what guard against
    hostile files).
    """
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one (tied embeddings); return the aliases."""
    seen: dict[tuple[int, int, tuple], str] = {}
    out, aliases = {}, {}
    for name, t in state.items():
        key = (t.data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            out[name] = t.detach().contiguous().cpu()
    return out, aliases


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            v = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"optim.{idx}.{k}"] = v.detach().contiguous().cpu()
    return tensors, {"param_groups": sd["param_groups"]}


def _same_kind(saved: Any, live: Any) -> bool:
    """Whether a saved optimizer setting has the type of the live one (None matches anything)."""
    if saved is None or live is None:
        return True
    if isinstance(live, bool) or isinstance(saved, bool):
        return isinstance(live, bool) and isinstance(saved, bool)
    if isinstance(live, (int, float)):
        return isinstance(saved, (int, float))
    if isinstance(live, (list, tuple)):
        return (isinstance(saved, (list, tuple)) and len(saved) == len(live)
                and all(_same_kind(a, b) for a, b in zip(saved, live)))
    return isinstance(saved, type(live))


def _check_optimizer(optimizer: torch.optim.Optimizer, state: dict[int, dict[str, torch.Tensor]], meta: dict) -> None:
    """Refuse saved optimizer settings and state that the live optimizer could not use.

    torch's `load_state_dict` checks only the group sizes; a wrong shape or setting would
    otherwise fail at the first training step instead of here.
    """
    groups = meta["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"{len(groups)} optimizer groups saved, {len(optimizer.param_groups)} expected")
    params: dict[int, torch.Tensor] = {}
    for saved, live in zip(groups, optimizer.param_groups):
        for key, value in live.items():
            if key != "params" and key in saved and not _same_kind(saved[key], value):
                raise ValueError(f"optimizer setting {key} is {json_kind(saved[key])}")
        if len(saved["params"]) != len(live["params"]):
            raise ValueError("an optimizer group holds a different number of parameters")
        params.update(zip(saved["params"], live["params"]))
    for idx, tensors in state.items():
        if idx not in params:
            raise ValueError(f"optimizer state for parameter {idx}, which no group holds")
        for key, t in tensors.items():
            if t.dim() and t.shape != params[idx].shape:
                raise ValueError(f"tensor optim.{idx}.{key} has shape {list(t.shape)}, "
                                 f"its parameter {list(params[idx].shape)}")


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = t
    _check_optimizer(optimizer, state, meta)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    path: str | os.PathLike,
    model: MusicGPT,
    codec_config: CodecConfig,
    *,
    state: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    half: bool = False,
    controls: Controls | None = None,
) -> Path:
    """Write `path` (.safetensors) and its .json atomically; with `optimizer`, also what resuming
    needs. `controls` are the model's control tokens (None: none beyond the codec's ids)."""
    path = Path(path).with_suffix(".safetensors")
    tensors, aliases = _unique_tensors({f"model.{k}": v for k, v in model.state_dict().items()})
    if half:
        tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in tensors.items()}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "model_config": model.config.to_dict(),
        "codec_config": codec_config.to_dict(),
        "controls": (controls or Controls(codec_config)).to_dict(),
        "state": state or {},
        "aliases": aliases,
    }
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _optimizer_tensors(optimizer)
        tensors.update(opt_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta["sha256"] = content_digest(tensors, json.loads(json.dumps(meta)))  # as a reader will parse it
    with atomic_write(path) as f:
        f.write(safetensors_bytes(tensors, metadata={"musicgpt": json.dumps(meta)}))
    info = {k: meta[k] for k in ("format", "model_config", "codec_config", "controls", "state")}
    info["weights"] = path.name
    with atomic_write(path.with_suffix(".json"), "w") as f:
        f.write(json.dumps(info, indent=2) + "\n")
    return path


def _read_tensors(path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of a checked checkpoint, verified against the digest saved with it."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: not a valid safetensors checkpoint (truncated or damaged: {first})") from None
    if "sha256" in meta and meta["sha256"] != content_digest(tensors, meta):  # older files have no digest
        raise CheckpointError(f"{path}: checkpoint is damaged (its contents do not match the checksum saved with it)")
    return tensors


def _shape_error(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: weights do not match the configuration ({problem})")


class _SkipInit(TorchFunctionMode):
    """Skips `torch.nn.init`: on the meta device there is nothing to fill, and its random fills
    there import torch's compiler, seconds spent doing nothing."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return kwargs["tensor"] if "tensor" in kwargs else args[0]
        return func(*args, **kwargs)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in `MusicGPT(config).state_dict()`, found without allocating any."""
    with torch.device("meta"), _SkipInit():  # the meta device allocates nothing
        return {k: tuple(v.shape) for k, v in MusicGPT(config).state_dict().items()}


def check_shapes(path: Path, shapes: dict[str, tuple[str, tuple[int, ...]]], config: ModelConfig,
                  aliases: dict[str, str]) -> None:
    """Compare the header's tensors with those `config` implies, before any is read or a model built."""
    expected = {f"model.{k}": v for k, v in expected_shapes(config).items()}
    for alias, source in aliases.items():
        if alias not in expected or alias in shapes:
            raise _shape_error(path, f"alias {alias[:80]} names no tied tensor of this model")
        if source not in shapes:
            raise _shape_error(path, f"alias {alias} points to {source[:80]}, which the file does not hold")
    for name, want in expected.items():
        stored = shapes.get(aliases.get(name, name))
        if stored is None:
            raise _shape_error(path, f"tensor {name} is missing")
        dtype, shape = stored
        if shape != want:
            raise _shape_error(path, f"tensor {name} has shape {list(shape)}, the configuration implies {list(want)}")
        if dtype not in FLOAT_DTYPES:
            raise _shape_error(path, f"tensor {name} holds {dtype}, not floating-point numbers")
    for name in shapes:
        if name not in expected and not EXTRA_TENSOR.fullmatch(name):
            raise _shape_error(path, f"unexpected tensor {name[:80]}")


def read_checkpoint_header(spec: str | os.PathLike) -> tuple[Checkpoint, dict[str, tuple[str, tuple[int, ...]]]]:
    """A checkpoint's metadata and every tensor's (dtype, shape), from its header alone, all checked:
    types, bounds, the vocabulary against the control tokens, the shapes against the configuration."""
    path = resolve_checkpoint(spec)
    ckpt, shapes = describe(path)
    check_vocabulary(ckpt)
    check_shapes(path, shapes, ckpt.model_config, ckpt.meta.get("aliases", {}))
    return ckpt, shapes


def load_checkpoint(
    spec: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], Checkpoint]:
    """Read every tensor of a checkpoint and its metadata, after checking both from the header alone."""
    ckpt, _ = read_checkpoint_header(spec)
    tensors = _read_tensors(ckpt.path, ckpt.meta)
    return {k: v.to(map_location) for k, v in tensors.items()}, ckpt


def model_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """The model's state dict from checkpoint tensors, with tied weights restored."""
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    for alias, source in meta.get("aliases", {}).items():
        state[alias[len("model."):]] = state[source[len("model."):]]
    return state


def build_model(tensors: dict[str, torch.Tensor], ckpt: Checkpoint, device: str | torch.device = "cpu") -> MusicGPT:
    """The model a checkpoint read by `load_checkpoint` describes, with its weights (float32, eval mode)."""
    model = MusicGPT(ckpt.model_config, ckpt.controls)
    try:
        model.load_state_dict({k: v.float() for k, v in model_state(tensors, ckpt.meta).items()}, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{ckpt.path}: weights do not match the configuration ({first})") from None
    return model.to(device).eval()


def load_model(
    spec: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[MusicGPT, Checkpoint]:
    """Read a checkpoint and build its model (float32, eval mode)."""
    tensors, ckpt = load_checkpoint(spec)
    return build_model(tensors, ckpt, device), ckpt


def restore_training(
    tensors: dict[str, torch.Tensor], ckpt: Checkpoint, model: MusicGPT, optimizer: torch.optim.Optimizer
) -> None:
    """Put the weights, optimizer and random state of a `last` checkpoint (as read by
    `load_checkpoint`) into live objects."""
    if "optimizer" not in ckpt.meta:
        raise CheckpointError(f"{ckpt.path}: holds no optimizer state, so training cannot resume from it")
    try:
        model.load_state_dict(model_state(tensors, ckpt.meta), strict=True)
        _restore_optimizer(optimizer, tensors, ckpt.meta["optimizer"])
        torch.set_rng_state(tensors["rng.torch"])
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{ckpt.path}: training state does not match the configuration ({first})") from None


def export_model(
    src: str | os.PathLike, dst: str | os.PathLike, *, half: bool = True, note: dict | None = None
) -> Path:
    """Write a checkpoint's model (no optimizer state) to `dst` (.safetensors + .json), fp16 by default."""
    model, ckpt = load_model(src)
    kept = ("step", "tokens_seen", "best_val", "elapsed_s", "train_config")
    state = {k: v for k, v in ckpt.state.items() if k in kept}
    return save_checkpoint(dst, model, ckpt.codec_config, state={**state, **(note or {})}, half=half,
                           controls=ckpt.controls)
