"""Word granularity: merge the sub-word tokens of an attribution array into words.

Works on the token strings an attrax array carries (``source_token``/``target_token``), so it needs
no tokenizer: the convention (byte-level BPE ``Ġ``, SentencePiece ``▁``, WordPiece ``##``) is read
from the strings themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr

from . import _validate as check
from ._errors import InputError, OptionError
from ._schema import MISSING_TOKEN, fill_value, per_example, replace_dim
from ._tokens import SCHEMES, detect_scheme, segment

HOWS = ("sum", "mean", "max", "absmax")
DIMS = ("source", "target")


def merge_subwords(
    da: xr.DataArray,
    how: str = "sum",
    dims: str | Sequence[str] | None = None,
    *,
    scheme: str | None = None,
) -> xr.DataArray:
    """Aggregate the tokens of each word along ``source`` and/or ``target``.

    A word starts at a token carrying the tokenizer's word-start mark (``Ġ``, ``▁``, or any
    token without WordPiece's ``##``). Special tokens (``<s>``, ``[CLS]``, ``<|endoftext|>``...)
    and runs of punctuation are words of their own; whitespace-only tokens join the word they
    precede. Words never span the prompt/continuation boundary (the ``side``), nor a gap in
    attributed target positions, nor padding.

    Arguments:
        da: an attrax array with ``source_token``/``target_token`` coordinates, single or batch.
        how: ``"sum"`` (totals preserved), ``"mean"``, ``"max"`` or ``"absmax"`` (the value of
            largest magnitude, sign kept) over each word's tokens, ignoring NaN; a word whose
            tokens are all NaN stays NaN.
        dims: ``"source"``, ``"target"`` or both; default: those of the two that ``da`` has.
        scheme: one of ``SCHEMES``; when None, the one the model's vocabulary uses
            (``da.attrs["subwords"]``), else detected from the array's token strings
            (``"word-level"``, each token its own word, when no mark is found).

    Returns:
        The array with each merged dim indexed by the position of each word's first token (the
        ``(side, position)`` of it for an encoder-decoder MultiIndex), and a ``source_word``/
        ``target_word`` coordinate with the decoded word. In a batch, word starts differ per
        example: the index is their union and the other entries are NaN (word ``""``).
        Token-level coordinates along the merged dim (ids, tokens) are dropped.

    >>> import attrax as ax
    >>> da = ax.occlusion(ax.load_model(), "1 2 3 =", " 3 2 1")
    >>> ax.merge_subwords(da).source_word.values.tolist()
    ['1', '2', '3', '=', '3', '2', '1']
    """
    if not isinstance(da, xr.DataArray):
        raise InputError(f"merge_subwords: expected an xarray DataArray, got {type(da).__name__}")
    check.holds_numbers(da.dtype, "merge_subwords")
    if how not in HOWS:
        raise OptionError(f"`how` must be one of {HOWS}, got {how!r}")
    if scheme is not None and scheme not in SCHEMES:
        raise OptionError(f"`scheme` must be one of {SCHEMES} or None, got {scheme!r}")
    chosen = _dims(da, dims)
    for dim in chosen:
        if f"{dim}_token" not in da.coords:
            raise InputError(
                f"merge_subwords: `da` has no `{dim}_token` coordinate to find words along "
                f"`{dim}` (merge words before reductions that drop token coordinates)"
            )
        if dim not in da.indexes:  # the positions label the merged words
            raise InputError(
                f"merge_subwords: `da` has no `{dim}` coordinate (the positions attrax labels "
                f"its {dim}s with); merge an array as a method returns it"
            )
    if scheme is None:
        scheme = da.attrs.get("subwords")  # the model's vocabulary's, on every attrax result
    if scheme not in SCHEMES:  # an array from elsewhere: read from its own tokens
        scheme = detect_scheme(
            [t for dim in chosen for t in np.ravel(_strings(da.coords[f"{dim}_token"].values))]
        )
    out = da
    for dim in chosen:
        if not out.indexes[dim].is_monotonic_increasing:  # reordered (by relevance, say):
            out = out.sortby(dim)  # words are runs of consecutive positions
        out = _merge(out, dim, how, scheme)
    done = da.attrs.get("reductions", "")
    out.attrs["reductions"] = f"{done};merge_subwords({','.join(chosen)},{how})".lstrip(";")
    return out


def _merge(da: xr.DataArray, dim: str, how: str, scheme: str) -> xr.DataArray:
    batched = "example" in da.dims
    n_examples = da.sizes["example"] if batched else 1
    width = da.sizes[dim]
    index = da.indexes[dim]
    tokens = _strings(per_example(da, f"{dim}_token", ("example", dim)))
    sides: np.ndarray | None
    if isinstance(index, pd.MultiIndex) and "side" in index.names:
        sides = np.tile(np.asarray(index.get_level_values("side"), dtype=str), (n_examples, 1))
        positions = np.asarray(index.get_level_values("position"))
    else:
        side_coord = "side" in da.coords and dim in da.coords["side"].dims
        sides = per_example(da, "side", ("example", dim)).astype(str) if side_coord else None
        if sides is None:
            sides = np.full((n_examples, width), "", dtype=object)
        positions = np.asarray(index)
        if not np.issubdtype(positions.dtype, np.integer):
            positions = np.arange(width)
    segmented = [
        segment(list(tokens[e]), list(sides[e]), positions.tolist(), scheme)
        for e in range(n_examples)
    ]
    starts = sorted({first for words in segmented for first, _, _ in words})
    column = {s: j for j, s in enumerate(starts)}
    longest = max((len(m) for words in segmented for _, m, _ in words), default=1)
    members = np.full((n_examples, len(starts), longest), -1, dtype=np.int64)
    texts = np.full((n_examples, len(starts)), MISSING_TOKEN, dtype=object)
    word_sides = np.full((n_examples, len(starts)), MISSING_TOKEN, dtype=object)
    for e, words in enumerate(segmented):
        for first, member, text in words:
            members[e, column[first], : len(member)] = member
            texts[e, column[first]] = text
            word_sides[e, column[first]] = sides[e][first]

    others = [d for d in da.dims if d not in ("example", dim)]
    order = (["example"] if batched else []) + others + [dim]
    values = np.asarray(da.transpose(*order).values)
    if not batched:
        values = values[None]
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    merged = _reduce(values, members, how)
    if not batched:
        merged = merged[0]

    per_word = {f"{dim}_word": (texts if batched else texts[0]).astype(str)}
    if not isinstance(index, pd.MultiIndex) and "side" in da.coords and dim in da["side"].dims:
        per_word["side"] = (word_sides if batched else word_sides[0]).astype(str)
    for name, value in _word_level(da, dim, members).items():
        per_word[name] = value if batched else value[0]
    return replace_dim(da, dim, merged, index[starts], per_word)


def _strings(tokens: np.ndarray) -> np.ndarray:
    """Token strings, with what is no string (the NaN or None that ``xr.concat`` pads an object
    coordinate with) as the missing token: no word, not the word "nan"."""
    if tokens.dtype.kind != "O":
        return tokens.astype(str)
    flat = [t if isinstance(t, str) else MISSING_TOKEN for t in tokens.ravel()]
    return np.asarray(flat, dtype=str).reshape(tokens.shape)


def _word_level(da: xr.DataArray, dim: str, members: np.ndarray) -> dict[str, np.ndarray]:
    """The coordinates along ``dim`` a word's tokens share (a classifier's ``segment`` and
    ``special``; a token classifier's classes), one value per word ``[example, word]``: the
    missing marker (-1, "", NaN) for a word whose tokens differ. Token-level ones (ids, tokens,
    contrasts, completeness gaps) are dropped."""
    out = {}
    present = members >= 0
    first = np.where(present[..., 0], members[..., 0], 0)
    for name, coord in da.coords.items():
        if (
            name in (dim, "side")
            or name in da.xindexes  # a MultiIndex's levels are the index's
            or dim not in coord.dims
            or not set(coord.dims) <= {"example", dim}
            or str(name).endswith(("_token", "_id"))
            or str(name).startswith("contrast_")
            or name == "completeness_gap"
        ):
            continue
        values = per_example(da, str(name), ("example", dim))
        gathered = np.take_along_axis(
            values, np.where(present, members, 0).reshape(len(values), -1), axis=1
        )
        gathered = gathered.reshape(members.shape)
        lead = np.take_along_axis(values, first, axis=1)
        same = (gathered == lead[..., None]) | ~present
        if values.dtype.kind == "f":
            same |= np.isnan(gathered) & np.isnan(lead)[..., None]
        # per word, so an example merges in a batch as it does alone
        agreed = present[..., 0] & same.all(axis=-1)
        out[str(name)] = np.where(agreed, lead, fill_value(values.dtype)).astype(values.dtype)
    return out


def _reduce(values: np.ndarray, members: np.ndarray, how: str) -> np.ndarray:
    """``values[E, ..., N]`` over ``members[E, J, W]`` (-1 = none) -> ``[E, ..., J]``."""
    n_examples, n_words, longest = members.shape
    middle = values.ndim - 2
    index = members.reshape(n_examples, *([1] * middle), n_words * longest)
    gathered = np.take_along_axis(values, np.maximum(index, 0), axis=-1)
    gathered = gathered.reshape(*gathered.shape[:-1], n_words, longest)
    absent = (members < 0).reshape(n_examples, *([1] * middle), n_words, longest)
    gathered = np.where(absent, np.nan, gathered)
    present = ~np.isnan(gathered)
    any_present = present.any(axis=-1)
    filled = np.where(present, gathered, 0)
    if how == "sum":
        out = filled.sum(axis=-1)
    elif how == "mean":
        out = filled.sum(axis=-1) / np.maximum(present.sum(axis=-1), 1)
    elif how == "max":
        out = np.where(present, gathered, -np.inf).max(axis=-1)
    else:
        pick = np.where(present, np.abs(gathered), -1.0).argmax(axis=-1)
        out = np.take_along_axis(filled, pick[..., None], axis=-1)[..., 0]
    return np.where(any_present, out, np.nan).astype(values.dtype)


def _dims(da: xr.DataArray, dims: str | Sequence[str] | None) -> tuple[str, ...]:
    if dims is None:
        # a sequence classifier's targets are classes, an answer's its start and end, a masked
        # LM's its masks: no tokens of a text to merge
        classes = da.attrs.get("task") in (
            "sequence-classification",
            "question-answering",
            "fill-mask",
        )
        chosen = tuple(d for d in DIMS if d in da.dims and not (classes and d == "target"))
        if not chosen:
            raise OptionError(
                f"merge_subwords: `da` has neither a `source` nor a `target` dim; its dims are "
                f"{da.dims}"
            )
        return chosen
    chosen = (dims,) if isinstance(dims, str) else tuple(dims)
    if not chosen:
        raise OptionError("`dims` is empty: give 'source', 'target' or both")
    for dim in chosen:
        if dim not in DIMS:
            raise OptionError(f"`dims` must name 'source' and/or 'target', got {dim!r}")
        if dim not in da.dims:
            raise OptionError(f"`dims` contains {dim!r}, which is not a dim of `da` {da.dims}")
        if dim == "target" and da.attrs.get("task") in ("question-answering", "fill-mask"):
            raise OptionError(
                "`dims` contains 'target', but a question-answering model's targets (its "
                "answer's start and end) and a masked LM's (its masks) are not tokens to merge: "
                "merge 'source'"
            )
    return tuple(dict.fromkeys(chosen))
