"""The numpy decoding loop on its own: draws follow the filtered distribution, seeds repeat, rows stop."""

import math

import numpy as np
import pytest

from musicgpt.decode import decode, filter_logits, softmax
from musicgpt.sampling import SamplingConfig
from musicgpt.vocab import NOTE_OFF, TIME_SHIFT, CodecConfig

CFG = CodecConfig()
NOTES = [60, 64, 67, 72]  # NOTE_ONs: the rules never forbid them
PROBS = np.array([0.5, 0.25, 0.15, 0.1])


class FixedStepper:
    """A model that always predicts the same distribution over four notes."""

    window = 64

    def __init__(self):
        self.logits = np.full((1, CFG.vocab_size), -np.inf, dtype=np.float32)
        self.logits[0, NOTES] = np.log(PROBS)
        self.fed = []

    def start(self, prompt, batch):
        return np.repeat(self.logits, batch, 0)

    def step(self, tokens):
        self.fed.append(np.array(tokens))
        return np.repeat(self.logits, len(tokens), 0)

    def reorder(self, rows):
        pass


def _draws(sampling, seed=0, rows=200, steps=50):
    out = decode(FixedStepper(), [CFG.eos_id], vocab_size=CFG.vocab_size, max_new_tokens=steps,
                 sampling=sampling, num_samples=rows, seed=seed, stop_at_eos=False)
    return np.concatenate(out)


def _chi_square(draws, probs):
    counts = np.array([(draws == n).sum() for n in NOTES])
    expected = probs * len(draws)
    return ((counts - expected) ** 2 / np.where(expected > 0, expected, 1)).sum(), counts


@pytest.mark.parametrize("sampling, probs", [
    (SamplingConfig(top_p=1.0, temperature=1.0), PROBS),
    (SamplingConfig(top_p=0.7, temperature=1.0), np.array([2 / 3, 1 / 3, 0, 0])),  # 0.5 + 0.25 reach 0.7
    (SamplingConfig(top_p=1.0, temperature=2.0), np.sqrt(PROBS) / np.sqrt(PROBS).sum()),
])
def test_sampled_tokens_follow_the_filtered_distribution(sampling, probs):
    draws = _draws(sampling)
    assert len(draws) == 10_000
    stat, counts = _chi_square(draws, probs)
    assert counts[probs == 0].sum() == 0  # what the filter removed is never drawn
    assert stat < 16.3, counts  # chi-square, 3 degrees of freedom, p = 0.001


class WaitingStepper(FixedStepper):
    """A model that strikes C4 with probability 0.4, else waits 10 ms to 1 s, each wait 0.006."""

    def __init__(self):
        super().__init__()
        self.logits[0] = -np.inf
        self.logits[0, 60] = np.log(0.4)
        self.logits[0, TIME_SHIFT:TIME_SHIFT + 100] = np.log(0.006)


@pytest.mark.parametrize("scope, longest_kept", [("kind", 100), ("pooled", 100), ("token", 84)])
def test_top_p_cuts_waits_as_one_candidate_so_time_is_not_shortened(scope, longest_kept):
    # Per token, a 0.9 nucleus holds the note and the 84 first waits (in index order among ties),
    # so the long waits are never drawn; pooled or by kind, every wait keeps its probability.
    out = decode(WaitingStepper(), [CFG.eos_id], vocab_size=CFG.vocab_size, max_new_tokens=50,
                 sampling=SamplingConfig(top_p=0.9, temperature=1.0, top_p_scope=scope), num_samples=200, seed=0,
                 stop_at_eos=False)
    waits = np.concatenate(out)
    waits = waits[waits >= TIME_SHIFT] - TIME_SHIFT + 1
    assert waits.max() == longest_kept
    assert abs(waits.mean() - (1 + longest_kept) / 2) < 1.5  # uniform over the kept waits


@pytest.mark.parametrize("scope, note_share", [("kind", 0.4), ("pooled", 0.0), ("token", 0.4 / 0.502)])
def test_top_p_by_kind_strikes_notes_as_often_as_the_model_does(scope, note_share):
    # The note holds 0.4 and the waits 0.6 between them: a 0.5 nucleus of one pool holds only the
    # waits, so no note is ever struck; per token it holds the note and 17 waits; by kind the
    # notes keep their 0.4, the model's own rate.
    out = decode(WaitingStepper(), [CFG.eos_id], vocab_size=CFG.vocab_size, max_new_tokens=50,
                 sampling=SamplingConfig(top_p=0.5, temperature=1.0, top_p_scope=scope), num_samples=100, seed=0,
                 stop_at_eos=False)
    tokens = np.concatenate(out)
    assert abs((tokens == 60).mean() - note_share) < 0.03


class ReleasingStepper(FixedStepper):
    """A model that strikes C4 (0.3), releases it (0.3) or releases C#4, never struck (0.4)."""

    def __init__(self):
        super().__init__()
        self.logits[0] = -np.inf
        self.logits[0, [60, NOTE_OFF + 60, NOTE_OFF + 61]] = np.log([0.3, 0.3, 0.4])


@pytest.mark.parametrize("greedy", [False, True])
def test_only_a_sounding_key_is_released(greedy):
    out = decode(ReleasingStepper(), [CFG.eos_id], vocab_size=CFG.vocab_size, max_new_tokens=40,
                 sampling=SamplingConfig(top_p=1.0, temperature=1.0, greedy=greedy), num_samples=50, seed=0,
                 stop_at_eos=False)
    after_strike = []
    for row in out:
        sounding = False
        for token in row.tolist():
            assert token != NOTE_OFF + 61 and (token != NOTE_OFF + 60 or sounding)
            if sounding:
                after_strike.append(token)
            sounding = token == 60 or (sounding and token != NOTE_OFF + 60)
    if not greedy:  # with C4 down, striking and releasing it keep their equal odds
        assert 0.45 < np.mean(np.array(after_strike) == 60) < 0.55


def test_a_seed_repeats_its_draws_and_another_seed_does_not():
    cfg = SamplingConfig(top_p=1.0)
    assert np.array_equal(_draws(cfg, seed=3), _draws(cfg, seed=3))
    assert not np.array_equal(_draws(cfg, seed=3), _draws(cfg, seed=4))


def test_greedy_takes_the_best_and_feeds_it_back():
    stepper = FixedStepper()
    out = decode(stepper, [CFG.eos_id], vocab_size=CFG.vocab_size, max_new_tokens=5,
                 sampling=SamplingConfig(greedy=True), stop_at_eos=False)
    assert out[0].tolist() == [60] * 5
    assert [t.tolist() for t in stepper.fed] == [[60]] * 4  # the last token is not fed


def test_filters_leave_float32_logits_and_their_input_alone():
    logits = np.log(np.array([[0.5, 0.25, 0.15, 0.1]], dtype=np.float32))
    before = logits.copy()
    out = filter_logits(logits, SamplingConfig(top_p=0.7, top_k=3, min_p=0.1, typical_p=0.99,
                                               repetition_penalty=1.5, temperature=0.9), np.array([[1]]))
    assert out.dtype == np.float32 and np.array_equal(logits, before)
    assert math.isclose(softmax(out)[0, np.isfinite(out[0])].sum(), 1.0, rel_tol=1e-6)
