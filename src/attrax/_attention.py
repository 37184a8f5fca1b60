"""Attention weights and attention rollout, labelled like every other attribution.

Both come from one forward pass with ``output_attentions=True``. Only eager attention returns its
weights (SDPA and flash kernels never materialise them), so a model loaded with another
implementation is switched to eager for the duration of the call and switched back afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from ._errors import OptionError
from ._inputs import (
    Tensors,
    Texts,
    _as_texts,
    _at,
    _check_length,
    _encode_source,
    _pad,
    prepare,
    to_tensors,
)
from ._label import MISSING_ID, full_precision, label, run_attrs, token_strings
from ._model import Model, ModelLike, capture_before, fast_activations, load_model

Selection = int | range | slice | Sequence[int] | None
KINDS = ("self", "cross", "encoder")

# config keys holding the number of layers / heads of each stack, in order of preference
_LAYER_KEYS = {
    "self": ("num_hidden_layers", "n_layer", "num_layers"),
    "cross": ("decoder_layers", "num_decoder_layers", "num_layers", "num_hidden_layers"),
    "encoder": ("encoder_layers", "num_layers", "num_hidden_layers"),
}
_HEAD_KEYS = {
    "self": ("num_attention_heads", "n_head", "num_heads"),
    "cross": ("decoder_attention_heads", "num_heads", "num_attention_heads"),
    "encoder": ("encoder_attention_heads", "num_heads", "num_attention_heads"),
}


def attention(
    model: ModelLike,
    inputs: Texts,
    targets: Texts | None = None,
    *,
    layers: Selection = None,
    heads: Selection = None,
    kind: str | None = None,
    attribute_target: bool = False,
    positions: int | Sequence[int] | None = None,
    max_new_tokens: int = 20,
) -> xr.DataArray:
    """Attention weights of the query that predicts each target, per layer and head.

    The row of target ``t`` is the attention of query position ``t - 1`` (whose output predicts
    token ``t``) over the keys; keys at or after ``t`` on the target side are NaN.

    Arguments:
        model, inputs, targets, positions, max_new_tokens: as :func:`attrax.saliency`.
        layers, heads: which layers / heads to keep: an int, a range, a slice or a list of ints
            (negative ints count from the end). The dims stay even for a single int.
        kind: ``None`` for the default of the model: ``"self"`` (decoder-only self-attention) or
            ``"cross"`` (encoder-decoder: decoder-over-encoder cross-attention). ``"encoder"``
            gives the encoder self-attention of an encoder-decoder model as dims
            ``([example,] query, source, layer, head)``; ``targets`` are not used then.
        attribute_target: with ``kind="cross"``, also the decoder self-attention over the decoder
            prefix, on the ``(side, position)`` source index of the gradient methods.

    Returns:
        DataArray ``([example,] target, source, layer, head)`` with ``layer``/``head``
        coordinates holding the (non-negative) indices that were kept.

    >>> import attrax as ax
    >>> da = ax.attention(ax.load_model(), "1 2 3 =", " 3 2 1", layers=-1)
    >>> da.dims
    ('target', 'source', 'layer', 'head')
    >>> ax.pipe(ax.attention, ax.mean("head"), ax.max("layer"))(ax.load_model(), "1 2 3 =").dims
    ('target', 'source')
    """
    model = load_model(model)  # a Model passes through as is
    kind = _kind(model, kind)
    _check_bool(attribute_target, "attribute_target")
    n_layers, n_heads = _sizes(model, kind)
    # validated before tokenizing or generating; checked again against the weights themselves
    if n_layers is not None:
        _indices(layers, n_layers, "layers", "layers")
    if n_heads is not None:
        _indices(heads, n_heads, "heads", "heads per layer")
    options: dict[str, Any] = {
        "kind": kind,
        "layers": _jsonable(layers),
        "heads": _jsonable(heads),
        "attribute_target": attribute_target,
    }
    if kind == "encoder":
        if attribute_target:
            raise OptionError("`attribute_target=True` does not apply to kind='encoder'")
        if positions is not None:
            raise OptionError("`positions` selects targets; kind='encoder' has no targets")
        return _encoder_attention(model, inputs, layers, heads, options)

    batch = prepare(model, inputs, targets, positions=positions, max_new_tokens=max_new_tokens)
    if targets is None:
        options["max_new_tokens"] = max_new_tokens
    tensors = to_tensors(batch, model)
    out = _forward(model, tensors)
    if kind == "self":
        maps = [out.attentions]
    else:
        maps = [out.cross_attentions]
        if attribute_target:
            maps.append(out.decoder_attentions)
    chosen_layers = _indices(layers, len(maps[0]), "layers", "layers")
    chosen_heads = _indices(heads, maps[0][0].shape[1], "heads", "heads per layer")
    sides = [_rows(m, chosen_layers, chosen_heads, tensors.index) for m in maps]
    return label(
        model,
        batch,
        sides,
        method="attention",
        objective="none",
        options=options,
        trailing=("layer", "head"),
        trailing_coords={"layer": chosen_layers, "head": chosen_heads},
    )


def rollout(
    model: ModelLike,
    inputs: Texts,
    targets: Texts | None = None,
    *,
    attribute_target: bool = False,
    positions: int | Sequence[int] | None = None,
    max_new_tokens: int = 20,
) -> xr.DataArray:
    """Attention rollout (Abnar & Zuidema 2020) from the query that predicts each target.

    Per layer ``A' = rownorm(0.5 * mean_heads(A) + 0.5 * I)`` (half for the residual stream);
    rollout is the product ``A'_L ... A'_1``. Encoder-decoder models roll the encoder out the same
    way (``R_enc``); each decoder layer then applies its self-attention ``A'`` to the decoder
    rows, and its cross-attention ``C`` as ``R_dec <- 0.5 * [C R_enc, 0] + 0.5 * R_dec``: half the
    decoder token itself (the residual), half the rolled-out encoder states it attends to.

    Arguments as :func:`attrax.saliency`. With ``attribute_target=True`` (encoder-decoder) the
    decoder prefix is on the ``(side, position)`` source index and each row sums to 1; without,
    only the encoder share is returned and rows sum to at most 1.

    Returns:
        DataArray ``([example,] target, source)``.

    >>> import attrax as ax
    >>> da = ax.rollout(ax.load_model(), "1 2 3 =", " 3 2 1")
    >>> da.dims
    ('target', 'source')
    >>> bool(abs(da.sum("source") - 1).max() < 1e-5)
    True
    """
    model = load_model(model)  # a Model passes through as is
    _check_bool(attribute_target, "attribute_target")
    batch = prepare(model, inputs, targets, positions=positions, max_new_tokens=max_new_tokens)
    options: dict[str, Any] = {"attribute_target": attribute_target, "residual": 0.5}
    if targets is None:
        options["max_new_tokens"] = max_new_tokens
    tensors = to_tensors(batch, model)
    out = _forward(model, tensors)
    rows = torch.arange(tensors.index.shape[0], device=tensors.index.device)[:, None]
    if not model.is_encoder_decoder:
        rolled = _rollout_stack(out.attentions, tensors.mask)
        sides = [rolled[rows, tensors.index]]
    else:
        decoder_mask = tensors.decoder_mask
        assert decoder_mask is not None
        encoder = _rollout_stack(out.encoder_attentions, tensors.mask)
        to_encoder, to_decoder = _rollout_decoder(
            out.decoder_attentions, out.cross_attentions, encoder, decoder_mask
        )
        sides = [to_encoder[rows, tensors.index]]
        if attribute_target:
            sides.append(to_decoder[rows, tensors.index])
    return label(
        model, batch, sides, method="rollout", objective="none", options=options, trailing=()
    )


def _rollout_stack(maps: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """``A'_L ... A'_1`` ``[B, T, T]`` over one stack's self-attention maps ``[B, H, T, T]``."""
    rolled = None
    for weights in maps:
        step = _with_residual(weights.float().mean(1), mask)
        rolled = step if rolled is None else step @ rolled
    assert rolled is not None
    return rolled


