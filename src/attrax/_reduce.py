"""Pure reductions ``DataArray -> DataArray`` over a named dim, and ``pipe`` to compose them.

Every reduction can be called on an array (``ax.l2_norm(da)``, ``ax.mean(da, "head")``) or with only
a dim name to get the reduction as a function (``ax.mean("head")``), which is what ``pipe`` and
``DataArray.pipe`` take. NaN (padding, the future) stays NaN: a slice that is all NaN reduces to NaN.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, overload

import numpy as np
import xarray as xr

from . import _validate as check
from ._errors import InputError, OptionError

Reduction = Callable[[xr.DataArray], xr.DataArray]


def _reduction(default: str) -> Callable[[Callable[[xr.DataArray, str], xr.DataArray]], Any]:
    def wrap(fn: Callable[[xr.DataArray, str], xr.DataArray]) -> Any:
        @overload
        def reduction(da: str | None = None, dim: str | None = None) -> Reduction: ...
        @overload
        def reduction(da: xr.DataArray, dim: str | None = None) -> xr.DataArray: ...

        @functools.wraps(fn)
        def reduction(da: Any = None, dim: str | None = None) -> Any:
            if isinstance(da, str):
                if dim is not None:
                    raise OptionError(f"{fn.__name__}: give `dim` once, got {da!r} and {dim!r}")
                da, dim = None, da
            dim = default if dim is None else dim
            if da is None:
                return functools.partial(reduction, dim=dim)
            if isinstance(da, xr.Dataset):
                dims = tuple(dict.fromkeys(d for v in da.data_vars.values() for d in v.dims))
                if dim not in dims:
                    raise OptionError(
                        f"{fn.__name__}: `dim` {dim!r} is not a dim of any variable of the"
                        f" Dataset; their dims are {dims}"
                    )
                # each reduced variable's attrs record its own reductions; the Dataset's, the call
                reduced: dict[Any, dict[Any, Any]] = {}

                def one(v: xr.DataArray) -> xr.DataArray:
                    if dim not in v.dims:
                        return v
                    out = reduction(v, dim)
                    reduced[v.name] = out.attrs
                    return out

                out = da.map(one, keep_attrs=True)  # which puts back every variable's old attrs
                for name, attrs in reduced.items():
                    out.variables[name].attrs = attrs
                done = da.attrs.get("reductions", "")
                out.attrs = {**da.attrs, "reductions": f"{done};{fn.__name__}({dim})".lstrip(";")}
                return out
            if not isinstance(da, xr.DataArray):
                raise OptionError(
                    f"{fn.__name__}: expected an xarray DataArray, got {type(da).__name__}"
                )
            if dim not in da.dims:
                raise OptionError(
                    f"{fn.__name__}: `dim` {dim!r} is not a dim of the array; its dims are {da.dims}"
                )
            check.holds_numbers(da.dtype, fn.__name__)
            if da.sizes[dim] == 0:
                # numpy has no max of nothing, and NaN would pass for "not attributed"
                raise InputError(
                    f"{fn.__name__}: `dim` {dim!r} has length 0 in the array {dict(da.sizes)};"
                    " there is nothing to reduce"
                )
            if da.dtype.kind in "biu":  # squares and abs of narrow ints would wrap around
                da = da.astype(np.float64)
            elif da.dtype.itemsize < 4:  # float16's squares and sums overflow at 65504
                da = da.astype(np.float32)
            with xr.set_options(keep_attrs=True):
                out = fn(da, dim)
            done = da.attrs.get("reductions", "")
            out.attrs["reductions"] = f"{done};{fn.__name__}({dim})".lstrip(";")
            return out.rename(da.name)

        reduction.attrax_reduction = (fn.__name__, default)  # type: ignore[attr-defined]
        return reduction

    return wrap


@_reduction("hidden")
def l2_norm(da: xr.DataArray, dim: str) -> xr.DataArray:
    """Euclidean norm over ``dim`` (default ``hidden``): one score per token.

    Arguments:
        da: a DataArray of numbers (bool, int, float), or a Dataset (its variables that have
            ``dim`` are reduced, the others kept); a dim name or nothing instead returns the
            reduction over that dim as a function of one array.
        dim: the dim to reduce over (default ``hidden``).

    Returns:
        ``da`` without ``dim`` (``([example,] target, source)`` from a gradient method's
        ``([example,] target, source, hidden)``), its name and attrs kept and
        ``l2_norm(<dim>)`` appended to ``attrs["reductions"]``; NaN is skipped, an all-NaN
        slice gives NaN. Integers and bools are reduced as float64, float16 as float32.

    >>> import xarray as xr
    >>> float(l2_norm(xr.DataArray([[3.0, 4.0]], dims=("source", "hidden")))[0])
    5.0
    """
    return np.sqrt((da**2).sum(dim, skipna=True, min_count=1))


@_reduction("hidden")
def sum(da: xr.DataArray, dim: str) -> xr.DataArray:
    """Sum over ``dim`` (default ``hidden``).

    Arguments and Returns as :func:`l2_norm` (``sum(<dim>)`` appended to the reductions).

    >>> import xarray as xr
    >>> float(sum(xr.DataArray([[1.0, -3.0]], dims=("source", "hidden")))[0])
    -2.0
    """
    return da.sum(dim, skipna=True, min_count=1)


@_reduction("hidden")
def mean(da: xr.DataArray, dim: str) -> xr.DataArray:
    """Mean over ``dim`` (default ``hidden``), ignoring NaN.

    Arguments and Returns as :func:`l2_norm` (``mean(<dim>)`` appended to the reductions;
    ``dim="head"`` or ``"layer"`` averages attention maps).

    >>> import xarray as xr
    >>> float(mean("hidden")(xr.DataArray([[1.0, 3.0]], dims=("source", "hidden")))[0])
    2.0
    """
    total = da.sum(dim, skipna=True, min_count=1)
    return total / da.notnull().sum(dim).astype(total.dtype)  # an int count made it float64


@_reduction("hidden")
def max(da: xr.DataArray, dim: str) -> xr.DataArray:
    """Maximum over ``dim`` (default ``hidden``), ignoring NaN.

    Arguments and Returns as :func:`l2_norm` (``max(<dim>)`` appended to the reductions).

    >>> import xarray as xr
    >>> float(max(xr.DataArray([[1.0, -3.0]], dims=("source", "hidden")))[0])
    1.0
    """
    return da.where(da.notnull(), -np.inf).max(dim).where(da.notnull().any(dim))


@_reduction("hidden")
def absmax(da: xr.DataArray, dim: str) -> xr.DataArray:
    """The value of largest magnitude over ``dim`` (default ``hidden``), sign kept.

    Arguments and Returns as :func:`l2_norm` (``absmax(<dim>)`` appended to the reductions):
    the first value of largest magnitude in each slice, the coordinates along ``dim`` dropped.

    >>> import xarray as xr
    >>> float(absmax(xr.DataArray([[1.0, -3.0]], dims=("source", "hidden")))[0])
    -3.0
    """
    present = da.notnull().any(dim)
    magnitude = abs(da).fillna(-1.0)
    # the first entry of largest magnitude (as argmax picks) by a mask, not by indexing with
    # argmax's result, which a lazily loaded (dask) array cannot be indexed with
    top = magnitude == magnitude.max(dim)
    first = top & (top.cumsum(dim) == 1)
    # picking by position would leave the reduced dim's coordinates (which token won) behind
    along = [name for name, coord in da.coords.items() if dim in coord.dims]
    return da.drop_vars(along).where(first).sum(dim, skipna=True).where(present)


@_reduction("source")
def normalize(da: xr.DataArray, dim: str) -> xr.DataArray:
    """Divide by the L1 norm over ``dim`` (default ``source``): absolute values sum to 1.

    NaN-aware; an all-zero slice stays zero.

    Arguments:
        da: a DataArray of numbers (bool, int, float), or a Dataset (its variables that have
            ``dim`` are normalized, the others kept); a dim name or nothing instead returns
            the normalization over that dim as a function of one array.
        dim: the dim whose slices are normalized (default ``source``).

    Returns:
        ``da`` with the same dims, each slice along ``dim`` divided by the sum of its absolute
        values (NaN skipped; NaN stays NaN), its name and attrs kept and ``normalize(<dim>)``
        appended to ``attrs["reductions"]``. Integers and bools come back as float64, float16
        as float32.

    >>> import xarray as xr
    >>> normalize(xr.DataArray([1.0, 3.0, float("nan")], dims="source")).values.tolist()
    [0.25, 0.75, nan]
    """
    total = abs(da).sum(dim, skipna=True, min_count=1)
    return da / total.where(total != 0, 1.0)


@_reduction("source")
def rescale(da: xr.DataArray, dim: str) -> xr.DataArray:
    """Divide by the largest magnitude over ``dim`` (default ``source``): values in [-1, 1].

    Arguments:
        da: a DataArray of numbers (bool, int, float), or a Dataset (its variables that have
            ``dim`` are rescaled, the others kept); a dim name or nothing instead returns the
            rescaling over that dim as a function of one array.
        dim: the dim whose slices are rescaled (default ``source``).

    Returns:
        ``da`` with the same dims, each slice along ``dim`` divided by its largest absolute
        value (NaN skipped; an all-zero slice stays zero, NaN stays NaN), its name and attrs
        kept and ``rescale(<dim>)`` appended to ``attrs["reductions"]``. Integers and bools
        come back as float64, float16 as float32.

    >>> import xarray as xr
    >>> rescale(xr.DataArray([1.0, -4.0], dims="source")).values.tolist()
    [0.25, -1.0]
    """
    top = abs(da).max(dim, skipna=True)
    return da / top.where(top != 0, 1.0)


def pipe(*functions: Callable[..., Any]) -> Callable[..., Any]:
    """Compose left to right: the first gets the call's arguments, each next one the result.

    When a method that takes ``reduce_hidden`` is followed by ``l2_norm`` or ``sum`` over
    ``hidden``, that step runs inside the method on the model's device (``reduce_hidden``).

    Arguments:
        functions: at least one callable: an attribution method (or any function) first, then
            functions of one array such as the reductions (``ax.mean("head")``). A chain that
            starts with a reduction takes one DataArray or Dataset.

    Returns:
        A function taking what the first function takes and returning the last one's result
        (for a method then reductions, the reduced DataArray).

    >>> import attrax as ax
    >>> attribute = ax.pipe(ax.saliency, ax.l2_norm, ax.normalize)
    >>> attribute(ax.load_model(), "1 2 3 =", " 3 2 1").dims
    ('target', 'source')
    """
    if not functions:
        raise OptionError("pipe: give at least one function")
    for i, fn in enumerate(functions):
        if not callable(fn):
            raise OptionError(f"pipe: argument {i} is not callable, got {type(fn).__name__}")

    first, rest = functions[0], functions[1:]
    reduction = getattr(getattr(first, "func", first), "attrax_reduction", None) is not None
    fused = _hidden_reduction(rest[0]) if rest else None
    if fused and getattr(first, "attrax_reduces_hidden", False):
        # the method reduces over hidden on the model's device: no [.., hidden] array is built
        rest = rest[1:]
    else:
        fused = None

    def piped(*args: Any, **kwargs: Any) -> Any:
        if fused:
            given = kwargs.setdefault("reduce_hidden", fused)
            if given != fused:
                # the chain reduces hidden with `fused` next: another reduction here contradicts it
                raise OptionError(
                    f"pipe: `reduce_hidden={given!r}` contradicts the chain, whose next step is "
                    f"{fused}(hidden); drop the option or the step"
                )
        if reduction and not (len(args) == 1 and isinstance(args[0], (xr.DataArray, xr.Dataset))):
            # a chain of reductions takes an array; a model's call needs a method first
            raise OptionError(
                f"pipe: its first function, {names[0]}, is a reduction and takes one DataArray "
                "(or Dataset), "
                f"got {', '.join(type(a).__name__ for a in args) or 'nothing'}; put an "
                "attribution method first, as pipe(ax.saliency, ax.l2_norm)"
            )
        result = first(*args, **kwargs)
        for fn in rest:
            result = fn(result)
        return result

    names = [_name(fn) for fn in functions]
    piped.__name__ = "pipe(" + ", ".join(names) + ")"
    piped.__doc__ = f"Composition of {', '.join(names)} (left to right)."
    return piped


def _name(fn: Any) -> str:
    """A function's name as a chain shows it: ``sum(source)`` for ``ax.sum("source")``."""
    if isinstance(fn, functools.partial):
        inner = getattr(fn.func, "__name__", type(fn.func).__name__)
        dim = fn.keywords.get("dim")
        return f"{inner}({dim})" if dim is not None and not fn.args else inner
    return getattr(fn, "__name__", type(fn).__name__)


def _hidden_reduction(fn: Any) -> str | None:
    """``"l2_norm"``/``"sum"`` when ``fn`` is that reduction over ``hidden``, else None."""
    dim = None
    if isinstance(fn, functools.partial) and not fn.args:
        dim, fn = fn.keywords.get("dim"), fn.func
    name, default = getattr(fn, "attrax_reduction", (None, None))
    if name in ("l2_norm", "sum") and (dim or default) == "hidden":
        return name
    return None
