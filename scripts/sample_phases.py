"""The phases of `musicgpt sample` on ONNX Runtime, timed one by one in a fresh process (no torch).

    python scripts/sample_phases.py default --primer song.mid --seconds 60   # JSON: phase -> seconds

`scripts/bench_sample.py --backends` runs it for its start-up table. It repeats what `sample`
does with the same library calls, stopping the clock between them; the ONNX export must exist
(a first `musicgpt sample` with the checkpoint makes it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


class TimedStart:
    """A stepper that times its `start` (reading the prompt) and forwards everything else."""

    def __init__(self, stepper):
        self.stepper, self.window, self.seconds = stepper, stepper.window, 0.0
        self.step, self.reorder = stepper.step, stepper.reorder
        self.step_and_draw, self.draw_rows = stepper.step_and_draw, stepper.draw_rows

    def start(self, prompt, batch):
        t = time.perf_counter()
        logits = self.stepper.start(prompt, batch)
        self.seconds = time.perf_counter() - t
        return logits


def itemise(checkpoint: str, primer: str | None, seconds: float) -> dict[str, float]:
    """Seconds of each phase of a `sample` on ONNX Runtime, in this (fresh) process, in order."""
    clock, times = [time.perf_counter()], {}

    def lap(name: str) -> None:
        clock.append(time.perf_counter())
        times[name] = clock[-1] - clock[-2]

    import numpy as np
    lap("import numpy")
    import onnxruntime  # noqa: F401 (timed)
    lap("import onnxruntime")
    from musicgpt import backends, codec, midi_io
    from musicgpt.checkpoint_header import read_checkpoint_meta
    from musicgpt.decode import decode
    from musicgpt.onnx_stepper import OnnxStepper
    lap("import musicgpt (codec, MIDI, sampler)")
    meta = read_checkpoint_meta(checkpoint)
    folder = backends.onnx_export_for(meta.path, meta)
    lap("read the checkpoint's metadata, check its export (SHA-256 of the weights)")
    stepper = OnnxStepper(folder, threads=1)
    stepper.session("sample.onnx")
    lap("load the sampling step's graph")
    tokens = codec.encode(midi_io.read_notes(primer), meta.codec_config) if primer else []
    prompt = [meta.codec_config.eos_id, *tokens]
    lap("read and encode the primer")
    timed = TimedStart(stepper)
    pieces = decode(timed, prompt, vocab_size=meta.model_config.vocab_size, max_new_tokens=int(seconds * 100),
                    max_seconds=seconds, seed=0, ban_eos=True, max_pause_seconds=4.0, max_note_seconds=12.0)
    lap("")
    del times[""]
    times[f"read the prompt's last {min(len(prompt), stepper.reach)} tokens (chunk graph)"] = timed.seconds
    times[f"sample {seconds:g} s of music ({len(pieces[0])} tokens)"] = clock[-1] - clock[-2] - timed.seconds
    with tempfile.TemporaryDirectory() as out:
        codec.write_midi(codec.decode(np.asarray(pieces[0], dtype=np.int16), meta.codec_config), Path(out) / "x.mid")
    lap("write the MIDI file")
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--primer")
    p.add_argument("--seconds", type=float, default=60.0)
    args = p.parse_args()
    times = itemise(args.checkpoint, args.primer, args.seconds)
    if "torch" in sys.modules:
        sys.exit("sample_phases: torch was imported, so these are not the ONNX path's phases")
    print(json.dumps(times))


if __name__ == "__main__":
    main()
