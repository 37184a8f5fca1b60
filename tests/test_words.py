"""Word granularity: segmentation for the three tokenizer families, reductions, batches, sides."""

from __future__ import annotations

import re

import numpy as np
import pytest
import xarray as xr

import attrax as ax
from attrax._perturbation import occlusion
from attrax._tokens import detect_scheme
from attrax._words import merge_subwords
from attrax.testing import corpus, tiny_classifier, train_tokenizer
from tests.conftest import PAIRS

FAMILIES = {"gpt2": "byte-level", "llama": "sentencepiece", "wordpiece": "wordpiece"}


@pytest.fixture(scope="module")
def tokenizers():
    return {kind: train_tokenizer(kind) for kind in FAMILIES}


def tokens_array(tokens: list[str], seed: int = 0) -> xr.DataArray:
    """A decoder-only-like ``(target, source)`` array over ``tokens`` with random values."""
    n = len(tokens)
    values = np.random.default_rng(seed).standard_normal((n, n)).astype(np.float32)
    return xr.DataArray(
        values,
        dims=("target", "source"),
        coords={
            "target": np.arange(n),
            "source": np.arange(n),
            "target_token": ("target", np.array(tokens)),
            "source_token": ("source", np.array(tokens)),
        },
        attrs={"method": "synthetic"},
    )


def words_of(tok, text: str) -> list[str]:
    tokens = tok.convert_ids_to_tokens(tok(text).input_ids)
    return list(merge_subwords(tokens_array(tokens), dims="source").source_word.values)


@pytest.mark.parametrize(
    ("kind", "text", "want"),
    [
        ("gpt2", "The capital of France is Paris.", "The capital of France is Paris ."),
        ("gpt2", "Le café est très bon à Zürich", "Le café est très bon à Zürich"),
        ("gpt2", "def f(x):\n    return x", "def f ( x ): \n return x"),
        ("gpt2", 'She said: "Hello, world!" -- 🙂', 'She said : " Hello , world !" -- 🙂'),
        ("llama", "The capital of France is Paris", "<s> The capital of France is Paris"),
        ("llama", "Le café est très bon à Zürich", "<s> Le café est très bon à Zürich"),
        ("llama", 'Hello, "world" -- ok', '<s> Hello , " world " -- ok'),
        (
            "wordpiece",
            "The capital of France is Paris.",
            "[CLS] the capital of france is paris . [SEP]",
        ),
        ("wordpiece", "Le café est très bon à Zürich", "[CLS] le cafe est tres bon a zurich [SEP]"),
    ],
)
def test_words_per_tokenizer_family(tokenizers, kind, text, want):
    got = words_of(tokenizers[kind], text)
    expected = want.split(" ")
    if "\n" in text:  # the newline+indent token is a whitespace word of its own
        expected = [w if w != "\n" else "\n   " for w in expected]
    assert got == expected


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_words_cover_tokens_and_rebuild_text(tokenizers, kind):
    tok = tokenizers[kind]
    for line in corpus(40)[:40]:
        ids = tok(line).input_ids
        tokens = tok.convert_ids_to_tokens(ids)
        merged = merge_subwords(tokens_array(tokens), dims="source")
        starts = list(merged.source.values)
        assert starts[0] == 0 and starts == sorted(set(starts))
        words = [w for w in merged.source_word.values if not re.fullmatch(r"<.*>|\[.*\]", w)]
        decoded = tok.decode(ids, skip_special_tokens=True)
        assert "".join("".join(words).split()) == "".join(decoded.split()), line


def test_detect_scheme(tokenizers):
    for kind, scheme in FAMILIES.items():
        tok = tokenizers[kind]
        tokens = tok.convert_ids_to_tokens(tok("The capital of France is Paris.").input_ids)
        assert detect_scheme(tokens) == scheme
    assert detect_scheme(["<s>", "1", "2"]) == "word-level"


