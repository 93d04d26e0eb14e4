"""The keyboard state a `sounding_notes` model reads: its rules, the two implementations agreeing,
and every sampler (KV cache, fixed-shape ring, recompute, ONNX) feeding the model the same state."""

import tempfile

import numpy as np
import pytest
import torch
from conftest import make_model

from musicgpt import codec, onnx_stepper
from musicgpt.controls import Controls
from musicgpt.data import Piece
from musicgpt.decode import decode
from musicgpt.generate import beam_search, generate
from musicgpt.keyboard import MAX_AGE_S, Keyboard, key_table, moved_sounding, sounding_before
from musicgpt.sampling import SamplingConfig
from musicgpt.steppers import KeyboardFeed, receptive_field
from musicgpt.vocab import NOTE_OFF, NOTE_ON, TIME_SHIFT, CodecConfig
from musicgpt.windows import Augment, TokenWindowDataset

CONTROLS = Controls(CodecConfig(), fim=True, tags=("pop",))
PRE, SUF, MID = CONTROLS.fim_ids
EOS = CONTROLS.codec.eos_id


def wait(seconds: float) -> int:
    return TIME_SHIFT + round(seconds * 100) - 1


def play(tokens, controls=CONTROLS) -> np.ndarray:
    return Keyboard(key_table(controls)).play_sequence(np.array(tokens))


def sounding_model(**overrides):
    model = make_model(vocab_size=CONTROLS.vocab_size, sounding_notes=True, context_len=64, max_rel_dist=64,
                       **overrides)
    model.controls = CONTROLS
    model.keyboard.set_controls(CONTROLS, model.config.vocab_size)
    with torch.no_grad():  # large enough that a wrong state changes the tokens drawn
        model.keyboard.proj.weight.normal_(0.0, 0.5)
    return model


def test_keys_sound_from_their_note_on_to_their_note_off_and_age_with_time():
    notes = play([60, wait(0.5), 64, wait(1.0), NOTE_OFF + 60] + [wait(1.0)] * 9)
    down, age = notes[:, :128], notes[:, 128:] * MAX_AGE_S
    assert down[0, 60] == 1 and down[0].sum() == 1 and age[0, 60] == 0
    assert age[1, 60] == pytest.approx(0.5) and down[2, [60, 64]].tolist() == [1, 1]
    assert age[3].tolist()[60] == pytest.approx(1.5) and age[3, 64] == pytest.approx(1.0)
    assert down[4, 60] == 0 and age[4, 60] == 0 and down[4, 64] == 1
    assert age[10, 64] == pytest.approx(7.0) and age[-1, 64] == MAX_AGE_S  # 10 s old reads as the cap


def test_a_time_step_of_another_codec_is_read_in_its_own_seconds():
    slow = Controls(CodecConfig(step_ms=20))
    assert play([60, TIME_SHIFT + 49], slow)[1, 128 + 60] * MAX_AGE_S == pytest.approx(1.0)


def test_eos_lifts_every_key():
    notes = play([60, 64, EOS, 67])
    assert notes[2, :128].sum() == 0 and notes[3, :128].nonzero()[0].tolist() == [67]


def test_an_infilling_sequence_is_read_in_time_order():
    """The suffix starts with no key down; the middle goes on from the prefix's state and clock."""
    notes = play([PRE, 60, wait(1.0), SUF, wait(0.5), 72, MID, wait(0.25), 64])
    assert notes[4, :128].sum() == 0  # in the suffix, the prefix's key is unknown
    assert notes[5, :128].nonzero()[0].tolist() == [72]
    assert notes[6, :128].nonzero()[0].tolist() == [60]  # FIM_MIDDLE: back to the prefix
    assert notes[8, :128].nonzero()[0].tolist() == [60, 64]
    assert notes[8, 128 + 60] * MAX_AGE_S == pytest.approx(1.25)


