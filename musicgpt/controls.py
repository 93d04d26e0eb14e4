"""Control tokens after the codec's events: style tags (CTRL) and infilling sentinels (FIM).

A model's vocabulary is the codec's events, PAD and EOS (`CodecConfig.vocab_size` ids), then,
when it was trained with fill-in-the-middle, FIM_PREFIX, FIM_SUFFIX and FIM_MIDDLE, then one id per
style tag. Control ids are never sampled and decode to nothing, so every sequence still decodes
to valid MIDI. A checkpoint stores its `Controls` (tag names included) beside the codec config.

Sequences (Keskar et al. 2019; Bavarian et al. 2022), with T a piece's tag when it has one:
  left to right:  T EOS piece ...           (a window from the middle of a piece: T tokens ...)
  infilling:      T FIM_PREFIX prefix FIM_SUFFIX suffix FIM_MIDDLE middle
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from musicgpt.errors import MusicGPTError
from musicgpt.vocab import CodecConfig

FIM_NAMES = ("FIM_PREFIX", "FIM_SUFFIX", "FIM_MIDDLE")
MAX_TAGS = 1024
TAG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")  # a folder-like name, no spaces


@dataclass(frozen=True)
class Controls:
    """The control tokens of one model: whether it has FIM sentinels, and its tags in id order."""

    codec: CodecConfig = field(default_factory=CodecConfig)
    fim: bool = False
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.fim, bool):
            raise MusicGPTError(f"controls: fim must be true or false, got {self.fim!r}")
        if not isinstance(self.tags, tuple) or len(self.tags) > MAX_TAGS:
            raise MusicGPTError(f"controls: tags must be a list of at most {MAX_TAGS} names")
        for tag in self.tags:
            check_tag_name(tag)
        if len(set(self.tags)) != len(self.tags):
            raise MusicGPTError("controls: tag names must be different from each other")

    @property
    def first_id(self) -> int:
        return self.codec.vocab_size

    @property
    def vocab_size(self) -> int:
        return self.first_id + (len(FIM_NAMES) if self.fim else 0) + len(self.tags)

    @property
    def fim_ids(self) -> tuple[int, int, int]:
        """(FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE) ids; an error for a model trained without FIM."""
        if not self.fim:
            raise MusicGPTError("this model was trained without fill-in-the-middle, so it cannot infill "
                                "(train one with --fim-rate above 0)")
        return self.first_id, self.first_id + 1, self.first_id + 2

    def tag_id(self, name: str) -> int:
        """The id of tag `name`, or a one-line error listing the model's tags."""
        if name not in self.tags:
            known = ", ".join(self.tags) if self.tags else "none: it was trained without tags"
            raise MusicGPTError(f"unknown style {name!r}; this model's tags are {known}")
        return self.first_id + (len(FIM_NAMES) if self.fim else 0) + self.tags.index(name)

    def ids(self) -> list[int]:
        """Every control id: never sampled."""
        return list(range(self.first_id, self.vocab_size))

    def names(self) -> dict[int, str]:
        """A readable name for every control id, e.g. {390: "FIM_PREFIX", 393: "TAG_pop"}."""
        names = [*(FIM_NAMES if self.fim else ()), *(f"TAG_{t}" for t in self.tags)]
        return {self.first_id + i: n for i, n in enumerate(names)}

    def extended(self, fim: bool, tags: tuple[str, ...]) -> Controls:
        """These controls plus FIM sentinels (if `fim`) and any of `tags` they lack, appended."""
        return Controls(self.codec, self.fim or fim, self.tags + tuple(t for t in tags if t not in self.tags))

    def id_map(self, new: Controls) -> dict[int, int]:
        """Where each of these ids sits in `new`, which holds them all (e.g. `extended`'s result)."""
        by_name = {name: i for i, name in new.names().items()}
        return {**{i: i for i in range(self.first_id)}, **{i: by_name[n] for i, n in self.names().items()}}

    def to_dict(self) -> dict:
        """What a checkpoint stores (the codec config is stored beside it)."""
        return {"fim": self.fim, "tags": list(self.tags)}

    @classmethod
    def from_dict(cls, d: dict | None, codec: CodecConfig) -> Controls:
        """`to_dict`'s output; None (a checkpoint from before control tokens) means none."""
        if d is None:
            return cls(codec)
        if not isinstance(d, dict) or set(d) - {"fim", "tags"}:
            raise MusicGPTError("controls: expected a mapping with 'fim' and 'tags'")
        tags = d.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise MusicGPTError("controls: tags must be a list of names")
        return cls(codec, d.get("fim", False), tuple(tags))


def check_tag_name(name: str) -> str:
    """`name` if it can be a style tag (letters, digits and _.+-, at most 64), else a one-line error."""
    if not isinstance(name, str) or not TAG_NAME.match(name):
        raise MusicGPTError(f"{name!r} cannot be a style tag: use letters, digits and _.+- (at most 64, "
                            "no spaces)")
    return name
