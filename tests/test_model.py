"""The model adapter: loading paths, embeddings, logits only where asked."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import xarray as xr
from safetensors.torch import load_file, save_file

import attrax as ax
from attrax import _model
from attrax._names import METHODS
from attrax.testing import save_tiny_model, tiny_classifier, tiny_model, train_tokenizer
from tests.conftest import ARCHS, PAIRS, QUICK

# the quick options of each method, and attribution patching's corrupted prompt
SMALL = {
    **QUICK,
    "attribution_patching": {"corrupted": "The capital of Spain is"},
    "activation_patching": {"corrupted": "The capital of Spain is", "layers": 0},
    "edge_attribution_patching": {"corrupted": "The capital of Spain is"},
    "edge_patching": {"corrupted": "The capital of Spain is", "patch": [["input", "logits"]]},
}


@pytest.mark.parametrize("arch", ["gpt2", "marian"])
def test_load_from_local_directory(tmp_path, arch):
    path = save_tiny_model(arch, tmp_path / arch)
    model = ax.load_model(path)
    assert model.name == str(path)
    hf, tok = tiny_model(arch)
    direct = ax.load_model(hf, tokenizer=tok)
    a = ax.saliency(model, *PAIRS[0])
    b = ax.saliency(direct, *PAIRS[0])
    np.testing.assert_allclose(a.values, b.values, rtol=1e-6, atol=1e-9)
    assert ax.saliency(str(path), *PAIRS[0]).attrs["model"] == str(path)


def test_load_errors(tmp_path):
    with pytest.raises(ax.ModelError, match="is not a loadable directory"):
        ax.load_model(tmp_path)
    with pytest.raises(ax.ModelError, match="`tokenizer` is required"):
        ax.load_model(tiny_model("gpt2")[0])
    with pytest.raises(ax.ModelError, match="`model` must be"):
        ax.load_model(3.5)
    with pytest.raises(ax.OptionError, match="`attn_implementation`"):
        ax.load_model(
            *tiny_model("gpt2")[:1], tokenizer=tiny_model("gpt2")[1], attn_implementation="flash"
        )
    hf, tok = tiny_model("gpt2")
    with pytest.raises(ax.OptionError, match="`device` 'gpu'"):
        ax.load_model(hf, tokenizer=tok, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ax.OptionError, match="`device` 'cuda'"):
            ax.load_model(hf, tokenizer=tok, device="cuda")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_weights_that_do_not_load_whole_are_one_model_error(tmp_path):
    saved = save_tiny_model("gpt2", tmp_path / "gpt2")
    truncated = _copy(saved, tmp_path / "truncated")
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ax.ModelError, match=r"its weights do not load \(.*incomplete metadata"):
        ax.load_model(truncated)

    wider = _copy(saved, tmp_path / "wider")
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "n_embd": 2 * config["n_embd"]}))
    with pytest.raises(
        ax.ModelError, match=r"config\.json disagrees with its weights \(.*checkpoint \[32"
    ):
        ax.load_model(wider)

    incomplete = _copy(saved, tmp_path / "incomplete")
    tensors = load_file(incomplete / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, incomplete / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ax.ModelError, match=r"GPT2LMHeadModel with weights .* transformer\.h\.1\.mlp\.c_fc\.weight"
    ):
        ax.load_model(incomplete)


def _edited(saved: Path, to: Path, **config) -> Path:
    """A copy of the model directory ``saved`` whose config.json has ``config`` over it."""
    edited = _copy(saved, to)
    given = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**given, **config}))
    return edited


def test_configs_that_do_not_describe_the_weights_are_refused_before_building(tmp_path):
    """Each loaded until 2026-12-05: a config naming another model type (transformers built a
    6.5B-parameter Llama from its defaults, 21 GB, and was killed), one with fewer layers than
    the weights (the rest were dropped: a model of no blocks ran), a field of the wrong type
    (a raw validation error), and a path to a file of the directory (its config read as
    weights: an unpickling traceback)."""
    saved = save_tiny_model("gpt2", tmp_path / "gpt2")
    llama = _edited(
        saved, tmp_path / "llama", model_type="llama", architectures=["LlamaForCausalLM"]
    )
    with pytest.raises(ax.ModelError, match=r"describes a llama model of 6,479,548,416 parameters"):
        ax.load_model(llama)
    fewer = _edited(saved, tmp_path / "fewer", n_layer=1)
    with pytest.raises(
        ax.ModelError, match=r"blocks its config.json has no place for \(transformer\.h\.1\."
    ):
        ax.load_model(fewer)
    typed = _edited(saved, tmp_path / "typed", n_embd="abc")
    with pytest.raises(ax.ModelError, match=r"not a loadable directory: .*'n_embd'.* got str"):
        ax.load_model(typed)
    with pytest.raises(
        ax.ModelError, match=r"config\.json' is a file: expected the model's directory"
    ):
        ax.load_model(saved / "config.json")


def test_hand_edited_architectures_and_tokenizer_fields(tmp_path):
    """A string for the `architectures` list was refused as "a G, P, T, 2... checkpoint", a
    number in it and a text `model_max_length` were raw errors (until 2026-12-06)."""
    saved = save_tiny_model("gpt2", tmp_path / "gpt2")
    one = _edited(saved, tmp_path / "one", architectures="GPT2LMHeadModel")
    assert ax.load_model(one).task == "generation"
    numbered = _edited(saved, tmp_path / "numbered", architectures=[123])
    with pytest.raises(ax.ModelError, match=r"`architectures` must be a list of class names"):
        ax.load_model(numbered)
    longest = _copy(saved, tmp_path / "longest")
    config = json.loads((longest / "tokenizer_config.json").read_text())
    config["model_max_length"] = "long"
    (longest / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ax.ModelError, match=r"`model_max_length` .* got 'long'"):
        ax.load_model(longest)


def _tiny_bert(**overrides):
    """A WordPiece tokenizer and a one-layer BERT config sized to it."""
    tokenizer = train_tokenizer("wordpiece")
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        **overrides,
    )
    return tokenizer, config


@pytest.mark.parametrize("architecture", ["BertForNextSentencePrediction", None])
def test_heads_attrax_does_not_attribute_are_refused(tmp_path, architecture):
    tokenizer, config = _tiny_bert()
    hf = getattr(transformers, architecture or "BertForSequenceClassification")(config)
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    if architecture is None:  # no `architectures` in the config: the missing head still tells
        config = json.loads((tmp_path / "config.json").read_text())
        del config["architectures"]
        (tmp_path / "config.json").write_text(json.dumps(config))
    named = f"is a {architecture} checkpoint" if architecture else "loads as BertLMHeadModel"
    with pytest.raises(ax.ModelError, match=named):
        ax.load_model(tmp_path)
    if architecture is None:  # a classifier's weights, read as a language model: no LM head
        with pytest.raises(ax.ModelError, match=r"newly initialised: cls\.predictions\.bias"):
            ax.load_model(tmp_path)


@pytest.mark.parametrize(
    ("architecture", "task"),
    [
        ("BertForSequenceClassification", "sequence-classification"),
        ("BertForTokenClassification", "token-classification"),
        ("BertForQuestionAnswering", "question-answering"),
        ("BertForMaskedLM", "fill-mask"),
    ],
)
def test_classifier_checkpoints_load_as_classifiers(tmp_path, architecture, task):
    tokenizer, config = _tiny_bert(num_labels=2)
    getattr(transformers, architecture)(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = ax.load_model(tmp_path)
    assert model.task == task and type(model.hf).__name__ == architecture
    # attrax's view of the classifier against its own forward from ids: bidirectional, and the
    # class logits from embeddings (a padded batch) are HF's
    assert model.model_type == "encoder-only" and not model.causal
    encoded = tokenizer(["the film was great", "bad"], padding=True, return_tensors="pt")
    ids, mask = encoded.input_ids, encoded.attention_mask
    assert not bool(mask.all())
    with torch.no_grad():
        out = model.hf(input_ids=ids, attention_mask=mask)
        if task == "question-answering":  # start and end logits, padding without probability
            index = torch.tensor([[0, 1], [0, 1]])
            got = model.logits_at(model.embed(ids), mask, index)
            want = torch.stack((out.start_logits, out.end_logits), 1)
            torch.testing.assert_close(got[:, :, mask[1].bool()], want[:, :, mask[1].bool()])
            assert bool((got[1, :, ~mask[1].bool()] < -1e30).all())
            return
        want = out.logits
        if task == "sequence-classification":
            got = model.logits_at(model.embed(ids), mask, torch.zeros(2, 1, dtype=torch.long))
            want = want[:, None]
        else:
            index = torch.arange(ids.shape[1]).expand(ids.shape)
            got = model.logits_at(model.embed(ids), mask, index)
            got, want = got[mask.bool()], want[mask.bool()]  # padding positions are not scored
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_language_model_architectures_are_not_refused_by_name():
    def unsupported(*names):
        return _model._unsupported_architectures(transformers.PretrainedConfig(architectures=names))

    lms = ("GPT2LMHeadModel", "LlamaForCausalLM", "MarianMTModel", "T5ForConditionalGeneration")
    # T5WithLMHeadModel: old T5 checkpoints; GPT2Model: headless, judged by its missing weights
    for name in (*lms, "T5WithLMHeadModel", "GPT2Model"):
        assert unsupported(name) == []
    assert unsupported() == []
    assert unsupported("RobertaForQuestionAnswering") == ["RobertaForQuestionAnswering"]


def test_a_directory_without_tokenizer_files_is_refused(tmp_path):
    path = save_tiny_model("gpt2", tmp_path / "gpt2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    with pytest.raises(ax.ModelError, match=r"has no tokenizer files \(none of tokenizer\.json"):
        ax.load_model(path)
    # a tokenizer given separately is fine
    assert ax.load_model(path, tokenizer=tiny_model("gpt2")[1]).model_type == "decoder-only"


@pytest.mark.parametrize(
    ("name", "text"),
    [("tokenizer.json", '{"broken'), ("tokenizer.json", "{}"), ("tokenizer_config.json", "{[")],
)
def test_tokenizer_files_that_do_not_load_are_a_model_error(tmp_path, name, text):
    """Corrupt tokenizer files were a raw JSONDecodeError or KeyError from transformers."""
    path = save_tiny_model("gpt2", tmp_path / "gpt2")
    (path / name).write_text(text)
    with pytest.raises(ax.ModelError, match="its tokenizer files do not load"):
        ax.load_model(path)


@pytest.mark.parametrize("offline", [False, True])
def test_a_name_that_is_not_local_fails_at_once(monkeypatch, offline):
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # what a machine without network sees, on any machine
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(_model, "_hub_reachable", lambda: False)
    start = time.perf_counter()
    why = "HF_HUB_OFFLINE is set" if offline else "the hub is not reachable"
    with pytest.raises(ax.ModelError, match=f"'no/such-model' does not exist locally.*{why}"):
        ax.load_model("no/such-model")
    with pytest.raises(ax.ModelError, match=r"'\./no/such-model' does not exist locally"):
        ax.load_model("./no/such-model")
    assert time.perf_counter() - start < 2.0


def test_parameters_frozen_and_eval(models):
    for model in models.values():
        assert not model.hf.training
        assert not any(p.requires_grad for p in model.hf.parameters())


def _training(classifier: bool = False):
    """A GPT-2 (or a BERT classifier) mid-training: train mode, its embeddings frozen (and the
    tied head), the rest trainable; and a snapshot of both states."""
    hf, tok = tiny_classifier("bert") if classifier else tiny_model("gpt2")
    hf.train().requires_grad_(True)
    hf.get_input_embeddings().requires_grad_(False)

    def state():
        return [p.requires_grad for p in hf.parameters()], [m.training for m in hf.modules()]

    return hf, tok, state


def _frozen_copy(hf, tok) -> ax.Model:
    import copy

    return ax.load_model(copy.deepcopy(hf).eval().requires_grad_(False), tokenizer=tok)


@pytest.mark.parametrize("name", [*METHODS, "step_scores", "deletion", "sufficiency"])
def test_every_method_leaves_an_unfrozen_models_gradients_and_modes_as_they_were(name):
    """``freeze=False``: load_model keeps each parameter's requires_grad, and each call gives
    back both those and the modules' modes (a training loop's ``.train()``), running the model
    frozen and in eval mode: the same values as on a frozen copy. (By default load_model
    freezes the model for good: a training loop after an attribution trains nothing.)"""
    classifier = name == "decompx"  # the sequence classifiers' method
    hf, tok, state = _training(classifier)
    grads = state()[0]
    assert any(grads) and not all(grads)
    model = ax.load_model(hf, tokenizer=tok, freeze=False)
    assert state()[0] == grads
    hf.train()  # as a training loop does before its steps
    before = state()
    fn, options = getattr(ax, name), {**SMALL.get(name, {})}
    args = ["the plot was good", "all"] if classifier else [*PAIRS[0]]
    if name in ("deletion", "sufficiency"):
        args.insert(0, ax.pipe(ax.saliency, ax.l2_norm)(_frozen_copy(hf, tok), *PAIRS[0]))
    got = fn(model, *args, **options)
    assert state() == before
    want = fn(_frozen_copy(hf, tok), *args, **options)
    for a, b in zip(_arrays(got), _arrays(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _arrays(result) -> list[np.ndarray]:
    if isinstance(result, xr.Dataset):
        return [np.asarray(v.values, dtype=float) for v in result.data_vars.values()]
    return [np.asarray(result.values, dtype=float)]


def test_an_unfrozen_model_trains_after_attribution_and_a_failed_call():
    """The trainable parameters get gradients from a loss after attrax's calls, a call that
    failed inside its run included; the frozen ones still get none."""
    hf, tok, state = _training()
    model = ax.load_model(hf, tokenizer=tok, freeze=False)
    hf.train()
    before = state()
    ax.integrated_gradients(model, *PAIRS[0], steps=3)

    def failing(logits, ids):
        if logits.shape[0] > 1_000_000:  # never: the check's random logits pass
            return logits
        raise RuntimeError("objective failed")

    with pytest.raises(Exception, match="objective failed"):
        ax.saliency(model, *PAIRS[0], objective=failing)
    assert state() == before
    ids = torch.tensor([tok(PAIRS[0][0] + PAIRS[0][1])["input_ids"]])
    hf(input_ids=ids, labels=ids).loss.backward()
    trained = [p for p in hf.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert hf.get_input_embeddings().weight.grad is None


def test_freeze_must_be_a_bool():
    hf, tok = tiny_model("gpt2")
    with pytest.raises(ax.OptionError, match="`freeze` must be True or False, got 'no'"):
        ax.load_model(hf, tokenizer=tok, freeze="no")


def test_outside_a_call_embed_gives_rows_without_a_graph():
    """Model.embed of an unfrozen table: its rows (a baseline to pass back), no graph."""
    hf, tok, _ = _training()
    hf.get_input_embeddings().requires_grad_(True)
    model = ax.load_model(hf, tokenizer=tok, freeze=False)
    rows = model.embed(torch.tensor([[5, 6, 7]]))
    assert not rows.requires_grad
    ids = torch.tensor([tok(PAIRS[0][0] + PAIRS[0][1])["input_ids"]])
    ig = ax.integrated_gradients(model, *PAIRS[0], steps=3, baseline=0 * model.embed(ids))
    assert np.isfinite(ig.completeness_gap.values).all()


def test_evaluate_sanity_checks_and_stacks_leave_an_unfrozen_model_as_it_was():
    """Also a stack of an unfrozen training model with a frozen one (stack_module_state refuses
    models whose modes or requires_grad differ: attrax stacks them frozen, in eval mode)."""
    hf, tok, state = _training()
    model = ax.load_model(hf, tokenizer=tok, freeze=False)
    hf.train()
    before = state()
    data = [{"input": PAIRS[0][0], "target": PAIRS[0][1]}]
    ax.evaluate(model, data, {"saliency": ax.saliency}, ["comprehensiveness"], top_k=1)
    ax.sanity_checks(model, data, ax.saliency)
    other, _ = tiny_model("gpt2", seed=1)
    stacked = ax.stack_models([model, ax.load_model(other, tokenizer=tok)])
    got = ax.saliency(stacked, *PAIRS[0])
    assert state() == before
    alone = ax.saliency(_frozen_copy(hf, tok), *PAIRS[0])
    np.testing.assert_allclose(got.isel(model=0).values, alone.values, rtol=1e-5, atol=1e-7)


def test_discretized_ig_follows_a_trained_embedding_table():
    """DIG's nearest neighbours are cached per model and side, until the table is edited in place
    (an optimizer step): until 2026-12-06 they were kept, silently stale."""
    hf, tok = tiny_model("gpt2")
    model = ax.load_model(hf, tokenizer=tok, freeze=False)
    options = {"steps": 3, "neighbours": 3}
    ax.discretized_integrated_gradients(model, *PAIRS[0], **options)  # fills the cache
    with torch.no_grad():
        table = hf.get_input_embeddings().weight
        table.mul_(torch.linspace(0.5, 1.5, table.shape[1]))
    got = ax.discretized_integrated_gradients(model, *PAIRS[0], **options)
    want = ax.discretized_integrated_gradients(_frozen_copy(hf, tok), *PAIRS[0], **options)
    np.testing.assert_allclose(got.values, want.values, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_at_equal_full_forward(models, arch):
    """A batch from embeddings, the second row right-padded, against the HF model's own forward
    from ids of each row alone: embedding scale, positions, heads and the padding mask."""
    model = models[arch]
    rows = [[5, 9, 12, 7, 3, 8], [6, 11, 4, 10]]
    ids = torch.tensor([row + [model.pad_token_id] * (6 - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (6 - len(row)) for row in rows])
    index = torch.tensor([[4, 1], [3, 0]])
    embeds = model.embed(ids)
    with torch.no_grad():
        if model.is_encoder_decoder:
            got = model.logits_at(embeds, mask, index, model.embed(ids, "target"), mask)
        else:
            got = model.logits_at(embeds, mask, index)
        for b, row in enumerate(rows):
            alone = torch.tensor([row])
            if model.is_encoder_decoder:
                full = model.hf(input_ids=alone, decoder_input_ids=alone).logits
            else:
                full = model.hf(input_ids=alone).logits
            torch.testing.assert_close(got[b], full[0, index[b]], rtol=1e-5, atol=1e-5)


def test_lm_head_sees_only_attributed_positions(models):
    model = models["gpt2"]
    seen = []
    head = model.hf.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    try:
        da = ax.saliency(model, *PAIRS[1], positions=[-1])
    finally:
        handle.remove()
    assert da.sizes["target"] == 1
    # the forward runs the head on no position; the objective then on the one attributed
    # position (one example: one row, however the head's input is shaped)
    rows = [int(np.prod(shape[:-1])) for shape in seen]
    assert rows and all(n <= 1 for n in rows), seen
    assert any(n == 1 for n in rows), seen


def test_sdpa_equals_eager():
    hf, tok = tiny_model("gpt2")
    eager = ax.saliency(ax.load_model(hf, tokenizer=tok), *PAIRS[0])
    hf2, tok2 = tiny_model("gpt2")
    sdpa = ax.saliency(ax.load_model(hf2, tokenizer=tok2, attn_implementation="sdpa"), *PAIRS[0])
    np.testing.assert_allclose(sdpa.values, eager.values, rtol=1e-4, atol=1e-7)


def test_activations_only_swapped_inside_attrax_calls(models):
    # elementwise activations run as one Function with a saved derivative during attrax's
    # forwards; the user's model keeps its own modules
    for arch, kinds in (("gpt2", {"gelu_tanh"}), ("llama", {"silu"}), ("t5", {"relu"})):
        model = models[arch]
        assert {_model.activation_kind(a) for a in model._activations} == kinds
        ax.saliency(model, *PAIRS[0])
        assert all("forward" not in vars(a) for a in model._activations)


@pytest.mark.parametrize("kind", ["gelu_tanh", "gelu", "silu", "relu", "relu2"])
def test_activation_value_and_derivative_match_autograd(kind):
    reference = {
        "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
        "gelu": torch.nn.functional.gelu,
        "silu": torch.nn.functional.silu,
        "relu": torch.relu,
        "relu2": lambda x: torch.where(x > 0, x * x, 0.0),
    }[kind]
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64).requires_grad_(True)
    y = _model._Activation.apply(x, kind)[0]
    (d,) = torch.autograd.grad(y.sum(), x)
    (d_ref,) = torch.autograd.grad(reference(x).sum(), x)
    torch.testing.assert_close(y, reference(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d, d_ref, rtol=1e-10, atol=1e-12)
    # forward mode, and vmap over cotangents (what the engine does)
    tangent = torch.randn_like(x)
    _, jvp_out = torch.func.jvp(lambda v: _model._Activation.apply(v, kind)[0], (x,), (tangent,))
    torch.testing.assert_close(jvp_out, tangent * d_ref, rtol=1e-10, atol=1e-12)
    _, pullback = torch.func.vjp(lambda v: _model._Activation.apply(v, kind)[0], x)
    cotangents = torch.randn(3, *x.shape, dtype=x.dtype)
    (batched,) = torch.vmap(pullback)(cotangents)
    torch.testing.assert_close(batched, cotangents * d_ref, rtol=1e-10, atol=1e-12)


def test_auto_attention_policy(models, monkeypatch):
    model = models["gpt2"]
    assert model.attn_implementation == "auto"
    assert model.hf.config._attn_implementation == "eager"  # what runs between attrax calls
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    low = _model.SDPA_MIN_TOKENS
    assert model.attention_for(low - 1, cpu) == "eager"
    assert model.attention_for(low, cpu) == "sdpa"
    # on a GPU eager was faster before the folded SDPA backward; it is measured faster from 1,152
    gpu_low = _model.SDPA_MIN_TOKENS_GPU
    assert low < gpu_low <= 1152
    assert model.attention_for(gpu_low - 1, gpu) == "eager"
    assert model.attention_for(gpu_low, gpu) == "sdpa"
    monkeypatch.setattr(model.hf, "_supports_sdpa", False)
    assert model.attention_for(4 * low, cpu) == "eager"
    for explicit in ("eager", "sdpa"):
        hf, tok = tiny_model("gpt2")
        chosen = ax.load_model(hf, tokenizer=tok, attn_implementation=explicit)
        assert chosen.attn_implementation == explicit
        assert chosen.hf.config._attn_implementation == explicit
        assert chosen.attention_for(1, cpu) == chosen.attention_for(4 * low, cpu) == explicit
    with pytest.raises(ax.OptionError, match="`attn_implementation` must be one of"):
        ax.Model(hf, tok, attn_implementation="flash")


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_sdpa_forwards_equal_eager_forwards(models, arch, sdpa_always):
    # perturbation methods only run forwards; "auto" gives long inputs SDPA there too
    model = models[arch]
    sources, targets = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    hf, tok = tiny_model(arch)  # the same weights, on eager attention whatever the length
    eager = ax.occlusion(
        ax.load_model(hf, tokenizer=tok, attn_implementation="eager"), sources, targets
    )
    seen = sdpa_always(model)
    sdpa = ax.occlusion(model, sources, targets)
    assert set(seen) == {"sdpa"}
    np.testing.assert_allclose(sdpa.values, eager.values, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["gelu_tanh", "gelu", "silu", "relu", "relu2", "tanh", "sigmoid"])
def test_one_backward_activation_is_autograds_own(kind):
    """A one-target call's activations (``one_backward``) give autograd's own gradient, bit for
    bit, and the guided rule still applies."""
    reference = {
        "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
        "gelu": torch.nn.functional.gelu,
        "silu": torch.nn.functional.silu,
        "relu": torch.relu,
        "relu2": lambda x: torch.square(torch.relu(x)),  # transformers' ReLUSquaredActivation
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
    }[kind]
    x = torch.linspace(-6, 6, 1001).requires_grad_(True)
    grad = torch.randn_like(x)
    with _model.one_backward():
        y = _model.apply_activation(x, kind)
    (d,) = torch.autograd.grad(y, x, grad)
    (d_ref,) = torch.autograd.grad(reference(x), x, grad)
    assert torch.equal(y, reference(x)) and torch.equal(d, d_ref)
    with _model.one_backward(), _model.backward_rule("guided"):
        guided = _model.apply_activation(x, kind)
    (g,) = torch.autograd.grad(guided, x, grad)
    want = torch.relu(d_ref) if kind in _model.GUIDED_KINDS else d_ref
    assert torch.equal(g, want)


def test_a_tokenizer_that_is_not_the_models_is_refused():
    """Token ids past the embedding table are a ModelError naming the token, before torch's
    IndexError in the lookup: for a language model's prompt and target, and a classifier's
    text; a tokenizer that is no tokenizer is refused at load."""
    small = ax.load_model()  # 14 embedding rows
    _, big = tiny_model("gpt2")
    other = ax.load_model(small.hf, tokenizer=big)
    with pytest.raises(ax.ModelError, match=r"`inputs` has token id \d+ .* 14 rows"):
        ax.saliency(other, "The capital of France is", " Paris")
    with pytest.raises(ax.ModelError, match=r"`targets` has token id \d+"):
        ax.saliency(other, "$%&", " Paris")  # the prompt's ids (4, 5, 6) have rows
    classifier = ax.load_model("attrax:classifier")
    rows = classifier.embedding_rows()
    beyond = max(big.get_vocab().values())
    assert beyond >= rows
    mixed = ax.load_model(classifier.hf, tokenizer=big)
    with pytest.raises(ax.ModelError, match="`inputs` has token id"):
        ax.saliency(mixed, big.decode([beyond]))
    with pytest.raises(ax.ModelError, match="`tokenizer` must be a transformers tokenizer"):
        ax.load_model(tokenizer=3)


def test_the_meta_device_is_refused_by_name():
    """The 'meta' device holds no values: torch's raw errors came from the first probe."""
    with pytest.raises(ax.OptionError, match="`device` 'meta'"):
        ax.load_model(device="meta")
    hf, tok = tiny_model("gpt2")
    with pytest.raises(ax.ModelError, match="weights on the 'meta' device"):
        ax.load_model(hf.to("meta"), tokenizer=tok)
    model = ax.load_model()
    with pytest.raises(ax.OptionError, match="`baseline` is a tensor on the 'meta' device"):
        ax.integrated_gradients(
            model,
            "1 2 3 =",
            " 3 2 1",
            steps=2,
            baseline=torch.zeros(model.hidden_size, device="meta"),
        )


