"""Keep freed memory in the training process's heap, so a DP-SGD step does not page it back in.

A DP-SGD step allocates and frees megabytes of short-lived tensors (a convolution's input
windows and per-record gradients, the noise's workspace). glibc's malloc hands freed memory
back to the operating system once the free top of the heap exceeds its trim threshold, and
serves a large request with a fresh ``mmap``; either way the next step touches new pages, and
every first touch is a page fault that the kernel serves by zeroing a page. Measured on the
2-core build machine: 2,700-6,300 page faults an epoch for a CNN fusion under DP (8 steps),
4-32 ms of system time in a 160-290 ms epoch; plain SGD of the same model, 0-700 faults.

glibc raises both thresholds on its own as large blocks are freed (up to a 32 MiB ``mmap``
threshold and twice that to trim), but only as far as the blocks it happened to free so far, so
whether a process stops faulting depends on the order of its allocations (a probe of 40 blocks of
512 KiB freed and taken again: every round faulted in 3 of 5 processes, none from the third or
fourth round on in the other 2); :func:`keep_heap` sets them at their maximum at once with ``mallopt``.
The process then keeps up to 64 MiB of freed memory for reuse (its peak footprint is
unchanged: nothing is kept that was not in use before). Linux with glibc only; elsewhere, or
with ``FEDMM_KEEP_HEAP=0`` in the environment, nothing changes (any value but 0 or 1 is refused).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_heap"]

logger = logging.getLogger(__name__)

MMAP_THRESHOLD = 32 << 20  # glibc's largest dynamic mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what glibc sets with it
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_done: set[int] = set()  # the processes (pids) already set: a forked child does it again


def keep_heap() -> bool:
    """Set this process's malloc thresholds as above, once; return whether they are set."""
    pid = os.getpid()
    if pid in _done:
        return True
    setting = os.environ.get("FEDMM_KEEP_HEAP", "1").strip()
    if setting not in ("0", "1"):
        raise ValueError(f"FEDMM_KEEP_HEAP={setting!r} in the environment: expected 0 (keep the allocator's own thresholds) or 1 (the default). Fix: unset it, or set it to 0 or 1")
    if setting == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc's, when the process uses glibc
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        logger.debug("mallopt refused fedmm's heap thresholds; the allocator keeps its own")
        return False
    _done.add(pid)
    return True
