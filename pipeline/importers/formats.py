"""Camera files -> `Frame` lists: NeRF / instant-ngp transforms, LLFF poses_bounds, COLMAP, cameras.json.

Every reader converts to the internal convention (pipeline/cameras.py): OpenCV camera axes
(x right, y down, z forward), world_to_camera [4, 4], K in pixels with pixel centres at +0.5.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..cameras import Cameras
from ..capture import Capture
from ..errors import PipelineError
from .assemble import Frame, invert_rigid, rigid
from .colmap_child import read_model
from .pixels import image_size
from .sources import Source, images_in

CAMERAS_JSON_FORMAT = "photo3d-cameras"
CAMERAS_JSON_VERSION = 1

# Camera axes of OpenGL/Blender (x right, y up, z back) -> OpenCV (x right, y down, z forward).
OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])
# LLFF poses store camera axes as columns (down, right, back); OpenCV wants (right, down, forward).
LLFF_TO_OPENCV = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])  # c2w_cv[:, :3] = R_llff @ this

COLMAP_MODELS = ("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV")
_COLMAP_PARTS = ("cameras", "images", "points3D", "rigs", "frames")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PipelineError(f"{path}: not a readable JSON file ({e}). Fix or re-export it.") from e
    if not isinstance(data, dict) or not isinstance(data.get("frames"), list) or not data["frames"]:
        raise PipelineError(f"{path}: expected a JSON object with a non-empty 'frames' list. Fix or re-export it.")
    return data


def _field(item: dict, data: dict, key: str, default=None):
    """A transforms.json value: per frame (nerfstudio) if there, else top level (instant-ngp)."""
    return item.get(key, data.get(key, default))


def _missing(path: Path, index: int, ref: str, warnings: list[str]) -> None:
    warnings.append(f"{path.name}: frame {index} names '{ref}', which was not found; view skipped.")


def _transforms_camera(get, image: Path, where: str) -> tuple[np.ndarray, tuple[int, int], np.ndarray]:
    """(K [3, 3], (H, W) K refers to, (k1, k2, p1, p2)) of one transforms.json frame; ``get(key, default)``."""
    if get("is_fisheye") or str(get("camera_model", "")).upper().endswith("FISHEYE"):
        raise PipelineError(f"{where}: fisheye cameras are not supported. Undistort the photos to pinhole first.")
    if any(float(get(k, 0.0)) != 0.0 for k in ("k3", "k4")):
        raise PipelineError(f"{where}: distortion terms k3/k4 are not supported (k1, k2, p1, p2 are).")
    if get("w") is not None and get("h") is not None:
        size = (int(round(float(get("h")))), int(round(float(get("w")))))
    else:
        size, _ = image_size(image, exif=False)
    height, width = size
    if get("fl_x") is not None:
        fx = float(get("fl_x"))
    elif get("camera_angle_x") is not None:
        fx = 0.5 * width / np.tan(0.5 * float(get("camera_angle_x")))
    else:
        raise PipelineError(f"{where}: no focal length: add 'camera_angle_x' or 'fl_x'.")
    fy = float(get("fl_y", fx))
    cx, cy = float(get("cx", width / 2)), float(get("cy", height / 2))
    coeffs = np.array([float(get(k, 0.0)) for k in ("k1", "k2", "p1", "p2")])
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]), size, coeffs


def read_transforms(path: Path, source: Source, warnings: list[str]) -> list[Frame]:
    """NeRF-synthetic / instant-ngp / nerfstudio ``transforms*.json``.

    Per frame: ``file_path`` (relative to the JSON, extension optional), ``transform_matrix`` (4x4
    camera-to-world, OpenGL axes). Intrinsics, per frame or top level: ``fl_x`` [, ``fl_y``, ``cx``, ``cy``,
    ``w``, ``h``] or ``camera_angle_x`` (horizontal field of view; fy = fx, principal point at the centre);
    optional ``k1 k2 p1 p2`` (undistorted on load); optional per-frame ``mask_path``. Without ``w``/``h``
    the intrinsics refer to the image's own size. instant-ngp's ``scale``/``offset``/``aabb_scale`` only
    affect its own training box and are ignored.
    """
    data = _read_json(path)
    frames = []
    for index, item in enumerate(data["frames"]):
        where = f"{path.name}, frame {index}"
        if not isinstance(item, dict) or "file_path" not in item or "transform_matrix" not in item:
            raise PipelineError(f"{where}: needs 'file_path' and 'transform_matrix'. Fix or re-export {path}.")
        image = source.resolve(str(item["file_path"]), path.parent)
        if image is None:
            _missing(path, index, item["file_path"], warnings)
            continue
        name = source.name_of(image)
        where = f"{path.name}, frame {index} ({name})"
        try:
            intrinsics, size, coeffs = _transforms_camera(partial(_field, item, data), image, where)
        except (TypeError, ValueError) as e:
            raise PipelineError(f"{where}: a camera field is not a number ({e}). Fix or re-export {path}.") from e
        mask = source.resolve(str(item["mask_path"]), path.parent) if "mask_path" in item else None
        camera_to_world = rigid(item["transform_matrix"], where) @ OPENGL_TO_OPENCV
        frames.append(
            Frame(
                image=image,
                name=name,
                intrinsics=intrinsics,
                world_to_camera=invert_rigid(camera_to_world),
                size=size,
                distortion=coeffs if np.any(coeffs != 0) else None,
                mask=mask or source.mask_for(image),
            )
        )
    return frames


def read_llff(path: Path, source: Source) -> list[Frame]:
    """LLFF ``poses_bounds.npy`` [N, 17] with photos in ``images/`` (rows = photos in sorted name order).

    ``row[:15].reshape(3, 5)`` = [R | t | (H, W, focal)]: columns of R are the camera's down, right and
    back axes in world coordinates, t its centre; H, W the size focal refers to (principal point at the
    centre). ``row[15:17]`` (near/far depth bounds) is not used. Masks: ``masks/`` matched by stem, else
    by sorted order when it holds exactly one file per photo.
    """
    try:
        with open(path, "rb") as f:  # .npy only: np.load would take a zip for an .npz
            table = np.lib.format.read_array(f, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise PipelineError(f"{path}: not a readable .npy file ({e}). Re-export it.") from e
    if table.ndim != 2 or table.shape[1] != 17:
        raise PipelineError(f"{path}: expected an [N, 17] array (LLFF poses_bounds), got shape {table.shape}.")
    images = images_in(path.parent / "images") if source.root is not None else source.listed_images()
    if len(images) != len(table):
        raise PipelineError(
            f"{path}: {len(table)} poses but {len(images)} photos in images/. The rows belong to the photos in "
            "sorted file-name order, so the counts must match: remove the extra photos or recompute the poses."
        )
    poses = table[:, :15].reshape(-1, 3, 5)  # [N, 3, 5]
    masks = [source.mask_for(image) for image in images]
    if not any(masks) and source.root is not None:
        by_order = images_in(path.parent / "masks", masks=True)  # [N] paired in sorted order
        if len(by_order) == len(images):
            masks = by_order
    frames = []
    for index, (image, pose, mask) in enumerate(zip(images, poses, masks)):
        name = source.name_of(image)
        where = f"{path.name}, row {index} ({name})"
        c2w = rigid(pose[:, :4], where)  # LLFF axes
        c2w[:3, :3] = c2w[:3, :3] @ LLFF_TO_OPENCV
        height, width, focal = pose[:, 4]
        if not np.all(np.isfinite(pose[:, 4])) or height < 1 or width < 1:
            raise PipelineError(f"{where}: bad (H, W, focal) column {pose[:, 4].tolist()}. Recompute the poses.")
        intrinsics = np.array([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])
        size = (int(round(height)), int(round(width)))
        frames.append(Frame(image, name, intrinsics, invert_rigid(c2w), size, mask=mask))
    return frames


def _colmap_model(files: dict[str, Path], workdir: Path) -> Path:
    """``workdir`` with copies of the model's files and an empty points3D: the importer needs no
    points, and not reading them saves time and one more file that could be damaged."""
    ext = files["cameras"].suffix
    for part, file in files.items():
        if part != "points3D":
            shutil.copy(file, workdir / f"{part}{ext}")
    empty = workdir / f"points3D{ext}"
    if ext == ".bin":
        empty.write_bytes(np.uint64(0).tobytes())  # a point count of 0
    else:
        empty.write_text("")
    return workdir


def colmap_files(folder: Optional[Path], source: Source) -> Optional[dict[str, Path]]:
    """{'cameras': ..., 'images': ..., ...} of a COLMAP model in ``folder`` (or among the listed files)."""
    for ext in (".bin", ".txt"):
        found = {}
        for part in _COLMAP_PARTS:
            path = (folder / f"{part}{ext}") if folder is not None else source.named(f"{part}{ext}")
            if path is not None and path.is_file():
                found[part] = path
        if "cameras" in found and "images" in found:
            return found
    return None


def _colmap_distortion(model_name: str, params: np.ndarray) -> np.ndarray:  # [4] k1, k2, p1, p2
    """COLMAP params: SIMPLE_RADIAL f cx cy k; RADIAL f cx cy k1 k2; OPENCV fx fy cx cy k1 k2 p1 p2."""
    coeffs = np.zeros(4)
    if model_name == "SIMPLE_RADIAL":
        coeffs[0] = params[3]
    elif model_name == "RADIAL":
        coeffs[:2] = params[3:5]
    elif model_name == "OPENCV":
        coeffs[:] = params[4:8]
    return coeffs


def read_colmap(files: dict[str, Path], images_dir: Path, source: Source, warnings: list[str]) -> list[Frame]:
    """A COLMAP model read with pycolmap (in a child process: `colmap_child`); photos in ``images_dir``
    under the names the model stores.

    cam_from_world is already world_to_camera in OpenCV axes, and COLMAP's pixel centres are at +0.5
    like ours. SIMPLE_PINHOLE / PINHOLE are used as they are; SIMPLE_RADIAL / RADIAL / OPENCV photos are
    undistorted on load into the pinhole camera with the same fx, fy, cx, cy and size.
    """
    where_model = files["cameras"].parent
    with tempfile.TemporaryDirectory() as workdir:
        model = read_model(_colmap_model(files, Path(workdir)), str(where_model))
    frames = []
    for record in sorted(model["images"], key=lambda record: record["name"]):
        where = f"COLMAP model {where_model}, image {record['name']}"
        if not record["has_pose"]:
            warnings.append(f"{where} has no pose (not registered); view skipped.")
            continue
        image = source.resolve(record["name"], images_dir)
        if image is None:
            warnings.append(f"{where}: photo not found in {images_dir}; view skipped.")
            continue
        camera = model["cameras"].get(str(record["camera_id"]))
        if camera is None:
            raise PipelineError(f"{where}: camera {record['camera_id']} is not in cameras{files['cameras'].suffix}. "
                                "Re-export the model from COLMAP.")
        if camera["model"] not in COLMAP_MODELS:
            raise PipelineError(
                f"{where}: camera model {camera['model']} is not supported ({', '.join(COLMAP_MODELS)} are). "
                "Run `colmap image_undistorter` and import its output (PINHOLE cameras)."
            )
        coeffs = _colmap_distortion(camera["model"], np.asarray(camera["params"], dtype=np.float64))
        frames.append(
            Frame(
                image=image,
                name=source.name_of(image),
                intrinsics=np.asarray(camera["K"], dtype=np.float64),
                world_to_camera=rigid(record["cam_from_world"], where),
                size=(camera["height"], camera["width"]),
                distortion=coeffs if np.any(coeffs != 0) else None,
                mask=source.mask_for(image),
            )
        )
    used = {f.image.name for f in frames}
    unused = [p.name for p in images_in(images_dir) if p.name not in used] if source.root is not None else []
    if unused:
        warnings.append(
            f"{len(unused)} photo(s) in {images_dir} are not in the COLMAP model (e.g. {unused[0]}); ignored."
        )
    return frames


def is_cameras_json(path: Path) -> bool:
    """Whether ``path`` is this project's cameras.json (other tools use the name too)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == CAMERAS_JSON_FORMAT
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def read_cameras_json(path: Path, source: Source, warnings: list[str]) -> list[Frame]:
    """This project's ``cameras.json`` (schema in `save_cameras_json`)."""
    data = _read_json(path)
    if data.get("version") != CAMERAS_JSON_VERSION:
        raise PipelineError(
            f"{path}: cameras.json version {data.get('version')!r} is not supported (version "
            f"{CAMERAS_JSON_VERSION} is). Re-export it with this version of the app."
        )
    frames = []
    for index, item in enumerate(data["frames"]):
        where = f"{path.name}, frame {index}"
        try:
            ref = str(item["file"])
            size = (int(item["height"]), int(item["width"]))
            intrinsics = np.asarray(item["K"], dtype=np.float64)
            pose = item["world_to_camera"]
        except (KeyError, TypeError, ValueError) as e:
            raise PipelineError(
                f"{where}: needs 'file', 'width', 'height', 'K' and 'world_to_camera' ({e!r}). Fix or re-export {path}."
            ) from e
        if intrinsics.shape != (3, 3):
            raise PipelineError(f"{where}: 'K' must be 3x3, got shape {intrinsics.shape}. Fix or re-export {path}.")
        image = source.resolve(ref, path.parent)
        if image is None:
            _missing(path, index, ref, warnings)
            continue
        where = f"{path.name}, frame {index} ({source.name_of(image)})"
        mask = source.resolve(str(item["mask"]), path.parent) if item.get("mask") else None
        if item.get("mask") and mask is None:
            raise PipelineError(f"{where}: mask '{item['mask']}' not found. Add the file or remove 'mask' from {path}.")
        mask = mask or source.mask_for(image)
        frames.append(Frame(image, source.name_of(image), intrinsics, rigid(pose, where), size, mask=mask))
    return frames


