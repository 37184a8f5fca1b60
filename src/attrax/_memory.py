"""Memory: how much a call may hold at once (planning ``"auto"`` sizes), and host memory.

Planning: :func:`plan` resolves ``chunk_size``/``batch_size`` from an estimate of one backward's
memory against ``max_memory``, else half the device's free memory (on the host, also below its
memory cgroup's limit and a Dask worker's: :func:`memory_budget`).

Host memory: within :func:`reuse_host_memory`, freed host memory is reused instead of mapping
fresh pages; :func:`bound_kernel_caches` bounds oneDNN's caches of compiled CPU kernels.

A vectorized backward allocates and frees the same large temporaries (``[targets, heads, n, n]``
attention gradients) again and again. glibc serves every block above its mmap threshold (32 MiB
at most) with a fresh ``mmap`` and unmaps it on ``free``, so each one is page-faulted and zeroed by
the kernel anew (most of the system time of long CPU calls; measured in docs/benchmarks.md).
Within :func:`reuse_host_memory` large blocks come from the heap and are reused; at the end, if
much of the heap is free, it goes back to the OS (measured at most once a second, or when the
process grew: :func:`_trim`). The heap is also given back between passes whenever the freed
memory it holds could take the next pass past the call's budget (:func:`between_passes`).

This is a process-wide setting of glibc's malloc, made only while an attrax computation runs.
Linux with glibc only; elsewhere, when the user tuned malloc through its environment variables
(theirs win), or with ``ATTRAX_HOST_MEMORY=system`` in the environment, nothing changes. glibc
has no way to read its parameters back, so on leaving the block they are set to where glibc's own
sliding thresholds end (:data:`AFTER`), not to values read before.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from ._errors import OptionError

AUTO = "auto"
# points per forward / targets per backward: a positive int, None (all at once) or "auto"
Size = int | str | None

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
# small call's ~100 MB every time made small calls slower, as the next call faults it back in
KEEP_FREE = 256 << 20
# Measuring the free heap walks malloc's bins (~0.4 ms, ~1% of a small classifier's call): after
# a call it is measured when CHECK_EVERY seconds have passed since the last measure, or when the
# process's resident memory grew by more than GREW since then (a call that grew the heap)
CHECK_EVERY = 1.0
GREW = KEEP_FREE // 4
TUNING_VARIABLES = (
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_TRIM_THRESHOLD_",
    "GLIBC_TUNABLES",
)

#: ``ATTRAX_HOST_MEMORY=system`` leaves glibc's malloc as it is
SWITCH = "ATTRAX_HOST_MEMORY"

_lock = threading.Lock()
_depth = 0
_libc: Any = None
# (monotonic seconds, resident bytes) at the last measure of the free heap
_measured: tuple[float, int] = (-float("inf"), 0)
# the outermost block's resident bytes at entry, and a stated budget with its planned pass bytes
_entry_resident: int | None = None
_limit: tuple[int, int] | None = None
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _glibc() -> Any:
    """The C library if it is glibc and the user left malloc untuned, else None."""
    global _libc
    if any(name in os.environ for name in TUNING_VARIABLES):
        return None
    if os.environ.get(SWITCH, "").lower() == "system":
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


_proc_files: dict[str, tuple[int, int]] = {}  # path -> (pid, descriptor)


def _read_proc(path: str) -> bytes:
    """A ``/proc`` file read again through a descriptor kept open (a tenth of an ``open``;
    reopened in a forked child, whose ``/proc/self`` is another process)."""
    pid = os.getpid()
    held = _proc_files.get(path)
    if held is None or held[0] != pid:
        held = _proc_files[path] = (pid, os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
    return os.pread(held[1], 4096, 0)


def _resident() -> int | None:
    """The process's resident bytes (Linux), or None where they cannot be read."""
    try:
        return int(_read_proc("/proc/self/statm").split()[1]) * _PAGE
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc, or no pread
        return None


def _trim(libc: Any) -> None:
    """Release the free heap beyond :data:`KEEP_FREE`, measured at most every
    :data:`CHECK_EVERY` seconds unless resident memory grew by :data:`GREW`."""
    global _measured
    now, resident = time.monotonic(), _resident()
    last, was = _measured
    if resident is not None and now - last < CHECK_EVERY and resident - was <= GREW:
        return
    free = _free_bytes(libc)
    if free is None or free > KEEP_FREE:
        libc.malloc_trim(0)
        resident = _resident()
    _measured = (now, resident or 0)


