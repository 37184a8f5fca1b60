"""Texts -> token ids -> padded tensors, with the positions that are attributed."""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ._errors import InputError, ModelError, OptionError
from ._model import Model, head_rows_only, reading

Texts = str | Sequence[str]


@dataclass(frozen=True)
class Example:
    """One tokenized example.

    ``source_ids`` is the prompt (decoder-only) or the encoder input; ``target_ids`` the
    continuation (decoder-only) or the decoder tokens after the start token (encoder-decoder).
    ``positions`` are the attributed target positions in the model's (decoder) sequence.
    """

    source_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    contrast_ids: tuple[int, ...] | None
    positions: tuple[int, ...]
    #: classifiers: each token's segment (0, 1 for a pair's second text), which tokens are
    #: special, the segment ids the model takes (None: it takes none), the predicted class(es)
    #: and their probability
    segments: tuple[int, ...] | None = None
    special: tuple[bool, ...] | None = None
    token_types: tuple[int, ...] | None = None
    predicted: tuple[int, ...] | None = None
    predicted_probability: tuple[float, ...] | None = None

    def sequence(self, start_token: int | None) -> tuple[int, ...]:
        """The sequence whose positions index targets: prompt+continuation, or the decoder input
        (a classifier's input when there is no continuation)."""
        if start_token is None:
            return self.source_ids + (() if self.segments is not None else self.target_ids)
        return (start_token, *self.target_ids)


@dataclass(frozen=True)
class Batch:
    """Tokenized examples of one call; ``single`` when the user passed one string."""

    examples: tuple[Example, ...]
    single: bool
    encoder_decoder: bool
    start_token: int | None
    #: what the model does (``Model.task``) and whether its positions see only earlier ones
    task: str = "generation"
    causal: bool = True

    def sequences(self) -> list[tuple[int, ...]]:
        return [example.sequence(self.start_token) for example in self.examples]