@pytest.mark.parametrize("how", ["input_ids", "inputs_embeds"])
def test_a_model_whose_own_forward_fails_is_refused(how):
    """An inconsistent config (key-value heads that do not divide the heads) or a model that takes
    no ``inputs_embeds`` fails inside transformers: loading says so in a ModelError."""
    hf, tok = tiny_model("llama")
    original = hf.model.forward

    def forward(*args, **kwargs):
        if kwargs.get(how) is not None:
            raise RuntimeError("The size of tensor a (4) must match the size of tensor b (8)")
        return original(*args, **kwargs)

    hf.model.forward = forward
    with pytest.raises(ax.ModelError, match=rf"forward from `{how}` fails .*tensor a \(4\)"):
        ax.load_model(hf, tokenizer=tok)


def test_a_head_that_reads_another_layout_is_refused():
    """ProphetNet's head reads its n-gram streams ``[B, n, L, H]``: the check of the split
    forward against the model's logits refuses it instead of failing inside it."""
    _, tok = tiny_model("marian")
    config = transformers.ProphetNetConfig(
        vocab_size=len(tok), hidden_size=32, encoder_ffn_dim=64, decoder_ffn_dim=64,
        num_encoder_layers=2, num_decoder_layers=2, num_encoder_attention_heads=4,
        num_decoder_attention_heads=4, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id,
    )  # fmt: skip
    hf = transformers.AutoModelForSeq2SeqLM.from_config(config)
    with pytest.raises(ax.ModelError, match="not the output projection of its last hidden"):
        ax.load_model(hf, tokenizer=tok)


