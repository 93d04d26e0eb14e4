"""Hostile files in a data folder: each is skipped with a reason (or read correctly) within seconds.

Covered: a file whose encoding overruns the time budget or crashes its worker, files too large
to read, FIFOs, devices and link loops named *.mid, undecodable file names, damaged cache entries,
and all of them at once in a training folder.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import make_piece

from musicgpt import codec, data, stats
from musicgpt.train import TrainConfig, train
from musicgpt.vocab import CodecConfig

LIMIT_S = 10.0  # every hostile case must end within this
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file names and special files")


def hang_or_crash(path: Path, config: CodecConfig) -> np.ndarray:
    """`codec.encode`, except that it hangs on files named slow* and kills its process on crash*."""
    if path.name.startswith("slow"):
        time.sleep(3 * LIMIT_S)  # long enough to fail the time check, short enough not to stall the suite
    if path.name.startswith("crash"):
        os._exit(3)
    return codec.encode(path, config)


def undecodable(folder: Path, name: bytes) -> Path:
    """A path in `folder` whose name holds bytes that are not UTF-8 (skips where the file system refuses)."""
    path = Path(os.fsdecode(os.fsencode(folder) + b"/" + name))
    try:
        path.write_bytes(b"")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system does not take non-UTF-8 file names")
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    """Three good pieces."""
    for i in range(3):
        make_piece(tmp_path / "midi" / f"good{i}.mid", seed=i, seconds=4)
    return tmp_path / "midi"


def test_a_file_that_overruns_the_time_budget_is_skipped_and_not_cached(folder, tmp_path):
    for name in ("slow0.mid", "slow1.mid"):  # both workers hang first, so both must be replaced
        make_piece(folder / name, seed=7, seconds=4)
    cache = tmp_path / "cache"
    start = time.monotonic()
    corpus = data.encode_files(data.find_midi_files(folder), cache_dir=cache, workers=2, progress=False,
                               max_seconds=1, encoder=hang_or_crash)
    assert time.monotonic() - start < LIMIT_S
    assert {p.path.name for p in corpus.pieces} == {"good0.mid", "good1.mid", "good2.mid"}
    assert [(p.name, why) for p, why in corpus.skipped] == [(n, "took longer than 1 s to encode")
                                                           for n in ("slow0.mid", "slow1.mid")]
    assert not list(cache.glob("*.err"))  # a faster machine might manage: the timeout is not remembered
    again = data.encode_files(data.find_midi_files(folder), cache_dir=cache, workers=2, progress=False)
    assert len(again.pieces) == 5 and not again.skipped


def test_a_worker_that_dies_is_replaced_and_its_file_named(folder):
    make_piece(folder / "crash.mid", seed=7, seconds=4)
    corpus = data.encode_files(data.find_midi_files(folder), use_cache=False, workers=2, progress=False,
                               encoder=hang_or_crash)
    assert [(p.name, why) for p, why in corpus.skipped] == [("crash.mid", "crashed the encoder (exit code 3)")]
    assert len(corpus.pieces) == 3


def test_a_file_over_the_size_limit_is_never_read(folder, capsys):
    huge = folder / "huge.mid"
    with open(huge, "wb") as f:
        f.truncate(64 * 2**30)  # sparse: 64 GB claimed, nothing written
    tracemalloc.start()
    start = time.monotonic()
    corpus = data.encode_folder(folder, progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.monotonic() - start < LIMIT_S and peak < 2**28
    assert [(p.name, why) for p, why in corpus.skipped] == [("huge.mid", "larger than 16 MB")]
    assert f"{huge}: larger than 16 MB" in capsys.readouterr().err


def test_without_a_cache_an_oversized_file_is_refused_before_it_is_read(folder, monkeypatch):
    with open(folder / "big.mid", "wb") as f:
        f.truncate(2 * 2**20)
    seen = []
    real = codec.encode
    monkeypatch.setattr(codec, "encode", lambda path, config: seen.append(path.name) or real(path, config))
    corpus = data.encode_folder(folder, use_cache=False, workers=1, progress=False, max_bytes=2**20)
    assert [(p.name, why) for p, why in corpus.skipped] == [("big.mid", "larger than 1 MB")]
    assert sorted(seen) == ["good0.mid", "good1.mid", "good2.mid"]


class Unblocker(threading.Thread):
    """After LIMIT_S, keeps opening a FIFO's writing end, so that a reader stuck opening it returns and
    the test fails instead of hanging; `stop()` it once the code under test has returned."""

    def __init__(self, fifo: Path):
        super().__init__(daemon=True)
        self.fifo, self.stopped = fifo, threading.Event()
        self.start()

    def run(self) -> None:
        self.stopped.wait(LIMIT_S)
        while not self.stopped.wait(0.1):
            try:
                os.close(os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass  # nobody is reading it now

    def stop(self) -> None:
        self.stopped.set()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("workers", [1, None])
def test_fifos_devices_and_link_loops_named_mid_are_skipped_unopened(folder, workers):
    os.mkfifo(folder / "x.mid")
    os.symlink(os.devnull, folder / "null.mid")
    os.symlink("loop_b.mid", folder / "loop_a.mid")
    os.symlink("loop_a.mid", folder / "loop_b.mid")
    os.symlink("..", folder / "up")  # a folder loop: the walk must not follow it
    (folder / "dir.mid").mkdir()
    unblocker = Unblocker(folder / "x.mid")
    start = time.monotonic()
    corpus = data.encode_folder(folder, workers=workers, progress=False)
    unblocker.stop()
    assert time.monotonic() - start < LIMIT_S
    why = {p.name: why for p, why in corpus.skipped}
    assert why.pop("x.mid") == "not a regular file (a FIFO)"
    assert why.pop("null.mid") == "not a regular file (a character device)"
    assert why.pop("loop_a.mid").startswith("cannot read (") and why.pop("loop_b.mid").startswith("cannot read (")
    assert why == {} and len(corpus.pieces) == 3


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_stats_skips_a_fifo_unopened(folder, capsys):
    os.mkfifo(folder / "x.mid")
    unblocker = Unblocker(folder / "x.mid")
    result = stats.collect(stats.list_midi(folder), progress=False)
    unblocker.stop()
    assert len(result.files) == 3 and result.skipped == [f"{folder / 'x.mid'}: not a regular file (a FIFO)"]


def test_undecodable_file_names_are_split_and_printed(folder, capsys):
    good = undecodable(folder, b"caf\xe9.mid")  # Latin-1, not UTF-8
    make_piece(good, seed=5, seconds=4)
    undecodable(folder, b"bad\xff.mid")  # empty: listed in the warning
    corpus = data.encode_folder(folder, workers=1, progress=False)
    assert good in [p.path for p in corpus.pieces]
    train_pieces, val = data.split_files(corpus.pieces, 0.5)
    assert len(train_pieces) + len(val) == 4
    err = capsys.readouterr().err  # capsys writes strict UTF-8: a raw surrogate would raise
    assert "bad\\xff.mid: " in err
    result = stats.collect(stats.list_midi(folder), progress=False)
    assert len(result.files) == 4 and "bad\\xff.mid" in capsys.readouterr().err


def test_the_split_of_utf8_names_is_unchanged():
    names = ["a.mid", "Étude Op. 10 No. 3.mid", "月光.midi", "b c.MID", "z.mid", "chopin_ballade.mid", "x" * 200]
    pieces = [data.Piece(Path("/data") / n, np.zeros(1, np.int16)) for n in names]
    for fraction in (0.1, 0.3, 0.5):
        _, val = data.split_files(pieces, fraction)
        # The split as it was before file names were hashed as bytes: a hash of the UTF-8 name.
        before = sorted(pieces, key=lambda p: hashlib.sha1(p.path.name.encode()).hexdigest())
        assert {p.path for p in val} == {p.path for p in before[:len(val)]}
        assert len(val) == max(1, round(len(names) * fraction))


def damage(entry: Path, how: str) -> None:
    """Replace a cached token array with a valid .npy (or not) holding the wrong thing."""
    header = {"descr": "<i2", "fortran_order": False, "shape": (10**12,)}
    arrays = {"ids past the vocabulary": np.array([60, 5000], np.int16), "negative ids": np.array([-3], np.int16),
              "PAD and EOS": np.array([60, 388, 389], np.int16), "floats": np.array([1.5, 2.0]),
              "a 0-d array": np.array(7, np.int16), "a 2-d array": np.zeros((3, 3), np.int16),
              "int32": np.array([60, 61], np.int32)}
    if how in arrays:
        np.save(entry, arrays[how])
    elif how == "objects":
        np.save(entry, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif how in ("a header claiming 10^12 elements", "a truncated array"):
        if how == "a truncated array":
            header["shape"] = (1000,)
        with open(entry, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            f.write(b"\x00" * 64)
    elif how == "garbage":
        entry.write_bytes(b"\x93NUMPY\x01\x00garbage")
    else:
        entry.unlink()
        os.mkfifo(entry)


DAMAGE = ["ids past the vocabulary", "negative ids", "PAD and EOS", "floats", "a 0-d array", "a 2-d array",
          "int32", "objects", "a header claiming 10^12 elements", "a truncated array", "garbage", "a FIFO"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_cache_entry_is_reencoded_and_rewritten(how, tmp_path):
    if how == "a FIFO" and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    piece = make_piece(tmp_path / "p.mid", seed=3, seconds=4)
    cache = tmp_path / "cache"
    expected = data.encode_files([piece], cache_dir=cache, workers=1, progress=False).pieces[0].tokens
    [entry] = cache.glob("*.npy")
    damage(entry, how)
    unblocker = Unblocker(entry) if how == "a FIFO" else None
    tracemalloc.start()
    start = time.monotonic()
    corpus = data.encode_files([piece], cache_dir=cache, workers=1, progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    if unblocker:
        unblocker.stop()
    assert time.monotonic() - start < LIMIT_S and peak < 2**28
    np.testing.assert_array_equal(corpus.pieces[0].tokens, expected)
    np.testing.assert_array_equal(np.load(entry), expected)  # the entry was written afresh


def test_train_on_a_hostile_folder_uses_the_good_files_and_names_the_bad(folder, tmp_path, monkeypatch, capsys):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    monkeypatch.setenv("MUSICGPT_CACHE", str(tmp_path / "cache"))
    data.encode_folder(folder, workers=1, progress=False)  # fill the cache, then damage an entry
    damage(sorted((tmp_path / "cache").glob("*.npy"))[0], "ids past the vocabulary")
    os.mkfifo(folder / "x.mid")
    make_piece(undecodable(folder, b"caf\xe9.mid"), seed=5, seconds=4)
    undecodable(folder, b"bad\xff.mid")
    make_piece(folder / "slow.mid", seed=6, seconds=4)
    monkeypatch.setattr(data, "encode_files", functools.partial(data.encode_files, max_seconds=1,
                                                                encoder=hang_or_crash))
    unblocker = Unblocker(folder / "x.mid")
    start = time.monotonic()
    run = train(TrainConfig(data_dir=str(folder), max_steps=2, preset="tiny", batch_size=2, seq_len=32,
                            eval_interval=1, eval_batches=1, out=str(tmp_path / "run"), device="cpu"), progress=False)
    unblocker.stop()
    assert time.monotonic() - start < 6 * LIMIT_S  # two tiny steps; the encoding is bounded above
    assert (run / "last.safetensors").is_file()
    err = capsys.readouterr().err
    [warning] = [line for line in err.splitlines() if "musicgpt: warning: skipped" in line]
    assert "skipped 3 bad file(s)" in warning
    for name, why in (("x.mid", "not a regular file (a FIFO)"), ("bad\\xff.mid", "empty"),
                      ("slow.mid", "took longer than 1 s to encode")):
        assert f"{name}: " in warning and why in warning, (name, warning)
    assert "on 3 files" in err and "validating on 1" in err  # good0..2 and caf\xe9.mid


def test_eval_on_a_folder_with_an_undecodable_name(tiny_run, tmp_path):
    from musicgpt.evaluate import evaluate_folder

    for i in range(3):
        make_piece(tmp_path / f"p{i}.mid", seed=20 + i, seconds=4)
    make_piece(undecodable(tmp_path, b"caf\xe9.mid"), seed=24, seconds=4)
    r = evaluate_folder(tmp_path, tiny_run / "last.safetensors", seq_len=32, progress=False, val_fraction=0.5)
    assert r.corpus_files == 4 and r.files == 2 and np.isfinite(r.nats)
