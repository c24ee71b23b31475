"""Triangle rasterization in Triton, the torch backend's algorithm in a few kernels.

1. Visibility (no autograd). A setup kernel prepares every (image, triangle) instance as the
   torch backend does (vertices snapped to a 1/16-pixel grid in float64, culling, pixel bounding
   box); a raster kernel then tests candidate pixels in chunks of a bounding box, one lane per
   (triangle, pixel) pair: exact int64 edge functions with the top-left fill rule, depth
   interpolated in float64, and an ``atomic_min`` of the packed (depth, triangle id) key into the
   z-buffer.
2. Barycentrics: one kernel reads the z-buffer and writes rast and rast_db with nvdiffrast's
   float32 expressions (those of the torch backend); its backward is one kernel too, the chain
   rule of the torch backend's autograd graph written out (straight-through clamps, the 1e-6 area
   epsilon), accumulating into the positions' gradient with atomics.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..torch_backend.rasterize import MAX_SUBPIXEL_COORD as _MAX_COORD
from ..torch_backend.rasterize import SUBPIXEL_BITS as _SUBPIXEL_BITS

# Globals read inside kernels must be constexpr.
SUBPIXEL = tl.constexpr(1 << (_SUBPIXEL_BITS - 1))  # subpixels per half pixel (NDC units of 1 / (W sub))
PIXEL_SHIFT = tl.constexpr(_SUBPIXEL_BITS)  # log2 of subpixels per pixel
MAX_SUBPIXEL_COORD = tl.constexpr(_MAX_COORD)



def _interpreted() -> bool:
    """Whether triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 when triton
    decorated them, i.e. when this module was imported)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


INTERPRETED = _interpreted()
# Launch configuration (read at every launch; bench/render_speed.py tries others). The interpreter
# pays per operation and per program, not per lane, so it gets few, wide programs; results do not
# depend on these sizes.
LAUNCH = {
    "setup": 4096 if INTERPRETED else 256,  # triangle instances per program of the setup kernel
    "items": 256 if INTERPRETED else 16,  # work items (an instance, a chunk of its box) per raster program
    "lanes": 64 if INTERPRETED else 16,  # pixels per work item
    "raster_warps": 4,
    "pixels": 4096 if INTERPRETED else 128,  # pixels per program of every per-pixel kernel
    "warps": 4,  # warps per program of the per-pixel kernels
}
_EMPTY_KEY = torch.iinfo(torch.int64).max
# Kernels index pixels and vertex components with int32.
INDEX_LIMIT = 2**31 - 1


@triton.jit
def decode_id(channel):
    """rast's fourth channel (float32) -> triangle_id + 1 (int32, 0 = empty), as nvdiffrast encodes it."""
    large = channel.to(tl.int32, bitcast=True) - 0x4A800000
    return tl.where(channel <= 16777216.0, channel.to(tl.int32), large)


@triton.jit
def signbit(x):
    return x.to(tl.int32, bitcast=True) < 0


@triton.jit
def _round_half_even(v):  # torch.round
    r = tl.floor(v)
    d = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)


@triton.jit
def _snap(x, w, scale):
    """Clip coordinate -> float64 subpixels from the viewport centre, and whether it is usable."""
    s = _round_half_even(x.to(tl.float64) / w * scale)
    return s, tl.abs(s) <= MAX_SUBPIXEL_COORD  # False for inf and NaN too


