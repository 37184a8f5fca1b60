"""Offline benchmark workloads: random-weight GPT-2 / Marian models and locally trained tokenizers.

Nothing here touches a model hub.  ``build_all(root)`` writes two ``save_pretrained`` folders::

    root/gpt2/     GPT2LMHeadModel  (n_embd 256, 4 layers, 4 heads, vocab 50257, n_positions 1280)
                   + byte-level BPE tokenizer (GPT-2 style, no BOS added, ``<|endoftext|>`` special)
    root/marian/   MarianMTModel    (d_model 256, 4+4 layers, 4 heads, vocab 8000)
                   + Metaspace/BPE tokenizer (SentencePiece style, ``</s>`` appended, ``<pad>`` = decoder start)

Both Captum/Inseq (``benchmarks/_baselines.py``) and attrax load the same folders with
``AutoModelFor{CausalLM,Seq2SeqLM}.from_pretrained`` / ``AutoTokenizer.from_pretrained``.

Workloads (see ``workload()``):

* ``W1``: GPT-2, 32-token prompt + 32-token forced continuation.
* ``W2``: Marian, 32-token source -> 32-token target.  Counts include the ``</s>`` the tokenizer
  appends, i.e. 31 text tokens + ``</s>`` on each side; the 32 decoder targets are the tokens after
  the decoder start token, the last one being ``</s>``.
* ``W3``: GPT-2, 1024-token prompt + 128-token forced continuation.

For decoder-only workloads the continuation is checked to tokenize as a continuation:
``ids(prompt + target) == ids(prompt) + ids(target)`` (Inseq tokenizes ``prompt`` and
``prompt + target`` separately, attrax may tokenize them separately too).

Run ``python benchmarks/_models.py [ROOT]`` to (re)build and print a summary; building is
idempotent (an existing folder with a ``.complete`` marker is reused).
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SEED = 1234
DEFAULT_ROOT = Path(__file__).resolve().parent / "results" / "models"

GPT2_SPEC = dict(
    n_embd=256, n_layer=4, n_head=4, vocab_size=50257, n_positions=1280, tokenizer_vocab=8192
)
MARIAN_SPEC = dict(d_model=256, layers=4, heads=4, ffn=1024, vocab_size=8000, max_positions=512)

# W1/W2/W3: (model kind, prompt tokens, target tokens)
WORKLOADS: dict[str, tuple[str, int, int]] = {
    "W1": ("gpt2", 32, 32),
    "W2": ("marian", 32, 32),
    "W3": ("gpt2", 1024, 128),
}


def models_root(root: str | os.PathLike | None = None) -> Path:
    """Where the workload models live: ``root``, else $ATTRAX_BENCH_MODELS, else benchmarks/results/models."""
    if root is not None:
        return Path(root)
    env = os.environ.get("ATTRAX_BENCH_MODELS")
    return Path(env) if env else DEFAULT_ROOT


# --------------------------------------------------------------------------------------------------
# Synthetic text
# --------------------------------------------------------------------------------------------------
_ONSETS = [
    "",
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "br",
    "ch",
    "cl",
    "dr",
    "gr",
    "pl",
    "pr",
    "sh",
    "st",
    "str",
    "th",
    "tr",
]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ou", "oo", "y"]
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck", "rt"]


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
    """Endless deterministic stream of pseudo-English "pieces": ``Word``, ``word``, ``word,``, ``word.``.

    Pieces are joined with single spaces.  Numbers appear now and then.  The lexicon is the same for
    every seed (it is drawn from ``SEED``); ``seed`` only changes the word sequence.
    """
    lex = _lexicon(random.Random(SEED))
    weights = [1.0 / (r + 1) ** 1.05 for r in range(len(lex))]  # Zipf-like
    rng = random.Random(seed)
    start = True
    while True:
        sent_len = rng.randint(5, 18)
        words = rng.choices(lex, weights=weights, k=sent_len)
        for i, w in enumerate(words):
            if rng.random() < 0.03:
                w = str(rng.randint(0, 2099))
            if start or (i == 0):
                w = w[:1].upper() + w[1:]
            start = False
            if i == sent_len - 1:
                w += "." if rng.random() < 0.85 else "?"
            elif rng.random() < 0.07:
                w += ","
            yield w


def corpus(seed: int, n_words: int) -> list[str]:
    """``n_words`` pieces per line-ish chunk, as a list of lines (for tokenizer training)."""
    it = word_stream(seed)
    lines, line = [], []
    for _ in range(n_words):
        line.append(next(it))
        if len(line) >= 40 and line[-1].endswith((".", "?")):
            lines.append(" ".join(line))
            line = []
    if line:
        lines.append(" ".join(line))
    return lines


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------
def train_gpt2_tokenizer(vocab_size: int = GPT2_SPEC["tokenizer_vocab"], seed: int = SEED):
    """Byte-level BPE like GPT-2's: no BOS/EOS added, ``<|endoftext|>`` is bos=eos=unk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed, 400_000), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=GPT2_SPEC["n_positions"],
        clean_up_tokenization_spaces=False,
    )


