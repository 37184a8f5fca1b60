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

# the MLP's output projection, whose input is its neurons, per architecture; {} is the block
DOWN = {
    "gpt2": "transformer.h.{}.mlp.c_proj",
    "llama": "model.layers.{}.mlp.down_proj",
    "opt": "model.decoder.layers.{}.fc2",
    "bert": "bert.encoder.layer.{}.output.dense",
    "distilbert": "distilbert.transformer.layer.{}.ffn.lin2",
    "marian": "model.decoder.layers.{}.fc2",
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


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
def test_decoder_only_equals_the_loop(arch):
    if arch == "opt":
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
        assert np.abs(got - want).max() <= 1e-9 * max(1.0, np.abs(want).max()), arch
        assert np.abs(want).max() > 1e-6  # the test can tell


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
        np.testing.assert_allclose(got.values, alone.values, atol=1e-10)
        np.testing.assert_allclose(got.completeness_gap, alone.completeness_gap, atol=1e-10)
    small = ax.knowledge_neurons(
        model, prompts, targets, steps=3, layers=[0, -1], batch_size=1, chunk_size=1
    )
    np.testing.assert_allclose(small.values, both.values, atol=1e-10, equal_nan=True)


def test_positions_and_contrast():
    model = ax.load_model()
    kn = ax.knowledge_neurons(model, "1 2 3 =", " 3 2 1", steps=2, positions=[-1])
    assert kn.target.values.tolist() == [6]
    full = ax.knowledge_neurons(model, "1 2 3 =", " 3 2 1", steps=2, objective="logit")
    versus = ax.knowledge_neurons(
        model, "1 2 3 =", " 3 2 1", steps=2, objective="logit", contrast=" 1 2 3"
    )
    assert "contrast_token" in versus.coords
    assert not np.allclose(full.values, versus.values)


def test_bfloat16_runs_and_is_finite():
    hf, tok = tiny_model("llama")
    model = ax.load_model(hf.to(torch.bfloat16), tokenizer=tok)
    kn = ax.knowledge_neurons(model, PROMPT, TARGET, steps=2)
    assert kn.dtype == np.float32 and bool(np.isfinite(kn.values).all())


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
