"""The decoding rules on their own: pauses, held notes, and the state a prompt leaves."""

import math

import numpy as np

from musicgpt.constraints import Rules, prompt_state
from musicgpt.vocab import NOTE_OFF, TIME_SHIFT, CodecConfig

CFG = CodecConfig()


def rules(start=None, **limits):
    return Rules(100, CFG.eos_id, math.inf, CFG, [CFG.pad_id], start or prompt_state(np.array([CFG.eos_id]), CFG),
                 **limits)


def allowed_after(r, tokens):
    rows = r.initial(1)
    for token in tokens:
        r.advance(rows, [token])
    return set(np.flatnonzero(np.isfinite(r.mask_logits(np.zeros((1, CFG.vocab_size), np.float32), rows)[0])))


def shift(steps):  # the TIME_SHIFT token of `steps` steps (10 ms each)
    return TIME_SHIFT + steps - 1


def test_a_pause_may_only_fill_the_room_left_before_max_quiet():
    ok = allowed_after(rules(max_quiet=400), [60, shift(100), shift(100), shift(100), shift(50)])
    assert shift(50) in ok and shift(51) not in ok  # 350 steps since the note: 50 left
    assert 61 in ok and NOTE_OFF + 60 in ok and CFG.pad_id not in ok


def test_a_note_at_max_held_must_be_released_and_only_it():
    r = rules(max_held=150)
    assert allowed_after(r, [60, shift(100), 64, shift(50)]) == {NOTE_OFF + 60}
    ok = allowed_after(r, [60, shift(100), 64, shift(40)])  # 140 steps: 10 to go
    assert shift(10) in ok and shift(11) not in ok and 65 in ok


def test_a_released_or_restruck_note_is_not_due():
    r = rules(max_held=150)
    assert {shift(100), 65} <= allowed_after(r, [60, shift(100), NOTE_OFF + 60, shift(100)])
    assert {shift(50), 65} <= allowed_after(r, [60, shift(100), 60, shift(100)])  # struck again: 1 s old


def test_a_pause_at_the_end_of_the_prompt_counts():
    start = prompt_state(np.array([CFG.eos_id, 60, shift(10), NOTE_OFF + 60, shift(100), shift(100)]), CFG)
    ok = allowed_after(rules(start, max_quiet=250), [])
    assert shift(40) in ok and shift(41) not in ok  # 210 steps since the last note struck


def test_a_prompt_leaves_its_sounding_notes_with_their_age():
    start = prompt_state(np.array([CFG.eos_id, 60, 64, shift(100), NOTE_OFF + 64, shift(30)]), CFG)
    assert start.struck == {60: -130} and start.elapsed == 0 and start.quiet == 130
    assert allowed_after(rules(start, max_held=130), []) == {NOTE_OFF + 60}
    assert not math.isinf(rules(start, max_held=131).mask_logits(np.zeros((1, CFG.vocab_size), np.float32),
                                                             [start])[0, shift(1)])


def test_only_a_sounding_key_may_be_released():
    offs = set(range(NOTE_OFF, NOTE_OFF + 128))
    assert allowed_after(rules(), [60, 64, shift(10), NOTE_OFF + 64]) & offs == {NOTE_OFF + 60}
    assert not allowed_after(rules(), [60, shift(10), CFG.eos_id]) & offs  # a new piece: nothing sounds
    start = prompt_state(np.array([CFG.eos_id, 48, shift(10)]), CFG)  # sounding at the prompt's end
    assert allowed_after(rules(start), [72]) & offs == {NOTE_OFF + 48, NOTE_OFF + 72}
    assert allowed_after(rules(release_sounding_only=False), [60]) >= offs  # the rule can be turned off
