"""Tests for musicgpt.model: relative attention, causality, KV-cached decoding, configs."""

import pytest
import torch
from conftest import assert_compiles_to_the_same_step, make_model

from musicgpt.attention import AttentionPlan, relative_logits
from musicgpt.errors import MusicGPTError
from musicgpt.model import PRESETS, ModelConfig, MusicGPT, preset

N_TOKENS = 300


def tokens(batch=2, length=N_TOKENS, seed=1) -> torch.Tensor:
    return torch.randint(0, 390, (batch, length), generator=torch.Generator().manual_seed(seed))


def decode_in_chunks(model, idx, sizes, **cache_kw):
    cache = model.new_cache(idx.size(0), **cache_kw)
    out, t = [], 0
    for n in sizes:
        out.append(model.decode_step(idx[:, t:t + n], cache))
        t += n
    assert t == idx.size(1) and cache.length == t
    return torch.cat(out, dim=1)


UNEVEN = [1, 7, 50, 3, 100, 2, 1, 90, 46]  # sums to 300; chunks wider than a 64 window too


# ----------------------------------------------------------------------------- relative logits

@pytest.mark.parametrize("T", [1, 5, 16, 17, 40])
def test_skewed_relative_logits_match_naive_gather(T):
    H, R, D = 3, 16, 8
    g = torch.Generator().manual_seed(T)
    q = torch.randn(2, H, T, D, dtype=torch.float64, generator=g)
    rel = torch.randn(H, R, D, dtype=torch.float64, generator=g)
    got = relative_logits(q, rel)
    want = torch.zeros_like(got)
    for i in range(T):
        for j in range(i + 1):
            want[:, :, i, j] = (q[:, :, i] * rel[:, min(i - j, R - 1)]).sum(-1)  # clip rule
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    torch.testing.assert_close(got[..., causal], want[..., causal], rtol=0, atol=1e-12)


def test_relative_embeddings_matter_and_get_gradients():
    model = make_model()
    idx = tokens(length=80)
    logits, _ = model(idx)
    with torch.no_grad():
        saved = [b.attn.rel_emb.clone() for b in model.blocks]
        for b in model.blocks:
            b.attn.rel_emb.zero_()
        without, _ = model(idx)
        for b, s in zip(model.blocks, saved):
            b.attn.rel_emb.copy_(s)
    assert (logits - without).abs().max() > 0.1  # the tests below would notice a wrong bias
    _, loss = model(idx, idx)
    loss.backward()
    assert all(b.attn.rel_emb.grad.abs().sum() > 0 for b in model.blocks)


# ----------------------------------------------------------------------------- causality

@pytest.mark.parametrize("attention", ["relative", "absolute"])
def test_changing_a_token_leaves_earlier_logits_unchanged(attention):
    model = make_model(attention)
    idx = tokens(length=64)
    t = 40
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 390
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-3


def test_absolute_rejects_sequences_past_context():
    model = make_model("absolute", context_len=32)
    with pytest.raises(MusicGPTError, match="context of 32"):
        model(tokens(length=33))


