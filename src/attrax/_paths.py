"""Path methods beyond the straight line: sequential and guided integrated gradients.

- :func:`sequential_integrated_gradients` (Enguehard 2023) runs integrated gradients once per
  source token, moving only that token from its baseline while the others stay: a gradient method
  (a :class:`Rule` whose weights select, for each point, the one token it moves), so every token
  and step goes through the engine as one vectorized batch of points.
- :func:`guided_integrated_gradients` (Kapishnikov et al. 2021) follows an adaptive path that
  first moves the features with the smallest absolute gradient. The path depends on the target,
  so each target walks its own: at every step the ``K`` current points go through one forward of
  ``K`` stacked copies of the batch and one backward in which copy ``k`` carries target ``k``'s
  objective only.
"""

from __future__ import annotations

from typing import Any

import torch
import xarray as xr

from . import _validate as check
from ._engine import Problem, all_finite, baseline_embeddings, vjp
from ._errors import InputError, OptionError
from ._gradients import (
    GRADIENT,
    PATH_CHECKS,
    REDUCE_HIDDEN,
    Rule,
    check_quadrature_steps,
    quadrature_nodes,
    refuse_layers,
)
from ._memory import Size
from ._protocol import COMMON, Call, Family, own_options

# PAIR saliency's tolerance for "the path reached this step's L1 distance"
_CLOSE = 1e-9


