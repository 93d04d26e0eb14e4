"""atomic_write and its six users: planted symlinks are never followed, temp names are unpredictable,
files get the umask's permissions, a failed write leaves the old file, stale temp files are swept."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import subprocess
import sys
import wave
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import pretty_midi
import pytest
import torch
from conftest import make_piece

from musicgpt import atomic, attention_plot, checkpoint, codec, data, midi_io, plot, render
from musicgpt.cli import main
from musicgpt.model import MusicGPT, preset
from musicgpt.vocab import CodecConfig


def _tiny_pm() -> pretty_midi.PrettyMIDI:
    pm = pretty_midi.PrettyMIDI()
    pm.instruments.append(pretty_midi.Instrument(0, name="Piano"))
    pm.instruments[0].notes += [pretty_midi.Note(80, 60, 0.0, 0.5), pretty_midi.Note(70, 64, 0.5, 1.0)]
    return pm


def _write_midi(out: Path) -> list[Path]:
    midi_io.write_midi(_tiny_pm(), out)
    assert len(midi_io.read_notes(out)) == 2
    return [out]


def _write_checkpoint(out: Path) -> list[Path]:
    torch.manual_seed(0)
    model = MusicGPT(preset("tiny", n_layer=1, n_embd=16, n_head=2, mlp_dim=32, context_len=32, max_rel_dist=32))
    path = checkpoint.save_checkpoint(out, model, CodecConfig())
    checkpoint.load_model(path)
    return [path, path.with_suffix(".json")]


def _write_png(out: Path) -> list[Path]:
    fig = plot.plt.figure(figsize=(1, 1), dpi=20)
    plot.save_figure(fig, out)
    assert out.read_bytes().startswith(b"\x89PNG")
    return [out]


def _write_html(out: Path) -> list[Path]:
    attention_plot.write_html({"piece": "a <b> piece", "arcs": []}, out)
    assert "a &lt;b&gt; piece" in out.read_text(encoding="utf-8")
    return [out]


def _write_cache(out: Path) -> list[Path]:
    """The token cache: `out` is the piece; its cache entry lands in the same folder."""
    make_piece(out, seconds=2)
    before = set(out.parent.glob("*.npy"))
    corpus = data.encode_files([out], cache_dir=out.parent, workers=1, progress=False)
    assert len(corpus.pieces) == 1
    return sorted(set(out.parent.glob("*.npy")) - before)


def _write_wav(out: Path) -> list[Path]:
    """render_wav; where FluidSynth is missing, a stand-in synthesiser makes the audio."""
    midi = make_piece(out.with_name("song.mid"), seconds=1)
    with contextlib.ExitStack() as stack:
        if not render.fluidsynth_available():
            stack.enter_context(mock.patch.object(render, "fluidsynth_available", lambda: True))
            stack.enter_context(mock.patch.object(pretty_midi.PrettyMIDI, "fluidsynth",
                                                  lambda self, fs, sf2_path=None: np.sin(np.arange(fs) / 10.0)))
        render.render_wav(midi, out, sample_rate=8000)
    with wave.open(str(out)) as w:
        assert w.getframerate() == 8000 and w.getnframes() > 0
    return [out]


WRITERS: dict[str, tuple[str, Callable[[Path], list[Path]]]] = {
    "midi": ("x.mid", _write_midi),
    "checkpoint": ("best", _write_checkpoint),
    "png": ("arcs.png", _write_png),
    "html": ("arcs.html", _write_html),
    "cache": ("song.mid", _write_cache),
    "wav": ("song.wav", _write_wav),
}


def _predictable_names(name: str) -> list[str]:
    """Every temp name the old hand-written writers used, or a careless one might."""
    stem, suffix, pid = Path(name).stem, Path(name).suffix, os.getpid()
    return [f".{name}.{pid}.tmp", f".{stem}.{pid}.tmp{suffix}", f".{name}.tmp", f"{name}.tmp", f".{name}.{pid}.",
            f".{name}.{pid}.0.tmp"]


def _plant(shared: Path, names: list[str], victims: Path) -> dict[Path, Path]:
    """Symlinks at `names` in `shared`, each to a file of its own in `victims`."""
    links = {}
    victims.mkdir(exist_ok=True)
    for i, name in enumerate(sorted(set(names))):
        victim = victims / f"victim{len(list(victims.iterdir()))}_{i}"
        victim.write_text("precious")
        (shared / name).symlink_to(victim)
        links[shared / name] = victim
    return links


def _assert_untouched(links: dict[Path, Path]) -> None:
    for link, victim in links.items():
        assert link.is_symlink() and link.readlink() == victim
        assert victim.read_text() == "precious", f"{link.name} was followed"


@pytest.fixture
def umask():
    """Set a umask for the test, restore the old one after."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


# ----------------------------------------------------------------------------- the helper itself


def test_temp_files_get_unpredictable_names_in_the_targets_folder(tmp_path):
    names = []
    for _ in range(2):
        with atomic.atomic_write(tmp_path / "out.mid") as f:
            f.write(b"x")
            names += [p.name for p in tmp_path.iterdir() if p.name != "out.mid"]
    assert len(names) == 2 and names[0] != names[1]
    pattern = re.compile(rf"^\.out\.mid\.{os.getpid()}\.[^.]+\.tmp$")  # the pid, then a random part
    assert all(pattern.match(n) for n in names), names
    assert [p.name for p in tmp_path.iterdir()] == ["out.mid"]


