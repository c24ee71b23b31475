"""Camera poses for unposed photos by structure from motion (pycolmap: SIFT, matching, incremental mapping).

Structure from motion works at its own resolution, whatever the reconstruction's: each photo as it lies
on the capture's canvas (EXIF orientation applied, a minority orientation turned, `Capture.originals`),
read again from its file at up to `SFM_LONG_SIDE` pixels on the long side (a file that is already that
is handed to COLMAP as it is). In-memory captures (no files) use their canvas pixels. The cameras found
are then resized onto the canvas, which is exact (`Cameras.resized`).

Features and matching are COLMAP's defaults (SIFT, exhaustive matching up to `EXHAUSTIVE_MAX` photos,
sequential beyond): plain COLMAP's time. What differs is cheap: one camera per group of photos that
share a size and an EXIF camera (make, model, focal length) instead of one per photo, the EXIF focal
length as the prior, a mapper that accepts fewer inliers per view (object captures have few,
wide-baseline views; bench/sfm_vs_colmap.py measures both against plain pycolmap on real captures),
and a second mapping pass over the photos the first left out. Masks restrict features only when the
caller trusts them (a user's masks, grown a little): estimated masks never drop the object's features.
The largest model is kept; photos it does not contain are dropped with a warning that names them.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage

from .cameras import Cameras
from .capture import Original
from .errors import PipelineError
from .importers.formats import _colmap_distortion
from .importers.pixels import SWAPPING_ORIENTATIONS, decode_jpeg_at, undistort
from .turntable import FULL_FRAME_LONG_SIDE_MM

SFM_LONG_SIDE = 1600  # photos are matched at up to this many pixels on the long side
EXHAUSTIVE_MAX = 100  # beyond this many photos, exhaustive matching (N^2 pairs) is too slow on a CPU
MIN_REGISTERED = 3
MIN_REGISTERED_FRACTION = 0.5  # fewer than this share of the photos placed: refuse rather than guess

_EXIF_IFD = 0x8769
_MAKE, _MODEL = 0x010F, 0x0110
_FOCAL_MM, _FOCAL_35MM = 0x920A, 0xA405
_PLANE_X_RES, _PLANE_UNIT = 0xA20E, 0xA210
_EXIF_WIDTH, _EXIF_HEIGHT = 0xA002, 0xA003
_MM_PER_UNIT = {2: 25.4, 3: 10.0, 4: 1.0}  # FocalPlaneResolutionUnit: inch, centimetre, millimetre

ProgressFn = Callable[[float, str], None]


@dataclass
class SfMResult:
    cameras: Cameras  # of the registered views, in the order of `registered`, undistorted pinhole, on the canvas
    registered: np.ndarray  # [R] indices of the registered views in the input
    images: np.ndarray  # [R, H, W, 3] the registered photos (canvas), undistorted to the pinhole cameras
    masks: Optional[np.ndarray]  # [R, H, W] likewise, or None
    points: np.ndarray  # [P, 3] sparse cloud (world)
    point_colors: np.ndarray  # [P, 3] uint8
    mean_reprojection_error: float  # pixels
    seconds: float
    total: int  # photos given
    warnings: List[str] = field(default_factory=list)
    visible: List[np.ndarray] = field(default_factory=list)  # per registered view: [M] indices of the points it observes

    def preview(self, view: int = 0) -> np.ndarray:  # [H, W, 3] uint8
        """The registered photo ``view`` with the sparse cloud drawn on it (3x3 magenta dots)."""
        image = np.round(np.clip(self.images[view], 0, 1) * 255).astype(np.uint8)
        h, w = image.shape[:2]
        xy, depth = self.cameras[view].project(self.points)
        cols, rows = np.floor(xy[0]).astype(np.int64).T if len(self.points) else (np.zeros(0, int),) * 2
        ok = (depth[0] > 0) & (cols >= 1) & (cols < w - 1) & (rows >= 1) & (rows < h - 1)
        offsets = np.arange(-1, 2)
        rr = (rows[ok, None, None] + offsets[None, :, None]).repeat(3, axis=2).reshape(-1)
        cc = (cols[ok, None, None] + offsets[None, None, :]).repeat(3, axis=1).reshape(-1)
        image[rr, cc] = (255, 0, 255)
        return image

    @property
    def summary(self) -> str:
        return (f"{len(self.registered)} of {self.total} photos placed, mean reprojection error "
                f"{self.mean_reprojection_error:.2f} px, {len(self.points)} points, {self.seconds:.0f} s")


def pycolmap_module():
    """The pycolmap module, or a PipelineError that says how to install it (camera files need none)."""
    try:
        import pycolmap
    except ImportError as exc:
        raise PipelineError(f"estimating cameras or masks from the photos needs pycolmap ({exc}): "
                            "`pip install -r requirements.txt`, or give a camera file and masks") from None
    return pycolmap


def preload() -> None:
    """Import pycolmap now, when it is installed. Its import installs glog's failure signal handler,
    which takes SIGTERM too and prints a crash-style stack trace on an ordinary shutdown: a program
    that handles SIGTERM itself (the app) calls this from its main thread before it sets its own
    handler."""
    try:
        import pycolmap  # noqa: F401
    except ImportError:
        pass  # a job that needs it says so (`pycolmap_module`)


def _silence_colmap() -> None:
    """pycolmap logs every step through glog on stderr; its errors ("Failed to create any sparse model")
    become our PipelineErrors, which say it in the user's terms: keep only fatal ones."""
    pycolmap = pycolmap_module()

    pycolmap.logging.minloglevel = 3
    pycolmap.logging.stderrthreshold = 3


