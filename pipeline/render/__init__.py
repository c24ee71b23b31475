"""Differentiable rendering: one interface (`Rasterizer`) over nvdiffrast, triton and torch backends."""

from .rasterizer import Rasterizer, nvdiffrast_available, triton_available

__all__ = ["Rasterizer", "nvdiffrast_available", "triton_available"]
