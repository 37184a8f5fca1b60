"""DeepLIFT with the Rescale rule (Shrikumar et al. 2017) and DeepLiftSHAP (Lundberg & Lee 2017).

DeepLIFT explains ``f(x) - f(x0)`` from a reference ``x0`` (the baseline). With the Rescale rule
it is ``(x - x0) * g``, where ``g`` is the gradient of each target's objective through a backward
in which every elementwise activation ``y = f(u)`` passes the *multiplier*
``(f(u) - f(u0)) / (u - u0)`` instead of ``f'(u)`` (``f'(u)`` where ``|u - u0| < 1e-10``),
``u0`` being that activation's input in the forward over the reference. Everything else (linear
layers, attention, norms, softmax, products) takes its ordinary gradient at the input, as
Captum's ``DeepLift`` does for the operations it has no hook for. Summation-to-delta (the
attributions of a target add up to ``f(x) - f(x0)``) holds exactly only when the rules cover
every nonlinearity; on a transformer they do not (attention, norms), so each result carries a
``completeness_gap`` coordinate (Captum's convergence delta).

The family wraps the gradient engine: before the forward over a chunk of points, a reference
forward over the matching baselines records every covered activation's input (in call order,
stacked like the points); the forward over the input then runs those activations as
:class:`_Rescale`, an autograd function with a vmap rule, so the engine's vectorized backward
gives every target at once. DeepLiftSHAP stacks its baselines as points: the mean over baselines
of DeepLIFT with each (Captum's ``DeepLiftShap``), in one pass. ``layers=`` (Captum's
``LayerDeepLift``) goes through the gradient family's layer reader (:mod:`attrax._layers`): the
baselines are the rule's per-point ``origins``, so the multiplier at layer ``l`` is
``h_l(x) - h_l(b_i)``, and the probes' backward runs through the same rescaled activations.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import xarray as xr

from . import _arch, _layers
from . import _validate as check
from ._engine import Problem, baseline_embeddings
from ._errors import ModelError, OptionError
from ._gradients import GRADIENT, Baselines, Rule, as_baseline_list, check_layer_options
from ._memory import Cost
from ._model import (
    ACTIVATION_KINDS,
    Model,
    activation_kind,
    activation_tap,
    activation_value,
    activation_value_and_derivative,
)
from ._protocol import Call, Param

#: Which activations get the Rescale rule: every elementwise one attrax knows, or only those
#: Captum's ``DeepLift`` hooks (``nn.ReLU``, ``nn.Tanh``, ``nn.Sigmoid`` modules)
ACTIVATIONS = ("all", "captum")
_KINDS = {
    "all": frozenset(ACTIVATION_KINDS.values()),
    "captum": frozenset({"relu", "tanh", "sigmoid"}),
}
# modules of the activation libraries that are not elementwise: they keep their gradient
_NOT_ELEMENTWISE = frozenset(
    {
        "MultiheadAttention",
        "Softmax",
        "Softmin",
        "LogSoftmax",
        "Softmax2d",
        "GLU",
        "LinearActivation",
    }
)
_ACTIVATION_LIBRARIES = ("torch.nn.modules.activation", "transformers.activations")
# the elementwise modules Captum's DeepLift hooks that attrax has no rule for
_CAPTUM_ONLY = frozenset({"ELU", "LeakyReLU", "Softplus"})
#: below this input difference the multiplier is the derivative (Captum's ``eps``)
EPS = 1e-10


class _Rescale(torch.autograd.Function):
    """``f(u)`` whose backward (and jvp) multiplies by ``(f(u) - f(u0)) / (u - u0)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        u: torch.Tensor, reference: torch.Tensor, kind: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y, derivative = activation_value_and_derivative(u, kind)
        delta = u - reference
        secant = (y - activation_value(reference, kind)) / delta
        return y, torch.where(delta.abs() < EPS, derivative, secant)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        _, multiplier = output
        ctx.mark_non_differentiable(multiplier)
        ctx.save_for_backward(multiplier)
        ctx.save_for_forward(multiplier)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _grad_multiplier: Any) -> tuple[Any, None, None]:
        (multiplier,) = ctx.saved_tensors
        return grad * multiplier, None, None

    @staticmethod
    def jvp(
        ctx: Any, tangent: torch.Tensor, _reference: Any, _kind: Any
    ) -> tuple[torch.Tensor, None]:
        # the same linear map as the backward, so mode="forward" gives the same attributions
        (multiplier,) = ctx.saved_tensors
        return tangent * multiplier, None