def exif_camera(path: Path) -> Tuple[str, Optional[float]]:
    """(make and model, focal length as a fraction of the long image side) from a photo's EXIF.

    The focal length comes from FocalLengthIn35mmFilm (over a 36 mm long side), else from FocalLength
    in mm times the focal-plane resolution (pixels per mm at ExifImageWidth/Height); None when neither
    is there. Resolution independent, so it holds for the photo at any size.
    """
    try:
        with Image.open(path) as im:
            exif = im.getexif()
    except OSError:
        return "", None
    ifd = exif.get_ifd(_EXIF_IFD)
    model = f"{exif.get(_MAKE, '')} {exif.get(_MODEL, '')}".strip()
    f35 = ifd.get(_FOCAL_35MM)
    if f35:
        return model, float(f35) / FULL_FRAME_LONG_SIDE_MM
    focal, res, unit = ifd.get(_FOCAL_MM), ifd.get(_PLANE_X_RES), ifd.get(_PLANE_UNIT, 2)
    long_side = max(int(ifd.get(_EXIF_WIDTH, 0) or 0), int(ifd.get(_EXIF_HEIGHT, 0) or 0))
    if focal and res and long_side and int(unit) in _MM_PER_UNIT:
        return model, float(focal) * float(res) / _MM_PER_UNIT[int(unit)] / long_side
    return model, None


@dataclass
class _Inputs:
    names: List[str]  # file names in the images folder, per view
    sizes: np.ndarray  # [N, 2] (H, W) of the photos as matched
    groups: Dict[tuple, List[int]]  # camera key -> views sharing one pycolmap camera
    focal: Dict[tuple, Optional[float]]  # camera key -> focal prior in pixels


