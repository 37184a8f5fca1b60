"""The synthetic task solved by attrax's built-in offline default model.

The default model (shipped in ``attrax/_default_model/``, trained by
``scripts/train_default_model.py``) is a tiny GPT-2 that *reverses* a sequence of
``N_DIGITS = 6`` distinct digits::

    prompt        "3 1 4 0 5 9 ="
    continuation  " 9 5 0 4 1 3"      (followed by the EOS token when generating)

Tokens are whitespace-separated words: each digit is one token and ``=`` is one token, so
``tokenize(prompt + continuation) == tokenize(prompt) + tokenize(continuation)``.
No BOS token is used and the tokenizer adds no special tokens.

Ground truth. With ``n`` input digits, the prompt is ``n + 1`` tokens (digits at positions
``0 .. n-1``, ``=`` at position ``n``) and the ``i``-th continuation digit sits at position
``n + 1 + i`` of the concatenated sequence ``prompt + continuation``. It is a copy of the input
digit at position ``n - 1 - i``, its unique ground-truth source token. Digits in an example
are all distinct, so that source is also the only earlier token with the same value: no
attribution method is asked to break a tie between repeated digits.

Why a fixed length: with variable-length inputs the model must locate the separator to know
where to copy from, so the ``=`` token legitimately carries much of the gradient (saliency
and IG then point at it for about half of the answer tokens). With a fixed length the
source position is absolute and the copied digit is the one token the answer depends on.
The helpers below accept other lengths, but the shipped model is trained on ``N_DIGITS`` only.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

__all__ = [
    "DEFAULT_MODEL_PATH",
    "DIGITS",
    "EOS_TOKEN",
    "N_DIGITS",
    "PAD_TOKEN",
    "SEPARATOR",
    "TASK_NAME",
    "UNK_TOKEN",
    "ground_truth",
    "is_heldout",
    "make_example",
    "solve",
]

#: Directory holding the shipped model and tokenizer (``save_pretrained`` format).
DEFAULT_MODEL_PATH: Path = Path(__file__).resolve().parent / "_default_model"

TASK_NAME = "reverse"
DIGITS = "0123456789"
SEPARATOR = "="
EOS_TOKEN = "<eos>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
N_DIGITS = 6

Split = Literal["any", "train", "heldout"]


def is_heldout(prompt: str) -> bool:
    """Whether ``prompt`` belongs to the held-out split (never seen during training).

    The split is a fixed hash of the prompt's digits: about one prompt in ten is held out.
    """
    digits = "".join(prompt.split()).rstrip(SEPARATOR)
    return zlib.crc32(digits.encode("ascii")) % 10 == 0


def solve(prompt: str) -> str:
    """The correct continuation of ``prompt`` (with its leading space, without EOS)."""
    words = prompt.split()
    if len(words) < 2 or words[-1] != SEPARATOR or not all(w in DIGITS for w in words[:-1]):
        raise ValueError(f"not a prompt of the {TASK_NAME!r} task: {prompt!r}")
    return "".join(" " + w for w in reversed(words[:-1]))


def make_example(
    rng: random.Random | int | None = None,
    *,
    n_digits: int | None = None,
    split: Split = "any",
) -> tuple[str, str]:
    """Draw one ``(prompt, continuation)`` pair of the reverse task.

    ``rng`` is a :class:`random.Random` (advanced in place), an integer seed, or ``None``
    (seed 0). ``n_digits`` is the number of input digits (default ``N_DIGITS``, the only
    length the shipped model was trained on); ``split`` restricts the draw to the
    ``"train"`` or ``"heldout"`` part (see :func:`is_heldout`). Digits are drawn without
    repetition.
    """
    if not isinstance(rng, random.Random):
        rng = random.Random(0 if rng is None else rng)
    if split not in ("any", "train", "heldout"):
        raise ValueError(f"split must be 'any', 'train' or 'heldout', got {split!r}")
    n = N_DIGITS if n_digits is None else n_digits
    if not 1 <= n <= len(DIGITS):
        raise ValueError(f"n_digits must be in 1..{len(DIGITS)}, got {n_digits}")
    while True:
        digits = rng.sample(DIGITS, n)
        prompt = " ".join([*digits, SEPARATOR])
        if split == "any" or (split == "heldout") == is_heldout(prompt):
            return prompt, solve(prompt)


def ground_truth(prompt_ids: Sequence[int], continuation_ids: Sequence[int]) -> dict[int, int]:
    """Map each target position to its ground-truth source position.

    Positions index the concatenated sequence ``prompt_ids + continuation_ids``. Every
    continuation digit at position ``n + 1 + i`` maps to input position ``n - 1 - i``
    (``n = len(prompt_ids) - 1`` digits). Continuation tokens past the ``n`` answer digits
    (e.g. a trailing EOS) have no source and are left out. Accepts lists, tuples, 1-D tensors
    or arrays of token ids; raises ``ValueError`` if the continuation does not copy the prompt
    as the task says.
    """
    prompt = [int(t) for t in prompt_ids]
    continuation = [int(t) for t in continuation_ids]
    n = len(prompt) - 1
    if n < 1:
        raise ValueError("prompt must hold at least one digit and the separator")
    if len(continuation) < n:
        raise ValueError(f"continuation has {len(continuation)} tokens, expected at least {n}")
    mapping: dict[int, int] = {}
    for i in range(n):
        target, source = n + 1 + i, n - 1 - i
        if continuation[i] != prompt[source]:
            raise ValueError(
                f"continuation token {i} (id {continuation[i]}) is not a copy of prompt "
                f"token {source} (id {prompt[source]})"
            )
        mapping[target] = source
    return mapping
