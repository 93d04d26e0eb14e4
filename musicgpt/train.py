"""Training: `musicgpt train DATA_DIR` on one CPU, one GPU, or several under torchrun.

The loop is nanoGPT's: AdamW (decay on matrices only), linear warmup then cosine decay,
gradient accumulation and clipping, bf16 autocast on CUDA. Every figure goes to
`RUN_DIR/metrics.jsonl`; `loss.png` is redrawn at each evaluation; `last` and `best`
checkpoints are written atomically, and `--resume` continues a run exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from musicgpt import atomic, checkpoint, data, fast_attention
from musicgpt.errors import MusicGPTError
from musicgpt.model import PRESETS, ModelConfig, MusicGPT, preset


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
    val_fraction: float = 0.1
    eval_interval: int | None = None
    eval_batches: int = 16
    log_interval: int = 10
    workers: int | None = None  # data loader workers (default: 0 on CPU, 4 on CUDA)
    threads: int | None = None  # CPU threads for torch (default: torch's choice)


# Defaults per device: the CPU ones train `tiny` on midi_data/ in about ten minutes on 2 cores.
CPU_DEFAULTS = dict(preset="tiny", max_steps=1200, batch_size=16, seq_len=256, lr=2e-3, warmup=100, eval_interval=100)
CUDA_DEFAULTS = dict(preset="small", max_steps=5000, batch_size=32, seq_len=1024, lr=6e-4, warmup=200, eval_interval=250)


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
    for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_interval", "eval_batches", "log_interval", "threads"):
        if getattr(out, name) is not None and getattr(out, name) < 1:
            raise MusicGPTError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(out, name)}")
    if not (out.lr > 0 and math.isfinite(out.lr)):
        raise MusicGPTError(f"--lr must be a positive number, got {out.lr}")
    if out.stop_at is not None and out.stop_at < 1:
        raise MusicGPTError(f"--stop-at must be at least 1, got {out.stop_at}")
    for name in ("dropout", "attn_dropout"):
        value = getattr(out, name)
        if value is not None and not 0.0 <= value < 1.0:
            raise MusicGPTError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
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
            fast_attention.fused_kernel(out.attn_impl, torch.device(device), False, out.seq_len)
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


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: str) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, LayerNorm gains or 1-D params)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


class StepBatches(torch.utils.data.Sampler):
    """Yields the dataset indices of each micro-batch from `start_step` on, split across ranks."""

    def __init__(self, cfg: TrainConfig, start_step: int, rank: int, world: int):
        self.cfg, self.start, self.rank, self.world = cfg, start_step, rank, world

    def __iter__(self):
        c = self.cfg
        for micro in range(self.start * c.grad_accum, c.max_steps * c.grad_accum):
            first = (micro * self.world + self.rank) * c.batch_size
            yield list(range(first, first + c.batch_size))

    def __len__(self) -> int:
        return (self.cfg.max_steps - self.start) * self.cfg.grad_accum


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: str) -> _Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _pick_device(name: str, d: _Dist) -> str:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MusicGPTError("--device cuda was asked for but CUDA is not available")
        if d.world > 1 or os.environ.get("LOCAL_RANK"):
            name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    elif name != "cpu" and name != "mps":
        raise MusicGPTError(f"--device must be auto, cpu, cuda or mps, got {name}")
    return name


def _build_model(cfg: TrainConfig, codec_config, resume_ckpt, init) -> tuple[MusicGPT, ModelConfig]:
    """A fresh model for a resumed run (its weights are restored later), the `init` checkpoint's
    model (the corpus was encoded with its codec), or a new model from the preset."""
    if resume_ckpt is not None:
        mcfg = resume_ckpt.model_config
        return MusicGPT(mcfg), mcfg
    if init is not None:
        model, mcfg = checkpoint.build_model(*init), init[1].model_config
        if cfg.seq_len > mcfg.context_len:
            if mcfg.attention != "relative":
                raise MusicGPTError(f"--seq-len {cfg.seq_len} exceeds {cfg.init}'s context ({mcfg.context_len}); "
                                    "only a relative-attention model can be extended")
            # Relative attention has no per-position weights, so a longer context is just a
            # longer window: the same weights, fine-tuned on longer sequences.
            mcfg = ModelConfig.from_dict({**mcfg.to_dict(), "context_len": cfg.seq_len})
            model.config = mcfg
        return model.train(), mcfg
    overrides = {"vocab_size": codec_config.vocab_size}
    if cfg.attention:
        overrides["attention"] = cfg.attention
    for name in ("dropout", "attn_dropout"):
        if getattr(cfg, name) is not None:
            overrides[name] = getattr(cfg, name)
    mcfg = preset(cfg.preset, **overrides)
    if cfg.seq_len > mcfg.context_len:
        mcfg = ModelConfig.from_dict({**mcfg.to_dict(), "context_len": cfg.seq_len})
    return MusicGPT(mcfg), mcfg


@torch.no_grad()
def evaluate(model: MusicGPT, batches: list[tuple[torch.Tensor, torch.Tensor]], device: str, autocast) -> float:
    """Mean cross-entropy in nats per token over `batches`, counting every real target once."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast:
            logits, _ = model(x)
        n = int((y != data.IGNORE_INDEX).sum())
        loss = torch.nn.functional.cross_entropy(
            logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=data.IGNORE_INDEX, reduction="sum"
        )
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(1, count)


