"""Norm-based context mixing (``ax.attention_norm``: Kobayashi et al. 2020, 2021; GlobEnc) against
a naive reference written here: plain loops over layers, heads and token pairs, each head's
weighted vector built from the model's own modules and attention weights, normed by hand."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import attrax as ax
from attrax import _memory, _mixing
from attrax.testing import tiny_classifier, tiny_model
from tests.test_mixing import (
    BERT_LIKE,
    PROMPT,
    TARGET,
    _fused,
    after_attention,
    attention_of,
    blocks,
    is_bert,
    post_norm,
    project,
    value_parts,
)
from tests.test_mixing import ids_and_queries as mixing_ids_and_queries

INCLUDES = ("attention", "residual", "layernorm", "encoder")


def _randomized(hf):
    """``hf`` in float64 with its biases and norm parameters drawn away from 0 and 1, so that a
    bias or gain put in the wrong place changes the numbers."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name.lower() or ".ln_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return hf.double().eval()


def _encoder(arch: str, **overrides) -> ax.Model:
    """A tiny token classifier of ``arch``: every position is a target's query row."""
    hf, tok = tiny_classifier(arch, "token", **overrides)
    return ax.load_model(_randomized(hf), tokenizer=tok)


@pytest.fixture(scope="module")
def models() -> dict[str, ax.Model]:
    built = {"bert": _encoder("bert")}
    for arch in ("gpt2", "llama"):
        hf, tok = tiny_model(arch)
        built[arch] = ax.load_model(_randomized(hf), tokenizer=tok)
    return built


def _model(models: dict[str, ax.Model], arch: str) -> ax.Model:
    if arch in models:
        return models[arch]
    return _encoder(arch) if arch in BERT_LIKE else _fused(arch)


def ids_and_queries(model: ax.Model, text: str, target: str | None):
    """The ids, and the query row each target is read from (a token classifier: every one)."""
    if model.task == "token-classification":  # every token but the special ones
        ids = model.tokenizer(text).input_ids
        special = set(model.tokenizer.all_special_ids)
        return torch.tensor([ids]), [p for p, i in enumerate(ids) if i not in special]
    return mixing_ids_and_queries(model, text, target)


def second_norm(block) -> torch.nn.Module:
    """The LayerNorm after a post-norm block's feed-forward residual sum."""
    if hasattr(block, "output_layer_norm"):  # DistilBERT
        return block.output_layer_norm
    return block.output.LayerNorm


