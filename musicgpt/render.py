"""Hear MIDI without a DAW: render it to a WAV file with tinysoundfont or FluidSynth (optional).

Both play pretty_midi's bundled General MIDI soundfont (TimGM6mb) unless given another.
tinysoundfont's pip wheels carry the synthesizer itself, so `pip install --no-deps tinysoundfont`
is all a user needs (its `pyaudio` dependency is for live playback, which musicgpt never uses,
and has no Linux wheels); FluidSynth is the fallback, through pyfluidsynth and the system library.
"""

from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np
import pretty_midi

from musicgpt.atomic import atomic_write, check_output_file
from musicgpt.codec import load_midi
from musicgpt.errors import MusicGPTError

INSTALL_HINT = (
    "no synthesizer is available: run `pip install --no-deps tinysoundfont` (or `pip install "
    "'musicgpt[audio]'` plus the FluidSynth library: apt install libfluidsynth3 / brew install fluid-synth)"
)
SYNTHS = ("auto", "tinysoundfont", "fluidsynth")
RELEASE_SECONDS = 1.0  # rendered after the last note-off, so final notes ring out as FluidSynth's do
DRUM_CHANNEL = 9


def default_soundfont() -> Path:
    """The General MIDI soundfont pretty_midi ships (TimGM6mb.sf2)."""
    return Path(pretty_midi.__file__).parent / "TimGM6mb.sf2"


def fluidsynth_available() -> bool:
    """Whether pyfluidsynth and the FluidSynth shared library can be loaded."""
    try:
        import fluidsynth  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def tinysoundfont_available() -> bool:
    """Whether the tinysoundfont module (synthesizer bundled in its wheel) can be imported."""
    try:
        import tinysoundfont  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def choose_synth(synth: str = "auto") -> str:
    """The synthesizer to use: `synth` if installed (auto: tinysoundfont, else FluidSynth), else the hint."""
    if synth not in SYNTHS:
        raise MusicGPTError(f"--synth must be one of {', '.join(SYNTHS)}, got {synth!r}")
    if synth in ("auto", "tinysoundfont") and tinysoundfont_available():
        return "tinysoundfont"
    if synth in ("auto", "fluidsynth") and fluidsynth_available():
        return "fluidsynth"
    raise MusicGPTError(INSTALL_HINT if synth == "auto" else f"{synth} is not installed: {INSTALL_HINT}")


def synth_available() -> bool:
    """Whether `render_wav` can make audio here with either synthesizer."""
    return tinysoundfont_available() or fluidsynth_available()


def _events(midi: pretty_midi.PrettyMIDI) -> tuple[list[tuple], list[tuple[int, int, bool]]]:
    """Time-ordered (time, order, kind, channel, a, b) events, and each channel's (program, is_drum).

    Note-offs sort before control changes before note-ons at the same time, so a repeated key
    is released before it is struck again."""
    melodic = [c for c in range(16) if c != DRUM_CHANNEL]
    events, programs = [], []
    for i, inst in enumerate(midi.instruments):
        chan = DRUM_CHANNEL if inst.is_drum else melodic[i % len(melodic)]
        programs.append((chan, inst.program, inst.is_drum))
        for n in inst.notes:
            events += [(n.start, 2, "on", chan, n.pitch, n.velocity), (n.end, 0, "off", chan, n.pitch, 0)]
        events += [(c.time, 1, "cc", chan, c.number, c.value) for c in inst.control_changes]
    return sorted(events, key=lambda e: e[:2]), programs


def synthesize_tinysoundfont(midi: pretty_midi.PrettyMIDI, sample_rate: int, soundfont: Path) -> np.ndarray:
    """Mono float audio of `midi` from tinysoundfont: events applied at their sample, audio between."""
    import tinysoundfont

    synth = tinysoundfont.Synth(samplerate=sample_rate)
    sfid = synth.sfload(str(soundfont))
    events, programs = _events(midi)
    for chan, program, drum in programs:
        synth.program_select(chan, sfid, 0, program, is_drums=drum)
    chunks, done = [], 0
    for time, _, kind, chan, a, b in events:
        if (due := int(round(time * sample_rate)) - done) > 0:
            chunks.append(np.frombuffer(synth.generate(due), dtype=np.float32))
            done += due
        if kind == "on":
            synth.noteon(chan, a, b)
        elif kind == "off":
            synth.noteoff(chan, a)
        else:
            synth.control_change(chan, a, b)
    chunks.append(np.frombuffer(synth.generate(int(RELEASE_SECONDS * sample_rate)), dtype=np.float32))
    return np.concatenate(chunks).reshape(-1, 2).mean(axis=1)  # interleaved stereo -> mono


def render_wav(
    midi_path: str | os.PathLike,
    wav_path: str | os.PathLike,
    *,
    soundfont: str | os.PathLike | None = None,
    sample_rate: int = 44100,
    synth: str = "auto",
) -> Path:
    """Synthesize `midi_path` to a 16-bit mono WAV at `sample_rate`, peak-normalised."""
    check_output_file(wav_path)
    if soundfont is not None and not Path(soundfont).is_file():
        raise MusicGPTError(f"{soundfont}: soundfont not found")
    if not 8000 <= sample_rate <= 192000:
        raise MusicGPTError(f"--sample-rate must be between 8000 and 192000, got {sample_rate}")
    name = choose_synth(synth)
    midi = load_midi(midi_path)
    if name == "tinysoundfont":
        audio = synthesize_tinysoundfont(midi, sample_rate, Path(soundfont or default_soundfont()))
    else:
        audio = midi.fluidsynth(fs=sample_rate, sf2_path=str(soundfont) if soundfont else None)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak > 0:
        audio = audio / peak * 0.9  # leave headroom; output level varies by soundfont and synthesizer
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    out = Path(wav_path)
    with atomic_write(out) as f, wave.open(f, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return out
