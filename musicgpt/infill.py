"""`musicgpt infill`: write new music between two times of a piece with a fill-in-the-middle model.

The piece's notes are cut on the codec's time grid into the notes before the gap, the gap and the
notes after it (`split_piece` gives the rule for notes held across a boundary). The model reads
`[TAG] FIM_PREFIX prefix FIM_SUFFIX suffix FIM_MIDDLE`, the order it was trained on
(`musicgpt.fim`), and writes a middle lasting exactly the gap. The result is built from notes: the
original's before the gap, the new middle's in the gap, the original's after it, so the music
outside the gap keeps the original's times (to the MIDI tick) and velocities.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pretty_midi

from musicgpt import codec
from musicgpt.atomic import check_output_file
from musicgpt.backends import load_engine
from musicgpt.checkpoint_header import choose_checkpoint, peek_controls
from musicgpt.controls import Controls
from musicgpt.errors import MidiReadError, MusicGPTError
from musicgpt.midi_io import Notes, read_notes, subset
from musicgpt.sample import (
    SampleRequest,
    claim_file,
    fit_seconds,
    make_output_folder,
    seed_or_new,
)
from musicgpt.sampling import MAX_NOTE_SECONDS, MAX_PAUSE_SECONDS, MAX_SECONDS, TOKENS_PER_SECOND_CAP, SamplingConfig
from musicgpt.validate import is_real
from musicgpt.vocab import TIME_SHIFT, CodecConfig

# Room for the middle before its length is known: the replaced passage's tokens and half again
# (a model may write more densely), at least this many, and at most half the context.
MIN_MIDDLE_ROOM = 64


@dataclass
class InfillRequest:
    """What `musicgpt infill` asks for; every field but the piece and the times has the command line's default."""

    midi: str | Path
    start: float  # seconds: the gap is [start, end)
    end: float
    checkpoint: str | Path | None = None  # None: the newest run, else the shipped model
    output: str | Path | None = None  # one file to write (one sample); None: named files in out_dir
    out_dir: str | Path = "samples"
    num_samples: int = 1
    seed: int | None = None  # None: a new seed, printed
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    style: str | None = None  # a style tag of the model, put before FIM_PREFIX as in training
    device: str = "cpu"
    threads: int | None = None  # None: 1 on CPU for one or two samples, else the engine's choice
    backend: str = "auto"  # musicgpt.backends: ONNX Runtime on the CPU when installed, else torch
    max_pause_seconds: float = MAX_PAUSE_SECONDS  # math.inf: no limit
    max_note_seconds: float = MAX_NOTE_SECONDS  # math.inf: no limit

    def validate(self) -> InfillRequest:
        """Raise a one-line MusicGPTError naming the first invalid option; return self."""
        for flag, value in (("--start", self.start), ("--end", self.end)):
            if not is_real(value) or value < 0:
                raise MusicGPTError(f"{flag} must be a number of seconds >= 0, got {value!r}")
        if self.end <= self.start:
            raise MusicGPTError(f"--end ({self.end:g}) must come after --start ({self.start:g})")
        if self.end - self.start > MAX_SECONDS:
            raise MusicGPTError(f"the gap may last at most {MAX_SECONDS:g} s")
        if self.output is not None and self.num_samples != 1:
            raise MusicGPTError("-o writes one file: use --out DIR for several samples")
        folder = self.out_dir if self.output is None else Path(self.output).parent
        # The decoding options are those of `sample`, checked the same way.
        SampleRequest(num_samples=self.num_samples, seed=self.seed, sampling=self.sampling, out_dir=folder,
                      threads=self.threads, backend=self.backend, max_pause_seconds=self.max_pause_seconds,
                      max_note_seconds=self.max_note_seconds).validate()
        if self.output is not None:
            check_output_file(self.output)
        return self


@dataclass
class Gap:
    """A piece cut for infilling at steps [start_step, end_step) of the codec's grid."""

    start_step: int
    end_step: int
    before: Notes  # struck before the gap, cut at its start: kept
    replaced: Notes  # struck in the gap: what the middle replaces
    after: Notes  # struck at or after the gap's end: kept as they are
    config: CodecConfig

    @property
    def start(self) -> float:
        return self.start_step * self.config.step_seconds

    @property
    def end(self) -> float:
        return self.end_step * self.config.step_seconds

    @property
    def seconds(self) -> float:
        return (self.end_step - self.start_step) * self.config.step_seconds


