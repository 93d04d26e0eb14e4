"""Dataset pipeline: scanning, caching keyed by content and codec, deterministic split, windows."""


import numpy as np
import pytest
from conftest import make_piece

from musicgpt import data
from musicgpt.errors import MusicGPTError
from musicgpt.vocab import CodecConfig


def test_finds_midi_recursively_in_stable_order(tmp_path):
    """Every file under the folder whose suffix is .mid or .midi in any case, at any depth, and
    nothing else, sorted by path (so a sub-folder's files sit together, after `b.mid` here even
    though `a0.mid` would come first by name)."""
    root = tmp_path / "corpus"
    wanted = ["b.mid", "c.MID", "d.midi", "e.Midi", "sub/a0.mid", "sub/deeper/f.MIDI", "z/a1.mid"]
    for rel in ["z/a1.mid", "sub/deeper/f.MIDI", "e.Midi", "b.mid", "sub/a0.mid", "d.midi", "c.MID"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"MThd")  # finding files does not read them
    for rel in ["notes.txt", "b.mid.bak", "sub/x.midi.txt", "sub/mid", "sub/readme.md"]:
        (root / rel).write_text("not music")
    (root / "folder.mid").mkdir()  # a folder named like a MIDI file is not a file
    (root / "folder.mid" / "inside.mid").write_bytes(b"MThd")
    wanted.insert(4, "folder.mid/inside.mid")
    files = data.find_midi_files(root)
    assert files == [root / rel for rel in wanted]
    assert files == sorted(files)
    assert data.find_midi_files(root) == files  # the same list every time


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(MusicGPTError, match="not a folder"):
        data.find_midi_files(tmp_path / "nope")
    with pytest.raises(MusicGPTError, match="no .mid"):
        data.find_midi_files(tmp_path)


def test_bad_files_are_skipped_with_one_warning(midi_folder, capsys):
    (midi_folder / "empty.mid").write_bytes(b"")
    (midi_folder / "text.mid").write_text("hello, not a MIDI file")
    good = (midi_folder / "piece0.mid").read_bytes()
    (midi_folder / "truncated.mid").write_bytes(good[: len(good) // 2])
    corpus = data.encode_folder(midi_folder, workers=1, progress=False)
    skipped = {p.name for p, _ in corpus.skipped}
    assert {"empty.mid", "text.mid"} <= skipped
    assert len(corpus.pieces) >= 6
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty.mid" in err[0] and "text.mid" in err[0]


def test_cache_hits_and_changed_file_is_reencoded(midi_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = data.encode_folder(midi_folder, cache_dir=cache, workers=1, progress=False)
    assert len(list(cache.glob("*.npy"))) == 6
    calls = []
    real = data.codec.encode
    monkeypatch.setattr(data.codec, "encode", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = data.encode_folder(midi_folder, cache_dir=cache, workers=1, progress=False)
    assert calls == []  # every file came from the cache
    for a, b in zip(first.pieces, again.pieces):
        np.testing.assert_array_equal(a.tokens, b.tokens)
    make_piece(midi_folder / "piece0.mid", seed=99)  # change one file
    data.encode_folder(midi_folder, cache_dir=cache, workers=1, progress=False)
    assert len(calls) == 1
    # A different codec configuration is a different cache entry.
    data.encode_folder(midi_folder, CodecConfig(velocity_bins=16), cache_dir=cache, workers=1, progress=False)
    assert len(calls) == 7


def test_parallel_encoding_matches_serial(midi_folder, tmp_path):
    for i in range(6, 10):
        make_piece(midi_folder / f"extra{i}.mid", seed=i)
    serial = data.encode_folder(midi_folder, use_cache=False, workers=1, progress=False)
    parallel = data.encode_folder(midi_folder, use_cache=False, workers=2, progress=False)
    assert [p.path for p in serial.pieces] == [p.path for p in parallel.pieces]
    for a, b in zip(serial.pieces, parallel.pieces):
        np.testing.assert_array_equal(a.tokens, b.tokens)


def test_split_is_by_file_deterministic_and_stable(midi_folder):
    corpus = data.encode_folder(midi_folder, workers=1, progress=False)
    train, val = data.split_files(corpus.pieces, 0.3)
    assert len(val) == 2 and len(train) == 4
    assert not {p.path for p in train} & {p.path for p in val}
    _, val2 = data.split_files(list(reversed(corpus.pieces)), 0.3)
    assert {p.path for p in val2} == {p.path for p in val}
    # Scripts that need only the file lists split the paths by the same rule, with nothing encoded.
    train_paths, val_paths = data.split_paths([p.path for p in corpus.pieces], 0.3)
    assert val_paths == [p.path for p in val] and train_paths == [p.path for p in train]
