"""Faithfulness of an attribution: does removing what it ranks first hurt the prediction most?

Every metric perturbs the source tokens in the order an attribution ranks them *for each target*
and re-scores the targets, teacher-forced, with the objective the attribution explained:

- :func:`deletion` / :func:`insertion` (Petsiuk et al. 2018, RISE): the objective as the top
  fraction of source tokens is removed (inserted into an all-baseline input), and the area under
  that curve. Deletion: lower is better; insertion: higher is better.
- :func:`comprehensiveness` / :func:`sufficiency` (DeYoung et al. 2020, ERASER): the drop in the
  objective when the top k% tokens are removed (comprehensiveness, higher is better) or when only
  they are kept (sufficiency, lower is better); the mean over k is ERASER's AOPC.
- :func:`loo_correlation` (ferret's ``taucorr_loo``): Kendall's tau between the attribution and
  each source's leave-one-out drop in the objective. Higher is better.

A removed token's embedding is replaced by a baseline (the pad token's embedding by default). Only
sources the target can see (before it, on its side) and that the attribution scores are ranked and
removed. Each target needs its own perturbed copies, so all ``targets x fractions`` copies of the
batch go through the model together (``batch_size`` copies per forward) and each target's score
is read from the copy made for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr

from . import _validate as check
from ._engine import Baseline, Problem, baseline_embeddings
from ._errors import InputError, OptionError
from ._inputs import Batch
from ._memory import Size, parse_bytes
from ._objectives import OBJECTIVES, resolve
from ._protocol import COMMON, Call, Family, Param, own_options
from ._schema import has_targets, label_curve, label_loo, per_example, recorded_option, run_attrs

__all__ = [
    "ERASER_FRACTIONS",
    "comprehensiveness",
    "deletion",
    "insertion",
    "loo_correlation",
    "sufficiency",
]

#: The k of ERASER's AOPC: 1, 5, 10, 20 and 50 % of the source tokens.
ERASER_FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.5)


def _run(core: Callable[..., xr.DataArray], call: Call, arguments: dict[str, Any]) -> xr.DataArray:
    return core(call, arguments["attribution"], **own_options(core, arguments))


_FROM_ATTRIBUTION = "the attribution's targets and sources are scored as they are"
#: Faithfulness metrics: ``(model, attribution, inputs, targets)``, forwards only.
FAITHFULNESS = Family(
    name="faithfulness",
    takes=("objective", "contrast", "batch_size", "max_new_tokens", "max_memory"),
    refuses={
        "positions": _FROM_ATTRIBUTION,
        "attribute_target": _FROM_ATTRIBUTION,
        "chunk_size": "faithfulness metrics run forwards only; `batch_size` bounds them",
    },
    run=_run,
    extra={
        "objective": Param(
            None,
            "str | Objective | None",
            lambda value, name: None if value is None else resolve(value),  # type: ignore[arg-type]
            "what is scored; None: the attribution's objective",
        )
    },
    leading=("model", "attribution", "inputs", "targets"),
)


def _curve_fractions(value: object, name: str) -> None:
    _fractions(value, name, start=0.0)  # type: ignore[arg-type]


def _kept_fractions(value: object, name: str) -> None:
    _fractions(value, name, start=None)  # type: ignore[arg-type]


@FAITHFULNESS.method(fractions=_curve_fractions, baseline=check.baseline)
def deletion(
    call: Call,
    attribution: xr.DataArray,
    *,
    fractions: int | Sequence[float] = 10,
    baseline: Baseline = "pad",
) -> xr.DataArray:
    """Deletion curve and its area: each target's objective as its top sources are removed.

    At fraction ``f`` the ``ceil(f * m)`` sources ranked highest for the target (out of the ``m``
    it can see) are replaced by ``baseline``. A faithful attribution makes the curve fall fast:
    **lower AUC is better**.

    Arguments:
        model: the model the attribution explains (a :class:`Model` or a path).
        attribution: a ``([example,] target, source)`` array from the same ``inputs``/``targets``
            (reduce ``hidden`` first, e.g. ``ax.l2_norm``); higher values rank first.
        inputs, targets: as given to the attribution method (``targets=None`` regenerates).
        fractions: an int ``n`` for ``0, 1/n, ..., 1``, or increasing fractions in [0, 1]
            starting at 0.
        baseline: ``"pad"`` (default), ``"unk"``, ``"zeros"``, a classifier's ``"mask"``, a
            tensor broadcastable to the embeddings ``[B, L, H]``, or an int tensor of token ids.
        objective: what is scored; default: the attribution's ``objective`` attr when it is one of
            ``"probability"``, ``"logprob"``, ``"logit"``, else ``"probability"``.
        contrast: the contrast texts of a contrastive attribution.
        batch_size: perturbed copies of the batch per forward (``"auto"``/None: all at once).
        max_new_tokens: as :func:`attrax.saliency`, when ``targets`` is None.

    Returns:
        DataArray ``([example,] target, fraction)`` of objective values, with coordinates
        ``auc`` (trapezoidal area over ``fraction``) and ``original`` (unperturbed objective)
        along ``([example,] target)``, and the attribution's target coordinates.

    >>> import attrax as ax
    >>> model = ax.load_model()
    >>> P, T = "3 1 4 0 5 9 =", " 9 5 0 4 1 3"
    >>> da = ax.pipe(ax.saliency, ax.l2_norm)(model, P, T)
    >>> curve = ax.deletion(model, da, P, T, fractions=4)
    >>> curve.dims, curve.auc.dims
    (('target', 'fraction'), ('target',))
    """
    return _curve("deletion", call, attribution, _fractions(fractions, "fractions", 0.0), baseline)


@FAITHFULNESS.method(fractions=_curve_fractions, baseline=check.baseline)
def insertion(
    call: Call,
    attribution: xr.DataArray,
    *,
    fractions: int | Sequence[float] = 10,
    baseline: Baseline = "pad",
) -> xr.DataArray:
    """Insertion curve and its area: each target's objective as its top sources are restored.

    Starts from every visible source replaced by ``baseline``; at fraction ``f`` the
    ``ceil(f * m)`` highest-ranked sources are put back. **Higher AUC is better**.

    Arguments:
        model, attribution, inputs, targets and the other options: as :func:`deletion`.
        fractions: an int ``n`` for ``0, 1/n, ..., 1``, or increasing fractions in [0, 1]
            starting at 0: the share of the ranked sources put back.
        baseline: what the sources not (yet) put back are replaced by: ``"pad"`` (default),
            ``"unk"``, ``"zeros"``, ``"mask"`` or a tensor (embeddings, or token ids), as
            :func:`deletion`'s.

    Returns:
        DataArray ``([example,] target, fraction)`` of objective values, with coordinates
        ``auc`` (trapezoidal area over ``fraction``) and ``original`` (unperturbed objective)
        along ``([example,] target)``, and the attribution's target coordinates.

    >>> import attrax as ax
    >>> model = ax.load_model()
    >>> P, T = "3 1 4 0 5 9 =", " 9 5 0 4 1 3"
    >>> da = ax.pipe(ax.saliency, ax.l2_norm)(model, P, T)
    >>> ax.insertion(model, da, P, T, fractions=4).sizes["fraction"]
    5
    """
    return _curve("insertion", call, attribution, _fractions(fractions, "fractions", 0.0), baseline)


@FAITHFULNESS.method(fractions=_kept_fractions, baseline=check.baseline)
def comprehensiveness(
    call: Call,
    attribution: xr.DataArray,
    *,
    fractions: int | Sequence[float] = ERASER_FRACTIONS,
    baseline: Baseline = "pad",
) -> xr.DataArray:
    """ERASER comprehensiveness: ``f(x) - f(x without its top k% sources)``, per target and k.

    ``k`` runs over ``fractions`` (ERASER's 1/5/10/20/50 % by default, or an int ``n`` for
    ``1/n, ..., 1``; ``ceil(k * m)`` tokens of the ``m`` the target can see, so at least one).
    **Higher is better**.

    Arguments:
        model, attribution, inputs, targets and the other options: as :func:`deletion`.
        fractions: the shares ``k`` removed: an int ``n`` for ``1/n, ..., 1``, or distinct
            fractions in (0, 1] (default ERASER's ``(0.01, 0.05, 0.1, 0.2, 0.5)``).
        baseline: what the removed sources are replaced by: ``"pad"`` (default), ``"unk"``,
            ``"zeros"``, ``"mask"`` or a tensor (embeddings, or token ids), as :func:`deletion`'s.

    Returns:
        DataArray ``([example,] target, fraction)`` with coordinates ``aopc`` (the mean over
        ``fraction``, ERASER's aggregate) and ``original`` along ``([example,] target)``.

    >>> import attrax as ax
    >>> model = ax.load_model()
    >>> P, T = "3 1 4 0 5 9 =", " 9 5 0 4 1 3"
    >>> da = ax.pipe(ax.saliency, ax.l2_norm)(model, P, T)
    >>> ax.comprehensiveness(model, da, P, T).aopc.dims
    ('target',)
    """
    return _curve(
        "comprehensiveness", call, attribution, _fractions(fractions, "fractions"), baseline
    )


@FAITHFULNESS.method(fractions=_kept_fractions, baseline=check.baseline)
def sufficiency(
    call: Call,
    attribution: xr.DataArray,
    *,
    fractions: int | Sequence[float] = ERASER_FRACTIONS,
    baseline: Baseline = "pad",
) -> xr.DataArray:
    """ERASER sufficiency: ``f(x) - f(only the top k% sources of x)``, per target and k.

    The other visible sources are replaced by ``baseline``. **Lower is better**.

    Arguments:
        model, attribution, inputs, targets and the other options: as :func:`deletion`.
        fractions: the shares ``k`` kept: an int ``n`` for ``1/n, ..., 1``, or distinct
            fractions in (0, 1] (default ERASER's ``(0.01, 0.05, 0.1, 0.2, 0.5)``).
        baseline: what the sources not kept are replaced by: ``"pad"`` (default), ``"unk"``,
            ``"zeros"``, ``"mask"`` or a tensor (embeddings, or token ids), as :func:`deletion`'s.

    Returns:
        DataArray ``([example,] target, fraction)`` of drops ``f(x) - f(kept)``, with
        coordinates ``aopc`` (the mean over ``fraction``) and ``original`` (unperturbed
        objective) along ``([example,] target)``, and the attribution's target coordinates.

    >>> import attrax as ax
    >>> model = ax.load_model()
    >>> P, T = "3 1 4 0 5 9 =", " 9 5 0 4 1 3"
    >>> da = ax.pipe(ax.saliency, ax.l2_norm)(model, P, T)
    >>> ax.sufficiency(model, da, P, T, fractions=[0.5]).sizes["fraction"]
    1
    """
    return _curve("sufficiency", call, attribution, _fractions(fractions, "fractions"), baseline)


@FAITHFULNESS.method(baseline=check.baseline)
def loo_correlation(
    call: Call, attribution: xr.DataArray, *, baseline: Baseline = "pad"
) -> xr.DataArray:
    """Leave-one-out drops and their rank correlation with the attribution (ferret's
    ``taucorr_loo``): ``f(x) - f(x with source s replaced by baseline)`` for every source ``s``
    a target sees, and Kendall's tau-b between those drops and the attribution over the sources
    it scores. **Higher tau is better**.

    Each source's copy of the batch scores every target, so one copy per source position goes
    through the model (``batch_size`` copies per forward). ferret deletes the token and drops
    ``[CLS]``/``[SEP]`` from the ranking; here a token is replaced by ``baseline`` (the
    positions stay) and every source the attribution scores is ranked, as in the other
    faithfulness metrics.

    Arguments:
        model, attribution, inputs, targets and the other options: as :func:`deletion`.
        baseline: what each left-out source is replaced by: ``"pad"`` (default), ``"unk"``,
            ``"zeros"``, ``"mask"`` or a tensor (embeddings, or token ids), as :func:`deletion`'s.

    Returns:
        DataArray ``([example,] target, source)`` of drops (NaN where the target does not see
        the source or the attribution does not score it), with coordinates ``tau`` and
        ``original`` along ``([example,] target)``, and the attribution's coordinates.

    >>> import attrax as ax
    >>> model = ax.load_model()
    >>> P, T = "3 1 4 0 5 9 =", " 9 5 0 4 1 3"
    >>> da = ax.pipe(ax.saliency, ax.l2_norm)(model, P, T)
    >>> loo = ax.loo_correlation(model, da, P, T)
    >>> loo.dims, loo.tau.dims
    (('target', 'source'), ('target',))
    """
    call, objective_name, ranked = _scored(call, attribution)
    problem = ranked.problem
    scored = ranked.rank < ranked.rank.shape[-1]  # [B, K, S]: sources the target ranks
    width = scored.shape[-1]
    # copy s replaces source s alone; each copy scores every target
    device = problem.inputs[0].device
    keep = ~torch.eye(width, dtype=torch.bool, device=device)[:, None, :]
    keep = keep.expand(width, scored.shape[0], width)
    base = baseline_embeddings(problem, baseline)
    values = problem.masked_objective(keep, base, call.options["batch_size"])  # [S, B, K]
    original = problem.evaluate(tuple(x[None] for x in problem.inputs))[0]  # [B, K]
    dropped = (original[None] - values).permute(1, 2, 0)  # [B, K, S]
    drops = _to_numpy(dropped.masked_fill(~scored.to(dropped.device), float("nan")))
    relevance = ranked.template.values
    tau = np.full(drops.shape[:2], np.nan)
    for b, example_rows in enumerate(ranked.rows):  # a tau per (example, target): few, cheap
        for k, row in enumerate(example_rows):
            mask = scored[b, k].numpy()
            tau[b, k] = kendall_tau(relevance[b, row][mask], drops[b, k][mask])
    attrs = run_attrs(call.model, attribution.attrs.get("method", ""), objective_name, call.options)
    attrs["reductions"] = attribution.attrs.get("reductions", "")
    return label_loo(
        ranked.template,
        ranked.rows,
        drops,
        tau,
        _to_numpy(original),
        single=ranked.single,
        attrs=attrs,
    )


def kendall_tau(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b of two rankings (ties in either count in neither); NaN with fewer than
    two pairs that differ."""
    dx = np.sign(x[:, None] - x[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    upper = np.triu_indices(len(x), 1)
    dx, dy = dx[upper], dy[upper]
    scale = np.sqrt((dx != 0).sum() * (dy != 0).sum())
    return float((dx * dy).sum() / scale) if scale > 0 else np.nan


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
    call: Call,
    attribution: xr.DataArray,
    fractions: np.ndarray,
    baseline: Baseline,
) -> xr.DataArray:
    call, objective_name, ranked = _scored(call, attribution)
    problem = ranked.problem
    counts = torch.as_tensor(
        np.ceil(np.round(np.multiply.outer(ranked.count.numpy(), fractions), 9))
    )
    selected = ranked.rank[:, :, None, :] < counts[..., None].to(ranked.rank)  # [B, K, F, L]
    remove = metric in ("deletion", "comprehensiveness")
    ranked_columns = ranked.rank < ranked.rank.shape[-1]
    # deletion removes the selected sources; insertion keeps them and removes the other ranked ones
    keep = ~selected if remove else selected | ~ranked_columns[:, :, None, :]
    base = baseline_embeddings(problem, baseline)
    values = _perturbed_objective(problem, keep, base, call.options["batch_size"])  # [B, K, F]
    original = problem.evaluate(tuple(x[None] for x in problem.inputs))[0]  # [B, K]
    if metric in ("comprehensiveness", "sufficiency"):
        values = original[..., None] - values
    # a target whose attribution ranks no source (all NaN) has no curve: NaN, not a flat 0
    unranked = (ranked.count == 0).to(values.device)[..., None]
    values = values.masked_fill(unranked, float("nan"))
    attrs = run_attrs(call.model, attribution.attrs.get("method", ""), objective_name, call.options)
    attrs["reductions"] = attribution.attrs.get("reductions", "")
    return label_curve(
        ranked.template,
        ranked.rows,
        _to_numpy(values),
        _to_numpy(original),
        fractions,
        metric=metric,
        single=ranked.single,
        attrs=attrs,
    )


def _scored(call: Call, attribution: xr.DataArray) -> tuple[Call, str, _Ranked]:
    """``call`` as the attribution explained it (its contrast, its positions), the objective's
    name (given, else the attribution's, else probability) and each target's ranking."""
    _check_attribution(attribution)
    call = _with_its_positions(_with_its_contrast(call, attribution), attribution)
    call = _with_its_generation(call, attribution)
    objective = call.options["objective"]
    if objective is None:
        known = attribution.attrs.get("objective")
        objective = known if known in OBJECTIVES else "probability"
    objective_name, _ = resolve(objective, call.model.head_type)
    return call, objective_name, _rank(call, attribution, objective)


def _with_its_positions(call: Call, attribution: xr.DataArray) -> Call:
    """A masked LM's ``call`` at the ``positions`` its attribution records: its targets default
    to the masks, so an attribution of other positions (``positions=``) is scored at those."""
    if call.model.task != "fill-mask":
        return call
    recorded = recorded_option(attribution, "positions")
    if recorded is None:
        return call
    return dataclasses.replace(call, options={**call.options, "positions": recorded})


def _with_its_generation(call: Call, attribution: xr.DataArray) -> Call:
    """``call`` generating its targets (``targets=None``) as the attribution did: with the
    ``max_new_tokens`` it records, where the call leaves its own at the default."""
    default = COMMON["max_new_tokens"].default
    if call.targets is not None or call.options.get("max_new_tokens", default) != default:
        return call
    recorded = recorded_option(attribution, "max_new_tokens")
    if not isinstance(recorded, int) or recorded == default:
        return call
    return dataclasses.replace(call, options={**call.options, "max_new_tokens": recorded})


def _with_its_contrast(call: Call, attribution: xr.DataArray) -> Call:
    """``call`` scoring what a contrastive attribution explained: the ``contrast`` its options
    record, unless one is given (its tokens are checked against the attribution's)."""
    contrastive = {"contrast_id", "contrast_class"} & set(attribution.coords)
    if call.options["contrast"] is not None or not contrastive:
        return call
    recorded = recorded_option(attribution, "contrast")
    if recorded is None:
        raise InputError(
            f"`attribution` is contrastive (its `{min(contrastive)}` coordinate) but its attrs "
            "record no `contrast`: pass `contrast=` the texts it was computed with"
        )
    return dataclasses.replace(call, options={**call.options, "contrast": recorded})


def in_source_order(template: xr.DataArray) -> xr.DataArray:
    """``template`` with its sources in the order the model reads them (the sources side first),
    whatever order a user's selection left them in: they are matched by label, not place."""
    index = template.indexes["source"]
    if isinstance(index, pd.MultiIndex):
        sides, where = index.get_level_values(0), index.get_level_values(1)
        order = np.lexsort((np.asarray(where), np.asarray(sides) != "source"))
    else:
        order = np.argsort(np.asarray(index), kind="stable")
    return template.isel(source=order)


def _rank(call: Call, da: xr.DataArray, objective: Any) -> _Ranked:
    single = "example" not in da.dims
    template = da.expand_dims("example") if single else da
    template = in_source_order(template.transpose("example", "target", "source"))
    attribute_target = isinstance(da.indexes.get("source"), pd.MultiIndex)
    batch = call.batch
    if batch.single != single or len(batch.examples) != template.sizes["example"]:
        raise InputError(
            f"`attribution` has {template.sizes['example']} example(s) "
            f"({'no example dim' if single else 'an example dim'}) but `inputs` "
            f"{'is one text' if batch.single else f'has {len(batch.examples)}'}: pass the inputs "
            "the attribution was computed from"
        )
    batch, rows = _restrict(batch, template, call.model.labels)
    budget = parse_bytes(call.options["max_memory"])
    scored = resolve(objective, call.model.head_type)[1]
    problem = Problem.build(call.model, batch, scored, attribute_target, budget)
    widths = [x.shape[1] for x in problem.inputs]
    if sum(widths) != template.sizes["source"]:
        raise InputError(
            f"`attribution` has {template.sizes['source']} source positions but `inputs`/"
            f"`targets` give {sum(widths)}: pass the texts the attribution was computed from"
        )
    _check_tokens(template, problem, rows)

    values = template.values  # [E, T, S]
    relevance = np.full((len(rows), problem.tensors.valid.shape[1], sum(widths)), np.nan)
    for b, example_rows in enumerate(rows):
        relevance[b, : len(example_rows)] = values[b, example_rows]
    visible = problem.visible().cpu()
    rankable = torch.as_tensor(~np.isnan(relevance)) & visible
    # a target NaN at every source it sees ranks nothing and gets a NaN curve; NaN everywhere
    # would give only NaN, a result that looks like targets the examples lack
    if not bool(rankable.any()):
        raise InputError(
            "`attribution` is NaN at every source its targets see: there is nothing to rank "
            "(NaN leaves a source out of the ranking); check the method's result"
        )
    # stable sort: ties go to the earlier source, so rankings are reproducible
    keyed = torch.where(rankable, -torch.as_tensor(relevance), torch.inf)
    order = torch.sort(keyed, dim=-1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order).contiguous())
    rank = torch.where(rankable, rank, order.shape[-1])
    return _Ranked(problem, rank, rankable.sum(-1), rows, template, single)


def _restrict(
    batch: Batch, template: xr.DataArray, labels: Mapping[int, str]
) -> tuple[Batch, list[list[int]]]:
    """Keep, per example, the target positions (classes: ``labels``) the attribution covers;
    their rows in it."""
    positions = template["target"].values.tolist()
    # targets labelled by name: a class's, or a question-answering model's "start" and "end"
    if batch.task in ("sequence-classification", "question-answering"):
        by_name = {name: i for i, name in labels.items()}
        positions = [by_name.get(p, -1) for p in positions]
    present = has_targets(template)
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
        examples.append(_keep(batch.task, example, wanted))
        rows.append([positions.index(p) for p in wanted])
    return dataclasses.replace(batch, examples=tuple(examples)), rows


def _keep(task: str, example: Any, wanted: list[int]) -> Any:
    """``example`` with only the target positions ``wanted``, in that order: a classifier's
    classes (and a token classifier's or an answer's predictions) follow its positions."""
    if task == "generation":  # a language model's target tokens are its continuation
        return dataclasses.replace(example, positions=tuple(wanted))
    keep = [example.positions.index(p) for p in wanted]

    def pick(values: Sequence[Any] | None) -> tuple[Any, ...] | None:
        return None if values is None else tuple(values[k] for k in keep)

    changes: dict[str, Any] = {
        "positions": tuple(wanted),
        "target_ids": pick(example.target_ids),
        "contrast_ids": pick(example.contrast_ids),
    }
    if task != "sequence-classification":  # a sequence's prediction is one class
        changes["predicted"] = pick(example.predicted)
        changes["predicted_probability"] = pick(example.predicted_probability)
    return dataclasses.replace(example, **changes)


def _first_of(template: xr.DataArray, names: Sequence[str]) -> str:
    """The first of ``names`` that ``template`` has as a coordinate (the last if none)."""
    return next((name for name in names if name in template.coords), names[-1])


def _check_tokens(template: xr.DataArray, problem: Problem, rows: list[list[int]]) -> None:
    """The attribution's token ids must be those of the texts: catch a mismatched pair early."""
    t = problem.tensors
    # a classifier's targets are classes; an answer's, positions; a language model's, tokens
    name = _first_of(template, ("target_class", "target_position", "target_id"))
    if name in template.coords:
        given = per_example(template, name, ("example", "target"))
        for b, example_rows in enumerate(rows):
            expected = t.target_ids[b, : len(example_rows)].tolist()
            if given[b, example_rows].tolist() != expected:
                raise InputError(
                    f"`attribution`'s target tokens (example {b}) differ from those of "
                    "`inputs`/`targets`: pass the texts the attribution was computed from"
                )
    name = _first_of(template, ("contrast_class", "contrast_position", "contrast_id"))
    if name in template.coords and t.contrast_ids is not None:
        given = per_example(template, name, ("example", "target"))
        for b, example_rows in enumerate(rows):
            if given[b, example_rows].tolist() != t.contrast_ids[b, : len(example_rows)].tolist():
                raise InputError(
                    f"`attribution`'s contrast tokens (example {b}) differ from those of "
                    "`contrast`: pass the contrast the attribution was computed with"
                )
    if "source_id" in template.coords:
        given = per_example(template, "source_id", ("example", "source"))
        blocks, masks = [t.ids], [t.mask]
        if len(problem.inputs) == 2:  # the decoder's side attributed too: a translator has it
            assert t.decoder_ids is not None and t.decoder_mask is not None
            blocks, masks = [t.ids, t.decoder_ids], [t.mask, t.decoder_mask]
        ids = torch.cat(
            [torch.where(m.bool(), i, -1) for i, m in zip(blocks, masks, strict=True)], 1
        )
        if not np.array_equal(given, ids.cpu().numpy()):
            raise InputError(
                "`attribution`'s source tokens differ from those of `inputs`/`targets`: pass the "
                "texts the attribution was computed from"
            )


def _perturbed_objective(
    problem: Problem,
    keep: torch.Tensor,
    baselines: tuple[torch.Tensor, ...],
    batch_size: Size,
) -> torch.Tensor:
    """``[B, K, F]``: target k's objective in the copy of the batch that keeps ``keep[:, k, f]``.

    Copy ``(f, k)`` is perturbed for target ``k``; every copy scores all targets in one forward,
    and only the diagonal is read.
    """
    batch, n_targets, n_fractions, width = keep.shape
    device = problem.inputs[0].device
    copies = keep.permute(2, 1, 0, 3).reshape(-1, batch, width).to(device)  # [(F K), B, L]
    values = problem.masked_objective(copies, baselines, batch_size)
    values = values.unflatten(0, (n_fractions, n_targets))  # [F, K, B, K]
    diagonal = torch.diagonal(values, dim1=1, dim2=3)  # [F, B, K]
    return diagonal.permute(1, 2, 0)


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
    unlabelled = [d for d in ("target", "source") if d not in da.indexes]
    if unlabelled:  # the positions say which token each entry is
        raise InputError(
            f"`attribution` has no `{unlabelled[0]}` coordinate: its entries are matched to the "
            "input's tokens by the positions attrax labels them with; pass an array as a method "
            "returns it"
        )


def _fractions(value: int | Sequence[float], name: str, start: float | None = None) -> np.ndarray:
    """Fractions from an int ``n`` (``start`` or ``1/n`` up to 1 in steps of ``1/n``) or a list.

    A curve (``start=0``) needs increasing fractions from 0 to at most 1; kept/removed shares
    (``start=None``) any distinct fractions in (0, 1].
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise OptionError(f"`{name}` must be a positive integer or a list, got {value!r}")
        first = 0 if start == 0.0 else 1
        return np.arange(first, value + 1) / value
    try:
        values = np.asarray([float(f) for f in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        values = np.asarray([], dtype=np.float64)
    low = (values >= 0) if start == 0.0 else (values > 0)
    ok = values.size > 0 and bool((low & (values <= 1)).all())
    ok = ok and len(set(values.tolist())) == values.size
    if start == 0.0:
        ok = ok and values[0] == 0.0 and bool((np.diff(values) > 0).all())
    if not ok:
        expected = (
            "a positive integer or increasing fractions in [0, 1] starting at 0"
            if start == 0.0
            else "a positive integer or distinct fractions in (0, 1]"
        )
        raise OptionError(f"`{name}` must be {expected}, got {value!r}")
    return values


def _to_numpy(values: torch.Tensor) -> np.ndarray:
    return values.detach().to("cpu", torch.float64).numpy()
