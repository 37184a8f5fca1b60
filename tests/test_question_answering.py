"""Extractive question answering (``*ForQuestionAnswering``): the predicted answer, answer
targets, and methods against a naive per-(example, target) autograd loop through the Hugging
Face model itself, written here (one example at a time: no padding)."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

import attrax as ax
from attrax.testing import tiny_classifier

ARCHS = ["bert", "distilbert", "roberta", "deberta-v2", "electra", "modernbert"]
PAIRS = [
    ("who sat on the mat", "the cat sat on the mat"),
    ("what is red", "a big mat is red and the old cat is not"),
]


@pytest.fixture(scope="module")
def models() -> dict[str, ax.Model]:
    built = {}
    for arch in ARCHS:
        hf, tok = tiny_classifier(arch, "question-answering")
        built[arch] = ax.load_model(hf, tokenizer=tok)
    return built


class Naive:
    """One (question, context) pair through the Hugging Face model, no padding."""

    def __init__(self, model: ax.Model, question: str, context: str) -> None:
        encoding = model.tokenizer(question, context, return_tensors="pt")
        self.hf = model.hf
        self.ids = encoding["input_ids"]
        self.types = encoding.get("token_type_ids")
        self.sequence_ids = encoding.sequence_ids(0)

    def embeddings(self) -> torch.Tensor:
        return self.hf.get_input_embeddings()(self.ids).detach()

    def logits(self, embeds: torch.Tensor) -> torch.Tensor:
        """``[2, L]``: the start logits, then the end logits."""
        kwargs = {"inputs_embeds": embeds}
        if (
            self.types is not None
            and "token_type_ids" in inspect.signature(self.hf.forward).parameters
        ):
            kwargs["token_type_ids"] = self.types
        out = self.hf(**kwargs)
        return torch.stack((out.start_logits[0], out.end_logits[0]))

    def score(self, embeds: torch.Tensor, slot: int, position: int, objective: str) -> torch.Tensor:
        row = self.logits(embeds)[slot]
        if objective == "logit":
            return row[position]
        if objective == "logprob":
            return torch.log_softmax(row, -1)[position]
        return torch.softmax(row, -1)[position]

    def gradient(self, embeds, slot, position, objective="probability") -> torch.Tensor:
        embeds = embeds.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.score(embeds, slot, position, objective), embeds)
        return grad[0]

    def best_span(self) -> tuple[int, int]:
        """The context span ``start <= end`` with the largest start + end logit, by loops."""
        with torch.no_grad():
            start, end = self.logits(self.embeddings())
        context = [p for p, s in enumerate(self.sequence_ids) if s == 1]
        best, span = -float("inf"), None
        for s in context:
            for e in context:
                if e >= s and float(start[s] + end[e]) > best:
                    best, span = float(start[s] + end[e]), (s, e)
        return span


def _check(da, model, pairs, per_target, objective="probability", rtol=1e-4):
    """``per_target(naive, embeds, slot, position) -> [L, H]`` against each example's rows."""
    for b, (question, context) in enumerate(pairs):
        naive = Naive(model, question, context)
        embeds = naive.embeddings()
        got = da.isel(example=b)
        for slot in (0, 1):
            position = int(got.target_position[slot])
            want = per_target(naive, embeds, slot, position).detach().numpy()
            row = got.isel(target=slot).values
            # the padded sources of a shorter example are NaN, never a silent 0
            assert np.isnan(row[want.shape[0] :]).all()
            np.testing.assert_allclose(
                row[: want.shape[0]], want, rtol=rtol, atol=1e-6 * np.abs(want).max()
            )


