"""The labelled-array contract: dim and coordinate names, missing markers, attrs and builders.

Every result array is built here and read back through the readers here; no other module
constructs a result ``DataArray`` by hand. ``docs/data-model.md`` documents :data:`DIMS`,
:data:`COORDS` and :data:`ATTRS`, and a test checks the page against them.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from math import nan
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from xarray.core.indexes import PandasIndex

from ._inputs import Batch
from ._memory import to_host
from ._model import Model
from ._tokens import MISSING_TOKEN as MISSING_TOKEN
from ._version import __version__

#: Every dim a result can have, and what it means.
DIMS: dict[str, str] = {
    "example": "one per input text when a list is given (absent for a single string)",
    "target": "the attributed (predicted) token, by its position in the sequence the model reads",
    "source": "what the attribution is about: positions of the prompt+continuation or encoder input",
    "query": "the attending position of an encoder self-attention map; information_flow: the "
    "position an edge goes into",
    "hidden": "the embedding dimension (with site='heads': a head's own width)",
    "layer": "a layer of the model (attention maps; the residual stream, or a block's site, with "
    "`layers=`)",
    "head": "an attention head (with `layers=` and site='heads': each head's output, beside `hidden`)",
    "neuron": "an MLP neuron: an input of the MLP's output projection (site='neurons'; "
    "knowledge_neurons)",
    "sender": "edge_attribution_patching: a node that writes to the residual stream",
    "receiver": "edge_attribution_patching: a node that reads the residual stream",
    "circuit": "edge_patching: one set of edges given (`circuit=` or `patch=` as a list of "
    "lists), in the order given",
    "score": "a step score (probability, entropy, ...)",
    "fraction": "the share of ranked source tokens a faithfulness metric removes or keeps "
    "(circuit_faithfulness: of the edges a circuit keeps)",
    "method": "ax.evaluate: the attribution method scored",
    "other": "ax.evaluate: the method another is compared with (agreement metrics)",
    "randomized": "ax.sanity_checks: the lowest layer randomized so far (top layer first)",
    "model": "ax.stack_models: one of the stacked models (checkpoints, seeds)",
}
#: Every non-dimension coordinate (and index level) a result can have, and what it means.
COORDS: dict[str, str] = {
    "target_id": "token id of each target",
    "target_token": "token string of each target",
    "source_id": "token id of each source",
    "source_token": "token string of each source",
    "side": "'source' (prompt/encoder) or 'target' (continuation/decoder) for each source",
    "position": "index level of `source` beside `side` when both sides of a translator are sources",
    "segment": "classifiers: 0 for the text, 1 for the second text of a pair, -1 for padding",
    "special": "classifiers: whether the source is a special token ([CLS], [SEP], <s>, ...)",
    "target_class": "classifiers: the class id attributed at each target",
    "target_label": "classifiers: the label name of that class",
    "predicted_class": "classifiers: the class the model predicts (per example, or per token)",
    "predicted_label": "classifiers: the label name of the predicted class",
    "predicted_probability": "classifiers: the probability of the predicted class",
    "contrast_class": "classifiers: the contrast class of each target (`contrast=`)",
    "contrast_label": "classifiers: the label name of the contrast class",
    "target_position": "question answering: the token position of the answer's start or end",
    "predicted_position": "question answering: the predicted answer's start or end position",
    "predicted_id": "question answering: the token at the predicted position; masked LMs: the "
    "predicted token",
    "predicted_token": "the string of `predicted_id`",
    "contrast_position": "question answering: the contrast span's start or end position",
    "answer": "question answering: the text of the attributed span",
    "predicted_answer": "question answering: the text of the predicted span",
    "query_id": "token id of each query",
    "query_token": "token string of each query",
    "contrast_id": "token id of the contrast token of each target",
    "contrast_token": "token string of the contrast token of each target",
    "component": "direct_logit_attribution: 'attention' for a head, 'mlp' for the MLP at head=-1",
    "completeness_gap": "integrated gradients: sum of attributions minus f(x) - f(baseline) "
    "(knowledge_neurons: per layer, the neurons' sum minus F(a) - F(0))",
    "stopped": "reagent: how many probes met the stopping rule (0: none within `max_steps`, and the "
    "scores are every probe's mean)",
    "sender_layer": "edge_attribution_patching: the sender's layer (-1: the input)",
    "sender_head": "edge_attribution_patching: the sender's head (-1: the input or an MLP)",
    "receiver_layer": "edge_attribution_patching: the receiver's layer (the logits: the layer "
    "count)",
    "receiver_input": "edge_attribution_patching: what the receiver reads ('q', 'k', 'v', 'mlp' "
    "or 'logits')",
    "receiver_head": "edge_attribution_patching: the receiver's head (-1: an MLP or the logits)",
    "edges": "edge_patching: how many edges each `circuit` names (circuit_faithfulness: each "
    "circuit's, on `fraction`)",
    "effect": "circuit_faithfulness: each circuit's score less the clean run's",
    "empty": "circuit_faithfulness: the empty circuit's (the corrupted run's) score less the "
    "clean run's",
    "cpr": "circuit_faithfulness: MIB's CPR, the area under the faithfulness curve",
    "cmd": "circuit_faithfulness: MIB's CMD, the area between the faithfulness curve and 1",
    "head_total": "head_attribution: each head's attribution summed over queries and keys",
    "attention_residual": "information_flow: the residual's edge into the stream after the "
    "attention (side by side blocks: into the block's output), on the route",
    "mlp": "information_flow: the MLP's edge into the block's output, on the route",
    "per_head": "information_flow: whether the values are each head's part of the edges (the "
    "residual's share apart) or the edges",
    "parallel": "information_flow: whether the blocks run attention and MLP side by side (their "
    "edges all enter the block's output)",
    "mlp_residual": "information_flow: the residual's edge into the block's output, on the route",
    "auc": "deletion/insertion: area under the curve over `fraction`",
    "aopc": "comprehensiveness/sufficiency: mean over `fraction` (ERASER's AOPC)",
    "tau": "loo_correlation: Kendall's tau-b between the attribution and the leave-one-out drops",
    "original": "faithfulness: the objective of the unperturbed input",
    "source_word": "merge_subwords: the word of each merged source",
    "target_word": "merge_subwords: the word of each merged target",
    "id": "attribute_dataset: the record's id, when the file gives ids",
    "label": "the true label of each example (a label name), when the data gives it",
}
#: Every attribute a result carries, and what it means.
ATTRS: dict[str, str] = {
    "method": "the attribution method (or, for a faithfulness curve, the method it scores)",
    "model": "the model's name or path",
    "model_type": "'decoder-only', 'encoder-decoder' or 'encoder-only'",
    "task": "'generation', 'sequence-classification', 'token-classification', "
    "'question-answering' or 'fill-mask'",
    "objective": "what is attributed at each target ('probability', 'logprob', 'logit', ...)",
    "options": "a JSON string of every option of the call, defaults included",
    "attrax_version": "the attrax version that computed it",
    "model_dtype": "the model's parameters' dtype ('float32', 'bfloat16', ...); results are "
    "float32",
    "subwords": "the tokenizer's sub-word scheme ('byte-level', 'sentencepiece', 'wordpiece' or "
    "'word-level'), read from its vocabulary: how merge_subwords finds words",
    "reductions": "the reductions applied, ';'-separated, e.g. 'l2_norm(hidden);normalize(source)'",
    "metric": "the faithfulness metric of a curve",
    "over": "ax.circuit_areas: the dims its effects were averaged over, ';'-separated",
    "score": "the step score a with_scores variable holds",
    "metrics": "ax.evaluate: the metrics computed",
    "reduce": "ax.evaluate: how the attributions became (example, target, source), as given",
    "top_k": "ax.evaluate: the k of topk_overlap",
    "methods": "ax.evaluate: a JSON string, each method's method, objective, options and "
    "reductions as its attribution recorded them",
    "logit_softcap": "the cap c of a model that soft-caps its logits (Gemma 2), whose logit before "
    "it direct logit attribution and ALTI-Logit decompose",
}

#: What fills a token string / a token id where a batch has no token (the string is defined
#: with the token conventions, below the model, whose words need it too).
MISSING_ID = -1


def union_labels(parts: Sequence[xr.DataArray | xr.Dataset], dim: str) -> list[Any]:
    """The labels of ``dim`` over ``parts`` (shards of one run) in the order one batch gives
    them: the parts' own order where they all agree (an answer's start, end); else positions
    sorted, and class labels by their class id (``target_class``), unknown ones as first seen."""
    listed = [p.indexes[dim].tolist() for p in parts]
    if all(values == listed[0] for values in listed):
        return listed[0]
    merged = list(dict.fromkeys(x for values in listed for x in values))
    if dim != "target" or all(isinstance(x, (int, np.integer)) for x in merged):
        return sorted(merged)
    ids: dict[Any, int] = {}
    for part in parts:
        if "target_class" not in part.coords:
            continue
        classes = part["target_class"]
        others = [d for d in classes.dims if d != "target"]
        best = classes.max(others) if others else classes
        for name, cls in zip(part.indexes["target"].tolist(), best.values.tolist(), strict=True):
            if cls >= 0:
                ids[name] = int(cls)
    if all(x in ids for x in merged):
        return sorted(merged, key=ids.__getitem__)
    return merged


def fill_value(dtype: np.dtype) -> Any:
    """The missing marker of a variable of ``dtype``: -1 for ids, "" for tokens, NaN for values."""
    if dtype.kind in "iu":
        return MISSING_ID
    if dtype.kind in "USO":
        return MISSING_TOKEN
    if dtype.kind == "b":
        return False
    return np.nan


def jsonable(value: Any) -> Any:
    """An option's value as it is recorded in ``attrs["options"]``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor | np.ndarray):
        # a few ids or positions (a token-id baseline, groups) as themselves; embeddings by kind
        small = value.size if isinstance(value, np.ndarray) else value.numel()
        integral = (
            value.dtype.kind in "iu"
            if isinstance(value, np.ndarray)
            else not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
        )
        if integral and small <= 64:
            return value.tolist()
        return "tensor" if isinstance(value, torch.Tensor) else "array"
    if isinstance(value, tuple) and any(isinstance(v, torch.Tensor) for v in value):
        return "tensor"
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (slice, range)):
        return repr(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if callable(value):
        return getattr(value, "__name__", type(value).__name__)
    return repr(value)


def run_attrs(
    model: Model, method: str, objective: str, options: Mapping[str, Any]
) -> dict[str, Any]:
    """The provenance attrs of a result (see :data:`ATTRS`)."""
    return {
        "method": method,
        "model": model.name,
        "model_type": model.model_type,
        "task": model.task,
        "objective": objective,
        "options": json.dumps({k: jsonable(v) for k, v in options.items()}, sort_keys=True),
        "attrax_version": __version__,
        "subwords": model.subwords,
        "model_dtype": str(model.dtype).removeprefix("torch."),
    }


def recorded_option(result: xr.DataArray, name: str) -> Any:
    """The option ``name`` a result's ``options`` attr records (None when it records none).

    >>> recorded_option(xr.DataArray(0, attrs={"options": '{"steps": 8}'}), "steps")
    8
    """
    try:
        return json.loads(result.attrs.get("options", "{}")).get(name)
    except (TypeError, ValueError, AttributeError):  # no JSON object: nothing recorded
        return None


# --- builders ------------------------------------------------------------------------------


def label(
    model: Model,
    batch: Batch,
    sides: Sequence[torch.Tensor | np.ndarray],
    *,
    method: str,
    objective: str,
    options: Mapping[str, Any],
    trailing: Sequence[str] = ("hidden",),
    target_coords: Mapping[str, torch.Tensor | np.ndarray] | None = None,
    trailing_coords: Mapping[str, Sequence[int]] | None = None,
) -> xr.DataArray:
    """Label per-example values ``[B, K, L, *trailing]`` (one array per source side).

    ``sides[0]`` covers the decoder-only sequence or the encoder input; ``sides[1]`` (optional)
    the decoder input of an encoder-decoder model. ``K`` follows each example's ``positions``.
    ``target_coords`` are extra ``[B, K]`` values along the target dim (e.g. completeness gaps);
    ``trailing_coords`` label trailing dims (e.g. which layers were kept).
    NaN marks padding and sources at or after the target position on the target side.
    """
    examples = batch.examples
    targets, row_of, coords = target_coordinates(model, batch)

    # assembled where the values are (the GPU, usually), then one copy to the host: on a long
    # sequence the [target, source, hidden] block is large and host-side passes dominate
    blocks = []  # one [B, T, L_side, *tail] block per side
    for side_index, side in enumerate(sides):
        values = torch.as_tensor(side)
        widths = [len(_side_ids(batch, b, side_index)) for b in range(len(examples))]
        rows = [[row_of[p] for p in e.positions] for e in examples]
        block = _place(values, rows, widths, len(targets))
        causal = batch.causal and not batch.encoder_decoder
        if side_index == 1 or (causal and batch.task != "sequence-classification"):
            # the target side: nothing is attributed to sources its target cannot see
            columns = torch.arange(block.shape[2], device=block.device)
            seen = torch.as_tensor(targets, device=block.device)
            if batch.task == "generation":
                seen = seen - 1  # target t is predicted from position t - 1
            future = columns[None, :] > seen[:, None]
            block = block.masked_fill(future.view(1, *future.shape, *(1,) * (block.ndim - 3)), nan)
        blocks.append(block)
    data = to_host(blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2))

    source_ids = np.full((len(examples), data.shape[2]), MISSING_ID, dtype=np.int64)
    offset = 0
    for side_index, block in enumerate(blocks):
        for b in range(len(examples)):
            ids = _side_ids(batch, b, side_index)
            source_ids[b, offset : offset + len(ids)] = ids
        offset += block.shape[2]
    tokens = model.token_strings
    coords["source_id"] = (("example", "source"), source_ids)
    coords["source_token"] = (("example", "source"), token_strings(source_ids, tokens))
    if batch.encoder_decoder and len(blocks) == 2:
        sides_level = ["source"] * blocks[0].shape[2] + ["target"] * blocks[1].shape[2]
        positions = [*range(blocks[0].shape[2]), *range(blocks[1].shape[2])]
        index = pd.MultiIndex.from_arrays([sides_level, positions], names=("side", "position"))
        coords.update(xr.Coordinates.from_pandas_multiindex(index, "source"))
    elif batch.task != "generation":
        coords["source"] = np.arange(data.shape[2])
        coords.update(_segments(batch, data.shape[2]))
    else:
        coords["source"] = np.arange(data.shape[2])
        coords["side"] = (("example", "source"), _sides(batch, data.shape[2]))
    for key, per_target in (target_coords or {}).items():
        dense = np.full((len(examples), len(targets)), np.nan)
        raw = to_host(per_target)
        for b, example in enumerate(examples):
            dense[b, [row_of[p] for p in example.positions]] = raw[b, : len(example.positions)]
        coords[key] = (("example", "target"), dense)
    coords.update(trailing_coords or {})
    dims = ["example", "target", "source", *trailing]
    attrs = run_attrs(model, method, objective, options)
    return _build(data, dims, coords, "attribution", attrs, batch.single)


