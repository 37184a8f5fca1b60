"""Attention x gradient (and its rollout) and head attribution against plain autograd loops.

The references run the Hugging Face model from ids with ``output_attentions=True`` under eager
attention, where the returned weights are the very tensors the attention output is computed
from, and take ``torch.autograd.grad`` of one target's score with respect to them: one forward
and one backward per target (and per layer and quadrature node for head attribution, whose
scaling is a pre-hook on the attention's output projection).
"""

from __future__ import annotations

import contextlib
import json
import re

import numpy as np
import pytest
import torch
import xarray as xr

import attrax as ax
from attrax.cli import main
from attrax.testing import tiny_classifier, tiny_model
from tests import _naive
from tests.test_components import _bloom, _falcon

SOURCE, TARGET = "The capital of France is", " Paris"
PAIR = ("def f(x):", " return x")


@pytest.fixture(scope="module")
def models64() -> dict[str, ax.Model]:
    built = {}
    for arch in ("gpt2", "gpt_neo", "llama", "bart", "t5"):
        hf, tok = tiny_model(arch)
        built[arch] = ax.load_model(hf.double(), tokenizer=tok)
    # Falcon-7B's layout: its attention records no weights for transformers' tables
    built["falcon"] = _falcon("falcon")
    # BLOOM: ALiBi, attention code of its own (attrax runs it)
    built["bloom"] = _bloom()
    return built


def out_projection(model: ax.Model, stack: str, layer: int) -> torch.nn.Module:
    """The linear layer right after ``A @ V`` (its input scales with ``A``)."""
    hf = model.hf
    if model.hf.config.model_type == "gpt2":
        return hf.transformer.h[layer].attn.c_proj
    if model.hf.config.model_type == "llama":
        return hf.model.layers[layer].self_attn.o_proj
    if model.hf.config.model_type == "gpt_neo":
        return hf.transformer.h[layer].attn.attention.out_proj
    if model.hf.config.model_type in ("falcon", "bloom"):
        return hf.transformer.h[layer].self_attention.dense
    if model.hf.config.model_type == "bart":
        block = hf.model.decoder.layers[layer]
        return block.encoder_attn.out_proj if stack == "cross" else block.self_attn.out_proj
    raise NotImplementedError(model.hf.config.model_type)


def on_graph(model: ax.Model) -> list:
    """The parameters are frozen: embeddings that require grad put the maps on the graph."""
    return [
        module.register_forward_hook(lambda m, a, o: o.detach().requires_grad_())
        for module in model.hf.modules()
        if isinstance(module, torch.nn.Embedding)
    ]


def naive_run(
    model: ax.Model,
    source: str,
    target: str,
    scale: dict | None = None,
    objective=_naive.probability,
    contrast: str | None = None,
):
    """Per target: the score (with graph; the probability unless ``objective`` is given, minus
    the contrast token's where ``contrast`` is) and the maps by stack, from ids.

    ``scale`` {(stack, layer): alpha} multiplies that attention's output by alpha.
    """
    source_ids, target_ids = _naive.token_ids(model, source, target)
    handles = on_graph(model)
    for (stack, layer), alpha in (scale or {}).items():
        module = out_projection(model, stack, layer)
        handles.append(module.register_forward_pre_hook(lambda m, a, s=alpha: (a[0] * s,)))
    # transformers' own eager forward (GPT-Neo's attention code is its own: attrax's runs it
    # under attention_as, so the reference stays out of it)
    own = model.hf.config.model_type in ("gpt_neo", "bloom")
    try:
        with contextlib.nullcontext() if own else model.attention_as("eager", required=True):
            if model.is_encoder_decoder:
                start = model.hf.config.decoder_start_token_id
                out = model.hf(
                    input_ids=torch.tensor([source_ids]),
                    decoder_input_ids=torch.tensor([[start, *target_ids]]),
                    output_attentions=True,
                )
                rows = list(range(len(target_ids)))
                maps = {
                    "encoder": out.encoder_attentions,
                    "decoder": out.decoder_attentions,
                    "cross": out.cross_attentions,
                }
            else:
                ids = source_ids + target_ids
                out = model.hf(input_ids=torch.tensor([ids]), output_attentions=True)
                rows = [len(source_ids) + j - 1 for j in range(len(target_ids))]
                maps = {"self": out.attentions}
    finally:
        for h in handles:
            h.remove()
    scores = [objective(out.logits[0, q], t) for q, t in zip(rows, target_ids, strict=False)]
    if contrast is not None:
        other = _naive.token_ids(model, source, contrast)[1]
        assert len(other) == len(target_ids) and other != target_ids
        pairs = zip(scores, rows, other, strict=True)
        scores = [s - objective(out.logits[0, q], c) for s, q, c in pairs]
    return scores, maps, rows


