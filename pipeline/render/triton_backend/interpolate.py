"""Attribute interpolation in Triton (nvdiffrast's `interpolate`), forward and backward kernels.

One program handles a block of pixels and all channels: the forward reads each pixel's triangle
and barycentrics from rast and writes the attributes and their screen-space derivatives; the
backward writes the gradients of rast and rast_db per pixel and accumulates the attributes'
gradient with atomics. Same expressions as the torch backend's autograd graph.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from .rasterize import INDEX_LIMIT, LAUNCH, decode_id


@triton.jit
def _corners(rast_ptr, attr_ptr, tri_ptr, pixel, inb, num_tris, num_verts, hw, channels,
             ATTR_BATCHED: tl.constexpr):
    """Per pixel: covered, u, v and the row offsets (into attr, in floats) of its triangle's vertices."""
    face = decode_id(tl.load(rast_ptr + pixel * 4 + 3, mask=inb, other=0.0)) - 1
    covered = inb & (face >= 0) & (face < num_tris)
    u = tl.load(rast_ptr + pixel * 4 + 0, mask=covered, other=0.0)
    v = tl.load(rast_ptr + pixel * 4 + 1, mask=covered, other=0.0)
    if ATTR_BATCHED:
        vbase = (pixel // hw) * num_verts
    else:
        vbase = tl.zeros_like(pixel)
    r0 = (vbase + tl.load(tri_ptr + face * 3 + 0, mask=covered, other=0)) * channels
    r1 = (vbase + tl.load(tri_ptr + face * 3 + 1, mask=covered, other=0)) * channels
    r2 = (vbase + tl.load(tri_ptr + face * 3 + 2, mask=covered, other=0)) * channels
    return covered, u, v, r0, r1, r2


@triton.jit(do_not_specialize=["num_pixels", "num_tris", "num_verts", "hw"])
def _interpolate_kernel(attr_ptr, rast_ptr, tri_ptr, db_ptr, diff_ptr, out_ptr, out_da_ptr,
                        num_pixels, num_tris, num_verts, hw, channels, num_diff,
                        ATTR_BATCHED: tl.constexpr, BLOCK: tl.constexpr, CHANNELS: tl.constexpr,
                        DIFF: tl.constexpr):
    pixel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = pixel < num_pixels
    covered, u, v, r0, r1, r2 = _corners(rast_ptr, attr_ptr, tri_ptr, pixel, inb, num_tris, num_verts, hw,
                                         channels, ATTR_BATCHED)
    c = tl.arange(0, CHANNELS)[None, :]
    cm = covered[:, None] & (c < channels)
    a0 = tl.load(attr_ptr + r0[:, None] + c, mask=cm, other=0.0)
    a1 = tl.load(attr_ptr + r1[:, None] + c, mask=cm, other=0.0)
    a2 = tl.load(attr_ptr + r2[:, None] + c, mask=cm, other=0.0)
    values = a2 + u[:, None] * (a0 - a2) + v[:, None] * (a1 - a2)
    tl.store(out_ptr + pixel[:, None] * channels + c, tl.where(cm, values, 0.0), mask=inb[:, None] & (c < channels))
    if DIFF > 0:
        k = tl.arange(0, DIFF)[None, :]
        km = k < num_diff
        ch = tl.load(diff_ptr + k, mask=km, other=0)
        dm = covered[:, None] & km
        d0 = tl.load(attr_ptr + r0[:, None] + ch, mask=dm, other=0.0)
        d1 = tl.load(attr_ptr + r1[:, None] + ch, mask=dm, other=0.0)
        d2 = tl.load(attr_ptr + r2[:, None] + ch, mask=dm, other=0.0)
        db0 = tl.load(db_ptr + pixel * 4 + 0, mask=covered, other=0.0)[:, None]
        db1 = tl.load(db_ptr + pixel * 4 + 1, mask=covered, other=0.0)[:, None]
        db2 = tl.load(db_ptr + pixel * 4 + 2, mask=covered, other=0.0)[:, None]
        db3 = tl.load(db_ptr + pixel * 4 + 3, mask=covered, other=0.0)[:, None]
        dadu = d0 - d2
        dadv = d1 - d2
        base = pixel[:, None] * (2 * num_diff) + 2 * k
        wm = inb[:, None] & km
        tl.store(out_da_ptr + base, tl.where(dm, dadu * db0 + dadv * db2, 0.0), mask=wm)
        tl.store(out_da_ptr + base + 1, tl.where(dm, dadu * db1 + dadv * db3, 0.0), mask=wm)


@triton.jit(do_not_specialize=["num_pixels", "num_tris", "num_verts", "hw"])
def _interpolate_backward_kernel(attr_ptr, rast_ptr, tri_ptr, db_ptr, diff_ptr, grad_out_ptr, grad_da_ptr,
                                 grad_attr_ptr, grad_rast_ptr, grad_db_ptr,
                                 num_pixels, num_tris, num_verts, hw, channels, num_diff,
                                 ATTR_BATCHED: tl.constexpr, BLOCK: tl.constexpr, CHANNELS: tl.constexpr,
                                 DIFF: tl.constexpr, NEED_ATTR: tl.constexpr, NEED_RAST: tl.constexpr,
                                 NEED_DB: tl.constexpr):
    pixel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = pixel < num_pixels
    covered, u, v, r0, r1, r2 = _corners(rast_ptr, attr_ptr, tri_ptr, pixel, inb, num_tris, num_verts, hw,
                                         channels, ATTR_BATCHED)
    c = tl.arange(0, CHANNELS)[None, :]
    cm = covered[:, None] & (c < channels)
    g = tl.load(grad_out_ptr + pixel[:, None] * channels + c, mask=cm, other=0.0)
    if NEED_ATTR:
        uu = u[:, None]
        vv = v[:, None]
        tl.atomic_add(grad_attr_ptr + r0[:, None] + c, uu * g, mask=cm, sem="relaxed")
        tl.atomic_add(grad_attr_ptr + r1[:, None] + c, vv * g, mask=cm, sem="relaxed")
        tl.atomic_add(grad_attr_ptr + r2[:, None] + c, g - uu * g - vv * g, mask=cm, sem="relaxed")
    if NEED_RAST:
        a0 = tl.load(attr_ptr + r0[:, None] + c, mask=cm, other=0.0)
        a1 = tl.load(attr_ptr + r1[:, None] + c, mask=cm, other=0.0)
        a2 = tl.load(attr_ptr + r2[:, None] + c, mask=cm, other=0.0)
        gu = tl.sum(g * (a0 - a2), axis=1)
        gv = tl.sum(g * (a1 - a2), axis=1)
        zero = tl.zeros_like(gu)
        tl.store(grad_rast_ptr + pixel * 4 + 0, gu, mask=inb)
        tl.store(grad_rast_ptr + pixel * 4 + 1, gv, mask=inb)
        tl.store(grad_rast_ptr + pixel * 4 + 2, zero, mask=inb)
        tl.store(grad_rast_ptr + pixel * 4 + 3, zero, mask=inb)
    if DIFF > 0:
        k = tl.arange(0, DIFF)[None, :]
        km = k < num_diff
        dm = covered[:, None] & km
        ch = tl.load(diff_ptr + k, mask=km, other=0)
        base = pixel[:, None] * (2 * num_diff) + 2 * k
        gx = tl.load(grad_da_ptr + base, mask=dm, other=0.0)
        gy = tl.load(grad_da_ptr + base + 1, mask=dm, other=0.0)
        if NEED_ATTR:
            db0 = tl.load(db_ptr + pixel * 4 + 0, mask=covered, other=0.0)[:, None]
            db1 = tl.load(db_ptr + pixel * 4 + 1, mask=covered, other=0.0)[:, None]
            db2 = tl.load(db_ptr + pixel * 4 + 2, mask=covered, other=0.0)[:, None]
            db3 = tl.load(db_ptr + pixel * 4 + 3, mask=covered, other=0.0)[:, None]
            g_dadu = gx * db0 + gy * db1
            g_dadv = gx * db2 + gy * db3
            tl.atomic_add(grad_attr_ptr + r0[:, None] + ch, g_dadu, mask=dm, sem="relaxed")
            tl.atomic_add(grad_attr_ptr + r1[:, None] + ch, g_dadv, mask=dm, sem="relaxed")
            tl.atomic_add(grad_attr_ptr + r2[:, None] + ch, -g_dadu - g_dadv, mask=dm, sem="relaxed")
        if NEED_DB:
            d0 = tl.load(attr_ptr + r0[:, None] + ch, mask=dm, other=0.0)
            d1 = tl.load(attr_ptr + r1[:, None] + ch, mask=dm, other=0.0)
            d2 = tl.load(attr_ptr + r2[:, None] + ch, mask=dm, other=0.0)
            dadu = d0 - d2
            dadv = d1 - d2
            tl.store(grad_db_ptr + pixel * 4 + 0, tl.sum(gx * dadu, axis=1), mask=inb)
            tl.store(grad_db_ptr + pixel * 4 + 1, tl.sum(gy * dadu, axis=1), mask=inb)
            tl.store(grad_db_ptr + pixel * 4 + 2, tl.sum(gx * dadv, axis=1), mask=inb)
            tl.store(grad_db_ptr + pixel * 4 + 3, tl.sum(gy * dadv, axis=1), mask=inb)


class _Interpolate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attr, rast, tri, rast_db, diff):
        batch, height, width, _ = rast.shape
        channels = attr.shape[-1]
        num_pixels = batch * height * width
        num_diff = 0 if diff is None else diff.numel()
        out = torch.empty(batch, height, width, channels, dtype=torch.float32, device=attr.device)
        out_da = torch.empty(batch, height, width, 2 * num_diff, dtype=torch.float32, device=attr.device)
        batched = attr.dim() == 3 and attr.shape[0] > 1
        grid = (triton.cdiv(num_pixels, LAUNCH["pixels"]),)
        _interpolate_kernel[grid](
            attr, rast, tri, rast if rast_db is None else rast_db, tri if diff is None else diff, out, out_da,
            num_pixels, tri.shape[0], attr.shape[-2], height * width, channels, num_diff,
            ATTR_BATCHED=batched, BLOCK=LAUNCH["pixels"], num_warps=LAUNCH["warps"],
            CHANNELS=triton.next_power_of_2(channels),
            DIFF=triton.next_power_of_2(num_diff) if num_diff else 0)
        ctx.save_for_backward(attr, rast, tri, rast_db, diff)
        ctx.batched = batched
        if not num_diff:
            ctx.mark_non_differentiable(out_da)
        return out, out_da

    @staticmethod
    def backward(ctx, grad_out, grad_da):
        attr, rast, tri, rast_db, diff = ctx.saved_tensors
        need_attr, need_rast, _, need_db, _ = ctx.needs_input_grad
        batch, height, width, _ = rast.shape
        channels = attr.shape[-1]
        num_pixels = batch * height * width
        num_diff = 0 if diff is None else diff.numel()
        need_db = need_db and num_diff > 0
        grad_attr = torch.zeros_like(attr) if need_attr else None
        grad_rast = torch.empty_like(rast) if need_rast else None
        grad_db = torch.zeros_like(rast_db) if need_db else None
        grid = (triton.cdiv(num_pixels, LAUNCH["pixels"]),)
        _interpolate_backward_kernel[grid](
            attr, rast, tri, rast if rast_db is None else rast_db, tri if diff is None else diff,
            grad_out.contiguous(), grad_da.contiguous() if num_diff else grad_out,
            attr if grad_attr is None else grad_attr, rast if grad_rast is None else grad_rast,
            rast if grad_db is None else grad_db,
            num_pixels, tri.shape[0], attr.shape[-2], height * width, channels, num_diff,
            ATTR_BATCHED=ctx.batched, BLOCK=LAUNCH["pixels"], num_warps=LAUNCH["warps"],
            CHANNELS=triton.next_power_of_2(channels),
            DIFF=triton.next_power_of_2(num_diff) if num_diff else 0,
            NEED_ATTR=need_attr, NEED_RAST=need_rast, NEED_DB=need_db)
        return grad_attr, grad_rast, None, grad_db, None


