# ruff: noqa: RUF001  (typographic signs are intended in the rendered docs)
"""The report: pure functions from results JSON to ``docs/benchmarks{,-gpu}.md`` and the plot.

:func:`write_docs` and :func:`write_between` are the only functions here that read or write
files; nothing is measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs"
# the committed results the docs are rendered from
CPU_RESULTS = HERE / "cpu.json"
GPU_RESULTS = HERE / "gpu-h200.json"
VARIANTS = (HERE / "malloc-tuned.json", HERE / "baselines-sdpa.json")
#: ``python -m benchmarks real-size --out`` results on the CPU, one file per shape
REAL_SIZE = (
    "real-size-gpt2-small-cpu.json",
    "real-size-llama-1b-cpu.json",
    "real-size-llama-1b-256-cpu.json",
)
#: the same on a GPU (``bash benchmarks/gpu_memory.sh``): a Llama-3-8B shape over long prompts
REAL_SIZE_GPU = tuple(
    f"real-size-llama3-8b-{n}-cuda.json" for n in ("2048", "8192", "2048-ig", "2048-lrp")
)
#: a later GPU run of the harness's W3 options alone (its comparison rows did not run)
W3_OPTIONS = HERE / "gpu-h200-w3-options.json"

METHOD_ORDER = ("saliency", "input_x_gradient", "integrated_gradients", "attention")
LABEL = {
    "saliency": "saliency",
    "input_x_gradient": "input × gradient",
    "integrated_gradients": "integrated gradients",
    "attention": "attention",
    "lrp": "AttnLRP",
    "conductance": "conductance, every block",
}
SHORT = {**LABEL, "input_x_gradient": "input x gradient", "integrated_gradients": "IG"}
LIB = {"attrax": "attrax", "captum": "Captum", "inseq": "Inseq"}
BASELINES = ("captum", "inseq")
# speedup goals, attrax vs each baseline: on a 2-core CPU, and on a GPU
CPU_GOALS = {
    "saliency": 10.0,
    "input_x_gradient": 10.0,
    "integrated_gradients": 2.5,
    "attention": 2.0,
}
GPU_GOALS = {**dict.fromkeys(METHOD_ORDER[:3], 10.0), "attention": 2.0}
WORKLOAD_TEXT = {
    "W1": "GPT-2-shaped (d=256, 4 layers, vocab 50257), {p}-token prompt + {t}-token continuation",
    "W2": "Marian-shaped (d=256, 4+4 layers, vocab 8000), {p} source → {t} target tokens",
    "W3": "GPT-2-shaped model of W1, {p}-token prompt + {t}-token continuation",
}


def goals(device: str) -> dict[str, float]:
    return CPU_GOALS if device == "cpu" else GPU_GOALS


def speedups(runs: list[dict[str, Any]], goal: dict[str, float]) -> list[dict[str, Any]]:
    """attrax vs each baseline per (workload, method): the ratio of times, over all targets.

    A side that ran the first k of n targets is scaled by n / k (per-target loops are linear in the
    targets); ``extrapolated`` when the two sides ran different targets. ``speedup_range`` pairs the
    rounds' medians worst and best.
    """
    by = {(r["workload"], r["method"], r["library"]): r for r in runs if "error" not in r}
    rows = []
    for (wl, method, lib), a in by.items():
        for base in BASELINES if lib == "attrax" else ():
            b = by.get((wl, method, base))
            if b is None:
                continue
            sa, sb = (r["n_target"] / r["targets_run"] for r in (a, b))
            a_lo, a_hi = (x * sa for x in a.get("median_range", [a["median_s"]] * 2))
            b_lo, b_hi = (x * sb for x in b.get("median_range", [b["median_s"]] * 2))
            speedup = b["median_s"] * sb / (a["median_s"] * sa)
            rows.append(
                dict(
                    workload=wl,
                    method=method,
                    baseline=base,
                    speedup=speedup,
                    speedup_range=[b_lo / a_hi, b_hi / a_lo],
                    extrapolated=sa != sb,
                    goal=goal.get(method),  # the issue-15 methods have no goal
                    met=None if method not in goal else speedup >= goal[method],
                )
            )
    return rows


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "–"
    return (
        f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"
    )


def _fmt_x(x: float | None) -> str:
    if x is None:
        return "–"
    # two decimals near parity, where 0.96 and 1.04 both round to "1.0"
    return f"{x:.0f}×" if x >= 100 else f"{x:.1f}×" if x >= 2 else f"{x:.2f}×"


def _fmt_e(x: float | None) -> str:
    return "–" if x is None else ("0" if x == 0 else f"{x:.1e}")


def _keyed(rows: list[dict[str, Any]], last: str) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(r["workload"], r["method"], r[last]): r for r in rows}


def _workloads(results: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(r["workload"] for r in results["runs"]))


def _methods(results: dict[str, Any], wl: str) -> list[str]:
    present = {r["method"] for r in results["runs"] if r["workload"] == wl}
    return [m for m in METHOD_ORDER if m in present]


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------
def plot_speedups(results: dict[str, Any], path: Path) -> None:
    """Bars of attrax's speedup per (workload, method) and baseline; dashed: the goal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = speedups(results["runs"], CPU_GOALS)
    sp = _keyed(rows, "baseline")
    groups = [(wl, m) for wl in _workloads(results) for m in _methods(results, wl)]
    x = np.arange(len(groups))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(7.0, 0.85 * len(groups) + 2), 4.6), dpi=120)
    colors = {"captum": "#4C72B0", "inseq": "#DD8452"}
    for i, base in enumerate(BASELINES):
        vals = [sp.get((wl, m, base), {}).get("speedup", np.nan) for wl, m in groups]
        hatch = ["//" if sp.get((wl, m, base), {}).get("extrapolated") else "" for wl, m in groups]
        bars = ax.bar(
            x + (i - 0.5) * width, vals, width, label=f"vs {LIB[base]}", color=colors[base],
            edgecolor="white",
        )  # fmt: skip
        for bar, h, v in zip(bars, hatch, vals, strict=True):
            bar.set_hatch(h)
            if np.isfinite(v):
                label = f"{v:.0f}×" if v >= 10 else f"{v:.1f}×"
                xy = (bar.get_x() + bar.get_width() / 2, v)
                ax.annotate(label, xy, ha="center", va="bottom", fontsize=7)
    targets = [CPU_GOALS[m] for _, m in groups]
    for xi, g in zip(x, targets, strict=True):
        ax.hlines(g, xi - 0.45, xi + 0.45, colors="black", linestyles="--", linewidth=1)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_yscale("log")
    finite = [r["speedup"] for r in rows]
    ax.set_ylim(min(0.5, 0.7 * min(finite)), max(*finite, *targets) * 2.2)
    ax.set_xticks(x)
    ax.set_xticklabels(
        [f"{wl}\n{LABEL[m]}".replace(" gradients", "\ngradients") for wl, m in groups], fontsize=8
    )
    ax.set_ylabel("speedup of attrax (baseline time / attrax time)")
    ax.set_title(
        f"attrax speedup, {results['meta']['threads']} CPU thread(s) "
        f"(dashed: goal; hatched: baseline time extrapolated)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper left", ncols=2)
    ax.grid(axis="y", which="both", alpha=0.25)
    fig.tight_layout()
    fig.savefig(
        path, metadata={"Software": None}
    )  # no version stamp: the file changes with data only
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# CPU markdown
# --------------------------------------------------------------------------------------------------
def _source_text(src: dict[str, Any]) -> str:
    changed = len(src.get("uncommitted") or [])
    return (
        f"git {src.get('git_head')}"
        + (f" plus {changed} uncommitted file(s) under src/attrax" if changed else "")
        + f" (sha256 of src/attrax/*.py: {src['sha256_src']})"
    )


