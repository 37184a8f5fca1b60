"""Edge patching (``ax.edge_patching``) against patching for real, edge by edge, and against the
corrupted and clean runs; ``ax.top_edges`` against a ranking of its own.

The loop for one edge ``u -> v`` is ``tests/test_edges.py``'s ``real_edges``: the clean run
with ``u(corrupted) - u(clean)`` added to ``v``'s own input only (a head's: the attention module
run again on the norm of the shifted stream, that head's query, key or value swapped in through
the attention function, no column layout assumed), the logit less the clean run's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import attrax as ax
from attrax.cli import main
from attrax.testing import save_tiny_model, tiny_classifier, tiny_model
from tests.test_components import full_double, neighbour
from tests.test_edges import (
    CLEAN,
    CORRUPTED,
    ENCODER_TEXTS,
    ENCODERS,
    KW,
    TARGET,
    edges_models,
    encoder_classifier,
    real_edges,
)

__all__ = ["edges_models"]  # the fixture, shared with tests/test_edges.py


def _all_edges(da):
    """Every ``(sender, receiver)`` edge of an edge attribution patching result, in its order."""
    first = da.isel(target=0) if "target" in da.dims else da
    return [
        (str(s), str(r))
        for s in first.sender.values
        for r in first.receiver.values
        if np.isfinite(first.sel(sender=s, receiver=r).values)
    ]


# GPT-2 (fused c_attn), Llama (grouped keys and values), GPT-NeoX (parallel, each head's query,
# key and value side by side), GPT-J (parallel on one norm), Falcon-40B (groups side by side)
@pytest.mark.parametrize(
    "arch",
    ["gpt2", "llama", "pythia", "gptj", "falcon-40b", "opt", "granite", "gemma2", "glm4", "bloom",
     "opt-post-ln", "olmo2", "exaone4", "olmoe", "cohere-qk", "deepseek_v2", "deepseek_v3",
     "deepseek_v32", "glm_moe_dsa", "codegen", "olmo-clip"],
)  # fmt: skip
def test_patching_one_edge_equals_patching_it_for_real(edges_models, arch):
    model = edges_models[arch]
    estimates = ax.edge_attribution_patching(model, CLEAN, TARGET, **KW)
    edges = _all_edges(estimates)
    got = ax.edge_patching(model, CLEAN, TARGET, patch=[[e] for e in edges], **KW)
    assert got.dims == ("target", "circuit") and list(got.edges.values) == [1] * len(edges)
    want = real_edges(model, estimates, CLEAN, CORRUPTED, TARGET)  # [K, U, R]
    senders = {str(s): i for i, s in enumerate(estimates.sender.values)}
    receivers = {str(r): i for i, r in enumerate(estimates.receiver.values)}
    expected = np.stack([want[:, senders[s], receivers[r]] for s, r in edges], -1)
    scale = np.abs(expected).max()
    assert scale > 1e-3
    # DeepSeek V2 rotates its queries and keys in float32 (complex products) in a float64
    # model: a remade head rounds there as its own batch does
    atol = (3e-8 if arch == "deepseek_v2" else 1e-9) * scale
    np.testing.assert_allclose(got.values, expected, rtol=1e-6, atol=atol)


@pytest.mark.parametrize("arch", ["pythia", "falcon-40b", "llama", "olmo2", "deepseek_v3"])
def test_one_edge_a_forward_remakes_only_its_head(edges_models, arch):
    """One copy a forward: each layer remakes only the head (or MLP) its edge goes into and
    keeps the model's own output for every other, in each of the projections' layouts."""
    model = edges_models[arch]
    estimates = ax.edge_attribution_patching(model, CLEAN, TARGET, **KW)
    edges = _all_edges(estimates)[::7]  # every receiver kind, a few senders each
    got = ax.edge_patching(model, CLEAN, TARGET, patch=[[e] for e in edges], batch_size=1, **KW)
    want = real_edges(model, estimates, CLEAN, CORRUPTED, TARGET)
    senders = {str(s): i for i, s in enumerate(estimates.sender.values)}
    receivers = {str(r): i for i, r in enumerate(estimates.receiver.values)}
    expected = np.stack([want[:, senders[s], receivers[r]] for s, r in edges], -1)
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(got.values, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())


@pytest.mark.parametrize("arch", ["pythia", "opt"])
def test_a_circuits_result_does_not_depend_on_the_others_in_its_forward(arch):
    """In bfloat16 a remade head rounds otherwise than the model's projection: a copy that
    patches no edge into it keeps the model's own, whichever copies share its forward."""
    _, tok = tiny_model("gpt2")
    model = ax.load_model(neighbour(arch, tok).to(torch.bfloat16), tokenizer=tok)
    every = _all_edges(ax.edge_attribution_patching(model, CLEAN, TARGET, **KW))
    circuits = [[], every, every[: len(every) // 2]]
    together = ax.edge_patching(model, CLEAN, TARGET, circuit=circuits, **KW)
    apart = ax.edge_patching(model, CLEAN, TARGET, circuit=circuits, batch_size=1, **KW)
    np.testing.assert_array_equal(together.values, apart.values)
    np.testing.assert_array_equal(together.sel(circuit=1).values, 0.0)


def _logits_at_targets(model, text):
    """The logit of each target token after ``text`` + the target, by a plain forward."""
    ids = model.tokenizer(text + TARGET, return_tensors="pt")["input_ids"]
    prompt = len(model.tokenizer(text)["input_ids"])
    with torch.no_grad():
        logits = model.hf(input_ids=ids).logits[0]
    return np.array([float(logits[p - 1, ids[0, p]]) for p in range(prompt, ids.shape[1])])


@pytest.mark.parametrize(
    "arch",
    [
        "gpt2",
        "llama",
        "pythia",
        "gptj",
        "falcon",
        "opt-projected",
        "gemma3",
        "bloom",
        "opt-post-ln",
        "exaone4",
        "olmoe",
        "deepseek_v2",
        "glm_moe_dsa",
    ],
)
def test_keeping_no_edge_is_the_corrupted_run_and_keeping_all_the_clean_one(edges_models, arch):
    """With every edge patched each receiver reads the corrupted run's stream; with none, the
    clean run's: the two runs' logits, by plain forwards of the model."""
    model = edges_models[arch]
    every = _all_edges(ax.edge_attribution_patching(model, CLEAN, TARGET, **KW))
    got = ax.edge_patching(model, CLEAN, TARGET, circuit=[[], every], **KW)
    clean, corrupted = _logits_at_targets(model, CLEAN), _logits_at_targets(model, CORRUPTED)
    assert np.abs(corrupted - clean).max() > 1e-2
    np.testing.assert_allclose(got.sel(circuit=0).values, corrupted - clean, rtol=1e-7,
                               atol=1e-9)  # fmt: skip
    np.testing.assert_allclose(got.sel(circuit=1).values, 0.0, atol=1e-9)
    # the same sets, named by what is patched
    patched = ax.edge_patching(model, CLEAN, TARGET, patch=[every, []], **KW)
    np.testing.assert_allclose(patched.values, got.values, rtol=1e-9, atol=1e-12)
    none = ax.edge_patching(model, CLEAN, TARGET, patch=[], **KW)  # one set, of no edge
    assert none.dims == ("target",)
    np.testing.assert_allclose(none.values, 0.0, atol=1e-9)


def _hooked_effect(model, handles):
    """Each target's logit in the clean run with ``handles``' hooks on (removed after) less
    the clean run's, by plain forwards of the model."""
    ids = model.tokenizer(CLEAN + TARGET, return_tensors="pt")["input_ids"]
    try:
        with torch.no_grad():
            logits = model.hf(input_ids=ids).logits[0]
    finally:
        for h in handles:
            h.remove()
    prompt = len(model.tokenizer(CLEAN)["input_ids"])
    row = ids[0]
    patched = np.array([float(logits[p - 1, row[p]]) for p in range(prompt, len(row))])
    want = patched - _logits_at_targets(model, CLEAN)
    assert np.abs(want).max() > 1e-3
    return want


def test_patching_every_edge_into_an_mlp_runs_it_on_the_corrupted_stream(edges_models):
    """Every edge into ``m1`` patched: the MLP reads the corrupted run's stream there, and the
    rest of the clean run goes on from what it returns (a loop with one forward hook)."""
    model = edges_models["llama"]
    every = _all_edges(ax.edge_attribution_patching(model, CLEAN, TARGET, **KW))
    got = ax.edge_patching(model, CLEAN, TARGET, patch=[e for e in every if e[1] == "m1"], **KW)
    hf = model.hf
    norm = hf.model.layers[1].post_attention_layernorm
    seen = {}
    ids = {
        t: model.tokenizer(t + TARGET, return_tensors="pt")["input_ids"] for t in (CLEAN, CORRUPTED)
    }
    handle = norm.register_forward_pre_hook(lambda _m, a: seen.update(x=a[0].clone()))
    with torch.no_grad():
        hf(input_ids=ids[CORRUPTED])
    handle.remove()
    handle = norm.register_forward_pre_hook(lambda _m, a: (seen["x"], *a[1:]))
    want = _hooked_effect(model, [handle])
    np.testing.assert_allclose(got.values, want, rtol=1e-7, atol=1e-10)


def test_a_normed_attentions_heads_patched_together_go_through_its_norm_together(edges_models):
    """Gemma 2 norms each attention's output: with every edge from layer 0's heads into ``m1``
    patched, the MLP reads the stream with that norm of the corrupted run's attention output
    in place of the clean one's (o_proj has no bias: the heads are the whole output), as a
    loop with forward hooks makes it; two heads patched are not the sum of each alone."""
    model = edges_models["gemma2"]
    hf = model.hf
    every = _all_edges(ax.edge_attribution_patching(model, CLEAN, TARGET, **KW))
    into = [e for e in every if e[1] == "m1" and e[0].startswith("a0.")]
    assert len(into) == hf.config.num_attention_heads
    got = ax.edge_patching(model, CLEAN, TARGET, patch=into, **KW)
    post = hf.model.layers[0].post_attention_layernorm
    mlp_norm = hf.model.layers[1].pre_feedforward_layernorm
    ids = {
        t: model.tokenizer(t + TARGET, return_tensors="pt")["input_ids"] for t in (CLEAN, CORRUPTED)
    }
    seen = {}
    handle = post.register_forward_pre_hook(lambda _m, a: seen.update(bad=a[0].clone()))
    with torch.no_grad():
        hf(input_ids=ids[CORRUPTED])
    handle.remove()
    handles = [
        post.register_forward_hook(lambda _m, a, out: seen.update(clean=out.clone())),
        mlp_norm.register_forward_pre_hook(
            lambda _m, a: (a[0] - seen["clean"] + post.forward(seen["bad"]), *a[1:])
        ),
    ]
    want = _hooked_effect(model, handles)
    np.testing.assert_allclose(got.values, want, rtol=1e-7, atol=1e-10)
    # the norm is not linear: each head alone does not add up to them together
    alone = ax.edge_patching(model, CLEAN, TARGET, patch=[[e] for e in into], **KW)
    assert np.abs(alone.sum("circuit").values - want).max() > 1e-3


@pytest.mark.parametrize("arch", list(ENCODERS))
def test_an_encoder_classifiers_edges_patched_for_real(arch):
    """Pre-norm (ModernBERT) and post-norm (BERT, DistilBERT) encoders: one edge a copy against
    the loop's real patch of it (the clean run with the sender's whole difference on the
    receiver's input; through each LayerNorm between them, post-norm), each class a target;
    keeping no edge is the corrupted run, keeping all of them the clean one."""
    from tests.test_edges import _edge_hook, _nodes, _run, _shift

    model = encoder_classifier(arch)
    hf, tok = model.hf, model.tokenizer
    text, bad = ENCODER_TEXTS
    kw = {"corrupted": bad, "objective": "logit"}
    estimates = ax.edge_attribution_patching(model, text, [0, 2], **kw)
    edges = _all_edges(estimates)[::5]
    got = ax.edge_patching(model, text, [0, 2], patch=[[e] for e in edges], **kw)
    embed = hf.get_input_embeddings()
    with torch.no_grad():
        clean_e, bad_e = (embed(torch.tensor(tok(t)["input_ids"]))[None] for t in (text, bad))
        before, after = _nodes(model, clean_e), _nodes(model, bad_e)
        base = _run(model, clean_e, [])[0, [0, 2]]
        want = []
        for sender, receiver in edges:
            kept, shift = _shift(model, sender, after[sender] - before[sender], 1.0, receiver)
            patched = _run(model, clean_e, [*kept, *_edge_hook(model, receiver, shift)])
            want.append((patched[0, [0, 2]] - base).numpy())
    expected = np.stack(want, -1)
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(got.values, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())
    every = _all_edges(estimates)
    ends = ax.edge_patching(model, text, [0, 2], circuit=[[], every], **kw)
    with torch.no_grad():
        corrupted = _run(model, bad_e, [])[0, [0, 2]]
    np.testing.assert_allclose(ends.sel(circuit=0).values, (corrupted - base).numpy(), rtol=1e-7,
                               atol=1e-9)  # fmt: skip
    np.testing.assert_allclose(ends.sel(circuit=1).values, 0.0, atol=1e-9)


def test_every_edge_into_a_post_norm_mlp_patched_runs_it_on_the_corrupted_stream():
    """BERT: with every edge into ``m1`` patched, the MLP reads the corrupted run's stream
    there (each sender's difference carried through the LayerNorms below it together), and
    the clean run goes on from what it returns: a loop with one forward hook; a few of them
    patched are not the sum of each alone."""
    model = encoder_classifier("bert")
    hf, tok = model.hf, model.tokenizer
    text, bad = ENCODER_TEXTS
    kw = {"corrupted": bad, "objective": "logit"}
    every = _all_edges(ax.edge_attribution_patching(model, text, [0, 2], **kw))
    into = [e for e in every if e[1] == "m1"]
    got = ax.edge_patching(model, text, [0, 2], patch=into, **kw)
    mlp = hf.bert.encoder.layer[1].intermediate
    ids = {t: tok(t, return_tensors="pt")["input_ids"] for t in (text, bad)}
    seen = {}
    handle = mlp.register_forward_pre_hook(lambda _m, a: seen.update(x=a[0].clone()))
    with torch.no_grad():
        hf(input_ids=ids[bad])
    handle.remove()
    handle = mlp.register_forward_pre_hook(lambda _m, a: (seen["x"], *a[1:]))
    try:
        with torch.no_grad():
            patched = hf(input_ids=ids[text]).logits[0, [0, 2]]
    finally:
        handle.remove()
    with torch.no_grad():
        clean = hf(input_ids=ids[text]).logits[0, [0, 2]]
    want = (patched - clean).numpy()
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got.values, want, rtol=1e-7, atol=1e-10)
    alone = ax.edge_patching(model, text, [0, 2], patch=[[e] for e in into], **kw)
    assert np.abs(alone.sum("circuit").values - want).max() > 1e-3


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_every_edge_out_of_a_post_norm_head_patched_is_its_output_patched(arch):
    """Every edge out of head 2 of layer 1 patched, with and without every edge out of the
    first MLP: each receiver sees their corrupted outputs through the LayerNorms between them,
    the rest of the run going on from the receivers' own outputs, which is the clean run with
    those nodes' outputs replaced by the corrupted run's (forward hooks on the model)."""
    model = encoder_classifier(arch)
    hf, tok = model.hf, model.tokenizer
    text, bad = ENCODER_TEXTS
    kw = {"corrupted": bad, "objective": "logit"}
    every = _all_edges(ax.edge_attribution_patching(model, text, [0, 2], **kw))
    head = [e for e in every if e[0] == "a1.h2"]
    mlp = [e for e in every if e[0] == "m0"]
    got = ax.edge_patching(model, text, [0, 2], patch=[head, head + mlp], **kw)
    base = hf.bert.encoder.layer if arch == "bert" else hf.distilbert.transformer.layer
    proj = base[1].attention.output.dense if arch == "bert" else base[1].attention.out_lin
    out = base[0].output.dense if arch == "bert" else base[0].ffn
    ids = {t: tok(t, return_tensors="pt")["input_ids"] for t in (text, bad)}
    width = hf.config.hidden_size // 4 if arch == "bert" else hf.config.dim // 4
    seen = {}
    handles = [proj.register_forward_pre_hook(lambda _m, a: seen.update(z=a[0].clone())),
               out.register_forward_hook(lambda _m, a, o: seen.update(m=o.clone()))]  # fmt: skip
    with torch.no_grad():
        hf(input_ids=ids[bad])
    for h in handles:
        h.remove()

    def swap_head(_m, a):
        z = a[0].clone()
        z[..., 2 * width : 3 * width] = seen["z"][..., 2 * width : 3 * width]
        return (z, *a[1:])

    want = []
    with torch.no_grad():
        clean = hf(input_ids=ids[text]).logits[0, [0, 2]]
        for with_mlp in (False, True):
            hooks = [proj.register_forward_pre_hook(swap_head)]
            if with_mlp:
                hooks.append(out.register_forward_hook(lambda _m, a, o: seen["m"]))
            try:
                want.append((hf(input_ids=ids[text]).logits[0, [0, 2]] - clean).numpy())
            finally:
                for h in hooks:
                    h.remove()
    want = np.stack(want, -1)
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got.values, want, rtol=1e-7, atol=1e-10)


