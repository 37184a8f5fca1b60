"""``python -m benchmarks long-attention``: ``ax.attention`` and ``ax.rollout`` on long inputs.

A GPT-2-shaped model (random weights, ``--layers`` layers of ``--heads`` heads, d=``--hidden``)
reads a ``--tokens``-token input and attributes its last ``--targets`` tokens. Each method runs in
a fresh process, after a warm-up call on a short input and ``malloc_trim``; the peak is the
process's peak RSS above its RSS before the call (``VmHWM`` after ``/proc/self/clear_refs``), or on
a GPU ``max_memory_allocated`` above the allocation before it. It is set against what every
layer's ``[heads, L, L]`` maps held at once would take (what ``output_attentions=True`` returns):
attrax streams them, keeping the attributed rows (attention) or one running ``[L, L]`` product
(rollout). Results: ``--out`` (default ``benchmarks/long-attention-<device>.json``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .harness import peak_meter

HERE = Path(__file__).resolve().parent


def worker(spec: str) -> None:
    """One measurement: prints a JSON line with the tokens, the peak and the seconds."""
    import torch

    import attrax as ax
    from attrax.testing import corpus, tiny_model

    s = json.loads(spec)
    torch.set_num_threads(s["threads"])
    hf, tok = tiny_model(
        "gpt2",
        n_embd=s["hidden"],
        n_layer=s["layers"],
        n_head=s["heads"],
        n_positions=s["tokens"] + 8,
    )
    model = ax.load_model(hf.to(s["device"]), tokenizer=tok)
    words = " ".join(corpus()).split()
    ids: list[int] = []
    text = ""
    while len(ids) < s["tokens"]:  # whole words until the input reaches its length
        words = words + words
        text = " ".join(words)
        ids = tok(text)["input_ids"]
    ids = ids[: s["tokens"]]
    k = s["targets"]
    prompt, target = tok.decode(ids[:-k]), tok.decode(ids[-k:])
    fn = getattr(ax, s["method"])
    fn(model, "a b c", " d e")  # warm-up: code pages, lazy imports
    start, stop = peak_meter(s["device"])
    base = start()
    began = time.perf_counter()
    out = fn(model, prompt, target)
    peak = stop(base)  # synchronizes a GPU first
    seconds = time.perf_counter() - began
    print(
        json.dumps(
            {
                "input_tokens": len(tok(prompt + target)["input_ids"]),
                "peak_bytes": peak,
                "seconds": seconds,
                "shape": dict(out.sizes),
            }
        )
    )


def run(args: argparse.Namespace) -> int:
    rows = []
    for method in args.methods.split(","):
        spec = {
            "method": method,
            "tokens": args.tokens,
            "layers": args.layers,
            "heads": args.heads,
            "hidden": args.hidden,
            "targets": args.targets,
            "threads": args.threads,
            "device": args.device,
        }
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks", "long-attention-worker", json.dumps(spec)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            print(f"{method}: the measured process failed\n{done.stderr[-2000:]}")
            return 1
        got = json.loads(done.stdout.strip().splitlines()[-1])
        n = got["input_tokens"]
        every_map = n * n * args.layers * args.heads * 4  # float32 [heads, L, L] per layer
        rows.append({**spec, **got, "every_map_bytes": every_map})
        print(
            f"{method}: {n} tokens, {args.layers} layers x {args.heads} heads: peak "
            f"{got['peak_bytes'] / 2**20:,.0f} MiB in {got['seconds']:.1f} s; every layer's maps "
            f"at once {every_map / 2**20:,.0f} MiB"
        )
    out = Path(args.out or HERE / f"long-attention-{args.device.split(':')[0]}.json")
    tmp = out.with_suffix(".tmp")
    meta: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("func", "out")}
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    tmp.replace(out)  # complete or not written
    return 0


def parser(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m benchmarks long-attention``."""
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--targets", type=int, default=4, help="attributed tokens at the end")
    p.add_argument("--methods", default="attention,rollout")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--out", default="", help="results JSON (default benchmarks/long-attention-<device>.json)"
    )