def render_cpu(
    results: dict[str, Any],
    gpu: dict[str, Any] | None = None,
    variants: dict[str, dict[str, Any]] | None = None,
    png_name: str = "benchmarks.png",
    real_size: dict[str, dict[str, Any]] | None = None,
) -> str:
    """``docs/benchmarks.md`` from CPU results; ``gpu`` and ``variants`` (file name -> results of a
    variant run) add one summary paragraph each, ``real_size`` (file name -> results) a table
    each."""
    meta, plans = results["meta"], results["meta"]["plans"]
    runs = _keyed(results["runs"], "library")
    sp = _keyed(speedups(results["runs"], CPU_GOALS), "baseline")
    wls = _workloads(results)
    v, m = meta["versions"], meta["machine"]
    out: list[str] = []
    w = out.append
    w("# Benchmarks: attrax vs Captum and Inseq\n")
    w("<!-- generated by `python -m benchmarks report` from benchmarks/cpu.json; do not edit -->\n")
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
    if meta.get("attrax_source"):
        w(f"* attrax source: {_source_text(meta['attrax_source'])}.")
    w(
        f"* Threads: `torch.set_num_threads({meta['threads']})` (and `OMP_NUM_THREADS` / "
        f"`MKL_NUM_THREADS`) in every measurement process, for every library."
    )
    load_txt = (
        f"{meta['load_start'][0]:.2f} at the start, {meta.get('load_end', [float('nan')])[0]:.2f} "
        f"at the end"
    )
    if meta.get("load1_before"):
        load_txt += "; before each measurement {:.2f}–{:.2f}".format(*meta["load1_before"])
    w(f"* 1-minute load average: {load_txt}.")
    if meta.get("foreign_cores"):
        w(
            f"* CPU used by *other* processes while a measurement ran (from `/proc/stat`, minus the "
            f"measurement's own CPU time): mean {meta['foreign_cores']['mean']:.2f} cores, max "
            f"{meta['foreign_cores']['max']:.2f} cores."
        )
    quick = (
        " (in this `--quick` run: one process per workload and library, so RSS numbers carry "
        "over between methods)"
    )
    w(
        "* Timing: each (workload, method, library) runs in a fresh process"
        + (quick if meta.get("quick") else "")
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
    w("\nWorkloads (random weights, locally trained tokenizers; `benchmarks/workloads.py`):\n")
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
        "the per-target-token loop of `benchmarks/baselines.py` (one `attribute` call per target "
        "on its prefix); Captum has no attention method. Attention implementation: attrax runs "
        'its default, `attn_implementation="auto"` (on the CPU, SDPA for sequences of at least '
        "256 tokens, W3; eager otherwise); Captum and Inseq run "
        f"{meta.get('baseline_attn', 'eager')} attention (Inseq's default is eager)"
        " for the gradient methods, eager for attention.\n"
    )

    w("## Goals\n")
    heads = " | ".join(f"{wl} vs {LIB[b]}" for wl in wls for b in BASELINES)
    w(f"| method | goal (2-core CPU) | {heads} | met |")
    w("|---|---|" + "---|" * (2 * len(wls)) + "---|")
    for method in METHOD_ORDER:
        cells, oks = [], []
        for key in ((wl, method, b) for wl in wls for b in BASELINES):
            r = sp.get(key)
            if r is None:
                cells.append("–")
                continue
            lo, hi = r["speedup_range"]
            mark = ("" if r["met"] else " ✗") + (" ~" if lo < r["goal"] <= hi else "")
            cells.append(_fmt_x(r["speedup"]) + ("\\*" if r["extrapolated"] else "") + mark)
            oks.append(r["met"])
        if oks:
            verdict = "yes" if all(oks) else ("no" if not any(oks) else "partly")
            w(f"| {LABEL[method]} | ≥ {CPU_GOALS[method]:g}× | {' | '.join(cells)} | {verdict} |")
    w(
        "\n✗ = below the goal. ~ = the goal lies within the range of speedups over the "
        "measurement rounds (run-to-run noise decides). \\* = the baseline's time is "
        "extrapolated from its first targets (see W3 below).\n"
    )
    w3 = [r for r in results["runs"] if r["workload"] == "W3" and r["library"] == "attrax"]
    if w3:
        per = ", ".join(
            f"{LABEL[r['method']]} {r['rss_peak_mb']:.0f} MB"
            + (f" ({r['targets_run']} targets)" if r["targets_run"] != r["n_target"] else "")
            for r in sorted(w3, key=lambda r: METHOD_ORDER.index(r["method"]))
        )
        w(
            f"W3 with attrax completes, with memory bounded by `chunk_size="
            f"{plans['W3']['chunk_size']}` (IG also `batch_size={plans['W3']['batch_size']}`): "
            f"peak RSS {per}.\n"
        )
    w(f"![attrax speedups]({png_name})\n")
    if gpu:
        w(_gpu_summary(gpu))
    for name, variant in (variants or {}).items():
        w(_variant_summary(results, variant, name))
    w(
        "Why some CPU goals are out of reach for this algorithm (FLOP bounds per workload): "
        "[the cost model](methods/gradients.md#cost-model-why-the-speed-ups-differ-by-workload).\n"
    )

    w("## Time and peak memory\n")
    for wl in wls:
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
            for lib in LIB:
                r = runs.get((wl, method, lib))
                if r is None:
                    cells.append("n/a" if lib == "captum" and method == "attention" else "–")
                elif r["targets_run"] != r["n_target"]:
                    k = r["targets_run"]
                    cells.append(
                        f"{_fmt_s(r['median_s'] * r['n_target'] / k)}\\* ({r['calls']}; "
                        f"{_fmt_s(r['median_s'])} s for {k} target{'s' if k > 1 else ''})"
                    )
                else:
                    lo, hi = r.get("median_range", [r["median_s"]] * 2)
                    spread = f" [{_fmt_s(lo)}–{_fmt_s(hi)}]" if hi > lo else ""
                    cells.append(f"{_fmt_s(r['median_s'])}{spread} ({r['calls']})")
            for b in BASELINES:
                r = sp.get((wl, method, b))
                if r is None:
                    cells.append("–")
                    continue
                lo, hi = r["speedup_range"]
                cells.append(
                    _fmt_x(r["speedup"]) + (f" ({lo:.1f}–{hi:.1f})" if hi / lo > 1.005 else "")
                )
            rss, att = [], []
            for lib in LIB:
                r = runs.get((wl, method, lib)) or {}
                rss.append("–" if not r else f"{r['rss_peak_mb']:.0f}")
                a = r.get("rss_attribution_mb")
                att.append("–" if a is None else f"{a:.0f}")
            w("| " + " | ".join([*cells, " / ".join(rss), " / ".join(att)]) + " |")
        setup: dict[str, list[float]] = {}
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
            bt, at = plan["baseline_targets"], plan["attrax_targets"]
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
    out += _parity_section(results)
    out += _classifier_section(results.get("classifiers"))
    out += _question_answering_section(results.get("question_answering"))
    out += _masked_lm_section(results.get("masked_lm"))
    out += _step_scores_section(results.get("step_scores"))
    out += _nli_section(results.get("nli"))
    out += _seq2seq_qa_section(results.get("seq2seq_qa"))
    out += _real_size_section(real_size or {})
    return "\n".join(out) + "\n"


