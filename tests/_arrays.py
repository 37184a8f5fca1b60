"""Synthetic attrax-like arrays that follow docs/data-model.md, for I/O and viz tests.

They do not come from the attribution engine, only from the data-model contract: dims
``example, target, source, hidden``, token/id coords, NaN for the future and for padding.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import xarray as xr

# Byte-level BPE (Ġ, Ċ), SentencePiece (▁), CJK, emoji (incl. a ZWJ sequence) and strings that
# must be HTML-escaped or must not be read as rich markup.
VOCAB = (
    "<s>",
    "Ġcafé",
    "▁Straße",
    "日本",
    "🙂",
    "Ġ<b>&amp;",
    "\"quote'",
    "[bold]x",
    "Ġthe",
    "▁is",
    "語",
    "👩‍🚀",
    "Ċ",
)


def _attrs(method: str, model_type: str) -> dict[str, str | int | float]:
    return {
        "method": method,
        "model": "synthetic/tiny",
        "objective": "logprob",
        "options": json.dumps({"n_steps": 8, "baseline": "zeros"}),
        "attrax_version": "0.1.0",
        "model_type": model_type,
    }


def _tokens(n: int, offset: int = 0) -> list[str]:
    return [VOCAB[(offset + i) % len(VOCAB)] for i in range(n)]


def _values(rng: np.random.Generator, shape: tuple[int, ...], signed: bool) -> np.ndarray:
    values = rng.standard_normal(shape) if signed else rng.random(shape)
    return values.astype(np.float32)


def single(
    length: int = 8, prompt: int = 3, *, signed: bool = True, seed: int = 0, offset: int = 0
) -> xr.DataArray:
    """Decoder-only, one text: ``(target, source)``, NaN at ``source >= target``."""
    rng = np.random.default_rng(seed)
    tokens = _tokens(length, offset)
    ids = np.arange(length, dtype=np.int64) + 100 * (offset + 1)
    target = np.arange(prompt, length)
    source = np.arange(length)
    values = _values(rng, (len(target), length), signed)
    values[source[None, :] >= target[:, None]] = np.nan
    return xr.DataArray(
        values,
        dims=("target", "source"),
        coords={
            "target": target,
            "source": source,
            "target_token": ("target", np.array(tokens[prompt:])),
            "target_id": ("target", ids[prompt:]),
            "source_token": ("source", np.array(tokens)),
            "source_id": ("source", ids),
            "side": ("source", np.array(["source"] * prompt + ["target"] * (length - prompt))),
        },
        attrs=_attrs("saliency" if signed else "attention", "decoder-only"),
        name="attribution",
    )


def single_hidden(length: int = 6, prompt: int = 2, hidden: int = 5, seed: int = 1) -> xr.DataArray:
    """Decoder-only, one text, per-embedding-dim: ``(target, source, hidden)``."""
    base = single(length, prompt, seed=seed)
    rng = np.random.default_rng(seed)
    values = _values(rng, (*base.shape, hidden), signed=True)
    values[np.isnan(base.values)] = np.nan
    return xr.DataArray(
        values, dims=(*base.dims, "hidden"), coords=base.coords, attrs=base.attrs, name=None
    )


def batch(lengths: tuple[int, ...] = (5, 7, 4), prompt: int = 2, seed: int = 2) -> xr.DataArray:
    """Decoder-only batch: ``(example, target, source)``, NaN-padded, 2-D token coords.

    Targets are the union of positions ``prompt..max(lengths)-1``; an example shorter than
    the longest has NaN rows/columns, ``""`` tokens and ``-1`` ids where it has no token.
    """
    rng = np.random.default_rng(seed)
    n, width = len(lengths), max(lengths)
    target = np.arange(prompt, width)
    source = np.arange(width)
    values = np.full((n, len(target), width), np.nan, dtype=np.float32)
    src_tok = np.full((n, width), "", dtype=object)
    src_id = np.full((n, width), -1, dtype=np.int64)
    for e, length in enumerate(lengths):
        tokens = _tokens(length, offset=e)
        src_tok[e, :length] = tokens
        src_id[e, :length] = np.arange(length) + 100 * (e + 1)
        block = _values(rng, (length - prompt, length), signed=True)
        t = target[: length - prompt]
        block[source[None, :length] >= t[:, None]] = np.nan
        values[e, : length - prompt, :length] = block
    return xr.DataArray(
        values,
        dims=("example", "target", "source"),
        coords={
            "example": np.arange(n),
            "target": target,
            "source": source,
            "target_token": (("example", "target"), src_tok[:, prompt:]),
            "target_id": (("example", "target"), src_id[:, prompt:]),
            "source_token": (("example", "source"), src_tok),
            "source_id": (("example", "source"), src_id),
        },
        attrs=_attrs("integrated_gradients", "decoder-only"),
        name="attribution",
    )


def encoder_decoder(n_source: int = 4, n_target: int = 4, seed: int = 3) -> xr.DataArray:
    """Encoder-decoder with ``attribute_target=True``: ``source`` is a (side, position) MultiIndex.

    Targets are decoder positions ``1..n_target-1`` (0 is the decoder start token).
    """
    rng = np.random.default_rng(seed)
    side = ["source"] * n_source + ["target"] * n_target
    position = [*range(n_source), *range(n_target)]
    index = pd.MultiIndex.from_arrays([side, position], names=["side", "position"])
    target = np.arange(1, n_target)
    values = _values(rng, (len(target), len(side)), signed=True)
    future = (np.array(side) == "target")[None, :] & (
        np.array(position)[None, :] >= target[:, None]
    )
    values[future] = np.nan
    dec_tokens = ["<pad>", *_tokens(n_target - 1, offset=5)]
    coords = xr.Coordinates.from_pandas_multiindex(index, "source")
    da = xr.DataArray(values, dims=("target", "source"), coords=coords, name="attribution")
    return da.assign_coords(
        target=target,
        target_token=("target", np.array(dec_tokens[1:], dtype=object)),
        target_id=("target", np.arange(1, n_target, dtype=np.int64)),
        source_token=("source", np.array(_tokens(n_source, offset=1) + dec_tokens, dtype=object)),
        source_id=("source", np.arange(n_source + n_target, dtype=np.int64)),
    ).assign_attrs(_attrs("input_x_gradient", "encoder-decoder"))


def classifier(
    texts: tuple[str, ...] = ("the film was great", "a bad ##ly made <b> film", "okay"),
    predicted: tuple[int, ...] = (2, 0, 2),
    attributed: str = "predicted",
    seed: int = 5,
) -> xr.DataArray:
    """A sequence classifier's batch: ``(example, target, source)``, targets are classes by label.

    Sources are ``[CLS] words [SEP]``, NaN-padded with ``""`` tokens. ``attributed``:
    ``"predicted"`` (each example's predicted class only, the others NaN) or ``"all"``.
    """
    rng = np.random.default_rng(seed)
    names = ("negative", "neutral", "positive")
    tokens = [["[CLS]", *t.split(), "[SEP]"] for t in texts]
    n, width = len(texts), max(map(len, tokens))
    values = np.full((n, 3, width), np.nan, dtype=np.float32)
    src_tok = np.full((n, width), "", dtype=object)
    classes = np.full((n, 3), -1, dtype=np.int64)
    for e, row in enumerate(tokens):
        src_tok[e, : len(row)] = row
        rows = [predicted[e]] if attributed == "predicted" else [0, 1, 2]
        values[e, rows, : len(row)] = _values(rng, (len(rows), len(row)), signed=True)
        classes[e, rows] = rows
    label = np.vectorize(lambda c: names[c] if c >= 0 else "", otypes=[object])
    attrs = {**_attrs("saliency", "encoder-only"), "task": "sequence-classification"}
    return xr.DataArray(
        values,
        dims=("example", "target", "source"),
        coords={
            "example": np.arange(n),
            "target": np.array(names),
            "source": np.arange(width),
            "target_class": (("example", "target"), classes),
            "target_label": (("example", "target"), label(classes).astype(str)),
            "source_token": (("example", "source"), src_tok),
            "special": (("example", "source"), np.isin(src_tok, ["[CLS]", "[SEP]"])),
            "predicted_class": ("example", np.array(predicted)),
            "predicted_label": ("example", np.array([names[p] for p in predicted])),
            "predicted_probability": ("example", np.linspace(0.5, 0.9, n)),
        },
        attrs=attrs,
        name="attribution",
    )


def dataset() -> xr.Dataset:
    """Several variables travelling together (attribution, a per-target score, a float64 gap)."""
    da = single()
    rng = np.random.default_rng(4)
    prob = xr.DataArray(rng.random(da.sizes["target"]).astype(np.float32), dims="target")
    gap = xr.DataArray(rng.standard_normal(da.sizes["target"]), dims="target")
    return xr.Dataset(
        {"attribution": da, "probability": prob.assign_attrs(units="1"), "gap": gap},
        attrs={"model": "synthetic/tiny", "n_layers": 2, "scale": 0.5},
    )


ALL = {
    "single": single,
    "single_unsigned": lambda: single(signed=False),
    "single_hidden": single_hidden,
    "batch": batch,
    "encoder_decoder": encoder_decoder,
}
