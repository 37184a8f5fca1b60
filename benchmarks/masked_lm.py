"""Masked language models: attrax vs Captum 0.9 on a BERT-shaped ``BertForMaskedLM`` (fill-mask).

``python -m benchmarks masked-lm [--quick] [--record]``. The model is the classifiers' encoder
(:func:`workloads.build_classifiers`) under an MLM head drawn with its own seed, its decoder tied
to the word embeddings, as BERT's is. The inputs are 16 texts of 48 tokens; the tokens at
positions 12 and 30 are replaced by ``[MASK]``. Each mask's target is the token the model
predicts there. attrax attributes both masks in one call. Captum makes one batched ``attribute``
call per mask. Its forward returns the softmax over the vocabulary at that mask.

Parity comes first: the outputs of the first (untimed) calls must agree within 1e-4 after the
harness's aggregations, or the run stops with exit status 2. Then both libraries are timed in
this process, calls alternated, and the median is kept. Results go to
``benchmarks/results/masked-lm[-quick].json``. ``--record`` stores them as ``cpu.json``'s
``masked_lm`` entry and re-renders the docs.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import tasks, workloads

METHODS = ("saliency", "input_x_gradient", "integrated_gradients")
TEXTS = (16, 48)  # texts, tokens with [CLS] and [SEP]
MASKS = (12, 30)  # the positions replaced by [MASK]
NAME = "bertmlm"


def build(root: str | os.PathLike | None = None) -> Path:
    """Build (or reuse) ``root/bertmlm``: the classifiers' encoder and an MLM head."""
    return tasks.build_head(root, NAME, "BertForMaskedLM", workloads.SEED + 3000)


def load(root: str | os.PathLike | None = None):
    """``(model, tokenizer)``: eval, float32, CPU, eager attention."""
    return tasks.load_head(build(root), "AutoModelForMaskedLM")


def masked_texts(tok, n: int, length: int, masks: tuple[int, ...]) -> list[str]:
    """``n`` texts of exactly ``length`` tokens with ``[MASK]`` at ``masks``."""
    out = []
    for text in workloads.classifier_texts(tok, n, length):
        ids = tok(text)["input_ids"]
        for p in masks:
            ids[p] = tok.mask_token_id
        out.append(tok.decode(ids[1:-1]))
    for text in out:
        ids = tok(text)["input_ids"]
        assert len(ids) == length and [
            p for p, i in enumerate(ids) if i == tok.mask_token_id
        ] == list(masks)
    return out


def predicted(model, texts: list[str]) -> list[list[int]]:
    """attrax's predicted token at each mask of each text."""
    import attrax as ax

    da = ax.step_scores(model, texts, scores="probability")
    return da.predicted_id.values.tolist()


def attrax_mlm(model, texts, tokens, method: str, steps: int) -> tuple[np.ndarray, float]:
    """``([example, mask, source, hidden], seconds)``: every mask in one call."""
    import torch

    import attrax as ax

    from .baselines import reference_ids

    kwargs: dict[str, Any] = {"abs": False} if method == "saliency" else {}
    if method == "integrated_gradients":
        ids = model.tokenizer(texts, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            base = model.embed(reference_ids(model.tokenizer, ids)).detach()
        kwargs.update(steps=steps, quadrature="gausslegendre", baseline=base)
    names = [model.tokenizer.convert_ids_to_tokens(row) for row in tokens]
    t0 = time.perf_counter()
    da = getattr(ax, method)(model, texts, names, **kwargs)
    seconds = time.perf_counter() - t0
    assert da.target.values.tolist() == list(MASKS)
    return da.values, seconds


def captum_mlm(hf, tok, texts, tokens, method: str, steps: int) -> tuple[np.ndarray, float]:
    """``([example, mask, source, hidden], seconds)``: one batched Captum call per mask, its
    forward the softmax over the vocabulary there (:func:`tasks.captum_loop`)."""
    from .baselines import reference_ids

    reference = None
    if method == "integrated_gradients":  # built before the clock, as attrax's baseline is
        reference = reference_ids(tok, tok(texts, return_tensors="pt")["input_ids"])
    return tasks.captum_loop(
        hf,
        lambda: tok(texts, return_tensors="pt"),
        reference,
        [lambda out, p=position: out.logits[:, p].softmax(-1) for position in MASKS],
        [[row[k] for row in tokens] for k in range(len(MASKS))],
        method,
        steps,
    )


def run(args: argparse.Namespace, argv: list[str]) -> int:
    import attrax as ax

    tasks.quiet(args.threads)
    hf, tok = load()
    model = ax.load_model(hf, tokenizer=tok)
    texts = masked_texts(tok, *TEXTS, MASKS)
    tokens = predicted(model, texts)
    steps = 16 if args.quick else 50
    return tasks.run(
        args,
        argv,
        key="masked_lm",
        meta=dict(texts=list(TEXTS), masks=list(MASKS), steps=steps),
        ours=lambda method: attrax_mlm(model, texts, tokens, method, steps),
        theirs=lambda method: captum_mlm(hf, tok, texts, tokens, method, steps),
    )


def parser(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m benchmarks masked-lm``."""
    tasks.parser(p, METHODS, "masked_lm")


def defaults(args: argparse.Namespace) -> argparse.Namespace:
    return tasks.defaults(args, "masked-lm")
