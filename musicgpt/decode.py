"""Decoding over any stepper: logit filters, then sampled, greedy or beam search, in numpy.

No torch here. The same loops drive the torch model (`musicgpt.generate`, on any device) and
the ONNX Runtime step (`musicgpt.onnx_stepper`), so a seed draws the same noise on every backend
and a command that samples on the CPU never has to import torch. With the default sampling
(temperature and top-p, one row) the ONNX Runtime step draws the token itself from the same
noise and the rules' mask, which spares the loop its array work on every token. A stepper is
what turns the token just chosen into the next logits; the musical rules of what a row may emit
are `musicgpt.constraints`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from musicgpt.constraints import Rules, prompt_state, seconds_to_steps
from musicgpt.errors import MusicGPTError
from musicgpt.sampling import MAX_NEW_TOKENS, MAX_NUM_SAMPLES, SamplingConfig
from musicgpt.validate import is_integer
from musicgpt.vocab import NOTE_ON, NUM_PITCHES, TIME_SHIFT, CodecConfig

TINY = np.finfo(np.float32).tiny  # keeps the race's noise away from an exact zero
NUCLEUS_GROUPS = 2  # rows of Nucleus.groups: the note pitches and the velocities


class Stepper(Protocol):
    """What a decoding loop needs from a model: logits for the next token, and beam reordering.

    A stepper may also draw the next token inside its step, `step_and_draw(tokens, mask, noise,
    temperature, top_p, nucleus)` for up to `draw_rows` rows: the rules' mask, the race's noise and
    the `Nucleus` go in and the chosen tokens come out, so the loop does no array work per token.
    """

    window: int  # tokens the model attends over (the repetition penalty looks as far back)

    def start(self, prompt: np.ndarray, batch: int) -> np.ndarray:
        """Encode the prompt (1-D token ids) once for `batch` rows; float32 logits [batch, V]."""

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed each row's new token ([B] ids); float32 logits [B, V] for the token after it."""

    def reorder(self, rows: np.ndarray) -> None:
        """Row b continues old row rows[b] (beam search)."""


# ----------------------------------------------------------------------------- logit filters

def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis; -inf logits get probability 0."""
    e = np.exp(logits - logits.max(-1, keepdims=True))
    e /= e.sum(-1, keepdims=True)
    return e


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@dataclass(frozen=True)
class Nucleus:
    """What top-p ranks together. Each row of `groups` ([NUCLEUS_GROUPS, V] bool) is cut to its
    own nucleus and keeps the probability it had; tokens in no group are never cut; the tokens of
    `pooled` ([V] bool) count as one candidate of their group, kept or cut whole."""

    groups: np.ndarray
    pooled: np.ndarray


def nucleus_for(scope: str, config: CodecConfig, vocab_size: int) -> Nucleus:
    """The `Nucleus` of a `SamplingConfig.top_p_scope` ("kind", "pooled" or "token")."""
    groups = np.zeros((NUCLEUS_GROUPS, vocab_size), dtype=bool)
    pooled = np.zeros(vocab_size, dtype=bool)
    if scope == "kind":  # the waits and the releases are never cut: neither is a wrong note
        groups[0, NOTE_ON:NOTE_ON + NUM_PITCHES] = True
        groups[1, config.velocity_offset:config.velocity_offset + config.velocity_bins] = True
    else:
        groups[0] = True
        if scope == "pooled":
            pooled[TIME_SHIFT:TIME_SHIFT + config.max_shift_steps] = True
    return Nucleus(groups, pooled)


def filter_logits(logits: np.ndarray, cfg: SamplingConfig, generated: np.ndarray | None = None,
                  nucleus: Nucleus | None = None) -> np.ndarray:
    """Logits [B, V] with cfg's processors applied and removed tokens at -inf (input untouched).

    Order, as in Hugging Face transformers: repetition penalty (over `generated` [B, T] token
    ids), temperature, top-k, top-p, min-p, typical-p. Top-k keeps every token tied with the
    k-th best logit, so it may keep more than k; the mass filters always keep at least one.
    Top-p ranks tokens as `nucleus` groups them (None: every token on its own).
    """
    if generated is not None and cfg.repetition_penalty != 1.0:
        logits = penalize_repeats(logits, generated, cfg.repetition_penalty)
    if cfg.temperature != 1.0:
        logits = logits / np.asarray(cfg.temperature, dtype=logits.dtype)
    V = logits.shape[-1]
    if 0 < cfg.top_k < V:
        kth = np.partition(logits, V - cfg.top_k, axis=-1)[..., V - cfg.top_k:V - cfg.top_k + 1]
        logits = np.where(logits < kth, -np.inf, logits)
    if cfg.top_p < 1.0:
        logits = _keep_nucleus(logits, cfg.top_p, nucleus)
    if cfg.min_p > 0.0:
        probs = softmax(logits)
        logits = np.where(probs < cfg.min_p * probs.max(-1, keepdims=True), -np.inf, logits)
    if cfg.typical_p < 1.0:  # Meister et al. 2022: closest to the expected surprise first
        logp = log_softmax(logits)
        with np.errstate(invalid="ignore"):  # 0 * -inf = nan counts as 0
            entropy = -np.nansum(np.exp(logp) * logp, -1, keepdims=True)
        logits = _keep_smallest_set(logits, np.abs(-logp - entropy), cfg.typical_p)
    return logits


def penalize_repeats(logits: np.ndarray, generated: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL rule: the logits of tokens in `generated` are divided by penalty if positive, else multiplied."""
    rows = np.arange(len(logits))[:, None]
    seen = logits[rows, generated]
    out = logits.copy()
    out[rows, generated] = np.where(seen > 0, seen / penalty, seen * penalty)
    return out


