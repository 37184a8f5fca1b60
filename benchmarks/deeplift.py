"""``python -m benchmarks.deeplift``: DeepLIFT and DeepLiftSHAP parity and time ratios.

attrax's ``deeplift`` / ``deeplift_shap`` against Captum 0.9's ``DeepLift`` / ``DeepLiftShap`` on
the input embeddings, one ``attribute`` call per target (token or class) as a user runs it, and
against Inseq 0.7's ``deeplift`` (Captum's ``DeepLift`` inside Inseq's per-step loop, with Inseq's
unk/EOS baseline). Workloads: W1's GPT-2 (quick 16 + 8 tokens, full 32 + 32) and the C2 BERT
classifier (20 classes, 16-token texts), each with its own GELU MLPs and with ``relu`` MLPs (the
same weights). Captum hooks ``nn.ReLU``/``nn.Tanh``/``nn.Sigmoid`` modules, not GELU: attrax's
``activations="captum"`` computes the same quantity; on the ReLU models its default ``"all"``
does too, and on the GELU ones the table reports how far ``"all"`` (the Rescale rule at every
activation) is from Captum. Each pair is compared (<= 1e-4 after the same aggregations) before
its time is taken, in the same process. Results go to ``benchmarks/results/deeplift[-quick].json``.

``--layers``: ``layers="all"`` (residual-stream layers 0..4 of W1, as ``benchmarks.layers``
indexes them) against Captum's ``LayerDeepLift`` / ``LayerDeepLiftShap`` (the layer's output),
one ``attribute`` call per layer and per target on the target's prefix, on the ReLU W1 (where
Captum's hooks and attrax's rules cover the same activations). Parity (<= 1e-4, max |a - b| /
max |b| over every target, source, layer and hidden unit, and the convergence delta against
``completeness_gap``) before the time ratio. Results: ``benchmarks/results/deeplift-layers.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import report, workloads
from .adapters import attrax_aggregates, inseq_baseline
from .parity import parity

RESULTS = Path(__file__).resolve().parent / "results"
N_BASELINES = 3  # DeepLiftSHAP: zeros and two seeded Gaussian references


def _references(length: int, hidden: int, n: int) -> torch.Tensor:
    """``[n, length, hidden]``: zeros, then seeded Gaussians (std 0.02, an embedding's scale)."""
    g = torch.Generator().manual_seed(workloads.SEED)
    noise = 0.02 * torch.randn(n - 1, length, hidden, generator=g)
    return torch.cat([torch.zeros(1, length, hidden), noise])


def _algorithm(module: torch.nn.Module, shap: bool):
    from captum.attr import DeepLift, DeepLiftShap

    return DeepLiftShap(module) if shap else DeepLift(module)


def captum_lm(hf, tok, prompt: str, target: str, refs: torch.Tensor) -> tuple[np.ndarray, float]:
    """Captum on a decoder-only LM: ``[target, sequence, hidden]`` (future NaN), seconds.

    Target t is explained from its prefix; ``refs[:, :t]`` are the references (one: DeepLift,
    several: DeepLiftShap). The forward returns the target token's probability.
    """
    from .baselines import _Forward, _tokenize_decoder_only

    ids, first = _tokenize_decoder_only(tok, prompt, target)
    emb = hf.get_input_embeddings()
    with torch.no_grad():
        embeds = emb(ids[None]).detach()

    def forward(x: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        probs = hf(inputs_embeds=x).logits[:, -1].softmax(-1)
        return probs.gather(-1, tgt).squeeze(-1)

    shap = refs.shape[0] > 1
    algo = _algorithm(_Forward(hf, forward), shap)
    out = np.full((len(ids) - first, len(ids), embeds.shape[-1]), np.nan, dtype=np.float32)
    t0 = time.perf_counter()
    for j, t in enumerate(range(first, len(ids))):  # Captum's way: one call per target
        x = embeds[:, :t].clone().requires_grad_(True)
        base = refs[:, :t] if shap else refs[:1, :t]
        a = algo.attribute(x, baselines=base, additional_forward_args=(ids[t].reshape(1, 1),))
        out[j, :t] = a[0].detach().numpy()
    return out, time.perf_counter() - t0


def captum_classifier(hf, tok, text: str, refs: torch.Tensor) -> tuple[np.ndarray, float]:
    """Captum on a sequence classifier: ``[class, token, hidden]``, one call per class."""
    from .baselines import _Forward

    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(enc["input_ids"]).detach()

    def forward(x: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        return hf(inputs_embeds=x, token_type_ids=types).logits.softmax(-1)

    shap = refs.shape[0] > 1
    algo = _algorithm(_Forward(hf, forward), shap)
    classes = hf.config.num_labels
    out = np.zeros((classes, *embeds.shape[1:]), dtype=np.float32)
    t0 = time.perf_counter()
    for c in range(classes):
        x = embeds.clone().requires_grad_(True)
        base = refs if shap else refs[:1]
        a = algo.attribute(
            x, baselines=base, target=c, additional_forward_args=(enc["token_type_ids"],)
        )
        out[c] = a[0].detach().numpy()
    return out, time.perf_counter() - t0


def inseq_lm(hf, tok, prompt: str, target: str, handle) -> tuple[np.ndarray, float]:
    """Inseq 0.7's ``deeplift`` (its own baseline) in attrax's layout."""
    from . import baselines

    # Inseq's deeplift is not among the methods the main harness compares: allowed here only
    baselines.INSEQ_METHODS = (*baselines.INSEQ_METHODS, "deeplift")
    result = baselines.inseq_attribute(
        hf, tok, prompt, target, "deeplift", step_scores=(), inseq_model=handle
    )
    return result.attributions, result.seconds


def _timed(fn, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _best(repeats: int, fn, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    out, best = None, float("inf")
    for _ in range(repeats):
        out, seconds = fn(*args, **kwargs)
        best = min(best, seconds)
    return out, best


def _record(name, method, vs, activations, da, base, ax_s, base_s, gate=True) -> dict[str, Any]:
    res = parity(attrax_aggregates(da, "deeplift"), base, "deeplift")
    errors = ", ".join(f"{k} {v:.1e}" for k, v in res["errors"].items())
    verdict = ("ok" if res["ok"] else "FAIL") if gate else "(not a parity pair)"
    print(
        f"{name:9s} {method:14s} {activations:7s} vs {vs:7s}: {verdict} ({errors}); "
        f"attrax {ax_s:.3f}s, {vs} {base_s:.3f}s, x{base_s / ax_s:.1f}",
        flush=True,
    )
    return dict(
        workload=name, method=method, baseline=vs, activations=activations, gate=gate,
        attrax_s=ax_s, baseline_s=base_s, speedup=base_s / ax_s, **res,
    )  # fmt: skip


def measure(quick: bool, repeats: int) -> list[dict[str, Any]]:
    import attrax as ax

    from .baselines import inseq_load

    records: list[dict[str, Any]] = []
    n_prompt, n_target = (16, 8) if quick else (32, 32)
    for act in ("relu", "gelu"):
        name = "W1" if act == "gelu" else "W1-relu"
        extra = {} if act == "gelu" else {"activation_function": "relu"}
        hf, tok = workloads.load("gpt2", **extra)
        model = ax.load_model(hf, tokenizer=tok)
        prompt, target = workloads.texts("gpt2", tok, n_prompt, n_target)
        length = n_prompt + n_target
        refs = _references(length, hf.config.n_embd, N_BASELINES)
        ax.deeplift(model, *workloads.texts("gpt2", tok, 4, 2))  # warm-up
        for method in ("deeplift", "deeplift_shap"):
            shap = method == "deeplift_shap"
            base, base_s = _best(repeats, captum_lm, hf, tok, prompt, target,
                                 refs if shap else refs[:1])  # fmt: skip
            fn = getattr(ax, method)
            opts = {"baselines": list(refs[:, None])} if shap else {"baseline": refs[:1]}
            for activations in ("captum", "all"):
                da, ax_s = _best(repeats, _timed, fn, model, prompt, target,
                                 activations=activations, **opts)  # fmt: skip
                gate = act == "relu" or activations == "captum"
                records.append(_record(name, method, "captum", activations, da, base, ax_s,
                                       base_s, gate))  # fmt: skip
        handle, _ = inseq_load(hf, tok, "deeplift")
        base, base_s = _best(repeats, inseq_lm, hf, tok, prompt, target, handle)
        opts = {"baseline": inseq_baseline(model, prompt, target)}
        da, ax_s = _best(repeats, _timed, ax.deeplift, model, prompt, target,
                         activations="captum", **opts)  # fmt: skip
        records.append(_record(name, "deeplift", "inseq", "captum", da, base, ax_s, base_s))
    text_tok = workloads.load_classifier("bert20")[1]
    text = workloads.classifier_texts(text_tok, 1)[0]
    for act in ("relu", "gelu"):
        name = "C2" if act == "gelu" else "C2-relu"
        extra = {} if act == "gelu" else {"hidden_act": "relu"}
        hf, tok = workloads.load_classifier("bert20", **extra)
        model = ax.load_model(hf, tokenizer=tok)
        length = len(tok(text)["input_ids"])
        refs = _references(length, hf.config.hidden_size, N_BASELINES)
        ax.deeplift(model, "a b c", "all")  # warm-up
        for method in ("deeplift", "deeplift_shap"):
            shap = method == "deeplift_shap"
            base, base_s = _best(repeats, captum_classifier, hf, tok, text,
                                 refs if shap else refs[:1])  # fmt: skip
            fn = getattr(ax, method)
            opts = {"baselines": list(refs[:, None])} if shap else {"baseline": refs[:1]}
            for activations in ("captum", "all"):
                da, ax_s = _best(repeats, _timed, fn, model, text, "all",
                                 activations=activations, **opts)  # fmt: skip
                gate = act == "relu" or activations == "captum"
                records.append(_record(name, method, "captum", activations, da, base, ax_s,
                                       base_s, gate))  # fmt: skip
    return records


def captum_layers(hf, tok, prompt: str, target: str, refs: torch.Tensor):
    """Captum's ``LayerDeepLift`` (one reference) or ``LayerDeepLiftShap`` (several) at every
    residual-stream layer: ``[target, sequence, layer, hidden]`` (future NaN), the convergence
    deltas ``[target, layer]``, seconds; one ``attribute`` call per layer and per target."""
    from captum.attr import LayerDeepLift, LayerDeepLiftShap

    from .baselines import _Forward, _tokenize_decoder_only
    from .layers import layer_modules

    ids, first = _tokenize_decoder_only(tok, prompt, target)
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(ids[None]).detach()

    def forward(x: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        probs = hf(inputs_embeds=x).logits[:, -1].softmax(-1)
        return probs.gather(-1, tgt).squeeze(-1)

    shap = refs.shape[0] > 1
    wrapped = _Forward(hf, forward)
    modules = layer_modules(hf)
    shape = (len(ids) - first, len(ids), len(modules), embeds.shape[-1])
    out = np.full(shape, np.nan, dtype=np.float32)
    deltas = np.zeros((len(ids) - first, len(modules)))
    t0 = time.perf_counter()
    for j, module in enumerate(modules):  # the baseline's own loop: one call per layer...
        algo = LayerDeepLiftShap(wrapped, module) if shap else LayerDeepLift(wrapped, module)
        for k, t in enumerate(range(first, len(ids))):  # ...and per target
            x = embeds[:, :t].clone().requires_grad_(True)  # Captum hooks every ReLU input
            base = refs[:, :t] if shap else refs[:1, :t]
            a, delta = algo.attribute(
                x,
                baselines=base,
                additional_forward_args=(ids[t].reshape(1, 1),),
                return_convergence_delta=True,
            )
            a = a[0] if isinstance(a, tuple) else a  # a block returning a tuple: its hidden
            out[k, :t, j] = a[0].detach().numpy()
            deltas[k, j] = float(delta.sum() if shap else delta[0])  # Shap: a delta per baseline
    return out, deltas, time.perf_counter() - t0


def measure_layers(quick: bool, repeats: int) -> list[dict[str, Any]]:
    """``layers="all"`` against Captum's layer DeepLIFT per layer and target, ReLU W1."""
    import attrax as ax

    from .layers import rel_err

    n_prompt, n_target = (8, 6) if quick else (16, 8)
    hf, tok = workloads.load("gpt2", activation_function="relu")
    model = ax.load_model(hf, tokenizer=tok)
    prompt, target = workloads.texts("gpt2", tok, n_prompt, n_target)
    refs = _references(n_prompt + n_target, hf.config.n_embd, N_BASELINES)
    ax.deeplift(model, *workloads.texts("gpt2", tok, 4, 2), layers="all")  # warm-up
    records = []
    for method in ("deeplift", "deeplift_shap"):
        shap = method == "deeplift_shap"
        base_refs = refs if shap else refs[:1]
        theirs, their_deltas, base_s = None, None, float("inf")
        for _ in range(1 if quick else 2):  # slow: fewer repeats, best kept
            theirs, their_deltas, seconds = captum_layers(hf, tok, prompt, target, base_refs)
            base_s = min(base_s, seconds)
        opts = {"baselines": list(refs[:, None])} if shap else {"baseline": refs[:1]}
        da, ax_s = _best(repeats, _timed, getattr(ax, method), model, prompt, target,
                         layers="all", activations="captum", **opts)  # fmt: skip
        ours = da.transpose("target", "source", "layer", "hidden").values
        error = rel_err(ours, theirs)
        if np.isnan(ours).sum() != np.isnan(theirs).sum():
            error = float("inf")  # a different future (NaN) pattern is a parity failure
        # Captum's LayerDeepLiftShap delta is per baseline: its mean is the mean's delta
        their_gap = their_deltas / (N_BASELINES if shap else 1)
        gap = da.completeness_gap.transpose("target", "layer").values
        gap_error = float(np.abs(gap - their_gap).max() / max(np.abs(their_gap).max(), 1e-12))
        ok = error <= 1e-4 and gap_error <= 1e-4
        print(
            f"W1-relu   {method:14s} layers 0..{ours.shape[2] - 1}: {'ok' if ok else 'FAIL'} "
            f"(attributions {error:.1e}, gap {gap_error:.1e}, largest |gap| "
            f"{np.abs(gap).max():.1e}); attrax {ax_s:.3f}s, captum {base_s:.3f}s, "
            f"x{base_s / ax_s:.1f}",
            flush=True,
        )
        records.append(dict(
            workload="W1-relu", method=method, baseline="captum-layer", activations="captum",
            gate=True, ok=ok, tokens=[n_prompt, n_target], layers=int(ours.shape[2]),
            targets=int(ours.shape[0]), errors={"attributions": error, "gap": gap_error},
            max_abs_gap=float(np.abs(gap).max()), attrax_s=ax_s, baseline_s=base_s,
            speedup=base_s / ax_s,
        ))  # fmt: skip
    return records


DOCS = Path(__file__).resolve().parent.parent / "docs" / "methods" / "propagation.md"
BEGIN, END = "<!-- deeplift-layers-benchmark -->", "<!-- /deeplift-layers-benchmark -->"


def render_layers(result: dict[str, Any]) -> str:
    """The docs table of a ``--layers`` run."""
    rows = result["records"]
    p, t = rows[0]["tokens"]
    intro = (
        "`python -m benchmarks.deeplift --layers --docs` (bench venv, `PYTHONPATH=src:.`; results "
        f"in `benchmarks/deeplift-layers.json`): the ReLU W1 GPT-2, {p}-token prompt + {t}-token "
        f"target, layers 0..{rows[0]['layers'] - 1}, {result['threads']} threads on the shared "
        "2-core machine (other jobs inflate absolute times; the ratio is within one run). "
        "Parity: max |a - b| / max |b| over every target, source, layer and hidden unit, and the "
        "same for Captum's convergence delta against `completeness_gap` (the largest gap, over "
        "targets and layers, is on the target's probability: nonzero, as attention and "
        "LayerNorm keep their gradient)."
    )
    lines = [
        textwrap.fill(intro, width=100, break_on_hyphens=False),
        "",
        "| attrax (one call) | Captum 0.9 (a call per layer, per target) | parity | gap parity "
        "| largest \\|gap\\| | attrax s | Captum s | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        captum = "`LayerDeepLiftShap`" if r["method"] == "deeplift_shap" else "`LayerDeepLift`"
        lines.append(
            f'| `{r["method"]}(..., layers="all")` | {captum} | '
            f"{r['errors']['attributions']:.1e} | {r['errors']['gap']:.1e} | "
            f"{r['max_abs_gap']:.1e} | "
            f"{r['attrax_s']:.2f} | {r['baseline_s']:.1f} | {r['speedup']:.0f}x |"
        )
    return "\n".join(lines)


def write_docs(result: dict[str, Any], page: Path = DOCS) -> None:
    """Put :func:`render_layers`'s table between the markers of ``page``."""
    report.write_between(page, BEGIN, END, render_layers(result))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.deeplift", description=__doc__)
    p.add_argument("--quick", action="store_true", help="W1 at 16 + 8 tokens, one repeat")
    p.add_argument(
        "--layers", action="store_true", help="layers='all' vs Captum's LayerDeepLift(Shap)"
    )
    p.add_argument("--repeats", type=int, help="timed calls per side (best kept)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", type=Path, help="results JSON")
    p.add_argument("--docs", action="store_true", help="with --layers: render the docs table")
    p.add_argument("--report", action="store_true", help="only render the docs from --out")
    args = p.parse_args(argv)
    if args.report:
        write_docs(json.loads(Path(args.out or "benchmarks/deeplift-layers.json").read_text()))
        return 0
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Captum warns on every hooked call
    t0 = time.perf_counter()
    run = measure_layers if args.layers else measure
    records = run(args.quick, args.repeats or (1 if args.quick else 3))
    name = "deeplift-layers" if args.layers else "deeplift"
    out = args.out or RESULTS / f"{name}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"quick": args.quick, "threads": args.threads, "records": records}
    out.write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")
    ok = all(r["ok"] for r in records if r["gate"])
    if ok and args.layers and args.docs:
        write_docs(payload)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

__all__ = [
    "captum_classifier",
    "captum_layers",
    "captum_lm",
    "inseq_lm",
    "main",
    "measure",
    "measure_layers",
]
