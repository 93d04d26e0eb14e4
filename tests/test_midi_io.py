"""midi_io: our SMF reader sees pretty_midi's notes, the sustain pedal and tempo map are applied,
written files read back as written, and bad files fail in one line naming the file."""

from __future__ import annotations

from pathlib import Path

import mido
import numpy as np
import pretty_midi
import pytest
from conftest import build_piece

from musicgpt import midi_io
from musicgpt.errors import MidiReadError

N = pretty_midi.Note


def note_rows(notes: midi_io.Notes) -> list[tuple]:
    """(pitch, start, end, velocity) of every note, sorted."""
    return sorted(zip(notes.pitch.tolist(), notes.start.tolist(), notes.end.tolist(), notes.velocity.tolist()))


def pretty_midi_rows(pm: pretty_midi.PrettyMIDI) -> list[tuple]:
    """The same rows straight from pretty_midi's instruments (drums left out)."""
    return sorted((n.pitch, n.start, n.end, n.velocity) for i in pm.instruments if not i.is_drum for n in i.notes)


def save_events(path: Path, tracks: list[list[tuple[int, mido.Message]]], tpq: int = 96) -> Path:
    """A MIDI file of (absolute tick, message) tracks; same-tick messages keep their listed order."""
    mf = mido.MidiFile(ticks_per_beat=tpq)
    for events in tracks:
        track, now = mido.MidiTrack(), 0
        for t, msg in sorted(events, key=lambda e: e[0]):
            track.append(msg.copy(time=t - now))
            now = t
        mf.tracks.append(track)
    mf.save(path)
    return path


def on(pitch: int, tick: int, velocity: int = 80, channel: int = 0) -> tuple[int, mido.Message]:
    return tick, mido.Message("note_on", note=pitch, velocity=velocity, channel=channel)


def off(pitch: int, tick: int, channel: int = 0) -> tuple[int, mido.Message]:
    return tick, mido.Message("note_on", note=pitch, velocity=0, channel=channel)


def pedal(tick: int, value: int, channel: int = 0) -> tuple[int, mido.Message]:
    return tick, mido.Message("control_change", control=64, value=value, channel=channel)


def tempo(tick: int, bpm: float) -> tuple[int, mido.MetaMessage]:
    return tick, mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(bpm))


# ----------------------------------------------------------------------------- reading


def test_notes_of_a_file_are_pretty_midis_with_drums_dropped(tmp_path):
    pm = build_piece()
    for inst in pm.instruments:
        inst.control_changes = [c for c in inst.control_changes if c.number != 64]  # no pedal: ends untouched
    path = tmp_path / "piece.mid"
    pm.write(str(path))
    theirs = pretty_midi.PrettyMIDI(str(path))
    got = midi_io.read_notes(path)
    assert note_rows(got) == pretty_midi_rows(theirs)  # bit for bit, times included
    assert 36 in {n.pitch for n in theirs.instruments[2].notes} and theirs.instruments[2].is_drum
    assert len(got) == sum(len(i.notes) for i in theirs.instruments if not i.is_drum)
    assert got.pitch.dtype == np.int64 and got.start.dtype == np.float64 and got.velocity.dtype == np.int64
    assert note_rows(midi_io.read_notes(str(path))) == note_rows(got)  # a str path reads the same


def test_a_file_and_its_pretty_midi_object_give_the_same_notes(tmp_path):
    path = tmp_path / "piece.mid"
    build_piece().write(str(path))  # with pedal, on two instruments
    assert note_rows(midi_io.read_notes(path)) == note_rows(midi_io.read_notes(pretty_midi.PrettyMIDI(str(path))))


def test_readers_agree_on_tricky_note_pairing(tmp_path):
    """Overlaps of one key, a NOTE_OFF before or after a NOTE_ON on the same tick, a stray
    NOTE_OFF, a note never ended, a tempo change: the file reader must see pretty_midi's notes."""
    events = [
        on(60, 0), on(60, 100), off(60, 200), off(60, 300),  # nested in the file's order
        on(62, 0), off(62, 50), off(62, 400), on(62, 400), off(62, 500),  # stray off, then on
        on(64, 0), on(64, 300), on(64, 420), off(64, 420), off(64, 600),  # on, off, same tick
        on(65, 700), off(65, 700), on(65, 800), off(65, 900),  # a zero-length note
        on(67, 0), on(67, 450), off(67, 900),  # one NOTE_OFF for two notes
        on(69, 950),  # never ended
        (480, mido.MetaMessage("set_tempo", tempo=700000)),
    ]
    path = save_events(tmp_path / "tricky.mid", [events])
    assert note_rows(midi_io.read_notes(path)) == pretty_midi_rows(pretty_midi.PrettyMIDI(str(path)))


