"""The torch texture sampler against values computed by hand (nvdiffrast's conventions).

Texel (row i, column j) of an h x w texture has its centre at u = (j + 0.5) / w, v = (i + 0.5) / h,
so the continuous texel coordinate is x = u w - 0.5, y = v h - 0.5.
"""

import math

import pytest
import torch

from pipeline.render import Rasterizer
from pipeline.render.torch_backend.texture import _pad_level, mip_pyramid, texture

R = Rasterizer(backend="torch", device="cpu")

# 2 x 2 texture, one channel: row 0 = [1, 2], row 1 = [3, 4]. Centres at u, v in {0.25, 0.75}.
T22 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 2, 1)


def _sample(tex, points, uv_da=None, **kwargs):
    """Sample ``tex`` at a list of (u, v) through the public API; returns a flat list (channel 0)."""
    uv = torch.tensor(points, dtype=torch.float32).view(1, 1, -1, 2)
    if uv_da is not None:
        uv_da = torch.tensor(uv_da, dtype=torch.float32).expand(1, 1, len(points), 4).contiguous()
    out = R.texture(tex, uv, uv_da, **kwargs)
    assert out.shape == (1, 1, len(points), tex.shape[-1])
    return out[0, 0, :, 0].tolist()


# ----------------------------------------------------------------------------- nearest


@pytest.mark.parametrize(
    "boundary_mode, outside",
    [
        ("wrap", 10.0),  # (1.1, -0.1) wraps to (0.1, 0.9): row 1, column 0
        ("clamp", 2.0),  # clamped to row 0, column 2
        ("zero", 0.0),
    ],
)
def test_nearest_reads_the_containing_texel(boundary_mode, outside):
    tex = torch.tensor([[0.0, 1.0, 2.0], [10.0, 11.0, 12.0]]).view(1, 2, 3, 1)  # value = 10 row + column
    points = [(0.1, 0.1), (0.5, 0.9), (0.99, 0.4), (0.34, 0.49), (1.1, -0.1)]
    got = _sample(tex, points, filter_mode="nearest", boundary_mode=boundary_mode)
    assert got == [0.0, 11.0, 2.0, 1.0, outside]


def test_nearest_has_no_uv_gradient_and_tex_gradient_on_one_texel():
    tex = T22.clone().requires_grad_(True)
    uv = torch.tensor([[[[0.6, 0.3]]]], requires_grad=True)
    out = R.texture(tex, uv, filter_mode="nearest")
    out.sum().backward()
    assert uv.grad is None
    assert tex.grad.view(2, 2).tolist() == [[0.0, 1.0], [0.0, 0.0]]


# ---------------------------------------------------------------------------- bilinear


def test_bilinear_inside_the_texture():
    points = [(0.25, 0.25), (0.75, 0.75), (0.5, 0.25), (0.5, 0.5), (0.375, 0.25), (0.625, 0.625)]
    # texel centres; midpoint of the top row; centre of all four; a quarter of the way from 1 to 2;
    # x = y = 0.75: (1 - .75)(1 - .75) 1 + .75 (.25) 2 + .25 (.75) 3 + .75 (.75) 4 = 3.25
    want = [1.0, 4.0, 1.5, 2.5, 1.25, 3.25]
    for mode in ("wrap", "clamp", "zero"):
        assert _sample(T22, points, filter_mode="linear", boundary_mode=mode) == pytest.approx(want, abs=1e-6)


def test_u_runs_along_the_width_and_v_along_the_height():
    tex = torch.tensor([[0.0, 1.0, 2.0, 3.0], [10.0, 11.0, 12.0, 13.0]]).view(1, 2, 4, 1)  # h = 2, w = 4
    points = [(0.5, 0.5), (0.125, 0.75), (0.875, 0.25), (0.3125, 0.25)]
    # x = 1.5, y = 0.5 -> 6.5; texel (1, 0); texel (0, 3); x = 0.75 on row 0
    got = _sample(tex, points, filter_mode="linear", boundary_mode="clamp")
    assert got == pytest.approx([6.5, 10.0, 3.0, 0.75], abs=1e-6)


