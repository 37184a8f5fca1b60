"""The one adapter around a Hugging Face model: embed, forward from embeddings, generate."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)
from transformers.utils import logging as hf_logging

from . import _arch, _routed
from . import _validate as check
from ._errors import InputError, ModelError, OptionError, first_line
from ._memory import at_least_float32, bound_kernel_caches
from ._sdpa import folded_sdpa
from ._tokens import detect_scheme

ATTENTION_IMPLEMENTATIONS = ("auto", "eager", "sdpa")
#: What a model does: generate text (causal and seq2seq LMs), classify sequences or tokens,
#: answer a question with a span of its context (extractive question answering), or predict the
#: tokens at its masks (a masked LM).
TASKS = (
    "generation",
    "sequence-classification",
    "token-classification",
    "question-answering",
    "fill-mask",
)
# a masked LM's head, by attribute: the module the final hidden states enter first
MASKED_LM_HEADS = ("cls", "lm_head", "lm_predictions", "generator_predictions", "vocab_transform")
#: A question-answering model's two targets: the logits of the answer's first and last token
QA_TARGETS = ("start", "end")
#: encoder-decoder classifiers attrax attributes: their decoder reads the input ids shifted
#: right after the decoder start token ("start"), or (mBART, PLBart) after the input's last
#: token, its language id ("last"). A sequence classifier reads its decoder's state at the last
#: EOS; a question-answering model scores every decoder position as an answer's start and end
SEQ2SEQ_CLASSIFIERS = {
    "BartForSequenceClassification": "start",
    "MBartForSequenceClassification": "last",
    "PLBartForSequenceClassification": "last",
    "MvpForSequenceClassification": "start",
    "T5ForSequenceClassification": "start",
    "MT5ForSequenceClassification": "start",
    "UMT5ForSequenceClassification": "start",
    "BartForQuestionAnswering": "start",
    "MBartForQuestionAnswering": "last",
    "MvpForQuestionAnswering": "start",
    "T5ForQuestionAnswering": "start",
    "MT5ForQuestionAnswering": "start",
    "UMT5ForQuestionAnswering": "start",
}
# With attn_implementation="auto", a forward on the CPU attending over at least this many tokens
# runs SDPA's fused kernel: where it overtakes eager attention under the vectorized backward (the
# measurements are in docs/methods/gradients.md)
SDPA_MIN_TOKENS = 256
# On a GPU, from this many: where the folded SDPA backward overtook eager attention on an H200
# (docs/benchmarks-gpu.md); shorter: not measured
SDPA_MIN_TOKENS_GPU = 1024


#: the model's own greedy tokens: none of the processors a generation config may set (a
#: repetition penalty, n-gram blocking, a minimum length, a forced end at the limit, suppressed or
#: biased tokens) that would make a target other than the top prediction. A forced first token
#: (a language code) stays, as text targets start with it.
_GREEDY: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": None,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "guidance_scale": None,
    "watermarking_config": None,
    # and nothing that stops early or decodes otherwise (a time limit, stop strings...)
    "max_time": None,
    "stop_strings": None,
    "token_healing": False,
    "num_return_sequences": 1,
    "penalty_alpha": None,
    "dola_layers": None,
}

#: one lock per Hugging Face model (weak: it goes with the model); see :attr:`Model.call_lock`
_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()
#: transformers' loading is not thread-safe (a concurrent load can come back without its tied
#: weights), and attrax silences its logging for a load: one load at a time per process
_LOADING = threading.Lock()


def model_lock(module: torch.nn.Module) -> threading.RLock:
    """The lock calls on ``module`` take turns through (made on first use)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = threading.RLock()
        return lock


_ABSENT = object()


@contextlib.contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode for the block (no dropout in an attribution), each submodule's
    own mode put back after it: a training loop may have called ``.train()`` since loading."""
    training = [m for m in module.modules() if m.training]
    if not training:
        yield
        return
    module.eval()
    try:
        yield
    finally:
        for m in training:
            m.training = True


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """``module``'s parameters without gradients for the block (autograd keeps nothing for
    them), each one that had them given them back after: a user's model may be training."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)


@contextlib.contextmanager
def whole_feed_forward(module: torch.nn.Module) -> Iterator[None]:
    """transformers' ``chunk_size_feed_forward`` runs a block's feed-forward (and BERT's second
    LayerNorm) a chunk of positions at a time, so hooks on its modules would see chunks: every
    call turns it off (it changes no value: the feed-forward is position-wise) and puts it back
    after."""
    chunked = [m for m in module.modules() if getattr(m, "chunk_size_feed_forward", 0)]
    saved = [m.chunk_size_feed_forward for m in chunked]
    for inner in chunked:
        setattr(inner, "chunk_size_feed_forward", 0)  # noqa: B010 (an attribute torch types as a module)
    try:
        yield
    finally:
        for inner, size in zip(chunked, saved, strict=True):
            setattr(inner, "chunk_size_feed_forward", size)  # noqa: B010


