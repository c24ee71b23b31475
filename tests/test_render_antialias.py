"""The torch antialias op against geometry we can compute by hand."""

import numpy as np
import pytest
import torch

from pipeline.render import Rasterizer

R = Rasterizer(backend="torch", device="cpu")
ONE_TRI = torch.tensor([[0, 1, 2]], dtype=torch.int32)


def _clip(xy, z=0.0, w=1.0):  # NDC [V, 2] -> clip [V, 4] (x, y, z scaled by w)
    xy = np.asarray(xy, dtype=np.float64)
    w = np.broadcast_to(np.asarray(w, dtype=np.float64), (len(xy),))
    z = np.broadcast_to(np.asarray(z, dtype=np.float64), (len(xy),))
    return torch.tensor(np.column_stack([xy * w[:, None], z * w, w]), dtype=torch.float32)


def _on_grid(ndc, height, width):
    """NDC [V, 2] moved to the nearest 1/16-pixel grid point. The rasterizer decides coverage with
    vertices snapped to that grid while antialias uses them unsnapped; where an edge passes within
    the snapping error of a pixel centre the two disagree, the crossing is clamped and (as in
    nvdiffrast) that pixel pair gives no gradient. Edges with a near-rational slope do that every
    few rows and would bias the gradient by several percent; on-grid vertices do not."""
    scale = np.array([width, height]) * 8.0  # NDC to 1/16 pixels
    return np.round(np.asarray(ndc, dtype=np.float64) * scale) / scale


def _pixels(pos, height, width):  # clip [V, 4] -> pixel coordinates [V, 2] (x = column, y = row)
    p = pos.detach().double().numpy()
    return np.column_stack([(p[:, 0] / p[:, 3] + 1) * width / 2, (p[:, 1] / p[:, 3] + 1) * height / 2])


def _area_gradient(px):  # [3, 2] pixel coords -> d(area in pixels) / d(vertex pixel coords) [3, 2]
    grad = np.zeros((3, 2))
    for k in range(3):
        a, b = px[(k + 1) % 3], px[(k + 2) % 3]
        normal = np.array([b[1] - a[1], a[0] - b[0]])  # |normal| = |opposite edge|
        if normal @ (px[k] - a) < 0:
            normal = -normal  # pointing towards vertex k: moving it that way grows the area
        grad[k] = 0.5 * normal
    return grad


def _outline_gradient(px, weights):
    """Gradient of the weighted area inside polygon px [n, 2] (pixel coords) w.r.t. its vertices,
    edge i (vertex i to i + 1) weighted by weights[i]: each edge's outward normal, scaled by its
    length, is shared half and half by its two ends (for a triangle with weights 1 this is
    `_area_gradient`)."""
    n = len(px)
    orientation = np.sign(sum(px[i, 0] * px[(i + 1) % n, 1] - px[(i + 1) % n, 0] * px[i, 1] for i in range(n)))
    grad = np.zeros((n, 2))
    for i in range(n):
        e = px[(i + 1) % n] - px[i]
        outward = orientation * np.array([e[1], -e[0]])
        grad[i] += 0.5 * weights[i] * outward
        grad[(i + 1) % n] += 0.5 * weights[i] * outward
    return grad


def _pixel_gradient(pos, grad, height, width):  # dL/d(clip x, y) -> dL/d(pixel x, y) [V, 2]
    w = pos[:, 3:].double().numpy()
    return grad[:, :2].double().numpy() * w * np.array([2.0 / width, 2.0 / height])


def _flat_colors(rast, colors):  # rast [B, H, W, 4], colors [F + 1, C] (row 0 = background)
    return colors[rast[..., 3].long()]


def _edge_distance(px, height, width):  # [H, W] distance in pixels from each pixel centre to the triangle's edges
    cy, cx = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    q = np.stack([cx, cy], -1)
    dist = np.full((height, width), np.inf)
    for k in range(3):
        a, b = px[k], px[(k + 1) % 3]
        t = np.clip(((q - a) @ (b - a)) / ((b - a) @ (b - a)), 0, 1)
        dist = np.minimum(dist, np.linalg.norm(q - (a + t[..., None] * (b - a)), axis=-1))
    return dist


# --------------------------------------------------------------------------- unchanged images


