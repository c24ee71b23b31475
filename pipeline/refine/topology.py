"""A first geometry pass whose surface can change topology: DMTet on a regular grid.

The surface is the zero level set of a signed distance function stored at the vertices of a regular
grid over the normalised cube [-1, 1]^3 (``resolution`` cells per side, (R + 1)^3 vertices), each
vertex also carrying a small learnable offset. Every cube is split into six tetrahedra along its
main diagonal (the Kuhn / Freudenthal split: one tetrahedron per path 000 -> 111 along the three
axes in some order). The same split in every cube makes neighbouring cubes share their face
diagonals, so the tetrahedra form a conforming mesh and marching tetrahedra over it gives a closed,
manifold surface: one vertex per sign-changing grid edge, at the linear zero crossing, shared by
every tetrahedron around that edge.

Sign convention: ``sdf < 0`` inside the object, ``sdf >= 0`` outside, in scene units (the opposite
of the hull field's "inside > 0.5"). Faces are oriented counter-clockwise seen from outside
(normals point from negative to positive SDF), as `pipeline.hull.hull_mesh`'s.

`fit_topology` optimises the SDF, the offsets and a coarse colour volume through the renderer
against the photos (see its docstring for the losses), starting from the visual hull, and returns
the extracted mesh for the surface refinement that follows.
"""

from __future__ import annotations

import itertools
import time
from typing import Callable, Generator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import Tensor

from ..cameras import Cameras, to_clip
from ..config import RefineConfig
from ..errors import PipelineError
from ..events import Metrics, Progress
from ..mesh import clip_range, render_resolution
from ..render import Rasterizer

STAGE = "refine"