@dataclass
class InfillPrompt:
    """What the model reads, and the tokens the middle is decoded after."""

    tokens: np.ndarray  # [TAG] FIM_PREFIX prefix tail FIM_SUFFIX suffix head FIM_MIDDLE lead
    prefix: np.ndarray  # the whole music before the gap, from time 0 (no EOS)
    lead: np.ndarray  # TIME_SHIFTs from the prefix's last event to the gap's start: the middle's first tokens
    prefix_kept: int  # tokens of EOS + prefix the model sees (its last ones)
    suffix_kept: int  # tokens of suffix + EOS the model sees (its first ones)
    max_new_tokens: int

    @property
    def music_before(self) -> np.ndarray:
        """The music the middle continues, for the decoding rules (pauses, held notes)."""
        return np.concatenate([self.prefix, self.lead]).astype(np.int64)


def piece_seconds(notes: Notes) -> float:
    """When a piece's last note ends (0 for no notes)."""
    return float(notes.end.max()) if len(notes) else 0.0


def check_times(start: float, end: float, notes: Notes, config: CodecConfig) -> None:
    """A one-line error unless [start, end) is a gap of at least one step inside the piece."""
    length = piece_seconds(notes)
    if start >= length:
        raise MusicGPTError(f"--start {start:g} s is not before the piece's end ({length:.2f} s)")
    if end > length + config.step_seconds:
        raise MusicGPTError(f"--end {end:g} s is after the piece's end ({length:.2f} s): the gap must lie inside it")
    if steps(end, config) <= steps(start, config):
        raise MusicGPTError(f"the gap from {start:g} to {end:g} s is shorter than one {config.step_ms} ms step")


def steps(seconds: float, config: CodecConfig) -> int:
    """The grid step nearest to `seconds`."""
    return int(round(seconds * 1000.0 / config.step_ms))


def split_piece(notes: Notes, start: float, end: float, config: CodecConfig) -> Gap:
    """Cut a piece at `start` and `end` (rounded to the grid) by where each note is struck.

    A note struck before `start` is kept, cut at `start` if it still sounds there; one struck in
    the gap is replaced (even if it sounds past `end`); one struck at or after `end` is kept whole.
    """
    a, b = steps(start, config), steps(end, config)
    on = codec.grid_steps(notes.start, config)
    before, after = on < a, on >= b
    return Gap(a, b, subset(notes, before, until=a * config.step_seconds), subset(notes, ~before & ~after),
               subset(notes, after), config)


def shift_tokens(n: int, config: CodecConfig) -> np.ndarray:
    """TIME_SHIFTs moving time on `n` steps, the longest first (as `codec.encode` splits a gap)."""
    full, rest = divmod(max(n, 0), config.max_shift_steps)
    out = [TIME_SHIFT + config.max_shift_steps - 1] * full + ([TIME_SHIFT + rest - 1] if rest else [])
    return np.array(out, dtype=np.int64)