def naive_grads(model, source, target, stack, **how):
    """[target][layer] -> d score / d A as [heads, Q, K] arrays, plus the maps and rows."""
    scores, maps, rows = naive_run(model, source, target, **how)
    grads = []
    for score in scores:  # one backward per target
        g = torch.autograd.grad(score, maps[stack], retain_graph=True, allow_unused=True)
        grads.append(
            [
                torch.zeros_like(m)[0] if gi is None else gi[0]
                for gi, m in zip(g, maps[stack], strict=False)
            ]
        )
    return grads, [m[0].detach() for m in maps[stack]], rows


# the maps each model's references differentiate: GPT-Neo's and BLOOM's attention code is their
# own (attrax runs it), Falcon's records no weights for transformers' tables
STACKS = [
    ("gpt2", "self"),
    ("gpt_neo", "self"),
    ("falcon", "self"),
    ("bloom", "self"),
    ("llama", "self"),
    ("bart", "cross"),
]


@pytest.mark.parametrize(("arch", "stack"), [*STACKS, ("t5", "cross")])
def test_attention_x_gradient_equals_autograd(models64, arch, stack):
    model = models64[arch]
    got = ax.attention_x_gradient(model, SOURCE, TARGET)
    grads, maps, rows = naive_grads(model, SOURCE, TARGET, stack)
    assert got.dims == ("target", "source", "layer", "head")
    assert got.sizes["target"] == len(rows)
    for k, q in enumerate(rows):
        want = np.stack(
            [(m * g[layer])[:, q].numpy() for layer, m in enumerate(maps) for g in [grads[k]]]
        )
        want = want.transpose(2, 0, 1)  # [key, layer, head]
        values = got.values[k]
        if stack == "self":
            assert np.isnan(values[q + 1 :]).all()
            values, want = values[: q + 1], want[: q + 1]
        np.testing.assert_allclose(values, want, rtol=1e-7, atol=1e-12)


def test_selection_and_queries_sum(models64):
    model = models64["gpt2"]
    full = ax.attention_x_gradient(model, SOURCE, TARGET)
    part = ax.attention_x_gradient(model, SOURCE, TARGET, layers=[-1], heads=[1])
    assert part.layer.values.tolist() == [full.sizes["layer"] - 1] and part[
        "head"
    ].values.tolist() == [1]
    np.testing.assert_allclose(part.values[..., 0, 0], full.values[..., -1, 1], equal_nan=True)
    summed = ax.attention_x_gradient(model, SOURCE, TARGET, queries="sum")
    grads, maps, rows = naive_grads(model, SOURCE, TARGET, "self")
    for k, q in enumerate(rows):
        want = np.stack([(m * grads[k][layer]).sum(1).numpy() for layer, m in enumerate(maps)])
        np.testing.assert_allclose(
            summed.values[k, : q + 1], want.transpose(2, 0, 1)[: q + 1], rtol=1e-7, atol=1e-12
        )