def _keep_nucleus(logits: np.ndarray, mass: float, nucleus: Nucleus | None) -> np.ndarray:
    """Top-p within each group of `nucleus`; a group's kept tokens share the probability the
    whole group had, so the cut changes which pitch or velocity is drawn, not how often one is."""
    if nucleus is None:
        return _keep_most_probable(logits, mass)
    probs = softmax(logits)
    out = logits.copy()
    for group in nucleus.groups:
        if not group.any():
            continue
        rows = np.flatnonzero(np.isfinite(logits[:, group]).any(-1))  # rows that may draw from it
        if not len(rows):
            continue
        cut = _keep_most_probable(logits[np.ix_(rows, group)], mass, nucleus.pooled[group])
        if not group.all():
            member = probs[np.ix_(rows, group)]
            kept = np.where(np.isfinite(cut), member, 0.0).sum(-1, keepdims=True)
            with np.errstate(divide="ignore"):  # a group whose probability underflowed stays at 0
                cut = cut + np.log(member.sum(-1, keepdims=True) / np.maximum(kept, TINY))
        out[np.ix_(rows, group)] = cut
    return out


def _keep_most_probable(logits: np.ndarray, mass: float, pooled: np.ndarray | None = None) -> np.ndarray:
    """Keep the most probable tokens until they hold `mass` (ties by index); at least one. The
    tokens of `pooled` ([V] bool) count as one candidate, ranked last among ties, kept or cut whole.

    `_keep_smallest_set` with the key -probability, made cheap for every sampled token: sorting
    the probabilities alone gives the running mass, and the k-th largest one is the threshold.
    """
    probs = softmax(logits)
    candidates = probs
    if pooled is not None and pooled.any():
        candidates = np.concatenate([np.where(pooled, 0.0, probs), probs[:, pooled].sum(-1, keepdims=True)], -1)
    ranked = np.sort(candidates, axis=-1)[:, ::-1]
    before = np.cumsum(ranked, -1) - ranked
    kept = np.maximum((before < mass).sum(-1), 1)
    keep = np.empty(candidates.shape, dtype=bool)
    for b, k in enumerate(kept.tolist()):
        row, threshold = candidates[b], ranked[b, k - 1]
        keep[b] = row >= threshold
        tied = np.flatnonzero(row == threshold)
        surplus = len(tied) - (k - int((row > threshold).sum()))  # tied candidates ranked past the k-th
        if surplus > 0:
            keep[b, tied[len(tied) - surplus:]] = False
    if candidates is not probs:
        keep = np.where(pooled, keep[:, -1:], keep[:, :-1])
    return np.where(keep, logits, -np.inf)


def _keep_smallest_set(logits: np.ndarray, key: np.ndarray, mass: float) -> np.ndarray:
    """Keep tokens in ascending `key` order (ties by index) until they hold `mass`; at least one."""
    rows = np.arange(len(logits))[:, None]
    order = np.argsort(key, axis=-1, kind="stable")
    probs = softmax(logits)[rows, order]
    before = np.cumsum(probs, -1) - probs  # mass of the tokens ranked ahead of each: never falls
    kept = np.maximum((before < mass).sum(-1, keepdims=True), 1)  # so the kept ones are a prefix
    rank = np.empty_like(order)
    rank[rows, order] = np.arange(order.shape[-1])
    return np.where(rank < kept, logits, -np.inf)


# ----------------------------------------------------------------------------- decoding loops