def label_steps(
    model: Model,
    batch: Batch,
    values: torch.Tensor,
    names: Sequence[str],
    options: Mapping[str, Any],
) -> xr.DataArray:
    """Step scores ``[B, K, score]`` -> ``([example,] target, score)``, targets as :func:`label`."""
    targets, row_of, coords = target_coordinates(model, batch)
    data = _by_target(batch, to_host(values), row_of, len(targets))
    coords["score"] = list(names)
    attrs = run_attrs(model, "step_scores", "none", options)
    return _build(data, ["example", "target", "score"], coords, "step_scores", attrs, batch.single)


def label_edges(
    model: Model,
    batch: Batch,
    values: torch.Tensor,
    senders: Sequence[tuple[str, int, int]],
    receivers: Sequence[tuple[str, int, str, int]],
    options: Mapping[str, Any],
    method: str,
    objective: str,
) -> xr.DataArray:
    """Edge scores ``[B, K, U, R]`` -> ``([example,] target, sender, receiver)``, targets as
    :func:`label`; senders ``(name, layer, head)`` (-1: none), receivers ``(name, layer, input,
    head)``."""
    targets, row_of, coords = target_coordinates(model, batch)
    data = _by_target(batch, to_host(values), row_of, len(targets))
    coords["sender"] = np.asarray([s[0] for s in senders], dtype=object)
    coords["sender_layer"] = ("sender", np.asarray([s[1] for s in senders], dtype=np.int64))
    coords["sender_head"] = ("sender", np.asarray([s[2] for s in senders], dtype=np.int64))
    coords["receiver"] = np.asarray([r[0] for r in receivers], dtype=object)
    coords["receiver_layer"] = ("receiver", np.asarray([r[1] for r in receivers], dtype=np.int64))
    coords["receiver_input"] = ("receiver", np.asarray([r[2] for r in receivers], dtype=object))
    coords["receiver_head"] = ("receiver", np.asarray([r[3] for r in receivers], dtype=np.int64))
    attrs = run_attrs(model, method, objective, options)
    dims = ["example", "target", "sender", "receiver"]
    return _build(data, dims, coords, method, attrs, batch.single)


