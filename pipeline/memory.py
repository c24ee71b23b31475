"""Giving memory back between jobs, for a server that runs many of them in one process.

glibc keeps freed heap blocks in per-thread arenas (up to 8 per core) and returns them to the
system only when asked. A server whose uploads, validators and jobs run on many threads therefore
stayed about 30% above its idle memory after 8 concurrent jobs (tests/test_load.py measured 506 ->
654 MB); with two arenas and a trim after each job it stays within 10% of its working set
(docs/BENCHMARKS.md, "Load on the CPU").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Optional

import torch

_M_ARENA_MAX = -8  # glibc's mallopt parameter number for MALLOC_ARENA_MAX


def free_memory() -> None:
    """Hand memory that is no longer referenced back: torch's CUDA cache and the C heap's free pages."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def limit_heap_arenas(arenas: int = 2) -> None:
    """Cap glibc's heap arenas (as MALLOC_ARENA_MAX would); call at start-up, before threads start.
    Does nothing where the C library is not glibc."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_ARENA_MAX, arenas)


def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc (macOS, Windows, musl): nothing to do
        return None


_LIBC = _glibc()
