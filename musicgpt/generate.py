"""Sampling: logit filters and greedy / sampled / beam decoding (files and primers: `sample`).

Every strategy runs the model on the new token only, through a stepper (`musicgpt.steppers`):
the growing KV cache, or on CUDA for a relative model the CUDA-graph decoder. The musical rules
of what a row may emit are `musicgpt.constraints`.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from musicgpt.constraints import Rules, prompt_state, seconds_to_steps
from musicgpt.errors import MusicGPTError
from musicgpt.model import MusicGPT
from musicgpt.sampling import MAX_NEW_TOKENS, MAX_NUM_SAMPLES, SamplingConfig
from musicgpt.steppers import CachedStepper, GraphStepper, RecomputeStepper, Stepper
from musicgpt.validate import is_integer
from musicgpt.vocab import CodecConfig

# ----------------------------------------------------------------------------- logit filters

def filter_logits(logits: Tensor, cfg: SamplingConfig, generated: Tensor | None = None) -> Tensor:
    """Logits [B, V] with cfg's processors applied and removed tokens at -inf (input untouched).

    Order, as in Hugging Face transformers: repetition penalty (over `generated` [B, T] token
    ids), temperature, top-k, top-p, min-p, typical-p. Top-k keeps every token tied with the
    k-th best logit, so it may keep more than k; the mass filters always keep at least one.
    """
    if generated is not None and cfg.repetition_penalty != 1.0:
        logits = penalize_repeats(logits, generated, cfg.repetition_penalty)
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if 0 < cfg.top_k < logits.size(-1):
        kth = logits.topk(cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if cfg.top_p < 1.0:  # most probable first
        logits = _keep_smallest_set(logits, -logits, cfg.top_p)
    if cfg.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < cfg.min_p * probs.amax(-1, keepdim=True), -math.inf)
    if cfg.typical_p < 1.0:  # Meister et al. 2022: closest to the expected surprise first
        logp = logits.log_softmax(-1)
        entropy = -(logp.exp() * logp).nansum(-1, keepdim=True)  # 0 * -inf = nan counts as 0
        logits = _keep_smallest_set(logits, (-logp - entropy).abs(), cfg.typical_p)
    return logits


def penalize_repeats(logits: Tensor, generated: Tensor, penalty: float) -> Tensor:
    """CTRL rule: the logits of tokens in `generated` are divided by penalty if positive, else multiplied."""
    seen = logits.gather(-1, generated)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, generated, seen)


def _keep_smallest_set(logits: Tensor, key: Tensor, mass: float) -> Tensor:
    """Keep tokens in ascending `key` order (ties by index) until they hold `mass`; at least one."""
    order = key.argsort(dim=-1, stable=True)
    probs = logits.softmax(-1).gather(-1, order)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked ahead of each
    drop = before >= mass
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)


# ----------------------------------------------------------------------------- decoding loops

def _progress_bar(enabled: bool, total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", desc="sampling", disable=not enabled, file=sys.stderr, leave=False)


def _sample(stepper: Stepper, prompt: Tensor, cfg: SamplingConfig, rules: Rules, batch: int,
            seed: int, progress: bool) -> list[Tensor]:
    """Greedy or sampled decoding of `batch` rows from one prompt; rows stop at EOS or time."""
    P, N = prompt.size(1), rules.max_new_tokens
    seq = prompt.new_empty(batch, P + N)  # one buffer for the whole run: no per-step concat
    seq[:, :P] = prompt
    gen = torch.Generator(device=prompt.device).manual_seed(seed)
    race = torch.empty(batch, rules.vocab_size, device=prompt.device)  # reused noise buffer
    lengths, alive = [0] * batch, [True] * batch
    rows = rules.initial(batch)
    penalize = cfg.repetition_penalty != 1.0
    logits = stepper.start(prompt, batch)
    with _progress_bar(progress, N) as bar:
        for t in range(N):
            pos = P + t
            logits = rules.mask_logits(logits, rows)
            seen = seq[:, max(0, pos - stepper.window):pos] if penalize else None
            if cfg.greedy:
                if penalize:
                    logits = penalize_repeats(logits, seen, cfg.repetition_penalty)
                token = logits.argmax(-1)
            else:  # exponential race: argmax p / E with E ~ Exp(1) draws p, faster than multinomial
                probs = filter_logits(logits, cfg, seen).softmax(-1)
                token = probs.div_(race.exponential_(generator=gen)).argmax(-1)
            seq[:, pos] = token
            tokens = token.tolist()  # the one host sync per step
            rules.advance(rows, tokens)
            for k in range(batch):  # a row's final token (EOS or the last shift) still counts
                if alive[k]:
                    lengths[k] += 1
                    alive[k] = not rules.ends(tokens[k], rows[k].elapsed)
            bar.update()
            if t + 1 == N or not any(alive):
                break
            logits = stepper.step(seq, pos)
    return [_strip_eos(seq[k, P:P + n], rules.eos_id) for k, n in enumerate(lengths)]


def _strip_eos(tokens: Tensor, eos_id: int | None) -> Tensor:
    if eos_id is not None and len(tokens) and tokens[-1] == eos_id:
        tokens = tokens[:-1]
    return tokens.cpu()


def _beam_search(stepper: Stepper, prompt: Tensor, cfg: SamplingConfig, rules: Rules, progress: bool) -> Tensor:
    """Beam search as in Hugging Face: hypotheses end at EOS or at max_seconds, score / len ** lp.

    Per step the B * V continuations are ranked; the best B that do not end become the new
    beams (their cache rows reordered), and ending ones ranked within the top B are kept as
    finished hypotheses. It stops when B finished ones cannot be beaten by the running beams.
    """
    B, P, N = cfg.num_beams, prompt.size(1), rules.max_new_tokens
    dev = prompt.device
    seq = prompt.new_empty(B, P + N)
    seq[:, :P] = prompt
    scores = torch.full((B,), -math.inf, device=dev)
    scores[0] = 0.0  # all beams start identical: expand from the first only
    state = rules.initial(B)
    shifts = torch.as_tensor(rules.steps, device=dev)
    finished: list[tuple[float, Tensor]] = []
    logits = stepper.start(prompt, B)
    done = False
    with _progress_bar(progress, N) as bar:
        for t in range(N):
            pos, norm = P + t, (t + 1) ** cfg.length_penalty
            logits = rules.mask_logits(logits, state)
            if cfg.repetition_penalty != 1.0:
                logits = penalize_repeats(logits, seq[:, max(0, pos - stepper.window):pos], cfg.repetition_penalty)
            cand = (scores[:, None] + logits.log_softmax(-1)).view(-1)
            ranked, order = cand.sort(descending=True, stable=True)  # stable: ties as argmax
            V = logits.size(-1)
            beam, token = order // V, order % V
            steps = torch.tensor([r.elapsed for r in state], device=dev)[beam] + shifts[token]
            ends = rules.ends(token, steps)
            keep = (~ends).nonzero()[:B, 0]
            for r in ends[:B].nonzero()[:, 0].tolist():
                hyp = torch.cat([seq[beam[r], P:pos], token[r:r + 1]])
                finished.append((ranked[r].item() / norm, _strip_eos(hyp, rules.eos_id)))
            finished = sorted(finished, key=lambda h: -h[0])[:B]
            rows = beam[keep]
            seq = seq.index_select(0, rows)
            seq[:, pos] = token[keep]
            scores = ranked[keep]
            state = [state[r].copy() for r in rows.tolist()]
            rules.advance(state, token[keep].tolist())
            stepper.reorder(rows)
            bar.update()
            done = len(finished) >= B and scores[0].item() / norm <= finished[-1][0]
            if done or t + 1 == N:
                break
            logits = stepper.step(seq, pos)
    if not done:
        norm = (t + 1) ** cfg.length_penalty
        finished += [(s / norm, seq[b, P:pos + 1].cpu()) for b, s in enumerate(scores.tolist())]
    return max(finished, key=lambda h: h[0])[1]


def generate(model: MusicGPT, prompt, *, max_new_tokens: int, sampling: SamplingConfig | None = None,
             num_samples: int = 1, seed: int = 0, **options) -> list[Tensor]:
    """Continue `prompt` (1-D token ids, e.g. [EOS] + primer) `num_samples` times; new tokens only.

    Each row stops at EOS (not included), at `max_seconds` of generated TIME_SHIFTs, or after
    `max_new_tokens`. Sampling draws from a torch.Generator seeded with `seed`, so a seed fixes
    the output on a given device; `sampling.num_beams > 1` runs `beam_search` (one sequence).
    Options: codec_config (default CodecConfig()), max_seconds, stop_at_eos=True, ban_eos=False (True: never emit EOS),
    start_with_note=False (True: no TIME_SHIFT before a row's first NOTE_ON), max_pause_seconds
    and max_note_seconds (musicgpt.constraints; math.inf, the default: no limit), music_before (the
    tokens whose music the new ones continue, which the rules start from; default: the prompt, but
    an infilling prompt holds the suffix too and must pass its prefix), window (default
    the context length), progress=False, use_cache=True (False recomputes the whole visible
    context every step: the slow reference for tests and benchmarks), static_cache=None (the
    fixed-shape ring cache replayed as a CUDA graph: None picks it for relative models on CUDA,
    True forces it, run eagerly off CUDA; False keeps `decode_step`'s cache).
    """
    cfg = (sampling or SamplingConfig()).validate()
    if not is_integer(num_samples) or not 1 <= num_samples <= MAX_NUM_SAMPLES:
        raise MusicGPTError(f"num_samples must be an integer from 1 to {MAX_NUM_SAMPLES}, got {num_samples!r}")
    if cfg.num_beams > 1:
        if num_samples > 1:
            raise MusicGPTError("beam search is deterministic: use --num-samples 1 with --beams")
        return [beam_search(model, prompt, max_new_tokens=max_new_tokens, sampling=cfg, **options)]
    with _session(model, prompt, max_new_tokens, **options) as (stepper, prompt, rules, progress):
        return _sample(stepper, prompt, cfg, rules, num_samples, seed, progress)


def beam_search(model: MusicGPT, prompt, *, max_new_tokens: int, sampling: SamplingConfig | None = None,
                **options) -> Tensor:
    """The best continuation found with `sampling.num_beams` beams (one beam is greedy decoding).

    Uses only the repetition and length penalties of `sampling`; options as for `generate`.
    """
    cfg = (sampling or SamplingConfig()).validate()
    with _session(model, prompt, max_new_tokens, **options) as (stepper, prompt, rules, progress):
        return _beam_search(stepper, prompt, cfg, rules, progress)


@contextmanager
def _session(model: MusicGPT, prompt, max_new_tokens: int, *, codec_config: CodecConfig | None = None,
             max_seconds: float = math.inf, stop_at_eos: bool = True, use_cache: bool = True,
             window: int | None = None, progress: bool = False, ban_eos: bool = False,
             start_with_note: bool = False, max_pause_seconds: float = math.inf,
             max_note_seconds: float = math.inf, static_cache: bool | None = None, music_before=None):
    """Check the request, build the stepper and the decoding rules, and run in eval + inference mode."""
    codec_config = codec_config or CodecConfig()
    if model.config.vocab_size < codec_config.vocab_size:
        raise MusicGPTError(f"model vocabulary ({model.config.vocab_size}) is smaller than the codec's "
                            f"({codec_config.vocab_size})")
    if not is_integer(max_new_tokens) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise MusicGPTError(f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS:,}, got {max_new_tokens!r}")
    device = model.wte.weight.device
    prompt = torch.as_tensor(prompt).to(device=device, dtype=torch.long).reshape(1, -1)
    if prompt.size(1) == 0:
        raise MusicGPTError("the prompt must hold at least one token (start from EOS)")
    music = prompt[0].cpu().numpy() if music_before is None else np.asarray(music_before, dtype=np.int64)
    rules = _rules(music, max_new_tokens, codec_config, model.config.vocab_size, max_seconds=max_seconds,
                   stop_at_eos=stop_at_eos, ban_eos=ban_eos, start_with_note=start_with_note,
                   max_pause_seconds=max_pause_seconds, max_note_seconds=max_note_seconds)
    window = window or model.config.context_len
    relative = model.config.attention == "relative"
    if static_cache and not (use_cache and relative):
        raise MusicGPTError("the static cache needs use_cache and a relative-attention model")
    if static_cache is None:
        static_cache = use_cache and relative and device.type == "cuda"
    if static_cache:
        stepper = GraphStepper(model, window, graph=device.type == "cuda")
    else:
        stepper = (CachedStepper if use_cache else RecomputeStepper)(model, window)
    was_training = model.training
    model.eval()  # dropout off while sampling; the caller's mode comes back afterwards
    try:
        with torch.inference_mode():
            yield stepper, prompt, rules, progress
    finally:
        model.train(was_training)


def _steps(seconds: float, config: CodecConfig) -> float:
    """Codec time steps covering `seconds`; math.inf stays infinite (no limit)."""
    return seconds_to_steps(seconds, config) if math.isfinite(seconds) else math.inf


def _rules(music: np.ndarray, max_new_tokens: int, codec_config: CodecConfig, vocab_size: int, *, max_seconds: float,
           stop_at_eos: bool, ban_eos: bool, start_with_note: bool, max_pause_seconds: float,
           max_note_seconds: float) -> Rules:
    """The decoding rules of one request (musicgpt.constraints) after `music` (token ids), its limits checked."""
    # Padding is never music, and control tokens (tags, FIM sentinels) only ever come as input.
    banned = [codec_config.pad_id, *range(codec_config.vocab_size, vocab_size)]
    if ban_eos:
        banned.append(codec_config.eos_id)  # a length was asked for: the piece goes on to it
    limits = {}
    for name, seconds in (("max_pause_seconds", max_pause_seconds), ("max_note_seconds", max_note_seconds)):
        if not (isinstance(seconds, (int, float)) and seconds > 0):
            raise MusicGPTError(f"{name} must be a positive number of seconds (math.inf: no limit), got {seconds!r}")
        limits[name] = max(_steps(seconds, codec_config), 1)
    if not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise MusicGPTError(f"max_seconds must be a positive number (math.inf: no limit), got {max_seconds!r}")
    max_steps = _steps(max_seconds, codec_config)
    start = prompt_state(music.ravel(), codec_config)
    if start_with_note:  # from silence: the piece begins with a note, not a pause
        start.quiet = math.inf
    return Rules(max_new_tokens, codec_config.eos_id if stop_at_eos else None, max_steps, codec_config,
                 banned, start, max_quiet=limits["max_pause_seconds"], max_held=limits["max_note_seconds"],
                 vocab_size=vocab_size)
