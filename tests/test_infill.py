"""`musicgpt infill`: the cut at the gap, the PSM prompt, the assembled result, and the command line."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import make_piece

from musicgpt import cli, codec, infill
from musicgpt.checkpoint import load_model
from musicgpt.controls import Controls
from musicgpt.errors import MusicGPTError
from musicgpt.generate import generate
from musicgpt.infill import InfillRequest, infill_files, infill_prompt, split_piece
from musicgpt.midi_io import Notes, read_notes, subset
from musicgpt.sampling import SamplingConfig
from musicgpt.vocab import NOTE_OFF, TIME_SHIFT, CodecConfig

CFG = CodecConfig()
FIM_IDS = Controls(CFG, fim=True).fim_ids
STEP = CFG.step_seconds


def train_tiny(base: Path, fim_rate: float, max_steps: int) -> Path:
    from musicgpt.train import TrainConfig, train

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MUSICGPT_CACHE", str(base / "cache"))
        for i in range(4):
            make_piece(base / "data" / f"p{i}.mid", seed=300 + i, seconds=20)
        cfg = TrainConfig(data_dir=str(base / "data"), out=str(base / "run"), max_steps=max_steps, preset="tiny",
                          batch_size=4, seq_len=128, fim_rate=fim_rate, eval_interval=max_steps, eval_batches=1,
                          device="cpu", threads=1)
        return train(cfg, progress=False)


@pytest.fixture(scope="module")
def fim_run(tmp_path_factory) -> Path:
    """A tiny model trained for a few steps with half its windows in FIM order."""
    return train_tiny(tmp_path_factory.mktemp("fim-run"), 0.5, 30)


@pytest.fixture(scope="module")
def song(tmp_path_factory) -> Path:
    """A 40 s piece: about 1,500 tokens, far more than the tiny model's 256-token context."""
    return make_piece(tmp_path_factory.mktemp("song") / "song.mid", seed=7, seconds=40)


def notes_of(*rows) -> Notes:
    """Notes from (pitch, start, end, velocity) rows."""
    p, s, e, v = (np.array(c) for c in zip(*rows))
    return Notes(p.astype(np.int64), s.astype(float), e.astype(float), v.astype(np.int64))


def rows(notes: Notes, keep=None) -> list[tuple]:
    keep = np.ones(len(notes), bool) if keep is None else keep
    return sorted(zip(notes.pitch[keep].tolist(), notes.start[keep].tolist(), notes.end[keep].tolist(),
                      notes.velocity[keep].tolist()))


def assert_same_notes(got: list[tuple], want: list[tuple]) -> None:
    """Same pitches and velocities, times within one codec step."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g[0], g[3]) == (w[0], w[3])
        assert g[1] == pytest.approx(w[1], abs=STEP) and g[2] == pytest.approx(w[2], abs=STEP)


def check_infilled(original: Path, result: Path, start: float, end: float) -> Notes:
    """Everything outside [start, end) is the original's (held notes as the README says); return the new notes."""
    old, new = read_notes(original), read_notes(result)
    want_before = [(p, s, min(e, start), v) for p, s, e, v in rows(old) if s < start]
    want_after = [(p, s, e, v) for p, s, e, v in rows(old) if s >= end]
    before, after = new.start < start - STEP / 2, new.start >= end - STEP / 2
    assert_same_notes(rows(new, before), want_before)
    assert_same_notes(rows(new, after), want_after)
    middle = ~before & ~after
    gen = Notes(new.pitch[middle], new.start[middle], new.end[middle], new.velocity[middle])
    assert np.all(gen.start >= start - 1e-3) and np.all(gen.start < end) and np.all(gen.end <= end + 1e-3)
    return gen


# ----------------------------------------------------------------------------- the cut and the prompt

