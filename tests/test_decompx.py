"""DecompX (``ax.decompx``) against a naive reference written here: every (position, token)
vector carried through each block one at a time with the model's own modules (value and output
projections, LayerNorm parameters, feed-forward layers and activation), the forward's values
recomputed by those modules, and its axioms: the shares of a class sum to its logit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.activations import ACT2FN

import attrax as ax
from attrax import _memory
from attrax.testing import tiny_classifier

TEXTS = ["the plot was good", "a bad film, and a long one"]
ENCODERS = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "deberta-v2")


def _model(arch: str, **overrides) -> ax.Model:
    hf, tok = tiny_classifier(arch, **overrides)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # biases and norm parameters far from their initial 0 and 1
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return ax.load_model(hf.double().eval(), tokenizer=tok)


@pytest.fixture(scope="module")
def models() -> dict[str, ax.Model]:
    return {arch: _model(arch) for arch in ("bert", "roberta", "distilbert", "electra")}


def _logits(model: ax.Model, texts: list[str]) -> np.ndarray:
    enc = model.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.hf(**enc).logits.numpy()


# --- the naive reference ---------------------------------------------------------------------
def _parts(model: ax.Model, block):
    """(value projection, output projection, first LayerNorm, up, activation, down, second
    LayerNorm) of a BERT-layout or DistilBERT block."""
    if hasattr(block, "sa_layer_norm"):  # DistilBERT
        att, ffn = block.attention, block.ffn
        return (att.v_lin, att.out_lin, block.sa_layer_norm, ffn.lin1, ffn.activation,
                ffn.lin2, block.output_layer_norm)  # fmt: skip
    own = block.attention.self
    value = own.value if hasattr(own, "value") else own.value_proj  # DeBERTa-v2's value_proj
    return (value, block.attention.output.dense, block.attention.output.LayerNorm,
            block.intermediate.dense, block.intermediate.intermediate_act_fn, block.output.dense,
            block.output.LayerNorm)  # fmt: skip


def _head(model: ax.Model):
    """(first linear layer, activation, second linear layer) of the classification head."""
    hf = model.hf
    kind = hf.config.model_type
    if kind == "distilbert":
        return hf.pre_classifier, torch.nn.functional.relu, hf.classifier
    if kind == "bert":
        return hf.bert.pooler.dense, torch.tanh, hf.classifier
    if kind == "deberta-v2":  # its ContextPooler: dense, then the config's activation
        return hf.pooler.dense, ACT2FN[hf.config.pooler_hidden_act], hf.classifier
    if kind == "electra":
        return hf.classifier.dense, hf.classifier.activation, hf.classifier.out_proj
    return hf.classifier.dense, torch.tanh, hf.classifier.out_proj


def _blocks(model: ax.Model):
    base = model.hf.base_model
    return list((getattr(base, "encoder", None) or base.transformer).layer)


def _share(vectors: list[torch.Tensor], bias: torch.Tensor, how: str) -> list[torch.Tensor]:
    """``bias`` split among ``vectors`` (one position's, one per token) as DecompX splits it."""
    if how == "absdot":
        w = [abs(float(v @ bias)) for v in vectors]
    elif how == "norm":
        w = [float(v.norm()) for v in vectors]
    else:
        w = [1.0 if bool((v != 0).any()) else 0.0 for v in vectors]
    total = sum(w)
    return [v + (wk / total if total else 0.0) * bias for v, wk in zip(vectors, w, strict=True)]


def naive_decompx(model: ax.Model, text: str, how: str = "absdot") -> np.ndarray:
    """The shares [tokens, classes] of one text's class logits, from loops over positions,
    tokens and heads, checking at every block that each position's vectors sum to its state."""
    hf = model.hf
    ids = model.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = hf(**ids, output_attentions=True, output_hidden_states=True)
    length = ids["input_ids"].shape[1]
    heads = getattr(hf.config, "num_attention_heads", None) or hf.config.n_heads
    h0 = out.hidden_states[0][0]
    # S[i][k]: token k's vector in position i's representation
    S = [
        [h0[i] if i == k else torch.zeros_like(h0[i]) for k in range(length)] for i in range(length)
    ]
    with torch.no_grad():
        for layer, block in enumerate(_blocks(model)):
            value, dense, ln1, up, act, down, ln2 = _parts(model, block)
            A = out.attentions[layer][0]  # [heads, i, j]
            hd = value.out_features // heads
            x = out.hidden_states[layer][0]
            V = [[value(S[j][k]) - value.bias for k in range(length)] for j in range(length)]
            if layer == 0:  # the first block's values hold their bias, token by token
                for j in range(length):
                    V[j][j] = V[j][j] + value.bias
                attention_bias = dense.bias
            else:
                attention_bias = dense(value.bias)  # each row of weights sums to 1
            pre1 = torch.stack(
                [
                    dense(
                        torch.cat(
                            [
                                sum(
                                    A[h, i, j] * value(x[j])[h * hd : (h + 1) * hd]
                                    for j in range(length)
                                )
                                for h in range(heads)
                            ]
                        )
                    )
                    + x[i]
                    for i in range(length)
                ]
            )
            new = []
            for i in range(length):
                R = []
                for k in range(length):
                    z = torch.cat(
                        [
                            sum(A[h, i, j] * V[j][k][h * hd : (h + 1) * hd] for j in range(length))
                            for h in range(heads)
                        ]
                    )
                    R.append(dense(z) - dense.bias + S[i][k])
                R = _share(R, attention_bias, how)
                torch.testing.assert_close(sum(R), pre1[i], rtol=0, atol=1e-10)
                sigma1 = torch.sqrt(pre1[i].var(unbiased=False) + ln1.eps)
                N = _share([ln1.weight * (r - r.mean()) / sigma1 for r in R], ln1.bias, how)
                after1 = ln1(pre1[i])
                torch.testing.assert_close(sum(N), after1, rtol=0, atol=1e-10)
                zi = up(after1)
                ratio = torch.where(zi != 0, act(zi) / torch.where(zi != 0, zi, 1), 0)
                U = _share([up(n) - up.bias for n in N], up.bias, how)
                D = _share([down(u * ratio) - down.bias for u in U], down.bias, how)
                pre2 = after1 + down(act(zi))
                sigma2 = torch.sqrt(pre2.var(unbiased=False) + ln2.eps)
                Q = [n + d for n, d in zip(N, D, strict=True)]
                new.append(_share([ln2.weight * (q - q.mean()) / sigma2 for q in Q], ln2.bias, how))
                torch.testing.assert_close(
                    sum(new[i]), out.hidden_states[layer + 1][0, i], rtol=0, atol=1e-10
                )
            S = new
        first, act, second = _head(model)
        zh = first(out.hidden_states[-1][0, 0])
        ratio = torch.where(zh != 0, act(zh) / torch.where(zh != 0, zh, 1), 0)
        P = _share([first(s) - first.bias for s in S[0]], first.bias, how)
        C = _share([second(p * ratio) - second.bias for p in P], second.bias, how)
    return torch.stack(C).numpy()


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert", "electra", "deberta-v2"])
def test_matches_naive(models, arch):
    model = models[arch] if arch in models else _model(arch)
    got = ax.decompx(model, TEXTS[1], "all")
    assert got.dims == ("target", "source")
    naive = naive_decompx(model, TEXTS[1])
    np.testing.assert_allclose(got.values.T, naive, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("how", ["norm", "equal"])
def test_other_bias_shares_match_naive(models, how):
    model = models["bert"]
    got = ax.decompx(model, TEXTS[0], "all", biases=how)
    np.testing.assert_allclose(
        got.values.T, naive_decompx(model, TEXTS[0], how), rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("arch", ENCODERS)
@pytest.mark.parametrize("how", ["absdot", "norm", "equal"])
def test_the_shares_sum_to_each_logit(arch, how):
    model = _model(arch)
    got = ax.decompx(model, TEXTS, "all", biases=how)
    assert got.dims == ("example", "target", "source")
    np.testing.assert_allclose(got.sum("source").values, _logits(model, TEXTS), rtol=0, atol=1e-10)
    assert not np.isnan(got.values).all(axis=-1).any()  # every class has shares
    # padding holds no share
    short = len(model.tokenizer(TEXTS[0]).input_ids)
    assert np.isnan(got.values[0, :, short:]).all()


def test_pairs_batched_equal_each_pair_alone(models):
    """(text, text_pair) inputs with their token types, padded in a batch."""
    model = models["bert"]
    pairs = [("the plot was good", "and so was the cast"), ("a film", "long and bad")]
    both = ax.decompx(model, pairs, "all")
    enc = model.tokenizer(
        [p[0] for p in pairs], [p[1] for p in pairs], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model.hf(**enc).logits.numpy()
    np.testing.assert_allclose(both.sum("source").values, logits, rtol=0, atol=1e-10)
    for b, pair in enumerate(pairs):
        one = ax.decompx(model, pair, "all")
        part = both.isel(example=b).sel(source=one.source.values)
        np.testing.assert_allclose(part.values, one.values, rtol=1e-10, atol=1e-12)


def test_batched_equals_single_contrast_and_predicted_class(models):
    model = models["roberta"]
    both = ax.decompx(model, TEXTS, "all")
    for b, text in enumerate(TEXTS):
        one = ax.decompx(model, text, "all")
        part = both.isel(example=b).sel(source=one.source.values)
        np.testing.assert_allclose(part.values, one.values, rtol=1e-10, atol=1e-12)
    against = ax.decompx(model, TEXTS[0], 0, contrast=2)
    first = both.isel(example=0).sel(source=against.source.values)
    np.testing.assert_allclose(
        against.values[0], first.values[0] - first.values[2], rtol=1e-10, atol=1e-12
    )
    predicted = ax.decompx(model, TEXTS[0])
    assert int(predicted.target_class.values[0]) == int(_logits(model, TEXTS[:1])[0].argmax())


def test_max_memory_chunks_examples_and_positions_not_values(models, monkeypatch):
    from attrax import _decompx

    model = models["bert"]
    whole = ax.decompx(model, TEXTS, "all")
    calls: list[int] = []
    original = _decompx._position_wise

    def spy(shares, *args, **kwargs):
        calls.append(shares.shape[1])
        return original(shares, *args, **kwargs)

    monkeypatch.setattr(_decompx, "_position_wise", spy)
    monkeypatch.setattr(_memory, "memory_budget", lambda device: 1)  # one example, one row
    monkeypatch.setattr(_memory, "CPU_PASS", 0)
    tight = ax.decompx(model, TEXTS, "all")
    assert set(calls) == {1}
    np.testing.assert_allclose(tight.values, whole.values, rtol=1e-12, atol=1e-14)
    with pytest.raises(ax.OptionError, match=r"cannot be met.*give at least"):
        ax.decompx(model, TEXTS, "all", max_memory=1000)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"biases": "cls"}, "`biases` must be one of"),
        ({"objective": "probability"}, "does not take `objective`"),
        ({"positions": [0]}, "does not take `positions`"),
        ({"batch_size": 2}, "does not take `batch_size`"),
    ],
)
def test_option_errors(models, options, message):
    with pytest.raises(ax.OptionError, match=message):
        ax.decompx(models["bert"], TEXTS[0], **options)