def _is_glibc() -> bool:
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")  # None: the name is unset
        return version is not None and version.startswith("glibc")
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
    global _depth, _entry_resident, _limit
    libc = _glibc()
    if libc is None:
        yield
        return
    with _lock:
        if _depth == 0:
            _set(libc, DURING)
            _entry_resident, _limit = _resident(), None
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(libc, AFTER)
                _trim(libc)
                _entry_resident = _limit = None


def expect_passes(budget: int | None, pass_bytes: int, device: torch.device) -> None:
    """Note the call's budget (None: :func:`memory_budget`'s) and the planned bytes of each
    pass, for :func:`between_passes` (the planner calls this; nothing happens outside
    :func:`reuse_host_memory`, or off the CPU)."""
    global _limit
    if device.type == "cpu" and _depth:
        budget = memory_budget(device) if budget is None else budget
        with _lock:
            _limit = (budget, pass_bytes)


def between_passes() -> None:
    """Before a pass: give the free heap back to the OS when the resident growth since the call
    began plus the planned pass could exceed the call's budget (its ``max_memory``, else
    :func:`memory_budget`'s, which calls reach near a cgroup's or a Dask worker's limit).

    Reused heap is resident wherever it was freed, and a pass's blocks may not fit the holes an
    earlier pass left, so the freed memory and the next pass add up (docs/memory.md); the budget
    wins over the faults saved.
    """
    limit, entry = _limit, _entry_resident
    if limit is None or entry is None:
        return
    resident = _resident()
    if resident is not None and resident - entry + limit[1] > limit[0]:
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)


# oneDNN, which runs bfloat16 and float16 matmuls on the CPU, keeps every kernel it compiles
# (about 1 MiB each, one per shape) in two caches of 1,024 (its own and ideep's): over many
# lengths (a dataset) a process grew by 1.1 GiB and on. A pass uses 10-20; 64 measured no slower.
KERNEL_CACHE_CAPACITY = 64
# each cache's variables, the first the one set; a user's value under any of them wins
KERNEL_CACHES = (
    ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY"),
    ("LRU_CACHE_CAPACITY",),
)


def bound_kernel_caches() -> None:
    """Bound oneDNN's CPU kernel caches to :data:`KERNEL_CACHE_CAPACITY` kernels each.

    oneDNN reads these variables when it compiles its first kernel, so this is done when a
    model is loaded; later it changes nothing. A cache whose variable the user set is left
    alone, and so is everything with ``ATTRAX_HOST_MEMORY=system``.

    >>> import os
    >>> bound_kernel_caches()
    >>> os.environ.get("LRU_CACHE_CAPACITY") is not None
    True
    """
    if os.environ.get(SWITCH, "").lower() == "system":
        return
    for names in KERNEL_CACHES:
        if not any(name in os.environ for name in names):
            os.environ[names[0]] = str(KERNEL_CACHE_CAPACITY)


# --- planning ------------------------------------------------------------------------------

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "pb": 10**15,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
}


def parse_bytes(value: int | str | None, name: str = "max_memory") -> int | None:
    """Bytes from an int or a string such as ``"8GB"`` (10**9) or ``"512MiB"`` (2**20); None stays.

    >>> parse_bytes("512MiB"), parse_bytes("1.5 GB"), parse_bytes(4096)
    (536870912, 1500000000, 4096)
    >>> parse_bytes("8 parsecs")
    Traceback (most recent call last):
    attrax._errors.OptionError: `max_memory` must be a positive number of bytes (an int, or a string such as '8GB' or '512MiB'), got '8 parsecs'
    """
    if value is None:
        return None
    expected = (
        f"`{name}` must be a positive number of bytes (an int, or a string such as '8GB' or "
        f"'512MiB'), got {value!r}"
    )
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise OptionError(expected)
        return value
    if not isinstance(value, str):
        raise OptionError(expected)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
    unit = match and _UNITS.get(match.group(2).lower() or "b")
    if not match or not unit or float(match.group(1)) * unit < 1:
        raise OptionError(expected)
    if unit == 1 and not float(match.group(1)).is_integer():
        # "1.5" is 1.5 bytes, which was taken as 1: a unit was meant
        raise OptionError(f"{expected}: a number without a unit is whole bytes; give a unit")
    return int(float(match.group(1)) * unit)


