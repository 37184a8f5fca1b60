"""Faithfulness metrics on the built-in model, whose ground truth is known.

True attributions (saliency, integrated gradients) must beat a random ranking, and the batched
computation must equal a naive loop of one masked forward per target and fraction.
"""

from __future__ import annotations

import functools
import math
import random

import numpy as np
import pytest
import torch
import xarray as xr

import attrax as ax
from attrax import _faithfulness as F
from attrax._default_model_task import make_example
from attrax.testing import tiny_classifier, tiny_model
from tests import _naive

PROMPT, CONTINUATION = "3 1 4 0 5 9 =", " 9 5 0 4 1 3"


@pytest.fixture
def model(default_model) -> ax.Model:
    return default_model


@pytest.fixture(scope="module")
def examples() -> tuple[list[str], list[str]]:
    rng = random.Random(7)
    pairs = [make_example(rng, split="heldout") for _ in range(3)]
    return [p for p, _ in pairs], [c for _, c in pairs]


def _random_like(da: xr.DataArray, seed: int = 0) -> xr.DataArray:
    rng = np.random.default_rng(seed)
    return da.copy(data=rng.random(da.shape)).where(da.notnull())


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients"])
def test_true_attributions_beat_random_rankings(model, examples, method):
    prompts, continuations = examples
    options = {"steps": 8} if method == "integrated_gradients" else {}
    da = ax.l2_norm(getattr(ax, method)(model, prompts, continuations, **options))
    random_da = _random_like(da)

    def score(metric, attribution, **kw):
        return metric(model, attribution, prompts, continuations, **kw)

    true_deletion, random_deletion = (
        score(F.deletion, a, fractions=5).auc for a in (da, random_da)
    )
    assert float(true_deletion.mean()) < float(random_deletion.mean()) - 0.05
    true_comp, random_comp = (score(F.comprehensiveness, a).aopc for a in (da, random_da))
    assert float(true_comp.mean()) > float(random_comp.mean()) + 0.05
    if method == "saliency":
        true_ins, random_ins = (score(F.insertion, a, fractions=5).auc for a in (da, random_da))
        assert float(true_ins.mean()) > float(random_ins.mean())
        true_suff, random_suff = (score(F.sufficiency, a).aopc for a in (da, random_da))
        assert float(true_suff.mean()) < float(random_suff.mean())


def test_matches_a_naive_loop_of_masked_forwards(model):
    # short: the reference is one plain forward per target and fraction
    prompt, continuation = "3 1 4 =", " 4 1 3"
    # signed: "higher ranks first" is not "larger magnitude ranks first"
    da = ax.sum(ax.input_x_gradient(model, prompt, continuation))
    assert (da.fillna(0) < 0).any() and (da > 0).any()
    steps, fractions = 3, (0.2, 0.5)
    deletion = F.deletion(model, da, prompt, continuation, fractions=steps)
    insertion = F.insertion(model, da, prompt, continuation, fractions=steps)
    comp = F.comprehensiveness(model, da, prompt, continuation, fractions=fractions)
    suff = F.sufficiency(model, da, prompt, continuation, fractions=fractions)

    tok = model.tokenizer
    ids = torch.tensor([tok(prompt + continuation, add_special_tokens=False)["input_ids"]])
    embeds = model.hf.get_input_embeddings()(ids)[0]
    pad = model.hf.get_input_embeddings()(torch.tensor([tok.pad_token_id]))[0]

    def prob(removed: list[int], target: int) -> float:
        x = embeds.clone()
        x[removed] = pad
        with torch.no_grad():
            logits = model.hf(inputs_embeds=x[None]).logits[0, target - 1]
        return float(torch.softmax(logits, -1)[ids[0, target]])

    for target in da.target.values:
        row = da.sel(target=target).values
        visible = list(range(target))  # causality: only earlier positions
        order = [visible[i] for i in np.argsort(-row[visible], kind="stable")]
        full = prob([], target)
        for f in deletion.fraction.values:
            n = math.ceil(round(f * len(visible), 9))
            got = deletion.sel(target=target, fraction=f)
            assert float(got) == pytest.approx(prob(order[:n], target), abs=1e-5)
            got = insertion.sel(target=target, fraction=f)
            assert float(got) == pytest.approx(prob(order[n:], target), abs=1e-5)
        for f in fractions:
            n = math.ceil(f * len(visible))
            expected = full - prob(order[:n], target)
            assert float(comp.sel(target=target, fraction=f)) == pytest.approx(expected, abs=1e-5)
            expected = full - prob(order[n:], target)
            assert float(suff.sel(target=target, fraction=f)) == pytest.approx(expected, abs=1e-5)
        assert float(deletion.original.sel(target=target)) == pytest.approx(full, abs=1e-5)
    area = deletion.fillna(0).integrate("fraction")
    np.testing.assert_allclose(deletion.auc, area, rtol=1e-6)
    np.testing.assert_allclose(comp.aopc, comp.mean("fraction"), rtol=1e-6)