def test_encoder_maps_summed_over_queries(models64):
    model = models64["bart"]
    got = ax.attention_x_gradient(model, SOURCE, TARGET, maps="encoder", queries="sum")
    grads, maps, rows = naive_grads(model, SOURCE, TARGET, "encoder")
    for k in range(len(rows)):
        want = np.stack([(m * grads[k][layer]).sum(1).numpy() for layer, m in enumerate(maps)])
        np.testing.assert_allclose(got.values[k], want.transpose(2, 0, 1), rtol=1e-7, atol=1e-12)


def relevance(m, g):
    return (m * g).clamp(min=0).mean(0)


def test_rollout_decoder_only(models64):
    model = models64["gpt2"]
    got = ax.attention_x_gradient(model, SOURCE, TARGET, rollout=True)
    grads, maps, rows = naive_grads(model, SOURCE, TARGET, "self")
    assert got.dims == ("target", "source")
    for k, q in enumerate(rows):
        r = torch.eye(maps[0].shape[-1], dtype=torch.float64)
        for layer, m in enumerate(maps):
            r = r + relevance(m, grads[k][layer]) @ r
        np.testing.assert_allclose(got.values[k, : q + 1], r[q, : q + 1].numpy(), rtol=1e-7)
    # `heads` picks the heads averaged, `layers` the layers rolled through (from R = I)
    some = ax.attention_x_gradient(model, SOURCE, TARGET, rollout=True, heads=[1], layers=[-1])
    last = len(maps) - 1
    for k, q in enumerate(rows):
        a = relevance(maps[last][[1]], grads[k][last][[1]])
        r = torch.eye(a.shape[-1], dtype=torch.float64) + a
        np.testing.assert_allclose(some.values[k, : q + 1], r[q, : q + 1].numpy(), rtol=1e-7)
        assert not np.allclose(some.values[k, : q + 1], got.values[k, : q + 1])


