"""Tiny, offline, deterministic Hugging Face models and tokenizers for tests, docs and benchmarks.

Everything here is built from scratch in a fraction of a second: a synthetic corpus, tokenizers
trained on it with the ``tokenizers`` library, and randomly initialised models of some 50k
parameters. Nothing is downloaded.

>>> from attrax.testing import tiny_model
>>> model, tok = tiny_model("gpt2")
>>> model.config.vocab_size == len(tok)
True
"""

from __future__ import annotations

import copy
import functools
import random
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from ._errors import OptionError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = [
    "ARCHS",
    "CLASSIFIER_ARCHS",
    "SEQ2SEQ_ARCHS",
    "TOKENIZER_KINDS",
    "corpus",
    "save_tiny_model",
    "tiny_classifier",
    "tiny_model",
    "train_tokenizer",
]

TOKENIZER_KINDS = ("gpt2", "llama", "marian", "t5", "bart", "wordpiece")
ARCHS = ("gpt2", "gpt_neo", "llama", "gemma3", "marian", "bart", "t5")
SEQ2SEQ_ARCHS = ("marian", "bart", "t5")

_FIXED = (
    "The capital of France is Paris.",
    "The capital of Germany is Berlin.",
    "The capital of Italy is Rome.",
    "The capital of Japan is Tokyo.",
    "def f(x): return x",
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n    print(i * 2)",
    "Le café est très bon à Zürich.",
    "Die Straße ist lang, naïve Übung.",
    "East or west, home is best!",
    "1 + 1 = 2; 3.14 * 2 = 6.28; 100% (yes).",
    'She said: "Hello, world!" -- and left?',
)
_SUBJECTS = ("The cat", "A dog", "My friend", "The teacher", "Every student", "The old man", "Anna")
_VERBS = ("sees", "likes", "reads", "writes", "finds", "wants", "eats", "visits")
_OBJECTS = ("a book", "the river", "an apple", "the city", "some bread", "the café", "the code")
_ENDINGS = (".", "!", "?", " today.", " again.", " in 1999.", ", then sleeps.")
_COUNTRIES = (
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Spain", "Madrid"),
    ("Italy", "Rome"),
    ("Japan", "Tokyo"),
    ("Austria", "Vienna"),
    ("Portugal", "Lisbon"),
    ("Egypt", "Cairo"),
)
_NAMES = ("x", "y", "n", "value", "items", "count", "data")
_OPS = ("+", "-", "*", "//", "%")


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}"
    if kind == 1:
        country, city = rng.choice(_COUNTRIES)
        return rng.choice(
            (
                f"The capital of {country} is {city}.",
                f"{city} is the capital of {country}.",
                f"Is {city} in {country}? Yes, it is.",
            )
        )
    if kind == 2:
        a, b = rng.sample(_NAMES, 2)
        op = rng.choice(_OPS)
        return rng.choice(
            (
                f"def f({a}): return {a} {op} {rng.randrange(100)}",
                f"def g({a}, {b}):\n    return {a} {op} {b}",
                f"{a} = [{b} {op} 1 for {b} in range({rng.randrange(2, 20)})]",
                f"if {a} > {rng.randrange(10)}:\n    print({a!r}, {b})",
            )
        )
    if kind == 3:
        return (
            f"In {rng.randrange(1800, 2030)}, {rng.randrange(2, 999)} people paid "
            f"${rng.randrange(1, 99)}.{rng.randrange(10)}{rng.randrange(10)} each."
        )
    return rng.choice(
        (
            "Un café, s'il vous plaît.",
            "Die Straße in München ist groß.",
            "El niño comió piñas y jalapeños.",
            "Ça va? Très bien, merci!",
            "Grüße aus Köln: schön, ähnlich, Öl.",
        )
    )


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Return ``n`` deterministic synthetic lines of English-like prose, code and unicode text.

    A fixed set of seed sentences ("The capital of France is Paris.", "def f(x): return x",
    "café", "Straße", ...) always comes first; the rest is drawn with ``random.Random(seed)``.
    """
    rng = random.Random(seed)
    lines = list(_FIXED[:n])
    while len(lines) < n:
        k = rng.randrange(1, 4)
        lines.append(" ".join(_sentence(rng) for _ in range(k)))
    return lines


def _train(tk: Tokenizer, trainer: Any, texts: Iterable[str]) -> None:
    tk.train_from_iterator(list(texts), trainer=trainer)


def _wrap(tk: Tokenizer, **special: str | None) -> PreTrainedTokenizerFast:
    special = {k: v for k, v in special.items() if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=tk, model_max_length=64, **special)


def _byte_level(vocab_size: int, specials: list[str], texts: Iterable[str]) -> Tokenizer:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    _train(tk, trainer, texts)
    return tk


def _sentencepiece_bpe(vocab_size: int, specials: list[str], texts: Iterable[str]) -> Tokenizer:
    tk = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False
    )
    _train(tk, trainer, texts)
    return tk


def _wordpiece_vocab(vocab_size: int, specials: list[str], texts: list[str]) -> dict[str, int]:
    # The tokenizers WordPiece trainer numbers (and breaks ties between) pieces in hash order,
    # which changes from one run to the next; this builds a comparable vocabulary stably:
    # every character, with and without "##", then the most frequent words and short suffixes.
    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    chars = sorted({c for w in words for c in w})
    pieces = Counter({w: n for w, n in words.items() if len(w) > 1})
    for w, n in words.items():
        for i in range(max(1, len(w) - 4), len(w) - 1):
            pieces["##" + w[i:]] += n
    ranked = sorted(pieces.items(), key=lambda item: (-item[1], item[0]))
    vocab = specials + chars + ["##" + c for c in chars]
    vocab += [p for p, _ in ranked[: max(0, vocab_size - len(vocab))]]
    return {p: i for i, p in enumerate(vocab)}


def train_tokenizer(
    kind: str, vocab_size: int | None = None, texts: Iterable[str] | None = None, seed: int = 0
) -> PreTrainedTokenizerFast:
    """Train a small tokenizer of one of the usual families on ``texts`` (default: ``corpus(seed=seed)``).

    ``vocab_size`` defaults to 800 for the byte-level kinds (whose alphabet alone takes 256
    entries) and to 500 otherwise; the trainer may stop short of it on a small corpus.

    ``kind``:

    * ``"gpt2"``: byte-level BPE (``Ġ`` marks spaces); ``<|endoftext|>`` is bos/eos/unk, id 0;
      no special tokens are added and there is no pad token, as in GPT-2.
    * ``"llama"``: sentencepiece-style BPE (``▁``); ``<unk>``=0, ``<s>``=1, ``</s>``=2;
      ``<s>`` is prepended to every sequence; no pad token, as in Llama.
    * ``"t5"``: sentencepiece-style BPE (``▁``); ``<pad>``=0, ``</s>``=1, ``<unk>``=2; ``</s>``
      is appended to every sequence.
    * ``"marian"``: sentencepiece-style BPE (``▁``); ``</s>``=0, ``<unk>``=1 and ``<pad>`` last (as
      in the opus-mt models, where it is also the decoder start token); ``</s>`` appended.
    * ``"bart"``: byte-level BPE; ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``<mask>``
      last; sequences are wrapped as ``<s> ... </s>``.
    * ``"wordpiece"``: lower-casing BERT-style WordPiece (``##``); ``[PAD]``=0, ``[UNK]``=1,
      ``[CLS]``=2, ``[SEP]``=3, ``[MASK]``=4; sequences are ``[CLS] ... [SEP]``.

    Training is deterministic for given arguments.
    """
    if kind not in TOKENIZER_KINDS:
        raise OptionError(f"unknown tokenizer kind {kind!r}; expected one of {TOKENIZER_KINDS}")
    texts = corpus(seed=seed) if texts is None else list(texts)
    if vocab_size is None:
        vocab_size = 800 if kind in ("gpt2", "bart") else 500
    if kind == "gpt2":
        eot = "<|endoftext|>"
        tk = _byte_level(vocab_size, [eot], texts)
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
        return _wrap(tk, bos_token=eot, eos_token=eot, unk_token=eot)
    if kind == "llama":
        tk = _sentencepiece_bpe(vocab_size, ["<unk>", "<s>", "</s>"], texts)
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", 1)]
        )
        return _wrap(tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if kind in ("t5", "marian"):
        specials = ["<pad>", "</s>", "<unk>"] if kind == "t5" else ["</s>", "<unk>"]
        tk = _sentencepiece_bpe(vocab_size - (kind == "marian"), specials, texts)
        if kind == "marian":
            tk.add_special_tokens([AddedToken("<pad>", special=True)])
        tk.post_processor = processors.TemplateProcessing(
            single="$A </s>",
            pair="$A </s> $B:1 </s>:1",
            special_tokens=[("</s>", tk.token_to_id("</s>"))],
        )
        return _wrap(tk, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    if kind == "bart":
        tk = _byte_level(vocab_size - 1, ["<s>", "<pad>", "</s>", "<unk>"], texts)
        tk.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>",
            pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", 0), ("</s>", 2)],
        )
        return _wrap(
            tk,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            cls_token="<s>",
            sep_token="</s>",
            mask_token="<mask>",
        )
    # wordpiece
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = _wordpiece_vocab(vocab_size, specials, texts)
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece(prefix="##")
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return _wrap(
        tk,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


@functools.cache
def _cached_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    return train_tokenizer(kind)


def _tokenizer_for(arch: str) -> PreTrainedTokenizerFast:
    # A deep copy, so that callers may mutate their tokenizer (padding side, pad token...).
    return copy.deepcopy(_cached_tokenizer(_TOKENIZER_OF.get(arch, arch)))


# the tokenizer kind of the architectures that share another's
_TOKENIZER_OF = {"gemma3": "llama", "gpt_neo": "gpt2"}


# arch -> (config class, model class, config defaults); token ids are filled in from the tokenizer.
_TINY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_embd=32, n_layer=2, n_head=2, n_positions=64, initializer_range=0.3),
    ),
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3,
            tie_word_embeddings=False,
        ),
    ),
    # TinyStories' architecture: a global layer, then a local one (a 4-token window here),
    # unscaled attention scores
    "gpt_neo": (
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        dict(
            hidden_size=32, num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]],
            window_size=4, max_position_embeddings=64, initializer_range=0.3,
        ),
    ),
    # norms after attention and MLP as well as before, query and key norms, a local layer
    # (sliding window, its own RoPE base) and a global one; Gemma's norms scale by 1 + weight
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, initializer_range=0.3,
            layer_types=["sliding_attention", "full_attention"], sliding_window=16,
        ),
    ),
    "marian": ("MarianConfig", "MarianMTModel", dict(scale_embedding=True)),
    "bart": ("BartConfig", "BartForConditionalGeneration", {}),
    "t5": (
        "T5Config",
        "T5ForConditionalGeneration",
        dict(
            d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, initializer_factor=1.3,
            relative_attention_num_buckets=8, relative_attention_max_distance=32,
        ),
    ),
}  # fmt: skip
_BART_LIKE = dict(
    d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
    decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
    max_position_embeddings=64, init_std=0.3,
)  # fmt: skip


def _config(arch: str, tok: PreTrainedTokenizerFast, overrides: dict[str, Any]) -> PretrainedConfig:
    config_cls, _, defaults = _TINY[arch]
    pad, eos, bos = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    kw: dict[str, Any] = dict(vocab_size=len(tok), pad_token_id=pad, eos_token_id=eos)
    if arch in ("gpt2", "gpt_neo", "llama", "gemma3"):
        kw.update(bos_token_id=bos)
    elif arch == "t5":
        kw.update(decoder_start_token_id=pad)
    else:
        kw.update(_BART_LIKE, forced_eos_token_id=eos)
        # Marian starts decoding with <pad>, BART with </s>.
        kw.update(decoder_start_token_id=pad if arch == "marian" else eos, bos_token_id=bos)
    return getattr(transformers, config_cls)(**{**kw, **defaults, **overrides})


def tiny_model(
    arch: str, seed: int = 0, **config_overrides: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build a tiny randomly initialised ``(model, tokenizer)`` pair, offline and deterministic.

    ``arch`` is one of ``"gpt2"``, ``"gpt_neo"``, ``"llama"``, ``"gemma3"`` (causal LMs; GPT-Neo
    with GPT-2's tokenizer, Gemma 3 with Llama's) or ``"marian"``, ``"bart"``, ``"t5"`` (encoder-decoders). The model is float32, in eval mode, uses eager attention unless
    ``attn_implementation=`` says otherwise, and has weights initialised with a large scale so
    that its next-token distributions are far from uniform. Other keyword arguments override
    the config. Tokenizers are trained once per process and cached; each call returns a fresh
    copy of the tokenizer.
    """
    if arch not in _TINY:
        raise OptionError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    attn = config_overrides.pop("attn_implementation", "eager")
    tok = _tokenizer_for(arch)
    config = _config(arch, tok, config_overrides)
    config._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, _TINY[arch][1])(config)
        if hasattr(model, "final_logits_bias"):  # Marian, BART: non-zero, as in real checkpoints
            with torch.no_grad():
                model.final_logits_bias.normal_(std=0.5)
    model.generation_config.pad_token_id = config.pad_token_id
    return model.float().eval(), tok


