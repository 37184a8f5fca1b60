"""GradDrop (AtP*, Kramár et al. 2024) against naive loops written here.

The reference runs the plain Hugging Face model once per dropped block ``l``, with a forward hook
on block ``l`` returning ``x + (out - x).detach()`` (the same forward; the backward at ``out``
reaches ``x`` alone, the skip path), and hooks that add a zero leaf to each node's activation (a
leaf swapped in would cut the path from an earlier layer's nodes through a later one's);
``torch.autograd.grad`` of each target's score then gives that drop's gradient, and
``grad . (corrupted - clean)`` per layer, head and position its AtP estimate ``e_l``. GradDrop is
``sum_l |e_l| / (L - 1)``. The main comparisons use three-layer models, where a node of the middle
layer mixes a plain estimate (block 0 dropped), a real drop (block 2) and its own block (0).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attrax as ax
from attrax.testing import tiny_classifier, tiny_model
from tests.conftest import assert_close
from tests.test_components import (
    CORRUPTED,
    ED_TARGET,
    MIXED,
    SOURCE,
    TARGET,
    decoder_only_nodes,
    full_double,
    mixing,
    token_ids,
)

TARGETS = " Paris is"  # two targets in both tiny tokenizers


def build(arch: str, layers: int) -> ax.Model:
    """A tiny float64 GPT-2 or Llama with ``layers`` blocks."""
    key = "n_layer" if arch == "gpt2" else "num_hidden_layers"
    hf, tok = tiny_model(arch, **{key: layers})
    return ax.load_model(full_double(hf), tokenizer=tok)


@pytest.fixture(scope="module")
def deep64() -> dict[str, ax.Model]:
    """Three-layer float64 GPT-2 and Llama."""
    return {arch: build(arch, 3) for arch in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def two64() -> dict[str, ax.Model]:
    """The default two-layer float64 GPT-2 and Llama."""
    return {arch: build(arch, 2) for arch in ("gpt2", "llama")}


# --- the naive reference -------------------------------------------------------------------


def blocks_of(model: ax.Model) -> list[torch.nn.Module]:
    base = model.hf.base_model
    return list(base.h) if model.hf.config.model_type == "gpt2" else list(base.layers)


def nodes_of(model: ax.Model, site: str) -> tuple[list[torch.nn.Module], str, list[slice] | None]:
    """(the module holding each layer's nodes, whether they are its "input" or "output", the
    columns of each head; None: the whole output, one node per position)."""
    config = model.hf.config
    gpt2 = config.model_type == "gpt2"
    modern = config.model_type == "modernbert"  # pre-norm encoder layers: attn.Wo, mlp
    blocks = blocks_of(model)
    attns = [b.attn if gpt2 or modern else b.self_attn for b in blocks]
    heads = config.num_attention_heads
    d = config.hidden_size // heads
    if site == "heads":
        where = [a.c_proj if gpt2 else a.Wo if modern else a.o_proj for a in attns]
        return where, "input", [slice(h * d, (h + 1) * d) for h in range(heads)]
    if site == "mlp":
        return [b.mlp for b in blocks], "output", None
    if site == "neurons":  # the MLP output projection's input, one column a node
        downs = [b.mlp.c_proj if gpt2 else b.mlp.down_proj for b in blocks]
        width = downs[0].weight.shape[0 if gpt2 else 1]  # Conv1D's weight is [in, out]
        return downs, "input", [slice(n, n + 1) for n in range(width)]
    if gpt2:  # the thirds of c_attn's output: queries, keys, values
        start = ("queries", "keys", "values").index(site) * config.hidden_size
        cols = [slice(start + h * d, start + (h + 1) * d) for h in range(heads)]
        return [a.c_attn for a in attns], "output", cols
    # Llama: the projections' outputs before RoPE (an orthogonal rotation of each position:
    # grad . delta is the same on either side); keys and values per key/value head
    name = {"queries": "q_proj", "keys": "k_proj", "values": "v_proj"}[site]
    count = heads if site == "queries" else config.num_key_value_heads
    cols = [slice(g * d, (g + 1) * d) for g in range(count)]
    return [getattr(a, name) for a in attns], "output", cols


def activations(model: ax.Model, site: str, ids: list[int]) -> list[torch.Tensor]:
    """Each layer's node activations ``[positions, width]`` for one example."""
    where, kind, _ = nodes_of(model, site)
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for n, module in enumerate(where):
        if kind == "input":
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, a, n=n: seen.__setitem__(n, a[0][0].detach().clone())
                )
            )
        else:
            handles.append(
                module.register_forward_hook(
                    lambda m, a, o, n=n: seen.__setitem__(n, o[0].detach().clone())
                )
            )
    try:
        with torch.no_grad():
            model.hf(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [seen[n] for n in range(len(where))]


def detach_block(module, args, kwargs, output):
    """Block ``out = x + b(x)`` as ``x + (out - x).detach()``: nothing flows back through ``b``."""
    x = args[0] if args else kwargs["hidden_states"]
    out = output[0] if isinstance(output, tuple) else output
    routed = x + (out - x).detach()
    return (routed, *output[1:]) if isinstance(output, tuple) else routed


def naive_estimates(model, site, ids, bad, scores, drops) -> np.ndarray:
    """``[len(drops), targets, positions, layers(, heads)]``: each target's AtP estimate of every
    node with block ``drop`` detached (``drop=None``: plain AtP); ``scores(logits)`` lists the
    targets' scores of the one example."""
    where, kind, cols = nodes_of(model, site)
    blocks = blocks_of(model)
    clean, corrupt = activations(model, site, ids), activations(model, site, bad)
    out = None
    for row, drop in enumerate(drops):
        leaves: dict[int, torch.Tensor] = {}

        def leaf(x: torch.Tensor, n: int, leaves: dict = leaves) -> torch.Tensor:
            # a zero leaf added, not swapped in: the graph stays whole through every layer
            leaves[n] = torch.zeros_like(x, requires_grad=True)
            return x + leaves[n]

        handles = []
        for n, module in enumerate(where):
            if kind == "input":
                hook = module.register_forward_pre_hook(lambda m, a, n=n: (leaf(a[0], n), *a[1:]))
            else:
                hook = module.register_forward_hook(lambda m, a, o, n=n: leaf(o, n))
            handles.append(hook)
        if drop is not None:
            handles.append(blocks[drop].register_forward_hook(detach_block, with_kwargs=True))
        try:
            with torch.enable_grad():
                logits = model.hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        finally:
            for handle in handles:
                handle.remove()
        targets = scores(logits)
        if out is None:
            shape = (len(drops), len(targets), len(ids), len(where))
            out = np.zeros(shape if cols is None else (*shape, len(cols)))
        for k, s in enumerate(targets):
            layers = [leaves[n] for n in range(len(where))]
            grads = torch.autograd.grad(s, layers, retain_graph=True, allow_unused=True)
            for n, grad in enumerate(grads):
                if grad is None:  # the node's own block, detached: no gradient at all
                    continue
                delta = corrupt[n] - clean[n]
                for p in range(len(ids)):
                    if cols is None:
                        out[row, k, p, n] = float(grad[0, p] @ delta[p])
                    else:
                        for h, c in enumerate(cols):
                            out[row, k, p, n, h] = float(grad[0, p, c] @ delta[p, c])
    assert out is not None
    return out


def lm_scores(model, source, target, objective="logit"):
    """(clean ids, corrupted ids, ``scores(logits)``): each target token's logit (or probability)
    at the position predicting it."""
    src, tgt = token_ids(model, source, target)
    bad = token_ids(model, CORRUPTED, target)[0]
    assert len(bad) == len(src)

    def scores(logits: torch.Tensor) -> list[torch.Tensor]:
        rows = logits[len(src) - 1 : -1]
        if objective == "probability":
            rows = torch.softmax(rows, -1)
        return [rows[k, t] for k, t in enumerate(tgt)]

    return src + tgt, bad + tgt, scores


def graddrop(per_drop: np.ndarray) -> np.ndarray:
    """GradDrop from the estimates of every dropped block: ``sum_l |e_l| / (L - 1)``."""
    return np.abs(per_drop).sum(0) / (per_drop.shape[0] - 1)


def causal(got, want: np.ndarray, rtol: float, atol: float) -> None:
    """``got`` (``[target, source, ...]`` of a causal LM) is NaN past each target's predicting
    position (where the loop's gradients are exactly 0) and equals ``want`` up to it."""
    values = got.values
    first = want.shape[1] - want.shape[0]  # target k is read at position first + k - 1
    for k in range(want.shape[0]):
        assert np.isnan(values[k, first + k :]).all() and not want[k, first + k :].any()
        assert np.isfinite(values[k, : first + k]).all()
    assert_close(np.nan_to_num(values, nan=0.0), want, rtol, atol)


# Llama's eager attention takes its softmax in float32 even in a float64 model: the loop and
# attrax agree to 1e-16 here, but attrax runs the float32 softmax backward on all (dropped layer,
# target) rows at once, which another CPU's kernels may sum in another order
TOL = {"gpt2": (1e-9, 1e-11), "llama": (1e-6, 1e-8)}


# --- against the loop ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "site", "objective"),
    [
        ("gpt2", "heads", "logit"),
        ("gpt2", "heads", "probability"),
        ("gpt2", "mlp", "logit"),
        ("gpt2", "neurons", "logit"),
        ("gpt2", "values", "logit"),
        ("llama", "heads", "logit"),
        ("llama", "mlp", "logit"),
        ("llama", "neurons", "probability"),
        ("llama", "queries", "logit"),
        ("llama", "keys", "logit"),
        ("llama", "values", "probability"),
    ],
)
def test_grad_drop_equals_naive(deep64, arch, site, objective):
    """Three layers, two targets: GradDrop of every node equals the loop's ``sum_l |e_l| / 2``
    (queries and keys with ``qk_fix=False``; Llama's keys and values per key/value head), and
    the loop itself is sound: its undropped run is attrax's plain AtP, a node's own block
    leaves it nothing, a block before it leaves plain AtP, dropping block 2 moves layer 0's
    estimates, and some node's estimates change sign between drops (sum |e| != |sum e|)."""
    model = deep64[arch]
    ids, bad, scores = lm_scores(model, SOURCE, TARGETS, objective)
    layers = len(blocks_of(model))
    per_drop = naive_estimates(model, site, ids, bad, scores, [None, *range(layers)])
    plain, per_drop = per_drop[0], per_drop[1:]
    options = {"qk_fix": False} if site in ("queries", "keys") else {}
    kw = {"corrupted": CORRUPTED, "site": site, "objective": objective, **options}
    got = ax.attribution_patching(model, SOURCE, TARGETS, grad_drop=True, **kw)
    base = ax.attribution_patching(model, SOURCE, TARGETS, **kw)
    rtol, atol = TOL[arch]
    causal(base, plain, rtol, atol)  # the loop's plumbing: nodes, deltas, scores
    for n in range(layers):
        assert not per_drop[n, :, :, n].any()  # a node's own block: its gradient is dropped
        for drop in range(n):  # blocks before the node's own: plain AtP
            np.testing.assert_allclose(per_drop[drop, :, :, n], plain[:, :, n], atol=1e-12)
    # dropping a later block moves the estimates of layer 0 (the test would see a missed drop)
    assert not np.allclose(per_drop[2, :, :, 0], plain[:, :, 0], rtol=1e-2, atol=0)
    # some node's estimates differ in sign between drops: sum |e_l| is not |sum e_l| there
    mixed = np.abs(per_drop).sum(0) - np.abs(per_drop.sum(0))
    assert mixed.max() > 1e-3 * np.abs(per_drop).max()
    assert got.dims == base.dims
    assert got["layer"].values.tolist() == base["layer"].values.tolist()
    causal(got, graddrop(per_drop), rtol, atol)


