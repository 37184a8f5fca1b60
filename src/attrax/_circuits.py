"""Edge patching: the exact effect on each target of patching a set of edges of a decoder-only
model's graph (ACDC's, Conmy et al. 2023), the counterpart of edge attribution patching's
estimates as activation patching is of attribution patching's; and the top edges of an
estimate, the circuits to patch.

An edge ``u -> v`` is patched when ``v`` reads ``u``'s output of the corrupted run in place of
its own; every other edge carries its sender's output of the patched run itself. So ``v``'s
input is the patched run's residual stream less, for each patched edge into it, ``u``'s output
in that run minus ``u``'s corrupted output: the senders are recorded as the run reaches them,
and each receiver's input made before it reads it, the heads' through the norm and their own
rows of the query, key or value projection (a latent attention's: its code run on the head's
stream, the head's query, key or value given to the attention call). Every circuit is a copy of the batch in one
stacked forward: keeping a circuit's edges and patching the rest, or patching one edge a copy,
are as many copies as circuits.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
import xarray as xr

from . import _validate as check
from ._edges import (
    _REST,
    CALL_INPUTS,
    Block,
    Graph,
    Reader,
    _columns,
    _corrupted_input,
    _first,
    _hooked,
    _keeping,
    _not_finite,
    _positional,
    graph,
    heads_added,
    made_at_call,
    runs,
)
from ._errors import InputError, OptionError
from ._heads import _probes_at, _probing
from ._memory import between_passes, full_precision, plan_forwards
from ._model import Model
from ._protocol import Call, Family, own_options
from ._schema import label_circuit_curve, label_circuits, recorded_option

METHOD = "edge_patching"

PATCHING = Family(
    name="edge_patching",
    takes=("objective", "contrast", "positions", "batch_size", "max_new_tokens", "max_memory"),
    refuses={
        "attribute_target": "edge patching scores the model's edges as a whole: there are no "
        "source positions to attribute",
        "chunk_size": "edge patching runs forwards only: there is no backward whose targets to "
        "chunk (batch_size sets the circuits per forward)",
    },
)

#: an edge: its sender's and its receiver's names, as ``ax.edge_attribution_patching`` labels
Edge = tuple[str, str]


def _is_edge(value: object) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, str) for v in value)
    )


def _edge_sets(value: object, name: str) -> tuple[list[list[Edge]], bool]:
    """``value`` as a list of edge sets, and whether it was several (a list of lists of
    edges) rather than one (a list of edges); an OptionError for anything else."""
    if not isinstance(value, (list, tuple)):
        raise OptionError(
            f"`{name}` must be a list of edges, each a (sender, receiver) pair of names as "
            "ax.edge_attribution_patching labels them, or a list of such lists (one circuit "
            f"each); got {value!r}"
        )
    # a list of edges (none: one empty set), else a list of such lists
    one_set = not value or any(map(_is_edge, value))
    for i, item in enumerate(value):
        good = _is_edge(item) if one_set else (
            isinstance(item, (list, tuple)) and all(map(_is_edge, item))
        )  # fmt: skip
        if not good:
            read = " (read as one set: some items are edges)" if one_set else (
                ", or a list of such pairs (one circuit)"
            )  # fmt: skip
            raise OptionError(
                f"`{name}`[{i}] must be a (sender, receiver) pair of names{read}, got {item!r}"
            )
    sets = [value] if one_set else value
    return [[(str(e[0]), str(e[1])) for e in edges] for edges in sets], not one_set


def _check_edges(value: object, name: str) -> None:
    if value is not None:
        _edge_sets(value, name)


def _together(options: Mapping[str, Any]) -> None:
    given = [n for n in ("circuit", "patch") if options[n] is not None]
    if len(given) != 1:
        raise OptionError(
            "give exactly one of `circuit` (the edges that keep their clean sender's output; "
            "every other edge is patched) and `patch` (the edges patched; every other is kept), "
            f"got {' and '.join(f'`{n}`' for n in given) or 'neither'}"
        )


@PATCHING.method(_together, corrupted=_corrupted_input, circuit=_check_edges, patch=_check_edges)
def edge_patching(
    call: Call,
    *,
    corrupted: Any = None,
    circuit: Sequence[Any] | None = None,
    patch: Sequence[Any] | None = None,
) -> xr.DataArray:
    """Edge patching: each target's exact change when a set of edges carries the corrupted
    run's sender outputs, the rest the run's own (ACDC's circuit evaluation).

    Edges are named as :func:`edge_attribution_patching` labels them: ``(sender, receiver)``,
    e.g. ``("a0.h1", "m1")``. A patched edge ``u -> v`` gives ``v`` ``u``'s output in the
    corrupted run; the other edges carry their senders' outputs in the patched run itself, so a
    change flows on through every kept edge below it. Keeping no edge is the corrupted run;
    keeping them all, the clean one. Every circuit is a copy of the batch in one stacked
    forward (``batch_size`` copies a forward, ``"auto"``: as many as fit ``max_memory``).

    Arguments:
        model, inputs, targets, objective, contrast, positions, batch_size, max_new_tokens,
            max_memory: as :func:`attrax.activation_patching`.
        corrupted: as :func:`edge_attribution_patching` (a text aligned with ``inputs``, or an
            :class:`Ablation`).
        circuit: the edges kept (a list of ``(sender, receiver)`` pairs; every other edge is
            patched), or a list of such lists, one circuit each (:func:`top_edges` makes
            them from estimates).
        patch: the edges patched (every other edge is kept), or a list of such lists.

    Returns:
        DataArray ``([example,] target[, circuit])``: the patched run's score less the clean
        run's; ``circuit`` (0, 1, ...) where a list of edge sets was given, its coordinate
        ``edges`` the number of edges each set names.

    >>> import attrax as ax
    >>> model = ax.load_model()
    >>> kw = {"corrupted": "1 2 4 =", "objective": "logit"}
    >>> scores = ax.edge_attribution_patching(model, "1 2 3 =", " 3 2 1", **kw)
    >>> da = ax.edge_patching(model, "1 2 3 =", " 3 2 1", circuit=ax.top_edges(scores, [0, 10]), **kw)
    >>> da.dims
    ('target', 'circuit')
    >>> [int(n) for n in da.edges]
    [0, 10]
    """
    model = call.model
    g = graph(model, METHOD)
    name = "circuit" if circuit is not None else "patch"
    sets, several = _edge_sets(circuit if circuit is not None else patch, name)
    chosen = [_indices(g, edges) for edges in sets]  # per set: its edges' (sender, receiver)
    # a budget too small is refused before the model runs (and the plan checked after it)
    g, clean, delta, unpatched, step = _runs_planned(call, g, corrupted, len(chosen))
    donors = full_precision(clean) + delta  # [U, B, L, H]: each sender's corrupted output
    del clean, delta
    keep = circuit is not None
    effects = _patched_effects(call, g, donors, chosen, keep, unpatched, step)  # [C, B, K]
    if not bool(torch.isfinite(effects).all()):
        raise _not_finite(METHOD)
    values = effects.permute(1, 2, 0)  # [B, K, C]
    counts = [c.shape[1] for c in chosen]
    return label_circuits(
        model, call.batch, values if several else values[..., 0], counts if several else None,
        call.options, METHOD, call.objective[0],
    )  # fmt: skip


#: MIB's circuit sizes (Mueller et al. 2025): 0.1 % to all of the edges
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

CIRCUIT_METHOD = "circuit_faithfulness"


def _run_scores(core: Callable[..., Any], call: Call, arguments: dict[str, Any]) -> xr.DataArray:
    return cast("xr.DataArray", core(call, arguments["scores"], **own_options(core, arguments)))


#: circuit faithfulness: ``(model, scores, inputs, targets)``, forwards only, as edge patching
FAITHFUL_CIRCUITS = Family(
    name="circuit_faithfulness",
    takes=PATCHING.takes,
    refuses={
        "attribute_target": "circuit faithfulness scores circuits of edges as a whole: there "
        "are no source positions to attribute",
        "chunk_size": "circuit faithfulness runs forwards only: there is no backward whose "
        "targets to chunk (batch_size sets the circuits per forward)",
    },
    run=_run_scores,
    leading=("model", "scores", "inputs", "targets"),
)


def _circuit_fractions(value: object, name: str) -> None:
    good = (
        isinstance(value, (list, tuple))
        and len(value) >= 2
        and all(
            isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1 for f in value
        )
        and all(a < b for a, b in itertools.pairwise(value))
    )
    if not good:
        raise OptionError(
            f"`{name}` must be two or more increasing fractions of the edges in (0, 1] (MIB's: "
            f"{list(MIB_FRACTIONS)}), got {value!r}"
        )


@FAITHFUL_CIRCUITS.method(
    corrupted=_corrupted_input,
    fractions=_circuit_fractions,
    greedy=check.boolean,
    connected=check.boolean,
)
def circuit_faithfulness(
    call: Call,
    scores: xr.DataArray,
    *,
    corrupted: Any = None,
    fractions: Sequence[float] = MIB_FRACTIONS,
    greedy: bool = False,
    connected: bool = False,
) -> xr.DataArray:
    """Circuit faithfulness (MIB's circuit localization, Mueller et al. 2025): how much of the
    clean run each circuit of ``scores``' top edges recovers, every other edge patched.

    At fraction ``f`` the circuit is the ``floor(f * N)`` edges of largest absolute estimate
    (:func:`top_edges`; ``N``: the edges ``scores`` has), and its faithfulness ``(m(C) -
    m(empty)) / (m(model) - m(empty))``: ``m`` is each target's score (``objective``) with the
    circuit's edges kept and the rest patched (:func:`edge_patching`), the empty circuit the
    corrupted run and the whole model the clean one. Its areas over ``fractions`` (the
    trapezoid rule) are MIB's CPR (under the curve, higher is better) and CMD (between the
    curve and 1, lower is better). NaN where the corruption leaves a target's score as it was.

    Arguments:
        model, inputs, targets, objective, contrast, positions, batch_size, max_new_tokens,
            max_memory: as :func:`edge_patching`.
        scores: :func:`edge_attribution_patching`'s result whose top edges make the circuits
            (summed over its targets and examples before ranking, as :func:`top_edges`).
        corrupted: as :func:`edge_patching` (a text aligned with ``inputs``, or an
            :class:`Ablation`).
        fractions: the circuits' sizes as increasing fractions of ``N`` (MIB's by default).
        greedy, connected: as :func:`top_edges`.

    Returns:
        DataArray ``([example,] target, fraction)``: each target's faithfulness; coordinates
        ``edges`` (``fraction``: each circuit's edges), ``effect`` (the circuit's score less
        the clean run's), ``empty`` (the corrupted run's less the clean run's), ``cpr`` and
        ``cmd`` (``[example,] target``). MIB's numbers over a dataset normalise the effects
        averaged over its examples first (see :func:`circuit_areas`).

    >>> import attrax as ax
    >>> model = ax.load_model()
    >>> kw = {"corrupted": "1 2 4 =", "objective": "logit"}
    >>> scores = ax.edge_attribution_patching(model, "1 2 3 =", " 3 2 1", **kw)
    >>> da = ax.circuit_faithfulness(model, scores, "1 2 3 =", " 3 2 1", **kw)
    >>> da.dims, [round(float(f), 3) for f in da.isel(fraction=-1).values]
    (('target', 'fraction'), [1.0, 1.0, 1.0])
    """
    model = call.model
    g = graph(model, CIRCUIT_METHOD)
    circuits = top_edges(scores, _sizes(scores, fractions), greedy=greedy, connected=connected)
    _same_edges(g, scores)
    chosen = [_indices(g, edges) for edges in [[], *circuits]]
    g, clean, delta, unpatched, step = _runs_planned(call, g, corrupted, len(chosen))
    donors = full_precision(clean) + delta  # [U, B, L, H]: each sender's corrupted output
    del clean, delta
    effects = _patched_effects(call, g, donors, chosen, True, unpatched, step)  # [C, B, K]
    if not bool(torch.isfinite(effects).all()):
        raise _not_finite(CIRCUIT_METHOD)
    empty, kept = effects[0], effects[1:].permute(1, 2, 0)  # [B, K], [B, K, F]
    return label_circuit_curve(
        model, call.batch, kept, empty, np.asarray(fractions, dtype=np.float64),
        [c.shape[1] for c in chosen[1:]], call.options, CIRCUIT_METHOD, call.objective[0],
    )  # fmt: skip


def _same_edges(g: Graph, scores: xr.DataArray) -> None:
    """An InputError unless ``scores`` holds an estimate of every edge of ``g`` and of no
    other: the fractions count the model's edges, as MIB's."""
    other = [d for d in scores.dims if d not in ("sender", "receiver")]
    summed = scores.sum(other, skipna=True, min_count=1).transpose("sender", "receiver")
    finite = np.isfinite(np.asarray(summed.values, dtype=np.float64))
    given = {
        (str(summed.sender.values[u]), str(summed.receiver.values[v]))
        for u, v in zip(*np.nonzero(finite), strict=True)
    }
    exists = g.edges().numpy()
    senders, receivers = [n for n, _, _ in g.senders], [n for n, *_ in g.receivers()]
    edges = {(senders[u], receivers[v]) for u, v in zip(*np.nonzero(exists), strict=True)}
    if given != edges:
        raise InputError(
            f"`scores` estimates {len(given)} edges, {len(given & edges)} of them this model's; "
            f"its graph has {len(edges)}: give ax.edge_attribution_patching's result on this "
            "model, every edge kept (the fractions count them all)"
        )


def _sizes(scores: xr.DataArray, fractions: Sequence[float]) -> list[int]:
    """``floor(f * N)`` for each fraction, ``N`` the edges ``scores`` has (MIB's counts)."""
    if not isinstance(scores, xr.DataArray) or not {"sender", "receiver"} <= set(scores.dims):
        return [0] * len(fractions)  # top_edges refuses it, naming what it must be
    other = [d for d in scores.dims if d not in ("sender", "receiver")]
    summed = scores.sum(other, skipna=True, min_count=1)
    total = int(np.isfinite(np.asarray(summed.values, dtype=np.float64)).sum())
    # the product rounded first: 0.29 * 100 is 28.999999999999996
    return [int(np.floor(round(f * total, 9))) for f in fractions]


def circuit_areas(
    faithfulness: xr.DataArray, dims: str | Sequence[str] | None = None
) -> xr.Dataset:
    """MIB's CPR and CMD of :func:`circuit_faithfulness`'s result over ``dims`` (None: every
    dim but ``fraction``): the effects averaged over them first, then normalised, then the
    areas of the curve and of its distance to 1 over the fractions (the trapezoid rule).

    Arguments:
        faithfulness: :func:`circuit_faithfulness`'s result.
        dims: the dims to average the effects over (a name or several; None: all but
            ``fraction``).

    Returns:
        Dataset: ``faithfulness`` (``fraction`` and the dims kept), ``cpr`` and ``cmd``.

    >>> import attrax as ax
    >>> model = ax.load_model()
    >>> kw = {"corrupted": "1 2 4 =", "objective": "logit"}
    >>> scores = ax.edge_attribution_patching(model, "1 2 3 =", " 3 2 1", **kw)
    >>> areas = ax.circuit_areas(ax.circuit_faithfulness(model, scores, "1 2 3 =", " 3 2 1", **kw))
    >>> sorted(areas.data_vars)
    ['cmd', 'cpr', 'faithfulness']
    """
    if not isinstance(faithfulness, xr.DataArray) or not {"effect", "empty"} <= set(
        faithfulness.coords
    ) or "fraction" not in faithfulness.dims:  # fmt: skip
        got = type(faithfulness).__name__
        if isinstance(faithfulness, xr.DataArray):
            got += (
                f" with dims {faithfulness.dims} and coords {sorted(map(str, faithfulness.coords))}"
            )
        raise InputError(
            "`faithfulness` must be ax.circuit_faithfulness's result (a DataArray with a "
            f"`fraction` dim and `effect` and `empty` coordinates), got {got}"
        )
    kept = [d for d in faithfulness.dims if d != "fraction"]
    if dims is None:
        over = kept
    elif isinstance(dims, str):
        over = [dims]
    elif isinstance(dims, (list, tuple)) and all(isinstance(d, str) for d in dims):
        over = list(dims)
    else:
        raise OptionError(f"`dims` must be a dim's name or a list of them, got {dims!r}")
    unknown = [d for d in over if d not in kept]
    if unknown or len(set(over)) != len(over):
        raise OptionError(f"`dims` {over!r} must name distinct dims to average over, of {kept}")
    # the effects alone: the curve's own summaries are not the averaged curve's
    drop = [c for c in ("effect", "empty", "cpr", "cmd") if c in faithfulness.coords]
    effect = faithfulness.coords["effect"].drop_vars(drop, errors="ignore").mean(over)
    empty = faithfulness.coords["empty"].drop_vars(drop, errors="ignore").mean(over)
    with np.errstate(divide="ignore", invalid="ignore"):
        # no faithfulness where the corruption leaves the score as it was
        curve = ((effect - empty) / -empty).where(empty != 0)
    x = faithfulness.coords["fraction"]
    widths = x.diff("fraction", label="upper")

    def area(y: xr.DataArray) -> xr.DataArray:
        mids = (y + y.shift(fraction=1)).isel(fraction=slice(1, None)) / 2
        return (mids * widths).sum("fraction", skipna=False)

    # the run's provenance, and the dims averaged over as one netCDF-friendly string
    attrs = {**faithfulness.attrs, "over": ";".join(map(str, over))}
    return xr.Dataset(
        {"faithfulness": curve, "cpr": area(curve), "cmd": area(abs(1 - curve))}, attrs=attrs
    )


def _runs_planned(
    call: Call, g: Graph, corrupted: Any, circuits: int
) -> tuple[Graph, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """:func:`runs` and the copies a forward: planned before them (a budget too small is
    refused before the model runs), and again for the graph the clean run checked where it
    found readers of attention calls (CodeGen's, OLMo's clip_qkv's: their passes run attrax's
    eager attention, priced above the model's SDPA)."""
    _hold(call, g)
    step = _plan(call, g, circuits)
    checked, clean, delta, _, unpatched = runs(call, g, corrupted)
    if checked.at_calls and not g.at_calls:
        step = min(step, _plan(call, checked, circuits))
    return checked, clean, delta, unpatched, step


def _indices(g: Graph, edges: list[Edge]) -> torch.Tensor:
    """``[2, E]``: the (sender, receiver) indices of a set's distinct edges; an OptionError
    naming a sender, receiver or edge the graph has not."""
    senders = {name: i for i, (name, _, _) in enumerate(g.senders)}
    receivers = {name: i for i, (name, _, _, _) in enumerate(g.receivers())}
    exists = g.edges()
    found = set()
    for sender, receiver in edges:
        u, v = senders.get(sender), receivers.get(receiver)
        if u is None or v is None:
            what, name, names = (
                ("sender", sender, list(senders)) if u is None
                else ("receiver", receiver, list(receivers))
            )  # fmt: skip
            raise OptionError(
                f"the edge ({sender!r}, {receiver!r}) has no {what} {name!r}: this model's "
                f"{what}s are {_some(names)}"
            )
        if not exists[u, v]:
            raise OptionError(
                f"there is no edge ({sender!r}, {receiver!r}): {receiver!r} reads the "
                f"residual stream before {sender!r} writes to it, or beside it"
            )
        found.add((u, v))
    return torch.tensor(sorted(found), dtype=torch.long).reshape(-1, 2).T


def _masks(g: Graph, chosen: list[torch.Tensor], keep: bool, device: torch.device) -> torch.Tensor:
    """``[n, U, R]`` bool: the edges each of ``chosen``'s sets patches (``keep``: every edge but
    the set's)."""
    out = torch.zeros(len(chosen), len(g.senders), len(g.receivers()), dtype=torch.bool)
    for c, (u, v) in enumerate(chosen):
        out[c, u, v] = True
    return ((g.edges()[None] & ~out) if keep else out).to(device)


def _some(names: list[str]) -> str:
    return (
        ", ".join(map(repr, names))
        if len(names) <= 8
        else (f"{', '.join(map(repr, names[:4]))}, ..., {', '.join(map(repr, names[-2:]))}")
    )


def _hold(call: Call, g: Graph) -> None:
    """Count the senders' outputs held through the call (the clean, the corrupted, their
    difference and the donors, ``[U, B, L, H]`` each, at full precision): refused before the
    runs that make them."""
    problem = call.problem
    batch, length = problem.tensors.ids.shape
    size = torch.finfo(full_precision(problem.inputs[0]).dtype).bits // 8
    u_all = len(g.senders)
    problem.hold(
        4 * u_all * batch * length * g.width * size, "inputs", f"{batch} x {length} tokens",
        f"{u_all} senders' outputs and donors",
    )  # fmt: skip


def _plan(call: Call, g: Graph, circuits: int) -> int:
    """Copies of the batch (circuits) per forward, the senders' outputs (:func:`_hold`)
    counted, for the graph the clean run checked (its readers of attention calls, CodeGen's
    or OLMo's clip_qkv's found there, run attrax's eager attention)."""
    problem = call.problem
    t = problem.tensors
    x = problem.inputs[0]
    batch, length = t.ids.shape
    hidden = g.width
    size = torch.finfo(full_precision(x).dtype).bits // 8
    one = batch * length * hidden * size
    u_all, r_all = len(g.senders), len(g.receivers())
    cost = problem.cost(saved=False, eager=g.at_calls)
    widest = max(sum(h for r in b.readers for _, h in r.parts) + 1 for b in g.blocks)
    # a copy's edges patched, its senders' differences from their donors, and beside its
    # forward one layer's receivers' inputs: their shifts, the shifted streams, and the norm's
    # temporaries and output
    # (and, past a norm on a sublayer's output or through a post-norm model's LayerNorms, the
    # patched senders' shifts, the moved inputs and those norms' temporaries)
    normed = 4 * widest if g.normed or g.post_ln else 0
    if g.post_ln:  # every LayerNorm's input and output and the first block's input, kept
        normed += 4 * len(g.blocks) + 1
    # a norm over a projection's heads: each remade head's whole projection, and its norm's
    # temporaries and output
    over = g.over_heads
    if over:
        normed += 3 * widest * (-(-max(over) // hidden))
    per_copy = cost.per_point + u_all * r_all + (u_all + 5 * widest + normed) * one
    # the scores of the clean run and of every copy
    fixed = cost.fixed + sum(problem.held) + (circuits + 1) * batch * t.valid.shape[1] * 8
    return plan_forwards(
        circuits, call.options["batch_size"], per_copy, x.device, problem.max_memory, fixed
    )


def _patched_effects(
    call: Call,
    g: Graph,
    donors: torch.Tensor,
    chosen: list[torch.Tensor],
    keep: bool,
    unpatched: torch.Tensor,
    step: int,
) -> torch.Tensor:
    """``[C, B, K]``: each set's score less the clean run's, ``step`` sets a stacked forward."""
    problem = call.problem
    t = problem.tensors
    x = problem.inputs[0]
    batch = donors.shape[1]
    out = []
    with torch.no_grad():
        for first in range(0, len(chosen), step):  # chunking only: bounds memory
            between_passes()
            part = _masks(g, chosen[first : first + step], keep, x.device)
            n = part.shape[0]
            with _patching(g, donors, part, batch, call.model):
                heads_in = problem.hidden_of(x, t.mask, None, t.ids, n)
            scores = problem.head_objective(heads_in).unflatten(0, (n, batch))
            out.append(full_precision(scores) - full_precision(unpatched)[None])
            del part
    return torch.cat(out)


@contextlib.contextmanager
def _patching(
    g: Graph, donors: torch.Tensor, patched: torch.Tensor, batch: int, model: Model
) -> Iterator[None]:
    """Hooks that record each sender's output as the stacked run (``n`` copies of the batch,
    copy-major) makes it, less its donor, and give each receiver the stream less the
    differences of the edges into it that copy patches (``patched``, ``[n, U, R]``); the
    receivers at an attention call (latent attention's) given there."""
    n = patched.shape[0]
    u_all = donors.shape[0]
    # [U, n * B, L, H]: each sender's output in this run less its corrupted output
    diff = donors.new_zeros(u_all, n * batch, *donors.shape[2:])
    columns = _columns(g)
    made: dict[int, torch.Tensor] = {}
    normed = g.normed
    # what each norm on a sublayer's output reads in this run
    posts: dict[int, torch.Tensor] = {}
    # the senders whose difference reaches the stream as it is: not past such a norm
    linear = torch.ones(u_all, dtype=diff.dtype, device=diff.device)
    for rows, _ in normed:
        linear[rows] = 0

    def stream(x: torch.Tensor, senders: int, cols: slice | torch.Tensor) -> torch.Tensor:
        """``[V, n * B, L, H]``: ``x`` less each receiver's patched edges' differences (past a
        norm on a sublayer's output: that norm of what it reads less the differences of its
        senders patched into the receiver, in place of the norm of what it reads)."""
        mask = patched[:, :senders, cols].to(diff.dtype)  # [n, u, V]
        d = diff[:senders].unflatten(1, (n, batch))  # [u, n, B, L, H]
        shift = torch.einsum("nuv,unbLH->vnbLH", mask * linear[:senders, None], d)
        for i, (rows, norm) in enumerate(normed):
            if rows.start >= senders or not bool(mask[:, rows].any()):
                continue
            inner = torch.einsum("nhv,hnbLH->vnbLH", mask[:, rows], d[rows])
            a = posts[i].unflatten(0, (n, batch))  # [n, B, L, H]
            kept = norm.forward(a[None] - inner.to(a.dtype))  # not its hooks: no run's
            shift += full_precision(norm.forward(a))[None] - full_precision(kept)
        return (full_precision(x)[None] - shift.flatten(1, 2)).to(x.dtype)

    # a post-norm model's LayerNorms on the stream in the order they run (each block's LN_1,
    # LN_2), what each read and returned in this run, and the first block's input
    chain = [m for b in g.blocks for m in (b.attn_norm, b.mlp_norm)] if g.post_ln else []
    runs: dict[Any, torch.Tensor] = {}
    # the last LayerNorm before each receiver's input, by how many senders it reads
    reading = {u_all: len(chain) - 1}
    for layer in range(len(g.blocks)):
        reading[g.before_attention(layer)] = 2 * layer - 1
        reading[g.before_mlp(layer)] = 2 * layer

    def post_norm_stream(x: torch.Tensor, senders: int, cols: slice | torch.Tensor) -> torch.Tensor:
        """``[V, n * B, L, H]`` in a post-norm model: each receiver's copy of the stream, each
        LayerNorm from the first a patched edge enters before up to the receiver's input run
        again on its input less those edges' differences, plus the move of the stream it adds
        to (a receiver none moves reads the run's own, bit for bit)."""
        mask = patched[:, :senders, cols].to(diff.dtype)  # [n, u, V]
        d = diff[:senders].unflatten(1, (n, batch))  # [u, n, B, L, H]
        stream_in = full_precision(runs["x"])[None]
        y = stream_in - torch.einsum("nv,nbLH->vnbLH", mask[:, 0], d[0]).flatten(1, 2)
        for k in range(reading[senders] + 1):
            # the senders added before LayerNorm k: layer k // 2's heads (LN_1), or its MLP
            first = g.first_head(k // 2) + (k % 2) * g.heads
            rows = slice(first, first + (1 if k % 2 else g.heads))
            sub = torch.einsum("nuv,unbLH->vnbLH", mask[:, rows], d[rows]).flatten(1, 2)
            # the stream it adds to, moved, less the patched senders' differences
            moved = y - (stream_in if k == 0 else full_precision(runs[k - 1])[None]) - sub
            given = full_precision(runs[("in", k)])[None] + moved
            y = full_precision(chain[k].forward(given.to(runs[("in", k)].dtype)))
        return y.to(x.dtype)

    def touched(senders: int, cols: slice) -> torch.Tensor:
        """``[n, V]``: whether each copy patches an edge into each receiver of ``cols``; a
        receiver no copy does reads the run's own stream, as the model computes it."""
        return patched[:, :senders, cols].any(1)

    def record(index: int, value: torch.Tensor) -> None:
        # Llama 4's experts return [n B L, H]
        got = full_precision(value).reshape(n, *donors.shape[1:])
        diff[index] = (got - donors[index][None]).flatten(0, 1)

    handles = []
    blocks = g.blocks
    # the attention calls whose heads' inputs are remade there, and what each is given
    state = _probes_at(model) if g.at_calls else None
    at_calls: dict[tuple[int, int, str], Any] = {}
    handles.append(blocks[0].block.register_forward_pre_hook(_on_input(record), with_kwargs=True))
    if g.post_ln:
        stream = post_norm_stream
        handles.append(blocks[0].block.register_forward_pre_hook(
            _on_input(lambda _i, value: runs.__setitem__("x", value)), with_kwargs=True
        ))  # fmt: skip
        for k, norm in enumerate(chain):
            handles.append(norm.register_forward_pre_hook(_keeping(runs, ("in", k))))
            handles.append(norm.register_forward_hook(_kept_output(runs, k)))
    for layer, b in enumerate(blocks):
        before = g.before_attention(layer)
        readers, mlp_column = columns[layer]
        remake = _on_attention(b, readers, before, stream, touched, made)
        if b.reads_itself:  # the attention reads the block's input itself
            assert b.attn_in is not None
            handles.append(b.attn_in.register_forward_pre_hook(remake, with_kwargs=True))
        else:
            handles.append(b.attn_norm.register_forward_pre_hook(remake))
        for i, r in enumerate(b.readers):
            if r.call:  # made by the attention's code of their own streams, given at its call
                assert state is not None
                handles.append(r.module.register_forward_pre_hook(
                    _on_call(model, r, made, (layer, i), at_calls), with_kwargs=True
                ))  # fmt: skip
                state.inputs.update(_giving_at_call(state.where[r.module], r, at_calls, (layer, i)))
                continue
            # a norm over the heads: the heads are remade past it, at its output
            handles.append((r.norm or r.module).register_forward_hook(_giving(r, made, i)))
        handles.append(b.out_proj.register_forward_pre_hook(
            _on_heads(g, b, 1 + layer * (g.heads + 1), record)
        ))  # fmt: skip
        mlp_senders = g.before_mlp(layer)
        if b.shared:
            handles.append(b.reads.register_forward_pre_hook(
                _on_shared_mlp(b, mlp_senders, mlp_column, stream, touched, made)
            ))  # fmt: skip
        else:  # its norm's input; a post-norm block's MLP reads LN_1's output itself
            handles.append((b.reads if b.reads_itself else b.mlp_norm).register_forward_pre_hook(
                _on_mlp_input(mlp_senders, mlp_column, stream, touched, n * batch)
            ))  # fmt: skip
        sender = (layer + 1) * (g.heads + 1)  # the MLP's: after the input and its heads
        handles.append(b.mlp.register_forward_hook(_on_mlp(sender, record, b.scale)))
    for i, (_, norm) in enumerate(normed):
        handles.append(norm.register_forward_pre_hook(_keeping(posts, i)))
    logits = slice(len(g.receivers()) - 1, len(g.receivers()))
    handles.append(
        blocks[-1].block.register_forward_hook(_on_output(u_all, logits, stream, touched))
    )
    probing = _probing(model, state) if state else contextlib.nullcontext()
    with _hooked(handles), probing:
        yield


def _kept_output(kept: dict[Any, torch.Tensor], key: Any) -> Callable[..., None]:
    def hook(_m: Any, _args: Any, output: torch.Tensor) -> None:
        kept[key] = output

    return hook


def _on_input(record: Callable[[int, torch.Tensor], None]) -> Callable[..., None]:
    def hook(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        record(0, args[0] if args else kwargs["hidden_states"])

    return hook


#: what a copy's stream is made of: ``(x, senders, receivers)``; and, per copy, which receivers
#: of a range it patches an edge into
Stream = Callable[[torch.Tensor, int, "slice | torch.Tensor"], torch.Tensor]
Touched = Callable[[int, slice], torch.Tensor]


def _on_attention(
    b: Block,
    readers: list[tuple[Reader, int]],
    before: int,
    stream: Stream,
    touched: Touched,
    made: dict[int, Any],
) -> Callable[..., None]:
    """At the attention's norm: each reader's heads that some copy patches an edge into, read
    from their own streams through the norm and their rows of the weight (``[n B, L, k, d]``,
    in the parts' order, with the ``k`` heads' indices)."""

    def hook(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> None:
        x = args[0] if args else cast("dict[str, Any]", kwargs)["hidden_states"]
        if b.shared:  # the MLP reads this norm too, of its own stream
            made[-1] = x
        for i, (r, column) in enumerate(readers):
            heads = sum(h for _, h in r.parts)
            copies = touched(before, slice(column, column + heads))  # [n, heads]
            chosen = copies.any(0).nonzero().squeeze(1)
            if not len(chosen):
                made[i] = None
                continue
            own = stream(x, before, column + chosen)
            normed = own if b.reads_itself else b.attn_norm.forward(own)
            if r.call:  # made at the attention's call, of its other arguments
                made[i] = (chosen, normed, copies[:, chosen])
                continue
            if r.norm is not None:
                per_head = _over_heads(r, normed, chosen)
            else:
                # [out, H]: the parts' heads in order, the chosen heads' rows
                weight = r.blocked(r.weight().T).T.to(x.dtype).unflatten(0, (heads, -1))[chosen]
                per_head = torch.einsum("hbLH,hdH->bLhd", normed, weight)
                bias = getattr(r.module, "bias", None)
                if bias is not None:
                    per_head = per_head + r.blocked(bias.to(x.dtype)).view(heads, -1)[chosen]
            # the copies that patch no edge into a remade head keep the model's own output
            # there, as in a forward of their own
            made[i] = (chosen, per_head, copies[:, chosen])

    return hook


def _over_heads(r: Reader, normed: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """``[n B, L, k, d]``: each chosen head's slice of the norm over all of ``r``'s heads of the
    whole projection of its own stream (``normed``, ``[k, n B, L, H]``, as the projection reads
    it): the norm mixes the heads, so a head's query is made of all of its stream's."""
    bias = getattr(r.module, "bias", None)
    full = torch.nn.functional.linear(
        normed, r.weight().to(normed.dtype), None if bias is None else bias.to(normed.dtype)
    )
    full = cast("torch.nn.Module", r.norm).forward(full)  # not its hooks: no run's
    heads = sum(h for _, h in r.parts)
    copies = torch.arange(len(chosen), device=chosen.device)
    picked = full.unflatten(-1, (heads, -1))[copies, ..., chosen, :]
    return picked.permute(1, 2, 0, 3)


def _on_call(
    model: Model,
    r: Reader,
    made: dict[int, Any],
    key: tuple[int, int],
    at_calls: dict[tuple[int, int, str], Any],
) -> Callable[..., None]:
    """At an attention whose receivers are its call's (layer and reader ``key``): each chosen
    head's query, key or value made by the attention's code of that head's own stream
    (:func:`_on_attention`'s), by ``(*key, "query" | "key" | "value")``: the heads (within the
    part), ``[k, n B, L, d]`` and which copies take each."""

    def hook(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        given = made.pop(key[1])
        if given is None:
            return
        chosen, normed, copies = given
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        if args:  # its input positional: the rest after it
            rest[_REST] = args[1:]
        outs = torch.vmap(made_at_call(model, r, rest))(normed)  # [k, n B, heads, L, d] each
        start = 0
        for name, (_, heads), out in zip(CALL_INPUTS, r.parts, outs, strict=True):
            mine = ((chosen >= start) & (chosen < start + heads)).nonzero().squeeze(1)
            if len(mine):
                local = chosen[mine] - start
                at_calls[key[0], key[1], name] = (local, out[mine, :, local], copies[:, mine])
            start += heads

    return hook


def _giving_at_call(
    place: Any, r: Reader, at_calls: dict[tuple[int, int, str], Any], key: tuple[int, int]
) -> dict[tuple[Any, str], Callable[[torch.Tensor], torch.Tensor]]:
    """What gives an attention call (``[n B, heads, L, d]``) the heads :func:`_on_call` made in
    place of its own, in the copies that take them."""

    def giving(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def give(t: torch.Tensor) -> torch.Tensor:
            given = at_calls.pop((key[0], key[1], name), None)
            if given is None:  # no copy patches an edge into these heads
                return t
            local, values, copies = given
            rows = copies.repeat_interleave(t.shape[0] // copies.shape[0], 0)  # [n B, k]
            own = t.index_select(1, local)
            merged = torch.where(rows[:, :, None, None], values.transpose(0, 1).to(t.dtype), own)
            return t.index_copy(1, local, merged)

        return give

    return {(place, name): giving(name) for name in CALL_INPUTS[: len(r.parts)]}


def _unblocked(r: Reader, t: torch.Tensor) -> torch.Tensor:
    """The inverse of :meth:`Reader.blocked`: the parts' heads back in the output's layout."""
    if not r.grouped:
        return t
    (_, q), (_, kv), _ = r.parts
    width = t.shape[-1] // (q + 2 * kv)
    queries, keys, values = t.split([q * width, kv * width, kv * width], -1)
    return torch.cat(
        (queries.unflatten(-1, (kv, q // kv, width)), keys.unflatten(-1, (kv, 1, width)),
         values.unflatten(-1, (kv, 1, width))), -2,
    ).flatten(-3)  # fmt: skip


def _giving(r: Reader, made: dict[int, Any], i: int) -> Callable[..., Any]:
    """The reader's output with the heads :func:`_on_attention` made in place of its own."""

    def hook(_m: Any, args: Any, output: torch.Tensor) -> Any:
        if args and _positional(args[0]):  # DeBERTa's projection of position embeddings
            return None
        given = made.pop(i)
        if given is None:  # no copy patches an edge into these heads
            return None
        chosen, per_head, copies = given
        heads = sum(h for _, h in r.parts)
        blocked = r.blocked(output).unflatten(-1, (heads, -1))
        rows = copies.repeat_interleave(output.shape[0] // copies.shape[0], 0)  # [n B, k]
        own = blocked.index_select(-2, chosen)
        merged = torch.where(rows[:, None, :, None], per_head.to(output.dtype), own)
        return _unblocked(r, blocked.index_copy(-2, chosen, merged).flatten(-2))

    return hook


def _on_heads(
    g: Graph, b: Block, first: int, record: Callable[[int, torch.Tensor], None]
) -> Callable[..., None]:
    """At the output projection: each head's output through its rows of it (no bias)."""

    def hook(_m: Any, args: tuple[Any, ...]) -> None:
        for h, added in enumerate(heads_added(g, b, args[0])):
            record(first + h, added)

    return hook


def _on_mlp_input(
    senders: int, column: int, stream: Stream, touched: Touched, batch: int
) -> Callable[..., tuple[Any, ...] | None]:
    def hook(_m: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not bool(touched(senders, slice(column, column + 1)).any()):
            return None
        x = args[0]
        flat = x.dim() == 2  # OPT's MLP reads its positions flattened, [n B L, H]
        own = stream(
            x.view(batch, -1, x.shape[-1]) if flat else x, senders, slice(column, column + 1)
        )
        return (own[0].view_as(x), *args[1:])

    return hook


def _on_shared_mlp(
    b: Block, senders: int, column: int, stream: Stream, touched: Touched, made: dict[int, Any]
) -> Callable[..., tuple[Any, ...] | None]:
    """The MLP past a norm it shares with the attention: that norm of its own stream."""

    def hook(_m: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = made.pop(-1)
        if not bool(touched(senders, slice(column, column + 1)).any()):
            return None
        return (b.attn_norm.forward(stream(x, senders, slice(column, column + 1))[0]), *args[1:])

    return hook


def _on_mlp(
    sender: int, record: Callable[[int, torch.Tensor], None], scale: float
) -> Callable[..., None]:
    def hook(_m: Any, _args: Any, output: Any) -> None:
        record(sender, cast("torch.Tensor", _first(output)) * scale)

    return hook


def _on_output(senders: int, column: slice, stream: Stream, touched: Touched) -> Callable[..., Any]:
    def hook(_m: Any, _args: Any, output: Any) -> Any:
        if not bool(touched(senders, column).any()):
            return None
        moved = stream(_first(output), senders, column)[0]
        return (moved, *output[1:]) if isinstance(output, tuple) else moved

    return hook


def top_edges(
    scores: xr.DataArray, n: int | Sequence[int], *, greedy: bool = False, connected: bool = False
) -> Any:
    """The ``n`` edges of largest absolute estimate, each ``(sender, receiver)``: circuits for
    :func:`edge_patching`.

    Arguments:
        scores: :func:`edge_attribution_patching`'s result, summed over every dim but
            ``sender`` and ``receiver`` (targets, examples) before ranking; ties keep its order
            (senders, then receivers).
        n: how many edges; or a list of such numbers, one list of edges each.
        greedy: grow each circuit from the logits instead (Hanna et al. 2024's greedy search):
            each step adds the edge of largest absolute estimate among those into the circuit,
            into the logits or into a head or MLP one of its edges leaves, so that no edge is
            cut from the output by the patched ones around it.
        connected: keep only the chosen edges on a path of chosen edges from the input to the
            logits (a circuit may then hold fewer than ``n``). The others change nothing that
            :func:`edge_patching` measures with the corruption ``scores`` were computed with: a
            head or MLP that reaches no output through chosen edges writes only where the
            patched run does not read, and, when that corruption is a text, one that no chosen
            path reaches reads the corrupted run's inputs and writes its corrupted output.
            Under an :class:`Ablation` (or scores that do not record a text), such a node
            writes a function of ablated inputs, not its ablated output: only the first rule
            prunes.

    >>> import attrax as ax
    >>> model = ax.load_model()
    >>> scores = ax.edge_attribution_patching(
    ...     model, "1 2 3 =", " 3 2 1", corrupted="1 2 4 =", objective="logit")
    >>> len(ax.top_edges(scores, 5)), [len(c) for c in ax.top_edges(scores, [1, 3])]
    (5, [1, 3])
    >>> ax.top_edges(scores, 1, greedy=True)[0][1]
    'logits'
    """
    if not isinstance(scores, xr.DataArray) or not {"sender", "receiver"} <= set(scores.dims):
        raise InputError(
            "`scores` must be a DataArray with `sender` and `receiver` dims, as "
            f"ax.edge_attribution_patching returns, got {type(scores).__name__}"
            + (f" with dims {scores.dims}" if isinstance(scores, xr.DataArray) else "")
        )
    several = isinstance(n, (list, tuple))
    sizes: list[Any] = list(cast("Sequence[int]", n)) if several else [n]
    other = [d for d in scores.dims if d not in ("sender", "receiver")]
    summed = scores.sum(other, skipna=True, min_count=1).transpose("sender", "receiver")
    values = np.abs(np.asarray(summed.values, dtype=np.float64))
    edges = np.flatnonzero(np.isfinite(values.ravel()))
    order = edges[np.argsort(-values.ravel()[edges], kind="stable")]
    for size in sizes:
        if (
            isinstance(size, bool)
            or not isinstance(size, (int, np.integer))
            or not 0 <= size <= len(order)
        ):
            raise OptionError(
                f"`n` must be a whole number of edges from 0 to {len(order)} (the edges "
                f"`scores` has), or a list of them; got {size!r}"
            )
    if not isinstance(connected, bool):
        raise OptionError(f"`connected` must be True or False, got {connected!r}")
    senders = [str(s) for s in summed.sender.values]
    receivers = [str(r) for r in summed.receiver.values]
    feeds = _feeds(summed) if greedy or connected else {}
    if greedy:
        order = np.asarray(_grown(summed, values, max(sizes, default=0), feeds), dtype=np.int64)
    width = len(receivers)
    chosen = [[int(i) for i in order[: int(size)]] for size in sizes]
    if connected:
        if "logits" not in receivers or "input" not in senders:
            raise InputError(
                "`connected=True` follows paths from the `input` sender to the `logits` "
                "receiver, which `scores` must keep"
            )
        # a text's corrupted run: a node no chosen path reaches writes its corrupted output
        corrupted = recorded_option(scores, "corrupted")
        from_input = isinstance(corrupted, str) and not corrupted.startswith("Ablation(")
        logits = receivers.index("logits")
        chosen = [
            _connected(edges, feeds, senders.index("input"), logits, width, from_input)
            for edges in chosen
        ]
    picked = [[(senders[i // width], receivers[i % width]) for i in edges] for edges in chosen]
    return picked if several else picked[0]


def _connected(
    edges: list[int],
    feeds: dict[int, list[int]],
    source: int,
    logits: int,
    width: int,
    from_input: bool,
) -> list[int]:
    """The ``edges`` (flat indices, ``[U, R]``) on a path of ``edges`` to the ``logits``
    receiver, and with ``from_input`` from the ``source`` sender too, in their order."""
    owners: dict[int, list[int]] = {}  # receiver -> the senders whose input it is
    for u, inputs in feeds.items():
        for v in inputs:
            owners.setdefault(v, []).append(u)
    pairs = [(i // width, i % width) for i in edges]
    reached = {source}
    for _ in pairs:  # a path has at most as many edges as there are: the sets stop growing
        more = {w for u, v in pairs if u in reached for w in owners.get(v, [])} - reached
        if not more:
            break
        reached |= more
    alive: set[int] = set()  # senders with a path of edges to the logits

    def leads_out(v: int) -> bool:
        return v == logits or any(w in alive for w in owners.get(v, []))

    for _ in pairs:
        more = {u for u, v in pairs if leads_out(v)} - alive
        if not more:
            break
        alive |= more
    return [
        i
        for i, (u, v) in zip(edges, pairs, strict=True)
        if (u in reached or not from_input) and leads_out(v)
    ]


def _feeds(summed: xr.DataArray) -> dict[int, list[int]]:
    """Each sender's inputs: the receivers (indices) it reads, a key/value head's receiver for
    each query head of its group."""
    layer, head = summed.sender_layer.values, summed.sender_head.values
    names = [str(s) for s in summed.sender.values]
    heads = int(head.max()) + 1 if len(head) else 0
    # each receiver: the senders whose input it is (a key/value head's: its group's queries)
    kv: dict[int, int] = {}  # per layer: its key/value heads
    for r_layer, part, r_head in zip(summed.receiver_layer.values, summed.receiver_input.values,
                                     summed.receiver_head.values, strict=True):  # fmt: skip
        if part == "k":
            kv[int(r_layer)] = max(kv.get(int(r_layer), 0), int(r_head) + 1)
    feeds: dict[int, list[int]] = {}  # sender -> the receivers that are its inputs
    for v, (r_layer, part, r_head) in enumerate(zip(
        summed.receiver_layer.values, summed.receiver_input.values, summed.receiver_head.values,
        strict=True,
    )):  # fmt: skip
        for u in range(len(names)):
            if layer[u] != r_layer or names[u] == "input":
                continue
            if part == "mlp":
                ok = head[u] == -1
            elif part == "q":
                ok = head[u] == r_head
            elif part in ("k", "v"):
                ok = head[u] >= 0 and head[u] // (heads // kv[int(r_layer)]) == r_head
            else:
                ok = False
            if ok:
                feeds.setdefault(u, []).append(v)
    return feeds


def _grown(
    summed: xr.DataArray, values: np.ndarray, n: int, feeds: dict[int, list[int]]
) -> list[int]:
    """The first ``n`` edges (flat indices into ``values``, ``[U, R]`` absolute estimates, NaN
    where none) of a circuit grown from the logits: each the largest into the logits or into a
    node (head, MLP) the circuit's edges already leave (``feeds``: :func:`_feeds`); ties in the
    scores' order."""
    width = values.shape[1]
    candidates: list[tuple[float, int]] = []
    opened: set[int] = set()

    def open_receiver(v: int) -> None:
        if v in opened:
            return
        opened.add(v)
        for u in np.flatnonzero(np.isfinite(values[:, v])):
            heapq.heappush(candidates, (-values[u, v], int(u) * width + v))

    open_receiver(width - 1)  # the logits
    joined: set[int] = set()
    out: list[int] = []
    while candidates and len(out) < n:
        _, edge = heapq.heappop(candidates)
        out.append(edge)
        u = edge // width
        if u not in joined:
            joined.add(u)
            for v in feeds.get(u, []):
                open_receiver(v)
    return out
