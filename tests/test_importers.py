"""Importers: every format against the committed fixtures, conventions, and every bad-input message."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pycolmap
import pytest
from PIL import Image
from scipy import ndimage
from scipy.spatial.transform import Rotation

from pipeline.cameras import Cameras
from pipeline.errors import PipelineError
from pipeline.importers import detect_format, load_capture, save_cameras_json
from pipeline.importers.pixels import distort, draft_size, read_image

FIXTURES = Path(__file__).parent / "fixtures"
LEGO = FIXTURES / "lego_128"
MOLD = FIXTURES / "mold_cape_small"
LEGO_BOX = np.array([[-0.7, -1.25, -0.45], [0.7, 1.25, 1.1]])  # contains the lego model (world z-up)


@pytest.fixture(scope="module")
def lego():
    return load_capture(LEGO)


@pytest.fixture(scope="module")
def mold():
    return load_capture(MOLD)


def _copy(fixture: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(fixture, tmp_path / fixture.name))


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _assert_same_cameras(a: Cameras, b: Cameras, tol: float) -> None:
    np.testing.assert_allclose(a.intrinsics, b.intrinsics, atol=tol, rtol=0)
    np.testing.assert_allclose(a.world_to_camera, b.world_to_camera, atol=tol, rtol=0)
    np.testing.assert_array_equal(a.sizes, b.sizes)


def _raises(source, *fragments, **kwargs) -> str:
    with pytest.raises(PipelineError) as info:
        load_capture(source, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---------------------------------------------------------------- NeRF / instant-ngp


def test_nerf_reads_train_split_with_alpha_masks(lego):
    meta = json.loads((LEGO / "transforms_train.json").read_text())
    assert detect_format(LEGO) == "transforms"
    assert lego.images.shape == (24, 128, 128, 3) and lego.images.dtype == np.float32
    assert lego.names[0] == "train/r_0.png" and lego.warnings == []
    focal = 64 / np.tan(meta["camera_angle_x"] / 2)
    np.testing.assert_allclose(lego.cameras.intrinsics[:, 0, 0], focal)
    np.testing.assert_allclose(lego.cameras.intrinsics[:, :2, 2], 64.0)
    # OpenGL camera-to-world -> OpenCV world-to-camera: same centre, y and z axes flipped.
    c2w = np.array([f["transform_matrix"] for f in meta["frames"]])  # [24, 4, 4]
    np.testing.assert_allclose(lego.cameras.centers, c2w[:, :3, 3], atol=1e-6)
    rot = lego.cameras.world_to_camera[:, :3, :3]
    np.testing.assert_allclose(rot, np.transpose(c2w[:, :3, :3] * [1, -1, -1], (0, 2, 1)), atol=1e-6)
    # RGB composited over white where the alpha mask is 0.
    background = lego.masks == 0
    assert background.mean() > 0.3
    np.testing.assert_allclose(lego.images[background], 1.0)


def test_nerf_test_split():
    held_out = load_capture(LEGO, split="test")
    assert len(held_out) == 8 and all(n.startswith("test/") for n in held_out.names)
    _raises(MOLD, "split='test'", split="test")


def test_instant_ngp_gives_the_same_cameras(lego, tmp_path):
    folder = _copy(LEGO, tmp_path)
    meta = json.loads((LEGO / "transforms_train.json").read_text())
    focal = 64 / np.tan(meta["camera_angle_x"] / 2)
    top = {"fl_x": focal, "fl_y": focal, "cx": 64.0, "cy": 64.0, "w": 128, "h": 128, "k1": 0.0, "p1": 0.0}
    (folder / "transforms_train.json").unlink()
    (folder / "transforms.json").write_text(json.dumps({**top, "frames": meta["frames"], "aabb_scale": 4}))
    _assert_same_cameras(load_capture(folder).cameras, lego.cameras, 1e-9)
    # Per-frame intrinsics (nerfstudio), calibrated at twice the resolution: a uniform rescale is fine.
    double = {k: v * 2 for k, v in top.items() if k in ("fl_x", "fl_y", "cx", "cy", "w", "h")}
    frames = [{**f, **double} for f in meta["frames"]]
    (folder / "transforms.json").write_text(json.dumps({"frames": frames}))
    _assert_same_cameras(load_capture(folder).cameras, lego.cameras, 1e-9)


def test_missing_frame_image_is_skipped_with_warning(lego, tmp_path):
    folder = _copy(LEGO, tmp_path)
    (folder / "train" / "r_4.png").unlink()
    capture = load_capture(folder)
    assert len(capture) == 23 and "train/r_4.png" not in capture.names
    assert any("r_4" in w and "skipped" in w for w in capture.warnings)
    keep = [i for i, n in enumerate(lego.names) if n != "train/r_4.png"]
    _assert_same_cameras(capture.cameras, lego.cameras[keep], 0)


def test_file_list_source_resolves_by_name(lego, tmp_path):
    # Browser uploads: every file in its own folder.
    files = []
    for i, path in enumerate([LEGO / "transforms_train.json", *sorted((LEGO / "train").glob("*.png"))]):
        (tmp_path / str(i)).mkdir()
        files.append(shutil.copy(path, tmp_path / str(i) / path.name))
    capture = load_capture(files)
    assert sorted(capture.names) == sorted(n.split("/")[1] for n in lego.names)
    _assert_same_cameras(capture.cameras, lego.cameras, 0)


def test_max_side_downscales_and_scales_intrinsics(lego):
    small = load_capture(LEGO, max_side=64)
    assert small.resolution == (64, 64)
    _assert_same_cameras(small.cameras, lego.cameras.scaled(0.5), 1e-9)
    assert any("128x128" in w and "64x64" in w for w in small.warnings)


# ---------------------------------------------------------------- conventions (no reconstruction needed)


def test_lego_origin_and_bounding_box_project_onto_the_masks(lego):
    """The object centre lands in every mask and every mask lies inside the projected box: proves the
    axis flip, the rotation/translation order and that image row 0 is the top."""
    height = lego.resolution[0]
    masks = lego.masks > 0.5
    xy, depth = lego.cameras.project(np.zeros((1, 3)))  # [N, 1, 2], [N, 1]
    assert np.all(depth > 0)
    cols, rows = np.floor(xy[:, 0]).astype(int).T
    assert np.all(masks[np.arange(len(lego)), rows, cols])

    corners = np.stack(np.meshgrid(*LEGO_BOX.T, indexing="ij"), axis=-1).reshape(-1, 3)  # [8, 3]
    uv, _ = lego.cameras.project(corners)  # [N, 8, 2]
    lo, hi = uv.min(axis=1), uv.max(axis=1)  # [N, 2]
    view, i, j = np.nonzero(masks)
    inside = (j + 0.5 >= lo[view, 0]) & (j + 0.5 <= hi[view, 0]) & (i + 0.5 >= lo[view, 1]) & (i + 0.5 <= hi[view, 1])
    assert inside.all()
    # The same test on upside-down masks fails: it can tell the row order.
    i_flipped = height - 1 - i
    flipped = (i_flipped + 0.5 >= lo[view, 1]) & (i_flipped + 0.5 <= hi[view, 1])
    assert not flipped.all()


def _silhouette_agreement(cameras: Cameras, masks: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    """Carve a 48^3 grid of the cube (centre, radius) with the masks; per view, the fraction of mask
    pixels the surviving points cover (1 when masks and cameras agree)."""
    n, height, width = masks.shape
    g = (np.arange(48) + 0.5) / 48 * 2 - 1
    points = centre + radius * np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1).reshape(-1, 3)
    uv, depth = cameras.project(points)  # [N, P, 2], [N, P]
    j, i = np.floor(uv[..., 0]).astype(int), np.floor(uv[..., 1]).astype(int)
    seen = (j >= 0) & (j < width) & (i >= 0) & (i < height) & (depth > 0)
    view = np.broadcast_to(np.arange(n)[:, None], seen.shape)
    in_mask = np.zeros_like(seen)
    in_mask[seen] = masks[view[seen], i[seen], j[seen]]
    kept = (in_mask | ~seen).all(axis=0)
    out = []
    for v in range(n):
        silhouette = np.zeros((height, width), dtype=bool)
        silhouette[i[v, kept & seen[v]], j[v, kept & seen[v]]] = True
        silhouette = ndimage.binary_dilation(silhouette, iterations=2)
        out.append((silhouette & masks[v]).sum() / masks[v].sum())
    return np.array(out)


def test_mold_cape_masks_agree_with_poses_and_bounds(mold):
    """LLFF axes and row order: the masks lie inside the region implied by the poses and near bounds,
    and carving that region with the masks gives a shape whose silhouettes match every mask."""
    near = np.load(MOLD / "poses_bounds.npy")[:, 15]  # [N]
    centres, forward = mold.cameras.centers, mold.cameras.world_to_camera[:, 2, :3]
    perp = np.eye(3) - np.einsum("ni,nj->nij", forward, forward)  # [N, 3, 3]
    target = np.linalg.solve(perp.sum(0), np.einsum("nij,nj->i", perp, centres))  # where the optical axes meet
    radius = (np.linalg.norm(centres - target, axis=1) - near).max()
    corners = target + radius * np.stack(np.meshgrid([-1, 1], [-1, 1], [-1, 1]), axis=-1).reshape(-1, 3)
    uv, depth = mold.cameras.project(corners)
    assert np.all(depth > 0)
    masks = mold.masks > 0.5
    view, i, j = np.nonzero(masks)
    lo, hi = uv.min(axis=1), uv.max(axis=1)
    assert np.all((j + 0.5 >= lo[view, 0]) & (j + 0.5 <= hi[view, 0]))
    assert np.all((i + 0.5 >= lo[view, 1]) & (i + 0.5 <= hi[view, 1]))
    assert _silhouette_agreement(mold.cameras, masks, target, radius).min() > 0.85
    assert _silhouette_agreement(mold.cameras, masks[:, ::-1], target, radius).max() < 0.6  # upside down: no


def test_lego_masks_agree_with_cameras(lego):
    masks = lego.masks > 0.5
    assert _silhouette_agreement(lego.cameras, masks, np.zeros(3), 1.5).min() > 0.85
    assert _silhouette_agreement(lego.cameras, masks[:, :, ::-1], np.zeros(3), 1.5).max() < 0.6


# ---------------------------------------------------------------- LLFF


def test_llff_reads_mold_cape(mold):
    table = np.load(MOLD / "poses_bounds.npy")
    poses = table[:, :15].reshape(-1, 3, 5)  # [N, 3, 5]
    assert detect_format(MOLD) == "llff"
    assert mold.names == sorted(mold.names) and mold.names[0] == "images/IMG_5881.JPG"
    assert mold.masks is not None and set(np.unique(mold.masks)) <= {0.0, 1.0}
    np.testing.assert_allclose(mold.cameras.intrinsics[:, 0, 0], poses[:, 2, 4])
    np.testing.assert_allclose(mold.cameras.centers, poses[:, :, 3], atol=1e-9)
    rot = mold.cameras.world_to_camera[:, :3, :3]  # rows = camera axes in world: right, down, forward
    np.testing.assert_allclose(rot[:, 0], poses[:, :, 1], atol=1e-9)
    np.testing.assert_allclose(rot[:, 1], poses[:, :, 0], atol=1e-9)
    np.testing.assert_allclose(rot[:, 2], -poses[:, :, 2], atol=1e-9)


def test_llff_focal_follows_the_image_size_and_masks_match_by_order(mold, tmp_path):
    folder = _copy(MOLD, tmp_path)
    table = np.load(MOLD / "poses_bounds.npy")
    table[:, [4, 9, 14]] *= 4  # H, W, focal for the 512 px originals
    np.save(folder / "poses_bounds.npy", table)
    for k, mask in enumerate(sorted((folder / "masks").iterdir())):
        mask.rename(folder / "masks" / f"m{k:02d}.png")
    capture = load_capture(folder)
    _assert_same_cameras(capture.cameras, mold.cameras, 1e-9)
    np.testing.assert_array_equal(capture.masks, mold.masks)


# ---------------------------------------------------------------- COLMAP


def _colmap_text_model(folder: Path, cameras: Cameras, names: list[str], model="PINHOLE", extra=()) -> None:
    """A COLMAP text model written by hand (format of colmap.github.io/format.html)."""
    folder.mkdir(parents=True)
    lines_cam, lines_img = [], []
    for k, (name, K, w2c, (h, w)) in enumerate(zip(names, cameras.intrinsics, cameras.world_to_camera, cameras.sizes)):
        params = [K[0, 0], K[1, 1], K[0, 2], K[1, 2], *extra]
        lines_cam.append(f"{k + 1} {model} {w} {h} " + " ".join(repr(float(p)) for p in params))
        qx, qy, qz, qw = Rotation.from_matrix(w2c[:3, :3]).as_quat()
        pose = " ".join(repr(float(v)) for v in (qw, qx, qy, qz, *w2c[:3, 3]))
        lines_img += [f"{k + 1} {pose} {k + 1} {name}", ""]
    (folder / "cameras.txt").write_text("# CAMERA_ID MODEL WIDTH HEIGHT PARAMS[]\n" + "\n".join(lines_cam) + "\n")
    (folder / "images.txt").write_text("# IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME\n" + "\n".join(lines_img) + "\n")
    (folder / "points3D.txt").write_text("")


def _lego_as_colmap(tmp_path: Path, lego) -> Path:
    folder = tmp_path / "colmap"
    shutil.copytree(LEGO / "train", folder / "images")
    _colmap_text_model(folder / "sparse" / "0", lego.cameras, [n.split("/")[1] for n in lego.names])
    return folder


def test_colmap_text_model_round_trip(lego, tmp_path):
    folder = _lego_as_colmap(tmp_path, lego)
    assert detect_format(folder) == "colmap"
    capture = load_capture(folder)
    assert capture.names == sorted(capture.names) and capture.names[0] == "images/r_0.png"
    order = [lego.names.index("train/" + n.split("/")[1]) for n in capture.names]
    _assert_same_cameras(capture.cameras, lego.cameras[order], 1e-6)
    np.testing.assert_array_equal(capture.masks, lego.masks[order])


def test_colmap_binary_model_written_by_pycolmap(lego, tmp_path):
    folder = tmp_path / "scene"
    shutil.copytree(LEGO / "train", folder / "images")
    model = pycolmap.Reconstruction()
    for k, (name, K, w2c) in enumerate(zip(lego.names, lego.cameras.intrinsics, lego.cameras.world_to_camera)):
        params = [K[0, 0], K[0, 2], K[1, 2]]
        camera = pycolmap.Camera(model="SIMPLE_PINHOLE", width=128, height=128, params=params, camera_id=k + 1)
        model.add_camera_with_trivial_rig(camera)
        image = pycolmap.Image(name=name.split("/")[1], camera_id=k + 1, image_id=k + 1)
        model.add_image_with_trivial_frame(image, pycolmap.Rigid3d(w2c[:3]))
    (folder / "sparse" / "0").mkdir(parents=True)
    model.write_binary(str(folder / "sparse" / "0"))
    capture = load_capture(folder)
    order = [lego.names.index("train/" + n.split("/")[1]) for n in capture.names]
    _assert_same_cameras(capture.cameras, lego.cameras[order], 1e-6)


@pytest.mark.parametrize(
    "model, params", [("SIMPLE_RADIAL", [0.1]), ("RADIAL", [0.1, -0.05]), ("OPENCV", [0.1, -0.05, 0.01, -0.02])]
)
def test_distortion_model_matches_colmap(model, params):
    xy = np.random.default_rng(0).uniform(-0.5, 0.5, (50, 2))
    full = {"SIMPLE_RADIAL": [200, 64, 60], "RADIAL": [200, 64, 60], "OPENCV": [200, 200, 64, 60]}[model] + params
    camera = pycolmap.Camera(model=model, width=128, height=120, params=full)
    expected = camera.img_from_cam(np.column_stack([xy, np.ones(50)]))
    coeffs = np.zeros(4)
    coeffs[: len(params)] = params
    if model == "SIMPLE_RADIAL":
        coeffs[1] = 0
    np.testing.assert_allclose(distort(xy, coeffs) * 200 + [64, 60], expected, atol=1e-9)


def _pattern(xy: np.ndarray) -> np.ndarray:  # smooth test picture as a function of normalised coordinates
    return 0.5 + 0.4 * np.sin(14 * xy[..., 0]) * np.cos(12 * xy[..., 1])


@pytest.mark.parametrize("fmt", ["colmap", "instant-ngp"])
def test_distorted_photos_are_undistorted(fmt, tmp_path):
    """A picture rendered through a distorting lens (pixel -> ray by COLMAP itself) comes back pinhole."""
    size, f, cx, cy, coeffs = 96, 90.0, 48.0, 47.0, [0.25, -0.1, 0.01, -0.015]
    camera = pycolmap.Camera(model="OPENCV", width=size, height=size, params=[f, f, cx, cy, *coeffs])
    rows, cols = np.mgrid[0:size, 0:size]
    centres = np.column_stack([cols.ravel() + 0.5, rows.ravel() + 0.5])
    distorted = _pattern(camera.cam_from_img(centres)).reshape(size, size)
    folder = tmp_path / "scene"
    (folder / "images").mkdir(parents=True)
    names = [f"v{k}.png" for k in range(3)]
    for name in names:
        Image.fromarray(np.round(distorted * 65535).astype(np.uint16)).save(folder / "images" / name)
    poses = np.tile(np.eye(4), (3, 1, 1))
    poses[:, 2, 3] = [3.0, 4.0, 5.0]
    cams = Cameras(np.tile([[f, 0, cx], [0, f, cy], [0, 0, 1]], (3, 1, 1)), poses, np.full((3, 2), size))
    if fmt == "colmap":
        _colmap_text_model(folder / "sparse", cams, names, model="OPENCV", extra=coeffs)
    else:
        c2w_opengl = np.linalg.inv(poses) @ np.diag([1.0, -1.0, -1.0, 1.0])
        frames = [{"file_path": f"images/{n}", "transform_matrix": m.tolist()} for n, m in zip(names, c2w_opengl)]
        keys = ["fl_x", "fl_y", "cx", "cy", "w", "h", "k1", "k2", "p1", "p2"]
        top = dict(zip(keys, [f, f, cx, cy, size, size, *coeffs]))
        (folder / "transforms.json").write_text(json.dumps({**top, "frames": frames}))
    capture = load_capture(folder)
    _assert_same_cameras(capture.cameras, cams, 1e-9)
    expected = _pattern((np.stack([cols + 0.5, rows + 0.5], axis=-1) - [cx, cy]) / f)
    inner = (slice(8, -8), slice(8, -8))
    assert np.abs(capture.images[0, ..., 0][inner] - expected[inner]).max() < 0.01
    assert np.abs(distorted[inner] - expected[inner]).max() > 0.1  # the lens did move things


# ---------------------------------------------------------------- cameras.json


def test_cameras_json_round_trip(lego, tmp_path):
    folder = _copy(LEGO, tmp_path)
    (folder / "transforms_train.json").unlink()
    masks = []
    for name in lego.names[:2]:  # two views get explicit mask files (they win over alpha)
        mask = folder / (name[:-4] + "_mask.png")
        Image.fromarray(np.full((128, 128), 255, np.uint8)).save(mask)
        masks.append(mask.relative_to(folder).as_posix())
    path = save_cameras_json(lego, None, folder / "cameras.json", mask_files=masks + [None] * (len(lego) - 2))
    assert detect_format(folder) == "cameras.json"
    capture = load_capture(folder)
    assert capture.names == lego.names and capture.source == str(path)
    _assert_same_cameras(capture.cameras, lego.cameras, 1e-12)  # rotations re-orthonormalised on load
    np.testing.assert_array_equal(capture.masks[:2], 1.0)
    np.testing.assert_array_equal(capture.masks[2:], lego.masks[2:])
    data = json.loads(path.read_text())
    assert data["format"] == "photo3d-cameras" and data["version"] == 1 and "mask" not in data["frames"][2]


# ---------------------------------------------------------------- plain photos


def _png16(path: Path, grey: np.ndarray) -> None:
    """A 16-bit greyscale PNG written by hand (no Pillow involved)."""
    height, width = grey.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in grey)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def _photo(seed: int, size=(40, 60)) -> np.ndarray:  # [H, W, 3] uint8
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def test_plain_photos_greyscale_16bit_exif_and_masks(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(_photo(0)).save(folder / "a.png")
    _png16(folder / "b.png", np.full((40, 60), 32768, dtype=np.uint16))
    Image.fromarray(_photo(2)[..., 0]).save(folder / "c.jpg", quality=95)  # greyscale JPEG
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    Image.fromarray(_photo(3, (60, 40))).save(folder / "d.png", exif=exif)
    capture = load_capture(folder)
    assert detect_format(folder) == "images" and capture.cameras is None and capture.masks is None
    assert capture.images.shape == (4, 40, 60, 3) and capture.names == ["a.png", "b.png", "c.jpg", "d.png"]
    np.testing.assert_allclose(capture.images[1], 32768 / 65535, atol=1e-6)
    assert np.all(capture.images[2, ..., 0] == capture.images[2, ..., 2])
    np.testing.assert_array_equal(capture.images[3], np.rot90(_photo(3, (60, 40)), k=-1) / np.float32(255))

    masks = folder / "masks"
    masks.mkdir()
    for k, name in enumerate(["a", "b", "c"]):
        columns = np.where(np.arange(60) < 10 * (k + 1), 255, 0).astype(np.uint8)  # left k+1 sixths are object
        Image.fromarray(np.tile(columns, (40, 1))).save(masks / f"{name}.png")
    partial = load_capture(folder)
    assert partial.masks is None and any("d.png" in w for w in partial.warnings)
    Image.fromarray(np.full((40, 60), 255, np.uint8)).save(folder / "d_mask.png")  # drawn on the upright photo
    full = load_capture(folder)
    assert full.names == capture.names and full.masks is not None
    np.testing.assert_allclose(full.masks[:3].mean(axis=(1, 2)), [1 / 6, 2 / 6, 3 / 6])


def test_plain_photos_alpha_and_mixed_sizes(tmp_path):
    folder = tmp_path / "photos" / "images"  # photos in images/ are found too
    folder.mkdir(parents=True)
    for k in range(3):
        rgba = np.concatenate([_photo(k), np.full((40, 60, 1), 255, np.uint8)], axis=2)
        rgba[:, :20, 3] = 0
        Image.fromarray(rgba).save(folder / f"v{k}.png")
    Image.fromarray(rgba).resize((120, 80), Image.NEAREST).save(folder / "v3.png")
    capture = load_capture(folder.parent)
    assert capture.images.shape == (4, 40, 60, 3) and capture.names[0] == "images/v0.png"
    np.testing.assert_allclose(capture.images[:, :, :16], 1.0)  # transparent -> white
    np.testing.assert_allclose(capture.masks[:3, :, :20], 0.0)
    np.testing.assert_allclose(capture.masks[:3, :, 20:], 1.0)
    assert any("v3.png" in w and "60x40" in w for w in capture.warnings)


def test_draft_size_divides_exactly_and_never_below_the_target():
    assert draft_size((4032, 3024), (512, 384)) == (1008, 756)  # 1/8 would leave 504 < 512
    assert draft_size((4032, 3024), (384, 512)) == (1008, 756)  # a portrait canvas of a sideways file
    assert draft_size((4032, 3024), (1600, 1200)) == (2016, 1512)
    assert draft_size((4032, 3024), (300, 200)) == (504, 378)
    assert draft_size((1024, 683), (64, 43)) == (1024, 683)  # 683 is odd: no exact scale
    assert draft_size((800, 600), (800, 600)) == (800, 600)


def test_large_jpegs_are_decoded_small_and_land_where_the_full_decode_does(tmp_path):
    """A JPEG much larger than the canvas is read at 1/2-1/8 scale (libjpeg's DCT scaling): the
    loaded view matches the full-size decode resized, and a dark square lands on the same pixels."""
    height, width = 1200, 1600
    rows, cols = np.mgrid[0:height, 0:width]
    picture = np.stack([128 + 100 * np.sin(cols / 90), 128 + 100 * np.cos(rows / 70), np.full_like(cols, 200.0)], -1)
    picture[500:620, 300:460] = 10.0  # the square: rows 500-620, columns 300-460 of 1200 x 1600
    folder = tmp_path / "photos"
    folder.mkdir()
    for k in range(3):
        Image.fromarray(np.roll(picture, 40 * k, axis=1).astype(np.uint8)).save(folder / f"p{k}.jpg", quality=95)
    assert read_image(folder / "p0.jpg", exif=True, target=(256, 192)).shape == (300, 400, 3)  # decoded at 1/4
    capture = load_capture(folder, max_side=256)
    assert capture.images.shape == (3, 192, 256, 3)
    full = np.asarray(Image.open(folder / "p0.jpg").convert("RGB"), dtype=np.float32) / 255
    reference = np.stack([np.asarray(Image.fromarray(full[..., c]).resize((256, 192), Image.LANCZOS))
                          for c in range(3)], -1)
    assert np.abs(capture.images[0] - reference).mean() < 0.01
    darkness = np.clip(0.3 - capture.images[0].mean(-1), 0.0, None)  # the background's mean is above 0.33
    rows, cols = np.indices(darkness.shape)
    centre = [(rows * darkness).sum() / darkness.sum(), (cols * darkness).sum() / darkness.sum()]
    np.testing.assert_allclose(centre, [560 * 0.16 - 0.5, 380 * 0.16 - 0.5], atol=0.1)  # scaled; pixel centres at +0.5


# ---------------------------------------------------------------- bad input -> PipelineError naming the file


def _break_lego_frame(tmp_path, edit) -> Path:
    folder = _copy(LEGO, tmp_path)
    _edit_json(folder / "transforms_train.json", lambda d: edit(d["frames"][3]))
    return folder


def _scale_rows(matrix, factors) -> list:
    return (np.array(matrix) * np.array(factors)[:, None]).tolist()


def test_too_few_views(tmp_path):
    folder = _copy(LEGO, tmp_path)
    _edit_json(folder / "transforms_train.json", lambda d: d.update(frames=d["frames"][:2]))
    _raises(folder, "transforms_train.json", "at least 3")
    shutil.rmtree(folder / "train")
    _raises(folder, "transforms_train.json", "only 0 usable", "./train/r_0", "not found")
    photos = tmp_path / "two"
    photos.mkdir()
    for k in range(2):
        Image.fromarray(_photo(k)).save(photos / f"{k}.jpg")
    _raises(photos, str(photos), "at least 3")
    _raises(tmp_path / "nowhere", "nowhere", "does not exist")


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda f: f["transform_matrix"][0].__setitem__(3, float("nan")), "NaN"),
        (lambda f: f.update(fl_x=float("inf")), "NaN or infinity"),
        (lambda f: f.update(transform_matrix=_scale_rows(f["transform_matrix"], [2, 2, 2, 1])), "not a rotation"),
        (lambda f: f.update(transform_matrix=_scale_rows(f["transform_matrix"], [-1, 1, 1, 1])), "det = -1"),
        (lambda f: f.update(cx=500.0), "principal point"),
        (lambda f: f.update(w=128, h=200), "calibrated for 128x200"),
        (lambda f: f.update(fl_x=-5.0), "positive"),
        (lambda f: f.update(fl_x="wide"), "not a number"),
        (lambda f: f.update(k3=0.1), "k3"),
        (lambda f: f.update(transform_matrix=[[1, 0], [0, 1, 0]]), "not a matrix"),
    ],
)
def test_bad_camera_values_name_the_frame(tmp_path, edit, fragment):
    _raises(_break_lego_frame(tmp_path, edit), "transforms_train.json", "frame 3", "r_5.png", fragment)


def test_empty_masks_name_the_view(tmp_path):
    folder = _copy(MOLD, tmp_path)
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(folder / "masks" / "IMG_5891.png")
    _raises(folder, "IMG_5891", "empty")
    folder = _copy(LEGO, tmp_path / "b")
    rgba = np.array(Image.open(folder / "train" / "r_5.png"))
    rgba[..., 3] = 0
    Image.fromarray(rgba).save(folder / "train" / "r_5.png")
    _raises(folder, "r_5.png", "alpha channel", "empty")


def test_corrupt_images_are_named(tmp_path):
    folder = _copy(LEGO, tmp_path)
    data = (folder / "train" / "r_10.png").read_bytes()
    (folder / "train" / "r_10.png").write_bytes(data[: len(data) // 2])
    _raises(folder, "r_10.png", "Cannot read")
    (folder / "train" / "r_10.png").write_bytes(b"not an image at all")
    _raises(folder, "r_10.png", "Cannot read")


def test_llff_count_mismatch_and_bad_table(tmp_path):
    folder = _copy(MOLD, tmp_path)
    (folder / "images" / "IMG_5901.JPG").unlink()
    _raises(folder, "poses_bounds.npy", "12 poses but 11 photos")
    folder = _copy(MOLD, tmp_path / "b")
    np.save(folder / "poses_bounds.npy", np.zeros((12, 15)))
    _raises(folder, "poses_bounds.npy", "[N, 17]")


def test_mixed_aspect_ratio_is_stretched_with_a_notice_naming_the_odd_photo(tmp_path):
    for k in range(3):
        Image.fromarray(_photo(k)).save(tmp_path / f"{k}.png")
    Image.fromarray(_photo(9, (60, 60))).save(tmp_path / "odd.png")
    capture = load_capture(tmp_path)
    assert capture.images.shape == (4, 40, 60, 3)
    assert any("odd.png (60x60)" in w and "stretched" in w for w in capture.warnings), capture.warnings


def test_bad_colmap_and_cameras_json(lego, tmp_path):
    folder = tmp_path / "colmap"
    shutil.copytree(LEGO / "train", folder / "images")
    names = [n.split("/")[1] for n in lego.names]
    _colmap_text_model(folder / "sparse", lego.cameras, names, "OPENCV_FISHEYE", [0.1] * 4)
    _raises(folder, "OPENCV_FISHEYE", "r_0.png", "image_undistorter")
    (folder / "sparse" / "images.txt").write_text("1 2 3\n\n")
    _raises(folder, "sparse", "COLMAP")

    folder = _copy(LEGO, tmp_path / "json")
    path = save_cameras_json(lego.cameras, [n for n in lego.names], folder / "cameras.json")
    _edit_json(path, lambda d: d.update(version=7))
    _raises(folder, "cameras.json", "version 7")
    _edit_json(path, lambda d: (d.update(version=1), d["frames"][1].pop("K")))
    _raises(folder, "cameras.json", "frame 1", "'K'")
