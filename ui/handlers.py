"""Event handlers: uploads in, pipeline events out as component updates, errors as messages.

The handlers know the outputs by name (`RUN_OUTPUTS`); `ui.layout` wires them to components.
Every problem the user can fix (a `PipelineError`) becomes a `gr.Error` naming the file and the
fix, in the page's words (`page_words`), and one line on the server console; anything else is
logged there with its traceback and reported in the page without one.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, List, Optional

import gradio as gr

from pipeline import weights
from pipeline.capture import Capture
from pipeline.errors import PipelineError
from pipeline.events import Preview, Result
from pipeline.importers import detect_format, load_capture
from pipeline.limits import InputLimits

from .devices import DevicePool, PipelineWorker, pipeline_runner
from .report import PER_VIEW_HEADERS, RunReport, gallery_items, per_view_rows
from .session import Run, Sessions
from .settings import build_config, page_words, preset_values
from .uploads import CAMERA_FILE_HELP, Uploads, check_uploads, sort_uploads

log = logging.getLogger("photo3d.app")

# Labels of the camera source choices (the values, their order and the help come from the config field).
CAMERA_SOURCE_LABELS = {"auto": "auto", "file": "camera file", "estimate": "estimate", "turntable": "turntable"}
# Outputs of the Run event, in order; `_updates` fills them by name. The 3D viewer is not one of
# them: it gets the GLB from a follow-up event (see ui.layout).
RUN_OUTPUTS = ("preview", "stages", "log", "gallery", "glb", "obj_zip", "per_view", "metrics")
# The result viewer's choices: which file of the result it shows, and how (Model3D's display_mode).
VIEWS = {"Textured": ("glb_path", "solid"), "Shaded": ("shaded_glb_path", "solid"),
         "Wireframe": ("shaded_glb_path", "wireframe")}
# How often a running job updates the page even when the pipeline is silent: the stage timers
# tick, and Stop (which gradio applies between two updates) takes effect within this time.
BEAT_S = 1.0
_FORMAT_NAMES = {
    "cameras.json": "cameras.json",
    "transforms": "transforms.json (NeRF / instant-ngp / nerfstudio)",
    "colmap": "COLMAP model",
    "llff": "poses_bounds.npy (LLFF)",
}


class Handlers:
    def __init__(self, sessions: Sessions, devices: DevicePool, initial_preset: str, limits: InputLimits):
        self.sessions = sessions
        self.devices = devices
        self.limits = limits
        self.initial_values = preset_values(initial_preset)
        self.run_pipeline = pipeline_runner()

    # ------------------------------------------------------------------ page
    @staticmethod
    def page_opened() -> bool:
        """Runs on page load only (never for API clients): marks the session as a browser one."""
        return True

    @staticmethod
    def models_table() -> List[list]:
        return weights.status_rows()

    @staticmethod
    def apply_preset(name: str) -> List[Any]:
        """The Advanced controls' values under preset ``name``, in `advanced_fields` order."""
        return list(preset_values(name).values())

    def end_session(self, request: gr.Request) -> None:
        self.sessions.close(request.session_hash)

    # --------------------------------------------------------------- uploads
    def show_uploads(self, files: Optional[List[str]], request: gr.Request):
        """(gallery, summary) for what was just dropped: the photos, and what was recognised."""
        if not files:
            return [], ""
        session = self.sessions.get(request.session_hash)
        try:
            uploads = sort_uploads(files, session.folder / "dropped", self.limits)
            kind = detect_format(uploads.source)
        except PipelineError as error:
            message = _tidy(error, None, files)
            gr.Warning(message)
            return [], f"⚠ {message}"
        for notice in uploads.notices:
            gr.Warning(notice)
        cameras = _FORMAT_NAMES.get(kind, "none found (add one: " + CAMERA_FILE_HELP + ")")
        lines = [f"**{len(uploads.photos)} photo(s)** · cameras: {cameras}"] + [f"⚠ {n}" for n in uploads.notices]
        return [(str(p), p.name) for p in uploads.photos], "\n\n".join(lines)

    # ------------------------------------------------------------------- run
    def check_request(self, files: Optional[List[str]], *others: Any, **settings: Any) -> list:
        """Gradio's validator of the Run event: runs when a job is submitted, before it queues, so a
        bad upload is answered at once (file sizes, first bytes, archive directory; nothing decoded).
        One verdict per input, the uploads' first."""
        try:
            check_uploads(files, self.limits)
            verdict = gr.validate(True, "")
        except PipelineError as error:
            verdict = gr.validate(False, _tidy(error, None, files))
        except OSError as error:  # an upload vanished or cannot be read: the run would say the same
            verdict = gr.validate(False, f"Cannot read the uploads ({error}). Upload them again.")
        return [verdict] + [gr.validate(True, "")] * (len(others) + len(settings))

    def reconstruct(self, files: Optional[List[str]], camera_source: Optional[str] = None, quality: str = "fast",
                    seed: float = 0, opened_in_browser: bool = False, request: gr.Request = None,
                    **settings: Any) -> Iterator[tuple]:
        """Stream a reconstruction: preview, stage progress, log, then the model and its metrics."""
        session = self.sessions.get(request.session_hash)
        previous = session.current
        run = session.new_run()
        report = run.report = RunReport()
        uploads: Optional[Uploads] = None
        last_preview = None
        try:
            config = build_config(quality, seed, settings, self.initial_values, controls_follow_preset=opened_in_browser,
                                  camera_source=camera_source)
            report.note(f"{len(files or [])} file(s), preset {quality}, camera source {config.cameras.source}")
            yield _updates(report, preview=None)
            if previous is not None and previous.active():
                previous.stop()
                report.note("waiting for the previous run to stop")
                while previous.active():
                    previous.join(BEAT_S)
                    yield _updates(report)

            uploads = sort_uploads(files, run.folder / "uploads", self.limits)
            for text in uploads.notices:
                _warn(report, text)
            report.note(f"reading {len(uploads.photos)} photo(s)")
            yield _updates(report)
            capture = load_capture(uploads.source, max_side=config.ingest.max_image_side, limits=self.limits)
            for text in capture.warnings:
                _warn(report, uploads.tidy(text))
            _check_cameras(config.cameras.source, capture)
            gallery = gallery_items(capture, run.folder / "gallery")
            yield _updates(report, gallery=gallery)

            worker = PipelineWorker(self.run_pipeline, self.devices, capture, config, run.folder,
                                    cancel=run.cancel.is_set, name=f"model-{run.number:03d}")
            run.pipeline = worker
            worker.start()
            del capture  # the worker frees it when the pipeline is done
            result = None
            for batch in worker.batches(BEAT_S):
                fresh = {}
                for event in batch:
                    if isinstance(event, Preview):
                        fresh["preview"] = last_preview = event.image
                    elif isinstance(event, Result):
                        result = event
                    warning = report.apply(event)
                    if warning is not None:
                        gr.Warning(uploads.tidy(warning))
                if run.cancel.is_set():  # Stop: return now; the next run waits for the pipeline to let go
                    report.stop("stopped")
                    yield _updates(report, **fresh)
                    return
                yield _updates(report, **fresh)
            if result is None:  # stopped before the end: the pipeline said so in a Warning
                report.stop("stopped")
                yield _updates(report)
                return
            session.result = result
            yield _updates(report, preview=last_preview, gallery=gallery, glb=result.glb_path, obj_zip=result.zip_path,
                           per_view={"headers": PER_VIEW_HEADERS, "data": per_view_rows(result)},
                           metrics=report.summary(result))
        # gradio prints a traceback for every gr.Error unless told not to: the console gets one
        # line per input problem, and a traceback only for real faults (log.exception).
        except PipelineError as error:
            message = _tidy(error, uploads, files)
            log.info("run %d refused: %s", run.number, message)
            yield _failed(report, message)
            raise gr.Error(message, title="Cannot reconstruct", print_exception=False) from None
        except MemoryError:
            log.info("run %d: out of memory", run.number)
            yield _failed(report, "out of memory")
            raise gr.Error(_OUT_OF_MEMORY, title="Out of memory", print_exception=False) from None
        except Exception as error:
            if _is_out_of_gpu_memory(error):
                log.info("run %d: out of GPU memory", run.number)
                yield _failed(report, "out of GPU memory")
                raise gr.Error(_OUT_OF_MEMORY, title="Out of GPU memory", print_exception=False) from None
            log.exception("run %d failed", run.number)
            yield _failed(report, f"{type(error).__name__}: {error}")
            raise gr.Error(f"The reconstruction failed: {type(error).__name__}: {error}. The server log has the "
                           "details; the app keeps running, so you can change the input or settings and run again.",
                           title="Internal error", print_exception=False) from None
        finally:
            # Also reached when the page's Stop or an API client's cancel closes this generator:
            # the pipeline polls the flag and frees its device within a step.
            run.cancel.set()

    @staticmethod
    def clear_viewer() -> None:
        """Empties the 3D viewer, the first half of every change of what it shows (`show_model`)."""
        return None

    def show_model(self, view: str, request: gr.Request):
        """The 3D viewer showing the session's latest result as ``view`` (one of `VIEWS`).

        Always after `clear_viewer`: gradio 6.31's viewer applies a display mode only when it loads
        a model, and going back to "solid" keeps the wireframe of the model it showed before;
        emptied first, it starts afresh."""
        session = self.sessions.peek(request.session_hash)
        result = session.result if session is not None else None
        if result is None:
            return gr.skip()
        attribute, display_mode = VIEWS.get(view, VIEWS["Textured"])
        return gr.update(value=getattr(result, attribute) or result.glb_path, display_mode=display_mode)

    def stop(self, request: gr.Request):
        """(stages, log) after asking the session's run to stop. Gradio cancels the Run event
        itself (`cancels=`); the page's Run button takes a click again once that is done, and
        `run_ended` then shows "stopped"."""
        run = self._current_run(request)
        if run is None or run.cancel.is_set():  # no run, or it is over
            return gr.skip(), gr.skip()
        run.stop()
        run.report.note("stopping")
        return run.report.stages_html(), run.report.log_text()

    def run_ended(self, request: gr.Request):
        """(stages, log) once the page is done with a Run event: finished, failed or cancelled."""
        run = self._current_run(request)
        if run is None:
            return gr.skip(), gr.skip()
        if run.cancel.is_set() and run.report.outcome is None:  # gradio cancelled the handler
            run.report.stop("stopped")
        return run.report.stages_html(), run.report.log_text()

    def _current_run(self, request: gr.Request) -> Optional[Run]:
        session = self.sessions.peek(request.session_hash)
        run: Optional[Run] = session.current if session is not None else None
        return run if run is not None and run.report is not None else None


