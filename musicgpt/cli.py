"""The `musicgpt` command line: parses arguments and calls library functions.

Each subcommand is a pair `_add_<name>(subparsers)` / `_run_<name>(args)`; the
work itself lives in the library modules so tests can call it directly.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path

from musicgpt import __version__
from musicgpt.errors import Interrupted, MusicGPTError
from musicgpt.fim import FIM_RATE
from musicgpt.interrupts import raise_on_sigterm
from musicgpt.sampling import (
    DEFAULT_SECONDS,
    MAX_NOTE_SECONDS,
    MAX_PAUSE_SECONDS,
    TOKENS_PER_SECOND_CAP,
    TOP_P_SCOPES,
    SamplingConfig,
)

CHECKPOINT_HELP = "run folder, .safetensors file or 'default' (default: the newest run, else the shipped model)"


# Each subcommand: its line in `musicgpt --help`, and the description of its own --help.
COMMANDS = {
    "encode": ("turn a MIDI file into readable event tokens, one per line", None),
    "decode": ("turn a token file (one event name per line) back into MIDI", None),
    "prepare": ("encode a folder of MIDI files once into a token store for `train` and `eval`",
                "Encode every MIDI file under DATA_DIR in parallel into the token store STORE (shards of "
                "tokens and an index, read through memory maps by `musicgpt train STORE`). Run it again to "
                "resume a killed run or to add the folder's new files; files already in the store are not "
                "encoded again. Bad files are skipped with their reason."),
    "train": ("train a model on a folder of MIDI files or a token store",
              "Train a relative-attention GPT on every MIDI file under DATA_DIR, or on the pieces of a token "
              "store written by `musicgpt prepare`. Options left out "
              "take per-device defaults (CPU: the tiny preset, about ten minutes on 2 cores)."),
    "sample": ("write new MIDI with a trained model, from silence or continuing a primer",
               "Generate piano music with a trained model and write it as MIDI files (listed on stdout). "
               "Without --checkpoint the newest run under runs/ is used, else the shipped default model. "
               f"Sampling defaults: temperature {SamplingConfig.temperature:g}, top-p {SamplingConfig.top_p:g} "
               f"(--top-p-scope {SamplingConfig.top_p_scope}), other filters off."),
    "infill": ("write new music between two times of a piece (a model trained with --fim-rate > 0)",
               "Regenerate the music from --start to --end seconds of a MIDI file with a fill-in-the-middle model: "
               "the model reads the music before and after the gap and writes a new passage lasting exactly the "
               "gap. Outside the gap the piece stays as it was; a note struck before --start and still sounding "
               "there is cut at --start, notes struck inside the gap are replaced, and new notes end by --end. "
               "Files are listed on stdout."),
    "info": ("describe a checkpoint: size, context, style tags, infilling, training data and loss", None),
    "render": ("render MIDI to a WAV file with tinysoundfont or FluidSynth (pip install --no-deps tinysoundfont)",
               None),
    "attention": ("draw which earlier notes a note attends to, as arcs over a piano roll",
                  "Run a trained model once over the start of a MIDI file and draw its self-attention as "
                  "arcs from a query note back to the notes it attends to, one colour per head. The output's "
                  "extension picks the format: .png or .svg (a picture) or .html (an interactive, offline page). "
                  "Layers, heads and notes are counted from 0."),
    "app": ("compose in the browser: a local page to generate, hear, continue and infill (musicgpt[app])",
            "Serve a page on this machine to choose a primer, generate variations, listen to them, download them, "
            "continue or infill a result and open its attention arcs. Needs `pip install 'musicgpt[app]'`; "
            "nothing is fetched from the internet."),
    "eval": ("held-out loss of a trained model on a folder of MIDI files or a token store",
             "Score a checkpoint on the validation files of DATA_DIR, a MIDI folder or a token store (the same "
             "files training holds out) cut into non-overlapping windows of the model's context: cross-entropy "
             "in nats/token and "
             "bits/token, and perplexity. --all scores every file, e.g. a folder the model never saw."),
    "stats": ("compare musical statistics of MIDI files (e.g. samples) with a reference set",
              "Pitch range, pitch-class histogram and entropy, polyphony, notes per second, inter-onset "
              "intervals, note durations and velocities of SAMPLES against REFERENCE, with the overlapping area "
              "(OA, 0..1) of each pair of histograms (Yang and Lerch 2020). With --copies, also each sample's "
              "longest run of consecutive notes found in a reference file, a check for memorised passages."),
}


def _command(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    """The parser of subcommand `name`, described as COMMANDS says."""
    summary, description = COMMANDS[name]
    return sub.add_parser(name, help=summary, description=description or summary)


def _add_encode(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "encode")
    p.add_argument("midi", type=Path, help="input .mid/.midi file")
    p.add_argument("-o", "--output", type=Path, help="token file to write (default: stdout)")
    p.set_defaults(func=_run_encode)


def _run_encode(args: argparse.Namespace) -> int:
    from musicgpt import codec
    from musicgpt.atomic import atomic_write, check_output_file

    if args.output:
        check_output_file(args.output)
    tokens = codec.encode(args.midi)
    text = "\n".join(codec.token_names(tokens)) + "\n"
    if args.output:
        with atomic_write(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    print(
        f"{args.midi}: {len(tokens)} tokens, {codec.count_notes(tokens)} notes, "
        f"{codec.duration_seconds(tokens):.1f} s",
        file=sys.stderr,
    )
    return 0


def _add_decode(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "decode")
    p.add_argument("tokens", type=Path, help="token file written by `musicgpt encode`")
    p.add_argument("-o", "--output", type=Path, required=True, help="MIDI file to write")
    p.set_defaults(func=_run_decode)


def _run_decode(args: argparse.Namespace) -> int:
    from musicgpt import codec
    from musicgpt.atomic import check_output_file

    check_output_file(args.output)
    tokens = codec.read_token_file(args.tokens)
    midi = codec.decode(tokens)
    codec.write_midi(midi, args.output)
    n = sum(len(i.notes) for i in midi.instruments)
    print(f"{args.output}: {n} notes, {midi.get_end_time():.1f} s", file=sys.stderr)
    return 0


# Training options that default to None: `musicgpt.train.resolve` fills them in per device.
_TRAIN_OPTIONS = (
    ("--preset", str, "model size: tiny, small, medium or base"),
    ("--out", str, "run folder for checkpoints and metrics (default runs/<timestamp>)"),
    ("--max-steps", int, "optimizer steps in the whole run (the schedule's length)"),
    ("--stop-at", int, "pause at this step; continue later with --resume"),
    ("--batch-size", int, "sequences per micro-batch"),
    ("--seq-len", int, "tokens per training sequence"),
    ("--lr", float, "peak learning rate"),
    ("--warmup", int, "linear warmup steps"),
    ("--dropout", float, "dropout probability (overrides the preset)"),
    ("--attn-dropout", float, "dropout on attention weights (default: --dropout); 0 lets CUDA training on "
                              "long sequences use the fused FlexAttention kernel"),
    ("--eval-interval", int, "steps between validation runs"),
    ("--fim-rate", float, "share of training windows in fill-in-the-middle order, which `musicgpt infill` "
                          f"needs (default {FIM_RATE:g} for a new run; 0: none)"),
    ("--threads", int, "CPU threads for torch (1 is fastest on a busy machine)"),
)


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "prepare")
    p.add_argument("data_dir", help="folder of .mid/.midi files (searched recursively)")
    p.add_argument("--out", required=True, metavar="STORE", help="token store folder to write or add to")
    p.add_argument("--workers", type=int, metavar="N", help="encoding processes (default: one per CPU)")
    p.add_argument("--no-cache", dest="use_cache", action="store_false",
                   help="do not read or write the per-file token cache")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from musicgpt.prepare import prepare_store

    r = prepare_store(args.data_dir, args.out, workers=args.workers, use_cache=args.use_cache)
    print(f"{r.store}: added {r.added} pieces ({r.added_tokens:,} tokens), skipped {len(r.skipped)}; "
          f"the store holds {r.pieces} pieces, {r.tokens:,} tokens in {r.shards} shard(s)", file=sys.stderr)
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "train")
    p.add_argument("data_dir", help="folder of .mid/.midi files (searched recursively) or a token store")
    for flag, kind, text in _TRAIN_OPTIONS:
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default %(default)s)")
    p.add_argument("--attn-impl", metavar="KERNEL",
                   help="relative attention kernel: auto (default: FlexAttention on CUDA for long "
                   "sequences), eager, flex, or triton (the fused kernel, CUDA, opt-in)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="bf16 autocast on CUDA by default")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--init", metavar="CKPT", help="fine-tune from a trained checkpoint ('default': the shipped model)")
    p.add_argument("--attention", choices=["relative", "absolute"], help="attention kind (overrides the preset)")
    p.add_argument("--seed", type=int, default=1337, help="random seed (default %(default)s)")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="no transposition or time stretch")
    p.add_argument("--sounding-notes", action=argparse.BooleanOptionalAction, default=None,
                   help="let the model read which keys sound and for how long (default: on for a new model, as "
                        "the --init model otherwise); added to an --init model at zero, so it starts with that "
                        "model's predictions")
    p.add_argument("--sounding-releases", action=argparse.BooleanOptionalAction, default=None,
                   help="let the model give a NOTE_OFF probability only where its key sounds, so it learns its "
                        "releases among those that mean something (default: on for a new model that reads the "
                        "keyboard, as the --init model otherwise)")
    p.add_argument("--tag-dropout", type=float, default=0.1,
                   help="share of tagged windows shown without their style tag (default %(default)s)")
    p.add_argument("--tag-weight", action="append", type=tag_weight, dest="tag_weights", metavar="TAG=W",
                   help="draw the pieces tagged TAG W times as often as their length alone would "
                   "(repeatable; default 1 for every tag)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of files held out for validation (default %(default)s)")
    p.set_defaults(func=_run_train)


def tag_weight(text: str) -> tuple[str, float]:
    """`TAG=W` of --tag-weight as (tag, weight); argparse turns a ValueError into a usage error."""
    tag, sep, weight = text.partition("=")
    if not sep or not tag:
        raise ValueError(text)
    return tag, float(weight)


def _run_train(args: argparse.Namespace) -> int:
    from musicgpt.train import TrainConfig, train

    names = set(TrainConfig.__dataclass_fields__)
    options = {k: v for k, v in vars(args).items() if k in names}
    options["tag_weights"] = dict(args.tag_weights) if args.tag_weights else None
    train(TrainConfig(**options))
    return 0


def _add_decoding_options(p: argparse.ArgumentParser) -> None:
    """The options `sample` and `infill` share: how many pieces, the seed, the decoding method and rules, the device."""
    d = SamplingConfig()
    p.add_argument("--num-samples", type=int, default=1, metavar="K",
                   help="pieces to write, generated as one batch (default %(default)s)")
    p.add_argument("--seed", type=int, metavar="N",
                   help="random seed (default: a new one, printed so the run can be repeated)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (deterministic)")
    filters = [
        ("--temperature", float, "T", f"divide logits by this; < 1 is safer, > 1 wilder (default {d.temperature:g})"),
        ("--top-k", int, "K", f"sample among the K most likely tokens (default {d.top_k}: off)"),
        ("--top-p", float, "P", f"nucleus: the smallest set holding this probability (default {d.top_p:g}; 1: off)"),
        ("--typical-p", float, "P", f"locally typical sampling mass (default {d.typical_p:g}: off)"),
        ("--min-p", float, "M", f"drop tokens below this fraction of the top token's probability "
                                f"(default {d.min_p:g}: off)"),
        ("--repetition-penalty", float, "R", f"CTRL penalty on tokens in the model's view "
                                             f"(default {d.repetition_penalty:g}: off)"),
    ]
    for flag, kind, metavar, text in filters:
        p.add_argument(flag, type=kind, metavar=metavar, help=text)
    p.add_argument("--top-p-scope", choices=TOP_P_SCOPES,
                   help="what top-p ranks together: kind (default): pitches and velocities each in their own "
                        "nucleus, waits and releases never cut, so the music keeps the model's density; pooled: "
                        "one nucleus with the waits as one candidate (sparser); token: every token on its own "
                        "(cuts the long waits, crowds the notes)")
    p.add_argument("--beams", type=int, dest="num_beams", metavar="B",
                   help="beam search with this many beams (deterministic)")
    p.add_argument("--length-penalty", type=float, metavar="L",
                   help=f"beam score = log-prob / length ** this (default {d.length_penalty:g})")
    p.add_argument("--max-pause", type=float, metavar="S",
                   help=f"never go more than S seconds without a new note (default {MAX_PAUSE_SECONDS:g}; 0: no limit)")
    p.add_argument("--max-note", type=float, metavar="S",
                   help=f"end generated notes held longer than S seconds (default {MAX_NOTE_SECONDS:g}; 0: no limit)")
    p.add_argument("--threads", type=int,
                   help="CPU threads (default: 1 for one or two samples, else the engine's choice)")
    p.add_argument("--device", default="cpu", metavar="DEVICE", help="cpu (default), cuda, mps or auto")
    p.add_argument("--backend", default="auto", choices=("auto", "onnx", "torch"),
                   help="auto (default): ONNX Runtime on the CPU when installed (pip install 'musicgpt[fast]'), "
                        "else torch")


def _decoding_options(args: argparse.Namespace) -> dict:
    """The request fields `_add_decoding_options`' arguments give (SampleRequest and InfillRequest share them)."""
    names = ("greedy", "temperature", "top_k", "top_p", "top_p_scope", "typical_p", "min_p",
             "repetition_penalty", "num_beams", "length_penalty")
    sampling = SamplingConfig(**{k: getattr(args, k) for k in names if getattr(args, k) is not None})
    limits = {}
    for field_name, flag, value in (("max_pause_seconds", "--max-pause", args.max_pause),
                                    ("max_note_seconds", "--max-note", args.max_note)):
        if value is not None:
            if not value >= 0:
                raise MusicGPTError(f"{flag} must be a number of seconds >= 0 (0: no limit), got {value!r}")
            limits[field_name] = math.inf if value == 0 else value
    return dict(num_samples=args.num_samples, seed=args.seed, sampling=sampling, device=args.device,
                threads=args.threads, backend=args.backend, **limits)


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "sample")
    p.add_argument("--checkpoint", metavar="CKPT", help=CHECKPOINT_HELP)
    p.add_argument("--primer", type=Path, metavar="MIDI", help="MIDI file to continue (default: start from silence)")
    p.add_argument("--primer-seconds", type=float, metavar="S", help="use only the primer's first S seconds")
    p.add_argument("--style", metavar="TAG", help="play in this style: one of the model's tags (`musicgpt info` "
                   "lists them)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--tokens", type=int, metavar="N", help="generate N tokens (or until the model ends the piece)")
    length.add_argument("--seconds", type=float, metavar="S", help=f"generate S seconds of music (default "
                        f"{DEFAULT_SECONDS:g}; at most {TOKENS_PER_SECOND_CAP} tokens per second)")
    _add_decoding_options(p)
    p.add_argument("--out", default="samples", metavar="DIR", help="folder for the MIDI files (default %(default)s/)")
    p.add_argument("--include-primer", action="store_true", help="write the primer before the continuation")
    p.add_argument("--wav", action="store_true",
                   help="also render each sample to WAV beside it (needs musicgpt[audio])")
    p.set_defaults(func=_run_sample)