def out_of_memory(err: BaseException) -> str | None:
    """What running out of memory tried to allocate (``"665 TB"``, or ``""`` where the message
    does not say), or None where ``err`` is no allocation failure (torch's on the CPU or a GPU,
    numpy's, Python's).

    >>> out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 2000 bytes."))
    '2 kB'
    >>> out_of_memory(RuntimeError("expected a tensor")) is None
    True
    """
    text = str(err)
    # and sizes whose bytes overflow int64 (numpy's, torch's): more than any memory holds
    said = (
        "out of memory",
        "can't allocate memory",
        "array is too big",
        "size calculation overflow",
    )
    if not isinstance(err, MemoryError) and not any(s in text.lower() for s in said):
        return None
    found = re.search(
        r"(?:tried|unable) to allocate ([0-9]+ bytes|[0-9.]+ ?[KMGTP]?i?B)\b", text, re.I
    )
    if found is None:
        return ""
    size = found.group(1)
    if size.endswith("bytes"):
        return format_bytes(int(size.split()[0]))
    number, unit = re.fullmatch(r"([0-9.]+) ?(.*)", size).groups()  # type: ignore[union-attr]
    return f"{number.rstrip('.')} {unit}"  # numpy writes "745. GiB"


def format_bytes(n: int, up: bool = False) -> str:
    """``n`` bytes for a message: ``"1.23 GB"``, to 3 digits; ``up`` rounds up, so that a
    smallest budget a message names is enough when given back.

    >>> format_bytes(1_234_567_890), format_bytes(1_234_567_890, up=True), format_bytes(2 * 10**18)
    ('1.23 GB', '1.24 GB', '2,000 PB')
    """
    # to 3 significant digits in bytes first, which the decimal units below show exactly
    step = 10 ** max(len(str(n)) - 3, 0)
    n = -(-n // step) * step if up else (n + step // 2) // step * step
    for unit in ("PB", "TB", "GB", "MB", "kB"):
        scale = _UNITS[unit.lower()]
        if n >= scale:
            value = n / scale
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:,.0f} {unit}"
    return f"{n} B"


# Live tensors per family, in units of a layer's widest activation ``[B, L, width]`` (width: the
# MLP, 4 * hidden, or heads * L for eager attention's weights). Measured on the CPU by
# ``python -m benchmarks calibrate`` and rounded up (docs/memory.md): ``backward`` per cotangent
# of the vectorized backward, ``forward`` per layer saved by the forward for it, ``inference``
# per copy of a forward without gradients (perturbation methods).
LIVE_TENSORS: dict[str, dict[str, float]] = {
    "gpt2": {"backward": 12, "forward": 10, "inference": 9},
    "llama": {"backward": 12, "forward": 8, "inference": 10},
    # Gemma 2, Gemma 3, OLMo 2: Llama's, whose norms after attention and MLP (in float32) and
    # on queries and keys save more per layer
    "gemma": {"backward": 12, "forward": 11, "inference": 11},
    "encoder-decoder": {"backward": 8, "forward": 8, "inference": 8},
}
# Of those units, how many a bfloat16 or float16 model still prices at 4 bytes (the rest at its
# own size). On the CPU, fitted per family: its resident memory held 0.63-0.95 of float32's per
# point, not half (``python -m benchmarks calibrate --dtype bfloat16``). Elsewhere only the
# tensors count, which halve but for HF Llama's eager attention, whose softmax weights stay
# float32 (``--meter tensors``; SDPA keeps none). docs/memory.md has the measurements.
FLOAT32_TENSORS: dict[str, dict[str, dict[str, float]]] = {
    "cpu": {
        "gpt2": {"backward": 0, "forward": 4, "inference": 0},
        "llama": {"backward": 3, "forward": 8, "inference": 1},
        "gemma": {"backward": 3, "forward": 11, "inference": 4},
        "encoder-decoder": {"backward": 1, "forward": 5, "inference": 0},
    },
    # Llama under SDPA on the CPU: no float32 softmax weights beside their bfloat16 copy, so
    # fewer of the forward's units stay float32 than under eager attention (docs/memory.md)
    "cpu-sdpa": {"llama": {"backward": 0, "forward": 5, "inference": 1}},
    # Gemma's norms compute in float32 whatever the model's precision, and keep it
    "eager": {
        "llama": {"backward": 0, "forward": 2, "inference": 0},
        "gemma": {"backward": 0, "forward": 4, "inference": 0},
    },
}


