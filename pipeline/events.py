"""Typed events streamed by `pipeline.reconstruct`; the UI and the CLI only consume these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Generator, List, Optional, Tuple, Union

import numpy as np


@dataclass
class StageStarted:
    stage: str  # one of config.STAGES
    message: str = ""


@dataclass
class StageFinished:
    stage: str
    seconds: float


@dataclass
class Progress:
    stage: str
    fraction: float  # of this stage, in [0, 1]
    message: str = ""


@dataclass
class Preview:
    stage: str
    image: np.ndarray  # [H, W, 3] uint8: current render beside the photo (fixed view) + a turntable frame
    caption: str = ""


@dataclass
class Metrics:
    stage: str
    values: Dict[str, float]


@dataclass
class Warning:  # noqa: A001 (a pipeline event, not the builtin category)
    message: str


@dataclass
class Result:
    glb_path: str
    zip_path: str
    cameras_path: str
    shaded_glb_path: str = ""  # the same model untextured, in grey (for viewers)
    metrics: Dict[str, float] = field(default_factory=dict)
    per_view: Dict[str, Dict[str, float]] = field(default_factory=dict)  # view name -> {psnr, mask_iou}
    timings: Dict[str, float] = field(default_factory=dict)  # stage -> seconds
    heldout: Optional[Dict[str, float]] = None


Event = Union[StageStarted, StageFinished, Progress, Preview, Metrics, Warning, Result]


def collect(events: Generator[Event, None, Any]) -> Tuple[List[Event], Any]:
    """Run a stage's event generator (such as `reconstruct.estimate_missing`) to its end: (every
    event it yielded, the value it returned)."""
    seen: List[Event] = []
    while True:
        try:
            seen.append(next(events))
        except StopIteration as stop:
            return seen, stop.value
