"""Tests for attrax.testing, and for the transformers behaviours the attribution engine relies on."""

from __future__ import annotations

import hashlib
import math
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

import attrax as ax
from attrax.testing import (
    ARCHS,
    SEQ2SEQ_ARCHS,
    TOKENIZER_KINDS,
    corpus,
    save_tiny_model,
    tiny_classifier,
    tiny_model,
    train_tokenizer,
)

PROMPT = "The capital of France is"
VMAP_PERF = "ignore:There is a performance drop:UserWarning"

# GPT-Neo has no SDPA in transformers
SDPA_ARCHS = tuple(arch for arch in ARCHS if arch != "gpt_neo")


def _ids(model, tok, texts=(PROMPT, "def f(x): return x")):
    """Input ids (and decoder input ids for encoder-decoders) for a small padded batch."""
    if tok.pad_token is None:  # gpt2, llama: one sequence, no padding
        texts = texts[:1]
    ids = tok(list(texts), return_tensors="pt", padding=tok.pad_token is not None).input_ids
    if not model.config.is_encoder_decoder:
        return {"input_ids": ids}
    start = model.config.decoder_start_token_id
    dec = [start, *tok("The capital of", add_special_tokens=False).input_ids]
    return {"input_ids": ids, "decoder_input_ids": torch.tensor([dec] * len(ids))}


def _embeds(model, inputs):
    """The ``inputs_embeds`` recipe that reproduces the ``input_ids`` forward exactly."""
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    # Marian's encoder multiplies by embed_scale only on the input_ids path (its decoder, and
    # BART, whose embedding module carries the scale, are consistent).
    embeds = embeds * getattr(model.get_encoder(), "embed_scale", 1.0) if _marian(model) else embeds
    out = {"inputs_embeds": embeds}
    if model.config.is_encoder_decoder:
        out["decoder_inputs_embeds"] = model.get_decoder().embed_tokens(inputs["decoder_input_ids"])
    return out


def _marian(model):
    return model.config.model_type == "marian"


def _digest(obj) -> str:
    h = hashlib.sha256()
    if isinstance(obj, torch.nn.Module):
        for name, tensor in sorted(obj.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.numpy().tobytes())
    else:
        h.update(str(obj).encode())
    return h.hexdigest()


# -- corpus and tokenizers ---------------------------------------------------------------------


def test_corpus_is_deterministic_and_varied():
    lines = corpus()
    assert len(lines) == 400 and lines == corpus()
    assert corpus(seed=1) != lines and corpus(50) == lines[:50]
    text = "\n".join(lines)
    for needle in ("The capital of France is Paris", "def f(x): return x", "café", "Straße", "1"):
        assert needle in text


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_tokenizer_round_trip(kind):
    tok = train_tokenizer(kind)
    ids = tok(PROMPT).input_ids
    text = tok.decode(ids, skip_special_tokens=True)
    assert text == (PROMPT.lower() if kind == "wordpiece" else PROMPT)
    assert tok.unk_token is not None and len(tok) <= 800
    assert len(ids) <= 8  # real words, not characters
    code = "def f(x):\n    return x + 1"
    if kind != "wordpiece":  # BERT normalisation drops layout
        assert tok.decode(tok(code).input_ids, skip_special_tokens=True) == code


def test_tokenizer_special_tokens():
    gpt2 = train_tokenizer("gpt2")
    assert gpt2.eos_token == gpt2.bos_token == "<|endoftext|>" and gpt2.pad_token is None
    assert gpt2.convert_ids_to_tokens(gpt2(" is").input_ids) == ["Ġis"]

    llama = train_tokenizer("llama")
    assert (llama.unk_token_id, llama.bos_token_id, llama.eos_token_id) == (0, 1, 2)
    assert llama(PROMPT).input_ids[0] == 1 and llama.convert_ids_to_tokens(1) == "<s>"
    assert llama.convert_ids_to_tokens(llama(PROMPT).input_ids[1]).startswith("▁")

    t5 = train_tokenizer("t5")
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    marian = train_tokenizer("marian")
    assert (marian.eos_token_id, marian.unk_token_id, marian.pad_token_id) == (
        0,
        1,
        len(marian) - 1,
    )
    for tok in (t5, marian):
        assert tok(PROMPT).input_ids[-1] == tok.eos_token_id

    bart = train_tokenizer("bart")
    assert (bart.bos_token_id, bart.pad_token_id, bart.eos_token_id, bart.unk_token_id) == (
        0,
        1,
        2,
        3,
    )
    ids = bart(PROMPT).input_ids
    assert ids[0] == 0 and ids[-1] == 2 and bart.mask_token_id == len(bart) - 1

    wp = train_tokenizer("wordpiece")
    ids = wp(PROMPT).input_ids
    assert wp.convert_ids_to_tokens([ids[0], ids[-1]]) == ["[CLS]", "[SEP]"]
    assert any(t.startswith("##") for t in wp.get_vocab())


