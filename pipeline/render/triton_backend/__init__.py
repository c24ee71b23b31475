"""Triton implementation of the four nvdiffrast ops (CUDA; the CPU through TRITON_INTERPRET=1).

Triton ships with every CUDA build of torch and compiles its kernels at run time with its own
bundled compiler (MIT licence): this backend needs no CUDA toolkit and no build step. It follows
the torch backend (`pipeline.render.torch_backend`, the reference it is tested against) in every
convention: the same fixed-point coverage test, fill rule, depth test, barycentrics, gradients and
antialiasing decisions. Importing this package imports triton; `pipeline.render.Rasterizer` does
that lazily and falls back to the torch backend when it fails.
"""

from .antialias import antialias, opposite_vertices
from .interpolate import interpolate
from .rasterize import INTERPRETED, rasterize
from .texture import texture

__all__ = ["INTERPRETED", "rasterize", "interpolate", "texture", "antialias", "opposite_vertices"]
