"""Training and evaluation windows: determinism, padding, coverage, style tags and FIM order."""

import numpy as np
import pytest

from musicgpt import data
from musicgpt.controls import Controls
from musicgpt.errors import MusicGPTError
from musicgpt.fim import time_cuts
from musicgpt.vocab import TIME_SHIFT, CodecConfig
from musicgpt.windows import IGNORE_INDEX, Augment, TokenWindowDataset, eval_windows, framed, infill_windows

CFG = CodecConfig()


def test_windows_are_deterministic_and_augment_only_when_asked(midi_folder):
    corpus = data.encode_folder(midi_folder, workers=1, progress=False)
    plain = TokenWindowDataset(corpus.pieces, 64, CFG, seed=1)
    x, y, _ = plain[5]
    assert x.shape == y.shape == (64,)
    np.testing.assert_array_equal(x[1:].numpy(), y[:-1].numpy())  # targets are inputs shifted by one
    x2, _, _ = plain[5]
    assert (x == x2).all()
    aug = TokenWindowDataset(corpus.pieces, 64, CFG, seed=1, augment=Augment())
    differs = sum(not (aug[i][0] == plain[i][0]).all() for i in range(20))
    assert differs > 10


def test_short_piece_is_padded_with_ignored_targets(tmp_path):
    piece = data.Piece(tmp_path / "x.mid", np.array([60, 260, 188], dtype=np.int16))
    x, y, _ = TokenWindowDataset([piece], 16, CFG)[0]
    assert x[0] == CFG.eos_id and y[3] == CFG.eos_id
    assert (y[4:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("tagged", [False, True])
def test_eval_windows_cover_every_token_once(midi_folder, tagged):
    corpus = data.encode_folder(midi_folder, workers=1, progress=False)
    controls = Controls(CFG, tags=("pop",)) if tagged else None
    for p in corpus.pieces:
        p.tag = "pop"
    windows = eval_windows(corpus.pieces, 50, CFG, controls)
    counted = sum(int((y != IGNORE_INDEX).sum()) for _, y, _ in windows)
    # Each piece's tokens and its closing EOS; behind a tag, the opening EOS too.
    assert counted == sum(len(p.tokens) + 1 + tagged for p in corpus.pieces)
    if tagged:
        assert all(x[0] == controls.tag_id("pop") for x, _, _ in windows)
    else:
        assert all(x[0] < CFG.vocab_size for x, _, _ in windows)


def piece_of(n_moments: int, tag=None, seed=0) -> data.Piece:
    """A piece of n moments, each a NOTE_ON, a shift and its NOTE_OFF, so cuts fall often."""
    rng = np.random.default_rng(seed)
    tokens = []
    for _ in range(n_moments):
        key = int(rng.integers(40, 90))
        tokens += [key, TIME_SHIFT + int(rng.integers(0, 50)), 128 + key]
    return data.Piece(data.Path(f"p{seed}.mid"), np.array(tokens, dtype=np.int16), tag)


def test_tags_lead_their_windows_and_are_sometimes_dropped():
    controls = Controls(CFG, tags=("classical", "pop"))
    pieces = [piece_of(300, "pop", 0), piece_of(300, None, 1)]
    ds = TokenWindowDataset(pieces, 64, CFG, controls=controls, tag_dropout=0.25, seed=3)
    pop = controls.tag_id("pop")
    firsts = [int(ds[i][0][0]) for i in range(400)]
    tagged = sum(f == pop for f in firsts)
    assert 0.25 < tagged / 400 < 0.5  # half the windows are from the tagged piece, a quarter of those untagged
    assert controls.tag_id("classical") not in firsts  # a tag no piece has never appears
    assert not any(int(y) in controls.ids() for i in range(50) for y in ds[i][1])  # tags are never targets


def test_fim_windows_are_well_formed():
    controls = Controls(CFG, fim=True)
    pre, suf, mid = controls.fim_ids
    pieces = [piece_of(400, seed=2)]
    original = framed(pieces[0], CFG)
    ds = TokenWindowDataset(pieces, 96, CFG, controls=controls, fim_rate=0.5, seed=4)
    n_fim = 0
    for i in range(200):
        x, y, _ = ds[i]
        window = np.concatenate([x[:1].numpy(), y[y != IGNORE_INDEX].numpy()])
        if pre not in window:
            assert suf not in window and mid not in window
            continue
        n_fim += 1
        assert window[0] == pre and list(window).count(suf) == list(window).count(mid) == 1
        s, m = int(np.flatnonzero(window == suf)[0]), int(np.flatnonzero(window == mid)[0])
        prefix, suffix, middle = window[1:s], window[s + 1:m], window[m + 1:]
        restored = np.concatenate([prefix, middle, suffix])
        assert len(window) == 97 and len(restored) == 94
        start = next(j for j in range(len(original)) if np.array_equal(original[j:j + 94], restored))
        assert start >= 0  # the parts put back in order are a real slice of the piece
        for part in (middle, suffix):  # cut at time positions: each later part starts by moving time on
            assert len(part) == 0 or TIME_SHIFT <= part[0] < CFG.velocity_offset
    assert 60 < n_fim < 140


def test_time_cuts_are_before_shifts_and_at_the_ends():
    tokens = np.array([60, TIME_SHIFT + 3, 188, TIME_SHIFT, 62])
    assert time_cuts(tokens, CFG).tolist() == [1, 3, 5]


def test_infill_windows_score_only_the_middle():
    controls = Controls(CFG, fim=True)
    windows = infill_windows([piece_of(200, seed=5)], 64, CFG, controls)
    assert windows
    for x, y, _ in windows:
        mid_at = int(np.flatnonzero(x.numpy() == controls.fim_ids[2])[0])
        assert (y[:mid_at] == IGNORE_INDEX).all()
        assert (y[mid_at:] != IGNORE_INDEX).any()


def test_fim_needs_a_model_with_sentinels():
    with pytest.raises(data.MusicGPTError, match="FIM"):
        TokenWindowDataset([piece_of(10)], 16, CFG, controls=Controls(CFG), fim_rate=0.5)


def test_tag_weights_draw_a_style_more_often(tmp_path):
    # Two equally long pieces: unweighted, each gives about half the windows; classical=4 gives it 4 in 5.
    tokens = np.array([60, 260, 188] * 100, dtype=np.int16)
    pieces = [data.Piece(tmp_path / "a.mid", tokens, "classical"), data.Piece(tmp_path / "b.mid", tokens, "pop")]
    controls = Controls(CFG, tags=("classical", "pop"))

    def classical_share(weights):
        ds = TokenWindowDataset(pieces, 16, CFG, controls=controls, tag_weights=weights)
        return np.mean([int(ds[i][0][0]) == controls.tag_id("classical") for i in range(2000)])

    assert classical_share(None) == pytest.approx(0.5, abs=0.05)
    assert classical_share({"classical": 4.0}) == pytest.approx(0.8, abs=0.04)
    with pytest.raises(MusicGPTError, match="--tag-weight jazz: no training piece has that tag.*classical, pop"):
        TokenWindowDataset(pieces, 16, CFG, tag_weights={"jazz": 2.0})
