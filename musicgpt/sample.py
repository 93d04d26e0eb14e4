"""`sample_files`: generate pieces from a checkpoint, optionally continuing a primer, and write MIDI.

The part of `musicgpt sample` that deals with files, lengths and seeds; the decoding itself is
`musicgpt.generate`.
"""

from __future__ import annotations

import math
import secrets
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from musicgpt import codec
from musicgpt.atomic import check_output_folder
from musicgpt.backends import check_backend_name, load_engine
from musicgpt.checkpoint_header import choose_checkpoint, peek_controls
from musicgpt.controls import Controls
from musicgpt.devices import check_device_name
from musicgpt.errors import MidiReadError, MusicGPTError
from musicgpt.midi_io import Notes, read_notes
from musicgpt.sampling import (
    DEFAULT_SECONDS,
    MAX_NEW_TOKENS,
    MAX_NOTE_SECONDS,
    MAX_NUM_SAMPLES,
    MAX_PAUSE_SECONDS,
    MAX_SECONDS,
    TOKENS_PER_SECOND_CAP,
    SamplingConfig,
)
from musicgpt.validate import is_integer, is_real
from musicgpt.vocab import TIME_SHIFT, CodecConfig

if TYPE_CHECKING:
    import pretty_midi


@dataclass
class SampleRequest:
    """What `musicgpt sample` asks for; every field has the command line's default."""

    checkpoint: str | Path | None = None  # None: the newest run, else the shipped model
    primer: str | Path | None = None  # a MIDI file to continue; None: start from silence
    primer_seconds: float | None = None  # keep only the primer's first seconds (None: all)
    tokens: int | None = None  # stop after this many tokens (None: by `seconds`)
    seconds: float | None = None  # stop at this much music (None: DEFAULT_SECONDS unless tokens)
    num_samples: int = 1
    seed: int | None = None  # None: a new seed, printed
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    out_dir: str | Path = "samples"
    include_primer: bool = False
    device: str = "cpu"
    threads: int | None = None  # None: 1 on CPU for one or two samples, else the engine's choice
    backend: str = "auto"  # musicgpt.backends: ONNX Runtime on the CPU when installed, else torch
    max_pause_seconds: float = MAX_PAUSE_SECONDS  # math.inf: no limit
    max_note_seconds: float = MAX_NOTE_SECONDS  # math.inf: no limit
    release_sounding_only: bool = True  # False: a NOTE_OFF may name a key that is up (for measuring)
    style: str | None = None  # a style tag the model was trained with (`musicgpt info` lists them)

    def validate(self) -> SampleRequest:
        """Raise a one-line MusicGPTError naming the first invalid option; return self."""
        self.sampling.validate()
        budget(self.tokens, self.seconds)
        if not is_integer(self.num_samples) or not 1 <= self.num_samples <= MAX_NUM_SAMPLES:
            raise MusicGPTError(f"--num-samples must be an integer from 1 to {MAX_NUM_SAMPLES}, "
                                f"got {self.num_samples!r}")
        if self.sampling.deterministic and self.num_samples > 1:
            raise MusicGPTError("--greedy and --beams are deterministic: they give one sample, "
                                "use --num-samples 1")
        if self.seed is not None and (not is_integer(self.seed) or not 0 <= self.seed < 2**63):
            raise MusicGPTError(f"--seed must be an integer in 0 .. 2**63 - 1, got {self.seed!r}")
        if self.primer_seconds is not None and (self.primer is None or not is_real(self.primer_seconds)
                                                or self.primer_seconds <= 0):
            raise MusicGPTError("--primer-seconds needs --primer and a positive number of seconds")
        if self.threads is not None and (not is_integer(self.threads) or self.threads < 1):
            raise MusicGPTError(f"--threads must be an integer >= 1, got {self.threads}")
        check_device_name(self.device)
        check_backend_name(self.backend)
        for flag, value in (("--max-pause", self.max_pause_seconds), ("--max-note", self.max_note_seconds)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise MusicGPTError(f"{flag} must be a positive number of seconds, got {value!r}")
        check_output_folder(self.out_dir)
        return self


def budget(tokens: int | None, seconds: float | None) -> tuple[int, float]:
    """(max_new_tokens, max_seconds) from --tokens / --seconds; by default DEFAULT_SECONDS of music.

    With --tokens alone the music's length is not limited (max_seconds is math.inf)."""
    if tokens is not None and (not is_integer(tokens) or not 1 <= tokens <= MAX_NEW_TOKENS):
        raise MusicGPTError(f"--tokens must be an integer from 1 to {MAX_NEW_TOKENS:,}, got {tokens!r}")
    if seconds is not None and (not is_real(seconds) or not 0 < seconds <= MAX_SECONDS):
        raise MusicGPTError(f"--seconds must be a number above 0 and at most {MAX_SECONDS:g}, got {seconds!r}")
    if tokens is not None:
        return tokens, math.inf if seconds is None else seconds
    seconds = DEFAULT_SECONDS if seconds is None else seconds
    return max(64, math.ceil(seconds * TOKENS_PER_SECOND_CAP)), seconds


def seed_or_new(seed: int | None, sampling: SamplingConfig) -> int:
    """`seed`, or a new one printed on stderr (for a sampled run) so the run can be repeated."""
    if seed is not None:
        return seed
    seed = new_seed()
    if not sampling.deterministic:
        print(f"musicgpt: seed {seed} (pass --seed {seed} to repeat this run)", file=sys.stderr)
    return seed


def new_seed() -> int:
    """A random seed for a run the user did not seed (printed so it can be reproduced)."""
    return secrets.randbelow(2**31)


def continuation_midi(primer: np.ndarray, new: np.ndarray, config: CodecConfig,
                      include_primer: bool) -> pretty_midi.PrettyMIDI:
    """The PrettyMIDI to write: primer + continuation, or the continuation alone shifted to 0.

    Decoding both together gives continuation notes the primer's velocity when no VELOCITY token
    came since, and closes primer notes the continuation releases; without the primer, those
    notes still sounding at the join are kept from time 0, as a listener would hear them.
    """
    notes = codec.decode_notes(np.concatenate([primer, new]).astype(np.int16), config)
    pitch, start, end, velocity = notes.pitch, notes.start, notes.end, notes.velocity
    if not include_primer and len(primer):
        cut = codec.duration_seconds(primer, config)
        kept = end > cut + 1e-9
        pitch, velocity = pitch[kept], velocity[kept]
        start, end = np.maximum(start[kept] - cut, 0.0), end[kept] - cut
    return codec.piano_midi(pitch, start, end, velocity)


def fit_seconds(tokens: np.ndarray, seconds: float, config: CodecConfig) -> np.ndarray:
    """Shorten the final TIME_SHIFT that carried a piece past `seconds` so it ends right there."""
    if not math.isfinite(seconds) or not len(tokens) or not TIME_SHIFT <= tokens[-1] < config.velocity_offset:
        return tokens
    head = tokens[:-1]
    room = round((seconds - codec.duration_seconds(head, config)) / config.step_seconds)
    if room >= int(tokens[-1]) - TIME_SHIFT + 1:
        return tokens
    return np.append(head, TIME_SHIFT + room - 1).astype(tokens.dtype) if room > 0 else head


def claim_file(folder: Path, stem: str) -> Path:
    """Create `folder/stem.mid` exclusively (adding -2, -3, ... if taken) so runs never overwrite."""
    for n in range(1, 10_000):
        path = folder / (f"{stem}.mid" if n == 1 else f"{stem}-{n}.mid")
        try:
            path.open("x").close()
            return path
        except FileExistsError:
            continue
    raise MusicGPTError(f"{folder}: too many samples named {stem}")


def sample_files(request: SampleRequest, *, progress: bool = True,
                 runs_dir: str | Path = "runs") -> list[Path]:
    """Generate `request.num_samples` pieces (one batch) and write them as MIDI files; return their paths.

    Everything the user passed is checked, and the primer read, before the model is loaded; the
    checkpoint is chosen by `choose_checkpoint` (explicit, newest run, shipped default), the
    engine by `musicgpt.backends.load_engine`. Files are named
    `<primer stem or silence>-<YYYYmmdd-HHMMSS>-seed<seed>-<k>.mid` and never overwrite.
    """
    r = request.validate()
    max_new, max_seconds = budget(r.tokens, r.seconds)
    primer_notes = read_notes(r.primer) if r.primer is not None else None  # a bad file fails first
    path, why = choose_checkpoint(r.checkpoint, runs_dir)
    header = peek_controls(path)  # None for a damaged file: load_model below says what is wrong
    controls = header or Controls()
    config = controls.codec
    style = [controls.tag_id(r.style)] if r.style is not None and header else []  # unknown: lists the tags
    primer_tokens = np.zeros(0, dtype=np.int16)
    if primer_notes is not None:
        primer_tokens = encode_primer(r.primer, primer_notes, config, r.primer_seconds)
    if why:
        print(f"musicgpt: {why}", file=sys.stderr)
    engine = load_engine(path, backend=r.backend, device=r.device, threads=r.threads, num_samples=r.num_samples)
    ckpt = engine.checkpoint
    if header is None or ckpt.controls != controls:  # the header was unreadable, or disagreed
        config = ckpt.codec_config
        style = [ckpt.controls.tag_id(r.style)] if r.style is not None else []
        if primer_notes is not None:
            primer_tokens = encode_primer(r.primer, primer_notes, config, r.primer_seconds)
    out_dir = make_output_folder(r.out_dir)
    seed = seed_or_new(r.seed, r.sampling)
    prompt = np.concatenate([style, [config.eos_id], primer_tokens]).astype(np.int64)  # as training frames it
    pieces = engine.generate(prompt, max_new_tokens=max_new, sampling=r.sampling, num_samples=r.num_samples,
                      seed=seed, codec_config=config, max_seconds=max_seconds, progress=progress,
                      ban_eos=True, start_with_note=r.primer is None, max_pause_seconds=r.max_pause_seconds,
                      max_note_seconds=r.max_note_seconds, release_sounding_only=r.release_sounding_only)
    stem = f"{Path(r.primer).stem if r.primer else 'silence'}{'-' + r.style if r.style else ''}"
    stem += f"-{datetime.now():%Y%m%d-%H%M%S}-seed{seed}"
    paths = []
    for k, piece in enumerate(pieces):
        piece = fit_seconds(piece, max_seconds, config)
        midi = continuation_midi(primer_tokens, piece, config, r.include_primer)
        path = claim_file(out_dir, f"{stem}-{k}")
        codec.write_midi(midi, path)
        paths.append(path)
    return paths


def make_output_folder(out_dir: str | Path) -> Path:
    """`out_dir`, created if missing; a one-line error if it cannot be."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MusicGPTError(f"{out_dir}: cannot create the output folder ({e.strerror or e})") from None
    return out_dir


def encode_primer(primer: str | Path, notes: Notes, config: CodecConfig, seconds: float | None) -> np.ndarray:
    """A primer's tokens (its first `seconds` if given); a one-line MidiReadError if none are notes."""
    tokens = codec.encode(notes, config)
    if seconds is not None:
        tokens = codec.truncate_seconds(tokens, seconds, config)
    if codec.count_notes(tokens, config) == 0:
        within = f" in its first {seconds:g} s" if seconds is not None else ""
        raise MidiReadError(f"{primer}: no notes to continue from{within}")
    return np.asarray(tokens, dtype=np.int16)
