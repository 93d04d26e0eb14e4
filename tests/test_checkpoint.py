"""Checkpoints: safetensors + JSON, atomic, tied weights, clear errors, nothing unpickled."""

import json
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from musicgpt import checkpoint, checkpoint_header
from musicgpt.cli import main
from musicgpt.errors import CheckpointError, MusicGPTError
from musicgpt.model import MAX_PARAMS, SIZE_LIMITS, ModelConfig, MusicGPT, preset
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


TORCH_FREE_SCRIPT = """
import sys
from musicgpt.checkpoint_header import read_checkpoint_meta
c = read_checkpoint_meta("default")
print(c.model_config.n_layer)
assert "torch" not in sys.modules, "reading a checkpoint's metadata imported torch"
"""


def test_metadata_is_read_without_importing_torch():
    """What a fast sampler needs to start (configs, controls, which file) never imports torch."""
    done = subprocess.run([sys.executable, "-c", TORCH_FREE_SCRIPT], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ))  # PYTHONPATH points at this checkout (conftest)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == str(checkpoint.read_checkpoint_meta("default").model_config.n_layer)


def test_metadata_alone_agrees_with_the_full_header_check(tmp_path):
    checkpoint.save_checkpoint(tmp_path / "best", _model(), CodecConfig(), state={"step": 3})
    ckpt, _ = checkpoint.read_checkpoint_header(tmp_path)
    assert checkpoint_header.read_checkpoint_meta(tmp_path) == ckpt and ckpt.state["step"] == 3


# ----------------------------------------------------------------------------- hostile checkpoints
# Each is a valid tiny checkpoint whose metadata (or tensors) were rewritten and whose digest was
# recomputed, as anyone can: the digest passes, so the loader's own checks must catch the problem.


