"""ax.evaluate / ax.summary: faithfulness equals the metrics called per method, plausibility and
agreement against hand-worked values, records from every source."""

from __future__ import annotations

import functools
import json

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

import attrax as ax
from attrax._evaluate import read_records
from attrax.testing import tiny_classifier

PROMPT, ANSWER = "3 1 4 0 5 9 =", " 9 5 0 4 1 3"
OTHER = ("2 7 1 8 6 4 =", " 4 6 8 1 7 2")


def test_faithfulness_equals_each_method_scored_alone(default_model):
    """Each method is scored with the objective it explained: LRP's logit beside saliency's
    probability (scored with the first method's until 2026-12-05)."""
    data = [{"input": PROMPT, "target": ANSWER}, {"input": OTHER[0], "target": OTHER[1]}]
    methods = {"saliency": ax.saliency, "occlusion": ax.occlusion, "lrp": ax.lrp}
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


def test_an_evaluation_records_how_each_method_ran(default_model, tmp_path):
    """Two evaluations with other steps or objectives were told apart by nothing: the attrs
    were the model, the metrics and the reduce spec, as "reductions" (until 2026-12-06)."""
    data = [{"input": PROMPT, "target": ANSWER}]
    ig = functools.partial(ax.integrated_gradients, steps=3, objective="logprob")
    ds = ax.evaluate(default_model, data, {"ig": ig, "saliency": "saliency"}, ["sufficiency"])
    methods = json.loads(ds.attrs["methods"])
    assert methods["ig"]["method"] == "integrated_gradients"
    assert methods["ig"]["objective"] == "logprob" and methods["ig"]["options"]["steps"] == 3
    assert methods["ig"]["reductions"] == "l2_norm(hidden);normalize(source)"  # "auto"
    assert methods["saliency"]["objective"] == "probability"
    assert (ds.attrs["reduce"], ds.attrs["top_k"], ds.attrs["model_dtype"]) == (
        "auto",
        3,
        "float32",
    )
    assert ds.attrs["attrax_version"] == ax.__version__ and "reductions" not in ds.attrs
    xr.testing.assert_identical(ax.load(ax.save(ds, tmp_path / "ev.nc")), ds)
    kept = ax.evaluate(default_model, data, {"saliency": "saliency"}, ["sufficiency"],
                       attributions=True).attribution  # fmt: skip
    assert kept.attrs["subwords"] == default_model.subwords and kept.attrs["task"] == "generation"


def test_contrastive_methods_are_scored_with_each_records_contrast(default_model):
    """Two methods bound to one contrast per record: each method's copy of the records is
    scored with its contrasts (until 2026-12-06 refused: "a list of 4 strings, got 2")."""
    data = [{"input": PROMPT, "target": ANSWER}, {"input": OTHER[0], "target": OTHER[1]}]
    contrast = [" 1 1 1 1 1 1", " 2 2 2 2 2 2"]
    methods = {
        "saliency": functools.partial(ax.saliency, contrast=contrast),
        "input_x_gradient": functools.partial(ax.input_x_gradient, contrast=contrast),
    }
    ds = ax.evaluate(default_model, data, methods, ["comprehensiveness"])
    inputs, targets = [d["input"] for d in data], [d["target"] for d in data]
    for name, fn in methods.items():
        da = ax.normalize(ax.l2_norm(fn(default_model, inputs, targets)))
        da.attrs.pop("options")  # the contrast given here, not read back from the attrs
        alone = ax.comprehensiveness(default_model, da, inputs, targets, contrast=contrast).aopc
        got = ds.comprehensiveness.sel({"method": name}).values
        np.testing.assert_allclose(got, alone.values, rtol=1e-6, atol=1e-9)