def test_a_layer_norm_of_a_class_of_its_own_is_known_by_what_it_does():
    """Cohere 2's LayerNorm is no torch LayerNorm and no class attrax names: read as an RMSNorm,
    DLA's terms missed a tiny model's logit by 2e-3. Whether a norm centres is probed: its output
    does not move when every input moves by one constant. An RMSNorm's does."""
    from transformers.models.cohere2.modeling_cohere2 import Cohere2LayerNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from attrax._model import norm_centers

    torch.manual_seed(0)
    centring, scaling = Cohere2LayerNorm(8), LlamaRMSNorm(8)
    for norm in (centring, scaling):
        torch.nn.init.normal_(norm.weight)
    assert norm_centers(centring) and norm_centers(torch.nn.LayerNorm(8))
    assert not norm_centers(scaling)
    # in half precision too, whose shifted inputs would round apart
    assert norm_centers(centring.to(torch.bfloat16)) and not norm_centers(scaling.bfloat16())


def test_the_tokenizer_may_follow_the_model_positionally():
    """``ax.load_model(hf, tok)``, as ``ax.Model(hf, tok)`` takes them, was a TypeError (until
    2026-12-06)."""
    from attrax.testing import tiny_model

    hf, tok = tiny_model("gpt2")
    model = ax.load_model(hf, tok)
    assert model.tokenizer is tok and model.hf is hf


