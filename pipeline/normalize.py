"""Scene normalisation: a similarity that puts the object inside [-0.9, 0.9]^3.

Normalised frame: X_world = s * X_norm + c (uniform scale s > 0, translation c, no rotation), so
the world's axes, handedness and "up" are kept and only units and origin change. The object's
bounding box (found by carving the masks, see `normalize_scene`) is centred at the origin and its
longest side spans [-0.9, 0.9]; everything after this step (hull, reconstruction, texturing)
works in the cube [-1, 1]^3. ``world_from_normalised`` = [[s I, c], [0, 1]] maps results back.

Cameras in the normalised frame keep their rotations and intrinsics, and their translation
becomes t_n = (R c + t) / s: a point projects to the same pixel in both frames, and its depth
is divided by s.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from scipy import ndimage
from scipy.optimize import linprog

from .cameras import Cameras
from .errors import PipelineError
from .hull import ArrayLike, as_mask_tensor, carve_field, check_cameras_finite, intrinsics_for_size

FIT = 0.9  # the object's box spans at most [-FIT, FIT] on its longest axis
SEARCH_CAP = 10.0  # the search region never extends past this many camera-spreads from their centroid
SEARCH_GROWTH = 1.5  # the all-frusta box is grown by this factor: objects cut off in a few views still fit
MIN_PART = 0.05  # carved parts smaller than this fraction of the largest are ignored (mask specks)


def normalize_scene(
    cameras: Cameras,  # world frame
    masks: ArrayLike,  # [N, H, W] in [0, 1]
    bad_view_tolerance: Optional[int] = None,  # default N // 10: a few bad masks must not shrink the box
    resolution: int = 64,
    passes: int = 2,
    device=None,
) -> Tuple[Cameras, np.ndarray]:  # cameras in the normalised frame, world_from_normalised [4, 4] float64
    """Find the object from the masks and return the cameras in the normalised frame.

    1. The box of the volume all camera frusta share (linear program), grown by ``SEARCH_GROWTH``.
    2. ``passes`` carves of that box at ``resolution``^3 (see `pipeline.hull`), each in the bounding
       box of the previous one's surviving voxels plus one voxel, so the final box is tight to
       about 1/``resolution`` of the object's size.
    3. s and c so that this box is centred and its longest side spans [-FIT, FIT].
    """
    if len(cameras) < 2:
        raise PipelineError(f"at least 2 posed views are needed to find the object, got {len(cameras)}")
    check_cameras_finite(cameras)
    mask_t = as_mask_tensor(masks, "cpu")
    if len(mask_t) != len(cameras):
        raise PipelineError(f"{len(mask_t)} masks but {len(cameras)} cameras")
    if not bool((mask_t > 0.5).any()):
        raise PipelineError("every mask is empty: no view shows the object; check the masks (alpha) of the photos")
    if bad_view_tolerance is None:
        bad_view_tolerance = len(cameras) // 10

    lo, hi = _shared_frustum_box(cameras, mask_t.shape[1], mask_t.shape[2])
    centre, half = (lo + hi) / 2, (hi - lo) / 2 * SEARCH_GROWTH
    lo, hi = centre - half, centre + half
    for _ in range(passes):
        field = carve_field(cameras, mask_t, lo, hi, resolution, bad_view_tolerance=bad_view_tolerance, device=device)
        occupied = _main_parts(field > 0.5)
        if not occupied.any():
            raise PipelineError(
                "no volume is inside the masks of (almost) all views: the masks and poses disagree. "
                "Check that each mask belongs to its photo and that the poses are in the right convention"
            )
        voxel = (hi - lo) / np.array(field.shape)
        index = np.argwhere(occupied)
        lo, hi = lo + (index.min(0) - 1) * voxel, lo + (index.max(0) + 2) * voxel

    centre = (lo + hi) / 2
    scale = float((hi - lo).max()) / (2 * FIT)
    world_from_normalised = np.eye(4)
    world_from_normalised[:3, :3] *= scale
    world_from_normalised[:3, 3] = centre
    return transform_cameras(cameras, world_from_normalised), world_from_normalised


def transform_cameras(
    cameras: Cameras,
    world_from_normalised: np.ndarray,  # [4, 4] similarity [[s I, c], [0, 1]]
) -> Cameras:
    """The same cameras with world points given in the normalised frame (pixels unchanged)."""
    scale = float(np.cbrt(np.linalg.det(world_from_normalised[:3, :3])))
    w2c = cameras.world_to_camera @ world_from_normalised  # [[s R, R c + t], [0, 1]]
    # Dividing camera coordinates by s leaves pixels unchanged and makes the matrix rigid again.
    w2c[:, :3, :] /= scale
    return Cameras(cameras.intrinsics.copy(), w2c, cameras.sizes.copy())


def cameras_in_world(
    cameras: Cameras,  # in the normalised frame
    world_from_normalised: np.ndarray,  # [4, 4] similarity [[s I, c], [0, 1]]
) -> Cameras:
    """The inverse of `transform_cameras`: cameras of the normalised frame, for world points."""
    scale = float(np.cbrt(np.linalg.det(world_from_normalised[:3, :3])))
    w2c = cameras.world_to_camera.copy()
    w2c[:, :3, :] *= scale
    return Cameras(cameras.intrinsics.copy(), w2c @ np.linalg.inv(world_from_normalised), cameras.sizes.copy())


def estimate_up(cameras: Cameras) -> np.ndarray:  # [3] unit vector, world (= normalised) frame
    """The world's "up": the mean of the cameras' up axes (-y in OpenCV axes).

    People hold cameras roughly upright, so the mean is a good guess; normalisation has no rotation,
    so the same vector is "up" in the normalised frame. When the up axes cancel out (cameras rolled
    every way) the first camera's up is used.
    """
    ups = -cameras.world_to_camera[:, 1, :3]  # [N, 3] row 1 of R is the camera's y axis in world
    mean = ups.mean(0)
    if np.linalg.norm(mean) < 1e-3:
        mean = ups[0]
    return mean / np.linalg.norm(mean)


def _shared_frustum_box(cameras: Cameras, height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """Bounding box [3], [3] of the volume inside every camera's image frustum, by 6 linear programs.

    A point X is inside camera n's frustum when its homogeneous pixel (u w, v w, w) = P X satisfies
    0 <= u w <= W w, 0 <= v w <= H w and w >= near: five linear inequalities in X. A cap of
    ``SEARCH_CAP`` camera spreads around the cameras keeps the program bounded when all cameras
    look the same way (their frusta then share an infinite cone).
    """
    centres = cameras.centers
    centroid = centres.mean(0)
    spread = float(np.linalg.norm(centres - centroid, axis=1).max())
    if spread < 1e-9 * max(1.0, float(np.abs(centroid).max())):
        raise PipelineError(
            "all cameras are at the same position: without parallax the object cannot be located; "
            "the photos must be taken from around the object"
        )
    proj = intrinsics_for_size(cameras, height, width) @ cameras.world_to_camera[:, :3, :]  # [N, 3, 4]
    u, v, w = proj[:, 0], proj[:, 1], proj[:, 2]  # [N, 4] each
    near = 1e-3 * spread
    # Rows a with a . [X, 1] >= 0 for points inside (w >= near through the last row).
    rows = np.concatenate([u, width * w - u, v, height * w - v, w - np.array([0, 0, 0, near])])  # [5N, 4]
    a_ub, b_ub = -rows[:, :3], rows[:, 3]
    bounds = [(c - SEARCH_CAP * spread, c + SEARCH_CAP * spread) for c in centroid]
    lo, hi = np.empty(3), np.empty(3)
    for axis in range(3):
        for sign, out in ((1.0, lo), (-1.0, hi)):
            objective = np.zeros(3)
            objective[axis] = sign
            result = linprog(objective, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
            if result.status != 0:
                raise PipelineError(
                    "the cameras' view frusta share no volume: not every photo looks at one common place. "
                    "Check the poses (their convention, e.g. OpenGL vs OpenCV axes) or remove views of other things"
                )
            out[axis] = result.x[axis]
    return lo, hi


def _main_parts(occupied: np.ndarray) -> np.ndarray:  # [Rx, Ry, Rz] bool
    """Occupied voxels of the parts of at least MIN_PART of the largest part's size (drops specks)."""
    labels, count = ndimage.label(occupied, structure=np.ones((3, 3, 3)))
    if count <= 1:
        return occupied
    sizes = np.bincount(labels.ravel())  # [count + 1], index 0 = empty space
    sizes[0] = 0
    return (sizes >= MIN_PART * sizes.max())[labels]
