"""Attention kernels: our eager skew, our FlexAttention path, plain causal SDPA and a peer port.

The peer is gwinndr/MusicTransformer-Pytorch, imported from a checkout outside this repository
(`--peer-path`) and built at our configuration. Measured in one run, at several lengths:
forward+backward tokens/s and peak memory of one attention layer and of the whole model (training
mode `train`; `infer` = forward only, no grad), and sampling tokens/s for one generated piece.
Rows are ratios against plain causal SDPA without a relative term (the upper bound) measured in
the same run; sampling against the peer's own `generate`, which re-runs the whole prefix per token.

    python scripts/bench_attention.py --threads 1                     # CPU, preset tiny
    python scripts/bench_attention.py --device cuda --preset base --dtype bf16 \\
        --seq-lens 1024,2048,4096,8192 --peer-path scratch/peer

Peak memory is the growth over the state after the warm-up steps (compilation excluded): on CUDA
of torch.cuda.max_memory_allocated (one worker process per variant); on CPU of the peak RSS
(VmHWM, reset through /proc/self/clear_refs after returning freed heap with malloc_trim), in a
fresh process per measurement (Linux only). FlexAttention has no CPU backward, so on CPU the
fast path appears in the forward-only tables only (compiled by inductor's CPU backend).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import io
import json
import platform
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from musicgpt.attention import AttentionPlan, flex
from musicgpt.generate import generate as musicgpt_generate
from musicgpt.model import CausalSelfAttention, MusicGPT, preset
from musicgpt.sampling import SamplingConfig

VARIANTS = ("eager", "flex", "triton", "sdpa", "peer")
LABELS = {"eager": "eager skew + SDPA mask", "flex": "FlexAttention", "triton": "fused Triton",
          "sdpa": "plain causal SDPA", "peer": "peer (gwinndr)"}


def label(variant: str) -> str:
    """Column title; "tritonN" is the Triton kernel with N x N tiles (plain "triton": 64), and a
    "-1p" suffix runs its backward in one pass (dk, dv added atomically)."""
    if variant.startswith("triton") and variant != "triton":
        tiles, _, one_pass = variant[6:].partition("-")
        return ", ".join(["fused Triton"] + [f"{tiles}-tiles"] * bool(tiles)
                         + ["one-pass backward"] * bool(one_pass))
    return LABELS[variant]


def use_triton(variant: str) -> None:
    """Set the Triton kernel's tile size and backward mode for `variant` (model.py reads the
    module attributes at each call)."""
    from musicgpt.attention import triton_kernel

    tiles, _, one_pass = variant[6:].partition("-")
    triton_kernel.BLOCK = int(tiles) if tiles else 64
    triton_kernel.ONE_PASS_BACKWARD = one_pass == "1p"


SAMPLERS = ("cache", "graph", "peer")
SAMPLER_LABELS = {"cache": "ours, `generate` on the KV cache (decode_step)",
                  "graph": "ours, `generate` on the static cache (CUDA graph on CUDA)",
                  "peer": "peer generate (recompute)"}
PEER_EOS = 388  # the peer's TOKEN_END with our codec's 388 event tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seq-lens", default="256,512,1024")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compiles)")
    p.add_argument("--repeats", type=int, default=1, help="keep the fastest of this many runs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast for training, bf16 weights for sampling")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="dropout for every model (0: time the kernels, not the regulariser)")
    p.add_argument("--modes", help="comma list of train, infer (default: train on CUDA, "
                   "train,infer on CPU)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--scopes", default="layer,model", help="comma list of layer, model")
    p.add_argument("--sample-tokens", type=int, default=256, help="0 skips the sampling table")
    p.add_argument("--primer", type=int, default=16, help="primer tokens before sampling")
    p.add_argument("--peer-path", default="scratch/peer",
                   help="checkout of gwinndr/MusicTransformer-Pytorch, never vendored here (default: the "
                   "ignored folder scratch/peer)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per worker process")
    p.add_argument("--out", help="also write the markdown report here, updated after every "
                   "worker (a run cut short keeps what it measured)")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # JSON list of jobs, internal
    args = p.parse_args(argv)
    if args.modes is None:
        args.modes = "train" if args.device.startswith("cuda") else "train,infer"
    return args


# ----------------------------------------------------------------------------- the peer

def load_peer(path: str):
    """Import the peer's MusicTransformer and attention layer from its checkout.

    Its MIDI processor is an unvendored git submodule used only for four range constants; they
    are provided with our codec's values (128 on, 128 off, 32 velocity, 100 shift = vocab 390).
    """
    root = Path(path)
    if not (root / "model" / "music_transformer.py").is_file():
        raise FileNotFoundError(f"{path}: no gwinndr/MusicTransformer-Pytorch checkout")
    ranges = types.ModuleType("third_party.midi_processor.processor")
    ranges.RANGE_NOTE_ON, ranges.RANGE_NOTE_OFF, ranges.RANGE_VEL, ranges.RANGE_TIME_SHIFT = (
        128, 128, 32, 100)
    sys.modules["third_party.midi_processor.processor"] = ranges
    sys.path.insert(0, str(root))
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a warning without CUDA
        from model.music_transformer import MusicTransformer
        from model.rpr import MultiheadAttentionRPR
        from utilities import device as peer_device
    return MusicTransformer, MultiheadAttentionRPR, peer_device


def build_peer(args, cfg, max_len: int, device: torch.device):
    """The peer at our sizes. Its relative table doubles as its maximum length and cannot clip,
    so it gets max(max_rel_dist, longest sequence) rows; its E_r is shared by the heads."""
    MusicTransformer, _, peer_device = load_peer(args.peer_path)
    peer_device.use_cuda(device.type == "cuda")
    model = MusicTransformer(n_layers=cfg.n_layer, num_heads=cfg.n_head, d_model=cfg.n_embd,
                             dim_feedforward=cfg.mlp_dim, dropout=cfg.dropout,
                             max_sequence=max(cfg.max_rel_dist, max_len), rpr=True)
    # Since torch 2.0 nn.Transformer passes is_causal to its encoder, which the peer's torch-1.2
    # encoder does not accept; with its dummy decoder nn.Transformer was just the encoder.
    model.transformer.forward = lambda src, tgt, src_mask=None: model.transformer.encoder(
        src, mask=src_mask)
    return model.to(device)


def causal_float_mask(n: int, device: torch.device) -> torch.Tensor:
    """The peer's mask: -inf above the diagonal (nn.Transformer.generate_square_subsequent_mask)."""
    return torch.full((n, n), float("-inf"), device=device).triu_(1)