def _entry_bytes(
    family: str, kind: str, element_size: int, device: str = "cpu", eager: bool = True
) -> float:
    """Bytes per entry of ``[B, L, width]`` of ``kind`` (a key of ``LIVE_TENSORS``) for
    ``family`` at ``element_size`` on a ``device`` of that type (``eager``: eager attention):
    below float32, its ``FLOAT32_TENSORS`` units at 4 bytes.

    >>> _entry_bytes("llama", "forward", 4), _entry_bytes("llama", "forward", 2)
    (32, 32)
    >>> _entry_bytes("llama", "forward", 2, "cuda"), _entry_bytes("llama", "forward", 2, "cuda", False)
    (20, 16)
    >>> _entry_bytes("llama", "forward", 2, "cpu", eager=False)
    26
    """
    units = LIVE_TENSORS[family][kind]
    if element_size >= 4:
        return units * element_size
    if device == "cpu":
        table = FLOAT32_TENSORS["cpu"] | ({} if eager else FLOAT32_TENSORS["cpu-sdpa"])
    elif eager:
        table = FLOAT32_TENSORS["eager"]
    else:
        return units * element_size
    wide = table.get(family, {}).get(kind, 0)
    return (units - wide) * element_size + wide * 4


# A source token's jvp in forward mode: its dual stream of a forward's temporaries, in units
# of the primal's (measured, docs/memory.md "Forward mode")
JVP_STREAMS = 1


# What a call holds besides its passes (small tensors, the allocator's and thread pools' own):
# 13-56 MB measured on the CPU above a warmed-up process (docs/memory.md)
CALL_OVERHEAD = 64 << 20


class Cost(NamedTuple):
    """Estimated bytes of one call:
    ``fixed + targets * per_target + points * (per_point + targets * per_cotangent)``.

    ``per_point``: what the forward keeps for the backward (or, without one, a forward's
    temporaries) per point; ``per_cotangent``: one target's backward at one point;
    ``per_target``: what a target of a pass holds whatever its points (head attribution's
    gradients of the attention weights); ``fixed``: the results, held whatever the sizes.
    """

    per_cotangent: int
    per_point: int = 0
    fixed: int = 0
    per_target: int = 0

    def at(self, points: int, targets: int) -> int:
        """Bytes with ``points`` points per forward and ``targets`` targets per backward."""
        return (
            self.fixed
            + targets * self.per_target
            + points * (self.per_point + targets * self.per_cotangent)
        )


def backward_bytes(
    examples: int,
    tokens: int,
    hidden: int,
    element_size: int,
    mlp: int,
    heads: int,
    family: str = "gpt2",
    device: str = "cpu",
    relative: int = 0,
) -> int:
    """Estimated memory of one target's backward at one point, for all ``examples``, on a
    ``device`` of that type (``heads`` 0: fused attention); ``relative``: the entries per token
    a layer's relative-position terms keep (:func:`attrax._arch.relative_width`), whose gradient
    and its scatter into them are live at once."""
    entry = _entry_bytes(family, "backward", element_size, device, heads > 0)
    width = _width(tokens, hidden, mlp, heads)
    return int(examples * tokens * (width * entry + 2 * relative * element_size))


# [B, K, vocabulary] tensors a point holds at its K target rows: the logits and their
# log-softmax, with a backward their gradient in turn (all but the logits in float32 at least:
# head_bytes; measured in docs/memory.md)
HEAD_LIVE = 2.5


