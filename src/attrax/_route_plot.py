"""``ax.plot`` of information flow routes: each target's route drawn as a graph over the model's
positions (x) and layers (y), as Ferrando & Voita's figures and the LM Transparency Tool show it.

Each layer ``l`` is two rows of nodes: the block's input at ``y = 2l`` (the embeddings at 0) and
the stream after its attention at ``2l + 1``; its output is the next block's input at
``2l + 2``. An attention edge runs from ``(source, 2l)`` to ``(query, 2l + 1)``, the residual's
edge around the MLP straight up to ``(query, 2l + 2)``, and the MLP's through its node beside it,
at ``(query + 0.35, 2l + 1.5)``. Blocks that run attention and MLP side by side have no stream
between them: their attention edges go to ``(query, 2l + 2)``, their MLP's from
``(query, 2l)`` through ``(query + 0.35, 2l + 1)``. Line widths grow with the weights; only the
route's edges (above 0) are drawn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from ._errors import InputError, OptionError

#: the dims of one target's route (``ax.information_flow``'s result has ``target`` too, and
#: ``head`` with ``per_head=True``)
ROUTE_DIMS = ("layer", "query", "source")
_COLOURS = {"attention": "#1f5fa8", "residual": "#8a8a8a", "MLP": "#d9730d"}
_MLP_OFFSET = 0.35  # the MLP's node, right of its position


def is_route(da: object) -> bool:
    """Whether ``da`` is information flow routes (``ax.information_flow``'s dims and coords, a
    target selected or not)."""
    return (
        isinstance(da, xr.DataArray)
        and set(ROUTE_DIMS) <= set(map(str, da.dims))
        and all(name in da.coords for name in ("mlp", "mlp_residual"))
    )


def plot_routes(
    da: xr.DataArray,
    *,
    examples: list[int | None] | None = None,
    ax: Any = None,
    title: str | None = None,
    family: list[str] | None = None,
    readable: Callable[[str], str] = str,
) -> Figure:
    """Each target's route in ``da`` (``ax.information_flow``'s result) as a graph: one panel per
    target (and example of a batch: ``examples`` picks them by position, default all), its
    tokens shown by ``readable`` in the fonts ``family``.

    >>> import attrax as ax
    >>> flow = ax.information_flow(ax.load_model(), "1 2 3 =", " 3 2")
    >>> len(plot_routes(flow).axes)  # a panel per target
    2
    """
    panels = _panels(da, examples, readable)
    if ax is not None and len(panels) != 1:
        raise OptionError(
            "`ax` holds one route; pick one target with da.sel(target=...) (and `example=`)"
        )
    if ax is None:
        widest = max(one.sizes["query"] for _, one in panels)
        layers = da.sizes["layer"]
        width = min(max(0.55 * widest + 2.0, 4.0), 30.0)
        height = min(max(0.55 * layers + 1.6, 2.6), 12.0)
        fig = Figure(figsize=(width, height * len(panels)), layout="constrained")
        axes = list(fig.subplots(len(panels), 1, squeeze=False)[:, 0])
    else:
        fig = ax.figure.figure
        axes = [ax]
    for a, (name, one) in zip(axes, panels, strict=True):
        _draw(a, one, family, readable)
        a.set_title(name, fontsize=10, parse_math=False)  # a token "$x$" is text
    if title:
        fig.suptitle(title, parse_math=False)
    return fig


def _panels(
    da: xr.DataArray, examples: list[int | None] | None, readable: Callable[[str], str]
) -> list[tuple[str, xr.DataArray]]:
    """``(title, route)`` per target (and example) that ``da`` holds, each ``(layer, query,
    source)`` cut to the positions its target sees."""
    per_head = "per_head" in da.coords and bool(da["per_head"].any())
    if per_head and "head" not in da.dims:
        raise OptionError(
            "`da` is a per_head=True result without its 'head' dim: its heads' parts and the "
            "residual's make each edge; draw it with the head dim, or compute it with "
            "per_head=False"
        )
    if "head" in da.dims:  # per_head: the heads' parts and the residual's make the edge
        eye = xr.DataArray(np.eye(da.sizes["query"]), dims=("query", "source"))
        da = da.sum("head", skipna=False) + (da.attention_residual * eye).fillna(0)
    if "target" not in da.dims:  # one target selected: .sel(target=...)
        da = da.expand_dims("target")
    da = da.transpose(..., "target", *ROUTE_DIMS)  # the order the drawing reads
    layers = da["layer"].values
    if len(layers) and not (np.diff(layers) == 1).all():
        raise OptionError(
            f"`da` holds layers {layers.tolist()}: a route is drawn through consecutive layers; "
            "select a run of them, e.g. da.isel(layer=slice(2, 6))"
        )
    if "example" in da.dims:
        chosen = range(da.sizes["example"]) if examples is None else examples
        picked = [da.isel(example=e) for e in chosen if e is not None]
    else:
        picked = [da]
    panels = []
    for one in picked:
        prefix = f"example {int(one['example'])}, " if "example" in one.coords else ""
        for target in one["target"].values:
            route = one.sel(target=target)
            seen = ~np.isnan(route.values).all(axis=(0, 2))  # the queries it sees
            if not seen.any():  # a target this example does not have
                continue
            route = route.isel(query=np.flatnonzero(seen), source=np.flatnonzero(seen))
            token = route.coords.get("target_token")
            named = f" {readable(str(token.item()))!r}" if token is not None else ""
            panels.append((f"{prefix}target {target}{named}", route))
    if not panels:
        raise InputError("`da` holds no route to draw: every target's edges are NaN")
    return panels


def _draw(
    a: Any, route: xr.DataArray, family: list[str] | None, readable: Callable[[str], str]
) -> None:
    """One target's route ``(layer, query, source)`` into axes ``a``."""
    layers, width = route.sizes["layer"], route.sizes["query"]
    flow = np.nan_to_num(route.values)
    mlp = np.nan_to_num(route.mlp.values)
    around = np.nan_to_num(route.mlp_residual.values)
    segments: dict[str, list[Any]] = {kind: [] for kind in _COLOURS}
    weights: dict[str, list[float]] = {kind: [] for kind in _COLOURS}

    def edge(kind: str, *points: tuple[float, float], weight: float) -> None:
        segments[kind].append(points)
        weights[kind].append(weight)

    # side by side blocks: attention, residual and MLP all read the input, enter the output
    parallel = "parallel" in route.coords and bool(route["parallel"])
    for layer in range(layers):
        low, mid, high = 2 * layer, 2 * layer + 1, 2 * layer + 2
        into = high if parallel else mid
        for i, j in zip(*np.nonzero(flow[layer] > 0), strict=True):
            kind = "residual" if i == j else "attention"
            edge(kind, (float(j), low), (float(i), into), weight=flow[layer, i, j])
        start = low if parallel else mid
        for i in map(float, np.flatnonzero(mlp[layer] > 0)):
            node = (i + _MLP_OFFSET, (start + high) / 2)
            edge("MLP", (i, start), node, (i, high), weight=mlp[layer, int(i)])
        for i in map(float, np.flatnonzero(around[layer] > 0)):
            edge("residual", (i, mid), (i, high), weight=around[layer, int(i)])
    for kind, lines in segments.items():
        if lines:
            widths = 0.6 + 4.0 * np.asarray(weights[kind])
            a.add_collection(
                LineCollection(
                    lines, linewidths=widths, colors=_COLOURS[kind], alpha=0.8, label=kind
                )
            )
    rows = 2 if parallel else 1  # side by side blocks: no node between attention and MLP
    grid = np.mgrid[0:width, 0 : 2 * layers + 1 : rows].reshape(2, -1)  # every node, faint
    a.scatter(grid[0], grid[1], s=4, color="#d0d0d0", zorder=1)
    ends = [point for lines in segments.values() for line in lines for point in line]
    if ends:  # the nodes on the route
        xs, ys = zip(*ends, strict=True)
        a.scatter(xs, ys, s=12, color="#222222", zorder=3)
    a.set_xlim(-0.6, width - 0.4)
    a.set_ylim(-0.6, 2 * layers + 0.6)
    tokens = route.coords.get("query_token")
    labels = [readable(str(t)) for t in tokens.values] if tokens is not None else []
    a.set_xticks(range(width), labels or [str(q) for q in route["query"].values], rotation=90)
    for label in a.get_xticklabels():
        if family:
            label.set_fontfamily(family)
        label.set_parse_math(False)  # a token "$x_1$" is text, not a formula
    # row 2k: the output of the k-th layer drawn below it (row 0: the first one's input)
    drawn = [int(v) for v in route["layer"].values]
    below = "embeddings" if drawn[0] == 0 else f"layer {drawn[0] - 1}"
    a.set_yticks(range(0, 2 * layers + 1, 2), [below, *(f"layer {i}" for i in drawn)])
    a.set_ylabel("block output")
    if any(segments.values()):
        a.legend(loc="upper left", fontsize=8, frameon=False)


__all__ = ["is_route", "plot_routes"]
