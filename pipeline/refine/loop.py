"""nvdiffrec-style refinement: vertex positions, then a UV texture atlas, fitted to the photos by
differentiable rendering (silhouette loss through `antialias`, photometric L1 on a random background,
a Laplacian prior on the surface and a smoothness prior on the texture).

Appearance starts from the photos projected onto the surface (visibility-tested, weighted by viewing
angle), so optimisation only has to correct it; texels no photo sees are filled from their neighbours.
"""

from __future__ import annotations

import time
from typing import Callable, Generator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..cameras import Cameras, look_at
from ..config import RefineConfig
from ..events import Metrics, Preview, Progress
from ..mesh import TexturedMesh, clip_range, render_colored, render_resolution, render_textured
from ..render import Rasterizer
from ..uv import UnwrapJob
from .appearance import PhotoProjector, texture_smoothness
from .poses import PoseCorrections
from .surface import UniformLaplacian, vertex_normals

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
    vertices: np.ndarray,  # [V, 3] starting surface (normalised frame)
    faces: np.ndarray,  # [F, 3]
    atlas: UnwrapJob,  # UV atlas of this connectivity, being computed in another process
    cameras: Cameras,  # normalised frame, one per photo
    images: np.ndarray,  # [N, H, W, 3] float32
    masks: np.ndarray,  # [N, H, W] float32
    up: np.ndarray,  # [3] world up in the normalised frame (for the turntable preview)
    config: RefineConfig,
    rasterizer: Rasterizer,
    cancel: Optional[Callable[[], bool]] = None,
    estimated_cameras: bool = False,
) -> Generator[object, None, Tuple[TexturedMesh, Optional[Cameras]]]:
    """Fit the surface and its appearance to the photos in two passes over the same connectivity:

    1. geometry: vertex positions with per-vertex colours (no UVs needed, so the atlas is computed
       meanwhile in another process);
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
    photos = _resize(torch.from_numpy(images).to(device), (height, width))  # [N, h, w, 3]
    alphas = _resize(torch.from_numpy(masks).to(device)[..., None], (height, width))  # [N, h, w, 1]
    full_views = dict(  # colours are projected from the full-resolution photos
        photos=torch.from_numpy(images).to(device), masks=torch.from_numpy(masks).to(device),
        clip_from_world=torch.tensor(cameras.clip_matrices(images.shape[1:3], near, far), dtype=torch.float32,
                                     device=device),
        camera_centers=torch.from_numpy(cameras.centers).float().to(device),
    )
    faces_t = torch.from_numpy(np.ascontiguousarray(faces)).to(device=device, dtype=torch.int32)
    verts = torch.from_numpy(np.ascontiguousarray(vertices)).to(device=device, dtype=torch.float32)
    laplacian = UniformLaplacian(faces_t, len(verts))
    colors, _ = PhotoProjector(rasterizer, verts, faces_t, **full_views)(verts, vertex_normals(verts, faces_t))
    verts.requires_grad_(True)
    colors.requires_grad_(True)

    total = config.iterations
    geometry_steps = total // 2
    # Every step's views and background colours, drawn up front and moved to the device once: a
    # per-step host-to-device copy would synchronise, and the CPU could no longer queue the next
    # step while the GPU runs this one.
    schedule = _view_schedule(len(photos), min(config.views_per_step, len(photos)), total, rng).to(device)
    backgrounds = torch.rand(total, schedule.shape[1], 1, 1, 3, generator=generator).to(device)
    previewer = _Previewer(cameras, up, near, far, (height, width), photos[0] * alphas[0] + (1 - alphas[0]),
                           config.preview_every_s, device)
    adjust_poses = config.pose_refinement == "on" or (config.pose_refinement == "auto" and estimated_cameras)
    groups = [{"params": [verts], "lr": config.geometry_lr}, {"params": [colors], "lr": config.texture_lr}]
    if adjust_poses:
        poses = PoseCorrections(cameras, clip_mats, device)
        groups.append({"params": [poses.delta], "lr": config.pose_lr})
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.99), fused=device.type == "cuda")

    def fit_step(step: int, render: Callable, appearance: Tensor) -> Tensor:
        check_cancel(cancel)
        # Learning rates decay to 10% over the whole run, as nvdiffrec's exponential schedule does.
        decay = 0.1 ** (step / max(total, 1))
        optimizer.param_groups[0]["lr"] = config.geometry_lr * decay
        optimizer.param_groups[1]["lr"] = config.texture_lr * decay
        if adjust_poses:
            optimizer.param_groups[2]["lr"] = config.pose_lr * decay
        views, background = schedule[step], backgrounds[step]
        rgb, alpha = render(poses.clip(views) if adjust_poses else clip_mats[views], background)
        target_alpha = alphas[views]
        target = photos[views] * target_alpha + background * (1 - target_alpha)
        loss = (F.l1_loss(rgb, target) + config.mask_weight * F.mse_loss(alpha, target_alpha)
                + config.smoothness * laplacian(verts).square().sum(1).mean()
                + config.texture_smoothness * texture_smoothness(appearance))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            appearance.clamp_(0.0, 1.0)
        return loss.detach()

    def by_colors(mats: Tensor, background: Tensor):
        return render_colored(rasterizer, verts, faces_t, colors, mats, (height, width), background)

    setup_seconds = clock.lap()
    for step in range(geometry_steps):
        loss = fit_step(step, by_colors, colors)
        yield from previewer.maybe(step, total, by_colors, loss)
    geometry_seconds = clock.lap()

    while not atlas.ready():  # pass 2 needs the atlas; it has usually been ready for a while
        check_cancel(cancel)
        yield Progress(STAGE, geometry_steps / max(total, 1), "waiting for the UV atlas")
        time.sleep(0.05)
    atlas_wait_seconds = clock.lap()
    _, faces_uv, uvs = atlas.result()
    faces_uv_t = torch.from_numpy(faces_uv).to(device=device, dtype=torch.int32)
    uvs_t = torch.from_numpy(uvs).to(device=device, dtype=torch.float32)
    surface = verts.detach()
    if adjust_poses:  # project the photos through the corrected cameras
        with torch.no_grad():
            full_views["clip_from_world"] = poses.corrected(full_views["clip_from_world"])
            full_views["camera_centers"] = poses.centers()
        yield Metrics(STAGE, poses.summary())
    baked = PhotoProjector(rasterizer, surface, faces_t, **full_views).texture(
        surface.cpu().numpy(), np.asarray(faces), uvs, faces_uv, config.texture_size, rasterizer)
    texture = torch.from_numpy(baked).to(device)[None].contiguous().requires_grad_(True)
    optimizer.state.pop(colors, None)
    optimizer.param_groups[1]["params"] = [texture]

    def by_texture(mats: Tensor, background: Tensor):
        return render_textured(rasterizer, verts, faces_t, uvs_t, faces_uv_t, texture, mats, (height, width),
                               background)

    texture_setup_seconds = clock.lap()
    for step in range(geometry_steps, total):
        loss = fit_step(step, by_texture, texture)
        yield from previewer.maybe(step, total, by_texture, loss)
    texture_seconds = clock.lap()
    yield Metrics(STAGE, {  # where the stage's time went; the loops' figures exclude the one-off setup
        "geometry_ms_per_step": 1000 * geometry_seconds / max(geometry_steps, 1),
        "texture_ms_per_step": 1000 * texture_seconds / max(total - geometry_steps, 1),
        "loop_ms_per_step": 1000 * (geometry_seconds + texture_seconds) / max(total, 1),
        "setup_seconds": setup_seconds, "atlas_wait_seconds": atlas_wait_seconds,
        "texture_setup_seconds": texture_setup_seconds})

    mesh = TexturedMesh(
        vertices=verts.detach().cpu().numpy().astype(np.float32),
        faces=np.asarray(faces, dtype=np.int32),
        uvs=uvs.astype(np.float32),
        faces_uv=faces_uv.astype(np.int32),
        texture=texture.detach()[0].cpu().numpy(),
    )
    return mesh, (poses.cameras(cameras) if adjust_poses else None)


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
    """Every ``every_s`` seconds (and at the last step): Progress, a Preview strip (render of the first
    photo's view | that photo | a turntable frame) and Metrics with the mean loss since the last one."""

    def __init__(self, cameras: Cameras, up: np.ndarray, near: float, far: float, size: Tuple[int, int],
                 photo: Tensor, every_s: float, device: torch.device):
        self.cameras, self.up, self.near, self.far, self.size = cameras, up, near, far, size
        self.photo, self.every_s, self.device = photo, every_s, device
        self.first_view = torch.tensor(cameras.clip_matrices(size, near, far)[:1], dtype=torch.float32, device=device)
        self.last = -np.inf
        self.loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
        self.count = 0

    def maybe(self, step: int, total: int, render: Callable, loss: Tensor):
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
            shown, _ = render(torch.cat([self.first_view, spin_mat]), torch.ones(2, 1, 1, 3, device=self.device))
            strip = torch.cat([shown[0], self.photo, shown[1]], dim=1)
            image = (strip.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        yield Preview(STAGE, image, f"step {step + 1}: render | photo | turntable")
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
