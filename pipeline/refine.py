"""nvdiffrec-style refinement: vertex positions and a UV texture atlas fitted to the photos by
differentiable rendering (silhouette loss through `antialias`, photometric L1 on a random background,
a Laplacian prior on the surface and a smoothness prior on the texture).

The texture starts from the photos projected onto the mesh (visibility-tested, weighted by viewing
angle), so optimisation only has to correct it; texels no photo sees are filled from their neighbours.
"""

from __future__ import annotations

import time
from typing import Callable, Generator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from .cameras import Cameras, look_at
from .config import RefineConfig
from .events import Metrics, Preview, Progress
from .mesh import TexturedMesh, clip_range, render_depth, render_resolution, render_textured
from .render import Rasterizer

STAGE = "refine"


class Cancelled(Exception):
    """Raised inside the pipeline when the caller's cancel() returned True."""


def uniform_laplacian(faces: Tensor, num_vertices: int) -> Tensor:  # sparse [V, V]
    """L = I - D^-1 A of the mesh graph: L v is each vertex minus the mean of its neighbours."""
    f = faces.long()
    edges = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    edges = torch.cat([edges, edges.flip(1)])
    edges = torch.unique(edges, dim=0)
    deg = torch.bincount(edges[:, 0], minlength=num_vertices).clamp(min=1).to(torch.float32)
    values = -1.0 / deg[edges[:, 0]]
    diag = torch.arange(num_vertices, device=faces.device)
    index = torch.cat([edges.T, torch.stack([diag, diag])], dim=1)
    values = torch.cat([values, torch.ones(num_vertices, device=faces.device)])
    return torch.sparse_coo_tensor(index, values, (num_vertices, num_vertices), check_invariants=False).coalesce()


def texel_positions(
    rasterizer: Rasterizer,
    vertices: Tensor,  # [V, 3]
    faces: Tensor,  # [F, 3] int32
    uvs: Tensor,  # [Vt, 2]
    faces_uv: Tensor,  # [F, 3] int32
    size: int,
) -> Tuple[Tensor, Tensor, Tensor]:  # points [T, T, 3], normals [T, T, 3], covered [T, T] bool
    """The surface point and normal under each texel centre (rasterizing the mesh in UV space)."""
    uv_clip = torch.cat([uvs * 2 - 1, torch.zeros_like(uvs[:, :1]), torch.ones_like(uvs[:, :1])], dim=1)
    rast, _ = rasterizer.rasterize(uv_clip[None].contiguous(), faces_uv, (size, size), grad_db=False)
    # Position attributes indexed by UV vertex: each UV vertex takes the position of its corner.
    corner_pos = torch.zeros(len(uvs), 3, device=vertices.device)
    corner_pos[faces_uv.long().reshape(-1)] = vertices[faces.long().reshape(-1)]
    normals = vertex_normals(vertices, faces)
    corner_nrm = torch.zeros(len(uvs), 3, device=vertices.device)
    corner_nrm[faces_uv.long().reshape(-1)] = normals[faces.long().reshape(-1)]
    attrs, _ = rasterizer.interpolate(torch.cat([corner_pos, corner_nrm], 1)[None], rast, faces_uv)
    return attrs[0, ..., :3], F.normalize(attrs[0, ..., 3:], dim=-1), rast[0, ..., 3] > 0


def vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:  # [V, 3] area-weighted unit normals
    f = faces.long()
    v0, v1, v2 = vertices[f[:, 0]], vertices[f[:, 1]], vertices[f[:, 2]]
    face_n = torch.cross(v1 - v0, v2 - v0, dim=1)
    normals = torch.zeros_like(vertices).index_add_(0, f.reshape(-1), face_n.repeat_interleave(3, dim=0))
    return F.normalize(normals, dim=1)


