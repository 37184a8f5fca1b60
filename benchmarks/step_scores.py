"""Step scores (S1): attrax's ``step_scores`` against Inseq 0.7's step functions on W1 and W2.

``python -m benchmarks step-scores [--quick] [--record]``. The models are W1 (GPT-2-shaped) and
W2 (Marian-shaped) with prompts and targets of 32 tokens (:func:`workloads.texts`). Inseq computes
step scores beside an attribution: it runs them under its ``"dummy"`` method, which attributes
nothing, one forward per target step. attrax computes them from one teacher-forced forward.

Three groups of scores, each one call per library:

- ``basic``: probability, logit and entropy;
- ``pair``: crossentropy and perplexity, on two examples, W2 only. Inseq 0.7's crossentropy
  fails on one sequence (its target ids squeeze to a 0-d tensor), and Inseq runs a decoder-only
  model's given targets one sequence at a time, so it has none on W1;
- ``contrast``: the target-side contrast scores. The contrast text shares the target's first
  ``k`` tokens and then goes on otherwise. Inseq scores ``c_t`` after the contrast's own prefix
  ``c_<t``, attrax after the target's ``y_<t`` (Yin & Neubig's foil): the two agree up to the
  first token that differs, step ``k``, and are compared there;
- ``inputs``: KL divergence, P-CXMI and in-context PVI against another prompt (decoder-only:
  Inseq's ``contrast_targets`` with that prompt; encoder-decoder: its ``contrast_sources``).

Inseq's numbers are converted to attrax's before parity (:data:`CONVERT`): its perplexity is
``2 ** crossentropy`` (the crossentropy in nats), its P-CXMI ``log2 q(y_t) - log2 p(y_t)``, and
its in-context PVI ``log q(y_t) - log p(y_t)``. Parity runs on float64 copies of the models (the
KL divergence of a random-weight model is ~1e-7, float32's rounding), within 1e-4 of Inseq's
largest value; the timings run in float32, calls alternated, the median kept. Results go to
``benchmarks/results/step-scores[-quick].json``; ``--record`` stores them as ``cpu.json``'s
``step_scores`` entry and re-renders the docs.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import harness, workloads
from .parity import TOLERANCE, rel_err

WORKLOADS = {"W1": "gpt2", "W2": "marian"}
LENGTHS = (32, 32)  # prompt and target tokens (W1, W2)
#: Inseq's score name for each attrax score, by group
GROUPS: dict[str, dict[str, str]] = {
    "basic": {"probability": "probability", "logit": "logit", "entropy": "entropy"},
    "pair": {"crossentropy": "crossentropy", "perplexity": "perplexity"},
    "contrast": {
        "contrast_prob": "contrast_prob",
        "contrast_logit": "contrast_logits",
        "contrast_prob_diff": "contrast_prob_diff",
        "contrast_logit_diff": "contrast_logits_diff",
    },
    "inputs": {"kl_divergence": "kl_divergence", "pcxmi": "pcxmi", "in_context_pvi": "pcxmi"},
}
#: attrax's value as Inseq states it, by attrax's name (in-context PVI: attrax's P-CXMI)
CONVERT: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "perplexity": lambda a: 2.0 ** np.log(a),
    "pcxmi": lambda a: -a / math.log(2),
    "in_context_pvi": lambda a: -a,
}


@dataclass
class Case:
    """One workload's texts: the prompts (two), the target, the contrast and its first step."""

    kind: str
    prompts: list[str]
    target: str
    contrast: str
    first_difference: int

    @property
    def decoder_only(self) -> bool:
        return self.kind in ("gpt2", "llama")


