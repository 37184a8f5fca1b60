"""docs/architectures.md's table is what runs: every method of a column on a tiny random model of
every row runs (✓) or is refused with an attrax error (—)."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T

import attrax as ax
from attrax._lrp import ARCHITECTURES
from attrax.testing import tiny_classifier, tiny_model
from tests.conftest import QUICK
from tests.test_architectures import _family, _hybrid, _translator

PAGE = Path(__file__).resolve().parent.parent / "docs" / "architectures.md"


def _causal(name: str) -> Callable[[], ax.Model]:
    def build() -> ax.Model:
        _, tok = tiny_model("gpt2")
        return ax.load_model(_family(name, tok, attn_implementation="eager"), tokenizer=tok)

    return build


def _tiny(name: str) -> Callable[[], ax.Model]:
    def build() -> ax.Model:
        hf, tok = tiny_model(name)
        return ax.load_model(hf, tokenizer=tok)

    return build


def _classifier(name: str, task: str = "sequence") -> Callable[[], ax.Model]:
    def build() -> ax.Model:
        hf, tok = tiny_classifier(name, task)
        return ax.load_model(hf, tokenizer=tok)

    return build


def _post_ln_opt() -> ax.Model:
    _, tok = tiny_model("gpt2")
    config = T.OPTConfig(
        vocab_size=len(tok), ffn_dim=64, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, do_layer_norm_before=False, word_embed_proj_dim=16,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return ax.load_model(T.AutoModelForCausalLM.from_config(config), tokenizer=tok)


def _granite_hybrid() -> ax.Model:
    _, tok = tiny_model("gpt2")
    return ax.load_model(_hybrid(tok), tokenizer=tok)


# the table's rows: a tiny random model of each family
FAMILIES: dict[str, Callable[[], ax.Model]] = {
    "GPT-2": _tiny("gpt2"),
    "GPT-Neo": _tiny("gpt_neo"),
    "Llama": _tiny("llama"),
    "Mistral": _causal("mistral"),
    "Ministral 3": _causal("ministral3"),
    "Qwen2": _causal("qwen2"),
    "Qwen3": _causal("qwen3"),
    "Phi-3": _causal("phi3"),
    "SmolLM3": _causal("smollm3"),
    "Gemma": _causal("gemma"),
    "Gemma 2": _causal("gemma2"),
    "VaultGemma": _causal("vaultgemma"),
    "Gemma 3": _tiny("gemma3"),
    "Gemma 4": _causal("gemma4"),
    "OLMo 2": _causal("olmo2"),
    "OLMo 3": _causal("olmo3"),
    "Granite": _causal("granite"),
    "CWM": _causal("cwm"),
    "Seed-OSS": _causal("seed_oss"),
    "ERNIE 4.5": _causal("ernie4_5"),
    "Helium": _causal("helium"),
    "HunYuan (dense)": _causal("hunyuan_v1_dense"),
    "GLM": _causal("glm"),
    "GLM-4": _causal("glm4"),
    "EXAONE 4": _causal("exaone4"),
    "Arcee (AFM)": _causal("arcee"),
    "Nemotron": _causal("nemotron"),
    "Pythia (GPT-NeoX)": _causal("pythia"),
    "OPT": _causal("opt"),
    "BioGPT": _causal("biogpt"),
    "Persimmon": _causal("persimmon"),
    "GPT-J": _causal("gptj"),
    "CodeGen": _causal("codegen"),
    "Phi (1, 2)": _causal("phi"),
    "GPT-BigCode (StarCoder)": _causal("gpt_bigcode"),
    "StarCoder2": _causal("starcoder2"),
    "StableLM": _causal("stablelm"),
    "OLMo": _causal("olmo"),
    "Cohere (Command R)": _causal("cohere"),
    "Cohere 2 (Command R7B, A)": _causal("cohere2"),
    "OPT, post-LN (350m)": _post_ln_opt,
    "BLOOM": _causal("bloom"),
    "Falcon": _causal("falcon"),
    "Mixtral": _causal("mixtral"),
    "Qwen2-MoE": _causal("qwen2_moe"),
    "Qwen3-MoE": _causal("qwen3_moe"),
    "OLMoE": _causal("olmoe"),
    "Granite MoE": _causal("granitemoe"),
    "GPT-OSS": _causal("gpt_oss"),
    "DeepSeek V2": _causal("deepseek_v2"),
    "DeepSeek V3": _causal("deepseek_v3"),
    "DeepSeek V3.2": _causal("deepseek_v32"),
    "GLM-4.7-Flash": _causal("glm4_moe_lite"),
    "GLM-5": _causal("glm_moe_dsa"),
    "Llama 4": _causal("llama4"),
    "GLM-4.5": _causal("glm4_moe"),
    "MiniMax M2": _causal("minimax_m2"),
    "ERNIE 4.5 MoE": _causal("ernie4_5_moe"),
    "HunYuan MoE": _causal("hunyuan_v1_moe"),
    "Youtu": _causal("youtu"),
    "Granite 4 (Mamba hybrid)": _granite_hybrid,
    "Qwen3-Next (linear-attention hybrid)": _causal("qwen3_next"),
    "Qwen 3.5 (linear-attention hybrid)": _causal("qwen3_5"),
    "Mamba": _causal("mamba"),
    "Mamba 2": _causal("mamba2"),
    "Marian": _tiny("marian"),
    "BART": _tiny("bart"),
    "T5": _tiny("t5"),
    "M2M100 (NLLB)": lambda: _translator("m2m100"),
    "Pegasus": lambda: _translator("pegasus"),
    "mBART": lambda: _translator("mbart"),
    "mT5": lambda: _translator("mt5"),
    "BERT classifier": _classifier("bert"),
    "RoBERTa classifier": _classifier("roberta"),
    "XLM-R classifier": _classifier("xlm-roberta"),
    "CamemBERT classifier": _classifier("camembert"),
    "DistilBERT classifier": _classifier("distilbert"),
    "ELECTRA classifier": _classifier("electra"),
    "DeBERTa-v2 classifier": _classifier("deberta-v2"),
    "ModernBERT classifier": _classifier("modernbert"),
    "GPT-2 classifier": _classifier("gpt2"),
    "Llama classifier": _classifier("llama"),
    "Qwen2 classifier": _classifier("qwen2"),
    "BART classifier (MNLI)": _classifier("bart"),
    "mBART classifier": _classifier("mbart"),
    "T5 classifier": _classifier("t5"),
    "BART question answering": _classifier("bart", "question-answering"),
    "mBART question answering": _classifier("mbart", "question-answering"),
    "T5 question answering": _classifier("t5", "question-answering"),
    **{
        f"{name} {head}": _classifier(arch, task)
        for head, task in (("question answering", "question-answering"), ("masked LM", "fill-mask"))
        for name, arch in (
            ("BERT", "bert"),
            ("RoBERTa", "roberta"),
            ("XLM-R", "xlm-roberta"),
            ("CamemBERT", "camembert"),
            ("DistilBERT", "distilbert"),
            ("ELECTRA", "electra"),
            ("DeBERTa-v2", "deberta-v2"),
            ("ModernBERT", "modernbert"),
        )
    },
}

Call = Callable[[ax.Model, dict], object]


def _run(name: str, **extra) -> Call:
    """``ax.<name>`` on the row's inputs, with the quick options of the tests."""
    return lambda model, given: getattr(ax, name)(model, **given, **QUICK.get(name, {}), **extra)


