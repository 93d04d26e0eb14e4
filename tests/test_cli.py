"""The command line's own job: help, version, exit statuses, one-line errors, and handing options to the library.

Each subcommand's work is tested beside its library module (test_cli_codec, test_sample_cli, test_evaluate, ...);
here the library is replaced where that keeps the test about the command line alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from conftest import make_piece

import musicgpt
from musicgpt import codec
from musicgpt.cli import main
from musicgpt.errors import MusicGPTError
from musicgpt.train import TrainConfig
from musicgpt.train_config import resolve

COMMANDS = ["train", "sample", "info", "eval", "stats", "attention", "render", "encode", "decode"]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"musicgpt {musicgpt.__version__}"


def test_no_command_prints_help_listing_every_command_and_returns_2(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: musicgpt")
    assert all(f"    {name}" in out for name in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: musicgpt {command}")


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compose"])
    assert e.value.code == 2
    assert "invalid choice: 'compose'" in capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_a_library_error_is_one_line_and_status_1(tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise MusicGPTError("song.mid: the reason, in one line")

    monkeypatch.setattr(codec, "encode", fail)
    assert main(["encode", str(make_piece(tmp_path / "song.mid", seconds=2))]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert _one_line(captured.err) == "musicgpt: error: song.mid: the reason, in one line"


def test_a_missing_folder_is_one_line_for_the_folder_commands(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    for argv in (["eval", str(missing)], ["train", str(missing), "--out", str(tmp_path / "run"), "--device", "cpu"]):
        assert main(argv) == 1, argv
        captured = capsys.readouterr()
        assert captured.out == ""
        assert _one_line(captured.err) == f"musicgpt: error: {missing}: not a folder"
    assert not (tmp_path / "run").exists()


def test_ctrl_c_inside_a_command_is_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(codec, "encode", interrupted)
    try:
        rc = main(["encode", str(make_piece(tmp_path / "song.mid", seconds=2))])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() as a traceback")
    assert rc == 130
    captured = capsys.readouterr()
    assert captured.out == ""
    line = _one_line(captured.err)
    assert line.startswith("musicgpt: ") and "interrupted" in line


def test_encode_decode_round_trip_of_a_pedalled_piece_through_stdout(tmp_path, capsys):
    """stdout and -o write the same names, and decoding them gives MIDI that encodes to the same tokens."""
    midi = make_piece(tmp_path / "song.mid", seed=4, seconds=8, pedal=True)
    assert main(["encode", str(midi)]) == 0
    printed = capsys.readouterr().out
    assert main(["encode", str(midi), "-o", str(tmp_path / "song.tokens")]) == 0
    assert capsys.readouterr().out == ""  # with -o nothing but the summary (on stderr)
    assert (tmp_path / "song.tokens").read_text() == printed
    (tmp_path / "piped.tokens").write_text(printed)
    assert main(["decode", str(tmp_path / "piped.tokens"), "-o", str(tmp_path / "back.mid")]) == 0
    np.testing.assert_array_equal(codec.encode(tmp_path / "back.mid"), codec.encode(midi))


def _capture(monkeypatch, module, name: str) -> list:
    calls = []
    monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append((args, kwargs)) or [])
    return calls


def _config_in(call, kind):
    args, kwargs = call
    [found] = [v for v in (*args, *kwargs.values()) if isinstance(v, kind)]
    return found


def test_train_options_reach_the_train_config(monkeypatch):
    import musicgpt.train

    calls = _capture(monkeypatch, musicgpt.train, "train")
    assert main(["train", "songs"]) == 0
    assert _config_in(calls[-1], TrainConfig) == TrainConfig(data_dir="songs")  # left out: the library's defaults
    argv = ["train", "songs", "--preset", "small", "--out", "runs/x", "--max-steps", "70", "--stop-at", "30",
            "--batch-size", "5", "--seq-len", "48", "--lr", "0.0123", "--warmup", "4", "--grad-accum", "3",
            "--dropout", "0.2", "--attn-dropout", "0.05", "--attn-impl", "eager", "--device", "cpu", "--compile",
            "--precision", "fp32", "--resume", "runs/old", "--init", "default", "--attention", "absolute",
            "--seed", "99", "--no-augment", "--eval-interval", "11", "--val-fraction", "0.25", "--threads", "2",
            "--tag-weight", "classical=3", "--tag-weight", "pop=0.5"]
    assert main(argv) == 0
    assert len(calls) == 2
    assert _config_in(calls[-1], TrainConfig) == TrainConfig(
        data_dir="songs", preset="small", out="runs/x", max_steps=70, stop_at=30, batch_size=5, seq_len=48,
        lr=0.0123, warmup=4, grad_accum=3, dropout=0.2, attn_dropout=0.05, attn_impl="eager", device="cpu",
        compile=True, precision="fp32", resume="runs/old", init="default", attention="absolute", seed=99,
        augment=False, eval_interval=11, val_fraction=0.25, threads=2, tag_weights={"classical": 3.0, "pop": 0.5},
    )


@pytest.mark.parametrize("weight", ["classical", "=2", "classical=loud"])
def test_a_malformed_tag_weight_is_a_usage_error(weight, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "songs", "--tag-weight", weight])
    assert e.value.code == 2 and "--tag-weight" in capsys.readouterr().err


@pytest.mark.parametrize("weight", [0.0, -1.0, float("inf"), float("nan")])
def test_a_tag_weight_must_be_positive(weight):
    with pytest.raises(MusicGPTError, match="--tag-weight pop: the weight must be a positive number"):
        resolve(TrainConfig(tag_weights={"pop": weight}), "cpu")


def _leaves(value, name=None):
    """(name, value) of everything a call received, looking inside dataclasses and dicts; paths as text."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, k)]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v, name)]
    return [(name, str(value) if isinstance(value, Path) else value)]