@dataclass(frozen=True)
class Tensors:
    """Right-padded tensors for one teacher-forced forward over a batch.

    ``ids``/``mask`` hold the decoder-only sequence or the encoder input; ``decoder_ids``/
    ``decoder_mask`` the decoder input. ``index[b, k]`` is the position whose logits predict the
    k-th attributed token ``target_ids[b, k]``; ``valid`` marks real (non-padding) entries.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    decoder_ids: torch.Tensor | None
    decoder_mask: torch.Tensor | None
    index: torch.Tensor
    target_ids: torch.Tensor
    contrast_ids: torch.Tensor | None
    valid: torch.Tensor
    token_types: torch.Tensor | None = None


def prepare(
    model: Model,
    inputs: Texts,
    targets: Texts | None = None,
    *,
    contrast: Texts | None = None,
    positions: int | Sequence[int] | None = None,
    max_new_tokens: int = 20,
    predict: bool = True,
) -> Batch:
    """Tokenize ``inputs``/``targets`` (generating targets greedily when None) for ``model``.

    Generation must fit the model's positions: a prompt of ``n`` tokens needs ``n +
    max_new_tokens`` of them (a translator's decoder ``1 + max_new_tokens``), checked before the
    model runs; an :class:`InputError` says how many new tokens fit. Generation is not cut short
    silently, since the attributed target would then depend on where it was cut. A classifier's
    inputs and targets are read by :func:`prepare_classification` (``predict``: see there).
    """
    positions = _materialized(positions)
    if model.task != "generation":
        return prepare_classification(
            model,
            inputs,
            targets,
            contrast=contrast,
            positions=positions,
            predict=predict,
        )
    sources, single = _as_texts(inputs, "inputs")
    target_texts = None if targets is None else _aligned(targets, "targets", sources, single)
    contrast_texts = None if contrast is None else _aligned(contrast, "contrast", sources, single)
    if (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 1
    ):
        raise OptionError(f"`max_new_tokens` must be a positive integer, got {max_new_tokens!r}")
    tokenizer = model.tokenizer
    source_ids = [
        _encode_source(tokenizer, text, model.is_encoder_decoder, f"inputs{_at(i, single)}")
        for i, text in enumerate(sources)
    ]
    if target_texts is None:
        for i, src in enumerate(source_ids):
            check_room(model, src, max_new_tokens, f"inputs{_at(i, single)}")
        generated = model.generate(source_ids, max_new_tokens)
        target_ids = [tuple(ids) for ids in generated]
    else:
        target_ids = [
            _encode_target(model, sources[i], text, f"targets{_at(i, single)}")
            for i, text in enumerate(target_texts)
        ]
    contrast_ids: list[tuple[int, ...] | None] = [None] * len(sources)
    if contrast_texts is not None:
        for i, text in enumerate(contrast_texts):
            name = f"contrast{_at(i, single)}"
            contrast_ids[i] = _contrast_ids(model, sources[i], text, target_ids[i], name)
    start = model.decoder_start_token_id if model.is_encoder_decoder else None
    examples = []
    for i, (src, tgt) in enumerate(zip(source_ids, target_ids, strict=True)):
        where = _at(i, single)
        if not tgt:  # a given text's whitespace the tokenizer drops, or an empty generation
            raise InputError(
                f"`targets{where}` {target_texts[i]!r} has no tokens to attribute: the "
                "tokenizer reads nothing in it"
                if target_texts is not None
                else f"`targets{where}` has no tokens to attribute (empty generation?)"
            )
        _check_length(model, src, tgt, f"inputs{where}", f"targets{where}")
        first = 1 if model.is_encoder_decoder else len(src)
        available = tuple(range(first, first + len(tgt)))
        examples.append(
            Example(
                src, tgt, contrast_ids[i], _select(positions, available, first + len(tgt), where)
            )
        )
    return Batch(tuple(examples), single, model.is_encoder_decoder, start)


def to_tensors(batch: Batch, model: Model) -> Tensors:
    """Pad a batch to rectangular tensors on the model's device (padding on the right)."""
    if batch.task != "generation":
        return _classifier_tensors(batch, model)
    pad = model.pad_token_id or 0
    device = model.device
    decoder_ids: torch.Tensor | None
    decoder_mask: torch.Tensor | None
    if batch.encoder_decoder:
        ids, mask = _pad([e.source_ids for e in batch.examples], pad)
        decoder_ids, decoder_mask = _pad(batch.sequences(), pad)
        decoder_ids, decoder_mask = decoder_ids.to(device), decoder_mask.to(device)
    else:
        ids, mask = _pad(batch.sequences(), pad)
        decoder_ids = decoder_mask = None
    width = max(len(e.positions) for e in batch.examples)
    shape = (len(batch.examples), width)
    index = torch.zeros(shape, dtype=torch.long)
    target_ids = torch.zeros(shape, dtype=torch.long)
    contrast_ids = torch.zeros(shape, dtype=torch.long)
    valid = torch.zeros(shape, dtype=torch.bool)
    for row, example in enumerate(batch.examples):
        sequence = example.sequence(batch.start_token)
        for k, position in enumerate(example.positions):
            index[row, k] = position - 1
            target_ids[row, k] = sequence[position]
            valid[row, k] = True
            if example.contrast_ids is not None:
                first = len(sequence) - len(example.target_ids)
                contrast_ids[row, k] = example.contrast_ids[position - first]
    has_contrast = batch.examples[0].contrast_ids is not None
    return Tensors(
        ids.to(device),
        mask.to(device),
        decoder_ids,
        decoder_mask,
        index.to(device),
        target_ids.to(device),
        contrast_ids.to(device) if has_contrast else None,
        valid.to(device),
    )


def _classifier_tensors(batch: Batch, model: Model) -> Tensors:
    """A classifier's tensors: ``index`` is the position each target's logits come from (the
    token itself, or the pooled position of the sequence), ``target_ids`` the classes."""
    device = model.device
    examples = batch.examples
    ids, mask = _pad([e.source_ids for e in examples], model.pad_token_id or 0)
    token_types = None
    if examples[0].token_types is not None:
        token_types, _ = _pad([e.token_types or () for e in examples], 0)
    counts = [len(e.positions) for e in examples]
    valid = torch.from_numpy(np.arange(max(counts)) < np.asarray(counts)[:, None])
    index = torch.zeros(valid.shape, dtype=torch.long)
    if batch.task in ("token-classification", "question-answering", "fill-mask"):
        # a token's position; a question-answering target's slot (0: the start, 1: the end)
        index[valid] = torch.tensor([p for e in examples for p in e.positions], dtype=torch.long)
    elif model.seq2seq_classifier:  # BART-style classifiers read their last EOS
        eos = model.hf.config.eos_token_id
        last = torch.tensor([_last_eos(e.source_ids, eos) for e in examples])
        index = last[:, None].expand(valid.shape).clone()
    elif batch.causal:  # decoder-only classifiers pool their last token that is not padding
        pad = model.hf.config.get_text_config().pad_token_id
        last = torch.tensor([_pooled(e.source_ids, pad) for e in examples])
        index = torch.where(valid, last[:, None], index)
    target_ids = torch.zeros_like(index)
    target_ids[valid] = torch.tensor([c for e in examples for c in e.target_ids], dtype=torch.long)
    contrast_ids = torch.zeros_like(index)
    if examples[0].contrast_ids is not None:
        contrast_ids[valid] = torch.tensor(
            [c for e in examples for c in e.contrast_ids or ()], dtype=torch.long
        )
    has_contrast = examples[0].contrast_ids is not None
    return Tensors(
        ids.to(device),
        mask.to(device),
        None,
        None,
        index.to(device),
        target_ids.to(device),
        contrast_ids.to(device) if has_contrast else None,
        valid.to(device),
        None if token_types is None else token_types.to(device),
    )


def encode_sources(model: Model, inputs: Texts) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Encoder inputs alone (no targets): padded ids, mask, and whether one text was given."""
    texts, single = _as_texts(inputs, "inputs")
    sources = [
        _encode_source(model.tokenizer, text, True, f"inputs{_at(i, single)}")
        for i, text in enumerate(texts)
    ]
    for i, source in enumerate(sources):
        _check_length(model, source, (), _at(i, single))
    ids, mask = _pad(sources, model.pad_token_id or 0)
    return ids, mask, single


def contrast_batch(
    model: Model, batch: Batch, contrast_inputs: Texts, name: str = "contrast_inputs"
) -> Batch:
    """The batch with each prompt / source replaced by ``contrast_inputs`` (the argument
    ``name``) and the same target tokens.

    Decoder-only positions shift by the difference in prompt length, so row ``k`` of both batches'
    tensors predicts the same target token.
    """
    texts = _aligned(contrast_inputs, name, [""] * len(batch.examples), batch.single)
    examples = []
    for i, (example, text) in enumerate(zip(batch.examples, texts, strict=True)):
        source = _encode_source(
            model.tokenizer, text, model.is_encoder_decoder, f"{name}{_at(i, batch.single)}"
        )
        _check_length(model, source, example.target_ids, _at(i, batch.single))
        shift = 0 if batch.encoder_decoder else len(source) - len(example.source_ids)
        positions = tuple(p + shift for p in example.positions)
        examples.append(Example(source, example.target_ids, None, positions))
    return Batch(tuple(examples), batch.single, batch.encoder_decoder, batch.start_token)


def check_aligned(value: Texts, name: str, inputs: Texts) -> None:
    """Raise an :class:`InputError` unless ``value`` has one text per text of ``inputs``."""
    sources, single = _as_texts(inputs, "inputs")
    _aligned(value, name, sources, single)


def _pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
    mask = np.arange(lengths.max()) < lengths[:, None]
    ids = np.full(mask.shape, pad, dtype=np.int64)
    # one write for the whole batch: row by row costs a tensor per row
    ids[mask] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64)
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


def input_texts(model: Model, inputs: Any) -> list[Any]:
    """Each example's input as given, one per example: a text, or a classifier's ``(text,
    text_pair)`` (a batch given as two lists of texts and pairs is read as :func:`prepare`
    reads it)."""
    if model.task == "generation":
        return _as_texts(inputs, "inputs")[0]
    return [text if pair is None else (text, pair) for text, pair in _as_items(inputs)[0]]


def source_ids(model: Model, inputs: Any) -> list[tuple[int, ...]]:
    """Each example's source token ids as :func:`prepare` reads them (tokenizing only: no
    target, no prediction)."""
    if model.task == "generation":
        texts, single = _as_texts(inputs, "inputs")
        return [
            _encode_source(
                model.tokenizer, text, model.is_encoder_decoder, f"inputs{_at(i, single)}"
            )
            for i, text in enumerate(texts)
        ]
    items, single = _as_items(inputs)
    return [tuple(e[0]) for e in _encode_items(model, items, single)]


def padded_inputs(
    model: Model, inputs: Any, name: str = "inputs"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Token ids, attention mask and segment ids (None: the model takes none) ``[B, L]`` of a
    classifier's texts or pairs, tokenized as :func:`prepare` does, on the model's device;
    errors name the argument ``name``."""
    try:
        items, single = _as_items(inputs)
        encoded = _encode_items(model, items, single)
    except InputError as err:
        raise InputError(str(err).replace("`inputs", f"`{name}")) from None
    device = model.device
    ids, mask = _pad([e[0] for e in encoded], model.pad_token_id or 0)
    types = None
    if encoded[0][3] is not None:
        types = _pad([e[3] or () for e in encoded], 0)[0].to(device)
    return ids.to(device), mask.to(device), types


def _at(i: int, single: bool) -> str:
    return "" if single else f"[{i}]"


def not_text(value: Any) -> str | None:
    """What makes a string no text a tokenizer or netCDF takes (None: nothing, or no string)."""
    if not isinstance(value, str):
        return None
    if "\x00" in value:
        return f"holds a NUL character: {value!r}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON's "\ud800": half of a surrogate pair, alone
        return f"holds a lone surrogate, which is no character: {value!r}"
    return None


def _as_texts(value: Any, name: str) -> tuple[list[str], bool]:
    if isinstance(value, str):
        texts, single = [value], True
    elif isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        texts, single = list(value), False
        if not texts:
            raise InputError(f"`{name}` is an empty list: give at least one text")
    else:
        raise InputError(
            f"`{name}` must be a string or a list of strings, got {type(value).__name__}"
        )
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            generate = (
                ": pass targets=None to generate every example's target"
                if text is None and name == "targets"
                else ""
            )
            raise InputError(
                f"`{name}{_at(i, single)}` must be a string, got {type(text).__name__}{generate}"
            )
        if not text:  # whitespace is text: "\n" and " " are tokens
            raise InputError(f"`{name}{_at(i, single)}` is empty: there is nothing to attribute")
        problem = not_text(text)
        if problem:  # a tokenizer's TypeError otherwise
            raise InputError(f"`{name}{_at(i, single)}` {problem}")
    return texts, single


