"""`musicgpt train` end to end, exact resume, interruption safety, divergence, distributed."""

import itertools
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
from musicgpt.model import MusicGPT, preset
from musicgpt.train import TrainConfig, lr_at, resolve, train
from musicgpt.vocab import CodecConfig

SMALL = {"preset": "tiny", "batch_size": 2, "seq_len": 32, "lr": 3e-3, "warmup": 2, "device": "cpu",
         "eval_interval": 5, "eval_batches": 2}


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
    _, ckpt = checkpoint.load_model(run)
    assert ckpt.state["step"] in (3, 6) and ckpt.model_config.attention == "relative"
    assert ckpt.model_config.sounding_notes  # a new model reads the keyboard
    assert ckpt.model_config.sounding_releases  # and releases only the keys it reads as down


def test_resume_continues_exactly(midi_folder, tmp_path):
    data = str(midi_folder)
    whole = train(TrainConfig(data_dir=data, out=str(tmp_path / "a"), max_steps=10, **SMALL), progress=False)
    train(TrainConfig(data_dir=data, out=str(tmp_path / "b"), max_steps=10, stop_at=5, **SMALL), progress=False)
    resumed = train(TrainConfig(data_dir=str(midi_folder), resume=str(tmp_path / "b")), progress=False)
    a, ca = checkpoint.load_checkpoint(whole / "last.safetensors")
    b, cb = checkpoint.load_checkpoint(resumed / "last.safetensors")
    assert ca.state["step"] == cb.state["step"] == 10
    for k in a:
        if k.startswith(("model.", "optim.")):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    va = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines() if '"val"' in line][-1]
    vb = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines() if '"val"' in line][-1]
    assert va["loss"] == vb["loss"]


def test_fine_tune_starts_from_the_init_weights_with_their_codec(midi_folder, tmp_path):
    """--init takes the checkpoint's weights, model shape and codec, not the preset's and not a fresh start."""
    codec = CodecConfig(velocity_bins=16)  # not today's default: the run can only have it from the checkpoint
    shape = preset("tiny", vocab_size=codec.vocab_size, n_layer=1, n_embd=64, mlp_dim=96, context_len=64,
                   max_rel_dist=64, dropout=0.0)
    torch.manual_seed(7)
    base = MusicGPT(shape)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)  # weights no fresh model would have
    checkpoint.save_checkpoint(tmp_path / "base" / "best", base, codec, state={"step": 40})
    tuned = train(TrainConfig(data_dir=str(midi_folder), out=str(tmp_path / "tuned"), init=str(tmp_path / "base"),
                              max_steps=2, **{**SMALL, "preset": None, "lr": 1e-6, "warmup": 0}), progress=False)
    model, c = checkpoint.load_model(tuned / "last.safetensors")
    assert c.state["step"] == 2
    # The folder's subfolder gives a tag, and FIM adds sentinels: only the vocabulary grows.
    assert c.codec_config == codec and c.model_config == preset("tiny", **{**shape.to_dict(), "vocab_size":
                                                                          c.controls.vocab_size})
    assert c.controls.fim and c.controls.tags == ("more",)
    start, end = base.state_dict(), model.state_dict()
    assert start.keys() == end.keys()
    end["wte.weight"] = end["wte.weight"][:codec.vocab_size]  # the rows the checkpoint had
    # Two AdamW steps at lr 1e-6 move each weight by about 2e-6: the run began at the checkpoint's weights.
    drift = max(float((end[k] - start[k]).abs().max()) for k in start)
    assert 0 < drift < 1e-4


