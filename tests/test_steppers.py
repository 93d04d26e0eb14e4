"""Tests for musicgpt.steppers.GraphDecoder: the fixed-shape ring-cache step that CUDA graphs replay.

On CPU the same step runs eagerly (graph=False); the CUDA tests check graph replay on a GPU.
"""

import pytest
import torch
from conftest import make_model as _make_model

from musicgpt.errors import MusicGPTError
from musicgpt.steppers import GraphDecoder

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
R = 48  # max relative distance: shorter than most sequences here, so clipping is hit


def make_model(**overrides):
    return _make_model(**{"max_rel_dist": R, **overrides})


def tokens(batch=2, length=150, seed=1) -> torch.Tensor:
    return torch.randint(0, 390, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prompt_len, window", [(10, 64), (100, 64), (5, 512)],
                         ids=["short-prompt", "prompt-past-window", "window-past-everything"])
def test_fixed_shape_decode_step_matches_windowed_forward(prompt_len, window):
    model = make_model()  # graph=False on CPU: the same fixed-shape step, run eagerly
    idx = tokens(length=150)
    want, _ = model(idx, attn_window=window)
    decoder = GraphDecoder(model, batch_size=2, window=window, graph=False)
    got = [decoder.prefill(idx[:, :prompt_len])]
    got += [decoder.step(idx[:, t]) for t in range(prompt_len, 150)]
    torch.testing.assert_close(torch.stack(got, 1), want[:, prompt_len - 1:], rtol=0, atol=1e-5)


def test_graph_decoder_rejects_absolute_and_training_models():
    with pytest.raises(MusicGPTError, match="relative-attention"):
        GraphDecoder(make_model(attention="absolute"), graph=False)
    with pytest.raises(ValueError, match="eval mode"):
        GraphDecoder(make_model().train(), graph=False)




@needs_cuda
def test_cuda_graph_replay_matches_eager_steps():
    model = make_model().cuda()
    idx = tokens(length=120).cuda()
    runs = []
    for graph in (False, True):
        decoder = GraphDecoder(model, batch_size=2, window=64, graph=graph)
        out = [decoder.prefill(idx[:, :20])] + [decoder.step(idx[:, t]) for t in range(20, 120)]
        runs.append(torch.stack(out, 1))
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=1e-4)


@needs_cuda
def test_generate_on_cuda_replays_the_graph_and_matches_the_kv_cache(monkeypatch):
    from musicgpt.generate import SamplingConfig, generate

    model = make_model().cuda()
    replays = []
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay",
                        lambda self, _replay=torch.cuda.CUDAGraph.replay: replays.append(1) or _replay(self))
    runs = [generate(model, [389, 60], max_new_tokens=150, window=64, stop_at_eos=False,
                     sampling=SamplingConfig(greedy=True, repetition_penalty=2.0),
                     static_cache=static)[0].tolist() for static in (None, False)]
    assert len(replays) == 149  # auto took the graph: one replay per token after the first
    assert runs[0] == runs[1]
