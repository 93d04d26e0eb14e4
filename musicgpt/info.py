"""`musicgpt info [CHECKPOINT]`: what a checkpoint is, in a few lines, from its header alone.

No tensor is read (so the weights' checksum is not verified: `load_checkpoint` does that when the
model is used), which keeps it instant for a large run's `last` with its optimizer state.

Its size and shape, context, control tokens (style tags, infilling), codec, and how it was trained:
data folder, steps, tokens, time and best validation loss, as the checkpoint recorded them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from musicgpt.checkpoint import choose_checkpoint, read_checkpoint_header


def describe(spec: str | os.PathLike | None = None, runs_dir: str | os.PathLike = "runs") -> dict:
    """Everything `info` prints, as plain JSON-able values; the checkpoint is chosen as `sample`
    chooses it (explicit, newest run, shipped default)."""
    path, why = choose_checkpoint(spec, runs_dir)
    ckpt, shapes = read_checkpoint_header(path)  # the header says it all: no tensor is read
    mcfg, state = ckpt.model_config, ckpt.state
    controls = ckpt.controls
    params = sum(math.prod(shape) for name, (_, shape) in shapes.items() if name.startswith("model."))
    train_cfg = state.get("train_config") or {}
    best = state.get("best_val")
    return {
        "checkpoint": str(path), "chosen_because": why, "file_mb": round(Path(path).stat().st_size / 2**20, 2),
        "parameters": params, "model": mcfg.to_dict(), "codec": ckpt.codec_config.to_dict(),
        "tags": list(controls.tags), "infilling": controls.fim,
        "training": {"data_dir": train_cfg.get("data_dir"), "step": state.get("step"),
                     "max_steps": train_cfg.get("max_steps"), "tokens_seen": state.get("tokens_seen"),
                     "hours": round(state["elapsed_s"] / 3600, 2) if state.get("elapsed_s") else None,
                     "fim_rate": train_cfg.get("fim_rate"),
                     "best_val_nats": best, "best_val_bits": best / math.log(2) if best else None},
    }


def format_info(d: dict) -> str:
    """The lines `musicgpt info` prints."""
    m, t = d["model"], d["training"]
    tags = ", ".join(d["tags"]) if d["tags"] else "none"
    lines = [
        f"checkpoint   {d['checkpoint']} ({d['file_mb']} MB)",
        f"model        {d['parameters'] / 1e6:.2f}M parameters: {m['n_layer']} layers, {m['n_head']} heads, "
        f"width {m['n_embd']}, {m['attention']} attention"
        + (", reads which keys sound" if m.get("sounding_notes") else "")
        + (", releases only sounding keys" if m.get("sounding_releases") else ""),
        f"context      {m['context_len']} tokens (relative distances up to {m['max_rel_dist']})",
        f"styles       {tags}",
        f"infilling    {'yes' if d['infilling'] else 'no (trained without fill-in-the-middle)'}",
        f"codec        {d['codec']['step_ms']} ms steps, shifts up to {d['codec']['max_shift_steps']} steps, "
        f"{d['codec']['velocity_bins']} velocity bins",
        f"trained on   {t['data_dir'] or 'unknown'}",
        f"training     step {t['step']} of {t['max_steps']}, {t['tokens_seen'] or 0:,} tokens, {t['hours']} h",
    ]
    if t["best_val_nats"] is not None:
        lines.append(f"validation   {t['best_val_nats']:.4f} nats/token ({t['best_val_bits']:.4f} bits), the best")
    return "\n".join(lines)