REAL_SIZE_SHAPES = {
    "gpt2-small": "GPT-2-small shape (12 layers, d=768, vocabulary 50257), float32",
    "llama-1b": "Llama-3.2-1B shape (16 layers, d=2048, gated MLP 8192, RMSNorm, 32/8 heads, "
    "vocabulary 128256), bfloat16",
    "llama3-8b": "Llama-3-8B shape (32 layers, d=4096, gated MLP 14336, RMSNorm, 32/8 heads, "
    "vocabulary 128256), bfloat16",
}


def _real_size_section(files: dict[str, dict[str, Any]], gpu: bool = False) -> list[str]:
    """One table per ``real-size`` results file: time and peak memory per library, parity."""
    if not files:
        return []
    out = ["## Real size and long context (GPU)\n" if gpu else "## Real size (CPU)\n"]
    w = out.append
    w(
        "`python -m benchmarks real-size` (`benchmarks/real_size.py`): random weights built from "
        "a config, one process, parity checked before any timing, libraries interleaved. Captum "
        "and Inseq may run only their first targets, their time then multiplied by targets / "
        "first targets (marked \\*: an under-estimate, later targets have longer prefixes). "
        + (
            "Peak memory: `torch.cuda.max_memory_allocated` above the allocation before the call. "
            if gpu
            else "Peak memory: the process's peak RSS above its RSS before the call. "
        )
        + "A bfloat16 shape is gated on a float32 copy of the same weights (`float32 gate`) "
        "unless the file says otherwise, and its bfloat16 difference reported. Why the ratios sit "
        'where they do: `docs/methods/gradients.md`, "At real size".'
        + (
            ""
            if gpu
            else " The GPU runs (a Llama-3-8B shape over 2,048 and 8,192 tokens) are "
            "`bash benchmarks/gpu_memory.sh`."
        )
        + "\n"
    )
    failed = [r for r in files.values() if any(row.get("parity_failed") for row in r["rows"])]
    if failed:
        # runs from before real_size.py recorded the code they measured predate the objectives'
        # float32 softmax (the same change, 2026-12-04)
        older = any("attrax_source" not in r["meta"] for r in failed)
        w(
            "**over the gate**: an aggregate beyond the tolerance in the shape's dtype; the run "
            "went on (`--on-parity-failure record`) and its row is kept, marked. "
            + (
                "Such a run below predates the objectives' softmax in float32, which made "
                "bfloat16 parity looser still. "
                if older
                else ""
            )
            + 'Why bfloat16 parity is loose: [gradients](methods/gradients.md), "At real size".\n'
        )
    for name, result in files.items():
        meta, rows = result["meta"], result["rows"]
        first = meta.get("first_targets")
        star = "\\*" if first and first < meta["target"] else ""
        w(
            f"### {REAL_SIZE_SHAPES.get(meta['shape'], meta['shape'])}: {meta['prompt']} + "
            f"{meta['target']} tokens\n"
        )
        w(
            f"`{name}`: {meta['threads']} threads, "
            + (
                f"{meta['repeats']} timed call(s) per library (median)"
                if meta["repeats"]
                else "each library timed on its parity call (an extrapolated loop on one more)"
            )
            + (
                f", IG {meta['steps']} points"
                if any(r["method"] == "integrated_gradients" for r in rows)
                else ""
            )
            + (f", Captum and Inseq on the first {first} targets" if star else "")
            + (f", attrax `max_memory={meta['max_memory']}`" if meta.get("max_memory") else "")
            + (
                f", parity gated in {_dtype(meta)} at {meta['tolerance']:g} relative"
                if meta.get("parity_dtype", "same") == "same"
                and "tolerance" in meta
                and meta.get("libraries", "attrax,captum,inseq") != "attrax"  # alone: no gate
                else ""
            )
            + (f". {meta['note'][:1].upper()}{meta['note'][1:]}" if meta.get("note") else "")
            + (
                ". **Incomplete**: the run stopped before its last method"
                if meta.get("complete") is False
                else ""
            )
            + ".\n"
        )
        ran = {lib for row in rows for lib in [*row["seconds"], *row.get("out_of_memory", [])]}
        libraries = [lib for lib in ("attrax", "captum", "inseq") if lib in ran]
        header = [
            "method",
            *(f"{lib} (s, peak MiB)" for lib in libraries),
            *(f"vs {lib}" for lib in libraries[1:]),
            "parity",
        ]
        w("| " + " | ".join(header) + " |")
        w("|---" * (2 * len(libraries) + 1) + "|")
        for row in rows:
            sec, peak = row["seconds"], row.get("peak_bytes", {})
            # a loop that ran out of memory has no time (real_size.py records it so)
            cells = [
                f"{_fmt_s(sec[lib])}{'' if lib == 'attrax' else star}, "
                f"{peak.get(lib, float('nan')) / 2**20:.0f}"
                if lib in sec
                else "out of memory"
                for lib in libraries
            ]
            ratios = [
                f"**{_fmt_x(sec[lib] / sec['attrax'])}**" if lib in sec else "—"
                for lib in libraries[1:]
            ]
            parity = (
                "; ".join(
                    f"{lib} {_real_size_parity(e)}"
                    + (" **over the gate**" if lib in row.get("parity_failed", ()) else "")
                    for lib, e in row.get("parity", {}).items()
                )
                or "— (attrax alone)"
            )
            w(
                f"| {LABEL.get(row['method'], row['method'])} | {' | '.join(cells + ratios)} | {parity} |"
            )
        w("")
    return out


def _dtype(meta: dict[str, Any]) -> str:
    """The shape's dtype, as its description ends."""
    return REAL_SIZE_SHAPES.get(meta["shape"], "").rsplit(", ", 1)[-1] or "its dtype"


def _real_size_parity(error: float | str | dict[str, float]) -> str:
    """One library's parity cell: its gated error, or (a gate run in another dtype) that gate's
    error and the timing dtype's, e.g. ``1.6e-06 (float32 gate), bfloat16 4.1e-02``."""
    if isinstance(error, dict):
        (gate, gated), *rest = error.items()
        return f"{gated:.1e} ({gate} gate)" + "".join(f", {d} {_largest(e)}" for d, e in rest)
    return f"{error:.1e}" if isinstance(error, float) else str(error)


def _largest(error: float | dict[str, float]) -> str:
    """An error, or the largest of one per aggregate with that aggregate's name."""
    if not isinstance(error, dict):
        return f"{error:.1e}"
    name = max(error, key=error.__getitem__)
    return f"{error[name]:.1e} ({name})"


CLASSIFIER_LABEL = {**LABEL, "occlusion": "occlusion"}


