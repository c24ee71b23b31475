"""The triton backend held to the torch reference on small scenes, on the CPU through Triton's
interpreter (TRITON_INTERPRET=1, set here before triton is imported; the GPU parity with
nvdiffrast is `bench/render_parity.py`). The interpreter runs numpy per kernel operation, so the
scenes are tiny; they still reach every kernel path: boxes larger than one work item, culled and
clipped triangles, range mode, batched attributes and textures, every filter and boundary mode.
"""

import importlib.util
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("the triton package is not installed (requirements-dev.txt)", allow_module_level=True)

# Triton decides at import whether @triton.jit means its interpreter, and torch imports triton
# itself with torch._dynamo (the first optimizer does). When that happened before this module,
# the kernels cannot run on the CPU in this process: this file then runs again in a fresh one.
_PLAIN_TRITON = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not _PLAIN_TRITON:
    os.environ["TRITON_INTERPRET"] = "1"  # stays set: the interpreter reads it at kernel launches too
    from pipeline.render import Rasterizer  # noqa: E402
    from pipeline.render import rasterizer as rasterizer_module  # noqa: E402
    from pipeline.render.triton_backend import opposite_vertices  # noqa: E402
    from pipeline.render.triton_backend.rasterize import LAUNCH  # noqa: E402

    TORCH = Rasterizer(backend="torch", device="cpu")
    TRITON = Rasterizer(backend="triton", device="cpu")


@pytest.fixture(autouse=True)
def _interpreter(request):
    if _PLAIN_TRITON and request.node.name != "test_kernels_in_a_fresh_process":
        pytest.skip("triton was imported without its interpreter: see test_kernels_in_a_fresh_process")
    with warnings.catch_warnings():  # numpy on masked-off lanes (0/0 there is never stored)
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def test_kernels_in_a_fresh_process():
    if not _PLAIN_TRITON:
        pytest.skip("the kernels run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def _sphere(subdivisions=1):
    import trimesh  # noqa: PLC0415

    mesh = trimesh.creation.icosphere(subdivisions=subdivisions)
    return torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces, dtype=torch.int32)


def _scene(seed=0, batch=2):
    """A sphere in perspective from two sides, plus triangles that exercise the corner cases: one
    larger than a work item, one crossing the near plane (culled), one beyond the far plane, one
    partly off-screen, one degenerate."""
    rng = np.random.default_rng(seed)
    vertices, faces = _sphere()
    views = []
    for b in range(batch):
        a = 0.4 + 1.3 * b + rng.uniform(-0.1, 0.1)
        rot = torch.tensor([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]], dtype=torch.float32)
        p = vertices @ rot.T
        w = 2.0 + p[:, 2:3]
        views.append(torch.cat([0.9 * p[:, :2], 0.5 * p[:, 2:3] * w - 0.1 * w, w], 1))
    pos = torch.stack(views)
    extra = torch.tensor([
        [-0.9, -0.8, 0.2, 1.0], [0.8, -0.9, 0.2, 1.0], [-0.5, 0.9, 0.2, 1.0],  # big, behind the sphere
        [0.1, 0.1, 0.0, -0.5], [0.5, 0.2, 0.0, 1.0], [0.2, 0.6, 0.0, 1.0],  # a vertex behind the camera
        [-0.3, -0.3, 3.0, 1.0], [0.3, -0.3, 3.0, 1.0], [0.0, 0.3, 3.0, 1.0],  # beyond the far plane
        [0.7, 0.5, -0.2, 1.0], [1.6, 0.6, -0.2, 1.0], [0.9, 1.4, -0.2, 1.0],  # partly off-screen
        [0.0, 0.0, 0.0, 1.0], [0.2, 0.2, 0.0, 1.0], [0.4, 0.4, 0.0, 1.0],  # degenerate
    ])
    n = vertices.shape[0]
    pos = torch.cat([pos, extra.expand(batch, -1, -1)], 1).contiguous()
    faces = torch.cat([faces, torch.arange(n, n + 15, dtype=torch.int32).view(5, 3)])
    return pos, faces


