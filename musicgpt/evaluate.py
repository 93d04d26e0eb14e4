"""Held-out loss of a trained model: `musicgpt eval DATA_DIR` (a MIDI folder or token store) in
nats/token, bits/token and perplexity.

The validation files are chosen exactly as training chooses them (`data.split_files` on the
file names), cut into non-overlapping windows of the model's context, and every real target is
scored once with `mean_loss`, the loss loop training reports its validation loss with.
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from musicgpt import data
from musicgpt.controls import Controls
from musicgpt.devices import pick_device
from musicgpt.errors import MusicGPTError
from musicgpt.model_config import MAX_CONTEXT
from musicgpt.store import TokenStore, is_store
from musicgpt.tags import tag_pieces
from musicgpt.windows import IGNORE_INDEX, batches, eval_batches, infill_windows

MAX_BATCH = 4096  # windows per forward pass: more only asks for memory, never for a better figure


@dataclass
class EvalResult:
    """The held-out loss of one checkpoint on one set of files."""

    checkpoint: str
    step: int | None  # the training step the checkpoint was saved at, when it says
    split: str  # "validation" or "all"
    files: int  # files evaluated
    corpus_files: int  # readable files in the folder
    windows: int
    seq_len: int
    tokens: int  # targets scored
    nats: float  # mean cross-entropy per token
    skipped: list[str] = field(default_factory=list)  # "path: why" for unreadable files
    infill_nats: float | None = None  # a FIM model's loss on the middles of the same windows

    @property
    def bits(self) -> float:
        return self.nats / math.log(2)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats) if self.nats < 700 else math.inf

    def to_dict(self) -> dict:
        return {**asdict(self), "bits": self.bits, "perplexity": self.perplexity}


@torch.no_grad()
def mean_loss(model, batches, device: str, autocast=None) -> float:
    """Mean cross-entropy in nats per token over (inputs, targets, sounding notes) `batches`, every real target
    counted once; under `autocast` if given (training's bf16), else in fp32."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y, sounding in batches:
        x, y = x.to(device), y.to(device)
        with autocast or nullcontext():
            logits = model(x, sounding=sounding.to(device)).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
        total, count = total + float(loss), count + int((y != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(1, count)


def check_options(*, val_fraction: float = 0.1, seq_len: int | None = None, batch_size: int = 8) -> None:
    """Reject option values that are wrong whatever the model and data, before anything is read."""
    if not (isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction < 1.0):
        raise MusicGPTError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if seq_len is not None and not 1 <= seq_len <= MAX_CONTEXT:
        raise MusicGPTError(f"--seq-len must be from 1 to {MAX_CONTEXT:,}, got {seq_len}")
    if not 1 <= batch_size <= MAX_BATCH:
        raise MusicGPTError(f"--batch-size must be from 1 to {MAX_BATCH:,}, got {batch_size}")


def choose_pieces(pieces: list[data.Piece], val_fraction: float, all_files: bool) -> tuple[list[data.Piece], str]:
    """The pieces to score and the split's name: training's validation split, or all with --all.

    Like training, a split that holds nothing out (one file, or val_fraction 0) is evaluated whole.
    """
    if all_files:
        return pieces, "all"
    _, val = data.split_files(pieces, val_fraction)
    return (val, "validation") if val else (pieces, "all")


def loss_on_pieces(model, pieces: list[data.Piece], codec_config, *, seq_len: int, batch_size: int = 8,
                   device: str = "cpu", progress: bool = True, controls: Controls | None = None
                   ) -> tuple[float, int, int]:
    """(nats/token, targets scored, windows) over non-overlapping seq_len windows of `pieces`, each
    behind its piece's tag when `controls` has it."""
    batched = eval_batches(pieces, seq_len, codec_config, batch_size, controls=controls)
    tokens = sum(int((y != IGNORE_INDEX).sum()) for _, y, _ in batched)
    bar = tqdm(batched, desc="evaluating", unit="batch", disable=not progress, leave=False)
    # fp32 everywhere: a reported figure should not depend on the device's autocast.
    nats = mean_loss(model, bar, device)
    return nats, tokens, sum(len(x) for x, _, _ in batched)


def evaluate_folder(data_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None, *,
                    val_fraction: float = 0.1, all_files: bool = False, seq_len: int | None = None,
                    batch_size: int = 8, device: str = "cpu", progress: bool = True,
                    runs_dir: str | os.PathLike = "runs") -> EvalResult:
    """Score a checkpoint on the validation split of `data_dir` (every file with `all_files`); a
    token store's split is the one its source folder would give.

    Windows are the model's context long unless `seq_len` says otherwise; without `checkpoint`
    the newest run is used, else the shipped default model (`choose_checkpoint`).
    """
    from musicgpt.checkpoint import choose_checkpoint, load_model

    check_options(val_fraction=val_fraction, seq_len=seq_len, batch_size=batch_size)
    tokens = TokenStore(data_dir) if is_store(data_dir) else None
    files = data.find_midi_files(data_dir) if tokens is None else []  # a bad folder fails before any weights are read
    device = pick_device(device)
    path, why = choose_checkpoint(checkpoint, runs_dir)
    if why:
        print(f"musicgpt: {why}", file=sys.stderr)
    model, ckpt = load_model(path, device)
    mcfg = ckpt.model_config
    seq_len = seq_len or mcfg.context_len
    if mcfg.attention == "absolute" and seq_len > mcfg.context_len:
        raise MusicGPTError(f"--seq-len {seq_len} exceeds this absolute-attention model's context of "
                            f"{mcfg.context_len}")
    corpus = read_corpus(data_dir, files, tokens, ckpt.codec_config, progress)
    pieces, split = choose_pieces(corpus.pieces, val_fraction, all_files)
    nats, tokens, windows = loss_on_pieces(model, pieces, ckpt.codec_config, seq_len=seq_len, batch_size=batch_size,
                                           device=device, progress=progress, controls=ckpt.controls)
    infill = None
    if ckpt.controls.fim:
        middles = batches(infill_windows(pieces, seq_len, ckpt.codec_config, ckpt.controls), batch_size)
        infill = mean_loss(model, tqdm(middles, desc="infilling", unit="batch", disable=not progress, leave=False),
                           device)
    return EvalResult(
        checkpoint=str(path), step=ckpt.state.get("step"), split=split, files=len(pieces),
        corpus_files=len(corpus.pieces), windows=windows, seq_len=seq_len, tokens=tokens, nats=nats,
        skipped=[f"{p}: {why}" for p, why in corpus.skipped], infill_nats=infill,
    )


def read_corpus(data_dir, files: list[Path], tokens: TokenStore | None, codec_config, progress: bool) -> data.Corpus:
    """The folder's files encoded and tagged, or every piece of a token store (views of its shards,
    in store order) when it was encoded with the model's codec."""
    if tokens is None:
        corpus = data.encode_files(files, codec_config, progress=progress)
        if not corpus.pieces:
            raise MusicGPTError(f"{data_dir}: none of the MIDI files could be read")
        tag_pieces(corpus.pieces, data_dir)
        return corpus
    if tokens.codec_config != codec_config:
        raise MusicGPTError(f"{data_dir}: the store was encoded with codec {tokens.codec_config.to_dict()}, "
                            f"but the model uses {codec_config.to_dict()}")
    if not len(tokens):
        raise MusicGPTError(f"{data_dir}: the token store holds no pieces")
    skipped = [(Path(name), why) for name, why in tokens.manifest.get("skipped", {}).items()]
    return data.Corpus(tokens.pieces(range(len(tokens))), skipped, codec_config)


def format_result(r: EvalResult) -> str:
    """The few lines `musicgpt eval` prints."""
    step = f" (step {r.step})" if r.step is not None else ""
    which = "validation split" if r.split == "validation" else "every file"
    return "\n".join([
        f"checkpoint  {Path(r.checkpoint)}{step}",
        f"files       {r.files} of {r.corpus_files} ({which})",
        f"windows     {r.windows} x {r.seq_len} tokens, {r.tokens:,} targets",
        f"loss        {r.nats:.4f} nats/token  {r.bits:.4f} bits/token",
        *([f"infilling   {r.infill_nats:.4f} nats/token on the middles of the same windows (FIM order)"]
          if r.infill_nats is not None else []),
        f"perplexity  {r.perplexity:.3f}",
    ])
