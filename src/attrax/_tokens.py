"""Token-string conventions: a tokenizer's sub-word scheme and its special tokens, read from the
strings themselves (byte-level BPE ``Ġ``, SentencePiece ``▁``, WordPiece ``##``), and the words
those strings make (:func:`segment`), which merging and word groups share.

The model stamps its vocabulary's scheme on every result (``attrs["subwords"]``), so that
:func:`attrax.merge_subwords` and word groups segment one example as they do a batch.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

SCHEMES = ("byte-level", "sentencepiece", "wordpiece", "word-level")
#: what fills a token string where a batch has no token (padding): no word
MISSING_TOKEN = ""
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


def word_groups(
    tokens: Sequence[Sequence[str]], sides: Sequence[Sequence[str]], scheme: str | None = None
) -> list[list[int]]:
    """Each token's word index per example (-1 for the missing token ``""``), segmented as
    :func:`merge_subwords` segments them; the scheme is detected over all examples when None.

    >>> word_groups([["The", "Ġcap", "ital", "Ġis"]], [["source"] * 4])
    [[0, 1, 1, 2]]
    """
    if scheme is None:
        scheme = detect_scheme([t for row in tokens for t in row if t != MISSING_TOKEN])
    out = []
    for row, row_sides in zip(tokens, sides, strict=True):
        group = [-1] * len(row)
        words = segment(list(row), list(row_sides), list(range(len(row))), scheme)
        for w, (_, members, _) in enumerate(words):
            for i in members:
                group[i] = w
        out.append(group)
    return out


@dataclass(frozen=True)
class _Piece:
    """One token as words see it: its bytes, whether it opens a word, what its text is made of."""

    raw: bytes
    marked: bool
    body: str  # "special", "space", "punct" or "text"


def _piece(token: str, scheme: str) -> _Piece:
    if token in UNKNOWN:  # WordPiece's [UNK] is a whole word; SentencePiece's <unk> a piece
        return _Piece(token.encode(), scheme != "sentencepiece", "text")
    if SPECIAL.match(token):
        return _Piece(token.encode(), True, "special")
    if scheme == "byte-level":
        table = byte_decoder()
        raw = b"".join(bytes([table[c]]) if c in table else c.encode() for c in token)
        marked = raw[:1].isspace()
    elif scheme == "sentencepiece":
        byte = BYTE.match(token)
        raw = bytes([int(byte.group(1), 16)]) if byte else token.replace("▁", " ").encode()
        marked = token.startswith("▁")
    elif scheme == "wordpiece":
        marked = not token.startswith("##")
        raw = (token if marked else token[2:]).encode()
    else:
        raw, marked = token.encode(), True
    text = raw.decode("utf-8", errors="replace").strip()
    if not text:
        body = "space"
    elif all(unicodedata.category(c)[0] in "PS" and c != "\ufffd" for c in text):
        body = "punct"
    else:
        body = "text"
    return _Piece(raw, marked, body)


def _joins(piece: _Piece, word: str | None) -> bool:
    """Whether ``piece`` continues the current word, whose kind is ``word`` (None: no word)."""
    if word is None or word == "special" or piece.body == "special":
        return False
    if piece.body == "space":
        return word == "space"
    if piece.body == "punct":
        return word == "space" or (word == "punct" and not piece.marked)
    return not piece.marked and word in ("space", "text")


def segment(
    tokens: Sequence[str], sides: Sequence[str], positions: Sequence[int], scheme: str
) -> list[tuple[int, list[int], str]]:
    """``(first index, member indices, text)`` of each word of one example's token sequence."""
    words: list[tuple[int, list[int], bytes]] = []
    kind: str | None = None
    for i, token in enumerate(tokens):
        if token == MISSING_TOKEN:
            kind = None
            continue
        piece = _piece(token, scheme)
        contiguous = i > 0 and sides[i] == sides[i - 1] and positions[i] == positions[i - 1] + 1
        if contiguous and _joins(piece, kind):
            first, members, raw = words[-1]
            words[-1] = (first, [*members, i], raw + piece.raw)
            if kind == "space":
                kind = piece.body
        else:
            words.append((i, [i], piece.raw))
            kind = piece.body
    out = []
    for first, members, raw in words:
        text = raw.decode("utf-8", errors="replace")
        out.append((first, members, text.strip() or text))
    return out


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
