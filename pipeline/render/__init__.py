"""Differentiable rendering: one interface (`Rasterizer`), an nvdiffrast and a torch backend."""

from .rasterizer import Rasterizer, nvdiffrast_available

__all__ = ["Rasterizer", "nvdiffrast_available"]
