"""Step scores against direct computations from a plain Hugging Face forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

import attrax as ax
from attrax._attention import rollout
from attrax._scores import SCORES, step_scores, with_scores
from attrax.testing import tiny_model
from tests import _naive
from tests.conftest import PAIRS

SOURCE, TARGET = PAIRS[0]
CONTRAST_SOURCE = "The capital of Italy is"
BASIC = ("probability", "logprob", "logit", "entropy", "crossentropy", "perplexity")


def hf_logits(model, source: str, target: str) -> tuple[torch.Tensor, list[int], int]:
    """Logits ``[T, V]`` of a plain forward from ids, the target ids and the first target position."""
    source_ids, target_ids = _naive.token_ids(model, source, target)
    with torch.no_grad():
        if model.is_encoder_decoder:
            start = model.hf.config.decoder_start_token_id
            out = model.hf(
                input_ids=torch.tensor([source_ids]),
                decoder_input_ids=torch.tensor([[start, *target_ids]]),
            )
            return out.logits[0].double(), target_ids, 1
        out = model.hf(input_ids=torch.tensor([source_ids + target_ids]))
    return out.logits[0].double(), target_ids, len(source_ids)


def predicting_rows(logits: torch.Tensor, first: int, n: int) -> torch.Tensor:
    return logits[first - 1 : first - 1 + n]


def test_basic_scores_equal_direct_computation(model):
    got = step_scores(model, SOURCE, TARGET, scores=list(BASIC))
    logits, target_ids, first = hf_logits(model, SOURCE, TARGET)
    rows = predicting_rows(logits, first, len(target_ids))
    ids = torch.tensor(target_ids)
    probs = torch.softmax(rows, -1)
    p = probs[torch.arange(len(ids)), ids]
    want = {
        "probability": p,
        "logprob": torch.log(p),
        "logit": rows[torch.arange(len(ids)), ids],
        "entropy": -(probs * torch.log(probs)).sum(-1),
        "crossentropy": -torch.log(p),
        "perplexity": 1 / p,
    }
    assert got.dims == ("target", "score")
    assert got.score.values.tolist() == list(BASIC)
    assert got.target.values.tolist() == list(range(first, first + len(target_ids)))
    assert got.target_id.values.tolist() == target_ids
    for name, value in want.items():
        np.testing.assert_allclose(
            got.sel(score=name).values, value.numpy(), rtol=2e-5, err_msg=name
        )


def test_a_float64_models_scores_keep_float64():
    """Softmax and its sums run in the model's float64 (in float32 at least: half precision)."""
    hf, tok = tiny_model("gpt2")
    model = ax.load_model(hf.double(), tokenizer=tok)
    got = step_scores(model, SOURCE, TARGET, scores=["probability", "logprob", "entropy"])
    logits, target_ids, first = hf_logits(model, SOURCE, TARGET)
    logp = torch.log_softmax(predicting_rows(logits, first, len(target_ids)), -1)
    picked = logp[torch.arange(len(target_ids)), torch.tensor(target_ids)]
    assert got.dtype == np.float64
    # a float32 softmax is ~1e-7 off: only float64 meets 1e-12
    np.testing.assert_allclose(got.sel(score="logprob"), picked.numpy(), rtol=1e-12)
    np.testing.assert_allclose(got.sel(score="probability"), picked.exp().numpy(), rtol=1e-12)
    entropy = -(logp.exp() * logp).sum(-1)
    np.testing.assert_allclose(got.sel(score="entropy"), entropy.numpy(), rtol=1e-12)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_contrast_input_scores(models, arch):
    model = models[arch]
    got = step_scores(
        model, SOURCE, TARGET, scores=["kl_divergence", "pcxmi"], contrast_inputs=CONTRAST_SOURCE
    )
    logits, target_ids, first = hf_logits(model, SOURCE, TARGET)
    other, other_ids, other_first = hf_logits(model, CONTRAST_SOURCE, TARGET)
    assert other_ids == target_ids  # same target tokens after either prompt
    logp = torch.log_softmax(predicting_rows(logits, first, len(target_ids)), -1)
    logq = torch.log_softmax(predicting_rows(other, other_first, len(target_ids)), -1)
    ids = torch.arange(len(target_ids)), torch.tensor(target_ids)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    np.testing.assert_allclose(got.sel(score="kl_divergence"), kl.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got.sel(score="pcxmi"), (logp[ids] - logq[ids]).numpy(), atol=2e-5)
    assert got.target.values.tolist() == list(range(first, first + len(target_ids)))


