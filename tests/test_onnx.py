"""The ONNX Runtime backend: ring kernels against the model's own decode, the exported graphs against
the model, the same tokens for a seed on both backends, the export's cache, and no torch when sampling."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_model, make_piece

from musicgpt import backends, onnx_stepper
from musicgpt.checkpoint import save_checkpoint
from musicgpt.checkpoint_header import read_checkpoint_meta
from musicgpt.decode import NUCLEUS_GROUPS, TINY, Nucleus, decode, filter_logits, nucleus_for, softmax
from musicgpt.errors import MusicGPTError
from musicgpt.generate import beam_search, generate
from musicgpt.onnx_export import ChunkGraph, StepGraph, empty_ring, export_onnx, race_top_p
from musicgpt.sampling import SamplingConfig
from musicgpt.vocab import CodecConfig

EOS = CodecConfig().eos_id
needs_ort = pytest.mark.skipif(not onnx_stepper.available(),
                               reason="onnxruntime and onnx are not installed (pip install 'musicgpt[fast]')")
# Relative distances shorter than, equal to and longer than the ring: the three ways its
# per-distance logits are laid out.
WINDOWS = pytest.mark.parametrize("max_rel_dist", [6, 16, 40])


def _model(max_rel_dist=16, window=16, dtype=torch.float64):
    return make_model(context_len=window, max_rel_dist=max_rel_dist, std=0.3).to(dtype)


def _write(ring, new, pos, slots):
    """What the stepper does with a graph's new keys: position p goes to slot p % slots."""
    for i in range(0, len(ring), 2):
        for t in range(new[i].size(2)):
            ring[i][:, :, :, (pos + t) % slots] = new[i][:, :, t]
            ring[i + 1][:, :, (pos + t) % slots] = new[i + 1][:, :, t]


@WINDOWS
def test_ring_step_equals_the_models_decode_far_past_the_window(max_rel_dist):
    model, window = _model(max_rel_dist), 16
    seq = torch.randint(0, 390, (2, 70), generator=torch.Generator().manual_seed(0))
    want = model.decode_step(seq, model.new_cache(2))
    ring, step = [r.double() for r in empty_ring(model, 2, window)], StepGraph(model, window)
    with torch.no_grad():
        for p in range(seq.size(1)):
            logits, *new = step(seq[:, p:p + 1], torch.tensor(p), *ring)
            _write(ring, new, p, window - 1)
            torch.testing.assert_close(logits, want[:, p], rtol=0, atol=1e-10)


@WINDOWS
def test_ring_chunks_equal_the_models_decode_for_any_chunking(max_rel_dist):
    model, window = _model(max_rel_dist), 16
    seq = torch.randint(0, 390, (1, 70), generator=torch.Generator().manual_seed(1))
    want = model.decode_step(seq, model.new_cache(1))
    ring, chunk = [r.double() for r in empty_ring(model, 1, window)], ChunkGraph(model, window)
    pos = 0
    with torch.no_grad():
        for size in (1, 5, 15, 2, 15, 15, 10, 7):  # up to window - 1 tokens at a time
            logits, *new = chunk(seq[:, pos:pos + size], torch.tensor(pos), *ring)
            _write(ring, new, pos, window - 1)
            pos += size
            torch.testing.assert_close(logits, want[:, pos - 1], rtol=0, atol=1e-10)
    assert pos == seq.size(1)


@needs_ort
@pytest.mark.parametrize("prompt_len", [3, 40])  # through the step graph, through chunks
def test_exported_graphs_give_the_models_logits(tmp_path, monkeypatch, prompt_len):
    monkeypatch.setattr(onnx_stepper, "CHUNK", 6)
    model = _model(dtype=torch.float32)
    export_onnx(model, tmp_path, source="test")
    seq = torch.randint(0, 390, (1, 80), generator=torch.Generator().manual_seed(2))
    want = model.decode_step(seq, model.new_cache(1))[0].numpy()
    stepper = onnx_stepper.OnnxStepper(tmp_path)
    got = [stepper.start(seq[0, :prompt_len].numpy(), 3)]
    assert got[0].shape == (3, model.config.vocab_size)
    for p in range(prompt_len, 80):
        got.append(stepper.step(np.full(3, seq[0, p].item())))
    np.testing.assert_allclose(np.stack(got), np.broadcast_to(want[prompt_len - 1:, None], (81 - prompt_len, 3, 390)),
                               rtol=0, atol=1e-4)
    assert stepper.pos == min(prompt_len, stepper.reach) + 80 - prompt_len  # the prompt was cut to what matters