def test_full_screen_quad_is_unchanged():
    # Two triangles share the diagonal (an interior edge); the outer edges are off screen.
    pos = _clip([[-1.5, -1.5], [1.5, -1.5], [1.5, 1.5], [-1.5, 1.5]], z=[0.1, 0.2, 0.3, 0.2])
    tri = torch.tensor([[0, 1, 2], [0, 2, 3]], dtype=torch.int32)
    rast, _ = R.rasterize(pos[None], tri, (48, 64))
    assert set(rast[..., 3].unique().tolist()) == {1.0, 2.0}
    color = torch.rand(1, 48, 64, 3)
    pos_var = pos[None].clone().requires_grad_(True)
    color_var = color.clone().requires_grad_(True)
    out = R.antialias(color_var, rast, pos_var, tri)
    assert torch.equal(out, color)
    upstream = torch.rand_like(out)
    (out * upstream).sum().backward()
    assert torch.equal(color_var.grad, upstream)
    assert pos_var.grad is None or not pos_var.grad.any()


def test_pixels_far_from_edges_are_unchanged():
    height, width = 64, 80
    pos = _clip([[-0.8, -0.7], [0.75, -0.35], [-0.1, 0.8]])
    rast, _ = R.rasterize(pos[None], ONE_TRI, (height, width))
    color = torch.rand(1, height, width, 4)
    out = R.antialias(color, rast, pos[None], ONE_TRI)
    changed = (out != color).any(-1)[0].numpy()
    dist = _edge_distance(_pixels(pos, height, width), height, width)
    assert changed.sum() > 50  # the silhouette is blended ...
    # ... and nothing else: a blended pixel is the one of its pair whose half holds the edge
    # crossing, so its centre is within half a pixel (+ the 1/16 pixel tolerance) of an edge.
    assert not changed[dist > 0.5 + 1 / 16].any()


@pytest.mark.parametrize("vertical_edge, inside_before", [(True, True), (True, False), (False, True), (False, False)])
def test_straight_edge_blends_by_pixel_coverage(vertical_edge, inside_before):
    # One edge crosses the whole image at 10.3 pixels (a column or a row); the other two are off
    # screen. The pixels it cuts take the colour weighted by the part of their footprint inside.
    height, width = 24, 28
    edge, across = 10.3, [-60.0, 90.0]
    far = -80.0 if inside_before else 100.0
    px = np.array([[edge, across[0]], [edge, across[1]], [far, 0.5 * sum(across)]])
    if not vertical_edge:
        px = px[:, ::-1]
    ndc = px / np.array([width, height]) * 2 - 1
    pos = _clip(ndc)[None]
    rast, _ = R.rasterize(pos, ONE_TRI, (height, width))
    color = (rast[..., 3:] > 0).float()
    out = R.antialias(color, rast, pos, ONE_TRI)[0, ..., 0]
    if not vertical_edge:
        out, color = out.T, color[0, ..., 0].T
    else:
        color = color[0, ..., 0]
    cut = int(edge)  # the pixel whose footprint [10, 11] holds the edge
    inside = edge - cut if inside_before else cut + 1 - edge
    assert torch.allclose(out[:, cut], torch.full_like(out[:, cut], inside), atol=1e-5)
    others = torch.arange(out.shape[1]) != cut
    assert torch.equal(out[:, others], color[:, others])


# --------------------------------------------------------------------------- coverage gradients

# NDC vertices and w per vertex, put on the 1/16-pixel grid by `_on_grid` in the tests.
TRIANGLES = [
    ([[-0.8137, -0.6921], [0.7468, -0.3553], [-0.1042, 0.8179]], 1.0),
    ([[0.6893, 0.6127], [-0.6212, 0.2874], [0.1931, -0.7468]], 1.0),
    ([[-0.5179, -0.8066], [0.8413, 0.1127], [-0.7062, 0.5481]], [1.5, 0.8, 2.5]),
    ([[0.0473, -0.8861], [0.6148, 0.7024], [-0.7931, 0.1868]], [0.7, 1.3, 1.0]),
]


