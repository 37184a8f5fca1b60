"""Parity arithmetic (numpy only): the aggregations both sides are compared after, and the gate.

Arrays are in the adapters' raw layout, ``[target, source, hidden]`` (attention:
``[target, source, layer, head]``), NaN where nothing is attributed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .workloads import PERTURBATION_METHODS

TOLERANCE = 1e-4
# below this fraction of the largest L1 norm over hidden, a sum over hidden is rounding noise
# (GPT-2 gradients: every path from the embeddings enters a LayerNorm, whose input gradient has
# zero mean), so its error is taken relative to that L1 scale instead
DEGENERATE_SUM = 1e-3


def _over_hidden(a: np.ndarray, reduce) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return np.where(~np.all(np.isnan(a), axis=-1), reduce(a), np.nan)


def _normalize(a: np.ndarray) -> np.ndarray:
    total = np.nansum(np.abs(a), axis=1, keepdims=True)  # L1 over source
    return a / np.where(total != 0, total, 1.0)


def aggregates(a: np.ndarray, method: str) -> dict[str, np.ndarray]:
    """``raw``, ``l2_normalize`` (L2 over hidden, normalized over source) and ``sum`` over hidden;
    attention: ``raw`` and ``head_mean_normalize`` (mean over heads, normalized over source).

    The same arithmetic as ``ax.pipe(ax.l2_norm, ax.normalize)``, ``ax.sum`` and
    ``ax.normalize(ax.mean(., "head"))``: NaN stays NaN. Perturbation methods (``[target,
    source]``): ``raw`` and ``normalize`` (over source).
    """
    if method == "attention":
        a = np.asarray(a, dtype=np.float64)
        return {"raw": a, "head_mean_normalize": _normalize(np.mean(a, axis=-1))}
    if method in PERTURBATION_METHODS:  # [target, source]: no hidden
        a = np.asarray(a, dtype=np.float64)
        return {"raw": a, "normalize": _normalize(a)}
    l2 = _over_hidden(a, lambda x: np.sqrt(np.nansum(np.square(x), axis=-1)))
    return {
        "raw": np.asarray(a),
        "l2_normalize": _normalize(l2),
        "sum": _over_hidden(a, lambda x: np.nansum(x, axis=-1)),
    }


def rel_err(a: np.ndarray, b: np.ndarray, scale: float | None = None) -> float:
    """``max|a - b| / max|b|`` over entries finite in both (``scale`` replaces ``max|b|``).

    Raises ValueError when the shapes or the NaN patterns differ: a different set of attributed
    (target, source) pairs is a parity failure in its own right.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: attrax {a.shape} vs baseline {b.shape}")
    if not np.array_equal(np.isnan(a), np.isnan(b)):
        raise ValueError(
            f"NaN patterns differ at {int(np.sum(np.isnan(a) != np.isnan(b)))} entries"
        )
    ok = ~np.isnan(a)
    if not ok.any():
        return 0.0
    diff = float(np.max(np.abs(a[ok] - b[ok])))
    denom = float(np.max(np.abs(b[ok]))) if scale is None else float(scale)
    return diff / denom if denom > 0 else diff


def parity(
    a: np.ndarray | dict[str, np.ndarray], b: np.ndarray, method: str, tol: float = TOLERANCE
) -> dict[str, Any]:
    """Compare attrax (raw array, or its aggregates) with a baseline's raw array ``b``.

    Returns ``{"errors": {aggregate: rel_err}, "ok", "notes", "failures"}``. Every aggregate must be
    within ``tol``, ``raw`` included (normalized aggregates cannot see a scale error). A
    cancellation-dominated ``sum`` (see ``DEGENERATE_SUM``) is judged against the L1 scale and its
    plain error kept as ``sum_plain`` (plus ``sum_over_l1``).
    """
    errors: dict[str, float] = {}
    notes: list[str] = []
    extra: dict[str, float] = {}
    try:
        agg_a = a if isinstance(a, dict) else aggregates(a, method)
        agg_b = aggregates(b, method)
        errors = {name: rel_err(agg_a[name], agg_b[name]) for name in agg_b}
        if "sum" in agg_b:
            l1 = _over_hidden(b, lambda x: np.nansum(np.abs(x), axis=-1))
            scale = float(np.nanmax(l1)) if np.isfinite(l1).any() else 0.0
            peak = float(np.nanmax(np.abs(agg_b["sum"]))) if scale else 0.0
            if scale and peak < DEGENERATE_SUM * scale:
                extra["sum_over_l1"] = peak / scale
                errors["sum_plain"] = errors["sum"]
                errors["sum"] = rel_err(agg_a["sum"], agg_b["sum"], scale=scale)
                notes.append(
                    f"sum over hidden is cancellation dominated (max|sum| = {peak:.2e}, max L1 "
                    f"over hidden = {scale:.2e}): its error is taken relative to the L1 scale"
                )
    except ValueError as error:
        return {"errors": errors, "ok": False, "notes": notes, "failures": [str(error)], **extra}
    failures = [
        f"{name}: relative error {err:.3e} > {tol:g}"
        for name, err in errors.items()
        if name != "sum_plain" and not err <= tol  # NaN fails too
    ]
    return {"errors": errors, "ok": not failures, "notes": notes, "failures": failures, **extra}


def first_targets(agg: dict[str, np.ndarray], k: int, n_source: int) -> dict[str, np.ndarray]:
    """The first ``k`` targets and ``n_source`` sources of each aggregate (W3 target subsets).

    Exact for decoder-only models: target j never attributes past its own position, so a shorter
    continuation gives the same rows, and normalizing over source is unaffected.
    """
    return {name: v[:k, :n_source] for name, v in agg.items()}
