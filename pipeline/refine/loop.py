"""nvdiffrec-style refinement: vertex positions, then a UV texture atlas, fitted to the photos by
differentiable rendering (silhouette loss through `antialias`, photometric L1 on a random background,
a Laplacian prior on the surface and a smoothness prior on the texture).

Appearance starts from the photos projected onto the surface (visibility-tested, weighted by viewing
angle), so optimisation only has to correct it; texels no photo sees are filled from their neighbours.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Generator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..cameras import Cameras, look_at
from ..config import RefineConfig
from ..events import Metrics, Preview, Progress
from ..mesh import (TexturedMesh, clip_range, render_colored, render_resolution, render_shaded, render_textured,
                    simplify)
from ..render import Rasterizer
from ..uv import UnwrapJob
from .appearance import PhotoProjector, texture_smoothness
from .poses import PoseCorrections
from .surface import (FaceAdjacency, SmoothParametrisation, UniformAdam, UniformLaplacian, inside_out_loss,
                      nearest_vertices, normal_consistency_loss, remesh, swap_parameter, target_edge_length,
                      vertex_normals)
from .topology import fit_topology

STAGE = "refine"


class Cancelled(Exception):
    """Raised inside the pipeline when the caller's cancel() returned True."""


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
    vertices: np.ndarray,  # [V, 3] starting surface (normalised frame), closed and manifold
    faces: np.ndarray,  # [F, 3]
    cameras: Cameras,  # normalised frame, one per photo
    images: np.ndarray,  # [N, H, W, 3] float32
    masks: np.ndarray,  # [N, H, W] float32
    up: np.ndarray,  # [3] world up in the normalised frame (for the turntable preview)
    config: RefineConfig,
    rasterizer: Rasterizer,
    work_dir: Path,  # scratch folder (the UV atlas job's files)
    cancel: Optional[Callable[[], bool]] = None,
    estimated_cameras: bool = False,
    hull_field: Optional[np.ndarray] = None,  # [R, R, R] visual-hull field: the topology pass starts from it
) -> Generator[object, None, Tuple[TexturedMesh, Optional[Cameras]]]:
    """Fit the surface and its appearance to the photos:

    0. topology (``config.topology_steps`` > 0 and a ``hull_field``): an SDF on a grid, initialised
       from the visual hull and fitted through the renderer, whose surface can change genus and dig
       into concavities the silhouettes cannot see (`topology.fit_topology`); its surface replaces
       the starting one;
    1. geometry: vertex positions with per-vertex colours. With ``config.smoothing_lambda`` > 0
       (the default) positions move in Large Steps' parametrisation (`surface.SmoothParametrisation`),
       so every step is a smooth deformation; at 0 they move as they are (2.5x faster per step and
       sharper on lego, but lumpy on a real capture: docs/BENCHMARKS.md, 2026-12-02). The surface
       is remeshed toward an even edge length (coarse first, then at ``config.mesh_faces``) so
       triangles stay well shaped as it moves; a normal-consistency term on bends past
       ``config.normal_free_angle`` keeps neighbouring faces from folding, and where a view sees the
       surface from behind (it passed through itself) the push of `surface.inside_out_loss` moves
       it back (``config.inside_out_weight``). After the last remesh the
       connectivity is final and the UV atlas is computed in another process while the geometry
       pass goes on;
    2. texture: the photos are projected into the atlas on the refined surface, then positions and
       texture are optimised together.

    With pose refinement (``config.pose_refinement``: "on", or "auto" with ``estimated_cameras``)
    each photo's camera also gets a small rigid correction, optimised with the rest (the camera is
    a differentiable input of the render); the texture is projected through the corrected cameras.

    Yields Progress / Preview / Metrics events (the loss as it goes; at the end, where the time went:
    each loop's ms per step and the one-off seconds before, between and after them); returns the
    refined TexturedMesh and, with pose refinement, the corrected cameras (normalised frame; else None).
    """
    device = rasterizer.device
    clock = _Clock(device)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    height, width = render_resolution(images.shape[1:3], config.render_resolution)
    near, far = clip_range(cameras)
    clip_mats = torch.tensor(cameras.clip_matrices((height, width), near, far), dtype=torch.float32, device=device)
    centers = torch.from_numpy(cameras.centers).float().to(device)  # [N, 3] (before any pose correction)
    photos = _resize(torch.from_numpy(images).to(device), (height, width))  # [N, h, w, 3]
    alphas = _resize(torch.from_numpy(masks).to(device)[..., None], (height, width))  # [N, h, w, 1]
    full_views = dict(  # colours are projected from the full-resolution photos
        photos=torch.from_numpy(images).to(device), masks=torch.from_numpy(masks).to(device),
        clip_from_world=torch.tensor(cameras.clip_matrices(images.shape[1:3], near, far), dtype=torch.float32,
                                     device=device),
        camera_centers=centers,
    )
    if config.topology_steps > 0 and hull_field is not None:
        vertices, faces = yield from fit_topology(hull_field, cameras, images, masks, config, rasterizer, cancel)
    topology_seconds = clock.lap()

    total = config.iterations
    geometry_steps = total // 2
    # Remeshes over the first half of the geometry pass, each at a finer edge length, the last at
    # mesh_faces; the first, before step 0, also evens out the starting surface (the hull's or the
    # topology pass's triangles). The UV unwrap of the final connectivity runs on the CPU during the
    # rest of the pass: the earlier the last remesh, the less the texture pass waits for it (lego,
    # slow host: 1.9 s -> 0.5 s for the last remesh at step 100 instead of 200, same quality).
    remesh_at = {geometry_steps * i // (2 * config.remeshes): config.mesh_faces // 2 ** (config.remeshes - 1 - i)
                 for i in range(config.remeshes)}
    if not remesh_at:  # the hull's triangles as they are, down to mesh_faces
        vertices, faces = simplify(vertices, faces, config.mesh_faces)
    surface = _Surface(vertices, faces, config, device)
    if 0 in remesh_at:
        surface.remesh(remesh_at.pop(0))
    with torch.no_grad():  # one solve of the parametrisation, not one per use
        start = surface.vertices()
    projector = PhotoProjector(rasterizer, start, surface.faces, **full_views)
    colors, _ = projector(start, vertex_normals(start, surface.faces))
    colors.requires_grad_(True)
    atlas = None if remesh_at else UnwrapJob(*surface.numpy(), config.texture_size, work_dir)
    try:
        # Every step's views and background colours, drawn up front and moved to the device once: a
        # per-step host-to-device copy would synchronise, and the CPU could no longer queue the next
        # step while the GPU runs this one.
        schedule = _view_schedule(len(photos), min(config.views_per_step, len(photos)), total, rng).to(device)
        backgrounds = torch.rand(total, schedule.shape[1], 1, 1, 3, generator=generator).to(device)
        previewer = _Previewer(cameras, up, near, far, (height, width), photos[0] * alphas[0] + (1 - alphas[0]),
                               config.preview_every_s, device)
        adjust_poses = config.pose_refinement == "on" or (config.pose_refinement == "auto" and estimated_cameras)
        geometry_optimizer = (UniformAdam([surface.u], lr=config.geometry_lr) if config.geometry_optimizer == "uniform"
                              else torch.optim.Adam([surface.u], lr=config.geometry_lr, betas=(0.9, 0.99)))
        groups = [{"params": [colors], "lr": config.texture_lr}]
        if adjust_poses:
            poses = PoseCorrections(cameras, clip_mats, device)
            groups.append({"params": [poses.delta], "lr": config.pose_lr})
        optimizer = torch.optim.Adam(groups, betas=(0.9, 0.99), fused=device.type == "cuda")
        verts = surface.vertices()

        def fit_step(step: int, render: Callable, appearance: Tensor) -> Tensor:
            nonlocal verts
            check_cancel(cancel)
            # Learning rates decay to 10% over the whole run, as nvdiffrec's exponential schedule does.
            decay = 0.1 ** (step / max(total, 1))
            geometry_optimizer.param_groups[0]["lr"] = config.geometry_lr * decay
            optimizer.param_groups[0]["lr"] = config.texture_lr * decay
            if adjust_poses:
                optimizer.param_groups[1]["lr"] = config.pose_lr * decay
            verts = surface.vertices()
            views, background = schedule[step], backgrounds[step]
            rgb, alpha, rast = render(poses.clip(views) if adjust_poses else clip_mats[views], background)
            target_alpha = alphas[views]
            target = photos[views] * target_alpha + background * (1 - target_alpha)
            loss = (F.l1_loss(rgb, target) + config.mask_weight * F.mse_loss(alpha, target_alpha)
                    + config.normal_weight * normal_consistency_loss(verts, surface.adjacency,
                                                                     config.normal_free_angle)
                    + config.smoothness * surface.laplacian(verts).square().sum(1).mean()
                    + (config.inside_out_weight * inside_out_loss(verts, surface.faces, rast, centers[views])
                       if config.inside_out_weight > 0 else 0.0)
                    + config.texture_smoothness * texture_smoothness(appearance))
            geometry_optimizer.zero_grad(set_to_none=True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            geometry_optimizer.step()
            optimizer.step()
            with torch.no_grad():
                appearance.clamp_(0.0, 1.0)
            return loss.detach()

        def shade(mats: Tensor, background: Tensor):
            return render_shaded(rasterizer, verts, surface.faces, mats, (height, width), background)

        def by_colors(mats: Tensor, background: Tensor):
            return render_colored(rasterizer, verts, surface.faces, colors, mats, (height, width), background,
                                  return_rast=True)

        setup_seconds = clock.lap()
        remesh_seconds = 0.0
        for step in range(geometry_steps):
            if step in remesh_at:
                remesh_start = time.perf_counter()
                colors = surface.remesh(remesh_at.pop(step), geometry_optimizer, optimizer, colors)
                verts = surface.vertices()
                if not remesh_at:  # the connectivity is final: unwrap it while the geometry pass goes on
                    atlas = UnwrapJob(*surface.numpy(), config.texture_size, work_dir)
                remesh_seconds += time.perf_counter() - remesh_start
            loss = fit_step(step, by_colors, colors)
            yield from previewer.maybe(step, total, by_colors, shade, loss)
        geometry_seconds = clock.lap() - remesh_seconds

        while not atlas.ready():  # pass 2 needs the atlas
            check_cancel(cancel)
            yield Progress(STAGE, geometry_steps / max(total, 1), "waiting for the UV atlas")
            time.sleep(0.02)
        atlas_wait_seconds = clock.lap()
        _, faces_uv, uvs = atlas.result()
        faces_t = surface.faces
        faces_uv_t = torch.from_numpy(faces_uv).to(device=device, dtype=torch.int32)
        uvs_t = torch.from_numpy(uvs).to(device=device, dtype=torch.float32)
        with torch.no_grad():
            verts = surface.vertices()
        if adjust_poses:  # project the photos through the corrected cameras
            with torch.no_grad():
                full_views["clip_from_world"] = poses.corrected(full_views["clip_from_world"])
                full_views["camera_centers"] = poses.centers()
            yield Metrics(STAGE, poses.summary())
        baked = PhotoProjector(rasterizer, verts, faces_t, **full_views).texture(
            verts.cpu().numpy(), faces_t.cpu().numpy(), uvs, faces_uv, config.texture_size, rasterizer)
        texture = torch.from_numpy(baked).to(device)[None].contiguous().requires_grad_(True)
        swap_parameter(optimizer, colors, texture)

        def by_texture(mats: Tensor, background: Tensor):
            return render_textured(rasterizer, verts, faces_t, uvs_t, faces_uv_t, texture, mats, (height, width),
                                   background, return_rast=True)

        texture_setup_seconds = clock.lap()
        for step in range(geometry_steps, total):
            loss = fit_step(step, by_texture, texture)
            yield from previewer.maybe(step, total, by_texture, shade, loss)
        texture_seconds = clock.lap()
        yield Metrics(STAGE, {  # where the stage's time went; the loops' figures exclude the one-off setup
            "geometry_ms_per_step": 1000 * geometry_seconds / max(geometry_steps, 1),
            "texture_ms_per_step": 1000 * texture_seconds / max(total - geometry_steps, 1),
            "loop_ms_per_step": 1000 * (geometry_seconds + texture_seconds) / max(total, 1),
            "topology_seconds": topology_seconds, "remesh_seconds": remesh_seconds,
            "setup_seconds": setup_seconds, "atlas_wait_seconds": atlas_wait_seconds,
            "texture_setup_seconds": texture_setup_seconds})

        with torch.no_grad():
            final_vertices = surface.vertices()
        mesh = TexturedMesh(
            vertices=final_vertices.cpu().numpy().astype(np.float32),
            faces=faces_t.cpu().numpy().astype(np.int32),
            uvs=uvs.astype(np.float32),
            faces_uv=faces_uv.astype(np.int32),
            texture=texture.detach()[0].cpu().numpy(),
        )
        return mesh, (poses.cameras(cameras) if adjust_poses else None)
    finally:
        if atlas is not None:  # finished, failed or cancelled: the child process goes
            atlas.cancel()


class _Surface:
    """The surface being fitted: its smooth parametrisation and what depends on its connectivity
    (faces, face adjacency, Laplacian), rebuilt together by `remesh`."""

    def __init__(self, vertices: np.ndarray, faces: np.ndarray, config: RefineConfig, device: torch.device):
        self.config, self.device = config, device
        self._set(torch.from_numpy(np.ascontiguousarray(vertices, dtype=np.float32)).to(device),
                  torch.from_numpy(np.ascontiguousarray(faces)).to(device=device, dtype=torch.int32))

    def _set(self, vertices: Tensor, faces: Tensor) -> None:  # [V, 3], [F, 3] int32
        self.faces = faces
        self.adjacency = FaceAdjacency(faces)
        self.laplacian = UniformLaplacian(faces, len(vertices))
        if hasattr(self, "parametrisation"):
            self.parametrisation.rebuild(vertices, faces)
        else:
            self.parametrisation = SmoothParametrisation(vertices, faces, self.config.smoothing_lambda)

    @property
    def u(self) -> Tensor:
        return self.parametrisation.u

    def vertices(self) -> Tensor:  # [V, 3], differentiable w.r.t. ``u``
        return self.parametrisation.vertices()

    def numpy(self) -> Tuple[np.ndarray, np.ndarray]:  # vertices [V, 3] float32, faces [F, 3] int64
        with torch.no_grad():
            return self.vertices().cpu().numpy(), self.faces.cpu().numpy().astype(np.int64)

    def remesh(self, face_count: int, geometry_optimizer: Optional[torch.optim.Optimizer] = None,
               optimizer: Optional[torch.optim.Optimizer] = None, colors: Optional[Tensor] = None):
        """Remesh toward the edge length of ``face_count`` even triangles; the optimisers follow the
        new parameters (the colours and their moments are carried from the nearest old vertex).
        Returns the carried colours (a new leaf) when ``colors`` are given."""
        old_vertices, old_faces = self.numpy()
        length = target_edge_length(old_vertices, old_faces, face_count)
        new_vertices, new_faces = remesh(old_vertices, old_faces, length, iterations=self.config.remesh_iterations)
        if face_count >= self.config.mesh_faces and len(new_faces) > face_count:
            # The remesher can land over the count (lego: 90.6k faces for 80k). The final connectivity
            # keeps to 'Mesh faces', so an export at as many faces writes the refined atlas and
            # texture as they are (no re-unwrap and re-bake: seconds, and a resampling of the texture).
            new_vertices, new_faces = simplify(new_vertices, new_faces, face_count)
            new_vertices, new_faces = new_vertices.astype(np.float32), new_faces.astype(np.int32)
        nearest = torch.from_numpy(nearest_vertices(old_vertices, new_vertices)).to(self.device)
        old_u = self.u
        self._set(torch.from_numpy(new_vertices).to(self.device), torch.from_numpy(new_faces).to(self.device))
        if geometry_optimizer is not None:  # moments in u-space do not survive a new Laplacian
            swap_parameter(geometry_optimizer, old_u, self.u)
        if colors is None:
            return None
        carried = colors.detach()[nearest].clone().requires_grad_(True)
        if optimizer is not None:
            swap_parameter(optimizer, colors, carried, carry=lambda moment: moment[nearest])
        return carried


class _Clock:
    """Seconds between calls, with the device's queued work finished at each (two syncs per pass)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self) -> float:
        now = self._now()
        elapsed, self.last = now - self.last, now
        return elapsed


def check_cancel(cancel: Optional[Callable[[], bool]]) -> None:
    if cancel is not None and cancel():
        raise Cancelled()


def _view_schedule(count: int, batch: int, steps: int, rng: np.random.Generator) -> Tensor:  # [steps, batch] int64
    """The views of every step: random batches, every view once per epoch (a shuffled order, cut
    into batches; the few left over at an epoch's end wait for the next shuffle)."""
    per_epoch = count // batch
    epochs = max(1, -(-steps // per_epoch))
    order = np.stack([rng.permutation(count)[:per_epoch * batch] for _ in range(epochs)])  # [epochs, per_epoch*batch]
    return torch.from_numpy(order.reshape(-1, batch)[:steps])


class _Previewer:
    """Every ``every_s`` seconds (and at the last step): Progress, a Preview strip and Metrics with
    the mean loss since the last one. The strip is the render of the first photo's view | that
    photo | the same view grey and lit (the bare surface, as a lit viewer shows it) | a turntable
    frame, grey and lit, so the shape can be watched converging."""

    def __init__(self, cameras: Cameras, up: np.ndarray, near: float, far: float, size: Tuple[int, int],
                 photo: Tensor, every_s: float, device: torch.device):
        self.cameras, self.up, self.near, self.far, self.size = cameras, up, near, far, size
        self.photo, self.every_s, self.device = photo, every_s, device
        self.first_view = torch.tensor(cameras.clip_matrices(size, near, far)[:1], dtype=torch.float32, device=device)
        self.last = -np.inf
        self.loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
        self.count = 0

    def maybe(self, step: int, total: int, render: Callable, shade: Callable, loss: Tensor):
        """``render(mats [B, 4, 4], background [B, 1, 1, 3]) -> (rgb, alpha, rast)`` draws the current
        model, ``shade(mats, background)`` its bare surface."""
        self.loss_sum += loss
        self.count += 1
        now = time.monotonic()
        if now - self.last < self.every_s and step != total - 1:
            return
        self.last = now
        yield Progress(STAGE, (step + 1) / total, f"step {step + 1}/{total}")
        with torch.no_grad():
            spin = turntable_camera(self.cameras, self.up, 2 * np.pi * step / max(total, 1))
            spin_cam = Cameras(self.cameras.intrinsics[:1], spin[None], self.cameras.sizes[:1])
            spin_mat = torch.tensor(spin_cam.clip_matrices(self.size, self.near, self.far), dtype=torch.float32,
                                    device=self.device)
            white = torch.ones(2, 1, 1, 3, device=self.device)
            shown = render(self.first_view, white[:1])[0]
            shaded, _ = shade(torch.cat([self.first_view, spin_mat]), white)
            strip = torch.cat([shown[0], self.photo, shaded[0], shaded[1]], dim=1)
            image = (strip.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        yield Preview(STAGE, image, f"step {step + 1}: render | photo | surface | turntable")
        yield Metrics(STAGE, {"loss": float(self.loss_sum) / self.count, "step": float(step + 1)})
        self.loss_sum.zero_()
        self.count = 0


def _resize(images: Tensor, size: Tuple[int, int]) -> Tensor:  # [N, H, W, C] -> [N, h, w, C]
    """Area-average downscale (or bilinear upscale) of channel-last images."""
    if tuple(images.shape[1:3]) == tuple(size):
        return images.float()
    x = images.permute(0, 3, 1, 2).float()
    mode = "area" if size[0] <= x.shape[2] else "bilinear"
    x = F.interpolate(x, size=size, mode=mode) if mode == "area" else F.interpolate(x, size=size, mode=mode,
                                                                                    align_corners=False)
    return x.permute(0, 2, 3, 1).contiguous()