@pytest.mark.parametrize("arch", ["llama", "bart"])
def test_target_side_contrast_scores(models, arch):
    model = models[arch]
    contrast = " Rome"
    # aligned token by token, and another token: a contrast equal to the target gives p - p = 0
    contrast_ids, target_ids = (_naive.token_ids(model, SOURCE, t)[1] for t in (contrast, TARGET))
    assert len(contrast_ids) == len(target_ids) and contrast_ids != target_ids
    names = ["contrast_prob", "contrast_logit", "contrast_prob_diff", "contrast_logit_diff"]
    got = step_scores(model, SOURCE, TARGET, scores=names, contrast=contrast)
    logits, target_ids, first = hf_logits(model, SOURCE, TARGET)
    rows = predicting_rows(logits, first, len(target_ids))
    probs = torch.softmax(rows, -1)
    at = torch.arange(len(target_ids))
    y, c = torch.tensor(target_ids), torch.tensor(contrast_ids)
    want = {
        "contrast_prob": probs[at, c],
        "contrast_logit": rows[at, c],
        "contrast_prob_diff": probs[at, y] - probs[at, c],
        "contrast_logit_diff": rows[at, y] - rows[at, c],
    }
    for name, value in want.items():
        np.testing.assert_allclose(
            got.sel(score=name), value.numpy(), rtol=1e-5, atol=1e-7, err_msg=name
        )
    assert got.contrast_id.values.tolist() == contrast_ids


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_batched_equals_single(models, arch):
    model = models[arch]
    sources, targets = [s for s, _ in PAIRS], [t for _, t in PAIRS]
    contrasts = [CONTRAST_SOURCE, "def g(y):", "Hi"]
    names = ["probability", "entropy", "pcxmi"]
    batched = step_scores(model, sources, targets, scores=names, contrast_inputs=contrasts)
    assert batched.dims == ("example", "target", "score")
    for i in range(len(PAIRS)):
        single = step_scores(
            model, sources[i], targets[i], scores=names, contrast_inputs=contrasts[i]
        )
        part = batched.isel(example=i).sel(target=single.target)
        np.testing.assert_allclose(part.values, single.values, rtol=1e-4, atol=1e-6)
    missing = (batched.target_id < 0).values
    assert np.isnan(batched.values[missing]).all()


