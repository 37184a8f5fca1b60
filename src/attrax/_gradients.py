"""Gradient methods: saliency, input x gradient, integrated gradients, SmoothGrad, SquareGrad,
VarGrad, GradientSHAP.

Each is a core that returns a :class:`Rule`: where the gradients are taken (*points*), how they
are weighted, and what multiplies the weighted sum. The :data:`GRADIENT` family runs a rule on the
vectorized engine, reduces ``hidden`` when asked, and labels the result
``([example,] target, source, hidden)``; see ``docs/data-model.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, cast

import numpy as np
import torch
import xarray as xr

from . import _layers
from . import _validate as check
from ._engine import DRAWS, Baseline, PointFn, Problem, all_finite, baseline_embeddings
from ._errors import InputError, OptionError
from ._protocol import COMMON, Call, Family, Param, own_options

QUADRATURES = (
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
    "gausslegendre",
)
HIDDEN_REDUCTIONS = ("l2_norm", "sum")
Baselines = Baseline | list[Baseline] | tuple[Baseline, ...]
MODES = ("auto", "reverse", "forward")


class Rule(NamedTuple):
    """A gradient method: ``transform(*[sum_i weights[i] * (m_i grad f(points[i])) ** p for p in
    moments])``.

    ``points`` maps indices to stacked points (None: the embeddings, one point); ``weights`` sum
    the points' gradients (None: one point of weight 1; ``[N, L]``: a weight per point and source
    token, sides concatenated; ``[N, B, L, H]``: per point and feature); ``multiplier`` is ``m_i``: one tensor per
    side shared by every point (input x gradient, IG), or a function of point indices giving each
    point its own (``[n, B, L, H]`` per side: GradientSHAP's ``x + noise - baseline``);
    ``moments`` are the powers of the weighted gradients to accumulate (``(2,)``: mean squared
    gradients; ``(1, 2)``: both, for a variance); ``reference`` (the baseline, per side) adds a
    ``completeness_gap`` coordinate: the attributions' sum minus ``f(x) - f(reference)``;
    ``transform`` maps the moments, one argument each (e.g. ``abs``), before labelling.
    For ``layers=`` (:mod:`attrax._layers`): ``alphas`` ``[N]`` mark a straight path from
    ``reference`` (point i at ``alphas[i]``), which a layer reads as a path between the layer's
    activations; ``origins`` give a per-point multiplier's start (``points`` minus the path);
    ``chained``: each point's multiplier ends where the next point starts (a path's steps), so a
    layer reads each point once.
    """

    points: PointFn | None = None
    weights: torch.Tensor | None = None
    multiplier: tuple[torch.Tensor, ...] | PointFn | None = None
    reference: tuple[torch.Tensor, ...] | None = None
    transform: Callable[..., torch.Tensor] | None = None
    moments: tuple[int, ...] = (1,)
    alphas: torch.Tensor | None = None
    origins: PointFn | None = None
    chained: bool = False


def _run(core: Callable[..., Rule], call: Call, arguments: dict[str, Any]) -> xr.DataArray:
    """Run a gradient method's rule: reverse mode (a vectorized backward per target chunk) or
    forward mode (a ``jvp`` per source token, summing over ``hidden``)."""
    o = call.options
    reduce_hidden, mode = o["reduce_hidden"], o["mode"]
    layers = None
    check_layer_options(o)
    if o.get("layers") is not None:
        layers = _layers.resolve(call.model, o["layers"], o.get("site", "residual"))
    problem = call.problem
    rule = core(problem, **own_options(core, arguments))
    if layers is not None:
        return _run_layers(rule, call, layers)
    # a classifier's prediction from the class logits at the input of a forward run anyway
    # (Call.lazy_prediction): point 0 of the default points, or IG's end point
    predict = getattr(call, "lazy_prediction", False) and problem.batch.task != "generation"
    class_logits = None
    x = problem.inputs
    points = rule.points or (lambda chunk: tuple(xi[None] for xi in x))
    weights = rule.weights if rule.weights is not None else torch.ones(1, dtype=torch.float64)
    if mode == "forward" and reduce_hidden != "sum":
        raise OptionError(
            "`mode='forward'` computes token-level sums over hidden: it needs reduce_hidden='sum'"
        )
    if mode == "forward" and (rule.multiplier is None or rule.moments != (1,)):
        raise OptionError(
            f"`mode='forward'` sums gradients times a multiplier over hidden; {call.method} "
            f"{'has none' if rule.multiplier is None else 'needs gradient moments'}: "
            "use mode='reverse'"
        )
    sizes = {"batch_size": o["batch_size"], "chunk_size": o["chunk_size"]}
    # forward mode costs one pass per source token, reverse mode one per target
    sources = sum(xi.shape[1] for xi in x)
    forward = (
        rule.multiplier is not None
        and rule.moments == (1,)
        and (
            mode == "forward"
            or (
                mode == "auto"
                and reduce_hidden == "sum"
                and sources < problem.tensors.valid.shape[1]
                and _forward_fits(problem, weights.shape[0], sizes)
            )
        )
    )
    per_point = callable(rule.multiplier)
    moments: tuple[tuple[torch.Tensor, ...], ...]  # per moment, one tensor per side
    if forward:
        assert rule.multiplier is not None
        moments = (problem.directional_sum(points, weights, rule.multiplier, **sizes),)
    else:
        moments, first = problem.gradient_sum_with_hidden(
            points,
            weights,
            multiplier=rule.multiplier if per_point else None,  # type: ignore[arg-type]
            moments=rule.moments,
            **sizes,
        )
        if predict and rule.points is None:
            class_logits = first
        if rule.multiplier is not None and not per_point:
            shared = rule.multiplier
            moments = tuple(
                tuple(g * m[:, None] ** p for g, m in zip(sides, shared, strict=True))  # type: ignore[arg-type]
                for p, sides in zip(rule.moments, moments, strict=True)
            )
    if rule.transform is not None:
        values = tuple(rule.transform(*per_side) for per_side in zip(*moments, strict=True))
    else:
        values = moments[0]
    if not all_finite(*values):
        raise InputError(
            f"{call.method}: the gradients are not finite (inf/NaN); check the model's dtype "
            "and inputs"
        )
    target_coords = None
    if rule.reference is not None:
        total = sum(v.sum(dim=tuple(range(2, v.ndim))) for v in values)
        ends_at = tuple(torch.stack([xi, ri]) for xi, ri in zip(x, rule.reference, strict=True))
        if predict:
            ends, hidden = problem.evaluate_with_hidden(ends_at)
            class_logits = hidden[0] if class_logits is None else class_logits
        else:
            ends = problem.evaluate(ends_at)
        target_coords = {"completeness_gap": total - (ends[0] - ends[1])}
    if reduce_hidden and not forward:
        reduce = torch.linalg.vector_norm if reduce_hidden == "l2_norm" else torch.sum
        values = tuple(reduce(v, dim=-1) for v in values)
    da = call.label(
        values,
        trailing=() if reduce_hidden else ("hidden",),
        target_coords=target_coords,
        class_logits=class_logits,
    )
    if reduce_hidden:
        da.attrs["reductions"] = f"{reduce_hidden}(hidden)"
    return da


def refuse_layers(
    method: str, why: str, *also: Callable[[Mapping[str, Any]], None]
) -> Callable[[Mapping[str, Any]], None]:
    """A ``together`` check (after ``also``) for a GRADIENT method that cannot take ``layers``."""

    def check_options(options: Mapping[str, Any]) -> None:
        for other in also:
            other(options)
        for name, default in (("layers", None), ("site", "residual")):
            if options.get(name, default) != default:
                raise OptionError(
                    f"{method} does not take `{name}` (got {options[name]!r}): {why}; "
                    f"use {name}={default!r}, or integrated_gradients for a path at a layer"
                )

    return check_options


def check_layer_options(options: Mapping[str, Any]) -> None:
    """What ``layers=`` cannot be combined with, refused before the model runs."""
    site = options.get("site", "residual")
    if options.get("layers") is None:
        if site != "residual":
            raise OptionError(
                f"`site={site!r}` is read at layers: give `layers` too (e.g. layers='all', "
                "every block)"
            )
        return
    if options.get("mode") == "forward":
        raise OptionError(
            "`layers` reads gradients at hidden layers by reverse mode: mode='reverse'"
        )
    if options.get("attribute_target"):
        raise OptionError(
            "`layers` indexes the encoder's blocks; it cannot be combined with "
            "attribute_target=True (the decoder prefix has no encoder layers)"
        )


def _forward_fits(problem: Problem, points: int, sizes: dict[str, Any]) -> bool:
    """Whether forward mode meets ``max_memory`` (``"auto"`` takes reverse mode where only
    that does: its passes hold one target's backward, forward mode's a source token's jvp)."""
    try:
        problem.forward_plan(points, sizes["batch_size"], sizes["chunk_size"])
    except OptionError:
        return False
    return True


def _run_layers(rule: Rule, call: Call, layers: _layers.At) -> xr.DataArray:
    """A rule read at ``layers`` (:mod:`attrax._layers`): dims ``(..., source, layer, hidden)``
    (``neuron`` for the MLPs' neurons)."""
    o = call.options
    problem = call.problem
    moments = _layers.moments(problem, rule, layers, o["batch_size"], o["chunk_size"])
    if rule.transform is not None:
        values = rule.transform(*(m[0] for m in moments))
    else:
        values = moments[0][0]
    if not all_finite(values):
        raise InputError(
            f"{call.method}: the gradients are not finite (inf/NaN); check the model's dtype "
            "and inputs"
        )
    target_coords = None
    # each layer's row sums to about f(x) - f(x'): layer IG's path starts at h_l(x'),
    # conductance's at x'; the same gap per layer. Off the residual stream, which carries x
    # past the site, layer IG's path starts at f(x) with that site at its value for x';
    # conductance's sums only what flows through the site: no gap
    if rule.reference is not None and (layers.site == "residual" or rule.alphas is not None):
        x, reference = problem.inputs[0], rule.reference[0]
        ends = problem.evaluate((torch.stack([x, reference]),))
        if layers.site == "residual":
            start = ends[1][..., None]
        else:
            held = values.numel() * values.element_size()
            start = _layers.replaced_scores(problem, layers, x, reference, o["batch_size"], held)
        gap = values.sum(dim=(3, 4)) - (ends[0][..., None] - start)  # [B, K, n_layers]
        target_coords = _layers.gap_coords(gap)
    reduce_hidden = o["reduce_hidden"]
    per_head = () if layers.heads is None else ("head",)
    if layers.heads is not None:  # each head's output, side by side: [..., heads, head_dim]
        values = values.unflatten(-1, (layers.heads, -1))
    if reduce_hidden:  # a head's own features
        reduce = torch.linalg.vector_norm if reduce_hidden == "l2_norm" else torch.sum
        values = reduce(values, dim=-1)
    values = values.transpose(2, 3)  # [B, K, L, n_layers, (heads), (H)]
    trailing = ("layer", *per_head) + (() if reduce_hidden else (layers.dim,))
    coords: dict[str, Any] = {"layer": layers.layers}
    if layers.heads is not None:
        coords["head"] = list(range(layers.heads))
    da = call.label(
        (values,),
        trailing=trailing,
        target_coords=target_coords,
        trailing_coords=coords,
    )
    if target_coords is not None:
        da = _layers.join_gaps(da, len(layers))
    if reduce_hidden:
        da.attrs["reductions"] = f"{reduce_hidden}({layers.dim})"
    return da


def _check_mode(value: object, name: str) -> None:
    check.one_of(*MODES)(value, name)


#: ``reduce_hidden``, the option every gradient family adds
REDUCE_HIDDEN = Param(
    None,
    "str | None",
    check.one_of(*HIDDEN_REDUCTIONS, none=True),
    "'l2_norm' or 'sum': reduce over hidden on the model's device before labelling",
)

#: Gradient methods: every common parameter, plus ``reduce_hidden`` and ``mode``.
GRADIENT = Family(
    name="gradient",
    takes=tuple(COMMON),
    refuses={},
    run=_run,
    lazy_prediction=True,
    differentiates=True,
    extra={
        "reduce_hidden": REDUCE_HIDDEN,
        "mode": Param(
            "auto",
            "str",
            _check_mode,
            "'reverse', 'forward' (a jvp per source token; with reduce_hidden='sum') or 'auto'",
        ),
        "layers": Param(
            None,
            "int | Sequence[int] | str | None",
            _layers.check_layers,
            "None (the token embeddings), an int, a list of ints or 'all': attribute to the "
            "residual stream at these layers (0: the embedding output, L: the last block's "
            "output, before the final norm), or with `site` to these blocks' (0..L-1), as a "
            "`layer` dim",
        ),
        "site": Param(
            "residual",
            "str",
            _layers.check_site,
            "with `layers`: 'residual' (the residual stream), or per block 0..L-1 'attention' "
            "(its attention's output), 'mlp' (its MLP's output), 'neurons' (its MLP's "
            "neurons, the input of the MLP's output projection; a `neuron` dim) or 'heads' "
            "(its heads' outputs, the input of the attention's output projection; a `head` dim)",
        ),
    },
)


@GRADIENT.method(abs=check.boolean)
def saliency(problem: Problem, *, abs: bool = False) -> Rule:
    """Gradient of each target's objective with respect to every source token embedding.

    Arguments:
        model: a :class:`Model` (from :func:`load_model`) or a path to load.
        inputs: a prompt (decoder-only) or source text (encoder-decoder), or a list of them.
        targets: the continuation / translation to attribute, a list, or None to generate it
            greedily (``max_new_tokens``).
        abs: absolute gradients, as Captum's and Inseq's saliency return by default.
        objective: ``"probability"`` (default), ``"logprob"``, ``"logit"`` or a callable
            ``(logits[..., V], target_ids[...]) -> scores[...]``.
        contrast: a text aligned token by token with the target: the objective becomes
            objective(target token) - objective(contrast token) at each position.
        positions: attribute only these target positions (negative counts from the end).
        attribute_target: encoder-decoder only: also attribute to the decoder prefix.
        chunk_size: how many targets go through one vectorized backward (memory bound); for
            decoder-only models each chunk also runs on the sequence cut after its last target
            (at a multiple of a sixteenth of the sequence). In forward mode: how many source
            tokens go through one vectorized ``jvp``.
            ``"auto"`` (default): all at once when that fits ``max_memory`` (an estimate), else
            fewer; None: all at once.
        batch_size: points (interpolation points, noisy copies) per forward, the same bound
            for every gradient method; saliency has one point.
        max_memory: what the ``"auto"`` sizes may use: bytes (an int) or a string such as
            ``"8GB"`` or ``"512MiB"``; None (default): half the device's free memory. A budget
            that the smallest passes exceed is an :class:`~attrax.OptionError` naming the
            smallest that can be met (docs/memory.md).
        reduce_hidden: ``"l2_norm"`` or ``"sum"`` to reduce over ``hidden`` on the model's device
            before labelling (what ``ax.pipe(method, ax.l2_norm, ...)`` asks for by itself).
        mode: ``"reverse"`` (one vectorized backward per target), ``"forward"`` (one ``jvp`` per
            source token; methods with a multiplier, with ``reduce_hidden="sum"``) or ``"auto"``.
        max_new_tokens: how many tokens to generate when ``targets`` is None.
        layers: None (the token embeddings), an int, a list of ints or ``"all"``: attribute to
            the residual stream at these layers instead (0: the embedding output, ``l``: block
            ``l``'s output, before the final norm; negative from the end), adding a ``layer``
            dim after ``source`` (docs/methods/gradients.md, "Layers").

    Returns:
        DataArray ``(target, source, hidden)``, with ``example`` first for a list of inputs;
        ``(target, source)`` with ``reduce_hidden``; ``layer`` after ``source`` with ``layers``.

    >>> import attrax as ax
    >>> model = ax.load_model()
    >>> ax.saliency(model, "1 2 3 =", " 3 2 1").dims
    ('target', 'source', 'hidden')
    """
    return Rule(transform=torch.abs if abs else None)


@GRADIENT.method()
def input_x_gradient(problem: Problem) -> Rule:
    """Embedding times gradient (the first-order Taylor term) per source token and hidden unit.

    ``mode="forward"`` (or ``"auto"`` with fewer source tokens than targets) runs one ``jvp`` per
    source token, with ``reduce_hidden="sum"``.

    Arguments:
        model, inputs, targets and the common options: as :func:`attrax.saliency` (no ``abs``).

    Returns:
        DataArray ``([example,] target, source, hidden)``; ``([example,] target, source)`` with
        ``reduce_hidden``; ``layer`` after ``source`` with ``layers`` (the layer's activation
        times the gradient there).

    >>> import attrax as ax
    >>> da = ax.input_x_gradient(ax.load_model(), "1 2 3 =", " 3 2 1")
    >>> da.attrs["method"]
    'input_x_gradient'
    """
    return Rule(multiplier=problem.inputs)


#: numpy's Gauss-Legendre nodes take O(steps³) time: 0.2 s at 1,000, minutes at 4,096
MAX_GAUSS_LEGENDRE = 1000


def check_quadrature_steps(options: Mapping[str, Any]) -> None:
    if options["quadrature"] == "riemann_trapezoid" and options["steps"] < 2:
        raise OptionError("`steps` must be at least 2 for quadrature='riemann_trapezoid'")
    if options["quadrature"] == "gausslegendre" and options["steps"] > MAX_GAUSS_LEGENDRE:
        raise OptionError(
            f"`steps` {options['steps']} is more than quadrature='gausslegendre' computes nodes "
            f"for ({MAX_GAUSS_LEGENDRE}, already exact for polynomials of degree "
            f"{2 * MAX_GAUSS_LEGENDRE - 1}); use a riemann_* quadrature for more points"
        )


#: the options of a path integral by quadrature, shared by IG and the other path methods
PATH_CHECKS = {
    "steps": check.positive_int,
    "quadrature": check.one_of(*QUADRATURES),
    "baseline": check.baseline,
}


@GRADIENT.method(check_quadrature_steps, **PATH_CHECKS)
def integrated_gradients(
    problem: Problem,
    *,
    steps: int = 50,
    quadrature: str = "gausslegendre",
    baseline: str | torch.Tensor | tuple[torch.Tensor, ...] = "zeros",
) -> Rule:
    """Integrated gradients (Sundararajan et al. 2017) along the straight path from a baseline.

    ``(x - x') * integral_0^1 grad f(x' + a (x - x')) da`` with the integral taken by quadrature.

    Arguments (others as :func:`saliency`):
        steps: number of quadrature points.
        quadrature: ``riemann_left|right|middle|trapezoid`` or ``gausslegendre``.
        baseline: ``"zeros"``, ``"pad"``/``"unk"`` (that token's embedding at every position), or a
            tensor broadcastable to the embeddings ``[B, L, H]`` (a tuple of two for
            ``attribute_target`` on encoder-decoder models).
        batch_size: interpolation points per forward: None all at once, ``"auto"`` (default) as
            many as fit in memory with the targets of one chunk.

    Returns:
        DataArray ``(target, source, hidden)`` with a ``completeness_gap`` coordinate along
        ``target``: sum of attributions minus ``f(x) - f(x')``.

    >>> import attrax as ax
    >>> da = ax.integrated_gradients(ax.load_model(), "1 2 3 =", " 3 2 1", steps=16)
    >>> bool(abs(da.completeness_gap).max() < 0.05)
    True
    """
    alphas, weights = quadrature_nodes(quadrature, steps)
    path = straight_path(problem, baseline, alphas)
    return Rule(
        path.points, torch.as_tensor(weights), multiplier=path.delta, reference=path.base,
        alphas=path.alpha,
    )  # fmt: skip


class Path(NamedTuple):
    """The straight path from a baseline: its ends (``base``, ``delta = x - base``, per side),
    its nodes ``alpha`` ``[N]``, and ``points(indices)`` at those nodes ``[n, B, L, H]``."""

    base: tuple[torch.Tensor, ...]
    delta: tuple[torch.Tensor, ...]
    alpha: torch.Tensor
    points: PointFn


def straight_path(problem: Problem, baseline: Baseline, alphas: np.ndarray) -> Path:
    """``base + alpha * (x - base)`` at the nodes ``alphas``, for every attributed side."""
    x = problem.inputs
    base = baseline_embeddings(problem, baseline)
    delta = tuple(xi - bi for xi, bi in zip(x, base, strict=True))
    alpha = torch.as_tensor(alphas, dtype=x[0].dtype, device=x[0].device)

    def points(chunk: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = alpha[chunk.to(alpha.device)].view(-1, 1, 1, 1)
        return tuple(bi[None] + a * di[None] for bi, di in zip(base, delta, strict=True))

    return Path(base, delta, alpha, points)


@GRADIENT.method(check_quadrature_steps, **PATH_CHECKS)
def internal_influence(
    problem: Problem,
    *,
    steps: int = 50,
    quadrature: str = "gausslegendre",
    baseline: str | torch.Tensor | tuple[torch.Tensor, ...] = "zeros",
) -> Rule:
    """Internal influence (Leino et al. 2018; Captum's ``InternalInfluence``): the gradient at a
    layer averaged along the straight path from the baseline in the embeddings.

    ``integral_0^1 d f / d h(x' + a (x - x')) da`` by quadrature, for the activations ``h`` of each
    layer in ``layers`` (the token embeddings without ``layers``): integrated gradients without
    the multiplier, every layer and target from one vectorized backward per chunk of points.
    The weights are :func:`integrated_gradients`', which sum to 1 (Captum's
    ``riemann_trapezoid`` weights sum to ``(steps - 1) / steps``).

    Arguments (others as :func:`saliency`):
        steps, quadrature, baseline, batch_size: as :func:`integrated_gradients`.

    Returns:
        DataArray ``(target, source, hidden)``, with ``layer`` after ``source`` with ``layers``.

    >>> import attrax as ax
    >>> da = ax.internal_influence(ax.load_model(), "1 2 3 =", " 3 2 1", layers=-1, steps=8)
    >>> da.dims
    ('target', 'source', 'layer', 'hidden')
    """
    alphas, weights = quadrature_nodes(quadrature, steps)
    return Rule(straight_path(problem, baseline, alphas).points, torch.as_tensor(weights))


def check_conductance_steps(options: Mapping[str, Any]) -> None:
    # conductance takes `steps + 1` nodes: their differences are its steps
    if options["quadrature"] == "gausslegendre" and options["steps"] + 1 > MAX_GAUSS_LEGENDRE:
        raise OptionError(
            f"`steps` {options['steps']} needs {options['steps'] + 1} Gauss-Legendre nodes, more "
            f"than quadrature='gausslegendre' computes ({MAX_GAUSS_LEGENDRE}); use a riemann_* "
            "quadrature for more points"
        )


@GRADIENT.method(check_conductance_steps, **PATH_CHECKS)
def conductance(
    problem: Problem,
    *,
    steps: int = 50,
    quadrature: str = "gausslegendre",
    baseline: str | torch.Tensor | tuple[torch.Tensor, ...] = "zeros",
) -> Rule:
    """Conductance (Dhamdhere et al. 2019; Captum's ``LayerConductance``): how much of
    ``f(x) - f(x')`` flows through each unit of a layer as the input moves from the baseline.

    Along the straight path ``x' + a (x - x')`` in the embeddings, at ``steps + 1`` nodes
    ``a_0 < ... < a_steps`` of ``quadrature`` (Captum's nodes): ``sum_k d f / d h(a_k) *
    (h(a_{k+1}) - h(a_k))`` for the activations ``h`` of each layer in ``layers`` (a
    Riemann-Stieltjes sum of ``integral d f / d h  dh``), every layer and target from one
    vectorized backward per chunk of points. Unlike layer integrated gradients, the path runs
    in the input and the layer is read, not replaced. Each layer's row adds up to about
    ``f(x) - f(x')``, exactly as the nodes fill ``[0, 1]`` (``quadrature="riemann_trapezoid"``
    takes both ends). Without ``layers`` it is read at the token embeddings, where it is
    integrated gradients with those nodes.

    Arguments (others as :func:`saliency`):
        steps: gradients taken (``steps + 1`` nodes).
        quadrature: where the nodes lie, as :func:`integrated_gradients` places ``steps + 1``
            points (its weights are not used): ``gausslegendre`` (default, Captum's),
            ``riemann_trapezoid`` (``0, 1/steps, ..., 1``) or another ``riemann_*``.
        baseline: as :func:`integrated_gradients`.
        batch_size: points per forward, as :func:`integrated_gradients`.

    Returns:
        DataArray ``(target, source, hidden)``, with ``layer`` after ``source`` with ``layers``,
        and a ``completeness_gap`` coordinate (per layer with ``layers``): the sum minus
        ``f(x) - f(x')``.

    >>> import attrax as ax
    >>> da = ax.conductance(ax.load_model(), "1 2 3 =", " 3 2 1", layers="all", steps=64)
    >>> da.dims
    ('target', 'source', 'layer', 'hidden')
    >>> bool(abs(da.completeness_gap).max() < 0.05)  # the gap falls as 1 / steps
    True
    """
    alphas, _ = quadrature_nodes(quadrature, steps + 1)
    path = straight_path(problem, baseline, alphas)
    widths = path.alpha[1:] - path.alpha[:-1]

    def moves(chunk: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # from node k to node k + 1: the layer reads h(a_k + width_k) - h(a_k)
        w = widths[chunk].view(-1, 1, 1, 1)
        return tuple(w * di[None] for di in path.delta)

    weights = torch.ones(steps, dtype=torch.float64)
    return Rule(
        path.points, weights, multiplier=moves, reference=path.base, origins=path.points,
        chained=True,
    )  # fmt: skip


@GRADIENT.method(samples=check.positive_int, noise=check.non_negative, seed=check.seed)
def smoothgrad(problem: Problem, *, samples: int = 20, noise: float = 0.1, seed: int = 0) -> Rule:
    """SmoothGrad (Smilkov et al. 2017): the gradient averaged over noisy copies of the embeddings.

    Gaussian noise with standard deviation ``noise * (max - min)`` of each example's embeddings
    (the paper's noise level), drawn from a generator seeded with ``seed``.

    Arguments (others as :func:`saliency`):
        samples: number of noisy copies; noise: the noise level; seed: the random seed.
        batch_size: noisy copies per forward: None all at once, ``"auto"`` (default) as many as
            fit in memory.

    Returns:
        DataArray ``([example,] target, source, hidden)``, the mean gradient over the copies;
        ``([example,] target, source)`` with ``reduce_hidden``; ``layer`` after ``source`` with
        ``layers`` (the gradient read at that layer of each noisy copy).

    >>> import attrax as ax
    >>> ax.smoothgrad(ax.load_model(), "1 2 3 =", " 3 2 1", samples=4).sizes["hidden"] > 0
    True
    """
    return Rule(*_noisy_copies(problem, samples, noise, seed))


@GRADIENT.method(samples=check.positive_int, noise=check.non_negative, seed=check.seed)
def squaregrad(problem: Problem, *, samples: int = 20, noise: float = 0.1, seed: int = 0) -> Rule:
    """SquareGrad (Captum NoiseTunnel's ``smoothgrad_sq``): the mean squared gradient over noisy
    copies of the embeddings, drawn exactly as :func:`smoothgrad`'s (same ``noise``, ``seed``).

    Cost: ``samples`` points, as SmoothGrad.

    Arguments:
        model, inputs, targets and the common options: as :func:`attrax.saliency` (no ``abs``).
        samples, noise, seed: as :func:`smoothgrad` (defaults 20, 0.1, 0).

    Returns:
        DataArray ``([example,] target, source, hidden)`` of mean squared gradients (at least
        0); ``([example,] target, source)`` with ``reduce_hidden`` (the norm or sum of those);
        ``layer`` after ``source`` with ``layers``.

    >>> import attrax as ax
    >>> da = ax.squaregrad(ax.load_model(), "1 2 3 =", " 3 2 1", samples=4)
    >>> bool((da.fillna(0) >= 0).all())
    True
    """
    return Rule(*_noisy_copies(problem, samples, noise, seed), moments=(2,))


@GRADIENT.method(
    samples=check.at_least(2, "the variance of one draw is 0 everywhere"),
    noise=check.positive,  # no noise: every draw is the input, whose variance is 0
    seed=check.seed,
)
def vargrad(problem: Problem, *, samples: int = 20, noise: float = 0.1, seed: int = 0) -> Rule:
    """VarGrad (Adebayo et al. 2018; Captum NoiseTunnel's ``vargrad``): the variance of the
    gradient over noisy copies, ``mean(g**2) - mean(g)**2``, from :func:`smoothgrad`'s draws.

    The population variance (divided by ``samples``), as Captum's. Both moments come from the same
    vectorized backward.

    Arguments:
        model, inputs, targets and the common options: as :func:`attrax.saliency` (no ``abs``).
        samples: noisy copies, at least 2 (default 20); noise: the noise level, above 0
            (default 0.1); seed: the random seed. Drawn as :func:`smoothgrad`'s.

    Returns:
        DataArray ``([example,] target, source, hidden)`` of gradient variances;
        ``([example,] target, source)`` with ``reduce_hidden``; ``layer`` after ``source`` with
        ``layers``.

    >>> import attrax as ax
    >>> ax.vargrad(ax.load_model(), "1 2 3 =", " 3 2 1", samples=4).attrs["method"]
    'vargrad'
    """
    return Rule(
        *_noisy_copies(problem, samples, noise, seed),
        moments=(1, 2),
        transform=lambda mean, square: square - mean**2,
    )


def _noisy_copies(
    problem: Problem, samples: int, noise: float, seed: int
) -> tuple[PointFn, torch.Tensor]:
    """SmoothGrad's points (noisy copies of the embeddings) and their equal weights."""
    x = problem.inputs
    size = sum(xi.numel() * xi.element_size() for xi in x)
    problem.hold(
        samples * size, "samples", samples, "its noise (a copy of the embeddings per sample)"
    )
    draws = tuple(_noise(xi, problem, side, samples, seed) for side, xi in enumerate(x))
    sigma = tuple(_spread(xi, problem, i) * noise for i, xi in enumerate(x))

    def points(chunk: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(
            xi[None] + si[None] * di[chunk] for xi, si, di in zip(x, sigma, draws, strict=True)
        )

    return points, torch.full((samples,), 1.0 / samples, dtype=torch.float64)


@GRADIENT.method(
    samples=check.positive_int,
    stdevs=check.non_negative,
    seed=check.seed,
    baselines=check.baselines,
)
def gradient_shap(
    problem: Problem,
    *,
    baselines: Baselines = ("zeros", "pad"),
    samples: int = 5,
    stdevs: float = 0.0,
    seed: int = 0,
) -> Rule:
    """GradientSHAP (Lundberg & Lee 2017; Captum's ``GradientShap``): expected gradients over
    random baselines, random points on the path and Gaussian noise on the input.

    ``mean_i (x + e_i - b_i) * grad f(b_i + a_i (x + e_i - b_i))`` over ``samples`` draws of a
    baseline ``b_i`` (uniformly from ``baselines``), ``a_i ~ U[0, 1]`` and ``e_i ~ N(0, stdevs^2)``
    (absolute, as Captum's; SmoothGrad's noise is relative). Each example draws from its own CPU
    generator seeded with ``seed``: ``torch.randint(len(baselines), (samples,))``, then
    ``torch.rand(samples)``, then ``torch.randn(samples, length, hidden)`` per attributed side
    (its real tokens), all in float32 (then cast to the embeddings' dtype); so batched equals
    single, and one seed draws the same whatever the model's dtype.

    Arguments (others as :func:`saliency`):
        baselines: the baselines to draw from: a list (or tuple) of baselines as
            :func:`integrated_gradients` takes them (``"zeros"``, ``"pad"``, ``"unk"``, a tensor,
            a tuple of tensors per side), or one of them (with both sides attributed, a lone
            tuple of one tensor per side is one baseline). Default: zeros and the pad embedding.
        samples: draws (points); stdevs: the noise's standard deviation; seed: the random seed.

    Returns:
        DataArray ``(target, source, hidden)``. In expectation each target's sum is
        ``E f(x + e) - E f(b)``; with few samples it is not (no ``completeness_gap``).

    >>> import attrax as ax
    >>> ax.gradient_shap(ax.load_model(), "1 2 3 =", " 3 2 1", samples=4).dims
    ('target', 'source', 'hidden')
    """
    x = problem.inputs
    given = as_baseline_list(baselines, len(x))
    bases = [baseline_embeddings(problem, b) for b in given]
    stacked = tuple(torch.stack(side) for side in zip(*bases, strict=True))  # [N_b, B, L, H]
    index, alpha, noise = _shap_draws(problem, len(given), samples, seed)
    batch = torch.arange(x[0].shape[0], device=x[0].device)

    def deltas(chunk: torch.Tensor) -> tuple[torch.Tensor, ...]:
        picked = index[chunk]  # [n, B]
        return tuple(
            xi[None] + stdevs * ni[chunk] - bi[picked, batch[None]]
            for xi, ni, bi in zip(x, noise, stacked, strict=True)
        )

    def points(chunk: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = alpha[chunk][..., None, None]  # [n, B, 1, 1]
        picked = index[chunk]
        return tuple(
            bi[picked, batch[None]] + a * di for bi, di in zip(stacked, deltas(chunk), strict=True)
        )

    def origins(chunk: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(bi[index[chunk], batch[None]] for bi in stacked)

    weights = torch.full((samples,), 1.0 / samples, dtype=torch.float64)
    return Rule(points, weights, multiplier=deltas, origins=origins)


def as_baseline_list(baselines: Baselines, sides: int) -> list[Baseline]:
    """The baselines given, as a list; a tuple of one tensor per attributed side (``sides``) is
    one baseline: with two sides a lone tensor is no baseline, so it cannot mean two."""
    per_side = isinstance(baselines, tuple) and all(isinstance(b, torch.Tensor) for b in baselines)
    if per_side and sides > 1 and len(baselines) == sides:
        return [cast(tuple[torch.Tensor, ...], baselines)]  # per_side: a tuple of tensors
    if isinstance(baselines, (list, tuple)):
        return list(baselines)
    return [baselines]


def _shap_draws(
    problem: Problem, n_baselines: int, samples: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Baseline indices ``[samples, B]``, alphas ``[samples, B]`` and standard normal noise
    ``[samples, B, L, H]`` per side, each example's from its own generator (see gradient_shap)."""
    x = problem.inputs
    batch = x[0].shape[0]
    size = sum(xi.numel() * xi.element_size() for xi in x) + batch * (8 + x[0].element_size())
    problem.hold(
        samples * size, "samples", samples, "its draws (a copy of the embeddings per sample)"
    )
    index = torch.zeros((samples, batch), dtype=torch.long)
    alpha = torch.zeros((samples, batch), dtype=x[0].dtype)
    noise = tuple(torch.zeros((samples, *xi.shape), dtype=xi.dtype) for xi in x)
    lengths = [problem.lengths(side) for side in range(len(x))]
    for b in range(batch):  # per example: its draws do not depend on the batch
        generator = torch.Generator().manual_seed(seed)
        index[:, b] = torch.randint(n_baselines, (samples,), generator=generator)
        alpha[:, b] = torch.rand(samples, generator=generator, dtype=DRAWS)
        for side, xi in enumerate(x):
            shape = (samples, lengths[side][b], xi.shape[-1])
            noise[side][:, b, : shape[1]] = torch.randn(shape, generator=generator, dtype=DRAWS)
    device = x[0].device
    return index.to(device), alpha.to(device), tuple(n.to(device) for n in noise)


def quadrature_nodes(quadrature: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Points in [0, 1] and weights summing to 1 for integrating along the IG path."""
    k = np.arange(steps, dtype=np.float64)
    if quadrature == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return (nodes + 1) / 2, weights / 2
    if quadrature == "riemann_trapezoid":
        weights = np.full(steps, 1.0 / (steps - 1))
        weights[[0, -1]] /= 2
        return k / (steps - 1), weights
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[quadrature]
    return (k + offset) / steps, np.full(steps, 1.0 / steps)


def _noise(x: torch.Tensor, problem: Problem, side: int, samples: int, seed: int) -> torch.Tensor:
    """Standard normal draws ``[samples, B, L, H]``; each example's come from its own generator.

    Seeding per example with ``seed`` makes an example's noise independent of the batch it is in
    (batched equals single); drawing on the CPU makes it independent of the device.
    """
    lengths = problem.lengths(side)
    out = torch.zeros((samples, *x.shape), dtype=x.dtype)
    for b, length in enumerate(lengths):
        generator = torch.Generator().manual_seed(seed)
        shape = (samples, length, x.shape[-1])
        out[:, b, :length] = torch.randn(shape, generator=generator, dtype=DRAWS)
    return out.to(x.device)


def _spread(x: torch.Tensor, problem: Problem, side: int) -> torch.Tensor:
    """Per-example ``max - min`` of the real (unpadded) embeddings, shaped to broadcast."""
    mask = problem.side_mask(side).bool()[..., None]
    high = x.masked_fill(~mask, -torch.inf).amax(dim=(1, 2))
    low = x.masked_fill(~mask, torch.inf).amin(dim=(1, 2))
    return (high - low).view(-1, 1, 1)
