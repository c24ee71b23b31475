"""The topology pass: marching tetrahedra on the Kuhn grid, the hull SDF, and fits that change genus
and recover concavities (torch backend, CPU, tiny sizes)."""

import numpy as np
import pytest
import torch
import trimesh
from scipy import ndimage
from scipy.spatial import cKDTree

from pipeline.config import RefineConfig
from pipeline.events import collect
from pipeline.hull import carve_visual_hull, hull_mesh
from pipeline.mesh import TexturedMesh
from pipeline.refine.topology import TetGrid, euler_characteristic, fit_topology, sdf_from_hull
from pipeline.render import Rasterizer
from pipeline.synthetic import orbit_cameras, render_capture


def welded_euler(vertices: np.ndarray, faces: np.ndarray) -> int:
    """V - E + F after merging vertices at the same position."""
    _, weld = np.unique(np.round(np.asarray(vertices, np.float64), 6), axis=0, return_inverse=True)
    return euler_characteristic(weld.reshape(-1)[np.asarray(faces)])


def revolve(profile, closed: bool, segments: int = 64, texture_size: int = 128) -> TexturedMesh:
    """A closed surface of revolution about +y of an (r, y) profile (a loop when ``closed``: a torus),
    outward, with a smooth colourful texture in (angle, profile) UVs."""
    prof = np.asarray(profile, np.float64)
    if closed:
        prof = np.concatenate([prof, prof[:1]])
    theta = np.linspace(0, 2 * np.pi, segments + 1)
    pos = np.stack([prof[:, :1] * np.cos(theta), np.repeat(prof[:, 1:], segments + 1, 1),
                    prof[:, :1] * np.sin(theta)], -1).reshape(-1, 3)
    u, v = np.meshgrid(np.linspace(0, 1, segments + 1), np.linspace(0, 1, len(prof)))
    idx = np.arange(pos.shape[0]).reshape(len(prof), segments + 1)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    faces_uv = np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([b, c, d], -1).reshape(-1, 3)])
    positions, weld = np.unique(np.round(pos, 9), axis=0, return_inverse=True)  # seams and poles welded
    faces = weld.reshape(-1)[faces_uv]
    keep = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 2] != faces[:, 0])
    faces, faces_uv = faces[keep], faces_uv[keep]
    if trimesh.Trimesh(positions, faces, process=False).volume < 0:
        faces, faces_uv = faces[:, ::-1], faces_uv[:, ::-1]
    tu, tv = np.meshgrid(np.linspace(0, 1, texture_size), np.linspace(0, 1, texture_size))
    texture = np.stack([0.5 + 0.4 * np.sin(6 * np.pi * tu), 0.5 + 0.4 * np.sin(10 * np.pi * tv),
                        0.5 + 0.4 * np.cos(2 * np.pi * (2 * tu + 3 * tv))], -1)
    return TexturedMesh(positions.astype(np.float32), np.ascontiguousarray(faces, np.int32),
                        np.stack([u, v], -1).reshape(-1, 2).astype(np.float32),
                        np.ascontiguousarray(faces_uv, np.int32), texture.astype(np.float32))


def test_marching_tets_on_a_sphere_is_closed_outward_and_close():
    grid = TetGrid(24)
    vertices, faces = grid.extract(grid.base.norm(dim=1) - 0.6)
    vertices, faces = vertices.numpy(), faces.numpy()
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert euler_characteristic(faces) == 2 and welded_euler(vertices, faces) == 2
    assert len(np.unique(faces)) == len(vertices)  # one vertex per crossing edge, all used
    centroids = vertices[faces].mean(1)
    assert (np.einsum("fi,fi->f", mesh.face_normals, centroids) > 0).all()  # every face faces outward
    radius = np.linalg.norm(vertices, axis=1)
    assert np.abs(radius - 0.6).max() < 0.2 * grid.cell  # linear crossings of an exact SDF
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * 0.6**3, rel=0.02)


def test_sdf_from_hull_is_signed_and_in_scene_units():
    res = 32
    centres = -1 + (np.arange(res) + 0.5) * 2 / res
    x, y, z = np.meshgrid(centres, centres, centres, indexing="ij")
    field = (np.sqrt(x**2 + y**2 + z**2) < 0.5).astype(np.float32)
    grid = TetGrid(24)
    sdf = torch.from_numpy(sdf_from_hull(field, grid.resolution))
    true = grid.base.norm(dim=1) - 0.5
    near = true.abs() < 2 * grid.cell  # the truncation keeps only these exact-ish
    assert (sdf[near] - true[near]).abs().max() < 2 / res  # within a hull voxel
    assert sdf.min() < 0 < sdf.max() and sdf.abs().max() <= 3 * grid.cell + 1e-6
    vertices, _ = grid.extract(sdf)
    assert np.abs(vertices.norm(dim=1).numpy() - 0.5).max() < 2 / res


