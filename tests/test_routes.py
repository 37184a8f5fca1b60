"""Information flow routes against a naive reference written here: every part of every sum
built by hand per layer, head, query and source (hooks on the HF model, plain loops), the graph
as a dict of named nodes and the routes by a depth-first search from each prediction's node."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from matplotlib.collections import LineCollection

import attrax as ax
from attrax import _memory, _routes
from attrax.cli import main
from attrax.testing import tiny_classifier, tiny_model
from tests.test_components import neighbour, output_norms
from tests.test_mixing import (
    _encoder,
    _falcon,
    _fused,
    after_attention,
    attention_of,
    blocks,
    ids_and_queries,
    is_bert,
    output_projection,
    post_norm,
    project,
    value_parts,
)

PROMPT, TARGET = "The capital of France is", " Paris."


@pytest.fixture(scope="module")
def models() -> dict[str, ax.Model]:
    built = {}
    for arch in ("gpt2", "llama"):
        hf, tok = tiny_model(arch)
        built[arch] = ax.load_model(hf.double(), tokenizer=tok)
    hf, tok = tiny_classifier("bert")
    built["bert"] = ax.load_model(hf.double(), tokenizer=tok)
    return built


def second_norm(block) -> torch.nn.Module:
    """A post-norm block's LayerNorm after its MLP's residual sum."""
    if hasattr(block, "output_layer_norm"):  # DistilBERT
        return block.output_layer_norm
    return block.output.LayerNorm


def proximity(parts: torch.Tensor, y: torch.Tensor, renormalize: float = 0.0) -> torch.Tensor:
    """Weights of parts [n, d] of the sum y [d]: max(0, |y|_1 - |y - c|_1), over their sum;
    with ``renormalize``, those at or below it set to 0 and the rest divided again."""
    scores = torch.stack([torch.clamp(y.abs().sum() - (y - c).abs().sum(), min=0) for c in parts])
    weights = scores / scores.sum()
    if renormalize:
        kept = torch.tensor(
            [float(w) if w > renormalize else 0.0 for w in weights], dtype=weights.dtype
        )
        weights = kept / kept.sum() if kept.sum() > 0 else kept
    return weights


def naive_graph(
    model: ax.Model, ids: torch.Tensor, renormalize: float = 0.0, parallel: bool = False
) -> tuple[dict, dict]:
    """Edge weights of the whole graph, named nodes: ``X{l}_{i}`` a block's input,
    ``A{l}_{i}`` the stream after its attention, ``M{l}_{i}`` its MLP, ``X{l+1}_{i}`` its
    output; each sum's parts built by hand and checked to add up to the model's own value.
    ``parallel``: blocks whose MLP reads their input beside the attention (checked: the MLP's
    input is a norm of the block's input); every part then goes into the block's output, no
    ``A`` node. Also each attention part's own weight: ``(layer, i, j, h)`` per head,
    ``(layer, i)`` the residual's."""
    hf = model.hf
    attended, outputs, normed_in, mlp_in, mlp_out = [], [], [], [], []

    def keep(store):
        def hook(_m, args, out=None):
            value = args[0] if out is None else out
            # a copy: Falcon adds the attention's output into its MLP's in place
            store.append((value[0] if isinstance(value, tuple) else value).clone())

        return hook

    handles = []
    for block in blocks(model):
        if is_bert(model):
            handles.append(post_norm(block)[2].register_forward_hook(keep(attended)))
            handles.append(second_norm(block).register_forward_pre_hook(keep(normed_in)))
        else:
            handles.append(attention_of(block).register_forward_hook(keep(attended)))
            handles.append(block.register_forward_hook(keep(outputs)))
        if parallel:
            handles.append(block.mlp.register_forward_pre_hook(keep(mlp_in)))
            handles.append(block.mlp.register_forward_hook(keep(mlp_out)))
    with torch.no_grad():
        out = hf(input_ids=ids, output_attentions=True, output_hidden_states=True)
    for handle in handles:
        handle.remove()
    edges: dict[tuple[str, str], float] = {}
    parts_of: dict[tuple[int, ...], float] = {}

    def add(u: str, v: str, w: float) -> None:
        edges[u, v] = edges.get((u, v), 0.0) + w

    length = ids.shape[1]
    for layer, block in enumerate(blocks(model)):
        x = out.hidden_states[layer][0]
        attn = out.attentions[layer][0]
        heads = attn.shape[0]
        with torch.no_grad():
            v = value_parts(model, block, x[None])
            hd = v.shape[-1]
            mids = []
            for i in range(length):
                parts = []
                for j in range(length):
                    for h in range(heads):
                        z = torch.zeros(heads * hd, dtype=x.dtype)
                        z[h * hd : (h + 1) * hd] = attn[h, i, j] * v[j, h]
                        parts.append(
                            project(model, block, z) * after_attention(block, attended[layer], i)
                        )
                parts.append(x[i])
                if parallel:  # the MLP's output, of a norm of the block's input
                    parts.append(mlp_out[layer][0, i])
                parts = torch.stack(parts)
                proj = output_projection(model, block)
                branch = getattr(block, "residual_multiplier", 1.0)  # Granite
                bias = branch * proj.bias if proj.bias is not None else 0
                if is_bert(model):  # through the LayerNorm, linear at the output's scale
                    _, ln, _ = post_norm(block)
                    pre = parts.sum(0) + bias
                    sigma = torch.sqrt(pre.var(unbiased=False) + ln.eps)
                    parts = ln.weight * (parts - parts.mean(-1, keepdim=True)) / sigma
                    y = attended[layer][0, i]
                    bias_out = ln.weight * (bias - bias.mean()) / sigma + ln.bias
                    torch.testing.assert_close(parts.sum(0) + bias_out, y, rtol=1e-9, atol=1e-9)
                elif parallel:
                    y = outputs[layer][0, i]
                    torch.testing.assert_close(parts.sum(0) + bias, y, rtol=1e-9, atol=1e-9)
                    norms = [m for m in block.children() if "norm" in type(m).__name__.lower()]
                    assert any(  # side by side: the MLP reads the block's input
                        torch.allclose(n(x[i]), mlp_in[layer][0, i], atol=1e-9) for n in norms
                    )
                else:
                    own = attended[layer][0]
                    if output_norms(block) is not None:
                        own = output_norms(block)[0](own)
                    y = x[i] + branch * own[i]
                    torch.testing.assert_close(parts.sum(0) + bias, y, rtol=1e-9, atol=1e-9)
                mids.append(y)
                w = proximity(parts, y, renormalize)
                into = f"X{layer + 1}_{i}" if parallel else f"A{layer}_{i}"
                for j in range(length):
                    for h in range(heads):
                        parts_of[layer, i, j, h] = float(w[j * heads + h])
                    add(f"X{layer}_{j}", into, float(w[j * heads : (j + 1) * heads].sum()))
                add(f"X{layer}_{i}", into, float(w[length * heads]))
                parts_of[layer, i] = float(w[length * heads])
                if parallel:
                    add(f"X{layer}_{i}", f"M{layer}_{i}", float(w[-1]))
                    add(f"M{layer}_{i}", f"X{layer + 1}_{i}", float(w[-1]))
            for i in range(0 if parallel else length):
                mid = mids[i]
                if is_bert(model):
                    s = normed_in[layer][0, i]
                    ln = second_norm(block)
                    two = torch.stack([s - mid, mid])
                    sigma = torch.sqrt(s.var(unbiased=False) + ln.eps)
                    two = ln.weight * (two - two.mean(-1, keepdim=True)) / sigma
                    y = torch.nn.functional.layer_norm(s, s.shape, ln.weight, ln.bias, ln.eps)
                    torch.testing.assert_close(two.sum(0) + ln.bias, y, rtol=1e-9, atol=1e-9)
                else:
                    y = outputs[layer][0, i]
                    two = torch.stack([y - mid, mid])
                w = proximity(two, y, renormalize)
                add(f"A{layer}_{i}", f"M{layer}_{i}", float(w[0]))
                add(f"M{layer}_{i}", f"X{layer + 1}_{i}", float(w[0]))
                add(f"A{layer}_{i}", f"X{layer + 1}_{i}", float(w[1]))
    return edges, parts_of


def naive_route(edges: dict, top: str, threshold: float) -> set[tuple[str, str]]:
    """The edges above ``threshold`` a depth-first search reaches going down from ``top``."""
    below: dict[str, list[str]] = {}
    for (u, v), w in edges.items():
        if w > threshold:
            below.setdefault(v, []).append(u)
    route, stack, seen = set(), [top], {top}
    while stack:
        node = stack.pop()
        for u in below.get(node, []):
            route.add((u, node))
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return route


def check_routes(
    model: ax.Model, ids, queries, got, threshold: float, renormalize: float = 0.0
) -> None:
    """``got`` (per head where it has a ``head`` dim) against the reference's routes."""
    parallel = bool(got.parallel)
    edges, parts_of = naive_graph(model, ids, renormalize, parallel)
    layers = len(blocks(model))
    width = ids.shape[1]
    per_head = "head" in got.dims
    for k, q in enumerate(queries):
        route = naive_route(edges, f"X{layers}_{q}", threshold)
        seen = q + 1 if model.causal else width
        for layer in range(layers):
            flow = got.values[k, layer]
            residual = got.attention_residual.values[k, layer]
            for i in range(seen):
                for j in range(seen):
                    into = f"X{layer + 1}_{i}" if parallel else f"A{layer}_{i}"
                    on = (f"X{layer}_{j}", into) in route
                    if per_head:  # each head's own part of an edge on the route
                        want = [parts_of[layer, i, j, h] if on else 0 for h in range(len(flow))]
                        np.testing.assert_allclose(flow[:, i, j], want, rtol=0, atol=1e-9)
                    else:  # the edge as the graph has it (j = i: with the residual's part)
                        want = edges[f"X{layer}_{j}", into] if on else 0
                        assert flow[i, j] == pytest.approx(want, abs=1e-9), (layer, i, j)
                        assert (flow[i, j] > 0) == on  # on the route where above 0
                    if i == j:
                        want = parts_of[layer, i] if on else 0
                        assert residual[i] == pytest.approx(want, abs=1e-9)
                into = (f"M{layer}_{i}", f"X{layer + 1}_{i}")
                past = (f"A{layer}_{i}", f"X{layer + 1}_{i}")
                mlp = got.mlp.values[k, layer, i]
                assert mlp == (pytest.approx(edges[into], abs=1e-9) if into in route else 0)
                kept = got.mlp_residual.values[k, layer, i]
                assert kept == (pytest.approx(edges[past], abs=1e-9) if past in route else 0)
                assert not parallel or kept == 0  # no stream after the attention to go around
            assert np.isnan(flow[..., seen:, :]).all() and np.isnan(flow[..., seen:]).all()
            for name in ("attention_residual", "mlp", "mlp_residual"):
                assert np.isnan(got[name].values[k, layer, seen:]).all(), name


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
# at 0.5 one of each block output's two edges (the MLP's, the residual's) is dropped
@pytest.mark.parametrize("threshold", [0.0, 0.04, 0.2, 0.5])
@pytest.mark.parametrize("per_head", [False, True])
def test_routes_match_naive_graph_search(models, arch, threshold, per_head):
    model = models[arch]
    target = None if model.task != "generation" else TARGET
    ids, queries = ids_and_queries(model, PROMPT, target)
    got = ax.information_flow(model, PROMPT, target, threshold=threshold, per_head=per_head)
    assert got.dims == ("target", "layer", *(("head",) if per_head else ()), "query", "source")
    check_routes(model, ids, queries, got, threshold)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("per_head", [False, True])
def test_renormalized_routes_match_the_reference(models, arch, per_head):
    """Each node's parts at or below 0.05 dropped and the rest renormalized, then routes."""
    model = models[arch]
    target = None if model.task != "generation" else TARGET
    ids, queries = ids_and_queries(model, PROMPT, target)
    kw = {"threshold": 0.02, "renormalize": 0.05, "per_head": per_head}
    got = ax.information_flow(model, PROMPT, target, **kw)
    check_routes(model, ids, queries, got, 0.02, renormalize=0.05)
    plain = ax.information_flow(model, PROMPT, target, threshold=0.02, per_head=per_head)
    assert not np.allclose(np.nan_to_num(got.values), np.nan_to_num(plain.values))


# Gemma 2 and OLMo 2: norms on the attention's and the MLP's outputs; Granite: residual
# multipliers; OPT: pre-LN in its own names; sequential GPT-NeoX; Qwen3: query/key norms;
# Mixtral: a mixture of experts; DistilBERT: post-norm in its own names; ModernBERT: pre-norm
# encoder
@pytest.mark.parametrize(
    "arch",
    ["gemma2", "olmo2", "granite", "opt", "pythia-sequential", "qwen3", "mixtral", "distilbert",
     "modernbert"],
)  # fmt: skip
def test_routes_match_naive_graph_search_on_more_layouts(arch):
    model = _encoder(arch) if arch in ("distilbert", "modernbert") else _fused(arch)
    target = None if model.task != "generation" else TARGET
    ids, queries = ids_and_queries(model, PROMPT, target)
    got = ax.information_flow(model, PROMPT, target, threshold=0.0)
    check_routes(model, ids, queries, got, 0.0)


@pytest.mark.parametrize("task", ["token", "sequence"])
def test_decoder_classifiers_trace_from_their_token_or_pooled_row(task):
    """A token classifier's target k is traced from row k itself, a sequence classifier's from
    its pooled (last) token: both against the reference."""
    hf, tok = tiny_classifier("gpt2", task=task)
    model = ax.load_model(hf.double(), tokenizer=tok)
    ids = torch.tensor([tok(PROMPT).input_ids])
    length = ids.shape[1]
    queries = list(range(length)) if task == "token" else [length - 1]
    got = ax.information_flow(model, PROMPT, threshold=0.02)
    if task == "token":
        assert got.target.values.tolist() == queries
    check_routes(model, ids, queries, got, 0.02)


def test_a_masked_lm_traces_from_its_mask(models):
    hf, tok = tiny_classifier("bert", task="fill-mask")
    model = ax.load_model(hf.double(), tokenizer=tok)
    text = f"the capital of france is {tok.mask_token} ."
    ids = torch.tensor([tok(text).input_ids])
    mask = ids[0].tolist().index(tok.mask_token_id)
    got = ax.information_flow(model, text, threshold=0.02)
    check_routes(model, ids, [mask], got, 0.02)


def test_positions_keep_their_routes(models):
    model = models["llama"]
    every = ax.information_flow(model, PROMPT, TARGET + " It is")
    picked = every.target.values[[0, 2]].tolist()
    some = ax.information_flow(model, PROMPT, TARGET + " It is", positions=picked)
    assert some.target.values.tolist() == picked
    np.testing.assert_array_equal(some.values, every.sel(target=picked).values)


def test_heads_split_each_edge(models):
    """A head's parts and the residual's add up to the edge (the residual's on ``j = i``)."""
    model = models["llama"]
    both = ax.information_flow(model, PROMPT, TARGET, threshold=0.05)
    per_head = ax.information_flow(model, PROMPT, TARGET, threshold=0.05, per_head=True)
    assert per_head.dims == ("target", "layer", "head", "query", "source")
    assert per_head.sizes["head"] == model.hf.config.num_attention_heads
    summed = per_head.sum("head", skipna=False).values
    diagonal = np.einsum(
        "...i,ij->...ij", per_head.attention_residual.values, np.eye(summed.shape[-1])
    )
    np.testing.assert_allclose(summed + np.nan_to_num(diagonal), both.values, atol=1e-12)
    np.testing.assert_array_equal(per_head.mlp.values, both.mlp.values)


def test_weights_into_each_reached_node_sum_to_one(models):
    """At threshold 0, the edges into a node on the route are every part of its sum."""
    model = models["gpt2"]
    got = ax.information_flow(model, PROMPT, TARGET, threshold=0.0)
    into = got.sum("source").values
    reached = into > 0  # NaN (the future) compares False
    assert reached.any()
    np.testing.assert_allclose(into[reached], 1.0, rtol=0, atol=1e-9)
    block = (got.mlp + got.mlp_residual).values
    np.testing.assert_allclose(block[block > 0], 1.0, rtol=0, atol=1e-9)
    # every real position of the prompt reaches the last target's row at threshold 0
    first = got.isel(target=-1, layer=0)
    assert bool((first.sum("query") > 0).sum() == got.target.values[-1])


def test_a_higher_threshold_keeps_part_of_the_route(models):
    model = models["llama"]
    low = ax.information_flow(model, PROMPT, TARGET, threshold=0.02)
    high = ax.information_flow(model, PROMPT, TARGET, threshold=0.1)
    on_high = high.fillna(0) > 0
    assert bool(on_high.any())
    assert bool((low.fillna(0) > 0).where(on_high, True).all())
    assert int(on_high.sum()) < int((low.fillna(0) > 0).sum())


def test_future_tokens_change_no_earlier_route(models):
    model = models["gpt2"]
    one = ax.information_flow(model, PROMPT, " Paris is", threshold=0.01)
    two = ax.information_flow(model, PROMPT, " Paris was", threshold=0.01)
    first = one.target.values[:2]
    width = int(first[-1])  # the positions the first two targets can see
    kept = {"query": slice(0, width), "source": slice(0, width)}
    a, b = one.sel(target=first).isel(kept), two.sel(target=first).isel(kept)
    np.testing.assert_allclose(a.values, b.values, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(a.values > 0, b.values > 0)  # the same edges on the route
    assert np.isnan(one.sel(target=first[0]).isel(source=slice(width, None)).values).all()


def test_batched_and_padded_equal_single(models):
    for arch, texts, targets in (
        ("gpt2", [PROMPT, "Hello"], [TARGET, " world, again"]),
        ("bert", ["a good film", "not a good film at all"], None),
    ):
        model = models[arch]
        both = ax.information_flow(model, texts, targets, threshold=0.02)
        for b, text in enumerate(texts):
            alone = ax.information_flow(
                model, text, None if targets is None else targets[b], threshold=0.02
            )
            row = both.isel(example=b).sel(target=alone.target)
            width = alone.sizes["source"]
            np.testing.assert_allclose(
                row.isel(query=slice(0, width), source=slice(0, width)).values,
                alone.values,
                atol=1e-10,
            )
            assert np.isnan(row.isel(source=slice(width, None)).values).all()
            np.testing.assert_allclose(
                row.mlp.isel(query=slice(0, width)).values, alone.mlp.values, atol=1e-10
            )


def test_row_chunks_do_not_change_routes(models, monkeypatch):
    model = models["llama"]
    whole = ax.information_flow(model, PROMPT, TARGET, threshold=0.0, per_head=True)
    monkeypatch.setattr(_routes, "_vector_budget", lambda *a, **k: 1)  # one query row a chunk
    rows = ax.information_flow(
        model, PROMPT, TARGET, threshold=0.0, per_head=True, max_memory="1GB"
    )
    np.testing.assert_allclose(rows.values, whole.values, atol=1e-12)


def test_max_memory_too_small_names_the_smallest():
    model = ax.load_model()
    with pytest.raises(ax.OptionError, match=r"max_memory.*at least"):
        ax.information_flow(model, "1 2 3 =", " 3 2 1", max_memory="1KB")
    smallest = ax.information_flow(model, "1 2 3 =", " 3 2 1", max_memory="1GB")
    assert smallest.dims == ("target", "layer", "query", "source")


def test_a_result_beyond_the_free_memory_is_refused_without_max_memory(models, monkeypatch):
    """Without ``max_memory`` the default budget (half the free memory) must hold every layer's
    weights and the result: the call is refused up front, not run row by row into an OOM."""
    monkeypatch.setattr(_memory, "memory_budget", lambda device: 1 << 20)
    with pytest.raises(ax.OptionError, match=r"estimated .*positions=.*per_head=False"):
        ax.information_flow(models["gpt2"], [PROMPT] * 8, [TARGET] * 8, per_head=True)
    got = ax.information_flow(models["gpt2"], PROMPT, TARGET, max_memory="1GB")
    assert got.dims == ("target", "layer", "query", "source")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threshold": 1.0}, "threshold"),
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": "0.1"}, "threshold"),
        ({"renormalize": 1}, "renormalize"),
        ({"per_head": 1}, "per_head"),
        ({"objective": "logit"}, "objective"),
        ({"attribute_target": True}, "attribute_target"),
    ],
)
def test_bad_options_are_option_errors(models, kwargs, message):
    with pytest.raises(ax.OptionError, match=message):
        ax.information_flow(models["gpt2"], PROMPT, TARGET, **kwargs)


