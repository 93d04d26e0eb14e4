"""Sampling from a torch `MusicGPT`: the stepper that feeds it, around `musicgpt.decode`'s loops.

Every strategy runs the model on the new token only, through a stepper (`musicgpt.steppers`):
the growing KV cache, or on CUDA for a relative model the CUDA-graph decoder. The decoding loops,
the logit filters and the random draws are `musicgpt.decode`'s, shared with the ONNX Runtime
backend (`musicgpt.onnx_stepper`).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from musicgpt.decode import decode, filter_logits, penalize_repeats
from musicgpt.errors import MusicGPTError
from musicgpt.model import MusicGPT
from musicgpt.sampling import SamplingConfig
from musicgpt.steppers import CachedStepper, GraphStepper, RecomputeStepper

__all__ = ["SamplingConfig", "beam_search", "filter_logits", "generate", "penalize_repeats"]


def generate(model: MusicGPT, prompt, *, max_new_tokens: int, sampling: SamplingConfig | None = None,
             num_samples: int = 1, seed: int = 0, use_cache: bool = True, static_cache: bool | None = None,
             window: int | None = None, beam: bool = False, **options) -> list[np.ndarray]:
    """Continue `prompt` (1-D token ids, e.g. [EOS] + primer) `num_samples` times; new tokens only.

    Each row stops at EOS (not included), at `max_seconds` of generated TIME_SHIFTs, or after
    `max_new_tokens`. Sampling draws from numpy's generator seeded with `seed`, so a seed fixes the
    output on any device and backend (up to float rounding); `sampling.num_beams > 1` runs beam
    search (one sequence). Options: codec_config (default CodecConfig()), max_seconds,
    stop_at_eos=True, ban_eos=False (True: never emit EOS), start_with_note=False (True: no
    TIME_SHIFT before a row's first NOTE_ON), max_pause_seconds and max_note_seconds
    (musicgpt.constraints; math.inf, the default: no limit), release_sounding_only=True (False:
    a NOTE_OFF may name a key that is up, the model's raw habit), music_before (the tokens whose music
    the new ones continue, which the rules start from; default: the prompt, but an infilling prompt
    holds the suffix too and must pass its prefix), window (default the context length),
    progress=False, use_cache=True (False recomputes the whole visible context every step: the
    slow reference for tests and benchmarks), static_cache=None (the fixed-shape ring cache
    replayed as a CUDA graph: None picks it for relative models on CUDA, True forces it, run
    eagerly off CUDA; False keeps `decode_step`'s cache).
    """
    with _eval_mode(model):
        stepper = _stepper(model, window or model.config.context_len, use_cache, static_cache)
        return decode(stepper, prompt, vocab_size=model.config.vocab_size, max_new_tokens=max_new_tokens,
                      sampling=sampling, num_samples=num_samples, seed=seed, beam=beam, **options)


def beam_search(model: MusicGPT, prompt, *, max_new_tokens: int, sampling: SamplingConfig | None = None,
                **options) -> np.ndarray:
    """The best continuation found with `sampling.num_beams` beams (one beam is greedy decoding).

    Uses only the repetition and length penalties of `sampling`; options as for `generate`.
    """
    return generate(model, prompt, max_new_tokens=max_new_tokens, sampling=sampling, beam=True, **options)[0]


def _stepper(model: MusicGPT, window: int, use_cache: bool, static_cache: bool | None):
    relative = model.config.attention == "relative"
    device = model.wte.weight.device
    if static_cache and not (use_cache and relative):
        raise MusicGPTError("the static cache needs use_cache and a relative-attention model")
    if static_cache is None:
        static_cache = use_cache and relative and device.type == "cuda"
    if static_cache:
        return GraphStepper(model, window, graph=device.type == "cuda")
    return (CachedStepper if use_cache else RecomputeStepper)(model, window)


@contextmanager
def _eval_mode(model: MusicGPT):
    """Dropout off and no autograd while sampling; the caller's mode comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)
