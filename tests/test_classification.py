"""Sequence and token classifiers: every method against a naive per-(example, class) autograd
loop written here, on encoder (BERT, DistilBERT, RoBERTa, XLM-R, CamemBERT, DeBERTa-v2, ELECTRA, ModernBERT)
and decoder-only (GPT-2, Llama, Qwen2) heads."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr

import attrax as ax
from attrax.testing import tiny_classifier
from tests.conftest import assert_close

CLASSIFIERS = [
    ("bert", "sequence"),
    ("distilbert", "sequence"),
    ("roberta", "sequence"),
    ("xlm-roberta", "sequence"),
    ("camembert", "sequence"),
    ("deberta-v2", "sequence"),
    ("electra", "sequence"),
    ("modernbert", "sequence"),
    ("gpt2", "sequence"),
    ("llama", "sequence"),
    ("qwen2", "sequence"),
    ("bert", "token"),
    ("roberta", "token"),
    ("xlm-roberta", "token"),
    ("camembert", "token"),
    ("deberta-v2", "token"),
    ("electra", "token"),
    ("modernbert", "token"),
    ("gpt2", "token"),
]
DECODERS = [("gpt2", "sequence"), ("llama", "sequence"), ("qwen2", "sequence")]
TEXTS = ["the capital of france is paris", "hello world"]


@pytest.fixture(scope="module")
def classifiers() -> dict[tuple[str, str], ax.Model]:
    built = {}
    for arch, task in CLASSIFIERS:
        hf, tok = tiny_classifier(arch, task)
        built[arch, task] = ax.load_model(hf, tokenizer=tok)
    return built


class Naive:
    """One example at a time through the Hugging Face model itself, one backward per target."""

    def __init__(self, model: ax.Model, text: str, pair: str | None = None) -> None:
        tok, hf = model.tokenizer, model.hf
        encoding = tok(text, pair, return_tensors="pt")
        self.hf = hf
        self.ids = encoding["input_ids"]
        self.types = encoding.get("token_type_ids")
        self.token = model.task == "token-classification"

    def embeddings(self) -> torch.Tensor:
        return self.hf.get_input_embeddings()(self.ids).detach()

    def logits(self, embeds: torch.Tensor) -> torch.Tensor:
        kwargs = {"inputs_embeds": embeds}
        if (
            self.types is not None
            and "token_type_ids" in inspect.signature(self.hf.forward).parameters
        ):
            kwargs["token_type_ids"] = self.types
        return self.hf(**kwargs).logits[0]  # [C] or [L, C]

    def targets(self) -> list[tuple[int | None, int]]:
        """(position or None, class): every class of a sequence, each token's predicted class."""
        logits = self.logits(self.embeddings())
        if self.token:
            return [(p, int(c)) for p, c in enumerate(logits.argmax(-1))]
        return [(None, c) for c in range(logits.shape[-1])]

    def score(self, embeds: torch.Tensor, position: int | None, cls: int) -> torch.Tensor:
        logits = self.logits(embeds)
        row = logits if position is None else logits[position]
        return torch.softmax(row, -1)[cls]

    def gradient(self, embeds: torch.Tensor, position: int | None, cls: int) -> torch.Tensor:
        embeds = embeds.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.score(embeds, position, cls), embeds)
        return grad[0]


def _rows(model: ax.Model, naive: Naive) -> list[tuple[int | None, int]]:
    targets = naive.targets()
    if model.task == "token-classification":
        special = model.tokenizer.get_special_tokens_mask(
            naive.ids[0].tolist(), already_has_special_tokens=True
        )
        targets = [t for t in targets if not special[t[0]]] or targets
    return targets


def _check(da, model: ax.Model, texts, per_target, differences: bool = False) -> None:
    """``per_target(naive, embeds, position, class) -> [L, H]`` against each example's rows.

    ``differences``: the values are differences of two probabilities, whose float32 rounding is
    relative to the probabilities, not to the differences."""
    for b, text in enumerate(texts):
        naive = Naive(model, *((text,) if isinstance(text, str) else text))
        embeds = naive.embeddings()
        got = da.isel(example=b)
        for k, (position, cls) in enumerate(_rows(model, naive)):
            want = per_target(naive, embeds, position, cls).detach().numpy()
            row = got.isel(target=k).values[: want.shape[0]]
            if model.causal and position is not None:
                row, want = row[: position + 1], want[: position + 1]
            # float32 rounding of the largest entries shows on the smallest: scale atol by them
            scale = float(naive.score(embeds, position, cls)) if differences else np.abs(want).max()
            np.testing.assert_allclose(row, want, rtol=1e-4, atol=1e-6 * scale)


def _all(model: ax.Model):
    return "all" if model.task == "sequence-classification" else None


@pytest.mark.parametrize(("arch", "task"), CLASSIFIERS)
def test_saliency_and_input_x_gradient_equal_the_naive_loop(classifiers, arch, task):
    model = classifiers[arch, task]
    sal = ax.saliency(model, TEXTS, _all(model))
    _check(sal, model, TEXTS, lambda n, e, p, c: n.gradient(e, p, c))
    ixg = ax.input_x_gradient(model, TEXTS, _all(model))
    _check(ixg, model, TEXTS, lambda n, e, p, c: n.gradient(e, p, c) * e[0])


@pytest.mark.parametrize(
    ("arch", "task"),
    [("bert", "sequence"), ("gpt2", "token"), ("deberta-v2", "sequence"), ("llama", "sequence")],
)
def test_integrated_gradients_equal_the_naive_loop_with_its_own_nodes(classifiers, arch, task):
    model = classifiers[arch, task]
    nodes, weights = np.polynomial.legendre.leggauss(4)
    alphas, weights = (nodes + 1) / 2, weights / 2

    def naive_ig(n, e, p, c):
        total = sum(
            w * n.gradient(float(a) * e, p, c) for a, w in zip(alphas, weights, strict=True)
        )
        return total * e[0]

    da = ax.integrated_gradients(model, TEXTS, _all(model), steps=4)
    _check(da, model, TEXTS, naive_ig)