class _References:
    """The reference inputs of the covered activations, and what the completeness gap needs."""

    def __init__(self, kinds: frozenset[str]) -> None:
        self.kinds = kinds
        self.saved: list[torch.Tensor] = []
        self.length = 1  # tokens per row of the reference forward (record sets it)
        self.recording = False
        self.calls = 0
        self.values: dict[int, torch.Tensor] = {}  # point index -> objective at its baseline
        self.total: torch.Tensor | None = None  # [B, K] (, n_layers): the attributions' sums
        self.weights: torch.Tensor | None = None  # [N]: the baselines' weights
        self.end: torch.Tensor | None = None  # [B, K]: the objective at the input, f(x)

    def tap(self, u: torch.Tensor, kind: str) -> torch.Tensor | None:
        if kind not in self.kinds:
            return None
        if self.recording:
            self.saved.append(u.detach())
            return None
        if not self.saved:
            return None
        # every forward makes the same calls in the same order: the i-th reads the i-th reference
        reference = self.saved[self.calls % len(self.saved)]
        self.calls += 1
        if not torch.is_grad_enabled():
            return None
        if u.ndim != reference.ndim or any(
            s > r for s, r in zip(u.shape, reference.shape, strict=True)
        ):
            raise ModelError(
                f"DeepLIFT: a {kind} activation got an input of shape {tuple(u.shape)} where the "
                f"reference forward gave {tuple(reference.shape)}; the model does not call its "
                "activations the same way on every forward"
            )
        # a decoder-only chunk of early targets runs on a cut sequence: causal, so the prefix
        if u.shape[0] != reference.shape[0] and reference.shape[0] % self.length == 0:
            # rows flattened with their tokens (OPT's MLP runs on [rows * L, H]): cut each row
            rows = reference.shape[0] // self.length
            cut = reference.unflatten(0, (rows, self.length))[:, : u.shape[0] // rows]
            reference = cut.flatten(0, 1)
        reference = reference[tuple(slice(0, s) for s in u.shape)]
        return _Rescale.apply(u, reference, kind)[0]

    @torch.no_grad()
    def record(
        self, problem: Problem, chunk: torch.Tensor, bases: tuple[torch.Tensor, ...]
    ) -> None:
        """The reference forward over baselines ``[n, B, L, H]`` per side (points ``chunk``).

        The first one also runs the input itself (stacked first), for ``f(x)`` of the gap.
        """
        first = self.end is None
        self.length = bases[0].shape[-2]  # the tokens of a row; one side: decoder-only's
        if first:
            bases = tuple(
                torch.cat([xi[None], b]) for xi, b in zip(problem.inputs, bases, strict=True)
            )
        self.saved, self.calls, self.recording = [], 0, True
        try:
            values = problem.evaluate(bases)  # [n (+1), B, K]
        finally:
            self.recording = False
        if first:
            self.end, values = values[0], values[1:]
            # rows are point-major (points flattened with the batch): drop the input's share
            points = len(values) + 1
            self.saved = [s[s.shape[0] // points :] for s in self.saved]
        for i, v in zip(chunk.tolist(), values, strict=True):
            self.values[i] = v

    def gap(self) -> torch.Tensor:
        """``[B, K]`` (``[B, K, n_layers]`` at layers): the attributions' sum minus
        ``f(x) - sum_i w_i f(b_i)``."""
        assert self.total is not None and self.weights is not None and self.end is not None
        end = self.end
        w = self.weights.to(dtype=end.dtype, device=end.device)
        start = torch.stack([self.values[i] for i in range(len(w))])
        delta = end - torch.einsum("nbk,n->bk", start, w)
        return self.total - (delta if self.total.ndim == 2 else delta[..., None])

    def sums(self, *per_side: torch.Tensor) -> torch.Tensor:
        """The rule's transform: records each side's sum over sources (and hidden), keeps it:
        ``[B, K, L(, H)]`` sum to ``[B, K]``; at layers ``[B, K, n_layers, L, H]`` keep their
        layer, ``[B, K, n_layers]``."""
        (values,) = per_side
        layered = values.ndim == 5
        total = values.sum(dim=(-2, -1) if layered else tuple(range(2, values.ndim)))
        self.total = total if self.total is None else self.total + total
        return values


_ACTIVE: contextvars.ContextVar[_References | None] = contextvars.ContextVar(
    "attrax_deeplift", default=None
)


@dataclasses.dataclass(frozen=True)
class _Problem(Problem):
    """The call's problem, whose memory estimate also counts the reference inputs kept per point."""

    def cost(self, saved: bool = True, eager: bool = False) -> Cost:
        base = super().cost(saved, eager)
        if not saved:
            return base
        x = self.inputs[0]
        tokens = sum(xi.shape[1] for xi in self.inputs)
        if self.decoder_embeds is not None:
            tokens += self.decoder_embeds.shape[1]
        config = self.model.hf.config
        width = max(_arch.mlp_width(config), _arch.mixer_width(config, tokens)) or 4 * x.shape[-1]
        kept = x.shape[0] * tokens * width * x.element_size() * _arch.total_layers(config)
        return base._replace(per_point=base.per_point + kept)


class _WithGap:
    """The call, whose labelled result gains the ``completeness_gap`` along ``target``, and
    whose problem counts the reference inputs in its memory plan."""

    def __init__(self, call: Call, gap: Callable[[], torch.Tensor]) -> None:
        self._call = call
        self._gap = gap
        problem = call.problem
        fields = {f.name: getattr(problem, f.name) for f in dataclasses.fields(problem)}
        self.problem = _Problem(**fields)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)

    def label(self, sides: Any, *, target_coords: Any = None, **kwargs: Any) -> xr.DataArray:
        if self._call.options.get("site", "residual") != "residual":
            # a site the residual stream bypasses: the multipliers there carry only what
            # flows through it, which nothing sums to
            return self._call.label(sides, target_coords=target_coords, **kwargs)
        gap = self._gap()
        if gap.ndim == 2:
            coords = {**(target_coords or {}), "completeness_gap": gap}
            return self._call.label(sides, target_coords=coords, **kwargs)
        # at layers: one gap per layer, (target, layer)
        coords = {**(target_coords or {}), **_layers.gap_coords(gap)}
        da = self._call.label(sides, target_coords=coords, **kwargs)
        return _layers.join_gaps(da, gap.shape[-1])


def _routed(kind: str) -> bool:
    """Whether a module class holds a mixture's routed experts (transformers names them all
    ``...Experts``): the rows of their activations are the (token, expert) pairs the router
    picked, or (Llama 4's) every expert stacked on every token's routing-scaled input."""
    return kind.endswith("Experts")


def _check_activations(model: Model, activations: str) -> None:
    """A ModelError for an elementwise activation module the Rescale rule would silently skip,
    or for routed experts, whose activations it cannot match with the reference forward's."""
    for name, module in model.hf.named_modules():
        kind = type(module).__name__
        if _routed(kind):
            # the reference's tokens go to other experts: the i-th rows of the two forwards'
            # activations (sorted by expert, or one call per expert) are other pairs' inputs
            raise ModelError(
                f"DeepLIFT: {type(model.hf).__name__}'s experts ({name!r}, {kind}) run on the "
                "tokens their router picks, which the reference routes elsewhere, so attrax cannot "
                "pair their activations with the reference forward's; attrax has no DeepLIFT for "
                "mixtures of experts (LRP holds their routing constant)"
            )
        if type(module).__module__ not in _ACTIVATION_LIBRARIES or kind in _NOT_ELEMENTWISE:
            continue
        if activation_kind(module) is not None:
            continue
        if activations == "all" or kind in _CAPTUM_ONLY:
            covered = "ReLU, GELU, tanh-GELU, SiLU, Tanh, Sigmoid modules"
            raise ModelError(
                f"DeepLIFT has no Rescale rule for the activation module {name!r} ({kind}); "
                f"attrax rescales {covered}"
                + (
                    ""
                    if activations == "captum"
                    else "; activations='captum' rescales only the "
                    "ReLU/Tanh/Sigmoid modules and keeps the gradient elsewhere"
                )
            )


def _run(core: Callable[..., Rule], call: Call, arguments: dict[str, Any]) -> xr.DataArray:
    check_layer_options(call.options)  # before the problem generates any target
    _check_activations(call.model, arguments["activations"])
    _ = call.problem  # tokenized (targets generated) before any activation is tapped
    references = _References(_KINDS[arguments["activations"]])
    token = _ACTIVE.set(references)
    try:
        with activation_tap(references.tap):
            labelled = _WithGap(call, references.gap)
            return GRADIENT.run(core, labelled, arguments)  # type: ignore[arg-type]
    finally:
        _ACTIVE.reset(token)


def _rescale_rule(problem: Problem, bases: tuple[torch.Tensor, ...], weights: torch.Tensor) -> Rule:
    """DeepLIFT against each of the stacked baselines ``[N, B, L, H]`` (per side), weighted."""
    references = _ACTIVE.get()
    assert references is not None, "the DeepLIFT family sets the references"
    references.weights = weights
    x = problem.inputs

    def points(chunk: torch.Tensor) -> tuple[torch.Tensor, ...]:
        picked = tuple(b[chunk.to(b.device)] for b in bases)
        references.record(problem, chunk, picked)
        return tuple(xi[None].expand_as(p) for xi, p in zip(x, picked, strict=True))

    def deltas(chunk: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(xi[None] - b[chunk.to(b.device)] for xi, b in zip(x, bases, strict=True))

    def origins(chunk: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # at layers: the multiplier is h_l(x) - h_l(b_i) (Captum's LayerDeepLift)
        return tuple(b[chunk.to(b.device)] for b in bases)

    return Rule(points, weights, multiplier=deltas, transform=references.sums, origins=origins)


_ACTIVATIONS_PARAM = Param(
    "all",
    "str",
    check.one_of(*ACTIVATIONS),
    "'all': every elementwise activation (ReLU, GELU, SiLU, tanh, sigmoid) gets the Rescale rule; "
    "'captum': only nn.ReLU/nn.Tanh/nn.Sigmoid modules, as Captum's DeepLift hooks",
)

#: DeepLIFT methods: the gradient family's options, plus ``activations``.
DEEPLIFT = GRADIENT.derive(_run, activations=_ACTIVATIONS_PARAM)


@DEEPLIFT.method(baseline=check.baseline)
def deeplift(
    problem: Problem,
    *,
    baseline: str | torch.Tensor | tuple[torch.Tensor, ...] = "zeros",
) -> Rule:
    """DeepLIFT (Shrikumar et al. 2017), Rescale rule: ``(x - x0) * g``, ``g`` the gradient through
    activations that pass ``(f(u) - f(u0)) / (u - u0)``, ``u0`` their input on the baseline.

    One reference forward, one forward and one vectorized backward per chunk of targets. Linear
    layers, attention, norms and products keep their gradient at the input (Captum's ``DeepLift``
    on what it does not hook), so the attributions' sum is ``f(x) - f(x0)`` only up to the
    ``completeness_gap``: exact when the rules cover every nonlinearity (a ReLU MLP).

    Arguments (others as :func:`saliency`):
        baseline: the reference ``x0``, as :func:`integrated_gradients` takes it: ``"zeros"``,
            ``"pad"``/``"unk"``/``"mask"``, a tensor broadcastable to the embeddings, or a
            tuple of them per attributed side.
        activations: ``"all"`` (default): every elementwise activation (ReLU, GELU, tanh-GELU,
            SiLU, tanh, sigmoid modules) gets the Rescale rule; ``"captum"``: only ReLU, tanh
            and sigmoid modules (Captum hooks ``nn.ReLU``/``nn.Tanh``/``nn.Sigmoid``, not GELU
            or SiLU, whose gradient it keeps). An elementwise activation module without a rule
            (``QuickGELUActivation``, ``nn.ELU``, ...) raises a :class:`ModelError`.
        layers: as :func:`saliency`: attribute to the residual stream at these layers instead
            (Captum's ``LayerDeepLift``): ``(h_l(x) - h_l(x0))`` times the multipliers read at
            the layer's output, the Rescale rule still at every activation downstream.

    Returns:
        DataArray ``(target, source, hidden)`` with a ``completeness_gap`` coordinate along
        ``target``: the attributions' sum minus ``f(x) - f(x0)``. With ``layers``:
        ``(target, source, layer, hidden)``, the gap ``(target, layer)``, per layer.

    >>> import attrax as ax
    >>> da = ax.deeplift(ax.load_model(), "1 2 3 =", " 3 2 1")
    >>> da.dims, "completeness_gap" in da.coords
    (('target', 'source', 'hidden'), True)
    """
    base = baseline_embeddings(problem, baseline)
    return _rescale_rule(problem, tuple(b[None] for b in base), torch.ones(1, dtype=torch.float64))


def _check_samples(value: object, name: str) -> None:
    if value is not None:
        check.positive_int(value, name)


@DEEPLIFT.method(baselines=check.baselines, samples=_check_samples, seed=check.seed)
def deeplift_shap(
    problem: Problem,
    *,
    baselines: Baselines = ("zeros", "pad"),
    samples: int | None = None,
    seed: int = 0,
) -> Rule:
    """DeepLiftSHAP (Lundberg & Lee 2017; Captum's ``DeepLiftShap``): the mean over baselines of
    :func:`deeplift` with each, all baselines stacked as points of one vectorized pass.

    Arguments (others as :func:`deeplift`):
        baselines: the baseline distribution: a list (or tuple) of baselines as :func:`deeplift`
            takes them, or one of them (with both sides attributed, a lone tuple of one tensor
            per side is one baseline). Default: zeros and the pad embedding.
        samples: None (default): every baseline once, Captum's exact mean; an int: that many
            baselines drawn uniformly with replacement, each example from its own CPU generator
            seeded with ``seed`` (``torch.randint(len(baselines), (samples,))``), so batched
            equals single.
        seed: the random seed of the draws.
        layers: as :func:`deeplift` (Captum's ``LayerDeepLiftShap``: the mean over baselines).

    Returns:
        DataArray ``(target, source, hidden)`` with a ``completeness_gap`` coordinate: the
        attributions' sum minus ``f(x) - mean_i f(b_i)`` over the baselines used.

    >>> import attrax as ax
    >>> ax.deeplift_shap(ax.load_model(), "1 2 3 =", " 3 2 1").attrs["method"]
    'deeplift_shap'
    """
    x = problem.inputs
    bases = [baseline_embeddings(problem, b) for b in as_baseline_list(baselines, len(x))]
    stacked = tuple(torch.stack(side) for side in zip(*bases, strict=True))  # [N, B, L, H]
    if samples is not None:
        size = sum(xi.numel() * xi.element_size() for xi in x) + x[0].shape[0] * 8
        problem.hold(
            samples * size,
            "samples",
            samples,
            "its baselines (a copy of the embeddings per sample)",
        )
        index = torch.zeros((samples, x[0].shape[0]), dtype=torch.long)
        for b in range(x[0].shape[0]):  # per example: its draws do not depend on the batch
            generator = torch.Generator().manual_seed(seed)
            index[:, b] = torch.randint(len(bases), (samples,), generator=generator)
        index = index.to(x[0].device)
        batch = torch.arange(x[0].shape[0], device=x[0].device)
        stacked = tuple(s[index, batch[None]] for s in stacked)
    n = stacked[0].shape[0]
    if n == 0:  # pragma: no cover - the checks refuse empty lists
        raise OptionError("`baselines` must name at least one baseline")
    return _rescale_rule(problem, stacked, torch.full((n,), 1.0 / n, dtype=torch.float64))


__all__ = ["ACTIVATIONS", "deeplift", "deeplift_shap"]
