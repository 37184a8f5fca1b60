"""Look at attrax arrays: a self-contained HTML heatmap, a matplotlib figure, a terminal table.

All three take a ``(target, source)`` array, or ``(example, target, source)`` for a batch (one
table per example, padding dropped). Signed values get a diverging colour map centred on 0,
non-negative ones a sequential map; NaN (nothing attributed) is left blank/grey. One colour
scale is shared by every example shown, so examples compare at a glance.
"""

from __future__ import annotations

import functools
import html
import io as _io
import math
import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr
from matplotlib import colormaps, colors
from matplotlib.figure import Figure

from ._errors import InputError, OptionError
from ._schema import drop_padding

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from rich.console import Console

__all__ = ["HTML", "plot", "readable_token", "show", "table"]

Scores = xr.DataArray | xr.Dataset | Mapping[str, xr.DataArray]
Examples = int | Sequence[int] | None
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
    valid UTF-8; SentencePiece ``▁`` becomes ``␣``; anything else is kept as is.

    >>> readable_token("Ġcaf\\u00c3\\u00a9"), readable_token("▁Straße"), readable_token("Ċ")
    ('␣café', '␣Straße', '↵')
    >>> readable_token("Ġcafé")  # not valid byte-level BPE, but Ġ still marks a space
    '␣café'

    """
    decoder = _byte_decoder()
    text = token
    if token and all(ch in decoder for ch in token):
        try:
            text = bytes(decoder[ch] for ch in token).decode("utf-8")
        except UnicodeDecodeError:
            # A partial UTF-8 sequence, or not byte-level BPE at all: mark whitespace only.
            text = token.replace("Ġ", " ").replace("Ċ", "\n").replace("ĉ", "\t")
    text = text.replace("▁", " ")
    return text.replace(" ", _SPACE).replace("\n", _NEWLINE).replace("\t", _TAB)


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
        return np.clip((values - self.vmin) / (self.vmax - self.vmin), 0.0, 1.0)

    def paint(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Background and readable text colours (hex strings) for every value at once."""
        rgb = self.cmap(self.norm(values))[..., :3]
        ints = np.round(rgb * 255).astype(int)
        hexes = np.array(
            [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in ints.reshape(-1, 3).tolist()], dtype=object
        ).reshape(values.shape)
        light = rgb @ np.array([0.299, 0.587, 0.114]) > 0.55
        return hexes, np.where(light, "#000000", "#ffffff")


def _check_dims(da: object) -> xr.DataArray:
    if not isinstance(da, xr.DataArray):
        raise InputError(f"`da` must be an xarray.DataArray, got {type(da).__name__}")
    dims = tuple(str(d) for d in da.dims)
    if "hidden" in dims:
        raise InputError(
            f"`da` has dims {dims}: reduce 'hidden' to one value per (target, source) first,"
            " e.g. ax.l2_norm(da) or ax.sum(da)"
        )
    missing = [d for d in ("target", "source") if d not in dims]
    extra = [d for d in dims if d not in ("example", "target", "source")]
    if missing or extra:
        hint = (
            f" Select or reduce {tuple(extra)} first, e.g. da.mean({extra[0]!r})" if extra else ""
        )
        raise InputError(
            f"`da` must have dims ('target', 'source'), optionally with 'example'; got {dims}.{hint}"
        )
    return da


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
    token = f"{dim}_token"
    if token in da.coords and da[token].dims == (dim,):
        labels = [readable_token(str(t)) for t in da[token].values.tolist()]
    else:
        labels = where
    return labels, where


def _scores_dict(scores: Scores | None) -> dict[str, xr.DataArray]:
    if scores is None:
        return {}
    if isinstance(scores, xr.DataArray):
        items: dict[str, Any] = {str(scores.name) if scores.name is not None else "score": scores}
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