def _run_sample(args: argparse.Namespace) -> int:
    from musicgpt.sample import SampleRequest, sample_files

    options = _decoding_options(args)
    if args.wav:
        from musicgpt.render import choose_synth

        try:
            choose_synth()
        except MusicGPTError as e:
            raise MusicGPTError(f"--wav: {e}") from None
    request = SampleRequest(
        checkpoint=args.checkpoint, primer=args.primer, primer_seconds=args.primer_seconds, tokens=args.tokens,
        seconds=args.seconds, out_dir=args.out, include_primer=args.include_primer, style=args.style, **options,
    )
    for path in sample_files(request):
        print(path)
        if args.wav:
            from musicgpt.render import render_wav

            print(render_wav(path, path.with_suffix(".wav")))
    return 0


def _add_infill(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "infill")
    p.add_argument("midi", type=Path, help="the piece, a .mid/.midi file")
    p.add_argument("--start", type=float, required=True, metavar="S", help="the gap's start, in seconds")
    p.add_argument("--end", type=float, required=True, metavar="S",
                   help="the gap's end, in seconds (at most the piece's end)")
    p.add_argument("--checkpoint", metavar="CKPT", help=CHECKPOINT_HELP + "; it must be trained with --fim-rate > 0")
    p.add_argument("--style", metavar="TAG", help="a style tag the model was trained with (default: none)")
    _add_decoding_options(p)
    p.add_argument("--out", default="samples", metavar="DIR", help="folder for the MIDI files (default %(default)s/)")
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="write the one result to FILE instead")
    p.set_defaults(func=_run_infill)


