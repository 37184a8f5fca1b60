"""``python -m benchmarks budgets``: ``max_memory`` holds on every benchmark workload.

Per workload (W1, W2, W3, C1, C2: the models and texts of ``run`` and ``classifiers``; L1: a
Llama-style model at W1's size, ``LLAMA_SPEC``, built in the process) and method
(saliency, integrated gradients with ``--steps`` points, occlusion; ``--methods every``: every
method that takes ``max_memory``, with the sizes of ``SIZES``), attrax runs twice in fresh
processes: without a budget, then with ``max_memory`` at a third of that call's measured peak, or,
where the planner refuses that as too small, at the smallest budget its ``OptionError`` names
(which it rounds up), up to a MiB; a method that does not apply to the model (a ``ModelError``:
ALTI-Logit on an encoder-decoder) is a row saying so. The peak is the process's peak RSS above
its RSS before the call (``VmHWM`` after ``/proc/self/clear_refs``, after a warm-up call and
``malloc_trim``); on a GPU ``max_memory_allocated`` above the allocation before it. The bounded
peak must stay within the budget (exit status 1 otherwise). W3 attributes the first
``--w3-targets`` of its 128 targets, to keep IG and occlusion within minutes. Results:
``--out`` (default ``benchmarks/budgets-<device>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import workloads
from .harness import peak_meter

HERE = Path(__file__).resolve().parent
# workload -> (model, prompt tokens or texts, target tokens or classes)
WORKLOADS: dict[str, tuple[str, int, int | str]] = {
    "W1": ("gpt2", 32, 32),
    "W2": ("marian", 32, 32),
    "W3": ("gpt2", 1024, 128),
    "C1": ("bert2", 16, "predicted"),
    "C2": ("bert20", 16, "all"),
    "L1": ("llama", 96, 32),
}
# L1: the Llama family (RMSNorm, gated MLP, grouped-query attention) at W1's size, over W1's
# tokenizer and texts; 128 tokens, under SDPA_MIN_TOKENS: eager attention, whose softmax HF
# Llama runs in float32 whatever the model's precision
LLAMA_SPEC = dict(
    vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1280,
    tie_word_embeddings=False,
)  # fmt: skip
METHODS = ("saliency", "integrated_gradients", "occlusion")
_SMALLEST = re.compile(r"needs? an estimated ([\d.]+ \w+)")
# --methods every: the methods' defaults, but paths, samples and rounds cut to keep each call within
# a minute on 2 cores (``steps`` is ``--steps`` for every path method)
SIZES: dict[str, dict[str, Any]] = {
    # the layer methods at what they are for: every layer's activations and gradients
    "conductance": {"layers": "all"},
    "internal_influence": {"layers": "all"},
    "smoothgrad": {"samples": 8},
    "squaregrad": {"samples": 8},
    "vargrad": {"samples": 8},
    "discretized_integrated_gradients": {"neighbours": 10},
    "greedy_pig": {"rounds": 2},
    "lime": {"samples": 64},
    "kernel_shap": {"samples": 64},
    "shapley_sampling": {"permutations": 4},
    "sobol": {"samples": 8},
    # every chain's steps run in blocks of 1, 2, 4 and 1: a block's tensors grow with its steps,
    # and the planner shrinks blocks to a quarter of the budget
    "reagent": {"probes": 4, "max_steps": 8},
    # one layer's one head at every position: a forward per position, each the batch's copy
    "activation_patching": {"layers": 0, "heads": 0},
    # a sweep of 16 circuits (each keeping no edge here: the sizes are the same), a copy each
    "edge_patching": {"circuit": 16},
    # every layer's 4 nodes and every target a copy of the batch: a pass's tensors are the same
    # at any number of nodes
    "knowledge_neurons": {"steps": 4},
}
# per workload: C2's PGD at 10 steps took over 38 min without a budget on 2 cores, L1's over 13 in
# float32; a step's passes are the same at any step count, so fewer steps measure the same peak.
# L1's sequential IG (96 words, each a path of its own) ran past 15 min at 16 points in float32
WORKLOAD_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "C2": {"pgd": {"steps": 2}},
    "L1": {"pgd": {"steps": 2}, "sequential_integrated_gradients": {"steps": 4}},
}
PATHS = ("integrated_gradients", "conductance", "internal_influence",
         "sequential_integrated_gradients", "guided_integrated_gradients",
         "discretized_integrated_gradients", "greedy_pig", "head_attribution")  # fmt: skip


def every_method() -> tuple[str, ...]:
    """The public methods that take ``max_memory``, in ``attrax._names.METHODS``' order."""
    import inspect

    import attrax as ax
    from attrax._names import METHODS as ALL

    return tuple(n for n in ALL if "max_memory" in inspect.signature(getattr(ax, n)).parameters)


