"""One differentiable-rendering interface over three backends.

`Rasterizer` mirrors `nvdiffrast.torch` (rasterize, interpolate, texture, antialias) without the
context argument. The ``nvdiffrast`` backend calls NVIDIA's CUDA kernels (compiled against the
installed torch at install time; NVIDIA Source Code License: non-commercial use only); the
``triton`` backend runs our Triton kernels, compiled at run time by the Triton that ships with
every CUDA build of torch (MIT licence, nothing to build); the ``torch`` backend is our pure-PyTorch
reference that runs on any device. ``bench/render_parity.py`` holds the torch and triton backends
to nvdiffrast on the GPU, and the tests hold the triton kernels to the torch reference on the CPU
(Triton's interpreter). Conventions (row order, pixel centres, clip space, fill rule, near plane)
are in docs/CONVENTIONS.md.

Shapes are checked here, at the boundary, so the backends can assume well-formed input.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import torch_backend

BACKENDS = ("auto", "torch", "triton", "nvdiffrast")
FILTER_MODES = ("auto", "nearest", "linear", "linear-mipmap-linear")
BOUNDARY_MODES = ("wrap", "clamp", "zero")

log = logging.getLogger("photo3d.render")
# Names the backend that ``backend="auto"`` uses, e.g. "triton" on a machine that has nvdiffrast
# but must not use it (its licence is non-commercial), or to compare backends end to end.
BACKEND_ENV = "PHOTO3D_RENDER_BACKEND"

_nvdiffrast_import_error: Optional[str] = None
_triton_import_error: Optional[str] = None
_torch_on_cuda_warned = False
_logged_choices: set = set()


def _import_nvdiffrast():
    """nvdiffrast.torch, or None with the reason remembered (imported lazily: CUDA extension)."""
    global _nvdiffrast_import_error
    if _nvdiffrast_import_error is not None:
        return None
    try:
        import nvdiffrast.torch as dr  # noqa: PLC0415 (optional CUDA dependency)

        return dr
    except Exception as exc:  # ImportError, or a build that fails to load its .so
        _nvdiffrast_import_error = f"{type(exc).__name__}: {exc}"
        return None


def _import_triton_backend():
    """pipeline.render.triton_backend, or None with the reason remembered (imports triton, which
    CPU builds of torch do not bring)."""
    global _triton_import_error
    if _triton_import_error is not None:
        return None
    try:
        from . import triton_backend  # noqa: PLC0415 (optional: needs the triton package)

        return triton_backend
    except Exception as exc:  # ImportError, or a triton that fails to initialise
        _triton_import_error = f"{type(exc).__name__}: {exc}"
        return None


def nvdiffrast_available() -> bool:
    """True when nvdiffrast imports and CUDA is usable."""
    return torch.cuda.is_available() and _import_nvdiffrast() is not None


def triton_available(device: Union[str, torch.device, None] = None) -> bool:
    """True when the triton backend can run on ``device`` (default: CUDA): a CUDA device with the
    triton package, or any device under Triton's CPU interpreter (``TRITON_INTERPRET=1``, tests)."""
    device = torch.device(device or "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        return False
    backend = _import_triton_backend()
    return backend is not None and (device.type == "cuda" or backend.INTERPRETED)


class Rasterizer:
    """Differentiable rasterizer with ``nvdiffrast`` (CUDA), ``triton`` (CUDA) and ``torch`` (any
    device) backends, which give the same results within float rounding (docs/CONVENTIONS.md).

    Args:
        backend: ``"auto"`` picks, for a CUDA device, nvdiffrast when it imports, else triton when
            it imports, else torch (with a one-line warning: it is ~20x slower); for any other
            device, torch. The choice is logged once per process on the ``photo3d.render`` logger;
            the environment variable ``PHOTO3D_RENDER_BACKEND`` (torch, triton or nvdiffrast)
            overrides it. ``"nvdiffrast"`` and ``"triton"`` raise a RuntimeError that says how to install them
            when they are missing; ``"torch"`` always works.
        device: the device the inputs will live on (default: CUDA if available, else CPU).
            Only used to choose the backend and to create nvdiffrast's context.
    """

    def __init__(self, backend: str = "auto", device: Union[str, torch.device, None] = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._dr = None
        self._ctx = None
        self._triton = None
        self._topology = None  # (tri, its version, nvdiffrast's hash or triton's adjacency): see _topology_of
        if backend == "auto":
            forced = os.environ.get(BACKEND_ENV, "").strip().lower()
            if forced and forced not in BACKENDS:
                raise ValueError(f"{BACKEND_ENV}={forced!r} must be one of {BACKENDS}")
            backend = forced if forced and forced != "auto" else self._auto_backend()
        if backend == "nvdiffrast":
            if self.device.type != "cuda":
                raise RuntimeError(
                    f"backend='nvdiffrast' needs a CUDA device, got {self.device}; use backend='torch'"
                )
            dr = _import_nvdiffrast()
            if dr is None:
                raise RuntimeError(
                    "nvdiffrast is not installed or failed to load "
                    f"({_nvdiffrast_import_error}). Install it after a CUDA build of torch with "
                    "`pip install --no-build-isolation git+https://github.com/NVlabs/nvdiffrast.git`, "
                    "or use backend='triton' or 'torch'."
                )
            self._dr = dr
            self._ctx = dr.RasterizeCudaContext(device=self.device)
        if backend == "triton":
            self._triton = _import_triton_backend()
            if self._triton is None:
                raise RuntimeError(
                    f"backend='triton' needs the triton package ({_triton_import_error}); CUDA builds of "
                    "torch install it, or `pip install triton`; or use backend='torch'."
                )
            if self.device.type != "cuda" and not self._triton.INTERPRETED:
                raise RuntimeError(
                    f"backend='triton' needs a CUDA device, got {self.device} (on the CPU only Triton's "
                    "interpreter runs it, with TRITON_INTERPRET=1 set before pipeline.render.triton_backend "
                    "is imported: slow, for tests); use backend='torch'"
                )
        self.backend = backend

    def _auto_backend(self) -> str:
        if self.device.type != "cuda":
            return "torch"
        if _import_nvdiffrast() is not None:
            _log_choice_once("nvdiffrast", "rendering backend: nvdiffrast")
            return "nvdiffrast"
        if triton_available(self.device):
            _log_choice_once("triton",
                             f"rendering backend: triton (nvdiffrast unavailable: {_nvdiffrast_import_error})")
            return "triton"
        _log_choice_once("torch", f"rendering backend: torch (nvdiffrast unavailable: {_nvdiffrast_import_error}; "
                                  f"triton unavailable: {_triton_import_error})")
        _warn_torch_on_cuda_once()
        return "torch"

    def __repr__(self) -> str:
        return f"Rasterizer(backend={self.backend!r}, device={str(self.device)!r})"

    # ------------------------------------------------------------------ rasterize
    def rasterize(
        self,
        pos: Tensor,  # [B, V, 4] clip-space positions, or [V, 4] with `ranges`; float32
        tri: Tensor,  # [F, 3] int32 vertex indices
        resolution: Sequence[int],  # (H, W)
        ranges: Optional[Tensor] = None,  # [B, 2] int32 (first triangle, count) per image, on the CPU
        grad_db: bool = True,
    ) -> Tuple[Tensor, Tensor]:
        """Rasterize triangles into B images of H x W pixels.

        Conventions (as nvdiffrast): pixel (row i, column j) has its centre at clip-space
        x/w = 2 (j + 0.5) / W - 1, y/w = 2 (i + 0.5) / H - 1, so row 0 is at y/w = -1 (the bottom
        in OpenGL terms; our camera projection puts the image's top row there, see
        docs/CONVENTIONS.md). Only fragments with -1 <= z/w <= 1 are kept; triangles with a vertex at
        w <= 0 are culled by the torch backend (nvdiffrast clips them; see docs/CONVENTIONS.md).

        Returns:
            rast: [B, H, W, 4] float32 = (u, v, z/w, triangle_id + 1), all 0 where no triangle.
                (u, v) are clamped perspective-correct barycentrics of vertices 0 and 1 of the
                triangle; an attribute is u a0 + v a1 + (1 - u - v) a2.
            rast_db: [B, H, W, 4] float32 = (du/dX, du/dY, dv/dX, dv/dY) in pixel units,
                0 where no triangle.

        Differentiable: u, v (and rast_db when ``grad_db``) w.r.t. ``pos``; z/w and the triangle
        id carry no gradient. Silhouette gradients come from ``antialias``.
        """
        _check_tensor("pos", pos, dtype=torch.float32)
        _check_tensor("tri", tri, dtype=torch.int32, shape=(None, 3))
        if ranges is None:
            if pos.dim() != 3 or pos.shape[-1] != 4:
                raise ValueError(f"pos must be [B, V, 4] (or [V, 4] with ranges), got {tuple(pos.shape)}")
        else:
            if pos.dim() != 2 or pos.shape[-1] != 4:
                raise ValueError(f"with ranges, pos must be [V, 4], got {tuple(pos.shape)}")
            _check_tensor("ranges", ranges, dtype=torch.int32, shape=(None, 2))
            if ranges.device.type != "cpu":
                raise ValueError("ranges must be a CPU tensor (as in nvdiffrast)")
        height, width = (int(r) for r in resolution)
        if height <= 0 or width <= 0:
            raise ValueError(f"resolution must be positive (H, W), got {tuple(resolution)}")
        if self._dr is not None:
            return self._dr.rasterize(
                self._ctx, pos.contiguous(), tri.contiguous(), (height, width), ranges=ranges, grad_db=grad_db
            )
        if self._triton is not None:
            return self._triton.rasterize(pos, tri, (height, width), ranges=ranges, grad_db=grad_db)
        return torch_backend.rasterize(pos, tri, (height, width), ranges=ranges, grad_db=grad_db)

    # ---------------------------------------------------------------- interpolate
    def interpolate(
        self,
        attr: Tensor,  # [B, V, C], [1, V, C] (broadcast) or [V, C] (range mode); float32
        rast: Tensor,  # [B, H, W, 4] from rasterize
        tri: Tensor,  # [F, 3] int32
        rast_db: Optional[Tensor] = None,  # [B, H, W, 4] from rasterize; needed with diff_attrs
        diff_attrs: Union[None, str, Sequence[int]] = None,  # "all" or attribute channel indices
    ) -> Tuple[Tensor, Tensor]:
        """Interpolate per-vertex attributes at every pixel.

        Returns:
            out: [B, H, W, C] float32, u a0 + v a1 + (1 - u - v) a2 of the pixel's triangle; 0 where
                no triangle.
            out_da: [B, H, W, 2 K] float32, (dA/dX, dA/dY) in pixel units for each of the K channels
                named in ``diff_attrs`` (in that order); an empty [B, H, W, 0] tensor without them.

        Differentiable w.r.t. ``attr``, ``rast`` (u, v) and ``rast_db``.
        """
        _check_tensor("attr", attr, dtype=torch.float32)
        _check_rast("rast", rast)
        _check_tensor("tri", tri, dtype=torch.int32, shape=(None, 3))
        if attr.dim() not in (2, 3):
            raise ValueError(f"attr must be [B, V, C] or [V, C], got {tuple(attr.shape)}")
        if attr.dim() == 3 and attr.shape[0] not in (1, rast.shape[0]):
            raise ValueError(f"attr batch {attr.shape[0]} does not match rast batch {rast.shape[0]}")
        if diff_attrs is not None:
            if rast_db is None:
                raise ValueError("diff_attrs needs rast_db (from rasterize)")
            _check_rast("rast_db", rast_db, like=rast)
        if self._dr is not None:
            return self._dr.interpolate(attr.contiguous(), rast, tri.contiguous(), rast_db=rast_db, diff_attrs=diff_attrs)
        if self._triton is not None:
            return self._triton.interpolate(attr, rast, tri, rast_db=rast_db, diff_attrs=diff_attrs)
        return torch_backend.interpolate(attr, rast, tri, rast_db=rast_db, diff_attrs=diff_attrs)

    # -------------------------------------------------------------------- texture
    def texture(
        self,
        tex: Tensor,  # [B, h, w, C] or [1, h, w, C] (broadcast); float32
        uv: Tensor,  # [B, H, W, 2] texture coordinates, (0, 0) = first texel row/column corner
        uv_da: Optional[Tensor] = None,  # [B, H, W, 4] = (du/dX, du/dY, dv/dX, dv/dY)
        filter_mode: str = "auto",
        boundary_mode: str = "wrap",
        max_mip_level: Optional[int] = None,
    ) -> Tensor:  # [B, H, W, C]
        """Sample a 2D texture at ``uv`` (u along the width, v along the height; texel (i, j) covers
        u in [j/w, (j+1)/w], v in [i/h, (i+1)/h]).

        ``filter_mode``: "auto" = "linear-mipmap-linear" when ``uv_da`` is given, else "linear";
        "nearest"; "linear" (bilinear); "linear-mipmap-linear" (trilinear, level of detail
        0.5 log2 of the larger squared footprint axis in texels, as nvdiffrast; needs ``uv_da``).
        ``boundary_mode``: "wrap" (repeat), "clamp" (to edge texel centres), "zero" (outside = 0).

        Differentiable: nearest -> tex; linear -> tex, uv; linear-mipmap-linear -> tex, uv, uv_da.
        """
        if filter_mode not in FILTER_MODES:
            raise ValueError(f"filter_mode must be one of {FILTER_MODES}, got {filter_mode!r}")
        if boundary_mode not in BOUNDARY_MODES:
            raise ValueError(f"boundary_mode must be one of {BOUNDARY_MODES}, got {boundary_mode!r}")
        _check_tensor("tex", tex, dtype=torch.float32)
        _check_tensor("uv", uv, dtype=torch.float32)
        if tex.dim() != 4:
            raise ValueError(f"tex must be [B, h, w, C], got {tuple(tex.shape)}")
        if uv.dim() != 4 or uv.shape[-1] != 2:
            raise ValueError(f"uv must be [B, H, W, 2], got {tuple(uv.shape)}")
        if tex.shape[0] not in (1, uv.shape[0]):
            raise ValueError(f"tex batch {tex.shape[0]} does not match uv batch {uv.shape[0]}")
        if filter_mode == "auto":
            filter_mode = "linear-mipmap-linear" if uv_da is not None else "linear"
        if filter_mode == "linear-mipmap-linear":
            if uv_da is None:
                raise ValueError("filter_mode='linear-mipmap-linear' needs uv_da")
            _check_tensor("uv_da", uv_da, dtype=torch.float32, shape=tuple(uv.shape[:3]) + (4,))
        if self._dr is not None:
            return self._dr.texture(
                tex.contiguous(), uv.contiguous(),
                uv_da=uv_da.contiguous() if (uv_da is not None and filter_mode == "linear-mipmap-linear") else None,
                filter_mode=filter_mode, boundary_mode=boundary_mode, max_mip_level=max_mip_level,
            )
        backend = self._triton if self._triton is not None else torch_backend
        return backend.texture(
            tex, uv, uv_da=uv_da, filter_mode=filter_mode, boundary_mode=boundary_mode, max_mip_level=max_mip_level
        )

    # ------------------------------------------------------------------ antialias
    def antialias(
        self,
        color: Tensor,  # [B, H, W, C] float32 shaded image
        rast: Tensor,  # [B, H, W, 4] from rasterize
        pos: Tensor,  # [B, V, 4] or [V, 4] clip-space positions used for rast
        tri: Tensor,  # [F, 3] int32
    ) -> Tensor:  # [B, H, W, C]
        """Analytic anti-aliasing of silhouette edges (nvdiffrast's method).

        For each pair of horizontally or vertically adjacent pixels showing different triangles
        (or a triangle and background), the nearer triangle's silhouette edge that crosses the
        segment between the two pixel centres blends the two colours by the crossing position.
        This is what gives vertex positions gradients from coverage (silhouettes).

        Differentiable w.r.t. ``color`` and ``pos``.
        """
        _check_tensor("color", color, dtype=torch.float32)
        _check_rast("rast", rast)
        _check_tensor("pos", pos, dtype=torch.float32)
        _check_tensor("tri", tri, dtype=torch.int32, shape=(None, 3))
        if color.dim() != 4 or tuple(color.shape[:3]) != tuple(rast.shape[:3]):
            raise ValueError(f"color must be [B, H, W, C] matching rast {tuple(rast.shape[:3])}, got {tuple(color.shape)}")
        if self._dr is not None:
            tri = tri.contiguous()
            return self._dr.antialias(color.contiguous(), rast, pos.contiguous(), tri,
                                      topology_hash=self._topology_of(tri))
        if self._triton is not None:
            return self._triton.antialias(color, rast, pos, tri, opposite=self._topology_of(tri))
        return torch_backend.antialias(color, rast, pos, tri)

    def _topology_of(self, tri: Tensor):  # nvdiffrast's edge hash / triton's adjacency of ``tri``
        """Both backends need the mesh's edge adjacency and would build it on every antialias call;
        an optimisation renders the same faces thousands of times. Kept for the same tensor object
        at the same version (the cache holds the tensor, so its memory cannot be reused by another
        one): an in-place change of ``tri`` or another tensor rebuilds it."""
        if self._topology is None or self._topology[0] is not tri or self._topology[1] != tri._version:
            if self._dr is not None:
                topology = self._dr.antialias_construct_topology_hash(tri)
            else:
                topology = self._triton.opposite_vertices(tri)
            self._topology = (tri, tri._version, topology)
        return self._topology[2]


def _log_choice_once(backend: str, message: str) -> None:
    if backend not in _logged_choices:
        _logged_choices.add(backend)
        log.info(message)


def _warn_torch_on_cuda_once() -> None:
    global _torch_on_cuda_warned
    if not _torch_on_cuda_warned:
        _torch_on_cuda_warned = True
        warnings.warn(
            f"nvdiffrast unavailable ({_nvdiffrast_import_error}) and triton unavailable ({_triton_import_error}); "
            "using the slower torch rasterizer on CUDA",
            RuntimeWarning,
            stacklevel=4,
        )


def _check_tensor(name: str, t: Tensor, dtype: torch.dtype, shape: Optional[tuple] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")


def _check_rast(name: str, rast: Tensor, like: Optional[Tensor] = None) -> None:
    _check_tensor(name, rast, dtype=torch.float32)
    if rast.dim() != 4 or rast.shape[-1] != 4:
        raise ValueError(f"{name} must be [B, H, W, 4], got {list(rast.shape)}")
    if like is not None and rast.shape != like.shape:
        raise ValueError(f"{name} shape {list(rast.shape)} does not match {list(like.shape)}")