def _aligned(value: Any, name: str, sources: list[str], single: bool) -> list[str]:
    texts, value_single = _as_texts(value, name)
    if value_single != single or len(texts) != len(sources):
        what = "a string" if single else f"a list of {len(sources)} strings"
        got = "a string" if value_single else f"a list of {len(texts)}"
        raise InputError(f"`{name}` must match `inputs`: expected {what}, got {got}")
    return texts


def _encode_source(
    tokenizer: Any, text: str, encoder_decoder: bool, name: str = "inputs"
) -> tuple[int, ...]:
    with_special = tokenizer(text, add_special_tokens=True)["input_ids"]
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    # whitespace a tokenizer drops: a decoder-only model's first target would have no context
    # (an encoder-decoder's source keeps its special tokens, and its decoder its start token)
    if not (with_special if encoder_decoder else plain):
        raise InputError(
            f"`{name}` {text!r} has no tokens: the tokenizer reads nothing in it; give a text"
        )
    prefix = _special_prefix(with_special, plain)
    # a text that starts with the tokens the tokenizer adds (a chat template's rendered BOS)
    # has them once, as apply_chat_template(tokenize=True) gives them
    twice = prefix > 0 and plain[:prefix] == with_special[:prefix]
    if encoder_decoder:
        return tuple(with_special[prefix:] if twice else with_special)
    # keep a leading BOS the tokenizer adds, drop a trailing EOS: the continuation follows the prompt
    return tuple(plain) if twice else tuple(with_special[:prefix]) + tuple(plain)


def _special_prefix(with_special: list[int], plain: list[int]) -> int:
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return start
    return 0


def _encode_target(model: Model, source: str, target: str, name: str) -> tuple[int, ...]:
    tokenizer = model.tokenizer
    if model.is_encoder_decoder:
        return tuple(tokenizer(text_target=target, add_special_tokens=True)["input_ids"])
    prompt = tokenizer(source, add_special_tokens=False)["input_ids"]
    joint = tokenizer(source + target, add_special_tokens=False)["input_ids"]
    if joint[: len(prompt)] != prompt:
        boundary = tokenizer.convert_ids_to_tokens(joint[max(len(prompt) - 2, 0) : len(prompt) + 1])
        advice = (
            "the prompt ends in whitespace, which the target's first word takes: move it to the "
            "start of the target"
            if source[-1:].isspace()
            else "start the target with a space or split the text elsewhere"
        )
        raise InputError(
            f"`{name}` {target!r} does not continue the prompt on a token boundary: tokenizing "
            f"prompt+target merges tokens across the join ({boundary}); {advice}"
        )
    return tuple(joint[len(prompt) :])


def check_example(
    model: Model,
    source: str,
    target: str | None,
    max_new_tokens: int | None = None,
    names: tuple[str, str] = ("inputs", "targets"),
    pair: str | None = None,
    positions: Any = None,
    contrast: Any = None,
) -> None:
    """Tokenize one example as :func:`prepare` would, without running the model, and raise the
    same errors: a target off a token boundary, too many tokens, no room to generate, target
    ``positions`` it does not have (where they are known before a forward), a ``contrast`` that
    does not align with the target or is the target. ``names`` are what the errors call the
    source and the target; ``pair`` is a classifier's second text.

    >>> import attrax as ax
    >>> check_example(ax.load_model(), "3 1 4 =", " 4 1 3")
    """
    positions = _materialized(positions)
    if pair is not None and model.task == "generation":
        raise InputError(
            f"`{names[0]}_pair` is the second text of a classifier's (text, text_pair) input; "
            f"{model.name} is a language model: give one text"
        )
    if model.task == "fill-mask":  # its target is a token at the masks
        ids = _encode_item(model, source, pair, "")[0]
        if positions is not None:
            _select(positions, tuple(range(len(ids))), len(ids))
        elif model.tokenizer.mask_token_id not in ids:
            raise InputError(
                f"`{names[0]}` has no {model.tokenizer.mask_token} token: {model.name} is a masked "
                "language model, which predicts the tokens at its masks"
            )
        if target is not None:
            _one_token(model, target, names[1])
        return
    if model.task == "question-answering":  # its target is an answer in the context
        if pair is None:
            raise InputError(
                f"`{names[0]}` needs its context as `{names[0]}_pair`: {model.name} is a "
                "question-answering model, which reads (question, context) pairs"
            )
        ids = _encode_item(model, source, pair, "")[0]
        if target is not None:
            _answer_span(model, source, pair, target, names[1], ids)
        return
    if model.task != "generation":  # a classifier's target names a class
        ids, _, special, _ = _encode_item(model, source, pair, "")
        if model.task == "token-classification" and positions is not None:
            available = tuple(p for p in range(len(ids)) if not special[p])
            _select(positions, available or tuple(range(len(ids))), len(ids))
        if target is not None and not (model.task == "sequence-classification" and target == "all"):
            _class_id(model, target, names[1])
        if contrast is not None:
            against = _class_id(model, contrast, "contrast")
            if target is not None and target != "all" and against == _class_id(model, target, ""):
                raise InputError(
                    f"`contrast` {contrast!r} is the target class itself: target minus contrast "
                    "is 0 everywhere; give another class"
                )
        return
    tokenizer = model.tokenizer
    source_ids = _encode_source(tokenizer, source, model.is_encoder_decoder, names[0])
    if target is None:
        _check_vocabulary(model, source_ids, names[0])  # as a given target's check does
        if max_new_tokens is not None:
            check_room(model, source_ids, max_new_tokens, names[0])
        return
    target_ids = _encode_target(model, source, target, names[1])
    if not target_ids:
        raise InputError(
            f"`{names[1]}` {target!r} has no tokens to attribute: the tokenizer reads nothing in it"
        )
    _check_length(model, source_ids, target_ids, *names)
    if contrast is not None:  # as prepare checks it
        _contrast_ids(model, source, contrast, target_ids, "contrast")
    first = 1 if model.is_encoder_decoder else len(source_ids)
    _select(positions, tuple(range(first, first + len(target_ids))), first + len(target_ids))


def _contrast_ids(
    model: Model, source: str, text: str, target_ids: Sequence[int], name: str
) -> tuple[int, ...]:
    """The contrast ``text``'s tokens after ``source``, aligned token by token with the target's."""
    ids = _encode_target(model, source, text, name)
    if len(ids) != len(target_ids):
        raise InputError(
            f"`{name}` {text!r} has {len(ids)} tokens but the target has "
            f"{len(target_ids)}: a contrast must align token by token with the target"
        )
    if tuple(ids) == tuple(target_ids):  # the objective minus itself: zero everywhere
        raise InputError(
            f"`{name}` {text!r} is the target itself, token for token: its contrast "
            "(target minus contrast) is 0 everywhere; give other tokens"
        )
    return tuple(ids)


