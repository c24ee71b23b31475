"""Image and geometry metrics: PSNR / SSIM / mask IoU against photos; Chamfer-L1, F-score and
normal consistency against a ground-truth mesh; fold-overs, creases, slivers and topology of a mesh
on its own (`surface_quality`)."""

from __future__ import annotations

from typing import Dict, List, Optional, Union

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from skimage.metrics import structural_similarity

from .cameras import Cameras, to_clip
from .mesh import TexturedMesh, camera_centers, clip_range, pixels_seen_from_behind, render_shaded, render_textured
from .render import Rasterizer

WELD_TOLERANCE = 1e-6  # vertices closer than this fraction of the bounding-box diagonal are one vertex
FOLD_OVER_COS = 0.0  # adjacent unit face normals with a dot below this are folded over (> 90 degrees)
CREASE_COS = 0.5  # ... below this, a crease (> 60 degrees)
SLIVER_RADIUS_RATIO = 4.0  # faces with circumradius / (2 inradius) above this are slivers (1 = equilateral)


def _view_matrices(vertices: np.ndarray, cameras: Cameras, resolution: tuple[int, int], device) -> torch.Tensor:
    """[N, 4, 4] float32 clip matrices whose depth range holds the mesh's bounding sphere."""
    center = (vertices.max(0) + vertices.min(0)) / 2
    radius = float(np.linalg.norm(vertices - center, axis=1).max())
    near, far = clip_range(cameras, center, radius)
    return torch.tensor(cameras.clip_matrices(resolution, near, far), dtype=torch.float32, device=device)


@torch.no_grad()
def render_views(
    mesh: TexturedMesh,  # in the cameras' frame
    cameras: Cameras,
    resolution: tuple[int, int],  # (H, W)
    rasterizer: Rasterizer,
    background: float = 1.0,
    chunk: int = 8,
) -> tuple[np.ndarray, np.ndarray]:  # rgb [N, H, W, 3], alpha [N, H, W], float32
    """Render the textured mesh into every camera over a uniform background."""
    device = rasterizer.device
    mats = _view_matrices(mesh.vertices, cameras, resolution, device)
    tensors = dict(
        vertices=torch.from_numpy(mesh.vertices).float().to(device),
        faces=torch.from_numpy(mesh.faces).int().to(device),
        uvs=torch.from_numpy(mesh.uvs).float().to(device),
        faces_uv=torch.from_numpy(mesh.faces_uv).int().to(device),
        texture=torch.from_numpy(mesh.texture).float().to(device)[None],
    )
    rgbs, alphas = [], []
    for start in range(0, len(cameras), chunk):
        m = mats[start:start + chunk]
        bg = torch.full((len(m), 1, 1, 3), background, device=device)
        rgb, alpha = render_textured(rasterizer, clip_from_world=m, resolution=resolution, background=bg, **tensors)
        rgbs.append(rgb.clamp(0, 1).cpu().numpy())
        alphas.append(alpha[..., 0].cpu().numpy())
    return np.concatenate(rgbs), np.concatenate(alphas)


