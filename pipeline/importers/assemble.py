"""From per-view records (what a camera file says) to a validated `Capture` with pixels."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..cameras import Cameras
from ..capture import Capture
from ..errors import PipelineError
from ..limits import InputLimits, describe, sniff
from . import pixels

MIN_VIEWS = 3
RIGID_TOLERANCE = 1e-3  # max |R^T R - I| of a rotation stored with float32 precision or a few digits
MASK_THRESHOLD = 0.5  # a mask with no pixel at or above this is empty


@dataclass
class Frame:
    """One view before any pixel is read: an image file and, from a camera file, its camera."""

    image: Path
    name: str  # in messages and Capture.names
    intrinsics: Optional[np.ndarray] = None  # [3, 3] pixels, for an image of `size`
    world_to_camera: Optional[np.ndarray] = None  # [4, 4] OpenCV axes
    size: Optional[tuple[int, int]] = None  # (H, W) the intrinsics were calibrated for
    distortion: Optional[np.ndarray] = None  # [4] k1, k2, p1, p2 (OpenCV/COLMAP); None = pinhole
    mask: Optional[Path] = None  # explicit mask file (else the image's alpha channel, if any)


def rigid(matrix, where: str) -> np.ndarray:  # [3, 4] or [4, 4] -> [4, 4]
    """Check that ``matrix`` is a rigid transform [R | t] and return it as 4x4 with R re-orthonormalised.

    ``where`` names the camera file and frame for the message.
    """
    try:
        m = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise PipelineError(f"{where}: the pose is not a matrix of numbers ({e}). Re-export the cameras.") from e
    if m.shape not in ((3, 4), (4, 4)):
        raise PipelineError(f"{where}: the pose must be a 3x4 or 4x4 matrix, not {m.shape}. Re-export the cameras.")
    if not np.all(np.isfinite(m)):
        raise PipelineError(f"{where}: the pose contains NaN or infinity. Remove this view or re-export the cameras.")
    if m.shape == (4, 4) and np.abs(m[3] - [0, 0, 0, 1]).max() > RIGID_TOLERANCE:
        raise PipelineError(f"{where}: the pose's last row is {m[3].tolist()}, not [0, 0, 0, 1]. Re-export it.")
    rot = m[:3, :3]
    error = np.abs(rot.T @ rot - np.eye(3)).max()
    det = np.linalg.det(rot)
    if error > RIGID_TOLERANCE or det <= 0:
        raise PipelineError(
            f"{where}: the pose's rotation is not a rotation (|R^T R - I| = {error:.3g}, det = {det:.3g}): "
            "the matrix is scaled, sheared or mirrored. Re-export the cameras without scaling the poses."
        )
    u, _, vt = np.linalg.svd(rot)
    out = np.eye(4)
    out[:3, :3] = u @ vt
    out[:3, 3] = m[:3, 3]
    return out


def invert_rigid(m: np.ndarray) -> np.ndarray:  # [4, 4] rigid -> its inverse
    out = np.eye(4)
    out[:3, :3] = m[:3, :3].T
    out[:3, 3] = -m[:3, :3].T @ m[:3, 3]
    return out


def _wh(size: tuple[int, int]) -> str:  # (H, W) -> "WxH", the usual way to write an image size
    return f"{size[1]}x{size[0]}"


def _same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether (H, W) sizes a and b differ only by a uniform resize (up to a pixel of rounding in the smaller)."""
    small = min(a[0], b[0])
    return abs(a[1] / a[0] - b[1] / b[0]) * small <= 1.0 + 1e-9


def _check_intrinsics(frame: Frame, image_size: tuple[int, int], where: str) -> None:
    k, (height, width) = frame.intrinsics, frame.size
    if not np.all(np.isfinite(k)):
        raise PipelineError(f"{where}: the intrinsics contain NaN or infinity. Remove this view or re-export it.")
    if k[0, 0] <= 0 or k[1, 1] <= 0:
        raise PipelineError(f"{where}: focal lengths ({k[0, 0]:g}, {k[1, 1]:g}) must be positive. Re-export it.")
    if not (0 < k[0, 2] < width and 0 < k[1, 2] < height):
        raise PipelineError(
            f"{where}: the principal point ({k[0, 2]:g}, {k[1, 2]:g}) lies outside the {_wh(frame.size)} image the "
            "camera was calibrated for: the intrinsics are probably for another resolution. Re-export the cameras "
            "for these photos."
        )
    if not _same_aspect(frame.size, image_size):
        raise PipelineError(
            f"{where}: the photo {frame.image.name} is {_wh(image_size)} but its camera was calibrated for "
            f"{_wh(frame.size)} (not a uniform resize). Use the photos the cameras were computed from, "
            "or recompute the cameras."
        )


