"""The trained default model ships inside the package and is used when no run exists."""

import json
import math
import shutil
from pathlib import Path

import pretty_midi
import torch
from conftest import make_piece

from musicgpt import checkpoint
from musicgpt.cli import main
from musicgpt.evaluate import evaluate_folder
from musicgpt.model import ModelConfig, MusicGPT
from musicgpt.vocab import NOTE_OFF, NOTE_ON, NUM_PITCHES, TIME_SHIFT, CodecConfig

REAL_PIECE = Path(__file__).parents[1] / "midi_data" / "classical" / "giantmidi-piano" / (
    "Bach_Prelude_and_Fugue_in_A-flat_major_BWV862_gCL5Zvnt0TU_a.mid")


def test_shipped_model_matches_codec_and_gives_finite_logits():
    path = checkpoint.resolve_checkpoint("default")
    assert path == checkpoint.DEFAULT_MODEL_DIR / "model.safetensors"
    assert path.stat().st_size < 50e6
    model, ckpt = checkpoint.load_model("default")
    cc = ckpt.codec_config
    assert cc == CodecConfig()  # the codec it was trained with is today's default
    assert ckpt.model_config.vocab_size == ckpt.controls.vocab_size  # the codec's tokens, FIM sentinels, tags
    info = json.loads(path.with_suffix(".json").read_text())
    assert ModelConfig.from_dict(info["model_config"]) == ckpt.model_config
    # VELOCITY_20, NOTE_ON_60, TIME_SHIFT_250ms, NOTE_OFF_60 after the start-of-piece EOS.
    x = torch.tensor([[cc.eos_id, cc.velocity_offset + 20, NOTE_ON + 60, TIME_SHIFT + 24, NOTE_OFF + 60]])
    with torch.no_grad():
        logits, _ = model(x)
    assert torch.isfinite(logits).all() and logits.shape == (1, 5, ckpt.controls.vocab_size)
    assert logits[0, -1].softmax(-1)[cc.pad_id] < 1e-3  # PAD is never a target, so a trained model shuns it


def test_shipped_model_releases_the_key_it_pressed():
    """After one key goes down and time passes, the trained model expects that key to come up, far
    more than any other key (none of which is down); an untrained model spreads NOTE_OFFs evenly."""
    model, ckpt = checkpoint.load_model("default")
    cc = ckpt.codec_config
    pitches = [36, 55, 60, 64, 72, 84]
    x = torch.tensor([[cc.eos_id, cc.velocity_offset + 20, NOTE_ON + p, TIME_SHIFT + 24] for p in pitches])
    with torch.no_grad():
        probs = model(x)[0][:, -1].softmax(-1)
    for row, p in zip(probs, pitches):
        off = row[NOTE_OFF:NOTE_OFF + NUM_PITCHES]
        others = torch.cat([off[:p], off[p + 1:]])
        assert off[p] > others.max() and off[p] > 20 * others.mean(), p


def test_shipped_model_predicts_real_music_far_better_than_chance(tmp_path):
    """On a real piano piece the shipped model's loss is about half the uniform ln(vocab_size), and an
    untrained model of the same shape scores no better than uniform."""
    folder = tmp_path / "real"
    folder.mkdir()
    shutil.copy(REAL_PIECE, folder / REAL_PIECE.name)
    _, ckpt = checkpoint.load_model("default")
    torch.manual_seed(0)
    untrained = checkpoint.save_checkpoint(tmp_path / "untrained", MusicGPT(ckpt.model_config), ckpt.codec_config,
                                           controls=ckpt.controls)
    trained = evaluate_folder(folder, "default", all_files=True, progress=False)
    fresh = evaluate_folder(folder, untrained, all_files=True, progress=False)
    assert trained.tokens == fresh.tokens > 1000
    uniform = math.log(ckpt.controls.vocab_size)
    assert fresh.nats > 0.9 * uniform  # what an untrained model scores
    assert trained.nats < 0.6 * uniform and trained.nats < fresh.nats - 2.0


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


def test_the_shipped_model_plays_a_style_and_infills(tmp_path, capsys):
    assert main(["sample", "--checkpoint", "default", "--style", "pop", "--tokens", "60", "--seed", "3",
                 "--out", str(tmp_path / "styled")]) == 0
    assert len(list((tmp_path / "styled").glob("*.mid"))) == 1
    piece = make_piece(tmp_path / "piece.mid", seed=5, seconds=12)
    out = tmp_path / "infilled.mid"
    assert main(["infill", str(piece), "--start", "4", "--end", "8", "--checkpoint", "default", "--style", "classical",
                 "--seed", "4", "-o", str(out)]) == 0
    notes = pretty_midi.PrettyMIDI(str(out)).instruments[0].notes
    assert any(4 <= n.start < 8 for n in notes)  # the gap was written
    assert {round(n.start, 2) for n in notes if n.start >= 8} == {  # and what follows it kept
        round(n.start, 2) for n in pretty_midi.PrettyMIDI(str(piece)).instruments[0].notes if n.start >= 8}
