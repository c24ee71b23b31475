"""Object masks from the geometry of a walk-around, for photos on cluttered backgrounds (no weights needed).

The object is what every camera looks at. With the cameras known (given, or from structure from
motion) and sparse 3D points (SfM's, or `triangulate_with_poses` for posed captures):

1. `common_focus`: the point nearest to every camera's optical axis; the scene scale is the median
   camera distance to it.
2. `classify_points`: points that almost every camera frames and that lie near the focus are the
   object's candidates; a dominant plane through them with every camera on one side is the support
   (table, floor) and is background, as are the points far from the focus.
3. Per photo, a graph cut (`graph_cut`: the exact minimum, by `scipy.sparse.csgraph.maximum_flow`)
   between object and background colour models (smoothed RGB histograms) shared by all photos and
   mixed with each photo's own, refitted from the labels of every photo (GrabCut's loop); the photo's
   object points are object seeds, its background points and frame border background seeds;
   contrast-sensitive smoothing; a spatial prior against "object" away from the projected object
   points (first round), then away from the visual hull's silhouette, with a bonus inside it.
4. The masks carve a visual hull (a few views may disagree); its silhouette in each photo bounds the
   next round; views whose final mask still disagrees with the hull are flagged.

With too few points on the object (small photos, plain objects) the first round starts instead from
the volume that almost every camera frames, projected into each photo, with an object colour model
of the colours that every photo shows there (the object is in all of them, the backgrounds differ).

Everything runs at a working size of at most ``work_side`` pixels on the long side; the masks are
returned at the capture's size.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import breadth_first_order, maximum_flow
from skimage import color

from .cameras import Cameras
from .capture import Original
from .errors import PipelineError

FLAG_BELOW_IOU = 0.7  # a mask whose IoU with the hull's silhouette is below this is flagged
WORK_SIDE = 192  # long side of the working images (pixels)
ROUNDS = 3  # graph cuts, then hull, then graph cuts bounded by the hull, ...
MIN_OBJECT_POINTS = 50  # fewer points on the object than this, or than MIN_POINTS_PER_VIEW in most
MIN_POINTS_PER_VIEW = 10  # photos, and the first round starts from the shared volume instead of seeds
REGION_REACH = 0.04  # the object may extend this far (share of the long side) from its projected points
PRIOR_RAMP = 0.025  # outside that, the cost of "object" grows by 2 nats per this share of the long side
BINS = 32  # colour histogram bins per RGB channel
SHARED = 0.5  # weight of the colour models shared by all photos against each photo's own
SEED_COST = 5.0  # nats against the other label at a pixel where the photo observes an object/background point
HULL_TRUST = 3.0  # nats in favour of "object" inside the hull's silhouette (after the first round)
HULL_TOLERANCE = 0.08  # share of the views that may disagree with a voxel of the hull (bad masks), rounded
_CAPACITY_SCALE = 1000.0  # graph-cut costs are integers: this many units per nat


@dataclass
class Points:
    """Sparse 3D points and the views that observe each."""

    xyz: np.ndarray  # [P, 3] world
    seen_by: List[np.ndarray]  # per view: [M] indices of the points it observes


# ------------------------------------------------------------------------------------------ geometry


def common_focus(cameras: Cameras) -> np.ndarray:  # [3] world
    """The point with the least squared distance to every camera's optical axis."""
    centres = cameras.centers  # [N, 3]
    axes = cameras.world_to_camera[:, 2, :3]  # [N, 3] row 2 of R: the viewing direction in world
    proj = np.eye(3)[None] - axes[:, :, None] * axes[:, None, :]  # [N, 3, 3] onto the plane normal to each axis
    a = proj.sum(0)
    b = np.einsum("nij,nj->i", proj, centres)
    if np.linalg.cond(a) > 1e8:
        raise PipelineError("all cameras look along one line: the photos must be taken from around the object")
    return np.linalg.solve(a, b)


