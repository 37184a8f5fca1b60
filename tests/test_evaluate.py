"""ax.evaluate / ax.summary: faithfulness equals the metrics called per method, plausibility and
agreement against hand-worked values, records from every source."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import attrax as ax

PROMPT, ANSWER = "3 1 4 0 5 9 =", " 9 5 0 4 1 3"
OTHER = ("2 7 1 8 6 4 =", " 4 6 8 1 7 2")


def test_faithfulness_equals_each_method_scored_alone(default_model):
    data = [{"input": PROMPT, "target": ANSWER}, {"input": OTHER[0], "target": OTHER[1]}]
    methods = {"saliency": ax.saliency, "occlusion": ax.occlusion}
    ds = ax.evaluate(default_model, data, methods, ["comprehensiveness", "deletion"], top_k=2)
    inputs, targets = [d["input"] for d in data], [d["target"] for d in data]
    for name, fn in methods.items():
        da = ax.normalize(fn(default_model, inputs, targets))
        if "hidden" in da.dims:
            da = ax.normalize(ax.l2_norm(fn(default_model, inputs, targets)))
        alone = ax.comprehensiveness(default_model, da, inputs, targets).aopc
        np.testing.assert_allclose(
            ds.comprehensiveness.sel({"method": name}).values, alone.values, rtol=1e-6, atol=1e-9
        )
        auc = ax.deletion(default_model, da, inputs, targets).auc
        np.testing.assert_allclose(ds.deletion.sel({"method": name}).values, auc.values, rtol=1e-6)


def _fixed(values_by_target: dict[int, list[float]]):
    """A method returning a chosen (target, source) relevance on the built-in model's grid."""

    def method(model, inputs, targets):
        da = ax.occlusion(model, inputs, targets)
        out = da.copy(data=np.full(da.shape, np.nan))
        for t, row in values_by_target.items():
            k = list(da.target.values).index(t)
            out[0, k, : len(row)] = row
        return out

    return method


def test_plausibility_against_hand_worked_values(default_model):
    # words "3 1 4 0 5 9 =": the rationale is "1" and "0" (tokens 1 and 3 of the prompt)
    data = [{"input": PROMPT, "target": ANSWER, "rationale": [0, 1, 0, 1, 0, 0, 0]}]
    target = 7  # the first answer token: it sees the 7 prompt tokens only
    relevance = [0.1, 0.9, 0.0, 0.2, 0.8, 0.3, 0.05]  # ranking: 1, 4, 5, 3, 0, 6, 2
    ds = ax.evaluate(
        default_model,
        data,
        {"fixed": _fixed({target: relevance})},
        ["token_f1", "iou", "auprc"],
        reduce="none",
    )
    got = ds.sel({"method": "fixed", "example": 0, "target": target})
    # top-2 = {1, 4}; rationale = {1, 3}: one hit of 2
    assert float(got.token_f1) == pytest.approx(1 / 2)
    assert float(got.iou) == pytest.approx(1 / 3)
    # hits at ranks 1 and 4: precision 1/1 and 2/4, averaged
    assert float(got.auprc) == pytest.approx((1 + 2 / 4) / 2)


def test_agreement_of_a_method_with_itself_and_its_reverse(default_model):
    data = [{"input": PROMPT, "target": ANSWER}]
    relevance = [0.1, 0.9, 0.0, 0.2, 0.8, 0.3, 0.05]
    methods = {"a": _fixed({7: relevance}), "b": _fixed({7: [-v for v in relevance]})}
    ds = ax.evaluate(
        default_model, data, methods, ["spearman", "kendall", "topk_overlap"], reduce="none"
    )
    pair = ds.sel(example=0, target=7)
    assert float(pair.spearman.sel({"method": "a", "other": "a"})) == pytest.approx(1.0)
    assert float(pair.spearman.sel({"method": "a", "other": "b"})) == pytest.approx(-1.0)
    assert float(pair.kendall.sel({"method": "b", "other": "a"})) == pytest.approx(-1.0)
    assert float(pair.topk_overlap.sel({"method": "a", "other": "b"})) == 0.0  # top 3 vs bottom 3
    assert np.isnan(
        ds.spearman.sel({"method": "a", "other": "b", "target": 8}).item()
    )  # no relevance


def test_summary_means_and_bootstrap_intervals(default_model):
    data = [{"input": PROMPT, "target": ANSWER}, {"input": OTHER[0], "target": OTHER[1]}] * 2
    methods = {"saliency": ax.saliency, "ixg": ax.input_x_gradient}
    ds = ax.evaluate(default_model, data, methods, ["sufficiency", "spearman"])
    table = ax.summary(ds, resamples=200)
    for name in methods:
        per_example = ds.sufficiency.sel({"method": name}).mean("target").values
        assert table.loc[name, ("sufficiency", "mean")] == pytest.approx(per_example.mean())
        low, high = (
            table.loc[name, ("sufficiency", "low")],
            table.loc[name, ("sufficiency", "high")],
        )
        assert low <= per_example.mean() <= high
    # agreement leaves out a method's agreement with itself (which is 1)
    versus = ds.spearman.sel({"method": "saliency", "other": "ixg"}).mean("target").values.mean()
    assert table.loc["saliency", ("spearman", "mean")] == pytest.approx(versus)


