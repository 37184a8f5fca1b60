"""Look at attrax arrays: a self-contained HTML heatmap, a matplotlib figure, a terminal table.

All three take a ``(target, source)`` array, or ``(example, target, source)`` for a batch (one
table per example, padding dropped). Signed values get a diverging colour map centred on 0,
non-negative ones a sequential map; NaN (nothing attributed) is left blank/grey. One colour
scale is shared by every example shown, so examples compare at a glance.

Sequence classifiers (whose targets are classes) are shown by :func:`show` and :func:`plot` as
rows instead, one per example, like Captum's ``visualize_text``: the text with its tokens
highlighted, the true label (``labels=``), the predicted label and its probability. That view
takes an ``(example, source)`` or ``(source,)`` array (a class selected, e.g.
``da.sel(target="positive")``), or a sequence classifier's ``(example, target, source)`` array, of
which each example's predicted class is shown.
"""

from __future__ import annotations

import functools
import html
import io as _io
import math
import numbers
import os
import re
import unicodedata
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr
from matplotlib import colormaps, colors
from matplotlib.figure import Figure

from . import _validate as check
from ._errors import InputError, OptionError
from ._route_plot import is_route, plot_routes
from ._schema import MISSING_TOKEN, drop_padding
from .io import output_path, write_atomically

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from rich.console import Console

__all__ = ["HTML", "plot", "readable_token", "show", "table"]

Scores = xr.DataArray | xr.Dataset | Mapping[str, xr.DataArray]
Examples = int | Sequence[int] | None
Labels = Sequence[str | int] | None
PathLike = str | os.PathLike[str]

_DIVERGING = "RdBu_r"
_SEQUENTIAL = "Reds"
_NAN_COLOUR = "#e6e6e6"
_SPACE, _NEWLINE, _TAB = "␣", "↵", "⇥"


# --- tokens -------------------------------------------------------------------------------


@functools.cache
def _byte_decoder() -> dict[str, int]:
    # GPT-2's bytes_to_unicode table, inverted: byte-level BPE tokens are bytes spelt with
    # these characters (Ġ is a space, Ċ a newline, "Ã©" the two bytes of "é").
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def readable_token(token: str) -> str:
    """Tokenizer output made readable: spaces as ``␣``, newlines ``↵``, tabs ``⇥``.

    Byte-level BPE tokens (``Ġ``, ``Ċ``, ``ĠcafÃ©``) are decoded back to text when they form
    valid UTF-8; SentencePiece ``▁`` becomes ``␣``, and its byte tokens below 0x80 their
    character (``<0x0A>`` is ``↵``; higher ones, pieces of a character, stay ``<0xE2>``).
    Control and invisible characters show as escapes (``\\x1b``, ``\\u202e``).

    >>> readable_token("Ġcaf\\u00c3\\u00a9"), readable_token("▁Straße"), readable_token("Ċ")
    ('␣café', '␣Straße', '↵')
    >>> readable_token("Ġcafé")  # not valid byte-level BPE, but Ġ still marks a space
    '␣café'
    >>> readable_token("\\x1b[2J"), readable_token("<0x0A>")  # control characters as escapes
    ('\\\\x1b[2J', '↵')

    """
    decoder = _byte_decoder()
    text = token
    byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token)  # SentencePiece's byte fallback
    if byte and int(byte.group(1), 16) < 0x80:  # higher: a piece of a character, kept as is
        text = chr(int(byte.group(1), 16))
    elif token and all(ch in decoder for ch in token):
        try:
            text = bytes(decoder[ch] for ch in token).decode("utf-8")
        except UnicodeDecodeError:
            # A partial UTF-8 sequence, or not byte-level BPE at all: mark whitespace only.
            text = token.replace("Ġ", " ").replace("Ċ", "\n").replace("ĉ", "\t")
    text = text.replace("▁", " ")
    text = text.replace(" ", _SPACE).replace("\n", _NEWLINE).replace("\t", _TAB)
    return _shown(text)


def _shown(text: str) -> str:
    """``text`` with its invisible characters as escapes; tag characters stay in a flag (🏴
    then tags, England's), where they draw it, and are escaped anywhere else (hidden text)."""
    out, flag = [], False
    for ch in text:
        tag = 0xE0020 <= ord(ch) <= 0xE007F
        flag = ch == "\U0001f3f4" or (flag and tag)
        out.append(ch if tag and flag else _visible(ch))
    return "".join(out)


#: character classes shown as escapes: control (a terminal's ESC), format (zero-width, the
#: right-to-left override that reorders what follows), surrogates, private use, separators
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})


#: joiners that shape what they join (an emoji sequence, Persian words): kept
_JOINERS = frozenset({"\u200c", "\u200d"})


def _visible(ch: str) -> str:
    if ch in _JOINERS:  # they shape what they join
        return ch
    if unicodedata.category(ch) not in _INVISIBLE:
        return ch
    code = ord(ch)
    return (
        f"\\x{code:02x}"
        if code < 0x100
        else f"\\u{code:04x}"
        if code < 0x10000
        else f"\\U{code:08x}"
    )


def _scalar(value: Any) -> Any:
    """A coordinate value as Python's: numpy scalars' ``.item()``; a str of an object array
    (``xr.concat`` with a ``pd.Index`` of names) as it is."""
    return value.item() if isinstance(value, np.generic) else value


# --- preparing panels ---------------------------------------------------------------------