def test_split_piece_follows_the_boundary_rule():
    notes = notes_of(
        (60, 1.0, 2.0, 80),  # before the gap: kept whole
        (62, 2.5, 3.5, 81),  # held across the start: cut at 3.0
        (64, 2.8, 9.0, 82),  # held across the whole gap: cut at 3.0 too
        (65, 3.0, 4.0, 83),  # struck at the start: replaced
        (67, 4.5, 6.5, 84),  # struck in the gap, sounding past its end: replaced with it
        (69, 6.0, 7.0, 85),  # struck at the end: kept
        (71, 2.996, 3.5, 86),  # rounds onto the start's step: replaced, as the codec sees it
    )
    gap = split_piece(notes, 3.0, 6.0, CFG)
    assert (gap.start_step, gap.end_step, gap.seconds) == (300, 600, pytest.approx(3.0))
    assert rows(gap.before) == [(60, 1.0, 2.0, 80), (62, 2.5, 3.0, 81), (64, 2.8, 3.0, 82)]
    assert [r[0] for r in rows(gap.replaced)] == [65, 67, 71]
    assert rows(gap.after) == [(69, 6.0, 7.0, 85)]


def test_the_prompt_is_prefix_suffix_middle_with_the_lead_to_the_gap():
    notes = notes_of((60, 0.0, 1.0, 80), (62, 5.0, 6.0, 80), (64, 8.0, 9.0, 80))
    gap = split_piece(notes, 3.0, 7.0, CFG)
    p = infill_prompt(gap, FIM_IDS, context_len=256)
    pre, suf, mid = FIM_IDS
    prefix = codec.encode(gap.before, CFG)
    assert codec.duration_seconds(prefix) == pytest.approx(1.0)
    lead = [TIME_SHIFT + 99, TIME_SHIFT + 99]  # 1 s -> 3 s: the middle starts at the gap
    velocity = CFG.velocity_offset + int(CFG.velocity_to_bin(80))
    suffix = [TIME_SHIFT + 99, velocity, 64, TIME_SHIFT + 99, NOTE_OFF + 64]  # 7 s -> 8 s -> 9 s
    want = [pre, CFG.eos_id, *prefix.tolist(), suf, *suffix, CFG.eos_id, mid, *lead]
    assert p.tokens.tolist() == want
    assert p.lead.tolist() == lead and codec.duration_seconds(p.music_before) == pytest.approx(3.0)
    tagged = infill_prompt(gap, FIM_IDS, context_len=256, tag=999)
    assert tagged.tokens.tolist() == [999, *want]  # a style tag goes first, as in training