def test_records_with_a_contrast_field_are_each_explained_against_it(default_model, tmp_path):
    """A `contrast` field (new 2026-12-06): every method explains each record's target against
    the record's own contrast, and is scored on the same difference."""
    rows = [
        {"text": PROMPT, "answer": ANSWER, "foil": " 1 1 1 1 1 1"},
        {"text": OTHER[0], "answer": OTHER[1], "foil": " 2 2 2 2 2 2"},
    ]
    data = tmp_path / "d.csv"  # a CSV keeps a contrast's leading space (text cells)
    pd.DataFrame(rows).to_csv(data, index=False)
    fields = {"input": "text", "target": "answer", "contrast": "foil"}
    methods = {"saliency": ax.saliency, "occlusion": ax.occlusion}
    ds = ax.evaluate(default_model, data, methods, ["comprehensiveness"], fields=fields)
    inputs, targets = [r["text"] for r in rows], [r["answer"] for r in rows]
    contrast = [r["foil"] for r in rows]
    for name, fn in methods.items():
        da = fn(default_model, inputs, targets, contrast=contrast)
        da = ax.normalize(ax.l2_norm(da) if "hidden" in da.dims else da)
        da.attrs.pop("options")  # the contrast given here, not read back from the attrs
        alone = ax.comprehensiveness(default_model, da, inputs, targets, contrast=contrast).aopc
        got = ds.comprehensiveness.sel({"method": name}).values
        np.testing.assert_allclose(got, alone.values, rtol=1e-6, atol=1e-9)
    records = [{"input": r["text"], "target": r["answer"], "contrast": r["foil"]} for r in rows]
    cases = [
        ({"a": ax.attention}, "records give a field 'contrast' but `methods\\['a'\\]` takes none"),
        ({"a": ax.pipe(ax.attention, ax.mean("head"))}, "but `methods\\['a'\\]` takes none"),
        ({"s": functools.partial(ax.saliency, contrast=" 1")}, "binds `contrast` and the records"),
    ]
    for bad, match in cases:  # assertions only: one call per case
        with pytest.raises(ax.OptionError, match=match):
            ax.evaluate(default_model, records, bad)
    misaligned = [records[0], {**records[1], "contrast": " 2 2"}]
    with pytest.raises(ax.InputError, match="`data` record 1: `contrast` ' 2 2' has 2 tokens"):
        ax.evaluate(default_model, misaligned, {"s": ax.saliency})
    with pytest.raises(ax.InputError, match="1 of 2 records have a field 'contrast'"):
        ax.evaluate(default_model, [records[0], rows[1] | {"input": OTHER[0]}], {"s": ax.saliency})
    with pytest.raises(ax.InputError, match="gives a 'contrast': sanity checks explain"):
        ax.sanity_checks(default_model, records, ax.saliency)


def test_a_classifiers_contrast_field_is_a_class(tmp_path):
    """A CSV's contrast cell `0` is class 0, as its label cell is."""
    model = ax.load_model(*tiny_classifier("bert"))
    data = tmp_path / "d.csv"
    pd.DataFrame(
        [{"input": "the plot was good", "target": "label_1", "contrast": "0"},
         {"input": "a dull film", "target": "label_2", "contrast": "label_1"}]
    ).to_csv(data, index=False)  # fmt: skip
    ds = ax.evaluate(model, data, {"s": ax.saliency}, ["sufficiency"], attributions=True)
    # targets label_1 and label_2 along `target`, each record's at its own (-1: not its target)
    assert ds.contrast_class.values.tolist() == [[0, -1], [-1, 1]]
    inputs = ["the plot was good", "a dull film"]
    da = ax.normalize(ax.l2_norm(ax.saliency(model, inputs, ["label_1", "label_2"],
                                             contrast=[0, "label_1"])))  # fmt: skip
    da.attrs.pop("options")
    want = ax.sufficiency(model, da, inputs, ["label_1", "label_2"], contrast=[0, 1]).aopc
    np.testing.assert_allclose(ds.sufficiency.sel({"method": "s"}).values, want.values, rtol=1e-6)


def test_shards_concatenate_in_one_batchs_target_order():
    """Shards of an evaluation (Dask workers') join as one batch orders its targets: classes by
    class id (sorted as strings until 2026-12-06: label_10 before label_2), an answer's start
    before its end."""
    from attrax._evaluate import concat_evaluations

    hf, tok = tiny_classifier("bert", "sequence", num_labels=12)
    model = ax.load_model(hf, tokenizer=tok)
    records = [{"input": "a cat", "target": "label_10"}, {"input": "a dog", "target": "label_2"}]
    methods, metrics = {"saliency": ax.saliency}, ["comprehensiveness"]
    whole = ax.evaluate(model, records, methods, metrics)
    shards = [ax.evaluate(model, [r], methods, metrics) for r in records]
    joined = concat_evaluations(shards)
    assert joined.target.values.tolist() == whole.target.values.tolist() == ["label_2", "label_10"]
    xr.testing.assert_allclose(joined, whole)
    hf, tok = tiny_classifier("bert", "question-answering")
    answerer = ax.load_model(hf, tokenizer=tok)
    pairs = [{"input": "who", "input_pair": "the cat sat"}, {"input": "what", "input_pair": "a b"}]
    joined = concat_evaluations([ax.evaluate(answerer, [r], methods, metrics) for r in pairs])
    assert joined.target.values.tolist() == ["start", "end"]


def test_labels_on_some_records_only_are_refused(default_model):
    # as attribute_dataset refuses them (evaluate stored the string 'None' until 2026-12-06)
    data = [
        {"input": PROMPT, "target": ANSWER, "label": "a"},
        {"input": OTHER[0], "target": OTHER[1]},
    ]
    with pytest.raises(ax.InputError, match="1 of 2 records have a field 'label'"):
        ax.evaluate(default_model, data, {"saliency": ax.saliency})