def test_bilinear_wrap_blends_across_the_edges():
    points = [(0.0, 0.25), (1.0, 0.25), (-0.125, 0.25), (0.0, 0.0), (3.25, -1.75), (0.25, 1.0)]
    # x = -0.5: half column 1, half column 0 of row 0 -> 1.5 (u = 1 wraps to 0 -> the same);
    # u = -0.125 -> 0.875, x = 1.25: 0.75 * 2 + 0.25 * 1; the corner blends all four texels;
    # (3.25, -1.75) wraps to the centre of texel (0, 0); v = 1 -> y = -0.5: rows 1 and 0 of column 0
    want = [1.5, 1.5, 1.75, 2.5, 1.0, 2.0]
    got = _sample(T22, points, filter_mode="linear", boundary_mode="wrap")
    assert got == pytest.approx(want, abs=1e-6)


def test_bilinear_clamp_holds_the_edge_texel_centres():
    points = [(0.0, 0.25), (1.2, 0.75), (-5.0, -5.0), (0.5, 1.0), (0.5, -0.3)]
    want = [1.0, 4.0, 1.0, 3.5, 1.5]
    got = _sample(T22, points, filter_mode="linear", boundary_mode="clamp")
    assert got == pytest.approx(want, abs=1e-6)


def test_bilinear_zero_fades_to_zero_outside():
    points = [(0.0, 0.25), (0.0, 0.0), (1.0, 0.75), (-0.25, 0.25), (-0.125, 0.25), (3.0, 3.0), (1e30, 0.5)]
    # x = -0.5: half of texel (0, 0) and half of the zero outside; the corner keeps a quarter of 1;
    # x = 1.5: half of 4; x = -1: all weight outside; x = -0.75: a quarter of 1; far outside
    want = [0.5, 0.25, 2.0, 0.0, 0.25, 0.0, 0.0]
    got = _sample(T22, points, filter_mode="linear", boundary_mode="zero")
    assert got == pytest.approx(want, abs=1e-6)


def test_zero_mode_far_outside_stays_zero_with_mipmaps():
    # With mipmaps all levels share one padded atlas; lookups far outside a level must not reach
    # its neighbours there.
    points = [(2.0, 0.125), (0.125, 2.0), (-1.0, 0.125), (0.125, -1.5), (3.0, 3.0)]
    for texels in (1.0, 2.0):
        got = _sample(T44 + 1, points, _iso(texels), filter_mode="linear-mipmap-linear", boundary_mode="zero")
        assert got == [0.0] * len(points)


def test_level_padding_holds_what_each_boundary_mode_reads_outside():
    # Lookups reach one texel (two in zero mode) past the edges, into this padding. In clamp mode
    # only float rounding reaches it, so a wrong pad would show as ~1e-4 errors, hard to see above.
    level = T22.permute(0, 3, 1, 2)  # [1, 1, 2, 2]
    assert _pad_level(level, "wrap")[0, 0].tolist() == [[4, 3, 4, 3], [2, 1, 2, 1], [4, 3, 4, 3], [2, 1, 2, 1]]
    assert _pad_level(level, "clamp")[0, 0].tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    zero = _pad_level(level, "zero")[0, 0]
    assert zero.shape == (6, 6) and zero.sum() == 10 and zero[2:4, 2:4].tolist() == [[1, 2], [3, 4]]


def _bilinear_by_hand(tex, u, v, mode):
    """One bilinear lookup written out texel by texel from the conventions (float64)."""
    h, w = tex.shape[:2]
    if mode == "wrap":
        u, v = u - math.floor(u), v - math.floor(v)
    x, y = u * w - 0.5, v * h - 0.5
    if mode == "clamp":
        x, y = min(max(x, 0.0), w - 1.0), min(max(y, 0.0), h - 1.0)
    x0, y0 = math.floor(x), math.floor(y)
    fx, fy = x - x0, y - y0

    def texel(i, j):
        if mode == "wrap":
            return tex[i % h, j % w]
        if mode == "clamp":
            return tex[min(max(i, 0), h - 1), min(max(j, 0), w - 1)]
        return tex[i, j] if (0 <= i < h and 0 <= j < w) else torch.zeros_like(tex[0, 0])

    top = (1 - fx) * texel(y0, x0) + fx * texel(y0, x0 + 1)
    bottom = (1 - fx) * texel(y0 + 1, x0) + fx * texel(y0 + 1, x0 + 1)
    return (1 - fy) * top + fy * bottom


