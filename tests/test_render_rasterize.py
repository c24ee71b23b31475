"""The torch rasterizer against geometry we can compute by hand."""

import sys

import numpy as np
import pytest
import torch

from pipeline.render import Rasterizer
import pipeline.render.torch_backend  # noqa: F401  (registers the submodule below)

R = Rasterizer(backend="torch", device="cpu")


def _screen_area(tri_ndc, height, width):
    """Area in pixels of a triangle given in NDC [3, 2]."""
    p = tri_ndc * np.array([width / 2, height / 2])
    e1, e2 = p[1] - p[0], p[2] - p[0]
    return 0.5 * abs(e1[0] * e2[1] - e1[1] * e2[0])


def _clip(xy, z=0.0, w=1.0):  # NDC [V, 2] -> clip [V, 4] (x, y scaled by w)
    xy = np.asarray(xy, dtype=np.float64)
    w = np.broadcast_to(np.asarray(w, dtype=np.float64), (len(xy),))
    z = np.broadcast_to(np.asarray(z, dtype=np.float64), (len(xy),))
    return torch.tensor(np.column_stack([xy * w[:, None], z * w, w]), dtype=torch.float32)


@pytest.mark.parametrize("seed", range(6))
def test_triangle_coverage_matches_area(seed):
    rng = np.random.default_rng(seed)
    height, width = 96, 128
    ndc = rng.uniform(-0.95, 0.95, size=(3, 2))
    area = _screen_area(ndc, height, width)
    if area < 300:  # tiny triangles: 1% of their area is under one pixel
        ndc = ndc * 0 + np.array([[-0.9, -0.8], [0.85, -0.3], [-0.2, 0.9]])
        area = _screen_area(ndc, height, width)
    rast, _ = R.rasterize(_clip(ndc)[None], torch.tensor([[0, 1, 2]], dtype=torch.int32), (height, width))
    covered = int((rast[..., 3] > 0).sum())
    assert abs(covered - area) <= 0.01 * area


def test_quad_coverage_and_shared_edge_once():
    # A quad split along its diagonal: the union covers the analytic area, no pixel twice.
    height = width = 64
    quad = np.array([[-0.61, -0.47], [0.53, -0.59], [0.71, 0.66], [-0.43, 0.52]])
    pos = _clip(quad)
    tri = torch.tensor([[0, 1, 2], [0, 2, 3]], dtype=torch.int32)
    ranges = torch.tensor([[0, 1], [1, 1], [0, 2]], dtype=torch.int32)  # each half alone, then both
    rast, _ = R.rasterize(pos, tri, (height, width), ranges=ranges)
    cover = rast[..., 3] > 0
    both = cover[0].int() + cover[1].int()
    assert int(both.max()) == 1, "a pixel on the shared diagonal was drawn by both triangles"
    assert torch.equal(both > 0, cover[2])
    area = _screen_area(quad[[0, 1, 2]], height, width) + _screen_area(quad[[0, 2, 3]], height, width)
    assert abs(int(cover[2].sum()) - area) <= 0.01 * area


def test_fan_with_exact_ties_covers_each_pixel_once():
    # Vertices on pixel centres make edges pass exactly through pixel centres: the fill rule decides.
    height = width = 32
    centre = lambda i, j: (2 * (j + 0.5) / width - 1, 2 * (i + 0.5) / height - 1)  # noqa: E731
    ring = [centre(4, 4), centre(4, 16), centre(4, 27), centre(16, 27), centre(27, 27), centre(27, 16),
            centre(27, 4), centre(16, 4)]
    verts = np.array([centre(16, 16)] + ring)
    tri = torch.tensor([[0, 1 + k, 1 + (k + 1) % 8] for k in range(8)], dtype=torch.int32)
    ranges = torch.tensor([[k, 1] for k in range(8)], dtype=torch.int32)
    rast, _ = R.rasterize(_clip(verts), tri, (height, width), ranges=ranges)
    counts = (rast[..., 3] > 0).int().sum(0)
    assert int(counts.max()) == 1
    union, _ = R.rasterize(_clip(verts)[None], tri, (height, width))
    assert torch.equal(counts > 0, union[0, ..., 3] > 0)


