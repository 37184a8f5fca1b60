"""Layer-wise attribution: attrax ``layers="all"`` vs Captum's layer methods, per layer and target.

``python -m benchmarks.layers [--quick] [--threads N] [--out FILE]``, from the repository root, in
the bench venv (``PYTHONPATH=src:.``; the workload models come from ``$ATTRAX_BENCH_MODELS`` or
``benchmarks/results/models``, built by ``python -m benchmarks models``).

On the W1 GPT-2 (4 layers, n_embd 256) with a 16-token prompt and an 8-token target (quick: 8+6;
``--tokens P,T`` for others),
every residual-stream layer 0..4 (0: the embedding output ``transformer.drop``; l: block ``l``'s
output, ``transformer.h[l-1]``) and every target:

* attrax: ``ax.input_x_gradient(..., layers="all")``, and ``ax.integrated_gradients``,
  ``ax.conductance`` and ``ax.internal_influence`` with ``layers="all", steps=50`` (zero
  baseline, Gauss-Legendre), one call each;
* Captum 0.9: ``LayerGradientXActivation``, ``LayerIntegratedGradients``, ``LayerConductance``
  and ``InternalInfluence`` (the same nodes, zero input baseline), one ``attribute`` call per layer
  and per target on the target's prefix, as a user runs them (Captum's BERT tutorial loops over
  the layers with ``LayerConductance``); the forward returns the target's probability;
* Inseq 0.7 (with ``--inseq``): ``layer_gradient_x_activation`` with ``target_layer=`` per layer,
  one ``attribute`` call per layer (Inseq loops over targets). Its ``layer_integrated_gradients``
  returns all-zero attributions on this model (transformers 5.24), so it is not compared; it
  has neither conductance nor internal influence.

``--sites residual,attention,mlp,neurons,heads`` also reads each block's attention output
(``h[l].attn.c_proj``'s output), MLP output (``h[l].mlp``'s), MLP neurons (``h[l].mlp.c_proj``'s
input: Captum's ``attribute_to_layer_input=True``) or heads' outputs (``h[l].attn.c_proj``'s input,
attrax's ``head`` and ``hidden`` flattened to compare) over blocks 0..3, attrax's ``site=``.
``--methods`` and ``--sites`` run some and keep the other rows of ``--out``.

Parity first, on the timed outputs: max |a - b| / max |b| over every (target, source, layer,
hidden) must be <= 1e-4 (else exit status 2); then the median time of ``--repeats`` attrax calls against the
baselines' time (``--baseline-repeats``, default 1: they are slow), and the ratio. Results go to
``--out`` (default ``benchmarks/layers.json``, committed); ``--docs`` renders them into the
"Layers" section of ``docs/methods/gradients.md``, ``--report`` only re-renders from ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from . import report, workloads

TOLERANCE = 1e-4
STEPS = 50
DOCS = Path(__file__).resolve().parent.parent / "docs" / "methods" / "gradients.md"
BEGIN, END = "<!-- layers-benchmark -->", "<!-- /layers-benchmark -->"
NAMES = {
    ("input_x_gradient", "captum"): "`LayerGradientXActivation`",
    ("input_x_gradient", "inseq"): "`layer_gradient_x_activation`",
    ("integrated_gradients", "captum"): "`LayerIntegratedGradients` (50 steps)",
    ("conductance", "captum"): "`LayerConductance` (50 steps)",
    ("internal_influence", "captum"): "`InternalInfluence` (50 steps)",
}
METHODS = ("input_x_gradient", "integrated_gradients", "conductance", "internal_influence")
PATHS = METHODS[1:]  # the methods that take `steps`
SITES = ("residual", "attention", "mlp", "neurons", "heads")
CAPTUM_MODULES = {
    "attention": "`h[l].attn.c_proj`",
    "mlp": "`h[l].mlp`",
    "neurons": "`h[l].mlp.c_proj` (its input)",
    "heads": "`h[l].attn.c_proj` (its input)",
}


def _prefix_forward(model):
    def forward(x: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        logits = model(inputs_embeds=x).logits[:, -1]
        return torch.softmax(logits, dim=-1).gather(1, tgt)[:, 0]

    return forward


def layer_modules(model, site: str = "residual") -> list[torch.nn.Module]:
    """Residual-stream layer l as a module whose output it is (attrax's indexing), or block l's
    module whose output (input, for the neurons) is ``site``'s activation."""
    blocks = list(model.transformer.h)
    if site in ("attention", "heads"):  # the heads' outputs: its input
        return [b.attn.c_proj for b in blocks]
    if site == "mlp":
        return [b.mlp for b in blocks]
    if site == "neurons":
        return [b.mlp.c_proj for b in blocks]
    return [model.transformer.drop, *blocks]


def captum(
    model, tok, prompt: str, target: str, method: str, site: str = "residual"
) -> tuple[np.ndarray, float]:
    """``[K, L, layers, W]`` from one Captum ``attribute`` call per layer and per target."""
    from captum.attr import (
        InternalInfluence,
        LayerConductance,
        LayerGradientXActivation,
        LayerIntegratedGradients,
    )

    ids = torch.tensor(tok(prompt + target)["input_ids"])
    first = len(tok(prompt)["input_ids"])
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids[None])
    modules = layer_modules(model, site)
    width = model.config.n_inner or 4 * model.config.n_embd
    width = width if site == "neurons" else embeds.shape[-1]
    out = np.full((len(ids) - first, len(ids), len(modules), width), np.nan, np.float32)
    forward = _prefix_forward(model)
    start = time.perf_counter()
    for j, module in enumerate(modules):  # the baseline's own loop: one call per layer
        if method == "integrated_gradients":
            algo = LayerIntegratedGradients(forward, module, multiply_by_inputs=True)
        elif method == "conductance":
            algo = LayerConductance(forward, module)
        elif method == "internal_influence":
            algo = InternalInfluence(forward, module)
        else:
            algo = LayerGradientXActivation(forward, module)
        for k, t in enumerate(range(first, len(ids))):  # and per target
            x = embeds[:, :t]
            kw = {"additional_forward_args": (ids[t].reshape(1, 1),)}
            if site in ("neurons", "heads"):  # the output projection's input
                kw["attribute_to_layer_input"] = True
            if method in PATHS:
                kw |= {"baselines": torch.zeros_like(x), "n_steps": STEPS}
                kw["method"] = "gausslegendre"
            a = algo.attribute(x, **kw)
            out[k, :t, j] = a[0].detach().numpy()
    return out, time.perf_counter() - start


