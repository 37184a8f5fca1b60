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
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import workloads
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.deeplift", description=__doc__)
    p.add_argument("--quick", action="store_true", help="W1 at 16 + 8 tokens, one repeat")
    p.add_argument("--repeats", type=int, help="timed calls per side (best kept)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", type=Path, help="results JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Captum warns on every hooked call
    t0 = time.perf_counter()
    records = measure(args.quick, args.repeats or (1 if args.quick else 3))
    out = args.out or RESULTS / ("deeplift-quick.json" if args.quick else "deeplift.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"quick": args.quick, "threads": args.threads, "records": records}
    out.write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")
    return 0 if all(r["ok"] for r in records if r["gate"]) else 1


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["captum_classifier", "captum_lm", "inseq_lm", "main", "measure"]