@triton.jit
def _setup(pos_ptr, tri_ptr, image_of_ptr, tri_of_ptr, t, live, num_tris, num_verts, height, width,
           x_scale, y_scale, RANGED: tl.constexpr):
    """Per triangle instance: image, triangle, snapped vertices, z/w, doubled area, bounding box.
    ``x_scale``, ``y_scale``: W sub and H sub, the NDC -> subpixel scales.

    ``count`` is the number of pixel centres in the bounding box, 0 for a culled instance.
    """
    if RANGED:
        image = tl.load(image_of_ptr + t, mask=live, other=0)
        face = tl.load(tri_of_ptr + t, mask=live, other=0)
        vbase = tl.zeros_like(face)
    else:
        image = t // num_tris
        face = t - image * num_tris
        vbase = image * num_verts
    i0 = (vbase + tl.load(tri_ptr + face * 3 + 0, mask=live, other=0)) * 4
    i1 = (vbase + tl.load(tri_ptr + face * 3 + 1, mask=live, other=0)) * 4
    i2 = (vbase + tl.load(tri_ptr + face * 3 + 2, mask=live, other=0)) * 4
    w0 = tl.load(pos_ptr + i0 + 3, mask=live, other=1.0).to(tl.float64)
    w1 = tl.load(pos_ptr + i1 + 3, mask=live, other=1.0).to(tl.float64)
    w2 = tl.load(pos_ptr + i2 + 3, mask=live, other=1.0).to(tl.float64)
    zw0 = tl.load(pos_ptr + i0 + 2, mask=live, other=0.0).to(tl.float64) / w0
    zw1 = tl.load(pos_ptr + i1 + 2, mask=live, other=0.0).to(tl.float64) / w1
    zw2 = tl.load(pos_ptr + i2 + 2, mask=live, other=0.0).to(tl.float64) / w2
    sub = SUBPIXEL
    sx0, ok0 = _snap(tl.load(pos_ptr + i0 + 0, mask=live, other=0.0), w0, x_scale)
    sx1, ok1 = _snap(tl.load(pos_ptr + i1 + 0, mask=live, other=0.0), w1, x_scale)
    sx2, ok2 = _snap(tl.load(pos_ptr + i2 + 0, mask=live, other=0.0), w2, x_scale)
    sy0, ok3 = _snap(tl.load(pos_ptr + i0 + 1, mask=live, other=0.0), w0, y_scale)
    sy1, ok4 = _snap(tl.load(pos_ptr + i1 + 1, mask=live, other=0.0), w1, y_scale)
    sy2, ok5 = _snap(tl.load(pos_ptr + i2 + 1, mask=live, other=0.0), w2, y_scale)
    keep = live & (w0 > 0) & (w1 > 0) & (w2 > 0) & ok0 & ok1 & ok2 & ok3 & ok4 & ok5
    keep &= ~(((zw0 > 1) & (zw1 > 1) & (zw2 > 1)) | ((zw0 < -1) & (zw1 < -1) & (zw2 < -1)))
    x0 = tl.where(keep, sx0, 0.0).to(tl.int64)
    x1 = tl.where(keep, sx1, 0.0).to(tl.int64)
    x2 = tl.where(keep, sx2, 0.0).to(tl.int64)
    y0 = tl.where(keep, sy0, 0.0).to(tl.int64)
    y1 = tl.where(keep, sy1, 0.0).to(tl.int64)
    y2 = tl.where(keep, sy2, 0.0).to(tl.int64)
    area = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)
    keep &= area != 0
    # Pixel centre of column j is at (2 j + 1 - W) * sub subpixels. Floor division by 2 sub = 16 is
    # an arithmetic shift (Triton's // truncates towards zero on the GPU but floors in the interpreter).
    shift = PIXEL_SHIFT
    x_lo = tl.minimum(tl.minimum(x0, x1), x2) + sub * (width - 1)
    x_hi = tl.maximum(tl.maximum(x0, x1), x2) + sub * (width - 1)
    y_lo = tl.minimum(tl.minimum(y0, y1), y2) + sub * (height - 1)
    y_hi = tl.maximum(tl.maximum(y0, y1), y2) + sub * (height - 1)
    col_lo = tl.minimum(tl.maximum(-((-x_lo) >> shift), 0), width - 1)  # ceil division
    col_hi = tl.minimum(tl.maximum(x_hi >> shift, -1), width - 1)
    row_lo = tl.minimum(tl.maximum(-((-y_lo) >> shift), 0), height - 1)
    row_hi = tl.minimum(tl.maximum(y_hi >> shift, -1), height - 1)
    ncols = tl.maximum(col_hi - col_lo + 1, 0).to(tl.int32)
    nrows = tl.maximum(row_hi - row_lo + 1, 0).to(tl.int32)
    count = tl.where(keep, ncols * nrows, 0)
    return (image, face, x0, x1, x2, y0, y1, y2, zw0, zw1, zw2, area,
            col_lo.to(tl.int32), row_lo.to(tl.int32), tl.maximum(ncols, 1), count)


@triton.jit
def _edge(xa, ya, xb, yb, sign, px, py):
    """Edge function of a -> b (oriented counter-clockwise by ``sign``) at (px, py), and whether a
    pixel centre there is inside (exactly on the edge: the top-left rule of the torch backend)."""
    dx = (xb - xa) * sign
    dy = (yb - ya) * sign
    e = dx * (py - ya) - dy * (px - xa)
    owns = (dy < 0) | ((dy == 0) & (dx < 0))
    return e, (e > 0) | ((e == 0) & owns)


