"""The page: drop zone and gallery, controls, Run/Stop, live preview and progress, 3D result.

`build_app()` returns the Blocks together with what launching and closing them needs (CSS,
allowed paths, the sessions), so app.py and the tests serve the same app.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import gradio as gr
from gradio.utils import get_upload_folder

from pipeline.config import PRESETS, FieldSpec, preset
from pipeline.limits import DEFAULT_LIMITS, InputLimits
from pipeline.weights import TABLE_HEADERS

from .devices import DevicePool
from .handlers import CAMERA_SOURCE_LABELS, RUN_OUTPUTS, VIEWS, Handlers
from .report import PER_VIEW_HEADERS, STAGES_CSS, STAGE_TITLES, RunReport
from .session import Sessions
from .settings import advanced_fields, api_name, camera_source_field, label
from .uploads import CAMERA_FILE_HELP

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets"
# Uploaded files older than this are removed (results are written per run, so a session that
# stays open for hours keeps only what it can still download): (how often, how old), seconds.
DELETE_CACHE = (1800, 3 * 3600)
MAX_QUEUE = 16  # waiting jobs beyond this get gradio's "busy, try again" message
# How often gradio pings each page; a closed tab is noticed within this, and only then are its
# job stopped and its folder removed. Gradio's default, 15 s, kept a closed tab's job running that long.
HEARTBEAT_S = 1.0
# Keeps the log box on its newest line. Gradio 6.31's Textbox `autoscroll` follows only the user's
# typing, not values sent by the server; this runs in the page on each change of the log's value
# (after the box shows it), unless the reader has scrolled up.
FOLLOW_LOG_JS = """() => { requestAnimationFrame(() => {
  const box = document.querySelector('#log textarea');
  if (box && (box.dataset.followed === undefined || box.scrollTop + box.clientHeight >= box.dataset.followed - 4))
    box.scrollTop = box.scrollHeight;
  if (box) box.dataset.followed = box.scrollHeight;
}); }"""

INTRO = f"""# Photos to 3D
Drop photos of one object taken from all around it (at least 3; 20-60 work best), with object masks
(PNG alpha, or mask files named `<photo>_mask.png`) and a camera file ({CAMERA_FILE_HELP}) if you
have them, or one .zip of such a capture folder. Without masks or cameras they are estimated from
the photos (walk all the way round: the object is what every photo looks at, so a busy background
works; with turntable photos, choose the turntable camera source).
Then press **Run**: the preview shows the current render beside the photo, the bare surface grey and
lit, and a turntable view of it.
Or click an example below.
"""


@dataclass
class App:
    """The page and what serving it needs."""

    blocks: gr.Blocks
    sessions: Sessions
    limits: InputLimits

    def launch(self, **kwargs):
        """`Blocks.launch` with the app's CSS, allowed paths and upload limit; returns its result."""
        # Gradio refuses any file above this before it is stored: a .zip may hold the whole upload.
        return self.blocks.launch(allowed_paths=[str(ASSETS)], css=STAGES_CSS,
                                  max_file_size=self.limits.max_total_bytes, **kwargs)

    def close(self) -> None:
        """Stop the server and every run, and remove the session folders."""
        self.blocks.close()
        self.sessions.close_all()


def examples(quality: str) -> List[list]:
    """Example rows [files, camera source, preset] for the captures in assets/."""
    rows = []
    for folder in sorted(p for p in ASSETS.iterdir() if p.is_dir()) if ASSETS.is_dir() else []:
        files = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.name not in ("README.md", "LICENSE.md"))
        if files:
            rows.append([files, camera_source_field().default, quality])
    return rows