def test_a_baseline_of_token_ids_is_the_reference_input_captums_tutorials_build(classifiers):
    """Captum's BERT tutorials attribute from [CLS] [PAD] ... [PAD] [SEP], given as ids: the
    same ids as ``baseline=`` are embedded (an int tensor was cast to float and broadcast as
    embeddings until 2026-12-06). IG from them against the naive loop with its own nodes."""
    model = classifiers["bert", "sequence"]
    tok, text = model.tokenizer, TEXTS[0]
    n = Naive(model, text)
    length = n.ids.shape[1]
    ids = torch.tensor([tok.cls_token_id] + [tok.pad_token_id] * (length - 2) + [tok.sep_token_id])
    nodes, weights = np.polynomial.legendre.leggauss(6)
    e = n.embeddings()
    reference = model.hf.get_input_embeddings()(ids[None]).detach()
    da = ax.integrated_gradients(model, text, "all", steps=6, baseline=ids)
    for c, label in model.labels.items():
        total = sum(
            w / 2 * n.gradient(reference + (a + 1) / 2 * (e - reference), None, c)
            for a, w in zip(nodes, weights, strict=True)
        )
        want = (total * (e - reference)[0]).numpy()
        np.testing.assert_allclose(da.sel(target=label).values, want, rtol=1e-4, atol=1e-6)
    assert float(abs(da.isel(source=[0, -1])).max()) == 0.0  # [CLS], [SEP] are kept
    batch = ax.integrated_gradients(model, [text, text], "all", steps=6, baseline=ids[None])
    np.testing.assert_allclose(batch.isel(example=1).values, da.values, rtol=1e-5, atol=1e-7)
    for bad, message in (
        (ids[:-1], rf"token ids must be an int tensor of shape \[{length}\]"),
        (ids + 10_000, r"holds ids outside the source embedding's 0\.\."),
        (ids > 0, r"got torch.bool"),
        (ids.to(torch.complex64), r"is a complex tensor"),  # torch's NotImplementedError once
    ):
        with pytest.raises(ax.OptionError, match=message):
            ax.integrated_gradients(model, text, "all", steps=2, baseline=bad)


@pytest.mark.parametrize(
    ("arch", "task"),
    [("roberta", "sequence"), ("bert", "token"), ("modernbert", "sequence"), ("qwen2", "sequence")],
)
def test_occlusion_equals_the_naive_loop(classifiers, arch, task):
    model = classifiers[arch, task]

    def naive_occlusion(n, e, p, c):
        with torch.no_grad():
            full = n.score(e, p, c)
            drops = []
            for s in range(e.shape[1]):
                cut = e.clone()
                cut[:, s] = 0
                drops.append(full - n.score(cut, p, c))
        return torch.stack(drops)

    da = ax.occlusion(model, TEXTS, _all(model))
    _check(da, model, TEXTS, naive_occlusion, differences=True)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_heads_read_the_last_token_that_is_not_padding(classifiers, arch):
    """A text ending in EOS, which pads, is read where transformers reads it: at the token
    before the EOS (attrax read the EOS itself until 2026-12-06: GPT-2's prediction flipped)."""
    model = classifiers[arch, "sequence"]
    tok, hf = model.tokenizer, model.hf
    text = "hello world" + tok.eos_token
    enc = tok(text, return_tensors="pt")
    assert enc["input_ids"][0, -1] == hf.config.pad_token_id
    with torch.no_grad():
        probs = hf(**enc).logits[0].softmax(-1)  # transformers' own pooling, from the ids
    first = ax.saliency(model, [text, "the capital of france"], "all").isel(example=0)
    assert int(first.predicted_class) == int(probs.argmax())
    assert float(first.predicted_probability) == pytest.approx(float(probs.max()), rel=1e-5)
    ids = enc["input_ids"]
    pooled = ids.shape[1] - 2
    embeds = hf.get_input_embeddings()(ids).detach().requires_grad_(True)
    hidden = hf.base_model(inputs_embeds=embeds).last_hidden_state
    for c in range(probs.shape[0]):
        score = hf.score(hidden[0, pooled]).softmax(-1)[c]
        (grad,) = torch.autograd.grad(score, embeds, retain_graph=True)
        row = first.isel(target=c).values[: ids.shape[1]]
        np.testing.assert_allclose(row, grad[0].numpy(), rtol=1e-4, atol=1e-7)


def test_text_pairs_mark_segments_and_special_tokens(classifiers):
    model = classifiers["bert", "sequence"]
    pairs = [("the capital of france", "is paris"), ("hello", "world")]
    da = ax.saliency(model, pairs, "all")
    _check(da, model, pairs, lambda n, e, p, c: n.gradient(e, p, c))
    first = da.isel(example=0)
    tokens = first.source_token.values.tolist()
    assert tokens[0] == "[CLS]" and first.special.values[0]
    second = first.segment.values
    sep = tokens.index("[SEP]")
    assert (second[: sep + 1] == 0).all() and (second[sep + 1 :][second[sep + 1 :] >= 0] == 1).all()
    padded = da.source_id.values == -1
    assert padded.any() and (da.segment.values[padded] == -1).all()
    # two lists pair one to one
    again = ax.saliency(model, ([p[0] for p in pairs], [p[1] for p in pairs]), "all")
    np.testing.assert_array_equal(again.values, da.values)
    # a tuple of two pairs reads both ways: it was taken as two lists, transposed, until 2026-12-06
    with pytest.raises(ax.InputError, match=r"`inputs` .* is ambiguous: .* give a list of pairs"):
        ax.saliency(model, tuple(pairs), "all")
    # a tuple of two texts is a pair, so one of three is not a batch (it was until 2026-12-07)
    for given in (("a b", "c d", "e f"), ("a b", ("c", "d"), "e"), ("a b",)):
        with pytest.raises(ax.InputError, match=r"is a tuple of \d: .* give a list for a batch"):
            ax.saliency(model, given, "all")
    assert ax.saliency(model, ["a b", "c d", "e f"], "all").sizes["example"] == 3


