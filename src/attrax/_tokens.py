"""Token-string conventions: a tokenizer's sub-word scheme and its special tokens, read from the
strings themselves (byte-level BPE ``Ġ``, SentencePiece ``▁``, WordPiece ``##``).

The model stamps its vocabulary's scheme on every result (``attrs["subwords"]``), so that
:func:`attrax.merge_subwords` and word groups segment one example as they do a batch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache

SCHEMES = ("byte-level", "sentencepiece", "wordpiece", "word-level")
# <|endoftext|>, <s>, </s>, [CLS], Mistral's [INST] and [/INST], DeepSeek's <\uff5cUser\uff5c>
# (full-width bars); not a byte-fallback token <0x0A>
SPECIAL = re.compile(
    r"^(<\|[^<>\s]*\|>|<\uff5c[^<>\s]*\uff5c>|<(?!0x[0-9A-Fa-f]{2}>)/?[A-Za-z_][^<>\s]*>"
    r"|\[/?[A-Za-z_]+\])$"
)
# stands for text the vocabulary lacks (a T5 or Llama 2 tokenizer without byte fallback): part
# of the word it is in, unlike a control token
UNKNOWN = frozenset({"<unk>", "<UNK>", "[UNK]"})
# a SentencePiece byte-fallback token
BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def detect_scheme(tokens: Iterable[str]) -> str:
    """The sub-word convention of token strings: one of ``SCHEMES``.

    >>> detect_scheme(["The", "Ġcap", "ital"]), detect_scheme(["▁The", "▁cap", "ital"])
    ('byte-level', 'sentencepiece')
    >>> detect_scheme(["[CLS]", "the", "cap", "##ital"]), detect_scheme(["1", "2"])
    ('wordpiece', 'word-level')
    """
    tokens = list(tokens)
    bert_specials = any(re.fullmatch(r"\[[A-Z]+\]", t) for t in tokens)
    tokens = [t for t in tokens if t and not SPECIAL.match(t)]
    # the mark the most tokens carry: an Esperanto ĉ or a Maltese Ġ in a SentencePiece or
    # WordPiece vocabulary is a letter, and a byte-level token holds only the byte alphabet
    alphabet = byte_decoder()
    counts = {
        "sentencepiece": sum(t.startswith("▁") for t in tokens),
        "byte-level": sum(("Ġ" in t or "Ċ" in t) and all(c in alphabet for c in t) for t in tokens),
        "wordpiece": sum(t.startswith("##") and len(t) > 2 for t in tokens),
    }
    best = max(counts, key=counts.__getitem__)
    if counts[best]:
        return best
    if bert_specials:
        return "wordpiece"
    if any("ĉ" in t and all(c in alphabet for c in t) for t in tokens):  # a byte-level tab
        return "byte-level"
    return "word-level"


@cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: each printable stand-in character -> its byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table
