"""Greedy PIG (Axiotis et al. 2023, "Greedy PIG: Adaptive Integrated Gradients").

Integrated gradients in rounds: after each round the tokens with the largest attribution so far
are *fixed* (their baseline becomes their input value, so they leave the path) and the others are
attributed again from that new baseline. Which tokens are fixed depends on the target, so from the
second round on every target has its own baseline: each step's ``K`` points (one per target) go
through one forward of ``K x n`` stacked copies of the batch (``n`` quadrature nodes) and one
backward in which copy ``(k, i)`` carries target ``k``'s objective only, as guided IG's paths do.
The first round, whose baseline all targets share, is integrated gradients on the engine.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import xarray as xr

from . import _validate as check
from ._engine import Problem, all_finite, vjp
from ._errors import InputError
from ._gradients import (
    PATH_CHECKS,
    REDUCE_HIDDEN,
    check_quadrature_steps,
    quadrature_nodes,
    straight_path,
)
from ._memory import Size, at_least_float32
from ._protocol import COMMON, Call, Family, own_options


def _run_greedy(core: Any, call: Call, arguments: dict[str, Any]) -> xr.DataArray:
    o = call.options
    problem = call.problem
    attributions, gap = core(
        problem, o["chunk_size"], o["batch_size"], **own_options(core, arguments)
    )
    if not all_finite(*attributions):
        raise InputError(
            f"{call.method}: the gradients are not finite (inf/NaN); check the model's dtype "
            "and inputs"
        )
    reduce_hidden = o["reduce_hidden"]
    if reduce_hidden:
        reduce = torch.linalg.vector_norm if reduce_hidden == "l2_norm" else torch.sum
        attributions = tuple(reduce(v, dim=-1) for v in attributions)
    da = call.label(
        attributions,
        trailing=() if reduce_hidden else ("hidden",),
        target_coords={"completeness_gap": gap},
    )
    if reduce_hidden:
        da.attrs["reductions"] = f"{reduce_hidden}(hidden)"
    return da


#: Greedy PIG: every common parameter, plus ``reduce_hidden``; its rounds are its own.
GREEDY_PATH = Family(
    name="gradient",
    differentiates=True,
    takes=tuple(COMMON),
    refuses={"mode": "each target's baseline is its own after the first round: reverse mode only"},
    run=_run_greedy,
    extra={"reduce_hidden": REDUCE_HIDDEN},
)


@GREEDY_PATH.method(
    check_quadrature_steps, rounds=check.positive_int, per_round=check.positive_int, **PATH_CHECKS
)
def greedy_pig(
    problem: Problem,
    chunk_size: Size = None,
    batch_size: Size = None,
    /,
    *,
    rounds: int = 4,
    per_round: int = 1,
    steps: int = 50,
    quadrature: str = "gausslegendre",
    baseline: str | torch.Tensor | tuple[torch.Tensor, ...] = "zeros",
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Greedy PIG (Axiotis et al. 2023): integrated gradients in rounds, fixing the top tokens.

    Per target ``k``: ``S`` starts empty; each round ``r`` runs integrated gradients from the
    baseline ``b_r`` (the input on the tokens of ``S``, ``baseline`` elsewhere) to the input,
    ``a_r = (x - b_r) * integral_0^1 grad f_k(b_r + a (x - b_r)) da`` (zero on ``S``: those
    tokens do not move), then adds to ``S`` the ``per_round`` tokens not in ``S`` with the largest
    signed token attribution ``sum_hidden a_r`` among those target ``k`` can see. The result is the
    sum of every round's attributions, ``a_1 + ... + a_rounds``: a token fixed in round ``r`` keeps
    what it earned up to round ``r``. With ``rounds=1`` this is :func:`integrated_gradients`.
    Each round is complete on its own (``sum a_r = f(x) - f(b_r)``), so the ``completeness_gap``
    coordinate is ``sum(result) - sum_r (f(x) - f(b_r))``.

    Cost: the first round is :func:`integrated_gradients` (its baseline is every target's). After
    it each target has its own baseline: ``(rounds - 1) * steps`` points per target, each a
    forward and a backward of its own copy of the batch, about ``K`` times the forwards of as many
    integrated-gradients steps (``K`` targets) and the same backwards.

    Arguments (others as :func:`saliency`):
        rounds: integrated-gradients rounds (the loop over rounds is sequential: a round's
            baseline depends on the last round's attributions).
        per_round: tokens fixed after each round.
        steps, quadrature, baseline: each round's path integral, as :func:`integrated_gradients`.
        chunk_size: targets per forward; batch_size: quadrature nodes per forward.

    Returns:
        DataArray ``(target, source, hidden)`` with a ``completeness_gap`` coordinate along
        ``target``.

    >>> import attrax as ax
    >>> da = ax.greedy_pig(ax.load_model(), "1 2 3 =", " 3 2 1", rounds=2, steps=8)
    >>> da.dims
    ('target', 'source', 'hidden')
    """
    alphas, weights = quadrature_nodes(quadrature, steps)
    x = problem.inputs
    # the first round's baseline is every target's: integrated gradients on the shared engine
    path = straight_path(problem, baseline, alphas)
    base, alpha, delta = path.base, path.alpha, path.delta
    width = problem.tensors.valid.shape[1]
    # the later rounds run every (target, node) as a copy of its own
    nodes, chunk = problem.plan(steps, batch_size, chunk_size, copies=True)
    nodes = steps if nodes is None else nodes
    step = width if chunk is None else chunk
    weight = torch.as_tensor(weights, dtype=at_least_float32(x[0].dtype), device=x[0].device)
    at_input = problem.evaluate(tuple(xi[None] for xi in x))[0]  # [B, K]
    ((grads,), _) = problem.gradient_sum_with_hidden(
        path.points, torch.as_tensor(weights), batch_size=batch_size, chunk_size=chunk_size
    )
    first_round = tuple(g * d[:, None].to(g.dtype) for g, d in zip(grads, delta, strict=True))
    parts, gaps = [], []
    for first in range(0, width, step):  # chunking only: bounds memory
        slots = slice(first, min(first + step, width))
        opening = tuple(a[:, slots].transpose(0, 1) for a in first_round)  # [k, B, L, H]
        attr, gap = _greedy_rounds(
            problem,
            slots,
            base,
            alpha,
            weight,
            nodes,
            rounds,
            per_round,
            at_input[:, slots],
            opening,
        )
        parts.append(attr)
        gaps.append(gap)
    sides = tuple(torch.cat(side, dim=1).to(x[0].dtype) for side in zip(*parts, strict=True))
    return sides, torch.cat(gaps, dim=1)


