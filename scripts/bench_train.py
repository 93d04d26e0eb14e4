"""Model-only training throughput: relative vs absolute attention at several sequence lengths.

Each (attention, length) pair runs forward + backward + AdamW steps on random tokens in a fresh
subprocess, so peak-memory numbers do not leak between configurations. Peak memory is the growth
over the process's state after building the model: on CUDA torch.cuda.max_memory_allocated, on
CPU the peak resident set size (ru_maxrss). Prints a markdown table with relative/absolute ratios.

    python scripts/bench_train.py --preset tiny --seq-lens 256,512,1024 --threads 2
    python scripts/bench_train.py --preset base --dtype bf16 --device cuda --seq-lens 512,1024,2048
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch
from tqdm import tqdm

from musicgpt.model import MusicGPT, preset

KINDS = ("relative", "absolute")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", help="model preset (tiny, small, base)")
    p.add_argument("--seq-lens", default="256,512,1024", help="comma-separated sequence lengths")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 = autocast with fp32 master weights")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every configuration this many times (interleaved), keep the fastest")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--dropout", type=float, help="override the preset's dropout (CPU SDPA only "
                   "uses its fused kernel without dropout)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--attn-impl", default="auto", choices=("auto", "eager", "flex", "triton"),
                   help="relative attention kernel (MusicGPT.attn_impl)")
    p.add_argument("--triton-one-pass", action="store_true",
                   help="with --attn-impl triton: the one-pass backward (dk, dv added atomically)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # "<attention>:<seq_len>", internal
    return p.parse_args(argv)


def train_steps(args: argparse.Namespace, attention: str, seq_len: int) -> dict:
    """Time `args.steps` training steps of one configuration; measure peak memory growth."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    overrides = {"attention": attention}
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    cfg = preset(args.preset, **overrides)
    if cfg.context_len < seq_len:  # the absolute model needs a position per token
        cfg = preset(args.preset, **overrides, context_len=seq_len)
    model = MusicGPT(cfg).to(device)
    if attention == "relative":
        model.attn_impl = args.attn_impl
    if args.triton_one_pass:
        from musicgpt.attention import triton_kernel

        triton_kernel.ONE_PASS_BACKWARD = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model) if args.compile else model
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (args.batch_size, seq_len + 1), generator=g).to(device)
    x, y = data[:, :-1], data[:, 1:]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step() -> None:
        with autocast:
            _, loss = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        sync()
        base_mem = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    try:
        for _ in range(args.warmup):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        seconds = time.perf_counter() - t0
    except torch.cuda.OutOfMemoryError:
        return {"error": "OOM"}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_mem
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_mem
    return {"tokens_per_s": args.batch_size * seq_len * args.steps / seconds,
            "peak_mib": peak / 2**20, "params": model.num_params()}


def run_worker(args: argparse.Namespace, attention: str, seq_len: int) -> dict:
    """Run one configuration in a fresh Python process and read back its JSON line."""
    argv = sys.argv[1:] + ["--worker", f"{attention}:{seq_len}"]
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": last[:60]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine(args: argparse.Namespace) -> str:
    if args.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    threads = args.threads or torch.get_num_threads()
    return (f"{platform.machine()} CPU, {threads} thread(s), torch {torch.__version__}")


def fmt(r: dict, key: str, spec: str) -> str:
    return r["error"] if "error" in r else format(r[key], spec)


def ratio(a: dict, b: dict, key: str) -> str:
    if "error" in a or "error" in b or not b[key]:
        return "-"
    return f"{a[key] / b[key]:.2f}x"


def main() -> None:
    args = parse_args()
    if args.worker:
        attention, seq_len = args.worker.split(":")
        print(json.dumps(train_steps(args, attention, int(seq_len))))
        return
    dropout = preset(args.preset).dropout if args.dropout is None else args.dropout  # fail fast
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    jobs = [(kind, n) for _ in range(args.repeats) for n in seq_lens for kind in KINDS]
    results: dict[tuple[str, int], dict] = {}
    for job in tqdm(jobs, desc="configurations"):
        r, best = run_worker(args, *job), results.get(job)
        # On a shared machine the fastest run is the one least disturbed by others.
        if best is None or "error" in best or r.get("tokens_per_s", 0) > best["tokens_per_s"]:
            results[job] = r
    mem_kind = ("CUDA max_memory_allocated growth" if args.device.startswith("cuda")
                else "peak RSS growth (ru_maxrss), fresh process per row")
    compiled = ", compiled" if args.compile else ""
    impl = args.attn_impl + (" (one-pass backward)" if args.triton_one_pass else "")
    print(f"\nModel preset `{args.preset}` (dropout {dropout}), relative attention {impl}, "
          f"batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, best of {args.repeats}, "
          f"{args.dtype}{compiled}, {machine(args)}. Memory: {mem_kind}.\n")
    print("| seq len | relative tok/s | absolute tok/s | rel/abs speed "
          "| relative peak MiB | absolute peak MiB | rel/abs memory |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in seq_lens:
        rel, ab = results[("relative", n)], results[("absolute", n)]
        print(f"| {n} | {fmt(rel, 'tokens_per_s', ',.0f')} | {fmt(ab, 'tokens_per_s', ',.0f')} "
              f"| {ratio(rel, ab, 'tokens_per_s')} | {fmt(rel, 'peak_mib', '.0f')} "
              f"| {fmt(ab, 'peak_mib', '.0f')} | {ratio(rel, ab, 'peak_mib')} |")


if __name__ == "__main__":
    main()
