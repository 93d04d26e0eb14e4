"""`sample_files`: generate pieces from a checkpoint, optionally continuing a primer, and write MIDI.

The part of `musicgpt sample` that deals with files, lengths and seeds; the decoding itself is
`musicgpt.generate`.
"""

from __future__ import annotations

import math
import secrets
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from musicgpt import codec
from musicgpt.checkpoint import choose_checkpoint, load_model
from musicgpt.errors import MidiReadError, MusicGPTError
from musicgpt.generate import SamplingConfig, _integer, _real, generate, pick_device
from musicgpt.vocab import TIME_SHIFT, CodecConfig

DEFAULT_SECONDS = 30.0  # music written when neither --tokens nor --seconds is given
TOKENS_PER_SECOND_CAP = 100  # --seconds S also stops after S * 100 tokens (midi_data/ averages 19/s)
# Limits that real piano music keeps (musicgpt.constraints enforces them while sampling). In
# midi_data/ (pedal applied; 699 pieces) 99.9% of gaps between note onsets are under 2.7 s (the
# longest 15 s) and 99.9% of notes under 11.7 s. Without them the default model once wrote one
# note in 60 s (locked into 1-second TIME_SHIFTs), and 2-3% of its notes rang for 15-60 s.
MAX_PAUSE_SECONDS = 4.0
MAX_NOTE_SECONDS = 12.0


def budget(tokens: int | None, seconds: float | None) -> tuple[int, float | None]:
    """(max_new_tokens, max_seconds) from --tokens / --seconds; by default 30 s of music."""
    if tokens is not None and (not _integer(tokens) or tokens < 1):
        raise MusicGPTError(f"--tokens must be a positive integer, got {tokens!r}")
    if seconds is not None and (not _real(seconds) or seconds <= 0):
        raise MusicGPTError(f"--seconds must be a positive number, got {seconds!r}")
    if tokens is not None:
        return tokens, seconds
    seconds = DEFAULT_SECONDS if seconds is None else seconds
    return max(64, math.ceil(seconds * TOKENS_PER_SECOND_CAP)), seconds


def new_seed() -> int:
    """A random seed for a run the user did not seed (printed so it can be reproduced)."""
    return secrets.randbelow(2**31)


def _continuation(primer: np.ndarray, new: np.ndarray, config: CodecConfig, include_primer: bool):
    """The PrettyMIDI to write: primer + continuation, or the continuation alone shifted to 0.

    Decoding both together gives continuation notes the primer's velocity when no VELOCITY token
    came since, and closes primer notes the continuation releases; without the primer, those
    notes still sounding at the join are kept from time 0, as a listener would hear them.
    """
    midi = codec.decode(np.concatenate([primer, new]).astype(np.int16), config)
    if include_primer or len(primer) == 0:
        return midi
    cut = codec.duration_seconds(primer, config)
    for inst in midi.instruments:
        kept = [n for n in inst.notes if n.end > cut + 1e-9]
        for n in kept:
            n.start, n.end = max(n.start - cut, 0.0), n.end - cut
        inst.notes = kept
    return midi


def _fit_seconds(tokens: np.ndarray, seconds: float | None, config: CodecConfig) -> np.ndarray:
    """Shorten the final TIME_SHIFT that carried a piece past `seconds` so it ends right there."""
    if seconds is None or not len(tokens) or not TIME_SHIFT <= tokens[-1] < config.velocity_offset:
        return tokens
    head = tokens[:-1]
    room = round((seconds - codec.duration_seconds(head, config)) / config.step_seconds)
    if room >= int(tokens[-1]) - TIME_SHIFT + 1:
        return tokens
    return np.append(head, TIME_SHIFT + room - 1).astype(tokens.dtype) if room > 0 else head


def _claim(folder: Path, stem: str) -> Path:
    """Create `folder/stem.mid` exclusively (adding -2, -3, ... if taken) so runs never overwrite."""
    for n in range(1, 10_000):
        path = folder / (f"{stem}.mid" if n == 1 else f"{stem}-{n}.mid")
        try:
            path.open("x").close()
            return path
        except FileExistsError:
            continue
    raise MusicGPTError(f"{folder}: too many samples named {stem}")


