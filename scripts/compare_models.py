"""The default model's quality checks, the same commands for every checkpoint compared.

For each checkpoint: the loss on held-out classical performances (GiantMIDI-Piano files that
neither the old shipped model's split nor the corpus split trained on) and on held-out POP909
songs; 8 one-minute continuations of held-out classical primers and 8 of pop primers, compared
with their corpus by `musicgpt stats` (mean overlapping area over the 8 features, against whole
pieces and against the same minute of each piece, `--reference-span 10:70`); the share of
notes that ring longer than 4.5 s when the sampler's limits are off (`--max-note 0 --max-pause
0`); the longest run of notes the 16 samples share with the training data (`stats --copies`);
and the wall time of each one-minute sample. Beside the overlaps stands what a perfect model
would score: the held-out pieces' own minute, cycled to as many files, against the same corpus
(with 8 files a per-file feature fills at most 8 of its bins, so even real music scores well
below 1).

    python scripts/compare_models.py --checkpoint default --checkpoint runs/x/best.safetensors --out eval/

Writes OUT/report.json and OUT/report.md, and keeps the samples and figures of each checkpoint under
OUT/NAME/ and in OUT/NAME.json (a NAME already there is reused, not checked again).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import time
from pathlib import Path

import numpy as np

from musicgpt import data
from musicgpt.checkpoint import choose_checkpoint, load_model, peek_controls
from musicgpt.copies import copies_report
from musicgpt.evaluate import loss_on_pieces
from musicgpt.midi_io import read_notes
from musicgpt.sample import SampleRequest, sample_files
from musicgpt.sampling import SamplingConfig
from musicgpt.stats import NoteSet, compare, compare_sets, excerpts, read_set, set_stats
from musicgpt.tags import tag_pieces

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "midi_data"
CLASSICAL = DATA / "classical" / "giantmidi-piano"
POP = DATA / "pop" / "pop909"
LONG_NOTE_S = 4.5
SAMPLES_PER_STYLE = 8  # the figure; --samples asks for more


def held_out_files() -> dict[str, list[Path]]:
    """Held-out primers and loss files per style, by musicgpt's split rule (a hash of the file name)."""
    _, corpus_val = data.split_paths(data.find_midi_files(DATA))
    _, old_val = data.split_paths(data.find_midi_files(CLASSICAL))  # the old model trained on these 56 files alone
    return {
        "classical": sorted(set(corpus_val) & set(old_val)),
        "pop": sorted(p for p in corpus_val if p.is_relative_to(POP)),
    }


def held_out_loss(checkpoint: Path, files: list[Path], device: str = "cpu") -> dict:
    """Nats/token over non-overlapping context-long windows, each behind its file's tag if the model has tags."""
    model, ckpt = load_model(checkpoint, device)
    corpus = data.encode_files(files, ckpt.codec_config, progress=False)
    tag_pieces(corpus.pieces, DATA)
    seq_len = ckpt.model_config.context_len
    nats, tokens, _ = loss_on_pieces(model, corpus.pieces, ckpt.codec_config, seq_len=seq_len, device=device,
                                     controls=ckpt.controls, progress=False)
    return {"nats": nats, "tokens": tokens, "files": len(corpus.pieces), "seq_len": seq_len}


def continuations(checkpoint: Path, style: str, primers: list[Path], out: Path, limits: bool,
                  samples: int = SAMPLES_PER_STYLE, seed: int = 1700,
                  sampling: SamplingConfig | None = None, release_sounding_only: bool = True) -> list[float]:
    """`samples` one-minute continuations of the first 10 s of `primers` (cycled), seeds `seed`..;
    their wall times. `release_sounding_only=False` lets a NOTE_OFF name a key that is up."""
    tags = peek_controls(checkpoint).tags
    primers = primers_with_notes(primers)
    walls = []
    for i in range(samples):
        request = SampleRequest(checkpoint=checkpoint, primer=primers[i % len(primers)], primer_seconds=10,
                                seconds=60, seed=seed + i, out_dir=out, threads=2,
                                style=style if style in tags else None, sampling=sampling or SamplingConfig(),
                                release_sounding_only=release_sounding_only)
        if not limits:
            request.max_note_seconds = request.max_pause_seconds = math.inf
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            sample_files(request, progress=False)
        walls.append(time.perf_counter() - t0)
    return walls