def _classifier_section(results: dict[str, Any] | None) -> list[str]:
    """The classifier workloads (C1, C2) of ``python -m benchmarks classifiers``, when recorded."""
    if not results:
        return []
    meta = results["meta"]
    out = ["## Classifiers (C1, C2)\n"]
    w = out.append
    calls = sorted({r["calls"] for r in results["runs"]})
    kind = "a quick run (`--quick`: IG 16 points)" if meta["quick"] else "a full run"
    kind += f", {calls[0]}–{calls[-1]} timed calls per measurement"
    n, length = meta["texts"]
    s = meta["spec"]
    v = meta["versions"]
    w(
        f"Recorded from {kind}: `{meta['command']}`, {meta['started']} – "
        f"{meta.get('finished', '?')}, {meta['threads']} threads; captum {v.get('captum')}, "
        f"interpreto {v.get('interpreto')}, transformers {v.get('transformers')}. "
        f"`BertForSequenceClassification` (hidden {s['hidden']}, {s['layers']} layers, "
        f"{s['heads']} heads, vocabulary {s['vocab_size']}: a WordPiece tokenizer trained "
        f"locally, random weights), {n} texts of {length} tokens. **C1**: the 2-class head, "
        "each example's predicted class. **C2**: the 20-class head, every class (attrax "
        '`targets="all"`; Captum one batched `attribute` call per class). Objective: the softmax '
        "probability. Each (workload, method, library) runs in a fresh process; time is the "
        "median of the timed calls, memory the peak RSS of that process.\n"
    )
    w(
        "| workload | method | attrax (s) | Captum (s) | Interpreto (s) | peak RSS attrax / "
        "Captum / Interpreto |"
    )
    w("|---|---|---|---|---|---|")
    runs = {(r["workload"], r["method"], r["library"]): r for r in results["runs"]}
    ratio = {(r["workload"], r["method"], r["baseline"]): r for r in results["speedups"]}
    for wl, method in dict.fromkeys((r["workload"], r["method"]) for r in results["runs"]):
        ours = runs[wl, method, "attrax"]
        cells, rss = [], [f"{ours['rss_peak_mb']:.0f}"]
        for lib in ("captum", "interpreto"):
            r = runs.get((wl, method, lib))
            if r is None:
                cells.append("—")
                rss.append("—")
                continue
            sp = ratio[wl, method, lib]
            star = "\\*" if sp["extrapolated"] else ""
            flag = " (goal missed)" if sp["met"] is False else ""
            cells.append(
                f"{_fmt_s(r['median_s'] * r.get('scale', 1.0))}{star} "
                f"(**{_fmt_x(sp['speedup'])}**{flag})"
            )
            rss.append(f"{r['rss_peak_mb']:.0f}")
        label = CLASSIFIER_LABEL.get(method, method)
        w(
            f"| {wl} | {label} | {_fmt_s(ours['median_s'])} | {cells[0]} | {cells[1]} | "
            f"{' / '.join(rss)} MB |"
        )
    cases, goals = meta["cases"], meta["goals"]
    extrapolated = {wl: c["baseline_classes"] for wl, c in cases.items() if c["baseline_classes"]}
    w("")
    w(
        "Ratios are the baseline's time over attrax's (goals: C1 ≥ "
        f"{goals.get('C1 vs captum', goals.get('C1', 1.0)):g}x against both, never slower; C2 ≥ "
        f"{goals.get('C2 vs captum', goals.get('C2', 5.0)):g}x against Captum's loop over "
        "classes; none against Interpreto on C2). "
        + (
            "Every clock starts at the texts: Captum's includes the tokenizer call and embedding "
            "lookup its user writes, as attrax's and Interpreto's include their own. "
            if "C1 vs captum" in goals
            else ""
        )
        + "".join(
            f"\\* {wl}: libraries that loop over classes (Captum; Interpreto's gradient "
            f"methods) run the first {k} of the classes and their time counts classes / {k} "
            "times (each class costs them the same). "
            for wl, k in extrapolated.items()
        )
        + "IG: Gauss–Legendre, "
        + ", ".join(f"{wl} {c['steps']} points" for wl, c in cases.items())
        + "; Captum's reference input is its BERT tutorials' ([PAD] with [CLS]/[SEP] kept), "
        "attrax gets the same embeddings as its `baseline`. The machine is shared: the 1-minute "
        "load average during the measurements was "
        + _load_range(results["runs"])
        + "."
        + (
            " A quick run times few calls, each library in its own process at its own time, and "
            "on a shared machine calls vary by several times (saliency and input × gradient "
            "cost the same): its ratios are indicative only."
            if meta["quick"]
            else ""
        )
        + "\n"
    )
    w(
        "Parity of the timed outputs (max |attrax − baseline| / max |baseline| after the aggregation):\n"
    )
    for r in results["parity"]:
        errors = ", ".join(f"{k} {v:.1e}" for k, v in r["errors"].items())
        w(
            f"- {r['workload']} {CLASSIFIER_LABEL.get(r['method'], r['method'])} vs "
            f"{r['baseline']}: {'ok' if r['ok'] else 'FAILED'} ({errors})"
        )
    w("")
    return out


def _question_answering_section(results: dict[str, Any] | None) -> list[str]:
    """The question-answering workload (Q1) of ``python -m benchmarks question-answering``."""
    if not results:
        return []
    meta = results["meta"]
    n, question, context = meta["pairs"]
    about = (
        f"`BertForQuestionAnswering` is the classifiers' encoder (hidden {meta['spec']['hidden']}, "
        f"{meta['spec']['layers']} layers, random weights) with a `qa_outputs` head, the task of "
        f"Captum's BERT-on-SQuAD tutorial. The inputs are {n} (question, context) pairs of "
        f"{question} + {context} tokens, {question + context + 3} with the special tokens, so "
        "nothing is padded. The targets are each pair's predicted answer: the softmax "
        "probability of its start and of its end over the pair's positions. attrax attributes "
        "both targets in one call. Captum makes one batched `attribute` call per target, as its "
        "tutorial does."
    )
    if any(r["method"] == "conductance" for r in results["runs"]):
        about += (
            " Conductance is the tutorial's layer conductance at every block's output, from the "
            "same reference: attrax's one call (`layers=slice(1, None)`) against Captum's "
            "`LayerConductance`, one call per block of `bert.encoder.layer` and per target."
        )
    return _task_section("Question answering (Q1)", results, about)


def _masked_lm_section(results: dict[str, Any] | None) -> list[str]:
    """The masked-LM workload (M1) of ``python -m benchmarks masked-lm``."""
    if not results:
        return []
    meta = results["meta"]
    (n, length), masks = meta["texts"], meta["masks"]
    about = (
        f"`BertForMaskedLM` is the classifiers' encoder (hidden {meta['spec']['hidden']}, "
        f"{meta['spec']['layers']} layers, random weights) with an MLM head, its decoder tied to "
        f"the word embeddings. The inputs are {n} texts of {length} tokens with `[MASK]` at "
        f"positions {' and '.join(map(str, masks))}; each mask's target is the token the model "
        "predicts there, and the objective its softmax probability over the vocabulary. attrax "
        f"attributes the {len(masks)} masks in one call; Captum makes one batched `attribute` "
        "call per mask."
    )
    return _task_section("Masked LM (M1)", results, about)