@torch.no_grad()
def project_photos(
    rasterizer: Rasterizer,
    vertices: Tensor,  # [V, 3]
    faces: Tensor,  # [F, 3] int32
    uvs: Tensor,  # [Vt, 2]
    faces_uv: Tensor,  # [F, 3] int32
    photos: Tensor,  # [N, H, W, 3]
    masks: Tensor,  # [N, H, W]
    clip_from_world: Tensor,  # [N, 4, 4] for the photos' resolution
    camera_centers: Tensor,  # [N, 3]
    size: int,
    chunk: int = 8,
) -> Tuple[Tensor, Tensor]:  # texture [T, T, 3] (unseen texels filled), seen [T, T] bool
    """Texture atlas from the photos: each texel averages the views that see its surface point,
    weighted by the cosine of the viewing angle (squared) so grazing views count little."""
    points, normals, covered = texel_positions(rasterizer, vertices, faces, uvs, faces_uv, size)
    idx = torch.nonzero(covered.reshape(-1)).squeeze(1)
    p = points.reshape(-1, 3)[idx]  # [P, 3]
    n = normals.reshape(-1, 3)[idx]
    acc = torch.zeros(len(idx), 3, device=p.device)
    wsum = torch.zeros(len(idx), device=p.device)
    height, width = photos.shape[1:3]
    homog = torch.cat([p, torch.ones_like(p[:, :1])], 1)
    for start in range(0, len(photos), chunk):  # bounded memory: a few views at a time
        views = slice(start, start + chunk)
        depth = render_depth(rasterizer, vertices, faces, clip_from_world[views], (height, width))  # [b, H, W]
        clip = torch.einsum("bij,pj->bpi", clip_from_world[views], homog)  # [b, P, 4]
        w = clip[..., 3]
        grid = (clip[..., :2] / w.clamp(min=1e-6)[..., None])[:, :, None, :]  # [b, P, 1, 2] NDC (x, y)
        sample = lambda img: F.grid_sample(img, grid, mode="bilinear", align_corners=False)[..., 0]  # noqa: E731
        seen_depth = sample(depth[:, None])[:, 0]  # [b, P]
        nearest_depth = F.grid_sample(depth[:, None], grid, mode="nearest", align_corners=False)[:, 0, :, 0]
        mask = sample(masks[views][:, None])[:, 0]
        color = sample(photos[views].permute(0, 3, 1, 2))  # [b, 3, P]
        to_cam = F.normalize(camera_centers[views][:, None, :] - p[None], dim=-1)  # [b, P, 3]
        cosine = (to_cam * n[None]).sum(-1)
        tol = 0.01 * w
        visible = (
            (grid[:, :, 0].abs() <= 1).all(-1)
            & (w > 0)
            & (w <= torch.maximum(seen_depth, nearest_depth) + tol)
            & (nearest_depth > 0)
            & (mask > 0.5)
            & (cosine > 0.1)
        )
        weight = torch.where(visible, cosine**2, torch.zeros_like(cosine))  # [b, P]
        acc += torch.einsum("bp,bcp->pc", weight, color)
        wsum += weight.sum(0)
    texture = torch.zeros(size * size, 3, device=p.device)
    seen = torch.zeros(size * size, dtype=torch.bool, device=p.device)
    seen[idx] = wsum > 0
    texture[idx] = acc / wsum.clamp(min=1e-8)[:, None]
    texture = texture.reshape(size, size, 3)
    seen = seen.reshape(size, size)
    return fill_unseen(texture, seen), seen


def fill_unseen(texture: Tensor, seen: Tensor) -> Tensor:  # [T, T, 3]
    """Give every texel no photo saw the colour of the nearest seen texel (inpainting by
    nearest neighbour), so charts never show black and mip levels never bleed black in."""
    seen_np = seen.cpu().numpy()
    if not seen_np.any():
        return torch.full_like(texture, 0.5)
    _, (rows, cols) = ndimage.distance_transform_edt(~seen_np, return_indices=True)
    rows = torch.from_numpy(rows).to(texture.device)
    cols = torch.from_numpy(cols).to(texture.device)
    return texture[rows, cols]


def turntable_camera(cameras: Cameras, up: np.ndarray, angle: float) -> np.ndarray:  # [4, 4]
    """A world-to-camera matrix orbiting the origin around ``up`` at the photos' mean distance and elevation."""
    centers = cameras.centers
    radius = float(np.linalg.norm(centers, axis=1).mean())
    elevation = float(np.clip(np.mean(centers @ up) / radius, -0.95, 0.95))
    side = np.cross(up, [1.0, 0.0, 0.0])
    if np.linalg.norm(side) < 1e-6:
        side = np.cross(up, [0.0, 1.0, 0.0])
    side /= np.linalg.norm(side)
    other = np.cross(up, side)
    horizontal = np.cos(angle) * side + np.sin(angle) * other
    eye = radius * (np.sqrt(1 - elevation**2) * horizontal + elevation * up)
    return look_at(eye, np.zeros(3), up)


