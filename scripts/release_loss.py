"""How sure a model is of releasing a note, by how long the note has sounded (teacher forced).

Held notes are the default model's known fault: with the sampler's limits off it lets notes
ring for seconds more often than the music it learned from. This scores every NOTE_OFF of the
held-out classical performances (`compare_models.held_out_files`) in the windows held-out loss
uses (non-overlapping, context-long, behind the piece's tag), and reports the mean loss of the
NOTE_OFFs by the age of the note they end, and by how many tokens back its NOTE_ON lies, beside
the mean loss of the NOTE_ONs.

    python scripts/release_loss.py --checkpoint default
"""

from __future__ import annotations

import argparse
import json

import compare_models as cm
import numpy as np
import torch

from musicgpt import codec, data
from musicgpt.checkpoint import choose_checkpoint, load_model
from musicgpt.data import Piece
from musicgpt.tags import tag_pieces
from musicgpt.vocab import NOTE_OFF
from musicgpt.windows import eval_token_windows, tag_ids, window_starts

AGE_EDGES_S = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, np.inf)
DISTANCE_EDGES = (0, 64, 256, np.inf)


def token_losses(model, piece: Piece, controls, config, seq_len: int) -> np.ndarray:
    """Loss (nats) of each of the piece's tokens, scored in the windows held-out loss uses
    (`windows.eval_token_windows`: each token a target once, behind the piece's tag)."""
    (tag,) = tag_ids([piece], controls)
    framed = np.full(len(piece.tokens) + 2, np.nan)  # EOS + tokens + EOS, as the windows frame them
    starts = window_starts(len(piece.tokens), tag, seq_len)
    for start, (_, window, sounding) in zip(starts, eval_token_windows([piece], seq_len, config, controls)):
        with torch.no_grad():
            logits = model(torch.as_tensor(window[:-1], dtype=torch.long)[None],
                           sounding=torch.from_numpy(sounding)[None]).logits[0].float()
        logp = torch.log_softmax(logits, -1).numpy()
        first = start if tag is not None else start + 1  # the framed position of the first target
        targets = window[1:].astype(np.int64)
        framed[first:first + len(targets)] = -logp[np.arange(len(targets)), targets]
    return framed[1:-1]


def release_losses(checkpoint: str) -> dict:
    """Mean NOTE_OFF loss by note age and by token distance, and the mean NOTE_ON loss."""
    path, _ = choose_checkpoint(checkpoint, cm.ROOT / "runs")
    model, ckpt = load_model(path)
    corpus = data.encode_files(cm.held_out_files()["classical"], ckpt.codec_config, progress=False)
    tag_pieces(corpus.pieces, cm.DATA)
    by_age, by_distance, note_on = [[] for _ in AGE_EDGES_S[1:]], [[] for _ in DISTANCE_EDGES[1:]], []
    for piece in corpus.pieces:
        tokens = piece.tokens.astype(np.int64)
        losses = token_losses(model, piece, ckpt.controls, ckpt.codec_config, ckpt.model_config.context_len)
        notes = codec.decode_notes(tokens, ckpt.codec_config)
        note_on += losses[notes.on_index].tolist()
        released = notes.off_index >= 0
        released[released] = tokens[notes.off_index[released]] >= NOTE_OFF  # not ended by a re-strike
        for age, distance, off in zip(notes.end[released] - notes.start[released],
                                      notes.off_index[released] - notes.on_index[released],
                                      notes.off_index[released]):
            by_age[np.searchsorted(AGE_EDGES_S, age, "right") - 1].append(losses[off])
            by_distance[np.searchsorted(DISTANCE_EDGES, distance, "right") - 1].append(losses[off])

    def rows(edges, groups, unit):
        return [{"from": edges[i], "to": edges[i + 1], "unit": unit, "count": len(g),
                 "nats": float(np.mean(g)) if g else None} for i, g in enumerate(groups)]

    return {"checkpoint": str(path), "note_on_nats": float(np.mean(note_on)), "note_ons": len(note_on),
            "note_off_by_age": rows(AGE_EDGES_S, by_age, "s"),
            "note_off_by_distance": rows(DISTANCE_EDGES, by_distance, "tokens")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="default", help="'default', a run folder or a file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = release_losses(args.checkpoint)
    print(json.dumps(result, indent=1))
    print(f"NOTE_ON: {result['note_on_nats']:.3f} nats ({result['note_ons']})")
    for key in ("note_off_by_age", "note_off_by_distance"):
        for r in result[key]:
            if r["nats"] is not None:
                print(f"NOTE_OFF {r['from']:g}-{r['to']:g} {r['unit']}: {r['nats']:.3f} nats ({r['count']})")


if __name__ == "__main__":
    main()