def _write_inputs(folder: Path, images: np.ndarray, masks: Optional[np.ndarray],
                  originals: Optional[Sequence[Original]], focal_35mm: Optional[float],
                  long_side: int = SFM_LONG_SIDE) -> _Inputs:
    """The photos to match in ``folder/images`` (and grown masks in ``folder/masks``): the originals at
    up to ``long_side`` pixels, else the canvas images.

    Photos from one camera (same EXIF make, model and focal length, same aspect ratio) are matched at
    one size, the largest among them, so that they share one pycolmap camera even when some were
    saved smaller.
    """
    (folder / "images").mkdir()
    count = len(images)
    if originals is not None:
        natural = [_natural_size(o, long_side) for o in originals]  # [(H, W)] as on the canvas, capped
        cameras = [exif_camera(o.path) for o in originals]
    else:
        natural = [tuple(images.shape[1:3])] * count
        cameras = [("", focal_35mm / FULL_FRAME_LONG_SIDE_MM if focal_35mm else None)] * count
    keys = [(round(size[1] / size[0], 2), model, None if per_side is None else round(per_side, 4))
            for size, (model, per_side) in zip(natural, cameras)]
    largest: Dict[tuple, Tuple[int, int]] = {}
    for key, size in zip(keys, natural):
        largest[key] = max(largest.get(key, size), size, key=lambda hw: hw[0] * hw[1])
    names, sizes, groups, focal = [], [], {}, {}
    for i in range(count):
        size = largest[keys[i]]
        if originals is not None:
            name = _write_original(originals[i], folder / "images", f"{i:05d}", size)
        else:
            name = f"{i:05d}.jpg"
            _save(images[i], folder / "images" / name)
        key = (size, keys[i][1], keys[i][2])
        groups.setdefault(key, []).append(i)
        focal[key] = None if keys[i][2] is None else cameras[i][1] * max(size)
        names.append(name)
        sizes.append(size)
    if masks is not None:
        (folder / "masks").mkdir()
        for name, size, mask in zip(names, sizes, masks):
            # Grow the object a little: corners on the silhouette's edge are good features, and a mask
            # that is slightly too tight must not remove them.
            small = np.asarray(Image.fromarray(np.round(mask * 255).astype(np.uint8)).resize(size[::-1], Image.BILINEAR))
            keep = ndimage.binary_dilation(small > 127, iterations=max(2, int(0.02 * max(size))))
            Image.fromarray((keep * 255).astype(np.uint8)).save(folder / "masks" / f"{name}.png")
    return _Inputs(names, np.array(sizes), groups, focal)


def _save(image: np.ndarray, path: Path) -> None:
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path, quality=95)


def _natural_size(original: Original, long_side: int) -> Tuple[int, int]:
    """(H, W) of a photo as it lies on the canvas (oriented, turned), scaled down to ``long_side``."""
    with Image.open(original.path) as im:
        width, height = im.size
        orientation = int(im.getexif().get(0x0112, 1)) if original.exif else 1
    if (orientation in (5, 6, 7, 8)) != (original.turns % 2 == 1):
        width, height = height, width
    scale = min(1.0, long_side / max(width, height))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _write_original(original: Original, folder: Path, stem: str, size: Tuple[int, int]) -> str:
    """The file name of one photo as it lies on the canvas, at ``size`` (H, W): the file itself
    (linked) when that is what it stores, else decoded, oriented, turned and resized."""
    with Image.open(original.path) as im:
        orientation = int(im.getexif().get(0x0112, 1)) if original.exif else 1
        fmt = im.format
        if orientation == 1 and original.turns % 4 == 0 and im.size == size[::-1] and fmt in ("JPEG", "PNG"):
            name = stem + (".jpg" if fmt == "JPEG" else ".png")
            os.symlink(os.path.abspath(original.path), folder / name)
            return name
        swapped = (orientation in SWAPPING_ORIENTATIONS) != (original.turns % 2 == 1)
        decode_jpeg_at(im, size if swapped else size[::-1])
        im.load()
        photo = ImageOps.exif_transpose(im) if original.exif else im.copy()
    photo = photo.convert("RGB")
    for _ in range(original.turns % 4):  # a quarter clockwise each, like np.rot90(pixels, -1)
        photo = photo.transpose(Image.Transpose.ROTATE_270)
    if photo.size != size[::-1]:
        photo = photo.resize(size[::-1], Image.LANCZOS)
    photo.save(folder / f"{stem}.jpg", quality=95)
    return f"{stem}.jpg"


