"""Stopping training with SIGINT / SIGTERM: the step in progress finishes, `last` is saved, the
exit status says why, and `--resume` ends with the same weights as a run never stopped."""

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import make_piece, run_script

from musicgpt import checkpoint
from musicgpt.errors import Interrupted
from musicgpt.interrupts import deferred_signals
from musicgpt.train import TrainConfig, train

OPTIONS = dict(preset="tiny", batch_size=4, seq_len=64, lr=3e-3, warmup=2, device="cpu", eval_interval=4,  # CLI flags
               max_steps=8, threads=1)

# The child runs `musicgpt train` and prints STEP before each training step, so the parent can
# send its signal while a step is under way.
CHILD = """
import os, sys, time
from musicgpt import train as T
from musicgpt.cli import main

real = T.train_step
def announced(run, batches, bar):
    print("STEP", run.state.step, flush=True)
    time.sleep(float(os.environ.get("SLOW_STEP", "0")))  # a long step, for the second-signal test
    real(run, batches, bar)
T.train_step = announced
sys.exit(main(sys.argv[1:]))
"""


def cli_args(data, out) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in OPTIONS.items()]
    return ["train", str(data), "--out", str(out), *flags]


def run_child(tmp_path: Path, args: list[str], signals: list[int], at_step: int, delay: float,
              slow_step: float = 0.0):
    """Start the child; at the announced step send each of `signals`, `delay` s apart."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    os.environ["SLOW_STEP"] = str(slow_step)  # the child inherits it (run_script copies os.environ)

    def signal_at_step(line, proc):
        if line != f"STEP {at_step}":
            return False
        for s in signals:
            time.sleep(delay)
            proc.send_signal(s)
        return True

    try:
        return run_script(script, args, signal_at_step, timeout=120)
    finally:
        del os.environ["SLOW_STEP"]


def weights(run: Path) -> dict:
    tensors, _ = checkpoint.load_checkpoint(run / "last.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "optim."))}


@pytest.fixture(scope="module")
def never_stopped(tmp_path_factory) -> tuple[Path, Path]:
    """A data folder and the run that trains on it without a stop (trained once for the module)."""
    root = tmp_path_factory.mktemp("never_stopped")
    folder = root / "midi"
    for i in range(4):
        make_piece(folder / f"piece{i}.mid", seed=i)
    return folder, train(TrainConfig(data_dir=str(folder), out=str(root / "run"), **OPTIONS), progress=False)


@pytest.mark.parametrize("signum, seed", [(signal.SIGINT, 1), (signal.SIGINT, 2), (signal.SIGTERM, 3)])
def test_a_signal_inside_a_step_then_resume_equals_a_run_never_stopped(never_stopped, tmp_path, signum, seed):
    midi_folder, whole = never_stopped
    run = tmp_path / "stopped"
    rng = random.Random(seed)
    at_step, delay = rng.randint(1, 5), rng.uniform(0.0, 0.05)  # a step here takes tens of ms
    rc, stderr = run_child(tmp_path, cli_args(midi_folder, run), [signum], at_step, delay)
    assert rc == 128 + signum, stderr[-2000:]
    assert "Traceback" not in stderr and f"resume with --resume {run}" in stderr
    _, stopped = checkpoint.load_checkpoint(run / "last.safetensors")
    assert at_step + 1 <= stopped.state["step"] < OPTIONS["max_steps"]  # the step under way finished
    resumed = train(TrainConfig(data_dir=str(midi_folder), resume=str(run)), progress=False)
    got, want = weights(resumed), weights(whole)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_a_second_signal_stops_at_once_without_saving(midi_folder, tmp_path):
    run = tmp_path / "run"
    rc, stderr = run_child(tmp_path, cli_args(midi_folder, run), [signal.SIGINT, signal.SIGINT], 5, 0.1,
                           slow_step=1.0)
    assert rc == 130 and "Traceback" not in stderr
    assert "stopped without saving" in stderr
    _, ckpt = checkpoint.load_checkpoint(run / "last.safetensors")
    assert ckpt.state["step"] == 4  # the last evaluation's checkpoint, untouched


def test_deferred_signals_record_the_first_and_restore_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with deferred_signals() as request:
        assert not request
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # Python runs handlers between bytecodes of the main thread
        assert request.signum == signal.SIGTERM
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGTERM) is before