def fixed_estimates(model, site: str, objective: str) -> np.ndarray:
    """``[L, targets, positions, layers, heads]``: per dropped block, the QK fix of every query or
    key node, ``sum dS/dA * (A' - A)``: ``A'`` from a real patch of the node (test_components'
    own eager attention, :func:`mixing`), ``dS/dA`` by autograd at a zero leaf added to that
    layer's weights with the block detached."""
    nodes, scores, shape = decoder_only_nodes(model, site, objective, (SOURCE, TARGETS, CORRUPTED))
    ids, _, score_of = lm_scores(model, SOURCE, TARGETS, objective)
    blocks = blocks_of(model)
    attns = {n: attn for (n, _, _), (*_, attn) in nodes.items()}
    out = np.zeros((len(blocks), *shape))
    with mixing(model):
        scores()
        clean = dict(MIXED["seen"])
        moved = {}
        for node, (m, position, cols, a, b, attn) in nodes.items():
            if not torch.equal(a, b):
                scores([(m, position, cols, b)])
                moved[node] = MIXED["seen"][attn] - clean[attn]  # [heads, queries, keys]
        for drop, block in enumerate(blocks):
            handle = block.register_forward_hook(detach_block, with_kwargs=True)
            try:
                for n, attn in attns.items():
                    leaf = torch.zeros((1, *clean[attn].shape), dtype=torch.float64)
                    leaf.requires_grad_(True)
                    MIXED.update(module=attn, delta=leaf)
                    logits = model.hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
                    if not logits.requires_grad:  # the node's own block: dropped
                        continue
                    for k, score in enumerate(score_of(logits)):
                        (g,) = torch.autograd.grad(score, leaf, retain_graph=True)
                        for (layer, h, p), delta in moved.items():
                            if layer == n:
                                out[drop, k, p, n, h] = float((g[0] * delta).sum())
            finally:
                handle.remove()
                MIXED.update(module=None, delta=None)
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("site", ["queries", "keys"])
def test_grad_drop_with_the_qk_fix_equals_naive(deep64, arch, site):
    """AtP* whole: the QK fix under GradDrop, ``sum_l |sum dS_l/dA * (A' - A)| / (L - 1)``, with
    ``dS_l/dA`` the gradient of the attention weights with block ``l`` detached."""
    model = deep64[arch]
    per_drop = fixed_estimates(model, site, "logit")
    assert np.abs(per_drop).max() > 0
    got = ax.attribution_patching(
        model, SOURCE, TARGETS, corrupted=CORRUPTED, site=site, grad_drop=True, objective="logit"
    )
    # Llama's eager softmax (attrax's) runs in float32, the reference's attention in float64
    rtol, atol = (1e-9, 1e-11) if arch == "gpt2" else (1e-4, 1e-6)
    causal(got, graddrop(per_drop), rtol, atol)


