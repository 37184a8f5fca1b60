"""Where stacked integrated gradients loses to a loop on one CPU thread: CPU time vs page faults.

    PYTHONPATH=src python -m benchmarks.stacked_rusage

The models and inputs of ``benchmarks.stacked`` (4 tiny GPT-2s, batch 4, 16 steps). Each
configuration (stack or loop, ``chunk_size`` auto or 4) runs in a process of its own, so that one
configuration's heap does not change the other's page faults: one warm-up call, then 4 calls,
each with its wall time, user and system CPU time and minor page faults (``getrusage``).
"""

from __future__ import annotations

import functools
import resource
import subprocess
import sys
import time

CONFIGURATIONS = [("stacked", "auto"), ("loop", "auto"), ("stacked", "4"), ("loop", "4")]


def _one(which: str, chunk: str) -> None:
    import torch

    import attrax as ax
    from attrax.testing import tiny_model

    from .stacked import X, Y

    torch.set_num_threads(1)
    models = []
    for seed in range(4):
        hf, tok = tiny_model("gpt2", seed=seed, n_embd=64, n_layer=2)
        models.append(ax.load_model(hf, tokenizer=tok))
    stack = ax.stack_models(models)
    fn = functools.partial(
        ax.integrated_gradients, steps=16, chunk_size=chunk if chunk == "auto" else int(chunk)
    )

    def call() -> object:
        return fn(stack, X, Y) if which == "stacked" else [fn(m, X, Y) for m in models]

    call()
    runs = []
    for _ in range(4):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        call()
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        runs.append(
            f"wall {wall * 1e3:5.0f} user {(after.ru_utime - before.ru_utime) * 1e3:5.0f} "
            f"sys {(after.ru_stime - before.ru_stime) * 1e3:4.0f} "
            f"faults {after.ru_minflt - before.ru_minflt:6d}"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"{which:>7} chunk_size={chunk:<4} (ms; peak RSS {peak} MB)\n    " + "\n    ".join(runs))


def main() -> None:
    if len(sys.argv) == 3:
        _one(sys.argv[1], sys.argv[2])
        return
    for which, chunk in CONFIGURATIONS:
        command = [sys.executable, "-m", "benchmarks.stacked_rusage", which, chunk]
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