def _options():
    """COLMAP's extraction and matching defaults (CPU); a mapper that accepts fewer inliers per view."""
    pycolmap = pycolmap_module()

    extraction = pycolmap.FeatureExtractionOptions()
    extraction.use_gpu = False
    matching = pycolmap.FeatureMatchingOptions()
    matching.use_gpu = False
    mapping = pycolmap.IncrementalPipelineOptions()
    mapping.multiple_models = True
    mapping.min_model_size = MIN_REGISTERED
    # COLMAP's defaults are 100, 30 and 0.25: for video-like captures. On lego_sfm_300 cut to 300x240
    # (tests/test_phone_captures.py) these place 26 of 30 views, 50, 15 and 0.15 place 9.
    mapping.mapper.init_min_num_inliers = 30
    mapping.mapper.abs_pose_min_num_inliers = 10
    mapping.mapper.abs_pose_min_inlier_ratio = 0.1
    mapping.mapper.max_reg_trials = 5
    mapping.ba_refine_focal_length = True
    mapping.random_seed = 0
    return extraction, matching, mapping


def _duplicates(images: np.ndarray) -> np.ndarray:  # [N] bool: same photo as an earlier one
    """Near-identical photos (the same file twice, or burst shots): they add no baseline."""
    small = np.stack([np.asarray(Image.fromarray(np.round(im * 255).astype(np.uint8)).resize((32, 32),
                                                                                              Image.BILINEAR))
                      for im in images]).reshape(len(images), -1).astype(np.float32) / 255
    diff = np.abs(small[:, None, :] - small[None, :, :]).mean(-1)  # [N, N]
    earlier = np.tril(diff < 2e-3, k=-1)
    return earlier.any(axis=1)