# ----------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("sizes", [[1] * N_TOKENS, UNEVEN], ids=["token", "chunks"])
def test_decoding_matches_full_forward(sizes):
    model = make_model()  # max_rel_dist 48 < 300 tokens: the clip rule is exercised too
    idx = tokens()
    full, _ = model(idx)
    torch.testing.assert_close(decode_in_chunks(model, idx, sizes), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sizes", [[1] * N_TOKENS, UNEVEN], ids=["token", "chunks"])
def test_sliding_window_decoding_matches_windowed_forward(sizes):
    model = make_model()
    idx = tokens()
    full, _ = model(idx, attn_window=64)
    unwindowed, _ = model(idx)
    assert (full[:, 64:] - unwindowed[:, 64:]).abs().max() > 1e-3  # the window really bites
    torch.testing.assert_close(full[:, :64], unwindowed[:, :64], rtol=0, atol=1e-6)
    got = decode_in_chunks(model, idx, sizes, window=64)
    torch.testing.assert_close(got, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sizes", [[1] * N_TOKENS, UNEVEN], ids=["token", "chunks"])
def test_absolute_decoding_matches_full_forward(sizes):
    model = make_model("absolute", context_len=N_TOKENS)
    idx = tokens()
    full, _ = model(idx)
    torch.testing.assert_close(decode_in_chunks(model, idx, sizes), full, rtol=0, atol=1e-5)


def test_absolute_decoding_raises_past_context():
    model = make_model("absolute", context_len=16)
    cache = model.new_cache(1)
    model.decode_step(tokens(1, 16), cache)
    with pytest.raises(MusicGPTError, match="context of 16"):
        model.decode_step(tokens(1, 1), cache)


def test_cache_reorder_matches_reordered_batch():
    model = make_model()
    idx = tokens(batch=3, length=90)
    order = torch.tensor([2, 0, 0, 1])  # beams may also grow the batch
    cache = model.new_cache(3, window=32)
    model.decode_step(idx[:, :50], cache)
    cache.reorder(order)
    continued = idx[order, 50:]
    got = torch.cat([model.decode_step(continued[:, t:t + 1], cache) for t in range(40)], dim=1)
    want, _ = model(torch.cat([idx[order, :50], continued], dim=1), attn_window=32)
    torch.testing.assert_close(got, want[:, 50:], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- attention weights

@pytest.mark.parametrize("attention", ["relative", "absolute"])
def test_returned_attention_is_causal_and_does_not_change_the_output(attention):
    model = make_model(attention)
    idx = tokens(length=70)
    for window in (None, 20):
        plain, _ = model(idx, attn_window=window)
        logits, atts = model.forward_with_attention(idx, attn_window=window)
        torch.testing.assert_close(logits, plain, rtol=0, atol=1e-5)
        assert len(atts) == model.config.n_layer
        for w in atts:
            assert w.shape == (2, 4, 70, 70)
            assert w.triu(diagonal=1).abs().max() == 0
            if window:
                assert w.tril(diagonal=-window).abs().max() == 0
            torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 70), rtol=0, atol=1e-5)


def test_decode_attention_matches_full_forward_rows():
    model = make_model()
    idx = tokens(length=100)
    window = 32
    _, full = model.forward_with_attention(idx, attn_window=window)
    cache = model.new_cache(2, window=window)
    t = 0
    for n in (40, 1, 1, 25, 1, 32):
        logits, atts = model.decode_step_with_attention(idx[:, t:t + n], cache)
        t += n
        for w, ref in zip(atts, full):
            n_keys = w.size(-1)  # the key axis ends at the newest token
            torch.testing.assert_close(w, ref[:, :, t - n:t, t - n_keys:t], rtol=0, atol=1e-5)
            # rows sum to one over the cached keys: no key the full forward attends to is missing
            torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), rtol=0, atol=1e-5)
        assert logits.shape == (2, n, 390)


# ----------------------------------------------------------------------------- training