def _step_scores_section(results: dict[str, Any] | None) -> list[str]:
    """Step scores against Inseq's step functions (S1) of ``python -m benchmarks step-scores``."""
    if not results:
        return []
    meta, v = results["meta"], results["meta"]["versions"]
    kind = "a quick run (`--quick`)" if meta["quick"] else "a full run"
    first = {r["workload"]: r["first_difference"] for r in results["parity"] if "score" not in r}
    out = ["## Step scores against Inseq (S1)\n"]
    w = out.append
    w(
        f"Recorded from {kind}: `{meta['command']}`, {meta['started']} – "
        f"{meta.get('finished', '?')}, {meta['threads']} threads; inseq {v.get('inseq')}, "
        f"transformers {v.get('transformers')}. W1 and W2's models, a prompt and a target of "
        f"{meta['lengths'][0]} and {meta['lengths'][1]} tokens. Inseq computes step scores "
        "beside an attribution, here its `dummy` method (no attribution), one forward per "
        "target step; attrax's `step_scores` is one teacher-forced forward. Each group is one "
        "call per library, timed in float32 in one process, calls alternated, median of "
        f"{meta['repeats']}; the clocks start at the texts.\n"
    )
    w("| workload | scores | attrax (s) | Inseq (s) | attrax's speed-up |")
    w("|---|---|---|---|---|")
    groups = {
        "basic": "probability, logit, entropy",
        "pair": "crossentropy, perplexity (two examples)",
        "contrast": "contrast_prob, contrast_logit, contrast_prob_diff, contrast_logit_diff",
        "inputs": "kl_divergence, pcxmi (and Inseq's in_context_pvi)",
    }
    for r in results["runs"]:
        w(
            f"| {r['workload']} | {groups[r['group']]} | {_fmt_s(r['attrax_s'])} | "
            f"{_fmt_s(r['inseq_s'])} | **{_fmt_x(r['speedup'])}** |"
        )
    w("")
    w(
        "Parity before timing, on float64 copies of the models (max |attrax − Inseq| / max "
        "|Inseq|, attrax's value stated as Inseq states it):\n"
    )
    for r in results["parity"]:
        if "score" in r:
            name = r["score"] if r["inseq"] == r["score"] else f"{r['score']} ({r['inseq']})"
            w(f"- {r['workload']} {name}: {'ok' if r['ok'] else 'FAILED'} ({r['error']:.1e})")
    w(
        "\nHow Inseq 0.7 states them: its `perplexity` is `2 ** crossentropy` with the "
        "crossentropy in nats (attrax: `exp`, so `1 / p`); its `pcxmi` is `log2 q(yₜ) − "
        "log2 p(yₜ)`, the negative of attrax's in bits; its `in_context_pvi` is "
        "`log q(yₜ) − log p(yₜ)`, attrax's `-pcxmi`. Its `contrast_*` scores take the contrast "
        "token after the contrast's own prefix, attrax's after the target's (Yin & Neubig's "
        "foil): the contrast here shares the target's first tokens, and the two are compared up "
        "to the first token that differs ("
        + ", ".join(f"{wl}: step {k}" for wl, k in first.items())
        + "). Inseq keeps its entropy and KL divergence in float32 (a `torch.zeros` it fills "
        "step by step), hence their ~1e-8. Inseq's `crossentropy` fails on one sequence (its target ids squeeze to a 0-d "
        "tensor) and Inseq runs a decoder-only model's given targets one sequence at a time, "
        "so the `pair` group runs on W2 only.\n"
    )
    return out


def _nli_section(results: dict[str, Any] | None) -> list[str]:
    """The encoder-decoder NLI workload (N1) of ``python -m benchmarks nli``."""
    if not results:
        return []
    meta = results["meta"]
    (n, premise, hypothesis), bart = meta["pairs"], meta["spec"]
    about = (
        f"`BartForSequenceClassification` is BART-MNLI's head (the zero-shot pipeline's model) on "
        f"a random BART (d_model {bart['d_model']}, {bart['layers']} encoder and "
        f"{bart['layers']} decoder layers). The inputs are {n} (premise, hypothesis) pairs of "
        f"{premise} + {hypothesis} tokens, {premise + hypothesis + 4} with the special tokens, "
        "so nothing is padded; the targets are the 3 classes, the objective their softmax "
        "probability. BART reads each token twice, in its encoder and (shifted right) in its "
        "decoder: attrax attributes to the token's one embedding, all classes in one call. "
        "Captum attributes to both embedding layers (`LayerGradientXActivation`, "
        "`LayerIntegratedGradients` on the encoder's and the decoder's `embed_tokens`, "
        "transformers' forward from ids), one batched call per class, and the decoder's row "
        "i + 1 is added to the encoder's row i."
    )
    return _task_section("Encoder-decoder NLI classifier (N1)", results, about, BART_REFERENCE)


#: IG's reference input of N1 and N2, and how Captum runs it
BART_REFERENCE = (
    "the BERT tutorials' reference in BART's tokens (`<pad>`, `<s>` and `</s>` kept); "
    "Captum runs it as `LayerIntegratedGradients` on both embedding layers"
)


def _seq2seq_qa_section(results: dict[str, Any] | None) -> list[str]:
    """The encoder-decoder question-answering workload (N2) of ``python -m benchmarks
    seq2seq-qa``."""
    if not results:
        return []
    meta = results["meta"]
    (n, question, context), bart = meta["pairs"], meta["spec"]
    about = (
        f"`BartForQuestionAnswering` (BART fine-tuned on SQuAD) on a random BART (d_model "
        f"{bart['d_model']}, {bart['layers']} encoder and {bart['layers']} decoder layers). The "
        f"inputs are {n} (question, context) pairs of {question} + {context} tokens, "
        f"{question + context + 4} with the special tokens, so nothing is padded; each pair's "
        "targets are the start and end of its predicted answer, the objective their softmax "
        "over the positions (as Q1's). attrax attributes both through the two stacks that read "
        "each token, in one call. Captum attributes to both embedding layers, one batched call "
        "per target, and the decoder's row i + 1 is added to the encoder's row i."
    )
    return _task_section("Encoder-decoder question answering (N2)", results, about, BART_REFERENCE)


BERT_REFERENCE = (
    "the BERT tutorials' reference ([PAD], [CLS] and [SEP] kept); Captum runs it as "
    "`LayerIntegratedGradients` on the word embeddings"
)