def test_rollout_encoder_decoder(models64):
    model = models64["bart"]
    got = ax.attention_x_gradient(model, SOURCE, TARGET, rollout=True, attribute_target=True)
    enc, enc_maps, rows = naive_grads(model, SOURCE, TARGET, "encoder")
    dec, dec_maps, _ = naive_grads(model, SOURCE, TARGET, "decoder")
    cross, cross_maps, _ = naive_grads(model, SOURCE, TARGET, "cross")

    def norm(r):  # the paper's Eq. 8-9, written out per row
        out = r.clone()
        for i in range(r.shape[0]):
            hat = r[i] - torch.eye(r.shape[0], dtype=r.dtype)[i]
            out[i] = (hat / hat.sum() if hat.sum() != 0 else hat * 0) + torch.eye(
                r.shape[0], dtype=r.dtype
            )[i]
        return out

    n_src = enc_maps[0].shape[-1]
    for k, q in enumerate(rows):
        r_ss = torch.eye(n_src, dtype=torch.float64)
        for layer, m in enumerate(enc_maps):
            r_ss = r_ss + relevance(m, enc[k][layer]) @ r_ss
        n_tgt = dec_maps[0].shape[-1]
        r_tt, r_ts = (
            torch.eye(n_tgt, dtype=torch.float64),
            torch.zeros(n_tgt, n_src, dtype=torch.float64),
        )
        for layer in range(len(dec_maps)):
            a = relevance(dec_maps[layer], dec[k][layer])
            r_tt, r_ts = r_tt + a @ r_tt, r_ts + a @ r_ts
            c = relevance(cross_maps[layer], cross[k][layer])
            r_ts = r_ts + norm(r_tt).T @ c @ norm(r_ss)
        np.testing.assert_allclose(
            got.sel(side="source").values[k], r_ts[q].numpy(), rtol=1e-7, atol=1e-12
        )
        np.testing.assert_allclose(
            got.sel(side="target").values[k, : q + 1],
            r_tt[q, : q + 1].numpy(),
            rtol=1e-7,
            atol=1e-12,
        )
    # the decoder layers roll in the order they run, however `layers` lists them (the order
    # given until 2026-12-05)
    listed = [ax.attention_x_gradient(model, SOURCE, TARGET, rollout=True, layers=layers)
              for layers in ([0, 1], [1, 0])]  # fmt: skip
    np.testing.assert_allclose(listed[1].values, listed[0].values, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(listed[0].values, got.sel(side="source").values, rtol=1e-12)


def naive_head_ig(model, source, target, stack, layer, steps, rule="gausslegendre", **how):
    """Per target [heads, Q, K]: A * sum_i w_i dF(alpha_i A)/dA, by pre-hooks and autograd."""
    nodes, weights = _naive.quadrature_nodes(rule, steps)
    _, maps, rows = naive_run(model, source, target)
    base = maps[stack][layer][0].detach()
    total = [torch.zeros_like(base) for _ in rows]
    for alpha, w in zip(nodes, weights, strict=False):
        scores, maps, _ = naive_run(model, source, target, {(stack, layer): alpha}, **how)
        for k, score in enumerate(scores):
            (g,) = torch.autograd.grad(score, maps[stack][layer], retain_graph=True)
            # the output is alpha * (A @ V): dF/dA = alpha * dF/d(alpha A)
            total[k] += w * g[0] / alpha
    return [base * t for t in total], rows


@pytest.mark.parametrize(("arch", "stack"), STACKS)
def test_head_attribution_equals_autograd(models64, arch, stack):
    model = models64[arch]
    got = ax.head_attribution(
        model, SOURCE, TARGET, steps=3, quadrature="gausslegendre", layers=[0, -1]
    )
    n_layers = got.sizes["layer"] if arch != "bart" else model.hf.config.decoder_layers
    # Llama's, Falcon's and BLOOM's eager softmax runs in float32 even in a float64 model, and
    # GPT-Neo's scores: float32 noise in gradients
    float32 = ("llama", "falcon", "bloom", "gpt_neo")
    rtol, atol = (1e-4, 1e-9) if arch in float32 else (1e-7, 1e-12)
    for j, layer in enumerate([0, n_layers - 1]):
        want, rows = naive_head_ig(model, SOURCE, TARGET, stack, layer, 3)
        for k, q in enumerate(rows):
            values = got.values[k, :, j]  # [source, head]
            row = want[k][:, q].T.numpy()
            if stack == "self":
                values, row = values[: q + 1], row[: q + 1]
            np.testing.assert_allclose(values, row, rtol=rtol, atol=atol)
            total = want[k].sum((1, 2)).numpy()
            np.testing.assert_allclose(got.head_total.values[k, j], total, rtol=rtol, atol=atol)


def test_objective_and_contrast_equal_autograd(models64):
    """``objective`` and ``contrast`` reach the gradients: d(logprob(target) - logprob(contrast))
    / dA by autograd, for attention x gradient and for head attribution (Riemann nodes)."""
    model = models64["gpt2"]
    score = {"objective": _naive.logprob, "contrast": " Rome"}
    kw = {"objective": "logprob", "contrast": " Rome"}
    got = ax.attention_x_gradient(model, SOURCE, TARGET, **kw)
    grads, maps, rows = naive_grads(model, SOURCE, TARGET, "self", **score)
    for k, q in enumerate(rows):
        want = np.stack([(m * grads[k][layer])[:, q].numpy() for layer, m in enumerate(maps)])
        want = want.transpose(2, 0, 1)[: q + 1]
        np.testing.assert_allclose(got.values[k, : q + 1], want, rtol=1e-7, atol=1e-12)
    heads = ax.head_attribution(
        model, SOURCE, TARGET, steps=3, quadrature="riemann_right", layers=[0], **kw
    )
    want, rows = naive_head_ig(model, SOURCE, TARGET, "self", 0, 3, "riemann_right", **score)
    for k, q in enumerate(rows):
        row = want[k][:, q].T.numpy()[: q + 1]
        np.testing.assert_allclose(heads.values[k, : q + 1, 0], row, rtol=1e-7, atol=1e-12)
        total = want[k].sum((1, 2)).numpy()
        np.testing.assert_allclose(heads.head_total.values[k, 0], total, rtol=1e-7, atol=1e-12)


# the tiny Llama's first layer turns sharply near alpha = 0.1 (RMSNorm of a small residual):
# 24 nodes do not resolve it, so its completeness is checked on the last layer
@pytest.mark.parametrize(("arch", "layers"), [("gpt2", None), ("llama", [-1])])
def test_head_attribution_completeness(models64, arch, layers):
    """Per layer: the sum over heads, queries and keys is F(A) - F(A_l = 0)."""
    model = models64[arch]
    got = ax.head_attribution(
        model, SOURCE, TARGET, steps=24, quadrature="gausslegendre", layers=layers
    )
    scores, _, _ = naive_run(model, SOURCE, TARGET)
    for layer in got.layer.values:
        ablated, _, _ = naive_run(model, SOURCE, TARGET, {("self", int(layer)): 0.0})
        want = np.array([float((a - b).detach()) for a, b in zip(scores, ablated, strict=False)])
        total = got.head_total.sel(layer=layer).sum("head").values
        np.testing.assert_allclose(total, want, rtol=1e-6, atol=1e-11)
        assert np.abs(want).max() > 1e-6  # a layer whose removal changes nothing tests nothing


def test_head_attribution_batches_and_chunks(models64):
    model = models64["gpt2"]
    kw = dict(steps=4, quadrature="riemann_middle")
    whole = ax.head_attribution(model, SOURCE, TARGET, **kw, batch_size=None, chunk_size=None)
    for sizes in ({"batch_size": 3, "chunk_size": 1}, {}):  # {}: "auto", one layer a forward
        parts = ax.head_attribution(model, SOURCE, TARGET, **kw, **sizes)
        np.testing.assert_allclose(
            parts.values, whole.values, rtol=1e-9, atol=1e-14, equal_nan=True
        )
        np.testing.assert_allclose(parts.head_total.values, whole.head_total.values, rtol=1e-9)


def test_attention_x_gradient_chunks(models64):
    model = models64["gpt2"]
    for kw in ({}, {"rollout": True}):
        whole = ax.attention_x_gradient(model, SOURCE, TARGET, chunk_size=None, **kw)
        parts = ax.attention_x_gradient(model, SOURCE, TARGET, chunk_size=1, **kw)
        np.testing.assert_allclose(parts.values, whole.values, rtol=1e-9, equal_nan=True)


@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("attention_x_gradient", {}),
        ("attention_x_gradient", {"rollout": True}),
        ("head_attribution", {"steps": 3}),
    ],
)
def test_batched_equals_single(models64, method, kw):
    model = models64["gpt2"]
    f = getattr(ax, method)
    both = f(model, [SOURCE, PAIR[0]], [TARGET, PAIR[1]], **kw)
    for b, (s, t) in enumerate([(SOURCE, TARGET), PAIR]):
        one = f(model, s, t, **kw)
        got = both.isel(example=b).dropna("target", how="all")
        got = got.isel(source=slice(0, one.sizes["source"]))
        np.testing.assert_allclose(got.values, one.values, rtol=1e-7, atol=1e-12, equal_nan=True)


