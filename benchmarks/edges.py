"""Edge attribution patching (EAP, EAP-IG) against real edge patching, and against a loop;
edge patching (``ax.edge_patching``) against the loop that patches edge by edge.

Faithfulness, on the built-in trained model (``"1 2 3 ="`` -> ``" 3 2 1"``, corrupted to
``"1 2 4 ="``): each edge ``u -> v`` patched for real, one forward an edge, the clean run with
``u(corrupted) - u(clean)`` added to ``v``'s input only (a head's: the attention run again on
the norm of the shifted stream, that head's query, key or value swapped in, as the model's own
code hands them to its attention function); the Spearman correlation of EAP's and EAP-IG's
estimates with those effects, per target, over the edges. The same effects from
``ax.edge_patching``, every edge alone a copy of the batch in one call (parity, then time against
the loop), and the share of the clean run's lead that EAP's and EAP-IG's top-n circuits keep
(the n largest estimates, or grown greedily from the logits).

Speed, on W1 and W1-llama (``components.py``'s: 4 layers, 4 heads, 256 wide, 32 + 32 tokens):
against what a hook-based implementation runs, one backward per target (Hanna et al.'s EAP-IG
library takes one per batch of its metric): a clean forward with probes at every receiver's
input, ``autograd.grad`` per target, then each head's gradient pulled back through the norm
and its rows of the projection, head by head. Parity (<= 1e-4 of the largest) before timing.

    PYTHONPATH=$PWD/src:$PWD python -m benchmarks.edges [--quick] [--repeats N] [--out FILE]
    PYTHONPATH=$PWD/src:$PWD python -m benchmarks.edges --real-size [--out FILE]
    PYTHONPATH=$PWD/src:$PWD python -m benchmarks.edges --classifier [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np
import torch

import attrax as ax

from . import components, workloads
from .components import llama_like, measure


def _blocks(hf: Any) -> list[tuple[Any, Any, list[tuple[Any, list[tuple[str, int]]]], Any, Any]]:
    """Per block: (block, first norm, [(projection, [(part, heads)])], output projection,
    second norm), by hand for GPT-2 and Llama."""
    config = hf.config
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if config.model_type == "gpt2":
        return [
            (b, b.ln_1, [(b.attn.c_attn, [("q", heads), ("k", heads), ("v", heads)])],
             b.attn.c_proj, b.ln_2)
            for b in hf.transformer.h
        ]  # fmt: skip
    return [
        (b, b.input_layernorm,
         [(b.self_attn.q_proj, [("q", heads)]), (b.self_attn.k_proj, [("k", kv)]),
          (b.self_attn.v_proj, [("v", kv)])],
         b.self_attn.o_proj, b.post_attention_layernorm)
        for b in hf.model.layers
    ]  # fmt: skip


def _weight(module: Any) -> torch.Tensor:
    """``[out, in]``."""
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


def loop_eap(hf: Any, ids: torch.Tensor, bad: torch.Tensor, first: int) -> np.ndarray:
    """``[K, senders, receivers]``: EAP with one backward per target (logit objective)."""
    blocks = _blocks(hf)
    heads = hf.config.num_attention_heads
    seen: dict[str, Any] = {}

    def record(tag: str) -> list[Any]:
        hooks = [blocks[0][0].register_forward_pre_hook(
            lambda _m, a, k: seen.__setitem__((tag, "input"), (a[0] if a else k["hidden_states"])),
            with_kwargs=True)]  # fmt: skip
        for n, (b, _, _, proj, _) in enumerate(blocks):
            hooks.append(proj.register_forward_pre_hook(
                lambda _m, a, n=n: seen.__setitem__((tag, "z", n), a[0])))  # fmt: skip
            hooks.append(b.mlp.register_forward_hook(
                lambda _m, _a, o, n=n: seen.__setitem__((tag, "m", n), o)))  # fmt: skip
        return hooks

    def senders(tag: str) -> torch.Tensor:
        out = [seen[tag, "input"][None]]
        for n, (_, _, _, proj, _) in enumerate(blocks):
            z = seen[tag, "z", n].unflatten(-1, (heads, -1))
            w = _weight(proj).unflatten(-1, (heads, -1))
            out += [torch.einsum("blhd,Hhd->hblH", z, w), seen[tag, "m", n][None]]
        return torch.cat(out)

    with torch.no_grad():
        hooks = record("bad")
        hf(input_ids=bad, use_cache=False)
        for h in hooks:
            h.remove()
    hooks = record("clean")
    probes, norms_in = [], {}
    for n, (_, norm, readers, _, mlp_norm) in enumerate(blocks):
        hooks.append(norm.register_forward_pre_hook(
            lambda _m, a, n=n: norms_in.__setitem__(n, a[0].detach())))  # fmt: skip
        for module, _ in readers:
            p = torch.zeros(*ids.shape, _weight(module).shape[0], requires_grad=True)
            probes.append(p)
            hooks.append(module.register_forward_hook(lambda _m, _a, o, p=p: o + p))
        p = torch.zeros(*ids.shape, hf.config.hidden_size, requires_grad=True)
        probes.append(p)
        hooks.append(mlp_norm.register_forward_pre_hook(lambda _m, a, p=p: (a[0] + p, *a[1:])))
    last = torch.zeros(*ids.shape, hf.config.hidden_size, requires_grad=True)
    probes.append(last)
    hooks.append(blocks[-1][0].register_forward_hook(
        lambda _m, _a, o: (o[0] + last, *o[1:]) if isinstance(o, tuple) else o + last))  # fmt: skip
    logits = hf(input_ids=ids, use_cache=False).logits[0]
    for h in hooks:
        h.remove()
    with torch.no_grad():
        delta = senders("bad") - senders("clean")
    n_send = delta.shape[0]
    out = []
    for k in range(ids.shape[1] - first):  # the per-target loop being compared
        score = logits[first + k - 1, int(ids[0, first + k])]
        grads = iter(torch.autograd.grad(score, probes, retain_graph=True))
        row = []
        for n, (_, norm, readers, _, _) in enumerate(blocks):
            before = 1 + n * (heads + 1)
            x = norms_in[n].requires_grad_(True)
            normed = norm(x)
            for module, parts in readers:
                g = next(grads)
                width = sum(c for _, c in parts)
                d = g.shape[-1] // width
                for h in range(width):  # each head's gradient at its own copy of the stream
                    masked = torch.zeros_like(g)
                    masked[..., h * d : (h + 1) * d] = g[..., h * d : (h + 1) * d]
                    (at,) = torch.autograd.grad(
                        normed @ _weight(module).T, x, masked, retain_graph=True
                    )
                    col = torch.full((n_send,), float("nan"))
                    col[:before] = torch.einsum("ublH,blH->u", delta[:before], at)
                    row.append(col)
            g = next(grads)
            col = torch.full((n_send,), float("nan"))
            col[: before + heads] = torch.einsum("ublH,blH->u", delta[: before + heads], g)
            row.append(col)
        row.append(torch.einsum("ublH,blH->u", delta, next(grads)))
        out.append(torch.stack(row, -1))
    return torch.stack(out).detach().numpy()


def parity(got: Any, want: np.ndarray) -> dict[str, float]:
    """As :func:`components.parity`, the edges that are none NaN on both sides."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.array_equal(np.isnan(got.values), np.isnan(want)), "the edges that are none differ"
    diff = float(np.nanmax(np.abs(got.values - want)))
    return {"parity_max_abs_diff": diff, "parity_rel_diff": diff / float(np.nanmax(np.abs(want)))}


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties given their average rank (exact zeros and float32-rounded effects
    tie)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x))
    _, inverse = np.unique(x, return_inverse=True)
    return np.bincount(inverse, ranks)[inverse] / np.bincount(inverse)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: the correlation of the ranks (ties averaged)."""
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def faithfulness(repeats: int = 1) -> dict[str, Any]:
    """Spearman's rho of EAP's, EAP-IG's and EAP-IG-activations' estimates with real edge
    patching, per target, on the built-in model; ``ax.edge_patching`` of every edge alone (one call) against the loop
    that patches them (parity, then time); and how much of the clean run's lead each of EAP's
    and EAP-IG's top-n circuits keeps."""
    # the tests' loop, patching for real (the repository root is on PYTHONPATH, as run above)
    from tests.test_edges import real_edges

    model = ax.load_model()
    clean, bad, target = "1 2 3 =", "1 2 4 =", " 3 2 1"
    kw = {"corrupted": bad, "objective": "logit"}
    eap = ax.edge_attribution_patching(model, clean, target, **kw)
    ig = ax.edge_attribution_patching(model, clean, target, steps=16, **kw)
    act = ax.edge_attribution_patching(model, clean, target, steps=16, interpolate="activations",
                                       **kw)  # fmt: skip
    real = real_edges(model, eap, clean, bad, target)
    row: dict[str, Any] = {"edges": int(np.isfinite(eap.values[0]).sum())}
    estimates = (("eap", eap), ("eap_ig", ig), ("eap_ig_activations", act))
    for name, da in estimates:
        rhos = []
        for k in range(da.sizes["target"]):
            mask = np.isfinite(da.values[k])
            rhos.append(round(spearman(da.values[k][mask], real[k][mask]), 3))
        row[f"{name}_spearman"] = rhos
    # every edge patched alone, a copy of the batch each in one call, against the loop
    edges = ax.top_edges(eap, row["edges"])
    senders, receivers = list(map(str, eap.sender.values)), list(map(str, eap.receiver.values))
    want = np.stack([real[:, senders.index(s), receivers.index(r)] for s, r in edges], -1)

    def one_call() -> Any:
        return ax.edge_patching(model, clean, target, patch=[[e] for e in edges], **kw)

    got = one_call()
    row["edge_patching_parity_max_abs_diff"] = float(np.abs(got.values - want).max())
    assert row["edge_patching_parity_max_abs_diff"] <= 1e-4 * np.abs(want).max()
    times = {"attrax": [], "loop": []}
    for _ in range(repeats):  # alternated
        start = time.perf_counter()
        one_call()
        times["attrax"].append(time.perf_counter() - start)
        start = time.perf_counter()
        real_edges(model, eap, clean, bad, target)
        times["loop"].append(time.perf_counter() - start)
    medians = {k: float(np.median(v)) for k, v in times.items()}
    row["edge_patching_seconds"] = medians
    row["edge_patching_speedup"] = round(medians["loop"] / medians["attrax"], 1)
    # each top-n circuit's share of the clean run's lead over the corrupted one (0: no edge
    # kept, the corrupted run; 1: every edge, the clean run), per target
    sizes = [0, 5, 10, 20, 40]
    row["circuit_sizes"] = sizes
    for name, da in estimates:
        for how, greedy in (("", False), ("_greedy", True)):
            chosen = ax.top_edges(da, sizes, greedy=greedy)
            effects = ax.edge_patching(model, clean, target, circuit=chosen, **kw)
            kept = (1 - effects / effects.sel(circuit=0)).values.T.astype(float)
            row[f"{name}{how}_circuit_faithfulness"] = np.round(kept, 3).tolist()
    return row


