"""Attention weights and rollout against the model's own ``output_attentions`` and naive products."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attrax as ax
from attrax._attention import attention, rollout
from attrax.testing import tiny_model
from tests import _naive
from tests.conftest import PAIRS

SOURCE, TARGET = PAIRS[0]


def hf_attentions(model, source: str, target: str):
    """Plain HF forward from ids: (attention maps as the gradient tests' naive runner sees them)."""
    source_ids, target_ids = _naive.token_ids(model, source, target)
    with torch.no_grad():
        if model.is_encoder_decoder:
            start = model.hf.config.decoder_start_token_id
            out = model.hf(
                input_ids=torch.tensor([source_ids]),
                decoder_input_ids=torch.tensor([[start, *target_ids]]),
                output_attentions=True,
            )
            return out, 1, 1 + len(target_ids)
        out = model.hf(input_ids=torch.tensor([source_ids + target_ids]), output_attentions=True)
    return out, len(source_ids), len(source_ids) + len(target_ids)


def check_rows(got: np.ndarray, maps, first: int, end: int, causal: bool) -> None:
    """``got[target, source, layer, head]`` are rows ``t - 1`` of ``maps[layer][0, head]``."""
    want = np.stack([m[0].numpy() for m in maps])  # [layer, head, query, key]
    for k, t in enumerate(range(first, end)):
        row = want[:, :, t - 1].transpose(2, 0, 1)  # [key, layer, head]
        if causal:
            assert np.isnan(got[k, t:]).all(), "the future must be NaN"
            row = row[:t]
        np.testing.assert_allclose(got[k, : row.shape[0]], row, rtol=1e-5, atol=1e-6)


def test_attention_equals_output_attentions(model):
    got = attention(model, SOURCE, TARGET)
    out, first, end = hf_attentions(model, SOURCE, TARGET)
    assert got.dims == ("target", "source", "layer", "head")
    assert got.target.values.tolist() == list(range(first, end))
    assert got.attrs["method"] == "attention"
    if model.is_encoder_decoder:
        check_rows(got.values, out.cross_attentions, first, end, causal=False)
    else:
        check_rows(got.values, out.attentions, first, end, causal=True)
    assert got.layer.values.tolist() == list(range(got.sizes["layer"]))


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_encoder_decoder_attribute_target_and_encoder(models, arch):
    model = models[arch]
    out, first, end = hf_attentions(model, SOURCE, TARGET)
    got = attention(model, SOURCE, TARGET, attribute_target=True)
    assert got.indexes["source"].names == ["side", "position"]
    check_rows(got.sel(side="source").values, out.cross_attentions, first, end, causal=False)
    check_rows(got.sel(side="target").values, out.decoder_attentions, first, end, causal=True)

    encoder = attention(model, SOURCE, maps="encoder", heads=[-1])
    assert encoder.dims == ("query", "source", "layer", "head")
    assert encoder["head"].values.tolist() == [len(out.encoder_attentions[0][0]) - 1]
    want = np.stack([m[0, -1].numpy() for m in out.encoder_attentions], axis=-1)
    np.testing.assert_allclose(encoder.values[..., 0], want, rtol=1e-5, atol=1e-6)
    assert (encoder.query_token.values == encoder.source_token.values).all()


@pytest.mark.parametrize("arch", ["gpt2", "marian"])
def test_batched_equals_single(models, arch):
    model = models[arch]
    pairs = PAIRS[:2]
    batched = attention(model, [s for s, _ in pairs], [t for _, t in pairs], attribute_target=True)
    assert batched.dims[0] == "example"
    for i, (source, target) in enumerate(pairs):
        single = attention(model, source, target, attribute_target=True)
        part = batched.isel(example=i).sel(target=single.target, source=single.source)
        np.testing.assert_allclose(part.values, single.values, rtol=1e-5, atol=1e-6)
        assert (part.source_token.values == single.source_token.values).all()
    # targets an example does not have are NaN rows, never weights
    missing = (batched.target_id < 0).values
    assert missing.any()
    assert np.isnan(batched.values[missing]).all()


def test_selection_layers_heads(models):
    model = models["llama"]  # 2 layers, 4 heads
    full = attention(model, SOURCE, TARGET)
    assert (full.sizes["layer"], full.sizes["head"]) == (2, 4)
    cases = [
        ((-1, 0), ([1], [0])),
        ((slice(0, None, 2), range(1, 3)), ([0], [1, 2])),
        (([1, 0], [-1, 0]), ([1, 0], [3, 0])),
        # "all", as the gradient methods' layers="all" (refused until 2026-12-06)
        (("all", [2]), ([0, 1], [2])),
        ((1, "all"), ([1], [0, 1, 2, 3])),
    ]
    for (layers, heads), (want_layers, want_heads) in cases:
        got = attention(model, SOURCE, TARGET, layers=layers, heads=heads)
        assert got.layer.values.tolist() == want_layers
        assert got["head"].values.tolist() == want_heads
        want = full.sel(layer=want_layers, head=want_heads)
        np.testing.assert_array_equal(got.values, want.values)


def test_bad_arguments_raise(models):
    model, encdec = models["gpt2"], models["bart"]
    with pytest.raises(ax.OptionError, match=r"`layers` contains 2.*0\.\.1"):
        attention(model, SOURCE, TARGET, layers=2)
    with pytest.raises(ax.OptionError, match=r"`heads` contains -3.*-2\.\.-1"):
        attention(model, SOURCE, TARGET, heads=[0, -3])
    with pytest.raises(ax.OptionError, match="`layers` must be an int"):
        attention(model, SOURCE, TARGET, layers="last")
    with pytest.raises(ax.OptionError, match="selects nothing"):
        attention(model, SOURCE, TARGET, layers=slice(5, None))
    with pytest.raises(ax.OptionError, match="encoder-decoder"):
        attention(model, SOURCE, TARGET, maps="cross")
    with pytest.raises(ax.OptionError, match="attribute_target=True"):
        attention(encdec, SOURCE, TARGET, maps="self")
    with pytest.raises(ax.OptionError, match="`maps` must be"):
        attention(encdec, SOURCE, TARGET, maps="decoder")


def test_reductions_pipe_and_sdpa_model():
    hf, tok = tiny_model("gpt2")
    model = ax.load_model(hf, tokenizer=tok, attn_implementation="sdpa")
    reduce = ax.pipe(attention, ax.mean("head"), ax.max("layer"))
    got = reduce(model, SOURCE, TARGET)
    assert got.dims == ("target", "source")
    assert "mean(head);max(layer)" in got.attrs["reductions"]
    assert model.hf.config._attn_implementation == "sdpa"  # switched back after the call
    out, first, end = hf_attentions(ax.load_model(hf, tokenizer=tok), SOURCE, TARGET)
    want = torch.stack(out.attentions).mean(2).amax(0)[0].numpy()  # [query, key]
    rows = want[np.arange(first, end) - 1]
    np.testing.assert_allclose(np.nan_to_num(got.values), np.tril(rows, first - 1), atol=1e-6)


def naive_rollout(maps) -> np.ndarray:
    """prod_l (0.5 * mean_heads A_l + 0.5 I), rows renormalised, written as a plain loop."""
    result = None
    for a in maps:
        a = a[0].mean(0).double().numpy()
        a = 0.5 * a + 0.5 * np.eye(len(a))
        a = a / a.sum(1, keepdims=True)
        result = a if result is None else a @ result
    return result


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rollout_equals_naive_product(models, arch):
    model = models[arch]
    got = rollout(model, SOURCE, TARGET)
    out, first, end = hf_attentions(model, SOURCE, TARGET)
    want = naive_rollout(out.attentions)[first - 1 : end - 1]
    assert got.dims == ("target", "source")
    assert np.isnan(got.values[np.triu_indices(len(want), first, got.shape[1])]).all()
    np.testing.assert_allclose(np.nan_to_num(got.values), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum("source").values, 1.0, rtol=1e-5)


def naive_joint_rollout(model) -> tuple[np.ndarray, int]:
    """The decoder rows of one (S + T) x (S + T) product, encoder rows fixed at [R_enc, 0], and S."""
    out, first, end = hf_attentions(model, SOURCE, TARGET)
    encoder = naive_rollout(out.encoder_attentions)
    n_src, n_dec = encoder.shape[0], end
    joint = np.zeros((n_src + n_dec, n_src + n_dec))
    joint[:n_src, :n_src] = encoder
    joint[n_src:, n_src:] = np.eye(n_dec)
    for self_map, cross_map in zip(out.decoder_attentions, out.cross_attentions, strict=True):
        step = np.eye(n_src + n_dec)
        step[n_src:, n_src:] = naive_rollout([self_map])
        joint = step @ joint
        step = np.eye(n_src + n_dec)
        step[n_src:, :n_src] = 0.5 * cross_map[0].mean(0).double().numpy()
        step[n_src:, n_src:] = 0.5 * np.eye(n_dec)
        joint = step @ joint
    return joint[n_src + first - 1 : n_src + end - 1], n_src


@pytest.mark.parametrize("arch", ["marian", "t5"])
def test_encoder_decoder_rollout_equals_joint_product(models, arch):
    """The decoder rows of one (S + T) x (S + T) product: encoder rows fixed at [R_enc, 0]."""
    model = models[arch]
    want, n_src = naive_joint_rollout(model)
    got = rollout(model, SOURCE, TARGET, attribute_target=True)
    np.testing.assert_allclose(np.nan_to_num(got.values), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum("source").values, 1.0, rtol=1e-5)
    only_source = rollout(model, SOURCE, TARGET)
    np.testing.assert_allclose(only_source.values, want[:, :n_src], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_a_float64_models_rollout_keeps_float64(arch):
    """The product of maps is taken in the model's float64, not rounded to float32 on the way."""
    hf, tok = tiny_model(arch)
    model = ax.load_model(hf.double(), tokenizer=tok)
    if model.is_encoder_decoder:
        want, _ = naive_joint_rollout(model)
        got = rollout(model, SOURCE, TARGET, attribute_target=True)
    else:
        out, first, end = hf_attentions(model, SOURCE, TARGET)
        want = naive_rollout(out.attentions)[first - 1 : end - 1]
        got = rollout(model, SOURCE, TARGET)
    assert got.dtype == np.float64
    # float32 products are ~1e-7 off: only a float64 product meets 1e-12
    np.testing.assert_allclose(np.nan_to_num(got.values), want, rtol=1e-12, atol=1e-14)


def test_rollout_batched_equals_single(models):
    model = models["llama"]
    pairs = PAIRS[:2]
    batched = rollout(model, [s for s, _ in pairs], [t for _, t in pairs])
    for i, (source, target) in enumerate(pairs):
        single = rollout(model, source, target)
        part = batched.isel(example=i).sel(target=single.target, source=single.source)
        np.testing.assert_allclose(part.values, single.values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "t5", "marian"])
def test_streamed_maps_equal_the_returned_ones(models, arch, monkeypatch):
    """The hooks found from the model's own recording table give what output_attentions gives
    (the path a model without such a table takes)."""
    from attrax import _model

    model = models[arch]
    found = _model.attention_modules(model.hf)
    stacks = sorted({stack for stack, _ in found.values()})
    assert stacks == (["cross", "decoder", "encoder"] if model.is_encoder_decoder else ["self"])
    streamed = (
        attention(model, SOURCE, TARGET, attribute_target=model.is_encoder_decoder),
        rollout(model, SOURCE, TARGET, attribute_target=model.is_encoder_decoder),
    )
    monkeypatch.setattr(_model, "attention_modules", lambda hf: {})
    returned = (
        attention(model, SOURCE, TARGET, attribute_target=model.is_encoder_decoder),
        rollout(model, SOURCE, TARGET, attribute_target=model.is_encoder_decoder),
    )
    for a, b in zip(streamed, returned, strict=True):
        np.testing.assert_array_equal(a.values, b.values)


_LONG = """
import attrax as ax
from attrax.testing import corpus, tiny_model
hf, tok = tiny_model("gpt2", n_embd=32, n_layer=32, n_head=4, n_positions=2048)
model = ax.load_model(hf, tokenizer=tok)
words = (" ".join(corpus()).split() * 4)[:{words}]
prompt, target = " ".join(words[:-4]), " " + " ".join(words[-4:])
def warm():
    ax.{method}(model, "a b c", " d e")
def call():
    out = ax.{method}(model, prompt, target)
    return model.tokenizer(prompt + target, return_length=True)["length"]
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["attention", "rollout"])
def test_long_inputs_never_hold_every_layers_maps(peak_above_start, method):
    """~2000 tokens, 32 layers, 4 heads: every layer's maps at once would be L*L*32*4*4 bytes
    (2 GB); the call stays far below."""
    got = peak_above_start(_LONG.format(method=method, words=1250))
    length = got["result"][0] if isinstance(got["result"], list) else got["result"]
    assert length > 1500, length
    every_map = length * length * 32 * 4 * 4
    print(
        f"{method}: {length} tokens, peak {got['peak'] / 2**20:.0f} MiB, maps {every_map / 2**20:.0f} MiB"
    )
    assert got["peak"] < every_map / 6, (got["peak"] / 2**20, every_map / 2**20)
