"""Training: `musicgpt train DATA_DIR` (a MIDI folder or a token store) on one CPU, one GPU, or several under torchrun.

The loop is nanoGPT's: AdamW (decay on matrices only), linear warmup then cosine decay,
gradient accumulation and clipping, bf16 autocast on CUDA. `train` reads as its steps: join the
process group and pick the device, take a resumed run's options (`resume_config`), encode the
corpus (`load_corpus`), build the model and optimizer (`start_run`), compile / wrap in DDP
(`wrap_model`), then the loop (`run_loop`: `train_step`, `evaluate_and_save`) and `finish`.
Every figure goes to `RUN_DIR/metrics.jsonl`; `loss.png` is redrawn at each evaluation; `last`
and `best` checkpoints are written atomically, and `--resume` continues a run exactly where it
stopped (the `RunState` and the optimizer and random state travel in `last`).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from musicgpt import atomic, checkpoint, data, windows
from musicgpt.attention.flex import FLEX_MIN_LEN
from musicgpt.controls import Controls
from musicgpt.distributed import Ranks, any_rank_stopped, join_process_group, training_device
from musicgpt.errors import Interrupted, MusicGPTError
from musicgpt.evaluate import mean_loss
from musicgpt.interrupts import deferred_signals
from musicgpt.model import ModelConfig, MusicGPT, preset
from musicgpt.store import StorePieces, TokenStore, is_store
from musicgpt.train_config import RESUME_OVERRIDES, TrainConfig, lr_at, resolve
from musicgpt.vocab import CodecConfig


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
class RunState:
    """How far a run has come; saved in every checkpoint, restored on resume."""

    step: int = 0
    tokens_seen: int = 0
    best_val: float | None = None
    elapsed_s: float = 0.0

    @classmethod
    def from_checkpoint(cls, state: dict) -> RunState:
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})


@dataclass
class Corpus:
    """The encoded training and validation pieces, and the codec that encoded them. From a token
    store, `train` is a `store.StorePieces` (memory-mapped) and `val` holds views of its shards."""

    codec_config: CodecConfig
    train: list[data.Piece] | StorePieces
    val: list[data.Piece]
    tags: tuple[str, ...] = ()  # every piece's tag, sorted

    @property
    def train_tokens(self) -> int:
        if isinstance(self.train, StorePieces):
            return self.train.num_tokens
        return sum(len(p.tokens) for p in self.train)


@dataclass
class Run:
    """Everything one training run holds while its loop runs."""

    cfg: TrainConfig
    ranks: Ranks
    device: str
    run_dir: Path
    controls: Controls  # the model's control tokens; its codec config is `controls.codec`
    model: MusicGPT
    optimizer: torch.optim.Optimizer
    state: RunState
    log: RunLog
    step_model: torch.nn.Module | None = None  # the model as compiled / wrapped in DDP
    autocast: object = field(default_factory=nullcontext)

    def save(self, name: str, with_optimizer: bool) -> None:
        """Write checkpoint `name` (rank 0 only); `last` carries what --resume needs."""
        if not self.ranks.main:
            return
        # A pause point belongs to one session, not to the run: a resumed run goes on to max_steps.
        stored = {k: v for k, v in asdict(self.cfg).items() if k not in ("resume", "init", "stop_at")}
        checkpoint.save_checkpoint(self.run_dir / name, self.model, self.codec_config,
                                   state={**asdict(self.state), "train_config": stored},
                                   optimizer=self.optimizer if with_optimizer else None, controls=self.controls)

    @property
    def codec_config(self) -> CodecConfig:
        return self.controls.codec


def resume_config(cfg: TrainConfig) -> tuple[TrainConfig, tuple | None]:
    """With --resume, the stored run's options (except those a session may change) and its `last`
    checkpoint as `load_checkpoint` reads it; otherwise `cfg` unchanged and None."""
    if not cfg.resume:
        return cfg, None
    run_dir = Path(cfg.resume)
    resumed = checkpoint.load_checkpoint(run_dir / "last.safetensors")
    stored = resumed[1].state.get("train_config", {})
    names = {f.name for f in fields(cfg)}
    merged = {"fim_rate": 0.0, **{k: v for k, v in stored.items() if k in names}}  # older runs had no FIM
    merged.update({k: getattr(cfg, k) for k in RESUME_OVERRIDES if getattr(cfg, k) is not None})
    return TrainConfig(**{**merged, "resume": cfg.resume, "out": str(run_dir)}), resumed


def load_corpus(cfg: TrainConfig, codec_config, progress: bool) -> Corpus:
    """Encode the data folder (with the codec of the run or model we continue, if any) and split it;
    a token store (`musicgpt prepare`) is opened instead, its codec checked against that one."""
    if is_store(cfg.data_dir):
        return store_corpus(cfg, codec_config)
    encoded = data.encode_folder(cfg.data_dir, codec_config, progress=progress)
    train_pieces, val_pieces = data.split_files(encoded.pieces, cfg.val_fraction)
    if not val_pieces:
        val_pieces = train_pieces  # a one-file corpus: validate on it rather than not at all
    return Corpus(encoded.config, train_pieces, val_pieces, encoded.tags)


def store_corpus(cfg: TrainConfig, codec_config) -> Corpus:
    """The training pieces of a token store, memory-mapped, and its validation pieces, split as
    `load_corpus` splits the folder it was prepared from."""
    tokens = TokenStore(cfg.data_dir)
    if codec_config is not None and codec_config != tokens.codec_config:
        raise MusicGPTError(f"{cfg.data_dir}: the store was encoded with codec {tokens.codec_config.to_dict()}, "
                            f"but the model continued uses {codec_config.to_dict()}")
    if not len(tokens):
        raise MusicGPTError(f"{cfg.data_dir}: the token store holds no pieces")
    train_numbers, val_numbers = tokens.split(cfg.val_fraction)
    if not len(val_numbers):
        val_numbers = train_numbers  # a one-file corpus: validate on it rather than not at all
    tags = tuple(sorted({tokens.tag_names[c] for c in np.unique(tokens.index["tag"]) if c >= 0}))
    return Corpus(tokens.codec_config, tokens.source(train_numbers), tokens.pieces(val_numbers), tags)


def run_controls(cfg: TrainConfig, corpus: Corpus, resumed, init) -> Controls:
    """The control tokens of the model: a resumed run's; the `--init` model's, extended by FIM
    sentinels (with --fim-rate above 0) and by the corpus's new tags; else those two alone."""
    if resumed is not None:
        controls = resumed[1].controls
        if cfg.fim_rate > 0 and not controls.fim:  # a run from before FIM goes on without it
            cfg.fim_rate = 0.0
        return controls
    if init is not None:
        return init[1].controls.extended(cfg.fim_rate > 0, corpus.tags)
    return Controls(corpus.codec_config, cfg.fim_rate > 0, corpus.tags)


