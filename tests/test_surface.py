"""The surface toolkit (pipeline/refine/surface.py): the Large Steps solve held to a dense reference, its
uniform Adam, the remesher on hard shapes, and the normal-consistency regulariser."""

import numpy as np
import pytest
import torch
import trimesh

from pipeline.errors import PipelineError
from pipeline.refine.surface import (FaceAdjacency, SmoothingSystem, SmoothParametrisation, UniformAdam,
                                     carry_vertex_attributes, face_normals, normal_consistency_loss, remesh,
                                     swap_parameter, target_edge_length)


def fold_over_pct(vertices, faces) -> float:
    """% of adjacent face pairs (after welding coincident vertices) whose normals are > 90 degrees apart."""
    vertices, faces = np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64)
    vertices, weld = np.unique(np.round(vertices, 6), axis=0, return_inverse=True)
    faces = weld.reshape(-1)[faces]
    normals = face_normals(torch.from_numpy(vertices), torch.from_numpy(faces))
    pairs = FaceAdjacency(torch.from_numpy(faces)).pairs
    return 100.0 * float(((normals[pairs[:, 0]] * normals[pairs[:, 1]]).sum(1) < 0).double().mean())


def _sphere(subdivisions=2):
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions)
    return torch.tensor(sphere.vertices, dtype=torch.float32), torch.tensor(sphere.faces)


def test_cg_solve_matches_dense_solve_warm_or_cold():
    vertices, faces = _sphere(2)
    system = SmoothingSystem(faces, len(vertices), 19.0, vertices.device)
    rhs = torch.randn(len(vertices), 3, generator=torch.Generator().manual_seed(0))
    reference = torch.linalg.solve(system.dense().double(), rhs.double()).float()
    cold = system.solve(rhs, tol=1e-6, max_iterations=500, check_every=1)
    cold_iterations = system.iterations
    torch.testing.assert_close(cold, reference, rtol=0, atol=1e-4 * float(reference.abs().max()))
    nearby = rhs + 1e-3 * torch.randn(rhs.shape, generator=torch.Generator().manual_seed(1))
    warm = system.solve(nearby, x0=cold, tol=1e-6, max_iterations=500, check_every=1)
    torch.testing.assert_close(warm, torch.linalg.solve(system.dense().double(), nearby.double()).float(),
                               rtol=0, atol=1e-4 * float(reference.abs().max()))
    assert system.iterations < cold_iterations  # the warm start pays
    dense = system.dense()  # M = I + lambda (D - A): rows sum to 1, off-diagonals -lambda
    torch.testing.assert_close(dense.sum(1), torch.ones(len(vertices)))
    assert set(torch.unique(dense[dense < 0]).tolist()) == {-19.0}
    # both forms of M x (the CPU's sparse product, CUDA's gather and scatter) are the dense product
    torch.testing.assert_close(system.apply_sparse(rhs), dense @ rhs)
    torch.testing.assert_close(system.apply_edges(rhs), dense @ rhs)


def test_fixed_count_warm_started_solves_track_a_moving_right_hand_side():
    """The optimisation's solves: a few iterations per step from the last solution keep v close to
    M^-1 u while u moves by optimiser-sized steps (the residual does not build up)."""
    vertices, faces = _sphere(3)
    param = SmoothParametrisation(vertices, faces, lambda_=5.0)
    system, generator = param.system, torch.Generator().manual_seed(5)
    residuals = []
    for _ in range(40):
        with torch.no_grad():
            param.u += 1e-3 * system.apply(torch.randn(vertices.shape, generator=generator))
        residuals.append(float(system.relative_residual(param.vertices().detach(), param.u.detach()).max()))
        assert system.iterations == param.iterations["forward"]
    assert max(residuals[-10:]) < 1e-3
    assert max(residuals[-10:]) <= 2 * max(residuals[:10])  # no drift over the steps
    one_shot = system.solve(param.u.detach(), tol=None, max_iterations=param.iterations["forward"])
    assert float(system.relative_residual(one_shot, param.u.detach()).max()) > max(residuals[-10:])  # warm start pays


