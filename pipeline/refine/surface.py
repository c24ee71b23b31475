"""The surface being optimised: its Laplacian and normals (torch, any device)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class UniformLaplacian:
    """L = I - D^-1 A of a mesh graph: ``L(v)`` is each vertex minus the mean of its neighbours.

    A gather and a scatter over the edge list rather than a sparse matrix product: the backward of
    ``torch.sparse.mm`` transposes (sorts) the matrix on every step."""

    def __init__(self, faces: Tensor, num_vertices: int):  # faces [F, 3]
        f = faces.long()
        edges = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
        edges = torch.unique(torch.cat([edges, edges.flip(1)]), dim=0)  # [E, 2] each undirected edge both ways
        self.vertex, self.neighbour = edges[:, 0].contiguous(), edges[:, 1].contiguous()
        degree = torch.bincount(self.vertex, minlength=num_vertices).clamp(min=1)
        self.inverse_degree = (1.0 / degree.to(torch.float32))[:, None]  # [V, 1]

    def __call__(self, vertices: Tensor) -> Tensor:  # [V, 3] -> [V, 3]
        # index_select, not vertices[...]: its backward is an index_add, not a sorting index_put.
        neighbour_sum = torch.zeros_like(vertices).index_add_(0, self.vertex, vertices.index_select(0, self.neighbour))
        return vertices - neighbour_sum * self.inverse_degree


def vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:  # [V, 3] area-weighted unit normals
    f = faces.long()
    v0, v1, v2 = vertices[f[:, 0]], vertices[f[:, 1]], vertices[f[:, 2]]
    face_n = torch.cross(v1 - v0, v2 - v0, dim=1)
    normals = torch.zeros_like(vertices).index_add_(0, f.reshape(-1), face_n.repeat_interleave(3, dim=0))
    return F.normalize(normals, dim=1)