def test_methods_of_one_side_and_of_two_are_refused():
    # a translator's sources with and without the decoder prefix (attribute_target) do not join
    import functools

    from attrax.testing import tiny_model

    hf, tok = tiny_model("t5")
    model = ax.load_model(hf, tokenizer=tok)
    methods = {"a": ax.saliency, "b": functools.partial(ax.saliency, attribute_target=True)}
    with pytest.raises(ax.OptionError, match=r"\['b'\] attribute the decoder prefix"):
        ax.evaluate(model, [{"input": "a cat sat", "target": " the dog"}], methods)


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


def test_tied_scores_share_their_places_wherever_the_rationale_is(default_model):
    """A constant attribution ranks nothing: its tokens were taken in position order, so it
    scored a perfect 1.0 when the rationale came first and 0 when it came sixth (until
    2026-12-06). Hand-worked: 2 of 7 tokens are the rationale, each of the 7 tied tokens has a
    2/7 chance of a top-2 place; the average precision of one tied step is 2/7."""
    target = 7
    scores = {}
    for rationale in ([1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1, 1]):
        data = [{"input": PROMPT, "target": ANSWER, "rationale": rationale}]
        ds = ax.evaluate(default_model, data, {"flat": _fixed({target: [0.5] * 7})},
                         ["token_f1", "iou", "auprc"], reduce="none")  # fmt: skip
        got = ds.sel({"method": "flat", "example": 0, "target": target})
        scores[tuple(rationale)] = (float(got.token_f1), float(got.iou), float(got.auprc))
    hits = 2 * 2 / 7  # expected rationale tokens among the top 2
    want = (hits / 2, hits / (4 - hits), 2 / 7)
    for got in scores.values():
        np.testing.assert_allclose(got, want, rtol=1e-12)
    # a tie among the top: one rationale token above, the second place shared by three tokens
    data = [{"input": PROMPT, "target": ANSWER, "rationale": [0, 1, 0, 1, 0, 0, 0]}]
    relevance = [0.1, 0.9, 0.5, 0.5, 0.5, 0.0, 0.0]
    ds = ax.evaluate(default_model, data, {"tied": _fixed({target: relevance})},
                     ["token_f1", "auprc"], reduce="none")  # fmt: skip
    got = ds.sel({"method": "tied", "example": 0, "target": target})
    assert float(got.token_f1) == pytest.approx((1 + 1 / 3) / 2)
    # precision 1/1 after token 1 (recall 1/2), 2/4 after the tied three (recall 2/2)
    assert float(got.auprc) == pytest.approx(1 / 2 * 1 + 1 / 2 * 2 / 4)
    # a ranking shares its whole top with itself, tied or not; a tied top is all its ties
    tops = {"flat": _fixed({target: [0.5] * 7}), "again": _fixed({target: [0.5] * 7}),
            "tied": _fixed({target: relevance})}  # fmt: skip
    ds = ax.evaluate(default_model, data, tops, ["topk_overlap"], reduce="none", top_k=2)
    pair = ds.topk_overlap.sel({"example": 0, "target": target})
    assert float(pair.sel({"method": "flat", "other": "again"})) == 1.0
    assert float(pair.sel({"method": "tied", "other": "tied"})) == 1.0
    # top 2 of `relevance` with ties: {1, 2, 3, 4}; of the flat one: all 7; 4 shared of 7
    assert float(pair.sel({"method": "tied", "other": "flat"})) == pytest.approx(4 / 7)


