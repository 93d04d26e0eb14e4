"""The attention-arc plotter: files in every format, weights equal to the model's, clear CLI errors."""

from __future__ import annotations

import json
import re
import shutil

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from conftest import make_piece

from musicgpt import attention_plot as ap
from musicgpt import codec
from musicgpt.checkpoint import load_model
from musicgpt.cli import main
from musicgpt.vocab import CodecConfig


@pytest.fixture(scope="module")
def piece(tmp_path_factory):
    return make_piece(tmp_path_factory.mktemp("attn") / "generated.mid", seed=7, seconds=8)


@pytest.fixture(scope="module")
def loaded(tiny_run):
    return load_model(tiny_run, "cpu")


@pytest.fixture(scope="module")
def excerpt(loaded, piece):
    model, ckpt = loaded
    return ap.load_excerpt(piece, model, ckpt.codec_config, max_tokens=200)


def _positions(notes):
    return [np.asarray(a) for a in (notes.on_index, notes.off_index, notes.velocity_index)]


def _expected_row(A: np.ndarray, notes, tokens, q: int) -> np.ndarray:
    """The documented gathering rule, written as plainly as possible."""
    on, off, vel = _positions(notes)
    out = np.zeros(len(on))
    for k in range(len(on)):
        if on[k] >= on[q]:
            continue  # not before the query: never an arc
        w = A[on[q], on[k]]
        if 0 <= off[k] < on[q] and codec.token_names([tokens[off[k]]])[0].startswith("NOTE_OFF"):
            w += A[on[q], off[k]]
        if vel[k] >= 0:
            sharing = sum(1 for j in range(len(on)) if vel[j] == vel[k] and on[j] <= on[q])
            w += A[on[q], vel[k]] / sharing
        out[k] = w
    return out


def test_note_weights_rule_on_a_hand_made_stream():
    names = ["VELOCITY_20", "NOTE_ON_60", "NOTE_ON_64", "TIME_SHIFT_500ms", "NOTE_OFF_60", "NOTE_ON_67",
             "TIME_SHIFT_100ms", "NOTE_ON_64"]
    tokens = np.concatenate([[CodecConfig().eos_id], codec.parse_token_names(names)])
    notes = codec.decode_notes(tokens)
    A = np.tril(np.arange(1, 82, dtype=float).reshape(9, 9))  # distinct values: any mix-up shows
    w = ap.note_weights(A, notes, tokens)
    assert list(notes.on_index) == [2, 3, 6, 8]
    q = 2  # NOTE_ON_67 at token 6; the two earlier notes share the VELOCITY token at 1 with it
    assert w[q, 0] == pytest.approx(A[6, 2] + A[6, 5] + A[6, 1] / 3)  # its ON, its OFF, a third of VELOCITY
    assert w[q, 1] == pytest.approx(A[6, 3] + A[6, 1] / 3)             # still sounding: no OFF yet
    # Note 1 (E4) ends when its key is struck again at token 8: that NOTE_ON is the new note's alone.
    assert w[3, 1] == pytest.approx(A[8, 3] + A[8, 1] / 4)
    assert np.all(np.triu(w) == 0)  # nothing points forward or at itself