@needs_ort
def test_a_prompt_read_on_two_threads_fills_the_ring_bit_for_bit(tmp_path):
    # The prefill takes a second core, the steps do not: a seed's tokens must not depend on it.
    model = make_model(context_len=256, n_embd=128, mlp_dim=512, std=0.3)
    export_onnx(model, tmp_path, source="test")
    prompt = torch.randint(0, 390, (700,), generator=torch.Generator().manual_seed(3)).numpy()
    one, two = (onnx_stepper.OnnxStepper(tmp_path, prefill_threads=n) for n in (1, 2))
    logits = [one.start(prompt, 1), two.start(prompt, 1)]
    assert two.sessions["chunk.onnx"].get_session_options().intra_op_num_threads == 2
    assert np.array_equal(*logits)
    for mine, theirs in zip(one.ring, two.ring):
        assert np.array_equal(mine, theirs)


@needs_ort
@pytest.mark.parametrize("sampling, samples", [
    (SamplingConfig(), 1),  # these three draw inside sample.onnx
    (SamplingConfig(temperature=0.7, top_p=0.8), 1),
    (SamplingConfig(temperature=1.3, top_p=1.0), 1),
    (SamplingConfig(top_p=0.8, top_p_scope="token"), 1),
    (SamplingConfig(top_p=0.8, top_p_scope="pooled"), 1),
    (SamplingConfig(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3), 3),
    (SamplingConfig(typical_p=0.9, min_p=0.05, top_p=1.0), 2),
    (SamplingConfig(greedy=True, repetition_penalty=2.0), 1),
    (SamplingConfig(greedy=True), 1),  # one row, no filter, yet not a draw: never the graph's
])
def test_a_seed_gives_the_same_tokens_on_both_backends(tmp_path, sampling, samples):
    model = _model(dtype=torch.float32)
    export_onnx(model, tmp_path, source="test")
    args = dict(max_new_tokens=60, sampling=sampling, num_samples=samples, seed=7, stop_at_eos=False,
                max_note_seconds=0.5, max_pause_seconds=0.3)
    with_torch = generate(model, [EOS, 60, 300], **args)
    stepper = onnx_stepper.OnnxStepper(tmp_path)
    with_onnx = decode(stepper, [EOS, 60, 300], vocab_size=390, **args)
    assert [t.tolist() for t in with_onnx] == [t.tolist() for t in with_torch]
    assert len(with_torch[0]) == 60  # far past the 16-token window
    in_graph = samples == 1 and not sampling.greedy and sampling.top_k == 0 and sampling.typical_p == 1.0
    assert ("sample.onnx" in stepper.sessions) == in_graph


@needs_ort
def test_beam_search_reorders_the_onnx_rows_like_the_kv_cache(tmp_path):
    model = _model(dtype=torch.float32)
    export_onnx(model, tmp_path, source="test")
    args = dict(max_new_tokens=40, sampling=SamplingConfig(num_beams=4), max_seconds=2.0)
    want = beam_search(model, [EOS, 64], **args)
    got = decode(onnx_stepper.OnnxStepper(tmp_path), [EOS, 64], vocab_size=390, beam=True, **args)[0]
    assert got.tolist() == want.tolist()


def _checkpoint(tmp_path, seed=0):
    model = make_model(context_len=32, max_rel_dist=32, std=0.3)
    if seed:
        with torch.no_grad():
            model.wte.weight.add_(seed)
    return save_checkpoint(tmp_path / "run" / "best", model, CodecConfig())


