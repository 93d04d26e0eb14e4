"""`musicgpt stats --copies`: the longest run of notes a sample shares with a reference file."""

import json
import shutil

import numpy as np
import pretty_midi
import pytest
from conftest import make_piece, write_notes

from musicgpt import copies, stats
from musicgpt.cli import main
from musicgpt.midi_io import Notes, read_notes


def melody(seed, n, t0=0.0, rhythm=(0.25, 0.5)):
    """n single notes, random pitches 48..84, gaps drawn from `rhythm`: (pitch, start, end, velocity)."""
    rng = np.random.default_rng(seed)
    t, out = t0, []
    for _ in range(n):
        out.append((int(rng.integers(48, 85)), round(t, 2), round(t + 0.2, 2), int(rng.integers(40, 110))))
        t += float(rng.choice(rhythm))
    return out


def moved(notes, semitones, seconds):
    return [(p + semitones, round(s + seconds, 2), round(e + seconds, 2), v) for p, s, e, v in notes]


@pytest.fixture
def passage(tmp_path):
    """Two reference files, and a sample holding notes 10..29 of ref/sub/a.mid 5 semitones up and 7.13 s later."""
    a = melody(1, 40)
    write_notes(tmp_path / "ref" / "sub" / "a.mid", a)
    write_notes(tmp_path / "ref" / "b.mid", melody(2, 40))
    # The notes around the copy move in 0.37 s gaps, a rhythm neither reference has, so the run stops at 20.
    before = melody(3, 10, rhythm=(0.37,))
    copy = moved(a[10:30], 5, 7.13 - a[10][1])
    after = melody(4, 10, t0=copy[-1][1] + 0.37, rhythm=(0.37,))
    write_notes(tmp_path / "samples" / "s.mid", before + copy + after)
    return tmp_path


def test_a_transposed_and_moved_passage_is_found_where_it_came_from(passage):
    ref = [read_notes(passage / "ref" / "b.mid"), read_notes(passage / "ref" / "sub" / "a.mid")]
    [run] = copies.longest_copies([read_notes(passage / "samples" / "s.mid")], ref)
    assert run == copies.Run(length=20, reference=1, sample_at=10, reference_at=10)


def test_a_whole_piece_transposed_and_moved_is_copied_in_full(tmp_path):
    ref = make_piece(tmp_path / "ref.mid", seed=3)  # chords, pedal, several voices
    pm = pretty_midi.PrettyMIDI(str(ref))
    for note in pm.instruments[0].notes:
        note.pitch, note.start, note.end = note.pitch - 3, note.start + 2.0, note.end + 2.0
    for cc in pm.instruments[0].control_changes:
        cc.time += 2.0
    pm.write(str(tmp_path / "sample.mid"))
    n = len(read_notes(ref))
    other = read_notes(make_piece(tmp_path / "other.mid", seed=4))
    runs = copies.longest_copies([read_notes(tmp_path / "sample.mid")], [other, read_notes(ref)])
    assert runs == [copies.Run(n, 1, 0, 0)]


def test_a_sample_is_not_matched_with_itself_but_with_a_duplicate(tmp_path):
    for i in range(3):
        make_piece(tmp_path / "set" / f"{i}.mid", seed=i)
    report = stats.compare_sets(tmp_path / "set", tmp_path / "set", progress=False, copies=True)["copies"]
    full = [len(read_notes(tmp_path / "set" / f"{i}.mid")) for i in range(3)]
    for s, n in zip(report["samples"], full):
        assert s["reference"] != s["sample"] and 1 < s["notes"] < n
    shutil.copy(tmp_path / "set" / "0.mid", tmp_path / "set" / "copy_of_0.mid")  # real data can hold duplicates
    report = stats.compare_sets(tmp_path / "set", tmp_path / "set", progress=False, copies=True)["copies"]
    found = {s["sample"]: (s["notes"], s["reference"]) for s in report["samples"]}
    assert found["0.mid"] == (full[0], "copy_of_0.mid") and found["copy_of_0.mid"] == (full[0], "0.mid")
    assert report["max"] == full[0]