# Local edges of a tetrahedron (pairs of its corners 0..3).
_TET_EDGES = np.array([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
# The Kuhn split: tetrahedron p has corners 000, e_a, e_a + e_b, 111 for the p-th axis order (a, b, c).
_TET_CORNERS = np.array([
    np.cumsum(np.concatenate([np.zeros((1, 3), int), np.eye(3, dtype=int)[list(order)]]), axis=0)
    for order in itertools.permutations(range(3))
])  # [6, 4, 3] corner offsets (0/1 per axis) within the cube
# The seven grid-edge directions the split uses: the axes, the face diagonals, the main diagonal.
_GRID_EDGE_DIRECTIONS = np.unique(np.concatenate([
    _TET_CORNERS[:, b] - _TET_CORNERS[:, a] for a, b in _TET_EDGES]), axis=0)  # [7, 3], all components >= 0


def _triangle_table() -> np.ndarray:  # [6, 16, 2, 3] local edge indices per (tetrahedron, case), -1 = none
    """Triangles of marching tetrahedra for each of the six tetrahedra and 16 inside/outside cases.

    Case bit k = corner k is inside. One inside (or one outside) corner gives the triangle of its three
    edges; two give the quad of the four crossing edges, as two triangles. Each triangle is oriented
    on the canonical (offset-free) cube so that its normal points from the inside corners to the
    outside ones; the orientation is combinatorial (it does not change while the crossing points
    slide along their edges), so it holds for every SDF and every non-inverting offset.
    """
    edge_of = {tuple(sorted(e)): i for i, e in enumerate(_TET_EDGES.tolist())}
    table = np.full((6, 16, 2, 3), -1, dtype=np.int64)
    for tet, case in itertools.product(range(6), range(1, 15)):
        inside = [k for k in range(4) if case >> k & 1]
        outside = [k for k in range(4) if not case >> k & 1]
        if len(inside) in (1, 3):
            lone, others = (inside[0], outside) if len(inside) == 1 else (outside[0], inside)
            triangles = [[edge_of[tuple(sorted((lone, o)))] for o in others]]
        else:
            (a, b), (c, d) = inside, outside
            ac, ad, bd, bc = (edge_of[tuple(sorted(p))] for p in ((a, c), (a, d), (b, d), (b, c)))
            triangles = [[ac, ad, bd], [ac, bd, bc]]  # the quad ac-ad-bd-bc, a cycle around the tetrahedron
        corners = _TET_CORNERS[tet].astype(np.float64)
        direction = corners[outside].mean(0) - corners[inside].mean(0)
        for slot, tri in enumerate(triangles):
            mid = corners[_TET_EDGES[tri]].mean(1)  # [3, 3] edge midpoints
            if np.dot(np.cross(mid[1] - mid[0], mid[2] - mid[0]), direction) < 0:
                tri = [tri[0], tri[2], tri[1]]
            table[tet, case, slot] = tri
    return table


_TRIANGLES = _triangle_table()


class TetGrid:
    """The (R + 1)^3 vertices of a regular grid over [-1, 1]^3 and marching tetrahedra over its
    Kuhn split (module docstring). Vertex n = (i, j, k) sits at -1 + (i, j, k) * 2 / R with
    n = (i (R + 1) + j) (R + 1) + k; i runs along x."""

    def __init__(self, resolution: int, device: torch.device | str = "cpu", max_offset: float = 0.3):
        if resolution < 2:
            raise PipelineError(f"the topology grid needs at least 2 cells per side, got {resolution}")
        self.resolution = resolution
        self.device = torch.device(device)
        self.cell = 2.0 / resolution
        self.max_offset = max_offset  # vertex offsets stay within this fraction of a cell per axis
        side = resolution + 1
        axis = torch.linspace(-1.0, 1.0, side, device=self.device)
        self.base = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)  # [N, 3]
        ijk = torch.arange(side, device=self.device)
        on_side = (ijk == 0) | (ijk == resolution)
        self.boundary = (on_side[:, None, None] | on_side[None, :, None] | on_side[None, None, :]).reshape(-1)  # [N]
        strides = np.array([side * side, side, 1])
        self._corner_offsets = torch.from_numpy(_TET_CORNERS @ strides).to(self.device)  # [6, 4]
        self._triangles = torch.from_numpy(_TRIANGLES).to(self.device)
        self._edges = torch.from_numpy(_TET_EDGES).to(self.device)

    @property
    def num_vertices(self) -> int:
        return (self.resolution + 1) ** 3

    def positions(self, offsets: Tensor) -> Tensor:  # [N, 3] -> [N, 3], differentiable w.r.t. offsets
        """Grid vertex positions: the regular grid moved by ``max_offset`` cells x tanh(offsets)."""
        return self.base + (self.max_offset * self.cell) * torch.tanh(offsets)

    def extract(
        self,
        sdf: Tensor,  # [N] signed distance at the grid vertices (< 0 inside)
        offsets: Optional[Tensor] = None,  # [N, 3] raw offsets (see `positions`), or None for the regular grid
    ) -> Tuple[Tensor, Tensor]:  # vertices [S, 3] float32, faces [F, 3] int64
        """Marching tetrahedra: the zero level set as a triangle mesh, outward (CCW from outside).

        One vertex per sign-changing grid edge (a, b) at the linear zero crossing
        (p_a sdf_b - p_b sdf_a) / (sdf_b - sdf_a): differentiable w.r.t. ``sdf`` and ``offsets``.
        Closed and manifold when every boundary vertex of the grid is outside (``sdf >= 0``);
        vertices exactly at 0 count as outside. Vectorised: no loop over cubes or tetrahedra.
        """
        n, res = self.num_vertices, self.resolution
        if sdf.shape != (n,):
            raise ValueError(f"sdf must be [{n}] for a grid of {res} cells, got {list(sdf.shape)}")
        points = self.base if offsets is None else self.positions(offsets)
        inside = (sdf < 0).view(res + 1, res + 1, res + 1)
        with torch.no_grad():
            # Each tetrahedron's case from slices of the inside grid: no index arrays over all cubes.
            cases = torch.stack([
                sum(inside[i:i + res, j:j + res, k:k + res].to(torch.uint8) << bit
                    for bit, (i, j, k) in enumerate(_TET_CORNERS[tet].tolist()))
                for tet in range(6)
            ]).view(6, -1)  # [6, R^3]
            tet, cube = torch.nonzero((cases > 0) & (cases < 15), as_tuple=True)  # crossing tetrahedra [M]
            i, rest = cube // (res * res), cube % (res * res)
            first = (i * (res + 1) + rest // res) * (res + 1) + rest % res  # grid vertex of the cube's corner 000
            corners = first[:, None] + self._corner_offsets[tet]  # [M, 4] grid vertices
            local = self._triangles[tet, cases[tet, cube].long()]  # [M, 2, 3] local edges
            owner, slot = torch.nonzero(local[:, :, 0] >= 0, as_tuple=True)  # triangle -> tetrahedron, slot [T]
            ends = corners[owner].gather(1, self._edges[local[owner, slot]].view(-1, 6)).view(-1, 3, 2)  # [T, 3, 2]
            keys = ends.amin(-1) * n + ends.amax(-1)  # [T, 3] one id per undirected grid edge
            edge_keys, faces = torch.unique(keys.view(-1), return_inverse=True)
            a, b = edge_keys // n, edge_keys % n
        sa, sb = sdf[a][:, None], sdf[b][:, None]
        vertices = (points[a] * sb - points[b] * sa) / (sb - sa)
        return vertices, faces.view(-1, 3)

    def sign_change_loss(self, sdf: Tensor) -> Tensor:  # [N] -> scalar
        """nvdiffrec's SDF regulariser: binary cross-entropy between each end of every sign-changing
        grid edge and the other end's side, on the SDF in cells (so it does not depend on R). It
        discourages sign changes the images do not ask for (floaters, noise inside)."""
        side = self.resolution + 1
        grid = (sdf / self.cell).view(side, side, side)
        total, count = sdf.new_zeros(()), 0
        for di, dj, dk in _GRID_EDGE_DIRECTIONS.tolist():
            a = grid[:side - di, :side - dj, :side - dk].reshape(-1)
            b = grid[di:, dj:, dk:].reshape(-1)
            crossing = (a > 0) != (b > 0)
            a, b = a[crossing], b[crossing]
            total = total + (F.binary_cross_entropy_with_logits(a, (b > 0).float(), reduction="sum")
                             + F.binary_cross_entropy_with_logits(b, (a > 0).float(), reduction="sum"))
            count += 2 * len(a)
        return total / max(count, 1)


def sdf_from_hull(
    field: np.ndarray,  # [Rh, Rh, Rh] hull field on voxel centres of [-1, 1]^3, inside > 0.5
    resolution: int,  # cells of the tetrahedral grid
    truncation: float = 3.0,  # in grid cells
) -> np.ndarray:  # [(R + 1)^3] float32 SDF at the grid vertices, < 0 inside, scene units
    """Signed distance to the surface of ``field > 0.5`` (Euclidean distance transforms, the surface
    half-way between the last voxel centre inside and the first outside), sampled trilinearly at the
    grid vertices and truncated to +-``truncation`` cells: the optimisation only needs the sign and
    the values near the surface, and a truncated SDF lets the surface move through the interior
    (into concavities the hull filled) within a few steps per cell."""
    field = np.asarray(field, dtype=np.float32)
    if field.ndim != 3 or len(set(field.shape)) != 1:
        raise PipelineError(f"the hull field must be a cube [R, R, R], got {field.shape}")
    inside = field > 0.5
    if not inside.any():
        raise PipelineError("the visual hull is empty: nothing to start the topology pass from")
    voxel = 2.0 / field.shape[0]
    sdf = (np.where(inside, 0.0, ndimage.distance_transform_edt(~inside) - 0.5)
           - np.where(inside, ndimage.distance_transform_edt(inside) - 0.5, 0.0)) * voxel
    axis = (np.linspace(-1.0, 1.0, resolution + 1) + 1.0) / voxel - 0.5  # grid vertex -> voxel index
    coords = np.stack(np.meshgrid(axis, axis, axis, indexing="ij")).reshape(3, -1)
    values = ndimage.map_coordinates(sdf, coords, order=1, mode="nearest")
    cell = 2.0 / resolution
    return np.clip(values, -truncation * cell, truncation * cell).astype(np.float32)


def fit_topology(
    hull_field: np.ndarray,  # [Rh, Rh, Rh] from carve_visual_hull (or any field, inside > 0.5)
    cameras: Cameras,  # normalised frame, one per photo
    images: np.ndarray,  # [N, H, W, 3] float32 in [0, 1]
    masks: np.ndarray,  # [N, H, W] float32 in [0, 1]
    config: RefineConfig,
    rasterizer: Rasterizer,
    cancel: Optional[Callable[[], bool]] = None,
) -> Generator[object, None, Tuple[np.ndarray, np.ndarray]]:
    """Fit a DMTet surface to the photos, starting from the visual hull; its topology may change.

    Parameters: the SDF and offsets of a `TetGrid` of ``config.topology_grid_resolution`` cells, and
    a colour volume (``topology_color_resolution``^3 RGB, sampled trilinearly at the surface
    vertices, since the vertex set changes every step). Losses, per step over
    ``topology_views_per_step`` photos at ``topology_render_resolution``:

    - mask: MSE of the antialiased coverage against the masks (silhouette gradients);
    - photometric: L1 of the render (colour volume, random background) against the photos;
    - cross-view consistency (``topology_consistency_weight``): each covered pixel's surface point
      is projected into the two photos whose cameras are nearest in direction, the photo is sampled
      there (differentiable w.r.t. the point, hence the surface) where the point is not hidden
      (depth test against that view's render) and compared with this pixel's photo colour; this
      is what pulls the surface into concavities no silhouette shows;
    - free space (``topology_free_space_weight``): grid vertices that project onto confident
      background (mask < 0.05) in any view that sees them are pushed outside (this re-carves what
      a coarse hull closed, e.g. a handle's hole);
    - nvdiffrec's sign-change regulariser, ``topology_sdf_weight`` decaying to 5% of it over the
      first quarter of the steps.

    Yields Progress (fraction of this pass) and, at the end, Metrics (ms per step, faces, Euler
    characteristic); polls ``cancel`` every step (raises `Cancelled`). Returns the extracted mesh:
    vertices [V, 3] float32 (normalised frame), faces [F, 3] int64, closed, manifold, outward;
    connected parts smaller than 2% of the faces are dropped.
    """
    from .loop import check_cancel  # noqa: PLC0415 (loop will import this module)

    images = np.asarray(images, dtype=np.float32)
    masks = np.asarray(masks, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] != 3 or masks.shape != images.shape[:3] or len(cameras) != len(images):
        raise PipelineError(f"fit_topology needs images [N, H, W, 3] and masks [N, H, W] for {len(cameras)} cameras, "
                            f"got {images.shape} and {masks.shape}")
    device = rasterizer.device
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    grid = TetGrid(config.topology_grid_resolution, device)
    steps = config.topology_steps
    count = len(cameras)
    batch = min(config.topology_views_per_step, count)
    size = render_resolution(images.shape[1:3], config.topology_render_resolution)
    near, far = clip_range(cameras)
    clip_mats = torch.tensor(cameras.clip_matrices(size, near, far), dtype=torch.float32, device=device)
    photos = _area_resize(torch.from_numpy(images).to(device), size)  # [N, h, w, 3]
    alphas = _area_resize(torch.from_numpy(masks).to(device)[..., None], size)  # [N, h, w, 1]
    neighbours_np = _nearest_views(cameras, min(3, count - 1))  # [N, K]

    sdf = torch.from_numpy(sdf_from_hull(hull_field, grid.resolution)).to(device)
    sdf[grid.boundary] = sdf[grid.boundary].clamp(min=0.5 * grid.cell)
    sdf.requires_grad_(True)
    offsets = torch.zeros(grid.num_vertices, 3, device=device, requires_grad=True)
    cr = config.topology_color_resolution
    colors = torch.full((1, 3, cr, cr, cr), 0.5, device=device, requires_grad=True)
    background_vertices = _confident_background(grid.base, cameras, masks, device)  # [N] bool
    lr = config.topology_lr * grid.cell  # the SDF moves about topology_lr cells per step
    optimizer = torch.optim.Adam([
        {"params": [sdf], "lr": lr},
        {"params": [offsets], "lr": config.topology_lr},
        {"params": [colors], "lr": 0.05},
    ], betas=(0.9, 0.99))
    backgrounds = torch.rand(steps, batch, 1, 1, 3, generator=torch.Generator().manual_seed(config.seed)).to(device)
    last_report = -np.inf
    loop_start = time.perf_counter()
    for step in range(steps):
        check_cancel(cancel)
        t = step / max(steps, 1)
        decay = 0.1 ** t
        for group, base_lr in zip(optimizer.param_groups, (lr, config.topology_lr, 0.05)):
            group["lr"] = base_lr * decay
        vertices, faces = grid.extract(sdf, offsets)
        if len(faces) == 0:
            raise PipelineError("the topology pass lost the surface (the SDF has no zero crossing left); "
                                "lower refine.topology_lr or refine.topology_free_space_weight")
        faces32 = faces.to(torch.int32)
        views = _pair_batch(rng, neighbours_np, batch).to(device)  # [B]: (view, a near neighbour) pairs
        target_alpha = alphas[views]
        vertex_colors = _sample_volume(colors, vertices)  # [S, 3]
        clip = to_clip(vertices, clip_mats[views])  # [B, S, 4]
        rast, _ = rasterizer.rasterize(clip, faces32, size, grad_db=False)
        attrs = torch.cat([vertex_colors, vertices], 1)[None].expand(len(views), -1, -1)
        attrs, _ = rasterizer.interpolate(torch.cat([attrs, clip[..., 3:].detach()], -1).contiguous(), rast, faces32)
        covered = rast[..., 3:4] > 0
        background = backgrounds[step]
        shaded = torch.where(covered, attrs[..., :3], background)
        out = rasterizer.antialias(torch.cat([shaded, covered.float()], -1), rast, clip, faces32)
        rgb, alpha = out[..., :3], out[..., 3:4]
        target = photos[views] * target_alpha + background * (1 - target_alpha)
        sdf_weight = config.topology_sdf_weight * max(0.05, 1.0 - 0.95 * t / 0.25)
        loss = (F.l1_loss(rgb, target) + config.topology_mask_weight * F.mse_loss(alpha, target_alpha)
                + sdf_weight * grid.sign_change_loss(sdf))
        if config.topology_consistency_weight > 0 and len(views) > 1:
            depth = torch.where(covered[..., 0], attrs[..., 6], 0.0)  # [B, H, W] camera depth, 0 = empty
            loss = loss + config.topology_consistency_weight * _consistency_loss(
                attrs[..., 3:6], covered[..., 0] & (target_alpha[..., 0] > 0.5), photos[views], target_alpha,
                depth, clip_mats[views])
        if config.topology_free_space_weight > 0 and bool(background_vertices.any()):
            loss = loss + config.topology_free_space_weight * F.relu(
                0.5 * grid.cell - sdf[background_vertices]).mean() / grid.cell
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            sdf[grid.boundary] = sdf[grid.boundary].clamp(min=0.5 * grid.cell)  # keeps the surface closed
            colors.clamp_(0.0, 1.0)
        now = time.monotonic()
        if now - last_report >= config.preview_every_s or step == steps - 1:
            last_report = now
            yield Progress(STAGE, (step + 1) / max(steps, 1), f"topology step {step + 1}/{steps}")
    loop_seconds = time.perf_counter() - loop_start

    with torch.no_grad():
        vertices, faces = grid.extract(sdf, offsets)
    vertices, faces = _drop_small_parts(vertices.cpu().numpy().astype(np.float32), faces.cpu().numpy())
    if len(faces) == 0:
        raise PipelineError("the topology pass produced an empty surface; check the masks and poses, "
                            "or set refine.topology_steps to 0")
    yield Metrics(STAGE, {
        "topology_ms_per_step": 1000 * loop_seconds / max(steps, 1),
        "topology_seconds": time.perf_counter() - started,
        "topology_faces": float(len(faces)),
        "topology_euler_characteristic": float(euler_characteristic(faces)),
    })
    return vertices, faces


def euler_characteristic(faces: np.ndarray) -> int:  # [F, 3] -> V - E + F over the vertices faces use
    """V - E + F of a triangle mesh given by its faces (vertices unused by any face are not counted);
    2 - 2 genus per closed connected part."""
    faces = np.asarray(faces, dtype=np.int64)
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    return len(np.unique(faces)) - len(np.unique(edges, axis=0)) + len(faces)


def _drop_small_parts(vertices: np.ndarray, faces: np.ndarray, keep_fraction: float = 0.02):
    """Only the connected parts with at least ``keep_fraction`` of the faces, vertices re-indexed."""
    if len(faces) == 0:
        return vertices[:0], faces
    n = len(vertices)
    rows = np.repeat(faces[:, 0], 2)
    cols = faces[:, 1:].reshape(-1)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    face_label = label[faces[:, 0]]
    sizes = np.bincount(face_label)
    faces = faces[sizes[face_label] >= keep_fraction * len(faces)]
    used, faces = np.unique(faces, return_inverse=True)
    return vertices[used], faces.reshape(-1, 3).astype(np.int64)


def _sample_volume(volume: Tensor, points: Tensor) -> Tensor:  # [1, C, D, D, D], [S, 3] -> [S, C]
    """Trilinear sample of a colour volume over [-1, 1]^3 (x along the last axis, as grid_sample)."""
    out = F.grid_sample(volume, points.view(1, 1, 1, -1, 3), mode="bilinear", padding_mode="border",
                        align_corners=True)
    return out.view(volume.shape[1], -1).t()


def _consistency_loss(
    points: Tensor,  # [B, H, W, 3] surface point of each pixel (differentiable)
    valid: Tensor,  # [B, H, W] bool: covered and inside the photo's mask
    photos: Tensor,  # [B, H, W, 3] the views' photos
    alphas: Tensor,  # [B, H, W, 1] their masks
    depth: Tensor,  # [B, H, W] the views' rendered camera depth (no grad), 0 where empty
    clip_mats: Tensor,  # [B, 4, 4]
) -> Tensor:
    """Views come in pairs (0, 1), (2, 3), ...: mean L1 between each valid pixel's photo colour and
    the other photo of its pair where the pixel's surface point lands in it, over the pixels whose
    point is visible there (not behind the other view's rendered surface, inside its mask)."""
    partner = torch.arange(len(points), device=points.device) ^ 1  # 0 <-> 1, 2 <-> 3, ...
    homog = torch.cat([points, torch.ones_like(points[..., :1])], -1)  # [B, H, W, 4]
    clip = torch.einsum("bij,bhwj->bhwi", clip_mats[partner], homog)  # [B, H, W, 4] in the partner view
    w = clip[..., 3]
    xy = clip[..., :2] / w.clamp(min=1e-6)[..., None]  # [B, H, W, 2] NDC = grid_sample coordinates
    sampled = F.grid_sample(photos[partner].permute(0, 3, 1, 2), xy, mode="bilinear", padding_mode="border",
                            align_corners=False)  # [B, 3, H, W]
    with torch.no_grad():
        other_depth = depth[partner][:, None]
        surface = torch.maximum(F.grid_sample(other_depth, xy, mode="bilinear", align_corners=False),
                                F.grid_sample(other_depth, xy, mode="nearest", align_corners=False))[:, 0]
        in_mask = F.grid_sample(alphas[partner].permute(0, 3, 1, 2), xy, align_corners=False)[:, 0] > 0.5
        seen = (xy.abs() <= 1).all(-1) & (w > 0) & (surface > 0) & (w <= surface * 1.01 + 1e-4) & in_mask & valid
    error = (sampled.permute(0, 2, 3, 1) - photos).abs().mean(-1)  # [B, H, W]
    return (error * seen).sum() / seen.sum().clamp(min=1)


def _pair_batch(rng: np.random.Generator, neighbours: np.ndarray, batch: int) -> Tensor:  # [2 (batch // 2)] or [1]
    """Random distinct views, each followed by one of its nearest neighbours (pairs for the consistency term)."""
    if batch < 2:
        return torch.from_numpy(rng.choice(len(neighbours), 1))
    first = rng.choice(len(neighbours), batch // 2, replace=False)
    second = neighbours[first, rng.integers(0, neighbours.shape[1], len(first))]
    return torch.from_numpy(np.stack([first, second], 1).reshape(-1))


def _nearest_views(cameras: Cameras, k: int) -> np.ndarray:  # [N, k] int64
    """For each camera, the k others whose directions from the scene centre are closest."""
    directions = cameras.centers / np.linalg.norm(cameras.centers, axis=1, keepdims=True)
    cosine = directions @ directions.T
    np.fill_diagonal(cosine, -np.inf)
    return np.argsort(-cosine, axis=1)[:, :k].astype(np.int64)


def _confident_background(points: Tensor, cameras: Cameras, masks: np.ndarray, device: torch.device,
                          threshold: float = 0.05, chunk: int = 8) -> Tensor:  # [N] bool
    """Grid vertices that at least one view sees (in front, inside the image) on mask < threshold."""
    from ..hull import intrinsics_for_size  # noqa: PLC0415

    height, width = masks.shape[1:]
    proj = torch.tensor(intrinsics_for_size(cameras, height, width) @ cameras.world_to_camera[:, :3, :],
                        dtype=torch.float32, device=device)  # [N, 3, 4]
    mask_t = torch.from_numpy(masks).to(device)[:, None]  # [N, 1, H, W]
    homog = torch.cat([points, torch.ones_like(points[:, :1])], 1)
    scale = torch.tensor([2.0 / width, 2.0 / height], device=device)
    out = torch.zeros(len(points), dtype=torch.bool, device=device)
    for start in range(0, len(cameras), chunk):
        pix = torch.einsum("nij,pj->npi", proj[start:start + chunk], homog)  # [n, P, 3]
        depth = pix[..., 2]
        xy = pix[..., :2] / depth.clamp(min=1e-6)[..., None] * scale - 1.0  # [n, P, 2]
        seen = (xy.abs() <= 1).all(-1) & (depth > 0)
        value = F.grid_sample(mask_t[start:start + chunk], xy[:, :, None], align_corners=False)[:, 0, :, 0]
        out |= (seen & (value < threshold)).any(0)
    return out


def _area_resize(images: Tensor, size: Tuple[int, int]) -> Tensor:  # [N, H, W, C] -> [N, h, w, C]
    if tuple(images.shape[1:3]) == tuple(size):
        return images.float()
    x = F.interpolate(images.permute(0, 3, 1, 2).float(), size=size, mode="area")
    return x.permute(0, 2, 3, 1).contiguous()
