"""Bad input raises one clear attrax error that names the argument."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr

import attrax as ax
from tests import _naive
from tests.conftest import IG_RULE, PAIRS, integrated_gradients


@pytest.mark.parametrize(
    ("inputs", "targets", "match"),
    [
        ("", " Paris", "`inputs` is empty"),
        ("The capital", "", "`targets` is empty"),
        ([], None, "`inputs` is an empty list"),
        (["a b", ""], [" c", " d"], r"`inputs\[1\]` is empty"),
        (["a b", "c d"], [" e"], "`targets` must match `inputs`"),
        (["a b", "c d"], " e", "`targets` must match `inputs`"),
        ("a b", [" e"], "`targets` must match `inputs`"),
        (3, " e", "`inputs` must be a string"),
        (["a b", 3], None, r"`inputs\[1\]` must be a string"),
        (["a b", "c d"], [None, " e"], r"`targets\[0\]` .* pass targets=None to generate"),
    ],
)
def test_bad_texts(models, inputs, targets, match):
    with pytest.raises(ax.InputError, match=match):
        ax.saliency(models["gpt2"], inputs, targets)


def test_errors_are_one_hierarchy():
    assert issubclass(ax.InputError, ax.AttraxError)
    assert issubclass(ax.OptionError, ax.AttraxError)
    assert issubclass(ax.ModelError, ax.AttraxError)
    assert issubclass(ax.InputError, ValueError)


def test_target_that_does_not_follow_the_prompt(models):
    # a word the tokenizer keeps whole, split inside: the target does not start on a token boundary
    model = models["gpt2"]
    tok = model.tokenizer

    def ids(text):
        return tok(text, add_special_tokens=False).input_ids

    prompt = "The capital of Fr"
    assert ids(prompt + "ance") != ids(prompt) + ids("ance")
    with pytest.raises(ax.InputError, match="`targets` 'ance' does not continue the prompt"):
        ax.saliency(model, prompt, "ance")
    # a prompt's trailing space is the one to move (a space before the target added a second)
    llama = models["llama"]
    with pytest.raises(ax.InputError, match="the prompt ends in whitespace, which the target"):
        ax.saliency(llama, "The capital is ", "Paris")


def test_too_long_sequence(models):
    model = models["gpt2"]
    limit = model.max_positions
    with pytest.raises(ax.InputError, match=f"more than the model's {limit} positions"):
        ax.saliency(model, "a " * limit, " b")
    with pytest.raises(ax.InputError, match=r"`inputs\[1\]`"):
        ax.saliency(model, ["a b", "a " * limit], [" c", " d"])


@pytest.mark.parametrize("arch", ["gpt2", "marian"])
def test_generation_past_the_positions_is_refused_before_it_runs(models, arch, monkeypatch):
    model = models[arch]
    prompt = "The capital of France is"
    limit = model.max_positions
    if model.is_encoder_decoder:
        room = limit - 1
    else:
        room = limit - len(model.tokenizer(prompt, add_special_tokens=False).input_ids)
    ran = []
    monkeypatch.setattr(model, "generate", lambda *args: ran.append(args) or [[5]])
    what = "the model's decoder" if model.is_encoder_decoder else "`inputs`"
    with pytest.raises(
        ax.InputError,
        match=rf"`max_new_tokens` {room + 1} does not fit {what}: .* exceed .*{limit} "
        rf"positions; pass max_new_tokens={room} or fewer",
    ):
        ax.saliency(model, prompt, max_new_tokens=room + 1)
    if not model.is_encoder_decoder:
        with pytest.raises(ax.InputError, match=r"does not fit `inputs\[1\]`: 3\d prompt tokens"):
            ax.saliency(model, ["a", prompt + " a" * 30], max_new_tokens=room)
    assert not ran
    ax.saliency(model, prompt, max_new_tokens=room)  # exactly full: allowed
    assert len(ran) == 1


def test_a_prompt_that_fills_the_positions_leaves_no_room_to_generate(models):
    model = models["gpt2"]
    with pytest.raises(ax.InputError, match="fills the model's 64 positions: there is no room"):
        ax.saliency(model, "a " * 80)


def test_too_long_encoder_input(models):
    model = models["marian"]
    with pytest.raises(ax.InputError, match=r"`inputs` has .* tokens, more than"):
        ax.saliency(model, "a " * (model.max_positions + 5), "b")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"objective": "prob"}, "`objective` must be one of"),
        ({"objective": 3}, "`objective` must be one of"),
        ({"chunk_size": 0}, "`chunk_size` must be a positive integer"),
        ({"positions": [0]}, "`positions` contains 0, which is not a target position"),
        ({"positions": []}, "`positions` is empty"),
        ({"positions": "x"}, "`positions` must be an int or a list of ints"),
        # a string's digits, a float's floor and a bool were read as positions until 2026-12-05
        ({"positions": "5"}, r"`positions` must be an int or a list of ints, got '5'"),
        ({"positions": [5.9]}, r"`positions` must be an int or a list of ints, got \[5.9\]"),
        ({"positions": True}, "`positions` must be an int or a list of ints, got True"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be a positive integer"),
        ({"attribute_target": "yes"}, "`attribute_target` must be a bool"),
        ({"contrast": " Paris is"}, "`contrast` .* has .* tokens but the target has"),
        # the target itself: all zeros, silently, until 2026-12-05
        ({"contrast": " Paris"}, "`contrast` ' Paris' is the target itself, token for token"),
    ],
)
def test_bad_options(models, options, match):
    with pytest.raises(ax.AttraxError, match=match):
        ax.saliency(models["gpt2"], *PAIRS[0], **options)


def test_a_position_missing_from_one_example_of_a_batch_names_it(models):
    """`positions` apply to every example: one that is another example's target position only
    names the example it is not one of (it gave the first example's range alone)."""
    (a, b), (c, d) = PAIRS[0], PAIRS[1]
    inputs, targets = [a, c], [b, d]
    last = max(ax.saliency(models["gpt2"], c, d).target.values)
    match = rf"contains {last}, which is not a target position of `inputs\[0\]`; its target"
    with pytest.raises(ax.InputError, match=match):
        ax.saliency(models["gpt2"], inputs, targets, positions=[int(last)])


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"steps": 0}, "`steps` must be a positive integer"),
        ({IG_RULE: "simpson"}, f"`{IG_RULE}` must be one of"),
        ({IG_RULE: "riemann_trapezoid", "steps": 1}, "`steps` must be at least 2"),
        ({"baseline": "random"}, "`baseline` must be one of"),
        ({"baseline": torch.zeros(3, 5)}, "`baseline` of shape"),
        ({"batch_size": -1}, "`batch_size` must be a positive integer"),
    ],
)
def test_bad_integrated_gradients_options(models, options, match):
    with pytest.raises(ax.OptionError, match=match):
        ax.integrated_gradients(models["gpt2"], *PAIRS[0], **options)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"samples": 0}, "`samples` must be a positive integer"),
        ({"noise": -0.1}, "`noise` must be a non-negative number"),
        ({"seed": 0.5}, "`seed` must be an integer"),
    ],
)
def test_bad_smoothgrad_options(models, options, match):
    with pytest.raises(ax.OptionError, match=match):
        ax.smoothgrad(models["gpt2"], *PAIRS[0], **options)


