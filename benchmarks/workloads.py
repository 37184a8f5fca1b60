"""Offline workloads: random-weight GPT-2 / Marian models, locally trained tokenizers, exact texts.

Nothing here touches a model hub. :func:`build_all` writes two ``save_pretrained`` folders under
``benchmarks/results/models`` (or ``$ATTRAX_BENCH_MODELS``): ``gpt2`` (GPT2LMHeadModel, n_embd 256,
4 layers, 4 heads, vocab 50257, byte-level BPE that adds no special tokens) and ``marian``
(MarianMTModel, d_model 256, 4+4 layers, vocab 8000, Metaspace BPE appending ``</s>``). Every
library loads the same folders. The workload sizes (W1, W2, W3) and how each library runs them
are the :class:`Plan` of :func:`plans`; their meaning is in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

DEFAULT_ROOT = Path(__file__).resolve().parent / "results" / "models"
GPT2_SPEC = dict(
    n_embd=256, n_layer=4, n_head=4, vocab_size=50257, n_positions=1280, tok_vocab=8192
)
MARIAN_SPEC = dict(d_model=256, layers=4, heads=4, ffn=1024, vocab_size=8000, max_positions=512)
CORE_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "attention")
# Captum's GradientShap, NoiseTunnel (smoothgrad_sq, vargrad), FeatureAblation and
# ShapleyValueSampling; run with --methods (a default run measures CORE_METHODS)
NOISE_METHODS = ("gradient_shap", "squaregrad", "vargrad", "feature_ablation", "shapley_sampling")
PERTURBATION_METHODS = ("feature_ablation", "shapley_sampling")
METHODS = CORE_METHODS + NOISE_METHODS
IG_STEPS = 50
IG_QUADRATURE = "gausslegendre"  # Captum's and Inseq's default
# the models' weights, tokenizers and texts, and the draws both sides share: attrax's documented
# seeding rules, rebuilt on Captum's side
SEED = 0
NOISE_SAMPLES = 8  # GradientShap n_samples, NoiseTunnel nt_samples
NOISE_LEVEL = 0.1  # SmoothGrad's: stdev = NOISE_LEVEL * (max - min) of the example's embeddings
SHAP_STDEVS = 0.01  # GradientShap's absolute input noise
PERMUTATIONS = 4  # ShapleyValueSampling n_samples


# --------------------------------------------------------------------------------------------------
# Plans: sizes, and how each library runs a workload
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Plan:
    """One workload: sizes, and how each library runs it."""

    name: str
    kind: str  # gpt2 | marian
    n_prompt: int
    n_target: int
    # Captum/Inseq run only the first k targets (None: all) and are extrapolated by n_target / k
    baseline_targets: dict[str, int | None]
    # attrax runs only the first k targets (None: all); W3 IG, the same k as the baselines
    attrax_targets: dict[str, int | None]
    chunk_size: int | None = None  # attrax chunk_size (targets per vectorized backward)
    batch_size: int | None = None  # attrax IG batch_size (interpolation points per forward)
    internal_batch_size: int | None = None  # Captum/Inseq IG internal_batch_size
    steps: int = IG_STEPS  # IG quadrature points, the same for every library
    attn_implementation: str = "auto"  # attrax's attention ("auto": its own choice per call)


def plans(quick: bool = False, device: str = "cpu") -> dict[str, Plan]:
    """W1, W2, W3 for a full or ``quick`` run; on a GPU the baselines run W3 in full (IG: 16)."""
    none = dict.fromkeys(METHODS)
    if quick:  # a smoke run: every code path, small sizes, 16 IG steps
        w3_base = dict.fromkeys(METHODS, 2) | {"integrated_gradients": 1, "attention": None}
        w3 = Plan("W3", "gpt2", 192, 8, w3_base, none | {"integrated_gradients": 1}, 4, 8, 8, 16)
        return {
            "W1": Plan("W1", "gpt2", 16, 8, none, none, steps=16),
            "W2": Plan("W2", "marian", 16, 8, none, none, steps=16),
            "W3": w3,
        }
    if (
        device == "cpu"
    ):  # attention is one forward in Inseq too (not a per-target loop): all targets
        w3_base = dict.fromkeys(METHODS, 8) | {"integrated_gradients": 2, "attention": None}
        w3 = Plan("W3", "gpt2", 1024, 128, w3_base, none | {"integrated_gradients": 2}, 8, 10, 10)
    else:
        ig16 = none | {"integrated_gradients": 16}
        w3 = Plan("W3", "gpt2", 1024, 128, ig16, ig16, 32, 25, 25)
    return {
        "W1": Plan("W1", "gpt2", 32, 32, none, none),
        "W2": Plan("W2", "marian", 32, 32, none, none),
        "W3": w3,
    }


# --------------------------------------------------------------------------------------------------
# Synthetic pseudo-English
# --------------------------------------------------------------------------------------------------
# fmt: off
_ONSETS = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "br",
           "ch", "cl", "dr", "gr", "pl", "pr", "sh", "st", "str", "th", "tr"]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ou", "oo", "y"]
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck", "rt"]
# fmt: on


def _lexicon(rng: random.Random, size: int = 4000) -> list[str]:
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < size:
        n_syl = rng.choices([1, 2, 3, 4], weights=[30, 40, 22, 8])[0]
        w = "".join(
            rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(n_syl)
        )
        if w not in seen and 1 < len(w) < 16:
            seen.add(w)
            words.append(w)
    return words


def word_stream(seed: int) -> Iterator[str]:
    """Endless deterministic pieces (``Word``, ``word``, ``word,``, ``word.``) from one lexicon."""
    lex = _lexicon(random.Random(SEED))
    weights = [1.0 / (r + 1) ** 1.05 for r in range(len(lex))]  # Zipf-like
    rng = random.Random(seed)
    start = True
    while True:
        sent_len = rng.randint(5, 18)
        for i, w in enumerate(rng.choices(lex, weights=weights, k=sent_len)):
            if rng.random() < 0.03:
                w = str(rng.randint(0, 2099))
            if start or i == 0:
                w = w[:1].upper() + w[1:]
            start = False
            if i == sent_len - 1:
                w += "." if rng.random() < 0.85 else "?"
            elif rng.random() < 0.07:
                w += ","
            yield w


def corpus(seed: int, n_words: int) -> list[str]:
    """``n_words`` pieces as lines of whole sentences (tokenizer training text)."""
    it = word_stream(seed)
    lines, line = [], []
    for _ in range(n_words):
        line.append(next(it))
        if len(line) >= 40 and line[-1].endswith((".", "?")):
            lines.append(" ".join(line))
            line = []
    return [*lines, " ".join(line)] if line else lines


# --------------------------------------------------------------------------------------------------
# Tokenizers and models
# --------------------------------------------------------------------------------------------------
def train_tokenizer(kind: str, seed: int):
    """GPT-2-style byte-level BPE (``<|endoftext|>`` = bos = eos = unk, nothing added), or a
    SentencePiece-style Metaspace BPE appending ``</s>`` (ids: ``</s>`` 0, ``<unk>`` 1, ``<pad>`` 2).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "gpt2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=GPT2_SPEC["tok_vocab"],
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(corpus(seed, 400_000), trainer=trainer)
        eot = "<|endoftext|>"
        special = dict(bos_token=eot, eos_token=eot, unk_token=eot)
        max_len = GPT2_SPEC["n_positions"]
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.BpeTrainer(
            vocab_size=MARIAN_SPEC["vocab_size"],
            special_tokens=["</s>", "<unk>", "<pad>"],
            show_progress=False,
        )
        tok.train_from_iterator(corpus(seed, 400_000), trainer=trainer)
        eos = tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", eos)]
        )
        special = dict(eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
        max_len = MARIAN_SPEC["max_positions"]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=max_len,
        clean_up_tokenization_spaces=False,
        **special,
    )


