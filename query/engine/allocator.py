"""The C allocator's settings of a ``forvalue`` process: keep freed memory for the next large array.

Scans, G-form builds and decodes make and drop arrays of tens to hundreds of MB many times (a chunk of a table, a
block's pairs). glibc's malloc serves each from fresh pages (``mmap`` above its threshold; a thread's own arena
cannot hold them) and gives them back on free, so every one is paid again in first-touch page faults: the
1,000-sample audit of docs/benchmarks.md took ~630k minor faults and 2.3 s of system time. Serving them from one
heap that keeps what it frees (one arena, ``mmap`` only above 1 GiB, trimmed only past 1 GiB free) took 370k faults
and 1.2 s (docs/benchmarks.md, "Ninth pass").

Only the ``forvalue`` program sets it (:func:`forvalue.__main__.run`, before any thread exists); a program that
imports forvalue keeps its own allocator. Settings the user gave (``MALLOC_ARENA_MAX`` and the like, read by
glibc itself) are left alone, and a C library other than glibc is left as it is.
"""

from __future__ import annotations

import os
import sys

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# Allocations below this come from the heap; freed memory above it at the heap's top goes back to the system.
KEEP_BYTES = 1 << 30
USER_SETTINGS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed large blocks (see the module); whether it was set. Call it before threads
    start (an arena made earlier keeps its own)."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc's own symbol: musl has mallopt too, as a no-op)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, KEEP_BYTES), (M_TRIM_THRESHOLD, KEEP_BYTES))
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)
