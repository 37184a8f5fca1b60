"""Faithfulness of an attribution: does removing what it ranks first hurt the prediction most?

Every metric perturbs the source tokens in the order an attribution ranks them *for each target*
and re-scores the targets, teacher-forced, with the objective the attribution explained:

- :func:`deletion` / :func:`insertion` (Petsiuk et al. 2018, RISE): the objective as the top
  fraction of source tokens is removed (inserted into an all-baseline input), and the area under
  that curve. Deletion: lower is better; insertion: higher is better.
- :func:`comprehensiveness` / :func:`sufficiency` (DeYoung et al. 2020, ERASER): the drop in the
  objective when the top k% tokens are removed (comprehensiveness, higher is better) or when only
  they are kept (sufficiency, lower is better); the mean over k is ERASER's AOPC.

A removed token's embedding is replaced by a baseline (the pad token's embedding by default). Only
sources the target can see (before it, on its side) and that the attribution scores are ranked and
removed. Each target needs its own perturbed copies, so all ``targets x fractions`` copies of the
batch go through the model together (``batch_size`` copies per forward) and each target's score
is read from the copy made for it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr

from ._engine import Problem, baselines, check_baseline, check_positive_int
from ._errors import InputError, OptionError
from ._inputs import Batch, Texts, prepare
from ._label import MISSING_ID
from ._model import Model, ModelLike, load_model
from ._objectives import OBJECTIVES, Objective, resolve

__all__ = ["ERASER_FRACTIONS", "comprehensiveness", "deletion", "insertion", "sufficiency"]

#: The k of ERASER's AOPC: 1, 5, 10, 20 and 50 % of the source tokens.
ERASER_FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.5)

Baseline = str | torch.Tensor | tuple[torch.Tensor, ...]


def deletion(
    model: ModelLike,
    attribution: xr.DataArray,
    inputs: Texts,
    targets: Texts | None = None,
    *,
    steps: int = 10,
    baseline: Baseline = "pad",
    objective: str | Objective | None = None,
    contrast: Texts | None = None,
    batch_size: int | None = None,
    max_new_tokens: int = 20,
) -> xr.DataArray:
    """Deletion curve and its area: each target's objective as its top sources are removed.

    At fraction ``f`` (``0, 1/steps, ..., 1``) the ``ceil(f * m)`` sources ranked highest for the
    target (out of the ``m`` it can see) are replaced by ``baseline``. A faithful attribution
    makes the curve fall fast: **lower AUC is better**.

    Arguments:
        model: the model the attribution explains (a :class:`Model` or a path).
        attribution: a ``([example,] target, source)`` array from the same ``inputs``/``targets``
            (reduce ``hidden`` first, e.g. ``ax.l2_norm``); higher values rank first.
        inputs, targets: as given to the attribution method (``targets=None`` regenerates).
        steps: number of fraction steps after 0.
        baseline: ``"pad"`` (default), ``"unk"``, ``"zeros"`` or a tensor broadcastable to the
            embeddings ``[B, L, H]``.
        objective: what is scored; default: the attribution's ``objective`` attr when it is one of
            ``"probability"``, ``"logprob"``, ``"logit"``, else ``"probability"``.
        contrast: the contrast texts of a contrastive attribution.
        batch_size: perturbed copies of the batch per forward (all at once when None).

    Returns:
        DataArray ``([example,] target, fraction)`` of objective values, with coordinates
        ``auc`` (trapezoidal area over ``fraction``) and ``original`` (unperturbed objective)
        along ``([example,] target)``, and the attribution's target coordinates.

    >>> import attrax as ax
    >>> model = ax.load_model()
    >>> P, T = "3 1 4 0 5 9 =", " 9 5 0 4 1 3"
    >>> da = ax.pipe(ax.saliency, ax.l2_norm)(model, P, T)
    >>> curve = deletion(model, da, P, T, steps=4)
    >>> curve.dims, curve.auc.dims
    (('target', 'fraction'), ('target',))
    """
    return _curve(
        "deletion",
        model,
        attribution,
        inputs,
        targets,
        _steps(steps),
        baseline,
        objective,
        contrast,
        batch_size,
        max_new_tokens,
    )


def insertion(
    model: ModelLike,
    attribution: xr.DataArray,
    inputs: Texts,
    targets: Texts | None = None,
    *,
    steps: int = 10,
    baseline: Baseline = "pad",
    objective: str | Objective | None = None,
    contrast: Texts | None = None,
    batch_size: int | None = None,
    max_new_tokens: int = 20,
) -> xr.DataArray:
    """Insertion curve and its area: each target's objective as its top sources are restored.

    Starts from every visible source replaced by ``baseline``; at fraction ``f`` the
    ``ceil(f * m)`` highest-ranked sources are put back. **Higher AUC is better**. Arguments and
    result as :func:`deletion`.

    >>> import attrax as ax
    >>> model = ax.load_model()
    >>> P, T = "3 1 4 0 5 9 =", " 9 5 0 4 1 3"
    >>> da = ax.pipe(ax.saliency, ax.l2_norm)(model, P, T)
    >>> insertion(model, da, P, T, steps=4).sizes["fraction"]
    5
    """
    return _curve(
        "insertion",
        model,
        attribution,
        inputs,
        targets,
        _steps(steps),
        baseline,
        objective,
        contrast,
        batch_size,
        max_new_tokens,
    )


def comprehensiveness(
    model: ModelLike,
    attribution: xr.DataArray,
    inputs: Texts,
    targets: Texts | None = None,
    *,
    fractions: Sequence[float] = ERASER_FRACTIONS,
    baseline: Baseline = "pad",
    objective: str | Objective | None = None,
    contrast: Texts | None = None,
    batch_size: int | None = None,
    max_new_tokens: int = 20,
) -> xr.DataArray:
    """ERASER comprehensiveness: ``f(x) - f(x without its top k% sources)``, per target and k.

    ``k`` runs over ``fractions`` (ERASER's 1/5/10/20/50 % by default; ``ceil(k * m)`` tokens of
    the ``m`` the target can see, so at least one). **Higher is better**.

    Returns:
        DataArray ``([example,] target, fraction)`` with coordinates ``aopc`` (the mean over
        ``fraction``, ERASER's aggregate) and ``original`` along ``([example,] target)``.
        Other arguments as :func:`deletion`.

    >>> import attrax as ax
    >>> model = ax.load_model()
    >>> P, T = "3 1 4 0 5 9 =", " 9 5 0 4 1 3"
    >>> da = ax.pipe(ax.saliency, ax.l2_norm)(model, P, T)
    >>> comprehensiveness(model, da, P, T).aopc.dims
    ('target',)
    """
    return _curve(
        "comprehensiveness",
        model,
        attribution,
        inputs,
        targets,
        _fractions(fractions),
        baseline,
        objective,
        contrast,
        batch_size,
        max_new_tokens,
    )


def sufficiency(
    model: ModelLike,
    attribution: xr.DataArray,
    inputs: Texts,
    targets: Texts | None = None,
    *,
    fractions: Sequence[float] = ERASER_FRACTIONS,
    baseline: Baseline = "pad",
    objective: str | Objective | None = None,
    contrast: Texts | None = None,
    batch_size: int | None = None,
    max_new_tokens: int = 20,
) -> xr.DataArray:
    """ERASER sufficiency: ``f(x) - f(only the top k% sources of x)``, per target and k.

    The other visible sources are replaced by ``baseline``. **Lower is better**. Arguments and
    result as :func:`comprehensiveness`.

    >>> import attrax as ax
    >>> model = ax.load_model()
    >>> P, T = "3 1 4 0 5 9 =", " 9 5 0 4 1 3"
    >>> da = ax.pipe(ax.saliency, ax.l2_norm)(model, P, T)
    >>> sufficiency(model, da, P, T, fractions=[0.5]).sizes["fraction"]
    1
    """
    return _curve(
        "sufficiency",
        model,
        attribution,
        inputs,
        targets,
        _fractions(fractions),
        baseline,
        objective,
        contrast,
        batch_size,
        max_new_tokens,
    )


# --- the shared computation -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Ranked:
    """A problem whose targets are those of the attribution, and each target's source ranking.

    ``rank[b, k, l]`` is column l's place in target k's order (0 = most important) for the
    ``count[b, k]`` ranked columns, and ``L`` (never selected) for the others.
    """

    problem: Problem
    rank: torch.Tensor
    count: torch.Tensor
    rows: list[list[int]]  # rows[b][k]: the attribution's target row of problem target k
    template: xr.DataArray  # the attribution with an example dim
    single: bool  # the attribution had no example dim


def _curve(
    metric: str,
    model: ModelLike,
    attribution: xr.DataArray,
    inputs: Texts,
    targets: Texts | None,
    fractions: np.ndarray,
    baseline: Baseline,
    objective: str | Objective | None,
    contrast: Texts | None,
    batch_size: int | None,
    max_new_tokens: int,
) -> xr.DataArray:
    _check_attribution(attribution)
    check_positive_int(batch_size, "batch_size", allow_none=True)
    check_baseline(baseline)
    if objective is None:
        known = attribution.attrs.get("objective")
        objective = known if known in OBJECTIVES else "probability"
    objective_name, objective_fn = resolve(objective)
    ranked = _rank(model, attribution, inputs, targets, objective_fn, contrast, max_new_tokens)
    problem = ranked.problem
    counts = torch.as_tensor(
        np.ceil(np.round(np.multiply.outer(ranked.count.numpy(), fractions), 9))
    )
    selected = ranked.rank[:, :, None, :] < counts[..., None].to(ranked.rank)  # [B, K, F, L]
    remove = metric in ("deletion", "comprehensiveness")
    ranked_columns = ranked.rank < ranked.rank.shape[-1]
    # deletion removes the selected sources; insertion keeps them and removes the other ranked ones
    keep = ~selected if remove else selected | ~ranked_columns[:, :, None, :]
    base = baselines(problem, baseline)
    values = _scores(problem, keep, base, batch_size)  # [B, K, F]
    original = problem.evaluate(tuple(x[None] for x in problem.inputs))[0]  # [B, K]
    if metric in ("comprehensiveness", "sufficiency"):
        values = original[..., None] - values

    data = _to_numpy(values)
    curve, summary = _label_curve(ranked, data, _to_numpy(original), fractions, metric)
    settings = {
        "baseline": baseline if isinstance(baseline, str) else "tensor",
        "batch_size": batch_size,
        "contrast": contrast is not None,
    }
    curve.attrs = {
        "metric": metric,
        "method": attribution.attrs.get("method", ""),
        "model": problem.model.name,
        "objective": objective_name,
        "options": json.dumps(settings, sort_keys=True),
        "reductions": attribution.attrs.get("reductions", ""),
        "attrax_version": _version(),
    }
    return curve.assign_coords(summary)


def _rank(
    model: ModelLike,
    da: xr.DataArray,
    inputs: Texts,
    targets: Texts | None,
    objective: Objective,
    contrast: Texts | None,
    max_new_tokens: int,
) -> _Ranked:
    model = model if isinstance(model, Model) else load_model(model)
    single = "example" not in da.dims
    template = da.expand_dims("example") if single else da
    template = template.transpose("example", "target", "source")
    attribute_target = isinstance(da.indexes.get("source"), pd.MultiIndex)
    batch = prepare(model, inputs, targets, contrast=contrast, max_new_tokens=max_new_tokens)
    if batch.single != single or len(batch.examples) != template.sizes["example"]:
        raise InputError(
            f"`attribution` has {template.sizes['example']} example(s) "
            f"({'no example dim' if single else 'an example dim'}) but `inputs` "
            f"{'is one text' if batch.single else f'has {len(batch.examples)}'}: pass the inputs "
            "the attribution was computed from"
        )
    batch, rows = _restrict(batch, template)
    problem = Problem.build(model, batch, objective, attribute_target)
    widths = [x.shape[1] for x in problem.inputs]
    if sum(widths) != template.sizes["source"]:
        raise InputError(
            f"`attribution` has {template.sizes['source']} source positions but `inputs`/"
            f"`targets` give {sum(widths)}: pass the texts the attribution was computed from"
        )
    _check_tokens(template, problem, rows)

    values = template.values  # [E, T, S]
    scores = np.full((len(rows), problem.tensors.valid.shape[1], sum(widths)), np.nan)
    for b, example_rows in enumerate(rows):
        scores[b, : len(example_rows)] = values[b, example_rows]
    rankable = torch.as_tensor(~np.isnan(scores)) & problem.visible().cpu()
    # stable sort: ties go to the earlier source, so rankings are reproducible
    keyed = torch.where(rankable, -torch.as_tensor(scores), torch.inf)
    order = torch.sort(keyed, dim=-1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order).contiguous())
    rank = torch.where(rankable, rank, order.shape[-1])
    return _Ranked(problem, rank, rankable.sum(-1), rows, template, single)


def _restrict(batch: Batch, template: xr.DataArray) -> tuple[Batch, list[list[int]]]:
    """Keep, per example, the target positions the attribution covers; their rows in it."""
    positions = template["target"].values.tolist()
    if "target_id" in template.coords:
        present = _values(template, "target_id", ("example", "target")) != MISSING_ID
    else:
        present = template.notnull().any("source").values
    examples, rows = [], []
    for b, example in enumerate(batch.examples):
        wanted = [p for p, here in zip(positions, present[b], strict=True) if here]
        missing = sorted(set(wanted) - set(example.positions))
        if missing:
            where = "" if batch.single else f" of example {b}"
            raise InputError(
                f"`attribution` has target position(s) {missing}{where}, which the given "
                f"`inputs`/`targets` do not have (target positions {list(example.positions)}): "
                "pass the texts the attribution was computed from"
            )
        if not wanted:
            raise InputError(f"`attribution` has no target for example {b}")
        examples.append(dataclasses.replace(example, positions=tuple(wanted)))
        rows.append([positions.index(p) for p in wanted])
    return dataclasses.replace(batch, examples=tuple(examples)), rows


def _check_tokens(template: xr.DataArray, problem: Problem, rows: list[list[int]]) -> None:
    """The attribution's token ids must be those of the texts: catch a mismatched pair early."""
    t = problem.tensors
    if "target_id" in template.coords:
        given = _values(template, "target_id", ("example", "target"))
        for b, example_rows in enumerate(rows):
            expected = t.target_ids[b, : len(example_rows)].tolist()
            if given[b, example_rows].tolist() != expected:
                raise InputError(
                    f"`attribution`'s target tokens (example {b}) differ from those of "
                    "`inputs`/`targets`: pass the texts the attribution was computed from"
                )
    if "source_id" in template.coords:
        given = _values(template, "source_id", ("example", "source"))
        blocks = [t.ids, t.decoder_ids] if len(problem.inputs) == 2 else [t.ids]
        masks = [t.mask, t.decoder_mask] if len(problem.inputs) == 2 else [t.mask]
        ids = torch.cat(
            [torch.where(m.bool(), i, MISSING_ID) for i, m in zip(blocks, masks, strict=True)], 1
        )
        if not np.array_equal(given, ids.cpu().numpy()):
            raise InputError(
                "`attribution`'s source tokens differ from those of `inputs`/`targets`: pass the "
                "texts the attribution was computed from"
            )


def _values(template: xr.DataArray, name: str, dims: tuple[str, ...]) -> np.ndarray:
    """Coordinate ``name`` as an array over ``dims``; a single example's has no example dim."""
    coord = template[name]
    if "example" not in coord.dims:
        coord = coord.expand_dims(example=template.sizes["example"])
    return coord.transpose(*dims).values


def _scores(
    problem: Problem,
    keep: torch.Tensor,
    baselines: tuple[torch.Tensor, ...],
    batch_size: int | None,
) -> torch.Tensor:
    """``[B, K, F]``: target k's objective in the copy of the batch that keeps ``keep[:, k, f]``.

    Copy ``(f, k)`` is perturbed for target ``k``; every copy scores all targets in one forward,
    and only the diagonal is read.
    """
    batch, n_targets, n_fractions, width = keep.shape
    device = problem.inputs[0].device
    copies = keep.permute(2, 1, 0, 3).reshape(-1, batch, width).to(device)  # [(F K), B, L]
    values = problem.masked_scores(copies, baselines, batch_size)
    values = values.unflatten(0, (n_fractions, n_targets))  # [F, K, B, K]
    diagonal = torch.diagonal(values, dim1=1, dim2=3)  # [F, B, K]
    return diagonal.permute(1, 2, 0)


def _label_curve(
    ranked: _Ranked,
    values: np.ndarray,
    original: np.ndarray,
    fractions: np.ndarray,
    metric: str,
) -> tuple[xr.DataArray, dict[str, Any]]:
    template = ranked.template
    n_examples, n_rows = template.sizes["example"], template.sizes["target"]
    data = np.full((n_examples, n_rows, len(fractions)), np.nan)
    base = np.full((n_examples, n_rows), np.nan)
    for b, rows in enumerate(ranked.rows):
        data[b, rows] = values[b, : len(rows)]
        base[b, rows] = original[b, : len(rows)]
    keep = {"example", "target"}
    coords = {k: v for k, v in template.coords.items() if set(v.dims) <= keep}
    coords["fraction"] = ("fraction", fractions)
    curve = xr.DataArray(data, dims=("example", "target", "fraction"), coords=coords, name=metric)
    if metric in ("deletion", "insertion"):
        area = (data[..., 1:] + data[..., :-1]) / 2 * np.diff(fractions)
        summary_name, summary = "auc", area.sum(-1)
    else:
        summary_name, summary = "aopc", data.mean(-1)
    dims = ("example", "target")
    extra = {summary_name: (dims, summary), "original": (dims, base)}
    if ranked.single:
        curve = curve.isel(example=0, drop=True)
        extra = {k: (("target",), v[1][0]) for k, v in extra.items()}
    return curve, extra


# --- options --------------------------------------------------------------------------------


def _check_attribution(da: object) -> None:
    if not isinstance(da, xr.DataArray):
        raise InputError(f"`attribution` must be an xarray DataArray, got {type(da).__name__}")
    dims = tuple(str(d) for d in da.dims)
    extra = [d for d in dims if d not in ("example", "target", "source")]
    if extra or "target" not in dims or "source" not in dims:
        hint = ""
        if "hidden" in extra:
            hint = "; reduce 'hidden' first, e.g. ax.l2_norm(da)"
        elif extra:
            hint = f"; reduce {tuple(extra)} first, e.g. ax.mean(da, {extra[0]!r})"
        raise InputError(
            f"`attribution` must have dims ([example,] target, source) to rank sources, got "
            f"{dims}{hint}"
        )


def _steps(steps: int) -> np.ndarray:
    check_positive_int(steps, "steps")
    return np.arange(steps + 1) / steps


def _fractions(fractions: Sequence[float]) -> np.ndarray:
    try:
        values = np.asarray([float(f) for f in fractions], dtype=np.float64)
    except (TypeError, ValueError):
        raise OptionError(
            f"`fractions` must be a list of numbers in (0, 1], got {fractions!r}"
        ) from None
    if values.size == 0 or not ((values > 0) & (values <= 1)).all():
        raise OptionError(
            f"`fractions` must be a non-empty list of numbers in (0, 1], got {fractions!r}"
        )
    if len(set(values.tolist())) != values.size:
        raise OptionError(f"`fractions` has repeated values: {fractions!r}")
    return values


def _to_numpy(values: torch.Tensor) -> np.ndarray:
    return values.detach().to("cpu", torch.float64).numpy()


def _version() -> str:
    from . import __version__

    return __version__
