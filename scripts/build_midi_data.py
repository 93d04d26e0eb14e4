#!/usr/bin/env python
"""Rebuild ``midi_data/``, the default corpus that ``musicgpt train midi_data/`` learns from.

Two sources, both redistributable:

* ``scores/music21/<collection>/<name>.mid``: scores from music21's bundled corpus converted to MIDI,
  every part played by Acoustic Grand Piano (program 0), percussion dropped, the score's tempo
  markings kept (120 bpm where a score has none), repeats written out (played once where
  music21 cannot expand them sensibly).
* ``classical/giantmidi-piano/``: 56 transcribed piano performances from GiantMIDI-Piano
  (CC BY 4.0), copied from ``--giantmidi`` together with an attribution README.

POP909 (``pop/pop909/``) is converted by ``scripts/build_pop909.py``. The top-level folders are
the style tags ``musicgpt train`` gives the pieces; ``midi_data/tags.txt`` tags the Bach chorales
``chorale`` and the folk tunes ``folk``.

The music21 selection (see ``COLLECTIONS``): all 409 Bach chorale settings and the C major
prelude BWV 846; the string quartets of Haydn, Mozart, Beethoven and Robert Schumann; piano
music by Chopin, Joplin, Clara Schumann, Schoenberg (op. 19) and Mozart (K. 545); songs, arias
and chamber music by Schubert, Schumann, Handel, Verdi, Weber, Corelli, C.P.E. Bach and others;
Monteverdi's madrigal books III and IV; and a seeded sample of folk tunes (Essen, Ryan's
Mammoth, O'Neill's, Aird's Airs, misc.), capped at 120 because they are monophonic and would
otherwise outnumber the polyphonic music. Left out on purpose:
encodings whose embedded notice reserves derived formats or imposes copyleft (Palestrina and
other Humdrum files, Josquin (GPL), Ciconia, Luca, Beach, Webern (CC BY-SA)), the modern
critical editions of the Trecento set, Monteverdi book V (a 2003 edition notice), lead sheets,
demos and exercises. The selection and output names are the same on every run.

    python scripts/build_midi_data.py --giantmidi PATH/TO/giantmidi-piano   # full rebuild
    python scripts/build_midi_data.py --limit 10 --out /tmp/trial/music21
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import sys
import warnings
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
SEED = 1234

# Included music21 collections and how many pieces each contributes (None: all of them).
COLLECTIONS: dict[str, int | None] = {
    "bach": None, "beethoven": None, "chopin": None, "corelli": None, "cpebach": None,
    "handel": None, "haydn": None, "johnson_j_r": None, "joplin": None, "liliuokalani": None,
    "lusitano": None, "monteverdi": None, "mozart": None, "schoenberg": None, "schubert": None,
    "schumann_clara": None, "schumann_robert": None, "verdi": None, "weber": None,
    # Monophonic folk tunes: capped so that they stay a small share of the corpus.
    "essenFolksong": 40, "ryansMammoth": 40, "oneills1850": 25, "airdsAirs": 10, "miscFolk": 5,
}
# Not taken: palestrina (Humdrum files "must be accompanied by the licensing agreement", derived
# formats reserved), josquin (GPL), ciconia, luca, beach, webern (CC BY-SA engravings), trecento
# (modern critical editions), leadSheet, demos, theoryExercises, nottingham-dataset (fragments).
# Files inside included collections that are left out, by path prefix.
EXCLUDED_PREFIXES = (
    "bach/choraleAnalyses/",  # Roman-numeral analyses, not music
    "monteverdi/madrigal.5.",  # book V files carry a 2003 edition copyright notice
    "essenFolksong/test",  # music21's parser test files
)
# Formats music21 reads well, best first: a piece stored twice is taken from the earlier one
# (this also drops Humdrum copies of scores that exist as MusicXML).
EXTENSIONS = (".mxl", ".musicxml", ".xml", ".krn", ".abc")
GIANTMIDI_README = """\
# GiantMIDI-Piano excerpt

These {count} MIDI files come from the GiantMIDI-Piano dataset, repository
https://github.com/bytedance/GiantMIDI-Piano (folders `midis_for_evaluation/giantmidi-piano`
and `midis_preview`), unchanged.

Qiuqiang Kong, Bochen Li, Jitong Chen and Yuxuan Wang. "GiantMIDI-Piano: A large-scale MIDI
dataset for classical piano music." Transactions of the International Society for Music
Information Retrieval (TISMIR) 5(1), 2022. https://doi.org/10.5334/tismir.80
(preprint arXiv:2010.07061, 2020).

