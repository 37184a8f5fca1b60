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