def classifier_maps(model: ax.Model, ids, scale: dict | None = None):
    """The classifier's logits and maps from its own transformers forward (graph on), each layer
    in ``scale`` {layer: alpha} with its attention output times alpha (a pre-hook on the
    projection after ``A @ V``: BERT's and DeBERTa-v2's ``attention.output.dense``). DeBERTa-v2's
    maps come from its own disentangled attention code, which returns the weights it used."""
    handles = on_graph(model)
    layers = model.hf.base_model.encoder.layer
    for layer, alpha in (scale or {}).items():
        dense = layers[layer].attention.output.dense
        handles.append(dense.register_forward_pre_hook(lambda m, a, s=alpha: (a[0] * s,)))
    try:
        out = model.hf(**ids, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    return out.logits, out.attentions


@pytest.mark.parametrize(
    ("arch", "task"), [("bert", "sequence"), ("bert", "token"), ("deberta-v2", "sequence")]
)
def test_classifier_rows(arch, task):
    hf, tok = tiny_classifier(arch, task=task)
    model = ax.load_model(hf.double(), tokenizer=tok)
    text = "the plot was good"
    got = ax.attention_x_gradient(model, text)
    ids = tok(text, return_tensors="pt")
    logits, maps = classifier_maps(model, ids)
    probs = torch.softmax(logits, -1)
    if task == "sequence":
        # the predicted class is the target; its row is the pooled [CLS] query
        for k, c in enumerate(got.target_class.values):
            assert int(c) == int(probs[0].argmax())  # the predicted class, found here
            grads = torch.autograd.grad(probs[0, int(c)], maps, retain_graph=True)
            want = np.stack(
                [(m[0] * g[0])[:, 0].detach().numpy() for m, g in zip(maps, grads, strict=False)]
            )
            np.testing.assert_allclose(
                got.values[k], want.transpose(2, 0, 1), rtol=1e-7, atol=1e-12
            )
    else:
        target_class = got.target_class.values
        special = set(tok.all_special_ids)  # every token but [CLS] and [SEP] is a target
        words = [p for p, i in enumerate(ids.input_ids[0].tolist()) if i not in special]
        assert got.target.values.tolist() == words
        for k, position in enumerate(got.target.values):
            assert int(target_class[k]) == int(probs[0, position].argmax())
            score = probs[0, position, int(target_class[k])]
            grads = torch.autograd.grad(score, maps, retain_graph=True)
            want = np.stack(
                [
                    (m[0] * g[0])[:, position].detach().numpy()
                    for m, g in zip(maps, grads, strict=False)
                ]
            )
            np.testing.assert_allclose(
                got.values[k], want.transpose(2, 0, 1), rtol=1e-7, atol=1e-12
            )


@pytest.mark.parametrize("arch", ["bert", "deberta-v2"])
def test_classifier_head_attribution_equals_autograd(arch):
    """Head attribution of a sequence classifier's predicted class on its [CLS] row: per layer,
    ``A * sum_i w_i dF(alpha_i A) / dA`` with each node's output scaled by a pre-hook, and its
    head totals."""
    hf, tok = tiny_classifier(arch)
    model = ax.load_model(hf.double(), tokenizer=tok)
    text = "the plot was good"
    got = ax.head_attribution(model, text, steps=3, quadrature="gausslegendre")
    ids = tok(text, return_tensors="pt")
    logits, maps = classifier_maps(model, ids)
    target = int(torch.softmax(logits, -1)[0].argmax())
    assert got.target_class.values.tolist() == [target]
    nodes, weights = _naive.quadrature_nodes("gausslegendre", 3)
    for layer, base in enumerate(maps):
        total = torch.zeros_like(base[0])
        for alpha, w in zip(nodes, weights, strict=True):
            logits, scaled = classifier_maps(model, ids, {layer: alpha})
            score = torch.softmax(logits, -1)[0, target]
            (g,) = torch.autograd.grad(score, scaled[layer])
            total += w * g[0] / alpha  # the output is alpha * (A @ V)
        want = (base[0].detach() * total)[:, 0].T.numpy()  # [source, head] of the [CLS] row
        np.testing.assert_allclose(got.values[0, :, layer], want, rtol=1e-7, atol=1e-12)
        whole = (base[0].detach() * total).sum((1, 2)).numpy()
        np.testing.assert_allclose(got.head_total.values[0, layer], whole, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda m: ax.attention_x_gradient(m, SOURCE, TARGET, maps="cross"),
            "needs an encoder-decoder",
        ),
        (lambda m: ax.attention_x_gradient(m, SOURCE, TARGET, layers=9), "out of range"),
        (lambda m: ax.attention_x_gradient(m, SOURCE, TARGET, heads=[0, 0]), "same index twice"),
        (lambda m: ax.attention_x_gradient(m, SOURCE, TARGET, batch_size=2), "one point"),
        (
            lambda m: ax.attention_x_gradient(m, SOURCE, TARGET, rollout=True, queries="sum"),
            "`queries`",
        ),
        (lambda m: ax.attention_x_gradient(m, SOURCE, TARGET, queries="rows"), "queries"),
        (lambda m: ax.head_attribution(m, SOURCE, TARGET, steps=0), "steps"),
    ],
)
def test_errors(models64, call, message):
    with pytest.raises(ax.OptionError, match=message):
        call(models64["gpt2"])