def _progress_bar(enabled: bool, total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", desc="sampling", disable=not enabled, file=sys.stderr, leave=False)


def sample_rows(stepper: Stepper, prompt: np.ndarray, cfg: SamplingConfig, rules: Rules, batch: int,
                seed: int, progress: bool = False) -> list[np.ndarray]:
    """Greedy or sampled decoding of `batch` rows from one prompt; rows stop at EOS or time."""
    P, N = len(prompt), rules.max_new_tokens
    seq = np.empty((batch, P + N), dtype=np.int64)  # one buffer for the whole run: no per-step concat
    seq[:, :P] = prompt
    rng = np.random.default_rng(seed)
    lengths, alive = [0] * batch, [True] * batch
    rows = rules.initial(batch)
    penalize = cfg.repetition_penalty != 1.0
    nucleus = nucleus_for(cfg.top_p_scope, rules.config, rules.vocab_size)
    in_step = in_step_draw(stepper, cfg, batch)

    def choose(logits: np.ndarray, pos: int) -> np.ndarray:
        logits = rules.mask_logits(logits, rows)
        seen = seq[:, max(0, pos - stepper.window):pos] if penalize else None
        if cfg.greedy:
            return (penalize_repeats(logits, seen, cfg.repetition_penalty) if penalize else logits).argmax(-1)
        # The exponential race: argmax p / E with E ~ Exp(1) draws p, one vectorised draw.
        probs = softmax(filter_logits(logits, cfg, seen, nucleus))
        return (probs / race_noise(rng, probs.shape)).argmax(-1)

    token = choose(stepper.start(prompt, batch), P)
    with _progress_bar(progress, N) as bar:
        for t in range(N):
            seq[:, P + t] = token
            tokens = token.tolist()
            rules.advance(rows, tokens)
            for k in range(batch):  # a row's final token (EOS or the last shift) still counts
                if alive[k]:
                    lengths[k] += 1
                    alive[k] = not rules.ends(tokens[k], rows[k].elapsed)
            bar.update()
            if t + 1 == N or not any(alive):
                break
            if in_step is not None:  # the same draw, made inside the model's step
                token = in_step(token, rules.mask(rows), race_noise(rng, (batch, rules.vocab_size)),
                                cfg.temperature, cfg.top_p, nucleus)
            else:
                token = choose(stepper.step(token), P + t + 1)
    return [_strip_eos(seq[k, P:P + n], rules.eos_id) for k, n in enumerate(lengths)]


def race_noise(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """The exponential race's noise: Exp(1) per row and token, kept away from zero."""
    return rng.standard_exponential(shape, dtype=np.float32) + TINY


def in_step_draw(stepper: Stepper, cfg: SamplingConfig, batch: int):
    """The stepper's `step_and_draw` when it can make this run's draws itself (temperature and
    top-p only, at most `draw_rows` rows), else None: then the loop draws from the logits."""
    draw = getattr(stepper, "step_and_draw", None)
    return draw if draw is not None and cfg.nucleus_only and batch <= stepper.draw_rows else None


def _strip_eos(tokens: np.ndarray, eos_id: int | None) -> np.ndarray:
    if eos_id is not None and len(tokens) and tokens[-1] == eos_id:
        tokens = tokens[:-1]
    return tokens.copy()


def beam_rows(stepper: Stepper, prompt: np.ndarray, cfg: SamplingConfig, rules: Rules,
              progress: bool = False) -> np.ndarray:
    """Beam search as in Hugging Face: hypotheses end at EOS or at max_seconds, score / len ** lp.

    Per step the B * V continuations are ranked; the best B that do not end become the new
    beams (their stepper rows reordered), and ending ones ranked within the top B are kept as
    finished hypotheses. It stops when B finished ones cannot be beaten by the running beams.
    """
    B, P, N = cfg.num_beams, len(prompt), rules.max_new_tokens
    seq = np.empty((B, P + N), dtype=np.int64)
    seq[:, :P] = prompt
    scores = np.full(B, -np.inf)
    scores[0] = 0.0  # all beams start identical: expand from the first only
    state = rules.initial(B)
    finished: list[tuple[float, np.ndarray]] = []
    logits = stepper.start(prompt, B)
    done = False
    with _progress_bar(progress, N) as bar:
        for t in range(N):
            pos, norm = P + t, (t + 1) ** cfg.length_penalty
            logits = rules.mask_logits(logits, state)
            if cfg.repetition_penalty != 1.0:
                logits = penalize_repeats(logits, seq[:, max(0, pos - stepper.window):pos], cfg.repetition_penalty)
            cand = (scores[:, None] + log_softmax(logits)).ravel()
            order = np.argsort(-cand, kind="stable")  # stable: ties as argmax
            ranked = cand[order]
            V = logits.shape[-1]
            beam, token = order // V, order % V
            steps = np.array([r.elapsed for r in state])[beam] + rules.steps[token]
            ends = rules.ends(token, steps)
            keep = np.flatnonzero(~ends)[:B]
            for r in np.flatnonzero(ends[:B]).tolist():
                hyp = np.append(seq[beam[r], P:pos], token[r])
                finished.append((float(ranked[r]) / norm, _strip_eos(hyp, rules.eos_id)))
            finished = sorted(finished, key=lambda h: -h[0])[:B]
            rows = beam[keep]
            seq = seq[rows]
            seq[:, pos] = token[keep]
            scores = ranked[keep]
            state = [state[r].copy() for r in rows.tolist()]
            rules.advance(state, token[keep].tolist())
            stepper.reorder(rows)
            bar.update()
            done = len(finished) >= B and scores[0] / norm <= finished[-1][0]
            if done or t + 1 == N:
                break
            logits = stepper.step(seq[:, pos])
    if not done:
        norm = (t + 1) ** cfg.length_penalty
        finished += [(s / norm, seq[b, P:pos + 1].copy()) for b, s in enumerate(scores.tolist())]
    return max(finished, key=lambda h: h[0])[1]


# ----------------------------------------------------------------------------- one request

def decode(stepper: Stepper, prompt, *, vocab_size: int, max_new_tokens: int,
           sampling: SamplingConfig | None = None, num_samples: int = 1, seed: int = 0,
           codec_config: CodecConfig | None = None, max_seconds: float = math.inf,
           stop_at_eos: bool = True, ban_eos: bool = False, start_with_note: bool = False,
           max_pause_seconds: float = math.inf, max_note_seconds: float = math.inf,
           release_sounding_only: bool = True, music_before=None, progress: bool = False,
           beam: bool = False) -> list[np.ndarray]:
    """Continue `prompt` (1-D token ids) with a model of `vocab_size` tokens behind `stepper`; the
    new tokens of each row (one row for beam search, which `sampling.num_beams > 1` or `beam`
    asks for). Options as `musicgpt.generate.generate`."""
    cfg = (sampling or SamplingConfig()).validate()
    if not is_integer(num_samples) or not 1 <= num_samples <= MAX_NUM_SAMPLES:
        raise MusicGPTError(f"num_samples must be an integer from 1 to {MAX_NUM_SAMPLES}, got {num_samples!r}")
    if cfg.num_beams > 1 and num_samples > 1:
        raise MusicGPTError("beam search is deterministic: use --num-samples 1 with --beams")
    codec_config = codec_config or CodecConfig()
    if vocab_size < codec_config.vocab_size:
        raise MusicGPTError(f"model vocabulary ({vocab_size}) is smaller than the codec's "
                            f"({codec_config.vocab_size})")
    if not is_integer(max_new_tokens) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise MusicGPTError(f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS:,}, got {max_new_tokens!r}")
    prompt = np.asarray(prompt, dtype=np.int64).reshape(-1)
    if len(prompt) == 0:
        raise MusicGPTError("the prompt must hold at least one token (start from EOS)")
    music = prompt if music_before is None else np.asarray(music_before, dtype=np.int64)
    rules = decoding_rules(music, max_new_tokens, codec_config, vocab_size, max_seconds=max_seconds,
                           stop_at_eos=stop_at_eos, ban_eos=ban_eos, start_with_note=start_with_note,
                           max_pause_seconds=max_pause_seconds, max_note_seconds=max_note_seconds,
                           release_sounding_only=release_sounding_only)
    if beam or cfg.num_beams > 1:
        return [beam_rows(stepper, prompt, cfg, rules, progress)]
    return sample_rows(stepper, prompt, cfg, rules, num_samples, seed, progress)


def _steps(seconds: float, config: CodecConfig) -> float:
    """Codec time steps covering `seconds`; math.inf stays infinite (no limit)."""
    return seconds_to_steps(seconds, config) if math.isfinite(seconds) else math.inf


def decoding_rules(music: np.ndarray, max_new_tokens: int, codec_config: CodecConfig, vocab_size: int, *,
                   max_seconds: float, stop_at_eos: bool, ban_eos: bool, start_with_note: bool,
                   max_pause_seconds: float, max_note_seconds: float, release_sounding_only: bool = True) -> Rules:
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
                 vocab_size=vocab_size, release_sounding_only=release_sounding_only)
