"""The textured mesh handed between stages, and rendering it through `pipeline.render`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import fast_simplification
import numpy as np
import torch
import torch.nn.functional as F
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


def simplify(
    vertices: np.ndarray,  # [V, 3]
    faces: np.ndarray,  # [F, 3]
    target_faces: int,
) -> Tuple[np.ndarray, np.ndarray]:  # vertices [V', 3] float64, faces [F', 3] int64
    """Quadric edge-collapse decimation (fast-simplification) down to at most ``target_faces``.

    Returns the input unchanged (as float64 / int64 arrays) when it has no more faces than that.
    Faces that collapsed to a repeated vertex and vertices no face uses are dropped, so the result
    is clean for xatlas and the glTF validator.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    if target_faces < 1:
        raise ValueError(f"target_faces must be >= 1, got {target_faces}")
    if len(faces) <= target_faces:
        return vertices, faces
    vertices, faces = fast_simplification.simplify(vertices, faces, target_count=int(target_faces))
    faces = faces.astype(np.int64)
    keep = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 2] != faces[:, 0])
    faces = faces[keep]
    used, faces = np.unique(faces, return_inverse=True)
    return vertices[used], faces.reshape(-1, 3)


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
    return_rast: bool = False,
) -> Tuple[Tensor, ...]:  # rgb [B, H, W, 3], alpha [B, H, W, 1], both anti-aliased (, rast [B, H, W, 4])
    """Render the textured mesh (trilinear mip-mapped) into B views. Differentiable w.r.t. vertices and
    texture. With ``return_rast`` also the rasterizer's output (channel 3: triangle id + 1, 0 = none)."""
    clip = to_clip(vertices, clip_from_world)
    rast, rast_db = rasterizer.rasterize(clip, faces, resolution)
    uv, uv_da = rasterizer.interpolate(uvs[None], rast, faces_uv, rast_db=rast_db, diff_attrs="all")
    color = rasterizer.texture(texture, uv, uv_da, filter_mode="linear-mipmap-linear", boundary_mode="clamp")
    rgb, alpha = _composite(rasterizer, color, rast, clip, faces, background)
    return (rgb, alpha, rast) if return_rast else (rgb, alpha)


def render_colored(
    rasterizer: Rasterizer,
    vertices: Tensor,  # [V, 3]
    faces: Tensor,  # [F, 3] int32
    colors: Tensor,  # [V, 3] per-vertex colours
    clip_from_world: Tensor,  # [B, 4, 4]
    resolution: Tuple[int, int],
    background: Optional[Tensor] = None,  # [B, 1, 1, 3] or None for black
    return_rast: bool = False,
) -> Tuple[Tensor, ...]:  # rgb [B, H, W, 3], alpha [B, H, W, 1], both anti-aliased (, rast [B, H, W, 4])
    """Render the mesh with per-vertex colours. Differentiable w.r.t. vertices and colours. With
    ``return_rast`` also the rasterizer's output (channel 3: triangle id + 1, 0 = none)."""
    clip = to_clip(vertices, clip_from_world)
    rast, _ = rasterizer.rasterize(clip, faces, resolution, grad_db=False)
    color, _ = rasterizer.interpolate(colors[None], rast, faces)
    rgb, alpha = _composite(rasterizer, color, rast, clip, faces, background)
    return (rgb, alpha, rast) if return_rast else (rgb, alpha)


def render_shaded(
    rasterizer: Rasterizer,
    vertices: Tensor,  # [V, 3] float32 world positions (may require grad)
    faces: Tensor,  # [F, 3] int32
    clip_from_world: Tensor,  # [B, 4, 4] perspective matrices, as from Cameras.clip_matrices
    resolution: Tuple[int, int],
    background: Optional[Tensor] = None,  # [B, 1, 1, 3] or None for black
    *,
    albedo: float = 0.8,
    ambient: float = 0.1,
) -> Tuple[Tensor, Tensor]:  # rgb [B, H, W, 3] grey (r = g = b), alpha [B, H, W, 1], both anti-aliased
    """The geometry alone, as a lit viewer shows it: grey Lambertian surface, a head light.

    ``rgb = albedo * (ambient + (1 - ambient) * max(0, n . l))`` where ``n`` is the smooth normal (the
    area-weighted vertex normals of `smooth_vertex_normals`, interpolated and renormalised per pixel)
    and ``l`` the unit vector from the surface point to the view's camera centre (`camera_centers`),
    so surfaces facing the camera are brightest and folds show as dark creases. Normals follow the
    winding (counter-clockwise seen from outside = outward); a surface seen from its back gets only
    the ambient term. Differentiable w.r.t. vertices (shading and silhouettes).
    """
    assert vertices.dim() == 2 and vertices.shape[1] == 3, f"vertices must be [V, 3], got {tuple(vertices.shape)}"
    assert clip_from_world.dim() == 3 and clip_from_world.shape[1:] == (4, 4), "clip_from_world must be [B, 4, 4]"
    clip = to_clip(vertices, clip_from_world)
    rast, _ = rasterizer.rasterize(clip, faces, resolution, grad_db=False)
    attributes = torch.cat([smooth_vertex_normals(vertices, faces), vertices], dim=1)[None]  # [1, V, 6]
    surface, _ = rasterizer.interpolate(attributes.contiguous(), rast, faces)
    normal = F.normalize(surface[..., :3], dim=-1)
    centers = camera_centers(clip_from_world)  # [B, 3]
    light = F.normalize(centers[:, None, None, :] - surface[..., 3:], dim=-1)
    lambert = (normal * light).sum(-1, keepdim=True).clamp(min=0.0)  # [B, H, W, 1]
    grey = (albedo * (ambient + (1.0 - ambient) * lambert)).expand(-1, -1, -1, 3)
    return _composite(rasterizer, grey, rast, clip, faces, background)


