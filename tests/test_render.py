"""`musicgpt render` and `sample --wav`: WAV of the right length with FluidSynth, one-line error without."""

import builtins
import wave

import pytest
from conftest import make_piece

from musicgpt.cli import main
from musicgpt.codec import load_midi
from musicgpt.render import fluidsynth_available


@pytest.mark.skipif(not fluidsynth_available(),
                    reason="FluidSynth library or pyfluidsynth not installed ('musicgpt[audio]')")
def test_render_writes_wav_of_the_pieces_length(tmp_path, capsys):
    midi = make_piece(tmp_path / "song.mid", seconds=4)
    assert main(["render", str(midi), "-o", str(tmp_path / "song.wav"), "--sample-rate", "22050"]) == 0
    with wave.open(str(tmp_path / "song.wav")) as w:
        seconds = w.getnframes() / w.getframerate()
        assert w.getframerate() == 22050 and w.getsampwidth() == 2
        frames = w.readframes(w.getnframes())
    end = load_midi(midi).get_end_time()
    assert end <= seconds <= end + 2.5  # FluidSynth adds the release tail
    assert len(set(frames)) > 10  # not silence


def test_missing_fluidsynth_gives_one_line_error(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_fluidsynth(name, *args, **kwargs):
        if name == "fluidsynth":
            raise ImportError("Couldn't find the FluidSynth library.")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fluidsynth)
    midi = make_piece(tmp_path / "song.mid", seconds=2)
    assert main(["render", str(midi), "-o", str(tmp_path / "song.wav")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FluidSynth" in err[0] and "musicgpt[audio]" in err[0]
    assert not (tmp_path / "song.wav").exists()
    assert main(["sample", "--wav", "--seconds", "2", "--out", str(tmp_path / "s")]) == 1
    assert "FluidSynth" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_render_rejects_non_midi(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("not midi")
    if not fluidsynth_available():
        pytest.skip("FluidSynth not installed: the file is never read")
    assert main(["render", str(bad)]) == 1
    assert "notes.txt" in capsys.readouterr().err
