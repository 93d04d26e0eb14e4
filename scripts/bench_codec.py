"""Codec throughput against MidiTok's MIDILike tokenizer, on the same files in the same run.

Needs MidiTok in the environment for this script only (`pip install miditok`; never a project
dependency). Prints a markdown table; each number is the best of --repeats passes over all files.

    python scripts/bench_codec.py [--files 'folder/*.mid' ...] [--repeats 5]
"""

from __future__ import annotations

import argparse
import glob
import platform
import tempfile
import time
import warnings
from pathlib import Path

from tqdm import tqdm

from musicgpt import codec, midi_io

DEFAULT_FILES = "midi_data/classical/giantmidi-piano/*.mid"  # repo-relative: run from the repository root


def miditok_midilike():
    """MIDILike as close to our vocabulary as its API goes: 32 velocities, 10 ms shifts to 1 s."""
    import miditok

    config = miditok.TokenizerConfig(
        num_velocities=32,
        beat_res={(0, 2): 50},  # 1/50 beat up to 2 beats: 10 ms .. 1 s at the files' 120 bpm
        pitch_range=(0, 127),
        use_time_signatures=False,
        use_tempos=False,
        use_sustain_pedals=False,  # it has Pedal tokens, not pedal-lengthened notes like ours
    )
    return miditok.MIDILike(config)


def seconds(fn, items) -> float:
    """Wall time of one pass of fn over items."""
    start = time.perf_counter()
    for item in items:
        fn(item)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", nargs="+", default=[DEFAULT_FILES], help="globs of MIDI files")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    files = sorted(f for pattern in args.files for f in glob.glob(pattern))
    if not files:
        raise SystemExit(f"no files match {args.files}")
    warnings.simplefilter("ignore")  # MidiTok warns about its config; the numbers are the point
    tok = miditok_midilike()

    notes = sum(len(midi_io.read_notes(f)) for f in files)
    ours = [codec.encode(f) for f in files]
    theirs = [tok.encode(Path(f)) for f in files]
    n_ours = sum(len(t) for t in ours)
    n_theirs = sum(len(seq.ids) for t in theirs for seq in (t if isinstance(t, list) else [t]))

    out = Path(tempfile.mkdtemp()) / "out.mid"
    tasks = {  # name: (ours, theirs, items ours, items theirs)
        "encode: file -> tokens": (codec.encode, lambda f: tok.encode(Path(f)), files, files),
        "decode: tokens -> MIDI object": (codec.decode, tok.decode, ours, theirs),
        "decode: tokens -> .mid file": (lambda t: codec.write_midi(codec.decode(t), out),
                                        lambda t: tok.decode(t).dump_midi(out), ours, theirs),
    }
    best = {name: [float("inf"), float("inf")] for name in tasks}
    for _ in tqdm(range(args.repeats), desc="passes"):  # alternate tools: load changes hit both
        for name, (fn_ours, fn_theirs, items_ours, items_theirs) in tasks.items():
            best[name][0] = min(best[name][0], seconds(fn_ours, items_ours))
            best[name][1] = min(best[name][1], seconds(fn_theirs, items_theirs))
    rows = [(name, t_ours, t_theirs) for name, (t_ours, t_theirs) in best.items()]

    print(f"{len(files)} files, {notes} notes; tokens: musicgpt {n_ours}, MidiTok {n_theirs}; "
          f"best of {args.repeats}; Python {platform.python_version()}\n")
    print("| task | musicgpt | MidiTok MIDILike | musicgpt / MidiTok |")
    print("| --- | --- | --- | --- |")
    for name, t_ours, t_theirs in rows:
        def rate(t: float) -> str:
            return f"{notes / t:,.0f} notes/s ({len(files) / t:,.1f} files/s, {t:.2f} s)"
        print(f"| {name} | {rate(t_ours)} | {rate(t_theirs)} | {t_theirs / t_ours:.1f}x |")


if __name__ == "__main__":
    main()
