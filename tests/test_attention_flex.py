"""Tests for musicgpt.attention.flex and the kernel choice: FlexAttention relative attention.

On CPU, FlexAttention runs its unfused reference (the fused kernels are CUDA-only for training);
the CUDA tests at the end check the compiled kernels on a GPU.
"""

import pytest
import torch
from conftest import make_model as _make_model

from musicgpt.attention import attend, choose_kernel, flex, relative_logits
from musicgpt.attention.flex import causal_block_mask, relative_flex_attention
from musicgpt.errors import MusicGPTError

# On CPU the unfused FlexAttention is what these tests want; its performance warning is noise.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
needs_flex = pytest.mark.skipif(flex.flex_attention is None,
                                reason="FlexAttention needs torch >= 2.5")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="fused FlexAttention training kernels and CUDA graphs "
                                       "need a CUDA device")
R = 48  # max relative distance in these tests: shorter than most sequences, so clipping is hit


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """FlexAttention refuses backward on CPU at its input check, but its unfused implementation
    differentiates the same score_mod joint graph the CUDA backward kernel is generated from,
    including the captured R; lifting the check lets the CPU tests verify those gradients."""
    import torch.nn.attention.flex_attention as flex_module

    if not hasattr(flex_module, "_validate_device"):
        pytest.skip("this torch has no FlexAttention device check to lift for CPU backward")
    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)


def make_model(**overrides):
    """The shared test model (conftest) with max_rel_dist = R."""
    return _make_model(**{"max_rel_dist": R, **overrides})


def tokens(batch=2, length=150, seed=1) -> torch.Tensor:
    return torch.randint(0, 390, (batch, length), generator=torch.Generator().manual_seed(seed))


def skew_reference(q, k, v, rel_emb, window=None):
    """The eager path of model.py: skewed relative logits as a float mask for SDPA."""
    T = q.size(-2)
    dist = torch.arange(T, device=q.device)[:, None] - torch.arange(T, device=q.device)[None, :]
    mask = (dist >= 0) & (dist < window) if window else dist >= 0
    bias = relative_logits(q * q.size(-1) ** -0.5, rel_emb)
    return attend(q, k, v, mask, bias, False, 0.0, False)[0]


def random_qkv(T, dtype=torch.float64, device="cpu", H=4, D=16):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, H, T, D, generator=g, dtype=dtype) for _ in range(3))
    rel = torch.randn(H, R, D, generator=g, dtype=dtype)
    return [t.to(device).requires_grad_() for t in (q, k, v, rel)]


def grads(out, inputs):
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device)
    return torch.autograd.grad((out.flatten() * weights).sum(), inputs)


# ----------------------------------------------------------------------------- the flex kernel

@needs_flex
@pytest.mark.parametrize("T, window", [(1, None), (40, None), (130, None), (200, 64), (200, 7)])
def test_flex_matches_skew_reference_with_gradients(cpu_flex_backward, T, window):
    q, k, v, rel = random_qkv(T)  # T 130, 200 pass R = 48 and the 128-token block size
    want = skew_reference(q, k, v, rel, window)
    got = relative_flex_attention(q, k, v, rel, causal_block_mask(T, window, q.device))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    got_grads = grads(got, (q, k, v, rel))
    for name, g_got, g_want in zip("qkvE", got_grads, grads(want, (q, k, v, rel))):
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-10, msg=f"grad wrt {name}")
    assert got_grads[-1].abs().sum() > 0  # E_r really gets a gradient through the captured R


