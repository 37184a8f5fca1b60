# ruff: noqa: RUF001  (typographic signs are intended in the rendered docs)
"""Render benchmark results (``benchmarks/results/results.json``) as docs/benchmarks.{md,png}.

``benchmarks/run.py`` calls :func:`write_docs` at the end of a full run. To re-render from an
existing results file::

    .bench-venv/bin/python benchmarks/plot.py [benchmarks/results/results.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

METHOD_ORDER = ("saliency", "input_x_gradient", "integrated_gradients", "attention")
LABEL = {
    "saliency": "saliency",
    "input_x_gradient": "input × gradient",
    "integrated_gradients": "integrated gradients",
    "attention": "attention",
}
LIB = {"attrax": "attrax", "captum": "Captum", "inseq": "Inseq"}
WORKLOAD_TEXT = {
    "W1": "GPT-2-shaped (d=256, 4 layers, vocab 50257), {p}-token prompt + {t}-token continuation",
    "W2": "Marian-shaped (d=256, 4+4 layers, vocab 8000), {p} source → {t} target tokens",
    "W3": "GPT-2-shaped model of W1, {p}-token prompt + {t}-token continuation",
}


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "–"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _range(r: dict[str, Any]) -> str:
    lo, hi = r.get("median_range", [r["median_s"]] * 2)
    return f" [{_fmt_s(lo)}–{_fmt_s(hi)}]" if hi > lo else ""


def _fmt_x(x: float | None) -> str:
    return "–" if x is None else (f"{x:.0f}×" if x >= 100 else f"{x:.1f}×")


def _fmt_e(x: float | None) -> str:
    return "–" if x is None else ("0" if x == 0 else f"{x:.1e}")


def _runs(results: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(r["workload"], r["method"], r["library"]): r for r in results["runs"]}


def _speedups(results: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(r["workload"], r["method"], r["baseline"]): r for r in results["speedups"]}


def _workloads(results: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for r in results["runs"]:
        if r["workload"] not in seen:
            seen.append(r["workload"])
    return seen


def _methods(results: dict[str, Any], wl: str) -> list[str]:
    present = {r["method"] for r in results["runs"] if r["workload"] == wl}
    return [m for m in METHOD_ORDER if m in present]


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------
def plot_speedups(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sp = _speedups(results)
    groups = [(wl, m) for wl in _workloads(results) for m in _methods(results, wl)]
    if not groups:
        return
    x = np.arange(len(groups))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(7.0, 0.85 * len(groups) + 2), 4.6), dpi=120)
    colors = {"captum": "#4C72B0", "inseq": "#DD8452"}
    for i, base in enumerate(("captum", "inseq")):
        vals = [sp.get((wl, m, base), {}).get("speedup", np.nan) for wl, m in groups]
        hatch = ["//" if sp.get((wl, m, base), {}).get("extrapolated") else "" for wl, m in groups]
        bars = ax.bar(
            x + (i - 0.5) * width,
            vals,
            width,
            label=f"vs {LIB[base]}",
            color=colors[base],
            edgecolor="white",
        )
        for bar, h, v in zip(bars, hatch, vals, strict=True):
            bar.set_hatch(h)
            if np.isfinite(v):
                ax.annotate(
                    f"{v:.0f}×" if v >= 10 else f"{v:.1f}×",
                    (bar.get_x() + bar.get_width() / 2, v),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    goals = [
        next((r["goal"] for r in results["speedups"] if (r["workload"], r["method"]) == g), None)
        for g in groups
    ]
    for xi, g in zip(x, goals, strict=True):
        if g:
            ax.hlines(g, xi - 0.45, xi + 0.45, colors="black", linestyles="--", linewidth=1)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_yscale("log")
    finite = [r["speedup"] for r in results["speedups"]]
    top = max([*finite, *[g for g in goals if g]])
    ax.set_ylim(min(0.5, 0.7 * min(finite)), top * 2.2)
    ax.set_xticks(x)
    ax.set_xticklabels(
        [f"{wl}\n{LABEL[m]}".replace(" gradients", "\ngradients") for wl, m in groups], fontsize=8
    )
    ax.set_ylabel("speedup of attrax (baseline time / attrax time)")
    meta = results["meta"]
    ax.set_title(
        f"attrax speedup, {meta['threads']} CPU thread(s) "
        f"(dashed: goal; hatched: baseline time extrapolated)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper left", ncols=2)
    ax.grid(axis="y", which="both", alpha=0.25)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------
def render_markdown(results: dict[str, Any], png_name: str = "benchmarks.png") -> str:
    meta = results["meta"]
    runs = _runs(results)
    sp = _speedups(results)
    plans = meta["plans"]
    v = meta["versions"]
    m = meta["machine"]
    loads = [r["load1_before"] for r in results["runs"]]
    foreign = [r["foreign_cores"] for r in results["runs"] if r.get("foreign_cores") is not None]
    out: list[str] = []
    w = out.append
    w("# Benchmarks: attrax vs Captum and Inseq\n")
    w("<!-- generated by benchmarks/run.py (benchmarks/plot.py); do not edit by hand -->\n")
    w(
        f"Generated by `{meta['command']}` (inside the bench venv, see `benchmarks/README.md`), "
        f"{meta['started']} – {meta.get('finished', '?')}.\n"
    )
    for u in meta.get("updates", []):
        source = u.get("attrax_source")
        w(
            f"Updated by `{u['command']}`, {u['started']} – {u['finished']} (load average "
            f"{u['load_start'][0]:.2f} at its start"
            + (f"; attrax {_source_text(source)}" if source else "")
            + f"): re-measured {', '.join(u['replaced'])}.\n"
        )
    w("## Set-up\n")
    w(
        f"* Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM; {m['platform']}, "
        f"Python {m['python']}."
    )
    w(
        f"* Versions: attrax {v['attrax']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"Captum {v['captum']}, Inseq {v['inseq']}, numpy {v['numpy']}, xarray {v['xarray']}."
    )
    src = meta.get("attrax_source")
    if src:
        w(f"* attrax source: {_source_text(src)}.")
    w(
        f"* Threads: `torch.set_num_threads({meta['threads']})` (and `OMP_NUM_THREADS` / "
        f"`MKL_NUM_THREADS`) in every measurement process, for every library."
    )
    load_txt = (
        f"{meta['load_start'][0]:.2f} at the start, {meta.get('load_end', [float('nan')])[0]:.2f} "
        f"at the end"
    )
    if loads:
        load_txt += f"; before each measurement {min(loads):.2f}–{max(loads):.2f}"
    w(f"* 1-minute load average: {load_txt}.")
    if foreign:
        w(
            f"* CPU used by *other* processes while a measurement ran (from `/proc/stat`, minus the "
            f"measurement's own CPU time): mean {sum(foreign) / len(foreign):.2f} cores, max "
            f"{max(foreign):.2f} cores."
        )
    w(
        "* Timing: each (workload, method, library) runs in a fresh process"
        + (
            " (in this `--quick` run: one process per workload and library, so RSS numbers carry "
            "over between methods)"
            if meta.get("quick")
            else ""
        )
        + ": load the model, one "
        f"warm-up call on an 8+4-token input, then {meta['repeats']} timed calls (fast calls are "
        f"repeated until the timed calls add up to 1 s, at most 25 calls); a measurement stops "
        f"repeating "
        f"once its calls would exceed {meta['budget_s']:.0f} s. Measurements whose median is "
        f"under {meta.get('round_limit_s', 10):.0f} s are done in {meta.get('rounds', 1)} rounds "
        f"of fresh processes, interleaved across libraries (run-to-run differences between "
        f"processes are larger than those within one): the tables show the median of the "
        f"rounds' medians, [the range of the rounds' medians], (the number of timed calls), and "
        f"speedups with (worst–best pairing of rounds). The time covers the attribution call "
        f"only: not model loading, nor `inseq.load_model` nor `ax.load_model`."
    )
    if meta.get("quiet_cores") is not None:
        w(
            f"* Quiet machine: before each measurement the harness waited until other processes "
            f"used fewer than {meta['quiet_cores']} cores (sampled from `/proc/stat`), and "
            f"measured again (up to {meta['retries']} times, keeping the quietest attempt) when "
            f"they used more while it ran."
        )
    w(
        "* Memory: peak RSS of the measurement process (`VmHWM`: Python, torch, the library, the "
        "model, the warm-up and the timed calls). *attribution peak* is the peak above the RSS "
        "after set-up (the high-water mark is reset via `/proc/self/clear_refs` after loading): "
        "the memory the attribution itself needs."
    )
    w("\nWorkloads (random weights, locally trained tokenizers; `benchmarks/_models.py`):\n")
    for wl, plan in plans.items():
        w(f"* **{wl}**: " + WORKLOAD_TEXT[wl].format(p=plan["n_prompt"], t=plan["n_target"]) + ".")
    w(
        "\nCompared pairs (the same quantity on every side): objective = probability of the "
        "target token (Inseq's default); saliency with `abs=False` everywhere (signed gradient; "
        "Captum's and Inseq's own default is `abs=True`, which costs the same); integrated "
        f"gradients with {'/'.join(map(str, meta['ig']['steps']))} steps, "
        f"`{meta['ig']['method']}` quadrature (Captum's "
        "default) and Inseq's baseline (the UNK embedding at every position, EOS positions keep "
        "EOS) on all three sides: attrax gets it as a baseline tensor, Captum via "
        '`captum_attribute(..., baseline="inseq")`; attention: `ax.attention` vs Inseq\'s '
        '`"attention"` (every layer and head, the query that predicts each target). Captum is '
        "the per-target-token loop of `benchmarks/_baselines.py` (one `attribute` call per target "
        "on its prefix); Captum has no attention method. Attention implementation: attrax runs "
        'its default, `attn_implementation="auto"` (on the CPU, SDPA for sequences of at least '
        "256 tokens, W3; eager otherwise); Captum and Inseq run "
        f"{meta.get('baseline_attn', 'eager')} attention (Inseq's default is eager)"
        " for the gradient methods, eager for attention.\n"
    )

    # ---------------- goals
    w("## Goals\n")
    w(
        "| method | goal (2-core CPU) | "
        + " | ".join(f"{wl} vs {LIB[b]}" for wl in _workloads(results) for b in ("captum", "inseq"))
        + " | met |"
    )
    w("|---|---|" + "---|" * (2 * len(_workloads(results))) + "---|")
    for method in METHOD_ORDER:
        cells = []
        oks = []
        for wl in _workloads(results):
            for b in ("captum", "inseq"):
                r = sp.get((wl, method, b))
                if r is None:
                    cells.append("–")
                    continue
                lo, hi = r.get("speedup_range", [r["speedup"]] * 2)
                mark = "" if r["met"] else " ✗"
                if lo < r["goal"] <= hi:
                    mark += " ~"
                cells.append(_fmt_x(r["speedup"]) + ("\\*" if r["extrapolated"] else "") + mark)
                oks.append(r["met"])
        if not oks:
            continue
        verdict = "yes" if all(oks) else ("no" if not any(oks) else "partly")
        w(
            f"| {LABEL[method]} | ≥ {_goal(results, method)}× | "
            + " | ".join(cells)
            + f" | {verdict} |"
        )
    w(
        "\n✗ = below the goal. ~ = the goal lies within the range of speedups over the "
        "measurement rounds (run-to-run noise decides). \\* = the baseline's time is "
        "extrapolated from its first targets (see W3 below).\n"
    )
    w3 = [r for r in results["runs"] if r["workload"] == "W3" and r["library"] == "attrax"]
    if w3:
        per = ", ".join(
            f"{LABEL[r['method']]} {r['rss_peak_mb']:.0f} MB"
            + (f" ({r['targets_run']} targets)" if r["scale"] != 1 else "")
            for r in sorted(w3, key=lambda r: METHOD_ORDER.index(r["method"]))
        )
        w(
            f"W3 with attrax completes, with memory bounded by `chunk_size="
            f"{plans['W3']['chunk_size']}` (IG also `batch_size={plans['W3']['batch_size']}`): "
            f"peak RSS {per}.\n"
        )
    w(f"![attrax speedups]({png_name})\n")
    for summary in (_gpu_summary(), _malloc_summary(results), _attention_summary(results)):
        if summary:
            w(summary)
    w(
        "Why some CPU goals are out of reach for this algorithm (FLOP bounds per workload): "
        "[the cost model](methods/gradients.md#cost-model-why-the-speed-ups-differ-by-workload).\n"
    )

    # ---------------- time tables
    w("## Time and peak memory\n")
    for wl in _workloads(results):
        plan = plans[wl]
        w(f"### {wl}: " + WORKLOAD_TEXT[wl].format(p=plan["n_prompt"], t=plan["n_target"]) + "\n")
        w(
            f"Options: attrax `chunk_size={plan['chunk_size']}`, IG `batch_size="
            f"{plan['batch_size']}`; Captum / Inseq IG `internal_batch_size="
            f"{plan['internal_batch_size']}` (None: everything at once, each library's default)."
            "\n"
        )
        w(
            "| method | attrax s (n) | Captum s (n) | Inseq s (n) | speedup vs Captum | "
            "vs Inseq | peak RSS MB attrax / Captum / Inseq | attribution peak MB attrax / "
            "Captum / Inseq |"
        )
        w("|---|---|---|---|---|---|---|---|")
        for method in _methods(results, wl):
            cells = [LABEL[method]]
            for lib in ("attrax", "captum", "inseq"):
                r = runs.get((wl, method, lib))
                if r is None:
                    cells.append("n/a" if lib == "captum" and method == "attention" else "–")
                    continue
                t = _fmt_s(r["median_s"]) + _range(r) + f" ({len(r['times'])})"
                if r["scale"] != 1:
                    t = (
                        f"{_fmt_s(r['median_s'] * r['scale'])}\\* ({len(r['times'])}; "
                        f"{_fmt_s(r['median_s'])} s for {r['targets_run']} target"
                        f"{'s' if r['targets_run'] > 1 else ''})"
                    )
                cells.append(t)
            for b in ("captum", "inseq"):
                r = sp.get((wl, method, b))
                if r is None:
                    cells.append("–")
                    continue
                lo, hi = r.get("speedup_range", [r["speedup"]] * 2)
                spread = f" ({lo:.1f}–{hi:.1f})" if hi / lo > 1.005 else ""
                cells.append(_fmt_x(r["speedup"]) + spread)
            rss, att = [], []
            for lib in ("attrax", "captum", "inseq"):
                r = runs.get((wl, method, lib))
                rss.append("–" if r is None else f"{r['rss_peak_mb']:.0f}")
                a = None if r is None else r.get("rss_attribution_mb")
                att.append("–" if a is None else f"{a:.0f}")
            cells += [" / ".join(rss), " / ".join(att)]
            w("| " + " | ".join(cells) + " |")
        setup = {}
        for (wl2, _m, lib), r in runs.items():
            if wl2 == wl and r.get("rss_setup_mb") is not None:
                setup.setdefault(lib, []).append(r["rss_setup_mb"])
        if setup:
            w(
                "\nRSS after set-up (Python, torch, the library's imports, the model; before any "
                "attribution): "
                + ", ".join(f"{LIB[lib]} {min(v):.0f} MB" for lib, v in setup.items())
                + "."
            )
        w("")
        if wl == "W3":
            bt = plan["baseline_targets"]
            at = plan["attrax_targets"]
            w(
                "\\* W3: Captum and Inseq run the first "
                + ", ".join(f"{k} ({LABEL[m]})" for m, k in bt.items() if k is not None)
                + f" of the {plan['n_target']} targets (prompt + those targets), and their time "
                f"is multiplied by {plan['n_target']} / k. Each target costs them one backward "
                f"(IG: {plan['steps']} points) over its own prefix, so the cost per target grows "
                "slightly with "
                "the prefix: this extrapolation *under*-estimates their full time. attrax runs "
                + (
                    "all targets except for "
                    + ", ".join(f"{LABEL[m]} (first {k})" for m, k in at.items() if k)
                    if any(at.values())
                    else "all targets"
                )
                + "; when attrax also runs a subset, the ratio compares equal work. Baseline IG uses "
                f"`internal_batch_size={plan['internal_batch_size']}`.\n"
            )

    # ---------------- parity
    w("## Parity\n")
    w(
        f"attrax must equal each baseline within {meta['tolerance']:g} relative error "
        "(max |attrax − baseline| / max |baseline|) after each aggregation, or the benchmark "
        "exits with status 2 before writing these docs. Aggregations: *l2_normalize* = L2 norm "
        "over hidden, then divided by the L1 norm over source (attrax side: "
        "`ax.pipe(ax.l2_norm, ax.normalize)`); *sum* = sum over hidden (`ax.sum`); attention: "
        "*head_mean_normalize* = mean over heads, normalized over source; and *raw* (no "
        "aggregation: the normalized aggregates cannot see a scale error). The NaN pattern "
        "(future positions) must be identical.\n"
    )
    w("Parity of the timed outputs:\n")
    w("| workload | method | baseline | targets compared | raw | l2_normalize | sum | ok |")
    w("|---|---|---|---|---|---|---|---|")
    notes = set()
    for r in results["parity"]:
        e = r["errors"]
        second = e.get("l2_normalize", e.get("head_mean_normalize"))
        s = e.get("sum")
        s_txt = _fmt_e(s)
        if "sum_plain" in e:
            s_txt += "†"
            notes.add("†")
        w(
            f"| {r['workload']} | {LABEL[r['method']]} | {LIB[r['baseline']]} | "
            f"{r['targets_compared']} | {_fmt_e(e.get('raw'))} | {_fmt_e(second)} | {s_txt} | "
            f"{'yes' if r['ok'] else 'NO'} |"
        )
    if results.get("gate"):
        w("\nParity gate (small inputs, checked before any timing):\n")
        w("| model | sizes | method | baseline | raw | l2_normalize | sum | ok |")
        w("|---|---|---|---|---|---|---|---|")
        for r in results["gate"]:
            e = r["errors"]
            second = e.get("l2_normalize", e.get("head_mean_normalize"))
            s_txt = _fmt_e(e.get("sum"))
            if "sum_plain" in e:
                s_txt += "†"
                notes.add("†")
            w(
                f"| {r['kind']} | {r['sizes']} | {LABEL[r['method']]} | {LIB[r['baseline']]} | "
                f"{_fmt_e(e.get('raw'))} | {_fmt_e(second)} | {s_txt} | "
                f"{'yes' if r['ok'] else 'NO'} |"
            )
    if notes:
        degenerate = [
            r for r in results["parity"] + results.get("gate", []) if "sum_plain" in r["errors"]
        ]
        plain = [r["errors"]["sum_plain"] for r in degenerate]
        ratios = [r.get("sum_over_l1", float("nan")) for r in degenerate]
        w(
            "\n† Saliency on the GPT-2 model: the sum of the gradient over hidden is exactly 0 in "
            "real arithmetic (every path from the embeddings enters a LayerNorm, whose input "
            "gradient has zero mean), so both sides hold only float rounding noise there "
            f"(max |sum| at most {max(ratios):.0e} of the largest L1 norm over hidden). The error "
            "is then taken "
            "relative to the largest L1 norm over hidden instead of the largest |sum|; relative "
            f"to the noise itself it is up to {max(plain):.1f} (meaningless)."
        )
    w(
        '\nNot compared: `method="riemann_trapezoid"`. Captum 0.9\'s trapezoid weights are '
        "1/n with halved ends, summing to (n−1)/n, so Captum's (and Inseq's) trapezoid IG is "
        "(n−1)/n times attrax's (weights 1/(n−1), halved ends, summing to 1): a 2.0% difference "
        "at 50 steps, exactly that factor.\n"
    )
    return "\n".join(out) + "\n"


def _gpu_summary(path: Path = HERE / "gpu-h200.json") -> str:
    """One paragraph on the GPU run (``benchmarks/gpu.py``), from its committed results."""
    if not path.exists():
        return ""
    import gpu

    results = json.loads(path.read_text())
    rows = gpu.speedups(results)
    grad = [r for r in rows if r["method"] != "attention"]
    if not grad:
        return ""
    met = [r for r in grad if r["speedup"] >= gpu.GPU_GOAL]
    missed = ", ".join(
        f"{r['workload']} {LABEL[r['method']]} vs {LIB[r['baseline']]} {r['speedup']:.1f}×"
        for r in grad
        if r["speedup"] < gpu.GPU_GOAL
    )
    return (
        f"**On a GPU** ({results['meta']['device_name']}, [details](benchmarks-gpu.md)): the "
        f"gradient methods are ≥ {gpu.GPU_GOAL:.0f}× faster than Captum's and Inseq's loops in "
        f"{len(met)} of {len(grad)} comparisons (smallest "
        f"{min(r['speedup'] for r in grad):.1f}×, largest {max(r['speedup'] for r in grad):.0f}×)"
        + (f"; below: {missed}" if missed else "")
        + ".\n"
    )


def _source_text(src: dict[str, Any]) -> str:
    changed = len(src.get("uncommitted") or [])
    return (
        f"git {src.get('git_head')}"
        + (f" plus {changed} uncommitted file(s) under src/attrax" if changed else "")
        + f" (sha256 of src/attrax/*.py: {src['sha256_src']})"
    )


def _variant_rows(results: dict[str, Any], variant: dict[str, Any]) -> str:
    """A committed variant run's speedups, each with the baseline's time there and by default."""
    default, measured = _runs(results), _runs(variant)
    rows = []
    for r in variant["speedups"]:
        key = (r["workload"], r["method"], r["baseline"])
        before = default.get(key)
        was = f", {_fmt_s(before['median_s'])} s by default" if before else ""
        star = "\\*" if r["extrapolated"] else ""
        rows.append(
            f"{r['workload']} {LABEL[r['method']]} {r['speedup']:.1f}×{star} vs "
            f"{LIB[r['baseline']]} ({LIB[r['baseline']]} {_fmt_s(measured[key]['median_s'])} s"
            f"{was})"
        )
    return "; ".join(rows)


def _malloc_summary(results: dict[str, Any], path: Path = HERE / "malloc-tuned.json") -> str:
    """One paragraph on a run with glibc's malloc tuned for every library, if one is committed."""
    if not path.exists():
        return ""
    tuned = json.loads(path.read_text())
    env = " ".join(f"{k}={v}" for k, v in tuned["meta"].get("malloc_env", {}).items())
    return (
        f"**Every library with glibc's malloc tuned** (`{env}` for every process, in which case "
        "attrax leaves malloc alone; one round, one timed call each; `benchmarks/"
        f"{path.name}`): {_variant_rows(results, tuned)}. Captum and Inseq gain from the same "
        "setting. Part of the gap in the tables below is therefore attrax tuning malloc for its "
        "own vectorized backward ([host memory](methods/gradients.md#host-memory)), which users "
        "do not usually do for Captum and Inseq.\n"
    )


