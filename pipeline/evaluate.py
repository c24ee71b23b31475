"""Image and geometry metrics: PSNR / SSIM / mask IoU against photos, Chamfer-L1 and F-score
against a ground-truth mesh."""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch
from scipy.spatial import cKDTree
from skimage.metrics import structural_similarity

from .cameras import Cameras
from .mesh import TexturedMesh, clip_range, render_textured
from .render import Rasterizer


@torch.no_grad()
def render_views(
    mesh: TexturedMesh,  # in the cameras' frame
    cameras: Cameras,
    resolution: tuple[int, int],  # (H, W)
    rasterizer: Rasterizer,
    background: float = 1.0,
    chunk: int = 8,
) -> tuple[np.ndarray, np.ndarray]:  # rgb [N, H, W, 3], alpha [N, H, W], float32
    """Render the textured mesh into every camera over a uniform background."""
    device = rasterizer.device
    center = (mesh.vertices.max(0) + mesh.vertices.min(0)) / 2
    radius = float(np.linalg.norm(mesh.vertices - center, axis=1).max())
    near, far = clip_range(cameras, center, radius)
    mats = torch.tensor(cameras.clip_matrices(resolution, near, far), dtype=torch.float32, device=device)
    tensors = dict(
        vertices=torch.from_numpy(mesh.vertices).float().to(device),
        faces=torch.from_numpy(mesh.faces).int().to(device),
        uvs=torch.from_numpy(mesh.uvs).float().to(device),
        faces_uv=torch.from_numpy(mesh.faces_uv).int().to(device),
        texture=torch.from_numpy(mesh.texture).float().to(device)[None],
    )
    rgbs, alphas = [], []
    for start in range(0, len(cameras), chunk):
        m = mats[start:start + chunk]
        bg = torch.full((len(m), 1, 1, 3), background, device=device)
        rgb, alpha = render_textured(rasterizer, clip_from_world=m, resolution=resolution, background=bg, **tensors)
        rgbs.append(rgb.clamp(0, 1).cpu().numpy())
        alphas.append(alpha[..., 0].cpu().numpy())
    return np.concatenate(rgbs), np.concatenate(alphas)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1]."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else -10.0 * np.log10(mse)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def compare_views(
    mesh: TexturedMesh,
    cameras: Cameras,
    images: np.ndarray,  # [N, H, W, 3] photos
    masks: np.ndarray,  # [N, H, W]
    names: List[str],
    rasterizer: Rasterizer,
    ssim: bool = False,
) -> tuple[Dict[str, float], Dict[str, Dict[str, float]]]:  # (means, per view)
    """Per-view PSNR (whole image, both composited on white, as NeRF-synthetic is scored), mask IoU
    and optionally SSIM, plus their means."""
    resolution = images.shape[1:3]
    rendered, alpha = render_views(mesh, cameras, resolution, rasterizer, background=1.0)
    photos = images * masks[..., None] + (1.0 - masks[..., None])
    per_view: Dict[str, Dict[str, float]] = {}
    for i, name in enumerate(names):  # one entry per photo, not a hot loop
        entry = {"psnr": psnr(rendered[i], photos[i]), "mask_iou": mask_iou(alpha[i], masks[i])}
        if ssim:
            entry["ssim"] = float(structural_similarity(rendered[i], photos[i], channel_axis=2, data_range=1.0))
        per_view[name] = entry
    keys = per_view[names[0]].keys() if names else []
    means = {k: float(np.mean([v[k] for v in per_view.values()])) for k in keys}
    return means, per_view


def sample_surface(vertices: np.ndarray, faces: np.ndarray, count: int, seed: int = 0) -> np.ndarray:  # [count, 3]
    """Area-uniform random points on a triangle mesh."""
    rng = np.random.default_rng(seed)
    tri = vertices[faces]  # [F, 3, 3]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    choice = rng.choice(len(faces), size=count, p=area / area.sum())
    r1, r2 = rng.random(count), rng.random(count)
    s = np.sqrt(r1)
    w = np.stack([1 - s, s * (1 - r2), s * r2], axis=1)
    return np.einsum("pk,pkj->pj", w, tri[choice])


def chamfer_fscore(
    pred_vertices: np.ndarray, pred_faces: np.ndarray,
    gt_vertices: np.ndarray, gt_faces: np.ndarray,
    samples: int = 100_000, threshold_fraction: float = 0.01, seed: int = 0,
    scale: Optional[float] = None,
) -> Dict[str, float]:
    """Chamfer-L1 (mean of both directions' nearest distances) and F-score at ``threshold_fraction``
    of the ground truth's bounding-box diagonal, both also given as a percentage of that diagonal."""
    diag = scale if scale is not None else float(np.linalg.norm(gt_vertices.max(0) - gt_vertices.min(0)))
    pred = sample_surface(pred_vertices, pred_faces, samples, seed)
    gt = sample_surface(gt_vertices, gt_faces, samples, seed + 1)
    d_pred = cKDTree(gt).query(pred)[0]  # accuracy
    d_gt = cKDTree(pred).query(gt)[0]  # completeness
    chamfer = 0.5 * (d_pred.mean() + d_gt.mean())
    tau = threshold_fraction * diag
    precision = float((d_pred < tau).mean())
    recall = float((d_gt < tau).mean())
    fscore = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"chamfer_l1": float(chamfer), "chamfer_l1_pct_diag": float(100 * chamfer / diag),
            "fscore_1pct": fscore, "precision": precision, "recall": recall, "bbox_diag": diag}
