"""Synthetic captures: render a textured mesh into posed, masked photos.

Used to measure reconstruction against a known shape (tests on spot, the GPU benchmark on spot and bob).
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import trimesh

from .cameras import Cameras, look_at
from .capture import Capture
from .errors import PipelineError
from .evaluate import render_views
from .mesh import TexturedMesh
from .render import Rasterizer


def load_textured_mesh(path: Union[str, Path]) -> TexturedMesh:
    """An OBJ (with .mtl and texture) or GLB as a TexturedMesh in its file's coordinates.

    Positions are welded (trimesh splits them at UV seams on load) so that rendering sees one
    connected surface and silhouettes only at its real boundary.
    """
    try:
        loaded = trimesh.load(path, force="mesh", process=False)
    except Exception as exc:  # trimesh raises many types for unreadable files
        raise PipelineError(f"cannot read the mesh {path}: {exc}") from None
    image = getattr(getattr(loaded.visual, "material", None), "image", None)
    if getattr(loaded.visual, "uv", None) is None or image is None:
        raise PipelineError(f"{path} has no texture coordinates or texture image")
    uvs = np.asarray(loaded.visual.uv, dtype=np.float32).copy()
    uvs[:, 1] = 1.0 - uvs[:, 1]  # trimesh gives v = 0 at the image bottom; ours is row 0 at the top
    faces_uv = np.asarray(loaded.faces, dtype=np.int32)
    positions, weld = np.unique(np.asarray(loaded.vertices, dtype=np.float32), axis=0, return_inverse=True)
    faces = weld.reshape(-1)[faces_uv].astype(np.int32)
    texture = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return TexturedMesh(positions, faces, uvs, faces_uv, texture)


def orbit_cameras(
    count: int,
    size: int,
    center: np.ndarray,  # [3]
    distance: float,
    fov_degrees: float = 40.0,
    up: np.ndarray = np.array([0.0, 1.0, 0.0]),
    min_elevation: float = -0.35,  # sin of the lowest elevation (views from slightly below)
) -> Cameras:
    """``count`` square cameras spread evenly over a sphere cap (Fibonacci spiral) looking at ``center``."""
    up = up / np.linalg.norm(up)
    index = np.arange(count) + 0.5
    height = 1 - (1 - min_elevation) * index / count  # from near the top down to min_elevation
    azimuth = np.pi * (1 + 5**0.5) * index
    side = np.cross(up, [1.0, 0.0, 0.0] if abs(up[0]) < 0.9 else [0.0, 0.0, 1.0])
    side /= np.linalg.norm(side)
    other = np.cross(up, side)
    ring = np.sqrt(1 - height**2)
    dirs = (ring * np.cos(azimuth))[:, None] * side + (ring * np.sin(azimuth))[:, None] * other + height[:, None] * up
    focal = 0.5 * size / np.tan(np.radians(fov_degrees) / 2)
    k = np.array([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1.0]])
    w2c = np.stack([look_at(center + distance * d, center, up) for d in dirs])
    return Cameras(np.repeat(k[None], count, 0), w2c, np.full((count, 2), size))


def render_capture(mesh: TexturedMesh, cameras: Cameras, rasterizer: Rasterizer) -> Capture:
    """Photos of ``mesh`` over white with exact masks, one per camera (all cameras the same size)."""
    size = tuple(int(s) for s in cameras.sizes[0])
    images, alpha = render_views(mesh, cameras, size, rasterizer, background=1.0)
    return Capture(images.astype(np.float32), alpha.astype(np.float32), cameras,
                   [f"view_{i:03d}" for i in range(len(cameras))], source="synthetic")
