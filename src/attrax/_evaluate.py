"""Compare attribution methods on a dataset: faithfulness, plausibility and agreement.

:func:`evaluate` attributes the records with every method, then scores each attribution:

- faithfulness (ERASER, RISE, ferret): ``comprehensiveness``/``sufficiency`` (AOPC),
  ``deletion``/``insertion`` (AUC) and ``taucorr_loo`` (Kendall's tau with leave-one-out drops),
  every method's perturbed copies going through the same batched forwards (the methods'
  attributions are scored as one batch, not in a loop per method);
- plausibility against human rationales given per word of the input: ``token_f1``, ``iou`` (the
  top-k tokens, k the rationale's size, against the rationale's tokens) and ``auprc``;
- agreement between methods: ``spearman``, ``kendall`` and ``topk_overlap`` over the sources each
  target can see.

:func:`summary` turns the result into a method-by-metric table with bootstrap confidence intervals.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import numbers
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr

from . import _distributed, _faithfulness
from . import _validate as check
from ._dataset import (
    check_model_options,
    concat_examples,
    json_lines,
    label_name,
    parse_reduce,
    resolve_method,
)
from ._dataset import reduce as apply_reductions
from ._errors import InputError, OptionError, ResourceError
from ._inputs import check_example, not_text
from ._memory import format_bytes, memory_budget
from ._model import Model, ModelLike, load_model
from ._names import AGREEMENT, FAITHFULNESS, METRICS, PLAUSIBILITY
from ._schema import (
    fill_value,
    has_targets,
    label_evaluation,
    label_sanity,
    recorded_option,
    union_labels,
)
from ._version import __version__


@dataclass(frozen=True)
class Record:
    """One example: its input, target (None: generated), true label and word rationale, and where
    it came from (``where``, for errors: a file's line or row, or the record's index)."""

    input: str
    target: str | None
    label: Any = None
    rationale: tuple[int, ...] | None = None
    where: str = "`data`"
    #: a classifier's second text (NLI), a question-answering model's context
    input_pair: str | None = None
    #: what the target is explained against: a text aligned with it, or a classifier's class
    contrast: str | int | None = None

    @property
    def item(self) -> str | tuple[str, str]:
        """What a method takes as this record's input: the text, or the (text, pair) pair."""
        return self.input if self.input_pair is None else (self.input, self.input_pair)


#: the record fields ``fields=`` may rename (the keyword arguments of :func:`read_records`)
FIELDS = tuple(f.name for f in dataclasses.fields(Record) if f.name != "where")


def read_records(
    data: Any,
    *,
    input: str = "input",
    target: str = "target",
    label: str = "label",
    rationale: str = "rationale",
    input_pair: str = "input_pair",
    contrast: str = "contrast",
) -> list[Record]:
    """Records from a list of dicts or texts, a pandas DataFrame, a Hugging Face ``datasets``
    Dataset (or a ``save_to_disk`` folder), or a JSONL, CSV or Parquet file; field names given.

    A record's errors name its file and line (JSONL) or row (CSV, Parquet, from 1 after the
    header), or its index in ``data``. A CSV is read as text: a target ``9`` stays ``'9'``.

    >>> [r.input for r in read_records([{"text": "1 2 ="}], input="text")]
    ['1 2 =']
    """
    source, rows = _rows(data)
    records = []
    for where, row in rows:
        if isinstance(row, str):
            row = {input: row}
        if not isinstance(row, Mapping):
            raise InputError(f"{where} must be a mapping or a text, got {type(row).__name__}")
        if input not in row:
            raise InputError(
                f"{where} has no field {input!r}: its fields are {list(row)}; name the one to "
                "use with `fields` (the CLI's --field input=NAME)"
            )
        text = row[input]
        if _missing(text):
            raise InputError(f"{where}: field {input!r} is empty: expected a non-empty text")
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: field {input!r} must be a non-empty text, got {text!r}")
        goal = None if _missing(row.get(target)) else row[target]
        # a number is a mistyped target, not "generate one": refuse rather than drop it
        if goal is not None and (not isinstance(goal, str) or not goal.strip()):
            raise InputError(
                f"{where}: field {target!r} must be a non-empty text, got {goal!r} (leave the "
                "field out of every record to generate targets)"
            )
        pair = None if _missing(row.get(input_pair)) else row[input_pair]
        if pair is not None and (not isinstance(pair, str) or not pair.strip()):
            raise InputError(
                f"{where}: field {input_pair!r} must be a non-empty text, got {pair!r}"
            )
        tag = None if _missing(row.get(label)) else row[label]
        if tag is not None and (
            isinstance(tag, (bool, np.bool_)) or not isinstance(tag, (str, numbers.Integral))
        ):
            raise InputError(
                f"{where}: field {label!r} must be a label name or a class id, got {tag!r}"
            )
        foil = None if _missing(row.get(contrast)) else row[contrast]
        if foil is not None and (
            isinstance(foil, (bool, np.bool_))
            or not isinstance(foil, (str, numbers.Integral))
            or (isinstance(foil, str) and not foil.strip())
        ):
            raise InputError(
                f"{where}: field {contrast!r} must be a non-empty text or a class, got {foil!r}"
            )
        fields = ((input, text), (input_pair, pair), (target, goal), (label, tag))
        for name, value in (*fields, (contrast, foil)):
            problem = not_text(value)
            if problem:  # before any method runs: the tokenizer fails on them later
                raise InputError(f"{where}: field {name!r} {problem}")
        marks = None if _missing(row.get(rationale)) else row[rationale]
        if marks is not None:
            marks = _rationale(marks, text, f"{where}: field {rationale!r}")
        tag = tag if tag is None or isinstance(tag, str) else int(tag)
        foil = foil if foil is None or isinstance(foil, str) else int(foil)
        records.append(Record(text, goal, tag, marks, where, pair, foil))
    if not records:
        raise InputError(f"{source} has no records")
    labelled = sum(r.label is not None for r in records)
    if 0 < labelled < len(records):  # the label coordinate would hold 'None' for the rest
        raise InputError(
            f"{source}: {labelled} of {len(records)} records have a field {label!r} "
            f"({_odd_one(records, lambda r: r.label is not None)}); give one on every record, "
            "or on none"
        )
    contrasted = sum(r.contrast is not None for r in records)
    if 0 < contrasted < len(records):  # one call explains every record against a contrast
        raise InputError(
            f"{source}: {contrasted} of {len(records)} records have a field {contrast!r} "
            f"({_odd_one(records, lambda r: r.contrast is not None)}); give one on every "
            "record, or on none"
        )
    given = sum(r.target is not None for r in records)
    if 0 < given < len(records):
        raise InputError(
            f"{source}: {given} of {len(records)} records have a field {target!r} "
            f"({_odd_one(records, lambda r: r.target is not None)}); give one on every record, "
            "or on none (then targets are generated, or predicted by a classifier)"
        )
    return records