# arch -> (tokenizer kind, config class, config defaults) of the tiny classifiers
_CLASSIFIERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "bert": (
        "wordpiece",
        "BertConfig",
        dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, type_vocab_size=2, initializer_range=0.3,
        ),
    ),
    "distilbert": (
        "wordpiece",
        "DistilBertConfig",
        dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64,
             initializer_range=0.3),
    ),
    "roberta": (
        "bart",
        "RobertaConfig",
        dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=80, type_vocab_size=1, initializer_range=0.3,
        ),
    ),
    "xlm-roberta": (
        "bart",
        "XLMRobertaConfig",
        dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=80, type_vocab_size=1, initializer_range=0.3,
        ),
    ),
    # transformers' copy of RoBERTa's classes under its own model type
    "camembert": (
        "bart",
        "CamembertConfig",
        dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=80, type_vocab_size=1, initializer_range=0.3,
        ),
    ),
    # DeBERTa-v3 style: relative positions only (no absolute ones), no segment embeddings
    "deberta-v2": (
        "wordpiece",
        "DebertaV2Config",
        dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, type_vocab_size=0, initializer_range=0.3,
            relative_attention=True, position_buckets=16, max_relative_positions=-1,
            pos_att_type=["p2c", "c2p"], position_biased_input=False,
        ),
    ),
    "electra": (
        "wordpiece",
        "ElectraConfig",
        dict(
            embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
            initializer_range=0.3,
        ),
    ),
    # alternating global and sliding-window (8 tokens) attention, as in ModernBERT
    "modernbert": (
        "wordpiece",
        "ModernBertConfig",
        dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, global_attn_every_n_layers=2, local_attention=8,
            initializer_range=0.3, cls_token_id=2, sep_token_id=3,
        ),
    ),
    "gpt2": ("gpt2", "GPT2Config", _TINY["gpt2"][2]),
    "llama": ("llama", "LlamaConfig", _TINY["llama"][2]),
    "qwen2": ("llama", "Qwen2Config", _TINY["llama"][2]),
    # encoder-decoders that read their decoder at the last EOS (BART-MNLI's head); mBART's
    # tokenizer ends each input with a language id after EOS, its decoder's first token
    "bart": ("bart", "BartConfig", _BART_LIKE),
    "mbart": ("bart", "MBartConfig", _BART_LIKE),
    "t5": ("t5", "T5Config", _TINY["t5"][2]),
}  # fmt: skip
SEQ2SEQ_CLASSIFIER_ARCHS = ("bart", "mbart", "t5")
CLASSIFIER_ARCHS = tuple(_CLASSIFIERS)
_HEADS = {
    "sequence": "ForSequenceClassification",
    "token": "ForTokenClassification",
    "question-answering": "ForQuestionAnswering",
    "fill-mask": "ForMaskedLM",
}
_CLASSIFIER_NAMES = {
    "bert": "Bert", "distilbert": "DistilBert", "roberta": "Roberta", "gpt2": "GPT2",
    "xlm-roberta": "XLMRoberta", "camembert": "Camembert", "deberta-v2": "DebertaV2",
    "electra": "Electra",
    "modernbert": "ModernBert", "llama": "Llama", "qwen2": "Qwen2", "bart": "Bart",
    "mbart": "MBart", "t5": "T5",
}  # fmt: skip


