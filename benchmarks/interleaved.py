"""C1 timing on a busy machine: attrax and Captum interleaved in one process.

``PYTHONPATH=src:. python -m benchmarks.interleaved [method ...]`` (bench venv; ``T`` threads,
default 2; ``R`` pairs, default 9; ``STEPS`` IG points, default 16). Each pair runs both libraries
back to back (the order alternating), so load drifts hit both; prints the median time of each and
the median of the per-pair ratios Captum/attrax (> 1: attrax faster). Captum's clock starts at
the texts, as attrax's does (its tokenizer call and embedding lookup timed); the ratio with
Captum's clock started at the embedded batch is printed beside it. Captum runs on its own copy
of the model, loaded as its tutorials load it (parameters requiring grad), as in the harness's
Captum process; attrax's ``Model`` freezes the parameters of the model it wraps, which spares
autograd the tensors a weight gradient would need. The ratio with Captum on the frozen model is
printed too. The harness
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
    model = ax.load_model(hf, tokenizer=tok)  # freezes hf's parameters
    own, _ = workloads.load_classifier("bert2")  # Captum's, as its users load it
    texts = workloads.classifier_texts(tok)
    with torch.no_grad():
        logits = hf(**tok(texts, return_tensors="pt", padding=True)).logits
    classes = [[int(c)] for c in logits.argmax(-1)]
    print(f"attrax {ax.__file__}, {torch.get_num_threads()} threads, load {os.getloadavg()}")
    for method in methods:
        ig = method == "integrated_gradients"

        def ours(method: str = method) -> float:
            return attrax_classify(model, texts, classes, method, steps=steps, batch_size=8)[1]

        def theirs(method: str = method, ig: bool = ig, from_texts: bool = True, net=own) -> float:
            return captum_classify(
                net, tok, texts, classes, method, n_steps=steps,
                internal_batch_size=128 if ig else None, from_texts=from_texts,
            ).seconds  # fmt: skip

        def embedded(method: str = method, ig: bool = ig) -> float:
            return theirs(method, ig, from_texts=False)

        def frozen(method: str = method, ig: bool = ig) -> float:
            return theirs(method, ig, net=hf)

        calls = (ours, theirs, embedded, frozen)
        for call in calls:  # warm-up
            call()
        times: list[tuple[float, ...]] = []
        for i in range(pairs):
            order = calls if i % 2 else calls[::-1]
            timed = {call: call() for call in order}
            times.append(tuple(timed[call] for call in calls))
        ta, tc, te, tf = (statistics.median(t[j] for t in times) for j in range(4))
        ratios = [statistics.median(t[j] / t[0] for t in times) for j in range(1, 4)]
        print(
            f"{method:22s} attrax {ta:.4f} s  captum {tc:.4f} s  captum/attrax {ratios[0]:.2f}"
            f"  (from embeddings {te:.4f} s: {ratios[1]:.2f};"
            f" on attrax's frozen model {tf:.4f} s: {ratios[2]:.2f})"
        )


if __name__ == "__main__":
    main(sys.argv[1:] or list(METHODS))
