"""`musicgpt sample` end to end with a tiny trained checkpoint: files, primer, seeds, errors."""

import math
from pathlib import Path

import numpy as np
import pretty_midi
import pytest
from conftest import make_piece

from musicgpt import checkpoint_header
from musicgpt.cli import main
from musicgpt.sample import SampleRequest, continuation_midi, sample_files
from musicgpt.vocab import NOTE_OFF, NOTE_ON, TIME_SHIFT, CodecConfig


def _sample(capsys, *args) -> tuple[int, list[Path], str]:
    rc = main(["sample", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, [Path(line) for line in out.splitlines()], err


def _notes(path: Path) -> list[pretty_midi.Note]:
    pm = pretty_midi.PrettyMIDI(str(path))
    assert len(pm.instruments) == 1 and pm.instruments[0].program == 0
    assert pm.get_tempo_changes()[1].tolist() == [120.0]
    return pm.instruments[0].notes


def test_three_samples_are_valid_distinct_midi_and_a_seed_repeats_them(tiny_run, tmp_path, capsys):
    rc, paths, err = _sample(capsys, "--checkpoint", tiny_run, "--seconds", 4, "--num-samples", 3,
                             "--seed", 7, "--out", tmp_path / "a")
    assert rc == 0 and len(paths) == 3 and all(p.parent == tmp_path / "a" for p in paths)
    assert all("seed7" in p.name for p in paths)
    for p in paths:
        notes = _notes(p)
        assert notes and max(n.end for n in notes) <= 4.0 + 1e-6  # --seconds is respected
    assert len({p.read_bytes() for p in paths}) == 3
    again = sample_files(SampleRequest(checkpoint=tiny_run, seconds=4, num_samples=3, seed=7,
                                       out_dir=tmp_path / "a"), progress=False)
    assert set(again).isdisjoint(paths)  # a second run never overwrites the first
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]


def test_seconds_sets_the_length_of_the_music(tiny_run, tmp_path, capsys):
    ends = {}
    for seconds in (2, 8):
        rc, paths, _ = _sample(capsys, "--checkpoint", tiny_run, "--seconds", seconds, "--seed", 1,
                               "--num-samples", 2, "--out", tmp_path)
        assert rc == 0
        ends[seconds] = [max(n.end for n in _notes(p)) for p in paths]
    assert all(e <= 2.0 + 1e-6 for e in ends[2]) and all(e <= 8.0 + 1e-6 for e in ends[8])
    assert max(ends[8]) > 5.0


def test_primer_notes_are_kept_with_include_primer(tiny_run, tmp_path, capsys):
    primer = make_piece(tmp_path / "song.mid", seed=3, seconds=8, pedal=False)
    rc, [path], err = _sample(capsys, "--checkpoint", tiny_run, "--primer", primer, "--primer-seconds", 4,
                              "--include-primer", "--seconds", 2, "--seed", 0, "--out", tmp_path / "out")
    assert rc == 0 and path.name.startswith("song-")
    got = _notes(path)
    expected = [n for n in pretty_midi.PrettyMIDI(str(primer)).instruments[0].notes if n.end < 3.95]
    assert len(expected) > 10
    for n in expected:  # same key, onset and release on the 10 ms grid, velocity within its bin
        assert any(m.pitch == n.pitch and abs(m.start - n.start) < 0.006 and abs(m.end - n.end) < 0.006
                   and abs(m.velocity - n.velocity) <= 4 for m in got), n
    assert max(m.end for m in got) <= 4.0 + 2.0 + 1e-6
    # Without --include-primer only the continuation is written, starting at time 0.
    rc, [alone], _ = _sample(capsys, "--checkpoint", tiny_run, "--primer", primer, "--primer-seconds", 4,
                             "--seconds", 2, "--seed", 0, "--out", tmp_path / "out")
    alone_notes = _notes(alone)
    assert max(m.end for m in alone_notes) <= 2.0 + 1e-6
    assert len(alone_notes) < len(got)


def test_pauses_and_generated_notes_are_capped_but_the_primer_is_not(tiny_run, tmp_path):
    primer = tmp_path / "held.mid"  # one note held for 3 s: the user's, so never shortened
    pm = pretty_midi.PrettyMIDI()
    pm.instruments.append(pretty_midi.Instrument(0))
    pm.instruments[0].notes.append(pretty_midi.Note(80, 40, 0.0, 3.0))
    pm.write(str(primer))

    def generated(**limits):
        request = SampleRequest(checkpoint=tiny_run, primer=primer, include_primer=True, seconds=20,
                                seed=1, out_dir=tmp_path / "out", **limits)
        [path] = sample_files(request, progress=False)
        notes = _notes(path)
        assert any(n.pitch == 40 and n.start == 0 and abs(n.end - 3.0) < 1e-6 for n in notes)
        new = sorted((n for n in notes if n.start >= 3.0 - 1e-6), key=lambda n: n.start)
        onsets = [3.0] + [n.start for n in new]
        return max(n.end - n.start for n in new), max(b - a for a, b in zip(onsets, onsets[1:]))

    longest_note, longest_pause = generated(max_note_seconds=math.inf, max_pause_seconds=math.inf)
    assert longest_note > 0.5 and longest_pause > 0.2  # what the barely trained model does
    longest_note, longest_pause = generated(max_note_seconds=0.5, max_pause_seconds=0.2)
    assert longest_note <= 0.5 + 1e-6 and longest_pause <= 0.2 + 1e-6


def test_a_bad_primer_fails_in_one_line_before_any_model_work(tiny_run, tmp_path, capsys):
    bad = tmp_path / "notes.mid"
    bad.write_text("these are not MIDI bytes")
    rc, paths, err = _sample(capsys, "--checkpoint", tmp_path / "missing", "--primer", bad, "--out", tmp_path / "o")
    assert rc == 1 and not paths
    assert err.count("\n") == 1 and err.startswith("musicgpt: error: ") and "notes.mid" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, flag", [
    (["--top-p", "1.5"], "--top-p"), (["--temperature", "0"], "--temperature"), (["--tokens", "0"], "--tokens"),
    (["--num-samples", "0"], "--num-samples"), (["--greedy", "--num-samples", "2"], "--num-samples"),
    (["--primer-seconds", "3"], "--primer"), (["--device", "tpu"], "--device"),
    (["--max-pause", "-1"], "--max-pause"), (["--max-note", "nan"], "--max-note"),
])
def test_bad_options_fail_in_one_line_before_loading(tmp_path, capsys, args, flag):
    rc, paths, err = _sample(capsys, "--checkpoint", tmp_path / "missing", *args)
    assert rc == 1 and err.count("\n") == 1 and flag in err and "missing" not in err