def test_position_limits_are_the_models_own(classifiers):
    """RoBERTa numbers positions from ``padding_idx + 1``: 2 fewer tokens fit than its table has
    rows (79 and 80 of 80 died in torch's embedding until 2026-12-06). DeBERTa with relative
    positions only has no limit (it was refused past ``max_position_embeddings``)."""
    roberta = classifiers["roberta", "sequence"]
    table = roberta.hf.config.max_position_embeddings
    fits = roberta.max_positions
    assert fits == table - roberta.hf.config.pad_token_id - 1

    def text(tokens):  # one token per "a" between <s> and </s>
        return " ".join(["a"] * (tokens - 2))

    assert ax.saliency(roberta, text(fits)).sizes["source"] == fits
    with pytest.raises(ax.InputError, match=f"has {fits + 1} tokens, more than the model's {fits}"):
        ax.saliency(roberta, text(fits + 1))
    deberta = classifiers["deberta-v2", "sequence"]
    longer = deberta.hf.config.max_position_embeddings + 8
    assert not deberta.hf.config.position_biased_input and deberta.max_positions is None
    da = ax.saliency(deberta, " ".join(["a"] * longer), objective="logit")
    with torch.no_grad():
        naive = Naive(deberta, " ".join(["a"] * longer))
        assert naive.ids.shape[1] > longer
        logits = naive.logits(naive.embeddings())
    assert da.predicted_class.item() == int(logits.argmax())


def test_class_ids_may_be_numpys_ints(classifiers):
    model = classifiers["bert", "sequence"]
    labels = np.array([2, 0])  # a list of its entries was refused until 2026-12-06
    got = ax.saliency(model, TEXTS[0], list(labels))
    np.testing.assert_array_equal(got.values, ax.saliency(model, TEXTS[0], [2, 0]).values)


def test_texts_and_pairs_in_one_call_equal_the_naive_loop(classifiers):
    # a batch of texts alone, or of pairs alone, is tokenized in one call; a mixed one text by text
    model = classifiers["bert", "sequence"]
    mixed = [("the capital of france", "is paris"), "hello world", ("hello", "world")]
    da = ax.saliency(model, mixed, "all")
    _check(da, model, mixed, lambda n, e, p, c: n.gradient(e, p, c))
    texts = ax.saliency(model, ["hello world", "the capital of france is paris"], "all")
    alone = ax.saliency(model, "hello world", "all")
    width = alone.sizes["source"]
    first = texts.isel(example=0, source=slice(0, width))
    np.testing.assert_array_equal(first.source_id, alone.source_id)
    np.testing.assert_array_equal(first.special, alone.special)
    np.testing.assert_allclose(first, alone, rtol=1e-5, atol=1e-6)  # float32: batched vs alone
    assert (texts.segment.values[0][:width] == 0).all()


@pytest.mark.parametrize("arch", ["deberta-v2", "electra", "xlm-roberta"])
def test_text_pairs_on_other_encoders_equal_the_naive_loop(classifiers, arch):
    model = classifiers[arch, "sequence"]
    pairs = [("the capital of france", "is paris"), ("hello", "world")]
    da = ax.saliency(model, pairs, "all")
    _check(da, model, pairs, lambda n, e, p, c: n.gradient(e, p, c))
    assert (da.segment.values == 1).any(axis=-1).all()


LONG = "the capital of france is paris and the capital of italy is rome, said the teacher"


@pytest.mark.parametrize(("arch", "task"), [*DECODERS, ("modernbert", "sequence")])
def test_left_and_right_padding_give_the_same_result(arch, task):
    """The tokenizer's padding side changes nothing: each example's attributions and predicted
    probability equal those of the example alone (no padding), both ways. (Hugging Face's own
    left-padded batch differs for GPT-2 and ModernBERT, whose positions count the padding.)"""
    texts = ["hello world", LONG]  # very different lengths: much padding
    results = []
    for side in ("right", "left"):
        hf, tok = tiny_classifier(arch, task)
        tok.padding_side = side
        model = ax.load_model(hf, tokenizer=tok)
        da = ax.input_x_gradient(model, texts, "all")
        _check(da, model, texts, lambda n, e, p, c: n.gradient(e, p, c) * e[0])
        with torch.no_grad():
            alone = [torch.softmax(hf(**tok(t, return_tensors="pt")).logits[0], -1) for t in texts]
        want = torch.stack(alone).max(-1).values.numpy()
        np.testing.assert_allclose(da.predicted_probability.values, want, rtol=1e-5)
        results.append(da)
    np.testing.assert_array_equal(results[0].values, results[1].values)


