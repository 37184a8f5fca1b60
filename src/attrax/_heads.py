"""Gradients with respect to attention weights: attention x gradient (and its rollout) and head
attribution, over ``(target, source, layer, head)``.

The attention probabilities are made an input of the differentiated function. Every attention
module runs through one attention function registered with transformers' ``AttentionInterface``
(:data:`IMPLEMENTATION`): it calls the module's own eager attention, then, for the layers being
probed, adds ``P @ V`` to the output, ``P`` a zero *probe* the shape of the weights ``A``
(``[B, heads, queries, keys]``). The output is linear in ``A``, so ``d score / d P`` at ``P = 0``
is ``d score / d A``. The probes are the primals of one ``torch.func.vjp`` (read inside the
forward from a context variable); one forward and one backward ``vmap``-ed over one-hot
cotangents give ``d score_k / d A_l`` for every target ``k`` and probed layer ``l`` at once.

Head attribution (Hao et al. 2021) scales one layer's weights to ``alpha * A_l`` (the attention
output scales with it) and integrates the gradient over ``alpha``: the ``(layer, step)`` copies
of the batch run stacked (by default one layer's steps a forward: see :func:`_copy_chunks`), each
scaling its own layer, and each layer's probe is shared by that layer's steps, so its gradient,
the cotangents weighted by the quadrature weights, is the quadrature sum itself.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import torch
import xarray as xr

from . import _routed
from . import _validate as check
from ._attention import Selection, check_maps_name, check_selection, resolve_maps, selection_indices
from ._drop import Drop, averaged, dropping, pulled
from ._engine import Problem, vjp
from ._errors import ModelError, OptionError
from ._gradients import QUADRATURES, check_quadrature_steps, quadrature_nodes
from ._memory import Cost, at_least_float32, full_precision, head_bytes, plan, to_host
from ._model import Model, attention_modules, refuse_no_query_row, selected_keys
from ._protocol import Call, Family
from ._schema import target_coordinates

#: The attention implementation attrax registers with transformers while it probes weights.
IMPLEMENTATION = "attrax_probe"
QUERIES = ("target", "sum")
Key = tuple[str, int]  # (stack, layer index within the stack)

_NO_POINTS = "attention x gradient takes the gradient at the model's own weights: one point"
#: Attention x gradient: one forward, one vectorized backward over targets.
ATTENTION_GRADIENT = Family(
    name="attention_gradient",
    differentiates=True,
    takes=(
        "objective",
        "contrast",
        "positions",
        "attribute_target",
        "chunk_size",
        "max_new_tokens",
        "max_memory",
    ),
    refuses={"batch_size": f"{_NO_POINTS}, there are no points to batch"},
)
#: Head attribution: integrated gradients over the attention weights of each layer.
HEAD_ATTRIBUTION = Family(
    name="head_attribution",
    differentiates=True,
    takes=(
        "objective",
        "contrast",
        "positions",
        "attribute_target",
        "chunk_size",
        "batch_size",
        "max_new_tokens",
        "max_memory",
    ),
    refuses={},
)


@dataclass
class _Probes:
    """What the registered attention function reads during one forward.

    ``where`` places each attention module; ``probes`` are added as ``P @ V`` to the copies
    ``rows[key]`` selects (all copies when absent) after the weights of those copies are scaled
    by ``alpha`` (head attribution); ``inputs[(key, name)]`` are added to the module's
    ``"query"``, ``"key"`` or ``"value"`` before its attention runs; ``seen`` collects each
    module's weights (unless ``keep`` is False), and ``calls`` (when not None) each module's
    attention call.
    """

    where: dict[torch.nn.Module, Key]
    probes: dict[Key, torch.Tensor] = field(default_factory=dict)
    rows: dict[Key, torch.Tensor] = field(default_factory=dict)
    alpha: torch.Tensor | None = None
    inputs: dict[tuple[Key, str], torch.Tensor | Callable[[torch.Tensor], torch.Tensor]] = field(
        default_factory=dict
    )
    seen: dict[Key, torch.Tensor] = field(default_factory=dict)
    calls: dict[Key, AttentionCall] | None = None
    #: whether ``seen`` keeps the weights (every layer's, to the forward's end)
    keep: bool = True


@dataclass(frozen=True)
class AttentionCall:
    """One attention module's call of its eager attention: ``query`` ``[B, heads, Lq, d]``,
    ``key``/``value`` ``[B, kv heads, Lk, d]`` (after rotary embeddings), the additive mask
    and the other keyword arguments, so that :meth:`weights` can rerun its softmax on other
    queries or keys."""

    module: torch.nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    kwargs: dict[str, Any]

    def weights(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, doubled: bool = False
    ) -> torch.Tensor:
        """The module's attention weights ``[B, heads, Lq, keys]`` on these tensors, with this
        call's mask and arguments in ``query``'s dtype; ``doubled``: ``key``/``value`` hold the
        call's keys twice over (``2 * Lk``) and every argument that runs over the keys (the
        mask, a position bias) is repeated to match."""
        length = self.key.shape[2]

        def cast(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            x = x.to(query.dtype) if x.is_floating_point() else x
            if doubled and x.ndim == 4 and x.shape[-1] >= length:
                x = torch.cat([x[..., :length], x[..., :length]], dim=-1)
            return x

        kwargs = {name: cast(arg) for name, arg in self.kwargs.items()}
        kwargs.pop("dropout", None)  # the module's own forward ran in eval mode
        _, weights = _eager(self.module)(self.module, query, key, value, cast(self.mask), **kwargs)
        return weights


_STATE: ContextVar[_Probes | None] = ContextVar("attrax_probes", default=None)


def _probed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's own eager attention, with the probes of :data:`_STATE` added."""
    attention_mask = selected_keys(attention_mask, kwargs, query, key.shape[-2])
    eager = _eager(module)
    state = _STATE.get()
    place = None if state is None else state.where.get(module)
    if state is None or place is None:
        return eager(module, query, key, value, attention_mask, **kwargs)
    query, key, value = (
        _plus(x, state.inputs.get((place, name)))
        for x, name in ((query, "query"), (key, "key"), (value, "value"))
    )
    if state.calls is not None:
        state.calls[place] = AttentionCall(module, query, key, value, attention_mask, kwargs)
    out, weights = eager(module, query, key, value, attention_mask, **kwargs)
    if out.shape[:3] != (weights.shape[0], weights.shape[2], weights.shape[1]):
        raise ModelError(
            f"{type(module).__name__}: eager attention output {tuple(out.shape)} is not "
            "[batch, queries, heads, dim]; attrax cannot probe its weights"
        )
    rows = state.rows.get(place)
    if state.alpha is not None and rows is not None:
        # head attribution: this layer's weights scaled by alpha in its own copies
        scale = torch.where(rows, state.alpha, torch.ones_like(state.alpha)).to(out.dtype)
        out = out * scale.view(-1, 1, 1, 1)
        weights = weights * scale.view(-1, 1, 1, 1)
    if state.keep:
        state.seen[place] = weights
    probe = state.probes.get(place)
    if probe is not None:
        copies = weights.shape[0] // probe.shape[0]
        p = probe.repeat(copies, 1, 1, 1)
        if rows is not None:
            p = p * rows.view(-1, 1, 1, 1).to(p.dtype)
        heads = weights.shape[1]
        v = (
            value
            if value.shape[1] == heads
            else value.repeat_interleave(heads // value.shape[1], 1)
        )
        out = out + (p.to(v.dtype) @ v).transpose(1, 2)
    return out, weights


def _eager(module: torch.nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The eager attention function of ``module``'s transformers module (attrax's own for the
    classes it runs itself: DeBERTa-v2's, GPT-Neo's, BLOOM's)."""
    if _routed.owns(module):
        return _routed.eager(module)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ModelError(
            f"{type(module).__name__}: its module has no eager_attention_forward to probe"
        )
    return eager


def _plus(
    x: torch.Tensor, probe: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None
) -> torch.Tensor:
    """``x`` plus ``probe`` repeated over the stacked copies of the batch (no probe: ``x``; a
    function: ``probe(x)``, :func:`replacing`'s)."""
    if probe is None:
        return x
    if callable(probe):
        return probe(x)
    return x + probe.repeat(x.shape[0] // probe.shape[0], 1, 1, 1).to(x.dtype)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPLEMENTATION, _probed_attention)
    _routed.accept(IMPLEMENTATION, _probed_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)  # the additive masks of eager


_register()


def _placed(model: Model) -> dict[torch.nn.Module, Key]:
    """Each attention module with its stack and layer index (in the order layers run)."""
    found = attention_modules(model.hf)
    if not found:
        raise ModelError(
            f"{type(model.hf).__name__}: attrax finds no attention modules in it to probe "
            "(its transformers class records no attentions)"
        )
    count: dict[str, int] = {}
    where: dict[torch.nn.Module, Key] = {}
    for module, (stack, _) in found.items():
        # a recorded wrapper (T5LayerSelfAttention) places the attention module inside it
        for sub in module.modules():
            where.setdefault(sub, (stack, count.get(stack, 0)))
        count[stack] = count.get(stack, 0) + 1
    return where


def _probes_at(model: Model, where: dict[torch.nn.Module, Key] | None = None) -> _Probes:
    """Probes of ``model``'s attention that keep no weights, none set yet."""
    return _Probes(where if where is not None else _placed(model), keep=False)


@contextlib.contextmanager
def _probing(model: Model, state: _Probes) -> Iterator[None]:
    """Forwards inside run attention through :func:`_probed_attention` with ``state``."""
    token = _STATE.set(state)
    saved = model.attn_implementation
    model.attn_implementation = IMPLEMENTATION  # Model.hidden_at switches to it per forward
    try:
        yield
    finally:
        model.attn_implementation = saved
        _STATE.reset(token)


def _forward(
    problem: Problem, state: _Probes, n: int, drop: Drop | None = None
) -> Callable[..., torch.Tensor]:
    """``h(*probes)``: the head inputs ``[n * B, K, H]`` of ``n`` stacked copies (a classifier's
    class logits), with the probes in ``state`` (and the blocks of ``drop`` routed for
    GradDrop)."""
    model = problem.model
    keys, names = list(state.probes), list(state.inputs)
    hidden = problem.hidden_fn(n)
    x = tuple(xi.repeat(n, 1, 1) for xi in problem.inputs)

    def h(*probes: torch.Tensor) -> torch.Tensor:
        state.probes = dict(zip(keys, probes[: len(keys)], strict=True))
        state.inputs = dict(zip(names, probes[len(keys) :], strict=True))
        with _probing(model, state), dropping(drop):
            return hidden(*x)

    return h


def _weights(problem: Problem, keys: Sequence[Key]) -> dict[Key, torch.Tensor]:
    """Every probed layer's attention weights ``[B, heads, queries, keys]`` from one forward."""
    state = _Probes(_placed(problem.model))
    with torch.no_grad():
        _forward(problem, state, 1)()
    missing = [key for key in keys if key not in state.seen]
    if missing:
        raise ModelError(
            f"{type(problem.model.hf).__name__} did not run its attention through transformers' "
            f"AttentionInterface for {missing} (stack, layer): attrax cannot probe its weights"
        )
    return {key: state.seen[key].detach() for key in keys}


def _gradients(
    problem: Problem,
    maps: dict[Key, torch.Tensor],
    chunk_size: int | None,
    n: int = 1,
    rows: dict[Key, torch.Tensor] | None = None,
    alpha: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    inputs: dict[tuple[Key, str], torch.Tensor] | None = None,
    drop: Drop | None = None,
) -> Iterator[tuple[slice, dict[Any, torch.Tensor]]]:
    """``sum_c weights[c] * d score_k / d A`` over the ``n`` copies, ``[k, B, H, Q, keys]`` per
    probed layer, for ``chunk_size`` targets ``k`` at a time (each chunk is reduced by the caller
    before the next is computed): one forward, then one backward ``vmap``-ed over a chunk's
    targets. With ``inputs`` (tensors shaped as a module's query, key or value, by ``(key,
    name)``) the gradients w.r.t. those attention inputs come with them, by the same keys; with
    ``drop``, each gradient ``[L, k, ...]``: one per layer dropped (GradDrop)."""
    state = _Probes(_placed(problem.model), rows=rows or {}, alpha=alpha)
    state.probes = {key: torch.zeros_like(a) for key, a in maps.items()}
    zeros = {key: torch.zeros_like(a) for key, a in (inputs or {}).items()}
    state.inputs = {**zeros}
    probes = [*state.probes.values(), *zeros.values()]
    hidden, pullback = vjp(_forward(problem, state, n, drop), *probes)
    valid = problem.tensors.valid.to(hidden.dtype).repeat(n, 1)  # [n * B, K]
    if weights is not None:
        valid = valid * weights.to(hidden.dtype).repeat_interleave(valid.shape[0] // n)[:, None]
    # score k depends on head input k only: one backward through the head gives every
    # d score_k / d h_k, so the vocabulary never enters the per-target backward
    _, head_pullback = vjp(problem.head_objective, hidden)
    (head_grad,) = head_pullback(valid)
    width = hidden.shape[1]
    one_hot = torch.eye(width, dtype=hidden.dtype, device=hidden.device)

    def cotangent(slots: slice) -> torch.Tensor:  # target k: d score_k
        return one_hot[slots, None, :, None] * head_grad[None]

    for slots, grads in pulled(pullback, cotangent, width, chunk_size, drop):
        yield slots, dict(zip([*maps, *(inputs or {})], grads, strict=True))


def _rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[K, B, H, Q, keys]`` -> ``[B, K, keys, H]``: the query row ``index[b, k]`` of target k."""
    k = torch.arange(values.shape[0], device=values.device)[:, None]
    b = torch.arange(values.shape[1], device=values.device)[None, :]
    return values[k, b, :, index.T, :].permute(1, 0, 3, 2)  # [K, B, H, keys] -> [B, K, keys, H]


def _per_query(values: torch.Tensor, index: torch.Tensor, queries: str) -> torch.Tensor:
    if queries == "sum":
        return values.sum(3).permute(1, 0, 3, 2)
    return _rows(values, index)


def _stacks(model: Model, maps: str, attribute_target: bool, queries: str) -> list[str]:
    """The attention stacks a row result reads, checked against ``queries``."""
    if maps == "encoder":
        if queries != "sum":
            raise OptionError(
                "`maps='encoder'`: encoder self-attention has no row of a target's query; use "
                "queries='sum' (each key summed over the encoder queries) or maps='cross'"
            )
        if attribute_target:
            raise OptionError("`attribute_target=True` does not apply to maps='encoder'")
        return ["encoder"]
    if maps == "self":
        return ["self"]
    return ["cross", "decoder"][: 1 + attribute_target]


def _chosen(stacks: Sequence[str], layers: Selection, counts: dict[str, int]) -> list[int]:
    n = counts.get(stacks[0], 0)
    if n == 0:
        raise ModelError(f"the model has no {stacks[0]!r} attention layers")
    return selection_indices(layers, n, "layers", "layers")


def stack_layers(model: Model, stack: str, layers: Selection) -> list[int]:
    """The indices ``layers`` selects among ``stack``'s attention layers (a ModelError where the
    model has none)."""
    return _chosen([stack], layers, _counts(model))


def _counts(model: Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for stack, _ in set(_placed(model).values()):
        counts[stack] = counts.get(stack, 0) + 1
    return counts


def _check_queries(value: object, name: str) -> None:
    check.one_of(*QUERIES)(value, name)


def _cost(
    problem: Problem,
    maps: dict[Any, torch.Tensor],
    probed: int | None = None,
    held: int = 0,
    rows: int = 1,
) -> Cost:
    """The estimate: the engine's backward through eager attention (the probes run there,
    whatever the model's attention), plus every target's head rows at each point (one backward
    through the head serves all the chunks), plus what each target's gradients of the probes
    hold (the gradients, their product with ``A`` and a working copy) for the ``probed`` largest
    maps one backward differentiates (None: all of them), plus ``held`` bytes kept throughout;
    ``rows`` cotangents a target (GradDrop's one per layer)."""
    cost = problem.cost(eager=True)
    x = problem.inputs[0]
    targets = problem.tensors.valid.shape[1]
    head = head_bytes(
        x.shape[0], targets, problem.model.head_width, x.element_size(), backward=True
    )
    sizes = sorted((a.numel() * a.element_size() for a in maps.values()), reverse=True)
    per_target = 3 * rows * sum(sizes[:probed])  # per target, whatever its points
    per_cotangent = rows * cost.per_cotangent
    return Cost(per_cotangent, cost.per_point + head, cost.fixed + held, per_target)


def _plan(
    problem: Problem,
    maps: dict[Any, torch.Tensor],
    points: int,
    batch_size: Any,
    chunk_size: Any,
    probed: int | None = None,
    held: int = 0,
    rows: int = 1,
) -> tuple[int | None, int | None]:
    """``"auto"`` sizes within the budget, by :func:`_cost`."""
    cost = _cost(problem, maps, probed, held, rows)
    targets = problem.tensors.valid.shape[1]
    device = problem.inputs[0].device
    return plan(points, targets, batch_size, chunk_size, cost, device, problem.max_memory)


@ATTENTION_GRADIENT.method(
    layers=check_selection, heads=check_selection, maps=check_maps_name, rollout=check.boolean,
    queries=_check_queries,
)  # fmt: skip
def attention_x_gradient(
    call: Call,
    *,
    layers: Selection = None,
    heads: Selection = None,
    maps: str | None = None,
    rollout: bool = False,
    queries: str = "target",
) -> xr.DataArray:
    """Attention maps times their gradients (Chefer et al. 2021), per target, layer and head.

    ``A_l * d score_k / d A_l`` for every layer ``l`` and target ``k``, from one forward and one
    vectorized backward over the targets. ``rollout=True`` gives the paper's relevance
    propagation instead: ``R = I``, then per layer ``R <- R + mean_heads(relu(grad * A)) @ R``
    (encoder-decoders: the encoder the same way, then per decoder layer its self-attention
    ``R_tt <- R_tt + Abar R_tt``, ``R_ts <- R_ts + Abar R_ts`` and its cross-attention
    ``R_ts <- R_ts + norm(R_tt)^T Abar norm(R_ss)``, norm being the paper's Eq. 8-9).

    Arguments:
        model, inputs, targets, objective, positions, ...: as :func:`attrax.saliency`.
        layers, heads: the layers / heads kept (an int, range, slice or list of ints); with
            ``rollout`` the layers rolled through and the heads averaged.
        maps: ``None`` (the model's default), ``"self"``, ``"cross"`` or ``"encoder"`` as
            :func:`attrax.attention`.
        rollout: relevance rolled out across layers, ``(target, source)``.
        queries: ``"target"`` (default): the row of the query that predicts each target (the
            pooled position of a sequence classifier, each token's own of a token classifier);
            ``"sum"``: each key summed over every query (needed for ``maps="encoder"``).

    Returns:
        DataArray ``([example,] target, source, layer, head)``; with ``rollout``
        ``([example,] target, source)``.

    >>> import attrax as ax
    >>> da = ax.attention_x_gradient(ax.load_model(), "1 2 3 =", " 3 2 1")
    >>> da.dims
    ('target', 'source', 'layer', 'head')
    >>> ax.attention_x_gradient(ax.load_model(), "1 2 3 =", " 3 2 1", rollout=True).dims
    ('target', 'source')
    """
    model = call.model
    if queries == "target" or rollout:
        refuse_no_query_row(model, "attention_x_gradient")
    if rollout and maps is not None:
        raise OptionError(
            f"`maps={maps!r}` does not apply with rollout=True: the rollout runs through every "
            "attention stack of the model"
        )
    maps = resolve_maps(model, maps)
    attribute_target = call.options["attribute_target"]
    counts = _counts(model)
    if rollout:
        if queries != "target":
            raise OptionError("`queries` does not apply with rollout=True")
        return _rollout(call, layers, heads, counts)
    stacks = _stacks(model, maps, attribute_target, queries)
    chosen_layers = _chosen(stacks, layers, counts)
    problem = call.problem
    keys = [(stack, layer) for stack in stacks for layer in chosen_layers]
    weights = _weights(problem, keys)
    chosen_heads = selection_indices(heads, weights[keys[0]].shape[1], "heads", "heads per layer")
    _, chunk = _plan(problem, weights, 1, None, call.options["chunk_size"])
    index = problem.tensors.index
    pieces: dict[str, list[torch.Tensor]] = {stack: [] for stack in stacks}
    for slots, grads in _gradients(problem, weights, chunk):
        for stack in stacks:
            per_layer = [
                _per_query(
                    weights[(stack, layer)][None] * grads[(stack, layer)], index[:, slots], queries
                )
                for layer in chosen_layers
            ]
            pieces[stack].append(torch.stack(per_layer, dim=-2)[..., chosen_heads])
    sides = [full_precision(torch.cat(pieces[stack], dim=1)) for stack in stacks]
    return call.label(
        sides,
        trailing=("layer", "head"),
        trailing_coords={"layer": chosen_layers, "head": chosen_heads},
    )


def _relevance(a: torch.Tensor, g: torch.Tensor, heads: Selection) -> torch.Tensor:
    """``mean_heads(relu(grad * A))``: ``[K, B, Q, keys]`` (Chefer et al. Eq. 5)."""
    chosen = selection_indices(heads, a.shape[1], "heads", "heads per layer")
    return (a[None] * g)[:, :, chosen].clamp(min=0).mean(2)


def _eye(like: torch.Tensor, n: int) -> torch.Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device).expand(*like.shape[:2], n, n)


def _normalized(r: torch.Tensor) -> torch.Tensor:
    """Eq. 8-9: ``R_hat = R - I`` rows scaled to sum 1, plus ``I`` (rows summing to 0: ``I``)."""
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    hat = r - eye
    total = hat.sum(-1, keepdim=True)
    return torch.where(total != 0, hat / torch.where(total != 0, total, 1), 0) + eye


def _rollout(
    call: Call, layers: Selection, heads: Selection, counts: dict[str, int]
) -> xr.DataArray:
    model = call.model
    problem = call.problem
    index = problem.tensors.index
    stacks = ["encoder", "decoder", "cross"] if model.is_encoder_decoder else ["self"]
    first = stacks[-1] if model.is_encoder_decoder else "self"
    chosen = selection_indices(layers, counts.get(first, 0), "layers", "layers")
    keys = [(s, layer) for s in stacks for layer in range(counts.get(s, 0))]
    if model.is_encoder_decoder:  # the encoder fully, the chosen decoder layers
        keys = [k for k in keys if k[0] == "encoder" or k[1] in chosen]
    else:
        keys = [k for k in keys if k[1] in chosen]
    weights = _weights(problem, keys)
    selection_indices(
        heads, weights[keys[-1]].shape[1], "heads", "heads per layer"
    )  # before the backward
    _, chunk = _plan(problem, weights, 1, None, call.options["chunk_size"])
    pieces: list[list[torch.Tensor]] = []
    for slots, grads in _gradients(problem, weights, chunk):
        relevance = {key: _relevance(weights[key], grads[key], heads) for key in keys}
        del grads
        pieces.append(_rolled(relevance, keys, chosen, problem, index[:, slots], call))
    sides = [torch.cat([piece[side] for piece in pieces], dim=1) for side in range(len(pieces[0]))]
    return call.label([full_precision(s) for s in sides], trailing=())


def _rolled(
    relevance: dict[Key, torch.Tensor],
    keys: Sequence[Key],
    chosen: Sequence[int],
    problem: Problem,
    index: torch.Tensor,
    call: Call,
) -> list[torch.Tensor]:
    """The rolled-out rows ``[B, k, source]`` per side of the targets ``index`` [B, k] whose
    relevances ``[k, B, Q, keys]`` are given."""
    if not problem.model.is_encoder_decoder:
        r = None
        for key in keys:  # in the order the layers run
            step = relevance[key]
            r = _eye(step, step.shape[-1]) if r is None else r
            r = r + step @ r
        assert r is not None
        return [_rollout_rows(r, index)]
    enc = [k for k in keys if k[0] == "encoder"]
    some = relevance[enc[0]]
    r_ss = _eye(some, some.shape[-1]).clone()
    for key in enc:
        r_ss = r_ss + relevance[key] @ r_ss
    decoder_mask = problem.tensors.decoder_mask
    assert decoder_mask is not None
    length = decoder_mask.shape[1]
    r_tt = _eye(some, length).clone()
    r_ts = some.new_zeros(some.shape[0], some.shape[1], length, some.shape[-1])
    for layer in sorted(chosen):  # in the order the layers run, whatever order they were given
        own, cross = relevance[("decoder", layer)], relevance[("cross", layer)]
        r_tt, r_ts = r_tt + own @ r_tt, r_ts + own @ r_ts
        r_ts = r_ts + _normalized(r_tt).transpose(-1, -2) @ cross @ _normalized(r_ss)
    sides = [_rollout_rows(r_ts, index)]
    if call.options["attribute_target"]:
        sides.append(_rollout_rows(r_tt, index))
    return sides


def _rollout_rows(r: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[K, B, Q, keys]`` -> ``[B, K, keys]``: the row of each target's query."""
    k = torch.arange(r.shape[0], device=r.device)[:, None]
    b = torch.arange(r.shape[1], device=r.device)[None, :]
    return r[k, b, index.T].transpose(0, 1)


@HEAD_ATTRIBUTION.method(
    check_quadrature_steps,
    layers=check_selection, heads=check_selection, maps=check_maps_name, queries=_check_queries,
    steps=check.positive_int, quadrature=check.one_of(*QUADRATURES),
)  # fmt: skip
def head_attribution(
    call: Call,
    *,
    layers: Selection = None,
    heads: Selection = None,
    maps: str | None = None,
    queries: str = "target",
    steps: int = 20,
    quadrature: str = "riemann_right",
) -> xr.DataArray:
    """Self-attention attribution (Hao et al. 2021): integrated gradients over each layer's
    attention weights, per target, layer and head.

    ``A_l * integral_0^1 d score_k(alpha A_l) / d A_l d alpha``, the weights of layer ``l`` (all
    its heads) scaled together from 0 while the other layers keep theirs. Its sum over heads,
    queries and keys is ``score_k(A) - score_k(A_l = 0)`` up to the quadrature error
    (completeness, per layer). The (layer, step) copies of the batch run in stacked forwards
    (by default one per layer, all its steps stacked), every target in one vectorized backward.

    Arguments:
        model, inputs, targets, objective, positions, ...: as :func:`attrax.saliency`.
        layers, heads, maps, queries: as :func:`attrax.attention_x_gradient`.
        steps, quadrature: the quadrature of the integral (the paper: 20 Riemann steps,
            ``"riemann_right"``); as :func:`attrax.integrated_gradients`.
        batch_size: (layer, step) copies per forward: ``"auto"`` as many steps of one layer
            as fit in memory (never two layers: a stacked backward would run every copy through
            the layers below the lowest one scaled), an int that many copies, None every copy
            of every layer in one stacked forward.

    Returns:
        DataArray ``([example,] target, source, layer, head)`` with a ``head_total`` coordinate
        ``([example,] target, layer, head)``: each head's attribution summed over every query
        and key (the paper's head importance).

    >>> import attrax as ax
    >>> da = ax.head_attribution(ax.load_model(), "1 2 3 =", " 3 2 1", steps=4)
    >>> da.dims, da.head_total.dims
    (('target', 'source', 'layer', 'head'), ('target', 'layer', 'head'))
    """
    model = call.model
    if queries == "target":
        refuse_no_query_row(model, "head_attribution")
    maps = resolve_maps(model, maps)
    counts = _counts(model)
    stacks = _stacks(model, maps, call.options["attribute_target"], queries)
    chosen_layers = _chosen(stacks, layers, counts)
    problem = call.problem
    keys = [(stack, layer) for stack in stacks for layer in chosen_layers]
    weights = _weights(problem, keys)
    chosen_heads = selection_indices(heads, weights[keys[0]].shape[1], "heads", "heads per layer")
    alphas, step_weights = quadrature_nodes(quadrature, steps)
    x = problem.inputs[0]
    alpha = torch.as_tensor(alphas, dtype=x.dtype, device=x.device)
    w = torch.as_tensor(step_weights, dtype=x.dtype, device=x.device)
    total = len(keys) * steps  # copy c: block c // steps scaled by alpha[c % steps]
    given = call.options["batch_size"]
    batch_size, chunk_size = _plan(
        problem,
        weights,
        total,
        given,
        call.options["chunk_size"],
        _layers_per_forward(given, steps, total),
    )
    index = problem.tensors.index
    b, width = index.shape
    # per layer, summed over the copy chunks: the target rows [B, K, keys, H] and the head
    # totals [B, K, H] of A * sum_i w_i grad (linear in the gradients)
    acc = at_least_float32(x.dtype)  # the steps' sums
    rows_of = {
        k: a.new_zeros(b, width, a.shape[-1], a.shape[1], dtype=acc) for k, a in weights.items()
    }
    totals_of = {k: a.new_zeros(b, width, a.shape[1], dtype=acc) for k, a in weights.items()}
    for copies in _copy_chunks(total, steps, batch_size, call.options["batch_size"]):
        copies = copies.to(x.device)
        block, at = copies // steps, copies % steps
        present = sorted(set(block.tolist()))
        grads = _gradients(
            problem,
            {keys[j]: weights[keys[j]] for j in present},
            chunk_size,
            n=len(copies),
            rows={keys[j]: (block == j).repeat_interleave(b) for j in present},
            alpha=alpha[at].repeat_interleave(b),
            weights=w[at],
        )
        for slots, chunk in grads:
            for key, g in chunk.items():
                attributed = weights[key][None] * g  # [k, B, H, Q, keys]
                rows_of[key][:, slots] += _per_query(attributed, index[:, slots], queries)
                totals_of[key][:, slots] += attributed.sum((3, 4)).transpose(0, 1)
    sides, head_totals = [], []
    for stack in stacks:
        per_layer = [rows_of[(stack, layer)] for layer in chosen_layers]
        totals = [totals_of[(stack, layer)] for layer in chosen_layers]
        sides.append(full_precision(torch.stack(per_layer, dim=-2)[..., chosen_heads]))
        head_totals.append(torch.stack(totals, dim=-2)[..., chosen_heads])
    da = call.label(
        sides,
        trailing=("layer", "head"),
        trailing_coords={"layer": chosen_layers, "head": chosen_heads},
    )
    # stacks is never empty: the sum is a tensor, not sum's start of 0
    return _with_head_total(da, call, full_precision(cast(torch.Tensor, sum(head_totals))))


def _layers_per_forward(given: Any, steps: int, total: int) -> int:
    """The most layers whose copies one forward of :func:`_copy_chunks` holds (one under
    ``"auto"``, at any planned size)."""
    largest = None if given in (None, "auto") else int(given)
    return max(len(set((c // steps).tolist())) for c in _copy_chunks(total, steps, largest, given))


def _copy_chunks(total: int, steps: int, batch_size: int | None, given: Any) -> list[torch.Tensor]:
    """The (layer, step) copies of each forward.

    ``batch_size`` given (an int, or None: every copy in one stacked forward) cuts the copies
    as it says. ``"auto"`` never mixes layers in one forward: a stacked backward runs through
    every layer below the lowest scaled one for all copies, so copies of a high layer would pay
    for the layers under a low one (measured in docs/methods/internals.md).
    """
    every = torch.arange(total)
    if given != "auto":
        step = total if batch_size is None else batch_size
        return list(every.split(step))  # chunking only: bounds memory
    step = min(batch_size or total, steps)
    return [piece for block in every.split(steps) for piece in block.split(step)]


def _with_head_total(da: xr.DataArray, call: Call, totals: torch.Tensor) -> xr.DataArray:
    """``head_total`` ``([example,] target, layer, head)`` from per-example ``[B, K, layer,
    head]``, targets placed as :func:`~attrax._schema.label` places them."""
    values = to_host(totals)
    examples = call.batch.examples
    _, row_of, _ = target_coordinates(call.model, call.batch)
    dense = np.full((len(examples), da.sizes["target"], *values.shape[2:]), np.nan)
    for b, example in enumerate(examples):
        for k, p in enumerate(example.positions):
            dense[b, row_of[p]] = values[b, k]
    if "example" not in da.dims:
        return da.assign_coords(head_total=(("target", "layer", "head"), dense[0]))
    return da.assign_coords(head_total=(("example", "target", "layer", "head"), dense))


# --- attribution patching of the attention inputs (AtP and AtP*'s QK fix) ---------------------

#: The attention inputs attribution patching patches, and the argument each is of the attention.
ATTENTION_INPUTS = {"queries": "query", "keys": "key", "values": "value"}


def record_calls(
    problem: Problem,
    keys: Sequence[Key],
    site: str,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    types: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
) -> _Probes:
    """One forward of ``embeds`` (:meth:`Problem.hidden_of`) with every attention call
    recorded (``calls``) and its weights (``seen``); a ModelError where a layer of ``keys`` ran
    its attention elsewhere (``site``: what the caller patches, for the message)."""
    model = problem.model
    state = _Probes(_placed(model), calls={})
    with torch.no_grad(), _probing(model, state):
        problem.hidden_of(embeds, mask, types, ids)
    assert state.calls is not None
    missing = [key for key in keys if key not in state.calls]
    if missing:
        raise ModelError(
            f"{type(model.hf).__name__} did not run its attention through transformers' "
            f"AttentionInterface for {missing} (stack, layer): attrax cannot patch its {site}"
        )
    return state


@contextlib.contextmanager
def replacing(
    model: Model, replace: Mapping[tuple[Key, str], Callable[[torch.Tensor], torch.Tensor]]
) -> Iterator[None]:
    """Forwards inside run each attention's ``"query"``, ``"key"`` or ``"value"`` (after rotary
    embeddings, ``[copies * B, heads, L, d]``) through ``replace[(key, name)]`` where given."""
    with _probing(model, _Probes(_placed(model), inputs={**replace}, keep=False)):
        yield


def patch_attention_inputs(
    call: Call,
    corrupt: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]
    | Callable[[torch.Tensor], torch.Tensor],
    stack: str,
    site: str,
    qk_fix: bool,
    layers: Selection,
    heads: Selection,
    drop: Drop | None = None,
) -> tuple[torch.Tensor, list[int], list[int]]:
    """Attribution patching of one stack's queries, keys or values (``site``), one head's vector
    at one position a node: ``[B, K, positions, layer, head]`` with the chosen layers and heads
    (keys and values: the key/value heads).

    ``corrupt`` holds the corrupted run's input embeddings, mask, segment ids and token ids, or
    is a function giving the corrupted vectors from the clean ones (an ablation).
    Plain AtP is ``grad . (corrupted - clean)`` of each vector. With ``qk_fix`` (AtP*, Kramar et
    al. 2024), a query's or key's effect goes through its softmax exactly: ``sum dS/dA * (A' -
    A)`` with ``A'`` the attention pattern recomputed with that one query (key) corrupted,
    ``dS/dA`` every target's gradient of the layer's probabilities from one vectorized backward.
    With ``drop``, each estimate is GradDrop's average over the dropped layers
    (:func:`attrax._drop.averaged`).
    """
    problem = call.problem
    model, t = problem.model, problem.tensors
    chosen_layers = _chosen([stack], layers, _counts(model))
    keys = [(stack, layer) for layer in chosen_layers]
    name = ATTENTION_INPUTS[site]

    clean = record_calls(problem, keys, site, problem.inputs[0], t.mask)
    assert clean.calls is not None
    corrupt_calls: dict[Key, AttentionCall] | None
    if callable(corrupt):  # the clean calls, this site's vectors changed
        ablate = corrupt

        def ablated(call: AttentionCall) -> AttentionCall:
            changed: dict[str, Any] = {name: ablate(getattr(call, name))}
            return replace(call, **changed)

        corrupt_calls = {key: ablated(clean.calls[key]) for key in keys}
    else:
        corrupt_calls = record_calls(problem, keys, site, *corrupt).calls
    assert corrupt_calls is not None
    first = clean.calls[keys[0]]
    kv_heads = first.key.shape[1]
    total = first.query.shape[1] if site == "queries" else kv_heads
    what = "heads per layer" if site == "queries" else "key/value heads per layer"
    chosen_heads = selection_indices(heads, total, "heads", what)
    fixed = qk_fix and site != "values"
    maps: dict[Key, torch.Tensor]
    inputs: dict[tuple[Key, str], torch.Tensor] | None
    if fixed:  # the softmax recomputed: coefficients of dS/dA, then A's probes
        coefficients = {
            key: _softmax_changes(clean.calls[key], corrupt_calls[key], site) for key in keys
        }
        maps, inputs = {key: clean.seen[key] for key in keys}, None
        held = sum(c.numel() * c.element_size() for key in keys for c in coefficients[key])
    else:  # plain AtP: the inputs' own gradients
        deltas = {
            key: full_precision(getattr(corrupt_calls[key], name) - getattr(clean.calls[key], name))
            for key in keys
        }
        maps = {}
        inputs = {(key, name): getattr(clean.calls[key], name) for key in keys}
        held = sum(d.numel() * d.element_size() for d in deltas.values())
    del clean, corrupt_calls
    probed: dict[Any, torch.Tensor] = {**maps, **(inputs or {})}  # keyed by map or input
    rows = 1 if drop is None else len(drop.blocks)
    _, chunk = _plan(problem, probed, 1, None, call.options["chunk_size"], held=held, rows=rows)
    pieces: list[list[torch.Tensor]] = [[] for _ in keys]
    # leading dims of each gradient: [k] (one per target), with GradDrop [L, k]
    for _, grads in _gradients(problem, maps, chunk, inputs=inputs, drop=drop):
        for i, key in enumerate(keys):
            if not fixed:
                grad = full_precision(grads[(key, name)])  # [..., B, heads, L, d]
                effect = torch.einsum("...bhld,bhld->...bhl", grad, deltas[key])
            elif site == "queries":
                (change,) = coefficients[key]
                grad = full_precision(grads[key])  # [..., B, H, T, S]
                effect = torch.einsum("...bhts,bhts->...bht", grad, change.to(grad.dtype))
            else:
                grad = full_precision(grads[key])
                a, gamma, delta = (c.to(grad.dtype) for c in coefficients[key])
                mixed = torch.einsum("...bhts,bhts->...bht", grad, a)
                effect = torch.einsum("...bht,bhts->...bhs", mixed, gamma)
                effect = effect + torch.einsum("...bhts,bhts->...bhs", grad, delta)
                effect = effect.unflatten(-2, (kv_heads, -1)).sum(-2)  # a key serves its group
            effect = averaged(effect, drop)  # [k, B, heads, positions]
            pieces[i].append(effect[:, :, chosen_heads].permute(1, 0, 3, 2))  # [B, k, L, h]
    stacked = torch.stack([torch.cat(p, dim=1) for p in pieces], dim=3)
    return stacked, chosen_layers, chosen_heads


def _softmax_changes(
    clean: AttentionCall, corrupt: AttentionCall, site: str
) -> tuple[torch.Tensor, ...]:
    """What one corrupted query or key does to the module's attention probabilities, exactly,
    in float64 where its eager attention allows (``[B, heads, queries, keys]`` each).

    Queries: ``A' - A``, each query's row with its own query corrupted (a row depends on its
    query alone, so all rows come from one call). Keys: the attention run once on the clean
    keys followed by the corrupted ones; splitting it, ``P_c`` and ``P_p``, shares one
    normaliser per row, so with ``c = sum(P_c)`` (plus what an attention sink takes, ``1 -
    sum(P_c) - sum(P_p)``) and ``d_s = c - P_c[s] + P_p[s]`` the row with
    key ``s`` alone corrupted is ``P_c / d_s`` off ``s`` and ``P_p[s] / d_s`` at it. Returned:
    ``A = P_c / c``, ``gamma = c / d - 1`` (how every other probability of the row scales) and
    ``delta = P_p / d - A - A * gamma``, so that key ``s``'s effect is ``sum_t (sum_s' G A)_t
    gamma_ts + sum_t G_ts delta_ts``.
    """
    wide = torch.float64
    q, k, v = (x.to(wide) for x in (clean.query, clean.key, clean.value))
    if site == "queries":
        return (clean.weights(corrupt.query.to(wide), k, v) - clean.weights(q, k, v),)
    keys, values = torch.cat([k, corrupt.key.to(wide)], 2), torch.cat([v, v], 2)
    both = clean.weights(q, keys, values, doubled=True).to(wide)
    own, patched = both.split(k.shape[2], dim=-1)
    # an attention sink (GPT-OSS) takes what the keys leave: a key never corrupted
    sink = (1 - own.sum(-1, keepdim=True) - patched.sum(-1, keepdim=True)).clamp(min=0)
    c = own.sum(-1, keepdim=True) + sink
    a = own / c
    if not torch.allclose(a, clean.weights(q, k, v).to(wide), rtol=1e-3, atol=1e-5):
        raise ModelError(
            f"{type(clean.module).__name__}: its attention is not a softmax over the keys alone "
            "(attrax recomputes it with one key corrupted); use qk_fix=False for plain AtP"
        )
    d = c - own + patched
    ok = d > 0  # zero only where the whole row underflows: that key cannot move it
    gamma = torch.where(ok, c / d.where(ok, 1.0) - 1, 0.0)
    delta = torch.where(ok, patched / d.where(ok, 1.0), a) - a - a * gamma
    return a, gamma, delta


__all__ = ["IMPLEMENTATION", "attention_x_gradient", "head_attribution"]
