"""Masks without weights on cluttered backgrounds, from the geometry of the capture (pipeline/cosegment.py)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest

from clutter import masks_on_clutter, on_photographs
from pipeline import cosegment, events
from pipeline.cameras import Cameras, look_at
from pipeline.importers import load_capture

ASSETS = Path(__file__).parents[1] / "assets"


def _brute_force(cost_fg, cost_bg, image, smoothness):
    h, w = cost_fg.shape
    diffs = [((image[:, 1:] - image[:, :-1]) ** 2).sum(-1), ((image[1:] - image[:-1]) ** 2).sum(-1)]
    beta = 1.0 / (2.0 * np.mean(np.concatenate([d.ravel() for d in diffs])))
    best, best_energy = None, np.inf
    for bits in itertools.product([False, True], repeat=h * w):
        label = np.array(bits).reshape(h, w)
        energy = np.where(label, cost_fg, cost_bg).sum()
        energy += smoothness * (np.exp(-beta * diffs[0]) * (label[:, 1:] != label[:, :-1])).sum()
        energy += smoothness * (np.exp(-beta * diffs[1]) * (label[1:] != label[:-1])).sum()
        if energy < best_energy - 1e-9:
            best, best_energy = label, energy
    return best, best_energy


@pytest.mark.parametrize("seed", range(4))
def test_graph_cut_finds_the_exact_minimum(seed):
    rng = np.random.default_rng(seed)
    cost_fg, cost_bg = rng.uniform(0, 3, (2, 3, 3))
    image = rng.uniform(0, 1, (3, 3, 3))
    cost_fg[0, 0] = np.inf  # a hard background seed
    label = cosegment.graph_cut(cost_fg, cost_bg, image, smoothness=1.5)
    expect, _ = _brute_force(cost_fg, cost_bg, image, 1.5)
    assert not label[0, 0]
    np.testing.assert_array_equal(label, expect)


def _ring(count: int, radius: float, height: float, target=np.zeros(3)) -> Cameras:
    angles = np.linspace(0, 2 * np.pi, count, endpoint=False)
    eyes = np.stack([radius * np.cos(angles), radius * np.sin(angles), np.full(count, height)], 1)
    w2c = np.stack([look_at(e, target, np.array([0.0, 0.0, 1.0])) for e in eyes])
    k = np.tile(np.array([[80.0, 0, 64], [0, 80.0, 48], [0, 0, 1]]), (count, 1, 1))
    return Cameras(k, w2c, np.tile([96, 128], (count, 1)))


def test_the_focus_is_where_every_camera_looks_and_the_table_is_background():
    target = np.array([0.3, -0.2, 0.1])
    cameras = _ring(12, 3.0, 1.5, target)
    np.testing.assert_allclose(cosegment.common_focus(cameras), target, atol=1e-9)
    rng = np.random.default_rng(0)
    blob = target + rng.normal(0, 0.15, (300, 3)) * [1, 1, 0.5] + [0, 0, 0.25]  # the object, on the table
    table = np.concatenate([rng.uniform(-1.2, 1.2, (600, 2)), np.zeros((600, 1))], 1) + [0.3, -0.2, 0.0]
    room = rng.normal(0, 1, (200, 3)) * 6  # walls and furniture far away
    obj, bg, facts = cosegment.classify_points(cameras, np.concatenate([blob, table, room]))
    assert facts["plane"] is not None and abs(facts["plane"][0][2]) > 0.99
    assert obj[:300].mean() > 0.8 and obj[300:].mean() < 0.02
    assert bg[300:900].mean() > 0.9 and bg[:300].mean() < 0.05


def test_masks_from_geometry_match_the_truth_on_real_photographs():
    """A posed capture with no masks, each view over a different crop of a real photograph: the
    masks estimated from where the cameras look reach IoU >= 0.85 against the true masks (lego_128,
    the other fixture, is measured in test_phone_captures.py, whose reconstruction uses its masks)."""
    capture = load_capture(ASSETS / "mold_cape_12")
    cluttered, truth = on_photographs(capture, over_white=False)
    done, iou, seen = masks_on_clutter(cluttered, truth)
    print("mold_cape_12 IoU", iou.mean(), iou.min())
    assert len(done) == len(capture) and iou.mean() >= 0.85, iou
    assert any(isinstance(e, events.Metrics) and "mask_hull_iou_mean" in e.values for e in seen)


def test_when_most_estimated_masks_look_wrong_all_are_kept_and_the_message_says_what_to_change(monkeypatch):
    """Never "only 0 photo(s)": leaving out every flagged photo would leave too few, so none is left
    out, and the warning names them and the fixes."""
    from pipeline import masks as masks_mod  # noqa: PLC0415
    from pipeline.config import CamerasConfig  # noqa: PLC0415
    from pipeline.reconstruct import estimate_missing  # noqa: PLC0415

    capture = load_capture(ASSETS / "mold_cape_12")
    bare = dataclasses.replace(capture, masks=None)
    real = masks_mod.estimate_masks

    def all_flagged(images, names=None, method="auto", weights_dir=None):
        est = real(images, names, method="classical")
        est.flagged[:] = True
        est.warnings = [f"mask of {n} looks wrong (object touches the border, quality 0.10); ..." for n in names]
        return est

    monkeypatch.setattr(masks_mod, "estimate_masks", all_flagged)
    seen, done = events.collect(estimate_missing(bare, CamerasConfig(masks="classical")))
    warnings = [event.message for event in seen if isinstance(event, events.Warning)]
    assert len(done) == 12 and done.masks.shape == (12, 128, 128)
    text = " ".join(warnings)
    assert "12 of 12 estimated masks look wrong" in text and "kept them all" in text and capture.names[0] in text
    assert "masks/ folder" in text and "plain background" in text
