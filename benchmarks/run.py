#!/usr/bin/env python
"""attrax vs Captum 0.9 (per-token loop) and Inseq 0.7: parity first, then time and peak memory.

Run inside the bench venv (``bash benchmarks/setup_bench_env.sh``)::

    .bench-venv/bin/python benchmarks/run.py                 # full run, regenerates the docs
    .bench-venv/bin/python benchmarks/run.py --quick         # ~2 min smoke run, docs untouched
    .bench-venv/bin/python benchmarks/run.py --workloads W1,W2 --methods saliency,attention \\
        --threads 2 --repeats 3

What it does:

1. **Parity gate** (in this process, small inputs: GPT-2 8+6 tokens, Marian 8->6): every selected
   method through attrax, Captum and Inseq; after the same aggregations (L2 over hidden then
   normalized over source; sum over hidden) attrax must equal each baseline within 1e-4 relative
   error, or the run stops with exit status 2.
2. **Measurements**: each (workload, method, library) runs in a fresh subprocess with the same
   ``torch.set_num_threads`` (and OMP/MKL thread variables): load the model, warm up on a short
   input, then time ``--repeats`` calls (the median is reported; fewer repeats when one call is so
   slow that they would exceed ``--budget`` seconds). Peak RSS is the process's ``VmHWM``; it is
   reset (``/proc/self/clear_refs``) after set-up so that the attribution's own peak is known too.
   The outputs of the timed calls are checked for parity again (exit status 2 on a mismatch).
3. Writes ``benchmarks/results/results.json`` and (full runs) regenerates ``docs/benchmarks.md``
   and ``docs/benchmarks.png``.

W3 (1024 + 128 tokens): the per-token baselines would take hours for IG (every target token is its
own 50-point batch over ~1100 positions with the full 50257-way LM head), so Captum and Inseq run
on the first few target tokens only and their time is extrapolated linearly to all 128 targets
(labelled as such; per-token cost grows with the prefix, so this *under*-estimates their time,
i.e. it is conservative for attrax). attrax runs all 128 targets for saliency, input x gradient and
attention (``chunk_size`` bounds the memory of the vectorized backward); for IG all three
libraries run the same first targets, so that ratio is measured, not extrapolated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _attrax_runs import TOLERANCE, first_targets, parity  # noqa: E402

METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "attention")
LIBRARIES = ("attrax", "captum", "inseq")
BASELINES = ("captum", "inseq")
SUPPORTS = {
    "attrax": set(METHODS),
    "captum": {"saliency", "input_x_gradient", "integrated_gradients"},  # Captum has no attention
    "inseq": set(METHODS),
}
SHORT = {
    "saliency": "saliency",
    "input_x_gradient": "input x gradient",
    "integrated_gradients": "IG",
    "attention": "attention",
}
# speedup goals (attrax vs each baseline, 2-core CPU)
GOALS = {"saliency": 10.0, "input_x_gradient": 10.0, "integrated_gradients": 2.5, "attention": 2.0}
IG_STEPS = 50
IG_METHOD = "gausslegendre"
DEFAULT_OUT = HERE / "results" / "results.json"
# fast calls are repeated until their timed calls add up to MIN_TIME seconds (at most MAX_REPEATS)
MIN_TIME = 1.0
MAX_REPEATS = 25
DOCS = REPO / "docs"


@dataclasses.dataclass
class Plan:
    """One workload: sizes, and how each library runs it."""

    name: str
    kind: str  # gpt2 | marian
    n_prompt: int
    n_target: int
    # Captum/Inseq run only the first k targets (None: all) and are extrapolated by n_target / k
    baseline_targets: dict[str, int | None]
    # attrax runs only the first k targets (None: all); used for W3 IG, same k as the baselines
    attrax_targets: dict[str, int | None]
    chunk_size: int | None = None  # attrax chunk_size (targets per vectorized backward)
    batch_size: int | None = None  # attrax IG batch_size (interpolation points per forward)
    internal_batch_size: int | None = None  # Captum/Inseq IG internal_batch_size
    steps: int = IG_STEPS  # IG quadrature points, the same for every library


def plans(quick: bool) -> dict[str, Plan]:
    none = dict.fromkeys(METHODS)
    if quick:  # a smoke run: every code path, small sizes, 16 IG steps
        w3_base = {m: 2 for m in METHODS} | {"integrated_gradients": 1, "attention": None}
        return {
            "W1": Plan("W1", "gpt2", 16, 8, none, none, steps=16),
            "W2": Plan("W2", "marian", 16, 8, none, none, steps=16),
            "W3": Plan(
                "W3", "gpt2", 192, 8, w3_base, none | {"integrated_gradients": 1}, 4, 8, 8, 16
            ),
        }
    # attention is one forward in Inseq too (not a per-target loop): run it on all targets
    w3_base = {m: 8 for m in METHODS} | {"integrated_gradients": 2, "attention": None}
    return {
        "W1": Plan("W1", "gpt2", 32, 32, none, none),
        "W2": Plan("W2", "marian", 32, 32, none, none),
        "W3": Plan("W3", "gpt2", 1024, 128, w3_base, none | {"integrated_gradients": 2}, 8, 10, 10),
    }


# --------------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------------
def texts(plan: Plan, tok) -> tuple[str, str]:
    import _models

    w = _models.workload(plan.name, tok=tok, n_prompt=plan.n_prompt, n_target=plan.n_target)
    return w.prompt, w.target


def first_target_text(tok, prompt: str, target: str, k: int | None, kind: str) -> str:
    """The text of the first ``k`` target tokens (decoder-only), checked to tokenize as such."""
    if k is None:
        return target
    if kind != "gpt2":
        raise ValueError("target subsets are implemented for decoder-only workloads only")
    ids = tok(target, add_special_tokens=False)["input_ids"]
    if k >= len(ids):
        return target
    text = tok.decode(ids[:k])
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    full = tok(prompt + text, add_special_tokens=False)["input_ids"]
    if full != p + ids[:k]:
        raise RuntimeError(f"the first {k} target tokens do not round-trip through decode")
    return text


# --------------------------------------------------------------------------------------------------
# Running one library (used by the worker subprocess and by the in-process parity gate)
# --------------------------------------------------------------------------------------------------
class Runner:
    """Holds what one library needs for one model (loaded once), runs one method."""

    def __init__(
        self,
        library: str,
        kind: str,
        method: str,
        device: str | None = None,
        baseline_attn: str = "eager",
    ):
        import _models

        self.library, self.kind, self.method = library, kind, method
        # attrax picks its attention per call (its default "auto"); Inseq's attention method needs
        # eager attention maps
        attn = "eager" if library == "attrax" or method == "attention" else baseline_attn
        self.hf, self.tok = _models.load(kind, attn_implementation=attn)
        if device is not None:
            self.hf.to(device)  # Inseq keeps a model's device on a GPU machine; so do the others
        self.handle: Any = None
        if library == "attrax":
            import attrax as ax

            self.handle = ax.load_model(self.hf, tokenizer=self.tok)
        elif library == "inseq":
            from _baselines import inseq_load

            self.handle, _ = inseq_load(self.hf, self.tok, method)
        elif library != "captum":
            raise ValueError(library)

    def __call__(self, prompt: str, target: str, plan: Plan | None) -> tuple[Any, float, Any]:
        """-> (raw attributions ndarray, seconds, attrax aggregates or None)."""
        method = self.method
        if self.library == "attrax":
            from _attrax_runs import attrax_aggregates, attrax_attribute

            out = attrax_attribute(
                self.handle,
                prompt,
                target,
                method,
                n_steps=plan.steps if plan else IG_STEPS,
                ig_method=IG_METHOD,
                chunk_size=plan.chunk_size if plan else None,
                batch_size=plan.batch_size if plan else None,
            )
            return out["attributions"], out["seconds"], attrax_aggregates(out["dataarray"], method)
        ibs = plan.internal_batch_size if plan else None
        # the same quantity on both sides: signed gradients, the same IG quadrature and batches
        common: dict[str, Any] = dict(
            n_steps=plan.steps if plan else IG_STEPS,
            ig_method=IG_METHOD,
            abs=False,
            internal_batch_size=ibs if method == "integrated_gradients" else None,
        )
        if self.library == "captum":
            from _baselines import captum_attribute

            res = captum_attribute(
                self.hf,
                self.tok,
                prompt,
                target,
                method,
                baseline="inseq",
                objective="probability",
                **common,
            )
        else:
            from _baselines import inseq_attribute

            res = inseq_attribute(
                self.hf,
                self.tok,
                prompt,
                target,
                method,
                step_scores=(),  # Inseq's default: no step scores
                inseq_model=self.handle,
                **common,
            )
        return res.attributions, res.seconds, None


# --------------------------------------------------------------------------------------------------
# Worker (one measurement in a fresh process)
# --------------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(spec_path: str) -> None:
    """Run the jobs of one spec (one job per process in full runs) and write a report per job."""
    import gc
    import resource

    import numpy as np

    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    plan = Plan(**spec["plan"])
    library = spec["library"]
    for job in spec["jobs"]:
        method = job["method"]
        t0 = time.perf_counter()
        runner = Runner(library, plan.kind, method, baseline_attn=spec["baseline_attn"])
        setup_seconds = time.perf_counter() - t0
        setup_hwm = _status_kb("VmHWM")
        setup_rss = _status_kb("VmRSS")
        can_reset = _reset_peak()
        base_rss = _status_kb("VmRSS")

        warm_seconds = runner(spec["warm_prompt"], spec["warm_target"], plan)[1]
        times: list[float] = []
        raw = agg = None
        spent = 0.0
        while True:
            raw, seconds, agg = runner(job["prompt"], job["target"], plan)
            times.append(seconds)
            spent += seconds
            n = len(times)
            if (
                n >= max(spec["repeats"], MAX_REPEATS)
                or spent + statistics.median(times) > spec["budget"]
            ):
                break
            if n >= spec["repeats"] and spent >= spec["min_time"]:
                break
        run_hwm = _status_kb("VmHWM")
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        keep = job.get("keep")
        arrays = {"raw": raw} if agg is None else {f"agg_{k}": v for k, v in agg.items()}
        if keep:
            arrays = {name: v[: keep[0], : keep[1]] for name, v in arrays.items()}
        np.savez(job["out"] + ".npz", **arrays)
        peak = None
        if setup_hwm is not None and run_hwm is not None:
            peak = max(setup_hwm, run_hwm) if can_reset else run_hwm
        report = {
            "times": times,
            "warmup_seconds": warm_seconds,
            "setup_seconds": setup_seconds,
            "rss_setup_mb": _mb(setup_rss),
            "rss_peak_mb": _mb(peak) if peak is not None else maxrss / 1024,
            "rss_attribution_mb": _mb(run_hwm - base_rss) if can_reset and run_hwm else None,
            "peak_reset": can_reset,
            "shared_process": len(spec["jobs"]) > 1,
            "shape": list(raw.shape) if raw is not None else list(next(iter(agg.values())).shape),
            "threads": torch.get_num_threads(),
        }
        Path(job["out"] + ".json").write_text(json.dumps(report))
        del runner, raw, agg, arrays
        gc.collect()


def _mb(kb: int | None) -> float | None:
    return None if kb is None else kb / 1024


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------
def cpu_busy_seconds() -> float | None:
    """CPU-seconds spent non-idle by the whole machine since boot (/proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure(
    library: str,
    plan: Plan,
    jobs: list[dict[str, Any]],
    warm: tuple[str, str],
    args: argparse.Namespace,
    tmp: Path,
) -> list[dict[str, Any]]:
    """Run ``jobs`` (dicts: method, prompt, target, keep) of one library in one fresh process."""
    tag = f"{plan.name}-{library}-" + "-".join(j["method"] for j in jobs)
    for job in jobs:
        job["out"] = str(tmp / f"{plan.name}-{job['method']}-{library}")
    spec = {
        "plan": dataclasses.asdict(plan),
        "library": library,
        "jobs": jobs,
        "warm_prompt": warm[0],
        "warm_target": warm[1],
        "threads": args.threads,
        "baseline_attn": args.baseline_attn,
        "repeats": args.repeats,
        "budget": args.budget,
        "min_time": 0.0 if args.quick else MIN_TIME,
    }
    spec_path = tmp / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error",
        HF_HUB_OFFLINE="1",
        PYTHONWARNINGS="ignore",
    )
    load_before = os.getloadavg()[0]
    busy0, child0, wall0 = cpu_busy_seconds(), children_cpu_seconds(), time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - wall0
    busy1, child1 = cpu_busy_seconds(), children_cpu_seconds()
    missing = [j["method"] for j in jobs if not Path(j["out"] + ".json").exists()]
    if proc.returncode != 0 or missing:
        raise RuntimeError(
            f"{library} {', '.join(missing) or ''} on {plan.name} failed (exit "
            f"{proc.returncode}):\n" + proc.stderr[-4000:]
        )
    foreign = None
    if busy0 is not None and busy1 is not None:
        foreign = max(0.0, ((busy1 - busy0) - (child1 - child0)) / wall)
    reports = []
    for job in jobs:
        report = json.loads(Path(job["out"] + ".json").read_text())
        report.update(
            library=library,
            method=job["method"],
            workload=plan.name,
            median_s=statistics.median(report["times"]),
            load1_before=load_before,
            load1_after=os.getloadavg()[0],
            foreign_cores=foreign,
            worker_wall_s=wall,
            arrays=job["out"] + ".npz",
        )
        reports.append(report)
    return reports