@pytest.mark.parametrize("mode", ["wrap", "clamp", "zero"])
def test_bilinear_matches_texel_by_texel_evaluation(mode):
    gen = torch.Generator().manual_seed(3)
    tex = torch.rand(1, 3, 5, 2, dtype=torch.float64, generator=gen)  # odd sizes are fine without mips
    uv = torch.rand(1, 4, 10, 2, dtype=torch.float64, generator=gen) * 2.4 - 0.7
    out = texture(tex, uv, filter_mode="linear", boundary_mode=mode)
    want = torch.stack([_bilinear_by_hand(tex[0], float(u), float(v), mode) for u, v in uv.view(-1, 2)])
    torch.testing.assert_close(out.view(-1, 2), want, rtol=0, atol=1e-12)


def test_float32_agrees_with_float64_on_a_large_texture():
    # Rounding of texel coordinates stays ~1e-4 texel even for 1024 texels (module docstring).
    gen = torch.Generator().manual_seed(0)
    tex = torch.rand(1, 1024, 1024, 3, generator=gen)
    uv = torch.rand(2, 64, 64, 2, generator=gen) * 1.2 - 0.1
    for mode in ("wrap", "clamp", "zero"):
        out32 = texture(tex, uv, filter_mode="linear", boundary_mode=mode)
        out64 = texture(tex.double(), uv.double(), filter_mode="linear", boundary_mode=mode)
        assert (out32.double() - out64).abs().max() < 2e-4


# ------------------------------------------------------------------------ mip pyramid


def test_mip_pyramid_square_by_hand():
    tex = torch.arange(16.0).view(1, 4, 4, 1)
    levels = mip_pyramid(tex)
    assert [tuple(lvl.shape) for lvl in levels] == [(1, 4, 4, 1), (1, 2, 2, 1), (1, 1, 1, 1)]
    # 2x2 block means: (0+1+4+5)/4, (2+3+6+7)/4, (8+9+12+13)/4, (10+11+14+15)/4
    assert levels[1].view(2, 2).tolist() == [[2.5, 4.5], [10.5, 12.5]]
    assert levels[2].item() == 7.5
    assert len(mip_pyramid(tex, max_mip_level=1)) == 2


def test_mip_pyramid_non_square_averages_pairs_once_a_side_is_one():
    tex = torch.arange(16.0).view(1, 2, 8, 1)  # row 0 = 0..7, row 1 = 8..15
    levels = mip_pyramid(tex)
    assert [tuple(lvl.shape[1:3]) for lvl in levels] == [(2, 8), (1, 4), (1, 2), (1, 1)]
    assert levels[1].view(-1).tolist() == [4.5, 6.5, 8.5, 10.5]  # (0+1+8+9)/4, ...
    assert levels[2].view(-1).tolist() == [5.5, 9.5]  # (4.5+6.5)/2, (8.5+10.5)/2
    assert levels[3].item() == 7.5
    tall = mip_pyramid(torch.arange(4.0).view(1, 4, 1, 1))  # one column: pairs along the height
    assert [lvl.view(-1).tolist() for lvl in tall] == [[0.0, 1.0, 2.0, 3.0], [0.5, 2.5], [1.5]]


def test_mip_pyramid_refuses_to_halve_odd_sides():
    with pytest.raises(ValueError, match="odd"):
        mip_pyramid(torch.zeros(1, 6, 6, 1))  # 6 -> 3 -> ?
    assert [lvl.shape[1] for lvl in mip_pyramid(torch.zeros(1, 6, 6, 1), max_mip_level=1)] == [6, 3]
    with pytest.raises(ValueError, match="odd"):
        mip_pyramid(torch.zeros(1, 5, 1, 1))
    assert len(mip_pyramid(torch.zeros(1, 1, 1, 1))) == 1  # nothing to build
    uv, uv_da = torch.full((1, 1, 1, 2), 0.5), torch.full((1, 1, 1, 4), 0.1)
    with pytest.raises(ValueError, match="odd"):
        R.texture(torch.zeros(1, 6, 6, 1), uv, uv_da, filter_mode="linear-mipmap-linear")
    R.texture(torch.zeros(1, 6, 6, 1), uv, uv_da, filter_mode="linear-mipmap-linear", max_mip_level=1)


# ----------------------------------------------------------------------- level of detail

# 4x4 texture 0..15 sampled at the centre of texel (0, 0) in clamp mode: level 0 gives 0, level 1
# (clamped onto its texel (0, 0)) gives 2.5, level 2 (the 1x1 mean) gives 7.5.
T44 = torch.arange(16.0).view(1, 4, 4, 1)
CORNER = [(0.125, 0.125)]


