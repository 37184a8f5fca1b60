"""Attribute a JSONL dataset in resumable shards, and load the shards back as one array.

A run writes, into its output directory::

    manifest.json        what the run is (data checksum, model, method, options) and which
                         shards are complete; replaced atomically after every shard
    shard-00000.nc       records 0 .. shard_size-1, an ``ax.save`` netCDF file (atomic)
    shard-00001.nc       ...

A shard counts as done only once the manifest lists it, and the manifest is written after the
shard file is in place, so a run killed at any moment loses at most the shard in flight. Shard
``k`` always holds records ``k * shard_size ..``, so a resumed run recomputes exactly the missing
shards (and listed ones that no longer read back) and nothing is duplicated. A resumed run must see
the same data (checked by SHA-256) and the same options (with the method's defaults filled in), or
it stops with an error instead of mixing two runs in one directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from transformers import PreTrainedModel

from . import _distributed, _reduce
from . import _validate as check
from ._errors import InputError, ModelError, OptionError
from ._inputs import ClassTargets, Item, check_example, input_texts, not_text, source_ids
from ._model import Model, load_model
from ._names import METHODS, PUBLIC, REDUCTIONS
from ._schema import fill_value, union_labels
from .io import load, save, write_atomically

__all__ = [
    "METHODS",
    "REDUCTIONS",
    "DatasetRun",
    "attribute_dataset",
    "call_method",
    "check_model_options",
    "json_lines",
    "label_name",
    "load_dataset_results",
    "parse_reduce",
    "reduce",
    "resolve_method",
    "resolve_options",
]

MANIFEST = "manifest.json"
_FORMAT = "attrax-dataset"
_VERSION = 1
SHARD = "shard-{:05d}.nc"
_KEPT_DIMS = ("example", "target", "source")
_STRAY = re.compile(
    r"^\.(shard-\d{5,}\.nc|manifest\.json)\.[0-9a-f]{12}\.tmp$"
    r"|^\.attrax-run-[0-9a-f]{8}$"  # a Dask run's token (_distributed.TOKEN) that a kill left
)

PathLike = str | os.PathLike[str]


@dataclasses.dataclass(frozen=True)
class DatasetRun:
    """What :func:`attribute_dataset` did: where, how many records/shards, how many were resumed."""

    out: Path
    records: int
    shards: int
    skipped: int


# --- methods and reductions (shared with the CLI) -------------------------------------------


def resolve_method(name: str) -> Callable[..., xr.DataArray]:
    """The attribution function ``attrax.<name>``; a clear error lists the available ones.

    >>> resolve_method("saliency").__name__
    'saliency'
    """
    if name not in METHODS:
        raise OptionError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return getattr(importlib.import_module(PUBLIC[name], __package__), name)


def call_method(
    fn: Callable[..., xr.DataArray],
    model: Model,
    inputs: Item | Sequence[Item],
    targets: ClassTargets,
    options: Mapping[str, Any],
) -> xr.DataArray:
    """``fn(model, inputs, targets, **options)``, naming an option the method does not take."""
    resolve_options(fn, options)
    return fn(model, inputs, targets, **options)


def resolve_options(fn: Callable[..., xr.DataArray], options: Mapping[str, Any]) -> dict[str, Any]:
    """Every keyword option of ``fn``, checked: those given, and the defaults of the others.

    Two calls compute the same thing exactly when their resolved options are equal, whether a
    default was given explicitly or left out. An option ``fn`` does not take is an error.

    >>> resolve_options(resolve_method("integrated_gradients"), {"steps": 50})["quadrature"]
    'gausslegendre'
    """
    return fn.attrax_resolve(options)  # type: ignore[attr-defined]


def parse_reduce(spec: str | None) -> list[tuple[str, str | None]] | None:
    """Parse a reduce spec: ``"l2_norm,normalize"``, ``"mean:head"``, ``"auto"`` or ``"none"``.

    Returns ``[(name, dim or None), ...]``, or None for ``"auto"`` (decided from the dims).

    >>> parse_reduce("l2_norm, normalize:source")
    [('l2_norm', None), ('normalize', 'source')]
    """
    if spec is not None and not isinstance(spec, str):
        raise OptionError(
            f"`reduce` must be a reduce spec such as 'l2_norm,normalize', got {spec!r}"
        )
    if spec is None or spec.strip() == "auto":
        return None
    if spec.strip() in ("none", ""):
        return []
    steps: list[tuple[str, str | None]] = []
    for item in spec.split(","):
        name, colon, dim = item.strip().partition(":")
        if name not in REDUCTIONS:
            raise OptionError(
                f"unknown reduction {name!r} in {spec!r}; valid: {', '.join(REDUCTIONS)} "
                "(each optionally as name:dim), or 'auto' / 'none'"
            )
        if colon and not dim.strip():  # "sum:" ran as sum over its default dim
            raise OptionError(f"reduction {item.strip()!r} in {spec!r} names no dim after ':'")
        steps.append((name, dim.strip() or None))
    return steps


def reduce(da: xr.DataArray, steps: list[tuple[str, str | None]] | None) -> xr.DataArray:
    """Apply parsed reductions, or with ``None`` (auto) reduce to ``([example,] target, source)``.

    Auto: ``l2_norm`` over ``hidden`` (and an MLP's ``neuron``), ``mean`` over other extra dims
    (``layer``, ``head``; a head's ``hidden`` is normed first, its features being its own), then
    ``normalize`` over ``source``; an array without a ``source``
    (edge attribution patching's ``(target, sender, receiver)``) is kept as it is.

    >>> import xarray as xr
    >>> da = xr.DataArray([[[3.0, 4.0], [0.0, 0.0]]], dims=("target", "source", "hidden"))
    >>> reduce(da, None).values.tolist()
    [[1.0, 0.0]]
    """
    if steps is None and "source" not in da.dims:
        return da  # scores of edges, not of sources: nothing to pool or normalize
    if steps is None:
        steps = [
            ("l2_norm" if dim in ("hidden", "neuron") else "mean", str(dim))
            for dim in da.dims
            if dim not in _KEPT_DIMS
        ]
        if "head" in da.dims and "hidden" in da.dims:  # a head's own features, before any mean
            steps.sort(key=lambda step: step[1] != "hidden")
        steps.append(("normalize", "source"))
    for name, dim in steps:
        da = getattr(_reduce, name)(da, dim)
    return da


# --- the run ----------------------------------------------------------------------------------


def check_model_options(model: Model, device: Any, dtype: Any) -> None:
    """Refuse a ``device``/``dtype`` that an in-memory Model is not on (it is not moved).

    >>> check_model_options(load_model(), "cpu", None)
    """
    if device is not None:
        try:
            want = torch.device(device)
        except (RuntimeError, TypeError):
            raise OptionError(
                f"`device` {device!r} is not a device: expected 'cpu', 'cuda', 'cuda:N' or 'mps'"
            ) from None
        have = model.device
        if want.type != have.type or want.index not in (None, have.index):
            raise OptionError(
                f"`device` {device!r} applies to a model given by path; this Model is on "
                f"{str(have)!r}: load it with ax.load_model(..., device=...) or leave `device` "
                "unset"
            )
    if isinstance(dtype, str):  # a name, as the CLI's --dtype and load_model take it
        dtype = getattr(torch, dtype, dtype)
    if dtype is not None and dtype != model.dtype:
        raise OptionError(
            f"`dtype` {dtype!r} applies to a model given by path; this Model is {model.dtype}: "
            "load it with ax.load_model(..., dtype=...) or leave `dtype` unset"
        )


def attribute_dataset(
    model: Model | PathLike | None,
    data: PathLike,
    out: PathLike,
    *,
    method: str = "saliency",
    reduce: str | None = "auto",
    shard_size: int = 8,
    progress: bool = True,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    workers: int | str | None = None,
    scheduler: str | None = None,
    **options: Any,
) -> DatasetRun:
    """Attribute every record of a JSONL file, ``shard_size`` records per netCDF shard; resumable.

    Each line is ``{"input": str, "target": str (optional), "id": str|int (optional)}`` (other
    keys are ignored, but ``"corrupted"``/``"corrupted_pair"``, the corrupted input that
    ``attribution_patching`` and ``activation_patching`` read, or ``"noise"``, the tokens
    ``activation_patching``'s :class:`~attrax.GaussianNoise` corrupts (a text in the input or
    positions; the option ``corrupted=GaussianNoise(tokens=None, ...)`` gives the rest); blank
    lines skipped); a classifier's records may add
    ``"input_pair"`` (the second text of an NLI-style pair) and ``"label"`` (the true label: a
    label name or class id), and any record ``"contrast"`` (what its target is explained
    against: a text aligned with it, or a class; the method gets each record's own, and must
    take ``contrast``). Either every
    record has a ``target`` or none has (then targets are generated); the same for ``label`` and
    ``contrast``. Shards hold ``(example, target, source)`` arrays whose ``example`` coordinate is
    the record's 0-based line number in the file, with an ``id`` coordinate when the file gives
    ids and a ``label`` coordinate (label names) when it gives labels. Every record is tokenized before any work starts, so a
    record that cannot be attributed (a target off a token boundary, too long for the model) is
    an error naming its line. Run the same call again after an interruption: complete shards are
    kept, the rest is computed. Load everything with :func:`load_dataset_results`.

    Arguments:
        model: a :class:`Model`, a path, or None for the built-in model.
        data: the JSONL file. out: the output directory (created if needed).
        method: an attribution function name (``saliency``, ``integrated_gradients``...), not
            the function: the manifest records the run's method by name.
        reduce: a reduce spec (see :func:`parse_reduce`); ``"auto"`` gives ``(target, source)``.
        shard_size: records per shard, given to the method in one call.
        progress: show a progress bar (on stderr): True or False.
        device: where to load a model given by path (``"cuda"``...); not part of the run's
            identity, so a run may resume on another device. With a :class:`Model`, a device it
            is not on is an :class:`OptionError` (it is not moved).
        dtype: the precision to load a model given by path in (``torch.bfloat16``...). It changes
            the results, so a run resumes only with the same ``dtype``. With a :class:`Model`,
            a dtype it is not in is an :class:`OptionError`.
        workers: run the shards on a Dask ``LocalCluster`` of this many worker processes (one
            torch thread each; ``"auto"``: one per GPU with ``device="cuda"``, else one per core).
            None (default): in this process. Needs ``pip install 'attrax[distributed]'`` and a
            model given by path: each worker loads it once.
        scheduler: run the shards on the existing Dask cluster at this address
            (``"tcp://host:8786"``); its workers must reach the model path. Workers that see
            ``out`` (a shared filesystem) write their shards there themselves, atomically; only
            this process writes the manifest, so resuming works as without Dask.
        options: keyword options of the method (``objective="logprob"``, ``steps=16``,
            ``batch_size=8``: model evaluations per forward...). A run is identified by all of
            them with the method's defaults filled in, so ``steps=50`` (the default) resumes a
            run that left it out.

    Returns:
        A :class:`DatasetRun`: ``out`` (the output directory), ``records`` (in the file),
        ``shards`` (in the run) and ``skipped`` (shards already complete, kept from an earlier
        call). The results themselves are the shard files: :func:`load_dataset_results`.

    >>> import json, tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> record = {"input": "3 1 4 0 5 9 =", "target": " 9 5 0 4 1 3"}
    >>> _ = (d / "x.jsonl").write_text(json.dumps(record))
    >>> attribute_dataset(None, d / "x.jsonl", d / "out", progress=False).shards
    1
    """
    if model is not None and not isinstance(model, (Model, str, os.PathLike)):
        wrap = ": wrap it with ax.load_model first" if isinstance(model, PreTrainedModel) else ""
        raise ModelError(
            "`model` must be an attrax Model, a path, a hub name or None (the built-in model), "
            f"got {type(model).__name__}{wrap}"
        )
    for name, path in (("data", data), ("out", out)):
        if not isinstance(path, (str, os.PathLike)):
            raise InputError(f"`{name}` must be a path, got {type(path).__name__}")
    if not isinstance(method, str):
        raise OptionError(
            f"`method` must be a method name such as 'saliency', got {_described(method)}: a run "
            "records its method by name in its manifest, to check a resumed run against it (and "
            "Dask workers look it up by name)"
        )
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        raise OptionError(f"`shard_size` must be a positive integer, got {shard_size!r}")
    if not isinstance(progress, bool):
        raise OptionError(f"`progress` must be True or False, got {progress!r}")
    if isinstance(model, Model):
        check_model_options(model, device, dtype)
    fn = resolve_method(method)
    steps = parse_reduce(reduce)
    data, out = check.local_path(data, "data"), check.local_path(out, "out")
    # only activation patching reads a record's 'noise'; to the others it is any other key
    scan = _scan(data, _reads_noise(fn))
    resolved = resolve_options(fn, _with_record_options(fn, options, scan))
    if resolved.get("layers") is not None:
        _check_layers(model, resolved["layers"], resolved.get("site", "residual"))
    shards = -(-scan.records // shard_size)
    local = None  # a model given by path, as a path
    if isinstance(model, Model):
        model_name = model.name
    elif model is None:
        model_name = "attrax-default"
    else:
        # a local directory by its absolute path (resumable from another cwd), a hub name as is
        local = check.local_path(model, "model")
        model_name = str(local.resolve()) if local.exists() else str(model)
    run = {
        "data": {"sha256": scan.sha256, "records": scan.records},
        "model": model_name,
        "method": method,
        "reduce": "auto" if reduce is None else reduce,
        "shard_size": shard_size,
        "options": _as_json(resolved),
    }
    if local is not None and local.is_dir():
        # its files' contents: a checkpoint saved over the directory is another model
        run["model_sha256"] = _directory_sha256(local)
    if dtype is not None:  # only when given: runs from before this option still resume
        run["dtype"] = str(dtype).removeprefix("torch.")
    elif isinstance(model, Model):  # a model object's own: shards of one run share it
        run["model_dtype"] = str(model.dtype).removeprefix("torch.")
    if out.exists() and not out.is_dir():
        raise InputError(f"`out` {str(out)!r} exists and is not a directory")
    pool = None
    if workers is not None or scheduler is not None:
        _distributed.check(model, workers, scheduler)
        spec = None if model is None else model_name
        named = None if model is None else str(model)  # as one process names it: as given
        pool = _distributed.Pool(
            spec, device, dtype, workers=workers, scheduler=scheduler, name=named
        )
    try:
        return _attribute_dataset(
            model, fn, resolved, steps, data, out, scan, shards, run, shard_size, method,
            options, progress, device, dtype, pool,
        )  # fmt: skip
    finally:
        if pool is not None:
            pool.close()


def _attribute_dataset(
    model: Model | PathLike | None,
    fn: Callable[..., xr.DataArray],
    resolved: Mapping[str, Any],
    steps: list[tuple[str, str | None]] | None,
    data: Path,
    out: Path,
    scan: _Scan,
    shards: int,
    run: dict[str, Any],
    shard_size: int,
    method: str,
    options: Mapping[str, Any],
    progress: bool,
    device: str | None,
    dtype: torch.dtype | None,
    pool: Any,
) -> DatasetRun:
    loaded: list[Model] = []
    positions = resolved.get("positions")  # checked against every record before any shard

    def ready() -> Model:
        """The model, loaded once, after every record was checked to tokenize."""
        if not loaded:
            loaded.append(load_model(model, device=device, dtype=dtype))  # a Model passes
            _check_records(
                loaded[0], data, resolved.get("max_new_tokens"), positions, scan.has_noise
            )
        return loaded[0]

    previous = _read_manifest(out) if out.is_dir() else None
    # an `out` that cannot be made fails before the model loads; made here, it is removed again
    # if the run fails before its manifest is written
    created = _make_out(out)
    try:
        if previous is None or len(previous["done"]) < shards:
            if previous is not None and previous["done"]:
                _compare(out, previous["run"], run, fn)  # another run: say so before loading
            if pool is None:
                ready()
            else:  # the workers load the model meanwhile
                pool.map(
                    _check_task,
                    shard_records(data, max(shard_size, 64)),
                    data.name,
                    resolved.get("max_new_tokens"),
                    positions,
                    scan.has_noise,
                )
    except BaseException:
        _remove(created)
        raise
    started = False  # this process holds the lock and wrote the manifest
    fresh = not (out / ".lock").exists()  # a refused run removes the lock file it made
    held = False
    try:
        with _lock(out):
            held = True
            manifest = _start(out, run, data, shards, fn)
            started = not manifest["done"]
            # a listed shard that was deleted or no longer reads back is recomputed, not trusted
            manifest["done"] = [name for name in manifest["done"] if _readable(out / name)]
            done = set(manifest["done"])
            todo = [k for k in range(shards) if SHARD.format(k) not in done]
            if todo and pool is None:
                results = _serial(ready(), fn, steps, options, data, scan, shard_size, todo)
                _run(fn, results, scan, shard_size, out, manifest, todo, progress)
            elif todo:
                wanted = set(todo)
                jobs = (
                    (k, r) for k, r in enumerate(shard_records(data, shard_size)) if k in wanted
                )
                args = (method, dict(options), steps, scan)
                results = pool.files(_shard_task, jobs, args, out, SHARD.format)
                _run(fn, results, scan, shard_size, out, manifest, todo, progress)
                _clean(out)  # a worker killed mid-write left its temp file here
    except BaseException:
        if started:  # nothing done: the run leaves nothing behind (an option its shard refused)
            _unstart(out, created)
        elif held and fresh and not (out / MANIFEST).exists():  # refused before it began
            (out / ".lock").unlink(missing_ok=True)
            _remove(created)
        raise
    return DatasetRun(out, scan.records, shards, shards - len(todo))


def _unstart(out: Path, created: list[Path]) -> None:
    """Remove what a run that finished no shard wrote: its manifest, its lock file, and the
    directories it created (empty once those are gone)."""
    try:
        manifest = _read_manifest(out)
    except InputError:  # not ours to remove
        return
    if manifest is not None and manifest["done"]:
        return  # another process's shards since (it took the lock after this one)
    for name in (MANIFEST, ".lock"):
        (out / name).unlink(missing_ok=True)
    _remove(created)


def _make_out(out: Path) -> list[Path]:
    """Create the directory ``out`` and its missing parents; returns those created, innermost
    first. One that cannot be created or written in is an error naming ``out``."""
    missing = []
    for path in (out, *out.parents):
        if path.is_dir():
            break
        if path.exists():
            where = "" if path == out else f": {str(path)!r} is a file"
            raise InputError(f"`out` {str(out)!r} is not a directory{where}")
        missing.append(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _remove(missing)
        raise InputError(
            f"`out` {str(out)!r}: cannot create the directory ({err.strerror or err})"
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"`out` {str(out)!r}: cannot write in the directory (permission denied)")
    return missing


def _remove(created: list[Path]) -> None:
    """Remove the directories :func:`_make_out` created, innermost first, while empty."""
    for path in created:
        try:
            path.rmdir()
        except FileNotFoundError:  # a parent whose own mkdir failed
            continue
        except OSError:  # not empty: something else wrote there meanwhile
            return


def _check_layers(model: Model | PathLike | None, layers: Any, site: str) -> None:
    """An out-of-range ``layers`` refused before the run starts, from the model's config."""
    from . import _layers

    if isinstance(model, Model):
        config = model.hf.config
    else:
        from transformers import AutoConfig

        from ._default_model_task import DEFAULT_MODEL_PATH

        path = check.local_path(DEFAULT_MODEL_PATH if model is None else model, "model")
        if not path.is_dir():  # a hub name: only the run's own load may reach the hub
            return
        try:
            config = AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError):  # the run's own load names what is wrong with the model
            return
    _layers.check_config(config, layers, site)


def load_dataset_results(
    out: PathLike, *, partial: bool = False, lazy: bool = False, chunks: Any = None
) -> xr.DataArray | xr.Dataset:
    """All shards of an :func:`attribute_dataset` run as one array along ``example``.

    Shards are concatenated in record order, NaN-padded to the union of their ``target`` and
    ``source`` positions (missing tokens ``""``, ids ``-1``). An unfinished run is an error unless
    ``partial=True``, which returns the complete shards only.

    ``lazy=True`` (needs ``dask``: ``pip install 'attrax[distributed]'``) opens the shards without
    reading their values: a dask array, one chunk per shard along ``example`` (or ``chunks``, as
    :func:`attrax.load` takes them), computed when used, so a large run is analysed piece by
    piece. ``out`` may also be a single results file (an ``ax.evaluate`` Dataset saved with
    ``ax.save``), then opened as :func:`attrax.load` does.

    Arguments:
        out: the run's output directory (:func:`attribute_dataset`'s ``out``), or a results file.
        partial: True: load the complete shards of an unfinished run instead of refusing it.
        lazy: True: open the shards as dask arrays (one chunk per shard) without reading them.
        chunks: dask chunks as :func:`attrax.load` takes them; given, the shards open lazily
            whatever ``lazy`` says.

    Returns:
        DataArray ``(example, target, source)`` with the default ``reduce`` (other dims as the
        run's ``reduce`` left them), its ``example`` coordinate each record's line number; for
        a results file, what :func:`attrax.load` returns (a Dataset for ``ax.evaluate``'s).

    >>> import json, tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> line = json.dumps({"input": "3 1 4 0 5 9 =", "target": " 9 5 0 4 1 3"}) + "\\n"
    >>> _ = (d / "x.jsonl").write_text(line * 3)
    >>> _ = attribute_dataset(None, d / "x.jsonl", d / "out", shard_size=2, progress=False)
    >>> load_dataset_results(d / "out").example.values.tolist()
    [0, 1, 2]
    """

    if not isinstance(out, str | os.PathLike):
        raise InputError(f"`out` must be a run's directory or a results file, got {out!r}")
    for name, value in (("partial", partial), ("lazy", lazy)):
        if not isinstance(value, bool):  # "no" would read as True
            raise OptionError(f"`{name}` must be a bool, got {value!r}")
    out = check.local_path(out, "out")
    if lazy and chunks is None:
        chunks = -1  # one chunk per shard
    if out.is_file():
        return load(out, chunks=chunks)
    manifest = _read_manifest(out)
    if manifest is None:
        raise InputError(f"{str(out)!r} holds no attrax dataset run (no {MANIFEST})")
    done = manifest["done"]
    if not partial and len(done) < manifest["shards"]:
        raise InputError(
            f"{str(out)!r} is unfinished ({len(done)}/{manifest['shards']} shards): run the same "
            "command again to resume, or pass partial=True"
        )
    if not done:
        raise InputError(f"{str(out)!r} has no complete shard yet")
    parts = []
    for name in sorted(done, key=_shard_index):
        loaded = load(out / name, chunks=chunks)
        if not isinstance(loaded, xr.DataArray):
            raise InputError(f"{str(out / name)!r} does not hold an attrax DataArray")
        parts.append(loaded)
    merged = concat_examples(parts)
    return _records_options(merged, manifest["run"].get("options"))


def _records_options(da: xr.DataArray, run: Any) -> xr.DataArray:
    """``da`` whose ``attrs["options"]`` (the first shard's call) says of the options the
    records gave (``corrupted``, ``contrast``, the tokens to noise) what the run's manifest
    says, each record's, not the first shard's values."""
    if not isinstance(run, Mapping) or not isinstance(da.attrs.get("options"), str):
        return da
    options = json.loads(da.attrs["options"])
    for key, value in run.items():
        if key in options and isinstance(value, str) and "(each record's" in value:
            options[key] = value
    return da.assign_attrs(options=json.dumps(options, sort_keys=True))


def concat_examples(parts: list[xr.DataArray]) -> xr.DataArray:
    """Concatenate arrays along ``example``, padding ``target``/``source`` to their union."""
    padded_dims = [d for d in ("target", "source") if d in parts[0].dims]
    union = xr.Coordinates()
    for dim in padded_dims:
        values = union_labels(parts, dim)
        index = parts[0].indexes[dim]
        if isinstance(index, pd.MultiIndex):  # (side, position) sources of attribute_target
            midx = pd.MultiIndex.from_tuples(values, names=index.names)
            union = union.merge(xr.Coordinates.from_pandas_multiindex(midx, dim)).coords
        else:
            union = union.merge({dim: values}).coords
    like = xr.Dataset(coords=union)
    aligned = []
    for part in parts:
        fill = {str(name): fill_value(var.dtype) for name, var in part.coords.items()}
        fill[str(part.name)] = np.nan
        aligned.append(part.reindex_like(like, fill_value=fill))
    return xr.concat(
        aligned,
        dim="example",
        coords="minimal",
        compat="override",
        join="exact",
        combine_attrs="override",
    )


# --- internals --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Scan:
    sha256: str
    records: int
    has_target: bool
    has_id: bool
    has_label: bool = False
    has_corrupted: bool = False
    has_contrast: bool = False
    #: the data file's name, as errors name its lines
    name: str = ""
    #: each record's tokens to noise (activation patching's GaussianNoise: causal tracing)
    has_noise: bool = False


def _reads_noise(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` reads a record's ``"noise"`` (activation patching's Gaussian noise)."""
    return getattr(fn, "__name__", "") == "activation_patching"


def _scan(data: Path, noise: bool = False) -> _Scan:
    """Validate every line once (a bad line 10 000 fails before any work) and checksum the file;
    ``noise``: the method reads each record's ``"noise"``."""
    if not data.is_file():
        raise InputError(f"`data` {str(data)!r} is not a file")
    digest = hashlib.sha256()
    records, with_target, with_id, with_label, with_corrupted, with_contrast = 0, 0, 0, 0, 0, 0
    with_noise = 0
    for record in _records(data, digest, noise):
        records += 1
        with_noise += noise and "noise" in record
        with_corrupted += "corrupted" in record
        with_contrast += "contrast" in record
        with_target += "target" in record
        with_id += "id" in record
        with_label += "label" in record
    if records == 0:
        raise InputError(f"`data` {str(data)!r} has no records")
    if 0 < with_target < records:
        raise InputError(
            f"`data` {str(data)!r}: {with_target} of {records} records have a 'target'; give "
            "one on every line, or on none (then targets are generated, or predicted by a "
            "classifier)"
        )
    if 0 < with_label < records:
        raise InputError(
            f"`data` {str(data)!r}: {with_label} of {records} records have a 'label'; give one "
            "on every line, or on none"
        )
    if 0 < with_corrupted < records:
        raise InputError(
            f"`data` {str(data)!r}: {with_corrupted} of {records} records have a 'corrupted'; "
            "give one on every line, or on none"
        )
    if 0 < with_contrast < records:
        raise InputError(
            f"`data` {str(data)!r}: {with_contrast} of {records} records have a 'contrast'; "
            "give one on every line, or on none"
        )
    if 0 < with_noise < records:
        raise InputError(
            f"`data` {str(data)!r}: {with_noise} of {records} records have a 'noise'; give one "
            "on every line, or on none"
        )
    if with_noise and with_corrupted:
        raise InputError(
            f"`data` {str(data)!r}: its records give both a 'corrupted' input and the tokens "
            "to 'noise', two corrupted runs: give one of them"
        )
    return _Scan(
        digest.hexdigest(),
        records,
        with_target > 0,
        with_id > 0,
        with_label > 0,
        with_corrupted > 0,
        with_contrast > 0,
        data.name,
        with_noise > 0,
    )


def json_lines(data: Path, digest: Any = None) -> Iterator[tuple[int, str, Any]]:
    """``(line_no, where, value)`` of each non-blank line of a JSON Lines file: its 0-based
    number, ``"name line n"`` for messages, and its parsed JSON (``digest`` sees every byte).

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "d.jsonl"
    >>> _ = path.write_text('{"input": "1 ="}' + chr(10) * 2 + '[2]' + chr(10))
    >>> list(json_lines(path))
    [(0, 'd.jsonl line 1', {'input': '1 ='}), (2, 'd.jsonl line 3', [2])]
    """
    with open(data, "rb") as f:
        for line_no, raw in enumerate(f):
            if digest is not None:
                digest.update(raw)
            if not raw.strip():
                continue
            where = f"{data.name} line {line_no + 1}"
            try:
                value = json.loads(raw)
            except ValueError as err:  # JSONDecodeError and bad UTF-8 alike
                # a pretty-printed .json array fails on its first line: say how the file is read
                suffix = data.suffix.lower()
                hint = {
                    ".json": "; a .json file is read as JSON Lines, one record per line",
                    ".csv": "; this reads JSON Lines, one record per line (evaluate reads CSV too)",
                    ".parquet": "; this reads JSON Lines, one record per line (evaluate reads "
                    "Parquet too)",
                }.get(suffix, "")
                raise InputError(f"{where}: not valid JSON ({err}){hint}") from None
            yield line_no, where, value


def _records(data: Path, digest: Any = None, noise: bool = False) -> Iterator[dict[str, Any]]:
    """Each record with its 0-based line number as ``record["_line"]``; blank lines skipped
    (``noise``: its ``"noise"`` checked, else left alone as any other key)."""
    for line_no, where, record in json_lines(data, digest):
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if "input" not in record:
            raise InputError(
                f"{where} has no field 'input': its fields are {sorted(record)}; every line "
                "needs the text to attribute as 'input'"
            )
        for key in ("input", "target", "input_pair", "corrupted", "corrupted_pair"):
            value = record.get(key, "")
            # whitespace is text ("\n" is a target): the tokenizer's reading is checked later
            if (key in record or key == "input") and (not isinstance(value, str) or not value):
                raise InputError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
        if "id" in record and (
            isinstance(record["id"], bool) or not isinstance(record["id"], (str, int))
        ):
            raise InputError(f"{where}: 'id' must be a string or an integer")
        what = {"label": "a label name or a class id", "contrast": "a text or a class"}
        for key in what:
            if key in record and (
                isinstance(record[key], bool) or not isinstance(record[key], (str, int))
            ):
                raise InputError(f"{where}: {key!r} must be {what[key]}")
        given = record.get("noise", "x") if noise else "x"
        if not (
            (isinstance(given, str) and given.strip())
            or (
                isinstance(given, list)
                and given
                and all(isinstance(v, int) and not isinstance(v, bool) for v in given)
            )
            or (isinstance(given, int) and not isinstance(given, bool))
        ):
            raise InputError(
                f"{where}: 'noise' must be the tokens to noise, a text in the input or "
                f"positions (an int or a non-empty list of ints), got {given!r}"
            )
        if isinstance(record.get("contrast"), str) and not record["contrast"].strip():
            raise InputError(f"{where}: 'contrast' must be a non-empty string, got ''")
        if ("corrupted_pair" in record) != ("corrupted" in record and "input_pair" in record):
            raise InputError(
                f"{where}: a pair's corrupted input is 'corrupted' and 'corrupted_pair', given "
                "with 'input' and 'input_pair' (a text's: 'corrupted' alone)"
            )
        keys = ("input", "target", "input_pair", "corrupted", "corrupted_pair", "id", "label")
        for key in (*keys, "contrast"):
            problem = not_text(record.get(key))
            if problem:  # before any work: a tokenizer or a shard's save fails on them later
                raise InputError(f"{where}: {key!r} {problem}")
        yield {**record, "_line": line_no}


def shard_records(data: Path, size: int) -> Iterator[list[dict[str, Any]]]:
    shard: list[dict[str, Any]] = []
    for record in _records(data):
        shard.append(record)
        if len(shard) == size:
            yield shard
            shard = []
    if shard:
        yield shard


def _start(
    out: Path, run: dict[str, Any], data: Path, shards: int, fn: Callable[..., xr.DataArray]
) -> dict[str, Any]:
    """Check a previous run's manifest against this one, or write a fresh manifest."""
    _clean(out)
    manifest = _read_manifest(out)
    if manifest is not None and not manifest["done"] and manifest["run"] != run:
        manifest = None  # a run that finished no shard (an option its first shard refused)
    if manifest is None:
        if any(out.glob("shard-*.nc")):
            raise InputError(
                f"`out` {str(out)!r} holds shard files but no {MANIFEST}: use an empty directory"
            )
        manifest = {"format": _FORMAT, "version": _VERSION, "run": run, "data_path": str(data)}
        manifest.update({"shards": shards, "done": []})
        _write_manifest(out, manifest)
        return manifest
    _compare(out, manifest["run"], run, fn)
    if manifest["run"] != run:  # the same run, as an older attrax wrote it: now in today's terms
        manifest["run"] = run
        _write_manifest(out, manifest)
    return manifest


def _clean(out: Path) -> None:
    """Remove temp files of writes that a kill interrupted (io.save cleans up after anything
    else) and tokens of Dask runs that a kill ended."""
    for stray in out.iterdir():
        if _STRAY.match(stray.name):
            stray.unlink(missing_ok=True)


def _compare(
    out: Path, previous: Mapping[str, Any], run: Mapping[str, Any], fn: Callable[..., Any]
) -> None:
    """Refuse to resume ``previous`` (a manifest's run) as ``run`` when they compute different
    things. Options compare with the method's defaults filled in on both sides (manifests before
    this rule hold only the options given), and a manifest's ``batch_size`` is its shard size."""
    previous = dict(previous)
    if "batch_size" in previous and "shard_size" not in previous:
        previous["shard_size"] = previous.pop("batch_size")
    # unchecked: a method whose option has no default (activation patching's `corrupted`)
    defaults = _as_json(fn.attrax_resolve({}, checked=False))  # type: ignore[attr-defined]
    if isinstance(previous.get("options"), Mapping):
        previous["options"] = {**defaults, **previous["options"]}
    # keys either run has: a run given a dtype and one without differ; a manifest before the
    # model's files were hashed resumes
    keys = dict.fromkeys([*run, *previous])
    for recorded_since in ("model_sha256", "model_dtype"):  # manifests before them resume
        if recorded_since not in previous:
            keys.pop(recorded_since, None)
    if previous.get("method") != run.get("method"):
        keys.pop("options", None)  # another method's options: the method says it all
    changed = []
    for key in keys:
        was, now = previous.get(key), run.get(key)
        if was == now:
            continue
        if key == "options" and isinstance(was, Mapping) and isinstance(now, Mapping):
            changed += [
                f"option {o}: was {_show(o, was.get(o))}, now {_show(o, now.get(o))}"
                for o in dict.fromkeys([*was, *now])
                if was.get(o) != now.get(o)
            ]
        else:
            changed.append(f"{_name(key)}: was {_show(key, was)}, now {_show(key, now)}")
    if changed:
        raise InputError(
            f"`out` {str(out)!r} holds another run ({'; '.join(changed)}): resume with the same "
            "data and options, or write to a new directory"
        )


def _as_json(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as the manifest stores them: JSON, a tensor by its shape, dtype and contents'
    SHA-256, a function by its qualified name and its code's (a repr holds a memory address,
    and cuts a large tensor short); anything else by its repr."""
    return json.loads(json.dumps(options, sort_keys=True, default=_identity))


def _identity(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().flatten()
        digest = hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()
        return f"tensor {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')} {digest}"
    code = getattr(value, "__code__", None)
    if callable(value) and code is not None:
        parts = (code.co_code, repr(code.co_consts), repr(code.co_names))
        digest = hashlib.sha256(repr(parts).encode()).hexdigest()
        return f"{value.__module__}.{value.__qualname__} {digest}"
    return repr(value)


def _readable(path: Path) -> bool:
    """Whether a shard reads back whole: a truncated or corrupt file is recomputed."""

    try:
        return path.is_file() and isinstance(load(path), xr.DataArray)
    except InputError:
        return False


def _check_records(
    model: Model, data: Path, max_new_tokens: Any, positions: Any = None, noise: bool = False
) -> None:
    """Tokenize every record as the method will: its errors, with the record's line, up front."""
    check_lines(model, _records(data), data.name, max_new_tokens, positions, noise)


def check_lines(
    model: Model,
    records: Iterable[dict[str, Any]],
    name: str,
    max_new_tokens: Any,
    positions: Any = None,
    noise: bool = False,
) -> None:
    """:func:`_check_records` of records read from the file called ``name``; ``positions``: the
    target positions the method is to attribute, checked where a record gives its target;
    ``noise``: each record's tokens to noise, found in its input."""
    room = max_new_tokens if isinstance(max_new_tokens, int) else None
    for record in records:
        try:
            check_example(
                model,
                record["input"],
                record.get("target"),
                room,
                names=("input", "target"),
                pair=record.get("input_pair"),
                positions=positions,
                contrast=record.get("contrast"),
            )
            if "label" in record:
                label_name(model, record["label"])
            if noise:
                _check_noise(model, record)
        except InputError as err:
            raise InputError(f"{name} line {record['_line'] + 1}: {err}") from None


def _check_noise(model: Model, record: dict[str, Any]) -> None:
    """A record's tokens to ``noise`` found in its input (tokenizing only), as the run finds
    them; an InputError naming the field otherwise."""
    from ._components import GaussianNoise

    given = (record["input"], record["input_pair"]) if "input_pair" in record else record["input"]
    noise = GaussianNoise(
        tokens=[record["noise"]] if isinstance(record["noise"], int) else record["noise"]
    )
    try:
        noise.per_example(model, input_texts(model, given), source_ids(model, given), True)
    except (InputError, OptionError) as err:
        raise InputError(str(err).replace("`GaussianNoise.tokens`", "`noise`")) from None


def _name(key: str) -> str:
    return {"data": "data file", "model_sha256": "model files"}.get(key, key)


def _directory_sha256(path: Path) -> str:
    """SHA-256 of a model directory's files (names and contents, its subdirectories aside)."""
    digest = hashlib.sha256()
    for file in sorted(f for f in path.iterdir() if f.is_file()):
        digest.update(file.name.encode() + b"\0")
        inner = hashlib.sha256()
        with open(file, "rb") as f:
            while block := f.read(1 << 24):
                inner.update(block)
        digest.update(inner.digest())
    return digest.hexdigest()


def _show(key: str, value: Any) -> str:
    if key == "data" and isinstance(value, Mapping):
        return f"{value.get('records')} records, sha256 {str(value.get('sha256'))[:12]}"
    if key == "model_sha256" and isinstance(value, str):
        return f"sha256 {value[:12]}"
    return json.dumps(value) if isinstance(value, (dict, list)) else repr(value)


def _serial(
    model: Model,
    fn: Callable[..., xr.DataArray],
    steps: list[tuple[str, str | None]] | None,
    options: Mapping[str, Any],
    data: Path,
    scan: _Scan,
    shard_size: int,
    todo: list[int],
) -> Iterator[tuple[int, xr.DataArray]]:
    """``(k, array)`` for every shard ``k`` of ``todo``, computed here, in order."""
    wanted = set(todo)
    for k, records in enumerate(shard_records(data, shard_size)):
        if k in wanted:
            yield k, attribute_records(model, fn, steps, options, records, scan)


def _run(
    fn: Callable[..., xr.DataArray],
    results: Iterator[tuple[int, Any]],  # an array, or a Written
    scan: _Scan,
    shard_size: int,
    out: Path,
    manifest: dict[str, Any],
    todo: list[int],
    show: bool,
) -> None:
    """Write each shard as it comes (atomically; a Dask worker may have written it), then list
    it in the manifest."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    wanted = set(todo)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("records"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    skipped = sum(
        min(shard_size, scan.records - k * shard_size)
        for k in range(manifest["shards"])
        if k not in wanted
    )
    description = f"{fn.__name__}" + (" (resumed)" if manifest["done"] else "")
    console = Console(stderr=True)
    with Progress(*columns, console=console, disable=not show, transient=False) as bar:
        task = bar.add_task(description, total=scan.records, completed=skipped)
        for k, da in results:
            name = SHARD.format(k)
            if isinstance(da, xr.DataArray):
                save(da, out / name)
            elif not (out / name).is_file():  # a Dask worker wrote it (a Written)
                raise InputError(f"a Dask worker wrote {name} but {str(out)!r} does not hold it")
            manifest["done"] = sorted({*manifest["done"], name}, key=_shard_index)
            _write_manifest(out, manifest)
            bar.advance(task, min(shard_size, scan.records - k * shard_size))


def attribute_records(
    model: Model,
    fn: Callable[..., xr.DataArray],
    steps: list[tuple[str, str | None]] | None,
    options: Mapping[str, Any],
    records: list[dict[str, Any]],
    scan: _Scan,
) -> xr.DataArray:
    inputs = [(r["input"], r["input_pair"]) if "input_pair" in r else r["input"] for r in records]
    targets = [record["target"] for record in records] if scan.has_target else None
    if scan.has_corrupted and _takes(fn, "corrupted"):
        corrupted = [
            (r["corrupted"], r["corrupted_pair"]) if "corrupted_pair" in r else r["corrupted"]
            for r in records
        ]
        options = {**options, "corrupted": corrupted}
    if scan.has_noise:
        options = {**options, "corrupted": _record_noise(options, records)}
    if scan.has_contrast:  # a method that takes none is refused before the first shard
        options = {**options, "contrast": [record["contrast"] for record in records]}
    try:
        da = reduce(call_method(fn, model, inputs, targets, options), steps)
    except InputError as err:
        if str(err).startswith("`contrast` must match `inputs`"):
            # one text given as an option for every record (a classifier's class serves all)
            raise InputError(
                "`contrast` is one text for every record: give each record its own as a "
                "'contrast' field"
            ) from None
        # `inputs[1]` of this shard is a line of the file (what only a run finds: a generated
        # target's positions, a corrupted input's length)
        raise InputError(_by_line(str(err), records, scan.name)) from None
    da = da.assign_coords(example=[record["_line"] for record in records])
    if scan.has_id:
        ids = [str(record.get("id", "")) for record in records]
        da = da.assign_coords(id=("example", np.asarray(ids, dtype=str)))
    if scan.has_label:
        labels = [label_name(model, record["label"]) for record in records]
        da = da.assign_coords(label=("example", np.asarray(labels, dtype=str)))
    return da


def _by_line(message: str, records: list[dict[str, Any]], name: str) -> str:
    """``message`` with the first argument it names by index (``inputs[1]``, ``corrupted[0]``)
    as that record's line of the file ``name``: ``data.jsonl line 7: `input` ...``."""
    fields = {"inputs": "input", "targets": "target", "corrupted": "corrupted",
              "contrast": "contrast", "GaussianNoise.tokens": "noise"}  # fmt: skip
    found = re.search(rf"`({'|'.join(fields)})\[(\d+)\]`", message)
    if not found or int(found[2]) >= len(records):
        return message
    line = records[int(found[2])]["_line"] + 1
    message = message.replace(found[0], f"`{fields[found[1]]}`", 1)
    return f"{name} line {line}: {message}"


def _described(value: Any) -> str:
    """A value for an error message: a function by its name, anything else by its repr."""
    name = getattr(value, "__name__", None)
    return f"the function {name}" if callable(value) and isinstance(name, str) else repr(value)


def _takes(fn: Callable[..., xr.DataArray], name: str) -> bool:
    return name in inspect.signature(fn).parameters


def _with_record_options(
    fn: Callable[..., xr.DataArray], options: Mapping[str, Any], scan: _Scan
) -> Mapping[str, Any]:
    """``options`` with those the records give per record (``corrupted``, ``contrast``) named for
    the checks and the manifest; a record field and the same option given to the call is an
    error, and so is a ``contrast`` field for a method that takes none (its result would not
    be what the records ask for)."""
    if scan.has_noise:  # the manifest names the noise's fields; its tokens are the records'
        options = {**options, "corrupted": _record_noise(options, None)}
    given = {"corrupted": scan.has_corrupted and _takes(fn, "corrupted")}
    if scan.has_contrast and not _takes(fn, "contrast"):
        raise OptionError(
            f"the records give a 'contrast' but {fn.__name__} takes no `contrast`: attribute them "
            "with a method that does (saliency, integrated_gradients, occlusion...), or leave "
            "the field out"
        )
    given["contrast"] = scan.has_contrast
    for name in (n for n, on in given.items() if on):
        if name in options:
            raise OptionError(
                f"`{name}` is given both as an option and by the records' {name!r} field: give one"
            )
        options = {**options, name: f"(each record's {name!r})"}
    return options


def _record_noise(options: Mapping[str, Any], records: list[dict[str, Any]] | None) -> Any:
    """The ``corrupted`` option of records that give the tokens to ``noise``: the option's
    :class:`~attrax.GaussianNoise` (its scale, samples, seed) or the defaults, with each
    record's tokens (``records`` None: a description of them, for the manifest)."""
    from ._components import GaussianNoise

    given = options.get("corrupted")
    if given is not None and not (isinstance(given, GaussianNoise) and given.tokens is None):
        raise OptionError(
            "`corrupted` is given both as an option and by the records' 'noise' field: give "
            "the noise's other fields as GaussianNoise(tokens=None, ...), or leave it out"
        )
    base = given if isinstance(given, GaussianNoise) else GaussianNoise()
    if records is None:
        return dataclasses.replace(base, tokens="(each record's 'noise')")
    # one selection per record: an int as a list (a shard of ints is no list of positions)
    tokens = [[r["noise"]] if isinstance(r["noise"], int) else r["noise"] for r in records]
    return dataclasses.replace(base, tokens=tokens)


def label_name(model: Model, value: str | int) -> str:
    """A record's true label as a label name: a classifier's class id is named, a name checked.

    >>> label_name(load_model("attrax:classifier"), 2)
    'positive'
    """
    if not model.labels:
        return str(value)
    if isinstance(value, int):
        if value not in model.labels:
            raise InputError(
                f"`label` {value} is not a class id of {model.name}: it has {len(model.labels)} "
                f"classes (0..{len(model.labels) - 1})"
            )
        return model.labels[value]
    if value not in model.labels.values():
        raise InputError(
            f"`label` {value!r} is not a label of {model.name}; its labels are "
            f"{list(model.labels.values())}"
        )
    return value


def _read_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest in ``out`` (None if there is none), its structure checked: a hand-edited one
    is an error that says what is wrong, never a crash or a shard read twice."""
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise InputError(f"{str(path)!r} is not an attrax dataset manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise InputError(f"{str(path)!r} is not an attrax dataset manifest")
    version = manifest.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version != _VERSION:
        raise InputError(
            f"{str(path)!r} has manifest version {version}: this attrax reads version {_VERSION}"
        )
    problem = _manifest_problem(manifest)
    if problem:
        raise InputError(f"{str(path)!r} is a damaged attrax dataset manifest: {problem}")
    return manifest


def _manifest_problem(manifest: Mapping[str, Any]) -> str | None:
    """What is wrong with a manifest's ``version``, ``run``, ``shards`` and ``done``, or None."""
    version, run = manifest.get("version"), manifest.get("run")
    given, done = manifest.get("shards"), manifest.get("done")
    if _count(version) != _VERSION:
        return f"'version' must be {_VERSION}, got {version!r}"
    if not isinstance(run, dict):
        return f"'run' must be an object, got {run!r}"
    shards = _count(given)
    if shards is None:
        return f"'shards' must be a positive integer, got {given!r}"
    records = _count(run["data"].get("records")) if isinstance(run.get("data"), dict) else None
    size = _count(run.get("shard_size", run.get("batch_size")))  # older manifests: `batch_size`
    if records is not None and size is not None and shards != -(-records // size):
        return (
            f"'shards' is {shards}, but its run's {records} records in shards of {size} make "
            f"{-(-records // size)}"
        )
    if not isinstance(done, list):
        return f"'done' must be a list of shard file names, got {done!r}"
    seen: set[str] = set()
    for name in done:
        index = re.fullmatch(r"shard-(\d+)\.nc", name) if isinstance(name, str) else None
        if index is None or name != SHARD.format(int(index[1])) or int(index[1]) >= shards:
            return (
                f"'done' lists {name!r}: expected names of its {shards} shard files, "
                f"{SHARD.format(0)!r} .. {SHARD.format(shards - 1)!r}"
            )
        if name in seen:
            return f"'done' lists {name!r} twice"
        seen.add(name)
    return None


def _count(value: Any) -> int | None:
    """``value`` if it is a positive integer (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _write_manifest(out: Path, manifest: Mapping[str, Any]) -> None:
    text = json.dumps(manifest, indent=1)
    write_atomically(out / MANIFEST, lambda tmp: tmp.write_text(text))


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (where ``fcntl`` exists): one writer per directory."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one writer is the user's responsibility
        yield
        return
    with open(out / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(f"`out` {str(out)!r} is in use by another attrax process") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _shard_index(name: str) -> int:
    return int(name.removeprefix("shard-").removesuffix(".nc"))


@dataclasses.dataclass(frozen=True)
class Written:
    """What a Dask worker returns for a shard file it wrote: its name and what it holds."""

    name: str
    examples: tuple[int, ...]
    sizes: tuple[tuple[str, int], ...]


@_distributed.reporting
def _check_task(
    where: Any,
    records: list[dict[str, Any]],
    name: str,
    max_new_tokens: Any,
    positions: Any,
    noise: bool = False,
) -> None:
    """On a worker: :func:`check_lines` of a shard's records with the worker's model."""
    check_lines(_distributed.worker_model(where), records, name, max_new_tokens, positions, noise)


@_distributed.reporting
def _shard_task(
    where: Any,
    method: str,
    options: Mapping[str, Any],
    steps: Any,
    scan: Any,
    records: list[dict[str, Any]],
    path: str,
    token: str,
    name: str | None = None,
) -> xr.DataArray | Written:
    """On a worker: a shard's attributions, written to ``path`` when the client's ``token`` file
    is beside it (the same filesystem as the client's), else the array returned to the client.
    ``name``: the model as the array names it (the path as given, as in one process)."""
    model = _distributed.worker_model(where)
    da = attribute_records(model, resolve_method(method), steps, options, records, scan)
    if name is not None:
        da = da.assign_attrs(model=name)
    target = Path(path)
    if not (target.parent / token).exists():
        return da
    save(da, target)  # atomically, as the in-process run writes
    sizes = tuple((str(dim), int(n)) for dim, n in da.sizes.items())
    return Written(target.name, tuple(int(e) for e in da["example"].values), sizes)
