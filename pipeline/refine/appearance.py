"""Appearance: colours from the photos projected onto the surface, and baking any colour
function into a UV texture atlas (used by the refinement and by the export's re-bake)."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from scipy import ndimage
from scipy.spatial import cKDTree
from torch import Tensor

from ..errors import PipelineError
from ..mesh import TexturedMesh, render_depth, welded_vertex_normals
from ..render import Rasterizer
from ..uv import default_padding

ColorFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (points [P, 3], normals [P, 3]) -> rgb [P, 3]


class PhotoProjector:
    """Colours surface points from the photos: each point averages the views that see it (depth-tested
    against the surface), weighted by the squared cosine of the viewing angle so grazing views count
    little. The views' depth maps are rendered once, at construction."""

    @torch.no_grad()
    def __init__(
        self,
        rasterizer: Rasterizer,
        vertices: Tensor,  # [V, 3] the surface, for visibility
        faces: Tensor,  # [F, 3] int32
        photos: Tensor,  # [N, H, W, 3]
        masks: Tensor,  # [N, H, W]
        clip_from_world: Tensor,  # [N, 4, 4] for the photos' resolution
        camera_centers: Tensor,  # [N, 3]
        chunk: int = 8,
    ):
        self.photos, self.masks, self.clip_from_world, self.centers = photos, masks, clip_from_world, camera_centers
        self.chunk = chunk
        size = tuple(photos.shape[1:3])
        self.depth = torch.cat([render_depth(rasterizer, vertices, faces, clip_from_world[s:s + chunk], size)
                                for s in range(0, len(photos), chunk)])[:, None]  # [N, 1, H, W]

    @torch.no_grad()
    def __call__(
        self,
        points: Tensor,  # [P, 3]
        normals: Tensor,  # [P, 3] unit normals
    ) -> Tuple[Tensor, Tensor]:  # colours [P, 3], total weight [P] (0 = no photo sees the point)
        acc = torch.zeros(len(points), 3, device=points.device)
        wsum = torch.zeros(len(points), device=points.device)
        homog = torch.cat([points, torch.ones_like(points[:, :1])], 1)
        for start in range(0, len(self.photos), self.chunk):  # bounded memory: a few views at a time
            views = slice(start, start + self.chunk)
            clip = torch.einsum("bij,pj->bpi", self.clip_from_world[views], homog)  # [b, P, 4]
            w = clip[..., 3]
            grid = (clip[..., :2] / w.clamp(min=1e-6)[..., None])[:, :, None, :]  # [b, P, 1, 2] NDC (x, y)

            def sample(image: Tensor, mode: str = "bilinear") -> Tensor:  # [b, C, H, W] -> [b, C, P]
                return F.grid_sample(image, grid, mode=mode, align_corners=False)[..., 0]

            depth = self.depth[views]
            # Bilinear depth mixes with empty (0) pixels at silhouettes; the nearest sample does not.
            surface_depth = torch.maximum(sample(depth)[:, 0], sample(depth, "nearest")[:, 0])
            mask = sample(self.masks[views][:, None])[:, 0]
            color = sample(self.photos[views].permute(0, 3, 1, 2))  # [b, 3, P]
            to_cam = F.normalize(self.centers[views][:, None, :] - points[None], dim=-1)  # [b, P, 3]
            cosine = (to_cam * normals[None]).sum(-1)
            visible = ((grid[:, :, 0].abs() <= 1).all(-1) & (w > 0) & (surface_depth > 0)
                       & (w <= surface_depth * 1.01) & (mask > 0.5) & (cosine > 0.1))
            weight = torch.where(visible, cosine**2, torch.zeros_like(cosine))  # [b, P]
            acc += torch.einsum("bp,bcp->pc", weight, color)
            wsum += weight.sum(0)
        return acc / wsum.clamp(min=1e-8)[:, None], wsum

    def texture(
        self,
        vertices: np.ndarray,  # [V, 3]
        faces: np.ndarray,  # [F, 3]
        uvs: np.ndarray,  # [Vt, 2]
        faces_uv: np.ndarray,  # [F, 3]
        size: int,
        rasterizer: Rasterizer,
    ) -> np.ndarray:  # [size, size, 3]
        """A texture atlas baked from the photos (texels no photo sees take the nearest seen colour)."""
        device = self.photos.device

        def colors_at(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
            colors, weight = self(torch.from_numpy(points).to(device), torch.from_numpy(normals).to(device))
            colors[weight == 0] = float("nan")  # unseen: bake_texture fills these from neighbours
            return colors.cpu().numpy()

        corners = TexturedMesh(vertices, faces, uvs, faces_uv, np.zeros((1, 1, 3), np.float32))
        return bake_texture(corner_positions(corners), faces_uv, uvs, colors_at, size, rasterizer=rasterizer,
                            chunk=1 << 20)


def texture_smoothness(appearance: Tensor) -> Tensor:
    """Mean absolute difference of neighbouring texels of a [1, T, T, 3] texture (0 for vertex colours)."""
    if appearance.dim() != 4:
        return appearance.new_zeros(())
    return ((appearance[:, 1:] - appearance[:, :-1]).abs().mean()
            + (appearance[:, :, 1:] - appearance[:, :, :-1]).abs().mean())


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
       the colour of the nearest coloured texel (`nearest_texels`: jump flooding on CUDA, the
       exact Euclidean distance transform elsewhere), so no black seams appear at any mip level.

    To re-bake a texture from another UV layout or another mesh, use ``colors_from_texture``.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    uvs = np.asarray(uvs, dtype=np.float64)
    size = int(texture_size)
    border = default_padding(size) if border is None else int(border)
    normals = welded_vertex_normals(vertices, faces).astype(np.float64)
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
    # Everything per texel runs as tensors on the rasterizer's device (4M texels at 2048^2: numpy's
    # masks, gathers and the fill took most of a second of CPU there); only ``colors_at`` sees numpy.
    clip = np.concatenate([2 * uvs - 1, np.zeros((len(uvs), 1)), np.ones((len(uvs), 1))], axis=1)
    pos = torch.as_tensor(clip, dtype=torch.float32, device=device)[None]  # [1, V, 4]
    tri = torch.as_tensor(faces, dtype=torch.int32, device=device)
    rast, _ = rasterizer.rasterize(pos, tri, (size, size), grad_db=False)
    attr = torch.as_tensor(np.concatenate([vertices, normals], axis=1), dtype=torch.float32, device=device)
    interp, _ = rasterizer.interpolate(attr[None], rast, tri)
    interp = interp[0]  # [H, W, 6]
    tri_map = rast[0, ..., 3].long() - 1  # [H, W], -1 = no triangle
    covered = tri_map >= 0
    if not bool(covered.any()):
        raise PipelineError(f"the UV layout covers no texel centre of a {size} x {size} texture")

    # Border texels: barycentrics of the texel centre in the nearest chart texel's triangle.
    dist, near_r, near_c = nearest_texels(covered)
    ring_r, ring_c = torch.nonzero(~covered & (dist <= border), as_tuple=True)
    ring_tri = tri.long()[tri_map[near_r[ring_r, ring_c], near_c[ring_r, ring_c]]]  # [R, 3]
    texel_uv = torch.stack([(ring_c + 0.5) / size, (ring_r + 0.5) / size], dim=1).double()  # [R, 2]
    bary = _barycentric_2d(torch.as_tensor(uvs, device=device)[ring_tri], texel_uv).clamp(min=0.0)
    bary = bary / bary.sum(dim=1, keepdim=True)
    ring_pos = torch.einsum("rk,rkc->rc", bary, torch.as_tensor(vertices, device=device)[ring_tri])
    ring_nrm = torch.einsum("rk,rkc->rc", bary, torch.as_tensor(normals, device=device)[ring_tri])

    cov_r, cov_c = torch.nonzero(covered, as_tuple=True)
    rows, cols = torch.cat([cov_r, ring_r]), torch.cat([cov_c, ring_c])
    points = torch.cat([interp[cov_r, cov_c, :3], ring_pos.float()]).cpu().numpy()
    point_normals = F.normalize(torch.cat([interp[cov_r, cov_c, 3:].double(), ring_nrm]), dim=1, eps=1e-12)
    point_normals = point_normals.float().cpu().numpy()
    colors = np.concatenate(
        [np.asarray(colors_at(points[s : s + chunk], point_normals[s : s + chunk]), dtype=np.float32)
         for s in range(0, len(points), chunk)]
    )
    if colors.shape != (len(points), 3):
        raise ValueError(f"colors_at must return [P, 3] colours, got {colors.shape} for {len(points)} points")

    colors_t = torch.from_numpy(colors).to(device)
    seen = torch.isfinite(colors_t).all(dim=1)
    texture = torch.zeros(size, size, 3, device=device)
    valid = torch.zeros(size, size, dtype=torch.bool, device=device)
    texture[rows[seen], cols[seen]] = colors_t[seen].clamp(0.0, 1.0)
    valid[rows[seen], cols[seen]] = True
    if not bool(valid.any()):
        raise PipelineError("no texel of the surface has a colour (colors_at returned only non-finite values)")
    return fill_empty_texels(texture, valid).cpu().numpy()


def fill_empty_texels(
    texture: Tensor,  # [H, W, C]
    valid: Tensor,  # [H, W] bool on the texture's device, texels that hold a colour
) -> Tensor:  # [H, W, C], every texel a copy of the nearest valid one (itself if valid)
    """Fill every invalid texel with the nearest valid texel's value (Euclidean, `nearest_texels`)."""
    _, rows, cols = nearest_texels(valid)
    return texture[rows, cols]


def nearest_texels(
    valid: Tensor,  # [H, W] bool, at least one True
) -> Tuple[Tensor, Tensor, Tensor]:  # distance [H, W] float64, rows [H, W] int64, cols [H, W] int64, on valid's device
    """For every texel, the nearest ``valid`` texel (itself when valid) and the Euclidean distance to it,
    in texels. On CUDA by `jump_flood` (a 2048^2 atlas: 32 ms, the exact transform 411 ms,
    `bench/bake.py`); elsewhere by scipy's exact distance transform, the reference
    `tests/test_export.py` holds it to. Where two valid texels are equally near, the two paths may
    pick different ones."""
    if valid.dim() != 2 or valid.dtype != torch.bool or not bool(valid.any()):
        raise ValueError(f"nearest_texels needs a 2D bool mask with at least one valid texel, got "
                         f"{valid.dtype} of shape {tuple(valid.shape)}")
    if valid.device.type != "cuda":
        dist, (rows, cols) = ndimage.distance_transform_edt(~valid.cpu().numpy(), return_indices=True)
        return tuple(torch.from_numpy(a).to(valid.device) for a in (dist, rows.astype(np.int64), cols.astype(np.int64)))
    nearest = jump_flood(valid)
    width = valid.shape[1]
    rows, cols = nearest // width, nearest % width
    here_r, here_c = torch.meshgrid(torch.arange(valid.shape[0], device=valid.device),
                                    torch.arange(width, device=valid.device), indexing="ij")
    return ((rows - here_r).square() + (cols - here_c).square()).double().sqrt(), rows, cols


def jump_flood(
    seeds: Tensor,  # [H, W] bool, at least one True
) -> Tensor:  # [H, W] int64, flat index (row * W + col) of each texel's nearest seed (Euclidean)
    """Nearest seed of every texel by jump flooding (Rong & Tan 2006): rounds at halving steps from
    half the larger side down to 1, each looking at 8 neighbours, then the last four steps again
    (JFA with one extra pass at step 1 still left 0.1% of the texels of chart-like masks up to 2.5
    texels off; with the second sweep the test cases come out exact, which jump flooding does not
    promise in general). Any device; not differentiable."""
    height, width = seeds.shape
    index = torch.arange(height * width, device=seeds.device).view(height, width)
    here_r, here_c = index // width, index % width
    nearest = torch.where(seeds, index, -1)
    best = torch.where(seeds, 0, torch.iinfo(torch.int64).max)  # squared distance to ``nearest``
    step = 1 << (max(height, width) - 1).bit_length() - 1 if max(height, width) > 1 else 1
    steps = []
    while step >= 1:
        steps.append(step)
        step //= 2
    for step in steps + steps[-4:]:
        padded = F.pad(nearest, (step, step, step, step), value=-1)
        for dr in (-step, 0, step):
            for dc in (-step, 0, step):
                if dr == 0 and dc == 0:
                    continue
                candidate = padded[step + dr:step + dr + height, step + dc:step + dc + width]
                d = (candidate // width - here_r).square() + (candidate % width - here_c).square()
                better = (candidate >= 0) & (d < best)
                nearest = torch.where(better, candidate, nearest)
                best = torch.where(better, d, best)
    return nearest


def _barycentric_2d(
    corners: Tensor,  # [N, 3, 2]
    points: Tensor,  # [N, 2]
) -> Tensor:  # [N, 3], may be negative outside the triangle
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    e1, e2, d = b - a, c - a, points - a
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    det = torch.where(det.abs() > 1e-30, det, torch.full_like(det, 1e-30))  # degenerate UV triangle: any finite weights
    w1 = (d[:, 0] * e2[:, 1] - d[:, 1] * e2[:, 0]) / det
    w2 = (e1[:, 0] * d[:, 1] - e1[:, 1] * d[:, 0]) / det
    return torch.stack([1 - w1 - w2, w1, w2], dim=1)


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


def corner_positions(mesh: TexturedMesh) -> np.ndarray:  # [Vt, 3] the position of every UV vertex
    """Positions indexed like ``mesh.uvs`` (each UV vertex belongs to exactly one position)."""
    positions = np.zeros((len(mesh.uvs), 3), dtype=np.float64)
    positions[mesh.faces_uv.reshape(-1)] = mesh.vertices[mesh.faces.reshape(-1)]
    return positions
