"""Hostile uploads and camera files (issue 7; the table in docs/SECURITY.md): each is refused
with a message that names it and says what to do, before anything is decoded or unpacked, and
nothing is written outside the job's folder. Through the app (gradio_client) in test_load.py."""

from __future__ import annotations

import io
import json
import shutil
import struct
import time
import zipfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.importers import colmap_child, load_capture
from pipeline.limits import MiB, InputLimits
from ui.uploads import check_uploads, sort_uploads

LEGO = Path(__file__).parent / "fixtures" / "lego_128"
PHOTOS = sorted((LEGO / "train").glob("*.png"))[:3]


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says width x height but that holds no pixel data: reading its size is
    harmless, decoding it fails. So a 'too many pixels' message proves nothing was decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = chunk(b"IDAT", zlib.compress(bytes(16)))  # far fewer bytes than the header promises
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + data + chunk(b"IEND", b""))
    return path


def photos_in(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, folder / p.name)) for p in PHOTOS]


def transforms_with(folder: Path, refs: list[str], matrix=None) -> Path:
    frames = json.loads((LEGO / "transforms_train.json").read_text())["frames"][: len(refs)]
    for frame, ref in zip(frames, refs):
        frame["file_path"] = ref
        if matrix is not None:
            frame["transform_matrix"] = matrix
    path = folder / "transforms_train.json"
    path.write_text(json.dumps({"camera_angle_x": 0.69, "frames": frames}))
    return path