# GPT-J, CodeGen (its values in shards), Phi, Cohere and Cohere 2 (one norm); Pythia (GPT-NeoX's
# default: two norms; "pythia-biased": random biases and norm weights) and StableLM (two norms,
# per-head query/key norms); Falcon-7B (one norm, multi-query) and Falcon-40B (two norms)
@pytest.mark.parametrize(
    "arch",
    ["gptj", "codegen", "phi", "cohere", "cohere2", "pythia", "pythia-biased",
     "stablelm-parallel", "falcon", "falcon-40b"],
)  # fmt: skip
@pytest.mark.parametrize("threshold", [0.0, 0.05])
def test_side_by_side_blocks_match_the_reference(arch, threshold):
    if arch == "pythia-biased":
        _, tok = tiny_model("gpt2")
        model = ax.load_model(neighbour("pythia", tok).double(), tokenizer=tok)
    else:
        model = _falcon(arch) if arch.startswith("falcon") else _fused(arch)
    ids, queries = ids_and_queries(model, PROMPT, TARGET)
    got = ax.information_flow(model, PROMPT, TARGET, threshold=threshold)
    assert bool(got.parallel)
    check_routes(model, ids, queries, got, threshold)
    if threshold == 0:  # every part of a block's output
        into = (got.sum("source") + got.mlp).values
        np.testing.assert_allclose(into[into > 0], 1.0, rtol=0, atol=1e-9)