def warm_up(rasterizer: Rasterizer) -> None:
    """Run `render_textured`, `render_colored` and `render_shaded` forward and backward once on a
    small mesh, so that a backend that compiles its kernels on first use (triton) does it now and not
    on a job's clock. Costs milliseconds when the kernels are cached or the backend compiles nothing."""
    device = rasterizer.device
    vertices = torch.tensor([[0.0, 0.0, 0.5], [0.5, 0.0, -0.3], [-0.5, 0.3, -0.3], [0.0, -0.5, -0.3]],
                            device=device, requires_grad=True)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3], [0, 3, 1], [1, 3, 2]], dtype=torch.int32, device=device)
    uvs = torch.tensor([[0.1, 0.1], [0.9, 0.1], [0.5, 0.9], [0.9, 0.9]], device=device)
    texture = torch.full((1, 16, 16, 3), 0.5, device=device, requires_grad=True)
    colors = torch.full((4, 3), 0.5, device=device, requires_grad=True)
    clip_from_world = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0],
                                    [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 2.0]], device=device)[None]
    textured, _ = render_textured(rasterizer, vertices, faces, uvs, faces, texture, clip_from_world, (32, 32))
    colored, _ = render_colored(rasterizer, vertices, faces, colors, clip_from_world, (32, 32))
    shaded, _ = render_shaded(rasterizer, vertices, faces, clip_from_world, (32, 32))
    (textured.sum() + colored.sum() + shaded.sum()).backward()


def smooth_vertex_normals(
    vertices: Tensor,  # [V, 3]
    faces: Tensor,  # [F, 3] int32 or int64
) -> Tensor:  # [V, 3] unit length (zero for vertices of no or only degenerate faces)
    """Area-weighted vertex normals, shared by vertices at exactly the same position (UV-seam copies),
    as `export.vertex_normals` writes them into the GLB. Differentiable w.r.t. vertices."""
    _, weld = torch.unique(vertices.detach(), dim=0, return_inverse=True)  # [V] welded index
    corners = faces.long()
    tri = vertices[corners]  # [F, 3, 3]
    face_normal = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=1)  # length = 2 * area
    sums = torch.zeros(len(vertices), 3, dtype=vertices.dtype, device=vertices.device)
    sums = sums.index_add(0, weld[corners].reshape(-1), face_normal.repeat_interleave(3, dim=0))
    return F.normalize(sums[weld], dim=1)


def faces_seen_from_behind(
    vertices: Tensor,  # [V, 3]
    faces: Tensor,  # [F, 3], counter-clockwise seen from outside
    centers: Tensor,  # [B, 3] camera centres
    grazing: float = 0.02,
) -> Tensor:  # [B, F] bool: the face's outward side points away from that camera
    """Whether each camera sees each face's back: the camera behind the face's plane by more than
    ``grazing`` times its distance to the mesh (faces seen edge-on, whose sign rounding decides, count
    as front). One [B, 3] x [3, F] product: this runs at every refinement step."""
    corners = vertices.detach()[faces.long()]  # [F, 3, 3]
    normals = torch.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], dim=1)  # [F, 3]
    offsets = (normals * corners[:, 0]).sum(1)  # [F]: the plane n . x = offset
    distances = (centers - vertices.detach().mean(0)).norm(dim=1, keepdim=True)  # [B, 1]
    return centers @ normals.T - offsets < -grazing * distances * normals.norm(dim=1)


def pixels_seen_from_behind(
    vertices: Tensor,  # [V, 3]
    faces: Tensor,  # [F, 3], counter-clockwise seen from outside
    rast: Tensor,  # [B, H, W, 4] rasterizer output of these faces (channel 3: triangle id + 1, 0 = none)
    centers: Tensor,  # [B, 3] the views' camera centres
) -> Tuple[Tensor, Tensor, Tensor]:  # triangle [B, H W] (0 where none), behind [B, H W] bool, hit [B, H W] bool
    """Per pixel: its triangle, whether the view sees that triangle's back (`faces_seen_from_behind`),
    and whether it shows the mesh at all. No host sync (no compaction)."""
    triangle = rast[..., 3].long().flatten(1) - 1  # -1 = background
    hit = triangle >= 0
    triangle = triangle.clamp(min=0)
    behind = torch.gather(faces_seen_from_behind(vertices, faces, centers), 1, triangle) & hit
    return triangle, behind, hit


def camera_centers(clip_from_world: Tensor) -> Tensor:  # [B, 4, 4] perspective -> [B, 3] world positions
    """Camera centres of perspective clip matrices: the world point mapped to clip (0, 0, 1, 0), i.e. clip
    w = 0 (camera depth 0) on the optical axis, dehomogenised (computed in float64)."""
    axis = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64, device=clip_from_world.device)
    homogeneous = torch.linalg.solve(clip_from_world.double(), axis.expand(len(clip_from_world), 4))  # [B, 4]
    return (homogeneous[:, :3] / homogeneous[:, 3:]).to(clip_from_world.dtype)


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
