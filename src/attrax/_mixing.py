"""Context mixing: how much each layer mixes each source token into each position.

Two views, both per layer (``layer`` dim) and labelled like the attention maps:

- :func:`value_zeroing` (Mohebbi et al. 2023) zeroes one source token's value vectors in a
  layer's attention (self, cross or encoder) and measures how far each position's layer output
  moves. Every layer is fed its clean input (captured from one clean forward), so one forward
  over copies of the batch — copy ``j`` zeroes token ``j`` in every layer at once — gives every
  layer's zeroed outputs; the copies are the only thing chunked (memory).
- :func:`alti` (Ferrando et al. 2022) decomposes each layer's attention block output at
  position ``i`` (attention weights, values, output projection, residual and LayerNorm) into
  one vector per source token, ``T_i(x_j)``, and scores each by its L1 closeness to the output;
  rolled out across layers (ALTI+ for encoder-decoders: the cross-attention block split between
  the encoder tokens and the decoder position's residual). :func:`alti_logit` (Ferrando et al. 2023) projects each layer's
  per-token updates onto the target's logit and carries them back to the input tokens through
  the ALTI rollout of the layers below.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import xarray as xr

from . import _arch
from ._attention import Selection, check_maps_name, check_selection, resolve_maps, selection_indices
from ._components import softcapped, token_rows, value_projection
from ._errors import ModelError, OptionError
from ._inputs import Tensors, encode_sources, to_tensors
from ._memory import (
    CALL_OVERHEAD,
    at_least_float32,
    budget_after,
    forward_bytes,
    parse_bytes,
    plan_forwards,
)
from ._model import (
    Model,
    attention_modules,
    body,
    norm_centers,
    norm_divisor,
    norm_gain,
    refuse_no_query_row,
)
from ._protocol import Call, Family
from ._schema import label_queries

_NOT_ENC_DEC = "an encoder-decoder model's attention stacks are 'encoder', 'decoder' and 'cross'"
_NO_OBJECTIVE = "context mixing is read from the model's forward, not from an objective"

#: Value zeroing: batched forwards over zeroed copies, so batch_size and max_memory apply.
VALUE_ZEROING = Family(
    name="value_zeroing",
    takes=("positions", "attribute_target", "batch_size", "max_new_tokens", "max_memory"),
    refuses={
        "objective": _NO_OBJECTIVE,
        "contrast": _NO_OBJECTIVE,
        "chunk_size": "value zeroing runs no backward: `batch_size` bounds the zeroed copies "
        "per forward",
    },
)

#: ALTI: one forward whose per-layer decomposition is computed as the layers run; max_memory
#: bounds the query rows whose ``[B, rows, L, d]`` vectors are built at once.
ALTI = Family(
    name="alti",
    takes=("positions", "attribute_target", "max_new_tokens", "max_memory"),
    refuses={
        "objective": _NO_OBJECTIVE,
        "contrast": _NO_OBJECTIVE,
        "chunk_size": "ALTI comes from one forward: there is no backward to chunk",
        "batch_size": "ALTI comes from one forward: there are no points to batch",
    },
)

SIMILARITIES = ("cosine", "euclidean")
#: Inseq's ``min_score_threshold``: distances below it are set to 0 before normalizing
THRESHOLD = 1e-5


# --------------------------------------------------------------------------------------------------
# The model's blocks and their attention parts
# --------------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    """One transformer block and the attention module of one of its stacks, with its value
    projection."""

    block: torch.nn.Module
    attention: torch.nn.Module
    values: torch.nn.Module  # the value projection (whose output holds the value vectors)
    # the features of its output that are values, head by head: a slice, or their indices where
    # a fused projection interleaves them with queries and keys
    value_features: slice | torch.Tensor


def _layers(model: Model, stack: str = "self") -> list[_Layer]:
    """The blocks of one attention stack (``"self"``: decoder-only or encoder-only models;
    ``"encoder"``, ``"decoder"``, ``"cross"``: an encoder-decoder's) in the order they run, each
    with the attention module of that stack (a ModelError where attrax finds none)."""
    if model.is_encoder_decoder and stack == "self":
        raise ModelError(f"{model.name} ({_architecture(model)}): {_NOT_ENC_DEC}")
    names = {module: name for name, module in model.hf.named_modules()}
    found = [m for m, (kind, _) in attention_modules(model.hf).items() if kind == stack]
    layers = []
    for attention in found:
        parts = names[attention].split(".")
        digits = [k for k, part in enumerate(parts) if part.isdigit()]
        if not digits:
            break
        # the first numbered module is the block (T5 numbers its sub-layers too)
        block = model.hf.get_submodule(".".join(parts[: digits[0] + 1]))
        layers.append(_Layer(block, attention, *value_projection(model, attention)))
    if not layers or len(layers) != len(found):
        raise ModelError(
            f"{model.name} ({_architecture(model)}): attrax finds no numbered {stack} attention "
            "blocks to zero or decompose"
        )
    return layers


@contextlib.contextmanager
def _hooks(pairs: list[tuple[torch.nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    handles = [module.register_forward_hook(hook) for module, hook in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _base_forward(
    model: Model, ids: torch.Tensor, mask: torch.Tensor, types: Any, **kw: Any
) -> Any:
    """The model's body (no LM or classifier head) over right-padded ``ids``."""
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, **kw}
    if model.task == "generation":
        positions = torch.arange(ids.shape[-1], device=ids.device)
        kwargs |= {"position_ids": positions.expand(ids.shape), "use_cache": False}
    elif types is not None:
        kwargs["token_type_ids"] = types
    return body(model.hf)(**kwargs)


