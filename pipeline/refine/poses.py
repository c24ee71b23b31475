"""Per-photo rigid camera corrections optimised with the surface (pose refinement)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..cameras import Cameras


class PoseCorrections:
    """A small rigid correction per camera, applied in camera space: world_to_camera' = D @ world_to_camera,
    D = [R(omega) | t] with ``delta`` = [omega (axis-angle, radians), t (scene units)] per view."""

    def __init__(self, cameras: Cameras, clip_from_world: Tensor, device: torch.device):
        world_to_camera = torch.tensor(cameras.world_to_camera, dtype=torch.float64)  # [N, 4, 4]
        camera_to_world = torch.linalg.inv(world_to_camera)
        self.world_to_camera = world_to_camera.float().to(device)
        # clip_from_world = projection @ world_to_camera; the projection alone, per view [N, 4, 4]:
        self.projection = (clip_from_world.double().cpu() @ camera_to_world).float().to(device)
        self.delta = torch.zeros(len(cameras), 6, device=device, requires_grad=True)  # [N, 6]

    def matrices(self, views: Optional[Tensor] = None) -> Tensor:  # [n, 4, 4] the corrections D
        delta = self.delta if views is None else self.delta[views]
        omega, t = delta[:, :3], delta[:, 3:]
        # Rodrigues with the unnormalised cross-product matrix K of omega: smooth (and its gradient
        # finite) at omega = 0, where every correction starts.
        theta = torch.sqrt((omega**2).sum(1) + 1e-12)[:, None, None]  # [n, 1, 1]
        k = torch.zeros(len(delta), 3, 3, device=delta.device)
        k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -omega[:, 2], omega[:, 1], -omega[:, 0]
        k = k - k.transpose(1, 2)
        eye = torch.eye(3, device=delta.device).expand_as(k)
        rotation = eye + torch.sin(theta) / theta * k + (1 - torch.cos(theta)) / theta**2 * (k @ k)
        out = torch.eye(4, device=delta.device).repeat(len(delta), 1, 1)
        out[:, :3, :3] = rotation
        out[:, :3, 3] = t
        return out

    def clip(self, views: Tensor) -> Tensor:  # [n, 4, 4] corrected clip_from_world of ``views``
        return self.projection[views] @ self.matrices(views) @ self.world_to_camera[views]

    def corrected(self, clip_from_world: Tensor) -> Tensor:  # [N, 4, 4] the same correction at another resolution
        projection = clip_from_world @ torch.linalg.inv(self.world_to_camera)
        return projection @ self.matrices() @ self.world_to_camera

    def cameras(self, original: Cameras) -> Cameras:
        """``original`` with the corrections applied (same intrinsics and sizes)."""
        with torch.no_grad():
            corrected = (self.matrices() @ self.world_to_camera).double().cpu().numpy()
        corrected[:, 3] = [0.0, 0.0, 0.0, 1.0]
        return Cameras(original.intrinsics.copy(), corrected, original.sizes.copy())

    def centers(self) -> Tensor:  # [N, 3] corrected camera centres
        return torch.linalg.inv(self.matrices() @ self.world_to_camera)[:, :3, 3]

    def summary(self) -> dict:
        with torch.no_grad():
            degrees = torch.rad2deg(self.delta[:, :3].norm(dim=1))
            shift = self.delta[:, 3:].norm(dim=1)
        return {"pose_correction_deg_median": float(degrees.median()), "pose_correction_deg_max": float(degrees.max()),
                "pose_correction_shift_median": float(shift.median())}
