"""The measurement harness, for the CPU and a GPU: parity gate, then time and peak memory.

1. **Parity gate** (in this process, small inputs: GPT-2 8+6 tokens, Marian 8->6): every method
   through every library; attrax must equal each baseline within 1e-4 relative error after the
   aggregations of :mod:`benchmarks.parity`, or the run stops with exit status 2.
2. **Measurements**: each (workload, method, library) runs in a fresh process (``--quick``: one per
   workload and library) with the same threads: load the model, one warm-up call, then timed calls
   (at least ``repeats`` adding up to 1 s, at most ``max_calls``, fewer when they would exceed
   ``budget``); the median is reported. Peak memory: ``VmHWM``, reset after set-up so that the
   attribution's own peak is known; on a GPU also ``torch.cuda.max_memory_allocated``. Cheap
   measurements are repeated in ``rounds`` of fresh processes. The timed outputs are checked for
   parity again (exit status 2).
3. On a GPU, first a device smoke test of every attrax method (:mod:`benchmarks.gpu`).

W3 on the CPU: Captum and Inseq run the first few targets only and their time is extrapolated
(per-token cost grows with the prefix, so this favours them); for IG every side runs the same
first targets. Results go to a JSON file after every measurement; :mod:`benchmarks.report` renders
it.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import report, workloads
from .adapters import LIBRARIES, SUPPORTS, Runner
from .parity import TOLERANCE, first_targets, parity
from .workloads import CORE_METHODS, IG_QUADRATURE, METHODS, Plan

REPO = Path(__file__).resolve().parent.parent
Job = tuple[str, str]  # (method, library)


# --------------------------------------------------------------------------------------------------
# The worker: one measurement (one process per job in full runs)
# --------------------------------------------------------------------------------------------------
def status_mb(field: str) -> float | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) / 1024 if m else None


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_meter(device: str):
    """``(start, stop)``: ``base = start()`` resets the peak; ``stop(base)`` reads the peak bytes
    since, above ``base``: CUDA ``max_memory_allocated``, else peak RSS (``VmHWM``) after
    ``malloc_trim``."""
    import torch

    if device.startswith("cuda"):

        def start() -> float:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()

        def stop(base: float) -> float:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base

        return start, stop

    def start_cpu() -> float:
        ctypes.CDLL(None).malloc_trim(0)
        reset_peak_rss()
        return (status_mb("VmRSS") or 0.0) * 2**20

    def stop_cpu(base: float) -> float:
        return (status_mb("VmHWM") or 0.0) * 2**20 - base

    return start_cpu, stop_cpu


def worker(spec_path: str) -> None:
    """Run the jobs of one spec and write ``out.json`` (report) and ``out.npz`` (arrays) per job."""
    import resource

    import numpy as np
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    torch.set_float32_matmul_precision("highest")  # no TF32: parity is checked at 1e-4
    device, plan = spec["device"], Plan(**spec["plan"])
    cuda = device.startswith("cuda")
    for job in spec["jobs"]:
        t0 = time.perf_counter()
        runner = Runner(
            spec["library"], plan.kind, job["method"], device, spec["baseline_attn"],
            attrax_attn=plan.attn_implementation,
        )  # fmt: skip
        setup_seconds = time.perf_counter() - t0
        setup_hwm, setup_rss = status_mb("VmHWM"), status_mb("VmRSS")
        can_reset = reset_peak_rss()
        base_rss = status_mb("VmRSS")
        warm_seconds = runner(*spec["warm"], plan)[1]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            gpu_base = torch.cuda.memory_allocated()
        times: list[float] = []
        while True:
            raw, seconds, agg = runner(job["prompt"], job["target"], plan)
            if cuda:
                torch.cuda.synchronize()
            times.append(seconds)
            spent, n = sum(times), len(times)
            if (
                n >= max(spec["repeats"], spec["max_calls"])
                or spent + statistics.median(times) > spec["budget"]
                or (n >= spec["repeats"] and spent >= spec["min_time"])
            ):
                break
        run_hwm = status_mb("VmHWM")
        arrays = {"raw": raw} if agg is None else {f"agg_{k}": v for k, v in agg.items()}
        if job["keep"]:
            arrays = {name: v[: job["keep"][0], : job["keep"][1]] for name, v in arrays.items()}
        np.savez(job["out"] + ".npz", **arrays)
        peak = None
        if setup_hwm is not None and run_hwm is not None:
            peak = max(setup_hwm, run_hwm) if can_reset else run_hwm
        rec = {
            "times": times,
            "calls": len(times),
            "warmup_seconds": warm_seconds,
            "setup_seconds": setup_seconds,
            "rss_setup_mb": setup_rss,
            "rss_peak_mb": peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_attribution_mb": run_hwm - base_rss if can_reset and run_hwm else None,
            "peak_reset": can_reset,
            "shared_process": len(spec["jobs"]) > 1,
            "shape": list((raw if agg is None else agg["raw"]).shape),
            "threads": torch.get_num_threads(),
        }
        if cuda:
            rec["gpu_peak_mb"] = (torch.cuda.max_memory_allocated() - gpu_base) / 2**20
            rec["gpu_model_mb"] = gpu_base / 2**20
        Path(job["out"] + ".json").write_text(json.dumps(rec))
        del runner, raw, agg, arrays
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# The machine: other processes' CPU use, provenance
# --------------------------------------------------------------------------------------------------
def cpu_busy_seconds() -> float | None:
    """CPU-seconds spent non-idle by the whole machine since boot (/proc/stat)."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wait_for_load(max_load: float | None, max_wait: float) -> None:
    """Before starting: wait until the 1-minute load average is below ``max_load``."""
    t0 = time.time()
    while max_load is not None and os.getloadavg()[0] > max_load:
        if time.time() - t0 > max_wait:
            print(f"warning: load average still {os.getloadavg()[0]:.2f}; measuring anyway")
            return
        print(f"  load average {os.getloadavg()[0]:.2f} > {max_load}: waiting ...", flush=True)
        time.sleep(30)