@torch.no_grad()
def inside_out_pct(
    vertices: np.ndarray,  # [V, 3] in the cameras' frame
    faces: np.ndarray,  # [F, 3], counter-clockwise seen from outside
    cameras: Cameras,
    resolution: tuple[int, int],  # (H, W)
    rasterizer: Rasterizer,
    chunk: int = 8,
) -> float:
    """Of the pixels that show the mesh in these views, the percentage whose nearest triangle faces
    away from the camera. A closed surface that does not pass through itself is always seen from
    outside first, so these are the places where it does: its inside shows, as dark patches in a lit
    viewer (or holes, where back faces are culled). Fold-overs and creases do not see them."""
    device = rasterizer.device
    mats = _view_matrices(vertices, cameras, resolution, device)
    v = torch.from_numpy(np.asarray(vertices, dtype=np.float32)).to(device)
    f = torch.from_numpy(np.asarray(faces, dtype=np.int32)).to(device)
    seen = backward = 0
    for start in range(0, len(cameras), chunk):
        m = mats[start:start + chunk]
        rast, _ = rasterizer.rasterize(to_clip(v, m), f, resolution, grad_db=False)
        _, behind, hit = pixels_seen_from_behind(v, f, rast, camera_centers(m))
        seen += int(hit.sum())
        backward += int(behind.sum())
    return 100.0 * backward / max(seen, 1)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1]."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else -10.0 * np.log10(mse)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def compare_views(
    mesh: TexturedMesh,
    cameras: Cameras,
    images: np.ndarray,  # [N, H, W, 3] photos
    masks: np.ndarray,  # [N, H, W]
    names: List[str],
    rasterizer: Rasterizer,
    ssim: bool = False,
) -> tuple[Dict[str, float], Dict[str, Dict[str, float]]]:  # (means, per view)
    """Per-view PSNR (whole image, both composited on white, as NeRF-synthetic is scored), mask IoU
    and optionally SSIM, plus their means."""
    rendered, alpha = render_views(mesh, cameras, images.shape[1:3], rasterizer, background=1.0)
    return score_views(rendered, alpha, images, masks, names, ssim)


def score_views(
    rendered: np.ndarray,  # [N, H, W, 3] renders on white, from `render_views`
    alpha: np.ndarray,  # [N, H, W]
    images: np.ndarray,  # [N, H, W, 3] photos
    masks: np.ndarray,  # [N, H, W]
    names: List[str],
    ssim: bool = False,
) -> tuple[Dict[str, float], Dict[str, Dict[str, float]]]:  # (means, per view)
    """`compare_views` of renders already made."""
    photos = on_white(images, masks)
    per_view: Dict[str, Dict[str, float]] = {}
    for i, name in enumerate(names):  # one entry per photo, not a hot loop
        entry = {"psnr": psnr(rendered[i], photos[i]), "mask_iou": mask_iou(alpha[i], masks[i])}
        if ssim:
            entry["ssim"] = float(structural_similarity(rendered[i], photos[i], channel_axis=2, data_range=1.0))
        per_view[name] = entry
    keys = per_view[names[0]].keys() if names else []
    means = {k: float(np.mean([v[k] for v in per_view.values()])) for k in keys}
    return means, per_view


ERROR_REGIONS = ("silhouette", "edge", "interior", "background")


