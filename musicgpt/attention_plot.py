"""Attention arcs over a piano roll, after the Music Transformer's figures: what a note attends to.

The model reads the piece's first `max_tokens` tokens (EOS first, as in training) once; its
token-to-token softmax weights are then gathered onto notes with one rule:

    weight(query q -> key k) =  A[on_q, on_k]
                              + A[on_q, off_k]                  if k's NOTE_OFF precedes on_q
                                                                (a note ended by re-striking its key
                                                                has no NOTE_OFF of its own)
                              + A[on_q, vel_k] / n(vel_k, q)    if k has a VELOCITY token

for every note k whose NOTE_ON comes before q's in the token stream (so arcs only point back),
where A is one layer's and one head's [T, T] weights, on/off/vel are the token positions of a
note's NOTE_ON, NOTE_OFF and governing VELOCITY (`codec.decode_notes`), and n(vel_k, q) is the
number of notes governed by that VELOCITY token whose NOTE_ON is at or before on_q (the query
included): a shared velocity token is split evenly, so a token's weight is never counted twice
and a query's weights over its keys sum to at most 1 (the rest sits on TIME_SHIFTs, EOS, itself).
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from musicgpt.atomic import atomic_write, check_output_file
from musicgpt.codec import DecodedNotes
from musicgpt.errors import MusicGPTError
from musicgpt.vocab import NOTE_OFF

FORMATS = (".png", ".svg", ".html")
# Qualitative palette that stays distinct on a dark background; more heads cycle through it.
HEAD_COLOURS = ("#ff6b6b", "#4dd4c6", "#ffd166", "#a78bfa", "#5fa8ff", "#ff8fd0",
                "#8fe388", "#ffa25f", "#d0d4ff", "#e6e07a", "#6fe3ff", "#ff9fa8")
THEME = dict(bg="#0e1117", panel="#121722", grid="#232b3a", text="#e6e9ef", muted="#8b93a7",
             note_lo="#2c3a55", note_hi="#b9c7e3", future_lo="#1b2231", future_hi="#2f3a50",
             query="#ffffff")


@dataclass(frozen=True)
class Arc:
    """One arc: note `query` attends to the earlier note `key` with `weight` in `head`."""

    query: int
    key: int
    head: int
    weight: float


@dataclass
class Excerpt:
    """What the model saw of a piece and how it attended: tokens, their notes, weights [L, H, T, T]."""

    name: str
    tokens: np.ndarray
    notes: DecodedNotes
    attentions: np.ndarray
    checkpoint: str = ""

    @property
    def n_layer(self) -> int:
        return self.attentions.shape[0]

    @property
    def n_head(self) -> int:
        return self.attentions.shape[1]


def head_colour(head: int) -> str:
    return HEAD_COLOURS[head % len(HEAD_COLOURS)]


def parse_heads(text: str | None) -> list[int] | None:
    """'0,3' -> [0, 3]; None or 'all' -> None (every head)."""
    if text is None or text.strip().lower() == "all":
        return None
    try:
        heads = sorted({int(h) for h in text.split(",") if h.strip()})
    except ValueError:
        raise MusicGPTError(f"--heads {text!r}: expected comma-separated head numbers such as 0,3") from None
    if not heads:
        raise MusicGPTError(f"--heads {text!r}: name at least one head")
    return heads


def check_options(out: Path, *, grid: bool = False, top_k: int = 5, threshold: float = 0.0,
                  max_tokens: int | None = None) -> None:
    """Reject option values that are wrong whatever the model, before anything is loaded."""
    if out.suffix.lower() not in FORMATS:
        raise MusicGPTError(f"{out}: output must end in .png, .svg or .html")
    if grid and out.suffix.lower() == ".html":
        raise MusicGPTError(f"{out}: --grid draws a static image; use .png or .svg")
    if top_k < 1:
        raise MusicGPTError(f"--top-k must be at least 1, got {top_k}")
    if not 0.0 <= threshold <= 1.0:
        raise MusicGPTError(f"--threshold must be between 0 and 1, got {threshold}")
    if max_tokens is not None and max_tokens < 2:
        raise MusicGPTError(f"--max-tokens must be at least 2, got {max_tokens}")
    check_output_file(out)


def check_model_options(config, layer: int, heads: list[int] | None, max_tokens: int | None) -> int:
    """Check layer/heads/excerpt length against the model; return the layer as a 0-based index."""
    L, H = config.n_layer, config.n_head
    if not -L <= layer < L:
        raise MusicGPTError(f"--layer {layer} is out of range: this model has layers 0..{L - 1} (or -{L}..-1)")
    bad = [h for h in heads or [] if not 0 <= h < H]
    if bad:
        raise MusicGPTError(f"--heads {bad[0]} is out of range: this model has heads 0..{H - 1}")
    if config.attention == "absolute" and max_tokens and max_tokens > config.context_len:
        raise MusicGPTError(f"--max-tokens {max_tokens} exceeds this absolute-attention model's context "
                            f"of {config.context_len}")
    return layer % L


@torch.no_grad()
def load_excerpt(midi, model, codec_config, max_tokens: int | None = None, checkpoint: str = "") -> Excerpt:
    """Encode a MIDI file, keep EOS + its first tokens, and record every layer's attention in one pass."""
    from musicgpt import codec

    max_tokens = max_tokens or min(model.config.context_len, 512)
    body = codec.encode(midi, codec_config)
    tokens = np.concatenate([[codec_config.eos_id], body])[:max_tokens].astype(np.int64)
    notes = codec.decode_notes(tokens, codec_config)
    name = Path(midi).name if isinstance(midi, (str, os.PathLike)) else "piece"
    if len(notes.pitch) == 0:
        raise MusicGPTError(f"{name}: no notes in the first {max_tokens} tokens")
    device = next(model.parameters()).device
    idx = torch.from_numpy(tokens)[None].to(device)
    _, attentions = model.eval().forward_with_attention(idx)
    stacked = torch.stack([a[0] for a in attentions]).float().cpu().numpy()  # [L, H, T, T]
    return Excerpt(name, tokens, notes, stacked, checkpoint)


