"""Analytic silhouette anti-aliasing in Triton (nvdiffrast's `antialias`).

The torch backend's method (`pipeline.render.torch_backend.antialias`, which explains it) with its
decisions computed per pixel in one kernel: each program takes a block of pixels and, for each,
the pair with its right neighbour and the pair with the one below; a blended pair adds its colour
change to the target pixel with an atomic add. The backward kernel recomputes the decisions and
accumulates the gradients of the colours and, through the crossing position of each blended edge
(nvdiffrast's regularised derivative), of the clip-space positions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..torch_backend.antialias import CROSSING_TOLERANCE as _TOLERANCE
from ..torch_backend.antialias import GRAD_DY_EPS, _opposite_vertices
from .rasterize import INDEX_LIMIT, LAUNCH, decode_id, signbit

CROSSING_TOLERANCE = tl.constexpr(_TOLERANCE)  # globals read inside kernels must be constexpr


@triton.jit
def _screen(pos_ptr, vertex, mask, half_w, half_h, cx, cy):
    """Vertex position in pixels relative to the pixel centre (cx, cy), in the torch backend's float order."""
    inv_w = 1.0 / tl.load(pos_ptr + vertex * 4 + 3, mask=mask, other=1.0)
    sx = tl.load(pos_ptr + vertex * 4 + 0, mask=mask, other=0.0) * inv_w * half_w
    sy = tl.load(pos_ptr + vertex * 4 + 1, mask=mask, other=0.0) * inv_w * half_h
    return sx - cx, sy - cy


@triton.jit
def _greater(num_i, den_i, num_j, den_j):  # num_i / den_i > num_j / den_j, by cross-multiplication
    return (num_i * den_j > num_j * den_i) == (signbit(den_i) == signbit(den_j))


@triton.jit
def _crossing(along_a, across_a, along_b, across_b, ds):
    """Numerator and denominator of an edge's crossing with the pair's line, -FLT_MAX / 1 when it misses."""
    dx = along_b - along_a
    dy = across_b - across_a
    misses = signbit(across_a) == signbit(across_b)
    num = tl.where(misses, -3.4028234663852886e38, ds * (along_a * dy - across_a * dx))
    return num, tl.where(misses, 1.0, dy), dx