def error_breakdown(
    rendered: np.ndarray,  # [N, H, W, 3] renders on white, from `render_views`
    alpha: np.ndarray,  # [N, H, W] their coverage
    images: np.ndarray,  # [N, H, W, 3] photos
    masks: np.ndarray,  # [N, H, W] the photos' masks
    edge_px: int = 3,
) -> Dict[str, float]:
    """Where the squared error of `score_views` lies: each region's share of the mean squared error
    (the shares sum to 1) and of the pixels, over all views.

    - ``silhouette``: the render and the mask disagree (one covers the pixel, the other not): missing
      or extra geometry, e.g. a hole the surface did not open;
    - ``edge``: within ``edge_px`` pixels of the mask's outline, where both agree: the blend of object
      and background at the outline;
    - ``interior``: covered by both, away from the outline: texture, and geometry inside the
      silhouette (parallax at depth edges and concavities);
    - ``background``: covered by neither.

    Also ``interior_top5_share``: the share of the interior's error in its worst 5% of pixels
    (concentrated error points at geometry, spread error at texture). Thresholds at 0.5 coverage.
    """
    from scipy import ndimage  # noqa: PLC0415

    assert rendered.shape == images.shape and rendered.ndim == 4, (rendered.shape, images.shape)
    assert alpha.shape == masks.shape == rendered.shape[:3], (alpha.shape, masks.shape)
    error = ((rendered.astype(np.float64) - on_white(images, masks)) ** 2).mean(-1)  # [N, H, W]
    truth, covered = masks > 0.5, alpha > 0.5
    within_view = np.zeros((1, 3, 3), bool)  # grows in the image plane only, never across views
    within_view[0] = ndimage.generate_binary_structure(2, 1)
    outline = (ndimage.binary_dilation(truth, within_view, iterations=edge_px)
               & ~ndimage.binary_erosion(truth, within_view, iterations=edge_px, border_value=1))
    silhouette = truth ^ covered
    regions = {"silhouette": silhouette, "edge": outline & ~silhouette, "interior": truth & covered & ~outline,
               "background": ~truth & ~covered & ~outline}
    total = max(float(error.sum()), 1e-30)
    out: Dict[str, float] = {}
    for name in ERROR_REGIONS:  # four regions, not a per-pixel loop
        out[f"{name}_error_share"] = float(error[regions[name]].sum() / total)
        out[f"{name}_pixel_share"] = float(regions[name].mean())
    interior = np.sort(error[regions["interior"]])[::-1]
    out["interior_top5_share"] = float(interior[:max(1, len(interior) // 20)].sum() / max(interior.sum(), 1e-30))
    return out


def on_white(images: np.ndarray, masks: np.ndarray) -> np.ndarray:  # [N, H, W, 3], [N, H, W] -> [N, H, W, 3]
    """The photos' objects composited on white, as the renders are compared with them."""
    return images * masks[..., None] + (1.0 - masks[..., None])


@torch.no_grad()
def render_shaded_views(
    vertices: np.ndarray,  # [V, 3] in the cameras' frame
    faces: np.ndarray,  # [F, 3]
    cameras: Cameras,
    resolution: tuple[int, int],  # (H, W)
    rasterizer: Rasterizer,
    background: float = 1.0,
    chunk: int = 8,
) -> np.ndarray:  # [N, H, W, 3] float32 grey, in [0, 1]
    """The geometry alone in every camera: grey Lambert with a head light (`mesh.render_shaded`)."""
    device = rasterizer.device
    mats = _view_matrices(vertices, cameras, resolution, device)
    v = torch.from_numpy(np.asarray(vertices, dtype=np.float32)).to(device)
    f = torch.from_numpy(np.asarray(faces, dtype=np.int32)).to(device)
    out = []
    for start in range(0, len(cameras), chunk):
        m = mats[start:start + chunk]
        bg = torch.full((len(m), 1, 1, 3), background, device=device)
        rgb, _ = render_shaded(rasterizer, v, f, m, resolution, background=bg)
        out.append(rgb.clamp(0, 1).cpu().numpy())
    return np.concatenate(out)


def view_panels(
    photos: np.ndarray,  # [N, H, W, 3] float in [0, 1]
    *renders: np.ndarray,  # each [N, H, W, 3] float in [0, 1]
) -> np.ndarray:  # [N, H, (1 + len(renders)) W, 3] uint8
    """Each view's photo and renders side by side, left to right, for looking at."""
    row = np.concatenate([photos, *renders], axis=2)
    return (np.clip(row, 0.0, 1.0) * 255).round().astype(np.uint8)


def sample_surface(
    vertices: np.ndarray,  # [V, 3]
    faces: np.ndarray,  # [F, 3]
    count: int,
    seed: int = 0,
    return_faces: bool = False,
) -> Union[np.ndarray, tuple[np.ndarray, np.ndarray]]:  # points [count, 3] (, face index [count] int64)
    """Area-uniform random points on a triangle mesh (and the face each lies on, with ``return_faces``)."""
    rng = np.random.default_rng(seed)
    tri = vertices[faces]  # [F, 3, 3]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    choice = rng.choice(len(faces), size=count, p=area / area.sum())
    r1, r2 = rng.random(count), rng.random(count)
    s = np.sqrt(r1)
    w = np.stack([1 - s, s * (1 - r2), s * r2], axis=1)
    points = np.einsum("pk,pkj->pj", w, tri[choice])
    return (points, choice) if return_faces else points


def face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:  # [V, 3], [F, 3] -> [F, 3] float64
    """Unit normals of the faces by their winding (counter-clockwise = towards the viewer); zero for
    zero-area faces."""
    tri = np.asarray(vertices, dtype=np.float64)[faces]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    length = np.linalg.norm(cross, axis=1, keepdims=True)
    return np.divide(cross, length, out=np.zeros_like(cross), where=length > 0)


def geometry_scores(
    pred_vertices: np.ndarray, pred_faces: np.ndarray,  # [V, 3], [F, 3]
    gt_vertices: np.ndarray, gt_faces: np.ndarray,  # [V', 3], [F', 3]
    samples: int = 100_000, threshold_fraction: float = 0.01, seed: int = 0,
    scale: Optional[float] = None,
) -> Dict[str, float]:
    """Chamfer-L1, F-score and normal consistency of a mesh against the truth, from one sampling.

    ``samples`` area-uniform points on each mesh (with their faces' normals), each matched to the
    nearest sampled point on the other mesh. Chamfer-L1 is the mean of both directions' mean nearest
    distance; F-score the harmonic mean of precision (predicted points within ``threshold_fraction``
    of the truth's bounding-box diagonal, or of ``scale``, from the truth) and recall (the reverse);
    normal consistency (Occupancy Networks, im2mesh/eval.py) the mean of both directions' mean
    |dot| of the unit normals at matched points: 1 = the same orientation everywhere, blind to
    inverted winding. Chamfer is also given as a percentage of that diagonal.
    """
    diag = scale if scale is not None else float(np.linalg.norm(gt_vertices.max(0) - gt_vertices.min(0)))
    pred, pred_face = sample_surface(pred_vertices, pred_faces, samples, seed, return_faces=True)
    gt, gt_face = sample_surface(gt_vertices, gt_faces, samples, seed + 1, return_faces=True)
    d_pred, near_gt = cKDTree(gt).query(pred)  # accuracy
    d_gt, near_pred = cKDTree(pred).query(gt)  # completeness
    chamfer = 0.5 * (d_pred.mean() + d_gt.mean())
    tau = threshold_fraction * diag
    precision = float((d_pred < tau).mean())
    recall = float((d_gt < tau).mean())
    fscore = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    pred_normal = face_normals(pred_vertices, pred_faces)[pred_face]  # [samples, 3]
    gt_normal = face_normals(gt_vertices, gt_faces)[gt_face]
    accuracy_normals = np.abs(np.sum(pred_normal * gt_normal[near_gt], axis=1)).mean()
    completeness_normals = np.abs(np.sum(gt_normal * pred_normal[near_pred], axis=1)).mean()
    return {"chamfer_l1": float(chamfer), "chamfer_l1_pct_diag": float(100 * chamfer / diag),
            "fscore_1pct": fscore, "precision": precision, "recall": recall, "bbox_diag": diag,
            "normal_consistency": float(0.5 * (accuracy_normals + completeness_normals))}


def chamfer_fscore(
    pred_vertices: np.ndarray, pred_faces: np.ndarray,
    gt_vertices: np.ndarray, gt_faces: np.ndarray,
    samples: int = 100_000, threshold_fraction: float = 0.01, seed: int = 0,
    scale: Optional[float] = None,
) -> Dict[str, float]:
    """`geometry_scores` without normal consistency: Chamfer-L1 and F-score at ``threshold_fraction``
    of the ground truth's bounding-box diagonal, Chamfer also as a percentage of that diagonal."""
    scores = geometry_scores(pred_vertices, pred_faces, gt_vertices, gt_faces, samples, threshold_fraction, seed, scale)
    del scores["normal_consistency"]
    return scores


def normal_consistency(
    pred_vertices: np.ndarray, pred_faces: np.ndarray,  # [V, 3], [F, 3]
    gt_vertices: np.ndarray, gt_faces: np.ndarray,  # [V', 3], [F', 3]
    samples: int = 100_000, seed: int = 0,
) -> float:  # in [0, 1], 1 = identical orientation everywhere
    """Normal consistency as in Occupancy Networks (see `geometry_scores`, which gives it with Chamfer)."""
    return geometry_scores(pred_vertices, pred_faces, gt_vertices, gt_faces, samples, seed=seed)["normal_consistency"]


def weld(
    vertices: np.ndarray,  # [V, 3]
    faces: np.ndarray,  # [F, 3]
    tolerance: float = WELD_TOLERANCE,
) -> tuple[np.ndarray, np.ndarray]:  # vertices [W, 3] float64, faces [F, 3] int64 into them
    """Merge vertices that share a position (to ``tolerance`` x the bounding-box diagonal), as the
    copies a UV atlas or a GLB makes along seams: positions are quantised to that step and equal
    cells merged (two copies a hair apart can still land in neighbouring cells; exact copies never
    do). Faces are kept as they are, including those that now repeat a vertex."""
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    low = vertices.min(axis=0)
    diag = float(np.linalg.norm(vertices.max(axis=0) - low))
    step = tolerance * diag if diag > 0 else 1.0
    cells = np.round((vertices - low) / step).astype(np.int64)
    _, first, index = np.unique(cells, axis=0, return_index=True, return_inverse=True)
    return vertices[first], index.reshape(-1)[faces]


def surface_quality(
    vertices: np.ndarray,  # [V, 3]
    faces: np.ndarray,  # [F, 3]
) -> Dict[str, Union[float, int]]:
    """How clean a triangle surface is, after welding coincident vertices (`weld`).

    - ``fold_over_pct``: of all pairs of faces sharing an edge, the percentage whose unit normals
      point more than 90 degrees apart (negative dot). A smooth surface has none; the fraction of
      such pairs is what a lit viewer shows as crumpling. With inconsistent winding (a flipped face),
      the pairs around it count too.
    - ``crease_pct``: likewise more than 60 degrees apart (fold-overs included).
    - ``sliver_pct``: percentage of faces whose radius ratio, circumradius / (2 x inradius), is above
      4 (1 for an equilateral triangle; zero-area faces are slivers).
    - ``degenerate_faces``: faces of zero area, or collapsed by welding (a repeated vertex). Collapsed
      faces are left out of everything else; pairs with a zero-area face are left out of the
      fold-over and crease percentages (their normal is undefined).
    - ``boundary_edges`` (one face), ``non_manifold_edges`` (more than two faces); a closed
      manifold has neither.
    - ``euler_characteristic`` chi = V - E + F of the welded mesh (vertices no face uses left out),
      ``components`` (edge-connected), ``genus``: the sum over components of
      (2 - chi_c - b_c) / 2, b_c = its boundary loops (for a closed component, (2 - chi_c) / 2).
      Meaningful for an orientable manifold: a sphere 0, a torus 1, a disc 0 (a float: non-manifold
      or non-orientable meshes can give halves).
    Percentages and genus are floats, counts ints. Fully vectorised; a mesh with no faces gives zeros.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    assert vertices.ndim == 2 and vertices.shape[1] == 3, f"vertices must be [V, 3], got {vertices.shape}"
    if len(faces) == 0:
        return _no_surface(0)
    points, faces = weld(vertices, faces)
    collapsed = (faces[:, 0] == faces[:, 1]) | (faces[:, 1] == faces[:, 2]) | (faces[:, 2] == faces[:, 0])
    faces = faces[~collapsed]
    count = len(faces)
    if count == 0:
        return _no_surface(len(collapsed))

    # Shape of each face: normal, and the radius ratio abc (a + b + c) / (16 area^2) = R / (2 r).
    tri = points[faces]  # [F, 3, 3]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = 2 area
    double_area = np.linalg.norm(cross, axis=1)
    sides = np.linalg.norm(tri - np.roll(tri, -1, axis=1), axis=2)  # [F, 3]
    diag = float(np.linalg.norm(points.max(axis=0) - points.min(axis=0)))
    flat = double_area <= 1e-14 * diag**2  # zero area up to rounding
    ratio = np.divide(sides.prod(axis=1) * sides.sum(axis=1), 4.0 * double_area**2,
                      out=np.full(count, np.inf), where=~flat)
    normal = np.divide(cross, double_area[:, None], out=np.zeros_like(cross), where=~flat[:, None])

    # Edges: each face's three, undirected; the faces around each edge.
    half = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)  # [3F, 2]
    keys, edge_of_half, faces_per_edge = np.unique(half[:, 0] * len(points) + half[:, 1], return_inverse=True,
                                                   return_counts=True)  # one int64 per edge: sorts fast
    edges = np.stack([keys // len(points), keys % len(points)], axis=1)  # [E, 2]
    edge_of_half = edge_of_half.reshape(-1)
    first, second = _pairs_sharing_an_edge(edge_of_half, faces_per_edge)
    valid = ~(flat[first] | flat[second])
    cos = np.sum(normal[first] * normal[second], axis=1)[valid]
    pairs = max(len(cos), 1)

    # Topology: Euler characteristic and boundary loops per connected component.
    used = np.unique(faces)
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(len(points),) * 2)
    _, label = connected_components(graph, directed=False)
    components, label_used = np.unique(label[used], return_inverse=True)
    component = np.zeros(len(points), dtype=np.int64)
    component[used] = label_used.reshape(-1)
    k = len(components)
    chi = (np.bincount(component[used], minlength=k) - np.bincount(component[edges[:, 0]], minlength=k)
           + np.bincount(component[faces[:, 0]], minlength=k))
    boundary = edges[faces_per_edge == 1]
    loops = np.zeros(k, dtype=np.int64)
    if len(boundary):
        on_boundary = np.unique(boundary)
        rim = coo_matrix((np.ones(len(boundary)), (boundary[:, 0], boundary[:, 1])), shape=(len(points),) * 2)
        _, rim_label = connected_components(rim, directed=False)
        _, one_vertex = np.unique(rim_label[on_boundary], return_index=True)  # one vertex per loop
        loops = np.bincount(component[on_boundary[one_vertex]], minlength=k)
    return {
        "fold_over_pct": float(100.0 * np.count_nonzero(cos < FOLD_OVER_COS) / pairs),
        "crease_pct": float(100.0 * np.count_nonzero(cos < CREASE_COS) / pairs),
        "sliver_pct": float(100.0 * np.count_nonzero(ratio > SLIVER_RADIUS_RATIO) / max(count, 1)),
        "degenerate_faces": int(np.count_nonzero(collapsed) + np.count_nonzero(flat)),
        "boundary_edges": int(np.count_nonzero(faces_per_edge == 1)),
        "non_manifold_edges": int(np.count_nonzero(faces_per_edge > 2)),
        "euler_characteristic": int(chi.sum()),
        "components": int(k),
        "genus": float(np.sum(2 - chi - loops) / 2),
    }


def _no_surface(degenerate_faces: int) -> Dict[str, Union[float, int]]:  # `surface_quality` of a mesh without area
    return {"fold_over_pct": 0.0, "crease_pct": 0.0, "sliver_pct": 0.0, "degenerate_faces": degenerate_faces,
            "boundary_edges": 0, "non_manifold_edges": 0, "euler_characteristic": 0, "components": 0, "genus": 0.0}


def _pairs_sharing_an_edge(
    edge_of_half: np.ndarray,  # [H] edge id of each half-edge; half-edge h belongs to face h // 3
    faces_per_edge: np.ndarray,  # [E] how many half-edges each edge has
) -> tuple[np.ndarray, np.ndarray]:  # face indices [P], [P]: every unordered pair of faces around an edge
    order = np.argsort(edge_of_half, kind="stable")
    face = order // 3  # faces grouped by edge
    group_start = np.repeat(np.cumsum(faces_per_edge) - faces_per_edge, faces_per_edge)  # [H]
    rank = np.arange(len(order)) - group_start  # position inside its edge's group
    later = np.repeat(faces_per_edge, faces_per_edge) - 1 - rank  # partners after it in the group
    mine = np.repeat(np.arange(len(order)), later)
    offset = np.arange(len(mine)) - np.repeat(np.cumsum(later) - later, later)
    return face[mine], face[mine + 1 + offset]
