"""GPU-only steps of the harness: a device smoke test, and attrax's options on W3 with a profile."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import workloads
from .adapters import attrax_attribute
from .workloads import Plan


def smoke(device: str) -> list[dict[str, Any]]:
    """Every public attrax method on tiny GPT-2 and Marian models, on the CPU and on ``device``:
    the two must agree within 1e-4 relative (1e-3 for the least-squares surrogates)."""
    import numpy as np
    import torch

    import attrax as ax
    from attrax.testing import tiny_model

    def calls(m, p, t):
        def sal():
            return ax.saliency(m, p, t)

        return {
            "saliency": sal,
            "input_x_gradient": lambda: ax.input_x_gradient(m, p, t),
            "integrated_gradients": lambda: ax.integrated_gradients(m, p, t, steps=8),
            "smoothgrad": lambda: ax.smoothgrad(m, p, t, samples=4),
            "attention": lambda: ax.attention(m, p, t),
            "rollout": lambda: ax.rollout(m, p, t),
            "step_scores": lambda: ax.step_scores(m, p, t, scores=("probability", "entropy")),
            "occlusion": lambda: ax.occlusion(m, p, t),
            "lime": lambda: ax.lime(m, p, t, samples=32),
            "kernel_shap": lambda: ax.kernel_shap(m, p, t, samples=32),
            "deletion": lambda: ax.deletion(m, ax.l2_norm(sal()), p, t),
            "comprehensiveness": lambda: ax.comprehensiveness(m, ax.l2_norm(sal()), p, t),
        }

    rows = []
    for arch, target in (("gpt2", " the mat"), ("marian", "the mat")):
        hf, tok = tiny_model(arch)
        got: dict[str, dict[str, Any]] = {}
        for dev in ("cpu", device):
            model = ax.load_model(hf.to(dev), tokenizer=tok)
            for name, fn in calls(model, "the cat sat on", target).items():
                try:
                    out = fn()
                    arr = out.to_array().values if hasattr(out, "to_array") else out.values
                    got.setdefault(name, {})[dev] = np.asarray(arr, dtype=np.float64)
                except Exception as err:  # recorded, the run goes on
                    got.setdefault(name, {})[dev] = f"{type(err).__name__}: {err}"
        for name, by_dev in got.items():
            a, b = by_dev.get("cpu"), by_dev.get(device)
            row: dict[str, Any] = {"model": arch, "method": name}
            if isinstance(a, str) or isinstance(b, str):
                row.update(ok=False, error=a if isinstance(a, str) else b)
            else:
                ok = ~np.isnan(a)
                same_nan = np.array_equal(ok, ~np.isnan(b))
                scale = float(np.max(np.abs(a[ok]))) if ok.any() else 1.0
                err = float(np.max(np.abs(a[ok] - b[ok]))) / (scale or 1.0) if ok.any() else 0.0
                tol = 1e-3 if name in ("lime", "kernel_shap") else 1e-4
                row.update(ok=bool(same_nan and err <= tol), rel_err=err, same_nan=same_nan)
            rows.append(row)
            mark = "ok " if row["ok"] else "FAIL"
            print(f"  smoke {mark} {arch:6s} {name:22s} {row.get('rel_err', row.get('error'))}")
        del hf
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def variants(device: str, plan: Plan, out_dir: Path) -> list[dict[str, Any]]:
    """attrax alone on W3 saliency: chunk sizes and attention kernels; a profile of one call.

    SDPA runs through attrax's vmap-aware op (``attrax._sdpa``); each row records how many
    fused attention backwards one call ran (``sdpa_backwards``: one per attention call and pass
    when every target shares it, ``targets`` times that when ``vmap`` falls back per target).
    """
    import torch

    import attrax as ax

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    rows: list[dict[str, Any]] = []
    for attn in ("eager", "sdpa"):
        hf, tok = workloads.load("gpt2", attn_implementation=attn)
        model = ax.load_model(hf.to(device), tokenizer=tok, attn_implementation=attn)
        prompt, target = workloads.texts("gpt2", tok, plan.n_prompt, plan.n_target)
        attrax_attribute(model, "a b c d", " e f", "saliency")  # warm-up
        for chunk in (16, 32, 64, None):
            times = []
            for _ in range(3):
                sync()
                t0 = time.perf_counter()
                attrax_attribute(model, prompt, target, "saliency", chunk_size=chunk)
                sync()
                times.append(time.perf_counter() - t0)
            row = dict(attn=attn, chunk_size=chunk, median_s=statistics.median(times))
            if attn == "sdpa":
                row["sdpa_backwards"] = _sdpa_backwards(
                    attrax_attribute, model, prompt, target, "saliency", chunk_size=chunk
                )
            rows.append(row)
            print(
                f"  variant W3 saliency {attn:5s} chunk_size={chunk}: {row['median_s']:.4f} s"
                + (f" ({row['sdpa_backwards']} SDPA backwards)" if attn == "sdpa" else "")
            )
            if chunk == 32 and device.startswith("cuda"):
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    attrax_attribute(model, prompt, target, "saliency", chunk_size=chunk)
                    sync()
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
                table += "\n" + prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
                name = "profile-w3-saliency" + ("-sdpa" if attn == "sdpa" else "") + ".txt"
                (out_dir / name).write_text(table)
        del model, hf
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def fastest(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The quickest of :func:`variants`' rows: the attention and ``chunk_size`` W3 then runs."""
    return min(rows, key=lambda row: row["median_s"])


def _sdpa_backwards(call: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """How many fused SDPA backward kernels (any backend) ``call(*args, **kwargs)`` ran."""
    from torch.utils._python_dispatch import TorchDispatchMode

    names: list[str] = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in func.name() and func.name().endswith("_backward"):
                names.append(func.name())
            return func(*args, **(kwargs or {}))

    with Count():
        call(*args, **kwargs)
    return len(names)
