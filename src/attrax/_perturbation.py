"""Perturbation methods: occlusion, LIME and KernelSHAP over source tokens.

Each is a pure function ``(model, inputs, targets=None, **options) -> DataArray`` with dims
``([example,] target, source)`` (no ``hidden``); see ``docs/data-model.md``. A removed token's
embedding is replaced by a baseline; every perturbed copy of the batch is scored for all targets
at once (teacher-forced), many copies per forward through :meth:`Problem.masked_objective`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import xarray as xr

from . import _validate as check
from ._engine import Baseline, Problem, baseline_embeddings
from ._errors import InputError
from ._memory import Size
from ._protocol import COMMON, Call, Family, own_options

# (samples, players, generator) -> [samples, players] bool, True = kept
Draw = Callable[[int, int, torch.Generator], torch.Tensor]


def _run(core: Callable[..., torch.Tensor], call: Call, arguments: dict[str, Any]) -> xr.DataArray:
    """Run a perturbation core: ``[B, K, L]`` values split into the attributed sides, labelled."""
    problem = call.problem
    values = core(problem, call.options["batch_size"], **own_options(core, arguments))
    if not torch.isfinite(values).all():
        raise InputError(
            f"{call.method}: the objective values are not finite (inf/NaN); check the model's dtype and "
            "inputs"
        )
    widths = [x.shape[1] for x in problem.inputs]
    sides = values.to(problem.inputs[0].dtype).cpu().split(widths, dim=-1)
    return call.label(sides, trailing=())


#: Perturbation methods: forwards only, so no ``chunk_size``.
PERTURBATION = Family(
    name="perturbation",
    takes=tuple(n for n in COMMON if n != "chunk_size"),
    refuses={"chunk_size": "perturbation methods run forwards only; `batch_size` bounds them"},
    run=_run,
)


@PERTURBATION.method(baseline=check.baseline)
def occlusion(problem: Problem, batch_size: Size, *, baseline: Baseline = "zeros") -> torch.Tensor:
    """How much each target's objective drops when one source token is replaced by a baseline.

    ``f_t(x) - f_t(x with token s replaced)`` for every source ``s`` and target ``t``: signed,
    positive where the token helps. One perturbed copy per source position, all targets scored
    from the same teacher-forced forward.

    Arguments (others as :func:`attrax.saliency`):
        baseline: what replaces a removed token's embedding: ``"zeros"``, ``"pad"``/``"unk"``
            (that token's embedding), or a tensor broadcastable to the embeddings ``[B, L, H]``
            (a tuple of two for ``attribute_target`` on encoder-decoder models).
        batch_size: perturbed copies of the batch per forward (``"auto"``/None: all at once).

    Returns:
        DataArray ``(target, source)``, with ``example`` first for a list of inputs.

    >>> import attrax as ax
    >>> ax.occlusion(ax.load_model(), "1 2 3 =", " 3 2 1").dims
    ('target', 'source')
    """
    visible = problem.visible()
    columns = visible.any(dim=(0, 1)).nonzero().squeeze(1)
    n, (batch, width) = columns.numel(), visible[:, 0].shape
    keep = torch.ones((n + 1, batch, width), dtype=torch.bool, device=visible.device)
    copies = torch.arange(1, n + 1, device=keep.device)  # copy 0 is the unperturbed input
    keep[copies, :, columns] = False
    values = problem.masked_objective(keep, baseline_embeddings(problem, baseline), batch_size)
    drops = torch.zeros((batch, visible.shape[1], width), dtype=values.dtype, device=values.device)
    drops[..., columns] = (values[0] - values[1:]).permute(1, 2, 0)
    return drops


@PERTURBATION.method(
    samples=check.positive_int,
    kernel_width=check.positive,
    seed=check.integer,
    baseline=check.baseline,
)
def lime(
    problem: Problem,
    batch_size: Size,
    *,
    samples: int = 200,
    kernel_width: float = 0.25,
    seed: int = 0,
    baseline: Baseline = "zeros",
) -> torch.Tensor:
    """LIME (Ribeiro et al. 2016): a weighted linear surrogate fitted on random token coalitions.

    Each coalition keeps every source token with probability 1/2 and replaces the others by the
    baseline (the first coalition keeps all). Per target, the objective is regressed on the kept
    indicators of the tokens the target can see, with an intercept, weighted by
    ``exp(-d^2 / (2 kernel_width^2))`` where ``d`` is the cosine distance between the coalition and
    the full input (LIME's text kernel: its ``kernel_width=25`` on distances x100 is ``0.25``).

    Arguments (others as :func:`occlusion`):
        samples: number of coalitions (forwards of the batch); seed: seeds the coalitions.
        kernel_width: width of the exponential kernel on the cosine distance.

    Returns:
        DataArray ``(target, source)`` of surrogate coefficients; NaN for the future.

    >>> import attrax as ax
    >>> ax.lime(ax.load_model(), "1 2 3 =", " 3 2 1", samples=32).dims
    ('target', 'source')
    """
    visible = problem.visible()
    features = visible.any(dim=1)
    keep = _coalitions(features, samples, seed, _bernoulli)
    keep[0] = True
    values = problem.masked_objective(keep, baseline_embeddings(problem, baseline), batch_size)
    # the fit runs in float64 on the CPU (MPS has no float64; the systems are small)
    masks, vis = keep.transpose(0, 1).cpu().double(), visible.cpu().double()
    kept = torch.einsum("bnl,bkl->bnk", masks, vis)
    players = vis.sum(-1).clamp(min=1)[:, None, :]
    distance = 1 - torch.sqrt(kept / players)
    weights = torch.exp(-(distance**2) / (2 * kernel_width**2))
    return linear_surrogate(masks, values.transpose(0, 1), weights, visible=visible)


@PERTURBATION.method(samples=check.positive_int, seed=check.integer, baseline=check.baseline)
def kernel_shap(
    problem: Problem,
    batch_size: Size,
    *,
    samples: int = 200,
    seed: int = 0,
    baseline: Baseline = "zeros",
) -> torch.Tensor:
    """KernelSHAP (Lundberg & Lee 2017): Shapley values of source tokens by kernel regression.

    Coalition sizes are drawn from the Shapley kernel's size distribution, members uniformly,
    each coalition paired with its complement; the weighted least-squares fit is constrained to
    the exact values at the empty and full coalitions, so each target's attributions sum to
    ``f(x) - f(baseline)`` (efficiency). Targets that see fewer tokens than the example has
    (decoder-only causality) get importance weights making their fit the Shapley regression over
    the tokens they see.

    Arguments (others as :func:`occlusion`):
        samples: random coalitions (forwards of the batch) besides the empty and full ones.
        seed: seeds the coalitions.

    Returns:
        DataArray ``(target, source)`` of Shapley value estimates; NaN for the future.

    >>> import attrax as ax
    >>> ax.kernel_shap(ax.load_model(), "1 2 3 =", " 3 2 1", samples=32).dims
    ('target', 'source')
    """
    visible = problem.visible()
    features = visible.any(dim=1)
    keep = torch.cat(
        [
            torch.ones_like(features)[None],
            ~features[None],
            _coalitions(features, samples, seed, _shapley_draws),
        ]
    )
    values = problem.masked_objective(keep, baseline_embeddings(problem, baseline), batch_size)
    masks = keep[2:].transpose(0, 1).cpu().double()
    weights = _shapley_weights(masks, visible, features)
    return linear_surrogate(
        masks, values[2:].transpose(0, 1), weights, visible=visible, bounds=(values[1], values[0])
    )


def linear_surrogate(
    masks: torch.Tensor,
    scores: torch.Tensor,
    weights: torch.Tensor,
    *,
    visible: torch.Tensor | None = None,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Weighted least-squares coefficients of a linear model of ``scores`` in ``masks``.

    Arguments:
        masks: ``[..., N, L]`` 0/1 coalitions (1 = feature present).
        scores: ``[..., N, K]`` one column per target.
        weights: ``[..., N]`` sample weights, or ``[..., N, K]`` per target.
        visible: ``[..., K, L]`` bool: the features each target's model may use; the others
            get coefficient 0 and do not enter the fit. All features when None.
        bounds: ``(empty, full)``, each ``[..., K]``: the scores of the empty and full coalitions.
            The fit then has intercept ``empty`` and coefficients summing to ``full - empty``
            (KernelSHAP's constraints); without bounds the intercept is free (LIME).

    Returns:
        ``[..., K, L]`` float64 coefficients: all targets' fits are solved in one batched
        ``torch.linalg.lstsq`` (minimum-norm where the samples do not determine them).

    >>> import torch
    >>> masks = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]])
    >>> scores = (masks * torch.tensor([2.0, -1.0])).sum(-1, keepdim=True) + 5
    >>> linear_surrogate(masks, scores, torch.ones(4)).round(decimals=6).tolist()
    [[2.0, -1.0]]
    """
    z = torch.as_tensor(masks).to(device="cpu", dtype=torch.float64)
    y = torch.as_tensor(scores).to(device="cpu", dtype=torch.float64)
    w = torch.as_tensor(weights).to(device="cpu", dtype=torch.float64)
    if z.shape[:-1] != y.shape[:-1]:
        raise InputError(
            f"`masks` {tuple(z.shape)} and `scores` {tuple(y.shape)} must share [..., N]"
        )
    if w.shape == y.shape[:-1]:
        w = w[..., None].expand(y.shape)
    elif w.shape != y.shape:
        raise InputError(
            f"`weights` {tuple(w.shape)} must be [..., N] or [..., N, K] for `scores` "
            f"{tuple(y.shape)}"
        )
    n_features, n_targets = z.shape[-1], y.shape[-1]
    if visible is None:
        v = z.new_ones((*z.shape[:-2], n_targets, n_features))
    else:
        v = torch.as_tensor(visible).to(device="cpu", dtype=torch.float64)
    if bounds is None:
        # the intercept is one more feature that is always present and always visible
        z = torch.cat([z, z.new_ones((*z.shape[:-1], 1))], dim=-1)
        v = torch.cat([v, v.new_ones((*v.shape[:-1], 1))], dim=-1)
    else:
        empty, full = (torch.as_tensor(b).to(device="cpu", dtype=torch.float64) for b in bounds)
        y = y - empty[..., None, :]
    gram = torch.einsum("...nk,...ni,...nj->...kij", w, z, z) * v[..., :, None] * v[..., None, :]
    moment = torch.einsum("...nk,...ni,...nk->...ki", w, z, y) * v
    # invisible features: an identity row and a zero right-hand side pin their coefficient to 0
    gram = gram + torch.diag_embed(1 - v)
    if bounds is not None:
        # efficiency as a Lagrange constraint: [[G, v], [v^T, 0]] [phi, lambda] = [b, full - empty]
        gram = torch.cat([gram, v[..., None]], dim=-1)
        border = torch.cat([v, v.new_zeros((*v.shape[:-1], 1))], dim=-1)
        gram = torch.cat([gram, border[..., None, :]], dim=-2)
        moment = torch.cat([moment, (full - empty)[..., None]], dim=-1)
    solution = torch.linalg.lstsq(gram, moment[..., None], driver="gelsd").solution[..., 0]
    return solution[..., :n_features]


def _coalitions(features: torch.Tensor, samples: int, seed: int, draw: Draw) -> torch.Tensor:
    """``[samples, B, L]`` bool, True = kept; ``draw`` picks each example's features to keep.

    Each example draws from its own generator seeded with ``seed``, on the CPU, over its own
    features only: an example's coalitions do not depend on the batch it is in or the device.
    """
    keep = torch.ones((samples, *features.shape), dtype=torch.bool)
    for b, row in enumerate(features.cpu()):
        columns = row.nonzero().squeeze(1)
        generator = torch.Generator().manual_seed(seed)
        keep[:, b, columns] = draw(samples, columns.numel(), generator)
    return keep.to(features.device)


def _bernoulli(samples: int, players: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand((samples, players), generator=generator) < 0.5


def _shapley_draws(samples: int, players: int, generator: torch.Generator) -> torch.Tensor:
    """Coalitions with sizes from the Shapley kernel, each followed by its complement."""
    if players < 2:
        return torch.ones((samples, players), dtype=torch.bool)
    half = (samples + 1) // 2
    sizes = torch.arange(1, players, dtype=torch.float64)
    probabilities = 1 / (sizes * (players - sizes))
    size = torch.multinomial(probabilities, half, replacement=True, generator=generator) + 1
    order = torch.rand((half, players), generator=generator).argsort(dim=-1).argsort(dim=-1)
    kept = order < size[:, None]
    return torch.stack([kept, ~kept], dim=1).flatten(0, 1)[:samples]


def _shapley_weights(
    masks: torch.Tensor, visible: torch.Tensor, features: torch.Tensor
) -> torch.Tensor:
    """Importance weights ``[B, N, K]``: Shapley kernel over each target's visible tokens.

    Coalitions are drawn over the example's M features; a target that sees only m of them sees
    the restriction, whose probability q(j) for a restricted coalition of size j is hypergeometric
    over the drawn sizes. Weighting by kernel(j) / q(j) makes the sampled least squares estimate
    the Shapley regression over those m players. Empty and full restrictions get weight 0: the
    bounds of the fit hold them exactly.
    """
    vis = visible.to(device="cpu", dtype=torch.float64)
    feats = features.to(device="cpu", dtype=torch.float64)
    kept = torch.einsum("bnl,bkl->bnk", masks, vis)
    m = vis.sum(-1)[:, None, :].expand_as(kept)
    total = feats.sum(-1)[:, None, None].expand_as(kept)
    # log probability of the exact restricted coalition, summed over the drawn size s
    log_q = torch.full_like(kept, -math.inf)
    log_norm = _log_size_normalizer(feats.sum(-1))[:, None, None]
    for s in range(1, int(feats.sum(-1).max()) + 1):
        size = torch.full_like(kept, float(s))
        log_p = torch.log(total - 1) - torch.log(size) - torch.log(total - size) - log_norm
        term = log_p + _log_comb(total - m, size - kept) - _log_comb(total, size)
        log_q = torch.logaddexp(log_q, term.where(size < total, -math.inf))
    inner = (kept > 0) & (kept < m)
    log_kernel = (
        torch.log(m - 1) - _log_comb(m, kept) - torch.log(kept) - torch.log(m - kept)
    ).where(inner, 0.0)
    weights = torch.exp(log_kernel - log_q.where(inner, 0.0)).where(inner, 0.0)
    # the scale of a target's weights does not change its fit; keep the numbers moderate
    return weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-300)


def _log_size_normalizer(players: torch.Tensor) -> torch.Tensor:
    """``log sum_{s=1}^{M-1} (M-1) / (s (M-s))`` per example (0 where M < 2)."""
    out = torch.zeros_like(players)
    for b, m in enumerate(players.tolist()):
        if m >= 2:
            s = torch.arange(1, int(m), dtype=torch.float64)
            out[b] = torch.log(((m - 1) / (s * (m - s))).sum())
    return out


def _log_comb(n: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    valid = (r >= 0) & (r <= n)
    r, rest = r.clamp(min=0), (n - r).clamp(min=0)
    value = torch.lgamma(n + 1) - torch.lgamma(r + 1) - torch.lgamma(rest + 1)
    return value.where(valid, -math.inf)