def _cameras_of_the_photos(cameras: Cameras, originals) -> Cameras:
    """Canvas cameras -> the cameras of the photos they came from (as read: with or without EXIF)."""
    unturned = cameras.turned(-np.array([o.turns for o in originals]))
    sizes = []
    for original, size in zip(originals, unturned.sizes):
        try:
            sizes.append(image_size(original.path, original.exif)[0])
        except PipelineError:  # the photo is gone (a deleted upload): keep the canvas's size
            sizes.append(tuple(size))
    return unturned.resized(np.array(sizes))


def save_cameras_json(
    capture_or_cameras: Union[Capture, Cameras],
    names: Optional[Sequence[str]],
    path: Union[str, Path],
    mask_files: Optional[Sequence[Optional[str]]] = None,
) -> Path:
    """Write cameras as this project's ``cameras.json`` and return its path.

    Schema (version 1)::

        {"format": "photo3d-cameras", "version": 1,
         "frames": [{"file": "images/a.png",            # image path relative to the JSON's folder
                     "mask": "masks/a.png",              # optional, same rule
                     "width": W, "height": H,            # pixels the intrinsics refer to
                     "K": [[fx, s, cx], [0, fy, cy], [0, 0, 1]],   # pixels, pixel (i, j) centre at (j+.5, i+.5)
                     "world_to_camera": [[...4 rows...]]}]}        # OpenCV axes: x right, y down, z forward

    ``names`` are the image paths to store (default: ``capture.names`` of a Capture); ``mask_files``
    optional per-view mask paths (None entries are left out). Floats are written at full precision.
    A Capture's cameras are written for its photos as they are (`Capture.originals`): turned back
    from the canvas and sized to the photo, so that the file loads again with the same photos.
    """
    cameras = capture_or_cameras.cameras if isinstance(capture_or_cameras, Capture) else capture_or_cameras
    originals = capture_or_cameras.originals if isinstance(capture_or_cameras, Capture) else None
    if cameras is not None and originals is not None and len(originals) == len(cameras):
        cameras = _cameras_of_the_photos(cameras, originals)
    if names is None and isinstance(capture_or_cameras, Capture):
        names = capture_or_cameras.names
    if cameras is None or names is None or len(names) != len(cameras):
        raise ValueError("save_cameras_json needs cameras and one image name per camera")
    frames = []
    for i, name in enumerate(names):
        frame = {
            "file": str(name),
            "width": int(cameras.sizes[i, 1]),
            "height": int(cameras.sizes[i, 0]),
            "K": cameras.intrinsics[i].tolist(),
            "world_to_camera": cameras.world_to_camera[i].tolist(),
        }
        if mask_files is not None and mask_files[i]:
            frame["mask"] = str(mask_files[i])
        frames.append(frame)
    path = Path(path)
    doc = {"format": CAMERAS_JSON_FORMAT, "version": CAMERAS_JSON_VERSION, "frames": frames}
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return path
