"""An encoder-decoder NLI classifier: attrax vs Captum 0.9 on a BART-MNLI-shaped
``BartForSequenceClassification`` (N1), the model behind transformers' zero-shot pipeline; and
an encoder-decoder answerer, ``BartForQuestionAnswering`` on the same shape (N2,
``python -m benchmarks seq2seq-qa``: 16 (question, context) pairs of 12 + 33 tokens, the
predicted answer's start and end, one Captum call per target as in Q1).

``python -m benchmarks nli [--quick] [--record]``. The model has random weights (d_model 256,
3 encoder and 3 decoder layers, 4 heads) and a byte-level BPE tokenizer trained on the
workloads' corpus. The inputs are 16 (premise, hypothesis) pairs of 30 + 12 tokens, 48 with
``<s> … </s></s> … </s>``, so nothing is padded. The targets are the 3 classes (contradiction,
neutral, entailment); the objective their softmax probability.

BART reads each token twice: its encoder embeds the input, its decoder the input shifted right.
attrax attributes to the token's one embedding, through both, all classes in one call. Captum's
user attributes to both embedding layers (``LayerGradientXActivation`` /
``LayerIntegratedGradients`` on ``[encoder.embed_tokens, decoder.embed_tokens]``, transformers'
own forward from ids) and adds the decoder's row ``i + 1`` to the encoder's row ``i``, one batched
call per class. IG's reference is ``<pad>`` with ``<s>`` and ``</s>`` kept, for both libraries.

Parity comes first: the outputs of the first (untimed) calls must agree within 1e-4 after the
harness's aggregations, or the run stops with exit status 2. Then both libraries are timed in
this process, calls alternated, and the median is kept. Results go to
``benchmarks/results/nli[-quick].json``. ``--record`` stores them as ``cpu.json``'s ``nli``
entry and re-renders the docs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from . import tasks, workloads

METHODS = ("saliency", "input_x_gradient", "integrated_gradients")
PAIRS = (16, 30, 12)  # pairs, premise tokens, hypothesis tokens (without special tokens)
LABELS = ("contradiction", "neutral", "entailment")
SPEC = dict(d_model=256, layers=3, heads=4, ffn=1024, vocab_size=8000)
NAME = "bartnli"
QA_PAIRS = (16, 12, 33)  # pairs, question tokens, context tokens (without special tokens)
QA_NAME = "bartqa"


def build(root: str | os.PathLike | None = None, answers: bool = False) -> Path:
    """Build (or reuse) ``root/bartnli`` (``answers``: ``root/bartqa``, a question-answering
    head, drawn with its own seed): the model and its tokenizer."""
    import torch
    import transformers

    from attrax.testing import train_tokenizer

    env = os.environ.get("ATTRAX_BENCH_MODELS")
    base = Path(root) if root is not None else Path(env) if env else workloads.DEFAULT_ROOT
    path = base / (QA_NAME if answers else NAME)
    if (path / ".complete").exists():
        return path
    tok = train_tokenizer(
        "bart", texts=workloads.corpus(workloads.SEED + 5, 200_000), vocab_size=SPEC["vocab_size"]
    )
    labels = dict(enumerate(("start", "end") if answers else LABELS))
    s = SPEC
    config = transformers.BartConfig(
        vocab_size=len(tok), d_model=s["d_model"], encoder_layers=s["layers"],
        decoder_layers=s["layers"], encoder_attention_heads=s["heads"],
        decoder_attention_heads=s["heads"], encoder_ffn_dim=s["ffn"], decoder_ffn_dim=s["ffn"],
        max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id,
        forced_eos_token_id=tok.eos_token_id, dropout=0.0, attention_dropout=0.0,
        classifier_dropout=0.0, num_labels=len(labels), id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )  # fmt: skip
    torch.manual_seed(workloads.SEED + (4100 if answers else 4000))
    head = "ForQuestionAnswering" if answers else "ForSequenceClassification"
    model = getattr(transformers, f"Bart{head}")(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / ".complete").write_text(json.dumps({"kind": path.name, "seed": workloads.SEED}) + "\n")
    return path


def load(root: str | os.PathLike | None = None, answers: bool = False):
    """``(model, tokenizer)``: eval, float32, CPU, eager attention."""
    auto = "AutoModelForQuestionAnswering" if answers else "AutoModelForSequenceClassification"
    return tasks.load_head(build(root, answers), auto)


def pairs(tok, n: int, premise: int, hypothesis: int) -> list[tuple[str, str]]:
    """``n`` (premise, hypothesis) pairs of exactly ``premise`` + ``hypothesis`` word tokens."""
    stream = workloads.word_stream(17)
    out = [
        (
            workloads._exact(tok, stream, premise, leading_space=False),
            workloads._exact(tok, stream, hypothesis, leading_space=False),
        )
        for _ in range(n)
    ]
    assert all(len(tok(p, h)["input_ids"]) == premise + hypothesis + 4 for p, h in out)
    return out


def attrax_nli(model, given, method: str, steps: int) -> tuple[np.ndarray, float]:
    """``([example, class, source, hidden], seconds)``: every class in one call."""
    import torch

    import attrax as ax

    from .baselines import reference_ids

    kwargs: dict[str, Any] = {"abs": False} if method == "saliency" else {}
    if method == "integrated_gradients":
        tok = model.tokenizer
        ids = tok([p for p, _ in given], [h for _, h in given], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            base = model.embed(reference_ids(tok, ids)).detach()
        kwargs.update(steps=steps, quadrature="gausslegendre", baseline=base)
    t0 = time.perf_counter()
    da = getattr(ax, method)(model, given, "all", **kwargs)
    seconds = time.perf_counter() - t0
    assert da.target.values.tolist() == list(LABELS)
    return da.values, seconds


def captum_nli(
    hf, tok, given, method: str, steps: int, decoder: bool = True
) -> tuple[np.ndarray, float]:
    """``([example, class, source, hidden], seconds)``: one batched Captum call per class on
    both embedding layers, transformers' forward from ids; the decoder's row ``i + 1`` added to
    the encoder's row ``i`` (the decoder's row 0 is its start token, no input token).
    ``decoder=False``: the encoder's rows alone, what hooking one layer gives."""
    reads = [lambda out: out.logits.softmax(-1)] * len(LABELS)
    return captum_both_stacks(
        hf, tok, given, method, steps, reads, list(range(len(LABELS))), decoder
    )