def build_app(limits: InputLimits = DEFAULT_LIMITS) -> App:
    os.environ.setdefault("GRADIO_HEARTBEAT_INTERVAL", str(HEARTBEAT_S))  # gradio reads it per connection
    devices = DevicePool.detect()
    initial_preset = "balanced" if devices.on_gpu else "fast"  # fast takes minutes on a CPU
    sessions = Sessions(Path(get_upload_folder()))
    handlers = Handlers(sessions, devices, initial_preset, limits)
    initial = preset(initial_preset)

    with gr.Blocks(title="Photos to 3D", delete_cache=DELETE_CACHE) as demo:
        opened_in_browser = gr.State(False)
        gr.Markdown(INTRO)
        # Created before the examples, which fill them in, and shown further down.
        source = camera_source_field()
        camera_source = gr.Dropdown([(CAMERA_SOURCE_LABELS.get(c, c), c) for c in source.choices], value=source.default,
                                    label="Camera source", info=source.help, render=False)
        quality = gr.Dropdown(list(PRESETS), value=initial_preset, label="Quality preset",
                              info="Sets the Advanced values", render=False)
        with gr.Row():
            with gr.Column(scale=1):
                # No file_types filter: gradio would refuse other files with a message that does not
                # name them; the handlers leave them out with a notice that does.
                files = gr.File(label="Photos, masks, camera file, or one .zip", file_count="multiple",
                                height=160, elem_id="uploads")
                example_rows = examples(initial_preset)
                if example_rows:
                    gr.Examples(example_rows, inputs=[files, camera_source, quality],
                                label="Examples: click one, then Run",
                                example_labels=[_example_label(row[0]) for row in example_rows])
                upload_summary = gr.Markdown(elem_id="upload-summary")
                gallery = gr.Gallery(label="Photos (object mask shown once known)", format="png", columns=6,
                                     height=220, object_fit="contain", elem_id="gallery")
                with gr.Row():
                    camera_source.render()
                    quality.render()
                    seed = gr.Number(value=initial.refine.seed, precision=0, label="Seed", minimum=0)
                with gr.Row():
                    run_button = gr.Button("Run", variant="primary", elem_id="run")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                    advanced = _advanced_controls(advanced_fields(initial))
                with gr.Accordion("Models", open=False):
                    gr.Markdown("Optional learned models (`python -m pipeline weights` shows the same table).")
                    models = gr.Dataframe(headers=list(TABLE_HEADERS), interactive=False, wrap=True)
            with gr.Column(scale=1):
                preview = gr.Image(label="Live preview: render | photo | surface | turntable", format="png",
                                   interactive=False, height=200, elem_id="preview")
                stages = gr.HTML(RunReport().stages_html(), css_template=STAGES_CSS, js_on_load=None,
                                 elem_id="stages")
                run_log = gr.Textbox(label="Log", lines=5, max_lines=5, interactive=False, elem_id="log")
                model = gr.Model3D(label="Result", height=380, clear_color=(0.95, 0.95, 0.95, 1.0),
                                   elem_id="model")
                # Shaded: the shape alone, in grey, lit by the viewer; wireframe: its triangles.
                view = gr.Radio(list(VIEWS), value="Textured", label="View", show_label=False, container=False,
                                elem_id="view")
                with gr.Row():
                    glb = gr.DownloadButton("Download GLB", size="md", elem_id="download-glb")
                    obj_zip = gr.DownloadButton("Download OBJ (zip)", size="md", elem_id="download-obj")
                per_view = gr.Dataframe(headers=PER_VIEW_HEADERS, label="Per-view fit", interactive=False,
                                        max_height=240, elem_id="per-view")
                metrics = gr.JSON(label="Metrics and timings", elem_id="metrics")

        outputs = dict(preview=preview, stages=stages, log=run_log, gallery=gallery, glb=glb, obj_zip=obj_zip,
                       per_view=per_view, metrics=metrics)
        demo.load(handlers.page_opened, outputs=opened_in_browser, api_visibility="private")
        demo.load(handlers.models_table, outputs=models, api_visibility="private")
        files.change(handlers.show_uploads, inputs=files, outputs=[gallery, upload_summary],
                     api_visibility="private")
        quality.change(handlers.apply_preset, inputs=quality, outputs=list(advanced.values()),
                       api_visibility="private")
        run_event = run_button.click(
            handlers.reconstruct,
            inputs=[files, camera_source, quality, seed, opened_in_browser],
            inputs_kwargs=advanced,
            outputs=[outputs[name] for name in RUN_OUTPUTS],
            api_name="reconstruct",
            api_description="Photos (+ masks + camera file, or one .zip) -> textured GLB, streaming previews.",
            concurrency_limit=devices.size,
            concurrency_id="gpu",
            # The stage table shows the progress; gradio's own status would mark every output
            # "Error" after an input error (the message is in the toast and the log), or after a
            # Stop that races with the job's last update.
            show_progress="hidden",
            validator=handlers.check_request,
        )
        # The viewer gets the GLB in an event of its own: gradio 6.31's Model3D never draws a model
        # that arrives in a later message of a streaming event (its viewer import gets cancelled).
        # Emptied first, as for every change of view (see Handlers.show_model).
        for trigger in (run_event.success, view.change):
            trigger(handlers.clear_viewer, outputs=model, queue=False, show_progress="hidden",
                    api_visibility="private").then(
                handlers.show_model, inputs=view, outputs=model, queue=False, show_progress="hidden",
                api_visibility="private")
        run_log.change(None, js=FOLLOW_LOG_JS, queue=False, show_progress="hidden", api_visibility="private")
        # Also after a cancel: the page runs a Run event's `then` once gradio has cancelled it, and
        # only from then on does the Run button take a click ("stopped" in the log says when).
        run_event.then(handlers.run_ended, outputs=[stages, run_log], queue=False, api_visibility="private")
        stop_button.click(handlers.stop, outputs=[stages, run_log], cancels=[run_event], queue=False,
                          api_visibility="private")
        demo.unload(handlers.end_session)

    demo.queue(max_size=MAX_QUEUE)
    return App(demo, sessions, limits)


def _advanced_controls(specs: List[FieldSpec]) -> Dict[str, gr.components.Component]:
    """One control per config field, grouped by stage: {API parameter name: component}."""
    controls: Dict[str, gr.components.Component] = {}
    for stage in STAGE_TITLES:
        with gr.Group():
            gr.Markdown(f"**{STAGE_TITLES[stage]}**", padding=True)
            for spec in (s for s in specs if s.key.startswith(stage + ".")):
                controls[api_name(spec.key)] = _control(spec)
    return controls


def _control(spec: FieldSpec) -> gr.components.Component:
    if spec.choices is not None:
        return gr.Dropdown(list(spec.choices), value=spec.default, label=label(spec.key), info=spec.help)
    if spec.type is bool:
        return gr.Checkbox(value=spec.default, label=label(spec.key), info=spec.help)
    low, high = spec.range
    return gr.Slider(low, high, value=spec.default, step=spec.step, label=label(spec.key), info=spec.help)


def _example_label(files: List[str]) -> str:
    folder = Path(files[0]).relative_to(ASSETS).parts[0]
    readme = ASSETS / folder / "README.md"
    title = readme.read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip() if readme.is_file() else folder
    return title