def _hostile(tmp_path: Path, edit, name: str = "hostile") -> Path:
    """A checkpoint with an optimizer, edited by `edit(meta, tensors)` and re-digested."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 388, (1, 8)), torch.randint(0, 388, (1, 8))).loss.backward()
    optimizer.step()
    path = checkpoint.save_checkpoint(tmp_path / name, model, CodecConfig(), state={"step": 1}, optimizer=optimizer)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["musicgpt"])
    tensors = load_file(str(path))
    edit(meta, tensors)
    if isinstance(meta.get("sha256"), str):  # unless the edit was to the digest itself
        meta["sha256"] = checkpoint.content_digest(tensors, meta)
    save_file(tensors, str(path), metadata={"musicgpt": json.dumps(meta)})
    return path


def _config(**fields):
    return lambda meta, tensors: meta["model_config"].update(fields)


def _set(key, value):
    return lambda meta, tensors: meta.__setitem__(key, value)


def _nest(depth):
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def _drop_and_alias(meta, tensors):
    del tensors["model.ln_f.weight"]
    meta["aliases"] = {"model.ln_f.weight": "model.nope"}


HOSTILE = {
    # absurd sizes: refused by the configuration's bounds before anything is built
    "n_layer 100000": (_config(n_layer=100_000), "n_layer must be at most 256"),
    "n_embd 2**20": (_config(n_embd=2**20), "n_embd must be at most 16384"),
    "absolute context 2**31": (_config(context_len=2**31, attention="absolute"), "context_len must be at most"),
    "max_rel_dist 2**31": (_config(max_rel_dist=2**31), "max_rel_dist must be at most"),
    "too many parameters": (_config(n_layer=256, n_embd=4096, mlp_dim=65536), "parameters is more than"),
    "vocab_size 2**16": (_config(vocab_size=2**16), "vocab_size must be at most"),
    "vocab_size not the controls'": (_config(vocab_size=391), r"model vocabulary \(391\) does not match"),
    "codec step_ms 10**6": (lambda m, t: m["codec_config"].update(step_ms=10**6), "step_ms must be in"),
    # wrong types
    "n_layer a string": (_config(n_layer="3"), "n_layer must be a positive integer"),
    "n_layer true": (_config(n_layer=True), "n_layer must be a positive integer"),
    "dropout a list": (_config(dropout=[0.1]), "dropout must be in"),
    "model_config a list": (_set("model_config", [1, 2]), "model_config must be an object"),
    "codec_config a string": (_set("codec_config", "x"), "codec_config must be an object"),
    "state a string": (_set("state", "abc"), "state must be an object"),
    "state.step a string": (_set("state", {"step": "abc"}), "state.step must be a non-negative integer"),
    "train_config a list": (_set("state", {"train_config": []}), "state.train_config must be an object"),
    "sha256 a number": (_set("sha256", 3), "sha256 must be a string"),
    "aliases a list": (_set("aliases", ["a"]), "aliases must be an object"),
    "alias not a string": (_set("aliases", {"model.x": 3}), "alias 'model.x' must name a model tensor"),
    "alias to a stored tensor": (_set("aliases", {"model.wte.weight": "model.nope"}), "names no tied tensor"),
    "alias to a missing tensor": (_drop_and_alias, "points to model.nope, which the file does not hold"),
    "optimizer a string": (_set("optimizer", "x"), "optimizer must be an object"),
    "param_groups of numbers": (_set("optimizer", {"param_groups": [1, 2]}), "param_groups must be a list of"),
    "params not numbers": (_set("optimizer", {"param_groups": [{"params": ["a"]}]}), "list of parameter numbers"),
    "nested 100 deep": (_set("state", {"x": _nest(100)}), "nested more than 32 deep"),
    # weights that do not fit the configuration: found from the header's shapes
    "n_layer 1": (_config(n_layer=1), "unexpected tensor model.blocks.1"),
    "n_embd halved": (_config(n_embd=16),
                      r"tensor model\.wte\.weight has shape \[390, 32\], the configuration implies \[390, 16\]"),
    "mlp_dim doubled": (_config(mlp_dim=128), r"tensor model\.blocks\.0\.mlp\.fc\.weight has shape"),
    "a tensor missing": (lambda m, t: t.pop("model.ln_f.bias"), "tensor model.ln_f.bias is missing"),
    "an integer tensor": (lambda m, t: t.update({"model.ln_f.bias": torch.zeros(32, dtype=torch.int64)}), "holds I64"),
    "a stranger tensor": (lambda m, t: t.update({"evil": torch.zeros(1)}), "unexpected tensor evil"),
}


def _refuse_work(monkeypatch):
    """Make reading a tensor or building a real model fail the test: the header must decide."""
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read before the header's checks refused the file")

    real = checkpoint.MusicGPT

    def meta_only(config):
        assert torch.empty(0).device.type == "meta", "a model was built for real"
        return real(config)

    monkeypatch.setattr(checkpoint, "load_file", refuse)
    monkeypatch.setattr(checkpoint, "MusicGPT", meta_only)


def _one_line_error(path: Path, fn) -> str:
    start = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        fn()
    assert time.monotonic() - start < 10
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 400, message
    return message


@pytest.mark.parametrize("probe", HOSTILE)
def test_hostile_metadata_is_refused_in_one_line_before_any_tensor_is_read(probe, tmp_path, monkeypatch):
    edit, fragment = HOSTILE[probe]
    path = _hostile(tmp_path, edit)
    _refuse_work(monkeypatch)
    message = _one_line_error(path, lambda: checkpoint.load_model(path))
    assert re.search(fragment, message), message
    assert checkpoint.peek_codec_config(path) in (None, CodecConfig())  # sample reads the header first


def test_json_nested_200000_deep_is_refused_in_one_line(tmp_path, monkeypatch):
    path = _hostile(tmp_path, lambda m, t: None)
    tensors = load_file(str(path))
    for where in ("whole", "state"):
        deep = "[" * 200_000 + "]" * 200_000
        inside = json.dumps({"format": checkpoint.FORMAT, "state": "@"}).replace('"@"', deep)
        text = deep if where == "whole" else inside
        save_file(tensors, str(path), metadata={"musicgpt": text})
        message = _one_line_error(path, lambda: checkpoint.load_model(path))
        assert "malformed checkpoint metadata (nested too deeply)" in message, message
        assert checkpoint.peek_model_config(path) is None


@contextmanager
def _fifo_watchdog(fifo: Path):
    """A loader that opens `fifo` blocks; after 10 s this opens its other end, so the test fails, not hangs."""
    stop = threading.Event()

    def unblock() -> None:
        if not stop.wait(10):
            while not stop.wait(0.1):
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:  # no reader waiting yet
                    pass

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_a_checkpoint_that_is_not_a_regular_file_is_refused_without_reading(tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with _fifo_watchdog(fifo):
        for path in (fifo, Path("/dev/zero")):
            message = _one_line_error(path, lambda p=path: checkpoint.load_model(p))
            assert "not a regular file" in message
            assert checkpoint.peek_codec_config(path) is None


@pytest.mark.parametrize("claim", ["past the end", "2**62"])
def test_a_header_length_beyond_the_file_is_refused(claim, tmp_path, monkeypatch):
    path = checkpoint.save_checkpoint(tmp_path / "best", _model(), CodecConfig())
    data = bytearray(path.read_bytes())
    data[:8] = (len(data) if claim == "past the end" else 2**62).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    _refuse_work(monkeypatch)
    message = _one_line_error(path, lambda: checkpoint.load_model(path))
    assert re.search(r"its header claims \d+ bytes and the file has \d+", message), message


def test_hostile_checkpoint_through_the_cli_is_one_stderr_line(tmp_path, capsys):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    for path, problem in ((_hostile(tmp_path, _config(n_layer=100_000)), "n_layer must be at most 256"),
                          (_hostile(tmp_path, _config(n_layer=1), "short"), "unexpected tensor"),
                          (fifo, "not a regular file")):
        start = time.monotonic()
        with _fifo_watchdog(fifo):
            rc = main(["sample", "--checkpoint", str(path), "--seconds", "1", "--out", str(tmp_path / "out")])
        assert time.monotonic() - start < 10
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert rc == 1 and len(lines) == 1, captured.err
        assert lines[0].startswith(f"musicgpt: error: {path}: ") and problem in lines[0], lines[0]
        assert not (tmp_path / "out").exists()


PROBE_SCRIPT = """
import resource, sys, time
from musicgpt import checkpoint
for path in sys.argv[1:]:
    start = time.monotonic()
    try:
        checkpoint.load_model(path)
        print("loaded", path)
    except checkpoint.CheckpointError as e:
        print(f"{time.monotonic() - start:.2f}", e)