@pytest.mark.parametrize("ndc, w", TRIANGLES)
def test_coverage_gradient_matches_area_derivative(ndc, w):
    # Antialiased coverage sums to the triangle's area; its gradient is the area's derivative.
    height, width = 144, 160
    pos = _clip(_on_grid(ndc, height, width), z=0.2, w=w)[None].requires_grad_(True)
    rast, _ = R.rasterize(pos, ONE_TRI, (height, width))
    color = (rast[..., 3:] > 0).float()  # constant colour: no gradient except through antialias
    out = R.antialias(color, rast, pos, ONE_TRI)
    out.sum().backward()
    px = _pixels(pos[0], height, width)
    e1, e2 = px[1] - px[0], px[2] - px[0]
    area = 0.5 * abs(e1[0] * e2[1] - e1[1] * e2[0])
    assert abs(out.sum().item() - area) <= 2.0  # the aliased count is off by up to a few pixels
    expected = _area_gradient(px)
    got = _pixel_gradient(pos[0].detach(), pos.grad[0], height, width)
    for k in range(3):  # every vertex, every direction: error within 5% of the derivative's size
        assert np.linalg.norm(got[k] - expected[k]) <= 0.05 * np.linalg.norm(expected[k]), (k, got[k], expected[k])
    # Scaling a vertex's (x, y, z, w) together does not move it on screen: the w gradient agrees.
    g = pos.grad[0].double()
    p = pos[0].detach().double()
    along_ray = (g * p).sum(1)
    assert along_ray.abs().max() <= 1e-4 * (g[:, :2] * p[:, :2]).abs().sum(1).max()
    assert g[:, 2].abs().max() == 0  # depth only selects triangles


def _weighted_loss(pos, tri, colors, weight, resolution):
    rast, _ = R.rasterize(pos, tri, resolution)
    return (R.antialias(_flat_colors(rast, colors), rast, pos, tri) * weight).sum()


def test_position_gradient_matches_finite_differences():
    # A triangle well inside a larger one behind it, on the background: flat colours, so the output
    # is continuous in the vertex positions and the loss is piecewise linear at the pixel scale.
    height, width = 96, 112
    pos = torch.cat(
        [
            _clip(_on_grid([[-0.45, -0.4], [0.45, -0.25], [-0.05, 0.45]], height, width), z=-0.2, w=[1.0, 1.4, 0.8]),
            _clip(_on_grid([[-0.85, -0.8], [0.8, -0.7], [0.1, 0.85]], height, width), z=0.3),
        ]
    )[None]
    tri = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    colors = torch.tensor([[0.0, 0.1], [1.0, 0.3], [0.4, 0.9]])
    cy, cx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    weight = torch.stack([1 + cx, 2 - cy * cx], -1)[None]  # smooth: kinks barely change the slope

    var = pos.clone().requires_grad_(True)
    _weighted_loss(var, tri, colors, weight, (height, width)).backward()
    grad = var.grad[0][:, [0, 1, 3]].double()  # (x, y, w); z has no gradient

    rng = np.random.default_rng(0)
    step = 1.0 / width  # half a pixel in NDC: the central difference spans a pixel of kinks
    for v in range(6):
        for direction in rng.normal(size=(2, 3)):
            direction /= np.linalg.norm(direction)
            delta = torch.zeros(1, 6, 4)
            delta[0, v, [0, 1, 3]] = torch.tensor(direction * step, dtype=torch.float32)
            fd = (
                _weighted_loss(pos + delta, tri, colors, weight, (height, width)).item()
                - _weighted_loss(pos - delta, tri, colors, weight, (height, width)).item()
            ) / (2 * step)
            analytic = float(grad[v] @ torch.from_numpy(direction))
            assert abs(fd - analytic) <= 0.05 * grad[v].norm().item(), (v, direction, fd, analytic)


def test_color_gradient_is_the_transposed_blend():
    height, width = 32, 40
    pos = _clip([[-0.8, -0.7], [0.75, -0.35], [-0.1, 0.8]])[None]
    rast, _ = R.rasterize(pos, ONE_TRI, (height, width))
    color = torch.rand(1, height, width, 2, requires_grad=True)
    weight = torch.rand(1, height, width, 2)
    out = R.antialias(color, rast, pos, ONE_TRI)
    (out * weight).sum().backward()
    # The output is linear in color: probe it with one-hot images at blended pixels, at their
    # neighbours (whose colours they mix in) and at an untouched pixel.
    blended = torch.nonzero((out != color).any(-1)[0])[::7]
    probes = [(int(i), int(j)) for i, j in blended] + [(int(i), int(j) + 1) for i, j in blended] + [(0, 0)]
    assert len(blended) >= 5
    probe = torch.zeros_like(color)
    for i, j in probes:
        for c in range(2):
            probe.zero_()
            probe[0, i, j, c] = 1.0
            response = (R.antialias(probe, rast, pos, ONE_TRI) * weight).sum()
            assert torch.isclose(response, color.grad[0, i, j, c], atol=1e-6)


