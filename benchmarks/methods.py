"""``python -m benchmarks methods``: parity and time ratios of the newer gradient methods.

Guided backprop and deconvolution against Captum's ``GuidedBackprop``/``Deconvolution`` (one call
per target), sequential and discretized IG against Inseq's, on W1 (GPT-2) and
W2 (Marian), each compared (<= 1e-4 after the same aggregations) before its time is taken in the
same process. Greedy PIG and PGD, which no other library implements, are timed against attrax
itself called once per target (``positions=[p]``), after checking that the two agree. Captum only
hooks ``nn.ReLU`` modules and W1/W2 use GELU/SiLU, so there attrax runs with
``activations="relu"`` (the same quantity); ``W1-relu`` (W1's shape with ReLU MLPs) compares the
rule itself. Results go to ``benchmarks/results/methods[-quick].json``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

from . import workloads
from .adapters import attrax_aggregates, attrax_attribute
from .parity import parity

RESULTS = Path(__file__).resolve().parent / "results"
# methods no other library implements: timed against attrax itself called once per target
# (``positions=[p]``), the loop a user without vectorization over targets would write
LOOPED: dict[str, dict[str, Any]] = {
    "greedy_pig": dict(rounds=3),
    "pgd": dict(steps=5, epsilon=0.5),
}
MODIFIED = ("guided_backprop", "deconvolution")
SIG = "sequential_integrated_gradients"
DIG = "discretized_integrated_gradients"  # Inseq's needs scikit-learn; skipped without it


def _relu_gpt2(hf, tok):
    """W1's GPT-2 shape with ReLU MLPs (seeded random weights): a model Captum's hooks apply to."""
    import torch
    import transformers

    config = hf.config.to_dict() | {"activation_function": "relu"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(workloads.SEED)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))
    return model.float().eval()


def _best(repeats: int, fn, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``fn(*args, **kwargs) -> (output, seconds)`` called ``repeats`` times: the fastest."""
    out, best = None, float("inf")
    for _ in range(repeats):
        out, seconds = fn(*args, **kwargs)
        best = min(best, seconds)
    return out, best