def test_chord_notes_are_ordered_by_pitch_whatever_order_the_file_lists_them_in():
    def notes(rows):  # (pitch, start)
        p, s = np.array(rows, dtype=float).T
        return Notes(p.astype(np.int64), s, s + 0.5, np.full(len(p), 80))

    tidy = notes([(60, 0.0), (64, 0.0), (67, 0.0), (72, 0.5), (62, 1.0), (65, 1.0)])
    # The same music listed in another order, one chord rolled within a step (4 ms): the same symbols.
    messy = notes([(67, 0.001), (72, 0.5), (60, 0.004), (65, 1.0), (64, 0.0), (62, 1.002)])
    assert copies.note_symbols(messy).tolist() == copies.note_symbols(tidy).tolist()
    step = copies.PITCH_SPAN
    assert copies.note_symbols(tidy).tolist() == [4 + 128, 3 + 128, 50 * step + 5 + 128, 50 * step - 10 + 128,
                                                  3 + 128]
    assert copies.longest_copies([messy], [tidy]) == [copies.Run(6, 0, 0, 0)]


def test_samples_with_no_note_or_one_note_and_references_with_none():
    one = Notes(np.array([60]), np.array([0.0]), np.array([1.0]), np.array([80]))
    none = Notes(*(np.zeros(0, t) for t in (np.int64, float, float, np.int64)))
    two = Notes(np.array([60, 62]), np.array([0.0, 1.0]), np.array([1.0, 2.0]), np.array([80, 80]))
    runs = copies.longest_copies([none, one, two], [two])
    assert [r.length for r in runs] == [0, 1, 2] and [r.reference for r in runs] == [None, None, 0]
    assert copies.longest_copies([two], [two], excluded=[0]) == [copies.Run(0, None, 0, 0)]  # nothing else to match
    assert copies.longest_copies([two], []) == [copies.Run(0, None, 0, 0)]


def brute_force(sample, refs, excluded):
    """The longest common run by trying every pair of starts: (length, reference, sample_at, reference_at)."""
    best = (0, None, 0, 0)
    for f, ref in enumerate(refs):
        for i in range(len(sample)):
            for j in range(len(ref) if f != excluded else 0):
                n = 0
                while i + n < len(sample) and j + n < len(ref) and sample[i + n] == ref[j + n]:
                    n += 1
                if n > best[0] or (n == best[0] and n and i < best[2]):
                    best = (n, f, i, j)
    return best


def test_longest_runs_agrees_with_brute_force_on_random_sequences():
    rng = np.random.default_rng(0)
    for _ in range(300):
        kinds = int(rng.integers(1, 4))  # few symbols: many long and tied runs
        refs = [rng.integers(0, kinds, int(rng.integers(0, 12))) for _ in range(int(rng.integers(0, 5)))]
        samples, excluded = [], []
        for _ in range(int(rng.integers(1, 4))):
            own = int(rng.integers(0, len(refs))) if refs and rng.random() < 0.5 else None
            samples.append(refs[own].copy() if own is not None else rng.integers(0, kinds, int(rng.integers(0, 12))))
            excluded.append(own)
        for sample, own, run in zip(samples, excluded, copies.longest_runs(samples, refs, excluded)):
            length, _, sample_at, _ = brute_force(sample, refs, own)
            assert (run.length, run.sample_at) == (length, sample_at)
            if length:  # the file and place given hold the run, and are not the sample's own
                assert run.reference != own
                ref = refs[run.reference][run.reference_at:run.reference_at + length]
                assert ref.tolist() == sample[sample_at:sample_at + length].tolist()


def test_cli_prints_a_line_per_sample_and_json_gains_copies(passage, capsys):
    args = ["stats", str(passage / "samples"), "--reference", str(passage / "ref")]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert "in a row" not in plain
    assert main([*args, "--copies"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(plain)  # the table is unchanged; the copies come after it
    lines = out[len(plain):].splitlines()
    assert lines[0] == ("s.mid: 20 notes in a row also in sub/a.mid "
                        "(sample note 10 at 7.13 s, reference note 10 at 3.50 s)")
    assert lines[1].startswith("longest run shared with a reference file, per sample: median 20 notes, max 20 (s.mid)")
    assert main([*args, "--copies", "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)["copies"]
    assert entry["samples"] == [{"sample": "s.mid", "notes": 20, "reference": "sub/a.mid", "sample_note": 10,
                                 "reference_note": 10, "sample_time": 7.13, "reference_time": 3.5}]
    assert entry["median"] == 20 and entry["max"] == 20 and "transposition" in entry["matched"]
    assert main([*args, "--json"]) == 0
    assert "copies" not in json.loads(capsys.readouterr().out)