def label_circuits(
    model: Model,
    batch: Batch,
    values: torch.Tensor,
    edges: Sequence[int] | None,
    options: Mapping[str, Any],
    method: str,
    objective: str,
) -> xr.DataArray:
    """Effects ``[B, K]``, or ``[B, K, C]`` with each circuit's number of ``edges``, ->
    ``([example,] target[, circuit])``, targets as :func:`label`."""
    targets, row_of, coords = target_coordinates(model, batch)
    data = _by_target(batch, to_host(values), row_of, len(targets))
    dims = ["example", "target"]
    if edges is not None:
        dims.append("circuit")
        coords["circuit"] = np.arange(len(edges))
        coords["edges"] = ("circuit", np.asarray(edges, dtype=np.int64))
    attrs = run_attrs(model, method, objective, options)
    return _build(data, dims, coords, method, attrs, batch.single)


def label_circuit_curve(
    model: Model,
    batch: Batch,
    effects: torch.Tensor,
    empty: torch.Tensor,
    fractions: np.ndarray,
    edges: Sequence[int],
    options: Mapping[str, Any],
    method: str,
    objective: str,
) -> xr.DataArray:
    """Circuits' effects ``[B, K, F]`` and the empty circuit's ``[B, K]`` -> each target's
    faithfulness ``([example,] target, fraction)``, ``(effect - empty) / -empty``, with the
    effects, each circuit's ``edges`` and the curve's ``cpr`` and ``cmd`` (the trapezoid rule
    over ``fractions``), targets as :func:`label`."""
    targets, row_of, coords = target_coordinates(model, batch)
    kept = _by_target(batch, to_host(effects).astype(np.float64), row_of, len(targets))
    none = _by_target(batch, to_host(empty).astype(np.float64), row_of, len(targets))
    with np.errstate(divide="ignore", invalid="ignore"):
        data = (kept - none[..., None]) / -none[..., None]
    # no faithfulness where the corruption leaves the score as it was (0 / 0, or rounding / 0)
    data[np.broadcast_to(none[..., None] == 0, data.shape)] = np.nan
    width = np.diff(fractions)
    coords["fraction"] = ("fraction", fractions)
    coords["edges"] = ("fraction", np.asarray(edges, dtype=np.int64))
    coords["effect"] = (("example", "target", "fraction"), kept)
    coords["empty"] = (("example", "target"), none)
    coords["cpr"] = (("example", "target"), ((data[..., 1:] + data[..., :-1]) / 2 * width).sum(-1))
    gap = np.abs(1 - data)
    coords["cmd"] = (("example", "target"), ((gap[..., 1:] + gap[..., :-1]) / 2 * width).sum(-1))
    attrs = run_attrs(model, method, objective, options)
    return _build(data, ["example", "target", "fraction"], coords, method, attrs, batch.single)