def test_a_batch_equals_its_examples_one_by_one(model):
    # different lengths: the batch is padded, targets of one example are NaN in the other
    prompts, continuations = [PROMPT, "7 2 9 ="], [CONTINUATION, " 9 2 7"]
    batch = ax.l2_norm(ax.saliency(model, prompts, continuations))
    together = F.deletion(model, batch, prompts, continuations, fractions=3, batch_size=5)
    assert together.dims == ("example", "target", "fraction")
    for i, (prompt, continuation) in enumerate(zip(prompts, continuations, strict=True)):
        single = ax.l2_norm(ax.saliency(model, prompt, continuation))
        alone = F.deletion(model, single, prompt, continuation, fractions=3)
        got = together.isel(example=i).dropna("target", how="all")
        np.testing.assert_allclose(got.values, alone.values, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got.auc.values, alone.auc.values, rtol=1e-5, atol=1e-7)
        assert got.target_token.values.tolist() == alone.target_token.values.tolist()


def test_a_token_classifiers_targets_in_another_order_score_the_same():
    """A selection of a token classifier's targets, reordered, is scored as the full array's rows
    (its classes followed the full order: a raw RuntimeError until 2026-12-06)."""
    hf, tok = tiny_classifier("bert", "token")
    clf = ax.load_model(hf, tokenizer=tok)
    text = "the cat sat on the mat"
    da = ax.l2_norm(ax.saliency(clf, text))
    full = F.comprehensiveness(clf, da, text)
    sub = F.comprehensiveness(clf, da.isel(target=[3, 1]), text)
    assert sub.target.values.tolist() == da.target.values[[3, 1]].tolist()
    for name in ("target_class", "predicted_class"):
        np.testing.assert_array_equal(sub[name], full[name].isel(target=[3, 1]))
    # float32 forwards of other batch sizes: rounding by the CPU's kernels (2e-7 on AVX2's)
    np.testing.assert_allclose(sub.values, full.isel(target=[3, 1]).values, rtol=1e-5, atol=1e-6)


def test_only_the_attributed_positions_are_scored(model):
    da = ax.l2_norm(ax.saliency(model, PROMPT, CONTINUATION, positions=[-1]))
    out = F.sufficiency(model, da, PROMPT, CONTINUATION, baseline="zeros")
    assert out.target.values.tolist() == da.target.values.tolist()
    assert out.attrs["metric"] == "sufficiency"
    assert out.attrs["method"] == "saliency"


def test_a_target_that_ranks_nothing_has_no_curve(model):
    """A target whose attribution row is all NaN removes nothing: its curve is NaN, not a flat 0
    averaged in with the others (until 2026-12-05); the other targets' are as before."""
    da = ax.l2_norm(ax.saliency(model, PROMPT, CONTINUATION))
    blank = da.copy()
    blank[0, :] = np.nan
    for metric in (F.comprehensiveness, F.deletion):
        got, want = (
            metric(model, blank, PROMPT, CONTINUATION),
            metric(model, da, PROMPT, CONTINUATION),
        )
        assert np.isnan(got.values[0]).all()
        np.testing.assert_allclose(got.values[1:], want.values[1:], rtol=1e-6)
    # every target NaN: only NaN would come back (it did until 2026-12-07)
    with pytest.raises(ax.InputError, match="NaN at every source its targets see"):
        F.deletion(model, da.where(da.isnull()), PROMPT, CONTINUATION)