def test_agreement_of_a_method_with_itself_and_its_reverse(default_model):
    """±1 at the extremes, and against rank statistics written here for a third ranking."""
    data = [{"input": PROMPT, "target": ANSWER}]
    relevance = [0.1, 0.9, 0.0, 0.2, 0.8, 0.3, 0.05]
    # neither monotone in `relevance` nor without ties: ±1 and 0 cannot tell Spearman from
    # Pearson, tau-b from tau-a, or an overlap divided by k from one divided by the sources
    other = [0.6, 0.7, 0.1, 0.5, 0.1, 0.9, 0.3]
    methods = {
        "a": _fixed({7: relevance}),
        "b": _fixed({7: [-v for v in relevance]}),
        "c": _fixed({7: other}),
    }
    metrics = ["spearman", "kendall", "topk_overlap"]
    ds = ax.evaluate(default_model, data, methods, metrics, reduce="none", top_k=4)
    pair = ds.sel(example=0, target=7)
    assert float(pair.spearman.sel({"method": "a", "other": "a"})) == pytest.approx(1.0)
    assert float(pair.spearman.sel({"method": "a", "other": "b"})) == pytest.approx(-1.0)
    assert float(pair.kendall.sel({"method": "b", "other": "a"})) == pytest.approx(-1.0)
    # top 4 of a (sources 1, 4, 5, 3) against its bottom 4 (2, 6, 0, 3): of 7, one is both
    assert float(pair.topk_overlap.sel({"method": "a", "other": "b"})) == 1 / 4
    for x, y, m, o in ((relevance, other, "a", "c"), (other, relevance, "c", "a")):
        at = {"method": m, "other": o}
        assert float(pair.spearman.sel(at)) == pytest.approx(_naive_spearman(x, y), abs=1e-12)
        assert float(pair.kendall.sel(at)) == pytest.approx(_naive_tau_b(x, y), abs=1e-12)
        # top 4 of a: sources 1, 4, 5, 3; of c: 5, 1, 0, 3
        assert float(pair.topk_overlap.sel(at)) == 3 / 4
    assert _naive_spearman(relevance, other) != pytest.approx(
        float(np.corrcoef(relevance, other)[0, 1]), abs=1e-3
    )  # ranks, not values, matter here
    assert np.isnan(
        ds.spearman.sel({"method": "a", "other": "b", "target": 8}).item()
    )  # no relevance
    # a top 7 of 7 sources is all of them for any two methods: no agreement to measure, NaN
    # (until 2026-12-06 it was 1, even for a method against its reverse)
    whole = ax.evaluate(default_model, data, methods, ["topk_overlap"], reduce="none", top_k=7)
    assert np.isnan(whole.topk_overlap.sel({"method": "a", "other": "b", "target": 7}).item())
    six = ax.evaluate(default_model, data, methods, ["topk_overlap"], reduce="none", top_k=6)
    # top 6 of a leaves out source 2, of b (its reverse) source 1
    assert six.topk_overlap.sel({"method": "a", "other": "b", "target": 7}).item() == 5 / 6


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


def test_summary_intervals_are_percentiles_of_the_bootstrap_over_examples():
    """Against the exact bootstrap distribution of the mean over examples, enumerated here (all
    5**5 resamples of 5 examples): each bound lies between the exact quantiles a Monte Carlo
    estimate of its percentile can reach (5 standard errors either side)."""
    import itertools

    rng = np.random.default_rng(5)
    methods, n, targets = ["a", "b"], 5, 3
    scores = rng.normal(size=(2, n, targets))
    scores[0, 1, 2] = scores[1, 3, 0] = np.nan  # a target without a score: left out of its mean
    pairs = rng.normal(size=(2, 2, n, targets))  # agreement of each method with each other
    ds = xr.Dataset(
        {
            "sufficiency": (("method", "example", "target"), scores),
            "spearman": (("method", "other", "example", "target"), pairs),
        },
        coords={"method": methods, "other": methods},
    )
    confidence, resamples = 0.9, 20_000
    table = ax.summary(ds, confidence=confidence, resamples=resamples, seed=1)
    for i, name in enumerate(methods):
        per_example = {
            "sufficiency": [_mean(scores[i, e].tolist()) for e in range(n)],
            # agreement with the other method only, never with itself
            "spearman": [_mean(pairs[i, 1 - i, e].tolist()) for e in range(n)],
        }
        for metric, values in per_example.items():
            assert table.loc[name, (metric, "mean")] == pytest.approx(_mean(values), abs=1e-12)
            means = sorted(
                _mean([values[j] for j in draw]) for draw in itertools.product(range(n), repeat=n)
            )

            def quantile(p: float, means: list[float] = means) -> float:
                return means[min(max(int(np.ceil(p * len(means))) - 1, 0), len(means) - 1)]

            for stat, p in (("low", (1 - confidence) / 2), ("high", (1 + confidence) / 2)):
                slack = 5 * (p * (1 - p) / resamples) ** 0.5
                got = table.loc[name, (metric, stat)]
                assert quantile(p - slack) <= got <= quantile(p + slack), (name, metric, stat)


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
    records = read_records(data, input="text", target="answer", label="gold")
    assert [(r.input, r.target, r.label) for r in records] == [
        (PROMPT, ANSWER, "a"),
        (OTHER[0], OTHER[1], "b"),
    ]


@pytest.mark.parametrize("kind", ["jsonl", "csv", "frame"])
def test_pairs_and_single_texts_mix_in_every_source(tmp_path, kind):
    """An NLI-style file may hold single texts too: a JSONL record leaves `input_pair` out, a
    CSV leaves its cell empty (refused as an empty text until 2026-12-06), a DataFrame has NaN."""
    rows = [{"input": PROMPT, "input_pair": OTHER[0]}, {"input": OTHER[0]}]
    if kind == "jsonl":
        data = tmp_path / "d.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "csv":
        data = tmp_path / "d.csv"
        pd.DataFrame(rows).to_csv(data, index=False)
        assert data.read_text().splitlines()[2].endswith(",")  # the empty cell
    else:
        data = pd.DataFrame(rows)
    records = read_records(data)
    assert [(r.input, r.input_pair) for r in records] == [(PROMPT, OTHER[0]), (OTHER[0], None)]