def test_a_block_of_unknown_layout_is_refused(models, monkeypatch):
    """No norm attrax knows before the MLP, and no family known to run it side by side."""
    monkeypatch.setattr(_routes, "_MLP_NORMS", ("no_such_norm",))
    with pytest.raises(ax.ModelError, match="no norm attrax knows before its MLP"):
        ax.information_flow(models["gpt2"], PROMPT, TARGET)


def test_encoder_decoders_are_refused():
    hf, tok = tiny_model("marian")
    with pytest.raises(ax.ModelError, match="encoder-decoder"):
        ax.information_flow(ax.load_model(hf, tokenizer=tok), "hello", "world")


def test_cli_prints_each_targets_largest_edges(tmp_path, capsys):
    args = ["attribute", "--method", "information_flow", "--input", "1 2 3 =", "--target", " 3 2"]
    assert main([*args, "--reduce", "none", "--out", str(tmp_path / "flow.nc")]) == 0
    printed = capsys.readouterr().out
    assert "target 4" in printed and "layer 1: 3 ← 3" in printed
    assert ": +0\n" not in printed  # edges off the route are not listed
    saved = ax.load(tmp_path / "flow.nc")
    assert saved.dims == ("target", "layer", "query", "source")
    assert saved.mlp.dims == ("target", "layer", "query")