def test_parametrisation_round_trips_and_backward_is_dense_solve():
    vertices, faces = _sphere(1)
    vertices = vertices.double()
    param = SmoothParametrisation(vertices, faces, lambda_=5.0, forward_iterations=200, backward_iterations=200)
    torch.testing.assert_close(param.vertices().detach(), vertices)
    weights = torch.randn(vertices.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (param.vertices() * weights).sum().backward()
    torch.testing.assert_close(param.u.grad, torch.linalg.solve(param.system.dense(), weights))
    # and a central finite difference of the same objective along a random direction of u
    direction = torch.randn(vertices.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    u, gradient = param.u.detach().clone(), param.u.grad.clone()

    def objective(step):
        param.u = u + step * direction
        return float((param.vertices() * weights).sum())

    finite_difference = (objective(1e-4) - objective(-1e-4)) / 2e-4
    assert finite_difference == pytest.approx(float((gradient * direction).sum()), rel=1e-6)


def test_parametrisation_at_lambda_zero_is_the_vertices_without_a_solve():
    vertices, faces = _sphere(1)
    param = SmoothParametrisation(vertices, faces, lambda_=0.0)
    assert param.system is None and param.vertices() is param.u and param.u.is_leaf
    torch.testing.assert_close(param.vertices().detach(), vertices)
    weights = torch.randn(vertices.shape, generator=torch.Generator().manual_seed(4))
    (param.vertices() * weights).sum().backward()
    torch.testing.assert_close(param.u.grad, weights)
    moved = param.rebuild(vertices + 1.0, faces)  # a remesh: a new leaf at the new vertices
    assert moved is param.u and moved.is_leaf and moved.grad is None
    torch.testing.assert_close(param.vertices().detach(), vertices + 1.0)
    with torch.no_grad():  # as a solve's result would be: no grad, safe for .numpy()
        assert not param.vertices().requires_grad


def test_uniform_adam_takes_one_scale_for_the_whole_tensor():
    param = torch.zeros(4, 3, requires_grad=True)
    optimizer = UniformAdam([param], lr=0.1)
    param.grad = torch.tensor([[1.0, 0, 0], [0.5, 0, 0], [0, -0.25, 0], [0, 0, 0]])
    optimizer.step()
    # first step: m_hat = g, sqrt(v_hat) = |g|, one denominator max |g| = 1: the step is lr * g / max|g|
    torch.testing.assert_close(param.detach(), -0.1 * param.grad)
    assert optimizer.state[param]["exp_avg"].shape == (4, 3)
    plain = torch.zeros(4, 3, requires_grad=True)
    plain.grad = param.grad.clone()
    torch.optim.Adam([plain], lr=0.1).step()  # plain Adam moves every non-zero entry by lr
    assert torch.allclose(plain.detach().abs()[:3].max(1).values, torch.tensor(0.1))
    bigger = torch.zeros(4, 3, requires_grad=True)
    swap_parameter(optimizer, param, bigger, carry=lambda t: t.clone())
    assert optimizer.param_groups[0]["params"][0] is bigger and optimizer.state[bigger]["step"] == 1


def _noisy_sphere(subdivisions, noise, seed=0):
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions)
    rng = np.random.default_rng(seed)
    return sphere.vertices * (1 + noise * rng.standard_normal((len(sphere.vertices), 1))), sphere.faces


def _thin_box():
    box = trimesh.creation.box(extents=(2.0, 0.1, 0.1))
    return box.vertices, box.faces


def _torus():
    torus = trimesh.creation.torus(major_radius=1.0, minor_radius=0.3, major_sections=48, minor_sections=16)
    return torus.vertices, torus.faces


@pytest.mark.parametrize("shape", ["noisy_sphere", "spiky_sphere", "torus", "thin_box"])
def test_remesh_keeps_a_closed_manifold_near_the_target_length(shape):
    vertices, faces = {"noisy_sphere": lambda: _noisy_sphere(4, 0.02), "spiky_sphere": lambda: _noisy_sphere(3, 0.25),
                       "torus": _torus, "thin_box": _thin_box}[shape]()
    mesh = trimesh.Trimesh(vertices, faces)
    length = target_edge_length(vertices, faces, 3000)
    new_vertices, new_faces = remesh(vertices, faces, length, iterations=5)
    out = trimesh.Trimesh(new_vertices, new_faces, process=False)
    assert out.is_watertight and out.is_winding_consistent  # closed, every edge in two faces, oriented
    assert out.euler_number == mesh.euler_number  # same genus
    assert out.volume > 0  # still outward
    edges = out.edges_unique_length
    assert 0.7 * length < np.median(edges) < 1.3 * length, (np.median(edges), length)
    assert out.area_faces.min() > 1e-3 * length**2  # no degenerate face


def test_remesh_without_projection_unfolds_a_noisy_surface():
    vertices, faces = _noisy_sphere(4, 0.05)
    assert fold_over_pct(vertices, faces) > 5
    new_vertices, new_faces = remesh(vertices, faces, target_edge_length(vertices, faces, 3000), 5, project=False)
    assert fold_over_pct(new_vertices, new_faces) < 0.5
    assert trimesh.Trimesh(new_vertices, new_faces, process=False).is_watertight


def test_remesh_refuses_non_manifold_edges_and_splits_bow_ties():
    box = trimesh.creation.box()
    fin = np.array([[0, 1, len(box.vertices)]])  # a third face on one edge
    with pytest.raises(PipelineError, match="non-manifold"):
        remesh(np.vstack([box.vertices, [[0.0, 0.0, 2.0]]]), np.vstack([box.faces, fin]), 0.2)
    other = trimesh.creation.box()
    other.apply_translation([1.0, 1.0, 1.0])  # two cubes touching at one corner
    touching = trimesh.Trimesh(np.vstack([box.vertices, other.vertices]), np.vstack([box.faces, other.faces + 8]))
    assert len(touching.vertices) == 15  # welded: the corner is one vertex in both cubes' fans
    new_vertices, new_faces = remesh(touching.vertices, touching.faces, 0.2, iterations=3)
    out = trimesh.Trimesh(new_vertices, new_faces, process=False)
    assert out.is_watertight and out.euler_number == 4  # two spheres


def test_carry_vertex_attributes_takes_the_nearest_old_vertex():
    old = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    new = np.array([[0.9, 0.1, 0], [0.1, 0.05, 0]])
    colours = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]])
    (carried_colours, carried_ids) = carry_vertex_attributes(old, new, colours, np.array([10, 11, 12]))
    torch.testing.assert_close(carried_colours, torch.tensor([[0.0, 1, 0], [1, 0, 0]]))
    assert carried_ids.tolist() == [11, 10]