def test_grad_drop_two_layers(two64):
    """With two layers: layer 1's nodes are ``|plain AtP|``, layer 0's ``|e_1|`` of the loop
    (block 1 dropped), on both architectures' heads."""
    for arch, model in two64.items():
        ids, bad, scores = lm_scores(model, SOURCE, TARGETS)
        (dropped,) = naive_estimates(model, "heads", ids, bad, scores, [1])
        kw = {"corrupted": CORRUPTED, "objective": "logit"}
        got = ax.attribution_patching(model, SOURCE, TARGETS, grad_drop=True, **kw)
        plain = ax.attribution_patching(model, SOURCE, TARGETS, **kw)
        np.testing.assert_allclose(
            got.sel(layer=1).values, np.abs(plain.sel(layer=1).values), rtol=1e-12, atol=0
        )
        rtol, atol = TOL[arch]
        first = len(ids) - dropped.shape[0]
        for k in range(dropped.shape[0]):
            assert_close(
                got.values[k, : first + k, 0], np.abs(dropped[k, : first + k, 0]), rtol, atol
            )


@pytest.mark.parametrize("site", ["heads", "mlp", "keys"])
def test_last_layer_is_abs_plain_and_nonnegative(deep64, site):
    """The last layer's nodes: every earlier drop is plain AtP, their own drops nothing, so
    ``(L - 1) |plain| / (L - 1)``; every estimate is >= 0, and the earlier layers differ from
    ``|plain|``."""
    for model in deep64.values():
        kw = {"corrupted": CORRUPTED, "site": site, "objective": "logit"}
        if site == "keys":
            kw["qk_fix"] = False
        got = ax.attribution_patching(model, SOURCE, TARGETS, grad_drop=True, **kw)
        plain = ax.attribution_patching(model, SOURCE, TARGETS, **kw)
        last = got["layer"].values[-1]
        np.testing.assert_allclose(
            got.sel(layer=last).values, np.abs(plain.sel(layer=last).values), rtol=1e-12, atol=0
        )
        values = got.values[~np.isnan(got.values)]
        assert values.size and (values >= 0).all()
        assert np.nanmax(values) > 0
        early = got.sel(layer=0).values
        assert not np.allclose(early, np.abs(plain.sel(layer=0).values), equal_nan=True)