@pytest.mark.parametrize("kind", ["list", "jsonl", "csv", "frame"])
def test_records_from_every_source(tmp_path, kind):
    rows = [
        {"text": PROMPT, "answer": ANSWER, "gold": "a"},
        {"text": OTHER[0], "answer": OTHER[1], "gold": "b"},
    ]
    if kind == "list":
        data = rows
    elif kind == "jsonl":
        data = tmp_path / "d.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "csv":
        data = tmp_path / "d.csv"
        pd.DataFrame(rows).to_csv(data, index=False)
    else:
        data = pd.DataFrame(rows)
    records = ax._evaluate.read_records(data, input="text", target="answer", label="gold")
    assert [(r.input, r.target, r.label) for r in records] == [
        (PROMPT, ANSWER, "a"),
        (OTHER[0], OTHER[1], "b"),
    ]


def test_labels_become_a_coordinate(default_model):
    data = [{"input": PROMPT, "target": ANSWER, "label": "x"}]
    ds = ax.evaluate(default_model, data, {"saliency": ax.saliency}, attributions=True)
    assert ds.label.values.tolist() == ["x"]
    assert isinstance(ds.attribution, xr.DataArray)
    assert ds.attribution.dims == ("method", "example", "target", "source")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"methods": {}}, "non-empty mapping"),
        ({"metrics": ["accuracy"]}, "`metrics` must be"),
        ({"metrics": ["kendall"]}, "two or more"),
        ({"data": [{"input": PROMPT, "rationale": [1, 0]}], "metrics": ["iou"]}, "2 marks for"),
        ({"data": [{"input": PROMPT}, {"input": OTHER[0], "target": OTHER[1]}]}, "on every"),
        ({"data": [{"prompt": PROMPT}]}, "field 'input'"),
    ],
)
def test_bad_calls_are_clear_errors(default_model, kwargs, match):
    call = {"data": [{"input": PROMPT, "target": ANSWER}], "methods": {"s": ax.saliency}}
    call.update(kwargs)
    with pytest.raises(ax.AttraxError, match=match):
        ax.evaluate(default_model, call.pop("data"), call.pop("methods"), **call)


def test_methods_with_different_coordinates_are_scored_together(default_model):
    """IG carries a completeness_gap that saliency lacks: both are still one batch."""
    import functools

    data = [{"input": PROMPT, "target": ANSWER}]
    methods = {"s": ax.saliency, "ig": functools.partial(ax.integrated_gradients, steps=4)}
    ds = ax.evaluate(default_model, data, methods, ["sufficiency"])
    assert ds.sufficiency.notnull().all()


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation written here: ranks by double argsort (no ties in float relevance)."""
    keep = ~np.isnan(a) & ~np.isnan(b)
    ra = np.argsort(np.argsort(a[keep])).astype(float)
    rb = np.argsort(np.argsort(b[keep])).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def test_sanity_checks_randomize_the_top_layer_first(default_model):
    import copy

    import torch

    data = [{"input": PROMPT, "target": ANSWER}]
    ds = ax.sanity_checks(default_model, data, ax.pipe(ax.saliency, ax.l2_norm), seed=3)
    assert ds.randomized.values.tolist() == ["transformer.h.1", "transformer.h.0"]
    hf = copy.deepcopy(default_model.hf)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        hf.transformer.h[1].apply(hf._init_weights)
    shaken = ax.load_model(hf, tokenizer=default_model.tokenizer)
    before = ax.normalize(ax.pipe(ax.saliency, ax.l2_norm)(default_model, PROMPT, ANSWER))
    after = ax.normalize(ax.pipe(ax.saliency, ax.l2_norm)(shaken, PROMPT, ANSWER))
    for k, target in enumerate(ds.target.values):
        want = _spearman(before.sel(target=target).values, after.sel(target=target).values)
        assert float(ds.spearman.isel(randomized=0, example=0, target=k)) == pytest.approx(want)
    # the trained model's explanation decays as more layers are randomized
    decay = ds.spearman.mean(("example", "target")).values
    assert decay[1] < decay[0] < 1


def test_random_logit_is_another_class():
    from attrax.testing import tiny_classifier

    hf, tok = tiny_classifier("bert", "sequence", num_labels=3)
    model = ax.load_model(hf, tokenizer=tok)
    text = "the capital of france is paris"
    ds = ax.sanity_checks(model, [text], ax.saliency)
    predicted = ax.saliency(model, text)
    cls = int(predicted.target_class.values[0])
    original = ax.normalize(ax.l2_norm(predicted)).values[0]
    others = [
        _spearman(original, ax.normalize(ax.l2_norm(ax.saliency(model, text, c))).values[0])
        for c in range(3)
        if c != cls
    ]
    got = float(ds.random_logit.values.ravel()[0])
    assert any(got == pytest.approx(o) for o in others), (got, others)


def test_sanity_checks_of_a_language_model_need_targets(default_model):
    with pytest.raises(ax.InputError, match="need a `target`"):
        ax.sanity_checks(default_model, [PROMPT], ax.saliency)
