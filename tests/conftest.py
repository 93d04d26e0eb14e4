"""Shared test fixtures: small MIDI files built with pretty_midi, an isolated token cache, a tiny run."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pretty_midi
import pytest
import torch

torch.set_num_threads(1)  # the suite runs beside other work on small machines; keep it polite


def make_piece(path: Path, seed: int = 0, seconds: float = 12.0, pedal: bool = True) -> Path:
    """Write a short piano piece: a melody over broken chords with varied velocity and some pedal."""
    rng = np.random.default_rng(seed)
    pm = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0, name="Piano")
    root = 48 + int(rng.integers(0, 12))
    t = 0.0
    while t < seconds:
        chord = [root + i for i in (0, 4, 7)] if rng.random() < 0.5 else [root + i for i in (0, 3, 7)]
        for k, p in enumerate(chord):  # broken chord in the left hand
            piano.notes.append(pretty_midi.Note(int(rng.integers(40, 90)), p, t + 0.12 * k, t + 0.9))
        for k in range(4):  # melody in the right hand
            p = root + 12 + int(rng.choice([0, 2, 4, 5, 7, 9, 11, 12]))
            s = t + 0.25 * k
            piano.notes.append(pretty_midi.Note(int(rng.integers(60, 120)), p, s, s + 0.2))
        if pedal:
            piano.control_changes.append(pretty_midi.ControlChange(64, 100, t + 0.05))
            piano.control_changes.append(pretty_midi.ControlChange(64, 0, t + 0.95))
        root = 48 + (root - 48 + int(rng.choice([5, 7, 9]))) % 12
        t += 1.0
    pm.instruments.append(piano)
    path.parent.mkdir(parents=True, exist_ok=True)
    pm.write(str(path))
    return path


def write_notes(path: Path, notes, pedal=()) -> Path:
    """notes: (pitch, start, end, velocity); pedal: (time, value) CC64 events."""
    pm = pretty_midi.PrettyMIDI()  # 120 bpm, 220 ticks per quarter: times land on 1/440 s ticks
    piano = pretty_midi.Instrument(program=0)
    piano.notes = [pretty_midi.Note(v, p, s, e) for p, s, e, v in notes]
    piano.control_changes = [pretty_midi.ControlChange(64, v, t) for t, v in pedal]
    pm.instruments.append(piano)
    path.parent.mkdir(parents=True, exist_ok=True)
    pm.write(str(path))
    return path


def build_piece() -> pretty_midi.PrettyMIDI:
    """Chords, overlapping same-key notes, velocities 1..127, pedal, long gaps and notes, drums."""
    pm = pretty_midi.PrettyMIDI(resolution=480)
    piano = pretty_midi.Instrument(program=0, name="Piano")
    N = pretty_midi.Note
    for i, p in enumerate((48, 52, 55, 60)):  # a chord, then a chord with mixed lengths
        piano.notes.append(N(70 + i, p, 0.1013, 0.8031))
        piano.notes.append(N(40 + 20 * i, p, 1.2047, 1.5077 + 0.3 * i))
    piano.notes += [
        N(90, 64, 2.0021, 3.0031), N(60, 64, 2.5037, 2.7043),  # nested: the inner ends first
        N(80, 67, 2.0021, 2.9053), N(50, 67, 2.4061, 3.4087),  # partial overlap
        N(100, 71, 3.5011, 3.5027),  # shorter than a step
        N(64, 72, 5.1033, 8.4471),  # after a 1.6 s gap, 3.3 s long
    ]
    # Sustain: notes released while the pedal is down sound until it lifts (or the key re-sounds).
    piano.notes += [N(70, 76, 9.0019, 9.2027), N(72, 79, 9.1031, 9.3043), N(74, 76, 9.8069, 9.9011)]
    piano.control_changes += [pretty_midi.ControlChange(64, 100, 9.1509),
                              pretty_midi.ControlChange(64, 0, 10.4033)]
    for v in range(1, 128):  # every velocity, one note each, two keys alternating
        t = 11.0 + 0.0517 * v
        piano.notes.append(N(v, 36 + v % 2, t, t + 0.0253))
    strings = pretty_midi.Instrument(program=48, name="Strings")
    strings.notes += [N(55, 84, 0.5033, 4.2071), N(85, 86, 18.5049, 18.9037),
                      N(75, 88, 18.7013, 19.6037)]
    strings.control_changes += [pretty_midi.ControlChange(64, 127, 18.6011)]  # never lifted
    drums = pretty_midi.Instrument(program=0, is_drum=True, name="Drums")
    drums.notes += [N(100, 36, t / 2, t / 2 + 0.1) for t in range(30)]
    pm.instruments += [piano, strings, drums]
    return pm


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Token caches go to a temporary folder, never the user's home."""
    monkeypatch.setenv("MUSICGPT_CACHE", str(tmp_path_factory.getbasetemp() / "token-cache"))