def test_how_and_nan_semantics():
    # the four reductions differ on every word that has a value; "fgh" is partly NaN (ignored:
    # its mean is over the two values), "de" all NaN (stays NaN)
    tokens = ["▁a", "b", "c", "▁d", "e", "▁f", "g", "h"]
    da = tokens_array(tokens).isel(target=[0])
    da[0] = [2.0, -6.0, 1.0, np.nan, np.nan, np.nan, -5.0, 4.0]
    want = {
        "sum": [-3.0, np.nan, -1.0],
        "mean": [-1.0, np.nan, -0.5],
        "max": [2.0, np.nan, 4.0],
        "absmax": [-6.0, np.nan, -5.0],
    }
    for how, values in want.items():
        merged = merge_subwords(da, how, dims="source")
        np.testing.assert_array_equal(merged.values[0], np.float32(values))
        assert list(merged.source.values) == [0, 3, 5]
        assert list(merged.source_word.values) == ["abc", "de", "fgh"]
        assert merged.attrs["reductions"] == f"merge_subwords(source,{how})"


@pytest.mark.parametrize("dtype", [complex, str, object])
def test_values_that_are_not_real_numbers_are_refused(dtype):
    """Complex values lost their imaginary part, strings became floats, without a word (until
    2026-12-06); the reductions refuse them the same way."""
    da = tokens_array(["▁a", "b"]).astype(dtype)
    with pytest.raises(ax.InputError, match=f"merge_subwords: `da` must hold numbers.*{da.dtype}"):
        merge_subwords(da, dims="source")


def test_scheme_can_be_forced():
    da = tokens_array(["caf", "Ã©"])  # byte-level without any space: no mark to detect
    assert list(merge_subwords(da, dims="source").source_word.values) == ["caf", "Ã©"]
    forced = merge_subwords(da, dims="source", scheme="byte-level")
    assert list(forced.source_word.values) == ["café"]


# --- on real attrax outputs --------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_single_decoder_only_words_and_sel(models, arch):
    model = models[arch]
    da = occlusion(model, *PAIRS[2])
    np.testing.assert_allclose(float(merge_subwords(da).sum()), float(da.sum()), rtol=1e-5)
    merged = merge_subwords(da, dims="source")
    starts = list(merged.source.values)
    for start, end, word in zip(
        starts, [*starts[1:], da.sizes["source"]], merged.source_word.values, strict=True
    ):
        tokens = da.sel(source=slice(start, end - 1))
        # a word is indexed by its first token and holds the sum over its tokens
        want = tokens.sum("source", min_count=1)
        np.testing.assert_allclose(merged.sel(source=start).values, want.values, rtol=1e-6)
        assert word == model.tokenizer.decode(tokens.source_id.values).strip()
    # words never span the prompt/continuation boundary
    first_target = int(da.source[da.side == "target"][0])
    assert first_target in starts
    assert list(merged.side.values) == list(da.side.sel(source=starts).values)


def test_target_words_aggregate_rows(models):
    model = models["gpt2"]
    da = occlusion(model, *PAIRS[2], objective="logprob")
    merged = merge_subwords(da, dims="target")
    tokens = list(da.target_token.values)
    assert len(merged.target) < len(tokens)  # " world" is several tokens
    for start in merged.target.values:
        nxt = merged.target.values[merged.target.values > start]
        end = nxt[0] if len(nxt) else int(da.target[-1]) + 1
        want = da.sel(target=slice(start, end - 1)).sum("target", min_count=1)
        np.testing.assert_allclose(merged.sel(target=start).values, want.values, rtol=1e-6)
    # the same segmentation on both dims: continuation words are source words too
    both = merge_subwords(da)
    assert set(both.target.values) <= set(both.source.values)
    np.testing.assert_allclose(float(both.sum()), float(da.sum()), rtol=1e-5)