def test_normal_consistency_zero_when_flat_positive_when_crumpled():
    grid = trimesh.creation.box().subdivide().subdivide()  # keep only the top face: a flat patch
    top = grid.faces[(grid.vertices[grid.faces][:, :, 2] > 0.49).all(1)]
    faces = torch.tensor(top)
    adjacency = FaceAdjacency(faces)
    assert len(adjacency.pairs) > 10
    flat = torch.tensor(grid.vertices, dtype=torch.float32)
    assert float(normal_consistency_loss(flat, adjacency)) == pytest.approx(0.0, abs=1e-10)
    crumpled = flat.clone().requires_grad_(True)
    with torch.no_grad():
        crumpled[:, 2] += 0.2 * torch.randn(len(flat), generator=torch.Generator().manual_seed(0))
    loss = normal_consistency_loss(crumpled, adjacency)
    assert float(loss) > 0.01
    loss.backward()
    assert crumpled.grad.abs().sum() > 0


def test_normal_prior_with_a_free_angle_leaves_gentle_bends_alone_and_still_pulls_folds():
    vertices, faces = _sphere(1)  # neighbouring faces about 20 degrees apart
    adjacency = FaceAdjacency(faces)
    assert float(normal_consistency_loss(vertices, adjacency)) > 0
    assert float(normal_consistency_loss(vertices, adjacency, free_angle=30.0)) == 0.0
    folded = vertices.clone()
    folded[0] *= 0.2  # a vertex pushed deep inside: its faces fold against their neighbours
    folded.requires_grad_(True)
    loss = normal_consistency_loss(folded, adjacency, free_angle=30.0)
    assert float(loss) > 0.01
    loss.backward()
    assert folded.grad[0].norm() > 0 and folded.grad[0] @ folded.detach()[0] < 0  # pushed back out