def sample_files(checkpoint: str | Path | None = None, primer: str | Path | None = None,
                 primer_seconds: float | None = None, tokens: int | None = None,
                 seconds: float | None = None, num_samples: int = 1, seed: int | None = None,
                 sampling: SamplingConfig | None = None, out_dir: str | Path = "samples",
                 include_primer: bool = False, device: str = "cpu", progress: bool = True,
                 runs_dir: str | Path = "runs", threads: int | None = None,
                 max_pause_seconds: float | None = None,
                 max_note_seconds: float | None = None) -> list[Path]:
    """Generate `num_samples` pieces (one batch) and write them as MIDI files; return their paths.

    No pause leaves more than `max_pause_seconds` without a new note, and no note sounds longer
    than `max_note_seconds` (None: MAX_PAUSE_SECONDS and MAX_NOTE_SECONDS; 0: no limit).

    Everything the user passed is checked before the model is loaded; the checkpoint is chosen
    by `choose_checkpoint` (explicit, newest run, shipped default). Files are named
    `<primer stem or silence>-<YYYYmmdd-HHMMSS>-seed<seed>-<k>.mid` and never overwrite.
    On CPU, one or two samples run on one thread unless `threads` says otherwise: a one-token
    step of a small model is latency-bound, and extra threads only add synchronisation (and
    collapse when other programs share the cores).
    """
    sampling = (sampling or SamplingConfig()).validate()
    max_new, max_seconds = budget(tokens, seconds)
    _check_request(sampling, num_samples, seed, primer, primer_seconds)
    max_pause_seconds = _limit("--max-pause", max_pause_seconds, MAX_PAUSE_SECONDS)
    max_note_seconds = _limit("--max-note", max_note_seconds, MAX_NOTE_SECONDS)
    device = pick_device(device)
    primer_tokens = np.zeros(0, dtype=np.int16)
    if primer is not None:  # read (and so validate) the primer before any model work
        primer_tokens = _encode_primer(primer, CodecConfig(), primer_seconds)
    path, note = choose_checkpoint(checkpoint, runs_dir)
    if note:
        print(f"musicgpt: {note}", file=sys.stderr)
    if threads is not None and (not _integer(threads) or threads < 1):
        raise MusicGPTError(f"--threads must be an integer >= 1, got {threads}")
    if device == "cpu" and (threads or num_samples <= 2):
        torch.set_num_threads(threads or 1)
    model, ckpt = load_model(path, device)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MusicGPTError(f"{out_dir}: cannot create the output folder ({e.strerror or e})") from None
    if seed is None:
        seed = new_seed()
        if not sampling.deterministic:
            print(f"musicgpt: seed {seed} (pass --seed {seed} to repeat this run)", file=sys.stderr)

    config = ckpt.codec_config
    if primer is not None and config != CodecConfig():
        primer_tokens = _encode_primer(primer, config, primer_seconds)
    prompt = np.concatenate([[config.eos_id], primer_tokens]).astype(np.int64)
    pieces = generate(model, prompt, max_new_tokens=max_new, sampling=sampling, num_samples=num_samples,
                      seed=seed, codec_config=config, max_seconds=max_seconds, progress=progress,
                      ban_eos=True, start_with_note=primer is None, max_pause_seconds=max_pause_seconds,
                      max_note_seconds=max_note_seconds)

    stem = f"{Path(primer).stem if primer else 'silence'}-{datetime.now():%Y%m%d-%H%M%S}-seed{seed}"
    paths = []
    for k, piece in enumerate(pieces):
        piece = _fit_seconds(piece.numpy(), max_seconds, config)
        midi = _continuation(primer_tokens, piece, config, include_primer)
        path = _claim(out_dir, f"{stem}-{k}")
        codec.write_midi(midi, path)
        paths.append(path)
    return paths


def _check_request(sampling: SamplingConfig, num_samples, seed, primer, primer_seconds) -> None:
    if not _integer(num_samples) or num_samples < 1:
        raise MusicGPTError(f"--num-samples must be a positive integer, got {num_samples!r}")
    if sampling.deterministic and num_samples > 1:
        raise MusicGPTError("--greedy and --beams are deterministic: they give one sample, use --num-samples 1")
    if seed is not None and (not _integer(seed) or not 0 <= seed < 2**63):
        raise MusicGPTError(f"--seed must be an integer in 0 .. 2**63 - 1, got {seed!r}")
    if primer_seconds is not None and (primer is None or not _real(primer_seconds) or primer_seconds <= 0):
        raise MusicGPTError("--primer-seconds needs --primer and a positive number of seconds")


def _limit(flag: str, value, default: float) -> float | None:
    """A limit in seconds as the sampler takes it: None for the default, 0 for none."""
    if value is None:
        return default
    if not _real(value) or value < 0:
        raise MusicGPTError(f"{flag} must be a number of seconds >= 0 (0: no limit), got {value!r}")
    return value or None


def _encode_primer(primer, config: CodecConfig, seconds: float | None) -> np.ndarray:
    tokens = codec.encode(primer, config)
    if seconds is not None:
        tokens = codec.truncate_seconds(tokens, seconds, config)
    if codec.count_notes(tokens, config) == 0:
        within = f" in its first {seconds:g} s" if seconds is not None else ""
        raise MidiReadError(f"{primer}: no notes to continue from{within}")
    return np.asarray(tokens, dtype=np.int16)
