"""What the page shows about a run: stage progress, a compact log, metrics, the photo gallery.

Built only from the pipeline's events and the capture; no computation of its own beyond
formatting (the preview strip itself comes composed from the pipeline).
"""

from __future__ import annotations

import html
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

from pipeline.capture import Capture
from pipeline.config import STAGES
from pipeline.events import Event, Metrics, Progress, Result, StageFinished, StageStarted, Warning

from .settings import page_words

STAGE_TITLES = {"ingest": "Read photos", "cameras": "Cameras", "hull": "Visual hull", "refine": "Refine",
                "export": "Export"}
LOG_LINES = 200  # the log box shows the end; older lines only push the page's memory up
PER_VIEW_HEADERS = ["view", "PSNR (dB)", "mask IoU"]

STAGES_CSS = """
.photo3d-stages { display: grid; grid-template-columns: 7.5em 1fr; gap: 2px 10px; align-items: center; font-size: 0.9em; }
.photo3d-stages .bar { height: 0.7em; border-radius: 0.35em; background: var(--neutral-200, #e5e7eb); overflow: hidden; }
.photo3d-stages .fill { height: 100%; background: var(--color-accent, #f97316); transition: width 0.3s; }
.photo3d-stages .done .fill { background: var(--color-green-500, #22c55e); }
.photo3d-stages .stopped .fill { background: var(--neutral-400, #9ca3af); }
.photo3d-stages .failed .fill { background: var(--color-red-500, #ef4444); }
.photo3d-stages .detail { grid-column: 2; color: var(--body-text-color-subdued, #6b7280); font-size: 0.9em; margin-bottom: 4px; }
.photo3d-stages .running.name { font-weight: bold; }
"""


@dataclass
class StageState:
    state: str = "waiting"  # waiting, running, done, stopped, failed
    fraction: float = 0.0
    message: str = ""
    started: Optional[float] = None
    seconds: Optional[float] = None


