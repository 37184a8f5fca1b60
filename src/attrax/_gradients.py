"""Gradient methods: saliency, input x gradient, integrated gradients, SmoothGrad.

Each is a pure function ``(model, inputs, targets=None, **options) -> DataArray`` with dims
``([example,] target, source, hidden)``; see ``docs/data-model.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from ._engine import Problem, Size, baselines, check_baseline, check_positive_int, check_size, setup
from ._errors import InputError, OptionError
from ._inputs import Texts
from ._label import label
from ._model import ModelLike
from ._objectives import Objective

QUADRATURES = (
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
    "gausslegendre",
)
HIDDEN_REDUCTIONS = ("l2_norm", "sum")
MODES = ("auto", "reverse", "forward")


def saliency(
    model: ModelLike,
    inputs: Texts,
    targets: Texts | None = None,
    *,
    objective: str | Objective = "probability",
    contrast: Texts | None = None,
    positions: int | Sequence[int] | None = None,
    attribute_target: bool = False,
    abs: bool = False,
    chunk_size: Size = "auto",
    reduce_hidden: str | None = None,
    max_new_tokens: int = 20,
) -> xr.DataArray:
    """Gradient of each target's objective with respect to every source token embedding.

    Arguments:
        model: a :class:`Model` (from :func:`load_model`) or a path to load.
        inputs: a prompt (decoder-only) or source text (encoder-decoder), or a list of them.
        targets: the continuation / translation to attribute, a list, or None to generate it
            greedily (``max_new_tokens``).
        objective: ``"probability"`` (default), ``"logprob"``, ``"logit"`` or a callable
            ``(logits[..., V], target_ids[...]) -> scores[...]``.
        contrast: a text aligned token by token with the target: the objective becomes
            objective(target token) - objective(contrast token) at each position.
        positions: attribute only these target positions (negative counts from the end).
        attribute_target: encoder-decoder only: also attribute to the decoder prefix.
        abs: absolute gradients, as Captum's and Inseq's saliency return by default.
        chunk_size: how many targets go through one vectorized backward (memory bound); for
            decoder-only models each chunk also runs on the sequence cut after its last target.
            ``"auto"`` (default): all at once when that fits half the device's free memory (an
            estimate), else fewer; None: all at once.
        reduce_hidden: ``"l2_norm"`` or ``"sum"`` to reduce over ``hidden`` on the model's device
            before labelling (what ``ax.pipe(method, ax.l2_norm, ...)`` asks for by itself).

    Returns:
        DataArray ``(target, source, hidden)``, with ``example`` first for a list of inputs;
        ``(target, source)`` with ``reduce_hidden``.

    >>> import attrax as ax
    >>> model = ax.load_model()
    >>> ax.saliency(model, "1 2 3 =", " 3 2 1").dims
    ('target', 'source', 'hidden')
    """
    check_size(chunk_size, "chunk_size")
    _check_reduce_hidden(reduce_hidden)
    options = {"abs": abs, "chunk_size": chunk_size}
    name, problem, run_options = setup(
        model, inputs, targets, objective, contrast, positions, attribute_target, max_new_tokens
    )
    grads = _gradients(problem, chunk_size)
    if abs:
        grads = tuple(g.abs() for g in grads)
    return _label(problem, grads, "saliency", name, {**run_options, **options}, reduce_hidden)


def input_x_gradient(
    model: ModelLike,
    inputs: Texts,
    targets: Texts | None = None,
    *,
    objective: str | Objective = "probability",
    contrast: Texts | None = None,
    positions: int | Sequence[int] | None = None,
    attribute_target: bool = False,
    chunk_size: Size = "auto",
    reduce_hidden: str | None = None,
    mode: str = "auto",
    max_new_tokens: int = 20,
) -> xr.DataArray:
    """Embedding times gradient (the first-order Taylor term) per source token and hidden unit.

    Arguments (others as :func:`saliency`):
        mode: ``"reverse"`` (one vectorized backward per target), ``"forward"`` (one ``jvp`` per
            source token, only with ``reduce_hidden="sum"``) or ``"auto"``: forward when
            summing over hidden and there are fewer source tokens than targets.

    >>> import attrax as ax
    >>> model = ax.load_model()
    >>> da = ax.input_x_gradient(model, "1 2 3 =", " 3 2 1")
    >>> sorted(da.attrs["method"].split())
    ['input_x_gradient']
    """
    check_size(chunk_size, "chunk_size")
    _check_reduce_hidden(reduce_hidden)
    _check_mode(mode, reduce_hidden)
    name, problem, run_options = setup(
        model, inputs, targets, objective, contrast, positions, attribute_target, max_new_tokens
    )
    options = {**run_options, "chunk_size": chunk_size, "mode": mode}
    x = problem.inputs
    if _forward_mode(problem, mode, reduce_hidden):
        ones = torch.ones(1, dtype=torch.float64)
        values = problem.directional_sum(
            lambda chunk: tuple(xi[None] for xi in x), ones, x, batch_size=None, chunk_size=None
        )
        return _label(problem, values, "input_x_gradient", name, options, reduce_hidden, done=True)
    grads = _gradients(problem, chunk_size)
    values = tuple(g * xi[:, None] for g, xi in zip(grads, x, strict=True))
    return _label(problem, values, "input_x_gradient", name, options, reduce_hidden)


def integrated_gradients(
    model: ModelLike,
    inputs: Texts,
    targets: Texts | None = None,
    *,
    steps: int = 50,
    method: str = "gausslegendre",
    baseline: str | torch.Tensor = "zeros",
    objective: str | Objective = "probability",
    contrast: Texts | None = None,
    positions: int | Sequence[int] | None = None,
    attribute_target: bool = False,
    batch_size: Size = "auto",
    chunk_size: Size = "auto",
    reduce_hidden: str | None = None,
    mode: str = "auto",
    max_new_tokens: int = 20,
) -> xr.DataArray:
    """Integrated gradients (Sundararajan et al. 2017) along the straight path from a baseline.

    ``(x - x') * integral_0^1 grad f(x' + a (x - x')) da`` with the integral taken by quadrature.

    Arguments (others as :func:`saliency`):
        steps: number of quadrature points.
        method: ``riemann_left|right|middle|trapezoid`` or ``gausslegendre``.
        baseline: ``"zeros"``, ``"pad"``/``"unk"`` (that token's embedding at every position), or a
            tensor broadcastable to the embeddings ``[B, L, H]`` (a tuple of two for
            ``attribute_target`` on encoder-decoder models).
        batch_size: interpolation points per forward: None all at once, ``"auto"`` (default) as
            many as fit in memory with the targets of one chunk.
        mode: as :func:`input_x_gradient` (forward mode with ``reduce_hidden="sum"``).

    Returns:
        DataArray ``(target, source, hidden)`` with a ``completeness_gap`` coordinate along
        ``target``: sum of attributions minus ``f(x) - f(x')``.

    >>> import attrax as ax
    >>> model = ax.load_model()
    >>> da = ax.integrated_gradients(model, "1 2 3 =", " 3 2 1", steps=16)
    >>> bool(abs(da.completeness_gap).max() < 0.05)
    True
    """
    check_positive_int(steps, "steps")
    check_size(batch_size, "batch_size")
    check_size(chunk_size, "chunk_size")
    _check_reduce_hidden(reduce_hidden)
    _check_mode(mode, reduce_hidden)
    alphas, weights = quadrature(method, steps)
    check_baseline(baseline)
    name, problem, run_options = setup(
        model, inputs, targets, objective, contrast, positions, attribute_target, max_new_tokens
    )
    x = problem.inputs
    base = baselines(problem, baseline)
    delta = tuple(xi - bi for xi, bi in zip(x, base, strict=True))
    alpha = torch.as_tensor(alphas, dtype=x[0].dtype, device=x[0].device)

    def points(chunk: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = alpha[chunk].view(-1, 1, 1, 1)
        return tuple(bi[None] + a * di[None] for bi, di in zip(base, delta, strict=True))

    forward = _forward_mode(problem, mode, reduce_hidden)
    if forward:
        values = problem.directional_sum(
            points, torch.as_tensor(weights), delta, batch_size=batch_size, chunk_size=None
        )
        total = sum(v.sum(dim=2) for v in values)
    else:
        grads = problem.gradient_sum(
            points, torch.as_tensor(weights), batch_size=batch_size, chunk_size=chunk_size
        )
        values = tuple(g * d[:, None] for g, d in zip(grads, delta, strict=True))
        total = sum(v.sum(dim=(2, 3)) for v in values)
    ends = problem.evaluate(tuple(torch.stack([xi, bi]) for xi, bi in zip(x, base, strict=True)))
    gap = total - (ends[0] - ends[1])
    options = {
        **run_options,
        "steps": steps,
        "method": method,
        "baseline": baseline if isinstance(baseline, str) else "tensor",
        "batch_size": batch_size,
        "chunk_size": chunk_size,
        "mode": mode,
    }
    gap_coord = {"completeness_gap": gap}
    return _label(
        problem, values, "integrated_gradients", name, options, reduce_hidden, gap_coord, forward
    )


def smoothgrad(
    model: ModelLike,
    inputs: Texts,
    targets: Texts | None = None,
    *,
    samples: int = 20,
    noise: float = 0.1,
    seed: int = 0,
    objective: str | Objective = "probability",
    contrast: Texts | None = None,
    positions: int | Sequence[int] | None = None,
    attribute_target: bool = False,
    batch_size: Size = "auto",
    chunk_size: Size = "auto",
    reduce_hidden: str | None = None,
    max_new_tokens: int = 20,
) -> xr.DataArray:
    """SmoothGrad (Smilkov et al. 2017): the gradient averaged over noisy copies of the embeddings.

    Gaussian noise with standard deviation ``noise * (max - min)`` of each example's embeddings
    (the paper's noise level), drawn from a generator seeded with ``seed``.

    Arguments (others as :func:`saliency`):
        samples: number of noisy copies; noise: the noise level; seed: the random seed.
        batch_size: noisy copies per forward: None all at once, ``"auto"`` (default) as many as
            fit in memory.

    >>> import attrax as ax
    >>> model = ax.load_model()
    >>> ax.smoothgrad(model, "1 2 3 =", " 3 2 1", samples=4).sizes["hidden"] > 0
    True
    """
    check_positive_int(samples, "samples")
    check_size(batch_size, "batch_size")
    check_size(chunk_size, "chunk_size")
    _check_reduce_hidden(reduce_hidden)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise OptionError(f"`seed` must be an integer, got {seed!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise OptionError(f"`noise` must be a non-negative number, got {noise!r}")
    name, problem, run_options = setup(
        model, inputs, targets, objective, contrast, positions, attribute_target, max_new_tokens
    )
    x = problem.inputs
    draws = tuple(_noise(xi, problem, side, samples, seed) for side, xi in enumerate(x))
    sigma = tuple(_spread(xi, problem, i) * noise for i, xi in enumerate(x))

    def points(chunk: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(
            xi[None] + si[None] * di[chunk] for xi, si, di in zip(x, sigma, draws, strict=True)
        )

    weights = torch.full((samples,), 1.0 / samples, dtype=torch.float64)
    grads = problem.gradient_sum(points, weights, batch_size=batch_size, chunk_size=chunk_size)
    options = {
        **run_options,
        "samples": samples,
        "noise": noise,
        "seed": seed,
        "batch_size": batch_size,
        "chunk_size": chunk_size,
    }
    return _label(problem, grads, "smoothgrad", name, options, reduce_hidden)


def quadrature(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Points in [0, 1] and weights summing to 1 for integrating along the IG path.

    >>> alphas, weights = quadrature("riemann_trapezoid", 3)
    >>> alphas.tolist(), weights.tolist()
    ([0.0, 0.5, 1.0], [0.25, 0.5, 0.25])
    """
    if method not in QUADRATURES:
        raise OptionError(f"`method` must be one of {QUADRATURES}, got {method!r}")
    check_positive_int(steps, "steps")
    k = np.arange(steps, dtype=np.float64)
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return (nodes + 1) / 2, weights / 2
    if method == "riemann_trapezoid":
        if steps < 2:
            raise OptionError("`steps` must be at least 2 for method='riemann_trapezoid'")
        weights = np.full(steps, 1.0 / (steps - 1))
        weights[[0, -1]] /= 2
        return k / (steps - 1), weights
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[method]
    return (k + offset) / steps, np.full(steps, 1.0 / steps)


def _gradients(problem: Problem, chunk_size: Size) -> tuple[torch.Tensor, ...]:
    def points(chunk: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(xi[None] for xi in problem.inputs)

    return problem.gradient_sum(
        points, torch.ones(1, dtype=torch.float64), batch_size=None, chunk_size=chunk_size
    )


def _noise(x: torch.Tensor, problem: Problem, side: int, samples: int, seed: int) -> torch.Tensor:
    """Standard normal draws ``[samples, B, L, H]``; each example's come from its own generator.

    Seeding per example with ``seed`` makes an example's noise independent of the batch it is in
    (batched equals single); drawing on the CPU makes it independent of the device.
    """
    lengths = _lengths(problem, side)
    out = torch.zeros((samples, *x.shape), dtype=x.dtype)
    for b, length in enumerate(lengths):
        generator = torch.Generator().manual_seed(seed)
        shape = (samples, length, x.shape[-1])
        out[:, b, :length] = torch.randn(shape, generator=generator, dtype=x.dtype)
    return out.to(x.device)


def _lengths(problem: Problem, side: int) -> list[int]:
    t = problem.tensors
    mask = t.mask if side == 0 else t.decoder_mask
    return mask.sum(dim=1).tolist()


def _spread(x: torch.Tensor, problem: Problem, side: int) -> torch.Tensor:
    """Per-example ``max - min`` of the real (unpadded) embeddings, shaped to broadcast."""
    t = problem.tensors
    mask = (t.mask if side == 0 else t.decoder_mask).bool()[..., None]
    high = x.masked_fill(~mask, -torch.inf).amax(dim=(1, 2))
    low = x.masked_fill(~mask, torch.inf).amin(dim=(1, 2))
    return (high - low).view(-1, 1, 1)


def _label(
    problem: Problem,
    values: tuple[torch.Tensor, ...],
    method: str,
    objective: str,
    options: dict[str, Any],
    reduce_hidden: str | None = None,
    target_coords: dict[str, torch.Tensor] | None = None,
    done: bool = False,
) -> xr.DataArray:
    """Label ``[B, K, L, H]`` values (``[B, K, L]`` when the hidden dim is already ``done``)."""
    if not all(torch.isfinite(v).all() for v in values):
        raise InputError(
            f"{method}: the gradients are not finite (inf/NaN); check the model's dtype and inputs"
        )
    if reduce_hidden == "l2_norm" and not done:
        values = tuple(torch.linalg.vector_norm(v, dim=-1) for v in values)
    elif reduce_hidden == "sum" and not done:
        values = tuple(v.sum(dim=-1) for v in values)
    da = label(
        problem.model,
        problem.batch,
        values,
        method=method,
        objective=objective,
        options=options,
        trailing=() if reduce_hidden else ("hidden",),
        target_coords=target_coords,
    )
    if reduce_hidden:
        da.attrs["reductions"] = f"{reduce_hidden}(hidden)"
    return da


def _check_reduce_hidden(reduce_hidden: str | None) -> None:
    if reduce_hidden not in (None, *HIDDEN_REDUCTIONS):
        raise OptionError(
            f"`reduce_hidden` must be one of {HIDDEN_REDUCTIONS} or None, got {reduce_hidden!r}"
        )


def _check_mode(mode: str, reduce_hidden: str | None) -> None:
    if mode not in MODES:
        raise OptionError(f"`mode` must be one of {MODES}, got {mode!r}")
    if mode == "forward" and reduce_hidden != "sum":
        raise OptionError(
            "`mode='forward'` computes token-level sums over hidden: it needs reduce_hidden='sum'"
        )


def _forward_mode(problem: Problem, mode: str, reduce_hidden: str | None) -> bool:
    """Forward mode costs one pass per source token, reverse mode one per target."""
    if mode != "auto":
        return mode == "forward"
    sources = sum(x.shape[1] for x in problem.inputs)
    return reduce_hidden == "sum" and sources < problem.tensors.valid.shape[1]


for _method in (saliency, input_x_gradient, integrated_gradients, smoothgrad):
    # ax.pipe(method, ax.l2_norm | ax.sum, ...) reduces over hidden on the device instead
    _method.attrax_reduces_hidden = True  # type: ignore[attr-defined]