Licence: Creative Commons Attribution 4.0 International (CC BY 4.0),
https://creativecommons.org/licenses/by/4.0/. They are automatic transcriptions of recorded
performances: expressive timing, velocities and sustain pedal, with some transcription errors.
"""


@dataclass(frozen=True, order=True)
class Piece:
    """One score in music21's corpus: a file, or one tune of a multi-tune ABC book."""

    path: str  # relative to music21's corpus folder, e.g. "bach/bwv66.6.mxl"
    number: int | None = None  # the tune's X: number inside an ABC book

    @property
    def collection(self) -> str:
        return self.path.split("/", 1)[0]

    @property
    def name(self) -> str:
        """Output file name inside the collection's folder, e.g. ``opus18no1_movement1.mid``."""
        stem = os.path.splitext(self.path.split("/", 1)[1])[0].replace("/", "_")
        if self.number is not None:
            stem += f"_{self.number:04d}"
        return re.sub(r"[^A-Za-z0-9._-]+", "_", stem) + ".mid"

    @property
    def label(self) -> str:
        return self.path if self.number is None else f"{self.path}#{self.number}"


def corpus_root() -> Path:
    import music21

    return Path(music21.__file__).parent / "corpus"


def _abc_tune_numbers(path: Path) -> list[int]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return sorted({int(n) for n in re.findall(r"^X:\s*(\d+)", text, flags=re.M)})