def test_rasterize_matches_torch_exactly_with_large_boxes_and_culling():
    pos, faces = _scene()
    rast_t, db_t = TORCH.rasterize(pos, faces, (24, 40))
    rast_x, db_x = TRITON.rasterize(pos, faces, (24, 40))
    drawn = [int((rast_t[..., 3] == faces.shape[0] - k).sum()) for k in (4, 3, 2, 1, 0)]  # the extra triangles
    assert drawn[0] > 2 * LAUNCH["lanes"]  # the big one, in several work items
    assert drawn[1:3] == [0, 0] and drawn[3] > 0 and drawn[4] == 0  # culled, culled, partly shown, degenerate
    assert torch.equal(rast_x, rast_t)
    assert torch.equal(db_x, db_t)


def test_range_mode_and_single_pixel_images_match_torch():
    pos, faces = _scene(seed=1, batch=1)
    ranges = torch.tensor([[0, faces.shape[0]], [5, 30], [faces.shape[0] - 5, 5], [0, 0]], dtype=torch.int32)
    for resolution in ((17, 9), (1, 1)):
        rast_t, db_t = TORCH.rasterize(pos[0], faces, resolution, ranges=ranges)
        rast_x, db_x = TRITON.rasterize(pos[0], faces, resolution, ranges=ranges)
        assert torch.equal(rast_x, rast_t) and torch.equal(db_x, db_t)


def _render(r, pos, faces, attr, uvs, tex, weights, filter_mode, boundary_mode):
    """rasterize -> interpolate (colours, UVs with derivatives) -> texture -> antialias; gradients."""
    pos = pos.clone().requires_grad_(True)
    attr = attr.clone().requires_grad_(True)
    uvs = uvs.clone().requires_grad_(True)
    tex = tex.clone().requires_grad_(True)
    rast, rast_db = r.rasterize(pos, faces, (20, 28))
    colour, _ = r.interpolate(attr, rast, faces)  # [1, V, C] broadcast or [B, V, C]
    uv, uv_da = r.interpolate(uvs[None], rast, faces, rast_db=rast_db, diff_attrs="all")
    texel = r.texture(tex, 2.5 * uv - 0.7, 2.5 * uv_da, filter_mode=filter_mode, boundary_mode=boundary_mode)
    shaded = colour * texel * (rast[..., 3:] > 0)
    out = r.antialias(shaded, rast, pos, faces)
    (out * weights).sum().backward()
    return [out.detach(), uv_da.detach(), texel.detach(), pos.grad, attr.grad, uvs.grad, tex.grad]


@pytest.mark.parametrize("filter_mode, boundary_mode, batched", [
    ("linear-mipmap-linear", "clamp", False),
    ("linear-mipmap-linear", "wrap", True),
    ("linear", "zero", False),
])
def test_full_chain_values_and_gradients_match_torch(filter_mode, boundary_mode, batched):
    pos, faces = _scene(seed=2)
    generator = torch.Generator().manual_seed(3)
    num_verts = pos.shape[1]
    attr = torch.rand(2 if batched else 1, num_verts, 3, generator=generator)
    uvs = torch.rand(num_verts, 2, generator=generator)
    tex = torch.rand(2 if batched else 1, 16, 8, 3, generator=generator)  # non-square: a side reaches 1 first
    weights = torch.rand(2, 20, 28, 3, generator=generator)
    ours = _render(TRITON, pos, faces, attr, uvs, tex, weights, filter_mode, boundary_mode)
    reference = _render(TORCH, pos, faces, attr, uvs, tex, weights, filter_mode, boundary_mode)
    names = ["antialiased", "uv_da", "texture", "pos grad", "attr grad", "uv grad", "tex grad"]
    for name, a, b in zip(names, ours, reference):
        scale = float(b.abs().max())
        assert scale > 0, f"{name}: the scene exercises nothing"
        # Float rounding only: the texture lookups are addressed differently (see triton_backend.texture).
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale), f"{name}: {float((a - b).abs().max())} of {scale}"


