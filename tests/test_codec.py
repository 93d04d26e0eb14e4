"""The event codec: round trips against an independent reference, readers agree, bad files, augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pretty_midi
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from musicgpt import codec
from musicgpt.errors import MidiReadError, MusicGPTError
from musicgpt.vocab import CodecConfig

MIDI_DATA = Path(__file__).resolve().parents[1] / "midi_data"
DEFAULT = CodecConfig()


def build_piece() -> pretty_midi.PrettyMIDI:
    """Chords, overlapping same-key notes, velocities 1..127, pedal, long gaps and notes, drums."""
    pm = pretty_midi.PrettyMIDI(resolution=480)
    piano = pretty_midi.Instrument(program=0, name="Piano")
    N = pretty_midi.Note
    for i, p in enumerate((48, 52, 55, 60)):  # a chord, then a chord with mixed lengths
        piano.notes.append(N(70 + i, p, 0.1013, 0.8031))
        piano.notes.append(N(40 + 20 * i, p, 1.2047, 1.5077 + 0.3 * i))
    piano.notes += [
        N(90, 64, 2.0021, 3.0031), N(60, 64, 2.5037, 2.7043),  # nested: the inner ends first
        N(80, 67, 2.0021, 2.9053), N(50, 67, 2.4061, 3.4087),  # partial overlap
        N(100, 71, 3.5011, 3.5027),  # shorter than a step
        N(64, 72, 5.1033, 8.4471),  # after a 1.6 s gap, 3.3 s long
    ]
    # Sustain: notes released while the pedal is down sound until it lifts (or the key re-sounds).
    piano.notes += [N(70, 76, 9.0019, 9.2027), N(72, 79, 9.1031, 9.3043), N(74, 76, 9.8069, 9.9011)]
    piano.control_changes += [pretty_midi.ControlChange(64, 100, 9.1509),
                              pretty_midi.ControlChange(64, 0, 10.4033)]
    for v in range(1, 128):  # every velocity, one note each, two keys alternating
        t = 11.0 + 0.0517 * v
        piano.notes.append(N(v, 36 + v % 2, t, t + 0.0253))
    strings = pretty_midi.Instrument(program=48, name="Strings")
    strings.notes += [N(55, 84, 0.5033, 4.2071), N(85, 86, 18.5049, 18.9037),
                      N(75, 88, 18.7013, 19.6037)]
    strings.control_changes += [pretty_midi.ControlChange(64, 127, 18.6011)]  # never lifted
    drums = pretty_midi.Instrument(program=0, is_drum=True, name="Drums")
    drums.notes += [N(100, 36, t / 2, t / 2 + 0.1) for t in range(30)]
    pm.instruments += [piano, strings, drums]
    return pm


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


def test_readers_agree_on_tricky_note_pairing(tmp_path):
    """Overlaps of one key, a NOTE_OFF before or after a NOTE_ON on the same tick, a stray
    NOTE_OFF, a note never ended, a tempo change: the file reader must see pretty_midi's notes."""
    import mido

    on = lambda p, t, v=80: (t, mido.Message("note_on", note=p, velocity=v))  # noqa: E731
    off = lambda p, t: (t, mido.Message("note_on", note=p, velocity=0))  # noqa: E731
    events = [
        on(60, 0), on(60, 100), off(60, 200), off(60, 300),  # nested in the file's order
        on(62, 0), off(62, 50), off(62, 400), on(62, 400), off(62, 500),  # stray off, then on
        on(64, 0), on(64, 300), on(64, 420), off(64, 420), off(64, 600),  # on, off, same tick
        on(65, 700), off(65, 700), on(65, 800), off(65, 900),  # a zero-length note
        on(67, 0), on(67, 450), off(67, 900),  # one NOTE_OFF for two notes
        on(69, 950),  # never ended
        (480, mido.MetaMessage("set_tempo", tempo=700000)),
    ]
    mf = mido.MidiFile(ticks_per_beat=96)
    track, now = mido.MidiTrack(), 0
    for t, msg in sorted(events, key=lambda e: e[0]):  # stable: same-tick order as listed
        track.append(msg.copy(time=t - now))
        now = t
    mf.tracks.append(track)
    path = tmp_path / "tricky.mid"
    mf.save(path)
    np.testing.assert_array_equal(codec.encode(path), codec.encode(pretty_midi.PrettyMIDI(str(path))))


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


def test_write_and_load_midi(tmp_path):
    pm = codec.decode(codec.encode(build_piece()))
    out = tmp_path / "new" / "folder" / "out.mid"
    codec.write_midi(pm, out)
    assert [p.name for p in out.parent.iterdir()] == ["out.mid"]  # no temp file left behind
    back = codec.load_midi(out)
    assert back.resolution == 480 and back.get_tempo_changes()[1][0] == pytest.approx(120)
    assert back.instruments[0].name == "Piano" and back.instruments[0].program == 0
    np.testing.assert_array_equal(codec.encode(out), codec.encode(pm))


