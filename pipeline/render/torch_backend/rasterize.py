"""Triangle rasterization in pure PyTorch, matching nvdiffrast's output format.

Two passes:
1. Visibility (no autograd): vertices snapped to a 1/16-pixel fixed-point grid (as nvdiffrast's
   cudaraster), exact integer edge functions with a top-left fill rule, and a z-buffer built by
   one `scatter_reduce(amin)` of packed (depth, triangle id) keys per chunk of (triangle, pixel)
   candidate pairs. Chunks bound the memory for large meshes and images.
2. Attributes (autograd): for each covered pixel, nvdiffrast's perspective-correct barycentrics
   from the three clip-space vertices of its triangle, so gradients reach `pos` as they do there.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .gather import take_rows

SUBPIXEL_BITS = 4  # nvdiffrast: CR_SUBPIXEL_LOG2
# Snapped coordinates are kept within +-2^29 subpixels so that every edge function
# (a difference of two products of 30-bit differences) fits in int64 exactly.
MAX_SUBPIXEL_COORD = 1 << 29
# Upper bound on (triangle, pixel) candidate pairs processed at once: ~100 MB of temporaries.
PAIR_BUDGET = 1 << 20
_EMPTY_KEY = torch.iinfo(torch.int64).max
# Triangle ids + 1 above 2^24 are not exact in float32: nvdiffrast stores them as float bit
# patterns offset by this constant (`triidx_to_float`), and so do we.
_LARGE_ID_BITS = 0x4A800000
_EXACT_ID_LIMIT = 1 << 24


def encode_triangle_ids(ids: Tensor) -> Tensor:  # [...] int64 triangle_id + 1 -> [...] float32
    """rast's fourth channel, exactly as nvdiffrast encodes it."""
    large = (ids + _LARGE_ID_BITS).to(torch.int32).view(torch.float32)
    return torch.where(ids <= _EXACT_ID_LIMIT, ids.to(torch.float32), large)


def decode_triangle_ids(channel: Tensor) -> Tensor:  # [...] float32 -> [...] int64 triangle_id + 1 (0 = empty)
    """Inverse of `encode_triangle_ids`."""
    large = channel.contiguous().view(torch.int32).long() - _LARGE_ID_BITS
    return torch.where(channel <= float(_EXACT_ID_LIMIT), channel.long(), large)