def _listed(names: Sequence[str], limit: int = 12) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def estimate_cameras(
    images: np.ndarray,  # [N, H, W, 3] in [0, 1], the capture's canvas
    masks: Optional[np.ndarray] = None,  # [N, H, W] 1 = object: trusted masks only (features outside are dropped)
    names: Optional[Sequence[str]] = None,
    focal_35mm: Optional[float] = None,  # prior for in-memory photos (files carry their own EXIF)
    matching: str = "auto",  # "auto", "exhaustive" or "sequential"
    progress: Optional[ProgressFn] = None,
    originals: Optional[Sequence[Original]] = None,  # where each view's photo is (`Capture.originals`)
) -> SfMResult:
    """Register the photos with pycolmap (see the module docstring). Raises PipelineError if too few register."""
    pycolmap = pycolmap_module()

    start = time.monotonic()
    n, h, w, _ = images.shape
    names = list(names) if names is not None else [f"view {i}" for i in range(n)]
    report = progress or (lambda fraction, message: None)
    if matching not in ("auto", "exhaustive", "sequential"):
        raise PipelineError(f"matching {matching!r} is unknown: use 'auto', 'exhaustive' or 'sequential'")
    if n < MIN_REGISTERED:
        raise PipelineError(f"only {n} photo(s): structure from motion needs at least {MIN_REGISTERED}, "
                            "better 20-60 from all around the object")
    warnings: List[str] = []
    dup = _duplicates(images)
    if dup.any():
        warnings.append(f"{int(dup.sum())} photo(s) duplicate earlier ones and were left out: "
                        f"{_listed([names[i] for i in np.flatnonzero(dup)])}")
    use = np.flatnonzero(~dup)
    if len(use) < MIN_REGISTERED:
        raise PipelineError(f"{n} photos but only {len(use)} different ones: take photos from different "
                            "positions all around the object")
    _silence_colmap()
    extraction, match_opts, mapping = _options()
    mode = matching if matching != "auto" else ("exhaustive" if len(use) <= EXHAUSTIVE_MAX else "sequential")
    with tempfile.TemporaryDirectory(prefix="photo3d_sfm_") as tmp:
        folder = Path(tmp)
        report(0.02, f"preparing {len(use)} photos for matching")
        inputs = _write_inputs(folder, images[use], None if masks is None else masks[use],
                               None if originals is None else [originals[i] for i in use], focal_35mm)
        db = folder / "database.db"
        sizes = sorted({f"{s[1]}x{s[0]}" for s in map(tuple, inputs.sizes)})
        report(0.05, f"finding features in {len(use)} photos ({', '.join(sizes)} px, {len(inputs.groups)} camera(s))")
        for key, members in inputs.groups.items():
            reader = pycolmap.ImageReaderOptions()
            reader.camera_model = "SIMPLE_RADIAL"
            height, width = key[0]
            if inputs.focal[key] is not None:  # given params mark the focal length as a prior
                reader.camera_params = f"{inputs.focal[key]},{width / 2},{height / 2},0"
            if masks is not None:
                reader.mask_path = str(folder / "masks")
            pycolmap.extract_features(db, folder / "images", image_names=[inputs.names[k] for k in members],
                                      camera_mode=pycolmap.CameraMode.SINGLE, reader_options=reader,
                                      extraction_options=extraction, device=pycolmap.Device.cpu)
        report(0.35, f"matching features ({mode})")
        if mode == "exhaustive":
            pycolmap.match_exhaustive(db, matching_options=match_opts, device=pycolmap.Device.cpu)
        else:
            pycolmap.match_sequential(db, matching_options=match_opts, device=pycolmap.Device.cpu)
        placed = [0]

        def next_image() -> None:
            placed[0] += 1
            report(0.6 + 0.35 * min(placed[0] / len(use), 1.0), f"placing photos: {placed[0]} of {len(use)}")

        report(0.6, "placing the photos (incremental mapping)")
        (folder / "sparse").mkdir()
        models = pycolmap.incremental_mapping(db, folder / "images", folder / "sparse", options=mapping,
                                              next_image_callback=next_image)
    if not models:
        raise PipelineError(_failure(0, n, [], "no two photos could be matched"))
    rec = max(models.values(), key=lambda r: r.num_reg_images())
    by_name = {im.name: im for im in rec.images.values() if im.has_pose}
    keep = [k for k, f in enumerate(inputs.names) if f in by_name]
    unplaced = [names[use[k]] for k, f in enumerate(inputs.names) if f not in by_name]
    if len(keep) < max(MIN_REGISTERED, MIN_REGISTERED_FRACTION * len(use)):
        raise PipelineError(_failure(len(keep), n, unplaced, "too few photos could be matched to the others"))
    registered = use[keep]
    if unplaced:
        warnings.append(f"{len(unplaced)} of {n} photos could not be placed and were dropped: {_listed(unplaced)}")
    if len(models) > 1:
        warnings.append(f"the photos fell into {len(models)} separate groups; kept the largest "
                        f"({len(keep)} photos). More overlap between photos joins them.")
    point_ids = np.array(sorted(rec.points3D), dtype=np.int64)
    row_of = {int(pid): r for r, pid in enumerate(point_ids)}
    out_images, out_masks, intrinsics, w2c, visible = [], [], [], [], []
    for k in keep:
        im = by_name[inputs.names[k]]
        cam = im.camera
        matched = Cameras(np.asarray(cam.calibration_matrix(), dtype=np.float64)[None], np.eye(4)[None],
                          np.array([[cam.height, cam.width]]))
        kmat = matched.resized((h, w)).intrinsics[0]  # the same camera on the canvas
        coeffs = _colmap_distortion(cam.model.name, np.asarray(cam.params))
        i = use[k]
        if np.any(coeffs != 0):
            out_images.append(undistort(images[i], kmat, coeffs, np.ones(3)))
            if masks is not None:
                out_masks.append(undistort(masks[i][..., None], kmat, coeffs, np.zeros(1))[..., 0])
        else:
            out_images.append(images[i])
            if masks is not None:
                out_masks.append(masks[i])
        intrinsics.append(kmat)
        w2c.append(np.vstack([np.asarray(im.cam_from_world().matrix()), [0, 0, 0, 1]]))
        visible.append(np.unique([row_of[int(p.point3D_id)] for p in im.get_observation_points2D()]).astype(np.int64))
    xyz = np.array([rec.points3D[int(p)].xyz for p in point_ids]).reshape(-1, 3)
    rgb = np.array([rec.points3D[int(p)].color for p in point_ids], dtype=np.uint8).reshape(-1, 3)
    result = SfMResult(
        cameras=Cameras(np.stack(intrinsics), np.stack(w2c), np.tile([h, w], (len(keep), 1))),
        registered=registered, images=np.stack(out_images).astype(np.float32),
        masks=None if masks is None else np.stack(out_masks).astype(np.float32),
        points=xyz, point_colors=rgb, mean_reprojection_error=float(rec.compute_mean_reprojection_error()),
        seconds=time.monotonic() - start, warnings=warnings, total=n, visible=visible)
    report(1.0, result.summary)
    return result


