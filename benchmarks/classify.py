"""Classifier workloads: attrax vs Captum 0.9 and Interpreto 0.5.2 on BERT-shaped classifiers.

``python -m benchmarks classifiers [--quick]``. Two workloads on the models of
:func:`workloads.build_classifiers` (16 texts x 48 tokens):

* **C1**: the 2-class head, one class per example (its predicted class), one call per library;
* **C2**: the 20-class head, every class: attrax ``targets="all"`` in one call, Captum one
  batched ``attribute`` call per class, Interpreto its 2D target tensor.

First a parity gate in this process (2 texts; IG 8 steps): every method through every library that
has it, ≤ 1e-4 after the same aggregation, else exit status 2. Then each (workload, method,
library) runs in a fresh process: model load, one warm-up call, timed calls (median), peak RSS
(``VmHWM``, reset after set-up); the timed outputs are parity-checked again. Results go to
``benchmarks/results/classifiers[-quick].json``; ``--record`` stores them as the ``classifiers``
entry of ``benchmarks/cpu.json`` (other workloads untouched) and re-renders the docs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import harness, report, workloads
from .parity import TOLERANCE, parity, rel_err

METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "occlusion")
LIBRARIES = ("attrax", "captum", "interpreto")
SUPPORTS = {
    "attrax": set(METHODS),
    "captum": {"saliency", "input_x_gradient", "integrated_gradients", "occlusion"},
    "interpreto": {"saliency", "input_x_gradient", "occlusion"},
}
#: attrax never slower than either library on one class per example; ≥ 5x faster than Captum's
#: loop over classes on every class of the 20-class head (the issue sets no C2 goal vs Interpreto)
GOALS = {("C1", "captum"): 1.0, ("C1", "interpreto"): 1.0, ("C2", "captum"): 5.0}


@dataclasses.dataclass
class Case:
    name: str
    model: str  # workloads.CLASSIFIERS key
    classes: str  # "one" (predicted class per example) | "all"
    steps: int  # IG points, the same for every library
    batch_size: int | None = None  # attrax IG / occlusion batch_size
    internal_batch_size: int | None = None  # Captum IG internal_batch_size
    # baselines that loop over classes run the first k only; their time counts classes / k times
    baseline_classes: int | None = None


def cases(quick: bool) -> dict[str, Case]:
    steps = 16 if quick else 50
    return {
        "C1": Case("C1", "bert2", "one", steps, 8, 8 * 16),
        "C2": Case("C2", "bert20", "all", steps, 8, 8 * 16, 4),
    }


def _classes(hf, tok, texts: list[str], how: str) -> tuple[list[list[int]], float]:
    """The classes each example is attributed for, and the largest of their probabilities."""
    import torch

    with torch.no_grad():
        enc = tok(texts, return_tensors="pt", padding=True).to(hf.device)
        probs = hf(**enc).logits.softmax(-1).cpu()
    if how == "all":
        return [list(range(hf.config.num_labels))] * len(texts), float(probs.max())
    return [[int(c)] for c in probs.argmax(-1)], float(probs.max())


def _call(library: str, handle: Any, hf, tok, texts, classes, method: str, case: Case):
    """``(values, seconds)``: ``[example, class, source(, hidden)]`` from one library."""
    from .adapters import attrax_classify
    from .baselines import captum_classify, interpreto_classify

    if library == "attrax":
        return attrax_classify(
            handle, texts, classes, method, steps=case.steps, batch_size=case.batch_size
        )
    if library == "captum":
        res = captum_classify(
            hf, tok, texts, classes, method, n_steps=case.steps,
            internal_batch_size=case.internal_batch_size if method == "integrated_gradients" else None,
        )  # fmt: skip
    else:
        res = interpreto_classify(hf, tok, texts, classes, method)
    return res.attributions, res.seconds


def _classes_run(case: Case, library: str, method: str, classes: int) -> int:
    """How many classes ``library`` runs: a loop over classes (Captum; Interpreto's gradient
    methods) runs ``case.baseline_classes``; attrax and Interpreto's occlusion (every class from
    the same forwards) run all."""
    loops = library == "captum" or (library == "interpreto" and method != "occlusion")
    return min(case.baseline_classes or classes, classes) if loops else classes


def _setup(library: str, model: str, device: str = "cpu"):
    hf, tok = workloads.load_classifier(model)
    hf = hf.to(device)
    handle = None
    if library == "attrax":
        import attrax as ax

        handle = ax.load_model(hf, tokenizer=tok)
    return handle, hf, tok


def compare(
    attrax: np.ndarray, base: np.ndarray, library: str, method: str, probability: float = 1.0
) -> dict[str, Any]:
    """Parity of ``[example, class, source(, hidden)]`` arrays after the baseline's aggregation.

    Captum: the harness's (raw, L2 over hidden + normalize over source, sum over hidden), on
    ``[example * class, source, hidden]``. Interpreto: its own ``mean_h |.|`` over hidden (gradient
    methods) and that normalized over source. Occlusion (raw, where Interpreto attributes) is a
    difference of two float32 probabilities whose rounding scales with them, not with the
    difference: its error is taken relative to ``probability`` (the largest attributed class
    probability), the plain errors kept as ``raw_plain`` and ``normalize_plain``.
    """
    if library == "captum" and method != "occlusion":
        flat = (-1, *attrax.shape[2:])
        return parity(attrax.reshape(flat), base.reshape(flat), method)
    a = np.abs(attrax.astype(np.float64)).mean(-1) if attrax.ndim == 4 else attrax.astype(float)
    a = np.where(np.isnan(base), np.nan, a)
    errors: dict[str, float] = {}
    failures: list[str] = []
    try:
        errors["abs_mean" if attrax.ndim == 4 else "raw"] = rel_err(a, base)
        l1a, l1b = (np.nansum(np.abs(x), axis=-1, keepdims=True) for x in (a, base))
        errors["normalize"] = rel_err(a / np.where(l1a, l1a, 1), base / np.where(l1b, l1b, 1))
    except ValueError as error:
        failures.append(str(error))
    notes = []
    if method == "occlusion" and errors:
        errors = {f"{k}_plain": v for k, v in errors.items()}
        diff = float(np.nanmax(np.abs(a - base)))
        errors["raw"] = diff / probability
        notes.append(
            f"occlusion: error relative to the largest class probability {probability:.3g}"
        )
    failures += [
        f"{k}: relative error {v:.3e} > {TOLERANCE:g}"
        for k, v in errors.items()
        if not k.endswith("_plain") and not v <= TOLERANCE
    ]
    return {"errors": errors, "ok": not failures, "notes": notes, "failures": failures}


def gate(libraries: list[str], methods: list[str]) -> list[dict[str, Any]]:
    """Small inputs in this process: 2 texts of 12 tokens, IG 8 steps, both heads."""
    records = []
    for case in cases(quick=True).values():
        case = dataclasses.replace(case, steps=8)
        handles = {lib: _setup(lib, case.model) for lib in libraries}
        _, hf, tok = handles["attrax"]
        texts = workloads.classifier_texts(tok, 2, 12)
        classes, top = _classes(hf, tok, texts, case.classes)
        for method in methods:
            ours, _ = _call("attrax", handles["attrax"][0], hf, tok, texts, classes, method, case)
            for lib in libraries[1:]:
                if method not in SUPPORTS[lib]:
                    continue
                h, lhf, ltok = handles[lib]
                theirs, _ = _call(lib, h, lhf, ltok, texts, classes, method, case)
                res = compare(ours, theirs, lib, method, top)
                records.append(dict(workload=case.name, method=method, baseline=lib, **res))
                print(f"  gate {case.name} {method:21s} vs {lib:10s}: {_verdict(res)}", flush=True)
    return records


def _verdict(res: dict[str, Any]) -> str:
    errs = ", ".join(f"{k} {v:.1e}" for k, v in res["errors"].items())
    return f"{'ok' if res['ok'] else 'FAIL ' + '; '.join(res['failures'])} ({errs})"


def worker(spec_path: str) -> None:
    """One (workload, method, library) measurement: writes ``out.json`` and ``out.npy``."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    case = Case(**spec["case"])
    t0 = time.perf_counter()
    device = spec.get("device", "cpu")
    handle, hf, tok = _setup(spec["library"], case.model, device)
    setup_seconds = time.perf_counter() - t0
    setup_hwm = harness.status_mb("VmHWM")
    args = (spec["library"], handle, hf, tok)
    warm = _call(*args, spec["texts"][:2], spec["classes"][:2], spec["method"], case)[1]
    can_reset = harness.reset_peak_rss()
    base_rss = harness.status_mb("VmRSS")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    while True:
        values, seconds = _call(*args, spec["texts"], spec["classes"], spec["method"], case)
        times.append(seconds)
        if len(times) >= spec["repeats"] and (sum(times) >= spec["min_time"] or len(times) >= 10):
            break
    run_hwm = harness.status_mb("VmHWM")
    np.save(spec["out"] + ".npy", values)
    rec = dict(
        times=times, median_s=statistics.median(times), calls=len(times), warmup_seconds=warm,
        setup_seconds=setup_seconds, shape=list(values.shape), threads=torch.get_num_threads(),
        rss_peak_mb=max(setup_hwm or 0, run_hwm or 0) if can_reset else run_hwm,
        rss_attribution_mb=run_hwm - base_rss if can_reset and run_hwm and base_rss else None,
        device=device,
        gpu_peak_mb=torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
    )  # fmt: skip
    Path(spec["out"] + ".json").write_text(json.dumps(rec))