def test_target_gaps_split_words(models):
    model = models["gpt2"]
    full = occlusion(model, *PAIRS[2])
    assert list(full.target_token.values[:3]) == ["Ġw", "or", "ld"]
    p = list(full.target.values)
    da = occlusion(model, *PAIRS[2], positions=[p[0], *p[2:]])  # without "or"
    merged = merge_subwords(da, dims="target")
    assert list(merged.target.values[:2]) == [p[0], p[2]]
    assert list(merged.target_word.values[:2]) == ["w", "ld"]
    np.testing.assert_allclose(float(merged.sum()), float(da.sum()), rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bart"])
def test_batch_equals_singles(models, arch):
    model = models[arch]
    encdec = model.is_encoder_decoder
    sources, targets = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    da = occlusion(model, sources, targets, attribute_target=encdec)
    merged = merge_subwords(da, "mean")
    assert merged.dims == ("example", "target", "source")
    for i, (source, target) in enumerate(PAIRS):
        single = merge_subwords(occlusion(model, source, target, attribute_target=encdec), "mean")
        row = merged.isel(example=i).sel(source=single.source, target=single.target)
        np.testing.assert_allclose(row.values, single.values, rtol=1e-4, atol=1e-7)
        assert list(row.source_word.values) == list(single.source_word.values)
        assert list(row.target_word.values) == list(single.target_word.values)
        rest = merged.isel(example=i).drop_sel(source=single.source.values)
        assert bool(rest.isnull().all())
        assert set(rest.source_word.values) <= {""}


@pytest.mark.parametrize("arch", ["marian", "t5"])
def test_encoder_decoder_sides_never_merge(models, arch):
    model = models[arch]
    da = occlusion(model, *PAIRS[2], attribute_target=True)
    merged = merge_subwords(da)
    assert set(merged.indexes["source"].names) == {"side", "position"}
    np.testing.assert_allclose(float(merged.sum()), float(da.sum()), rtol=1e-5)
    for side in ("source", "target"):
        part = merged.sel(side=side)
        tokens = da.sel(side=side)
        np.testing.assert_allclose(float(part.sum()), float(tokens.sum()), rtol=1e-5)
    # the decoder side is segmented as the target dim is (after the start token)
    decoder = merged.sel(side="target")
    words = dict(zip(decoder.position.values, decoder.source_word.values, strict=True))
    for position, word in zip(merged.target.values, merged.target_word.values, strict=True):
        assert words[position] == word


def test_hidden_dim_is_carried(models):
    da = ax.saliency(models["llama"], *PAIRS[0])
    merged = merge_subwords(da, dims="source")
    assert merged.dims == ("target", "source", "hidden")
    np.testing.assert_allclose(
        ax.sum(merged).values, merge_subwords(ax.sum(da), dims="source").values, rtol=1e-5
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"how": "median"}, ax.OptionError, "`how`"),
        ({"scheme": "bpe"}, ax.OptionError, "`scheme`"),
        ({"dims": "hidden"}, ax.OptionError, "`dims`"),
        ({"dims": []}, ax.OptionError, "`dims`"),
    ],
)
def test_bad_options_raise(kwargs, error, name):
    with pytest.raises(error, match=name):
        merge_subwords(tokens_array(["▁a", "b"]), **kwargs)


def test_bad_arrays_raise():
    with pytest.raises(ax.InputError, match="`source_token`"):
        merge_subwords(tokens_array(["▁a", "b"]).drop_vars("source_token"))
    # a KeyError until 2026-12-05
    with pytest.raises(ax.InputError, match="has no `source` coordinate"):
        merge_subwords(tokens_array(["▁a", "b"]).drop_vars("source"), dims="source")
    with pytest.raises(ax.InputError, match="DataArray"):
        merge_subwords(np.zeros((2, 2)))
    with pytest.raises(ax.OptionError, match="neither"):
        merge_subwords(xr.DataArray(np.zeros(2), dims="hidden"))