# --------------------------------------------------------------------------- depth and topology


@pytest.mark.parametrize("small_in_front", [True, False])
def test_only_the_nearer_triangles_edges_blend(small_in_front):
    # A small triangle inside a large one. In front, its edges blend against the large one with
    # the colour difference and the large one's vertices only feel its own outline; behind, it is
    # invisible and receives nothing.
    height, width = 128, 144
    small_z, large_z = (-0.3, 0.4) if small_in_front else (0.4, -0.3)
    pos = torch.cat(
        [
            _clip(_on_grid([[-0.4, -0.35], [0.45, -0.1], [-0.05, 0.5]], height, width), z=small_z),
            _clip(_on_grid([[-0.9, -0.85], [0.85, -0.8], [0.0, 0.9]], height, width), z=large_z),
        ]
    )[None].requires_grad_(True)
    tri = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    colors = torch.tensor([[0.0], [1.0], [0.25]])  # background, small, large
    rast, _ = R.rasterize(pos, tri, (height, width))
    color = _flat_colors(rast, colors)
    out = R.antialias(color, rast, pos, tri)
    out.sum().backward()
    got = _pixel_gradient(pos[0].detach(), pos.grad[0], height, width)
    px = _pixels(pos[0], height, width)
    large = _area_gradient(px[3:]) * 0.25  # the large outline against the background
    if small_in_front:
        small = _area_gradient(px[:3]) * (1.0 - 0.25)
        for k in range(3):
            assert np.linalg.norm(got[k] - small[k]) <= 0.05 * np.linalg.norm(small[k])
    else:
        assert not pos.grad[0, :3].any()
        assert torch.equal(rast[..., 3] == 1, torch.zeros_like(rast[..., 3], dtype=torch.bool))
    for k in range(3):
        assert np.linalg.norm(got[3 + k] - large[k]) <= 0.05 * np.linalg.norm(large[k])


def _quad_scene(tri, pos, colors, height, width):  # -> flat colours, antialiased, pos gradient of the sum
    rast, _ = R.rasterize(pos[None], tri, (height, width))
    color = _flat_colors(rast, colors)
    var = pos[None].clone().requires_grad_(True)
    out = R.antialias(color, rast, var, tri)
    out.sum().backward()
    return color, out, var.grad[0]


def _near_segment(a, b, height, width, within=1.0, margin=0.2):
    """Pixel centres within `within` pixels of the segment a-b (pixel coords), excluding its ends."""
    cy, cx = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    q = np.stack([cx, cy], -1)
    t = ((q - a) @ (b - a)) / ((b - a) @ (b - a))
    dist = np.linalg.norm(q - (a + np.clip(t, 0, 1)[..., None] * (b - a)), axis=-1)
    return (dist <= within) & (t > margin) & (t < 1 - margin)