def test_grad_drop_batched_equals_single(deep64):
    """Two examples, padded: each equals its call alone, on heads, mlp and values."""
    model = deep64["gpt2"]
    inputs, targets, corrupted = [SOURCE, "Hello"], [TARGET, " world"], [CORRUPTED, "Hallo"]
    for clean, bad in zip(inputs, corrupted, strict=True):
        assert len(token_ids(model, bad, " world")[0]) == len(token_ids(model, clean, " world")[0])
    for site in ("heads", "mlp", "values"):
        kw = {"site": site, "grad_drop": True, "objective": "logit"}
        full = ax.attribution_patching(model, inputs, targets, corrupted=corrupted, **kw)
        for e in range(2):
            single = ax.attribution_patching(
                model, inputs[e], targets[e], corrupted=corrupted[e], **kw
            )
            assert np.nanmax(single.values) > 1e-6
            part = full.isel(example=e).dropna("target", how="all")
            part = part.isel(source=slice(0, single.sizes["source"]))
            np.testing.assert_allclose(part.values, single.values, rtol=1e-9, atol=1e-12)


def test_grad_drop_chunks_and_selection(deep64):
    """``chunk_size=1`` (one target a backward, L rows) equals all targets at once; picking
    layers and heads picks them from the whole (every block is still dropped)."""
    for model in deep64.values():
        for site in ("heads", "values"):
            kw = {"corrupted": CORRUPTED, "site": site, "grad_drop": True, "objective": "logit"}
            whole = ax.attribution_patching(model, SOURCE, TARGETS, **kw)
            chunked = ax.attribution_patching(model, SOURCE, TARGETS, chunk_size=1, **kw)
            np.testing.assert_allclose(chunked.values, whole.values, rtol=1e-12, atol=1e-14)
            picked = ax.attribution_patching(model, SOURCE, TARGETS, layers=[2, 0], heads=[1], **kw)
            assert picked["layer"].values.tolist() == [2, 0]
            np.testing.assert_allclose(
                picked.values, whole.sel(layer=[2, 0], head=[1]).values, rtol=1e-12, atol=1e-14
            )
        mlp = {"corrupted": CORRUPTED, "site": "mlp", "grad_drop": True}
        whole = ax.attribution_patching(model, SOURCE, TARGETS, **mlp)
        picked = ax.attribution_patching(model, SOURCE, TARGETS, layers=[1], **mlp)
        np.testing.assert_allclose(
            picked.values, whole.sel(layer=[1]).values, rtol=1e-12, atol=1e-14
        )


