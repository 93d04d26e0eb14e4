"""Hostile MIDI files and token lines (issue 15): each ends within seconds, in bounded memory, with
notes or one line naming the file and the problem. The big probes run in a subprocess with a
timeout, so a regression fails the test instead of hanging the suite."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import mido
import numpy as np
import pretty_midi
import pytest

from musicgpt import codec, midi_io
from musicgpt.errors import MidiReadError, MusicGPTError
from musicgpt.vocab import TIME_SHIFT

ROOT = Path(__file__).resolve().parent.parent
EOT = b"\x00\xff\x2f\x00"
NOTE = b"\x00\x90\x3c\x40\x60\x80\x3c\x00"  # key 60 on, off 96 ticks later
ENCODE = """
import resource, sys
from musicgpt import codec
from musicgpt.errors import MusicGPTError
try:
    print(len(codec.encode(sys.argv[1])), "tokens")
except MusicGPTError as e:
    print(e)
# ru_maxrss keeps the parent's peak across fork and exec; VmHWM is this program's own
try:
    print(next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM")) // 1024)
except OSError:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def smf(tracks: list[bytes], tpq: int = 96) -> bytes:
    head = b"MThd" + struct.pack(">IHHH", 6, 1, len(tracks), tpq)
    return head + b"".join(b"MTrk" + struct.pack(">I", len(t)) + t for t in tracks)


def encode_in_subprocess(path: Path, timeout: float = 10) -> tuple[str, int]:
    """(the one line `encode` printed, peak memory in MB); fails the test past `timeout` seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", ENCODE, str(path)], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    line, rss = r.stdout.splitlines()
    return line, int(rss)


def refused(path: Path) -> str:
    with pytest.raises(MidiReadError) as e:
        midi_io.read_notes(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


@pytest.mark.parametrize("where", ["delta time", "meta length", "sysex length"])
def test_an_over_long_variable_length_number_is_refused_at_once(tmp_path, where):
    # A megabyte of continuation bytes: read without the 4-byte limit this took minutes.
    long = b"\xff" * 1_000_000 + b"\x00"
    body = {"delta time": long + b"\x90\x3e\x40\x10\x80\x3e\x00",
            "meta length": b"\x00\xff\x01" + long,
            "sysex length": b"\x00\xf0" + long}[where]
    path = tmp_path / "long.mid"
    path.write_bytes(smf([NOTE + body + EOT]))
    line, _ = encode_in_subprocess(path)
    assert line.startswith(f"{path}: ") and "longer than the 4 bytes MIDI allows" in line
    assert "longer than the 4 bytes" in refused(path)
    with pytest.raises(MidiReadError, match="4 bytes"):
        midi_io.load_midi(path)  # pretty_midi would take as long; our scan refuses it first


def test_a_four_byte_delta_time_is_still_read(tmp_path):
    path = tmp_path / "ok.mid"
    padded = b"\x80\x80\x81\x00"  # 128 ticks in four bytes, as the specification allows
    path.write_bytes(smf([NOTE + padded + b"\x90\x3e\x40\x10\x80\x3e\x00" + EOT]))
    notes = midi_io.read_notes(path)
    assert notes.pitch.tolist() == [60, 62] and notes.start[1] == pytest.approx((96 + 128) / 192)


def test_many_track_channel_pairs_are_split_in_linear_time(tmp_path):
    # 65535 tracks (the most a header holds) x 15 channels, one note each: 8.6 MB, a million parts.
    body = b"".join(bytes([0, 0x90 | c, 60 + c, 64, 10, 0x80 | c, 60 + c, 0]) for c in range(16) if c != 9)
    path = tmp_path / "pairs.mid"
    path.write_bytes(smf([body + EOT] * 65535))
    line, rss = encode_in_subprocess(path)
    assert line.endswith("tokens") and rss < 1024


def test_parts_keep_their_own_pedal(tmp_path):
    """Two tracks on one channel: the pedal of one holds only its own notes."""
    down, up_at_150 = b"\x00\xb0\x40\x7f", b"\x36\xb0\x40\x00"
    path = tmp_path / "two.mid"
    path.write_bytes(smf([down + NOTE + up_at_150 + EOT, NOTE + down + EOT]))
    # The second track's pedal never lifts, so it would hold to the piece end (0.78 s), but it
    # comes after its note's release.
    assert midi_io.read_notes(path).end.tolist() == [150 / 192, 0.5]


def test_a_big_file_is_read_in_memory_a_small_multiple_of_its_notes(tmp_path):
    # 8 MB, 1.3 million notes (NOTE_ONs with running status): the old reader held a Python tuple
    # per note, over 100 bytes each, and peaked near 290 MB here; the arrays hold 24 bytes a note.
    cycle = b"".join(bytes([1, 60 + k, 64, 1, 60 + k, 0]) for k in range(12))
    path = tmp_path / "big.mid"
    path.write_bytes(smf([b"\x00\x90\x3c\x40\x01\x3c\x00" + cycle * 110_000 + EOT], tpq=9600))
    line, rss = encode_in_subprocess(path)
    assert line.endswith("tokens") and rss < 230, (line, rss)


def test_files_over_the_size_limit_are_refused_unread(tmp_path):
    path = tmp_path / "huge.mid"
    with open(path, "wb") as f:
        f.write(smf([NOTE + EOT]))
        f.truncate(midi_io.MAX_FILE_BYTES + 1)  # sparse: nothing is written to disk
    assert "MiB limit" in refused(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/zero").exists(), reason="POSIX only")
def test_devices_and_pipes_are_refused_without_reading(tmp_path):
    fifo = tmp_path / "x.mid"
    os.mkfifo(fifo)
    for path in (Path("/dev/zero"), fifo):  # one reads without end, the other blocks for a writer
        line, _ = encode_in_subprocess(path, timeout=20)
        assert line == f"{path}: not a regular file (a device, pipe or socket), not a MIDI file"


def test_a_gap_longer_than_a_delta_time_is_written_with_fillers(tmp_path):
    """At 32767 ticks per quarter 2^28 ticks is 68 minutes: a 5000 s gap needs a filler event."""
    pm = pretty_midi.PrettyMIDI(resolution=32767, initial_tempo=120)
    piano = pretty_midi.Instrument(0)
    piano.notes = [pretty_midi.Note(80, 60, 0.0, 1.0), pretty_midi.Note(90, 62, 5000.0, 5001.5)]
    pm.instruments.append(piano)
    path = tmp_path / "gap.mid"
    midi_io.write_midi(pm, path)
    assert max(m.time for t in mido.MidiFile(path).tracks for m in t) <= 0x0FFFFFFF
    notes = midi_io.read_notes(path)
    assert notes.start.tolist() == [0.0, 5000.0] and notes.end.tolist() == [1.0, 5001.5]
    # pretty_midi refuses files over 10^7 ticks; mido, which it reads with, sees the same notes.
    track = mido.MidiFile(path).tracks[1]
    ticks = [t for t, m in zip(np.cumsum([m.time for m in track]), track) if m.type == "note_on"]
    assert ticks == [0, 65534, 5000 * 65534, 5001.5 * 65534]


def test_decode_writes_valid_delta_times_for_very_long_shifts(tmp_path):
    """78 hours of TIME_SHIFTs: more ticks than a 4-byte delta time holds at 960 a second."""
    tokens = np.array([60] + [TIME_SHIFT + 99] * 280_000 + [60 + 128], dtype=np.int16)
    path = tmp_path / "long.mid"
    codec.write_midi(codec.decode(tokens), path)
    track = mido.MidiFile(path).tracks[1]
    assert max(m.time for m in track) <= 0x0FFFFFFF
    on_off = [tick for tick, m in zip(np.cumsum([m.time for m in track]), track) if m.type == "note_on"]
    assert on_off == [0, 280_000 * 960]
    assert "hour limit" in refused(path)  # read without complaint about the delta times


def test_a_bad_token_line_is_quoted_short(tmp_path):
    with pytest.raises(MusicGPTError) as e:
        codec.parse_token_names(["NOTE_ON_60", "X" * 10_000_000], source="t.txt")
    assert str(e.value) == f"t.txt:2: unknown token {'X' * 40 + '...'!r}"
