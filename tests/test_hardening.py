"""Hardening: bad and fuzzed MIDI, killed training, tampered checkpoints, out-of-range options.

Single-file commands fail with one line naming the file; folder commands skip bad files, list
them in one warning and keep going; nothing is ever unpickled.
"""

from __future__ import annotations

import atexit
import json
import pickle
import re
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import pretty_midi
import pytest
import torch
from conftest import make_piece, run_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from musicgpt import checkpoint, codec
from musicgpt.cli import main
from musicgpt.errors import CheckpointError, MidiReadError
from musicgpt.plot import read_metrics
from musicgpt.train import TrainConfig, train
from musicgpt.vocab import CodecConfig

# ----------------------------------------------------------------------------- bad MIDI files


def smf(*tracks: bytes, fmt: int = 1, tpq: int = 480) -> bytes:
    """A Standard MIDI File from raw track bodies (end-of-track appended)."""
    out = b"MThd" + (6).to_bytes(4, "big") + bytes([0, fmt]) + len(tracks).to_bytes(2, "big") + tpq.to_bytes(2, "big")
    for body in tracks:
        body += b"\x00\xff\x2f\x00"
        out += b"MTrk" + len(body).to_bytes(4, "big") + body
    return out


def tempo(us: int) -> bytes:
    return b"\x00\xff\x51\x03" + us.to_bytes(3, "big")


def scale(channel: int = 0) -> bytes:
    """Four notes of a quarter (480 ticks) each."""
    on, off = 0x90 | channel, 0x80 | channel
    return b"".join(bytes([0, on, 60 + k, 80]) + b"\x83\x60" + bytes([off, 60 + k, 0]) for k in range(4))


MAX_DELTA = b"\xff\xff\xff\x7f"  # the largest 4-byte delta time: 2**28 - 1 ticks (about 78 hours here)