@dataclass
class _Panel:
    values: np.ndarray  # (target, source) float64
    target_labels: list[str]
    source_labels: list[str]
    target_where: list[str]  # positions, for tooltips
    source_where: list[str]
    sides: list[str] | None
    example: Hashable | None
    scores: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class _Scale:
    signed: bool
    vmin: float
    vmax: float
    cmap: colors.Colormap

    def norm(self, values: np.ndarray) -> np.ndarray:
        # halves: vmax - vmin overflows for magnitudes near float64's largest
        low, high = self.vmin / 2, self.vmax / 2
        return np.clip((values / 2 - low) / (high - low), 0.0, 1.0)

    def paint(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Background and readable text colours (hex strings) for every value at once."""
        rgb = self.cmap(self.norm(values))[..., :3]
        ints = np.round(rgb * 255).astype(int)
        hexes = np.array(
            [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in ints.reshape(-1, 3).tolist()], dtype=object
        ).reshape(values.shape)
        light = rgb @ np.array([0.299, 0.587, 0.114]) > 0.55
        return hexes, np.where(light, "#000000", "#ffffff")


def _check_dims(da: object, rows: bool = False) -> xr.DataArray:
    """``da`` itself, checked for the heatmap view (or, with ``rows``, the classifier rows)."""
    if not isinstance(da, xr.DataArray):
        raise InputError(f"`da` must be an xarray.DataArray, got {type(da).__name__}")
    if is_route(da):
        raise InputError(
            f"`da` is information flow routes {tuple(str(d) for d in da.dims)}: draw them with "
            "ax.plot, or reduce them to (target, source) first, e.g. ax.mean(da, 'layer')"
            " then ax.mean(..., 'query')"
        )
    if da.dtype.kind not in "biuf":  # strings, objects, complex numbers: no heat to draw
        raise InputError(f"`da` must hold real numbers to draw, got dtype {da.dtype}")
    if "example" in da.dims and da.sizes["example"] == 0:
        raise InputError("`da` has no examples to draw")
    dims = tuple(str(d) for d in da.dims)
    if "hidden" in dims:
        raise InputError(
            f"`da` has dims {dims}: reduce 'hidden' to one value per (target, source) first,"
            " e.g. ax.l2_norm(da) or ax.sum(da)"
        )
    missing = [d for d in ("source",) if d not in dims]
    if not rows and "target" not in dims:
        missing.insert(0, "target")
    extra = [d for d in dims if d not in ("example", "target", "source")]
    if missing or extra:
        hint = (
            f" Select or reduce {tuple(extra)} first, e.g. da.mean({extra[0]!r})" if extra else ""
        )
        raise InputError(
            f"`da` must have dims ('target', 'source'), optionally with 'example', or be a "
            f"sequence classifier's ('example', 'source'); got {dims}.{hint}"
        )
    return da


def _is_rows(da: object) -> bool:
    """Whether ``da`` is shown as classification rows: one example per row, no target dim, or
    a sequence classifier's batch (its targets are classes)."""
    if not isinstance(da, xr.DataArray) or "source" not in da.dims:
        return False
    if "target" not in da.dims:
        return True
    return "example" in da.dims and da.attrs.get("task") == "sequence-classification"


def _coord_labels(da: xr.DataArray, dim: str) -> tuple[list[str], list[str]]:
    """Token labels and position labels along ``dim`` of a panel."""
    n = da.sizes[dim]
    index = da.indexes.get(dim)
    if index is not None and index.nlevels > 1:
        where = [" ".join(str(v) for v in key) for key in index]
    elif dim in da.coords:
        where = [str(v) for v in da[dim].values.tolist()]
    else:
        where = [str(i) for i in range(n)]
    word, token = f"{dim}_word", f"{dim}_token"  # merge_subwords' words, else the tokens
    if word in da.coords and da[word].dims == (dim,):
        labels = [_shown(str(w)) for w in da[word].values.tolist()]
    elif token in da.coords and da[token].dims == (dim,):
        labels = [readable_token(str(t)) for t in da[token].values.tolist()]
    else:
        labels = where
    if dim == "target" and da.attrs.get("task") == "question-answering":
        labels = [f"{w} {label}" for w, label in zip(where, labels, strict=True)]  # "start cat"
    return labels, where


def _attribution_and_scores(
    ds: xr.Dataset, scores: Scores | None
) -> tuple[xr.DataArray, xr.Dataset]:
    """An ``ax.with_scores`` Dataset split into its attribution (the variable along
    ``source``) and its scores (the others)."""
    sourced = [str(k) for k, v in ds.data_vars.items() if "source" in v.dims]
    if len(sourced) != 1 or scores is not None:
        raise InputError(
            "`da` as a Dataset must be what ax.with_scores returns: one attribution (along "
            f"`source`) and its scores, without `scores=` given; got the variables "
            f"{list(map(str, ds.data_vars))}"
        )
    return ds[sourced[0]], ds.drop_vars(sourced[0])


def _scores_dict(scores: Scores | None) -> dict[str, xr.DataArray]:
    if scores is None:
        return {}
    if isinstance(scores, xr.DataArray) and "score" in scores.dims:
        # ax.step_scores' array: a column per score; one selected keeps its score's name
        items: dict[str, Any] = {str(k): scores.sel(score=k) for k in scores["score"].values}
    elif isinstance(scores, xr.DataArray):
        named = scores.name if "score" not in scores.coords else scores["score"].item()
        items = {str(named) if named is not None else "score": scores}
    elif isinstance(scores, xr.Dataset):
        items = {str(k): v for k, v in scores.data_vars.items()}
    elif isinstance(scores, Mapping):
        items = {str(k): v for k, v in scores.items()}
    else:
        raise InputError(
            "`scores` must be a DataArray, a Dataset or a dict of DataArrays,"
            f" got {type(scores).__name__}"
        )
    for name, score in items.items():
        if not isinstance(score, xr.DataArray) or "target" not in score.dims:
            raise InputError(f"`scores[{name!r}]` must be a DataArray with a 'target' dim")
        extra = set(map(str, score.dims)) - {"target", "example"}
        if extra:
            raise InputError(
                f"`scores[{name!r}]` has dims {tuple(map(str, score.dims))}; only 'target'"
                " (and 'example') are allowed"
            )
    return items


def _score_column(
    score: xr.DataArray, panel_da: xr.DataArray, example: tuple[int, Any] | None, of: int
) -> np.ndarray:
    """``score``'s values at the panel's targets, for ``example`` (its position among `da`'s
    ``of`` examples, and its label): matched by label where the scores are labelled (`da` may
    be a selection of the examples scored), else by position, the same number of examples."""
    if "example" in score.dims:
        if example is None:
            raise InputError("`scores` has an 'example' dim but `da` does not")
        position, label = example
        if "example" in score.indexes:
            if label not in score.indexes["example"]:
                raise InputError(f"`scores` has no example {label!r}, which `da` shows")
            score = score.sel(example=label)
        elif score.sizes["example"] != of:
            raise InputError(
                f"`scores` has {score.sizes['example']} unlabelled examples but `da` has {of}"
            )
        else:
            score = score.isel(example=position)
    if "target" in score.indexes and "target" in panel_da.indexes:
        score = score.reindex(target=panel_da.indexes["target"])
        if score.sizes["target"] and bool(score.isnull().all()):
            raise InputError(
                f"`scores` has none of the targets {panel_da.indexes['target'].tolist()} of `da`"
            )
        if "target_id" in score.coords and "target_id" in panel_da.coords:
            ids, want = score["target_id"].values, panel_da["target_id"].values
            scored = (ids >= 0) & (want >= 0)  # -1: padding, no token
            if not np.array_equal(ids[scored], want[scored]):
                raise InputError(
                    f"`scores` has other target tokens than `da` (target_id {ids.tolist()} "
                    f"against {want.tolist()}): compute both with the same inputs and targets"
                )
    elif score.sizes["target"] != panel_da.sizes["target"]:
        raise InputError(
            f"`scores` has {score.sizes['target']} targets but `da` has {panel_da.sizes['target']}"
        )
    return np.asarray(score.values, dtype=np.float64)


def _example_positions(da: xr.DataArray, example: Examples) -> list[int | None]:
    if "example" not in da.dims:
        if example is not None:
            raise OptionError("`example` was given but `da` has no 'example' dim")
        return [None]
    n = da.sizes["example"]
    if example is None:
        chosen: list[object] = list(range(n))
    elif isinstance(example, int | np.integer | str) or not isinstance(example, Iterable):
        chosen = [example]  # a float or other object: refused below, named
    else:
        chosen = list(example)
        if not chosen:
            raise OptionError(f"`example` selects no example: give positions in 0..{n - 1}")
    positions: list[int | None] = []
    for e in chosen:
        if isinstance(e, bool) or not isinstance(e, int | np.integer) or not -n <= int(e) < n:
            raise OptionError(f"`example` must be positions in 0..{n - 1}, got {example!r}")
        positions.append(int(e) % n)
    return positions


def _prepare(
    da: xr.DataArray, example: Examples, scores: Scores | None, cmap: str | colors.Colormap | None
) -> tuple[list[_Panel], _Scale]:
    da = _check_dims(da)
    score_items = _scores_dict(scores)
    panels = []
    for e in _example_positions(da, example):
        sub = da if e is None else da.isel(example=e)
        which = None if e is None else (e, _scalar(da["example"].values[e]))
        sub = drop_padding(sub.transpose("target", "source"))
        target_labels, target_where = _coord_labels(sub, "target")
        source_labels, source_where = _coord_labels(sub, "source")
        sides = None
        if "side" in sub.coords and sub["side"].dims == ("source",):
            sides = [str(s) for s in sub["side"].values.tolist()]
        panels.append(
            _Panel(
                values=np.asarray(sub.values, dtype=np.float64),
                target_labels=target_labels,
                source_labels=source_labels,
                target_where=target_where,
                source_where=source_where,
                sides=sides,
                example=None if which is None else which[1],
                scores={
                    k: _score_column(v, sub, which, da.sizes.get("example", 1))
                    for k, v in score_items.items()
                },
            )
        )
    return panels, _scale(panels, cmap)


def _scale(panels: Sequence[_Panel | _Row], cmap: str | colors.Colormap | None) -> _Scale:
    finite = np.concatenate([p.values[np.isfinite(p.values)] for p in panels])
    signed = bool(finite.size and finite.min() < 0)
    top = float(np.abs(finite).max()) if finite.size else 0.0
    top = top if top > 0 and math.isfinite(top) else 1.0
    if cmap is None:
        cmap = _DIVERGING if signed else _SEQUENTIAL
    if isinstance(cmap, str):
        try:
            cmap = colormaps[cmap]
        except KeyError:
            raise OptionError(
                f"`cmap` {cmap!r} is not a matplotlib colormap, e.g. 'RdBu_r' or 'viridis'"
            ) from None
    if not isinstance(cmap, colors.Colormap):
        raise OptionError(f"`cmap` must be a colormap name or Colormap, got {cmap!r}")
    return _Scale(signed=signed, vmin=-top if signed else 0.0, vmax=top, cmap=cmap)


def _check_title(title: object) -> None:
    if title is not None and not isinstance(title, str):
        raise OptionError(f"`title` must be a string or None, got {title!r}")


def _default_title(da: xr.DataArray, title: str | None) -> str | None:
    if title is not None:
        return title
    parts = [str(da.attrs[k]) for k in ("method", "model") if k in da.attrs]
    return " · ".join(parts) or None


# --- classification rows ------------------------------------------------------------------

_LABELS_ONLY = (
    "`labels` (true labels) apply to classifier rows: an (example, source) array or a sequence "
    "classifier's (example, target, source)"
)


@dataclass
class _Row:
    values: np.ndarray  # (source,) float64, padding dropped
    words: list[tuple[str, bool]]  # each token as shown, and whether a space goes before it
    where: list[str]
    example: Hashable | None
    true: str | None
    predicted: str | None
    probability: float | None
    attributed: str | None  # the class whose attribution is shown


def _class_names(da: xr.DataArray) -> dict[int, str]:
    """Class id -> label, from the id/label coordinate pairs a classifier result carries."""
    names: dict[int, str] = {}
    for ids, labels in (("target_class", "target_label"), ("predicted_class", "predicted_label")):
        if ids in da.coords and labels in da.coords:
            pairs = zip(
                np.ravel(da[ids].values).tolist(), np.ravel(da[labels].values).tolist(), strict=True
            )
            names.update({int(i): str(n) for i, n in pairs if int(i) >= 0})
    return names


def _text_words(tokens: list[str]) -> list[tuple[str, bool]]:
    """Tokens as running text: WordPiece ``##`` pieces and byte-level/SentencePiece pieces
    without their space marker join the word before them."""
    marked = any(t[:1] in ("Ġ", "▁") for t in tokens)
    words = []
    for i, token in enumerate(tokens):
        shown = readable_token(token)
        if token.startswith("##") and len(token) > 2:
            words.append((shown[2:], False))
        elif marked and shown.startswith(_SPACE):
            words.append((shown[len(_SPACE) :] or _SPACE, i > 0))
        else:
            words.append((shown, i > 0 and not marked))
    return words


def _one(da: xr.DataArray, name: str) -> Any:
    return da[name].item() if name in da.coords and da[name].ndim == 0 else None


def _row_of_classes(sub: xr.DataArray, position: int) -> xr.DataArray:
    """One example's ``(target, source)`` -> the row of its predicted class (or its only row)."""
    attributed = [t for t in range(sub.sizes["target"]) if bool(sub.isel(target=t).notnull().any())]
    predicted = _one(sub, "predicted_label")
    labels = [str(v) for v in sub["target"].values.tolist()]
    if predicted is not None and str(predicted) in labels:
        chosen = labels.index(str(predicted))
        if chosen in attributed or not attributed:
            return sub.isel(target=chosen)
    if len(attributed) == 1:
        return sub.isel(target=attributed[0])
    raise InputError(
        f"`da` example {position} has {len(attributed)} attributed classes and none is its "
        f"prediction; select one first, e.g. da.sel(target={labels[0]!r})"
    )


def _prepare_rows(
    da: xr.DataArray, example: Examples, labels: Labels, cmap: str | colors.Colormap | None
) -> tuple[list[_Row], _Scale]:
    da = _check_dims(da, rows=True)
    trues = _true_labels(da, labels)
    rows = []
    for e in _example_positions(da, example):
        sub = da if e is None else da.isel(example=e)
        if "target" in sub.dims:
            sub = _row_of_classes(sub, 0 if e is None else e)
        # merge_subwords' words (each its own, space-separated), else the tokens, else positions
        label = next((c for c in ("source_word", "source_token") if c in sub.coords), None)
        tokens = (
            [str(t) for t in sub[label].values.tolist()]
            if label is not None
            else [str(i) for i in range(sub.sizes["source"])]
        )
        values = np.asarray(sub.values, dtype=np.float64)
        keep = [j for j, t in enumerate(tokens) if not (t == MISSING_TOKEN and np.isnan(values[j]))]
        _, where = _coord_labels(sub, "source")
        true = None if trues is None else trues[0 if e is None else e]
        probability = _one(sub, "predicted_probability")
        attributed = _one(sub, "target")
        rows.append(
            _Row(
                values=values[keep],
                words=_text_words([tokens[j] for j in keep]),
                where=[where[j] for j in keep],
                example=None if e is None else _scalar(da["example"].values[e]),
                true=true,
                predicted=None
                if _one(sub, "predicted_label") is None
                else str(_one(sub, "predicted_label")),
                # a regression head's is NaN: it has no probability to show
                probability=None
                if probability is None or np.isnan(float(probability))
                else float(probability),
                attributed=None if attributed is None else str(attributed),
            )
        )
    return rows, _scale(rows, cmap)


def _true_labels(da: xr.DataArray, labels: Labels) -> list[str] | None:
    """``labels`` checked, one class name or id per example of ``da``, as the names shown."""
    if labels is None:
        return None
    n = da.sizes.get("example", 1)
    if isinstance(labels, str) or not isinstance(labels, Sequence) or len(labels) != n:
        raise OptionError(
            f"`labels` must be a list of {n} true labels (names or class ids), one per "
            f"example of `da`, got {labels!r}"
        )
    names, every = _class_names(da), _every_class(da)
    trues = []
    for i, given in enumerate(labels):
        given = given.item() if isinstance(given, np.generic) else given
        if isinstance(given, bool) or not isinstance(given, str | int):
            raise OptionError(
                f"`labels[{i}]` must be a class name (str) or class id (int), got {given!r}"
            )
        if every is not None and given not in (every if isinstance(given, int) else every.values()):
            classes = ", ".join(f"{k} {v!r}" for k, v in sorted(every.items()))
            raise OptionError(
                f"`labels[{i}]` {given!r} is not a class of `da`; its classes are {classes}"
            )
        trues.append(names.get(given, str(given)) if isinstance(given, int) else given)
    return trues


def _every_class(da: xr.DataArray) -> dict[int, str] | None:
    """Class id -> label when ``da`` holds every class: a ``target`` dim of two or more classes
    that each example is attributed to, ids 0..K-1 (``target="all"``). Otherwise (each
    example's predicted class, one class selected) a true label may be one it never saw."""
    if not {"target_class", "target_label"} <= set(da.coords) or "target" not in da.dims:
        return None
    k = da.sizes["target"]
    ids = da["target_class"]
    if k < 2 or "target" not in ids.dims:
        return None
    rows = ids.transpose(..., "target").values.reshape(-1, k)
    return _class_names(da) if (np.sort(rows, axis=1) == np.arange(k)).all() else None


def _row_caption(row: _Row) -> list[tuple[str, str]]:
    """The (heading, text) cells before a row's text: example, true, predicted, attributed."""
    cells = []
    if row.example is not None:
        cells.append(("example", str(row.example)))
    if row.true is not None:
        cells.append(("true label", row.true))
    if row.predicted is not None:
        p = "" if row.probability is None else f" ({row.probability:.2f})"
        cells.append(("predicted", row.predicted + p))
    if row.attributed is not None:
        cells.append(("attributed", row.attributed))
    return cells


def _cell(value: float) -> str:
    """An annotated cell's number: two decimals, or two significant digits where those would
    read 0.00 or run to hundreds of digits (1e+300)."""
    return f"{value:.2f}" if value == 0 or 0.005 <= abs(value) < 1e4 else f"{value:.2g}"


def _rows_html(rows: list[_Row], scale: _Scale, annotate: bool) -> str:
    headings = list(dict.fromkeys(h for row in rows for h, _ in _row_caption(row)))
    out = ['<table class="ax-rows">\n<thead><tr>']
    out += [f'<th class="ax-h">{_esc(h)}</th>' for h in [*headings, "sum", "text"]]
    out.append("</tr></thead>\n<tbody>")
    for row in rows:
        caption = dict(_row_caption(row))
        cells = []
        for h in headings:
            cls = {"true label": "ax-true", "predicted": "ax-pred"}.get(h, "ax-info")
            if h == "predicted" and row.true is not None and row.predicted is not None:
                cls += " ax-ok" if row.predicted == row.true else " ax-wrong"
            cells.append(f'<td class="{cls}">{_esc(caption.get(h, ""))}</td>')
        total = float(np.nansum(row.values)) if np.isfinite(row.values).any() else math.nan
        cells.append(f'<td class="ax-sum">{_fmt(total)}</td>')
        backgrounds, inks = scale.paint(row.values)
        words = []
        for j, ((word, space), where) in enumerate(zip(row.words, row.where, strict=True)):
            value = float(row.values[j])
            gap = " " if space else ""
            tip = _esc(f"source {where}: {word}: {_fmt(value)}")
            if math.isnan(value):
                words.append(f'{gap}<span class="ax-w ax-nan" title="{tip}">{_esc(word)}</span>')
                continue
            number = f'<sub class="ax-v">{_cell(value)}</sub>' if annotate else ""
            words.append(
                f'{gap}<span class="ax-w" style="background:{backgrounds[j]};color:{inks[j]}" '
                f'data-value="{value:.6g}" title="{tip}">{_esc(word)}{number}</span>'
            )
        cells.append(f'<td class="ax-text">{"".join(words)}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody>\n</table>")
    return "\n".join(out)


# --- HTML ---------------------------------------------------------------------------------


class HTML:
    """A rendered heatmap: displays itself in notebooks, ``str()`` is a standalone page.

    >>> page = HTML("<p>hi</p>", title="demo")
    >>> page._repr_html_()
    '<p>hi</p>'
    >>> str(page).startswith("<!DOCTYPE html>")
    True
    """

    def __init__(self, body: str, title: str = "attrax") -> None:
        self.body = body
        self.title = title

    def _repr_html_(self) -> str:
        return self.body

    def __str__(self) -> str:
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(self.title)}</title>\n</head>\n<body>\n{self.body}\n"
            "</body>\n</html>\n"
        )

    def __repr__(self) -> str:
        return f"<attrax.viz.HTML {self.title!r}, {len(self.body)} characters>"

    def save(self, path: PathLike) -> Path:
        """Write the standalone page (UTF-8) to ``path``, atomically, and return it."""
        path = output_path(path, "a.html")
        return write_atomically(path, lambda tmp: tmp.write_text(str(self), encoding="utf-8"))


