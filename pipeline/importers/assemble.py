"""From per-view records (what a camera file says) to a validated `Capture` with pixels."""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..cameras import Cameras
from ..capture import Capture, Original
from ..errors import PipelineError
from ..limits import InputLimits, describe, sniff
from . import pixels

MIN_VIEWS = 3
RIGID_TOLERANCE = 1e-3  # max |R^T R - I| of a rotation stored with float32 precision or a few digits
MASK_THRESHOLD = 0.5  # a mask with no pixel at or above this is empty
LOAD_THREADS = 4  # views read at once (`build_capture`)


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


@dataclass
class ViewPlan:
    """How one photo becomes a view of the capture's canvas, decided from its header alone."""

    frame: Frame
    stored: tuple[int, int]  # (H, W) of the pixels as stored in the file
    orientation: int  # the file's EXIF orientation tag (1 = upright as stored)
    exif: bool  # whether that orientation is applied to the pixels
    turns: int = 0  # quarter turns clockwise from the (oriented) photo onto the canvas

    @property
    def oriented(self) -> tuple[int, int]:  # (H, W) after the EXIF orientation, when applied
        swap = self.exif and self.orientation in pixels.SWAPPING_ORIENTATIONS
        return (self.stored[1], self.stored[0]) if swap else self.stored

    @property
    def turned(self) -> tuple[int, int]:  # (H, W) after the turns onto the canvas
        return self.oriented[::-1] if self.turns % 2 else self.oriented


def _shape(size: tuple[int, int]) -> str:
    return "portrait" if size[0] > size[1] else "landscape" if size[1] > size[0] else "square"


def _listed(items: list[str]) -> str:
    return ", ".join(items)


def plan_views(plans: list[ViewPlan], max_side: Optional[int], notes: list[str]) -> tuple[int, int]:
    """Set each plan's ``turns`` and return the canvas (H, W) every view is brought onto; say in
    ``notes`` which photos are turned, resized or stretched (once, naming all of them).

    Photos of the minority orientation (portrait among landscape, or the reverse) are turned a
    quarter clockwise; then every photo is resampled to the most common size (anisotropically when
    its aspect ratio differs), then to ``max_side``. Each step is an exact change of the camera
    (`Cameras.turned`, `Cameras.resized`), so nothing is refused for its shape.
    """
    upright = [p.frame.name for p in plans if p.exif and p.orientation != 1]
    if upright:
        notes.append(f"{len(upright)} photo(s) turned upright as their EXIF orientation says: {_listed(upright)}.")
    shapes = Counter(_shape(p.oriented) for p in plans)
    if shapes["portrait"] and shapes["landscape"]:
        major = "portrait" if shapes["portrait"] > shapes["landscape"] else "landscape"
        minor = "landscape" if major == "portrait" else "portrait"
        odd = [p for p in plans if _shape(p.oriented) == minor]
        for p in odd:
            p.turns = 1
        notes.append(
            f"{len(odd)} {minor} photo(s) among {shapes[major]} {major} ones are turned 90 degrees clockwise to "
            f"match, their cameras with them (exact): {_listed([f'{p.frame.name} ({_wh(p.oriented)})' for p in odd])}.")
    counts = Counter(p.turned for p in plans)
    canvas = max(counts, key=lambda s: (counts[s], s[0] * s[1]))
    resized = [p for p in plans if p.turned != canvas and _same_aspect(p.turned, canvas)]
    stretched = [p for p in plans if not _same_aspect(p.turned, canvas)]
    if resized:
        notes.append(f"{len(resized)} photo(s) of another size are resized to the most common, {_wh(canvas)} "
                     f"(cameras follow): {_listed([f'{p.frame.name} ({_wh(p.turned)})' for p in resized])}.")
    if stretched:
        notes.append(f"{len(stretched)} photo(s) of another aspect ratio are stretched to {_wh(canvas)} (cameras "
                     "follow exactly, but detail is lost along one side; crop them like the others for the best "
                     f"result): {_listed([f'{p.frame.name} ({_wh(p.turned)})' for p in stretched])}.")
    return _limit(canvas, max_side, notes)