def test_sustain_pedal_holds_released_notes_until_it_lifts(tmp_path):
    """At 120 bpm and 96 ticks a beat, 192 ticks are one second."""
    track = [
        on(60, 0), off(60, 96),  # released before the pedal goes down: unchanged
        pedal(48, 63),  # 63 is still "up"
        pedal(144, 64),  # down (64 and over)
        on(62, 144), off(62, 192),  # released while down: sounds until the lift at 288
        pedal(288, 0),
        on(64, 384), off(64, 432), pedal(408, 127),  # pedal down at the release itself...
        on(65, 480), off(65, 576),  # ...and never lifted: it lifts when the piece ends (576)
        on(67, 0, channel=1), off(67, 192, channel=1),  # another channel's pedal does not hold it
    ]
    path = save_events(tmp_path / "pedal.mid", [track])
    got = {p: (s, e) for p, s, e, _ in note_rows(midi_io.read_notes(path))}
    assert got == {60: (0.0, 0.5), 62: (0.75, 1.5), 64: (2.0, 3.0), 65: (2.5, 3.0), 67: (0.0, 1.0)}


def test_apply_sustain_rule():
    end = np.array([0.5, 1.0, 2.0, 3.0, 5.0])
    cc_time = np.array([2.5, 0.8, 1.5, 4.0])  # unsorted on purpose
    cc_value = np.array([0.0, 100.0, 64.0, 127.0])  # down 0.8, still down 1.5, up 2.5, down 4.0 for good
    out = midi_io.apply_sustain(end, cc_time, cc_value, piece_end=6.0)
    np.testing.assert_array_equal(out, [0.5, 2.5, 2.5, 3.0, 6.0])
    np.testing.assert_array_equal(midi_io.apply_sustain(end, np.array([]), np.array([]), 6.0), end)


def test_as_heard_ends_a_held_note_where_its_key_is_struck_again():
    notes = midi_io.Notes(
        pitch=np.array([60, 64, 60, 62, 62, 60]),
        start=np.array([0.0, 0.0, 1.0, 0.5, 0.5, 3.0]),
        end=np.array([2.5, 3.0, 1.5, 0.6, 0.9, 4.0]),  # C4 held by the pedal past its next strike
        velocity=np.array([10, 20, 30, 40, 50, 60]),
    )
    heard = midi_io.as_heard(notes)
    # C4 struck at 0 ends at its next strike (1.0); the later C4s keep their ends; E4 is untouched;
    # of the two D4s struck together the longer one stays; the file's order is kept.
    assert heard.pitch.tolist() == [60, 64, 60, 62, 60]
    assert heard.start.tolist() == [0.0, 0.0, 1.0, 0.5, 3.0]
    assert heard.end.tolist() == [1.0, 3.0, 1.5, 0.9, 4.0]
    assert heard.velocity.tolist() == [10, 20, 30, 50, 60]


def test_as_heard_durations_are_what_the_codec_keeps(tmp_path):
    """The codec cuts notes at a re-strike too: on the step grid the two agree note for note."""
    from musicgpt import codec

    notes = midi_io.read_notes(build_piece())
    heard = midi_io.as_heard(notes)
    decoded = codec.decode_notes(codec.encode(notes))
    assert (heard.end - heard.start).sum() < (notes.end - notes.start).sum()  # the piece re-strikes held keys
    on, off = codec.grid_steps(heard.start), codec.grid_steps(heard.end)
    off = np.maximum(off, on + 1)  # the codec also makes every note at least one step long
    got = sorted(zip(heard.pitch.tolist(), on.tolist(), off.tolist()))
    steps = codec.grid_steps
    want = sorted(zip(decoded.pitch.tolist(), steps(decoded.start).tolist(), steps(decoded.end).tolist()))
    assert got == want


