"""The attention attrax runs itself (DeBERTa-v2's disentangled attention, GPT-Neo's, BLOOM's),
against transformers' own forward.

Each layout of DeBERTa's relative-position terms (both, content-to-position only, keys shared
with the positions, no buckets, none at all) and GPT-Neo's global and local layers run once through
transformers' attention code (and BLOOM's ALiBi) and once through attrax's (inside ``Model.attention_as``): the
logits and every layer's weights must agree to float64 precision, and the modules must run their
own code again afterwards. The methods' own references (attention x gradient, head attribution,
value zeroing, ALTI, AtP, LRP, DLA) are in their test modules and read transformers' forward alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attrax as ax
from attrax.testing import tiny_classifier, tiny_model
from tests.test_components import _bloom

TEXT = "the plot was good but the ending was not"
LAYOUTS = {
    "c2p and p2c, buckets": {},
    "c2p only": {"pos_att_type": ["c2p"]},
    "p2c only, shared keys": {"pos_att_type": ["p2c"], "share_att_key": True},
    "no buckets": {"position_buckets": -1, "max_relative_positions": 6},
    "absolute positions only": {"relative_attention": False, "position_biased_input": True},
}


def _model(**overrides) -> ax.Model:
    hf, tok = tiny_classifier("deberta-v2", **overrides)
    return ax.load_model(hf.double(), tokenizer=tok)


def check_routed_forward(model: ax.Model, ids: dict, attention: str) -> tuple:
    """transformers' own forward over ``ids`` and attrax's (inside ``attention_as``, where each
    ``attention`` module runs attrax's forward): equal logits and weights to 1e-12; afterwards
    the modules run their class's forward again. Returns transformers' attentions."""
    modules = [m for m in model.hf.modules() if type(m).__name__ == attention]
    with torch.no_grad():
        want = model.hf(**ids, output_attentions=True)
        with model.attention_as("eager"):
            assert modules and all("forward" in m.__dict__ for m in modules)
            got = model.hf(**ids, output_attentions=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-12, atol=1e-12)
    for mine, theirs in zip(got.attentions, want.attentions, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    assert all("forward" not in m.__dict__ for m in modules)
    return want.attentions


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_routed_attention_is_transformers_own(layout):
    model = _model(**LAYOUTS[layout])
    ids = model.tokenizer([TEXT, "a good day"], return_tensors="pt", padding=True)
    check_routed_forward(model, ids, "DisentangledSelfAttention")


def test_blooms_routed_attention_is_transformers_own():
    """ALiBi's bias folded into the mask, the residual added by the attention module, a padded
    batch (right-padded: BLOOM's float32 softmax of a left-padded row that masks every key is
    NaN, in transformers' code as in attrax's)."""
    model = _bloom()
    tok = model.tokenizer
    tok.pad_token, tok.padding_side = tok.eos_token, "right"
    ids = tok(["The capital of France is Paris", "a b"], return_tensors="pt", padding=True)
    check_routed_forward(model, ids, "BloomAttention")


@pytest.mark.parametrize("window", [4, 64])
def test_gpt_neos_routed_attention_is_transformers_own(window):
    """A global layer and a local one (a window shorter than the input, or longer), a padded
    batch: attrax folds each layer's causal band into the additive mask."""
    hf, tok = tiny_model("gpt_neo", window_size=window)
    model = ax.load_model(hf.double(), tokenizer=tok)
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    ids = tok(["The capital of France is Paris", "a b"], return_tensors="pt", padding=True)
    local = check_routed_forward(model, ids, "GPTNeoSelfAttention")[1][0]
    if window < local.shape[-1]:  # the local layer: nothing past the window
        assert (local.tril(-window) == 0).all() and (local.tril(-window + 1) != 0).any()


@pytest.mark.parametrize("layout", ["c2p only", "no buckets", "absolute positions only"])
def test_attention_weights_on_each_layout(layout):
    """``ax.attention`` reads the [CLS] row of the weights transformers returns."""
    model = _model(**LAYOUTS[layout])
    got = ax.attention(model, TEXT)
    ids = model.tokenizer(TEXT, return_tensors="pt")
    with torch.no_grad():
        maps = model.hf(**ids, output_attentions=True).attentions
    want = np.stack([m[0, :, 0].numpy() for m in maps])  # [layer, head, key]
    np.testing.assert_allclose(got.values[0], want.transpose(2, 0, 1), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("attention", {}),
        ("rollout", {}),
        ("attention_x_gradient", {}),
        ("head_attribution", {"steps": 2}),
        ("value_zeroing", {}),
        ("alti", {}),
        ("attribution_patching", {"site": "keys"}),
        ("attribution_patching", {"site": "queries"}),
    ],
)
def test_a_padded_batch_equals_each_input_alone(method, kw):
    """Padding reaches attrax's disentangled attention as transformers' boolean mask: a padded
    batch gives each input what it gives alone."""
    model = _model()
    texts, bad = [TEXT, "a good day"], ["the film was good but the ending was not", "a good way"]
    if method == "attribution_patching":
        kw = {**kw, "corrupted": bad, "objective": "logit"}
    run = getattr(ax, method)
    batched = run(model, texts, **kw)
    for e, text in enumerate(texts):
        alone = {**kw, "corrupted": bad[e]} if "corrupted" in kw else kw
        single = run(model, text, **alone)
        part = batched.isel(example=e).dropna("target", how="all").dropna("source", how="all")
        part = part.isel(source=slice(0, single.sizes["source"]))
        assert np.abs(single.values).max() > 0
        np.testing.assert_allclose(part.values, single.values, rtol=1e-9, atol=1e-12)


def test_other_implementations_are_refused():
    """An implementation attrax did not accept for these modules (one that would compute the
    scores without the relative terms) is refused."""
    model = _model()
    refused = pytest.raises(
        ax.ModelError, match=r"DisentangledSelfAttention itself, which cannot run as .flash"
    )
    with refused, model.attention_as("flash_attention_2"):
        pass