def build_model(kind: str, out: Path) -> Path:
    """Train the tokenizer, build the random-weight model (seed 1234) and save both to ``out``.

    Marian keeps ``scale_embedding=False`` (MarianConfig's default): with True, Inseq 0.7 under
    transformers 5.x scales decoder embeddings twice (see benchmarks/README.md).
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, MarianConfig, MarianMTModel

    if kind == "gpt2":
        tok = train_tokenizer("gpt2", SEED)
        eot = tok.convert_tokens_to_ids("<|endoftext|>")
        s = GPT2_SPEC
        cfg = GPT2Config(
            vocab_size=s["vocab_size"], n_positions=s["n_positions"], n_embd=s["n_embd"],
            n_layer=s["n_layer"], n_head=s["n_head"], bos_token_id=eot, eos_token_id=eot,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        cls = GPT2LMHeadModel
    else:
        tok = train_tokenizer("marian", SEED + 1)
        s = MARIAN_SPEC
        assert len(tok) <= s["vocab_size"], len(tok)
        eos, pad = tok.eos_token_id, tok.pad_token_id
        cfg = MarianConfig(
            vocab_size=s["vocab_size"], decoder_vocab_size=s["vocab_size"], d_model=s["d_model"],
            encoder_layers=s["layers"], decoder_layers=s["layers"],
            encoder_attention_heads=s["heads"], decoder_attention_heads=s["heads"],
            encoder_ffn_dim=s["ffn"], decoder_ffn_dim=s["ffn"],
            max_position_embeddings=s["max_positions"], pad_token_id=pad, eos_token_id=eos,
            forced_eos_token_id=eos, decoder_start_token_id=pad, scale_embedding=False,
            share_encoder_decoder_embeddings=True, tie_word_embeddings=True, dropout=0.0,
            attention_dropout=0.0, activation_dropout=0.0,
        )  # fmt: skip
        cls = MarianMTModel
    torch.manual_seed(SEED)
    out.mkdir(parents=True, exist_ok=True)
    cls(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    (out / ".complete").write_text(json.dumps({"kind": kind, "seed": SEED}) + "\n")
    return out


def build_all(root: str | os.PathLike | None = None, force: bool = False) -> dict[str, Path]:
    """Build (or reuse: a ``.complete`` marker) ``root/gpt2`` and ``root/marian``; their paths."""
    env = os.environ.get("ATTRAX_BENCH_MODELS")
    base = Path(root) if root is not None else Path(env) if env else DEFAULT_ROOT
    paths = {"gpt2": base / "gpt2", "marian": base / "marian"}
    for kind, path in paths.items():
        if force or not (path / ".complete").exists():
            build_model(kind, path)
    return paths


def load(kind: str, root: str | os.PathLike | None = None, **model_kwargs):
    """``(model, tokenizer)`` of ``kind`` ("gpt2" | "marian"): eval, float32, CPU, eager attention."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = build_all(root)[kind]
    model_kwargs.setdefault("attn_implementation", "eager")
    cls = AutoModelForCausalLM if kind == "gpt2" else AutoModelForSeq2SeqLM
    return cls.from_pretrained(path, **model_kwargs).eval(), AutoTokenizer.from_pretrained(path)