def _odd_one(records: list[Record], has: Callable[[Record], bool]) -> str:
    """Where the first record of the fewer kind is (with or without the field), for an error."""
    having = [r for r in records if has(r)]
    fewer, lacking = (
        (having, False)
        if 2 * len(having) <= len(records)
        else ([r for r in records if not has(r)], True)
    )
    return f"{fewer[0].where} {'has none' if lacking else 'has one'}"


def _missing(value: Any) -> bool:
    """Whether a field's value means "not given": None, or NaN/NA (a DataFrame's empty cell)."""
    return value is None or value is pd.NA or (isinstance(value, float) and value != value)


def _rows(data: Any) -> tuple[str, Iterable[tuple[str, Any]]]:
    """``data`` as it is named in errors, and its rows, each with where it is (file line or row)."""
    if isinstance(data, (str, os.PathLike)):
        path = check.local_path(data, "data")
        name = f"`data` {str(path)!r}"
        if path.is_dir():
            return name, _numbered(_folder(path), f"{path.name} record {{}}", start=0)
        if not path.is_file():
            raise InputError(f"{name} is not a file or folder")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            return name, _jsonl(path)
        if suffix == ".csv":
            try:
                # as text: a target "9" stays "9" (and " 9" keeps its space), an empty cell ""
                frame = pd.read_csv(path, dtype=str, keep_default_na=False)
            except pd.errors.EmptyDataError:
                raise InputError(
                    f"{name} is empty: expected a header line, then one row per record"
                ) from None
            except (ValueError, OSError) as err:  # pandas' ParserError, bad UTF-8, unreadable
                said = " ".join(str(err).split())  # pandas' message ends in a newline: one line
                raise InputError(f"{name} is not a readable CSV file ({said})") from None
            # an empty cell is a field not given (as a JSONL record leaves it out, or a
            # DataFrame's NaN): pairs and single texts mix
            rows = [
                {k: None if v == "" else v for k, v in r.items()} for r in frame.to_dict("records")
            ]
            return name, _numbered(rows, f"{path.name} row {{}}")
        if suffix == ".parquet":
            try:
                frame = pd.read_parquet(path)
            except ImportError:
                raise InputError(
                    f"{name}: reading Parquet needs pyarrow (pip install 'attrax[data]')"
                ) from None
            except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
                raise InputError(f"{name} is not a readable Parquet file ({err})") from None
            return name, _numbered(frame.to_dict("records"), f"{path.name} row {{}}")
        raise InputError(f"{name}: expected a .jsonl, .csv or .parquet file")
    if isinstance(data, pd.DataFrame):
        return "`data`", _numbered(data.to_dict("records"), "`data` record {}", start=0)
    if isinstance(data, Iterable) and not isinstance(data, (bytes, Mapping)):
        return "`data`", _numbered(data, "`data` record {}", start=0)
    raise InputError(
        "`data` must be records (dicts or texts), a DataFrame, a datasets Dataset or a file path, "
        f"got {type(data).__name__}"
    )


def _numbered(rows: Iterable[Any], where: str, start: int = 1) -> Iterable[tuple[str, Any]]:
    return ((where.format(i), row) for i, row in enumerate(rows, start))