def _run_infill(args: argparse.Namespace) -> int:
    from musicgpt.infill import InfillRequest, infill_files

    request = InfillRequest(midi=args.midi, start=args.start, end=args.end, checkpoint=args.checkpoint,
                            output=args.output, out_dir=args.out, style=args.style, **_decoding_options(args))
    for path in infill_files(request):
        print(path)
    return 0


def _add_render(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "render")
    p.add_argument("midi", type=Path, help="input .mid/.midi file")
    p.add_argument("-o", "--output", type=Path, help="WAV file to write (default: beside the MIDI file)")
    p.add_argument("--soundfont", type=Path, help="a .sf2 soundfont (default: pretty_midi's bundled General MIDI one)")
    p.add_argument("--sample-rate", type=int, default=44100, help="samples per second (default %(default)s)")
    p.add_argument("--synth", default="auto", choices=("auto", "tinysoundfont", "fluidsynth"),
                   help="synthesizer (default auto: tinysoundfont if installed, else FluidSynth)")
    p.set_defaults(func=_run_render)


def _run_render(args: argparse.Namespace) -> int:
    from musicgpt.render import render_wav

    out = render_wav(args.midi, args.output or args.midi.with_suffix(".wav"), soundfont=args.soundfont,
                     sample_rate=args.sample_rate, synth=args.synth)
    print(out)
    return 0


