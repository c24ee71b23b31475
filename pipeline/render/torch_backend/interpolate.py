"""Attribute interpolation in pure PyTorch (nvdiffrast's `interpolate`)."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .gather import take_rows
from .rasterize import decode_triangle_ids


def interpolate(
    attr: Tensor,  # [B, V, C], [1, V, C] or [V, C] (range mode)
    rast: Tensor,  # [B, H, W, 4]
    tri: Tensor,  # [F, 3] int32
    rast_db: Optional[Tensor] = None,  # [B, H, W, 4]
    diff_attrs: Union[None, str, Sequence[int]] = None,
) -> Tuple[Tensor, Tensor]:  # out [B, H, W, C], out_da [B, H, W, 2K]
    """See `pipeline.render.Rasterizer.interpolate` for the contract."""
    batch, height, width, _ = rast.shape
    channels = attr.shape[-1]
    flat = rast.reshape(-1, 4)
    tri_id = decode_triangle_ids(flat[:, 3].detach())  # [P] id + 1, 0 = empty
    covered = torch.nonzero(tri_id > 0).squeeze(1)  # [N]
    vidx = tri.long()[tri_id[covered] - 1]  # [N, 3]
    if attr.dim() == 2:
        corners = take_rows(attr, vidx)  # [N, 3, C]
    elif attr.shape[0] == 1:
        corners = take_rows(attr[0], vidx)
    else:
        image = covered // (height * width)
        corners = take_rows(attr.reshape(-1, channels), image[:, None] * attr.shape[1] + vidx)
    u = flat[covered, 0:1]  # [N, 1]
    v = flat[covered, 1:2]
    a0, a1, a2 = corners.unbind(1)  # each [N, C]
    values = a2 + u * (a0 - a2) + v * (a1 - a2)

    pixels = batch * height * width
    out = torch.zeros(pixels, channels, dtype=attr.dtype, device=attr.device).index_put((covered,), values)
    out = out.view(batch, height, width, channels)

    if diff_attrs is None:
        return out, torch.zeros(batch, height, width, 0, dtype=attr.dtype, device=attr.device)
    channel_idx = list(range(channels)) if diff_attrs == "all" else [int(i) for i in diff_attrs]
    db = rast_db.reshape(-1, 4)[covered]  # [N, 4] = du/dX, du/dY, dv/dX, dv/dY
    dadu = (a0 - a2)[:, channel_idx]  # [N, K]
    dadv = (a1 - a2)[:, channel_idx]
    dadx = dadu * db[:, 0:1] + dadv * db[:, 2:3]
    dady = dadu * db[:, 1:2] + dadv * db[:, 3:4]
    derivs = torch.stack([dadx, dady], dim=2).reshape(-1, 2 * len(channel_idx))  # (dX, dY) per channel
    out_da = torch.zeros(pixels, derivs.shape[1], dtype=attr.dtype, device=attr.device).index_put((covered,), derivs)
    return out, out_da.view(batch, height, width, -1)
