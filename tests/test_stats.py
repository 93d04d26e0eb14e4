"""`musicgpt stats`: musical features of a set of MIDI files and their overlap with a reference set."""

import json
import math

import numpy as np
import pytest
from conftest import make_piece
from conftest import write_notes as write

from musicgpt import stats
from musicgpt.cli import main
from musicgpt.midi_io import read_notes

# C4 held 1 s, E4 then G4 over it, then C5 alone.
TRIAD = [(60, 0.0, 1.0, 40), (64, 0.0, 0.5, 80), (67, 0.5, 1.0, 120), (72, 1.0, 2.0, 100)]


def values(path):
    n = read_notes(path)
    return {f.name: f.values(n) for f in stats.FEATURES}


def test_features_of_a_known_piece(tmp_path):
    v = values(write(tmp_path / "triad.mid", TRIAD))
    assert v["pitch_range"].tolist() == [12]
    assert sorted(v["pitch_class"].tolist()) == [0, 0, 4, 7]
    assert v["pitch_class_entropy"] == pytest.approx([1.5])  # C half the time, E and G a quarter each
    assert v["polyphony"].tolist() == [2, 2, 1]  # at 0: C4 E4; at 0.5: C4 G4 (E4 has ended); at 1: C5
    assert v["notes_per_second"] == pytest.approx([2.0])
    assert v["inter_onset_interval"] == pytest.approx([0.5, 0.5])
    assert sorted(v["duration"]) == pytest.approx([0.5, 0.5, 1.0, 1.0])
    assert sorted(v["velocity"].tolist()) == [40, 80, 100, 120]


def test_sustain_pedal_lengthens_notes_and_thickens_polyphony(tmp_path):
    v = values(write(tmp_path / "pedal.mid", TRIAD, pedal=[(0.25, 100), (1.5, 0)]))
    # E4, G4 and C4 are released under the pedal and sound until it lifts at 1.5 s.
    assert sorted(v["duration"]) == pytest.approx([1.0, 1.0, 1.5, 1.5])
    assert v["polyphony"].tolist() == [2, 3, 4]  # E4 rings on under the pedal when G4 comes


def test_a_key_struck_again_under_the_pedal_is_one_string(tmp_path):
    """Stats read notes as a piano sounds them: the re-strike ends the pedal-held note."""
    path = write(tmp_path / "restruck.mid", [(60, 0.0, 0.2, 80), (60, 0.5, 0.7, 80)], pedal=[(0.0, 100), (1.5, 0)])
    v = stats.collect([path], progress=False).values
    assert sorted(v["duration"]) == pytest.approx([0.5, 1.0])  # not two notes both ringing to 1.5 s
    assert v["polyphony"].tolist() == [1, 1]


def test_chord_notes_a_few_ms_apart_are_one_onset(tmp_path):
    v = values(write(tmp_path / "rolled.mid", [(60, 0.0, 1.0, 80), (64, 0.004, 1.0, 80), (67, 1.0, 2.0, 80)]))
    assert v["inter_onset_interval"] == pytest.approx([1.0], abs=0.006)
    assert v["polyphony"].tolist() == [2, 1]


def test_overlapping_area():
    bins = np.array([0.0, 1, 2, 3])
    p, q = stats.histogram(np.array([0.5, 1.5]), bins), stats.histogram(np.array([1.5, 2.5, 99.0]), bins)
    assert p.tolist() == [0.5, 0.5, 0] and q.tolist() == pytest.approx([0, 1 / 3, 2 / 3])  # 99 -> last bin
    assert stats.overlapping_area(p, q) == pytest.approx(1 / 3) == stats.overlapping_area(q, p)
    assert stats.overlapping_area(p, p) == pytest.approx(1.0)
    assert stats.histogram(np.zeros(0), bins).sum() == 0