_CSS = """
.attrax-viz{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans",sans-serif;
 font-size:13px;color:#222;margin:4px 0}
.attrax-viz .ax-title{font-size:15px;font-weight:600;margin:0 0 6px}
.attrax-viz .ax-example{font-weight:600;margin:10px 0 4px}
.attrax-viz table.ax-table{border-collapse:collapse;margin:0}
.attrax-viz th{font-weight:500;padding:2px 4px;white-space:pre}
.attrax-viz th.ax-src{writing-mode:vertical-rl;transform:rotate(180deg);text-align:left;
 vertical-align:bottom;padding:4px 2px;
 text-orientation:sideways}
.attrax-viz th.ax-tgt{text-align:right}
.attrax-viz th.ax-side{text-align:center;font-size:11px;color:#666;border-bottom:1px solid #bbb}
.attrax-viz td.ax-c{min-width:22px;height:22px;padding:0 3px;text-align:center;font-size:10px;
 border:1px solid #fff}
.attrax-viz td.ax-nan{background:#e6e6e6}
.attrax-viz .ax-split{border-left:2px solid #888 !important}
.attrax-viz td.ax-s{padding:0 6px;text-align:right;font-variant-numeric:tabular-nums;
 border-left:1px solid #ccc}
.attrax-viz th.ax-score{font-size:11px;color:#444;vertical-align:bottom}
.attrax-viz .ax-legend{display:flex;align-items:center;gap:6px;margin-top:8px;font-size:11px}
.attrax-viz .ax-bar{display:inline-block;width:160px;height:10px;border:1px solid #ccc}
.attrax-viz table.ax-rows{border-collapse:collapse}
.attrax-viz table.ax-rows th.ax-h{text-align:left;border-bottom:1px solid #bbb;padding:2px 8px}
.attrax-viz table.ax-rows td{padding:4px 8px;border-bottom:1px solid #eee;vertical-align:top;
 white-space:nowrap}
.attrax-viz td.ax-sum{text-align:right;font-variant-numeric:tabular-nums}
.attrax-viz td.ax-ok{color:#1a7f37}
.attrax-viz td.ax-wrong{color:#cf222e}
.attrax-viz td.ax-text{white-space:normal;line-height:1.9}
.attrax-viz span.ax-w{padding:1px 3px;border-radius:3px;white-space:pre}
.attrax-viz span.ax-nan{background:#e6e6e6}
.attrax-viz sub.ax-v{font-size:9px;margin-left:2px}
"""


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4g}"


