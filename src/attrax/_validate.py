"""Option checks, each ``check(value, name)`` raising an :class:`OptionError` that names the
option, the value and what was expected. Methods declare theirs; :mod:`_protocol` runs them
before the model runs."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ._errors import InputError, OptionError
from ._memory import parse_bytes

Check = Callable[[Any, str], None]
AUTO = "auto"  # a memory bound that the planner (_memory.plan) picks
BASELINES = ("zeros", "pad", "unk", "mask")


def holds_numbers(dtype: Any, who: str) -> None:
    """An array's ``dtype`` that reductions can read: bool, int or float (not complex, strings
    or objects, which numpy would cast without a word)."""
    if dtype.kind not in "biuf":
        raise InputError(f"{who}: `da` must hold numbers (bool, int or float), got dtype {dtype}")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy's too


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


#: the largest count (steps, samples, sizes) an option may give: torch and numpy index with
#: int64, and a count past it fails inside them with an overflow (no memory holds that many)
MAX_COUNT = 2**62


def positive_int(value: object, name: str) -> None:
    """A positive integer (up to :data:`MAX_COUNT`).

    >>> positive_int(0, "steps")
    Traceback (most recent call last):
    attrax._errors.OptionError: `steps` must be a positive integer, got 0
    """
    if not _is_int(value) or value < 1:  # type: ignore[operator]
        raise OptionError(f"`{name}` must be a positive integer, got {value!r}")
    _not_past_int64(value, name)


def optional(inner: Check) -> Check:
    """None, or a value ``inner`` accepts (the method picks the default).

    >>> optional(positive_int)(0, "neighbours")
    Traceback (most recent call last):
    attrax._errors.OptionError: `neighbours` must be a positive integer or None, got 0
    """

    def check(value: object, name: str) -> None:
        if value is None:
            return
        try:
            inner(value, name)
        except OptionError as error:
            text = str(error)
            # name None among what is accepted, where the message says what was expected
            raise OptionError(text.replace(", got", " or None, got", 1)) from None

    return check


def _not_past_int64(value: object, name: str) -> None:
    if value > MAX_COUNT:  # type: ignore[operator]
        raise OptionError(
            f"`{name}` must be at most 2**62, got {value!r}: no memory holds that many"
        )


def at_least(minimum: int, why: str = "") -> Check:
    """An integer of at least ``minimum``; ``why`` ends the message.

    >>> at_least(2, "one coalition fits nothing")(1, "samples")
    Traceback (most recent call last):
    attrax._errors.OptionError: `samples` must be an integer of at least 2, got 1: one coalition fits nothing
    """

    def check(value: object, name: str) -> None:
        if not _is_int(value) or value < minimum:  # type: ignore[operator]
            raise OptionError(
                f"`{name}` must be an integer of at least {minimum}, got {value!r}"
                + (f": {why}" if why else "")
            )
        _not_past_int64(value, name)

    return check


def size(value: object, name: str) -> None:
    """A memory bound: a positive integer, None (everything at once) or ``"auto"``."""
    if value == AUTO or value is None:
        return
    if not _is_int(value) or value < 1:  # type: ignore[operator]
        raise OptionError(f"`{name}` must be a positive integer, None or 'auto', got {value!r}")
    _not_past_int64(value, name)


def seed(value: object, name: str) -> None:
    """An integer torch's generators take: from -2**63 to 2**64 - 1.

    >>> seed(2**70, "seed")
    Traceback (most recent call last):
    attrax._errors.OptionError: `seed` must be an integer from -2**63 to 2**64 - 1, got 1180591620717411303424
    """
    if not _is_int(value) or not -(2**63) <= value < 2**64:  # type: ignore[operator]
        raise OptionError(f"`{name}` must be an integer from -2**63 to 2**64 - 1, got {value!r}")


def numpy_seed(value: object, name: str) -> None:
    """A seed both torch's and numpy's generators take: from 0 to 2**64 - 1.

    >>> numpy_seed(-1, "seed")
    Traceback (most recent call last):
    attrax._errors.OptionError: `seed` must be an integer from 0 to 2**64 - 1, got -1
    """
    if not _is_int(value) or not 0 <= value < 2**64:  # type: ignore[operator]
        raise OptionError(f"`{name}` must be an integer from 0 to 2**64 - 1, got {value!r}")


def boolean(value: object, name: str) -> None:
    """True or False."""
    if not isinstance(value, bool):
        raise OptionError(f"`{name}` must be a bool, got {value!r}")


def non_negative(value: object, name: str) -> None:
    """A finite number >= 0."""
    if not _is_number(value) or not 0 <= value < math.inf:  # type: ignore[operator]
        raise OptionError(f"`{name}` must be a non-negative number, got {value!r}")


def positive(value: object, name: str) -> None:
    """A finite number > 0."""
    if not _is_number(value) or not 0 < value < math.inf:  # type: ignore[operator]
        raise OptionError(f"`{name}` must be a positive number, got {value!r}")


def one_of(*choices: object, none: bool = False) -> Check:
    """One of ``choices`` (or None when ``none``)."""

    def check(value: object, name: str) -> None:
        if (value is None and none) or (isinstance(value, str) and value in choices):
            return
        extra = " or None" if none else ""
        raise OptionError(f"`{name}` must be one of {choices}{extra}, got {value!r}")

    return check


def baseline(value: object, name: str) -> None:
    """A baseline name in :data:`BASELINES`, a tensor (embeddings, or int token ids), or a tuple
    of tensors (one per side)."""
    tensors = isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value)
    if isinstance(value, torch.Tensor) or (tensors and value):
        given = value if isinstance(value, tuple) else (value,)
        if any(v.is_complex() for v in given):
            raise OptionError(
                f"`{name}` is a complex tensor: expected real embeddings or int token ids"
            )
        valued = [v for v in given if v.is_floating_point() and v.device.type != "meta"]
        if not all(bool(torch.isfinite(v).all()) for v in valued):
            # NaN or inf: every gradient at it is too, which named the model's dtype instead
            raise OptionError(f"`{name}` holds NaN or infinite values: expected finite embeddings")
        return
    if isinstance(value, str) and value in BASELINES:
        return
    raise OptionError(
        f"`{name}` must be one of {BASELINES}, a tensor (embeddings or token ids) or a tuple "
        f"of tensors, got {value!r}"
    )


def baselines(value: object, name: str) -> None:
    """A non-empty list or tuple of baselines (each as :func:`baseline`), or one baseline."""
    if isinstance(value, (list, tuple)) and value:
        for item in value:
            baseline(item, name)
        return
    baseline(value, name)


def memory(value: object, name: str) -> None:
    """A memory budget: bytes as a positive int, a string such as ``"8GB"``/``"512MiB"``, or None.

    >>> memory("12 furlongs", "max_memory")
    Traceback (most recent call last):
    attrax._errors.OptionError: `max_memory` must be a positive number of bytes (an int, or a string such as '8GB' or '512MiB'), got '12 furlongs'
    """
    parse_bytes(value, name)  # type: ignore[arg-type]


def local_path(value: str | os.PathLike[str], name: str) -> Path:
    """``value`` as a path with its ``~`` expanded; a ``~user`` of no such user is an
    :class:`InputError` naming ``name`` (pathlib raises a bare RuntimeError).

    >>> local_path("~nosuchuser0/data.jsonl", "data")
    Traceback (most recent call last):
    attrax._errors.InputError: `data` '~nosuchuser0/data.jsonl': no home directory for its `~`
    """
    try:
        return Path(value).expanduser()
    except RuntimeError:
        raise InputError(f"`{name}` {str(value)!r}: no home directory for its `~`") from None
