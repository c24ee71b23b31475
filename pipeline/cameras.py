"""Pinhole cameras in one internal convention (docs/CONVENTIONS.md, "Cameras").

OpenCV axes: x right, y down, z forward (the camera looks along +z). ``world_to_camera`` maps a world
point X to camera coordinates ``R X + t``. Intrinsics are in pixels with continuous pixel
coordinates: pixel (row i, column j) covers [j, j+1] x [i, i+1], so its centre is (j + 0.5, i + 0.5),
and image row 0 is the top of the photo.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class Cameras:
    """N pinhole cameras that share nothing but the convention.

    intrinsics: [N, 3, 3] float64, K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] in pixels.
    world_to_camera: [N, 4, 4] float64, rigid [R | t; 0 0 0 1].
    sizes: [N, 2] int64, (height, width) in pixels of the image each camera was calibrated for.
    """

    intrinsics: np.ndarray  # [N, 3, 3]
    world_to_camera: np.ndarray  # [N, 4, 4]
    sizes: np.ndarray  # [N, 2] (H, W)

    def __post_init__(self) -> None:
        self.intrinsics = np.asarray(self.intrinsics, dtype=np.float64)
        self.world_to_camera = np.asarray(self.world_to_camera, dtype=np.float64)
        self.sizes = np.asarray(self.sizes, dtype=np.int64)
        n = len(self.intrinsics)
        if self.intrinsics.shape != (n, 3, 3):
            raise ValueError(f"intrinsics must be [N, 3, 3], got {self.intrinsics.shape}")
        if self.world_to_camera.shape != (n, 4, 4):
            raise ValueError(f"world_to_camera must be [{n}, 4, 4], got {self.world_to_camera.shape}")
        if self.sizes.shape != (n, 2):
            raise ValueError(f"sizes must be [{n}, 2], got {self.sizes.shape}")

    def __len__(self) -> int:
        return len(self.intrinsics)

    def __getitem__(self, index) -> "Cameras":
        index = np.atleast_1d(np.arange(len(self))[index])
        return Cameras(self.intrinsics[index], self.world_to_camera[index], self.sizes[index])

    @property
    def centers(self) -> np.ndarray:  # [N, 3] camera centres in world coordinates
        rot = self.world_to_camera[:, :3, :3]
        return -np.einsum("nji,nj->ni", rot, self.world_to_camera[:, :3, 3])

    def scaled(self, factor: float) -> "Cameras":
        """The same cameras for images resized by ``factor`` (pixel-corner convention kept)."""
        k = self.intrinsics.copy()
        k[:, :2, :] *= factor
        sizes = np.maximum(np.round(self.sizes * factor), 1).astype(np.int64)
        return Cameras(k, self.world_to_camera.copy(), sizes)

    def resized(self, sizes: np.ndarray) -> "Cameras":
        """The same cameras for images resampled to ``sizes`` [N, 2] (H, W), or one (H, W) for all.

        Exact for any resampling that maps the image rectangle onto the new one (pixel corners to
        corners): x scales by W'/W and y by H'/H, anisotropically when the aspect ratio changes.
        """
        sizes = np.broadcast_to(np.asarray(sizes, dtype=np.int64), self.sizes.shape).copy()
        k = self.intrinsics.copy()
        k[:, 0, :] *= (sizes[:, 1] / self.sizes[:, 1])[:, None]
        k[:, 1, :] *= (sizes[:, 0] / self.sizes[:, 0])[:, None]
        k[:, 2] = (0.0, 0.0, 1.0)
        return Cameras(k, self.world_to_camera.copy(), sizes)

    def turned(self, turns: np.ndarray) -> "Cameras":
        """The same cameras for images turned by ``turns`` [N] quarter turns clockwise (`np.rot90(image, -turns)`).

        Exact: one clockwise quarter turn of an H x W image maps pixel (x, y) to (H - y, x) and is
        the camera rotating about its optical axis, (X, Y, Z) -> (-Y, X, Z); so K' = A K Q^T with
        A = [[0, -1, H], [1, 0, 0], [0, 0, 1]], world_to_camera' = Q world_to_camera, and (H, W) swap.
        """
        turns = np.broadcast_to(np.asarray(turns, dtype=np.int64) % 4, (len(self),)).copy()
        k, w2c, sizes = self.intrinsics.copy(), self.world_to_camera.copy(), self.sizes.copy()
        if np.any((turns > 0) & (np.abs(k[:, 0, 1]) > 1e-9 * k[:, 0, 0])):
            raise ValueError("a camera with skew cannot be turned exactly into this K convention")
        quarter = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # Q, also A without its H
        while np.any(turns > 0):
            todo = turns > 0
            pixel = np.tile(quarter, (int(todo.sum()), 1, 1))
            pixel[:, 0, 2] = sizes[todo, 0]
            k[todo] = pixel @ k[todo] @ quarter.T
            w2c[todo, :3, :] = quarter @ w2c[todo, :3, :]
            sizes[todo] = sizes[todo, ::-1]
            turns -= todo
        return Cameras(k, w2c, sizes)

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates [N, P, 2] (x = column, y = row, continuous) and depth [N, P] of world points [P, 3]."""
        homog = np.concatenate([points, np.ones((len(points), 1))], axis=1)
        cam = np.einsum("nij,pj->npi", self.world_to_camera[:, :3, :], homog)
        depth = cam[..., 2]
        pix = np.einsum("nij,npj->npi", self.intrinsics, cam)
        with np.errstate(divide="ignore", invalid="ignore"):
            xy = pix[..., :2] / pix[..., 2:3]
        return xy, depth

    def clip_matrices(self, resolution: tuple[int, int], near: float, far: float) -> np.ndarray:
        """[N, 4, 4] world -> clip-space matrices for rendering at ``resolution`` = (H, W).

        The intrinsics are rescaled from each camera's own size to ``resolution``. Clip y follows
        the image's row direction, so row 0 of a render is the top row of the photo (see
        docs/CONVENTIONS.md); depth maps [near, far] to z/w in [-1, 1].
        """
        height, width = resolution
        sx = width / self.sizes[:, 1]
        sy = height / self.sizes[:, 0]
        fx = self.intrinsics[:, 0, 0] * sx
        fy = self.intrinsics[:, 1, 1] * sy
        cx = self.intrinsics[:, 0, 2] * sx
        cy = self.intrinsics[:, 1, 2] * sy
        skew = self.intrinsics[:, 0, 1] * sx
        proj = np.zeros((len(self), 4, 4))
        proj[:, 0, 0] = 2 * fx / width
        proj[:, 0, 1] = 2 * skew / width
        proj[:, 0, 2] = 2 * cx / width - 1
        proj[:, 1, 1] = 2 * fy / height
        proj[:, 1, 2] = 2 * cy / height - 1
        proj[:, 2, 2] = (far + near) / (far - near)
        proj[:, 2, 3] = -2 * far * near / (far - near)
        proj[:, 3, 2] = 1.0
        return proj @ self.world_to_camera


def to_clip(
    vertices: Tensor,  # [V, 3] world positions
    clip_from_world: Tensor,  # [B, 4, 4] from Cameras.clip_matrices
) -> Tensor:  # [B, V, 4] clip-space positions for Rasterizer.rasterize
    """Transform world vertices to clip space for each view (differentiable w.r.t. both inputs)."""
    homog = torch.cat([vertices, torch.ones_like(vertices[:, :1])], dim=1)
    return torch.einsum("bij,vj->bvi", clip_from_world, homog)


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray) -> np.ndarray:
    """[4, 4] world-to-camera matrix (OpenCV axes) of a camera at ``eye`` looking at ``target``."""
    forward = target - eye
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, up)
    if np.linalg.norm(right) < 1e-9:  # looking along `up`: pick any perpendicular
        right = np.cross(forward, np.array([1.0, 0.0, 0.0]) if abs(forward[0]) < 0.9 else np.array([0.0, 1.0, 0.0]))
    right = right / np.linalg.norm(right)
    down = np.cross(forward, right)
    rot = np.stack([right, down, forward])
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = -rot @ eye
    return out