@triton.jit(do_not_specialize=["num_instances", "num_tris", "num_verts", "height", "width"])
def _setup_kernel(pos_ptr, tri_ptr, image_of_ptr, tri_of_ptr, box_ptr, zw_ptr, num_instances, num_tris, num_verts,
                  height, width, x_scale, y_scale, RANGED: tl.constexpr, BLOCK: tl.constexpr):
    """One lane per instance: its snapped vertices, bounding box and pixel count into ``box``
    ([10, T] int32: x0 x1 x2 y0 y1 y2 col_lo row_lo ncols count), its z/w into ``zw`` ([3, T] float64)."""
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = t < num_instances
    (image, face, x0, x1, x2, y0, y1, y2, zw0, zw1, zw2, area, col_lo, row_lo, ncols,
     count) = _setup(pos_ptr, tri_ptr, image_of_ptr, tri_of_ptr, t, live, num_tris, num_verts, height, width,
                     x_scale, y_scale, RANGED)
    # Snapped coordinates are within +-2^29 (culled otherwise): they fit in int32.
    tl.store(box_ptr + t, x0.to(tl.int32), mask=live)
    tl.store(box_ptr + num_instances + t, x1.to(tl.int32), mask=live)
    tl.store(box_ptr + 2 * num_instances + t, x2.to(tl.int32), mask=live)
    tl.store(box_ptr + 3 * num_instances + t, y0.to(tl.int32), mask=live)
    tl.store(box_ptr + 4 * num_instances + t, y1.to(tl.int32), mask=live)
    tl.store(box_ptr + 5 * num_instances + t, y2.to(tl.int32), mask=live)
    tl.store(box_ptr + 6 * num_instances + t, col_lo, mask=live)
    tl.store(box_ptr + 7 * num_instances + t, row_lo, mask=live)
    tl.store(box_ptr + 8 * num_instances + t, ncols, mask=live)
    tl.store(box_ptr + 9 * num_instances + t, count, mask=live)
    tl.store(zw_ptr + t, zw0, mask=live)
    tl.store(zw_ptr + num_instances + t, zw1, mask=live)
    tl.store(zw_ptr + 2 * num_instances + t, zw2, mask=live)


@triton.jit(do_not_specialize=["num_items", "num_instances", "num_tris", "height", "width"])
def _raster_kernel(box_ptr, zw_ptr, image_of_ptr, tri_of_ptr, item_ptr, chunk_ptr, winner_ptr, num_items,
                   num_instances, num_tris, height, width, RANGED: tl.constexpr, FIRST: tl.constexpr,
                   ITEMS: tl.constexpr, LANES: tl.constexpr):
    """Depth-test LANES candidate pixels (row-major in the bounding box) of each of ITEMS work
    items: with FIRST, item i is the first LANES pixels of instance i; otherwise the pixels from
    ``chunk_ptr[i] * LANES`` on of instance ``item_ptr[i]``."""
    i = tl.program_id(0) * ITEMS + tl.arange(0, ITEMS)
    live = i < num_items
    if FIRST:
        t = i
        start = tl.zeros_like(i)
    else:
        t = tl.load(item_ptr + i, mask=live, other=0)
        start = tl.load(chunk_ptr + i, mask=live, other=0) * LANES
    if RANGED:
        image = tl.load(image_of_ptr + t, mask=live, other=0)
        face = tl.load(tri_of_ptr + t, mask=live, other=0)
    else:
        image = t // num_tris
        face = t - image * num_tris
    x0 = tl.load(box_ptr + t, mask=live, other=0).to(tl.int64)[:, None]
    x1 = tl.load(box_ptr + num_instances + t, mask=live, other=0).to(tl.int64)[:, None]
    x2 = tl.load(box_ptr + 2 * num_instances + t, mask=live, other=0).to(tl.int64)[:, None]
    y0 = tl.load(box_ptr + 3 * num_instances + t, mask=live, other=0).to(tl.int64)[:, None]
    y1 = tl.load(box_ptr + 4 * num_instances + t, mask=live, other=0).to(tl.int64)[:, None]
    y2 = tl.load(box_ptr + 5 * num_instances + t, mask=live, other=0).to(tl.int64)[:, None]
    col_lo = tl.load(box_ptr + 6 * num_instances + t, mask=live, other=0)[:, None]
    row_lo = tl.load(box_ptr + 7 * num_instances + t, mask=live, other=0)[:, None]
    ncols = tl.load(box_ptr + 8 * num_instances + t, mask=live, other=1)[:, None]
    count = tl.load(box_ptr + 9 * num_instances + t, mask=live, other=0)[:, None]
    zw0 = tl.load(zw_ptr + t, mask=live, other=0.0)[:, None]
    zw1 = tl.load(zw_ptr + num_instances + t, mask=live, other=0.0)[:, None]
    zw2 = tl.load(zw_ptr + 2 * num_instances + t, mask=live, other=0.0)[:, None]
    area = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)
    sign = tl.where(area > 0, 1, -1).to(tl.int64)

    local = start[:, None] + tl.arange(0, LANES)[None, :]
    row = local // ncols
    col = col_lo + (local - row * ncols)
    row = row_lo + row
    sub = SUBPIXEL
    px = ((2 * col + 1 - width) * sub).to(tl.int64)
    py = ((2 * row + 1 - height) * sub).to(tl.int64)
    e0, in0 = _edge(x1, y1, x2, y2, sign, px, py)
    e1, in1 = _edge(x2, y2, x0, y0, sign, px, py)
    e2, in2 = _edge(x0, y0, x1, y1, sign, px, py)
    depth = (e0.to(tl.float64) * zw0 + e1.to(tl.float64) * zw1 + e2.to(tl.float64) * zw2) / (area * sign).to(tl.float64)
    inside = (local < count) & in0 & in1 & in2 & (depth >= -1.0) & (depth <= 1.0)
    bits = depth.to(tl.float32).to(tl.int32, bitcast=True).to(tl.int64)
    sortable = tl.where(bits >= 0, bits, -(bits + 2147483648) - 1)
    key = (sortable << 32) | face.to(tl.int64)[:, None]
    pixel = image[:, None] * (height * width) + row * width + col
    tl.atomic_min(winner_ptr + pixel, key, mask=inside, sem="relaxed")