class RunReport:
    """The stage table and log of one run, updated from pipeline events (their texts in the page's
    words, `page_words`). A stage's figures (`Metrics`) go to the metrics panel (`summary`), except
    the refinement's running loss, shown beside its bar."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.stages: Dict[str, StageState] = {stage: StageState() for stage in STAGES}
        self.lines: List[str] = []
        self.figures: Dict[str, Dict[str, float]] = {}  # stage -> the values of its Metrics events
        self._notices_seen: set[str] = set()
        self.outcome: Optional[str] = None  # "finished", "stopped" or "error: ..." once known

    def note(self, text: str) -> None:
        self.lines.append(f"{time.monotonic() - self.started:6.1f}s  {text}")
        del self.lines[:-LOG_LINES]

    def notice(self, text: str) -> Optional[str]:
        """Log a warning for the user; returns it in the page's words, or None when the same one
        was already shown this run."""
        text = page_words(text)
        if text in self._notices_seen:
            return None
        self._notices_seen.add(text)
        self.note(f"⚠ {text}")
        return text

    def apply(self, event: Event) -> Optional[str]:
        """Take one pipeline event into account; returns the text of a new warning, if any."""
        if isinstance(event, StageStarted):
            stage = self.stages[event.stage]
            stage.state, stage.started, stage.message = "running", time.monotonic(), page_words(event.message)
            self.note(f"{STAGE_TITLES[event.stage]}: {stage.message}")
        elif isinstance(event, StageFinished):
            stage = self.stages[event.stage]
            stage.state, stage.fraction, stage.seconds = "done", 1.0, event.seconds
            self.note(f"{STAGE_TITLES[event.stage]} done in {event.seconds:.1f} s: {stage.message}")
        elif isinstance(event, Progress):
            stage = self.stages[event.stage]
            stage.fraction, stage.message = event.fraction, page_words(event.message) or stage.message
        elif isinstance(event, Metrics):
            self._metrics(event)
        elif isinstance(event, Warning):
            return self.notice(event.message)
        elif isinstance(event, Result):
            summary = ", ".join(f"{k} {v:.3f}" for k, v in sorted(event.metrics.items()))
            self.note(f"Finished in {event.timings.get('total', 0.0):.1f} s: {summary}")
            self.outcome = "finished"
        return None

    def _metrics(self, event: Metrics) -> None:
        if event.stage == "refine" and "loss" in event.values:  # one per preview: shown beside the bar
            stage = self.stages["refine"]
            stage.message = f"{stage.message.split(' · ')[0]} · loss {_number(event.values['loss'])}"
        else:
            self.figures.setdefault(event.stage, {}).update(event.values)

    def summary(self, result: Result) -> dict:
        """Metrics and timings of a result, and each stage's figures, for the JSON panel (and API callers)."""
        out = {"metrics": result.metrics, "timings_s": result.timings}
        if result.heldout is not None:
            out["heldout"] = result.heldout
        stages = {stage: {k: v for k, v in values.items() if k not in result.metrics}
                  for stage, values in self.figures.items()}
        out["stages"] = {stage: values for stage, values in stages.items() if values}
        return out

    def stop(self, why: str) -> None:
        """Mark the running stage as stopped (Stop, cancel, or an error); idempotent."""
        self.outcome = self.outcome or why
        for stage in self.stages.values():
            if stage.state == "running":
                stage.state = "stopped" if why == "stopped" else "failed"
        last = self.lines[-1] if self.lines else ""
        if why not in last:
            self.note(why)

    def stages_html(self) -> str:
        rows = []
        now = time.monotonic()
        for name, stage in self.stages.items():
            seconds = stage.seconds if stage.seconds is not None else (
                now - stage.started if stage.started is not None and stage.state == "running" else None)
            ended = stage.state if stage.state in ("stopped", "failed") else ""
            detail = " · ".join(part for part in (stage.message, f"{seconds:.0f} s" if seconds is not None else "", ended)
                                if part)
            rows.append(
                f'<div class="name {stage.state}">{html.escape(STAGE_TITLES[name])}</div>'
                f'<div class="bar {stage.state}" title="{stage.state}">'
                f'<div class="fill" style="width: {100 * stage.fraction:.0f}%"></div></div>'
                f'<div class="detail">{html.escape(detail or stage.state)}</div>'
            )
        return f'<div class="photo3d-stages">{"".join(rows)}</div>'

    def log_text(self) -> str:
        return "\n".join(self.lines)


def per_view_rows(result: Result) -> List[list]:
    """[name, PSNR, mask IoU] per view, in natural order of the names (r_2 before r_10)."""
    return [
        [name, round(values.get("psnr", float("nan")), 2), round(values.get("mask_iou", float("nan")), 3)]
        for name, values in sorted(result.per_view.items(), key=lambda item: natural_key(item[0]))
    ]


def natural_key(name: str) -> list:
    """Sort key that orders the digit runs of a name by number: "r_2" < "r_10"."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", name)]


def gallery_items(capture: Capture, folder: Path) -> List[tuple[str, str]]:
    """(PNG path, caption) per photo, the object's mask shown by dimming the background.

    Written once to files, so later updates of the page resend paths, not pixels.
    """
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for index, name in enumerate(capture.names):
        photo = Image.fromarray(_to_bytes(capture.images[index]))
        if capture.masks is not None:
            mask = Image.fromarray(_to_bytes(capture.masks[index]))  # 2-D uint8: mode L
            dimmed = Image.blend(photo, Image.new("RGB", photo.size, (40, 40, 90)), 0.65)
            photo = Image.composite(photo, dimmed, mask)
        path = folder / f"{index:04d}.png"
        photo.save(path)
        items.append((str(path), name if capture.masks is not None else f"{name} (no mask)"))
    return items


def _to_bytes(values: np.ndarray) -> np.ndarray:  # float in [0, 1] -> uint8, for display only
    return (np.clip(values, 0.0, 1.0) * 255).round().astype(np.uint8)


def _number(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.4g}"