def _build_model(cfg: TrainConfig, controls: Controls, resumed, init) -> MusicGPT:
    """A fresh model for a resumed run (its weights are restored later), the `init` checkpoint's
    model (the corpus was encoded with its codec), or a new model from the preset."""
    if resumed is not None:
        return MusicGPT(resumed[1].model_config, controls)
    if init is not None:
        model, mcfg = checkpoint.build_model(*init), init[1].model_config
        if controls != init[1].controls:  # new tags or FIM sentinels: rows added to the embedding
            model.resize_vocab(controls.vocab_size, init[1].controls.id_map(controls), controls)
            mcfg = model.config
        changes = {}
        if cfg.dropout is not None or cfg.attn_dropout is not None:
            # Dropout has no weights: the same weights in a model built with the rates asked for
            # (attention dropout follows --dropout unless given, as with a preset).
            changes = {"dropout": mcfg.dropout if cfg.dropout is None else cfg.dropout,
                       "attn_dropout": cfg.attn_dropout}
        if cfg.sounding_notes is not None and cfg.sounding_notes != mcfg.sounding_notes:
            if not cfg.sounding_notes:
                raise MusicGPTError(f"{cfg.init} reads the keyboard state; --no-sounding-notes cannot remove it")
            changes["sounding_notes"] = True  # a new input, zero at first: the same predictions
        if cfg.sounding_releases is not None and cfg.sounding_releases != mcfg.sounding_releases:
            changes["sounding_releases"] = cfg.sounding_releases  # no weights: a change of output only
        if changes:
            model = rebuilt(model, changes)
            mcfg = model.config
        if cfg.seq_len > mcfg.context_len:
            if mcfg.attention != "relative":
                raise MusicGPTError(f"--seq-len {cfg.seq_len} exceeds {cfg.init}'s context ({mcfg.context_len}); "
                                    "only a relative-attention model can be extended")
            # Relative attention has no per-position weights, so a longer context is just a
            # longer window: the same weights, fine-tuned on longer sequences.
            model.config = ModelConfig.from_dict({**mcfg.to_dict(), "context_len": cfg.seq_len})
        return model.train()
    overrides = {"vocab_size": controls.vocab_size}
    if cfg.attention:
        overrides["attention"] = cfg.attention
    for name in ("dropout", "attn_dropout"):
        if getattr(cfg, name) is not None:
            overrides[name] = getattr(cfg, name)
    overrides["sounding_notes"] = cfg.sounding_notes is not False  # a new model reads the keyboard by default
    releases = cfg.sounding_releases
    overrides["sounding_releases"] = overrides["sounding_notes"] if releases is None else releases
    mcfg = preset(cfg.preset, **overrides)
    if cfg.seq_len > mcfg.context_len:
        mcfg = ModelConfig.from_dict({**mcfg.to_dict(), "context_len": cfg.seq_len})
    return MusicGPT(mcfg, controls)