def _classifier(arch: str, task: str = "sequence") -> ax.Model:
    hf, tok = tiny_classifier(arch, task)
    return ax.load_model(hf, tokenizer=tok)


@pytest.mark.parametrize(
    "build",
    [
        lambda: ax.load_model(),  # the built-in GPT-2
        lambda: _classifier("modernbert"),  # pre-norm, a gated feed-forward
        lambda: _classifier("bert", "token"),
        lambda: _classifier("gpt2"),
        lambda: _classifier("bart"),
    ],
    ids=["language-model", "modernbert", "token-classifier", "gpt2-classifier", "bart-classifier"],
)
def test_models_it_cannot_decompose_are_model_errors(build):
    with pytest.raises(ax.ModelError, match="DecompX decomposes the sequence classifiers"):
        ax.decompx(build(), "the plot was good")


def test_a_feed_forward_run_in_chunks_changes_nothing():
    """transformers' ``chunk_size_feed_forward`` runs the feed-forward a chunk of positions at a
    time; DecompX reads its values whole."""
    plain, chunked = _model("bert"), _model("bert", chunk_size_feed_forward=1)
    np.testing.assert_allclose(
        ax.decompx(chunked, TEXTS, "all").values, ax.decompx(plain, TEXTS, "all").values, rtol=1e-12
    )
    assert chunked.hf.bert.encoder.layer[0].chunk_size_feed_forward == 1  # put back


def test_a_bfloat16_model_is_decomposed_in_float32():
    """Half-precision models' vectors are carried in float32: float32 results whose shares sum to
    the bfloat16 model's logits to its own rounding."""
    hf, tok = tiny_classifier("bert")
    model = ax.load_model(hf.to(torch.bfloat16), tokenizer=tok)
    got = ax.decompx(model, TEXTS, "all")
    assert got.dtype == np.float32
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = hf(**enc).logits.float().numpy()
    np.testing.assert_allclose(got.sum("source").values, logits, atol=2e-2)
