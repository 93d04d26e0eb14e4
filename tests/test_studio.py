"""musicgpt.studio, the app's logic without gradio: primers, models, variations, continue, infill, attention."""

from __future__ import annotations

import pretty_midi
import pytest
from conftest import make_piece, write_notes

from musicgpt import render, studio
from musicgpt.errors import MidiReadError, MusicGPTError
from musicgpt.midi_io import read_notes


def test_shipped_primers_and_models(tmp_path, tiny_run):
    primers = studio.shipped_primers()
    assert primers and all(p.is_file() and p.suffix == ".mid" for p in primers.values())
    assert studio.list_models(tmp_path / "no-runs") == {"default (shipped)": "default"}
    models = studio.list_models(tiny_run.parent, checkpoint="default")
    assert list(models.values()) == [str(studio.resolve_checkpoint("default")), "default", str(tiny_run)]
    assert {"pop", "classical"} <= set(studio.model_styles("default"))
    assert studio.model_styles(str(tiny_run)) == [] and studio.model_styles(str(tmp_path / "missing")) == []


def test_prepare_primer_keeps_the_first_seconds(tmp_path):
    piece = make_piece(tmp_path / "piece.mid", seconds=6)
    p = studio.prepare_primer(piece, 2.5, tmp_path)
    notes = read_notes(p.midi)
    assert p.seconds == pytest.approx(2.5, abs=0.05) and p.source_seconds == pytest.approx(5.9, abs=0.05)
    assert notes.start.max() < 2.5 and notes.end.max() <= 2.5 + 1e-6 and p.picture.is_file()
    assert studio.prepare_primer(None, 3, tmp_path).midi is None  # silence


def test_bad_primers_give_one_line_errors(tmp_path):
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"not a midi file")
    with pytest.raises(MidiReadError) as e:
        studio.prepare_primer(bad, None, tmp_path)
    assert "bad.mid" in str(e.value) and "\n" not in str(e.value)
    late = write_notes(tmp_path / "late.mid", [(60, 5.0, 6.0, 80)])
    with pytest.raises(MidiReadError, match="no notes to continue from in its first 2 s"):
        studio.prepare_primer(late, 2, tmp_path)
    with pytest.raises(MusicGPTError, match="positive"):
        studio.prepare_primer(late, -1, tmp_path)


def test_settings_pick_the_decoding_method():
    assert studio.Settings(method="greedy").sampling().greedy
    assert studio.Settings(method="beam search", num_beams=3).sampling().num_beams == 3
    assert studio.Settings().sampling().top_p_scope == "kind"  # the command line's default
    assert studio.Settings(top_p_scope="pooled").sampling().top_p_scope == "pooled"
    s = studio.Settings(temperature=0.7, top_k=5, min_p=0.1).sampling()
    assert (s.temperature, s.top_k, s.min_p, s.greedy) == (0.7, 5, 0.1, False)
    assert studio.Settings(max_pause=0).request_options()["max_pause_seconds"] == float("inf")
    with pytest.raises(MusicGPTError, match="method"):
        studio.Settings(method="shout").sampling()
    with pytest.raises(MusicGPTError, match="variations"):
        studio.Settings(variations=studio.MAX_VARIATIONS + 1).request_options()


def test_each_request_gets_its_own_folder(tmp_path):
    a, b = studio.new_workdir(tmp_path / "root"), studio.new_workdir(tmp_path / "root")
    assert a != b and a.parent == b.parent == tmp_path / "root"
    studio.remove_folder(tmp_path / "root")
    assert not (tmp_path / "root").exists()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Two 2-second continuations of a 3-second primer by the shipped model."""
    folder = tmp_path_factory.mktemp("studio")
    primer = studio.prepare_primer(make_piece(folder / "piece.mid", seconds=6), 3, folder)
    settings = studio.Settings(seconds=2, variations=2, seed=7, style="classical")
    return primer, studio.generate(primer, settings, studio.new_workdir(folder / "root"))


def test_generate_writes_midi_audio_and_pictures_with_the_boundary(generated):
    primer, variations = generated
    assert len(variations) == 2 and variations[0].midi != variations[1].midi
    kept = read_notes(primer.midi)
    for v in variations:
        assert v.seed == 7 and v.picture.is_file() and v.boundary == pytest.approx(primer.seconds, abs=0.02)
        notes = read_notes(v.midi)
        assert v.boundary < notes.end.max() <= v.boundary + 2 + 0.05  # the primer, then 2 s of the model
        before = notes.start < v.boundary - 1e-6
        assert sorted(notes.pitch[before]) == sorted(kept.pitch)  # the primer's notes, all of them, first
        if render.synth_available():
            assert v.wav.is_file() and v.note == ""


def test_generate_without_a_synthesizer_still_gives_midi(tmp_path, monkeypatch):
    def no_synth(synth="auto"):
        raise MusicGPTError(render.INSTALL_HINT)

    monkeypatch.setattr(render, "choose_synth", no_synth)
    [v] = studio.generate(studio.Primer(None), studio.Settings(seconds=1, seed=1), tmp_path)
    assert v.wav is None and "tinysoundfont" in v.note and v.midi.is_file() and v.boundary == 0


def test_continue_and_infill_a_result(generated, tmp_path):
    _, variations = generated
    midi = variations[0].midi
    again = studio.continue_from(midi, tmp_path)
    assert again.seconds == pytest.approx(read_notes(midi).end.max(), abs=0.01)
    [v] = studio.infill(midi, 1.0, 2.0, studio.Settings(seed=3), tmp_path)
    old, new = read_notes(midi), read_notes(v.midi)
    assert v.spans == [(1.0, 2.0)] and v.picture.is_file()
    for notes in (old, new):  # outside the range the piece is as it was
        assert sorted(notes.pitch[notes.start >= 2.0]) == sorted(old.pitch[old.start >= 2.0])
    with pytest.raises(MusicGPTError, match="end"):
        studio.infill(midi, 2.0, 1.0, studio.Settings(seed=3), tmp_path)


def test_attention_page_is_an_offline_html_file(generated, tmp_path):
    page = studio.attention_page(generated[1][0].midi, "default", tmp_path)
    text = page.read_text()
    assert page.suffix == ".html" and "<script" in text.lower()
    assert "https://" not in text and "http://" not in text.replace("http://www.w3.org", "")


def test_app_errors_are_one_line(monkeypatch):
    gr = pytest.importorskip("gradio", reason="gradio not installed: pip install 'musicgpt[app]'")
    from musicgpt.app import one_line_errors

    def fails(error):
        raise error

    with pytest.raises(gr.Error) as e:
        one_line_errors(fails)(MidiReadError("x.mid: not a MIDI file"))
    assert e.value.message == "x.mid: not a MIDI file"
    with pytest.raises(gr.Error) as e:  # a bug: one line on the page, the traceback on the server's stderr
        one_line_errors(fails)(ValueError("first line\nsecond line"))
    assert e.value.message == "unexpected error: ValueError: first line"


def test_downloaded_midi_parses(generated):
    assert pretty_midi.PrettyMIDI(str(generated[1][1].midi)).instruments