def test_encoder_maps_need_summed_queries(models64):
    with pytest.raises(ax.OptionError, match="queries='sum'"):
        ax.attention_x_gradient(models64["bart"], SOURCE, TARGET, maps="encoder")
    with pytest.raises(ax.OptionError, match="does not apply with rollout=True"):
        ax.attention_x_gradient(models64["bart"], SOURCE, TARGET, maps="cross", rollout=True)


def test_unprobeable_model_is_a_model_error(models64, monkeypatch):
    from attrax import _heads

    monkeypatch.setattr(_heads, "attention_modules", lambda hf: {})
    with pytest.raises(ax.ModelError, match="no attention modules"):
        ax.attention_x_gradient(models64["gpt2"], SOURCE, TARGET)


def test_probing_leaves_the_model_as_it_was(models64):
    model = models64["gpt2"]
    before = (model.attn_implementation, model.hf.config._attn_implementation)
    ax.attention_x_gradient(model, SOURCE, TARGET)
    assert (model.attn_implementation, model.hf.config._attn_implementation) == before


def test_cli_and_dataset(tmp_path, write_jsonl):
    nc = tmp_path / "axg.nc"
    args = ["attribute", "--method", "attention_x_gradient", "--input", "1 2 3 =", "--target"]
    assert main([*args, " 3 2 1", "--reduce", "sum:head,sum:layer", "--out", str(nc)]) == 0
    da = ax.load(nc)
    assert da.dims == ("target", "source") and da.attrs["method"] == "attention_x_gradient"
    direct = ax.attention_x_gradient(ax.load_model(), "1 2 3 =", " 3 2 1").sum(["head", "layer"])
    np.testing.assert_allclose(np.nan_to_num(da.values), direct.values, rtol=1e-5, atol=1e-7)
    data = write_jsonl(
        [{"input": "1 2 3 =", "target": " 3 2 1"}, {"input": "4 5 =", "target": " 5 4"}]
    )
    out = tmp_path / "run"
    ax.attribute_dataset(
        None,
        data,
        out,
        method="head_attribution",
        reduce="sum:head,sum:layer",
        progress=False,
        steps=2,
    )
    got = ax.load_dataset_results(out)
    assert got.sizes["example"] == 2 and json.loads(got.attrs["options"])["steps"] == 2


