"""Keep freed memory in the process instead of returning it to the OS after every step.

glibc serves every allocation above 32 MB (a softmax logits matrix, a char-CNN activation)
with a fresh ``mmap`` and unmaps it on free, so each training step page-faults its largest
tensors in again, a sizeable part of a CPU step (docs/measurements.md, "malloc"). Turning ``mmap``
allocations off and trimming the heap only above 16 GiB lets the allocator reuse that
memory. Freed memory is not handed back between steps, and the heap can fragment when
the sizes vary: ``bilm train`` (same shapes every step) keeps it, ``bilm evaluate`` does
not (its peak RSS was higher with it, for no speed).
Set ``BILM_KEEP_FREED_MEMORY=0`` to leave the allocator alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as above; returns whether it was done (False off glibc or when disabled)."""
    if os.environ.get("BILM_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 16 << 30))
