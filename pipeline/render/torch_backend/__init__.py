"""Pure-PyTorch reference implementation of the four nvdiffrast ops (any device, CPU first)."""

from .antialias import antialias
from .interpolate import interpolate
from .rasterize import rasterize
from .texture import texture

__all__ = ["rasterize", "interpolate", "texture", "antialias"]
