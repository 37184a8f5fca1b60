"""Checkpoints or seeds of one architecture as one model: a method runs on all of them in one vmap.

:func:`stack_models` stacks the models' parameters (``torch.func.stack_module_state``). A method
called on the stack sees one batch of ``M * B`` rows (model-major: the ``B`` examples for model 0,
then for model 1, ...): the embeddings of row ``r`` come from model ``r // B``'s table, and every
forward is ``torch.vmap`` over the parameter stacks of ``functional_call`` on one template module,
each model running on its own rows. The engine's backward (vjp, vmap over targets) goes through
that vmapped forward unchanged. The result's ``example`` dim is then split into ``model`` (the
models' names) and ``example``.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch.func import functional_call, stack_module_state

from . import _arch
from ._errors import ModelError, OptionError
from ._model import Model, evaluating, frozen

#: the methods a stack runs (gradient methods of decoder-only language models)
SUPPORTED = (
    "saliency",
    "input_x_gradient",
    "integrated_gradients",
    "smoothgrad",
    "squaregrad",
    "vargrad",
)


class StackedModel:
    """Models of one architecture and tokenizer, run together by every supported method; results
    gain a ``model`` dim. Build it with :func:`stack_models`."""

    attrax_stacked = True

    def __init__(self, models: Sequence[Model], names: Sequence[str]) -> None:
        self.models = list(models)
        self.names = list(names)
        self._expanded = _Expanded(self.models)

    def __len__(self) -> int:
        return len(self.models)

    def __repr__(self) -> str:
        return f"attrax.StackedModel({self.names!r})"

    def run(
        self, public: Callable[..., xr.DataArray], name: str, arguments: Mapping[str, Any]
    ) -> xr.DataArray:
        """``public(stack, inputs, targets, **options)``: every model's rows in one call."""
        if name not in SUPPORTED:
            raise OptionError(
                f"{name} does not run on stacked models; they run: {', '.join(SUPPORTED)}"
            )
        inputs, targets = arguments["inputs"], arguments.get("targets")
        single = isinstance(inputs, str)
        inputs = [inputs] if single else list(inputs)
        if targets is None:
            raise OptionError(
                "`targets` is required with stacked models: every model explains the same tokens"
            )
        targets = [targets] if isinstance(targets, str) else list(targets)
        if any(not isinstance(x, str) for x in inputs):
            raise OptionError("stacked models take texts as `inputs` (no text pairs)")
        options = {k: v for k, v in arguments.items() if k not in ("model", "inputs", "targets")}
        if options.get("layers") is not None:  # its hooks read rows the vmapped forward splits
            raise OptionError(
                "`layers` is not supported on stacked models: attribute to the embeddings, or run "
                "each model with `layers=` on its own"
            )
        given = options.get("contrast")
        if given is not None:  # one contrast per example, for every model
            contrast = [given] if isinstance(given, str) else list(given)
            if len(contrast) != len(inputs):
                raise OptionError(
                    f"`contrast` must have one text per input ({len(inputs)}), got {len(contrast)}"
                )
            options["contrast"] = contrast * len(self.models)
        if options.get("mode") == "forward":  # jvp through the vmapped parameter stacks fails
            raise OptionError(
                "`mode='forward'` is not supported on stacked models: use mode='reverse' or 'auto'"
            )
        if isinstance(options.get("baseline"), str) and options["baseline"] != "zeros":
            raise OptionError(
                f"`baseline={options['baseline']!r}` is not supported on stacked models: each "
                "model has its own embeddings; use 'zeros' or a tensor of embeddings"
            )
        baseline = options.get("baseline")
        if isinstance(baseline, torch.Tensor) and not baseline.is_floating_point():
            raise OptionError(
                "`baseline` as token ids is not supported on stacked models: each model has its "
                "own embeddings; use 'zeros' or a tensor of embeddings"
            )
        m, b = len(self.models), len(inputs)
        with self._expanded.call_lock:  # `rows` belongs to this call until it ends
            self._expanded.rows = b
            da = _split(
                public(self._expanded, inputs * m, targets * m, **options), self.names, b, single
            )
        if given is not None:  # the contrast as given, not as repeated for the models
            recorded = json.loads(da.attrs["options"])
            recorded["contrast"] = given
            da.attrs["options"] = json.dumps(recorded, sort_keys=True)
        return da