@pytest.mark.parametrize("arch", ARCHS)
def test_the_prediction_is_the_best_span_of_the_context(models, arch):
    model = models[arch]
    da = ax.saliency(model, PAIRS)
    assert da.target.values.tolist() == ["start", "end"]
    for b, (question, context) in enumerate(PAIRS):
        naive = Naive(model, question, context)
        span = naive.best_span()
        got = da.isel(example=b)
        assert got.predicted_position.values.tolist() == list(span)
        assert got.target_position.values.tolist() == list(span)  # no targets: the prediction
        with torch.no_grad():
            logits = naive.logits(naive.embeddings())
        chances = [float(torch.softmax(logits[k], -1)[span[k]]) for k in (0, 1)]
        np.testing.assert_allclose(got.predicted_probability.values, chances, rtol=1e-5)
        ids = naive.ids[0, span[0] : span[1] + 1].tolist()
        assert str(got.answer.values) == model.tokenizer.decode(ids).strip()
        assert str(got.predicted_answer.values) == str(got.answer.values)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("objective", ["probability", "logit", "logprob"])
def test_saliency_equals_the_naive_loop(models, arch, objective):
    model = models[arch]
    da = ax.saliency(model, PAIRS, objective=objective)
    _check(da, model, PAIRS, lambda n, e, s, p: n.gradient(e, s, p, objective), objective)


@pytest.mark.parametrize("arch", ["bert", "deberta-v2"])
def test_integrated_gradients_equal_the_naive_loop_with_its_own_nodes(models, arch):
    model = models[arch]
    nodes, weights = np.polynomial.legendre.leggauss(4)
    alphas, weights = (nodes + 1) / 2, weights / 2

    def naive_ig(n, e, s, p):
        total = sum(
            w * n.gradient(float(a) * e, s, p) for a, w in zip(alphas, weights, strict=True)
        )
        return total * e[0]

    targets = [(8, 9), "red and the old"]
    da = ax.integrated_gradients(model, PAIRS, targets, steps=4)
    assert da.isel(example=0).target_position.values.tolist() == [8, 9]
    _check(da, model, PAIRS, naive_ig)


@pytest.mark.parametrize("arch", ["roberta", "modernbert"])
def test_occlusion_equals_the_naive_loop(models, arch):
    model = models[arch]

    def naive_occlusion(n, e, s, p):
        with torch.no_grad():
            full = n.score(e, s, p, "probability")
            drops = []
            for q in range(e.shape[1]):
                cut = e.clone()
                cut[:, q] = 0
                drops.append(full - n.score(cut, s, p, "probability"))
        return torch.stack(drops)

    da = ax.occlusion(model, PAIRS)
    _check(da, model, PAIRS, naive_occlusion, rtol=1e-3)


def test_layers_equal_the_gradient_at_each_hidden_state(models):
    # Captum's tutorial attributes the start and end to every layer too: layers="all" reads
    # the residual stream each layer writes, the embeddings' output first
    model = models["bert"]
    da = ax.saliency(model, PAIRS[0], (8, 9), layers="all")
    naive = Naive(model, *PAIRS[0])
    kwargs = {"token_type_ids": naive.types}
    for slot, name in enumerate(("start_logits", "end_logits")):
        embeds = naive.embeddings().requires_grad_(True)  # the model's weights are frozen
        out = model.hf(inputs_embeds=embeds, output_hidden_states=True, **kwargs)
        score = torch.softmax(getattr(out, name)[0], -1)[(8, 9)[slot]]
        grads = torch.autograd.grad(score, out.hidden_states)
        assert da.sizes["layer"] == len(grads)
        for layer, grad in enumerate(grads):
            got = da.isel(target=slot, layer=layer).values
            np.testing.assert_allclose(got, grad[0].numpy(), rtol=1e-4, atol=1e-7)


