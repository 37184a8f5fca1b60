#!/usr/bin/env python
"""attrax vs Captum and Inseq on a GPT-2-small-shaped model (12 layers, d=768, vocabulary 50257).

The main workloads (``run.py``) use a 4-layer, d=256 body under a 50257-token vocabulary, where
the vocabulary projection that the per-token loops repeat at every prefix position is most of
their work. At real size the transformer body dominates, and the best ratio any
one-backward-per-target method can reach shrinks (see docs/methods/gradients.md, cost model).
This script measures that case: random weights, the benchmark GPT-2 tokenizer, offline.

    python benchmarks/real_size.py                      # 32 + 32 tokens, saliency and IG (20 steps)
    python benchmarks/real_size.py --prompt 64 --target 16 --methods saliency

One process; per method, each library runs once to warm up, then ``--repeats`` timed calls
(median), libraries interleaved. Parity first: attrax equals each baseline within 1e-4 relative
after the harness's aggregations, or the script exits with status 2 before printing times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _attrax_runs as runs
import _baselines
import _models


def build(seed: int = 0):
    """``(hf_model, tokenizer)``: GPT-2-small-shaped, random weights, eager attention."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(_models.build_all()["gpt2"])
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    config = GPT2Config(
        vocab_size=50257,
        n_embd=768,
        n_layer=12,
        n_head=12,
        bos_token_id=eot,
        eos_token_id=eot,
        attn_implementation="eager",  # the baselines' attention, as in run.py
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval(), tok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    parser.add_argument("--target", type=int, default=32, help="target tokens (default 32)")
    parser.add_argument("--methods", default="saliency,integrated_gradients")
    parser.add_argument("--steps", type=int, default=20, help="IG points on every side")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per library")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    import attrax as ax

    torch.set_num_threads(args.threads)
    # Captum tells it set requires_grad on the embeddings, at every target of every call
    warnings.filterwarnings("ignore", "Input Tensor .* did not already require gradients")
    hf, tok = build()
    model = ax.load_model(hf, tokenizer=tok)
    wl = _models.workload("W1", tok, n_prompt=args.prompt, n_target=args.target)
    methods = args.methods.split(",")
    print(f"GPT-2-small shape, {args.prompt} + {args.target} tokens, {args.threads} threads")

    rows = []
    for method in methods:
        calls = _calls(method, model, hf, tok, wl.prompt, wl.target, args.steps)
        outputs = {lib: call() for lib, call in calls.items()}  # warm-up, and parity
        failures = []
        for lib in ("captum", "inseq"):
            check = runs.parity(
                runs.attrax_aggregates(outputs["attrax"], method), outputs[lib], method
            )
            failures += [f"{method} vs {lib}: {f}" for f in check["failures"]]
        if failures:
            print("PARITY FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
            return 2
        seconds: dict[str, list[float]] = {lib: [] for lib in calls}
        for _ in range(args.repeats):
            for lib, call in calls.items():  # interleaved: drifting machine load hits all alike
                start = time.perf_counter()
                call()
                seconds[lib].append(time.perf_counter() - start)
        median = {lib: statistics.median(s) for lib, s in seconds.items()}
        rows.append((method, median))

    print("\n| method | attrax s | Captum s | Inseq s | vs Captum | vs Inseq |")
    print("|---|---|---|---|---|---|")
    for method, m in rows:
        name = method if method != "integrated_gradients" else f"IG ({args.steps} steps)"
        print(
            f"| {name} | {m['attrax']:.2f} | {m['captum']:.2f} | {m['inseq']:.2f} | "
            f"{m['captum'] / m['attrax']:.1f}x | {m['inseq'] / m['attrax']:.1f}x |"
        )
    return 0


def _calls(method: str, model, hf, tok, prompt: str, target: str, steps: int) -> dict[str, Any]:
    """Per library, a call returning its raw ``[target, source, hidden]`` array (or DataArray)."""
    ig = {"n_steps": steps} if method == "integrated_gradients" else {}
    inseq_model, _ = _baselines.inseq_load(hf, tok, method)
    captum_ig = {"baseline": "inseq"} if method == "integrated_gradients" else {}
    return {
        "attrax": lambda: runs.attrax_attribute(model, prompt, target, method, **ig)["dataarray"],
        "captum": lambda: (
            _baselines.captum_attribute(
                hf, tok, prompt, target, method, **ig, **captum_ig
            ).attributions
        ),
        "inseq": lambda: (
            _baselines.inseq_attribute(
                hf, tok, prompt, target, method, inseq_model=inseq_model, **ig
            ).attributions
        ),
    }


if __name__ == "__main__":
    sys.exit(main())