def interpolate(
    attr: Tensor,  # [B, V, C], [1, V, C] or [V, C] (range mode)
    rast: Tensor,  # [B, H, W, 4]
    tri: Tensor,  # [F, 3] int32
    rast_db: Optional[Tensor] = None,  # [B, H, W, 4]
    diff_attrs: Union[None, str, Sequence[int]] = None,
) -> Tuple[Tensor, Tensor]:  # out [B, H, W, C], out_da [B, H, W, 2K]
    """See `pipeline.render.Rasterizer.interpolate` for the contract; the torch backend's results.
    Pixels whose triangle id is beyond ``tri`` (rast of another mesh) get zeros."""
    channels = attr.shape[-1]
    diff = None
    if diff_attrs is not None:
        index = list(range(channels)) if diff_attrs == "all" else [int(i) for i in diff_attrs]
        if any(i < 0 or i >= channels for i in index):
            raise ValueError(f"diff_attrs {index} name channels outside the {channels} of attr")
        if index:
            diff = torch.tensor(index, dtype=torch.int32, device=attr.device)
    if rast.numel() * max(channels, 2 * len(diff) if diff is not None else 0) // 4 > INDEX_LIMIT:
        raise ValueError("too many pixels x channels for one triton interpolate call: render fewer views at a time")
    return _Interpolate.apply(attr.contiguous(), rast.contiguous(), tri.contiguous(),
                              None if rast_db is None or diff is None else rast_db.contiguous(), diff)