def test_identical_sets_overlap_fully_and_disjoint_features_not_at_all(tmp_path):
    for i in range(3):
        make_piece(tmp_path / "a" / f"{i}.mid", seed=i)
        write(tmp_path / "loud" / f"{i}.mid", [(66 + 12 * (k % 2), k * 0.3, k * 0.3 + 0.2, 120) for k in range(8)])
        write(tmp_path / "soft" / f"{i}.mid", [(60 + 12 * (k % 2), k * 0.3, k * 0.3 + 0.2, 10) for k in range(8)])
    same = stats.compare_sets(tmp_path / "a", tmp_path / "a", progress=False)["features"]
    assert set(same) == {f.name for f in stats.FEATURES}
    assert all(f["oa"] == pytest.approx(1.0) for f in same.values())
    apart = stats.compare_sets(tmp_path / "loud", tmp_path / "soft", progress=False)["features"]
    assert apart["velocity"]["oa"] == 0 and apart["pitch_class"]["oa"] == 0  # F# vs C, 120 vs 10
    assert apart["pitch_range"]["oa"] == 1 and apart["inter_onset_interval"]["oa"] == pytest.approx(1.0)


def test_cli_table_png_and_json(tmp_path, capsys):
    for i in range(2):
        make_piece(tmp_path / "samples" / f"s{i}.mid", seed=10 + i, pedal=False)
        make_piece(tmp_path / "ref" / f"r{i}.mid", seed=20 + i)
    out = tmp_path / "pics" / "stats.png"
    assert main(["stats", str(tmp_path / "samples"), "--reference", str(tmp_path / "ref"), "-o", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["feature", "unit"] and table[0].split()[-1] == "OA"
    rows = {line.split()[0]: line for line in table[2:]}
    assert {f.name for f in stats.FEATURES} <= set(rows) and table[-1].startswith("mean OA")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["stats", str(tmp_path / "samples"), "--reference", str(tmp_path / "ref"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"]["files"] == report["reference"]["files"] == 2
    for name, f in report["features"].items():
        assert 0 <= f["oa"] <= 1 and len(f["samples"]["hist"]) == len(f["bins"]) - 1
        assert math.isclose(sum(f["reference"]["hist"]), 1.0)
        assert f"{f['oa']:.3f}" in rows[name]


def test_reference_span_describes_only_that_stretch_of_each_reference(tmp_path, capsys):
    # The reference opens with 10 s of low, loud notes, then plays the samples' high soft line.
    line = [(72 + k % 5, k * 0.5, k * 0.5 + 0.4, 30) for k in range(20)]
    write(tmp_path / "samples" / "s.mid", line)
    write(tmp_path / "ref" / "r.mid", [(40 + k % 3, k * 0.5, k * 0.5 + 0.4, 110) for k in range(20)]
          + [(p, s + 10, e + 10, v) for p, s, e, v in line])
    write(tmp_path / "ref" / "early.mid", [(40, 0.0, 1.0, 110)])  # nothing after 10 s: left out of the span
    whole = stats.compare_sets(tmp_path / "samples", tmp_path / "ref", progress=False)
    assert whole["features"]["velocity"]["oa"] < 0.6
    later = stats.compare_sets(tmp_path / "samples", tmp_path / "ref", progress=False, reference_span=(10, 20))
    assert later["reference"]["files"] == 1 and later["reference"]["span"] == [10, 20]
    assert all(f["oa"] == pytest.approx(1.0) for f in later["features"].values())  # the same music, moved to 0
    cut = stats.excerpt(read_notes(tmp_path / "ref" / "r.mid"), 10, 20)
    assert cut.start.min() == pytest.approx(0, abs=0.003) and cut.pitch.tolist() == [p for p, *_ in line]
    assert main(["stats", str(tmp_path / "samples"), "--reference", str(tmp_path / "ref"),
                 "--reference-span", "10:20"]) == 0
    out = capsys.readouterr().out
    assert "reference 10-20 s (1)" in out and "mean OA 1.000" in out


@pytest.mark.parametrize("span", ["10", "20:10", "-1:5", "a:b", "0:inf"])
def test_a_bad_reference_span_is_a_usage_error(tmp_path, span, capsys):
    with pytest.raises(SystemExit) as e:
        main(["stats", str(tmp_path), "--reference", str(tmp_path), "--reference-span", span])
    assert e.value.code == 2 and "--reference-span" in capsys.readouterr().err


def test_a_span_no_reference_reaches_is_one_line(tmp_path):
    write(tmp_path / "s.mid", [(60, 0.0, 1.0, 80)])
    with pytest.raises(stats.MusicGPTError, match="no reference file has a note between 100 and 160 s"):
        stats.compare_sets(tmp_path / "s.mid", tmp_path / "s.mid", progress=False, reference_span=(100, 160))