def test_letters_that_look_like_byte_marks_do_not_make_a_vocabulary_byte_level():
    """Esperanto's ĉ (GPT-2's stand-in for a tab) and Maltese Ġ made any token list byte-level
    until 2026-12-06: `▁Mi▁ŝatas▁\\tiun` was one word. A byte-level tab still counts."""
    esperanto = ["<s>", "▁Mi", "▁ŝatas", "▁ĉiun", "▁tagon", "."]
    assert detect_scheme(esperanto) == "sentencepiece"
    merged = merge_subwords(tokens_array(esperanto), dims="source")
    assert merged.source_word.values.tolist() == ["<s>", "Mi", "ŝatas", "ĉiun", "tagon", "."]
    assert detect_scheme(["[CLS]", "mi", "ŝat", "##as", "ĉiu", "##n", "[SEP]"]) == "wordpiece"
    assert detect_scheme(["Ġmalta", "Ġis", "ĠĠ", "Ġrabat"]) == "byte-level"
    assert detect_scheme(["a", "ĉ", "b"]) == "byte-level"  # "a\tb": its tab is a byte


@pytest.mark.parametrize(
    ("tokens", "want"),
    [
        # chat-template controls, words of their own (glued to a word until 2026-12-06)
        (["[INST]", "▁hello", "▁world", "[/INST]"], ["[INST]", "hello", "world", "[/INST]"]),
        (
            ["<\uff5cbegin\u2581of\u2581sentence\uff5c>", "▁Hello", "▁world"],
            ["<\uff5cbegin\u2581of\u2581sentence\uff5c>", "Hello", "world"],
        ),
        # SentencePiece's <unk> stands for letters of a word (it split the word until 2026-12-06)
        (["<s>", "▁Z", "<unk>", "rich", "▁is"], ["<s>", "Z<unk>rich", "is"]),
        (["<s>", "▁", "<unk>", "a", "▁b"], ["<s>", "<unk>a", "b"]),
    ],
)
def test_control_and_unknown_tokens(tokens, want):
    merged = merge_subwords(tokens_array(tokens), dims="source", scheme="sentencepiece")
    assert merged.source_word.values.tolist() == want
    np.testing.assert_allclose(float(merged.sum()), float(tokens_array(tokens).sum()), rtol=1e-5)


def test_wordpieces_unknown_token_is_a_word():
    tokens = ["[CLS]", "the", "[UNK]", "sat", "##s", "[SEP]"]
    merged = merge_subwords(tokens_array(tokens), dims="source")
    assert merged.source_word.values.tolist() == ["[CLS]", "the", "[UNK]", "sats", "[SEP]"]


def test_one_word_is_segmented_alone_as_in_a_batch():
    """A one-word byte-level text carries no Ġ: its pieces were each a word alone and one word
    in a batch (feature ablation's groups="word" differed by 0.87) until 2026-12-06. The
    model's vocabulary's scheme, recorded in attrs, segments both."""
    hf, tok = tiny_classifier("roberta", "sequence")
    model = ax.load_model(hf, tokenizer=tok)
    assert model.subwords == "byte-level"
    word = "unremarkably"
    pieces = model.tokenizer.tokenize(word)
    assert len(pieces) > 1 and not any("Ġ" in p for p in pieces), pieces
    alone = ax.feature_ablation(model, word, groups="word", objective="logit")
    batch = ax.feature_ablation(
        model, [word, "a remarkable plot"], groups="word", objective="logit"
    )
    width = alone.sizes["source"]
    np.testing.assert_allclose(
        batch.isel(example=0, source=slice(0, width)).values, alone.values, rtol=1e-5, atol=1e-7
    )
    assert alone.attrs["subwords"] == "byte-level"
    merged = ax.merge_subwords(alone)
    assert merged.source_word.values.tolist() == ["<s>", word, "</s>"]
    # a drop per word: every piece of the word the same, as a naive loop zeroing them all gives
    inner = alone.values[:, 1:-1]
    np.testing.assert_allclose(inner, inner[:, :1].repeat(inner.shape[1], axis=1), rtol=1e-6)