def random_sequences(rng, n, length=70):
    pool = np.r_[np.arange(58, 66), NOTE_OFF + np.arange(58, 66), TIME_SHIFT + np.arange(0, 100, 9), 360, EOS]
    for trial in range(n):
        seq = rng.choice(pool, length)
        if trial % 2:  # a tagged infilling window, cut at two random places
            a, b = sorted(rng.choice(np.arange(2, length - 2), 2, replace=False))
            seq = np.r_[CONTROLS.tag_id("pop"), PRE, seq[:a], SUF, seq[b:], MID, seq[a:b]][:length]
        yield seq


def test_the_model_reads_whole_sequences_as_the_keyboard_follows_them_token_by_token():
    model = sounding_model()
    rng = np.random.default_rng(0)
    batch = np.stack(list(random_sequences(rng, 40)))
    read = model.keyboard.read(torch.as_tensor(batch)).numpy()
    for row, seq in zip(read, batch):
        np.testing.assert_allclose(row, play(seq), atol=1e-5)
    assert (read[:, :, 128:] > 0).any(-1).mean() > 0.5  # keys down, with ages: the comparison has teeth


def piece_like(rng, length):
    """Plain event tokens (no tags or FIM), EOS-framed pieces back to back, as windows are cut from."""
    pool = np.r_[np.arange(50, 70), NOTE_OFF + np.arange(50, 70), TIME_SHIFT + np.arange(0, 100, 7), 360]
    seq = rng.choice(pool, length)
    seq[rng.random(length) < 0.01] = EOS
    return seq


def test_the_state_before_a_window_is_what_the_keyboard_holds_after_its_prefix():
    rng = np.random.default_rng(2)
    for _ in range(30):
        tokens = piece_like(rng, 300)
        keyboard = Keyboard(key_table(CONTROLS))
        keyboard.play_sequence(tokens)
        np.testing.assert_allclose(sounding_before(tokens, CONTROLS.codec), keyboard.sounding()[0], atol=1e-6)
    assert sounding_before(np.array([60, wait(1.0), wait(1.0)]), CONTROLS.codec)[:, 60].tolist() == [1.0, 2.0]
    assert not sounding_before(np.array([60, EOS, wait(1.0)]), CONTROLS.codec).any()  # a new piece
    assert not sounding_before(np.zeros(0, np.int64), CONTROLS.codec).any()


def test_a_window_read_from_its_start_state_continues_its_prefix():
    """Torch and numpy both: a window given the state its prefix left reads as the prefix + window
    read together would, in left-to-right and infilling order."""
    model = sounding_model()
    rng = np.random.default_rng(3)
    prefixes = [piece_like(rng, 120) for _ in range(6)]
    windows = list(random_sequences(rng, 6))
    states = np.stack([sounding_before(p, CONTROLS.codec) for p in prefixes])
    assert states[:, 0].sum() >= 12  # keys down at the cut: the comparison has teeth
    read = model.keyboard.read(torch.as_tensor(np.stack(windows)), torch.as_tensor(states)).numpy()
    for row, prefix, window, state in zip(read, prefixes, windows, states):
        np.testing.assert_allclose(row, Keyboard(key_table(CONTROLS), sounding=state).play_sequence(window),
                                   atol=1e-5)
        if PRE not in window:  # the plain order: exactly the tail of reading prefix + window
            np.testing.assert_allclose(row, play(np.r_[prefix, window])[len(prefix):], atol=1e-5)
    untold = model.keyboard.read(torch.as_tensor(np.stack(windows))).numpy()
    assert np.abs(untold - read).max() > 0.1


def test_the_start_state_moves_with_a_transposed_and_stretched_window():
    rng = np.random.default_rng(4)
    for k in (-3, 2, 5):
        tokens = piece_like(rng, 200)
        tokens[tokens == EOS] = 360
        moved = sounding_before(codec.transpose(tokens, k, CONTROLS.codec), CONTROLS.codec)
        np.testing.assert_allclose(moved_sounding(sounding_before(tokens, CONTROLS.codec), k, 1.0), moved, atol=1e-6)
    high = sounding_before(np.array([NOTE_ON + 126, 60, wait(1.0)]), CONTROLS.codec)
    assert np.flatnonzero(moved_sounding(high, 3, 1.05)[0]).tolist() == [63]  # 129 is off the keyboard
    assert moved_sounding(high, 3, 1.05)[1, 63] == pytest.approx(1.05)


