"""Attention weights and attention rollout, labelled like every other attribution.

Both come from one forward pass that hands each layer's weights over as the layer runs
(:meth:`Model.stream_attention`): attention keeps only the rows of the queries that predict the
attributed targets (``[B, heads, K, L]`` per layer) and rollout multiplies each layer into one
``[B, L, L]`` product, so a long input never holds every layer's ``[heads, L, L]`` maps at once.
Only eager attention returns its weights (SDPA and flash kernels never materialise them), so a
model loaded with another implementation is switched to eager for the duration of the call and
switched back afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from . import _arch
from ._errors import OptionError
from ._inputs import encode_sources, to_tensors
from ._memory import at_least_float32, full_precision
from ._model import Model, refuse_no_query_row
from ._protocol import Call, Family
from ._schema import label_queries

Selection = int | range | slice | Sequence[int] | str | None  # str: "all"
MAPS = ("self", "cross", "encoder")


_ONE_FORWARD = "attention weights come from one forward pass"
#: Attention methods: weights read from one forward, so no objective and no memory bounds.
ATTENTION = Family(
    name="attention",
    takes=("positions", "attribute_target", "max_new_tokens"),
    refuses={
        "objective": f"{_ONE_FORWARD}, not from an objective",
        "contrast": f"{_ONE_FORWARD}, not from an objective",
        "chunk_size": f"{_ONE_FORWARD}: there is no backward to chunk",
        "batch_size": f"{_ONE_FORWARD}: there are no points to batch",
        "max_memory": f"{_ONE_FORWARD}, keeping only the attributed rows of each layer: "
        "there are no sizes to plan",
    },
)


def check_selection(value: object, name: str) -> None:
    """Layers/heads: an int, a range, a slice, a list of ints, None or ``"all"`` (every one, as
    the gradient methods' ``layers="all"``; checked again against the model's sizes)."""
    value = _listed(value, name)
    if value is None or value == "all" or isinstance(value, (slice, range)):
        return
    items = [value] if isinstance(value, (int, np.integer)) else value  # np.argmax's too
    if isinstance(value, (str, bytes)) or not isinstance(items, Sequence):
        raise OptionError(
            f"`{name}` must be an int, a range, a slice or a list of ints, got {value!r}"
        )


def _listed(value: object, name: str) -> Any:
    """A NumPy array of indices (a result's coordinate values) as an int or a list of them."""
    if not isinstance(value, np.ndarray):
        return value
    if value.ndim > 1:
        raise OptionError(f"`{name}` must be an int or a list of ints, got a {value.ndim}-D array")
    return value.tolist()


def check_maps_name(value: object, name: str) -> None:
    if value is not None and value not in MAPS:
        raise OptionError(f"`{name}` must be None or one of {MAPS}, got {value!r}")


@ATTENTION.method(layers=check_selection, heads=check_selection, maps=check_maps_name)
def attention(
    call: Call, *, layers: Selection = None, heads: Selection = None, maps: str | None = None
) -> xr.DataArray:
    """Attention weights of the query that predicts each target, per layer and head.

    The row of target ``t`` is the attention of query position ``t - 1`` (whose output predicts
    token ``t``) over the keys; keys at or after ``t`` on the target side are NaN.

    Arguments:
        model, inputs, targets, positions, max_new_tokens: as :func:`attrax.saliency`.
        layers, heads: which layers / heads to keep: an int, a range, a slice or a list of ints
            (negative ints count from the end). The dims stay even for a single int.
        maps: which attention maps: ``None`` for the model's default, ``"self"`` (decoder-only
            self-attention) or ``"cross"`` (encoder-decoder: decoder-over-encoder
            cross-attention). ``"encoder"`` gives the encoder self-attention of an
            encoder-decoder model as dims ``([example,] query, source, layer, head)``;
            ``targets`` are not used then.
        attribute_target: with ``maps="cross"``, also the decoder self-attention over the
            decoder prefix, on the ``(side, position)`` source index of the gradient methods.

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
    model = call.model
    refuse_no_query_row(model, "attention")
    maps = resolve_maps(model, maps)
    attribute_target = call.options["attribute_target"]
    stack = "cross" if maps == "cross" else maps
    n_layers, n_heads = _arch.layers(model.hf.config, stack), _arch.heads(model.hf.config, stack)
    # validated before tokenizing or generating; checked again against the weights themselves
    if n_layers is not None:
        selection_indices(layers, n_layers, "layers", "layers")
    if n_heads is not None:
        selection_indices(heads, n_heads, "heads", "heads per layer")
    if maps == "encoder":
        if attribute_target:
            raise OptionError("`attribute_target=True` does not apply to maps='encoder'")
        if call.options["positions"] is not None:
            raise OptionError("`positions` selects targets; maps='encoder' has no targets")
        return _encoder_attention(call, layers, heads)

    tensors = to_tensors(call.batch, model)
    wanted = ["self"] if maps == "self" else ["cross", "decoder"][: 1 + attribute_target]
    rows = torch.arange(tensors.index.shape[0], device=tensors.index.device)[:, None]
    kept: dict[str, list[torch.Tensor]] = {stack: [] for stack in wanted}

    def keep(stack: str, weights: torch.Tensor) -> None:
        if stack in kept:  # the attributed queries only: [B, K, keys, heads]
            kept[stack].append(full_precision(weights.permute(0, 2, 3, 1)[rows, tensors.index]))

    model.stream_attention(tensors, keep)
    chosen_layers = selection_indices(layers, len(kept[wanted[0]]), "layers", "layers")
    chosen_heads = selection_indices(
        heads, kept[wanted[0]][0].shape[-1], "heads", "heads per layer"
    )
    sides = [
        torch.stack([kept[stack][layer][..., chosen_heads] for layer in chosen_layers], dim=-2)
        for stack in wanted
    ]
    return call.label(
        sides,
        trailing=("layer", "head"),
        trailing_coords={"layer": chosen_layers, "head": chosen_heads},
    )


@ATTENTION.method()
def rollout(call: Call) -> xr.DataArray:
    """Attention rollout (Abnar & Zuidema 2020) from the query that predicts each target.

    Per layer ``A' = rownorm(0.5 * mean_heads(A) + 0.5 * I)`` (half for the residual stream);
    rollout is the product ``A'_L ... A'_1``. Encoder-decoder models roll the encoder out the same
    way (``R_enc``); each decoder layer then applies its self-attention ``A'`` to the decoder
    rows, and its cross-attention ``C`` as ``R_dec <- 0.5 * [C R_enc, 0] + 0.5 * R_dec``: half the
    decoder token itself (the residual), half the rolled-out encoder states it attends to.

    Arguments:
        model, inputs, targets, positions, max_new_tokens: as :func:`attrax.saliency`; no other
            option applies (no objective, no sizes: the weights come from one forward).
        attribute_target: encoder-decoder only: also the decoder prefix, on the
            ``(side, position)`` source index, and each row sums to 1; without, only the
            encoder share is returned and rows sum to at most 1.

    Returns:
        DataArray ``([example,] target, source)``.

    >>> import attrax as ax
    >>> da = ax.rollout(ax.load_model(), "1 2 3 =", " 3 2 1")
    >>> da.dims
    ('target', 'source')
    >>> bool(abs(da.sum("source") - 1).max() < 1e-5)
    True
    """
    model = call.model
    refuse_no_query_row(model, "rollout")
    tensors = to_tensors(call.batch, model)
    rolled = _Rollout(tensors.mask, tensors.decoder_mask)
    model.stream_attention(tensors, rolled)
    rows = torch.arange(tensors.index.shape[0], device=tensors.index.device)[:, None]
    if not model.is_encoder_decoder:
        assert rolled.encoder is not None
        sides = [rolled.encoder[rows, tensors.index]]
    else:
        assert rolled.to_encoder is not None and rolled.to_decoder is not None
        sides = [rolled.to_encoder[rows, tensors.index]]
        if call.options["attribute_target"]:
            sides.append(rolled.to_decoder[rows, tensors.index])
    return call.label(sides, trailing=())


class _Rollout:
    """Rollout multiplied in layer by layer as the maps stream past (``on_map``).

    The (encoder or decoder-only) stack: ``R <- A' R`` with ``A' = rownorm(0.5 * mean_heads(A) +
    0.5 * I)``. An encoder-decoder's decoder rows over (encoder ``[B, T, S]``, decoder
    ``[B, T, T]``) tokens are blocks of the joint ``(S + T) x (S + T)`` product whose encoder rows
    stay ``[R_enc, 0]``: the decoder never changes the encoder states. Its self-attention applies
    ``A'`` to both blocks; its cross-attention ``C`` gives ``0.5 * [C R_enc, 0] + 0.5 * R_dec``.
    """

    def __init__(self, mask: torch.Tensor, decoder_mask: torch.Tensor | None) -> None:
        self.mask, self.decoder_mask = mask, decoder_mask
        self.encoder: torch.Tensor | None = None
        self.to_encoder: torch.Tensor | None = None
        self.to_decoder: torch.Tensor | None = None

    def __call__(self, stack: str, weights: torch.Tensor) -> None:
        if stack in ("self", "encoder"):
            step = _with_residual(weights.to(at_least_float32(weights.dtype)).mean(1), self.mask)
            self.encoder = step if self.encoder is None else step @ self.encoder
            return
        mask = self.decoder_mask
        assert mask is not None and self.encoder is not None
        if self.to_encoder is None or self.to_decoder is None:
            batch, length = mask.shape
            self.to_encoder = self.encoder.new_zeros((batch, length, self.encoder.shape[-1]))
            self.to_decoder = torch.eye(
                length, device=mask.device, dtype=self.encoder.dtype
            ).expand(batch, length, length)
        if stack == "decoder":
            step = _with_residual(weights.to(at_least_float32(weights.dtype)).mean(1), mask)
            self.to_encoder, self.to_decoder = step @ self.to_encoder, step @ self.to_decoder
        else:
            # padded decoder queries are never read by real rows (causal mask, right padding)
            cross = torch.where(
                mask.bool()[:, :, None], weights.to(at_least_float32(weights.dtype)).mean(1), 0.0
            )
            self.to_encoder = 0.5 * (cross @ self.encoder) + 0.5 * self.to_encoder
            self.to_decoder = 0.5 * self.to_decoder


def _with_residual(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``rownorm(0.5 * A + 0.5 * I)``, identity on padded query rows.

    Real rows give padded keys zero weight, but ``0 * NaN`` is NaN: a padded row must not hold
    anything a real row could multiply into the product.
    """
    eye = torch.eye(weights.shape[-1], dtype=weights.dtype, device=weights.device)
    mixed = 0.5 * weights + 0.5 * eye
    mixed = mixed / mixed.sum(-1, keepdim=True)
    return torch.where(mask.bool()[:, :, None], mixed, eye)


