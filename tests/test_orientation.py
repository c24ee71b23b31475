"""Photos of any orientation and size in one capture: cameras follow every turn and resize exactly.

The captures here are lego_128's posed views cropped to 128x96 (so that orientation means something)
and written as this project's cameras.json; some photos are turned a quarter by their pixels (their
cameras turned with them), some only by an EXIF tag (their cameras given for the photo as a viewer
shows it), some stored at another size. Loading brings all of them onto the 128x96 canvas.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import events
from pipeline.cameras import Cameras
from pipeline.config import apply_overrides, preset
from pipeline.importers import load_capture, save_cameras_json
from pipeline.reconstruct import reconstruct

LEGO = Path(__file__).parent / "fixtures" / "lego_128"
CROP = slice(16, 112)  # rows kept: 128x96 landscape photos
ORIENTATION_TAG = 0x0112


def _random_cameras(count: int, rng: np.random.Generator, size=(30, 40)) -> Cameras:
    k = np.tile(np.array([[50.0, 0, 21.5], [0, 47.0, 13.0], [0, 0, 1]]), (count, 1, 1))
    k[:, :2, 2] += rng.normal(0, 1, (count, 2))
    q, _ = np.linalg.qr(rng.normal(size=(count, 3, 3)))
    q *= np.sign(np.linalg.det(q))[:, None, None]
    w2c = np.tile(np.eye(4), (count, 1, 1))
    w2c[:, :3, :3] = q
    w2c[:, :3, 3] = rng.normal(0, 0.3, (count, 3)) + [0, 0, 5]
    return Cameras(k, w2c, np.tile(size, (count, 1)))


@pytest.mark.parametrize("turns", [1, 2, 3, 4])
def test_turned_and_resized_cameras_see_the_turned_and_resized_pixels(turns):
    rng = np.random.default_rng(turns)
    cams = _random_cameras(5, rng)
    points = rng.normal(0, 0.5, (50, 3))
    xy, depth = cams.project(points)
    turned = cams.turned(turns)
    expect = xy.copy()
    height, width = 30, 40
    for _ in range(turns):  # one clockwise quarter of an H x W image: (x, y) -> (H - y, x)
        expect = np.stack([height - expect[..., 1], expect[..., 0]], axis=-1)
        height, width = width, height
    got, got_depth = turned.project(points)
    np.testing.assert_allclose(got, expect, atol=1e-9)
    np.testing.assert_allclose(got_depth, depth, atol=1e-12)
    assert (turned.sizes == [height, width]).all()
    resized = turned.resized((2 * height, 3 * width))  # anisotropic
    np.testing.assert_allclose(resized.project(points)[0], expect * [3, 2], atol=1e-9)
    np.testing.assert_allclose(np.linalg.det(turned.world_to_camera[:, :3, :3]), 1.0)


def test_the_pixels_turn_like_the_cameras():
    """np.rot90(image, -1) is the clockwise quarter `Cameras.turned` describes (pixel-centre convention)."""
    image = np.zeros((3, 5))
    image[0, 4] = 1.0  # the pixel whose centre is (x, y) = (4.5, 0.5)
    turned = np.rot90(image, -1)
    row, col = np.argwhere(turned == 1.0)[0]
    assert (col + 0.5, row + 0.5) == (3 - 0.5, 4.5)  # (H - y, x)


def _lego_views():
    capture = load_capture(LEGO)
    k = capture.cameras.intrinsics.copy()
    k[:, 1, 2] -= CROP.start
    cameras = Cameras(k, capture.cameras.world_to_camera, np.tile([96, 128], (len(capture), 1)))
    return capture.images[:, CROP], capture.masks[:, CROP], cameras, [Path(n).stem for n in capture.names]


def _write(folder: Path, treatment: dict[int, str]) -> Path:
    """The cropped lego capture as photos with alpha plus cameras.json; view i treated as
    ``treatment[i]``: "pixels" (stored turned a quarter clockwise, camera turned), "exif" (stored as
    is, tagged Orientation 8 so a viewer turns it a quarter counter-clockwise; camera given for that
    upright view) or "small" (stored at 96x72, camera for that size)."""
    images, masks, cameras, stems = _lego_views()
    folder.mkdir(parents=True, exist_ok=True)
    files, stored = [], []
    for i, stem in enumerate(stems):
        rgba = np.concatenate([images[i], masks[i][..., None]], axis=-1)
        rgba = np.round(rgba * 255).astype(np.uint8)
        camera = cameras[i]
        exif = Image.Exif()
        how = treatment.get(i)
        if how == "pixels":
            rgba, camera = np.rot90(rgba, -1), camera.turned(1)
        elif how == "exif":
            exif[ORIENTATION_TAG] = 8  # view = stored turned 90 degrees counter-clockwise = 3 clockwise quarters
            camera = camera.turned(3)
        elif how == "small":
            rgba, camera = np.asarray(Image.fromarray(rgba).resize((96, 72), Image.LANCZOS)), camera.resized((72, 96))
        Image.fromarray(np.ascontiguousarray(rgba)).save(folder / f"{stem}.png", exif=exif)
        files.append(f"{stem}.png")
        stored.append(camera)
    all_cameras = Cameras(np.concatenate([c.intrinsics for c in stored]),
                          np.concatenate([c.world_to_camera for c in stored]), np.concatenate([c.sizes for c in stored]))
    save_cameras_json(all_cameras, files, folder / "cameras.json")
    return folder


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    root = tmp_path_factory.mktemp("orientation")
    third = {i: ("pixels" if i % 2 else "exif") for i in range(0, 24, 3)}  # 8 of 24 views
    return {
        "plain": load_capture(_write(root / "plain", {})),
        "turned": load_capture(_write(root / "turned", third)),
        "sizes": load_capture(_write(root / "sizes", {i: "small" for i in range(1, 24, 3)})),
    }


def test_turned_photos_land_on_the_canvas_with_their_cameras(captures):
    plain, turned = captures["plain"], captures["turned"]
    assert turned.images.shape == plain.images.shape == (24, 96, 128, 3)
    assert any("8 portrait photo(s) among 16 landscape ones are turned" in w for w in turned.warnings), turned.warnings
    assert any("turned upright as their EXIF orientation says" in w for w in turned.warnings)
    # Every view's camera sees a 3D point where that view's pixels show it: project points of the
    # object with both captures' cameras and compare the pixels found there.
    points = np.random.default_rng(0).uniform(-0.6, 0.6, (400, 3))
    for i in range(24):
        xy_p, _ = plain.cameras[i].project(points)
        xy_t, _ = turned.cameras[i].project(points)
        ok = ((xy_p[0] > 2) & (xy_p[0] < [126, 94])).all(1) & ((xy_t[0] > 2) & (xy_t[0] < [126, 94])).all(1)
        a = _sample(plain.masks[i], xy_p[0, ok])
        b = _sample(turned.masks[i], xy_t[0, ok])
        assert np.abs(a - b).max() < 1e-5, f"view {i}"


def _sample(image: np.ndarray, xy: np.ndarray) -> np.ndarray:  # nearest pixel under continuous (x, y)
    return image[np.floor(xy[:, 1]).astype(int), np.floor(xy[:, 0]).astype(int)]


def test_photos_of_another_size_are_resized_onto_the_canvas_cameras_following(captures):
    plain, sizes = captures["plain"], captures["sizes"]
    assert sizes.images.shape == plain.images.shape
    assert any("8 photo(s) of another size are resized to the most common, 128x96" in w for w in sizes.warnings)
    np.testing.assert_allclose(sizes.cameras.intrinsics, plain.cameras.intrinsics, atol=1e-9)
    small = np.arange(1, 24, 3)
    iou = ((sizes.masks[small] > 0.5) & (plain.masks[small] > 0.5)).sum() / ((sizes.masks[small] > 0.5) | (plain.masks[small] > 0.5)).sum()
    assert iou > 0.95  # the same silhouettes, blurred by the round trip through 96x72


def _reconstruct(capture, out):
    config = apply_overrides(preset("fast"), {"refine.iterations": 60, "refine.texture_size": 256,
                                               "ingest.holdout_every": 4, "hull.grid_resolution": 64})
    result = None
    for event in reconstruct(capture, config, out, device="cpu"):
        if isinstance(event, events.Result):
            result = event
    assert result is not None
    return result.metrics


def test_a_third_turned_reconstructs_as_well_as_none_turned(captures, tmp_path):
    plain = _reconstruct(captures["plain"], tmp_path / "plain")
    turned = _reconstruct(captures["turned"], tmp_path / "turned")
    print("plain", plain, "turned", turned)
    for key in ("heldout_mask_iou", "heldout_psnr"):
        assert abs(turned[key] - plain[key]) <= 0.02 * plain[key], (key, plain[key], turned[key])
    assert plain["heldout_mask_iou"] > 0.8


def test_upload_summary_names_every_photo_turned_resized_or_left_out_at_once(tmp_path):
    """Phone photos as dropped: portrait ones stored sideways with an EXIF tag, a few true landscape
    ones, one of another size, one that is not a photo. The summary names all of them before Run."""
    from ui.uploads import sort_uploads  # noqa: PLC0415

    rng = np.random.default_rng(0)
    files = []
    for i in range(7):
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = 6  # stored 80x60, shown 60x80
        files.append(tmp_path / f"IMG_{i}.JPG")
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(files[-1], exif=exif)
    for i, size in ((7, (60, 80)), (8, (60, 80)), (9, (90, 120))):  # landscape as stored, no tag
        files.append(tmp_path / f"IMG_{i}.JPG")
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(files[-1])
    files.append(tmp_path / "IMG_10.JPG")
    Image.fromarray(rng.integers(0, 255, (100, 60, 3), dtype=np.uint8)).save(files[-1])  # portrait, other size
    (tmp_path / "notes.JPG").write_text("not a photo")
    files.append(tmp_path / "notes.JPG")
    uploads = sort_uploads(files, tmp_path / "job")
    text = "\n".join(uploads.notices)
    assert "notes.JPG" in text and "left out" in text
    assert "7 photo(s) turned upright" in text and all(f"IMG_{i}.JPG" in text for i in range(7))
    assert "3 landscape photo(s) among 8 portrait ones are turned 90 degrees" in text
    assert all(f"IMG_{i}.JPG (" in text for i in (7, 8, 9))
    assert "IMG_10.JPG (60x100)" in text and "stretched to 60x80" in text
    assert "resized to the most common, 60x80 (cameras follow): IMG_9.JPG (90x120)" in text  # turned, then resized
    assert "/tmp" not in text.replace(str(tmp_path), "<tmp>")  # names the user knows, not upload paths


@pytest.mark.parametrize("kind", ["turned", "sizes"])
def test_the_cameras_file_written_loads_again_with_the_same_photos(captures, kind, tmp_path):
    """The cameras.json a run writes refers to the photos as they are, not to the canvas: loading it
    with the same photos gives the same canvas cameras."""
    capture = captures[kind]
    folder = tmp_path / kind
    shutil.copytree(Path(capture.source).parent, folder)
    moved = dataclasses.replace(capture, originals=[dataclasses.replace(o, path=folder / o.path.name)
                                                    for o in capture.originals])
    save_cameras_json(moved, None, folder / "cameras.json")
    again = load_capture(folder)
    np.testing.assert_allclose(again.cameras.intrinsics, capture.cameras.intrinsics, atol=1e-9)
    np.testing.assert_allclose(again.cameras.world_to_camera, capture.cameras.world_to_camera, atol=1e-12)
    np.testing.assert_array_equal(again.cameras.sizes, capture.cameras.sizes)