def grid_values(page: str) -> list[float]:
    return [float(v) for v in re.findall(r'data-value="([^"]+)"', page)]


def test_show_draws_a_layer_by_head_grid(models64, tmp_path):
    model = models64["gpt2"]
    da = ax.head_attribution(model, SOURCE, TARGET, steps=2)
    page = ax.show(da.isel(target=0), path=tmp_path / "grid.html")._repr_html_()
    layers, heads = da.sizes["layer"], da.sizes["head"]
    assert page.count('<tr><th class="ax-tgt"') == layers
    assert all(f"head {h}</th>" in page for h in range(heads))
    want = da.head_total.isel(target=0).transpose("layer", "head").values.ravel()
    np.testing.assert_allclose(grid_values(page), want, rtol=1e-5)
    assert "each head&#x27;s total over queries and keys" in page
    assert (tmp_path / "grid.html").read_text().count("ax-c") >= layers * heads
    # without head_total: the sum over sources, NaN (future) sources skipped
    axg = ax.attention_x_gradient(model, SOURCE, TARGET).isel(target=0)
    summed = axg.sum("source").transpose("layer", "head").values.ravel()
    np.testing.assert_allclose(grid_values(ax.show(axg)._repr_html_()), summed, rtol=1e-5)


def test_show_grid_needs_one_target():
    da = xr.DataArray(np.ones((2, 3, 2, 2)), dims=("target", "source", "layer", "head"))
    with pytest.raises(
        ax.InputError, match=r"one target; select one first, e.g. da.isel\(target=0\)"
    ):
        ax.show(da)
    assert len(grid_values(ax.show(da.isel(target=[1]))._repr_html_())) == 4