def _positions(notes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.asarray(notes.on_index, dtype=np.int64), np.asarray(notes.off_index, dtype=np.int64),
            np.asarray(notes.velocity_index, dtype=np.int64))


def note_weights(weights: np.ndarray, notes, tokens: np.ndarray) -> np.ndarray:
    """[N, N] note-to-note weights from one head's [T, T] token weights (rule in the module docstring).

    Row q holds what note q attends to; entry [q, k] is zero unless k's NOTE_ON precedes q's.
    """
    on, off, vel = _positions(notes)
    rows = np.asarray(weights, dtype=np.float64)[on]  # [N, T]: each query note's NOTE_ON row
    before = on[None, :] < on[:, None]                # [q, k]: the causal arcs
    w = np.where(before, rows[:, on], 0.0)
    # A note ended by re-striking its key has no NOTE_OFF: that NOTE_ON's weight is the new note's.
    ended_by_off = (off >= 0) & (np.asarray(tokens)[np.maximum(off, 0)] >= NOTE_OFF)
    off_ok = before & ended_by_off[None, :] & (off[None, :] < on[:, None])
    w += np.where(off_ok, rows[:, np.maximum(off, 0)], 0.0)
    has_vel = vel >= 0
    if has_vel.any():
        same = (vel[:, None] == vel[None, :]) & has_vel[:, None]      # [k, j]: share a VELOCITY token
        begun = (on[:, None] <= on[None, :]).astype(np.float64)       # [j, q]: j began by query q
        share = np.maximum(same.astype(np.float64) @ begun, 1.0).T    # [q, k]: n(vel_k, q)
        w += np.where(before & has_vel[None, :], rows[:, np.maximum(vel, 0)] / share, 0.0)
    return w