def check_room(
    model: Model, source: Sequence[int], max_new_tokens: int, name: str = "inputs"
) -> None:
    """Refuse a generation of ``max_new_tokens`` after ``source`` (the argument ``name``) that
    runs past the model's positions (torch would fail mid-generation with an ``IndexError``)."""
    limit = model.max_positions
    if limit is None:
        return
    if model.is_encoder_decoder:
        if len(source) > limit:
            raise InputError(
                f"`{name}` has {len(source)} tokens, more than the model's {limit} positions"
            )
        if max_new_tokens > limit - 1:
            raise InputError(
                f"`max_new_tokens` {max_new_tokens} does not fit the model's decoder: 1 start "
                f"token + {max_new_tokens} new tokens exceed its {limit} positions; pass "
                f"max_new_tokens={limit - 1} or fewer, or give `targets`"
            )
        return
    room = limit - len(source)
    if max_new_tokens <= room:
        return
    if room < 1:
        raise InputError(
            f"`{name}` has {len(source)} tokens and fills the model's {limit} positions: "
            "there is no room to generate a target; shorten it"
        )
    raise InputError(
        f"`max_new_tokens` {max_new_tokens} does not fit `{name}`: {len(source)} prompt "
        f"tokens + {max_new_tokens} new tokens exceed the model's {limit} positions; pass "
        f"max_new_tokens={room} or fewer, shorten the input, or give `targets`"
    )


def _check_vocabulary(model: Model, ids: Sequence[int], name: str, side: str = "source") -> None:
    """Refuse token ids the model has no embedding row for: a tokenizer that is not the model's
    (torch would fail in the embedding lookup with an ``IndexError``)."""
    rows = model.embedding_rows(side)
    if ids and max(ids) >= rows:
        token = model.tokenizer.convert_ids_to_tokens(max(ids))
        raise ModelError(
            f"`{name}` has token id {max(ids)} ({token!r}) but the model's {side} embeddings "
            f"have {rows} rows: `tokenizer` is not the model's; pass the one saved with it (or, "
            "with tokens added to it, hf.resize_token_embeddings(len(tokenizer)) first)"
        )
    tokenizer = model.tokenizer
    unknown = tokenizer.unk_token_id
    # GPT-2's <|endoftext|> is its unknown, BOS and EOS at once: there, it was asked for
    ambiguous = unknown in (tokenizer.bos_token_id, tokenizer.eos_token_id)
    if (
        unknown is not None
        and not ambiguous
        and unknown in ids
        and set(ids) <= set(tokenizer.all_special_ids)
    ):
        # model=None loads the built-in demo model, which knows digits and '=' alone
        demo = (
            "; `model` is attrax's built-in demo model (model=None), whose vocabulary is digits "
            "and '=': load yours with ax.load_model(path)"
            if model.name == "attrax-default"
            else ""
        )
        raise InputError(
            f"`{name}` is nothing but unknown and special tokens "
            f"({model.tokenizer.convert_ids_to_tokens(list(ids))}): none of its text reaches the "
            f"model, whose tokenizer does not know it{demo}"
        )


def _check_length(
    model: Model,
    source: tuple[int, ...],
    target: tuple[int, ...],
    inputs: str = "inputs",
    targets: str = "targets",
) -> None:
    _check_vocabulary(model, source, inputs)
    _check_vocabulary(model, target, targets, "target" if model.is_encoder_decoder else "source")
    limit = model.max_positions
    if limit is None:
        return
    if model.is_encoder_decoder:
        if len(source) > limit:
            raise InputError(
                f"`{inputs}` has {len(source)} tokens, more than the model's {limit} positions"
            )
        if len(target) + 1 > limit:
            raise InputError(
                f"`{targets}` has {len(target)} tokens (+1 start token), more than the "
                f"model's {limit} positions"
            )
    elif len(source) + len(target) > limit:
        raise InputError(
            f"`{inputs}` + `{targets}` have {len(source)} + {len(target)} tokens, more "
            f"than the model's {limit} positions"
        )


def _integral(value: object) -> bool:
    """An int, numpy's too, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _select(
    positions: Any, available: tuple[int, ...], length: int, where: str = ""
) -> tuple[int, ...]:
    """The target positions of one example (``where``: its index in a batch, ``"[i]"``) that
    ``positions`` (as :func:`_materialized` gives them) selects: every one of them must be one
    of that example's."""
    if positions is None:
        return available
    wanted = [positions] if _integral(positions) else positions
    # a string's digits, a float's floor or a bool are no positions: refused, not read as ints
    if isinstance(positions, (str, bytes)) or not isinstance(wanted, Iterable):
        wanted = [positions]
    wanted = list(wanted)
    if not all(_integral(p) for p in wanted):
        raise InputError(f"`positions` must be an int or a list of ints, got {positions!r}")
    wanted = [int(p) for p in wanted]
    if not wanted:
        raise InputError("`positions` is empty: select at least one target position")
    chosen = []
    for p in wanted:
        absolute = p + length if p < 0 else p
        if absolute not in available:
            counted = f" (position {absolute} of the {length} tokens)" if p < 0 else ""
            whose = f" of `inputs{where}`; its" if where else "; the"
            batch = "; positions apply to every example of a batch" if where else ""
            raise InputError(
                f"`positions` contains {p}{counted}, which is not a target position{whose} target "
                f"positions are {available[0]}..{available[-1]} (negative values count from "
                f"the end of the whole sequence, special tokens included{batch})"
            )
        if absolute in chosen:
            raise InputError(
                f"`positions` selects position {absolute} twice ({positions!r}): give each "
                "target position once"
            )
        chosen.append(absolute)
    return tuple(sorted(chosen))


def _materialized(positions: Any) -> Any:
    """``positions`` as a value read more than once: arrays and tensors as ints or lists (a 0-d
    one as its int), a generator as its list; anything else as given, for :func:`_select`."""
    if isinstance(positions, np.ndarray | torch.Tensor):
        if isinstance(positions, torch.Tensor) and positions.is_floating_point():
            return positions  # refused by _select, named
        return positions.tolist()
    if isinstance(positions, Iterable) and not isinstance(positions, Sequence | str | bytes):
        return list(positions)  # read per example and again to pair targets with it
    return positions


def _paired(
    read: Any,
    model: Model,
    values: tuple[Any, Any],
    where: tuple[int, int, bool],
    positions: Any,
    chosen: tuple[int, ...],
    length: int,
) -> tuple[Any, Any]:
    """Example ``where[0]``'s targets and contrasts (``values``), as ``read`` (classes or tokens)
    gives them, one per position of ``chosen``, paired with ``positions`` in the order given."""
    i, n, single = where
    return tuple(  # type: ignore[return-value]
        _sorted_as(read(model, value, name, i, n, single, len(chosen)), positions, chosen, length)
        for value, name in zip(values, ("targets", "contrast"), strict=True)
    )


def _sorted_as(
    values: tuple[Any, ...] | None, positions: Any, chosen: tuple[int, ...], length: int
) -> tuple[Any, ...] | None:
    """``values`` given one per position in the order of ``positions``, reordered to follow
    ``chosen`` (those positions sorted, as :func:`_select` returns them): ``targets=[2, 0]``
    with ``positions=[3, 1]`` is class 2 at 3 and class 0 at 1."""
    if values is None or positions is None or len(values) != len(chosen) or len(chosen) < 2:
        return values
    given = [int(p) + length if int(p) < 0 else int(p) for p in positions]
    return tuple(values[given.index(p)] for p in chosen)


# --- classifiers ---------------------------------------------------------------------------

#: a text, or a (text, text_pair) pair for NLI-style models
Item = str | tuple[str, str]
ClassTargets = int | str | Sequence[Any] | None


