"""What the keyboard state of training windows says, and what reading it is worth.

1. Of the NOTE_OFFs in 300 training windows (no augmentation), the share that lifts a key the
   keyboard reads as up: read from no key down ("blind", as windows were read before stage 11)
   and from the notes sounding where the window was cut ("told").
2. For each checkpoint, training's validation loss (64 evenly spread 1,024-token windows): told,
   blind, and told with `sounding_releases` switched on untrained (the release floor alone).

    python scripts/keyboard_checks.py runs/stage11/best.safetensors
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from musicgpt import windows
from musicgpt.checkpoint import load_model
from musicgpt.controls import Controls
from musicgpt.evaluate import mean_loss
from musicgpt.keyboard import LIFT, Keyboard, key_table
from musicgpt.model_config import ModelConfig
from musicgpt.train import load_corpus
from musicgpt.train_config import TrainConfig
from musicgpt.vocab import CodecConfig

SEQ_LEN, BATCH, VAL_WINDOWS = 1024, 4, 64


def unexplained_releases(corpus, windows_read: int = 300) -> dict:
    """Share of the windows' NOTE_OFFs lifting a key read as up, blind and told."""
    config = CodecConfig()
    dataset = windows.TokenWindowDataset(corpus.train, SEQ_LEN, config, seed=7)
    table = key_table(Controls(config))
    lifts = blind_up = told_up = 0
    for i in range(windows_read):
        x, _, sounding = dataset[i]
        told, blind = Keyboard(table, sounding=sounding.numpy()), Keyboard(table)
        for token in x.numpy():
            if table.action[token] == LIFT:
                lifts += 1
                blind_up += not blind.down[0, table.pitch[token]]
                told_up += not told.down[0, table.pitch[token]]
            told.play(np.array([token]))
            blind.play(np.array([token]))
    return {"windows": windows_read, "note_offs": lifts, "blind": blind_up / lifts, "told": told_up / lifts}


def validation_losses(path: str, corpus) -> dict:
    """Validation loss of a checkpoint read told, blind, and told with the release floor."""
    model, ckpt = load_model(path)
    val = windows.eval_batches(corpus.val, SEQ_LEN, ckpt.codec_config, BATCH, VAL_WINDOWS, ckpt.controls)
    blind = [(x, y, torch.zeros_like(s)) for x, y, s in val]
    out = {"checkpoint": path, "told": mean_loss(model, val, "cpu"), "blind": mean_loss(model, blind, "cpu")}
    if model.keyboard is not None:
        model.config = ModelConfig.from_dict({**model.config.to_dict(), "sounding_releases": True})
        out["told, release floor"] = mean_loss(model, val, "cpu")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="*", help="checkpoints whose validation loss to read")
    args = ap.parse_args()
    corpus = load_corpus(TrainConfig(data_dir="midi_data", seq_len=SEQ_LEN, batch_size=BATCH), CodecConfig(),
                         progress=False)
    print(json.dumps(unexplained_releases(corpus)), flush=True)
    for path in args.checkpoints:
        print(json.dumps(validation_losses(path, corpus)), flush=True)


if __name__ == "__main__":
    main()