def _common_size(frames: list[Frame], sizes: list[tuple[int, int]], warnings: list[str]) -> tuple[int, int]:
    """The most common (H, W); other sizes must have its aspect ratio and get resized to it."""
    counts = Counter(sizes)
    target = max(counts, key=lambda s: (counts[s], s[0] * s[1]))
    odd = [(f, s) for f, s in zip(frames, sizes) if s != target]
    for frame, size in odd:
        if not _same_aspect(size, target):
            raise PipelineError(
                f"{frame.image}: this photo is {_wh(size)} but most photos are {_wh(target)} (another aspect ratio). "
                "Crop or rotate it to match the others, or remove it."
            )
    if odd:
        listed = ", ".join(f"{f.name} ({_wh(s)})" for f, s in odd[:5]) + (", ..." if len(odd) > 5 else "")
        warnings.append(f"Photos have different sizes; resized to the most common, {_wh(target)}: {listed}.")
    return target


def _limit(size: tuple[int, int], max_side: Optional[int], warnings: list[str]) -> tuple[int, int]:
    if max_side is None or max(size) <= max_side:
        return size
    factor = max_side / max(size)
    out = (max(1, round(size[0] * factor)), max(1, round(size[1] * factor)))
    warnings.append(f"Photos downscaled from {_wh(size)} to {_wh(out)} (max_side={max_side}).")
    return out


def _check_file(path: Path, limits: InputLimits, exif: bool) -> tuple[int, tuple[tuple[int, int], int]]:
    """(bytes, `pixels.image_size` header) of photo or mask ``path``, after checking its size, its
    content and its header's pixel count."""
    size = path.stat().st_size
    limits.check_bytes(path, size)
    if sniff(path) not in pixels.FORMATS:
        raise PipelineError(f"{path}: not a photo (its content is {describe(path)}, whatever its name says). "
                            "Remove it, or export it again as PNG or JPEG.")
    header = pixels.image_size(path, exif)
    (height, width), _ = header
    limits.check_pixels(path, height, width)
    return size, header


def check_files(frames: list[Frame], limits: InputLimits, exif: bool, origin: str) -> list[tuple[tuple[int, int], int]]:
    """The limits on count, bytes, content and pixels of every photo and mask, before any is decoded;
    returns the photos' headers ((H, W), EXIF orientation), in frame order."""
    limits.check_count(len(frames), origin)
    headers, total = [], 0
    for frame in frames:
        size, header = _check_file(frame.image, limits, exif)
        headers.append(header)
        total += size + (_check_file(frame.mask, limits, exif)[0] if frame.mask else 0)
    limits.check_total(total, origin)
    return headers


def _load_view(frame: Frame, size: tuple[int, int], intrinsics: Optional[np.ndarray], exif: bool):
    """(RGB [H, W, 3] composited over white, mask [H, W] or None) of one view at ``size``."""
    rgba = pixels.read_image(frame.image, exif)
    if rgba.shape[2] == 4:
        alpha = rgba[..., 3:]
        rgba = np.concatenate([rgba[..., :3] * alpha + (1.0 - alpha), alpha], axis=2)
        if alpha.min() >= 1.0:  # an opaque alpha channel says nothing about the object
            rgba = rgba[..., :3]
    if frame.mask is not None:
        mask = pixels.read_mask(frame.mask, exif)
        if not _same_aspect(mask.shape, rgba.shape[:2]):
            raise PipelineError(
                f"{frame.mask}: this mask is {_wh(mask.shape)} but its photo {frame.image.name} is "
                f"{_wh(rgba.shape[:2])}. Make the mask from this photo, at its size."
            )
        layers = np.concatenate([pixels.resize(rgba[..., :3], size), pixels.resize(mask[..., None], size)], axis=2)
    else:
        layers = pixels.resize(rgba, size)
    if frame.distortion is not None:
        fill = np.array([1.0, 1.0, 1.0, 0.0][: layers.shape[2]])
        layers = pixels.undistort(layers, intrinsics, frame.distortion, fill)
    return layers[..., :3], (layers[..., 3] if layers.shape[2] == 4 else None)


