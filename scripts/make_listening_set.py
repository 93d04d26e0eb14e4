"""Generate the listening set in samples/ with the shipped default model, plus piano rolls, the
README's attention picture (`musicgpt attention` over the first piece) and samples/README.md.

Each piece is made by the real CLI (`musicgpt sample ...` or `musicgpt infill ...`), so the
command in the table is exactly what produced the file. Primers are files of the corpus's
validation split, which the model never trained on: classical performances (GiantMIDI-Piano),
pop songs (POP909) and a Bach chorale; some pieces start from silence in one of the model's
styles, and two have a passage rewritten by `musicgpt infill`.

    python scripts/make_listening_set.py
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import time
from pathlib import Path

from musicgpt import codec, data
from musicgpt.cli import main as cli
from musicgpt.plot import plot_piano_roll

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "samples"
HELD_OUT = "held out"  # the primer is the next validation file of the style named in the options

# (name, primer: a path, HELD_OUT or "" for silence, options). Primed pieces keep their 10 s primer.
PIECES = [
    ("01-classical", HELD_OUT, ["--style", "classical"]),
    ("02-classical-per-token-top-p", HELD_OUT, ["--style", "classical", "--temperature", "1.0",
                                                "--top-p-scope", "token"]),
    ("03-pop", HELD_OUT, ["--style", "pop"]),
    ("04-pop-minp", HELD_OUT, ["--style", "pop", "--min-p", "0.05", "--top-p", "1.0"]),
    ("05-chorale", "midi_data/scores/music21/bach/bwv121.6.mid", ["--style", "chorale"]),
    ("06-silence-classical", "", ["--style", "classical"]),
    ("07-silence-pop", "", ["--style", "pop"]),
    ("08-silence-folk", "", ["--style", "folk"]),
    ("09-silence-no-style", "", ["--typical-p", "0.9", "--top-p", "1.0"]),
]
# (name, piece, gap start, gap end, options): `musicgpt infill` on the first 40 s of a held-out piece.
INFILLS = [
    ("10-infill-classical", HELD_OUT, 12.0, 22.0, ["--style", "classical"]),
    ("11-infill-pop", HELD_OUT, 12.0, 22.0, ["--style", "pop"]),
]


def held_out_files() -> dict[str, list[str]]:
    """Validation-split files of the corpus (never trained on), per style folder."""
    _, val = data.split_paths(data.find_midi_files(ROOT / "midi_data"))
    paths = [str(p.relative_to(ROOT)) for p in val]
    return {"classical": [p for p in paths if "/classical/" in p], "pop": [p for p in paths if "/pop/" in p]}


def run(args: list[str]) -> tuple[Path, float]:
    """Run one CLI command; the file it wrote (its first line on stdout) and its wall time."""
    buf = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(buf):
        assert cli(args) == 0, args
    return ROOT / buf.getvalue().split()[0], time.time() - t0


def excerpt(path: str, seconds: float) -> str:
    """The first `seconds` of a file, written under samples/ as the piece infill rewrites."""
    from musicgpt.infill import notes_to_midi
    from musicgpt.midi_io import read_notes, subset, write_midi

    notes = read_notes(ROOT / path)
    dest = OUT / "primers" / f"{Path(path).stem}-first{seconds:g}s.mid"
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_midi(notes_to_midi(subset(notes, notes.start < seconds, until=seconds)), dest)
    return str(dest.relative_to(ROOT))


def main() -> None:
    os.chdir(ROOT)  # commands in the table are relative to the repository root
    held_out = {style: iter(files) for style, files in held_out_files().items()}
    rows = []
    for k, (name, primer, extra) in enumerate(PIECES):
        if primer == HELD_OUT:
            primer = next(held_out[extra[extra.index("--style") + 1]])
        args = ["sample", "--checkpoint", "default", "--seconds", "30", "--seed", str(1000 + k), "--out", "samples"]
        if primer:
            args += ["--primer", primer, "--primer-seconds", "10", "--include-primer"]
        rows.append(finish(name, primer, None, [*args, *extra]))
    for k, (name, piece, start, end, extra) in enumerate(INFILLS):
        if piece == HELD_OUT:
            piece = next(held_out[extra[extra.index("--style") + 1]])
        piece = excerpt(piece, 40.0)
        args = ["infill", piece, "--start", f"{start:g}", "--end", f"{end:g}", "--checkpoint", "default",
                "--seed", str(2000 + k), "--out", "samples"]
        rows.append(finish(name, piece, (start, end), [*args, *extra]))
    # The README's picture of what the last layer attends to, over the first piece.
    first = OUT / f"{PIECES[0][0]}.mid"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli(["attention", str(first.relative_to(ROOT)), "--checkpoint", "default",
                    "-o", str(first.with_name(f"{first.stem}-attention.png").relative_to(ROOT))]) == 0
    write_readme(rows)


def finish(name: str, primer: str, gap: tuple[float, float] | None, args: list[str]) -> tuple:
    """Run the command, move its file to samples/NAME.mid, draw its piano roll; the README row."""
    made, wall = run(args)
    final = OUT / f"{name}.mid"
    made.replace(final)
    title = f"{name}  (primer: {Path(primer).stem if primer else 'silence'})"
    plot_piano_roll(final, OUT / f"{name}.png", title=title, spans=[gap] if gap else ())
    command = " ".join(shlex.quote(a) for a in ["musicgpt", *args])
    print(f"{final} ({wall:.1f} s)")
    return name, primer, gap, codec.duration_seconds(codec.encode(final)), command


def write_readme(rows) -> None:
    lines = [
        "# Listening set",
        "",
        "Pieces written by the default model shipped with musicgpt (`musicgpt/default_model/`, see its",
        "MODEL_CARD.md), made by `python scripts/make_listening_set.py`. Primers and infilled pieces are files",
        "of the corpus's validation split, which the model never trained on. Primed pieces include their",
        "primer (the first 10 s are the original, the rest is the model); infilled pieces are the first 40 s",
        "of a piece with the shaded span rewritten by `musicgpt infill` (the rest is the original).",
        "Load the MIDI into any DAW, or `musicgpt render FILE.mid` to hear it (needs `musicgpt[audio]`).",
        "",
        "| file | primer or piece | seconds | command | piano roll |",
        "|---|---|---:|---|---|",
    ]
    for name, primer, gap, seconds, command in rows:
        what = f"`{Path(primer).name}`" if primer else "silence"
        if gap:
            what += f", {gap[0]:g}-{gap[1]:g} s rewritten"
        elif primer:
            what += " (10 s)"
        lines.append(f"| [{name}.mid]({name}.mid) | {what} | {seconds:.1f} | `{command}` | ![]({name}.png) |")
    (OUT / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
