"""Checking a checkpoint from its safetensors header alone, before a tensor is read or a model built.

`read_header` refuses anything but a regular file whose header fits in it; `parse_metadata` our
JSON of the wrong types or depth; `check_shapes` any tensor whose shape differs from what the
configuration implies (`expected_shapes`, found on the meta device without allocating).
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch.overrides import TorchFunctionMode

from musicgpt.errors import CheckpointError
from musicgpt.model import ModelConfig, MusicGPT

FORMAT = "musicgpt-checkpoint-v1"
# safetensors itself refuses headers over 100 MB; ours are a few kB per layer.
MAX_HEADER_BYTES = 100_000_000
# Our metadata nests four levels (state -> train_config -> value, optimizer -> groups -> betas);
# a bound keeps a hostile file from exhausting the recursion of the JSON parser or the digest.
MAX_METADATA_DEPTH = 32
# Tensors besides the model's that a `last` checkpoint holds: optimizer state and random state.
EXTRA_TENSOR = re.compile(r"optim\.\d+\.\w+|rng\.torch|rng\.cuda\.\d+")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def read_header(path: Path) -> tuple[str | None, dict[str, tuple[str, tuple[int, ...]]]]:
    """Our raw metadata and every tensor's dtype and shape, from the header alone (no tensor read)."""
    try:
        info = path.stat()
    except OSError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    if not stat.S_ISREG(info.st_mode):  # a FIFO would block and /dev/zero never end
        raise CheckpointError(f"{path}: not a regular file, so not a checkpoint")
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
        if not 0 < length <= min(info.st_size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"its header claims {length} bytes and the file has {info.st_size}")
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("musicgpt")
            shapes = {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: not a valid safetensors checkpoint (truncated or damaged: {first})") from None
    return raw, shapes


def _malformed(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: malformed checkpoint metadata ({problem})")


def _depth(value: Any) -> int:
    """How deeply lists and mappings nest in `value` (iteratively: it must not recurse itself)."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= MAX_METADATA_DEPTH:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_metadata(path: Path, raw: str | None) -> dict[str, Any]:
    """Our metadata, parsed and checked to be of the expected shape and types."""
    try:
        meta = json.loads(raw) if raw else None
    except RecursionError:
        raise _malformed(path, "nested too deeply") from None
    except ValueError:  # not JSON, or an integer too long to convert
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a musicgpt checkpoint (missing or unknown metadata)")
    if _depth(meta) > MAX_METADATA_DEPTH:
        raise _malformed(path, f"nested more than {MAX_METADATA_DEPTH} deep")
    _check_metadata(path, meta)
    return meta


def json_kind(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_metadata(path: Path, meta: dict[str, Any]) -> None:
    """Refuse metadata whose fields have the wrong types, before anything relies on them."""
    for name in ("model_config", "codec_config"):
        if not isinstance(meta.get(name), dict):
            raise _malformed(path, f"{name} must be an object, got {json_kind(meta.get(name))}")
    for name in ("state", "aliases", "optimizer", "controls"):
        if not isinstance(meta.get(name, {}), dict):
            raise _malformed(path, f"{name} must be an object, got {json_kind(meta[name])}")
    if not isinstance(meta.get("sha256", ""), str):
        raise _malformed(path, f"sha256 must be a string, got {json_kind(meta['sha256'])}")
    state = meta.get("state", {})
    for name, ok, what in (("step", _is_count, "a non-negative integer"),
                           ("tokens_seen", _is_count, "a non-negative integer"),
                           ("elapsed_s", _is_number, "a number"),
                           ("best_val", lambda v: v is None or _is_number(v), "a number or null"),
                           ("train_config", lambda v: isinstance(v, dict), "an object")):
        if name in state and not ok(state[name]):
            raise _malformed(path, f"state.{name} must be {what}, got {json_kind(state[name])}")
    for alias, source in meta.get("aliases", {}).items():
        if not (isinstance(source, str) and alias.startswith("model.") and source.startswith("model.")):
            raise _malformed(path, f"alias {alias[:80]!r} must name a model tensor, got {json_kind(source)}")
    if "optimizer" in meta:
        groups = meta["optimizer"].get("param_groups")
        if not (isinstance(groups, list) and all(isinstance(g, dict) for g in groups)):
            raise _malformed(path, "optimizer.param_groups must be a list of objects")
        for g in groups:
            if not (isinstance(g.get("params"), list) and all(_is_count(i) for i in g["params"])):
                raise _malformed(path, "each optimizer group's params must be a list of parameter numbers")


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