@needs_flex
def test_compiled_flex_forward_on_cpu():
    # The inductor CPU kernel (forward only: FlexAttention has no CPU backward). One shape keeps
    # the compile, the cost here, to some 20-40 s on a small machine.
    q, k, v, rel = (t.detach().float() for t in random_qkv(150))
    with torch.no_grad():
        want = skew_reference(q, k, v, rel, 64)
        got = relative_flex_attention(q, k, v, rel, causal_block_mask(150, 64, q.device),
                                      compiled=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- the model hook

@needs_flex
@pytest.mark.parametrize("window", [None, 64])
def test_model_with_flex_forced_matches_default_path(cpu_flex_backward, window):
    model = make_model()
    idx = tokens()  # 150 tokens > R
    results = []
    for impl in ("eager", "flex"):
        model.attn_impl = impl
        model.zero_grad()
        logits, loss = model(idx, idx.roll(-1, 1), attn_window=window)
        loss.backward()
        results.append((logits, loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l_eager, loss_eager, g_eager), (l_flex, loss_flex, g_flex) = results
    torch.testing.assert_close(l_flex, l_eager, rtol=0, atol=2e-5)
    torch.testing.assert_close(loss_flex, loss_eager, rtol=0, atol=1e-6)
    for name, g in g_eager.items():
        torch.testing.assert_close(g_flex[name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert all(g_flex[f"blocks.{i}.attn.rel_emb"].abs().sum() > 0 for i in range(2))


def spy_on_flex(monkeypatch) -> list:
    """Record every call the model makes to the fused path."""
    calls, real = [], flex.relative_flex_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(flex, "relative_flex_attention", spy)
    return calls


def test_default_path_on_cpu_is_the_eager_skew(monkeypatch):
    calls = spy_on_flex(monkeypatch)
    model = make_model()
    assert model.attn_impl == "auto"
    model(tokens(length=20))
    assert calls == []


def test_auto_picks_flex_on_cuda_for_long_sequences_without_attention_dropout():
    cpu, cuda, long = torch.device("cpu"), torch.device("cuda"), flex.FLEX_MIN_LEN
    pick = choose_kernel
    assert pick("auto", cpu, False, long) == "eager"
    assert pick("auto", cuda, True, long) == "eager"
    assert pick("auto", cuda, False, long - 1) == "eager"  # the eager skew measured faster there
    assert pick("eager", cuda, False, long) == "eager"
    if flex.flex_attention is not None:
        assert pick("auto", cuda, False, long) == "flex"
        assert pick("flex", cpu, True, 16) == "flex"
    with pytest.raises(MusicGPTError, match="one of auto, eager, flex, triton"):
        pick("cudnn", cpu, False, long)


# ----------------------------------------------------------------------------- CUDA only

@needs_cuda
@needs_flex
@pytest.mark.parametrize("T, window", [(40, None), (300, None), (300, 64)])
def test_fused_flex_kernel_matches_reference_on_cuda(T, window):
    q, k, v, rel = random_qkv(T, dtype=torch.float32, device="cuda")
    want = skew_reference(q, k, v, rel, window)
    got = relative_flex_attention(q, k, v, rel, causal_block_mask(T, window, q.device))
    torch.testing.assert_close(got, want, rtol=0, atol=2e-4)
    for name, g_got, g_want in zip("qkvE", grads(got, (q, k, v, rel)), grads(want, (q, k, v, rel))):
        torch.testing.assert_close(g_got, g_want, rtol=1e-3, atol=1e-3, msg=f"grad wrt {name}")


@needs_cuda
@needs_flex
def test_model_on_cuda_auto_uses_flex_and_matches_eager_in_bf16(monkeypatch):
    monkeypatch.setattr(flex, "FLEX_MIN_LEN", 256)  # auto's threshold, below 300 here
    model = make_model().cuda()
    idx = tokens(length=300).cuda()
    losses, calls = {}, spy_on_flex(monkeypatch)
    for impl in ("eager", "auto"):
        model.attn_impl = impl
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, losses[impl] = model(idx, idx.roll(-1, 1))
    assert len(calls) == model.config.n_layer  # auto took the fused path, eager did not
    torch.testing.assert_close(losses["auto"], losses["eager"], rtol=2e-2, atol=0)
