"""A capture: photos of one object, their masks and (when known) their cameras."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

from .cameras import Cameras
from .errors import PipelineError


@dataclass(frozen=True)
class Original:
    """Where a view's pixels came from: its photo, read with or without its EXIF orientation and then
    turned ``turns`` quarter turns clockwise onto the capture's canvas (then resized to it)."""

    path: Path
    exif: bool
    turns: int


@dataclass
class Capture:
    """N photos of one object on one H x W canvas (importers turn and resize photos onto it, cameras following).

    images: [N, H, W, 3] float32 linear-in-file RGB in [0, 1] (sRGB values as stored, not linearised).
    masks: [N, H, W] float32 in [0, 1] (1 = object), or None when unknown.
    cameras: per-view cameras (docs/CONVENTIONS.md), or None when they must be estimated.
    names: file name of each view (used in messages).
    originals: per view, its photo file and how it was brought onto the canvas, when read from files
        without cameras (structure from motion reads them at its own resolution), else None.
    """

    images: np.ndarray
    masks: Optional[np.ndarray]
    cameras: Optional[Cameras]
    names: List[str]
    source: str = ""
    warnings: List[str] = field(default_factory=list)
    originals: Optional[List[Original]] = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise PipelineError(f"images must be [N, H, W, 3], got {self.images.shape}")
        n, h, w, _ = self.images.shape
        if len(self.names) != n:
            raise PipelineError(f"{n} images but {len(self.names)} names")
        if self.masks is not None and self.masks.shape != (n, h, w):
            raise PipelineError(f"masks must be [{n}, {h}, {w}], got {self.masks.shape}")
        if self.cameras is not None and len(self.cameras) != n:
            raise PipelineError(f"{n} images but {len(self.cameras)} cameras")
        if self.originals is not None and len(self.originals) != n:
            raise PipelineError(f"{n} images but {len(self.originals)} originals")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def resolution(self) -> tuple[int, int]:  # (H, W)
        return int(self.images.shape[1]), int(self.images.shape[2])

    def subset(self, index) -> "Capture":
        """The views at ``index`` (array of ints or a boolean mask)."""
        index = np.arange(len(self))[index]
        return Capture(
            images=self.images[index],
            masks=None if self.masks is None else self.masks[index],
            cameras=None if self.cameras is None else self.cameras[index],
            names=[self.names[i] for i in index],
            source=self.source,
            warnings=list(self.warnings),
            originals=None if self.originals is None else [self.originals[i] for i in index],
        )