def test_a_model_of_a_known_type_laid_out_otherwise_is_refused():
    """A remote-code model whose type is BERT's but whose blocks are not: a ModelError."""
    model = encoder_classifier("bert")
    for layer in model.hf.bert.encoder.layer:
        layer.feed_forward = layer.intermediate
        del layer.intermediate
    with pytest.raises(ax.ModelError, match="intermediate"):
        ax.edge_patching(model, "the plot was good", 0, corrupted="the story was good",
                         patch=[])  # fmt: skip


@pytest.mark.parametrize("arch", ["gpt2", "gemma2", "bert", "deberta-v3"])
def test_circuits_batched_in_copies_equal_each_alone(edges_models, arch):
    """Copies of the batch in one forward, each its own circuit (past a norm on a sublayer's
    output, Gemma 2; through a post-norm model's LayerNorms, BERT), equal each alone."""
    if arch in ENCODERS:
        model = encoder_classifier(arch)
        (text, bad), targets = ENCODER_TEXTS, [0, 2]
        kw = {"corrupted": bad, "objective": "logit"}
    else:
        model, text, targets, kw = edges_models[arch], CLEAN, TARGET, KW
    scores = ax.edge_attribution_patching(model, text, targets, **kw)
    circuits = ax.top_edges(scores, [3, 12, 40])
    together = ax.edge_patching(model, text, targets, circuit=circuits, **kw)
    one_a_forward = ax.edge_patching(model, text, targets, circuit=circuits, batch_size=1, **kw)
    np.testing.assert_allclose(one_a_forward.values, together.values, rtol=1e-9, atol=1e-12)
    for c, edges in enumerate(circuits):
        alone = ax.edge_patching(model, text, targets, circuit=edges, **kw)
        assert alone.dims == ("target",)
        np.testing.assert_allclose(alone.values, together.sel(circuit=c).values, rtol=1e-9,
                                   atol=1e-12)  # fmt: skip
    assert list(together.edges.values) == [3, 12, 40]


