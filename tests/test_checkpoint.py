"""Checkpoints: safetensors + JSON, atomic, tied weights, clear errors, nothing unpickled."""

import json

import pytest
import torch

from musicgpt import checkpoint
from musicgpt.errors import CheckpointError
from musicgpt.model import MusicGPT, preset
from musicgpt.vocab import CodecConfig


def _model():
    torch.manual_seed(0)
    return MusicGPT(preset("tiny", n_layer=2, n_embd=32, n_head=2, mlp_dim=64, context_len=64, max_rel_dist=64))


def test_round_trip_restores_identical_logits(tmp_path):
    model = _model().eval()
    path = checkpoint.save_checkpoint(tmp_path / "best", model, CodecConfig(), state={"step": 7})
    assert path.name == "best.safetensors" and (tmp_path / "best.json").is_file()
    info = json.loads((tmp_path / "best.json").read_text())
    assert info["state"]["step"] == 7 and info["model_config"]["n_layer"] == 2
    loaded, ckpt = checkpoint.load_model(tmp_path)
    x = torch.randint(0, 388, (2, 20))
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)
    assert ckpt.state["step"] == 7
    for (name, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


def test_run_folder_prefers_best_and_json_path_works(tmp_path):
    model = _model()
    checkpoint.save_checkpoint(tmp_path / "last", model, CodecConfig(), state={"step": 2})
    assert checkpoint.resolve_checkpoint(tmp_path).name == "last.safetensors"
    checkpoint.save_checkpoint(tmp_path / "best", model, CodecConfig(), state={"step": 1})
    assert checkpoint.resolve_checkpoint(tmp_path).name == "best.safetensors"
    assert checkpoint.resolve_checkpoint(tmp_path / "last.json").name == "last.safetensors"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing", "pickle"])
def test_damaged_checkpoints_give_clear_errors(tmp_path, damage):
    path = checkpoint.save_checkpoint(tmp_path / "last", _model(), CodecConfig())
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 100)
    elif damage == "missing":
        path.unlink()
    else:  # a torch pickle renamed to .safetensors must not be unpickled
        torch.save({"x": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=str(path.name)):
        checkpoint.load_model(path)


def test_plain_safetensors_without_our_metadata_is_rejected(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a musicgpt checkpoint"):
        checkpoint.load_model(tmp_path / "other.safetensors")


def test_latest_run_picks_newest(tmp_path):
    import os
    import time

    assert checkpoint.latest_run(tmp_path / "runs") is None
    for i, name in enumerate(["a", "b"]):
        p = checkpoint.save_checkpoint(tmp_path / "runs" / name / "last", _model(), CodecConfig())
        os.utime(p, (time.time() + i, time.time() + i))
    assert checkpoint.latest_run(tmp_path / "runs").name == "b"


def test_half_precision_weights_load_as_float(tmp_path):
    model = _model().eval()
    path = checkpoint.save_checkpoint(tmp_path / "model", model, CodecConfig(), half=True)
    loaded, _ = checkpoint.load_model(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.randint(0, 388, (1, 16))
    torch.testing.assert_close(loaded(x)[0], model(x)[0], atol=5e-2, rtol=0)


def test_configs_can_be_peeked_from_the_header_alone(tmp_path):
    from safetensors.torch import save_file

    model, codec_config = _model(), CodecConfig(step_ms=8, velocity_bins=64)
    path = checkpoint.save_checkpoint(tmp_path / "best", model, codec_config)
    assert checkpoint.peek_codec_config(path) == codec_config
    assert checkpoint.peek_model_config(path) == model.config
    save_file({"w": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    for bad in ("other.safetensors", "junk.safetensors", "missing.safetensors"):
        assert checkpoint.peek_codec_config(tmp_path / bad) is None
        assert checkpoint.peek_model_config(tmp_path / bad) is None