def prepare_classification(
    model: Model,
    inputs: Item | Sequence[Item] | tuple[Sequence[str], Sequence[str]],
    targets: ClassTargets = None,
    *,
    contrast: ClassTargets = None,
    positions: int | Sequence[int] | None = None,
    predict: bool = True,
) -> Batch:
    """Tokenize texts or text pairs for a classifier and resolve the classes to attribute.

    Sequence classification: ``targets`` is a class id or label name (for every example), a list
    (one per example; for a single input, several classes), None (the predicted class) or
    ``"all"`` (every class). Token classification: the tokens at ``positions`` (default: every
    real, non-special token), each attributed for its predicted class, or for the class
    ``targets`` names. ``contrast`` is a second class: the objective of the target class minus
    that of the contrast class.

    ``predict=False`` leaves the prediction (``Example.predicted``) to :func:`with_predictions`
    when ``targets`` are given: a caller whose own forward gives the class logits at the input
    saves a forward. Without targets the prediction picks the classes, so it runs here anyway.
    """
    items, single = _as_items(inputs)
    positions = _materialized(positions)
    if model.task == "question-answering":
        return _prepare_answers(model, items, single, targets, contrast, positions, predict)
    if model.task == "fill-mask":
        return _prepare_masks(model, items, single, targets, contrast, positions, predict)
    encoded = _encode_items(model, items, single)
    predicted: list[tuple[int, ...]] | None
    probability: list[tuple[float, ...]] | None
    if predict or targets is None:
        predicted, probability = _predict(model, encoded)
    else:
        predicted = probability = None
    token = model.task == "token-classification"
    examples = []
    n = len(encoded)
    for i, (ids, segments, special, token_types) in enumerate(encoded):
        if token:
            available = tuple(p for p in range(len(ids)) if not special[p])
            chosen = _select(
                positions, available or tuple(range(len(ids))), len(ids), _at(i, single)
            )
            given, against = _paired(
                _classes_for,
                model,
                (targets, contrast),
                (i, n, single),
                positions,
                chosen,
                len(ids),
            )
            pred = prob = None
            if predicted is not None and probability is not None:
                pred = tuple(predicted[i][p] for p in chosen)
                prob = tuple(probability[i][p] for p in chosen)
            classes = given or pred or ()
        else:
            if positions is not None:
                raise OptionError(
                    "`positions` selects tokens of a token classifier; a sequence classifier's "
                    "targets are classes: give them as `targets`"
                )
            if isinstance(targets, str) and targets == "all":
                classes = tuple(model.labels)
            else:
                given = _classes_for(model, targets, "targets", i, n, single, None)
                # no targets: the prediction ran (above) to pick the class
                classes = given or (() if predicted is None else (predicted[i][0],))
            _distinct(model, classes, targets, _at(i, single))
            against = _classes_for(model, contrast, "contrast", i, n, single, len(classes))
            chosen = classes
            pred = prob = None
            if predicted is not None and probability is not None:
                pred, prob = (predicted[i][0],), (probability[i][0],)
        if (
            against is not None
            and len(against) == len(classes)
            and tuple(against) == tuple(classes)
        ):
            raise InputError(
                f"`contrast{_at(i, single)}` names the target classes themselves ({list(against)}): "
                "target minus contrast is 0 everywhere; give other classes"
            )
        same = [model.labels[c] for c, a in zip(classes, against or (), strict=False) if c == a]
        if same and not token:  # one class attributed against itself: a row of zeros
            raise InputError(
                f"`contrast{_at(i, single)}` {same[0]!r} is also one of the targets "
                f"{[model.labels[c] for c in classes]}: its row (target minus contrast) would be "
                "0 everywhere; leave it out of the targets"
            )
        examples.append(
            Example(ids, classes, against, chosen, segments, special, token_types, pred, prob)
        )
    return Batch(tuple(examples), single, False, None, model.task, model.causal)


def _prepare_answers(
    model: Model,
    items: list[tuple[str, str | None]],
    single: bool,
    targets: Any,
    contrast: Any,
    positions: Any,
    predict: bool,
) -> Batch:
    """A question-answering batch: each example's two targets are the logits of its answer's
    first token (``"start"``) and last token (``"end"``) over the sequence's positions.

    ``targets`` (and ``contrast``) give each example an answer span: ``(start, end)`` token
    positions, or the answer's text, found in the context. None: the predicted answer.
    """
    if positions is not None:
        raise OptionError(
            "`positions` selects tokens of a token classifier; a question-answering model's "
            "targets are its answer's start and end: give the answer as `targets`"
        )
    for i, (_, context) in enumerate(items):
        if context is None:
            raise InputError(
                f"`inputs{_at(i, single)}` must be a (question, context) pair for "
                f"{model.name}, a question-answering model: it answers with a span of the context"
            )
    encoded = _encode_items(model, items, single)
    n = len(items)
    given = [_span_for(model, targets, "targets", items, encoded, i, single) for i in range(n)]
    against = [_span_for(model, contrast, "contrast", items, encoded, i, single) for i in range(n)]
    predicted: list[tuple[int, ...]] | None = None
    probability: list[tuple[float, ...]] | None = None
    if predict or targets is None:
        predicted, probability = _predict(model, encoded)
    examples = []
    for i, (ids, segments, special, token_types) in enumerate(encoded):
        span = given[i] or (predicted[i] if predicted is not None else ())
        if against[i] is not None and against[i] == span:
            raise InputError(
                f"`contrast{_at(i, single)}` is the target span itself ({list(span)}): target "
                "minus contrast is 0 everywhere; give another span"
            )
        examples.append(
            Example(
                ids,
                tuple(span),
                against[i],
                (0, 1),  # the start's slot and the end's
                segments,
                special,
                token_types,
                None if predicted is None else predicted[i],
                None if probability is None else probability[i],
            )
        )
    return Batch(tuple(examples), single, False, None, model.task, model.causal)


def _prepare_masks(
    model: Model,
    items: list[tuple[str, str | None]],
    single: bool,
    targets: Any,
    contrast: Any,
    positions: Any,
    predict: bool,
) -> Batch:
    """A masked LM's batch: each example's targets are its mask tokens (or ``positions``), each
    attributed for its predicted token or the token ``targets`` names."""
    encoded = _encode_items(model, items, single)
    mask = model.tokenizer.mask_token_id
    n = len(items)
    examples = []
    for i, (ids, segments, special, token_types) in enumerate(encoded):
        where = _at(i, single)
        masks = tuple(p for p, token in enumerate(ids) if token == mask)
        if positions is None and not masks:
            raise InputError(
                f"`inputs{where}` has no {model.tokenizer.mask_token} token: a masked language "
                f"model predicts the tokens at its masks; put {model.tokenizer.mask_token} where "
                "the word to explain is, or select tokens with `positions=`"
            )
        chosen = (
            masks
            if positions is None
            else _select(positions, tuple(range(len(ids))), len(ids), where)
        )
        given, against = _paired(
            _tokens_for, model, (targets, contrast), (i, n, single), positions, chosen, len(ids)
        )
        if against is not None and given is not None and against == given:
            raise InputError(
                f"`contrast{where}` names the target tokens themselves: target minus contrast is "
                "0 everywhere; give other tokens"
            )
        # without targets, a placeholder until the prediction (below) picks the tokens
        classes = given or (0,) * len(chosen)
        examples.append(Example(ids, classes, against, chosen, segments, special, token_types))
    batch = Batch(tuple(examples), single, False, None, model.task, model.causal)
    if predict or targets is None:
        batch = with_predictions(model, batch)
    if targets is None:  # given targets were checked against the contrast above
        predicted = tuple(replace(e, target_ids=e.predicted or ()) for e in batch.examples)
        batch = replace(batch, examples=predicted)
        for i, e in enumerate(batch.examples):
            if e.contrast_ids is not None and e.contrast_ids == e.target_ids:
                raise InputError(
                    f"`contrast{_at(i, single)}` names the predicted tokens themselves: target "
                    "minus contrast is 0 everywhere; give other tokens"
                )
    return batch