def _task_section(
    title: str, results: dict[str, Any], about: str, reference: str = BERT_REFERENCE
) -> list[str]:
    """A task workload's section: how it was recorded, ``about`` it, its timings and parity;
    ``reference``: IG's reference input and how Captum runs IG."""
    meta, v = results["meta"], results["meta"]["versions"]
    kind = "a quick run (`--quick`)" if meta["quick"] else "a full run"
    out = [f"## {title}\n"]
    w = out.append
    w(
        f"Recorded from {kind}: `{meta['command']}`, {meta['started']} – "
        f"{meta.get('finished', '?')}, {meta['threads']} threads; captum {v.get('captum')}, "
        f"transformers {v.get('transformers')}. {about} Both are timed in one process, calls "
        f"alternated, median of {meta['repeats']}. Both clocks start at the texts. IG uses "
        f"Gauss–Legendre with {meta['steps']} points from {reference}.\n"
    )
    w("| method | attrax (s) | Captum (s) | attrax's speed-up |")
    w("|---|---|---|---|")
    for r in results["runs"]:
        label = CLASSIFIER_LABEL.get(r["method"], r["method"])
        w(
            f"| {label} | {_fmt_s(r['attrax_s'])} | {_fmt_s(r['captum_s'])} | "
            f"**{_fmt_x(r['speedup'])}** |"
        )
    w("")
    w("Parity before timing (max |attrax − Captum| / max |Captum| after the aggregation):\n")
    for r in results["parity"]:
        # a cancellation-dominated sum's plain error is reported, not gated (parity.parity)
        errors = ", ".join(
            f"{k} {x:.1e}" + ("†" if k == "sum" and "sum_plain" in r["errors"] else "")
            for k, x in r["errors"].items()
            if k != "sum_plain"
        )
        label = CLASSIFIER_LABEL.get(r["method"], r["method"])
        w(f"- {label}: {'ok' if r['ok'] else 'FAILED'} ({errors})")
    if any("sum_plain" in r["errors"] for r in results["parity"]):
        w(
            "\n† The sum over hidden cancels to near 0 here (a signed gradient), so its error is "
            "taken relative to the largest L1 norm over hidden instead of the largest sum."
        )
    w("")
    return out


def _load_range(runs: list[dict[str, Any]]) -> str:
    loads = [r["load1_before"] for r in runs if r.get("load1_before") is not None]
    return f"{min(loads):.1f}–{max(loads):.1f} on {2} cores" if loads else "not recorded"


def _parity_section(results: dict[str, Any]) -> list[str]:
    out = ["## Parity\n"]
    w = out.append
    w(
        f"attrax must equal each baseline within {results['meta']['tolerance']:g} relative error "
        "(max |attrax − baseline| / max |baseline|) after each aggregation, or the benchmark "
        "exits with status 2 before writing these docs. Aggregations: *l2_normalize* = L2 norm "
        "over hidden, then divided by the L1 norm over source (attrax side: "
        "`ax.pipe(ax.l2_norm, ax.normalize)`); *sum* = sum over hidden (`ax.sum`); attention: "
        "*head_mean_normalize* = mean over heads, normalized over source; and *raw* (no "
        "aggregation: the normalized aggregates cannot see a scale error). The NaN pattern "
        "(future positions) must be identical.\n"
    )

    def errors(r: dict[str, Any]) -> str:
        e = r["errors"]
        s = _fmt_e(e.get("sum")) + ("†" if "sum_plain" in e else "")
        second = e.get("l2_normalize", e.get("head_mean_normalize"))
        return f"{_fmt_e(e.get('raw'))} | {_fmt_e(second)} | {s} | {'yes' if r['ok'] else 'NO'} |"

    w("Parity of the timed outputs:\n")
    w("| workload | method | baseline | targets compared | raw | l2_normalize | sum | ok |")
    w("|---|---|---|---|---|---|---|---|")
    for r in results["parity"]:
        w(
            f"| {r['workload']} | {LABEL[r['method']]} | {LIB[r['baseline']]} | "
            f"{r['targets_compared']} | {errors(r)}"
        )
    if results.get("gate"):
        w("\nParity gate (small inputs, checked before any timing):\n")
        w("| model | sizes | method | baseline | raw | l2_normalize | sum | ok |")
        w("|---|---|---|---|---|---|---|---|")
        for r in results["gate"]:
            w(
                f"| {r['kind']} | {r['sizes']} | {LABEL[r['method']]} | {LIB[r['baseline']]} | "
                f"{errors(r)}"
            )
    degenerate = [
        r for r in results["parity"] + results.get("gate", []) if "sum_plain" in r["errors"]
    ]
    if degenerate:
        ratio = max(r.get("sum_over_l1", float("nan")) for r in degenerate)
        plain = max(r["errors"]["sum_plain"] for r in degenerate)
        w(
            "\n† Saliency on the GPT-2 model: the sum of the gradient over hidden is exactly 0 in "
            "real arithmetic (every path from the embeddings enters a LayerNorm, whose input "
            "gradient has zero mean), so both sides hold only float rounding noise there "
            f"(max |sum| at most {ratio:.0e} of the largest L1 norm over hidden). The error "
            "is then taken "
            "relative to the largest L1 norm over hidden instead of the largest |sum|; relative "
            f"to the noise itself it is up to {plain:.1f} (meaningless)."
        )
    w(
        '\nNot compared: the trapezoid rule (attrax `quadrature="riemann_trapezoid"`, Captum\'s '
        '`method="riemann_trapezoid"`). Captum 0.9\'s trapezoid weights are '
        "1/n with halved ends, summing to (n−1)/n, so Captum's (and Inseq's) trapezoid IG is "
        "(n−1)/n times attrax's (weights 1/(n−1), halved ends, summing to 1): a 2.0% difference "
        "at 50 steps, exactly that factor.\n"
    )
    return out


def _gpu_summary(gpu: dict[str, Any]) -> str:
    """One paragraph on the GPU results."""
    grad = [r for r in speedups(gpu["runs"], GPU_GOALS) if r["method"] != "attention"]
    if not grad:
        return ""
    met = [r for r in grad if r["met"]]
    missed = ", ".join(
        f"{r['workload']} {LABEL[r['method']]} vs {LIB[r['baseline']]} {r['speedup']:.1f}×"
        for r in grad
        if not r["met"]
    )
    return (
        f"**On a GPU** ({gpu['meta']['device_name']}, [details](benchmarks-gpu.md)): the "
        f"gradient methods are ≥ {GPU_GOALS['saliency']:.0f}× faster than Captum's and Inseq's "
        f"loops in {len(met)} of {len(grad)} comparisons (smallest "
        f"{min(r['speedup'] for r in grad):.1f}×, largest {max(r['speedup'] for r in grad):.0f}×)"
        + (f"; below: {missed}" if missed else "")
        + ".\n"
    )


def _variant_summary(results: dict[str, Any], variant: dict[str, Any], name: str) -> str:
    """One paragraph on a variant run (malloc tuned, or the baselines on another attention)."""
    default, measured = _keyed(results["runs"], "library"), _keyed(variant["runs"], "library")
    rows = []
    for r in speedups(variant["runs"], CPU_GOALS):
        key = (r["workload"], r["method"], r["baseline"])
        was = f", {_fmt_s(default[key]['median_s'])} s by default" if key in default else ""
        lib, star = LIB[r["baseline"]], "\\*" if r["extrapolated"] else ""
        rows.append(
            f"{r['workload']} {LABEL[r['method']]} {r['speedup']:.1f}×{star} vs {lib} ({lib} "
            f"{_fmt_s(measured[key]['median_s'])} s{was})"
        )
    meta = variant["meta"]
    if meta.get("malloc_env"):
        env = " ".join(f"{k}={v}" for k, v in meta["malloc_env"].items())
        return (
            f"**Every library with glibc's malloc tuned** (`{env}` for every process, in which "
            "case attrax leaves malloc alone; one round, one timed call each; `benchmarks/"
            f"{name}`): {'; '.join(rows)}. Captum and Inseq gain from the same setting. Part of "
            "the gap in the tables below is therefore attrax tuning malloc for its own vectorized "
            "backward ([host memory](methods/gradients.md#host-memory)), which users do not "
            "usually do for Captum and Inseq.\n"
        )
    attn = meta["baseline_attn"]
    return (
        f"**Captum and Inseq with `{attn}` attention** (`--baseline-attn {attn}`, the attention "
        "attrax itself runs on these lengths; one round, one timed call each; `benchmarks/"
        f"{name}`): {'; '.join(rows)}. SDPA speeds the loops up too, but less: their time goes "
        "mostly to the full-vocabulary projection at every prefix position, attrax's to "
        "attention.\n"
    )