@pytest.mark.filterwarnings("ignore:Tempo, Key or Time signature change events found on non-zero tracks")
def test_tempo_changes_come_from_the_first_track_only(tmp_path):
    """96 ticks a beat: 120 bpm for the first 192 ticks (1 s), then 240 bpm (a beat is 0.25 s)."""
    conductor = [tempo(0, 120), tempo(192, 240)]
    piano = [tempo(0, 30),  # a tempo outside the first track is ignored, as by mido and pretty_midi
             on(60, 0), off(60, 96), on(62, 192), off(62, 288), on(64, 384), off(64, 480)]
    path = save_events(tmp_path / "tempo.mid", [conductor, piano])
    got = [(p, s, e) for p, s, e, _ in note_rows(midi_io.read_notes(path))]
    assert got == [(60, 0.0, 0.5), (62, 1.0, 1.25), (64, 1.5, 1.75)]
    assert note_rows(midi_io.read_notes(path)) == pretty_midi_rows(pretty_midi.PrettyMIDI(str(path)))


# ----------------------------------------------------------------------------- writing


def _contents(pm: pretty_midi.PrettyMIDI):
    return ([(i.name, i.program, i.is_drum, [(n.start, n.end, n.pitch, n.velocity) for n in i.notes],
              [(c.time, c.number, c.value) for c in i.control_changes],
              [(b.time, b.pitch) for b in i.pitch_bends]) for i in pm.instruments],
            [(t.numerator, t.denominator, t.time) for t in pm.time_signature_changes],
            [(k.key_number, k.time) for k in pm.key_signature_changes],
            pm.get_tempo_changes()[1].tolist(), pm.resolution)


def test_what_is_written_reads_back(tmp_path):
    """Times on the tick grid (120 bpm, 480 ticks a beat: 1/960 s) come back exactly."""
    pm = pretty_midi.PrettyMIDI(resolution=480)
    piano = pretty_midi.Instrument(program=0, name="Piano")
    piano.notes += [N(90, 60, 0.0, 0.5), N(30, 64, 0.25, 1.125), N(127, 60, 1.0, 1.5), N(1, 72, 2.0, 2.0625)]
    piano.control_changes += [pretty_midi.ControlChange(64, 100, 0.375), pretty_midi.ControlChange(64, 0, 1.25)]
    violin = pretty_midi.Instrument(program=40, name="Violin")
    violin.notes += [N(64, 79, 0.5, 3.0)]
    violin.pitch_bends += [pretty_midi.PitchBend(-8192, 1.0), pretty_midi.PitchBend(8191, 2.0)]
    pm.instruments += [piano, violin]
    out = tmp_path / "new" / "folder" / "out.mid"
    midi_io.write_midi(pm, out)
    assert [p.name for p in out.parent.iterdir()] == ["out.mid"]  # no temp file left behind
    back = pretty_midi.PrettyMIDI(str(out))
    pm.time_signature_changes.append(pretty_midi.TimeSignature(4, 4, 0.0))  # added when none is given, as pm.write does
    assert _contents(back) == _contents(pm)
    assert note_rows(midi_io.read_notes(out)) == note_rows(midi_io.read_notes(pm))
    assert midi_io.load_midi(out).instruments[1].name == "Violin"


def test_tempo_changes_survive_a_write(tmp_path):
    conductor = [tempo(0, 100), tempo(192, 150), tempo(384, 75)]
    piano = [on(60, 0), off(60, 150), on(62, 200), off(62, 500), on(64, 500), off(64, 700)]
    source = save_events(tmp_path / "tempo.mid", [conductor, piano])
    pm = midi_io.load_midi(source)
    midi_io.write_midi(pm, tmp_path / "copy.mid")
    copy = pretty_midi.PrettyMIDI(str(tmp_path / "copy.mid"))
    np.testing.assert_allclose(copy.get_tempo_changes()[1], [100, 150, 75])
    assert note_rows(midi_io.read_notes(tmp_path / "copy.mid")) == note_rows(midi_io.read_notes(source))


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
    midi_io.write_midi(pm, tmp_path / "ours.mid")
    pm.write(str(tmp_path / "theirs.mid"))
    ours, theirs = (pretty_midi.PrettyMIDI(str(tmp_path / f)) for f in ("ours.mid", "theirs.mid"))
    assert _contents(ours) == _contents(theirs)
    assert len(ours.get_tempo_changes()[0]) == (2 if tempo_change else 1)


