"""A checkpoint's metadata, read and checked from its safetensors header alone, without torch.

This module must not import torch (a test checks it): a fast sampler reads a checkpoint's model
and codec configuration and control tokens through `read_checkpoint_meta` and starts in well under
a second, where importing torch alone takes seconds. `musicgpt.checkpoint` adds what needs torch:
comparing the header's shapes with the model's, reading the tensors, saving and building models.

`read_header` refuses anything but a regular file whose header fits in it; `parse_metadata` our
JSON of the wrong types or depth; `describe` builds the `Checkpoint` the metadata describes, with
its configurations' bounds checked. `resolve_checkpoint` and `choose_checkpoint` find the file a
command should use.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from musicgpt.controls import Controls
from musicgpt.errors import CheckpointError, MusicGPTError
from musicgpt.model_config import ModelConfig
from musicgpt.vocab import CodecConfig

FORMAT = "musicgpt-checkpoint-v1"
# safetensors itself refuses headers over 100 MB; ours are a few kB per layer.
MAX_HEADER_BYTES = 100_000_000
# Our metadata nests four levels (state -> train_config -> value, optimizer -> groups -> betas);
# a bound keeps a hostile file from exhausting the recursion of the JSON parser or the digest.
MAX_METADATA_DEPTH = 32
DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"  # the model shipped inside the package: "default"


@dataclass
class Checkpoint:
    """What a checkpoint holds besides the weights."""

    model_config: ModelConfig
    codec_config: CodecConfig
    state: dict[str, Any] = field(default_factory=dict)  # step, tokens seen, metrics, train config
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict, repr=False)  # raw metadata: aliases, optimizer groups
    controls: Controls | None = None  # style tags and FIM sentinels; None: none (set from the codec)

    def __post_init__(self) -> None:
        if self.controls is None:
            self.controls = Controls(self.codec_config)


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
        with safe_open(str(path), framework="numpy") as f:
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


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """Turn 'default', a run folder, a .json or a .safetensors path into the weights file to load.

    A run folder resolves to its `best` checkpoint if present, else `last`.
    """
    if str(spec) == "default":
        path = DEFAULT_MODEL_DIR / "model.safetensors"
        if not path.is_file():
            raise CheckpointError("the default model is not installed with this copy of musicgpt")
        return path
    p = Path(spec)
    if p.is_dir():
        for name in ("best.safetensors", "last.safetensors", "model.safetensors"):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{p}: no checkpoint in this folder (expected best.safetensors or last.safetensors)")
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint not found")
    return p


def run_folders(runs_dir: str | os.PathLike = "runs") -> list[Path]:
    """The run folders under `runs_dir` that hold a checkpoint, by name (none if it is no folder)."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and any(d.glob("*.safetensors")))


def latest_run(runs_dir: str | os.PathLike = "runs") -> Path | None:
    """The most recently modified run folder under `runs_dir` holding a checkpoint, or None."""
    return max(run_folders(runs_dir), key=lambda d: max(f.stat().st_mtime for f in d.glob("*.safetensors")),
               default=None)


def default_model_available() -> bool:
    """Whether this installation ships the trained default model."""
    return (DEFAULT_MODEL_DIR / "model.safetensors").is_file()


def choose_checkpoint(spec: str | os.PathLike | None, runs_dir: str | os.PathLike = "runs") -> tuple[Path, str]:
    """The checkpoint a command should use and a one-line note of why.

    An explicit spec wins; otherwise the newest run under `runs_dir`; otherwise the shipped
    default model; otherwise a clear error telling the user to train first.
    """
    if spec is not None:
        return resolve_checkpoint(spec), ""
    run = latest_run(runs_dir)
    if run is not None:
        path = resolve_checkpoint(run)
        return path, f"using the newest run's checkpoint {path}"
    if default_model_available():
        return resolve_checkpoint("default"), "using the default model shipped with musicgpt"
    raise CheckpointError(
        f"no trained model found (no run under {runs_dir}/ and no default model): "
        "train one first with `musicgpt train midi_data/`"
    )


def describe(path: Path) -> tuple[Checkpoint, dict[str, tuple[str, tuple[int, ...]]]]:
    """The checkpoint its header's metadata describes (types and bounds checked), and the shapes."""
    raw, shapes = read_header(path)
    meta = parse_metadata(path, raw)
    try:
        codec_config = CodecConfig.from_dict(meta["codec_config"])
        ckpt = Checkpoint(
            ModelConfig.from_dict(meta["model_config"]),
            codec_config,
            dict(meta.get("state", {})),
            path,
            meta,
            Controls.from_dict(meta.get("controls"), codec_config),
        )
    except TypeError as e:  # a missing field without a default
        raise CheckpointError(f"{path}: checkpoint configuration is incomplete ({e})") from None
    except MusicGPTError as e:
        raise CheckpointError(f"{path}: bad configuration in checkpoint ({e})") from None
    return ckpt, shapes


def check_vocabulary(ckpt: Checkpoint) -> None:
    """Refuse a checkpoint whose model vocabulary differs from its codec's and control tokens'."""
    if ckpt.model_config.vocab_size != ckpt.controls.vocab_size:
        raise CheckpointError(
            f"{ckpt.path}: model vocabulary ({ckpt.model_config.vocab_size}) does not match the codec's and "
            f"control tokens' ({ckpt.controls.vocab_size})"
        )


def read_checkpoint_meta(spec: str | os.PathLike) -> Checkpoint:
    """What a checkpoint's header describes, all checked but the tensors' shapes (which need torch):
    types, bounds, the vocabulary against the control tokens. No tensor is read."""
    ckpt, _ = describe(resolve_checkpoint(spec))
    check_vocabulary(ckpt)
    return ckpt


def peek_checkpoint(path: str | os.PathLike) -> Checkpoint | None:
    """What a checkpoint's header metadata describes (no tensors read, shapes not compared), or None
    if it is unreadable: the caller goes on with defaults and `load_checkpoint` then says exactly
    what is wrong."""
    try:
        return describe(Path(path))[0]
    except MusicGPTError:
        return None


def peek_model_config(path: str | os.PathLike) -> ModelConfig | None:
    """The model configuration from a checkpoint's header alone (no tensors read), or None if unreadable."""
    ckpt = peek_checkpoint(path)
    return ckpt.model_config if ckpt else None


def peek_codec_config(path: str | os.PathLike) -> CodecConfig | None:
    """The codec configuration from a checkpoint's header alone (no tensors read), or None if unreadable."""
    ckpt = peek_checkpoint(path)
    return ckpt.codec_config if ckpt else None


def peek_controls(path: str | os.PathLike) -> Controls | None:
    """The control tokens (tags, FIM) from a checkpoint's header alone, or None if unreadable."""
    ckpt = peek_checkpoint(path)
    return ckpt.controls if ckpt else None