def test_targets_by_label_id_list_prediction_and_all(classifiers):
    model = classifiers["bert", "sequence"]
    every = ax.saliency(model, TEXTS, "all")
    by_name = ax.saliency(model, TEXTS, "label_2")
    # one class per example runs the activations' own backward, several their saved derivatives
    np.testing.assert_allclose(
        by_name.sel(target="label_2").values,
        every.sel(target="label_2").values,
        rtol=1e-4,
        atol=1e-6 * float(abs(every).max()),
    )
    by_id = ax.saliency(model, TEXTS, [2, 0])
    assert by_id.target_class.values.tolist() == [[-1, 2], [0, -1]]
    np.testing.assert_allclose(
        by_id.isel(example=1).sel(target="label_0").values,
        every.isel(example=1).sel(target="label_0").values,
        rtol=1e-4,
        atol=1e-6 * float(abs(every).max()),
    )
    predicted = ax.saliency(model, TEXTS[0])
    naive = Naive(model, TEXTS[0])
    logits = naive.logits(naive.embeddings())
    assert predicted.predicted_class.item() == int(logits.argmax())
    assert predicted.target.values.tolist() == [model.labels[int(logits.argmax())]]
    np.testing.assert_allclose(
        predicted.predicted_probability.item(), float(torch.softmax(logits, -1).max()), rtol=1e-5
    )


@pytest.mark.parametrize(("arch", "task"), [("gpt2", "sequence"), ("bert", "token")])
def test_batched_equals_single(classifiers, arch, task):
    model = classifiers[arch, task]
    batch = ax.input_x_gradient(model, TEXTS, _all(model))
    for b, text in enumerate(TEXTS):
        alone = ax.input_x_gradient(model, text, _all(model))
        got = batch.isel(example=b).sel(target=alone.target).values[:, : alone.sizes["source"]]
        np.testing.assert_allclose(got, alone.values, rtol=1e-5, atol=1e-7)


def test_integrated_gradients_are_complete_per_class(classifiers):
    """Each class's attributions sum to p(x) - p(baseline), both ends from the naive forward with
    the pad token's embedding at every position (not the gap attrax reports, which shares its
    baseline), and the reported ``completeness_gap`` is that difference."""
    model = classifiers["bert", "sequence"]
    pad = model.hf.get_input_embeddings()(torch.tensor([model.tokenizer.pad_token_id])).detach()
    gaps = []
    for n in (4, 32):
        da = ax.integrated_gradients(model, TEXTS, "all", steps=n, baseline="pad")
        gap = []
        for b, text in enumerate(TEXTS):
            naive = Naive(model, text)
            x = naive.embeddings()
            with torch.no_grad():
                for c in range(len(model.labels)):
                    label = model.labels[c]
                    want = float(naive.score(x, None, c) - naive.score(pad.expand_as(x), None, c))
                    row = da.isel(example=b).sel(target=label)
                    gap.append(float(row.sum(skipna=True)) - want)
                    np.testing.assert_allclose(float(row.completeness_gap), gap[-1], atol=1e-6)
        gaps.append(max(map(abs, gap)))
    assert gaps[1] < 1e-4 and gaps[1] < gaps[0] / 4, gaps


def test_contrast_is_a_second_class(classifiers):
    model = classifiers["bert", "sequence"]
    got = ax.saliency(model, TEXTS[0], "label_1", contrast="label_0", objective="logit")
    naive = Naive(model, TEXTS[0])
    e = naive.embeddings().requires_grad_(True)
    logits = naive.logits(e)
    (want,) = torch.autograd.grad(logits[1] - logits[0], e)
    np.testing.assert_allclose(got.values[0], want[0].numpy(), rtol=1e-4, atol=1e-6)
    assert got.contrast_label.values.tolist() == ["label_0"]
    # the target class itself: zeros everywhere, silently, until 2026-12-05
    with pytest.raises(ax.InputError, match=r"`contrast` names the target classes themselves"):
        ax.saliency(model, TEXTS[0], "label_1", contrast="label_1")
    # one of several targets: its row alone was zeros, silently, until 2026-12-06
    for targets in ("all", ["label_2", "label_0"]):
        with pytest.raises(ax.InputError, match=r"`contrast` 'label_0' is also one of the"):
            ax.saliency(model, TEXTS[0], targets, contrast="label_0")
    with pytest.raises(ax.InputError, match=r"`contrast\[1\]` 'label_0' is also one"):
        ax.occlusion(model, TEXTS, [["label_1"], ["label_2", "label_0"]], contrast="label_0")


def test_contrasts_pair_with_targets_in_the_order_given(classifiers):
    """Targets [2, 0] against contrasts [0, 2] are 2 - 0 and 0 - 2: the classes were sorted
    before the contrasts were paired with them (0 - 0 and 2 - 2, refused as the targets
    themselves) until 2026-12-06. A class named twice was one row; now it is refused."""
    model = classifiers["bert", "sequence"]
    got = ax.saliency(
        model, TEXTS[0], ["label_2", "label_0"], contrast=["label_0", "label_2"], objective="logit"
    )
    naive = Naive(model, TEXTS[0])
    e = naive.embeddings().requires_grad_(True)
    logits = naive.logits(e)
    for target, against in ((2, 0), (0, 2)):
        (want,) = torch.autograd.grad(logits[target] - logits[against], e, retain_graph=True)
        row = got.sel(target=model.labels[target])
        np.testing.assert_allclose(row.values, want[0].numpy(), rtol=1e-4, atol=1e-6)
        assert row.contrast_label.item() == model.labels[against]
    for twice in (["label_1", "label_1"], [1, "label_1"]):
        with pytest.raises(ax.InputError, match=r"`targets` names class 1 \('label_1'\) twice"):
            ax.saliency(model, TEXTS[0], twice)
    with pytest.raises(ax.InputError, match=r"`positions` selects position 2 twice"):
        ax.saliency(classifiers["bert", "token"], TEXTS[0], positions=[2, 2])


def test_attention_rows_are_the_pooled_or_token_queries(classifiers):
    for key, query in ((("bert", "sequence"), 0), (("bert", "token"), None)):
        model = classifiers[key]
        da = ax.attention(model, TEXTS[0])
        with torch.no_grad():
            out = model.hf(**model.tokenizer(TEXTS[0], return_tensors="pt"), output_attentions=True)
        for k, target in enumerate(da.target.values):
            row = query if query is not None else int(target)
            want = torch.stack([a[0, :, row] for a in out.attentions])  # [layer, head, L]
            np.testing.assert_allclose(
                da.isel(target=k).values, want.permute(2, 0, 1).numpy(), rtol=1e-5, atol=1e-7
            )