def _patching(**extra) -> Call:
    def call(model: ax.Model, given: dict) -> object:
        return ax.attribution_patching(model, **given, corrupted=_corrupted(model), **extra)

    return call


GRADIENTS = (
    "saliency", "input_x_gradient", "integrated_gradients", "conductance",
    "internal_influence", "smoothgrad", "squaregrad", "vargrad",
    "gradient_shap", "sequential_integrated_gradients", "guided_integrated_gradients",
    "discretized_integrated_gradients", "greedy_pig", "pgd",
)  # fmt: skip
PERTURBATIONS = (
    "occlusion",
    "lime",
    "kernel_shap",
    "feature_ablation",
    "shapley_sampling",
    "sobol",
    "reagent",
)

# the table's columns: the calls each one stands for
GROUPS: dict[str, list[Call]] = {
    "gradients": [_run(name) for name in GRADIENTS],
    "guided": [_run("guided_backprop"), _run("deconvolution")],
    "DeepLIFT": [_run("deeplift"), _run("deeplift_shap")],
    "LRP": [_run("lrp", rule="attnlrp"), _run("lrp", rule="cp-lrp")],
    "layer attention": [_run("saliency", layers=0, site="attention")],
    "layer MLP": [_run("saliency", layers=0, site="mlp")],
    "layer neurons": [_run("saliency", layers=0, site="neurons")],
    "layer heads": [_run("saliency", layers=0, site="heads")],
    "knowledge neurons": [_run("knowledge_neurons", layers=0, steps=1)],
    "perturbation": [_run(name) for name in PERTURBATIONS],
    "attention": [_run("attention"), _run("rollout")],
    "attention \u00d7 gradient": [_run("attention_x_gradient"), _run("head_attribution")],
    "value zeroing": [_run("value_zeroing")],
    "ALTI": [_run("alti")],
    "ALTI-Logit": [_run("alti_logit")],
    "information flow": [_run("information_flow")],
    "attention norm": [_run("attention_norm"), _run("attention_norm", include="residual")],
    "DecompX": [_run("decompx")],
    "DLA": [_run("direct_logit_attribution")],
    "AtP heads": [_patching(site="heads")],
    "AtP residual": [_patching(site="residual")],
    "AtP MLP": [_patching(site="mlp")],
    "AtP neurons": [_patching(site="neurons")],
    "AtP q/k/v": [_patching(site=site) for site in ("queries", "keys", "values")],
    "GradDrop": [_patching(site="heads", grad_drop=True)],
    "EAP": [
        lambda model, given: ax.edge_attribution_patching(
            model, **given, corrupted=_corrupted(model)
        ),
        # every receiver remade from the corrupted input: each hook of edge patching runs
        lambda model, given: ax.edge_patching(
            model, **given, corrupted=_corrupted(model), circuit=[]
        ),
    ],
}