#: the built-in classifier's markers, one per class, each one token (a corrupted text swaps it)
MARKERS = {"negative": "awful", "neutral": "fine", "positive": "great"}


def classifier_faithfulness(examples: int = 6) -> dict[str, Any]:
    """On the built-in classifier (a tiny post-norm BERT): per held-out text, its marker word
    swapped for another class's as the corrupted text, every class a target (logit): the
    Spearman correlation of EAP's and EAP-IG's estimates with each edge patched for real
    (``ax.edge_patching``, one edge a copy, itself tested against a loop), and the share of the
    clean run's lead over the corrupted one that the top-n circuits keep."""
    from attrax._default_classifier_task import ground_truth, make_example

    model = ax.load_model("attrax:classifier")
    tok = model.tokenizer
    rows = []
    for seed in range(examples):
        text, label = make_example(seed, split="heldout")
        tokens = tok.convert_ids_to_tokens(tok(text)["input_ids"])
        marker = tokens[ground_truth(tokens)]
        other = next(m for c, m in MARKERS.items() if c != label)
        bad = " ".join(other if w == marker else w for w in text.split())
        kw = {"corrupted": bad, "objective": "logit"}
        eap = ax.edge_attribution_patching(model, text, [0, 1, 2], **kw)
        ig = ax.edge_attribution_patching(model, text, [0, 1, 2], steps=16, **kw)
        act = ax.edge_attribution_patching(model, text, [0, 1, 2], steps=16,
                                           interpolate="activations", **kw)  # fmt: skip
        edges = ax.top_edges(eap, int(np.isfinite(eap.values[0]).sum()))
        real = ax.edge_patching(model, text, [0, 1, 2], patch=[[e] for e in edges], **kw)
        row: dict[str, Any] = {"text": text, "corrupted": bad, "label": label}
        estimated = (("eap", eap), ("eap_ig", ig), ("eap_ig_activations", act))
        for name, da in estimated:
            estimates = np.stack([da.sel(sender=u, receiver=v).values for u, v in edges], -1)
            row[f"{name}_spearman"] = [
                round(spearman(estimates[k], real.values[k]), 3) for k in range(3)
            ]
        sizes = [0, 5, 10, 20, 40, len(edges)]
        row["circuit_sizes"] = sizes
        for name, da in estimated:
            effects = ax.edge_patching(model, text, [0, 1, 2], circuit=ax.top_edges(da, sizes),
                                       **kw)  # fmt: skip
            kept = (1 - effects / effects.sel(circuit=0)).values.astype(float)
            row[f"{name}_circuit_faithfulness"] = np.round(kept, 3).tolist()
        rows.append(row)
    return {"model": "the built-in classifier (BERT, 2 layers x 4 heads, 64 wide)",
            "edges": len(edges), "examples": rows, "bert_base": bert_base()}  # fmt: skip