def _folder(path: Path) -> Any:
    """A ``datasets`` ``save_to_disk`` folder's rows."""
    try:
        import datasets
    except ImportError:
        raise InputError(
            f"`data` {str(path)!r} is a folder: reading a datasets `save_to_disk` folder "
            "needs the `datasets` package (pip install 'attrax[data]')"
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except (ValueError, OSError) as err:
        raise InputError(f"`data` {str(path)!r} is not a datasets folder ({err})") from None
    if isinstance(ds, datasets.DatasetDict):  # iterating it would give the split names
        raise InputError(
            f"`data` {str(path)!r} holds the splits {list(ds)}: give one split's folder"
        )
    return ds


def _jsonl(path: Path) -> list[tuple[str, Any]]:
    """A JSONL file's records, each named by its line (from 1); blank lines skipped."""
    try:
        return [(where, value) for _, where, value in json_lines(path)]
    except OSError as err:
        raise InputError(f"`data` {str(path)!r} cannot be read ({err.strerror})") from None


def _rationale(marks: Any, text: str, where: str) -> tuple[int, ...]:
    words = text.split()
    if isinstance(marks, str):  # a CSV cell: its characters are not marks
        raise InputError(f"{where} must be a list of 0/1 per word, got {marks!r}")
    try:
        values = tuple(marks)
    except TypeError:
        raise InputError(f"{where} must be a list of 0/1 per word, got {marks!r}") from None
    if len(values) != len(words):
        raise InputError(f"{where} has {len(values)} marks for the input's {len(words)} words")
    # a 2 or a -1 is a labelling mistake, not a strong or negative mark: refuse, don't binarize
    bad = [
        f"word {w} ({words[w]!r}): {m!r}"
        for w, m in enumerate(values)
        if not isinstance(m, (numbers.Real, np.bool_)) or m not in (0, 1)
    ]
    if bad:
        raise InputError(f"{where} must mark each word 0 or 1, got {', '.join(bad)}")
    return tuple(int(m) for m in values)


def _fields(fields: Any) -> dict[str, str]:
    """``fields=`` checked: record field -> the data's key for it."""
    if fields is None:
        return {}
    if not isinstance(fields, Mapping):
        raise OptionError(
            f"`fields` must be a mapping of record field -> the data's key, got {fields!r}"
        )
    for key, name in fields.items():
        if key not in FIELDS:
            raise OptionError(
                f"`fields` key {key!r} is not a record field: expected one of {FIELDS}"
            )
        if not isinstance(name, str):
            raise OptionError(f"`fields[{key!r}]` must be the data's key (a str), got {name!r}")
    return dict(fields)


def _reduced(da: Any, steps: Any, *, method: str, reduce: str, examples: int) -> xr.DataArray:
    """A method's output reduced to ``(example, target, source)``; an error names the method."""
    if not isinstance(da, xr.DataArray):
        raise OptionError(
            f"{method} returned {type(da).__name__}: an attribution function must return an "
            "xarray DataArray with dims (example, target, source, ...), as ax.saliency does"
        )
    try:
        da = apply_reductions(da, steps)
    except OptionError as err:  # one `reduce` for every method: say which one it did not fit
        raise OptionError(
            f"`reduce` {reduce!r} on the attribution of {method}: {err}; "
            "'auto' reduces each method's own dims"
        ) from None
    da = da if "example" in da.dims else da.expand_dims(example=[0])
    if set(da.dims) != {"example", "target", "source"}:
        raise OptionError(
            f"`reduce` {reduce!r} leaves the attribution of {method} with dims {da.dims}: the "
            "metrics need (example, target, source) arrays, so `reduce` must reduce the others "
            "(e.g. 'auto', or 'l2_norm:hidden,normalize:source')"
        )
    if da.sizes["example"] != examples:
        raise OptionError(
            f"{method} returned an `example` dim of size {da.sizes['example']} for {examples} "
            "records: expected one attribution per record"
        )
    return da.transpose("example", "target", "source")


def evaluate(
    model: ModelLike,
    data: Any,
    methods: Mapping[str, Callable[..., xr.DataArray] | str],
    metrics: Sequence[str] = ("comprehensiveness", "sufficiency"),
    *,
    reduce: str = "auto",
    top_k: int = 3,
    batch_size: int | str | None = "auto",
    attributions: bool = False,
    fields: Mapping[str, str] | None = None,
    device: str | None = None,
    dtype: Any = None,
    workers: int | str | None = None,
    scheduler: str | None = None,
    shard_size: int = 16,
) -> xr.Dataset:
    """Attribute ``data`` with every method of ``methods`` and score each attribution.

    Arguments:
        model: a :class:`Model` or a path.
        data: records (see :func:`read_records`). Records with a ``contrast`` explain their
            target against it: every method gets each record's own.
        fields: renames the records' keys, e.g. ``{"input": "text", "rationale": "evidence"}``.
        methods: name -> attribution function ``(model, inputs, targets) -> DataArray`` (an
            ``ax.pipe``, or ``functools.partial`` with options bound) or method name.
        metrics: from :data:`METRICS`; plausibility needs a ``rationale`` per record (0/1 per
            whitespace-separated word of the input), agreement two methods or more.
        reduce: how attributions become ``(example, target, source)`` (the CLI's
            ``--reduce``; ``"auto"``: L2 over ``hidden``, mean over ``layer``/``head``, then
            normalised over ``source``).
        top_k: the k of ``topk_overlap``.
        batch_size: perturbed copies per forward for the faithfulness metrics.
        attributions: also return the reduced attributions as ``attribution``.
        device, dtype: where and in which precision to load a model given by path; with a
            :class:`Model`, a ``device``/``dtype`` it is not on is an :class:`OptionError` (it is
            not moved).
        workers: evaluate on a Dask ``LocalCluster`` of this many worker processes (one torch
            thread each; ``"auto"``: one per GPU with ``device="cuda"``, else one per core).
            None (default): in this process. Needs ``pip install 'attrax[distributed]'``, a
            model given by path (or None), and ``methods`` that pickle (method names, public
            attrax functions, ``functools.partial``/``ax.pipe`` of them).
        scheduler: evaluate on the existing Dask cluster at this address (``"tcp://host:8786"``);
            its workers must reach the model path.
        shard_size: with ``workers``/``scheduler``, examples per task: each worker scores a
            shard with every method and metric in one batch, and the shards are joined along
            ``example`` in record order: the same result as in one process (up to float
            rounding: a shard's batch is padded to its own longest record).

    Returns:
        Dataset with one variable per metric along ``(method, example, target)`` (agreement also
        along ``other``, the method compared with).

    >>> import attrax as ax
    >>> data = [{"input": "3 1 4 0 5 9 =", "target": " 9 5 0 4 1 3"}]
    >>> methods = {"saliency": ax.saliency, "ixg": ax.input_x_gradient}
    >>> ds = ax.evaluate(ax.load_model(), data, methods)
    >>> sorted(ds.data_vars), ds.sizes["method"]
    (['comprehensiveness', 'sufficiency'], 2)
    """
    if isinstance(methods, Mapping):  # a method may be given by name ("saliency")
        functions = {
            k: resolve_method(fn) if isinstance(fn, str) else fn for k, fn in methods.items()
        }
    else:  # no mapping: _check refuses it
        functions = methods
    chosen = _check(functions, metrics, top_k)
    check.boolean(attributions, "attributions")
    steps = parse_reduce(reduce)
    renamed = _fields(fields)
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        raise OptionError(f"`shard_size` must be a positive integer, got {shard_size!r}")
    options: dict[str, Any] = {"chosen": chosen, "steps": steps, "reduce": reduce, "top_k": top_k,
               "batch_size": batch_size, "attributions": attributions}  # fmt: skip
    if workers is None and scheduler is None:
        if isinstance(model, Model):
            check_model_options(model, device, dtype)
        model = load_model(model, device=device, dtype=dtype)  # a Model passes through as is
        return score_records(model, read_records(data, **renamed), functions, **options)
    _distributed.check(model, workers, scheduler)
    _distributed.picklable(functions)
    records = read_records(data, **renamed)
    if any(m in PLAUSIBILITY for m in chosen):  # here, before a pool is started for nothing
        missing = next((r for r in records if r.rationale is None), None)
        if missing is not None:
            raise InputError(f"{missing.where} has no rationale: plausibility metrics need one")
    spec = None if model is None else str(model)
    # a local directory by its absolute path: a worker's working directory may be another one
    where = (
        spec
        if spec is None or not (local := check.local_path(spec, "model")).exists()
        else str(local.resolve())
    )
    pool = _distributed.Pool(where, device, dtype, workers=workers, scheduler=scheduler)
    try:
        shards = [records[i : i + shard_size] for i in range(0, len(records), shard_size)]
        parts = pool.map(_evaluate_task, shards, dict(functions), dict(options))
    finally:
        pool.close()
    ds = concat_evaluations(parts)
    if spec is not None:  # named as in one process: the path as given, not as the workers saw it
        ds.attrs["model"] = spec
    return ds


def score_records(
    model: Model,
    records: list[Record],
    methods: Mapping[str, Callable[..., xr.DataArray]],
    *,
    chosen: list[str],
    steps: Any,
    reduce: str,
    top_k: int,
    batch_size: int | str | None,
    attributions: bool,
) -> xr.Dataset:
    """Every method and metric on ``records``, as one batch: the body of :func:`evaluate`."""
    labels = _checked(model, records)
    inputs = [r.item for r in records]
    targets = None if records[0].target is None else [r.target for r in records]
    names = list(methods)
    per_record = {}
    if records[0].contrast is not None:  # each record's own: every method explains them
        per_record["contrast"] = [_contrast(model, r.contrast) for r in records]
    reduced = []
    for name, fn in methods.items():  # each method is its own computation
        _check_per_record(name, fn, per_record)
        try:
            got = fn(model, inputs, targets, **per_record)
        except OptionError as err:
            taken = [o for o in per_record if f"does not take `{o}`" in str(err)]
            if taken:
                raise _takes_none(name, taken[0], err) from None
            raise
        except InputError as err:  # `inputs[3]` is a record of the data, which its line names
            message = _by_record(str(err), records)
            bound = re.match(r"`(\w+)` must match `inputs`", message)
            if bound:  # an option bound to the method, one value for the whole dataset
                field = " or give each record a 'contrast' field," if bound[1] == "contrast" else ""
                message = (
                    f"`methods[{name!r}]` binds one `{bound.group(1)}` for {len(records)} "
                    f"records: bind a list of {len(records)}, one per record in the data's "
                    f"order,{field} or leave it out ({message})"
                )
            raise InputError(message) from None
        named = f"`methods[{name!r}]`"
        reduced.append(_reduced(got, steps, method=named, reduce=reduce, examples=len(inputs)))
    both = [isinstance(da.indexes.get("source"), pd.MultiIndex) for da in reduced]
    if len(set(both)) > 1:  # sources of one side and of two cannot be compared or joined
        which = [name for name, two in zip(names, both, strict=True) if two]
        raise OptionError(
            f"`methods` {which} attribute the decoder prefix too (attribute_target=True) and the "
            "others do not: their sources differ; give every method the same attribute_target"
        )
    flat = _one_batch(reduced)  # every method's examples as one batch: [M * N, T, S]
    n = len(inputs)
    # each method scored with what it explained (its objective, contrast and positions): one
    # batch per kind, labelled as its first method
    groups: dict[str, list[int]] = {}
    for m, da in enumerate(reduced):
        groups.setdefault(_explained(da), []).append(m)
    scores: dict[str, np.ndarray] = {}
    for metric in (m for m in chosen if m in FAITHFULNESS):
        per_method: list[np.ndarray] = [np.empty(0)] * len(names)
        for members in groups.values():
            group = [reduced[m] for m in members]
            if metric == "taucorr_loo":
                rows = _loo_taus(model, group, inputs, targets, batch_size)
            else:
                part = _one_batch(group)  # its own batch keeps what its methods share (contrast)
                part.attrs = dict(group[0].attrs)
                contrast = recorded_option(group[0], "contrast")
                curve = getattr(_faithfulness, metric)(
                    model, part, inputs * len(members),
                    None if targets is None else targets * len(members), batch_size=batch_size,
                    # one contrast per record: each method's copy of the records takes them
                    contrast=contrast * len(members) if isinstance(contrast, list) else None,
                )  # fmt: skip
                kept = curve[FAITHFULNESS[metric]]  # (example, target)
                rows = [kept.isel(example=slice(j * n, j * n + n)) for j in range(len(members))]
            for m, values in zip(members, rows, strict=True):
                # the group's targets among all methods' (a method may attribute fewer)
                per_method[m] = values.reindex(target=flat["target"].values).values
        scores[metric] = np.concatenate(per_method)
    relevance = flat.values  # [M * N, T, S], NaN where nothing is attributed
    if any(m in PLAUSIBILITY for m in chosen):
        truth = _rationale_tokens(model, flat, records)  # [N, S] of 0/1/NaN
        tiled = np.tile(truth, (len(names), 1))
        for metric in (m for m in chosen if m in PLAUSIBILITY):
            scores[metric] = _plausibility(metric, relevance, tiled)
    pairwise = {m: _agreement(m, relevance, len(names), top_k) for m in chosen if m in AGREEMENT}
    attrs = {
        "model": model.name,
        "model_dtype": str(model.dtype).removeprefix("torch."),
        "metrics": ",".join(chosen),
        "reduce": reduce,
        "top_k": top_k,
        # how each method ran: two evaluations with other steps or objectives differ here
        "methods": json.dumps(
            {name: _provenance(da, per_record) for name, da in zip(names, reduced, strict=True)},
            sort_keys=True,
        ),
        "attrax_version": __version__,
    }
    return label_evaluation(
        flat, names, scores, pairwise,
        attributions=attributions, labels=labels, attrs=attrs,
    )  # fmt: skip


def _provenance(da: xr.DataArray, per_record: Mapping[str, Any]) -> dict[str, Any]:
    """A method's attribution as its attrs record it: method, objective, options, reductions;
    what the records give each (a ``contrast`` field) is data, named ``"per record"``, so
    that shards of one evaluation record the same."""
    options = json.loads(da.attrs.get("options", "{}"))
    options.update(dict.fromkeys(per_record, "per record"))
    return {
        "method": da.attrs.get("method", ""),
        "objective": da.attrs.get("objective", ""),
        "options": options,
        "reductions": da.attrs.get("reductions", ""),
    }


def _check_per_record(name: str, fn: Callable[..., Any], per_record: dict[str, Any]) -> None:
    """Refuse a method that cannot take what the records give each (``contrast``), or that
    binds its own, which the records' would silently replace."""
    for option in per_record:
        bound = isinstance(fn, functools.partial) and option in fn.keywords
        if bound:
            raise OptionError(
                f"`methods[{name!r}]` binds `{option}` and the records give a field "
                f"{option!r}: give one of them"
            )
        inner = fn.func if isinstance(fn, functools.partial) else fn
        resolve = getattr(inner, "attrax_resolve", None)
        try:
            if resolve is not None:  # before any method runs (a chain's is known when it runs)
                resolve({option: None})
        except OptionError as err:
            raise _takes_none(name, option, err) from None


def _takes_none(name: str, option: str, err: OptionError) -> OptionError:
    return OptionError(
        f"the records give a field {option!r} but `methods[{name!r}]` takes none ({err}): "
        "compare methods that take it, or leave the field out"
    )


def _by_record(message: str, records: list[Record]) -> str:
    """``message`` with each ``inputs[i]``/``targets[i]`` it names as record ``i`` of the data
    (its file and line, or its index)."""

    def where(found: re.Match[str]) -> str:
        i = int(found.group(2))
        field = {"inputs": "input", "targets": "target"}[found.group(1)]
        return f"`{field}` of {records[i].where}" if i < len(records) else found.group(0)

    return re.sub(r"`(inputs|targets)\[(\d+)\]`", where, message)


def _pinned_targets(model: Model, da: xr.DataArray) -> list[Any]:
    """Each example's targets as an attribution of a classifier ``da`` holds them, in the form
    the methods take them: classes (label names), an answer's span, a masked LM's tokens."""
    single = "example" not in da.dims
    rows = [da] if single else [da.isel(example=b) for b in range(da.sizes["example"])]
    pinned: list[Any] = []
    for row in rows:
        if model.task == "question-answering":
            pinned.append(tuple(int(p) for p in row["target_position"].values))
        elif model.task == "fill-mask":
            ids = np.atleast_1d(row["target_id"].values)
            tokens = np.atleast_1d(row["target_token"].values)
            pinned.append([str(t) for t, i in zip(tokens, ids, strict=True) if i >= 0])
        else:
            labels = np.atleast_1d(row["target_label"].values)
            pinned.append([str(x) for x in labels if x])
    return pinned


def _checked(model: Model, records: list[Record]) -> list[Any]:
    """Each record tokenized as the methods will and its label checked, before any method runs,
    so that an error names the record's line; returns the labels (a class id named)."""
    labels = []
    for record in records:
        try:
            # room for one generated token at least: the methods' own limit is not known here
            room = 1 if record.target is None else None
            check_example(
                model,
                record.input,
                record.target,
                room,
                names=("input", "target"),
                pair=record.input_pair,
                contrast=_contrast(model, record.contrast),
            )
            labels.append(None if record.label is None else _label(model, record.label))
        except InputError as err:
            raise InputError(f"{record.where}: {err}") from None
    return labels


def _contrast(model: Model, value: str | int | None) -> str | int | None:
    """A record's contrast as the methods take it: a classifier's class id in a CSV's text
    (``'1'``) as the id, unless a label is named so; a language model's text as it is."""
    if isinstance(value, str) and model.labels and value not in model.labels.values():
        return int(value) if value.isdecimal() else value
    return value


def _label(model: Model, value: str | int) -> str | int:
    """A true label as the classifier's label name (a name, or a class id such as a CSV's '1');
    a language model's label is a free tag, kept as it is."""
    if not model.labels:
        return value
    # a CSV cell is text: its "1" is the class id 1, unless a label is named "1"
    if isinstance(value, str) and value not in model.labels.values() and value.isdecimal():
        value = int(value)
    return label_name(model, value)


def concat_evaluations(parts: list[xr.Dataset]) -> xr.Dataset:
    """Evaluations of consecutive shards of the records as one, along ``example`` in order:
    ``example`` renumbered, ``target``/``source`` padded to their union as in one batch."""
    union = {dim: union_labels(parts, dim) for dim in ("target", "source") if dim in parts[0].dims}
    labelled = any("label" in p.coords for p in parts)
    aligned, start = [], 0
    for part in parts:
        if labelled and "label" not in part.coords:  # as one batch labels it: str(None)
            part = part.assign_coords(label=("example", np.full(part.sizes["example"], "None")))
        n = part.sizes["example"]
        fill = {str(k): fill_value(v.dtype) for k, v in part.variables.items()}
        aligned.append(
            part.reindex(union, fill_value=fill).assign_coords(example=np.arange(start, start + n))
        )
        start += n
    return xr.concat(
        aligned,
        dim="example",
        data_vars="minimal",
        coords="minimal",
        compat="override",
        join="exact",
        combine_attrs="override",
    )


def _check(
    methods: Mapping[str, Callable[..., Any]], metrics: Sequence[str], top_k: int
) -> list[str]:
    if not isinstance(methods, Mapping) or not methods:
        raise OptionError("`methods` must be a non-empty mapping of name -> attribution function")
    for name, fn in methods.items():
        if not isinstance(name, str) or not callable(fn):
            raise OptionError(f"`methods[{name!r}]` must be a callable under a string name")
        not_attribution(fn, f"`methods[{name!r}]`")
    if metrics is None or not isinstance(metrics, (str, Sequence)):
        raise OptionError(f"`metrics` must be a non-empty list from {METRICS}, got {metrics!r}")
    chosen = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in chosen if m not in METRICS]
    if unknown or not chosen:
        raise OptionError(f"`metrics` must be a non-empty list from {METRICS}, got {metrics!r}")
    if any(m in AGREEMENT for m in chosen) and len(methods) < 2:
        raise OptionError("agreement metrics compare methods: give `methods` two or more")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise OptionError(f"`top_k` must be a positive integer, got {top_k!r}")
    return chosen