def test_large_steps_fits_cube_silhouettes_without_folding_where_plain_adam_folds():
    """Why the parametrisation exists: the same silhouettes, the same step size, 50 steps each. Plain Adam on
    raw positions crumples the surface; Large Steps + UniformAdam (with one remesh) stays unfolded."""
    from test_render_optimize import _cube, _silhouettes, _views  # noqa: PLC0415

    size, steps, lr = 64, 50, 0.03
    mats = _views(size)
    with torch.no_grad():
        target = _silhouettes(*_cube(), mats, size)
    sphere = trimesh.creation.icosphere(subdivisions=4)
    start_vertices, start_faces = remesh(0.5 * sphere.vertices, sphere.faces,
                                         target_edge_length(0.5 * sphere.vertices, sphere.faces, 2000), 3)

    def silhouette_loss(vertices, faces):
        return ((_silhouettes(vertices, faces, mats, size) - target) ** 2).mean()

    def iou(vertices, faces):
        with torch.no_grad():
            mine, truth = _silhouettes(vertices, faces, mats, size) > 0.5, target > 0.5
        return float(((mine & truth).flatten(1).sum(1) / (mine | truth).flatten(1).sum(1)).mean())

    faces = torch.tensor(start_faces)
    raw = torch.tensor(start_vertices).requires_grad_(True)
    adam = torch.optim.Adam([raw], lr=lr)
    for _ in range(steps):
        adam.zero_grad()
        silhouette_loss(raw, faces).backward()
        adam.step()

    param = SmoothParametrisation(torch.tensor(start_vertices), faces, lambda_=19.0)
    optimizer = UniformAdam([param.u], lr=lr)
    for step in range(steps):
        if step == steps // 2:  # a remesh mid-way: new connectivity, new solve, the optimiser re-pointed
            old = param.vertices().detach().numpy()
            new_vertices, new_faces = remesh(old, faces.numpy(), target_edge_length(old, faces.numpy(), 2000), 3)
            faces, old_u = torch.tensor(new_faces), param.u
            swap_parameter(optimizer, old_u, param.rebuild(torch.tensor(new_vertices), faces))
        optimizer.zero_grad()
        silhouette_loss(param.vertices(), faces).backward()
        optimizer.step()
    smooth = param.vertices().detach()

    assert iou(torch.tensor(start_vertices), torch.tensor(start_faces)) < 0.6  # the sphere starts far off
    assert iou(smooth, faces) > 0.85
    assert fold_over_pct(smooth.numpy(), faces.numpy()) <= 1.0
    assert iou(raw.detach(), torch.tensor(start_faces)) > 0.85  # plain Adam fits too ...
    assert fold_over_pct(raw.detach().numpy(), start_faces) > 5.0  # ... by crumpling the surface


def test_refinement_surface_ends_at_most_at_mesh_faces():
    """A thin cylinder remeshes to far more faces than asked (its long slivers split); the final
    remesh keeps to 'Mesh faces', closed and consistently wound, so the export can write the refined
    atlas as it is. An intermediate one may land over its count."""
    from pipeline.config import RefineConfig
    from pipeline.refine.loop import _Surface

    cylinder = trimesh.creation.cylinder(0.1, 2, sections=64)
    surface = _Surface(np.asarray(cylinder.vertices, np.float32), np.asarray(cylinder.faces),
                       RefineConfig(mesh_faces=4000), torch.device("cpu"))
    surface.remesh(2000)
    assert len(surface.faces) > 3000  # 6.9k faces for 2k asked
    surface.remesh(4000)  # the final count
    assert 3500 <= len(surface.faces) <= 4000
    final = trimesh.Trimesh(*surface.numpy(), process=False)
    assert final.is_watertight and final.is_winding_consistent