def _segments(a) -> dict[str, dict]:
    """Each kind of edge an axes draws: its point tuples, each with its line's width."""
    out = {}
    for c in a.collections:
        if isinstance(c, LineCollection):
            widths = np.broadcast_to(c.get_linewidths(), (len(c.get_segments()),))
            out[c.get_label()] = {
                tuple(map(tuple, np.round(s, 6))): round(float(w), 6)
                for s, w in zip(c.get_segments(), widths, strict=True)
            }
    return out


@pytest.mark.parametrize("arch", ["gpt2", "pythia"])
def test_plot_draws_each_route_edge_where_the_graph_has_it(models, tmp_path, arch):
    """Every edge above 0 where the graph has it, as wide as 0.6 + 4 x its weight (Pythia's
    side by side blocks: attention and MLP from the block's input into its output)."""
    model = models[arch] if arch in models else _fused(arch)
    flow = ax.information_flow(model, PROMPT, TARGET, threshold=0.02)
    side = bool(flow.parallel)
    fig = ax.plot(flow, path=tmp_path / "route.png")
    assert (tmp_path / "route.png").stat().st_size > 0
    assert len(fig.axes) == flow.sizes["target"]
    for a, target in zip(fig.axes, flow.target.values, strict=True):
        route = flow.sel(target=target)
        want: dict[str, dict] = {"attention": {}, "residual": {}, "MLP": {}}

        def add(kind, points, weight, want=want):
            want[kind][points] = round(0.6 + 4.0 * float(weight), 6)

        for layer in range(route.sizes["layer"]):
            y = 2 * layer
            edges = np.nan_to_num(route.values[layer])
            for i, j in zip(*np.nonzero(edges), strict=True):
                kind = "residual" if i == j else "attention"
                add(kind, ((j, y), (i, y + 2 if side else y + 1)), edges[i, j])
            mlp = np.nan_to_num(route.mlp.values[layer])
            for i in np.flatnonzero(mlp):
                start = y if side else y + 1
                add("MLP", ((i, start), (i + 0.35, (start + y + 2) / 2), (i, y + 2)), mlp[i])
            around = np.nan_to_num(route.mlp_residual.values[layer])
            for i in np.flatnonzero(around):
                add("residual", ((i, y + 1), (i, y + 2)), around[i])
        assert _segments(a) == {k: v for k, v in want.items() if v}
        assert a.get_title().startswith(f"target {target}")
    # one target selected, or the dims in another order: the same drawing
    one = ax.plot(flow.sel(target=flow.target.values[0]))
    assert _segments(one.axes[0]) == _segments(fig.axes[0])
    moved = ax.plot(flow.transpose("source", "query", "layer", "target"))
    assert [_segments(a) for a in moved.axes] == [_segments(a) for a in fig.axes]