_OUT_OF_MEMORY = ("Out of memory. Lower 'Max image side', 'Texture size', 'Mesh faces' or 'Render resolution' "
                  "in Advanced (or choose the fast preset) and run again.")


def _updates(report: RunReport, **values: Any) -> tuple:
    """One update of the Run outputs: stage table and log always, the rest only when given."""
    values.update(stages=report.stages_html(), log=report.log_text())
    return tuple(values[name] if name in values else gr.skip() for name in RUN_OUTPUTS)


def _failed(report: RunReport, message: str) -> tuple:
    """The last update of a failed run: the stage that was running is marked, the log says why."""
    report.stop(f"error: {message}")
    return _updates(report)


def _warn(report: RunReport, text: str) -> None:
    shown = report.notice(text)
    if shown is not None:
        gr.Warning(shown)


def _check_cameras(camera_source: str, capture: Capture) -> None:
    """Refuse what cannot work before a job takes the GPU, saying what to do instead."""
    if capture.cameras is None and camera_source == "file":
        raise PipelineError(f"No camera file among the uploads. Add one ({CAMERA_FILE_HELP}), or choose the "
                            "camera source 'auto' to estimate the cameras from the photos.")


def _tidy(error: Exception, uploads: Optional[Uploads], files: Optional[List[str]]) -> str:
    """The error's message in the page's words: the file names the user knows instead of temporary
    upload paths, the controls' labels instead of setting keys."""
    if uploads is None:
        uploads = Uploads(source=[], photos=[], shown_as={str(f): _name(f) for f in files or []})
    return page_words(uploads.tidy(str(error)))


def _name(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def _is_out_of_gpu_memory(error: Exception) -> bool:
    return type(error).__name__ == "OutOfMemoryError"  # torch.OutOfMemoryError, without importing torch here