def test_depth_order_independent_of_triangle_order():
    height = width = 32
    near = _clip([[-0.8, -0.8], [0.6, -0.8], [-0.8, 0.6]], z=-0.5)
    far = _clip([[-0.6, -0.6], [0.8, -0.6], [0.8, 0.8]], z=0.5)
    tri = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    for pos, near_id in ((torch.cat([near, far]), 1), (torch.cat([far, near]), 2)):
        rast, _ = R.rasterize(pos[None], tri, (height, width))
        ids = rast[0, ..., 3]
        # Pixel (row 12, col 12) is inside both triangles: the nearer one must win.
        assert int(ids[12, 12]) == near_id
        assert float(rast[0, 12, 12, 2]) == pytest.approx(-0.5, abs=1e-6)


def test_row_order_and_pixel_centres():
    # A triangle covering only the bottom-left corner in NDC lands in row 0 (nvdiffrast convention).
    rast, _ = R.rasterize(_clip([[-1, -1], [-0.5, -1], [-1, -0.5]])[None],
                          torch.tensor([[0, 1, 2]], dtype=torch.int32), (16, 16))
    cover = rast[0, ..., 3] > 0
    assert bool(cover[0, 0]) and not bool(cover[15, 0]) and not bool(cover[0, 15])
    # Pixel (0, 0) has its centre at NDC (-15/16, -15/16), i.e. (dx, dy) = (1/16, 1/16) from vertex 0
    # on legs of length 1/2: weights are v1 = 2 dx, v2 = 2 dy, v0 = 1 - 2 (dx + dy).
    u, v = float(rast[0, 0, 0, 0]), float(rast[0, 0, 0, 1])
    assert u == pytest.approx(0.75, abs=1e-6)
    assert v == pytest.approx(0.125, abs=1e-6)


def _perspective_plane(height=48, width=64):
    """A quad on a tilted 3D plane seen by a pinhole camera: clip-space pos and camera-space points."""
    cam = np.array([[-1.0, -0.8, 3.0], [1.2, -0.9, 5.0], [1.1, 0.9, 5.2], [-0.9, 1.0, 3.1]])
    # Planar: make the 4th point lie on the plane of the first three.
    n = np.cross(cam[1] - cam[0], cam[2] - cam[0])
    cam[3, 2] = cam[0, 2] - (n[0] * (cam[3, 0] - cam[0, 0]) + n[1] * (cam[3, 1] - cam[0, 1])) / n[2]
    focal = 1.5
    near, far = 0.5, 20.0
    clip = np.column_stack([
        focal * cam[:, 0], focal * cam[:, 1],
        (far + near) / (far - near) * cam[:, 2] - 2 * far * near / (far - near), cam[:, 2],
    ])
    return torch.tensor(clip, dtype=torch.float32), cam, focal


def test_perspective_correct_interpolation_is_exact():
    height, width = 48, 64
    pos, cam, focal = _perspective_plane(height, width)
    tri = torch.tensor([[0, 1, 2], [0, 2, 3]], dtype=torch.int32)
    rast, _ = R.rasterize(pos[None], tri, (height, width))
    out, _ = R.interpolate(torch.tensor(cam, dtype=torch.float32)[None], rast, tri)
    cover = rast[0, ..., 3] > 0
    # Ray through each pixel centre intersected with the plane gives the exact camera-space point.
    rows, cols = torch.nonzero(cover, as_tuple=True)
    ndc_x = (2 * (cols.double() + 0.5) / width - 1) / focal
    ndc_y = (2 * (rows.double() + 0.5) / height - 1) / focal
    n = np.cross(cam[1] - cam[0], cam[2] - cam[0])
    d = torch.stack([ndc_x, ndc_y, torch.ones_like(ndc_x)], 1)
    t = float(n @ cam[0]) / (d @ torch.tensor(n))
    expected = d * t[:, None]
    got = out[0][rows, cols].double()
    assert torch.allclose(got, expected, atol=1e-5 * float(expected.abs().max()), rtol=0)
    assert float(out[0][~cover].abs().max()) == 0.0


