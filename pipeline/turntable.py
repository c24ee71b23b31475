"""Turntable cameras: a prior for photos taken all around an object at one height, in order.

View i of N sits at azimuth ``direction * 360 * i / N`` degrees and ``elevation_deg`` above the object's
equator, looking at the world origin, world up = +z. The focal length comes from the EXIF 35 mm
equivalent when the photos carry one, else from a field of view (along the longer image side). The
camera distance is what makes a sphere of radius ``radius`` at the origin look as large as the
silhouettes do: their half-extent rho (pixels) and the focal f give d = r sqrt(1 + (f / rho)^2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .cameras import Cameras, look_at
from .errors import PipelineError

DEFAULT_FOV_DEG = 50.0  # a phone's main camera is ~65-75 deg on the long side; 50 suits a mild zoom
FULL_FRAME_LONG_SIDE_MM = 36.0  # "35 mm equivalent" focal lengths refer to a 36 x 24 mm frame
_EXIF_FOCAL_35MM = 41989  # FocalLengthIn35mmFilm
_EXIF_IFD = 0x8769


def focal_35mm_from_exif(path: Union[str, Path]) -> Optional[float]:
    """The photo's 35 mm equivalent focal length (mm) from EXIF, or None when it has none."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            exif = im.getexif()
    except OSError:
        return None
    value = exif.get_ifd(_EXIF_IFD).get(_EXIF_FOCAL_35MM) or exif.get(_EXIF_FOCAL_35MM)
    return float(value) if value else None


def focal_pixels(size: tuple[int, int], fov_deg: Optional[float] = None,
                 focal_35mm: Optional[float] = None) -> float:
    """Focal length in pixels for images of ``size`` = (H, W): from the 35 mm equivalent, else the FOV."""
    long_side = max(size)
    if focal_35mm is not None and focal_35mm > 0:
        return focal_35mm / FULL_FRAME_LONG_SIDE_MM * long_side
    fov = DEFAULT_FOV_DEG if fov_deg is None else fov_deg
    if not 1.0 <= fov <= 170.0:
        raise PipelineError(f"field of view {fov} deg is out of range: give 1-170 degrees (phones: ~65-75)")
    return 0.5 * long_side / np.tan(np.radians(fov) / 2)


def silhouette_half_extent(masks: np.ndarray) -> float:  # masks [N, H, W]
    """Median over views of half the larger side of the silhouette's bounding box (pixels)."""
    fg = masks > 0.5
    rows, cols = fg.any(axis=2), fg.any(axis=1)  # [N, H], [N, W]
    has = rows.any(axis=1)
    if not has.any():
        raise PipelineError("every mask is empty: the turntable prior needs the object's silhouettes; check the masks")

    def span(occupied: np.ndarray) -> np.ndarray:  # [N, L] -> [N] extent in pixels
        first = np.argmax(occupied, axis=1)
        last = occupied.shape[1] - np.argmax(occupied[:, ::-1], axis=1)
        return (last - first).astype(np.float64)

    half = 0.5 * np.maximum(span(rows[has]), span(cols[has]))
    return float(np.median(half))


def turntable_cameras(
    masks: np.ndarray,  # [N, H, W] silhouettes, in turntable order
    elevation_deg: float = 15.0,
    fov_deg: Optional[float] = None,
    focal_35mm: Optional[float] = None,
    direction: int = 1,  # +1: azimuth grows with the view index (object turning clockwise seen from above)
    radius: float = 1.0,
) -> Cameras:
    """N cameras at equal azimuth steps around the origin (see the module docstring)."""
    n, h, w = masks.shape
    if n < 3:
        raise PipelineError(f"the turntable prior needs at least 3 photos all around the object, got {n}")
    if not -89.0 <= elevation_deg <= 89.0:
        raise PipelineError(f"turntable elevation {elevation_deg} deg is out of range: give -89 to 89 degrees")
    if direction not in (1, -1):
        raise PipelineError(f"turntable direction must be 1 or -1, got {direction}")
    f = focal_pixels((h, w), fov_deg, focal_35mm)
    rho = silhouette_half_extent(masks)
    distance = radius * np.sqrt(1.0 + (f / max(rho, 1.0)) ** 2)
    azimuth = direction * 2 * np.pi * np.arange(n) / n  # [N]
    elev = np.radians(elevation_deg)
    eyes = distance * np.stack([np.cos(elev) * np.cos(azimuth), np.cos(elev) * np.sin(azimuth),
                                np.full(n, np.sin(elev))], axis=1)  # [N, 3]
    world_to_camera = np.stack([look_at(e, np.zeros(3), np.array([0.0, 0.0, 1.0])) for e in eyes])
    k = np.array([[f, 0.0, w / 2], [0.0, f, h / 2], [0.0, 0.0, 1.0]])
    return Cameras(np.repeat(k[None], n, axis=0), world_to_camera, np.tile([h, w], (n, 1)))


def turntable_from_files(masks: np.ndarray, paths: Sequence[Union[str, Path]], **kwargs) -> Cameras:
    """`turntable_cameras` with the focal taken from the first photo whose EXIF has a 35 mm equivalent."""
    focal = next((f for f in map(focal_35mm_from_exif, paths) if f), None)
    return turntable_cameras(masks, focal_35mm=focal, **kwargs)