def head_bytes(
    examples: int, targets: int, vocabulary: int, element_size: int, backward: bool = False
) -> int:
    """Estimated memory of one point's output projection at its ``targets`` rows: a vocabulary
    of 50,257 over 32 targets is 6 MiB a tensor, more than the body of a small model holds.

    The logits are in the model's precision; the objective's tensors in float32 at least. Below
    float32 the log-softmax reads a float32 copy of the logits, and a ``backward`` casts its
    float32 gradient back to the logits' precision."""
    wide = max(element_size, 4)
    per_entry = element_size + (HEAD_LIVE - 1) * wide
    if element_size < wide:
        per_entry += wide + (element_size if backward else 0)
    return int(examples * targets * vocabulary * per_entry)


def forward_bytes(
    examples: int,
    tokens: int,
    hidden: int,
    element_size: int,
    mlp: int,
    heads: int,
    layers: int,
    family: str = "gpt2",
    saved: bool = True,
    device: str = "cpu",
    relative: int = 0,
) -> int:
    """Estimated memory of one point's forward: what it keeps for the backward over ``layers``
    layers (``saved``), or the temporaries of a forward without gradients, on a ``device`` of
    that type (``heads`` 0: fused attention); ``relative`` entries per token and layer besides
    (DeBERTa-v2's relative-position terms: :func:`attrax._arch.relative_width`)."""
    width = _width(tokens, hidden, mlp, heads)
    kind = "forward" if saved else "inference"
    entry = _entry_bytes(family, kind, element_size, device, heads > 0)
    per_token = width * entry + relative * element_size
    return int(examples * tokens * per_token * (layers if saved else 1))


def _width(tokens: int, hidden: int, mlp: int, heads: int) -> int:
    # eager attention keeps [heads, L, L] per cotangent
    return max(mlp, 4 * hidden, heads * tokens)


# On the CPU, passes estimated above this ran no faster per point and faulted in fresh memory
# (docs/memory.md): points are halved until a pass fits, whatever the budget (a budget is a
# ceiling, not a target)
CPU_PASS = 2 << 30


