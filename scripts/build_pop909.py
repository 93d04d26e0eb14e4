#!/usr/bin/env python
"""Convert POP909 into ``midi_data/pop/pop909/``: one piano part per song.

POP909 (https://github.com/music-x-lab/POP909-Dataset, MIT licence, Copyright (c) 2020 Music X
Lab) holds 909 pop songs arranged for piano, ``POP909/NNN/NNN.mid``, each with three tracks:
MELODY, BRIDGE (a secondary melody) and PIANO (the accompaniment, with sustain pedal). The
``versions/`` folders (other arrangements of the same songs) are not used.

Conversion, per song, in MIDI ticks so nothing is rounded:

* the three tracks become ONE instrument, Acoustic Grand Piano (program 0); drum tracks and
  any other track would be dropped (POP909 has none), and so are pitch bends (a few melody
  notes have them) and controllers other than the pedal; the first track, with the tempo map
  and time and key signatures, is copied unchanged; velocities are kept as given;
* each track's sustain pedal is applied to that track's notes (a note released while the pedal
  is down ends when it lifts) and no pedal events are written, so the PIANO track's pedal does
  not smear the melody, and every note sounds as long as it did in its own track;
* notes of one key that overlap follow the rule musicgpt's codec applies anyway: two notes
  starting on the same tick become one (the longer, then the louder), and a note still sounding
  when its key is struck again ends at that strike.

Every written file is checked: ``musicgpt.midi_io.read_notes`` must find exactly the merged
notes, and ``musicgpt.codec.encode`` must encode it; the script counts the songs whose tokens are
the same as the original three-track file's (they differ only where two notes of one key start
within one codec step and the codec, on its coarser grid, keeps the other one).

    python scripts/build_pop909.py --pop909 PATH/TO/POP909-Dataset
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import mido
import numpy as np
import pretty_midi

ROOT = Path(__file__).resolve().parent.parent
SUSTAIN_CC = 64
README = """\
# POP909, merged to one piano part

These {count} MIDI files are the songs of the POP909 dataset,
https://github.com/music-x-lab/POP909-Dataset (`POP909/NNN/NNN.mid`, same numbers), with
their MELODY, BRIDGE and PIANO tracks merged into one Acoustic Grand Piano part and each
track's sustain pedal written into its note lengths; see `scripts/build_pop909.py` for the
exact rule. Timing, tempo map and velocities are as in the original files.

Ziyu Wang, Ke Chen, Junyan Jiang, Yiyi Zhang, Maoran Xu, Shuqi Dai, Guxian Bin and Gus Xia.
"POP909: A Pop-song Dataset for Music Arrangement Generation." Proceedings of the 21st
International Society for Music Information Retrieval Conference (ISMIR), 2020.
https://arxiv.org/abs/2008.07142

Licence: MIT, Copyright (c) 2020 Music X Lab; the full text is in `LICENSE` beside this file.
"""


def track_notes(inst: pretty_midi.Instrument, pm: pretty_midi.PrettyMIDI) -> np.ndarray:
    """One track's notes as int64 rows (pitch, start tick, end tick, velocity), pedal applied."""
    rows = np.array([(n.pitch, pm.time_to_tick(n.start), pm.time_to_tick(n.end), n.velocity)
                     for n in inst.notes], dtype=np.int64).reshape(-1, 4)
    rows[:, 2] = np.maximum(rows[:, 2], rows[:, 1])
    pedal = sorted((pm.time_to_tick(c.time), c.value >= 64) for c in inst.control_changes
                   if c.number == SUSTAIN_CC)
    if not pedal:
        return rows
    # A pedal never lifted lifts at the track's end (its last note end or pedal event).
    track_end = max(int(rows[:, 2].max(initial=0)), pedal[-1][0])
    times = np.array([t for t, _ in pedal])
    down = np.array([d for _, d in pedal])
    lifts = times[~down]
    for row in rows:
        k = np.searchsorted(times, row[2], side="right") - 1  # last pedal event at/before release
        if k >= 0 and down[k]:
            later = lifts[lifts >= times[k]]
            row[2] = max(row[2], later[0] if len(later) else track_end)
    return rows


