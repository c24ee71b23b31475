"""Reading, resizing and undistorting photos and masks (Pillow + numpy; no camera logic here)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage

from ..errors import PipelineError

_ORIENTATION_TAG = 0x0112
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the picture by 90 degrees
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")  # Pillow's modes for 16-bit greyscale PNGs
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
FORMATS = ("PNG", "JPEG", "WebP", "TIFF", "BMP")  # what `pipeline.limits.sniff` may call a photo


def _unreadable(path: Path, error: Exception) -> PipelineError:
    return PipelineError(f"Cannot read image {path}: {error}. Re-export it as PNG or JPEG, or remove it.")


def image_size(path: Path, exif: bool) -> tuple[tuple[int, int], int]:
    """((H, W), EXIF orientation) of an image from its header; (H, W) after the rotation when ``exif``."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            # Pillow decodes a whole PNG to look for an eXIf chunk after the pixels; one before them
            # is already in `info`. Never decode here: this runs before the pixel-count limit.
            has_exif = im.format != "PNG" or "exif" in im.info
            orientation = int(im.getexif().get(_ORIENTATION_TAG, 1)) if has_exif else 1
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from e
    if exif and orientation in SWAPPING_ORIENTATIONS:
        width, height = height, width
    return (height, width), orientation


def _decode(path: Path, exif: bool, target: Optional[tuple[int, int]] = None) -> Image.Image:
    try:
        with Image.open(path) as im:
            if target is not None:
                decode_jpeg_at(im, target)
            im.load()
            return ImageOps.exif_transpose(im) if exif else im.copy()
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from e


def draft_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:  # (W, H), (W, H) -> (W, H)
    """The smallest size a JPEG of ``size`` decodes to exactly (both sides divided by 8, 4 or 2) that
    is still at least ``target`` on each side (both in the file's stored orientation); ``size``
    itself when none is. Exact division keeps the pixel grid a pure scaling of the file's, so the
    cameras (`Cameras.resized`) still fit."""
    width, height = size
    for scale in (8, 4, 2):
        if width % scale == 0 and height % scale == 0 and width // scale >= target[0] and height // scale >= target[1]:
            return width // scale, height // scale
    return width, height


def decode_jpeg_at(im: Image.Image, target: tuple[int, int]) -> None:
    """Before ``im.load()``: let a JPEG decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling: a
    fraction of the time and memory) when that still covers ``target`` (W, H) as stored; other formats
    are left alone. A 12 MP phone photo for a 512 px canvas is read at 1008 x 756, not 4032 x 3024."""
    if im.format == "JPEG":
        im.draft(im.mode, draft_size(im.size, target))


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def read_image(path: Path, exif: bool, target: Optional[tuple[int, int]] = None) -> np.ndarray:  # [h, w, 3|4] float32
    """RGB (+ alpha when the file has an alpha channel) in [0, 1] as stored; greyscale and 16-bit grey
    become RGB. With ``target`` (W, H) as stored, a JPEG may come back smaller, never below it
    (`decode_jpeg_at`)."""
    im = _decode(path, exif, target)
    if im.mode in _SIXTEEN_BIT_MODES:  # 16-bit grey; Pillow itself reads 16-bit RGB(A) PNGs as 8-bit
        grey = np.asarray(im, dtype=np.float32) / 65535.0
        return np.repeat(np.clip(grey, 0.0, 1.0)[..., None], 3, axis=2)
    return np.asarray(im.convert("RGBA" if _has_alpha(im) else "RGB"), dtype=np.float32) / 255.0


def read_mask(path: Path, exif: bool, target: Optional[tuple[int, int]] = None) -> np.ndarray:  # [h, w] float32
    """A mask file (1 = object) in [0, 1]: its alpha channel when it has a non-opaque one, else its
    grey level. ``target`` as for `read_image`."""
    im = _decode(path, exif, target)
    if im.mode in _SIXTEEN_BIT_MODES:
        return np.clip(np.asarray(im, dtype=np.float32) / 65535.0, 0.0, 1.0)
    if _has_alpha(im):
        alpha = np.asarray(im.convert("RGBA"), dtype=np.float32)[..., 3] / 255.0
        if alpha.min() < 1.0:
            return alpha
    return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def resize(layers: np.ndarray, size: tuple[int, int]) -> np.ndarray:  # [h, w, C] -> [H, W, C]
    """Lanczos resize of float layers to size = (H, W), clipped to [0, 1]."""
    height, width = size
    if layers.shape[:2] == (height, width):
        return layers
    out = [
        np.asarray(Image.fromarray(np.ascontiguousarray(layers[..., c])).resize((width, height), Image.LANCZOS))
        for c in range(layers.shape[2])
    ]
    return np.clip(np.stack(out, axis=-1), 0.0, 1.0).astype(np.float32)


def distort(xy: np.ndarray, coeffs: np.ndarray) -> np.ndarray:  # [..., 2] -> [..., 2]
    """OpenCV / COLMAP radial-tangential model on normalised camera coordinates; coeffs = (k1, k2, p1, p2)."""
    k1, k2, p1, p2 = coeffs
    x, y = xy[..., 0], xy[..., 1]
    r2 = x * x + y * y
    radial = 1.0 + r2 * (k1 + k2 * r2)
    xd = x * radial + 2.0 * p1 * x * y + p2 * (r2 + 2.0 * x * x)
    yd = y * radial + p1 * (r2 + 2.0 * y * y) + 2.0 * p2 * x * y
    return np.stack([xd, yd], axis=-1)


def undistort(layers: np.ndarray, intrinsics: np.ndarray, coeffs: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """Resample a distorted photo [H, W, C] into the pinhole camera with the same K and size.

    Every output pixel centre is mapped through the lens model into the source photo and sampled
    bilinearly; pixels that fall outside the photo get ``fill`` [C] (white for colour, 0 for masks).
    """
    height, width, channels = layers.shape
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    kinv = np.linalg.inv(intrinsics)
    pix = np.stack([cols + 0.5, rows + 0.5, np.ones_like(rows)], axis=-1)  # pixel centres
    ray = pix @ kinv.T  # [H, W, 3], z = 1
    src = distort(ray[..., :2], coeffs)
    src = np.concatenate([src, np.ones_like(src[..., :1])], axis=-1) @ intrinsics.T
    coords = np.stack([src[..., 1] - 0.5, src[..., 0] - 0.5])  # array indices (row, column)
    outside = (src[..., 0] < 0) | (src[..., 0] > width) | (src[..., 1] < 0) | (src[..., 1] > height)
    out = np.stack(
        [ndimage.map_coordinates(layers[..., c], coords, order=1, mode="nearest") for c in range(channels)], axis=-1
    )
    out[outside] = fill
    return out.astype(np.float32)
