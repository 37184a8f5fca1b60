"""Extractive question answering: attrax vs Captum 0.9 on a BERT-shaped question-answering model,
the task of Captum's "Interpreting BERT Models" tutorial (SQuAD).

``python -m benchmarks question-answering [--quick] [--record]``. The model is
``BertForQuestionAnswering``: the classifiers' encoder (:func:`workloads.build_classifiers`)
under a ``qa_outputs`` head drawn with its own seed. The inputs are 16 (question, context) pairs
of 12 + 33 tokens, 48 with ``[CLS]`` and the two ``[SEP]``, so nothing is padded. Each pair's
targets are the start and end of its predicted answer, given to both libraries as token
positions. attrax attributes both targets in one call. Captum makes one batched ``attribute``
call per target, start then end, as its tutorial does. Its forward returns the softmax over the
positions of the start (or end) logits.

Parity comes first: the outputs of the first (untimed) calls must agree within 1e-4 after the
harness's aggregations, or the run stops with exit status 2. Then both libraries are timed in
this process, calls alternated, and the median is kept. Results go to
``benchmarks/results/question-answering[-quick].json``. ``--record`` stores them as
``cpu.json``'s ``question_answering`` entry and re-renders the docs.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import tasks, workloads

# conductance: the tutorial's layer conductance at every block's output (Captum: one call per
# block of bert.encoder.layer and per target), from the same reference, arrays [.., layer, source, H]
METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "conductance")
PAIRS = (16, 12, 33)  # pairs, question tokens, context tokens (without special tokens)
NAME = "bertqa"


def build(root: str | os.PathLike | None = None) -> Path:
    """Build (or reuse) ``root/bertqa``: the classifiers' encoder and a ``qa_outputs`` head."""
    labels = {"num_labels": 2, "id2label": {0: "start", 1: "end"}}
    labels["label2id"] = {"start": 0, "end": 1}
    return tasks.build_head(root, NAME, "BertForQuestionAnswering", workloads.SEED + 2000, **labels)


def load(root: str | os.PathLike | None = None):
    """``(model, tokenizer)``: eval, float32, CPU, eager attention."""
    return tasks.load_head(build(root), "AutoModelForQuestionAnswering")


def pairs(tok, n: int, question: int, context: int) -> list[tuple[str, str]]:
    """``n`` (question, context) pairs of exactly ``question`` + ``context`` word tokens."""
    questions = workloads.classifier_texts(tok, n, question + 2)
    contexts = workloads.classifier_texts(tok, 2 * n, context + 2)[n:]  # other words
    out = list(zip(questions, contexts, strict=True))
    assert all(len(tok(q, c)["input_ids"]) == question + context + 3 for q, c in out)
    return out


def predicted_spans(model, given: list[tuple[str, str]]) -> list[tuple[int, int]]:
    """attrax's predicted answer of each pair, as ``(start, end)`` token positions."""
    import attrax as ax

    da = ax.step_scores(model, given, scores="probability")
    return [tuple(int(p) for p in row) for row in da.predicted_position.values]


def attrax_qa(
    model, given: list[tuple[str, str]], spans: list[tuple[int, int]], method: str, steps: int
) -> tuple[np.ndarray, float]:
    """``([example, target, source, hidden], seconds)``: start then end, in one call."""
    import torch

    import attrax as ax

    from .baselines import reference_ids

    kwargs: dict[str, Any] = {"abs": False} if method == "saliency" else {}
    if method in ("integrated_gradients", "conductance"):
        ids = model.tokenizer(*zip(*given, strict=True), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            base = model.embed(reference_ids(model.tokenizer, ids)).detach()
        kwargs.update(steps=steps, quadrature="gausslegendre", baseline=base)
    if method == "conductance":
        kwargs["layers"] = slice(1, None)  # block l's output, as Captum's encoder.layer[l - 1]
    t0 = time.perf_counter()
    da = getattr(ax, method)(model, given, spans, **kwargs)
    seconds = time.perf_counter() - t0
    assert da.target.values.tolist() == ["start", "end"]
    if method == "conductance":
        da = da.transpose("example", "target", "layer", "source", "hidden")
    return da.values, seconds


def captum_qa(
    hf, tok, given: list[tuple[str, str]], spans: list[tuple[int, int]], method: str, steps: int
) -> tuple[np.ndarray, float]:
    """``([example, target, source, hidden], seconds)``: one batched Captum call per target, the
    start then the end, its forward the softmax of those logits (:func:`tasks.captum_loop`)."""
    from .baselines import reference_ids

    questions, contexts = (list(side) for side in zip(*given, strict=True))
    reference = None
    if method in ("integrated_gradients", "conductance"):  # before the clock, as attrax's is
        reference = reference_ids(tok, tok(questions, contexts, return_tensors="pt")["input_ids"])
    return tasks.captum_loop(
        hf,
        lambda: tok(questions, contexts, return_tensors="pt"),
        reference,
        [lambda out: out.start_logits.softmax(-1), lambda out: out.end_logits.softmax(-1)],
        [[span[slot] for span in spans] for slot in (0, 1)],
        method,
        steps,
    )


def run(args: argparse.Namespace, argv: list[str]) -> int:
    import attrax as ax

    tasks.quiet(args.threads)
    hf, tok = load()
    model = ax.load_model(hf, tokenizer=tok)
    given = pairs(tok, *PAIRS)
    spans = predicted_spans(model, given)
    steps = 16 if args.quick else 50
    return tasks.run(
        args,
        argv,
        key="question_answering",
        meta=dict(pairs=list(PAIRS), steps=steps),
        ours=lambda method: attrax_qa(model, given, spans, method, steps),
        theirs=lambda method: captum_qa(hf, tok, given, spans, method, steps),
    )


def parser(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m benchmarks question-answering``."""
    tasks.parser(p, METHODS, "question_answering")


def defaults(args: argparse.Namespace) -> argparse.Namespace:
    return tasks.defaults(args, "question-answering")
