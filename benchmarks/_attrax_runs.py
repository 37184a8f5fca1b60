"""attrax runners and the parity arithmetic of the benchmark harness (``benchmarks/run.py``).

Runners return the same raw layout as ``_baselines.py``: ``[n_target, n_source, hidden]``
(``[n_target, n_source, layer, head]`` for attention), float32, NaN where nothing is attributed.

The parity helpers (``aggregates``, ``parity``) only need numpy, so the harness smoke test can run
them without Captum or Inseq installed.

Conventions used to make attrax compute *the same quantity* as the baselines:

* objective: the probability of the target token (Inseq's default; Captum's forward returns it);
* saliency: ``abs=False`` on all three sides (signed gradient, the stricter comparison; Captum's
  and Inseq's own default is ``abs=True``);
* integrated gradients: ``steps=50``, ``method="gausslegendre"`` (Captum's and Inseq's default
  quadrature) and Inseq's baseline, built as a tensor: the embedding of ``unk_token_id`` at every
  position except EOS tokens, which keep the EOS embedding. Captum is run with the same baseline
  (``captum_attribute(..., baseline="inseq")``). On the GPT-2 workload unk = eos = id 0, so the
  tensor equals ``baseline="unk"``;
* attention: the attention of the query that predicts each target (position t-1), every layer and
  head, which is what Inseq's ``"attention"`` method stores before aggregation.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

TOLERANCE = 1e-4
# a sum over hidden is "cancellation dominated" when its largest magnitude is below this fraction of
# the largest L1 norm over hidden (e.g. GPT-2 gradients: every path from the embeddings enters a
# LayerNorm, whose input gradient has zero mean, so the sum over hidden is exactly 0 in real
# arithmetic and float rounding noise in practice)
DEGENERATE_SUM = 1e-3


# --------------------------------------------------------------------------------------------------
# Parity arithmetic (numpy only)
# --------------------------------------------------------------------------------------------------
def l2_normalized(a: np.ndarray) -> np.ndarray:
    """``[target, source, hidden]`` -> L2 norm over hidden, then divided by the L1 over source.

    The same arithmetic as ``ax.pipe(ax.l2_norm, ax.normalize)``: NaN stays NaN.
    """
    a = np.asarray(a, dtype=np.float64)
    present = ~np.all(np.isnan(a), axis=-1)
    l2 = np.where(present, np.sqrt(np.nansum(np.square(a), axis=-1)), np.nan)
    total = np.nansum(np.abs(l2), axis=1, keepdims=True)
    return l2 / np.where(total != 0, total, 1.0)


def hidden_sum(a: np.ndarray) -> np.ndarray:
    """``[target, source, hidden]`` -> sum over hidden (NaN stays NaN)."""
    a = np.asarray(a, dtype=np.float64)
    present = ~np.all(np.isnan(a), axis=-1)
    return np.where(present, np.nansum(a, axis=-1), np.nan)


def hidden_l1(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    present = ~np.all(np.isnan(a), axis=-1)
    return np.where(present, np.nansum(np.abs(a), axis=-1), np.nan)


def aggregates(a: np.ndarray, method: str) -> dict[str, np.ndarray]:
    """The aggregates parity is checked on.

    Gradient methods: ``raw``, ``l2_normalize`` (L2 over hidden, normalized over source) and
    ``sum`` (sum over hidden). Attention has no hidden dim: ``raw`` and ``head_mean_normalize``
    (mean over heads, normalized over source, per layer).
    """
    if method == "attention":
        a = np.asarray(a, dtype=np.float64)
        m = np.mean(a, axis=-1)  # [target, source, layer]
        total = np.nansum(np.abs(m), axis=1, keepdims=True)
        return {"raw": a, "head_mean_normalize": m / np.where(total != 0, total, 1.0)}
    return {"raw": np.asarray(a), "l2_normalize": l2_normalized(a), "sum": hidden_sum(a)}


def rel_err(a: np.ndarray, b: np.ndarray, scale: float | None = None) -> float:
    """``max|a - b| / max|b|`` over entries finite in both (``scale`` replaces ``max|b|``).

    Raises ValueError if the shapes or the NaN patterns differ: a different set of attributed
    (target, source) pairs is a parity failure in its own right.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: attrax {a.shape} vs baseline {b.shape}")
    if not np.array_equal(np.isnan(a), np.isnan(b)):
        n = int(np.sum(np.isnan(a) != np.isnan(b)))
        raise ValueError(f"NaN patterns differ at {n} entries")
    ok = ~np.isnan(a)
    if not ok.any():
        return 0.0
    diff = float(np.max(np.abs(a[ok] - b[ok])))
    denom = float(np.max(np.abs(b[ok]))) if scale is None else float(scale)
    return diff / denom if denom > 0 else diff