def _iso(texels, size=4):
    """uv_da of a footprint `texels` texels wide along both screen axes."""
    return [texels / size, 0.0, 0.0, texels / size]


@pytest.mark.parametrize(
    "texels, want",
    [(0.5, 0.0), (1.0, 0.0), (2.0, 2.5), (4.0, 7.5), (8.0, 7.5), (math.sqrt(2.0), 1.25), (2 * math.sqrt(2.0), 5.0)],
)
def test_isotropic_footprint_selects_and_blends_levels(texels, want):
    # LOD = log2(texels), clamped to [0, 2]; 1.41 texels -> LOD 0.5 halfway between 0 and 2.5.
    got = _sample(T44, CORNER, _iso(texels), filter_mode="linear-mipmap-linear", boundary_mode="clamp")
    assert got == pytest.approx([want], abs=1e-5)


def test_lod_uses_the_major_axis_of_the_footprint_ellipse():
    # dX = (2, 0) texels, dY = (2, 0) texels: J^T J = [[4, 4], [4, 4]], largest eigenvalue 8,
    # LOD = 0.5 log2 8 = 1.5 -> 5.0 (max(|dX|, |dY|) = 2 would give LOD 1 -> 2.5).
    sheared = [2 / 4, 2 / 4, 0.0, 0.0]
    # dX = (2, 0), dY = (0, 1): eigenvalues 4 and 1 -> LOD 1, not the mean or the minor axis.
    anisotropic = [2 / 4, 0.0, 0.0, 1 / 4]
    kwargs = dict(filter_mode="linear-mipmap-linear", boundary_mode="clamp")
    assert _sample(T44, CORNER, sheared, **kwargs) == pytest.approx([5.0], abs=1e-5)
    assert _sample(T44, CORNER, anisotropic, **kwargs) == pytest.approx([2.5], abs=1e-5)


def test_lod_scales_u_by_the_width_and_v_by_the_height():
    # 4 (h) x 8 (w) texture 0..31, sampled at the centre of texel (0, 0) in clamp mode: level 0
    # gives 0, level 2 (1 x 2) gives the mean of the top-left 4 x 4 block, 13.5.
    wide = torch.arange(32.0).view(1, 4, 8, 1)
    corner = [(0.0625, 0.125)]
    kwargs = dict(filter_mode="linear-mipmap-linear", boundary_mode="clamp")
    assert mip_pyramid(wide)[2][0, 0, 0, 0].item() == 13.5
    assert _sample(wide, corner, [1 / 8, 0.0, 0.0, 1 / 4], **kwargs) == pytest.approx([0.0], abs=1e-5)  # 1 texel
    assert _sample(wide, corner, [4 / 8, 0.0, 0.0, 1 / 4], **kwargs) == pytest.approx([13.5], abs=1e-5)  # 4 along u
    assert _sample(wide, corner, [1 / 8, 0.0, 0.0, 4 / 4], **kwargs) == pytest.approx([13.5], abs=1e-5)  # 4 along v


def test_max_mip_level_caps_the_lod():
    kwargs = dict(filter_mode="linear-mipmap-linear", boundary_mode="clamp")
    assert _sample(T44, CORNER, _iso(4.0), max_mip_level=1, **kwargs) == pytest.approx([2.5], abs=1e-5)
    assert _sample(T44, CORNER, _iso(4.0), max_mip_level=0, **kwargs) == pytest.approx([0.0], abs=1e-6)


def test_auto_filter_mode_uses_mipmaps_only_with_uv_da():
    uv = torch.tensor(CORNER).view(1, 1, 1, 2)
    uv_da = torch.tensor(_iso(4.0)).view(1, 1, 1, 4)
    assert R.texture(T44, uv, uv_da, boundary_mode="clamp").item() == pytest.approx(7.5)
    assert R.texture(T44, uv, boundary_mode="clamp").item() == pytest.approx(0.0)


def test_lod_zero_or_nan_footprint_falls_back_to_level_zero():
    for uv_da in ([0.0, 0.0, 0.0, 0.0], [float("nan")] * 4):
        got = _sample(T44, CORNER, uv_da, filter_mode="linear-mipmap-linear", boundary_mode="clamp")
        assert got == pytest.approx([0.0], abs=1e-5)


# --------------------------------------------------------------------------- gradients