def test_labels_become_a_coordinate(default_model):
    data = [{"input": PROMPT, "target": ANSWER, "label": "x"}]
    ds = ax.evaluate(default_model, data, {"saliency": ax.saliency}, attributions=True)
    assert ds.label.values.tolist() == ["x"]
    assert isinstance(ds.attribution, xr.DataArray)
    assert ds.attribution.dims == ("method", "example", "target", "source")
    # each source's token, id and side, as the method labelled them (dropped until 2026-12-06)
    direct = ax.saliency(default_model, [PROMPT], [ANSWER])
    for name in ("source_token", "source_id", "side"):
        assert ds.attribution[name].values.tolist() == direct[name].values.tolist()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"methods": {}}, "non-empty mapping"),
        ({"metrics": ["accuracy"]}, "`metrics` must be"),
        ({"metrics": ["kendall"]}, "two or more"),
        ({"data": [{"input": PROMPT, "rationale": [1, 0]}], "metrics": ["iou"]}, "2 marks for"),
        ({"data": [{"input": PROMPT}, {"input": OTHER[0], "target": OTHER[1]}]}, "on every"),
        ({"data": [{"prompt": PROMPT}]}, "field 'input'"),
        # the record to look at (until 2026-12-06 a count alone)
        ({"data": [{"input": PROMPT, "target": ANSWER}] * 2 + [{"input": PROMPT}]},
         r"2 of 3 records have a field 'target' \(`data` record 2 has none\)"),
        # attrax functions that are no attribution method (raw TypeErrors until 2026-12-06)
        ({"methods": {"x": ax.l2_norm}}, r"`methods\['x'\]` is ax.l2_norm, a reduction"),
        ({"methods": {"x": ax.step_scores}}, r"is ax.step_scores, step scores, not an attrib"),
        ({"metrics": None}, r"`metrics` must be a non-empty list from .*got None"),
        ({"attributions": "yes"}, r"`attributions` must be a bool, got 'yes'"),
        # one `reduce` for every method: the method it does not fit (until 2026-12-06 unnamed)
        ({"methods": {"s": ax.saliency, "a": ax.attention}, "reduce": "l2_norm,normalize"},
         r"`reduce` 'l2_norm,normalize' on the attribution of `methods\['a'\]`: l2_norm"),
        # one contrast bound for a dataset (until 2026-12-06 "`contrast` must match `inputs`")
        ({"data": [{"input": PROMPT, "target": ANSWER}] * 2,
          "methods": {"c": functools.partial(ax.saliency, contrast=ANSWER)}},
         r"`methods\['c'\]` binds one `contrast` for 2 records: bind a list of 2"),
    ],
)  # fmt: skip
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
    # signed relevance: the rank correlation of magnitudes (spearman_abs) is another statistic
    method = ax.pipe(ax.input_x_gradient, ax.sum)
    ds = ax.sanity_checks(default_model, data, method, seed=3)
    assert ds.randomized.values.tolist() == ["transformer.h.1", "transformer.h.0"]
    before = ax.normalize(method(default_model, PROMPT, ANSWER))
    assert (before < 0).any() and (before > 0).any()
    for depth in range(2):  # the cascade: the top block, then the top two, from the same seed
        hf = copy.deepcopy(default_model.hf)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            for block in (hf.transformer.h[1], hf.transformer.h[0])[: depth + 1]:
                block.apply(hf._init_weights)
        after = ax.normalize(
            method(ax.load_model(hf, tokenizer=default_model.tokenizer), PROMPT, ANSWER)
        )
        for k, target in enumerate(ds.target.values):
            x, y = before.sel(target=target).values, after.sel(target=target).values
            got = ds.isel(randomized=depth, example=0, target=k)
            assert float(got.spearman) == pytest.approx(_spearman(x, y), abs=1e-12)
            want = _spearman(np.abs(x), np.abs(y))
            assert float(got.spearman_abs) == pytest.approx(want, abs=1e-12)
    # the trained model's explanation (the ranking of its magnitudes) decays as more layers are
    # randomized
    decay = ds.spearman_abs.mean(("example", "target")).values
    assert decay[1] < decay[0] < 1


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_the_cascade_is_the_blocks_of_each_stack(arch):
    """One step per block, decoder first: T5's blocks hold lists of sub-layers, which were
    counted as 10 more "layers" that re-randomized blocks already random."""
    from attrax.testing import tiny_model

    hf, tok = tiny_model(arch)
    model = ax.load_model(hf, tokenizer=tok)
    data = [{"input": "The capital of France is", "target": " Paris"}]
    ds = ax.sanity_checks(model, data, ax.pipe(ax.saliency, ax.l2_norm))
    prefix, name = ("", "block") if arch == "t5" else ("model.", "layers")
    want = [
        f"{prefix}{side}.{name}.{i}"
        for side, stack in (("decoder", hf.get_decoder()), ("encoder", hf.get_encoder()))
        for i in reversed(range(len(getattr(stack, name))))
    ]
    assert ds.randomized.values.tolist() == want


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