def test_every_note_off_in_a_training_window_lifts_a_key_that_is_down():
    """Cut from the middle of a piece, a window starts with notes sounding; given the state, none
    of its NOTE_OFFs is unexplained, transposed and stretched or not."""
    rng = np.random.default_rng(5)
    notes = [(int(rng.integers(40, 90)), float(rng.uniform(0, 60)), float(rng.uniform(0.1, 6.0))) for _ in range(400)]
    pitch, start, length = map(np.array, zip(*notes))
    midi = codec.piano_midi(pitch, start, start + length, np.full(len(pitch), 80))
    piece = Piece("p.mid", codec.encode(midi).astype(np.int16))
    table = key_table(Controls(CodecConfig()))
    for augment in (None, Augment()):
        windows = TokenWindowDataset([piece], 128, CodecConfig(), augment=augment, seed=1)
        unexplained = untold = 0
        for i in range(60):
            x, _, state = windows[i]
            told, blind = Keyboard(table, sounding=state.numpy()), Keyboard(table)
            for token in x.numpy():
                if table.action[token] == 2:  # LIFT
                    unexplained += not told.down[0, table.pitch[token]]
                    untold += not blind.down[0, table.pitch[token]]
                told.play(np.array([token]))
                blind.play(np.array([token]))
        assert unexplained == 0 and untold > 20, (augment, untold)


def test_the_input_starts_at_zero_so_a_trained_model_keeps_its_predictions():
    from musicgpt.train import rebuilt

    plain = make_model(vocab_size=CONTROLS.vocab_size)
    plain.controls = CONTROLS
    added = rebuilt(plain, {"sounding_notes": True}).eval()
    idx = torch.as_tensor(next(random_sequences(np.random.default_rng(1), 1)))[None]
    torch.testing.assert_close(added(idx).logits, plain(idx).logits, rtol=0, atol=0)
    with torch.no_grad():
        added.keyboard.proj.weight.normal_(0.0, 0.5)
    assert (added(idx).logits - plain(idx).logits).abs().max() > 0.1  # and it is an input


def test_cached_decoding_in_chunks_equals_the_whole_sequence():
    model = sounding_model()
    seq = list(random_sequences(np.random.default_rng(2), 2))[1]  # an infilling one
    idx = torch.as_tensor(seq)[None]
    notes = KeyboardFeed(model).start(seq, len(seq))
    cache = model.new_cache(1)
    parts = [model.decode_step(idx[:, a:b], cache, notes[:, a:b]) for a, b in ((0, 9), (9, 10), (10, 70))]
    want = model(idx, attn_window=cache.window).logits
    torch.testing.assert_close(torch.cat(parts, 1), want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="keyboard"):
        model.decode_step(idx[:, :1], model.new_cache(1))


INFILL_PROMPT = [PRE, 60, wait(0.2), 64, wait(0.3), NOTE_OFF + 60, SUF, wait(0.5), NOTE_OFF + 64, MID]
ARGS = dict(max_new_tokens=50, sampling=SamplingConfig(temperature=1.0), seed=3, stop_at_eos=False)


@pytest.mark.parametrize("samples", [1, 3])
def test_every_torch_sampler_feeds_the_same_keyboard(samples):
    """Within the window the recomputing reference reads the state from its whole sequence; the
    cached and fixed-shape steppers follow it token by token: the same tokens."""
    model = sounding_model()
    runs = [generate(model, INFILL_PROMPT, num_samples=samples, **ARGS, **kw)
            for kw in ({}, {"use_cache": False}, {"static_cache": True})]
    for run in runs[1:]:
        assert [r.tolist() for r in run] == [r.tolist() for r in runs[0]]