def label_neurons(
    model: Model,
    batch: Batch,
    values: torch.Tensor,
    gaps: torch.Tensor,
    layers: Sequence[int],
    options: Mapping[str, Any],
    method: str,
    objective: str,
) -> xr.DataArray:
    """Neuron scores ``[B, K, layer, neuron]`` and each layer's completeness gap ``[B, K,
    layer]`` -> ``([example,] target, layer, neuron)`` with ``completeness_gap`` ``([example,]
    target, layer)``, targets as :func:`label`."""
    targets, row_of, coords = target_coordinates(model, batch)
    data = _by_target(batch, to_host(values), row_of, len(targets))
    gap = _by_target(batch, to_host(gaps), row_of, len(targets))
    coords["layer"] = np.asarray(layers, dtype=np.int64)
    coords["neuron"] = np.arange(data.shape[-1])
    coords["completeness_gap"] = (("example", "target", "layer"), gap)
    attrs = run_attrs(model, method, objective, options)
    dims = ["example", "target", "layer", "neuron"]
    return _build(data, dims, coords, method, attrs, batch.single)


def label_flow(
    model: Model,
    batch: Batch,
    flow: torch.Tensor,
    residual: torch.Tensor,
    mlp: torch.Tensor,
    mlp_residual: torch.Tensor,
    *,
    heads: bool,
    parallel: bool,
    options: Mapping[str, Any],
    method: str,
) -> xr.DataArray:
    """Route edges ``[B, T, layer, (head,) query, source]`` and the residual's, the MLP's and the
    MLP residual's weights ``[B, T, layer, query]``, already at the rows of the batch's targets
    (:func:`target_coordinates`) -> ``([example,] target, layer, [head,] query, source)`` with
    those three as coordinates."""
    _, _, coords = target_coordinates(model, batch)
    data = to_host(flow)  # placed by the method: the result is not copied again
    width = data.shape[-1]
    ids = np.full((len(batch.examples), width), MISSING_ID, dtype=np.int64)
    for b in range(len(batch.examples)):
        sequence = _side_ids(batch, b, 0)
        ids[b, : len(sequence)] = sequence
    tokens = token_strings(ids, model.token_strings)
    coords["layer"] = np.arange(data.shape[2])
    if heads:
        coords["head"] = np.arange(data.shape[3])
    # kept through a reduction over `head` (attrs are not): heads' parts lack the residual's
    coords["per_head"] = np.asarray(heads)
    coords["parallel"] = np.asarray(parallel)  # the attention's edges enter the block's output
    for name in ("query", "source"):
        coords[name] = np.arange(width)
        coords[f"{name}_id"] = (("example", name), ids)
        coords[f"{name}_token"] = (("example", name), tokens)
    along = ("example", "target", "layer", "query")
    for name, values in (
        ("attention_residual", residual), ("mlp", mlp), ("mlp_residual", mlp_residual)
    ):  # fmt: skip
        coords[name] = (along, to_host(values))
    dims = ["example", "target", "layer", *(["head"] if heads else []), "query", "source"]
    attrs = run_attrs(model, method, "none", options)
    return _build(data, dims, coords, method, attrs, batch.single)


def _by_target(batch: Batch, raw: np.ndarray, row_of: dict[int, int], count: int) -> np.ndarray:
    """Per-example values ``[B, K, ...]`` (each example's targets first) placed at the rows of
    the union of targets, ``[B, count, ...]``, NaN where an example has no such target."""
    data = np.full((len(batch.examples), count, *raw.shape[2:]), np.nan, dtype=raw.dtype)
    for b, example in enumerate(batch.examples):
        rows = [row_of[p] for p in example.positions]
        data[b, rows] = raw[b, : len(rows)]
    return data