def test_an_answer_text_targets_its_tokens_in_the_context(models):
    model = models["bert"]
    question, context = PAIRS[1]
    da = ax.saliency(model, (question, context), "red and the old")
    start, end = da.target_position.values.tolist()
    ids = da.source_id.values.tolist()
    assert model.tokenizer.decode(ids[start : end + 1]) == "red and the old"
    assert str(da.answer.values) == "red and the old"
    assert (da.segment.values[start : end + 1] == 1).all()
    # the question's "red" comes first in the sequence: the answer is looked up in the context
    assert ids.index(ids[start]) < start
    # the same span given by token positions gives the same array
    again = ax.saliency(model, (question, context), (start, end))
    np.testing.assert_array_equal(again.values, da.values)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_an_answer_text_is_whole_words_not_part_of_one(models, arch):
    """`"at"` was the token `cat` (or `##at`) of "the cat sat", the first place its letters
    occur (until 2026-12-06): an answer is the first occurrence that is whole words, and one
    that occurs only inside a word is an error."""
    model = models[arch]
    context = "the cat sat on the mat at home"
    da = ax.saliency(model, ("what is it", context), "at")
    start, end = da.target_position.values.tolist()
    tokens = model.tokenizer.convert_ids_to_tokens(da.source_id.values.tolist())
    assert model.tokenizer.convert_tokens_to_string(tokens[start : end + 1]).strip() == "at"
    assert context.split().index("at") == 6 and str(da.answer.values) == "at"
    words = model.tokenizer.convert_tokens_to_string(tokens[: end + 1]).split()
    assert words[-2:] == ["mat", "at"]  # the answer ends the context's seventh word
    with pytest.raises(ax.InputError, match=r"'at s' is in the example's context only inside"):
        ax.saliency(model, ("what is it", context), "at s")


def test_a_contrast_span_subtracts_its_objective(models):
    model = models["electra"]
    target, contrast = [(7, 8), (9, 12)], [(9, 9), (10, 11)]
    got = ax.saliency(model, PAIRS, target, contrast=contrast, objective="logit")
    plain = ax.saliency(model, PAIRS, target, objective="logit")
    other = ax.saliency(model, PAIRS, contrast, objective="logit")
    want = plain.values - other.values
    # float32 rounding of the two gradients shows on their difference: atol scaled by them
    scale = np.nanmax(np.abs(plain.values))
    np.testing.assert_allclose(got.values, want, rtol=1e-5, atol=1e-5 * scale)
    assert got.contrast_position.values.tolist() == [list(c) for c in contrast]


def test_comprehensiveness_equals_a_naive_loop_of_masked_forwards(models):
    model = models["bert"]
    targets = [(8, 9), "red and the old"]
    da = ax.l2_norm(ax.saliency(model, PAIRS, targets))
    fractions = (0.1, 0.5)
    comp = ax.comprehensiveness(model, da, PAIRS, targets, fractions=fractions)
    pad = model.hf.get_input_embeddings()(torch.tensor([model.tokenizer.pad_token_id]))[0]
    for b, pair in enumerate(PAIRS):
        naive = Naive(model, *pair)
        embeds = naive.embeddings()
        for slot, name in enumerate(("start", "end")):
            row = da.isel(example=b).sel(target=name).values[: embeds.shape[1]]
            order = np.argsort(-row, kind="stable")  # every token of the input is ranked
            position = int(da.isel(example=b).target_position[slot])
            with torch.no_grad():
                full = naive.score(embeds, slot, position, "probability")
                for f in fractions:
                    cut = embeds.clone()
                    cut[0, order[: math.ceil(f * len(row))]] = pad
                    want = float(full - naive.score(cut, slot, position, "probability"))
                    got = comp.isel(example=b).sel(target=name, fraction=f)
                    assert float(got) == pytest.approx(want, abs=1e-6)
    # the end alone, or the targets in another order, score the same
    for sub in (da.sel(target=["end"]), da.sel(target=["end", "start"])):
        again = ax.comprehensiveness(model, sub, PAIRS, targets, fractions=fractions)
        for name in sub.target.values:
            np.testing.assert_allclose(
                again.sel(target=name).values, comp.sel(target=name).values, rtol=1e-6
            )
            np.testing.assert_array_equal(
                again.sel(target=name).predicted_position, comp.sel(target=name).predicted_position
            )


