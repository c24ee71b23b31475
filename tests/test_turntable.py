"""Turntable prior: equal azimuth steps, elevation, focal from EXIF or FOV, distance from silhouettes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import events
from pipeline.cameras import Cameras
from pipeline.capture import Capture
from pipeline.config import CamerasConfig
from pipeline.importers import load_capture
from pipeline.reconstruct import estimate_missing
from pipeline.errors import PipelineError
from pipeline.turntable import focal_35mm_from_exif, focal_pixels, turntable_cameras, turntable_from_files


def _sphere_masks(cams: Cameras, radius: float) -> np.ndarray:  # [N, H, W]: where pixel rays hit the sphere
    h, w = (int(s) for s in cams.sizes[0])
    jj, ii = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    pix = np.stack([jj, ii, np.ones_like(jj)], -1).reshape(-1, 3)  # [P, 3]
    rays = np.einsum("nij,pj->npi", np.linalg.inv(cams.intrinsics), pix)  # camera frame
    rays = np.einsum("nji,npj->npi", cams.world_to_camera[:, :3, :3], rays)  # world frame
    rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
    c = cams.centers[:, None, :]  # [N, 1, 3]
    along = -(c * rays).sum(-1, keepdims=True)
    miss = np.linalg.norm(c + along * rays, axis=-1)  # distance of the ray's line from the origin
    return (miss < radius).reshape(len(cams), h, w).astype(np.float32)


def test_cameras_circle_the_object_at_equal_steps():
    masks = np.zeros((8, 60, 80), dtype=np.float32)
    masks[:, 20:40, 30:50] = 1
    cams = turntable_cameras(masks, elevation_deg=30.0, fov_deg=45.0)
    centres = cams.centers
    dist = np.linalg.norm(centres, axis=1)
    np.testing.assert_allclose(dist, dist[0])
    np.testing.assert_allclose(np.degrees(np.arcsin(centres[:, 2] / dist)), 30.0)
    azimuth = np.degrees(np.arctan2(centres[:, 1], centres[:, 0]))
    np.testing.assert_allclose(np.diff(np.unwrap(np.radians(azimuth))), np.radians(45.0))
    xy, depth = cams.project(np.zeros((1, 3)))
    np.testing.assert_allclose(xy[:, 0], [[40.0, 30.0]] * 8)  # the origin at the image centre
    assert (depth > 0).all()
    # Image "up" (-y of the camera) points to world +z for every view: no roll.
    assert (cams.world_to_camera[:, 1, 2] < 0).all()
    np.testing.assert_allclose(2 * np.degrees(np.arctan(40 / cams.intrinsics[0, 0, 0])), 45.0)


@pytest.mark.parametrize("elevation, fov", [(20.0, 40.0), (-10.0, 60.0)])
def test_distance_fitted_to_the_silhouettes(elevation, fov):
    true = turntable_cameras(np.pad(np.ones((12, 2, 2)), ((0, 0), (47, 47), (47, 47))), elevation, fov)
    # Place the true cameras at distance 3 from a sphere of radius 0.8, render its silhouettes.
    scale = 3.0 / np.linalg.norm(true.centers[0])
    true.world_to_camera[:, :3, 3] *= scale
    masks = _sphere_masks(true, 0.8)
    fitted = turntable_cameras(masks, elevation, fov, radius=0.8)
    np.testing.assert_allclose(np.linalg.norm(fitted.centers, axis=1), 3.0, rtol=0.03)
    np.testing.assert_allclose(fitted.world_to_camera[:, :3, :3], true.world_to_camera[:, :3, :3], atol=1e-9)


def test_focal_from_exif_35mm_equivalent(tmp_path):
    exif = Image.Exif()
    exif.get_ifd(0x8769)[41989] = 28  # FocalLengthIn35mmFilm
    Image.new("RGB", (120, 90), "white").save(tmp_path / "a.jpg", exif=exif)
    Image.new("RGB", (120, 90), "white").save(tmp_path / "b.jpg")
    assert focal_35mm_from_exif(tmp_path / "a.jpg") == 28.0
    assert focal_35mm_from_exif(tmp_path / "b.jpg") is None
    assert focal_pixels((90, 120), focal_35mm=28.0) == pytest.approx(28 / 36 * 120)
    masks = np.zeros((4, 90, 120), dtype=np.float32)
    masks[:, 30:60, 40:80] = 1
    cams = turntable_from_files(masks, [tmp_path / "b.jpg", tmp_path / "a.jpg"])
    assert cams.intrinsics[0, 0, 0] == pytest.approx(28 / 36 * 120)


def test_bad_settings_say_what_to_give():
    masks = np.ones((4, 10, 10), dtype=np.float32)
    with pytest.raises(PipelineError, match="at least 3"):
        turntable_cameras(masks[:2])
    with pytest.raises(PipelineError, match="elevation"):
        turntable_cameras(masks, elevation_deg=95)
    with pytest.raises(PipelineError, match="field of view"):
        turntable_cameras(masks, fov_deg=0.1)
    with pytest.raises(PipelineError, match="empty"):
        turntable_cameras(np.zeros((4, 10, 10)))


def test_reconstruct_estimates_masks_and_turntable_cameras_as_events():
    lego = load_capture(Path(__file__).parent / "fixtures" / "lego_128")
    photos = Capture(images=lego.images[:8], masks=None, cameras=None, names=lego.names[:8])
    collected, capture = events.collect(
        estimate_missing(photos, CamerasConfig(source="turntable", turntable_elevation_deg=25.0, fov_deg=40.0)))
    assert capture.masks is not None and capture.cameras is not None and len(capture) == 8
    assert any(isinstance(e, events.Metrics) and "mask_quality_mean" in e.values for e in collected)
    assert any(isinstance(e, events.Progress) and "turntable" in e.message for e in collected)
    centres = capture.cameras.centers
    np.testing.assert_allclose(np.degrees(np.arcsin(centres[:, 2] / np.linalg.norm(centres, axis=1))), 25.0)
