"""`musicgpt encode` / `musicgpt decode`: end to end in a tmp folder, one-line errors on bad input."""

from __future__ import annotations

import numpy as np
import pretty_midi
import pytest

from musicgpt import codec
from musicgpt.cli import main


def write_piece(path) -> None:
    pm = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0)
    for i, p in enumerate([60, 64, 67, 72, 67, 64, 60]):
        piano.notes.append(pretty_midi.Note(50 + 10 * (i % 3), p, 0.3 * i, 0.3 * i + 0.45))
    piano.notes.append(pretty_midi.Note(90, 48, 0.0, 3.5))  # outlasts a 1 s TIME_SHIFT
    pm.instruments.append(piano)
    pm.write(str(path))


def test_encode_then_decode(tmp_path, capsys):
    midi, tokens, out = tmp_path / "in.mid", tmp_path / "in.tokens", tmp_path / "a" / "b" / "out.mid"
    write_piece(midi)
    assert main(["encode", str(midi), "-o", str(tokens)]) == 0
    lines = tokens.read_text().splitlines()
    assert lines[:4] == ["VELOCITY_12", "NOTE_ON_60", "VELOCITY_22", "NOTE_ON_48"]
    assert f"{midi}: {len(lines)} tokens, 8 notes, 3.5 s" in capsys.readouterr().err

    assert main(["decode", str(tokens), "-o", str(out)]) == 0
    assert f"{out}: 8 notes" in capsys.readouterr().err
    np.testing.assert_array_equal(codec.encode(out), codec.encode(midi))

    assert main(["encode", str(midi)]) == 0  # no -o: the names go to stdout
    assert capsys.readouterr().out.splitlines() == lines


def test_decode_reports_the_bad_line(tmp_path, capsys):
    tokens = tmp_path / "bad.tokens"
    tokens.write_text("NOTE_ON_60\n\nTIME_SHIFT_100ms\nNOTE_ON_600\n")
    assert main(["decode", str(tokens), "-o", str(tmp_path / "x.mid")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"musicgpt: error: {tokens}:4: unknown token 'NOTE_ON_600'"]
    assert not (tmp_path / "x.mid").exists()


def _bad_inputs(tmp_path):
    text = tmp_path / "not_a_midi.txt"
    text.write_text("this is not music\n")
    empty = tmp_path / "empty.mid"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.mid"
    write_piece(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-20])
    return [(text, "not a MIDI file"), (empty, "empty file"), (truncated, "truncated"),
            (tmp_path / "missing.mid", "file not found")]


@pytest.mark.parametrize("case", range(4))
def test_encode_bad_input_prints_one_line(tmp_path, capsys, case):
    path, problem = _bad_inputs(tmp_path)[case]
    assert main(["encode", str(path)]) != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"musicgpt: error: {path}: ")
    assert problem in lines[0]


def test_encode_bad_input_relative_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "not_a_midi.txt").write_text("hello\n")
    assert main(["encode", "not_a_midi.txt"]) == 1
    assert capsys.readouterr().err == "musicgpt: error: not_a_midi.txt: not a MIDI file (bad header)\n"


def test_decode_refuses_token_files_it_cannot_safely_read(tmp_path, capsys):
    import os

    fifo = tmp_path / "tokens.txt"
    os.mkfifo(fifo)  # reading a pipe with no writer would block forever
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00NOTE_ON_60")
    for path, why in ((fifo, "not a regular file"), (binary, "not UTF-8"), (tmp_path, "is a folder")):
        assert main(["decode", str(path), "-o", str(tmp_path / "x.mid")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and why in err and str(path) in err, err