# ----------------------------------------------------------------------------- workloads

def model_config(args, variant: str, max_len: int):
    cfg = preset(args.preset, dropout=args.dropout)
    if variant == "sdpa":  # no relative term; learned positions need one row per token
        return preset(args.preset, dropout=args.dropout, attention="absolute",
                      context_len=max(cfg.context_len, max_len))
    return cfg


def use_compiled_flex_on_cpu() -> None:
    """Forward-only timing on CPU should see inductor's fused CPU kernel, not the unfused
    reference that the library uses off CUDA (AttentionPlan calls this module attribute)."""
    flex.relative_flex_attention = functools.partial(flex.relative_flex_attention, compiled=True)


def layer_workload(args, variant: str, n: int, device: torch.device, train: bool):
    """A function running one attention layer on [B, n, C] activations (and its backward)."""
    cfg = model_config(args, variant, n)
    B, C = args.batch_size, cfg.n_embd
    x = torch.randn(B, n, C, device=device, requires_grad=train)
    if variant == "peer":
        layer = load_peer(args.peer_path)[1](C, cfg.n_head, dropout=cfg.dropout,
                                             er_len=max(cfg.max_rel_dist, n)).to(device)
        mask, x_seq = causal_float_mask(n, device), x.transpose(0, 1)
        run = lambda: layer(x_seq, x_seq, x_seq, attn_mask=mask)[0]  # as its encoder calls it
    else:
        layer = CausalSelfAttention(cfg).to(device)
        if variant == "eager":
            plan = AttentionPlan.eager(torch.ones(n, n, dtype=torch.bool, device=device).tril_())
        elif variant == "flex":
            plan = AttentionPlan.flex(flex.causal_block_mask(n, None, device))
        elif variant.startswith("triton"):
            plan = AttentionPlan.triton()
            use_triton(variant)
        else:
            plan = AttentionPlan.eager(causal=True)
        run = lambda: layer(x, plan)[0]
    layer.train(train)
    return lambda: run().float().square().mean()