@GRADIENT.method(
    refuse_layers(
        "sequential_integrated_gradients",
        "its paths move one source token at a time, which no layer has",
        check_quadrature_steps,
    ),
    **PATH_CHECKS,
)
def sequential_integrated_gradients(
    problem: Problem,
    *,
    steps: int = 50,
    quadrature: str = "gausslegendre",
    baseline: str | torch.Tensor | tuple[torch.Tensor, ...] = "pad",
) -> Rule:
    """Sequential integrated gradients (Enguehard 2023): integrated gradients per source token.

    For token ``i``: ``(x_i - x'_i) * integral_0^1 grad_i f(x with x_i -> x'_i + a (x_i - x'_i)) da``,
    every other token kept at its value. Summed over ``hidden``, token ``i``'s attribution is
    ``f(x) - f(x with token i at its baseline)`` up to the quadrature error. Inseq's
    ``sequential_integrated_gradients`` computes the same (with its unk/EOS baseline).

    Cost: ``L * steps`` points (``L`` source tokens, both sides with ``attribute_target``), each
    a forward, with one vectorized backward per chunk of targets: ``L`` times integrated gradients.

    Arguments (others as :func:`saliency`):
        steps: quadrature points per token.
        quadrature: ``riemann_left|right|middle|trapezoid`` or ``gausslegendre``.
        baseline: where the moving token starts: ``"pad"`` (default, the paper's), ``"unk"``,
            ``"zeros"`` or a tensor broadcastable to the embeddings ``[B, L, H]``.
        batch_size: points per forward: None all at once, ``"auto"`` (default) as many as fit.

    Returns:
        DataArray ``([example,] target, source, hidden)``; ``([example,] target, source)`` with
        ``reduce_hidden``. No ``completeness_gap`` (each token has its own path); ``layers`` is
        refused.

    >>> import attrax as ax
    >>> da = ax.sequential_integrated_gradients(ax.load_model(), "1 2 =", " 2 1", steps=4)
    >>> da.dims
    ('target', 'source', 'hidden')
    """
    alphas, weights = quadrature_nodes(quadrature, steps)
    x = problem.inputs
    base = baseline_embeddings(problem, baseline)
    delta = tuple(xi - bi for xi, bi in zip(x, base, strict=True))
    widths = [xi.shape[1] for xi in x]
    tokens = sum(widths)
    device = x[0].device
    alpha = torch.as_tensor(alphas, dtype=x[0].dtype, device=device)
    columns = torch.arange(tokens, device=device)

    def moving(chunk: torch.Tensor) -> torch.Tensor:
        """``[n, L]``: point ``n`` moves token ``n // steps`` (sides concatenated)."""
        return columns[None, :] == (chunk.to(device) // steps)[:, None]

    def points(chunk: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # x' + a (x - x') = x - (1 - a) (x - x') on the moving token, x elsewhere
        back = (1 - alpha[chunk.to(device) % steps]).view(-1, 1, 1, 1)
        sides = moving(chunk).split(widths, dim=-1)
        return tuple(
            xi[None] - back * m[:, None, :, None].to(xi.dtype) * di[None]
            for xi, di, m in zip(x, delta, sides, strict=True)
        )

    every = torch.arange(tokens * steps)
    quad = torch.as_tensor(weights)[every % steps]
    per_token = quad[:, None] * moving(every).cpu().to(quad.dtype)
    return Rule(points, per_token, multiplier=delta)


def _run_guided(core: Any, call: Call, arguments: dict[str, Any]) -> xr.DataArray:
    o = call.options
    problem = call.problem
    attributions, reference = core(problem, o["chunk_size"], **own_options(core, arguments))
    if not all_finite(*attributions):
        raise InputError(
            f"{call.method}: the gradients are not finite (inf/NaN); check the model's dtype "
            "and inputs"
        )
    total = sum(v.sum(dim=(2, 3)) for v in attributions)
    ends = problem.evaluate(
        tuple(torch.stack([xi, ri]) for xi, ri in zip(problem.inputs, reference, strict=True))
    )
    gap = {"completeness_gap": total - (ends[0] - ends[1])}
    reduce_hidden = o["reduce_hidden"]
    if reduce_hidden:
        reduce = torch.linalg.vector_norm if reduce_hidden == "l2_norm" else torch.sum
        attributions = tuple(reduce(v, dim=-1) for v in attributions)
    da = call.label(attributions, trailing=() if reduce_hidden else ("hidden",), target_coords=gap)
    if reduce_hidden:
        da.attrs["reductions"] = f"{reduce_hidden}(hidden)"
    return da


#: Guided IG: every common parameter, plus ``reduce_hidden``; its paths are its own.
GUIDED_PATH = Family(
    name="gradient",
    differentiates=True,
    takes=tuple(n for n in COMMON if n != "batch_size"),
    refuses={
        "batch_size": "guided IG evaluates one point per target per step; `chunk_size` (targets "
        "per step) bounds its memory",
        "mode": "each target's path is its own: there is no forward-mode variant",
        "layers": "its paths are chosen in the embedding space, per target; no layer variant "
        "(use integrated_gradients(..., layers=...))",
    },
    run=_run_guided,
    extra={"reduce_hidden": REDUCE_HIDDEN},
)


def _fraction(value: object, name: str) -> None:
    check.positive(value, name)
    if value > 1:  # type: ignore[operator]
        raise OptionError(f"`{name}` must be in (0, 1], got {value!r}")


def _max_dist(value: object, name: str) -> None:
    check.non_negative(value, name)
    if value > 1:  # type: ignore[operator]
        raise OptionError(f"`{name}` must be in [0, 1], got {value!r}")


@GUIDED_PATH.method(
    steps=check.positive_int, fraction=_fraction, max_dist=_max_dist, baseline=check.baseline
)
def guided_integrated_gradients(
    problem: Problem,
    chunk_size: Size = None,
    /,
    *,
    steps: int = 200,
    fraction: float = 0.25,
    max_dist: float = 0.02,
    baseline: str | torch.Tensor | tuple[torch.Tensor, ...] = "pad",
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Guided integrated gradients (Kapishnikov et al. 2021): an adaptive path per target.

    The path starts at the baseline and, at each of ``steps`` steps, closes ``1 / steps`` of the L1
    distance to the input by moving the ``fraction`` of features with the smallest absolute
    gradient (repeatedly, until the step's distance is covered), no feature straying more than
    ``max_dist`` (in path fraction) from the straight line. The attribution of a feature is the
    sum of its moves times the gradient where the move started, so the attributions add up to
    ``f(x) - f(x')`` (the ``completeness_gap`` coordinate). PAIR saliency's algorithm, run in
    float64; features are the hidden units of every real source token (both sides with
    ``attribute_target``), padding excluded.

    Cost: the path depends on the target, so each target has its own: every step runs one
    forward and one backward of ``K`` stacked copies of the batch (``K`` targets; ``chunk_size``
    targets at a time), ``steps`` times: about ``K`` times the forwards of integrated gradients with
    as many steps, and ``O(K * B * L * H)`` float64 path state.

    Arguments (others as :func:`saliency`):
        steps: path steps (gradient evaluations per target; the paper's 200 by default).
        fraction: the share of features moved at a time (PAIR's 0.25).
        max_dist: how far ahead of or behind the straight path (in path fraction) a feature may
            go (PAIR's 0.02).
        baseline: ``"pad"`` (default), ``"unk"``, ``"zeros"`` or a tensor as for
            :func:`integrated_gradients`. The path starts *at* the baseline and takes a gradient
            there: at ``"zeros"`` a model's first norm divides by ``sqrt(eps)`` (RMSNorm: Llama,
            T5), so the first step's gradients are huge; PAIR's images used zeros.

    Returns:
        DataArray ``(target, source, hidden)`` with a ``completeness_gap`` coordinate along
        ``target``.

    >>> import attrax as ax
    >>> da = ax.guided_integrated_gradients(ax.load_model(), "1 2 =", " 2 1", steps=8)
    >>> "completeness_gap" in da.coords
    True
    """
    x = problem.inputs
    base = baseline_embeddings(problem, baseline)
    t = problem.tensors
    width = t.valid.shape[1]
    sizes = [xi.shape[1] * xi.shape[2] for xi in x]
    masks = [problem.side_mask(s).bool()[..., None].expand_as(xi) for s, xi in enumerate(x)]
    real = torch.cat([m.flatten(1) for m in masks], dim=1)  # [B, F]
    target = torch.cat([xi.flatten(1) for xi in x], dim=1).double()
    # padding never moves: its baseline is the input
    start = torch.where(real, torch.cat([b.flatten(1) for b in base], dim=1).double(), target)
    _, chunk = problem.plan(1, None, chunk_size, copies=True)
    step = width if chunk is None else chunk
    parts = []
    for first in range(0, width, step):  # chunking only: bounds memory
        slots = slice(first, min(first + step, width))
        parts.append(_guided_paths(problem, slots, start, target, real, steps, fraction, max_dist))
    flat = torch.cat(parts, dim=1).to(x[0].dtype)  # [B, K, F]
    sides = tuple(
        f.unflatten(-1, xi.shape[1:]) for f, xi in zip(flat.split(sizes, -1), x, strict=True)
    )
    return sides, base


def _guided_paths(
    problem: Problem,
    slots: slice,
    start: torch.Tensor,
    target: torch.Tensor,
    real: torch.Tensor,
    steps: int,
    fraction: float,
    max_dist: float,
) -> torch.Tensor:
    """Attributions ``[B, k, F]`` of the targets in ``slots``, each along its own guided path."""
    valid = problem.tensors.valid[:, slots]  # [B, k]
    k = valid.shape[1]
    delta = target - start
    moves = delta != 0
    l1_total = (target - start).abs().sum(-1)  # [B]
    counts = real.sum(-1)  # features per example, for its quantile
    x = start[None].repeat(k, 1, 1)  # [k, B, F]: each target's point
    attr = torch.zeros_like(x)
    gradient = _per_target_gradients(problem, slots)
    for s in range(steps):  # the path depends on the last step's gradients
        grad_actual = gradient(x)
        if not all_finite(grad_actual):  # NaN selects no feature: the loop below would not end
            raise InputError(
                "guided_integrated_gradients: the gradients are not finite (inf/NaN); check the "
                "model's dtype and inputs"
            )
        grad = grad_actual.clone()
        alpha = (s + 1.0) / steps
        alpha_min, alpha_max = max(alpha - max_dist, 0.0), min(alpha + max_dist, 1.0)
        x_min, x_max = start + delta * alpha_min, start + delta * alpha_max
        l1_target = l1_total * (1 - (s + 1) / steps)
        active = valid.T.clone()  # [k, B]
        while bool(active.any()):  # PAIR's inner loop, for every (target, example) at once
            x_old = x
            x_alpha = torch.where(moves, (x - start) / torch.where(moves, delta, 1.0), alpha_max)
            behind = (x_alpha < alpha_min) & active[..., None]
            x = torch.where(behind, x_min.expand_as(x), x)
            l1_current = (x - target).abs().sum(-1)
            close = (l1_current - l1_target).abs() <= _CLOSE * torch.maximum(
                torch.maximum(l1_current.abs(), l1_target.abs()), torch.ones_like(l1_current)
            )
            grad = torch.where(x == x_max, torch.inf, grad)
            magnitude = torch.where(real, grad.abs(), torch.inf)
            index = torch.floor(fraction * (counts - 1).double()).long()  # numpy's "lower"
            ordered = magnitude.sort(dim=-1).values
            threshold = ordered.gather(-1, index.view(1, -1, 1).expand(k, -1, 1))
            chosen = (grad.abs() <= threshold) & (grad != torch.inf) & real
            l1_s = ((x - x_max).abs() * chosen).sum(-1)
            gamma = torch.where(
                l1_s > 0, (l1_current - l1_target) / torch.where(l1_s > 0, l1_s, 1.0), torch.inf
            )
            full = gamma > 1.0
            g = torch.where(full, 1.0, gamma)[..., None]
            moved = torch.where(chosen, x + (x_max - x) * g, x)
            moved = torch.where(chosen & full[..., None], x_max.expand_as(x), moved)
            x = torch.where((active & ~close)[..., None], moved, x)
            attr = attr + (x - x_old) * grad_actual * active[..., None]
            # a row that moved nothing would repeat itself forever
            active = active & ~close & full & (x != x_old).any(-1)
    return attr.transpose(0, 1)


def _per_target_gradients(problem: Problem, slots: slice) -> Any:
    """``grad(points [k, B, F]) -> [k, B, F]``: target ``slots[i]``'s gradient at point ``i``.

    The ``k`` points go through the model as ``k`` stacked copies of the batch, copy ``i``
    scoring target ``i`` alone, so one backward gives every target at its own point.
    """
    x = problem.inputs
    k = problem.tensors.valid[:, slots].shape[1]
    hidden = problem.hidden_fn(1, slots, own=True)
    sizes = [xi.shape[1] * xi.shape[2] for xi in x]
    cotangent = problem.tensors.valid[:, slots].T.reshape(-1, 1).to(x[0].dtype)  # [k * B, 1]

    def gradient(points: torch.Tensor) -> torch.Tensor:
        flat = points.to(x[0].dtype).split(sizes, dim=-1)
        embeds = [
            p.flatten(0, 1).unflatten(-1, xi.shape[1:]) for p, xi in zip(flat, x, strict=True)
        ]

        def f(*e: torch.Tensor) -> torch.Tensor:
            return problem.head_objective(hidden(*e), slots, own=True)

        _, pullback = vjp(f, *embeds)
        grads = pullback(cotangent)
        return torch.cat([g.unflatten(0, (k, -1)).flatten(2) for g in grads], dim=-1).double()

    return gradient


__all__ = ["guided_integrated_gradients", "sequential_integrated_gradients"]