def load_arrays(path: str) -> dict[str, Any]:
    import numpy as np

    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def check(result: dict[str, Any], where: str, failures: list[str]) -> None:
    for line in result["failures"]:
        failures.append(f"{where}: {line}")


def parity_gate(
    workloads: list[str], methods: list[str], libraries: list[str]
) -> list[dict[str, Any]]:
    """Small inputs, all libraries in this process; returns the records (ok or not)."""
    import _models

    kinds = sorted({plans(False)[w].kind for w in workloads})  # gpt2, then marian
    records = []
    for kind in kinds:
        name = "W1" if kind == "gpt2" else "W2"
        _, tok = _models.load(kind)
        w = _models.workload(name, tok=tok, n_prompt=8, n_target=6)
        for method in methods:
            attrax = Runner("attrax", kind, method)
            _, _, agg = attrax(w.prompt, w.target, None)
            for lib in libraries:
                if lib == "attrax" or method not in SUPPORTS[lib]:
                    continue
                raw, _, _ = Runner(lib, kind, method)(w.prompt, w.target, None)
                res = parity(agg, raw, method)
                records.append(
                    dict(
                        kind=kind,
                        sizes="8+6" if kind == "gpt2" else "8->6",
                        method=method,
                        baseline=lib,
                        **res,
                    )
                )
                flag = "ok" if res["ok"] else "FAIL"
                errs = ", ".join(f"{k} {v:.1e}" for k, v in res["errors"].items())
                print(f"  parity {kind:6s} {method:21s} vs {lib:6s}: {flag}  ({errs})", flush=True)
    return records


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        m = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
        mem = round(int(m.group(1)) / 1024**2, 1) if m else None
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def attrax_source() -> dict[str, Any]:
    """Which attrax code was measured: git HEAD, uncommitted files under src/attrax, a hash."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((REPO / "src" / "attrax").rglob("*.py")):
        digest.update(path.relative_to(REPO).as_posix().encode())
        digest.update(path.read_bytes())
    out: dict[str, Any] = {"sha256_src": digest.hexdigest()[:16]}
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src/attrax"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        out["git_head"] = head.stdout.strip() or None
        out["uncommitted"] = [line[3:] for line in dirty.stdout.splitlines()]
    except OSError:
        pass
    return out


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("attrax", "torch", "transformers", "captum", "inseq", "numpy", "xarray"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def wait_for_quiet(max_load: float | None, max_wait: float) -> None:
    """Before starting: wait until the 1-minute load average is below ``max_load``."""
    if max_load is None:
        return
    t0 = time.time()
    while os.getloadavg()[0] > max_load:
        if time.time() - t0 > max_wait:
            print(
                f"warning: load average still {os.getloadavg()[0]:.2f} > {max_load} after "
                f"{max_wait:.0f} s; measuring anyway",
                file=sys.stderr,
            )
            return
        print(f"  load average {os.getloadavg()[0]:.2f} > {max_load}: waiting ...", flush=True)
        time.sleep(30)


def foreign_now(window: float = 3.0) -> float | None:
    """Cores busy over the next ``window`` seconds while this (idle) process waits: other jobs."""
    b0 = cpu_busy_seconds()
    time.sleep(window)
    b1 = cpu_busy_seconds()
    return None if b0 is None or b1 is None else max(0.0, (b1 - b0) / window)


def wait_for_idle_cpu(limit: float | None, max_wait: float) -> float | None:
    """Before a measurement: wait until other processes use less than ``limit`` cores."""
    if limit is None:
        return None
    t0 = time.time()
    busy = foreign_now()
    while busy is not None and busy > limit:
        if time.time() - t0 > max_wait:
            print(f"    (other processes still use {busy:.2f} cores; measuring anyway)")
            return busy
        print(f"    other processes use {busy:.2f} cores > {limit}: waiting ...", flush=True)
        time.sleep(20)
        busy = foreign_now()
    return busy


def speedup_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["workload"], r["method"], r["library"]): r for r in runs}
    rows = []
    for (wl, method, lib), r in by.items():
        if lib != "attrax":
            continue
        for base in BASELINES:
            b = by.get((wl, method, base))
            if b is None:
                continue
            # per-target loops scale linearly in the number of targets: extrapolate a subset
            base_time = b["median_s"] * b["scale"]
            attrax_time = r["median_s"] * r["scale"]
            a_lo, a_hi = (x * r["scale"] for x in r.get("median_range", [r["median_s"]] * 2))
            b_lo, b_hi = (x * b["scale"] for x in b.get("median_range", [b["median_s"]] * 2))
            rows.append(
                dict(
                    workload=wl,
                    method=method,
                    baseline=base,
                    attrax_s=attrax_time,
                    baseline_s=base_time,
                    speedup=base_time / attrax_time,
                    # worst and best pairing of the rounds' medians
                    speedup_range=[b_lo / a_hi, b_hi / a_lo],
                    # both sides on the same targets: a measured ratio, even when extrapolated
                    extrapolated=b["scale"] != r["scale"],
                    baseline_targets=b["targets_run"],
                    attrax_targets=r["targets_run"],
                    rss_ratio=r["rss_peak_mb"] / b["rss_peak_mb"],
                    goal=GOALS[method],
                    met=base_time / attrax_time >= GOALS[method],
                )
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, 1 repeat (~2 min)")
    p.add_argument("--workloads", default="W1,W2,W3")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--libraries", default=",".join(LIBRARIES), help="attrax is always run")
    p.add_argument("--threads", type=int, default=2, help="torch threads for every library")
    p.add_argument(
        "--baseline-attn",
        choices=("eager", "sdpa"),
        default="eager",
        help="attention implementation of Captum's and Inseq's model for the gradient methods "
        "(default eager: Inseq's own default; transformers' from_pretrained default is sdpa). "
        "attrax always runs with its default, attn_implementation='auto'",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="measure each cheap (workload, method, library) in this many fresh processes, "
        "interleaved across libraries; the median of the rounds' medians is reported "
        "(default 3; --quick 1). Measurements slower than --round-limit get one round",
    )
    p.add_argument("--round-limit", type=float, default=10.0, help="seconds; see --rounds")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 3; quick 1)")
    p.add_argument(
        "--budget",
        type=float,
        default=300.0,
        help="stop repeating a measurement once its timed calls would exceed this many seconds",
    )
    p.add_argument("--out", type=Path, default=None, help="results JSON")
    p.add_argument(
        "--attrax-chunk-size",
        type=int,
        default=None,
        help="override attrax's chunk_size in every workload (0: None = all targets at once)",
    )
    p.add_argument(
        "--attrax-batch-size",
        type=int,
        default=None,
        help="override attrax's IG batch_size in every workload (0: None = all points at once)",
    )
    p.add_argument(
        "--update",
        action="store_true",
        help="re-measure only the selected workloads x methods and merge them into the existing "
        "results JSON (same --threads and --quick), instead of starting a new one",
    )
    p.add_argument(
        "--docs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="regenerate docs/benchmarks.{md,png} (default: yes for full runs, no for --quick)",
    )
    p.add_argument(
        "--max-load",
        type=float,
        default=None,
        help="before starting, wait until the 1-min load average is below this",
    )
    p.add_argument(
        "--max-wait", type=float, default=1800.0, help="longest wait for a quiet machine, seconds"
    )
    p.add_argument(
        "--quiet-cores",
        type=float,
        default=None,
        help="before each measurement wait until other processes use fewer CPU cores than this, "
        "and measure again (--retries) when they used more during it (default: 0.3; --quick: "
        "off; 0 or a negative value: off)",
    )
    p.add_argument("--retries", type=int, default=2, help="re-measurements of a noisy run")
    p.add_argument(
        "--gate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the small-input parity gate before timing (default: yes; --quick: no, its "
        "timed outputs are parity-checked all the same)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0

    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    libraries = ["attrax"] + [
        x.strip() for x in args.libraries.split(",") if x.strip() and x.strip() != "attrax"
    ]
    all_plans = plans(args.quick)
    for plan in all_plans.values():  # attrax-only overrides, e.g. to try engine settings
        if args.attrax_chunk_size is not None:
            plan.chunk_size = args.attrax_chunk_size or None
        if args.attrax_batch_size is not None:
            plan.batch_size = args.attrax_batch_size or None
    for w in workloads:
        if w not in all_plans:
            p.error(f"unknown workload {w!r} (choose from {', '.join(all_plans)})")
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r} (choose from {', '.join(METHODS)})")
    for lib in libraries:
        if lib not in LIBRARIES:
            p.error(f"unknown library {lib!r}")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.out is None:
        args.out = DEFAULT_OUT.with_name("results-quick.json") if args.quick else DEFAULT_OUT
    write_docs = (not args.quick) if args.docs is None else args.docs
    if args.quiet_cores is None:
        args.quiet_cores = None if args.quick else 0.3
    elif args.quiet_cores <= 0:
        args.quiet_cores = None

    import torch

    torch.set_num_threads(args.threads)
    import _models
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    _models.build_all()
    wait_for_quiet(args.max_load, args.max_wait)
    command = "python benchmarks/run.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    meta = {
        "command": command.strip(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "threads": args.threads,
        "baseline_attn": args.baseline_attn,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "round_limit_s": args.round_limit,
        "budget_s": args.budget,
        "quiet_cores": args.quiet_cores,
        "retries": args.retries,
        "quick": args.quick,
        "tolerance": TOLERANCE,
        "ig": {
            "steps": sorted({all_plans[w].steps for w in workloads}),
            "method": IG_METHOD,
            "baseline": "inseq (unk everywhere, EOS kept)",
        },
        "machine": machine_info(),
        # glibc malloc tuning applies to every library; when set, attrax leaves malloc alone
        "malloc_env": {
            k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"
        },
        "attrax_source": attrax_source(),
        "versions": versions(),
        "load_start": list(os.getloadavg()),
        "plans": {w: dataclasses.asdict(all_plans[w]) for w in workloads},
    }
    results: dict[str, Any] = {
        "meta": meta,
        "status": "running",
        "gate": [],
        "runs": [],
        "parity": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    previous = None
    if args.update:
        if not args.out.exists():
            p.error(f"--update: {args.out} does not exist")
        previous = json.loads(args.out.read_text())
        if previous.get("status") != "ok":
            p.error(f"--update: {args.out} has status {previous.get('status')!r}, not 'ok'")
        old = previous["meta"]
        same = ("threads", "quick", "baseline_attn")
        if any(
            old.get(k, "eager" if k == "baseline_attn" else None) != vars(args)[k] for k in same
        ):
            p.error(
                "--update: --threads, --quick and --baseline-attn must match the results being "
                "updated"
            )

    def merged() -> dict[str, Any]:
        """With --update: the previous results, with this run's (workload, method) replaced."""
        if previous is None:
            return results
        chosen = {(w, m) for w in workloads for m in methods}
        kinds = {(r["kind"], r["method"]) for r in results["gate"]}
        out = dict(previous)
        out["runs"] = [
            r for r in previous["runs"] if (r["workload"], r["method"]) not in chosen
        ] + results["runs"]
        out["parity"] = [
            r for r in previous["parity"] if (r["workload"], r["method"]) not in chosen
        ] + results["parity"]
        out["gate"] = [
            r for r in previous.get("gate", []) if (r["kind"], r["method"]) not in kinds
        ] + results["gate"]
        out["meta"] = dict(previous["meta"])
        out["meta"]["plans"] = {**previous["meta"]["plans"], **meta["plans"]}
        update = {
            k: meta.get(k)
            for k in (
                "command",
                "started",
                "finished",
                "load_start",
                "load_end",
                "versions",
                "attrax_source",
            )
        }
        update["replaced"] = sorted(f"{w} {m}" for w, m in chosen)
        out["meta"]["updates"] = [*previous["meta"].get("updates", []), update]
        out["status"] = results["status"]
        out["failures"] = results.get("failures", [])
        return out

    def finish(status: str, failures: list[str] | None = None) -> None:
        nonlocal results
        results["status"] = status
        results["failures"] = failures or []
        meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        meta["load_end"] = list(os.getloadavg())
        out = merged()
        out["speedups"] = speedup_rows(out["runs"])
        if status == "ok":
            results = out
        if previous is None or status == "ok":
            args.out.write_text(json.dumps(out, indent=1, default=_jsonable))
        else:  # keep the results being updated intact until this run has finished
            args.out.with_suffix(".partial.json").write_text(
                json.dumps(out, indent=1, default=_jsonable)
            )

    failures: list[str] = []
    if args.gate if args.gate is not None else not args.quick:
        print("parity gate (small inputs, in-process) ...", flush=True)
        results["gate"] = parity_gate(workloads, methods, libraries)
        for r in results["gate"]:
            check(r, f"gate {r['kind']} {r['method']} vs {r['baseline']}", failures)
        if failures:
            finish("parity_failed", failures)
            _fail(failures, args.out)
            return 2

    with tempfile.TemporaryDirectory(prefix="attrax-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for wl in workloads:
            plan = all_plans[wl]
            _, tok = _models.load(plan.kind)
            prompt, target = texts(plan, tok)
            warm_name = "W1" if plan.kind == "gpt2" else "W2"
            w = _models.workload(warm_name, tok=tok, n_prompt=8, n_target=4)
            warm = (w.prompt, w.target)
            jobs: dict[tuple[str, str], dict[str, Any]] = {}
            for method in methods:
                for lib in libraries:
                    if method not in SUPPORTS[lib]:
                        continue
                    k = (plan.attrax_targets if lib == "attrax" else plan.baseline_targets)[method]
                    keep = None
                    if lib == "attrax" and k is None:
                        kb = plan.baseline_targets[method]
                        if kb is not None and kb < plan.n_target:
                            keep = (kb, plan.n_prompt + kb)
                    run_k = k if k is not None and k < plan.n_target else plan.n_target
                    jobs[method, lib] = dict(
                        method=method,
                        prompt=prompt,
                        target=first_target_text(tok, prompt, target, k, plan.kind),
                        keep=keep,
                        targets_run=run_k,
                    )
            # full runs: one fresh process per (method, library); --quick: one per library
            if args.quick:
                groups = [[key for key in jobs if key[1] == lib] for lib in libraries]
            else:
                groups = [[key] for key in jobs]
            done: dict[tuple[str, str], dict[str, Any]] = {}
            checked: set[str] = set()
            schedule = [(r, g) for r in range(args.rounds) for g in groups if g]
            for round_, group in schedule:
                lib = group[0][1]
                # later rounds (fresh processes again, interleaved) only for cheap measurements
                if round_ > 0 and any(
                    done[key]["rounds"][0]["median_s"] > args.round_limit for key in group
                ):
                    continue
                label = ", ".join(m for m, _ in group)
                tag = f", round {round_ + 1}/{args.rounds}" if args.rounds > 1 else ""
                print(f"{wl} {lib:6s} {label} ({args.threads} threads{tag}) ...", flush=True)
                reports = None
                attempts: list[float | None] = []
                for _attempt in range(1 + args.retries):
                    idle = wait_for_idle_cpu(args.quiet_cores, args.max_wait)
                    try:
                        got = measure(
                            lib, plan, [dict(jobs[key]) for key in group], warm, args, tmp
                        )
                    except RuntimeError as error:
                        failures.append(str(error))
                        finish("error", failures)
                        _fail(failures, args.out, what="a measurement failed")
                        return 1
                    noise = got[0]["foreign_cores"]
                    attempts.append(noise)
                    best = reports[0]["foreign_cores"] if reports else None
                    if reports is None or (noise is not None and best is not None and noise < best):
                        reports = got
                        for rec in reports:
                            rec["idle_cores_before"] = idle
                    if args.quiet_cores is None or noise is None or noise <= args.quiet_cores:
                        break
                    print(
                        f"    other processes used {noise:.2f} cores during the measurement "
                        f"(> {args.quiet_cores}): measuring again",
                        flush=True,
                    )
                assert reports is not None
                for rec in reports:
                    rec["attempts_foreign_cores"] = attempts
                for key, rec in zip(group, reports, strict=True):
                    run_k = jobs[key]["targets_run"]
                    if round_ == 0:
                        rec["targets_run"] = run_k
                        rec["n_target"] = plan.n_target
                        rec["scale"] = plan.n_target / run_k
                        rec["options"] = _options(lib, key[0], plan)
                        rec["rounds"] = [_round_summary(rec)]
                        rec["median_range"] = [rec["median_s"], rec["median_s"]]
                        results["runs"].append(rec)
                        done[key] = rec
                    else:
                        _add_round(done[key], rec)
                    extra = (
                        f", {run_k}/{plan.n_target} targets (x{plan.n_target / run_k:.0f} "
                        "extrapolated)"
                        if run_k != plan.n_target
                        else ""
                    )
                    print(
                        f"    {key[0]:21s} median {rec['median_s']:.3f} s over "
                        f"{len(rec['times'])}{extra}; peak RSS {rec['rss_peak_mb']:.0f} MB; load "
                        f"{rec['load1_before']:.2f}; other processes "
                        f"{rec['foreign_cores'] or 0:.2f} cores",
                        flush=True,
                    )
                if round_ > 0:
                    finish("running")
                    continue
                # parity of the timed outputs, as soon as every library ran a method
                for method in methods:
                    libs = [lib for lib in libraries if (method, lib) in jobs]
                    if method in checked or any((method, lib) not in done for lib in libs):
                        continue
                    checked.add(method)
                    if (method, "attrax") not in done:
                        continue
                    a = load_arrays(done[method, "attrax"]["arrays"])
                    agg = {k[4:]: v for k, v in a.items()}
                    for lib in BASELINES:
                        if (method, lib) not in done:
                            continue
                        raw = load_arrays(done[method, lib]["arrays"])["raw"]
                        view = first_targets(agg, raw.shape[0], raw.shape[1])
                        res = parity(view, raw, method)
                        results["parity"].append(
                            dict(
                                workload=wl,
                                method=method,
                                baseline=lib,
                                targets_compared=int(raw.shape[0]),
                                **res,
                            )
                        )
                        errs = ", ".join(f"{k} {v:.1e}" for k, v in res["errors"].items())
                        print(
                            f"    parity {method} vs {lib}: {'ok' if res['ok'] else 'FAIL'} "
                            f"({errs})",
                            flush=True,
                        )
                        check(res, f"{wl} {method} vs {lib}", failures)
                    if failures:
                        finish("parity_failed", failures)
                        _fail(failures, args.out)
                        return 2
                finish("running")
    finish("ok")
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    if write_docs:
        import plot

        plot.write_docs(results, DOCS / "benchmarks.md", DOCS / "benchmarks.png")
        print("wrote docs/benchmarks.md, docs/benchmarks.png")
    for row in results["speedups"]:
        flag = "met" if row["met"] else "MISSED"
        print(
            f"  {row['workload']} {SHORT[row['method']]:17s} vs {row['baseline']:6s}: "
            f"{row['speedup']:7.1f}x (goal {row['goal']:g}x: {flag})"
            + (" [extrapolated]" if row["extrapolated"] else "")
        )
    return 0


def _round_summary(rec: dict[str, Any]) -> dict[str, Any]:
    keys = ("median_s", "times", "rss_peak_mb", "rss_attribution_mb", "foreign_cores")
    return {k: rec.get(k) for k in (*keys, "load1_before")}


def _add_round(rec: dict[str, Any], new: dict[str, Any]) -> None:
    """Fold another fresh-process round into ``rec``: median of the rounds' medians, worst RSS."""
    rec["rounds"].append(_round_summary(new))
    medians = [r["median_s"] for r in rec["rounds"]]
    rec["median_s"] = statistics.median(medians)
    rec["median_range"] = [min(medians), max(medians)]
    rec["times"] = [t for r in rec["rounds"] for t in r["times"]]
    for key in ("rss_peak_mb", "rss_attribution_mb", "foreign_cores"):
        values = [r[key] for r in rec["rounds"] if r[key] is not None]
        rec[key] = max(values) if values else None


def _options(lib: str, method: str, plan: Plan) -> dict[str, Any]:
    opts: dict[str, Any] = {"objective": "probability"}
    if method == "saliency":
        opts["abs"] = False
    if method == "integrated_gradients":
        opts.update(steps=plan.steps, method=IG_METHOD, baseline="inseq")
        if lib == "attrax":
            opts["batch_size"] = plan.batch_size
        else:
            opts["internal_batch_size"] = plan.internal_batch_size
    if lib == "attrax" and method != "attention":
        opts["chunk_size"] = plan.chunk_size
    return opts


def _jsonable(x: Any) -> Any:
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:
        pass
    return str(x)


def _fail(failures: list[str], out: Path, what: str = "parity") -> None:
    bar = "=" * 78
    title = (
        f"PARITY FAILED: attrax does not match the baselines (tolerance {TOLERANCE:g} relative)"
        if what == "parity"
        else f"BENCHMARK FAILED: {what}"
    )
    print(f"\n{bar}\n{title}\n{bar}", file=sys.stderr)
    for line in failures:
        print(f"  - {line}", file=sys.stderr)
    print(f"(partial results in {out})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