def infill_prompt(gap: Gap, fim_ids: tuple[int, int, int], context_len: int, tag: int | None = None) -> InfillPrompt:
    """The PSM prompt for `gap`, fitted so that it and the middle fit in `context_len` tokens.

    The middle gets room for the replaced passage's tokens and half again (64 at least, half the
    context at most); the prefix (EOS + its tokens) keeps its last tokens and the suffix (its
    tokens + EOS) its first ones, sharing the rest half and half (one's unused share goes to the
    other), so each keeps at least about a quarter of the context. A longer middle slides the window.
    """
    cfg = gap.config
    prefix = codec.encode(gap.before, cfg).astype(np.int64)
    suffix = codec.encode(subset(gap.after, np.ones(len(gap.after), bool), gap.end), cfg).astype(np.int64)
    replaced = codec.encode(subset(gap.replaced, np.ones(len(gap.replaced), bool), gap.start), cfg)
    lead = shift_tokens(gap.start_step - steps(codec.duration_seconds(prefix, cfg), cfg), cfg)
    eos = np.array([cfg.eos_id], dtype=np.int64)
    pre, suf = np.concatenate([eos, prefix]), np.concatenate([suffix, eos])
    middle_room = min(max(3 * len(replaced) // 2, MIN_MIDDLE_ROOM), context_len // 2)
    fixed = 3 + (tag is not None) + len(lead)
    room = max(context_len - middle_room - fixed, 2)
    keep_pre = min(len(pre), max(room // 2, room - len(suf)))
    keep_suf = min(len(suf), room - keep_pre)
    fim_pre, fim_suf, fim_mid = fim_ids
    tokens = np.concatenate([[tag] if tag is not None else [], [fim_pre], pre[len(pre) - keep_pre:], [fim_suf],
                             suf[:keep_suf], [fim_mid], lead]).astype(np.int64)
    max_new = max(MIN_MIDDLE_ROOM, math.ceil(gap.seconds * TOKENS_PER_SECOND_CAP))
    return InfillPrompt(tokens, prefix, lead, keep_pre, keep_suf, max_new)


def middle_notes(gap: Gap, prompt: InfillPrompt, middle: np.ndarray) -> Notes:
    """The notes of generated `middle` tokens at their times in the piece, released by the gap's end.

    Decoded after the whole prefix, so a note without its own VELOCITY token plays at the one in force.
    """
    tokens = np.concatenate([prompt.prefix, prompt.lead, np.asarray(middle, dtype=np.int64)])
    d = codec.decode_notes(tokens, gap.config)
    new = (d.on_index >= len(prompt.prefix)) & (d.start < gap.end - 1e-9)
    return Notes(d.pitch[new], d.start[new], np.minimum(d.end[new], gap.end), d.velocity[new])


def notes_to_midi(*parts: Notes) -> pretty_midi.PrettyMIDI:
    """One piano part (120 bpm, as `codec.decode` writes) holding the notes of every part."""
    pm = pretty_midi.PrettyMIDI(resolution=codec.RESOLUTION, initial_tempo=codec.TEMPO_BPM)
    piano = pretty_midi.Instrument(program=0, name="Piano")
    for notes in parts:
        piano.notes += [pretty_midi.Note(velocity=int(v), pitch=int(p), start=float(s), end=float(e))
                        for p, s, e, v in zip(notes.pitch, notes.start, notes.end, notes.velocity)]
    piano.notes.sort(key=lambda n: (n.start, n.pitch))
    pm.instruments.append(piano)
    return pm


def assemble(gap: Gap, prompt: InfillPrompt, middle: np.ndarray) -> pretty_midi.PrettyMIDI:
    """The infilled piece: the original's notes before the gap, the middle's in it, the original's after it."""
    return notes_to_midi(gap.before, middle_notes(gap, prompt, middle), gap.after)


def _fim_controls(path: Path, controls: Controls | None, style: str | None) -> tuple[tuple[int, int, int], int | None]:
    """The FIM ids and style tag id of a checkpoint's controls, or its one-line refusal."""
    if controls is None:  # an unreadable header: load_model names the problem
        return (0, 0, 0), None
    try:
        return controls.fim_ids, controls.tag_id(style) if style is not None else None
    except MusicGPTError as e:
        raise MusicGPTError(f"{path}: {e}") from None


def infill_files(request: InfillRequest, *, progress: bool = True, runs_dir: str | Path = "runs") -> list[Path]:
    """Regenerate `request`'s gap `num_samples` times (one batch), write each result as MIDI; return the paths.

    Every option, the piece, the times and the checkpoint's FIM tokens are checked before the model
    loads. Files are `<stem>-infill-<start>-<end>-<YYYYmmdd-HHMMSS>-seed<seed>-<k>.mid` in `out_dir`,
    never overwriting, or `output` for one sample.
    """
    r = request.validate()
    notes = read_notes(r.midi)
    if not len(notes):
        raise MidiReadError(f"{r.midi}: no notes to infill")
    path, why = choose_checkpoint(r.checkpoint, runs_dir)
    header = peek_controls(path)
    check_times(r.start, r.end, notes, header.codec if header else CodecConfig())
    _fim_controls(path, header, r.style)
    if why:
        print(f"musicgpt: {why}", file=sys.stderr)
    engine = load_engine(path, backend=r.backend, device=r.device, threads=r.threads, num_samples=r.num_samples)
    ckpt = engine.checkpoint
    fim_ids, tag = _fim_controls(path, ckpt.controls, r.style)
    config = ckpt.codec_config
    check_times(r.start, r.end, notes, config)
    gap = split_piece(notes, r.start, r.end, config)
    prompt = infill_prompt(gap, fim_ids, ckpt.model_config.context_len, tag)
    seed = seed_or_new(r.seed, r.sampling)
    middles = engine.generate(prompt.tokens, max_new_tokens=prompt.max_new_tokens, sampling=r.sampling,
                       num_samples=r.num_samples, seed=seed, codec_config=config, max_seconds=gap.seconds,
                       progress=progress, ban_eos=True, max_pause_seconds=r.max_pause_seconds,
                       max_note_seconds=r.max_note_seconds, music_before=prompt.music_before)
    return _write(r, gap, prompt, [fit_seconds(m, gap.seconds, config) for m in middles], seed)


def _write(r: InfillRequest, gap: Gap, prompt: InfillPrompt, middles: list[np.ndarray], seed: int) -> list[Path]:
    """Write one infilled piece per middle where `r` says; their paths."""
    if r.output is not None:
        make_output_folder(Path(r.output).parent)
        codec.write_midi(assemble(gap, prompt, middles[0]), r.output)
        return [Path(r.output)]
    out_dir = make_output_folder(r.out_dir)
    stem = f"{Path(r.midi).stem}-infill-{r.start:g}-{r.end:g}-{datetime.now():%Y%m%d-%H%M%S}-seed{seed}"
    paths = []
    for k, middle in enumerate(middles):
        path = claim_file(out_dir, f"{stem}-{k}")
        codec.write_midi(assemble(gap, prompt, middle), path)
        paths.append(path)
    return paths
