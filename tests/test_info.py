"""`musicgpt info`, and a small model that learns to follow its style tags."""

import json

import numpy as np
import pretty_midi
import pytest

from musicgpt.cli import main
from musicgpt.train import TrainConfig, train


def register_piece(path, low: int, seed: int):
    """Twenty seconds of notes in one octave from `low`: a style a tiny model can tell apart."""
    rng = np.random.default_rng(seed)
    pm = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(0)
    for i in range(80):
        start = i * 0.25
        piano.notes.append(pretty_midi.Note(80, low + int(rng.integers(0, 12)), start, start + 0.2))
    pm.instruments.append(piano)
    path.parent.mkdir(parents=True, exist_ok=True)
    pm.write(str(path))


@pytest.fixture(scope="module")
def tagged_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tagged")
    for k in range(2):
        register_piece(root / "data" / "low" / f"low{k}.mid", 36, k)
        register_piece(root / "data" / "high" / f"high{k}.mid", 84, 10 + k)
    return train(TrainConfig(data_dir=str(root / "data"), out=str(root / "run"), preset="tiny", max_steps=120,
                             batch_size=8, seq_len=64, lr=3e-3, warmup=10, eval_interval=120, eval_batches=1,
                             device="cpu", threads=1, tag_dropout=0.0, fim_rate=0.0, val_fraction=0.0),
                 progress=False)


def test_a_small_model_follows_its_style_tag(tagged_run, tmp_path, capsys):
    means = {}
    for style in ("low", "high"):
        assert main(["sample", "--checkpoint", str(tagged_run), "--style", style, "--seconds", "6", "--seed", "1",
                     "--num-samples", "2", "--out", str(tmp_path / style)]) == 0
        paths = capsys.readouterr().out.split()
        pitches = [n.pitch for p in paths for n in pretty_midi.PrettyMIDI(p).instruments[0].notes]
        assert pitches and all(style in p for p in paths)
        means[style] = np.mean(pitches)
    assert means["low"] < 55 < 75 < means["high"], means


def test_info_lists_the_tags_and_training(tagged_run, capsys):
    assert main(["info", str(tagged_run)]) == 0
    out = capsys.readouterr().out
    assert "styles       high, low" in out and "infilling    no" in out and "step 120 of 120" in out
    assert main(["info", str(tagged_run), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["tags"] == ["high", "low"] and d["model"]["vocab_size"] == 390 + 2
    assert d["training"]["best_val_nats"] > 0


def test_an_unknown_style_is_one_line_listing_the_tags(tagged_run, tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(tagged_run), "--style", "jazz", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown style 'jazz'; this model's tags are high, low" in err