def _inputs(model: ax.Model) -> dict:
    if model.task == "generation":
        return {"inputs": "The capital of France is", "targets": " Paris"}
    if model.task == "question-answering":  # the predicted answer
        return {"inputs": ("who was good", "the plot was good")}
    if model.task == "fill-mask":  # the predicted token at the mask
        return {"inputs": f"the plot was {model.tokenizer.mask_token}"}
    return {"inputs": "the plot was good"}  # the predicted class (token classifiers: per token)


def _corrupted(model: ax.Model) -> str | tuple[str, str]:
    # as many tokens as the clean input in every test tokenizer
    if model.task == "question-answering":
        return ("who was good", "the story was good")
    if model.task == "fill-mask":
        return f"the story was {model.tokenizer.mask_token}"
    return "The capital of Spain is" if model.task == "generation" else "the story was good"


@functools.cache
def _table() -> tuple[list[str], dict[str, list[str]]]:
    """The page's table: its column names and each row's cells."""
    rows = [line for line in PAGE.read_text().splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    cells = {}
    for line in rows[1:]:
        parts = [cell.strip() for cell in line.strip("|").split("|")]
        cells[re.sub(r"\*", "", parts[0])] = parts[1:]
    return header[1:], cells


def test_the_table_names_every_family_and_column():
    columns, rows = _table()
    assert columns == list(GROUPS)
    assert list(rows) == list(FAMILIES)
    assert all(set(cells) <= {"✓", "—"} and len(cells) == len(columns) for cells in rows.values())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_table_row_is_what_runs(family):
    columns, rows = _table()
    model = FAMILIES[family]()
    given = _inputs(model)
    wrong = []
    for column, cell in zip(columns, rows[family], strict=True):
        for call in GROUPS[column]:
            try:
                call(model, given)
                ran = "✓"
            except (ax.ModelError, ax.OptionError):  # refused, saying why
                ran = "—"
            if ran != cell:
                wrong.append(
                    f"{column}: the table says {cell}, it {'ran' if ran == '✓' else 'was refused'}"
                )
    assert not wrong, f"{family}: " + "; ".join(wrong)
    # the model types LRP's refusals name as supported are the rows it runs on
    lrp = rows[family][columns.index("LRP")] == "✓"
    assert (model.hf.config.model_type in ARCHITECTURES) == lrp, model.hf.config.model_type


@pytest.mark.parametrize("family", list(FAMILIES))
def test_activation_patching_runs_where_attribution_patching_does(family):
    """Activation patching finds its sites as attribution patching does (docs/methods/
    internals.md says so): per site, both run or both are refused (q/k/v: plain AtP, whose QK
    fix may refuse an attention it cannot recompute)."""
    model = FAMILIES[family]()
    given = _inputs(model)
    wrong = []
    for site in ("heads", "mlp", "keys", "neurons"):  # the residual stream: the heads' blocks'
        outcomes = []
        # plain AtP's keys; layer 0's neurons, as activation patching's (a mixture of experts
        # may follow a dense first layer)
        extra = {"qk_fix": False} if site == "keys" else {"layers": 0} if site == "neurons" else {}
        for call in (
            _patching(site=site, **extra),
            lambda m, g, site=site: ax.activation_patching(
                m, **g, corrupted=_corrupted(m), site=site, layers=0, sources=0
            ),
        ):
            try:
                call(model, given)
                outcomes.append("ran")
            except (ax.ModelError, ax.OptionError):
                outcomes.append("refused")
        if outcomes[0] != outcomes[1]:
            wrong.append(f"{site}: AtP {outcomes[0]}, activation patching {outcomes[1]}")
        if site == "mlp":  # causal tracing's noise runs where a corrupted text does
            try:
                noise = ax.GaussianNoise(tokens=0, samples=2)
                da = ax.activation_patching(
                    model,
                    **given,
                    corrupted=noise,
                    site=site,
                    layers=0,
                    sources=0,
                    direction="denoising",
                )
                assert np.isfinite(da.values).any()
                outcomes.append("ran")
            except (ax.ModelError, ax.OptionError):
                outcomes.append("refused")
            if outcomes[2] != outcomes[1]:
                wrong.append(f"mlp: a corrupted text {outcomes[1]}, Gaussian noise {outcomes[2]}")
            # a mean ablation runs where a corrupted text does, in both methods (on an
            # encoder-decoder's encoder: its decoder's positions are the targets')
            for method in (ax.attribution_patching, ax.activation_patching):
                kw = {"sources": 0} if method is ax.activation_patching else {}
                if model.hf.config.is_encoder_decoder:
                    kw["stack"] = "encoder"
                try:
                    da = method(
                        model, **given, corrupted=ax.Ablation("mean"), site=site, layers=0, **kw
                    )
                    assert np.isfinite(da.values).any()
                    ran = "ran"
                except (ax.ModelError, ax.OptionError):
                    ran = "refused"
                if ran != outcomes[1]:
                    wrong.append(f"mlp: a corrupted text {outcomes[1]}, {method.__name__} "
                                 f"with a mean ablation {ran}")  # fmt: skip
            if outcomes[1] == "ran":
                wrong += _reused_blocks_change_nothing(model, given)
    assert not wrong, f"{family}: " + "; ".join(wrong)


def _reused_blocks_change_nothing(model: ax.Model, given: dict) -> list[str]:
    """The last layer's MLP and key patches, the blocks below reused from the base run (some
    models' blocks return more than their output and run again) and run: the same effects."""
    from attrax import _components

    wrong = []
    for site in ("mlp", "keys"):
        got = []
        for reuse in (True, False):
            _components.SKIP_BELOW = reuse
            try:
                got.append(
                    ax.activation_patching(
                        model, **given, corrupted=_corrupted(model), site=site, layers=-1
                    ).values
                )
            except ax.ModelError:  # keys that later layers reuse (Gemma 3n's)
                break
            finally:
                _components.SKIP_BELOW = True
        # float32 rounding between batch sizes, of scores (probabilities) up to 1
        if len(got) == 2 and (
            not np.array_equal(np.isnan(got[0]), np.isnan(got[1]))
            or not np.allclose(np.nan_to_num(got[0]), np.nan_to_num(got[1]), rtol=1e-4, atol=1e-6)
        ):
            wrong.append(f"{site} at the last layer: reusing the blocks below changes the effects")
    return wrong


def test_the_readme_counts_the_families():
    readme = (PAGE.parent.parent / "README.md").read_text()
    count = re.search(r"model families and heads \((\d+) rows", readme)
    assert count is not None and int(count.group(1)) == len(FAMILIES)