def _rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[b, index[b, k]]`` for ``[B, L, ...]`` values: the attributed query rows."""
    rows = torch.arange(index.shape[0], device=index.device)[:, None]
    return values[rows, index]


# --------------------------------------------------------------------------------------------------
# Value zeroing
# --------------------------------------------------------------------------------------------------
def _similarity(value: object, name: str) -> None:
    if value not in SIMILARITIES:
        raise OptionError(f"`{name}` must be one of {SIMILARITIES}, got {value!r}")


def _boolean(value: object, name: str) -> None:
    if not isinstance(value, bool):
        raise OptionError(f"`{name}` must be True or False, got {value!r}")


@VALUE_ZEROING.method(
    similarity=_similarity,
    normalize=_boolean,
    layers=check_selection,
    heads=check_selection,
    maps=check_maps_name,
)
def value_zeroing(
    call: Call,
    *,
    similarity: str = "cosine",
    normalize: bool = True,
    layers: Selection = None,
    heads: Selection = None,
    maps: str | None = None,
) -> xr.DataArray:
    """Value zeroing (Mohebbi et al. 2023): how far zeroing a source token's value vectors in a
    layer's self-attention moves the layer's output at the query that predicts each target.

    For layer ``l`` and source token ``j``: the layer runs on its clean input with the value
    vectors of ``j`` zeroed in every head; the score of query ``i`` is the distance between its
    clean and zeroed outputs (``1 - cosine similarity``, or the Euclidean distance). The last
    layer's output is compared as the model reports it (after a final norm, as Inseq does).
    Scores below 1e-5 are set to 0 and, with ``normalize``, each row is divided by its sum over
    sources (Inseq's aggregation). One forward over copies of the batch, one per zeroed token,
    gives every layer at once; ``batch_size`` bounds the copies per forward.

    Arguments:
        model, inputs, targets, positions, max_new_tokens: as :func:`attrax.saliency`.
        similarity: ``"cosine"`` (``1 - cos``, the paper's and Inseq's) or ``"euclidean"``.
        normalize: divide each row by its sum over sources (per layer).
        layers: which layers to keep (an int, a range, a slice or a list of ints).
        heads: which heads' value vectors are zeroed (None: all, the paper's and Inseq's
            default); with grouped-query attention these index the key/value heads, as Inseq's
            ``zeroed_units_indices`` do.
        maps: as :func:`attrax.attention`: ``None`` (the model's default), ``"self"``
            (decoder-only and encoder-only models), ``"cross"`` (encoder-decoder: zeroing encoder
            tokens' values in the cross-attention, measured on the decoder; with
            ``attribute_target=True`` also the decoder self-attention over the decoder prefix) or
            ``"encoder"`` (the encoder self-attention: dims ``([example,] query, source, layer)``).
        batch_size: zeroed copies per forward (``"auto"``: as many as fit ``max_memory``).

    Returns:
        DataArray ``([example,] target, source, layer)``; sources a causal model's query cannot
        see are NaN.

    >>> import attrax as ax
    >>> da = ax.value_zeroing(ax.load_model(), "1 2 3 =", " 3 2 1")
    >>> da.dims
    ('target', 'source', 'layer')
    >>> bool(abs(da.sum("source") - 1).max() < 1e-5)
    True
    """
    model = call.model
    refuse_no_query_row(model, "value_zeroing")
    maps = resolve_maps(model, maps)
    if maps == "encoder":
        if call.options["attribute_target"]:
            raise OptionError("`attribute_target=True` does not apply to maps='encoder'")
        if call.options["positions"] is not None:
            raise OptionError("`positions` selects targets; maps='encoder' has no targets")
        return _encoder_zeroing(call, similarity, normalize, layers, heads)
    t = to_tensors(call.batch, model)
    runs = [_self_run(model, t)] if maps == "self" else _decoder_runs(model, t, call.options)
    chosen = selection_indices(layers, len(runs[0].layers), "layers", "layers")
    sides = []
    for run in runs:  # at most two: the cross-attention and the decoder self-attention
        zeroed = _value_heads(heads, run)
        scores = _zeroing_scores(model, run, similarity, call.options, zeroed)[..., chosen]
        scores = _aggregate(scores, run.mask, run.causal, normalize)
        sides.append(_rows(scores, t.index))
    return call.label(sides, trailing=("layer",), trailing_coords={"layer": chosen})


@dataclass
class _Run:
    """One value-zeroing run: the layers whose values are zeroed (and whose outputs are
    measured), their clean outputs (the last as the model reports it), how the model part runs
    on copies of the batch, and the zeroed tokens' padding mask ``[B, S]``."""

    layers: list[_Layer]
    measured: list[torch.nn.Module]
    states: list[torch.Tensor]
    forward: Callable[[Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]
    mask: torch.Tensor
    causal: bool
    value_heads: int  # heads of the value projection (key/value heads under grouped queries)
    # a causal run's attributed queries never see tokens after the last of them: zero only those
    sources: int | None = None


def _value_heads(heads: Selection, run: _Run) -> list[int] | None:
    if heads is None:
        return None
    return selection_indices(heads, run.value_heads, "heads", "value heads per layer")


@torch.no_grad()
def _self_run(model: Model, t: Tensors) -> _Run:
    stack = _layers(model)
    clean = _base_forward(model, t.ids, t.mask, t.token_types, output_hidden_states=True)
    # block l's input is hidden_states[l]; its clean output hidden_states[l + 1] (the last one as
    # the model reports it: after the final norm where there is one)
    states = [h.detach() for h in clean.hidden_states[1 : len(stack)]] + [clean.last_hidden_state]

    def forward(copies: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        types = None if t.token_types is None else copies(t.token_types)
        return _base_forward(model, copies(t.ids), copies(t.mask), types).last_hidden_state

    blocks = [layer.block for layer in stack]
    config = model.hf.config
    kv = _arch.kv_heads(config)
    last = int(t.index.max()) + 1 if model.causal else None
    return _Run(stack, blocks, states, forward, t.mask, model.causal, kv, last)


@torch.no_grad()
def _decoder_runs(model: Model, t: Tensors, options: Any) -> list[_Run]:
    """An encoder-decoder's cross-attention run (and its decoder self-attention run with
    ``attribute_target``), both measured on the decoder fed the clean encoder output."""
    assert t.decoder_ids is not None and t.decoder_mask is not None
    encoded = model.hf.get_encoder()(input_ids=t.ids, attention_mask=t.mask).last_hidden_state
    decoder = model.hf.get_decoder()

    def run(ids: torch.Tensor, mask: torch.Tensor, encoder: torch.Tensor, encoder_mask: Any) -> Any:
        return decoder(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=encoder,
            encoder_attention_mask=encoder_mask,
            use_cache=False,
            output_hidden_states=True,
        )

    clean = run(t.decoder_ids, t.decoder_mask, encoded, t.mask)
    cross = _layers(model, "cross")
    states = [h.detach() for h in clean.hidden_states[1 : len(cross)]] + [clean.last_hidden_state]

    def forward(copies: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        assert t.decoder_ids is not None and t.decoder_mask is not None
        ids, mask = copies(t.decoder_ids), copies(t.decoder_mask)
        return run(ids, mask, copies(encoded), copies(t.mask)).last_hidden_state

    blocks = [layer.block for layer in cross]
    heads = _arch.heads(model.hf.config, "cross") or 1
    runs = [_Run(cross, blocks, states, forward, t.mask, False, heads)]
    if options["attribute_target"]:
        own = _layers(model, "decoder")
        last = int(t.index.max()) + 1
        runs.append(_Run(own, blocks, states, forward, t.decoder_mask, True, heads, last))
    return runs


def _encoder_zeroing(
    call: Call, similarity: str, normalize: bool, layers: Selection, heads: Selection
) -> xr.DataArray:
    """An encoder-decoder's encoder self-attention: ``([example,] query, source, layer)``."""
    model = call.model
    ids, mask, single = encode_sources(model, call.inputs)
    ids, mask = ids.to(model.device), mask.to(model.device)
    encoder = model.hf.get_encoder()
    stack = _layers(model, "encoder")
    chosen = selection_indices(layers, len(stack), "layers", "layers")
    with torch.no_grad():
        clean = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    states = [h.detach() for h in clean.hidden_states[1 : len(stack)]] + [clean.last_hidden_state]

    def forward(copies: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return encoder(input_ids=copies(ids), attention_mask=copies(mask)).last_hidden_state

    n_heads = _arch.heads(model.hf.config, "encoder") or 1
    run = _Run(stack, [layer.block for layer in stack], states, forward, mask, False, n_heads)
    zeroed = _value_heads(heads, run)
    scores = _zeroing_scores(model, run, similarity, call.options, zeroed)[..., chosen]
    scores = _aggregate(scores, mask, False, normalize)
    return label_queries(
        model,
        ids,
        mask,
        scores,
        single=single,
        method=call.method,
        options=call.options,
        trailing_coords={"layer": chosen},
    )


def _aggregate(
    scores: torch.Tensor, mask: torch.Tensor, causal: bool, normalize: bool
) -> torch.Tensor:
    """Inseq's aggregation of distances ``[B, query, source, layer]``: NaN where the query cannot
    see the source (padding, the future), 0 below the threshold, rows divided by their sums."""
    keys = torch.arange(scores.shape[2], device=scores.device)
    unseen = ~mask.bool()[:, None, :, None]
    if causal:
        queries = torch.arange(scores.shape[1], device=scores.device)
        unseen = unseen | (keys[None, None, :, None] > queries[None, :, None, None])
    scores = scores.masked_fill(unseen, torch.nan)
    scores = torch.where(scores < THRESHOLD, 0.0, scores)
    if normalize:
        total = scores.nansum(2, keepdim=True)
        scores = scores / torch.where(total == 0, 1.0, total)
    return scores


@torch.no_grad()
def _zeroing_scores(
    model: Model, run: _Run, similarity: str, options: Any, heads: list[int] | None = None
) -> torch.Tensor:
    """Distances ``[B, query, source, layer]`` between clean and value-zeroed layer outputs."""
    batch, length = run.mask.shape
    queries = run.states[0].shape[1]
    sources = length if run.sources is None else min(length, run.sources)
    width = run.states[0].shape[-1]
    # live per copy in one block: its input and output states, the attention scores of every
    # head (eager), the MLP's hidden layer, and the clean states patched in, with some slack
    n_heads = _arch.heads(model.hf.config, "self") or 1
    mlp = _arch.mlp_width(model.hf.config) or 4 * width
    per_copy = (
        2
        * max(model.dtype.itemsize, 4)
        * (queries * (8 * width + 2 * mlp) + 2 * n_heads * queries * length)
    )
    # held whatever the sizes: the call's own overhead and the distances it returns
    kept = at_least_float32(model.dtype)
    fixed = CALL_OVERHEAD + batch * queries * length * len(run.layers) * kept.itemsize
    per_forward = plan_forwards(
        sources * batch, options["batch_size"], per_copy, model.device, _budget(options), fixed
    )
    tokens_per_forward = max(1, per_forward // batch)
    # the data model's dtype; _distance takes each distance in float64 before it lands here
    out = torch.zeros(batch, queries, length, len(run.layers), dtype=kept)
    out = out.to(model.device)
    for start in range(0, sources, tokens_per_forward):  # memory chunking over zeroed tokens
        zeroed = torch.arange(start, min(sources, start + tokens_per_forward), device=out.device)
        out[:, :, zeroed] = _zeroed_forward(run, batch, zeroed, similarity, heads).to(out.dtype)
    return out


def _budget(options: Any) -> int | None:
    return parse_bytes(options.get("max_memory"))


def _zeroed_forward(
    run: _Run, batch: int, zeroed: torch.Tensor, similarity: str, heads: list[int] | None
) -> torch.Tensor:
    """One forward over ``B * len(zeroed)`` copies (row ``b * m + c`` zeroes token
    ``zeroed[c]`` in every layer): distances ``[B, query, m, layer]``."""
    m = zeroed.shape[0]
    length = run.mask.shape[1]

    def copies(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(m, dim=0)

    positions = torch.arange(length, device=zeroed.device)
    keep = (positions[None, :] != zeroed[:, None]).repeat(batch, 1)  # [B * m, S]
    distances: list[torch.Tensor | None] = [None] * len(run.layers)

    def zero_values(layer: _Layer) -> Callable[..., Any]:
        def hook(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
            features = _value_features(
                output.shape[-1], layer.value_features, run.value_heads, heads
            )
            features = features.to(output.device)
            # zero the value features of the zeroed token, keep its queries and keys
            rows = token_rows(output)
            return rows.masked_fill(features & ~keep[:, :, None], 0.0).view_as(output)

        return hook

    def patch(index: int) -> Callable[..., Any]:
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            clean = copies(run.states[index]).to(hidden.dtype)
            distances[index] = _distance(hidden, clean, similarity)
            # the next layer runs on its clean input
            return (clean, *output[1:]) if isinstance(output, tuple) else clean

        return hook

    pairs = [(layer.values, zero_values(layer)) for layer in run.layers]
    pairs += [(block, patch(i)) for i, block in enumerate(run.measured[:-1])]
    with _hooks(pairs):
        last = run.forward(copies)
    distances[-1] = _distance(last, copies(run.states[-1]), similarity)
    stacked = torch.stack([d for d in distances if d is not None], dim=-1)  # [B * m, Q, layer]
    return stacked.view(batch, m, -1, len(run.layers)).transpose(1, 2)


def _value_features(
    width: int, values: slice | torch.Tensor, n_heads: int, heads: list[int] | None
) -> torch.Tensor:
    """Which of a value projection's ``width`` output features are the zeroed heads' values
    (``values``: the value features, head by head)."""
    chosen = torch.arange(width)[values]
    if heads is not None:
        head_of = torch.arange(len(chosen)) // (len(chosen) // n_heads)
        chosen = chosen[torch.isin(head_of, torch.tensor(heads))]
    return torch.zeros(width, dtype=torch.bool).index_fill_(0, chosen, True)


def _distance(zeroed: torch.Tensor, clean: torch.Tensor, similarity: str) -> torch.Tensor:
    # float64: one minus the cosine of near-identical states would cancel to 0 in float32
    zeroed, clean = zeroed.double(), clean.double()
    if similarity == "cosine":
        return 1 - torch.nn.functional.cosine_similarity(zeroed, clean, dim=-1)
    return torch.linalg.vector_norm(zeroed - clean, dim=-1)


# --------------------------------------------------------------------------------------------------
# ALTI and ALTI-Logit
# --------------------------------------------------------------------------------------------------
# the residual stream's norm around each attention block: before it (GPT-2, Llama: the norm is
# inside the value vectors and the block output is ``x + attn``; GPT-NeoX's parallel MLP reads
# ``x`` too and, like every MLP, mixes no tokens) or after it (BERT)
_PRE_NORM = (
    "gpt2",
    "llama",
    "mistral",
    "gemma",
    "vaultgemma",  # Gemma 2's layout without its norms after attention and MLP
    "qwen2",
    "qwen3",
    "smollm3",
    "phi3",
    "granite",
    "cwm",  # Llama's layout, local layers
    "seed_oss",  # Llama's layout, biased projections
    "ernie4_5",  # Llama's layout, RoPE on interleaved pairs
    "helium",  # Llama's layout, RoPE on interleaved pairs
    "hunyuan_v1_dense",  # Llama's layout, query and key norms after RoPE
    "glm",  # Llama's layout, a fused gate/up projection
    "arcee",  # Llama's layout, an MLP without a gate
    "nemotron",  # Arcee's layout with LayerNorms (gain 1 + weight)
    "youtu",  # Llama's layout, multi-head latent attention (values in kv_b_proj)
    "llama4_text",  # Llama's layout, chunked local layers, queries scaled in its NoPE layers
    *_arch.EXPERTS,
    "granitemoeshared",  # ALTI reads attention blocks only: its two MLP modules do not matter
    "modernbert",  # a pre-norm encoder (its first layer's norm is an Identity)
    "gpt_neox",
    "persimmon",  # GPT-NeoX's sequential blocks, values in its per-head fused projection
    "opt",
    "biogpt",  # OPT's pre-LN blocks
    "gpt_neo",  # GPT-2's layout, Linear projections (its attention run by attrax: _routed)
    # attention and MLP in parallel on one norm: ALTI decomposes x + attention, as GPT-NeoX's
    "gptj",
    "codegen",  # GPT-J's block, values in 4 shards of its fused qkv_proj
    "phi",
    "cohere",  # its LayerNorm has no bias
    "cohere2",  # Cohere's, with local layers
    "ministral3",  # Mistral's layout, position-scaled queries
    "starcoder2",  # Llama's layout with LayerNorms and biases
    "stablelm",  # Llama's layout with LayerNorms (parallel in some), per-head query/key norms
    "olmo",  # Llama's layout with LayerNorms without weights
    "falcon",  # parallel (7B, 40B) or sequential blocks, values in a fused query_key_value
    "bloom",  # its attention module adds the residual itself; values as GPT-NeoX's
    "gpt_bigcode",  # GPT-2's layout in Linear layers, multi-query values in c_attn
)
_POST_NORM = (
    "bert",
    "roberta",
    "xlm-roberta",
    "camembert",
    "electra",
    "distilbert",
    "deberta-v2",  # BERT's layout; its relative positions enter the weights alone
)
# post-norm encoder-decoders ALTI+ decomposes: encoder, decoder self- and cross-attention blocks
# (each followed by its LayerNorm)
_SEQ2SEQ = ("marian", "bart")
# T5's layout: each attention in a sub-layer (its RMSNorm, the attention, the residual sum), no
# biases, relative position biases inside the weights
_T5 = ("t5", "mt5")

#: ALTI-Logit: one forward like ALTI, with a logit objective (and its contrast) per target.
ALTI_LOGIT = Family(
    name="alti_logit",
    takes=("contrast", "positions", "max_new_tokens", "max_memory"),
    refuses={
        "objective": "ALTI-Logit decomposes the target's logit (with `contrast`: the logit "
        "difference)",
        **{k: v for k, v in ALTI.refuses.items() if k not in ("objective", "contrast")},
        "attribute_target": "decoder-only models already attribute the target prefix; "
        "ALTI-Logit does not decompose encoder-decoder models",
    },
)


@dataclass
class _Parts:
    """What ALTI reads from one layer: output projection ``W [d, heads * head_dim]`` and bias,
    (post-norm models) the norm after the residual, and (Gemma 2, 3) the norm on the attention's
    output before the residual adds it, with its factor ``gain / rms`` ``[B, L, d]`` at each
    query once the layer has run."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    norm: torch.nn.Module | None
    after: torch.nn.Module | None = None
    scale: torch.Tensor | None = None


def _parts(model: Model, layer: _Layer, stack: str = "self", what: str = "ALTI") -> _Parts:
    """What ``what`` (the method, in its refusals) reads from one layer."""
    kind = _architecture(model)
    known = _PRE_NORM + _arch.SANDWICH + _POST_NORM + _SEQ2SEQ + _arch.PRE_NORM_SEQ2SEQ + _T5
    if kind not in known:
        raise ModelError(
            f"{model.name}: {what} has no decomposition for the {kind!r} architecture; attrax "
            f"decomposes {', '.join(known)}"
        )
    _refuse_residual_layouts(model, what)
    if kind in _arch.SANDWICH:  # Llama's layout, the attention's output normed before the residual
        project = layer.attention.get_submodule("o_proj")
        if project.bias is not None:  # it would sit inside that norm, per query
            raise ModelError(f"{model.name}: {what} has no decomposition for a biased o_proj here")
        weight = cast(torch.Tensor, project.weight)
        return _Parts(weight, None, None, _arch.sandwich_norms(layer.block)[0])
    norm: torch.nn.Module | None
    if kind in _arch.PRE_NORM_SEQ2SEQ:  # the block output is the residual plus the attention's
        project, norm = layer.attention.get_submodule("out_proj"), None
    elif kind in _T5:  # the recorded sub-layer holds the attention and its output projection
        inner = getattr(layer.attention, "SelfAttention", None)
        inner = inner or layer.attention.get_submodule("EncDecAttention")
        project, norm = inner.get_submodule("o"), None
    elif kind in _PRE_NORM:
        project = next(
            getattr(layer.attention, name)
            # Llama, GPT-2, GPT-NeoX, OPT, ModernBERT
            for name in ("o_proj", "c_proj", "dense", "out_proj", "Wo")
            if isinstance(getattr(layer.attention, name, None), torch.nn.Module)
        )
        norm = None
    elif kind in _SEQ2SEQ:  # post-norm encoder-decoders: each attention block has its LayerNorm
        project = layer.attention.get_submodule("out_proj")
        name = "encoder_attn_layer_norm" if stack == "cross" else "self_attn_layer_norm"
        norm = getattr(layer.block, name)
    elif kind == "distilbert":  # `out_lin`, then the block's LayerNorm of the residual sum
        project = layer.attention.get_submodule("out_lin")
        norm = layer.block.get_submodule("sa_layer_norm")
    else:
        output = layer.block.get_submodule("attention.output")
        project, norm = output.get_submodule("dense"), output.get_submodule("LayerNorm")
    weight = cast(torch.Tensor, project.weight)
    bias = cast("torch.Tensor | None", project.bias)
    if type(project).__name__ == "Conv1D":  # GPT-2's Conv1D computes x @ W: W is [in, out]
        weight = weight.T
    scale = _arch.branch_scale(model.hf.config)
    if scale != 1.0:  # Granite: the residual adds the attention's output times a constant
        weight, bias = weight * scale, None if bias is None else bias * scale
    return _Parts(weight, bias, norm)


def _refuse_residual_layouts(model: Model, what: str = "ALTI") -> None:
    """A ModelError for the layouts whose block is not ``x + attention`` (``what``: the method)."""
    config = model.hf.config
    if _architecture(model) == "opt" and not config.do_layer_norm_before:
        raise ModelError(
            f"{model.name}: {what} decomposes pre-LN OPT; this one normalises after each block "
            "(OPT-350m's layout), which attrax has no decomposition for"
        )
    if _architecture(model) == "bloom" and config.apply_residual_connection_post_layernorm:
        raise ModelError(
            f"{model.name}: its residual stream carries each block's normed input "
            f"(apply_residual_connection_post_layernorm=True), not the input {what} decomposes"
        )


def _architecture(model: Model) -> str:
    """The config's ``model_type`` (``"gpt2"``, ``"llama"``, ``"bert"``, ...)."""
    return str(getattr(model.hf.config, "model_type", type(model.hf).__name__))


class _Decomposition:
    """One eager forward whose layers are decomposed as they run (:meth:`Model.stream_attention`):
    per layer, the attention weights ``A [B, H, Q, K]``, the per-head value vectors through the
    output projection ``u [B, H, K, d]`` (``W_O^h v_j^h``) and the residual ``x [B, Q, d]`` (the
    block's input; a cross-attention's: its query input). Each layer is handed to
    ``on_layer(index, A, u, x, parts, stack)`` and dropped. Decoder-only and encoder-only models
    have the stack ``"self"``; encoder-decoders ``"encoder"``, ``"decoder"`` and ``"cross"``."""

    def __init__(
        self, model: Model, t: Tensors, on_layer: Callable[..., None], what: str = "ALTI"
    ) -> None:
        self.model, self.t, self.on_layer = model, t, on_layer
        if model.is_encoder_decoder:
            if _architecture(model) not in _SEQ2SEQ + _arch.PRE_NORM_SEQ2SEQ + _T5:
                raise ModelError(
                    f"{model.name} ({_architecture(model)}): ALTI+ decomposes the post-norm "
                    f"encoder-decoders {', '.join(_SEQ2SEQ)} and the pre-norm "
                    f"{', '.join(_arch.PRE_NORM_SEQ2SEQ + _T5)}"
                )
            names: tuple[str, ...] = ("encoder", "decoder", "cross")
        else:
            names = ("self",)
        self.stacks = {name: _layers(model, name) for name in names}
        self.stack = self.stacks["cross" if model.is_encoder_decoder else "self"]
        self.parts = {
            name: [_parts(model, layer, name, what) for layer in layers]
            for name, layers in self.stacks.items()
        }
        config = model.hf.config
        self.heads = {
            name: _arch.heads(config, "cross" if name == "decoder" else name) or 1 for name in names
        }
        self.inputs: dict[tuple[str, int], torch.Tensor] = {}
        self.values: dict[tuple[str, int], torch.Tensor] = {}
        self.outputs: dict[tuple[str, int], torch.Tensor] = {}
        self.count = dict.fromkeys(names, 0)

    def run(self) -> None:
        residual_of: dict[int, tuple[str, int]] = {}  # the module whose input is the residual
        values_of: dict[int, tuple[str, int]] = {}
        modules: dict[int, torch.nn.Module] = {}
        pre_norm = _architecture(self.model) in _arch.PRE_NORM_SEQ2SEQ
        for name, layers in self.stacks.items():
            for i, layer in enumerate(layers):
                owner = layer.block
                if name == "cross":  # the residual reaches the norm before it, or the attention
                    owner = (
                        layer.block.get_submodule("encoder_attn_layer_norm")
                        if pre_norm
                        else layer.attention
                    )
                residual_of[id(owner)] = (name, i)
                values_of[id(layer.values)] = (name, i)
                modules.update({id(m): m for m in (owner, layer.values)})

        def keep_input(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            self.inputs[residual_of[id(module)]] = x

        def keep_values(module: torch.nn.Module, _args: Any, output: torch.Tensor) -> None:
            name, index = values_of[id(module)]
            self.values[name, index] = token_rows(output)[
                ..., self.stacks[name][index].value_features
            ]

        def keep_output(key: tuple[str, int]) -> Callable[..., None]:
            def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
                self.outputs[key] = output[0] if isinstance(output, tuple) else output

            return hook

        handles = [
            modules[key].register_forward_pre_hook(keep_input, with_kwargs=True)
            for key in residual_of
        ]
        handles += [modules[key].register_forward_hook(keep_values) for key in values_of]
        # before stream_attention's own hooks, which hand the layer on: the attention's output,
        # which Gemma's norm reads
        handles += [
            layer.attention.register_forward_hook(keep_output((name, i)))
            for name, layers in self.stacks.items()
            for i, layer in enumerate(layers)
            if self.parts[name][i].after is not None
        ]
        try:
            self.model.stream_attention(self.t, self._on_map)
        finally:
            for handle in handles:
                handle.remove()

    def _on_map(self, stack: str, weights: torch.Tensor) -> None:
        index = self.count[stack]
        self.count[stack] += 1
        parts, heads = self.parts[stack][index], self.heads[stack]
        values = self.values.pop((stack, index))
        batch, length, width = values.shape
        # half-precision models are decomposed in float32: the L1 scores subtract close norms
        dtype = at_least_float32(values.dtype)
        kv = width // (parts.weight.shape[1] // heads)
        per_head = values.view(batch, length, kv, -1).repeat_interleave(heads // kv, dim=2)
        weight = parts.weight.view(parts.weight.shape[0], heads, -1)
        u = torch.einsum("bjhk,dhk->bhjd", per_head.to(dtype), weight.to(dtype))
        x = self.inputs.pop((stack, index)).to(dtype)
        if parts.after is not None:  # the norm on the attention's output, at each query's scale
            output = self.outputs.pop((stack, index))
            divisor = norm_divisor(parts.after, output, centered=False).to(dtype)
            gain = norm_gain(parts.after).to(dtype)
            parts = dataclasses.replace(parts, scale=gain / divisor[..., None])
        self.on_layer(index, weights.to(dtype), u, x, parts, stack)


def _contributions(
    weights: torch.Tensor,
    u: torch.Tensor,
    x: torch.Tensor,
    parts: _Parts,
    mask: torch.Tensor,
    vectors: int,
) -> torch.Tensor:
    """ALTI's contributions ``C [B, L, L]`` of one layer: ``T_i(x_j) = sum_h A^h_ij W_O^h v^h_j +
    [i = j] x_j`` (normalized like the block output where the norm comes after), scored
    ``max(0, |y_i|_1 - |y_i - T_i(x_j)|_1)`` and divided by their sum over ``j``; padded rows
    are the identity. The ``[B, rows, L, d]`` vectors are built for as many query rows at a time
    as fit ``vectors`` bytes (:func:`_vector_budget`)."""
    length = x.shape[1]
    scores = _by_rows(
        x, length, vectors, lambda rows: _row_scores(weights[:, :, rows], u, x, parts, rows.start)
    )
    scores = scores * mask[:, None, :].to(scores.dtype)
    total = scores.sum(-1, keepdim=True)
    scores = scores / torch.where(total == 0, 1.0, total)
    eye = torch.eye(length, dtype=scores.dtype, device=scores.device)
    return torch.where(mask.bool()[:, :, None], scores, eye)


def _by_rows(
    x: torch.Tensor,
    keys: int,
    vectors: int,
    score: Callable[[slice], torch.Tensor],
    share: int = 1,
) -> torch.Tensor:
    """``[B, Q, keys]`` scores of the query rows of ``x [B, Q, d]``, ``score(rows)`` a chunk
    at a time: as many rows as their vectors over ``keys`` sources fit ``vectors`` bytes, each
    row's counted ``share`` times (a method that makes more copies of them than ALTI)."""
    batch, queries, width = x.shape
    per_row = share * _row_bytes(batch, keys, width, x.element_size())
    rows = max(1, min(queries, vectors // per_row))
    # written in place: chunks kept alive between the chunks' temporaries fragment the heap
    scores = x.new_empty((batch, queries, keys))
    for start in range(0, queries, rows):  # memory chunking over query rows
        chunk = slice(start, start + rows)
        scores[:, chunk] = score(chunk)
    return scores


def _row_bytes(batch: int, keys: int, width: int, size: int = 4) -> int:
    # one query row's vectors [B, 1, keys, d] (float32, or the model's float64) and the three
    # temporaries _l1_scores makes
    return 4 * batch * keys * width * size


def _vector_budget(
    model: Model,
    t: Tensors,
    options: Any,
    what: str = "ALTI",
    held: int = 0,
    keys: int | None = None,
) -> int:
    """Bytes ALTI's per-layer vectors may take at once: ``max_memory`` (None: half the free memory
    of the model's device) less the rest of the call's estimate (:func:`_vector_fixed`, with
    ``held`` bytes the method keeps); on the CPU at most :data:`CPU_PASS`. A ``max_memory``
    below one query row's vectors (over ``keys`` parts, default one per token) on top of that is
    an :class:`OptionError` naming the smallest that can be met."""
    batch, length = t.ids.shape[0], t.ids.shape[1]
    fixed = _vector_fixed(model, t, held)
    size = model.dtype.itemsize
    smallest = fixed + _row_bytes(batch, keys or length, model.hidden_size, max(size, 4))
    max_memory = parse_bytes(options.get("max_memory"))
    one_row = f"{what}'s forward with one query row's vectors at a time"
    return budget_after(model.device, max_memory, fixed, smallest, one_row)


def _vector_fixed(model: Model, t: Tensors, held: int = 0) -> int:
    """The bytes of ALTI's call beside its vectors: one layer's eager forward (its temporaries,
    three ``[B, heads, L, L]`` maps), the float32 decomposition (the per-head values ``[B, heads,
    L, d]``; the maps' copy on half-precision models), three ``[B, L, L]`` rollout matrices and
    ``held`` bytes the method keeps."""
    config = model.hf.config
    batch, length = t.ids.shape[0], t.ids.shape[1]
    if t.decoder_ids is not None:
        length = max(length, t.decoder_ids.shape[1])
    width, size = model.hidden_size, model.dtype.itemsize
    heads = max(_arch.heads(config, name) or 1 for name in ("self", "encoder", "cross"))
    # the layer's temporaries at the MLP's width, and three [B, heads, L, L] maps (scores,
    # softmax, the mask; the softmax in float32 on half-precision models): 1523 tokens, 16 heads
    # of a d=64 GPT-2 held 351 MiB, two maps and a half
    body = forward_bytes(
        batch, length, width, size, _arch.mlp_width(config) or 4 * width, 0, 1,
        _arch.family(config), saved=False, device=model.device.type,
        relative=_arch.relative_width(config, length),
    )  # fmt: skip
    maps = 3 * batch * heads * length * length * max(size, 4)
    # float32 decomposition: u [B, heads, L, d] and x, the maps' copy when the model is not
    copy = heads * length * length if size < 4 else 0
    decomposition = 4 * batch * (heads * length * width + length * width + copy)
    return CALL_OVERHEAD + body + maps + decomposition + 3 * 4 * batch * length * length + held


def _row_scores(
    weights: torch.Tensor, u: torch.Tensor, x: torch.Tensor, parts: _Parts, start: int
) -> torch.Tensor:
    """Unnormalized ALTI scores ``[B, q, L]`` of the query rows ``start .. start + q``."""
    vectors = torch.einsum("bhij,bhjd->bijd", weights.to(u.dtype), u)
    i = torch.arange(weights.shape[2], device=x.device)
    if parts.scale is not None:  # Gemma: the norm on the attention's output, linear at its scale
        vectors.mul_(parts.scale[:, start + i, None, :])  # in place: no second [B, q, L, d]
    vectors[:, i, start + i] += x[:, start + i]  # the residual: T_i(x_i) += x_i
    return _l1_scores(vectors, parts)


def _cross_contributions(
    weights: torch.Tensor,
    u: torch.Tensor,
    x: torch.Tensor,
    parts: _Parts,
    mask: torch.Tensor,
    vectors: int,
) -> torch.Tensor:
    """ALTI+'s cross-attention block: contributions ``[B, T, S + 1]`` of the encoder tokens
    (``sum_h A^h_ij W_O^h v^h_j``) and, last, of the decoder position's own residual ``x_i``,
    scored as ALTI and divided by their sum; query rows in chunks as :func:`_contributions`."""
    scores = _by_rows(
        x,
        weights.shape[-1] + 1,
        vectors,
        lambda rows: _cross_row_scores(weights[:, :, rows], u, x[:, rows], parts),
    )
    seen = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    scores = scores * seen[:, None, :].to(scores.dtype)
    total = scores.sum(-1, keepdim=True)
    return scores / torch.where(total == 0, 1.0, total)


def _cross_row_scores(
    weights: torch.Tensor, u: torch.Tensor, x: torch.Tensor, parts: _Parts
) -> torch.Tensor:
    """Unnormalized ALTI+ cross-attention scores ``[B, q, S + 1]`` of the query rows of ``x``."""
    vectors = torch.einsum("bhij,bhjd->bijd", weights.to(u.dtype), u)
    return _l1_scores(torch.cat([vectors, x[:, :, None, :]], dim=2), parts)


def _l1_scores(vectors: torch.Tensor, parts: _Parts) -> torch.Tensor:
    """``max(0, |y_i|_1 - |y_i - T_i(x_j)|_1)`` for vectors ``T [B, q, n, d]`` summing (with the
    output projection's bias) to the block output, normalized like it where a norm follows."""
    vectors, output = _normed(vectors, parts)
    distance = torch.linalg.vector_norm(output[:, :, None] - vectors, ord=1, dim=-1)
    return torch.relu(torch.linalg.vector_norm(output, ord=1, dim=-1)[..., None] - distance)


def _normed(vectors: torch.Tensor, parts: _Parts) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectors ``T [B, q, n, d]`` summing (with the output projection's bias) to the block output
    ``y [B, q, d]``, and ``y``; where a LayerNorm follows the residual, both through it, the
    vectors linearly at ``y``'s own scale (the norm's bias is in ``y`` alone)."""
    output = vectors.sum(2) + (parts.bias if parts.bias is not None else 0)
    if parts.norm is None:
        return vectors, output
    norm = cast(torch.nn.LayerNorm, parts.norm)  # the post-norm models' LayerNorm
    scale = torch.sqrt(output.var(-1, unbiased=False, keepdim=True) + norm.eps)
    vectors = norm.weight * (vectors - vectors.mean(-1, keepdim=True)) / scale[:, :, None]
    bias = None if norm.bias is None else norm.bias.to(output.dtype)
    output = torch.nn.functional.layer_norm(
        output, output.shape[-1:], norm.weight.to(output.dtype), bias, norm.eps
    )
    return vectors, output


def _check_aggregate(options: Any) -> None:
    if options["aggregate"] and options["layers"] is not None:
        raise OptionError(
            "`layers` selects per-layer values: it needs aggregate=False (the rollout runs "
            "through every layer)"
        )


@ALTI.method(_check_aggregate, aggregate=_boolean, layers=check_selection)
def alti(call: Call, *, aggregate: bool = True, layers: Selection = None) -> xr.DataArray:
    """ALTI (Ferrando et al. 2022): how much each source token contributes to the query that
    predicts each target, through attention weights, values, output projection, residual and
    LayerNorm.

    Each layer's attention block output ``y_i`` (the residual ``x_i`` plus the attention output;
    BERT: after its LayerNorm, linearized with ``y_i``'s own scale) is split into one vector per
    source, ``T_i(x_j)``; their contributions ``max(0, |y_i|_1 - |y_i - T_i(x_j)|_1)`` are
    divided by their sum (each row sums to 1). ``aggregate=True`` rolls them out across layers
    (``C_L ... C_1``, residual included, so no ``0.5 * I`` as in attention rollout).
    Architectures: GPT-2, Llama-like (Llama, Mistral, Qwen2) and BERT-like (BERT, RoBERTa);
    the encoder-decoders Marian, BART (post-norm), NLLB's M2M100, mBART, Pegasus, T5 and mT5
    (pre-norm) get ALTI+ (Ferrando et al. 2022b): encoder
    rollout, then per decoder layer its self-attention block's ALTI and its cross-attention
    block split between the encoder tokens and the position's own residual.

    Arguments:
        model, inputs, targets, positions, max_new_tokens: as :func:`attrax.saliency`.
        attribute_target: encoder-decoder: also the decoder prefix's share, on the
            ``(side, position)`` source index (each row then sums to 1).
        aggregate: the rollout ``([example,] target, source)``; False: each layer's
            contributions ``([example,] target, source, layer)`` (not for encoder-decoders).
        layers: with ``aggregate=False``, which layers to keep.
        max_memory: bytes (or ``"8GB"``) the call may take: bounds the query rows whose
            ``[B, rows, L, d]`` vectors are built at once (None: half the device's free memory;
            on the CPU 2 GiB of vectors at most). Below one row on top of the forward: an
            :class:`~attrax.OptionError` naming the smallest budget.

    Returns:
        DataArray ``([example,] target, source)``: the rollout, each row summing to 1 (to at
        most 1 for an encoder-decoder without ``attribute_target``); with ``aggregate=False``
        ``([example,] target, source, layer)``, each layer's row-normalized contributions, the
        ``layer`` coordinate holding the (non-negative) indices kept.

    >>> import attrax as ax
    >>> da = ax.alti(ax.load_model(), "1 2 3 =", " 3 2 1")
    >>> da.dims
    ('target', 'source')
    >>> bool(abs(da.sum("source") - 1).max() < 1e-5)
    True
    """
    model = call.model
    refuse_no_query_row(model, "alti")
    t = to_tensors(call.batch, model)
    if model.is_encoder_decoder:
        return _alti_plus(call, t, aggregate)
    per_layer: list[torch.Tensor] = []
    rolled: list[torch.Tensor] = []
    vectors = _vector_budget(model, t, call.options)

    def on_layer(index: int, weights: Any, u: Any, x: Any, parts: _Parts, _stack: str) -> None:
        step = _contributions(weights, u, x, parts, t.mask, vectors)
        if aggregate:
            rolled[:] = [step if not rolled else step @ rolled[0]]
        else:
            per_layer.append(_rows(step, t.index))

    decomposition = _Decomposition(model, t, on_layer)
    chosen = selection_indices(layers, len(decomposition.stack), "layers", "layers")
    with torch.no_grad():
        decomposition.run()
    if aggregate:
        return call.label([_rows(rolled[0], t.index)], trailing=())
    values = torch.stack([per_layer[i] for i in chosen], dim=-1)
    return call.label([values], trailing=("layer",), trailing_coords={"layer": chosen})


def _alti_plus(call: Call, t: Tensors, aggregate: bool) -> xr.DataArray:
    """ALTI+ (Ferrando et al. 2022b) of an encoder-decoder, rolled out over encoder and decoder."""
    if not aggregate:
        raise OptionError(
            "`aggregate=False` (per-layer ALTI) is for decoder-only and encoder-only models; "
            "an encoder-decoder's ALTI+ is the rollout"
        )
    assert t.decoder_mask is not None
    rolled = _AltiPlus(t.mask, t.decoder_mask, _vector_budget(call.model, t, call.options))
    with torch.no_grad():
        _Decomposition(call.model, t, rolled).run()
    assert rolled.to_encoder is not None and rolled.to_decoder is not None
    sides = [_rows(rolled.to_encoder, t.index)]
    if call.options["attribute_target"]:
        sides.append(_rows(rolled.to_decoder, t.index))
    return call.label(sides, trailing=())


class _AltiPlus:
    """ALTI+'s rollout as the layers stream past: the encoder's ``R_enc <- C R_enc``; each
    decoder position's shares of (encoder ``[B, T, S]``, decoder ``[B, T, T]``) input tokens go
    through its self-attention block's ALTI ``C`` (both blocks ``<- C R``), then its
    cross-attention block's contributions ``c`` of the encoder tokens and of its own residual:
    ``to_encoder <- c_enc R_enc + c_own to_encoder`` and ``to_decoder <- c_own to_decoder``."""

    def __init__(self, mask: torch.Tensor, decoder_mask: torch.Tensor, vectors: int) -> None:
        self.mask, self.decoder_mask, self.vectors = mask, decoder_mask, vectors
        self.encoder: torch.Tensor | None = None
        self.to_encoder: torch.Tensor | None = None
        self.to_decoder: torch.Tensor | None = None

    def __call__(self, index: int, weights: Any, u: Any, x: Any, parts: _Parts, stack: str) -> None:
        if stack == "encoder":
            step = _contributions(weights, u, x, parts, self.mask, self.vectors)
            self.encoder = step if self.encoder is None else step @ self.encoder
            return
        assert self.encoder is not None
        if self.to_encoder is None or self.to_decoder is None:
            batch, length = self.decoder_mask.shape
            self.to_encoder = self.encoder.new_zeros((batch, length, self.encoder.shape[-1]))
            eye = torch.eye(length, dtype=self.encoder.dtype, device=self.encoder.device)
            self.to_decoder = eye.expand(batch, length, length)
        if stack == "decoder":
            step = _contributions(weights, u, x, parts, self.decoder_mask, self.vectors)
            self.to_encoder, self.to_decoder = step @ self.to_encoder, step @ self.to_decoder
            return
        shares = _cross_contributions(weights, u, x, parts, self.mask, self.vectors)
        real = self.decoder_mask.bool()[:, :, None]  # padded queries keep what they hold
        own = torch.where(real, shares[..., -1:], 1.0)
        from_encoder = torch.where(real, shares[..., :-1], 0.0)
        self.to_encoder = from_encoder @ self.encoder + own * self.to_encoder
        self.to_decoder = own * self.to_decoder


@ALTI_LOGIT.method(_check_aggregate, aggregate=_boolean, layers=check_selection)
def alti_logit(call: Call, *, aggregate: bool = True, layers: Selection = None) -> xr.DataArray:
    """ALTI-Logit (Ferrando et al. 2023): each source token's contribution to the target's logit.

    Each layer's attention update at the predicting query, split by source position ``j``
    (``sum_h A^h_ij W_O^h v^h_j``), is projected onto the target's unembedding through the final
    norm, linearized with the final residual's own scale at that query (``Δlogit_l(j)``), and
    carried back to the input tokens by the ALTI rollout of the layers below:
    ``sum_l Δlogit_l R_{l-1}`` (``R_0 = I``). With ``contrast`` the logit difference target -
    contrast is decomposed. Biases, the MLPs' direct updates and the embeddings' direct logit
    are not attributed. Decoder-only models (GPT-2, Llama-like): language models, and
    classifiers whose linear head reads the final norm (the class's row of the head).

    Arguments:
        model, inputs, targets, contrast, positions, max_new_tokens: as :func:`attrax.saliency`.
        aggregate: summed over layers ``([example,] target, source)``; False: each layer's term
            ``([example,] target, source, layer)``.
        layers: with ``aggregate=False``, which layers to keep.
        max_memory: bytes (or ``"8GB"``) the call may take: bounds the query rows whose
            ``[B, rows, L, d]`` vectors are built at once (None: half the device's free memory;
            on the CPU 2 GiB of vectors at most). Below one row on top of the forward: an
            :class:`~attrax.OptionError` naming the smallest budget.

    Returns:
        DataArray ``([example,] target, source)`` in logit units (the logit difference with
        ``contrast``), summed over layers; with ``aggregate=False``
        ``([example,] target, source, layer)``, the ``layer`` coordinate holding the
        (non-negative) indices kept. A model that soft-caps its logits (Gemma 2) adds a
        ``logit_softcap`` attr: the decomposed logit is the one before the cap.

    >>> import attrax as ax
    >>> ax.alti_logit(ax.load_model(), "1 2 3 =", " 3 2 1").dims
    ('target', 'source')
    """
    model = call.model
    linear = tuple(a for a in _PRE_NORM + _arch.SANDWICH if a not in _NONLINEAR_HEADS)
    if _architecture(model) in _NONLINEAR_HEADS:
        raise ModelError(
            f"{model.name} ({_architecture(model)}, {model.task}): its head "
            f"({_NONLINEAR_HEADS[_architecture(model)]}) lies between the final norm and the "
            "logits, so the logit has no linear path from each layer, which ALTI-Logit decomposes"
        )
    if _architecture(model) not in linear:
        raise ModelError(
            f"{model.name} ({_architecture(model)}, {model.task}): ALTI-Logit decomposes the logits "
            f"of decoder-only models, language models or classifiers "
            f"({', '.join(linear)}): a post-norm encoder's logit has no linear path "
            "from each layer"
        )
    _refuse_residual_layouts(model)
    t = to_tensors(call.batch, model)
    vectors = _vector_budget(model, t, call.options)  # a refused budget before any forward
    final = _final_norm(model)
    residual: list[torch.Tensor] = []

    def keep_final(_module: torch.nn.Module, args: Any) -> None:
        residual.append(_rows(args[0], t.index))

    # a first forward reads the final residual at the predicting queries (its norm's scale)
    with torch.no_grad(), _pre_hook(final, keep_final):
        _base_forward(model, t.ids, t.mask, None)
    direction = _logit_direction(model, final, residual[0], t)  # [B, K, d]
    terms: list[torch.Tensor] = []
    below: list[torch.Tensor] = []

    def on_layer(index: int, weights: Any, u: Any, x: Any, parts: _Parts, _stack: str) -> None:
        rows = _rows(weights.transpose(1, 2), t.index).to(u.dtype)  # [B, K, H, L]
        read = direction.to(u.dtype)
        if parts.scale is not None:  # Gemma: the norm on the attention's output at the query
            read = read * _rows(parts.scale, t.index)
        delta = torch.einsum("bkhj,bhjd,bkd->bkj", rows, u, read)
        terms.append(delta if not below else delta @ below[0])
        step = _contributions(weights, u, x, parts, t.mask, vectors)
        below[:] = [step if not below else step @ below[0]]

    decomposition = _Decomposition(model, t, on_layer)
    chosen = selection_indices(layers, len(decomposition.stack), "layers", "layers")
    with torch.no_grad():
        decomposition.run()
    if aggregate:
        return softcapped(call.label([torch.stack(terms).sum(0)], trailing=()), model)
    values = torch.stack([terms[i] for i in chosen], dim=-1)
    da = call.label([values], trailing=("layer",), trailing_coords={"layer": chosen})
    return softcapped(da, model)


#: pre-norm models ALTI runs on whose head is not linear after the final norm
_NONLINEAR_HEADS = {"modernbert": "dense, GELU and LayerNorm before the classifier or decoder"}


def _final_norm(model: Model) -> torch.nn.Module:
    """The norm the head reads: GPT-2's ``ln_f``, Llama's ``norm``, GPT-NeoX's and OPT's
    ``final_layer_norm``, BioGPT's ``layer_norm``."""
    base = body(model.hf)
    base = getattr(base, "decoder", base)  # OPT's layers live in its `decoder`
    for name in ("ln_f", "norm", "final_layer_norm", "final_layernorm", "layer_norm"):
        if isinstance(getattr(base, name, None), torch.nn.Module):
            return getattr(base, name)
    raise ModelError(f"{model.name} ({_architecture(model)}): attrax finds no final norm")


def _logit_direction(
    model: Model, final: torch.nn.Module, residual: torch.Tensor, t: Tensors
) -> torch.Tensor:
    """The direction ``g`` with ``Δlogit = g · update`` for each target: the unembedding row
    (minus the contrast's), through OPT's ``project_out`` where it has one, and through the
    final norm linearized at the query's residual."""
    dtype = at_least_float32(residual.dtype)
    head = _head_weight(model)
    unembed = head[t.target_ids].to(dtype)
    if t.contrast_ids is not None:
        unembed = unembed - head[t.contrast_ids].to(dtype)
    readout = getattr(getattr(body(model.hf), "decoder", None), "project_out", None)
    if readout is not None:  # the head reads P y: y is read by P^T
        unembed = unembed @ readout.weight.to(dtype)
    direction = unembed * norm_gain(final).to(dtype)
    if model.task == "generation":  # Granite's LM head scales its logits
        direction = direction * _arch.logit_scale(model.hf.config)
    centered = norm_centers(final)  # RMSNorm: no centering
    if centered:
        direction = direction - direction.mean(-1, keepdim=True)
    return direction / norm_divisor(final, residual.to(dtype), centered)[..., None]


def _head_weight(model: Model) -> torch.Tensor:
    """The rows that turn the final norm's output into logits: the unembedding, or a decoder-only
    classifier's linear head (``score``, ``classifier``)."""
    if model.task == "generation":
        return model.hf.get_output_embeddings().weight
    for name in ("score", "classifier"):
        head = getattr(model.hf, name, None)
        if isinstance(head, torch.nn.Linear):
            return head.weight
    raise ModelError(
        f"{model.name} ({_architecture(model)}): ALTI-Logit needs a linear classifier head "
        "(`score` or `classifier`) on the final norm"
    )


@contextlib.contextmanager
def _pre_hook(module: torch.nn.Module, hook: Callable[..., Any]) -> Iterator[None]:
    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------------
# Norm-based mixing (Kobayashi et al. 2020, 2021; GlobEnc, Modarressi et al. 2022)
# --------------------------------------------------------------------------------------------------
#: what ``attention_norm`` measures the norm of, from the attention's weighted vectors outwards
INCLUDES = ("attention", "residual", "layernorm", "encoder")
_NORM_ONE_FORWARD = "the norm-based measures come from one forward"

#: Norm-based mixing: the decomposition ALTI runs, measured by the norms of its vectors.
ATTENTION_NORM = Family(
    name="attention_norm",
    takes=("positions", "max_new_tokens", "max_memory"),
    refuses={
        "objective": _NO_OBJECTIVE,
        "contrast": _NO_OBJECTIVE,
        "chunk_size": f"{_NORM_ONE_FORWARD}: there is no backward to chunk",
        "batch_size": f"{_NORM_ONE_FORWARD}: there are no points to batch",
        "attribute_target": "decoder-only models already attribute the target prefix; the "
        "norm-based measures do not decompose encoder-decoder models",
    },
)


def _include(value: object, name: str) -> None:
    if value not in INCLUDES:
        raise OptionError(f"`{name}` must be one of {INCLUDES}, got {value!r}")


def _check_norms(options: Any) -> None:
    _check_aggregate(options)
    if options["per_head"] and options["include"] != "attention":
        raise OptionError(
            f"`per_head=True` measures each head's weighted vectors, which only "
            f"include='attention' keeps apart (the residual and the norms act on the heads' "
            f"sum), got include={options['include']!r}"
        )
    if options["per_head"] and options["aggregate"]:
        raise OptionError(
            "`per_head=True` keeps each layer's heads: it needs aggregate=False (the rollout "
            "runs through whole layers)"
        )


@ATTENTION_NORM.method(
    _check_norms, include=_include, per_head=_boolean, aggregate=_boolean, layers=check_selection
)
def attention_norm(
    call: Call,
    *,
    include: str = "attention",
    per_head: bool = False,
    aggregate: bool = False,
    layers: Selection = None,
) -> xr.DataArray:
    """Norm-based context mixing (Kobayashi et al. 2020, 2021) and GlobEnc (Modarressi et al.
    2022): the norm of each source token's share of each layer's attention block output at the
    query that predicts each target.

    Each layer's attention output at query ``i`` is split by source ``j`` as ALTI splits it,
    ``sum_h A^h_ij f^h(x_j)`` (``f^h``: the head's values through its slice of the output
    projection, the value bias included, the output bias not), and measured by its L2 norm.
    ``include`` says how far out the split goes:

    - ``"attention"``: ``||sum_h A^h_ij f^h(x_j)||`` (Kobayashi et al. 2020; Attn-N); with
      ``per_head`` each head's ``||A^h_ij f^h(x_j)||``. Where the model norms the attention's
      output before the residual sum (Gemma 2, 3, OLMo 2), of the vectors after that norm.
    - ``"residual"``: plus the residual ``x_i`` at ``j = i`` (AttnRes-N, Kobayashi et al. 2021).
    - ``"layernorm"``: through the LayerNorm after the residual sum, linear at the sum's own
      scale, its bias left out (AttnResLn-N); post-norm encoders (BERT-like, DistilBERT) only.
    - ``"encoder"``: on through the block's second residual and LayerNorm, the feed-forward
      left out but its output in that norm's scale (N-Enc, Modarressi et al. 2022). With
      ``aggregate=True`` this is GlobEnc: the layers' matrices multiplied, ``N_L ... N_1``, as
      the authors' code does (rows not normalized first; the rollout of ``"attention"`` leaves
      the residual out, which no paper does).

    Architectures: decoder-only and encoder-only models ALTI decomposes (GPT-2, Llama-like,
    BERT-like); not encoder-decoders.

    Arguments:
        model, inputs, targets, positions, max_new_tokens: as :func:`attrax.saliency`.
        include: ``"attention"`` (default), ``"residual"``, ``"layernorm"`` or ``"encoder"``.
        per_head: with ``include="attention"``, each head's norms on a ``head`` dim.
        aggregate: False (default): each layer's norms ``([example,] target, source, layer)``;
            True: their product across layers ``([example,] target, source)``.
        layers: with ``aggregate=False``, which layers to keep.
        max_memory: bytes (or ``"8GB"``) the call may take: bounds the query rows whose
            ``[B, rows, L, d]`` vectors are built at once (None: half the device's free memory;
            on the CPU 2 GiB of vectors at most). Below one row on top of the forward: an
            :class:`~attrax.OptionError` naming the smallest budget.

    Returns:
        DataArray ``([example,] target, source, layer)`` of non-negative norms (``per_head``:
        ``(..., layer, head)``); with ``aggregate=True`` ``([example,] target, source)``.

    >>> import attrax as ax
    >>> model = ax.load_model()
    >>> ax.attention_norm(model, "1 2 3 =", " 3 2 1").dims
    ('target', 'source', 'layer')
    >>> ax.attention_norm(model, "1 2 3 =", " 3 2 1", per_head=True).dims
    ('target', 'source', 'layer', 'head')
    """
    model = call.model
    refuse_no_query_row(model, "attention_norm")
    if model.is_encoder_decoder:
        raise ModelError(
            f"{model.name} ({_architecture(model)}): the norm-based measures decompose "
            "decoder-only and encoder-only models, not encoder-decoders"
        )
    t = to_tensors(call.batch, model)
    decomposition = _Decomposition(model, t, lambda *args: finish(*args), "attention_norm")
    normed = include in ("layernorm", "encoder")
    if normed and any(parts.norm is None for parts in decomposition.parts["self"]):
        raise ModelError(
            f"{model.name} ({_architecture(model)}): include={include!r} goes through the "
            "LayerNorm after the attention's residual sum, which only post-norm encoders "
            f"({', '.join(_POST_NORM)}) have; this model has none there (it normalises the "
            "block's input, or the attention's output before the sum): include='residual' is "
            "its whole attention block"
        )
    seconds = _second_norms(model, decomposition.stack) if include == "encoder" else []
    vectors = _vector_budget(model, t, call.options, "attention_norm")  # before any forward
    chosen = selection_indices(layers, len(decomposition.stack), "layers", "layers")
    kept: dict[int, torch.Tensor] = {}
    rolled: list[torch.Tensor] = []
    pending: dict[int, tuple[Any, ...]] = {}

    def finish(index: int, weights: Any, u: Any, x: Any, parts: _Parts, _stack: str) -> None:
        if include == "encoder":  # measured once the second norm's input exists
            pending[index] = (weights, u, x, parts)
        elif aggregate or index in chosen:
            measure(index, weights, u, x, parts, None)

    def measure(index: int, weights: Any, u: Any, x: Any, parts: _Parts, second: Any) -> None:
        if per_head:  # ||A^h_ij f^h(x_j)|| = A^h_ij ||f^h(x_j)||, at each query's scale (Gemma)
            if parts.scale is None:
                lengths = u.square().sum(-1)[:, :, None, :]
            else:
                lengths = torch.einsum("bhjd,bid->bhij", u.square(), parts.scale.square())
            kept[index] = _rows((weights * lengths.sqrt()).permute(0, 2, 3, 1), t.index)
            return
        step = _by_rows(
            x,
            x.shape[1],
            vectors,
            lambda rows: _norm_rows(weights[:, :, rows], u, x, parts, include, second, rows.start),
        )
        if aggregate:
            rolled[:] = [step if not rolled else step @ rolled[0]]
        else:
            kept[index] = _rows(step, t.index)

    def second_norm(index: int, norm: torch.nn.LayerNorm) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, args: Any) -> None:
            weights, u, x, parts = pending.pop(index)
            if aggregate or index in chosen:
                z = args[0].to(u.dtype)
                scale = torch.sqrt(z.var(-1, unbiased=False) + norm.eps)
                measure(index, weights, u, x, parts, (norm.weight.to(u.dtype), scale))

        return hook

    # the second norms' inputs whole: every call runs the feed-forward unchunked (_protocol)
    with contextlib.ExitStack() as stack, torch.no_grad():
        for index, norm in enumerate(seconds):
            stack.enter_context(_pre_hook(norm, second_norm(index, norm)))
        decomposition.run()
    if aggregate:
        return call.label([_rows(rolled[0], t.index)], trailing=())
    values = torch.stack([kept[i] for i in chosen], dim=3)
    if per_head:
        heads = list(range(values.shape[-1]))
        return call.label(
            [values], trailing=("layer", "head"), trailing_coords={"layer": chosen, "head": heads}
        )
    return call.label([values], trailing=("layer",), trailing_coords={"layer": chosen})


def _second_norms(model: Model, layers: list[_Layer]) -> list[torch.nn.LayerNorm]:
    """Each post-norm encoder block's LayerNorm after its feed-forward's residual sum: BERT's
    ``output.LayerNorm``, DistilBERT's ``output_layer_norm``."""
    found = []
    for layer in layers:
        block = layer.block
        norm = getattr(block, "output_layer_norm", None)
        if norm is None:
            norm = getattr(getattr(block, "output", None), "LayerNorm", None)
        if not isinstance(norm, torch.nn.LayerNorm):
            raise ModelError(
                f"{model.name} ({_architecture(model)}): include='encoder' needs the LayerNorm "
                f"after each block's feed-forward (BERT's `output.LayerNorm`, DistilBERT's "
                f"`output_layer_norm`); found none in {type(block).__name__}"
            )
        found.append(norm)
    return found


def _norm_rows(
    weights: torch.Tensor,
    u: torch.Tensor,
    x: torch.Tensor,
    parts: _Parts,
    include: str,
    second: tuple[torch.Tensor, torch.Tensor] | None,
    start: int,
) -> torch.Tensor:
    """The norms ``[B, q, L]`` of the query rows ``start .. start + q``' vectors, as far out as
    ``include`` goes (:func:`attention_norm`)."""
    vectors = torch.einsum("bhij,bhjd->bijd", weights.to(u.dtype), u)
    i = torch.arange(weights.shape[2], device=x.device)
    if parts.scale is not None:  # Gemma: the norm on the attention's output, linear at its scale
        vectors.mul_(parts.scale[:, start + i, None, :])
    if include != "attention":
        vectors[:, i, start + i] += x[:, start + i]
    if include in ("layernorm", "encoder"):
        vectors = _normed(vectors, parts)[0]
    if second is not None:  # the second norm, linear at its input's own scale
        gain, scale = second
        vectors = (
            gain * (vectors - vectors.mean(-1, keepdim=True)) / scale[:, start + i, None, None]
        )
    return torch.linalg.vector_norm(vectors, dim=-1)


__all__ = ["alti", "alti_logit", "attention_norm", "value_zeroing"]