def _add_attention(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "attention")
    p.add_argument("midi", type=Path, help="input .mid/.midi file (a generated sample works too)")
    p.add_argument("-o", "--output", type=Path, required=True, help="file to write: .png, .svg or .html")
    p.add_argument("--checkpoint", metavar="CKPT", help=CHECKPOINT_HELP)
    p.add_argument("--layer", type=int, default=-1,
                   help="layer from 0; negative counts from the end (default %(default)s: the last)")
    p.add_argument("--heads", help="comma-separated heads from 0, e.g. 0,3 (default: all)")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--query-note", type=int, metavar="INDEX", help="query note, by index in onset order from 0 "
                   "(default: one late in the excerpt)")
    q.add_argument("--query-time", type=float, metavar="SECONDS", help="query the note starting nearest this time")
    p.add_argument("--top-k", type=int, default=5,
                   help="arcs per head: its K most attended notes (default %(default)s)")
    p.add_argument("--threshold", type=float, default=0.02,
                   help="hide arcs lighter than this weight (default %(default)s)")
    p.add_argument("--max-tokens", type=int, help="tokens of the piece the model reads (default: its context "
                   "or 512, whichever is smaller)")
    p.add_argument("--grid", action="store_true", help="draw every layer's and head's attention matrix instead")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or mps")
    p.set_defaults(func=_run_attention)