def bert_base(words: int = 60, repeats: int = 3) -> dict[str, Any]:
    """EAP's time on a BERT-base-shaped classifier (12 layers of 12 heads, 768 wide, random
    weights on the tests' tokenizer, float32, the threads torch has), every class a target,
    against its attribution patching of the heads: the medians of ``repeats``, alternated."""
    import transformers

    from attrax.testing import corpus, tiny_classifier

    _, tok = tiny_classifier("bert")
    config = transformers.BertConfig(
        vocab_size=len(tok), hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = ax.load_model(transformers.BertForSequenceClassification(config).eval(), tokenizer=tok)
    text = " ".join(" ".join(corpus()).split()[:words])
    kw = {"corrupted": "x " + text.split(" ", 1)[1], "objective": "logit"}
    times: dict[str, list[float]] = {"eap": [], "atp": []}
    for _ in range(repeats):
        for name, fn in (("eap", ax.edge_attribution_patching), ("atp", ax.attribution_patching)):
            start = time.perf_counter()
            da = fn(model, text, [0, 1, 2], **kw)
            times[name].append(time.perf_counter() - start)
            if name == "eap":
                edges = int(np.isfinite(da.values[0]).sum())
    return {
        "model": "BERT, 12 layers x 12 heads, 768 wide (BERT-base-shaped, random weights)",
        "tokens": len(tok(text)["input_ids"]), "edges": edges, "threads": torch.get_num_threads(),
        "eap_seconds": round(float(np.median(times["eap"])), 2),
        "atp_seconds": round(float(np.median(times["atp"])), 2),
        "load_average": round(os.getloadavg()[0], 2),
    }  # fmt: skip


def real_size(n_prompt: int = 48, n_target: int = 8, singles: int = 64) -> dict[str, Any]:
    """A Pythia-160M-shaped model (GPT-NeoX, 12 layers of 12 heads, 768 wide, parallel
    residual; random weights on the tests' tokenizer) in float32, one thread: EAP's time, the
    ``singles`` largest estimates' edges patched one a copy (their time, against a plain
    forward of as many copies, and their correlation with the estimates per target), and a
    sweep of top-n circuits."""
    import transformers

    from attrax.testing import corpus, tiny_model

    _, tok = tiny_model("gpt2")
    config = transformers.GPTNeoXConfig(
        vocab_size=len(tok), hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, rotary_pct=0.25, use_parallel_residual=True,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    model = ax.load_model(hf, tokenizer=tok)
    words = " ".join(corpus()).split()
    prompt = " ".join(words[:n_prompt])
    target = " " + " ".join(words[n_prompt : n_prompt + n_target])
    kw = {"corrupted": " ".join(["x", *words[1:n_prompt]]), "objective": "logit"}
    row: dict[str, Any] = {"model": "GPT-NeoX, 12 layers x 12 heads, 768 wide (Pythia-160M)"}
    start = time.perf_counter()
    eap = ax.edge_attribution_patching(model, prompt, target, **kw)
    row["eap_seconds"] = round(time.perf_counter() - start, 2)
    row["targets"], row["tokens"] = eap.sizes["target"], len(tok(prompt + target)["input_ids"])
    row["edges"] = int(np.isfinite(eap.values[0]).sum())
    top = ax.top_edges(eap, singles)
    start = time.perf_counter()
    real = ax.edge_patching(model, prompt, target, patch=[[e] for e in top], **kw)
    row["singles"], row["singles_seconds"] = singles, round(time.perf_counter() - start, 2)
    ids = torch.tensor([tok(prompt + target)["input_ids"]]).repeat(singles, 1)
    start = time.perf_counter()
    with torch.no_grad():
        hf(input_ids=ids)
    row["plain_forward_seconds"] = round(time.perf_counter() - start, 2)
    estimates = np.stack([eap.sel(sender=s, receiver=r).values for s, r in top], -1)
    row["eap_vs_real_pearson"] = [
        round(float(np.corrcoef(estimates[k], real.values[k])[0, 1]), 3)
        for k in range(estimates.shape[0])
    ]
    sizes = [0, 100, 1000, 10000, row["edges"]]
    start = time.perf_counter()
    sweep = ax.edge_patching(model, prompt, target, circuit=ax.top_edges(eap, sizes), **kw)
    row["sweep_sizes"], row["sweep_seconds"] = sizes, round(time.perf_counter() - start, 2)
    kept = (1 - sweep / sweep.sel(circuit=0)).median("target")
    row["sweep_median_faithfulness"] = np.round(kept.values.astype(float), 3).tolist()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 + 8 tokens, 1 repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the numbers as JSON")
    parser.add_argument(
        "--real-size", action="store_true", help="only the Pythia-160M-shaped run (real_size)"
    )
    parser.add_argument(
        "--classifier", action="store_true",
        help="only the built-in classifier's faithfulness (classifier_faithfulness)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.classifier:
        torch.set_num_threads(2)  # the BERT-base-shaped timing: two threads, as CI has
        row = classifier_faithfulness()
        print(row, flush=True)
        components.write(args.out, {"classifier": row, "threads": torch.get_num_threads()})
        return 0
    if args.real_size:
        row = real_size()
        print(row, flush=True)
        components.write(args.out, {"real_size": row, "threads": 1})
        return 0
    load_before = os.getloadavg()
    repeats = 1 if args.quick else args.repeats
    results: dict[str, Any] = {"faithfulness": faithfulness(repeats), "workloads": {}}
    print(results["faithfulness"], flush=True)
    gpt2, tok = workloads.load("gpt2")
    n_prompt, n_target = (16, 8) if args.quick else (32, 32)
    prompt, target = workloads.texts("gpt2", tok, n_prompt, n_target)
    corrupted = workloads._exact(tok, workloads.word_stream(99), n_prompt, leading_space=False)
    ids = torch.tensor([tok(prompt + target)["input_ids"]])
    bad = torch.tensor([tok(corrupted + target)["input_ids"]])
    assert bad.shape == ids.shape and (bad[0, n_prompt:] == ids[0, n_prompt:]).all()
    components.parity = parity  # measure's check, for arrays whose no-edges are NaN
    for name, hf in (("W1", gpt2), ("W1-llama", llama_like(gpt2))):
        model = ax.load_model(hf, tokenizer=tok)
        row = measure(
            lambda m=model: ax.edge_attribution_patching(
                m, prompt, target, corrupted=corrupted, objective="logit"
            ),
            lambda hf=hf: loop_eap(hf, ids, bad, n_prompt),
            repeats,
        )
        results["workloads"][name] = {"edge_attribution_patching": row}
        print(name, row, flush=True)
    results.update(
        n_prompt=n_prompt, n_target=n_target, threads=1, repeats=repeats,
        load_average=[round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    )  # fmt: skip
    components.write(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