def test_bilinear_gradients_by_hand():
    tex = T22.clone().requires_grad_(True)
    uv = torch.tensor([[[[0.375, 0.375]]]], requires_grad=True)  # x = y = 0.25
    R.texture(tex, uv, filter_mode="linear").sum().backward()
    # d/du = w ((2 - 1)(1 - 0.25) + (4 - 3) 0.25) = 2;  d/dv = h ((3 - 1)(1 - 0.25) + (4 - 2) 0.25) = 4
    assert uv.grad.view(-1).tolist() == pytest.approx([2.0, 4.0], abs=1e-5)
    assert tex.grad.view(-1).tolist() == pytest.approx([0.5625, 0.1875, 0.1875, 0.0625], abs=1e-6)


def test_clamp_has_no_uv_gradient_beyond_or_on_the_edge_centre():
    tex = T22.clone()
    uv = torch.tensor([[[[-0.3, 0.375], [0.25, 0.375], [0.375, 0.375]]]], requires_grad=True)
    R.texture(tex, uv, filter_mode="linear", boundary_mode="clamp").sum().backward()
    du = uv.grad[0, 0, :, 0].tolist()
    assert du[0] == 0.0 and du[1] == 0.0  # clamped; exactly on the edge texel centre (x = 0)
    assert du[2] == pytest.approx(2.0, abs=1e-5)