def _rollout_decoder(
    self_maps: Sequence[torch.Tensor],
    cross_maps: Sequence[torch.Tensor],
    encoder: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the decoder states over (encoder ``[B, T, S]``, decoder ``[B, T, T]``) tokens.

    Blocks of the joint ``(S + T) x (S + T)`` product whose encoder rows stay ``[R_enc, 0]``:
    the decoder never changes the encoder states, so only decoder rows need updating.
    """
    batch, length = mask.shape
    to_encoder = encoder.new_zeros((batch, length, encoder.shape[-1]))
    to_decoder = torch.eye(length, device=mask.device).expand(batch, length, length)
    real = mask.bool()[:, :, None]
    for self_weights, cross_weights in zip(self_maps, cross_maps, strict=True):
        step = _with_residual(self_weights.float().mean(1), mask)
        to_encoder, to_decoder = step @ to_encoder, step @ to_decoder
        # padded decoder queries are never read by real rows (causal mask, right padding)
        cross = torch.where(real, cross_weights.float().mean(1), 0.0)
        to_encoder = 0.5 * (cross @ encoder) + 0.5 * to_encoder
        to_decoder = 0.5 * to_decoder
    return to_encoder, to_decoder


def _with_residual(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``rownorm(0.5 * A + 0.5 * I)``, identity on padded query rows.

    Real rows give padded keys zero weight, but ``0 * NaN`` is NaN: a padded row must not hold
    anything a real row could multiply into the product.
    """
    eye = torch.eye(weights.shape[-1], dtype=weights.dtype, device=weights.device)
    mixed = 0.5 * weights + 0.5 * eye
    mixed = mixed / mixed.sum(-1, keepdim=True)
    return torch.where(mask.bool()[:, :, None], mixed, eye)


def _kind(model: Model, kind: str | None) -> str:
    if kind is None:
        return "cross" if model.is_encoder_decoder else "self"
    if kind not in KINDS:
        raise OptionError(f"`kind` must be None or one of {KINDS}, got {kind!r}")
    if model.is_encoder_decoder and kind == "self":
        raise OptionError(
            "`kind='self'` is for decoder-only models; for the decoder self-attention of an "
            "encoder-decoder model use kind='cross' with attribute_target=True"
        )
    if not model.is_encoder_decoder and kind != "self":
        raise OptionError(f"`kind={kind!r}` needs an encoder-decoder model; {model.name} has none")
    return kind


def _sizes(model: Model, kind: str) -> tuple[int | None, int | None]:
    config = model.hf.config
    found = []
    for keys in (_LAYER_KEYS[kind], _HEAD_KEYS[kind]):
        values = [getattr(config, key, None) for key in keys]
        found.append(next((v for v in values if isinstance(v, int) and v > 0), None))
    return found[0], found[1]


def _indices(value: Selection, n: int, name: str, what: str) -> list[int]:
    """Non-negative indices into ``n`` items from an int, range, slice, list or None (all)."""
    valid = f"the model has {n} {what}: valid values are 0..{n - 1} or -{n}..-1"
    if value is None:
        return list(range(n))
    if isinstance(value, slice):
        chosen = list(range(n))[value]
        if not chosen:
            raise OptionError(f"`{name}` {value!r} selects nothing; {valid}")
        return chosen
    items = [value] if isinstance(value, int) else value
    if isinstance(value, (str, bytes)) or not isinstance(items, (Sequence, range)):
        raise OptionError(
            f"`{name}` must be an int, a range, a slice or a list of ints, got {value!r}"
        )
    chosen = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
            raise OptionError(f"`{name}` must hold ints, got {item!r}")
        if not -n <= item < n:
            raise OptionError(f"`{name}` contains {item}, out of range; {valid}")
        chosen.append(int(item) % n)
    if not chosen:
        raise OptionError(f"`{name}` is empty; {valid}")
    if len(set(chosen)) != len(chosen):
        raise OptionError(f"`{name}` selects the same index twice: {value!r}")
    return chosen


def _jsonable(value: Selection) -> Any:
    if isinstance(value, (slice, range)):
        return repr(value)
    return value if value is None or isinstance(value, int) else [int(v) for v in value]


def _check_bool(value: object, name: str) -> None:
    if not isinstance(value, bool):
        raise OptionError(f"`{name}` must be a bool, got {value!r}")


@torch.no_grad()
def _forward(model: Model, t: Tensors) -> Any:
    """One teacher-forced forward returning attention maps; the head computes no logits."""
    with (
        model.attention_as("eager", required=True),
        capture_before(model._head, t.index, []),
        fast_activations(model._activations),
    ):
        if model.is_encoder_decoder:
            return model.hf(
                input_ids=t.ids,
                attention_mask=t.mask,
                decoder_input_ids=t.decoder_ids,
                decoder_attention_mask=t.decoder_mask,
                output_attentions=True,
                use_cache=False,
            )
        positions = torch.arange(t.ids.shape[-1], device=t.ids.device)
        return model.hf(
            input_ids=t.ids,
            attention_mask=t.mask,
            position_ids=positions.expand(t.mask.shape),
            output_attentions=True,
            use_cache=False,
        )


def _rows(
    maps: Sequence[torch.Tensor], layers: list[int], heads: list[int], index: torch.Tensor
) -> torch.Tensor:
    """Query rows ``index[b, k]`` of the chosen maps: ``[B, K, keys, layer, head]``."""
    rows = torch.arange(index.shape[0], device=index.device)[:, None]
    picked = [maps[layer][:, heads].permute(0, 2, 3, 1)[rows, index] for layer in layers]
    return full_precision(torch.stack(picked, dim=-2))


def _encoder_attention(
    model: Model,
    inputs: Texts,
    layers: Selection,
    heads: Selection,
    options: dict[str, Any],
) -> xr.DataArray:
    """Encoder self-attention as ``([example,] query, source, layer, head)``."""
    texts, single = _as_texts(inputs, "inputs")
    sources = [_encode_source(model.tokenizer, text, True) for text in texts]
    for i, ids in enumerate(sources):
        _check_length(model, ids, (), _at(i, single))
    ids, mask = _pad(sources, model.pad_token_id or 0)
    with torch.no_grad(), model.attention_as("eager", required=True):
        out = model.hf.get_encoder()(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            output_attentions=True,
        )
    maps = out.attentions
    chosen_layers = _indices(layers, len(maps), "layers", "layers")
    chosen_heads = _indices(heads, maps[0].shape[1], "heads", "heads per layer")
    values = torch.stack([maps[layer][:, chosen_heads] for layer in chosen_layers], dim=-1)
    # [B, Q, S, layer, head]
    data = full_precision(values).permute(0, 2, 3, 4, 1).cpu().numpy().copy()
    real = mask.bool().numpy()
    data[~(real[:, :, None] & real[:, None, :])] = np.nan
    token_ids = np.where(real, ids.numpy(), MISSING_ID)
    tokens = token_strings(token_ids, model.tokenizer.convert_ids_to_tokens)
    width = ids.shape[1]
    da = xr.DataArray(
        data,
        dims=("example", "query", "source", "layer", "head"),
        coords={
            "example": np.arange(len(sources)),
            "query": np.arange(width),
            "source": np.arange(width),
            "layer": chosen_layers,
            "head": chosen_heads,
            "query_id": (("example", "query"), token_ids),
            "query_token": (("example", "query"), tokens),
            "source_id": (("example", "source"), token_ids),
            "source_token": (("example", "source"), tokens),
        },
        name="attribution",
        attrs=run_attrs(model, "attention", "none", options),
    )
    return da.isel(example=0, drop=True) if single else da
