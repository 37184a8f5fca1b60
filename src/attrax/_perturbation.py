"""Perturbation methods over source tokens: occlusion, feature ablation, LIME, KernelSHAP,
Shapley value sampling and Sobol indices.

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
from ._engine import Baseline, Problem, all_finite, baseline_embeddings
from ._errors import InputError, OptionError
from ._memory import Size
from ._protocol import COMMON, Call, Family, own_options
from ._tokens import word_groups

# (samples, players, generator) -> [samples, players] bool, True = kept
Draw = Callable[[int, int, torch.Generator], torch.Tensor]


def _run(core: Callable[..., torch.Tensor], call: Call, arguments: dict[str, Any]) -> xr.DataArray:
    """Run a perturbation core: ``[B, K, L]`` values split into the attributed sides, labelled."""
    problem = call.problem
    values = core(problem, call.options["batch_size"], **own_options(core, arguments))
    if not all_finite(values):
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
    samples=check.at_least(
        2,
        "the first coalition keeps every token, and a surrogate fitted to it alone has no "
        "variation to fit (its coefficients would be an even split)",
    ),
    kernel_width=check.positive,
    seed=check.seed,
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


@PERTURBATION.method(
    samples=check.at_least(
        3,
        "a coalition and its complement (samples=2, drawn as a pair) fit nothing but the even "
        "split of the sum",
    ),
    seed=check.seed,
    baseline=check.baseline,
)
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


Groups = str | torch.Tensor | None
GROUPINGS = ("token", "word")


def _check_groups(value: object, name: str) -> None:
    if value is None or (isinstance(value, str) and value in GROUPINGS):
        return
    if isinstance(value, torch.Tensor) and value.ndim in (1, 2) and not value.is_floating_point():
        return
    raise OptionError(
        f"`{name}` must be one of {GROUPINGS}, None (tokens) or an integer tensor of group ids "
        f"[source] or [batch, source] (sides concatenated), got {value!r}"
    )


def _check_permutations(value: object, name: str) -> None:
    if isinstance(value, torch.Tensor):
        rows = value.long()
        ordered = torch.arange(rows.shape[-1]) if rows.ndim == 2 else None
        if ordered is None or value.is_floating_point() or not rows.shape[0]:
            raise OptionError(
                f"`{name}` must be a positive integer or an integer tensor [permutations, groups], "
                f"got a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        if not (rows.sort(dim=-1).values == ordered).all():
            raise OptionError(f"`{name}`: every row must be a permutation of 0..{len(ordered) - 1}")
        return
    check.positive_int(value, name)


@PERTURBATION.method(baseline=check.baseline, groups=_check_groups)
def feature_ablation(
    problem: Problem, batch_size: Size, *, groups: Groups = None, baseline: Baseline = "zeros"
) -> torch.Tensor:
    """Feature ablation (Captum's ``FeatureAblation``): the drop of each target's objective when a
    group of source tokens is replaced by the baseline together; each token gets its group's drop.

    With one group per token (the default) it is :func:`occlusion`. One forward of the batch per
    group (the largest number of groups in the batch), plus the unperturbed one.

    Arguments (others as :func:`occlusion`):
        groups: None or ``"token"``: each source token alone; ``"word"``: the words of
            :func:`attrax.merge_subwords`' segmentation; or an integer tensor of group ids per source
            token (sides concatenated), ``[source]`` or ``[batch, source]``, as Captum's
            ``feature_mask``.

    Returns:
        DataArray ``(target, source)``; a target sees only the sources before it (NaN after).

    >>> import attrax as ax
    >>> da = ax.feature_ablation(ax.load_model(), "1 2 3 =", " 3 2 1", groups="word")
    >>> da.dims
    ('target', 'source')
    """
    visible = problem.visible()
    group, count = _group_ids(problem, groups, visible.any(dim=1))
    n = int(count.max())
    ids = torch.arange(n, device=group.device)
    keep = torch.cat(
        [torch.ones_like(group, dtype=torch.bool)[None], group[None] != ids[:, None, None]]
    )
    values = problem.masked_objective(keep, baseline_embeddings(problem, baseline), batch_size)
    drops = (values[0] - values[1:]).permute(1, 2, 0)  # [B, K, groups]
    return _spread_groups(drops, group)


@PERTURBATION.method(
    permutations=_check_permutations,
    seed=check.seed,
    baseline=check.baseline,
    groups=_check_groups,
)
def shapley_sampling(
    problem: Problem,
    batch_size: Size,
    *,
    permutations: int | torch.Tensor = 25,
    seed: int = 0,
    groups: Groups = None,
    baseline: Baseline = "zeros",
) -> torch.Tensor:
    """Shapley value sampling (Castro et al. 2009; Captum's ``ShapleyValueSampling``).

    For each random order of the groups, the groups are added one by one to the all-baseline input
    and each gets its marginal change of the objective; the mean over orders estimates Shapley
    values (exact with every order). Each example draws its orders from its own CPU generator
    seeded with ``seed``: ``torch.rand(permutations, groups, dtype=float64).argsort(-1)``, so
    batched equals single.

    Arguments (others as :func:`feature_ablation`):
        permutations: how many random orders, or an integer tensor ``[orders, groups]`` of given
            orders (each row a permutation of ``0..groups-1``; ids beyond an example's groups
            are skipped), shared by every example.
        seed: seeds the orders.

    Cost: ``1 + orders * groups`` forwards of the batch. Each target's values sum to
    ``f(x) - f(baseline)`` (efficiency), whatever the orders.

    Returns:
        DataArray ``(target, source)``; a target sees only the sources before it (NaN after).

    >>> import attrax as ax
    >>> da = ax.shapley_sampling(ax.load_model(), "1 2 3 =", " 3 2 1", permutations=4)
    >>> da.dims
    ('target', 'source')
    """
    visible = problem.visible()
    group, count = _group_ids(problem, groups, visible.any(dim=1))
    orders = _orders(permutations, count, seed).to(group.device)  # [P, B, G]
    n_orders, _, n = orders.shape
    # rank[p, b, g]: the step at which order p adds group g of example b
    rank = orders.argsort(dim=-1)
    steps = torch.arange(1, n + 1, device=group.device)
    ranked = rank.gather(-1, group.clamp(min=0)[None].expand(n_orders, -1, -1))  # [P, B, L]
    present = (ranked[:, None] < steps[None, :, None, None]) & (group >= 0)  # [P, G, B, L]
    empty = torch.zeros_like(group, dtype=torch.bool)[None] | (group < 0)[None]
    keep = torch.cat([empty, present.flatten(0, 1) | (group < 0)])
    values = problem.masked_objective(keep, baseline_embeddings(problem, baseline), batch_size)
    chain = torch.cat(
        [values[:1].expand(n_orders, -1, -1)[:, None], values[1:].unflatten(0, (n_orders, n))],
        dim=1,
    )
    gains = chain.diff(dim=1)  # [P, G, B, K]: the gain of the group added at each step
    added = orders.transpose(1, 2)[..., None].expand_as(gains)
    phi = torch.zeros_like(gains[0]).scatter_add_(0, added.flatten(0, 1), gains.flatten(0, 1))
    return _spread_groups(phi.permute(1, 2, 0) / n_orders, group)


@PERTURBATION.method(
    samples=check.at_least(2, "one row of each design gives no variance to divide by"),
    seed=check.seed,
    baseline=check.baseline,
    groups=_check_groups,
)
def sobol(
    problem: Problem,
    batch_size: Size,
    *,
    samples: int = 32,
    seed: int = 0,
    groups: Groups = None,
    baseline: Baseline = "zeros",
) -> torch.Tensor:
    """Total Sobol indices of token masks (Fel et al. 2021; Interpreto's ``SobolAttribution``).

    Soft masks ``m`` in [0, 1]^groups perturb each token as ``baseline + m (x - baseline)``. From
    a scrambled Sobol sequence of dimension ``2 * groups`` (``torch.quasirandom.SobolEngine``,
    seeded with ``seed``, per example) ``samples`` rows split into designs ``A`` and ``B``; ``C_i``
    is ``A`` with column ``i`` from ``B``. Jansen's estimator, as the paper's:
    ``ST_i = mean((f(A) - f(C_i))**2) / (2 Var[f(A), f(B)])`` (population variance over both
    designs), per target; 0 where the objective does not vary.

    Arguments (others as :func:`feature_ablation`):
        samples: rows of each design (``samples * (groups + 2)`` forwards of the batch).
        seed: seeds the scrambling.

    Returns:
        DataArray ``(target, source)`` of total indices (>= 0, unitless); NaN after each target.

    >>> import attrax as ax
    >>> da = ax.sobol(ax.load_model(), "1 2 3 =", " 3 2 1", samples=16)
    >>> bool((da.fillna(0) >= 0).all())
    True
    """
    visible = problem.visible()
    group, count = _group_ids(problem, groups, visible.any(dim=1))
    n = int(count.max())
    # the designs, their masks (float64, then the inputs' dtype) and the values
    rows = samples * (n + 2) * group.shape[0]
    size = rows * (8 * n + 8 * group.shape[1] + 8 * visible.shape[1])
    problem.hold(size, "samples", samples, "its designs (groups + 2 rows of groups per sample)")
    designs = torch.zeros((samples, n + 2, *count.shape, n), dtype=torch.float64)
    for b, players in enumerate(count.tolist()):  # per example: independent of the batch
        engine = torch.quasirandom.SobolEngine(2 * players, scramble=True, seed=seed)
        draw = engine.draw(samples, dtype=torch.float64)
        a, c = draw[:, :players], draw[:, players:]
        designs[:, 0, b, :players] = a
        designs[:, 1, b, :players] = c
        mixed = a[:, None].repeat(1, players, 1)
        mixed[:, torch.arange(players), torch.arange(players)] = c
        designs[:, 2 : players + 2, b, :players] = mixed
    designs = designs.to(group.device)
    index = group.clamp(min=0)[None, None].expand(samples, n + 2, -1, -1)
    masks = designs.gather(-1, index).where(group >= 0, 1.0)  # [N, n + 2, B, L]
    x = problem.inputs[0]
    values = problem.masked_objective(
        masks.flatten(0, 1).to(x.dtype), baseline_embeddings(problem, baseline), batch_size
    )
    values = values.unflatten(0, (samples, n + 2)).double()  # [N, n + 2, B, K]
    f_a, f_b, f_c = values[:, 0], values[:, 1], values[:, 2:]
    variance = torch.cat([f_a, f_b]).var(dim=0, correction=0)  # [B, K]
    spread = ((f_a[:, None] - f_c) ** 2).mean(dim=0) / 2  # [n, B, K]
    # NaN/inf values keep their NaN here, so the family's finite check names them
    total = torch.where(variance == 0, 0.0, spread / variance.clamp(min=1e-300))
    return _spread_groups(total.permute(1, 2, 0), group)


def _group_ids(
    problem: Problem, groups: Groups, features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group ids ``[B, L]`` numbered ``0..G_b-1`` per example in order of first token (-1 for
    tokens no target sees, padding included), and each example's number of groups ``G_b``."""
    batch, width = features.shape
    if groups is None or groups == "token":
        raw = torch.arange(width, device=features.device).expand(batch, -1)
    elif isinstance(groups, str):
        raw = torch.as_tensor(_word_ids(problem), device=features.device)
    else:
        given = torch.as_tensor(groups, device=features.device).long()
        if given.shape[-1] != width or (given.ndim == 2 and given.shape[0] != batch):
            raise InputError(
                f"`groups` of shape {tuple(given.shape)} must be [{width}] or [{batch}, {width}]: "
                "one group id per source token of the batch (sides concatenated, padded)"
            )
        raw = given.expand(batch, -1)
    raw = raw.where(features & (raw >= 0), -1)
    out = torch.full_like(raw, -1)
    counts = []
    for b in range(batch):  # renumber by first appearance: consecutive ids per example
        row = raw[b]
        kept = row >= 0
        _, inverse = torch.unique(row[kept], return_inverse=True)
        first = torch.full((int(inverse.max()) + 1 if inverse.numel() else 0,), width)
        positions = torch.arange(width, device=row.device)[kept].cpu()
        first = first.scatter_reduce(0, inverse.cpu(), positions, "amin")
        order = first.argsort().argsort().to(row.device)
        out[b, kept] = order[inverse]
        counts.append(len(first))
    empty = [b for b, count in enumerate(counts) if count == 0]
    if empty:  # nothing to perturb: torch's index error, or Sobol's dimension, said raw
        where = "" if batch == 1 else f" (example {empty[0]})"
        raise InputError(
            f"`groups` leaves no group of tokens the targets see{where}: every id is -1 or "
            "on tokens at or after the last target; give a group id >= 0 to some token before it"
        )
    return out, torch.tensor(counts)


def _word_ids(problem: Problem) -> list[list[int]]:
    """Word index of each attributed source token (sides concatenated; -1 for padding)."""
    batch, widths = problem.batch, [x.shape[1] for x in problem.inputs]
    tokens = problem.model.token_strings
    rows, sides = [], []
    for e in batch.examples:
        if batch.encoder_decoder:  # the encoder input, then the decoder input when attributed
            parts = [(e.source_ids, "source"), (e.sequence(batch.start_token), "target")]
            named = [(list(ids), [side] * len(ids)) for ids, side in parts[: len(widths)]]
        elif batch.task == "generation":  # words do not cross the prompt / continuation boundary
            side = ["source"] * len(e.source_ids) + ["target"] * len(e.target_ids)
            named = [(list(e.source_ids + e.target_ids), side)]
        else:  # a classifier's targets are classes (positions, tokens): its sources are its input
            named = [(list(e.source_ids), ["source"] * len(e.source_ids))]
        row: list[str] = []
        row_sides: list[str] = []
        for (ids, side), width in zip(named, widths, strict=True):
            row += tokens(ids) + [""] * (width - len(ids))  # "": the missing token (padding)
            row_sides += side + [""] * (width - len(ids))
        rows.append(row)
        sides.append(row_sides)
    return word_groups(rows, sides, problem.model.subwords)


def _spread_groups(values: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """``[B, K, G]`` group values -> ``[B, K, L]``: each token its group's value (0 outside)."""
    index = group.clamp(min=0)[:, None, :].expand(-1, values.shape[1], -1)
    return values.gather(-1, index).where(group[:, None, :] >= 0, 0.0)


def _orders(permutations: int | torch.Tensor, count: torch.Tensor, seed: int) -> torch.Tensor:
    """``[P, B, G]`` orders of each example's groups; ids ``>= G_b`` come last (no-ops)."""
    n = int(count.max())
    if isinstance(permutations, torch.Tensor):
        given = permutations.long().cpu()
        if given.shape[-1] < n:
            raise InputError(
                f"`permutations` orders {given.shape[-1]} groups; this batch has {n} "
                "(an example's groups, in order of their first token)"
            )
        # an example with fewer groups skips the others: they are moved to the end
        rows = []
        for players in count.tolist():
            real = given[given < players].view(given.shape[0], players)
            rows.append(torch.cat([real, torch.arange(players, n).expand(len(given), -1)], dim=1))
        return torch.stack(rows, dim=1)
    out = torch.arange(n).repeat(permutations, len(count), 1)
    for b, players in enumerate(count.tolist()):  # per example: independent of the batch
        generator = torch.Generator().manual_seed(seed)
        keys = torch.rand((permutations, players), generator=generator, dtype=torch.float64)
        out[:, b, :players] = keys.argsort(dim=-1)  # uniform random orders, one per row
    return out


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
    if not all_finite(
        y, *(torch.as_tensor(b) for b in bounds or ())
    ):  # lstsq fails inside LAPACK on them; NaN coefficients say where it came from
        return y.new_full((*z.shape[:-2], n_targets, n_features), float("nan"))
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