def _baseline(library: str, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """A Captum or Inseq call: ``(raw attributions, seconds)``."""
    from .baselines import captum_attribute, inseq_attribute

    fn = captum_attribute if library == "captum" else inseq_attribute
    result = fn(*args, **kwargs)
    return result.attributions, result.seconds


def _attrax_once(model, prompt: str, target: str, method: str, **options: Any):
    """One attrax call: ``(result, seconds)``."""
    import attrax as ax

    start = time.perf_counter()
    da = getattr(ax, method)(model, prompt, target, **options)
    return da, time.perf_counter() - start


def _attrax_per_target(model, prompt: str, target: str, method: str, at: list, **options: Any):
    """The same method called once per target position ``at``: ``(results, seconds)``."""
    import numpy as np

    import attrax as ax

    fn = getattr(ax, method)
    start = time.perf_counter()
    rows = [fn(model, prompt, target, positions=[p], **options) for p in at]  # the loop timed
    seconds = time.perf_counter() - start
    return np.concatenate([r.values for r in rows]), seconds


def _relative(got, want) -> float:
    import numpy as np

    return float(np.nanmax(np.abs(got - want))) / float(np.nanmax(np.abs(want)))


def _looped(
    name: str, kind: str, model, prompt: str, target: str, plan, repeats: int
) -> list[dict]:
    """:data:`LOOPED` methods: one vectorized call against the per-target loop.

    They must agree first, checked in float64 on 8 + 6 tokens (float32 cannot resolve PGD's
    drops of Marian's probabilities near 1/8000, as for feature ablation); then both are timed
    in float32 on the workload, whose float32 difference is recorded too."""
    import copy

    import attrax as ax

    records = []
    hf64, tok = copy.deepcopy(model.hf).double(), model.tokenizer
    small = workloads.texts(kind, tok, 8, 6)
    model64 = ax.load_model(hf64, tokenizer=tok)
    for method, options in LOOPED.items():
        if method == "greedy_pig":
            options = options | dict(steps=plan.steps)
        da64, _ = _attrax_once(model64, *small, method, **options)
        at = [int(p) for p in da64.target.values]
        loop64, _ = _attrax_per_target(model64, *small, method, at, **options)
        gate = _relative(loop64, da64.values)
        da, ax_s = _best(repeats, _attrax_once, model, prompt, target, method, **options)
        at = [int(p) for p in da.target.values]
        loop, loop_s = _best(
            repeats, _attrax_per_target, model, prompt, target, method, at, **options
        )
        error = _relative(loop, da.values)
        record = dict(
            workload=name, method=method, baseline="attrax per-target loop", options=options,
            n_prompt=plan.n_prompt, n_target=plan.n_target, attrax_s=ax_s, baseline_s=loop_s,
            speedup=loop_s / ax_s, errors={"raw_float64_8+6": gate, "raw_float32": error},
            ok=gate <= 1e-4,
        )  # fmt: skip
        records.append(record)
        print(
            f"{name:8s} {method:32s} vs its per-target loop: "
            f"{'ok' if record['ok'] else 'FAIL'} (float64 {gate:.1e}, float32 {error:.1e}); "
            f"attrax {ax_s:.3f}s, loop {loop_s:.3f}s, x{loop_s / ax_s:.1f}",
            flush=True,
        )
    return records


def measure(
    quick: bool = False, repeats: int | None = None, only: list[str] | None = None
) -> list[dict[str, Any]]:
    """One record per (workload, method): parity errors and seconds of each side."""
    import attrax as ax

    from .baselines import inseq_load

    repeats = repeats or (1 if quick else 3)
    plans = workloads.plans(quick)
    records = []
    cases = [("W1", "gpt2", False), ("W1-relu", "gpt2", True), ("W2", "marian", False)]
    for name, kind, relu in cases:
        plan = plans[name.split("-")[0]]
        hf, tok = workloads.load(kind, attn_implementation="eager")
        if relu:
            hf = _relu_gpt2(hf, tok)
        prompt, target = workloads.texts(kind, tok, plan.n_prompt, plan.n_target)
        model = ax.load_model(hf, tokenizer=tok)
        attrax_attribute(model, *workloads.texts(kind, tok, 4, 2), "saliency")  # warm-up
        paths = (SIG, DIG) if importlib.util.find_spec("sklearn") else (SIG,)
        if not relu and (not only or set(only) & set(LOOPED)):
            looped = [m for m in LOOPED if not only or m in only]
            records += [
                r
                for r in _looped(name, kind, model, prompt, target, plan, repeats)
                if r["method"] in looped
            ]
        for method in MODIFIED if relu else (*MODIFIED, *paths):
            if only and method not in only:
                continue
            if method == DIG:  # the neighbour tables, once per model, outside the clocks
                handle, load_s = inseq_load(hf, tok, method)
                _, table_s = attrax_attribute(model, *workloads.texts(kind, tok, 4, 2), method)
                print(f"{name}: DIG neighbour tables: inseq {load_s:.1f}s, attrax {table_s:.1f}s")
            if method in paths:
                library, activations = "inseq", "all"
                if method == SIG:
                    handle, _ = inseq_load(hf, tok, method)
                options: dict[str, Any] = dict(
                    n_steps=plan.steps, step_scores=(), inseq_model=handle
                )
            else:  # Captum hooks nn.ReLU only: on GELU/SiLU models compare activations="relu"
                library, activations = "captum", "all" if relu else "relu"
                options = dict(baseline="zeros")
            base, base_s = _best(repeats, _baseline, library, hf, tok, prompt, target, method,
                                 **options)  # fmt: skip
            da, ax_s = _best(repeats, attrax_attribute, model, prompt, target, method,
                             steps=plan.steps, activations=activations)  # fmt: skip
            res = parity(attrax_aggregates(da, method), base, method)
            record = dict(
                workload=name, method=method, baseline=library, activations=activations,
                n_prompt=plan.n_prompt, n_target=plan.n_target, steps=plan.steps,
                attrax_s=ax_s, baseline_s=base_s, speedup=base_s / ax_s, **res,
            )  # fmt: skip
            if method in MODIFIED and not relu:  # attrax's own default, timed as well
                _, record["attrax_all_s"] = _best(
                    repeats, attrax_attribute, model, prompt, target, method
                )
            records.append(record)
            errors = ", ".join(f"{k} {v:.1e}" for k, v in res["errors"].items())
            print(
                f"{name:8s} {method:32s} vs {library}: {'ok' if res['ok'] else 'FAIL'} "
                f"({errors}); attrax {ax_s:.3f}s, {library} {base_s:.3f}s, "
                f"x{base_s / ax_s:.1f}",
                flush=True,
            )
    return records


def parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="W1/W2 quick sizes, one repeat")
    p.add_argument("--repeats", type=int, help="timed calls per side (best kept)")
    p.add_argument("--methods", nargs="+", help="only these methods (default: all)")
    p.add_argument(
        "--out", type=Path, help="results JSON (default benchmarks/results/methods*.json)"
    )


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    records = measure(args.quick, args.repeats, args.methods)
    out = args.out or RESULTS / ("methods-quick.json" if args.quick else "methods.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"quick": args.quick, "records": records}, indent=1, default=str))
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")
    return 0 if all(r["ok"] for r in records) else 1