def _sizes(method: str, steps: int, workload: str = "") -> dict[str, Any]:
    """The sizes ``method`` runs at on ``workload`` in this benchmark: ``steps`` (``--steps``) on
    a path, ``SIZES``' or ``WORKLOAD_SIZES``'."""
    return {
        **({"steps": steps} if method in PATHS else {}),
        **SIZES.get(method, {}),
        **WORKLOAD_SIZES.get(workload, {}).get(method, {}),
    }


def _options(method: str, steps: int, corrupted: Any, workload: str = "") -> dict[str, Any]:
    """The keyword arguments of ``method`` on ``workload`` in this benchmark (beyond the
    budget)."""
    options = _sizes(method, steps, workload)
    # needs a corrupted input with the clean one's length
    if method in ("attribution_patching", "activation_patching", "edge_attribution_patching",
                  "edge_patching"):  # fmt: skip
        options["corrupted"] = corrupted
    if method == "edge_patching":  # a number of circuits: that many empty ones
        options["circuit"] = [[] for _ in range(options["circuit"])]
    return options


def _inputs(name: str, w3_targets: int):
    """``(model, inputs, targets, corrupted)`` of workload ``name``; ``corrupted``: other inputs
    of the same lengths (attribution patching's)."""
    import attrax as ax

    kind, n_prompt, n_target = WORKLOADS[name]
    if name.startswith("C"):
        hf, tok = workloads.load_classifier(kind)
        model = ax.load_model(hf, tokenizer=tok)
        texts = workloads.classifier_texts(tok, n=n_prompt)  # all of one length
        targets = None if n_target == "predicted" else n_target
        return model, texts, targets, texts[::-1]
    hf, tok = _llama() if kind == "llama" else workloads.load(kind)
    model = ax.load_model(hf, tokenizer=tok)
    kind = "gpt2" if kind == "llama" else kind  # W1's tokenizer and texts
    prompt, target = workloads.texts(kind, tok, n_prompt, int(n_target))
    corrupted = workloads.other_prompt(kind, tok, n_prompt)
    if name == "W3":
        target = workloads.first_targets_text(tok, prompt, target, w3_targets, kind)
    return model, prompt, target, corrupted


def _llama():
    """``(model, tokenizer)`` of L1: ``LLAMA_SPEC`` with random weights (seed 1234), built in the
    process, on W1's tokenizer; eval, float32, eager attention."""
    return workloads.from_config("LlamaConfig", LLAMA_SPEC, seed=1234, pad=False)


def worker(spec: str) -> None:
    """One call: prints a JSON line with its peak bytes above the start, or the planner's error."""
    import torch

    import attrax as ax

    s = json.loads(spec)
    torch.set_num_threads(s["threads"])
    model, inputs, targets, corrupted = _inputs(s["workload"], s["w3_targets"])
    dtype = getattr(torch, s.get("dtype", "float32"))
    if s["device"] != "cpu" or dtype != torch.float32:
        hf = model.hf.to(device=s["device"], dtype=dtype)
        model = ax.load_model(hf, tokenizer=model.tokenizer)
    options = _given(
        {**_options(s["method"], s["steps"], corrupted, s["workload"]), **s.get("options", {})}
    )
    fn = getattr(ax, s["method"])
    short = (inputs[:2], targets) if isinstance(inputs, list) else (inputs[:40], targets)
    warm = {**options, "corrupted": short[0]} if "corrupted" in options else options
    try:
        fn(model, *short, **warm)  # warm-up: code pages, lazy imports
    # the method does not apply to this model (ALTI-Logit: T5), or --options to this one
    except (ax.ModelError, ax.OptionError) as error:
        reason = str(error).replace(model.name, Path(model.name).name)  # no local path
        print(json.dumps({"skipped": reason}))
        return
    start, stop = peak_meter(s["device"])
    base = start()
    try:
        fn(model, inputs, targets, max_memory=s["budget"], **options)
    except ax.OptionError as error:
        print(json.dumps({"error": str(error)}))
        return
    print(json.dumps({"peak_bytes": stop(base)}))