def test_positions_select_targets(models):
    model = models["gpt2"]
    source, target = PAIRS[1]
    kwargs = {"scores": ["logprob", "pcxmi"], "contrast_inputs": "def longer_name(y, z):"}
    full = step_scores(model, source, target, **kwargs)
    last = step_scores(model, source, target, positions=-1, **kwargs)
    assert last.target.values.tolist() == full.target.values[-1:].tolist()
    np.testing.assert_allclose(last.values, full.values[-1:], rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise(models):
    model = models["gpt2"]
    with pytest.raises(ax.OptionError, match=r"unknown score 'surprise'.*pcxmi"):
        step_scores(model, SOURCE, TARGET, scores=["probability", "surprise"])
    with pytest.raises(ax.OptionError, match="need `contrast_inputs`"):
        step_scores(model, SOURCE, TARGET, scores="pcxmi")
    with pytest.raises(ax.OptionError, match="need `contrast`"):
        step_scores(model, SOURCE, TARGET, scores="contrast_prob_diff")
    # Inseq's names for scores attrax spells otherwise say what to use
    with pytest.raises(
        ax.OptionError, match=r"Inseq's 'contrast_logits_diff': 'contrast_logit_diff'"
    ):
        step_scores(model, SOURCE, TARGET, scores="contrast_logits_diff", contrast=TARGET)
    with pytest.raises(ax.OptionError, match=r"Inseq's 'in_context_pvi': -pcxmi"):
        step_scores(model, SOURCE, TARGET, scores="in_context_pvi")
    with pytest.raises(ax.OptionError, match="twice"):
        step_scores(model, SOURCE, TARGET, scores=["entropy", "entropy"])
    # a contrast no requested score reads changed nothing, silently
    with pytest.raises(ax.OptionError, match="`contrast_inputs` is read only by"):
        step_scores(model, SOURCE, TARGET, contrast_inputs=CONTRAST_SOURCE)
    with pytest.raises(ax.OptionError, match="`contrast` is read only by"):
        step_scores(model, SOURCE, TARGET, scores="entropy", contrast=TARGET)
    with pytest.raises(ax.InputError, match="contrast_inputs"):
        step_scores(model, SOURCE, TARGET, scores="pcxmi", contrast_inputs=["a", "b"])
    assert set(SCORES) >= set(BASIC)


def test_with_scores_joins_into_dataset(models):
    model = models["gpt2"]
    da = rollout(model, SOURCE, TARGET)
    scores = step_scores(model, SOURCE, TARGET, scores=["probability", "entropy"])
    ds = with_scores(da, scores)
    assert isinstance(ds, xr.Dataset)
    assert sorted(ds.data_vars) == ["attribution", "entropy", "probability"]
    assert ds.probability.dims == ("target",)
    np.testing.assert_array_equal(ds.entropy.values, scores.sel(score="entropy").values)
    assert ds.attrs["method"] == "rollout"
    other = step_scores(model, SOURCE, TARGET + " x", scores="probability")
    with pytest.raises(ax.InputError, match="same inputs"):
        with_scores(da, other)
    # another model's scores at the same positions and tokens (joined until 2026-12-06)
    elsewhere = step_scores(models["llama"], SOURCE, TARGET, scores="probability")
    with pytest.raises(ax.InputError, match=r"`scores` come from the model 'LlamaForCausalLM'"):
        with_scores(da, elsewhere)


def test_with_scores_refuses_one_models_scores_beside_a_stacked_attribution(models):
    model = models["gpt2"]
    stacked = ax.stack_models([model, model], names=["a", "b"])
    da = ax.l2_norm(ax.saliency(stacked, SOURCE, TARGET))
    with pytest.raises(ax.InputError, match=r"from 'GPT2LMHeadModel\+GPT2LMHeadModel'"):
        with_scores(da, step_scores(model, SOURCE, TARGET))
    ds = with_scores(da.sel(model="a"), step_scores(model, SOURCE, TARGET))
    assert ds.probability.dims == ("target",)


def test_show_refuses_scores_of_other_target_tokens(models):
    """Scores of another continuation at the same positions were drawn beside the attribution
    (until 2026-12-05): their target tokens are compared, as with_scores compares them."""
    model = models["gpt2"]
    da = ax.pipe(ax.saliency, ax.l2_norm)(model, "The capital of France is", " Paris.")
    other = step_scores(model, "The capital of France is", " Spain!").to_dataset("score")
    with pytest.raises(ax.InputError, match="`scores` has other target tokens than `da`"):
        ax.show(da, scores=other)


def test_with_scores_after_words_merged_along_target_says_so(models):
    """Targets merged into words (merge_subwords' default dims) no longer match the scores'
    tokens: said, not blamed on the inputs (until 2026-12-05); merged along source they join."""
    model = models["marian"]
    source, target = "The capital of France is Paris.", "Die Hauptstadt ist Paris."
    relevance = ax.pipe(ax.saliency, ax.l2_norm)(model, source, target)
    scores = step_scores(model, source, target)
    merged = ax.merge_subwords(relevance)
    assert merged.sizes["target"] < relevance.sizes["target"]  # the tiny tokenizer splits words
    with pytest.raises(ax.InputError, match=r"targets were merged into words .*dims='source'"):
        with_scores(merged, scores)
    joined = with_scores(ax.merge_subwords(relevance, dims="source"), scores)
    assert joined.sizes["target"] == scores.sizes["target"]


def test_with_scores_refuses_other_targets_at_the_same_positions(models):
    """Scores of other texts (or of the same examples in another order) whose targets sit at the
    same positions are refused: the target ids and the examples are compared, not only where."""
    model = models["gpt2"]
    texts = [("1 2 3 =", " 3 2 1"), ("4 5 6 =", " 6 5 4")]
    da = ax.l2_norm(ax.saliency(model, *texts[0]))
    with pytest.raises(ax.InputError, match="target_id"):
        with_scores(da, step_scores(model, *texts[1]))
    both = ax.l2_norm(ax.saliency(model, *zip(*texts, strict=True)))
    swapped = step_scores(model, *zip(*texts[::-1], strict=True))
    with pytest.raises(ax.InputError, match="target_id"):
        with_scores(both, swapped)
    assert with_scores(both, step_scores(model, *zip(*texts, strict=True))).sizes["example"] == 2