def _tokens_for(
    model: Model, value: Any, name: str, i: int, n: int, single: bool, count: int
) -> tuple[int, ...] | None:
    """The token ids ``value`` gives example ``i``'s ``count`` targets (None: it gives none): one
    token for every target, or a list with one per target."""
    if value is None:
        return None
    where = _at(i, single)
    if not single:
        if not isinstance(value, (list, tuple)) or len(value) != n:
            raise InputError(
                f"`{name}` must give one entry per example (a token, or a list of one per "
                f"target): {n} examples, got {value!r}"
            )
        value = value[i]
    if isinstance(value, str):
        return (_one_token(model, value, f"{name}{where}"),) * count
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InputError(
            f"`{name}{where}` must be a token (a string) or a list of them, got {value!r}"
        )
    if len(value) != count:
        raise InputError(
            f"`{name}{where}` has {len(value)} tokens for {count} targets (the example's masks)"
        )
    return tuple(_one_token(model, v, f"{name}{where}[{k}]") for k, v in enumerate(value))


def _one_token(model: Model, text: str, name: str) -> int:
    """The vocabulary id of ``text``: a token of the vocabulary as it is written there, or a text
    the tokenizer encodes as one token."""
    tokenizer = model.tokenizer
    if not text:
        raise InputError(f"`{name}` is empty: give the token to explain")
    known = tokenizer.convert_tokens_to_ids(text)
    if isinstance(known, int) and (known != tokenizer.unk_token_id or text == tokenizer.unk_token):
        return known
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if ids == [tokenizer.unk_token_id]:
        raise InputError(
            f"`{name}` {text!r} is not in {model.name}'s vocabulary: its tokenizer reads it as "
            f"{tokenizer.unk_token!r}; give a token of the vocabulary"
        )
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise InputError(
            f"`{name}` {text!r} is {len(ids)} tokens {pieces}: a masked language model predicts "
            "one token at each mask; give one token of its vocabulary"
        )
    return int(ids[0])


def _span_for(
    model: Model,
    value: Any,
    name: str,
    items: list[tuple[str, str | None]],
    encoded: list[tuple[Any, ...]],
    i: int,
    single: bool,
) -> tuple[int, int] | None:
    """Example ``i``'s answer span ``(start, end)`` from ``value`` (None when it gives none)."""
    if value is None:
        return None
    where = _at(i, single)
    if not single:
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise InputError(
                f"`{name}` must give one answer per example (a text or (start, end) token "
                f"positions): {len(items)} examples, got {value!r}"
            )
        value = value[i]
    ids = encoded[i][0]
    if isinstance(value, str):
        question, context = items[i]
        return _answer_span(model, question, context or "", value, f"{name}{where}", ids)
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
    ):
        raise InputError(
            f"`{name}{where}` must be the answer's text or its (start, end) token positions, "
            f"got {value!r}"
        )
    start, end = int(value[0]), int(value[1])
    if not 0 <= start <= end < len(ids):
        raise InputError(
            f"`{name}{where}` {(start, end)} is not a span of the input's {len(ids)} tokens: "
            f"expected 0 <= start <= end <= {len(ids) - 1}"
        )
    return start, end


def _answer_span(
    model: Model, question: str, context: str, answer: str, name: str, ids: tuple[int, ...]
) -> tuple[int, int]:
    """The tokens of ``answer``'s first occurrence in ``context`` as whole words (``"at"`` is no
    answer inside ``"cat"``), else (scripts without spaces) its first on token boundaries:
    ``(first, last)`` position."""
    answer = answer.strip()
    at = context.find(answer) if answer else -1
    if at < 0:
        raise InputError(
            f"`{name}` {answer!r} is not in the example's context: give a text of the context, "
            "or the answer's (start, end) token positions"
        )
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(
            f"`{name}` {answer!r}: {model.name}'s tokenizer is not a fast tokenizer and maps no "
            "characters to tokens; give the answer's (start, end) token positions"
        )
    encoding = tokenizer(question, context, add_special_tokens=True, return_offsets_mapping=True)
    if tuple(encoding["input_ids"]) != tuple(ids):  # the same call as the input's, and offsets
        raise InputError(f"`{name}` {answer!r}: the tokenizer encodes the context differently")
    tokens = [
        (p, first, last)
        for p, (sequence, (first, last)) in enumerate(
            zip(encoding.sequence_ids(), encoding["offset_mapping"], strict=True)
        )
        if sequence == 1 and last > first
    ]
    # a byte-level token's offsets may hold the space before it
    starts = {a + 1 if context[a].isspace() else a for _, a, _ in tokens}
    ends = {last for _, _, last in tokens}

    def whole(i: int) -> bool:
        j = i + len(answer)
        return (i == 0 or not context[i - 1].isalnum()) and (
            j == len(context) or not context[j].isalnum()
        )

    occurrences = []
    while at >= 0:
        occurrences.append(at)
        at = context.find(answer, at + 1)
    found = next((i for i in occurrences if whole(i)), None)
    if found is None:
        found = next((i for i in occurrences if i in starts and i + len(answer) in ends), None)
    at = occurrences[0]
    if found is None:
        word = next((context[a:b] for _, a, b in tokens if a <= at < b), answer)
        raise InputError(
            f"`{name}` {answer!r} is in the example's context only inside a token (its first "
            f"time in {word!r}): give a text that starts and ends where tokens do, or the "
            "answer's (start, end) token positions"
        )
    at, stop = found, found + len(answer)
    inside = [p for p, first, last in tokens if first < stop and last > at]
    if not inside:
        raise InputError(f"`{name}` {answer!r} covers no token of the context")
    return inside[0], inside[-1]


