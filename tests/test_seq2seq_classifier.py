"""Encoder-decoder sequence classifiers (BART-MNLI's ``BartForSequenceClassification``, mBART's,
T5's): each token is read twice, by the encoder and (shifted right) by the decoder, whose state
at the last EOS is classified. The references here run transformers' own forward from token ids
(its shift, its pooling) with both embedding modules' outputs swapped for leaves by hooks."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import transformers

import attrax as ax
from attrax.cli import main
from attrax.testing import tiny_classifier

ARCHS = ("bart", "mbart", "t5")
# NLI-style pairs, and texts of other lengths (padding in a batch)
PAIRS = [("a cat sat on the mat", "the cat is sitting"), ("dogs run", "a dog runs fast")]
TEXTS = ["a cat sat on the mat", "dogs run"]

_MODELS: dict[str, tuple[ax.Model, object]] = {}


def _model(arch: str) -> ax.Model:
    if arch not in _MODELS:
        hf, tok = tiny_classifier(arch)
        _MODELS[arch] = (ax.load_model(hf, tokenizer=tok), tok)
    return _MODELS[arch][0]


def _hf_gradients(
    model: ax.Model,
    ids: list[int],
    edit: Callable[[torch.Tensor, torch.Tensor], tuple] | None,
    classes: list[int] | None = None,
    read: Callable[[object], torch.Tensor] = lambda out: out.logits[0],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class, the gradient of transformers' own logit w.r.t. each token's embedding (the
    encoder's row plus the decoder's, which reads token i at position i + 1, and mBART's
    first decoder position, its input's last token), the embeddings, and the logits.

    ``edit(encoder_rows, decoder_rows)`` replaces the rows the modules give (a path point, an
    occluded token) before the leaves are taken; ``read`` takes the logits from transformers'
    output (a question-answering model's start and end logits at the answer's positions).
    """
    hf = model.hf
    leaves: dict[str, torch.Tensor] = {}
    rows: dict[str, torch.Tensor] = {}

    encoder, decoder = hf.get_encoder().embed_tokens, hf.get_decoder().embed_tokens
    grads, logits = [], []
    for cls in range(len(model.labels)) if classes is None else classes:  # QA: start, end
        calls: list[str] = []

        def hook(module, args, out, calls=calls):
            name = "encoder" if not calls else "decoder"
            calls.append(name)
            out = out.detach()
            rows[name] = out  # the first call embeds the encoder's input, the second the decoder's
            if edit is not None:
                out = edit(out, None) if name == "encoder" else edit(None, out)
            leaves[name] = out.clone().requires_grad_(True)
            return leaves[name]

        handles = {id(encoder): encoder.register_forward_hook(hook)}
        if id(decoder) not in handles:
            handles[id(decoder)] = decoder.register_forward_hook(hook)
        try:
            with torch.enable_grad():  # a reference forward may run under no_grad
                logit = read(hf(input_ids=torch.tensor([ids])))
        finally:
            for handle in handles.values():
                handle.remove()
        assert calls == ["encoder", "decoder"]
        if not torch.is_grad_enabled():  # the forward alone (DeepLIFT's reference)
            return None
        g_enc, g_dec = torch.autograd.grad(logit[cls], [leaves["encoder"], leaves["decoder"]])
        g = g_enc[0].clone()
        g[:-1] += g_dec[0, 1:]  # token i is the decoder's input at i + 1
        if model.seq2seq_classifier == "last":  # mBART: the decoder starts with the last token
            g[-1] += g_dec[0, 0]
        grads.append(g.double().numpy())
        logits.append(logit.detach().double().numpy())
    return np.stack(grads), rows["encoder"][0].double().numpy(), logits[0]


def _on_the_path(model: ax.Model, alpha: float) -> Callable:
    """An edit to the point ``alpha`` of the straight path from zeros: both stacks' rows
    scaled, the decoder's start token (BART, T5: no input token) kept."""

    def edit(enc, dec):
        if enc is not None:
            return enc * alpha
        kept = dec.clone() * alpha
        if model.seq2seq_classifier == "start":
            kept[:, 0] = dec[:, 0]
        return kept

    return edit