def test_coordinates_a_words_tokens_share_are_kept():
    """A pair's `segment` and `special` were dropped by merging until 2026-12-06; a token
    classifier's classes stay where each word's tokens agree."""
    clf = ax.load_model("attrax:classifier")
    da = ax.pipe(ax.saliency, ax.l2_norm)(
        clf, [("the film was bad", "a great plot"), ("ok", "fine")]
    )
    merged = ax.merge_subwords(da)
    for e in range(2):
        tokens = da.isel(example=e)
        words = merged.isel(example=e)
        for start in words.source.values:
            if words.source_word.sel(source=start).item() == "":
                assert words.segment.sel(source=start).item() == -1
                continue
            assert words.segment.sel(source=start).item() == tokens.segment.sel(source=start).item()
            assert words.special.sel(source=start).item() == tokens.special.sel(source=start).item()
    hf, tok = tiny_classifier("bert", "token")
    ner = ax.load_model(hf, tokenizer=tok)
    tags = ax.pipe(ax.saliency, ax.l2_norm)(ner, "unbelievably awful weather", targets=1)
    words = ax.merge_subwords(tags)
    assert words.target_word.values.tolist() == ["unbelievably", "awful", "weather"]
    assert (words.target_class.values == 1).all() and (
        words.target_label.values == ner.labels[1]
    ).all()


def test_sources_reordered_merge_as_in_order(models):
    """Sorted by relevance, then merged: words were cut wherever positions jumped, `e`, `u`,
    `b`, `n` (until 2026-12-06)."""
    model = models["gpt2"]
    da = ax.pipe(ax.saliency, ax.l2_norm)(model, "The capitalisation of Francophones", " is")
    order = np.argsort(-da.isel(target=0).fillna(-1).values)
    shuffled = merge_subwords(da.isel(source=order))
    xr.testing.assert_allclose(shuffled, merge_subwords(da))


def test_results_joined_by_xr_concat_merge_their_padding_as_no_word():
    """`xr.concat` pads an object token coordinate with NaN: merged, it was the word `nannan`
    (until 2026-12-06)."""
    hf, tok = tiny_classifier("roberta", "sequence")
    model = ax.load_model(hf, tokenizer=tok)
    short, long = (ax.pipe(ax.saliency, ax.l2_norm)(model, t) for t in ("Parisian", "a b c d e f"))
    joined = xr.concat([short, long], "example", coords="different", compat="equals", join="outer")
    assert joined.source_token.dtype == object
    words = merge_subwords(joined).source_word.values
    assert "nan" not in "".join(words[0]) and words[0].tolist()[:3] == ["<s>", "Parisian", ""]
    np.testing.assert_allclose(
        float(merge_subwords(joined).isel(example=0).sum()), float(short.sum()), rtol=1e-6
    )


def test_a_word_keeps_the_coordinates_its_tokens_share_alone_as_in_a_batch():
    """Agreement was checked over the whole batch: a token classifier's classes were kept for
    an example alone and dropped in a batch (until 2026-12-06)."""
    hf, tok = tiny_classifier("bert", "token")
    ner = ax.load_model(hf, tokenizer=tok)
    texts = ["unbelievably awful weather", "paris"]
    batch = merge_subwords(ax.pipe(ax.saliency, ax.l2_norm)(ner, texts))  # predicted classes
    for e, text in enumerate(texts):
        alone = merge_subwords(ax.pipe(ax.saliency, ax.l2_norm)(ner, text))
        row = batch.isel(example=e).sel(target=alone.target)
        assert row.target_class.values.tolist() == alone.target_class.values.tolist()
    mixed = batch.isel(example=0).target_class.values
    assert (mixed == -1).any() and (mixed >= 0).any(), "a word of mixed classes, one of one"
