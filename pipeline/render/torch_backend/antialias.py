"""Analytic silhouette anti-aliasing in pure PyTorch (nvdiffrast's `antialias`).

Laine et al. 2020, "Modular Primitives for High-Performance Differentiable Rendering", section on
analytic antialiasing. Every pair of horizontally or vertically adjacent pixels that show
different triangles (or a triangle and the background) is examined. The nearer of the two
triangles (the only one if the other pixel is background) is the pair's front triangle; of its
edges that cross the line through the two pixel centres, the one crossing farthest towards the
other pixel is taken. If that edge is a silhouette, is at least as perpendicular to the pair as
it is parallel, and crosses within (a 1/16-pixel tolerance of) the segment between the two
centres, the pixel whose half of the segment holds the crossing moves its colour towards the
other pixel's by the crossing's distance from the midpoint. The blend weight is a function of the
edge's two clip-space vertices, which is what gives `pos` gradients from coverage.

Decisions (which pairs, which edge) are made without autograd, with nvdiffrast's float32
expressions in its order of operations, so they agree with its CUDA kernels up to the GPU's
rounding; only the blend of the selected pairs is built with autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .gather import take_rows
from .rasterize import decode_triangle_ids

# An edge may cross up to 1/16 pixel outside the segment between the pixel centres: coverage was
# decided with vertices snapped to 1/16 pixel, the crossing is computed from unsnapped ones.
CROSSING_TOLERANCE = 1.0 / 16.0
# nvdiffrast differentiates the crossing with 1 / (dy + 1e-3 sign(dy)) (dy: the edge's extent
# across the pair, in pixels) so that tiny edges cannot produce huge gradients.
GRAD_DY_EPS = 1e-3


def antialias(
    color: Tensor,  # [B, H, W, C] float32 shaded image
    rast: Tensor,  # [B, H, W, 4] (u, v, z/w, triangle_id + 1) from rasterize
    pos: Tensor,  # [B, V, 4] clip-space positions (instanced), or [V, 4] (range mode)
    tri: Tensor,  # [F, 3] int32 vertex indices
) -> Tensor:  # [B, H, W, C]
    """Blend colours across silhouette edges by their analytic pixel coverage.

    Conventions: pixel (row i, column j) has its centre at x/w = 2 (j + 0.5) / W - 1,
    y/w = 2 (i + 0.5) / H - 1, as in `rasterize`. An edge is a silhouette when it belongs to only
    one triangle, or when its two triangles face opposite ways on screen (the winged triangle
    formed with the neighbour's opposite vertex has the same orientation as the triangle itself).
    Adjacency comes from vertex indices in ``tri``: triangles meet only where they share indices.
    An edge shared by more than two triangles pairs the first two distinct opposite vertices in
    triangle order (nvdiffrast keeps whichever two its hash insertions see first); every further
    triangle treats it as a silhouette.

    Only ``color`` values change; pixels that are not next to a blended silhouette crossing keep
    their colour exactly. Exactly 45-degree edges are blended by both horizontal and vertical
    pairs, as in nvdiffrast. Only the edges of the triangle covering a pixel centre are examined,
    so a silhouette reached across sub-pixel triangles is not blended (nvdiffrast's limitation too).

    Differentiable w.r.t. ``color`` (the output is linear in it) and ``pos`` (through the crossing
    position of each blended edge; zero where the crossing was clamped to a pixel centre). The
    ``pos`` gradient uses nvdiffrast's regularised derivative (see `GRAD_DY_EPS`), so it matches its
    kernel rather than the exact derivative for edges spanning only thousandths of a pixel.
    ``rast`` receives no gradient.
    """
    batch, height, width, channels = color.shape
    instanced = pos.dim() == 3
    num_verts = pos.shape[-2]
    tri_l = tri.long()

    # Vertex positions in pixels from the viewport centre, in nvdiffrast's float order.
    inv_w = 1.0 / pos[..., 3]
    half_w, half_h = 0.5 * width, 0.5 * height
    screen = torch.stack([pos[..., 0] * inv_w * half_w, pos[..., 1] * inv_w * half_h], -1).reshape(-1, 2)

    with torch.no_grad():
        sel = _select_pairs(rast.detach(), screen.detach(), tri_l, batch, height, width, num_verts, instanced)
    pixel0, pixel1, target, alpha, vert_a, vert_b, centre, down, needs_grad = sel

    # Blend weight with a gradient: alpha = ds (0.5 - ds x) = const - x, x being the edge's crossing
    # along the pair, relative to the front pixel's centre. Its value is the one computed above; the
    # added term is zero-valued and carries nvdiffrast's (regularised) derivative of -x.
    idx = torch.nonzero(needs_grad).squeeze(1)
    rel_a = take_rows(screen, vert_a[idx]) - centre[idx]  # [G, 2]
    rel_b = take_rows(screen, vert_b[idx]) - centre[idx]
    flip = down[idx, None]
    x1, y1 = torch.where(flip, rel_a.flip(1), rel_a).unbind(1)  # x along the pair, y across it
    x2, y2 = torch.where(flip, rel_b.flip(1), rel_b).unbind(1)
    dx, dy = x2 - x1, y2 - y1
    crossing = (x1 * dy - y1 * dx) / (dy + torch.copysign(torch.full_like(dy, GRAD_DY_EPS), dy.detach()))
    alpha = alpha.index_add(0, idx, crossing.detach() - crossing)

    flat = color.reshape(-1, channels)
    delta = alpha[:, None] * (take_rows(flat, pixel1) - take_rows(flat, pixel0))
    return flat.index_add(0, target, delta).reshape(batch, height, width, channels)


def _select_pairs(
    rast: Tensor,  # [B, H, W, 4]
    screen: Tensor,  # [B * V, 2] or [V, 2] vertex positions in pixels from the viewport centre
    tri: Tensor,  # [F, 3] int64
    batch: int,
    height: int,
    width: int,
    num_verts: int,
    instanced: bool,
):
    """The pixel pairs to blend, each with (pixel0 [M], pixel1 [M], modified pixel [M], alpha [M],
    edge start vertex [M], edge end vertex [M], front pixel centre [M, 2], vertical pair [M],
    gradient flows [M]); vertices index rows of ``screen``, pixels index B*H*W."""
    num_tris = tri.shape[0]
    ids = _triangle_ids(rast[..., 3])  # [B, H, W], -1 = background
    depth = rast[..., 2].reshape(-1)

    # Adjacent pixels with different ids: right neighbours, then lower ones (row + 1).
    pairs = []
    for step, vertical in ((1, False), (width, True)):
        diff = ids[:, 1:] != ids[:, :-1] if vertical else ids[:, :, 1:] != ids[:, :, :-1]
        b, i, j = torch.nonzero(diff, as_tuple=True)
        p0 = (b * height + i) * width + j
        pairs.append((p0, p0 + step, torch.full_like(p0, vertical, dtype=torch.bool)))
    pixel0, pixel1, down = (torch.cat(parts) for parts in zip(*pairs))
    ids = ids.reshape(-1)
    tri0, tri1 = ids[pixel0], ids[pixel1]

    # Front triangle: the one that is not background, else the nearer (ties: pixel1's).
    use1 = (tri0 < 0) | ((tri1 >= 0) & ~(depth[pixel0] < depth[pixel1]))
    front = torch.where(use1, tri1, tri0)
    keep = torch.nonzero(front < num_tris).squeeze(1)  # ids beyond F: rast from another mesh
    pixel0, pixel1, down, use1, front = pixel0[keep], pixel1[keep], down[keep], use1[keep], front[keep]

    # Work relative to the centre of the front triangle's pixel, ds = -1 when that is pixel1.
    pix = torch.where(use1, pixel1, pixel0)
    ds = 1.0 - 2.0 * use1.to(screen.dtype)
    image = pix // (height * width)
    col = pix % width
    row = (pix // width) % height
    centre = torch.stack(
        [col.to(screen.dtype) + 0.5 - 0.5 * width, row.to(screen.dtype) + 0.5 - 0.5 * height], 1
    )  # [N, 2]

    verts = tri[front]  # [N, 3]
    if instanced:
        verts = verts + (image * num_verts)[:, None]
    rel = screen[verts] - centre[:, None]  # [N, 3, 2]
    x, y = rel.unbind(2)
    bb = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])

    # Edge k runs from vertex k+1 to vertex k+2. "along" is the pair's axis, "across" the other.
    along = torch.where(down[:, None], y, x)
    across = torch.where(down[:, None], x, y)
    xa, xb = along.roll(-1, 1), along.roll(-2, 1)
    ya, yb = across.roll(-1, 1), across.roll(-2, 1)
    dx, dy = xb - xa, yb - ya
    # Crossing with the pair's line at num / den, measured from the front pixel towards the other.
    # An edge with both ends on one side misses the line; sides go by sign bit, as in nvdiffrast.
    num = ds[:, None] * (xa * dy - ya * dx)
    misses = torch.signbit(ya) == torch.signbit(yb)
    num = torch.where(misses, torch.full_like(num, -torch.finfo(num.dtype).max), num)
    den = torch.where(misses, torch.ones_like(dy), dy)
    edge = _max_ratio3(num, den)  # [N] the farthest crossing

    e = edge[:, None]
    num, den, dx = num.gather(1, e)[:, 0], den.gather(1, e)[:, 0], dx.gather(1, e)[:, 0]
    start, end = (edge + 1) % 3, (edge + 2) % 3
    # Winged triangle: the front triangle with the edge's opposite vertex replaced by the
    # neighbour's. A boundary edge keeps the vertex itself: the wing is the triangle, a silhouette.
    opposite = _opposite_vertices(tri)[front, edge]
    own = tri[front, edge]
    other = torch.where(opposite >= 0, opposite, own)
    if instanced:
        other = other + image * num_verts
    o = screen[other] - centre  # [N, 2]
    xs, ys = x.gather(1, start[:, None])[:, 0], y.gather(1, start[:, None])[:, 0]
    xe, ye = x.gather(1, end[:, None])[:, 0], y.gather(1, end[:, None])[:, 0]
    wing = (xs - o[:, 0]) * (ye - o[:, 1]) - (xe - o[:, 0]) * (ys - o[:, 1])
    silhouette = torch.signbit(wing) == torch.signbit(bb)

    dc = num / den  # the crossing's distance from the front pixel's centre, in pixels
    steep = den.abs() >= dx.abs()  # at least as perpendicular to the pair as parallel
    hit = silhouette & steep & (dc > -CROSSING_TOLERANCE) & (dc < 1.0 + CROSSING_TOLERANCE)
    sel = torch.nonzero(hit).squeeze(1)
    dc, ds = dc[sel].clamp(0.0, 1.0), ds[sel]
    alpha = ds * (0.5 - dc)
    pixel0, pixel1 = pixel0[sel], pixel1[sel]
    target = torch.where(alpha > 0, pixel0, pixel1)
    vert_a = verts[sel].gather(1, start[sel, None])[:, 0]
    vert_b = verts[sel].gather(1, end[sel, None])[:, 0]
    # A clamped crossing has no derivative. nvdiffrast's gradient pass also skips a crossing exactly
    # at the midpoint when alpha is +0.0 (its "not blended" marker; -0.0 from ds = -1 is kept): a
    # kink of the output, common with vertices on the pixel lattice, where any choice is arbitrary.
    needs_grad = (alpha.abs() < 0.5) & ((alpha != 0) | torch.signbit(alpha))
    return pixel0, pixel1, target, alpha, vert_a, vert_b, centre[sel], down[sel], needs_grad


def _max_ratio3(num: Tensor, den: Tensor) -> Tensor:  # [N, 3] each -> [N] int64
    """Index of the largest num/den per row, compared by cross-multiplication as nvdiffrast does
    (ties go to the lower index)."""

    def greater(i, j):  # num_i / den_i > num_j / den_j
        same = torch.signbit(den[:, i]) == torch.signbit(den[:, j])
        return (num[:, i] * den[:, j] > num[:, j] * den[:, i]) == same

    g10, g20, g21 = greater(1, 0), greater(2, 0), greater(2, 1)
    return torch.where(g20 & g21, 2, g10.long())


def _triangle_ids(channel: Tensor) -> Tensor:  # [...] float32 -> [...] int64, -1 = background
    """Decode rast's triangle_id + 1 channel (nvdiffrast stores ids above 2^24 as bit patterns)."""
    return decode_triangle_ids(channel) - 1


def _opposite_vertices(tri: Tensor) -> Tensor:  # [F, 3] int64 -> [F, 3] int64
    """For edge k of each triangle (vertex k+1 to k+2), the opposite vertex of the adjacent
    triangle across it, or -1 on a boundary (or beyond the first two triangles of the edge)."""
    num_tris = tri.shape[0]
    ends_a, ends_b = tri.roll(-1, 1), tri.roll(-2, 1)
    key = (torch.minimum(ends_a, ends_b) << 32) | torch.maximum(ends_a, ends_b)  # [F, 3]
    # Triangles with a repeated or negative index have no area and join no edge.
    valid = (tri >= 0).all(1) & (tri[:, 0] != tri[:, 1]) & (tri[:, 1] != tri[:, 2]) & (tri[:, 2] != tri[:, 0])
    half = torch.nonzero(valid[:, None].expand(-1, 3).reshape(-1)).squeeze(1)  # half-edges in tri order
    key, own = key.reshape(-1)[half], tri.reshape(-1)[half]
    key, order = torch.sort(key, stable=True)
    own, half = own[order], half[order]

    # Per edge, the first two distinct opposite vertices in triangle order; each names the other.
    n = key.numel()
    first = torch.ones(n, dtype=torch.bool, device=tri.device)
    first[1:] = key[1:] != key[:-1]
    group = torch.cumsum(first, 0) - 1
    slot0 = own[torch.nonzero(first).squeeze(1)][group]
    position = torch.arange(n, device=tri.device)
    candidate = torch.where(own != slot0, position, n)
    second = torch.full((int(first.sum()),), n, dtype=torch.long, device=tri.device)
    second = second.scatter_reduce(0, group, candidate, reduce="amin")[group]
    slot1 = torch.where(second < n, own[second.clamp(max=max(n - 1, 0))], -1)

    other = torch.where(own == slot0, slot1, torch.where(own == slot1, slot0, -1))
    result = torch.full((num_tris * 3,), -1, dtype=torch.long, device=tri.device)
    return result.index_put((half,), other).view(num_tris, 3)