def _limit(size: tuple[int, int], max_side: Optional[int], warnings: list[str]) -> tuple[int, int]:
    if max_side is None or max(size) <= max_side:
        return size
    factor = max_side / max(size)
    out = (max(1, round(size[0] * factor)), max(1, round(size[1] * factor)))
    warnings.append(f"Photos downscaled from {_wh(size)} to {_wh(out)} (max_side={max_side}).")
    return out


def _check_file(path: Path, limits: InputLimits) -> tuple[int, tuple[tuple[int, int], int]]:
    """(bytes, ((H, W) as stored, EXIF orientation)) of photo or mask ``path``, after checking its
    size, its content and its header's pixel count."""
    size = path.stat().st_size
    limits.check_bytes(path, size)
    if sniff(path) not in pixels.FORMATS:
        raise PipelineError(f"{path}: not a photo (its content is {describe(path)}, whatever its name says). "
                            "Remove it, or export it again as PNG or JPEG.")
    header = pixels.image_size(path, exif=False)
    (height, width), _ = header
    limits.check_pixels(path, height, width)
    return size, header


def check_files(frames: list[Frame], limits: InputLimits, origin: str) -> list[tuple[tuple[int, int], int]]:
    """The limits on count, bytes, content and pixels of every photo and mask, before any is decoded;
    returns the photos' headers ((H, W) as stored, EXIF orientation), in frame order."""
    limits.check_count(len(frames), origin)
    headers, total = [], 0
    for frame in frames:
        size, header = _check_file(frame.image, limits)
        headers.append(header)
        total += size + (_check_file(frame.mask, limits)[0] if frame.mask else 0)
    limits.check_total(total, origin)
    return headers


def _camera_sees_exif(frame: Frame, stored: tuple[int, int], orientation: int) -> bool:
    """Whether a camera file's camera refers to the photo as its EXIF orientation shows it rather than
    to the stored pixels (what calibration tools such as COLMAP see): only when its calibrated size
    fits the turned photo and not the stored one."""
    turned = (stored[1], stored[0])
    return (orientation in pixels.SWAPPING_ORIENTATIONS and not _same_aspect(frame.size, stored)
            and _same_aspect(frame.size, turned))


def make_plans(frames: list[Frame], origin: str, limits: InputLimits,
               notes: list[str]) -> list[ViewPlan]:
    """One `ViewPlan` per frame (its turns still 0: `plan_views` sets them), after the file checks and,
    for frames with cameras, the intrinsics checks. Without a camera file the EXIF orientation is
    always applied; with one, only where the camera was calibrated for the turned photo."""
    headers = check_files(frames, limits, origin)
    plans = []
    for index, (frame, (stored, orientation)) in enumerate(zip(frames, headers)):
        exif = frame.intrinsics is None or _camera_sees_exif(frame, stored, orientation)
        plan = ViewPlan(frame, stored, orientation, exif)
        if frame.intrinsics is not None:
            _check_intrinsics(frame, plan.oriented, f"{origin}, frame {index} ({frame.name})")
        plans.append(plan)
    ignored = [p.frame.name for p in plans if not p.exif and p.orientation != 1]
    if ignored:
        notes.append(f"EXIF orientation ignored for {len(ignored)} photo(s) (e.g. {ignored[0]}): the cameras in "
                     f"{origin} refer to the pixels as stored.")
    return plans


