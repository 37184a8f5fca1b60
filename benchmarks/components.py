"""Direct logit attribution, attribution patching and activation patching vs loops in plain
PyTorch.

The loops are what a TransformerLens/nnsight user writes by hand: one cached forward (hooks on the
attention maps, values, MLPs and the final norm's input), then one decomposition per target
(DLA); one clean forward with probes on the head outputs and one ``backward`` per target with
the graph retained (AtP), the corrupted activations read once; that AtP loop once per layer with
the layer's residual contribution detached (GradDrop: ``L x K`` backwards); real patching, one
forward per (layer, head, position) with a hook (activation patching); ROME's loop for causal
tracing, one forward of the clean input and its noisy copies per (layer, position). attrax runs every target
at once (DLA: two contractions per layer; AtP: one ``vmap``-ed backward) and stacks the patched
copies of activation patching in forwards of as many as fit. Parity (max |a - b| / max |b|
<= 1e-4 after the same labelling; the max abs difference is reported too) is checked before
anything is timed; times are medians of ``--repeats`` rounds (attrax then the loop, back to back),
the speedup the median of the per-round ratios (and their range).

W1: the benchmark GPT-2 (``workloads.py``; 4 layers, 4 heads, 256 wide), 32 prompt + 32 target
tokens. W1-llama: a random Llama of the same sizes (2 key-value heads, RMSNorm, RoPE) on the same
texts. W2: the benchmark Marian (4 + 4 layers, 4 heads, 256 wide; 32 source + 32 target tokens,
``</s>`` included), attribution patching of the encoder's self-attention heads, the decoder's
self-attention heads and its cross-attention heads against a loop of one corrupted forward, one
clean forward whose hooks keep the head outputs in the graph and one ``autograd.grad`` per
target; its direct logit attribution is a ModelError (post-LN: no direct path), reported.

    PYTHONPATH=$PWD/src:$PWD python -m benchmarks.components [--quick] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import attrax as ax

from . import workloads


def _modules(hf: Any) -> tuple[list, list, list, list, Any, str]:
    base, kind = hf.base_model, hf.config.model_type
    if kind == "gpt2":
        blocks = list(base.h)
        attn = [b.attn for b in blocks]
        return blocks, [a.c_proj for a in attn], [a.c_attn for a in attn], attn, base.ln_f, kind
    blocks = list(base.layers)
    attn = [b.self_attn for b in blocks]
    return blocks, [a.o_proj for a in attn], [a.v_proj for a in attn], attn, base.norm, kind


def loop_dla(hf: Any, ids: torch.Tensor, first: int) -> np.ndarray:
    """``[K, L, layer, head + 1]``: one cached forward, then one decomposition per target."""
    blocks, proj, value, _, norm, kind = _modules(hf)
    heads = hf.config.num_attention_heads
    d = hf.config.hidden_size // heads
    cache: dict[str, Any] = {"v": {}, "mlp": {}}
    hooks = [
        m.register_forward_hook(lambda _m, _a, o, n=n: cache["v"].__setitem__(n, o[0]))
        for n, m in enumerate(value)
    ]
    hooks += [
        b.mlp.register_forward_hook(lambda _m, _a, o, n=n: cache["mlp"].__setitem__(n, o[0]))
        for n, b in enumerate(blocks)
    ]
    hooks.append(norm.register_forward_pre_hook(lambda _m, a: cache.__setitem__("x", a[0][0])))
    with torch.no_grad():
        out = hf(input_ids=ids, output_attentions=True, use_cache=False)
        for h in hooks:
            h.remove()
        unembed = hf.get_output_embeddings().weight
        length = ids.shape[1]
        result = np.zeros((length - first, length, len(blocks), heads + 1))
        for k in range(length - first):  # the per-target loop being compared
            i, t = first + k - 1, int(ids[0, first + k])
            x = cache["x"][i]
            g = norm.weight * unembed[t]
            if kind == "gpt2":
                g = (g - g.mean()) / torch.sqrt(x.var(unbiased=False) + norm.eps)
            else:
                g = g / torch.sqrt(x.pow(2).mean() + norm.variance_epsilon)
            for n in range(len(blocks)):
                v = cache["v"][n]
                if kind == "gpt2":
                    v = v[:, 2 * hf.config.hidden_size :].unflatten(-1, (heads, d))
                else:
                    v = v.unflatten(-1, (-1, d))
                    v = v.repeat_interleave(heads // v.shape[1], dim=1)
                w = proj[n].weight if kind == "gpt2" else proj[n].weight.T
                w = w.unflatten(0, (heads, d))  # [head, d, hidden]
                a = out.attentions[n][0, :, i]  # [head, keys]
                per = torch.einsum("hj,jhd,hdx,x->jh", a, v, w, g)
                result[k, :, n, :heads] = per.numpy()
                result[k, i, n, heads] = float(cache["mlp"][n][i] @ g)
    return result


def loop_atp(
    hf: Any,
    ids: torch.Tensor,
    bad: torch.Tensor,
    first: int,
    drop: int | None = None,
    site: str = "heads",
) -> np.ndarray:
    """``[K, L, layer, head]``: one clean forward with probes, one backward per target; with
    ``drop``, that block's residual contribution detached (GradDrop's backward). ``site=
    "neurons"``: the probes on each MLP output projection's input, ``[K, L, layer, neuron]``."""
    blocks, proj, _, _, _, kind = _modules(hf)
    heads = hf.config.num_attention_heads
    if site == "neurons":  # GPT-2's c_proj, Llama's down_proj: one neuron a column
        proj = [b.mlp.c_proj if kind == "gpt2" else b.mlp.down_proj for b in blocks]
    corrupt: dict[int, torch.Tensor] = {}
    hooks = [
        p.register_forward_pre_hook(lambda _m, a, n=n: corrupt.__setitem__(n, a[0][0]))
        for n, p in enumerate(proj)
    ]
    with torch.no_grad():
        hf(input_ids=bad, use_cache=False)
    for h in hooks:
        h.remove()
    clean: dict[int, torch.Tensor] = {}
    probes = [torch.zeros_like(corrupt[n], requires_grad=True) for n in range(len(proj))]

    def add(n: int) -> Callable:
        def hook(_m: Any, a: tuple) -> tuple:
            clean[n] = a[0][0].detach()
            return (a[0] + probes[n], *a[1:])

        return hook

    hooks = [p.register_forward_pre_hook(add(n)) for n, p in enumerate(proj)]
    if drop is not None:  # out = x + b(x): the gradient at out reaches x only
        hooks.append(
            blocks[drop].register_forward_hook(
                lambda _m, a, o: (
                    (a[0] + (o[0] - a[0]).detach(), *o[1:])
                    if isinstance(o, tuple)
                    else a[0] + (o - a[0]).detach()
                )
            )
        )
    logits = hf(input_ids=ids, use_cache=False).logits[0]
    for h in hooks:
        h.remove()
    probs = torch.softmax(logits, -1)
    length = ids.shape[1]
    nodes = heads if site == "heads" else probes[0].shape[-1]
    result = np.zeros((length - first, length, len(proj), nodes))
    for k in range(length - first):  # the per-target loop being compared
        i, t = first + k - 1, int(ids[0, first + k])
        # a dropped block's own probes are unused: their gradient is zero
        grads = torch.autograd.grad(probs[i, t], probes, retain_graph=True, allow_unused=True)
        for n, g in enumerate(grads):
            if g is None:
                continue
            delta = (corrupt[n] - clean[n]).unflatten(-1, (nodes, -1))
            result[k, :, n] = (g.unflatten(-1, (nodes, -1)) * delta).sum(-1).numpy()
    return result