def test_a_key_struck_before_the_models_reach_still_sounds_for_every_sampler():
    """A prompt longer than the receptive field: the keys its dropped head left down are known to
    the cached, fixed-shape, recomputing and ONNX samplers alike, and they change what is drawn."""
    model = sounding_model()
    body = list(np.random.default_rng(6).choice([wait(0.1), 360, 62, NOTE_OFF + 62], 60))
    held, silent = [EOS, 48, 55, *body], [EOS, 360, 360, *body]  # the same length, two keys down or none
    args = {**ARGS, "window": 8, "num_samples": 2}
    assert receptive_field(model, 8) < len(body)
    runs = [generate(model, held, **args, **kw) for kw in ({}, {"use_cache": False}, {"static_cache": True})]
    if onnx_stepper.available():
        from musicgpt.onnx_export import export_onnx

        with tempfile.TemporaryDirectory() as folder:
            export_onnx(model, folder, window=8, source="test")
            runs.append(decode(onnx_stepper.OnnxStepper(folder), held,
                               vocab_size=model.config.vocab_size, **{k: v for k, v in args.items() if k != "window"}))
    for run in runs[1:]:
        assert [r.tolist() for r in run] == [r.tolist() for r in runs[0]]
    assert [r.tolist() for r in generate(model, silent, **args)] != [r.tolist() for r in runs[0]]


def test_beam_search_moves_each_rows_keyboard_with_its_beam():
    model = sounding_model()
    args = dict(max_new_tokens=30, sampling=SamplingConfig(num_beams=4, repetition_penalty=3.0), stop_at_eos=False)
    want = beam_search(model, INFILL_PROMPT, use_cache=False, **args)  # reads each beam's own tokens
    assert beam_search(model, INFILL_PROMPT, **args).tolist() == want.tolist()
    if onnx_stepper.available():
        from musicgpt.onnx_export import export_onnx

        with tempfile.TemporaryDirectory() as folder:
            export_onnx(model, folder, source="test")
            got = decode(onnx_stepper.OnnxStepper(folder), INFILL_PROMPT, vocab_size=model.config.vocab_size,
                         beam=True, **args)[0]
        assert got.tolist() == want.tolist()


@pytest.mark.skipif(not onnx_stepper.available(), reason="needs musicgpt[fast]")
@pytest.mark.parametrize("prompt, sampling, samples", [
    (INFILL_PROMPT, SamplingConfig(temperature=1.0), 2),  # rows.onnx; a short prompt read step by step
    (INFILL_PROMPT * 2, SamplingConfig(temperature=0.9, top_p=0.9), 1),  # chunk.onnx, then sample.onnx
])
def test_the_onnx_sampler_feeds_the_same_keyboard(tmp_path, prompt, sampling, samples):
    from musicgpt.onnx_export import export_onnx

    model = sounding_model()
    export_onnx(model, tmp_path, source="test")
    args = {**ARGS, "sampling": sampling, "num_samples": samples}
    want = generate(model, prompt, **args)
    got = decode(onnx_stepper.OnnxStepper(tmp_path), prompt, vocab_size=model.config.vocab_size, **args)
    assert [r.tolist() for r in got] == [r.tolist() for r in want]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_the_cuda_graph_replays_with_each_steps_keyboard():
    from musicgpt.steppers import GraphDecoder

    model = sounding_model().cuda()
    seq = list(random_sequences(np.random.default_rng(4), 2))[1]
    idx = torch.as_tensor(seq).cuda()[None]
    notes = KeyboardFeed(model).start(seq, len(seq))
    runs = []
    for graph in (False, True):
        decoder = GraphDecoder(model, batch_size=1, window=32, graph=graph)
        out = [decoder.prefill(idx[:, :10], notes[:, :10])]
        out += [decoder.step(idx[:, t], notes[:, t]) for t in range(10, idx.size(1))]
        runs.append(torch.stack(out, 1))
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=1e-4)
    want = model(idx, attn_window=32).logits[:, 9:]
    torch.testing.assert_close(runs[0], want, rtol=0, atol=1e-4)