def test_grad_drop_sequence_classifier_equals_naive():
    """A GPT-2 sequence classifier (two layers), class 1's logit: heads against the loop."""
    hf, tok = tiny_classifier("gpt2")
    model = ax.load_model(full_double(hf), tokenizer=tok)
    text, corrupt = "a bad day", "a good dog"
    ids, bad = tok(text)["input_ids"], tok(corrupt)["input_ids"]
    assert len(ids) == len(bad)
    per_drop = naive_estimates(
        model, "heads", ids, bad, lambda logits: [logits[1]], range(len(blocks_of(model)))
    )
    got = ax.attribution_patching(
        model, text, targets=1, corrupted=corrupt, objective="logit", grad_drop=True
    )
    plain = ax.attribution_patching(model, text, targets=1, corrupted=corrupt, objective="logit")
    assert got.dims == ("target", "source", "layer", "head")
    want = graddrop(per_drop)
    assert not np.allclose(want[:, :, 0], np.abs(plain.values[:, :, 0]), rtol=1e-2)
    assert_close(got.values, want, rtol=1e-7, atol=1e-9)


@pytest.mark.usefixtures("modernbert_rotary_in_its_dtype")
@pytest.mark.parametrize("site", ["heads", "mlp"])
def test_grad_drop_modernbert_classifier_equals_naive(site):
    """A pre-norm encoder: each ModernBERT layer writes ``x + b(x)``; class 2's logit."""
    hf, tok = tiny_classifier("modernbert", num_hidden_layers=3)
    model = ax.load_model(full_double(hf), tokenizer=tok)
    text, corrupt = "a bad day", "a sad day"
    ids, bad = tok(text)["input_ids"], tok(corrupt)["input_ids"]
    assert len(ids) == len(bad)
    per_drop = naive_estimates(
        model, site, ids, bad, lambda logits: [logits[2]], range(len(blocks_of(model)))
    )
    kw = {"targets": 2, "corrupted": corrupt, "objective": "logit", "site": site}
    got = ax.attribution_patching(model, text, grad_drop=True, **kw)
    plain = ax.attribution_patching(model, text, **kw)
    want = graddrop(per_drop)
    assert not np.allclose(want[:, :, 0], np.abs(plain.values[:, :, 0]), rtol=1e-2)
    # its eager softmax runs in float32 even in a float64 model
    assert_close(got.values, want, rtol=1e-5, atol=1e-8)