def tiny_classifier(
    arch: str, task: str = "sequence", num_labels: int = 3, seed: int = 0, **config_overrides: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny randomly initialised classifier ``(model, tokenizer)``, offline and deterministic.

    ``arch`` is one of :data:`CLASSIFIER_ARCHS`: encoders (``bert``, ``distilbert``, ``roberta``,
    ``xlm-roberta``, ``camembert``, ``deberta-v2``, ``electra``, ``modernbert``), decoder-only
    heads that pool their last real token (``gpt2``, ``llama``, ``qwen2``) and encoder-decoders
    whose decoder reads the input again (``bart``, ``mbart``, ``t5``: :data:`SEQ2SEQ_CLASSIFIER_ARCHS`,
    sequence classifiers, read at the last EOS, and question answering only; mBART's tokenizer
    ends each input with ``</s> en_XX``); ``task`` is
    ``"sequence"`` (``*ForSequenceClassification``), ``"token"`` (``*ForTokenClassification``)
    , ``"question-answering"`` (``*ForQuestionAnswering``: start and end logits per token, so
    ``num_labels`` is 2) or ``"fill-mask"`` (``*ForMaskedLM``, encoders only: the vocabulary's
    logits per token). Labels are named ``label_0``, ``label_1``, ...

    >>> model, tok = tiny_classifier("bert", num_labels=2)
    >>> type(model).__name__, model.config.id2label[1]
    ('BertForSequenceClassification', 'label_1')
    """
    if (
        arch not in _CLASSIFIERS
        or task not in _HEADS
        or (
            task == "fill-mask"
            and not hasattr(transformers, _CLASSIFIER_NAMES[arch] + _HEADS[task])
        )
        or (arch in SEQ2SEQ_CLASSIFIER_ARCHS and task not in ("sequence", "question-answering"))
    ):
        raise OptionError(
            f"unknown classifier {arch!r}/{task!r}; expected an arch of {CLASSIFIER_ARCHS} and a "
            f"task of {tuple(_HEADS)} (fill-mask: encoders only; {SEQ2SEQ_CLASSIFIER_ARCHS}: "
            "sequence and question-answering only)"
        )
    kind, config_cls, defaults = _CLASSIFIERS[arch]
    attn = config_overrides.pop("attn_implementation", "eager")
    tok = _tokenizer_for(kind)
    if kind == "wordpiece":  # BERT-style tokenizers return the segment of each token
        tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
        tok.init_kwargs["model_input_names"] = tok.model_input_names  # saved with it
    if tok.pad_token is None:  # decoder-only classifiers pad with EOS, as fine-tuning recipes do
        tok.pad_token = tok.eos_token
    if arch == "mbart":  # `text </s> en_XX`, as mBART's tokenizer with src_lang="en_XX"
        tok.add_special_tokens({"additional_special_tokens": ["en_XX"]})
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="$A </s> en_XX",
            pair="$A $B:1 </s>:1 en_XX:1",
            special_tokens=[
                ("</s>", tok.eos_token_id),
                ("en_XX", tok.convert_tokens_to_ids("en_XX")),
            ],
        )
    if task == "question-answering":
        num_labels = 2  # a start and an end logit per token
    labels = {i: f"label_{i}" for i in range(num_labels)}
    kw: dict[str, Any] = dict(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, num_labels=num_labels,
        id2label=labels, label2id={v: k for k, v in labels.items()},
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    if arch in SEQ2SEQ_CLASSIFIER_ARCHS:  # BART's decoder starts with </s>, T5's with <pad>
        start = tok.pad_token_id if arch == "t5" else tok.eos_token_id
        kw.update(decoder_start_token_id=start)
    config = getattr(transformers, config_cls)(**{**kw, **defaults, **config_overrides})
    config._attn_implementation = attn
    head = _HEADS[task]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, _CLASSIFIER_NAMES[arch] + head)(config)
    return model.float().eval(), tok


def save_tiny_model(arch: str, path: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save ``tiny_model(arch, seed, **overrides)`` (model and tokenizer) into directory ``path``.

    The result loads back offline with ``AutoModelForCausalLM`` / ``AutoModelForSeq2SeqLM``
    and ``AutoTokenizer`` ``.from_pretrained(path)``.
    """
    path = Path(path)
    model, tok = tiny_model(arch, seed, **overrides)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