def test_evaluate_reads_each_records_context(models):
    model = models["bert"]
    records = [
        {"input": q, "input_pair": c, "target": a}
        for (q, c), a in zip(PAIRS, ["cat sat", "red"], strict=True)
    ]
    ds = ax.evaluate(model, records, {"saliency": ax.saliency}, ["comprehensiveness"])
    targets = ["cat sat", "red"]
    da = ax.normalize(ax.l2_norm(ax.saliency(model, PAIRS, targets)))
    alone = ax.comprehensiveness(model, da, PAIRS, targets).aopc
    got = ds.comprehensiveness.sel({"method": "saliency"})
    assert got.target.values.tolist() == ["start", "end"]
    np.testing.assert_allclose(got.values.reshape(alone.shape), alone.values, rtol=1e-6)
    with pytest.raises(ax.InputError, match="record 0: `input` needs its context"):
        ax.evaluate(model, [{"input": "who"}], {"saliency": ax.saliency})
    with pytest.raises(ax.InputError, match="'input_pair' must be a non-empty text"):
        ax.evaluate(model, [{"input": "who", "input_pair": 3}], {"saliency": ax.saliency})


def test_merging_subwords_merges_the_sources_only(models):
    model = models["bert"]
    da = ax.l2_norm(ax.saliency(model, PAIRS[0], "cat sat"))
    merged = ax.merge_subwords(da)
    assert merged.target.values.tolist() == ["start", "end"]
    words = merged.source_word.values.tolist()
    assert "mat" in words and "##at" not in words  # "m", "##at" merged
    np.testing.assert_allclose(merged.sum("source"), da.sum("source"), rtol=1e-6)
    with pytest.raises(ax.OptionError, match="are not tokens to merge"):
        ax.merge_subwords(da, dims="target")


def test_sanity_checks_relabel_the_answer_to_a_position_the_seed_draws(models):
    # another output of an answerer is another position: the seed draws which (it drew from
    # the two "labels" start and end, so always the next position, until 2026-12-06)
    records = [{"input": q, "input_pair": c} for q, c in PAIRS]
    spearman = [
        ax.sanity_checks(models["bert"], records, ax.saliency, seed=seed).random_logit.values
        for seed in range(3)
    ]
    assert not np.allclose(spearman[0], spearman[1]) or not np.allclose(spearman[0], spearman[2])


def test_sanity_checks_of_a_batch_equal_each_record_alone(models):
    # the other position wraps around each pair's own length (around the batch's padded length
    # until 2026-12-06: padding, NaN correlations, and values that depended on the batch)
    pairs, answers = [*PAIRS, ("why", "because")], ["cat sat", "old cat", "because"]
    records = [
        {"input": q, "input_pair": c, "target": a} for (q, c), a in zip(pairs, answers, strict=True)
    ]
    batch = ax.sanity_checks(models["bert"], records, ax.saliency, seed=3)
    for b, record in enumerate(records):
        alone = ax.sanity_checks(models["bert"], [record], ax.saliency, seed=3)
        got = batch.random_logit.isel(example=b).values
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, alone.random_logit.isel(example=0).values, rtol=1e-6)