def rebuilt(model: MusicGPT, changes: dict) -> MusicGPT:
    """`model`'s weights in a model whose config has these changes; an input the old model lacked
    (the keyboard's) keeps its zero start."""
    new = MusicGPT(ModelConfig.from_dict({**model.config.to_dict(), **changes}), model.controls)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("keyboard.") for k in missing):
        first = (unexpected or missing)[0]
        raise MusicGPTError(f"cannot rebuild the model with {changes}: {first} does not carry over")
    return new


def start_run(cfg: TrainConfig, corpus: Corpus, resumed, init, device: str, ranks: Ranks, run_dir: Path) -> Run:
    """The model and optimizer (restored on resume), the run folder and its log."""
    controls = run_controls(cfg, corpus, resumed, init)
    model = _build_model(cfg, controls, resumed, init)
    if ranks.main:  # only now: a bad data folder or option leaves no empty run folder behind
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale_temp_files(run_dir)  # what a killed run was writing
    model.to(device)
    model.attn_impl = cfg.attn_impl or "auto"
    optimizer = make_optimizer(model, cfg, device)
    state = RunState()
    if resumed is not None:
        checkpoint.restore_training(*resumed, model, optimizer)
        state = RunState.from_checkpoint(resumed[1].state)
    if init is not None and ranks.main:
        print(f"musicgpt: fine-tuning from {cfg.init}", file=sys.stderr)
    return Run(cfg, ranks, device, run_dir, controls, model, optimizer, state, RunLog(run_dir, ranks.main))


def wrap_model(run: Run) -> None:
    """Compile and wrap in DDP as asked, and choose the autocast of the forward passes."""
    cfg, cuda = run.cfg, run.device.startswith("cuda")
    step_model = torch.compile(run.model) if cfg.compile else run.model
    if run.ranks.world > 1:
        step_model = DistributedDataParallel(step_model, device_ids=[run.ranks.local_rank] if cuda else None)
    run.step_model = step_model
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    run.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 and cuda else nullcontext()


