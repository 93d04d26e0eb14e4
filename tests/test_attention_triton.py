"""The fused Triton relative-attention kernel against the eager skew: outputs and gradients.

On a machine without CUDA the kernels run under Triton's interpreter: TRITON_INTERPRET=1 is set
when this module is collected, before anything imports Triton (Triton reads it then; the rest of
the suite runs on CPU, where it changes nothing). Without Triton installed (as on CI) they skip.
"""

import functools
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import assert_compiles_to_the_same_step, make_model  # noqa: E402

from musicgpt.attention import attend, relative_logits  # noqa: E402
from musicgpt.errors import MusicGPTError  # noqa: E402

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed (pip install triton to run these tests under its CPU "
                "interpreter)", allow_module_level=True)


@pytest.fixture
def kernels():
    import musicgpt.attention.triton_kernel as module

    if not module.available():
        pytest.skip("this Triton has no tl.gather (needs >= 3.2)")
    if not CUDA and not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("Triton was imported before TRITON_INTERPRET could be set; run this file alone")
    if not CUDA and not _interpreter_runs_computed_loops():
        import numpy
        import triton

        pytest.skip(f"Triton {triton.__version__}'s CPU interpreter cannot run a loop whose bound is "
                    f"computed in the kernel under NumPy {numpy.__version__} (Triton 3.9 can)")
    return module


@functools.lru_cache(maxsize=1)
def _interpreter_runs_computed_loops() -> bool:
    """Whether this Triton's interpreter runs `for i in range(0, <computed value>)` (the kernels'
    far-tile loops); Triton 3.6's fails under NumPy 2 ('only 0-dimensional arrays ...')."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(X):
        pid = tl.program_id(0)
        total = 0.0
        for _ in range(0, tl.maximum(pid * 4 - 2, 0), 2):
            total += 1.0
        tl.store(X + pid, total)

    x = torch.zeros(3)
    try:
        probe[(3,)](x)
    except Exception:  # the interpreter's own error types differ between versions
        return False
    return x.tolist() == [0.0, 1.0, 3.0]


def skew_reference(q, k, v, rel_emb):
    T = q.size(-2)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril_()
    bias = relative_logits(q * q.size(-1) ** -0.5, rel_emb)
    return attend(q, k, v, causal, bias, False, 0.0, False)[0]


def assert_same_as_skew(got, want, wrt, names="qkvE"):
    """Outputs, and the gradients wrt `wrt` of a random weighting of them, equal the eager skew's."""
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    weights = torch.randn_like(got)
    g_got = torch.autograd.grad((got * weights).sum(), wrt)
    g_want = torch.autograd.grad((want * weights).sum(), wrt)
    for name, a, b in zip(names, g_got, g_want):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-5, msg=f"grad wrt {name}")


def inputs(T, R, dtype=torch.float32, H=2, D=16):
    g = torch.Generator().manual_seed(T * 31 + R)
    q, k, v = (torch.randn(2, H, T, D, generator=g, dtype=dtype) for _ in range(3))
    rel = torch.randn(H, R, D, generator=g, dtype=dtype)
    return [t.to(DEVICE).requires_grad_() for t in (q, k, v, rel)]


@pytest.mark.parametrize("one_pass", [False, True], ids=["two-pass-backward", "one-pass-backward"])
@pytest.mark.parametrize("T, R", [(16, 40), (45, 40), (80, 24)],
                         ids=["one-tile", "ragged-last-tile", "clipped-distances"])
def test_outputs_and_gradients_equal_the_eager_skew(kernels, monkeypatch, T, R, one_pass):
    monkeypatch.setattr(kernels, "ONE_PASS_BACKWARD", one_pass)
    q, k, v, rel = inputs(T, R)
    got = kernels.relative_triton_attention(q, k, v, rel, block=16)
    want = skew_reference(q, k, v, rel)
    assert_same_as_skew(got, want, (q, k, v, rel))


@pytest.mark.parametrize("one_pass", [False, True], ids=["two-pass-backward", "one-pass-backward"])
def test_the_gpu_tile_size_and_head_width(kernels, monkeypatch, one_pass):
    # Block 64 and D 64 as `base` runs on the GPU; 300 tokens past R = 128 give far tiles too.
    monkeypatch.setattr(kernels, "ONE_PASS_BACKWARD", one_pass)
    q, k, v, rel = inputs(300, 128, H=2, D=64)
    got = kernels.relative_triton_attention(q, k, v, rel, block=64)
    want = skew_reference(q, k, v, rel)
    assert_same_as_skew(got, want, (q, k, v, rel))