@pytest.mark.parametrize("arch", ["llama", "opt", "deepseek_v3"])
def test_a_padded_batch_equals_each_example_alone(edges_models, arch):
    model = edges_models[arch]
    inputs, corrupted = [CLEAN, "The capital is"], [CORRUPTED, "A capital is"]
    every = _all_edges(ax.edge_attribution_patching(model, CLEAN, TARGET, **KW))
    circuit = [e for e in every if not e[0].startswith("a0")]  # layer 0's heads patched
    batched = ax.edge_patching(model, inputs, [TARGET, " d"], corrupted=corrupted,
                               circuit=circuit, objective="logit")  # fmt: skip
    for i, (text, bad, target) in enumerate(zip(inputs, corrupted, [TARGET, " d"], strict=True)):
        one = ax.edge_patching(model, text, target, corrupted=bad, circuit=circuit,
                               objective="logit")  # fmt: skip
        got = batched.isel(example=i).dropna("target", how="all")
        np.testing.assert_allclose(got.values, one.values, rtol=1e-9, atol=1e-12)
        assert np.abs(one.values).max() > 1e-4


def test_an_ablation_keeping_every_edge_is_the_clean_run(edges_models):
    model = edges_models["gpt2"]
    kw = {"corrupted": ax.Ablation("mean"), "objective": "logit"}
    every = _all_edges(ax.edge_attribution_patching(model, CLEAN, TARGET, **kw))
    got = ax.edge_patching(model, CLEAN, TARGET, circuit=[every, every[:20]], **kw)
    np.testing.assert_allclose(got.sel(circuit=0).values, 0.0, atol=1e-9)
    assert np.abs(got.sel(circuit=1).values).max() > 1e-3