def make_loader(run: Run, pieces: list | StorePieces) -> torch.utils.data.DataLoader:
    """The training batches from the run's current step on, this rank's share of each."""
    cfg, cuda = run.cfg, run.device.startswith("cuda")
    dataset = windows.TokenWindowDataset(pieces, cfg.seq_len, run.codec_config, seed=cfg.seed,
                                         augment=windows.Augment() if cfg.augment else None,
                                         controls=run.controls, fim_rate=cfg.fim_rate, tag_dropout=cfg.tag_dropout,
                                         tag_weights=cfg.tag_weights)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=StepBatches(cfg, run.state.step, run.ranks.rank, run.ranks.world),
        collate_fn=windows.collate,
        num_workers=cfg.workers if cfg.workers is not None else (4 if cuda else 0),
        pin_memory=cuda,
        # Its own generator: a loader drawing its base seed from the global RNG would shift the
        # dropout stream of a resumed run away from the uninterrupted one.
        generator=torch.Generator().manual_seed(cfg.seed),
    )


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
    ranks = join_process_group(cfg.device)
    device = training_device(cfg.device, ranks)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    cfg, resumed = resume_config(cfg)
    cfg = resolve(cfg, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + ranks.rank)
    run_dir = atomic.check_output_folder(cfg.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    init = checkpoint.load_checkpoint(cfg.init) if cfg.init and resumed is None else None
    continued = resumed or init  # the corpus is encoded with the codec of what we continue
    corpus = load_corpus(cfg, continued[1].codec_config if continued else None, progress and ranks.main)
    run = start_run(cfg, corpus, resumed, init, device, ranks, run_dir)
    wrap_model(run)
    announce(run, corpus)
    return run_loop(run, corpus, progress)


def announce(run: Run, corpus: Corpus) -> None:
    """One line on what is trained, on what, where (rank 0), and a hint if a kernel is ruled out."""
    if not run.ranks.main:
        return
    mcfg, cfg = run.model.config, run.cfg
    print(f"musicgpt: training {mcfg.n_layer}-layer {mcfg.attention} model "
          f"({run.model.num_params() / 1e6:.2f}M params) on {len(corpus.train)} files "
          f"({corpus.train_tokens:,} tokens), validating on {len(corpus.val)}; "
          f"device {run.device}; run folder {run.run_dir}", file=sys.stderr)
    if (run.device.startswith("cuda") and mcfg.attention == "relative" and mcfg.attn_dropout > 0
            and cfg.seq_len >= FLEX_MIN_LEN):
        print(f"musicgpt: attention dropout {mcfg.attn_dropout} keeps {cfg.seq_len}-token training on the "
              f"eager path (L x L tensors per layer); --attn-dropout 0 uses the fused FlexAttention kernel",
              file=sys.stderr)


def run_loop(run: Run, corpus: Corpus, progress: bool) -> Path:
    """Step until max_steps (or --stop-at), evaluating and saving as it goes.

    SIGINT / SIGTERM stop it between steps: the step in progress finishes, `last` is saved and
    `Interrupted` is raised, so `--resume` continues exactly as if nothing had happened.
    """
    cfg, state = run.cfg, run.state
    # A fixed, evenly spread subset keeps evaluation quick and comparable between evaluations.
    val_batches = validation_batches(run, corpus)
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="training", unit="step",
               disable=not (progress and run.ranks.main))
    stop = min(cfg.max_steps, cfg.stop_at or cfg.max_steps)
    batches = iter(make_loader(run, corpus.train))
    with deferred_signals() as request:
        while state.step < stop and not any_rank_stopped(request, run.ranks, run.device):
            train_step(run, batches, bar)
            if state.step % cfg.eval_interval == 0 or state.step == cfg.max_steps:
                evaluate_and_save(run, val_batches, bar)
        if any_rank_stopped(request, run.ranks, run.device):
            run.save("last", with_optimizer=True)
            bar.close()
            raise Interrupted(request.signum or signal.SIGINT,
                              f"interrupted at step {state.step}; resume with --resume {run.run_dir}")
    if state.step % cfg.eval_interval and state.step != cfg.max_steps:
        evaluate_and_save(run, val_batches, bar)
    bar.close()
    finish(run)
    return run.run_dir