def test_attribute_target_adds_the_decoder_self_attention(models64):
    model = models64["bart"]
    got = ax.attention_x_gradient(model, SOURCE, TARGET, attribute_target=True)
    grads, maps, rows = naive_grads(model, SOURCE, TARGET, "decoder")
    decoder = got.sel(side="target").values
    for k, q in enumerate(rows):
        want = np.stack([(m * grads[k][layer])[:, q].numpy() for layer, m in enumerate(maps)])
        want = want.transpose(2, 0, 1)[: q + 1]
        np.testing.assert_allclose(decoder[k, : q + 1], want, rtol=1e-7, atol=1e-12)
        assert np.isnan(decoder[k, q + 1 :]).all()
    cross = ax.attention_x_gradient(model, SOURCE, TARGET)
    np.testing.assert_allclose(got.sel(side="source").values, cross.values, rtol=1e-9)


def test_encoder_decoder_batched_equals_single(models64):
    model = models64["bart"]
    sources, targets = [SOURCE, PAIR[0]], [TARGET, PAIR[1]]
    for kw in ({}, {"rollout": True}):
        both = ax.attention_x_gradient(model, sources, targets, **kw)
        for b, (s, t) in enumerate(zip(sources, targets, strict=True)):
            one = ax.attention_x_gradient(model, s, t, **kw)
            got = both.isel(example=b).dropna("target", how="all")
            got = got.isel(source=slice(0, one.sizes["source"]))
            np.testing.assert_allclose(got.values, one.values, rtol=1e-7, atol=1e-12)


def test_sdpa_model_gives_the_eager_result():
    hf, tok = tiny_model("gpt2", attn_implementation="sdpa")
    model = ax.load_model(hf.double(), tokenizer=tok, attn_implementation="sdpa")
    eager_hf, eager_tok = tiny_model("gpt2")
    eager = ax.load_model(eager_hf.double(), tokenizer=eager_tok)
    got = ax.attention_x_gradient(model, SOURCE, TARGET, positions=[-1])
    want = ax.attention_x_gradient(eager, SOURCE, TARGET, positions=[-1])
    np.testing.assert_allclose(got.values, want.values, rtol=1e-7, equal_nan=True)
    assert model.hf.config._attn_implementation == "sdpa"


def test_head_total_survives_save_and_load(models64, tmp_path):
    da = ax.head_attribution(models64["gpt2"], [SOURCE, PAIR[0]], [TARGET, PAIR[1]], steps=2)
    assert da.head_total.dims == ("example", "target", "layer", "head")
    ax.save(da, tmp_path / "h.nc")
    back = ax.load(tmp_path / "h.nc")
    np.testing.assert_array_equal(back.head_total.values, da.head_total.values)