def _panel_html(panel: _Panel, scale: _Scale, annotate: bool) -> str:
    out: list[str] = []
    if panel.example is not None:
        out.append(f'<div class="ax-example">example {_esc(str(panel.example))}</div>')
    out.append('<table class="ax-table">\n<thead>')
    splits = set()
    if panel.sides and len(set(panel.sides)) > 1:
        groups: list[tuple[str, int]] = []
        for i, side in enumerate(panel.sides):
            if groups and groups[-1][0] == side:
                groups[-1] = (side, groups[-1][1] + 1)
            else:
                groups.append((side, 1))
                if i:
                    splits.add(i)
        cells = "".join(
            f'<th class="ax-side{" ax-split" if k else ""}" colspan="{n}">{_esc(side)}</th>'
            for k, (side, n) in enumerate(groups)
        )
        pad = f'<th colspan="{len(panel.scores)}"></th>' if panel.scores else ""
        out.append(f"<tr><th></th>{cells}{pad}</tr>")
    header = ['<tr><th class="ax-corner"></th>']
    for j, (label, where) in enumerate(zip(panel.source_labels, panel.source_where, strict=True)):
        split = " ax-split" if j in splits else ""
        header.append(
            f'<th class="ax-src{split}" title="source {_esc(where)}: {_esc(label)}">'
            f"{_esc(label)}</th>"
        )
    header += [f'<th class="ax-score">{_esc(name)}</th>' for name in panel.scores]
    out.append("".join(header) + "</tr>\n</thead>\n<tbody>")
    backgrounds, inks = scale.paint(panel.values)
    for i, (t_label, t_where) in enumerate(
        zip(panel.target_labels, panel.target_where, strict=True)
    ):
        row = [f'<tr><th class="ax-tgt" title="target {_esc(t_where)}">{_esc(t_label)}</th>']
        for j, s_label in enumerate(panel.source_labels):
            value = float(panel.values[i, j])
            split = " ax-split" if j in splits else ""
            tip = _esc(f"{t_label} ← {s_label}: {_fmt(value)}")
            if math.isnan(value):
                row.append(f'<td class="ax-c ax-nan{split}" data-nan="1" title="{tip}"></td>')
                continue
            text = _cell(value) if annotate else ""
            row.append(
                f'<td class="ax-c{split}" style="background:{backgrounds[i, j]};color:{inks[i, j]}" '
                f'data-value="{value:.6g}" title="{tip}">{text}</td>'
            )
        for name, col in panel.scores.items():
            row.append(f'<td class="ax-s" title="{_esc(name)}">{_fmt(float(col[i]))}</td>')
        out.append("".join(row) + "</tr>")
    out.append("</tbody>\n</table>")
    return "\n".join(out)