def label_queries(
    model: Model,
    ids: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor,
    *,
    single: bool,
    method: str,
    options: Mapping[str, Any],
    trailing_coords: Mapping[str, Sequence[int]],
) -> xr.DataArray:
    """Encoder self-attention ``[B, Q, S, *trailing]`` -> ``([example,] query, source, ...)``.

    Queries and sources are the same padded encoder tokens; NaN where either is padding.
    """
    data = to_host(values).copy()
    real = mask.bool().cpu().numpy()
    data[~(real[:, :, None] & real[:, None, :])] = np.nan
    token_ids = np.where(real, ids.cpu().numpy(), MISSING_ID)
    tokens = token_strings(token_ids, model.token_strings)
    width = ids.shape[1]
    coords: dict[str, Any] = {
        "example": np.arange(len(ids)),
        "query": np.arange(width),
        "source": np.arange(width),
        "query_id": (("example", "query"), token_ids),
        "query_token": (("example", "query"), tokens),
        "source_id": (("example", "source"), token_ids),
        "source_token": (("example", "source"), tokens),
        **trailing_coords,
    }
    dims = ["example", "query", "source", *trailing_coords]
    attrs = run_attrs(model, method, "none", options)
    return _build(data, dims, coords, "attribution", attrs, single)


def label_curve(
    template: xr.DataArray,
    rows: Sequence[Sequence[int]],
    values: np.ndarray,
    original: np.ndarray,
    fractions: np.ndarray,
    *,
    metric: str,
    single: bool,
    attrs: Mapping[str, Any],
) -> xr.DataArray:
    """A faithfulness curve ``[B, K, F]`` -> ``([example,] target, fraction)`` with its summary.

    ``template`` is the scored attribution with an example dim; ``rows[b][k]`` is the row of
    problem target ``k`` in it. The summary coordinate is ``auc`` for deletion/insertion and
    ``aopc`` otherwise, beside ``original`` (the unperturbed objective).
    """
    n_examples, n_rows = template.sizes["example"], template.sizes["target"]
    data = np.full((n_examples, n_rows, len(fractions)), np.nan)
    base = np.full((n_examples, n_rows), np.nan)
    for b, example_rows in enumerate(rows):
        data[b, example_rows] = values[b, : len(example_rows)]
        base[b, example_rows] = original[b, : len(example_rows)]
    coords: dict[Hashable, Any] = {
        k: v for k, v in template.coords.items() if set(v.dims) <= {"example", "target"}
    }
    coords["fraction"] = ("fraction", fractions)
    if metric in ("deletion", "insertion"):
        area = (data[..., 1:] + data[..., :-1]) / 2 * np.diff(fractions)
        coords["auc"] = (("example", "target"), area.sum(-1))
    else:
        coords["aopc"] = (("example", "target"), data.mean(-1))
    coords["original"] = (("example", "target"), base)
    dims = ["example", "target", "fraction"]
    return _build(data, dims, coords, metric, {"metric": metric, **attrs}, single)


def label_loo(
    template: xr.DataArray,
    rows: Sequence[Sequence[int]],
    drops: np.ndarray,
    tau: np.ndarray,
    original: np.ndarray,
    *,
    single: bool,
    attrs: Mapping[str, Any],
) -> xr.DataArray:
    """Leave-one-out drops ``[B, K, S]`` -> ``([example,] target, source)`` labelled as the
    scored attribution ``template`` (with an example dim; ``rows[b][k]`` is the row of problem
    target ``k`` in it), with ``tau`` and ``original`` along ``([example,] target)``."""
    n_examples, n_rows = template.sizes["example"], template.sizes["target"]
    data = np.full((n_examples, n_rows, template.sizes["source"]), np.nan)
    taus = np.full((n_examples, n_rows), np.nan)
    base = np.full((n_examples, n_rows), np.nan)
    for b, example_rows in enumerate(rows):
        data[b, example_rows] = drops[b, : len(example_rows)]
        taus[b, example_rows] = tau[b, : len(example_rows)]
        base[b, example_rows] = original[b, : len(example_rows)]
    coords: dict[Hashable, Any] = dict(template.coords.items())
    coords["tau"] = (("example", "target"), taus)
    coords["original"] = (("example", "target"), base)
    dims = ["example", "target", "source"]
    return _build(data, dims, coords, "loo", {"metric": "loo_correlation", **attrs}, single)


def label_evaluation(
    flat: xr.DataArray,
    methods: Sequence[str],
    scores: Mapping[str, np.ndarray],
    pairwise: Mapping[str, np.ndarray],
    *,
    attributions: bool,
    labels: Sequence[Any],
    attrs: Mapping[str, Any],
) -> xr.Dataset:
    """An evaluation: per metric ``[M * N, T]`` scores -> ``(method, example, target)``, pairwise
    ``[M, M, N, T]`` agreement -> ``(method, other, example, target)``. ``flat`` holds every
    method's reduced attributions as one batch (method ``m``'s example ``e`` at ``m * N + e``)."""
    m = len(methods)
    n = flat.sizes["example"] // m
    first = flat.isel(example=slice(0, n))
    coords: dict[str, Any] = {
        "method": list(methods),
        "example": np.arange(n),
        "target": flat["target"].values,
    }
    for key, coord in first.coords.items():
        if key not in coords and set(coord.dims) <= {"example", "target"} and coord.dims:
            coords[key] = (coord.dims, coord.values)
    if any(label is not None for label in labels):
        coords["label"] = ("example", np.asarray([str(x) for x in labels]))
    grid = ("method", "example", "target")
    variables: dict[str, Any] = {
        name: (grid, values.reshape(m, n, *values.shape[1:])) for name, values in scores.items()
    }
    for name, values in pairwise.items():
        variables[name] = (("method", "other", "example", "target"), values)
    if pairwise:
        coords["other"] = list(methods)
    if attributions:
        coords["source"] = flat["source"].values
        # what each source is (its token, id, side): every method's batch tokenizes the same
        for key, coord in first.coords.items():
            sourced = "source" in coord.dims and set(coord.dims) <= {"example", "source"}
            if sourced and key not in coords and key not in first.indexes:
                coords[key] = (coord.dims, coord.values)
        values = flat.values.reshape(m, n, *flat.shape[1:])
        # what merge_subwords and reductions read from an attribution's own attrs
        kept = {k: first.attrs[k] for k in ("model", "model_type", "task", "subwords")
                if k in first.attrs}  # fmt: skip
        variables["attribution"] = ((*grid, "source"), values, kept)
    return xr.Dataset(variables, coords=coords, attrs=dict(attrs))


