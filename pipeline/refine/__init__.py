"""The refine stage: the surface and its appearance fitted to the photos by differentiable rendering.

One file per concern: `loop` (the schedule, events, previews), `surface` (the surface's
parametrisation and regularisers), `appearance` (photo projection, texture, baking), `poses`
(per-photo camera corrections).
"""

from .loop import Cancelled, check_cancel, refine

__all__ = ["Cancelled", "check_cancel", "refine"]