@pytest.mark.parametrize("boundary_mode", ["wrap", "clamp", "zero"])
def test_uv_gradient_on_texel_centres_uses_the_next_texel(boundary_mode):
    # On a texel centre the bilinear function has a kink; nvdiffrast takes taps (i, i + 1) there,
    # so du gives w (t[i, j+1] - t[i, j]) and dv gives h (t[i+1, j] - t[i, j]).
    gen = torch.Generator().manual_seed(5)
    tex = torch.rand(1, 8, 16, 1, generator=gen)
    rows, cols = torch.meshgrid(torch.arange(1, 6), torch.arange(1, 14), indexing="ij")  # interior
    uv = torch.stack([(cols + 0.5) / 16, (rows + 0.5) / 8], -1)[None].float().requires_grad_(True)
    out = R.texture(tex, uv, filter_mode="linear", boundary_mode=boundary_mode)
    torch.testing.assert_close(out[0, ..., 0], tex[0, rows, cols, 0], rtol=0, atol=1e-6)
    out.sum().backward()
    t = tex[0, ..., 0]
    torch.testing.assert_close(uv.grad[0, ..., 0], 16 * (t[rows, cols + 1] - t[rows, cols]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(uv.grad[0, ..., 1], 8 * (t[rows + 1, cols] - t[rows, cols]), rtol=1e-4, atol=1e-4)


def test_lml_texture_gradient_reaches_the_base_level_through_the_pyramid():
    kwargs = dict(filter_mode="linear-mipmap-linear", boundary_mode="clamp")
    uv = torch.tensor(CORNER).view(1, 1, 1, 2)
    tex = T44.clone().requires_grad_(True)
    R.texture(tex, uv, torch.tensor(_iso(4.0)).view(1, 1, 1, 4), **kwargs).sum().backward()
    assert torch.allclose(tex.grad, torch.full_like(tex, 1 / 16), atol=1e-6)  # LOD 2: the mean of all texels
    tex.grad = None
    R.texture(tex, uv, torch.tensor(_iso(2.0)).view(1, 1, 1, 4), **kwargs).sum().backward()
    want = torch.zeros(4, 4)
    want[:2, :2] = 0.25  # LOD 1: level-1 texel (0, 0), the mean of the top-left 2x2 block
    assert torch.allclose(tex.grad.view(4, 4), want, atol=1e-6)


def test_uv_da_gradient_only_in_mipmap_mode_and_only_off_the_kinks():
    uv = torch.tensor(CORNER).view(1, 1, 1, 2)
    tex = T44

    def grad_of(uv_da_values, filter_mode="linear-mipmap-linear"):
        uv_da = torch.tensor(uv_da_values).view(1, 1, 1, 4).requires_grad_(True)
        out = R.texture(tex, uv, uv_da, filter_mode=filter_mode, boundary_mode="clamp")
        if out.requires_grad:
            out.sum().backward()
        return uv_da.grad

    assert grad_of(_iso(3.0), "linear") is None
    # Isotropic footprints (J^T J = s I) have no well-defined eigenvalue gradient: nvdiffrast gives 0.
    assert grad_of(_iso(3.0)).abs().max() == 0
    # An anisotropic footprint between levels: dLOD/d(du/dX) for dX = (3, 0), dY = (0, 1) texels is
    # 1 / (ln 2 du/dX) = 4 / (3 ln 2); the output moves (7.5 - 2.5) per unit LOD.
    g = grad_of([3 / 4, 0.0, 0.0, 1 / 4])
    assert g.view(-1).tolist() == pytest.approx([5.0 * 4 / (3 * math.log(2)), 0.0, 0.0, 0.0], rel=1e-4)
    assert grad_of([16 / 4, 0.0, 0.0, 1 / 4]).abs().max() == 0  # LOD clamped at the top level
    # An integer LOD (here exactly 1): nvdiffrast does not fetch the second level, so no gradient.
    assert grad_of([2 / 4, 0.0, 0.0, 1 / 4]).abs().max() == 0


@pytest.mark.parametrize("boundary_mode", ["wrap", "clamp", "zero"])
@pytest.mark.parametrize("filter_mode", ["nearest", "linear", "linear-mipmap-linear"])
def test_gradcheck_float64(filter_mode, boundary_mode):
    gen = torch.Generator().manual_seed(7)
    tex = torch.rand(1, 4, 8, 2, dtype=torch.float64, generator=gen).requires_grad_(True)
    # Random points avoid the kinks (texel centres, clamp bounds, integer LODs) almost surely.
    uv = torch.rand(2, 3, 3, 2, dtype=torch.float64, generator=gen) * 1.6 - 0.3
    uv.requires_grad_(filter_mode != "nearest")  # nearest has no uv gradient to check
    scale = torch.rand(2, 3, 3, 1, dtype=torch.float64, generator=gen) * 1.5
    uv_da = (torch.randn(2, 3, 3, 4, dtype=torch.float64, generator=gen) * scale).requires_grad_(
        filter_mode == "linear-mipmap-linear"
    )
    inputs = (tex, uv, uv_da)
    assert torch.autograd.gradcheck(
        lambda t, u, d: texture(t, u, d, filter_mode=filter_mode, boundary_mode=boundary_mode), inputs
    )


# ---------------------------------------------------------------------- batches


@pytest.mark.parametrize("filter_mode", ["nearest", "linear", "linear-mipmap-linear"])
def test_broadcast_texture_equals_a_repeated_one(filter_mode):
    gen = torch.Generator().manual_seed(11)
    tex = torch.rand(1, 8, 8, 3, generator=gen)
    uv = torch.rand(3, 5, 6, 2, generator=gen) * 1.4 - 0.2
    uv_da = torch.randn(3, 5, 6, 4, generator=gen) * 0.2
    shared = tex.clone().requires_grad_(True)
    repeated = tex.repeat(3, 1, 1, 1).requires_grad_(True)
    weights = torch.rand(3, 5, 6, 3, generator=gen)
    out_shared = R.texture(shared, uv, uv_da, filter_mode=filter_mode)
    out_repeated = R.texture(repeated, uv, uv_da, filter_mode=filter_mode)
    torch.testing.assert_close(out_shared, out_repeated, rtol=0, atol=1e-6)
    (out_shared * weights).sum().backward()
    (out_repeated * weights).sum().backward()
    torch.testing.assert_close(shared.grad[0], repeated.grad.sum(0), rtol=1e-5, atol=1e-5)


def test_each_image_reads_its_own_texture():
    tex = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 2, 2).contiguous()  # image b is constant b
    uv = torch.rand(3, 2, 2, 2)
    for filter_mode in ("nearest", "linear"):
        out = R.texture(tex, uv, filter_mode=filter_mode, boundary_mode="clamp")
        torch.testing.assert_close(out, torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 2, 2))


def test_invalid_arguments():
    uv = torch.zeros(1, 1, 1, 2)
    with pytest.raises(ValueError):
        texture(T22, uv, filter_mode="cubic")
    with pytest.raises(ValueError):
        texture(T22, uv, boundary_mode="mirror")
    with pytest.raises(ValueError):
        texture(T22, uv, filter_mode="linear-mipmap-linear")  # no uv_da
    with pytest.raises(ValueError):
        texture(T22, uv, torch.zeros(1, 1, 1, 4), filter_mode="linear-mipmap-linear", max_mip_level=-1)
