"""Smoke test of the benchmark harness's parity arithmetic and report rendering.

Needs neither Captum nor Inseq (the harness's baselines): it checks the numpy parity code against
attrax's own reductions on the tiny default model, and that the docs render from a results dict.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _module(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    key = f"attrax_benchmarks_{name.lstrip('_')}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
    if spec is None or spec.loader is None:
        pytest.skip(f"benchmarks/{name}.py not found")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs():
    return _module("_attrax_runs")


def _future_nan(a: np.ndarray, first: int) -> np.ndarray:
    a = a.copy()
    for j in range(a.shape[0]):
        a[j, first + j :] = np.nan
    return a


def test_parity_accepts_equal_and_rejects_different(runs):
    rng = np.random.default_rng(0)
    b = _future_nan(rng.normal(size=(3, 7, 5)).astype(np.float32), 4)
    same = runs.parity(b.copy(), b, "saliency")
    assert same["ok"] and same["errors"]["l2_normalize"] == 0.0
    off = b * np.float32(1 + 1e-3)
    bad = runs.parity(off, b, "saliency")
    assert not bad["ok"] and any("sum" in f for f in bad["failures"])
    att = np.abs(b)
    assert not runs.parity(att * np.float32(1.01), att, "attention")["ok"]  # raw sees a scale error
    holes = b.copy()
    holes[0, 0] = np.nan
    assert not runs.parity(holes, b, "saliency")["ok"]  # different NaN pattern


def test_parity_sum_cancellation_uses_l1_scale(runs):
    rng = np.random.default_rng(1)
    b = rng.normal(size=(2, 4, 6))
    b -= b.mean(-1, keepdims=True)  # sums over hidden are rounding noise, as for GPT-2 gradients
    a = b + rng.normal(size=b.shape) * 1e-9
    res = runs.parity(a, b, "saliency")
    assert res["ok"], res
    assert "sum_plain" in res["errors"] and res["errors"]["sum"] < 1e-6


def test_attrax_aggregates_match_numpy(runs, default_model):
    model = default_model
    for method in ("saliency", "integrated_gradients", "attention"):
        out = runs.attrax_attribute(model, "1 2 3 =", " 3 2 1", method, n_steps=4)
        mine = runs.attrax_aggregates(out["dataarray"], method)
        res = runs.parity(mine, out["attributions"], method)
        assert res["ok"], (method, res)
        assert max(v for k, v in res["errors"].items() if k != "sum_plain") < 1e-6


def test_inseq_baseline_is_unk_with_eos_kept(runs, default_model):
    model = default_model
    base = runs.inseq_baseline(model, "1 2 3 =", " 3 2 1")
    unk = model.tokenizer.unk_token_id
    if unk is None:
        pytest.skip("the default model's tokenizer has no unk token")
    row = model.embed(torch.tensor([[unk]]))[0, 0]
    assert base.shape[-1] == model.hidden_size
    eos = model.eos_token_id
    assert np.allclose(base[0, 0].numpy(), row.detach().numpy())
    if eos is not None:
        eos_row = model.embed(torch.tensor([[eos]]))[0, 0].detach().numpy()
        for position in range(base.shape[1]):
            got = base[0, position].numpy()
            assert np.allclose(got, row.detach().numpy()) or np.allclose(got, eos_row)


def test_docs_render_from_results(tmp_path):
    bench = _module("run")
    plot = _module("plot")
    plan = bench.plans(quick=True)
    runs_ = []
    for wl in ("W1", "W3"):
        for lib, t in (("attrax", 0.1), ("captum", 1.5), ("inseq", 1.2)):
            k = 2 if (wl == "W3" and lib != "attrax") else 8
            runs_.append(
                dict(
                    workload=wl,
                    method="saliency",
                    library=lib,
                    times=[t],
                    median_s=t,
                    targets_run=k,
                    n_target=8,
                    scale=8 / k,
                    rss_peak_mb=500.0,
                    rss_attribution_mb=20.0,
                    rss_setup_mb=480.0,
                    load1_before=0.5,
                    foreign_cores=0.1,
                )
            )
    results = {
        "meta": {
            "command": "python benchmarks/run.py --quick",
            "started": "t0",
            "finished": "t1",
            "threads": 2,
            "repeats": 1,
            "budget_s": 300.0,
            "quick": True,
            "tolerance": 1e-4,
            "ig": {"steps": [16], "method": "gausslegendre", "baseline": "inseq"},
            "machine": {
                "cpu": "cpu",
                "cores": 2,
                "memory_gb": 8,
                "platform": "linux",
                "python": "3",
            },
            "versions": dict.fromkeys(
                ("attrax", "torch", "transformers", "captum", "inseq", "numpy", "xarray"), "x"
            ),
            "load_start": [0.5, 0.5, 0.5],
            "load_end": [0.6, 0.5, 0.5],
            "plans": {w: bench.dataclasses.asdict(plan[w]) for w in ("W1", "W3")},
        },
        "status": "ok",
        "gate": [],
        "runs": runs_,
        "parity": [
            dict(
                workload="W1",
                method="saliency",
                baseline="captum",
                targets_compared=8,
                errors={"raw": 1e-7, "l2_normalize": 1e-7, "sum": 1e-8, "sum_plain": 2.0},
                sum_over_l1=1e-8,
                ok=True,
                notes=[],
                failures=[],
            )
        ],
    }
    results["speedups"] = bench.speedup_rows(runs_)
    w1 = next(r for r in results["speedups"] if r["workload"] == "W1")
    assert w1["speedup"] == pytest.approx(15.0) and w1["met"] and not w1["extrapolated"]
    w3 = next(r for r in results["speedups"] if r["workload"] == "W3")
    assert w3["extrapolated"] and w3["speedup"] == pytest.approx(1.5 * 4 / 0.1)
    plot.write_docs(results, tmp_path / "b.md", tmp_path / "b.png")
    text = (tmp_path / "b.md").read_text()
    assert "| saliency |" in text and "extrapolated" in text
    assert (tmp_path / "b.png").stat().st_size > 1000


def _gpu_run(workload, method, library, median_s, targets_run=16, **extra):
    return dict(
        workload=workload,
        method=method,
        library=library,
        median_s=median_s,
        targets_run=targets_run,
        n_target=16,
        gpu_peak_mb=100.0,
        **extra,
    )


def test_gpu_report_renders(tmp_path):
    # made-up results whose speedups are worked out by hand here
    gpu = _module("gpu")
    plot = _module("plot")
    results = {
        "meta": {
            "device_name": "Test GPU",
            "started": "t0",
            "ig": {"method": "gausslegendre"},
            **dict.fromkeys(("python", "torch", "transformers", "captum", "inseq"), "x"),
        },
        "runs": [
            _gpu_run("W1", "saliency", "attrax", 0.01),
            _gpu_run("W1", "saliency", "captum", 0.2),  # 20x
            _gpu_run("W1", "saliency", "inseq", 0.05, targets_run=4),  # 4 of 16: 0.2 s, 20x
            _gpu_run("W3", "integrated_gradients", "attrax", 0.5),
            _gpu_run("W3", "integrated_gradients", "captum", 2.0),  # 4x, below the 10x goal
            _gpu_run("W3", "integrated_gradients", "inseq", 0.1, error="boom"),  # no speedup
        ],
        "parity": [
            {"errors": {"raw": 1e-7, "sum_plain": 9.0}, "ok": True},
            {"errors": {"raw": 2e-3, "sum_plain": 9.0}, "ok": False},
        ],
    }
    rows = {(r["workload"], r["method"], r["baseline"]): r for r in gpu.speedups(results)}
    assert set(rows) == {
        ("W1", "saliency", "captum"),
        ("W1", "saliency", "inseq"),
        ("W3", "integrated_gradients", "captum"),
    }
    for key, speedup, extrapolated in [
        (("W1", "saliency", "captum"), 20.0, False),
        (("W1", "saliency", "inseq"), 20.0, True),
        (("W3", "integrated_gradients", "captum"), 4.0, False),
    ]:
        assert rows[key]["speedup"] == pytest.approx(speedup), key
        assert rows[key]["extrapolated"] is extrapolated, key
    x, dash = "\u00d7", "\u2013"  # the report's multiplication sign and en dash
    text = gpu.render(results)
    assert f"| W1 | saliency | 10.0 ms | 200.0 ms | 50.0 ms | 20.0{x} | 20.0{x}\\* |" in text
    assert f"| W3 | IG | 500.0 ms | 2000.0 ms | error | 4.0{x} \u2717 | {dash} |" in text
    assert "2 comparisons" in text and "1 FAILED" in text and "largest error 2.0e-03" in text
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(results))
    summary = plot._gpu_summary(path)
    assert f"in 2 of 3 comparisons (smallest 4.0{x}, largest 20{x})" in summary
    assert f"below: W3 integrated gradients vs Captum 4.0{x}" in summary
    assert plot._gpu_summary(tmp_path / "none.json") == ""
