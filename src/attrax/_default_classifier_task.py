"""The synthetic task solved by attrax's built-in offline classifier.

The built-in classifier (shipped in ``attrax/_default_classifier/``, trained by
``scripts/train_default_classifier.py``, loaded with ``ax.load_model("attrax:classifier")``) is a
tiny BERT (``BertForSequenceClassification``) that labels a short review by its one *marker*
word::

    text   "the plot was quite awful and the music felt long"
    label  "negative"                 (because of "awful")

Every text holds exactly one marker word of ``MARKERS`` (``"good"``, ``"awful"``, ``"okay"``...)
among 4 to 11 filler words drawn from ``FILLERS``, which carry no label information. The label is
the marker's class: ``negative``, ``neutral`` or ``positive``.

Ground truth. The marker is the one token the label depends on. The shipped WordPiece vocabulary
holds every task word whole, so a text of ``n`` words is ``[CLS] w_0 ... w_{n-1} [SEP]`` and the
marker at word ``i`` is the source token at position ``i + 1``; :func:`ground_truth` finds it from
the token strings, so it reads an attribution's ``source_token`` coordinate directly.

Held-out split: a fixed hash of the text (about one text in ten), never trained on.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

__all__ = [
    "BUILTIN_NAME",
    "DEFAULT_CLASSIFIER_PATH",
    "FILLERS",
    "LABELS",
    "MARKERS",
    "TASK_NAME",
    "evidence",
    "ground_truth",
    "is_heldout",
    "label_of",
    "make_example",
]

#: Directory holding the shipped classifier and tokenizer (``save_pretrained`` format).
DEFAULT_CLASSIFIER_PATH: Path = Path(__file__).resolve().parent / "_default_classifier"
#: The name ``load_model`` (and ``attrax attribute --model``) knows the shipped classifier by.
BUILTIN_NAME = "attrax:classifier"

TASK_NAME = "marker"
LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
#: class id -> the marker words that decide it
MARKERS: dict[int, tuple[str, ...]] = {
    0: ("bad", "awful", "terrible", "boring", "poor"),
    1: ("okay", "fine", "average", "decent", "fair"),
    2: ("good", "great", "excellent", "wonderful", "superb"),
}
FILLERS: tuple[str, ...] = (
    "the", "a", "this", "that", "movie", "film", "plot", "story", "acting", "music", "scene",
    "ending", "cast", "director", "script", "camera", "was", "is", "felt", "seemed", "and", "but",
    "with", "of", "in", "quite", "very", "really", "rather", "long", "short", "new", "old",
    "first", "last", "today", "yesterday", "night", "again", "still", "also", "its", "our",
    "their", "some", "every", "one", "two",
)  # fmt: skip
MIN_FILLERS, MAX_FILLERS = 4, 11

_CLASS_OF = {word: c for c, words in MARKERS.items() for word in words}

Split = Literal["any", "train", "heldout"]


def is_heldout(text: str) -> bool:
    """Whether ``text`` belongs to the held-out split (never seen during training).

    >>> is_heldout(make_example(3, split="heldout")[0])
    True
    """
    return zlib.crc32(" ".join(text.split()).encode("utf-8")) % 10 == 0


def evidence(text: str) -> int:
    """The word index of the one marker in ``text`` (a ``ValueError`` unless there is exactly one).

    >>> evidence("the film was great")
    3
    """
    found = [i for i, w in enumerate(text.split()) if w in _CLASS_OF]
    if len(found) != 1:
        raise ValueError(f"not a text of the {TASK_NAME!r} task (one marker word): {text!r}")
    return found[0]


def label_of(text: str) -> str:
    """The correct label of ``text``: the class of its marker word.

    >>> label_of("the film was great")
    'positive'
    """
    return LABELS[_CLASS_OF[text.split()[evidence(text)]]]


def make_example(
    rng: random.Random | int | None = None, *, split: Split = "any"
) -> tuple[str, str]:
    """Draw one ``(text, label)`` pair: one marker word at a random place among filler words.

    ``rng`` is a :class:`random.Random` (advanced in place), an integer seed, or ``None`` (seed 0);
    ``split`` restricts the draw to the ``"train"`` or ``"heldout"`` part (see :func:`is_heldout`).

    >>> text, label = make_example(0)
    >>> label == label_of(text)
    True
    """
    if not isinstance(rng, random.Random):
        rng = random.Random(0 if rng is None else rng)
    if split not in ("any", "train", "heldout"):
        raise ValueError(f"split must be 'any', 'train' or 'heldout', got {split!r}")
    while True:
        words = rng.choices(FILLERS, k=rng.randint(MIN_FILLERS, MAX_FILLERS))
        label = rng.randrange(len(LABELS))
        words.insert(rng.randint(0, len(words)), rng.choice(MARKERS[label]))
        text = " ".join(words)
        if split == "any" or (split == "heldout") == is_heldout(text):
            return text, LABELS[label]


def ground_truth(tokens: Sequence[str]) -> int:
    """The position of the one marker among ``tokens`` (token strings, e.g. ``source_token``).

    Special tokens and padding are simply not markers. A ``ValueError`` unless exactly one token
    is a marker word (a marker split into word pieces is not found).

    >>> ground_truth(["[CLS]", "the", "film", "was", "great", "[SEP]", "[PAD]"])
    4
    """
    found = [i for i, t in enumerate(tokens) if str(t) in _CLASS_OF]
    if len(found) != 1:
        raise ValueError(f"expected exactly one marker token, found {len(found)} in {tokens!r}")
    return found[0]