def test_text_mode_writes_utf8(tmp_path):
    with atomic.atomic_write(tmp_path / "a" / "page.html", "w") as f:
        f.write("é ♩")
    assert (tmp_path / "a" / "page.html").read_bytes() == "é ♩".encode()
    with pytest.raises(ValueError, match="mode"), atomic.atomic_write(tmp_path / "x", "ab"):
        pass


def test_an_error_inside_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "best.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic.atomic_write(target) as f:
        f.write(b"half of the new")
        raise KeyboardInterrupt  # Ctrl-C mid-write
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["best.safetensors"]


def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "x.mid").symlink_to(victim)
    _write_midi(tmp_path / "x.mid")
    assert not (tmp_path / "x.mid").is_symlink() and victim.read_text() == "precious"


@pytest.mark.parametrize("mask", [0o022, 0o002], ids=["umask022", "umask002"])
def test_current_umask_reads_without_changing_it(umask, mask):
    umask(mask)
    assert atomic.current_umask() == mask
    assert atomic.current_umask() == mask
    assert os.umask(mask) == mask  # still set


def test_stale_temp_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / f".last.safetensors.{dead}.k3x_9q2a.tmp"
    live = tmp_path / f".best.safetensors.{os.getpid()}.a8b7c6d5.tmp"
    others = [tmp_path / ".notes.tmp", tmp_path / "last.safetensors", tmp_path / f".x.{dead}.tmp.png"]
    for p in [stale, live, *others]:
        p.write_bytes(b"x")
    assert atomic.remove_stale_temp_files(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and all(p.exists() for p in others)
    assert atomic.remove_stale_temp_files(tmp_path) == []


def test_stale_temp_file_names_are_the_ones_atomic_write_makes(tmp_path, monkeypatch):
    """The sweep recognises atomic_write's own temp file: kept while its writer lives, else removed."""
    # The sweep takes the temp file, so the rename at the end finds nothing.
    with pytest.raises(FileNotFoundError), atomic.atomic_write(tmp_path / "last.safetensors") as f:
        f.write(b"half")
        (temp,) = tmp_path.iterdir()
        assert atomic.remove_stale_temp_files(tmp_path) == []  # this process is alive
        monkeypatch.setattr(atomic, "_process_alive", lambda pid: False)  # as if it had been killed
        assert atomic.remove_stale_temp_files(tmp_path) == [temp]
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the six writers


@pytest.mark.parametrize("writer", WRITERS)
def test_planted_symlinks_are_never_followed(writer, tmp_path):
    name, write = WRITERS[writer]
    shared = tmp_path / "shared"
    shared.mkdir()
    names = _predictable_names(name) + _predictable_names(f"{name}.safetensors") + _predictable_names(
        f"{Path(name).stem}.json")
    links = _plant(shared, names, tmp_path / "victims")
    written = write(shared / name)
    if writer == "cache":  # its entry's name is a hash: plant there too and write it afresh
        entry = written[0].name
        written[0].unlink()
        links.update(_plant(shared, _predictable_names(entry), tmp_path / "victims"))
        written = write(shared / name)
    _assert_untouched(links)
    assert written and all(p.is_file() and not p.is_symlink() for p in written)
    leftovers = [p.name for p in shared.iterdir() if p.name.startswith(".") and not p.is_symlink()]
    assert leftovers == []


@pytest.mark.parametrize("mask", [0o022, 0o002], ids=["umask022", "umask002"])
@pytest.mark.parametrize("writer", WRITERS)
def test_files_get_the_permissions_the_umask_allows(writer, mask, umask, tmp_path):
    umask(mask)
    name, write = WRITERS[writer]
    for path in write(tmp_path / "out" / name):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path.name


def test_overwriting_keeps_the_umask_permissions_not_the_old_files(umask, tmp_path):
    umask(0o022)
    out = tmp_path / "x.mid"
    out.write_bytes(b"old")
    out.chmod(0o600)
    _write_midi(out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


# ----------------------------------------------------------------------------- through the CLI


def test_decode_into_a_shared_folder_with_planted_symlinks(tmp_path, capsys):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("\n".join(codec.token_names(codec.encode(_tiny_pm()))) + "\n")
    shared = tmp_path / "shared"
    shared.mkdir()
    links = _plant(shared, _predictable_names("x.mid"), tmp_path / "victims")
    assert main(["decode", str(tokens), "-o", str(shared / "x.mid")]) == 0
    _assert_untouched(links)
    np.testing.assert_array_equal(codec.encode(shared / "x.mid"), codec.encode(_tiny_pm()))


def test_attention_html_into_a_shared_folder_with_planted_symlinks(tiny_run, tmp_path, capsys):
    """The issue's report: `attention -o shared/arcs.html` overwrote the planted symlink's target."""
    piece = make_piece(tmp_path / "song.mid", seconds=3)
    shared = tmp_path / "shared"
    shared.mkdir()
    links = _plant(shared, _predictable_names("arcs.html"), tmp_path / "victims")
    assert main(["attention", str(piece), "--checkpoint", str(tiny_run), "-o", str(shared / "arcs.html"),
                 "--device", "cpu"]) == 0
    _assert_untouched(links)
    assert "<html" in (shared / "arcs.html").read_text(encoding="utf-8").lower()