def merge_tracks(tracks: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """The tracks' notes as one part, by (start, pitch); returns (rows, notes merged away).

    Same key, same start tick: the longer note stays (then the louder). Same key, overlapping:
    the earlier note ends where the later one starts.
    """
    rows = np.concatenate(tracks) if tracks else np.zeros((0, 4), dtype=np.int64)
    total = len(rows)
    # Sort by pitch, start, then longest and loudest first, so the first of a group is kept.
    order = np.lexsort((-rows[:, 3], -(rows[:, 2] - rows[:, 1]), rows[:, 1], rows[:, 0]))
    rows = rows[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = (rows[1:, 0] != rows[:-1, 0]) | (rows[1:, 1] != rows[:-1, 1])
    rows = rows[first]
    same_key_next = np.zeros(len(rows), dtype=bool)
    same_key_next[:-1] = rows[1:, 0] == rows[:-1, 0]
    cut = same_key_next.copy()
    cut[:-1] &= rows[:-1, 2] > rows[1:, 1]
    rows[:-1, 2] = np.where(cut[:-1], rows[1:, 1], rows[:-1, 2])
    rows = rows[np.lexsort((rows[:, 0], rows[:, 1]))]
    return rows, total - len(rows)


def convert_song(src: Path, dest: Path) -> tuple[int, int, bool]:
    """Write ``src``'s tracks merged into ``dest``; returns (notes written, notes merged away,
    whether ``dest`` encodes to the same tokens as ``src``)."""
    pm = pretty_midi.PrettyMIDI(str(src))
    tracks = [track_notes(inst, pm) for inst in pm.instruments if not inst.is_drum]
    rows, merged = merge_tracks(tracks)
    original = mido.MidiFile(str(src))
    out = mido.MidiFile(type=1, ticks_per_beat=original.ticks_per_beat)
    # Track 0 holds the tempo map and time and key signatures: copied as it is, so that no
    # tempo is rounded (pretty_midi's writer would round each one to a whole microsecond).
    out.tracks = [original.tracks[0], piano_track(rows)]
    dest.parent.mkdir(parents=True, exist_ok=True)
    out.save(str(dest))
    same = check_song(src, dest, rows, merged, pm)
    return len(rows), merged, same


def piano_track(rows: np.ndarray) -> mido.MidiTrack:
    """A track playing ``rows`` (pitch, start tick, end tick, velocity) on MIDI channel 1 with program 0;
    at one tick, releases come before strikes."""
    events = sorted([(int(s), 1, int(p), int(v)) for p, s, _, v in rows]
                    + [(int(e), 0, int(p), 0) for p, _, e, _ in rows])
    track = mido.MidiTrack([mido.MetaMessage("track_name", name="Piano", time=0),
                            mido.Message("program_change", program=0, channel=0, time=0)])
    now = 0
    for tick, is_on, pitch, velocity in events:
        kind = "note_on" if is_on else "note_off"
        track.append(mido.Message(kind, note=pitch, velocity=velocity, channel=0, time=tick - now))
        now = tick
    track.append(mido.MetaMessage("end_of_track", time=0))
    return track


def check_song(src: Path, dest: Path, rows: np.ndarray, merged: int, pm: pretty_midi.PrettyMIDI) -> bool:
    """``dest`` must read back as exactly ``rows``, ``src``'s notes less ``merged``, and encode;
    returns whether its tokens are the same as ``src``'s."""
    from musicgpt.codec import encode
    from musicgpt.midi_io import read_notes

    notes = read_notes(dest)
    if len(read_notes(src)) - merged != len(notes):
        raise ValueError(f"{dest}: {len(notes)} notes, not {src}'s {len(read_notes(src))} less {merged} merged")
    got = np.stack([notes.pitch, [pm.time_to_tick(t) for t in notes.start],
                    [pm.time_to_tick(t) for t in notes.end], notes.velocity], axis=1)
    got = got[np.lexsort((got[:, 0], got[:, 1]))]
    if len(got) != len(rows) or not np.array_equal(got, rows):
        raise ValueError(f"{dest}: read back {len(got)} notes, not the {len(rows)} merged ones")
    tokens = encode(dest)
    if not len(tokens):
        raise ValueError(f"{dest}: encodes to no tokens")
    return bool(np.array_equal(tokens, encode(src)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pop909", type=Path, required=True,
                        help="a checkout of music-x-lab/POP909-Dataset (holding POP909/ and LICENSE)")
    parser.add_argument("--out", type=Path, default=ROOT / "midi_data" / "pop" / "pop909",
                        help="output folder (default: midi_data/pop/pop909)")
    parser.add_argument("--limit", type=int, default=0, help="convert only the first N songs")
    args = parser.parse_args(argv)

    songs = sorted(args.pop909.glob("POP909/[0-9][0-9][0-9]/[0-9][0-9][0-9].mid"))
    if not songs:
        parser.error(f"{args.pop909}: no POP909/NNN/NNN.mid files")
    songs = songs[: args.limit] if args.limit else songs
    stale = set(args.out.glob("*.mid"))
    written = merged = same_tokens = 0
    for i, src in enumerate(songs, start=1):
        dest = args.out / src.name
        n, m, same = convert_song(src, dest)
        written, merged, same_tokens = written + n, merged + m, same_tokens + same
        stale.discard(dest)
        if i % 100 == 0 or i == len(songs):
            print(f"{i}/{len(songs)} songs", file=sys.stderr)
    if not args.limit:
        for f in stale:
            f.unlink()
    shutil.copyfile(args.pop909 / "LICENSE", args.out / "LICENSE")
    (args.out / "README.md").write_text(README.format(count=len(songs)), encoding="utf-8")
    print(f"wrote {len(songs)} songs to {args.out}: {written:,} notes, {merged:,} merged away "
          f"(a second note of the same key on the same tick); {same_tokens} songs encode to exactly "
          "the tokens of their original (the others differ where the codec breaks a tie on its "
          "coarser grid)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
