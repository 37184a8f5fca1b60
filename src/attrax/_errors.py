"""One exception hierarchy: everything attrax raises on purpose is an ``AttraxError``."""

from __future__ import annotations


class AttraxError(Exception):
    """Base class of every error attrax raises on purpose.

    >>> import attrax as ax
    >>> issubclass(ax.InputError, ax.AttraxError)
    True
    """


class InputError(AttraxError, ValueError):
    """Texts, targets, positions or arrays that cannot be attributed as given."""


class OptionError(AttraxError, ValueError):
    """An unknown or out-of-range option: method, objective, dim name, quadrature..."""


class ModelError(AttraxError, TypeError):
    """A model that attrax cannot wrap (unsupported architecture, missing tokenizer...)."""


class ResourceError(AttraxError, MemoryError):
    """A call that needs more memory than its device has free, or than its ``max_memory``."""


def first_line(error: BaseException) -> str:
    """What another library's error says, in one line for attrax's own message ("" when it says
    nothing). A first line that only announces the next (a field validation's ``...:``) takes
    it along.

    >>> first_line(ValueError("bad field:\\n  'x' is not an int\\nmore"))
    "bad field: 'x' is not an int"
    """
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return lines[0]
