"""Sampling speed: the KV-cached sampler against full recompute, per-token cost along a piece, end to end,
and the ONNX Runtime backend against torch.

    python scripts/bench_sample.py --threads 1                          # CPU: `small`-sized, context 2049
    python scripts/bench_sample.py --preset base --device cuda --batch 1 8
    python scripts/bench_sample.py --e2e-checkpoint runs/mine           # + `musicgpt sample --seconds 60`
    python scripts/bench_sample.py --skip-speed --backends --e2e-checkpoint default --e2e-primer song.mid

`--backends` times the two engines of `musicgpt sample` on one checkpoint in one run: per token
(batch 1, one thread each) and end to end in fresh processes, old (torch) against new (ONNX
Runtime) as ratios, then itemises the new path's start-up. Otherwise both sides run
`musicgpt.generate.generate` (the default top-p sampling, EOS ignored) on a randomly
initialised model whose context covers every length, so no sliding window is involved: speed
does not depend on the weights. Full recompute is too slow to run to 2048 tokens on a CPU, so it
is timed on `--recompute-steps` consecutive steps at a grid of lengths, and the time of a whole
run is the integral of that per-step cost over lengths 1..N (piecewise linear between grid points).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from musicgpt.generate import generate
from musicgpt.model import MusicGPT, preset
from musicgpt.vocab import CodecConfig

EOS = CodecConfig().eos_id


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def cached_run(model, n: int, batch: int, device: str, repeats: int = 1,
               static_cache: bool | None = None) -> float:
    """Seconds to generate n tokens per row with a cache, best of `repeats`; static_cache=None is
    the product path (on CUDA the static ring cache replayed as a CUDA graph), False the KV cache."""
    return min(_timed(lambda: generate(model, [EOS], max_new_tokens=n, num_samples=batch, seed=0,
                                       stop_at_eos=False, static_cache=static_cache), device)
               for _ in range(repeats))


def recompute_step(model, length: int, batch: int, steps: int, device: str) -> float:
    """Seconds per recompute step at about `length` tokens: `steps` steps from a prompt of that length."""
    prompt = torch.randint(0, EOS, (length,))
    prompt[0] = EOS
    # Untimed first: on CUDA the full forward is FlexAttention, compiled per new shape.
    generate(model, prompt, max_new_tokens=1, num_samples=batch, stop_at_eos=False, use_cache=False)
    t = _timed(lambda: generate(model, prompt, max_new_tokens=steps, num_samples=batch, seed=0,
                                stop_at_eos=False, use_cache=False), device)
    return t / steps


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else f"{cpu_name()} CPU"


def cpu_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo; platform.processor() is empty there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def integrate(grid: list[int], per_step: list[float], n: int) -> float:
    """Sum over lengths 1..n of the per-step cost, linear between measured lengths."""
    total = 0.0
    for length in range(1, n + 1):
        i = max(k for k in range(len(grid)) if grid[k] <= length) if length >= grid[0] else 0
        j = min(i + 1, len(grid) - 1)
        w = 0.0 if j == i else (length - grid[i]) / (grid[j] - grid[i])
        total += per_step[i] * (1 - w) + per_step[j] * w
    return total


def per_token(model, starts: list[int], batch: int, device: str, steps: int = 64, repeats: int = 3) -> list[float]:
    """Seconds of one cached decode step (plus a sampling draw) over `steps` steps from each start.

    Starts are measured in turn, `repeats` rounds, best round kept: on a shared machine a slow
    patch then hits every start alike instead of biasing the late ones.
    """
    best = [math.inf] * len(starts)
    with torch.inference_mode():
        for _ in range(repeats):
            for i, start in enumerate(starts):
                cache = model.new_cache(batch)
                if start > 1:  # untimed: fill the cache to `start` tokens
                    model.decode_step(torch.randint(0, EOS, (batch, start - 1), device=device), cache)
                tok = torch.full((batch, 1), EOS, device=device)
                _sync(device)
                t = time.perf_counter()
                for _ in range(steps):
                    logits = model.decode_step(tok, cache)[:, -1]
                    tok = torch.multinomial(logits.float().softmax(-1), 1)
                _sync(device)
                best[i] = min(best[i], (time.perf_counter() - t) / steps)
    return best


def speed_table(args) -> str:
    top = max(args.lengths)
    base = preset(args.preset)
    ctx = max(base.context_len, top + 1)  # the whole run fits the window: no sliding involved
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = MusicGPT(preset(args.preset, context_len=ctx, max_rel_dist=ctx, dropout=0.0)).to(args.device, dtype).eval()
    cuda = args.device.startswith("cuda")
    grid = sorted({1, *[g for g in (64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096) if g < top], top})
    lines = [f"model: `{args.preset}` sizes ({model.num_params() / 1e6:.1f} M parameters, {base.n_layer} layers, "
             f"width {base.n_embd}), context {ctx}, relative attention, random {args.dtype} weights; "
             f"device {device_name(args.device)}, "
             f"torch threads {torch.get_num_threads()}, torch {torch.__version__}", ""]
    lines += ["| batch | tokens | cached s | cached tok/s | KV-cache tok/s (CUDA: no graph) "
              "| recompute s (est.) | recompute tok/s | speed-up "
              "| per-token ms, first 64 | last 64 | recompute ms/step at N |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for batch in args.batch:
        cached_run(model, 32, batch, args.device)  # warm up
        if cuda:
            cached_run(model, 32, batch, args.device, static_cache=False)
        per_step = []
        for g in grid:
            per_step.append(recompute_step(model, g, batch, args.recompute_steps, args.device))
            print(f"  batch {batch}: recompute at {g} tokens: {per_step[-1] * 1e3:.1f} ms/step", file=sys.stderr)
        start, end = per_token(model, [1, max(1, top - 64)], batch, args.device)
        for n in args.lengths:
            cached = cached_run(model, n, batch, args.device, args.repeats)
            kv = (f"{batch * n / cached_run(model, n, batch, args.device, args.repeats, False):,.0f}"
                  if cuda else "(same path)")
            recompute = integrate(grid, per_step, n)
            at_n = per_step[grid.index(n)] if n in grid else float("nan")
            lines.append(f"| {batch} | {n} | {cached:.2f} | {batch * n / cached:,.0f} | {kv} | {recompute:.1f} | "
                         f"{batch * n / recompute:,.0f} | {recompute / cached:.1f}x | "
                         f"{start * 1e3:.2f} | {end * 1e3:.2f} | {at_n * 1e3:.1f} |")
            print(lines[-1], file=sys.stderr)
    lines.append("")
    lines.append("cached: `generate` as the product runs it (on CUDA the static cache's CUDA graph); "
                 "per-token columns: one `decode_step` on the KV cache (+ a sampling draw), mean over steps 1-64 and "
                 f"{max(1, top - 63)}-{max(64, top)}, best of 3 interleaved rounds.")
    return "\n".join(lines)


def end_to_end(args) -> str:
    """Wall time of `musicgpt sample --seconds S` in a fresh process, and music seconds per wall second."""
    import pretty_midi

    from musicgpt import codec

    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "musicgpt", "sample", "--checkpoint", str(args.e2e_checkpoint),
               "--seconds", str(args.e2e_seconds), "--seed", "0", "--out", out, "--device", args.device]
        if args.e2e_primer:
            cmd += ["--primer", str(args.e2e_primer)]
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
        walls = []
        for _ in range(args.e2e_repeats):  # fresh processes; the same seed, so the same music each time
            t = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            walls.append(time.perf_counter() - t)
            if done.returncode:
                sys.exit(f"bench_sample: {' '.join(cmd)} failed:\n{done.stderr}")
        wall = statistics.median(walls)
        path = Path(done.stdout.strip().splitlines()[-1])  # a primer name may hold spaces
        music = pretty_midi.PrettyMIDI(str(path)).get_end_time()
        tokens = len(codec.encode(path))  # about the number generated (the re-encoding is canonical)
        # Start-up alone: a run that fails option validation after the imports it needs.
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "musicgpt", "sample", "--top-p", "2"], capture_output=True, env=env)
        startup = time.perf_counter() - t
    primer = f" --primer {args.e2e_primer}" if args.e2e_primer else ""
    return "\n".join([
        f"`musicgpt sample --checkpoint CKPT{primer} --seconds {args.e2e_seconds:g} --seed 0 --device {args.device}`",
        "",
        f"wall s: the median of {args.e2e_repeats} fresh processes ({', '.join(f'{w:.2f}' for w in walls)})",
        "",
        "| checkpoint | music s | tokens | wall s | music s / wall s | start-up s |",
        "|---|---:|---:|---:|---:|---:|",
        f"| {args.e2e_checkpoint} | {music:.1f} | {tokens} | {wall:.1f} | {music / wall:.1f} | {startup:.1f} |",
    ])


def _backend_steppers(spec: str):
    """The checkpoint's path and vocabulary size, and its two engines' steppers, one thread each:
    old = torch's KV cache (what `--backend torch` runs), new = the ONNX Runtime step."""
    from musicgpt.backends import onnx_export_for
    from musicgpt.checkpoint import load_model, resolve_checkpoint
    from musicgpt.onnx_stepper import OnnxStepper
    from musicgpt.steppers import CachedStepper

    torch.set_num_threads(1)
    path = resolve_checkpoint(spec)
    model, ckpt = load_model(path)
    return path, ckpt.model_config.vocab_size, {
        "torch": CachedStepper(model, model.config.context_len),
        "onnx": OnnxStepper(onnx_export_for(path, ckpt), threads=1)}


