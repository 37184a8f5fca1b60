"""C1 timing on a busy machine: attrax and Captum interleaved in one process.

``PYTHONPATH=src:. python -m benchmarks.interleaved [method ...]`` (bench venv; ``T`` threads,
default 2; ``R`` pairs, default 9; ``STEPS`` IG points, default 16). Each pair runs both libraries
back to back (the order alternating), so load drifts hit both; prints the median time of each and
the median of the per-pair ratios Captum/attrax (> 1: attrax faster). Captum's clock starts at
the texts, as attrax's does (its tokenizer call and embedding lookup timed); the ratio with
Captum's clock started at the embedded batch is printed beside it. The harness
(``python -m benchmarks classifiers``) times each library in its own process, minutes apart,
which a shared machine's load swings can dominate.
"""

from __future__ import annotations

import os
import statistics
import sys

METHODS = ("saliency", "input_x_gradient", "integrated_gradients")


def main(methods: list[str]) -> None:
    import torch

    import attrax as ax

    from . import workloads
    from .adapters import attrax_classify
    from .baselines import captum_classify

    torch.set_num_threads(int(os.environ.get("T", "2")))
    steps, pairs = int(os.environ.get("STEPS", "16")), int(os.environ.get("R", "9"))
    hf, tok = workloads.load_classifier("bert2")
    model = ax.load_model(hf, tokenizer=tok)
    texts = workloads.classifier_texts(tok)
    with torch.no_grad():
        logits = hf(**tok(texts, return_tensors="pt", padding=True)).logits
    classes = [[int(c)] for c in logits.argmax(-1)]
    print(f"attrax {ax.__file__}, {torch.get_num_threads()} threads, load {os.getloadavg()}")
    for method in methods:
        ig = method == "integrated_gradients"

        def ours(method: str = method) -> float:
            return attrax_classify(model, texts, classes, method, steps=steps, batch_size=8)[1]

        def theirs(method: str = method, ig: bool = ig, from_texts: bool = True) -> float:
            return captum_classify(
                hf, tok, texts, classes, method, n_steps=steps,
                internal_batch_size=128 if ig else None, from_texts=from_texts,
            ).seconds  # fmt: skip

        def embedded(method: str = method, ig: bool = ig) -> float:
            return theirs(method, ig, from_texts=False)

        calls = (ours, theirs, embedded)
        for call in calls:  # warm-up
            call()
        times: list[tuple[float, ...]] = []
        for i in range(pairs):
            order = calls if i % 2 else calls[::-1]
            timed = {call: call() for call in order}
            times.append(tuple(timed[call] for call in calls))
        ta, tc, te = (statistics.median(t[j] for t in times) for j in range(3))
        ratio = statistics.median(c / a for a, c, _ in times)
        ratio_embedded = statistics.median(e / a for a, _, e in times)
        print(
            f"{method:22s} attrax {ta:.4f} s  captum {tc:.4f} s  captum/attrax {ratio:.2f}"
            f"  (captum from embeddings {te:.4f} s: {ratio_embedded:.2f})"
        )


if __name__ == "__main__":
    main(sys.argv[1:] or list(METHODS))