@needs_ort
def test_the_export_is_cached_by_digest_and_redone_when_the_checkpoint_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSICGPT_CACHE", str(tmp_path / "cache"))
    path = _checkpoint(tmp_path)
    ckpt = read_checkpoint_meta(path)
    folder = backends.onnx_export_for(path, ckpt)
    assert folder.parent == backends.onnx_cache_dir() and (folder / "step.onnx").is_file()
    assert not list(path.parent.glob("*onnx*"))  # nothing is written, or trusted, beside the checkpoint
    exports = []
    monkeypatch.setattr("musicgpt.onnx_export.export_onnx", lambda *a, **k: exports.append(a) or a[1])
    assert backends.onnx_export_for(path, ckpt) == folder and not exports  # found, not exported again
    path = _checkpoint(tmp_path, seed=1)  # new weights under the same name: a new export
    assert backends.onnx_export_for(path, ckpt) != folder and len(exports) == 1


@needs_ort
def test_an_export_that_cannot_be_written_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSICGPT_CACHE", str(tmp_path / "cache"))  # no export from another test
    path = _checkpoint(tmp_path)

    def refuse(model, folder, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("musicgpt.onnx_export.export_onnx", refuse)
    with pytest.raises(MusicGPTError, match="cannot write the ONNX export.*--backend torch"):
        backends.onnx_export_for(path, read_checkpoint_meta(path))


@needs_ort
def test_a_damaged_export_fails_in_one_line(tmp_path):
    export_onnx(_model(dtype=torch.float32), tmp_path, source="test")
    (tmp_path / "step.onnx").write_bytes(b"not a graph")
    with pytest.raises(MusicGPTError, match=r"step.onnx: cannot load this ONNX export .*delete"):
        onnx_stepper.OnnxStepper(tmp_path).start(np.array([EOS]), 1)


def test_backend_choice_says_why_onnx_cannot_run(monkeypatch):
    ckpt = read_checkpoint_meta("default")
    with pytest.raises(MusicGPTError, match="--backend onnx: it runs on the CPU"):
        backends.choose_backend("onnx", "cuda", ckpt)
    assert backends.choose_backend("torch", "cpu", ckpt) == "torch"
    assert backends.choose_backend("auto", "cpu", None) == "torch"  # unreadable: torch names the problem
    monkeypatch.setattr(backends, "available", lambda: False)
    assert backends.choose_backend("auto", "cpu", ckpt) == "torch"
    with pytest.raises(MusicGPTError, match=r"pip install 'musicgpt\[fast\]'"):
        backends.choose_backend("onnx", "cpu", ckpt)


@needs_ort
def test_sampling_with_onnx_never_imports_torch(tmp_path):
    path = _checkpoint(tmp_path)
    backends.onnx_export_for(path, read_checkpoint_meta(path))  # exported once, with torch
    primer = make_piece(tmp_path / "primer.mid", seconds=4.0)
    code = ("import sys; from musicgpt.cli import main; "
            f"rc = main(['sample', '--checkpoint', {str(path)!r}, '--primer', {str(primer)!r}, "
            f"'--seconds', '2', '--seed', '1', '--out', {str(tmp_path / 'out')!r}]); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "out").glob("*.mid"))) == 1


PROBS = np.array([0.5, 0.25, 0.15, 0.1])


@pytest.mark.parametrize("temperature, top_p, groups, pooled, probs", [
    (1.0, float("inf"), [[1, 1, 1, 1]], [], PROBS),
    (1.0, 0.7, [[1, 1, 1, 1]], [], np.array([2 / 3, 1 / 3, 0, 0])),  # 0.5 + 0.25 reach 0.7
    (2.0, float("inf"), [[1, 1, 1, 1]], [], np.sqrt(PROBS) / np.sqrt(PROBS).sum()),
    (1.0, 0.7, [[1, 1, 1, 1]], [1, 2], np.array([0.5, 0.25, 0.15, 0]) / 0.9),  # 0.5 + the pool's 0.4 reach it
    (1.0, 0.45, [[1, 1, 1, 1]], [1, 2], np.array([1.0, 0, 0, 0])),
    # By kind: {0, 1} and {2} each keep their mass, token 3 is in no group and never cut.
    (1.0, 0.6, [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], [], np.array([0.75, 0, 0.15, 0.1])),
])
def test_the_graphs_draw_follows_the_filtered_distribution(temperature, top_p, groups, pooled, probs):
    rows = 10_000
    logits = torch.log(torch.tensor(PROBS, dtype=torch.float32)).expand(rows, -1)
    noise = torch.from_numpy(np.random.default_rng(0).standard_exponential((rows, 4), dtype=np.float32) + TINY)
    pool = torch.zeros(1, 4)
    pool[0, pooled] = 1.0
    draws = race_top_p(logits, noise, torch.tensor(temperature), torch.tensor(top_p),
                       torch.tensor(groups, dtype=torch.float32), pool).numpy()
    counts = np.bincount(draws, minlength=4)
    expected = probs * rows
    assert counts[probs == 0].sum() == 0  # what the filter removed is never drawn
    assert ((counts - expected) ** 2 / np.where(expected > 0, expected, 1)).sum() < 16.3, counts  # p = 0.001


def test_the_graphs_draw_keeps_every_token_tied_with_the_last_one_kept():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.3]]))  # 0.4 + 0.3 reach 0.5 with either 0.3
    noise = torch.tensor([[1e9, 1.0, 2.0], [1e9, 2.0, 1.0]])  # the 0.4 never wins: which 0.3 does?
    assert race_top_p(logits.expand(2, -1), noise, torch.tensor(1.0), torch.tensor(0.5), torch.ones(1, 3),
                      torch.zeros(1, 3)).tolist() == [1, 2]


