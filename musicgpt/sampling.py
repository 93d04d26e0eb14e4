"""How a sampler chooses tokens and how much it writes: `SamplingConfig` and the sampling defaults.

Plain Python (no torch), so the command line can state the defaults without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from musicgpt.errors import MusicGPTError
from musicgpt.validate import is_integer, is_real

DEFAULT_SECONDS = 30.0  # music written when neither --tokens nor --seconds is given
TOKENS_PER_SECOND_CAP = 100  # --seconds S also stops after S * 100 tokens, far above real density
# Limits that real piano music keeps (musicgpt.constraints enforces them while sampling): the
# README gives the corpus figures they were chosen from.
MAX_PAUSE_SECONDS = 4.0
MAX_NOTE_SECONDS = 12.0
# Upper bounds on a request: generous for music (a million tokens is hours of piano), but they
# keep a typo from asking for tens of GB of token buffers and key/value caches.
MAX_NEW_TOKENS = 1_000_000
MAX_NUM_SAMPLES = 256
MAX_SECONDS = MAX_NEW_TOKENS / TOKENS_PER_SECOND_CAP
TOP_P_SCOPES = ("kind", "pooled", "token")  # what top-p ranks together: SamplingConfig.top_p_scope

_FLAGS = {"num_beams": "--beams"}  # options whose CLI flag is not the field name with dashes


@dataclass
class SamplingConfig:
    """How each next token is chosen; a filter left at its neutral value (0 or 1.0) is off.

    Greedy and beam search are deterministic and use only the repetition penalty (and, for
    beams, length_penalty); sampling applies every filter in `filter_logits`'s order.
    """

    greedy: bool = False
    # The model's own distribution: the default model releases only keys that sound, so a cooler
    # draw no longer buys fewer ringing notes, and it thins the music (its model card measures it).
    temperature: float = 1.0
    top_k: int = 0  # keep the k most likely tokens (ties at the k-th value all kept)
    # Nucleus: the smallest set holding this much probability. 0.95 keeps the default model's
    # statistics nearest real music (its model card measures 0.9 to 1.0).
    top_p: float = 0.95
    # What the nucleus ranks together (TOP_P_SCOPES). "kind": the note pitches and the velocities
    # are each cut to their own nucleus and keep their probability, and the waits and releases
    # are never cut, so top-p trims unlikely notes without changing how often a note is struck,
    # released or waited for. "pooled": one nucleus in which the waits count as one candidate;
    # it keeps the likely waits over the many pitches and thins the music. "token": every token
    # its own candidate; it cuts the long waits, each rare on its own, and crowds the notes.
    # The default model's card measures all three.
    top_p_scope: str = "kind"
    typical_p: float = 1.0  # locally typical set holding this much probability
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # CTRL penalty on tokens in the model's view
    num_beams: int = 1  # > 1: beam search
    length_penalty: float = 1.0  # beam hypothesis score = sum log p / length ** length_penalty

    def validate(self) -> SamplingConfig:
        """Raise a one-line MusicGPTError naming the first invalid option; return self."""
        _check(self, "temperature", is_real(self.temperature) and self.temperature > 0, "> 0")
        _check(self, "top_k", is_integer(self.top_k) and self.top_k >= 0, "an integer >= 0 (0: off)")
        _check(self, "top_p", is_real(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]")
        _check(self, "top_p_scope", self.top_p_scope in TOP_P_SCOPES, "one of " + ", ".join(TOP_P_SCOPES))
        _check(self, "typical_p", is_real(self.typical_p) and 0 < self.typical_p <= 1, "in (0, 1]")
        _check(self, "min_p", is_real(self.min_p) and 0 <= self.min_p < 1, "in [0, 1)")
        _check(self, "repetition_penalty", is_real(self.repetition_penalty) and self.repetition_penalty > 0, "> 0")
        _check(self, "num_beams", is_integer(self.num_beams) and self.num_beams >= 1, "an integer >= 1")
        _check(self, "length_penalty", is_real(self.length_penalty), "a finite number")
        if self.greedy and self.num_beams > 1:
            raise MusicGPTError("choose --greedy or --beams, not both")
        return self

    @property
    def deterministic(self) -> bool:
        return self.greedy or self.num_beams > 1

    @property
    def nucleus_only(self) -> bool:
        """Sampling with temperature and top-p alone, every other filter at its neutral value."""
        return (not self.deterministic and self.top_k == 0 and self.min_p == 0.0 and self.typical_p == 1.0
                and self.repetition_penalty == 1.0)


def _check(cfg: SamplingConfig, name: str, ok: bool, rule: str) -> None:
    if not ok:
        flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
        raise MusicGPTError(f"{flag} must be {rule}, got {getattr(cfg, name)!r}")