def test_the_adapters_public_methods_check_what_they_are_given():
    """`Model.embed`, `generate` and `head` took raw values unchecked: an id past the table was
    torch's IndexError, `side="sideways"` the source's embeddings, a text prompt a ValueError
    (until 2026-12-06)."""
    model = ax.load_model()
    with pytest.raises(ax.InputError, match=r"`ids` holds ids outside the source embedding"):
        model.embed(torch.tensor([[10**6]]))
    with pytest.raises(ax.OptionError, match=r"`side` must be 'source' or 'target'"):
        model.embed(torch.tensor([[5]]), "sideways")
    with pytest.raises(ax.InputError, match=r"`ids` must be an int tensor"):
        model.embed(torch.zeros(1, 2))
    with pytest.raises(ax.InputError, match=r"`prompts` must be a non-empty list of token-id"):
        model.generate("1 2 =", max_new_tokens=2)
    with pytest.raises(ax.InputError, match=r"`hidden` must be a tensor"):
        model.head("x")


def _paused(hf, block: torch.nn.Module, first, second, wait: float = 0.5) -> dict[str, object]:
    """Run ``second`` in a thread that pauses at ``block``'s first forward, and ``first`` in this
    thread while it is paused (when nothing makes ``first`` wait); both results, or the error."""
    import threading

    paused, done = threading.Event(), threading.Event()
    out: dict[str, object] = {}

    def hook(module, args):
        if threading.current_thread().name == "second" and not paused.is_set():
            paused.set()
            done.wait(wait)  # first runs meanwhile, unless it waits for this call to end

    def run(key, fn):
        try:
            out[key] = fn()
        except Exception as err:  # the test reports what a racing call raised
            out[key] = err

    handle = block.register_forward_pre_hook(hook)
    thread = threading.Thread(target=run, args=("second", second), name="second")
    thread.start()
    paused.wait(5)
    run("first", first)
    done.set()
    thread.join()
    handle.remove()
    return out