def _as_items(value: Any) -> tuple[list[tuple[str, str | None]], bool]:
    """Texts or pairs as ``[(text, pair or None)]``, and whether one input was given."""

    def item(v: Any, where: str) -> tuple[str, str | None]:
        if isinstance(v, str):
            texts: tuple[Any, ...] = (v,)
        elif isinstance(v, tuple) and len(v) == 2:
            texts = v
        else:
            raise InputError(
                f"`inputs{where}` must be a text or a (text, text_pair) tuple, got {v!r}"
            )
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise InputError(
                    f"`inputs{where}` must hold more than whitespace, got {v!r}: a classifier "
                    "reads no class from whitespace alone"
                )
        return texts[0], texts[1] if len(texts) == 2 else None

    if isinstance(value, str) or (
        isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, str) for v in value)
    ):
        return [item(value, "")], True
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, (list, tuple)) for v in value)
    ):
        first, second = value
        if all(_is_pair(v) for v in value):  # two pairs, or two lists of two texts each?
            raise InputError(
                f"`inputs` {value!r} is ambiguous: a tuple of two (text, text_pair) tuples "
                "reads as two pairs or as (texts, text_pairs); give a list of pairs "
                "[(text, text_pair), ...] or two lists ([text, ...], [text_pair, ...])"
            )
        if len(first) != len(second):
            raise InputError(
                f"`inputs` as two lists must pair them one to one, got {len(first)} and "
                f"{len(second)} texts"
            )
        value = list(zip(first, second, strict=True))
    if isinstance(value, tuple):
        # a tuple of two texts is one pair: any other tuple read as a batch would hide that
        raise InputError(
            f"`inputs` {value!r} is a tuple of {len(value)}: a tuple is one (text, text_pair) "
            "input, or two lists (texts, text_pairs); give a list for a batch"
        )
    if not isinstance(value, Sequence) or isinstance(value, (bytes, bytearray)) or not value:
        raise InputError(
            "`inputs` must be a text, a (text, text_pair) tuple, or a non-empty list of them, "
            f"got {type(value).__name__}"
        )
    return [item(v, f"[{i}]") for i, v in enumerate(value)], False


def _is_pair(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, str) for v in value)


def _encode_items(
    model: Model, items: list[tuple[str, str | None]], single: bool
) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[bool, ...], tuple[int, ...] | None]]:
    """:func:`_encode_item` of every input, in one tokenizer call when all are texts or all pairs
    (a fast tokenizer encodes a batch at once, ~3x faster than text by text)."""
    pairs = [pair for _, pair in items]
    if len(items) == 1 or len({pair is None for pair in pairs}) > 1:
        return [_encode_item(model, t, p, _at(i, single)) for i, (t, p) in enumerate(items)]
    encodings = model.tokenizer(
        [text for text, _ in items],
        None if pairs[0] is None else pairs,
        add_special_tokens=True,
        return_special_tokens_mask=True,
    )
    return [
        _from_encoding(model, encodings, i, pairs[0] is not None, _at(i, single))
        for i in range(len(items))
    ]


def _encode_item(
    model: Model, text: str, pair: str | None, where: str
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[bool, ...], tuple[int, ...] | None]:
    """Token ids, segments, special-token marks and the model's segment ids of one input."""
    encoding = model.tokenizer(text, pair, add_special_tokens=True, return_special_tokens_mask=True)
    return _from_encoding(model, encoding, None, pair is not None, where)


def _from_encoding(
    model: Model, encoding: Any, row: int | None, paired: bool, where: str
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[bool, ...], tuple[int, ...] | None]:
    """:func:`_encode_item`'s result from a tokenizer's encoding (its ``row`` for a batch)."""

    def field(name: str) -> Any:
        value = encoding[name]
        return value if row is None else value[row]

    ids = tuple(field("input_ids"))
    special = tuple(bool(s) for s in field("special_tokens_mask"))
    if paired and not any(special):
        raise InputError(
            f"`inputs{where}` is a (text, text_pair) pair, but {model.name}'s tokenizer has no "
            "pair template: it would join the texts with nothing between them; give one text"
        )
    has_types = "token_type_ids" in encoding
    try:
        sequence_ids = encoding.sequence_ids() if row is None else encoding.sequence_ids(row)
    except (AttributeError, ValueError):  # a slow tokenizer: segments from its type ids
        sequence_ids = list(field("token_type_ids") if has_types else [0] * len(ids))
    segments, second = [], False
    for s in sequence_ids:
        second = second or s == 1  # special tokens join the segment they close
        segments.append(int(second))
    token_types = None
    if has_types and "token_type_ids" in _forward_parameters(model):
        token_types = tuple(int(t) for t in field("token_type_ids"))
    limit = model.max_positions
    if limit is not None and len(ids) > limit:
        raise InputError(
            f"`inputs{where}` has {len(ids)} tokens, more than the model's {limit} positions"
        )
    _check_vocabulary(model, ids, f"inputs{where}")
    check_eos(model, ids, where)
    return ids, tuple(segments), special, token_types


def _forward_parameters(model: Model) -> tuple[str, ...]:
    import inspect

    forward = model.hf.forward
    # one signature per model class, not per text (inspect costs ~0.2 ms a call)
    key = getattr(forward, "__func__", forward)
    if key not in _PARAMETERS:
        _PARAMETERS[key] = tuple(inspect.signature(forward).parameters)
    return _PARAMETERS[key]


_PARAMETERS: dict[Any, tuple[str, ...]] = {}


@torch.no_grad()
def _predict(
    model: Model, encoded: list[tuple[Any, ...]]
) -> tuple[list[tuple[int, ...]], list[tuple[float, ...]]]:
    """The predicted class and its probability: per example, or per token."""
    placeholder = tuple(
        Example(ids, (0,) * len(ids), None, tuple(range(len(ids))), seg, sp, tt)
        for ids, seg, sp, tt in encoded
    )
    if model.task == "question-answering":
        slots = tuple(
            Example(ids, (0, 0), None, (0, 1), seg, sp, tt) for ids, seg, sp, tt in encoded
        )
        batch = Batch(slots, False, False, None, model.task, model.causal)
        t = to_tensors(batch, model)
        with reading(t.ids):
            logits = model.hidden_at(model.embed(t.ids), t.mask, t.index, token_types=t.token_types)
        return _best_spans(logits, slots)
    token = model.task == "token-classification"
    examples = (
        placeholder
        if token
        else tuple(
            Example(e.source_ids, (0,), None, (0,), e.segments, e.special, e.token_types)
            for e in placeholder
        )
    )
    batch = Batch(examples, False, False, None, model.task, model.causal)
    t = to_tensors(batch, model)
    embeds = model.embed(t.ids)
    with head_rows_only(), reading(t.ids):
        logits = model.hidden_at(embeds, t.mask, t.index, token_types=t.token_types)
    return _best(logits, [len(e.positions) for e in examples], model.head_type)


def _best(
    logits: torch.Tensor, counts: Sequence[int], head: str | None = None
) -> tuple[list[tuple[int, ...]], list[tuple[float, ...]]]:
    """Each row's most probable class and its probability, for the first ``counts[b]`` slots of
    class logits ``[B, K, classes]``: a multi-label head's most probable label and its sigmoid;
    a regression head's one output with no probability (NaN)."""
    logits = logits.detach().float()
    if head == "multi-label":
        best = torch.sigmoid(logits).max(dim=-1)
    else:
        best = torch.softmax(logits, dim=-1).max(dim=-1)
    classes, chances = best.indices.cpu().tolist(), best.values.cpu().tolist()
    if head == "regression":
        chances = [[math.nan] * len(row) for row in chances]
    return (
        [tuple(c[:n]) for c, n in zip(classes, counts, strict=True)],
        [tuple(p[:n]) for p, n in zip(chances, counts, strict=True)],
    )


