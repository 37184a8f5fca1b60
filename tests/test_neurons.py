"""Knowledge neurons (``ax.knowledge_neurons``, Dai et al. 2022) against a plain loop written
here: per layer, target and quadrature node, the Hugging Face model runs from ids with the MLP's
output projection's input replaced at the target's position by ``alpha * a + z`` (``z`` a leaf),
and ``torch.autograd.grad`` of that target's score gives ``dF/dz``; the nodes and weights are the
test's own. Also completeness along the scaling path, input x gradient at the neurons (one node
at 1 is gradient times activation), batching, chunking, errors and the CLI."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import attrax as ax
from attrax.testing import tiny_classifier, tiny_model
from tests.conftest import tiny_mixtral

# the MLP's output projection, whose input is its neurons, per architecture; {} is the block
DOWN = {
    "gpt2": "transformer.h.{}.mlp.c_proj",
    "llama": "model.layers.{}.mlp.down_proj",
    "opt": "model.decoder.layers.{}.fc2",
    "bert": "bert.encoder.layer.{}.output.dense",
    "distilbert": "distilbert.transformer.layer.{}.ffn.lin2",
    "marian": "model.decoder.layers.{}.fc2",
    "qwen3_5": "model.layers.{}.mlp.down_proj",
}
PROMPT, TARGET = "The capital of France is", " Paris"


def right_riemann(m: int) -> tuple[list[float], list[float]]:
    return [j / m for j in range(1, m + 1)], [1.0 / m] * m


class Loop:
    """One unpadded text through the Hugging Face model, the neurons of one layer replaced at
    one position."""

    def __init__(self, hf, path: str, ids, score, **kwargs) -> None:
        self.hf, self.path, self.ids, self.score, self.kwargs = hf, path, ids, score, kwargs

    def run(self, layer: int, position: int, alpha: float, grad: bool = True):
        """``(F(alpha * a), dF/dz, a)`` with ``a`` the clean neurons at ``position``."""
        module = self.hf.get_submodule(self.path.format(layer))
        found = {}

        def pre(_m, args):
            x = args[0]
            flat = x.dim() == 2  # OPT's fc2 takes the rows flattened
            full = x.view(1, -1, x.shape[-1]) if flat else x
            a = full[0, position].detach().clone()
            z = (alpha * a).requires_grad_(grad)
            full = full.clone()
            full[0, position] = z
            found["a"], found["z"] = a, z
            return (full.view(x.shape) if flat else full, *args[1:])

        handle = module.register_forward_pre_hook(pre)
        try:
            with torch.enable_grad():
                value = self.score(self.hf(input_ids=self.ids, **self.kwargs))
                g = torch.autograd.grad(value, found["z"])[0] if grad else None
        finally:
            handle.remove()
        return float(value.detach()), g, found["a"]

    def scores(self, layers, position: int, nodes, weights) -> np.ndarray:
        out = []
        for layer in layers:
            total = 0.0
            for alpha, w in zip(nodes, weights, strict=True):
                _, g, a = self.run(layer, position, alpha)
                total = total + w * g * a
            out.append(total.double().numpy())
        return np.stack(out)


def _gpt2():
    hf, tok = tiny_model("gpt2")
    return hf.double(), tok


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt", "qwen3_5"])
def test_decoder_only_equals_the_loop(arch):
    """Qwen 3.5: a hybrid, linear attention and attention layers each with an MLP."""
    if arch == "qwen3_5":
        from tests.test_architectures import _family

        _, tok = tiny_model("gpt2")
        hf = _family("qwen3_5", tok, attn_implementation="eager")
    elif arch == "opt":
        from transformers import OPTConfig, OPTForCausalLM

        _, tok = tiny_model("gpt2")
        config = OPTConfig(
            vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, ffn_dim=24,
            num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16,
            pad_token_id=tok.pad_token_id or 0,
        )  # fmt: skip
        torch.manual_seed(0)
        hf = OPTForCausalLM(config).eval()
    else:
        hf, tok = tiny_model(arch)
    hf = hf.double()
    model = ax.load_model(hf, tokenizer=tok)
    m = 4
    kn = ax.knowledge_neurons(model, PROMPT, TARGET, steps=m)
    prompt = model.tokenizer(PROMPT).input_ids
    assert int(kn.target[0]) == len(prompt)  # the targets follow the prompt's own ids
    ids = torch.tensor([prompt + kn.target_id.values.tolist()])
    nodes, weights = right_riemann(m)
    for target, token in zip(kn.target.values, kn.target_id.values, strict=True):
        position = int(target) - 1

        def score(out, position=position, token=int(token)):
            return torch.softmax(out.logits[0, position], -1)[token]

        loop = Loop(hf, DOWN[arch], ids[:, : position + 1], score)
        want = loop.scores(kn.layer.values, position, nodes, weights)
        got = kn.sel(target=target).values
        assert np.abs(got - want).max() <= 1e-9 * np.abs(want).max(), arch
        assert np.abs(want).max() > 1e-8  # the test can tell


def _mlm(arch: str):
    hf, tok = tiny_classifier(arch, "fill-mask")
    return ax.load_model(hf.double(), tokenizer=tok), tok


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_masked_lm_scales_the_mask_position(arch):
    model, tok = _mlm(arch)
    text = f"the capital of {tok.mask_token} is paris"
    m = 3
    kn = ax.knowledge_neurons(model, text, "france", steps=m, objective="logprob")
    enc = tok(text, return_tensors="pt")
    position = int((enc.input_ids[0] == tok.mask_token_id).nonzero()[0, 0])
    token = int(kn.target_id.item())
    kwargs = {}
    if (
        "token_type_ids" in enc
        and "token_type_ids" in inspect.signature(model.hf.forward).parameters
    ):
        kwargs["token_type_ids"] = enc.token_type_ids

    def score(out):
        return torch.log_softmax(out.logits[0, position], -1)[token]

    loop = Loop(model.hf, DOWN[arch], enc.input_ids, score, **kwargs)
    want = loop.scores(kn.layer.values, position, *right_riemann(m))
    assert kn.target.values.tolist() == [position]
    np.testing.assert_allclose(kn.isel(target=0).values, want, atol=1e-10, rtol=1e-7)


def test_sequence_classifier_scales_its_pooled_position():
    hf, tok = tiny_classifier("bert", num_labels=3)
    model = ax.load_model(hf.double(), tokenizer=tok)
    text = "a fine day out there"
    kn = ax.knowledge_neurons(model, text, "label_2", steps=3, layers=[1, 0])
    enc = tok(text, return_tensors="pt")

    def score(out):
        return torch.softmax(out.logits[0], -1)[2]

    loop = Loop(model.hf, DOWN["bert"], enc.input_ids, score, token_type_ids=enc.token_type_ids)
    want = loop.scores([1, 0], 0, *right_riemann(3))  # [CLS]
    assert kn.layer.values.tolist() == [1, 0]
    np.testing.assert_allclose(kn.isel(target=0).values, want, atol=1e-10, rtol=1e-7)


def test_encoder_decoder_scales_the_decoder_neurons():
    hf, tok = tiny_model("marian")
    model = ax.load_model(hf.double(), tokenizer=tok)
    kn = ax.knowledge_neurons(model, "the capital of france", "paris", steps=2)
    enc = tok("the capital of france", return_tensors="pt")
    decoder = [hf.config.decoder_start_token_id, *kn.target_id.values.tolist()]
    for j, (target, token) in enumerate(zip(kn.target.values, kn.target_id.values, strict=True)):
        position = int(target) - 1  # decoder position j predicts target j + 1

        def score(out, position=position, token=int(token)):
            return torch.softmax(out.logits[0, position], -1)[token]

        loop = Loop(
            hf, DOWN["marian"], enc.input_ids, score,
            decoder_input_ids=torch.tensor([decoder[: position + 1]]),
        )  # fmt: skip
        want = loop.scores(kn.layer.values, position, *right_riemann(2))
        np.testing.assert_allclose(kn.isel(target=j).values, want, atol=1e-10, rtol=1e-7)


def test_completeness_gap_is_the_layers_sum_against_the_loops_ends():
    """With Gauss-Legendre nodes the neurons of each layer add up to F(a) - F(0), which the
    loop computes by itself; the reported gap is that difference."""
    hf, tok = _gpt2()
    model = ax.load_model(hf, tokenizer=tok)
    kn = ax.knowledge_neurons(
        model, PROMPT, TARGET, steps=24, quadrature="gausslegendre", objective="logit"
    )
    sequence = tok(PROMPT).input_ids + kn.target_id.values.tolist()
    for target, token in zip(kn.target.values, kn.target_id.values, strict=True):
        position = int(target) - 1

        def score(out, position=position, token=int(token)):
            return out.logits[0, position, token]

        loop = Loop(hf, DOWN["gpt2"], torch.tensor([sequence[: position + 1]]), score)
        for layer in kn.layer.values:
            full, _, _ = loop.run(int(layer), position, 1.0, grad=False)
            zero, _, _ = loop.run(int(layer), position, 0.0, grad=False)
            summed = float(kn.sel(target=target, layer=layer).sum())
            assert abs(summed - (full - zero)) < 1e-6 * max(1.0, abs(full - zero))
            gap = float(kn.completeness_gap.sel(target=target, layer=layer))
            assert abs(gap - (summed - (full - zero))) < 1e-9
            assert abs(full - zero) > 1e-2  # zeroing the layer's neurons moves the score


def test_one_node_at_one_is_input_x_gradient_at_the_neurons():
    """``a * dF/da``: attrax's layer input x gradient at site='neurons', read at the target's
    position, computes it through another path (the probes of ``layers=``)."""
    model = ax.load_model()
    kn = ax.knowledge_neurons(model, "1 2 3 =", " 3 2 1", steps=1)
    ixg = ax.input_x_gradient(model, "1 2 3 =", " 3 2 1", layers="all", site="neurons")
    for target in kn.target.values:
        want = ixg.sel(target=target, source=int(target) - 1).transpose("layer", "neuron")
        np.testing.assert_allclose(kn.sel(target=target).values, want.values, atol=1e-6)


def test_batched_and_padded_equal_alone_and_chunks_change_nothing():
    hf, tok = tiny_model("llama")
    model = ax.load_model(hf.double(), tokenizer=tok)
    prompts, targets = ["The capital of France is", "Hello"], [" Paris", " world, café"]
    both = ax.knowledge_neurons(model, prompts, targets, steps=3, layers=[0, -1])
    for b, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        alone = ax.knowledge_neurons(model, p, t, steps=3, layers=[0, -1])
        got = both.isel(example=b).dropna("target", how="all")
        # Llama's softmax in float32 inside the float64 model: padding moves it by 2e-9
        np.testing.assert_allclose(got.values, alone.values, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(got.completeness_gap, alone.completeness_gap, atol=1e-8)
    small = ax.knowledge_neurons(
        model, prompts, targets, steps=3, layers=[0, -1], batch_size=1, chunk_size=1
    )
    np.testing.assert_allclose(small.values, both.values, rtol=1e-5, atol=1e-8, equal_nan=True)


def test_positions_and_a_contrast_are_the_difference_of_two_targets():
    """The scores are linear in the objective: a logit difference's are the target's less the
    contrast token's, each scored as a target of its own at the same position."""
    model = ax.load_model()
    kn = ax.knowledge_neurons(model, "1 2 3 =", " 3 2 1", steps=2, positions=[-1])
    assert kn.target.values.tolist() == [6]
    kw = {"steps": 2, "objective": "logit"}
    mine = ax.knowledge_neurons(model, "1 2 3 =", " 3 2 1", **kw)
    other = ax.knowledge_neurons(model, "1 2 3 =", " 1 2 3", **kw)
    versus = ax.knowledge_neurons(model, "1 2 3 =", " 3 2 1", contrast=" 1 2 3", **kw)
    assert versus.contrast_token.values.tolist() == ["1", "2", "3"]
    # the contrast's tokens at the target positions: the first one is read at the same position
    np.testing.assert_allclose(
        versus.isel(target=0).values, (mine - other).isel(target=0).values, atol=1e-5
    )
    assert np.abs(other.isel(target=0).values).max() > 1e-3


