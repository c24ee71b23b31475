"""2D texture sampling in Triton (nvdiffrast's `texture`): bilinear and trilinear (mip-mapped).

Conventions are the torch backend's (`pipeline.render.torch_backend.texture` lists them). The mip
levels are built into one flat buffer, a kernel per level (as the torch backend's `mip_pyramid`
builds them, in the same order of additions); one kernel then computes each pixel's level of
detail and its two bilinear lookups. The backward kernel accumulates the texel gradients of every
level with atomics and writes the gradients of uv and uv_da; a kernel per level then carries each
level's gradient down to the one below, and level 0's is the texture's.
Unlike the torch backend, which samples an atlas through grid_sample, taps are addressed exactly
(floor of the texel coordinate, taps i and i + 1), as nvdiffrast does. "nearest" uses the torch
backend (no uv gradient to compute, and not used by the pipeline's hot loops).
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import torch_backend
from .rasterize import INDEX_LIMIT, LAUNCH

_BOUNDARY = {"wrap": 0, "clamp": 1, "zero": 2}


@triton.jit
def _axis(t, size, BOUNDARY: tl.constexpr):
    """Texel coordinate along one axis of a level: taps i0, i1, their weight of i1, whether each
    tap reads the texture (zero mode), and whether the coordinate has a gradient."""
    sizef = size.to(tl.float32)
    x = t * sizef - 0.5
    if BOUNDARY == 1:  # clamp: to the edge texel centres, with no gradient on them
        x = tl.minimum(tl.maximum(x, 0.0), sizef - 1.0)
        grad_ok = (x > 0.0) & (x < sizef - 1.0)
    elif BOUNDARY == 2:  # zero: taps beyond one texel outside are all zero
        grad_ok = (x >= -1.0) & (x <= sizef)
        x = tl.minimum(tl.maximum(x, -1.0), sizef)
    else:
        grad_ok = x == x
    x0f = tl.floor(x)
    frac = x - x0f
    i0 = x0f.to(tl.int32)
    i1 = i0 + 1
    ok0 = grad_ok | ~grad_ok  # all true
    ok1 = ok0
    if BOUNDARY == 0:
        i0 = tl.where(i0 < 0, i0 + size, i0)
        i1 = tl.where(i1 >= size, i1 - size, i1)
    elif BOUNDARY == 1:
        i1 = tl.minimum(i1, size - 1)
    else:
        ok0 = (i0 >= 0) & (i0 < size)
        ok1 = (i1 >= 0) & (i1 < size)
    return i0, i1, frac, ok0, ok1, grad_ok, sizef


@triton.jit
def _lookup(tex_ptr, levels_ptr, level, base, u, v, mask, c, channels, BOUNDARY: tl.constexpr):
    """Bilinear lookup in one level for each pixel: addresses and weights of the four taps, the value."""
    offset = tl.load(levels_ptr + level * 3 + 0, mask=mask, other=0)
    height = tl.load(levels_ptr + level * 3 + 1, mask=mask, other=1)
    width = tl.load(levels_ptr + level * 3 + 2, mask=mask, other=1)
    ix0, ix1, fx, okx0, okx1, gx_ok, wf = _axis(u, width, BOUNDARY)
    iy0, iy1, fy, oky0, oky1, gy_ok, hf = _axis(v, height, BOUNDARY)
    row0 = base + offset + iy0 * width * channels
    row1 = base + offset + iy1 * width * channels
    a00 = (row0 + ix0 * channels)[:, None] + c
    a01 = (row0 + ix1 * channels)[:, None] + c
    a10 = (row1 + ix0 * channels)[:, None] + c
    a11 = (row1 + ix1 * channels)[:, None] + c
    cm = mask[:, None] & (c < channels)
    m00 = cm & (oky0 & okx0)[:, None]
    m01 = cm & (oky0 & okx1)[:, None]
    m10 = cm & (oky1 & okx0)[:, None]
    m11 = cm & (oky1 & okx1)[:, None]
    t00 = tl.load(tex_ptr + a00, mask=m00, other=0.0)
    t01 = tl.load(tex_ptr + a01, mask=m01, other=0.0)
    t10 = tl.load(tex_ptr + a10, mask=m10, other=0.0)
    t11 = tl.load(tex_ptr + a11, mask=m11, other=0.0)
    fx2 = fx[:, None]
    fy2 = fy[:, None]
    top = t00 + fx2 * (t01 - t00)
    bottom = t10 + fx2 * (t11 - t10)
    value = top + fy2 * (bottom - top)
    # d value / d (u, v), per channel.
    du = ((t01 - t00) * (1.0 - fy2) + (t11 - t10) * fy2) * tl.where(gx_ok, wf, 0.0)[:, None]
    dv = (bottom - top) * tl.where(gy_ok, hf, 0.0)[:, None]
    return value, du, dv, a00, a01, a10, a11, m00, m01, m10, m11, fx2, fy2


@triton.jit
def _level_of_detail(uv_da_ptr, pixel, mask, tex_w, tex_h, top):
    """The torch backend's `_level_of_detail`, and the gradient of the LOD w.r.t. uv_da (where it has one)."""
    dsdx = tl.load(uv_da_ptr + pixel * 4 + 0, mask=mask, other=0.0) * tex_w
    dsdy = tl.load(uv_da_ptr + pixel * 4 + 1, mask=mask, other=0.0) * tex_w
    dtdx = tl.load(uv_da_ptr + pixel * 4 + 2, mask=mask, other=0.0) * tex_h
    dtdy = tl.load(uv_da_ptr + pixel * 4 + 3, mask=mask, other=0.0) * tex_h
    a = dsdx * dsdx + dtdx * dtdx
    b = dsdy * dsdy + dtdy * dtdy
    c = dsdx * dsdy + dtdx * dtdy
    mean = 0.5 * (a + b)
    disc = 0.25 * (a - b) * (a - b) + c * c
    smooth = disc > 0
    root = tl.sqrt(tl.where(smooth, disc, 1.0))
    major = tl.where(smooth, mean + root, mean)
    lod = 0.5 * tl.log2(major)
    lod = tl.where(lod == lod, lod, 0.0)  # NaN -> 0
    inside = smooth & (lod >= 0.0) & (lod <= top)
    lod = tl.minimum(tl.maximum(lod, 0.0), top)
    # d lod / d (a, b, c), then the chain rule to uv_da (scaled to texels).
    g_major = tl.where(inside, 0.7213475204444817 / major, 0.0)  # 0.5 / ln 2
    half_gap = 0.25 * (a - b) / root
    ga = g_major * (0.5 + half_gap)
    gb = g_major * (0.5 - half_gap)
    gc = g_major * c / root
    g0 = (2.0 * ga * dsdx + gc * dsdy) * tex_w
    g1 = (2.0 * gb * dsdy + gc * dsdx) * tex_w
    g2 = (2.0 * ga * dtdx + gc * dtdy) * tex_h
    g3 = (2.0 * gb * dtdy + gc * dtdx) * tex_h
    return lod, g0, g1, g2, g3