@triton.jit
def _pair(rast_ptr, pos_ptr, tri_ptr, opp_ptr, p0, p1, valid, num_tris, num_verts, height, width,
          half_w, half_h, DOWN: tl.constexpr, INSTANCED: tl.constexpr):
    """The torch backend's `_select_pairs` for the pairs (p0, p1): whether each is blended, its
    alpha, the pixel it modifies, whether its crossing carries a gradient, the edge's two vertices
    (rows of pos) and the front pixel's centre."""
    id0 = decode_id(tl.load(rast_ptr + p0 * 4 + 3, mask=valid, other=0.0)) - 1
    id1 = decode_id(tl.load(rast_ptr + p1 * 4 + 3, mask=valid, other=0.0)) - 1
    depth0 = tl.load(rast_ptr + p0 * 4 + 2, mask=valid, other=0.0)
    depth1 = tl.load(rast_ptr + p1 * 4 + 2, mask=valid, other=0.0)
    use1 = (id0 < 0) | ((id1 >= 0) & ~(depth0 < depth1))
    front = tl.where(use1, id1, id0)
    live = valid & (id0 != id1) & (front >= 0) & (front < num_tris)
    pix = tl.where(use1, p1, p0)
    ds = tl.where(use1, -1.0, 1.0)
    hw = height * width
    image = pix // hw
    rem = pix - image * hw
    row = rem // width
    col = rem - row * width
    cx = (col.to(tl.float32) + 0.5) - 0.5 * width
    cy = (row.to(tl.float32) + 0.5) - 0.5 * height
    if INSTANCED:
        vbase = image * num_verts
    else:
        vbase = tl.zeros_like(image)
    v0 = vbase + tl.load(tri_ptr + front * 3 + 0, mask=live, other=0)
    v1 = vbase + tl.load(tri_ptr + front * 3 + 1, mask=live, other=0)
    v2 = vbase + tl.load(tri_ptr + front * 3 + 2, mask=live, other=0)
    x0, y0 = _screen(pos_ptr, v0, live, half_w, half_h, cx, cy)
    x1, y1 = _screen(pos_ptr, v1, live, half_w, half_h, cx, cy)
    x2, y2 = _screen(pos_ptr, v2, live, half_w, half_h, cx, cy)
    bb = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    if DOWN:  # the pair's axis is y
        n0, d0, e0 = _crossing(y1, x1, y2, x2, ds)
        n1, d1, e1 = _crossing(y2, x2, y0, x0, ds)
        n2, d2, e2 = _crossing(y0, x0, y1, x1, ds)
    else:
        n0, d0, e0 = _crossing(x1, y1, x2, y2, ds)
        n1, d1, e1 = _crossing(x2, y2, x0, y0, ds)
        n2, d2, e2 = _crossing(x0, y0, x1, y1, ds)
    # Edge k runs from vertex k+1 to k+2; take the farthest crossing (ties: lower k).
    is2 = _greater(n2, d2, n0, d0) & _greater(n2, d2, n1, d1)
    is1 = ~is2 & _greater(n1, d1, n0, d0)
    num = tl.where(is2, n2, tl.where(is1, n1, n0))
    den = tl.where(is2, d2, tl.where(is1, d1, d0))
    dx = tl.where(is2, e2, tl.where(is1, e1, e0))
    edge = tl.where(is2, 2, tl.where(is1, 1, 0))
    # Start (k+1) and end (k+2) vertices, and the triangle's own vertex opposite the edge (k).
    vs = tl.where(is2, v0, tl.where(is1, v2, v1))
    ve = tl.where(is2, v1, tl.where(is1, v0, v2))
    own = tl.where(is2, v2, tl.where(is1, v1, v0))
    xs = tl.where(is2, x0, tl.where(is1, x2, x1))
    ys = tl.where(is2, y0, tl.where(is1, y2, y1))
    xe = tl.where(is2, x1, tl.where(is1, x0, x2))
    ye = tl.where(is2, y1, tl.where(is1, y0, y2))
    opposite = tl.load(opp_ptr + front * 3 + edge, mask=live, other=-1)
    other = tl.where(opposite >= 0, vbase + opposite, own)
    ox, oy = _screen(pos_ptr, other, live, half_w, half_h, cx, cy)
    wing = (xs - ox) * (ye - oy) - (xe - ox) * (ys - oy)
    silhouette = signbit(wing) == signbit(bb)
    dc = num / den
    steep = tl.abs(den) >= tl.abs(dx)
    hit = live & silhouette & steep & (dc > -CROSSING_TOLERANCE) & (dc < 1.0 + CROSSING_TOLERANCE)
    alpha = ds * (0.5 - tl.minimum(tl.maximum(dc, 0.0), 1.0))
    target = tl.where(alpha > 0, p0, p1)
    needs_grad = hit & (tl.abs(alpha) < 0.5) & ((alpha != 0) | signbit(alpha))
    return hit, alpha, target, needs_grad, vs, ve, cx, cy


@triton.jit
def _pairs_of(pixel, inb, height, width, DOWN: tl.constexpr):
    """Each pixel's right (or lower) neighbour and whether there is one."""
    rem = pixel % (height * width)
    if DOWN:
        return pixel + width, inb & (rem < (height - 1) * width)
    return pixel + 1, inb & ((rem % width) < width - 1)


@triton.jit
def _blend(color_ptr, out_ptr, rast_ptr, pos_ptr, tri_ptr, opp_ptr, pixel, inb, num_tris, num_verts,
           height, width, half_w, half_h, channels, CHANNELS: tl.constexpr, DOWN: tl.constexpr,
           INSTANCED: tl.constexpr):
    p1, valid = _pairs_of(pixel, inb, height, width, DOWN)
    hit, alpha, target, _, _, _, _, _ = _pair(rast_ptr, pos_ptr, tri_ptr, opp_ptr, pixel, p1, valid, num_tris,
                                              num_verts, height, width, half_w, half_h, DOWN, INSTANCED)
    c = tl.arange(0, CHANNELS)[None, :]
    m = hit[:, None] & (c < channels)
    c0 = tl.load(color_ptr + pixel[:, None] * channels + c, mask=m, other=0.0)
    c1 = tl.load(color_ptr + p1[:, None] * channels + c, mask=m, other=0.0)
    tl.atomic_add(out_ptr + target[:, None] * channels + c, alpha[:, None] * (c1 - c0), mask=m, sem="relaxed")


@triton.jit(do_not_specialize=["num_pixels", "num_tris", "num_verts", "height", "width"])
def _antialias_kernel(color_ptr, out_ptr, rast_ptr, pos_ptr, tri_ptr, opp_ptr, num_pixels, num_tris, num_verts,
                      height, width, half_w, half_h, channels, CHANNELS: tl.constexpr, INSTANCED: tl.constexpr,
                      BLOCK: tl.constexpr):
    pixel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = pixel < num_pixels
    _blend(color_ptr, out_ptr, rast_ptr, pos_ptr, tri_ptr, opp_ptr, pixel, inb, num_tris, num_verts, height, width,
           half_w, half_h, channels, CHANNELS, False, INSTANCED)
    _blend(color_ptr, out_ptr, rast_ptr, pos_ptr, tri_ptr, opp_ptr, pixel, inb, num_tris, num_verts, height, width,
           half_w, half_h, channels, CHANNELS, True, INSTANCED)