def encdec_projections(hf: Any, stack: str) -> list[torch.nn.Module]:
    """The output projections of a BART-like stack (Marian): their inputs are the head outputs."""
    if stack == "encoder":
        return [b.self_attn.out_proj for b in hf.get_encoder().layers]
    attention = "encoder_attn" if stack == "cross" else "self_attn"
    return [getattr(b, attention).out_proj for b in hf.get_decoder().layers]


def loop_atp_encdec(
    hf: Any, ids: torch.Tensor, bad: torch.Tensor, decoder_ids: torch.Tensor, stack: str
) -> np.ndarray:
    """``[K, positions, layer, head]``: one corrupted forward, one clean forward with hooks
    keeping the head outputs (in the graph, requiring grad), one ``autograd.grad`` per target.
    Encoder heads live on the encoder positions, decoder self and cross heads on the decoder's."""
    proj = encdec_projections(hf, stack)
    heads = (
        hf.config.encoder_attention_heads
        if stack == "encoder"
        else (hf.config.decoder_attention_heads)
    )
    corrupt: dict[int, torch.Tensor] = {}
    hooks = [
        p.register_forward_pre_hook(lambda _m, a, n=n: corrupt.__setitem__(n, a[0][0]))
        for n, p in enumerate(proj)
    ]
    with torch.no_grad():
        hf(input_ids=bad, decoder_input_ids=decoder_ids, use_cache=False)
    for h in hooks:
        h.remove()
    clean: dict[int, torch.Tensor] = {}

    def keep(n: int) -> Callable:
        def hook(_m: Any, a: tuple) -> tuple:
            # the weights are frozen: the first kept activation starts the graph (a leaf),
            # later ones depend on it (kept in the graph, so every path to the score counts)
            x = a[0] if a[0].requires_grad else a[0].detach().requires_grad_()
            clean[n] = x
            return (x, *a[1:])

        return hook

    hooks = [p.register_forward_pre_hook(keep(n)) for n, p in enumerate(proj)]
    logits = hf(input_ids=ids, decoder_input_ids=decoder_ids, use_cache=False).logits[0]
    for h in hooks:
        h.remove()
    acts = [clean[n] for n in range(len(proj))]  # [1, positions, hidden], requires_grad
    probs = torch.softmax(logits, -1)
    targets = decoder_ids[0, 1:]  # target k is predicted at decoder position k
    result = np.zeros((len(targets), acts[0].shape[1], len(proj), heads))
    for k in range(len(targets)):  # the per-target loop being compared
        grads = torch.autograd.grad(probs[k, int(targets[k])], acts, retain_graph=True)
        for n, g in enumerate(grads):
            delta = (corrupt[n] - acts[n][0].detach()).unflatten(-1, (heads, -1))
            result[k, :, n] = (g[0].unflatten(-1, (heads, -1)) * delta).sum(-1).numpy()
    return result