def _load_view(plan: ViewPlan, size: tuple[int, int], intrinsics: Optional[np.ndarray]):
    """(RGB [H, W, 3] composited over white, mask [H, W] or None) of one view on the canvas of ``size``.

    Resampled to the canvas size before turning (``size`` turned back), undistorted there with that
    size's ``intrinsics``, then turned: the order in which the camera changes (`build_capture`).
    """
    frame = plan.frame
    before_turn = size[::-1] if plan.turns % 2 else size
    swapped = plan.exif and plan.orientation in pixels.SWAPPING_ORIENTATIONS
    target = before_turn if swapped else before_turn[::-1]  # (W, H) of the canvas in the file's orientation
    rgba = pixels.read_image(frame.image, plan.exif, target)
    if rgba.shape[2] == 4:
        alpha = rgba[..., 3:]
        rgba = np.concatenate([rgba[..., :3] * alpha + (1.0 - alpha), alpha], axis=2)
        if alpha.min() >= 1.0:  # an opaque alpha channel says nothing about the object
            rgba = rgba[..., :3]
    if frame.mask is not None:
        mask = pixels.read_mask(frame.mask, plan.exif, target)
        if not _same_aspect(mask.shape, rgba.shape[:2]):
            raise PipelineError(
                f"{frame.mask}: this mask is {_wh(mask.shape)} but its photo {frame.image.name} is "
                f"{_wh(rgba.shape[:2])}. Make the mask from this photo, at its size."
            )
        layers = np.concatenate([pixels.resize(rgba[..., :3], before_turn),
                                 pixels.resize(mask[..., None], before_turn)], axis=2)
    else:
        layers = pixels.resize(rgba, before_turn)
    if frame.distortion is not None:
        fill = np.array([1.0, 1.0, 1.0, 0.0][: layers.shape[2]])
        layers = pixels.undistort(layers, intrinsics, frame.distortion, fill)
    layers = np.ascontiguousarray(np.rot90(layers, -plan.turns))
    return layers[..., :3], (layers[..., 3] if layers.shape[2] == 4 else None)


def require_views(frames: list[Frame], origin: str, warnings: list[str]) -> None:
    """Raise a PipelineError when fewer than MIN_VIEWS frames are usable, naming the first problem."""
    if len(frames) < MIN_VIEWS:
        note = f" ({len(warnings)} problem(s), first: {warnings[0]})" if warnings else ""
        raise PipelineError(
            f"{origin}: only {len(frames)} usable view(s){note}; at least {MIN_VIEWS} photos of the object from "
            "different sides are needed. Add photos (and check that the files listed in the camera file exist)."
        )


def build_capture(
    frames: list[Frame],
    camera_file: Optional[Path],
    source_label: str,
    max_side: Optional[int],
    warnings: list[str],
    limits: InputLimits,
) -> Capture:
    """Validate the frames, read their pixels onto one canvas (`plan_views`), and assemble the `Capture`.

    Cameras from a file follow each photo exactly: resized to the canvas size before turning, then
    turned. Each view keeps where it came from in ``Capture.originals`` (unless a camera was
    undistorted), so that structure from motion and the geometric masker can read the photos at
    their own resolution and map what they find onto the canvas.
    """
    origin = camera_file.name if camera_file is not None else source_label
    require_views(frames, origin, warnings)
    calibrated = frames[0].intrinsics is not None
    plans = make_plans(frames, origin, limits, warnings)
    canvas = plan_views(plans, max_side, warnings)
    turns = np.array([p.turns for p in plans])

    cameras = before_turn = None
    if calibrated:
        given = Cameras(np.stack([f.intrinsics for f in frames]), np.stack([f.world_to_camera for f in frames]),
                        np.array([f.size for f in frames]))
        before_turn = given.resized(np.where((turns % 2)[:, None] == 1, np.array(canvas)[::-1], np.array(canvas)))
        cameras = before_turn.turned(turns)

    images = np.empty((len(frames), *canvas, 3), dtype=np.float32)
    masks = np.empty((len(frames), *canvas), dtype=np.float32)
    has_mask = np.zeros(len(frames), dtype=bool)

    def load(i: int):
        return _load_view(plans[i], canvas, None if before_turn is None else before_turn.intrinsics[i])

    # Pillow's decoders and resizes and numpy's arithmetic release the GIL, so threads load views in
    # parallel; four bound the memory of views in flight (a 12 MP PNG with alpha is ~0.6 GB as floats).
    # `map` hands the results back in order, and the first failing view's error is the one raised.
    with ThreadPoolExecutor(max_workers=max(1, min(LOAD_THREADS, os.cpu_count() or 1, len(plans)))) as pool:
        for i, (rgb, mask) in enumerate(pool.map(load, range(len(plans)))):
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

    return Capture(
        images=images,
        masks=masks if use_masks else None,
        cameras=cameras,
        names=[f.name for f in frames],
        source=str(camera_file) if camera_file is not None else source_label,
        warnings=warnings,
        # Undistorted views are no longer their photos resized: those have no originals to go back to.
        originals=None if any(f.distortion is not None for f in frames)
        else [Original(p.frame.image, p.exif, p.turns) for p in plans],
    )
