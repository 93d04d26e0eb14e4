"""`musicgpt render` and `sample --wav`: WAV of the right length with tinysoundfont or FluidSynth, one-line error
without either."""

import builtins
import wave

import numpy as np
import pytest
from conftest import make_piece, write_notes

from musicgpt.cli import main
from musicgpt.codec import load_midi
from musicgpt.render import fluidsynth_available, tinysoundfont_available

AVAILABLE = {"tinysoundfont": tinysoundfont_available(), "fluidsynth": fluidsynth_available()}


def read_wav(path):
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1
        return w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


@pytest.mark.parametrize("synth", sorted(AVAILABLE))
def test_render_writes_wav_of_the_pieces_length(tmp_path, synth):
    if not AVAILABLE[synth]:
        pytest.skip(f"{synth} not installed (pip install --no-deps tinysoundfont, or 'musicgpt[audio]')")
    midi = make_piece(tmp_path / "song.mid", seconds=4)
    assert main(["render", str(midi), "-o", str(tmp_path / "song.wav"), "--sample-rate", "22050",
                 "--synth", synth]) == 0
    rate, pcm = read_wav(tmp_path / "song.wav")
    end = load_midi(midi).get_end_time()
    assert rate == 22050 and end <= len(pcm) / rate <= end + 2.5  # the synthesizer adds the release tail
    assert len(set(pcm.tolist())) > 10  # not silence


@pytest.mark.skipif(not tinysoundfont_available(), reason="tinysoundfont not installed")
def test_tinysoundfont_sounds_where_the_notes_are(tmp_path):
    """A note from 1 to 1.5 s: quiet before it, loud during it (events land at their sample)."""
    midi = write_notes(tmp_path / "one.mid", [(60, 1.0, 1.5, 100), (64, 3.0, 3.2, 100)])
    assert main(["render", str(midi), "-o", str(tmp_path / "one.wav"), "--sample-rate", "8000",
                 "--synth", "tinysoundfont"]) == 0
    rate, pcm = read_wav(tmp_path / "one.wav")
    level = [np.abs(pcm[int(a * rate):int(b * rate)].astype(float)).mean() for a, b in ((0, 0.95), (1.05, 1.45))]
    assert level[0] < 50 < level[1]


def test_missing_synthesizers_give_one_line_error(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_synth(name, *args, **kwargs):
        if name in ("fluidsynth", "tinysoundfont"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_synth)
    midi = make_piece(tmp_path / "song.mid", seconds=2)
    assert main(["render", str(midi), "-o", str(tmp_path / "song.wav")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tinysoundfont" in err[0] and "FluidSynth" in err[0] and "musicgpt[audio]" in err[0]
    assert not (tmp_path / "song.wav").exists()
    assert main(["sample", "--wav", "--seconds", "2", "--out", str(tmp_path / "s")]) == 1
    assert "tinysoundfont" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_render_rejects_non_midi(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("not midi")
    if not any(AVAILABLE.values()):
        pytest.skip("no synthesizer installed: the file is never read")
    assert main(["render", str(bad)]) == 1
    assert "notes.txt" in capsys.readouterr().err
