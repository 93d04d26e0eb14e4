"""The sampler: logit filters by hand, cached decoding against full recompute, beams, seeds, stopping."""

import math

import numpy as np
import pytest
import torch

from musicgpt import codec
from musicgpt.decode import Nucleus, nucleus_for, softmax
from musicgpt.errors import MusicGPTError
from musicgpt.generate import SamplingConfig, beam_search, filter_logits, generate, penalize_repeats
from musicgpt.model import MusicGPT, preset
from musicgpt.vocab import NOTE_OFF, TIME_SHIFT, CodecConfig

EOS, PAD = CodecConfig().eos_id, CodecConfig().pad_id
OFF = dict(top_p=1.0, temperature=1.0)  # the defaults' top-p and temperature, switched off for filter tests


def _model(attention="relative", window=32, n_layer=2, seed=0):
    """A tiny float64 model with large random weights, so its predictions depend on the context."""
    torch.manual_seed(seed)
    model = MusicGPT(preset("tiny", n_layer=n_layer, n_embd=32, n_head=2, mlp_dim=64, context_len=window,
                            max_rel_dist=window, dropout=0.0, attention=attention)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def _kept(logits):
    return set(np.flatnonzero(np.isfinite(logits[0])).tolist())


def _from_probs(probs):
    return np.log(np.array([probs], dtype=np.float32))


# ----------------------------------------------------------------------------- filters

def test_top_k_keeps_the_k_best_and_every_tie_at_the_kth_value():
    logits = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    out = filter_logits(logits, SamplingConfig(top_k=5, **OFF))
    for row, kept in zip(logits, np.isfinite(out)):
        assert set(np.flatnonzero(kept).tolist()) == set(np.argsort(-row)[:5].tolist())
    assert np.array_equal(out[np.isfinite(out)], logits[np.isfinite(out)])  # survivors unchanged
    tied = np.array([[5.0, 3.0, 1.0, 3.0, 0.0]], dtype=np.float32)
    assert _kept(filter_logits(tied, SamplingConfig(top_k=2, **OFF))) == {0, 1, 3}
    assert _kept(filter_logits(tied, SamplingConfig(top_k=99, **OFF))) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("p, expected", [(0.45, {2}), (0.7, {2, 0}), (0.81, {2, 0, 3}), (0.99, {0, 1, 2, 3}),
                                         (1e-9, {2})])
def test_top_p_keeps_the_smallest_set_reaching_the_mass(p, expected):
    logits = _from_probs([0.3, 0.05, 0.5, 0.15])
    assert _kept(filter_logits(logits, SamplingConfig(top_p=p, temperature=1.0))) == expected


def _pooled(mask: np.ndarray) -> Nucleus:
    """One nucleus over every token, the tokens of `mask` ranked as one candidate."""
    return Nucleus(np.ones((1, len(mask)), dtype=bool), mask)


def test_top_p_weighs_the_pooled_tokens_as_one_candidate_kept_or_cut_whole():
    # A note at 0.3 and fourteen waits at 0.05 each: per token, a 0.48 nucleus keeps the note and
    # the four first waits; pooled, the waits (0.7 together) fill the nucleus and the note is cut.
    logits = _from_probs([0.3] + [0.05] * 14)
    pooled = _pooled(np.arange(15) > 0)
    assert _kept(filter_logits(logits, SamplingConfig(top_p=0.48, temperature=1.0))) == {0, 1, 2, 3, 4}
    assert _kept(filter_logits(logits, SamplingConfig(top_p=0.48, temperature=1.0), nucleus=pooled)) == set(
        range(1, 15))
    assert _kept(filter_logits(logits, SamplingConfig(top_p=0.8, temperature=1.0), nucleus=pooled)) == set(range(15))
    rare = _from_probs([0.9] + [0.1 / 14] * 14)  # all the waits together are still the rare 10 %
    assert _kept(filter_logits(rare, SamplingConfig(top_p=0.85, temperature=1.0), nucleus=pooled)) == {0}
    tie = _from_probs([0.5, 0.25, 0.125, 0.125])  # the pool ties the note at 0.25: ranked after it
    two = _pooled(np.array([False, False, True, True]))
    assert _kept(filter_logits(tie, SamplingConfig(top_p=0.6, temperature=1.0), nucleus=two)) == {0, 1}


def test_top_p_by_kind_cuts_within_each_group_and_keeps_each_groups_probability():
    # Three pitches (0.3, 0.06, 0.04), two velocities (0.1, 0.1) and waits (0.4 together), none
    # of them in a group. A 0.65 nucleus per group keeps the likely pitch with the pitches' whole
    # 0.4, ties the velocities (both kept) and never cuts a wait.
    logits = _from_probs([0.3, 0.06, 0.04, 0.1, 0.1, 0.2, 0.15, 0.05])
    groups = np.zeros((2, 8), dtype=bool)
    groups[0, :3] = groups[1, 3:5] = True
    kind = Nucleus(groups, np.zeros(8, dtype=bool))
    out = filter_logits(logits, SamplingConfig(top_p=0.65, temperature=1.0), nucleus=kind)
    assert np.allclose(softmax(out)[0], [0.4, 0, 0, 0.1, 0.1, 0.2, 0.15, 0.05])
    # One nucleus with the waits pooled ranks them first and cuts every pitch but the likeliest.
    pooled = np.zeros(8, dtype=bool)
    pooled[5:] = True
    assert _kept(filter_logits(logits, SamplingConfig(top_p=0.65, temperature=1.0), nucleus=_pooled(pooled))) == {
        0, 5, 6, 7}
    # A group the rules ban entirely stays banned, and the others are untouched by it.
    banned = logits.copy()
    banned[0, :3] = -np.inf
    out = filter_logits(banned, SamplingConfig(top_p=0.65, temperature=1.0), nucleus=kind)
    assert np.allclose(softmax(out)[0], np.array([0, 0, 0, 0.1, 0.1, 0.2, 0.15, 0.05]) / 0.6)


def test_top_p_by_kind_never_cuts_a_release_or_a_wait():
    # A likely pitch (0.6), two rare ones, two releases (0.08, 0.02) and a wait: a 0.5 nucleus by
    # kind keeps the likely pitch alone among the pitches, and the releases and the wait untouched.
    config = CodecConfig()
    probs = np.zeros(config.vocab_size)
    probs[[60, 64, 67]] = [0.6, 0.1, 0.1]
    probs[[NOTE_OFF + 55, NOTE_OFF + 57, TIME_SHIFT + 99]] = [0.08, 0.02, 0.1]
    kind = nucleus_for("kind", config, config.vocab_size)
    with np.errstate(divide="ignore"):
        logits = _from_probs(probs)
    out = softmax(filter_logits(logits, SamplingConfig(top_p=0.5, temperature=1.0), nucleus=kind))[0]
    assert np.allclose(out[[60, 64, 67, NOTE_OFF + 55, NOTE_OFF + 57, TIME_SHIFT + 99]], [0.8, 0, 0, 0.08, 0.02, 0.1])


def test_min_p_keeps_tokens_above_a_fraction_of_the_best():
    logits = _from_probs([0.05, 0.5, 0.15, 0.3])
    assert _kept(filter_logits(logits, SamplingConfig(min_p=0.25, **OFF))) == {1, 2, 3}  # p >= 0.125
    assert _kept(filter_logits(logits, SamplingConfig(min_p=0.5, **OFF))) == {1, 3}  # p >= 0.25
    assert _kept(filter_logits(logits, SamplingConfig(min_p=0.99, **OFF))) == {1}


@pytest.mark.parametrize("mass", [0.2, 0.45, 0.55, 0.65, 0.95])
def test_typical_p_follows_meister_et_al(mass):
    probs = [0.4, 0.3, 0.2, 0.1]
    # By hand: order tokens by |surprise - entropy| and keep the shortest prefix holding `mass`.
    entropy = -sum(p * math.log(p) for p in probs)
    order = sorted(range(4), key=lambda i: abs(-math.log(probs[i]) - entropy))
    expected, total = set(), 0.0
    for i in order:
        expected.add(i)
        total += probs[i]
        if total >= mass:
            break
    assert order == [1, 2, 0, 3]  # the likeliest token is not the most typical one
    assert _kept(filter_logits(_from_probs(probs), SamplingConfig(typical_p=mass, **OFF))) == expected


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([[2.0, -1.0, 0.5, 3.0]], dtype=np.float32)
    out = penalize_repeats(logits, np.array([[0, 1, 0]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert logits.tolist() == [[2.0, -1.0, 0.5, 3.0]]  # the input is left alone
    cfg = SamplingConfig(repetition_penalty=2.0, **OFF)
    assert filter_logits(logits, cfg, np.array([[0, 1]])).tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert filter_logits(logits, cfg).tolist() == logits.tolist()  # nothing generated: no penalty


def test_temperature_divides_and_filters_apply_in_order():
    logits = np.array([[3.0, 2.9, 0.0]], dtype=np.float32)
    assert np.array_equal(filter_logits(logits, SamplingConfig(**{**OFF, "temperature": 0.5})), logits * 2)
    # The penalty comes first: token 0 falls to 1.5, so top-1 then keeps token 1.
    cfg = SamplingConfig(repetition_penalty=2.0, top_k=1, **OFF)
    assert _kept(filter_logits(logits, cfg, np.array([[0]]))) == {1}
    # Temperature before top-p: flattening the distribution makes the nucleus larger.
    sharp = filter_logits(_from_probs([0.7, 0.2, 0.1]), SamplingConfig(top_p=0.75, temperature=0.5))
    flat = filter_logits(_from_probs([0.7, 0.2, 0.1]), SamplingConfig(top_p=0.75, temperature=3.0))
    assert _kept(sharp) == {0} and _kept(flat) == {0, 1}


@pytest.mark.parametrize("field, value, flag", [
    ("temperature", 0.0, "--temperature"), ("temperature", -1.0, "--temperature"),
    ("temperature", float("nan"), "--temperature"), ("top_k", -1, "--top-k"), ("top_k", 2.5, "--top-k"),
    ("top_p", 0.0, "--top-p"), ("top_p", 1.5, "--top-p"), ("typical_p", 0.0, "--typical-p"),
    ("typical_p", 1.01, "--typical-p"), ("min_p", -0.1, "--min-p"), ("min_p", 1.0, "--min-p"),
    ("repetition_penalty", 0.0, "--repetition-penalty"), ("num_beams", 0, "--beams"),
    ("length_penalty", float("inf"), "--length-penalty"),
])
def test_invalid_options_raise_one_line_naming_the_option(field, value, flag):
    with pytest.raises(MusicGPTError) as e:
        SamplingConfig(**{field: value}).validate()
    assert flag in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(MusicGPTError):
        generate(_model(), [EOS], max_new_tokens=2, sampling=SamplingConfig(**{field: value}))


def test_greedy_and_beams_together_are_refused():
    with pytest.raises(MusicGPTError, match="--greedy or --beams"):
        SamplingConfig(greedy=True, num_beams=3).validate()


# ----------------------------------------------------------------------------- cached decoding

def _reference_greedy(model, prompt, steps, window, penalty, absolute=False):
    """Greedy decoding that recomputes the whole sequence with forward(attn_window) every step.

    For an absolute model, the documented policy: once the context would pass its length, start
    again from the most recent half of it (at positions 0..). A NOTE_OFF may only release a key
    that sounds.
    """
    seq, start, sounding = list(prompt), 0, set()
    for _ in range(steps):
        if absolute and len(seq) - start > window:
            start = len(seq) - window // 2
        logits = model(torch.tensor([seq[start:]]), attn_window=window)[0][0, -1].clone()
        logits[PAD] = -math.inf
        logits[[NOTE_OFF + key for key in range(128) if key not in sounding]] = -math.inf
        for tok in set(seq[-window:]):  # CTRL penalty over what the model sees
            logits[tok] = logits[tok] / penalty if logits[tok] > 0 else logits[tok] * penalty
        token = int(logits.argmax())
        seq.append(token)
        if token < NOTE_OFF:
            sounding.add(token)
        elif token < NOTE_OFF + 128:
            sounding.discard(token - NOTE_OFF)
        elif token == EOS:
            sounding.clear()
    return seq[len(prompt):]


# static_cache=True: the CUDA path's fixed-shape ring cache (GraphDecoder), run eagerly on CPU.
STEPPERS = pytest.mark.parametrize("static_cache", [False, True], ids=["kv-cache", "static-cache"])


@STEPPERS
def test_cached_greedy_equals_full_recompute_far_past_the_window(static_cache):
    model, window = _model(window=32), 32
    cfg = SamplingConfig(greedy=True, repetition_penalty=3.0)  # the penalty keeps greedy from looping on one token
    got = generate(model, [EOS], max_new_tokens=100, sampling=cfg, stop_at_eos=False,
                   static_cache=static_cache)[0]
    with torch.no_grad():
        want = _reference_greedy(model, [EOS], 100, window, 3.0)
    assert got.tolist() == want
    assert len(set(want)) > 20


@STEPPERS
def test_cached_sampling_equals_recompute_token_for_token(static_cache):
    model = _model(window=32)
    cfg = SamplingConfig(temperature=0.9, top_p=0.9, top_k=50, repetition_penalty=1.2)
    args = dict(max_new_tokens=100, sampling=cfg, num_samples=3, seed=11, stop_at_eos=False)
    cached = generate(model, [EOS, 60, 300], static_cache=static_cache, **args)
    recomputed = generate(model, [EOS, 60, 300], use_cache=False, **args)
    assert [t.tolist() for t in cached] == [t.tolist() for t in recomputed]
    assert len({tuple(t.tolist()) for t in cached}) == 3  # a batch of three gives three sequences


@STEPPERS
def test_a_long_prompt_is_trimmed_to_the_receptive_field_exactly(static_cache):
    """A 300-token prompt through a 2-layer, window-16 model: only its last 31 tokens matter."""
    model, window = _model(window=16), 16
    prompt = torch.randint(0, 388, (300,)).tolist()
    got = generate(model, prompt, max_new_tokens=20, sampling=SamplingConfig(greedy=True), stop_at_eos=False,
                   static_cache=static_cache)[0]
    with torch.no_grad():
        want = _reference_greedy(model, prompt, 20, window, 1.0)
    assert got.tolist() == want


def test_absolute_model_reencodes_its_recent_context_when_the_cache_is_full():
    model = _model(attention="absolute", window=32)
    got = generate(model, [EOS], max_new_tokens=80, sampling=SamplingConfig(greedy=True, repetition_penalty=3.0),
                   stop_at_eos=False)[0]
    with torch.no_grad():
        want = _reference_greedy(model, [EOS], 80, 32, 3.0, absolute=True)
    assert got.tolist() == want


def test_generation_leaves_the_model_in_its_training_mode():
    model = _model().train()
    generate(model, [EOS], max_new_tokens=3)
    assert model.training


# ----------------------------------------------------------------------------- beams

def _log_prob(model, prompt, tokens):
    seq = torch.tensor([list(prompt) + tokens.tolist()])
    with torch.no_grad():
        logits = model(seq)[0][0].clone()
    logits[:, PAD] = -math.inf  # the sampler never emits padding
    logp = logits.log_softmax(-1)[len(prompt) - 1:-1]
    return logp.gather(1, seq[0, len(prompt):, None]).sum().item()


def test_beam_search_with_one_beam_is_greedy():
    for seed in range(3):
        model = _model(seed=seed)
        greedy = generate(model, [EOS, 64], max_new_tokens=40, sampling=SamplingConfig(greedy=True), max_seconds=3.0)[0]
        beam = beam_search(model, [EOS, 64], max_new_tokens=40, sampling=SamplingConfig(num_beams=1), max_seconds=3.0)
        assert beam.tolist() == greedy.tolist()


def test_beam_search_on_the_static_cache_reorders_its_rows_like_the_kv_cache():
    model = _model(seed=2, window=16)  # 60 tokens: the ring wraps around several times
    beams = [beam_search(model, [EOS, 64], max_new_tokens=60, sampling=SamplingConfig(num_beams=4),
                         stop_at_eos=False, static_cache=static) for static in (False, True)]
    assert beams[0].tolist() == beams[1].tolist() and len(beams[0]) == 60


def test_static_cache_needs_a_relative_model():
    with pytest.raises(MusicGPTError, match="static cache"):
        generate(_model(attention="absolute"), [EOS], max_new_tokens=3, static_cache=True)


def test_more_beams_find_a_likelier_sequence_than_greedy():
    model = _model(seed=1)
    greedy = generate(model, [EOS], max_new_tokens=30, sampling=SamplingConfig(greedy=True), stop_at_eos=False)[0]
    beams = generate(model, [EOS], max_new_tokens=30, sampling=SamplingConfig(num_beams=5), stop_at_eos=False)[0]
    assert len(beams) == len(greedy) == 30
    assert _log_prob(model, [EOS], beams) > _log_prob(model, [EOS], greedy) + 1e-6


def test_beam_search_refuses_several_samples():
    with pytest.raises(MusicGPTError, match="--num-samples 1"):
        generate(_model(), [EOS], max_new_tokens=3, sampling=SamplingConfig(num_beams=2), num_samples=2)


# ----------------------------------------------------------------------------- seeds and stopping

def test_same_seed_same_tokens_and_new_seed_new_tokens():
    model = _model()
    def run(seed):
        return [t.tolist() for t in generate(model, [EOS], max_new_tokens=50, num_samples=2, seed=seed)]

    assert run(3) == run(3)
    assert run(3) != run(4)


class _EOSHappy(MusicGPT):
    """A model that likes ending pieces: EOS gets a fixed boost at every step."""

    def decode_step(self, idx, cache, notes=None):
        logits = super().decode_step(idx, cache, notes)
        logits[..., EOS] += 2.0
        return logits


def test_eos_ends_its_row_while_the_others_go_on():
    model = _model()
    eos_happy = _EOSHappy(model.config).double().eval()
    eos_happy.load_state_dict(model.state_dict())
    args = dict(max_new_tokens=60, sampling=SamplingConfig(top_p=1.0), num_samples=8, seed=0)
    rows = [r.tolist() for r in generate(eos_happy, [EOS], **args)]
    full = [r.tolist() for r in generate(eos_happy, [EOS], stop_at_eos=False, **args)]
    lengths = [len(r) for r in rows]
    assert min(lengths) < 30 and max(lengths) == 60  # some rows ended early, one ran to the limit
    for row, unstopped in zip(rows, full):  # each row is cut at its own first EOS, the rest untouched
        assert row == (unstopped[:unstopped.index(EOS)] if EOS in unstopped else unstopped)
    # With EOS banned (what `musicgpt sample` does, since a length was asked for) every row runs on.
    banned = [r.tolist() for r in generate(eos_happy, [EOS], ban_eos=True, **args)]
    assert all(len(r) == 60 and EOS not in r for r in banned)


def test_max_seconds_stops_at_the_first_token_reaching_it():
    model = _model()
    cfg = CodecConfig()
    rows = generate(model, [EOS], max_new_tokens=400, num_samples=4, seed=2, max_seconds=2.0, stop_at_eos=False)
    for row in rows:
        t = row
        assert codec.duration_seconds(t, cfg) >= 2.0 - 1e-9
        assert codec.duration_seconds(t[:-1], cfg) < 2.0
        assert TIME_SHIFT <= t[-1] < cfg.velocity_offset
    assert len({len(r) for r in rows}) > 1


def test_no_padding_is_ever_generated():
    rows = generate(_model(), [EOS], max_new_tokens=200, num_samples=4, seed=5,
                    sampling=SamplingConfig(temperature=5.0, top_p=1.0), stop_at_eos=False)
    assert all(PAD not in r.tolist() for r in rows)
    assert np.unique(np.concatenate(rows)).size > 150  # it was sampling widely


def test_start_with_note_plays_before_any_pause():
    """From silence `sample` asks for a note first: no TIME_SHIFT precedes a row's first NOTE_ON."""
    model = _model()
    args = dict(max_new_tokens=40, sampling=SamplingConfig(top_p=1.0), num_samples=6, seed=3)
    free = [r.tolist() for r in generate(model, [EOS], **args)]
    waited = [r.tolist() for r in generate(model, [EOS], start_with_note=True, **args)]

    assert any(_pause_before_note(r) for r in free)  # the untrained model does pause first
    assert not any(_pause_before_note(r) for r in waited)
    beams = beam_search(model, [EOS], max_new_tokens=20, sampling=SamplingConfig(num_beams=3), start_with_note=True)
    assert not _pause_before_note(beams.tolist())


def _pause_before_note(row):
    first_note = next((i for i, t in enumerate(row) if t < 128), len(row))
    return any(256 <= t < 356 for t in row[:first_note])


def _longest_pause(row, steps_per_shift=lambda t: t - TIME_SHIFT + 1):
    """Most codec steps a row goes without a NOTE_ON (from its start, between notes, to its end)."""
    longest = quiet = 0
    for t in row:
        quiet = 0 if t < 128 else quiet + (steps_per_shift(t) if TIME_SHIFT <= t < TIME_SHIFT + 100 else 0)
        longest = max(longest, quiet)
    return longest


def test_max_pause_caps_the_time_between_notes():
    """A sampler stuck on TIME_SHIFTs writes a minute of silence; max_pause_seconds forbids any
    pause that would leave more than that without a new note, in sampling and in beam search."""
    model = _model()
    args = dict(max_new_tokens=120, sampling=SamplingConfig(top_p=1.0), num_samples=6, seed=5, ban_eos=True)
    free = [r.tolist() for r in generate(model, [EOS], **args)]
    capped = [r.tolist() for r in generate(model, [EOS], max_pause_seconds=0.5, **args)]
    assert max(_longest_pause(r) for r in free) > 50  # the untrained model pauses longer
    assert max(_longest_pause(r) for r in capped) <= 50
    assert min(codec.duration_seconds(r) for r in capped) > 1.0  # time still moves on
    both = generate(model, [EOS], max_pause_seconds=0.5, start_with_note=True, **args)
    assert not any(_pause_before_note(r.tolist()) for r in both)
    beams = beam_search(model, [EOS], max_new_tokens=40, sampling=SamplingConfig(num_beams=3),
                        max_pause_seconds=0.3)
    assert _longest_pause(beams.tolist()) <= 30
    with pytest.raises(MusicGPTError, match="max_pause_seconds"):
        generate(model, [EOS], max_pause_seconds=0, **args)


def test_max_note_releases_held_notes_in_time():
    """A model forgets notes struck before its window; max_note_seconds makes it release every
    note by then (its NOTE_OFF becomes the only choice), counting notes held over from the prompt."""
    model = _model()
    args = dict(max_new_tokens=150, sampling=SamplingConfig(top_p=1.0), num_samples=6, seed=2)

    def longest_note(rows, prompt=(EOS,)):
        notes = [codec.decode_notes([*prompt, *r.tolist()]) for r in rows]
        return max((n.end - n.start).max(initial=0.0) for n in notes)

    assert longest_note(generate(model, [EOS], **args)) > 0.5  # the untrained model holds on
    assert longest_note(generate(model, [EOS], max_note_seconds=0.5, **args)) <= 0.5 + 1e-9
    held = [EOS, 60, TIME_SHIFT + 99, TIME_SHIFT + 99]  # key 60 struck 2 s before the prompt ends
    assert longest_note(generate(model, held, **args), held) > 2.5
    rows = generate(model, held, max_note_seconds=2.5, **args)
    assert longest_note(rows, held) <= 2.5 + 1e-9
    rows = generate(model, held, max_note_seconds=1.5, **args)
    assert all(r[0] == 128 + 60 for r in rows)  # overdue: released first
    beam = beam_search(model, held, max_new_tokens=5, sampling=SamplingConfig(num_beams=3),
                       max_note_seconds=1.5)
    assert beam[0] == 128 + 60
    released = [EOS, 60, TIME_SHIFT + 99, 128 + 60, TIME_SHIFT + 99]  # let go after 1 s
    rows = generate(model, released, max_note_seconds=1.5, **args)
    assert not all(r[0] == 128 + 60 for r in rows)  # nothing is due: the model chooses