def rasterize(
    pos: Tensor,  # [B, V, 4] or [V, 4] (with ranges) clip-space positions, float32
    tri: Tensor,  # [F, 3] int32
    resolution: Tuple[int, int],  # (H, W)
    ranges: Optional[Tensor] = None,  # [B, 2] int32 (start, count), CPU
    grad_db: bool = True,
) -> Tuple[Tensor, Tensor]:  # rast [B, H, W, 4], rast_db [B, H, W, 4]
    """See `pipeline.render.Rasterizer.rasterize` for the contract."""
    height, width = resolution
    device = pos.device
    tri_l = tri.long()
    num_tris = tri_l.shape[0]

    # Flat list of (image, triangle) pairs to draw.
    if ranges is None:
        batch = pos.shape[0]
        image_of = torch.arange(batch, device=device).repeat_interleave(num_tris)
        tri_of = torch.arange(num_tris, device=device).repeat(batch)
    else:
        batch = ranges.shape[0]
        starts = ranges[:, 0].long().clamp(0, num_tris)
        counts = torch.minimum(ranges[:, 1].long().clamp(min=0), num_tris - starts)
        image_of = torch.arange(batch).repeat_interleave(counts)
        first = (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
        tri_of = torch.arange(int(counts.sum())) - first + starts.repeat_interleave(counts)
        image_of, tri_of = image_of.to(device), tri_of.to(device)

    with torch.no_grad():
        winner = _visibility(pos.detach(), tri_l, image_of, tri_of, batch, height, width, ranged=ranges is not None)

    pixel_count = batch * height * width
    covered = torch.nonzero(winner != _EMPTY_KEY).squeeze(1)  # [N] flat pixel indices
    tri_id = (winner[covered] & 0xFFFFFFFF).long()  # [N]
    image = covered // (height * width)
    row = (covered // width) % height
    col = covered % width

    vidx = tri_l[tri_id]  # [N, 3]
    flat_vidx = vidx if ranges is not None else image[:, None] * pos.shape[1] + vidx
    clip = take_rows(pos.reshape(-1, 4), flat_vidx)  # [N, 3, 4]
    values, db = _barycentrics(clip, row, col, height, width, grad_db)
    values = torch.cat([values, encode_triangle_ids(tri_id + 1)[:, None]], dim=1)

    rast = torch.zeros(pixel_count, 4, dtype=pos.dtype, device=device).index_put((covered,), values)
    rast_db = torch.zeros(pixel_count, 4, dtype=pos.dtype, device=device).index_put((covered,), db)
    return rast.view(batch, height, width, 4), rast_db.view(batch, height, width, 4)


def _barycentrics(
    clip: Tensor,  # [N, 3, 4] clip-space vertices of each covered pixel's triangle
    row: Tensor,  # [N] int64
    col: Tensor,  # [N] int64
    height: int,
    width: int,
    grad_db: bool,
) -> Tuple[Tensor, Tensor]:  # (u, v, z/w) [N, 3], (du/dX, du/dY, dv/dX, dv/dY) [N, 4]
    """nvdiffrast's per-pixel barycentrics and their screen-space derivatives (differentiable)."""
    xs, ys = 2.0 / width, 2.0 / height
    fx = (col.to(clip.dtype) * xs + (xs * 0.5 - 1.0))[:, None]  # [N, 1] pixel centre, NDC
    fy = (row.to(clip.dtype) * ys + (ys * 0.5 - 1.0))[:, None]
    x, y, z, w = clip.unbind(-1)  # each [N, 3]
    px = x - fx * w
    py = y - fy * w
    # a_k: homogeneous edge function opposite vertex k (perspective-correct, unnormalised).
    a0 = px[:, 1] * py[:, 2] - py[:, 1] * px[:, 2]
    a1 = px[:, 2] * py[:, 0] - py[:, 2] * px[:, 0]
    a2 = px[:, 0] * py[:, 1] - py[:, 0] * px[:, 1]
    a_sum = a0 + a1 + a2
    # Values are nvdiffrast's forward kernel (exact 1/area, barycentrics clamped into the triangle:
    # fixed-point coverage and float barycentrics can disagree by an ulp). Gradients are those of
    # its backward kernel: unclamped barycentrics, area plus a 1e-6 epsilon of the same sign
    # (straight-through), so sliver triangles at silhouettes pass gradients exactly as there.
    iw_grad = 1.0 / (a_sum + torch.where(a_sum >= 0, 1e-6, -1e-6))
    with torch.no_grad():
        iw_value = 1.0 / a_sum
        zw = ((z[:, 0] * a0 + z[:, 1] * a1 + z[:, 2] * a2) / (w[:, 0] * a0 + w[:, 1] * a1 + w[:, 2] * a2)).clamp(-1, 1)
        b0_value = (a0 * iw_value).clamp(0.0, 1.0)
        b1_value = (a1 * iw_value).clamp(0.0, 1.0)
        scale = 1.0 / torch.clamp(b0_value + b1_value, min=1.0)
        b0_value, b1_value = b0_value * scale, b1_value * scale
    iw = _straight_through(iw_value, iw_grad)
    b0 = _straight_through(b0_value, a0 * iw_grad)
    b1 = _straight_through(b1_value, a1 * iw_grad)

    if not grad_db:
        x, y, w = x.detach(), y.detach(), w.detach()
        iw, b0d, b1d = iw.detach(), b0.detach(), b1.detach()
    else:
        b0d, b1d = b0, b1
    da0dx = y[:, 2] * w[:, 1] - y[:, 1] * w[:, 2]
    da0dy = x[:, 1] * w[:, 2] - x[:, 2] * w[:, 1]
    da1dx = y[:, 0] * w[:, 2] - y[:, 2] * w[:, 0]
    da1dy = x[:, 2] * w[:, 0] - x[:, 0] * w[:, 2]
    da2dx = y[:, 1] * w[:, 0] - y[:, 0] * w[:, 1]
    da2dy = x[:, 0] * w[:, 1] - x[:, 1] * w[:, 0]
    dadx = da0dx + da1dx + da2dx
    dady = da0dy + da1dy + da2dy
    dfxdx = xs * iw
    dfydy = ys * iw
    db = torch.stack(
        [
            dfxdx * (b0d * dadx - da0dx),
            dfydy * (b0d * dady - da0dy),
            dfxdx * (b1d * dadx - da1dx),
            dfydy * (b1d * dady - da1dy),
        ],
        dim=1,
    )
    return torch.stack([b0, b1, zw], dim=1), db


def _straight_through(value: Tensor, gradient_path: Tensor) -> Tensor:
    """``value`` forward, the derivative of ``gradient_path`` backward."""
    return gradient_path + (value - gradient_path).detach()


def _visibility(
    pos: Tensor,  # [B, V, 4] or [V, 4] (ranged)
    tri: Tensor,  # [F, 3] int64
    image_of: Tensor,  # [T] int64 image of each triangle instance
    tri_of: Tensor,  # [T] int64 triangle index of each instance
    batch: int,
    height: int,
    width: int,
    ranged: bool,
) -> Tensor:  # [B * H * W] int64 packed (depth, triangle id) of the nearest fragment, or _EMPTY_KEY
    """Z-buffer of the nearest triangle per pixel, exact fill rule, chunked over candidate pairs."""
    winner = torch.full((batch * height * width,), _EMPTY_KEY, dtype=torch.int64, device=pos.device)
    if tri_of.numel() == 0:
        return winner

    vidx = tri[tri_of]  # [T, 3]
    clip = (pos[vidx] if ranged else pos[image_of[:, None], vidx]).double()  # [T, 3, 4]
    w = clip[..., 3]
    zw = clip[..., 2] / w  # [T, 3]
    sub = float(1 << (SUBPIXEL_BITS - 1))
    # Snap to the fixed-point grid: subpixel units, origin at the viewport centre.
    sx = torch.round(clip[..., 0] / w * (width * sub))
    sy = torch.round(clip[..., 1] / w * (height * sub))
    keep = (w > 0).all(1)  # near plane: triangles with a vertex at w <= 0 are culled
    keep &= torch.isfinite(sx).all(1) & torch.isfinite(sy).all(1)
    keep &= (sx.abs() <= MAX_SUBPIXEL_COORD).all(1) & (sy.abs() <= MAX_SUBPIXEL_COORD).all(1)
    keep &= ~((zw > 1).all(1) | (zw < -1).all(1))
    sx = torch.where(keep[:, None], sx, torch.zeros_like(sx)).long()
    sy = torch.where(keep[:, None], sy, torch.zeros_like(sy)).long()
    area = (sx[:, 1] - sx[:, 0]) * (sy[:, 2] - sy[:, 0]) - (sy[:, 1] - sy[:, 0]) * (sx[:, 2] - sx[:, 0])
    keep &= area != 0

    # Pixel centre of column j is at (2 j + 1 - W) * sub subpixels: bounding box in pixels.
    step = 2 * int(sub)
    col_lo = _ceil_div(sx.min(1).values + int(sub) * (width - 1), step).clamp(0, width - 1)
    col_hi = _floor_div(sx.max(1).values + int(sub) * (width - 1), step).clamp(-1, width - 1)
    row_lo = _ceil_div(sy.min(1).values + int(sub) * (height - 1), step).clamp(0, height - 1)
    row_hi = _floor_div(sy.max(1).values + int(sub) * (height - 1), step).clamp(-1, height - 1)
    ncols = (col_hi - col_lo + 1).clamp(min=0)
    nrows = (row_hi - row_lo + 1).clamp(min=0)
    count = torch.where(keep, ncols * nrows, torch.zeros_like(ncols))

    live = torch.nonzero(count > 0).squeeze(1)
    if live.numel() == 0:
        return winner
    count = count[live]
    ends = torch.cumsum(count, 0)
    # Chunk boundaries: each chunk holds whole triangles and at most max(PAIR_BUDGET, one triangle) pairs.
    begin = 0
    while begin < live.numel():
        base = int(ends[begin - 1]) if begin > 0 else 0
        end = int(torch.searchsorted(ends, base + PAIR_BUDGET, right=True))
        end = max(end, begin + 1)
        chunk = live[begin:end]
        _rasterize_chunk(
            winner, chunk, count[begin:end], sx, sy, zw, area, col_lo, row_lo, ncols, image_of, tri_of, height, width
        )
        begin = end
    return winner


def _rasterize_chunk(
    winner: Tensor,  # [B * H * W] int64, updated in place
    chunk: Tensor,  # [t] triangle instances of this chunk
    count: Tensor,  # [t] candidate pixels of each
    sx: Tensor,  # [T, 3] int64 snapped x (subpixels)
    sy: Tensor,  # [T, 3] int64 snapped y
    zw: Tensor,  # [T, 3] float64 z/w per vertex
    area: Tensor,  # [T] int64 twice the signed area (subpixels^2)
    col_lo: Tensor,
    row_lo: Tensor,
    ncols: Tensor,
    image_of: Tensor,
    tri_of: Tensor,
    height: int,
    width: int,
) -> None:
    device = winner.device
    owner = torch.repeat_interleave(torch.arange(chunk.numel(), device=device), count)  # [P]
    first = torch.cumsum(count, 0) - count
    local = torch.arange(owner.numel(), device=device) - first[owner]
    t = chunk[owner]  # [P] triangle instance of each candidate pair
    nc = ncols[t]
    col = col_lo[t] + local % nc
    row = row_lo[t] + local // nc
    sub = 1 << (SUBPIXEL_BITS - 1)
    px = (2 * col + 1 - width) * sub
    py = (2 * row + 1 - height) * sub

    x = sx[t]  # [P, 3]
    y = sy[t]
    sign = torch.sign(area[t])  # orient every triangle counter-clockwise
    inside = torch.ones_like(px, dtype=torch.bool)
    edges = []
    for k in range(3):  # the three edges, opposite vertex k (not a loop over data)
        a, b = (k + 1) % 3, (k + 2) % 3
        dx = (x[:, b] - x[:, a]) * sign
        dy = (y[:, b] - y[:, a]) * sign
        e = dx * (py - y[:, a]) - dy * (px - x[:, a])
        # Top-left rule: a pixel centre exactly on an edge belongs to the triangle for which the
        # (oriented) edge points down, or exactly left; the neighbour sees the reversed edge.
        owns = (dy < 0) | ((dy == 0) & (dx < 0))
        inside &= (e > 0) | ((e == 0) & owns)
        edges.append(e)
    # Screen-space barycentrics interpolate z/w linearly.
    depth = (edges[0] * zw[t, 0] + edges[1] * zw[t, 1] + edges[2] * zw[t, 2]) / (area[t] * sign)
    inside &= (depth >= -1) & (depth <= 1)
    if not bool(inside.any()):
        return
    idx = torch.nonzero(inside).squeeze(1)
    t = t[idx]
    pixel = image_of[t] * (height * width) + row[idx] * width + col[idx]
    key = (_sortable_float32(depth[idx].float()) << 32) | tri_of[t]
    winner.scatter_reduce_(0, pixel, key, reduce="amin")


def _sortable_float32(value: Tensor) -> Tensor:
    """Map float32 to int64 so that integer order equals float order (for packed depth keys)."""
    bits = value.contiguous().view(torch.int32).long()
    return torch.where(bits >= 0, bits, -(bits + (1 << 31)) - 1)


def _floor_div(a: Tensor, b: int) -> Tensor:
    return torch.div(a, b, rounding_mode="floor")


def _ceil_div(a: Tensor, b: int) -> Tensor:
    return -torch.div(-a, b, rounding_mode="floor")