def test_clear_errors(model):
    raw = ax.saliency(model, PROMPT, CONTINUATION)
    with pytest.raises(ax.InputError, match=r"\('target', 'source', 'hidden'\).*l2_norm"):
        F.deletion(model, raw, PROMPT, CONTINUATION)
    da = ax.l2_norm(raw)
    with pytest.raises(ax.InputError, match=r"tokens .*differ"):
        F.deletion(model, da, "3 1 4 0 5 8 =", " 8 5 0 4 1 3")
    with pytest.raises(ax.InputError, match="target position"):
        F.deletion(model, da, PROMPT, " 9 5 0 4 1")
    with pytest.raises(ax.OptionError, match="fractions"):
        F.comprehensiveness(model, da, PROMPT, CONTINUATION, fractions=[0.0, 0.5])
    with pytest.raises(ax.OptionError, match="baseline"):
        F.insertion(model, da, PROMPT, CONTINUATION, baseline="mean")
    with pytest.raises(ax.OptionError, match="fractions"):
        F.insertion(model, da, PROMPT, CONTINUATION, fractions=0)


def test_a_contrastive_attribution_is_scored_with_its_contrast(model):
    """The objective a contrastive attribution explained is p(target) - p(contrast): its curve
    starts there (step scores' contrast_prob_diff, computed apart), whether `contrast` is given
    again or read from the attribution; another contrast is refused."""
    contrast = " 9 5 0 4 1 4"
    da = ax.l2_norm(ax.saliency(model, PROMPT, CONTINUATION, contrast=contrast))
    want = ax.step_scores(
        model, PROMPT, CONTINUATION, contrast=contrast, scores="contrast_prob_diff"
    )
    read = F.comprehensiveness(model, da, PROMPT, CONTINUATION)
    given = F.comprehensiveness(model, da, PROMPT, CONTINUATION, contrast=contrast)
    np.testing.assert_allclose(read.original, want.squeeze("score"), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(read.values, given.values)
    with pytest.raises(ax.InputError, match="contrast tokens"):
        F.comprehensiveness(model, da, PROMPT, CONTINUATION, contrast=" 9 5 0 4 1 5")
    unrecorded = da.assign_attrs(options="{}")
    with pytest.raises(ax.InputError, match="pass `contrast=`"):
        F.deletion(model, unrecorded, PROMPT, CONTINUATION)


def test_sources_are_matched_by_label_not_place(model):
    """An attribution whose sources were reordered (here reversed) scores as the original: the
    ranking follows the `source` labels. The palindrome's token ids read the same either way,
    so only the labels can tell."""
    prompt, continuation = "1 2 3 =", " 3 2 1"
    da = ax.l2_norm(ax.saliency(model, prompt, continuation))
    ids = da.source_id.values
    assert np.array_equal(ids, ids[::-1])  # the reorder is invisible in the ids
    reversed_ = da.isel(source=slice(None, None, -1))
    for metric in (F.deletion, F.insertion):
        want = metric(model, da, prompt, continuation)
        np.testing.assert_array_equal(metric(model, reversed_, prompt, continuation), want)


def test_encoder_decoder_sides_match_a_naive_loop():
    """attribute_target=True on an encoder-decoder: a target ranks every encoder token and the
    decoder prefix before it (labels (side, position)), each side's removed tokens take that
    side's pad embedding, and the objective is the attribution's (logprob)."""
    hf, tok = tiny_model("bart")
    model = ax.load_model(hf, tokenizer=tok)
    source, target = "Hello there", " ok"
    da = ax.occlusion(model, source, target, attribute_target=True, objective="logprob")
    deletion = F.deletion(model, da, source, target, fractions=2)
    suff = F.sufficiency(model, da, source, target, fractions=[0.6])
    assert deletion.attrs["objective"] == "logprob"

    run = _naive.Runner(model, *_naive.token_ids(model, source, target))
    x = run.embeddings()
    with torch.no_grad():
        pad = [module(torch.tensor([[tok.pad_token_id]]))[0, 0] for module in run.modules]
    sides = {"source": 0, "target": 1}
    columns = [(sides[side], int(p)) for side, p in da.indexes["source"]]

    @functools.cache
    def logprob(removed: tuple[tuple[int, int], ...], t: int) -> float:
        points = [xi.clone() for xi in x]
        for side, p in removed:
            points[side][0, p] = pad[side]
        return run.score(t, points, _naive.logprob)

    for k, t in enumerate(da.target.values.tolist()):
        row = da.isel(target=k).values
        visible = [i for i, (side, p) in enumerate(columns) if side == 0 or p < t]
        order = [columns[visible[i]] for i in np.argsort(-row[visible], kind="stable")]
        full = logprob((), t)
        for f in deletion.fraction.values:
            n = math.ceil(round(f * len(visible), 9))
            got = float(deletion.isel(target=k).sel(fraction=f))
            assert got == pytest.approx(logprob(tuple(order[:n]), t), rel=1e-5)
        n = math.ceil(0.6 * len(visible))
        got = float(suff.isel(target=k, fraction=0))
        assert got == pytest.approx(full - logprob(tuple(order[n:]), t), abs=1e-5 * abs(full))


def _tau_b(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b by counting pairs: (concordant - discordant) / sqrt(pairs untied in x *
    pairs untied in y)."""
    concordant = discordant = untied_x = untied_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            a, b = x[i] - x[j], y[i] - y[j]
            untied_x += a != 0
            untied_y += b != 0
            concordant += a * b > 0
            discordant += a * b < 0
    return (concordant - discordant) / math.sqrt(untied_x * untied_y)


def test_loo_correlation_matches_a_naive_loop_of_one_token_removals(model):
    prompt, continuation = "3 1 4 =", " 4 1 3"
    da = ax.sum(ax.input_x_gradient(model, prompt, continuation))
    loo = F.loo_correlation(model, da, prompt, continuation)
    tok = model.tokenizer
    ids = tok(prompt + continuation, add_special_tokens=False)["input_ids"]

    def prob(sequence: list[int], target: int) -> float:
        with torch.no_grad():
            logits = model.hf(input_ids=torch.tensor([sequence[:target]])).logits[0, -1]
        return float(torch.softmax(logits, -1)[ids[target]])

    for target in da.target.values:
        full = prob(ids, target)
        drops = []
        for s in range(target):  # causality: only earlier positions
            removed = list(ids)
            removed[s] = tok.pad_token_id  # the pad token's embedding, as the baseline
            drops.append(full - prob(removed, target))
        got = loo.sel(target=target).values
        np.testing.assert_allclose(got[:target], drops, atol=1e-6)
        assert np.isnan(got[target:]).all()
        row = da.sel(target=target).values[:target].tolist()
        assert float(loo.tau.sel(target=target)) == pytest.approx(_tau_b(row, drops), abs=1e-9)
        assert float(loo.original.sel(target=target)) == pytest.approx(full, abs=1e-6)


def test_loo_correlation_on_a_classifier_batch_matches_hf_forwards_from_ids():
    clf = ax.load_model("attrax:classifier")
    texts = ["a good film", "it was awful and boring"]
    da = ax.pipe(ax.integrated_gradients, ax.sum)(clf, texts, "all", steps=8)
    loo = F.loo_correlation(clf, da, texts, "all")
    for e, text in enumerate(texts):
        ids = clf.tokenizer(text)["input_ids"]

        def probs(sequence: list[int]) -> np.ndarray:
            with torch.no_grad():
                return torch.softmax(clf.hf(input_ids=torch.tensor([sequence])).logits[0], -1)

        full = probs(ids).numpy()
        for s in range(len(ids)):
            removed = list(ids)
            removed[s] = clf.tokenizer.pad_token_id
            drop = full - probs(removed).numpy()
            np.testing.assert_allclose(loo.isel(example=e, source=s).values, drop, atol=1e-6)
        assert np.isnan(loo.isel(example=e).values[:, len(ids) :]).all()
        for k in range(len(clf.labels)):
            row = da.isel(example=e, target=k).values[: len(ids)].tolist()
            drops = loo.isel(example=e, target=k).values[: len(ids)].tolist()
            assert float(loo.tau.isel(example=e, target=k)) == pytest.approx(_tau_b(row, drops))


def test_occlusion_with_the_same_baseline_is_the_leave_one_out_drop():
    # the same quantity by another code path: its ranking agrees perfectly (tau 1)
    clf = ax.load_model("attrax:classifier")
    texts = ["a good film", "it was awful and boring"]
    occ = ax.occlusion(clf, texts, "all", baseline="pad")
    loo = F.loo_correlation(clf, occ, texts, "all")
    np.testing.assert_allclose(loo.values, occ.values, atol=1e-6)
    np.testing.assert_allclose(loo.tau.values, 1.0)
    ds = ax.evaluate(
        clf,
        [{"input": t} for t in texts],
        {
            "occlusion": functools.partial(ax.occlusion, baseline="pad"),
            "ixg": ax.pipe(ax.input_x_gradient, ax.sum),
        },
        ["taucorr_loo"],
        reduce="none",
    )
    # each example's predicted class: one target each, NaN at the other's
    taus = ds.taucorr_loo.sel({"method": "occlusion"}).values  # not sel(method=): xarray's
    assert (~np.isnan(taus)).sum(-1).tolist() == [1, 1]
    np.testing.assert_allclose(taus[~np.isnan(taus)], 1.0)
    ixg = ax.sum(ax.input_x_gradient(clf, texts))
    want = F.loo_correlation(clf, ixg, texts).tau
    got = ds.taucorr_loo.sel({"method": "ixg"}).sel(target=want.target)
    np.testing.assert_allclose(got.values, want.values)


def test_evaluate_scores_each_method_for_what_it_explained(model):
    # methods of one objective but other targets (positions) or another contrast are scored
    # apart: once, the first method's targets and contrast were used for all of them
    prompt, target = "3 1 4 0 5 9 =", " 9 5 0 4 1 3"
    methods = {"last": functools.partial(ax.saliency, positions=[-1]), "all": ax.saliency}
    metrics = ["taucorr_loo", "comprehensiveness"]
    ds = ax.evaluate(model, [{"input": prompt, "target": target}], methods, metrics)
    da = ax.normalize(ax.l2_norm(ax.saliency(model, [prompt], [target])))
    want = F.loo_correlation(model, da, [prompt], [target]).tau
    got = ds.taucorr_loo.sel({"method": "all"}).sel(target=want.target)
    np.testing.assert_allclose(got.values, want.values)
    assert np.isnan(ds.taucorr_loo.sel({"method": "last"}).values[0, :-1]).all()

    clf = ax.load_model("attrax:classifier")
    texts = ["a good film", "it was awful and boring but fine"]
    contrastive = functools.partial(ax.occlusion, baseline="pad", contrast="negative")
    methods = {"contrastive": contrastive, "plain": functools.partial(ax.occlusion, baseline="pad")}
    records = [{"input": t, "target": "positive"} for t in texts]
    ds = ax.evaluate(clf, records, methods, metrics, reduce="none")
    direct = contrastive(clf, texts, ["positive"] * 2)
    # occlusion with the pad baseline is the leave-one-out drop of what it explained: tau 1
    np.testing.assert_allclose(ds.taucorr_loo.sel({"method": "contrastive"}).values, 1.0)
    want = F.comprehensiveness(clf, direct, texts, ["positive"] * 2).aopc
    got = ds.comprehensiveness.sel({"method": "contrastive"}).values
    np.testing.assert_allclose(got, want.values, rtol=1e-6)