def train_step(run: Run, batches, bar: tqdm) -> None:
    """One optimizer step over grad_accum micro-batches; logs its loss, learning rate and speed."""
    cfg, state, ranks = run.cfg, run.state, run.ranks
    t_start = time.time()
    lr = lr_at(state.step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = 0.0
    for micro in range(cfg.grad_accum):
        x, y, sounding = (t.to(run.device, non_blocking=True) for t in next(batches))
        sync = ranks.world == 1 or micro == cfg.grad_accum - 1
        with (nullcontext() if sync else run.step_model.no_sync()), run.autocast:
            _, loss = run.step_model(x, y, sounding=sounding)
        (loss / cfg.grad_accum).backward()
        loss_sum += float(loss.detach())
    train_loss = loss_sum / cfg.grad_accum
    if not math.isfinite(train_loss):
        raise MusicGPTError(f"training diverged: loss is {train_loss} at step {state.step}; the last good "
                            f"checkpoint is kept in {run.run_dir} (try a lower --lr)")
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    step_time = time.time() - t_start  # the batch wait counts, evaluation does not
    tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum * ranks.world
    state.step += 1
    state.tokens_seen += tokens
    state.elapsed_s += step_time
    tok_s = tokens / max(step_time, 1e-9)
    bar.update()
    bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
    if state.step % cfg.log_interval == 0:
        run.log.write(step=state.step, split="train", loss=train_loss, lr=lr, tokens_per_s=tok_s,
                      tokens_seen=state.tokens_seen, time_s=state.elapsed_s)


def validation_batches(run: Run, corpus: Corpus) -> dict[str, list]:
    """A fixed, evenly spread subset of the validation windows, so evaluation is quick and
    comparable between evaluations: left to right ("val"), and with FIM the middles ("val_infill")."""
    cfg, limit = run.cfg, run.cfg.eval_batches * run.cfg.batch_size
    out = {"val": windows.eval_batches(corpus.val, cfg.seq_len, run.codec_config, cfg.batch_size, limit,
                                       run.controls)}
    if run.controls.fim:
        infill = windows.infill_windows(corpus.val, cfg.seq_len, run.codec_config, run.controls, seed=cfg.seed,
                                        limit=limit)
        out["val_infill"] = windows.batches(infill, cfg.batch_size)
    return out


def evaluate_and_save(run: Run, val_batches: dict[str, list], bar: tqdm) -> None:
    """Validation losses, logged and drawn; `best` if the left-to-right one is the lowest yet, and
    `last` always."""
    state = run.state
    losses = {split: mean_loss(run.model, b, run.device, run.autocast) for split, b in val_batches.items()}
    val = losses["val"]
    if not math.isfinite(val):
        raise MusicGPTError(f"training diverged: validation loss is {val} at step {state.step}")
    for split, loss in losses.items():
        run.log.write(step=state.step, split=split, loss=loss, bits=loss / math.log(2),
                      tokens_seen=state.tokens_seen, time_s=state.elapsed_s)
    if run.log.enabled:
        infill = f"; infilling {losses['val_infill']:.4f}" if "val_infill" in losses else ""
        bar.write(f"step {state.step}: val loss {val:.4f} nats/token ({val / math.log(2):.4f} bits){infill}")
    if state.best_val is None or val < state.best_val:
        state.best_val = val
        run.save("best", with_optimizer=False)
    run.save("last", with_optimizer=True)
    run.log.draw()


def finish(run: Run) -> None:
    """Say where the run stopped and what it reached; wait for every rank."""
    if run.ranks.main:
        best = run.state.best_val
        print(f"musicgpt: stopped at step {run.state.step}; best validation loss {best:.4f} nats/token "
              f"({best / math.log(2):.4f} bits); checkpoints in {run.run_dir}", file=sys.stderr)
    if run.ranks.world > 1:
        dist.barrier()