@triton.jit
def _add_screen_gradient(grad_pos_ptr, pos_ptr, vertex, mask, g_sx, g_sy, half_w, half_h):
    """Chain rule of screen = (x / w * half_w, y / w * half_h) into the clip-space gradient."""
    inv_w = 1.0 / tl.load(pos_ptr + vertex * 4 + 3, mask=mask, other=1.0)
    x = tl.load(pos_ptr + vertex * 4 + 0, mask=mask, other=0.0)
    y = tl.load(pos_ptr + vertex * 4 + 1, mask=mask, other=0.0)
    gx = g_sx * half_w
    gy = g_sy * half_h
    tl.atomic_add(grad_pos_ptr + vertex * 4 + 0, gx * inv_w, mask=mask, sem="relaxed")
    tl.atomic_add(grad_pos_ptr + vertex * 4 + 1, gy * inv_w, mask=mask, sem="relaxed")
    tl.atomic_add(grad_pos_ptr + vertex * 4 + 3, -(gx * x + gy * y) * inv_w * inv_w, mask=mask, sem="relaxed")


@triton.jit
def _blend_backward(color_ptr, grad_out_ptr, grad_color_ptr, grad_pos_ptr, rast_ptr, pos_ptr, tri_ptr, opp_ptr,
                    pixel, inb, num_tris, num_verts, height, width, half_w, half_h, channels, eps,
                    CHANNELS: tl.constexpr, DOWN: tl.constexpr, INSTANCED: tl.constexpr, NEED_COLOR: tl.constexpr,
                    NEED_POS: tl.constexpr):
    p1, valid = _pairs_of(pixel, inb, height, width, DOWN)
    hit, alpha, target, needs_grad, vs, ve, cx, cy = _pair(rast_ptr, pos_ptr, tri_ptr, opp_ptr, pixel, p1, valid,
                                                           num_tris, num_verts, height, width, half_w, half_h,
                                                           DOWN, INSTANCED)
    c = tl.arange(0, CHANNELS)[None, :]
    m = hit[:, None] & (c < channels)
    g = tl.load(grad_out_ptr + target[:, None] * channels + c, mask=m, other=0.0)
    if NEED_COLOR:
        ga = alpha[:, None] * g
        tl.atomic_add(grad_color_ptr + p1[:, None] * channels + c, ga, mask=m, sem="relaxed")
        tl.atomic_add(grad_color_ptr + pixel[:, None] * channels + c, -ga, mask=m, sem="relaxed")
    if NEED_POS:
        mg = needs_grad[:, None] & (c < channels)
        c0 = tl.load(color_ptr + pixel[:, None] * channels + c, mask=mg, other=0.0)
        c1 = tl.load(color_ptr + p1[:, None] * channels + c, mask=mg, other=0.0)
        # alpha moves by -crossing: the crossing's gradient is minus the colour change's.
        g_cross = -tl.sum(g * (c1 - c0), axis=1)
        xa, ya = _screen(pos_ptr, vs, needs_grad, half_w, half_h, cx, cy)
        xb, yb = _screen(pos_ptr, ve, needs_grad, half_w, half_h, cx, cy)
        if DOWN:  # x1 (along the pair) is the screen y
            x1, y1, x2, y2 = ya, xa, yb, xb
        else:
            x1, y1, x2, y2 = xa, ya, xb, yb
        dy = y2 - y1
        num = x1 * dy - y1 * (x2 - x1)
        den = dy + tl.where(signbit(dy), -eps, eps)
        den = tl.where(needs_grad, den, 1.0)
        r = g_cross / den
        q = g_cross * num / (den * den)
        g_x1 = r * y2
        g_y1 = -r * x2 + q
        g_x2 = -r * y1
        g_y2 = r * x1 - q
        if DOWN:
            _add_screen_gradient(grad_pos_ptr, pos_ptr, vs, needs_grad, g_y1, g_x1, half_w, half_h)
            _add_screen_gradient(grad_pos_ptr, pos_ptr, ve, needs_grad, g_y2, g_x2, half_w, half_h)
        else:
            _add_screen_gradient(grad_pos_ptr, pos_ptr, vs, needs_grad, g_x1, g_y1, half_w, half_h)
            _add_screen_gradient(grad_pos_ptr, pos_ptr, ve, needs_grad, g_x2, g_y2, half_w, half_h)