def from_config(
    config_class: str,
    config: dict,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
    pad: bool = True,
):
    """``(model, tokenizer)``: a ``transformers`` causal LM (GPT-2 or Llama) built from
    ``config_class(**config)`` with random weights (``seed``) on ``device`` in ``dtype``, eager
    attention, on W1's tokenizer (its ids are below every vocabulary here). ``pad``: the
    tokenizer's end of text as the pad token too (it zeroes that token's embedding row)."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_all()["gpt2"])  # not W1's weights
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    ids = dict(bos_token_id=eot, eos_token_id=eot, **({"pad_token_id": eot} if pad else {}))
    made = getattr(transformers, config_class)(**config, **ids)
    made._attn_implementation = "eager"
    model_class = "GPT2LMHeadModel" if config_class == "GPT2Config" else "LlamaForCausalLM"
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = getattr(transformers, model_class)._from_config(made, dtype=getattr(torch, dtype))
    return model.eval(), tok


# --------------------------------------------------------------------------------------------------
# Exact-length texts
# --------------------------------------------------------------------------------------------------
def _exact(tok, stream: Iterator[str], n: int, leading_space: bool) -> str:
    """Join space-separated pieces until the text is exactly ``n`` tokens (no special tokens)."""
    parts: list[str] = []
    count = skipped = 0
    while count < n:
        text = (" " if (parts or leading_space) else "") + next(stream)
        c = len(tok(text, add_special_tokens=False)["input_ids"])
        if count + c <= n:
            parts.append(text)
            count += c
        else:
            skipped += 1
            if skipped > 10_000:
                raise RuntimeError(f"could not reach exactly {n} tokens")
    return "".join(parts)


def texts(kind: str, tok, n_prompt: int, n_target: int) -> tuple[str, str]:
    """``(prompt, target)`` of exactly ``n_prompt`` / ``n_target`` tokens.

    gpt2: ``target`` starts with a space and tokenizes as a continuation of ``prompt`` (Inseq
    tokenizes ``prompt`` and ``prompt + target`` separately). marian: the counts include the
    appended ``</s>``; the targets are the decoder tokens after the start token.
    """
    if kind == "gpt2":
        stream = word_stream(7)
        prompt = _exact(tok, stream, n_prompt, leading_space=False)
        target = _exact(tok, stream, n_target, leading_space=True)
        p, t, full = (tok(s)["input_ids"] for s in (prompt, target, prompt + target))
        assert len(p) == n_prompt and len(t) == n_target, (len(p), len(t))
        assert full == p + t, "target does not tokenize as a continuation of the prompt"
        return prompt, target
    eos, stream = tok.eos_token_id, word_stream(11)
    prompt = _exact(tok, stream, n_prompt - 1, leading_space=False)
    target = _exact(tok, stream, n_target - 1, leading_space=False)
    for text, n in ((prompt, n_prompt), (target, n_target)):
        ids = tok(text)["input_ids"]
        assert len(ids) == n and ids[-1] == eos and eos not in ids[:-1], (len(ids), n)
    assert tok(text_target=target)["input_ids"] == tok(target)["input_ids"]  # Inseq's target path
    return prompt, target


def other_prompt(kind: str, tok, n_prompt: int) -> str:
    """A prompt of the same ``n_prompt`` tokens as :func:`texts`' (``</s>`` included for marian)
    from other words: a corrupted input for attribution patching."""
    n = n_prompt if kind == "gpt2" else n_prompt - 1
    return _exact(tok, word_stream(13), n, leading_space=False)


def first_targets_text(tok, prompt: str, target: str, k: int | None, kind: str) -> str:
    """The text of the first ``k`` target tokens (decoder-only), checked to tokenize as such."""
    if k is None:
        return target
    if kind != "gpt2":
        raise ValueError("target subsets are implemented for decoder-only workloads only")
    ids = tok(target, add_special_tokens=False)["input_ids"]
    if k >= len(ids):
        return target
    text = tok.decode(ids[:k])
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    if tok(prompt + text, add_special_tokens=False)["input_ids"] != p + ids[:k]:
        raise RuntimeError(f"the first {k} target tokens do not round-trip through decode")
    return text


# --------------------------------------------------------------------------------------------------
# Classifiers (C1, C2): a BERT-shaped encoder with a 2-class and a 20-class head
# --------------------------------------------------------------------------------------------------
BERT_SPEC = dict(
    hidden=256, layers=4, heads=4, ffn=1024, vocab_size=30522, max_positions=512, lexicon=40_000
)
CLASSIFIERS = {"bert2": 2, "bert20": 20}  # folder -> classes; both share one encoder
CLASSIFIER_TEXTS = (16, 48)  # texts x tokens ([CLS] and [SEP] included)


def _bert_corpus(n_words: int) -> Iterator[str]:
    """Lines of pseudo-English from a lexicon large enough for a 30k WordPiece vocabulary."""
    lex = _lexicon(random.Random(SEED + 2), BERT_SPEC["lexicon"])
    weights = [1.0 / (r + 1) ** 0.9 for r in range(len(lex))]
    rng = random.Random(SEED + 3)
    for _ in range(n_words // 40):
        yield " ".join(rng.choices(lex, weights=weights, k=40)) + "."


def train_wordpiece(vocab_size: int = BERT_SPEC["vocab_size"]):
    """A lower-casing BERT WordPiece tokenizer (``[PAD]`` 0, ``[UNK]`` 1, ``[CLS]`` 2, ``[SEP]``
    3, ``[MASK]`` 4) trained on :func:`_bert_corpus`; ``[CLS] a [SEP] (b [SEP])``."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False
    )
    # the benchmark texts (word_stream) bring punctuation and numbers
    tok.train_from_iterator([*_bert_corpus(600_000), *corpus(SEED, 100_000)], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )  # fmt: skip
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=BERT_SPEC["max_positions"], unk_token="[UNK]",
        pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )  # fmt: skip
    return wrapped


