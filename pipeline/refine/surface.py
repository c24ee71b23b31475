"""The surface being optimised: its Laplacians and normals, the Large Steps parametrisation with its
uniform Adam, remeshing toward a target edge length, a normal-consistency regulariser and the push
that keeps the surface from passing through itself.

Torch pieces run on any device; the remesher runs on the CPU in numpy (gpytoolbox's MIT module, never its
``copyleft`` one).

Large Steps (Nicolet, Jacobson, Jakob 2021): the optimiser moves ``u = (I + lambda L) v`` with L the
combinatorial Laplacian D - A, so a gradient step on ``u`` is a smooth step on the vertices ``v``; the
SPD system is solved by Jacobi-preconditioned conjugate gradients, a fixed count of iterations
warm-started from the last solution (replayed from CUDA graphs on the GPU).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import PipelineError
from ..mesh import pixels_seen_from_behind


def _undirected_edges(faces: Tensor) -> Tensor:  # [F, 3] -> [E, 2], each undirected edge once, a < b
    f = faces.long()
    edges = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    return torch.unique(torch.sort(edges, dim=1).values, dim=0)


def _directed_edges(faces: Tensor) -> Tuple[Tensor, Tensor]:  # [F, 3] -> vertex [2E], neighbour [2E]
    """Each undirected edge both ways, as the (vertex, neighbour) index lists of `_neighbour_sum`."""
    edges = _undirected_edges(faces)
    edges = torch.cat([edges, edges.flip(1)])
    return edges[:, 0].contiguous(), edges[:, 1].contiguous()


def _neighbour_sum(x: Tensor, vertex: Tensor, neighbour: Tensor) -> Tensor:  # [V, C] -> [V, C]
    """Per vertex, the sum of its neighbours' rows: a gather and a scatter-add over the directed edges.
    index_select, not x[...]: its backward is an index_add, not a sorting index_put."""
    return torch.zeros_like(x).index_add_(0, vertex, x.index_select(0, neighbour))


class UniformLaplacian:
    """L = I - D^-1 A of a mesh graph: ``L(v)`` is each vertex minus the mean of its neighbours.

    A gather and a scatter over the edge list rather than a sparse matrix product: the backward of
    ``torch.sparse.mm`` transposes (sorts) the matrix on every step."""

    def __init__(self, faces: Tensor, num_vertices: int):  # faces [F, 3]
        self.vertex, self.neighbour = _directed_edges(faces)
        degree = torch.bincount(self.vertex, minlength=num_vertices).clamp(min=1)
        self.inverse_degree = (1.0 / degree.to(torch.float32))[:, None]  # [V, 1]

    def __call__(self, vertices: Tensor) -> Tensor:  # [V, 3] -> [V, 3]
        return vertices - _neighbour_sum(vertices, self.vertex, self.neighbour) * self.inverse_degree


def vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:  # [V, 3] area-weighted unit normals
    f = faces.long()
    v0, v1, v2 = vertices[f[:, 0]], vertices[f[:, 1]], vertices[f[:, 2]]
    face_n = torch.cross(v1 - v0, v2 - v0, dim=1)
    normals = torch.zeros_like(vertices).index_add_(0, f.reshape(-1), face_n.repeat_interleave(3, dim=0))
    return F.normalize(normals, dim=1)


# --- Large Steps ---------------------------------------------------------------------------------


class SmoothingSystem:
    """The SPD matrix M = I + lambda (D - A) of a mesh graph and its Jacobi-preconditioned
    conjugate-gradient solve for several right-hand sides at once (the vertices' device and dtype).

    M x has two forms, held to each other and to ``dense()`` by the tests: a sparse CSR product
    (`apply_sparse`, the CPU's: 3-5x faster there than index_add) and a gather and scatter-add over
    the directed edges (`apply_edges`, CUDA's: plain indexing kernels, which a CUDA graph records,
    `SmoothParametrisation`). ``apply`` picks by device."""

    def __init__(self, faces: Tensor, num_vertices: int, lambda_: float,  # faces [F, 3]
                 device: torch.device, dtype: torch.dtype = torch.float32):
        if lambda_ < 0:
            raise ValueError(f"lambda_ must be >= 0, got {lambda_}")
        self.vertex, self.neighbour = _directed_edges(faces.to(device))  # [2E], [2E]
        degree = torch.bincount(self.vertex, minlength=num_vertices).to(dtype)  # [V]
        self.lambda_ = lambda_
        self.diagonal = (1.0 + lambda_ * degree)[:, None]  # [V, 1]
        self.inverse_diagonal = 1.0 / self.diagonal  # [V, 1]
        self.num_vertices = num_vertices
        diagonal_index = torch.arange(num_vertices, device=device)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the mat-vec is all we use
            warnings.simplefilter("ignore", UserWarning)
            self.matrix = torch.sparse_coo_tensor(
                torch.stack([torch.cat([self.vertex, diagonal_index]), torch.cat([self.neighbour, diagonal_index])]),
                torch.cat([torch.full((len(self.vertex),), -lambda_, dtype=dtype, device=device), self.diagonal[:, 0]]),
                (num_vertices, num_vertices)).coalesce().to_sparse_csr()
        self.iterations = 0

    def apply(self, x: Tensor) -> Tensor:  # [V, C] -> M x  [V, C]
        return self.apply_edges(x) if x.is_cuda else self.apply_sparse(x)

    def apply_sparse(self, x: Tensor) -> Tensor:  # [V, C] -> M x  [V, C]
        return self.matrix @ x

    def apply_edges(self, x: Tensor) -> Tensor:  # [V, C] -> M x  [V, C]
        return self.diagonal * x - self.lambda_ * _neighbour_sum(x, self.vertex, self.neighbour)

    def dense(self) -> Tensor:  # [V, V], for tests on small meshes
        matrix = torch.diag(self.diagonal[:, 0])
        matrix[self.vertex, self.neighbour] = -self.lambda_
        return matrix

    def solve(self, b: Tensor, x0: Optional[Tensor] = None,  # b [V, C], x0 [V, C] warm start
              tol: Optional[float] = 1e-5, max_iterations: int = 200, check_every: int = 8) -> Tensor:
        """x with M x = b, each column to a relative residual |b - M x| / |b| <= tol (or max_iterations).
        Convergence is checked every ``check_every`` iterations; each check synchronises a GPU, which
        then idles while the host catches up. With ``tol=None`` it runs exactly ``max_iterations``
        iterations and never synchronises (the optimisation's solves, `SmoothParametrisation`).
        ``self.iterations`` is the count the last solve took. Not differentiable itself."""
        assert b.dim() == 2 and b.shape[0] == self.num_vertices, b.shape
        b_norm = b.norm(dim=0)  # [C]
        x = torch.zeros_like(b) if x0 is None else torch.where(b_norm > 0, x0, 0.0)  # a zero column solves to 0
        r = b - self.apply(x)
        z = r * self.inverse_diagonal
        p = z
        rz = (r * z).sum(0)  # [C]
        tiny = torch.finfo(b.dtype).tiny
        self.iterations = 0
        while self.iterations < max_iterations:
            if (tol is not None and self.iterations % check_every == 0
                    and bool((r.norm(dim=0) <= tol * b_norm).all())):
                break
            self.iterations += 1
            mp = self.apply(p)
            alpha = rz / (p * mp).sum(0).clamp(min=tiny)
            x = x + alpha * p
            r = r - alpha * mp
            z = r * self.inverse_diagonal
            rz_next = (r * z).sum(0)
            p = z + (rz_next / rz.clamp(min=tiny)) * p
            rz = rz_next
        return x

    def relative_residual(self, x: Tensor, b: Tensor) -> Tensor:  # x, b [V, C] -> [C]: |b - M x| / |b|
        return (b - self.apply(x)).norm(dim=0) / b.norm(dim=0).clamp(min=torch.finfo(b.dtype).tiny)


class _FromDifferential(torch.autograd.Function):
    """v = M^-1 u; the backward is M^-1 grad_v as M is symmetric (`SmoothParametrisation.solve`)."""

    @staticmethod
    def forward(ctx, u: Tensor, owner: "SmoothParametrisation") -> Tensor:  # [V, 3] -> [V, 3]
        ctx.owner = owner
        owner._last_vertices = owner.solve("forward", u.detach(), owner._last_vertices)
        return owner._last_vertices.clone()

    @staticmethod
    def backward(ctx, grad_vertices: Tensor):
        owner = ctx.owner
        owner._last_gradient = owner.solve("backward", grad_vertices.contiguous(), owner._last_gradient)
        return owner._last_gradient.clone(), None


class _GraphedSolve:
    """A fixed-count `SmoothingSystem.solve` recorded once as a CUDA graph: a call copies b and x0
    in, replays, and returns a copy of x. Eager, each CG iteration is ~15 small kernels whose
    launches, not their work, set the pace (docs/BENCHMARKS.md, bench/smoothing_solve.py)."""

    def __init__(self, system: SmoothingSystem, shape: Tuple[int, int], iterations: int,
                 device: torch.device, dtype: torch.dtype):
        self.b = torch.zeros(shape, device=device, dtype=dtype)
        self.x0 = torch.zeros(shape, device=device, dtype=dtype)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # a first run outside the capture, as torch.cuda.graph asks
            system.solve(self.b, self.x0, None, iterations)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.x = system.solve(self.b, self.x0, None, iterations)

    def __call__(self, b: Tensor, x0: Optional[Tensor]) -> Tensor:  # [V, C], [V, C] or None -> [V, C]
        self.b.copy_(b)
        if x0 is None:
            self.x0.zero_()
        else:
            self.x0.copy_(x0)
        self.graph.replay()
        return self.x.clone()


class SmoothParametrisation:
    """Vertices parametrised as ``u = (I + lambda_ L) v`` (L = D - A, the combinatorial Laplacian).

    Optimise ``.u`` (a leaf [V, 3], requires grad; best with `UniformAdam`); ``.vertices()`` gives the
    differentiable [V, 3] vertices. Both solves (v from u, and the gradient's in the backward) are
    inexact: a fixed number of conjugate-gradient iterations, warm-started from the previous step's
    solution, so what one step leaves of the residual is the next step's starting point and v tracks
    M^-1 u as u moves (docs/BENCHMARKS.md: the residuals an optimisation keeps). A fixed count needs
    no convergence test, whose host sync would stall the GPU twice a step; on CUDA each solve is
    a recorded CUDA graph (``graphs``; eager where recording fails, with a warning). After the
    connectivity changes (a remesh) call ``.rebuild(vertices, faces)``: it makes a new ``.u`` leaf, which
    the optimiser must be given (`swap_parameter`). Device and dtype follow ``vertices`` (float32 is the
    intended dtype; float64 works for checking gradients)."""

    def __init__(self, vertices: Tensor, faces: Tensor, lambda_: float = 19.0,  # vertices [V, 3], faces [F, 3]
                 forward_iterations: int = 12, backward_iterations: int = 16, graphs: bool = True):
        self.lambda_ = lambda_
        self.iterations = {"forward": forward_iterations, "backward": backward_iterations}
        self.use_graphs = graphs
        self.rebuild(vertices, faces)

    def rebuild(self, vertices: Tensor, faces: Tensor) -> Tensor:  # vertices [V, 3], faces [F, 3]
        """New connectivity: rebuilds M, sets ``.u = M vertices`` (a new leaf) and returns it."""
        assert vertices.dim() == 2 and vertices.shape[1] == 3, vertices.shape
        assert faces.dim() == 2 and faces.shape[1] == 3, faces.shape
        vertices = vertices.detach()
        if self.lambda_ == 0:  # M = I: the vertices themselves, no system and no solve per step
            self.system = None
            self.u = vertices.clone().requires_grad_(True)
            return self.u
        self.system = SmoothingSystem(faces, len(vertices), self.lambda_, vertices.device, vertices.dtype)
        self.u = self.system.apply(vertices).requires_grad_(True)
        self._last_vertices = vertices.clone()
        self._last_gradient: Optional[Tensor] = None
        self._graphs = {}
        if self.use_graphs and vertices.is_cuda:
            try:
                self._graphs = {kind: _GraphedSolve(self.system, tuple(vertices.shape), count, vertices.device,
                                                    vertices.dtype) for kind, count in self.iterations.items()}
            except RuntimeError as error:  # e.g. another capture under way on this device
                warnings.warn(f"Large Steps solves run eagerly (slower): recording a CUDA graph failed: {error}")
                self.use_graphs = False
        return self.u

    def solve(self, kind: str, b: Tensor, x0: Optional[Tensor]) -> Tensor:  # b [V, 3], x0 [V, 3] or None
        """The ``kind`` ("forward": v from u, "backward": the gradient's) fixed-count solve, warm-started
        from ``x0``; a CUDA graph's replay where one was recorded."""
        graph = self._graphs.get(kind)
        if graph is not None:
            return graph(b, x0)
        return self.system.solve(b, x0, None, self.iterations[kind])

    def vertices(self) -> Tensor:  # [V, 3], differentiable with respect to .u (when grad is enabled)
        if self.system is None:  # lambda 0: .u itself, detached under no_grad as a solve's result would be
            return self.u if torch.is_grad_enabled() else self.u.detach()
        return _FromDifferential.apply(self.u, self)


class UniformAdam(torch.optim.Optimizer):
    """Adam whose denominator is one scalar per parameter tensor: the max over its entries of the
    bias-corrected sqrt(second moment) (Large Steps' "AdamUniform"). Every entry keeps the direction of
    its first moment, so a smooth gradient field gives a smooth step."""

    def __init__(self, params, lr: float = 3e-2, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(param.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                first = state["exp_avg"] / (1 - beta1 ** state["step"])
                scale = (state["exp_avg_sq"].max() / (1 - beta2 ** state["step"])).sqrt() + group["eps"]
                param.sub_(group["lr"] * first / scale)
        return loss


def swap_parameter(optimizer: torch.optim.Optimizer, old: Tensor, new: Tensor,
                   carry: Optional[Callable[[Tensor], Tensor]] = None) -> None:
    """Replace ``old`` by ``new`` in ``optimizer`` (after a remesh). With ``carry`` (maps a per-vertex
    tensor [V_old, ...] to [V_new, ...], e.g. built on `nearest_vertices`) the per-vertex state tensors
    are carried over; without it the new parameter starts with fresh state."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state and carry is not None:
        optimizer.state[new] = {k: carry(v) if torch.is_tensor(v) and v.shape[:1] == old.shape[:1] else v
                                for k, v in state.items()}


# --- Remeshing -----------------------------------------------------------------------------------


def target_edge_length(vertices: np.ndarray, faces: np.ndarray, face_count: int) -> float:
    """The edge length whose equilateral triangles tile this surface's area with about ``face_count``
    faces (vertices [V, 3], faces [F, 3]); `remesh` at this length lands near that count."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    area = 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1).sum()
    return float(np.sqrt(4.0 * area / (np.sqrt(3.0) * max(int(face_count), 1))))


def _split_nonmanifold_vertices(vertices: np.ndarray, faces: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """One vertex per fan of faces: a vertex where two fans touch (a bow-tie) becomes one copy per fan.
    Faces must be edge-manifold. Corners of two faces sharing an edge are joined at both edge ends; the
    connected components of corners at one vertex are its fans."""
    from scipy.sparse import coo_matrix  # noqa: PLC0415
    from scipy.sparse.csgraph import connected_components  # noqa: PLC0415

    num_faces = len(faces)
    corner_ids = np.arange(3 * num_faces).reshape(num_faces, 3)
    starts = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2]])
    ends = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0]])
    start_corner = np.concatenate([corner_ids[:, 0], corner_ids[:, 1], corner_ids[:, 2]])
    end_corner = np.concatenate([corner_ids[:, 1], corner_ids[:, 2], corner_ids[:, 0]])
    key = np.minimum(starts, ends) * len(vertices) + np.maximum(starts, ends)
    order = np.argsort(key, kind="stable")
    same = np.nonzero(key[order][1:] == key[order][:-1])[0]
    first, second = order[same], order[same + 1]  # two half-edges of one edge
    # first runs a->b; second b->a (consistently oriented) or a->b: pair the corners that sit at a, and at b.
    flipped = starts[first] != starts[second]
    second_at_a = np.where(flipped, end_corner[second], start_corner[second])
    second_at_b = np.where(flipped, start_corner[second], end_corner[second])
    links = np.concatenate([np.stack([start_corner[first], second_at_a], 1),
                            np.stack([end_corner[first], second_at_b], 1)])
    graph = coo_matrix((np.ones(len(links)), (links[:, 0], links[:, 1])), shape=(3 * num_faces,) * 2)
    _, fan = connected_components(graph, directed=False)
    corner_vertex = faces.reshape(-1)
    pairs, new_index = np.unique(np.stack([corner_vertex, fan.reshape(-1)], 1), axis=0, return_inverse=True)
    if len(pairs) == len(np.unique(corner_vertex)):
        return vertices, faces
    return vertices[pairs[:, 0]], new_index.reshape(-1, 3).astype(faces.dtype)


def remesh(vertices: np.ndarray, faces: np.ndarray, target_length: float,  # vertices [V, 3], faces [F, 3]
           iterations: int = 5, project: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Isotropic remeshing (Botsch & Kobbelt: split, collapse, flip, tangential smoothing) toward one
    edge length, via gpytoolbox's MIT module. Returns (vertices [V', 3] float32, faces [F', 3] int32).

    The input must be welded and edge-manifold (each edge in at most two faces): PipelineError otherwise.
    Degenerate and duplicate faces and unreferenced vertices are dropped, bow-tie vertices split first.
    A closed manifold input stays closed and manifold; boundary vertices of an open one are kept fixed.
    ``project`` keeps the new vertices on the input surface. Not differentiable (numpy, CPU)."""
    try:
        from gpytoolbox.remesh_botsch import remesh_botsch  # noqa: PLC0415 (the MIT module, not gpytoolbox.copyleft)
    except ImportError as error:
        raise PipelineError("Remeshing needs gpytoolbox: pip install gpytoolbox==0.3.8 (see requirements.txt)") from error
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
        raise PipelineError(f"remesh needs vertices [V, 3] and faces [F, 3]; got {v.shape} and {f.shape}")
    if not np.isfinite(v).all() or not (np.isfinite(target_length) and target_length > 0):
        raise PipelineError(f"remesh needs finite vertices and a positive target length (got {target_length})")
    if len(f) and (f.min() < 0 or f.max() >= len(v)):
        raise PipelineError("remesh: a face refers to a vertex that does not exist; pass faces indexing vertices")
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])]
    f = f[np.sort(np.unique(np.sort(f, axis=1), axis=0, return_index=True)[1])]
    if len(f) == 0:
        raise PipelineError("remesh: the mesh has no non-degenerate face")
    used, f = np.unique(f, return_inverse=True)
    v, f = v[used], f.reshape(-1, 3)
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    _, edge_faces = np.unique(edges, axis=0, return_counts=True)
    if (edge_faces > 2).any():
        raise PipelineError(f"remesh: {int((edge_faces > 2).sum())} edges are shared by more than two faces "
                            "(non-manifold); weld and repair the mesh first (e.g. marching cubes output is manifold)")
    v, f = _split_nonmanifold_vertices(v, f)
    new_vertices, new_faces = remesh_botsch(v, f.astype(np.int32), int(iterations), float(target_length), project)
    return new_vertices.astype(np.float32), new_faces.astype(np.int32)


def nearest_vertices(old_vertices, new_vertices) -> np.ndarray:  # [V_old, 3], [V_new, 3] -> [V_new] int64
    """For each new vertex, the index of the nearest old one (scipy cKDTree)."""
    from scipy.spatial import cKDTree  # noqa: PLC0415

    old = old_vertices.detach().cpu().numpy() if torch.is_tensor(old_vertices) else np.asarray(old_vertices)
    new = new_vertices.detach().cpu().numpy() if torch.is_tensor(new_vertices) else np.asarray(new_vertices)
    return cKDTree(old).query(new)[1].astype(np.int64)


def carry_vertex_attributes(old_vertices, new_vertices, *attributes):
    """Per-vertex attributes ([V_old, ...] numpy arrays or tensors: colours, optimiser moments) carried
    to the new vertices of a remesh from the nearest old vertex; returns them as [V_new, ...] in the
    same types and devices (a tuple, one entry per attribute). Not differentiable."""
    index = nearest_vertices(old_vertices, new_vertices)
    carried = []
    for attribute in attributes:
        if len(attribute) != len(old_vertices):
            raise ValueError(f"attribute has {len(attribute)} rows, the old vertices {len(old_vertices)}")
        if torch.is_tensor(attribute):
            carried.append(attribute.detach()[torch.from_numpy(index).to(attribute.device)])
        else:
            carried.append(np.asarray(attribute)[index])
    return tuple(carried)


# --- Normal consistency --------------------------------------------------------------------------


class FaceAdjacency:
    """The pairs of faces sharing an edge (``pairs`` [P, 2] int64, on the faces' device), built once per
    connectivity (``faces`` [F, 3] int64 kept with it). On a closed manifold mesh P = 3F / 2; an edge in
    k > 2 faces gives k - 1 pairs."""

    def __init__(self, faces: Tensor):  # [F, 3]
        assert faces.dim() == 2 and faces.shape[1] == 3, faces.shape
        f = self.faces = faces.long()
        edges = torch.sort(torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), dim=1).values  # [3F, 2]
        face_of_edge = torch.arange(len(f), device=f.device).repeat(3)
        key = edges[:, 0] * (int(f.max()) + 1 if len(f) else 1) + edges[:, 1]
        key, order = torch.sort(key, stable=True)
        same = torch.nonzero(key[1:] == key[:-1]).squeeze(1)
        self.pairs = torch.stack([face_of_edge[order[same]], face_of_edge[order[same + 1]]], 1)  # [P, 2]


def face_normals(vertices: Tensor, faces: Tensor) -> Tensor:  # [V, 3], [F, 3] -> [F, 3] unit normals
    f = faces.long()
    v0, v1, v2 = vertices[f[:, 0]], vertices[f[:, 1]], vertices[f[:, 2]]
    return F.normalize(torch.cross(v1 - v0, v2 - v0, dim=1), dim=1)


def normal_consistency_loss(vertices: Tensor, adjacency: FaceAdjacency, free_angle: float = 0.0) -> Tensor:
    """mean over adjacent face pairs of relu(cos(free_angle) - cos(angle between their normals))^2; at
    ``free_angle`` 0 Neural Deferred Shading's (1 - cos)^2: 0 on a flat or smoothly bent surface, up
    to 4 for a pair folded onto itself. A ``free_angle`` (degrees) leaves pairs bent less than it
    alone, so real edges and detail keep their shape while creases and folds are still pulled flat.
    vertices [V, 3] (differentiable); returns a scalar."""
    normals = face_normals(vertices, adjacency.faces)
    cosine = (normals[adjacency.pairs[:, 0]] * normals[adjacency.pairs[:, 1]]).sum(1)
    return F.relu(float(np.cos(np.radians(free_angle))) - cosine).square().mean()


def inside_out_loss(
    vertices: Tensor,  # [V, 3] (differentiable)
    faces: Tensor,  # [F, 3], counter-clockwise seen from outside
    rast: Tensor,  # [B, H, W, 4] the rasterizer's output of this step's render (channel 3: triangle id + 1)
    centers: Tensor,  # [B, 3] the views' camera centres
) -> Tensor:  # scalar
    """Pushes the surface back where a view sees it from behind (`evaluate.inside_out_pct`: the mesh
    has passed through itself, e.g. one side of a thin wall through the other, toward a dark gap in
    the photos): each such pixel moves its triangle along the triangle's outward normal, i.e. away from
    the camera and back behind the sheet it crossed. 0 where no pixel shows a triangle's back; the
    value is minus the pushed triangles' centroids along their normals, per pixel of the object.
    Every other pixel in each direction is looked at: a quarter of the work, and patches a few
    pixels wide are still found."""
    triangle, behind, hit = pixels_seen_from_behind(vertices, faces, rast[:, ::2, ::2], centers)  # [B, H W / 4]
    pixels = torch.zeros(len(faces), device=vertices.device).index_add_(  # [F] back-seen pixels per face
        0, triangle.reshape(-1), behind.reshape(-1).to(vertices.dtype))
    corners = vertices[faces.long()]  # [F, 3, 3]
    outward = face_normals(vertices.detach(), faces)  # [F, 3]
    return -(pixels * (corners.mean(1) * outward).sum(1)).sum() / hit.sum().clamp(min=1)
