"""Row gathers whose gradient is the same on every run."""

from __future__ import annotations

from torch import Tensor


def take_rows(table: Tensor, index: Tensor) -> Tensor:  # [R, ...], [...] int64 -> [..., ...]
    """``table[index]`` along the first dimension (differentiable w.r.t. ``table``).

    Used wherever rows repeat (a vertex shared by many pixels) because the backward of ``index_select``
    is an ``index_add``, which the CPU sums in index order, while the backward of ``table[index]`` is an
    ``index_put(accumulate=True)``, which the CPU sums with parallel atomic adds: its float sums, and so
    a whole refinement, then differ from run to run. On CUDA both use atomics (see README, "Seed").
    """
    return table.index_select(0, index.reshape(-1)).view(*index.shape, *table.shape[1:])