def test_two_wrappers_of_one_model_take_turns():
    """The lock was each wrapper's until 2026-12-06: a call through another wrapper of the same
    Hugging Face model ran inside a paused call, and LRP's attention was left on the model."""
    hf, tok = tiny_model("gpt2")
    one, two = ax.load_model(hf, tokenizer=tok), ax.load_model(hf, tokenizer=tok)
    assert one.call_lock is two.call_lock
    first = lambda: ax.attention(one, "The capital of France is", " Paris")  # noqa: E731
    second = lambda: ax.lrp(two, "The capital of Spain is", " Paris")  # noqa: E731
    alone = {"first": first(), "second": second()}
    got = _paused(hf, hf.transformer.h[1], first, second)
    for key, want in alone.items():
        xr.testing.assert_allclose(got[key], want)
    assert hf.config._attn_implementation == "eager"
    hf(input_ids=torch.tensor([[1, 2, 3]]))  # still runs outside attrax


def test_a_users_own_forward_on_a_module_is_kept():
    """A forward set on a module instance (a user's or accelerate's wrapper) was deleted by the
    methods that patch activations and LRP's layers until 2026-12-06."""
    hf, tok = tiny_model("llama")
    model = ax.load_model(hf, tokenizer=tok)
    wrappers = {}
    for module in hf.modules():
        original = module.forward
        wrappers[module] = module.forward = lambda *a, original=original, **k: original(*a, **k)
    for method in (ax.saliency, ax.lrp):
        method(model, *PAIRS[0])
        assert all(module.__dict__.get("forward") is w for module, w in wrappers.items())