def _best_spans(
    logits: torch.Tensor, examples: Sequence[Example]
) -> tuple[list[tuple[int, ...]], list[tuple[float, ...]]]:
    """Each example's answer: the span of context tokens ``start <= end`` whose start logit plus
    end logit is largest (from start and end logits ``[B, 2, L]``), and the probability of its
    start and of its end (softmax over the input's positions)."""
    logits = logits.detach().float()
    count, width = logits.shape[0], logits.shape[-1]
    context = np.zeros((count, width), dtype=bool)
    for b, e in enumerate(examples):
        segments = np.asarray(e.segments or (), dtype=np.int64)
        context[b, : len(segments)] = (segments == 1) & ~np.asarray(e.special or (), dtype=bool)
    allowed = torch.from_numpy(context).to(logits.device)
    first = logits[:, 0].masked_fill(~allowed, -torch.inf)
    last = logits[:, 1].masked_fill(~allowed, -torch.inf)
    # the best end at or after each start: a running max from the right, O(L) not O(L^2)
    best, where = last.flip(-1).cummax(-1)
    best, where = best.flip(-1), (width - 1 - where).flip(-1)
    start = (first + best).argmax(-1)
    rows = torch.arange(count, device=logits.device)
    end = where[rows, start]
    chances = torch.softmax(logits, dim=-1)
    spans = torch.stack((start, end), -1).cpu().tolist()
    pairs = torch.stack((chances[rows, 0, start], chances[rows, 1, end]), -1).cpu().tolist()
    return [tuple(s) for s in spans], [tuple(p) for p in pairs]


def with_predictions(model: Model, batch: Batch, logits: torch.Tensor | None = None) -> Batch:
    """``batch`` whose classifier examples carry the model's prediction (``Example.predicted``).

    A batch prepared with ``predict=False`` has none yet. ``logits`` are the class logits
    ``[B, K, classes]`` at the unperturbed input at each example's attributed slots (the
    :class:`Tensors` layout), from a forward the caller ran anyway; without them one no-grad
    forward computes the prediction. A batch that has it (or a generation batch) is returned as is.
    """
    examples = batch.examples
    if batch.task == "generation" or all(e.predicted is not None for e in examples):
        return batch
    if logits is None and batch.task != "question-answering":
        t = to_tensors(batch, model)
        with torch.no_grad(), head_rows_only(), reading(t.ids):
            logits = model.hidden_at(model.embed(t.ids), t.mask, t.index, token_types=t.token_types)
    if batch.task == "question-answering":
        if logits is None or any(e.positions != (0, 1) for e in examples):
            spans, both = _predict(model, [_encoded(e) for e in examples])
        else:  # the caller's logits are every example's start and end
            spans, both = _best_spans(logits, examples)
        # aligned with each example's slots, as its targets are
        classes = [tuple(s[p] for p in e.positions) for e, s in zip(examples, spans, strict=True)]
        chances = [tuple(c[p] for p in e.positions) for e, c in zip(examples, both, strict=True)]
        counts = []
    elif batch.task == "sequence-classification":
        assert logits is not None  # the forward above ran: not question answering
        logits = logits[:, :1]  # every slot reads the same pooled position
        counts = [1] * len(examples)
    else:
        counts = [len(e.positions) for e in examples]
    if counts:
        assert logits is not None  # the forward above ran: not question answering
        classes, chances = _best(logits, counts, model.head_type)
    updated = tuple(
        replace(e, predicted=c, predicted_probability=p)
        for e, c, p in zip(examples, classes, chances, strict=True)
    )
    return replace(batch, examples=updated)


def _pooled(ids: Sequence[int], pad: int | None) -> int:
    """The position a decoder-only sequence classifier reads: as transformers' heads, its
    rightmost token that is not ``pad`` (the config's pad id; a text ending in EOS, when EOS
    pads, is read before it), position 0 when every token is one; the last without a pad id."""
    if pad is None:
        return len(ids) - 1
    return next((p for p in range(len(ids) - 1, -1, -1) if ids[p] != pad), 0)


def _last_eos(ids: Sequence[int], eos: int) -> int:
    """The position an encoder-decoder sequence classifier reads, as transformers' BART and T5
    heads: its input's last EOS (:func:`check_eos` makes sure there is one)."""
    return max(p for p, token in enumerate(ids) if token == eos)


def check_eos(model: Model, ids: Sequence[int], where: str) -> None:
    """An encoder-decoder sequence classifier reads its decoder at the input's last EOS: an
    input without one has no class (transformers' error would say so from inside the model);
    mBART's and PLBart's inputs hold no pad token, which would move their decoder's start."""
    eos = model.hf.config.eos_token_id
    if model.seq2seq_classifier and model.task == "sequence-classification" and eos not in ids:
        raise InputError(
            f"`inputs{where}` encodes without an EOS token (id {eos}), where "
            f"{type(model.hf).__name__} reads its class; its tokenizer should append one"
        )
    pad = model.hf.config.pad_token_id
    if model.seq2seq_classifier == "last" and pad in ids:
        # transformers finds the language id by counting the ids that are not pad
        raise InputError(
            f"`inputs{where}` holds the pad token (id {pad}) inside its text: "
            f"{type(model.hf).__name__}'s decoder starts with the input's last token, which "
            "transformers finds by counting the tokens that are not pad, so it would start "
            "with another; remove the pad token from the text"
        )


def _encoded(e: Example) -> tuple[Any, ...]:
    """An example's encoding as :func:`_encode_items` gives it."""
    return e.source_ids, e.segments, e.special, e.token_types


def _class_id(model: Model, value: Any, name: str) -> int:
    """A class id from an id or a label name."""
    if isinstance(value, str):
        by_name = {label: i for i, label in model.labels.items()}
        if value not in by_name:
            raise InputError(
                f"`{name}` {value!r} is not a label of {model.name}; its labels are {list(by_name)}"
            )
        return by_name[value]
    if value is None:
        # one None among given targets: the predicted class is targets=None, for every example
        raise InputError(
            f"`{name}` must be a class id or a label name, got None: pass targets=None to "
            "explain every example's predicted class"
        )
    if not _integral(value):  # numpy's ints too (a list from an array of labels)
        raise InputError(f"`{name}` must be a class id or a label name, got {value!r}")
    value = int(value)
    if not 0 <= value < len(model.labels):
        raise InputError(
            f"`{name}` {value} is not a class id of {model.name}: it has {len(model.labels)} "
            f"classes (0..{len(model.labels) - 1})"
        )
    return value


def _distinct(model: Model, classes: tuple[int, ...], targets: Any, where: str) -> None:
    """Refuse a class named twice among one example's targets: its rows would be one row."""
    for k, c in enumerate(classes):
        if c in classes[:k]:
            raise InputError(
                f"`targets{where}` names class {c} ({model.labels[c]!r}) twice ({targets!r}): "
                "give each class once"
            )


def _classes_for(
    model: Model, value: Any, name: str, i: int, n: int, single: bool, count: int | None
) -> tuple[int, ...] | None:
    """The classes ``value`` gives example ``i`` (None when it gives none), repeated ``count``
    times when one class stands for every target."""
    if value is None:
        return None
    if isinstance(value, str) and value == "all":
        raise OptionError(f"`{name}='all'` is for sequence classifiers' targets")
    if isinstance(value, (list, tuple)) and not single:
        if len(value) != n:
            raise InputError(
                f"`{name}` must give one entry per example: {n} examples, got {len(value)}"
            )
        value = value[i]
    ids = (
        tuple(_class_id(model, v, f"{name}{_at(i, single)}") for v in value)
        if isinstance(value, (list, tuple))
        else (_class_id(model, value, f"{name}{_at(i, single)}"),)
    )
    if count is not None and len(ids) == 1:
        return ids * count
    if count is not None and len(ids) != count:
        raise InputError(f"`{name}{_at(i, single)}` has {len(ids)} classes for {count} targets")
    return ids