def loop_grad_drop(hf: Any, ids: torch.Tensor, bad: torch.Tensor, first: int) -> np.ndarray:
    """GradDrop by hand: the AtP loop once per dropped layer, ``sum_l |AtP_l| / (L - 1)``."""
    layers = len(_modules(hf)[0])
    runs = [loop_atp(hf, ids, bad, first, drop=layer) for layer in range(layers)]
    return sum(np.abs(r) for r in runs) / (layers - 1)


def loop_activation(
    hf: Any,
    ids: torch.Tensor,
    bad: torch.Tensor | None,
    first: int,
    objective: str = "probability",
) -> np.ndarray:
    """``[K, L, layer, head]``: real patching, one forward per (layer, head, position) with a
    hook that puts the corrupted run's head output there (TransformerLens's
    ``get_act_patch_attn_head_out_by_pos`` loop); every target's ``objective`` read from each
    forward. ``bad=None``: mean ablation, the clean run's head outputs averaged over the
    prompt's positions put there instead."""
    _, proj, _, _, _, _ = _modules(hf)
    heads = hf.config.num_attention_heads
    d = hf.config.hidden_size // heads
    corrupt: dict[int, torch.Tensor] = {}
    hooks = [
        p.register_forward_pre_hook(lambda _m, a, n=n: corrupt.__setitem__(n, a[0][0].clone()))
        for n, p in enumerate(proj)
    ]
    with torch.no_grad():
        hf(input_ids=ids if bad is None else bad, use_cache=False)
    for h in hooks:
        h.remove()
    if bad is None:  # the prompt's positions, as attrax's mean (not the targets')
        corrupt = {n: a[:first].mean(0, keepdim=True).expand_as(a) for n, a in corrupt.items()}
    length = ids.shape[1]
    rows = torch.arange(first - 1, length - 1)
    targets = ids[0, first:]

    def scores() -> torch.Tensor:
        logits = hf(input_ids=ids, use_cache=False).logits[0, rows]
        if objective == "logit":
            return logits[torch.arange(len(rows)), targets]
        return torch.softmax(logits, -1)[torch.arange(len(rows)), targets]

    result = np.zeros((length - first, length, len(proj), heads))
    with torch.no_grad():
        clean = scores()
        for n, module in enumerate(proj):  # the per-patch loop being compared
            for h in range(heads):
                for p in range(length):
                    cols = slice(h * d, (h + 1) * d)

                    def patch(
                        _m: Any, a: tuple, n: int = n, p: int = p, cols: slice = cols
                    ) -> tuple:
                        x = a[0].clone()
                        x[0, p, cols] = corrupt[n][p, cols]
                        return (x, *a[1:])

                    handle = module.register_forward_pre_hook(patch)
                    result[:, p, n, h] = (scores() - clean).numpy()
                    handle.remove()
    return result