def label_sanity(
    original: xr.DataArray,
    randomized: Sequence[str],
    spearman: np.ndarray,
    magnitude: np.ndarray,
    random_logit: np.ndarray,
) -> xr.Dataset:
    """Sanity checks: ``[R, N, T]`` rank correlations per randomized layer, ``[N, T]`` for the
    random logit, on the targets of the ``original`` attribution."""
    first = original if "example" in original.dims else original.expand_dims(example=[0])
    coords: dict[Hashable, Any] = {
        "randomized": list(randomized),
        "example": np.arange(first.sizes["example"]),
    }
    for key, coord in first.coords.items():
        if key != "example" and set(coord.dims) <= {"example", "target"} and coord.dims:
            coords[key] = (coord.dims, np.broadcast_to(coord.values, coord.shape))
    grid = ("randomized", "example", "target")
    return xr.Dataset(
        {
            "spearman": (grid, spearman),
            "spearman_abs": (grid, magnitude),
            "random_logit": (("example", "target"), random_logit),
        },
        coords=coords,
        attrs={
            "method": str(original.attrs.get("method", "")),
            "model": str(original.attrs.get("model", "")),
        },
    )


def replace_dim(
    da: xr.DataArray,
    dim: str,
    values: np.ndarray,
    index: pd.Index,
    per_position: Mapping[str, np.ndarray],
) -> xr.DataArray:
    """``da`` with ``dim`` replaced by new positions ``index`` (e.g. words for tokens).

    ``values`` are laid out as ``[example?, *other dims, dim]``; ``per_position`` holds new
    coordinates along ``([example,] dim)``. Coordinates along the old ``dim`` are dropped, all
    others kept, and the dims keep their order.
    """
    batched = "example" in da.dims
    order = (["example"] if batched else []) + [d for d in da.dims if d not in ("example", dim)]
    coords: dict[Hashable, Any] = {k: v for k, v in da.coords.items() if dim not in v.dims}
    if isinstance(index, pd.MultiIndex):
        coords.update(xr.Coordinates.from_pandas_multiindex(index, dim))
    else:
        coords[dim] = index.to_numpy()
    along = ("example", dim) if batched else (dim,)
    coords.update({name: (along, value) for name, value in per_position.items()})
    out = xr.DataArray(values, dims=[*order, dim], coords=coords, name=da.name, attrs=da.attrs)
    return out.transpose(*da.dims)


def _build(
    data: np.ndarray,
    dims: list[str],
    coords: dict[Any, Any],  # names: the labellers' strs, or a template DataArray's Hashables
    name: str,
    attrs: Mapping[str, Any],
    single: bool,
) -> xr.DataArray:
    """The DataArray, without its ``example`` dim for a single input."""
    if single:
        # built without the example axis: cheaper than building it and selecting it away
        data, dims = data[0], dims[1:]
        coords = {key: _first_example(value) for key, value in coords.items() if key != "example"}
    else:
        coords.setdefault("example", np.arange(data.shape[0]))
    da = _direct(data, dims, coords, name, attrs)
    if da is None:
        da = xr.DataArray(data, dims=dims, coords=coords, name=name, attrs=dict(attrs))
    return da


def _direct(
    data: np.ndarray, dims: list[str], coords: dict[Any, Any], name: str, attrs: Mapping[str, Any]
) -> xr.DataArray | None:
    """The DataArray of :func:`_build`, assembled from its variables without the public
    constructor's checks and copies (a third of its time); None when a coordinate is not a
    plain ndarray whose dims and shape this function checks itself."""
    if not hasattr(xr.DataArray, "_construct_direct") or data.ndim != len(dims):
        return None
    sizes = dict(zip(dims, data.shape, strict=True))
    variables: dict[Hashable, xr.Variable] = {}
    indexes: dict[Hashable, Any] = {}
    for key, value in coords.items():
        if isinstance(value, np.ndarray):
            along, values = (key,), value
        elif isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], tuple):
            along, values = value
        else:
            return None
        if not isinstance(values, np.ndarray):
            return None
        if values.shape != tuple(sizes.get(d, -1) for d in along):
            return None
        if along == (key,):  # a dimension coordinate: indexed, as the constructor would
            index = PandasIndex(values, key, coord_dtype=values.dtype)
            indexes[key] = index
            variables.update(index.create_variables())
        else:
            variables[key] = xr.Variable(along, values)
    variable = xr.Variable(dims, data, attrs=dict(attrs))
    try:
        return xr.DataArray._construct_direct(variable, variables, name, indexes)
    except (TypeError, ValueError):  # a private xarray API: another version may differ
        return None


def target_coordinates(
    model: Model, batch: Batch
) -> tuple[list[int], dict[int, int], dict[str, Any]]:
    """The union of target positions, each position's row, and the target coordinates."""
    if batch.task != "generation":
        return _class_coords(model, batch)
    examples = batch.examples
    sequences = batch.sequences()
    targets = sorted({p for e in examples for p in e.positions})
    row_of = {p: i for i, p in enumerate(targets)}
    target_ids = np.full((len(examples), len(targets)), MISSING_ID, dtype=np.int64)
    contrast_ids = np.full_like(target_ids, MISSING_ID)
    for b, example in enumerate(examples):
        first = len(sequences[b]) - len(example.target_ids)
        for p in example.positions:
            target_ids[b, row_of[p]] = sequences[b][p]
            if example.contrast_ids is not None:
                contrast_ids[b, row_of[p]] = example.contrast_ids[p - first]
    tokens = model.token_strings
    coords: dict[str, Any] = {
        "target": np.asarray(targets, dtype=np.int64),
        "target_id": (("example", "target"), target_ids),
        "target_token": (("example", "target"), token_strings(target_ids, tokens)),
    }
    if examples[0].contrast_ids is not None:
        coords["contrast_id"] = (("example", "target"), contrast_ids)
        coords["contrast_token"] = (("example", "target"), token_strings(contrast_ids, tokens))
    return targets, row_of, coords