@pytest.mark.parametrize(
    ("arch", "task"), [("bert", "sequence"), ("camembert", "sequence"), ("camembert", "token")]
)
def test_a_classifier_loads_from_a_directory(tmp_path, classifiers, arch, task):
    hf, tok = tiny_classifier(arch, task)
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = ax.load_model(tmp_path)
    assert model.task == f"{task}-classification" and model.labels[1] == "label_1"
    assert type(model.hf).__name__ == type(hf).__name__
    da = ax.saliency(model, TEXTS[0], "label_1" if task == "sequence" else None)
    assert da.attrs["task"] == f"{task}-classification"
    assert da.attrs["model_type"] == "encoder-only"
    # the same weights as the model built in memory: the same attributions
    built = ax.saliency(
        classifiers[arch, task], TEXTS[0], "label_1" if task == "sequence" else None
    )
    assert_close(da.values, built.values, rtol=1e-5, atol=1e-6)  # float32 (2.7e-7 seen)


@pytest.mark.parametrize(
    ("key", "call", "match"),
    [
        (("bert", "sequence"), {"targets": "positive"}, "not a label"),
        (("bert", "sequence"), {"targets": 7}, "not a class id"),
        (("bert", "sequence"), {"targets": [0]}, "one entry per example"),
        (("bert", "sequence"), {"targets": [None, 1]}, "got None: pass targets=None"),
        (("bert", "sequence"), {"positions": [1]}, "sequence classifier's targets are classes"),
        (("bert", "token"), {"targets": "all"}, "for sequence classifiers"),
        (("gpt2", "sequence"), {"inputs": ("a text", "a pair")}, "no pair template"),
        # options a classifier would ignore (they changed nothing, silently)
        (("bert", "sequence"), {"attribute_target": True}, "`attribute_target` does not apply"),
        (("bert", "token"), {"max_new_tokens": 3}, "`max_new_tokens` does not apply"),
        (("bert", "token"), {"positions": -1}, r"-1 \(position \d+ of the \d+ tokens\)"),
    ],
)
def test_bad_targets_and_inputs_are_clear_errors(classifiers, key, call, match):
    model = classifiers[key]
    inputs = call.pop("inputs", TEXTS)
    with pytest.raises(ax.AttraxError, match=match):
        ax.saliency(model, inputs, **call)


def test_the_mask_baseline_keeps_special_tokens(classifiers):
    """IG from the [MASK] embedding with [CLS]/[SEP] kept: equal to the naive loop's IG (its own
    Gauss-Legendre nodes) along the straight path from that baseline, built here."""
    model = classifiers["bert", "sequence"]
    got = ax.integrated_gradients(model, TEXTS[0], "all", steps=4, baseline="mask")
    naive = Naive(model, TEXTS[0])
    x = naive.embeddings()
    mask = model.hf.get_input_embeddings()(torch.tensor([[model.tokenizer.mask_token_id]]))
    special = torch.tensor(got.special.values)[None, :, None]
    base = torch.where(special, x, mask.detach().expand_as(x))
    nodes, weights = np.polynomial.legendre.leggauss(4)
    alphas, weights = (nodes + 1) / 2, weights / 2
    want = np.stack(
        [
            sum(
                w * naive.gradient(base + float(a) * (x - base), None, c)
                for a, w in zip(alphas, weights, strict=True)
            )
            .mul((x - base)[0])
            .numpy()
            for c in range(len(model.labels))
        ]
    )
    assert got.target.values.tolist() == [model.labels[c] for c in range(len(model.labels))]
    assert_close(got.values, want, rtol=1e-4, atol=1e-6)
    assert (got.values[:, got.special.values] == 0).all()  # nothing moves along kept tokens


