"""Layer-wise attribution for the gradient methods (``layers=``), from one vectorized backward.

Layers index the residual stream as Hugging Face's ``output_hidden_states`` does: ``0`` is the
input of the first block (the embedding output: token embeddings plus positions, scaled, normed,
whatever the model does before its first block), ``l`` the output of block ``l`` (1-based). The
last one, ``L``, is the last block's output *before* the final norm (``ln_f``/``norm``), as
Captum's layer methods on ``model.transformer.h[-1]`` see it (Hugging Face's last
``hidden_states`` entry has the norm applied for GPT-2, Llama and T5). Encoder-decoders: the
encoder's blocks; classifiers: their one stack.

How: every requested layer's output gets a zero *probe* added by a forward hook, the probes
are primals of ``torch.func.vjp``, and the one ``vmap``-ed pullback over one-hot target
cotangents gives ``d score_k / d h_l`` for every target and layer at once. Integrated gradients
interpolate the layer's own activations (Captum's ``LayerIntegratedGradients``): the batch
holds one copy of the points per layer, and copy ``l`` has block ``l``'s output replaced by
``h_l(x') + a (h_l(x) - h_l(x'))`` (one forward for every layer and step, no loop over layers).

``site=`` reads another activation of each block ``0..L-1`` instead of the residual stream
(:mod:`attrax._sites` finds them): its attention's output (the output projection's), its
MLP's output or its MLP's neurons (the input of the MLP's output projection: ``act(gate) *
up`` in a gated MLP), as Captum's layer methods on those modules.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import xarray as xr

from . import _arch
from ._engine import PointFn, Problem, vjp
from ._errors import ModelError, OptionError
from ._memory import Size, at_least_float32, between_passes, plan_forwards
from ._model import Model, refuse_seq2seq_classifier
from ._sites import Stack, in_width, neuron_width, patch_stack, site_hook

#: what ``layers=`` accepts besides ints
ALL = "all"
Layers = int | Sequence[int] | slice | str | None
#: where ``layers=`` reads (``site=``): the residual stream at ``0..L``, or per block ``0..L-1``
#: its attention's output, its MLP's output, its MLP's neurons, or its heads' outputs (the
#: attention output projection's input, split per head)
SITES = ("residual", "attention", "mlp", "neurons", "heads")


@dataclass(frozen=True)
class At:
    """Where the gradients are read: ``site`` of each of ``layers`` (:func:`resolve`), the
    activation ``width`` wide (None: the residual stream's) and, off the residual stream, the
    module each layer's hook goes on; its length is the number of layers."""

    layers: list[int]
    site: str = "residual"
    width: int | None = None
    modules: tuple[torch.nn.Module, ...] = ()
    #: the heads the width splits into (site "heads")
    heads: int | None = None

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def dim(self) -> str:
        """The dim along the activation's features: ``neuron`` for neurons, else ``hidden``."""
        return "neuron" if self.site == "neurons" else "hidden"


def check_site(value: object, name: str) -> None:
    """One of :data:`SITES`.

    >>> check_site("head", "site")
    Traceback (most recent call last):
    attrax._errors.OptionError: `site` must be one of ('residual', 'attention', 'mlp', 'neurons', 'heads'), got 'head'
    """
    if not isinstance(value, str) or value not in SITES:
        raise OptionError(f"`{name}` must be one of {SITES}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_layers(value: object, name: str) -> None:
    """``None``, an int, a non-empty list of ints, a slice or ``"all"`` (the range is checked
    against the model when the call runs), as the attention methods' ``layers`` take them.

    >>> check_layers("last", "layers")
    Traceback (most recent call last):
    attrax._errors.OptionError: `layers` must be None, an int, a non-empty list of ints, a slice or 'all', got 'last'
    """
    if value is None or isinstance(value, slice) or (isinstance(value, str) and value == ALL):
        return
    if _is_int(value):
        return
    if (
        isinstance(value, (list, tuple, range))
        and len(value) > 0
        and all(_is_int(v) for v in value)
    ):
        return
    raise OptionError(
        f"`{name}` must be None, an int, a non-empty list of ints, a slice or 'all', got {value!r}"
    )


def blocks(model: Model) -> torch.nn.ModuleList:
    """The model's blocks whose outputs are the residual stream ``layers=`` indexes: the first
    (shallowest) ``ModuleList`` with as many modules as the config has layers; the encoder's for
    an encoder-decoder."""
    hf = model.hf
    root = hf.get_encoder() if model.is_encoder_decoder else hf
    stack = "encoder" if model.is_encoder_decoder else "self"
    count = _arch.layers(hf.config, stack)
    for _name, module in root.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise ModelError(
        f"`layers`: found no list of {count} blocks in {type(root).__name__}; attrax does not "
        "know where this architecture's residual stream is"
    )


def resolve(model: Model, layers: Layers, site: str = "residual") -> At:
    """``layers`` as indices ``0..L`` of the residual stream, or ``0..L-1`` of the blocks for
    another ``site`` (negative ones count from the end), in the order given."""
    if layers is not None:
        refuse_seq2seq_classifier(model, "`layers`")
    if site == "residual":
        return At(resolve_count(len(blocks(model)), layers))
    stack = _site_stack(model, site)
    chosen = resolve_count(len(stack.blocks), layers, per_block=True)
    if site == "neurons":
        modules = [stack.module("neurons", layer) for layer in chosen]
        return At(chosen, site, neuron_width(stack, chosen), tuple(modules))
    if site == "heads":  # the output projection's input, every head's output side by side
        modules = [stack.module("heads", layer) for layer in chosen]
        widths = {_in_width(m) for m in modules}
        width = widths.pop()
        if widths or width % stack.heads:
            each = {layer: _in_width(m) for layer, m in zip(chosen, modules, strict=True)}
            raise ModelError(
                f"`layers` with site='heads' labels every layer's heads along one `hidden` dim; "
                f"these layers' attention output projections read {each} features, not "
                f"{stack.heads} heads of one width: choose layers of one head width with `layers`"
            )
        return At(chosen, site, width, tuple(modules), stack.heads)
    where = "heads" if site == "attention" else "mlp"  # the projection: its output, here
    return At(chosen, site, None, tuple(stack.module(where, layer) for layer in chosen))


def _in_width(module: torch.nn.Module) -> int:
    """A Linear's (or GPT-2's Conv1D's) input width, or a ModelError."""
    width = in_width(module)
    if width is None:
        raise ModelError(
            f"`layers` with site='heads': {type(module).__name__} is no Linear layer whose "
            "input attrax can split into heads"
        )
    return width


def _site_stack(model: Model, site: str) -> Stack:
    """The stack whose blocks ``site`` reads: the encoder's of an encoder-decoder, as the
    residual stream's."""
    stack = "encoder" if model.is_encoder_decoder else None
    return patch_stack(model, f"`layers` with site={site!r}", stack, site)


def check_config(config: Any, layers: Layers, site: str = "residual") -> None:
    """Refuse ``layers`` out of the range a model of ``config`` has, before it is loaded (dataset
    runs check their options before any shard runs); a config that does not say: no check."""
    if layers is None or layers == ALL:
        return
    stack = "encoder" if getattr(config, "is_encoder_decoder", False) else "self"
    count = _arch.layers(config, stack)
    if count is not None:
        resolve_count(count, layers, per_block=site != "residual")


def resolve_count(count: int, layers: Layers, per_block: bool = False) -> list[int]:
    """:func:`resolve` for a model of ``count`` blocks: over the residual stream's ``0..count``,
    or ``per_block`` over the blocks ``0..count-1``."""
    top = count - 1 if per_block else count
    what = (
        f"blocks 0..{top} (negative from -{top + 1})"
        if per_block
        else f"layers 0..{top} (0: the embedding output, {top}: the last block's output; "
        f"negative from -{top + 1})"
    )
    if isinstance(layers, str) and layers == ALL:
        return list(range(top + 1))
    if isinstance(layers, slice):  # over the layers 0..top
        given = list(range(top + 1))[layers]
        if not given:
            raise OptionError(f"`layers={layers!r}` selects nothing; this model has {what}")
    else:
        # check_layers let through an int (any Integral) or a sequence of ints here
        given = [cast(int, layers)] if _is_int(layers) else list(cast(Sequence[int], layers))
    out = []
    for layer in map(int, given):
        if not -(top + 1) <= layer <= top:
            raise OptionError(
                f"`layers={layers!r}`: layer {layer} is out of range; this model has {what}"
            )
        out.append(layer % (top + 1))
    if len(set(out)) != len(out):
        raise OptionError(f"`layers={layers!r}` names a layer twice")
    return out


def gap_coords(gap: torch.Tensor) -> dict[str, torch.Tensor]:
    """A completeness gap per layer ``[B, K, n_layers]`` as target coordinates ``[B, K]`` (one
    per layer, as the labeller takes them); :func:`join_gaps` makes them one after labelling."""
    return {f"_gap{j}": gap[..., j] for j in range(gap.shape[-1])}


def join_gaps(da: xr.DataArray, count: int) -> xr.DataArray:
    """The coordinates of :func:`gap_coords` as one ``completeness_gap`` ``(..., layer)``."""
    names = [f"_gap{j}" for j in range(count)]
    gaps = xr.Variable.concat([da[n].variable for n in names], dim="layer")
    return da.drop_vars(names).assign_coords(completeness_gap=gaps.transpose(..., "layer"))


@contextlib.contextmanager
def edit_layers(
    model: Model, at: At, edit: Callable[[int, torch.Tensor], torch.Tensor], tokens: int
) -> Iterator[None]:
    """Inside the block, the activation at ``at.layers[j]`` becomes ``edit(j, h)``, ``h`` of
    ``[rows, tokens, width]``: on the residual stream layer 0 at the first block's input, layer
    ``l`` at block ``l - 1``'s output; at another site its module's output (its input for the
    neurons). A site the forward did not reach is a ModelError: its gradients would be
    silently zero."""
    handles = []
    reached = [False] * len(at)

    def changed(j: int, h: torch.Tensor) -> torch.Tensor:
        reached[j] = True
        if h.dim() == 2:  # OPT runs its MLP on the tokens flattened: [rows * tokens, width]
            return edit(j, h.unflatten(0, (-1, tokens))).flatten(0, 1)
        return edit(j, h)

    def pre_hook(j: int) -> Callable[..., Any]:
        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if args:
                return (changed(j, args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": changed(j, kwargs["hidden_states"])}

        return hook

    def post_hook(j: int) -> Callable[..., Any]:
        def hook(_module: Any, _args: Any, output: Any) -> Any:
            if isinstance(output, torch.Tensor):
                return changed(j, output)
            return (changed(j, output[0]), *output[1:])

        return hook

    try:
        if at.site == "residual":
            stack = blocks(model)
            for j, layer in enumerate(at.layers):
                if layer == 0:
                    handles.append(
                        stack[0].register_forward_pre_hook(pre_hook(j), with_kwargs=True)
                    )
                else:
                    handles.append(stack[layer - 1].register_forward_hook(post_hook(j)))
        else:  # patching's hooks: the output projection's input for the neurons, else output
            for j, module in enumerate(at.modules):
                change = functools.partial(changed, j)
                inputs = at.site in ("neurons", "heads")  # a projection's input
                handles.append(site_hook(module, "neurons" if inputs else "mlp", change))
        yield
    finally:
        for handle in handles:
            handle.remove()
    missed = [j for j, seen in enumerate(reached) if not seen]
    if missed:
        j = missed[0]
        kind = type(at.modules[j]).__name__ if at.modules else "block"
        raise ModelError(
            f"`layers` with site={at.site!r}: layer {at.layers[j]}'s {kind} did not run in "
            "the forward (the model computes it without calling that module, where attrax "
            "reads it); use site='residual'"
        )


@torch.no_grad()
def activations(problem: Problem, at: At, points: torch.Tensor) -> torch.Tensor:
    """The activations ``[n_layers, n, B, L, W]`` read ``at`` for ``n`` stacked points
    ``[n, B, L, H]`` of the attributed side (one forward, no gradients)."""
    n = points.shape[0]
    kept: list[torch.Tensor | None] = [None] * len(at)

    def keep(j: int, h: torch.Tensor) -> torch.Tensor:
        kept[j] = h.clone()  # Falcon adds the attention's output to its MLP's in place
        return h

    with edit_layers(problem.model, at, keep, points.shape[2]):
        problem.hidden_fn(n)(points.flatten(0, 1))
    return torch.stack([k.unflatten(0, (n, -1)) for k in kept])  # type: ignore[union-attr]


@torch.no_grad()
def replaced_scores(
    problem: Problem,
    at: At,
    x: torch.Tensor,
    reference: torch.Tensor,
    batch_size: Size,
    held: int = 0,
) -> torch.Tensor:
    """The objective ``[B, K, n_layers]`` at the input ``x`` with layer ``l``'s activation put
    at its value for ``reference`` (one copy of the batch per layer, ``batch_size`` copies a
    forward, beside ``held`` bytes of results): where layer integrated gradients at a site that
    is not a cut of the network (the residual stream carries ``x`` past it) starts its path."""
    nl = len(at)
    start = activations(problem, at, reference[None])[:, 0]  # [n_layers, B, L, W]
    cost = problem.cost(saved=False)
    step = plan_forwards(
        nl, batch_size, cost.per_point, x.device, problem.max_memory,
        cost.fixed + sum(problem.held) + held,
    )  # fmt: skip
    out = []
    for first in range(0, nl, step):  # chunking only: bounds memory
        part = At(
            at.layers[first : first + step], at.site, at.width, at.modules[first : first + step],
            at.heads,
        )  # fmt: skip
        n = len(part)
        select = torch.eye(n, dtype=torch.bool, device=x.device)

        def edit(
            j: int, h: torch.Tensor, first: int = first, select: torch.Tensor = select
        ) -> torch.Tensor:
            h = h.unflatten(0, (len(select), -1))
            given = start[first + j][None].to(h.dtype)
            return torch.where(select[j].view(-1, 1, 1, 1), given, h).flatten(0, 1)

        # every position computed (not problem.evaluate's head rows only): the edit is per position
        with edit_layers(problem.model, part, edit, x.shape[1]):
            scores = problem.objective_fn(n)(x[None].expand(n, *x.shape).flatten(0, 1))
        out.append(scores.unflatten(0, (n, -1)))
    return torch.cat(out).permute(1, 2, 0)


def moments(
    problem: Problem, rule: Any, at: At, batch_size: Size, chunk_size: Size
) -> tuple[tuple[torch.Tensor], ...]:
    """A gradient :class:`~attrax._gradients.Rule` read ``at`` its layers: per moment, one
    ``[B, K, n_layers, L, W]`` tensor (in a tuple, as the engine's one side).

    - no multiplier (saliency, SmoothGrad, ...): the gradient at each layer, at the rule's points
      (noise and baselines stay on the embeddings);
    - a multiplier shared by every point (input x gradient, and ``x - reference`` rules):
      ``h_l(x) - h_l(reference)`` (``h_l(x)`` without a reference);
    - a path (``alphas``, integrated gradients): the gradient at ``h_l(x') + a (h_l(x) - h_l(x'))``
      put in place of layer ``l``'s output, times ``h_l(x) - h_l(x')``;
    - a multiplier per point (GradientSHAP, DeepLIFT, with ``origins``): the gradient at the
      rule's points, times ``h_l(origin_i + m_i) - h_l(origin_i)`` (Captum's
      ``LayerGradientShap``; ``LayerDeepLift``, whose origins are the baselines and whose
      backward the DeepLIFT family changes).
    """
    x = problem.inputs[0]
    weights = rule.weights if rule.weights is not None else torch.ones(1, dtype=torch.float64)
    if weights.ndim != 1:
        raise OptionError("`layers` needs one weight per point; this method weighs tokens")
    nl = len(at)
    replace = None
    per_point = None
    shared = None
    points = rule.points or (lambda chunk: (x[None],))
    if rule.alphas is not None:
        ends = activations(problem, at, torch.stack([x, rule.reference[0]]))
        start, span = ends[:, 1], ends[:, 0] - ends[:, 1]
        shared = span
        _hold(problem, at, 2 * start.numel() * start.element_size())
        alpha = rule.alphas.to(dtype=x.dtype, device=x.device)

        def replace(chunk: torch.Tensor) -> torch.Tensor:
            a = alpha[chunk].view(1, -1, 1, 1, 1)
            return start[:, None] + a * span[:, None]

        def points(chunk: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return (x[None].expand(len(chunk), *x.shape),)

    elif callable(rule.multiplier):
        if rule.origins is None:
            raise OptionError("`layers`: this method's multiplier has no origins to read")

        def per_point(chunk: torch.Tensor) -> torch.Tensor:
            origin, delta = rule.origins(chunk)[0], rule.multiplier(chunk)[0]
            if rule.chained:  # point i ends where point i + 1 starts: n + 1 points, not 2 n
                nodes = activations(problem, at, torch.cat([origin, origin[-1:] + delta[-1:]]))
                return nodes[:, 1:] - nodes[:, :-1]
            both = activations(problem, at, torch.cat([origin + delta, origin]))
            return both[:, : len(chunk)] - both[:, len(chunk) :]

    elif rule.multiplier is not None:
        given = [x] if rule.reference is None else [x, rule.reference[0]]
        ends = activations(problem, at, torch.stack(given))
        shared = ends[:, 0] if rule.reference is None else ends[:, 0] - ends[:, 1]
        _hold(problem, at, shared.numel() * shared.element_size())
    total = weights.shape[0]
    # a site wider than the residual stream (the neurons) holds as many layers' worth more
    hidden = x.shape[-1]
    wide = nl if at.width is None else -(-nl * at.width // hidden)
    repeat = nl if replace is not None else 1  # a point's forward: one copy of it per layer
    if isinstance(batch_size, int) and not isinstance(batch_size, bool):
        # a given size counts the copies; below one point's, a forward holds that point's
        batch_size = max(1, batch_size // repeat)
    batch, chunk = problem.plan(
        total, batch_size, chunk_size, moments=len(rule.moments), layers=wide, repeat=repeat
    )
    sums = gradient_sum(
        problem,
        at,
        points,
        weights,
        batch_size=batch,
        chunk_size=chunk,
        multiplier=per_point,
        moments=rule.moments,
        replace=replace,
    )
    if shared is not None:
        m = shared.permute(1, 0, 2, 3)[:, None].to(sums[0].dtype)  # [B, 1, nl, L, H]
        sums = tuple(s * m**p for s, p in zip(sums, rule.moments, strict=True))
    return tuple((s,) for s in sums)


def _hold(problem: Problem, at: At, nbytes: int) -> None:
    """Count the layers' activations a rule keeps through its passes (every layer's, ``[n_layers,
    B, L, W]``: four times the residual stream's width at GPT-2's neurons)."""
    problem.hold(nbytes, "layers", at.layers, "each layer's activations at the input")


def gradient_sum(
    problem: Problem,
    at: At,
    points: PointFn,
    weights: torch.Tensor,
    *,
    batch_size: int | None,
    chunk_size: int | None,
    multiplier: Callable[[torch.Tensor], torch.Tensor] | None = None,
    moments: tuple[int, ...] = (1,),
    replace: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """``sum_i weights[i] * (m_i * d score_k / d h_l[i]) ** p`` as ``[B, K, n_layers, L, W]``,
    one per entry of ``moments``: the gradients at the layers of the points ``points(chunk)``
    (embeddings ``[n, B, L, H]``), or, with ``replace``, at the layer activations
    ``replace(chunk)`` (``[n_layers, n, B, L, H]``) put in place of each layer's own output.

    ``multiplier(chunk)`` gives each point's ``m_i`` per layer (``[n_layers, n, B, L, H]``).
    Points go ``batch_size`` at a time, targets ``chunk_size`` at a time (memory chunking).
    """
    total = weights.shape[0]
    x = problem.inputs[0]
    nl = len(at)
    step = total if batch_size is None else batch_size
    acc = at_least_float32(x.dtype)
    width = problem.tensors.valid.shape[1]
    # the residual stream's width: the embeddings' unless the model projects them (ELECTRA)
    residual = int(getattr(problem.model.hf.config, "hidden_size", None) or x.shape[-1])
    features = residual if at.width is None else at.width
    sums = [x.new_zeros(x.shape[0], width, nl, x.shape[1], features, dtype=acc) for _ in moments]
    for start in range(0, total, step):  # chunking only: bounds memory
        chunk = torch.arange(start, min(start + step, total))
        stacked = points(chunk)[0]
        values = None if replace is None else replace(chunk)
        scale = None if multiplier is None else multiplier(chunk)
        n = stacked.shape[0]
        w = weights[chunk].to(dtype=acc, device=x.device)
        for slots, length in problem._target_chunks(chunk_size):
            between_passes()
            chunks = _chunk_gradients(
                problem, at, stacked, values, slots, length, chunk_size, features
            )
            for rows, g in chunks:
                g = g.unflatten(2, (n, -1)).to(acc)  # [k, nl, n, B, L', H]
                if scale is not None:
                    g = g * scale[None, :, :, :, : g.shape[4]].to(acc)
                for power, total_sum in zip(moments, sums, strict=True):
                    term = g if power == 1 else g**power
                    part = torch.einsum("kjnblh,n->bkjlh", term, w)
                    total_sum[:, rows, :, : part.shape[3]] += part
    return tuple(sums)


def _chunk_gradients(
    problem: Problem,
    at: At,
    stacked: torch.Tensor,
    given: torch.Tensor | None,
    slots: slice,
    length: int | None,
    chunk_size: int | None,
    features: int,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Each target's gradient at each layer from one forward: ``(rows, [k, n_layers, n * B, L',
    H])`` per ``chunk_size`` targets, ``rows`` their target slots. A bidirectional model's chunk
    is every target, whose backwards go ``chunk_size`` at a time: each group's gradients are
    summed before the next group's are taken, so a pass never holds every target's."""
    n = stacked.shape[0]
    nl = len(at)
    flat = stacked.flatten(0, 1)
    if length is not None:
        flat = flat[:, :length]
    if given is None:
        # zero probes added to each layer: their gradients are the layers' gradients
        primal = flat.new_zeros(nl, *flat.shape[:-1], features)
        copies = n

        def edit(j: int, h: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            return h + values[j]

    else:
        # one copy of the points per layer; copy j runs from layer j's given activations
        primal = given.flatten(1, 2)[:, :, : flat.shape[1]]
        flat = flat.repeat(nl, 1, 1)
        copies = n * nl
        select = torch.eye(nl, dtype=torch.bool, device=flat.device)

        def edit(j: int, h: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            h = h.unflatten(0, (nl, -1))
            return torch.where(select[j].view(nl, 1, 1, 1), values[j][None], h).flatten(0, 1)

    body = problem.hidden_fn(copies, slots)

    def f(values: torch.Tensor) -> torch.Tensor:
        with edit_layers(problem.model, at, lambda j, h: edit(j, h, values), flat.shape[1]):
            return body(flat)

    hidden, pullback = vjp(f, primal)
    _, head_pullback = vjp(lambda h: problem.head_objective(h, slots), hidden)
    valid = problem.tensors.valid[:, slots].to(hidden.dtype)
    (head_grad,) = head_pullback(valid.repeat(copies, 1))
    width = hidden.shape[1]
    step = width if problem.model.causal or chunk_size is None else chunk_size
    for start in range(0, width, step):  # chunking only: bounds memory
        group = torch.arange(start, min(start + step, width), device=hidden.device)
        one_hot = torch.nn.functional.one_hot(group, width).to(hidden.dtype)
        cotangents = one_hot[:, None, :, None] * head_grad[None]
        (grads,) = torch.vmap(pullback)(cotangents)
        yield slice(slots.start + start, slots.start + start + len(group)), grads