def test_plot_of_heads_and_of_a_batch(models):
    model = models["gpt2"]
    kw = {"threshold": 0.02}
    summed = ax.plot(ax.information_flow(model, PROMPT, TARGET, **kw))
    per_head = ax.information_flow(model, PROMPT, TARGET, per_head=True, **kw)
    heads = ax.plot(per_head)  # the heads' parts and the residual's, widths included
    assert [_segments(a) for a in heads.axes] == [_segments(a) for a in summed.axes]
    with pytest.raises(ax.OptionError, match="without its 'head' dim"):
        ax.plot(per_head.sum("head"))  # the residual's share is not in the heads' sum
    both = ax.information_flow(model, [PROMPT, "Hello"], [TARGET, " world"], **kw)
    has = (~np.isnan(both.mlp)).any(["layer", "query"])  # (example, target)
    counts = has.sum("target").values.tolist()
    assert len(ax.plot(both).axes) == sum(counts)
    assert len(ax.plot(both, example=-1).axes) == counts[1]  # positions, as the heatmap's
    with pytest.raises(ax.OptionError, match=r"positions in 0\.\.1"):
        ax.plot(both, example=5)
    with pytest.raises(ax.OptionError, match="one route"):
        ax.plot(both, ax=summed.axes[0])
    with pytest.raises(ax.OptionError, match="graph"):
        ax.plot(both, cmap="viridis")