def primers_with_notes(primers: list[Path]) -> list[Path]:
    """The primers with a note in their first 10 s (some songs open with 10 s of silence)."""
    return [p for p in primers if (read_notes(p).start < 10).any()]


def notes_per_second(files: list[Path], span: tuple[float, float] = (0.0, 60.0)) -> float:
    """The median over files of the notes struck per second within `span` seconds."""
    rates = [((n.start >= span[0]) & (n.start < span[1])).sum() / (span[1] - span[0]) for n in map(read_notes, files)]
    return float(np.median(rates))


def real_minute_oa(primers: list[Path], reference: Path, samples: int = SAMPLES_PER_STYLE) -> dict:
    """The mean OA a perfect model would get: the primers' own minute after their first 10 s,
    cycled to `samples` files as the continuations are, against the reference's same minute."""
    held = excerpts(read_set(primers_with_notes(primers), progress=False), (10.0, 70.0))
    picks = [i % len(held.files) for i in range(samples)]
    real = NoteSet([held.files[i] for i in picks], [held.notes[i] for i in picks], [])
    corpus = excerpts(read_set(data.find_midi_files(reference), progress=False), (10.0, 70.0))
    oa = {name: f["oa"] for name, f in compare(set_stats(real), set_stats(corpus)).items()}
    return {"mean": float(np.mean(list(oa.values()))), "features": oa}


def long_note_share(*folders: Path) -> float:
    """Share of the notes (sustain pedal applied, as a piano sounds them) longer than LONG_NOTE_S."""
    files = [f for folder in folders for f in data.find_midi_files(folder)]
    durations = np.concatenate([n.end - n.start for n in read_set(files, progress=False).notes])
    return float((durations > LONG_NOTE_S).mean())


def mean_oa(samples: Path, reference: Path, span: tuple[float, float] | None = None) -> dict:
    """`musicgpt stats` mean OA of samples against a reference (over `span` seconds of each reference file)."""
    report = compare_sets(samples, reference, progress=False, reference_span=span)
    oa = {name: f["oa"] for name, f in report["features"].items()}
    return {"mean": float(np.mean(list(oa.values()))), "features": oa}


def training_files() -> list[Path]:
    """The files the new model trained on: the corpus minus its validation split."""
    return data.split_paths(data.find_midi_files(DATA))[0]


def copies(samples: list[Path], training: NoteSet) -> dict:
    """Each sample's longest run of notes shared with a training file (`musicgpt stats --copies`)."""
    s = read_set(samples, progress=False)
    return copies_report(s.files, s.notes, training.files, training.notes, ROOT, DATA)


def copies_baseline(training: NoteSet) -> dict:
    """What training pieces share with each other: 8 classical and 8 pop training files against all the others."""
    picks = [p for style in (CLASSICAL, POP) for p in [f for f in training.files if f.is_relative_to(style)][:8]]
    s = read_set(picks, progress=False)
    return copies_report(s.files, s.notes, training.files, training.notes, DATA, DATA)


def check(checkpoint: str, name: str, out: Path, held: dict[str, list[Path]], training: NoteSet,
          samples: int = SAMPLES_PER_STYLE) -> dict:
    """Every figure for one checkpoint."""
    path, _ = choose_checkpoint(checkpoint, ROOT / "runs")
    result = {"checkpoint": checkpoint, "samples_per_style": samples, "loss": {}, "oa": {}, "oa_excerpts": {},
              "long_notes": {}, "notes_per_second": {}, "seconds_per_sample": {}}
    for style, reference in (("classical", CLASSICAL), ("pop", POP)):
        print(f"{name}: {style}", flush=True)
        result["loss"][style] = held_out_loss(path, held[style])
        for limits in (True, False):
            folder = out / name / style / ("limits" if limits else "no-limits")
            walls = continuations(path, style, held[style], folder, limits, samples)
            key = style if limits else f"{style} (limits off)"
            result["oa"][key] = mean_oa(folder, reference)
            # The samples are the minute after a 10 s primer: like for like is that minute of each piece.
            result["oa_excerpts"][key] = mean_oa(folder, reference, (10.0, 70.0))
            result["long_notes"][key] = long_note_share(folder)
            result["notes_per_second"][key] = notes_per_second(data.find_midi_files(folder))
            result["seconds_per_sample"][key] = float(np.median(walls))
    result["long_notes"]["all (limits off)"] = long_note_share(*(out / name).glob("*/no-limits"))
    result["copies"] = copies(sorted((out / name).glob("*/limits/*.mid")), training)
    return result