def test_tiny_model_overfits_a_fixed_phrase():
    # EOS, then a repeating phrase of codec-like ids: VELOCITY, NOTE_ON, TIME_SHIFT, NOTE_OFF...
    phrase = [370, 60, 64, 67, 265, 188, 192, 195, 370, 62, 65, 69, 280, 190, 193, 197]
    seq = torch.tensor([389] + (phrase * 8)[:128])[None]
    torch.manual_seed(0)
    model = MusicGPT(ModelConfig(n_layer=2, n_head=4, n_embd=64, mlp_dim=128, context_len=128,
                                 max_rel_dist=64, dropout=0.0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        _, loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


@pytest.mark.parametrize("attention", ["relative", "absolute"])
def test_whole_model_compiles_in_one_graph(attention):
    assert_compiles_to_the_same_step(make_model(attention=attention), tokens(length=70))


def test_loss_ignores_minus_100_targets():
    model = make_model()
    idx = tokens(length=20)
    targets = idx.clone()
    _, some = model(idx[:, :10], targets[:, :10])
    targets[:, 10:] = -100
    logits, masked = model(idx, targets)
    torch.testing.assert_close(masked, torch.nn.functional.cross_entropy(
        logits[:, :10].reshape(-1, 390), idx[:, :10].reshape(-1)))
    torch.testing.assert_close(masked, some)  # causal: the first 10 logits are the same


# ----------------------------------------------------------------------------- configs

def test_config_round_trip_and_d_head():
    cfg = preset("small", dropout=0.0, attention="absolute")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.d_head == 32 and cfg.dropout == 0.0


@pytest.mark.parametrize("change, message", [
    (dict(n_embd=100, n_head=8), "divisible"),
    (dict(attention="rotary"), "attention must be one of relative, absolute"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(context_len=-1), "context_len"),
    (dict(dropout=1.5), "dropout"),
    (dict(attn_dropout=-0.1), "attn_dropout must be in"),
    (dict(wibble=3), "unknown model config keys: wibble"),
])
def test_config_validation_errors_are_one_line(change, message):
    d = ModelConfig().to_dict()
    d.update(change)
    with pytest.raises(MusicGPTError, match=message) as err:
        ModelConfig.from_dict(d, source="run/config.json")
    assert str(err.value).startswith("run/config.json: ") and "\n" not in str(err.value)


def test_attention_dropout_is_its_own_knob():
    # Configs saved before attn_dropout existed drop attention weights at `dropout`, as before.
    old = ModelConfig.from_dict({k: v for k, v in ModelConfig(dropout=0.3).to_dict().items()
                                 if k != "attn_dropout"})
    assert old.attn_dropout == 0.3
    assert preset("base", attn_dropout=0.0).attn_dropout == 0.0
    assert preset("base", dropout=0.2).attn_dropout == 0.2  # unset: follows dropout
    torch.manual_seed(0)
    x = torch.randn(1, 16, 128)
    attn = MusicGPT(preset("tiny", n_layer=1, dropout=0.9, attn_dropout=0.0)).train().blocks[0].attn
    attn.resid_drop.p = 0.0  # only attention-weight dropout could make two calls differ
    plan = AttentionPlan.eager(torch.ones(16, 16, dtype=torch.bool).tril_())
    torch.testing.assert_close(attn(x, plan)[0], attn(x, plan)[0])
    attn.attn_dropout = 0.5  # the same layer with attention dropout: two calls now differ
    assert not torch.allclose(attn(x, plan)[0], attn(x, plan)[0])


def test_presets():
    assert set(PRESETS) == {"tiny", "small", "medium", "base"}
    base = preset("base")
    assert (base.n_layer, base.n_head, base.n_embd, base.mlp_dim) == (6, 8, 512, 2048)
    assert base.context_len == base.max_rel_dist == 2048 and base.attention == "relative"
    assert preset("tiny", n_layer=1).n_layer == 1 and PRESETS["tiny"]["n_layer"] == 3
    # medium is the largest whose fp16 weights ship under 50 MB (2 bytes a parameter)
    assert 2 * MusicGPT(preset("medium", vocab_size=400)).num_params() < 50e6
    with pytest.raises(MusicGPTError, match="tiny, small, medium, base"):
        preset("huge")
    with pytest.raises(MusicGPTError, match="divisible"):
        preset("tiny", n_head=5)


def test_num_params_counts_the_tied_embedding_once():
    model = MusicGPT(preset("tiny"))
    assert model.num_params() == sum(p.numel() for p in model.state_dict().values())
    rel = MusicGPT(preset("tiny", attention="absolute"))
    cfg = model.config
    assert model.num_params() - rel.num_params() == (
        cfg.n_layer * cfg.max_rel_dist * cfg.n_embd - cfg.context_len * cfg.n_embd)