def test_a_decoder_classifier_scales_its_last_real_token():
    """GPT-2's classifier pools the last token that is not padding; a padded batch."""
    hf, tok = tiny_classifier("gpt2", num_labels=3)
    model = ax.load_model(hf.double(), tokenizer=tok)
    texts = ["a fine day out there", "the plot"]
    kn = ax.knowledge_neurons(model, texts, "label_1", steps=2)
    for b, text in enumerate(texts):
        ids = tok(text, return_tensors="pt").input_ids

        def score(out):
            return torch.softmax(out.logits[0], -1)[1]

        loop = Loop(model.hf, DOWN["gpt2"], ids, score)
        want = loop.scores(kn.layer.values, ids.shape[1] - 1, [0.5, 1.0], [0.5, 0.5])
        np.testing.assert_allclose(kn.isel(example=b, target=0).values, want, atol=1e-10)


def test_a_token_classifier_scales_each_token():
    hf, tok = tiny_classifier("bert", "token", num_labels=3)
    model = ax.load_model(hf.double(), tokenizer=tok)
    text = "a fine day out there"
    kn = ax.knowledge_neurons(model, text, "label_2", steps=2, positions=[1, 3])
    enc = tok(text, return_tensors="pt")
    for position in (1, 3):

        def score(out, position=position):
            return torch.softmax(out.logits[0, position], -1)[2]

        loop = Loop(model.hf, DOWN["bert"], enc.input_ids, score, token_type_ids=enc.token_type_ids)
        want = loop.scores(kn.layer.values, position, [0.5, 1.0], [0.5, 0.5])
        np.testing.assert_allclose(kn.sel(target=position).values, want, atol=1e-10, rtol=1e-7)