@pytest.mark.parametrize("kind", SEQ2SEQ_ARCHS)
def test_tokenizer_text_target(kind):
    tok = train_tokenizer(kind)
    enc = tok([PROMPT, "x"], text_target=["Paris", "a b c"], padding=True, return_tensors="pt")
    assert enc.labels.shape[0] == 2 and enc.input_ids.shape[0] == 2
    assert enc.labels[0, (enc.labels[0] != tok.pad_token_id).sum() - 1] == tok.eos_token_id


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_tokenizer_training_is_deterministic(kind):
    # The Rust hash maps behind the trainers are seeded anew for each map, so a training that
    # depended on their order (as the tokenizers WordPiece trainer does) would differ here too.
    first = train_tokenizer(kind).backend_tokenizer.to_str()
    assert all(train_tokenizer(kind).backend_tokenizer.to_str() == first for _ in range(3))


def test_unknown_names():
    with pytest.raises(ax.OptionError, match="unknown tokenizer kind"):
        train_tokenizer("bpe")
    with pytest.raises(ax.OptionError, match="unknown arch"):
        tiny_model("bert")
    with pytest.raises(ax.OptionError, match=r"unknown classifier 'bert'/'masked'.*'fill-mask'"):
        tiny_classifier("bert", "masked")


# -- models ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_config(arch):
    tiny_model(arch)  # train and cache the tokenizer
    start = time.perf_counter()
    model, tok = tiny_model(arch)
    assert time.perf_counter() - start < 2.0
    c = model.config
    assert not model.training and model.dtype == torch.float32
    assert c._attn_implementation == "eager"
    assert c.vocab_size == len(tok) == model.get_output_embeddings().out_features
    assert c.pad_token_id == tok.pad_token_id and c.eos_token_id == tok.eos_token_id
    assert c.is_encoder_decoder == (arch in SEQ2SEQ_ARCHS)
    if arch in ("gpt2", "llama", "bart"):
        assert c.bos_token_id == tok.bos_token_id
    if c.is_encoder_decoder:
        expected = {"marian": tok.pad_token_id, "t5": tok.pad_token_id, "bart": tok.eos_token_id}
        assert c.decoder_start_token_id == expected[arch]
    assert sum(p.numel() for p in model.parameters()) < 200_000
    # A fresh tokenizer each call: mutating one does not leak into the cache.
    tok.padding_side = "left" if tok.padding_side == "right" else "right"
    assert tiny_model(arch)[1].padding_side != tok.padding_side


def test_tiny_model_overrides():
    model, _ = tiny_model("llama", attn_implementation="sdpa", num_hidden_layers=1)
    assert model.config._attn_implementation == "sdpa" and model.config.num_hidden_layers == 1
    model, _ = tiny_model("t5", attn_implementation="sdpa", d_model=64)
    assert model.get_encoder().config._attn_implementation == "sdpa"  # T5 copies its config
    assert model.get_input_embeddings().embedding_dim == 64


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_is_deterministic(arch):
    rng = torch.random.get_rng_state()
    a, b, c = tiny_model(arch, seed=0)[0], tiny_model(arch, seed=0)[0], tiny_model(arch, seed=1)[0]
    assert torch.equal(rng, torch.random.get_rng_state())  # the global RNG is left alone
    assert _digest(a) == _digest(b) != _digest(c)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_are_far_from_uniform(arch):
    model, tok = tiny_model(arch)
    probs = []
    for prompt in (PROMPT, "def f(x): return", "Die Straße ist"):
        inputs = _ids(model, tok, (prompt,))
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        p = logits.softmax(-1)
        entropy = -(p * logits.log_softmax(-1)).sum()
        assert entropy < 0.95 * math.log(len(p)) and logits.std() > 1.0
        probs.append(p)
    assert 0.5 * (probs[0] - probs[1]).abs().sum() > 0.2  # total variation distance