def _step_rate(stepper, window: int, n: int) -> float:
    """Tokens/s of `n` bare steps once the window is full (steady state)."""
    rng = torch.Generator().manual_seed(0)
    stepper.start(torch.randint(0, EOS, (window,), generator=rng).numpy(), 1)
    tokens = torch.randint(0, EOS, (n, 1), generator=rng).numpy()
    t = time.perf_counter()
    for token in tokens:
        stepper.step(token)
    return n / (time.perf_counter() - t)


def _sampling_rate(stepper, vocab_size: int, n: int) -> float:
    """Tokens/s of `musicgpt.decode` sampling n tokens from silence with the default settings."""
    from musicgpt.decode import decode

    t = time.perf_counter()
    out = decode(stepper, [EOS], vocab_size=vocab_size, max_new_tokens=n, seed=0, stop_at_eos=False,
                 start_with_note=True, max_pause_seconds=4.0, max_note_seconds=12.0)
    return len(out[0]) / (time.perf_counter() - t)


def per_token_backends(args) -> str:
    """Batch-1 tokens/s of both engines, bare steps and whole sampling; rounds interleaved, best kept."""
    path, vocab, steppers = _backend_steppers(str(args.e2e_checkpoint))
    window = steppers["torch"].window
    best = {(name, kind): 0.0 for name in steppers for kind in ("step", "sample")}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, stepper in steppers.items():
                best[name, "step"] = max(best[name, "step"], _step_rate(stepper, window, args.backend_tokens))
                best[name, "sample"] = max(best[name, "sample"], _sampling_rate(stepper, vocab, args.backend_tokens))
    lines = [f"checkpoint {path}, window {window}, batch 1, one thread each; best of {args.repeats} "
             f"interleaved rounds of {args.backend_tokens} tokens", "",
             "| per token | torch tok/s (old) | ONNX Runtime tok/s (new) | new / old |", "|---|---:|---:|---:|"]
    for kind, what in (("step", "model step, window full"), ("sample", "sampling from silence (top-p 0.9, limits)")):
        old, new = best["torch", kind], best["onnx", kind]
        lines.append(f"| {what} | {old:,.0f} | {new:,.0f} | {new / old:.2f}x |")
    return "\n".join(lines)