def _one_record_only(model, inputs, targets):
    """A method that drops every record but the first."""
    return ax.saliency(model, inputs[:1], targets[:1])


def _not_an_array(model, inputs, targets):
    return np.zeros(3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param(
            {"reduce": "none"}, ax.OptionError, r"dims \(.*'hidden'\).*need \(example, target",
            id="reduce-leaves-hidden",
        ),
        pytest.param(
            {"fields": {"foo": "bar"}}, ax.OptionError,
            r"`fields` key 'foo'.*\('input', 'target', 'label', 'rationale', 'input_pair', 'contrast'\)",
            id="fields-key",
        ),
        pytest.param(
            {"methods": {"s": _not_an_array}}, ax.OptionError,
            r"`methods\['s'\]` returned ndarray.*DataArray", id="method-returns-ndarray",
        ),
        pytest.param(
            {"methods": {"s": _one_record_only}}, ax.OptionError,
            r"`example` dim of size 1 for 2 records", id="method-drops-records",
        ),
        pytest.param(
            {"data": [{"input": "1 2 3 =", "target": " 3 2 1", "rationale": [2, -1, 0, 0]}],
             "metrics": ["token_f1", "auprc"]}, ax.InputError,
            r"record 0: field 'rationale' must mark each word 0 or 1, got word 0 \('1'\): 2, "
            r"word 1 \('2'\): -1", id="rationale-marks",
        ),
        pytest.param(
            {"device": "tpu"}, ax.OptionError, r"`device` 'tpu' is not a device", id="device-bad"
        ),
        pytest.param(
            {"device": "meta"}, ax.OptionError, r"`device` 'meta' .* this Model is on 'cpu'",
            id="device-not-the-models",
        ),
        pytest.param(
            {"dtype": torch.float16}, ax.OptionError,
            r"`dtype` torch.float16 .* this Model is torch.float32", id="dtype-not-the-models",
        ),
    ],
)  # fmt: skip
def test_bad_inputs_and_options_name_what_was_expected(default_model, kwargs, error, match):
    data = [{"input": PROMPT, "target": ANSWER}, {"input": OTHER[0], "target": OTHER[1]}]
    call = {"data": data, "methods": {"s": ax.saliency}}
    call.update(kwargs)
    with pytest.raises(error, match=match):
        ax.evaluate(default_model, call.pop("data"), call.pop("methods"), **call)


def test_the_models_own_device_and_dtype_are_accepted(default_model):
    data = [{"input": PROMPT, "target": ANSWER}]
    ds = ax.evaluate(default_model, data, {"s": ax.saliency}, device="cpu", dtype=torch.float32)
    assert ds.comprehensiveness.notnull().all()


def test_rationale_marks_may_be_bools_or_floats():
    data = [{"input": "1 2 3 =", "rationale": [True, 0.0, 1, np.int64(0)]}]
    assert read_records(data)[0].rationale == (1, 0, 1, 0)


def test_sanity_checks_of_a_method_without_objective(default_model):
    """ALTI reads the forward, not an output: its random-logit check is NaN and the cascade
    runs. A wrapper that passes `objective` on to ALTI is refused before any randomized copy
    (it failed after all of them, naming neither the check nor sanity_checks, until
    2026-12-05)."""
    data = [{"input": PROMPT, "target": ANSWER}]
    ds = ax.sanity_checks(default_model, data, ax.alti)
    assert np.isnan(ds.random_logit.values).all()
    # by name, as evaluate takes methods (refused as no function until 2026-12-06)
    xr.testing.assert_identical(ax.sanity_checks(default_model, data, "alti"), ds)
    assert np.isfinite(ds.spearman.values).any()
    calls = []

    def wrapped(model, inputs, targets, **options):
        calls.append(1)
        return ax.alti(model, inputs, targets, **options)

    with pytest.raises(
        ax.OptionError, match=r"random-logit check .*alti does not take `objective`"
    ):
        ax.sanity_checks(default_model, data, wrapped)
    assert len(calls) == 2  # the original and the random logit


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reduce": "none"}, r"`method` 'saliency' with dims \(.*'hidden'\)"),
        ({"method": _not_an_array}, r"`method` '_not_an_array' returned ndarray"),
        ({"fields": {"foo": "bar"}}, r"`fields` key 'foo'"),
        ({"seed": "x"}, r"`seed` must be an integer .*, got 'x'"),
        ({"seed": 2**70}, r"`seed` must be an integer from 0 to 2\*\*64 - 1"),
    ],
    ids=["reduce-leaves-hidden", "method-returns-ndarray", "fields-key", "seed", "seed-too-big"],
)
def test_sanity_checks_refuse_bad_options_before_randomizing(default_model, kwargs, match):
    calls, method = [], kwargs.get("method", ax.saliency)

    def counted(model, inputs, targets, **options):
        calls.append(1)
        return method(model, inputs, targets, **options)

    counted.__name__ = method.__name__  # errors name the method by its name
    call = {"reduce": "auto", **kwargs, "method": counted}
    with pytest.raises(ax.OptionError, match=match):
        ax.sanity_checks(default_model, [{"input": PROMPT, "target": ANSWER}], **call)
    assert len(calls) <= 1  # no randomized copy was attributed