def top_arcs(row: np.ndarray, query: int, head: int, top_k: int, threshold: float) -> list[Arc]:
    """The `top_k` heaviest keys of one query's note-weight row with weight >= threshold."""
    order = np.argsort(-row, kind="stable")[:top_k]
    return [Arc(query, int(k), head, float(row[k])) for k in order if row[k] > 0 and row[k] >= threshold]


def query_arcs(excerpt: Excerpt, query: int, layer: int, heads: list[int] | None = None,
               top_k: int = 5, threshold: float = 0.02) -> list[Arc]:
    """The arcs drawn for note `query` in `layer`: per head, its top-k earlier notes above threshold."""
    arcs = []
    for h in heads if heads is not None else range(excerpt.n_head):
        row = note_weights(excerpt.attentions[layer, h], excerpt.notes, excerpt.tokens)[query]
        arcs += top_arcs(row, query, h, top_k, threshold)
    return arcs


def choose_query(excerpt: Excerpt, query_note: int | None = None, query_time: float | None = None) -> int:
    """The query note: by index, else the note starting nearest a time, else one late in the excerpt."""
    start = np.asarray(excerpt.notes.start)
    n = len(start)
    if query_note is not None:
        if not -n <= query_note < n:
            raise MusicGPTError(f"--query-note {query_note} is out of range: the excerpt has notes 0..{n - 1}")
        return query_note % n
    if query_time is not None:
        end = float(np.max(excerpt.notes.end))
        if not 0 <= query_time <= end:
            raise MusicGPTError(f"--query-time {query_time:g} is outside the excerpt (0 to {end:.2f} s); "
                                f"raise --max-tokens to see further")
        return int(np.argmin(np.abs(start - query_time)))
    return int(round(0.8 * (n - 1)))  # late, so it has a past to look at, yet leaves some future in view


def note_label(excerpt: Excerpt, i: int) -> str:
    import pretty_midi

    n = excerpt.notes
    return f"{pretty_midi.note_number_to_name(int(n.pitch[i]))} (note {i}) at {float(n.start[i]):.2f} s"


# ----------------------------------------------------------------------------- static pictures

def _style_axes(ax) -> None:
    ax.set_facecolor(THEME["panel"])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.spines["bottom"].set_color(THEME["grid"])
    ax.tick_params(colors=THEME["muted"], labelsize=8, length=0)
    ax.xaxis.label.set_color(THEME["muted"])
    ax.yaxis.label.set_color(THEME["muted"])


def _arc_path(x0: float, y0: float, x1: float, y1: float, lift: float):
    """A cubic Bezier from (x0, y0) up and over to (x1, y1)."""
    from matplotlib.path import Path as MplPath

    top = max(y0, y1) + lift
    dx = x1 - x0
    verts = [(x0, y0), (x0 + 0.12 * dx, top), (x1 - 0.12 * dx, top), (x1, y1)]
    return MplPath(verts, [MplPath.MOVETO, MplPath.CURVE4, MplPath.CURVE4, MplPath.CURVE4])


def _arc_style(weight: float) -> tuple[float, float]:
    """Line width and opacity grow with sqrt(weight), so weak arcs stay visible but quiet."""
    s = float(np.sqrt(max(weight, 0.0)))
    return 0.8 + 5.2 * s, min(1.0, 0.6 + 0.4 * s)


