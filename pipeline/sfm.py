"""Camera poses for unposed photos by structure from motion (pycolmap: SIFT, matching, incremental mapping).

The photos are written to a temporary folder as JPEGs (with masks, when known, so that features on
the background are dropped: COLMAP ignores pixels that are black in ``<mask_path>/<image>.png``).
Matching is exhaustive up to `EXHAUSTIVE_MAX` photos, sequential beyond (video-like orders). All photos
share one camera (one phone, one zoom); a focal length prior comes from the EXIF 35 mm equivalent
when known. The largest model is kept; photos it does not contain are dropped with a warning. The
mapper is made more permissive than COLMAP's defaults (fewer inliers to register a view), because
object captures have few, wide-baseline views rather than a dense video: see bench/sfm_lego.py.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from .cameras import Cameras
from .errors import PipelineError
from .importers.formats import _colmap_distortion
from .importers.pixels import undistort
from .turntable import FULL_FRAME_LONG_SIDE_MM

EXHAUSTIVE_MAX = 60  # beyond this many photos, exhaustive matching (N^2 pairs) is too slow on a CPU
MIN_REGISTERED = 3
DSP_MAX = 40  # up to this many photos, use domain-size pooling in SIFT (see _options)
MIN_REGISTERED_FRACTION = 0.5  # fewer than this share of the photos placed: refuse rather than guess

ProgressFn = Callable[[float, str], None]


@dataclass
class SfMResult:
    cameras: Cameras  # of the registered views, in the order of `registered`, undistorted pinhole
    registered: np.ndarray  # [R] indices of the registered views in the input
    images: np.ndarray  # [R, H, W, 3] the registered photos, undistorted to the pinhole cameras
    masks: Optional[np.ndarray]  # [R, H, W] likewise, or None
    points: np.ndarray  # [P, 3] sparse cloud (world), for previews
    point_colors: np.ndarray  # [P, 3] uint8
    mean_reprojection_error: float  # pixels
    seconds: float
    total: int  # photos given
    warnings: List[str] = field(default_factory=list)

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


def preload() -> None:
    """Import pycolmap now. Its import installs glog's failure signal handler, which takes SIGTERM too
    and prints a crash-style stack trace on an ordinary shutdown: a program that handles SIGTERM
    itself (the app) calls this from its main thread before it sets its own handler."""
    import pycolmap  # noqa: F401


def _silence_colmap() -> None:
    """pycolmap logs every step through glog on stderr; its errors ("Failed to create any sparse model")
    become our PipelineErrors, which say it in the user's terms: keep only fatal ones."""
    import pycolmap

    pycolmap.logging.minloglevel = 3
    pycolmap.logging.stderrthreshold = 3


def _write_inputs(folder: Path, images: np.ndarray, masks: Optional[np.ndarray]) -> List[str]:
    (folder / "images").mkdir()
    names = [f"{i:05d}.jpg" for i in range(len(images))]
    for name, img in zip(names, images):
        Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / "images" / name, quality=95)
    if masks is not None:
        (folder / "masks").mkdir()
        # Grow the object a little: corners on the silhouette's edge are good features, and a mask
        # that is slightly too tight must not remove them.
        grow = max(2, int(0.02 * max(images.shape[1:3])))
        for name, m in zip(names, masks):
            keep = ndimage.binary_dilation(m > 0.5, iterations=grow)
            Image.fromarray((keep * 255).astype(np.uint8)).save(folder / "masks" / f"{name}.png")
    return names


def _options(n: int, focal_px: Optional[float], size: tuple[int, int]):
    import pycolmap

    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = "SIMPLE_RADIAL"
    if focal_px is not None:
        h, w = size
        reader.camera_params = f"{focal_px},{w / 2},{h / 2},0"  # marks the focal length as a prior
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.use_gpu = False
    # Affine-adapted, domain-size-pooled SIFT matches across wider viewpoint changes (CPU only). Pooling
    # triples extraction and matching time; few photos need it (lego, 25 views: 22 placed with it, 17 and
    # a wrong model without), many photos overlap enough without it (50 views: all placed either way).
    extraction.sift.estimate_affine_shape = True
    extraction.sift.domain_size_pooling = n <= DSP_MAX
    extraction.sift.max_num_features = 8192
    matching = pycolmap.FeatureMatchingOptions()
    matching.use_gpu = False
    matching.guided_matching = True
    mapping = pycolmap.IncrementalPipelineOptions()
    mapping.multiple_models = True
    mapping.min_model_size = MIN_REGISTERED
    mapping.mapper.init_min_num_inliers = 50
    mapping.mapper.abs_pose_min_num_inliers = 15
    mapping.mapper.abs_pose_min_inlier_ratio = 0.15
    mapping.mapper.max_reg_trials = 5
    mapping.ba_refine_focal_length = True
    mapping.random_seed = 0
    return reader, extraction, matching, mapping