def inseq(
    model, tok, prompt: str, target: str, method: str, site: str = "residual"
) -> tuple[np.ndarray, float]:
    """``[K, L, layers, H]`` from one Inseq ``attribute`` call per layer."""
    import copy

    import inseq as inseq_lib

    name = {"integrated_gradients": "layer_integrated_gradients"}.get(
        method, "layer_gradient_x_activation"
    )
    layers = []
    seconds = 0.0
    for module in layer_modules(model, site):  # the baseline's own loop: one model per layer
        im = inseq_lib.load_model(model, name, tokenizer=copy.deepcopy(tok), target_layer=module)
        kw: dict = {"show_progress": False}
        if method == "integrated_gradients":
            kw["attribution_args"] = {"n_steps": STEPS, "method": "gausslegendre"}
        start = time.perf_counter()
        res = im.attribute(prompt, prompt + target, **kw)
        seconds += time.perf_counter() - start
        seq = res.sequence_attributions[0]
        a = seq.target_attributions.detach().float().transpose(0, 1).numpy()  # [K, L, H]
        layers.append(a)
    return np.stack(layers, axis=2), seconds


def attrax_run(
    model, prompt: str, target: str, method: str, site: str = "residual"
) -> tuple[np.ndarray, float]:
    import attrax as ax

    kw = {"steps": STEPS} if method in PATHS else {}
    start = time.perf_counter()
    da = getattr(ax, method)(model, prompt, target, layers="all", site=site, **kw)
    seconds = time.perf_counter() - start
    values = da.transpose("target", "source", "layer", ...).values
    return values.reshape(*values.shape[:3], -1), seconds  # the heads side by side


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    both = ~np.isnan(a) & ~np.isnan(b)
    return float(np.abs(a[both] - b[both]).max() / np.abs(b[both]).max())