def test_tokens_and_seconds_are_exclusive(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--tokens", "10", "--seconds", "3"])
    assert e.value.code == 2


def test_no_checkpoint_anywhere_asks_to_train_first(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoint_header, "DEFAULT_MODEL_DIR", tmp_path / "no-default-model")
    rc, paths, err = _sample(capsys)
    assert rc == 1 and not paths
    assert err.count("\n") == 1 and "musicgpt train" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_newest_run_is_used_without_checkpoint_and_files_are_listed(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r1").symlink_to(tiny_run, target_is_directory=True)
    rc, paths, err = _sample(capsys, "--tokens", 40)
    assert rc == 0 and len(paths) == 1 and paths[0].parent == Path("samples") and paths[0].is_file()
    assert "newest run" in err and "--seed" in err  # which model, and how to repeat the run



def test_a_note_sounding_at_the_join_starts_the_continuation_at_time_zero():
    # The primer strikes C4 and waits 1 s; the continuation releases it 0.5 s later, then plays E4.
    config = CodecConfig()
    shift = TIME_SHIFT + 49  # 50 steps of 10 ms
    primer = np.array([NOTE_ON + 60, shift, shift], dtype=np.int16)
    new = np.array([shift, NOTE_OFF + 60, NOTE_ON + 64, shift], dtype=np.int16)
    alone = continuation_midi(primer, new, config, include_primer=False).instruments[0].notes
    assert [(n.pitch, round(n.start, 3), round(n.end, 3)) for n in alone] == [(60, 0.0, 0.5), (64, 0.5, 1.0)]
    whole = continuation_midi(primer, new, config, include_primer=True).instruments[0].notes
    assert [(n.pitch, round(n.start, 3), round(n.end, 3)) for n in whole] == [(60, 0.0, 1.5), (64, 1.5, 2.0)]