def _greedy_rounds(
    problem: Problem,
    slots: slice,
    base: tuple[torch.Tensor, ...],
    alpha: torch.Tensor,
    weight: torch.Tensor,
    nodes: int,
    rounds: int,
    per_round: int,
    at_input: torch.Tensor,
    opening: tuple[torch.Tensor, ...],
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Attributions ``[B, k, L, H]`` per side and completeness gaps ``[B, k]`` of the targets
    in ``slots``, each with its own fixed set; ``opening`` is the first round's ``[k, B, L, H]``."""
    x = problem.inputs
    widths = [xi.shape[1] for xi in x]
    visible = problem.visible()[:, slots]  # [B, k, L]
    k = visible.shape[1]
    acc = weight.dtype
    selected = torch.zeros_like(visible)
    total = [xi.new_zeros(k, *xi.shape, dtype=acc) for xi in x]  # [k, B, L, H]
    gap = at_input.new_zeros(at_input.shape, dtype=acc)
    for r in range(rounds):  # sequential: each round's baselines follow the last one's choice
        fixed = selected.transpose(0, 1).split(widths, dim=-1)  # [k, B, L] per side
        starts = tuple(
            torch.where(m[..., None], xi[None], bi[None])
            for m, xi, bi in zip(fixed, x, base, strict=True)
        )
        if r == 0:
            round_attr = [o.to(acc) for o in opening]
        else:
            round_attr = _round(problem, slots, starts, alpha, weight, nodes)
        for side, part in enumerate(round_attr):
            total[side] += part
        # completeness of this round: its sum against f(x) - f(b_r), per target at its baseline
        ends = problem.evaluate(starts)[:, :, slots]  # [k, B, k]
        at_start = torch.diagonal(ends, dim1=0, dim2=2)  # [B, k]
        # a part per side, never none: the sum is a tensor, not sum's start of 0
        summed = cast(torch.Tensor, sum(part.sum(dim=(2, 3)) for part in round_attr)).T  # [B, k]
        gap += summed - (at_input - at_start).to(acc)
        if r == rounds - 1:
            break
        # the next round fixes each target's top tokens among those it sees and has not fixed
        score = torch.cat([part.sum(-1) for part in round_attr], dim=-1)  # [k, B, L]
        candidates = visible & ~selected
        ranked = score.transpose(0, 1).masked_fill(~candidates, -torch.inf)
        top = ranked.topk(min(per_round, ranked.shape[-1]), dim=-1).indices
        chosen = torch.zeros_like(selected).scatter(-1, top, True) & candidates
        selected = selected | chosen
    return tuple(t.transpose(0, 1) for t in total), gap


def _round(
    problem: Problem,
    slots: slice,
    starts: tuple[torch.Tensor, ...],
    alpha: torch.Tensor,
    weight: torch.Tensor,
    nodes: int,
) -> list[torch.Tensor]:
    """Integrated gradients ``[k, B, L, H]`` per side of each target in ``slots`` from its own
    baseline ``starts[side][j]``, ``nodes`` quadrature nodes per forward."""
    x = problem.inputs
    delta = tuple(xi[None] - si for xi, si in zip(x, starts, strict=True))
    grads = [torch.zeros_like(d, dtype=weight.dtype) for d in delta]
    steps = alpha.shape[0]
    for first in range(0, steps, nodes):  # chunking only: bounds memory
        a = alpha[first : first + nodes]
        n = a.shape[0]
        points = tuple(
            si[:, None] + a.view(1, n, 1, 1, 1) * di[:, None]
            for si, di in zip(starts, delta, strict=True)
        )
        for side, g in enumerate(_diagonal_gradients(problem, slots, n)(points)):
            grads[side] += torch.einsum(
                "knblh,n->kblh", g.to(weight.dtype), weight[first : first + n]
            )
    return [g * d.to(weight.dtype) for g, d in zip(grads, delta, strict=True)]


def _diagonal_gradients(problem: Problem, slots: slice, n: int) -> Any:
    """``grad(points) -> gradients``, per side ``[k, n, B, L, H]``: target ``slots[j]``'s gradient
    at its own points ``points[j, i]``.

    The ``k * n`` points go through the model as stacked copies of the batch, copy ``(j, i)``
    scoring target ``j`` alone, so one backward gives every target at its points.
    """
    x = problem.inputs
    valid = problem.tensors.valid[:, slots].to(x[0].dtype)  # [B, k]
    k = valid.shape[1]
    hidden = problem.hidden_fn(n, slots, own=True)
    cotangent = valid.T[:, None].expand(k, n, -1).reshape(-1, 1)  # copy (j, i, b)

    def gradient(points: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        embeds = [p.flatten(0, 2) for p in points]

        def f(*e: torch.Tensor) -> torch.Tensor:
            return problem.head_objective(hidden(*e), slots, own=True)

        _, pullback = vjp(f, *embeds)
        return tuple(g.unflatten(0, (k, n, -1)) for g in pullback(cotangent))

    return gradient


__all__ = ["greedy_pig"]