def train_marian_tokenizer(vocab_size: int = MARIAN_SPEC["vocab_size"], seed: int = SEED + 1):
    """SentencePiece-style (Metaspace ``▁``) BPE; ``</s>`` appended to every encoded text.

    Special ids: ``</s>`` = 0 (eos), ``<unk>`` = 1, ``<pad>`` = 2 (also the decoder start token).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["</s>", "<unk>", "<pad>"], show_progress=False
    )
    tok.train_from_iterator(corpus(seed, 400_000), trainer=trainer)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=MARIAN_SPEC["max_positions"],
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
def build_gpt2(out: Path, seed: int = SEED) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = train_gpt2_tokenizer(seed=seed)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = GPT2Config(
        vocab_size=GPT2_SPEC["vocab_size"],
        n_positions=GPT2_SPEC["n_positions"],
        n_embd=GPT2_SPEC["n_embd"],
        n_layer=GPT2_SPEC["n_layer"],
        n_head=GPT2_SPEC["n_head"],
        bos_token_id=eot,
        eos_token_id=eot,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).eval()
    _save(model, tok, out, kind="gpt2")
    return out


def build_marian(out: Path, seed: int = SEED, scale_embedding: bool = False) -> Path:
    """Marian-shaped encoder-decoder.

    ``scale_embedding`` defaults to False (MarianConfig's own default).  With True, Inseq 0.7 under
    transformers 5.x computes a different model than ``model(input_ids=...)``: Inseq multiplies both
    encoder and decoder embeddings by ``embed_scale`` and passes them as ``*inputs_embeds``, and
    transformers 5's MarianDecoder multiplies ``inputs_embeds`` by ``embed_scale`` again.
    """
    import torch
    from transformers import MarianConfig, MarianMTModel

    tok = train_marian_tokenizer(seed=seed + 1)
    assert len(tok) <= MARIAN_SPEC["vocab_size"], len(tok)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    cfg = MarianConfig(
        vocab_size=MARIAN_SPEC["vocab_size"],
        decoder_vocab_size=MARIAN_SPEC["vocab_size"],
        d_model=MARIAN_SPEC["d_model"],
        encoder_layers=MARIAN_SPEC["layers"],
        decoder_layers=MARIAN_SPEC["layers"],
        encoder_attention_heads=MARIAN_SPEC["heads"],
        decoder_attention_heads=MARIAN_SPEC["heads"],
        encoder_ffn_dim=MARIAN_SPEC["ffn"],
        decoder_ffn_dim=MARIAN_SPEC["ffn"],
        max_position_embeddings=MARIAN_SPEC["max_positions"],
        pad_token_id=pad,
        eos_token_id=eos,
        forced_eos_token_id=eos,
        decoder_start_token_id=pad,
        scale_embedding=scale_embedding,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    torch.manual_seed(seed)
    model = MarianMTModel(cfg).eval()
    _save(model, tok, out, kind="marian")
    return out


def _save(model, tok, out: Path, kind: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / ".complete").write_text(json.dumps({"kind": kind, "seed": SEED}) + "\n")


def build_all(root: str | os.PathLike | None = None, force: bool = False) -> dict[str, Path]:
    """Build (or reuse) ``root/gpt2`` and ``root/marian``; returns their paths."""
    root = models_root(root)
    paths = {"gpt2": root / "gpt2", "marian": root / "marian"}
    for kind, path in paths.items():
        if force or not (path / ".complete").exists():
            (build_gpt2 if kind == "gpt2" else build_marian)(path)
    return paths


def load(kind: str, root: str | os.PathLike | None = None, **model_kwargs):
    """Load ``(model, tokenizer)`` for ``kind`` in {"gpt2", "marian"}, building them if missing.

    Models come back in eval mode, float32, on CPU, with eager attention (Inseq's default too).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = build_all(root)[kind]
    model_kwargs.setdefault("attn_implementation", "eager")
    cls = AutoModelForCausalLM if kind == "gpt2" else AutoModelForSeq2SeqLM
    model = cls.from_pretrained(path, **model_kwargs).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


# --------------------------------------------------------------------------------------------------
# Exact-length texts
# --------------------------------------------------------------------------------------------------
def _n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def _exact(tok, stream: Iterator[str], n: int, leading_space: bool) -> str:
    """Join pieces from ``stream`` until the text is exactly ``n`` tokens (no special tokens).

    Relies on pieces being pre-tokenizer aligned (space-separated words), which holds for
    ByteLevel and Metaspace pre-tokenizers; the caller verifies the final count anyway.
    """
    parts: list[str] = []
    count = 0
    skipped = 0
    while count < n:
        piece = next(stream)
        text = (" " if (parts or leading_space) else "") + piece
        c = _n_tokens(tok, text)
        if count + c <= n:
            parts.append(text)
            count += c
        else:
            skipped += 1
            if skipped > 10_000:
                raise RuntimeError(f"could not reach exactly {n} tokens")
    return "".join(parts)


def decoder_only_texts(tok, n_prompt: int, n_target: int, seed: int = 7) -> tuple[str, str]:
    """``(prompt, target)`` with exactly ``n_prompt`` / ``n_target`` tokens, target a true continuation.

    ``target`` starts with a space; ``prompt + target`` is the full text.  The tokenizer adds no
    special tokens (GPT-2 style), so the model reads exactly ``n_prompt + n_target`` tokens.
    """
    stream = word_stream(seed)
    prompt = _exact(tok, stream, n_prompt, leading_space=False)
    target = _exact(tok, stream, n_target, leading_space=True)
    ids = lambda s: tok(s, add_special_tokens=True)["input_ids"]  # noqa: E731
    p, t, full = ids(prompt), ids(target), ids(prompt + target)
    assert len(p) == n_prompt and len(t) == n_target, (len(p), len(t))
    assert full == p + t, "target does not tokenize as a continuation of the prompt"
    return prompt, target


def seq2seq_texts(tok, n_source: int, n_target: int, seed: int = 11) -> tuple[str, str]:
    """``(source, target)`` that tokenize (with the appended ``</s>``) to exactly n_source / n_target ids."""
    eos = tok.eos_token_id
    stream = word_stream(seed)
    source = _exact(tok, stream, n_source - 1, leading_space=False)
    target = _exact(tok, stream, n_target - 1, leading_space=False)
    for text, n in ((source, n_source), (target, n_target)):
        ids = tok(text)["input_ids"]
        assert len(ids) == n and ids[-1] == eos and eos not in ids[:-1], (len(ids), n)
    # text_target= must tokenize the same way (Inseq uses it for encoder-decoder targets)
    assert tok(text_target=target)["input_ids"] == tok(target)["input_ids"]
    return source, target


@dataclass
class Workload:
    name: str
    kind: str  # "gpt2" | "marian"
    prompt: str  # decoder-only prompt, or encoder source text
    target: str  # forced continuation (decoder-only: starts with a space), or decoder target text
    n_prompt: int
    n_target: int

    @property
    def is_encoder_decoder(self) -> bool:
        return self.kind == "marian"


def workload(name: str, tok=None, root: str | os.PathLike | None = None, **overrides) -> Workload:
    """Texts of workload ``name`` ("W1", "W2", "W3"); ``n_prompt=``/``n_target=`` override lengths.

    ``tok`` may be passed to avoid re-loading the tokenizer.
    """
    kind, n_prompt, n_target = WORKLOADS[name]
    n_prompt = overrides.get("n_prompt", n_prompt)
    n_target = overrides.get("n_target", n_target)
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(build_all(root)[kind])
    if kind == "gpt2":
        prompt, target = decoder_only_texts(tok, n_prompt, n_target)
    else:
        prompt, target = seq2seq_texts(tok, n_prompt, n_target)
    return Workload(name, kind, prompt, target, n_prompt, n_target)


def _main(argv: list[str]) -> None:
    root = argv[1] if len(argv) > 1 else None
    paths = build_all(root)
    for name in WORKLOADS:
        kind = WORKLOADS[name][0]
        model, tok = load(kind, root)
        w = workload(name, tok=tok, root=root)
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"{name}: {kind} at {paths[kind]} ({n_params / 1e6:.1f}M params, tokenizer vocab "
            f"{len(tok)}, model vocab {model.config.vocab_size}) prompt {w.n_prompt} tok, "
            f"target {w.n_target} tok"
        )
        print(f"   prompt[:80]={w.prompt[:80]!r}\n   target[:80]={w.target[:80]!r}")


if __name__ == "__main__":
    _main(sys.argv)