def test_arcs_point_back_and_equal_the_models_weights(loaded, piece, excerpt):
    model, ckpt = loaded
    tokens = np.concatenate([[ckpt.codec_config.eos_id], codec.encode(piece, ckpt.codec_config)])[:200]
    assert np.array_equal(excerpt.tokens, tokens)
    with torch.no_grad():
        _, attentions = model.forward_with_attention(torch.as_tensor(tokens, dtype=torch.long)[None])
    notes = codec.decode_notes(tokens, ckpt.codec_config)
    start, (on, _, _) = np.asarray(notes.start), _positions(notes)
    layer, n = model.config.n_layer - 1, len(on)
    for q in (ap.choose_query(excerpt), n // 2, 1):
        arcs = ap.query_arcs(excerpt, q, layer, None, top_k=4, threshold=0.0)
        for h in range(model.config.n_head):
            expected = _expected_row(attentions[layer][0, h].numpy(), notes, tokens, q)
            assert expected.sum() <= 1 + 1e-5
            mine = [a for a in arcs if a.head == h]
            assert [a.key for a in mine] == list(np.argsort(-expected, kind="stable")[: len(mine)])
            assert len(mine) == min(4, int(np.sum(expected > 0)))
            for a in mine:
                assert a.query == q and on[a.key] < on[q] and start[a.key] <= start[q]
                assert a.weight == pytest.approx(expected[a.key], abs=1e-6)
    # The threshold drops light arcs; --heads keeps only the heads asked for.
    few = ap.query_arcs(excerpt, n - 1, layer, [1], top_k=50, threshold=0.05)
    assert all(a.head == 1 and a.weight >= 0.05 for a in few)


def test_png_svg_and_html_are_written(tiny_run, piece, tmp_path):
    png = ap.render_attention(piece, tmp_path / "a.png", checkpoint=tiny_run, heads=[0, 2], threshold=0.0,
                              device="cpu")
    img = mpimg.imread(png.path)
    assert img.shape[:2] == (750, 1800)  # 12 x 5 inches at 150 dpi
    assert img.std() > 0.02 and len(np.unique(img.reshape(-1, img.shape[-1]).round(2), axis=0)) > 20
    assert png.arcs and {a.head for a in png.arcs} <= {0, 2}

    svg = ap.render_attention(piece, tmp_path / "a.svg", checkpoint=tiny_run, query_time=3.0, device="cpu")
    assert "<svg" in svg.path.read_text()[:2000]
    assert abs(float(svg.excerpt.notes.start[svg.query]) - 3.0) < 0.5

    # A sampler's output is a MIDI file written from tokens: the same path serves it.
    sampled = tmp_path / "sampled.mid"
    codec.write_midi(codec.decode(codec.transpose(codec.encode(piece), 2)), sampled)
    html = ap.render_attention(sampled, tmp_path / "a.html", checkpoint=tiny_run, top_k=3, device="cpu")
    page = html.path.read_text()
    assert "http://" not in page and "https://" not in page and "src=" not in page
    blob = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)
    data = json.loads(blob)
    assert {"notes", "arcs", "layers", "heads", "colours", "initial"} <= set(data)
    assert data["initial"]["top_k"] == 3 and data["piece"] == "sampled.mid"
    n = len(data["notes"]["pitch"])
    assert len(data["arcs"]) == data["layers"] and len(data["arcs"][0]) == data["heads"]
    assert len(data["arcs"][-1][0]) == n and all(len(flat) <= 16 for flat in data["arcs"][-1][0])
    layer = data["layers"] - 1  # the page's arcs are the library's, rounded
    for key, w in zip(data["arcs"][layer][1][n - 1][::2], data["arcs"][layer][1][n - 1][1::2]):
        row = ap.note_weights(html.excerpt.attentions[layer, 1], html.excerpt.notes, html.excerpt.tokens)[n - 1]
        assert w == pytest.approx(row[key], abs=1e-3) and key < n - 1


def test_grid_has_a_panel_per_layer_and_head(excerpt, tiny_run, piece, tmp_path, monkeypatch, capsys):
    fig = ap.draw_grid(excerpt)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == excerpt.n_layer * excerpt.n_head
    # Without --checkpoint the newest run under ./runs is used.
    shutil.copytree(tiny_run, tmp_path / "runs" / "mine")
    monkeypatch.chdir(tmp_path)
    assert main(["attention", str(piece), "--grid", "-o", "g.png"]) == 0
    assert "newest run" in capsys.readouterr().err
    assert (tmp_path / "g.png").stat().st_size > 10_000


def _error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("musicgpt: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_errors_are_one_line(tiny_run, piece, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "x.png")
    args = ["attention", str(piece), "--checkpoint", str(tmp_path / "nope"), "-o", out]
    assert "checkpoint not found" in _error(capsys, args)
    fake = tmp_path / "song.mid"
    fake.write_text("this is not a MIDI file")
    assert "song.mid" in _error(capsys, ["attention", str(fake), "--checkpoint", str(tiny_run), "-o", out])
    run = ["attention", str(piece), "--checkpoint", str(tiny_run), "-o"]
    with monkeypatch.context() as m:  # the model's shape is read from the header: no weights load
        m.setattr("musicgpt.checkpoint.load_model", lambda *a, **k: pytest.fail("weights were loaded"))
        assert "layers 0..2" in _error(capsys, run + [out, "--layer", "3"])
        assert "heads 0..3" in _error(capsys, run + [out, "--heads", "0,9"])
    assert "--heads" in _error(capsys, run + [out, "--heads", "a,b"])
    assert ".png, .svg or .html" in _error(capsys, run + [str(tmp_path / "x.jpg")])
    assert "--grid" in _error(capsys, run + [str(tmp_path / "x.html"), "--grid"])
    assert "--query-note" in _error(capsys, run + [out, "--query-note", "100000"])
    assert not (tmp_path / "x.png").exists()


def test_html_page_survives_hostile_strings_in_its_data(tmp_path):
    """A file name such as `<!--<script>` must not end the data element or swallow the page's script."""
    hostile = "</script><!--<script>&amp; \u2028 x.mid"
    data = {"piece": hostile, "notes": {"names": [hostile]}}
    page = ap.write_html(data, tmp_path / "page.html").read_text()
    template = (ap.Path(ap.__file__).parent / "templates" / "attention.html").read_text()
    for tag in ("<script", "</script", "<!--"):
        assert page.count(tag) == template.count(tag), tag
    blob = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(blob) == data
    assert "<title>" not in hostile and "&lt;/script&gt;" in page  # the title is escaped as HTML