def _sample_cmd(args, out: str, backend: str) -> list[str]:
    cmd = [sys.executable, "-m", "musicgpt", "sample", "--checkpoint", str(args.e2e_checkpoint),
           "--seconds", str(args.e2e_seconds), "--seed", "0", "--out", out, "--backend", backend]
    return cmd + (["--primer", str(args.e2e_primer)] if args.e2e_primer else [])


def e2e_backends(args) -> str:
    """Fresh `musicgpt sample` processes with each backend, interleaved; best and median wall time."""
    import pretty_midi

    walls, notes = {"torch": [], "onnx": []}, {}
    with tempfile.TemporaryDirectory() as out:
        for backend in walls:  # untimed: the ONNX export is made once, as a first use would
            subprocess.run(_sample_cmd(args, out, backend), capture_output=True, check=True)
        for _ in range(args.e2e_repeats):
            for backend in walls:
                t = time.perf_counter()
                done = subprocess.run(_sample_cmd(args, out, backend), capture_output=True, text=True)
                walls[backend].append(time.perf_counter() - t)
                if done.returncode:
                    sys.exit(f"bench_sample: {backend} failed:\n{done.stderr}")
                midi = pretty_midi.PrettyMIDI(done.stdout.strip().splitlines()[-1])
                notes[backend] = [(n.pitch, n.start, n.end, n.velocity) for n in midi.instruments[0].notes]
    primer = f" --primer {args.e2e_primer}" if args.e2e_primer else ""
    lines = [f"`musicgpt sample --checkpoint {args.e2e_checkpoint}{primer} --seconds {args.e2e_seconds:g} "
             f"--seed 0 --backend B`, {args.e2e_repeats} fresh processes each, interleaved", "",
             "| backend | wall s, best | median | runs |", "|---|---:|---:|---|"]
    for backend, w in walls.items():
        lines.append(f"| {backend} | {min(w):.2f} | {statistics.median(w):.2f} | {', '.join(f'{x:.2f}' for x in w)} |")
    ratio = statistics.median(walls["torch"]) / statistics.median(walls["onnx"])
    same = "the same notes" if notes["torch"] == notes["onnx"] else "DIFFERENT notes"
    lines += ["", f"new is {ratio:.2f}x as fast (medians), {min(walls['torch']) / min(walls['onnx']):.2f}x "
                  f"(bests); both wrote {same} ({len(notes['onnx'])} notes)."]
    return "\n".join(lines)