def render(result: dict) -> str:
    """The docs table of a recorded run."""
    rows = result["rows"]
    p, t = rows[0]["tokens"]
    loads = sorted({round(r.get("load_average", result["load_average"]), 1) for r in rows})
    load = f"{loads[0]:.1f}" if len(loads) == 1 else f"{loads[0]:.1f}-{loads[-1]:.1f}"
    # a row's `layers` counts what it read: the residual stream's 0..L, or the blocks 0..L-1
    first = rows[0]
    blocks = first["layers"] - (first.get("site", "residual") == "residual")
    lines = [
        f"GPT-2 W1 model, {p}-token prompt + {t}-token target, residual-stream layers "
        f"0..{blocks} (the other sites: blocks 0..{blocks - 1}), "
        f"{result['threads']} threads (1-minute load average {load} on the shared 2-core "
        "machine; each ratio is within one run of its method):",
        "",
        "| attrax method (one call) | baseline (a call per layer, per target) | parity | attrax s "
        "| baseline s | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lib = r["library"]
        site = r.get("site", "residual")
        name = f"{lib.capitalize()} {NAMES.get((r['method'], lib), r['method'])}"
        if site != "residual":
            name += f" on {CAPTUM_MODULES[site]}"
        if lib == "inseq":
            name += " (Inseq loops over targets)"
        option = "" if site == "residual" else f', site="{site}"'
        lines.append(
            f'| `{r["method"]}(..., layers="all"{option})` | {name} | {r["parity"]:.1e} | '
            f"{r['attrax_s']:.2f} | {r[f'{lib}_s']:.1f} | {r['ratio']:.1f}x |"
        )
    return "\n".join(lines)


def write_docs(result: dict, page: Path = DOCS) -> None:
    """Put :func:`render`'s table between the markers of ``page``."""
    report.write_between(page, BEGIN, END, render(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8+6 tokens, one repeat")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-repeats", type=int, default=1)
    parser.add_argument("--tokens", default="16,8", help="prompt,target tokens (default 16,8)")
    parser.add_argument("--inseq", action="store_true", help="also time Inseq's layer methods")
    parser.add_argument("--out", default="benchmarks/layers.json")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated, of {', '.join(METHODS)} (default all); the other rows of --out stay",
    )
    parser.add_argument(
        "--sites",
        default="residual",
        help=f"comma-separated, of {', '.join(SITES)} (default residual); other rows of --out stay",
    )
    parser.add_argument("--docs", action="store_true", help="render the table into the docs")
    parser.add_argument(
        "--report", action="store_true", help="only render the docs from --out; runs nothing"
    )
    args = parser.parse_args(argv)
    if args.report:
        write_docs(json.loads(Path(args.out).read_text()))
        return 0
    torch.set_num_threads(args.threads)
    import attrax as ax

    root = os.environ.get("ATTRAX_BENCH_MODELS")
    hf, tok = workloads.load("gpt2", root)
    model = ax.load_model(hf, tokenizer=tok)
    n_prompt, n_target = (8, 6) if args.quick else map(int, args.tokens.split(","))
    prompt, target = workloads.texts("gpt2", tok, n_prompt, n_target)
    repeats = 1 if args.quick else args.repeats
    libraries = {"captum": captum} | ({"inseq": inseq} if args.inseq else {})
    slow = 1 if args.quick else args.baseline_repeats
    rows = []
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    sites = args.sites.split(",")
    unknown = sorted(set(sites) - set(SITES))
    if unknown:
        parser.error(f"--sites: unknown {', '.join(unknown)}; choose from {', '.join(SITES)}")
    for site, method in ((s, m) for s in sites for m in methods):
        attrax_run(model, prompt, target, method, site)  # warm-up
        mine, own = zip(
            *(attrax_run(model, prompt, target, method, site) for _ in range(repeats)),
            strict=True,
        )
        ours = mine[-1]
        for library, run in libraries.items():
            if library == "inseq" and (method in PATHS or site != "residual"):
                continue  # all zeros in Inseq 0.7, or no such method (module docstring)
            theirs, times = zip(
                *(run(hf, tok, prompt, target, method, site) for _ in range(slow)), strict=True
            )
            error = rel_err(ours, theirs[-1])
            if np.isnan(ours).sum() != np.isnan(theirs[-1]).sum():
                error = float("inf")  # a different NaN (future) pattern is a parity failure
            row = {
                "method": method,
                "site": site,
                "library": library,
                "tokens": [n_prompt, n_target],
                "layers": ours.shape[2],
                "parity": error,
                "attrax_s": statistics.median(own),
                f"{library}_s": statistics.median(times),
                "ratio": statistics.median(times) / statistics.median(own),
                "load_average": os.getloadavg()[0],
            }
            rows.append(row)
            print(json.dumps(row))
    failed = [r for r in rows if not r["parity"] <= TOLERANCE]
    out = Path(args.out)
    if out.exists():  # keep the rows of the methods and sites not run
        old = json.loads(out.read_text())
        kept = [
            {**r, "load_average": r.get("load_average", old["load_average"])}
            for r in old["rows"]
            if r["method"] not in methods or r.get("site", "residual") not in sites
        ]
        rows = sorted(
            kept + rows,
            key=lambda r: (SITES.index(r.get("site", "residual")), METHODS.index(r["method"])),
        )
    result = {
        "threads": args.threads,
        "repeats": repeats,
        "baseline_repeats": slow,
        "load_average": max(r.get("load_average", 0.0) for r in rows),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if failed:
        print("PARITY FAILED", json.dumps(failed))
        return 2
    if args.docs:
        write_docs(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