def model_workload(args, variant: str, n: int, device: torch.device, train: bool):
    """A function running the whole model on [B, n] tokens and returning the loss."""
    cfg = model_config(args, variant, n)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, PEER_EOS, (args.batch_size, n + 1), generator=g).to(device)
    x, y = data[:, :-1], data[:, 1:]
    if variant == "peer":
        model = build_peer(args, cfg, n, device)
        run = lambda: F.cross_entropy(model(x).float().reshape(-1, cfg.vocab_size), y.reshape(-1))
    else:
        model = MusicGPT(cfg).to(device)
        if variant.startswith("triton"):
            use_triton(variant)
            model.attn_impl = "triton"
        elif variant != "sdpa":
            model.attn_impl = variant
        run = lambda: model(x, y).loss
    model.train(train)
    return run


def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def start_peak(device: torch.device) -> float:
    """Start measuring peak memory from the current state (MiB in use now).

    CPU: hand freed heap pages back to the OS (so the timed steps must map their memory afresh,
    even after a warm-up step or a compile) and reset the kernel's peak-RSS mark (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_mib("VmRSS")


def peak_growth(device: torch.device, base: float) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20 - base
    return _proc_status_mib("VmHWM") - base


def timed(args, device: torch.device, step) -> dict:
    """Run `step` warmup + steps times: seconds per step and peak memory growth (MiB) of the
    timed steps over the state after warm-up (so compilation and parameter gradients, the same
    for every step, are not counted)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    base = start_peak(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / args.steps
    return {"seconds": seconds, "peak_mib": peak_growth(device, base)}


def unsupported(args, job: dict) -> str | None:
    """Why a measurement cannot run here, or None."""
    if job["variant"] == "flex" and job["mode"] == "train" and args.device == "cpu":
        return "n/a (no CPU backward)"
    if job["variant"].startswith("triton") and not args.device.startswith("cuda"):
        return "n/a (CUDA only)"
    return None


def run_kernel_job(args, job: dict, device: torch.device) -> dict:
    train = job["mode"] == "train"
    if job["variant"] == "flex" and device.type == "cpu":
        use_compiled_flex_on_cpu()
    build = layer_workload if job["scope"] == "layer" else model_workload
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    with torch.set_grad_enabled(train):
        loss_fn = build(args, job["variant"], job["n"], device, train)

        def step():
            with autocast:
                loss = loss_fn()
            if train:
                loss.backward()

        r = timed(args, device, step)
    r["tokens_per_s"] = args.batch_size * job["n"] / r["seconds"]
    return r


def sample_job(args, job: dict, device: torch.device) -> dict:
    """Generate args.sample_tokens tokens after a random primer, one row, multinomial sampling."""
    n, P = args.sample_tokens, args.primer
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = preset(args.preset, dropout=0.0, context_len=max(preset(args.preset).context_len, n + P))
    primer = torch.randint(0, PEER_EOS, (P,), generator=torch.Generator().manual_seed(0)).to(device)
    torch.manual_seed(0)
    if job["variant"] == "peer":
        peer = build_peer(args, cfg, n + P, device).to(dtype).eval()
        # Its Categorical would check that bf16 probabilities sum to 1 within 1e-6 (they do not)
        # and sync the host each token to do so; skipping the check only helps the peer.
        torch.distributions.Distribution.set_default_validate_args(False)

        def generate(count):
            with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
                peer.generate(primer, target_seq_length=P + count)
    else:
        # The product path, sampling from the full distribution over the 388 events as the
        # peer does (no top-p; PAD and EOS never drawn); "graph" is what CUDA runs by default.
        model = MusicGPT(cfg).to(device, dtype).eval()
        plain = SamplingConfig(top_p=1.0)

        def generate(count):
            musicgpt_generate(model, primer, max_new_tokens=count, sampling=plain, ban_eos=True,
                              static_cache=job["variant"] == "graph")

    generate(4)  # warm-up (kernels, cuBLAS handles)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate(n)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens_per_s": n / seconds}


def run_worker(args: argparse.Namespace) -> None:
    """Run a list of jobs in this process, printing one JSON line per job."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for job in json.loads(args.worker):
        try:
            r = (sample_job if job["mode"] == "sample" else run_kernel_job)(args, job, device)
        except torch.OutOfMemoryError:
            r = {"error": "OOM"}
        except FileNotFoundError as e:
            r = {"error": "peer not found"}
            print(e, file=sys.stderr)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps({"job": job, "result": r}), flush=True)


# ----------------------------------------------------------------------------- driver

def spawn(args: argparse.Namespace, jobs: list[dict]) -> list[dict]:
    """Run jobs in one fresh worker process; jobs it did not finish get its last error line."""
    argv = [a for a in sys.argv[1:]] + ["--worker", json.dumps(jobs)]
    try:
        proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True,
                              timeout=args.timeout)
        out, err = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        out, err = (e.stdout or b"").decode(), "timeout"
    done = [json.loads(line) for line in out.splitlines() if line.startswith('{"job"')]
    last = (err.strip().splitlines() or ["worker died"])[-1][:60]
    missing = [{"job": job, "result": {"error": last}} for job in jobs[len(done):]]
    return done + missing


def plan_jobs(args: argparse.Namespace) -> list[list[dict]]:
    """Group jobs into worker processes: on CPU one per measurement (fresh peak RSS), on CUDA
    one per variant (peak memory resets in-process; compiled kernels are reused across lengths)."""
    lens = [int(s) for s in args.seq_lens.split(",")]
    variants = args.variants.split(",")
    groups: dict[str, list[dict]] = {}
    for mode in args.modes.split(","):
        for scope in args.scopes.split(","):
            for v in variants:
                for n in lens:
                    job = dict(mode=mode, scope=scope, variant=v, n=n)
                    if not unsupported(args, job):
                        groups.setdefault(v, []).append(job)
    if args.sample_tokens:
        for v in SAMPLERS:
            if v != "peer" or "peer" in variants:
                groups.setdefault(f"sample-{v}", []).append(dict(mode="sample", variant=v))
    # The baseline and the fast path first, the eager reference (slowest, most likely to run
    # out of memory) last, so a run cut short still has ratios and the peer comparison.
    order = ["sdpa", "triton", "flex"] + [f"sample-{v}" for v in SAMPLERS] + ["peer", "eager"]
    rank = lambda job: order.index("triton" if job["variant"].startswith("triton")
                                   else job["variant"] if job["mode"] != "sample"
                                   else f"sample-{job['variant']}")
    batches = sorted(groups.values(), key=lambda b: rank(b[0]))
    if not args.device.startswith("cuda"):
        # One job per process, each cell's variants back to back: on a shared machine the
        # load then changes little between a measurement and its baseline.
        jobs = [job for batch in batches for job in batch]
        batches = [[job] for job in sorted(jobs, key=lambda j: (
            j["mode"] == "sample", j["mode"], j.get("scope", ""), j.get("n", 0), rank(j)))]
    return [b for _ in range(args.repeats) for b in batches]


def key(job: dict) -> tuple:
    return tuple(sorted(job.items()))


def best_results(args) -> dict:
    best: dict[tuple, dict] = {}
    for batch in tqdm(plan_jobs(args), desc="worker processes"):
        for item in spawn(args, batch):
            k, r = key(item["job"]), item["result"]
            old = best.get(k)  # fastest of the repeats: the one least disturbed by other jobs
            if old is None or "error" in old or r.get("tokens_per_s", 0) > old["tokens_per_s"]:
                best[k] = r
        save(args, best)
    return best


def save(args, best: dict) -> None:
    if args.out:
        Path(args.out).write_text(report(args, best) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"job": dict(k), "result": r} for k, r in best.items()], indent=1))


def cell(r: dict, base: dict | None, field: str, spec: str) -> str:
    if "error" in r:
        return r["error"]
    text = format(r[field], spec)
    if base is not None and "error" not in base and base[field] > 0:
        text += f" ({r[field] / base[field]:.2f}x)"
    return text


def machine(args) -> str:
    if args.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    threads = args.threads or torch.get_num_threads()
    return f"{platform.machine()} CPU, {threads} thread(s), torch {torch.__version__}"


def report(args, best: dict) -> str:
    cfg = preset(args.preset)
    lens = [int(s) for s in args.seq_lens.split(",")]
    variants = args.variants.split(",")
    lines = [f"Preset `{args.preset}` ({cfg.n_layer} layers, {cfg.n_head} heads, width "
             f"{cfg.n_embd}, MLP {cfg.mlp_dim}, max_rel_dist {cfg.max_rel_dist}), dropout "
             f"{args.dropout}, batch {args.batch_size}, {args.dtype}, {args.steps} timed steps "
             f"after {args.warmup} warm-up, best of {args.repeats}; {machine(args)}. Memory: "
             + ("CUDA max_memory_allocated growth over the state after warm-up."
                if args.device.startswith("cuda") else "peak RSS (VmHWM) growth over the state "
                "after warm-up, fresh process per cell."), ""]
    titles = {"train": "forward + backward", "infer": "forward only (no grad)"}
    for mode in args.modes.split(","):
        for scope in args.scopes.split(","):
            what = "one attention layer" if scope == "layer" else "whole model"
            def get(v, n, mode=mode, scope=scope):
                job = dict(mode=mode, scope=scope, variant=v, n=n)
                return best.get(key(job), {"error": unsupported(args, job) or "not run"})
            for field, unit, spec in (("tokens_per_s", "tokens/s", ",.0f"),
                                      ("peak_mib", "peak MiB", ",.0f")):
                lines += [f"{titles[mode].capitalize()}, {what}, {unit} (x plain SDPA):", "",
                          "| L | " + " | ".join(label(v) for v in variants) + " |",
                          "|---:|" + "---:|" * len(variants)]
                for n in lens:
                    base = get("sdpa", n) if "sdpa" in variants else None
                    lines.append(f"| {n} | " + " | ".join(
                        cell(get(v, n), base, field, spec) for v in variants) + " |")
                lines.append("")
    if args.sample_tokens:
        samplers = [v for v in SAMPLERS if v != "peer" or "peer" in variants]
        peer = best.get(key(dict(mode="sample", variant="peer")))
        lines += [f"Sampling {args.sample_tokens} tokens after a {args.primer}-token primer, "
                  f"batch 1, {args.dtype} weights (x peer):", "",
                  "| sampler | tokens/s |", "|---|---:|"]
        for v in samplers:
            r = best.get(key(dict(mode="sample", variant=v)), {"error": "not run"})
            lines.append(f"| {SAMPLER_LABELS[v]} | {cell(r, peer, 'tokens_per_s', ',.1f')} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    preset(args.preset)  # fail fast on a bad name
    print("\n" + report(args, best_results(args)))


if __name__ == "__main__":
    main()