def test_interpolate_channel_subsets_and_range_mode_attributes():
    pos, faces = _scene(seed=4, batch=1)
    ranges = torch.tensor([[0, faces.shape[0]], [10, 40]], dtype=torch.int32)
    rast_t, db_t = TORCH.rasterize(pos[0], faces, (12, 16), ranges=ranges)
    attr = torch.rand(pos.shape[1], 5, generator=torch.Generator().manual_seed(5))
    for diff in (None, [3, 1], "all"):
        out_t = TORCH.interpolate(attr, rast_t, faces, rast_db=db_t, diff_attrs=diff)
        out_x = TRITON.interpolate(attr, rast_t, faces, rast_db=db_t, diff_attrs=diff)
        for a, b in zip(out_x, out_t):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)


def test_antialias_topology_is_rebuilt_after_an_in_place_change():
    pos, faces = _scene(seed=6, batch=1)
    r = Rasterizer(backend="triton", device="cpu")
    tri = faces.clone()
    rast, _ = r.rasterize(pos, tri, (16, 16))
    colour = rast[..., :3].contiguous()
    first = r.antialias(colour, rast, pos, tri)
    assert r._topology[0] is tri and torch.equal(r._topology[2], opposite_vertices(tri))
    assert torch.equal(r.antialias(colour, rast, pos, tri), first)  # reused
    tri.copy_(tri.flip(0))  # same triangles, other order: a stale table would name the wrong ones
    rast, _ = r.rasterize(pos, tri, (16, 16))
    colour = rast[..., :3].contiguous()
    assert torch.allclose(r.antialias(colour, rast, pos, tri), TORCH.antialias(colour, rast, pos, tri), atol=1e-6)


def test_auto_picks_nvdiffrast_then_triton_then_torch(monkeypatch, caplog):
    assert Rasterizer(device="cpu").backend == "torch"  # the CPU never gets the interpreter by default
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA machine without nvdiffrast
    monkeypatch.setattr(rasterizer_module, "_import_nvdiffrast", lambda: None)
    monkeypatch.setattr(rasterizer_module, "_logged_choices", set())
    with caplog.at_level(logging.INFO, logger="photo3d.render"):
        assert Rasterizer(device="cuda").backend == "triton"
    assert [rec.getMessage().split(" (")[0] for rec in caplog.records] == ["rendering backend: triton"]
    # ... and without triton: torch, with a warning, and a clear error when triton is asked for.
    monkeypatch.setattr(rasterizer_module, "_import_triton_backend", lambda: None)
    monkeypatch.setattr(rasterizer_module, "_torch_on_cuda_warned", False)
    with pytest.warns(RuntimeWarning, match="slower torch rasterizer"):
        assert Rasterizer(device="cuda").backend == "torch"
    with pytest.raises(RuntimeError, match="needs the triton package"):
        Rasterizer(backend="triton", device="cuda")


def test_backend_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv("PHOTO3D_RENDER_BACKEND", "triton")
    assert Rasterizer(device="cpu").backend == "triton"  # the interpreter is on in this module
    monkeypatch.setenv("PHOTO3D_RENDER_BACKEND", "opengl")
    with pytest.raises(ValueError, match="PHOTO3D_RENDER_BACKEND"):
        Rasterizer(device="cpu")


def test_warm_up_runs_every_render_of_the_pipeline_forward_and_backward():
    from pipeline.mesh import warm_up  # noqa: PLC0415

    calls = []
    for name in ("rasterize", "interpolate", "texture", "antialias"):
        original = getattr(TRITON, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)
        setattr(TRITON, name, counting)
    try:
        warm_up(TRITON)
    finally:
        for name in ("rasterize", "interpolate", "texture", "antialias"):
            delattr(TRITON, name)
    # textured, coloured and shaded: three rasterizations, each anti-aliased; one texture lookup
    assert calls.count("rasterize") == 3 and calls.count("antialias") == 3 and calls.count("texture") == 1
