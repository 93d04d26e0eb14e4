"""Render speed of tinysoundfont against FluidSynth: MIDI to WAV with `musicgpt.render.render_wav`.

Renders the same files with each synthesizer installed (pretty_midi's TimGM6mb soundfont, 44.1 kHz)
and prints a markdown table: seconds of music, best wall time of --repeats, and times faster than
real time. Run from the repository root:

    python scripts/bench_render.py [--files 'samples/*.mid'] [--repeats 3]
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import tempfile
import time
from pathlib import Path

from musicgpt.codec import load_midi
from musicgpt.render import fluidsynth_available, render_wav, tinysoundfont_available


def best_time(midi: Path, synth: str, repeats: int, folder: Path) -> float:
    """The fastest of `repeats` renders of `midi` with `synth`, in seconds."""
    times = []
    for k in range(repeats):
        start = time.perf_counter()
        render_wav(midi, folder / f"{midi.stem}-{synth}-{k}.wav", synth=synth)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", default="samples/*.mid", help="glob of MIDI files (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    files = sorted(Path(f) for f in glob.glob(args.files))
    synths = [s for s, ok in (("tinysoundfont", tinysoundfont_available()), ("fluidsynth", fluidsynth_available()))
              if ok]
    music = sum(load_midi(f).get_end_time() for f in files)
    print(f"{len(files)} files, {music:.1f} s of music; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}\n")
    print("| synthesizer | wall time (s) | x real time |\n|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for synth in synths:
            wall = sum(best_time(f, synth, args.repeats, Path(tmp)) for f in files)
            print(f"| {synth} | {wall:.2f} | {music / wall:.0f} |")


if __name__ == "__main__":
    main()