def naive_norms(model: ax.Model, ids: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Per include (and "head": [H, L, L]) the per-layer norms [L, L], from loops; checks on the
    way that the vectors add up to the model's own outputs where a norm is linearized."""
    hf = model.hf
    outputs, seconds = [], []

    def grab(_module, _args, out) -> None:
        outputs.append(out[0] if isinstance(out, tuple) else out)

    if is_bert(model):
        handles = [post_norm(b)[2].register_forward_hook(grab) for b in blocks(model)]
        handles += [
            second_norm(b).register_forward_hook(lambda m, a, out: seconds.append((a[0], out)))
            for b in blocks(model)
        ]
    else:
        handles = [attention_of(b).register_forward_hook(grab) for b in blocks(model)]
    with torch.no_grad():
        out = hf(input_ids=ids, output_attentions=True, output_hidden_states=True)
    for h in handles:
        h.remove()
    found: dict[str, list[torch.Tensor]] = {name: [] for name in (*INCLUDES, "head")}
    length = ids.shape[1]
    for layer, block in enumerate(blocks(model)):
        x = out.hidden_states[layer][0]
        attn = out.attentions[layer][0]
        heads, width = attn.shape[0], x.shape[-1]
        with torch.no_grad():
            v = value_parts(model, block, out.hidden_states[layer])
            hd = v.shape[-1]
            per_head = torch.zeros(heads, length, length, dtype=x.dtype)
            summed = torch.zeros(length, length, width, dtype=x.dtype)
            for i in range(length):
                for j in range(length):
                    for h in range(heads):
                        z = torch.zeros(heads * hd, dtype=x.dtype)
                        z[h * hd : (h + 1) * hd] = attn[h, i, j] * v[j, h]
                        f = project(model, block, z) * after_attention(block, outputs[layer], i)
                        per_head[h, i, j] = f.norm()
                        summed[i, j] += f
            residual = summed.clone()
            for i in range(length):
                residual[i, i] += x[i]
            found["head"].append(per_head)
            found["attention"].append(summed.norm(dim=-1))
            found["residual"].append(residual.norm(dim=-1))
            if not is_bert(model):
                continue
            dense, ln, _ = post_norm(block)
            pre = residual.sum(1) + dense.bias
            sigma = torch.sqrt(pre.var(-1, unbiased=False) + ln.eps)
            normed = torch.zeros_like(residual)
            for i in range(length):
                for j in range(length):
                    normed[i, j] = ln.weight * (residual[i, j] - residual[i, j].mean()) / sigma[i]
            bias = ln.weight * (dense.bias - dense.bias.mean()) / sigma[:, None] + ln.bias
            torch.testing.assert_close(normed.sum(1) + bias, outputs[layer][0], rtol=0, atol=1e-9)
            found["layernorm"].append(normed.norm(dim=-1))
            z2, _ = seconds[layer]
            ln2 = second_norm(block)
            sigma2 = torch.sqrt(z2[0].var(-1, unbiased=False) + ln2.eps)
            encoder = torch.zeros(length, length, dtype=x.dtype)
            for i in range(length):
                for j in range(length):
                    w = normed[i, j]
                    encoder[i, j] = (ln2.weight * (w - w.mean()) / sigma2[i]).norm()
            found["encoder"].append(encoder)
    return found


def _check_rows(got: np.ndarray, naive: torch.Tensor, model: ax.Model, queries, width: int) -> None:
    assert got.shape[0] == len(queries)
    for k, q in enumerate(queries):
        seen = q + 1 if model.causal else width
        np.testing.assert_allclose(got[k, :seen], naive[q, :seen].numpy(), rtol=1e-9, atol=1e-10)
        assert np.isnan(got[k, seen:]).all()  # nothing from the future


@pytest.mark.parametrize(
    "arch", ["gpt2", "llama", "bert", "gpt_neo", "gemma2", "pythia", "distilbert", "electra"]
)
def test_every_include_matches_naive_per_layer_and_head(models, arch):
    model = _model(models, arch)
    target = None if model.task != "generation" else TARGET
    ids, queries = ids_and_queries(model, PROMPT, target)
    naive = naive_norms(model, ids)
    width = ids.shape[1]
    includes = INCLUDES if is_bert(model) else INCLUDES[:2]
    for include in includes:
        got = ax.attention_norm(model, PROMPT, target, include=include)
        assert got.dims == ("target", "source", "layer")
        assert got.layer.values.tolist() == list(range(len(naive[include])))
        for layer, N in enumerate(naive[include]):
            _check_rows(got.values[..., layer], N, model, queries, width)
    heads = ax.attention_norm(model, PROMPT, target, per_head=True)
    assert heads.dims == ("target", "source", "layer", "head")
    for layer, H in enumerate(naive["head"]):
        for h in range(H.shape[0]):
            _check_rows(heads.values[..., layer, h], H[h], model, queries, width)


@pytest.mark.parametrize("arch", ["gpt2", "bert", "distilbert"])
def test_rollout_is_the_product_of_the_layers(models, arch):
    model = _model(models, arch)
    target = None if model.task != "generation" else TARGET
    ids, queries = ids_and_queries(model, PROMPT, target)
    naive = naive_norms(model, ids)
    include = "encoder" if is_bert(model) else "residual"
    rolled = naive[include][0]
    for N in naive[include][1:]:
        rolled = N @ rolled
    got = ax.attention_norm(model, PROMPT, target, include=include, aggregate=True)
    assert got.dims == ("target", "source")
    _check_rows(got.values, rolled, model, queries, ids.shape[1])


def test_the_heads_sum_bounds_their_norm_and_the_residual_adds_to_the_diagonal(models):
    model = models["gpt2"]
    heads = ax.attention_norm(model, PROMPT, TARGET, per_head=True)
    summed = ax.attention_norm(model, PROMPT, TARGET)
    bounded = (summed <= heads.sum("head", skipna=False) + 1e-12) | summed.isnull()
    assert bool(bounded.all())  # the triangle inequality
    assert bool((summed < heads.sum("head") - 1e-6).any())  # and not an equality
    residual = ax.attention_norm(model, PROMPT, TARGET, include="residual")
    # off the diagonal the residual adds nothing: the query's own source is the only change
    query = summed.target.values - 1
    own = summed.source.values[None, :] == query[:, None]
    off = ~own[..., None] & ~np.isnan(summed.values)
    np.testing.assert_allclose(residual.values[off], summed.values[off], rtol=1e-12)
    assert not np.allclose(residual.values[own], summed.values[own])


def test_batched_equals_single_and_layers_select(models):
    for arch, target in (("gpt2", [TARGET, " Rome"]), ("bert", None)):
        model = models[arch]
        texts = [PROMPT, "A longer prompt, to pad the first one"]
        include = "encoder" if arch == "bert" else "residual"
        batch = ax.attention_norm(model, texts, target, include=include)
        for b, text in enumerate(texts):
            one = ax.attention_norm(
                model, text, None if target is None else target[b], include=include
            )
            part = batch.isel(example=b).sel(target=one.target.values, source=one.source.values)
            np.testing.assert_allclose(part.values, one.values, rtol=1e-9, atol=1e-12)
        picked = ax.attention_norm(model, texts, target, include=include, layers=[-1])
        assert picked.layer.values.tolist() == [batch.sizes["layer"] - 1]
        np.testing.assert_array_equal(picked.values[..., 0], batch.values[..., -1])


def test_positions_keep_their_rows(models):
    model = models["gpt2"]
    full = ax.attention_norm(model, PROMPT, TARGET)
    last = ax.attention_norm(model, PROMPT, TARGET, positions=[-1])
    np.testing.assert_array_equal(last.values[0], full.values[-1])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"include": "ffn"}, "`include` must be one of"),
        ({"per_head": 1}, "`per_head` must be True or False"),
        ({"per_head": True, "include": "residual"}, "only include='attention'"),
        ({"per_head": True, "aggregate": True}, "needs aggregate=False"),
        ({"aggregate": True, "layers": 0}, "needs aggregate=False"),
        ({"objective": "logit"}, "does not take"),
        ({"chunk_size": 2}, "does not take"),
        ({"layers": 9}, "out of range"),
    ],
)
def test_option_errors(models, options, message):
    with pytest.raises(ax.OptionError, match=message.replace("(", r"\(")):
        ax.attention_norm(models["gpt2"], PROMPT, TARGET, **options)


