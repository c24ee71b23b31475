"""The two captures a new user brought, on fixtures like them: both give a model.

1. Phone photos without cameras, most held in portrait (stored sideways with an EXIF tag, or turned
   in their pixels), a third in landscape, some at a lower resolution (lego_sfm_300 cut to 300x240).
2. A posed capture on a cluttered background without masks (lego_128 over real photographs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clutter import masks_on_clutter, on_photographs
from pipeline import events
from pipeline.config import apply_overrides, preset
from pipeline.export import load_glb_in_world
from pipeline.importers import load_capture
from pipeline.normalize import normalize_scene
from pipeline.reconstruct import reconstruct

FIXTURES = Path(__file__).parent / "fixtures"
ORIENTATION_TAG = 0x0112


def _run(capture, out, **overrides):
    config = apply_overrides(preset("fast"), {"refine.iterations": 60, "refine.texture_size": 256,
                                               "hull.grid_resolution": 64, **overrides})
    collected = list(reconstruct(capture, config, out, device="cpu"))
    results = [e for e in collected if isinstance(e, events.Result)]
    assert results, [repr(e)[:300] for e in collected if isinstance(e, events.Warning)]
    return results[0], collected


def _phone_photos(folder: Path) -> Path:
    """lego_sfm_300 as a phone capture: view i % 3 == 0 held in landscape (stored as is), == 1 in
    portrait stored sideways with EXIF Orientation 6, == 2 in portrait turned in its pixels; every
    fourth photo saved at 4/5 of the size (another camera setting)."""
    folder.mkdir(parents=True)
    for i, path in enumerate(sorted((FIXTURES / "lego_sfm_300" / "images").glob("*.jpg"))):
        landscape = np.asarray(Image.open(path))[30:270]  # 300x240
        exif = Image.Exif()
        pixels = landscape
        if i % 3 == 1:
            exif[ORIENTATION_TAG] = 6  # a viewer turns it a quarter clockwise: portrait
        elif i % 3 == 2:
            pixels = np.rot90(landscape, -1)
        photo = Image.fromarray(np.ascontiguousarray(pixels))
        if i % 4 == 3:
            photo = photo.resize((photo.width * 4 // 5, photo.height * 4 // 5), Image.LANCZOS)
        photo.save(folder / path.name, quality=95, exif=exif)
    return folder


def test_phone_photos_of_mixed_orientation_and_size_give_a_model(tmp_path):
    capture = load_capture(_phone_photos(tmp_path / "photos"), max_side=256)
    assert capture.images.shape[1:3] == (256, 205) and capture.cameras is None
    assert any("10 landscape photo(s) among 20 portrait ones are turned" in w for w in capture.warnings)
    result, collected = _run(capture, tmp_path / "out", **{"ingest.holdout_every": 5})
    metrics = result.metrics
    print({k: round(v, 3) for k, v in metrics.items()})
    # Plain pycolmap defaults place 6 of these 30 views (bench/sfm_vs_colmap.py on lego_sfm_300).
    assert metrics["cameras_photos"] == 30 and metrics["cameras_registered"] >= 20
    assert metrics["heldout_mask_iou"] >= 0.8 and metrics["train_mask_iou"] >= 0.85
    started = next(e for e in collected if isinstance(e, events.StageStarted) and e.stage == "cameras")
    assert "structure from motion on 30 photos" in started.message


@pytest.fixture(scope="module")
def cluttered_lego():
    capture = load_capture(FIXTURES / "lego_128")
    cluttered, truth = on_photographs(capture)
    return capture, truth, masks_on_clutter(cluttered, truth)


def test_masks_from_geometry_match_lego_on_real_photographs(cluttered_lego):
    _, _, (done, iou, _) = cluttered_lego
    print("lego_128 IoU", iou.mean(), iou.min())
    assert iou.mean() >= 0.85


def test_posed_capture_on_clutter_without_masks_gives_the_object_not_the_room(cluttered_lego, tmp_path):
    """`reconstruct` on the capture `estimate_missing` completed (what it does itself for a capture
    without masks): the model's extent is the object's, found from the true masks."""
    original, truth, (done, _, _) = cluttered_lego
    result, _ = _run(done, tmp_path)
    vertices = load_glb_in_world(result.glb_path).vertices
    _, world_from_normalised = normalize_scene(original.cameras, truth)
    true_size = 2 * 0.9 * world_from_normalised[0, 0]  # the true box's longest side
    size = float(np.ptp(vertices, axis=0).max())
    centre = (vertices.max(0) + vertices.min(0)) / 2
    print("model size", size, "true", true_size)
    assert abs(size - true_size) <= 0.15 * true_size
    assert np.linalg.norm(centre - world_from_normalised[:3, 3]) <= 0.1 * true_size