def resolve_maps(model: Model, maps: str | None) -> str:
    if maps is None:
        return "cross" if model.is_encoder_decoder else "self"
    if model.is_encoder_decoder and maps == "self":
        raise OptionError(
            "`maps='self'` is for decoder-only models; for the decoder self-attention of an "
            "encoder-decoder model use maps='cross' with attribute_target=True"
        )
    if not model.is_encoder_decoder and maps != "self":
        raise OptionError(f"`maps={maps!r}` needs an encoder-decoder model; {model.name} has none")
    return maps


def selection_indices(value: Selection, n: int, name: str, what: str) -> list[int]:
    """Non-negative indices into ``n`` items from an int, range, slice, list or None (all)."""
    valid = f"the model has {n} {what}: valid values are 0..{n - 1} or -{n}..-1"
    value = _listed(value, name)
    if value is None or value == "all":
        return list(range(n))
    if isinstance(value, slice):
        chosen = list(range(n))[value]
        if not chosen:
            raise OptionError(f"`{name}` {value!r} selects nothing; {valid}")
        return chosen
    items = [value] if isinstance(value, (int, np.integer)) else value
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


def _encoder_attention(call: Call, layers: Selection, heads: Selection) -> xr.DataArray:
    """Encoder self-attention as ``([example,] query, source, layer, head)``."""
    model = call.model
    ids, mask, single = encode_sources(model, call.inputs)
    maps = model.encoder_attention_maps(ids, mask)
    chosen_layers = selection_indices(layers, len(maps), "layers", "layers")
    chosen_heads = selection_indices(heads, maps[0].shape[1], "heads", "heads per layer")
    # [B, H, Q, S] per layer -> [B, Q, S, layer, head]
    values = torch.stack([maps[layer][:, chosen_heads] for layer in chosen_layers], dim=-1)
    return label_queries(
        model,
        ids,
        mask,
        full_precision(values).permute(0, 2, 3, 4, 1),
        single=single,
        method=call.method,
        options=call.options,
        trailing_coords={"layer": chosen_layers, "head": chosen_heads},
    )