def zipped(path: Path, members: dict, compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def refused(files, tmp_path: Path, match: str, limits: InputLimits = InputLimits()) -> str:
    """The message of the PipelineError `check_uploads` and `sort_uploads` both raise; nothing unpacked."""
    with pytest.raises(PipelineError, match=match) as caught:
        check_uploads(files, limits)
    with pytest.raises(PipelineError, match=match):
        sort_uploads(files, tmp_path / "job", limits)
    unpacked = tmp_path / "job"
    assert not unpacked.exists() or not any(p.is_file() for p in unpacked.rglob("*"))
    return str(caught.value)


# ---------------------------------------------------------------- archives

def test_zip_bomb_member_is_refused_from_the_directory(tmp_path):
    archive = zipped(tmp_path / "capture.zip", {p.name: p.read_bytes() for p in PHOTOS} | {"pad.png": bytes(64 * MiB)})
    assert archive.stat().st_size < MiB
    message = refused([archive], tmp_path, "zip bomb")
    assert "pad.png" in message


def test_zip_bomb_of_small_members_is_refused_as_a_whole(tmp_path):
    members = {f"m{i}.png": bytes(MiB) for i in range(3)}  # each at the per-member floor
    refused([zipped(tmp_path / "capture.zip", members)], tmp_path, "unpacks to .* times its size")


def test_archive_beyond_the_unpacked_total_is_refused(tmp_path):
    archive = zipped(tmp_path / "capture.zip", {f"m{i}.png": bytes(600_000) for i in range(4)}, zipfile.ZIP_STORED)
    refused([archive], tmp_path, "GB unpacked|in all", InputLimits(max_total_bytes=2 * MiB))


@pytest.mark.parametrize("member", ["/etc/passwd.png", "capture/../../escape.png", "C:/windows/escape.png",
                                    "..\\escape.png"])
def test_zip_slip_members_are_refused(tmp_path, member):
    message = refused([zipped(tmp_path / "capture.zip", {member: b"x"})], tmp_path, "outside the archive")
    assert "capture.zip" in message
    assert not (tmp_path / "escape.png").exists() and not (tmp_path.parent / "escape.png").exists()


def test_symlink_member_is_refused(tmp_path):
    archive = tmp_path / "capture.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("link.png")
        info.external_attr = 0o120777 << 16  # S_IFLNK
        zf.writestr(info, b"/etc/passwd")
    refused([archive], tmp_path, "symbolic link")


def test_zip_with_more_members_than_files_allowed(tmp_path):
    archive = zipped(tmp_path / "capture.zip", {f"r_{i}.png": b"" for i in range(30)})
    refused([archive], tmp_path, "more than the 20 one job takes", InputLimits(max_files=20))


def test_a_zip_name_does_not_make_a_zip(tmp_path):
    fake = tmp_path / "capture.zip"
    fake.write_bytes(PHOTOS[0].read_bytes() + zipped(tmp_path / "inner.zip", {"x.png": b"x"}).read_bytes())
    refused([fake], tmp_path, "not a zip archive .its content is a PNG image")


# ---------------------------------------------------------------- loose files

def test_ten_thousand_files_are_refused_before_reading_any(tmp_path):
    files = []
    for i in range(10_001):
        path = tmp_path / "up" / f"{i:05d}.png"
        if i == 0:
            path.parent.mkdir()
        path.touch()
        files.append(path)
    started = time.monotonic()
    message = refused(files, tmp_path, "10001 files, more than the 500")
    assert time.monotonic() - started < 10, message


def test_oversized_file_is_refused(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(PHOTOS[0].read_bytes() + bytes(2000))
    refused([big, *PHOTOS[1:]], tmp_path, "big.png: 0 MB, more than", InputLimits(max_file_bytes=1000))


def test_polyglot_photo_is_read_as_the_photo_it_starts_as(tmp_path):
    """A PNG with a zip appended (a PNG/zip polyglot): a photo to us, and never unpacked."""
    folder = tmp_path / "up"
    photos = photos_in(folder)
    inner = zipped(tmp_path / "inner.zip", {"../../evil.png": b"x"}).read_bytes()
    photos[0].write_bytes(photos[0].read_bytes() + inner)
    uploads = sort_uploads(photos, tmp_path / "job")
    assert uploads.notices == [] and len(uploads.photos) == 3
    capture = load_capture(uploads.source)
    assert capture.images.shape[0] == 3 and not (tmp_path.parent / "evil.png").exists()


@pytest.mark.parametrize("content, kind", [(b"<!DOCTYPE html><script>alert(1)</script>", "markup"),
                                           (b"", "an empty file"), (b"\x00\x01\x02garbage", "binary data")])
def test_files_named_like_photos_that_are_not_are_left_out(tmp_path, content, kind):
    photos = photos_in(tmp_path / "up")
    fake = tmp_path / "up" / "z_9.png"
    fake.write_bytes(content)
    uploads = sort_uploads([*photos, fake], tmp_path / "job")
    assert len(uploads.notices) == 1 and "z_9.png" in uploads.notices[0] and kind in uploads.notices[0]
    assert fake not in uploads.photos


def test_a_zip_member_that_is_not_a_photo_is_left_out(tmp_path):
    members = {f"capture/{p.name}": p.read_bytes() for p in PHOTOS} | {"capture/z_9.png": b"<html></html>"}
    uploads = sort_uploads([zipped(tmp_path / "capture.zip", members)], tmp_path / "job")
    assert [p.name for p in uploads.photos] == [p.name for p in PHOTOS]
    assert "capture.zip: capture/z_9.png" in uploads.notices[0]


# ---------------------------------------------------------------- pixels

def test_hundred_megapixel_png_is_refused_from_its_header(tmp_path):
    folder = tmp_path / "capture"
    photos_in(folder)
    png_header_only(folder / "z_big.png", 10_000, 10_000)
    with pytest.raises(PipelineError, match=r"z_big.png: 10000x10000 pixels \(100 megapixels\), more than the 64"):
        load_capture(folder)


def test_hundred_megapixel_mask_is_refused_from_its_header(tmp_path):
    folder = tmp_path / "capture"
    photos_in(folder)
    (folder / "masks").mkdir()
    for photo in PHOTOS:
        png_header_only(folder / "masks" / photo.name, 10_000, 10_000)
    with pytest.raises(PipelineError, match="megapixels"):
        load_capture(folder)


def test_truncated_jpeg(tmp_path):
    folder = tmp_path / "capture"
    folder.mkdir()
    for photo in PHOTOS:
        buffer = io.BytesIO()
        Image.open(photo).convert("RGB").save(buffer, "JPEG", quality=95)
        (folder / f"{photo.stem}.jpg").write_bytes(buffer.getvalue())
    victim = folder / f"{PHOTOS[1].stem}.jpg"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(PipelineError, match=rf"Cannot read image .*{victim.name}.*truncated"):
        load_capture(folder)


# ---------------------------------------------------------------- camera files

def test_nan_pose_is_refused(tmp_path):
    folder = tmp_path / "capture"
    photos_in(folder / "train")
    nan = [[float("nan"), 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 4], [0, 0, 0, 1]]
    transforms_with(folder, [f"./train/{p.stem}" for p in PHOTOS], nan)
    with pytest.raises(PipelineError, match="NaN or infinity"):
        load_capture(folder)


@pytest.mark.parametrize("ref", ["../outside/r_0", "/etc/hostname", "train/../../outside/r_0"])
def test_camera_file_paths_outside_the_capture_are_refused(tmp_path, ref):
    folder = tmp_path / "capture"
    photos_in(folder / "train")
    photos_in(tmp_path / "outside")
    transforms_with(folder, [ref] + [f"./train/{p.stem}" for p in PHOTOS[1:]])
    with pytest.raises(PipelineError, match=f"names '{ref}', which is outside the capture folder"):
        load_capture(folder)


def test_uploaded_camera_file_finds_only_uploaded_photos(tmp_path):
    """Loose uploads: a camera file's paths are matched against the uploads by name only, so
    '/etc/...' or another session's file is never opened."""
    photos = photos_in(tmp_path / "up")
    elsewhere = tmp_path / "other-session" / "secret.png"
    elsewhere.parent.mkdir()
    elsewhere.write_text("another session's file")  # opening it would fail the load
    camera = transforms_with(tmp_path / "up", [str(elsewhere), "/etc/hostname", *(p.stem for p in photos)])
    capture = load_capture([camera, *photos])
    assert capture.names == [p.name for p in photos]
    assert sum("not found" in w or "missing" in w or "skipped" in w for w in capture.warnings) >= 1, capture.warnings


def test_oversized_camera_file_is_refused(tmp_path):
    folder = tmp_path / "capture"
    photos_in(folder / "train")
    transforms_with(folder, [f"./train/{p.stem}" for p in PHOTOS])
    with pytest.raises(PipelineError, match="more than the 0 MB a camera file may have"):
        load_capture(folder, limits=InputLimits(max_camera_file_bytes=100))


def test_forged_colmap_counts_cannot_hang_the_server(tmp_path, monkeypatch):
    """pycolmap loops for ever on a points3D.bin whose count exceeds its bytes: the importer never
    gives it the user's points3D, and reads models in a child process under a time limit."""
    monkeypatch.setattr(colmap_child, "READ_TIMEOUT_S", 5.0)
    model = tmp_path / "model"
    model.mkdir()
    (model / "cameras.bin").write_bytes(struct.pack("<QiiQQ4d", 1, 1, 1, 128, 128, 140.0, 140.0, 64.0, 64.0))
    (model / "images.bin").write_bytes(struct.pack("<Q", 0))
    # One point whose track claims 2^40 entries, in a file that ends right there.
    (model / "points3D.bin").write_bytes(struct.pack("<QQ3d3BdQ", 1, 1, 0, 0, 0, 1, 2, 3, 0.5, 2**40))
    started = time.monotonic()
    with pytest.raises(PipelineError, match="more than 5 s"):
        colmap_child.read_model(model, "model")
    assert time.monotonic() - started < 30
    # The same files as an upload: the forged points3D is not read, so the model loads at once.
    folder = tmp_path / "capture"
    shutil.copytree(model, folder / "sparse" / "0")
    photos_in(folder / "images")
    with pytest.raises(PipelineError, match="only 0 usable view"):  # images.bin lists none
        load_capture(folder)
