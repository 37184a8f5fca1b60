"""What the task workloads (Q1 question answering, M1 masked LM) share: parity against Captum on
the first, untimed calls, then alternated timings in one process, a results JSON, and
``--record`` into ``cpu.json``."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import harness, report, workloads
from .parity import TOLERANCE, parity

#: one library's call on a method: ``([example, target, source, hidden], seconds)``
Call = Callable[[str], tuple[np.ndarray, float]]


def run(
    args: argparse.Namespace,
    argv: Sequence[str],
    *,
    key: str,
    meta: dict[str, Any],
    ours: Call,
    theirs: Call,
) -> int:
    """Parity of every method of ``args.methods`` (exit status 2 on a failure), then the
    timings; writes ``args.out`` and, with ``args.record``, ``cpu.json``'s entry ``key``."""
    meta = dict(
        command="python -m benchmarks " + " ".join(argv), quick=args.quick,
        started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), threads=args.threads,
        spec=workloads.BERT_SPEC, machine=harness.machine_info(),
        attrax_source=harness.attrax_source(), versions=harness.versions(), tolerance=TOLERANCE,
        repeats=args.repeats, load1_start=os.getloadavg()[0],
    ) | meta  # fmt: skip
    results: dict[str, Any] = dict(meta=meta, status="running", runs=[], parity=[])
    failures: list[str] = []
    for method in args.methods:
        a, _ = ours(method)  # untimed: parity, and the warm-up
        b, _ = theirs(method)
        flat = (-1, *a.shape[2:])
        res = parity(a.reshape(flat), b.reshape(flat), method)
        results["parity"].append(dict(method=method, **res))
        errors = ", ".join(f"{k} {v:.1e}" for k, v in res["errors"].items())
        print(f"parity {method:21s} vs captum: {'ok' if res['ok'] else 'FAIL'} ({errors})")
        if not res["ok"]:
            failures += [f"{method} vs captum: {f}" for f in res["failures"]]
            continue
        times: dict[str, list[float]] = {"attrax": [], "captum": []}
        for _ in range(args.repeats):  # alternated: a shared machine's load hits both alike
            times["attrax"].append(ours(method)[1])
            times["captum"].append(theirs(method)[1])
        medians = {lib: statistics.median(t) for lib, t in times.items()}
        speedup = medians["captum"] / medians["attrax"]
        results["runs"].append(
            dict(method=method, attrax_s=medians["attrax"], captum_s=medians["captum"],
                 speedup=speedup, calls=args.repeats, load1=os.getloadavg()[0])
        )  # fmt: skip
        print(
            f"  {method:21s} attrax {medians['attrax']:.3f} s, Captum {medians['captum']:.3f} s:"
            f" {speedup:.2f}x"
        )
    return finish(args, results, failures, key)