def _measure(spec: dict[str, Any], tmp: Path) -> dict[str, Any]:
    path = tmp / (Path(spec["out"]).name + ".spec.json")
    path.write_text(json.dumps(spec))
    threads = str(spec["threads"])
    env = os.environ | dict(
        OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore",
    )  # fmt: skip
    command = [sys.executable, "-m", "benchmarks", "classifiers-worker", str(path)]
    proc = subprocess.run(command, cwd=harness.REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not Path(spec["out"] + ".json").exists():
        raise RuntimeError(f"{spec['library']} {spec['method']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(Path(spec["out"] + ".json").read_text())


def speedups(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """attrax's time over each baseline's, per (workload, method), with the workload's goal."""
    by = {(r["workload"], r["method"], r["library"]): r for r in runs}
    rows = []
    for (wl, method, lib), r in by.items():
        ours = by.get((wl, method, "attrax"))
        if lib == "attrax" or ours is None:
            continue
        ratio = r["median_s"] * r.get("scale", 1.0) / ours["median_s"]
        goal = GOALS.get((wl, lib))
        rows.append(
            dict(workload=wl, method=method, baseline=lib, speedup=ratio, goal=goal,
                 met=None if goal is None else ratio >= goal,
                 extrapolated=r.get("scale", 1.0) != 1.0)
        )  # fmt: skip
    return rows


def run(args: argparse.Namespace, argv: list[str]) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    workloads.build_classifiers()
    libraries = ["attrax"] + [lib for lib in args.libraries if lib != "attrax"]
    chosen = cases(args.quick)
    meta = dict(
        command="python -m benchmarks " + " ".join(argv), quick=args.quick, device=args.device,
        started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), threads=args.threads,
        texts=list(workloads.CLASSIFIER_TEXTS), spec=workloads.BERT_SPEC,
        cases={k: dataclasses.asdict(chosen[k]) for k in args.workloads},
        machine=harness.machine_info(), attrax_source=harness.attrax_source(),
        versions=harness.versions() | _versions(("interpreto", "nnsight")),
        tolerance=TOLERANCE, goals={f"{w} vs {b}": g for (w, b), g in GOALS.items()},
        load1_start=os.getloadavg()[0],
    )  # fmt: skip
    results: dict[str, Any] = dict(
        meta=meta, status="running", gate=[], runs=[], parity=[], speedups=[]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def finish(status: str, failures: list[str] = ()) -> int:
        results.update(status=status, failures=list(failures))
        results["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        args.out.write_text(json.dumps(results, indent=1))
        if failures:
            print("\n".join(["FAILED:", *failures]), file=sys.stderr)
        return 0 if status == "ok" else 2

    print("parity gate (2 texts x 12 tokens, in-process) ...", flush=True)
    results["gate"] = gate(libraries, args.methods)
    bad = [f"gate {r['workload']} {r['method']} vs {r['baseline']}: {f}" for r in results["gate"] for f in r["failures"]]  # fmt: skip
    if bad:
        return finish("parity_failed", bad)
    _, tok = workloads.load_classifier("bert2")
    texts = workloads.classifier_texts(tok)
    with tempfile.TemporaryDirectory(prefix="attrax-cls-") as tmpdir:
        for wl in args.workloads:
            case = chosen[wl]
            hf, tok = workloads.load_classifier(case.model)
            classes, top = _classes(hf.to(args.device), tok, texts, case.classes)
            for method in args.methods:
                outs = {}
                for lib in (lib for lib in libraries if method in SUPPORTS[lib]):
                    out = str(Path(tmpdir) / f"{wl}-{method}-{lib}")
                    k = _classes_run(case, lib, method, len(classes[0]))
                    spec = dict(
                        library=lib, method=method, case=dataclasses.asdict(case), texts=texts,
                        classes=[c[:k] for c in classes], threads=args.threads, repeats=args.repeats,
                        min_time=0.0 if args.quick else 1.0, out=out, device=args.device,
                    )  # fmt: skip
                    print(f"{wl} {method:21s} {lib:10s} ...", end=" ", flush=True)
                    load = os.getloadavg()[0]  # a shared machine: record how busy it was
                    rec = _measure(spec, Path(tmpdir)) | dict(
                        workload=wl, method=method, library=lib, load1_before=load,
                        load1_after=os.getloadavg()[0], classes_run=k,
                        scale=len(classes[0]) / k,
                    )  # fmt: skip
                    gpu = (
                        f", GPU peak {rec['gpu_peak_mb']:.0f} MB" if rec.get("gpu_peak_mb") else ""
                    )
                    print(f"median {rec['median_s']:.3f} s, peak RSS {rec['rss_peak_mb']:.0f} MB{gpu}", flush=True)  # fmt: skip
                    results["runs"].append(rec)
                    outs[lib] = np.load(out + ".npy")
                for lib, theirs in outs.items():
                    if lib == "attrax":
                        continue
                    ours = outs["attrax"][:, : theirs.shape[1]]  # the classes it ran
                    res = compare(ours, theirs, lib, method, top)
                    results["parity"].append(dict(workload=wl, method=method, baseline=lib, **res))
                    print(f"  parity vs {lib}: {_verdict(res)}", flush=True)
                    if not res["ok"]:
                        return finish("parity_failed", [f"{wl} {method} vs {lib}: {f}" for f in res["failures"]])  # fmt: skip
                args.out.write_text(json.dumps(results, indent=1))
    results["speedups"] = speedups(results["runs"])
    for row in results["speedups"]:
        goal = (
            "no goal"
            if row["goal"] is None
            else f"goal {row['goal']:g}x: " + ("met" if row["met"] else "MISSED")
        )
        extra = " [extrapolated]" if row["extrapolated"] else ""
        print(f"  {row['workload']} {row['method']:21s} vs {row['baseline']:10s}: {row['speedup']:6.2f}x ({goal}){extra}")  # fmt: skip
    code = finish("ok")
    if args.record:
        record(results)
    print(f"wrote {args.out}")
    return code


def record(results: dict[str, Any]) -> None:
    """Store a finished run as ``cpu.json``'s ``classifiers`` entry (nothing else in it changes)
    and re-render the docs from it."""
    if results.get("status") != "ok":
        raise ValueError(
            f"only a finished run is recorded, not one with status {results.get('status')!r}"
        )
    committed = json.loads(report.CPU_RESULTS.read_text())
    committed["classifiers"] = results
    report.CPU_RESULTS.write_text(json.dumps(committed, indent=1, ensure_ascii=False) + "\n")
    report.write_docs()


def _versions(names: tuple[str, ...]) -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def parser(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m benchmarks classifiers``."""

    def names(choices):
        def parse(text: str) -> list[str]:
            got = [x for x in text.split(",") if x]
            unknown = [x for x in got if x not in choices]
            if unknown:
                raise argparse.ArgumentTypeError(f"unknown {unknown} (choose from {choices})")
            return got

        return parse

    p.add_argument("--quick", action="store_true", help="IG 16 steps, 1 timed call")
    p.add_argument("--workloads", type=names(("C1", "C2")), default=["C1", "C2"])
    p.add_argument("--methods", type=names(METHODS), default=list(METHODS))
    p.add_argument("--libraries", type=names(LIBRARIES), default=list(LIBRARIES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu",
        help="where every library's model runs (the parity gate stays on the CPU); cuda writes "
        "results/classifiers-cuda.json and is not --record'ed",
    )  # fmt: skip
    p.add_argument("--repeats", type=int, help="timed calls at least (default 3; --quick 1)")
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/...)")
    p.add_argument(
        "--record", action="store_true",
        help="store the finished run as cpu.json's `classifiers` entry and re-render the docs",
    )  # fmt: skip


def defaults(args: argparse.Namespace) -> argparse.Namespace:
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.device == "cuda" and args.record:
        raise SystemExit("--record stores a CPU run in cpu.json; a cuda run is kept in its --out")
    name = "classifiers-quick" if args.quick else "classifiers"
    if args.device == "cuda":
        name += "-cuda"
    args.out = args.out or harness.REPO / "benchmarks" / "results" / f"{name}.json"
    return args