#: attrax functions that take a model and inputs but return no attribution
_NOT_ATTRIBUTIONS = {"faithfulness": "a faithfulness metric", "step_scores": "step scores"}


def not_attribution(fn: Callable[..., Any], where: str) -> None:
    """Refuse an attrax function in place of an attribution method: a reduction (it takes an
    attribution, not a model), a faithfulness metric or the step scores (no attribution)."""
    inner = getattr(fn, "func", fn)  # functools.partial
    name = getattr(inner, "__name__", "")
    if getattr(inner, "attrax_reduction", None) is not None:
        raise OptionError(
            f"{where} is ax.{name}, a reduction: it reduces an attribution; give a method, or "
            f"ax.pipe(method, ax.{name})"
        )
    what = _NOT_ATTRIBUTIONS.get(getattr(inner, "attrax_family", None) or "")
    if what is not None:
        raise OptionError(f"{where} is ax.{name}, {what}, not an attribution method")


def _explained(da: xr.DataArray) -> str:
    """What an attribution explains, as its faithfulness is scored: its objective, and the
    contrast, positions and generated length its options record (methods that differ are
    scored apart)."""
    names = ("contrast", "positions", "max_new_tokens")
    recorded = [recorded_option(da, name) for name in names]
    return json.dumps([str(da.attrs.get("objective")), *recorded], default=str)