def test_sanity_checks_refuse_a_reduction_as_the_method(default_model):
    with pytest.raises(ax.OptionError, match=r"`method` is ax.l2_norm, a reduction"):
        ax.sanity_checks(default_model, [{"input": PROMPT, "target": ANSWER}], ax.l2_norm)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"resamples": -1}, r"`resamples` must be a positive integer, got -1"),
        ({"resamples": 0}, r"`resamples` must be a positive integer, got 0"),
        ({"resamples": 2.5}, r"`resamples` must be a positive integer, got 2.5"),
        ({"seed": "x"}, r"`seed` must be an integer from 0 to 2\*\*64 - 1, got 'x'"),
        ({"seed": -1}, r"`seed` must be an integer from 0 to 2\*\*64 - 1, got -1"),
        # an interval of 1 resample had the mean outside it (until 2026-12-06)
        ({"resamples": 39}, r"`resamples` must be at least 40 for a 95% interval, got 39"),
        ({"resamples": 10**15}, r"`resamples`=10{15} over 4 examples needs .* give fewer"),
        ({"confidence": "high"}, r"`confidence` must be a number in \(0, 1\), got 'high'"),
    ],
    ids=[
        "resamples-negative",
        "resamples-zero",
        "resamples-float",
        "seed-str",
        "seed-negative",
        "resamples-too-few",
        "resamples-too-many",
        "confidence-str",
    ],
)
def test_summary_refuses_bad_bootstrap_options(kwargs, match):
    scores = np.arange(4.0).reshape(1, 4, 1)
    ds = xr.Dataset(
        {"sufficiency": (("method", "example", "target"), scores)}, coords={"method": ["m"]}
    )
    with pytest.raises(ax.AttraxError, match=match):
        ax.summary(ds, **kwargs)
    with pytest.raises(ax.InputError, match="`ds` has no examples"):
        ax.summary(ds.isel(example=[]))


# --- bad data files: errors name the file and its line (JSONL) or row (CSV), as attribute-dataset's


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        pytest.param(
            "malformed.jsonl", f'{{"input": "{PROMPT}"}}\n{{"input": "{OTHER[0]}",\n',
            r"malformed\.jsonl line 2: not valid JSON \(", id="jsonl-malformed-line",
        ),
        pytest.param(
            "pretty.json", f'[\n {{"input": "{PROMPT}"}}\n]\n',
            r"pretty\.json line 1: not valid JSON .*read as JSON Lines", id="json-pretty-printed",
        ),
        pytest.param(
            "bad.csv", f'input,target\n"{PROMPT}","{ANSWER}\n',
            r"`data` '.*bad\.csv' is not a readable CSV file \(.*EOF inside string", id="csv-quote",
        ),
        pytest.param(
            "empty.csv", "", r"`data` '.*empty\.csv' is empty: expected a header line",
            id="csv-empty",
        ),
        pytest.param(
            "header.csv", "input,target\n", r"`data` '.*header\.csv' has no records",
            id="csv-header-only",
        ),
        pytest.param(
            "num.jsonl", f'{{"input": "{PROMPT}", "target": 9}}\n',
            r"num\.jsonl line 1: field 'target' must be a non-empty text, got 9", id="jsonl-int",
        ),
        pytest.param(  # a tokenizer's TypeError until 2026-12-05
            "half.jsonl", '{"input": "3 1 \\ud800 ="}\n',
            r"half\.jsonl line 1: field 'input' holds a lone surrogate", id="jsonl-surrogate",
        ),
        pytest.param(  # an empty cell is a field not given, as a JSONL record leaves it out
            "blank.csv", f'input,target\n"{PROMPT}",\n"{OTHER[0]}"," 9"\n',
            r"`data` '.*blank\.csv': 1 of 2 records have a field 'target'",
            id="csv-blank-target",
        ),
        pytest.param(
            "noinput.csv", f'input,target\n"{PROMPT}"," 9"\n," 9"\n',
            r"noinput\.csv row 2: field 'input' is empty: expected a non-empty text",
            id="csv-blank-input",
        ),
        pytest.param(
            "mixed.jsonl", f'\n{{"input": "{PROMPT}", "target": "{ANSWER}"}}\n{{"input": "x"}}\n',
            r"`data` '.*mixed\.jsonl': 1 of 2 records have a field 'target'", id="jsonl-mixed",
        ),
        pytest.param(
            "text.jsonl", f'\n{{"text": "{PROMPT}"}}\n',
            r"text\.jsonl line 2 has no field 'input': its fields are \['text'\]",
            id="jsonl-no-input-key",
        ),
        pytest.param(
            "long.jsonl", json.dumps({"input": "1 " * 70 + "="}) + "\n",
            r"long\.jsonl line 1: `input` has 71 tokens", id="jsonl-too-long",
        ),
    ],
)  # fmt: skip
def test_bad_data_files_name_the_file_and_line(default_model, tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ax.InputError, match=match):
        ax.evaluate(default_model, path, {"s": ax.saliency})


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ({"input": 3, "target": ANSWER}, r"d\.jsonl line 2: field 'input' must be a non-empty"),
        (
            {"input": "1 " * 70 + "=", "target": ANSWER},
            r"d\.jsonl line 2: `input` \+ `target` have 71",
        ),
    ],
    ids=["not-a-text", "too-long"],
)
def test_sanity_checks_name_the_bad_line(default_model, tmp_path, line, match):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"input": PROMPT, "target": ANSWER}) + "\n" + json.dumps(line))
    with pytest.raises(ax.InputError, match=match):
        ax.sanity_checks(default_model, path, ax.saliency)