def _candidates(root: Path, collection: str) -> list[Piece]:
    """All usable pieces of one collection, one format per score, ABC books split into tunes."""
    best: dict[str, Path] = {}
    for path in sorted((root / collection).rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.suffix not in EXTENSIONS or rel.startswith(EXCLUDED_PREFIXES):
            continue
        stem = rel[: -len(path.suffix)]
        if stem not in best or EXTENSIONS.index(path.suffix) < EXTENSIONS.index(best[stem].suffix):
            best[stem] = path
    pieces = []
    for path in best.values():
        rel = path.relative_to(root).as_posix()
        numbers = _abc_tune_numbers(path) if path.suffix == ".abc" else []
        pieces += [Piece(rel, n) for n in numbers] if len(numbers) > 1 else [Piece(rel)]
    return sorted(pieces)


def select_pieces(root: Path, seed: int = SEED) -> list[Piece]:
    """The deterministic selection: whole collections, or a seeded sample where capped."""
    selected = []
    for collection, cap in sorted(COLLECTIONS.items()):
        pieces = _candidates(root, collection)
        if cap is not None and len(pieces) > cap:
            pieces = sorted(random.Random(f"{seed}/{collection}").sample(pieces, cap))
        selected += pieces
    names = [f"{p.collection}/{p.name}" for p in selected]
    assert len(set(names)) == len(names), "two pieces map to the same output file"
    return selected


class PieceTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise PieceTimeout("took too long")


def _to_piano(score) -> None:
    """Play every part on Acoustic Grand Piano, drop percussion, state 120 bpm if no tempo."""
    from music21 import instrument, note, percussion, stream, tempo

    parts = list(score.parts) or [score]
    for part in parts:
        if isinstance(part.getInstrument(returnDefault=False), instrument.UnpitchedPercussion):
            score.remove(part)
            continue
        for s in [part, *part.recurse().getElementsByClass(stream.Stream)]:
            s.removeByClass(instrument.Instrument)
        part.insert(0, instrument.Piano())
    for s in [score, *score.recurse().getElementsByClass(stream.Stream)]:
        s.removeByClass((note.Unpitched, percussion.PercussionChord))
    if not score.recurse().getElementsByClass(tempo.TempoIndication):
        (list(score.parts) or [score])[0].insert(0, tempo.MetronomeMark(number=120))


def _unshare(score) -> None:
    """Give each repeated object its own copy: music21's ABC reader puts one TimeSignature in
    several measures, which its MIDI writer then refuses."""
    import copy

    from music21 import stream

    seen = set()
    for s in [score, *score.recurse().getElementsByClass(stream.Stream)]:
        for element in list(s.elements):
            if id(element) in seen and not isinstance(element, stream.Stream):
                s.replace(element, copy.deepcopy(element))
            seen.add(id(element))


def _strip_repeats(score) -> None:
    """Remove repeat signs, for scores whose repeats music21 cannot expand."""
    from music21 import bar, repeat, spanner, stream

    for measure in score.recurse().getElementsByClass(stream.Measure):
        if isinstance(measure.leftBarline, bar.Repeat):
            measure.leftBarline = None
        if isinstance(measure.rightBarline, bar.Repeat):
            measure.rightBarline = None
    for s in [score, *score.recurse().getElementsByClass(stream.Stream)]:
        s.removeByClass((repeat.RepeatExpression, spanner.RepeatBracket))


def _write_out_repeats(score):
    """The score with its repeats written out, or played once where music21 cannot expand them
    or expands them into nonsense (misread repeat signs grow Beethoven op. 18 no. 4 4.2-fold)."""
    from music21 import repeat

    try:
        expanded = score.expandRepeats()
        # A minuet and trio da capo, every repeat taken, stays under 4x; more means a misreading.
        if expanded.highestTime < 4 * score.highestTime:
            return expanded
    except repeat.ExpanderException:  # badly formed repeats
        pass
    _strip_repeats(score)
    return score


def _write_checked(score, dest: Path) -> None:
    """Write ``score`` as MIDI (atomically) after checking pretty_midi reads notes back."""
    import pretty_midi

    tmp = dest.with_name(dest.name + ".part")
    try:
        score.write("midi", fp=str(tmp))
        if not sum(len(inst.notes) for inst in pretty_midi.PrettyMIDI(str(tmp)).instruments):
            raise ValueError("written MIDI has no notes")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _init_worker() -> None:
    from music21 import defaults

    warnings.simplefilter("ignore")  # music21 warns freely about notation it approximates
    # music21's 10080 ticks per quarter push long movements past pretty_midi's 1e7-tick sanity
    # limit; 960 still holds triplets and quintuplets exactly.
    defaults.ticksPerQuarter = 960
    signal.signal(signal.SIGALRM, _on_alarm)


def convert(job: tuple[Piece, str, str, int]) -> tuple[Piece, str | None]:
    """Convert one piece; returns ``(piece, None)`` or ``(piece, why it was skipped)``."""
    from music21 import converter

    piece, corpus_dir, out_dir, time_limit = job
    signal.alarm(time_limit)  # workers run tasks in their main thread, so SIGALRM reaches us
    try:
        score = converter.parse(
            os.path.join(corpus_dir, piece.path), number=piece.number, forceSource=True
        )
        _unshare(score)
        _to_piano(score)
        score = _write_out_repeats(score)
        dest = Path(out_dir) / piece.collection / piece.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        _write_checked(score, dest)
        return piece, None
    except Exception as exc:  # one bad score must never stop the build
        message = (str(exc).strip().splitlines() or [""])[0][:160]
        return piece, f"{type(exc).__name__}: {message}"
    finally:
        signal.alarm(0)


def convert_all(pieces: list[Piece], out: Path, workers: int, time_limit: int) -> list[str]:
    """Convert ``pieces`` in parallel into ``out``; returns one line per skipped piece."""
    root = corpus_root()
    # Biggest scores first, so the slow whole quartets do not start last and run alone.
    order = sorted(pieces, key=lambda p: (-(root / p.path).stat().st_size, p))
    jobs = [(p, str(root), str(out), time_limit) for p in order]
    skipped = []
    # A fresh worker every few dozen scores keeps music21's caches from growing without bound.
    with Pool(workers, initializer=_init_worker, maxtasksperchild=40) as pool:
        results = pool.imap_unordered(convert, jobs, chunksize=1)
        for piece, error in tqdm(results, total=len(jobs), desc="music21 -> MIDI", unit="piece"):
            if error:
                skipped.append(f"{piece.label}: {error}")
                tqdm.write(f"warning: skipped {skipped[-1]}", file=sys.stderr)
    return sorted(skipped)


def prune(out: Path, pieces: list[Piece]) -> int:
    """Delete MIDI files under ``out`` that the current selection no longer produces."""
    keep = {out / p.collection / p.name for p in pieces}
    stale = [f for f in out.rglob("*.mid") if f not in keep]
    for f in stale:
        f.unlink()
    return len(stale)


def copy_giantmidi(src: Path, dest: Path) -> int:
    """Copy the GiantMIDI-Piano files and write their attribution README."""
    files = sorted(src.glob("*.mid"))
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, dest / f.name)
    (dest / "README.md").write_text(GIANTMIDI_README.format(count=len(files)), encoding="utf-8")
    return len(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "midi_data" / "scores" / "music21",
                        help="folder for the converted music21 scores (default: midi_data/scores/music21)")
    parser.add_argument("--giantmidi", type=Path,
                        help="a folder of the GiantMIDI-Piano files to copy (not given: none copied)")
    parser.add_argument("--giantmidi-out", type=Path,
                        default=ROOT / "midi_data" / "classical" / "giantmidi-piano",
                        help="where they go (default: midi_data/classical/giantmidi-piano)")
    parser.add_argument("--limit", type=int, default=0,
                        help="convert only this many pieces, spread over the selection")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="parallel conversions (default: number of CPU cores)")
    # music21 writes out the repeats of a whole Beethoven quartet (op. 74, op. 132, ...) by deep-
    # copying the score once per repeat: two minutes alone, several on a busy 2-core machine.
    # The limit only guards against a score that never finishes.
    parser.add_argument("--time-limit", type=int, default=600,
                        help="seconds allowed per piece before it is skipped (default: 600)")
    args = parser.parse_args(argv)

    pieces = select_pieces(corpus_root())
    if args.limit:
        pieces = pieces[:: max(1, len(pieces) // args.limit)][: args.limit]
    print(f"{len(pieces)} music21 pieces from {len({p.collection for p in pieces})} collections")
    skipped = convert_all(pieces, args.out, args.workers, args.time_limit)
    if not args.limit:
        print(f"removed {prune(args.out, pieces)} stale files")
    print(f"converted {len(pieces) - len(skipped)}, skipped {len(skipped)}")
    for line in skipped:
        print(f"warning: skipped {line}", file=sys.stderr)

    if args.giantmidi is None:
        print("no --giantmidi: GiantMIDI-Piano files not copied")
    elif args.giantmidi.is_dir():
        print(f"copied {copy_giantmidi(args.giantmidi, args.giantmidi_out)} GiantMIDI-Piano files")
    else:
        print(f"{args.giantmidi}: not found, GiantMIDI-Piano files not copied")
    return 0


if __name__ == "__main__":
    sys.exit(main())
