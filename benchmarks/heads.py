"""attention_x_gradient and head_attribution vs a per-target autograd loop on W1 and W2.

The reference is what one writes by hand without attrax: the Hugging Face model run from ids
with ``output_attentions=True`` under eager attention (whose returned weights are the tensors the
attention output is computed from), one forward and one ``torch.autograd.grad`` per target (head
attribution: per target, layer and quadrature node, the layer's attention output scaled by a
pre-hook on its output projection). Parity is checked first (max |attrax - loop| over the
``(target, source, layer, head)`` rows, relative to the largest value); then both are timed in
the same process: attrax best of ``--repeats``, the loop's first run (attention x gradient: the
better of two). The head attribution loop runs only the first ``--loop-targets`` targets (8) and
its time is scaled by ``targets / k``, as the main harness extrapolates Captum's and Inseq's
per-target loops; parity is checked on those rows.

    PYTHONPATH=$PWD/src:$PWD python -m benchmarks.heads [--repeats 3] [--threads 1] [--steps 8]

Results are written to ``benchmarks/heads.json`` (``--out``) and quoted in
``docs/methods/internals.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

import attrax as ax
from benchmarks import workloads


def _inputs(kind: str, tok, prompt: str, target: str) -> tuple[dict, list[int], list[int]]:
    """Model kwargs, the query row of each target and each target's id."""
    if kind == "gpt2":
        p, t = tok(prompt)["input_ids"], tok(target)["input_ids"]
        return {"input_ids": torch.tensor([p + t])}, [len(p) + j - 1 for j in range(len(t))], t
    src, tgt = tok(prompt)["input_ids"], tok(text_target=target)["input_ids"]
    start = tok.pad_token_id  # Marian's decoder_start_token_id
    kwargs = {
        "input_ids": torch.tensor([src]),
        "decoder_input_ids": torch.tensor([[start, *tgt]]),
    }
    return kwargs, list(range(len(tgt))), tgt


def _out_projection(kind: str, hf, layer: int) -> torch.nn.Module:
    if kind == "gpt2":
        return hf.transformer.h[layer].attn.c_proj
    return hf.model.decoder.layers[layer].encoder_attn.out_proj


def _run(kind: str, hf, kwargs: dict, scale: dict[int, float] | None = None):
    """One forward with graph from the embeddings; the maps the targets read."""
    handles = [
        m.register_forward_hook(lambda mod, a, o: o.detach().requires_grad_())
        for m in hf.modules()
        if isinstance(m, torch.nn.Embedding)
    ]
    for layer, alpha in (scale or {}).items():
        module = _out_projection(kind, hf, layer)
        handles.append(module.register_forward_pre_hook(lambda m, a, s=alpha: (a[0] * s,)))
    try:
        out = hf(**kwargs, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    maps = out.attentions if kind == "gpt2" else out.cross_attentions
    return out.logits[0], maps


def loop_attention_x_gradient(kind: str, hf, kwargs, rows, ids) -> np.ndarray:
    """``[target, key, layer, head]``: one forward and one backward per target."""
    got = []
    for q, t in zip(rows, ids, strict=True):
        logits, maps = _run(kind, hf, kwargs)
        score = torch.softmax(logits[q], -1)[t]
        grads = torch.autograd.grad(score, maps)
        per_layer = [(m[0] * g[0])[:, q].detach() for m, g in zip(maps, grads, strict=True)]
        got.append(torch.stack(per_layer).permute(2, 0, 1).numpy())  # [key, layer, head]
    return np.stack(got)


def loop_head_attribution(
    kind: str, hf, kwargs, rows, ids, steps: int, first: int | None = None
) -> np.ndarray:
    """``[target, key, layer, head]``: per target, layer and node, a forward and a backward."""
    nodes = [(i + 1) / steps for i in range(steps)]  # Hao et al.'s Riemann sum
    rows, ids = rows[:first], ids[:first]
    _, maps = _run(kind, hf, kwargs)
    base = [m[0].detach() for m in maps]
    got = np.zeros((len(ids), base[0].shape[-1], len(base), base[0].shape[0]))
    for k, (q, t) in enumerate(zip(rows, ids, strict=True)):
        for layer in range(len(base)):
            total = torch.zeros_like(base[layer])
            for alpha in nodes:
                logits, scaled = _run(kind, hf, kwargs, {layer: alpha})
                score = torch.softmax(logits[q], -1)[t]
                (g,) = torch.autograd.grad(score, scaled[layer])
                total += g[0] / alpha / steps  # the output scales as alpha A: dF/dA = alpha dF/dA'
            got[k, :, layer] = (base[layer] * total)[:, q].T.numpy()
    return got


def _best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _parity(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    got = np.nan_to_num(got[: want.shape[0], : want.shape[1]])
    diff = float(np.abs(got - want).max())
    return {"max_abs_diff": diff, "relative": diff / float(np.abs(want).max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=8, help="head attribution quadrature nodes")
    p.add_argument(
        "--loop-targets",
        type=int,
        default=8,
        help="head attribution: the loop runs the first k targets, its time scaled by n / k",
    )
    p.add_argument("--quick", action="store_true", help="W1/W2 at their quick sizes")
    p.add_argument("--out", default=None, help="JSON results file (default: none when --quick)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    for name, plan in workloads.plans(quick=args.quick).items():
        if name not in ("W1", "W2"):
            continue
        hf, tok = workloads.load(plan.kind)
        model = ax.load_model(hf, tokenizer=tok, attn_implementation="eager")
        prompt, target = workloads.texts(plan.kind, tok, plan.n_prompt, plan.n_target)
        kwargs, rows, ids = _inputs(plan.kind, tok, prompt, target)
        for method in ("attention_x_gradient", "head_attribution"):
            if method == "attention_x_gradient":
                ours = partial(ax.attention_x_gradient, model, prompt, target)
                loop = partial(loop_attention_x_gradient, plan.kind, hf, kwargs, rows, ids)
            else:
                ours = partial(
                    ax.head_attribution,
                    model,
                    prompt,
                    target,
                    steps=args.steps,
                    quadrature="riemann_right",
                )
                loop = partial(
                    loop_head_attribution,
                    plan.kind,
                    hf,
                    kwargs,
                    rows,
                    ids,
                    args.steps,
                    args.loop_targets,
                )
            start = time.perf_counter()
            reference = loop()  # the loop's first run is also its timed run
            t_loop = time.perf_counter() - start
            parity = _parity(ours().values, reference)
            assert parity["relative"] <= 1e-4, (name, method, parity)
            if method == "attention_x_gradient" and not args.quick:
                t_loop = min(t_loop, _best(loop, 1))
            t_loop *= len(ids) / reference.shape[0]  # head attribution: the first k targets
            t_ours = _best(ours, args.repeats)
            results[f"{name} {method}"] = {
                **parity,
                "attrax_s": round(t_ours, 3),
                "loop_s": round(t_loop, 3),
                "speedup": round(t_loop / t_ours, 1),
                "targets": len(ids),
                "loop_targets_run": int(reference.shape[0]),
                "tokens": plan.n_prompt + plan.n_target,
            }
            print(name, method, json.dumps(results[f"{name} {method}"]), flush=True)
    out = args.out or (None if args.quick else "benchmarks/heads.json")
    if out:
        with open(out, "w") as f:
            json.dump(
                {"threads": args.threads, "steps": args.steps, "results": results}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
