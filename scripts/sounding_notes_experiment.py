"""Experiment: tell the model which notes are sounding, and for how long.

This is not a feature of musicgpt. It patches `musicgpt.model.MusicGPT` for one process. Every
position's embedding gains W @ [sounding (128), sounding * min(age, 8 s) / 8 (128)]: the state
after that position's token, computed from the window's own tokens. Notes struck before the
window are unknown. W starts at zero, so a patched model loaded from an unpatched checkpoint
makes exactly that checkpoint's predictions until it trains. The cached sampler and the ONNX
export do not know the input: a patched model decodes only by recomputing its window (the
patched `embed` refuses a cache).

    # the two arms, identical but for the patch (FIM off: its reordered windows would scramble the state)
    O="--init runs/stage8/best.safetensors --seq-len 1024 --batch-size 4 --lr 1e-4 --warmup 20 --max-steps 400 \\
       --eval-interval 100 --tag-weight classical=10 --threads 1 --seed 30 --fim-rate 0"
    musicgpt train midi_data/ $O --out runs/exp-control
    python scripts/sounding_notes_experiment.py train midi_data/ $O --out runs/exp-sounding
    # held-out losses and the loss of releasing notes by their age (scripts/release_loss.py)
    python scripts/sounding_notes_experiment.py measure runs/exp-control/best.safetensors
    python scripts/sounding_notes_experiment.py measure runs/exp-sounding/best.safetensors --sounding

BENCHMARKS.md ("Default model (issue 17)", fourth pass) has the results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

import musicgpt.checkpoint as checkpoint_module
from musicgpt.model import MusicGPT
from musicgpt.vocab import NOTE_OFF, NUM_PITCHES, TIME_SHIFT, CodecConfig

MAX_AGE_S = 8.0
KEY = "sounding_proj"


def sounding_features(idx: torch.Tensor, config: CodecConfig | None = None) -> torch.Tensor:
    """[B, T, 256]: per pitch, whether it sounds after each token, and its age / MAX_AGE_S (capped at 1)."""
    cfg = config or CodecConfig()
    B, T = idx.shape
    pos = torch.arange(T, device=idx.device).expand(B, T)[..., None]
    pitch = torch.arange(NUM_PITCHES, device=idx.device)
    last_on = torch.cummax(torch.where(idx[..., None] == pitch, pos, -1), dim=1).values
    last_off = torch.cummax(torch.where(idx[..., None] == NOTE_OFF + pitch, pos, -1), dim=1).values
    sounding = ((last_on > last_off) & (last_on >= 0)).float()
    is_shift = (idx >= TIME_SHIFT) & (idx < TIME_SHIFT + cfg.max_shift_steps)
    steps = torch.where(is_shift, idx - TIME_SHIFT + 1, 0).float()
    elapsed = torch.cumsum(steps * cfg.step_seconds, dim=1)
    struck_at = torch.gather(elapsed, 1, last_on.clamp(min=0).reshape(B, -1)).reshape(B, T, NUM_PITCHES)
    age = (elapsed[..., None] - struck_at).clamp(0, MAX_AGE_S) / MAX_AGE_S
    return torch.cat([sounding, sounding * age], -1)


def patch() -> None:
    """Give every MusicGPT built from now on the sounding-notes input (zero at first)."""
    init, load, expected, check = (MusicGPT.__init__, MusicGPT.load_state_dict,
                                   checkpoint_module.expected_shapes, checkpoint_module.check_shapes)

    def patched_init(self, config):
        init(self, config)
        setattr(self, KEY, nn.Linear(2 * NUM_PITCHES, config.n_embd, bias=False))
        nn.init.zeros_(getattr(self, KEY).weight)

    def patched_embed(self, idx, start=0):
        if start != 0:
            raise RuntimeError("the sounding-notes experiment decodes only by recomputing its window")
        return self.drop(self.wte(idx) + getattr(self, KEY)(sounding_features(idx)))

    def patched_load(self, state, strict=True, **kwargs):
        if f"{KEY}.weight" not in state:  # an unpatched checkpoint: the new input starts at zero
            state = {**state, f"{KEY}.weight": torch.zeros_like(getattr(self, KEY).weight)}
        return load(self, state, strict=strict, **kwargs)

    def patched_expected(config):
        return {k: v for k, v in expected(config).items() if not k.startswith(KEY)}

    def patched_check(path, shapes, config, aliases):
        return check(path, {k: v for k, v in shapes.items() if KEY not in k}, config, aliases)

    MusicGPT.__init__, MusicGPT.embed, MusicGPT.load_state_dict = patched_init, patched_embed, patched_load
    checkpoint_module.expected_shapes, checkpoint_module.check_shapes = patched_expected, patched_check


def measure(checkpoint: str) -> dict:
    """Held-out losses per style and the release losses of `release_loss.py`."""
    sys.path.insert(0, str(Path(__file__).parent))
    import compare_models as cm
    import release_loss as rl

    held = {style: cm.held_out_loss(Path(checkpoint), files)["nats"] for style, files in cm.held_out_files().items()}
    return {"checkpoint": checkpoint, "held_out_nats": held, **rl.release_losses(checkpoint)}


def main() -> int:
    args = sys.argv[1:]
    if args[:1] == ["train"]:
        patch()
        from musicgpt.cli import main as cli
        return cli(args)
    if args[:1] == ["measure"] and len(args) in (2, 3):
        if "--sounding" in args:
            patch()
        torch.set_num_threads(1)
        print(json.dumps(measure(args[1]), indent=1))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