def wait_for_idle_cpu(limit: float | None, max_wait: float, window: float = 3.0) -> float | None:
    """Before a measurement: wait until other processes use fewer than ``limit`` cores."""

    def busy() -> float | None:  # cores busy while this (idle) process sleeps: other jobs
        b0 = cpu_busy_seconds()
        time.sleep(window)
        b1 = cpu_busy_seconds()
        return None if b0 is None or b1 is None else max(0.0, (b1 - b0) / window)

    if limit is None:
        return None
    t0, now = time.time(), busy()
    while now is not None and now > limit and time.time() - t0 <= max_wait:
        print(f"    other processes use {now:.2f} cores > {limit}: waiting ...", flush=True)
        time.sleep(20)
        now = busy()
    return now


def machine_info() -> dict[str, Any]:
    cpu, mem = platform.processor() or "", None
    try:
        cpu = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)[1]
        mem = round(
            int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1]) / 1024**2, 1
        )
    except (OSError, TypeError):
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
    digest = hashlib.sha256()
    for path in sorted((REPO / "src" / "attrax").rglob("*.py")):
        digest.update(path.relative_to(REPO).as_posix().encode())
        digest.update(path.read_bytes())
    out: dict[str, Any] = {"sha256_src": digest.hexdigest()[:16]}
    try:
        git = ["git", "-C", str(REPO)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "src/attrax"], capture_output=True, text=True
        )
        out["git_head"] = head.stdout.strip() or None
        out["uncommitted"] = [line[3:] for line in dirty.stdout.splitlines()]
    except OSError:  # no git on the machine: the hash is still recorded
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


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------
def measure(
    library: str, plan: Plan, jobs: list[dict[str, Any]], args: argparse.Namespace, tmp: Path
) -> list[dict[str, Any]]:
    """Run ``jobs`` (method, prompt, target, keep, out) of one library in one fresh process."""
    spec = dict(
        plan=dataclasses.asdict(plan), library=library, jobs=jobs, warm=args.warm[plan.kind],
        threads=args.threads, baseline_attn=args.baseline_attn, repeats=args.repeats,
        budget=args.budget, max_calls=args.max_calls, min_time=0.0 if args.quick else 1.0,
        device=args.device,
    )  # fmt: skip
    spec_path = tmp / f"{plan.name}-{library}-{jobs[0]['method']}.spec.json"
    spec_path.write_text(json.dumps(spec))
    threads = str(args.threads)
    env = os.environ | dict(
        OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore",
    )  # fmt: skip
    for job in jobs:  # a later round reuses the paths: a failed worker must leave none
        Path(job["out"] + ".json").unlink(missing_ok=True)
    load_before = os.getloadavg()[0]
    busy0, child0, wall0 = cpu_busy_seconds(), _children_cpu_seconds(), time.perf_counter()
    command = [sys.executable, "-m", "benchmarks", "worker", str(spec_path)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - wall0
    busy1, child1 = cpu_busy_seconds(), _children_cpu_seconds()
    missing = [j["method"] for j in jobs if not Path(j["out"] + ".json").exists()]
    if proc.returncode != 0 or missing:
        raise RuntimeError(
            f"{library} {', '.join(missing)} on {plan.name} failed (exit {proc.returncode}):\n"
            + proc.stderr[-4000:]
        )
    foreign = None
    if busy0 is not None and busy1 is not None:
        foreign = max(0.0, ((busy1 - busy0) - (child1 - child0)) / wall)
    records = []
    for job in jobs:
        rec = json.loads(Path(job["out"] + ".json").read_text())
        rec |= dict(
            library=library, method=job["method"], workload=plan.name,
            median_s=statistics.median(rec["times"]), load1_before=load_before,
            load1_after=os.getloadavg()[0], foreign_cores=foreign, worker_wall_s=wall,
        )  # fmt: skip
        records.append(rec)
    return records


def _load_arrays(path: str) -> dict[str, Any]:
    import numpy as np

    with np.load(path + ".npz") as z:
        return {k: z[k] for k in z.files}


#: comparisons float32 cannot resolve on the random-weight Marian model: VarGrad's variance is
#: about 1e-5 of its mean square, token drops of probabilities near 1/8000 about 1e-7 of them.
#: Their gate runs both sides in float64; the float32 errors are recorded alongside.
FLOAT64_GATE = {
    ("marian", "vargrad"),
    ("marian", "feature_ablation"),
    ("marian", "shapley_sampling"),
}


def parity_gate(kinds: list[str], methods: list[str], libraries: list[str]) -> list[dict]:
    """Small inputs, every library in this process; the records (ok or not)."""
    records = []
    for kind in kinds:
        _, tok = workloads.load(kind)
        prompt, target = workloads.texts(kind, tok, 8, 6)
        for method in methods:
            dtype = "float64" if (kind, method) in FLOAT64_GATE else "float32"
            _, _, agg = Runner("attrax", kind, method, dtype=dtype)(prompt, target)
            for lib in libraries:
                if lib == "attrax" or method not in SUPPORTS[lib]:
                    continue
                raw, _, _ = Runner(lib, kind, method, dtype=dtype)(prompt, target)
                res = parity(agg, raw, method)
                sizes = "8+6" if kind == "gpt2" else "8->6"
                record = dict(kind=kind, sizes=sizes, method=method, baseline=lib, dtype=dtype)
                line = f"  parity {kind:6s} {method:21s} vs {lib:6s}: {_verdict(res)}"
                if dtype == "float64":  # the float32 gap, reported, not gated
                    _, _, agg32 = Runner("attrax", kind, method)(prompt, target)
                    raw32, _, _ = Runner(lib, kind, method)(prompt, target)
                    record["float32_errors"] = parity(agg32, raw32, method)["errors"]
                    gap = ", ".join(f"{k} {v:.1e}" for k, v in record["float32_errors"].items())
                    line += f" in float64; float32: {gap}"
                records.append(record | res)
                print(line, flush=True)
    return records


def _verdict(res: dict[str, Any]) -> str:
    errs = ", ".join(f"{k} {v:.1e}" for k, v in res["errors"].items())
    return f"{'ok' if res['ok'] else 'FAIL'} ({errs})"


def _jobs(
    plan: Plan, methods: list[str], libraries: list[str], tmp: str
) -> dict[Job, dict[str, Any]]:
    """The measurements of one workload: texts, target subsets, which rows parity keeps."""
    _, tok = workloads.load(plan.kind)
    prompt, target = workloads.texts(plan.kind, tok, plan.n_prompt, plan.n_target)
    jobs = {}
    for method in methods:
        for lib in libraries:
            if method not in SUPPORTS[lib]:
                continue
            k = (plan.attrax_targets if lib == "attrax" else plan.baseline_targets)[method]
            kb = plan.baseline_targets[method]
            keep = None  # attrax ran all targets, a baseline the first kb: keep what parity needs
            if lib == "attrax" and k is None and kb is not None and kb < plan.n_target:
                keep = (kb, plan.n_prompt + kb)
            jobs[method, lib] = dict(
                method=method,
                prompt=prompt,
                target=workloads.first_targets_text(tok, prompt, target, k, plan.kind),
                keep=keep,
                out=str(Path(tmp) / f"{plan.name}-{method}-{lib}"),
                targets_run=k if k is not None and k < plan.n_target else plan.n_target,
            )
    return jobs


def _add_round(rec: dict[str, Any], new: dict[str, Any]) -> None:
    """Fold another fresh-process round into ``rec``: median of the rounds' medians, worst RSS."""
    rec["rounds"].append(_round_summary(new))
    medians = [r["median_s"] for r in rec["rounds"]]
    rec["median_s"] = statistics.median(medians)
    rec["median_range"] = [min(medians), max(medians)]
    rec["times"] = [t for r in rec["rounds"] for t in r["times"]]
    rec["calls"] = len(rec["times"])
    for key in ("rss_peak_mb", "rss_attribution_mb", "foreign_cores", "gpu_peak_mb"):
        values = [r[key] for r in rec["rounds"] if r.get(key) is not None]
        rec[key] = max(values) if values else None


def _round_summary(rec: dict[str, Any]) -> dict[str, Any]:
    keys = ("median_s", "times", "rss_peak_mb", "rss_attribution_mb", "foreign_cores")
    return {k: rec.get(k) for k in (*keys, "gpu_peak_mb", "load1_before")}


def _options(lib: str, method: str, plan: Plan) -> dict[str, Any]:
    """What each library was asked for, recorded with each run."""
    opts: dict[str, Any] = {"objective": "probability"}
    if method == "saliency":
        opts["abs"] = False
    if method == "integrated_gradients":
        opts.update(steps=plan.steps, method=IG_QUADRATURE, baseline="inseq")
        if lib == "attrax":
            opts["batch_size"] = plan.batch_size
        else:
            opts["internal_batch_size"] = plan.internal_batch_size
    if lib == "attrax" and method != "attention":
        opts["chunk_size"] = plan.chunk_size
    return opts


def _merge(previous: dict[str, Any], results: dict[str, Any], chosen: set[Job]) -> dict[str, Any]:
    """``--update``: the previous results with this run's (workload, method) cells replaced."""
    out = dict(previous)
    for key in ("runs", "parity"):
        kept = [r for r in previous[key] if (r["workload"], r["method"]) not in chosen]
        out[key] = kept + results[key]
    gated = {(r["kind"], r["method"]) for r in results["gate"]}
    kept = [r for r in previous.get("gate", []) if (r["kind"], r["method"]) not in gated]
    out["gate"] = kept + results["gate"]
    meta = results["meta"]
    update = {k: meta.get(k) for k in ("command", "started", "finished", "load_start", "load_end")}
    update |= {k: meta.get(k) for k in ("versions", "attrax_source")}
    update["replaced"] = sorted(f"{w} {m}" for w, m in chosen)
    out["meta"] = previous["meta"] | {
        "plans": previous["meta"]["plans"] | meta["plans"],
        "updates": [*previous["meta"].get("updates", []), update],
    }
    return out | {"status": results["status"], "failures": results["failures"]}


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """The benchmark: gate, (GPU: smoke), measurements, parity; writes ``args.out``."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    workloads.build_all()
    wait_for_load(args.max_load, args.max_wait)
    all_plans = workloads.plans(args.quick, args.device)
    for plan in all_plans.values():  # attrax-only overrides, e.g. to try engine settings
        if args.attrax_chunk_size is not None:
            plan.chunk_size = args.attrax_chunk_size or None
        if args.attrax_batch_size is not None:
            plan.batch_size = args.attrax_batch_size or None
    wls, methods, libraries = args.workloads, args.methods, args.libraries
    args.warm = {}  # a short warm-up input per model
    for kind in ("gpt2", "marian"):
        args.warm[kind] = workloads.texts(kind, workloads.load(kind)[1], 8, 4)
    cuda = args.device.startswith("cuda")
    keys = ("threads", "baseline_attn", "repeats", "rounds", "quiet_cores", "retries")
    meta: dict[str, Any] = {k: vars(args)[k] for k in keys}
    meta |= dict(
        command="python -m benchmarks " + " ".join(argv),
        started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), device=args.device,
        device_name=torch.cuda.get_device_name() if cuda else None,
        round_limit_s=args.round_limit, budget_s=args.budget, quick=args.quick,
        tolerance=TOLERANCE, machine=machine_info(), attrax_source=attrax_source(),
        ig=dict(steps=sorted({all_plans[w].steps for w in wls}), method=IG_QUADRATURE,
                baseline="inseq (unk everywhere, EOS kept)"),
        # glibc malloc tuning applies to every library; when set, attrax leaves malloc alone
        malloc_env={k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUN"))},
        versions=versions(), load_start=list(os.getloadavg()),
        plans={w: dataclasses.asdict(all_plans[w]) for w in wls},
    )  # fmt: skip
    results: dict[str, Any] = dict(meta=meta, status="running", gate=[], runs=[], parity=[])
    previous = json.loads(args.out.read_text()) if args.update else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    chosen = {(w, m) for w in wls for m in methods}

    def finish(status: str, failures: list[str] = ()) -> dict[str, Any]:
        results.update(status=status, failures=list(failures))
        meta.update(finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"), load_end=list(os.getloadavg()))
        out = results if previous is None else _merge(previous, results, chosen)
        # summaries over the runs that carry the figures (a rebuilt cpu.json's runs do not)
        loads = [r["load1_before"] for r in out["runs"] if r.get("load1_before") is not None]
        noise = [r["foreign_cores"] for r in out["runs"] if r.get("foreign_cores") is not None]
        out["meta"]["load1_before"] = [min(loads), max(loads)] if loads else None
        out["meta"]["foreign_cores"] = (
            dict(mean=sum(noise) / len(noise), max=max(noise)) if noise else None
        )
        # with --update, the results being updated stay intact until this run has finished
        path = (
            args.out
            if previous is None or status == "ok"
            else args.out.with_suffix(".partial.json")
        )
        path.write_text(json.dumps(out, indent=1))
        return out

    def fail(failures: list[str], code: int, what: str) -> int:
        finish("parity_failed" if code == 2 else "error", failures)
        print(f"\n{'=' * 78}\n{what}\n{'=' * 78}", file=sys.stderr)
        print(
            "\n".join(f"  - {line}" for line in failures),
            f"\n(results in {args.out})",
            file=sys.stderr,
        )
        return code

    parity_failed = f"PARITY FAILED: attrax does not match the baselines (tolerance {TOLERANCE:g})"
    if args.gate:
        print("parity gate (small inputs, in-process) ...", flush=True)
        kinds = sorted({all_plans[w].kind for w in wls})  # gpt2, then marian
        results["gate"] = parity_gate(kinds, methods, libraries)
        failures = [
            f"gate {r['kind']} {r['method']} vs {r['baseline']}: {f}"
            for r in results["gate"]
            for f in r["failures"]
        ]
        if failures:
            return fail(failures, 2, parity_failed)
    if args.smoke:
        from . import gpu

        results["smoke"] = gpu.smoke(args.device)
        failures = [f"smoke {r['model']} {r['method']}" for r in results["smoke"] if not r["ok"]]
        if failures:
            return fail(failures, 2, "DEVICE SMOKE TEST FAILED: the device differs from the CPU")
    if args.variants:
        from . import gpu

        results["variants"] = gpu.variants(args.device, all_plans["W3"], args.out.parent)
        # W3's attrax rows run the fastest of the variants
        best = gpu.fastest(results["variants"])
        all_plans["W3"].attn_implementation = best["attn"]
        all_plans["W3"].chunk_size = best["chunk_size"]
        if "W3" in meta["plans"]:
            meta["plans"]["W3"] = dataclasses.asdict(all_plans["W3"])

    with tempfile.TemporaryDirectory(prefix="attrax-bench-") as tmpdir:
        for wl in wls:
            plan = all_plans[wl]
            jobs = _jobs(plan, methods, libraries, tmpdir)
            # full runs: one fresh process per (method, library); --quick: one per library
            groups = [[k for k in jobs if k[1] == lib] for lib in libraries]
            if not args.quick:
                groups = [[k] for k in jobs]
            done: dict[Job, dict[str, Any]] = {}
            for round_, group in [(r, g) for r in range(args.rounds) for g in groups if g]:
                # later rounds (fresh processes again, interleaved) only for cheap measurements
                if round_ and any(
                    done[k]["rounds"][0]["median_s"] > args.round_limit for k in group
                ):
                    continue
                tag = f", round {round_ + 1}/{args.rounds}" if args.rounds > 1 else ""
                names = ", ".join(m for m, _ in group)
                print(
                    f"{wl} {group[0][1]:6s} {names} ({args.threads} threads{tag}) ...", flush=True
                )
                try:
                    got = _quietest(group[0][1], plan, [dict(jobs[k]) for k in group], args, tmpdir)
                except RuntimeError as error:
                    return fail([str(error)], 1, "BENCHMARK FAILED: a measurement failed")
                for key, rec in zip(group, got, strict=True):
                    if round_:
                        _add_round(done[key], rec)
                        continue
                    k = jobs[key]["targets_run"]
                    rec |= dict(
                        targets_run=k, n_target=plan.n_target, scale=plan.n_target / k,
                        options=_options(key[1], key[0], plan), rounds=[_round_summary(rec)],
                        median_range=[rec["median_s"], rec["median_s"]],
                    )  # fmt: skip
                    results["runs"].append(rec)
                    done[key] = rec
                    # parity of the timed outputs, as soon as every library ran the method
                    ran = [lib for lib in libraries if (key[0], lib) in jobs]
                    if key[1] == ran[-1]:
                        outs = {lib: jobs[key[0], lib]["out"] for lib in ran}
                        records = _timed_parity(wl, key[0], outs, plan.kind)
                        results["parity"] += records
                        failures = [f"{wl} {key[0]} vs {r['baseline']}: {f}" for r in records for f in r["failures"]]  # fmt: skip
                        if failures:
                            return fail(failures, 2, parity_failed)
                finish("running")
    out = finish("ok")
    print(f"wrote {args.out}")
    if args.docs:  # the run becomes the committed results the docs are rendered from
        (report.CPU_RESULTS if args.device == "cpu" else report.GPU_RESULTS).write_text(
            json.dumps(out, indent=1)
        )
        report.write_docs()
    for row in report.speedups(out["runs"], report.goals(args.device)):
        flag = "met" if row["met"] else "MISSED"
        goal = "no goal" if row["goal"] is None else f"goal {row['goal']:g}x: {flag}"
        print(
            f"  {row['workload']} {row['method']:21s} vs {row['baseline']:6s}: "
            f"{row['speedup']:7.1f}x ({goal})" + (" [extrapolated]" if row["extrapolated"] else "")
        )
    return 0


def _quietest(
    library: str, plan: Plan, jobs: list[dict[str, Any]], args: argparse.Namespace, tmpdir: str
) -> list[dict[str, Any]]:
    """:func:`measure`, again (``--retries``) while other processes used ``--quiet-cores``."""
    best: list[dict[str, Any]] = []
    attempts: list[float | None] = []
    for _ in range(1 + args.retries):
        idle = wait_for_idle_cpu(args.quiet_cores, args.max_wait)
        got = measure(library, plan, jobs, args, Path(tmpdir))
        noise = got[0]["foreign_cores"]
        attempts.append(noise)
        least = best[0]["foreign_cores"] if best else None
        if not best or (noise is not None and least is not None and noise < least):
            best = [rec | {"idle_cores_before": idle} for rec in got]
        if args.quiet_cores is None or noise is None or noise <= args.quiet_cores:
            break
        print(f"    other processes used {noise:.2f} cores: measuring again", flush=True)
    for rec in best:
        rec["attempts_foreign_cores"] = attempts
        extra = f", {rec['shape'][0]}/{plan.n_target} targets" if rec["shape"][0] != plan.n_target else ""  # fmt: skip
        print(
            f"    {rec['method']:21s} median {rec['median_s']:.3f} s over {rec['calls']}{extra}; "
            f"peak RSS {rec['rss_peak_mb']:.0f} MB; load {rec['load1_before']:.2f}; other "
            f"processes {rec['foreign_cores'] or 0:.2f} cores",
            flush=True,
        )
    return best


def _timed_parity(
    wl: str, method: str, outs: dict[str, str], kind: str = ""
) -> list[dict[str, Any]]:
    """attrax vs each baseline on the outputs of their timed calls (``outs``: library -> file).

    Comparisons of :data:`FLOAT64_GATE` (float32 cannot resolve them; the gate checked them in
    float64) record their float32 errors without failing."""
    agg = {k[4:]: v for k, v in _load_arrays(outs.pop("attrax")).items()}
    records = []
    for base, out in outs.items():
        raw = _load_arrays(out)["raw"]
        res = parity(first_targets(agg, *raw.shape[:2]), raw, method)
        if (kind, method) in FLOAT64_GATE and res["failures"]:
            note = "float32 errors recorded, not gated: the parity gate compares it in float64"
            res = res | dict(ok=True, failures=[], notes=[*res["notes"], note])
        print(f"    parity {method} vs {base}: {_verdict(res)}", flush=True)
        records.append(
            dict(workload=wl, method=method, baseline=base, targets_compared=raw.shape[0], **res)
        )
    return records


def parser(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m benchmarks run``."""

    def names(choices):
        return lambda text: [x for x in text.split(",") if x and (x in choices or _bad(x, choices))]

    p.add_argument("--device", default="cpu", help="cpu, or cuda (adds the device smoke test)")
    p.add_argument("--quick", action="store_true", help="small sizes, 1 repeat (~2 min)")
    p.add_argument("--workloads", type=names(("W1", "W2", "W3")), default=["W1", "W2", "W3"])
    p.add_argument(
        "--methods", type=names(METHODS), default=list(CORE_METHODS),
        help=f"comma-separated, from {', '.join(METHODS)} (default: {', '.join(CORE_METHODS)})",
    )  # fmt: skip
    p.add_argument(
        "--libraries", type=names(LIBRARIES), default=list(LIBRARIES), help="attrax always runs"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads for every library")
    p.add_argument(
        "--baseline-attn", choices=("eager", "sdpa"), default="eager",
        help="attention of Captum's and Inseq's model for the gradient methods (default eager, "
        "Inseq's own default); attrax always runs its default, attn_implementation='auto'",
    )  # fmt: skip
    p.add_argument(
        "--rounds", type=int,
        help="fresh-process rounds of each cheap measurement, interleaved across libraries; the "
        "median of the rounds' medians is reported (default 3; --quick and cuda 1)",
    )  # fmt: skip
    p.add_argument(
        "--round-limit", type=float, default=10.0, help="seconds: slower ones get 1 round"
    )
    p.add_argument("--repeats", type=int, help="timed calls at least (default 3; --quick 1)")
    p.add_argument("--max-calls", type=int, help="timed calls at most (default 25; cuda 10)")
    p.add_argument(
        "--budget", type=float, help="seconds of timed calls at most (default 300; cuda 60)"
    )
    p.add_argument(
        "--out",
        type=Path,
        help="results JSON (default benchmarks/results/results[-quick|-gpu].json)",
    )
    p.add_argument("--attrax-chunk-size", type=int, help="override attrax's chunk_size (0: None)")
    p.add_argument(
        "--attrax-batch-size", type=int, help="override attrax's IG batch_size (0: None)"
    )
    p.add_argument(
        "--update", action="store_true",
        help="re-measure only the selected workloads x methods and merge them into --out",
    )  # fmt: skip
    p.add_argument(
        "--docs", action=argparse.BooleanOptionalAction,
        help="record the finished results as benchmarks/cpu.json (cuda: gpu-h200.json) and "
        "render the docs from them (default: yes for full runs, no for --quick)",
    )  # fmt: skip
    p.add_argument(
        "--max-load", type=float, help="first wait for the 1-min load average to drop below this"
    )
    p.add_argument(
        "--max-wait", type=float, default=1800.0, help="longest wait for a quiet machine, s"
    )
    p.add_argument(
        "--quiet-cores", type=float,
        help="before each measurement wait until other processes use fewer cores than this, and "
        "re-measure (--retries) when they used more during it (default 0.3; --quick and cuda: "
        "off; <= 0: off)",
    )  # fmt: skip
    p.add_argument("--retries", type=int, default=2, help="re-measurements of a noisy run")
    p.add_argument(
        "--gate", action=argparse.BooleanOptionalAction,
        help="the small-input parity gate before timing (default: yes on the CPU; --quick: no, its "
        "timed outputs are parity-checked all the same)",
    )  # fmt: skip
    p.add_argument(
        "--smoke",
        action=argparse.BooleanOptionalAction,
        help="device smoke test (default: on a GPU)",
    )
    p.add_argument(
        "--variants",
        action="store_true",
        help="attrax options on W3 and a profile (GPU); W3's attrax rows then run the fastest",
    )


def _bad(name: str, choices) -> bool:
    raise argparse.ArgumentTypeError(f"unknown {name!r} (choose from {', '.join(choices)})")


def defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the device- and mode-dependent defaults of :func:`parser`'s options."""
    cpu = args.device == "cpu"
    args.libraries = ["attrax"] + [x for x in args.libraries if x != "attrax"]
    args.rounds = args.rounds or (3 if cpu and not args.quick else 1)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.max_calls = args.max_calls or (25 if cpu else 10)
    args.budget = args.budget or (300.0 if cpu else 60.0)
    name = "results-quick" if args.quick else "results" if cpu else "results-gpu"
    args.out = args.out or REPO / "benchmarks" / "results" / f"{name}.json"
    args.docs = (not args.quick) if args.docs is None else args.docs
    if args.quiet_cores is None:
        args.quiet_cores = 0.3 if cpu and not args.quick else None
    elif args.quiet_cores <= 0:
        args.quiet_cores = None
    args.gate = (cpu and not args.quick) if args.gate is None else args.gate
    args.smoke = (not cpu) if args.smoke is None else args.smoke
    return args