def refine(
    mesh: TexturedMesh,
    cameras: Cameras,  # normalised frame, one per photo
    images: np.ndarray,  # [N, H, W, 3] float32
    masks: np.ndarray,  # [N, H, W] float32
    up: np.ndarray,  # [3] world up in the normalised frame (for the turntable preview)
    config: RefineConfig,
    rasterizer: Rasterizer,
    cancel: Optional[Callable[[], bool]] = None,
) -> Generator[object, None, TexturedMesh]:
    """Optimise ``mesh`` (vertices and texture; topology fixed) against the photos.

    Yields Progress / Preview / Metrics events; returns the refined TexturedMesh.
    """
    device = rasterizer.device
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    height, width = render_resolution(images.shape[1:3], config.render_resolution)
    near, far = clip_range(cameras)
    clip_mats = torch.tensor(cameras.clip_matrices((height, width), near, far), dtype=torch.float32, device=device)
    photos = _resize(torch.from_numpy(images).to(device), (height, width))  # [N, h, w, 3]
    alphas = _resize(torch.from_numpy(masks).to(device)[..., None], (height, width))  # [N, h, w, 1]

    faces = torch.from_numpy(mesh.faces).to(device=device, dtype=torch.int32)
    faces_uv = torch.from_numpy(mesh.faces_uv).to(device=device, dtype=torch.int32)
    uvs = torch.from_numpy(mesh.uvs).to(device=device, dtype=torch.float32)
    vertices = torch.from_numpy(mesh.vertices).to(device=device, dtype=torch.float32).requires_grad_(True)
    texture = torch.from_numpy(mesh.texture).to(device=device, dtype=torch.float32)[None].requires_grad_(True)
    laplacian = uniform_laplacian(faces, len(vertices))

    optimizer = torch.optim.Adam(
        [{"params": [vertices], "lr": config.geometry_lr}, {"params": [texture], "lr": config.texture_lr}],
        betas=(0.9, 0.99),
    )
    # Learning rates decay to 10% by the end, as nvdiffrec's exponential schedule does.
    decay = 0.1 ** (1.0 / max(config.iterations, 1))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, decay)
    num_views = len(photos)
    batch = min(config.views_per_step, num_views)
    order = rng.permutation(num_views)
    cursor = 0
    preview_view = 0
    turntable_k = torch.tensor(cameras.intrinsics[:1], dtype=torch.float64)
    last_preview = -np.inf
    loss_sum = torch.zeros((), device=device)

    for step in range(config.iterations):
        if cancel is not None and cancel():
            raise Cancelled()
        if cursor + batch > num_views:
            order, cursor = rng.permutation(num_views), 0
        views = torch.from_numpy(order[cursor:cursor + batch]).to(device)
        cursor += batch

        background = torch.rand(batch, 1, 1, 3, generator=generator).to(device)
        rgb, alpha = render_textured(rasterizer, vertices, faces, uvs, faces_uv, texture, clip_mats[views],
                                     (height, width), background=background)
        target_alpha = alphas[views]
        target = photos[views] * target_alpha + background * (1 - target_alpha)
        color_loss = (rgb - target).abs().mean()
        mask_loss = ((alpha - target_alpha) ** 2).mean()
        smooth_loss = (torch.sparse.mm(laplacian, vertices) ** 2).sum(1).mean()
        tex_loss = (texture[:, 1:] - texture[:, :-1]).abs().mean() + (texture[:, :, 1:] - texture[:, :, :-1]).abs().mean()
        loss = (color_loss + config.mask_weight * mask_loss + config.smoothness * smooth_loss
                + config.texture_smoothness * tex_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            texture.clamp_(0.0, 1.0)
        loss_sum += loss.detach()

        now = time.monotonic()
        last = step == config.iterations - 1
        if now - last_preview >= config.preview_every_s or last:
            last_preview = now
            yield Progress(STAGE, (step + 1) / config.iterations, f"step {step + 1}/{config.iterations}")
            with torch.no_grad():
                angle = 2 * np.pi * step / max(config.iterations, 1)
                spin = Cameras(turntable_k, turntable_camera(cameras, up, angle)[None], cameras.sizes[:1])
                spin_mat = torch.tensor(spin.clip_matrices((height, width), near, far), dtype=torch.float32,
                                        device=device)
                mats = torch.cat([clip_mats[preview_view:preview_view + 1], spin_mat])
                shown, _ = render_textured(rasterizer, vertices, faces, uvs, faces_uv, texture, mats,
                                           (height, width), background=torch.ones(2, 1, 1, 3, device=device))
                photo = photos[preview_view] * alphas[preview_view] + (1 - alphas[preview_view])
                strip = torch.cat([shown[0], photo, shown[1]], dim=1)
                image = (strip.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            yield Preview(STAGE, image, f"step {step + 1}: render | photo | turntable")
            yield Metrics(STAGE, {"loss": float(loss_sum) / (step + 1), "step": step + 1,
                                  "color_l1": float(color_loss.detach()), "mask_mse": float(mask_loss.detach())})

    return TexturedMesh(
        vertices=vertices.detach().cpu().numpy().astype(np.float32),
        faces=mesh.faces,
        uvs=mesh.uvs,
        faces_uv=mesh.faces_uv,
        texture=texture.detach()[0].cpu().numpy(),
    )


def _resize(images: Tensor, size: Tuple[int, int]) -> Tensor:  # [N, H, W, C] -> [N, h, w, C]
    """Area-average downscale (or bilinear upscale) of channel-last images."""
    if tuple(images.shape[1:3]) == tuple(size):
        return images.float()
    x = images.permute(0, 3, 1, 2).float()
    mode = "area" if size[0] <= x.shape[2] else "bilinear"
    x = F.interpolate(x, size=size, mode=mode) if mode == "area" else F.interpolate(x, size=size, mode=mode,
                                                                                    align_corners=False)
    return x.permute(0, 2, 3, 1).contiguous()