def run_script(script: Path, args: list, on_line: Callable[[str, subprocess.Popen], bool],
               timeout: float = 240) -> tuple[int, str]:
    """Run a Python script, calling on_line(line, process) on each line it prints until that
    returns True; return its exit status and stderr. A watchdog kills a child that hangs, so a
    broken test fails instead of stalling the suite."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            if on_line(line.strip(), proc):
                break
        proc.wait(timeout=timeout)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
        stderr = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    return proc.returncode, stderr


@pytest.fixture(autouse=True)
def _subprocesses_import_this_checkout(monkeypatch):
    """Python subprocesses a test starts (torchrun-style workers, scripts) import the musicgpt under test,
    not one installed from another checkout, which sys.path would otherwise find first for them."""
    root = str(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]))


@pytest.fixture
def midi_folder(tmp_path) -> Path:
    """A folder of six small generated pieces, one in a sub-folder."""
    folder = tmp_path / "midi"
    for i in range(5):
        make_piece(folder / f"piece{i}.mid", seed=i)
    make_piece(folder / "more" / "piece5.MIDI", seed=5)
    return folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder holding a `tiny` model trained for a few steps (for sampler, plot and eval tests)."""
    import os

    from musicgpt.train import TrainConfig, train

    base = tmp_path_factory.mktemp("tiny-run")
    os.environ["MUSICGPT_CACHE"] = str(base / "cache")
    for i in range(4):
        make_piece(base / "data" / f"p{i}.mid", seed=100 + i)
    cfg = TrainConfig(
        data_dir=str(base / "data"), out=str(base / "run"), preset="tiny", max_steps=6,
        batch_size=4, seq_len=64, lr=3e-3, warmup=2, eval_interval=3, device="cpu",
    )
    return train(cfg, progress=False)


def make_model(attention="relative", std=0.1, **overrides):
    """For the model and attention tests: a tiny eval-mode model whose weights are large enough that
    attention is far from uniform, so a wrong relative bias or a wrong key would show up in the logits."""
    cfg = dict(n_layer=2, n_head=4, n_embd=64, mlp_dim=128, context_len=512, max_rel_dist=48,
               dropout=0.0, attention=attention)
    cfg.update(overrides)
    from musicgpt.model import ModelConfig, MusicGPT

    torch.manual_seed(0)
    model = MusicGPT(ModelConfig(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5 if name.endswith("rel_emb") else std)
    return model


def assert_compiles_to_the_same_step(model, idx):
    """torch.compile captures the whole forward in one graph (fullgraph: a graph break fails) and
    its loss and gradients equal the uncompiled model's. aot_eager traces forward and backward as
    inductor would but skips code generation, which is torch's to test and costs 20 s more here."""
    results = []
    for step_model in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        model.zero_grad()
        _, loss = step_model(idx, idx.roll(-1, 1))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss, grads), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=0)
    for (name, _), g, g_c in zip(model.named_parameters(), grads, grads_c):
        torch.testing.assert_close(g_c, g, rtol=1e-4, atol=1e-6, msg=f"grad of {name}")