def _framed_fraction(cameras: Cameras, xyz: np.ndarray) -> np.ndarray:  # [P] share of cameras framing each point
    xy, depth = cameras.project(xyz)  # [N, P, 2], [N, P]
    h, w = cameras.sizes[:, 0:1], cameras.sizes[:, 1:2]
    inside = (depth > 0) & (xy[..., 0] >= 0) & (xy[..., 0] <= w) & (xy[..., 1] >= 0) & (xy[..., 1] <= h)
    return inside.mean(0)


def classify_points(cameras: Cameras, xyz: np.ndarray,  # [P, 3]
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """(object [P] bool, background [P] bool, facts): see the module docstring, steps 1-2.

    Points neither object nor background (framed by many cameras but not near the focus) are left
    to the graph cut.
    """
    focus = common_focus(cameras)
    scale = float(np.median(np.linalg.norm(cameras.centers - focus, axis=1)))
    dist = np.linalg.norm(xyz - focus, axis=1) / scale
    framed = _framed_fraction(cameras, xyz)
    candidate = (framed >= 0.8) & (dist < 0.6)
    background = (dist > 1.0) | (framed < 0.5)
    facts = {"focus": focus, "scale": scale, "plane": None}
    if candidate.sum() >= MIN_OBJECT_POINTS:
        plane = _support_plane(xyz[candidate], cameras.centers, scale, np.random.default_rng(seed))
        if plane is not None:
            normal, offset = plane
            height = xyz @ normal - offset  # > 0 on the cameras' side
            on_plane = np.abs(height) < 0.02 * scale
            background |= (on_plane | (height < 0)) & (dist < 1.5)
            candidate &= height > 0.03 * scale
            facts["plane"] = plane
    if candidate.sum() >= MIN_OBJECT_POINTS:
        # The object is compact around the focus: keep the candidates within 3x their median distance
        # of their own median (stray points on other things framed by every camera are left out).
        centre = np.median(xyz[candidate], axis=0)
        spread = np.linalg.norm(xyz[candidate] - centre, axis=1)
        candidate &= np.linalg.norm(xyz - centre, axis=1) <= 3.0 * np.median(spread)
    return candidate, background & ~candidate, facts


def _support_plane(xyz: np.ndarray, centres: np.ndarray, scale: float, rng: np.random.Generator,
                   trials: int = 300) -> Optional[tuple[np.ndarray, float]]:
    """(unit normal towards the cameras, offset) of a plane holding >= 25% of ``xyz`` within 2% of the
    scene scale with at least 90% of the cameras above it, or None."""
    best, best_count = None, 0
    for _ in range(trials):
        p = xyz[rng.choice(len(xyz), 3, replace=False)]
        normal = np.cross(p[1] - p[0], p[2] - p[0])
        if np.linalg.norm(normal) < 1e-12:
            continue
        normal /= np.linalg.norm(normal)
        offset = float(normal @ p[0])
        count = int((np.abs(xyz @ normal - offset) < 0.02 * scale).sum())
        if count > best_count:
            best, best_count = (normal, offset), count
    if best is None or best_count < 0.25 * len(xyz):
        return None
    normal, offset = best
    inliers = np.abs(xyz @ normal - offset) < 0.02 * scale
    centroid = xyz[inliers].mean(0)  # refit by least squares
    normal = np.linalg.svd(xyz[inliers] - centroid, full_matrices=False)[2][-1]
    offset = float(normal @ centroid)
    side = centres @ normal - offset
    if (side > 0).mean() < 0.5:
        normal, offset, side = -normal, -offset, -side
    return (normal, offset) if (side > 0).mean() >= 0.9 else None


def triangulate_with_poses(images: np.ndarray,  # [N, H, W, 3] the canvas
                           cameras: Cameras,  # on the canvas
                           originals: Optional[Sequence[Original]] = None,
                           neighbours: int = 6, long_side: int = 1024,
                           max_error_px: float = 2.0) -> Points:
    """Sparse points of a posed capture: SIFT matches between each photo and its ``neighbours``
    nearest views (by direction from the common focus), verified by pycolmap, triangulated with the
    given cameras; a point is kept when it reprojects within ``max_error_px`` in both photos (at
    matching size), in front of both, with at least 1 degree between the rays."""
    from .sfm import _silence_colmap, _write_inputs, pycolmap_module  # noqa: PLC0415 (sfm imports this module's users)

    pycolmap = pycolmap_module()

    _silence_colmap()
    n = len(images)
    focus = common_focus(cameras)
    directions = cameras.centers - focus
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    cosine = directions @ directions.T
    np.fill_diagonal(cosine, -np.inf)
    pairs = {tuple(sorted((i, int(j)))) for i in range(n) for j in np.argsort(-cosine[i])[:neighbours]}
    with tempfile.TemporaryDirectory(prefix="photo3d_tri_") as tmp:
        folder = Path(tmp)
        inputs = _write_inputs(folder, images, None, originals, None, long_side=long_side)
        db_path = folder / "database.db"
        extraction = pycolmap.FeatureExtractionOptions()
        extraction.use_gpu = False
        pycolmap.extract_features(db_path, folder / "images", image_names=inputs.names,
                                  camera_mode=pycolmap.CameraMode.PER_IMAGE, extraction_options=extraction,
                                  device=pycolmap.Device.cpu)
        (folder / "pairs.txt").write_text("".join(f"{inputs.names[a]} {inputs.names[b]}\n" for a, b in sorted(pairs)))
        pairing = pycolmap.ImportedPairingOptions()
        pairing.match_list_path = str(folder / "pairs.txt")
        matching = pycolmap.FeatureMatchingOptions()
        matching.use_gpu = False
        pycolmap.match_image_pairs(db_path, matching_options=matching, pairing_options=pairing,
                                   device=pycolmap.Device.cpu)
        db = pycolmap.Database.open(db_path)
        view_of = {im.image_id: inputs.names.index(im.name) for im in db.read_all_images()}
        keypoints = {view_of[i]: db.read_keypoints(i)[:, :2].astype(np.float64) for i in view_of}
        pair_ids, geometries = db.read_two_view_geometries()
        db.close()
    matched = cameras.resized(inputs.sizes)  # the cameras at the matched photos' sizes
    proj = matched.intrinsics @ matched.world_to_camera[:, :3, :]  # [N, 3, 4]
    xyz, views = [], []
    for pair_id, geometry in zip(pair_ids, geometries):
        matches = np.asarray(geometry.inlier_matches)
        if len(matches) == 0:
            continue
        id1, id2 = pycolmap.pair_id_to_image_pair(pair_id)
        a, b = view_of[id1], view_of[id2]
        xa, xb = keypoints[a][matches[:, 0]], keypoints[b][matches[:, 1]]
        points = _triangulate(proj[a], proj[b], xa, xb)
        ok = np.ones(len(points), dtype=bool)
        rays = []
        for view, x in ((a, xa), (b, xb)):
            cam = matched[view]
            pix, depth = cam.project(points)
            ok &= (depth[0] > 0) & (np.linalg.norm(pix[0] - x, axis=1) < max_error_px)
            rays.append(points - cam.centers[0])
        cos = np.einsum("pi,pi->p", *rays) / np.maximum(np.linalg.norm(rays[0], axis=1) * np.linalg.norm(rays[1], axis=1), 1e-12)
        ok &= cos < np.cos(np.radians(1.0))
        xyz.append(points[ok])
        views.append(np.tile([a, b], (int(ok.sum()), 1)))
    xyz = np.concatenate(xyz) if xyz else np.zeros((0, 3))
    views = np.concatenate(views) if views else np.zeros((0, 2), dtype=np.int64)
    seen_by = [np.flatnonzero((views == v).any(axis=1)) for v in range(n)]
    return Points(xyz, seen_by)


def _triangulate(pa: np.ndarray, pb: np.ndarray,  # [3, 4] projection matrices
                 xa: np.ndarray, xb: np.ndarray) -> np.ndarray:  # [M, 2] pixels -> [M, 3] (linear, DLT)
    rows = np.stack([xa[:, :1] * pa[2] - pa[0], xa[:, 1:] * pa[2] - pa[1],
                     xb[:, :1] * pb[2] - pb[0], xb[:, 1:] * pb[2] - pb[1]], axis=1)  # [M, 4, 4]
    homog = np.linalg.svd(rows)[2][:, -1]  # [M, 4]
    with np.errstate(divide="ignore", invalid="ignore"):
        return homog[:, :3] / homog[:, 3:]


# ------------------------------------------------------------------------------------------ graph cut


def graph_cut(cost_object: np.ndarray,  # [H, W] cost (nats) of labelling each pixel object
              cost_background: np.ndarray,  # [H, W] cost of labelling it background
              image: np.ndarray,  # [H, W, C] for the contrast-sensitive smoothing (e.g. Lab)
              smoothness: float = 2.0) -> np.ndarray:  # [H, W] bool, True = object
    """Exact minimum of sum(unary) + smoothness * sum over 4-neighbours of exp(-beta |dI|^2) [labels differ].

    beta = 1 / (2 mean |dI|^2) as in GrabCut. Solved as a minimum s-t cut (scipy's Dinic max flow on
    integer capacities); infinite costs (hard seeds) are allowed.
    """
    h, w = cost_object.shape
    n = h * w
    index = np.arange(n).reshape(h, w)
    diffs = [((image[:, 1:] - image[:, :-1]) ** 2).sum(-1), ((image[1:] - image[:-1]) ** 2).sum(-1)]
    beta = 1.0 / (2.0 * max(np.mean(np.concatenate([d.ravel() for d in diffs])), 1e-12))
    big = int(1e7)  # a hard seed: 10^4 nats, far above any smoothing cut

    def units(cost: np.ndarray) -> np.ndarray:
        return np.where(np.isfinite(cost), np.clip(np.round(cost * _CAPACITY_SCALE), 0, big), big).astype(np.int64)

    lowest = np.minimum(cost_object, cost_background)  # only the difference matters: keep capacities small
    finite = np.isfinite(lowest)
    shift = np.where(finite, lowest, 0.0)
    source, sink = n, n + 1
    rows = [np.full(n, source), index.ravel()]
    cols = [index.ravel(), np.full(n, sink)]
    caps = [units((cost_background - shift).ravel()), units((cost_object - shift).ravel())]
    for (a, b), d in zip(((index[:, :-1], index[:, 1:]), (index[:-1], index[1:])), diffs):
        weight = np.maximum(np.round(smoothness * _CAPACITY_SCALE * np.exp(-beta * d)), 1).astype(np.int64).ravel()
        rows += [a.ravel(), b.ravel()]
        cols += [b.ravel(), a.ravel()]
        caps += [weight, weight]
    graph = csr_matrix((np.concatenate(caps).astype(np.int32), (np.concatenate(rows), np.concatenate(cols))),
                       shape=(n + 2, n + 2))
    flow = maximum_flow(graph, source, sink, method="dinic").flow
    residual = graph - flow
    residual.data[residual.data < 0] = 0
    residual.eliminate_zeros()
    reached = breadth_first_order(residual, source, directed=True, return_predecessors=False)
    label = np.zeros(n + 2, dtype=bool)
    label[reached] = True
    return label[:n].reshape(h, w)


# ------------------------------------------------------------------------------------------ masks


@dataclass
class GeometricMasks:
    masks: np.ndarray  # [N, H, W] float32 in {0, 1} at the capture's size
    hull_iou: np.ndarray  # [N] IoU of each mask with the visual hull's silhouette in that view
    flagged: np.ndarray  # [N] bool: the mask disagrees with the hull (`FLAG_BELOW_IOU`)
    object_points: int
    background_points: int
    plane: bool  # a support plane (table, floor) was found and taken as background


def _prior_outside(region: np.ndarray,  # [h, w] bool: where the object may be
                   ramp: float) -> np.ndarray:  # [h, w] nats against "object", growing with the distance outside
    distance = ndimage.distance_transform_edt(~region)
    return np.minimum(distance / ramp, 4.0) * 2.0


def _disk_pixels(xy: np.ndarray, shape: tuple[int, int], radius: int = 1) -> np.ndarray:  # [h, w] bool
    out = np.zeros(shape, dtype=bool)
    cols = np.floor(xy[:, 0]).astype(np.int64)
    rows = np.floor(xy[:, 1]).astype(np.int64)
    ok = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    out[rows[ok], cols[ok]] = True
    return ndimage.binary_dilation(out, iterations=radius) if radius > 0 and out.any() else out


def geometric_masks(images: np.ndarray,  # [N, H, W, 3] in [0, 1], the canvas
                    cameras: Cameras,  # on the canvas
                    points: Optional[Points],
                    work_side: int = WORK_SIDE, rounds: int = ROUNDS, cut_iterations: int = 2,
                    smoothness: float = 2.0, seed: int = 0) -> GeometricMasks:
    """Masks by graph cuts seeded from the geometry, refined with the visual hull (module docstring).

    With too few points on the object (small photos, little texture) the first round's region is
    the volume that almost every camera frames, projected into each photo, and there are no seeds.
    """
    n, height, width, _ = images.shape
    factor = min(1.0, work_side / max(height, width))
    size = (max(1, round(height * factor)), max(1, round(width * factor)))
    work = cameras.resized(size)
    small = np.stack([np.asarray(Image.fromarray(np.round(np.clip(im, 0, 1) * 255).astype(np.uint8)).resize(
        size[::-1], Image.BILINEAR), dtype=np.float32) / 255 for im in images])
    lab = color.rgb2lab(small)  # [N, h, w, 3], for the smoothing's contrast
    bins = colour_bins(small)  # [N, h, w], for the colour models
    xyz = points.xyz if points is not None else np.zeros((0, 3))
    obj, bg, facts = classify_points(cameras, xyz, seed) if len(xyz) else (np.zeros(0, bool),) * 2 + ({"plane": None},)
    ramp = PRIOR_RAMP * max(size)
    far = max(1, int(4 * ramp))
    border = np.zeros(size, dtype=bool)
    border[:2], border[-2:], border[:, :2], border[:, -2:] = True, True, True, True
    seen_on_object = [int(obj[s].sum()) for s in points.seen_by] if points is not None else [0]
    seeded = obj.sum() >= MIN_OBJECT_POINTS and np.median(seen_on_object) >= MIN_POINTS_PER_VIEW
    if seeded:
        region, seeds_fg, seeds_bg = _regions_from_points(work, size, xyz, points.seen_by, obj, bg)
        box = _cube(xyz[obj])
        # The first colour models: the object's from around its points, the background's from
        # outside where the object may be (the region between holds both).
        labels = np.stack([ndimage.binary_dilation(m, iterations=2) for m in seeds_fg]) & region
    else:
        box, region = _shared_volume(work, size, common_focus(cameras))
        seeds_fg = seeds_bg = np.zeros((n, *size), dtype=bool)
        labels = region.copy()
    hard_bg = (border[None] & ~region) | ~_dilate(region, far)
    inside_hull = np.zeros((n, *size), dtype=bool)
    silhouettes = None
    for round_ in range(rounds):
        prior = np.stack([_prior_outside(region[v], ramp) for v in range(n)])
        for it in range(cut_iterations):
            first = seeded and round_ == 0 and it == 0
            cost_fg, cost_bg = _colour_costs(bins, labels, hard_bg, None, region if first else None,
                                             common=not seeded and round_ == 0 and it == 0)
            cost_fg += prior + SEED_COST * seeds_bg
            cost_bg += SEED_COST * seeds_fg + HULL_TRUST * inside_hull
            cost_fg = np.where(hard_bg, np.inf, cost_fg)
            labels = np.stack([_largest_parts(_cut_within(cost_fg[v], cost_bg[v], lab[v], smoothness, ~hard_bg[v]))
                               for v in range(n)])
        if round_ == rounds - 1:
            break
        silhouettes = _hull_silhouettes(work, size, labels, box)
        if silhouettes is None:
            break
        inside_hull = silhouettes
        region = _dilate(silhouettes, max(1, int(0.02 * max(size))))
        hard_bg = (border[None] & ~region) | ~_dilate(region, far)
    hull_iou = _iou(labels, silhouettes) if silhouettes is not None else np.zeros(n)
    masks = np.stack([np.asarray(Image.fromarray((m * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR))
                      for m in labels]) > 127
    return GeometricMasks(masks.astype(np.float32), hull_iou, hull_iou < FLAG_BELOW_IOU, int(obj.sum()),
                          int(bg.sum()), facts["plane"] is not None)


def _dilate(masks: np.ndarray, steps: int) -> np.ndarray:  # [N, h, w] bool
    return np.stack([ndimage.binary_dilation(m, iterations=steps) for m in masks])


def _cube(xyz: np.ndarray, grow: float = 1.6) -> tuple[np.ndarray, float]:  # (centre [3], half side)
    """A cube around the bulk of ``xyz`` (1st to 99th percentile), grown by ``grow``."""
    lo, hi = np.percentile(xyz, 1, axis=0), np.percentile(xyz, 99, axis=0)
    return (lo + hi) / 2, float((hi - lo).max()) / 2 * grow + 1e-9


def _regions_from_points(work: Cameras, size, xyz, seen_by, obj, bg):
    """(region, object seeds, background seeds) [N, h, w] bool each: where the object may be (disks
    around all its points as each camera sees them; the points of the parts a camera does not see
    lie over the parts it does) and the points each photo observes."""
    xy_all, depth_all = work.project(xyz)  # [N, P, 2], [N, P]
    reach = max(1, int(REGION_REACH * max(size)))
    region, seeds_fg, seeds_bg = [], [], []
    for v in range(len(work)):
        seen = seen_by[v]
        seeds_fg.append(_disk_pixels(xy_all[v, seen[obj[seen]]], size))
        seeds_bg.append(_disk_pixels(xy_all[v, seen[bg[seen]]], size))
        splat = _disk_pixels(xy_all[v, obj & (depth_all[v] > 0)], size, radius=0)
        region.append(ndimage.binary_closing(ndimage.binary_dilation(splat, iterations=reach), iterations=reach))
    return np.stack(region), np.stack(seeds_fg), np.stack(seeds_bg)


def _shared_volume(work: Cameras, size, focus: np.ndarray):
    """(cube, silhouettes [N, h, w]) of the volume that at least 90% of the cameras frame, near the focus."""
    from .hull import carve_field  # noqa: PLC0415

    half = float(np.median(np.linalg.norm(work.centers - focus, axis=1)))
    field = carve_field(work, np.ones((len(work), *size), np.float32), focus - half, focus + half, 48,
                        min_seen_fraction=0.9)
    inside = np.argwhere(field > 0.5)
    if len(inside) == 0:
        raise PipelineError("no volume is framed by (almost) every photo: the photos do not all look at one object")
    voxel = 2 * half / 48
    centres = focus - half + (inside + 0.5) * voxel
    box = _cube(centres, grow=1.0)
    return box, _hull_silhouettes(work, size, None, box, field=field, field_box=(focus, half))


def _hull_silhouettes(work: Cameras, size, labels, box, field=None, field_box=None):
    """[N, h, w] bool silhouettes of the visual hull of ``labels`` carved in the cube ``box`` (or of a
    given ``field`` over ``field_box``), or None when nothing survives."""
    from .hull import carve_field, hull_mesh, render_silhouettes  # noqa: PLC0415

    centre, half = field_box if field is not None else box
    if field is None:
        field = carve_field(work, labels.astype(np.float32), centre - half, centre + half, 64,
                            bad_view_tolerance=round(HULL_TOLERANCE * len(work)))
    if not (field > 0.5).any():
        return None
    vertices, faces = hull_mesh(field)  # in the cube's [-1, 1]^3
    return render_silhouettes(centre + half * vertices.astype(np.float64), faces, work, size)


def _colour_costs(bins: np.ndarray,  # [N, h, w]
                  labels: np.ndarray,  # [N, h, w] bool, current object labels
                  hard_bg: np.ndarray,  # [N, h, w] bool
                  background: Optional[np.ndarray] = None,  # [N, h, w] where to learn the background; default ~labels
                  exclude: Optional[np.ndarray] = None,  # [N, h, w] left out of the background samples
                  common: bool = False,
                  ) -> tuple[np.ndarray, np.ndarray]:  # costs (nats) of "object" and of "background"
    """Colour models shared by all photos, refitted from every photo's labels, mixed with each photo's
    own (lighting changes between photos; a backdrop may fill one photo and not another).

    ``common``: the shared object model keeps the colours that every photo's object labels hold (the
    geometric mean of their densities), for labels that are mostly background: the object is what
    all photos show, the backgrounds behind it differ.
    """
    background = ~labels if background is None else background
    if exclude is not None:
        background = background & ~exclude
    objects = labels & ~hard_bg
    own_fgs = np.stack([np.exp(colour_log_density(bins[v][objects[v]])) for v in range(len(bins))])
    if common:
        shared_fg = np.exp(np.log(own_fgs).mean(0))
        shared_fg /= shared_fg.sum()
    else:
        shared_fg = np.exp(colour_log_density(bins[objects]))
    shared_bg = np.exp(colour_log_density(bins[background]))
    cost_fg, cost_bg = np.empty(bins.shape), np.empty(bins.shape)
    for v in range(len(bins)):
        own_fg = own_fgs[v]
        own_bg = np.exp(colour_log_density(bins[v][background[v]]))
        share = 1.0 if common else SHARED  # a photo's own object labels are mostly its background then
        cost_fg[v] = -np.log(share * shared_fg + (1 - share) * own_fg)[bins[v]]
        cost_bg[v] = -np.log(SHARED * shared_bg + (1 - SHARED) * own_bg)[bins[v]]
    return cost_fg, cost_bg


def _cut_within(cost_fg: np.ndarray, cost_bg: np.ndarray, lab: np.ndarray, smoothness: float,
                open_: np.ndarray) -> np.ndarray:  # [h, w] bool
    """`graph_cut` on the bounding box of the pixels that may be object (``open_``); the rest is background."""
    out = np.zeros(open_.shape, dtype=bool)
    if not open_.any():
        return out
    rows, cols = np.flatnonzero(open_.any(1)), np.flatnonzero(open_.any(0))
    box = slice(max(rows[0] - 1, 0), rows[-1] + 2), slice(max(cols[0] - 1, 0), cols[-1] + 2)
    out[box] = graph_cut(cost_fg[box], cost_bg[box], lab[box], smoothness)
    return out




def colour_bins(images: np.ndarray) -> np.ndarray:  # [..., 3] in [0, 1] -> [...] int64 bin index
    q = np.clip((images * BINS).astype(np.int64), 0, BINS - 1)
    return (q[..., 0] * BINS + q[..., 1]) * BINS + q[..., 2]


def colour_log_density(bins: np.ndarray,  # [M] bin indices of the samples
                       blur: float = 1.0) -> np.ndarray:  # [BINS^3] log density per bin
    """A smoothed colour histogram: counts blurred by ``blur`` bins, plus one count spread over all bins."""
    hist = np.bincount(bins, minlength=BINS ** 3).astype(np.float64).reshape(BINS, BINS, BINS)
    hist = ndimage.gaussian_filter(hist, blur, mode="constant") + 1.0 / BINS ** 3
    return np.log(hist / hist.sum()).ravel()


def _largest_parts(mask: np.ndarray, keep: float = 0.2) -> np.ndarray:
    """The connected parts of at least ``keep`` of the largest's area (specks of background go)."""
    lab, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return (sizes >= keep * sizes.max())[lab]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # [N, h, w] bool each -> [N]
    inter = (a & b).sum((1, 2))
    union = (a | b).sum((1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)
