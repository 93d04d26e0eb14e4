"""How often a model's sampled NOTE_OFFs lift a key that is up (and so do nothing).

Continues the first 10 s of held-out pop songs (`compare_models.held_out_files`) for 1,500 tokens
each at the default decoding with the release rule off (`release_sounding_only=False`), and
counts the continuations' NOTE_OFFs whose key was not sounding.

    python scripts/release_misses.py --checkpoint runs/stage11-export/model.safetensors
"""

from __future__ import annotations

import argparse
import json

import compare_models as cm
import numpy as np

from musicgpt import codec
from musicgpt.checkpoint import choose_checkpoint, load_model
from musicgpt.generate import generate
from musicgpt.midi_io import read_notes
from musicgpt.sampling import SamplingConfig
from musicgpt.vocab import NOTE_OFF, NOTE_ON, NUM_PITCHES


def misses(primer: np.ndarray, new: np.ndarray) -> tuple[int, int]:
    """(NOTE_OFFs, those lifting a key that is up) among the `new` tokens that continue `primer`."""
    down, offs, missed = set(), 0, 0
    for i, token in enumerate(np.concatenate([primer, new]).tolist()):
        if NOTE_ON <= token < NOTE_ON + NUM_PITCHES:
            down.add(token - NOTE_ON)
        elif NOTE_OFF <= token < NOTE_OFF + NUM_PITCHES:
            if i >= len(primer):
                offs += 1
                missed += token - NOTE_OFF not in down
            down.discard(token - NOTE_OFF)
    return offs, missed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--songs", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=1500)
    args = ap.parse_args()
    path, _ = choose_checkpoint(args.checkpoint, cm.ROOT / "runs")
    model, ckpt = load_model(path)
    config = ckpt.codec_config
    offs = missed = 0
    for seed, song in enumerate(cm.held_out_files()["pop"][:args.songs]):
        primer = codec.truncate_seconds(codec.encode(read_notes(song), config), 10, config)
        prompt = np.concatenate([[ckpt.controls.tag_id("pop"), config.eos_id], primer]).astype(np.int64)
        new = generate(model, prompt, max_new_tokens=args.tokens, sampling=SamplingConfig(), seed=seed,
                       codec_config=config, ban_eos=True, release_sounding_only=False)[0]
        counts = misses(primer, new)
        offs, missed = offs + counts[0], missed + counts[1]
    print(json.dumps({"checkpoint": args.checkpoint, "note_offs": offs, "lifting_a_key_that_is_up": missed,
                      "share": missed / max(offs, 1)}))


if __name__ == "__main__":
    main()
