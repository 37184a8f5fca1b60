"""Information flow routes (Ferrando & Voita 2024): the part of a model's computation that each
prediction's information flows through, traced top-down from the position that predicts it.

The graph's nodes are the residual stream at each position: a block's input (the embeddings
for the first), the stream after its attention, the MLP's output, and the stream after the MLP
(the next block's input). Its edges are what adds up to each node: source ``j``'s part through
head ``h``, ``A^h_ij W_O^h v^h_j``, and the residual ``x_i`` for the stream after the
attention at ``i``; the MLP's output and the stream after the attention for the block's
output. A block that runs attention and MLP side by side has no stream between them: all of
those parts (the MLP's, read from the block's input) add up to its output, weighed together;
its outputs come from a forward before the decomposition's. Each part ``c`` of a sum ``y``
weighs ``max(0, |y|_1 - |y - c|_1)`` (ALTI's proximity), divided by the weights of all of
``y``'s parts, so the edges into a node sum to 1; post-norm blocks (BERT) take the parts
through their LayerNorm linearly at ``y``'s own scale, as ALTI does. An attention edge ``j -> i`` is its heads' weights summed (for ``j = i`` with the
residual's: both join the same two nodes). A target's route is every edge above ``threshold``
reached from its prediction position's node after the last block, following such edges down.

One eager forward decomposes each layer's attention as it runs (ALTI's :class:`_Decomposition`,
query rows in chunks within ``max_memory``); the MLP's parts are taken from the block's output
(its LayerNorm's input in a post-norm block) once the forward is done; the routes of every
target are traced together, a layer at a time, from the top.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import xarray as xr

from . import _arch
from ._edges import PARALLEL
from ._errors import InputError, ModelError, OptionError
from ._inputs import Tensors, to_tensors
from ._memory import at_least_float32, format_bytes, memory_budget
from ._mixing import (
    _POST_NORM,
    _architecture,
    _boolean,
    _by_rows,
    _Decomposition,
    _l1_scores,
    _normed,
    _Parts,
    _row_bytes,
    _second_norms,
    _vector_budget,
    _vector_fixed,
)
from ._model import Model, refuse_no_query_row
from ._protocol import Call, Family
from ._schema import label_flow, target_coordinates
from ._sites import named

METHOD = "information_flow"
_NO_OBJECTIVE = "information flow routes are read from the model's forward, not from an objective"

#: one forward, decomposed as it runs: max_memory bounds the query rows decomposed at once and
#: counts the per-layer weights and the routes held
FLOW = Family(
    name=METHOD,
    takes=("positions", "max_new_tokens", "max_memory"),
    refuses={
        "objective": _NO_OBJECTIVE,
        "contrast": _NO_OBJECTIVE,
        "attribute_target": "a decoder-only model's routes already reach the target prefix; "
        "encoder-decoders have no routes here",
        "chunk_size": "information flow comes from one forward: there is no backward to chunk",
        "batch_size": "information flow comes from one forward: there are no points to batch",
    },
)

#: the norm before a sequential block's MLP (GPT-2's, Llama's, OPT's, ModernBERT's, Gemma 2's;
#: Falcon's `ln_mlp` is in parallel blocks, which its config flags); a block with none runs its
#: MLP beside its attention, on one norm
_MLP_NORMS = (
    "ln_2", "post_attention_layernorm", "ln_mlp", "final_layer_norm", "mlp_norm",
    "pre_feedforward_layernorm",
)  # fmt: skip


#: a query row's vectors are counted twice over ALTI's four copies: the residual joins them by a
#: concatenation, and a post-norm block's LayerNorm takes two more (C1 in bfloat16 peaked 7%
#: over its budget at four)
_ROW_SHARE = 2


def _threshold(value: object, name: str) -> None:
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not number or not 0 <= float(value) < 1:  # type: ignore[arg-type]  # NaN fails too
        raise OptionError(
            f"`{name}` must be a weight: a number from 0 up to but not including 1 (weights "
            f"into a node sum to 1), got {value!r}"
        )


@FLOW.method(threshold=_threshold, per_head=_boolean, renormalize=_threshold)
def information_flow(
    call: Call, *, threshold: float = 0.04, per_head: bool = False, renormalize: float = 0.0
) -> xr.DataArray:
    """Information flow routes (Ferrando & Voita 2024): the edges of the model's graph each
    prediction's information flows through, each weighed by how close its part is to the sum it
    goes into.

    Nodes are the residual stream at each position: a block's input, the stream after its
    attention, its MLP, the stream after the MLP. Each layer's stream after the attention at
    position ``i`` is split into ``A^h_ij W_O^h v^h_j`` per head ``h`` and source ``j``, and the
    residual ``x_i``; the block's output into the MLP's output and the stream after the
    attention. A part ``c`` of the sum ``y`` weighs ``max(0, |y|_1 - |y - c|_1)`` over the sum of
    those of all of ``y``'s parts (a post-norm block's parts through its LayerNorm, linear at
    ``y``'s scale, as in ALTI). An edge ``j -> i`` sums its heads' weights (and, for ``j = i``,
    the residual's). A target's route: the edges whose weight is above ``threshold`` reached
    from the node of the position that predicts it (``t - 1`` for a language model's token
    ``t``, a masked LM's mask, a classifier's pooled position) after the last block, down to
    the embeddings.

    Architectures: where :func:`attrax.alti` decomposes decoder-only and encoder-only models.
    Blocks that run their attention and MLP side by side on the block's input (GPT-J, Phi,
    Cohere, Falcon, GPT-NeoX with ``use_parallel_residual``) have no stream after the
    attention: their heads' parts, the residual and the MLP's output are the parts of the block's
    output, the MLP's edge comes from the block's input, and ``mlp_residual`` is 0 (coordinate
    ``parallel``).

    Arguments:
        model, inputs, targets, positions, max_new_tokens: as :func:`attrax.saliency`.
        threshold: the weight an edge must exceed to be followed (0: every edge with weight).
        per_head: keep each head's part of an attention edge (a ``head`` dim), not their sum.
        renormalize: before the routes are traced, each node's parts (each head's part of each
            source, the residual; the MLP, the residual) at or below it are dropped and the
            rest divided by their sum again (the LM Transparency Tool's renormalizing
            threshold; 0: none).
        max_memory: bytes (or ``"8GB"``) the call may take: bounds the query rows decomposed at
            once; the weights of every layer and the routes are counted. Too small: an
            :class:`~attrax.OptionError` naming the smallest budget.

    Returns:
        DataArray ``([example,] target, layer, [head,] query, source)``: on each target's route,
        the weight of the edge from ``source`` in the layer's input to ``query`` in the stream
        after its attention (side by side blocks: in the block's output; coordinate
        ``parallel``) (``source = query``: with the residual's share, also given as the
        coordinate ``attention_residual``; ``per_head``: each head's part, without it), 0 off
        the route, NaN where the target cannot see ``query`` or ``source`` (the future,
        padding). An edge is on the route where it is above 0 (``per_head``: where its heads'
        parts and the residual's add up above 0). Coordinates ``attention_residual``, ``mlp``
        and ``mlp_residual`` ``([example,] target, layer, query)``: the weights of the
        residual's edge into the stream after the attention and of the MLP's and the
        residual's edges into the block's output, on the route (else 0; NaN as above).

    >>> import attrax as ax
    >>> flow = ax.information_flow(ax.load_model(), "1 2 3 =", " 3 2 1")
    >>> flow.dims
    ('target', 'layer', 'query', 'source')
    >>> route = flow.isel(target=0, layer=-1)  # the last layer's edges into the predicting row
    >>> bool(route.sum("source").max() <= 1 + 1e-6)  # a node's edges in sum to 1 at most
    True
    """
    model = call.model
    refuse_no_query_row(model, METHOD)
    if model.is_encoder_decoder:
        raise ModelError(
            f"{METHOD}: {model.name} is an encoder-decoder; information flow routes follow one "
            "stack of blocks (decoder-only and encoder-only models)"
        )
    t = to_tensors(call.batch, model)
    targets, row_of, _ = target_coordinates(model, call.batch)
    rows = torch.zeros_like(t.index)
    for b, example in enumerate(call.batch.examples):
        rows[b, : len(example.positions)] = torch.as_tensor([row_of[p] for p in example.positions])
    graph = _Graph(model, t, per_head, rows, len(targets))
    graph.renormalize = float(renormalize)
    decomposition = _Decomposition(model, t, graph.on_layer, what=METHOD)
    graph.parallel = _side_by_side(model, [layer.block for layer in decomposition.stack])
    held = graph.held_bytes(len(decomposition.stack))
    keys = t.ids.shape[1] * graph.heads + 1 + graph.parallel  # side by side: the MLP's too
    graph.budget = _vector_budget(model, t, call.options, METHOD, held=held, keys=_ROW_SHARE * keys)
    one_row = _ROW_SHARE * _row_bytes(t.ids.shape[0], keys, model.hidden_size, graph.size)
    if call.options.get("max_memory") is None and graph.budget < one_row:
        smallest = _vector_fixed(model, t, held) + one_row
        free = memory_budget(model.device)
        raise OptionError(
            f"{METHOD}: the call needs an estimated {format_bytes(smallest, up=True)}, of which "
            f"{format_bytes(held, up=True)} are every layer's edge weights and the routes' "
            f"result ([example, target, layer, {'head, ' if per_head else ''}query, source]); "
            f"without `max_memory` it may take half the device's free memory, "
            f"{format_bytes(free)}. Give fewer targets (`positions=`), a shorter input"
            f"{', per_head=False' if per_head else ''}, or `max_memory` of at least "
            f"{format_bytes(smallest, up=True)} if the device holds it"
        )
    outputs = _block_outputs(model, decomposition)
    if outputs.pre:  # post-norm blocks: their MLP's parts go through the LayerNorm
        graph.norms = outputs.modules
    if graph.parallel:  # each block's output first: its attention is weighed against it
        with torch.no_grad(), outputs:
            model.stream_attention(t, lambda _stack, _weights: None)
        graph.outputs = outputs.kept
        with torch.no_grad():
            decomposition.run()
    else:
        with torch.no_grad(), outputs:
            decomposition.run()
    values = graph.routes(outputs.kept, float(threshold))
    return label_flow(
        model,
        call.batch,
        *values,
        heads=per_head,
        parallel=graph.parallel,
        options=call.options,
        method=METHOD,
    )


class _Graph:
    """Each layer's edge weights as the forward streams past: the attention's ``[B, Q, L, H]``
    (or summed over heads), the residual's ``[B, Q]`` and the stream after the attention
    ``[B, Q, d]`` (what the MLP's edges are weighed against)."""

    def __init__(
        self, model: Model, t: Tensors, keep_heads: bool, rows: torch.Tensor, count: int
    ) -> None:
        self.t, self.keep_heads, self.causal = t, keep_heads, model.causal
        #: each target's row ``[B, K]`` of the result, ``count`` rows: the batch's targets
        self.rows, self.count = rows, count
        self.heads = _arch.heads(model.hf.config, "self") or 1
        self.width = model.hidden_size
        self.size = at_least_float32(model.dtype).itemsize  # the decomposition's dtype
        self.budget = 0
        #: each node's parts at or below it dropped and the rest renormalized (0: none)
        self.renormalize = 0.0
        #: a post-norm block's LayerNorm after its MLP's residual sum (None: pre-norm blocks)
        self.norms: list[torch.nn.Module] | None = None
        #: blocks that run attention and MLP side by side: one sum, no stream between them
        self.parallel = False
        #: their outputs, from a forward before the decomposition's
        self.outputs: list[torch.Tensor] = []
        self.attention: list[torch.Tensor] = []
        self.residual: list[torch.Tensor] = []
        self.middle: list[torch.Tensor] = []
        #: side by side blocks: the MLP's weight in the block's output ``[B, L]``, per layer
        self.mlp: list[torch.Tensor] = []

    def held_bytes(self, layers: int) -> int:
        """What the call keeps beside one layer's decomposition: every layer's weights, its
        streams after the attention and out of the block, the routes' result ``[B, T, layers,
        (H,) L, L]`` and a layer's masks and products (``T``: the batch's targets)."""
        batch, length = self.t.ids.shape
        kept = self.heads if self.keep_heads else 1
        square = batch * length * length
        per_layer = self.size * ((kept + 1) * square + 2 * batch * length * self.width)
        targets = max(self.count, self.t.index.shape[1])
        # the product written into a layer's slice and its gather: two slices beside it
        result = self.size * targets * (layers * kept + 2 * kept + 2) * square
        return layers * per_layer + result

    def on_layer(
        self,
        index: int,
        weights: torch.Tensor,
        u: torch.Tensor,
        x: torch.Tensor,
        parts: _Parts,
        _stack: str,
    ) -> None:
        _, heads, _, keys = weights.shape
        mixed = torch.einsum("bhij,bhjd->bid", weights.to(u.dtype), u)
        if parts.scale is not None:  # Gemma: the norm on the attention's output, at its scale
            mixed = mixed * parts.scale
        mlp = None
        if self.parallel:  # the MLP's part: what the block adds beside attention and residual
            output = self.outputs[index].to(x.dtype)
            mlp = output - x - mixed - (0 if parts.bias is None else parts.bias)
        scores = _by_rows(
            x,
            keys * heads + 1 + (mlp is not None),
            self.budget,
            lambda rows: _part_scores(weights, u, x, parts, rows, mlp),
            share=_ROW_SHARE,
        )
        scores = self._normalized(scores)
        per_head = scores[..., : keys * heads].unflatten(-1, (keys, heads))
        self.attention.append(per_head if self.keep_heads else per_head.sum(-1))
        self.residual.append(scores[..., keys * heads])
        if mlp is not None:
            self.mlp.append(scores[..., -1])
        else:
            self.middle.append(_normed((x + mixed)[:, :, None], parts)[1])

    def routes(
        self, outputs: list[torch.Tensor], threshold: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every target's route, traced down from its prediction row after the last block, at
        its row of the batch's targets (:attr:`rows`): the attention edges ``[B, T, layers,
        (H,) L, L]`` and the residual's, the MLP's and the MLP residual's ``[B, T, layers, L]``,
        0 off the route, NaN where a target cannot see (or an example has no such target)."""
        t = self.t
        if len(outputs) != len(self.attention):  # a block whose attention was not decomposed
            raise ModelError(
                f"{METHOD}: {len(self.attention)} attention layers were decomposed but "
                f"{len(outputs)} blocks ran; the routes need every block's attention"
            )
        if self.parallel:  # the MLP beside the attention, no residual edge around it
            mlp = tuple(self.mlp)
            past = tuple(torch.zeros_like(m) for m in mlp)
        else:
            weights = [self._mlp_weights(i, y) for i, y in enumerate(outputs)]
            mlp, past = zip(*weights, strict=True)
        self._check_finite(mlp, past)
        length = t.ids.shape[1]
        columns = torch.arange(length, device=t.ids.device)
        visible = (columns < t.mask.sum(1, keepdim=True))[:, None, :] & t.valid[..., None]
        if self.causal:  # a target sees up to the position its logits come from
            visible = visible & (columns <= t.index[..., None])
        reach = (columns == t.index[..., None]) & t.valid[..., None]  # [B, K, L]
        b, k = t.valid.nonzero(as_tuple=True)  # each real target, at its row of the result
        row = self.rows[b, k]
        layers, first = len(outputs), self.attention[0]
        # the result at the batch's target rows, written layer by layer: the largest tensor
        heads = (self.heads,) if self.keep_heads else ()
        flow = first.new_zeros((t.ids.shape[0], self.count, layers, *heads, length, length))
        residuals, mlps, pasts = (
            first.new_zeros((t.ids.shape[0], self.count, layers, length)) for _ in "abc"
        )
        for layer in reversed(range(layers)):  # each layer's routes start at the next's
            attention, residual = self.attention[layer], self.residual[layer]
            summed = attention.sum(-1) if self.keep_heads else attention
            edges = summed + torch.diag_embed(residual)  # [B, Q, L]: residual joins j = i
            into_mlp = reach & (mlp[layer] > threshold)[:, None]
            around = reach & (past[layer] > threshold)[:, None]
            # the streams after the attention the route reaches (side by side: the output)
            middle = reach if self.parallel else into_mlp | around
            kept = middle[..., :, None] & (edges > threshold)[:, None]  # [B, K, Q, L]
            reach = kept.any(-2)
            if self.parallel:  # the MLP reads the block's input at its own position
                reach = reach | into_mlp
            if self.keep_heads:  # [B, Q, L, H] -> [B, H, Q, L], each target's kept edges
                flow[b, row, layer] = attention.permute(0, 3, 1, 2)[b] * kept[b, k, None]
            else:  # the edges as the graph has them: j = i with the residual's share
                flow[b, row, layer] = edges[b] * kept[b, k]
            own = kept.diagonal(dim1=-2, dim2=-1)  # the residual's edge j = i kept
            residuals[b, row, layer] = residual[b] * own[b, k]
            mlps[b, row, layer] = mlp[layer][b] * into_mlp[b, k]
            pasts[b, row, layer] = past[layer][b] * around[b, k]
        seen = visible.new_zeros((t.ids.shape[0], self.count, length))
        seen[b, row] = visible[b, k]
        pairs = seen[..., :, None] & seen[..., None, :]  # [B, T, Q, L]
        pairs = pairs[:, :, None, None] if self.keep_heads else pairs[:, :, None]
        flow.masked_fill_(~pairs, math.nan)
        others = [v.masked_fill_(~seen[:, :, None], math.nan) for v in (residuals, mlps, pasts)]
        return flow, others[0], others[1], others[2]

    def _check_finite(self, mlp: tuple[torch.Tensor, ...], past: tuple[torch.Tensor, ...]) -> None:
        """An InputError where a real row's weights are not finite: a NaN weight is never above
        the threshold, and the route would silently stop there."""
        real = self.t.mask.bool()
        pairs = real[:, :, None] & real[:, None, :]
        for layer, attention in enumerate(self.attention):
            rows = [attention[pairs], self.residual[layer][real], mlp[layer][real]]
            if not all(bool(torch.isfinite(v).all()) for v in (*rows, past[layer][real])):
                raise InputError(
                    f"{METHOD}: the edge weights of layer {layer} are not finite (inf/NaN): the "
                    "model's outputs overflowed or hold NaN; check the model's weights and "
                    "dtype, and the inputs"
                )

    def _normalized(self, scores: torch.Tensor) -> torch.Tensor:
        """A node's parts' weights ``[..., parts]`` divided by their sum; with
        :attr:`renormalize`, those at or below it dropped first and the rest divided again."""
        total = scores.sum(-1, keepdim=True)
        scores = scores / torch.where(total == 0, 1.0, total)
        if self.renormalize > 0:  # the LM Transparency Tool's renormalizing threshold
            scores = scores * (scores > self.renormalize)
            total = scores.sum(-1, keepdim=True)
            scores = scores / torch.where(total == 0, 1.0, total)
        return scores

    def _mlp_weights(self, layer: int, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLP's and the residual's weights ``[B, L]`` in layer ``layer``'s output: its
        block's output (a post-norm block's LayerNorm input: the parts go through the norm)
        split into the MLP's part and the stream after the attention."""
        middle = self.middle[layer]
        total = output.to(middle.dtype)
        parts = torch.stack([total - middle, middle], dim=2)  # [B, L, 2, d]
        norm = None if self.norms is None else self.norms[layer]
        scores = self._normalized(_l1_scores(parts, _Parts(middle.new_empty(0), None, norm)))
        return scores[..., 0], scores[..., 1]


def _part_scores(
    weights: torch.Tensor,
    u: torch.Tensor,
    x: torch.Tensor,
    parts: _Parts,
    rows: slice,
    mlp: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unnormalized weights ``[B, q, L * H + 1]`` of the query rows ``rows``: each (source,
    head) part ``A^h_ij W_O^h v^h_j`` (source-major), then the residual ``x_i``; with ``mlp``
    (``[B, L, d]``, a side by side block's), its part last, all of the block's output."""
    chunk = weights[:, :, rows]
    vectors = torch.einsum("bhij,bhjd->bijhd", chunk.to(u.dtype), u)
    if parts.scale is not None:  # Gemma: the norm on the attention's output, linear at its scale
        vectors.mul_(parts.scale[:, rows, None, None, :])
    own = [x[:, rows, None, :], *([] if mlp is None else [mlp[:, rows, None, :]])]
    return _l1_scores(torch.cat([vectors.flatten(2, 3), *own], dim=2), parts)


class _Outputs:
    """Hooks that keep each block's output (a post-norm block's: its second LayerNorm's input),
    in the order the blocks run."""

    def __init__(self, modules: list[torch.nn.Module], pre: bool) -> None:
        self.modules, self.pre = modules, pre
        self.kept: list[torch.Tensor] = []
        self.handles: list[Any] = []

    def __enter__(self) -> _Outputs:
        def keep(_m: torch.nn.Module, args: Any, output: Any = None) -> None:
            value = args[0] if self.pre else output
            self.kept.append((value[0] if isinstance(value, tuple) else value).detach())

        for module in self.modules:
            register = (
                module.register_forward_pre_hook if self.pre else module.register_forward_hook
            )
            self.handles.append(register(keep))
        return self

    def __exit__(self, *_: object) -> None:
        for handle in self.handles:
            handle.remove()


def _block_outputs(model: Model, decomposition: _Decomposition) -> _Outputs:
    layers = decomposition.stack
    if _architecture(model) in _POST_NORM:
        return _Outputs(list(_second_norms(model, layers)), pre=True)
    return _Outputs([layer.block for layer in layers], pre=False)


#: families whose blocks run attention and MLP on one norm of the block's input, with no flag
_ONE_NORM_PARALLEL = ("gptj", "codegen", "phi", "cohere", "cohere2")


def _side_by_side(model: Model, blocks: list[torch.nn.Module]) -> bool:
    """Whether the blocks run their attention and MLP side by side on the block's input
    (GPT-NeoX's ``use_parallel_residual``, Falcon's ``parallel_attn``; GPT-J, CodeGen, Phi and
    Cohere on one norm); a ModelError for a block that is neither that nor a known sequential
    one (no norm before its MLP)."""
    if _architecture(model) in _POST_NORM:
        return False
    config = model.hf.config
    if any(getattr(config, f, False) is True for f in PARALLEL):
        return True
    unknown = [i for i, block in enumerate(blocks) if named(block, _MLP_NORMS) is None]
    if not unknown:
        return False
    if _architecture(model) in _ONE_NORM_PARALLEL:
        return True
    raise ModelError(
        f"{METHOD}: {model.name}'s layer {unknown[0]} has no norm attrax knows before its MLP "
        f"({', '.join(_MLP_NORMS)}), and its family ({_architecture(model)}) is not one whose "
        "attention and MLP read the block's input side by side; the routes' nodes are unknown"
    )


__all__ = ["information_flow"]