@triton.jit
def _prepare(uv_ptr, uv_da_ptr, pixel, inb, tex_w, tex_h, top, BOUNDARY: tl.constexpr, MIP: tl.constexpr):
    u = tl.load(uv_ptr + pixel * 2 + 0, mask=inb, other=0.0)
    v = tl.load(uv_ptr + pixel * 2 + 1, mask=inb, other=0.0)
    if BOUNDARY == 0:
        u = u - tl.floor(u)
        v = v - tl.floor(v)
    if MIP:
        lod, g0, g1, g2, g3 = _level_of_detail(uv_da_ptr, pixel, inb, tex_w, tex_h, top)
        level0f = tl.floor(lod)
        frac = lod - level0f
        has_frac = frac > 0
        frac = tl.where(has_frac, frac, 0.0)
        level0 = level0f.to(tl.int32)
        level1 = tl.minimum(level0 + 1, top)
    else:
        zero = tl.zeros_like(u)
        g0, g1, g2, g3, frac = zero, zero, zero, zero, zero
        level0 = tl.zeros_like(pixel)
        level1 = level0
        has_frac = frac > 0
    return u, v, frac, has_frac, level0, level1, g0, g1, g2, g3


@triton.jit(do_not_specialize=["num_pixels", "pixels_per_tex", "batch_stride", "tex_w", "tex_h", "top"])
def _texture_kernel(tex_ptr, levels_ptr, uv_ptr, uv_da_ptr, out_ptr, num_pixels, pixels_per_tex, batch_stride,
                    channels, tex_w, tex_h, top, BOUNDARY: tl.constexpr, MIP: tl.constexpr, CHANNELS: tl.constexpr,
                    BLOCK: tl.constexpr):
    pixel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = pixel < num_pixels
    c = tl.arange(0, CHANNELS)[None, :]
    base = (pixel // pixels_per_tex) * batch_stride
    u, v, frac, has_frac, level0, level1, _, _, _, _ = _prepare(uv_ptr, uv_da_ptr, pixel, inb, tex_w, tex_h, top,
                                                                BOUNDARY, MIP)
    value = _lookup(tex_ptr, levels_ptr, level0, base, u, v, inb, c, channels, BOUNDARY)[0]
    if MIP:
        second = _lookup(tex_ptr, levels_ptr, level1, base, u, v, inb & has_frac, c, channels, BOUNDARY)[0]
        value = value + frac[:, None] * (second - value)
    tl.store(out_ptr + pixel[:, None] * channels + c, value, mask=inb[:, None] & (c < channels))


@triton.jit
def _scatter(grad_tex_ptr, g, weight, a00, a01, a10, a11, m00, m01, m10, m11, fx, fy):
    gw = g * weight
    tl.atomic_add(grad_tex_ptr + a00, gw * (1.0 - fx) * (1.0 - fy), mask=m00, sem="relaxed")
    tl.atomic_add(grad_tex_ptr + a01, gw * fx * (1.0 - fy), mask=m01, sem="relaxed")
    tl.atomic_add(grad_tex_ptr + a10, gw * (1.0 - fx) * fy, mask=m10, sem="relaxed")
    tl.atomic_add(grad_tex_ptr + a11, gw * fx * fy, mask=m11, sem="relaxed")


@triton.jit(do_not_specialize=["num_pixels", "pixels_per_tex", "batch_stride", "tex_w", "tex_h", "top"])
def _texture_backward_kernel(tex_ptr, levels_ptr, uv_ptr, uv_da_ptr, grad_out_ptr, grad_tex_ptr, grad_uv_ptr,
                             grad_uv_da_ptr, num_pixels, pixels_per_tex, batch_stride, channels, tex_w, tex_h, top,
                             BOUNDARY: tl.constexpr, MIP: tl.constexpr, CHANNELS: tl.constexpr,
                             NEED_TEX: tl.constexpr, NEED_UV: tl.constexpr, NEED_UV_DA: tl.constexpr,
                             BLOCK: tl.constexpr):
    pixel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = pixel < num_pixels
    c = tl.arange(0, CHANNELS)[None, :]
    base = (pixel // pixels_per_tex) * batch_stride
    g = tl.load(grad_out_ptr + pixel[:, None] * channels + c, mask=inb[:, None] & (c < channels), other=0.0)
    # Pixels without gradient (the background, typically, whose uv is all 0) are skipped: their
    # atomics would all land on the same few texels and serialise.
    active = inb & (tl.max(tl.abs(g), axis=1) > 0)
    u, v, frac, has_frac, level0, level1, g0, g1, g2, g3 = _prepare(uv_ptr, uv_da_ptr, pixel, inb, tex_w, tex_h, top,
                                                                    BOUNDARY, MIP)
    (value0, du0, dv0, a00, a01, a10, a11, m00, m01, m10, m11, fx,
     fy) = _lookup(tex_ptr, levels_ptr, level0, base, u, v, active, c, channels, BOUNDARY)
    f = frac[:, None]
    if NEED_TEX:
        _scatter(grad_tex_ptr, g, 1.0 - f, a00, a01, a10, a11, m00, m01, m10, m11, fx, fy)
    du = du0
    dv = dv0
    if MIP:
        second = active & has_frac
        (value1, du1, dv1, b00, b01, b10, b11, n00, n01, n10, n11, fx1,
         fy1) = _lookup(tex_ptr, levels_ptr, level1, base, u, v, second, c, channels, BOUNDARY)
        if NEED_TEX:
            _scatter(grad_tex_ptr, g, f, b00, b01, b10, b11, n00, n01, n10, n11, fx1, fy1)
        du = du0 + f * (du1 - du0)
        dv = dv0 + f * (dv1 - dv0)
        if NEED_UV_DA:
            g_lod = tl.where(second, tl.sum(g * (value1 - value0), axis=1), 0.0)
            tl.store(grad_uv_da_ptr + pixel * 4 + 0, g_lod * g0, mask=inb)
            tl.store(grad_uv_da_ptr + pixel * 4 + 1, g_lod * g1, mask=inb)
            tl.store(grad_uv_da_ptr + pixel * 4 + 2, g_lod * g2, mask=inb)
            tl.store(grad_uv_da_ptr + pixel * 4 + 3, g_lod * g3, mask=inb)
    if NEED_UV:
        tl.store(grad_uv_ptr + pixel * 2 + 0, tl.sum(g * du, axis=1), mask=inb)
        tl.store(grad_uv_ptr + pixel * 2 + 1, tl.sum(g * dv, axis=1), mask=inb)


@triton.jit(do_not_specialize=["num_out", "src_offset", "dst_offset", "batch_stride", "src_w", "dst_h", "dst_w",
                               "channels"])
def _mip_level_kernel(flat_ptr, num_out, src_offset, dst_offset, batch_stride, src_w, dst_h, dst_w, channels,
                      step_x, step_y, scale, BLOCK: tl.constexpr):
    """One mip level from the previous one inside the flat buffer: each texel is the mean of its
    2x2 block (or pair, ``step_x`` / ``step_y`` = 0 on a side that is already 1), summed in the
    torch backend's order (horizontal pairs, then the two rows)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = i < num_out
    per_batch = dst_h * dst_w * channels
    b = i // per_batch
    rem = i - b * per_batch
    y = rem // (dst_w * channels)
    rem = rem - y * (dst_w * channels)
    x = rem // channels
    c = rem - x * channels
    src = flat_ptr + b * batch_stride + src_offset + ((2 * y) * src_w + 2 * x) * channels + c
    row = src_w * channels
    pair_x = live & ((tl.zeros_like(i) + step_x) > 0)  # (blocks, not scalars, in masks: the interpreter needs them)
    pair_y = live & ((tl.zeros_like(i) + step_y) > 0)
    top = tl.load(src, mask=live, other=0.0) + tl.load(src + channels, mask=pair_x, other=0.0)
    bottom = tl.load(src + row, mask=pair_y, other=0.0) + tl.load(src + row + channels, mask=pair_x & pair_y, other=0.0)
    tl.store(flat_ptr + b * batch_stride + dst_offset + (y * dst_w + x) * channels + c, (top + bottom) * scale,
             mask=live)


@triton.jit(do_not_specialize=["num_out", "child_offset", "parent_offset", "batch_stride", "child_h", "child_w",
                               "parent_w", "channels"])
def _mip_gradient_kernel(grad_ptr, num_out, child_offset, parent_offset, batch_stride, child_h, child_w, parent_w,
                         channels, shift_x, shift_y, scale, BLOCK: tl.constexpr):
    """The mip levels' backward, one level at a time from the top: each texel of the finer level
    gains ``scale`` times the (already accumulated) gradient of its parent texel."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = i < num_out
    per_batch = child_h * child_w * channels
    b = i // per_batch
    rem = i - b * per_batch
    y = rem // (child_w * channels)
    rem = rem - y * (child_w * channels)
    x = rem // channels
    c = rem - x * channels
    base = grad_ptr + b * batch_stride
    parent = tl.load(base + parent_offset + ((y >> shift_y) * parent_w + (x >> shift_x)) * channels + c, mask=live,
                     other=0.0)
    child = base + child_offset + (y * child_w + x) * channels + c
    tl.store(child, tl.load(child, mask=live, other=0.0) + scale * parent, mask=live)


def _level_sizes(height: int, width: int, max_mip_level: Optional[int]) -> Tuple[Tuple[int, int], ...]:
    """(h, w) of each mip level, as `mip_pyramid` builds them (and with its error for odd sides)."""
    sizes = [(height, width)]
    while (height > 1 or width > 1) and (max_mip_level is None or len(sizes) <= max_mip_level):
        if (width > 1 and width % 2) or (height > 1 and height % 2):
            chain = " -> ".join(f"{h}x{w}" for h, w in sizes)
            raise ValueError(
                f"mip pyramid of a {sizes[0][0]}x{sizes[0][1]} texture cannot halve an odd side "
                f"({chain} -> ?); use power-of-two texture sides or limit max_mip_level"
            )
        height, width = max(height // 2, 1), max(width // 2, 1)
        sizes.append((height, width))
    return tuple(sizes)


def _level_offsets(sizes, channels: int):
    offsets = [0]
    for height, width in sizes[:-1]:
        offsets.append(offsets[-1] + height * width * channels)
    return offsets


class _MipPyramid(torch.autograd.Function):
    """All mip levels of ``tex`` in one flat buffer [Bt, sum of h_l w_l C] (level 0 first)."""

    @staticmethod
    def forward(ctx, tex, sizes):
        tex_batch, _, _, channels = tex.shape
        offsets = _level_offsets(sizes, channels)
        total = offsets[-1] + sizes[-1][0] * sizes[-1][1] * channels
        flat = torch.empty(tex_batch, total, dtype=tex.dtype, device=tex.device)
        flat[:, :offsets[1] if len(sizes) > 1 else total] = tex.reshape(tex_batch, -1)
        for level in range(1, len(sizes)):
            (src_h, src_w), (dst_h, dst_w) = sizes[level - 1], sizes[level]
            step_x, step_y = int(src_w > 1), int(src_h > 1)
            num_out = tex_batch * dst_h * dst_w * channels
            _mip_level_kernel[(triton.cdiv(num_out, LAUNCH["pixels"]),)](
                flat, num_out, offsets[level - 1], offsets[level], total, src_w, dst_h, dst_w, channels,
                step_x, step_y, 0.5 ** (step_x + step_y), BLOCK=LAUNCH["pixels"], num_warps=LAUNCH["warps"])
        ctx.sizes, ctx.offsets, ctx.shape = sizes, offsets, tex.shape
        return flat

    @staticmethod
    def backward(ctx, grad_flat):
        sizes, offsets = ctx.sizes, ctx.offsets
        tex_batch, _, _, channels = ctx.shape
        grad = grad_flat.contiguous().clone()
        for level in range(len(sizes) - 1, 0, -1):
            (child_h, child_w), (_, parent_w) = sizes[level - 1], sizes[level]
            shift_x, shift_y = int(child_w > 1), int(child_h > 1)
            num_out = tex_batch * child_h * child_w * channels
            _mip_gradient_kernel[(triton.cdiv(num_out, LAUNCH["pixels"]),)](
                grad, num_out, offsets[level - 1], offsets[level], grad.shape[1], child_h, child_w, parent_w,
                channels, shift_x, shift_y, 0.5 ** (shift_x + shift_y), BLOCK=LAUNCH["pixels"],
                num_warps=LAUNCH["warps"])
        level0 = offsets[1] if len(sizes) > 1 else grad.shape[1]
        return grad[:, :level0].reshape(ctx.shape), None


@functools.lru_cache(maxsize=16)
def _level_table(sizes, channels: int, device) -> Tensor:  # [L, 3] int32 (offset in floats, height, width)
    """Where each level starts in the flat buffer (per texture), kept on the device: one upload per size."""
    offsets = _level_offsets(sizes, channels)
    return torch.tensor([[o, h, w] for o, (h, w) in zip(offsets, sizes)], dtype=torch.int32, device=device)


class _Texture(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flat, levels, uv, uv_da, tex_shape, boundary):
        tex_batch, tex_h, tex_w, channels = tex_shape
        batch, height, width, _ = uv.shape
        num_pixels = batch * height * width
        mip = uv_da is not None
        out = torch.empty(batch, height, width, channels, dtype=torch.float32, device=uv.device)
        args = (num_pixels, height * width if tex_batch > 1 else num_pixels, flat.shape[1], channels, tex_w, tex_h,
                levels.shape[0] - 1)
        grid = (triton.cdiv(num_pixels, LAUNCH["pixels"]),)
        _texture_kernel[grid](flat, levels, uv, uv if uv_da is None else uv_da, out, *args,
                              BOUNDARY=_BOUNDARY[boundary], MIP=mip, CHANNELS=triton.next_power_of_2(channels),
                              BLOCK=LAUNCH["pixels"], num_warps=LAUNCH["warps"])
        ctx.save_for_backward(flat, levels, uv, uv_da)
        ctx.args, ctx.boundary = args, boundary
        return out

    @staticmethod
    def backward(ctx, grad_out):
        flat, levels, uv, uv_da = ctx.saved_tensors
        need_tex, _, need_uv, need_uv_da, _, _ = ctx.needs_input_grad
        mip = uv_da is not None
        need_uv_da = need_uv_da and mip
        grad_flat = torch.zeros_like(flat) if need_tex else None
        grad_uv = torch.empty_like(uv) if need_uv else None
        grad_uv_da = torch.empty_like(uv_da) if need_uv_da else None
        channels = ctx.args[3]
        grid = (triton.cdiv(ctx.args[0], LAUNCH["pixels"]),)
        _texture_backward_kernel[grid](
            flat, levels, uv, uv if uv_da is None else uv_da, grad_out.contiguous(),
            flat if grad_flat is None else grad_flat, uv if grad_uv is None else grad_uv,
            uv if grad_uv_da is None else grad_uv_da, *ctx.args,
            BOUNDARY=_BOUNDARY[ctx.boundary], MIP=mip, CHANNELS=triton.next_power_of_2(channels),
            NEED_TEX=need_tex, NEED_UV=need_uv, NEED_UV_DA=need_uv_da, BLOCK=LAUNCH["pixels"],
            num_warps=LAUNCH["warps"])
        return grad_flat, None, grad_uv, grad_uv_da, None, None


def texture(
    tex: Tensor,  # [B or 1, h, w, C] float32
    uv: Tensor,  # [B, H, W, 2]
    uv_da: Optional[Tensor] = None,  # [B, H, W, 4]; linear-mipmap-linear only
    filter_mode: str = "linear",
    boundary_mode: str = "wrap",
    max_mip_level: Optional[int] = None,
) -> Tensor:  # [B, H, W, C]
    """See `pipeline.render.torch_backend.texture` for the contract (modes, LOD, gradients)."""
    if filter_mode == "nearest":
        return torch_backend.texture(tex, uv, uv_da=uv_da, filter_mode=filter_mode, boundary_mode=boundary_mode,
                                     max_mip_level=max_mip_level)
    if max_mip_level is not None and int(max_mip_level) < 0:
        raise ValueError(f"max_mip_level must be >= 0 or None, got {max_mip_level}")
    if filter_mode == "linear-mipmap-linear" and max_mip_level == 0:
        filter_mode = "linear"  # no mip levels, as nvdiffrast
    tex_batch, tex_h, tex_w, channels = tex.shape
    if tex.numel() * 2 > INDEX_LIMIT or uv.numel() // 2 * max(channels, 4) > INDEX_LIMIT:
        raise ValueError("texture or image too large for one triton texture call: render fewer views at a time")
    if filter_mode == "linear-mipmap-linear":
        if uv_da is None:
            raise ValueError("filter_mode='linear-mipmap-linear' needs uv_da")
        sizes = _level_sizes(tex_h, tex_w, max_mip_level)
        flat = _MipPyramid.apply(tex.contiguous(), sizes)
        uv_da = uv_da.contiguous()
    else:
        sizes, flat, uv_da = ((tex_h, tex_w),), tex.reshape(tex_batch, -1), None
    table = _level_table(sizes, channels, uv.device)
    return _Texture.apply(flat.contiguous(), table, uv.contiguous(), uv_da, (tex_batch, tex_h, tex_w, channels),
                          boundary_mode)