# --------------------------------------------------------------------------------------------------
# GPU markdown
# --------------------------------------------------------------------------------------------------
def render_gpu(
    results: dict[str, Any],
    real_size: dict[str, dict[str, Any]] | None = None,
    w3_options: dict[str, Any] | None = None,
) -> str:
    """``docs/benchmarks-gpu.md`` from GPU results and the ``real-size`` GPU files."""
    m = results["meta"]
    v, git = m["versions"], (m.get("attrax_source") or {}).get("git_head")
    lines: list[str] = []
    w = lines.append
    w("# attrax on a GPU, against Captum and Inseq\n")
    w(
        f"Measured by `{m['command']}` on one {m['device_name']} ({m['started']}); "
        f"Python {m['machine']['python']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"Captum {v['captum']}, Inseq {v['inseq']}"
        + (f"; attrax at git {git}" if git else "")
        + ". Models, texts, objective, IG steps "
        f"(`{m['ig']['method']}`) and baselines are those of the CPU benchmarks "
        "([benchmarks.md](benchmarks.md)); float32 everywhere, TF32 off. Each cell: one warm-up "
        "call, then at least 3 timed calls adding up to 1 s (at most 10); the median. The clock "
        "covers the public call, which returns host arrays. Peak memory: "
        "`torch.cuda.max_memory_allocated` during the timed calls, over what the model holds.\n"
    )
    sp = _keyed(speedups(results["runs"], GPU_GOALS), "baseline")
    if not any(r["extrapolated"] for r in sp.values()):
        w(
            "W3 (1024 + 128 tokens): every side runs all 128 targets for saliency, input × "
            "gradient and attention; for IG every side runs the first 16 targets. Nothing is "
            "extrapolated.\n"
        )
    runs = _keyed(results["runs"], "library")
    w(
        f"Goal on a GPU: ≥ {GPU_GOALS['saliency']:.0f}× for every gradient method (attention: ≥ "
        f"{GPU_GOALS['attention']:.0f}×, the CPU goal).\n"
    )
    w(
        "| workload | method | attrax | Captum | Inseq | vs Captum | vs Inseq | peak GPU MB "
        "(attrax / Captum / Inseq) |"
    )
    w("|---|---|---|---|---|---|---|---|")
    for wl in sorted({r["workload"] for r in results["runs"]}):
        for method in METHOD_ORDER:
            got = [runs.get((wl, method, lib)) for lib in LIB]
            if not any(r and "error" not in r for r in got):
                continue
            cells = [wl, SHORT[method]]
            for lib, r in zip(LIB, got, strict=True):
                if r is None:
                    cells.append("n/a" if lib == "captum" and method == "attention" else "–")
                else:
                    cells.append("error" if "error" in r else f"{r['median_s'] * 1e3:.1f} ms")
            for b in BASELINES:
                s = sp.get((wl, method, b))
                mark = (
                    ""
                    if s is None
                    else ("\\*" if s["extrapolated"] else "") + ("" if s["met"] else " ✗")
                )
                cells.append("–" if s is None else _fmt_x(s["speedup"]) + mark)
            mems = [None if r is None else r.get("gpu_peak_mb") for r in got]
            cells.append(" / ".join("–" if mb is None else f"{mb:.0f}" for mb in mems))
            w("| " + " | ".join(cells) + " |")
    w("\n✗ = below the goal. \\* = the baseline ran fewer targets; its time is scaled up.\n")
    par = results.get("parity", [])
    if par:
        worst = max((v for p in par for k, v in p["errors"].items() if k != "sum_plain"), default=0)
        bad = [p for p in par if not p["ok"]]
        w(
            f"**Parity** of the timed outputs ({len(par)} comparisons, after L2 over hidden + "
            f"normalize, sum over hidden, and raw): "
            + ("all within 1e-4 relative; " if not bad else f"{len(bad)} FAILED; ")
            + f"largest error {worst:.1e}.\n"
        )
    if results.get("variants"):
        lines += _w3_options(results, runs, rerun=bool(w3_options))
    if w3_options:
        lines += _w3_options_rerun(w3_options)
    smoke = results.get("smoke", [])
    if smoke:
        worst = max((r.get("rel_err", 0.0) for r in smoke), default=0.0)
        w(
            f"**Device smoke test**: every public method of attrax on tiny GPT-2 and Marian models "
            f"gave the same result on the GPU as on the CPU in {sum(r['ok'] for r in smoke)} of "
            f"{len(smoke)} cases (largest relative difference {worst:.1e})."
        )
        w(
            "".join(
                f"- {r['model']} {r['method']}: {r.get('error', r.get('rel_err'))}\n"
                for r in smoke
                if not r["ok"]
            )
        )
    if real_size:
        lines += _real_size_section(real_size, gpu=True)
        lines += _real_size_missing(real_size)
    else:
        w(
            "## Real size and long context (GPU): not measured yet\n\n"
            "No GPU has been lent since this part was written. `bash benchmarks/gpu_memory.sh "
            "long long-ig long-lrp` runs it: a Llama-3-8B-shaped bfloat16 model built on the GPU "
            "with random weights, 128 targets after 2,048- and 8,192-token prompts; saliency and "
            "input × gradient (both lengths), integrated gradients and AttnLRP (2,048); attrax "
            "within `max_memory`, Captum and Inseq on their first targets (their time "
            "extrapolated; an out-of-memory loop recorded as such). Copying its "
            "`benchmarks/results/real-size-llama3-8b-*-cuda.json` into `benchmarks/` and running "
            "`python -m benchmarks report` puts the tables here.\n"
        )
    return "\n".join(lines)


