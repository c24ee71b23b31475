"""Silhouette-only optimisation through the torch backend: the gradients from `antialias` alone must
be able to deform a sphere into a cube seen from 8 views."""

import numpy as np
import torch

from pipeline.cameras import Cameras, look_at, to_clip
from pipeline.refine.surface import UniformLaplacian
from pipeline.render import Rasterizer

R = Rasterizer(backend="torch", device="cpu")


def _icosphere(subdivisions: int):
    import trimesh  # noqa: PLC0415

    sphere = trimesh.creation.icosphere(subdivisions=subdivisions)
    return torch.tensor(sphere.vertices, dtype=torch.float32), torch.tensor(sphere.faces, dtype=torch.int32)


def _cube():
    corners = torch.tensor([[x, y, z] for x in (-0.6, 0.6) for y in (-0.6, 0.6) for z in (-0.6, 0.6)])
    faces = torch.tensor([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                          [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]], dtype=torch.int32)
    return corners, faces


def _views(size: int = 64) -> torch.Tensor:  # [8, 4, 4] clip-from-world
    dirs = np.array([[1, 1, 1], [-1, 1, 1], [1, -1, 1], [1, 1, -1], [-1, -1, 1], [1, -1, -1], [-1, 1, -1],
                     [0.2, 1, 0.1]], dtype=np.float64)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    up = np.array([0.0, 0.0, 1.0])
    w2c = np.stack([look_at(3.0 * d, np.zeros(3), up if abs(d @ up) < 0.9 else np.array([0.0, 1, 0])) for d in dirs])
    focal = 0.5 * size / np.tan(np.radians(22))
    k = np.array([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1.0]])
    cams = Cameras(np.repeat(k[None], 8, 0), w2c, np.full((8, 2), size))
    return torch.tensor(cams.clip_matrices((size, size), 1.0, 5.0), dtype=torch.float32)


def _silhouettes(vertices, faces, mats, size):
    clip = to_clip(vertices, mats)
    rast, _ = R.rasterize(clip, faces, (size, size))
    coverage = (rast[..., 3:] > 0).float()
    return R.antialias(coverage, rast, clip, faces)[..., 0]


def test_sphere_deforms_to_cube_silhouettes():
    size = 64
    mats = _views(size)
    cube_v, cube_f = _cube()
    with torch.no_grad():
        target = _silhouettes(cube_v, cube_f, mats, size)
    vertices, faces = _icosphere(3)
    vertices = (vertices * 0.5).requires_grad_(True)
    laplacian = UniformLaplacian(faces, len(vertices))
    optimizer = torch.optim.Adam([vertices], lr=0.01)
    for _ in range(250):
        loss = ((_silhouettes(vertices, faces, mats, size) - target) ** 2).mean()
        loss = loss + 0.5 * (laplacian(vertices) ** 2).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = _silhouettes(vertices, faces, mats, size) > 0.5
        truth = target > 0.5
        iou = (final & truth).flatten(1).sum(1).float() / (final | truth).flatten(1).sum(1).float()
        start = _silhouettes(_icosphere(3)[0] * 0.5, faces, mats, size) > 0.5
        start_iou = (start & truth).flatten(1).sum(1).float() / (start | truth).flatten(1).sum(1).float()
    assert float(start_iou.mean()) < 0.9  # the sphere starts visibly wrong
    assert float(iou.mean()) >= 0.97, iou


def test_uniform_laplacian_is_vertex_minus_neighbour_mean():
    # A square split into two triangles: vertex 0 has neighbours 1, 2, 3; vertex 1 has 0 and 2.
    vertices = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]], dtype=torch.int32)
    offsets = UniformLaplacian(faces, 4)(vertices)
    torch.testing.assert_close(offsets[0], vertices[0] - vertices[[1, 2, 3]].mean(0))
    torch.testing.assert_close(offsets[1], vertices[1] - vertices[[0, 2]].mean(0))