@pytest.mark.skipif(not CUDA, reason="bf16 tensor-core tiles at the GPU block size need CUDA")
@pytest.mark.parametrize("one_pass", [False, True], ids=["two-pass-backward", "one-pass-backward"])
def test_bf16_at_the_default_block_size_on_cuda(kernels, monkeypatch, one_pass):
    monkeypatch.setattr(kernels, "ONE_PASS_BACKWARD", one_pass)
    q, k, v, rel = inputs(300, 128, H=4, D=64)
    got = kernels.relative_triton_attention(*(t.bfloat16() for t in (q, k, v, rel)))
    want = skew_reference(q, k, v, rel)
    torch.testing.assert_close(got.float(), want, rtol=0, atol=3e-2)
    weights = torch.randn_like(want)
    g_got = torch.autograd.grad((got.float() * weights).sum(), (q, k, v, rel))
    g_want = torch.autograd.grad((want * weights).sum(), (q, k, v, rel))
    for name, a, b in zip("qkvE", g_got, g_want):
        scale = b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=0, atol=3e-2 * scale, msg=f"grad wrt {name}")


def test_model_with_the_triton_kernel_matches_the_default_path(kernels):
    model = make_model(max_rel_dist=24, n_embd=32, n_head=2)  # d_head 16: tl.dot's minimum
    idx = torch.randint(0, 390, (2, 50), generator=torch.Generator().manual_seed(3))
    model = model.to(DEVICE)
    idx = idx.to(DEVICE)
    losses, grads = {}, {}
    for impl in ("eager", "triton"):
        model.attn_impl = impl
        model.zero_grad()
        _, losses[impl] = model(idx, idx.roll(-1, 1))
        losses[impl].backward()
        grads[impl] = model.blocks[0].attn.rel_emb.grad.clone()
    torch.testing.assert_close(losses["triton"], losses["eager"], rtol=1e-5, atol=0)
    torch.testing.assert_close(grads["triton"], grads["eager"], rtol=1e-4, atol=1e-6)


def test_views_of_one_projection_are_read_in_place_and_the_output_is_token_major(kernels):
    # As the model calls it: q, k, v are strided views of one [B, T, 3, H, D] projection.
    B, T, H, D = 2, 45, 2, 16
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, T, 3, H, D, generator=g).to(DEVICE).requires_grad_()
    rel = torch.randn(H, 40, D, generator=g).to(DEVICE).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    got = kernels.relative_triton_attention(q, k, v, rel, block=16)
    assert got.transpose(1, 2).is_contiguous()  # the projection after it reads a view
    want = skew_reference(q, k, v, rel)
    assert_same_as_skew(got, want, (qkv, rel), ("qkv", "E"))


def test_the_kernel_keeps_what_flash_keeps_for_the_backward(kernels):
    # Its memory claim: q, k, v, the output, one log-sum-exp per row and E_r are all it saves;
    # no T x T scores and no [T, R] relative logits (what the eager skew and FlexAttention keep).
    q, k, v, rel = inputs(64, 96)
    saved = {}

    def pack(t):
        saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kernels.relative_triton_attention(q, k, v, rel, block=16)
    B, H, T, D = q.shape
    assert sum(saved.values()) == 4 * (4 * B * H * T * D + B * H * T + rel.numel())


def test_model_with_the_triton_kernel_compiles_in_one_graph(kernels):
    # The kernels are custom operators with fake (shape-only) versions: torch.compile keeps them
    # whole instead of tracing into Triton's launcher, which would break the graph.
    model = make_model(max_rel_dist=24, n_embd=32, n_head=2).to(DEVICE)
    model.attn_impl = "triton"
    idx = torch.randint(0, 390, (2, 50), generator=torch.Generator().manual_seed(4))
    assert_compiles_to_the_same_step(model, idx.to(DEVICE))


@pytest.mark.skipif(CUDA, reason="checks the CPU refusal")
def test_triton_on_cpu_without_the_interpreter_is_refused(kernels, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    model = make_model(n_embd=32, n_head=2)
    model.attn_impl = "triton"
    with pytest.raises(MusicGPTError, match="runs on CUDA"):
        model(torch.zeros(1, 8, dtype=torch.long))


def test_training_with_the_triton_kernel_and_resuming_keeps_it(kernels, midi_folder, tmp_path):
    from musicgpt import checkpoint
    from musicgpt.train import TrainConfig, train

    small = dict(preset="tiny", batch_size=2, seq_len=32, lr=3e-3, warmup=1, device=DEVICE,
                 eval_interval=2, eval_batches=1, data_dir=str(midi_folder))
    run = train(TrainConfig(out=str(tmp_path / "run"), max_steps=3, stop_at=2, attn_impl="triton",
                            **small), progress=False)
    resumed = train(TrainConfig(data_dir=str(midi_folder), resume=str(run)), progress=False)
    _, ckpt = checkpoint.load_checkpoint(resumed / "last.safetensors")
    assert ckpt.state["step"] == 3 and ckpt.state["train_config"]["attn_impl"] == "triton"
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses and all(math.isfinite(x) for x in losses)


def test_the_kernels_compile_for_an_h100_without_one(kernels):
    # The interpreter runs the kernels' arithmetic in numpy; this runs the real compiler (to
    # sm_90 machine code, with Triton's bundled ptxas), which the interpreter never touches.
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "compile_triton_kernels.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script), "--blocks", "64"], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "| 64 |" in line]
    assert len(rows) == 4  # forward, dq / dE_r, one-pass, dk / dv