def test_a_long_piece_keeps_the_end_of_the_prefix_and_the_start_of_the_suffix(song):
    gap = split_piece(read_notes(song), 20.0, 22.0, CFG)
    p = infill_prompt(gap, FIM_IDS, context_len=256)
    pre, suf, mid = FIM_IDS
    i, j = p.tokens.tolist().index(suf), p.tokens.tolist().index(mid)
    prefix = codec.encode(gap.before, CFG)
    assert p.tokens[1:i].tolist() == prefix[len(prefix) - (i - 1):].tolist() and p.prefix_kept == i - 1
    suffix_full = infill_prompt(gap, FIM_IDS, context_len=100_000).tokens
    suffix_full = suffix_full[suffix_full.tolist().index(suf) + 1:suffix_full.tolist().index(mid)]
    assert p.tokens[i + 1:j].tolist() == suffix_full[:j - i - 1].tolist() and p.suffix_kept == j - i - 1
    # Half the room each, a quarter of the context at least, and the middle's room left free.
    assert p.prefix_kept >= 256 // 4 and p.suffix_kept >= 256 // 4
    middle = len(codec.encode(subset(gap.replaced, np.ones(len(gap.replaced), bool), 20.0)))
    assert len(p.tokens) + min(3 * middle // 2, 128) <= 256


def test_middle_notes_continue_the_prefix_and_stop_at_the_gaps_end():
    notes = notes_of((60, 0.0, 1.0, 100), (62, 3.0, 4.0, 80))
    gap = split_piece(notes, 2.0, 3.0, CFG)
    p = infill_prompt(gap, FIM_IDS, context_len=256)
    # No VELOCITY token: the prefix's is in force. 64 is held past the gap's end; 65 comes after it.
    middle = [TIME_SHIFT + 9, 64, TIME_SHIFT + 49, 67, TIME_SHIFT + 19, NOTE_OFF + 67, TIME_SHIFT + 59, 65, TIME_SHIFT]
    got = infill.middle_notes(gap, p, np.array(middle))
    loud = int(CFG.bin_to_velocity(CFG.velocity_to_bin(100)))
    assert got.pitch.tolist() == [64, 67] and got.velocity.tolist() == [loud, loud]
    np.testing.assert_allclose(got.start, [2.1, 2.6])
    np.testing.assert_allclose(got.end, [3.0, 2.8])


def test_music_before_sets_the_rules_start(fim_run):
    """The rules see the prefix, not the prompt: a note held 4 s before must be released first."""
    model, _ = load_model(fim_run)
    held = [60, *[TIME_SHIFT + 99] * 4]
    out = generate(model, [CFG.eos_id], max_new_tokens=3, max_note_seconds=4.0, seed=0, music_before=held)
    assert out[0][0].item() == NOTE_OFF + 60
    default = generate(model, [CFG.eos_id, *held], max_new_tokens=3, max_note_seconds=4.0, seed=0)
    assert default[0][0].item() == NOTE_OFF + 60  # by default the rules start from the prompt


# ----------------------------------------------------------------------------- whole infills

def test_an_infill_keeps_the_music_outside_the_gap_and_fills_it_exactly(fim_run, song, tmp_path, monkeypatch):
    middles = []
    assemble = infill.assemble
    monkeypatch.setattr(infill, "assemble", lambda gap, p, middle: middles.append(middle) or assemble(gap, p, middle))
    paths = infill_files(InfillRequest(song, 12.0, 20.0, checkpoint=fim_run, out_dir=tmp_path, seed=3,
                                       num_samples=2), progress=False)
    # Each middle lasts the gap to the step: its last TIME_SHIFT was shortened to end there.
    assert [codec.duration_seconds(m) for m in middles] == [pytest.approx(8.0)] * 2
    assert len(paths) == 2
    for path in paths:
        assert re.fullmatch(r"song-infill-12-20-\d{8}-\d{6}-seed3-[01]\.mid", path.name)
        gen = check_infilled(song, path, 12.0, 20.0)
        assert len(gen) > 0


def test_notes_held_across_the_boundaries_are_cut_or_dropped(fim_run, tmp_path):
    import pretty_midi

    pm = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(0)
    N = pretty_midi.Note
    piano.notes += [N(80, 40, 0.0, 9.0),  # struck before the gap, held past both ends: cut at 2 s
                    N(81, 41, 1.0, 2.5),  # held across the start: cut at 2 s
                    N(82, 43, 3.0, 6.0),  # struck in the gap, released after it: replaced
                    N(83, 45, 5.0, 6.0),  # struck at the end: kept
                    N(84, 47, 7.0, 8.0)]
    piano.notes += [N(70, 60 + i % 5, 0.25 * i, 0.25 * i + 0.2) for i in range(36)]
    pm.instruments.append(piano)
    piece = tmp_path / "held.mid"
    pm.write(str(piece))
    out = tmp_path / "out.mid"
    infill_files(InfillRequest(piece, 2.0, 5.0, checkpoint=fim_run, output=out, seed=0), progress=False)
    gen = check_infilled(piece, out, 2.0, 5.0)
    new = read_notes(out)
    kept = {(p, round(s, 2), round(e, 2)) for p, s, e in zip(new.pitch, new.start, new.end)}
    assert {(40, 0.0, 2.0), (41, 1.0, 2.0), (45, 5.0, 6.0)} <= kept
    # The note struck in the gap and released after it went with the gap: nothing new sounds past 5 s.
    assert np.all(gen.end <= 5.0 + 1e-3) and not {(43, 3.0, 6.0)} <= kept


@pytest.mark.parametrize("options", [
    dict(greedy=True), dict(num_beams=2), dict(top_k=5), dict(top_p=0.9, temperature=0.8), dict(typical_p=0.9),
    dict(min_p=0.1), dict(repetition_penalty=1.3, top_p=1.0),
], ids=lambda o: ",".join(o))
def test_every_decoding_method_infills(fim_run, song, tmp_path, options):
    out = tmp_path / "x.mid"
    infill_files(InfillRequest(song, 30.0, 32.0, checkpoint=fim_run, output=out, seed=1,
                               sampling=SamplingConfig(**options)), progress=False)
    check_infilled(song, out, 30.0, 32.0)


def test_a_gap_at_the_very_start_and_at_the_very_end(fim_run, song, tmp_path):
    length = float(read_notes(song).end.max())
    for start, end in ((0.0, 2.0), (length - 2.0, length)):
        out = tmp_path / f"{start:g}.mid"
        infill_files(InfillRequest(song, start, end, checkpoint=fim_run, output=out, seed=2), progress=False)
        check_infilled(song, out, start, end)


# ----------------------------------------------------------------------------- the command line

def test_cli_infill_end_to_end(fim_run, song, tmp_path, capsys):
    assert cli.main(["infill", str(song), "--start", "4", "--end", "7.5", "--checkpoint", str(fim_run),
                     "--out", str(tmp_path / "o"), "--seed", "5", "--top-k", "8", "--max-pause", "0"]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 1 and Path(printed[0]).name.startswith("song-infill-4-7.5-")
    check_infilled(song, Path(printed[0]), 4.0, 7.5)


def test_a_model_trained_without_fim_refuses_in_one_line(tmp_path, song, monkeypatch, capsys):
    run = train_tiny(tmp_path, 0.0, 1)
    capsys.readouterr()
    monkeypatch.setattr(infill, "load_engine", lambda *a, **k: pytest.fail("loaded the model"))
    assert cli.main(["infill", str(song), "--start", "1", "--end", "2", "--checkpoint", str(run),
                     "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained without fill-in-the-middle" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--start", "5", "--end", "5"], "must come after --start"),
    (["--start", "6", "--end", "2"], "must come after --start"),
    (["--start", "-1", "--end", "2"], "--start must be"),
    (["--start", "nan", "--end", "2"], "--start must be"),
    (["--start", "100", "--end", "120"], "not before the piece's end"),
    (["--start", "1", "--end", "100"], "after the piece's end"),
    (["--start", "1", "--end", "1.001"], "shorter than one 10 ms step"),
    (["--start", "1", "--end", "2", "--num-samples", "2", "--greedy"], "deterministic"),
    (["--start", "1", "--end", "2", "--num-samples", "2", "-o", "x.mid"], "-o writes one file"),
    (["--start", "1", "--end", "2", "--top-p", "0"], "--top-p must be"),
    (["--start", "1", "--end", "2", "--max-note", "-1"], "--max-note must be"),
    (["--start", "1", "--end", "2", "--style", "jazz"], "unknown style 'jazz'"),
    (["--start", "1", "--end", "2", "-o", "{tmp}"], "is a folder"),
    (["--start", "1", "--end", "2", "--out", "{song}"], "exists and is not a folder"),
])
def test_bad_options_fail_in_one_line_before_the_model_loads(fim_run, song, tmp_path, monkeypatch, capsys,
                                                             args, message):
    monkeypatch.setattr(infill, "load_engine", lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.chdir(tmp_path)
    args = [a.format(tmp=tmp_path, song=song) for a in args]
    assert cli.main(["infill", str(song), "--checkpoint", str(fim_run), *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_bad_files_fail_in_one_line(fim_run, tmp_path, capsys):
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"not midi at all")
    empty = tmp_path / "empty.mid"
    import pretty_midi

    pretty_midi.PrettyMIDI().write(str(empty))
    for path in (bad, tmp_path / "missing.mid", empty):
        assert cli.main(["infill", str(path), "--start", "0", "--end", "1", "--checkpoint", str(fim_run)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and str(path) in err, err


def test_infill_requests_check_their_numbers():
    with pytest.raises(MusicGPTError, match="--end must be"):
        InfillRequest("x.mid", 1.0, math.inf).validate()


def test_the_piano_roll_shades_the_gap(fim_run, song, tmp_path):
    from musicgpt.plot import plot_piano_roll

    out = tmp_path / "x.mid"
    infill_files(InfillRequest(song, 3.0, 5.0, checkpoint=fim_run, output=out, seed=0), progress=False)
    png = plot_piano_roll(out, tmp_path / "x.png", spans=[(3.0, 5.0)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