def test_patching_a_pair_from_records_and_the_cli_equals_the_api(models, tmp_path):
    # a record's corrupted pair is 'corrupted' + 'corrupted_pair'; the CLI's a JSON list of two
    import json

    from attrax.cli import main

    model = models["bert"]
    clean, bad = ("who was good", "the plot was good"), ("who was good", "the story was good")
    want = ax.attribution_patching(model, clean, "plot was good", corrupted=bad, site="residual")
    model.hf.save_pretrained(tmp_path / "qa")
    model.tokenizer.save_pretrained(tmp_path / "qa")
    record = {"input": clean[0], "input_pair": clean[1], "target": "plot was good"}
    record |= {"corrupted": bad[0], "corrupted_pair": bad[1]}
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    run = ax.attribute_dataset(
        tmp_path / "qa", tmp_path / "d.jsonl", tmp_path / "out",
        method="attribution_patching", reduce="none", progress=False, site="residual",
    )  # fmt: skip
    got = ax.load_dataset_results(run.out).isel(example=0)
    assert got.target_position.values.tolist() == want.target_position.values.tolist()
    np.testing.assert_allclose(got.values, want.values, rtol=1e-5, atol=1e-8)
    code = main([
        "attribute", "--model", str(tmp_path / "qa"), "--input", clean[0], "--input-pair",
        clean[1], "--target", "plot was good", "--method", "attribution_patching",
        "--reduce", "none", "-o", f"corrupted={json.dumps(list(bad))}", "-o", "site=residual",
        "--out", str(tmp_path / "cli.nc"),
    ])  # fmt: skip
    assert code == 0
    np.testing.assert_allclose(ax.load(tmp_path / "cli.nc").values, want.values, rtol=1e-5)
    record.pop("corrupted")  # a pair's second corrupted text alone
    (tmp_path / "e.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(ax.InputError, match="'corrupted' and 'corrupted_pair'"):
        ax.attribute_dataset(tmp_path / "qa", tmp_path / "e.jsonl", tmp_path / "o2", progress=False)


def test_a_local_checkpoint_loads_as_a_question_answering_model(tmp_path):
    hf, tok = tiny_classifier("bert", "question-answering")
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = ax.load_model(tmp_path)
    assert model.task == "question-answering" and model.labels == {0: "start", 1: "end"}
    da = ax.saliency(model, PAIRS[0])
    assert da.attrs["task"] == "question-answering" and da.dims == ("target", "source", "hidden")
    np.testing.assert_allclose(da.values, ax.saliency(ax.Model(hf, tok), PAIRS[0]).values)


def test_bad_answers_are_refused(models):
    model = models["bert"]
    pair = PAIRS[0]
    with pytest.raises(ax.InputError, match=r"\(question, context\) pair"):
        ax.saliency(model, "just one text")
    with pytest.raises(ax.OptionError, match="`positions`"):
        ax.saliency(model, pair, positions=[1])
    with pytest.raises(ax.InputError, match=r"`targets` \(5, 3\) is not a span"):
        ax.saliency(model, pair, (5, 3))
    with pytest.raises(ax.InputError, match="is not a span of the input's"):
        ax.saliency(model, pair, (5, 99))
    with pytest.raises(ax.InputError, match="'dog' is not in the example's context"):
        ax.saliency(model, pair, "dog")
    with pytest.raises(ax.InputError, match=r"must be the answer's text or its \(start, end\)"):
        ax.saliency(model, pair, (1.0, 2))
    with pytest.raises(ax.InputError, match=r"`targets\[1\]` must be the answer's text"):
        ax.saliency(model, PAIRS, [(8, 9), 3])
    with pytest.raises(ax.InputError, match="one answer per example"):
        ax.saliency(model, PAIRS, [(8, 9)])
    with pytest.raises(ax.InputError, match="is the target span itself"):
        ax.saliency(model, pair, (8, 9), contrast=(8, 9))


def test_methods_that_read_one_query_row_are_refused(models):
    for method in (ax.attention, ax.rollout, ax.value_zeroing, ax.alti, ax.attention_x_gradient):
        with pytest.raises(ax.ModelError, match="no one query row predicts its answer"):
            method(models["bert"], PAIRS[0])


def test_decoder_only_and_encoder_decoder_answerers_are_refused():
    hf, tok = tiny_classifier("llama", "question-answering")
    with pytest.raises(ax.ModelError, match="decoder-only question-answering model"):
        ax.load_model(hf, tokenizer=tok)