def test_top_edges_ranks_the_summed_estimates_by_size(edges_models):
    model = edges_models["gpt2"]
    scores = ax.edge_attribution_patching(model, CLEAN, TARGET, **KW)
    summed = np.nansum(scores.values, axis=0)  # over the targets
    real = np.isfinite(scores.values[0])
    names = [(str(s), str(r)) for s in scores.sender.values for r in scores.receiver.values]
    ranked = sorted(
        (i for i in range(len(names)) if real.ravel()[i]), key=lambda i: -abs(summed.ravel()[i])
    )
    assert ax.top_edges(scores, 7) == [names[i] for i in ranked[:7]]
    assert ax.top_edges(scores, [0, 2]) == [[], [names[i] for i in ranked[:2]]]
    assert len(ax.top_edges(scores, len(ranked))) == len(ranked)


def _nodes_of(scores):
    """``nodes_of(receiver)``: the senders whose input the receiver is (None: the logits), read
    from the names alone."""
    senders = [str(x) for x in scores.sender.values]
    receivers = [str(x) for x in scores.receiver.values]
    heads = 1 + max(int(x.split(".h")[1]) for x in senders if x.startswith("a"))
    kv = 1 + max(int(x.split(".h")[1].split("<")[0]) for x in receivers if x.endswith("<k>"))

    def nodes_of(receiver):
        if receiver == "logits":
            return None
        if receiver.startswith("m"):
            return {receiver}
        layer, head = receiver[1:].split("<")[0].split(".h")
        if receiver.endswith("<q>"):
            return {f"a{layer}.h{head}"}
        return {f"a{layer}.h{h}" for h in range(heads) if h // (heads // kv) == int(head)}

    return nodes_of


def _naive_greedy(scores, n):
    """Hanna et al.'s greedy circuit, by scanning every edge a step: the edge of largest
    absolute summed estimate whose receiver is the logits or an input of a node (head, MLP) an
    edge already chosen leaves; ties in the scores' order."""
    summed = np.nansum(scores.values, axis=0)
    real = np.isfinite(scores.values[0])
    senders = [str(x) for x in scores.sender.values]
    receivers = [str(x) for x in scores.receiver.values]
    nodes_of = _nodes_of(scores)
    joined, chosen = set(), []
    while len(chosen) < n:
        best = None
        for u, sender in enumerate(senders):
            for v, receiver in enumerate(receivers):
                if not real[u, v] or (sender, receiver) in chosen:
                    continue
                into = nodes_of(receiver)
                if into is not None and not into & joined:
                    continue
                if best is None or abs(summed[u, v]) > abs(summed[best]):
                    best = (u, v)
        chosen.append((senders[best[0]], receivers[best[1]]))
        joined.add(senders[best[0]])
    return chosen


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_circuits_grow_from_the_logits(edges_models, arch):
    model = edges_models[arch]  # Llama: 4 query heads over 2 key/value heads
    scores = ax.edge_attribution_patching(model, CLEAN, TARGET, **KW)
    for n in (1, 12, 40):
        assert ax.top_edges(scores, n, greedy=True) == _naive_greedy(scores, n)
    every = len(_all_edges(scores))
    grown = ax.top_edges(scores, [3, every], greedy=True)
    assert grown[0] == grown[1][:3] and sorted(grown[1]) == sorted(_all_edges(scores))
    assert ax.top_edges(scores, 3, greedy=True) != ax.top_edges(scores, 3)  # a search of its own


def _on_a_path(scores, edges):
    """The edges that lie on a path of ``edges`` from the input to the logits: a depth-first
    search from each edge's receiver to the logits and back from its sender to the input."""
    nodes_of = _nodes_of(scores)

    def to_logits(node, seen=()):
        for s, r in edges:
            if s == node and (r == "logits" or any(
                w not in seen and to_logits(w, (*seen, w)) for w in nodes_of(r)
            )):  # fmt: skip
                return True
        return False

    def from_input(node, seen=()):
        if node == "input":
            return True
        return any(
            node in (nodes_of(r) or ()) and s not in seen and from_input(s, (*seen, s))
            for s, r in edges
        )

    return [
        (s, r) for s, r in edges
        if from_input(s) and (r == "logits" or any(to_logits(w) for w in nodes_of(r)))
    ]  # fmt: skip


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_connected_circuits_keep_the_edges_on_a_path_and_their_effect(edges_models, arch):
    """``connected=True`` keeps the edges a search of the test's own finds on an input-to-logits
    path, and edge patching gives the pruned circuit exactly the whole one's effect."""
    model = edges_models[arch]
    scores = ax.edge_attribution_patching(model, CLEAN, TARGET, **KW)
    pruned_some = False
    for greedy in (False, True):
        whole = ax.top_edges(scores, [4, 10, 30], greedy=greedy)
        kept = ax.top_edges(scores, [4, 10, 30], greedy=greedy, connected=True)
        for full, part in zip(whole, kept, strict=True):
            assert part == _on_a_path(scores, full)
            pruned_some |= len(part) < len(full)
        effects = ax.edge_patching(
            model, CLEAN, TARGET, corrupted=CORRUPTED, objective="logit", circuit=whole + kept
        )
        np.testing.assert_allclose(effects.values[:, :3], effects.values[:, 3:], atol=1e-5)
    assert pruned_some  # the test can tell
    with pytest.raises(ax.OptionError, match="`connected`"):
        ax.top_edges(scores, 3, connected="yes")


def test_connected_circuits_under_an_ablation_keep_what_reads_ablated_inputs():
    """Under a mean ablation a node cut from the input writes a function of ablated inputs, not
    its ablated output: only the edges that reach no output may go (pruning those cut from
    the input too changed the effect by 1.4 on the built-in model)."""
    model = ax.load_model()
    kw = {"corrupted": ax.Ablation("mean"), "objective": "logit"}
    scores = ax.edge_attribution_patching(model, "1 2 3 =", " 3 2 1", **kw)
    sizes = [5, 10, 20, 40]
    whole = ax.top_edges(scores, sizes)
    kept = ax.top_edges(scores, sizes, connected=True)
    effects = ax.edge_patching(model, "1 2 3 =", " 3 2 1", circuit=whole + kept, **kw)
    np.testing.assert_allclose(effects.values[:, :4], effects.values[:, 4:], atol=1e-5)
    nodes_of = _nodes_of(scores)
    for full, part in zip(whole, kept, strict=True):  # none cut from the output is kept
        out = [e for e in full if e[1] == "logits" or any(
            w in {s for s, _ in _on_a_path_to_logits(full, nodes_of)} for w in nodes_of(e[1])
        )]  # fmt: skip
        assert part == out
    # names it needs, and scores without the layer coordinates still rank
    bare = scores.reset_coords(drop=True)
    assert ax.top_edges(bare, 5) == ax.top_edges(scores, 5)
    with pytest.raises(ax.InputError, match="`input` sender to the `logits` receiver"):
        ax.top_edges(scores.isel(receiver=slice(0, -1)), 5, connected=True)


def _on_a_path_to_logits(edges, nodes_of):
    """The edges from which a path of ``edges`` reaches the logits."""
    alive, found = set(), True
    while found:
        found = False
        for s, r in edges:
            if s not in alive and (r == "logits" or any(w in alive for w in nodes_of(r))):
                alive.add(s)
                found = True
    return [(s, r) for s, r in edges if s in alive]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"patch": [("a9.h0", "logits")]}, "no sender 'a9.h0'"),
        ({"patch": [("input", "m7")]}, "no receiver 'm7'"),
        ({"patch": [("m1", "a0.h0<q>")]}, "there is no edge"),
        ({"patch": [("a0.h0", "m0")], "circuit": []}, "exactly one of `circuit`"),
        ({}, "exactly one of `circuit`"),
        ({"patch": "a0.h0"}, "`patch` must be a list of edges"),
        ({"circuit": [["input", "logits"], "m0"]}, r"`circuit`\[1\]"),
        ({"circuit": [[], ["input", "logits"]]}, r"`circuit`\[0\].*read as one set"),
        ({"patch": [], "chunk_size": 2}, "chunk_size"),
    ],
)
def test_bad_edges_are_clear_errors(edges_models, options, match):
    with pytest.raises(ax.OptionError, match=match):
        ax.edge_patching(edges_models["gpt2"], CLEAN, TARGET, corrupted=CORRUPTED, **options)