def draw_arcs(excerpt: Excerpt, query: int, layer: int, heads: list[int] | None, arcs: list[Arc],
              top_k: int = 5, threshold: float = 0.02):
    """A figure (12 x 5 in, 150 dpi): piano roll, highlighted query note, one arc per (head, key)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import PathPatch, Rectangle

    from musicgpt.plot import draw_piano_roll, label_pitch_axis

    n, t = excerpt.notes, THEME
    pitch, start, end, vel = (np.asarray(a, dtype=float) for a in (n.pitch, n.start, n.end, n.velocity))
    on, _, _ = _positions(n)
    past = on <= on[query]
    fig, ax = plt.subplots(figsize=(12, 5), dpi=150, facecolor=t["bg"])
    fig.subplots_adjust(left=0.06, right=0.86, top=0.86, bottom=0.1)
    _style_axes(ax)
    for mask, lo, hi in ((past, "note_lo", "note_hi"), (~past, "future_lo", "future_hi")):
        if mask.any():
            cmap = LinearSegmentedColormap.from_list(lo, [t[lo], t[hi]])
            draw_piano_roll(ax, pitch[mask], start[mask], end[mask], vel[mask], cmap=cmap)
    x0, x1 = float(start.min()), float(end.max())
    y0, y1 = float(pitch.min()) - 2, float(pitch.max()) + 2
    span_x, span_y = max(x1 - x0, 1e-3), max(y1 - y0, 12.0)
    head_list = heads if heads is not None else list(range(excerpt.n_head))
    rank = {h: i / max(1, len(head_list) - 1) for i, h in enumerate(head_list)}

    def note_box(i: int, **style) -> Rectangle:  # the outline of note i, as draw_piano_roll draws it
        return Rectangle((start[i], pitch[i] - 0.4), max(end[i] - start[i], 1e-3), 0.8, **style)

    top = y1
    for a in sorted(arcs, key=lambda a: a.weight):  # strongest drawn last, on top
        xk, xq, colour = start[a.key], start[a.query], head_colour(a.head)
        # Taller arcs for longer spans; heads nudged apart so arcs to one key do not coincide.
        lift = span_y * (0.12 + 0.5 * (xq - xk) / span_x) * (1 + 0.25 * rank[a.head])
        lw, alpha = _arc_style(a.weight)
        path = _arc_path(xk, pitch[a.key], xq, pitch[a.query], lift)
        ax.add_patch(PathPatch(path, fill=False, lw=lw, alpha=alpha, ec=colour, capstyle="round", zorder=3))
        ax.add_patch(note_box(a.key, fill=False, ec=colour, lw=1.1, zorder=4))
        ax.scatter([xk], [pitch[a.key]], s=10 + 40 * np.sqrt(a.weight), color=colour, zorder=4, edgecolors="none")
        top = max(top, max(pitch[a.key], pitch[a.query]) + 0.75 * lift)
    # The query note: a halo of widening translucent outlines under a crisp white note.
    for lw, alpha in ((9, 0.06), (5, 0.12), (2.5, 0.25)):
        ax.add_patch(note_box(query, fill=False, ec=t["query"], lw=lw, alpha=alpha, joinstyle="round", zorder=5))
    ax.add_patch(note_box(query, fc=t["query"], ec=t["query"], lw=0.8, zorder=6))
    ax.axvline(start[query], color=t["query"], lw=0.6, alpha=0.25, ls=(0, (2, 3)), zorder=2)
    ax.set_xlim(x0 - 0.01 * span_x, x1 + 0.01 * span_x)
    ax.set_ylim(y0, top + 1)
    label_pitch_axis(ax, y0, y1, color=t["grid"])
    ax.set_xlabel("time (s)")
    ax.set_ylabel("")
    # Head colours, then a key to line width.
    handles = [Line2D([], [], color=head_colour(h), lw=3, label=f"head {h}") for h in head_list]
    handles.append(Line2D([], [], lw=0, label=" "))  # a gap before the width key
    handles += [Line2D([], [], color=t["text"], lw=_arc_style(w)[0], alpha=_arc_style(w)[1],
                       label=f"weight {w:g}") for w in (0.05, 0.25, 1.0)]
    leg = ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                    fontsize=8, labelcolor=t["text"], handlelength=2.2, borderaxespad=0)
    leg.set_zorder(7)
    heads_txt = "all heads" if heads is None else "heads " + ", ".join(map(str, heads))
    fig.text(0.06, 0.945, excerpt.name, color=t["text"], fontsize=14, fontweight="bold", va="center")
    fig.text(0.06, 0.9, f"layer {layer} (of 0–{excerpt.n_layer - 1})  ·  {heads_txt}  ·  up to {top_k} notes per "
             f"head with weight ≥ {threshold:g}  ·  query {note_label(excerpt, query)}", color=t["muted"],
             fontsize=9.5, va="center")
    if not arcs:
        ax.text(0.5, 0.97, f"no earlier note gets weight ≥ {threshold:g} here: try a lower --threshold",
                transform=ax.transAxes, ha="center", va="top", color=t["muted"], fontsize=9, style="italic")
    if excerpt.checkpoint:
        fig.text(0.86, 0.945, Path(excerpt.checkpoint).name, color=t["muted"], fontsize=8, ha="right",
                 va="center", alpha=0.8)
    return fig


def _max_pool(a: np.ndarray, f: int) -> np.ndarray:
    """Max over f x f blocks of the last two axes (zero-padded to a multiple of f)."""
    if f <= 1:
        return a
    T = a.shape[-1]
    pad = -T % f
    a = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, pad), (0, pad)])
    n = (T + pad) // f
    return a.reshape(*a.shape[:-2], n, f, n, f).max(axis=(-3, -1))


def draw_grid(excerpt: Excerpt):
    """A figure of every layer's and head's [T, T] weights as small heat maps (rows layers, columns heads)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    L, H, t = excerpt.n_layer, excerpt.n_head, THEME
    size = 1.55
    fig, axes = plt.subplots(L, H, figsize=(0.6 + size * H, 0.9 + size * L), dpi=150, facecolor=t["bg"],
                             squeeze=False)
    top = 1 - 0.75 / (0.9 + size * L)  # room for two lines of title
    fig.subplots_adjust(left=0.6 / (0.6 + size * H), right=0.99, bottom=0.02, top=top, wspace=0.08, hspace=0.08)
    # Panels are ~230 px wide: max-pool long excerpts so sharp, sparse attention does not average
    # away. Attention is heavy-tailed: a gamma and a shared top (99th percentile) show the faint
    # structure while keeping panels comparable.
    f = -(-excerpt.attentions.shape[-1] // 256)
    pooled = _max_pool(excerpt.attentions, f)
    future = np.triu(np.ones(pooled.shape[-2:], dtype=bool), 1)  # causal: never attended
    vmax = float(np.quantile(pooled[..., ~future], 0.99))
    norm = PowerNorm(0.5, vmin=0.0, vmax=max(vmax, 1e-6))
    cmap = plt.get_cmap("magma").with_extremes(bad=t["panel"])
    for layer in range(L):
        for h in range(H):
            ax = axes[layer, h]
            ax.imshow(np.ma.masked_array(pooled[layer, h], future), cmap=cmap, norm=norm, interpolation="antialiased")
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_color(head_colour(h))
                s.set_linewidth(1.2)
            if layer == 0:
                ax.set_title(f"head {h}", color=head_colour(h), fontsize=9, pad=4)
            if h == 0:
                ax.set_ylabel(f"layer {layer}", color=t["text"], fontsize=9)
    fig.text(0.5, top + 0.65 * (1 - top), excerpt.name, color=t["text"], fontsize=11, fontweight="bold", ha="center")
    fig.text(0.5, top + 0.35 * (1 - top), f"every layer and head over {len(excerpt.tokens)} tokens  ·  query down, "
             f"key across  ·  brightness grows with weight", color=t["muted"], fontsize=8, ha="center")
    return fig


# ----------------------------------------------------------------------------- interactive page

def html_data(excerpt: Excerpt, *, layer: int, heads: list[int] | None, query: int, top_k: int,
              threshold: float) -> dict:
    """The page's data: notes, and per layer, head and query note its heaviest keys as flat [key, w, ...].

    At least 8 keys are kept (the page's top-k slider starts at `top_k`), and none under 0.001.
    """
    n, keep = excerpt.notes, max(top_k, 8)
    r3 = lambda a: [round(float(x), 3) for x in a]  # noqa: E731 - ms precision is plenty for pixels
    arcs = []
    for at_layer in excerpt.attentions:
        per_head = []
        for h in range(excerpt.n_head):
            w = note_weights(at_layer[h], n, excerpt.tokens)
            per_head.append([[v for a in top_arcs(w[q], q, h, keep, 0.001) for v in (a.key, round(a.weight, 3))]
                             for q in range(len(w))])
        arcs.append(per_head)
    return {
        "piece": excerpt.name, "checkpoint": Path(excerpt.checkpoint).name if excerpt.checkpoint else "",
        "layers": excerpt.n_layer, "heads": excerpt.n_head, "tokens": len(excerpt.tokens),
        "colours": [head_colour(h) for h in range(excerpt.n_head)],
        "initial": {"layer": layer, "heads": heads if heads is not None else list(range(excerpt.n_head)),
                    "query": query, "threshold": threshold, "top_k": top_k},
        "notes": {"pitch": [int(p) for p in n.pitch], "start": r3(n.start), "end": r3(n.end),
                  "velocity": [int(v) for v in n.velocity]},
        "arcs": arcs,
    }


def write_html(data: dict, out: Path) -> Path:
    """Fill the page template with the data (inline JSON; the page loads nothing from anywhere)."""
    template = (Path(__file__).parent / "templates" / "attention.html").read_text()
    page = template.replace("__TITLE__", html.escape(data["piece"])).replace("/*__DATA__*/{}", script_json(data))
    with atomic_write(out, "w") as f:
        f.write(page)
    return out


# Inside <script>, "</script>" ends the element and "<!--" can swallow the page's own script: JSON
# spells these characters as \u escapes, which the script reads back as the same string.
_SCRIPT_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026",
                   0x2028: "\\u2028", 0x2029: "\\u2029"}


