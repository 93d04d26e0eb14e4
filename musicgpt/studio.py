"""What `musicgpt app` does, without gradio: primers, models, variations, continuing, infilling, attention.

Each function works in a folder it is given (the app makes one per request, so concurrent users
never share files) and returns paths for the page to show. Errors are one-line MusicGPTErrors.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from musicgpt import codec
from musicgpt.checkpoint_header import (
    CheckpointError,
    choose_checkpoint,
    default_model_available,
    peek_controls,
    resolve_checkpoint,
    run_folders,
)
from musicgpt.controls import Controls
from musicgpt.errors import MidiReadError, MusicGPTError
from musicgpt.infill import InfillRequest, infill_files, notes_to_midi, piece_seconds
from musicgpt.midi_io import read_notes, subset
from musicgpt.sample import SampleRequest, encode_primer, new_seed, sample_files
from musicgpt.sampling import MAX_NOTE_SECONDS, MAX_PAUSE_SECONDS, SamplingConfig

MAX_VARIATIONS = 4
METHODS = ("sample", "greedy", "beam search")
PACKAGE_PRIMERS = Path(__file__).parent / "primers"  # a few held-out pieces shipped in the package
REPO_PRIMERS = Path(__file__).parent.parent / "samples" / "primers"  # the rest, in a source checkout


@dataclass
class Primer:
    """The music a generation continues: the kept part of a piece, written as MIDI, or silence."""

    midi: Path | None  # None: start from silence
    seconds: float = 0.0  # how long the kept part lasts
    source_seconds: float = 0.0  # how long the whole piece lasts
    picture: Path | None = None


@dataclass
class Settings:
    """How to generate: the page's knobs, with the command line's defaults."""

    checkpoint: str = "default"
    style: str | None = None
    seconds: float = 10.0
    method: str = "sample"  # one of METHODS
    temperature: float = SamplingConfig.temperature
    top_k: int = SamplingConfig.top_k
    top_p: float = SamplingConfig.top_p
    top_p_scope: str = SamplingConfig.top_p_scope
    typical_p: float = SamplingConfig.typical_p
    min_p: float = SamplingConfig.min_p
    num_beams: int = 4
    max_pause: float = MAX_PAUSE_SECONDS  # 0: no limit
    max_note: float = MAX_NOTE_SECONDS  # 0: no limit
    seed: int | None = None  # None: a new one, shown with the results
    variations: int = 1

    def sampling(self) -> SamplingConfig:
        """The SamplingConfig of the chosen method (filters apply to sampling only)."""
        if self.method not in METHODS:
            raise MusicGPTError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "greedy":
            return SamplingConfig(greedy=True)
        if self.method == "beam search":
            return SamplingConfig(num_beams=int(self.num_beams))
        return SamplingConfig(temperature=self.temperature, top_k=int(self.top_k), top_p=self.top_p,
                              top_p_scope=self.top_p_scope, typical_p=self.typical_p,
                              min_p=self.min_p)

    def request_options(self) -> dict:
        """The fields SampleRequest and InfillRequest share; checked when the request validates."""
        if not 1 <= self.variations <= MAX_VARIATIONS:
            raise MusicGPTError(f"variations must be from 1 to {MAX_VARIATIONS}, got {self.variations!r}")
        return dict(checkpoint=self.checkpoint, style=self.style or None, num_samples=int(self.variations),
                    sampling=self.sampling(), max_pause_seconds=no_limit(self.max_pause),
                    max_note_seconds=no_limit(self.max_note))


@dataclass
class Variation:
    """One generated piece and what the page shows of it."""

    midi: Path
    picture: Path
    wav: Path | None  # None: no synthesizer here (`note` says how to get one)
    boundary: float = 0.0  # seconds where the primer ends and the model's music begins (0: none)
    spans: list[tuple[float, float]] = field(default_factory=list)  # infilled ranges
    seed: int = 0
    note: str = ""


def no_limit(value: float) -> float:
    """The page's 0 ("no limit") as the request's math.inf."""
    return math.inf if value == 0 else value


def new_workdir(root: str | Path) -> Path:
    """A fresh folder under `root` for one request's files."""
    Path(root).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=root))


def shipped_primers() -> dict[str, Path]:
    """Held-out pieces to start from, by file stem: the package's, then a source checkout's samples/primers."""
    found: dict[str, Path] = {}
    for folder in (PACKAGE_PRIMERS, REPO_PRIMERS):
        for path in sorted(folder.glob("*.mid")) if folder.is_dir() else []:
            found.setdefault(path.stem, path)
    return found


def list_models(runs_dir: str | Path = "runs", checkpoint: str | None = None) -> dict[str, str]:
    """Models to choose from, label -> checkpoint spec: `checkpoint` if given, the shipped default, every run."""
    models = {}
    if checkpoint is not None:
        models[f"{checkpoint} (--checkpoint)"] = str(resolve_checkpoint(checkpoint))
    if default_model_available():
        models["default (shipped)"] = "default"
    for run in run_folders(runs_dir):
        models[f"{run.name} (runs/)"] = str(run)
    if not models:
        choose_checkpoint(None, runs_dir)  # raises the "train one first" error
    return models


