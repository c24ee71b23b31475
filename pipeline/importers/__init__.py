"""Importers: a folder (or list) of photos, with or without a camera file -> `Capture`.

`load_capture(source)` detects the format, in this order of preference (the first found wins; the
others are named in ``capture.warnings``):

1. ``cameras.json`` with ``"format": "photo3d-cameras"`` (this project's, see `save_cameras_json`);
2. ``transforms_<split>.json`` (default split "train"), else ``transforms.json`` for the train split:
   NeRF-synthetic / instant-ngp / nerfstudio (`formats.read_transforms`);
3. a COLMAP model in ``sparse/0/``, ``sparse/`` or the folder itself (``cameras``/``images``
   [/``points3D``] ``.bin`` or ``.txt``), photos in ``images/`` (else the folder) (`formats.read_colmap`);
4. LLFF ``poses_bounds.npy`` with ``images/`` [and ``masks/``] (`formats.read_llff`);
5. plain photos (the folder's, else its ``images/``'s, or the listed files): ``cameras=None``.

Pixels: RGB in [0, 1] as stored; an alpha channel becomes the mask and the RGB is composited over
white. User masks (which win over alpha): ``masks/<stem>.*`` or ``masks/<name>.png`` beside the photos
or in the capture folder, or ``<stem>_mask.*`` / ``<stem>.mask.*`` beside a photo. Masks are used only
when every view has one (else a warning). Distorted cameras are undistorted on load to the pinhole
camera with the same K.
"""

from __future__ import annotations

from typing import Optional

from ..capture import Capture
from ..errors import PipelineError
from ..limits import DEFAULT_LIMITS, InputLimits
from .assemble import Frame, build_capture, make_plans, plan_views, require_views
from .formats import (
    CAMERAS_JSON_FORMAT,
    colmap_files,
    is_cameras_json,
    read_cameras_json,
    read_colmap,
    read_llff,
    read_transforms,
    save_cameras_json,
)
from .sources import Source, SourceLike

__all__ = ["load_capture", "plan_capture", "detect_format", "save_cameras_json", "CAMERAS_JSON_FORMAT"]


def _candidates(source: Source, split: str) -> list[tuple[str, object]]:
    """[(format, where)] of every camera file found, in order of preference (only NeRF has splits)."""
    found: list[tuple[str, object]] = []
    names = [f"transforms_{split}.json"] + (["transforms.json"] if split == "train" else [])
    transforms = next((p for p in map(source.named, names) if p is not None), None)
    if split != "train":
        return [("transforms", transforms)] if transforms is not None else []
    cameras_json = source.named("cameras.json")
    if cameras_json is not None and is_cameras_json(cameras_json):
        found.append(("cameras.json", cameras_json))
    if transforms is not None:
        found.append(("transforms", transforms))
    roots = [source.root / "sparse" / "0", source.root / "sparse", source.root] if source.root is not None else [None]
    colmap = next((files for files in (colmap_files(r, source) for r in roots) if files), None)
    if colmap is not None:
        found.append(("colmap", colmap))
    llff = source.named("poses_bounds.npy")
    if llff is not None:
        found.append(("llff", llff))
    return found


def detect_format(source: SourceLike, split: str = "train") -> str:
    """'cameras.json', 'transforms', 'colmap', 'llff' or 'images' (no camera file): what `load_capture` would read."""
    found = _candidates(Source(source), split)
    return found[0][0] if found else "images"


def _frames(src: Source, split: str, warnings: list[str], limits: InputLimits) -> tuple[list[Frame], Optional[object]]:
    """(frames, camera file or None) of a source, with notes on what was ignored in ``warnings``."""
    found = _candidates(src, split)
    if split != "train" and not found:
        raise PipelineError(
            f"{src.label}: no transforms_{split}.json, and split={split!r} exists only for NeRF-style "
            "transforms_<split>.json files. Load the default split instead."
        )
    if len(found) > 1:
        ignored = ", ".join(kind for kind, _ in found[1:])
        warnings.append(f"Several camera files found; used {found[0][0]}, ignored {ignored}.")
    if not found:
        images = src.listed_images()
        if not images:
            other = sorted(p.name for p in src.root.glob("transforms_*.json")) if src.root is not None else []
            hint = f" (found {', '.join(other)}: pass split=...)" if other else ""
            raise PipelineError(
                f"{src.label}: no photos (JPEG, PNG or WebP) and no camera file found{hint}. "
                "Put the photos in this folder or in images/."
            )
        return [Frame(image=p, name=src.name_of(p), mask=src.mask_for(p)) for p in images], None

    kind, where = found[0]
    for path in where.values() if isinstance(where, dict) else [where]:
        limits.check_bytes(path, path.stat().st_size, camera_file=True)
    if kind == "cameras.json":
        return read_cameras_json(where, src, warnings), where
    if kind == "transforms":
        return read_transforms(where, src, warnings), where
    if kind == "colmap":
        model_dir = where["cameras"].parent
        base = src.root if src.root is not None else model_dir
        images_dir = base / "images" if (base / "images").is_dir() else base
        return read_colmap(where, images_dir, src, warnings), where["images"]
    return read_llff(where, src), where


def load_capture(source: SourceLike, max_side: Optional[int] = None, split: str = "train",
                 limits: InputLimits = DEFAULT_LIMITS) -> Capture:
    """Read a capture from a folder, a camera file, or a list of files (see the module docstring).

    ``max_side``: downscale so the longer image side is at most this (intrinsics follow; a warning says
    so). ``split``: which NeRF ``transforms_<split>.json`` to read ("train", "test", "val"); other
    formats have only the one split, "train". ``limits``: counts, bytes and pixels refused before
    anything is decoded. Photos of other orientations and sizes are brought onto one canvas, their
    cameras following (`assemble.plan_views`). Raises `PipelineError` naming the file and the fix.
    """
    if max_side is not None and max_side < 1:
        raise PipelineError(f"max_side={max_side}: the longest image side must be at least 1 pixel.")
    src = Source(source)
    warnings: list[str] = []
    frames, camera_file = _frames(src, split, warnings, limits)
    return build_capture(frames, camera_file, src.label, max_side, warnings, limits)


def plan_capture(source: SourceLike, split: str = "train", limits: InputLimits = DEFAULT_LIMITS) -> list[str]:
    """What `load_capture` would say about the photos, from their headers alone (nothing decoded):
    which are left out, turned upright or to the majority's orientation, resized or stretched, all at
    once. Raises the PipelineError loading would raise."""
    src = Source(source)
    notes: list[str] = []
    frames, camera_file = _frames(src, split, notes, limits)
    origin = camera_file.name if camera_file is not None else src.label
    require_views(frames, origin, notes)
    plan_views(make_plans(frames, origin, limits, notes), None, notes)
    return notes