def finish(args: argparse.Namespace, results: dict[str, Any], failures: list[str], key: str) -> int:
    """End a run: its status and finish time in ``args.out``; exit status 2 on a parity
    failure, else with ``args.record`` the run as ``cpu.json``'s entry ``key`` and the docs
    rendered again."""
    results.update(status="parity_failed" if failures else "ok", failures=failures)
    results["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    if failures:
        print("\n".join(["FAILED:", *failures]), file=sys.stderr)
        return 2
    if args.record:
        committed = json.loads(report.CPU_RESULTS.read_text())
        committed[key] = results
        report.CPU_RESULTS.write_text(json.dumps(committed, indent=1, ensure_ascii=False) + "\n")
        report.write_docs()
    print(f"wrote {args.out}")
    return 0


def captum_loop(
    hf: Any,
    encode: Callable[[], Any],
    reference: Any,
    reads: Sequence[Callable[[Any], Any]],
    targets: Sequence[list[int]],
    method: str,
    steps: int,
) -> tuple[np.ndarray, float]:
    """``([example, target, source, hidden], seconds)``: one batched Captum call per target
    slot ``k``, its forward ``reads[k](model output)`` (a softmax), its targets ``targets[k]``.

    Saliency (``abs=False``) and InputXGradient run on ``inputs_embeds``. IG is
    ``LayerIntegratedGradients`` on ``bert.embeddings.word_embeddings`` from ``reference``
    (token ids); conductance is ``LayerConductance`` on each block of ``bert.encoder.layer``, on
    ``inputs_embeds`` from ``reference``'s word embeddings (``[B, layer, L, H]`` per target). The clock starts at the texts: ``encode()``, the tokenizer call a Captum user
    writes, and the embedding lookup are timed.
    """
    import torch
    from captum.attr import InputXGradient, LayerConductance, LayerIntegratedGradients, Saliency

    def forward(x, mask, types, read: Callable[[Any], Any], embeds: bool):
        source = {"inputs_embeds": x} if embeds else {"input_ids": x}
        return read(hf(**source, attention_mask=mask, token_type_ids=types))

    t0 = time.perf_counter()
    enc = encode()
    ids, mask, types = enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]
    columns = []
    for read, target in zip(reads, targets, strict=True):  # a Captum user's loop over targets
        if method == "conductance":  # the tutorial's loop over the blocks, per target
            with torch.no_grad():
                embeds = hf.get_input_embeddings()(ids)
                base = hf.get_input_embeddings()(reference)
            blocks = []
            for block in hf.bert.encoder.layer:
                algo = LayerConductance(
                    lambda x, m, t, read=read: forward(x, m, t, read, True), block
                )
                blocks.append(algo.attribute(
                    embeds, baselines=base, target=target, additional_forward_args=(mask, types),
                    n_steps=steps, method="gausslegendre",
                ))  # fmt: skip
            got = torch.stack(blocks, 1)  # [B, layer, L, H]
        elif method == "integrated_gradients":
            algo = LayerIntegratedGradients(
                lambda x, m, t, read=read: forward(x, m, t, read, False),
                hf.bert.embeddings.word_embeddings,
            )
            got = algo.attribute(
                ids, baselines=reference, target=target, additional_forward_args=(mask, types),
                n_steps=steps, method="gausslegendre",
            )  # fmt: skip
        else:
            with torch.no_grad():
                embeds = hf.get_input_embeddings()(ids)
            kind = Saliency if method == "saliency" else InputXGradient
            algo = kind(lambda x, m, t, read=read: forward(x, m, t, read, True))
            extra = {"abs": False} if method == "saliency" else {}
            got = algo.attribute(
                embeds, target=target, additional_forward_args=(mask, types), **extra
            )
        columns.append(got.detach())
    seconds = time.perf_counter() - t0
    return torch.stack(columns, 1).numpy(), seconds


def parser(p: argparse.ArgumentParser, methods: Sequence[str], key: str) -> None:
    """The options of a task workload's command; ``key``: its ``cpu.json`` entry."""

    def chosen(text: str) -> list[str]:
        got = [x for x in text.split(",") if x]
        unknown = [x for x in got if x not in methods]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown} (choose from {tuple(methods)})")
        return got

    p.add_argument("--quick", action="store_true", help="IG 16 points, 1 timed call")
    p.add_argument("--methods", type=chosen, default=list(methods))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, help="timed calls per library (default 5; --quick 1)")
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/...)")
    p.add_argument(
        "--record", action="store_true",
        help=f"store the finished run as cpu.json's `{key}` entry and re-render the docs",
    )  # fmt: skip


def defaults(args: argparse.Namespace, name: str) -> argparse.Namespace:
    """Repeats and the results file of a task workload ``name`` (``masked-lm``...)."""
    args.repeats = args.repeats or (1 if args.quick else 5)
    name = f"{name}-quick" if args.quick else name
    args.out = args.out or harness.REPO / "benchmarks" / "results" / f"{name}.json"
    return args


def build_head(
    root: str | os.PathLike | None, name: str, head: str, seed: int, **config: Any
) -> Path:
    """Build (or reuse) ``root/<name>``: the classifiers' encoder
    (:func:`workloads.build_classifiers`) under ``transformers.<head>``'s head drawn with
    ``seed``, ``config`` set on its config; the classifiers' tokenizer."""
    import torch
    import transformers

    paths = workloads.build_classifiers(root)
    path = paths["bert2"].parent / name
    if (path / ".complete").exists():
        return path
    encoder = transformers.BertForSequenceClassification.from_pretrained(paths["bert2"])
    for key, value in config.items():
        setattr(encoder.config, key, value)
    torch.manual_seed(seed)
    model = getattr(transformers, head)(encoder.config).eval()
    # the same encoder; these heads read every token, so their BERT has no pooler
    weights = {k: v for k, v in encoder.bert.state_dict().items() if not k.startswith("pooler.")}
    model.bert.load_state_dict(weights)
    model.tie_weights()  # a masked LM's decoder: the word embeddings, as BERT's
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(paths["bert2"]).save_pretrained(path)
    (path / ".complete").write_text(json.dumps({"kind": name, "seed": seed}) + "\n")
    return path


def load_head(path: Path, auto: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a built head (``transformers.<auto>``): eval, float32, eager."""
    import transformers

    model = getattr(transformers, auto).from_pretrained(path, attn_implementation="eager")
    return model.eval(), transformers.AutoTokenizer.from_pretrained(path)


def quiet(threads: int) -> None:
    """Torch on ``threads`` threads, transformers without its progress bars and warnings."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
