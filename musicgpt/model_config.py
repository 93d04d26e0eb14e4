"""The model's configuration: `ModelConfig`, its size limits and the named presets, without torch.

Kept apart from `musicgpt.model` so that reading a checkpoint's metadata (as the fast sampler does,
through `musicgpt.checkpoint_header`) checks a configuration without importing torch, which alone
takes seconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from musicgpt.errors import MusicGPTError
from musicgpt.keyboard import KEY_FEATURES

ATTENTION_KINDS = ("relative", "absolute")

# Upper bounds on every size, so that a configuration read from a file (a checkpoint's metadata)
# cannot ask for terabytes. They sit far above any model this project trains (the "base" preset
# is 6 layers of width 512) and far below what would exhaust a machine's memory.
MAX_LAYERS = 256
MAX_HEADS = 256
MAX_EMBD = 16384
MAX_MLP_DIM = 65536
MAX_CONTEXT = 2**20  # context_len and max_rel_dist: a million tokens is hours of piano
MAX_VOCAB = 2**15  # the codec stores token ids as int16
MAX_PARAMS = 2**32  # 16 GiB of float32 weights; the per-field bounds alone would allow far more
SIZE_LIMITS = {"vocab_size": MAX_VOCAB, "n_layer": MAX_LAYERS, "n_head": MAX_HEADS, "n_embd": MAX_EMBD,
               "mlp_dim": MAX_MLP_DIM, "context_len": MAX_CONTEXT, "max_rel_dist": MAX_CONTEXT}


@dataclass
class ModelConfig:
    """Sizes of the transformer; `attention="absolute"` is the learned-position ablation."""

    vocab_size: int = 390
    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 128
    mlp_dim: int = 512
    context_len: int = 256
    dropout: float = 0.1  # on embeddings, residual branches and the MLP
    # On attention weights. None (and configs saved before it existed) means the same as
    # `dropout`; it is resolved when the config is built, so a built config holds a number.
    attn_dropout: float | None = None
    max_rel_dist: int = 256
    attention: str = "relative"
    bias: bool = True
    # Each position also reads which keys sound and for how long (`musicgpt.keyboard`).
    sounding_notes: bool = False
    # And gives a NOTE_OFF probability only where its key sounds: releasing a key that is up does
    # nothing, so the distribution is learned over the releases that mean something.
    sounding_releases: bool = False

    def __post_init__(self) -> None:
        self._validate()
        if self.attn_dropout is None:
            self.attn_dropout = self.dropout

    @property
    def d_head(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def num_params(self) -> int:
        """The parameter count of `MusicGPT(self)`, computed without building it."""
        c, bias = self.n_embd, int(self.bias)
        norm = c * (1 + bias)  # a LayerNorm's gain and bias
        attn = 3 * c * c + 3 * c * bias + c * c + c * bias  # qkv and the output projection
        if self.attention == "relative":
            attn += self.max_rel_dist * c  # rel_emb: n_head * max_rel_dist * d_head
        mlp = 2 * c * self.mlp_dim + (self.mlp_dim + c) * bias
        embeddings = self.vocab_size * c + (self.context_len * c if self.attention == "absolute" else 0)
        embeddings += KEY_FEATURES * c if self.sounding_notes else 0  # the keyboard input's projection
        return embeddings + self.n_layer * (2 * norm + attn + mlp) + norm

    @classmethod
    def from_dict(cls, d: dict, source: str = "") -> ModelConfig:
        """Build a config from `to_dict()` output; `source` (e.g. a file name) prefixes errors."""
        prefix = f"{source}: " if source else ""
        if not isinstance(d, dict):
            raise MusicGPTError(f"{prefix}model config: expected a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MusicGPTError(f"{prefix}unknown model config keys: {', '.join(unknown)}")
        try:
            return cls(**d)
        except MusicGPTError as e:
            raise MusicGPTError(f"{prefix}{e}") from None

    def _validate(self) -> None:
        for name, limit in SIZE_LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise MusicGPTError(f"model config: {name} must be a positive integer, "
                                    f"got {value!r:.40}")
            if value > limit:
                # A thousand-digit number is not printed whole; one line must stay one short line.
                shown = value if value < 2**64 else "more"
                raise MusicGPTError(f"model config: {name} must be at most {limit}, got {shown}")
        if self.n_embd % self.n_head:
            raise MusicGPTError(f"model config: n_embd ({self.n_embd}) must be divisible by "
                                f"n_head ({self.n_head})")
        if self.attention not in ATTENTION_KINDS:
            kinds = ", ".join(ATTENTION_KINDS)
            raise MusicGPTError(f"model config: attention must be one of {kinds}, "
                                f"got {self.attention!r:.40}")
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if name == "attn_dropout" and value is None:
                continue
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not 0.0 <= value < 1.0):
                raise MusicGPTError(f"model config: {name} must be in [0, 1), got {value!r:.40}")
        for name in ("bias", "sounding_notes", "sounding_releases"):
            if not isinstance(getattr(self, name), bool):
                raise MusicGPTError(f"model config: {name} must be true or false, got {getattr(self, name)!r:.40}")
        if self.sounding_notes and self.attention != "relative":
            raise MusicGPTError("model config: sounding_notes needs relative attention")
        if self.sounding_releases and not self.sounding_notes:
            raise MusicGPTError("model config: sounding_releases needs sounding_notes (the keys it reads)")
        if self.num_params() > MAX_PARAMS:
            raise MusicGPTError(f"model config: {self.num_params():,} parameters is more than the "
                                f"limit of {MAX_PARAMS:,}")


# Named model sizes; every other field keeps its ModelConfig default unless overridden.
PRESETS: dict[str, dict[str, int]] = {
    # Trains on a 2-core CPU in minutes.
    "tiny": dict(n_layer=3, n_head=4, n_embd=128, mlp_dim=512, context_len=256, max_rel_dist=256),
    "small": dict(n_layer=4, n_head=8, n_embd=256, mlp_dim=1024, context_len=1024,
                  max_rel_dist=1024),
    # The largest that ships (fp16 weights under 50 MB) and trains well in minutes on one GPU.
    "medium": dict(n_layer=6, n_head=8, n_embd=384, mlp_dim=1536, context_len=2048,
                   max_rel_dist=1024),
    # The Music Transformer piano model (Huang et al. 2018): 6 layers, 8 heads, width 512.
    "base": dict(n_layer=6, n_head=8, n_embd=512, mlp_dim=2048, context_len=2048,
                 max_rel_dist=2048),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The config of preset `name` with some fields replaced, e.g. `preset("tiny", dropout=0.0)`."""
    if name not in PRESETS:
        raise MusicGPTError(f"unknown model preset {name!r} (choose from {', '.join(PRESETS)})")
    try:
        return ModelConfig(**{**PRESETS[name], **overrides})
    except TypeError as e:  # an unknown field name
        raise MusicGPTError(f"model preset {name!r}: {e}") from None