@pytest.mark.parametrize("arch", ARCHS)
def test_inputs_embeds_matches_input_ids(arch):
    model, tok = tiny_model(arch)
    inputs = _ids(model, tok)
    with torch.no_grad():
        ref = model(**inputs).logits
        assert torch.equal(model(**_embeds(model, inputs)).logits, ref)
        if arch == "marian":  # the quirk the recipe works around is still there
            naive = model.get_input_embeddings()(inputs["input_ids"])
            out = model(inputs_embeds=naive, decoder_input_ids=inputs["decoder_input_ids"])
            assert not torch.allclose(out.logits, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_output_embeddings_pre_hook_gathers_positions(arch):
    model, tok = tiny_model(arch)
    inputs = _ids(model, tok)
    idx = torch.tensor([1, 3])
    if hasattr(model, "final_logits_bias"):
        assert model.final_logits_bias.abs().sum() > 0  # added after the projection
    with torch.no_grad():
        ref = model(**inputs).logits
        hook = model.get_output_embeddings().register_forward_pre_hook(
            lambda _module, args: (args[0][:, idx],)
        )
        try:
            gathered = model(**inputs).logits
        finally:
            hook.remove()
    torch.testing.assert_close(gathered, ref[:, idx], rtol=0, atol=1e-5)


@pytest.mark.filterwarnings(VMAP_PERF)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", SDPA_ARCHS)
def test_vjp_vmap_matches_autograd(arch, attn):
    model, tok = tiny_model(arch, attn_implementation=attn)
    # Frozen parameters: with sdpa, T5's learned position bias would otherwise reach the CPU
    # flash kernel as a grad-requiring attn_mask, which torch.func.vjp refuses.
    model.requires_grad_(False)
    inputs = _ids(model, tok)
    embeds = _embeds(model, inputs)["inputs_embeds"]
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}

    def last_logits(e):
        return model(inputs_embeds=e, **rest).logits[:, -1]

    out, vjp_fn = torch.func.vjp(last_logits, embeds)
    targets = torch.tensor([3, 7, 11])
    cotangents = torch.zeros(len(targets), *out.shape)
    cotangents[torch.arange(len(targets)), :, targets] = 1.0
    (batched,) = torch.vmap(vjp_fn)(cotangents)
    for k, target in enumerate(targets):
        x = embeds.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(last_logits(x)[:, target].sum(), x)
        torch.testing.assert_close(batched[k], grad, rtol=1e-4, atol=1e-5)
    assert batched.abs().sum() > 0


@pytest.mark.parametrize("arch", SDPA_ARCHS)
def test_set_attn_implementation_on_built_model(arch):
    model, tok = tiny_model(arch)
    inputs = _ids(model, tok)
    with torch.no_grad():
        eager = model(**inputs).logits
        model.set_attn_implementation("sdpa")
        sdpa = model(**inputs).logits
    assert model.config._attn_implementation == "sdpa"
    for sub in (model.get_encoder(), model.get_decoder()) if arch in SEQ2SEQ_ARCHS else ():
        assert sub.config._attn_implementation == "sdpa"
    torch.testing.assert_close(sdpa, eager, rtol=1e-4, atol=1e-4)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, eager)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_round_trip(arch, tmp_path):
    model, tok = tiny_model(arch, seed=3)
    path = save_tiny_model(arch, tmp_path / arch, seed=3)
    auto = AutoModelForSeq2SeqLM if arch in SEQ2SEQ_ARCHS else AutoModelForCausalLM
    loaded = auto.from_pretrained(path, attn_implementation="eager")
    loaded_tok = AutoTokenizer.from_pretrained(path)
    assert type(loaded) is type(model) and _digest(loaded) == _digest(model)
    for text in (PROMPT, "café Straße 東京 3.14\n  def f(x): return x"):
        assert loaded_tok(text).input_ids == tok(text).input_ids
    assert loaded_tok.special_tokens_map == tok.special_tokens_map
    inputs = _ids(model, tok)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