def test_a_feed_forward_run_in_chunks_changes_nothing():
    """transformers' ``chunk_size_feed_forward`` calls the output projection a chunk of positions
    at a time; every method's hooks read it whole (the neurons' site of the gradient methods
    too) and the model's setting is put back."""
    plain, _ = _mlm("bert")
    hf, tok = tiny_classifier("bert", "fill-mask", chunk_size_feed_forward=1)
    chunked = ax.load_model(hf.double(), tokenizer=tok)
    text = f"the capital of {tok.mask_token} is paris"
    for method, kw in (
        (ax.knowledge_neurons, {"steps": 2}),
        (ax.saliency, {"layers": "all", "site": "neurons"}),
    ):
        np.testing.assert_allclose(
            method(chunked, text, "france", **kw).values,
            method(plain, text, "france", **kw).values,
            rtol=1e-9, atol=1e-12,
        )  # fmt: skip
    assert chunked.hf.bert.encoder.layer[0].chunk_size_feed_forward == 1  # put back


def test_bfloat16_is_float64_within_its_rounding():
    hf, tok = tiny_model("llama")
    wide = ax.load_model(hf.double(), tokenizer=tok)
    want = ax.knowledge_neurons(wide, PROMPT, TARGET, steps=2, objective="logit").values
    narrow = ax.load_model(tiny_model("llama")[0].to(torch.bfloat16), tokenizer=tok)
    got = ax.knowledge_neurons(narrow, PROMPT, TARGET, steps=2, objective="logit")
    assert got.dtype == np.float32
    assert np.abs(got.values - want).max() < 0.05 * np.abs(want).max()
    assert np.abs(got.values[:, ::-1] - want).max() > 0.2 * np.abs(want).max()  # it can tell


