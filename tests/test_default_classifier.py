"""The shipped offline classifier: it solves its task, and attributions find the marker word.

The reference checks use plain autograd on the Hugging Face model (not the attrax engine): for
held-out texts, attributing the predicted class's probability, saliency (L2 norm over hidden of
the gradient w.r.t. the word embeddings) and integrated gradients (zeros baseline, 32-node
Gauss-Legendre quadrature, summed over hidden) must put their highest score, over every real token
([CLS] and [SEP] included), on the ground-truth marker token for at least 90% of texts. The same
is then required of attrax's own saliency and IG on ``load_model("attrax:classifier")``.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import attrax as ax
from attrax._default_classifier_task import (
    BUILTIN_NAME,
    DEFAULT_CLASSIFIER_PATH,
    FILLERS,
    LABELS,
    MARKERS,
    evidence,
    ground_truth,
    is_heldout,
    label_of,
    make_example,
)

N_TEXTS = 100
IG_STEPS = 32


@pytest.fixture(scope="module")
def hf():
    return AutoModelForSequenceClassification.from_pretrained(
        DEFAULT_CLASSIFIER_PATH, local_files_only=True
    ).eval()


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEFAULT_CLASSIFIER_PATH, local_files_only=True)


def _heldout(n: int, seed: int = 2024) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [make_example(rng, split="heldout") for _ in range(n)]


def test_shipped_files_are_small_and_complete():
    names = {p.name for p in DEFAULT_CLASSIFIER_PATH.iterdir()}
    for required in ("config.json", "model.safetensors", "tokenizer.json", "task.json"):
        assert required in names
    assert (DEFAULT_CLASSIFIER_PATH / "model.safetensors").stat().st_size < 1_000_000


def test_task_helpers():
    text, label = make_example(7)
    assert (text, label) == make_example(7)
    words = text.split()
    markers = [w for ws in MARKERS.values() for w in ws]
    assert sum(w in markers for w in words) == 1
    assert all(w in FILLERS for i, w in enumerate(words) if i != evidence(text))
    assert label == label_of(text) and label in LABELS
    assert label_of("the plot was awful") == "negative"
    assert ground_truth(["[CLS]", "the", "plot", "was", "awful", "[SEP]"]) == 4
    assert is_heldout(make_example(3, split="heldout")[0])
    assert not is_heldout(make_example(3, split="train")[0])
    for bad in ("the plot was long", "good and bad"):
        with pytest.raises(ValueError):
            evidence(bad)


def test_tokenizer_keeps_every_task_word_whole(tok):
    for word in [*FILLERS, *(w for ws in MARKERS.values() for w in ws)]:
        assert tok.tokenize(word) == [word]
    ids = tok("the film was great")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "the", "film", "was", "great", "[SEP]"]
    assert "token_type_ids" in tok("the film")


def test_classifies_heldout_texts(hf, tok):
    examples = _heldout(500, seed=11)
    enc = tok([t for t, _ in examples], padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = hf(**enc).logits.argmax(-1).tolist()
    accuracy = np.mean(
        [LABELS[p] == label for p, (_, label) in zip(predicted, examples, strict=True)]
    )
    assert accuracy >= 0.98


def _references(hf, tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plain-autograd saliency and IG (batched over texts), and each text's marker position."""
    enc = tok(texts, padding=True, return_tensors="pt")
    mask, types = enc["attention_mask"], enc["token_type_ids"]
    truth = np.array([ground_truth(tok.convert_ids_to_tokens(row)) for row in enc["input_ids"]])
    with torch.no_grad():
        emb = hf.get_input_embeddings()(enc["input_ids"])
        predicted = hf(**enc).logits.argmax(-1)

    def prob(x: torch.Tensor, reps: int) -> torch.Tensor:
        logits = hf(
            inputs_embeds=x,
            attention_mask=mask.repeat_interleave(reps, 0),
            token_type_ids=types.repeat_interleave(reps, 0),
        ).logits
        return torch.softmax(logits, -1)[torch.arange(len(x)), predicted.repeat_interleave(reps)]

    x = emb.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(prob(x, 1).sum(), x)
    saliency = grad.norm(dim=-1).masked_fill(mask == 0, -1.0)

    nodes, weights = np.polynomial.legendre.leggauss(IG_STEPS)
    alphas = torch.tensor((nodes + 1) / 2, dtype=torch.float32)
    weights = torch.tensor(weights / 2, dtype=torch.float32)
    path = (alphas[None, :, None, None] * emb[:, None]).reshape(-1, *emb.shape[1:])
    path.requires_grad_(True)
    (g,) = torch.autograd.grad(prob(path, IG_STEPS).sum(), path)
    g = g.reshape(len(texts), IG_STEPS, *emb.shape[1:])
    ig = (emb * (weights[None, :, None, None] * g).sum(1)).sum(-1)
    ig = ig.masked_fill(mask == 0, -torch.inf)
    return saliency.numpy(), ig.detach().numpy(), truth


def test_saliency_and_ig_find_the_marker(hf, tok):
    texts = [t for t, _ in _heldout(N_TEXTS)]
    saliency, ig, truth = _references(hf, tok, texts)
    sal_rate = np.mean(saliency.argmax(-1) == truth)
    ig_rate = np.mean(ig.argmax(-1) == truth)
    print(f"saliency {sal_rate:.1%}, IG {ig_rate:.1%} over {len(texts)} held-out texts")
    assert sal_rate >= 0.9
    assert ig_rate >= 0.9


def test_attrax_finds_the_marker_on_the_builtin_classifier():
    model = ax.load_model(BUILTIN_NAME)
    assert model.name == BUILTIN_NAME and model.task == "sequence-classification"
    assert model.labels == dict(enumerate(LABELS))
    examples = _heldout(N_TEXTS, seed=7)
    texts = [t for t, _ in examples]
    for method, reduce, options in (
        (ax.saliency, ax.l2_norm, {}),
        (ax.integrated_gradients, ax.sum, {"steps": IG_STEPS}),
    ):
        da = ax.pipe(method, reduce)(model, texts, **options)  # the predicted class
        assert da.predicted_label.values.tolist() == [label for _, label in examples]
        per_example = da.sel(target=da.predicted_label)  # (example, source)
        top = per_example.fillna(-np.inf).argmax("source").values
        truth = [ground_truth(row) for row in da.source_token.values.tolist()]
        rate = np.mean(top == np.array(truth))
        print(f"attrax {method.__name__}: {rate:.1%}")
        assert rate >= 0.9


def test_unknown_builtin_name_is_refused():
    with pytest.raises(ax.ModelError, match="attrax:classifier"):
        ax.load_model("attrax:sentiment")