def plan(
    points: int,
    targets: int,
    batch_size: Size,
    chunk_size: Size,
    cost: Cost | int,
    device: torch.device,
    max_memory: int | None = None,
    work: Callable[[int], float] | None = None,
    chunked: str = "target",
) -> tuple[int | None, int | None]:
    """Resolve ``"auto"`` sizes against ``max_memory`` bytes (None: half the free memory of
    ``device``): all ``points`` and ``targets`` in one vectorized backward when the estimated
    ``cost`` fits, else halves of the targets (which, decoder-only, also cuts each chunk's
    sequence after its last target), then of the points. With ``work`` (a whole call's
    estimated work for a number of targets per backward), the halving of the targets that fits
    with the fewest points and needs the least work is taken instead, then points are halved.
    On the CPU, points are then halved until a pass fits :data:`CPU_PASS`. ``chunked``: what
    ``chunk_size`` counts, as a refusal names it (forward mode's source tokens). Given sizes (ints,
    None for all) are kept. A ``max_memory`` that even the smallest sizes the planner may pick
    exceed, or that given sizes exceed, is an :class:`OptionError` that says the smallest budget
    that can be met.

    >>> plan(8, 32, "auto", "auto", Cost(per_cotangent=10), torch.device("cpu"), max_memory=640)
    (None, 8)
    >>> plan(8, 32, "auto", "auto", Cost(per_cotangent=10), torch.device("cpu"), max_memory=640,
    ...      work=lambda chunk: 32 // chunk)  # a forward per chunk: all targets, fewer points
    (2, None)
    >>> plan(8, 32, "auto", "auto", Cost(per_cotangent=10, fixed=100), torch.device("cpu"), max_memory=90)
    Traceback (most recent call last):
    attrax._errors.OptionError: `max_memory` of 90 B cannot be met: the smallest passes (one target, one point) need an estimated 110 B; give at least that
    """
    if isinstance(cost, int):
        cost = Cost(per_cotangent=cost)
    if AUTO not in (batch_size, chunk_size):  # nothing to choose: the sizes given, checked
        given = _given(batch_size), _given(chunk_size)
        needed = cost.at(
            points if given[0] is None else given[0], targets if given[1] is None else given[1]
        )
        if max_memory is not None and needed > max_memory:
            raise OptionError(
                f"`max_memory` of {format_bytes(max_memory)} cannot be met with batch_size="
                f"{batch_size!r} and chunk_size={chunk_size!r}: their passes need an estimated "
                f"{format_bytes(needed, up=True)}; give at least that, or 'auto' sizes"
            )
        expect_passes(max_memory, 0, device)
        return given
    chunk = targets if chunk_size in (None, AUTO) else int(chunk_size)
    batch = points if batch_size in (None, AUTO) else int(batch_size)
    budget = memory_budget(device) if max_memory is None else max_memory
    if work is not None and chunk_size == AUTO and cost.at(batch, chunk) > budget:
        # the halvings of the targets that fit with the fewest points the planner may pick,
        # largest first: the least work among them (ties to the larger), then fewer points
        fewest = 1 if batch_size == AUTO else batch
        halvings = [targets]
        while halvings[-1] > 1:
            halvings.append(-(-halvings[-1] // 2))
        fitting = [c for c in halvings if cost.at(fewest, c) <= budget]
        if fitting:
            chunk = min(fitting, key=work)
            while batch_size == AUTO and batch > 1 and cost.at(batch, chunk) > budget:
                batch = -(-batch // 2)
    while cost.at(batch, chunk) > budget:
        if chunk_size == AUTO and chunk > 1:
            chunk = -(-chunk // 2)
        elif batch_size == AUTO and batch > 1:
            batch = -(-batch // 2)
        else:
            break
    if device.type == "cpu":
        # then fewer points per pass (no extra forward) while a pass exceeds CPU_PASS
        while batch_size == AUTO and batch > 1 and cost.at(batch, chunk) > CPU_PASS:
            batch = -(-batch // 2)
    needed = cost.at(batch, chunk)
    expect_passes(budget, needed, device)
    if max_memory is not None and needed > max_memory:
        # a size over one point (or one target) splits nothing: a method without it passes None
        sizes = (("batch_size", batch_size, points), ("chunk_size", chunk_size, targets))
        named = [f"{n}={v!r}" for n, v, count in sizes if v != AUTO and count > 1]
        smallest = f"the smallest passes (one {chunked}, one point)"
        if named:
            smallest = f"the smallest passes with {', '.join(named)}"
        raise OptionError(
            f"`max_memory` of {format_bytes(max_memory)} cannot be met: {smallest} need an estimated "
            f"{format_bytes(needed, up=True)}; give at least that"
        )
    return (None if batch >= points else batch, None if chunk >= targets else chunk)


def budget_after(
    device: torch.device, max_memory: int | None, fixed: int, smallest: int, what: str
) -> int:
    """Bytes a call's chunks may take beside its ``fixed`` ones: ``max_memory`` (None: half the
    free memory of ``device``; on the CPU at most ``fixed +`` :data:`CPU_PASS`) less ``fixed``.
    A ``max_memory`` below ``smallest`` is an :class:`OptionError` saying that ``what`` needs it.

    >>> budget_after(torch.device("cpu"), 1000, 200, 300, "one chunk")
    800
    """
    if max_memory is not None and smallest > max_memory:
        raise OptionError(
            f"`max_memory` of {format_bytes(max_memory)} cannot be met: {what} needs an "
            f"estimated {format_bytes(smallest, up=True)}; give at least that"
        )
    budget = memory_budget(device) if max_memory is None else max_memory
    if device.type == "cpu":
        budget = min(budget, fixed + CPU_PASS)
    return budget - fixed


def plan_forwards(
    copies: int,
    batch_size: Size,
    per_copy: int,
    device: torch.device,
    max_memory: int | None = None,
    fixed: int = 0,
) -> int:
    """Copies per forward for ``copies`` perturbed copies: ``batch_size`` when given (None: all),
    else as many as fit ``max_memory`` (None: half the free memory of ``device``) at an
    estimated ``per_copy`` bytes each, plus ``fixed``; on the CPU at most as many as fit
    :data:`CPU_PASS`.

    >>> plan_forwards(100, "auto", 10, torch.device("cpu"), max_memory=250)
    25
    """
    if batch_size != AUTO:  # the size given, checked
        batch = copies if batch_size is None else int(batch_size)
        if max_memory is not None and fixed + batch * per_copy > max_memory:
            raise OptionError(
                f"`max_memory` of {format_bytes(max_memory)} cannot be met with batch_size="
                f"{batch_size!r}: its forwards need an estimated "
                f"{format_bytes(fixed + batch * per_copy, up=True)}; give at least that, or "
                "batch_size='auto'"
            )
        expect_passes(max_memory, 0, device)
        return batch
    budget = held = memory_budget(device) if max_memory is None else max_memory
    if device.type == "cpu":
        # bigger forwards ran slower there (docs/memory.md)
        budget = min(budget, max(CPU_PASS, fixed + per_copy))
    batch = max(1, min(copies, (budget - fixed) // max(per_copy, 1)))
    expect_passes(held, fixed + batch * per_copy, device)
    if max_memory is not None and fixed + per_copy > max_memory:
        raise OptionError(
            f"`max_memory` of {format_bytes(max_memory)} cannot be met: one perturbed copy per forward needs an "
            f"estimated {format_bytes(fixed + per_copy, up=True)}; give at least that"
        )
    return batch


def _given(size: Size) -> int | None:
    return None if size is None else int(size)


# where cgroup file systems are mounted, and the file that names this process's cgroups: a
# container's or a batch job's (SLURM's) memory limit, which /proc/meminfo does not show
CGROUP_MOUNT = "/sys/fs/cgroup"
CGROUP_OF_PROCESS = "/proc/self/cgroup"
# per cgroup version: (limit, usage, statistics, the statistic of reclaimable page cache); both
# usages and these statistics count the cgroup's descendants
CGROUP_FILES = {
    2: ("memory.max", "memory.current", "memory.stat", b"inactive_file"),
    1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", b"total_inactive_file"),
}
# (pid, [(cgroup directory, version, limit)]): the limited cgroups of this process and their
# ancestors, read once per process (limits are set when a job starts)
_cgroups: tuple[int, list[tuple[str, int, int]]] | None = None
# the resident bytes this process must stay under (limit_process), or None
_process_limit: int | None = None


def limit_process(limit: int | None) -> None:
    """Keep this process's calls without a ``max_memory`` below ``limit`` resident bytes (None:
    no limit): they plan within half the headroom below it. A Dask worker sets the share of its
    memory limit above which its nanny kills it.

    >>> limit_process(None)
    """
    global _process_limit
    _process_limit = limit


def _available() -> int | None:
    """The host's available memory (``MemAvailable``), or None where it cannot be read."""
    try:
        for line in _read_proc("/proc/meminfo").splitlines():
            if line.startswith(b"MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc, or no pread
        pass
    return None


def _cgroup_dirs() -> list[tuple[str, int]]:
    """This process's memory cgroup directory and its ancestors, each with its version."""
    try:
        with open(CGROUP_OF_PROCESS) as f:
            lines = f.read().splitlines()
    except OSError:  # not Linux
        return []
    for line in lines:
        number, controllers, path = [*line.split(":", 2), "", ""][:3]
        version = 2 if number == "0" and not controllers else 1
        if version == 1 and "memory" not in controllers.split(","):
            continue
        root = os.path.normpath(CGROUP_MOUNT if version == 2 else f"{CGROUP_MOUNT}/memory")
        if not _has_memory_controller(root, version):
            continue  # v2 without the memory controller (a hybrid host: memory on v1)
        here = os.path.normpath(f"{root}/{path}")
        if not here.startswith(f"{root}/") or not os.path.isdir(here):
            here = root  # another namespace's path (or the root's): ours is the mount's root
        dirs = [(here, version)]
        while here != root:
            here = os.path.dirname(here)
            dirs.append((here, version))
        return dirs
    return []


def _has_memory_controller(root: str, version: int) -> bool:
    if version == 1:
        return os.path.isdir(root)
    try:
        with open(os.path.join(root, "cgroup.controllers")) as f:
            return "memory" in f.read().split()
    except OSError:
        return False


def _cgroup_limits() -> list[tuple[str, int, int]]:
    """``(directory, version, limit)`` of this process's memory cgroups that have a limit."""
    global _cgroups
    pid = os.getpid()
    if _cgroups is None or _cgroups[0] != pid:
        limited = []
        for here, version in _cgroup_dirs():
            try:
                with open(os.path.join(here, CGROUP_FILES[version][0]), "rb") as f:
                    limit = f.read().strip()
                if limit != b"max" and int(limit) < 1 << 60:  # v1 writes no limit as ~2**63
                    limited.append((here, version, int(limit)))
            except (OSError, ValueError):
                continue
        _cgroups = (pid, limited)
    return _cgroups[1]


def _cgroup_headroom() -> int | None:
    """Bytes this process's memory cgroups can still take before the tightest of their limits
    (reclaimable page cache counted as free), or None without a limit."""
    headroom = None
    for here, version, limit in _cgroup_limits():
        _, usage_file, stat_file, key = CGROUP_FILES[version]
        try:
            with open(os.path.join(here, usage_file), "rb") as f:
                usage = int(f.read())
            with open(os.path.join(here, stat_file), "rb") as f:
                cache = next((int(x.split()[1]) for x in f if x.split()[:1] == [key]), 0)
        except (OSError, ValueError, IndexError):
            continue
        room = max(limit - usage + cache, 0)
        headroom = room if headroom is None else min(headroom, room)
    return headroom


def memory_budget(device: torch.device) -> int:
    """Half the free memory of ``device``. On a GPU, what the driver has free plus what torch's
    caching allocator holds unused (a previous call's blocks, which it reuses). For the CPU the
    tightest of: the host's available memory, the headroom below its memory cgroup's limit, and
    the headroom below :func:`limit_process`'s limit; 4 GiB where none can be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return (free + cached) // 2
    process = None
    if _process_limit is not None:
        process = max(_process_limit - (_resident() or 0), 0)
    known = [f for f in (_available(), _cgroup_headroom(), process) if f is not None]
    return min(known) // 2 if known else 4 << 30


# --- device to host ------------------------------------------------------------------------


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """The precision sums, norms and softmax run in: float32 for a half-precision model (bfloat16
    keeps 8 bits of mantissa), float64 for a float64 one.

    >>> at_least_float32(torch.bfloat16), at_least_float32(torch.float64)
    (torch.float32, torch.float64)
    """
    return torch.promote_types(dtype, torch.float32)


def full_precision(values: torch.Tensor) -> torch.Tensor:
    """Half-precision values as float32 (numpy has no bfloat16, netCDF no float16); others as is."""
    return values.float() if values.dtype in (torch.float16, torch.bfloat16) else values


def to_host(values: torch.Tensor | np.ndarray) -> np.ndarray:
    """A NumPy array of ``values`` (half precision as float32), large GPU tensors staged."""
    if isinstance(values, torch.Tensor):
        values = full_precision(values.detach())
        if values.is_cuda and values.numel() * values.element_size() > _STAGE_BYTES:
            return _staged_to_host(values)
        return values.to("cpu").numpy()
    return np.asarray(values)


# A copy from the GPU into pageable memory goes through the driver's own small staging buffer,
# which on some machines moves ~1 GB/s; through a pinned buffer of our own it runs at the bus's
# speed (measured in docs/benchmarks-gpu.md)
_STAGE_BYTES = 32 * 2**20
_stages: dict[torch.device, torch.Tensor] = {}
# one buffer per device, so two threads copying to the host take turns
_stage_lock = threading.Lock()


def _staged_to_host(values: torch.Tensor) -> np.ndarray:
    """Copy a large GPU tensor to a NumPy array through a reused pinned buffer, chunk by chunk."""
    flat = values.contiguous().view(-1).view(torch.uint8)
    out = np.empty(values.shape, dtype=torch.empty(0, dtype=values.dtype).numpy().dtype)
    host = out.reshape(-1).view(np.uint8)
    with _stage_lock:
        stage = _stages.get(values.device)
        if stage is None:
            stage = torch.empty(_STAGE_BYTES, dtype=torch.uint8, pin_memory=values.is_cuda)
            _stages[values.device] = stage
        for start in range(0, flat.numel(), _STAGE_BYTES):
            n = min(_STAGE_BYTES, flat.numel() - start)
            stage[:n].copy_(flat[start : start + n], non_blocking=True)
            if values.is_cuda:
                torch.cuda.current_stream(values.device).synchronize()
            host[start : start + n] = stage[:n].numpy()
    return out