def _class_coords(model: Model, batch: Batch) -> tuple[list[int], dict[int, int], dict[str, Any]]:
    """A classifier's targets: classes (sequence classification; labelled by name, so that
    ``.sel(target="positive")`` works) or token positions (token classification), each with the
    class attributed, and the model's prediction."""
    if batch.task == "question-answering":
        return _answer_coords(model, batch)
    if batch.task == "fill-mask":
        return _mask_coords(model, batch)
    examples = batch.examples
    sequence = batch.task == "sequence-classification"
    targets = sorted({p for e in examples for p in e.positions})
    row_of = {p: i for i, p in enumerate(targets)}
    shape = (len(examples), len(targets))
    classes = np.full(shape, MISSING_ID, dtype=np.int64)
    contrast = np.full(shape, MISSING_ID, dtype=np.int64)
    predicted = np.full(shape, MISSING_ID, dtype=np.int64)
    probability = np.full(shape, np.nan)
    token_ids = np.full(shape, MISSING_ID, dtype=np.int64)
    for b, e in enumerate(examples):
        rows = [row_of[p] for p in e.positions]
        classes[b, rows] = e.target_ids
        if e.contrast_ids is not None:
            contrast[b, rows] = e.contrast_ids
        if not sequence:
            predicted[b, rows] = e.predicted or ()
            probability[b, rows] = e.predicted_probability or ()
            token_ids[b, rows] = [e.source_ids[p] for p in e.positions]
    names = np.vectorize(lambda c: model.labels.get(int(c), MISSING_TOKEN), otypes=[object])
    dims = ("example", "target")
    coords: dict[str, Any] = {
        "target_class": (dims, classes),
        "target_label": (dims, names(classes).astype(str)),
    }
    if sequence:
        coords["target"] = np.asarray([model.labels[c] for c in targets], dtype=str)
        first = np.asarray([e.predicted[0] if e.predicted else MISSING_ID for e in examples])
        chance = [e.predicted_probability[0] if e.predicted_probability else nan for e in examples]
        coords["predicted_class"] = (("example",), first)
        coords["predicted_label"] = (("example",), names(first).astype(str))
        coords["predicted_probability"] = (("example",), np.asarray(chance, dtype=np.float64))
    else:
        tokens = model.token_strings
        coords["target"] = np.asarray(targets, dtype=np.int64)
        coords["target_id"] = (dims, token_ids)
        coords["target_token"] = (dims, token_strings(token_ids, tokens))
        coords["predicted_class"] = (dims, predicted)
        coords["predicted_label"] = (dims, names(predicted).astype(str))
        coords["predicted_probability"] = (dims, probability)
    if examples[0].contrast_ids is not None:
        coords["contrast_class"] = (dims, contrast)
        coords["contrast_label"] = (dims, names(contrast).astype(str))
    return targets, row_of, coords


def _answer_coords(model: Model, batch: Batch) -> tuple[list[int], dict[int, int], dict[str, Any]]:
    """A question-answering model's targets, ``"start"`` and ``"end"``: the position and token of
    the answer's first and last token, the predicted ones with their probability, and the
    answers' texts. An example's spans are aligned with its ``positions`` (the slots: 0 the
    start, 1 the end)."""
    examples = batch.examples
    targets = sorted({p for e in examples for p in e.positions})
    row_of = {p: i for i, p in enumerate(targets)}
    shape = (len(examples), len(targets))
    dims = ("example", "target")
    tokens = model.token_strings
    coords: dict[str, Any] = {"target": np.asarray([model.labels[s] for s in targets], dtype=str)}

    def by_slot(e: Any, values: Sequence[Any] | None) -> dict[int, Any]:
        return {} if not values else dict(zip(e.positions, values, strict=True))

    def spans(name: str, picked: list[dict[int, Any]]) -> None:
        where = np.full(shape, MISSING_ID, dtype=np.int64)
        ids = np.full(shape, MISSING_ID, dtype=np.int64)
        for b, slots in enumerate(picked):
            for slot, q in slots.items():
                where[b, row_of[slot]] = q
                ids[b, row_of[slot]] = examples[b].source_ids[q]
        coords[f"{name}_position"] = (dims, where)
        coords[f"{name}_id"] = (dims, ids)
        coords[f"{name}_token"] = (dims, token_strings(ids, tokens))

    def answers(picked: list[dict[int, Any]]) -> np.ndarray:
        texts = [
            model.tokenizer.decode(e.source_ids[p[0] : p[1] + 1]).strip()
            if 0 in p and 1 in p
            else MISSING_TOKEN
            for e, p in zip(examples, picked, strict=True)
        ]
        return np.asarray(texts, dtype=object).astype(str)

    given = [by_slot(e, e.target_ids) for e in examples]
    spans("target", given)
    coords["answer"] = (("example",), answers(given))
    predicted = [by_slot(e, e.predicted) for e in examples]
    spans("predicted", predicted)
    chance = np.full(shape, nan)
    for b, e in enumerate(examples):
        for slot, value in by_slot(e, e.predicted_probability).items():
            chance[b, row_of[slot]] = value
    coords["predicted_probability"] = (dims, chance)
    coords["predicted_answer"] = (("example",), answers(predicted))
    if examples[0].contrast_ids is not None:
        spans("contrast", [by_slot(e, e.contrast_ids) for e in examples])
    return targets, row_of, coords