def _given(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` without those ``--options`` set to None (null): the method's default."""
    return {k: v for k, v in options.items() if v is not None}


def _rounded_up(smallest: int) -> int:
    """``smallest`` (as the message rounds it up) up to a whole MiB."""
    return -(-int(smallest) // 2**20) << 20


def _measure(spec: dict[str, Any], host_memory: str = "attrax") -> dict[str, Any]:
    env = dict(os.environ)
    if host_memory == "system":  # glibc's malloc left as it is (attrax._memory.SWITCH)
        env["ATTRAX_HOST_MEMORY"] = "system"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "budgets-worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode:
        raise RuntimeError(f"the measured process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> int:
    from attrax._memory import format_bytes, parse_bytes

    rows, failed = [], 0
    methods = every_method() if args.methods == "every" else tuple(args.methods.split(","))
    out = Path(args.out or HERE / f"budgets-{args.device.split(':')[0]}.json")
    meta = {k: v for k, v in vars(args).items() if k not in ("func", "out")}
    for name in args.workloads.split(","):
        for method in methods:
            spec = dict(
                workload=name, method=method, steps=args.steps, w3_targets=args.w3_targets,
                threads=args.threads, device=args.device, dtype=args.dtype, budget=None,
                options=json.loads(args.options),
            )  # fmt: skip
            sizes = _given({**_sizes(method, args.steps, name), **spec["options"]})
            unbounded = _measure(spec, args.host_memory)
            if "skipped" in unbounded:
                rows.append(dict(
                workload=name, method=method, sizes=sizes, skipped=unbounded["skipped"]
            ))  # fmt: skip
                print(f"{name} {method}: not for this model ({unbounded['skipped']})", flush=True)
                _write(out, meta, rows)
                continue
            free = unbounded["peak_bytes"]
            budget = max(int(free / 3) >> 20, 1) << 20
            bounded = _measure({**spec, "budget": budget}, args.host_memory)
            refused = bounded.get("error")
            if refused:  # a third is below the smallest passes: take the smallest, as told
                budget = _rounded_up(parse_bytes(_SMALLEST.search(refused).group(1)))  # type: ignore[union-attr,arg-type]
                bounded = _measure({**spec, "budget": budget}, args.host_memory)
            peak = bounded.get("peak_bytes", float("nan"))  # NaN: refused even at the smallest
            ok = peak <= budget
            failed += not ok
            rows.append(dict(
                workload=name, method=method, sizes=sizes, unbounded_bytes=free, budget_bytes=budget,
                bounded_bytes=peak, smallest=bool(refused), ok=ok,
            ))  # fmt: skip
            print(
                f"{name} {method}: unbounded {format_bytes(int(free))}, max_memory "
                f"{format_bytes(budget)}{' (the smallest)' if refused else ''}, bounded "
                f"{format_bytes(int(peak)) if ok else peak}: {'ok' if ok else 'OVER THE BUDGET'}",
                flush=True,
            )
            _write(out, meta, rows)
    return 1 if failed else 0


def _write(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """The results so far (rewritten after every row: a sweep stopped for time keeps its rows),
    complete or not written."""
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    tmp.replace(out)


LABEL = {
    "input_x_gradient": "input × gradient",  # noqa: RUF001
    "integrated_gradients": "integrated gradients",
    "internal_influence": "internal influence",
    "smoothgrad": "SmoothGrad", "guided_backprop": "guided backprop", "lrp": "AttnLRP",
    "sequential_integrated_gradients": "sequential IG", "guided_integrated_gradients": "guided IG",
    "discretized_integrated_gradients": "discretized IG", "greedy_pig": "greedy PIG",
    "pgd": "PGD", "squaregrad": "SquareGrad", "vargrad": "VarGrad",
    "gradient_shap": "GradientSHAP", "deeplift": "DeepLIFT", "deeplift_shap": "DeepLIFT-SHAP",
    "feature_ablation": "feature ablation", "lime": "LIME", "kernel_shap": "KernelSHAP",
    "shapley_sampling": "Shapley sampling", "sobol": "Sobol", "reagent": "ReAGent",
    "value_zeroing": "value zeroing",
    "attribution_patching": "attribution patching",
    "attention_x_gradient": "attention × gradient",  # noqa: RUF001
    "head_attribution": "head attribution", "alti": "ALTI", "alti_logit": "ALTI-Logit",
    "attention_norm": "attention norm", "decompx": "DecompX",
    "activation_patching": "activation patching",
    "edge_attribution_patching": "edge attribution patching",
    "edge_patching": "edge patching", "knowledge_neurons": "knowledge neurons",
    "information_flow": "information flow",
}  # fmt: skip


def _label(method: str, sizes: dict[str, Any]) -> str:
    """``method`` as the table names it, with the ``sizes`` it ran at."""
    label = LABEL.get(method, method)
    named = [
        # a selection of one layer or head: "layer 0"
        f"{k[:-1]} {v}" if k in ("layers", "heads", "neurons") and isinstance(v, int)
        else f"{v} circuits" if k == "circuit"
        else f"{v} {'points' if k == 'steps' and method in PATHS else k}"
        for k, v in sizes.items()
    ]  # fmt: skip
    return ", ".join([label, *named])


def table(path: str | Path = HERE / "budgets-cpu.json") -> str:
    """The markdown table of a ``budgets`` results file (``docs/memory.md`` shows the CPU ones)."""
    result = json.loads(Path(path).read_text())
    steps = result["meta"]["steps"]
    lines = [
        "| workload | method | no budget | `max_memory` | with it |",
        "|---|---|---|---|---|",
    ]
    mib = 2**20
    for row in result["rows"]:
        # rows record their sizes since L1's got sizes of its own; older ones ran at today's
        sizes = row.get("sizes", _sizes(row["method"], steps, row["workload"]))
        name = _label(row["method"], sizes)
        if "skipped" in row:  # a ModelError: the method does not apply to the model
            lines.append(f"| {row['workload']} | {name} | not for this model | | |")
            continue
        if "not_measured" in row:  # a sweep stopped for time before this call ended
            lines.append(
                f"| {row['workload']} | {name} | not measured: {row['not_measured']} | | |"
            )
            continue
        lines.append(
            f"| {row['workload']} | {name} | "
            f"{row['unbounded_bytes'] / mib:,.0f} MiB | "
            f"{row['budget_bytes'] / mib:,.0f} MiB{' (smallest)' if row['smallest'] else ''} | "
            f"{row['bounded_bytes'] / mib:,.0f} MiB{'' if row['ok'] else ' ✗'} |"
        )
    return "\n".join(lines) + "\n"


def parser(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m benchmarks budgets``."""
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated, or every (every_method())"
    )
    p.add_argument("--steps", type=int, default=16, help="integrated gradients' points")
    p.add_argument("--w3-targets", type=int, default=32, help="W3's first targets attributed")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
        help="the models' precision (bfloat16 on the CPU runs oneDNN's kernels)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--options",
        default="{}",
        help="JSON: options of every method's calls, over the sizes of SIZES (a site's variant)",
    )
    p.add_argument(
        "--host-memory",
        default="attrax",
        choices=("attrax", "system"),
        help="system: run with ATTRAX_HOST_MEMORY=system (glibc's malloc left as it is)",
    )
    p.add_argument(
        "--out", default="", help="results JSON (default benchmarks/budgets-<device>.json)"
    )