def test_grad_drop_qwen2_classifier_values_equal_naive():
    """Any decoder-only model's layers: a Qwen2 sequence classifier (grouped-query attention),
    class 1's logit, values against the loop."""
    hf, tok = tiny_classifier("qwen2")
    model = ax.load_model(hf.double(), tokenizer=tok)
    text, corrupt = "a bad day", "a good dog"
    ids, bad = tok(text)["input_ids"], tok(corrupt)["input_ids"]
    assert len(ids) == len(bad)
    per_drop = naive_estimates(
        model, "values", ids, bad, lambda logits: [logits[1]], range(len(blocks_of(model)))
    )
    kw = {"targets": 1, "corrupted": corrupt, "objective": "logit", "site": "values"}
    got = ax.attribution_patching(model, text, grad_drop=True, **kw)
    assert got.sizes["head"] == model.hf.config.num_key_value_heads
    want = graddrop(per_drop)
    assert np.abs(want).max() > 0
    # Qwen2's RMSNorm and eager softmax run in float32 even in a float64 model
    assert_close(got.values, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["pythia", "qwen2", "gemma2", "phi3", "opt", "granite"])
def test_grad_drop_on_other_decoder_families(family):
    """The families the docs name (parallel residual, grouped keys, softcapping, fused qkv, OPT's
    `decoder.layers`): the last layer is ``|plain AtP|``, the first is not, nothing is
    negative."""
    from tests.test_architectures import _family

    _, tok = tiny_model("gpt2")
    model = ax.load_model(_family(family, tok), tokenizer=tok)
    kw = {"corrupted": CORRUPTED, "site": "keys", "objective": "logit"}
    plain = np.abs(ax.attribution_patching(model, SOURCE, TARGETS, **kw).values)
    got = ax.attribution_patching(model, SOURCE, TARGETS, grad_drop=True, **kw).values
    seen = ~np.isnan(got)
    assert (got[seen] >= 0).all() and np.array_equal(seen, ~np.isnan(plain))
    assert_close(np.nan_to_num(got[:, :, -1]), np.nan_to_num(plain[:, :, -1]), 1e-5, 1e-9)
    assert not np.allclose(np.nan_to_num(got[:, :, 0]), np.nan_to_num(plain[:, :, 0]), rtol=1e-3)


def test_grad_drop_errors(two64):
    gpt2 = two64["gpt2"]
    kw = {"corrupted": CORRUPTED}
    with pytest.raises(ax.OptionError, match="grad_drop"):
        ax.attribution_patching(gpt2, SOURCE, TARGET, site="residual", grad_drop=True, **kw)
    with pytest.raises(ax.OptionError, match="grad_drop"):
        ax.attribution_patching(gpt2, SOURCE, TARGET, grad_drop="yes", **kw)
    hf, tok = tiny_model("marian")
    marian = ax.load_model(hf, tokenizer=tok)
    for site in ("heads", "mlp", "values"):
        with pytest.raises(ax.OptionError, match="encoder-decoder"):
            ax.attribution_patching(marian, SOURCE, ED_TARGET, site=site, grad_drop=True, **kw)
    hf, tok = tiny_classifier("bert")
    bert = ax.load_model(hf, tokenizer=tok)
    for site in ("heads", "values"):
        with pytest.raises(ax.ModelError, match="BertForSequenceClassification"):
            ax.attribution_patching(
                bert, "a good day", 1, corrupted="the good day", site=site, grad_drop=True
            )
    from transformers import AutoModelForCausalLM

    from tests.test_architectures import CONFIGS

    hf, tok = tiny_model("gpt2", n_layer=1)
    config = CONFIGS["opt"](len(tok))
    config.do_layer_norm_before = False  # OPT-350m's layout: no skip connection to route to
    opt = ax.load_model(AutoModelForCausalLM.from_config(config), tokenizer=tok)
    with pytest.raises(ax.ModelError, match="normalises after each residual sum"):
        ax.attribution_patching(opt, SOURCE, TARGET, site="values", grad_drop=True, **kw)
    one = ax.load_model(hf, tokenizer=tok)
    with pytest.raises(ax.OptionError, match="has 1 layer"):  # L - 1 = 0: nothing to average
        ax.attribution_patching(one, SOURCE, TARGET, grad_drop=True, **kw)