def test_errors_name_the_option():
    model = ax.load_model()
    with pytest.raises(ax.OptionError, match="layers"):
        ax.knowledge_neurons(model, "1 2 =", " 2 1", layers=7)
    with pytest.raises(ax.OptionError, match="attribute_target"):
        ax.knowledge_neurons(model, "1 2 =", " 2 1", attribute_target=True)
    with pytest.raises(ax.OptionError, match="steps"):
        ax.knowledge_neurons(model, "1 2 =", " 2 1", steps=0)
    with pytest.raises(ax.OptionError, match="quadrature"):
        ax.knowledge_neurons(model, "1 2 =", " 2 1", quadrature="simpson")
    with pytest.raises(ax.OptionError, match="max_memory"):
        ax.knowledge_neurons(model, "1 2 =", " 2 1", max_memory="1KB")
    hf, tok = tiny_classifier("bert", "question-answering")
    qa = ax.load_model(hf, tokenizer=tok)
    with pytest.raises(ax.ModelError, match="knowledge_neurons"):
        ax.knowledge_neurons(qa, ("who", "the cat sat"))
    with pytest.raises(ax.ModelError, match=r"^knowledge_neurons: layer 0's MLP .* `layers`$"):
        ax.knowledge_neurons(tiny_mixtral(), PROMPT, TARGET)  # a mixture of experts


def test_cli_prints_each_targets_top_neurons(tmp_path, capsys):
    from attrax.cli import main

    code = main(
        ["attribute", "--method", "knowledge_neurons", "--input", "1 2 3 =", "--target",
         " 3 2 1", "-o", "steps=2", "--out", str(tmp_path / "kn.nc")]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "target 4" in out and "layer" in out and "neuron" in out
    saved = ax.load(tmp_path / "kn.nc")
    assert saved.dims == ("target", "layer", "neuron")
    code = main(
        ["attribute", "--method", "knowledge_neurons", "--input", "1 2 3 =", "--html",
         str(tmp_path / "kn.html")]
    )  # fmt: skip
    assert code == 2
    assert "no source" in capsys.readouterr().err