def test_a_failed_write_leaves_the_old_file(tmp_path):
    out = tmp_path / "out.mid"
    out.write_bytes(b"old")
    pm = pretty_midi.PrettyMIDI()
    pm.instruments.append(pretty_midi.Instrument(0))
    pm.instruments[0].notes.append(N(80, 60, 0.0, 0.5))
    pm.lyrics.append(pretty_midi.Lyric("la", 0.0))  # so pm.write writes it, not our fast writer

    def write_half_then_fail(f):
        f.write(b"MThd\x00\x00")
        raise OSError("disk full")

    pm.write = write_half_then_fail
    with pytest.raises(OSError, match="disk full"):
        midi_io.write_midi(pm, out)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.mid"]


# ----------------------------------------------------------------------------- bad files


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = tmp_path / "good.mid"
    build_piece().write(str(good))
    data = good.read_bytes()
    files = {
        "missing": (tmp_path / "missing.mid", "file not found"),
        "folder": (tmp_path / "folder.mid", "is a folder"),
        "empty": (tmp_path / "empty.mid", "empty file"),
        "text": (tmp_path / "notes.txt", "not a MIDI file"),
        "truncated": (tmp_path / "cut.mid", "truncated"),
        "header cut": (tmp_path / "head.mid", "truncated MIDI (header cut short)"),
        "format 2": (tmp_path / "fmt2.mid", "format 2"),
        "SMPTE": (tmp_path / "smpte.mid", "SMPTE"),
        "undefined status byte": (tmp_path / "garbage.mid", "corrupt"),
        "drums only": (tmp_path / "drums.mid", "no notes"),
    }
    files["folder"][0].mkdir()
    files["empty"][0].write_bytes(b"")
    files["text"][0].write_text("hello, I am not music\n")
    files["truncated"][0].write_bytes(data[: len(data) // 2])
    files["header cut"][0].write_bytes(data[:10])
    files["format 2"][0].write_bytes(data[:8] + b"\x00\x02" + data[10:])
    files["SMPTE"][0].write_bytes(data[:12] + b"\xe7\x28" + data[14:])  # -25 fps, 40 ticks a frame
    body = b"\x00\x90\x3c\x40\x00\xf4\x00"  # a NOTE_ON, then status 0xF4, which MIDI leaves undefined
    files["undefined status byte"][0].write_bytes(
        b"MThd" + (6).to_bytes(4, "big") + bytes([0, 0, 0, 1, 1, 224])
        + b"MTrk" + len(body).to_bytes(4, "big") + body)
    drums = pretty_midi.PrettyMIDI()
    drums.instruments.append(build_piece().instruments[2])
    drums.write(str(files["drums only"][0]))
    return files


def test_bad_files_raise_one_line_errors_naming_the_file(tmp_path):
    for path, problem in _bad_files(tmp_path).values():
        with pytest.raises(MidiReadError) as e:
            midi_io.read_notes(path)
        assert str(e.value).startswith(f"{path}: ") and problem in str(e.value)
        assert "\n" not in str(e.value)
        if problem != "no notes":
            with pytest.raises(MidiReadError) as e:
                midi_io.load_midi(path)
            assert str(e.value).startswith(f"{path}: ") and problem in str(e.value)


def test_absurd_timing_is_refused_quickly(tmp_path):
    mf = mido.MidiFile(ticks_per_beat=1)
    track = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=0xFFFFFF, time=0)])
    for _ in range(40):  # 40 maximal delta times at 16.7 s per tick: about 5 million hours
        track += [mido.Message("note_on", note=60, velocity=80, time=0x0FFFFFFF),
                  mido.Message("note_off", note=60, time=0x0FFFFFFF)]
    mf.tracks.append(track)
    path = tmp_path / "slow.mid"
    mf.save(path)
    with pytest.raises(MidiReadError, match="hour limit|absurd tempo") as e:
        midi_io.read_notes(path)
    assert str(e.value).startswith(f"{path}: ")


def test_a_tempo_outside_music_while_notes_sound_is_refused(tmp_path):
    path = save_events(tmp_path / "fast.mid", [[tempo(0, 3000), on(60, 0), off(60, 96)]])
    with pytest.raises(MidiReadError, match="absurd tempo") as e:
        midi_io.read_notes(path)
    assert str(e.value).startswith(f"{path}: ")
    after = save_events(tmp_path / "after.mid", [[on(60, 0), off(60, 96), tempo(200, 3000)]])
    assert len(midi_io.read_notes(after)) == 1  # after the last note it changes nothing