def stack_models(models: Sequence[Model], names: Sequence[str] | None = None) -> StackedModel:
    """Stack models of one architecture and tokenizer (checkpoints, seeds) into one.

    Gradient methods (:data:`SUPPORTED`) of decoder-only language models run on every model in one
    vmapped call; the result has a ``model`` dim (coordinate: ``names``, default the models'
    names, made unique).

    Arguments:
        models: two or more :class:`Model` of one decoder-only language-model architecture:
            the same class and config, the same tokenizer vocabulary, device and dtype.
        names: one distinct name per model, for the ``model`` coordinate; None (default): the
            models' names (suffixed ``#i`` where two are the same).

    Returns:
        A ``StackedModel``, to pass as ``model`` to the supported methods: ``targets`` must be
        given, ``inputs`` are texts (no pairs), and ``layers``, ``mode="forward"``, named
        baselines other than ``"zeros"`` and token-id baselines are refused. A result is the
        method's with a leading
        ``model`` dim: ``(model, [example,] target, source[, hidden])``.

    >>> import attrax as ax
    >>> from attrax.testing import tiny_model
    >>> models = [ax.load_model(hf, tokenizer=tok) for hf, tok in [tiny_model("gpt2")] * 2]
    >>> stack = ax.stack_models(models, names=["seed0", "seed1"])
    >>> ax.saliency(stack, "hello world", " again").dims[:2]
    ('model', 'target')
    """
    models = list(models)
    if len(models) < 2 or not all(isinstance(m, Model) for m in models):
        raise OptionError("`models` must be a list of two or more attrax Models")
    first = models[0]
    if first.task != "generation" or first.is_encoder_decoder or not first.causal:
        raise ModelError(
            f"stack_models runs decoder-only language models; {first.name} is "
            f"{first.model_type} ({first.task})"
        )
    for i, other in enumerate(models[1:], 1):
        if type(other.hf) is not type(first.hf):
            raise ModelError(
                f"`models[{i}]` ({type(other.hf).__name__}) is not the architecture of "
                f"`models[0]` ({type(first.hf).__name__}): stacked models share one config"
            )
        mine, theirs = _config(other), _config(first)
        differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        if differ:
            shown = ", ".join(
                f"{k}={mine.get(k)!r} (models[0]: {theirs.get(k)!r})" for k in differ[:3]
            )
            raise ModelError(
                f"`models[{i}]`'s config differs from `models[0]`'s: {shown}"
                f"{f' and {len(differ) - 3} more' if len(differ) > 3 else ''}; stacked models "
                "share one config"
            )
        if other.tokenizer.get_vocab() != first.tokenizer.get_vocab():
            raise ModelError(f"`models[{i}]` has another tokenizer than `models[0]`")
        if other.device != first.device or other.dtype != first.dtype:
            raise ModelError(
                f"`models[{i}]` runs on {other.device}/{other.dtype}, `models[0]` on "
                f"{first.device}/{first.dtype}"
            )
    if names is None:
        names = [m.name for m in models]
        if len(set(names)) < len(names):
            names = [f"{n}#{i}" for i, n in enumerate(names)]
    if isinstance(names, str):  # its letters are no list of names
        raise OptionError(
            f"`names` must be a list of {len(models)} names, got the string {names!r}"
        )
    names = [str(n) for n in names]
    if len(names) != len(models) or len(set(names)) < len(names):
        raise OptionError(f"`names` must be {len(models)} distinct names, got {names!r}")
    return StackedModel(models, names)


def _config(model: Model) -> dict[str, Any]:
    return model.hf.config.to_dict()