def model_styles(spec: str) -> list[str]:
    """The style tags of checkpoint `spec` (empty for a model trained without tags)."""
    try:
        controls = peek_controls(resolve_checkpoint(spec))
    except CheckpointError:
        return []
    return list(controls.tags) if controls else []


def prepare_primer(source: str | Path | None, keep_seconds: float | None, workdir: Path) -> Primer:
    """Read `source` (None: silence), keep its first `keep_seconds` (None: all), write that and its piano roll."""
    from musicgpt.plot import plot_piano_roll

    if source is None:
        return Primer(None)
    notes = read_notes(source)  # a one-line MidiReadError for a bad file
    length = piece_seconds(notes)
    if keep_seconds is not None:
        if not keep_seconds > 0:
            raise MusicGPTError(f"keep a positive number of seconds of the primer, got {keep_seconds!r}")
        notes = subset(notes, notes.start < keep_seconds, until=keep_seconds)
    if not len(notes):
        raise MidiReadError(f"{Path(source).name}: no notes to continue from"
                            + (f" in its first {keep_seconds:g} s" if keep_seconds is not None else ""))
    midi = workdir / f"{Path(source).stem}-primer.mid"
    codec.write_midi(notes_to_midi(notes), midi)
    picture = plot_piano_roll(midi, midi.with_suffix(".png"), title=f"primer: {Path(source).name}")
    return Primer(midi, piece_seconds(notes), length, picture)


def primer_boundary(primer: Primer, checkpoint: str) -> float:
    """Where the continuation starts in a piece written with its primer: the end of the primer's tokens."""
    if primer.midi is None:
        return 0.0
    controls = peek_controls(resolve_checkpoint(checkpoint)) or Controls()
    tokens = encode_primer(primer.midi, read_notes(primer.midi), controls.codec, None)
    return codec.duration_seconds(tokens, controls.codec)


def finish(midi: Path, *, boundary: float = 0.0, spans: list[tuple[float, float]] | None = None,
           seed: int = 0, title: str = "") -> Variation:
    """A written piece with its piano roll (boundary and spans marked) and, where a synthesizer is, its WAV."""
    from musicgpt.plot import plot_piano_roll
    from musicgpt.render import render_wav

    spans = spans or []
    picture = plot_piano_roll(midi, midi.with_suffix(".png"), title=title or midi.name, spans=spans,
                              marks=[boundary] if boundary > 0 else [])
    try:
        wav, note = render_wav(midi, midi.with_suffix(".wav")), ""
    except MusicGPTError as e:  # no synthesizer: the MIDI and the picture are still worth showing
        wav, note = None, str(e)
    return Variation(midi, picture, wav, boundary, spans, seed, note)


def generate(primer: Primer, settings: Settings, workdir: Path, *, runs_dir: str | Path = "runs",
             progress: bool = False) -> list[Variation]:
    """`settings.variations` continuations of `primer` (primer included), each with picture and audio."""
    seed = settings.seed if settings.seed is not None else new_seed()
    request = SampleRequest(primer=primer.midi, seconds=settings.seconds, seed=seed, out_dir=workdir,
                            include_primer=True, **settings.request_options())
    paths = sample_files(request, progress=progress, runs_dir=runs_dir)
    boundary = primer_boundary(primer, settings.checkpoint)
    return [finish(p, boundary=boundary, seed=seed, title=f"variation {k + 1} (seed {seed})")
            for k, p in enumerate(paths)]


def continue_from(variation: str | Path, workdir: Path) -> Primer:
    """A result as the next primer, all of it kept."""
    return prepare_primer(variation, None, workdir)


def infill(midi: str | Path, start: float, end: float, settings: Settings, workdir: Path, *,
           runs_dir: str | Path = "runs", progress: bool = False) -> list[Variation]:
    """Rewrite [start, end) seconds of `midi` `settings.variations` times, the range shaded in each picture."""
    seed = settings.seed if settings.seed is not None else new_seed()
    request = InfillRequest(midi=midi, start=start, end=end, seed=seed, out_dir=workdir,
                            **settings.request_options())
    paths = infill_files(request, progress=progress, runs_dir=runs_dir)
    return [finish(p, spans=[(start, end)], seed=seed, title=f"infilled {start:g}-{end:g} s, variation {k + 1}")
            for k, p in enumerate(paths)]


def attention_page(midi: str | Path, checkpoint: str, workdir: Path) -> Path:
    """The offline interactive attention-arcs page (musicgpt.attention_plot) of `midi` under `checkpoint`."""
    from musicgpt.attention_plot import render_attention

    out = workdir / f"{Path(midi).stem}-attention.html"
    return render_attention(midi, out, checkpoint=checkpoint, device="cpu").path


def remove_folder(path: str | Path) -> None:
    """Delete a work folder and everything in it (at the app's exit); missing is fine."""
    shutil.rmtree(path, ignore_errors=True)
