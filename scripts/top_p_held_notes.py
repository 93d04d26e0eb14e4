"""Held notes and statistics at several top-p values: what the default top-p was chosen on.

For each top-p, 8 one-minute continuations of held-out primers of one style (the first 10 s,
seeds SEED.., the sampler's limits off, as `compare_models.py` makes them), then the share of
their notes sounding longer than 4.5 s and `musicgpt stats`' mean overlap with the style's
corpus, against the minute after each piece's first 10 s and against whole pieces.

    python scripts/top_p_held_notes.py --style pop --top-p 1.0 0.95 0.9 0.8 --seed 1700 --out runs/top-p
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
from pathlib import Path

import compare_models as cm

from musicgpt.midi_io import read_notes
from musicgpt.sample import SampleRequest, sample_files
from musicgpt.sampling import SamplingConfig


def measure(checkpoint: str, style: str, top_p: float, seed: int, out: Path) -> dict:
    """The held-note share and mean overlaps of 8 continuations at this top-p."""
    primers = [p for p in cm.held_out_files()[style] if (read_notes(p).start < 10).any()]
    for i in range(cm.SAMPLES_PER_STYLE):
        request = SampleRequest(checkpoint=checkpoint, primer=primers[i % len(primers)], primer_seconds=10,
                                seconds=60, seed=seed + i, out_dir=out, style=style,
                                sampling=SamplingConfig(top_p=top_p),
                                max_pause_seconds=math.inf, max_note_seconds=math.inf)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            sample_files(request, progress=False)
    reference = cm.CLASSICAL if style == "classical" else cm.POP
    return {"style": style, "top_p": top_p, "seeds": f"{seed}-{seed + cm.SAMPLES_PER_STYLE - 1}",
            "notes_over_4.5s": cm.long_note_share(out),
            "oa_minute": cm.mean_oa(out, reference, (10.0, 70.0))["mean"],
            "oa_whole": cm.mean_oa(out, reference)["mean"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--style", choices=("classical", "pop"), required=True)
    ap.add_argument("--top-p", type=float, nargs="+", required=True)
    ap.add_argument("--seed", type=int, default=1700)
    ap.add_argument("--out", type=Path, required=True, help="folder for the samples (one subfolder per top-p)")
    args = ap.parse_args()
    for top_p in args.top_p:
        folder = args.out / f"{args.style}-top-p{top_p:g}-seed{args.seed}"
        print(json.dumps(measure(args.checkpoint, args.style, top_p, args.seed, folder)), flush=True)


if __name__ == "__main__":
    main()