def _contents(pm: pretty_midi.PrettyMIDI):
    return ([(i.name, i.program, i.is_drum, [(n.start, n.end, n.pitch, n.velocity) for n in i.notes],
              [(c.time, c.number, c.value) for c in i.control_changes],
              [(b.time, b.pitch) for b in i.pitch_bends]) for i in pm.instruments],
            [(t.numerator, t.denominator, t.time) for t in pm.time_signature_changes],
            [(k.key_number, k.time) for k in pm.key_signature_changes],
            pm.get_tempo_changes()[1].tolist(), pm.resolution)


@pytest.mark.parametrize("tempo_change", [False, True])
def test_write_midi_matches_pretty_midi_writer(tmp_path, tempo_change):
    pm = build_piece()
    pm.instruments[1].pitch_bends += [pretty_midi.PitchBend(-8192, 1.0),
                                      pretty_midi.PitchBend(8191, 2.0), pretty_midi.PitchBend(5, 2.0)]
    pm.time_signature_changes += [pretty_midi.TimeSignature(3, 4, 0.0),
                                  pretty_midi.TimeSignature(6, 8, 5.0)]
    pm.instruments[0].control_changes += [pretty_midi.ControlChange(64, v, 12.0) for v in (0, 90)]
    pm.key_signature_changes += [pretty_midi.KeySignature(k, 0.5 * k) for k in range(24)]
    if tempo_change:  # written by pretty_midi itself: read one back that has a tempo change
        pm.write(str(tmp_path / "tempo.mid"))
        pm = pretty_midi.PrettyMIDI(str(tmp_path / "tempo.mid"))
        pm.adjust_times([0, 5, 20], [0, 5, 25])
    codec.write_midi(pm, tmp_path / "ours.mid")
    pm.write(str(tmp_path / "theirs.mid"))
    ours, theirs = (pretty_midi.PrettyMIDI(str(tmp_path / f)) for f in ("ours.mid", "theirs.mid"))
    assert _contents(ours) == _contents(theirs)
    assert len(ours.get_tempo_changes()[0]) == (2 if tempo_change else 1)


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = tmp_path / "good.mid"
    build_piece().write(str(good))
    data = good.read_bytes()
    files = {
        "missing": (tmp_path / "missing.mid", "file not found"),
        "empty": (tmp_path / "empty.mid", "empty file"),
        "text": (tmp_path / "notes.txt", "not a MIDI file"),
        "truncated": (tmp_path / "cut.mid", "truncated"),
        "undefined status byte": (tmp_path / "garbage.mid", "corrupt"),
        "drums only": (tmp_path / "drums.mid", "no notes"),
    }
    files["empty"][0].write_bytes(b"")
    files["text"][0].write_text("hello, I am not music\n")
    files["truncated"][0].write_bytes(data[: len(data) // 2])
    body = b"\x00\x90\x3c\x40\x00\xf4\x00"  # a NOTE_ON, then status 0xF4, which MIDI leaves undefined
    files["undefined status byte"][0].write_bytes(
        b"MThd" + (6).to_bytes(4, "big") + bytes([0, 0, 0, 1, 1, 224])
        + b"MTrk" + len(body).to_bytes(4, "big") + body)
    drums = pretty_midi.PrettyMIDI()
    drums.instruments.append(build_piece().instruments[2])
    drums.write(str(files["drums only"][0]))
    return files


def test_bad_files_raise_one_line_errors(tmp_path):
    for path, problem in _bad_files(tmp_path).values():
        with pytest.raises(MidiReadError) as e:
            codec.encode(path)
        assert str(e.value).startswith(f"{path}: ") and problem in str(e.value)
        assert "\n" not in str(e.value)
        if problem != "no notes":
            with pytest.raises(MidiReadError, match=problem):
                codec.load_midi(path)


def test_absurd_timing_is_refused_quickly(tmp_path):
    import mido

    mf = mido.MidiFile(ticks_per_beat=1)
    track = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=0xFFFFFF, time=0)])
    for _ in range(40):  # 40 maximal delta times at 16.7 s per tick: about 5 million hours
        track += [mido.Message("note_on", note=60, velocity=80, time=0x0FFFFFFF),
                  mido.Message("note_off", note=60, time=0x0FFFFFFF)]
    mf.tracks.append(track)
    path = tmp_path / "slow.mid"
    mf.save(path)
    with pytest.raises(MidiReadError, match="hour limit|absurd tempo"):
        codec.encode(path)