def _loo_taus(
    model: Model,
    group: list[xr.DataArray],
    inputs: list[Any],
    targets: list[Any] | None,
    batch_size: int | str | None,
) -> list[xr.DataArray]:
    """Each method's ``(example, target)`` Kendall tau with the leave-one-out drops. The drops
    do not depend on the method: where the methods have the same targets, every source any of
    them scores is removed once for all of them; otherwise each is scored on its own."""
    slices = [
        _faithfulness.in_source_order(da.transpose("example", "target", "source")) for da in group
    ]
    first = slices[0]
    shared = all(
        part.indexes["target"].equals(first.indexes["target"])
        and part.indexes["source"].equals(first.indexes["source"])
        and np.array_equal(has_targets(part), has_targets(first))
        for part in slices[1:]
    )
    if not shared:
        return [
            _faithfulness.loo_correlation(model, da, inputs, targets, batch_size=batch_size).tau
            for da in group
        ]
    scored = np.any([~np.isnan(part.values) for part in slices], axis=0)
    union = first.copy(data=np.where(scored, 0.0, np.nan))
    union.attrs = dict(group[0].attrs)
    loo = _faithfulness.loo_correlation(model, union, inputs, targets, batch_size=batch_size)
    drops = loo.transpose("example", "target", "source").values
    taus = []
    for part in slices:
        tau = np.full(drops.shape[:2], np.nan)
        for e, t in np.ndindex(*tau.shape):
            both = ~np.isnan(part.values[e, t]) & ~np.isnan(drops[e, t])
            tau[e, t] = _faithfulness.kendall_tau(part.values[e, t][both], drops[e, t][both])
        taus.append(xr.DataArray(tau, dims=("example", "target"), coords={"target": part.target}))
    return taus


