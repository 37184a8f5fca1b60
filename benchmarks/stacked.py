"""``ax.stack_models`` vs a loop over the models: time of one method on M checkpoints.

    PYTHONPATH=src python -m benchmarks.stacked [--models 4] [--hidden 64] [--layers 2]

GPT-2-style models from ``attrax.testing.tiny_model`` (seeds 0..M-1, float32, one torch thread),
a batch of 4 inputs with 6-token targets. Each configuration is checked equal (<= 1e-4) to the
loop before it is timed; the best of 3 runs is reported.
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
import torch

import attrax as ax
from attrax.testing import tiny_model

X = ["the cat sat on the", "a dog ran to", "one two three four", "hello there my"]
Y = [" mat and then it", " the park and back", " five six seven eight", " friend how are you"]


def _best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = {"n_embd": args.hidden, "n_layer": args.layers}
    models = []
    for seed in range(args.models):
        hf, tok = tiny_model("gpt2", seed=seed, **size)
        models.append(ax.load_model(hf, tokenizer=tok))
    stack = ax.stack_models(models, names=[f"seed{i}" for i in range(args.models)])
    methods = {
        "saliency": ax.saliency,
        "input_x_gradient": ax.input_x_gradient,
        "integrated_gradients (16 steps)": functools.partial(ax.integrated_gradients, steps=16),
    }
    print(f"{args.models} GPT-2 models (hidden {args.hidden}, {args.layers} layers), batch 4")
    for name, fn in methods.items():
        together = fn(stack, X, Y)
        alone = [fn(m, X, Y) for m in models]
        gap = max(
            float(np.nanmax(np.abs(together.isel(model=i).values - a.values)))
            for i, a in enumerate(alone)
        )
        assert gap <= 1e-4, f"{name}: stacked differs from alone by {gap}"
        stacked_s = _best(lambda fn=fn: fn(stack, X, Y))
        loop_s = _best(lambda fn=fn: [fn(m, X, Y) for m in models])
        print(
            f"{name:>32}: stacked {stacked_s * 1e3:8.1f} ms, loop {loop_s * 1e3:8.1f} ms, "
            f"loop/stacked {loop_s / stacked_s:5.2f}x (max |diff| {gap:.1e})"
        )


if __name__ == "__main__":
    main()