@contextlib.contextmanager
def instance_attributes(patches: Sequence[tuple[object, str, Any]]) -> Iterator[None]:
    """Set each ``(obj, name, value)`` on the instance for the block, then put back what the
    instance had: its own attribute (a user's or accelerate's ``forward`` wrapper), or none."""
    saved = [(obj, name, obj.__dict__.get(name, _ABSENT)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, old in reversed(saved):  # reversed: an object patched twice ends as found
            if old is _ABSENT:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, old)


class Model:
    """A Hugging Face model with its tokenizer, ready for ``torch.func``: a causal or seq2seq LM,
    or a sequence or token classifier (``*ForSequenceClassification``, ``*ForTokenClassification``).

    Holds the real state attrax needs: the module (eval mode, no parameter grads unless built
    with ``freeze=False``), the tokenizer,
    how the model turns ids into the embeddings it accepts as ``inputs_embeds``, and its limits.
    Build it with :func:`load_model`. Question-answering models (``*ForQuestionAnswering``) and
    masked LMs (``*ForMaskedLM``) on bidirectional encoders are taken too.

    Attributes:
        hf: the wrapped ``PreTrainedModel`` (eval mode, parameter gradients off unless built
            with ``freeze=False``).
        tokenizer: its tokenizer.
        name: the model's name (its path or hub name; ``"attrax-default"`` for the demo model).
        task: ``"generation"``, ``"sequence-classification"``, ``"token-classification"``,
            ``"question-answering"`` or ``"fill-mask"``.
        model_type: ``"decoder-only"``, ``"encoder-decoder"`` or ``"encoder-only"``, as results
            record it; ``is_encoder_decoder`` and ``causal`` (position p sees only p and before)
            are the flags it is read from.
        labels: class id -> label name for classifiers (``{0: "start", 1: "end"}`` for
            question answering); empty for language models.
        head_type: a classifier's ``"single-label"``, ``"multi-label"`` or ``"regression"``;
            None for other tasks.
        device, dtype, hidden_size: where the weights are, the embeddings' dtype and width.
        max_positions, pad_token_id, eos_token_id, decoder_start_token_id, stop_token_ids: the
            limits and special tokens attrax tokenizes and generates with.

    >>> import attrax as ax
    >>> model = ax.load_model()
    >>> model.is_encoder_decoder
    False
    """

    def __init__(
        self,
        hf_model: PreTrainedModel,
        tokenizer: Any,
        name: str | None = None,
        attn_implementation: str = "auto",
        freeze: bool = True,
    ) -> None:
        _check_attention(attn_implementation)
        if not isinstance(hf_model, PreTrainedModel):
            raise ModelError(
                f"`model` must be a transformers PreTrainedModel, got {type(hf_model).__name__}"
            )
        self.task = _task(hf_model)
        if self.task == "generation" and hf_model.get_output_embeddings() is None:
            raise ModelError(
                f"`model` ({type(hf_model).__name__}) has no language-model head: attrax needs a "
                "causal LM (AutoModelForCausalLM) or a seq2seq LM (AutoModelForSeq2SeqLM)"
            )
        if tokenizer is None:
            raise ModelError("`tokenizer` is required when `model` is a model instance")
        if not callable(tokenizer) or not hasattr(tokenizer, "convert_ids_to_tokens"):
            raise ModelError(
                "`tokenizer` must be a transformers tokenizer, a local path or a hub name, got "
                f"{type(tokenizer).__name__}"
            )
        longest = getattr(tokenizer, "model_max_length", None)
        if longest is not None and not isinstance(longest, int | float):
            # a hand-edited tokenizer_config.json: transformers compares it at every call
            raise ModelError(
                "`tokenizer`'s `model_max_length` (tokenizer_config.json) must be a number of "
                f"tokens, got {longest!r}"
            )
        if any(p.is_meta for p in hf_model.parameters()):
            raise ModelError(
                f"`model` ({type(hf_model).__name__}) has weights on the 'meta' device, which "
                "holds no values: load them (from_pretrained, or to_empty and load_state_dict)"
            )
        self.hf = hf_model.eval()
        if freeze:  # else each call freezes the parameters and gives back their requires_grad
            hf_model.requires_grad_(False)
        self.tokenizer = tokenizer
        self._tokens: dict[int, str] = {}  # id -> token string, filled by token_strings
        self.attn_implementation = attn_implementation
        config = hf_model.config
        self.name = name or getattr(config, "_name_or_path", "") or type(hf_model).__name__
        self.is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        #: an encoder-decoder sequence classifier (BART-MNLI): how its decoder's input starts
        #: (:data:`SEQ2SEQ_CLASSIFIERS`); None for any other model
        self.seq2seq_classifier = SEQ2SEQ_CLASSIFIERS.get(type(hf_model).__name__)
        if self.is_encoder_decoder and self.task != "generation" and not self.seq2seq_classifier:
            what = {"question-answering": "question-answering model", "fill-mask": "masked LM"}
            raise ModelError(
                f"`model` ({type(hf_model).__name__}) is an encoder-decoder "
                f"{what.get(self.task, 'classifier')}; attrax attributes encoder-only and "
                "decoder-only classifiers and question-answering models, and the "
                f"encoder-decoder ones {', '.join(SEQ2SEQ_CLASSIFIERS)}"
            )
        #: class id -> label name (classifiers; a question-answering model's "start" and "end")
        self.labels: dict[int, str] = {}
        if self.task == "question-answering":
            self.labels = dict(enumerate(QA_TARGETS))
        elif self.task not in ("generation", "fill-mask"):  # a masked LM's classes: its tokens
            names = getattr(config, "id2label", None) or {}
            count = int(getattr(config, "num_labels", 0) or len(names))
            self.labels = {i: str(names.get(i, f"LABEL_{i}")) for i in range(count)}
        #: what a classifier's logits are (:data:`HEADS`): a softmax's over the classes, each
        #: label's own sigmoid's, or a value; None for other tasks
        self.head_type = _head_type(config, self.task, len(self.labels))
        # RoBERTa-like embeddings keep the index their position ids count from
        offset = getattr(getattr(self.hf.base_model, "embeddings", None), "padding_idx", None)
        self.max_positions = _arch.max_positions(
            config, offset if isinstance(offset, int) else None
        )
        pad = _first_int(
            tokenizer.pad_token_id, getattr(config, "pad_token_id", None), tokenizer.eos_token_id
        )
        self.pad_token_id: int = 0 if pad is None else pad
        self.eos_token_id = _first_int(
            tokenizer.eos_token_id, getattr(config, "eos_token_id", None)
        )
        self._source_embedding = hf_model.get_input_embeddings()
        decoder = hf_model.get_decoder() if self.is_encoder_decoder else None
        self._target_embedding = (
            getattr(decoder, "embed_tokens", None) or self._source_embedding
            if decoder is not None
            else self._source_embedding
        )
        self._head: torch.nn.Module | None = (
            hf_model.get_output_embeddings() if self.task == "generation" else None
        )
        # decoder-only sequence classifiers score their last real token with a `score` head
        self._score = getattr(hf_model, "score", None) if self.task != "generation" else None
        self._activations = [m for m in hf_model.modules() if activation_kind(m) is not None]
        # DeBERTa-v2, GPT-Neo, BLOOM: attention attrax runs itself, as any implementation
        self._routed = bool(_routed.modules(hf_model))
        self._first_position = _first_position_feed_forward(hf_model, self.task)
        # Gemma 4's and Gemma 3n's per-layer embeddings: a second table looked up by token id
        self._per_layer = bool(getattr(hf_model.config, "hidden_size_per_layer_input", 0)) and (
            hasattr(body(hf_model), "get_per_layer_inputs")
        )
        self._source_scale = 1.0
        self._target_scale = 1.0
        with frozen(hf_model):  # the probes below run it (in eval mode, set above)
            if self.seq2seq_classifier:
                self._check_shared_table()
            self._calibrate_embedding_scales()
            #: whether position p sees only positions <= p (decoder-only LMs and classifiers)
            self.causal = not self.is_encoder_decoder and self._probe_causal()
            if self.task == "fill-mask" and tokenizer.mask_token_id is None:
                raise ModelError(
                    f"`model` ({type(hf_model).__name__}) is a masked language model, but its "
                    "tokenizer has no mask token to place in the inputs"
                )
            if self.task in ("question-answering", "fill-mask") and self.causal:
                kind, why = {
                    "question-answering": (
                        "question-answering model",
                        "its answer's probability reads every position, which attrax's causal "
                        "engine (it cuts a sequence after its last target) does not see",
                    ),
                    "fill-mask": (
                        "masked language model",
                        "attrax checks masked LMs on bidirectional encoders only",
                    ),
                }[self.task]
                raise ModelError(
                    f"`model` ({type(hf_model).__name__}) is a decoder-only {kind}: {why}; attrax "
                    "attributes encoder-only ones (BERT, RoBERTa, DeBERTa, ...)"
                )
            self.check_unchanged()
            if self.task == "generation":
                self._check_head()

    def check_unchanged(self) -> None:
        """Refuse what was done to the Hugging Face model that attrax's own forwards would skip,
        at load and at each call (it may have been done since): a forward compiled in place (no
        hook or patch of attrax's reaches it), a hook on the model itself where attrax computes
        the outputs from its parts, and tuple outputs that attrax cannot read by name."""
        hf, what = self.hf, type(self.hf).__name__
        if getattr(hf, "_compiled_call_impl", None) is not None:
            raise ModelError(
                f"`model` ({what}) was compiled in place (`.compile()`): attrax runs its modules "
                "with hooks and patches of its own that a compiled forward skips; attribute an "
                "uncompiled model (compile a copy for your own use)"
            )
        # a language model runs whole, but its logits are its head's, read past the model's
        # output; a decoder-only or encoder-decoder classifier runs its body, then its head
        skipped = hf._forward_hooks if self.task == "generation" else {}
        if self._score is not None or self.seq2seq_classifier:
            skipped = {**hf._forward_hooks, **hf._forward_pre_hooks}
        if skipped:
            head = "output embeddings" if self.task == "generation" else "classification head"
            raise ModelError(
                f"`model` ({what}) has a forward hook on the model itself: attrax computes its "
                f"outputs from its parts (the body, then its {head}), past that hook, so any "
                "hook there is refused, one that only reads too; register it on the head module "
                "or a block instead"
            )
        if getattr(hf.config, "return_dict", True) is False:
            raise ModelError(
                f"`model` ({what}) has config.return_dict=False: attrax reads its outputs by "
                "name; set model.config.return_dict = True"
            )

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return _weight(self._source_embedding).dtype

    @property
    def hidden_size(self) -> int:
        return int(_weight(self._source_embedding).shape[-1])

    @property
    def head_width(self) -> int:
        """Scores the output projection gives per position (the vocabulary); 0 without one (a
        classifier's forward gives its few class logits itself)."""
        if self.task == "fill-mask":  # its vocabulary's logits at each target's row
            return int(self.hf.config.get_text_config().vocab_size)
        weight = getattr(self._head, "weight", None)
        return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else 0

    @property
    def output_width(self) -> int:
        """Entries of the logits an objective scores: the vocabulary, or a classifier's classes."""
        return self.head_width or len(self.labels)

    @property
    def model_type(self) -> str:
        """``"decoder-only"``, ``"encoder-decoder"`` or ``"encoder-only"``, as results record it."""
        if self.is_encoder_decoder:
            return "encoder-decoder"
        return "decoder-only" if self.causal else "encoder-only"

    def __repr__(self) -> str:
        return f"attrax.Model({self.name!r}, {self.model_type}, {type(self.hf).__name__})"

    @property
    def decoder_start_token_id(self) -> int | None:
        """An encoder-decoder's first decoder token (None for other models). A language model's
        is its generation config's, read at each call as ``generate`` reads it; a classifier's
        is its config's, which its forward shifts in."""
        if not self.is_encoder_decoder:
            return None
        config = self.hf.config
        generation = getattr(self.hf, "generation_config", None)
        return _first_int(
            getattr(generation, "decoder_start_token_id", None)
            if self.task == "generation"
            else None,
            getattr(config, "decoder_start_token_id", None),
            getattr(generation, "decoder_start_token_id", None),
            getattr(config, "bos_token_id", None),
            self.pad_token_id,
        )

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The ids greedy generation stops at: the generation config's end-of-sequence ids (a
        chat model's end of turn among them), as ``generate`` reads them, else the EOS."""
        ids = getattr(getattr(self.hf, "generation_config", None), "eos_token_id", None)
        listed = (
            [ids] if isinstance(ids, int) else list(ids) if isinstance(ids, list | tuple) else []
        )
        stops = tuple(i for i in listed if isinstance(i, int) and not isinstance(i, bool))
        return stops or (() if self.eos_token_id is None else (self.eos_token_id,))

    def _target_language(self) -> int | None:
        """The token an NLLB, M2M100 or mBART-50 tokenizer starts its text targets with (its
        ``tgt_lang``), for generation to force first as text targets start with it, when the
        generation config forces none (Hugging Face's examples pass it to ``generate``)."""
        tokenizer = self.tokenizer
        generation = getattr(self.hf, "generation_config", None)
        if (
            not self.is_encoder_decoder
            or getattr(tokenizer, "tgt_lang", None) is None
            or getattr(generation, "forced_bos_token_id", None) is not None
        ):
            return None
        first = tokenizer(text_target="a")["input_ids"][0]
        ordinary = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
        return first if first in tokenizer.all_special_ids and first not in ordinary else None

    @property
    def call_lock(self) -> threading.RLock:
        """Held by each method call: attrax patches the Hugging Face model's modules for the
        length of a call, so calls on one model take turns, through whichever :class:`Model`
        wraps it (one lock per ``hf`` module, not per wrapper)."""
        return model_lock(self.hf)

    def embedding_rows(self, side: str = "source") -> int:
        """How many token ids the embedding table of ``side`` (as :meth:`embed`) has rows for."""
        table = self.embedding_module(side)
        return int(getattr(table, "num_embeddings", 0) or _weight(table).shape[0])

    def embedding_module(self, side: str = "source") -> torch.nn.Module:
        """The module that embeds ``side``'s ids (as :meth:`embed`): the encoder's or the
        decoder-only model's (``"source"``), or an encoder-decoder's decoder's (``"target"``)."""
        return self._target_embedding if side == "target" else self._source_embedding

    def embed(self, ids: torch.Tensor, side: str = "source") -> torch.Tensor:
        """Rows of the embedding table for ``ids``: what attributions are taken with respect to.

        ``side="source"`` is the decoder-only sequence or the encoder input, ``"target"`` the decoder
        input of an encoder-decoder model. Any scale the model applies to its embeddings is applied
        by :meth:`logits_at`, so both sides of a translator are attributed in the same units.

        >>> import attrax as ax, torch
        >>> ax.load_model().embed(torch.tensor([[5, 6]])).shape
        torch.Size([1, 2, 128])
        """
        if side not in ("source", "target"):
            raise OptionError(f"`side` must be 'source' or 'target', got {side!r}")
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
            raise InputError(f"`ids` must be an int tensor of token ids, got {ids!r}")
        rows = self.embedding_rows(side)
        if ids.numel():
            low, high = (int(v) for v in torch.aminmax(ids))  # one pass, one device sync
            if low < 0 or high >= rows:
                raise InputError(
                    f"`ids` holds ids outside the {side} embedding's 0..{rows - 1}: {low}..{high}"
                )
        ids = ids.to(self.device)
        table = self.embedding_module(side)
        # rows, not a graph: outside a call a training model's table may require grad
        return table(ids).detach()

    def logits_at(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        index: torch.Tensor,
        decoder_embeds: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        token_types: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[batch, k, vocab]`` at positions ``index[batch, k]`` of the (decoder) sequence.

        ``embeds`` (and ``decoder_embeds``) are embedding-table rows as :meth:`embed` returns them.
        Full-vocabulary logits are computed only at the gathered positions. A classifier gives its
        class logits (:meth:`hidden_at`).
        """
        hidden = self.hidden_at(
            embeds,
            attention_mask,
            index,
            decoder_embeds,
            decoder_attention_mask,
            token_types=token_types,
        )
        return self.head(hidden)

    def hidden_at(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        index: torch.Tensor,
        decoder_embeds: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        forward_mode: bool = False,
        token_types: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """What the language-model head receives at positions ``index[batch, k]``: ``[batch, k, H]``.

        The head itself runs on zero positions, so the forward costs nothing at the vocabulary.
        ``forward_mode=True`` when the call is differentiated with ``jvp``: attention then runs
        eager, since SDPA's fused kernels have no forward-mode derivative. A classifier returns
        its class logits ``[batch, k, classes]`` instead (its :meth:`head` is the identity): those
        of the sequence for every ``k``, or those of token ``index[batch, k]``.
        """
        if self.task != "generation":
            return self._class_logits(embeds, attention_mask, index, token_types, forward_mode)
        tokens = embeds.shape[-2]
        if decoder_embeds is not None:
            tokens = max(tokens, decoder_embeds.shape[-2])
        implementation = "eager" if forward_mode else self.attention_for(tokens, embeds.device)
        if self._source_scale != 1.0:
            embeds = embeds * self._source_scale
        if decoder_embeds is not None and self._target_scale != 1.0:
            decoder_embeds = decoder_embeds * self._target_scale
        captured: list[torch.Tensor] = []
        assert self._head is not None  # a language model's (__init__ refuses one without)
        with (
            self.attention_as(implementation, required=forward_mode),
            capture_before(self._head, index, captured),
            fast_activations(self._activations),
        ):
            if self.is_encoder_decoder:
                self.hf(
                    inputs_embeds=embeds,
                    attention_mask=attention_mask,
                    decoder_inputs_embeds=decoder_embeds,
                    decoder_attention_mask=decoder_attention_mask,
                    use_cache=False,
                )
            else:
                positions = torch.arange(embeds.shape[-2], device=embeds.device)
                self.hf(
                    inputs_embeds=embeds,
                    attention_mask=attention_mask,
                    position_ids=positions.expand(attention_mask.shape),
                    use_cache=False,
                    **self._per_layer_inputs(embeds),
                )
        return captured[0]

    def _class_logits(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        index: torch.Tensor,
        token_types: torch.Tensor | None,
        forward_mode: bool,
    ) -> torch.Tensor:
        implementation = (
            "eager" if forward_mode else self.attention_for(embeds.shape[-2], embeds.device)
        )
        if self._source_scale != 1.0:
            embeds = embeds * self._source_scale
        # without padding HF needs no mask: it skips building and adding one in every layer
        unpadded = mask.device.type == "cpu" and _keeps_every_token(mask)
        kwargs: dict[str, Any] = {
            "inputs_embeds": embeds,
            "attention_mask": None if unpadded else mask,
            **self._per_layer_inputs(embeds),
        }
        if token_types is not None:
            kwargs["token_type_ids"] = token_types
        if self.causal:
            positions = torch.arange(embeds.shape[-2], device=embeds.device)
            kwargs["position_ids"] = positions.expand(mask.shape)
        rows = torch.arange(index.shape[0], device=index.device)[:, None]
        with (
            self.attention_as(implementation, required=forward_mode),
            fast_activations(self._activations),
            _first_position_only(self._first_position),
        ):
            if self.seq2seq_classifier and self.task == "question-answering":
                # transformers shifts the ids into the decoder, which embeddings do not give
                decoder = self.decoder_inputs(embeds, mask)
                out = self.hf(**kwargs, decoder_inputs_embeds=decoder, use_cache=False)
            elif self.seq2seq_classifier:
                # transformers finds the last EOS from ids, which embeddings do not give
                decoder = self.decoder_inputs(embeds, mask)
                hidden = body(self.hf)(**kwargs, decoder_inputs_embeds=decoder, use_cache=False)[0]
                return self.hf.classification_head(hidden[rows, index])
            elif self._score is not None and self.task == "sequence-classification":
                # from embeddings HF cannot find the last real token, so the pooling happens here
                hidden = body(self.hf)(**kwargs, use_cache=False)[0]
                return self._score(hidden[rows, index])
            elif self.task == "fill-mask":  # the vocabulary's logits at the masks alone
                head = _masked_lm_head(self.hf)
                with _rows_only(head, index):
                    logits = self.hf(**kwargs).logits
                return logits if head is not None else logits[rows, index]
            else:
                out = self.hf(**kwargs)
        if self.task == "question-answering":
            # index holds each target's slot: 0 the answer's start, 1 its end
            both = torch.stack((out.start_logits, out.end_logits), dim=1)  # [B, 2, L]
            # padding is no answer: no probability (finite, so 0 * log p stays 0)
            padding = ~mask.to(torch.bool)[:, None, :]
            both = both.masked_fill(padding, torch.finfo(both.dtype).min)
            return both[rows, index]
        logits = out.logits
        if self.task == "sequence-classification":
            return logits[:, None, :].expand(index.shape[0], index.shape[1], logits.shape[-1])
        return logits[rows, index]

    @torch.no_grad()
    def stream_attention(self, t: Any, on_map: Callable[[str, torch.Tensor], None]) -> None:
        """One teacher-forced eager forward over tensors ``t`` (:class:`~attrax._inputs.Tensors`)
        that hands each layer's attention weights ``[B, heads, queries, keys]`` to
        ``on_map(stack, weights)`` as the layer runs, in the order the layers run.

        ``stack`` is ``"self"`` (decoder-only), ``"encoder"``, ``"decoder"`` (decoder
        self-attention) or ``"cross"``. No map outlives its layer unless ``on_map`` keeps it, so
        a long input never holds every layer's ``[L, L]`` maps at once. The head computes no
        logits.
        """
        modules = attention_modules(self.hf)

        def hook(module: torch.nn.Module, _args: Any, output: Any) -> None:
            stack, index = modules[module]
            weights = output[index] if isinstance(output, tuple) else None
            if not isinstance(weights, torch.Tensor) or weights.ndim != 4:
                raise ModelError(
                    f"{type(module).__name__} returned no attention weights under eager attention"
                )
            on_map(stack, weights)

        handles = [module.register_forward_hook(hook) for module in modules]
        # a language model's head runs on no position; a classifier's is small
        skip_head = (
            capture_before(self._head, t.index, [])
            if self._head is not None
            else contextlib.nullcontext()
        )
        try:
            with (
                self.attention_as("eager", required=True),
                skip_head,
                fast_activations(self._activations),
            ):
                out = self._teacher_forced(t, output_attentions=not modules)
        finally:
            for handle in handles:
                handle.remove()
        if not modules:  # the model's own table names none: its returned maps, in order
            if not self.is_encoder_decoder:
                maps = getattr(out, "attentions", None)
                if not maps:  # a state-space model (Mamba) has no attention to return
                    raise ModelError(
                        f"{type(self.hf).__name__}: its forward returns no attention weights "
                        "(a model without attention layers, such as Mamba, or one that does "
                        "not record them)"
                    )
                for weights in maps:
                    on_map("self", weights)
                return
            for weights in out.encoder_attentions:
                on_map("encoder", weights)
            for own, cross in zip(out.decoder_attentions, out.cross_attentions, strict=True):
                on_map("decoder", own)
                on_map("cross", cross)

    def _teacher_forced(self, t: Any, output_attentions: bool) -> Any:
        if self.task != "generation":
            kwargs: dict[str, Any] = {"input_ids": t.ids, "attention_mask": t.mask}
            if t.token_types is not None:
                kwargs["token_type_ids"] = t.token_types
            return self.hf(**kwargs, output_attentions=output_attentions)
        if self.is_encoder_decoder:
            return self.hf(
                input_ids=t.ids,
                attention_mask=t.mask,
                decoder_input_ids=t.decoder_ids,
                decoder_attention_mask=t.decoder_mask,
                output_attentions=output_attentions,
                use_cache=False,
            )
        positions = torch.arange(t.ids.shape[-1], device=t.ids.device)
        return self.hf(
            input_ids=t.ids,
            attention_mask=t.mask,
            position_ids=positions.expand(t.mask.shape),
            output_attentions=output_attentions,
            use_cache=False,
        )

    @torch.no_grad()
    def encoder_attention_maps(
        self, ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """An encoder-decoder's encoder self-attention maps ``[B, heads, Q, S]`` per layer."""
        with self.attention_as("eager", required=True):
            out = self.hf.get_encoder()(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                output_attentions=True,
            )
        return tuple(out.attentions)

    def attention_for(self, tokens: int, device: torch.device) -> str:
        """The attention implementation attrax runs for a forward over ``tokens`` on ``device``.

        An explicit ``attn_implementation`` is kept; ``"auto"`` picks ``"sdpa"`` from
        :data:`SDPA_MIN_TOKENS` tokens on the CPU and :data:`SDPA_MIN_TOKENS_GPU` on other devices
        (when the model supports it), ``"eager"`` otherwise.
        """
        if self.attn_implementation != "auto":
            return self.attn_implementation
        least = SDPA_MIN_TOKENS if device.type == "cpu" else SDPA_MIN_TOKENS_GPU
        sdpa = getattr(self.hf, "_supports_sdpa", False) and can_switch(self.hf)
        return "sdpa" if tokens >= least and sdpa else "eager"

    @contextlib.contextmanager
    def attention_as(self, implementation: str, required: bool = False) -> Iterator[None]:
        """Run the model's attention as ``implementation`` inside the block, then switch back.

        A model that cannot switch after loading keeps its own attention, which gives the same
        gradients; when the block ``required`` this one (attention maps, forward mode), that is a
        :class:`ModelError`. While SDPA runs, its calls that need gradients go through
        :func:`~attrax._sdpa.folded_sdpa`: one fused backward for all of a vectorized
        backward's targets. DeBERTa-v2's, GPT-Neo's and BLOOM's attention runs as attrax's own
        (:mod:`~attrax._routed`), as any implementation.
        """
        hf = self.hf
        if self._routed:
            with _routed.routed(hf, implementation):
                yield
            return
        previous = getattr(hf.config, "_attn_implementation", None) or "eager"
        if previous == implementation:
            with _sdpa_folded(previous):
                yield
            return
        if not can_switch(hf):
            if required:
                raise ModelError(
                    f"{type(hf).__name__} runs {previous!r} attention and cannot switch after "
                    f"loading; this needs {implementation!r}: load it with "
                    f"attn_implementation={implementation!r}"
                )
            with _sdpa_folded(previous):
                yield
            return
        hf.set_attn_implementation(implementation)
        try:
            with _sdpa_folded(implementation):
                yield
        finally:
            hf.set_attn_implementation(previous)

    @functools.cached_property
    def subwords(self) -> str:
        """The vocabulary's sub-word scheme (one of ``attrax._tokens.SCHEMES``), read from all its
        token strings: one example's few tokens may carry no mark (a one-word text).

        >>> import attrax as ax
        >>> ax.load_model().subwords
        'word-level'
        """
        return detect_scheme(self.tokenizer.get_vocab())

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """The tokenizer's strings of ``ids``, each distinct id converted once per model: labelling
        a result asks for the same ids call after call.

        >>> import attrax as ax
        >>> model = ax.load_model()
        >>> model.token_strings([5, 6, 5])
        ['1', '2', '1']
        """
        known = self._tokens
        new = [i for i in dict.fromkeys(ids) if i not in known]
        if new:
            known.update(zip(new, self.tokenizer.convert_ids_to_tokens(new), strict=True))
        return [known[i] for i in ids]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from head inputs (:meth:`hidden_at`): the output projection and what follows it
        (a classifier's :meth:`hidden_at` gives logits already)."""
        if not isinstance(hidden, torch.Tensor):
            raise InputError(
                f"`hidden` must be a tensor of head inputs, got {type(hidden).__name__}"
            )
        if self._head is None:
            return hidden
        # as rows: a gathered (strided) 3-D input made matmul expand the projection per row
        # into a bmm, which bfloat16 copies (823 MiB for 32 rows of GPT-2's vocabulary)
        logits = self._head(hidden.flatten(0, -2)).unflatten(0, hidden.shape[:-1])
        return self._after_projection(logits)

    def head_rows(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        """:meth:`head`'s logits at ``ids`` only (``[...]`` from ``hidden`` ``[..., H]`` and
        ``ids`` ``[...]``): one row of the output projection per id, not the vocabulary; None
        where the projection is no plain ``Linear`` (then :meth:`head` it is)."""
        head = self._head
        # exactly a Linear: a subclass (a quantized one) may compute otherwise
        if not isinstance(head, torch.nn.Linear) or type(head) is not torch.nn.Linear:
            return None
        rows = head.weight[ids]  # [..., H]
        # a batched matmul, as the projection's: it accumulates low precision in float32
        logits = (hidden.unsqueeze(-2) @ rows.to(hidden.dtype).unsqueeze(-1))[..., 0, 0]
        if head.bias is not None:
            logits = logits + head.bias[ids]
        return self._after_projection(logits, ids)

    def _after_projection(
        self, logits: torch.Tensor, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What follows the output projection: the final logits' bias (its entries at ``ids``
        when ``logits`` are those ids' only), the logit scale and the soft cap."""
        bias = getattr(self.hf, "final_logits_bias", None)
        if isinstance(bias, torch.Tensor):
            logits = logits + (bias if ids is None else bias.reshape(-1)[ids])
        scale = _arch.logit_scale(self.hf.config)
        if scale != 1.0:
            logits = logits * scale
        cap = getattr(self.hf.config, "final_logit_softcapping", None)
        return self.soft_cap(logits, cap) if cap else logits

    def soft_cap(self, logits: torch.Tensor, cap: float) -> torch.Tensor:
        """Gemma 2's soft-capped logits ``cap * tanh(logits / cap)`` (LRP gives it its rule)."""
        return torch.tanh(logits / cap) * cap

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations (token ids, EOS included when produced) of tokenized prompts.

        >>> import attrax as ax
        >>> model = ax.load_model()
        >>> len(model.generate([model.tokenizer("1 2 =")["input_ids"]], 3)[0]) <= 3
        True
        """
        if (
            isinstance(prompts, str | bytes)
            or not prompts
            or not all(
                isinstance(p, Sequence | torch.Tensor)
                and not isinstance(p, str | bytes)
                and len(p) > 0
                for p in prompts
            )
        ):
            raise InputError(
                "`prompts` must be a non-empty list of token-id lists (tokenized prompts), got "
                f"{prompts!r}; to generate from texts, attribute with targets=None"
            )
        width = max(len(p) for p in prompts)
        pad = self.pad_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            # decoder-only generation continues from the last column, so prompts are left-padded
            start = 0 if self.is_encoder_decoder else width - len(prompt)
            ids[row, start : start + len(prompt)] = torch.tensor(list(prompt))
            mask[row, start : start + len(prompt)] = 1
        stops = self.stop_token_ids
        language = self._target_language()  # None: the config's own forced first token, if any
        forced = {} if language is None else {"forced_bos_token_id": language}
        # keywords, not a GenerationConfig: transformers fills a given config's defaults back
        # from the model's, so only keywords turn the configured processors off
        out = self.hf.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            eos_token_id=list(stops) or None,
            decoder_start_token_id=self.decoder_start_token_id,
            **forced,
            **_GREEDY,
        ).cpu()
        new = out[:, 1:] if self.is_encoder_decoder else out[:, width:]
        result = []
        for row in new.tolist():
            ends = [i for i, token in enumerate(row) if token in stops]
            result.append(row[: ends[0] + 1] if ends else row)
        return result

    def _per_layer_inputs(self, embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """A forward's ``per_layer_inputs`` (Gemma 4's and Gemma 3n's per-layer embeddings,
        looked up by the token ids of :func:`reading`, repeated over the stacked copies of the
        batch and cut to the embeddings' length), or none for a model without them."""
        if not self._per_layer:
            return {}
        ids = _READING.get()
        if ids is None:
            raise ModelError(
                f"{type(self.hf).__name__}: its per-layer embeddings are looked up by token id, "
                "and this forward from embeddings was given none"
            )
        ids = ids.to(embeds.device).repeat(embeds.shape[0] // ids.shape[0], 1)
        lookup = cast(Callable[..., torch.Tensor], body(self.hf).get_per_layer_inputs)
        return {"per_layer_inputs": lookup(ids[:, : embeds.shape[1]])}

    def _calibrate_embedding_scales(self) -> None:
        """Find the factor that makes ``inputs_embeds`` forwards equal ``input_ids`` forwards.

        Some models scale embeddings only when they embed ids themselves (Marian's encoder), others
        always (its decoder); a probe on a few tokens finds out instead of a table per architecture.
        """
        ids = self._probe_ids(count=5, step=7, offset=3)
        mask = torch.ones_like(ids)
        # an encoder-decoder classifier's decoder reads the source's embeddings, shifted
        two = self.is_encoder_decoder and not self.seq2seq_classifier
        sides = ["source", "target"] if two else ["source"]
        with torch.no_grad():
            for side in sides:
                module = self._target_embedding if side == "target" else self._source_embedding
                candidates = [1.0, *_embedding_scales(self.hf, side)]
                with _failing_forward(self.hf, "from `input_ids`"):
                    ref = self._probe(ids, mask, None, None)
                if not bool(torch.isfinite(ref).all()):  # NaN compares unequal to itself
                    raise ModelError(
                        f"{type(self.hf).__name__}: its outputs on a probe input are not finite "
                        "(inf/NaN): its weights hold NaN/inf or overflow its dtype"
                    )
                errors = []
                with _failing_forward(self.hf, "from `inputs_embeds`"):
                    for s in candidates:
                        self._source_scale = s if side == "source" else self._source_scale
                        errors.append(_mismatch(self._probe(ids, mask, module(ids) * s, side), ref))
                best = min(range(len(candidates)), key=errors.__getitem__)
                if errors[best] <= _tolerance(ref.dtype):
                    if side == "target":
                        self._target_scale = candidates[best]
                    else:
                        self._source_scale = candidates[best]
                else:
                    raise ModelError(
                        f"{type(self.hf).__name__}: a forward from `inputs_embeds` does not "
                        "reproduce the forward from `input_ids`; attrax cannot attribute to its "
                        "embeddings"
                    )

    def _check_shared_table(self) -> None:
        """An encoder-decoder classifier reads each token twice, in the encoder and (shifted) in
        the decoder: one embedding per token needs one table for both."""
        source = _weight(self._source_embedding)
        target = _weight(self._target_embedding)
        if source is not target and (
            source.shape != target.shape or not torch.equal(source, target)
        ):
            raise ModelError(
                f"`model` ({type(self.hf).__name__}) embeds its encoder's and its decoder's "
                "tokens with different tables, so a token has no one embedding to attribute to; "
                "attrax attributes encoder-decoder classifiers whose tables are shared (tied)"
            )

    def decoder_inputs(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """An encoder-decoder classifier's decoder input from its encoder's ``embeds``
        ``[B, L, H]``: the tokens shifted one to the right, as transformers shifts the ids. The
        first is the decoder start token's row or (mBART, PLBart) the last real token's, the
        language id, padding on the right (``mask``)."""
        if self.seq2seq_classifier == "last":
            rows = torch.arange(mask.shape[0], device=mask.device)
            first = embeds[rows, mask.sum(-1).long() - 1][:, None, :]
        else:
            start = torch.tensor([self.decoder_start_token_id], device=embeds.device)
            first = self._source_embedding(start).to(embeds.dtype) * self._source_scale
            first = first.expand_as(embeds[..., :1, :])
        return torch.cat((first, embeds[..., :-1, :]), dim=-2)

    def _check_head(self) -> None:
        """The split forward (hidden states, then :meth:`head`) must reproduce the model's logits."""
        ids = self._probe_ids(count=6, step=5, offset=2)
        mask = torch.ones_like(ids)
        index = torch.tensor([[1, 4]], device=self.device)
        with torch.no_grad():
            full = self._probe(ids, mask, None, None)[:, [1, 4]]
            decoder = self.embed(ids, "target") if self.is_encoder_decoder else None
            try:
                with reading(ids):
                    split = self.logits_at(self.embed(ids), mask, index, decoder, mask)
            except (IndexError, RuntimeError, ValueError):  # a head that reads another layout
                split = None
        if (
            split is None
            or split.shape != full.shape
            or _mismatch(split, full) > _tolerance(full.dtype)
        ):
            raise ModelError(
                f"{type(self.hf).__name__}: its logits are not the output projection of its last "
                "hidden states (plus a final bias, scale or soft-capping); attrax does not "
                "support it yet"
            )

    @torch.no_grad()
    def _probe_causal(self) -> bool:
        """Whether the first position's output ignores later tokens (a causal model)."""
        if self.task == "generation":
            return True
        if self.task == "sequence-classification" and self._score is None:
            return False  # encoder classifiers pool the whole sequence
        ids = self._probe_ids(count=6, step=5, offset=2)
        embeds = self.embed(ids)
        changed = embeds.clone()
        changed[:, -1] = embeds[:, 0]  # another token (a constant shift would vanish in a norm)
        mask = torch.ones_like(ids)
        base = body(self.hf)
        with reading(ids):
            first = [
                base(inputs_embeds=e, attention_mask=mask, **self._per_layer_inputs(e))[0][:, 0]
                for e in (embeds, changed)
            ]
        return _mismatch(first[1], first[0]) <= _tolerance(embeds.dtype)

    def _probe_ids(self, count: int, step: int, offset: int) -> torch.Tensor:
        """``[1, L]`` probe ids. A translator's start with its decoder start token, as every decoder
        input attrax builds does: M2M100 numbers positions by counting non-pad tokens, so with a
        pad start token its forwards from embeddings are shifted by one, which this exposes."""
        vocab = _weight(self._source_embedding).shape[0]
        ids = (torch.arange(count) * step + offset).remainder(vocab)
        if self.seq2seq_classifier:  # its head reads the last EOS
            ids = torch.cat([ids, torch.tensor([self.hf.config.eos_token_id])])
        elif self.is_encoder_decoder and self.decoder_start_token_id is not None:
            ids = torch.cat([torch.tensor([self.decoder_start_token_id]), ids])
        return ids.unsqueeze(0).to(self.device)

    def _probe(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        embeds: torch.Tensor | None,
        side: str | None,
    ) -> torch.Tensor:
        per_layer: dict[str, torch.Tensor] = {}
        if embeds is not None and not self.is_encoder_decoder:
            with reading(ids):
                per_layer = self._per_layer_inputs(embeds)
        if self.task != "generation":
            given = {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds, **per_layer}
            if self.seq2seq_classifier and embeds is not None:
                decoder = self.decoder_inputs(embeds, mask)
                if self.task == "question-answering":
                    out = self.hf(**given, attention_mask=mask, decoder_inputs_embeds=decoder)
                    return torch.stack((out.start_logits, out.end_logits), dim=-1)
                # the probe ends in EOS, which transformers' head reads from ids
                hidden = body(self.hf)(**given, attention_mask=mask, decoder_inputs_embeds=decoder)
                return self.hf.classification_head(hidden[0][:, -1])
            if self._score is not None and self.task == "sequence-classification":
                hidden = body(self.hf)(**given, attention_mask=mask)[0]
                return self._score(hidden[:, -1])  # no padding in a probe: the last token
            out = self.hf(**given, attention_mask=mask)
            if self.task == "question-answering":
                return torch.stack((out.start_logits, out.end_logits), dim=-1)
            return out.logits
        if not self.is_encoder_decoder:
            if embeds is None:
                return self.hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
            return self.hf(
                inputs_embeds=embeds, attention_mask=mask, use_cache=False, **per_layer
            ).logits
        kwargs: dict[str, Any] = {"attention_mask": mask, "use_cache": False}
        if side == "source":
            kwargs["inputs_embeds"] = embeds
        else:
            kwargs["input_ids"] = ids
        if side == "target":
            kwargs["decoder_inputs_embeds"] = embeds
        else:
            kwargs["decoder_input_ids"] = ids
        return self.hf(**kwargs).logits


@contextlib.contextmanager
def _failing_forward(hf: PreTrainedModel, how: str) -> Iterator[None]:
    """A ModelError for a model whose own forward fails on attrax's probe input (an
    inconsistent config, a model that takes no ``inputs_embeds``), naming what torch said."""
    try:
        yield
    except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as error:
        said = (str(error).strip().splitlines() or [""])[0][:200]
        raise ModelError(
            f"{type(hf).__name__}: its forward {how} fails on a 5-token probe input "
            f"({type(error).__name__}: {said}); attrax runs models whose own forward runs"
        ) from error


# what every method's `model` argument takes: a loaded Model or a path for load_model
ModelLike = Model | str | os.PathLike[str]


def load_model(
    model: str | os.PathLike[str] | PreTrainedModel | Model | None = None,
    tokenizer: Any = None,
    *,
    attn_implementation: str = "auto",
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    freeze: bool = True,
) -> Model:
    """Wrap a causal or seq2seq language model, or a classifier, for attribution.

    Arguments:
        model: a local model directory, a ``PreTrainedModel`` instance, None for attrax's
            built-in offline demo model (a tiny GPT-2), or ``"attrax:classifier"`` for the
            built-in offline classifier (a tiny BERT; see docs/methods/classification.md). A hub
            name (``"gpt2"``, ``"owner/name"``) loads from the hub when it is reachable, else (or
            with ``HF_HUB_OFFLINE=1``) from the local Hugging Face cache only, so a name that is
            neither local nor cached fails at once. Refused
            with a :class:`ModelError`: weights that do not load whole (truncated, another
            config's shapes, missing tensors), heads attrax does not attribute (a masked LM on
            a causal model, say) and a directory without tokenizer files.
        tokenizer: the tokenizer (instance or name/path); defaults to the one saved with the model.
        attn_implementation: ``"auto"`` (attrax picks per call: SDPA for long sequences on the
            CPU, eager attention otherwise), ``"eager"`` or ``"sdpa"``. All three give the same
            attributions; forward-mode calls always run eager attention.
        device, dtype: where and in which precision to run (a floating-point torch dtype or its
            name, "bfloat16"); default: as loaded (CPU, float32). A ``PreTrainedModel`` given is
            not copied: it is moved, cast and put in eval mode in place (with ``freeze``, its
            gradients off too), and with ``attn_implementation="auto"`` it rests on eager
            attention (attrax switches it per call). Each method call runs it in eval mode
            again, and puts back a training mode set since.
        freeze: turn the parameters' gradients off for good (default). ``False`` leaves each
            parameter's ``requires_grad`` as it is: each method call turns them off for the
            call and back on after, so a model that trains between calls trains what it did
            (docs/quickstart.md).

    Returns:
        A :class:`Model` in eval mode, its parameter gradients off with ``freeze``.

    Loading bounds oneDNN's caches of compiled CPU kernels (bfloat16 and float16 matmuls) to 64
    each, through their environment variables where they are unset; oneDNN reads them at its
    first kernel, so before the process's first such matmul (docs/memory.md).

    >>> import attrax as ax
    >>> ax.load_model().model_type
    'decoder-only'
    >>> ax.load_model("attrax:classifier").labels
    {0: 'negative', 1: 'neutral', 2: 'positive'}
    """
    if isinstance(model, Model):
        return model
    _check_attention(attn_implementation)
    if not isinstance(freeze, bool):
        raise OptionError(f"`freeze` must be True or False, got {freeze!r}")
    bound_kernel_caches()  # before the model's first matmul, when oneDNN reads them
    if dtype in ("float32", "float16", "bfloat16", "float64"):
        dtype = getattr(torch, dtype)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise OptionError(
            f"`dtype` must be a floating-point torch dtype (torch.float32, torch.bfloat16, ...) "
            f"or its name, got {dtype!r}"
        )
    # "auto" switches per call; between calls (generation, attention maps) the model runs eager
    resting = "eager" if attn_implementation == "auto" else attn_implementation
    name = None
    if model is None:
        from ._default_model_task import DEFAULT_MODEL_PATH

        model = DEFAULT_MODEL_PATH
        name = "attrax-default"
    elif isinstance(model, str) and model.startswith("attrax:"):
        from ._default_classifier_task import BUILTIN_NAME, DEFAULT_CLASSIFIER_PATH

        if model != BUILTIN_NAME:
            raise ModelError(
                f"`model` {model!r} is not a built-in model: expected None (the tiny GPT-2) or "
                f"{BUILTIN_NAME!r} (the tiny BERT classifier)"
            )
        model, name = DEFAULT_CLASSIFIER_PATH, BUILTIN_NAME
    where: dict[str, Any] = {}
    if isinstance(model, (str, os.PathLike)):
        name = name or str(model)
        hf_model, where = _from_pretrained(model, resting, dtype, with_tokenizer=tokenizer is None)
        if tokenizer is None:
            tokenizer = model
    elif isinstance(model, PreTrainedModel):
        hf_model = model
        current = getattr(hf_model.config, "_attn_implementation", None)
        if current != resting and can_switch(hf_model):
            hf_model.set_attn_implementation(resting)
        if dtype is not None:
            # functools.wraps types PreTrainedModel.to as the unbound Module.to (self first)
            hf_model = hf_model.to(dtype)  # type: ignore[arg-type]
    else:
        inner = next((a for a in ("_orig_mod", "module") if hasattr(model, a)), None)
        hint = f": pass the model it wraps, `model.{inner}`" if inner else ""
        raise ModelError(
            "`model` must be a path, a hub name, a transformers PreTrainedModel or None, "
            f"got {type(model).__name__}{hint}"
        )
    if isinstance(tokenizer, (str, os.PathLike)):
        if tokenizer is not model:
            where = _locate(tokenizer, "tokenizer")
            _check_tokenizer_files(tokenizer, "tokenizer")
        named = "tokenizer" if tokenizer is not model else "model"
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer, **where)
        except (OSError, ValueError, KeyError, TypeError) as error:  # JSONDecodeError is one
            raise ModelError(
                f"`{named}` {str(tokenizer)!r}: its tokenizer files do not load "
                f"({type(error).__name__}: {first_line(error)})"
            ) from None
    if device is not None:
        if str(device) == "meta":
            raise OptionError("`device` 'meta' holds no weights' values: attrax runs the model")
        try:
            # functools.wraps types PreTrainedModel.to as the unbound Module.to (self first)
            hf_model = hf_model.to(torch.device(device))  # type: ignore[arg-type]
        except (RuntimeError, AssertionError, TypeError) as err:
            # torch says "Torch not compiled with CUDA enabled" or lists 20 device types
            raise OptionError(
                f"`device` {device!r} is not usable here: {err}. Expected 'cpu', 'cuda', "
                "'cuda:N' (with a CUDA build and GPU) or 'mps'"
            ) from err
    return Model(
        hf_model, tokenizer, name=name, attn_implementation=attn_implementation, freeze=freeze
    )


def _task(hf_model: PreTrainedModel) -> str:
    name = type(hf_model).__name__
    if name.endswith("ForSequenceClassification"):
        return "sequence-classification"
    if name.endswith("ForTokenClassification"):
        return "token-classification"
    if name.endswith("ForQuestionAnswering"):
        return "question-answering"
    if name.endswith("ForMaskedLM"):
        return "fill-mask"
    return "generation"


def _sdpa_folded(implementation: str) -> contextlib.AbstractContextManager[None]:
    """SDPA through attrax's vmap-aware op (:mod:`~attrax._sdpa`); any other attention as it is."""
    return folded_sdpa() if implementation == "sdpa" else contextlib.nullcontext()


def _check_attention(attn_implementation: object) -> None:
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise OptionError(
            f"`attn_implementation` must be one of {ATTENTION_IMPLEMENTATIONS}, "
            f"got {attn_implementation!r}"
        )


def _from_pretrained(
    path: str | os.PathLike[str],
    attn_implementation: str,
    dtype: torch.dtype | None,
    with_tokenizer: bool,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Load weights from a directory (or the hub), refusing anything that does not load whole.

    Returns the model and the ``from_pretrained`` keywords that located it (cache only when the
    hub is not reachable), for loading its tokenizer the same way. ``with_tokenizer``: the
    directory must hold tokenizer files too (checked before the weights load).
    """
    where = _locate(path)
    try:
        config = AutoConfig.from_pretrained(path, **where)
    except (OSError, ValueError, StrictDataclassError) as error:  # the last: a field's type
        what = "directory" if Path(path).exists() else "hub name"
        raise ModelError(
            f"`model` {str(path)!r} is not a loadable {what}: {_first_line(error)}"
        ) from None
    if with_tokenizer:
        _check_tokenizer_files(path, "model")
    named = _architectures(config, path)
    classifier = _task_of_architectures(named)
    unsupported = [] if classifier else _unsupported_architectures(config)
    # a transformers Auto class (their base, _BaseAutoModelClass, is private)
    auto: type[Any] = (
        AutoModelForSeq2SeqLM
        if getattr(config, "is_encoder_decoder", False)
        else AutoModelForCausalLM
    )
    if classifier == "sequence-classification":
        auto = AutoModelForSequenceClassification
    elif classifier == "token-classification":
        auto = AutoModelForTokenClassification
    elif classifier == "question-answering":
        auto = AutoModelForQuestionAnswering
    elif classifier == "fill-mask":
        auto = AutoModelForMaskedLM
    _check_size(path, config, auto)
    # shape mismatches come back in the loading info, not as transformers' report + RuntimeError
    kwargs: dict[str, Any] = {
        "attn_implementation": attn_implementation,
        "ignore_mismatched_sizes": True,
        "output_loading_info": True,
        **where,
    }
    if dtype is not None:
        kwargs["dtype"] = dtype
    with _LOADING:
        hf_model, info = _quietly_from_pretrained(path, auto, kwargs, config, unsupported)
    _check_loaded(path, hf_model, info, unsupported)
    return hf_model, where


def _quietly_from_pretrained(
    path: str | os.PathLike, auto: Any, kwargs: dict[str, Any], config: Any, unsupported: list[str]
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """``auto.from_pretrained(path, **kwargs)`` without transformers' progress bar and load
    report, its failures as :class:`ModelError`."""
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per load would drown the CLI's output
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report: attrax's error below says what failed
    try:
        return auto.from_pretrained(path, **kwargs)
    except ValueError as error:
        if unsupported:
            raise _refuse_load(path, unsupported) from None
        raise ModelError(
            f"`model` {str(path)!r} ({config.model_type}) is neither a causal nor a seq2seq "
            f"language model: {error}"
        ) from None
    except (OSError, RuntimeError, SafetensorError) as error:
        raise ModelError(
            f"`model` {str(path)!r}: its weights do not load ({_first_line(error)}); expected complete "
            "weight files (model.safetensors or pytorch_model.bin) saved with this config"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar_was_on:
            hf_logging.enable_progress_bar()


# config `architectures` attrax attributes: language-model heads, decoder-only or seq2seq
_LM_ARCHITECTURES = frozenset(
    name
    for mapping in (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    for value in mapping.values()
    for name in ((value,) if isinstance(value, str) else value)
)
# headless base models (GPT2Model): loaded with the LM head, accepted only if nothing is missing
_BASE_ARCHITECTURES = frozenset(
    name
    for value in MODEL_MAPPING_NAMES.values()
    for name in ((value,) if isinstance(value, str) else value)
)


# LM head names transformers no longer maps (old T5 checkpoints: T5WithLMHeadModel)
_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "MTModel")


def _architectures(config: Any, path: str | os.PathLike[str] | None = None) -> list[str]:
    """The config's ``architectures``: a list of class names (one name alone is one); anything
    else, a hand-edited config's, is a :class:`ModelError` naming the field."""
    named = getattr(config, "architectures", None) or []
    if isinstance(named, str):
        named = [named]
    if not isinstance(named, list | tuple) or not all(isinstance(a, str) for a in named):
        where = "" if path is None else f"`model` {str(path)!r}: "
        raise ModelError(
            f"{where}its config's `architectures` must be a list of class names such as "
            f'["GPT2LMHeadModel"], got {named!r}'
        )
    return list(named)


def _task_of_architectures(named: Sequence[str]) -> str | None:
    """The classifier task the config's ``architectures`` name, if any."""
    for name in named:
        if name.endswith("ForSequenceClassification"):
            return "sequence-classification"
        if name.endswith("ForTokenClassification"):
            return "token-classification"
        if name.endswith("ForQuestionAnswering"):
            return "question-answering"
        if name.endswith("ForMaskedLM"):
            return "fill-mask"
    return None


def _unsupported_architectures(config: Any) -> list[str]:
    """The config's ``architectures`` when none is a language model (or a headless base model)."""
    named = _architectures(config)
    if any(
        a in _LM_ARCHITECTURES or a in _BASE_ARCHITECTURES or a.endswith(_LM_SUFFIXES)
        for a in named
    ):
        return []
    return named


def _refuse_load(
    path: str | os.PathLike[str],
    unsupported: list[str],
    loaded_as: str | None = None,
    missing: Sequence[str] = (),
) -> ModelError:
    """The error for a checkpoint attrax would load with a newly initialised head or weights."""
    message = f"`model` {str(path)!r}"
    if unsupported:
        message += (
            f" is a {', '.join(unsupported)} checkpoint (config `architectures`), which attrax "
            "does not attribute yet: it supports causal language models (*ForCausalLM, "
            "*LMHeadModel), seq2seq ones (*ForConditionalGeneration, *MTModel) and "
            "classifiers (*ForSequenceClassification, *ForTokenClassification), extractive "
            "question answering (*ForQuestionAnswering) and masked LMs (*ForMaskedLM)"
        )
    if missing:
        shown = ", ".join(missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        message += (
            f"{'; it' if unsupported else ''} loads as {loaded_as} with weights the checkpoint "
            f"does not have, which would be newly initialised: {shown}{more}"
        )
    return ModelError(message)


def _first_line(error: BaseException) -> str:
    """An error's first line (its type's name when it says nothing): one line for the CLI."""
    return first_line(error) or type(error).__name__


# the weights' files of a model directory
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def _check_size(path: str | os.PathLike[str], config: Any, auto: Any) -> None:
    """Refuse a directory whose config describes a model far larger than its weight files (a
    config edited or from another model): transformers would build it whole and initialise what
    the files lack, a 7B model from a default config, before any check of the weights."""
    local = check.local_path(path, "model")
    stored = sum(f.stat().st_size for pattern in _WEIGHT_FILES for f in local.glob(pattern))
    if not local.is_dir() or not stored:
        return
    with torch.device("meta"):  # shapes only: no memory
        try:
            described = sum(p.numel() for p in auto.from_config(config).parameters())
        except Exception:  # a config it cannot build: from_pretrained says why
            return
    # 2 bytes a parameter at least (4-bit quantized checkpoints hold 0.5: within the factor 4)
    if 2 * described > 4 * stored:
        raise ModelError(
            f"`model` {str(path)!r}: its config.json describes a {config.model_type} model of "
            f"{described:,} parameters, which its weight files ({stored:,} bytes) cannot hold; "
            "expected the config the weights were saved with"
        )


# block lists whose index a parameter name carries (GPT-2's h.3, Llama's layers.3, T5's block.3)
_BLOCK_INDEX = re.compile(r"\.(?:h|layers?|blocks?)\.(\d+)\.")


def _check_loaded(
    path: str | os.PathLike[str], hf_model: PreTrainedModel, info: Any, unsupported: list[str]
) -> None:
    """Refuse a load that left weights newly initialised (a wrong head or shapes give noise), or
    that left out blocks the weights hold (a config with fewer layers than its checkpoint)."""
    unused = [k for k in sorted(info.get("unexpected_keys") or []) if _BLOCK_INDEX.search(k)]
    if unused:
        more = f" (and {len(unused) - 3} more)" if len(unused) > 3 else ""
        raise ModelError(
            f"`model` {str(path)!r}: its weights hold blocks its config.json has no place for "
            f"({', '.join(unused[:3])}{more}); expected the config the weights were saved with"
        )
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        shown = "; ".join(
            f"{key}: checkpoint {list(saved)}, config {list(wanted)}"
            for key, saved, wanted in mismatched[:3]
        )
        more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
        raise ModelError(
            f"`model` {str(path)!r}: its config.json disagrees with its weights ({shown}{more}); "
            "expected the config the weights were saved with"
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing or unsupported:
        raise _refuse_load(path, unsupported, type(hf_model).__name__, missing)


# files that define a tokenizer, one of which a model directory needs
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "source.spm",
)


def _check_tokenizer_files(path: str | os.PathLike[str], argument: str) -> None:
    """A directory without tokenizer files loads an empty tokenizer: refuse it by name."""
    local = check.local_path(path, argument)
    if local.is_dir() and not any((local / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelError(
            f"`{argument}` {str(path)!r} has no tokenizer files (none of "
            f"{', '.join(_TOKENIZER_FILES)}): save the tokenizer into it "
            "(tokenizer.save_pretrained(path)) or pass `tokenizer=`"
        )


def _locate(path: str | os.PathLike[str], argument: str = "model") -> dict[str, Any]:
    """``from_pretrained`` keywords for ``path``; a name that is not local fails fast offline.

    A local directory loads as is. Any other name is a hub name: when the hub does not answer
    within a second (or ``HF_HUB_OFFLINE=1``), only the local Hugging Face cache is tried, so a
    missing model is an error at once instead of half a minute of retries.
    """
    local = check.local_path(path, argument)
    if local.is_file():  # its config.json, say: from_pretrained would read it as weights
        raise ModelError(
            f"`{argument}` {str(path)!r} is a file: expected the model's directory (config.json, "
            "weights and tokenizer files)"
        )
    if local.exists():
        return {}
    name = str(path)
    if isinstance(path, os.PathLike) or not _looks_like_hub_name(name):
        raise ModelError(
            f"`{argument}` {name!r} does not exist locally: expected a model directory "
            "(config.json, weights and tokenizer files)"
        )
    if not _hub_offline() and _hub_reachable():
        return {}
    try:
        AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        why = "HF_HUB_OFFLINE is set" if _hub_offline() else "the hub is not reachable"
        raise ModelError(
            f"`{argument}` {name!r} does not exist locally and is not in the Hugging Face cache, and "
            f"{why}: attrax loads local model directories, or hub names when the hub is "
            "reachable"
        ) from None
    return {"local_files_only": True}


def _looks_like_hub_name(name: str) -> bool:
    """``gpt2`` or ``owner/name``: what the hub could serve; paths like ``./x``, ``/x/y`` are not."""
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)) and not name.startswith((".", "-"))


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or flag in ("1", "ON", "YES", "TRUE")


@functools.cache
def _hub_reachable(timeout: float = 1.0) -> bool:
    """Whether a TCP connection to the hub (or the HTTPS proxy) opens within ``timeout`` seconds.

    Name resolution has no timeout of its own, so the attempt runs in a daemon thread.
    """
    import socket
    import urllib.parse
    import urllib.request

    from huggingface_hub import constants

    url = urllib.request.getproxies().get("https") or constants.ENDPOINT
    parsed = urllib.parse.urlsplit(url if "//" in url else f"//{url}")
    host, port = parsed.hostname, parsed.port or (80 if parsed.scheme == "http" else 443)
    if not host:
        return False
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _keeps_every_token(mask: torch.Tensor) -> bool:
    """Whether an attention mask keeps every token (False for a mask batched by ``vmap``, whose
    values a Python branch cannot read)."""
    try:
        return bool(mask.all())
    except RuntimeError:
        return False


#: a classifier's outputs, by transformers' ``problem_type`` (its loss): softmax over the
#: classes, a sigmoid per label, or a value (one output without a ``problem_type`` is one, as
#: transformers' loss takes it: reward models, STS-B)
HEADS = ("single-label", "multi-label", "regression")


def _head_type(config: Any, task: str, classes: int) -> str | None:
    if task not in ("sequence-classification", "token-classification"):
        return None
    if task == "token-classification":  # transformers' loss ignores problem_type there
        return "regression" if classes == 1 else "single-label"  # one output: a value
    kind = getattr(config, "problem_type", None)
    if kind == "multi_label_classification":
        return "multi-label"
    if kind == "regression" or (kind is None and classes == 1):
        return "regression"
    return "single-label"


def _first_int(*values: Any) -> int | None:
    for value in values:
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return None


def selected_keys(
    mask: torch.Tensor | None, kwargs: dict[str, Any], query: torch.Tensor, keys: int
) -> torch.Tensor | None:
    """An attention call's mask with the keys a sparse attention left out masked, ``kwargs``'s
    ``indices`` taken out: DeepSeek V3.2's indexer picks each query's keys, which transformers
    masks under eager and SDPA only and hands any other implementation as ``indices`` ``[B, Q,
    k]``. Without them, the mask as it is."""
    indices = kwargs.pop("indices", None)
    if indices is None:
        return mask
    shape = (*indices.shape[:2], keys)
    left = torch.ones(shape, dtype=torch.bool, device=indices.device)
    left = left.scatter(-1, indices.long(), False)[:, None]  # [B, 1, Q, K]: True = left out
    if mask is None:
        mask = torch.zeros(left.shape, dtype=query.dtype, device=query.device)
    if mask.dtype == torch.bool:
        return mask & ~left
    return mask.masked_fill(left, torch.finfo(mask.dtype).min)


# the token ids ``[B, L]`` the running forwards from embeddings stand for (:func:`reading`)
_READING: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "attrax_reading", default=None
)


@contextlib.contextmanager
def reading(ids: torch.Tensor) -> Iterator[None]:
    """Forwards from embeddings inside stand for the token ids ``ids`` ``[B, L]``: a model with
    per-layer embeddings (Gemma 4, Gemma 3n) looks those up by id, not from the embeddings,
    which attributions move. They are constants of the input tokens, as positions are."""
    token = _READING.set(ids)
    try:
        yield
    finally:
        _READING.reset(token)


def can_switch(hf: PreTrainedModel) -> bool:
    """Whether ``hf`` can change its attention after loading. Models that do not route attention
    through transformers' AttentionInterface (Falcon before transformers 5.25) cannot: ``set_attn_implementation`` only
    warns, and they keep the attention they were loaded with."""
    can = getattr(type(hf), "_can_set_attn_implementation", None)
    return can is not None and bool(can())


def _mismatch(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|got - ref|`` relative to ``max|ref|``: how far two forwards of one model disagree."""
    scale = float(ref.abs().max())
    return float((got - ref).abs().max()) / (scale if scale > 0 else 1.0)


def _tolerance(dtype: torch.dtype) -> float:
    """The mismatch two equivalent forwards may show: float32 1e-4; half precision a few roundings
    (gathering GPT-2's head positions first moves bfloat16 logits by one ulp). A wrong embedding
    scale or head moves them by 5% or more on the test models."""
    return max(1e-4, 4 * torch.finfo(dtype).eps)


def _embedding_scales(hf_model: PreTrainedModel, side: str) -> list[float]:
    """Scales an architecture may apply to embeddings (``embed_scale`` attributes)."""
    getter = "get_decoder" if side == "target" else "get_encoder"
    stack = getattr(hf_model, getter, lambda: None)()
    scale = getattr(stack, "embed_scale", None)
    return [float(scale)] if isinstance(scale, (int, float)) and scale != 1.0 else []


# Elementwise activations, by module type -> the function they compute. During attrax's forwards
# they run as `_Activation`: the same values, but the derivative f'(x) is computed once in the
# forward and each backward multiplies by it. The engine runs one forward and K vectorized
# backwards, and autograd's own formulas recompute f'(x) (tanh, erf, sigmoid) for every target.
# Python-level tanh-GELUs (GPT-2's gelu_new) also become one fused kernel.
ACTIVATION_KINDS = {
    "NewGELUActivation": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "GELUActivation": "gelu",
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "ReLU": "relu",
    "ReLUSquaredActivation": "relu2",  # relu(x) ** 2: Arcee's, Nemotron's, Persimmon's MLPs
    # BERT's pooler and sigmoid gates; DeepLIFT rescales them (as Captum hooks nn.Tanh/nn.Sigmoid)
    "Tanh": "tanh",
    "Sigmoid": "sigmoid",
    # BLOOM's tanh-GELU is an old-style autograd.Function, which torch.func cannot run at all
    "BloomGelu": "gelu_tanh",
}


# norms whose gain is 1 + weight: Gemma's RMSNorms, Nemotron's LayerNorm
_ONE_PLUS = frozenset(
    {"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm", "VaultGemmaRMSNorm", "NemotronLayerNorm1P"}
)


# LayerNorms that are not torch's: OLMo's has no weight (its epsilon fixed at 1e-5), Cohere's no
# bias; both subtract the mean
_LAYER_NORMS = ("OlmoLayerNorm", "CohereLayerNorm")


def _weight(module: torch.nn.Module) -> torch.Tensor:
    """``module.weight`` (an embedding's table), typed: torch's stubs give Tensor | Module."""
    return cast(torch.Tensor, module.weight)


def body(hf: PreTrainedModel) -> torch.nn.Module:
    """``hf``'s transformer body (``base_model``), also where the class names a prefix it has no
    attribute for (Llama 4's causal LM keeps its body in ``model``, not ``language_model``)."""
    base = hf.base_model
    if base is hf and isinstance(getattr(hf, "model", None), torch.nn.Module):
        return hf.model
    return base


def norm_centers(norm: torch.nn.Module) -> bool:
    """Whether ``norm`` subtracts the mean (a LayerNorm), not only divides (an RMSNorm): torch's
    and the known classes, else whether its output stays put when every input moves by one
    constant (Cohere 2's LayerNorm is a class of its own)."""
    if isinstance(norm, torch.nn.LayerNorm) or type(norm).__name__ in _LAYER_NORMS:
        return True
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return False
    with torch.no_grad():  # in float32: a half-precision shift would round the inputs apart
        x = torch.linspace(-1.0, 1.0, weight.numel(), device=weight.device)[None]
        moved = norm(x + 1.0).float()
        return bool(torch.allclose(norm(x).float(), moved, rtol=1e-2, atol=1e-2))


def norm_divisor(norm: torch.nn.Module, x: torch.Tensor, centered: bool) -> torch.Tensor:
    """``norm``'s divisor at ``x`` ``[..., H]`` (at least float32): a LayerNorm's standard
    deviation (``centered``) or an RMSNorm's root mean square, each with its epsilon."""
    x = x.to(at_least_float32(x.dtype))
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or 1e-5
    if centered:
        return torch.sqrt(x.var(-1, unbiased=False) + eps)
    return torch.sqrt(x.pow(2).mean(-1) + eps)


def norm_gain(norm: torch.nn.Module) -> torch.Tensor:
    """The elementwise factor a norm applies after dividing: its ``weight``, the Gemma family's
    ``1 + weight``, or 1 where it has none (OLMo's)."""
    weight = getattr(norm, "weight", None)
    if weight is None:
        return torch.tensor(1.0)
    return 1.0 + weight if type(norm).__name__ in _ONE_PLUS else weight


def activation_kind(module: torch.nn.Module) -> str | None:
    kind = ACTIVATION_KINDS.get(type(module).__name__)
    if isinstance(module, torch.nn.GELU):
        kind = "gelu_tanh" if module.approximate == "tanh" else "gelu"
    return kind


def activation_value_and_derivative(
    x: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    y = activation_value(x, kind)
    if not torch.is_grad_enabled() and kind in ("gelu_tanh", "gelu"):
        # an autograd.Function's forward: the same operations in the same order, in place (one
        # buffer per term instead of one per operation), so the same bits, measured ~2x faster
        return y, _gelu_derivative_in_place(x, kind)
    if kind == "gelu_tanh":
        c, a = math.sqrt(2.0 / math.pi), 0.044715
        t = torch.tanh(c * (x + a * x**3))
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * a * x * x)
    elif kind == "gelu":
        d = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))) + x * torch.exp(-0.5 * x * x) / math.sqrt(
            2.0 * math.pi
        )
    elif kind == "silu":
        sig = torch.sigmoid(x)
        d = sig * (1.0 + x * (1.0 - sig))
    elif kind == "tanh":
        d = 1.0 - y * y
    elif kind == "sigmoid":
        d = y * (1.0 - y)
    elif kind == "relu2":
        d = 2.0 * torch.relu(x)
    else:  # relu
        d = (x > 0).to(x.dtype)
    return y, d


def _gelu_derivative_in_place(x: torch.Tensor, kind: str) -> torch.Tensor:
    """:func:`activation_value_and_derivative`'s GELU derivatives, each operation in place on a fresh
    buffer (a multiplication's operands swapped, which IEEE arithmetic leaves exact)."""
    if kind == "gelu_tanh":
        c, a = math.sqrt(2.0 / math.pi), 0.044715
        # t = tanh(c * (x + a * x**3))
        t = x.pow(3).mul_(a).add_(x, alpha=1).mul_(c).tanh_()
        # 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * a * x * x)
        second = x.mul(0.5).mul_(torch.mul(t, t).neg_().add_(1.0)).mul_(c)
        second.mul_(x.mul(3.0 * a).mul_(x).add_(1.0))
        return t.add_(1.0).mul_(0.5).add_(second)
    # 0.5 * (1.0 + erf(x / sqrt(2))) + x * exp(-0.5 * x * x) / sqrt(2 pi)
    first = torch.div(x, math.sqrt(2.0)).erf_().add_(1.0).mul_(0.5)
    second = x.mul(-0.5).mul_(x).exp_().mul_(x).div_(math.sqrt(2.0 * math.pi))
    return first.add_(second)


class _Activation(torch.autograd.Function):
    """``f(x)`` for an elementwise ``f``, whose backward (and jvp) multiplies by a saved ``f'(x)``.

    ``rule`` replaces the backward (not the jvp): ``"guided"`` passes ``relu(grad * f'(x))``,
    ``"deconvolution"`` passes ``relu(grad)`` (see :data:`BACKWARD_RULES`). ``"identity"`` (LRP's
    identity rule) replaces ``f'(x)`` by ``f(x) / x`` in the backward and the jvp alike, so that
    ``x * grad_in == f(x) * grad_out``: the relevance passes through unchanged.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: torch.Tensor, kind: str, rule: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y, derivative = activation_value_and_derivative(x, kind)
        if rule == "identity":
            # f(x) / x, and its limit f'(0) at 0 (every activation here has f(0) = 0)
            nonzero = x != 0
            derivative = torch.where(nonzero, y / torch.where(nonzero, x, 1), derivative)
        return y, derivative

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        _, derivative = output
        ctx.mark_non_differentiable(derivative)
        ctx.save_for_backward(derivative)
        ctx.save_for_forward(derivative)
        ctx.rule = inputs[2] if len(inputs) > 2 else None

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _grad_derivative: Any) -> tuple[Any, None, None]:
        (derivative,) = ctx.saved_tensors
        if ctx.rule == "deconvolution":
            return torch.relu(grad), None, None
        if ctx.rule == "guided":
            return torch.relu(grad * derivative), None, None
        return grad * derivative, None, None

    @staticmethod
    def jvp(
        ctx: Any, tangent: torch.Tensor, _kind: Any, _rule: Any = None
    ) -> tuple[torch.Tensor, None]:
        (derivative,) = ctx.saved_tensors
        return tangent * derivative, None


class _OneBackward(torch.autograd.Function):
    """``f(x)`` whose backward (and jvp) is autograd's own fused one, ``grad * f'(x)`` in one
    pass: for forwards followed by a single unbatched backward (:func:`one_backward`), where
    saving ``f'(x)`` for many cotangents would only cost time. ``rule`` as :class:`_Activation`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, kind: str, rule: str | None = None) -> torch.Tensor:
        return activation_value(x, kind)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0], output)
        ctx.save_for_forward(inputs[0], output)
        ctx.kind = inputs[1]
        ctx.rule = inputs[2] if len(inputs) > 2 else None

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, None, None]:
        if ctx.rule == "deconvolution":
            return torch.relu(grad), None, None
        x, y = ctx.saved_tensors
        out = _times_derivative(grad, x, y, ctx.kind)
        return (torch.relu(out) if ctx.rule == "guided" else out), None, None

    @staticmethod
    def jvp(ctx: Any, tangent: torch.Tensor, _kind: Any, _rule: Any = None) -> torch.Tensor:
        x, y = ctx.saved_tensors
        return _times_derivative(tangent, x, y, ctx.kind)


def _times_derivative(
    grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, kind: str
) -> torch.Tensor:
    """``grad * f'(x)`` by torch's fused backward kernel of activation ``kind`` (input ``x``,
    output ``y``): autograd's own formula."""
    aten = torch.ops.aten
    if kind in ("gelu", "gelu_tanh"):
        return aten.gelu_backward(grad, x, approximate="tanh" if kind == "gelu_tanh" else "none")
    if kind == "silu":
        return aten.silu_backward(grad, x)
    if kind == "tanh":
        return aten.tanh_backward(grad, y)
    if kind == "sigmoid":
        return aten.sigmoid_backward(grad, y)
    if kind == "relu2":  # square's backward (grad * 2 relu(x)), then relu's
        r = torch.relu(x)
        return aten.threshold_backward(grad * (2 * r), r, 0)
    return aten.threshold_backward(grad, y, 0)  # relu: grad where x > 0


# Sequence classifiers whose head reads the last layer at position 0 only ([CLS] or <s>): BERT's
# pooler and the heads of RoBERTa, XLM-R, CamemBERT, ELECTRA and DistilBERT. Per model type:
# the layer list under the base model, the last layer's module that owns the feed-forward ("" for
# the layer itself) and the method that computes it per position
_BERT_FEED_FORWARD = ("encoder.layer", "", "feed_forward_chunk")
FIRST_POSITION_HEADS = {
    "bert": _BERT_FEED_FORWARD,
    "roberta": _BERT_FEED_FORWARD,
    "xlm-roberta": _BERT_FEED_FORWARD,
    "camembert": _BERT_FEED_FORWARD,
    "electra": _BERT_FEED_FORWARD,
    "distilbert": ("transformer.layer", "ffn", "ff_chunk"),
}
_HEAD_ROWS: contextvars.ContextVar[bool] = contextvars.ContextVar("attrax_head_rows", default=False)


@contextlib.contextmanager
def head_rows_only() -> Iterator[None]:
    """Forwards run inside give only the head's output (the engine's objective forwards): a
    classifier whose head reads the last layer at position 0 computes that layer's
    feed-forward there alone (:func:`_first_position_feed_forward`). Outside, every position
    is computed, as hooks on the layers (layer and component methods) expect."""
    token = _HEAD_ROWS.set(True)
    try:
        yield
    finally:
        _HEAD_ROWS.reset(token)


def _first_position_feed_forward(
    hf: PreTrainedModel, task: str
) -> tuple[torch.nn.Module, str] | None:
    """The last encoder layer's feed-forward ``(owner module, method)`` of a transformers
    sequence classifier whose head reads position 0 only (:data:`FIRST_POSITION_HEADS`), if it
    runs per position (not chunked); else None."""
    kind = type(hf)
    model_type = getattr(hf.config, "model_type", None)
    where = FIRST_POSITION_HEADS.get(model_type) if isinstance(model_type, str) else None
    if (
        where is None
        or task != "sequence-classification"
        or not kind.__module__.startswith("transformers.models.")
        or not kind.__name__.endswith("ForSequenceClassification")
    ):
        return None
    path, part, method = where
    try:
        layers = body(hf).get_submodule(path)
        owner = layers[-1].get_submodule(part) if part else layers[-1]  # type: ignore[index]
    except (AttributeError, IndexError, TypeError):
        return None
    if not callable(getattr(type(owner), method, None)):
        return None
    if getattr(owner, "chunk_size_feed_forward", 0):  # chunks would split position 0 from the rest
        return None
    return owner, method


def _first_position_now() -> bool:
    """Inside :func:`head_rows_only`, and no activation tap: DeepLIFT pairs each activation
    with its reference forward's, taken by forwards of every kind, so all of its run in full."""
    return _HEAD_ROWS.get() and _TAP.get() is None


class _FirstPositionFeedForward:
    """A last layer's feed-forward computed at position 0 only; the other positions pass
    through unchanged, since the head never reads them (~8/12 of the layer's products). A
    forward outside :func:`head_rows_only` (another thread's) gets the full feed-forward."""

    def __init__(self, owner: torch.nn.Module, method: str) -> None:
        self.owner, self.full = owner, getattr(type(owner), method)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if not _first_position_now():
            return self.full(self.owner, hidden)
        # contiguous: a strided [rows, 1, H] made matmul expand each weight per row (bf16 copies it)
        first = hidden[:, :1].contiguous()
        return torch.cat([self.full(self.owner, first), hidden[:, 1:]], dim=1)


@contextlib.contextmanager
def _first_position_only(feed_forward: tuple[torch.nn.Module, str] | None) -> Iterator[None]:
    """Within :func:`head_rows_only`, the feed-forward ``(owner, method)``
    (:func:`_first_position_feed_forward`) runs at position 0 alone; restored on leaving."""
    if feed_forward is None or not _first_position_now():
        yield
        return
    owner, method = feed_forward
    with instance_attributes([(owner, method, _FirstPositionFeedForward(owner, method))]):
        yield


_ONE_BACKWARD: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "attrax_one_backward", default=False
)


@contextlib.contextmanager
def one_backward() -> Iterator[None]:
    """Forwards run inside are followed by one unbatched backward (a call with a single target):
    their activations run as :class:`_OneBackward` (autograd's fused backward, nothing saved
    ahead) instead of :class:`_Activation`; rules and taps apply as usual."""
    token = _ONE_BACKWARD.set(True)
    try:
        yield
    finally:
        _ONE_BACKWARD.reset(token)


#: The activation kinds guided backprop and deconvolution modify by default (tanh and sigmoid,
#: added for DeepLIFT, keep their true gradient there)
GUIDED_KINDS = frozenset({"gelu_tanh", "gelu", "silu", "relu"})
#: Backward rules an activation can run with (Springenberg et al. 2015, as Captum's hooks on
#: ``nn.ReLU``): for a ReLU, guided = grad where input > 0 and grad > 0, deconvolution = relu(grad);
#: identity = grad * f(x) / x (LRP's identity rule, ``_lrp``).
BACKWARD_RULES = ("guided", "deconvolution", "identity")
# (rule, activation kinds it applies to) for the forwards run under `backward_rule`
_RULE: contextvars.ContextVar[tuple[str, frozenset[str]] | None] = contextvars.ContextVar(
    "attrax_backward_rule", default=None
)


@contextlib.contextmanager
def backward_rule(rule: str, kinds: Sequence[str] | None = None) -> Iterator[None]:
    """Forwards run inside give the activations of ``kinds`` (None: all) ``rule``'s backward.

    The rule is fixed at forward time and kept by autograd, so backwards (and vmapped backwards)
    run later still use it.
    """
    every = GUIDED_KINDS
    token = _RULE.set((rule, every if kinds is None else frozenset(kinds)))
    try:
        yield
    finally:
        _RULE.reset(token)


# a function each activation of attrax's forwards goes through first: (x, kind) -> its output,
# or None for the usual one (DeepLIFT records and reads the reference inputs with it)
Tap = Callable[[torch.Tensor, str], torch.Tensor | None]
_TAP: contextvars.ContextVar[Tap | None] = contextvars.ContextVar("attrax_tap", default=None)


@contextlib.contextmanager
def activation_tap(tap: Tap) -> Iterator[None]:
    """Forwards run inside pass every activation call through ``tap`` first."""
    token = _TAP.set(tap)
    try:
        yield
    finally:
        _TAP.reset(token)


def apply_activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    tap = _TAP.get()
    if tap is not None:
        out = tap(x, kind)
        if out is not None:
            return out
    if torch.is_grad_enabled():
        active = _RULE.get()
        rule = active[0] if active is not None and kind in active[1] else None
        # LRP's identity rule replaces f'(x) itself: only the saved-derivative path has it
        if _ONE_BACKWARD.get() and rule != "identity":
            # no rule: the plain op (autograd's own backward, no Function to dispatch: ~6% of a
            # one-target call on a small classifier)
            return activation_value(x, kind) if rule is None else _OneBackward.apply(x, kind, rule)
        return _Activation.apply(x, kind, rule)[0]
    return activation_value(x, kind)  # no backward will follow: no derivative to save


def activation_value(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if kind == "gelu":
        return torch.nn.functional.gelu(x)
    if kind == "silu":
        return torch.nn.functional.silu(x)
    if kind == "tanh":
        return torch.tanh(x)
    if kind == "sigmoid":
        return torch.sigmoid(x)
    if kind == "relu2":
        return torch.square(torch.relu(x))
    return torch.relu(x)


@contextlib.contextmanager
def fast_activations(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Run elementwise activation ``modules`` as :class:`_Activation`, for attrax's forwards only."""
    forwards = []
    for module in modules:
        kind = activation_kind(module)
        assert kind is not None, f"{type(module).__name__} is not an elementwise activation"
        forwards.append((module, "forward", functools.partial(apply_activation, kind=kind)))
    with instance_attributes(forwards):
        yield


@contextlib.contextmanager
def capture_before(
    head: torch.nn.Module, index: torch.Tensor, captured: list[torch.Tensor]
) -> Iterator[None]:
    """Capture the head's input at ``h[b, index[b, k]]`` and let the head run on no position."""
    rows = torch.arange(index.shape[0], device=index.device).unsqueeze(1)

    def capture(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        captured.append(hidden[rows, index])
        return (hidden[:, :0], *args[1:])

    handle = head.register_forward_pre_hook(capture)
    try:
        yield
    finally:
        handle.remove()


def _masked_lm_head(hf: PreTrainedModel) -> torch.nn.Module | None:
    """The module a masked LM's final hidden states enter first (its head), or None."""
    for name in MASKED_LM_HEADS:
        module = getattr(hf, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    # ModernBERT: its `head` then its `decoder`; a classifier's `head` is no LM head
    head = getattr(hf, "head", None)
    return head if isinstance(getattr(hf, "decoder", None), torch.nn.Linear) else None


@contextlib.contextmanager
def _rows_only(head: torch.nn.Module | None, index: torch.Tensor) -> Iterator[None]:
    """``head`` runs on the rows ``index[b, k]`` of its input alone: ``[B, K, ...]`` out, not
    ``[B, L, ...]``; without a head the caller's model computes every row."""
    if head is None:
        yield
        return
    rows = torch.arange(index.shape[0], device=index.device)[:, None]

    def select(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0][rows, index], *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def refuse_no_query_row(model: Model, method: str) -> None:
    """A ModelError for a model with no one query row that predicts a target, which ``method``
    reads: a sequence classifier that pools the mean of all positions (ModernBERT's
    ``classifier_pooling="mean"``), or a question-answering model, whose start and end
    probabilities are softmaxes over every position's row."""
    if model.task == "question-answering":
        raise ModelError(
            f"{method}: {type(model.hf).__name__} answers with a softmax over every position's "
            "start and end logits, so no one query row predicts its answer, which "
            f"{method} reads; its gradient, DeepLIFT, LRP and perturbation methods run"
        )
    refuse_seq2seq_classifier(model, method)
    pooling = getattr(model.hf.config, "classifier_pooling", None)
    if model.task == "sequence-classification" and pooling == "mean":
        raise ModelError(
            f"{method}: {type(model.hf).__name__} pools the mean of every position "
            "(classifier_pooling='mean'), so no one query row predicts its class, which "
            f"{method} reads; its gradient, DeepLIFT and perturbation methods run"
        )


def refuse_seq2seq_classifier(model: Model, method: str) -> None:
    """A ModelError for an encoder-decoder sequence classifier (BART-MNLI), whose tokens reach
    its class through two stacks at once: the encoder, and the decoder that reads them again
    (shifted) beside the encoder's states. ``method`` follows one stack's layers or heads."""
    if model.seq2seq_classifier:
        raise ModelError(
            f"{method}: {type(model.hf).__name__} reads each token twice, in its encoder and "
            "again in its decoder, so one stack's layers or heads do not carry a token's whole "
            f"effect on the class, which {method} follows; its gradient, DeepLIFT and "
            "perturbation methods run (without `layers=`)"
        )


# transformers' layer types whose layers mix tokens other than by softmax attention, or beside it
# (Falcon-H1's and Zamba 2's "hybrid" layers run a Mamba mixer in parallel with attention;
# MiniMax's "linear_attention" is its lightning attention; LFM2's "conv" a short convolution)
_TOKEN_MIXERS = frozenset({"conv", "hybrid", "hybrid_sliding", "linear_attention"})


def _refuse_layers_without_attention(
    hf: PreTrainedModel, modules: dict[torch.nn.Module, tuple[str, int]]
) -> None:
    """A ModelError for a decoder-only hybrid, some of whose layers mix tokens without attention
    weights (Mamba layers: Granite 4, Jamba) or beside it (Falcon-H1): maps of its attention
    layers alone would leave that mixing out of rollout and mislabel the layers they come
    from."""
    attending = sum(stack == "self" for stack, _ in modules.values())
    total = _arch.layers(hf.config, "self")
    if attending and total and attending < total and not hf.config.is_encoder_decoder:
        raise ModelError(
            f"{type(hf).__name__}: only {attending} of its {total} layers attend (the others "
            "mix tokens without attention weights, as a hybrid's Mamba layers do); attrax's "
            "attention-based methods need every layer's attention. Its gradient, DeepLIFT and "
            "perturbation methods run"
        )
    mixing = sorted(set(getattr(hf.config, "layer_types", None) or ()) & _TOKEN_MIXERS)
    if attending and mixing and not hf.config.is_encoder_decoder:
        raise ModelError(
            f"{type(hf).__name__}: its {', '.join(mixing)} layers mix tokens without attention "
            "weights (or beside them: a convolution, a linear attention's or a Mamba mixer's "
            "state); attrax's attention-based methods need every layer's token mixing to be its "
            "attention. Its gradient, DeepLIFT and perturbation methods run"
        )


# attention classes that call transformers' attention interface and return their weights, in
# models whose classes record no attentions (no `_can_record_outputs`): where the weights are
_UNRECORDED = {"transformers.models.falcon.modeling_falcon.FalconAttention": 1}


def attention_modules(hf: PreTrainedModel) -> dict[torch.nn.Module, tuple[str, int]]:
    """Each attention module of ``hf`` with its stack and where its output holds the weights.

    Read from the table transformers itself records attentions by (``_can_record_outputs`` of
    each sub-model: a class, a layer name, an index into the output); empty for a model without
    one, whose maps then come from ``output_attentions``), and those attrax runs itself
    (DeBERTa-v2's, GPT-Neo's, BLOOM's). A ModelError for a hybrid some of whose layers do not attend, and for a DeBERTa-v2
    whose convolution mixes tokens beside its first layer.
    """
    encoder = hf.get_encoder() if getattr(hf.config, "is_encoder_decoder", False) else None
    in_encoder = {id(m) for m in encoder.modules()} if encoder is not None else set()
    found: dict[torch.nn.Module, tuple[str, int]] = {}
    module: torch.nn.Module  # torch leaves named_modules' items unannotated (Any)
    for name, owner in hf.named_modules():
        table = getattr(owner, "_can_record_outputs", None)
        if not isinstance(table, dict):
            continue
        for key in ("attentions", "cross_attentions"):
            specs = table.get(key)
            for spec in specs if isinstance(specs, list) else [specs]:
                if spec is None:
                    continue
                target = getattr(spec, "target_class", spec)
                index = getattr(spec, "index", 1)
                layer = getattr(spec, "layer_name", None)
                if not isinstance(target, type):
                    continue
                for sub_name, module in owner.named_modules(prefix=name):
                    if not isinstance(module, target) or module in found:
                        continue
                    if layer and f".{layer.strip('.')}." not in f".{sub_name}.":
                        continue
                    if id(module) in in_encoder:
                        stack = "encoder"
                    elif key == "cross_attentions":
                        stack = "cross"
                    else:
                        stack = "decoder" if encoder is not None else "self"
                    found[module] = (stack, index)
    routed = _routed.modules(hf)
    if routed and _routed.convolved(hf):
        raise ModelError(
            f"{type(hf).__name__}: its encoder adds a convolution over neighbouring tokens to "
            "its first layer (conv_kernel_size > 0), which mixes tokens without attention "
            "weights; attrax's attention-based methods need every token mixing to be "
            "attention. Its gradient, DeepLIFT and perturbation methods run"
        )
    found.update(dict.fromkeys(routed, ("self", 1)))
    for module in hf.modules():
        index = _UNRECORDED.get(f"{type(module).__module__}.{type(module).__qualname__}")
        if index is not None and not hf.config.is_encoder_decoder:
            found.setdefault(module, ("self", index))
    _refuse_layers_without_attention(hf, found)
    return found