def _one_batch(reduced: list[xr.DataArray]) -> xr.DataArray:
    """The methods' attributions as one batch: method m's example e is example ``m * N + e``."""
    n = reduced[0].sizes["example"]
    # coordinates one method has and another lacks (IG's completeness_gap) cannot be joined
    shared = set.intersection(*(set(map(str, da.coords)) for da in reduced))
    parts = [
        da.drop_vars([c for c in map(str, da.coords) if c not in shared])
        .assign_coords(example=np.arange(n) + m * n)
        .rename("attribution")
        for m, da in enumerate(reduced)
    ]
    return concat_examples(parts)


def _rationale_tokens(model: Model, flat: xr.DataArray, records: list[Record]) -> np.ndarray:
    """``[N, S]``: 1 for a source token inside a rationale word, 0 for other tokens of the
    input, NaN for sources outside the input (the continuation, padding, special tokens)."""
    n, width = len(records), flat.sizes["source"]
    truth = np.full((n, width), np.nan)
    for e, record in enumerate(records):
        if record.rationale is None:
            raise InputError(f"{record.where} has no rationale: plausibility metrics need one")
        spans, start = [], 0
        for word in record.input.split():
            start = record.input.index(word, start)
            spans.append((start, start + len(word)))
            start += len(word)
        encoding = model.tokenizer(
            record.input, add_special_tokens=False, return_offsets_mapping=True
        )
        ids = flat["source_id"].values[e]
        plain = encoding["input_ids"]
        first = _find(list(ids), plain)
        for k, (lo, hi) in enumerate(encoding["offset_mapping"]):
            inside = [w for w, (a, b) in enumerate(spans) if lo < b and hi > a]
            truth[e, first + k] = float(any(record.rationale[w] for w in inside))
    return truth


def _find(ids: list[int], plain: list[int]) -> int:
    for start in range(len(ids) - len(plain) + 1):
        if ids[start : start + len(plain)] == plain:
            return start
    raise InputError("a record's input tokens were not found among its attributed sources")