def test_the_keyboard_input_joins_an_init_model_at_zero_and_learns(midi_folder, tmp_path):
    """--sounding-notes on a model without the input: its weights carry over, the new projection
    starts at zero and trains, a resumed run keeps it, and it cannot be taken away again."""
    data = str(midi_folder)
    base = train(TrainConfig(data_dir=data, out=str(tmp_path / "base"), max_steps=2, sounding_notes=False, **SMALL),
                 progress=False)
    options = {**SMALL, "preset": None, "lr": 1e-3, "warmup": 0}
    tuned = train(TrainConfig(data_dir=data, out=str(tmp_path / "keys"), init=str(base / "last.safetensors"),
                              sounding_notes=True, max_steps=4, stop_at=2, **options), progress=False)
    model, c = checkpoint.load_model(tuned / "last.safetensors")
    assert c.model_config.sounding_notes and model.keyboard is not None
    start = checkpoint.load_model(base / "last.safetensors")[0].state_dict()
    end = model.state_dict()
    assert set(end) - set(start) == {"keyboard.proj.weight"}
    assert 0 < float(end["keyboard.proj.weight"].abs().max()) < 0.01  # two small steps from zero
    resumed = train(TrainConfig(data_dir=data, resume=str(tuned)), progress=False)
    assert checkpoint.load_model(resumed / "last.safetensors")[1].model_config.sounding_notes
    with pytest.raises(MusicGPTError, match="cannot remove"):
        train(TrainConfig(data_dir=data, out=str(tmp_path / "off"), init=str(resumed / "last.safetensors"),
                          sounding_notes=False, max_steps=1, **options), progress=False)
    assert not checkpoint.load_model(resumed / "last.safetensors")[1].model_config.sounding_releases  # as its init
    releasing = train(TrainConfig(data_dir=data, out=str(tmp_path / "releases"), init=str(resumed / "last.safetensors"),
                                  sounding_releases=True, max_steps=2, **options), progress=False)
    model, c = checkpoint.load_model(releasing / "last.safetensors")
    assert c.model_config.sounding_releases and set(model.state_dict()) == set(end)  # no new weights
    losses = [json.loads(line)["loss"] for line in (releasing / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(v) for v in losses)


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


def _cosine(step: int, cfg: TrainConfig) -> float:
    """The schedule lr_at promises after warmup: cosine from lr down to lr * min_lr_ratio at max_steps."""
    progress = (step - cfg.warmup) / (cfg.max_steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_schedule_warms_up_linearly_then_decays_by_a_cosine():
    cfg = resolve(TrainConfig(max_steps=110, warmup=10, lr=3e-3, min_lr_ratio=0.2), "cpu")
    lrs = [lr_at(s, cfg) for s in range(cfg.max_steps + 1)]
    # Warmup: a straight line rising to the peak, which is reached when warmup ends.
    rises = [b - a for a, b in itertools.pairwise(lrs[:11])]
    assert 0 < lrs[0] < lrs[9] < cfg.lr and all(math.isclose(r, rises[0], rel_tol=1e-9) for r in rises)
    assert math.isclose(lrs[10], cfg.lr, rel_tol=1e-12) and max(lrs) == lrs[10]
    # Then every step is on the cosine: the quarter point tells it from a straight line, the midpoint is
    # halfway between peak and floor, and max_steps ends exactly on the floor.
    for s in range(10, cfg.max_steps + 1):
        assert math.isclose(lrs[s], _cosine(s, cfg), rel_tol=1e-12), s
    assert math.isclose(lrs[35], cfg.lr * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4))), rel_tol=1e-12)
    assert math.isclose(lrs[60], cfg.lr * (1 + 0.2) / 2, rel_tol=1e-12)
    assert math.isclose(lrs[110], cfg.lr * 0.2, rel_tol=1e-12)
    assert all(a > b for a, b in itertools.pairwise(lrs[10:]))  # strictly decreasing after the peak
    # Without warmup the first step already runs at the peak.
    cold = resolve(TrainConfig(max_steps=50, warmup=0, lr=1.0, min_lr_ratio=0.1), "cpu")
    assert lr_at(0, cold) == 1.0 and math.isclose(lr_at(25, cold), 0.55) and math.isclose(lr_at(50, cold), 0.1)


def test_training_runs_on_the_schedule(midi_folder, tmp_path):
    """The learning rate each step logs is lr_at's, so the loop cannot drift from the schedule."""
    cfg = TrainConfig(data_dir=str(midi_folder), out=str(tmp_path / "run"), max_steps=8, log_interval=1,
                      **{**SMALL, "warmup": 3, "eval_interval": 8, "eval_batches": 1})
    run = train(cfg, progress=False)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in logged if r["split"] == "train"}
    resolved = resolve(cfg, "cpu")
    assert lrs == {s + 1: lr_at(s, resolved) for s in range(8)}  # record "step n" is after update n
    assert len(set(lrs.values())) == 8


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
        "os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',\n"
        "                  MASTER_PORT=sys.argv[2])\n"
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
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    sums = [next(line for line in out.splitlines() if line.startswith("SUM")) for out, _ in outs]
    assert sums[0] == sums[1]
    assert (tmp_path / "run" / "last.safetensors").is_file()