@pytest.mark.skipif(not onnx_stepper.available(), reason="needs musicgpt[fast]")
def test_an_export_whose_vocabulary_is_damaged_fails_in_one_line(tmp_path):
    import json

    from musicgpt.errors import MusicGPTError
    from musicgpt.onnx_export import export_onnx

    export_onnx(sounding_model(), tmp_path, source="test")
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["keyboard"]["controls"] == CONTROLS.to_dict()
    meta["keyboard"]["codec"] = {"step_ms": "ten"}  # a codec setting no export writes
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(MusicGPTError, match="vocabulary is damaged; delete"):
        onnx_stepper.OnnxStepper(tmp_path)


# ----------------------------------------------------------------------------- sounding releases

def releasing_model():
    return sounding_model(sounding_releases=True)


def test_a_releasing_model_gives_no_chance_to_lifting_a_key_that_is_up():
    model, plain = releasing_model(), sounding_model()
    plain.load_state_dict(model.state_dict())
    seq = [EOS, 60, wait(0.2), 64, wait(0.1), NOTE_OFF + 60, wait(0.3)]
    probs = model(torch.as_tensor(seq)[None]).logits.softmax(-1)[0]
    offs = probs[:, NOTE_OFF:NOTE_OFF + 128]
    down = torch.as_tensor(play(seq)[:, :128]) > 0
    assert (offs[~down] < 1e-7).all() and (offs[down] > 1e-5).all()
    assert (offs[4] > 1e-5).nonzero().flatten().tolist() == [60, 64]
    # Elsewhere the logits are the plain model's: the rule only moves the releases of keys that are up.
    same = model(torch.as_tensor(seq)[None]).logits[0].clone()
    same[:, NOTE_OFF:NOTE_OFF + 128][~down] = 0
    want = plain(torch.as_tensor(seq)[None]).logits[0].clone()
    want[:, NOTE_OFF:NOTE_OFF + 128][~down] = 0
    torch.testing.assert_close(same, want)


def test_in_an_infilling_suffix_any_key_may_be_released():
    """The suffix's keys are unknown (it starts with none down): its NOTE_OFFs of keys struck in
    the middle must not be pushed to the floor, or training would learn from huge losses."""
    model, plain = releasing_model(), sounding_model()
    plain.load_state_dict(model.state_dict())
    seq = torch.as_tensor([PRE, 60, wait(0.2), SUF, wait(0.3), NOTE_OFF + 64, MID, wait(0.1), 64])[None]
    got, want = model(seq).logits[0], plain(seq).logits[0]
    torch.testing.assert_close(got[3:6], want[3:6])  # FIM_SUFFIX up to FIM_MIDDLE: as the plain model
    assert (got[6:8, NOTE_OFF + 64] - want[6:8, NOTE_OFF + 64]).max() < -19  # the middle, before 64 is struck
    torch.testing.assert_close(got[8, NOTE_OFF + 64], want[8, NOTE_OFF + 64])  # and after
    loss = model(seq[:, :-1], seq[:, 1:]).loss
    assert loss < 10


def test_every_sampler_gives_a_releasing_model_the_same_tokens(tmp_path):
    model = releasing_model()
    args = {**ARGS, "num_samples": 2, "max_new_tokens": 150, "release_sounding_only": False}  # the model alone
    runs = [generate(model, INFILL_PROMPT, **args, **kw) for kw in ({}, {"use_cache": False}, {"static_cache": True})]
    if onnx_stepper.available():
        from musicgpt.onnx_export import export_onnx

        export_onnx(model, tmp_path, source="test")
        runs.append(decode(onnx_stepper.OnnxStepper(tmp_path), INFILL_PROMPT, vocab_size=model.config.vocab_size,
                           **args))
    for run in runs[1:]:
        assert [r.tolist() for r in run] == [r.tolist() for r in runs[0]]
    releases = 0
    for row in runs[0]:
        keyboard = Keyboard(key_table(CONTROLS))
        keyboard.play_sequence(np.array(INFILL_PROMPT[:INFILL_PROMPT.index(SUF)]))  # the middle goes on from the prefix
        for token in row:
            if NOTE_OFF <= token < NOTE_OFF + 128:
                assert keyboard.down[0, token - NOTE_OFF]
                releases += 1
            keyboard.play(np.array([token]))
    assert releases >= 5