def _val_batches(pieces, cfg: TrainConfig, codec_config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # A fixed, evenly spread subset keeps evaluation quick and comparable between evaluations.
    return data.eval_batches(pieces, cfg.seq_len, codec_config, cfg.batch_size,
                             limit=cfg.eval_batches * cfg.batch_size)


class RunLog:
    """Appends metrics to RUN_DIR/metrics.jsonl and redraws loss.png (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.run_dir, self.enabled = run_dir, enabled
        self.path = run_dir / "metrics.jsonl"
        if enabled and self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a killed run's half-written line must not swallow the next record
                    f.write(b"\n")

    def write(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def draw(self) -> None:
        if self.enabled:
            from musicgpt.plot import plot_loss_curves

            plot_loss_curves(self.path, self.run_dir / "loss.png")


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train a model as `cfg` says and return the run folder holding its checkpoints."""
    d = _setup_distributed("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    device = _pick_device(cfg.device, d)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)

    resume_tensors, resume_ckpt = None, None
    if cfg.resume:
        run_dir = Path(cfg.resume)
        resume_tensors, resume_ckpt = checkpoint.load_checkpoint(run_dir / "last.safetensors")
        stored = resume_ckpt.state.get("train_config", {})
        # The stored run's options win, except those that may change between sessions.
        names = {f.name for f in fields(cfg)}
        merged = {k: v for k, v in stored.items() if k in names}
        merged.update({k: getattr(cfg, k) for k in RESUME_OVERRIDES if getattr(cfg, k) is not None})
        cfg = TrainConfig(**{**merged, "resume": cfg.resume, "out": str(run_dir)})
    cfg = resolve(cfg, device)
    run_dir = Path(cfg.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + d.rank)
    init = checkpoint.load_checkpoint(cfg.init) if cfg.init and resume_ckpt is None else None
    codec_config = resume_ckpt.codec_config if resume_ckpt else init[1].codec_config if init else None
    corpus = data.encode_folder(cfg.data_dir, codec_config, progress=progress and d.main)
    codec_config = corpus.config
    train_pieces, val_pieces = data.split_files(corpus.pieces, cfg.val_fraction)
    if not val_pieces:
        val_pieces = train_pieces  # a one-file corpus: validate on it rather than not at all

    model, mcfg = _build_model(cfg, codec_config, resume_ckpt, init)
    if d.main:  # only now: a bad data folder or option leaves no empty run folder behind
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale_temp_files(run_dir)  # what a killed run was writing
    model.to(device)
    model.attn_impl = cfg.attn_impl or "auto"
    optimizer = make_optimizer(model, cfg, device)
    state = {"step": 0, "tokens_seen": 0, "best_val": None, "elapsed_s": 0.0}
    if resume_ckpt is not None:
        checkpoint.restore_training(resume_tensors, resume_ckpt, model, optimizer)
        state.update({k: resume_ckpt.state[k] for k in state if k in resume_ckpt.state})
    if init is not None and d.main:
        print(f"musicgpt: fine-tuning from {cfg.init}", file=sys.stderr)

    train_model = model
    if cfg.compile:
        train_model = torch.compile(model)
    if d.world > 1:
        train_model = DistributedDataParallel(train_model, device_ids=[d.local_rank] if device.startswith("cuda") else None)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.startswith("cuda"))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 and device.startswith("cuda") else nullcontext()

    dataset = data.TokenWindowDataset(
        train_pieces, cfg.seq_len, codec_config, augment=data.Augment() if cfg.augment else None, seed=cfg.seed
    )
    workers = cfg.workers if cfg.workers is not None else (4 if device.startswith("cuda") else 0)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=StepBatches(cfg, state["step"], d.rank, d.world),
        collate_fn=data.collate,
        num_workers=workers,
        pin_memory=device.startswith("cuda"),
        # Its own generator: a loader drawing its base seed from the global RNG would shift the
        # dropout stream of a resumed run away from the uninterrupted one.
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    val_batches = _val_batches(val_pieces, cfg, codec_config)
    log = RunLog(run_dir, d.main)
    # A pause point belongs to one session, not to the run: a resumed run goes on to max_steps.
    stored_cfg = {k: v for k, v in asdict(cfg).items() if k not in ("resume", "init", "stop_at")}

    def save(name: str, with_optimizer: bool) -> None:
        if d.main:
            checkpoint.save_checkpoint(
                run_dir / name, model, codec_config,
                state={**state, "train_config": stored_cfg}, optimizer=optimizer if with_optimizer else None,
            )

    if d.main:
        print(
            f"musicgpt: training {mcfg.n_layer}-layer {mcfg.attention} model ({model.num_params() / 1e6:.2f}M params) "
            f"on {len(train_pieces)} files ({sum(len(p.tokens) for p in train_pieces):,} tokens), "
            f"validating on {len(val_pieces)}; device {device}; run folder {run_dir}",
            file=sys.stderr,
        )
        if (device.startswith("cuda") and mcfg.attention == "relative" and mcfg.attention_dropout > 0
                and cfg.seq_len >= fast_attention.FLEX_MIN_LEN):
            print(f"musicgpt: attention dropout {mcfg.attention_dropout} keeps {cfg.seq_len}-token training on the "
                  f"eager path (L x L tensors per layer); --attn-dropout 0 uses the fused FlexAttention kernel",
                  file=sys.stderr)
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="training", unit="step", disable=not (progress and d.main))
    stop = min(cfg.max_steps, cfg.stop_at or cfg.max_steps)
    batches = iter(loader)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * d.world
    t_last, step_time = time.time(), None
    try:
        while state["step"] < stop:
            step = state["step"]
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                x, y = next(batches)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = d.world == 1 or micro == cfg.grad_accum - 1
                with (nullcontext() if sync else train_model.no_sync()), autocast:
                    _, loss = train_model(x, y)
                (loss / cfg.grad_accum).backward()
                loss_sum += float(loss.detach())
            train_loss = loss_sum / cfg.grad_accum
            if not math.isfinite(train_loss):
                raise MusicGPTError(
                    f"training diverged: loss is {train_loss} at step {step}; the last good checkpoint "
                    f"is kept in {run_dir} (try a lower --lr)"
                )
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            now = time.time()
            step_time, t_last = now - t_last, now
            state["step"] = step + 1
            state["tokens_seen"] += tokens_per_step
            state["elapsed_s"] += step_time
            tok_s = tokens_per_step / max(step_time, 1e-9)
            bar.update()
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
            if state["step"] % cfg.log_interval == 0:
                log.write(step=state["step"], split="train", loss=train_loss, lr=lr, tokens_per_s=tok_s,
                          tokens_seen=state["tokens_seen"], time_s=state["elapsed_s"])
            if state["step"] % cfg.eval_interval == 0 or state["step"] == cfg.max_steps:
                _evaluate_and_save(model, val_batches, device, autocast, state, log, save, bar)
                t_last = time.time()  # evaluation time is not training time
    except KeyboardInterrupt:
        save("last", with_optimizer=True)
        bar.close()
        if d.main:
            print(f"musicgpt: interrupted at step {state['step']}; resume with --resume {run_dir}", file=sys.stderr)
        return run_dir
    if state["step"] % cfg.eval_interval and state["step"] != cfg.max_steps:
        _evaluate_and_save(model, val_batches, device, autocast, state, log, save, bar)
    bar.close()
    if d.main:
        best = state["best_val"]
        print(f"musicgpt: stopped at step {state['step']}; best validation loss {best:.4f} nats/token "
              f"({best / math.log(2):.4f} bits); checkpoints in {run_dir}", file=sys.stderr)
    if d.world > 1:
        dist.barrier()
    return run_dir


def _evaluate_and_save(model, val_batches, device, autocast, state, log, save, bar) -> None:
    val = evaluate(model, val_batches, device, autocast)
    if not math.isfinite(val):
        raise MusicGPTError(f"training diverged: validation loss is {val} at step {state['step']}")
    log.write(step=state["step"], split="val", loss=val, bits=val / math.log(2), tokens_seen=state["tokens_seen"],
              time_s=state["elapsed_s"])
    if log.enabled:
        bar.write(f"step {state['step']}: val loss {val:.4f} nats/token ({val / math.log(2):.4f} bits)")
    if state["best_val"] is None or val < state["best_val"]:
        state["best_val"] = val
        save("best", with_optimizer=False)
    save("last", with_optimizer=True)
    log.draw()
