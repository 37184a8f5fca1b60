"""Adversarial robustness per token: projected gradient descent (Madry et al. 2018) on one source
token's embedding at a time, as Yin et al. (2022, "On the Sensitivity and Stability of Model
Interpretations in NLP") use it to measure how sensitive a prediction is to a token.

Every (target, token) pair runs its own attack: a step's ``K x L`` perturbed copies of the batch
(copy ``(k, s)`` moves token ``s`` only) go through one forward and one backward in which copy
``(k, s)`` carries target ``k``'s objective only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import xarray as xr

from . import _validate as check
from ._engine import DRAWS, Problem, all_finite
from ._errors import InputError, OptionError
from ._memory import Size
from ._protocol import COMMON, Call, Family, own_options

NORMS = ("l2", "linf")
# a zero gradient (a token the target cannot see) must not divide by zero
_TINY = 1e-30


def _run(core: Any, call: Call, arguments: dict[str, Any]) -> xr.DataArray:
    o = call.options
    problem = call.problem
    values = core(problem, o["chunk_size"], o["batch_size"], **own_options(core, arguments))
    if not all_finite(values):
        raise InputError(
            f"{call.method}: the objective values are not finite (inf/NaN); check the model's "
            "dtype and inputs"
        )
    widths = [x.shape[1] for x in problem.inputs]
    sides = values.to(problem.inputs[0].dtype).split(widths, dim=-1)
    return call.label(sides, trailing=())


#: PGD: every common parameter; the attack is its own.
ADVERSARIAL = Family(
    name="adversarial", takes=tuple(COMMON), refuses={}, run=_run, differentiates=True
)


def _step_size(value: object, name: str) -> None:
    if value is not None:
        check.positive(value, name)


def _seed(value: object, name: str) -> None:
    if value is not None:
        check.seed(value, name)


def _finite_epsilon(value: object, name: str) -> None:
    check.positive(value, name)
    if not math.isfinite(value):  # type: ignore[arg-type]
        raise OptionError(f"`{name}` must be finite, got {value!r}")


@ADVERSARIAL.method(
    epsilon=_finite_epsilon,
    steps=check.positive_int,
    step_size=_step_size,
    norm=check.one_of(*NORMS),
    seed=_seed,
)
def pgd(
    problem: Problem,
    chunk_size: Size = None,
    batch_size: Size = None,
    /,
    *,
    epsilon: float = 1.0,
    steps: int = 10,
    step_size: float | None = None,
    norm: str = "l2",
    seed: int | None = None,
) -> torch.Tensor:
    """How far PGD can push each target's objective down by perturbing one source token's
    embedding within an ``epsilon``-ball (Madry et al. 2018; Yin et al. 2022).

    For target ``k`` and source token ``s``: ``f_k(x) - f_k(x + d e_s)``, where ``d`` (a vector
    in the embedding space of token ``s`` only) is the iterate after ``steps`` projected gradient
    steps minimizing ``f_k(x + d e_s)`` subject to ``||d|| <= epsilon``: ``d <- P(d - step_size *
    g / ||g||_2)`` for ``norm="l2"``, ``d <- clip(d - step_size * sign(g), -epsilon, epsilon)``
    for ``"linf"`` (``g`` the gradient, ``P`` the projection on the ball). ``d`` starts at 0, or,
    with a ``seed``, uniformly in the ball. Signed: positive where the token's neighbourhood holds
    a lower objective; large values mark tokens the prediction is not robust to. ``epsilon`` is
    absolute (in the embedding's units; compare it with the embeddings' norms).

    Yin et al. define the *sensitivity* of a token set as the smallest radius of a perturbation
    of those tokens that changes the prediction, found by PGD. This is its fixed-budget form for
    every single-token set: the objective drop at radius ``epsilon`` rather than the radius at
    which the prediction flips.

    Cost: ``steps`` forwards and backwards of ``K x L`` copies of the batch (``K`` targets, ``L``
    source tokens; ``chunk_size`` targets and ``batch_size`` tokens at a time), plus one forward
    of ``K x L`` copies for the final objective.

    Arguments (others as :func:`saliency`):
        epsilon: the radius of the ball (absolute); steps: PGD steps;
        step_size: the step length (default ``2.5 * epsilon / steps``, Madry et al.'s rule);
        norm: ``"l2"`` or ``"linf"``; seed: None starts every attack at 0, an integer starts it
            at a uniform draw in the ball from a CPU generator seeded per example, in float32
            whatever the model's dtype (batched equals single).
        chunk_size: targets per forward; batch_size: source tokens per forward.

    Returns:
        DataArray ``(target, source)``, with ``example`` first for a list of inputs.

    >>> import attrax as ax
    >>> ax.pgd(ax.load_model(), "1 2 3 =", " 3 2 1", steps=4).dims
    ('target', 'source')
    """
    x = problem.inputs
    eta = 2.5 * epsilon / steps if step_size is None else step_size
    width = problem.tensors.valid.shape[1]
    tokens = sum(xi.shape[1] for xi in x)
    per_forward, chunk = problem.plan(tokens, batch_size, chunk_size, copies=True)
    token_step = tokens if per_forward is None else per_forward
    target_step = width if chunk is None else chunk
    start = _starts(problem, epsilon, norm, seed)  # [K, L, B, H] or None
    at_input = problem.evaluate(tuple(xi[None] for xi in x))[0]  # [B, K]
    out = at_input.new_zeros(at_input.shape[0], width, tokens)
    for first in range(0, width, target_step):  # chunking only: bounds memory
        slots = slice(first, min(first + target_step, width))
        for column in range(0, tokens, token_step):  # chunking only: bounds memory
            columns = torch.arange(column, min(column + token_step, tokens), device=x[0].device)
            d0 = None if start is None else start[slots, columns.cpu()].to(x[0].device)
            reached = _attack(problem, slots, columns, d0, epsilon, steps, eta, norm)  # [k, m, B]
            out[:, slots, column : column + columns.numel()] = (
                at_input[:, slots].T[:, None] - reached
            ).permute(2, 0, 1)
    return out


def _attack(
    problem: Problem,
    slots: slice,
    columns: torch.Tensor,
    start: torch.Tensor | None,
    epsilon: float,
    steps: int,
    eta: float,
    norm: str,
) -> torch.Tensor:
    """The objective ``[k, m, B]`` of target ``slots[j]`` with token ``columns[i]`` moved by its
    PGD perturbation, every (target, token) pair attacked at once."""
    x = problem.inputs
    dtype, device = x[0].dtype, x[0].device
    valid = problem.tensors.valid[:, slots].to(dtype)  # [B, k]
    batch, k = valid.shape
    m = columns.numel()
    hidden = problem.hidden_fn(m, slots, own=True)  # copy (j, i) scores target j alone
    tokens = sum(xi.shape[1] for xi in x)
    where = torch.zeros(m, tokens, dtype=dtype, device=device)
    where[torch.arange(m, device=device), columns] = 1
    moving = where.split([xi.shape[1] for xi in x], dim=-1)  # [m, L_side] per side
    pick = valid.T[:, None, :]  # [k, 1, B]
    hidden_size = x[0].shape[-1]
    d = torch.zeros(k, m, batch, hidden_size, dtype=dtype, device=device)
    if start is not None:
        d = start.to(dtype)

    def objective(d: torch.Tensor) -> torch.Tensor:
        embeds = [
            (xi[None, None] + mi[None, :, None, :, None] * d[:, :, :, None, :]).flatten(0, 2)
            for xi, mi in zip(x, moving, strict=True)
        ]
        values = problem.head_objective(hidden(*embeds), slots, own=True)
        return values.view(k, m, batch) * pick  # [k, m, B]

    for _ in range(steps):  # sequential: each step starts where the last one ended
        with torch.enable_grad():
            d = d.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(objective(d).sum(), d)
        with torch.no_grad():
            if norm == "l2":
                length = torch.linalg.vector_norm(grad, dim=-1, keepdim=True)
                d = d - eta * grad / length.clamp_min(_TINY)
                size = torch.linalg.vector_norm(d, dim=-1, keepdim=True)
                d = d * (epsilon / size.clamp_min(epsilon))
            else:
                d = (d - eta * grad.sign()).clamp(-epsilon, epsilon)
    with torch.no_grad():
        return objective(d.detach())


def _starts(problem: Problem, epsilon: float, norm: str, seed: int | None) -> torch.Tensor | None:
    """Random starts ``[K, L, B, H]`` uniform in the ball, each example's from its own CPU
    generator seeded with ``seed``: per side, ``(its targets, its tokens, H)`` draws in order."""
    if seed is None:
        return None
    x = problem.inputs
    valid = problem.tensors.valid.cpu()
    batch, width = valid.shape
    hidden = x[0].shape[-1]
    tokens = sum(xi.shape[1] for xi in x)
    out = torch.zeros(width, tokens, batch, hidden, dtype=x[0].dtype)
    lengths = [problem.lengths(side) for side in range(len(x))]
    for b in range(batch):  # per example: its draws do not depend on the batch
        generator = torch.Generator().manual_seed(seed)
        rows = valid[b].nonzero().squeeze(1)
        offset = 0
        for side, xi in enumerate(x):
            shape = (rows.numel(), lengths[side][b], hidden)
            if norm == "linf":
                draw = (2 * torch.rand(shape, generator=generator, dtype=DRAWS) - 1) * epsilon
            else:
                direction = torch.randn(shape, generator=generator, dtype=DRAWS)
                direction = direction / torch.linalg.vector_norm(direction, dim=-1, keepdim=True)
                radius = torch.rand((*shape[:2], 1), generator=generator, dtype=DRAWS)
                draw = direction * epsilon * radius ** (1.0 / hidden)
            out[rows[:, None], offset + torch.arange(shape[1])[None, :], b] = draw.to(out.dtype)
            offset += xi.shape[1]
    return out


__all__ = ["pgd"]