def test_top_edges_refuses_what_it_cannot_rank(edges_models):
    scores = ax.edge_attribution_patching(edges_models["gpt2"], CLEAN, TARGET, **KW)
    with pytest.raises(ax.OptionError, match="`n` must be a whole number of edges from 0"):
        ax.top_edges(scores, 10**6)
    with pytest.raises(ax.OptionError, match="`n`"):
        ax.top_edges(scores, [2, -1])
    for bad in (5.0, None, np.float64(2)):
        with pytest.raises(ax.OptionError, match="`n` must be a whole number"):
            ax.top_edges(scores, bad)
    saliency = ax.saliency(edges_models["gpt2"], CLEAN, TARGET)
    with pytest.raises(ax.InputError, match="`sender` and `receiver` dims"):
        ax.top_edges(saliency, 3)


def test_the_cli_patches_the_edges_given(tmp_path, capsys):
    path = save_tiny_model("gpt2", tmp_path / "model")
    out = tmp_path / "patched.nc"
    code = main([
        "attribute", "--method", "edge_patching", "--model", str(path), "--input", CLEAN,
        "--target", TARGET, "-o", f"corrupted={json.dumps(CORRUPTED)}", "-o",
        'patch=[["input", "a1.h0<v>"]]', "-o", "objective=logit", "--out", str(out),
    ])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed
    da = ax.load(out)
    assert da.dims == ("target",) and abs(float(da[0])) > 1e-6
    assert (
        f"target {int(da.target[0])} {str(da.target_token.values[0])!r}: {float(da[0]):+.4g}"
        in printed.out
    )
    code = main([
        "attribute", "--method", "edge_patching", "--model", str(path), "--input", CLEAN,
        "--target", TARGET, "-o", f"corrupted={json.dumps(CORRUPTED)}", "-o",
        'patch=[["m1", "a0.h0<q>"]]',
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "there is no edge" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_decoder_only_classifiers_circuits(arch):
    """Every class a target: keeping no edge is the corrupted text's logits, keeping all the
    clean one's (plain forwards of the classifier)."""
    hf, tok = tiny_classifier(arch)
    model = ax.load_model(full_double(hf), tokenizer=tok)
    kw = {"corrupted": "a good dog", "objective": "logit"}
    every = _all_edges(ax.edge_attribution_patching(model, "a bad day", [0, 1], **kw))
    got = ax.edge_patching(model, "a bad day", [0, 1], circuit=[[], every], **kw)
    with torch.no_grad():
        logits = {
            t: hf(**tok(t, return_tensors="pt")).logits[0].numpy()
            for t in ("a bad day", "a good dog")
        }
    want = (logits["a good dog"] - logits["a bad day"])[[0, 1]]
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got.sel(circuit=0).values, want, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(got.sel(circuit=1).values, 0.0, atol=1e-10)


def test_a_budget_too_small_is_refused_before_the_model_runs(edges_models, monkeypatch):
    model = edges_models["gpt2"]

    def boom(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(model.hf, "forward", boom)
    with pytest.raises(ax.OptionError, match="`max_memory` of 1 B cannot be met"):
        ax.edge_patching(model, CLEAN, TARGET, patch=[], max_memory=1, **KW)


def test_the_cli_prints_a_reduction_without_targets(tmp_path, capsys):
    path = save_tiny_model("gpt2", tmp_path / "model")
    code = main([
        "attribute", "--method", "edge_patching", "--model", str(path), "--input", CLEAN,
        "--target", TARGET, "-o", f"corrupted={json.dumps(CORRUPTED)}", "-o",
        'circuit=[[["input", "a1.h0<v>"]], []]', "--reduce", "sum:target",
    ])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed
    assert "result dims (circuit: 2)" in printed.out


# --- circuit faithfulness (MIB) ---------------------------------------------------------------


def _naive_faithfulness(model, scores, text, target, corrupted, fractions):
    """Per target and fraction, as MIB's evaluation computes it, loop by loop: the circuit of
    the ``floor(f * N)`` edges of largest absolute summed estimate, its score by edge patching
    alone, normalised between the corrupted run and the clean one, both by plain forwards."""
    summed = scores.sum("target", skipna=True, min_count=1)
    ranked = []
    for s in summed.sender.values:
        for r in summed.receiver.values:
            value = float(summed.sel(sender=s, receiver=r))
            if np.isfinite(value):
                ranked.append((-abs(value), len(ranked), (str(s), str(r))))
    ranked.sort()
    clean, bad = _logits_at_targets(model, text), _logits_at_targets(model, corrupted)
    empty = bad - clean
    curve = []
    for f in fractions:
        count = int(np.floor(round(f * len(ranked), 9)))
        circuit = [edge for _, _, edge in ranked[:count]]
        effect = ax.edge_patching(model, text, target, corrupted=corrupted, circuit=circuit,
                                  objective="logit").values  # fmt: skip
        curve.append((effect - empty) / -empty)
    return np.stack(curve, -1), empty  # [K, F], [K]


def _trapezoid(x, y):
    return sum((x[i + 1] - x[i]) * (y[..., i] + y[..., i + 1]) / 2 for i in range(len(x) - 1))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_circuit_faithfulness_is_mibs_curve_and_areas(edges_models, arch):
    model = edges_models[arch]
    scores = ax.edge_attribution_patching(model, CLEAN, TARGET, **KW)
    fractions = [0.01, 0.05, 0.2, 0.5, 1.0]
    da = ax.circuit_faithfulness(model, scores, CLEAN, TARGET, fractions=fractions, **KW)
    assert da.dims == ("target", "fraction")
    want, empty = _naive_faithfulness(model, scores, CLEAN, TARGET, CORRUPTED, fractions)
    np.testing.assert_allclose(da.empty.values, empty, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(da.values, want, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(da.cpr.values, _trapezoid(fractions, want), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(da.cmd.values, _trapezoid(fractions, np.abs(1 - want)), rtol=1e-6,
                               atol=1e-9)  # fmt: skip
    # keeping every edge is the clean run; the circuits grow as their counts say
    np.testing.assert_allclose(da.isel(fraction=-1).values, 1.0, atol=1e-9)
    total = int(np.isfinite(scores.sum("target", skipna=True, min_count=1).values).sum())
    assert list(da.edges.values) == [int(np.floor(round(f * total, 9))) for f in fractions]
    assert np.abs(da.values[:, 1:-1] - 1).max() > 1e-3  # the partial circuits recover less


def test_circuit_areas_normalise_the_mean_effects_as_mib_does(edges_models):
    """Over several examples and targets: the effects averaged first, then normalised (not the
    mean of each target's faithfulness), then the areas."""
    model = edges_models["gpt2"]
    inputs, corrupted = [CLEAN, "The capital is"], [CORRUPTED, "A capital is"]
    kw = {"corrupted": corrupted, "objective": "logit"}
    scores = ax.edge_attribution_patching(model, inputs, [TARGET, " d"], **kw)
    fractions = [0.02, 0.1, 0.5, 1.0]
    da = ax.circuit_faithfulness(model, scores, inputs, [TARGET, " d"], fractions=fractions, **kw)
    assert da.dims == ("example", "target", "fraction")
    areas = ax.circuit_areas(da)
    effect = np.nanmean(da.effect.values.reshape(-1, len(fractions)), 0)
    empty = np.nanmean(da.empty.values)
    curve = (effect - empty) / -empty
    np.testing.assert_allclose(areas.faithfulness.values, curve, rtol=1e-9)
    np.testing.assert_allclose(float(areas.cpr), _trapezoid(fractions, curve), rtol=1e-9)
    np.testing.assert_allclose(float(areas.cmd), _trapezoid(fractions, np.abs(1 - curve)),
                               rtol=1e-9)  # fmt: skip
    # per example: its own effects averaged over its targets
    by_example = ax.circuit_areas(da, "target")
    for i in range(2):
        one = da.isel(example=i)
        mine = (np.nanmean(one.effect.values, 0) - np.nanmean(one.empty.values)) / -np.nanmean(
            one.empty.values
        )
        np.testing.assert_allclose(by_example.faithfulness.isel(example=i).values, mine,
                                   rtol=1e-9)  # fmt: skip
    # each example's curve, alone, is its own call's
    alone = ax.circuit_faithfulness(model, scores, CLEAN, TARGET, fractions=fractions,
                                    corrupted=CORRUPTED, objective="logit")  # fmt: skip
    got = da.isel(example=0).dropna("target", how="all")
    np.testing.assert_allclose(got.values, alone.values, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"fractions": [0.5]}, "two or more increasing fractions"),
        ({"fractions": [0.5, 0.2]}, "two or more increasing fractions"),
        ({"fractions": [0.0, 1.0]}, r"in \(0, 1\]"),
        ({"greedy": 1}, "`greedy` must be a bool, got 1"),
        ({"dims": "layer"}, "has no option 'dims'"),
    ],
)
def test_bad_circuit_faithfulness_options_are_clear_errors(edges_models, options, match):
    model = edges_models["gpt2"]
    scores = ax.edge_attribution_patching(model, CLEAN, TARGET, **KW)
    with pytest.raises(ax.OptionError, match=match):
        ax.circuit_faithfulness(model, scores, CLEAN, TARGET, **KW, **options)


def test_circuit_faithfulness_refuses_what_is_no_edge_estimate(edges_models):
    model = edges_models["gpt2"]
    saliency = ax.saliency(model, CLEAN, TARGET)
    with pytest.raises(ax.InputError, match="`scores` must be a DataArray with `sender`"):
        ax.circuit_faithfulness(model, saliency, CLEAN, TARGET, **KW)
    with pytest.raises(ax.InputError, match=r"ax\.circuit_faithfulness.s result"):
        ax.circuit_areas(saliency)
    da = ax.circuit_faithfulness(model, ax.edge_attribution_patching(model, CLEAN, TARGET, **KW),
                                 CLEAN, TARGET, fractions=[0.5, 1.0], **KW)  # fmt: skip
    with pytest.raises(ax.OptionError, match=r"`dims` \['fraction'\] must name distinct dims"):
        ax.circuit_areas(da, "fraction")


def test_circuit_faithfulness_counts_the_models_edges_and_has_none_without_a_change(
    edges_models, tmp_path
):
    """Scores of some edges only (or another model's) would count other fractions: refused.
    A corruption that changes nothing has no faithfulness (NaN, not inf). The areas save."""
    model = edges_models["gpt2"]
    scores = ax.edge_attribution_patching(model, CLEAN, TARGET, **KW)
    with pytest.raises(ax.InputError, match=r"`scores` estimates .* its graph has 46"):
        ax.circuit_faithfulness(model, scores.isel(receiver=slice(0, 5)), CLEAN, TARGET, **KW)
    with pytest.raises(ax.InputError, match="`scores` estimates"):
        ax.circuit_faithfulness(edges_models["llama"], scores, CLEAN, TARGET, **KW)
    same = ax.circuit_faithfulness(model, scores, CLEAN, TARGET, corrupted=CLEAN,
                                   objective="logit", fractions=[0.5, 1.0])  # fmt: skip
    assert np.isnan(same.values).all() and not np.isinf(same.values).any()
    da = ax.circuit_faithfulness(model, scores, CLEAN, TARGET, fractions=[0.2, 1.0], **KW)
    areas = ax.circuit_areas(da)
    ax.save(areas, tmp_path / "areas.nc")
    assert areas.attrs["over"] == "target" and areas.attrs["method"] == "circuit_faithfulness"
    # averaged over nothing: each target's own curve and areas
    each = ax.circuit_areas(da, [])
    np.testing.assert_allclose(each.cpr.values, da.cpr.values, rtol=1e-9)
    np.testing.assert_allclose(each.faithfulness.values, da.values, rtol=1e-9)
    for bad in (1, ["target", "target"]):
        with pytest.raises(ax.OptionError, match="`dims`"):
            ax.circuit_areas(da, bad)
