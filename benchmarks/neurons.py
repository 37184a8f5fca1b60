"""Knowledge neurons (``ax.knowledge_neurons``) against EleutherAI's ``knowledge-neurons`` 0.0.2,
on the masked-LM benchmark's BERT-shaped ``BertForMaskedLM`` (M1's model, random MLM head).

EleutherAI's ``KnowledgeNeurons.get_scores`` runs one layer at a time, its ``steps`` nodes
``linspace(0, 1, steps)`` in batches, each batch's forward with the layer's ``intermediate``
output replaced at the mask by the scaled neurons, summed with weight ``1 / steps``. attrax
scores every layer and node in stacked copies of the batch (``batch_size="auto"``). Their
nodes are not one of attrax's rules, but each is a fixed combination of the other's:
``steps=1`` is node 0 (attrax's ``riemann_left`` with 1 step), ``steps=2`` nodes 0 and 1 with
weight 1/2 (``riemann_trapezoid`` with 2), and attrax's ``riemann_right`` with ``m`` steps (Dai
et al.'s sum) is ``((m + 1) E(m + 1) - E(1)) / m``, ``E(s)`` EleutherAI's scores with ``s``
steps. Parity (<= 1e-4 of the largest score) on all three before any timing; then both are
timed, alternated, on one prompt and on a batch of prompts (EleutherAI: a call per prompt), 20
nodes each (EleutherAI 21: its 20 nonzero ones and node 0).

    PYTHONPATH=$PWD/src:$PWD .bench-venv/bin/python -m benchmarks.neurons [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

import numpy as np
import torch

import attrax as ax

from . import masked_lm
from .components import timed, write

STEPS = 20
MASK, TOKENS = 12, 48  # the mask's position, and the texts' length


def eleuther(hf: Any, tok: Any) -> Any:
    from knowledge_neurons import KnowledgeNeurons

    return KnowledgeNeurons(hf, tok, model_type="bert", device="cpu")


def their_scores(kn: Any, text: str, token: str, steps: int) -> np.ndarray:
    """``[layer, neuron]``: EleutherAI's scores of ``text``'s mask for ``token``."""
    batch = steps if steps <= 21 else 1
    return kn.get_scores(text, token, batch_size=batch, steps=steps, pbar=False).double().numpy()


def ours(model: ax.Model, texts: list[str] | str, tokens: Any, **kw: Any) -> np.ndarray:
    da = ax.knowledge_neurons(model, texts, tokens, **kw)
    return da.values.astype(np.float64)


def parity(model: ax.Model, kn: Any, text: str, token: str) -> dict[str, float]:
    """Max |attrax - EleutherAI| / max |EleutherAI| for the three identities."""
    e1, e2 = their_scores(kn, text, token, 1), their_scores(kn, text, token, 2)
    e_next = their_scores(kn, text, token, STEPS + 1)
    pairs = {
        "steps1_left": (ours(model, text, token, steps=1, quadrature="riemann_left"), e1),
        "steps2_trapezoid": (ours(model, text, token, steps=2, quadrature="riemann_trapezoid"), e2),
        f"steps{STEPS}_right": (
            ours(model, text, token, steps=STEPS),
            ((STEPS + 1) * e_next - e1) / STEPS,
        ),
    }
    out = {}
    for name, (got, want) in pairs.items():
        got = got[0]  # the one mask
        assert got.shape == want.shape, (got.shape, want.shape)
        rel = float(np.abs(got - want).max() / np.abs(want).max())
        out[name] = rel
        if rel > 1e-4:
            raise SystemExit(f"parity failed ({name}): {rel:.2e}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 prompts, 1 repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the numbers as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    hf, tok = masked_lm.load()
    model = ax.load_model(hf, tokenizer=tok)
    kn = eleuther(hf, tok)
    n = 2 if args.quick else 8
    texts = masked_lm.masked_texts(tok, n, TOKENS, (MASK,))
    tokens = [tok.convert_ids_to_tokens(row[0]) for row in masked_lm.predicted(model, texts)]
    results: dict[str, Any] = {
        "model": "bertmlm (M1's BertForMaskedLM)",
        "layers": hf.config.num_hidden_layers,
        "neurons": hf.config.intermediate_size,
        "tokens": TOKENS,
        "steps": STEPS,
        "parity_rel_diff": parity(model, kn, texts[0], tokens[0]),
    }
    print(results, flush=True)
    repeats = 1 if args.quick else args.repeats
    for name, count in (("one_prompt", 1), (f"{n}_prompts", n)):

        def attrax_run(count: int = count) -> Any:
            return ax.knowledge_neurons(model, texts[:count], tokens[:count], steps=STEPS)

        def their_run(count: int = count) -> Any:
            return [
                their_scores(kn, text, token, STEPS + 1)
                for text, token in zip(texts[:count], tokens[:count], strict=True)
            ]

        attrax_run(), their_run()  # warm-up
        rounds = [(timed(attrax_run, 1)[0], timed(their_run, 1)[0]) for _ in range(repeats)]
        row = {
            "attrax_s": round(statistics.median(a for a, _ in rounds), 4),
            "eleuther_s": round(statistics.median(b for _, b in rounds), 4),
            "speedup": round(statistics.median(b / a for a, b in rounds), 2),
        }
        results[name] = row
        print(name, row, flush=True)
    results.update(
        threads=1, repeats=repeats,
        load_average=[round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    )  # fmt: skip
    write(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
