"""Host memory during attrax's computations: reuse freed blocks instead of mapping fresh pages.

A vectorized backward allocates and frees the same large temporaries (``[targets, heads, n, n]``
attention gradients: 340 MB each on a 1152-token GPT-2 with 16 targets) again and again. glibc
serves every block above its mmap threshold (32 MiB at most) with a fresh ``mmap`` and unmaps it
on ``free``, so each one is page-faulted and zeroed by the kernel anew: on the 2-core benchmark
machine that was 30 of 40 seconds of system time on W3 saliency. Within :func:`reuse_host_memory`
large blocks come from the heap and are reused; at the end, if much of the heap is free, it goes
back to the OS.

Linux with glibc only; elsewhere, and when the user tuned malloc through its environment
variables (theirs win), nothing changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator
from typing import Any

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

# mallopt takes an int: 2 GiB is the largest trim threshold it can set
DURING = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}
# Setting any parameter freezes glibc's sliding thresholds. Afterwards they are left where the
# sliding rule ends on a 64-bit machine, which a torch process reaches after its first large free,
# rather than at the small initial values that would map every block above 128 KiB.
AFTER = {M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20}
# Free heap kept after a call, as glibc itself keeps blocks below its thresholds: releasing a
# small call's ~100 MB every time made W1 saliency 25% slower, as the next call faults it back in
KEEP_FREE = 256 << 20
TUNING_VARIABLES = (
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_TRIM_THRESHOLD_",
    "GLIBC_TUNABLES",
)

_lock = threading.Lock()
_depth = 0
_libc: Any = None


def _glibc() -> Any:
    """The C library if it is glibc and the user left malloc untuned, else None."""
    global _libc
    if any(name in os.environ for name in TUNING_VARIABLES):
        return None
    if _libc is None:
        _libc = False
        if _is_glibc():
            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL(None)
                libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
                with contextlib.suppress(AttributeError):  # glibc >= 2.33
                    libc.mallinfo2.restype = _MallInfo2
                _libc = libc
    return _libc or None


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _free_bytes(libc: Any) -> int | None:
    """Free bytes held in malloc's arenas, or None where glibc cannot say (before 2.33)."""
    try:
        return int(libc.mallinfo2().fordblks)
    except AttributeError:
        return None


def _is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not a POSIX system, or no such name
        return False


def _set(libc: Any, parameters: dict[int, int]) -> None:
    for parameter, value in parameters.items():
        libc.mallopt(parameter, value)


@contextlib.contextmanager
def reuse_host_memory() -> Iterator[None]:
    """Within the block, freed host memory is reused; after the outermost block, free memory
    beyond :data:`KEEP_FREE` is released.

    Re-entrant and thread-safe: nested and concurrent blocks share one setting.
    """
    global _depth
    libc = _glibc()
    if libc is None:
        yield
        return
    with _lock:
        if _depth == 0:
            _set(libc, DURING)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(libc, AFTER)
                free = _free_bytes(libc)
                if free is None or free > KEEP_FREE:
                    libc.malloc_trim(0)