def _duplicates(images: np.ndarray) -> np.ndarray:  # [N] bool: same photo as an earlier one
    """Near-identical photos (the same file twice, or burst shots): they add no baseline."""
    small = np.stack([np.asarray(Image.fromarray(np.round(im * 255).astype(np.uint8)).resize((32, 32),
                                                                                              Image.BILINEAR))
                      for im in images]).reshape(len(images), -1).astype(np.float32) / 255
    diff = np.abs(small[:, None, :] - small[None, :, :]).mean(-1)  # [N, N]
    earlier = np.tril(diff < 2e-3, k=-1)
    return earlier.any(axis=1)


def estimate_cameras(
    images: np.ndarray,  # [N, H, W, 3] in [0, 1]
    masks: Optional[np.ndarray] = None,  # [N, H, W] 1 = object; background features are dropped
    names: Optional[Sequence[str]] = None,
    focal_35mm: Optional[float] = None,
    matching: str = "auto",  # "auto", "exhaustive" or "sequential"
    progress: Optional[ProgressFn] = None,
) -> SfMResult:
    """Register the photos with pycolmap (see the module docstring). Raises PipelineError if too few register."""
    import pycolmap

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
                        f"{', '.join(names[i] for i in np.flatnonzero(dup)[:5])}")
    use = np.flatnonzero(~dup)
    if len(use) < MIN_REGISTERED:
        raise PipelineError(f"{n} photos but only {len(use)} different ones: take photos from different "
                            "positions all around the object")
    _silence_colmap()
    focal_px = focal_35mm / FULL_FRAME_LONG_SIDE_MM * max(h, w) if focal_35mm else None
    reader, extraction, match_opts, mapping = _options(len(use), focal_px, (h, w))
    mode = matching if matching != "auto" else ("exhaustive" if len(use) <= EXHAUSTIVE_MAX else "sequential")
    with tempfile.TemporaryDirectory(prefix="photo3d_sfm_") as tmp:
        folder = Path(tmp)
        files = _write_inputs(folder, images[use], None if masks is None else masks[use])
        if masks is not None:
            reader.mask_path = str(folder / "masks")
        db = folder / "database.db"
        report(0.05, f"finding features in {len(use)} photos")
        pycolmap.extract_features(db, folder / "images", image_names=files, camera_mode=pycolmap.CameraMode.SINGLE,
                                  reader_options=reader, extraction_options=extraction,
                                  device=pycolmap.Device.cpu)
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
        raise PipelineError(_failure(0, n, "no two photos could be matched"))
    rec = max(models.values(), key=lambda r: r.num_reg_images())
    by_name = {im.name: im for im in rec.images.values() if im.has_pose}
    keep = [k for k, f in enumerate(files) if f in by_name]
    if len(keep) < max(MIN_REGISTERED, MIN_REGISTERED_FRACTION * len(use)):
        raise PipelineError(_failure(len(keep), n, "too few photos could be placed"))
    registered = use[keep]
    dropped = sorted(set(range(n)) - set(registered.tolist()) - set(np.flatnonzero(dup).tolist()))
    if dropped:
        warnings.append(f"{len(dropped)} of {n} photos could not be placed and were dropped: "
                        f"{', '.join(names[i] for i in dropped[:8])}{' ...' if len(dropped) > 8 else ''}")
    if len(models) > 1:
        warnings.append(f"the photos fell into {len(models)} separate groups; kept the largest "
                        f"({len(keep)} photos). More overlap between photos joins them.")
    out_images, out_masks, intrinsics, w2c = [], [], [], []
    for k in keep:
        im = by_name[files[k]]
        cam = im.camera
        kmat = np.asarray(cam.calibration_matrix(), dtype=np.float64)
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
    xyz = np.array([p.xyz for p in rec.points3D.values()]).reshape(-1, 3)
    rgb = np.array([p.color for p in rec.points3D.values()], dtype=np.uint8).reshape(-1, 3)
    result = SfMResult(
        cameras=Cameras(np.stack(intrinsics), np.stack(w2c), np.tile([h, w], (len(keep), 1))),
        registered=registered, images=np.stack(out_images).astype(np.float32),
        masks=None if masks is None else np.stack(out_masks).astype(np.float32),
        points=xyz, point_colors=rgb, mean_reprojection_error=float(rec.compute_mean_reprojection_error()),
        seconds=time.monotonic() - start, warnings=warnings, total=n)
    report(1.0, result.summary)
    return result


def _failure(placed: int, total: int, why: str) -> str:
    return (f"structure from motion placed only {placed} of {total} photos ({why}). Photos that are blurry, "
            "show a plain object with little texture, or show different objects cannot be matched. Take "
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