@triton.jit
def _load_triangle(rast_face, covered, pixel, pos_ptr, tri_ptr, num_verts, hw, RANGED: tl.constexpr):
    """Vertex offsets (into pos, in floats) of each pixel's triangle."""
    if RANGED:
        vbase = tl.zeros_like(pixel)
    else:
        vbase = (pixel // hw) * num_verts
    i0 = (vbase + tl.load(tri_ptr + rast_face * 3 + 0, mask=covered, other=0)) * 4
    i1 = (vbase + tl.load(tri_ptr + rast_face * 3 + 1, mask=covered, other=0)) * 4
    i2 = (vbase + tl.load(tri_ptr + rast_face * 3 + 2, mask=covered, other=0)) * 4
    return i0, i1, i2


@triton.jit
def _pixel_centre(pixel, height, width, xs, ys, x_offset, y_offset):
    """NDC of each pixel's centre, computed as the torch backend does (float32)."""
    rem = pixel % (height * width)
    row = rem // width
    col = rem - row * width
    return col.to(tl.float32) * xs + x_offset, row.to(tl.float32) * ys + y_offset


@triton.jit(do_not_specialize=["num_pixels", "num_verts", "height", "width"])
def _barycentrics_kernel(winner_ptr, pos_ptr, tri_ptr, rast_ptr, db_ptr, num_pixels, num_verts, height, width,
                         xs, ys, x_offset, y_offset, RANGED: tl.constexpr, BLOCK: tl.constexpr):
    pixel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = pixel < num_pixels
    key = tl.load(winner_ptr + pixel, mask=inb, other=9223372036854775807)
    covered = inb & (key != 9223372036854775807)
    face = (key & 0xFFFFFFFF).to(tl.int32)
    i0, i1, i2 = _load_triangle(face, covered, pixel, pos_ptr, tri_ptr, num_verts, height * width, RANGED)
    fx, fy = _pixel_centre(pixel, height, width, xs, ys, x_offset, y_offset)
    x0 = tl.load(pos_ptr + i0 + 0, mask=covered, other=0.0)
    y0 = tl.load(pos_ptr + i0 + 1, mask=covered, other=0.0)
    z0 = tl.load(pos_ptr + i0 + 2, mask=covered, other=0.0)
    w0 = tl.load(pos_ptr + i0 + 3, mask=covered, other=1.0)
    x1 = tl.load(pos_ptr + i1 + 0, mask=covered, other=0.0)
    y1 = tl.load(pos_ptr + i1 + 1, mask=covered, other=0.0)
    z1 = tl.load(pos_ptr + i1 + 2, mask=covered, other=0.0)
    w1 = tl.load(pos_ptr + i1 + 3, mask=covered, other=1.0)
    x2 = tl.load(pos_ptr + i2 + 0, mask=covered, other=0.0)
    y2 = tl.load(pos_ptr + i2 + 1, mask=covered, other=0.0)
    z2 = tl.load(pos_ptr + i2 + 2, mask=covered, other=0.0)
    w2 = tl.load(pos_ptr + i2 + 3, mask=covered, other=1.0)
    px0 = x0 - fx * w0
    py0 = y0 - fy * w0
    px1 = x1 - fx * w1
    py1 = y1 - fy * w1
    px2 = x2 - fx * w2
    py2 = y2 - fy * w2
    a0 = px1 * py2 - py1 * px2
    a1 = px2 * py0 - py2 * px0
    a2 = px0 * py1 - py0 * px1
    iw = 1.0 / tl.where(covered, a0 + a1 + a2, 1.0)
    zw = (z0 * a0 + z1 * a1 + z2 * a2) / tl.where(covered, w0 * a0 + w1 * a1 + w2 * a2, 1.0)
    zw = tl.minimum(tl.maximum(zw, -1.0), 1.0)
    b0 = tl.minimum(tl.maximum(a0 * iw, 0.0), 1.0)
    b1 = tl.minimum(tl.maximum(a1 * iw, 0.0), 1.0)
    scale = 1.0 / tl.maximum(b0 + b1, 1.0)
    b0 = b0 * scale
    b1 = b1 * scale
    da0dx = y2 * w1 - y1 * w2
    da0dy = x1 * w2 - x2 * w1
    da1dx = y0 * w2 - y2 * w0
    da1dy = x2 * w0 - x0 * w2
    da2dx = y1 * w0 - y0 * w1
    da2dy = x0 * w1 - x1 * w0
    dadx = da0dx + da1dx + da2dx
    dady = da0dy + da1dy + da2dy
    dfxdx = xs * iw
    dfydy = ys * iw
    large_id = (face + 1 + 0x4A800000).to(tl.float32, bitcast=True)
    id_channel = tl.where(face < 16777216, (face + 1).to(tl.float32), large_id)
    out = pixel * 4
    tl.store(rast_ptr + out + 0, tl.where(covered, b0, 0.0), mask=inb)
    tl.store(rast_ptr + out + 1, tl.where(covered, b1, 0.0), mask=inb)
    tl.store(rast_ptr + out + 2, tl.where(covered, zw, 0.0), mask=inb)
    tl.store(rast_ptr + out + 3, tl.where(covered, id_channel, 0.0), mask=inb)
    tl.store(db_ptr + out + 0, tl.where(covered, dfxdx * (b0 * dadx - da0dx), 0.0), mask=inb)
    tl.store(db_ptr + out + 1, tl.where(covered, dfydy * (b0 * dady - da0dy), 0.0), mask=inb)
    tl.store(db_ptr + out + 2, tl.where(covered, dfxdx * (b1 * dadx - da1dx), 0.0), mask=inb)
    tl.store(db_ptr + out + 3, tl.where(covered, dfydy * (b1 * dady - da1dy), 0.0), mask=inb)


@triton.jit(do_not_specialize=["num_pixels", "num_tris", "num_verts", "height", "width"])
def _barycentrics_backward_kernel(rast_ptr, grad_rast_ptr, grad_db_ptr, pos_ptr, tri_ptr, grad_pos_ptr,
                                  num_pixels, num_tris, num_verts, height, width, xs, ys, x_offset, y_offset,
                                  RANGED: tl.constexpr, GRAD_DB: tl.constexpr, BLOCK: tl.constexpr):
    """The torch backend's `_barycentrics` backward: gradients of the unclamped barycentrics with
    1 / (area + 1e-6 sign(area)), the forward's values elsewhere in the chain rule."""
    pixel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = pixel < num_pixels
    out = pixel * 4
    face = decode_id(tl.load(rast_ptr + out + 3, mask=inb, other=0.0)) - 1
    covered = inb & (face >= 0) & (face < num_tris)
    b0 = tl.load(rast_ptr + out + 0, mask=covered, other=0.0)
    b1 = tl.load(rast_ptr + out + 1, mask=covered, other=0.0)
    g_b0 = tl.load(grad_rast_ptr + out + 0, mask=covered, other=0.0)
    g_b1 = tl.load(grad_rast_ptr + out + 1, mask=covered, other=0.0)
    i0, i1, i2 = _load_triangle(face, covered, pixel, pos_ptr, tri_ptr, num_verts, height * width, RANGED)
    fx, fy = _pixel_centre(pixel, height, width, xs, ys, x_offset, y_offset)
    x0 = tl.load(pos_ptr + i0 + 0, mask=covered, other=0.0)
    y0 = tl.load(pos_ptr + i0 + 1, mask=covered, other=0.0)
    w0 = tl.load(pos_ptr + i0 + 3, mask=covered, other=1.0)
    x1 = tl.load(pos_ptr + i1 + 0, mask=covered, other=0.0)
    y1 = tl.load(pos_ptr + i1 + 1, mask=covered, other=0.0)
    w1 = tl.load(pos_ptr + i1 + 3, mask=covered, other=1.0)
    x2 = tl.load(pos_ptr + i2 + 0, mask=covered, other=0.0)
    y2 = tl.load(pos_ptr + i2 + 1, mask=covered, other=0.0)
    w2 = tl.load(pos_ptr + i2 + 3, mask=covered, other=1.0)
    px0 = x0 - fx * w0
    py0 = y0 - fy * w0
    px1 = x1 - fx * w1
    py1 = y1 - fy * w1
    px2 = x2 - fx * w2
    py2 = y2 - fy * w2
    a0 = px1 * py2 - py1 * px2
    a1 = px2 * py0 - py2 * px0
    a2 = px0 * py1 - py0 * px1
    a_sum = a0 + a1 + a2
    ig = 1.0 / tl.where(covered, a_sum + tl.where(a_sum >= 0, 1e-6, -1e-6), 1.0)
    # Gradients of b0 = a0 ig, b1 = a1 ig and iw = ig (all straight-through values).
    gb0 = g_b0
    gb1 = g_b1
    giw = tl.zeros_like(g_b0)
    gx0 = tl.zeros_like(g_b0)
    gy0 = tl.zeros_like(g_b0)
    gw0 = tl.zeros_like(g_b0)
    gx1 = tl.zeros_like(g_b0)
    gy1 = tl.zeros_like(g_b0)
    gw1 = tl.zeros_like(g_b0)
    gx2 = tl.zeros_like(g_b0)
    gy2 = tl.zeros_like(g_b0)
    gw2 = tl.zeros_like(g_b0)
    if GRAD_DB:
        g_d0 = tl.load(grad_db_ptr + out + 0, mask=covered, other=0.0)
        g_d1 = tl.load(grad_db_ptr + out + 1, mask=covered, other=0.0)
        g_d2 = tl.load(grad_db_ptr + out + 2, mask=covered, other=0.0)
        g_d3 = tl.load(grad_db_ptr + out + 3, mask=covered, other=0.0)
        iw = 1.0 / tl.where(covered, a_sum, 1.0)
        da0dx = y2 * w1 - y1 * w2
        da0dy = x1 * w2 - x2 * w1
        da1dx = y0 * w2 - y2 * w0
        da1dy = x2 * w0 - x0 * w2
        da2dx = y1 * w0 - y0 * w1
        da2dy = x0 * w1 - x1 * w0
        dadx = da0dx + da1dx + da2dx
        dady = da0dy + da1dy + da2dy
        # db = (xs iw (b0 dadx - da0dx), ys iw (b0 dady - da0dy), xs iw (b1 dadx - da1dx), ys iw (b1 dady - da1dy))
        giw = xs * (g_d0 * (b0 * dadx - da0dx) + g_d2 * (b1 * dadx - da1dx)) + ys * (
            g_d1 * (b0 * dady - da0dy) + g_d3 * (b1 * dady - da1dy))
        hx0 = g_d0 * (xs * iw)
        hy0 = g_d1 * (ys * iw)
        hx1 = g_d2 * (xs * iw)
        hy1 = g_d3 * (ys * iw)
        gb0 += hx0 * dadx + hy0 * dady
        gb1 += hx1 * dadx + hy1 * dady
        g_dadx = hx0 * b0 + hx1 * b1
        g_dady = hy0 * b0 + hy1 * b1
        g0x = g_dadx - hx0  # gradients of da0dx, da1dx, da2dx, then the dy ones
        g1x = g_dadx - hx1
        g2x = g_dadx
        g0y = g_dady - hy0
        g1y = g_dady - hy1
        g2y = g_dady
        # da0dx = y2 w1 - y1 w2, da0dy = x1 w2 - x2 w1, da1dx = y0 w2 - y2 w0, da1dy = x2 w0 - x0 w2,
        # da2dx = y1 w0 - y0 w1, da2dy = x0 w1 - x1 w0
        gy2 += g0x * w1 - g1x * w0
        gy1 += g2x * w0 - g0x * w2
        gy0 += g1x * w2 - g2x * w1
        gx1 += g0y * w2 - g2y * w0
        gx2 += g1y * w0 - g0y * w1
        gx0 += g2y * w1 - g1y * w2
        gw0 += g2x * y1 - g1x * y2 + g1y * x2 - g2y * x1
        gw1 += g0x * y2 - g2x * y0 + g2y * x0 - g0y * x2
        gw2 += g1x * y0 - g0x * y1 + g0y * x1 - g1y * x0
    g_ig = gb0 * a0 + gb1 * a1 + giw
    g_sum = -g_ig * ig * ig
    ga0 = gb0 * ig + g_sum
    ga1 = gb1 * ig + g_sum
    ga2 = g_sum
    # a0 = px1 py2 - py1 px2, a1 = px2 py0 - py2 px0, a2 = px0 py1 - py0 px1
    gpx0 = ga2 * py1 - ga1 * py2
    gpy0 = ga1 * px2 - ga2 * px1
    gpx1 = ga0 * py2 - ga2 * py0
    gpy1 = ga2 * px0 - ga0 * px2
    gpx2 = ga1 * py0 - ga0 * py1
    gpy2 = ga0 * px1 - ga1 * px0
    gx0 += gpx0
    gy0 += gpy0
    gw0 -= fx * gpx0 + fy * gpy0
    gx1 += gpx1
    gy1 += gpy1
    gw1 -= fx * gpx1 + fy * gpy1
    gx2 += gpx2
    gy2 += gpy2
    gw2 -= fx * gpx2 + fy * gpy2
    tl.atomic_add(grad_pos_ptr + i0 + 0, gx0, mask=covered, sem="relaxed")
    tl.atomic_add(grad_pos_ptr + i0 + 1, gy0, mask=covered, sem="relaxed")
    tl.atomic_add(grad_pos_ptr + i0 + 3, gw0, mask=covered, sem="relaxed")
    tl.atomic_add(grad_pos_ptr + i1 + 0, gx1, mask=covered, sem="relaxed")
    tl.atomic_add(grad_pos_ptr + i1 + 1, gy1, mask=covered, sem="relaxed")
    tl.atomic_add(grad_pos_ptr + i1 + 3, gw1, mask=covered, sem="relaxed")
    tl.atomic_add(grad_pos_ptr + i2 + 0, gx2, mask=covered, sem="relaxed")
    tl.atomic_add(grad_pos_ptr + i2 + 1, gy2, mask=covered, sem="relaxed")
    tl.atomic_add(grad_pos_ptr + i2 + 3, gw2, mask=covered, sem="relaxed")


def _pixel_constants(height: int, width: int) -> Tuple[float, float, float, float]:
    xs, ys = 2.0 / width, 2.0 / height
    return xs, ys, xs * 0.5 - 1.0, ys * 0.5 - 1.0


def _instances(ranges: Optional[Tensor], num_tris: int, device) -> Tuple[int, Optional[Tensor], Optional[Tensor]]:
    """Range mode: the (image, triangle) of every instance to draw, int32, as the torch backend lists them."""
    batch = ranges.shape[0]
    starts = ranges[:, 0].long().clamp(0, num_tris)
    counts = torch.minimum(ranges[:, 1].long().clamp(min=0), num_tris - starts)
    image_of = torch.arange(batch).repeat_interleave(counts)
    first = (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    tri_of = torch.arange(int(counts.sum())) - first + starts.repeat_interleave(counts)
    return batch, image_of.to(device, torch.int32), tri_of.to(device, torch.int32)


def visibility(
    pos: Tensor,  # [B, V, 4] or [V, 4] (ranged), float32, contiguous
    tri: Tensor,  # [F, 3] int32, contiguous
    batch: int,
    height: int,
    width: int,
    image_of: Optional[Tensor] = None,  # [T] int32 (range mode)
    tri_of: Optional[Tensor] = None,  # [T] int32 (range mode)
) -> Tensor:  # [B * H * W] int64 packed (depth, triangle id) of the nearest fragment, or int64 max
    """The z-buffer of the torch backend's `_visibility`.

    A setup kernel (one lane per instance) stores each instance's snapped vertices and bounding
    box; a raster kernel tests the first LANES pixels of every instance's box, then the remaining
    chunks of LANES pixels of the larger boxes, listed as work items (one host sync sizes the
    list), so that no program waits on another's large triangle.
    """
    ranged = image_of is not None
    num_tris = tri.shape[0]
    instances = image_of.numel() if ranged else batch * num_tris
    winner = torch.full((batch * height * width,), _EMPTY_KEY, dtype=torch.int64, device=pos.device)
    if instances == 0:
        return winner
    box = torch.empty(10, instances, dtype=torch.int32, device=pos.device)
    zw = torch.empty(3, instances, dtype=torch.float64, device=pos.device)
    image_arg = image_of if ranged else tri  # unused placeholders in instanced mode
    tri_arg = tri_of if ranged else tri
    sub = 1 << (_SUBPIXEL_BITS - 1)
    block = LAUNCH["setup"]
    _setup_kernel[(triton.cdiv(instances, block),)](
        pos, tri, image_arg, tri_arg, box, zw, instances, num_tris, pos.shape[-2], height, width,
        float(width * sub), float(height * sub), RANGED=ranged, BLOCK=block, num_warps=LAUNCH["warps"])
    items, lanes = LAUNCH["items"], LAUNCH["lanes"]
    common = dict(RANGED=ranged, ITEMS=items, LANES=lanes, num_warps=LAUNCH["raster_warps"])
    _raster_kernel[(triton.cdiv(instances, items),)](box, zw, image_arg, tri_arg, box, box, winner, instances,
                                                     instances, num_tris, height, width, FIRST=True, **common)
    extra = torch.clamp_min((box[9] - 1) // lanes, 0)  # chunks of each box after the first
    ends = torch.cumsum(extra, 0)
    total = int(ends[-1])
    if total:
        slot = torch.arange(total, device=pos.device)
        item = torch.searchsorted(ends, slot, right=True)  # the instance whose chunks hold each slot
        chunk = (slot - (ends - extra)[item] + 1).to(torch.int32)
        item = item.to(torch.int32)
        _raster_kernel[(triton.cdiv(total, items),)](box, zw, image_arg, tri_arg, item, chunk, winner, total,
                                                     instances, num_tris, height, width, FIRST=False, **common)
    return winner


class _Rasterize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pos, tri, batch, height, width, image_of, tri_of, grad_db):
        ranged = image_of is not None
        winner = visibility(pos, tri, batch, height, width, image_of, tri_of)
        num_pixels = batch * height * width
        rast = torch.empty(batch, height, width, 4, dtype=torch.float32, device=pos.device)
        rast_db = torch.empty_like(rast)
        constants = _pixel_constants(height, width)
        grid = (triton.cdiv(num_pixels, LAUNCH["pixels"]),)
        _barycentrics_kernel[grid](winner, pos, tri, rast, rast_db, num_pixels, pos.shape[-2], height, width,
                                   *constants, RANGED=ranged, BLOCK=LAUNCH["pixels"], num_warps=LAUNCH["warps"])
        ctx.save_for_backward(pos, tri, rast)
        ctx.ranged, ctx.grad_db = ranged, grad_db
        if not grad_db:
            ctx.mark_non_differentiable(rast_db)
        return rast, rast_db

    @staticmethod
    def backward(ctx, grad_rast, grad_db):
        pos, tri, rast = ctx.saved_tensors
        batch, height, width, _ = rast.shape
        num_pixels = batch * height * width
        grad_pos = torch.zeros_like(pos)
        grid = (triton.cdiv(num_pixels, LAUNCH["pixels"]),)
        _barycentrics_backward_kernel[grid](
            rast, grad_rast.contiguous(), grad_db.contiguous() if ctx.grad_db else grad_rast, pos, tri, grad_pos,
            num_pixels, tri.shape[0], pos.shape[-2], height, width, *_pixel_constants(height, width),
            RANGED=ctx.ranged, GRAD_DB=ctx.grad_db, BLOCK=LAUNCH["pixels"], num_warps=LAUNCH["warps"])
        return grad_pos, None, None, None, None, None, None, None


def rasterize(
    pos: Tensor,  # [B, V, 4] or [V, 4] (with ranges) clip-space positions, float32
    tri: Tensor,  # [F, 3] int32
    resolution: Tuple[int, int],  # (H, W)
    ranges: Optional[Tensor] = None,  # [B, 2] int32 (start, count), CPU
    grad_db: bool = True,
) -> Tuple[Tensor, Tensor]:  # rast [B, H, W, 4], rast_db [B, H, W, 4]
    """See `pipeline.render.Rasterizer.rasterize` for the contract; the torch backend's results."""
    height, width = resolution
    pos, tri = pos.contiguous(), tri.contiguous()
    if ranges is None:
        batch, image_of, tri_of = pos.shape[0], None, None
    else:
        batch, image_of, tri_of = _instances(ranges, tri.shape[0], pos.device)
    if batch * height * width * 4 > INDEX_LIMIT or pos.numel() > INDEX_LIMIT:
        raise ValueError(f"{batch} images of {height}x{width} px are too many for one triton rasterize call: "
                         "render fewer views at a time")
    return _Rasterize.apply(pos, tri, batch, height, width, image_of, tri_of, grad_db)
