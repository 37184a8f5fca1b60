"""``ax.plot`` of an ``ax.summary`` table: one panel per metric, each method's mean and interval."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ._errors import InputError

STATS = ("mean", "low", "high")


def plot_summary(table: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Draw a method x metric table (:func:`attrax.summary`): a panel per metric, a row per
    method, a dot at the mean and a bar over the confidence interval; better is marked.

    >>> import pandas as pd
    >>> columns = pd.MultiIndex.from_product([["sufficiency"], ["mean", "low", "high"]])
    >>> table = pd.DataFrame([[0.2, 0.1, 0.3], [0.4, 0.3, 0.5]], ["ig", "occlusion"], columns)
    >>> len(plot_summary(table).axes)
    1
    """
    from ._names import HIGHER_IS_BETTER

    columns = table.columns
    if (
        not isinstance(table, pd.DataFrame)
        or not isinstance(columns, pd.MultiIndex)
        or columns.nlevels != 2
        or not set(STATS) <= set(columns.get_level_values(1))
    ):
        raise InputError(
            "`da` as a table must be what ax.summary returns: columns (metric, mean/low/high)"
        )
    metrics = list(dict.fromkeys(columns.get_level_values(0)))
    methods = [str(m) for m in table.index]
    y = np.arange(len(methods))
    width = min(3.2 * len(metrics) + 1.5, 30.0)
    fig = Figure(figsize=(width, 0.45 * len(methods) + 1.6), layout="constrained")
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    for a, metric in zip(axes, metrics, strict=True):
        mean, low, high = (table[(metric, s)].to_numpy(dtype=float) for s in STATS)
        # a bootstrap interval need not hold the sample mean (a narrow one, few examples):
        # the bar then stops at the mean on that side
        spread = np.stack([mean - low, high - mean]).clip(min=0)
        a.errorbar(mean, y, xerr=np.nan_to_num(spread), fmt="o", color="#1f5fa8", capsize=3)
        better: Any = HIGHER_IS_BETTER.get(metric)
        arrow = "" if better is None else (" (higher better)" if better else " (lower better)")
        a.set_title(metric + arrow, fontsize=10)
        a.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, methods)
    axes[0].set_ylim(len(methods) - 0.5, -0.5)  # the table's first method on top
    if title:
        fig.suptitle(title)
    return fig
