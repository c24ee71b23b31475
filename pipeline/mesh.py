"""The textured mesh handed between stages, and rendering it through `pipeline.render`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .cameras import Cameras, to_clip
from .render import Rasterizer


@dataclass
class TexturedMesh:
    """A triangle mesh with a UV texture atlas, in the normalised scene frame.

    Positions and UVs have separate index buffers (UV seams split UV vertices, not positions):
    face k has corners ``vertices[faces[k]]`` and texture coordinates ``uvs[faces_uv[k]]``.
    UV convention: u along the texture's width, v along its height with v = 0 at row 0 of
    ``texture`` (the glTF convention; OBJ files store 1 - v).
    """

    vertices: np.ndarray  # [V, 3] float32
    faces: np.ndarray  # [F, 3] int32
    uvs: np.ndarray  # [Vt, 2] float32 in [0, 1]
    faces_uv: np.ndarray  # [F, 3] int32
    texture: np.ndarray  # [T, T, 3] float32 in [0, 1]


def welded_vertex_normals(
    vertices: np.ndarray,  # [V, 3]
    faces: np.ndarray,  # [F, 3]
) -> np.ndarray:  # [V, 3] float32, unit length
    """Area-weighted vertex normals, shared by vertices at the same position.

    Vertices that xatlas split along a seam sit at exactly the same position; averaging over all
    of them keeps the shading continuous across UV seams. Vertices of no (or only degenerate)
    faces get +Y, so every normal is unit length (the glTF validator requires it).
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    _, weld = np.unique(vertices, axis=0, return_inverse=True)  # [V] welded index
    weld = weld.reshape(-1)
    tri = vertices[faces]  # [F, 3, 3]
    face_normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = 2 * area
    sums = np.zeros((weld.max() + 1, 3))
    np.add.at(sums, weld[faces].reshape(-1), np.repeat(face_normal, 3, axis=0))
    normals = sums[weld]
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = np.where(length > 1e-20, normals / np.maximum(length, 1e-20), [0.0, 1.0, 0.0])
    return normals.astype(np.float32)


def clip_range(cameras: Cameras, center: np.ndarray = np.zeros(3), radius: float = np.sqrt(3.0)) -> Tuple[float, float]:
    """Near/far planes that keep a sphere (default: the normalised scene's cube) inside the depth range."""
    dist = np.linalg.norm(cameras.centers - center, axis=1)
    near = max(float(dist.min()) - 1.05 * radius, 0.02 * float(dist.min()), 1e-4)
    far = float(dist.max()) + 1.05 * radius
    return near, far


def render_resolution(image_hw: Tuple[int, int], longer_side: int) -> Tuple[int, int]:
    """(H, W) with the photo's aspect ratio and the longer side at most ``longer_side``."""
    h, w = image_hw
    scale = min(1.0, longer_side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def render_textured(
    rasterizer: Rasterizer,
    vertices: Tensor,  # [V, 3] normalised-frame positions (may require grad)
    faces: Tensor,  # [F, 3] int32
    uvs: Tensor,  # [Vt, 2]
    faces_uv: Tensor,  # [F, 3] int32
    texture: Tensor,  # [1, T, T, 3]
    clip_from_world: Tensor,  # [B, 4, 4]
    resolution: Tuple[int, int],
    background: Optional[Tensor] = None,  # [B, 1, 1, 3] or None for black
) -> Tuple[Tensor, Tensor]:  # rgb [B, H, W, 3], alpha [B, H, W, 1], both anti-aliased
    """Render the textured mesh (trilinear mip-mapped) into B views. Differentiable w.r.t. vertices and texture."""
    clip = to_clip(vertices, clip_from_world)
    rast, rast_db = rasterizer.rasterize(clip, faces, resolution)
    uv, uv_da = rasterizer.interpolate(uvs[None], rast, faces_uv, rast_db=rast_db, diff_attrs="all")
    color = rasterizer.texture(texture, uv, uv_da, filter_mode="linear-mipmap-linear", boundary_mode="clamp")
    return _composite(rasterizer, color, rast, clip, faces, background)


def render_colored(
    rasterizer: Rasterizer,
    vertices: Tensor,  # [V, 3]
    faces: Tensor,  # [F, 3] int32
    colors: Tensor,  # [V, 3] per-vertex colours
    clip_from_world: Tensor,  # [B, 4, 4]
    resolution: Tuple[int, int],
    background: Optional[Tensor] = None,  # [B, 1, 1, 3] or None for black
) -> Tuple[Tensor, Tensor]:  # rgb [B, H, W, 3], alpha [B, H, W, 1], both anti-aliased
    """Render the mesh with per-vertex colours. Differentiable w.r.t. vertices and colours."""
    clip = to_clip(vertices, clip_from_world)
    rast, _ = rasterizer.rasterize(clip, faces, resolution, grad_db=False)
    color, _ = rasterizer.interpolate(colors[None], rast, faces)
    return _composite(rasterizer, color, rast, clip, faces, background)


def _composite(rasterizer, color, rast, clip, faces, background):
    """Put the shaded surface over the background and anti-alias silhouettes (colour and coverage)."""
    covered = rast[..., 3:4] > 0
    color = torch.where(covered, color, 0.0 if background is None else background)
    out = rasterizer.antialias(torch.cat([color, covered.to(color.dtype)], dim=-1), rast, clip, faces)
    return out[..., :3], out[..., 3:4]


def render_depth(
    rasterizer: Rasterizer,
    vertices: Tensor,  # [V, 3]
    faces: Tensor,  # [F, 3] int32
    clip_from_world: Tensor,  # [B, 4, 4]
    resolution: Tuple[int, int],
) -> Tensor:  # [B, H, W] camera-space depth (clip w), 0 where empty
    clip = to_clip(vertices, clip_from_world)
    rast, _ = rasterizer.rasterize(clip, faces, resolution, grad_db=False)
    depth, _ = rasterizer.interpolate(clip[..., 3:4].contiguous(), rast, faces)
    return depth[..., 0]