def parity(
    a: np.ndarray | dict[str, np.ndarray],
    b: np.ndarray,
    method: str,
    tol: float = TOLERANCE,
) -> dict[str, Any]:
    """Compare attrax with a baseline ``b`` (raw layout) after each aggregation.

    ``a`` is attrax's raw array, or its aggregates already computed (``attrax_aggregates``: with
    attrax's own reductions). Returns ``{"errors": {name: rel_err}, "ok": bool, "notes": [...],
    "failures": [...]}``. The gate is every aggregate within ``tol``, ``raw`` (no aggregation)
    included: normalized aggregates cannot see a scale error, and attention has no sum. ``sum`` over
    hidden is judged relative to the largest L1 norm over hidden when
    the baseline's sums are cancellation dominated (see ``DEGENERATE_SUM``); the plain relative
    error is then still reported, as ``sum_plain``.
    """
    errors: dict[str, float] = {}
    notes: list[str] = []
    failures: list[str] = []
    extra: dict[str, float] = {}
    try:
        agg_a = a if isinstance(a, dict) else aggregates(a, method)
        agg_b = aggregates(b, method)
        for name in agg_b:
            errors[name] = rel_err(agg_a[name], agg_b[name])
        if "sum" in agg_b:
            l1 = hidden_l1(b)
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
        failures.append(str(error))
        return {"errors": errors, "ok": False, "notes": notes, "failures": failures, **extra}
    for name, err in errors.items():
        if name == "sum_plain":
            continue
        if not err <= tol:  # NaN fails too
            failures.append(f"{name}: relative error {err:.3e} > {tol:g}")
    return {"errors": errors, "ok": not failures, "notes": notes, "failures": failures, **extra}


def first_targets(agg: dict[str, np.ndarray], k: int, n_source: int) -> dict[str, np.ndarray]:
    """The first ``k`` targets and ``n_source`` sources of each aggregate (W3 target subsets).

    Exact for decoder-only models: target j never attributes to sources past its own position, so
    a shorter continuation gives the same rows, and normalizing over source is unaffected.
    """
    return {name: v[:k, :n_source] for name, v in agg.items()}


# --------------------------------------------------------------------------------------------------
# attrax runners
# --------------------------------------------------------------------------------------------------
def inseq_baseline(model, prompt: str, target: str):
    """Inseq 0.7's IG baseline as an attrax baseline tensor ``[1, L, H]`` (source side).

    Every token -> ``unk_token_id`` (Inseq falls back to pad, then EOS), EOS tokens kept; embedded
    with ``model.embed`` (embedding-table rows: attrax applies any embedding scale itself).
    """
    import torch

    from attrax._inputs import prepare, to_tensors  # internal, but only to read the token ids

    tensors = to_tensors(prepare(model, prompt, target), model)
    ids = tensors.ids
    tok = model.tokenizer
    eos = model.eos_token_id
    unk = tok.unk_token_id
    if unk is None:
        unk = tok.pad_token_id if tok.pad_token_id is not None else model.hf.config.pad_token_id
    if unk is None:
        unk = eos
    base_ids = torch.where(ids == eos, torch.full_like(ids, eos), torch.full_like(ids, unk))
    with torch.no_grad():
        return model.embed(base_ids, "source").detach()


def attrax_attribute(
    model,
    prompt: str,
    target: str,
    method: str,
    *,
    n_steps: int = 50,
    ig_method: str = "gausslegendre",
    chunk_size: int | None = None,
    batch_size: int | None = None,
    abs: bool = False,
) -> dict[str, Any]:
    """Run one attrax method on one (prompt, target) pair.

    ``model`` is an ``attrax.Model``. Returns ``{"attributions", "seconds", "aggregates", "dims"}``;
    ``seconds`` covers the public call only (tokenizing, the attribution, labelling). For IG the
    baseline tensor is built before the clock starts (a user builds it once).
    """
    import attrax as ax

    kwargs: dict[str, Any] = {}
    if method == "saliency":
        fn = ax.saliency
        kwargs.update(abs=abs, chunk_size=chunk_size)
    elif method == "input_x_gradient":
        fn = ax.input_x_gradient
        kwargs.update(chunk_size=chunk_size)
    elif method == "integrated_gradients":
        fn = ax.integrated_gradients
        kwargs.update(
            steps=n_steps,
            method=ig_method,
            baseline=inseq_baseline(model, prompt, target),
            chunk_size=chunk_size,
            batch_size=batch_size,
        )
    elif method == "attention":
        fn = ax.attention
    else:
        raise ValueError(f"unknown method {method!r}")
    t0 = time.perf_counter()
    da = fn(model, prompt, target, **kwargs)
    seconds = time.perf_counter() - t0
    return {"dataarray": da, "attributions": da.values, "seconds": seconds, "dims": da.dims}


def attrax_aggregates(da, method: str) -> dict[str, np.ndarray]:
    """The parity aggregates computed with attrax's own reductions (checks those too)."""
    import attrax as ax

    if method == "attention":
        mean = ax.mean(da, "head")
        return {"raw": da.values, "head_mean_normalize": ax.normalize(mean).values}
    return {
        "raw": da.values,
        "l2_normalize": ax.pipe(ax.l2_norm, ax.normalize)(da).values,
        "sum": ax.sum(da).values,
    }