def test_fine_tuning_adds_tags_and_fim_to_a_model_without_them(tmp_path):
    """`--init` from a model without control tokens on a tagged folder: the vocabulary grows by the
    FIM sentinels and the new tags, and every old token keeps its trained embedding."""
    from conftest import make_piece

    for tag in ("pop", "jazz"):
        for k in range(2):
            make_piece(tmp_path / "data" / tag / f"{k}.mid", seed=k, seconds=6)
    plain = checkpoint.save_checkpoint(tmp_path / "plain", MusicGPT(preset("tiny", n_layer=1)), CodecConfig())
    base, base_ckpt = checkpoint.load_model(plain)
    assert not base_ckpt.controls.fim and not base_ckpt.controls.tags
    run = train(TrainConfig(data_dir=str(tmp_path / "data"), out=str(tmp_path / "run"), init=str(plain),
                            max_steps=1, lr=1e-9, warmup=0, batch_size=2, seq_len=64, eval_interval=1,
                            eval_batches=1, device="cpu", fim_rate=0.5), progress=False)
    tuned, ckpt = checkpoint.load_model(run / "last.safetensors")
    assert ckpt.controls.fim and ckpt.controls.tags == ("jazz", "pop")
    assert ckpt.model_config.vocab_size == base_ckpt.controls.vocab_size + 3 + 2
    old = base_ckpt.controls.vocab_size
    torch.testing.assert_close(tuned.wte.weight[:old], base.wte.weight, rtol=0, atol=1e-5)
    assert tuned.wte.weight[old:].std() > 0.005  # fresh rows, not zeros


@pytest.mark.parametrize("asked, rates", [(dict(dropout=0.0), (0.0, 0.0)), (dict(dropout=0.2), (0.2, 0.2)),
                                          (dict(attn_dropout=0.0), (0.1, 0.0)), ({}, (0.1, 0.1))])
def test_fine_tuning_takes_the_dropout_asked_for(tmp_path, asked, rates):
    from conftest import make_piece

    make_piece(tmp_path / "data" / "0.mid", seed=4, seconds=6)
    model = MusicGPT(preset("tiny", n_layer=1, dropout=0.1))
    base = checkpoint.save_checkpoint(tmp_path / "base", model, CodecConfig())
    run = train(TrainConfig(data_dir=str(tmp_path / "data"), out=str(tmp_path / "run"), init=str(base), max_steps=1,
                            batch_size=2, seq_len=32, eval_interval=1, eval_batches=1, device="cpu", **asked),
                progress=False)
    tuned, ckpt = checkpoint.load_model(run / "last.safetensors")
    assert (ckpt.model_config.dropout, ckpt.model_config.attn_dropout) == rates
    assert tuned.drop.p == rates[0] and tuned.blocks[0].attn.attn_dropout == rates[1]


def test_fine_tuning_the_default_model_adds_only_the_tags_it_lacks(tmp_path):
    from conftest import make_piece

    for tag in ("pop", "jazz"):
        make_piece(tmp_path / "data" / tag / "0.mid", seed=3, seconds=6)
    base, base_ckpt = checkpoint.load_model("default")
    run = train(TrainConfig(data_dir=str(tmp_path / "data"), out=str(tmp_path / "run"), init="default",
                            max_steps=1, lr=1e-9, warmup=0, batch_size=2, seq_len=64, eval_interval=1,
                            eval_batches=1, device="cpu"), progress=False)
    tuned, ckpt = checkpoint.load_model(run / "last.safetensors")
    assert ckpt.controls.tags == (*base_ckpt.controls.tags, "jazz") and ckpt.controls.fim
    assert ckpt.controls.tag_id("pop") == base_ckpt.controls.tag_id("pop")  # a known tag keeps its id
    old = base_ckpt.controls.vocab_size
    assert ckpt.model_config.vocab_size == old + 1
    torch.testing.assert_close(tuned.wte.weight[:old], base.wte.weight, rtol=0, atol=1e-5)