def _received(call) -> tuple[list, dict]:
    args, kwargs = call
    leaves = _leaves(list(args)) + _leaves(kwargs)
    return [v for _, v in leaves], {k: v for k, v in leaves if k is not None}


def test_sample_options_reach_the_library(monkeypatch, tmp_path, capsys):
    """Each option's value reaches sample_files, whether as keywords or inside a request dataclass; by name
    only where two options share a type and a swap would go unseen (the two lengths, the two limits, flags)."""
    import musicgpt.sample

    calls = []
    written = [tmp_path / "a.mid", tmp_path / "b.mid"]
    monkeypatch.setattr(musicgpt.sample, "sample_files", lambda *a, **k: calls.append((a, k)) or written)
    primer = tmp_path / "primer.mid"
    assert main(["sample", "--checkpoint", "runs/x", "--primer", str(primer), "--primer-seconds", "3.25",
                 "--tokens", "123", "--num-samples", "3", "--seed", "4242", "--temperature", "0.77", "--top-k", "13",
                 "--top-p", "0.83", "--typical-p", "0.91", "--min-p", "0.029", "--repetition-penalty", "1.17",
                 "--length-penalty", "0.63", "--out", str(tmp_path / "out"), "--include-primer",
                 "--max-pause", "2.5", "--max-note", "9.5", "--threads", "5", "--device", "auto"]) == 0
    assert capsys.readouterr().out.splitlines() == [str(p) for p in written]  # the files written, one a line
    values, named = _received(calls[-1])
    for value in ("runs/x", str(primer), 3.25, 123, 3, 4242, 0.77, 13, 0.83, 0.91, 0.029, 1.17, 0.63,
                  str(tmp_path / "out"), 2.5, 9.5, 5, "auto"):
        assert value in values, value
    assert named["include_primer"] is True and named["greedy"] is False
    assert named["primer_seconds"] == 3.25 and named["tokens"] == 123 and named["seconds"] is None
    assert named["max_pause_seconds"] == 2.5 and named["max_note_seconds"] == 9.5
    # Options left out reach the library as "not given", so its defaults apply.
    assert main(["sample", "--seconds", "4.5", "--beams", "4"]) == 0
    values, named = _received(calls[-1])
    assert 4.5 in values and 4 in values and 123 not in values and "runs/x" not in values
    assert named["include_primer"] is False and named["seconds"] == 4.5 and named["primer_seconds"] is None
    assert main(["sample", "--greedy"]) == 0
    assert _received(calls[-1])[1]["greedy"] is True
    assert named["top_p_scope"] == "kind"  # the default, where the flag is not given
    assert main(["sample", "--top-p-scope", "token"]) == 0
    assert _received(calls[-1])[1]["top_p_scope"] == "token"


# ----------------------------------------------------------------------------- output paths

def _one_line_error(capsys, argv: list) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("musicgpt: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def piece_and_file(tmp_path):
    """A real MIDI file, and a regular file that output paths try to use as a folder."""
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    return make_piece(tmp_path / "song.mid", seed=1, seconds=4), a_file


def test_bad_output_paths_fail_in_one_line_before_any_work(piece_and_file, tmp_path, capsys, monkeypatch):
    import musicgpt.codec
    import musicgpt.data
    import musicgpt.stats

    piece, a_file = piece_and_file
    # Any of these would be work done before the bad path is noticed.
    for module, name in ((musicgpt.codec, "encode"), (musicgpt.stats, "compare_sets"),
                         (musicgpt.data, "encode_folder")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("work began before the path was checked"))
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("EOS\n")
    cases = [
        (["encode", piece, "-o", tmp_path], "is a folder"),
        (["encode", piece, "-o", a_file / "x.txt"], "is not a folder"),
        (["decode", tokens, "-o", a_file / "x.mid"], "is not a folder"),
        (["stats", piece, "--reference", piece, "-o", a_file / "x.png"], "is not a folder"),
        (["attention", piece, "-o", a_file / "x.html", "--checkpoint", tmp_path / "missing"], "is not a folder"),
        (["train", tmp_path, "--out", a_file / "run"], "is not a folder"),
        (["train", tmp_path, "--out", a_file], "is not a folder"),
        (["sample", "--out", a_file, "--checkpoint", tmp_path / "missing"], "is not a folder"),
    ]
    for argv, why in cases:
        line = _one_line_error(capsys, argv)
        assert why in line and str(argv[argv.index("-o" if "-o" in argv else "--out") + 1]) in line, line


def test_encode_makes_missing_output_folders(piece_and_file, tmp_path, capsys):
    piece, _ = piece_and_file
    out = tmp_path / "missing" / "dir" / "song.txt"
    assert main(["encode", str(piece), "-o", str(out)]) == 0
    assert out.read_text().splitlines()[0].startswith(("VELOCITY", "NOTE_ON", "TIME_SHIFT"))


@pytest.mark.parametrize("argv, flag", [
    (["--tokens", "10000000000"], "--tokens"), (["--num-samples", "100000000"], "--num-samples"),
    (["--seconds", "1e9"], "--seconds"),
])
def test_absurd_lengths_and_counts_fail_in_one_line(tmp_path, capsys, argv, flag):
    line = _one_line_error(capsys, ["sample", "--checkpoint", tmp_path / "missing", *argv])
    assert flag in line