def _legend_html(scale: _Scale) -> str:
    stops = ",".join(colors.to_hex(scale.cmap(x)) for x in np.linspace(0, 1, 11))
    return (
        f'<div class="ax-legend"><span>{_fmt(scale.vmin)}</span>'
        f'<span class="ax-bar" style="background:linear-gradient(to right,{stops})"></span>'
        f"<span>{_fmt(scale.vmax)}</span>"
        f'<span style="display:inline-block;width:14px;height:10px;background:{_NAN_COLOUR};'
        'margin-left:10px;border:1px solid #ccc"></span><span>not attributed</span></div>'
    )


def show(
    da: xr.DataArray | xr.Dataset,
    *,
    path: PathLike | None = None,
    scores: Scores | None = None,
    title: str | None = None,
    cmap: str | colors.Colormap | None = None,
    example: Examples = None,
    annotate: bool = False,
    labels: Labels = None,
) -> HTML:
    """Render ``da`` as an HTML heatmap table: target tokens down, source tokens across.

    Hover a cell for its value. ``scores`` (a DataArray with a ``target`` dim, or a Dataset /
    dict of them, e.g. step probabilities) are added as extra columns. ``cmap`` defaults to
    ``"RdBu_r"`` centred on 0 for signed values, ``"Reds"`` otherwise. ``example`` picks
    positions along ``example`` (default: all, one table each). ``annotate`` prints values in
    the cells. The page is also written to ``path`` when given.

    A sequence classifier's batch, or any array without a ``target`` dim (``(example, source)``,
    ``(source,)``), is drawn as rows instead: one example per row, its text highlighted, with the
    true label (``labels``: one name or class id per example), the predicted label and
    probability, and the class attributed (each example's predicted class when ``da`` has them
    all). Select ``example=`` to see one example's classes as a heatmap:
    ``show(da.isel(example=0))``.

    An array with ``layer`` and ``head`` dims (:func:`attrax.head_attribution`,
    :func:`attrax.attention_x_gradient`, :func:`attrax.attention`), one target selected, is drawn
    as a layer x head grid: each cell the head's ``head_total`` when the array has it, else its
    sum over ``source``: ``show(da.isel(target=0))``.

    Arguments:
        da: an attribution with ``hidden`` reduced: ``([example,] target, source)``, a
            classifier's ``(example, source)`` / ``(source,)`` rows, one target of an array
            with ``layer`` and ``head`` dims, or an :func:`attrax.with_scores` Dataset (its
            scores as columns).
        path: an HTML file to write the page to as well (optional).
        scores: extra columns along ``target`` (not with rows or the grid).
        title: the page's title (default: the method and model the attrs name).
        cmap: a matplotlib colormap or its name.
        example: the position(s) along ``example`` to draw (not with the grid).
        annotate: print each cell's value in it.
        labels: the true label of each example, for classifier rows only.

    Returns:
        An ``attrax.viz.HTML`` page: a notebook displays it, ``str()`` is a standalone HTML
        document and ``.save(path)`` writes it.

    >>> import xarray as xr
    >>> da = xr.DataArray([[0.2, -0.7]], dims=("target", "source"),
    ...                   coords={"source_token": ("source", ["Ġa", "Ġb"])})
    >>> "␣b" in show(da)._repr_html_()
    True
    >>> rows = xr.DataArray([[0.1, 0.9]], dims=("example", "source"),
    ...                     coords={"source_token": (("example", "source"), [["a", "good"]])})
    >>> "positive" in show(rows, labels=["positive"])._repr_html_()
    True
    """
    _check_title(title)
    check.boolean(annotate, "annotate")
    path = None if path is None else output_path(path, "a.html")
    if isinstance(da, xr.Dataset):  # ax.with_scores': the attribution, its scores as columns
        da, scores = _attribution_and_scores(da, scores)
    if _is_grid(da):
        given = [
            n
            for n, v in (("scores", scores), ("labels", labels), ("example", example))
            if v is not None
        ]
        if given:  # the grid shows one target of one example: nothing for them to pick
            raise OptionError(
                f"`{given[0]}` does not apply to the layer x head grid (one target of one "
                "example); select with da.isel(...) before show"
            )
        return _show_grid(da, path, title, cmap, annotate)
    name = _default_title(_check_dims(da, rows=_is_rows(da)), title)
    parts = [f'<div class="attrax-viz">\n<style>{_CSS}</style>']
    if name:
        parts.append(f'<div class="ax-title">{_esc(name)}</div>')
    if _is_rows(da):
        if scores is not None:
            raise OptionError("`scores` are columns of the heatmap view; classifier rows have none")
        rows, scale = _prepare_rows(da, example, labels, cmap)
        parts.append(_rows_html(rows, scale, annotate))
    else:
        if labels is not None:
            raise OptionError(_LABELS_ONLY)
        panels, scale = _prepare(da, example, scores, cmap)
        parts += [_panel_html(p, scale, annotate) for p in panels]
    parts.append(_legend_html(scale) + "\n</div>")
    page = HTML("\n".join(parts), title=name or "attrax")
    if path is not None:
        page.save(path)
    return page