def test_concurrent_loads_each_load_whole_and_leave_the_logging_as_found(tmp_path):
    """Concurrent loads are one at a time: transformers' from_pretrained is not thread-safe, and
    attrax silences its logging for a load (it was left silenced)."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers.utils import logging as hf_logging

    path = save_tiny_model("gpt2", tmp_path / "gpt2")
    before = hf_logging.get_verbosity()
    with ThreadPoolExecutor(4) as pool:
        models = list(pool.map(lambda _: ax.load_model(path), range(8)))
    assert hf_logging.get_verbosity() == before
    want = ax.saliency(models[0], *PAIRS[0])
    for model in models[1:]:
        xr.testing.assert_allclose(ax.saliency(model, *PAIRS[0]), want)


def _hf_greedy(hf, ids: list[int], n: int, **kwargs) -> list[int]:
    """Hugging Face's greedy continuation of one prompt, its own generation config."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(
            input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=1,
            max_new_tokens=n, **kwargs,
        )  # fmt: skip
    return out[0, 1:].tolist() if hf.config.is_encoder_decoder else out[0, len(ids) :].tolist()


def test_generation_stops_at_any_of_the_generation_configs_end_ids():
    """A chat model lists several end ids (Llama 3's, Gemma's end of turn): attrax stopped at the
    tokenizer's one alone and attributed the tokens after the model had finished, until
    2026-12-06."""
    hf, tok = tiny_model("llama")
    model = ax.load_model(hf, tokenizer=tok)
    ids = model.tokenizer("The capital of France is")["input_ids"]
    free = _hf_greedy(hf, ids, 8, eos_token_id=None)
    stop = free[3]  # a token the model produces: it now ends the turn
    hf.generation_config.eos_token_id = [tok.eos_token_id, stop]
    want = _hf_greedy(hf, ids, 8)
    assert want == free[: free.index(stop) + 1]
    assert model.generate([ids], 8) == [want]
    da = ax.step_scores(model, "The capital of France is", max_new_tokens=8)
    assert da.target_id.values.tolist() == want