def test_extraction_gradient_matches_finite_differences():
    grid = TetGrid(4)
    grid.base = grid.base.double()
    torch.manual_seed(0)
    sdf = (grid.base.norm(dim=1) - 0.55).requires_grad_(True)
    offsets = (0.5 * torch.randn(grid.num_vertices, 3, dtype=torch.float64)).requires_grad_(True)
    vertices, _ = grid.extract(sdf, offsets)
    weights = torch.randn_like(vertices)
    (vertices * weights).sum().backward()

    def objective(s, o):
        return float((grid.extract(s, o)[0] * weights).sum())

    eps = 1e-6
    for name, param, grad in (("sdf", sdf, sdf.grad), ("offsets", offsets, offsets.grad)):
        flat = param.detach().reshape(-1)
        index = int(torch.nonzero(grad.reshape(-1).abs() > 1e-3)[0])
        plus, minus = flat.clone(), flat.clone()
        plus[index] += eps
        minus[index] -= eps
        args = [sdf.detach(), offsets.detach()]
        slot = 0 if name == "sdf" else 1
        args_plus, args_minus = list(args), list(args)
        args_plus[slot], args_minus[slot] = plus.view_as(param), minus.view_as(param)
        numeric = (objective(*args_plus) - objective(*args_minus)) / (2 * eps)
        assert float(grad.reshape(-1)[index]) == pytest.approx(numeric, rel=1e-5, abs=1e-8), name


def test_a_torus_comes_back_with_its_hole_from_a_start_with_the_hole_closed():
    phi = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    torus = revolve(np.stack([0.55 + 0.25 * np.cos(phi), 0.25 * np.sin(phi)], 1), closed=True)
    rasterizer = Rasterizer(backend="torch", device="cpu")
    capture = render_capture(torus, orbit_cameras(16, 64, np.zeros(3), 3.0, fov_degrees=45, min_elevation=-0.3),
                             rasterizer)
    inside = carve_visual_hull(capture.cameras, capture.masks, resolution=16) > 0.5
    for dilation in range(1, 6):  # a coarse hull, dilated until the hole is closed
        start = ndimage.binary_dilation(inside, iterations=dilation).astype(np.float32)
        if welded_euler(*hull_mesh(start)) == 2:
            break
    assert welded_euler(*hull_mesh(start)) == 2, "the starting shape must have genus 0"
    config = RefineConfig(topology_steps=40, topology_grid_resolution=24, topology_render_resolution=64,
                          topology_views_per_step=4)
    seen, (vertices, faces) = collect(fit_topology(start, capture.cameras, capture.images, capture.masks, config,
                                                 rasterizer))
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0
    assert welded_euler(vertices, faces) == 0  # genus 1
    assert len(mesh.split(only_watertight=False)) == 1
    metrics = [e for e in seen if type(e).__name__ == "Metrics"][-1].values
    assert metrics["topology_euler_characteristic"] == 0 and metrics["topology_faces"] == len(faces)


def test_a_cup_seen_from_above_gets_its_inside_back():
    r_in, r_out, rim, floor, bottom = 0.6, 0.75, 0.45, -0.25, -0.4
    cup = revolve([(0, bottom), (r_out, bottom), (r_out, rim), (r_in, rim), (r_in, floor), (0, floor)], closed=False)
    rasterizer = Rasterizer(backend="torch", device="cpu")
    capture = render_capture(cup, orbit_cameras(24, 64, np.zeros(3), 3.0, fov_degrees=45, min_elevation=0.5),
                             rasterizer)
    field = carve_visual_hull(capture.cameras, capture.masks, resolution=64)
    diagonal = float(np.linalg.norm(cup.vertices.max(0) - cup.vertices.min(0)))

    def in_cavity(points):  # the inner walls and floor, and whatever a reconstruction puts there
        return (np.hypot(points[:, 0], points[:, 2]) < (r_in + r_out) / 2) & (points[:, 1] > (floor + bottom) / 2)

    truth = trimesh.Trimesh(cup.vertices, cup.faces, process=False).sample(20000, seed=0)
    truth = truth[in_cavity(truth)]

    def inside_distance(vertices, faces):  # symmetric mean distance in the cavity, fraction of the diagonal
        points = trimesh.Trimesh(vertices, faces, process=False).sample(20000, seed=0)
        points = points[in_cavity(points)]
        return 0.5 * (cKDTree(truth).query(points)[0].mean() + cKDTree(points).query(truth)[0].mean()) / diagonal

    hull_distance = inside_distance(*hull_mesh(field))
    config = RefineConfig(topology_steps=150, topology_grid_resolution=32, topology_render_resolution=64,
                          topology_views_per_step=4)
    _, (vertices, faces) = collect(fit_topology(field, capture.cameras, capture.images, capture.masks, config, rasterizer))
    distance = inside_distance(vertices, faces)
    print(f"cup inside: hull {hull_distance:.3f}, topology pass {distance:.4f} of the diagonal")
    assert hull_distance > 0.10
    assert distance <= 0.02
    assert trimesh.Trimesh(vertices, faces, process=False).is_watertight
