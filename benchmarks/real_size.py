"""attrax vs Captum and Inseq on real-size model shapes, random weights, built from a config.

Shapes (``--shape``): ``gpt2-small`` (12 layers, d=768, vocabulary 50257, float32),
``llama-1b`` (Llama-3.2-1B: 16 layers, d=2048, gated MLP 8192, 32 heads / 8 KV heads, RMSNorm,
vocabulary 128256, bfloat16) and ``llama3-8b`` (32 layers, d=4096, MLP 14336, bfloat16; for a
GPU). The model is built on ``--device`` with random weights; the benchmark GPT-2 tokenizer gives
the texts (its ids are all below every shape's vocabulary). One process, offline.

Per method, each library runs once (warm-up and parity: ``--tolerance`` relative, or exit status
2 before any timing), then ``repeats`` timed calls, libraries interleaved; the median is printed.
A bfloat16 shape is gated first on a float32 copy of the same weights (``--parity-dtype``), where
a batched and a looped backward round alike; its own bfloat16 difference is then reported only.
Captum and Inseq can run the first ``--first-targets`` targets only: their time is then
extrapolated by ``targets / first_targets`` (an under-estimate of theirs: later targets have longer
prefixes), as W3 does. Peak memory per call: on the CPU the process's peak RSS above its RSS
before the call (``VmHWM`` after ``/proc/self/clear_refs``), on a GPU ``max_memory_allocated``
above the allocation before it. ``--max-memory`` is passed to attrax.

For calls that take minutes (an 8B model over thousands of tokens), ``--repeats 0`` times each
library on its parity call, synchronised, after a warm-up of attrax on the first targets: the
ones timed in full then run once only; an extrapolated library still runs once more, timed (a
first call's set-up multiplied by the extrapolation would count against it). With
``--on-parity-failure record`` a failed gate is recorded in the row (``parity_failed``) and the
timing goes on, so that one device run keeps its numbers; the report marks such rows. The file is
rewritten after each method, complete as far as it goes (``meta.complete`` says whether every
method ran).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

from . import baselines, workloads
from .harness import attrax_source, peak_meter, versions
from .parity import aggregates, first_targets, parity

# shape -> (config class, config, dtype)
SHAPES: dict[str, tuple[str, dict[str, Any], str]] = {
    "gpt2-small": ("GPT2Config", dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12), "float32"),
    "llama-1b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True), "bfloat16"),
    "llama3-8b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False), "bfloat16"),
    # llama3-8b's family and dtype in miniature: gpu_memory.sh's dry run on the CPU
    "llama-tiny": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False), "bfloat16"),
}  # fmt: skip


def build(shape: str = "gpt2-small", device: str = "cpu", seed: int = 0):
    """``(hf_model, tokenizer)`` of ``shape``: random weights, built on ``device`` in the shape's
    dtype, eager attention (the baselines' attention, as in the harness)."""
    config_class, config, dtype = SHAPES[shape]
    model, tok = workloads.from_config(config_class, config, dtype, device, seed)
    # the benchmark tokenizer's 1,280 would make Inseq cut a longer prompt (and then refuse it)
    tok.model_max_length = config.get("max_position_embeddings", 1024)
    return model, tok


def _calls(method: str, hf, model, tok, prompt: str, target: str, short: str, args) -> dict:
    """``{library: call}``: one attribution of ``method`` per library, attrax first."""
    from .adapters import attrax_attribute

    ig = {"n_steps": args.steps} if method == "integrated_gradients" else {}
    if ig and args.internal_batch_size:
        ig["internal_batch_size"] = args.internal_batch_size
    batch = "auto" if args.batch_size == "auto" else int(args.batch_size)
    sizes = dict(steps=args.steps, chunk_size="auto", batch_size=batch)
    libraries = args.libraries.split(",")
    calls: dict[str, Any] = {
        "attrax": lambda: attrax_attribute(
            model, prompt, target, method, max_memory=args.max_memory, **sizes
        )[0]
    }
    if "captum" in libraries:
        calls["captum"] = lambda: (
            baselines.captum_attribute(
                hf, tok, prompt, short, method, baseline="inseq", **ig
            ).attributions
        )
    if "inseq" in libraries:
        inseq_model, _ = baselines.inseq_load(hf, tok, method)
        calls["inseq"] = lambda: (
            baselines.inseq_attribute(
                hf, tok, prompt, short, method, inseq_model=inseq_model, **ig
            ).attributions
        )
    return calls


def _gate(ours: dict, raw, method: str, tolerance: float) -> tuple[float | str, list[str]]:
    """The largest relative error of attrax's aggregates against a baseline's raw array
    (``"failed"`` where they could not be compared), and the aggregates beyond ``tolerance``
    (printed)."""
    got = parity(first_targets(ours, *raw.shape[:2]), raw, method, tol=tolerance)
    if got["failures"]:
        print("  " + "\n  ".join(got["failures"]))
    # sum_plain is reported, not gated (a cancellation-dominated sum): not the parity
    return (_largest(got["errors"]) if got["errors"] else "failed"), got["failures"]


def run(args: argparse.Namespace) -> int:
    import torch

    import attrax as ax

    from .adapters import attrax_aggregates

    torch.set_num_threads(args.threads)
    # Captum warns that it sets requires_grad on the embeddings, at every target of every call
    warnings.filterwarnings("ignore", "Input Tensor .* did not already require gradients")
    t0 = time.perf_counter()
    hf, tok = build(args.shape, args.device)
    model = ax.load_model(hf, tokenizer=tok, attn_implementation=args.attn)
    n_params = sum(p.numel() for p in hf.parameters()) / 1e9
    prompt, target = workloads.texts("gpt2", tok, args.prompt, args.target)
    k = args.first_targets if args.first_targets and args.first_targets < args.target else None
    short = workloads.first_targets_text(tok, prompt, target, k, "gpt2")
    scale = args.target / k if k else 1.0
    libraries = args.libraries.split(",")
    print(
        f"{args.shape} ({n_params:.2f}B parameters, {SHAPES[args.shape][2]}, built in "
        f"{time.perf_counter() - t0:.0f} s), {args.prompt} + {args.target} tokens, {args.device}, "
        f"{args.threads} threads"
        + (f"; Captum/Inseq on the first {k} targets, times x{scale:g}" if k else "")
    )
    start, stop = peak_meter(args.device)
    methods = args.methods.split(",")
    if args.repeats == 0:
        # timed on its first call: the device's one-time set-up (kernels, handles) runs here, on
        # the first targets alone
        _calls(methods[0], hf, model, tok, prompt, short, short, args)["attrax"]()
    dtype = SHAPES[args.shape][2]
    gate_dtype = dtype if args.parity_dtype == "same" else args.parity_dtype
    references: dict[str, dict[str, Any]] = {}
    # each baseline's raw output in gate_dtype: how far the shape's dtype moves the loop itself
    gate_outputs: dict[str, dict[str, Any]] = {}
    if gate_dtype != dtype:
        # the gate runs on an upcast copy (the same weights): bfloat16 rounding differs by more
        # than the tolerance between a batched and a looped backward, float32's does not
        t1 = time.perf_counter()
        hf_gate = copy.deepcopy(hf).to(getattr(torch, gate_dtype))
        model_gate = ax.load_model(hf_gate, tokenizer=tok, attn_implementation=args.attn)
        for method in methods:
            calls = _calls(method, hf_gate, model_gate, tok, prompt, target, short, args)
            outputs = {lib: call() for lib, call in calls.items()}
            ours = attrax_aggregates(outputs.pop("attrax"), method)
            references[method] = {}
            gate_outputs[method] = outputs
            for lib, raw in outputs.items():
                error, failures = _gate(ours, raw, method, args.tolerance)
                if failures:
                    print(f"PARITY FAILED {method} vs {lib} in {gate_dtype}")
                    return 2
                references[method][lib] = error
        del hf_gate, model_gate, calls, outputs
        gc.collect()
        print(f"parity in {gate_dtype} ({time.perf_counter() - t1:.0f} s): {references}")
    rows = []
    for method in methods:
        calls = _calls(method, hf, model, tok, prompt, target, short, args)
        outputs, peaks, out_of_memory = {}, {}, []
        first_call: dict[str, float] = {}
        for lib, call in list(calls.items()):  # warm-up, parity and peak memory
            base = start()
            try:
                outputs[lib], first_call[lib] = _timed(call, args.device)
            except torch.OutOfMemoryError:
                if lib == "attrax":
                    raise
                print(f"{lib} {method}: out of memory; not timed")
                del calls[lib]
                out_of_memory.append(lib)
                gc.collect()  # the failed call's tensors, before the next library's
                torch.cuda.empty_cache()
                continue
            peaks[lib] = stop(base)
        ours = attrax_aggregates(outputs["attrax"], method)
        errors: dict[str, Any] = {}
        failed, reasons = [], []
        for lib in calls:
            if lib == "attrax":
                continue
            gated = method not in references  # else reported: the gate ran in gate_dtype
            tolerance = args.tolerance if gated else float("inf")
            error, failures = _gate(ours, outputs[lib], method, tolerance)
            if failures:
                print(f"PARITY FAILED {method} vs {lib}")
                if args.on_parity_failure == "stop":
                    return 2
                failed.append(lib)
                reasons += failures
            if not gated:
                # the same loop in both dtypes, and attrax against the loop in gate_dtype: the
                # shape's dtype's own rounding, next to attrax's difference from the loop
                exact = gate_outputs[method][lib]
                own = parity(aggregates(outputs[lib], method), exact, method, tol=float("inf"))
                theirs = parity(
                    first_targets(ours, *exact.shape[:2]), exact, method, tol=float("inf")
                )
                error = {
                    gate_dtype: references[method][lib],
                    dtype: error,
                    # per aggregate: a sum that cancels moves most (gradients.md, At real size)
                    f"{lib} {dtype} vs {gate_dtype}": _gated(own["errors"]),
                    f"attrax {dtype} vs {lib} {gate_dtype}": _gated(theirs["errors"]),
                }
            errors[lib] = error
        del outputs
        seconds: dict[str, list[float]] = {lib: [] for lib in calls}
        if args.repeats == 0:  # timed on the parity call; an extrapolated loop once more
            seconds = {lib: [first_call[lib]] for lib in calls if lib == "attrax" or not k}
            for lib, call in calls.items():
                if lib not in seconds:
                    seconds[lib] = [_timed(call, args.device)[1] * scale]
        for _ in range(args.repeats):
            for lib, call in calls.items():  # interleaved: drifting load hits every library alike
                took = _timed(call, args.device)[1]
                seconds[lib].append(took * (1.0 if lib == "attrax" else scale))
        median = {lib: statistics.median(s) for lib, s in seconds.items()}
        row = dict(
            method=method,
            seconds=median,
            peak_bytes=peaks,
            parity=errors,
            out_of_memory=out_of_memory,
        )
        if failed:
            row["parity_failed"] = failed
            row["parity_failures"] = sorted(set(reasons))  # which aggregate, by how much
        rows.append(row)
        _write(args, rows, complete=len(rows) == len(methods))
    print()
    print(
        "| method | " + " | ".join(f"{lib} s | {lib} peak" for lib in libraries) + " | speed-up |"
    )
    print("|---|" + "---|---|" * len(libraries) + "---|")
    for row in rows:
        name = row["method"] if row["method"] != "integrated_gradients" else f"IG ({args.steps})"
        took, peak = row["seconds"], row["peak_bytes"]
        cells = [
            f"{took[lib]:.2f}{'*' if lib != 'attrax' and k else ''} | {peak[lib] / 2**30:.2f} GiB"
            if lib in took
            else "out of memory | —"
            for lib in libraries
        ]
        ratio = ", ".join(
            f"{took[lib] / took['attrax']:.1f}x vs {lib}" for lib in took if lib != "attrax"
        )
        print(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")
    if k:
        print(f"* extrapolated from the first {k} of {args.target} targets (peaks are theirs)")
    return 0


def _gated(errors: dict[str, float]) -> dict[str, float]:
    """Parity's errors per aggregate, its reported-only ``sum_plain`` aside."""
    return {name: e for name, e in errors.items() if name != "sum_plain"}


def _largest(errors: dict[str, float]) -> float:
    """The largest of parity's errors, its reported-only ``sum_plain`` aside."""
    return max(_gated(errors).values(), default=0.0)


def _synchronise(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(call, device: str) -> tuple[Any, float]:
    """What one ``call`` returns, and its seconds, the device synchronised before and after."""
    _synchronise(device)
    began = time.perf_counter()
    out = call()
    _synchronise(device)
    return out, time.perf_counter() - began


def _write(args: argparse.Namespace, rows: list[dict], complete: bool) -> None:
    """The rows so far to ``--out`` (each write whole: a file is complete or not written)."""
    if not args.out:
        return
    meta = {k: v for k, v in vars(args).items() if k != "func"} | {"complete": complete}
    meta |= {"attrax_source": attrax_source(), "versions": versions()}  # which code, which peers
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    tmp.replace(out)


def parser(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m benchmarks real-size``."""
    p.add_argument("--shape", choices=list(SHAPES), default="gpt2-small")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--target", type=int, default=32, help="target tokens (default 32)")
    p.add_argument("--methods", default="saliency,integrated_gradients")
    p.add_argument("--libraries", default="attrax,captum,inseq")
    p.add_argument("--steps", type=int, default=20, help="IG points on every side")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed calls per library (0: each timed on its parity call; module docstring)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--first-targets",
        type=int,
        default=0,
        help="Captum/Inseq attribute only this many targets; their time is extrapolated (0: all)",
    )
    p.add_argument("--max-memory", default=None, help="attrax's max_memory, e.g. 60GB")
    p.add_argument(
        "--internal-batch-size",
        type=int,
        default=0,
        help="Captum's and Inseq's IG points per forward (0: all at once, their default)",
    )
    p.add_argument(
        "--batch-size",
        default="auto",
        help="attrax's points per pass (default auto; an int keeps the planner to the targets)",
    )
    p.add_argument(
        "--attn", default="auto", choices=("auto", "eager", "sdpa"), help="attrax's attention"
    )
    p.add_argument(
        "--tolerance", type=float, default=1e-4, help="parity, relative (bfloat16 needs more)"
    )
    p.add_argument(
        "--parity-dtype",
        default="float32",
        help="the gate's dtype: the same weights upcast to it when the shape's dtype differs, "
        "then the timing dtype's difference is reported, not gated ('same': gate in the shape's)",
    )
    p.add_argument(
        "--on-parity-failure",
        choices=("stop", "record"),
        default="stop",
        help="stop: exit 2 before any timing (default); record: mark the row and time it",
    )
    p.add_argument("--out", default="", help="write the rows as JSON here")
    p.add_argument("--note", default="", help="a sentence on the conditions, for the docs")
