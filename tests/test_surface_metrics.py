"""Surface metrics (fold-overs, creases, topology, normal consistency), the grey head-lit render and
`python -m pipeline eval --images`."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from pipeline.__main__ import main
from pipeline.evaluate import (ERROR_REGIONS, chamfer_fscore, error_breakdown, geometry_scores, normal_consistency,
                               on_white, surface_quality)
from pipeline.export import write_glb
from pipeline.importers import load_capture
from pipeline.mesh import camera_centers, render_shaded, smooth_vertex_normals
from pipeline.render import Rasterizer
from pipeline.synthetic import orbit_cameras

LEGO = Path(__file__).parent / "fixtures" / "lego_128"


def folded_sheet(cells: int, angle_deg: float):
    """A flat square grid of ``cells`` x ``cells`` cells (two triangles each, normals +z) whose half
    x > cells / 2 is turned about the line x = cells / 2 by ``angle_deg``: the two halves' normals are
    that far apart, and exactly the ``cells`` face pairs across the hinge see it."""
    n = cells + 1
    x, y = np.meshgrid(np.arange(n, dtype=np.float64), np.arange(n, dtype=np.float64), indexing="ij")
    hinge = cells / 2
    t = np.radians(angle_deg)
    u = np.maximum(x - hinge, 0.0)
    vertices = np.stack([np.where(x > hinge, hinge + u * np.cos(t), x), y, u * np.sin(t)], axis=-1).reshape(-1, 3)
    i, j = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
    a, b, c, d = (i * n + j), ((i + 1) * n + j), ((i + 1) * n + j + 1), (i * n + j + 1)
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    return vertices, faces


def torus(major: int = 24, minor: int = 12, radius: float = 1.0, tube: float = 0.35):
    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, major, endpoint=False),
                       np.linspace(0, 2 * np.pi, minor, endpoint=False), indexing="ij")
    ring = radius + tube * np.cos(v)
    vertices = np.stack([ring * np.cos(u), ring * np.sin(u), tube * np.sin(v)], axis=-1).reshape(-1, 3)
    i, j = np.meshgrid(np.arange(major), np.arange(minor), indexing="ij")
    a, b = i * minor + j, ((i + 1) % major) * minor + j
    c, d = ((i + 1) % major) * minor + (j + 1) % minor, i * minor + (j + 1) % minor
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    return vertices, faces


def noisy_sphere(subdivisions: int = 3, noise: float = 0.03, seed: int = 0):
    sphere = trimesh.creation.icosphere(subdivisions)
    rng = np.random.default_rng(seed)
    return np.asarray(sphere.vertices) + noise * rng.standard_normal(sphere.vertices.shape), np.asarray(sphere.faces)


def test_icosphere_is_clean_and_genus_zero():
    sphere = trimesh.creation.icosphere(3)
    q = surface_quality(sphere.vertices, sphere.faces)
    assert q["fold_over_pct"] == 0.0 and q["crease_pct"] == 0.0 and q["sliver_pct"] == 0.0
    assert (q["euler_characteristic"], q["genus"], q["components"]) == (2, 0.0, 1)
    assert q["boundary_edges"] == 0 and q["non_manifold_edges"] == 0 and q["degenerate_faces"] == 0


def test_torus_has_genus_one_and_two_tori_genus_two():
    vertices, faces = torus()
    q = surface_quality(vertices, faces)
    assert (q["euler_characteristic"], q["genus"], q["components"], q["fold_over_pct"]) == (0, 1.0, 1, 0.0)
    apart = np.concatenate([vertices, vertices + [5.0, 0, 0]]), np.concatenate([faces, faces + len(vertices)])
    assert surface_quality(*apart)["genus"] == 2.0 and surface_quality(*apart)["components"] == 2


@pytest.mark.parametrize("angle, folds, creases", [(30, 0, 0), (75, 0, 1), (120, 1, 1), (170, 1, 1)])
def test_a_fold_is_counted_exactly(angle, folds, creases):
    cells = 10
    vertices, faces = folded_sheet(cells, angle)
    q = surface_quality(vertices, faces)
    pairs = 3 * cells**2 - 2 * cells  # interior edges of the grid, each shared by two faces
    assert q["fold_over_pct"] == pytest.approx(100 * folds * cells / pairs)
    assert q["crease_pct"] == pytest.approx(100 * creases * cells / pairs)
    # An open sheet: one boundary loop, a disc's Euler characteristic 1, genus 0.
    assert (q["boundary_edges"], q["euler_characteristic"], q["genus"]) == (4 * cells, 1, 0.0)


def test_a_flipped_face_folds_over_against_its_three_neighbours():
    sphere = trimesh.creation.icosphere(2)
    faces = np.asarray(sphere.faces).copy()
    faces[7] = faces[7, ::-1]
    q = surface_quality(sphere.vertices, faces)
    assert q["fold_over_pct"] == pytest.approx(100 * 3 / (1.5 * len(faces)))


def test_split_seams_give_the_welded_numbers():
    vertices, faces = noisy_sphere()
    welded = surface_quality(vertices, faces)
    assert welded["fold_over_pct"] > 0.1  # the noise folds some of it: the numbers below are not trivial
    soup = vertices[faces.reshape(-1)].astype(np.float32)  # every corner its own vertex, as positions in a GLB
    split = surface_quality(soup, np.arange(len(soup)).reshape(-1, 3))
    assert split == pytest.approx(welded)


def test_degenerate_faces_give_no_nan():
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 0], [0.5, 0, 0]], dtype=np.float64)
    faces = np.array([[0, 1, 2], [0, 3, 1], [1, 0, 4], [2, 2, 1]])  # a triangle, two zero-area faces, a collapsed one
    q = surface_quality(vertices, faces)
    assert all(np.isfinite(value) for value in q.values())
    assert q["degenerate_faces"] == 3
    assert q["sliver_pct"] == pytest.approx(100 * 2 / 3)  # zero-area faces count as slivers
    assert q["fold_over_pct"] == 0.0  # pairs with a zero-area face have no angle


def test_normal_consistency_sees_noise_not_orientation():
    sphere = trimesh.creation.icosphere(3)
    v, f = np.asarray(sphere.vertices), np.asarray(sphere.faces)
    same = normal_consistency(v, f, v, f, samples=20_000)
    noisy = normal_consistency(*noisy_sphere(noise=0.05), v, f, samples=20_000)
    flipped = normal_consistency(v, f[:, ::-1], v, f, samples=20_000)
    print("normal consistency: same", same, "noisy", noisy, "flipped", flipped)
    assert same > 0.99
    assert noisy < same - 0.05
    assert flipped == pytest.approx(same, abs=2e-3)
    # One sampling gives Chamfer and normal consistency; chamfer_fscore keeps its keys and values.
    scores = geometry_scores(v, f, v, f, samples=20_000)
    assert scores["normal_consistency"] == pytest.approx(same)
    assert chamfer_fscore(v, f, v, f, samples=20_000) == {k: x for k, x in scores.items() if k != "normal_consistency"}


def _sphere_views(resolution=64):
    sphere = trimesh.creation.icosphere(3)
    cameras = orbit_cameras(2, resolution, np.zeros(3), 3.0)
    mats = torch.tensor(cameras.clip_matrices((resolution, resolution), 1.0, 5.0), dtype=torch.float32)
    return sphere, cameras, mats


def test_shaded_render_is_grey_head_lit_and_differentiable():
    sphere, cameras, mats = _sphere_views()
    np.testing.assert_allclose(camera_centers(mats).numpy(), cameras.centers, atol=1e-4)
    vertices = torch.tensor(sphere.vertices, dtype=torch.float32, requires_grad=True)
    faces = torch.tensor(sphere.faces, dtype=torch.int32)
    rasterizer = Rasterizer(backend="torch", device="cpu")
    rgb, alpha = render_shaded(rasterizer, vertices, faces, mats, (64, 64), background=torch.ones(2, 1, 1, 3))
    assert rgb.shape == (2, 64, 64, 3) and alpha.shape == (2, 64, 64, 1)
    assert torch.equal(rgb[..., 0], rgb[..., 1]) and torch.equal(rgb[..., 0], rgb[..., 2])
    inside = alpha[0, :, :, 0] > 0.99
    rows = torch.nonzero(inside[:, 32])[:, 0]  # the sphere's extent along the middle column
    centre, rim = float(rgb[0, 32, 32, 0].detach()), float(rgb[0, int(rows.min()) + 1, 32, 0].detach())
    assert centre == pytest.approx(0.8, abs=0.01) and rim < centre - 0.2
    assert torch.all(rgb[alpha[..., 0] == 0] == 1.0)  # white background
    rgb.sum().backward()
    assert torch.isfinite(vertices.grad).all() and vertices.grad.abs().sum() > 0


def test_smooth_normals_are_shared_across_split_seams():
    sphere = trimesh.creation.icosphere(3)
    vertices = torch.tensor(sphere.vertices, dtype=torch.float32)
    corners = torch.tensor(sphere.faces, dtype=torch.long).reshape(-1)
    welded = smooth_vertex_normals(vertices, corners.reshape(-1, 3).int())
    torch.testing.assert_close(welded, vertices, atol=0.02, rtol=0)  # a unit sphere's normals are radial
    soup = vertices[corners]  # every corner its own vertex, as positions split along seams
    split = smooth_vertex_normals(soup, torch.arange(len(soup), dtype=torch.int32).reshape(-1, 3))
    torch.testing.assert_close(split, welded[corners], atol=1e-6, rtol=0)


def _disc_views(count: int = 2, size: int = 64, radius: float = 20.0):
    """Photos of a grey disc on black, their masks, and a perfect render of them on white."""
    yy, xx = np.mgrid[:size, :size]
    mask = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius ** 2).astype(np.float32)
    masks = np.repeat(mask[None], count, 0)
    images = np.zeros((count, size, size, 3), np.float32)
    images[masks > 0.5] = 0.4
    return images, masks, on_white(images, masks), masks.copy()


def test_error_breakdown_puts_each_error_in_its_region():
    images, masks, rendered, alpha = _disc_views()
    # A notch of the disc the render misses (silhouette), a wrong colour on the outline (edge) and a
    # wrong colour in the middle (interior), each of a known squared error.
    alpha[0, 32:36, 10:14] = 0.0  # the disc's left rim: the render shows white where the photo has the disc
    rendered[0, 32:36, 10:14] = 1.0
    rendered[1, 32, 51] = 0.4 + 0.5  # on the right rim, inside the mask: edge
    rendered[1, 30:34, 30:34] = 0.4 + 0.2  # the middle: interior
    split = error_breakdown(rendered, alpha, images, masks)
    silhouette_px = int(((masks > 0.5) ^ (alpha > 0.5)).sum())
    errors = {"silhouette": silhouette_px * 0.6 ** 2, "edge": 0.5 ** 2, "interior": 16 * 0.2 ** 2, "background": 0.0}
    total = sum(errors.values())
    for region in ERROR_REGIONS:
        assert split[f"{region}_error_share"] == pytest.approx(errors[region] / total, rel=1e-6), region
    assert sum(split[f"{r}_pixel_share"] for r in ERROR_REGIONS) == pytest.approx(1.0)
    assert split["silhouette_pixel_share"] == pytest.approx(silhouette_px / masks.size)
    assert split["interior_top5_share"] == pytest.approx(1.0)  # all of it in 16 pixels of hundreds
    spread = rendered.copy()  # the same interior error spread over every interior pixel: no hot spots
    spread[1, 30:34, 30:34] = 0.4
    spread[(masks > 0.5) & (alpha > 0.5)] += 0.1
    assert error_breakdown(spread, alpha, images, masks)["interior_top5_share"] < 0.1


def test_error_breakdown_edge_band_does_not_cross_views():
    images, masks, rendered, alpha = _disc_views()
    masks[1], alpha[1], images[1] = 0.0, 0.0, 0.0  # the second view shows nothing: its pixels are all background
    rendered = on_white(images, masks)
    rendered[1, 32, 12] = 0.5  # where the first view's outline is, but in the second view
    split = error_breakdown(rendered, alpha, images, masks)
    assert split["background_error_share"] == pytest.approx(1.0) and split["edge_error_share"] == 0.0


def test_eval_cli_writes_photo_textured_shaded_per_view(tmp_path, capsys):
    sphere = trimesh.creation.icosphere(3, radius=0.8)  # inside the lego cameras' view, in their world frame
    vertices = np.asarray(sphere.vertices)
    uvs = 0.5 + 0.4 * vertices[:, :2] / 0.8
    texture = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    glb = tmp_path / "sphere.glb"
    write_glb(glb, vertices, sphere.faces, uvs, texture, np.eye(4))
    pictures = tmp_path / "pictures"
    assert main(["eval", str(glb), str(LEGO), "--json", "--images", str(pictures), "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["fold_over_pct"] == 0.0 and summary["crease_pct"] == 0.0  # reported without --gt too
    # A sphere for a lego: most of the error is where the silhouettes differ, and the shares add up.
    assert sum(summary[f"{r}_error_share"] for r in ERROR_REGIONS) == pytest.approx(1.0)
    assert summary["silhouette_error_share"] > 0.5
    held = load_capture(LEGO, split="test")
    files = sorted(pictures.glob("*.png"))
    assert len(files) == len(held) == 8
    panel = np.asarray(Image.open(files[0]).convert("RGB")).astype(np.float64) / 255
    height, width = held.images.shape[1:3]
    assert panel.shape == (height, 3 * width, 3)
    photo, textured, shaded = panel[:, :width], panel[:, width:2 * width], panel[:, 2 * width:]
    assert files[0].name == "000_r_2.png"
    mask = held.masks[0][..., None]
    np.testing.assert_allclose(photo, held.images[0] * mask + 1 - mask, atol=0.5 / 255 + 1e-6)
    assert np.array_equal(shaded[..., 0], shaded[..., 1]) and np.array_equal(shaded[..., 0], shaded[..., 2])
    covered = shaded[..., 0] < 1.0  # the sphere, grey on white; the textured render covers the same pixels
    assert 0.1 < covered.mean() < 0.9 and textured[covered].std() > 0.1 and np.all(textured[~covered] == 1.0)