def captum_qa(
    hf, tok, given, spans: list[tuple[int, int]], method: str, steps: int
) -> tuple[np.ndarray, float]:
    """``([example, target, source, hidden], seconds)``: one batched Captum call per target on
    both embedding layers, the answer's start then its end, the forward the softmax of those
    logits over the positions (as Q1's)."""
    reads = [lambda out: out.start_logits.softmax(-1), lambda out: out.end_logits.softmax(-1)]
    targets = [[span[slot] for span in spans] for slot in (0, 1)]
    return captum_both_stacks(hf, tok, given, method, steps, reads, targets)


def captum_both_stacks(
    hf, tok, given, method: str, steps: int, reads: list, targets: list, decoder: bool = True
) -> tuple[np.ndarray, float]:
    """One batched Captum call per ``(reads[k], targets[k])`` on both embedding layers of an
    encoder-decoder classifier, transformers' forward from ids (see :func:`captum_nli`)."""
    import torch
    from captum.attr import LayerGradientXActivation, LayerIntegratedGradients

    from .baselines import reference_ids

    layers = [hf.model.encoder.embed_tokens, hf.model.decoder.embed_tokens]

    def forward(ids, mask, read):
        return read(hf(input_ids=ids, attention_mask=mask))

    premises, hypotheses = [p for p, _ in given], [h for _, h in given]
    reference = None
    if method == "integrated_gradients":  # built before the clock, as attrax's baseline is
        reference = reference_ids(tok, tok(premises, hypotheses, return_tensors="pt")["input_ids"])
    t0 = time.perf_counter()
    enc = tok(premises, hypotheses, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    columns = []
    for read, target in zip(reads, targets, strict=True):  # a Captum user's loop over targets
        if method == "integrated_gradients":
            with warnings.catch_warnings():  # two layers, neither fed by the other: as it asks
                warnings.filterwarnings("ignore", "Multiple layers provided")
                algo = LayerIntegratedGradients(lambda i, m, read=read: forward(i, m, read), layers)
            got = algo.attribute(
                ids, baselines=reference, target=target, additional_forward_args=(mask,),
                n_steps=steps, method="gausslegendre",
            )  # fmt: skip
        else:
            algo = LayerGradientXActivation(
                lambda i, m, read=read: forward(i, m, read),
                layers,
                multiply_by_inputs=method == "input_x_gradient",
            )
            got = algo.attribute(ids, target=target, additional_forward_args=(mask,))
        encoder, shifted = (g.detach() for g in got)
        total = encoder.clone()
        if decoder:
            total[:, :-1] += shifted[:, 1:]
        columns.append(total)
    seconds = time.perf_counter() - t0
    return torch.stack(columns, 1).numpy(), seconds


def run(args: argparse.Namespace, argv: list[str]) -> int:
    import attrax as ax

    tasks.quiet(args.threads)
    hf, tok = load()
    model = ax.load_model(hf, tokenizer=tok)
    given = pairs(tok, *PAIRS)
    steps = 16 if args.quick else 50
    return tasks.run(
        args,
        argv,
        key="nli",
        meta=dict(pairs=list(PAIRS), steps=steps, spec=SPEC),
        ours=lambda method: attrax_nli(model, given, method, steps),
        theirs=lambda method: captum_nli(hf, tok, given, method, steps),
    )


def run_qa(args: argparse.Namespace, argv: list[str]) -> int:
    """N2: ``BartForQuestionAnswering``, the predicted answers' start and end."""
    import attrax as ax

    from .question_answering import attrax_qa, predicted_spans

    tasks.quiet(args.threads)
    hf, tok = load(answers=True)
    model = ax.load_model(hf, tokenizer=tok)
    given = pairs(tok, *QA_PAIRS)
    spans = predicted_spans(model, given)
    steps = 16 if args.quick else 50
    return tasks.run(
        args,
        argv,
        key="seq2seq_qa",
        meta=dict(pairs=list(QA_PAIRS), steps=steps, spec=SPEC),
        ours=lambda method: attrax_qa(model, given, spans, method, steps),
        theirs=lambda method: captum_qa(hf, tok, given, spans, method, steps),
    )


def parser(p: argparse.ArgumentParser, key: str = "nli") -> None:
    """The options of ``python -m benchmarks nli`` (``key="seq2seq_qa"``: ``seq2seq-qa``)."""
    tasks.parser(p, METHODS, key)


def defaults(args: argparse.Namespace, name: str = "nli") -> argparse.Namespace:
    return tasks.defaults(args, name)