def _is_grid(da: object) -> bool:
    """Whether ``da`` is shown as a layer x head grid (it has both dims; routes do not)."""
    grid = isinstance(da, xr.DataArray) and "layer" in da.dims and "head" in da.dims
    return grid and not is_route(da)


def _show_grid(
    da: xr.DataArray,
    path: PathLike | None,
    title: str | None,
    cmap: str | colors.Colormap | None,
    annotate: bool,
) -> HTML:
    """One target's layer x head grid: each cell the head's total (``head_total`` when the
    result has it, else the sum over ``source``)."""
    extra = [str(d) for d in da.dims if d not in ("source", "layer", "head") and da.sizes[d] != 1]
    if "hidden" in extra:  # site="heads": each head's output, its own features
        raise InputError(
            f"`da` has dims {tuple(str(d) for d in da.dims)}: each head's output has its own "
            "'hidden' features; reduce them first (e.g. ax.l2_norm(da)), then select one "
            "target for the layer x head grid"
        )
    if extra:
        raise InputError(
            f"`da` has dims {tuple(str(d) for d in da.dims)}: the layer x head grid shows one "
            f"target; select one first, e.g. da.isel({extra[0]}=0)"
        )
    one = da.squeeze([d for d in da.dims if d not in ("source", "layer", "head")])
    if "head_total" in one.coords and set(one["head_total"].dims) == {"layer", "head"}:
        cells, what = one["head_total"], "each head's total over queries and keys"
    elif "source" in one.dims:
        cells, what = one.sum("source", skipna=True, min_count=1), "each head's sum over sources"
    else:
        cells, what = one, "each head's value"
    cells = cells.transpose("layer", "head")
    layers = [str(v) for v in cells["layer"].values.tolist()]
    heads = [str(v) for v in cells["head"].values.tolist()]
    panel = _Panel(
        values=np.asarray(cells.values, dtype=np.float64),
        target_labels=[f"layer {v}" for v in layers],
        source_labels=[f"head {v}" for v in heads],
        target_where=layers,
        source_where=heads,
        sides=None,
        example=None,
    )
    scale = _scale([panel], cmap)
    name = _default_title(da, title)
    target = ""
    if "target_token" in one.coords and one["target_token"].ndim == 0:
        target = f" of target {readable_token(str(one['target_token'].item()))!r}"
    elif "target" in one.coords and one["target"].ndim == 0:
        target = f" of target {one['target'].item()}"
    parts = [f'<div class="attrax-viz">\n<style>{_CSS}</style>']
    if name:
        parts.append(f'<div class="ax-title">{_esc(name)}</div>')
    parts.append(f'<div class="ax-example">layer &times; head: {_esc(what + target)}</div>')
    parts.append(_panel_html(panel, scale, annotate))
    parts.append(_legend_html(scale) + "\n</div>")
    page = HTML("\n".join(parts), title=name or "attrax")
    if path is not None:
        page.save(path)
    return page


