"""Generate the listening set in samples/ with the shipped default model, plus piano rolls, the
README's attention picture (`musicgpt attention` over the first piece) and samples/README.md.

Each piece is made by the real CLI (`musicgpt sample ...`), so the command in the table is
exactly what produced the file; primers are held-out GiantMIDI-Piano performances (files the
default model never trained on) and a Bach chorale from the music21 part of the corpus, and some
pieces start from silence.

    python scripts/make_listening_set.py
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import time
from pathlib import Path

from musicgpt import codec
from musicgpt.cli import main as cli
from musicgpt.plot import plot_piano_roll

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "samples"

# (name, primer or None, extra options). Primers: validation files of the default model's split.
PIECES = [
    ("01-held-out-1-default", None, []),
    ("02-held-out-2-default", None, []),
    ("03-held-out-3-temp0.9", None, ["--temperature", "0.9"]),
    ("04-held-out-4-typical", None, ["--typical-p", "0.9", "--top-p", "1.0"]),
    ("05-chorale-minp", "midi_data/scores/music21/bach/bwv66.6.mid", ["--min-p", "0.05", "--top-p", "1.0"]),
    ("06-silence-default", "", []),
    ("07-silence-topk", "", ["--top-k", "20", "--top-p", "1.0"]),
    ("08-silence-temp0.85", "", ["--temperature", "0.85"]),
]


def held_out_primers() -> list[str]:
    """Validation-split files of the default model's corpus (never seen in training)."""
    from musicgpt import data

    corpus = data.encode_folder(ROOT / "midi_data" / "classical" / "giantmidi-piano", progress=False)
    _, val = data.split_files(corpus.pieces, 0.1)
    return [str(p.path.relative_to(ROOT)) for p in val]


def main() -> None:
    os.chdir(ROOT)  # commands in the table are relative to the repository root
    held_out = iter(held_out_primers())
    rows = []
    for k, (name, primer, extra) in enumerate(PIECES):
        if primer is None:
            primer = next(held_out)
        seed = 1000 + k
        args = ["sample", "--checkpoint", "default", "--seconds", "30", "--seed", str(seed), "--out", "samples"]
        if primer:
            args += ["--primer", primer, "--primer-seconds", "10", "--include-primer"]
        args += extra
        buf = io.StringIO()
        t0 = time.time()
        with contextlib.redirect_stdout(buf):
            assert cli(args) == 0, args
        wall = time.time() - t0
        made = ROOT / buf.getvalue().split()[0]
        final = OUT / f"{name}.mid"
        made.replace(final)
        title = f"{name}  (primer: {Path(primer).stem if primer else 'silence'})"
        plot_piano_roll(final, OUT / f"{name}.png", title=title)
        tokens = codec.encode(final)
        command = " ".join(shlex.quote(a) for a in ["musicgpt", *args])
        rows.append((name, primer, extra, seed, codec.duration_seconds(tokens), command, wall))
        print(f"{final} ({wall:.1f} s)")
    # The README's picture of what the last layer attends to, over the first piece.
    first = OUT / f"{PIECES[0][0]}.mid"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli(["attention", str(first.relative_to(ROOT)), "--checkpoint", "default",
                    "-o", str(first.with_name(f"{first.stem}-attention.png").relative_to(ROOT))]) == 0
    write_readme(rows)


def write_readme(rows) -> None:
    lines = [
        "# Listening set",
        "",
        "Pieces written by the default model shipped with musicgpt (`musicgpt/default_model/`, see its",
        "MODEL_CARD.md), made by `python scripts/make_listening_set.py`. Primed pieces include their",
        "primer (the first 10 s, `--include-primer`), so the first 10 s are the original and the rest is",
        "the model; primers from `midi_data/classical/giantmidi-piano/` are held-out files the model never trained on.",
        "Load the MIDI into any DAW, or `musicgpt render FILE.mid` to hear it (needs `musicgpt[audio]`).",
        "",
        "| file | primer | seconds | decoding | seed | command | piano roll |",
        "|---|---|---:|---|---:|---|---|",
    ]
    for name, primer, extra, seed, seconds, command, _ in rows:
        decoding = " ".join(extra) if extra else "default (temperature 1.0, top-p 0.95)"
        primer_cell = f"`{Path(primer).name}` (10 s)" if primer else "silence"
        lines.append(f"| [{name}.mid]({name}.mid) | {primer_cell} | {seconds:.1f} | {decoding} | {seed} "
                     f"| `{command}` | ![]({name}.png) |")
    (OUT / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
