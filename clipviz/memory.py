"""Handing freed memory back to the operating system (glibc), so that a conversion peaks near one copy of a model.

Both helpers are process-wide and do nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import gc

GLIBC_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def return_freed_memory_promptly() -> None:
    """Make glibc serve every allocation of 1 MiB or more (all sizeable tensors) with its own mmap, so that freeing a
    tensor returns its memory to the OS at once. By default glibc raises that threshold as blocks are freed (up to
    32 MiB), after which the source tensors released while casting stay in its arenas and the cast copies come on
    top: converting OpenAI's fp16 ViT-L/14 to fp32 peaked 0.35 GB higher. Process-wide; a no-op without glibc."""
    libc = _glibc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(GLIBC_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def release_memory() -> None:
    """Free what is unreferenced and hand freed heap memory back to the OS, so that the model reloaded for
    verification does not come on top of the released source tensors. A no-op where there is no glibc."""
    gc.collect()
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
