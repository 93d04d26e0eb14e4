"""`musicgpt train` end to end, exact resume, interruption safety, divergence, distributed."""

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from musicgpt import checkpoint
from musicgpt.cli import main
from musicgpt.errors import MusicGPTError
from musicgpt.train import TrainConfig, lr_at, resolve, train

SMALL = dict(preset="tiny", batch_size=2, seq_len=32, lr=3e-3, warmup=2, device="cpu", eval_interval=5, eval_batches=2)


def test_cli_train_end_to_end(midi_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(midi_folder), "--out", str(run), "--max-steps", "6", "--batch-size", "2",
                 "--seq-len", "32", "--eval-interval", "3", "--device", "cpu"]) == 0
    for name in ("last.safetensors", "last.json", "best.safetensors", "best.json", "metrics.jsonl", "loss.png"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in val] == [3, 6]
    assert all(math.isclose(r["bits"], r["loss"] / math.log(2)) for r in val)
    model, ckpt = checkpoint.load_model(run)
    assert ckpt.state["step"] in (3, 6) and ckpt.model_config.attention == "relative"


def test_resume_continues_exactly(midi_folder, tmp_path):
    whole = train(TrainConfig(data_dir=str(midi_folder), out=str(tmp_path / "a"), max_steps=10, **SMALL), progress=False)
    train(TrainConfig(data_dir=str(midi_folder), out=str(tmp_path / "b"), max_steps=10, stop_at=5, **SMALL), progress=False)
    resumed = train(TrainConfig(data_dir=str(midi_folder), resume=str(tmp_path / "b")), progress=False)
    a, ca = checkpoint.load_checkpoint(whole / "last.safetensors")
    b, cb = checkpoint.load_checkpoint(resumed / "last.safetensors")
    assert ca.state["step"] == cb.state["step"] == 10
    for k in a:
        if k.startswith(("model.", "optim.")):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    va = [json.loads(l) for l in (whole / "metrics.jsonl").read_text().splitlines() if '"val"' in l][-1]
    vb = [json.loads(l) for l in (resumed / "metrics.jsonl").read_text().splitlines() if '"val"' in l][-1]
    assert va["loss"] == vb["loss"]


def test_fine_tune_from_checkpoint(midi_folder, tmp_path):
    base = train(TrainConfig(data_dir=str(midi_folder), out=str(tmp_path / "base"), max_steps=3, **SMALL), progress=False)
    tuned = train(TrainConfig(data_dir=str(midi_folder), out=str(tmp_path / "tuned"), max_steps=2, init=str(base),
                              **{**SMALL, "preset": None}), progress=False)
    _, c = checkpoint.load_checkpoint(tuned / "last.safetensors")
    assert c.state["step"] == 2


def test_divergence_stops_and_keeps_last_good_checkpoint(midi_folder, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(TrainConfig(data_dir=str(midi_folder), out=str(run), max_steps=10, stop_at=5, **SMALL), progress=False)
    good = (run / "last.safetensors").read_bytes()
    import musicgpt.model as model_module

    real_forward = model_module.MusicGPT.forward

    def nan_forward(self, idx, targets=None, **kw):
        out = real_forward(self, idx, targets, **kw)
        return (out[0], out[1] * float("nan")) + tuple(out[2:]) if targets is not None else out

    monkeypatch.setattr(model_module.MusicGPT, "forward", nan_forward)
    with pytest.raises(MusicGPTError, match="diverged"):
        train(TrainConfig(data_dir=str(midi_folder), resume=str(run)), progress=False)
    assert (run / "last.safetensors").read_bytes() == good


def test_options_out_of_range_fail_before_work():
    with pytest.raises(MusicGPTError, match="--batch-size"):
        resolve(TrainConfig(batch_size=0), "cpu")
    with pytest.raises(MusicGPTError, match="--lr"):
        resolve(TrainConfig(lr=-1.0), "cpu")
    with pytest.raises(MusicGPTError, match="preset|tiny"):
        train(TrainConfig(data_dir="/nonexistent", preset="huge"), progress=False)


def test_schedule_warms_up_then_decays():
    cfg = resolve(TrainConfig(max_steps=100, warmup=10, lr=1.0), "cpu")
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] < lrs[9] <= 1.0 and max(lrs) == lrs[10]
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] >= cfg.min_lr_ratio


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def test_two_process_gloo_training_agrees(midi_folder, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, sys, torch, torch.distributed as dist\n"
        "from musicgpt import train as T\n"
        "rank = int(sys.argv[1])\n"
        "os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=sys.argv[2])\n"
        "torch.set_num_threads(1)\n"
        "captured = {}\n"
        "real = T.DistributedDataParallel\n"
        "def spy(module, **kw):\n"
        "    captured['m'] = module\n"
        "    return real(module, **kw)\n"
        "T.DistributedDataParallel = spy\n"
        "T.train(T.TrainConfig(data_dir=sys.argv[3], out=sys.argv[4], max_steps=3, preset='tiny', batch_size=2,\n"
        "        seq_len=32, lr=3e-3, warmup=1, device='cpu', eval_interval=3, eval_batches=1), progress=False)\n"
        "flat = torch.cat([p.detach().flatten() for p in captured['m'].parameters()])\n"
        "print('SUM', repr(float(flat.double().sum())), repr(float(flat.double().abs().sum())))\n"
        "dist.destroy_process_group()\n"
    )
    port = str(_free_port())
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), port, str(midi_folder), str(tmp_path / "run")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for r in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    sums = [next(line for line in out.splitlines() if line.startswith("SUM")) for out, _ in outs]
    assert sums[0] == sums[1]
    assert (tmp_path / "run" / "last.safetensors").is_file()
