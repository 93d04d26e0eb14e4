"""Control tokens: their ids, their errors, and their round trip through a checkpoint."""

import pytest

from musicgpt import checkpoint
from musicgpt.controls import Controls
from musicgpt.errors import MusicGPTError
from musicgpt.model import MusicGPT, preset
from musicgpt.vocab import CodecConfig

CFG = CodecConfig()


def test_ids_follow_the_codecs_fim_first_then_tags():
    c = Controls(CFG, fim=True, tags=("classical", "pop"))
    assert c.fim_ids == (CFG.vocab_size, CFG.vocab_size + 1, CFG.vocab_size + 2)
    assert c.tag_id("classical") == CFG.vocab_size + 3 and c.tag_id("pop") == CFG.vocab_size + 4
    assert c.vocab_size == CFG.vocab_size + 5 and c.ids() == list(range(CFG.vocab_size, CFG.vocab_size + 5))
    assert Controls(CFG, tags=("pop",)).tag_id("pop") == CFG.vocab_size  # no sentinels without FIM
    assert Controls(CFG).vocab_size == CFG.vocab_size


def test_unknown_tag_and_missing_fim_are_one_line_errors():
    with pytest.raises(MusicGPTError, match="unknown style 'jazz'; this model's tags are classical, pop"):
        Controls(CFG, tags=("classical", "pop")).tag_id("jazz")
    with pytest.raises(MusicGPTError, match="trained without fill-in-the-middle"):
        _ = Controls(CFG).fim_ids
    with pytest.raises(MusicGPTError, match="cannot be a style tag"):
        Controls(CFG, tags=("two words",))
    with pytest.raises(MusicGPTError, match="different"):
        Controls(CFG, tags=("a", "a"))


def test_controls_survive_a_checkpoint_round_trip(tmp_path):
    controls = Controls(CFG, fim=True, tags=("chorale", "pop"))
    model = MusicGPT(preset("tiny", n_layer=1, vocab_size=controls.vocab_size))
    path = checkpoint.save_checkpoint(tmp_path / "m", model, CFG, controls=controls)
    _, ckpt = checkpoint.load_model(path)
    assert ckpt.controls == controls
    assert checkpoint.peek_controls(path) == controls


def test_a_checkpoint_from_before_control_tokens_has_none(tmp_path):
    model = MusicGPT(preset("tiny", n_layer=1))
    path = checkpoint.save_checkpoint(tmp_path / "m", model, CFG)
    _, ckpt = checkpoint.load_model(path)
    assert ckpt.controls == Controls(CFG) and ckpt.controls.vocab_size == CFG.vocab_size


def test_the_shipped_model_has_the_corpus_tags_and_fim():
    _, default = checkpoint.load_model("default")
    assert default.controls == Controls(CFG, fim=True, tags=("chorale", "classical", "folk", "pop", "scores"))
    assert default.model_config.vocab_size == CFG.vocab_size + 3 + 5


def test_a_vocabulary_that_does_not_fit_the_controls_is_refused(tmp_path):
    model = MusicGPT(preset("tiny", n_layer=1, vocab_size=CFG.vocab_size + 2))
    path = checkpoint.save_checkpoint(tmp_path / "m", model, CFG, controls=Controls(CFG, tags=("pop",)))
    with pytest.raises(MusicGPTError, match="does not match"):
        checkpoint.load_model(path)
