"""Captures on cluttered backgrounds with exact truth: fixture views composited onto real photographs.

The backgrounds are crops of scikit-image's sample photographs (astronaut, coffee, chelsea, rocket,
motorcycle: real photos shipped with the package, see skimage/data/README.txt), a different crop
behind every view, so they are as busy as a room and carry no 3D structure that agrees with the poses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from pipeline import events
from pipeline.capture import Capture
from pipeline.config import CamerasConfig
from pipeline.reconstruct import estimate_missing

_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png")


def photographs() -> list[np.ndarray]:  # [h, w, 3] float32 in [0, 1] each
    folder = Path(skimage.data.__file__).parent
    return [np.asarray(Image.open(folder / name).convert("RGB"), dtype=np.float32) / 255 for name in _PHOTOS]


def on_photographs(capture: Capture, seed: int = 0, over_white: bool = True) -> tuple[Capture, np.ndarray]:
    """(the capture without masks, its views over photo crops; the true masks [N, H, W] bool).

    ``over_white``: ``capture.images`` were composited over white with ``capture.masks`` as alpha (the
    importers do so with an alpha channel), so replacing the white is exact: image + (background - 1)
    (1 - alpha). Otherwise (photos with mask files) the background is pasted by the mask.
    """
    rng = np.random.default_rng(seed)
    photos = photographs()
    n, h, w, _ = capture.images.shape
    out = np.empty_like(capture.images)
    for v in range(n):
        photo = photos[v % len(photos)]
        side = int(rng.integers(min(photo.shape[:2]) // 2, min(photo.shape[:2])))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = Image.fromarray(np.round(photo[top:top + side, left:left + side] * 255).astype(np.uint8))
        background = np.asarray(crop.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255
        alpha = capture.masks[v][..., None]
        base = capture.images[v] if over_white else capture.images[v] * alpha + (1.0 - alpha)
        out[v] = np.clip(base + (background - 1.0) * (1.0 - alpha), 0, 1)
    truth = capture.masks > 0.5
    cluttered = Capture(images=out, masks=None, cameras=capture.cameras, names=capture.names, source=capture.source,
                        warnings=[], originals=None)
    return cluttered, truth


def masks_on_clutter(capture, truth):
    """(the capture completed by `estimate_missing`, mask IoU per view against ``truth``, its events)."""
    config = CamerasConfig(exclude_bad_masks=False)
    seen, done = events.collect(estimate_missing(capture, config))
    iou = ((done.masks > 0.5) & truth).sum((1, 2)) / ((done.masks > 0.5) | truth).sum((1, 2))
    return done, iou, seen
