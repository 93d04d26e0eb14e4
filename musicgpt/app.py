"""`musicgpt app`: compose in the browser. The gradio page only; the work is `musicgpt.studio`'s.

Nothing is fetched from the internet: analytics are off, the theme uses the system's fonts, and
audio is rendered on this machine. Generations run one at a time (gradio's queue), each in its
own folder under a temporary root that is removed at exit.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import tempfile
import traceback
from pathlib import Path

from musicgpt import studio
from musicgpt.errors import MusicGPTError
from musicgpt.sampling import TOP_P_SCOPES

SILENCE = "(silence)"
UPLOADED = "(the file dropped above)"
CACHE_SECONDS = 3600  # gradio's copies of files older than this are deleted, checked this often


def import_gradio():
    """gradio with analytics off, or a one-line error saying how to install it."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported
    try:
        import gradio as gr
    except ImportError:
        raise MusicGPTError("the app needs gradio: pip install 'musicgpt[app]'") from None
    return gr


def one_line_errors(fn):
    """Show a failure as one line on the page (gr.Error), never a stack trace; log unexpected ones here."""
    import gradio as gr

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MusicGPTError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as e:  # a bug of ours: the page gets one line, the terminal the traceback
            traceback.print_exc(file=sys.stderr)
            raise gr.Error(f"unexpected error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                           print_exception=False) from None
    return wrapper


def theme():
    """The default look with the system's fonts (gradio's own would be downloaded by some themes)."""
    gr = import_gradio()
    return gr.themes.Default(font=("system-ui", "sans-serif"), font_mono=("ui-monospace", "monospace"))


class Studio:
    """The page's state that is the same for every user: the models offered and the temporary root."""

    def __init__(self, checkpoint: str | None = None, runs_dir: str | Path = "runs"):
        self.runs_dir = runs_dir
        self.models = studio.list_models(runs_dir, checkpoint)
        self.primers = studio.shipped_primers()
        self.root = Path(tempfile.mkdtemp(prefix="musicgpt-app-"))
        atexit.register(studio.remove_folder, self.root)

    def workdir(self) -> Path:
        return studio.new_workdir(self.root)

    def primer(self, upload: str | None, choice: str, keep: float | None) -> tuple:
        """The primer picked (the dropped file wins over the list), its piano roll, a status line."""
        source = upload if upload and choice == UPLOADED else self.primers.get(choice)
        if upload and choice == SILENCE:
            source = None
        p = studio.prepare_primer(source, keep or None, self.workdir())
        if p.midi is None:
            return None, None, "Starting from silence."
        return str(p.midi), str(p.picture), f"Primer: {p.seconds:.1f} s kept of {p.source_seconds:.1f} s."

    def settings(self, values: dict) -> studio.Settings:
        """Settings from the knobs' values, keyed by Settings field; the model label mapped to its checkpoint."""
        values = dict(values)
        values["checkpoint"] = self.models[values["checkpoint"]]
        values["seed"] = None if values["seed"] is None or values["seed"] < 0 else int(values["seed"])
        values["variations"] = int(values["variations"])
        return studio.Settings(**values)

    def results(self, variations: list[studio.Variation], what: str) -> list:
        """The results state, the status line, then each slot's visibility, picture, audio, files, attention."""
        gr = import_gradio()
        out: list = [[str(v.midi) for v in variations]]
        seeds = sorted({v.seed for v in variations})
        notes = {v.note for v in variations if v.note}
        out.append(f"{what}: {len(variations)} variation(s), seed {', '.join(map(str, seeds))}. "
                   + ("The red dashed line marks where the primer ends. " if any(v.boundary for v in variations)
                      else "") + " ".join(notes))
        for k in range(studio.MAX_VARIATIONS):
            v = variations[k] if k < len(variations) else None
            out += [gr.Group(visible=v is not None), str(v.picture) if v else None,
                    str(v.wav) if v and v.wav else None,
                    [str(v.midi)] + ([str(v.wav)] if v.wav else []) if v else None, None]
        return out


def knob_components(gr, app: Studio) -> dict:
    """The generation knobs, keyed by studio.Settings field."""
    d = studio.Settings()
    first = next(iter(app.models))
    styles = [("none", ""), *studio.model_styles(app.models[first])]
    k = {"checkpoint": gr.Dropdown(list(app.models), value=first, label="model"),
         "style": gr.Dropdown(styles, value="", label="style"),
         "seconds": gr.Slider(1, 120, value=d.seconds, step=1, label="length to generate (s)"),
         "variations": gr.Slider(1, studio.MAX_VARIATIONS, value=1, step=1, label="variations"),
         "method": gr.Radio(list(studio.METHODS), value=d.method, label="decoding")}
    with gr.Accordion("decoding knobs and musical limits", open=False):
        with gr.Row():
            k["temperature"] = gr.Slider(0.1, 2.0, value=d.temperature, step=0.05, label="temperature")
            k["top_k"] = gr.Number(value=d.top_k, precision=0, minimum=0, label="top-k (0: off)")
            k["top_p"] = gr.Slider(0.05, 1.0, value=d.top_p, step=0.01, label="top-p (1: off)")
        with gr.Row():
            k["typical_p"] = gr.Slider(0.05, 1.0, value=d.typical_p, step=0.01, label="typical-p (1: off)")
            k["min_p"] = gr.Slider(0.0, 0.5, value=d.min_p, step=0.01, label="min-p (0: off)")
            k["num_beams"] = gr.Slider(2, 8, value=d.num_beams, step=1, label="beams (beam search)")
            k["top_p_scope"] = gr.Dropdown(list(TOP_P_SCOPES), value=d.top_p_scope, label="top-p ranks by")
        with gr.Row():
            k["max_pause"] = gr.Number(value=d.max_pause, minimum=0, label="max pause (s, 0: no limit)")
            k["max_note"] = gr.Number(value=d.max_note, minimum=0, label="max note (s, 0: no limit)")
            k["seed"] = gr.Number(value=-1, precision=0, label="seed (-1: a new one)")
    return k


def result_slot(gr, k: int) -> dict:
    """One variation's place on the page, hidden until there is one."""
    with gr.Group(visible=False) as group:
        s = {"group": group, "picture": gr.Image(label=f"variation {k + 1}", type="filepath", interactive=False),
             "audio": gr.Audio(label="listen", type="filepath", interactive=False, elem_id=f"audio-{k}"),
             "files": gr.File(label="download MIDI and WAV", file_count="multiple", interactive=False,
                              elem_id=f"files-{k}")}
        with gr.Row():
            s["continue"] = gr.Button("Continue this", size="sm")
            s["start"] = gr.Number(value=2, minimum=0, label="infill from (s)")
            s["end"] = gr.Number(value=4, minimum=0, label="to (s)")
            s["infill"] = gr.Button("Infill", size="sm")
            s["attention"] = gr.Button("Attention arcs", size="sm")
        s["arcs"] = gr.File(label="attention arcs (interactive page: open it in the browser)", interactive=False,
                            elem_id=f"arcs-{k}")
    return s


def build(app: Studio):
    """The page: primer on the left, knobs on the right, the variations below."""
    gr = import_gradio()
    with gr.Blocks(title="musicgpt", analytics_enabled=False, delete_cache=(CACHE_SECONDS, CACHE_SECONDS)) as demo:
        gr.Markdown("## musicgpt: compose piano music\nChoose a primer, press **Generate**, listen; then continue "
                    "a result, infill part of it, or look at its attention arcs.")
        primer, results = gr.State(None), gr.State([])
        tracker = gr.Progress(track_tqdm=True)  # gradio's bar follows the sampler's tqdm bar
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="drop a MIDI primer", file_types=[".mid", ".midi"], type="filepath")
                choice = gr.Dropdown([SILENCE, UPLOADED, *app.primers], value=SILENCE, label="primer")
                keep = gr.Number(value=10, minimum=0, label="keep the primer's first seconds (0: all)")
                roll = gr.Image(label="primer", type="filepath", interactive=False)
            with gr.Column():
                knobs = knob_components(gr, app)
                generate = gr.Button("Generate", variant="primary")
        status = gr.Markdown("Starting from silence.", elem_id="status")
        slots = [result_slot(gr, k) for k in range(studio.MAX_VARIATIONS)]
        shown = [results, status] + [s[n] for s in slots for n in ("group", "picture", "audio", "files", "arcs")]
        wire_primer(gr, app, upload, choice, keep, primer, roll, status)
        knobs["checkpoint"].change(one_line_errors(lambda label: gr.Dropdown(
            choices=[("none", ""), *studio.model_styles(app.models[label])], value="")), knobs["checkpoint"],
            knobs["style"])

        @one_line_errors
        def on_generate(data: dict, progress=tracker):
            p = studio.Primer(Path(data[primer]) if data[primer] else None)
            return app.results(studio.generate(p, app.settings({n: data[c] for n, c in knobs.items()}),
                                               app.workdir(), runs_dir=app.runs_dir, progress=True), "Generated")

        generate.click(on_generate, {primer, *knobs.values()}, shown)
        for k, slot in enumerate(slots):
            wire_slot(gr, app, k, slot, knobs, results, primer, roll, status, shown)
    return demo