def _attention_summary(results: dict[str, Any], path: Path = HERE / "baselines-sdpa.json") -> str:
    """One paragraph on a run with the baselines on another attention, if one is committed."""
    if not path.exists():
        return ""
    variant = json.loads(path.read_text())
    attn = variant["meta"]["baseline_attn"]
    return (
        f"**Captum and Inseq with `{attn}` attention** (`--baseline-attn {attn}`, the attention "
        "attrax itself runs on these lengths; one round, one timed call each; `benchmarks/"
        f"{path.name}`): {_variant_rows(results, variant)}. SDPA speeds the loops up too, but "
        "less: their time goes mostly to the full-vocabulary projection at every prefix "
        "position, attrax's to attention.\n"
    )


def _goal(results: dict[str, Any], method: str) -> str:
    g = next((r["goal"] for r in results["speedups"] if r["method"] == method), None)
    return "–" if g is None else f"{g:g}"


def write_docs(results: dict[str, Any], md: Path, png: Path) -> None:
    md.parent.mkdir(parents=True, exist_ok=True)
    plot_speedups(results, png)
    md.write_text(render_markdown(results, png.name))


def main(argv: list[str]) -> None:
    path = Path(argv[1]) if len(argv) > 1 else HERE / "results" / "results.json"
    results = json.loads(path.read_text())
    if results.get("status") != "ok":
        raise SystemExit(f"{path}: status {results.get('status')!r}, not rendering")
    write_docs(results, REPO / "docs" / "benchmarks.md", REPO / "docs" / "benchmarks.png")
    print("wrote docs/benchmarks.md, docs/benchmarks.png")


if __name__ == "__main__":
    main(sys.argv)