def build_classifiers(
    root: str | os.PathLike | None = None, force: bool = False
) -> dict[str, Path]:
    """Build (or reuse) ``root/bert2`` and ``root/bert20``: ``BertForSequenceClassification``
    (hidden 256, 4 layers, 4 heads, vocab 30522, seed 1234) sharing one encoder, with a 2-class and
    a 20-class head, and the WordPiece tokenizer of :func:`train_wordpiece`."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    env = os.environ.get("ATTRAX_BENCH_MODELS")
    base = Path(root) if root is not None else Path(env) if env else DEFAULT_ROOT
    paths = {name: base / name for name in CLASSIFIERS}
    if not force and all((p / ".complete").exists() for p in paths.values()):
        return paths
    tok = train_wordpiece()
    s, encoder = BERT_SPEC, None
    for name, classes in CLASSIFIERS.items():
        labels = {i: f"class_{i}" for i in range(classes)}
        cfg = BertConfig(
            vocab_size=s["vocab_size"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"], intermediate_size=s["ffn"],
            max_position_embeddings=s["max_positions"], type_vocab_size=2, pad_token_id=0,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
            num_labels=classes, id2label=labels, label2id={v: k for k, v in labels.items()},
        )  # fmt: skip
        torch.manual_seed(SEED + classes)
        model = BertForSequenceClassification(cfg).eval()
        if encoder is None:
            encoder = model.bert.state_dict()
        model.bert.load_state_dict(encoder)
        paths[name].mkdir(parents=True, exist_ok=True)
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
        (paths[name] / ".complete").write_text(json.dumps({"kind": name, "seed": SEED}) + "\n")
    return paths


def load_classifier(name: str, root: str | os.PathLike | None = None, **model_kwargs):
    """``(model, tokenizer)`` of ``name`` ("bert2" | "bert20"): eval, float32, CPU, eager."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = build_classifiers(root)[name]
    model_kwargs.setdefault("attn_implementation", "eager")
    model = AutoModelForSequenceClassification.from_pretrained(path, **model_kwargs).eval()
    return model, AutoTokenizer.from_pretrained(path)


def classifier_texts(tok, n: int = CLASSIFIER_TEXTS[0], length: int = CLASSIFIER_TEXTS[1]):
    """``n`` texts of exactly ``length`` tokens each, ``[CLS]`` and ``[SEP]`` included."""
    stream = word_stream(13)
    out = [_exact(tok, stream, length - 2, leading_space=False) for _ in range(n)]
    assert all(len(tok(t)["input_ids"]) == length for t in out)
    return out
