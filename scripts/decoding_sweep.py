"""Decoding settings side by side on held-out primers: what the default decoding was chosen on.

For each setting (temperature, top-p, what top-p ranks together), N one-minute
continuations of the first 10 s of held-out primers of one style (seeds SEED.., as
`compare_models.py` makes them), once with the sampler's limits and once without. Reported: the
notes struck per second (median, beside the same minute of the real pieces), `musicgpt stats`'
mean overlap with the style's corpus (against the minute after each piece's first 10 s), and the
share of notes sounding longer than 4.5 s with the limits off (the model's own habit). With
`--free-releases` a NOTE_OFF may also name a key that is up, which the sampler otherwise forbids.

    python scripts/decoding_sweep.py --style classical --setting t=1,p=0.95,s=pooled --setting t=1,p=0.95 \\
        --samples 24 --seed 3000 --out runs/sweep
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import compare_models as cm

from musicgpt import data
from musicgpt.checkpoint import choose_checkpoint
from musicgpt.sampling import SamplingConfig

KEYS = {"t": "temperature", "p": "top_p", "s": "top_p_scope", "m": "min_p"}


def parse_setting(text: str) -> SamplingConfig:
    """'t=0.9,p=0.9,s=kind' (s: top-p scope, m: min-p) as a SamplingConfig (keys left out keep their defaults)."""
    fields = {}
    for item in text.split(","):
        key, value = item.split("=")
        fields[KEYS[key]] = value if key == "s" else float(value)
    return SamplingConfig(**fields).validate()


def measure(checkpoint: Path, style: str, sampling: SamplingConfig, samples: int, seed: int, out: Path,
            release_sounding_only: bool = True) -> dict:
    """Notes per second, mean overlap and held-note share of `samples` continuations with `sampling`."""
    primers = cm.held_out_files()[style]
    reference = cm.CLASSICAL if style == "classical" else cm.POP
    result = {"style": style, "temperature": sampling.temperature, "top_p": sampling.top_p,
              "top_p_scope": sampling.top_p_scope, "min_p": sampling.min_p,
              "seeds": f"{seed}-{seed + samples - 1}", "release_sounding_only": release_sounding_only}
    for limits in (True, False):
        folder = out / ("limits" if limits else "no-limits")
        cm.continuations(checkpoint, style, primers, folder, limits, samples, seed, sampling, release_sounding_only)
        suffix = "" if limits else " (limits off)"
        result["notes_per_second" + suffix] = cm.notes_per_second(data.find_midi_files(folder))
        result["oa_minute" + suffix] = cm.mean_oa(folder, reference, (10.0, 70.0))["mean"]
    result["notes_over_4.5s (limits off)"] = cm.long_note_share(out / "no-limits")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--style", choices=("classical", "pop"), required=True)
    ap.add_argument("--setting", action="append", required=True,
                    help="t=T,p=P,s=kind|pooled|token,m=MIN_P (repeatable)")
    ap.add_argument("--samples", type=int, default=cm.SAMPLES_PER_STYLE)
    ap.add_argument("--seed", type=int, default=1700)
    ap.add_argument("--out", type=Path, required=True, help="folder for the samples (one subfolder per setting)")
    ap.add_argument("--free-releases", action="store_true", help="let a NOTE_OFF name a key that is up")
    args = ap.parse_args()
    checkpoint, _ = choose_checkpoint(args.checkpoint, cm.ROOT / "runs")
    real = cm.notes_per_second(cm.primers_with_notes(cm.held_out_files()[args.style]), (10.0, 70.0))
    print(json.dumps({"style": args.style, "held-out pieces' notes_per_second": real}), flush=True)
    for text in args.setting:
        folder = args.out / f"{args.style}-{text.replace(',', '-')}-seed{args.seed}{'-free' * args.free_releases}"
        print(json.dumps(measure(checkpoint, args.style, parse_setting(text), args.samples, args.seed, folder,
                                 not args.free_releases)), flush=True)


if __name__ == "__main__":
    main()
