"""How a worker process allocates: memory freed after one batch is kept for the next.

glibc's malloc serves every block above its mmap threshold (128 KiB, rising to at most 32 MiB) with a fresh
mmap and returns it to the kernel on free, so each forward pass of a CPU model maps its large activations
anew and takes a page fault on every 4 KiB page it writes (ViT-B-32, batch 64: about 300,000 faults per
batch). `keep_freed_memory` makes the worker's malloc serve all blocks from its heap and never trim it, so
the next batch reuses the same, already mapped pages (measured in docs/benchmarks.md, "Allocator").
The price is that a worker's resident memory stays at its peak; a worker lives for one run, with
same-sized batches, so its peak is what it needs anyway. Only model workers call it, never the driver.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

TOP_PAD = 256 << 20  # the heap grows in steps of this much, so growing is rare too
NEVER_TRIM = (1 << 31) - 1  # mallopt takes an int


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc's malloc, for this process: no mmap'd blocks, no trimming. False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, NEVER_TRIM), (_M_TOP_PAD, TOP_PAD)))