def test_models_it_cannot_decompose_are_model_errors(models):
    for include in ("layernorm", "encoder"):
        with pytest.raises(ax.ModelError, match="only post-norm encoders"):
            ax.attention_norm(models["gpt2"], PROMPT, TARGET, include=include)
    hf, tok = tiny_model("marian")
    with pytest.raises(ax.ModelError, match="not encoder-decoders"):
        ax.attention_norm(ax.load_model(hf, tokenizer=tok), "a b", "c")


def test_max_memory_bounds_the_row_chunks_not_the_values(models, monkeypatch):
    """A budget just above the smallest builds few query rows' vectors at a time; the values
    are those of one chunk per layer; a budget below one row is refused before any forward."""
    model = models["bert"]
    sizes: list[int] = []
    original = _mixing._norm_rows

    def spy(weights, *args, **kwargs):
        sizes.append(weights.shape[2])
        return original(weights, *args, **kwargs)

    monkeypatch.setattr(_mixing, "_norm_rows", spy)
    whole = ax.attention_norm(model, PROMPT, include="encoder")
    length = max(sizes)
    layers = model.hf.config.num_hidden_layers
    assert sizes == [length] * layers  # one chunk per layer without a budget
    monkeypatch.setattr(_memory, "format_bytes", lambda n, up=False: f"{n} B")  # not rounded
    sizes.clear()
    with pytest.raises(ax.OptionError, match="cannot be met") as refused:
        ax.attention_norm(model, PROMPT, include="encoder", max_memory=1)
    assert sizes == []
    smallest = int(re.search(r"estimated (\d+) B;", str(refused.value))[1])
    row = _mixing._row_bytes(1, length, model.hidden_size, 8)  # float64 vectors
    bounded = ax.attention_norm(model, PROMPT, include="encoder", max_memory=smallest + 2 * row)
    assert sizes == ([3] * (length // 3) + [length % 3] * (length % 3 > 0)) * layers, sizes
    np.testing.assert_allclose(bounded.values, whole.values, rtol=1e-12)


def test_a_feed_forward_run_in_chunks_changes_nothing():
    """transformers' ``chunk_size_feed_forward`` runs BERT's feed-forward and second LayerNorm a
    chunk of positions at a time; ``include="encoder"`` reads that norm's input whole."""
    plain, chunked = _encoder("bert"), _encoder("bert", chunk_size_feed_forward=1)
    for include in INCLUDES:
        np.testing.assert_allclose(
            ax.attention_norm(chunked, PROMPT, include=include).values,
            ax.attention_norm(plain, PROMPT, include=include).values,
            rtol=1e-12,
        )
    assert chunked.hf.bert.encoder.layer[0].chunk_size_feed_forward == 1  # put back