def test_interior_edge_of_a_mesh_does_not_blend():
    height = width = 96
    corners = _on_grid([[-0.7, -0.6], [0.65, -0.7], [0.7, 0.6], [-0.6, 0.7]], height, width)
    colors = torch.tensor([[0.0], [1.0], [0.4]])  # background and the two halves: a blend would show
    px = _pixels(_clip(corners), height, width)
    diagonal = _near_segment(px[0], px[2], height, width)
    # Coverage gradient of the outline: edges 0-1, 1-2 border the first half, 2-3, 3-0 the second.
    outline = _outline_gradient(px, [1.0, 1.0, 0.4, 0.4])

    # Shared vertex indices: the diagonal lies between two front-facing triangles.
    pos = _clip(corners, z=0.1)
    color, out, grad = _quad_scene(torch.tensor([[0, 1, 2], [0, 2, 3]], dtype=torch.int32), pos, colors, height, width)
    assert torch.equal(out[0, ..., 0][diagonal], color[0, ..., 0][diagonal])
    got = _pixel_gradient(pos, grad, height, width)
    for k in range(4):
        assert np.linalg.norm(got[k] - outline[k]) <= 0.05 * np.linalg.norm(outline[k])

    # The same geometry with the diagonal's vertices duplicated (4 = 0, 5 = 2): now the diagonal is a
    # boundary of both halves and blends, and moving it trades one half's colour for the other's.
    pos_split = torch.cat([pos, pos[[0, 2]]])
    tri_split = torch.tensor([[0, 1, 2], [4, 5, 3]], dtype=torch.int32)
    color, out, grad = _quad_scene(tri_split, pos_split, colors, height, width)
    changed = out[0, ..., 0][diagonal] != color[0, ..., 0][diagonal]
    assert changed.sum() >= 0.25 * diagonal.sum()  # about one pixel per column of the 2-pixel band
    per_vertex = _pixel_gradient(pos_split, grad, height, width)
    got = per_vertex[:4].copy()
    got[[0, 2]] += per_vertex[[4, 5]]
    seam = _outline_gradient(px[[0, 1, 2]], [0.0, 0.0, 1.0 - 0.4])  # the first half's side of it
    expected = outline.copy()
    expected[[0, 2]] += seam[[0, 2]]
    for k in range(4):
        assert np.linalg.norm(got[k] - expected[k]) <= 0.05 * np.linalg.norm(expected[k])


def test_folded_shared_edge_is_a_silhouette():
    # Two triangles share edge 0-1 with both opposite vertices on the same side: one faces away,
    # so the shared edge is a silhouette although its indices are shared.
    height = width = 64
    pos = _clip([[-0.7, -0.5], [0.7, -0.4], [0.1, 0.8], [-0.2, 0.5]], z=[0.0, 0.0, 0.3, -0.3])
    tri = torch.tensor([[0, 1, 2], [1, 0, 3]], dtype=torch.int32)
    colors = torch.tensor([[0.0], [1.0], [0.5]])
    color, out, grad = _quad_scene(tri, pos, colors, height, width)
    px = _pixels(pos, height, width)
    edge = _near_segment(px[0], px[1], height, width)
    assert (out[0, ..., 0][edge] != color[0, ..., 0][edge]).sum() >= 0.25 * edge.sum()
    assert grad[0, 1].abs() > 0 and grad[1, 1].abs() > 0  # the edge's vertices move the coverage


# --------------------------------------------------------------------------- range mode


def test_range_mode_matches_instanced_mode():
    height, width = 48, 56
    pos = torch.cat(
        [
            _clip([[-0.8, -0.7], [0.75, -0.35], [-0.1, 0.8]], z=0.1, w=[1.0, 1.3, 0.9]),
            _clip([[-0.3, -0.9], [0.9, 0.2], [0.2, 0.6]], z=-0.2),
        ]
    )
    tri = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    colors = torch.tensor([[0.0, 0.2], [1.0, 0.5], [0.3, 0.9]])
    weight = torch.rand(2, height, width, 2)

    # Range mode: image 0 draws both triangles, image 1 only the second.
    shared = pos.clone().requires_grad_(True)
    ranges = torch.tensor([[0, 2], [1, 1]], dtype=torch.int32)
    rast, _ = R.rasterize(shared, tri, (height, width), ranges=ranges)
    out_ranged = R.antialias(_flat_colors(rast, colors), rast, shared, tri)
    (out_ranged * weight).sum().backward()

    # Instanced mode: the same two images, the first triangle pushed past the far plane in image 1.
    hidden = pos.clone()
    hidden[:3, 2] = 5.0 * hidden[:3, 3]
    per_image = torch.stack([pos, hidden]).requires_grad_(True)
    rast_inst, _ = R.rasterize(per_image, tri, (height, width))
    assert torch.equal(rast_inst, rast)
    out_inst = R.antialias(_flat_colors(rast, colors), rast, per_image, tri)
    (out_inst * weight).sum().backward()

    assert (out_ranged != _flat_colors(rast, colors)).any()
    assert torch.equal(out_ranged, out_inst)
    assert torch.allclose(shared.grad, per_image.grad.sum(0), rtol=1e-5, atol=1e-3)
