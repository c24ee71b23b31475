"""Visual hull: carve a voxel grid against the masks, mesh it, and compare its silhouettes.

The hull lives in the normalised frame of `pipeline.normalize` (object inside [-0.9, 0.9]^3):
`carve_visual_hull` samples a field on the R^3 voxel centres of the cube [-1, 1]^3,
``field[i, j, k]`` at (x, y, z) = -1 + (i + 0.5, j + 0.5, k + 0.5) * 2 / R, and `hull_mesh`
turns it into a closed triangle mesh in the same frame.

Carving rule. Each voxel centre is projected into every view and the mask is sampled there
bilinearly (antialiased mask edges then place the 0.5 crossing between voxel centres, which
marching cubes turns into sub-voxel surface positions). A view that does not see the voxel (it
projects outside the image, or lies behind the camera) knows nothing about it and does not
carve: it contributes 1. The field is the (k+1)-th smallest of these values over the views, so a
voxel survives (field > 0.5) when at most k views put it outside their mask: k =
``bad_view_tolerance`` absorbs a few bad masks. A voxel that fewer than ``min_seen_fraction`` of
the views see is set to 0, since so few views cannot bound it (without this, space outside most
frusta would survive as unknown).

With ``mask_dilation_px`` > 0 every mask is first grown by that many pixels (a (2 d + 1)^2 max
filter): the hull is then conservative for parts thinner than a voxel, which carving at voxel
centres otherwise loses (lego's rods and linkage: 0.45% of its held-out pixels at grid 128, and the
refinement's first, coarse remesh doubles that), and the refinement must carve the extra pixel off
instead of regrowing lost parts, which it does only in part. On the GPU defaults 1 px leaves lego's
held-out PSNR where it was and halves its creases; on the CPU's fast preset it cost 0.35 dB
(docs/BENCHMARKS.md, "session 9"), so the fast preset keeps 0.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from .cameras import Cameras, to_clip
from .errors import PipelineError

ArrayLike = Union[np.ndarray, Tensor]


def carve_visual_hull(
    cameras: Cameras,  # in the normalised frame
    masks: ArrayLike,  # [N, H, W] in [0, 1]
    resolution: int = 128,
    bad_view_tolerance: int = 0,
    min_seen_fraction: float = 0.5,
    device: Union[str, torch.device, None] = None,
    chunk_elements: Optional[int] = None,
    mask_dilation_px: int = 0,
) -> np.ndarray:  # [R, R, R] float32 field in [0, 1], surface at 0.5, inside > 0.5
    """Carve the cube [-1, 1]^3 at ``resolution``^3 voxels (see the module docstring for the rule)."""
    return carve_field(
        cameras, masks, np.full(3, -1.0), np.full(3, 1.0), resolution,
        bad_view_tolerance=bad_view_tolerance, min_seen_fraction=min_seen_fraction,
        device=device, chunk_elements=chunk_elements, mask_dilation_px=mask_dilation_px,
    )


def carve_field(
    cameras: Cameras,
    masks: ArrayLike,  # [N, H, W] in [0, 1]
    box_min: Sequence[float],  # [3] world corner of the box
    box_max: Sequence[float],  # [3]
    resolution: Union[int, Sequence[int]],  # voxels per axis, one int or (Rx, Ry, Rz)
    bad_view_tolerance: int = 0,
    min_seen_fraction: float = 0.5,
    device: Union[str, torch.device, None] = None,
    chunk_elements: Optional[int] = None,  # voxels x views per chunk (bounds the memory)
    mask_dilation_px: int = 0,  # grow every mask by this many pixels first (see the module docstring)
) -> np.ndarray:  # [Rx, Ry, Rz] float32, sampled at the voxel centres of the box
    """Visual-hull field over any axis-aligned box (`carve_visual_hull` is the [-1, 1]^3 case)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    mask_t = as_mask_tensor(masks, device)  # [N, H, W]
    if mask_dilation_px < 0:
        raise PipelineError(f"mask_dilation_px must be >= 0, got {mask_dilation_px}")
    if mask_dilation_px:
        size = 2 * int(mask_dilation_px) + 1
        mask_t = F.max_pool2d(mask_t[:, None], size, stride=1, padding=int(mask_dilation_px))[:, 0]
    num, height, width = mask_t.shape
    if len(cameras) != num:
        raise PipelineError(f"{num} masks but {len(cameras)} cameras")
    check_cameras_finite(cameras)
    if not 0 <= bad_view_tolerance < num:
        raise PipelineError(f"bad_view_tolerance must be in [0, {num - 1}] for {num} views, got {bad_view_tolerance}")
    res = np.broadcast_to(np.asarray(resolution, dtype=np.int64), (3,))
    box_min = np.asarray(box_min, dtype=np.float64)
    box_max = np.asarray(box_max, dtype=np.float64)
    if chunk_elements is None:
        chunk_elements = 1 << 25 if device.type == "cuda" else 1 << 21
    min_seen = max(bad_view_tolerance + 1, int(np.ceil(min_seen_fraction * num)))

    # World -> homogeneous grid_sample coordinates (2 u / W - 1, 2 v / H - 1, 1) * depth, for the
    # masks' size. grid_sample with align_corners=False puts -1 and +1 on the image's outer pixel
    # edges, which is our pixel convention. Composed in float64 around the box centre so that
    # float32 on the device only ever sees small offsets (worlds can sit far from the origin).
    centre = (box_min + box_max) / 2
    proj = intrinsics_for_size(cameras, height, width) @ cameras.world_to_camera[:, :3, :]  # [N, 3, 4]
    proj[:, :, 3] += proj[:, :, :3] @ centre
    proj[:, 0] = 2 / width * proj[:, 0] - proj[:, 2]
    proj[:, 1] = 2 / height * proj[:, 1] - proj[:, 2]
    # Projection is affine along each axis, so over the grid it separates: hom = X[i] + Y[j] + Z[k].
    axes = [box_min[a] + (np.arange(res[a]) + 0.5) * (box_max[a] - box_min[a]) / res[a] - centre[a] for a in range(3)]
    terms = [proj[:, :, a, None] * axes[a][None, None, :] for a in range(3)]  # each [N, 3, R_a]
    terms[2] = terms[2] + proj[:, :, 3, None]
    terms = [torch.tensor(t, dtype=torch.float32, device=device) for t in terms]

    # Chunks of whole z-columns: the projection stays a broadcast sum, memory ~ chunk_elements.
    columns = int(res[0] * res[1])
    per_chunk = max(1, chunk_elements // (num * int(res[2])))
    field = torch.empty(columns, int(res[2]), dtype=torch.float32, device=device)
    for start in range(0, columns, per_chunk):
        col = torch.arange(start, min(start + per_chunk, columns), device=device)  # [b]
        hom = terms[0][:, :, col // res[1], None] + terms[1][:, :, col % res[1], None] + terms[2][:, :, None, :]
        hom = hom.flatten(2)  # [N, 3, C], C = b * Rz voxels
        grid = hom[:, :2] / hom[:, 2:]  # [N, 2, C]
        grid.masked_fill_(hom[:, 2:] <= 0, 2.0)  # behind the camera: the division mirrors it into view
        seen = grid.abs().amax(1) <= 1  # [N, C] projects inside the image (NaN compares False)
        sample = F.grid_sample(
            mask_t[:, None], grid.transpose(1, 2)[:, None].nan_to_num(2.0, 2.0, 2.0),
            mode="bilinear", padding_mode="border", align_corners=False,
        )
        values = sample[:, 0, 0].masked_fill_(~seen, 1.0)  # [N, C], unseen = does not carve
        # (k+1)-th smallest = the least v with at least k+1 values <= v; stepping through distinct
        # values with amin is many times faster than topk, kthvalue or argmin over dim 0 on CPU.
        value = values.amin(0)  # [C]
        for _ in range(bad_view_tolerance):
            at_most = values <= value  # [N, C]
            step = at_most.sum(0) <= bad_view_tolerance
            value = torch.where(step, values.masked_fill(at_most, 2.0).amin(0), value)
        value.masked_fill_(seen.sum(0) < min_seen, 0.0)
        field[start : start + len(col)] = value.view(len(col), -1)
    return field.view(*res.tolist()).cpu().numpy()


def hull_mesh(
    field: np.ndarray,  # [R, R, R] from carve_visual_hull (voxel centres of [-1, 1]^3)
    level: float = 0.5,
) -> Tuple[np.ndarray, np.ndarray]:  # vertices [V, 3] float32 (normalised frame), faces [F, 3] int64
    """The largest connected part of {field > level} as a closed mesh with outward (CCW) faces.

    Hollow pockets inside that part are filled (a visual hull has none; soft mask edges can leave
    some), and the grid is padded with empty voxels so the surface closes where the object
    touches the cube's border.
    """
    import trimesh  # noqa: PLC0415 (heavy import, only needed here)
    from skimage.measure import marching_cubes  # noqa: PLC0415

    field = np.asarray(field, dtype=np.float32)
    if field.ndim != 3 or len(set(field.shape)) != 1:
        raise PipelineError(f"the hull field must be a cube [R, R, R], got {field.shape}")
    if not np.isfinite(field).all():
        raise PipelineError("the hull field contains NaN or infinite values")
    inside = field > level
    labels, count = ndimage.label(inside, structure=np.ones((3, 3, 3)))
    if count == 0:
        raise PipelineError(
            f"the visual hull is empty (no voxel above {level}): the masks do not agree on any volume; "
            "check that the masks show the object and the poses belong to these photos"
        )
    sizes = np.bincount(labels.ravel())[1:]
    main = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
    # Only voxels that change side are rewritten: the soft values around the main part's surface
    # are what place its vertices between voxel centres.
    field = field.copy()
    field[main & ~inside] = 1.0
    field[inside & ~main] = 0.0
    padded = np.pad(field, 1, mode="constant", constant_values=0.0)
    res = field.shape[0]
    voxel = 2.0 / res
    verts, faces, _, _ = marching_cubes(padded, level=level, spacing=(voxel, voxel, voxel))
    verts = verts - voxel * 0.5 - 1.0  # padded index 1 is the centre of voxel 0 at -1 + voxel / 2

    mesh = trimesh.Trimesh(verts, faces, process=True)
    parts = mesh.split(only_watertight=False)
    if len(parts) > 1:  # marching-cubes ambiguities can leave specks next to the main surface
        mesh = max(parts, key=lambda m: len(m.faces))
    if mesh.volume < 0:
        mesh.invert()
    if not (mesh.is_watertight and mesh.is_winding_consistent):
        raise PipelineError(
            "marching cubes produced an open hull surface; try another resolution or check the masks"
        )
    return mesh.vertices.astype(np.float32), mesh.faces.astype(np.int64)


def render_silhouettes(
    vertices: np.ndarray,  # [V, 3] in the cameras' world frame
    faces: np.ndarray,  # [F, 3]
    cameras: Cameras,
    resolution: Tuple[int, int],  # (H, W) of the renders
    rasterizer=None,  # a pipeline.render.Rasterizer; default: torch backend on the CPU
    batch: int = 8,  # views rasterized at once (bounds the memory)
) -> np.ndarray:  # [N, H, W] bool, True where the mesh covers the pixel centre
    """Binary silhouettes of a mesh seen by every camera, rows top first like the photos."""
    if rasterizer is None:
        from .render import Rasterizer  # noqa: PLC0415 (rendering is optional for carving)

        rasterizer = Rasterizer(backend="torch", device="cpu")
    device = rasterizer.device
    vertices = np.asarray(vertices, dtype=np.float64)
    _, depth = cameras.project(vertices)  # [N, V]
    far = 2.0 * float(depth.max())
    # Triangles crossing the near plane are culled by the torch backend, so near must be in front of all.
    near = max(0.5 * float(depth[depth > 0].min(initial=far)), 1e-4 * far)
    clip = torch.tensor(cameras.clip_matrices(resolution, near, far), dtype=torch.float32, device=device)
    verts_t = torch.tensor(vertices, dtype=torch.float32, device=device)
    tri = torch.tensor(np.asarray(faces), dtype=torch.int32, device=device)
    out = []
    with torch.no_grad():
        for start in range(0, len(cameras), batch):
            pos = to_clip(verts_t, clip[start : start + batch])
            rast, _ = rasterizer.rasterize(pos, tri, resolution, grad_db=False)
            out.append((rast[..., 3] > 0).cpu().numpy())
    return np.concatenate(out)


def mask_iou(
    rendered_masks: ArrayLike,  # [N, H, W] bool or values in [0, 1]
    masks: ArrayLike,  # [N, H, W] bool or values in [0, 1]
    threshold: float = 0.5,
) -> np.ndarray:  # [N] float64 intersection over union per view (1 where both are empty)
    """Per-view IoU of two mask stacks, each binarised at ``threshold`` (bool masks as they are)."""
    a = _binary(rendered_masks, threshold)
    b = _binary(masks, threshold)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"mask stacks must both be [N, H, W], got {a.shape} and {b.shape}")
    inter = (a & b).sum(axis=(1, 2))
    union = (a | b).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _binary(masks: ArrayLike, threshold: float) -> np.ndarray:
    if isinstance(masks, Tensor):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    return masks if masks.dtype == bool else masks > threshold


def as_mask_tensor(masks: ArrayLike, device: torch.device) -> Tensor:  # [N, H, W] float32
    mask_t = torch.as_tensor(masks).to(device=device, dtype=torch.float32)
    if mask_t.dim() != 3:
        raise PipelineError(f"masks must be [N, H, W], got {tuple(mask_t.shape)}")
    if not bool(torch.isfinite(mask_t).all()):
        raise PipelineError("the masks contain NaN or infinite values; re-create them (values must be in [0, 1])")
    return mask_t


def check_cameras_finite(cameras: Cameras) -> None:
    """PipelineError naming the views whose intrinsics or pose hold NaN or infinity."""
    for name, value in (("intrinsics", cameras.intrinsics), ("world_to_camera", cameras.world_to_camera)):
        bad = ~np.isfinite(value).reshape(len(cameras), -1).all(1)
        if bad.any():
            raise PipelineError(
                f"camera {name} of view(s) {np.flatnonzero(bad).tolist()} contain NaN or infinite values; "
                "fix or remove those poses"
            )


def intrinsics_for_size(cameras: Cameras, height: int, width: int) -> np.ndarray:  # [N, 3, 3]
    """Each camera's K rescaled from its calibrated size to the masks' (H, W)."""
    k = cameras.intrinsics.copy()
    k[:, 0, :] *= (width / cameras.sizes[:, 1])[:, None]
    k[:, 1, :] *= (height / cameras.sizes[:, 0])[:, None]
    return k