def script_json(data) -> str:
    """JSON that can stand inside an HTML <script> element whatever strings it holds."""
    return json.dumps(data, separators=(",", ":")).translate(_SCRIPT_ESCAPES)


# ----------------------------------------------------------------------------- one call for the CLI

@dataclass
class Rendered:
    """What `render_attention` wrote and drew."""

    path: Path
    layer: int
    query: int
    arcs: list[Arc]
    excerpt: Excerpt
    message: str = ""  # which checkpoint was chosen and why, when the user did not name one


def render_attention(midi, out, *, checkpoint=None, layer: int = -1, heads: list[int] | None = None,
                     query_note: int | None = None, query_time: float | None = None, top_k: int = 5,
                     threshold: float = 0.02, max_tokens: int | None = None, grid: bool = False,
                     device: str = "auto") -> Rendered:
    """Run the model once over a MIDI file and write the arcs (PNG/SVG/HTML) or the --grid overview."""
    from musicgpt.checkpoint import choose_checkpoint, load_model, peek_model_config
    from musicgpt.codec import load_midi
    from musicgpt.devices import pick_device
    from musicgpt.plot import save_figure

    out = Path(out)
    check_options(out, grid=grid, top_k=top_k, threshold=threshold, max_tokens=max_tokens)
    load_midi(midi)  # a bad input fails here, before any weights are read
    path, why = choose_checkpoint(checkpoint)
    device = pick_device(device)
    header = peek_model_config(path)
    if header is not None:  # bad --layer/--heads fail before the weights load
        check_model_options(header, layer, heads, max_tokens)
    model, ckpt = load_model(path, device)
    layer = check_model_options(ckpt.model_config, layer, heads, max_tokens)
    excerpt = load_excerpt(midi, model, ckpt.codec_config, max_tokens, checkpoint=str(path))
    query = choose_query(excerpt, query_note, query_time)
    arcs = query_arcs(excerpt, query, layer, heads, top_k, threshold)
    if grid:
        save_figure(draw_grid(excerpt), out, tight=False)
    elif out.suffix.lower() == ".html":
        write_html(html_data(excerpt, layer=layer, heads=heads, query=query, top_k=top_k,
                             threshold=threshold), out)
    else:
        save_figure(draw_arcs(excerpt, query, layer, heads, arcs, top_k, threshold), out, tight=False)
    return Rendered(out, layer, query, arcs, excerpt, why)