def _run_attention(args: argparse.Namespace) -> int:
    from musicgpt.attention_plot import note_label, parse_heads, render_attention

    r = render_attention(
        args.midi, args.output, checkpoint=args.checkpoint, layer=args.layer, heads=parse_heads(args.heads),
        query_note=args.query_note, query_time=args.query_time, top_k=args.top_k, threshold=args.threshold,
        max_tokens=args.max_tokens, grid=args.grid, device=args.device,
    )
    if r.message:
        print(r.message, file=sys.stderr)
    what = ("every layer and head" if args.grid else
            f"layer {r.layer}, query {note_label(r.excerpt, r.query)}, {len(r.arcs)} arcs")
    print(f"{r.path}: {what} ({len(r.excerpt.tokens)} tokens)", file=sys.stderr)
    return 0


def _add_app(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "app")
    p.add_argument("--port", type=int, help="port to serve on (default: 7860, or the next free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s: this machine only; 0.0.0.0 shares it)")
    p.add_argument("--no-browser", action="store_true", help="do not open the page in a browser")
    p.add_argument("--checkpoint", metavar="CKPT", help="also offer this model (a run folder, .safetensors or "
                   "'default'); the shipped model and every run under runs/ are offered anyway")
    p.set_defaults(func=_run_app)


def _run_app(args: argparse.Namespace) -> int:
    from musicgpt.app import launch

    launch(host=args.host, port=args.port, open_browser=not args.no_browser, checkpoint=args.checkpoint)
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "info")
    p.add_argument("checkpoint", nargs="?", metavar="CKPT", help=CHECKPOINT_HELP)
    p.add_argument("--json", action="store_true", help="print every figure as JSON on stdout")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import json

    from musicgpt.info import describe, format_info

    d = describe(args.checkpoint)
    if d["chosen_because"]:
        print(f"musicgpt: {d['chosen_because']}", file=sys.stderr)
    print(json.dumps(d, indent=2) if args.json else format_info(d))
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "eval")
    p.add_argument("data_dir", help="folder of .mid/.midi files (searched recursively) or a token store")
    p.add_argument("--checkpoint", metavar="CKPT", help=CHECKPOINT_HELP)
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of files held out, as in training (default %(default)s)")
    p.add_argument("--all", dest="all_files", action="store_true", help="evaluate every file, not the validation split")
    p.add_argument("--seq-len", type=int, metavar="N", help="window length in tokens (default: the model's context)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help="windows per forward pass (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from musicgpt.evaluate import evaluate_folder, format_result

    r = evaluate_folder(args.data_dir, args.checkpoint, val_fraction=args.val_fraction, all_files=args.all_files,
                        seq_len=args.seq_len, batch_size=args.batch_size, device=args.device)
    print(json.dumps(r.to_dict(), indent=2) if args.json else format_result(r))
    return 0


def _add_stats(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "stats")
    p.add_argument("samples", type=Path, help="MIDI file or folder of MIDI files to describe (e.g. samples/)")
    p.add_argument("--reference", type=Path, required=True, metavar="DATA_DIR",
                   help="MIDI file or folder to compare with")
    p.add_argument("-o", "--output", type=Path, help="also draw the histograms side by side into this .png or .svg")
    p.add_argument("--json", action="store_true", help="print every figure (histograms included) as JSON on stdout")
    p.add_argument("--reference-span", metavar="START:END", type=seconds_span,
                   help="describe only the notes each reference file strikes between START and END seconds, "
                        "e.g. 10:70 to compare one-minute continuations of 10 s primers with a minute of each piece")
    p.add_argument("--copies", action="store_true",
                   help="also give each sample's longest run of consecutive notes found in a reference file (a "
                        "memorisation check): the same pitch intervals in any transposition and the same onset "
                        "rhythm on the 10 ms grid, velocities and lengths ignored; a sample that is itself a "
                        "reference file is compared with the others only")
    p.set_defaults(func=_run_stats)


def seconds_span(text: str) -> tuple[float, float]:
    """`START:END` of --reference-span as two numbers of seconds, 0 <= START < END."""
    start, sep, end = text.partition(":")
    span = (float(start), float(end))  # a ValueError here is argparse's usage error
    if not sep or not 0 <= span[0] < span[1] < math.inf:
        raise ValueError(text)
    return span


def _run_stats(args: argparse.Namespace) -> int:
    from musicgpt.copies import format_copies
    from musicgpt.data import printable
    from musicgpt.stats import compare_sets, format_table, plot_report, report_json

    if args.output is not None:
        from musicgpt.atomic import check_output_file

        if args.output.suffix.lower() not in (".png", ".svg"):
            raise MusicGPTError(f"{args.output}: output must end in .png or .svg")
        check_output_file(args.output)
    report = compare_sets(args.samples, args.reference, copies=args.copies, reference_span=args.reference_span)
    print(report_json(report) if args.json else format_table(report))
    if args.copies and not args.json:
        print(printable(format_copies(report["copies"])))
    if args.output is not None:
        print(f"{plot_report(report, args.output)}: histograms written", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="musicgpt",
        description="Learn to compose piano music from MIDI files and write new MIDI.",
    )
    parser.add_argument("--version", action="version", version=f"musicgpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_prepare, _add_train, _add_sample, _add_infill, _add_info, _add_eval, _add_stats,
                _add_attention, _add_render, _add_app, _add_encode, _add_decode):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `musicgpt` console script; returns the process exit status.

    Errors meant for the user are one line and exit 1; SIGINT and SIGTERM exit 130 and 143
    (128 + the signal), after whatever the command does to stop cleanly.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with raise_on_sigterm():
            return int(args.func(args) or 0)
    except MusicGPTError as e:
        print(f"musicgpt: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("musicgpt: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Interrupted as e:
        print(f"musicgpt: {e}", file=sys.stderr)
        return 128 + e.signum
    except BrokenPipeError:  # the reader went away (`musicgpt encode x.mid | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