def test_an_encoder_decoder_starts_as_its_generation_config_says():
    """Hugging Face generates from the generation config's decoder start; attrax teacher-forced
    from the config's (a negative margin for its own greedy tokens) until 2026-12-06."""
    hf, tok = tiny_model("bart")
    start = 5
    assert hf.config.decoder_start_token_id != start
    hf.generation_config.decoder_start_token_id = start
    model = ax.load_model(hf, tokenizer=tok)
    source = tok("The capital of France is")["input_ids"]
    want = _hf_greedy(hf, source, 4, forced_eos_token_id=None)  # no forced end (below)
    da = ax.step_scores(model, "The capital of France is", scores="probability", max_new_tokens=4)
    assert da.target_id.values.tolist() == want
    with torch.no_grad():
        logits = hf(
            input_ids=torch.tensor([source]), decoder_input_ids=torch.tensor([[start, *want[:-1]]])
        ).logits[0]
    p = logits.softmax(-1)[torch.arange(len(want)), torch.tensor(want)]
    np.testing.assert_allclose(da.values[:, 0], p.numpy(), rtol=1e-5)


def test_nllbs_generation_starts_with_the_target_language_as_its_text_targets_do():
    """NLLB's checkpoints force no language: Hugging Face's examples pass the target language's
    code to generate, and its text targets start with it. attrax generated without it (another
    language, or none) until 2026-12-06."""
    import json

    from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer

    base = train_tokenizer("t5")
    trained = json.loads(base.backend_tokenizer.to_str())["model"]
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for token in trained["vocab"]:
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    languages = ["eng_Latn", "fra_Latn", "deu_Latn"]
    tok = NllbTokenizer(
        vocab=vocab, merges=merges, src_lang="eng_Latn", tgt_lang="fra_Latn",
        extra_special_tokens=languages,
    )  # fmt: skip
    config = M2M100Config(
        vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = M2M100ForConditionalGeneration(config).eval()
    model = ax.load_model(hf, tokenizer=tok)
    source = tok("The capital of France is")["input_ids"]
    for language in ("fra_Latn", "deu_Latn"):  # the tokenizer's, read at each call
        tok.tgt_lang = language
        code = tok.convert_tokens_to_ids(language)
        assert tok(text_target="Paris")["input_ids"][0] == code
        want = _hf_greedy(hf, source, 5, forced_bos_token_id=code)
        da = ax.step_scores(model, "The capital of France is", max_new_tokens=5)
        assert da.target_id.values.tolist() == want and want[0] == code


@pytest.mark.parametrize("arch", ["bart", "marian"])  # their greedy tokens repeat
def test_a_generated_target_is_the_models_own_prediction_at_every_step(arch):
    """BART's and Marian's generation configs force </s> at the length limit, and a config's
    repetition penalty or n-gram blocking (Qwen2.5-Instruct's, bart-large-cnn's) picks other
    tokens than the top one: attrax explained those as the model's predictions (negative
    margins) until 2026-12-06."""
    hf, tok = tiny_model(arch)
    hf.generation_config.repetition_penalty = 3.0
    hf.generation_config.no_repeat_ngram_size = 1
    model = ax.load_model(hf, tokenizer=tok)
    prompt = "The capital of France is"
    source = tok(prompt)["input_ids"]
    neutral = dict(
        forced_eos_token_id=None, repetition_penalty=1.0, no_repeat_ngram_size=0,
        max_time=None, stop_strings=None,
    )  # fmt: skip
    want = _hf_greedy(hf, source, 5, **neutral)
    assert want != _hf_greedy(hf, source, 5)  # the configured processors change the tokens
    # nor what stops early or needs what attrax does not pass (a time limit, stop strings)
    hf.generation_config.max_time = 1e-9
    hf.generation_config.stop_strings = ["19"]
    da = ax.step_scores(model, prompt, scores="margin", max_new_tokens=5)
    assert da.target_id.values.tolist() == want
    assert (da.values >= 0).all()  # each target leads the others: the greedy token


def test_a_model_trained_since_loading_is_attributed_in_eval_mode_and_left_training():
    """A fine-tuning loop calls .train() after wrapping: attrax attributed with dropout on (87%
    off, and two calls differed) until 2026-12-06. Each call now runs in eval mode and puts
    every module's mode back."""
    hf, tok = tiny_model("gpt2", resid_pdrop=0.3, attn_pdrop=0.3, embd_pdrop=0.3)
    model = ax.load_model(hf, tokenizer=tok)
    want = ax.saliency(model, *PAIRS[0])
    hf.train()
    hf.transformer.h[0].eval()  # a mixed state is put back as it was
    modes = {name: m.training for name, m in hf.named_modules()}
    for _ in range(2):
        xr.testing.assert_allclose(ax.saliency(model, *PAIRS[0]), want)
    assert {name: m.training for name, m in hf.named_modules()} == modes


def test_what_attrax_forwards_would_skip_is_refused_at_the_call():
    """A hook on a language model or decoder-only classifier itself (a temperature on the
    logits), registered after loading, was skipped: attrax computes the logits from the head
    (76x off) until 2026-12-06; a model compiled in place raised IndexError in attention."""
    hf, tok = tiny_model("gpt2")
    model = ax.load_model(hf, tokenizer=tok)
    handle = hf.register_forward_hook(lambda module, args, out: out)
    with pytest.raises(ax.ModelError, match="has a forward hook on the model itself"):
        ax.saliency(model, *PAIRS[0])
    handle.remove()
    hf_classifier, tok_classifier = tiny_classifier("gpt2", "sequence")
    handle = hf_classifier.register_forward_pre_hook(lambda module, args: None)
    with pytest.raises(ax.ModelError, match="classification head"):
        ax.load_model(hf_classifier, tokenizer=tok_classifier)
    handle.remove()
    hf.compile()
    with pytest.raises(ax.ModelError, match=r"compiled in place \(`.compile\(\)`\)"):
        ax.attention(model, *PAIRS[0])
    wrapped = torch.nn.DataParallel(hf_classifier)
    with pytest.raises(ax.ModelError, match=r"pass the model it wraps, `model\.module`"):
        ax.load_model(wrapped, tokenizer=tok_classifier)


def test_an_encoder_classifiers_own_hook_is_honoured_and_tuple_outputs_are_refused():
    hf, tok = tiny_classifier("bert", "sequence")
    model = ax.load_model(hf, tokenizer=tok)
    plain = ax.saliency(model, "the cat sat", 0)
    handle = hf.register_forward_hook(lambda module, args, out: type(out)(logits=out.logits / 0.5))
    hooked = ax.saliency(model, "the cat sat", 0)  # attrax runs hf(...) itself: the hook runs
    assert not np.allclose(hooked.values, plain.values)
    handle.remove()
    hf.config.return_dict = False
    with pytest.raises(ax.ModelError, match=r"config\.return_dict=False"):
        ax.saliency(model, "the cat sat", 0)


def test_head_rows_are_the_full_projections_entries():
    """The logit objective's forwards read only the targets' rows of the output projection:
    equal to the whole vocabulary's logits at those ids on every language model of the
    architectures table, with biases (Marian's final_logits_bias), logit scales (Cohere,
    Granite) and soft caps (Gemma 2) alike; None where the projection is no plain Linear."""
    from tests.test_support import FAMILIES

    torch.manual_seed(0)
    rows_read = []
    for name, build in FAMILIES.items():
        model = build()
        if model.task != "generation":
            continue
        head = model.hf.get_output_embeddings()
        hidden = torch.randn(2, 3, model.hf.get_input_embeddings().weight.shape[1])
        ids = torch.randint(0, model.hf.get_input_embeddings().weight.shape[0], (2, 3))
        rows = model.head_rows(hidden.to(head.weight.dtype), ids)
        if rows is None:
            assert type(head) is not torch.nn.Linear, name
            continue
        want = model.head(hidden.to(head.weight.dtype)).gather(-1, ids[..., None])[..., 0]
        torch.testing.assert_close(rows, want, rtol=1e-5, atol=1e-5, msg=name)
        rows_read.append(name)
    assert {"GPT-2", "Gemma 2", "Cohere (Command R)", "Granite", "Marian", "T5"} <= set(rows_read)
