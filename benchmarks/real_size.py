"""attrax vs Captum and Inseq on a GPT-2-small-shaped model (12 layers, d=768, vocabulary 50257).

The workloads keep the body small, so the vocabulary projection that the per-token loops repeat
at every prefix position is most of their work. At real size the body dominates, and the best
ratio any one-backward-per-target method can reach shrinks (docs/methods/gradients.md, cost
model). One process, random weights, the benchmark GPT-2 tokenizer, offline. Per method, each
library runs once (warm-up and parity: 1e-4 relative, or exit status 2 before any timing), then
``repeats`` timed calls, libraries interleaved; the median is printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from typing import Any

from . import baselines, workloads
from .adapters import attrax_aggregates, attrax_attribute
from .parity import parity


def build(seed: int = 0):
    """``(hf_model, tokenizer)``: GPT-2-small-shaped, random weights, eager attention."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(workloads.build_all()["gpt2"])
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    config = GPT2Config(
        vocab_size=50257, n_embd=768, n_layer=12, n_head=12, bos_token_id=eot, eos_token_id=eot,
        attn_implementation="eager",  # the baselines' attention, as in the harness
    )  # fmt: skip
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval(), tok


def run(args: argparse.Namespace) -> int:
    import torch

    import attrax as ax

    torch.set_num_threads(args.threads)
    # Captum warns that it sets requires_grad on the embeddings, at every target of every call
    warnings.filterwarnings("ignore", "Input Tensor .* did not already require gradients")
    hf, tok = build()
    model = ax.load_model(hf, tokenizer=tok)
    prompt, target = workloads.texts("gpt2", tok, args.prompt, args.target)
    print(f"GPT-2-small shape, {args.prompt} + {args.target} tokens, {args.threads} threads")
    rows = []
    for method in args.methods.split(","):
        ig = {"n_steps": args.steps} if method == "integrated_gradients" else {}
        inseq_model, _ = baselines.inseq_load(hf, tok, method)
        calls: dict[str, Any] = {
            "attrax": lambda m=method: attrax_attribute(model, prompt, target, m, steps=args.steps)[
                0
            ],
            "captum": lambda m=method, ig=ig: (
                baselines.captum_attribute(
                    hf, tok, prompt, target, m, baseline="inseq", **ig
                ).attributions
            ),
            "inseq": lambda m=method, ig=ig, im=inseq_model: (
                baselines.inseq_attribute(
                    hf, tok, prompt, target, m, inseq_model=im, **ig
                ).attributions
            ),
        }
        outputs = {lib: call() for lib, call in calls.items()}  # warm-up, and parity
        failures = [
            f"{method} vs {lib}: {f}"
            for lib in ("captum", "inseq")
            for f in parity(attrax_aggregates(outputs["attrax"], method), outputs[lib], method)[
                "failures"
            ]
        ]
        if failures:
            print("PARITY FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
            return 2
        seconds: dict[str, list[float]] = {lib: [] for lib in calls}
        for _ in range(args.repeats):
            for lib, call in calls.items():  # interleaved: drifting load hits every library alike
                start = time.perf_counter()
                call()
                seconds[lib].append(time.perf_counter() - start)
        rows.append((method, {lib: statistics.median(s) for lib, s in seconds.items()}))
    print("\n| method | attrax s | Captum s | Inseq s | vs Captum | vs Inseq |")
    print("|---|---|---|---|---|---|")
    for method, m in rows:
        name = method if method != "integrated_gradients" else f"IG ({args.steps} steps)"
        print(
            f"| {name} | {m['attrax']:.2f} | {m['captum']:.2f} | {m['inseq']:.2f} | "
            f"{m['captum'] / m['attrax']:.1f}x | {m['inseq'] / m['attrax']:.1f}x |"
        )
    return 0


def parser(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m benchmarks real-size``."""
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--target", type=int, default=32, help="target tokens (default 32)")
    p.add_argument("--methods", default="saliency,integrated_gradients")
    p.add_argument("--steps", type=int, default=20, help="IG points on every side")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per library")
    p.add_argument("--threads", type=int, default=2)