def markdown(results: list[dict], corpus_long: dict[str, float], baseline: dict, real_rate: dict[str, float],
             real_oa: dict[str, dict]) -> str:
    """The comparison as a Markdown table, one column per checkpoint."""
    rows = [("", *(f"{r['name']} (`{r['checkpoint']}`)" for r in results))]
    for style in ("classical", "pop"):
        rows.append((f"held-out {style} loss (nats/token)", *(f"{r['loss'][style]['nats']:.3f}" for r in results)))
    for key in ("classical", "pop", "classical (limits off)", "pop (limits off)"):
        real = real_oa[key.split()[0]]["mean"]
        rows.append((f"stats mean OA, {key}: against one-minute excerpts (the held-out pieces' own minute: "
                     f"{real:.3f}) / whole pieces",
                     *(f"{r['oa_excerpts'][key]['mean']:.3f} / {r['oa'][key]['mean']:.3f}" for r in results)))
    for key in ("classical (limits off)", "pop (limits off)", "all (limits off)"):
        style = key.split()[0]
        rows.append((f"notes > {LONG_NOTE_S:g} s, {key} (corpus {corpus_long[style]:.1%})",
                     *(f"{r['long_notes'][key]:.1%}" for r in results)))
    for key in ("classical", "pop", "classical (limits off)", "pop (limits off)"):
        rate = real_rate[key.split()[0]]
        rows.append((f"notes per second, {key}, median (the held-out pieces' same minute: {rate:.1f})",
                     *(f"{r['notes_per_second'][key]:.1f}" if "notes_per_second" in r else "-" for r in results)))
    rows.append((f"longest run of notes shared with a training file, median / max (16 training pieces with each "
                 f"other: {baseline['median']:g} / {baseline['max']})",
                 *(f"{r['copies']['median']:g} / {r['copies']['max']}" for r in results)))
    rows.append(("seconds per one-minute sample (median, 2 threads)",
                 *(f"{r['seconds_per_sample']['classical']:.1f}" for r in results)))
    lines = ["| " + " | ".join(rows[0]) + " |", "|---" + "|---:" * len(results) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", action="append", required=True, help="'default', a run folder or a file")
    ap.add_argument("--name", action="append", help="a short name per checkpoint for its sample folder")
    ap.add_argument("--out", type=Path, required=True, help="folder for the samples and the report")
    ap.add_argument("--samples", type=int, default=SAMPLES_PER_STYLE, help="continuations per style and setting")
    args = ap.parse_args()
    names = args.name or [f"model{k}" for k in range(len(args.checkpoint))]
    held = held_out_files()
    print({k: len(v) for k, v in held.items()}, "held-out files")
    training = read_set(training_files(), progress=False)
    results = []
    for checkpoint, name in zip(args.checkpoint, names):
        saved = args.out / f"{name}.json"  # a checkpoint already checked into this folder is not checked again
        if not saved.exists():
            saved.write_text(json.dumps(check(checkpoint, name, args.out, held, training, args.samples), indent=2))
        results.append({**json.loads(saved.read_text()), "name": name})
    corpus_long = {"classical": long_note_share(CLASSICAL), "pop": long_note_share(POP)}
    corpus_long["all"] = (corpus_long["classical"] + corpus_long["pop"]) / 2  # the samples are half of each
    baseline = copies_baseline(training)
    real_rate = {style: notes_per_second(primers_with_notes(files), (10.0, 70.0)) for style, files in held.items()}
    real_oa = {style: real_minute_oa(held[style], reference, args.samples)
               for style, reference in (("classical", CLASSICAL), ("pop", POP))}
    report = {"held_out": {k: [str(p.relative_to(ROOT)) for p in v] for k, v in held.items()},
              "corpus_long_notes": corpus_long, "held_out_notes_per_second": real_rate,
              "held_out_minute_oa": real_oa,
              "copies_between_training_pieces": baseline, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    table = markdown(results, corpus_long, baseline, real_rate, real_oa)
    (args.out / "report.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