@triton.jit(do_not_specialize=["num_pixels", "num_tris", "num_verts", "height", "width"])
def _antialias_backward_kernel(color_ptr, grad_out_ptr, grad_color_ptr, grad_pos_ptr, rast_ptr, pos_ptr, tri_ptr,
                               opp_ptr, num_pixels, num_tris, num_verts, height, width, half_w, half_h, channels, eps,
                               CHANNELS: tl.constexpr, INSTANCED: tl.constexpr, NEED_COLOR: tl.constexpr,
                               NEED_POS: tl.constexpr, BLOCK: tl.constexpr):
    pixel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = pixel < num_pixels
    _blend_backward(color_ptr, grad_out_ptr, grad_color_ptr, grad_pos_ptr, rast_ptr, pos_ptr, tri_ptr, opp_ptr,
                    pixel, inb, num_tris, num_verts, height, width, half_w, half_h, channels, eps,
                    CHANNELS, False, INSTANCED, NEED_COLOR, NEED_POS)
    _blend_backward(color_ptr, grad_out_ptr, grad_color_ptr, grad_pos_ptr, rast_ptr, pos_ptr, tri_ptr, opp_ptr,
                    pixel, inb, num_tris, num_verts, height, width, half_w, half_h, channels, eps,
                    CHANNELS, True, INSTANCED, NEED_COLOR, NEED_POS)


def opposite_vertices(tri: Tensor) -> Tensor:  # [F, 3] int32 -> [F, 3] int32
    """For edge k of each triangle (vertex k+1 to k+2), the opposite vertex of the triangle across
    it, -1 on a boundary: the torch backend's adjacency, built once per mesh by the caller."""
    return _opposite_vertices(tri.long()).to(torch.int32).contiguous()


class _Antialias(torch.autograd.Function):
    @staticmethod
    def forward(ctx, color, rast, pos, tri, opposite):
        batch, height, width, channels = color.shape
        num_pixels = batch * height * width
        out = color.clone()
        instanced = pos.dim() == 3
        grid = (triton.cdiv(num_pixels, LAUNCH["pixels"]),)
        _antialias_kernel[grid](color, out, rast, pos, tri, opposite, num_pixels, tri.shape[0], pos.shape[-2],
                                height, width, 0.5 * width, 0.5 * height, channels,
                                CHANNELS=triton.next_power_of_2(channels), INSTANCED=instanced,
                                BLOCK=LAUNCH["pixels"], num_warps=LAUNCH["warps"])
        ctx.save_for_backward(color, rast, pos, tri, opposite)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        color, rast, pos, tri, opposite = ctx.saved_tensors
        need_color, _, need_pos, _, _ = ctx.needs_input_grad
        batch, height, width, channels = color.shape
        num_pixels = batch * height * width
        grad_out = grad_out.contiguous()
        grad_color = grad_out.clone() if need_color else None
        grad_pos = torch.zeros_like(pos) if need_pos else None
        grid = (triton.cdiv(num_pixels, LAUNCH["pixels"]),)
        _antialias_backward_kernel[grid](
            color, grad_out, color if grad_color is None else grad_color, pos if grad_pos is None else grad_pos,
            rast, pos, tri, opposite, num_pixels, tri.shape[0], pos.shape[-2], height, width,
            0.5 * width, 0.5 * height, channels, GRAD_DY_EPS,
            CHANNELS=triton.next_power_of_2(channels), INSTANCED=pos.dim() == 3,
            NEED_COLOR=need_color, NEED_POS=need_pos, BLOCK=LAUNCH["pixels"], num_warps=LAUNCH["warps"])
        return grad_color, None, grad_pos, None, None


def antialias(
    color: Tensor,  # [B, H, W, C] float32 shaded image
    rast: Tensor,  # [B, H, W, 4]
    pos: Tensor,  # [B, V, 4] (instanced) or [V, 4] (range mode)
    tri: Tensor,  # [F, 3] int32
    opposite: Tensor = None,  # [F, 3] int32 from `opposite_vertices(tri)`; built here when None
) -> Tensor:  # [B, H, W, C]
    """See `pipeline.render.torch_backend.antialias` for the method and its conventions; the same
    results (colour changes added with atomics, so their order, and the last bit, may vary)."""
    if color.numel() > INDEX_LIMIT or pos.numel() > INDEX_LIMIT:
        raise ValueError("too many pixels x channels for one triton antialias call: render fewer views at a time")
    tri = tri.contiguous()
    if opposite is None:
        opposite = opposite_vertices(tri)
    return _Antialias.apply(color.contiguous(), rast.contiguous(), pos.contiguous(), tri, opposite)
