"""The options of a training run (`TrainConfig`), their per-device defaults, and the schedule.

`resolve` fills what the user left out for the device and checks every value before any work;
`lr_at` is the learning rate at each step: linear warmup, then cosine decay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from musicgpt.attention import choose_kernel
from musicgpt.errors import MusicGPTError
from musicgpt.fim import FIM_RATE
from musicgpt.model_config import PRESETS


@dataclass
class TrainConfig:
    """Options of a training run; None means 'the default for this device' (see `resolve`)."""

    data_dir: str = "midi_data"
    out: str | None = None  # run folder; default runs/<timestamp>
    preset: str | None = None
    attention: str | None = None  # "relative" or "absolute"; overrides the preset
    max_steps: int | None = None
    stop_at: int | None = None  # pause at this step (the schedule still runs to max_steps)
    batch_size: int | None = None
    seq_len: int | None = None
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup: int | None = None
    grad_accum: int = 1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dropout: float | None = None
    attn_dropout: float | None = None  # attention-weight dropout (default: the preset's)
    attn_impl: str | None = None  # relative attention kernel, MusicGPT.attn_impl (default "auto")
    device: str = "auto"
    precision: str = "auto"  # "auto" | "fp32" | "bf16"
    compile: bool = False
    resume: str | None = None  # run folder to continue
    init: str | None = None  # checkpoint to fine-tune from ("default" = the shipped model)
    seed: int = 1337
    augment: bool = True
    fim_rate: float | None = None  # share of windows in fill-in-the-middle order (default FIM_RATE)
    sounding_notes: bool | None = None  # read the keyboard state (None: as the --init model; a new one does)
    # NOTE_OFF only for sounding keys (None: as the --init model; a new model reading the keyboard does)
    sounding_releases: bool | None = None
    tag_dropout: float = 0.1  # share of tagged windows shown without their tag
    tag_weights: dict[str, float] | None = None  # style tag -> how much more often its pieces are drawn
    val_fraction: float = 0.1
    eval_interval: int | None = None
    eval_batches: int = 16
    log_interval: int = 10
    workers: int | None = None  # data loader workers (default: 0 on CPU, 4 on CUDA)
    threads: int | None = None  # CPU threads for torch (default: torch's choice)


# Defaults per device: the CPU ones train `tiny` on midi_data/ in about ten minutes on 2 cores.
CPU_DEFAULTS = dict(preset="tiny", max_steps=1200, batch_size=16, seq_len=256, lr=2e-3, warmup=100, eval_interval=100)
CUDA_DEFAULTS = dict(preset="small", max_steps=5000, batch_size=32, seq_len=1024, lr=6e-4, warmup=200,
                     eval_interval=250)


# What a resumed run may change: more steps, a new pause point, another device or data path.
RESUME_OVERRIDES = ("max_steps", "stop_at", "device", "compile", "workers", "threads", "data_dir", "attn_impl")


def resolve(cfg: TrainConfig, device: str) -> TrainConfig:
    """Fill unset options with the defaults for `device` and validate them."""
    defaults = CUDA_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    for k, v in defaults.items():
        if values[k] is None:
            values[k] = v
    out = TrainConfig(**values)
    for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_interval", "eval_batches", "log_interval",
                 "threads"):
        if getattr(out, name) is not None and getattr(out, name) < 1:
            raise MusicGPTError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(out, name)}")
    if not (out.lr > 0 and math.isfinite(out.lr)):
        raise MusicGPTError(f"--lr must be a positive number, got {out.lr}")
    if out.stop_at is not None and out.stop_at < 1:
        raise MusicGPTError(f"--stop-at must be at least 1, got {out.stop_at}")
    if out.fim_rate is None:
        out.fim_rate = FIM_RATE
    for name in ("dropout", "attn_dropout", "fim_rate", "tag_dropout"):
        value = getattr(out, name)
        if value is not None and not 0.0 <= value < 1.0:
            raise MusicGPTError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
    for tag, weight in (out.tag_weights or {}).items():
        if not (isinstance(weight, (int, float)) and 0 < weight < math.inf):
            raise MusicGPTError(f"--tag-weight {tag}: the weight must be a positive number, got {weight}")
    if out.warmup < 0:
        raise MusicGPTError(f"--warmup must not be negative, got {out.warmup}")
    if out.preset not in PRESETS:
        raise MusicGPTError(f"unknown --preset {out.preset!r}; choose one of {', '.join(PRESETS)}")
    if not 0.0 <= out.val_fraction < 1.0:
        raise MusicGPTError(f"--val-fraction must be in [0, 1), got {out.val_fraction}")
    if out.precision not in ("auto", "fp32", "bf16"):
        raise MusicGPTError(f"--precision must be auto, fp32 or bf16, got {out.precision}")
    if out.attention not in (None, "relative", "absolute"):
        raise MusicGPTError(f"--attention must be relative or absolute, got {out.attention}")
    if out.attn_impl is not None:  # can this device run the kernel asked for?
        try:
            choose_kernel(out.attn_impl, torch.device(device), False, out.seq_len)
        except MusicGPTError as e:
            raise MusicGPTError(f"--attn-impl: {e}") from None
    return out


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / (cfg.warmup + 1)
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * ratio
