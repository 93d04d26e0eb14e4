"""`musicgpt eval`: held-out loss on training's validation split, in nats, bits and perplexity."""

import json
import math
import shutil

import pytest
import torch

from musicgpt import checkpoint, data
from musicgpt.cli import main
from musicgpt.evaluate import evaluate_folder
from musicgpt.keyboard import Keyboard, key_table


def _val_losses(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "val"}


def test_matches_the_validation_loss_training_reported(tiny_run):
    # Same files (split by name), same windows (64 tokens, all of them fit the training subset),
    # same loss loop: the figure training logged for the chosen checkpoint comes back.
    r = evaluate_folder(tiny_run.parent / "data", tiny_run, seq_len=64, progress=False)
    assert r.split == "validation" and r.files == 1 and r.corpus_files == 4
    assert r.step in _val_losses(tiny_run)
    assert r.nats == pytest.approx(_val_losses(tiny_run)[r.step], rel=1e-5)
    assert r.bits == pytest.approx(r.nats / math.log(2)) and r.perplexity == pytest.approx(math.exp(r.nats))


def test_all_scores_every_token_once_in_context_length_windows(tiny_run):
    r = evaluate_folder(tiny_run.parent / "data", tiny_run, all_files=True, progress=False)
    model, ckpt = checkpoint.load_model(tiny_run)
    pieces = data.encode_folder(tiny_run.parent / "data", progress=False).pieces
    assert r.split == "all" and r.files == 4 and r.seq_len == model.config.context_len
    # Each piece is EOS + tokens + EOS: every token after the first EOS is a target exactly once.
    assert r.tokens == sum(len(p.tokens) + 1 for p in pieces)
    assert r.windows == sum(math.ceil((len(p.tokens) + 1) / r.seq_len) for p in pieces)
    # Independent check: each piece cut into consecutive chunks of seq_len targets, no padding,
    # each read with the notes still sounding from the chunks before it, followed key by key.
    assert model.keyboard is not None
    total, L = 0.0, r.seq_len
    with torch.no_grad():
        for p in pieces:
            framed = torch.tensor([ckpt.codec_config.eos_id, *p.tokens.tolist(), ckpt.codec_config.eos_id])
            keyboard = Keyboard(key_table(ckpt.controls))
            for start in range(0, len(framed) - 1, L):
                y = framed[start + 1:start + 1 + L]
                sounding = torch.from_numpy(keyboard.sounding())
                logits, _ = model(framed[None, start:start + len(y)], sounding=sounding)
                keyboard.play_sequence(framed[start:start + L].numpy())
                total += float(torch.nn.functional.cross_entropy(logits[0], y, reduction="sum"))
    assert r.nats == pytest.approx(total / r.tokens, rel=1e-5)


def test_cli_text_and_json(tiny_run, capsys):
    folder = str(tiny_run.parent / "data")
    assert main(["eval", folder, "--checkpoint", str(tiny_run), "--seq-len", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["split"] == "validation" and out["seq_len"] == 64 and out["windows"] >= 1
    assert out["bits"] == pytest.approx(out["nats"] / math.log(2))
    assert out["perplexity"] == pytest.approx(math.exp(out["nats"]))
    assert main(["eval", folder, "--checkpoint", str(tiny_run), "--seq-len", "64"]) == 0
    text = capsys.readouterr().out
    assert f"{out['nats']:.4f} nats/token" in text and f"{out['bits']:.4f} bits/token" in text
    assert "perplexity" in text and "validation split" in text


def test_without_checkpoint_the_newest_run_is_used(tiny_run, tmp_path, monkeypatch, capsys):
    shutil.copytree(tiny_run, tmp_path / "runs" / "mine")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(tiny_run.parent / "data"), "--all", "--json"]) == 0
    captured = capsys.readouterr()
    best = tmp_path.joinpath("runs", "mine", "best.safetensors").relative_to(tmp_path)
    assert json.loads(captured.out)["checkpoint"] == str(best)
    assert "newest run" in captured.err


def test_a_new_folder_needs_all_and_a_one_file_folder_is_scored_whole(tiny_run, tmp_path):
    from conftest import make_piece

    make_piece(tmp_path / "one" / "x.mid", seed=9)
    r = evaluate_folder(tmp_path / "one", tiny_run, progress=False)
    assert r.files == 1 and r.split == "all"  # as in training: nothing can be held out of one file


def test_absolute_model_windows_cannot_exceed_its_context(tmp_path, midi_folder):
    from musicgpt.errors import MusicGPTError
    from musicgpt.model import MusicGPT, preset
    from musicgpt.vocab import CodecConfig

    model = MusicGPT(preset("tiny", attention="absolute", context_len=32, n_layer=1))
    checkpoint.save_checkpoint(tmp_path / "abs" / "best", model, CodecConfig())
    with pytest.raises(MusicGPTError, match="--seq-len 64 exceeds"):
        evaluate_folder(midi_folder, tmp_path / "abs", seq_len=64, progress=False)
    assert evaluate_folder(midi_folder, tmp_path / "abs", progress=False).seq_len == 32
