"""Style tags from a data folder: top-level subfolders, and a tags.txt that overrides them."""

from pathlib import Path

import pytest
from conftest import make_piece

from musicgpt import data
from musicgpt.errors import MusicGPTError
from musicgpt.tags import folder_tag, glob_pattern, read_tags_file


def test_a_file_takes_its_top_level_folder_as_tag():
    assert folder_tag(Path("pop/2019/song.mid")) == "pop"
    assert folder_tag(Path("song.mid")) is None
    assert folder_tag(Path("Bach chorales (scores)/x.mid")) == "Bach-chorales-scores"


def test_globs_keep_star_within_a_folder():
    assert glob_pattern("music21/**").match("music21/bach/a.mid")
    assert not glob_pattern("*.mid").match("pop/a.mid")
    assert glob_pattern("pop/*.mid").match("pop/a.mid") and not glob_pattern("pop/*.mid").match("pop/x/a.mid")


def test_tags_file_overrides_the_folders_first_match_wins(tmp_path):
    for rel in ("classical/a.mid", "classical/chorales/b.mid", "pop/c.mid", "d.mid", "scratch/e.mid"):
        make_piece(tmp_path / rel, seconds=2)
    (tmp_path / "tags.txt").write_text("# scores are not performances\n"
                                       "classical/chorales/**  chorale\n"
                                       "classical/**           baroque\n"
                                       "scratch/**             -\n\n")
    corpus = data.encode_folder(tmp_path, workers=1, progress=False)
    tags = {p.path.relative_to(tmp_path).as_posix(): p.tag for p in corpus.pieces}
    assert tags == {"classical/a.mid": "baroque", "classical/chorales/b.mid": "chorale", "pop/c.mid": "pop",
                    "d.mid": None, "scratch/e.mid": None}
    assert corpus.tags == ("baroque", "chorale", "pop")


@pytest.mark.parametrize("line", ["pop", "a/** two words", "a/** bad tag!"])
def test_a_bad_tags_file_line_is_one_error_naming_it(tmp_path, line):
    (tmp_path / "tags.txt").write_text(f"# ok\n{line}\n")
    with pytest.raises(MusicGPTError, match=r"tags\.txt:2: expected 'PATTERN TAG'"):
        read_tags_file(tmp_path / "tags.txt")
