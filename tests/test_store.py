"""The token store: `musicgpt prepare` (resume, grow, bad files) and training, evaluation and DDP
windows read from it, checked against the MIDI folder it was prepared from."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_piece

from musicgpt import cli, data, prepare, store, windows
from musicgpt.controls import Controls
from musicgpt.distributed import Ranks
from musicgpt.errors import MusicGPTError
from musicgpt.train import RunState, TrainConfig, load_corpus, make_loader
from musicgpt.vocab import CodecConfig


def corpus_folder(folder: Path, n: int, first: int = 0, seconds: float = 3.0) -> Path:
    """`n` short pieces in two styles and at the top, with names that repeat across folders."""
    for i in range(first, first + n):
        sub = ("jazz", "pop", ".")[i % 3]
        make_piece(folder / sub / f"p{i // 2}.mid" if sub != "." else folder / f"top{i}.mid", seed=i,
                   seconds=seconds + i % 4)
    return folder


def store_files(root: Path) -> dict[str, bytes]:
    """Every committed file of a store, by name (the manifest without its skipped list)."""
    manifest = json.loads((root / store.MANIFEST).read_text())
    manifest.pop("skipped")
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    files[store.MANIFEST] = json.dumps(manifest).encode()
    return files


def test_the_drawn_piece_is_the_one_choice_draws(tmp_path):
    # Pieces of random lengths, some weighted 0 by their tag: the dataset's O(log N) draw picks the
    # piece numpy's choice picks with the weights of the code before it, from the same numbers.
    rng = np.random.default_rng(0)
    pieces = [data.Piece(tmp_path / f"{k}.mid", np.full(int(rng.integers(1, 500)), 60, np.int16),
                         ("a", "b", "never", None)[k % 4]) for k in range(1000)]
    tag_weights = {"a": 2.5, "never": 0.0}
    ds = windows.TokenWindowDataset(pieces, 16, CodecConfig(), seed=7, tag_weights=tag_weights)
    drawn = np.array([(len(p.tokens) + 2) * tag_weights.get(p.tag, 1.0) for p in pieces])
    weights = drawn / drawn.sum()
    cdf = weights.cumsum()  # what Generator.choice computes for one draw (numpy/random/_generator.pyx)
    cdf /= cdf[-1]
    assert ds.cdf.tobytes() == cdf.tobytes()  # bit for bit, so no draw can ever differ
    for index in range(3000):
        ours, theirs = np.random.default_rng([7, index]), np.random.default_rng([7, index])
        assert int(ds.cdf.searchsorted(ours.random(), side="right")) == int(theirs.choice(len(weights), p=weights))
        assert ours.random() == theirs.random()  # the same numbers were consumed


def test_held_out_ranks_names_as_their_hex_digests_ties_in_order():
    import hashlib

    paths = [Path(f"d{k % 7}/n{k % 40}.mid") for k in range(300)]  # every name in several folders
    for fraction in (0.0, 0.05, 0.1, 0.37):
        order = sorted(range(len(paths)), key=lambda k: hashlib.sha1(paths[k].name.encode()).hexdigest())
        expected = order[:max(1, round(len(paths) * fraction))] if fraction else []
        assert data.held_out(paths, fraction) == set(expected)
        assert data.held_out_digests(np.array([data.name_digest(p) for p in paths], "S20"),
                                     fraction).tolist() == expected


def test_store_windows_equal_folder_windows(tmp_path):
    folder = corpus_folder(tmp_path / "midi", 12)
    result = prepare.prepare_store(folder, tmp_path / "store", progress=False, batch_files=5, shard_tokens=600)
    assert result.pieces == 12 and result.shards > 2  # pieces cross shard boundaries
    tokens = store.TokenStore(tmp_path / "store")
    corpus = data.encode_folder(folder, progress=False)
    train, val = data.split_files(corpus.pieces, 0.25)
    train_numbers, val_numbers = tokens.split(0.25)
    assert [tokens.paths[k] for k in val_numbers] == [p.path.relative_to(folder).as_posix() for p in val]
    assert [(p.tag, p.tokens.tolist()) for p in tokens.pieces(val_numbers)] == [(p.tag, p.tokens.tolist())
                                                                               for p in val]
    controls = Controls(corpus.config, fim=True, tags=corpus.tags)
    options = dict(augment=windows.Augment(), seed=5, controls=controls, fim_rate=0.4, tag_dropout=0.2,
                   tag_weights={"jazz": 3.0})
    ours = windows.TokenWindowDataset(tokens.source(train_numbers), 48, corpus.config, **options)
    theirs = windows.TokenWindowDataset(train, 48, corpus.config, **options)
    assert len(ours) == len(theirs)
    tag_ids = {controls.tag_id(t) for t in corpus.tags}
    tagged = fim = 0
    for i in range(600):
        (x, y, s), (x2, y2, s2) = ours[i], theirs[i]
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(s, s2), i
        tagged += int(x[0]) in tag_ids
        fim += controls.fim_ids[0] in x.tolist()
    assert tagged > 50 and fim > 50  # tags and FIM windows did occur among those compared
    for k in range(len(train_numbers)):  # every edge of the framed slice
        whole = windows.framed(train[k], corpus.config)
        for start, stop in ((0, 1), (0, 10**6), (1, len(whole) - 1), (len(whole) - 1, len(whole) + 5), (3, 3)):
            assert tokens.source(train_numbers).framed_slice(k, start, stop).tolist() == whole[start:stop].tolist()


def run_prepare(folder: Path, out: Path, kill_after: int | None = None) -> subprocess.CompletedProcess:
    code = ("import sys; from musicgpt.prepare import prepare_store; "
            "prepare_store(sys.argv[1], sys.argv[2], progress=False, batch_files=8, shard_tokens=700, workers=2)")
    env = {**os.environ, **({prepare.KILL_ENV: str(kill_after)} if kill_after is not None else {})}
    return subprocess.run([sys.executable, "-c", code, str(folder), str(out)], env=env, capture_output=True,
                          text=True, timeout=240)


def test_prepare_killed_then_resumed_equals_one_run(tmp_path):
    folder = corpus_folder(tmp_path / "midi", 40, seconds=2.0)
    killed = run_prepare(folder, tmp_path / "resumed", kill_after=2)
    assert killed.returncode == -9, killed.stderr
    manifest = store.read_manifest(tmp_path / "resumed")
    assert manifest["pieces"] == 16  # two batches of 8 committed, the third written but not counted
    index_bytes = (tmp_path / "resumed" / store.INDEX).stat().st_size
    assert index_bytes > 16 * store.INDEX_DTYPE.itemsize
    assert run_prepare(folder, tmp_path / "resumed").returncode == 0
    assert run_prepare(folder, tmp_path / "once").returncode == 0
    once, resumed = store_files(tmp_path / "once"), store_files(tmp_path / "resumed")
    assert store.read_manifest(tmp_path / "once")["pieces"] == 40
    assert once.keys() == resumed.keys() and all(once[k] == resumed[k] for k in once)


def test_prepare_grows_a_store_without_encoding_old_files_again(tmp_path, monkeypatch):
    folder = corpus_folder(tmp_path / "midi", 9)
    out = tmp_path / "store"
    first = prepare.prepare_store(folder, out, progress=False, batch_files=4)
    old = store_files(out)
    corpus_folder(folder, 5, first=9)
    encoded = []
    real = data.encode_files
    monkeypatch.setattr(data, "encode_files", lambda files, *a, **k: encoded.extend(files) or real(files, *a, **k))
    grown = prepare.prepare_store(folder, out, progress=False, batch_files=4)
    assert (first.added, grown.added, grown.pieces) == (9, 5, 14)
    assert sorted(encoded) == sorted(set(data.find_midi_files(folder)) - {folder / p for p in
                                                                          store.TokenStore(out).paths[:9]})
    tokens = store.TokenStore(out)
    assert len(set(tokens.paths)) == 14
    new = store_files(out)
    for name in old:  # the old records, paths and tokens are untouched: the new ones follow them
        if name != store.MANIFEST:
            assert new[name].startswith(old[name]), name
    assert prepare.prepare_store(folder, out, progress=False).added == 0  # nothing new: nothing added
    assert sorted(p.relative_to(folder).as_posix() for p in data.find_midi_files(folder)) == sorted(tokens.paths)


def ddp_windows(rank: int, world: int, port: int, store_dir: str, out: str, steps: int) -> None:
    """One rank: the windows its store-backed training loader yields (written by rank 0 for all)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = TrainConfig(data_dir=store_dir, max_steps=steps, batch_size=3, seq_len=32, seed=11, fim_rate=0.3,
                      workers=1 if rank == 0 else 0)
    corpus = load_corpus(cfg, None, progress=False)
    run = type("Run", (), dict(cfg=cfg, device="cpu", codec_config=corpus.codec_config, state=RunState(),
                               controls=Controls(corpus.codec_config, True, corpus.tags),
                               ranks=Ranks(rank, world)))()
    got = [(x.numpy().tobytes(), y.numpy().tobytes()) for x, y, _ in make_loader(run, corpus.train)
           for x, y in zip(x, y)]
    gathered = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, got)
        dist.destroy_process_group()
    else:
        gathered = [got]
    if rank == 0:
        torch.save(gathered, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_ranks_share_out_the_windows_of_one_process(tmp_path):
    folder = corpus_folder(tmp_path / "midi", 8)
    prepare.prepare_store(folder, tmp_path / "store", progress=False)
    torch.multiprocessing.spawn(ddp_windows, args=(2, free_port(), str(tmp_path / "store"), str(tmp_path / "two"), 4),
                                nprocs=2)
    ddp_windows(0, 1, 0, str(tmp_path / "store"), str(tmp_path / "one"), 8)
    first, second = torch.load(tmp_path / "two")
    (alone,) = torch.load(tmp_path / "one")
    assert len(first) == len(second) == 12 and len(alone) == 24
    assert not set(first) & set(second)
    assert set(first) | set(second) == set(alone)
    assert len(set(alone)) == len(alone)  # distinct windows, so the sets say what the lists say


def test_bad_files_are_skipped_and_a_bad_store_fails_in_one_line(tmp_path, capsys):
    folder = corpus_folder(tmp_path / "midi", 3)
    (folder / "broken.mid").write_bytes(b"MThd garbage")
    assert cli.main(["prepare", str(folder), "--out", str(tmp_path / "store")]) == 0
    err = capsys.readouterr().err
    assert "warning: skipped 1 bad file(s): " in err and "broken.mid: " in err
    assert store.read_manifest(tmp_path / "store")["skipped"].keys() == {"broken.mid"}
    assert len(store.TokenStore(tmp_path / "store")) == 3
    for bad, why in ((tmp_path / "missing", "not a folder"), (tmp_path / "empty", "no .mid or .midi files"),
                     (tmp_path / "notastore", "not a token store")):
        if bad.name == "empty":
            bad.mkdir()
        if bad.name == "notastore":
            bad.mkdir()
            (bad / store.MANIFEST).write_text('{"format": "something else"}')
        assert cli.main(["train", str(bad), "--max-steps", "1", "--out", str(tmp_path / "run")]) != 0
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and why in lines[0] and "Traceback" not in lines[0], lines
    with pytest.raises(MusicGPTError, match="is not a token store"):
        prepare.prepare_store(folder, folder)  # a folder of other files is never written into
    with pytest.raises(MusicGPTError, match="encoded with codec"):
        load_corpus(TrainConfig(data_dir=str(tmp_path / "store")), CodecConfig(step_ms=20), progress=False)


def test_eval_on_a_store_equals_eval_on_its_folder(tiny_run, tmp_path):
    from musicgpt.evaluate import evaluate_folder

    folder = tiny_run.parent / "data"
    prepare.prepare_store(folder, tmp_path / "store", progress=False)
    for all_files in (False, True):
        a = evaluate_folder(folder, tiny_run, all_files=all_files, progress=False)
        b = evaluate_folder(tmp_path / "store", tiny_run, all_files=all_files, progress=False)
        assert (a.files, a.windows, a.tokens, a.nats, a.infill_nats) == (b.files, b.windows, b.tokens, b.nats,
                                                                         b.infill_nats)