BAD_MIDI = {  # file name -> (bytes from a good file's bytes, what the error says)
    "empty.mid": (lambda good: b"", "empty file"),
    "truncated.mid": (lambda good: good[: len(good) // 2], "truncated"),
    "not_midi.mid": (lambda good: b"RIFF\x24\x08\x00\x00WAVEfmt \x10\x00\x00\x00", "not a MIDI file"),
    "type2.mid": (lambda good: smf(scale(), scale(), fmt=2), "format 2"),
    "fast_tempo.mid": (lambda good: smf(tempo(1) + scale()), "absurd tempo"),
    "slow_tempo.mid": (lambda good: smf(tempo(0xFFFFFF) + scale()), "absurd tempo"),
    # pretty_midi, which `attention` checks files with, words these two its own way
    "huge_delta.mid": (lambda good: smf(b"\x00\x90\x3c\x40" + b"\xff" * 64 + b"\x00\x80\x3c\x00"),
                       "too large|largest tick"),
    "long_delta.mid": (lambda good: smf(b"\x00\x90\x3c\x40" + MAX_DELTA + b"\x80\x3c\x00"), "hour limit|largest tick"),
    "no_notes.mid": (lambda good: smf(tempo(500000)), "no notes"),
    "drums.mid": (lambda good: smf(scale(channel=9)), "only drums"),
}


@pytest.fixture
def bad_midi(tmp_path) -> dict[str, tuple[Path, str]]:
    good = make_piece(tmp_path / "good.mid", seconds=4).read_bytes()
    folder = tmp_path / "bad"
    folder.mkdir()
    out = {}
    for name, (build, problem) in BAD_MIDI.items():
        (folder / name).write_bytes(build(good))
        out[name] = (folder / name, problem)
    return out


def run_cli(capsys, args) -> tuple[int, str, list[str]]:
    """Exit status, stdout and the stderr lines a terminal keeps (progress bars erase themselves)."""
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip() and not re.search(r"\d+%\|", line)]
    return rc, captured.out, lines


def assert_one_line_error(rc, out, err, *fragments):
    assert rc == 1 and out == ""
    assert len(err) == 1 and err[0].startswith("musicgpt: error: "), err
    for fragment in fragments:
        assert re.search(fragment, err[0]), (fragment, err[0])


@pytest.mark.parametrize("name", BAD_MIDI)
@pytest.mark.parametrize("command", ["encode", "sample", "attention"])
def test_single_file_commands_name_the_bad_file_in_one_line(command, name, bad_midi, tiny_run, tmp_path, capsys):
    path, problem = bad_midi[name]
    out_dir, picture = tmp_path / "samples", tmp_path / "arcs.png"
    args = {
        "encode": ["encode", path],
        "sample": ["sample", "--primer", path, "--checkpoint", tiny_run, "--out", out_dir, "--seconds", 1, "--seed", 0],
        "attention": ["attention", path, "-o", picture, "--checkpoint", tiny_run],
    }[command]
    rc, out, err = run_cli(capsys, args)
    assert_one_line_error(rc, out, err, re.escape(f"musicgpt: error: {path}: "), problem)
    assert not out_dir.exists() and not picture.exists()


def test_folder_commands_skip_bad_files_in_one_warning_and_go_on(bad_midi, tiny_run, tmp_path, capsys):
    folder = bad_midi["empty.mid"][0].parent
    for i in range(3):
        make_piece(folder / f"good{i}.mid", seed=40 + i, seconds=6)

    def warning(err: list[str], count: int = 1) -> str:
        lines = [line for line in err if "musicgpt: warning: skipped" in line]
        assert len(lines) == count, err
        assert f"skipped {len(BAD_MIDI)} bad file(s)" in lines[0]
        assert all(str(path) in lines[0] for path, _ in bad_midi.values())
        return lines[0]

    rc, out, err = run_cli(capsys, ["train", folder, "--out", tmp_path / "run", "--max-steps", 2, "--batch-size", 2,
                                    "--seq-len", 32, "--eval-interval", 2, "--device", "cpu", "--preset", "tiny"])
    assert rc == 0 and (tmp_path / "run" / "last.safetensors").is_file()
    assert "on 2 files" in "\n".join(err) and "validating on 1" in "\n".join(err)
    warning(err)

    rc, out, err = run_cli(capsys, ["eval", folder, "--checkpoint", tiny_run, "--all", "--json"])
    result = json.loads(out)
    assert rc == 0 and result["files"] == 3 and len(result["skipped"]) == len(BAD_MIDI)
    warning(err)

    rc, out, err = run_cli(capsys, ["stats", folder, "--reference", folder])
    assert rc == 0 and "samples (3)" in out and "reference (3)" in out
    warning(err, count=2)


# ----------------------------------------------------------------------------- fuzzing the reader

_FUZZ_DIR = Path(tempfile.mkdtemp(prefix="musicgpt-fuzz-"))
atexit.register(shutil.rmtree, _FUZZ_DIR, True)
_GOOD = make_piece(_FUZZ_DIR / "seed.mid", seed=1, seconds=3).read_bytes()


def read_or_refuse(data: bytes, also_pretty_midi: bool = False) -> None:
    """Reading `data` gives tokens or a one-line MidiReadError naming the file, never anything else."""
    path = _FUZZ_DIR / "fuzz.mid"
    path.write_bytes(data)
    readers = (codec.encode, codec.load_midi) if also_pretty_midi else (codec.encode,)
    for read in readers:
        try:
            result = read(path)
        except MidiReadError as e:
            assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
            continue
        if read is codec.encode:
            assert result.dtype == np.int16 and ((result >= 0) & (result < CodecConfig().pad_id)).all()


_header = st.builds(
    lambda fmt, n, tpq: b"MThd\x00\x00\x00\x06" + bytes([0, fmt]) + n.to_bytes(2, "big") + tpq.to_bytes(2, "big"),
    st.sampled_from([0, 1, 1, 1, 2, 3]), st.integers(0, 3), st.integers(0, 0xFFFF))
_track = st.builds(lambda body, extra: b"MTrk" + (len(body) + extra).to_bytes(4, "big") + body,
                   st.binary(max_size=120), st.sampled_from([0, 0, 0, 1, 1000]))  # some lengths lie


@settings(max_examples=150, deadline=5000)
@given(st.one_of(st.binary(max_size=200),
                 st.builds(lambda h, ts: h + b"".join(ts), _header, st.lists(_track, max_size=3))))
def test_random_bytes_never_raise_anything_but_midi_read_error(data):
    read_or_refuse(data)


@settings(max_examples=100, deadline=5000)
@given(st.lists(st.tuples(st.integers(0, len(_GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, len(_GOOD)), st.binary(max_size=8))
def test_mutated_files_never_raise_anything_but_midi_read_error(edits, cut, inserted):
    data = bytearray(_GOOD)
    for pos, byte in edits:
        data[pos] = byte
    data[cut:cut] = inserted
    read_or_refuse(bytes(data), also_pretty_midi=True)


_notes = st.lists(st.tuples(st.integers(0, 127), st.integers(0, 1500), st.integers(1, 250), st.integers(1, 127)),
                  min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_notes, st.lists(st.tuples(st.integers(35, 81), st.integers(0, 1500)), max_size=5))
def test_encode_decode_round_trip_on_random_notes(notes, drum_hits):
    """Notes on the 10 ms grid that never overlap on one key come back exactly (velocity within its bin)."""
    kept, free_at = [], {}
    for pitch, on, length, velocity in sorted(notes):
        if on >= free_at.get(pitch, 0):
            kept.append((pitch, on, on + length, velocity))
            free_at[pitch] = on + length
    pm = pretty_midi.PrettyMIDI()
    piano, drums = pretty_midi.Instrument(0), pretty_midi.Instrument(0, is_drum=True)
    piano.notes = [pretty_midi.Note(v, p, on * 0.01, off * 0.01) for p, on, off, v in kept]
    drums.notes = [pretty_midi.Note(100, p, t * 0.01, t * 0.01 + 0.1) for p, t in drum_hits]  # ignored
    pm.instruments += [piano, drums]

    tokens = codec.encode(pm)
    assert ((tokens >= 0) & (tokens < CodecConfig().pad_id)).all()
    got = codec.decode_notes(tokens)
    steps = sorted(zip(got.pitch.tolist(), np.rint(got.start * 100).astype(int).tolist(),
                       np.rint(got.end * 100).astype(int).tolist(), got.velocity.tolist()))
    assert [s[:3] for s in steps] == [k[:3] for k in kept]
    assert all(abs(a[3] - b[3]) <= 4 for a, b in zip(steps, kept))  # 32 bins of at most 4 velocities
    assert codec.count_notes(tokens) == len(kept)
    assert codec.duration_seconds(tokens) == pytest.approx(max(k[2] for k in kept) * 0.01)
    np.testing.assert_array_equal(codec.encode(codec.decode(tokens)), tokens)  # tokens are canonical
    path = _FUZZ_DIR / "round.mid"
    pm.write(str(path))  # through a file: tick rounding stays well inside half a step
    np.testing.assert_array_equal(codec.encode(path), tokens)


# ----------------------------------------------------------------------------- killed training

KILL_SCRIPT = """
import contextlib, os, sys, time, torch
torch.set_num_threads(1)
from musicgpt import checkpoint, train as T
real, calls = checkpoint.atomic_write, []

class HalfWriter:  # writes half of what it is given, then hangs: the kill comes mid-write
    def __init__(self, f):
        self.f = f
    def write(self, data):
        self.f.write(data[:len(data) // 2])
        self.f.flush()
        print("WRITING", flush=True)
        time.sleep(300)

@contextlib.contextmanager
def slow_atomic_write(path, mode="wb"):
    with real(path, mode) as f:
        if os.path.basename(str(path)) == "last.safetensors":
            calls.append(path)
            if len(calls) == 2:  # the second `last`: half written when the kill comes, a good one exists
                yield HalfWriter(f)
                return
        yield f

checkpoint.atomic_write = slow_atomic_write
T.train(T.TrainConfig(data_dir=sys.argv[1], out=sys.argv[2], max_steps=8, eval_interval=2, eval_batches=2,
        preset="tiny", batch_size=2, seq_len=32, lr=3e-3, warmup=1, device="cpu"), progress=False)
"""


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_last_good_one(midi_folder, tmp_path):
    run = tmp_path / "runs" / "killed"
    script = tmp_path / "killme.py"
    script.write_text(KILL_SCRIPT)

    def kill_while_writing(line, proc):  # progress lines, then WRITING once the slow write has begun
        if line == "WRITING":
            proc.send_signal(signal.SIGKILL)
        return line == "WRITING"

    returncode, stderr = run_script(script, [midi_folder, run], kill_while_writing)
    assert returncode == -signal.SIGKILL, stderr[-2000:]
    stray = [p for p in run.iterdir() if p.name.startswith(".")]
    assert stray and all(p.name.endswith(".tmp") for p in stray)  # the half-written file, under a temp name
    _, good = checkpoint.load_checkpoint(run / "last.safetensors")  # the previous `last` is intact
    assert good.state["step"] == 2
    assert checkpoint.latest_run(tmp_path / "runs") == run  # temp names never count as checkpoints
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "split": "tra')  # as if killed mid-line too

    resumed = train(TrainConfig(data_dir=str(midi_folder), resume=str(run)), progress=False)
    _, final = checkpoint.load_checkpoint(resumed / "last.safetensors")
    assert final.state["step"] == 8
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # leftovers cleaned
    val_steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "val"]
    assert val_steps[-3:] == [4, 6, 8]  # step 4 from the killed session, then the resumed ones


# ----------------------------------------------------------------------------- tampered checkpoints


def _header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def _flip_in_header(marker: bytes, offset: int):
    def damage(data: bytearray) -> None:
        at = data.index(marker, 8, _header_end(data)) + offset
        data[at] ^= 0x01
    return damage


def _flip_data(where: float):
    def damage(data: bytearray) -> None:
        start = _header_end(data)
        data[start + int((len(data) - start - 1) * where)] ^= 0x01
    return damage


def _cut(keep):
    def damage(data: bytearray) -> None:
        del data[keep(data):]
    return damage


TAMPERING = {
    "header: a dtype": _flip_in_header(b'"dtype":"F32"', 10),
    "header: data offsets": _flip_in_header(b'"data_offsets":[', 17),
    "header: our metadata": _flip_in_header(b'\\"n_layer\\": ', 13),  # n_layer 3 -> 2, still valid JSON
    "data: first byte": _flip_data(0.0),
    "data: middle byte": _flip_data(0.5),
    "data: last byte": _flip_data(1.0),
    "truncated: length field": _cut(lambda d: 6),
    "truncated: inside the header": _cut(lambda d: _header_end(d) // 2),
    "truncated: one byte short": _cut(lambda d: len(d) - 1),
}


@pytest.mark.parametrize("damage", TAMPERING)
def test_tampered_or_truncated_checkpoints_give_a_checkpoint_error(damage, tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    path = run / "last.safetensors"
    data = bytearray(path.read_bytes())
    TAMPERING[damage](data)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_model(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
    rc, out, err = run_cli(capsys, ["eval", tiny_run.parent / "data", "--checkpoint", path])
    assert_one_line_error(rc, out, err, re.escape(str(path)))
    rc, out, err = run_cli(capsys, ["train", tiny_run.parent / "data", "--resume", run, "--max-steps", 8])
    assert_one_line_error(rc, out, err, re.escape(str(path)))


def test_metadata_edited_so_shapes_mismatch_is_refused(tiny_run, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    path = run / "last.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["musicgpt"])
    meta["model_config"]["n_embd"] //= 2  # consistent, well-formed, and wrong for these weights
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={"musicgpt": json.dumps(meta)})
    # The shapes are compared from the header before any tensor is read for the checksum.
    with pytest.raises(CheckpointError, match="do not match the configuration"):
        checkpoint.load_model(path)
    meta["sha256"] = checkpoint.content_digest(tensors, meta)  # as if saved that way
    save_file(tensors, str(path), metadata={"musicgpt": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="do not match"):
        checkpoint.load_model(path)
    rc, out, err = run_cli(capsys, ["train", tiny_run.parent / "data", "--resume", run, "--max-steps", 8])
    assert_one_line_error(rc, out, err, re.escape(str(path)), "do not match the configuration")


def test_only_safetensors_are_loaded_and_nothing_is_unpickled(tiny_run, tmp_path, monkeypatch, capsys):
    torch.save({"model.x": torch.zeros(2)}, tmp_path / "model.pt")
    (tmp_path / "pickles").mkdir()
    torch.save({}, tmp_path / "pickles" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        checkpoint.load_model(tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="no checkpoint in this folder"):
        checkpoint.load_model(tmp_path / "pickles")

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    checkpoint.load_model(run)
    data = tiny_run.parent / "data"
    assert run_cli(capsys, ["eval", data, "--checkpoint", run])[0] == 0
    sample = ["sample", "--checkpoint", run, "--seconds", 1, "--seed", 0, "--out", tmp_path / "s"]
    assert run_cli(capsys, sample)[0] == 0
    assert run_cli(capsys, ["train", data, "--resume", run, "--max-steps", 8])[0] == 0
    assert checkpoint.load_checkpoint(run / "last.safetensors")[1].state["step"] == 8


# ----------------------------------------------------------------------------- options out of range

BAD_OPTIONS = [
    # train
    (["train", "{data}", "--max-steps", "0"], "--max-steps"),
    (["train", "{data}", "--batch-size", "-1"], "--batch-size"),
    (["train", "{data}", "--seq-len", "0"], "--seq-len"),
    (["train", "{data}", "--grad-accum", "0"], "--grad-accum"),
    (["train", "{data}", "--eval-interval", "0"], "--eval-interval"),
    (["train", "{data}", "--lr", "0"], "--lr"),
    (["train", "{data}", "--lr", "nan"], "--lr"),
    (["train", "{data}", "--warmup", "-5"], "--warmup"),
    (["train", "{data}", "--val-fraction", "1"], "--val-fraction"),
    (["train", "{data}", "--stop-at", "-1"], "--stop-at"),
    (["train", "{data}", "--dropout", "1.5"], "--dropout"),
    (["train", "{data}", "--attn-dropout", "1.5"], "--attn-dropout"),
    (["train", "{data}", "--attn-impl", "fastest"], "--attn-impl"),
    (["train", "{data}", "--preset", "huge"], "--preset"),
    (["train", "{data}", "--device", "tpu"], "--device"),
    (["train", "{missing}"], "not a folder"),
    (["train", "{data}", "--resume", "{missing}"], "not found"),
    (["train", "{data}", "--init", "{missing}"], "not found"),
    # sample
    (["sample", "--checkpoint", "{ckpt}", "--temperature", "0"], "--temperature"),
    (["sample", "--checkpoint", "{ckpt}", "--top-p", "1.5"], "--top-p"),
    (["sample", "--checkpoint", "{ckpt}", "--top-k", "-1"], "--top-k"),
    (["sample", "--checkpoint", "{ckpt}", "--min-p", "1"], "--min-p"),
    (["sample", "--checkpoint", "{ckpt}", "--typical-p", "0"], "--typical-p"),
    (["sample", "--checkpoint", "{ckpt}", "--repetition-penalty", "0"], "--repetition-penalty"),
    (["sample", "--checkpoint", "{ckpt}", "--beams", "0"], "--beams"),
    (["sample", "--checkpoint", "{ckpt}", "--num-samples", "0"], "--num-samples"),
    (["sample", "--checkpoint", "{ckpt}", "--tokens", "0"], "--tokens"),
    (["sample", "--checkpoint", "{ckpt}", "--seconds", "-1"], "--seconds"),
    (["sample", "--checkpoint", "{ckpt}", "--seed", "-1"], "--seed"),
    (["sample", "--checkpoint", "{ckpt}", "--primer-seconds", "2"], "--primer-seconds"),
    (["sample", "--checkpoint", "{ckpt}", "--greedy", "--beams", "2"], "--greedy"),
    (["sample", "--checkpoint", "{ckpt}", "--device", "tpu"], "--device"),
    (["sample", "--checkpoint", "{missing}"], "not found"),
    (["sample", "--checkpoint", "{ckpt}", "--primer", "{missing}"], "not found"),
    # eval
    (["eval", "{data}", "--checkpoint", "{ckpt}", "--val-fraction", "1"], "--val-fraction"),
    (["eval", "{data}", "--checkpoint", "{ckpt}", "--val-fraction", "-0.5"], "--val-fraction"),
    (["eval", "{data}", "--checkpoint", "{ckpt}", "--seq-len", "0"], "--seq-len"),
    (["eval", "{data}", "--checkpoint", "{ckpt}", "--batch-size", "0"], "--batch-size"),
    (["eval", "{data}", "--checkpoint", "{ckpt}", "--device", "tpu"], "--device"),
    (["eval", "{missing}", "--checkpoint", "{ckpt}"], "not a folder"),
    (["eval", "{data}", "--checkpoint", "{missing}"], "not found"),
    # stats
    (["stats", "{data}", "--reference", "{data}", "-o", "stats.txt"], ".png or .svg"),
    (["stats", "{missing}", "--reference", "{data}"], "no such file"),
    (["stats", "{data}", "--reference", "{missing}"], "no such file"),
    (["stats", "{data}", "--reference", "{empty}"], "no .mid"),
    # attention
    (["attention", "{midi}", "-o", "arcs.jpg", "--checkpoint", "{ckpt}"], ".png, .svg or .html"),
    (["attention", "{midi}", "-o", "arcs.png", "--checkpoint", "{ckpt}", "--top-k", "0"], "--top-k"),
    (["attention", "{midi}", "-o", "arcs.png", "--checkpoint", "{ckpt}", "--threshold", "2"], "--threshold"),
    (["attention", "{midi}", "-o", "arcs.png", "--checkpoint", "{ckpt}", "--max-tokens", "1"], "--max-tokens"),
    (["attention", "{midi}", "-o", "arcs.png", "--checkpoint", "{ckpt}", "--layer", "99"], "--layer"),
    (["attention", "{midi}", "-o", "arcs.png", "--checkpoint", "{ckpt}", "--heads", "x"], "--heads"),
    (["attention", "{midi}", "-o", "arcs.png", "--checkpoint", "{ckpt}", "--heads", "99"], "--heads"),
    (["attention", "{midi}", "-o", "arcs.png", "--checkpoint", "{ckpt}", "--query-note", "9999"], "--query-note"),
    (["attention", "{midi}", "-o", "arcs.html", "--checkpoint", "{ckpt}", "--grid"], "--grid"),
    (["attention", "{missing}", "-o", "arcs.png", "--checkpoint", "{ckpt}"], "not found"),
]


@pytest.mark.parametrize("args, fragment", BAD_OPTIONS, ids=[" ".join(a[:1] + a[2:]) for a, _ in BAD_OPTIONS])
def test_options_out_of_range_fail_in_one_line_and_create_nothing(args, fragment, tiny_run, tmp_path, monkeypatch,
                                                                  capsys):
    data = tiny_run.parent / "data"
    (tmp_path / "empty").mkdir()
    places = {"data": data, "ckpt": tiny_run, "midi": next(data.glob("*.mid")), "missing": tmp_path / "missing",
              "empty": tmp_path / "empty"}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # default outputs (runs/, samples/) would land here
    before = {p: p.stat().st_mtime_ns for p in tiny_run.iterdir()}
    rc, out, err = run_cli(capsys, [a.format(**places) for a in args])
    assert_one_line_error(rc, out, err, fragment)
    assert list(cwd.iterdir()) == [] and not (tmp_path / "missing").exists()
    assert {p: p.stat().st_mtime_ns for p in tiny_run.iterdir()} == before