def _plausibility(metric: str, relevance: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``[R, T]`` per (row, target): top-k tokens (k = the rationale's size) against the
    rationale (token F1, IOU), or the average precision of the ranking (AUPRC). Tied scores
    share: the hits among the top k are their expected number when ties are ordered at random
    (IOU is computed from that number), and AUPRC steps once per distinct score (scikit-learn's
    average precision); position order gave a constant attribution 1.0 when the rationale came
    first.
    """
    out = np.full(relevance.shape[:2], np.nan)
    for r, t in np.ndindex(*out.shape):
        scored = ~np.isnan(relevance[r, t]) & ~np.isnan(truth[r])
        if not scored.any() or truth[r][scored].sum() == 0:
            continue
        values, labels = relevance[r, t][scored], truth[r][scored].astype(bool)
        if metric == "auprc":
            out[r, t] = _average_precision(values, labels)
            continue
        k = int(labels.sum())
        both = float(_inclusion(values, k)[labels].sum())  # expected hits in the top k
        out[r, t] = both / (2 * k - both) if metric == "iou" else both / k
    return out


def _inclusion(values: np.ndarray, k: int) -> np.ndarray:
    """Each value's chance of a place among the ``k`` largest when ties are ordered at random:
    1 above the k-th largest, the free places over the tied count at it, 0 below."""
    if k >= len(values):
        return np.ones(len(values))
    kth = np.sort(values)[::-1][k - 1]
    above, tied = values > kth, values == kth
    return np.where(above, 1.0, np.where(tied, (k - above.sum()) / tied.sum(), 0.0))


def _average_precision(values: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of ranking ``labels`` by ``values``: precision at each distinct score,
    weighted by the recall it adds (scikit-learn's ``average_precision_score``)."""
    order = np.argsort(-values, kind="stable")
    ranked, hits = values[order], labels[order].astype(float)
    last = np.r_[ranked[1:] != ranked[:-1], True]  # the end of each run of one score
    found = np.cumsum(hits)[last]
    precision = found / (np.flatnonzero(last) + 1)
    recall_added = np.diff(np.r_[0.0, found]) / hits.sum()
    return float((precision * recall_added).sum())


def _agreement(metric: str, relevance: np.ndarray, methods: int, top_k: int) -> np.ndarray:
    """``[M, M(other), N, T]``: rank agreement of two methods over the sources both score."""
    rows = relevance.reshape(methods, -1, *relevance.shape[1:])  # [M, N, T, S]
    out = np.full((methods, methods, *rows.shape[1:3]), np.nan)
    for a, b, e, t in np.ndindex(*out.shape):
        x, y = rows[a, e, t], rows[b, e, t]
        both = ~np.isnan(x) & ~np.isnan(y)
        if both.sum() < 2:
            continue
        x, y = x[both], y[both]
        if metric == "topk_overlap":
            if len(x) <= top_k:  # every source is in both tops: no agreement to measure
                continue
            # the tokens tied at the k-th place are all in the top (not the first by position),
            # over the larger top: identical rankings share all, tied or not
            top_x, top_y = _inclusion(x, top_k) > 0, _inclusion(y, top_k) > 0
            shared = float((top_x & top_y).sum())
            out[a, b, e, t] = shared / max(int(top_x.sum()), int(top_y.sum()))
        elif metric == "spearman":
            out[a, b, e, t] = _pearson(_ranks(x), _ranks(y))
        else:
            out[a, b, e, t] = _faithfulness.kendall_tau(x, y)
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    scale = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / scale) if scale > 0 else np.nan


def summary(
    ds: xr.Dataset, *, confidence: float = 0.95, resamples: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """A method-by-metric table: the mean over examples (each example's targets averaged first)
    and a bootstrap confidence interval over examples. Agreement averages over the other methods.

    Arguments:
        ds: what :func:`evaluate` returns.
        confidence: the interval's level, in (0, 1).
        resamples: bootstrap resamples of the examples (at least ``2 / (1 - confidence)``).
        seed: numpy's seed for the resamples.

    Returns:
        A pandas DataFrame, one row per method (index ``method``), its columns a
        ``(metric, stat)`` MultiIndex: for each metric ``ds`` holds, ``mean``, ``low`` and
        ``high`` (the interval's ends). NaN where no example defines a metric.
        :func:`attrax.plot` draws it.

    >>> import attrax as ax
    >>> data = [{"input": "3 1 4 0 5 9 =", "target": " 9 5 0 4 1 3"}] * 2
    >>> ds = ax.evaluate(ax.load_model(), data, {"saliency": ax.saliency, "occlusion": ax.occlusion})
    >>> ax.summary(ds).columns.tolist()[:3]
    [('comprehensiveness', 'mean'), ('comprehensiveness', 'low'), ('comprehensiveness', 'high')]
    """
    if not isinstance(ds, xr.Dataset) or "method" not in ds.dims:
        raise InputError("`ds` must be the Dataset ax.evaluate returns (with a `method` dim)")
    if not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise OptionError(f"`confidence` must be a number in (0, 1), got {confidence!r}")
    check.positive_int(resamples, "resamples")
    # fewer resamples than this puts an interval's ends at the smallest and largest resample
    fewest = int(np.ceil(2 / (1 - confidence)))
    if resamples < fewest:
        raise OptionError(
            f"`resamples` must be at least {fewest} for a {confidence:.0%} interval, got "
            f"{resamples!r}: with fewer its ends are the extreme resamples"
        )
    check.numpy_seed(seed, "seed")
    rng = np.random.default_rng(seed)
    metrics = [m for m in METRICS if m in ds.data_vars]
    n = ds.sizes["example"] if "example" in ds.dims else 0
    if n == 0:
        raise InputError("`ds` has no examples: there is nothing to summarize")
    needed = resamples * n * (8 + 8 * ds.sizes["method"])  # the draws, and a metric's means
    if needed > 2 * memory_budget(torch.device("cpu")):
        raise ResourceError(
            f"`resamples`={resamples} over {n} examples needs {format_bytes(needed, up=True)} "
            "for its draws: more than this machine has free; give fewer resamples"
        )
    draws = rng.integers(0, n, size=(resamples, n))
    table: dict[tuple[str, str], list[float]] = {}
    for metric in metrics:
        values = ds[metric]
        if "other" in values.dims:  # a method against the others, not itself
            values = values.where(values["other"] != values["method"]).mean("other", skipna=True)
        per_example = values.mean("target", skipna=True).transpose("method", "example").values
        tail = (1 - confidence) / 2 * 100
        # a metric no example defines (no rationale word marked anywhere) is NaN, not warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            means = np.nanmean(per_example, axis=1)
            boot = np.nanmean(per_example[:, draws], axis=2)  # [M, resamples]
            table[metric, "mean"] = means.tolist()
            table[metric, "low"] = np.nanpercentile(boot, tail, axis=1).tolist()
            table[metric, "high"] = np.nanpercentile(boot, 100 - tail, axis=1).tolist()
    frame = pd.DataFrame(table, index=pd.Index(ds["method"].values.tolist(), name="method"))
    frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=("metric", "stat"))
    return frame


def sanity_checks(
    model: ModelLike,
    data: Any,
    method: Callable[..., xr.DataArray] | str,
    *,
    reduce: str = "auto",
    seed: int = 0,
    fields: Mapping[str, str] | None = None,
) -> xr.Dataset:
    """Sanity checks of an attribution method (Adebayo et al. 2018).

    - Cascading model-parameter randomization: the model's layers are re-initialised (with the
      model's own initialiser, seeded) from the top layer down, one more at each step, and the
      method re-run on every randomized model; ``spearman`` (and ``spearman_abs``, on magnitudes)
      is the rank correlation of each randomized attribution with the original, per example and
      target. A method that explains the model falls towards 0 as layers are randomized.
    - Random logit: the attribution of another, randomly chosen output for each target (another
      class; for a language model another vocabulary token) against the original, as
      ``random_logit``. A method that explains the chosen output should not stay the same. A
      method that takes no ``objective`` (ALTI, attention, value zeroing, DLA: they read the
      forward, not an output) gets NaN there, as does a regression head (one output).

    Each randomized model is a full copy of the model: memory grows with its size. Targets must be
    given for language models (``target`` on every record), so every model explains the same
    tokens; a sequence classifier is explained for its original prediction.

    Arguments:
        model, data, fields: as :func:`evaluate` (a record's ``contrast`` is refused).
        method: the attribution function to check, or its name ("saliency").
        reduce: how its attributions become ``(example, target, source)``, as in
            :func:`evaluate`.
        seed: torch's seed for the re-initialised weights, numpy's for the random outputs.

    Returns:
        Dataset with ``spearman``/``spearman_abs`` along ``(randomized, example, target)``
        (``randomized``: the lowest layer randomized so far, top layer first) and
        ``random_logit`` along ``(example, target)``.

    >>> import attrax as ax
    >>> data = [{"input": "3 1 4 0 5 9 =", "target": " 9 5 0 4 1 3"}]
    >>> ds = ax.sanity_checks(ax.load_model(), data, ax.saliency)
    >>> ds.spearman.dims
    ('randomized', 'example', 'target')
    """
    import copy

    import torch

    if isinstance(method, str):  # a name, as evaluate's methods may be
        method = resolve_method(method)
    if not callable(method):
        raise OptionError(f"`method` must be an attribution function, got {method!r}")
    not_attribution(method, "`method`")
    steps = parse_reduce(reduce)
    check.numpy_seed(seed, "seed")  # torch's for the re-initialised weights, numpy's draws
    renamed = _fields(fields)
    model = load_model(model)  # a Model passes through as is
    records = read_records(data, **renamed)
    _checked(model, records)
    inputs = [r.item for r in records]
    targets: Any = None if records[0].target is None else [r.target for r in records]
    if records[0].contrast is not None:  # its checks explain one output, not a difference
        raise InputError(
            f"{records[0].where} gives a 'contrast': sanity checks explain the target alone; "
            "leave the field out"
        )
    if targets is None and model.task == "generation":
        raise InputError(
            "`data`: sanity checks of a language model need a `target` on every record"
        )
    named = f"`method` {getattr(method, '__name__', method)!r}"

    def attribute(on: Model, objective: Any = None) -> np.ndarray:
        kwargs = {} if objective is None else {"objective": objective}
        got = method(on, inputs, targets, **kwargs)
        return _reduced(got, steps, method=named, reduce=reduce, examples=len(inputs)).values

    original_da = method(model, inputs, targets)
    # checked before the randomized copies are made and attributed
    checked = _reduced(original_da, steps, method=named, reduce=reduce, examples=len(inputs))
    original = checked.values
    if targets is None and model.task != "generation":
        # a randomized model would predict other classes (tokens, spans): its attribution is
        # compared with the original's for the same ones
        targets = _pinned_targets(model, original_da)
    answers = model.task == "question-answering"  # whose outputs are the input's positions
    outputs = 2**31 if answers else model.output_width
    # a regression head has no other output to explain: its random logit is NaN
    offset = int(np.random.default_rng(seed).integers(1, outputs)) if outputs > 1 else 0
    head = model.head_type  # a multi-label head's labels are sigmoids, a regression's values

    def random_logit(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # a fixed relabelling of every target to another output: vectorized, batch-independent
        if answers:  # another of the example's own positions (its padding has no probability)
            real = (logits > torch.finfo(logits.dtype).min / 2).sum(-1).clamp(min=2)
            other = (ids + 1 + offset % (real - 1)) % real
        else:
            other = (ids + offset) % logits.shape[-1]
        picked = logits.gather(-1, other[..., None])[..., 0]
        if head == "regression":
            return picked
        if head == "multi-label":
            return torch.sigmoid(picked)
        return torch.softmax(logits, -1).gather(-1, other[..., None])[..., 0]

    # before the randomized copies: a method that explains no chosen output (ALTI, attention,
    # value zeroing, DLA) takes no objective and gets NaN; one that refuses it fails early
    shuffled = np.full(original.shape, np.nan)
    parameters = inspect.signature(method).parameters.values()
    takes = any(p.name == "objective" or p.kind is p.VAR_KEYWORD for p in parameters)
    if takes and outputs > 1:
        try:
            shuffled = attribute(model, random_logit)
        except OptionError as err:
            raise OptionError(
                f"sanity_checks' random-logit check explains another output with "
                f"`objective=`: {err}"
            ) from None
    blocks = _layers(model)
    names, randomized = [], []
    for depth in range(len(blocks)):  # each randomized model is its own computation
        with model.call_lock:  # not mid-call on another thread, with attrax's patches in it
            hf = copy.deepcopy(model.hf)
        modules = dict(hf.named_modules())
        # manual_seed seeds every CUDA device too: each one's state is restored with the CPU's
        cuda = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            for name in blocks[: depth + 1]:
                modules[name].apply(hf._init_weights)
        shaken = Model(
            hf, model.tokenizer, name=model.name, attn_implementation=model.attn_implementation
        )
        randomized.append(attribute(shaken))
        names.append(blocks[depth])
    spearman = np.stack([_rank_agreement(original, r, False) for r in randomized])
    magnitude = np.stack([_rank_agreement(original, r, True) for r in randomized])
    return label_sanity(
        original_da, names, spearman, magnitude, _rank_agreement(original, shuffled, False)
    )


def _layers(model: Model) -> list[str]:
    """Names of the model's transformer blocks, top first (a decoder's before its encoder's)."""
    import torch

    lists = [
        (name, module)
        for name, module in model.hf.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0
    ]
    # lists inside a block (T5's sub-layers) are that block's parts, randomized with it
    lists = [(n, m) for n, m in lists if not any(n.startswith(f"{o}.") for o, _ in lists)]
    if not lists:
        raise InputError(f"{type(model.hf).__name__}: no stack of layers found to randomize")
    lists.sort(key=lambda item: "encoder" in item[0])  # decoder (or only) stack first
    return [f"{name}.{i}" for name, module in lists for i in reversed(range(len(module)))]


def _rank_agreement(a: np.ndarray, b: np.ndarray, magnitude: bool) -> np.ndarray:
    """Spearman correlation ``[N, T]`` of two ``[N, T, S]`` attributions over shared sources."""
    out = np.full(a.shape[:2], np.nan)
    for e, t in np.ndindex(*out.shape):
        x, y = a[e, t], b[e, t]
        both = ~np.isnan(x) & ~np.isnan(y)
        if both.sum() >= 2:
            x, y = (np.abs(x[both]), np.abs(y[both])) if magnitude else (x[both], y[both])
            out[e, t] = _pearson(_ranks(x), _ranks(y))
    return out


@_distributed.reporting
def _evaluate_task(
    where: Any, records: list[Any], methods: Mapping[str, Any], options: Mapping[str, Any]
) -> xr.Dataset:
    """On a worker: :func:`score_records` of a shard's records with the worker's model."""
    return score_records(_distributed.worker_model(where), records, methods, **options)
