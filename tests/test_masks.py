"""Masks for photos without any: the classical masker against lego's alpha, cleaning, scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from pipeline import masks as M
from pipeline.errors import PipelineError

LEGO = Path(__file__).parent / "fixtures" / "lego_128" / "train"


@pytest.fixture(scope="module")
def lego_rgba() -> np.ndarray:  # [24, 128, 128, 4] in [0, 1]
    files = sorted(LEGO.glob("*.png"))
    return np.stack([np.asarray(Image.open(f).convert("RGBA"), dtype=np.float32) / 255 for f in files])


def _textured_background(h: int, w: int, seed: int = 1) -> np.ndarray:  # [H, W, 3]
    """A patterned tablecloth: low-frequency colour blobs, a coarse checker and sensor-like grain."""
    rng = np.random.default_rng(seed)
    blobs = np.stack([ndimage.gaussian_filter(rng.random((h, w)), h / 20) for _ in range(3)], -1)
    blobs = (blobs - blobs.min((0, 1))) / np.ptp(blobs, (0, 1))
    checker = ((np.arange(h)[:, None] // (h // 8) + np.arange(w)[None] // (w // 8)) % 2)[..., None]
    grain = 0.04 * rng.standard_normal((h, w, 3))
    return np.clip(0.25 + 0.4 * blobs * np.array([0.6, 0.7, 0.9]) + 0.1 * checker + grain, 0, 1)


def _iou(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:  # [N]
    return (pred & truth).sum((1, 2)) / (pred | truth).sum((1, 2))


@pytest.mark.parametrize("background, min_iou", [("white", 0.9), ("grey", 0.9), ("textured", 0.8)])
def test_classical_masker_matches_lego_alpha(lego_rgba, background, min_iou, tmp_path):
    alpha = lego_rgba[..., 3:]
    h, w = alpha.shape[1:3]
    bg = {"white": np.ones(3), "grey": np.array([0.55, 0.6, 0.62]), "textured": _textured_background(h, w)}[background]
    photos = lego_rgba[..., :3] * alpha + (1 - alpha) * bg  # the alpha removed: photos on a backdrop
    est = M.estimate_masks(photos, method="auto", weights_dir=tmp_path)  # empty weights: classical
    assert est.method == "classical"
    iou = _iou(est.masks > 0.5, alpha[..., 0] > 0.5)
    assert iou.mean() >= min_iou, f"{background}: mean IoU {iou.mean():.3f}"
    assert not est.flagged.any(), est.warnings


def test_clean_mask_keeps_largest_component_and_fills_small_holes():
    mask = np.zeros((100, 100), dtype=bool)
    mask[10:60, 10:60] = True
    mask[30:33, 30:33] = False  # a small hole: filled
    mask[80:85, 80:85] = True  # a speck: dropped
    ring = np.zeros_like(mask)
    ring[62:98, 2:38] = True
    big = np.zeros_like(mask)
    big[70:90, 10:30] = True
    cleaned = M.clean_mask(mask)
    assert cleaned[10:60, 10:60].all() and not cleaned[80:85, 80:85].any()
    # A large hole (20x20 = 4% of the image) is kept: more likely real than an error.
    donut = M.clean_mask(ring & ~big)
    assert not donut[70:90, 10:30].any() and donut[62:70, 2:38].all()


def test_bad_views_are_flagged_with_a_reason(lego_rgba):
    alpha = lego_rgba[:6, ..., 3:]
    photos = lego_rgba[:6, ..., :3] * alpha + (1 - alpha)
    photos[4] = 1.0  # a blank photo: nothing to mask
    photos[5, :, 50:] = photos[5, :, :-50].copy()  # the object moved right, cut off by the frame's edge
    photos[5, :, :50] = 1.0
    est = M.estimate_masks(photos, names=[f"p{i}.jpg" for i in range(6)], method="classical")
    assert list(np.flatnonzero(est.flagged)) == [4, 5], est.scores
    assert est.scores[:4].min() > M.FLAG_BELOW
    assert any("p4.jpg" in w and "too small" in w for w in est.warnings)
    assert any("p5.jpg" in w and "border" in w for w in est.warnings)


def test_segmenter_is_never_downloaded(tmp_path):
    with pytest.raises(PipelineError, match="segmenter is not usable.*classical"):
        M.estimate_masks(np.ones((1, 16, 16, 3)), method="segmenter", weights_dir=tmp_path)
    with pytest.raises(PipelineError, match="unknown"):
        M.estimate_masks(np.ones((1, 16, 16, 3)), method="magic")
    assert not any(tmp_path.iterdir())