#: causal tracing: the tokens noised (the "subject"), the noisy runs, their seed
TRACED, SAMPLES, SEED = [4, 5, 6, 7], 10, 0


def loop_tracing(hf: Any, ids: torch.Tensor, first: int) -> np.ndarray:
    """``[K, L, layer]``: causal tracing as ROME's ``trace_with_patch`` runs it, one forward per
    (layer, position) of the clean input and ``SAMPLES`` noisy copies (Gaussian noise on the
    ``TRACED`` tokens' embeddings, 3 deviations of the embedding table wide), each noisy copy's
    residual stream at that layer and position set to the clean copy's; every target's
    probability averaged over the noisy copies, less the unpatched noisy runs' mean."""
    blocks = _modules(hf)[0]
    table = hf.get_input_embeddings()
    std = float(table.weight.detach().double().std(correction=0))
    draws = torch.randn(
        SAMPLES, len(TRACED), table.weight.shape[1],
        generator=torch.Generator().manual_seed(SEED),
    )  # fmt: skip
    noise = draws.to(table.weight.dtype) * (3.0 * std)
    batch = ids.repeat(1 + SAMPLES, 1)
    length = ids.shape[1]
    rows = torch.arange(first - 1, length - 1)
    targets = ids[0, first:]

    def noised(_m: Any, _a: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[1:, TRACED] += noise
        return out

    def scores() -> torch.Tensor:
        logits = hf(input_ids=batch, use_cache=False).logits[1:, rows]
        probs = torch.softmax(logits, -1)[:, torch.arange(len(rows)), targets]
        return probs.mean(0)

    result = np.zeros((length - first, length, len(blocks)))
    handle = table.register_forward_hook(noised)
    try:
        with torch.no_grad():
            unpatched = scores()
            for n, block in enumerate(blocks):  # the per-patch loop being compared
                for p in range(length):

                    def restore(_m: Any, _a: Any, out: Any, p: int = p) -> Any:
                        hidden = out[0] if isinstance(out, tuple) else out
                        hidden[1:, p] = hidden[0, p]
                        return out

                    patch = block.register_forward_hook(restore)
                    result[:, p, n] = (scores() - unpatched).numpy()
                    patch.remove()
    finally:
        handle.remove()
    return result


def parity(got: Any, want: np.ndarray) -> dict[str, float]:
    """Max abs difference and max |a - b| / max |b| (attrax's NaN = what a target cannot see,
    exactly 0 in the loops)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    mask = np.isnan(got.values)
    assert not np.abs(want[mask]).any(), "the loop has values where attrax has none"
    values = np.where(mask, 0.0, got.values)
    diff = float(np.abs(values - np.where(mask, 0.0, want)).max())
    return {"parity_max_abs_diff": diff, "parity_rel_diff": diff / float(np.abs(want).max())}


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def llama_like(gpt2: Any) -> Any:
    """A random Llama of the benchmark GPT-2's sizes (RoPE, RMSNorm, 2 key-value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = gpt2.config
    config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=4 * c.n_embd,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=2,
        max_position_embeddings=c.n_positions, tie_word_embeddings=False,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.eos_token_id,
        initializer_range=0.1, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def measure(attrax_fn: Callable[[], Any], loop_fn: Callable[[], Any], repeats: int) -> dict:
    """Parity first (it doubles as a warm-up), then ``repeats`` rounds of one attrax run and one
    loop run back to back (a shared machine's load shifts hit both): the median time of each and
    the median of the per-round ratios."""
    row = parity(attrax_fn(), loop_fn())
    if row["parity_rel_diff"] > 1e-4:
        raise SystemExit(f"parity failed: {row}")
    rounds = [(timed(attrax_fn, 1)[0], timed(loop_fn, 1)[0]) for _ in range(repeats)]
    row.update(
        attrax_s=round(statistics.median(a for a, _ in rounds), 4),
        loop_s=round(statistics.median(b for _, b in rounds), 4),
        speedup=round(statistics.median(b / a for a, b in rounds), 2),
        speedup_range=[
            round(min(b / a for a, b in rounds), 2),
            round(max(b / a for a, b in rounds), 2),
        ],
    )
    return row


def run(quick: bool, repeats: int, only: set[str] | None = None) -> dict[str, Any]:
    """Every row, or the methods in ``only`` (W1 and W1-llama rows by their method name)."""
    torch.manual_seed(0)
    gpt2, tok = workloads.load("gpt2")
    n_prompt, n_target = (16, 8) if quick else (32, 32)
    prompt, target = workloads.texts("gpt2", tok, n_prompt, n_target)
    corrupted = workloads._exact(tok, workloads.word_stream(99), n_prompt, leading_space=False)
    ids = torch.tensor([tok(prompt + target)["input_ids"]])
    bad = torch.tensor([tok(corrupted + target)["input_ids"]])
    assert bad.shape == ids.shape and (bad[0, n_prompt:] == ids[0, n_prompt:]).all()
    results: dict[str, Any] = {"n_prompt": n_prompt, "n_target": n_target, "workloads": {}}
    for name, hf in (("W1", gpt2), ("W1-llama", llama_like(gpt2))):
        model = ax.load_model(hf, tokenizer=tok)
        row: dict[str, Any] = {}
        for method, attrax_fn, loop_fn in (
            (
                "direct_logit_attribution",
                lambda m=model: ax.direct_logit_attribution(m, prompt, target),
                lambda hf=hf: loop_dla(hf, ids, n_prompt),
            ),
            (
                "attribution_patching",
                lambda m=model: ax.attribution_patching(m, prompt, target, corrupted=corrupted),
                lambda hf=hf: loop_atp(hf, ids, bad, n_prompt),
            ),
            (
                "attribution_patching site=neurons",
                lambda m=model: ax.attribution_patching(
                    m, prompt, target, corrupted=corrupted, site="neurons"
                ),
                lambda hf=hf: loop_atp(hf, ids, bad, n_prompt, site="neurons"),
            ),
            (
                "activation_patching",
                lambda m=model: ax.activation_patching(m, prompt, target, corrupted=corrupted),
                lambda hf=hf: loop_activation(hf, ids, bad, n_prompt),
            ),
            (
                "activation_patching objective=logit",
                lambda m=model: ax.activation_patching(
                    m, prompt, target, corrupted=corrupted, objective="logit"
                ),
                lambda hf=hf: loop_activation(hf, ids, bad, n_prompt, "logit"),
            ),
            (
                "activation_patching ablation=mean objective=logit",
                lambda m=model: ax.activation_patching(
                    m, prompt, target, corrupted=ax.Ablation("mean"), objective="logit"
                ),
                lambda hf=hf: loop_activation(hf, ids, None, n_prompt, "logit"),
            ),
            (
                "causal_tracing",
                lambda m=model: ax.activation_patching(
                    m,
                    prompt,
                    target,
                    site="residual",
                    direction="denoising",
                    corrupted=ax.GaussianNoise(tokens=TRACED, samples=SAMPLES, seed=SEED),
                ),
                lambda hf=hf: loop_tracing(hf, ids, n_prompt),
            ),
            (
                "attribution_patching grad_drop=True",
                lambda m=model: ax.attribution_patching(
                    m, prompt, target, corrupted=corrupted, grad_drop=True
                ),
                lambda hf=hf: loop_grad_drop(hf, ids, bad, n_prompt),
            ),
        ):
            if only is not None and method not in only:
                continue
            row[method] = measure(attrax_fn, loop_fn, repeats)
            print(name, method, row[method], flush=True)
        results["workloads"][name] = row
    if only is not None and not only & {"direct_logit_attribution", "attribution_patching"}:
        return results
    # W2: Marian; the counts include the source's and the target's </s>
    marian, mtok = workloads.load("marian")
    mt = ax.load_model(marian, tokenizer=mtok)
    source, translation = workloads.texts("marian", mtok, n_prompt, n_target)
    corrupted = workloads._exact(mtok, workloads.word_stream(99), n_prompt - 1, False)
    ids, bad = (torch.tensor([mtok(s)["input_ids"]]) for s in (source, corrupted))
    assert bad.shape == ids.shape  # stack="encoder" patches position by position
    start = marian.config.decoder_start_token_id
    decoder_ids = torch.tensor([[start, *mtok(text_target=translation)["input_ids"]]])
    row = {}
    try:
        ax.direct_logit_attribution(mt, source, translation)
    except ax.ModelError as err:
        row["direct_logit_attribution"] = f"not defined: {err}"
    for stack in ("cross", "encoder", "decoder"):
        row[f"attribution_patching stack={stack}"] = measure(
            lambda s=stack: ax.attribution_patching(
                mt, source, translation, corrupted=corrupted, stack=s
            ),
            lambda s=stack: loop_atp_encdec(marian, ids, bad, decoder_ids, s),
            repeats,
        )
        print("W2", stack, row[f"attribution_patching stack={stack}"], flush=True)
    results["workloads"]["W2"] = row
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 + 8 tokens, 1 repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the numbers as JSON")
    parser.add_argument(
        "--only", help="comma-separated methods (rows) to run; with --out, merged into its rows"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    only = None if args.only is None else set(args.only.split(","))
    results = run(args.quick, 1 if args.quick else args.repeats, only)
    results["threads"] = 1
    results["repeats"] = 1 if args.quick else args.repeats
    # a shared machine: the 1-minute load average when the run started and ended
    results["load_average"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    if args.out and only is not None and os.path.exists(args.out):
        with open(args.out) as fh:
            earlier = json.load(fh)
        for name, row in results["workloads"].items():  # these rows, with their own run's facts
            for method, numbers in row.items():
                numbers.update(repeats=results["repeats"], load_average=results["load_average"])
                earlier["workloads"].setdefault(name, {})[method] = numbers
        results = earlier
    write(args.out, results)
    return 0


def write(out: str | None, results: dict[str, Any]) -> None:
    """``results`` as JSON to ``out`` (complete or not written) when given, and printed."""
    if out:
        with open(out + ".tmp", "w") as fh:
            json.dump(results, fh, indent=2)
        os.replace(out + ".tmp", out)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
