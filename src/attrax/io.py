"""Save and load attrax results as netCDF4 files that round-trip exactly.

netCDF cannot hold everything an attrax array carries (a ``MultiIndex`` on ``source``, the
difference between a DataArray and a one-variable Dataset, an unnamed array, ``object`` string
dtypes), so :func:`save` writes what it has to change into one JSON global attribute
(``attrax_io``) and :func:`load` undoes it.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import uuid
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import xarray as xr

from . import _validate as check
from ._errors import InputError, OptionError, first_line

__all__ = ["load", "save"]

_MARKER = "attrax_io"
_FORMAT_VERSION = 1
# xarray's own name for the variable of a saved DataArray, so ``xr.open_dataarray`` reads our
# files too.
_DA_VAR = "__xarray_dataarray_variable__"
_DEFAULT_LEVEL = 4
# Attributes that CF decoding on load would act on (rescale, mask, re-link coordinates), which
# would silently change the data instead of round-tripping it.
_CF_RESERVED = frozenset(
    {
        "_FillValue",
        "missing_value",
        "scale_factor",
        "add_offset",
        "_Unsigned",
        "_Encoding",
        "coordinates",
        "calendar",
        "dtype",
    }
)

PathLike = str | os.PathLike[str]


def save(obj: xr.DataArray | xr.Dataset, path: PathLike, *, compress: bool | int = True) -> Path:
    """Write ``obj`` to ``path`` as netCDF4, atomically; :func:`load` returns it unchanged.

    The file is written next to ``path`` under a temporary name and moved into place with
    ``os.replace``, so ``path`` is either the old file or the complete new one, never a
    partial write. ``compress`` is ``True`` (zlib level 4), ``False``/``0`` (none) or a zlib
    level ``1..9``; only numeric variables are compressed (netCDF cannot filter strings).

    Arguments:
        obj: a DataArray or Dataset (an attrax result or any other): string dim, variable and
            attribute names, attrs that are strings, numbers or 1-D numeric arrays.
        path: the file to write (a str or PathLike, conventionally ``.nc``), in a directory that
            exists; an existing file there is replaced. A name ending in another format's suffix
            (``.json``, ``.csv``, ...) is refused.
        compress: ``True`` (default, zlib level 4), ``False``/``0`` or a zlib level ``0..9``.

    Returns:
        The :class:`~pathlib.Path` written (a symbolic link's target when ``path`` is a link).

    >>> import tempfile, xarray as xr
    >>> da = xr.DataArray([[0.5, float("nan")]], dims=("target", "source"), name="saliency")
    >>> p = save(da, tempfile.mkdtemp() + "/a.nc")
    >>> xr.testing.assert_identical(load(p), da)
    """
    if not isinstance(obj, xr.DataArray | xr.Dataset):
        raise InputError(
            f"`obj` must be an xarray.DataArray or xarray.Dataset, got {type(obj).__name__}"
        )
    level = _compress_level(compress)
    path = output_path(path, "x.nc")

    ds = _to_storable(obj)
    encoding = {name: _encoding(var, level) for name, var in ds.variables.items()}

    def write(tmp: Path) -> None:
        with _local_write_lock(ds):
            try:
                ds.to_netcdf(tmp, engine="netcdf4", format="NETCDF4", encoding=encoding)
            except (ValueError, TypeError, UnicodeError, AttributeError) as err:
                # what netCDF cannot store (complex numbers, mixed objects, '/' in a name, an
                # attribute it reserves or too large an integer): said, not a traceback of its
                first = first_line(err)
                raise InputError(
                    f"`obj` cannot be stored as netCDF4 ({type(err).__name__}: {first}); "
                    "expected numbers, strings and datetimes under plain names"
                ) from err
            except RuntimeError as err:  # netCDF4/HDF5's own: a full disk, a failing write
                first = first_line(err)
                raise InputError(
                    f"`path` {str(path)!r}: netCDF4 could not write it in "
                    f"{str(path.parent)!r} ({first}; is the disk full?)"
                ) from err

    return write_atomically(path, write)


@contextlib.contextmanager
def _local_write_lock(ds: xr.Dataset) -> Any:
    """Write in-memory values under a lock of this process, not a Dask cluster's.

    With a Dask client active (in a client, or on a worker, where xarray would even start one),
    xarray guards every netCDF write call with a cluster-wide ``distributed.Lock``: a scheduler
    round trip each, about 50 per shard file (measured: most of a dataset run's client and
    scheduler CPU). Values already in memory, written to a temp file only this call knows, need
    no cross-process lock; a dask-backed ``ds`` keeps the active scheduler."""
    import sys

    dask = sys.modules.get("dask")
    if dask is None or any(var.chunks is not None for var in ds.variables.values()):
        yield
        return
    with dask.config.set(scheduler="synchronous"):
        yield


# suffixes of other formats than the one a writer writes (keyed by its example's suffix): a
# file named so would hold another format within (`save` to "r.json": netCDF4)
_PICTURES = {".png", ".pdf", ".svg", ".jpg", ".jpeg", ".webp", ".gif"}
_OTHER_FORMATS = {
    ".nc": {".json", ".jsonl", ".csv", ".html", ".htm", ".txt", ".md", ".parquet", ".zarr"}
    | {".safetensors"}
    | _PICTURES,
    ".html": {".json", ".jsonl", ".csv", ".nc", ".txt", ".md"} | _PICTURES,
    ".csv": {".json", ".jsonl", ".nc", ".html", ".htm", ".parquet", ".txt"} | _PICTURES,
}


def output_path(path: object, example: str) -> Path:
    """``path`` checked as a file to write (``example``: a file name to suggest), before any work:
    a str or PathLike, not a directory, in a directory that exists and that we may write in.
    A symbolic link is followed: the file it points to is the one written. Anything else that
    is no regular file (a device such as /dev/null, a FIFO, a socket) is refused: a file is
    written whole beside it and moved onto it, which would replace it (root may)."""
    given = _as_path(path)
    try:
        str(given).encode("utf-8")
        path = given.resolve() if given.is_symlink() else given
        path.is_dir()  # a name too long for the file system raises here
    except UnicodeEncodeError:  # argv bytes that are no UTF-8: netCDF cannot name the file
        raise InputError(f"`path` {str(given)!r} is no UTF-8 text: name the file in it") from None
    except OSError as err:
        raise InputError(f"`path` {str(given)[:80]!r}...: {err.strerror}") from None
    if path.is_dir():
        raise InputError(
            f"`path` {str(given)!r} is a directory; give a file name such as {example!r}"
        )
    writes = Path(example).suffix
    if path.suffix.lower() in _OTHER_FORMATS.get(writes, ()):
        raise InputError(
            f"`path` {str(given)!r} ends in {path.suffix}, another format's: this writes "
            f"{writes[1:]} files; name it as {given.with_suffix(writes).name!r}"
        )
    if path.exists() and not path.is_file():
        raise InputError(
            f"`path` {str(given)!r} is no regular file (a device, FIFO or socket): attrax writes "
            f"a whole file in its place; give a file name such as {example!r}"
        )
    parent = path.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise InputError(f"`path` {str(path)!r}: directory {str(parent)!r} {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"`path` {str(path)!r}: directory {str(parent)!r} is not writable")
    return path


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, synced, then moved onto ``path``:
    ``path`` is the old file or the complete new one, never a partial write."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        # BaseException too: a Ctrl-C mid-write must not leave a stray temp file behind.
        with contextlib.suppress(OSError):
            tmp.unlink()
        # the OS refusing our file (os.access says yes to root even in /proc or on read-only
        # mounts, and a disk fills up) is about `path`, not a crash to show as a traceback
        if isinstance(err, OSError) and str(err.filename) in (str(tmp), str(path)):
            raise InputError(
                f"`path` {str(path)!r}: cannot write in {str(path.parent)!r} ({err.strerror})"
            ) from err
        raise
    return path


def load(path: PathLike, *, chunks: Any = None) -> xr.DataArray | xr.Dataset:
    """Read a file written by :func:`save` (or any netCDF file) fully into memory.

    ``chunks`` (needs ``dask``) opens it lazily instead, as dask arrays of those chunks
    (``{"example": 100}``, ``-1``: one chunk, ``{}``: the file's own): values are read when
    computed, and the file stays open until then.

    Returns a DataArray if a DataArray was saved, with its name, dtypes, attrs and any
    ``MultiIndex`` restored; a plain netCDF file comes back as a Dataset. Without ``chunks``
    the file is closed before returning, so it can be overwritten or deleted straight away.

    Arguments:
        path: the netCDF4 file to read (a str or PathLike).
        chunks: None (default): read everything now; otherwise dask chunks as
            ``xr.open_dataset`` takes them (``"auto"``, a size, ``-1``, or a dict by dim name).

    Returns:
        What was saved: a DataArray (for a saved DataArray, or a plain netCDF file holding only
        xarray's DataArray variable) or a Dataset, in memory, or dask-backed with ``chunks``.

    >>> import tempfile, xarray as xr
    >>> p = save(xr.Dataset({"a": ("target", [1.0, 2.0])}), tempfile.mkdtemp() + "/d.nc")
    >>> load(p)["a"].values.tolist()
    [1.0, 2.0]
    """
    path = _as_path(path)
    if path.is_dir():
        raise InputError(f"`path` {str(path)!r} is a directory, not a netCDF file")
    if not path.exists():
        raise InputError(f"`path` {str(path)!r} does not exist")
    if chunks is not None:
        _check_chunks(chunks)
        _require_dask()
    try:
        with xr.open_dataset(path, engine="netcdf4", cache=False) as opened:
            ds = opened.load() if chunks is None else None
            sizes = {str(k): v for k, v in opened.sizes.items()}
    except (OSError, ValueError, RuntimeError) as err:
        raise InputError(f"`path` {str(path)!r} is not a readable netCDF4 file: {err}") from err
    if ds is None:
        # the file opened fine above, so what fails here is `chunks` not fitting its dims
        unknown = [k for k in chunks if k not in sizes] if isinstance(chunks, Mapping) else []
        if unknown:
            raise OptionError(f"`chunks` names dims {unknown} that the file lacks; it has {sizes}")
        try:
            ds = xr.open_dataset(path, engine="netcdf4", cache=False, chunks=chunks)
        except ValueError as err:
            raise OptionError(
                f"`chunks` {chunks!r} does not fit the file's dims {sizes}: {err}"
            ) from err
    ds = ds.drop_encoding()

    raw_meta = ds.attrs.pop(_MARKER, None)
    if raw_meta is None:
        if list(ds.data_vars) == [_DA_VAR]:
            return ds[_DA_VAR].rename(None)
        return ds
    try:
        meta = json.loads(raw_meta)
        return _from_stored(ds, meta, meta["kind"])
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        # a marker edited or written by something else: its dtypes, names or levels do not fit
        raise InputError(
            f"`path` {str(path)!r} has a corrupt {_MARKER!r} attribute "
            f"({type(err).__name__}: {err})"
        ) from err


def _check_chunks(chunks: object) -> None:
    """The forms of ``chunks`` that xarray takes (dim names are checked once the file is open)."""

    def integer(c: object) -> TypeGuard[numbers.Integral]:
        return isinstance(c, numbers.Integral) and not isinstance(c, bool)

    def size(c: object) -> bool:
        # compared as ints: numbers.Integral declares no >= (numpy's ints are Integral too)
        if isinstance(c, tuple):  # explicit chunk lengths along one dim
            return bool(c) and all(integer(i) and int(i) >= 1 for i in c)
        return integer(c) and (int(c) >= 1 or c == -1)

    def auto(c: object) -> bool:
        return isinstance(c, str) and c == "auto"

    if isinstance(chunks, Mapping):
        ok = all(
            isinstance(k, str) and (v is None or auto(v) or size(v)) for k, v in chunks.items()
        )
    else:
        ok = auto(chunks) or (size(chunks) and not isinstance(chunks, tuple))
    if not ok:
        raise OptionError(
            "`chunks` must be 'auto', a chunk size (a positive int, or -1 for one chunk) or a dict"
            f" of them by dim name such as {{'example': 100}} ({{}}: the file's own), got {chunks!r}"
        )


def _require_dask() -> None:
    try:
        import dask  # noqa: F401
    except ImportError:
        raise OptionError(
            "`chunks` opens results lazily with dask, which is not installed: "
            "pip install 'attrax[distributed]'"
        ) from None


def _as_path(path: object) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise InputError(f"`path` must be a str or os.PathLike, got {type(path).__name__}")
    return check.local_path(path, "path")


def _compress_level(compress: object) -> int:
    if isinstance(compress, bool):
        return _DEFAULT_LEVEL if compress else 0
    if isinstance(compress, numbers.Integral) and 0 <= int(compress) <= 9:
        return int(compress)
    raise OptionError(f"`compress` must be True, False or a zlib level 0..9, got {compress!r}")


def _encoding(var: xr.Variable, level: int) -> dict[str, Any]:
    if level and var.dtype.kind in "biuf" and var.ndim and var.size:
        return {"zlib": True, "complevel": level, "shuffle": True}
    return {}


def _to_storable(obj: xr.DataArray | xr.Dataset) -> xr.Dataset:
    meta: dict[str, Any] = {"version": _FORMAT_VERSION}
    if isinstance(obj, xr.DataArray):
        meta["kind"] = "DataArray"
        meta["name"] = _json_name(obj.name)
        if _DA_VAR in obj.coords:
            raise InputError(f"`obj` has a coordinate named {_DA_VAR!r}, which attrax reserves")
        ds = obj.to_dataset(name=_DA_VAR, promote_attrs=False)
    else:
        meta["kind"] = "Dataset"
        ds = obj.copy(deep=False)
        if _MARKER in ds.attrs:
            raise InputError(f"`obj.attrs` has the key {_MARKER!r}, which attrax reserves")

    multiindex: dict[str, list[str]] = {}
    for name, index in ds.xindexes.items():
        if isinstance(index, xr.indexes.PandasMultiIndex) and name == index.dim:
            multiindex[str(name)] = [str(level) for level in index.index.names]
    if multiindex:
        ds = ds.reset_index(list(multiindex))
    meta["multiindex"] = multiindex

    # Earlier encodings (chunk sizes, packing from a file this was read from) may not fit the
    # current data; writing what is in memory is what makes the round trip exact.
    ds = ds.drop_encoding()
    _check_names_and_attrs(ds)
    # numpy's variable-width strings (pandas' string dtype) have no dtype string to restore
    # them by: stored, and restored, as fixed-width ones
    widths = {
        k: v.copy(data=np.asarray(v.values, dtype=object).astype(str))
        for k, v in ds.variables.items()
        if v.dtype.kind == "T"
    }
    ds = ds.assign_coords({k: v for k, v in widths.items() if k in ds.coords})
    ds = ds.assign({k: v for k, v in widths.items() if k not in ds.coords})
    meta["dtypes"] = {str(k): v.dtype.str for k, v in ds.variables.items()}
    # netCDF has no float16 (a half-precision model's dtype); float32 holds it exactly.
    half = {k: v.astype(np.float32) for k, v in ds.variables.items() if v.dtype == np.float16}
    ds = ds.assign_coords({k: v for k, v in half.items() if k in ds.coords})
    ds = ds.assign({k: v for k, v in half.items() if k not in ds.coords})
    ds.attrs = {**ds.attrs, _MARKER: json.dumps(meta)}
    return ds


def _from_stored(ds: xr.Dataset, meta: Mapping[str, Any], kind: str) -> xr.DataArray | xr.Dataset:
    # Strings come back as fixed-width ``<U``, float16 as float32, datetimes maybe in another
    # unit: cast every variable back to the dtype it had.
    coords: dict[Hashable, xr.Variable] = {}
    data: dict[Hashable, xr.Variable] = {}
    for name, dtype in meta.get("dtypes", {}).items():
        var = ds.variables.get(name)
        if var is not None and var.dtype.str != dtype:
            (coords if name in ds.coords else data)[name] = var.astype(dtype)
    ds = ds.assign_coords(coords).assign(data)
    multiindex = meta.get("multiindex", {})
    if multiindex:
        levels_of: dict[Hashable, list[Hashable]] = {
            dim: list(levels) for dim, levels in multiindex.items()
        }
        ds = ds.set_index(levels_of)
    if kind == "DataArray":
        if _DA_VAR not in ds.data_vars:
            raise InputError(f"file claims to hold a DataArray but has no {_DA_VAR!r} variable")
        return ds[_DA_VAR].rename(meta.get("name"))
    return ds


def _json_name(name: Hashable | None) -> str | int | float | None:
    if name is None or (isinstance(name, str | int | float) and not isinstance(name, bool)):
        return name
    raise InputError(f"`obj.name` must be a str, a number or None to be saved, got {name!r}")


def _check_names_and_attrs(ds: xr.Dataset) -> None:
    for dim in ds.dims:
        if not isinstance(dim, str):
            raise InputError(f"`obj` dim names must be strings for netCDF, got {dim!r}")
    _check_attrs(ds.attrs, "`obj.attrs`")
    for name, var in ds.variables.items():
        if not isinstance(name, str):
            raise InputError(f"`obj` variable names must be strings for netCDF, got {name!r}")
        where = "`obj.attrs`" if name == _DA_VAR else f"attrs of variable {name!r}"
        _check_attrs(var.attrs, where)
        bad = _string_with_nul(var.values) if var.dtype.kind in "OU" else None
        if bad is not None:
            kind = "coordinate" if name in ds.coords else "variable"
            what = "`obj`" if name == _DA_VAR else f"`obj` {kind} {name!r}"
            raise InputError(
                f"{what} holds {bad!r}: netCDF stores strings up to their first NUL character"
                " ('\\x00') and would cut it short; remove or replace it before saving"
            )


def _string_with_nul(values: np.ndarray) -> str | None:
    """The first string of ``values`` holding a NUL (netCDF would cut it there), or None."""
    if values.dtype.kind == "O":
        return next(
            (v for v in values.ravel().tolist() if isinstance(v, str) and "\x00" in v), None
        )
    if not values.size or not values.dtype.itemsize:
        return None
    # numpy pads fixed-width strings with NULs at the end; one followed by a character is real
    codes = np.ascontiguousarray(values).view(np.uint32).reshape(values.size, -1)
    hits = np.flatnonzero(((codes[:, :-1] == 0) & (codes[:, 1:] != 0)).any(axis=1))
    return str(values.ravel()[hits[0]]) if hits.size else None


def _check_attrs(attrs: Mapping[Hashable, Any], where: str) -> None:
    for key, value in attrs.items():
        if not isinstance(key, str):
            raise InputError(f"{where}: attribute names must be strings, got {key!r}")
        if key in _CF_RESERVED:
            raise InputError(
                f"{where}: {key!r} is a netCDF/CF attribute that would change the data on load;"
                " rename it"
            )
        if key == "units" and isinstance(value, str) and " since " in value:
            # CF decoding reads "<unit> since <date>" as a time axis: numbers would load as dates
            raise InputError(
                f"{where}: 'units' = {value!r} reads as a time axis on load (\"... since ...\")"
                " and would turn the numbers into dates; rename the attribute"
            )
        if isinstance(value, str) and "\x00" in value:
            raise InputError(
                f"{where}: {key!r} = {value!r} holds a NUL character, which netCDF would drop;"
                " remove or replace it"
            )
        if not _is_storable_attr(value):
            raise InputError(
                f"{where}: {key!r} = {value!r} is not netCDF-friendly; attrs must be strings,"
                " numbers or 1-D numeric numpy arrays (store other values as a JSON string)"
            )


def _is_storable_attr(value: object) -> bool:
    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, str | numbers.Real | np.integer | np.floating):
        return True
    return isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iuf"