def _dent_through_sphere():
    """A unit icosphere whose cap above z = 0.6 is pushed down through the sphere and out below it: a
    view from above looks into the tube that joins the rim to the pushed cap, i.e. at the inside."""
    sphere = trimesh.creation.icosphere(subdivisions=3)
    vertices = np.array(sphere.vertices)
    cap = vertices[:, 2] > 0.6
    vertices[cap, 2] = -vertices[cap, 2] - 0.5
    return vertices, np.asarray(sphere.faces)


def _look_at_origin_from(eye):  # world-to-camera [4, 4], y up
    from pipeline.cameras import look_at

    return look_at(np.asarray(eye), np.zeros(3), np.array([0.0, 1.0, 0.0]))


def test_inside_out_pct_sees_where_a_surface_passes_through_itself():
    from pipeline.cameras import Cameras
    from pipeline.evaluate import inside_out_pct
    from pipeline.render import Rasterizer
    from pipeline.synthetic import orbit_cameras

    cameras = orbit_cameras(8, 64, np.zeros(3), 4.0)
    sphere = trimesh.creation.icosphere(subdivisions=3)
    rasterizer = Rasterizer(device="cpu")
    assert inside_out_pct(sphere.vertices, sphere.faces, cameras, (64, 64), rasterizer) < 0.1  # rim pixels
    assert inside_out_pct(sphere.vertices, sphere.faces[:, ::-1], cameras, (64, 64), rasterizer) > 99.5
    vertices, faces = _dent_through_sphere()
    above = orbit_cameras(1, 64, np.zeros(3), 4.0)
    above = Cameras(above.intrinsics, _look_at_origin_from([0.0, 0.1, 4.0])[None], above.sizes)
    assert inside_out_pct(vertices, faces, above, (64, 64), rasterizer) > 5.0


def test_inside_out_loss_pushes_the_surface_back_out_of_itself():
    """Descending the loss alone moves the triangles seen from behind away from the camera, until the
    view sees the surface from outside again; a surface seen from outside gets no push."""
    from pipeline.cameras import Cameras, to_clip
    from pipeline.evaluate import inside_out_pct
    from pipeline.mesh import camera_centers
    from pipeline.refine.surface import inside_out_loss
    from pipeline.render import Rasterizer

    rasterizer = Rasterizer(device="cpu")
    size = 64
    focal = 0.5 * size / np.tan(np.radians(20))
    k = np.array([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1.0]])
    eyes = [[0.0, 0.1, 4.0], [0.6, 0.0, 4.0], [-0.5, 0.4, 4.0]]
    cameras = Cameras(np.repeat(k[None], 3, 0), np.stack([_look_at_origin_from(e) for e in eyes]), np.full((3, 2), size))
    mats = torch.tensor(cameras.clip_matrices((size, size), 1.0, 9.0), dtype=torch.float32)
    centers = camera_centers(mats)
    start, faces_np = _dent_through_sphere()
    faces = torch.tensor(faces_np, dtype=torch.int32)

    def loss_of(vertices):
        rast, _ = rasterizer.rasterize(to_clip(vertices, mats), faces, (size, size), grad_db=False)
        return inside_out_loss(vertices, faces, rast, centers)

    sphere = trimesh.creation.icosphere(subdivisions=3)
    round_vertices = torch.tensor(sphere.vertices, dtype=torch.float32, requires_grad=True)
    loss_of(round_vertices).backward()
    assert float(round_vertices.grad.abs().max()) == 0.0

    before = inside_out_pct(start, faces_np, cameras, (size, size), rasterizer)
    vertices = torch.tensor(start, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([vertices], lr=0.01)
    for _ in range(60):
        optimizer.zero_grad()
        loss_of(vertices).backward()
        optimizer.step()
    after = inside_out_pct(vertices.detach().numpy(), faces_np, cameras, (size, size), rasterizer)
    assert before > 5.0 and after < 0.25 * before