def test_the_cli_and_dataset_runs_take_a_classifier(tmp_path, capsys):
    import json

    from attrax.cli import main

    hf, tok = tiny_classifier("bert", "sequence")
    hf.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    out = tmp_path / "one.nc"
    args = ["attribute", "--model", str(tmp_path / "clf"), "--input", TEXTS[0]]
    assert main([*args, "--target", "label_1", "--out", str(out)]) == 0
    assert ax.load(out).target.values.tolist() == ["label_1"]
    data = tmp_path / "data.jsonl"
    rows = [{"input": TEXTS[0], "target": "label_2"}, {"input": TEXTS[1], "target": "label_0"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = ["attribute-dataset", "--model", str(tmp_path / "clf"), "--data", str(data), "--quiet"]
    assert main([*run, "--out", str(tmp_path / "run")]) == 0
    da = ax.load_dataset_results(tmp_path / "run")
    assert da.target_class.values.tolist() == [[-1, 2], [0, -1]]
    data.write_text(json.dumps({"input": TEXTS[0], "target": "positive"}) + "\n")
    capsys.readouterr()
    assert main([*run, "--out", str(tmp_path / "bad")]) == 2
    assert "line 1: `target` 'positive' is not a label" in capsys.readouterr().err


@pytest.mark.parametrize(("arch", "task"), [("bert", "sequence"), ("gpt2", "token")])
def test_every_method_runs_on_classifiers(classifiers, arch, task):
    """The protocol gives every method classifiers: finite values where sources are visible."""
    from attrax._names import METHODS

    model = classifiers[arch, task]
    small = {"steps": 4, "samples": 4}
    for name in METHODS:
        if name in (
            "direct_logit_attribution", "attribution_patching", "activation_patching",
            "edge_attribution_patching", "edge_patching",
        ):  # fmt: skip
            # GPT-2/Llama components, `corrupted=` inputs: tests/test_components.py,
            # tests/test_activation_patching.py, tests/test_edges.py and tests/test_circuits.py
            # (their classifiers)
            continue
        fn = getattr(ax, name)
        if name == "alti_logit" and arch == "bert":  # a post-norm encoder: no linear logit path
            with pytest.raises(ax.ModelError, match="post-norm"):
                fn(model, TEXTS)
            continue
        if name == "decompx" and arch == "gpt2":  # post-norm encoders' sequence classifiers
            with pytest.raises(ax.ModelError, match="DecompX decomposes the sequence"):
                fn(model, TEXTS)
            continue
        options = {k: v for k, v in small.items() if k in inspect.signature(fn).parameters}
        da = fn(model, TEXTS, **options)
        assert np.isfinite(da.values[~np.isnan(da.values)]).all(), name
        assert da.notnull().any(), name


def test_margin_is_the_target_probability_minus_the_best_other(classifiers):
    model = classifiers["bert", "sequence"]
    da = ax.step_scores(model, TEXTS, "all", scores=["probability", "margin", "entropy"])
    for b, text in enumerate(TEXTS):
        naive = Naive(model, text)
        with torch.no_grad():
            p = torch.softmax(naive.logits(naive.embeddings()), -1).numpy()
        for c in range(len(p)):
            others = np.delete(p, c)
            got = da.isel(example=b).sel(target=model.labels[c])
            np.testing.assert_allclose(got.sel(score="margin"), p[c] - others.max(), atol=1e-6)
            np.testing.assert_allclose(got.sel(score="probability"), p[c], rtol=1e-5)
    margin = da.sel(score="margin").values
    assert ((margin > 0).sum(axis=1) == 1).all()  # only the predicted class leads


def test_dataset_runs_take_pairs_and_keep_the_true_label(tmp_path, capsys):
    import json

    from attrax.cli import main

    hf, tok = tiny_classifier("bert", "sequence")
    hf.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    model = ax.load_model(tmp_path / "clf")
    rows = [
        {"input": "the capital of france", "input_pair": "is paris", "label": "label_1"},
        {"input": "hello world", "label": 2},
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = ax.attribute_dataset(model, data, tmp_path / "run", progress=False)
    da = ax.load_dataset_results(run.out)
    assert da.label.values.tolist() == ["label_1", "label_2"]
    want = ax.pipe(ax.saliency, ax.l2_norm, ax.normalize)(
        model, ("the capital of france", "is paris")
    )
    got = da.isel(example=0).sel(target=want.target).values[:, : want.sizes["source"]]
    np.testing.assert_allclose(got, want.values, rtol=1e-5)
    # a label that is not the model's, and a pair for a language model: errors naming the line
    data.write_text(json.dumps({"input": "hello", "label": "positive"}) + "\n")
    with pytest.raises(ax.InputError, match="line 1: `label` 'positive' is not a label"):
        ax.attribute_dataset(model, data, tmp_path / "bad", progress=False)
    data.write_text(json.dumps({"input": "1 2 =", "input_pair": "3"}) + "\n")
    with pytest.raises(ax.InputError, match="line 1: `input_pair` is the second text"):
        ax.attribute_dataset(None, data, tmp_path / "bad2", progress=False)
    # the CLI: --input-pair
    out = tmp_path / "pair.nc"
    args = ["attribute", "--model", str(tmp_path / "clf"), "--input", "the capital of france"]
    assert main([*args, "--input-pair", "is paris", "--target", "all", "--out", str(out)]) == 0
    pair = ax.load(out)
    assert (pair.segment.values == 1).any() and pair.sizes["target"] == 3


_GIVEN = [
    ("saliency", {}),
    ("input_x_gradient", {}),
    ("integrated_gradients", {"steps": 4}),
    ("smoothgrad", {"samples": 2}),  # its points are noisy copies: the prediction's own forward
    ("input_x_gradient", {"mode": "forward", "reduce_hidden": "sum"}),
    ("saliency", {"layers": 1}),
]


@pytest.mark.parametrize(("arch", "task"), [("bert", "sequence"), ("gpt2", "sequence")])
@pytest.mark.parametrize(("method", "options"), _GIVEN)
def test_given_targets_keep_the_prediction_of_an_independent_forward(
    classifiers, arch, task, method, options
):
    """With targets given the gradient family takes the prediction from its own forward (or one
    at labelling): the predicted class and probability are those of each example alone."""
    model = classifiers[arch, task]
    texts = ["hello world", LONG]
    da = getattr(ax, method)(model, texts, [1, "label_0"], **options)
    for b, text in enumerate(texts):
        naive = Naive(model, text)
        with torch.no_grad():
            probs = torch.softmax(naive.logits(naive.embeddings()), -1)
        assert da.predicted_class.values[b] == int(probs.argmax())
        assert da.predicted_label.values[b] == model.labels[int(probs.argmax())]
        np.testing.assert_allclose(da.predicted_probability.values[b], float(probs.max()), 1e-5)


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients"])
def test_given_token_targets_keep_each_tokens_prediction(classifiers, method):
    model = classifiers["bert", "token"]
    texts = ["hello world", LONG]
    options = {"steps": 4} if method == "integrated_gradients" else {}
    da = getattr(ax, method)(model, texts, 1, **options)
    for b, text in enumerate(texts):
        naive = Naive(model, text)
        with torch.no_grad():
            probs = torch.softmax(naive.logits(naive.embeddings()), -1)  # [L, C]
        positions = [p for p, _ in _rows(model, naive)]
        got = da.isel(example=b).sel(target=positions)
        assert got.target_class.values.tolist() == [1] * len(positions)
        assert got.predicted_class.values.tolist() == probs[positions].argmax(-1).tolist()
        np.testing.assert_allclose(
            got.predicted_probability.values, probs[positions].max(-1).values.numpy(), 1e-5
        )


def _last_feed_forward_input(model: ax.Model) -> torch.nn.Module:
    """The first linear layer of the last encoder layer's feed-forward."""
    base = model.hf.base_model
    if model.hf.config.model_type == "distilbert":
        return base.transformer.layer[-1].ffn.lin1
    return base.encoder.layer[-1].intermediate


def _feed_forward_widths(model: ax.Model, run) -> set[int]:
    """The sequence lengths the last encoder layer's feed-forward ran on during ``run()``."""
    widths: set[int] = set()
    handle = _last_feed_forward_input(model).register_forward_hook(
        lambda _m, args, _out: widths.add(args[0].shape[1])
    )
    try:
        run()
    finally:
        handle.remove()
    return widths


@pytest.mark.parametrize(
    ("arch", "task"),
    [("bert", "sequence"), ("roberta", "sequence"), ("xlm-roberta", "sequence"),
     ("camembert", "sequence"), ("electra", "sequence"), ("distilbert", "sequence"),
     ("bert", "token")],
)  # fmt: skip
def test_a_head_reading_position_0_skips_the_last_feed_forward_elsewhere(classifiers, arch, task):
    """The objective's forwards compute the last layer's feed-forward where the head reads:
    position 0 of a sequence classifier (its values equal the naive loop's, tested above),
    every position of a token classifier."""
    model = classifiers[arch, task]
    length = max(map(len, model.tokenizer(TEXTS)["input_ids"]))  # padded

    def run() -> None:
        ax.saliency(model, TEXTS, _all(model))
        ax.occlusion(model, TEXTS, _all(model))
        ax.integrated_gradients(model, TEXTS, _all(model), steps=3)

    want = {1} if task == "sequence" else {length}
    assert _feed_forward_widths(model, run) == want
    assert not any(
        name in module.__dict__
        for module in model.hf.modules()
        for name in ("feed_forward_chunk", "ff_chunk")
    )  # the model as it was


def test_another_threads_forward_keeps_every_position(classifiers):
    """While one thread's objective forward runs the first position only, another thread's
    forward of the same model computes every position."""
    import threading

    from attrax import _model

    layer = classifiers["bert", "sequence"].hf.base_model.encoder.layer[-1]
    x = torch.randn(2, 5, layer.intermediate.dense.in_features)
    with torch.no_grad():
        want = layer.feed_forward_chunk(x)
        there: list[torch.Tensor] = []
        with _model.head_rows_only(), _model._first_position_only((layer, "feed_forward_chunk")):
            here = layer.feed_forward_chunk(x)
            thread = threading.Thread(target=lambda: there.append(layer.feed_forward_chunk(x)))
            thread.start()
            thread.join()
    torch.testing.assert_close(there[0], want)
    torch.testing.assert_close(here[:, :1], want[:, :1])
    assert not torch.allclose(here[:, 1:], want[:, 1:])  # the others were not computed
    assert "feed_forward_chunk" not in layer.__dict__


def test_the_first_position_feed_forward_multiplies_rows_not_copies_of_its_weights(classifiers):
    """Position 0 of ``[rows, L, H]`` is a strided ``[rows, 1, H]``, which ``matmul`` cannot fold
    into rows: it expanded each weight per row into a ``bmm``, which bfloat16 copies (C1's
    occlusion in bfloat16: 384 MiB for 768 rows of BERT's intermediate weight)."""
    from torch.profiler import profile

    from attrax import _model

    layer = classifiers["bert", "sequence"].hf.base_model.encoder.layer[-1]
    x = torch.randn(6, 5, layer.intermediate.dense.in_features)
    with torch.no_grad():
        want = layer.feed_forward_chunk(x[:, :1].contiguous())
        with (
            _model.head_rows_only(),
            _model._first_position_only((layer, "feed_forward_chunk")),
            profile() as run,
        ):
            here = layer.feed_forward_chunk(x)
    assert "aten::bmm" not in {event.key for event in run.key_averages()}
    torch.testing.assert_close(here[:, :1], want)


def test_a_mean_pooled_classifier_has_no_query_row_to_read():
    """ModernBERT with ``classifier_pooling="mean"`` reads every position: its gradients are those
    of the pooled logit; the methods that read one query's row refuse it."""
    hf, tok = tiny_classifier("modernbert", classifier_pooling="mean")
    model = ax.load_model(hf.double(), tokenizer=tok)
    text = "the plot was good"
    got = ax.saliency(model, text, [0, 1, 2], objective="logit")
    ids = torch.tensor([tok(text).input_ids])
    embeds = hf.get_input_embeddings()(ids).detach().requires_grad_(True)
    for k in range(3):
        (want,) = torch.autograd.grad(hf(inputs_embeds=embeds).logits[0, k], embeds)
        np.testing.assert_allclose(got.values[k], want[0].numpy(), rtol=1e-9, atol=1e-12)
    for method in (ax.attention, ax.rollout, ax.value_zeroing, ax.alti, ax.attention_x_gradient):
        with pytest.raises(ax.ModelError, match="pools the mean of every position"):
            method(model, text)
    summed = ax.attention_x_gradient(model, text, queries="sum")  # every query: defined
    assert summed.dims == ("target", "source", "layer", "head")


def _head(kind: str) -> ax.Model:
    """A BERT classifier whose head is ``kind``: a reward model / STS-B regressor (one output,
    no ``problem_type``) or a multi-label tagger (toxic-bert's ``problem_type``)."""
    if kind == "regression":
        hf, tok = tiny_classifier("bert", "sequence", num_labels=1)
    else:
        hf, tok = tiny_classifier(
            "bert", "sequence", num_labels=3, problem_type="multi_label_classification"
        )
    return ax.load_model(hf, tokenizer=tok)


def test_a_regression_head_is_explained_by_its_value():
    """One output and no ``problem_type`` is a regressor (a reward model): its softmax over one
    class is the constant 1, so every attribution was exactly 0, silently, until 2026-12-06. Its
    objective is now the value; IG against the naive loop with its own nodes, and complete."""
    model = _head("regression")
    assert model.head_type == "regression"
    text = TEXTS[0]
    da = ax.integrated_gradients(model, text, steps=8)
    assert da.attrs["objective"] == "logit" and np.isnan(da.predicted_probability.item())
    n = Naive(model, text)
    e = n.embeddings()
    nodes, weights = np.polynomial.legendre.leggauss(8)

    def value(x):
        return n.logits(x)[0]

    total = 0
    for a, w in zip(nodes, weights, strict=True):
        x = (float(a + 1) / 2 * e).requires_grad_(True)
        total = total + w / 2 * torch.autograd.grad(value(x), x)[0]
    np.testing.assert_allclose(da.values[0], (total * e)[0].numpy(), rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        gap = float(value(e) - value(torch.zeros_like(e)))
    assert abs(gap) > 1e-3  # the value moves: the attributions are not all 0
    np.testing.assert_allclose(da.completeness_gap.item(), float(da.sum()) - gap, atol=1e-5)
    for objective in ("probability", "logprob"):
        with pytest.raises(ax.OptionError, match=r"is a regression head .* objective='logit'"):
            ax.saliency(model, text, objective=objective)
    with pytest.raises(ax.OptionError, match=r"`scores` 'probability': .* regression head"):
        ax.step_scores(model, text, scores="probability")
    scores = ax.step_scores(model, text)  # its value by default
    assert scores.score.values.tolist() == ["logit"]
    np.testing.assert_allclose(float(scores.squeeze()), float(value(e)), rtol=1e-5)
    # what the call ran with, as recorded: not the default "probability" it replaced
    assert json.loads(da.attrs["options"])["objective"] == "logit"
    with pytest.raises(ax.OptionError, match=r"is a regression head"):
        ax.occlusion(model, text, objective=ax.probability)  # the function is the name
    rows = ax.show(ax.pipe(ax.saliency, ax.l2_norm)(model, [text, TEXTS[1]]))._repr_html_()
    assert model.labels[0] in rows and "(nan)" not in rows  # no probability to show


def test_a_multi_label_head_attributes_each_labels_sigmoid():
    """A multi-label head's labels are independent sigmoids: its probability was the softmax over
    the labels until 2026-12-06. The gradient of each label's sigmoid (and log sigmoid) against
    autograd; the prediction is the most probable label with its sigmoid."""
    model = _head("multi-label")
    assert model.head_type == "multi-label"
    text = TEXTS[1]
    n = Naive(model, text)
    e = n.embeddings().requires_grad_(True)
    logits = n.logits(e)
    for objective, score in (("probability", torch.sigmoid), ("logprob", F.logsigmoid)):
        da = ax.saliency(model, text, "all", objective=objective)
        for c, label in model.labels.items():
            (want,) = torch.autograd.grad(score(logits[c]), e, retain_graph=True)
            np.testing.assert_allclose(
                da.sel(target=label).values, want[0].numpy(), rtol=1e-4, atol=1e-7
            )
    # the public function is the name: it took the softmax over the labels until 2026-12-06
    by_function = ax.saliency(model, text, "all", objective=ax.logprob)
    xr.testing.assert_allclose(by_function, da)
    sigmoids = torch.sigmoid(logits.detach())
    assert da.predicted_class.item() == int(sigmoids.argmax())
    np.testing.assert_allclose(da.predicted_probability.item(), float(sigmoids.max()), rtol=1e-5)
    scores = ax.step_scores(model, text, "all", scores=["probability", "logprob"])
    np.testing.assert_allclose(scores.sel(score="probability").values, sigmoids, rtol=1e-5)
    with pytest.raises(ax.OptionError, match=r"`scores` 'entropy': .* multi-label head"):
        ax.step_scores(model, text, scores="entropy")
    # a contrast label is its own sigmoid too
    names = ["contrast_prob", "contrast_prob_diff", "contrast_logit_diff"]
    against = ax.step_scores(model, text, 0, scores=names, contrast=1).values[0]
    want = [sigmoids[1], sigmoids[0] - sigmoids[1], logits[0] - logits[1]]
    np.testing.assert_allclose(against, torch.stack(want).detach().numpy(), rtol=1e-5)


def test_a_token_classifiers_targets_pair_with_positions_in_the_order_given(classifiers):
    """`targets=[2, 0]` at `positions=[3, 1]` is class 2 at 3: the positions were sorted
    before the classes were paired with them (class 0 at 3) until 2026-12-06."""
    model = classifiers["bert", "token"]
    got = ax.saliency(model, TEXTS[0], [2, 0], positions=[3, 1])
    pairs = dict(zip(got.target.values.tolist(), got.target_class.values.tolist(), strict=True))
    assert pairs == {3: 2, 1: 0}
    # read once to select and again to pair: a generator was used up (a raw ValueError)
    again = ax.saliency(model, TEXTS[0], [2, 0], positions=(p for p in [3, 1]))
    xr.testing.assert_equal(again, got)
    n = Naive(model, TEXTS[0])
    for position, cls in pairs.items():
        want = n.gradient(n.embeddings(), position, cls)
        np.testing.assert_allclose(
            got.sel(target=position).values, want.numpy(), rtol=1e-4, atol=1e-7
        )


def test_a_token_classifiers_problem_type_is_ignored_as_transformers_loss_ignores_it():
    hf, tok = tiny_classifier("bert", "token", problem_type="multi_label_classification")
    assert ax.load_model(hf, tokenizer=tok).head_type == "single-label"