def test_rast_db_matches_neighbour_differences():
    height, width = 48, 64
    pos, _, _ = _perspective_plane(height, width)
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    rast, db = R.rasterize(pos[None], tri, (height, width))
    cover = rast[0, ..., 3] > 0
    inner = cover.clone()
    inner[1:-1, 1:-1] &= cover[:-2, 1:-1] & cover[2:, 1:-1] & cover[1:-1, :-2] & cover[1:-1, 2:]
    inner[[0, -1], :] = False
    inner[:, [0, -1]] = False
    uv = rast[0, ..., :2].double()
    du_dx = (uv[1:-1, 2:] - uv[1:-1, :-2]) / 2  # central differences, pixel units
    du_dy = (uv[2:, 1:-1] - uv[:-2, 1:-1]) / 2
    m = inner[1:-1, 1:-1]
    d = db[0, 1:-1, 1:-1].double()
    for got, want in ((d[..., 0], du_dx[..., 0]), (d[..., 1], du_dy[..., 0]),
                      (d[..., 2], du_dx[..., 1]), (d[..., 3], du_dy[..., 1])):
        assert torch.allclose(got[m], want[m], atol=2e-4, rtol=1e-2)


def test_position_gradients_match_finite_differences():
    height, width = 32, 40
    pos, cam, _ = _perspective_plane(height, width)
    tri = torch.tensor([[0, 1, 2], [0, 2, 3]], dtype=torch.int32)
    attr = torch.tensor([[0.2, 1.0], [0.9, -0.3], [0.4, 0.5], [-0.6, 0.8]], dtype=torch.float32)[None]
    weights = torch.rand(1, height, width, 2, generator=torch.Generator().manual_seed(0))

    def loss(p):
        rast, db = R.rasterize(p[None], tri, (height, width))
        out, da = R.interpolate(attr, rast, tri, rast_db=db, diff_attrs="all")
        return (out * weights).sum() + 0.1 * da.sum()

    p = pos.clone().requires_grad_(True)
    loss(p).backward()
    eps = 1e-3
    for vi in range(4):
        for ci in (0, 1, 3):
            # Coverage is piecewise constant: FD only sees the smooth interior part; compare with
            # the same coverage by keeping the perturbation tiny relative to a pixel.
            plus, minus = pos.clone(), pos.clone()
            plus[vi, ci] += eps
            minus[vi, ci] -= eps
            with torch.no_grad():
                r0, _ = R.rasterize(plus[None], tri, (height, width))
                r1, _ = R.rasterize(minus[None], tri, (height, width))
                if not torch.equal(r0[..., 3], r1[..., 3]):
                    continue
                fd = (loss(plus) - loss(minus)) / (2 * eps)
            assert float(p.grad[vi, ci]) == pytest.approx(float(fd), rel=2e-2, abs=2e-2)


def test_near_plane_triangles_are_culled_and_depth_range_clipped():
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    crossing = torch.tensor([[-0.5, -0.5, 0.0, 1.0], [0.5, -0.5, 0.0, 1.0], [0.0, 0.5, 0.0, -0.2]])
    rast, _ = R.rasterize(crossing[None], tri, (16, 16))
    assert int((rast[..., 3] > 0).sum()) == 0
    # z/w ramps from -2 to 2 across the triangle: only the part with |z/w| <= 1 is kept.
    ramp = torch.tensor([[-1.0, -1.0, -2.0, 1.0], [1.0, -1.0, 2.0, 1.0], [1.0, 1.0, 2.0, 1.0]])
    rast, _ = R.rasterize(ramp[None], tri, (32, 32))
    zw = rast[0, ..., 2][rast[0, ..., 3] > 0]
    assert float(zw.min()) >= -1 and float(zw.max()) <= 1
    cols = torch.nonzero(rast[0, ..., 3] > 0)[:, 1]
    assert int(cols.min()) >= 7 and int(cols.max()) <= 24  # the middle half of the columns


