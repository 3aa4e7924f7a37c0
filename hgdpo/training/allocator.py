"""glibc ``malloc`` settings that stop CPU training from re-mapping its working memory at every step."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt(3) parameter numbers of glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory(trim_threshold: int = 1 << 30) -> bool:
    """Make glibc keep freed blocks for reuse instead of handing them back to the kernel; True if applied.

    PyTorch's CPU allocator caches nothing: each tensor is a ``malloc`` and a ``free``. glibc serves
    blocks over its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps them when they are
    freed, and it returns the top of the heap beyond the trim threshold to the kernel. A training step
    of the SD1.5 UNet frees gigabytes of such blocks (oneDNN's re-laid-out convolution weights, up to
    59 MB each, activations and gradients), so the next step faults them all in again as zeroed pages:
    about 1.4 M minor page faults and 3-4 s of system time per step at 64 px. Serving every block from
    the heap (``M_MMAP_MAX = 0``) and trimming its top only beyond ``trim_threshold`` bytes lets every
    step reuse the pages of the previous one; the peak memory is that of one step, as before.

    Only glibc (Linux) has these settings; elsewhere nothing changes. Apply it to CPU training only:
    on a GPU the host side of a step allocates little and CUDA has its own caching allocator.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold)) and bool(mallopt(_M_MMAP_MAX, 0))