# --- matplotlib ---------------------------------------------------------------------------


@functools.cache
def _font_family() -> list[str]:
    # Tokens are often CJK or emoji; matplotlib falls back through this list glyph by glyph,
    # using whichever of these fonts the system has.
    from matplotlib import font_manager

    have = {f.name for f in font_manager.fontManager.ttflist}
    wanted = [
        "DejaVu Sans",
        "Noto Sans CJK JP",
        "Noto Sans CJK SC",
        "Noto Sans JP",
        "WenQuanYi Zen Hei",
        "Droid Sans Fallback",
        "Noto Emoji",
        "Symbola",
    ]
    return [f for f in wanted if f in have] or ["sans-serif"]


def plot(
    da: xr.DataArray,
    *,
    path: PathLike | None = None,
    ax: Axes | None = None,
    title: str | None = None,
    cmap: str | colors.Colormap | None = None,
    example: Examples = None,
    dpi: int = 100,
    labels: Labels = None,
) -> Figure:
    """Draw ``da`` as a matplotlib heatmap with token tick labels and a colorbar.

    One axes per example for a batch (or pass ``example=``); draws into ``ax`` when given
    (one example only). Saves a PNG (or any format matplotlib knows from the suffix) to
    ``path`` when given. Uses no pyplot state and needs no display. Classifier rows (see
    :func:`show`; ``labels``: the true labels) are drawn one example per line, in one axes.
    An :func:`attrax.summary` table (a DataFrame) is drawn as one panel per metric, each method's
    mean with its confidence interval. Information flow routes (:func:`attrax.information_flow`)
    are drawn as graphs, one panel per target: positions across, block outputs up, the route's
    attention, residual and MLP edges as lines as wide as their weights.

    Arguments:
        da: an attribution, or a summary table.
        path, ax: where to save, and the axes to draw into (both optional).
        title: the figure's title (default: the method and model the attrs name).
        cmap: a matplotlib colormap or its name (default: diverging for signed values,
            sequential for non-negative ones).
        example: the example(s) of a batch to draw.
        dpi: the saved file's resolution.
        labels: a classifier's true labels, one per example, beside its rows.

    Returns:
        The matplotlib ``Figure`` drawn on: ``ax``'s root figure when ``ax`` is given (a
        summary table always gets a new one), else a new one made without pyplot (no pyplot
        figure to close).

    >>> import xarray as xr
    >>> fig = plot(xr.DataArray([[0.2, -0.7]], dims=("target", "source")))
    >>> len(fig.axes)  # heatmap + colorbar
    2
    """
    _check_title(title)
    if isinstance(dpi, bool) or not isinstance(dpi, numbers.Real) or not 0 < dpi < math.inf:
        raise OptionError(f"`dpi` must be a positive number, got {dpi!r}")
    if ax is not None and not hasattr(ax, "figure"):  # matplotlib's Axes: drawn into
        raise OptionError(f"`ax` must be a matplotlib Axes, got {type(ax).__name__}")
    target = figure_path(path)
    if type(da).__name__ == "DataFrame":  # an ax.summary table: metrics with their intervals
        from ._summary_plot import plot_summary

        fig = plot_summary(da, title=title)
        _save_figure(fig, target, dpi)
        return fig
    if is_route(da):  # ax.information_flow: each target's route, drawn as a graph
        if cmap is not None or labels is not None:
            raise OptionError("a route is drawn as a graph: `cmap` and `labels` do not apply")
        fig = plot_routes(
            da,
            examples=_example_positions(da, example),
            ax=ax,
            title=_default_title(da, title),
            family=_font_family(),
            readable=readable_token,
        )
        _save_figure(fig, target, dpi)
        return fig
    name = _default_title(_check_dims(da, rows=_is_rows(da)), title)
    if _is_rows(da):
        rows, scale = _prepare_rows(da, example, labels, cmap)
        fig = _plot_rows(rows, scale, ax, name)
        _save_figure(fig, target, dpi)
        return fig
    if labels is not None:
        raise OptionError(_LABELS_ONLY)
    panels, scale = _prepare(da, example, None, cmap)
    if ax is not None and len(panels) != 1:
        raise OptionError("`ax` holds one heatmap; pick one with `example=`")
    if ax is None:
        # ~1/3 inch per token, capped so that long texts stay a few thousand pixels wide.
        width = min(max(0.32 * max(len(p.source_labels) for p in panels) + 2.8, 4.0), 30.0)
        heights = [min(max(0.32 * len(p.target_labels) + 1.9, 2.5), 30.0) for p in panels]
        fig = Figure(figsize=(width, sum(heights)), layout="constrained")
        axes = list(fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0])
    else:
        fig = ax.figure.figure  # the root Figure, also when ``ax`` sits in a SubFigure
        axes = [ax]
    cm = scale.cmap.with_extremes(bad=_NAN_COLOUR)
    norm = colors.Normalize(vmin=scale.vmin, vmax=scale.vmax)
    family = _font_family()
    for a, panel in zip(axes, panels, strict=True):
        # inf is painted as the scale's end, as show paints it: imshow would mask it as NaN
        shown = np.nan_to_num(panel.values, nan=np.nan, posinf=scale.vmax, neginf=scale.vmin)
        image = a.imshow(
            np.ma.masked_invalid(shown),
            cmap=cm,
            norm=norm,
            aspect="auto",
            interpolation="nearest",
        )
        a.set_xticks(range(len(panel.source_labels)), panel.source_labels, rotation=90)
        a.set_yticks(range(len(panel.target_labels)), panel.target_labels)
        for label in [*a.get_xticklabels(), *a.get_yticklabels()]:
            label.set_fontfamily(family)
            label.set_parse_math(False)  # a token "$x_1$" is text, not a formula
        if panel.sides:
            for j in range(1, len(panel.sides)):
                if panel.sides[j] != panel.sides[j - 1]:
                    a.axvline(j - 0.5, color="#444444", linewidth=1.5)
        a.set_xlabel("source")
        a.set_ylabel("target")
        if panel.example is not None:
            a.set_title(f"example {panel.example}", fontsize=10)
        a.figure.colorbar(image, ax=a, shrink=0.9)
    if name:
        fig.suptitle(name)
    _save_figure(fig, target, dpi)
    return fig