def _failure(placed: int, total: int, unplaced: Sequence[str], why: str) -> str:
    which = f" Not placed: {_listed(list(unplaced))}." if unplaced else ""
    return (f"structure from motion placed only {placed} of {total} photos ({why}).{which} Photos that are "
            "blurry, show a plain object with little texture, or show different objects cannot be matched. Take "
            "more photos with more overlap (each step around the object ~10-15 degrees), or use the "
            "turntable camera mode if the photos were taken at equal steps around the object.")


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(s, R, t) minimising |dst - (s R src + t)|^2 over points [P, 3]."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(b.T @ a / len(src))
    d = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    rot = u @ d @ vt
    scale = float(np.trace(np.diag(sig) @ d) / (a ** 2).sum(1).mean())
    return scale, rot, mu_d - scale * rot @ mu_s


def _angle(rot: np.ndarray) -> np.ndarray:  # [..., 3, 3] -> [...] degrees
    return np.degrees(np.arccos(np.clip((np.trace(rot, axis1=-2, axis2=-1) - 1) / 2, -1, 1)))


def pose_errors(est_w2c: np.ndarray,  # [N, 4, 4] estimated world_to_camera
                true_w2c: np.ndarray,  # [N, 4, 4] known world_to_camera of the same views
                ) -> dict:
    """Rotation error (deg) and centre error (% of the radius) per view after a similarity alignment.

    The camera centres are aligned by Umeyama; a few badly placed views would drag the fit and hide
    that the others are right, so the fit is repeated on the views within 3x the median error. The
    radius is the true cameras' mean distance from their centroid (the object, for a capture around it).
    """
    def centres(m):
        return -np.einsum("nji,nj->ni", m[:, :3, :3], m[:, :3, 3])

    c_est, c_true = centres(est_w2c), centres(true_w2c)
    radius = np.linalg.norm(c_true - c_true.mean(0), axis=1).mean()
    inliers = np.ones(len(c_est), dtype=bool)
    for _ in range(3):
        s, rot, t = umeyama(c_est[inliers], c_true[inliers])
        aligned = (s * (rot @ c_est.T)).T + t
        centre_err = np.linalg.norm(aligned - c_true, axis=1) / radius * 100
        inliers = centre_err <= 3 * np.median(centre_err) + 1e-9
    # World-to-camera rotation in the true frame: R_est R^T (est world = R^T (true world - t) / s).
    r_aligned = np.einsum("nij,kj->nik", est_w2c[:, :3, :3], rot)
    rel = np.einsum("nji,njk->nik", true_w2c[:, :3, :3], r_aligned)
    angle = _angle(rel)
    # Alignment-free: the angle between estimated and true relative rotations R_i R_j^T of every pair
    # (a wrong focal length bends the centres, not the relative rotations).
    pair_est = np.einsum("iab,jcb->ijac", est_w2c[:, :3, :3], est_w2c[:, :3, :3])
    pair_true = np.einsum("iab,jcb->ijac", true_w2c[:, :3, :3], true_w2c[:, :3, :3])
    pair = _angle(np.einsum("ijba,ijbc->ijac", pair_est, pair_true))  # [N, N]
    relative = np.median(pair, axis=1)  # [N] per view, its median over the others
    return {"median_relative_rotation_error_deg": float(np.median(relative)),
            "views_relative_rotation_over_5_deg": int((relative > 5).sum()),
            "relative_rotation_error_deg": relative,
            "median_rotation_error_deg": float(np.median(angle)), "max_rotation_error_deg": float(angle.max()),
            "median_centre_error_pct_radius": float(np.median(centre_err)),
            "max_centre_error_pct_radius": float(centre_err.max()),
            "views_off_by_over_5_deg": int((angle > 5).sum()),
            "rotation_error_deg": angle, "centre_error_pct_radius": centre_err}
