"""Step scores: what the model predicts at each target step (probability, entropy, PCXMI...).

One teacher-forced forward (two when a contrast input is given), full-vocabulary logits only at
the attributed positions. Results are ``([example,] target, score)`` arrays whose ``target``
coordinates match the attributions of the same call, so :func:`with_scores` can join them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from ._engine import all_finite
from ._errors import InputError, OptionError
from ._inputs import Tensors, Texts, check_aligned, contrast_batch, to_tensors
from ._memory import at_least_float32
from ._model import Model, reading
from ._protocol import Call, Family
from ._schema import label_steps

SCORES = (
    "probability",
    "logprob",
    "logit",
    "margin",
    "entropy",
    "crossentropy",
    "perplexity",
    "contrast_prob",
    "contrast_logit",
    "contrast_prob_diff",
    "contrast_logit_diff",
    "kl_divergence",
    "pcxmi",
)
NEEDS_CONTRAST = ("contrast_prob", "contrast_logit", "contrast_prob_diff", "contrast_logit_diff")
NEEDS_CONTRAST_INPUTS = ("kl_divergence", "pcxmi")
#: Inseq's step functions attrax names otherwise or leaves out, and what to use instead
INSEQ_NAMES = {
    "contrast_logits": "'contrast_logit'",
    "contrast_logits_diff": "'contrast_logit_diff'",
    "in_context_pvi": "-pcxmi (log q(y_t) - log p(y_t), in nats as Inseq's)",
    "top_p_size": "no such score in attrax: count the tokens from the logits",
    "mc_dropout_prob_avg": "no such score in attrax (it needs dropout at inference)",
}


_ONE_FORWARD = "step scores come from one teacher-forced forward"
STEP = Family(
    name="step_scores",
    takes=("contrast", "positions", "max_new_tokens"),
    refuses={
        "objective": "step scores are the model's own quantities: choose them with `scores`",
        "attribute_target": "step scores attribute nothing to sources",
        "chunk_size": f"{_ONE_FORWARD}: there is no backward to chunk",
        "batch_size": f"{_ONE_FORWARD}: there are no points to batch",
        "max_memory": f"{_ONE_FORWARD}: there are no sizes to plan",
    },
)


def _score_names(value: object, name: str) -> None:
    if value is not None:
        _names(value)  # type: ignore[arg-type]


@STEP.method(scores=_score_names)
def step_scores(
    call: Call,
    *,
    scores: str | Sequence[str] | None = None,
    contrast_inputs: Texts | None = None,
) -> xr.DataArray:
    """Per-step scores of the target tokens under teacher forcing; natural logarithms throughout.

    With ``p`` the next-token distribution at the position that predicts target ``y_t``:

    - ``probability`` ``p(y_t)``, ``logprob`` ``log p(y_t)``, ``logit`` the raw logit of ``y_t``;
    - ``margin`` ``p(y_t) - max_{v != y_t} p(v)``: positive when ``y_t`` is the top class (token),
      by how much; negative by how far it trails the top one;
    - ``entropy`` ``-sum_v p(v) log p(v)``; ``crossentropy`` ``-log p(y_t)``;
      ``perplexity`` ``exp(crossentropy) = 1 / p(y_t)`` (per step, not averaged);
    - ``contrast_prob`` ``p(c_t)``, ``contrast_logit`` the logit of ``c_t``, ``contrast_prob_diff``
      ``p(y_t) - p(c_t)`` and ``contrast_logit_diff`` (Yin & Neubig 2022) the logit of ``y_t``
      minus that of ``c_t``, with ``contrast`` a text aligned token by token with the target (as
      for the gradient methods): ``c_t`` is scored in the target's context ``y_<t``;
    - ``kl_divergence`` ``KL(p || q)`` and ``pcxmi`` ``log p(y_t) - log q(y_t)``, where ``q`` is the
      distribution when ``contrast_inputs`` (another prompt / source text) replaces ``inputs``
      while the target tokens stay the same (Inseq's contrast sources).

    Arguments:
        model, inputs, targets, positions, max_new_tokens: as :func:`attrax.saliency`.
        scores: a score name or a list of them, in the order wanted along ``score``; None:
            ``"probability"`` (``"logit"``, the value, for a regression head).
        contrast: target-side contrast for the ``contrast_*`` scores.
        contrast_inputs: input-side contrast for ``kl_divergence`` and ``pcxmi``.

    Returns:
        DataArray ``([example,] target, score)``, name ``"step_scores"``; ``target`` coordinates
        are those of an attribution of the same call.

    >>> import attrax as ax
    >>> da = ax.step_scores(ax.load_model(), "1 2 3 =", " 3 2 1", scores=["probability", "entropy"])
    >>> da.dims, da.score.values.tolist()
    (('target', 'score'), ['probability', 'entropy'])
    """
    if scores is None:
        scores = "logit" if call.model.head_type == "regression" else "probability"
    names = _names(scores)
    _require(names, NEEDS_CONTRAST, call.options["contrast"], "contrast")
    _require(names, NEEDS_CONTRAST_INPUTS, contrast_inputs, "contrast_inputs")
    if contrast_inputs is not None:
        if call.model.task != "generation":
            raise OptionError(
                f"`contrast_inputs` replaces a language model's prompt or source with another; "
                f"{call.model.name} is no language model (its task is {call.model.task!r}): "
                "score the other input with its own call"
            )
        check_aligned(contrast_inputs, "contrast_inputs", call.inputs)
    _check_head(call.model, names)
    model, batch = call.model, call.batch
    t = to_tensors(batch, model)
    logits = _logits(model, t)
    if model.head_type == "multi-label":  # each label's own log-probability, log sigmoid
        logp = torch.nn.functional.logsigmoid(logits)
    else:
        logp = torch.log_softmax(logits, dim=-1)
    other = None
    if contrast_inputs is not None:
        contrast_tensors = to_tensors(contrast_batch(model, batch, contrast_inputs), model)
        other = torch.log_softmax(_logits(model, contrast_tensors), dim=-1)
    values = _columns(names, t, logits, logp, other)
    if not all_finite(values):  # NaN would read as a missing target
        raise InputError(
            "step_scores: the scores are not finite (inf/NaN): the model's logits overflowed or "
            "hold NaN; check the model's weights and dtype"
        )
    return label_steps(model, batch, values, names, call.options)


def with_scores(attribution: xr.DataArray | xr.Dataset, scores: xr.DataArray) -> xr.Dataset:
    """Join an attribution and the step scores of the same call into one Dataset.

    Each score becomes a ``([example,] target)`` variable named after it, next to the attribution
    (kept under its own name, ``"attribution"`` when unnamed). The ``target`` coordinates must be
    the same: compute both with the same inputs, targets and positions.

    Arguments:
        attribution: a DataArray with a ``target`` dim (any other dims), or a Dataset with one
            (such as an earlier ``with_scores`` result), from the same model.
        scores: what :func:`step_scores` returned for the same call (a ``score`` dim); target
            coordinates that differ from the attribution's are an :class:`~attrax.InputError`.

    Returns:
        A Dataset: the attribution's variables (an array's attrs also become the Dataset's), one
        ``([example,] target)`` variable per score, its attrs ``method="step_scores"`` and
        ``score=<name>``. A score named as an existing variable is an error.

    >>> import attrax as ax
    >>> model = ax.load_model()
    >>> da = ax.rollout(model, "1 2 3 =", " 3 2 1")
    >>> ds = ax.with_scores(da, ax.step_scores(model, "1 2 3 =", " 3 2 1"))
    >>> sorted(ds.data_vars)
    ['attribution', 'probability']
    """
    if not isinstance(scores, xr.DataArray) or "score" not in scores.dims:
        raise InputError("`scores` must be the DataArray step_scores returns (with a `score` dim)")
    if isinstance(attribution, xr.DataArray):
        dataset = attribution.to_dataset(name=attribution.name or "attribution", promote_attrs=True)
    elif isinstance(attribution, xr.Dataset):
        dataset = attribution
    else:
        raise InputError(
            f"`attribution` must be an xarray DataArray or Dataset, got {type(attribution).__name__}"
        )
    if "target" not in dataset.dims:
        raise InputError("`attribution` has no `target` dim to align the step scores with")
    models = (dataset.attrs.get("model"), scores.attrs.get("model"))
    # one model's scores beside another's (or several models') attributions; one model of a
    # stacked attribution (.sel(model=...)) keeps the stack's name
    picked = "model" in dataset.coords and "model" not in dataset.dims
    if ("model" in dataset.dims and "model" not in scores.dims) or (
        None not in models and models[0] != models[1] and not picked
    ):
        raise InputError(
            f"`scores` come from the model {models[1]!r} but `attribution` from {models[0]!r}: "
            "compute both with the same model (a stacked model's attribution: join one model's "
            "scores with its .sel(model=...))"
        )
    got, want = scores["target"].values, dataset["target"].values
    if not np.array_equal(got, want):
        merged = [
            step
            for step in str(attribution.attrs.get("reductions", "")).split(";")
            if step.startswith("merge_subwords(") and "target" in step
        ]
        why = (
            f"`attribution`'s targets were merged into words ({merged[0]}), the scores' are "
            "tokens: merge dims='source' only to join them"
            if merged
            else "compute both with the same inputs, targets and positions"
        )
        raise InputError(
            f"`scores` has targets {got.tolist()} but `attribution` has {want.tolist()}: {why}"
        )
    # equal positions are not the same targets: the token ids and examples must agree too
    for name, coord in scores.coords.items():
        if name == "target" or "score" in coord.dims or name not in dataset.coords:
            continue
        if dataset[name].dims != coord.dims or not np.array_equal(dataset[name].values, coord):
            raise InputError(
                f"`scores` has {name} {coord.values.tolist()} but `attribution` has "
                f"{dataset[name].values.tolist()}: compute both with the same inputs, targets and "
                "positions"
            )
    variables = {}
    for name in scores["score"].values.tolist():
        if name in dataset.data_vars:
            raise InputError(f"`attribution` already has a variable named {name!r}")
        variables[name] = scores.sel(score=name, drop=True).assign_attrs(
            method="step_scores", score=name
        )
    return dataset.assign(variables)


#: the scores of a classifier whose labels are not one softmax's classes
_HEAD_SCORES = {
    "multi-label": (
        "probability",
        "logprob",
        "logit",
        "crossentropy",
        "perplexity",
        "contrast_prob",
        "contrast_logit",
        "contrast_prob_diff",
        "contrast_logit_diff",
    ),
    "regression": ("logit",),
}


def _check_head(model: Model, names: tuple[str, ...]) -> None:
    """Refuse scores a multi-label head (a sigmoid per label, no distribution over them) or a
    regression head (a value) has none of."""
    allowed = _HEAD_SCORES.get(model.head_type or "")
    wrong = [name for name in names if allowed is not None and name not in allowed]
    if wrong:
        what = {
            "multi-label": "a sigmoid per label, no distribution over the labels",
            "regression": "one output, a value, not a class probability",
        }[model.head_type or ""]
        raise OptionError(
            f"`scores` {wrong[0]!r}: {model.name} is a {model.head_type} head ({what}); its "
            f"scores are {list(allowed or ())}"
        )


def _columns(
    names: tuple[str, ...],
    t: Tensors,
    logits: torch.Tensor,
    logp: torch.Tensor,
    other: torch.Tensor | None,
) -> torch.Tensor:
    """Scores ``[B, K, len(names)]`` from the logits (and contrast log-probs) at the targets."""
    logprob = _pick(logp, t.target_ids)
    formulas: dict[str, Callable[[], torch.Tensor]] = {
        "probability": logprob.exp,
        "logprob": lambda: logprob,
        "logit": lambda: _pick(logits, t.target_ids),
        "margin": lambda: _margin(logp, t.target_ids),
        "entropy": lambda: _entropy(logp),
        "crossentropy": lambda: -logprob,
        "perplexity": lambda: (-logprob).exp(),
        "contrast_prob": lambda: _pick(logp, _given(t.contrast_ids)).exp(),
        "contrast_logit": lambda: _pick(logits, _given(t.contrast_ids)),
        "contrast_prob_diff": lambda: logprob.exp() - _pick(logp, _given(t.contrast_ids)).exp(),
        "contrast_logit_diff": lambda: (
            _pick(logits, t.target_ids) - _pick(logits, _given(t.contrast_ids))
        ),
        "kl_divergence": lambda: _kl(logp, _given(other)),
        "pcxmi": lambda: logprob - _pick(_given(other), t.target_ids),
    }
    return torch.stack([formulas[name]() for name in names], dim=-1)


def _pick(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return values.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def _given(value: torch.Tensor | None) -> torch.Tensor:
    # _require has checked that the contrast a score needs was given
    assert value is not None
    return value


def _names(scores: str | Sequence[str]) -> tuple[str, ...]:
    names = (scores,) if isinstance(scores, str) else scores
    if not isinstance(names, Sequence) or isinstance(names, bytes) or not names:
        raise OptionError(f"`scores` must be a score name or a non-empty list of them: {SCORES}")
    for name in names:
        if name not in SCORES:
            inseq = f" (Inseq's {name!r}: {INSEQ_NAMES[name]})" if name in INSEQ_NAMES else ""
            raise OptionError(
                f"`scores` contains unknown score {name!r}{inseq}; valid scores: {SCORES}"
            )
    if len(set(names)) != len(names):
        raise OptionError(f"`scores` lists a score twice: {list(names)}")
    return tuple(names)


def _require(names: tuple[str, ...], needy: tuple[str, ...], value: Any, option: str) -> None:
    wanting = [name for name in names if name in needy]
    if wanting and value is None:
        raise OptionError(f"score(s) {wanting} need `{option}`")
    if value is not None and not wanting:  # it would change nothing: a forgotten score?
        raise OptionError(
            f"`{option}` is read only by the score(s) {list(needy)}, and `scores` {list(names)} "
            "has none of them: add one, or leave it out"
        )


@torch.no_grad()
def _logits(model: Model, t: Tensors) -> torch.Tensor:
    embeds = model.embed(t.ids, "source")
    decoder = None if t.decoder_ids is None else model.embed(t.decoder_ids, "target")
    with reading(t.ids):
        logits = model.logits_at(
            embeds, t.mask, t.index, decoder, t.decoder_mask, token_types=t.token_types
        )
    return logits.to(at_least_float32(logits.dtype))


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    probs = logp.exp()
    # 0 * log 0 is 0 (a -inf logit), not NaN
    return -torch.where(probs > 0, probs * logp, 0.0).sum(-1)


def _margin(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    probs = logp.exp()
    others = probs.scatter(-1, ids.unsqueeze(-1), float("-inf"))
    return _pick(probs, ids) - others.max(-1).values


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    probs = logp.exp()
    return torch.where(probs > 0, probs * (logp - logq), 0.0).sum(-1)