def itemise_table(args) -> str:
    """The start-up of the new path item by item, from a fresh process."""
    import json

    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    interpreter = time.perf_counter() - t
    cmd = [sys.executable, str(Path(__file__).with_name("sample_phases.py")), str(args.e2e_checkpoint),
           "--seconds", str(args.e2e_seconds)] + (["--primer", str(args.e2e_primer)] if args.e2e_primer else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    items = {"start the Python interpreter": interpreter, **json.loads(done.stdout.strip().splitlines()[-1])}
    lines = ["| phase (ONNX Runtime path, fresh process) | s |", "|---|---:|"]
    lines += [f"| {name} | {s:.3f} |" for name, s in items.items()]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", help="model sizes (default small; context raised to fit)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="model weights")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--recompute-steps", type=int, default=20, help="recompute steps timed per grid length")
    p.add_argument("--repeats", type=int, default=3, help="cached runs timed per length (best kept)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--e2e-checkpoint", type=Path, help="also time `musicgpt sample` end to end with this")
    p.add_argument("--e2e-seconds", type=float, default=60.0)
    p.add_argument("--e2e-primer", type=Path, help="primer MIDI for the end-to-end run")
    p.add_argument("--e2e-repeats", type=int, default=3, help="fresh processes timed (the median is given)")
    p.add_argument("--skip-speed", action="store_true", help="only the end-to-end run")
    p.add_argument("--backends", action="store_true",
                   help="torch against ONNX Runtime on --e2e-checkpoint: per token, end to end, start-up items")
    p.add_argument("--backend-tokens", type=int, default=2000, help="tokens per per-token round (--backends)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, python {platform.python_version()}")
    if not args.skip_speed:
        print(speed_table(args))
    if args.e2e_checkpoint and args.backends:
        for section in (per_token_backends, e2e_backends, itemise_table):
            print()
            print(section(args), flush=True)
    elif args.e2e_checkpoint:
        print()
        print(end_to_end(args))


if __name__ == "__main__":
    main()