def case(kind: str, tok: Any) -> Case:
    """The texts of W1 or W2 (32 + 32 tokens), another prompt of 32 tokens and a contrast that
    shares the target's tokens up to its middle word start and goes on with other words."""
    prompt, target = workloads.texts(kind, tok, *LENGTHS)
    other = workloads.other_prompt(kind, tok, LENGTHS[0])
    ids = tok(target, add_special_tokens=kind != "gpt2")["input_ids"]
    alt = tok(workloads.other_prompt(kind, tok, LENGTHS[1]), add_special_tokens=kind != "gpt2")
    alt_ids = alt["input_ids"]
    mark = "Ġ" if kind == "gpt2" else "▁"
    # the first word start at or after the middle where the two differ: re-tokenizes as joined
    k = next(
        i
        for i in range(len(ids) // 2, len(ids) - 1)
        if tok.convert_ids_to_tokens(alt_ids[i]).startswith(mark) and alt_ids[i] != ids[i]
    )
    joined = ids[:k] + alt_ids[k:]
    text = tok.decode(joined, skip_special_tokens=True)
    if kind == "gpt2":
        text = text if text.startswith(" ") else " " + text
        full = tok(prompt + text)["input_ids"]
        assert full == tok(prompt)["input_ids"] + joined, "the contrast does not re-tokenize"
    else:
        assert tok(text)["input_ids"] == joined, "the contrast does not re-tokenize"
    return Case(kind, [prompt, other], target, text, k)


def attrax_scores(model: Any, c: Case, group: str) -> tuple[dict[str, np.ndarray], float]:
    """``({attrax name: [examples, steps]}, seconds)`` of one ``step_scores`` call."""
    import attrax as ax

    names = list(GROUPS[group])
    kwargs: dict[str, Any] = {}
    inputs: Any = c.prompts[0]
    targets: Any = c.target
    if group == "pair":
        inputs, targets = c.prompts, [c.target, c.target]
    elif group == "contrast":
        kwargs["contrast"] = c.contrast
    elif group == "inputs":
        names = ["kl_divergence", "pcxmi"]
        kwargs["contrast_inputs"] = c.prompts[1]
    t0 = time.perf_counter()
    da = ax.step_scores(model, inputs, targets, scores=names, **kwargs)
    seconds = time.perf_counter() - t0
    values = da.transpose(..., "target", "score").values.reshape(-1, da.sizes["target"], len(names))
    out = {name: values[..., i] for i, name in enumerate(names)}
    if group == "inputs":
        out["in_context_pvi"] = out["pcxmi"]
    return out, seconds


def inseq_scores(handle: Any, c: Case, group: str) -> tuple[dict[str, np.ndarray], float]:
    """``({attrax name: [examples, steps]}, seconds)`` of one Inseq ``attribute`` call under its
    ``"dummy"`` method, as Inseq defines each score (:func:`as_inseq` converts attrax's)."""
    names = dict(GROUPS[group])
    inputs = c.prompts if group == "pair" else c.prompts[:1]
    targets = [c.target] * len(inputs)
    kwargs: dict[str, Any] = {}
    if group == "contrast":
        contrast = c.prompts[0] + c.contrast if c.decoder_only else c.contrast
        kwargs["contrast_targets"] = contrast
    elif group == "inputs":
        names["in_context_pvi"] = "in_context_pvi"
        if c.decoder_only:  # Inseq takes another prompt as a contrast target with that prefix
            kwargs["contrast_targets"] = c.prompts[1] + c.target
        else:
            kwargs["contrast_sources"] = c.prompts[1]
    generated = [p + t for p, t in zip(inputs, targets, strict=True)] if c.decoder_only else targets
    t0 = time.perf_counter()
    out = handle.attribute(
        inputs, generated, show_progress=False, step_scores=sorted(set(names.values())),
        step_scores_args=kwargs, batch_size=len(inputs),
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    got = {
        ours: np.stack([s.step_scores[theirs].double().numpy() for s in out.sequence_attributions])
        for ours, theirs in names.items()
    }
    return got, seconds


def as_inseq(name: str, value: np.ndarray) -> np.ndarray:
    """attrax's score ``name`` stated as Inseq states it."""
    return CONVERT[name](value) if name in CONVERT else value


def compare(
    ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], c: Case, group: str
) -> list[dict[str, Any]]:
    """One parity row per score: ``max |attrax - Inseq| / max |Inseq|`` over the steps both
    define alike (contrast scores: up to the contrast's first different token)."""
    rows = []
    for name in GROUPS[group]:
        a, b = as_inseq(name, ours[name]), theirs[name]
        if group == "contrast":
            a, b = a[:, : c.first_difference + 1], b[:, : c.first_difference + 1]
        error = rel_err(a, b)
        rows.append(dict(score=name, inseq=GROUPS[group][name], error=error, ok=error <= TOLERANCE))
    return rows


def run(args: argparse.Namespace) -> int:
    import torch

    import attrax as ax

    from .baselines import inseq_load
    from .tasks import finish, quiet

    quiet(args.threads)
    meta = dict(
        command="python -m benchmarks step-scores" + (" --quick" if args.quick else ""),
        quick=args.quick, started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), threads=args.threads,
        lengths=list(LENGTHS), machine=harness.machine_info(), versions=harness.versions(),
        attrax_source=harness.attrax_source(), tolerance=TOLERANCE, repeats=args.repeats,
    )  # fmt: skip
    results: dict[str, Any] = dict(meta=meta, status="running", runs=[], parity=[])
    failures: list[str] = []
    for workload, kind in WORKLOADS.items():
        hf, tok = workloads.load(kind)
        c = case(kind, tok)
        results["parity"].append(dict(workload=workload, first_difference=c.first_difference))
        wide = copy.deepcopy(hf).to(torch.float64)
        exact = ax.load_model(wide, tokenizer=tok)
        exact_handle, _ = inseq_load(wide, tok, "dummy")
        model = ax.load_model(hf, tokenizer=tok)
        handle, _ = inseq_load(hf, tok, "dummy")
        for group in GROUPS:
            if group == "pair" and c.decoder_only:
                continue
            rows = compare(
                attrax_scores(exact, c, group)[0], inseq_scores(exact_handle, c, group)[0], c, group
            )
            for r in rows:
                results["parity"].append(dict(workload=workload, group=group, **r))
                state = "ok" if r["ok"] else "FAIL"
                print(f"parity {workload} {r['score']:20s} vs inseq: {state} ({r['error']:.1e})")
                if not r["ok"]:
                    failures.append(f"{workload} {r['score']}: {r['error']:.1e}")
            if any(not r["ok"] for r in rows):
                continue
            times: dict[str, list[float]] = {"attrax": [], "inseq": []}
            for _ in range(args.repeats + 1):  # the first pair warms up, untimed
                times["attrax"].append(attrax_scores(model, c, group)[1])
                times["inseq"].append(inseq_scores(handle, c, group)[1])
            medians = {lib: statistics.median(t[1:]) for lib, t in times.items()}
            speedup = medians["inseq"] / medians["attrax"]
            results["runs"].append(
                dict(workload=workload, group=group, attrax_s=medians["attrax"],
                     inseq_s=medians["inseq"], speedup=speedup, load1=os.getloadavg()[0])
            )  # fmt: skip
            print(
                f"  {workload} {group:9s} attrax {medians['attrax']:.4f} s, Inseq "
                f"{medians['inseq']:.4f} s: {speedup:.1f}x"
            )
    return finish(args, results, failures, "step_scores")


def parser(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m benchmarks step-scores``."""
    p.add_argument("--quick", action="store_true", help="1 timed call per library")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, help="timed calls per library (default 5; --quick 1)")
    p.add_argument("--out", help="results JSON (default benchmarks/results/step-scores.json)")
    p.add_argument(
        "--record", action="store_true",
        help="store the finished run as cpu.json's `step_scores` entry and re-render the docs",
    )  # fmt: skip


def defaults(args: argparse.Namespace) -> argparse.Namespace:
    from pathlib import Path

    args.repeats = args.repeats or (1 if args.quick else 5)
    name = "step-scores-quick" if args.quick else "step-scores"
    args.out = (
        Path(args.out) if args.out else harness.REPO / "benchmarks" / "results" / f"{name}.json"
    )
    return args