def test_csv_targets_are_read_as_text(default_model, tmp_path):
    # pandas would read this column as the integers 9 and 0 (and drop the leading spaces)
    path = tmp_path / "digits.csv"
    path.write_text(f'input,target\n"{PROMPT}", 9\n"{OTHER[0]}", 0\n')
    from attrax._evaluate import read_records

    assert [r.target for r in read_records(path)] == [" 9", " 0"]
    ds = ax.evaluate(default_model, path, {"s": ax.saliency}, attributions=True)
    assert ds.attribution.target_token.values.ravel().tolist() == ["9", "0"]


def test_labels_are_checked_against_the_classifier(tmp_path):
    classifier = ax.load_model("attrax:classifier")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"input": "a good film", "label": "positive"}\n{"input": "bad", "label": "great"}\n'
    )
    with pytest.raises(ax.InputError, match=r"bad\.jsonl line 2: `label` 'great' is not a label"):
        ax.evaluate(classifier, bad, {"s": ax.saliency})
    # a CSV's class ids are text: "2" is class 2, named in the `label` coordinate
    ids = tmp_path / "ids.csv"
    ids.write_text("input,label\na good film,2\na bad film,0\n")
    ds = ax.evaluate(classifier, ids, {"s": ax.saliency})
    assert ds.label.values.tolist() == ["positive", "negative"]


# --- references written here: rank statistics by their textbook definitions, pair by pair ------


def _average_ranks(x: list[float]) -> list[float]:
    """0-based ranks, a tie sharing the mean of the ranks it spans."""
    return [sum(v < xi for v in x) + (sum(v == xi for v in x) - 1) / 2 for xi in x]


def _naive_spearman(x: list[float], y: list[float]) -> float:
    rx, ry = _average_ranks(x), _average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5


def _naive_tau_b(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b: (concordant - discordant) / sqrt((n0 - ties in x)(n0 - ties in y))."""
    n = len(x)
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            ties_x += dx == 0
            ties_y += dy == 0
            concordant += dx * dy > 0
            discordant += dx * dy < 0
    pairs = n * (n - 1) // 2
    return (concordant - discordant) / ((pairs - ties_x) * (pairs - ties_y)) ** 0.5


def _mean(values: list[float]) -> float:
    """The mean of the values that are not NaN."""
    kept = [v for v in values if v == v]
    return sum(kept) / len(kept)


def test_a_metric_no_example_defines_summarises_to_nan_quietly(default_model):
    """No rationale word marked anywhere: the plausibility metrics are NaN, and summary says so
    without numpy's RuntimeWarnings (18 lines on the CLI's stderr until 2026-12-05)."""
    import warnings

    data = [{"input": PROMPT, "target": ANSWER, "rationale": [0] * 7}]
    ds = ax.evaluate(default_model, data, {"s": ax.saliency, "o": ax.occlusion}, ["iou", "auprc"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = ax.summary(ds)
    assert table.isna().all().all()
