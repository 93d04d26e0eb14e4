"""The event codec: round trips against an independent reference, readers agree, bad files, augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pretty_midi
import pytest
from conftest import build_piece
from hypothesis import given, settings
from hypothesis import strategies as st

from musicgpt import codec
from musicgpt.errors import MusicGPTError
from musicgpt.vocab import CodecConfig

MIDI_DATA = Path(__file__).resolve().parents[1] / "midi_data"
DEFAULT = CodecConfig()


def reference_notes(pm: pretty_midi.PrettyMIDI, config: CodecConfig = DEFAULT):
    """Independent, plain-loop statement of the encoding rules: pedal in seconds, then on the grid.

    Returns {(pitch, on_step, off_step): velocity} and the pedalled notes in seconds.
    """
    per_step = 1000.0 / config.step_ms  # the codec's float convention, so exact halves agree
    pedalled = []
    for inst in pm.instruments:
        if inst.is_drum:
            continue
        pedal = sorted(((c.time, c.value >= 64) for c in inst.control_changes if c.number == 64),
                       key=lambda e: e[0])
        last = max([n.end for n in inst.notes] + [t for t, _ in pedal], default=0.0)
        for n in inst.notes:
            end, down = n.end, False
            for t, is_down in pedal:
                if t <= end:
                    down = is_down
            if down:
                end = next((t for t, is_down in pedal if t > end and not is_down), last)
            pedalled.append((n.pitch, n.start, end, n.velocity))
    by_key = {}
    for p, s, e, v in sorted(pedalled, key=lambda n: (n[0], round(n[1] * per_step),
                                                      -round(n[2] * per_step), -n[3])):
        on, off = round(s * per_step), round(e * per_step)
        notes = by_key.setdefault(p, [])
        if notes and notes[-1][0] == on:
            continue  # same key, same onset step: the longest (then loudest) one stays
        notes.append([on, max(off, on + 1), v])
    out = {}
    for p, notes in by_key.items():
        for i, (on, off, v) in enumerate(notes):
            if i + 1 < len(notes):
                off = min(off, notes[i + 1][0])  # the key is struck again
            out[(p, on, off)] = v
    return out, pedalled


def decoded_steps(tokens, config: CodecConfig = DEFAULT):
    n = codec.decode_notes(tokens, config)
    step = config.step_seconds
    return {(int(p), int(round(s / step)), int(round(e / step))): int(v)
            for p, s, e, v in zip(n.pitch, n.start, n.end, n.velocity)}


def assert_round_trip(pm: pretty_midi.PrettyMIDI, tokens, config: CodecConfig = DEFAULT):
    step = config.step_seconds
    want, pedalled = reference_notes(pm, config)
    got = decoded_steps(tokens, config)
    assert sorted(got) == sorted(want)
    bin_width = int(np.ceil(127 / config.velocity_bins))
    for key, v in want.items():
        assert abs(got[key] - v) <= bin_width, key
    notes = codec.decode_notes(tokens, config)
    for p, s, _, _ in pedalled:  # every onset within half a step of the original
        assert np.min(np.abs(notes.start[notes.pitch == p] - s)) <= step / 2 + 1e-9


def test_round_trip_prettymidi_object():
    pm = build_piece()
    tokens = codec.encode(pm)
    assert tokens.dtype == np.int16 and DEFAULT.eos_id not in tokens
    assert_round_trip(pm, tokens)
    notes = codec.decode_notes(tokens)
    held = notes.end[(notes.pitch == 76) & (np.abs(notes.start - 9.0) < 0.01)]
    assert held == pytest.approx([9.81], abs=1e-9)  # pedalled until the key re-sounded
    assert notes.end[notes.pitch == 79] == pytest.approx([10.4], abs=1e-9)  # until the lift
    assert notes.end[notes.pitch == 86] == pytest.approx([19.6], abs=1e-9)  # never lifted
    assert (notes.start[notes.pitch == 36] > 11).all()  # the drum track's notes are gone


def test_simultaneous_events_order():
    pm = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0)
    N = pretty_midi.Note
    piano.notes += [N(100, 48, 0.5, 1.0), N(40, 52, 0.5, 1.0), N(40, 55, 0.5, 1.0),
                    N(100, 60, 0.5, 1.0), N(40, 52, 1.0, 1.2), N(40, 50, 2.2, 3.7)]
    pm.instruments.append(piano)
    loud, soft = (f"VELOCITY_{DEFAULT.velocity_to_bin(v)}" for v in (100, 40))
    assert codec.token_names(codec.encode(pm)) == [
        "TIME_SHIFT_500ms", soft, "NOTE_ON_52", "NOTE_ON_55", loud, "NOTE_ON_48", "NOTE_ON_60",
        "TIME_SHIFT_500ms", "NOTE_OFF_48", "NOTE_OFF_52", "NOTE_OFF_55", "NOTE_OFF_60",
        soft, "NOTE_ON_52", "TIME_SHIFT_200ms", "NOTE_OFF_52",
        "TIME_SHIFT_1000ms", "NOTE_ON_50", "TIME_SHIFT_1000ms", "TIME_SHIFT_500ms", "NOTE_OFF_50",
    ]


def test_round_trip_file_and_readers_agree(tmp_path):
    path = tmp_path / "piece.mid"
    build_piece().write(str(path))
    from_file = pretty_midi.PrettyMIDI(str(path))  # the file's own notes (tick-rounded)
    tokens = codec.encode(path)
    np.testing.assert_array_equal(tokens, codec.encode(from_file))
    np.testing.assert_array_equal(tokens, codec.encode(str(path)))
    assert_round_trip(from_file, tokens)


def test_round_trip_non_default_config(tmp_path):
    config = CodecConfig(step_ms=8, max_shift_steps=50, velocity_bins=64)
    pm = build_piece()
    tokens = codec.encode(pm, config)
    assert tokens.max() < config.vocab_size
    assert_round_trip(pm, tokens, config)


def midi_data_sample(n: int = 6) -> list[Path]:
    files = sorted(MIDI_DATA.rglob("*.mid")) if MIDI_DATA.is_dir() else []
    return files[:: max(1, len(files) // n)][:n]


@pytest.mark.skipif(not midi_data_sample(), reason="midi_data/ holds no .mid files")
@pytest.mark.parametrize("path", midi_data_sample(), ids=lambda p: p.name)
def test_round_trip_midi_data(path):
    pm = pretty_midi.PrettyMIDI(str(path))
    tokens = codec.encode(path)
    np.testing.assert_array_equal(tokens, codec.encode(pm))
    assert_round_trip(pm, tokens)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.integers(-3, DEFAULT.vocab_size + 3),
                          st.sampled_from([DEFAULT.pad_id, DEFAULT.eos_id])), max_size=80))
def test_decode_any_sequence(tokens):
    notes = codec.decode_notes(tokens)
    assert (notes.end > notes.start).all()
    assert ((notes.pitch >= 0) & (notes.pitch < 128)).all()
    assert ((notes.velocity >= 1) & (notes.velocity <= 127)).all()
    assert all(tokens[i] == p for i, p in zip(notes.on_index, notes.pitch))
    pm = codec.decode(np.array(tokens, dtype=np.int64))
    assert [i.program for i in pm.instruments] == [0]
    assert len(pm.instruments[0].notes) == len(notes) == codec.count_notes(tokens)
    if len(notes):
        assert decoded_steps(codec.encode(pm)) == decoded_steps(tokens)


def test_names_round_trip_every_id():
    for config in (DEFAULT, CodecConfig(step_ms=8, velocity_bins=64)):
        ids = np.arange(config.vocab_size)
        names = codec.token_names(ids, config)
        assert len(set(names)) == config.vocab_size
        lines = [n.lower() for n in names] + ["", "   "]
        np.testing.assert_array_equal(codec.parse_token_names(lines, config), ids)
    assert codec.token_name(60) == "NOTE_ON_60" and codec.token_name(188) == "NOTE_OFF_60"
    assert codec.token_name(280) == "TIME_SHIFT_250ms" and codec.token_name(375) == "VELOCITY_19"
    assert (codec.token_name(DEFAULT.pad_id), codec.token_name(DEFAULT.eos_id)) == ("PAD", "EOS")
    with pytest.raises(MusicGPTError, match=r"^song\.txt:3: unknown token 'XYZ'$"):
        codec.parse_token_names(["NOTE_ON_60", "", "XYZ"], source="song.txt")


def _strip_trailing_shifts(tokens: np.ndarray) -> np.ndarray:
    events = np.flatnonzero(tokens < DEFAULT.velocity_offset - DEFAULT.max_shift_steps)
    return tokens[: events[-1] + 1] if len(events) else tokens[:0]


def test_transpose_matches_encoding_the_moved_piece():
    tokens = codec.encode(build_piece())
    for k in (5, -40, 60):
        moved = build_piece()
        for inst in moved.instruments:
            if not inst.is_drum:
                inst.notes = [n for n in inst.notes if 0 <= n.pitch + k < 128]
                for n in inst.notes:
                    n.pitch += k
        # The same tokens, except that the piece keeps its length when its last notes drop out.
        shifted = codec.transpose(tokens, k)
        np.testing.assert_array_equal(_strip_trailing_shifts(shifted), codec.encode(moved))
        assert codec.duration_seconds(shifted) == codec.duration_seconds(tokens)
    high = codec.decode_notes(codec.transpose(tokens, 60))
    assert high.pitch.max() <= 127 and len(high) < codec.count_notes(tokens)


def test_augmenting_a_window_keeps_its_frame():
    """Training windows start and end anywhere and carry EOS; augmentation must not eat them."""
    body = codec.encode(build_piece())
    cut = int(np.flatnonzero((body >= 128) & (body < 256))[0])  # a NOTE_OFF without its NOTE_ON
    window = np.concatenate([body[cut:cut + 260], [DEFAULT.eos_id], body[:40]])
    for out in (codec.transpose(window, 2), codec.time_stretch(window, 0.95),
                codec.time_stretch(window, 1.05)):
        assert list(out).count(DEFAULT.eos_id) == 1
        names = codec.token_names(out)
        plain = codec.token_names(window)
        not_shift = [n for n in names if not n.startswith("TIME_SHIFT")]
        assert len(not_shift) == len([n for n in plain if not n.startswith("TIME_SHIFT")])
    stretched = codec.time_stretch(window, 1.05)
    assert codec.duration_seconds(stretched) == pytest.approx(
        1.05 * codec.duration_seconds(window), abs=DEFAULT.step_seconds)
    moved = codec.transpose(window, 2)
    assert moved[0] == window[0] + 2  # the NOTE_OFF cut from its NOTE_ON moves too


@pytest.mark.parametrize("factor", [0.95, 0.97, 1.0, 1.05])
def test_time_stretch_scales_onsets_and_durations(factor):
    tokens = codec.encode(build_piece())
    before, after = codec.decode_notes(tokens), codec.decode_notes(codec.time_stretch(tokens, factor))
    assert len(after) == len(before)
    a, b = np.lexsort((before.start, before.pitch)), np.lexsort((after.start, after.pitch))
    step = DEFAULT.step_seconds
    assert np.abs(after.start[b] - factor * before.start[a]).max() <= step / 2 + 1e-9
    durations = (after.end - after.start)[b] - factor * (before.end - before.start)[a]
    assert np.abs(durations).max() <= step + 1e-9
    assert codec.duration_seconds(codec.time_stretch(tokens, factor)) == pytest.approx(
        factor * codec.duration_seconds(tokens), abs=step)


@pytest.mark.parametrize("factor", [0.9, 1.2, float("nan")])
def test_time_stretch_rejects_large_factors(factor):
    with pytest.raises(MusicGPTError, match="factor"):
        codec.time_stretch(codec.encode(build_piece()), factor)


def test_config_dict_round_trip_and_validation():
    for config in (DEFAULT, CodecConfig(step_ms=8, max_shift_steps=125, velocity_bins=64)):
        assert CodecConfig.from_dict(config.to_dict()) == config
    assert DEFAULT.vocab_size == 390 and (DEFAULT.pad_id, DEFAULT.eos_id) == (388, 389)
    for bad in ({"step_ms": 0}, {"velocity_bins": 128}, {"step_ms": 7.5}, {"max_shift_steps": True},
                {"colour": "red"}, ["step_ms"]):
        with pytest.raises(MusicGPTError, match="codec config"):
            CodecConfig.from_dict(bad)


def test_measuring_and_truncating():
    tokens = codec.encode(build_piece())
    notes = codec.decode_notes(tokens)
    assert codec.count_notes(tokens) == len(notes)
    assert codec.duration_seconds(tokens) == pytest.approx(notes.end.max())
    primer = codec.truncate_seconds(tokens, 5.1033)
    assert codec.duration_seconds(primer) < 5.1033
    kept = codec.decode_notes(primer)
    assert set(kept.start.round(2)) == set(notes.start[notes.start < 5.1033].round(2))
    assert len(codec.truncate_seconds(tokens, 0)) == 0