def _w3_options(
    results: dict[str, Any], runs: dict[tuple[str, str, str], Any], rerun: bool = False
) -> list[str]:
    """The GPU page's paragraphs on attrax's options on W3 and why W3 stays below the goal."""
    rows = results["variants"]
    plan = results["meta"].get("plans", {}).get("W3", {})
    # runs before the vmap-aware SDPA fixed W3's attention (eager, chunk_size=32)
    chosen = plan.get("attn_implementation")
    folded = any("sdpa_backwards" in v for v in rows)
    used = (
        f"The W3 rows of the table above run the fastest of these, {chosen} attention and "
        f"`chunk_size={plan.get('chunk_size')}`."
        if chosen
        else "The table above uses eager attention and `chunk_size=32`."
    )
    options = (
        "**attrax options on W3 saliency** (attrax alone, median of 3 calls): "
        + "; ".join(
            f"{v['attn']} attention, `chunk_size={v['chunk_size']}` {v['median_s'] * 1e3:.0f} ms"
            + (f" ({v['sdpa_backwards']} fused backwards)" if "sdpa_backwards" in v else "")
            for v in rows
        )
        + f". {used} "
        + (
            "`torch.profiler` tables of one call with `chunk_size=32` are in "
            "`benchmarks/gpu-h200-profile-w3-saliency.txt` (eager) and "
            "`benchmarks/gpu-h200-profile-w3-saliency-sdpa.txt` (SDPA).\n"
            if folded
            else "A `torch.profiler` table of one such call is in "
            "`benchmarks/gpu-h200-profile-w3-saliency.txt`.\n"
        )
    )
    ig = runs.get(("W3", "integrated_gradients", "attrax"))
    captum = runs.get(("W3", "integrated_gradients", "captum"))
    measured = (
        f"10× over Captum's {captum['median_s']:.1f} s is possible in principle, and the measured "
        f"{ig['median_s']:.1f} s is not bound by arithmetic"
        if ig and captum
        else "10× over Captum is possible in principle"
    )
    sdpa = (
        "The sdpa variants above ran attrax's vmap-aware SDPA (`attrax._sdpa`): every target "
        "folded into the batch dim, one fused backward per attention call and chunk."
        if folded
        else "In this run SDPA's fused backward had no `vmap` batching rule: it fell back to one "
        "call per target and was slower still (the sdpa variants above). attrax now runs SDPA "
        "through its own vmap-aware op (`attrax._sdpa`): every target folded into the batch "
        "dim, one fused backward per attention call, which on a GPU recomputes the forward "
        "through `F.scaled_dot_product_attention` so that torch picks the kernel "
        "([gradients](methods/gradients.md#sdpas-backward-under-vmap)). "
        + (
            "Its effect on the GPU is measured in the later run below."
            if rerun
            else "Its effect on the GPU is not measured yet: `python -m benchmarks run --device "
            "cuda --variants` measures it and runs W3 with the fastest option."
        )
    )
    below = (
        "**Below the goal on W3.** attrax does one backward per (target, point) through "
        "~1100 positions. For W3 IG that is 16 × 50 backwards, about 9 TFLOP: some 0.15 s at "
        f"the H200's float32 rate, so {measured}. The vectorized eager attention backward "
        "materializes `[targets × points, heads, n, n]` tensors (7 GB each here), so "
        "softmax-backward, multiply and copy kernels bound by memory dominate. " + sdpa + "\n"
    )
    return [options, below]


def _w3_options_rerun(rerun: dict[str, Any]) -> list[str]:
    """A paragraph on a later device run of the W3 options alone, against the run above's."""
    meta, rows = rerun["meta"], rerun["variants"]

    def best(attn: str) -> dict[str, Any]:
        return min((v for v in rows if v["attn"] == attn), key=lambda v: v["median_s"])

    eager, sdpa = best("eager"), best("sdpa")
    cells = "; ".join(
        f"{v['attn']}, `chunk_size={v['chunk_size']}` {v['median_s'] * 1e3:.0f} ms" for v in rows
    )
    return [
        f"**W3 options again, {meta['started'][:10]}** ({meta['device_name']}, torch "
        f"{meta['versions']['torch']}, attrax at `{meta['attrax_source']['git_head']}`; "
        f"`benchmarks/{W3_OPTIONS.name}`: {meta['note']}): {cells}. attrax's vmap-aware SDPA "
        f"(every target folded into one fused backward per attention call) is now the fastest, "
        f"{sdpa['median_s'] * 1e3:.0f} ms against eager's best {eager['median_s'] * 1e3:.0f} ms "
        f"({eager['median_s'] / sdpa['median_s']:.2f}×). The W3 ratios in the table above are "
        "still those of the earlier run; a ratio across runs is not a measurement, so none is "
        "given. Profiles of one call with `chunk_size=32`: "
        "`benchmarks/gpu-h200-w3-options-profile-eager.txt` and `-sdpa.txt`.\n"
    ]


#: what each GPU real-size file holds, for the parts not yet measured
REAL_SIZE_GPU_PARTS = {
    "real-size-llama3-8b-2048-cuda.json": "saliency and input × gradient over 2,048 tokens",
    "real-size-llama3-8b-8192-cuda.json": "saliency and input × gradient over 8,192 tokens",
    "real-size-llama3-8b-2048-ig-cuda.json": "integrated gradients over 2,048 tokens",
    "real-size-llama3-8b-2048-lrp-cuda.json": "AttnLRP over 2,048 tokens",
}


def _real_size_missing(files: dict[str, Any]) -> list[str]:
    """The GPU real-size parts with no results file yet, and the command that measures them."""
    missing = [name for name in REAL_SIZE_GPU if name not in files]
    if not missing:
        return []
    parts = {
        "real-size-llama3-8b-2048-cuda.json": "long:2048",
        "real-size-llama3-8b-8192-cuda.json": "long:8192",
        "real-size-llama3-8b-2048-ig-cuda.json": "long-ig",
        "real-size-llama3-8b-2048-lrp-cuda.json": "long-lrp",
    }
    return [
        "**Not measured yet**: "
        + "; ".join(REAL_SIZE_GPU_PARTS[name] for name in missing)
        + ". The device time lent so far ran out first (`benchmarks/gpu-h200-2026-12-04.log` "
        "records the runs). `bash benchmarks/device_run.sh "
        + " ".join(parts[name] for name in missing)
        + "` on a lent GPU measures them (`benchmarks/README.md`).\n"
    ]


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def load(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def render_all(cpu: Path = CPU_RESULTS, gpu: Path = GPU_RESULTS) -> dict[str, str]:
    """``{doc name: markdown}`` from the results files (read only)."""
    gpu_results = load(gpu)
    variants = {p.name: load(p) for p in VARIANTS if p.exists()}
    real_size = {n: load(HERE / n) for n in REAL_SIZE if (HERE / n).exists()}
    return {
        "benchmarks.md": render_cpu(load(cpu), gpu_results, variants, real_size=real_size),
        "benchmarks-gpu.md": render_gpu(
            gpu_results,
            {n: load(HERE / n) for n in REAL_SIZE_GPU if (HERE / n).exists()},
            load(W3_OPTIONS) if W3_OPTIONS.exists() else None,
        ),
    }


def write_between(page: Path, begin: str, end: str, block: str) -> None:
    """Put ``block`` between the markers ``begin`` and ``end`` of ``page`` (a benchmark's table
    in a methods page)."""
    text = page.read_text()
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    page.write_text(f"{head}{begin}\n{block}\n{end}{tail}")


def write_docs(cpu: Path = CPU_RESULTS, gpu: Path = GPU_RESULTS, docs: Path = DOCS) -> None:
    """Render ``docs/benchmarks.md``, ``docs/benchmarks.png`` and ``docs/benchmarks-gpu.md``."""
    for name, text in render_all(cpu, gpu).items():
        (docs / name).write_text(text)
    plot_speedups(load(cpu), docs / "benchmarks.png")
    print(
        f"wrote {', '.join(str(docs / n) for n in ('benchmarks.md', 'benchmarks.png', 'benchmarks-gpu.md'))}"
    )
