"""Hear MIDI without a DAW: render it to a WAV file through FluidSynth (optional extra).

pretty_midi drives FluidSynth and bundles a small General MIDI soundfont (TimGM6mb), so
`pip install 'musicgpt[audio]'` plus the FluidSynth library is all a user needs.
"""

from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np

from musicgpt.atomic import atomic_write, check_output_file
from musicgpt.codec import load_midi
from musicgpt.errors import MusicGPTError

INSTALL_HINT = (
    "FluidSynth is not available: run `pip install 'musicgpt[audio]'` and install the FluidSynth "
    "library (Debian/Ubuntu: apt install libfluidsynth3; macOS: brew install fluid-synth)"
)


def fluidsynth_available() -> bool:
    """Whether pyfluidsynth and the FluidSynth shared library can be loaded."""
    try:
        import fluidsynth  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def render_wav(
    midi_path: str | os.PathLike,
    wav_path: str | os.PathLike,
    *,
    soundfont: str | os.PathLike | None = None,
    sample_rate: int = 44100,
) -> Path:
    """Synthesize `midi_path` to a 16-bit mono WAV at `sample_rate`, peak-normalised."""
    check_output_file(wav_path)
    if soundfont is not None and not Path(soundfont).is_file():
        raise MusicGPTError(f"{soundfont}: soundfont not found")
    if not 8000 <= sample_rate <= 192000:
        raise MusicGPTError(f"--sample-rate must be between 8000 and 192000, got {sample_rate}")
    if not fluidsynth_available():
        raise MusicGPTError(INSTALL_HINT)
    midi = load_midi(midi_path)
    audio = midi.fluidsynth(fs=sample_rate, sf2_path=str(soundfont) if soundfont else None)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak > 0:
        audio = audio / peak * 0.9  # leave headroom; FluidSynth output level varies by soundfont
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    out = Path(wav_path)
    with atomic_write(out) as f, wave.open(f, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return out