print("peak", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_absurd_sizes_fail_fast_in_little_memory(tmp_path):
    """In a process of its own, so that its peak memory is the probes' alone."""
    probes = ["n_layer 100000", "n_embd 2**20", "absolute context 2**31", "max_rel_dist 2**31", "too many parameters"]
    paths = [str(_hostile(tmp_path, HOSTILE[p][0], f"probe{i}")) for i, p in enumerate(probes)]
    env = {**os.environ, "PYTHONPATH": str(Path(checkpoint.__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", PROBE_SCRIPT, *paths], capture_output=True, text=True,
                          timeout=120, env=env)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) == len(paths) + 1, done.stdout + done.stderr
    for line, path in zip(lines, paths):
        seconds, message = line.split(" ", 1)
        assert float(seconds) < 10 and message.startswith(f"{path}: bad configuration"), line
    assert int(lines[-1].split()[1]) < 2**30, lines[-1]  # peak resident memory under 1 GiB


# ----------------------------------------------------------------------------- what still loads


def test_digest_still_catches_metadata_edits_that_keep_the_shapes(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "best", _model(), CodecConfig(), state={"step": 7})
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["musicgpt"])
    meta["state"]["step"] = 8
    save_file(load_file(str(path)), str(path), metadata={"musicgpt": json.dumps(meta)})
    assert "damaged" in _one_line_error(path, lambda: checkpoint.load_model(path))


@pytest.mark.parametrize("damage", ["exp_avg shape", "lr a string", "betas too short"])
def test_optimizer_state_that_does_not_fit_is_refused_on_resume(damage, tmp_path):
    def edit(meta, tensors):
        group = meta["optimizer"]["param_groups"][0]
        if damage == "exp_avg shape":
            tensors["optim.0.exp_avg"] = torch.zeros(3)
        elif damage == "lr a string":
            group["lr"] = "fast"
        else:
            group["betas"] = [0.9]

    path = _hostile(tmp_path, edit)
    tensors, ckpt = checkpoint.load_checkpoint(path)
    model = MusicGPT(ckpt.model_config)
    message = _one_line_error(path, lambda: checkpoint.restore_training(
        tensors, ckpt, model, torch.optim.AdamW(model.parameters())))
    assert "training state does not match" in message


def test_an_intact_checkpoint_with_optimizer_resumes(tmp_path):
    path = _hostile(tmp_path, lambda m, t: None)
    tensors, ckpt = checkpoint.load_checkpoint(path)
    model = MusicGPT(ckpt.model_config)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint.restore_training(tensors, ckpt, model, optimizer)
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], tensors["optim.0.exp_avg"])


@pytest.mark.parametrize("fields", [{}, {"attention": "absolute"}, {"bias": False},
                                    {"n_layer": 5, "n_head": 3, "n_embd": 48, "mlp_dim": 100, "max_rel_dist": 7}])
def test_shapes_and_parameter_count_are_computed_without_building(fields):
    config = ModelConfig(**{**preset("tiny").to_dict(), **fields})
    model = MusicGPT(config)
    assert checkpoint.expected_shapes(config) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert config.num_params() == model.num_params()


@pytest.mark.parametrize("name", SIZE_LIMITS)
def test_every_size_has_an_upper_bound(name):
    limit = SIZE_LIMITS[name]
    with pytest.raises(MusicGPTError, match=f"{name} must be at most {limit}, got {limit + 1}$"):
        ModelConfig(**{name: limit + 1})
    with pytest.raises(MusicGPTError, match="got more$"):
        ModelConfig(**{name: 10**100})
    assert MAX_PARAMS >= preset("base").num_params()