def test_bad_callable_objective(models):
    with pytest.raises(ax.OptionError, match="one score per target token"):
        ax.saliency(models["gpt2"], *PAIRS[0], objective=lambda logits, ids: logits)
    # the ids themselves: integers, nothing to differentiate (a raw torch.func error before)
    for method in (ax.saliency, ax.occlusion):
        with pytest.raises(ax.OptionError, match="floating-point scores"):
            method(models["gpt2"], *PAIRS[0], objective=lambda logits, ids: ids)
    with pytest.raises(ax.OptionError, match=r"must take \(logits, target_ids\)"):
        ax.saliency(models["gpt2"], *PAIRS[0], objective=lambda logits: logits[..., 0])


def test_options_are_checked_before_the_model_runs(models, monkeypatch):
    model = models["gpt2"]

    def boom(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(model.hf, "forward", boom)
    with pytest.raises(ax.OptionError):
        integrated_gradients(model, *PAIRS[0], rule="nope")
    with pytest.raises(ax.OptionError):
        ax.saliency(model, *PAIRS[0], objective="nope")


def test_baseline_tokens(models):
    model = models["llama"]
    zeros = ax.integrated_gradients(model, *PAIRS[0], steps=4, baseline="zeros")
    tok = model.tokenizer
    # the tokenizer's own pad token, or EOS where it has none (this one), not attrax's choice
    assert tok.pad_token_id is None
    pad = tok.eos_token_id
    for baseline, token in (("pad", pad), ("unk", tok.unk_token_id)):
        da = ax.integrated_gradients(model, *PAIRS[0], steps=4, baseline=baseline)
        assert json.loads(da.attrs["options"])["baseline"] == baseline
        embedding = model.hf.get_input_embeddings().weight[token]
        same = ax.integrated_gradients(model, *PAIRS[0], steps=4, baseline=embedding)
        np.testing.assert_allclose(da.values, same.values, rtol=1e-6, atol=1e-9)
        assert not np.allclose(np.nan_to_num(da.values), np.nan_to_num(zeros.values))
    tensor = torch.zeros(model.hidden_size)
    same = ax.integrated_gradients(model, *PAIRS[0], steps=4, baseline=tensor)
    np.testing.assert_array_equal(same.values, zeros.values)


def test_one_baseline_for_two_attributed_sides_says_give_a_tuple(models):
    model = models["marian"]
    with pytest.raises(ax.OptionError, match=r"got 1: give a tuple \(encoder source, decoder"):
        ax.integrated_gradients(
            model,
            *PAIRS[0],
            steps=2,
            attribute_target=True,
            baseline=torch.zeros(model.hidden_size),
        )


def test_a_text_the_tokenizer_does_not_know_at_all_is_refused():
    """The built-in model knows digits only: 'hello world' was attributed as two <unk> tokens."""
    model = ax.load_model()
    with pytest.raises(ax.InputError, match="`inputs` is nothing but unknown and special tokens"):
        ax.saliency(model, "hello world", " 1 2")
    with pytest.raises(ax.InputError, match="`targets` is nothing but unknown"):
        ax.saliency(model, "1 2 =", " zzz")
    assert ax.saliency(model, "1 hello 2 =", " 2 1").sizes["target"] == 2  # partly known: fine


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_tokens_targets_and_padding_are_the_tokenizers_own(models, arch):
    """A padded batch's labels are the ids a user gets from the tokenizer by hand (GPT-2: no
    BOS; Llama: a BOS; T5: encoder input and decoder targets apart, each ending in EOS), each
    row's values are a plain autograd loop's on that example alone, padding is NaN / -1 / "",
    and ``positions=-1`` picks each example's own last token."""
    model = models[arch]
    tok = model.tokenizer
    sources, targets = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    got = ax.saliency(model, sources, targets)
    last = ax.saliency(model, sources, targets, positions=-1)
    by_hand = [_naive.token_ids(model, s, t) for s, t in PAIRS]
    firsts = [1 if model.is_encoder_decoder else len(s) for s, _ in by_hand]
    spans = [range(first, first + len(t)) for first, (_, t) in zip(firsts, by_hand, strict=True)]
    assert got.target.values.tolist() == sorted(set().union(*spans))
    assert last.target.values.tolist() == sorted({span[-1] for span in spans})
    for i, (source_ids, target_ids) in enumerate(by_hand):
        sequence = source_ids if model.is_encoder_decoder else source_ids + target_ids
        row = got.isel(example=i)
        width = row.sizes["source"]
        assert row.source_id.values.tolist() == sequence + [-1] * (width - len(sequence))
        tokens = tok.convert_ids_to_tokens(sequence)
        assert row.source_token.values.tolist() == tokens + [""] * (width - len(sequence))
        ids = dict(zip(spans[i], target_ids, strict=True))
        want_ids = [ids.get(int(t), -1) for t in got.target.values]
        assert row.target_id.values.tolist() == want_ids
        assert row.target_token.values.tolist() == [
            tok.convert_ids_to_tokens(t) if t >= 0 else "" for t in want_ids
        ]
        end = spans[i][-1]
        assert last.isel(example=i).target_id.sel(target=end) == target_ids[-1]
        assert (last.isel(example=i).drop_sel(target=end).target_id == -1).all()
        # values: one backward per target on this example alone, unpadded
        run = _naive.Runner(model, source_ids, target_ids)
        grads = run.gradients(run.embeddings(), _naive.probability, None)
        for t in got.target.values:
            values = row.sel(target=t).values  # [source, hidden]
            if int(t) not in ids:
                assert np.isnan(values).all()  # not one of this example's targets
                continue
            want = grads[int(t) - firsts[i]][0].numpy()
            seen = len(sequence) if model.is_encoder_decoder else int(t)  # no future
            scale = np.abs(want).max()
            np.testing.assert_allclose(values[:seen], want[:seen], rtol=0, atol=1e-5 * scale)
            assert np.isnan(values[seen:]).all()


def test_errors_name_the_baseline_and_the_demo_model():
    """A NaN baseline is named (the error blamed the gradients and the model's dtype), and text
    the built-in demo model (model=None) cannot read says it is that model."""
    model = ax.load_model()
    nan = torch.full((1, 7, model.hidden_size), float("nan"))
    for method in (ax.integrated_gradients, ax.deeplift, ax.occlusion):
        with pytest.raises(ax.OptionError, match="`baseline` holds NaN or infinite values"):
            method(model, "1 2 3 =", " 3 2 1", baseline=nan)
    with pytest.raises(ax.InputError, match=r"built-in demo model \(model=None\)"):
        ax.saliency(None, "The capital of France is", " Paris.")


def test_texts_that_are_no_text_are_refused(models):
    """A lone surrogate (argv bytes that are no UTF-8 reach Python so) or a NUL: an InputError
    naming the argument (a tokenizer's TypeError until 2026-12-05)."""
    for text, match in (("3 1 \ud800 =", "lone surrogate"), ("3 1 \x00 =", "NUL character")):
        with pytest.raises(ax.InputError, match=rf"`inputs` holds a {match}"):
            ax.saliency(models["gpt2"], text, " 1 3")
        with pytest.raises(ax.InputError, match=rf"`targets\[1\]` holds a {match}"):
            ax.saliency(models["gpt2"], ["a", "b"], [" c", text])


@pytest.mark.parametrize("task", ["token", "fill-mask"])
def test_checking_an_example_refuses_the_positions_preparing_it_refuses(task):
    """check_example (the dataset runs' up-front check) finds the target positions a token
    classifier's or a masked LM's input lacks, with prepare's own message."""
    from attrax._inputs import check_example, prepare
    from attrax.testing import tiny_classifier

    hf, tok = tiny_classifier("bert", task)
    model = ax.load_model(hf, tokenizer=tok)
    text = "the capital of france is [MASK]" if task == "fill-mask" else "hello world"
    check_example(model, text, None, positions=[1, -2])
    with pytest.raises(ax.InputError) as prepared:
        prepare(model, text, positions=[40])
    with pytest.raises(ax.InputError) as checked:
        check_example(model, text, None, positions=[40])
    assert str(checked.value) == str(prepared.value).replace(" of `inputs`; its", "; the")


def test_positions_may_be_a_tensor(models):
    """A tensor of positions was refused while numpy's array was taken (until 2026-12-06)."""
    model = models["gpt2"]
    want = ax.saliency(model, "a b c", " d e", positions=np.array([-2, -1]))
    got = ax.saliency(model, "a b c", " d e", positions=torch.tensor([-2, -1]))
    xr.testing.assert_identical(got, want)


def test_whitespace_is_text_and_a_text_that_starts_with_bos_has_it_once(models):
    """A rendered chat template starts with BOS, which the tokenizer added again (two BOS, until
    2026-12-06); whitespace targets ("\\n", " ") were refused as empty."""
    model = models["llama"]
    tok = model.tokenizer
    prompt = tok.bos_token + "The capital is"
    da = ax.saliency(model, prompt, " Paris")
    # as apply_chat_template(tokenize=True) reads a rendered template: no tokens added
    want = tok(prompt + " Paris", add_special_tokens=False)["input_ids"]
    assert da.source_id.values.tolist() == want and want.count(tok.bos_token_id) == 1
    plain = ax.saliency(model, "The capital is", " Paris")  # BOS is still added when absent
    assert plain.source_id.values.tolist()[0] == tok.bos_token_id
    newline = ax.saliency(models["gpt2"], "The capital is", "\n")
    want = models["gpt2"].tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert newline.target_id.values.tolist() == want


def test_gpt2s_end_of_text_is_asked_for_not_unknown(models):
    """GPT-2's <|endoftext|> is its unknown, BOS and EOS token: a target of it alone ("why did
    it stop?") was refused as text the tokenizer does not know until 2026-12-06."""
    model = models["gpt2"]
    da = ax.saliency(model, "The capital is", "<|endoftext|>")
    assert da.target_id.values.tolist() == [model.tokenizer.eos_token_id]


def test_a_prompt_the_tokenizer_reads_nothing_in_is_refused():
    """With whitespace accepted as text, a tokenizer that drops it (WordPiece) left a decoder
    with no source: the first target was read at the last position, silently (found by the
    review of 2026-12-06)."""
    from attrax.testing import tiny_classifier, tiny_model

    hf, _ = tiny_model("gpt2")
    _, wordpiece = tiny_classifier("bert", "sequence")
    model = ax.load_model(hf, tokenizer=wordpiece)
    assert wordpiece("   ", add_special_tokens=False)["input_ids"] == []
    with pytest.raises(ax.InputError, match="`inputs` '   ' has no tokens: the tokenizer reads"):
        ax.step_scores(model, "   ", " the cat")
    with pytest.raises(ax.InputError, match=r"`contrast_inputs` '\\n' has no tokens"):
        ax.step_scores(model, "the cat", " sat", scores="pcxmi", contrast_inputs="\n")
    # an encoder-decoder's source keeps its special tokens, its decoder the start token: it runs
    t5, _ = tiny_model("t5")
    translator = ax.load_model(t5, tokenizer=wordpiece)
    assert wordpiece(" ")["input_ids"]  # [CLS] [SEP]
    assert ax.saliency(translator, " ", "the dog").sizes["target"] > 0