def build_capture(
    frames: list[Frame],
    camera_file: Optional[Path],
    source_label: str,
    max_side: Optional[int],
    warnings: list[str],
    limits: InputLimits,
) -> Capture:
    """Validate the frames, read and size their pixels, and assemble the `Capture`.

    Frames with cameras: the images are used as stored (no EXIF rotation: calibration tools such as
    COLMAP see the stored pixels); without: EXIF orientation is applied.
    """
    origin = camera_file.name if camera_file is not None else source_label
    if len(frames) < MIN_VIEWS:
        note = f" ({len(warnings)} problem(s), first: {warnings[0]})" if warnings else ""
        raise PipelineError(
            f"{origin}: only {len(frames)} usable view(s){note}; at least {MIN_VIEWS} photos of the object from "
            "different sides are needed. Add photos (and check that the files listed in the camera file exist)."
        )
    calibrated = frames[0].intrinsics is not None
    exif = not calibrated
    headers = check_files(frames, limits, exif, origin)
    sizes = [hw for hw, _ in headers]
    if calibrated:
        for index, (frame, size) in enumerate(zip(frames, sizes)):
            _check_intrinsics(frame, size, f"{origin}, frame {index} ({frame.name})")
        rotated = [f.name for f, (_, orientation) in zip(frames, headers) if orientation != 1]
        if rotated:
            warnings.append(
                f"EXIF orientation ignored for {len(rotated)} photo(s) (e.g. {rotated[0]}): the cameras in {origin} "
                "refer to the pixels as stored."
            )
    target = _limit(_common_size(frames, sizes, warnings), max_side, warnings)

    intrinsics = None
    if calibrated:
        calib = np.array([f.size for f in frames], dtype=np.float64)  # [N, 2] (H, W)
        intrinsics = np.stack([f.intrinsics for f in frames])  # [N, 3, 3]
        intrinsics[:, 0, :] *= (target[1] / calib[:, 1])[:, None]
        intrinsics[:, 1, :] *= (target[0] / calib[:, 0])[:, None]

    images = np.empty((len(frames), *target, 3), dtype=np.float32)
    masks = np.empty((len(frames), *target), dtype=np.float32)
    has_mask = np.zeros(len(frames), dtype=bool)
    for i, frame in enumerate(frames):
        rgb, mask = _load_view(frame, target, None if intrinsics is None else intrinsics[i], exif)
        images[i] = rgb
        if mask is not None:
            masks[i], has_mask[i] = mask, True

    if has_mask.any() and not has_mask.all():
        missing = [f.name for f, m in zip(frames, has_mask) if not m]
        warnings.append(
            f"Masks ignored: {len(missing)} of {len(frames)} views have none (e.g. {missing[0]}). "
            "Give every photo a mask (alpha channel or a file in masks/) to use them."
        )
    use_masks = bool(has_mask.all())
    if use_masks:
        empty = np.flatnonzero(masks.reshape(len(frames), -1).max(axis=1) < MASK_THRESHOLD)
        if len(empty):
            frame = frames[empty[0]]
            where = frame.mask if frame.mask is not None else f"the alpha channel of {frame.image}"
            raise PipelineError(
                f"The mask of view {frame.name} ({where}) is empty: nothing is marked as object. "
                "Fix or remove this mask, or remove the view."
            )

    cameras = None
    if calibrated:
        world_to_camera = np.stack([f.world_to_camera for f in frames])  # [N, 4, 4]
        cameras = Cameras(intrinsics, world_to_camera, np.tile(np.array(target), (len(frames), 1)))
    return Capture(
        images=images,
        masks=masks if use_masks else None,
        cameras=cameras,
        names=[f.name for f in frames],
        source=str(camera_file) if camera_file is not None else source_label,
        warnings=warnings,
    )
