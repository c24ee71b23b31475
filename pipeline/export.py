"""Export: simplify the mesh, unwrap it (xatlas), bake its appearance into a texture, write GLB / OBJ.

Frames (docs/CONVENTIONS.md, "Exported models"):

* normalised frame: the frame the earlier stages work in (object inside [-1, 1]^3); the caller
  passes ``world_from_model`` [4, 4], the similarity from it to the input cameras' world frame.
* GLB frame: what viewers see. ``x_glb = scale * (Q x_norm - c)``: Q is the smallest rotation that
  turns the world's up direction (``up``, given in world coordinates) into +Y (glTF is Y-up), c
  centres the bounding box of the rotated mesh on the origin, ``scale`` defaults to 1, so one GLB
  unit (a "metre" to viewers) is one normalised unit and the object is about 2 units across.
  Photos carry no absolute scale, so no unit is more right than this one.
* ``world_from_model`` in the GLB scene's ``extras``: 16 floats, row-major, the similarity mapping
  GLB coordinates to the input cameras' world frame (``write_glb`` returns the same matrix, and
  ``read_world_from_model`` reads it back). The OBJ carries it as a comment line.

UV convention (ours = glTF's): u along image columns, v along image rows, (0, 0) is the top-left
corner of the texture image, whose row 0 is the top row of the PNG. This is also the convention
of ``Rasterizer.texture`` (texel (i, j) covers v in [i/h, (i+1)/h]). OBJ files store 1 - v.

Textures are float [h, w, 3] in [0, 1] holding sRGB-encoded values as in the photos; they are
written as 8-bit PNG, which glTF reads as sRGB for ``baseColorTexture``.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Union

import fast_simplification
import numpy as np
import torch
import trimesh
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree

from .errors import PipelineError
from .mesh import TexturedMesh
from .render import Rasterizer
from .uv import default_padding, unwrap

ColorFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (points [P, 3], normals [P, 3]) -> rgb [P, 3]
PathLike = Union[str, Path]

# glTF / GLB constants (glTF 2.0 specification).
_GLB_MAGIC = 0x46546C67  # "glTF"
_CHUNK_JSON = 0x4E4F534A
_CHUNK_BIN = 0x004E4942
_FLOAT, _UINT32 = 5126, 5125
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_LINEAR, _LINEAR_MIPMAP_LINEAR, _CLAMP_TO_EDGE = 9729, 9987, 33071
_UNLIT = "KHR_materials_unlit"
# The untextured model's material (linear base colour, roughness): a matte mid grey, so that a viewer's
# lighting shows the relief (lighter greys wash out under the environment light of web viewers).
SHADED_GREY = 0.25
SHADED_ROUGHNESS = 0.9


# --------------------------------------------------------------------------------------- simplify
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


# ------------------------------------------------------------------------------------------- bake
def vertex_normals(
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


def bake_texture(
    vertices: np.ndarray,  # [V, 3]
    faces: np.ndarray,  # [F, 3]
    uvs: np.ndarray,  # [V, 2] per vertex or [F, 3, 2] per corner, glTF convention
    colors_at: ColorFn,
    texture_size: int = 1024,
    *,
    border: Optional[int] = None,
    rasterizer: Optional[Rasterizer] = None,
    chunk: int = 1 << 16,
) -> np.ndarray:  # [texture_size, texture_size, 3] float32 in [0, 1]
    """Bake ``colors_at`` over the surface into a texture for the given UV layout.

    1. The mesh is rasterized in UV space (clip position (2u - 1, 2v - 1, 0, 1); the rasterizer's
       row 0 is at v = 0, the texture's first row) and the 3D position and normal of every texel
       centre inside a triangle are interpolated.
    2. Texels within ``border`` texels (default ``default_padding``) outside the charts, which
       bilinear and mip-mapped sampling read, are shaded too: at the point of the nearest chart
       texel's triangle closest to them (barycentrics clamped), i.e. conservative rasterization.
    3. ``colors_at(points [P, 3] float32, normals [P, 3] float32) -> [P, 3]`` is called in chunks
       of ``chunk`` points; non-finite colours mean "unseen".
    4. Every texel still without a colour (unseen, or in the empty space between charts) takes
       the colour of the nearest coloured texel (one exact Euclidean distance transform), so no
       black seams appear at any mip level.

    To re-bake a texture from another UV layout or another mesh, use ``colors_from_texture``.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    uvs = np.asarray(uvs, dtype=np.float64)
    size = int(texture_size)
    border = default_padding(size) if border is None else int(border)
    normals = vertex_normals(vertices, faces).astype(np.float64)
    if uvs.ndim == 3:  # per corner: one rasterizer vertex per face corner
        if uvs.shape != (len(faces), 3, 2):
            raise ValueError(f"per-corner uvs must be [{len(faces)}, 3, 2], got {uvs.shape}")
        vertices, normals = vertices[faces].reshape(-1, 3), normals[faces].reshape(-1, 3)
        uvs = uvs.reshape(-1, 2)
        faces = np.arange(3 * len(faces)).reshape(-1, 3)
    elif uvs.shape != (len(vertices), 2):
        raise ValueError(f"uvs must be [{len(vertices)}, 2] or [F, 3, 2], got {uvs.shape}")

    rasterizer = rasterizer or Rasterizer(backend="auto")
    device = rasterizer.device
    clip = np.concatenate([2 * uvs - 1, np.zeros((len(uvs), 1)), np.ones((len(uvs), 1))], axis=1)
    pos = torch.as_tensor(clip, dtype=torch.float32, device=device)[None]  # [1, V, 4]
    tri = torch.as_tensor(faces, dtype=torch.int32, device=device)
    rast, _ = rasterizer.rasterize(pos, tri, (size, size), grad_db=False)
    attr = torch.as_tensor(np.concatenate([vertices, normals], axis=1), dtype=torch.float32, device=device)
    interp, _ = rasterizer.interpolate(attr[None], rast, tri)
    interp = interp[0].cpu().numpy()  # [H, W, 6]
    tri_map = rast[0, ..., 3].cpu().numpy().astype(np.int64) - 1  # [H, W], -1 = no triangle
    covered = tri_map >= 0
    if not covered.any():
        raise PipelineError(f"the UV layout covers no texel centre of a {size} x {size} texture")

    # Border texels: barycentrics of the texel centre in the nearest chart texel's triangle.
    dist, (near_r, near_c) = ndimage.distance_transform_edt(~covered, return_indices=True)
    ring_r, ring_c = np.nonzero(~covered & (dist <= border))
    ring_tri = faces[tri_map[near_r[ring_r, ring_c], near_c[ring_r, ring_c]]]  # [R, 3]
    texel_uv = np.stack([(ring_c + 0.5) / size, (ring_r + 0.5) / size], axis=1)  # [R, 2]
    bary = np.clip(_barycentric_2d(uvs[ring_tri], texel_uv), 0.0, None)
    bary /= bary.sum(axis=1, keepdims=True)
    ring_pos = np.einsum("rk,rkc->rc", bary, vertices[ring_tri])
    ring_nrm = np.einsum("rk,rkc->rc", bary, normals[ring_tri])

    rows = np.concatenate([np.nonzero(covered)[0], ring_r])
    cols = np.concatenate([np.nonzero(covered)[1], ring_c])
    points = np.concatenate([interp[covered, :3], ring_pos]).astype(np.float32)
    point_normals = np.concatenate([interp[covered, 3:], ring_nrm])
    point_normals /= np.maximum(np.linalg.norm(point_normals, axis=1, keepdims=True), 1e-12)
    point_normals = point_normals.astype(np.float32)
    colors = np.concatenate(
        [np.asarray(colors_at(points[s : s + chunk], point_normals[s : s + chunk]), dtype=np.float32)
         for s in range(0, len(points), chunk)]
    )
    if colors.shape != (len(points), 3):
        raise ValueError(f"colors_at must return [P, 3] colours, got {colors.shape} for {len(points)} points")

    texture = np.zeros((size, size, 3), np.float32)
    valid = np.zeros((size, size), bool)
    seen = np.isfinite(colors).all(axis=1)
    texture[rows[seen], cols[seen]] = np.clip(colors[seen], 0.0, 1.0)
    valid[rows[seen], cols[seen]] = True
    if not valid.any():
        raise PipelineError("no texel of the surface has a colour (colors_at returned only non-finite values)")
    return fill_empty_texels(texture, valid)


def fill_empty_texels(
    texture: np.ndarray,  # [H, W, C]
    valid: np.ndarray,  # [H, W] bool, texels that hold a colour
) -> np.ndarray:  # [H, W, C], every texel a copy of the nearest valid one (itself if valid)
    """Fill every invalid texel with the nearest valid texel's value (Euclidean, one EDT pass)."""
    _, (rows, cols) = ndimage.distance_transform_edt(~valid, return_indices=True)
    return texture[rows, cols]


def _barycentric_2d(
    corners: np.ndarray,  # [N, 3, 2]
    points: np.ndarray,  # [N, 2]
) -> np.ndarray:  # [N, 3], may be negative outside the triangle
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    e1, e2, d = b - a, c - a, points - a
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    det = np.where(np.abs(det) > 1e-30, det, 1e-30)  # degenerate UV triangle: any finite weights
    w1 = (d[:, 0] * e2[:, 1] - d[:, 1] * e2[:, 0]) / det
    w2 = (e1[:, 0] * d[:, 1] - e1[:, 1] * d[:, 0]) / det
    return np.stack([1 - w1 - w2, w1, w2], axis=1)


def colors_from_texture(
    vertices: np.ndarray,  # [V, 3] source mesh
    faces: np.ndarray,  # [F, 3]
    uvs: np.ndarray,  # [V, 2] per vertex or [F, 3, 2] per corner, glTF convention
    texture: np.ndarray,  # [h, w, 3] float in [0, 1]
) -> ColorFn:
    """A ``colors_at`` that reads a textured source mesh: for each query point, the closest point
    on the source surface, its UV there, and a bilinear texture lookup (clamped to the edge).

    Use it to re-bake an appearance optimised on one mesh / UV layout onto the simplified,
    re-unwrapped export mesh. The normals argument is ignored. Where two sheets of the source are
    closer than the simplification error (thin parts), the nearest one may be the wrong side.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    uvs = np.asarray(uvs, dtype=np.float64)
    corner_uvs = uvs if uvs.ndim == 3 else uvs[faces]  # [F, 3, 2]
    triangles = vertices[faces]  # [F, 3, 3]
    texture = np.asarray(texture, dtype=np.float32)
    locate = _closest_triangle_finder(triangles)

    def colors_at(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
        tri_index, closest = locate(np.asarray(points, dtype=np.float64))
        bary = trimesh.triangles.points_to_barycentric(triangles[tri_index], closest)  # [P, 3]
        uv = np.einsum("pk,pkc->pc", bary, corner_uvs[tri_index])
        return _sample_bilinear(texture, uv)

    return colors_at


def _closest_triangle_finder(
    triangles: np.ndarray,  # [F, 3, 3]
    pair_budget: int = 1 << 20,
) -> Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]]:
    """Exact closest point on a triangle soup: (triangle index [P], closest point [P, 3]).

    Candidates are the k triangles with the nearest centroids. A triangle outside them has its
    centroid at least as far as the k-th one, so it is at least (that distance - the largest
    centroid-to-corner radius) away; points whose best candidate is not closer than that bound
    are retried with twice as many candidates (k = F is brute force, hence exact).
    """
    centroids = triangles.mean(axis=1)
    radius = float(np.linalg.norm(triangles - centroids[:, None], axis=2).max())
    tree = cKDTree(centroids)
    count = len(triangles)

    def locate(points: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        best_tri = np.zeros(len(points), np.int64)
        best_point = np.zeros((len(points), 3))
        pending = np.arange(len(points))
        k = min(8, count)
        while len(pending):
            step = max(1, pair_budget // k)
            unresolved = []
            for start in range(0, len(pending), step):  # bounded memory: at most pair_budget pairs
                index = pending[start : start + step]
                centroid_dist, cand = tree.query(points[index], k=k)
                centroid_dist, cand = centroid_dist.reshape(len(index), k), cand.reshape(len(index), k)
                query = np.repeat(points[index], k, axis=0)
                closest = trimesh.triangles.closest_point(triangles[cand.reshape(-1)], query).reshape(-1, k, 3)
                dist = np.linalg.norm(closest - points[index, None], axis=2)  # [p, k]
                arg = dist.argmin(axis=1)
                pick = np.arange(len(index))
                best_tri[index] = cand[pick, arg]
                best_point[index] = closest[pick, arg]
                exact = (k >= count) | (dist[pick, arg] <= centroid_dist[:, -1] - radius)
                unresolved.append(index[~exact])
            pending = np.concatenate(unresolved)
            k = min(2 * k, count)
        return best_tri, best_point

    return locate


def _sample_bilinear(
    texture: np.ndarray,  # [h, w, C]
    uv: np.ndarray,  # [P, 2] glTF convention
) -> np.ndarray:  # [P, C]
    height, width = texture.shape[:2]
    x = uv[:, 0] * width - 0.5  # texel centres at (j + 0.5) / w
    y = uv[:, 1] * height - 0.5
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    c0, c1 = np.clip(x0, 0, width - 1).astype(np.int64), np.clip(x0 + 1, 0, width - 1).astype(np.int64)
    r0, r1 = np.clip(y0, 0, height - 1).astype(np.int64), np.clip(y0 + 1, 0, height - 1).astype(np.int64)
    top = texture[r0, c0] * (1 - fx) + texture[r0, c1] * fx
    bottom = texture[r1, c0] * (1 - fx) + texture[r1, c1] * fx
    return top * (1 - fy) + bottom * fy


# ------------------------------------------------------------------------------------------ frames
def export_from_normalised(
    vertices: np.ndarray,  # [V, 3] in the normalised frame
    world_from_normalised: np.ndarray,  # [4, 4] similarity
    up: Sequence[float] = (0.0, 1.0, 0.0),
    scale: float = 1.0,
) -> np.ndarray:  # [4, 4] similarity: normalised frame -> exported (GLB / OBJ) frame
    """The exported frame: ``x = scale * (Q x_norm - c)``, world ``up`` -> +Y, bounding box centred.

    Q is the smallest rotation taking ``up`` (a world direction, expressed in the normalised frame
    through ``world_from_normalised``) to +Y; c is the centre of the rotated mesh's bounding box.
    """
    linear = np.asarray(world_from_normalised, dtype=np.float64)[:3, :3]
    if np.linalg.det(linear) <= 0:
        raise ValueError("world_from_normalised must be a similarity with positive scale (no mirroring)")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    up_local = np.linalg.solve(linear, np.asarray(up, dtype=np.float64))  # directions map by linear^-1
    norm = np.linalg.norm(up_local)
    if not norm > 0:
        raise ValueError(f"up must be a non-zero vector, got {up}")
    rotation = _rotation_between(up_local / norm, np.array([0.0, 1.0, 0.0]))
    rotated = np.asarray(vertices, dtype=np.float64) @ rotation.T
    centre = 0.5 * (rotated.min(axis=0) + rotated.max(axis=0))
    out = np.eye(4)
    out[:3, :3] = scale * rotation
    out[:3, 3] = -scale * centre
    return out


def _rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # [3, 3], R a = b for unit a, b
    cross, cos = np.cross(a, b), float(a @ b)
    if cos < -1 + 1e-9:  # opposite: half turn about any axis perpendicular to a
        axis = np.cross(a, [1.0, 0.0, 0.0] if abs(a[0]) < 0.9 else [0.0, 0.0, 1.0])
        axis /= np.linalg.norm(axis)
        return 2 * np.outer(axis, axis) - np.eye(3)
    skew = np.array([[0, -cross[2], cross[1]], [cross[2], 0, -cross[0]], [-cross[1], cross[0], 0]])
    return np.eye(3) + skew + skew @ skew / (1 + cos)


def _to_export_frame(
    vertices: np.ndarray,  # [V, 3] normalised frame
    faces: np.ndarray,  # [F, 3]
    world_from_model: np.ndarray,  # [4, 4] normalised -> world
    up: Sequence[float],
    scale: float,
    normals: Optional[np.ndarray],  # [V, 3] or None
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:  # vertices [V, 3], unit normals [V, 3], world_from_export [4, 4]
    """Vertices and normals in the exported frame, and the similarity from it back to the world."""
    vertices = np.asarray(vertices, dtype=np.float64)
    world_from_model = np.asarray(world_from_model, dtype=np.float64)
    if world_from_model.shape != (4, 4):
        raise ValueError(f"world_from_model must be [4, 4], got {world_from_model.shape}")
    normals = vertex_normals(vertices, faces) if normals is None else np.asarray(normals, dtype=np.float64)
    export_from_model = export_from_normalised(vertices, world_from_model, up=up, scale=scale)
    out_vertices = vertices @ export_from_model[:3, :3].T + export_from_model[:3, 3]
    out_normals = normals @ export_from_model[:3, :3].T  # rotation times a positive scale
    out_normals /= np.maximum(np.linalg.norm(out_normals, axis=1, keepdims=True), 1e-12)
    return out_vertices, out_normals, world_from_model @ np.linalg.inv(export_from_model)


def texture_png(texture: np.ndarray) -> bytes:  # texture [h, w, 3] float in [0, 1], row 0 = top
    texture = np.asarray(texture)
    if not np.issubdtype(texture.dtype, np.floating) or texture.ndim != 3 or texture.shape[2] != 3:
        raise ValueError(f"texture must be float [h, w, 3] in [0, 1], got {texture.dtype} {texture.shape}")
    pixels = np.round(np.clip(texture.astype(np.float64), 0.0, 1.0) * 255).astype(np.uint8)  # [h, w, 3] RGB
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# -------------------------------------------------------------------------------------------- GLB
def write_glb(
    path: PathLike,
    vertices: np.ndarray,  # [V, 3] normalised frame
    faces: np.ndarray,  # [F, 3]
    uvs: Optional[np.ndarray],  # [V, 2] glTF convention; None (with texture None): grey, untextured
    texture: Optional[np.ndarray],  # [h, w, 3] float in [0, 1], sRGB values
    world_from_model: np.ndarray,  # [4, 4] normalised frame -> input cameras' world frame
    unlit: bool = False,
    *,
    up: Sequence[float] = (0.0, 1.0, 0.0),
    scale: float = 1.0,
    normals: Optional[np.ndarray] = None,  # [V, 3]; default: vertex_normals
    double_sided: bool = False,
    png: Optional[bytes] = None,  # ``texture`` already encoded by `texture_png` (spares encoding it again)
) -> np.ndarray:  # [4, 4] world_from_model of the GLB (GLB coordinates -> world), as stored
    """Write a binary glTF 2.0 file: one mesh, positions, normals, UVs, the texture as embedded PNG.

    The vertices are moved to the GLB frame (``export_from_normalised``: ``up`` -> +Y, centred,
    ``scale``) and the similarity from GLB coordinates back to the input cameras' world frame is
    stored in the scene's ``extras`` as ``{"world_from_model": [16 floats, row-major]}``.

    Material: PBR metallic-roughness with metallic 0, roughness 1 and the texture as
    ``baseColorTexture``. With ``unlit``, also ``KHR_materials_unlit`` (listed in
    ``extensionsUsed``, not required: viewers without it fall back to the PBR material), which
    shows the texture's colours as captured instead of relighting the baked-in shading. Without
    ``uvs`` and ``texture``: the shape alone, in a uniform mid grey (`SHADED_GREY`) that a viewer
    lights, so the surface's relief shows.
    """
    faces = np.asarray(faces, dtype=np.int64)
    textured = texture is not None or png is not None
    if textured != (uvs is not None):
        raise ValueError("give both uvs and a texture, or neither (an untextured, grey model)")
    if textured:
        uvs = np.asarray(uvs, dtype=np.float64)
        if uvs.shape != (len(vertices), 2):
            raise ValueError(f"uvs must be [{len(vertices)}, 2] (per vertex), got {uvs.shape}")
    positions, normals, world_from_glb = _to_export_frame(vertices, faces, world_from_model, up, scale, normals)

    stored = positions.astype(np.float32)  # min/max must match the stored float32 values exactly
    blobs = [stored.astype("<f4").tobytes(), normals.astype("<f4").tobytes(), faces.astype("<u4").tobytes()]
    accessors = [
        {"bufferView": 0, "componentType": _FLOAT, "count": len(positions), "type": "VEC3",
         "min": stored.min(axis=0).tolist(), "max": stored.max(axis=0).tolist()},
        {"bufferView": 1, "componentType": _FLOAT, "count": len(positions), "type": "VEC3"},
        {"bufferView": 2, "componentType": _UINT32, "count": faces.size, "type": "SCALAR"},
    ]
    targets = [_ARRAY_BUFFER, _ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER]
    attributes = {"POSITION": 0, "NORMAL": 1}
    pbr = {"metallicFactor": 0.0, "roughnessFactor": 1.0}
    if textured:
        blobs += [uvs.astype("<f4").tobytes(), png if png is not None else texture_png(texture)]
        accessors.append({"bufferView": 3, "componentType": _FLOAT, "count": len(positions), "type": "VEC2"})
        targets += [_ARRAY_BUFFER, None]
        attributes["TEXCOORD_0"] = 3
        pbr["baseColorTexture"] = {"index": 0}
    else:
        pbr.update(baseColorFactor=[SHADED_GREY] * 3 + [1.0], roughnessFactor=SHADED_ROUGHNESS)
    offsets = np.concatenate([[0], np.cumsum([len(_pad4(b)) for b in blobs])]).tolist()
    binary = b"".join(_pad4(b) for b in blobs)
    views = [{"buffer": 0, "byteOffset": offset, "byteLength": len(blob), **({"target": target} if target else {})}
             for blob, offset, target in zip(blobs, offsets, targets)]
    material = {"name": "baked" if textured else "shaded", "pbrMetallicRoughness": pbr,
                "doubleSided": bool(double_sided)}
    gltf = {
        "asset": {"version": "2.0", "generator": "pipeline.export"},
        "scene": 0,
        "scenes": [{"nodes": [0], "extras": {"world_from_model": world_from_glb.reshape(-1).tolist()}}],
        "nodes": [{"mesh": 0, "name": "model"}],
        "meshes": [{"name": "model", "primitives": [{
            "attributes": attributes,
            "indices": 2,
            "material": 0,
            "mode": 4,
        }]}],
        "materials": [material],
        "accessors": accessors,
        "bufferViews": views,
        "buffers": [{"byteLength": len(binary)}],
    }
    if textured:
        gltf.update({
            "textures": [{"sampler": 0, "source": 0}],
            # Clamp: the atlas border is not periodic; trilinear so minified views do not alias.
            "samplers": [{"magFilter": _LINEAR, "minFilter": _LINEAR_MIPMAP_LINEAR,
                          "wrapS": _CLAMP_TO_EDGE, "wrapT": _CLAMP_TO_EDGE}],
            "images": [{"bufferView": 4, "mimeType": "image/png"}],
        })
    if unlit:
        material["extensions"] = {_UNLIT: {}}
        gltf["extensionsUsed"] = [_UNLIT]

    text = _pad4(json.dumps(gltf, separators=(",", ":")).encode("utf-8"), b" ")
    total = 12 + 8 + len(text) + 8 + len(binary)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<III", _GLB_MAGIC, 2, total))
        handle.write(struct.pack("<II", len(text), _CHUNK_JSON) + text)
        handle.write(struct.pack("<II", len(binary), _CHUNK_BIN) + binary)
    return world_from_glb


def _pad4(data: bytes, fill: bytes = b"\0") -> bytes:  # GLB chunks and views are 4-byte aligned
    return data + fill * (-len(data) % 4)


def read_glb_json(path: PathLike) -> dict:
    """The JSON chunk of a GLB file."""
    data = Path(path).read_bytes()
    if len(data) < 20 or struct.unpack_from("<I", data, 0)[0] != _GLB_MAGIC:
        raise PipelineError(f"{path} is not a GLB file (no 'glTF' header)")
    length, kind = struct.unpack_from("<II", data, 12)
    if kind != _CHUNK_JSON:
        raise PipelineError(f"{path}: the first GLB chunk is not JSON")
    return json.loads(data[20 : 20 + length])


def read_world_from_model(path: PathLike) -> np.ndarray:  # [4, 4]
    """The GLB -> world similarity that ``write_glb`` stored in the scene's ``extras``."""
    gltf = read_glb_json(path)
    scene = gltf.get("scenes", [{}])[gltf.get("scene", 0)]
    values = scene.get("extras", {}).get("world_from_model")
    if values is None or len(values) != 16:
        raise PipelineError(f"{path} has no scene extras 'world_from_model' (16 floats); was it written by this pipeline?")
    return np.asarray(values, dtype=np.float64).reshape(4, 4)


# -------------------------------------------------------------------------------------------- OBJ
def write_obj_zip(
    path: PathLike,
    vertices: np.ndarray,  # [V, 3] normalised frame
    faces: np.ndarray,  # [F, 3]
    uvs: np.ndarray,  # [V, 2] glTF convention
    texture: np.ndarray,  # [h, w, 3] float in [0, 1]
    world_from_model: np.ndarray,  # [4, 4] normalised frame -> input cameras' world frame
    *,
    up: Sequence[float] = (0.0, 1.0, 0.0),
    scale: float = 1.0,
    normals: Optional[np.ndarray] = None,  # [V, 3]; default: vertex_normals
    name: str = "model",
    png: Optional[bytes] = None,  # ``texture`` already encoded by `texture_png` (spares encoding it again)
) -> np.ndarray:  # [4, 4] world_from_model of the OBJ coordinates, as in the header comment
    """Write ``name``.obj, ``name``.mtl and ``name``.png into a zip archive.

    Same frame as ``write_glb`` (Y-up, centred, ``scale``); the OBJ's header has a comment
    ``# world_from_model <16 floats, row-major>``. OBJ texture coordinates have v = 0 at the
    bottom of the image, so ``vt`` = (u, 1 - v).
    """
    faces = np.asarray(faces, dtype=np.int64)
    uvs = np.asarray(uvs, dtype=np.float64)
    if uvs.shape != (len(vertices), 2):
        raise ValueError(f"uvs must be [{len(vertices)}, 2] (per vertex), got {uvs.shape}")
    positions, normals, world_from_obj = _to_export_frame(vertices, faces, world_from_model, up, scale, normals)

    obj = io.StringIO()
    obj.write("# pipeline.export: Y-up, centred; world_from_model maps these coordinates to the cameras' world\n")
    obj.write("# world_from_model " + " ".join(repr(float(x)) for x in world_from_obj.reshape(-1)) + "\n")
    obj.write(f"mtllib {name}.mtl\nusemtl baked\n")
    obj.write(_format_rows("v %.8g %.8g %.8g\n", positions))
    obj.write(_format_rows("vt %.8g %.8g\n", np.stack([uvs[:, 0], 1.0 - uvs[:, 1]], axis=1)))
    obj.write(_format_rows("vn %.6g %.6g %.6g\n", normals))
    obj.write(_format_rows("f %d/%d/%d %d/%d/%d %d/%d/%d\n", np.repeat(faces + 1, 3, axis=1)))  # v/vt/vn share indices
    # Diffuse only (Ks 0), like the GLB's metallic 0 / roughness 1.
    mtl = f"newmtl baked\nKa 0 0 0\nKd 1 1 1\nKs 0 0 0\nillum 1\nmap_Kd {name}.png\n"
    # Level 1: the OBJ text deflates 5x faster than at the default 6; the archive, mostly the PNG, grows ~5%.
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr(f"{name}.obj", obj.getvalue())
        archive.writestr(f"{name}.mtl", mtl)
        # The PNG is compressed already: stored as is.
        archive.writestr(f"{name}.png", png if png is not None else texture_png(texture), compress_type=zipfile.ZIP_STORED)
    return world_from_obj


def _format_rows(row: str, values: np.ndarray) -> str:  # one printf-style ``row`` per row of ``values`` [n, k]
    """What ``np.savetxt`` writes, in one C-level format call instead of a Python loop over rows."""
    return (row * len(values)) % tuple(values.reshape(-1).tolist())


# ------------------------------------------------------------------------------- pipeline stage
def export_textured_mesh(
    mesh: TexturedMesh,  # normalised frame
    out_dir: PathLike,
    world_from_normalised: np.ndarray,  # [4, 4]
    up: Sequence[float],  # world up direction
    target_faces: int,
    unlit: bool = False,
    name: str = "model",
    rasterizer: Optional[Rasterizer] = None,
) -> dict:  # {"glb": Path, "zip": Path, "shaded_glb": Path, "faces": int, "world_from_model": [4, 4]}
    """The export stage: simplify to ``target_faces`` (re-unwrapping and re-baking the texture
    from the refined one when that changes the mesh), then write ``name``.glb, ``name``_obj.zip and
    ``name``_shaded.glb (the same shape in grey, untextured: for viewers, to see the surface itself)."""
    out_dir = Path(out_dir)
    if len(mesh.faces) > target_faces:
        vertices, faces = simplify(mesh.vertices, mesh.faces, target_faces)
        size = mesh.texture.shape[0]
        vmapping, faces_uv, uvs = unwrap(vertices, faces, texture_size=size)
        source_uvs = mesh.uvs[mesh.faces_uv]  # [F, 3, 2] per corner of the refined mesh
        colors = colors_from_texture(mesh.vertices, mesh.faces, source_uvs, mesh.texture)
        texture = bake_texture(vertices[vmapping], faces_uv, uvs, colors, size, rasterizer=rasterizer)
        positions = vertices[vmapping]
    else:
        faces_uv, uvs, texture = mesh.faces_uv, mesh.uvs, mesh.texture
        positions = corner_positions(mesh)
    glb = out_dir / f"{name}.glb"
    archive = out_dir / f"{name}_obj.zip"
    png = texture_png(texture)
    world_from_model = write_glb(glb, positions, faces_uv, uvs, texture, world_from_normalised, unlit=unlit, up=up,
                                 png=png)
    write_obj_zip(archive, positions, faces_uv, uvs, texture, world_from_normalised, up=up, name=name, png=png)
    shaded = out_dir / f"{name}_shaded.glb"
    write_glb(shaded, positions, faces_uv, None, None, world_from_normalised, up=up)
    return {"glb": glb, "zip": archive, "shaded_glb": shaded, "faces": len(faces_uv), "world_from_model": world_from_model}


def corner_positions(mesh: TexturedMesh) -> np.ndarray:  # [Vt, 3] the position of every UV vertex
    """Positions indexed like ``mesh.uvs`` (each UV vertex belongs to exactly one position)."""
    positions = np.zeros((len(mesh.uvs), 3), dtype=np.float64)
    positions[mesh.faces_uv.reshape(-1)] = mesh.vertices[mesh.faces.reshape(-1)]
    return positions


def load_glb(path: PathLike) -> Tuple[TexturedMesh, np.ndarray]:  # (mesh in GLB coordinates, world_from_model)
    """Read a GLB written by `write_glb` (or any textured GLB plus its world_from_model extras)."""
    world_from_model = read_world_from_model(path)
    try:
        loaded = trimesh.load(path, force="mesh", process=False)
    except Exception as exc:  # trimesh raises many types for broken files
        raise PipelineError(f"cannot read {path} as a GLB ({exc}); give a .glb written by this pipeline") from None
    visual = loaded.visual
    image = getattr(getattr(visual, "material", None), "baseColorTexture", None)
    if getattr(visual, "uv", None) is None or image is None:
        raise PipelineError(f"{path} has no texture coordinates or base-colour texture")
    uv = np.asarray(visual.uv, dtype=np.float32).copy()
    uv[:, 1] = 1.0 - uv[:, 1]  # trimesh hands UVs over in the OBJ convention (v = 0 at the bottom)
    texture = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    faces = np.asarray(loaded.faces, dtype=np.int32)
    mesh = TexturedMesh(np.asarray(loaded.vertices, dtype=np.float32), faces, uv, faces.copy(), texture)
    return mesh, world_from_model


def load_glb_in_world(path: PathLike) -> TexturedMesh:
    """A GLB written by `write_glb`, with its vertices mapped back to the input cameras' world frame."""
    mesh, world_from_model = load_glb(path)
    vertices = mesh.vertices @ world_from_model[:3, :3].T + world_from_model[:3, 3]
    return TexturedMesh(vertices.astype(np.float32), mesh.faces, mesh.uvs, mesh.faces_uv, mesh.texture)
