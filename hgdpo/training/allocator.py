"""glibc ``malloc`` settings that stop CPU training from mapping its working memory afresh at every step.

PyTorch's CPU allocator caches nothing: every tensor is a ``posix_memalign`` and a ``free``. glibc serves
a block over its mmap threshold with a fresh ``mmap`` and unmaps it when it is freed. The threshold is
dynamic (it rises to the size of the largest mmapped block freed so far) but never above 32 MiB, and
the heap's top is returned to the kernel beyond twice that threshold. A training step of the SD1.5 UNet
on the CPU allocates and frees gigabytes in such blocks: oneDNN re-lays out every convolution weight at
every call (up to 118 MB each), and the activations of the policy and reference passes and their
gradients come and go with the step. Measured at 64 px, 2 pairs, fp32: 1.38 M minor page faults
(5.6 GB of zeroed pages) and 4.5-6 s of system time per optimizer step, every step.

With ``M_MMAP_MAX = 0`` every block comes from the heap (no per-block ``mmap``/``munmap``), and with a
large ``M_TRIM_THRESHOLD`` (which also freezes the dynamic threshold) the heap keeps its freed top for
the next step. The next step then reuses the pages of the previous one: a few hundred faults per step
instead of 1.38 M, and the same peak memory. Memory that another thread's arena cannot serve from its
heap still falls back to ``mmap``, so no allocation can fail because of these settings.

The settings are process-wide and affect only allocations made after they are applied; earlier ones are
freed as before. Only glibc has ``mallopt``; elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt(3) parameter numbers of glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
DISABLE_ENV = "HGDPO_KEEP_FREED_MEMORY"  # "0": leave glibc's defaults alone


def keep_freed_memory(trim_threshold: int = 1 << 30) -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the kernel; True if applied.

    ``trim_threshold`` is how much free memory the top of the heap may keep (bytes). Returns False,
    changing nothing, off glibc or when the environment sets ``HGDPO_KEEP_FREED_MEMORY=0``.
    """
    if os.environ.get(DISABLE_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other libcs: no libc.so.6 or no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold)) and bool(mallopt(_M_MMAP_MAX, 0))
