"""The trained default model ships inside the package and is used when no run exists."""

import json

import pretty_midi
import torch

from conftest import make_piece
from musicgpt import checkpoint
from musicgpt.cli import main
from musicgpt.model import ModelConfig
from musicgpt.vocab import CodecConfig


def test_shipped_model_matches_codec_and_gives_finite_logits():
    path = checkpoint.resolve_checkpoint("default")
    assert path == checkpoint.DEFAULT_MODEL_DIR / "model.safetensors"
    assert path.stat().st_size < 50e6
    model, ckpt = checkpoint.load_model("default")
    assert ckpt.codec_config == CodecConfig()  # the codec it was trained with is today's default
    assert ckpt.model_config.vocab_size == ckpt.codec_config.vocab_size
    info = json.loads(path.with_suffix(".json").read_text())
    assert ModelConfig.from_dict(info["model_config"]) == ckpt.model_config
    assert ckpt.model_config.attention_dropout == ckpt.model_config.dropout  # saved before attn_dropout
    x = torch.tensor([[ckpt.codec_config.eos_id, 356 + 20, 60, 280, 188]])
    with torch.no_grad():
        logits, _ = model(x)
    assert torch.isfinite(logits).all() and logits.shape == (1, 5, ckpt.codec_config.vocab_size)
    # Trained, not random: after a NOTE_ON the model expects some time to pass or more notes,
    # and it never puts real mass on PAD.
    probs = logits[0, -1].softmax(-1)
    assert probs[ckpt.codec_config.pad_id] < 1e-3


def test_sample_without_runs_uses_the_default_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/ here
    primer = make_piece(tmp_path / "song.mid", seed=3, seconds=6)
    assert main(["sample", "--primer", str(primer), "--seconds", "20", "--seed", "1", "--out", "out"]) == 0
    captured = capsys.readouterr()
    assert "default model" in captured.err
    files = [line for line in captured.out.splitlines() if line.endswith(".mid")]
    assert len(files) == 1
    notes = [n for i in pretty_midi.PrettyMIDI(files[0]).instruments for n in i.notes]
    assert len(notes) > 5


def test_checkpoint_default_is_explicitly_accepted(tmp_path, capsys):
    assert main(["sample", "--checkpoint", "default", "--tokens", "40", "--seed", "2", "--out", str(tmp_path)]) == 0
    assert list(tmp_path.glob("*.mid"))