def test_plot_labels_the_layers_drawn_and_takes_tokens_as_text(models):
    model = models["gpt2"]
    flow = ax.information_flow(model, PROMPT, TARGET, threshold=0.0)
    fig = ax.plot(flow.isel(target=[0], layer=[1]))
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["layer 0", "layer 1"]
    with pytest.raises(ax.OptionError, match="consecutive layers"):
        ax.plot(flow.isel(layer=[1, 0]))
    tokens = np.array(["$$"] * flow.sizes["target"])
    odd = flow.assign_coords(target_token=("target", tokens))
    ax.plot(odd).savefig(io.BytesIO())  # a "$$" token is drawn as text, not math


def test_cli_draws_routes_as_png_and_refuses_html_without_a_reduction(tmp_path, capsys):
    args = ["attribute", "--method", "information_flow", "--input", "1 2 3 =", "--target", " 3"]
    assert main([*args, "--reduce", "none", "--png", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").stat().st_size > 0
    assert main([*args, "--reduce", "none", "--html", str(tmp_path / "r.html")]) == 2
    assert "--png" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()
    partly = ["--reduce", "mean:layer", "--html", str(tmp_path / "r.html")]
    assert main([*args, *partly]) == 2  # query is kept: still graphs
    assert main([*args, "--html", str(tmp_path / "table.html")]) == 0  # the reduced table
    assert (tmp_path / "table.html").stat().st_size > 0


def test_show_points_routes_to_plot(models):
    flow = ax.information_flow(models["gpt2"], PROMPT, TARGET, per_head=True)
    with pytest.raises(ax.InputError, match=r"information flow routes.*ax\.plot"):
        ax.show(flow)  # not a layer x head grid, though it has both dims
    reduced = ax.mean(ax.mean(flow.sum("head"), "layer"), "query")
    assert "<table" in ax.show(reduced)._repr_html_()


@pytest.mark.parametrize("parallel", [False, True])
def test_tracing_follows_every_kind_of_edge_on_a_made_up_graph(parallel):
    """The tracing alone, on weights made up so that some nodes are reached only through the
    MLP (side by side: its edge from the block's input) or only around it, against the
    depth-first search of the reference."""
    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(2)
    layers, length, threshold = 3, 5, 0.3
    graph = object.__new__(_routes._Graph)
    graph.keep_heads, graph.causal, graph.parallel, graph.heads = False, True, parallel, 1
    graph.renormalize, graph.norms, graph.count = 0.0, None, 1
    ids = torch.zeros(1, length, dtype=torch.long)
    graph.t = SimpleNamespace(
        ids=ids, mask=torch.ones(1, length), index=torch.tensor([[length - 1]]),
        valid=torch.ones(1, 1, dtype=torch.bool),
    )  # fmt: skip
    graph.rows = torch.zeros(1, 1, dtype=torch.long)
    causal = torch.tril(torch.ones(length, length))
    graph.attention = [
        torch.rand(1, length, length, generator=gen) * 0.5 * causal for _ in range(layers)
    ]
    graph.residual = [torch.rand(1, length, generator=gen) * 0.2 for _ in range(layers)]
    mlp = [torch.rand(1, length, generator=gen) for _ in range(layers)]
    past = [torch.rand(1, length, generator=gen) for _ in range(layers)]
    if parallel:
        graph.mlp = mlp
    else:  # the sequential blocks' MLP weights, as the method's own would be
        graph._mlp_weights = lambda layer, _output: (mlp[layer][0][None], past[layer][0][None])
    flow, _, got_mlp, got_past = graph.routes([ids] * layers, threshold)
    edges: dict[tuple[str, str], float] = {}
    for layer in range(layers):
        into = "X{}_{}" if parallel else "A{}_{}"
        for i in range(length):
            target = into.format(layer + 1 if parallel else layer, i)
            for j in range(i + 1):
                weight = float(graph.attention[layer][0, i, j])
                weight += float(graph.residual[layer][0, i]) if i == j else 0.0
                edges[f"X{layer}_{j}", target] = weight
            source = f"X{layer}_{i}" if parallel else f"A{layer}_{i}"
            edges[source, f"M{layer}_{i}"] = float(mlp[layer][0, i])
            edges[f"M{layer}_{i}", f"X{layer + 1}_{i}"] = float(mlp[layer][0, i])
            if not parallel:
                edges[f"A{layer}_{i}", f"X{layer + 1}_{i}"] = float(past[layer][0, i])
    route = naive_route(edges, f"X{layers}_{length - 1}", threshold)
    for layer in range(layers):
        into = "X{}_{}" if parallel else "A{}_{}"
        for i in range(length):
            target = into.format(layer + 1 if parallel else layer, i)
            for j in range(i + 1):
                on = (f"X{layer}_{j}", target) in route
                assert (float(flow[0, 0, layer, i, j]) > 0) == on, (layer, i, j)
            on_mlp = (f"M{layer}_{i}", f"X{layer + 1}_{i}") in route
            assert (float(got_mlp[0, 0, layer, i]) > 0) == on_mlp
            around = (f"A{layer}_{i}", f"X{layer + 1}_{i}") in route
            assert (float(got_past[0, 0, layer, i]) > 0) == around
    # some block input above the embeddings is left through its MLP edge alone, and the route
    # goes on below it
    left = {u for u, _ in route if not u.startswith(("X0_", "M"))}
    alone = [u for u in left if all(v.startswith("M") for u2, v in route if u2 == u)]
    assert any(v == u for u in alone for _, v in route)