def wire_primer(gr, app: Studio, upload, choice, keep, primer, roll, status) -> None:
    """Dropping a file, picking a piece or changing the seconds kept redraws the primer."""
    @one_line_errors
    def on_upload(path, keep_seconds):
        return (UPLOADED if path else SILENCE, *app.primer(path, UPLOADED if path else SILENCE, keep_seconds))

    @one_line_errors
    def on_change(path, picked, keep_seconds):
        return app.primer(path, picked, keep_seconds)

    upload.change(on_upload, [upload, keep], [choice, primer, roll, status])
    choice.input(on_change, [upload, choice, keep], [primer, roll, status])
    keep.submit(on_change, [upload, choice, keep], [primer, roll, status])
    keep.blur(on_change, [upload, choice, keep], [primer, roll, status])


def wire_slot(gr, app: Studio, k: int, slot: dict, knobs: dict, results, primer, roll, status, shown) -> None:
    """Continue, Infill and Attention for variation `k`."""
    tracker = gr.Progress(track_tqdm=True)
    @one_line_errors
    def on_continue(paths):
        p = studio.continue_from(paths[k], app.workdir())
        return str(p.midi), str(p.picture), f"Primer: variation {k + 1}, all {p.seconds:.1f} s of it."

    @one_line_errors
    def on_infill(data: dict, progress=tracker):
        settings = app.settings({n: data[c] for n, c in knobs.items()})
        return app.results(studio.infill(data[results][k], data[slot["start"]], data[slot["end"]], settings,
                                         app.workdir(), runs_dir=app.runs_dir, progress=True), "Infilled")

    @one_line_errors
    def on_attention(paths, label):
        return str(studio.attention_page(paths[k], app.models[label], app.workdir()))

    slot["continue"].click(on_continue, results, [primer, roll, status])
    slot["infill"].click(on_infill, {results, slot["start"], slot["end"], *knobs.values()}, shown)
    slot["attention"].click(on_attention, [results, knobs["checkpoint"]], slot["arcs"])


def launch(*, host: str = "127.0.0.1", port: int | None = None, open_browser: bool = True,
           checkpoint: str | None = None, runs_dir: str | Path = "runs", prevent_thread_lock: bool = False):
    """Serve the page on host:port (one generation at a time) and open it in a browser unless told not to."""
    import_gradio()
    demo = build(Studio(checkpoint, runs_dir))
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, inbrowser=open_browser, theme=theme(),
                prevent_thread_lock=prevent_thread_lock, footer_links=["gradio"])
    return demo
