"""Property-based fuzzing (hypothesis) of every importer and of the upload unpacker (issue 7).

Random and mutated camera files, archives and image bytes: reading them either works or raises
`PipelineError` (the message the user sees), never another exception, and every example finishes
within its deadline. Derandomized, so CI runs the same examples each time; the seed-free local run
(`HYPOTHESIS_PROFILE=explore pytest tests/test_fuzz.py`) tries new ones.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import zipfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.importers import load_capture
from ui.uploads import sort_uploads

settings.register_profile("ci", derandomize=True, database=None, deadline=timedelta(seconds=20),
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("explore", database=None, deadline=timedelta(seconds=20), max_examples=500,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

NAMES = ["a", "b", "c"]
NUMBERS = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=5)),
                    max_leaves=30)
IDENTITY = [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 4.0], [0, 0, 0, 1.0]]


def only_pipeline_errors(read) -> None:
    try:
        read()
    except PipelineError as error:
        assert str(error).strip(), "an empty message"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Three 16 px photos with alpha, a.png b.png c.png, in a capture folder and its images/."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "images").mkdir()
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[4:12, 4:12] = 200
    for name in NAMES:
        for where in (root, root / "images"):
            Image.fromarray(rgba).save(where / f"{name}.png")
    return root


def write_only(folder: Path, name: str, data: bytes) -> Path:
    """``folder`` holding the photos and just one camera file, ``name``."""
    for other in ("transforms.json", "cameras.json", "poses_bounds.npy"):
        (folder / other).unlink(missing_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path


def paths_of(document, prefix=()):
    """Every path (tuple of keys and indexes) into a JSON document."""
    yield prefix
    if isinstance(document, dict):
        for key, value in document.items():
            yield from paths_of(value, prefix + (key,))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from paths_of(value, prefix + (index,))


def replaced(document, path, value):
    if not path:
        return value
    out = copy.deepcopy(document)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return out


@st.composite
def mutated(draw, valid: dict):
    """``valid`` with one part (anything from a number to the whole frame list) replaced by random JSON."""
    paths = list(paths_of(valid))
    return replaced(valid, draw(st.sampled_from(paths)), draw(JSON))


VALID_TRANSFORMS = {"camera_angle_x": 0.7, "fl_x": 20.0, "w": 16, "h": 16, "k1": 0.0,
                    "frames": [{"file_path": f"./{n}", "transform_matrix": IDENTITY} for n in NAMES]}
VALID_CAMERAS = {"format": "photo3d-cameras", "version": 1,
                 "frames": [{"file": f"{n}.png", "width": 16, "height": 16, "K": [[20, 0, 8], [0, 20, 8], [0, 0, 1]],
                             "world_to_camera": IDENTITY, "mask": None} for n in NAMES]}


def test_valid_documents_load(folder):
    """The documents the mutations start from are good ones, so the mutations are near misses."""
    write_only(folder, "transforms.json", json.dumps(VALID_TRANSFORMS).encode())
    assert load_capture(folder).cameras is not None
    write_only(folder, "cameras.json", json.dumps(VALID_CAMERAS).encode())
    assert load_capture(folder).cameras is not None


@settings(max_examples=60)
@given(document=st.one_of(JSON, mutated(VALID_TRANSFORMS)))
def test_transforms_json(folder, document):
    write_only(folder, "transforms.json", json.dumps(document).encode())
    only_pipeline_errors(lambda: load_capture(folder))


@settings(max_examples=60)
@given(document=mutated(VALID_CAMERAS))
def test_cameras_json(folder, document):
    write_only(folder, "cameras.json", json.dumps(document).encode())
    only_pipeline_errors(lambda: load_capture(folder))


@settings(max_examples=30)
@given(data=st.binary(max_size=300))
def test_camera_files_of_random_bytes(folder, data):
    for name in ("transforms.json", "poses_bounds.npy"):
        write_only(folder, name, data)
        only_pipeline_errors(lambda: load_capture(folder))


@settings(max_examples=40)
@given(rows=st.integers(0, 5), columns=st.sampled_from([15, 17, 18]),
       values=st.lists(NUMBERS.filter(lambda v: not isinstance(v, int) or abs(v) < 2**53), min_size=1, max_size=8),
       dtype=st.sampled_from(["<f8", "<f4", "<i8", "|b1"]))
def test_llff_poses(folder, rows, columns, values, dtype):
    """Tables of the right kind with wrong shapes, counts and values (NaN, inf, zero sizes)."""
    table = np.resize(np.asarray(values, dtype=np.float64), (rows, columns))
    with np.errstate(invalid="ignore", over="ignore"):
        array = table.astype(dtype)
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_only(folder, "poses_bounds.npy", buffer.getvalue())
    only_pipeline_errors(lambda: load_capture(folder))


@settings(max_examples=8)
@given(cameras=st.lists(st.text(alphabet="0123456789 .-eE+PINHOLESIMPLE_RADnaif\n", max_size=40), max_size=3),
       images=st.lists(st.text(alphabet="0123456789 .-abc.png/\n", max_size=60), max_size=4))
def test_colmap_text_models(folder, cameras, images):
    """Few examples: each read starts a child process (see pipeline/importers/colmap_child.py)."""
    model = folder / "sparse" / "0"
    model.mkdir(parents=True, exist_ok=True)
    (model / "cameras.txt").write_text("\n".join(cameras))
    (model / "images.txt").write_text("\n".join(images))
    write_only(folder, "unused.txt", b"")
    try:
        only_pipeline_errors(lambda: load_capture(folder))
    finally:
        shutil.rmtree(folder / "sparse")


@settings(max_examples=40)
@given(magic=st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\0\0\0\0WEBP", b"II*\0", b"BM"]),
       tail=st.binary(max_size=200))
def test_photos_of_random_bytes_behind_a_real_signature(folder, magic, tail):
    photos = folder / "photos"
    photos.mkdir(exist_ok=True)
    for name in NAMES:
        shutil.copy(folder / f"{name}.png", photos / f"{name}.png")
    (photos / "b.png").write_bytes(magic + tail)
    only_pipeline_errors(lambda: load_capture(photos))


def capture_zip(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in NAMES:
            zf.write(folder / f"{name}.png", f"capture/{name}.png")
        zf.writestr("capture/transforms.json", json.dumps(VALID_TRANSFORMS))
    return buffer.getvalue()


@settings(max_examples=60)
@given(data=st.data())
def test_unpacker_with_mutated_archives(folder, tmp_path, data):
    """A good capture zip with some bytes overwritten, cut short, or random bytes instead."""
    archive = bytearray(capture_zip(folder))
    kind = data.draw(st.sampled_from(["flip", "truncate", "random"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            archive[data.draw(st.integers(0, len(archive) - 1))] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        archive = archive[: data.draw(st.integers(0, len(archive) - 1))]
    else:
        archive = bytearray(b"PK\x03\x04" + data.draw(st.binary(max_size=300)))
    path = tmp_path / "capture.zip"
    path.write_bytes(bytes(archive))
    job = tmp_path / "job"
    shutil.rmtree(job, ignore_errors=True)

    def unpack_and_load():
        uploads = sort_uploads([path], job)
        load_capture(uploads.source)

    only_pipeline_errors(unpack_and_load)
    outside = {p for p in tmp_path.rglob("*") if job not in p.parents and p != job}
    assert outside == {path}, f"written outside the job folder: {outside - {path}}"


@settings(max_examples=60)
@given(names=st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=30)
                      | st.sampled_from(["../a.png", "/abs.png", "a/../../b.png", "C:\\x.png", "\\\\server\\x.png",
                                         "capture/./a.png", "..", ".", "a/", "__MACOSX/._a.png"]),
                      min_size=1, max_size=6),
       contents=st.binary(max_size=64))
def test_unpacker_with_random_member_names(folder, tmp_path, names, contents):
    path = tmp_path / "capture.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name in NAMES:
            zf.write(folder / f"{name}.png", f"{name}.png")
        for name in names:
            zf.writestr(name, contents)
    job = tmp_path / "job"
    shutil.rmtree(job, ignore_errors=True)
    only_pipeline_errors(lambda: sort_uploads([path], job))
    outside = {p for p in tmp_path.rglob("*") if job not in p.parents and p != job}
    assert outside == {path}, f"written outside the job folder: {outside - {path}}"