def _mask_coords(model: Model, batch: Batch) -> tuple[list[int], dict[int, int], dict[str, Any]]:
    """A masked LM's targets: positions (its masks), each with the token explained there, the
    token the model predicts there and its probability."""
    examples = batch.examples
    targets = sorted({p for e in examples for p in e.positions})
    row_of = {p: i for i, p in enumerate(targets)}
    shape = (len(examples), len(targets))
    dims = ("example", "target")
    tokens = model.token_strings
    coords: dict[str, Any] = {"target": np.asarray(targets, dtype=np.int64)}

    def column(name: str, of: Any, fill: Any, dtype: Any) -> None:
        values = np.full(shape, fill, dtype=dtype)
        for b, e in enumerate(examples):
            got = of(e)
            if got:
                values[b, [row_of[p] for p in e.positions]] = got
        coords[name] = (dims, values)

    column("target_id", lambda e: e.target_ids, MISSING_ID, np.int64)
    coords["target_token"] = (dims, token_strings(coords["target_id"][1], tokens))
    column("predicted_id", lambda e: e.predicted, MISSING_ID, np.int64)
    coords["predicted_token"] = (dims, token_strings(coords["predicted_id"][1], tokens))
    column("predicted_probability", lambda e: e.predicted_probability, nan, np.float64)
    if examples[0].contrast_ids is not None:
        column("contrast_id", lambda e: e.contrast_ids, MISSING_ID, np.int64)
        coords["contrast_token"] = (dims, token_strings(coords["contrast_id"][1], tokens))
    return targets, row_of, coords


def _segments(batch: Batch, width: int) -> dict[str, Any]:
    """A classifier's source coordinates: the segment of each token (0, or 1 for the second
    text of a pair; -1 for padding) and whether it is a special token."""
    segments = np.full((len(batch.examples), width), MISSING_ID, dtype=np.int64)
    special = np.zeros((len(batch.examples), width), dtype=bool)
    for b, e in enumerate(batch.examples):
        segments[b, : len(e.source_ids)] = e.segments or ()
        special[b, : len(e.source_ids)] = e.special or ()
    return {
        "segment": (("example", "source"), segments),
        "special": (("example", "source"), special),
    }


def _place(
    values: torch.Tensor, rows: list[list[int]], widths: list[int], n_targets: int
) -> torch.Tensor:
    """``values [B, K, L, *tail]`` (rows in each example's position order) -> ``[B, T, L, *tail]``
    on the union of target positions, NaN where an example has no such target or no such source.
    """
    batch, _, width = values.shape[:3]
    if all(r == list(range(n_targets)) for r in rows) and all(w == width for w in widths):
        return values[:, :n_targets]  # the common case: nothing to move, no padding
    block = values.new_full((batch, n_targets, *values.shape[2:]), nan)
    # one scatter for every (example, target): example b's k-th row goes to row rows[b][k]
    device = values.device

    def index(items: list[int]) -> torch.Tensor:
        return torch.as_tensor(items, dtype=torch.long, device=device)

    b_index = index([b for b, r in enumerate(rows) for _ in r])
    k_index = index([k for r in rows for k in range(len(r))])
    t_index = index([t for r in rows for t in r])
    block[b_index, t_index] = values[b_index, k_index]
    if any(w < width for w in widths):  # no source beyond an example's own length
        columns = torch.arange(width, device=device)
        beyond = columns[None, :] >= torch.as_tensor(widths, device=device)[:, None]
        block.masked_fill_(beyond.view(batch, 1, width, *[1] * (values.ndim - 3)), nan)
    return block


def _first_example(value: Any) -> Any:
    if isinstance(value, tuple) and value[0][0] == "example":
        return value[0][1:], value[1][0]
    return value


def _side_ids(batch: Batch, b: int, side_index: int) -> tuple[int, ...]:
    example = batch.examples[b]
    if batch.encoder_decoder and side_index == 0:
        return example.source_ids
    return example.sequence(batch.start_token)


def _sides(batch: Batch, width: int) -> np.ndarray:
    sides = np.full((len(batch.examples), width), MISSING_TOKEN, dtype=object)
    for b, example in enumerate(batch.examples):
        sides[b, : len(example.source_ids)] = "source"
        if not batch.encoder_decoder:
            end = len(example.source_ids) + len(example.target_ids)
            sides[b, len(example.source_ids) : end] = "target"
    return sides.astype(str)


def token_strings(ids: np.ndarray, tokens: Any) -> np.ndarray:
    """Token strings of ``ids``; :data:`MISSING_TOKEN` where an id is :data:`MISSING_ID`."""
    present = ids != MISSING_ID
    if not present.any():
        return np.full(ids.shape, MISSING_TOKEN)
    # each distinct id converted once: a batch repeats most of its tokens
    unique, inverse = np.unique(ids[present], return_inverse=True)
    names = np.asarray([MISSING_TOKEN, *tokens(unique.tolist())], dtype=str)
    where = np.zeros(ids.shape, dtype=np.int64)
    where[present] = inverse.reshape(-1) + 1
    return names[where]


# --- readers -------------------------------------------------------------------------------


def per_example(da: xr.DataArray, name: str, dims: Sequence[str]) -> np.ndarray:
    """Coordinate ``name`` as an array over ``dims`` (``example`` first), tiled along ``example``
    when the coordinate has none (a single input, or one coordinate shared by the batch)."""
    coord = da.coords[name]
    if "example" not in coord.dims:
        n = da.sizes.get("example", 1)
        coord = coord.expand_dims(example=n)
    return coord.transpose(*dims).values


def has_targets(da: xr.DataArray) -> np.ndarray:
    """``[example, target]`` bool: which targets each example of ``da`` (example dim first) has."""
    if "target_id" in da.coords:
        return per_example(da, "target_id", ("example", "target")) != MISSING_ID
    others = [d for d in da.dims if d not in ("example", "target")]
    return da.notnull().any(others).transpose("example", "target").values


def drop_padding(da: xr.DataArray) -> xr.DataArray:
    """A one-example ``(target, source)`` array without the rows and columns a batch padded
    (all NaN, with the missing token)."""
    keep: dict[str, np.ndarray] = {}
    for dim, other in (("target", "source"), ("source", "target")):
        for label in (f"{dim}_token", f"{dim}_word"):  # merge_subwords pads with "" words too
            if label in da.coords and da[label].dims == (dim,):
                empty = da.isnull().all(other).values & (da[label].values == MISSING_TOKEN)
                keep[dim] = keep.get(dim, np.ones(da.sizes[dim], bool)) & ~empty
    return da.isel({d: np.flatnonzero(k) for d, k in keep.items()})