def figure_path(path: PathLike | None) -> tuple[Path, str] | None:
    """``path`` checked before drawing, and the format its suffix names (none: matplotlib's
    default), which must be given to ``savefig`` since the file is first written under a temp
    name."""
    if path is None:
        return None
    from matplotlib import rcParams
    from matplotlib.backend_bases import FigureCanvasBase

    checked = output_path(path, "a.png")
    fmt = checked.suffix[1:].lower() or str(rcParams["savefig.format"])
    known = FigureCanvasBase.get_supported_filetypes()
    if fmt not in known:
        raise InputError(
            f"`path` {str(checked)!r}: matplotlib cannot write {fmt!r} files; end it in one of "
            + ", ".join(f".{k}" for k in sorted(known))
        )
    return checked, fmt


def _save_figure(fig: Figure, target: tuple[Path, str] | None, dpi: int) -> None:
    if target is None:
        return
    path, fmt = target
    with warnings.catch_warnings():
        # Emoji and some scripts have no glyph in any installed font; a box is drawn.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        write_atomically(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi))


def _plot_rows(rows: list[_Row], scale: _Scale, ax: Axes | None, name: str | None) -> Figure:
    """Each example's tokens as coloured boxes on one line, its labels as the line's tick label.

    Box widths follow the tokens' lengths in characters, so each line reads as text."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.patches import Rectangle

    lines = [[w for w, _ in r.words] for r in rows]
    widths = [sum(len(w) + 1 for w in line) for line in lines]
    longest = max(widths, default=1)
    if ax is None:
        size = (min(max(0.11 * longest + 4.5, 5.0), 30.0), min(0.45 * len(rows) + 1.4, 60.0))
        fig = Figure(figsize=size, layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure.figure
    backgrounds, family = [scale.paint(r.values) for r in rows], _font_family()
    for i, (row, line) in enumerate(zip(rows, lines, strict=True)):
        x, (fill, ink) = 0.0, backgrounds[i]
        for j, word in enumerate(line):
            nan = math.isnan(float(row.values[j]))
            ax.add_patch(
                Rectangle(
                    (x, i - 0.38), len(word) + 0.8, 0.76,
                    facecolor=_NAN_COLOUR if nan else fill[j], edgecolor="none",
                )
            )  # fmt: skip
            ax.text(
                x + 0.4, i, word, va="center", ha="left", fontsize=9,
                color="#000000" if nan else ink[j], fontfamily=family, parse_math=False,
            )  # fmt: skip
            x += len(word) + 1
    captions = [
        " · ".join(
            t if h == "example" else f"{h} {t}"
            for h, t in _row_caption(r)
            if not (h == "attributed" and t == r.predicted)
        )
        for r in rows
    ]
    ax.set_xlim(-0.5, longest + 0.5)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_yticks(range(len(rows)), captions, fontsize=9)
    for label in ax.get_yticklabels():
        label.set_parse_math(False)
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(left=False)
    mappable = ScalarMappable(colors.Normalize(scale.vmin, scale.vmax), scale.cmap)
    fig.colorbar(mappable, ax=ax, shrink=0.9, aspect=max(4, 8 * len(rows) // 3 + 2))
    if name:
        ax.set_title(name)
    return fig


# --- rich ---------------------------------------------------------------------------------


def table(
    da: xr.DataArray,
    *,
    console: Console | None = None,
    example: Examples = None,
    digits: int = 2,
    cmap: str | colors.Colormap | None = None,
) -> str | None:
    """Print ``da`` as a coloured terminal table (rows: target tokens, columns: source tokens).

    Prints on ``console`` (default: a new ``rich.console.Console`` on stdout). Returns the
    table as plain text when a ``console`` is passed (e.g. ``Console(record=True)`` or one
    writing to a file), and ``None`` otherwise so a REPL does not echo it a second time.
    Cells are coloured by value with the same map as :func:`show`; NaN shows as ``·``.

    >>> import io, xarray as xr
    >>> from rich.console import Console
    >>> da = xr.DataArray([[0.25, -0.5]], dims=("target", "source"))
    >>> text = table(da, console=Console(file=io.StringIO(), width=60))
    >>> "-0.50" in text
    True
    """
    from rich import box
    from rich.console import Console
    from rich.style import Style
    from rich.table import Table
    from rich.text import Text

    check.at_least(0)(digits, "digits")
    if console is not None and not isinstance(console, Console):
        raise OptionError(
            f"`console` must be a rich.console.Console (or None: stdout), got "
            f"{type(console).__name__}"
        )
    panels, scale = _prepare(da, example, None, cmap)
    name = _default_title(da, None)
    tables = []
    for panel in panels:
        caption = [name] if name else []
        if panel.example is not None:
            caption.append(f"example {panel.example}")
        t = Table(
            # a Text, not markup: a model or example named "[red]m" or "[/x]" is shown as it is
            title=Text(" · ".join(caption)) if caption else None,
            caption="rows: target · columns: source",
            box=box.SIMPLE_HEAD,
            padding=(0, 1),
            collapse_padding=True,
            pad_edge=False,
        )
        # Numbers keep their full width when the terminal is narrow; headers fold instead.
        t.add_column(
            "",
            no_wrap=True,
            min_width=max(map(len, panel.target_labels), default=1),
        )
        width = digits + 3 + bool(scale.signed)
        for label in panel.source_labels:
            t.add_column(
                Text(label, style="bold", overflow="fold"), justify="right", min_width=width
            )
        backgrounds, inks = scale.paint(panel.values)
        for i, label in enumerate(panel.target_labels):
            cells = [Text(label, style="bold")]
            for j, value in enumerate(panel.values[i]):
                if math.isnan(value):
                    cells.append(Text("·", style="dim"))
                    continue
                style = Style(color=inks[i, j], bgcolor=backgrounds[i, j])
                cells.append(Text(f"{value:.{digits}f}", style=style))
            t.add_row(*cells)
        tables.append(t)

    target = console if console is not None else Console()
    for t in tables:
        target.print(t)
    if console is None:
        return None
    plain = Console(file=_io.StringIO(), width=console.width, color_system=None)
    for t in tables:
        plain.print(t)
    return plain.file.getvalue()  # type: ignore[attr-defined]