class _Template(torch.nn.Module):
    """The first model's module as ``functional_call`` sees it: ``forward`` gives its head inputs
    at the attributed positions."""

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.hf = model.hf
        self._model = model

    def forward(
        self, embeds: torch.Tensor, mask: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        # eager attention (forward_mode): what vmap batches over the parameter stacks
        return Model.hidden_at(self._model, embeds, mask, index, forward_mode=True)


class _Expanded(Model):
    """What the engine sees: a model whose batch holds every stacked model's rows, model-major;
    :meth:`hidden_at` runs the forward vmapped over the parameter stacks, :meth:`head` applies each
    row's own model's output layer (one batched product over the stacked weights)."""

    def __init__(self, models: Sequence[Model]) -> None:
        first = models[0]
        self.__dict__.update(copy.copy(first.__dict__))
        self.name = "+".join(m.name for m in models)
        self._models = list(models)
        self._template = _Template(first)
        with contextlib.ExitStack() as states:
            # one mode and no gradients for all (a model built with freeze=False may train):
            # stack_module_state refuses models that differ in either
            for m in models:
                states.enter_context(evaluating(m.hf))
                states.enter_context(frozen(m.hf))
            params, buffers = stack_module_state([m.hf for m in models])
            # each model's embedding module, not its raw table: Gemma's and BioGPT's scale rows
            tables = stack_module_state([m._source_embedding for m in models])
        # copies of the weights: a model that trains later is not followed
        self._params = {f"hf.{k}": v.detach() for k, v in params.items()}
        self._buffers = {f"hf.{k}": v for k, v in buffers.items()}
        table_params, table_buffers = tables
        self._tables = (
            {k: v.detach() for k, v in table_params.items()},
            {k: v.detach() for k, v in table_buffers.items()},
        )
        # generation models only (stack refuses others): each has its output projection, whose
        # weights stack to [M, V, H]
        heads = [cast(torch.nn.Module, m._head) for m in models]
        self._head_weight = torch.stack([cast(torch.Tensor, h.weight) for h in heads]).detach()
        biases = [getattr(h, "bias", None) for h in heads]
        self._head_bias = None
        if biases[0] is not None:  # stack_module_state stacked one structure: all have one
            self._head_bias = torch.stack(cast(list[torch.Tensor], biases)).detach()  # [M, V]
        if isinstance(getattr(first.hf, "final_logits_bias", None), torch.Tensor):
            raise ModelError(f"{type(first.hf).__name__}: a final logits bias is not stacked")
        self.rows = 1  # examples per model of the running call (StackedModel.run sets it)

    def embed(self, ids: torch.Tensor, side: str = "source") -> torch.Tensor:
        ids = ids.to(self.device)
        count = len(self._models)
        if ids.shape[0] != count * self.rows:
            raise OptionError(
                "stacked models embed their own batch only (a token baseline is not supported)"
            )
        module = self._models[0]._source_embedding

        def rows(params: dict, buffers: dict, own: torch.Tensor) -> torch.Tensor:
            return functional_call(module, (params, buffers), (own,))

        by_model = ids.unflatten(0, (count, self.rows))
        return torch.vmap(rows)(*self._tables, by_model).flatten(0, 1)

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
        count = len(self._models)
        # rows are [n copies][M models][B examples]: each model gets its rows of every copy
        n = embeds.shape[0] // (count * self.rows)

        def by_model(x: torch.Tensor) -> torch.Tensor:
            x = x.unflatten(0, (n, count, self.rows)).transpose(0, 1)
            return x.flatten(1, 2)

        def one(params: dict, buffers: dict, e: torch.Tensor, mask: torch.Tensor, at: torch.Tensor):
            return functional_call(self._template, (params, buffers), (e, mask, at))

        hidden = torch.vmap(one)(
            self._params,
            self._buffers,
            by_model(embeds),
            by_model(attention_mask),
            by_model(index),
        )  # [M, n * B, k, H]
        return hidden.unflatten(1, (n, self.rows)).transpose(0, 1).flatten(0, 2)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        count = len(self._models)
        rows = hidden.unflatten(0, (-1, count, self.rows))  # [n, M, B, k, H]
        logits = torch.einsum("nmbkh,mvh->nmbkv", rows, self._head_weight)
        if self._head_bias is not None:
            logits = logits + self._head_bias[None, :, None, None, :]
        scale = _arch.logit_scale(self.hf.config)
        if scale != 1.0:
            logits = logits * scale
        cap = getattr(self.hf.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.flatten(0, 2)

    def attention_for(self, tokens: int, device: torch.device) -> str:
        return "eager"


def _split(da: xr.DataArray, names: list[str], rows: int, single: bool) -> xr.DataArray:
    """``example`` of ``M * B`` rows -> ``model`` (``names``) x ``example`` (``B``)."""
    if "example" not in da.dims:  # one input: the call squeezed a batch of M rows
        raise AssertionError("a stacked call always has an example dim")
    parts = [
        da.isel(example=slice(m * rows, (m + 1) * rows)).assign_coords(example=np.arange(rows))
        for m in range(len(names))
    ]  # labelling only: the computation ran in one call
    # fixed-width strings, as every other label: pandas' own string dtype reaches xarray as
    # numpy's variable-width StringDType, which netCDF files cannot restore
    index = pd.Index(np.asarray(names, dtype=str), dtype=object, name="model")
    out = xr.concat(parts, dim=index, coords="different", compat="equals")
    out.attrs = dict(da.attrs)
    if single:
        out = out.squeeze("example", drop=True)
    return out