@needs_ort
def test_the_exported_draw_picks_what_the_models_logits_give(tmp_path):
    import onnxruntime as ort

    model = _model(dtype=torch.float32)
    export_onnx(model, tmp_path, source="test")
    ring = [torch.randn_like(r) for r in empty_ring(model, 1, 16)]
    names = onnx_stepper.ring_names(model.config.n_layer)
    feeds = {"tokens": np.array([[60]]), "pos": np.array(40), **{n: r.numpy() for n, r in zip(names, ring)}}
    with torch.no_grad():
        logits = StepGraph(model, 16)(torch.tensor([[60]]), torch.tensor(40), *ring)[0]
    mask = np.zeros((1, 390), np.float32)
    mask[0, 300:] = -np.inf  # no time shifts, say
    session = ort.InferenceSession(str(tmp_path / "sample.onnx"), providers=["CPUExecutionProvider"])
    cfg = SamplingConfig(temperature=1.2, top_p=0.8)
    shifts = np.zeros(390, dtype=bool)
    shifts[256:356] = True
    everything = np.ones((NUCLEUS_GROUPS, 390), dtype=bool)
    everything[1:] = False
    nuclei = [Nucleus(everything, pooled) for pooled in (shifts, ~shifts & (np.arange(390) % 2 == 0),
                                                         np.zeros(390, dtype=bool))]
    for nucleus in nuclei + [nucleus_for("kind", CodecConfig(), 390)]:
        allowed = np.isfinite(filter_logits(logits.numpy() + mask, cfg, nucleus=nucleus))[0]
        rng, drawn = np.random.default_rng(1), []
        for _ in range(200):
            noise = rng.standard_exponential((1, 390), dtype=np.float32) + TINY
            draw = {"mask": mask, "noise": noise, "temperature": np.array(1.2, np.float32),
                    "top_p": np.array(0.8, np.float32), "groups": nucleus.groups.astype(np.float32),
                    "pooled": nucleus.pooled[None].astype(np.float32)}
            token = session.run(None, {**feeds, **draw})[0]
            probs = softmax(filter_logits(logits.numpy() + mask, cfg, nucleus=nucleus))
            assert token.tolist() == (probs / noise).argmax(-1).tolist()  # the numpy loop's own draw
            drawn.append(token[0])
        assert allowed[drawn].all() and len(set(drawn)) > 3