def _score_column(score: xr.DataArray, panel_da: xr.DataArray, example: int | None) -> np.ndarray:
    if "example" in score.dims:
        if example is None:
            raise InputError("`scores` has an 'example' dim but `da` does not")
        score = score.isel(example=example)
    if "target" in score.indexes and "target" in panel_da.indexes:
        score = score.reindex(target=panel_da.indexes["target"])
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
    elif isinstance(example, int | np.integer | str):
        chosen = [example]
    else:
        chosen = list(example)
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
                example=None if e is None else da["example"].values[e].item(),
                scores={k: _score_column(v, sub, e) for k, v in score_items.items()},
            )
        )
    return panels, _scale(panels, cmap)


def _scale(panels: list[_Panel], cmap: str | colors.Colormap | None) -> _Scale:
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


def _default_title(da: xr.DataArray, title: str | None) -> str | None:
    if title is not None:
        return title
    parts = [str(da.attrs[k]) for k in ("method", "model") if k in da.attrs]
    return " · ".join(parts) or None


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
        """Write the standalone page (UTF-8) to ``path`` and return it."""
        path = Path(path).expanduser()
        if path.is_dir():
            raise InputError(f"`path` {str(path)!r} is a directory; give a file name like 'a.html'")
        path.write_text(str(self), encoding="utf-8")
        return path


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
            text = f"{value:.2f}" if annotate else ""
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
    da: xr.DataArray,
    *,
    path: PathLike | None = None,
    scores: Scores | None = None,
    title: str | None = None,
    cmap: str | colors.Colormap | None = None,
    example: Examples = None,
    annotate: bool = False,
) -> HTML:
    """Render ``da`` as an HTML heatmap table: target tokens down, source tokens across.

    Hover a cell for its value. ``scores`` (a DataArray with a ``target`` dim, or a Dataset /
    dict of them, e.g. step probabilities) are added as extra columns. ``cmap`` defaults to
    ``"RdBu_r"`` centred on 0 for signed values, ``"Reds"`` otherwise. ``example`` picks
    positions along ``example`` (default: all, one table each). ``annotate`` prints values in
    the cells. The page is also written to ``path`` when given.

    >>> import xarray as xr
    >>> da = xr.DataArray([[0.2, -0.7]], dims=("target", "source"),
    ...                   coords={"source_token": ("source", ["Ġa", "Ġb"])})
    >>> "␣b" in show(da)._repr_html_()
    True
    """
    panels, scale = _prepare(da, example, scores, cmap)
    name = _default_title(da, title)
    parts = [f'<div class="attrax-viz">\n<style>{_CSS}</style>']
    if name:
        parts.append(f'<div class="ax-title">{_esc(name)}</div>')
    parts += [_panel_html(p, scale, annotate) for p in panels]
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
) -> Figure:
    """Draw ``da`` as a matplotlib heatmap with token tick labels and a colorbar.

    One axes per example for a batch (or pass ``example=``); draws into ``ax`` when given
    (one example only). Saves a PNG (or any format matplotlib knows from the suffix) to
    ``path`` when given. Uses no pyplot state and needs no display.

    >>> import xarray as xr
    >>> fig = plot(xr.DataArray([[0.2, -0.7]], dims=("target", "source")))
    >>> len(fig.axes)  # heatmap + colorbar
    2
    """
    panels, scale = _prepare(da, example, None, cmap)
    name = _default_title(da, title)
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
        image = a.imshow(
            np.ma.masked_invalid(panel.values),
            cmap=cm,
            norm=norm,
            aspect="auto",
            interpolation="nearest",
        )
        a.set_xticks(range(len(panel.source_labels)), panel.source_labels, rotation=90)
        a.set_yticks(range(len(panel.target_labels)), panel.target_labels)
        for label in [*a.get_xticklabels(), *a.get_yticklabels()]:
            label.set_fontfamily(family)
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
    if path is not None:
        with warnings.catch_warnings():
            # Emoji and some scripts have no glyph in any installed font; a box is drawn.
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            fig.savefig(Path(path).expanduser(), dpi=dpi)
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

    panels, scale = _prepare(da, example, None, cmap)
    name = _default_title(da, None)
    tables = []
    for panel in panels:
        caption = [name] if name else []
        if panel.example is not None:
            caption.append(f"example {panel.example}")
        t = Table(
            title=" · ".join(caption) or None,
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
