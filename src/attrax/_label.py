"""Tensors -> labelled ``DataArray``: positions as dimension coordinates, tokens as coordinates."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from math import nan
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr

from ._inputs import Batch
from ._model import Model

MISSING_TOKEN = ""
MISSING_ID = -1


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
    name: str = "attribution",
) -> xr.DataArray:
    """Label per-example values ``[B, K, L, *trailing]`` (one array per source side).

    ``sides[0]`` covers the decoder-only sequence or the encoder input; ``sides[1]`` (optional)
    the decoder input of an encoder-decoder model. ``K`` follows each example's ``positions``.
    ``target_coords`` are extra ``[B, K]`` values along the target dim (e.g. completeness gaps);
    ``trailing_coords`` label trailing dims (e.g. which layers were kept).
    NaN marks padding and sources at or after the target position on the target side.
    """
    examples = batch.examples
    sequences = batch.sequences()
    targets = sorted({p for e in examples for p in e.positions})
    row_of = {p: i for i, p in enumerate(targets)}
    tokens = model.tokenizer.convert_ids_to_tokens

    # assembled where the values are (the GPU, usually), then one copy to the host: on a long
    # sequence the [target, source, hidden] block is large and host-side passes dominate
    blocks = []  # one [B, T, L_side, *tail] block per side
    for side_index, side in enumerate(sides):
        values = torch.as_tensor(side)
        widths = [len(_side_ids(batch, b, side_index)) for b in range(len(examples))]
        rows = [[row_of[p] for p in e.positions] for e in examples]
        block = _place(values, rows, widths, len(targets))
        if side_index == 1 or not batch.encoder_decoder:  # the target side: no future sources
            columns = torch.arange(block.shape[2], device=block.device)
            future = columns[None, :] >= torch.as_tensor(targets, device=block.device)[:, None]
            block = block.masked_fill(future.view(1, *future.shape, *(1,) * (block.ndim - 3)), nan)
        blocks.append(block)
    data = _numpy(blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2))

    target_ids = np.full((len(examples), len(targets)), MISSING_ID, dtype=np.int64)
    for b, example in enumerate(examples):
        for p in example.positions:
            target_ids[b, row_of[p]] = sequences[b][p]
    source_ids = np.full((len(examples), data.shape[2]), MISSING_ID, dtype=np.int64)
    offset = 0
    for side_index, block in enumerate(blocks):
        for b in range(len(examples)):
            ids = _side_ids(batch, b, side_index)
            source_ids[b, offset : offset + len(ids)] = ids
        offset += block.shape[2]

    dims = ["example", "target", "source", *trailing]
    coords: dict[str, Any] = {
        "example": np.arange(len(examples)),
        "target": np.asarray(targets, dtype=np.int64),
        "target_id": (("example", "target"), target_ids),
        "target_token": (("example", "target"), token_strings(target_ids, tokens)),
        "source_id": (("example", "source"), source_ids),
        "source_token": (("example", "source"), token_strings(source_ids, tokens)),
    }
    if batch.encoder_decoder and len(blocks) == 2:
        sides_level = ["source"] * blocks[0].shape[2] + ["target"] * blocks[1].shape[2]
        positions = [*range(blocks[0].shape[2]), *range(blocks[1].shape[2])]
        index = pd.MultiIndex.from_arrays([sides_level, positions], names=("side", "position"))
        coords.update(xr.Coordinates.from_pandas_multiindex(index, "source"))
    else:
        coords["source"] = np.arange(data.shape[2])
        coords["side"] = (("example", "source"), _sides(batch, data.shape[2]))
    for key, values in (target_coords or {}).items():
        dense = np.full((len(examples), len(targets)), np.nan)
        raw = _numpy(values)
        for b, example in enumerate(examples):
            dense[b, [row_of[p] for p in example.positions]] = raw[b, : len(example.positions)]
        coords[key] = (("example", "target"), dense)
    coords.update(trailing_coords or {})
    if examples[0].contrast_ids is not None:
        contrast = np.full((len(examples), len(targets)), MISSING_ID, dtype=np.int64)
        for b, example in enumerate(examples):
            first = len(sequences[b]) - len(example.target_ids)
            for p in example.positions:
                contrast[b, row_of[p]] = example.contrast_ids[p - first]
        coords["contrast_id"] = (("example", "target"), contrast)
        coords["contrast_token"] = (("example", "target"), token_strings(contrast, tokens))

    if batch.single:
        # built without the example axis: cheaper than building it and selecting it away
        data, dims = data[0], dims[1:]
        coords = {key: _first_example(value) for key, value in coords.items() if key != "example"}
    attrs = run_attrs(model, method, objective, options)
    return xr.DataArray(data, dims=dims, coords=coords, name=name, attrs=attrs)


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
    for b, (r, length) in enumerate(zip(rows, widths, strict=True)):
        index = torch.as_tensor(r, device=values.device)
        block[b, index, :length] = values[b, : len(r), :length]
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
    out = np.full(ids.shape, MISSING_TOKEN, dtype=object)
    present = ids != MISSING_ID
    if present.any():
        out[present] = tokens([int(i) for i in ids[present]])
    return out.astype(str)


def full_precision(values: torch.Tensor) -> torch.Tensor:
    """Half-precision values as float32 (numpy has no bfloat16, netCDF no float16); others as is."""
    return values.float() if values.dtype in (torch.float16, torch.bfloat16) else values


def _numpy(values: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = full_precision(values.detach())
        if values.is_cuda and values.numel() * values.element_size() > _STAGE_BYTES:
            return _staged_to_host(values)
        return values.to("cpu").numpy()
    return np.asarray(values)


# A copy from the GPU into pageable memory goes through the driver's own small staging buffer,
# which on some machines moves ~1 GB/s (a [128, 1152, 256] saliency took 120 ms of a 280 ms
# call on an H200); through a pinned buffer of our own it runs at the bus's speed.
_STAGE_BYTES = 32 * 2**20
_stages: dict[torch.device, torch.Tensor] = {}


def _staged_to_host(values: torch.Tensor) -> np.ndarray:
    """Copy a large GPU tensor to a NumPy array through a reused pinned buffer, chunk by chunk."""
    flat = values.contiguous().view(-1).view(torch.uint8)
    stage = _stages.get(values.device)
    if stage is None:
        stage = torch.empty(_STAGE_BYTES, dtype=torch.uint8, pin_memory=values.is_cuda)
        _stages[values.device] = stage
    out = np.empty(values.shape, dtype=torch.empty(0, dtype=values.dtype).numpy().dtype)
    host = out.reshape(-1).view(np.uint8)
    for start in range(0, flat.numel(), _STAGE_BYTES):
        n = min(_STAGE_BYTES, flat.numel() - start)
        stage[:n].copy_(flat[start : start + n], non_blocking=True)
        if values.is_cuda:
            torch.cuda.current_stream(values.device).synchronize()
        host[start : start + n] = stage[:n].numpy()
    return out


def run_attrs(
    model: Model, method: str, objective: str, options: Mapping[str, Any]
) -> dict[str, Any]:
    from . import __version__

    return {
        "method": method,
        "model": model.name,
        "model_type": model.kind,
        "objective": objective,
        "options": json.dumps(dict(options), sort_keys=True, default=repr),
        "attrax_version": __version__,
    }