def test_chunking_gives_identical_output(monkeypatch):
    rng = np.random.default_rng(3)
    verts = torch.tensor(np.column_stack([rng.uniform(-1, 1, (300, 2)), rng.uniform(-0.9, 0.9, 300),
                                          np.ones(300)]), dtype=torch.float32)
    tri = torch.tensor(rng.integers(0, 300, (200, 3)), dtype=torch.int32)
    full, full_db = R.rasterize(verts[None].repeat(2, 1, 1), tri, (64, 64))
    monkeypatch.setattr(sys.modules["pipeline.render.torch_backend.rasterize"], "PAIR_BUDGET", 97)
    small, small_db = R.rasterize(verts[None].repeat(2, 1, 1), tri, (64, 64))
    assert torch.equal(full, small) and torch.equal(full_db, small_db)


def test_range_mode_equals_instanced_mode():
    rng = np.random.default_rng(5)
    verts = torch.tensor(np.column_stack([rng.uniform(-1, 1, (40, 2)), rng.uniform(-0.9, 0.9, 40),
                                          rng.uniform(0.8, 1.5, 40)]), dtype=torch.float32)
    tri = torch.tensor(rng.integers(0, 40, (30, 3)), dtype=torch.int32)
    inst, inst_db = R.rasterize(verts[None].repeat(2, 1, 1), tri, (24, 32))
    rng_, rng_db = R.rasterize(verts, tri, (24, 32), ranges=torch.tensor([[0, 30], [0, 30]], dtype=torch.int32))
    assert torch.equal(inst, rng_) and torch.equal(inst_db, rng_db)


def test_interpolate_derivatives_chain_rast_db():
    height, width = 48, 64
    pos, cam, _ = _perspective_plane(height, width)
    tri = torch.tensor([[0, 1, 2], [0, 2, 3]], dtype=torch.int32)
    rast, db = R.rasterize(pos[None], tri, (height, width))
    attr = torch.tensor(cam, dtype=torch.float32)[None]
    out, da = R.interpolate(attr, rast, tri, rast_db=db, diff_attrs=[0, 2])
    assert da.shape == (1, height, width, 4)
    cover = rast[0, ..., 3] > 0
    inner = cover[1:-1, 1:-1] & cover[1:-1, 2:] & cover[1:-1, :-2] & cover[2:, 1:-1] & cover[:-2, 1:-1]
    dz_dx = (out[0, 1:-1, 2:, 2] - out[0, 1:-1, :-2, 2]) / 2
    dx_dy = (out[0, 2:, 1:-1, 0] - out[0, :-2, 1:-1, 0]) / 2
    assert torch.allclose(da[0, 1:-1, 1:-1, 2][inner], dz_dx[inner], atol=1e-3, rtol=2e-2)
    assert torch.allclose(da[0, 1:-1, 1:-1, 1][inner], dx_dy[inner], atol=1e-3, rtol=2e-2)


def test_bad_inputs_are_clear_errors():
    pos = torch.zeros(1, 3, 4)
    with pytest.raises(TypeError, match="tri must be torch.int32"):
        R.rasterize(pos, torch.zeros(1, 3, dtype=torch.int64), (8, 8))
    with pytest.raises(ValueError, match=r"pos must be \[B, V, 4\]"):
        R.rasterize(torch.zeros(3, 4), torch.zeros(1, 3, dtype=torch.int32), (8, 8))
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        Rasterizer(backend="nvdiffrast", device="cpu")


def test_triangle_id_encoding_round_trips_above_float_precision():
    from pipeline.render.torch_backend.rasterize import decode_triangle_ids, encode_triangle_ids

    ids = torch.tensor([0, 1, 2**24 - 1, 2**24, 2**24 + 1, 2**24 + 7, 40_000_000])
    encoded = encode_triangle_ids(ids)
    assert encoded.dtype == torch.float32
    assert torch.equal(decode_triangle_ids(encoded), ids)
    assert float(encoded[2]) == 2**24 - 1  # small ids are plain floats, as in nvdiffrast