def _ids(model: ax.Model, item) -> list[int]:
    text, pair = (item, None) if isinstance(item, str) else item
    return model.tokenizer(text, pair)["input_ids"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("item", [TEXTS[0], PAIRS[1]], ids=["text", "pair"])
def test_gradients_equal_transformers_own_forward_from_ids(arch, item):
    model = _model(arch)
    ids = _ids(model, item)
    grads, embeds, logits = _hf_gradients(model, ids, None)
    sal = ax.saliency(model, item, targets="all", objective="logit")
    ixg = ax.input_x_gradient(model, item, targets="all", objective="logit")
    assert sal.source_id.values.tolist() == ids
    assert sal.attrs["model_type"] == "encoder-decoder"
    np.testing.assert_allclose(sal.values, grads, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ixg.values, grads * embeds, rtol=1e-4, atol=1e-6)
    # the prediction is transformers' argmax; its probability transformers' softmax
    pred = ax.saliency(model, item)
    assert pred.target.values.tolist() == [model.labels[int(np.argmax(logits))]]
    p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(pred.predicted_probability.values, p.max(), rtol=1e-5)


# the other families attrax lists, their tiny configs with the BART tokenizer (PLBart's decoder
# starts with its input's last token, as mBART's)
FAMILIES = {
    "PLBart": ("PLBartConfig", "bart", "last"),
    "Mvp": ("MvpConfig", "bart", "start"),
    "MT5": ("MT5Config", "t5", "start"),
    "UMT5": ("UMT5Config", "t5", "start"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_other_families_equal_transformers_own_forward(family):
    from attrax.testing import _BART_LIKE, _TINY

    config_name, like, shift = FAMILIES[family]
    _, tok = tiny_classifier("bart")
    sizes = _BART_LIKE if like == "bart" else _TINY["t5"][2]
    config = getattr(transformers, config_name)(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, decoder_start_token_id=tok.eos_token_id, num_labels=3,
        **sizes,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = getattr(transformers, f"{family}ForSequenceClassification")(config).eval()
    model = ax.load_model(hf, tokenizer=tok)
    assert model.seq2seq_classifier == shift
    ids = _ids(model, PAIRS[1])
    grads, embeds, _ = _hf_gradients(model, ids, None)
    got = ax.input_x_gradient(model, PAIRS[1], targets="all", objective="logit")
    want = grads * embeds  # float32 rounding: relative to the largest entry
    np.testing.assert_allclose(got.values, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("arch", ARCHS)
def test_integrated_gradients_equal_a_loop_over_own_nodes(arch):
    # zeros baseline: every token's rows (encoder and decoder) move from 0 along the path; the
    # decoder's start token (BART, T5) is no input token and stays
    model = _model(arch)
    ids = _ids(model, PAIRS[0])
    nodes, weights = np.polynomial.legendre.leggauss(7)
    alphas, weights = (nodes + 1) / 2, weights / 2
    total = 0.0
    for alpha, weight in zip(alphas, weights, strict=True):
        grads, _, _ = _hf_gradients(model, ids, _on_the_path(model, float(alpha)))
        total = total + weight * grads
    _, embeds, _ = _hf_gradients(model, ids, None)
    want = total * embeds
    got = ax.integrated_gradients(
        model, PAIRS[0], targets="all", objective="logit", steps=7, baseline="zeros"
    )
    np.testing.assert_allclose(got.values, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_occlusion_equals_zeroing_each_token_in_both_stacks(arch):
    model = _model(arch)
    ids = _ids(model, TEXTS[0])
    _, _, logits = _hf_gradients(model, ids, None)
    want = []
    for i in range(len(ids)):

        def edit(enc, dec, i=i):
            if enc is not None:
                out = enc.clone()
                out[:, i] = 0
                return out
            out = dec.clone()
            if i + 1 < out.shape[1]:
                out[:, i + 1] = 0
            if model.seq2seq_classifier == "last" and i == len(ids) - 1:
                out[:, 0] = 0
            return out

        _, _, occluded = _hf_gradients(model, ids, edit)
        want.append(logits - occluded)
    got = ax.occlusion(model, TEXTS[0], targets="all", objective="logit", baseline="zeros")
    np.testing.assert_allclose(got.values, np.stack(want, 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_padded_batch_equals_each_input_alone(arch):
    model = _model(arch)
    both = ax.integrated_gradients(model, PAIRS, targets="all", steps=8)
    for i, item in enumerate(PAIRS):
        alone = ax.integrated_gradients(model, item, targets="all", steps=8)
        n = alone.sizes["source"]
        row = both.isel(example=i).isel(source=slice(0, n))
        np.testing.assert_allclose(row.values, alone.values, rtol=1e-4, atol=1e-7)
        assert np.isnan(both.isel(example=i).values[:, n:]).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_deeplift_equals_a_hooked_loop_of_transformers_own_forwards(arch):
    # the Rescale rule by backward hooks on each activation module (tests/test_deeplift.py),
    # its reference forward from zeroed embeddings in both stacks (the decoder's start token
    # kept, as attrax keeps it), one class per backward
    from tests.test_deeplift import EVERY, _rescaled

    hf, tok = tiny_classifier(arch)
    model = ax.load_model(hf.double(), tokenizer=tok)
    ids = _ids(model, PAIRS[0])

    def zeroed(enc, dec):
        if enc is not None:
            return torch.zeros_like(enc)
        out = torch.zeros_like(dec)
        if model.seq2seq_classifier == "start":
            out[:, 0] = dec[:, 0]
        return out

    want = []
    for k in range(len(model.labels)):

        def attributed(k=k):
            return _hf_gradients(model, ids, None, classes=[k])[0][0]

        grad = _rescaled(model.hf, EVERY, lambda: _hf_gradients(model, ids, zeroed), attributed)
        want.append(grad * _hf_gradients(model, ids, None)[1])
    got = ax.deeplift(model, PAIRS[0], targets="all", objective="logit")
    np.testing.assert_allclose(got.values, np.stack(want), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("arch", ARCHS)
def test_perturbation_and_faithfulness_run(arch):
    model = _model(arch)
    relevance = ax.l2_norm(ax.saliency(model, TEXTS))
    curve = ax.comprehensiveness(model, relevance, TEXTS)
    assert curve.dims[:2] == ("example", "target") and np.isfinite(curve.values).any()
    assert ax.step_scores(model, TEXTS[0], scores=["probability"]).sizes["target"] == 1


@pytest.mark.parametrize(
    "method",
    [
        "attention", "rollout", "attention_x_gradient", "head_attribution", "value_zeroing",
        "alti",
    ],
)  # fmt: skip
def test_methods_that_follow_one_stack_are_refused(method):
    model = _model("bart")
    with pytest.raises(ax.ModelError, match="BartForSequenceClassification"):
        getattr(ax, method)(model, TEXTS[0])
    with pytest.raises(ax.ModelError, match="reads each token twice"):
        ax.attribution_patching(model, TEXTS[0], corrupted="a dog sat on the mat")
    with pytest.raises(ax.ModelError, match="`layers`"):
        ax.integrated_gradients(model, TEXTS[0], layers="all")


def test_an_input_without_eos_is_refused():
    hf, tok = tiny_classifier("t5")
    from tokenizers import processors

    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    model = ax.load_model(hf, tokenizer=tok)
    with pytest.raises(ax.InputError, match="without an EOS token"):
        ax.saliency(model, "a cat sat")


def test_a_pad_token_inside_an_mbart_input_is_refused():
    # transformers starts mBART's decoder at (tokens that are not pad) - 1: not the language id
    model = _model("mbart")
    with pytest.raises(ax.InputError, match="holds the pad token"):
        ax.saliency(model, "<pad> a cat sat")
    with pytest.raises(ax.InputError, match=r"inputs\[1\]"):
        ax.saliency(model, ["a cat", ("a cat", "<pad>")])
    assert ax.saliency(_model("bart"), "<pad> a cat sat").sizes["target"] == 1  # BART: fine


def test_untied_tables_are_refused():
    hf, tok = tiny_classifier("bart")
    untied = torch.nn.Embedding(*hf.model.shared.weight.shape)
    hf.model.decoder.embed_tokens = untied
    with pytest.raises(ax.ModelError, match="different tables"):
        ax.load_model(hf, tokenizer=tok)


# --- question answering (BartForQuestionAnswering and kin): the decoder, reading the input
# shifted right beside the encoder's states, scores every position as the answer's start and end

QUESTION = ("where did the cat sit", "a cat sat on the mat and a dog ran")


def _answerer(arch: str) -> ax.Model:
    if ("qa", arch) not in _MODELS:
        hf, tok = tiny_classifier(arch, "question-answering")
        _MODELS["qa", arch] = (ax.load_model(hf, tokenizer=tok), tok)
    return _MODELS["qa", arch][0]


def _span(da) -> Callable[[object], torch.Tensor]:
    """transformers' start logit at the answer's first token and end logit at its last."""
    start, end = (int(p) for p in da.target_position.values)
    return lambda out: torch.stack((out.start_logits[0, start], out.end_logits[0, end]))


@pytest.mark.parametrize("arch", ARCHS)
def test_an_answers_gradients_equal_transformers_own_forward_from_ids(arch):
    model = _answerer(arch)
    assert model.task == "question-answering" and model.seq2seq_classifier
    ids = _ids(model, QUESTION)
    sal = ax.saliency(model, QUESTION, "the mat", objective="logit")
    assert sal.target.values.tolist() == ["start", "end"]
    answer = model.tokenizer.convert_ids_to_tokens(ids)
    start, end = (int(p) for p in sal.target_position.values)
    assert model.tokenizer.convert_tokens_to_string(answer[start : end + 1]).strip() == "the mat"
    grads, embeds, _ = _hf_gradients(model, ids, None, read=_span(sal))
    # float32 from two forwards (SDPA there, attrax's here): rounding to ~1e-6 of the largest
    # gradient (~2), which CPUs' kernels differ in
    np.testing.assert_allclose(sal.values, grads, rtol=1e-4, atol=1e-5)
    ixg = ax.input_x_gradient(model, QUESTION, "the mat", objective="logit")
    np.testing.assert_allclose(ixg.values, grads * embeds, rtol=1e-4, atol=1e-5)
    # without an answer: the context span start <= end of the largest start + end logit of
    # transformers' forward, by a loop over every span
    with torch.no_grad():
        out = model.hf(input_ids=torch.tensor([ids]))
    pred = ax.saliency(model, QUESTION)
    context = [p for p, s in enumerate(pred.segment.values) if s == 1 and not pred.special[p]]
    scores = {
        (a, b): float(out.start_logits[0, a] + out.end_logits[0, b])
        for a in context
        for b in context
        if a <= b
    }
    assert tuple(pred.target_position.values.tolist()) == max(scores, key=scores.get)


@pytest.mark.parametrize("arch", ARCHS)
def test_an_answers_integrated_gradients_equal_a_loop_over_own_nodes(arch):
    model = _answerer(arch)
    ids = _ids(model, QUESTION)
    got = ax.integrated_gradients(
        model, QUESTION, "the mat", objective="logit", steps=5, baseline="zeros"
    )
    nodes, weights = np.polynomial.legendre.leggauss(5)
    total = 0.0
    for alpha, weight in zip((nodes + 1) / 2, weights / 2, strict=True):
        edit = _on_the_path(model, float(alpha))
        total = total + weight * _hf_gradients(model, ids, edit, read=_span(got))[0]
    want = total * _hf_gradients(model, ids, None, read=_span(got))[1]
    np.testing.assert_allclose(got.values, want, rtol=1e-4, atol=1e-6)


def test_a_padded_batch_of_questions_equals_each_alone():
    model = _answerer("bart")
    other = ("who ran", "a dog ran")
    both = ax.saliency(model, [QUESTION, other], ["the mat", "a dog"])
    for i, (item, answer) in enumerate(((QUESTION, "the mat"), (other, "a dog"))):
        alone = ax.saliency(model, item, answer)
        n = alone.sizes["source"]
        np.testing.assert_allclose(
            both.isel(example=i, source=slice(0, n)).values, alone.values, rtol=1e-4, atol=1e-6
        )  # float32 sums in another order: ~2e-7 apart where values are ~1e-4
        assert np.isnan(both.isel(example=i).values[:, n:]).all()


def test_an_answerer_follows_one_stack_for_no_method_and_loads_from_disk(tmp_path):
    model = _answerer("bart")
    with pytest.raises(ax.ModelError, match="BartForQuestionAnswering"):
        ax.attention(model, QUESTION)
    hf, tok = tiny_classifier("bart", "question-answering")
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = ax.load_model(tmp_path)
    assert loaded.task == "question-answering" and loaded.seq2seq_classifier == "start"
    want = ax.saliency(model, QUESTION, "the mat")
    np.testing.assert_allclose(ax.saliency(loaded, QUESTION, "the mat").values, want.values)


def test_a_local_checkpoint_loads_and_runs_from_the_cli(tmp_path, capsys):
    hf, tok = tiny_classifier("bart")
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = ax.load_model(tmp_path)
    assert model.seq2seq_classifier == "start" and model.task == "sequence-classification"
    want = ax.saliency(ax.Model(hf, tok), PAIRS[0], targets="all")
    np.testing.assert_allclose(ax.saliency(model, PAIRS[0], targets="all").values, want.values)
    out = tmp_path / "r.nc"
    args = ["attribute", "--model", str(tmp_path), "--input", PAIRS[0][0], "--input-pair"]
    code = main([*args, PAIRS[0][1], "--target", "all", "--reduce", "none", "--out", str(out)])
    assert code == 0
    np.testing.assert_allclose(ax.load(out).values, want.values, rtol=1e-6)
