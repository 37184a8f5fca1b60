"""What is attributed at each target position: a score of the logits that predict the token."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TypeVar, cast

import torch

from ._errors import OptionError, first_line
from ._memory import at_least_float32

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_Given = TypeVar("_Given")  # what named is given (an option's value) comes back or is a name


def probability(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Softmax probability of each target token: ``logits[..., V]``, ``target_ids[...]`` ->
    ``[...]``; the default ``objective`` of every method (``objective="probability"``).

    Arguments:
        logits: ``[..., V]``, a score per vocabulary entry (or class) at each position.
        target_ids: ``[...]`` integer ids, the token (or class) to score at each position.

    Returns:
        A tensor ``[...]`` in ``logits``' dtype: ``softmax(logits)[target_id]``, computed by a
        log-softmax in float32 at least.

    >>> probability(torch.tensor([[0.0, 0.0]]), torch.tensor([1])).tolist()
    [0.5]
    """
    return _pick(log_softmax(logits), target_ids).exp().to(logits.dtype)


def logprob(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Natural-log probability of each target token: ``logits[..., V]``, ``target_ids[...]``
    -> ``[...]`` (``objective="logprob"``).

    Arguments:
        logits: ``[..., V]``, a score per vocabulary entry (or class) at each position.
        target_ids: ``[...]`` integer ids, the token (or class) to score at each position.

    Returns:
        A tensor ``[...]`` in ``logits``' dtype: ``log_softmax(logits)[target_id]`` (at most 0),
        computed in float32 at least.

    >>> round(logprob(torch.tensor([[0.0, 0.0]]), torch.tensor([1])).item(), 4)
    -0.6931
    """
    return _pick(log_softmax(logits), target_ids).to(logits.dtype)


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the last dim, in float32 at least: a bfloat16 log-probability near
    -12 (a 128k vocabulary) is rounded to 1/32, so its ``exp`` (and the probability's gradient)
    was off by up to 3%, where the loops' ``softmax`` rounds the probability itself (0.4%)."""
    return torch.log_softmax(logits, dim=-1, dtype=at_least_float32(logits.dtype))


def logit(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Raw logit of each target token: ``logits[..., V]``, ``target_ids[...]`` -> ``[...]``
    (``objective="logit"``).

    Also the objective of a regression head (its value), and what ``"logit"`` means for a
    multi-label head.

    Arguments:
        logits: ``[..., V]``, a score per vocabulary entry (or class) at each position.
        target_ids: ``[...]`` integer ids, the token (or class) to score at each position.

    Returns:
        A tensor ``[...]``: ``logits[..., target_id]``, in ``logits``' dtype.

    >>> logit(torch.tensor([[0.5, 2.0]]), torch.tensor([1])).tolist()
    [2.0]
    """
    return _pick(logits, target_ids)


def label_probability(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """A multi-label classifier's probability of each target label, its own sigmoid (what
    ``objective="probability"`` is for such a head).

    Arguments:
        logits: ``[..., C]``, a logit per label.
        target_ids: ``[...]`` integer ids, the label to score at each position.

    Returns:
        A tensor ``[...]`` in ``logits``' dtype: ``sigmoid(logits[..., target_id])``, computed in
        float32 at least; unlike :func:`probability`, the other labels' logits do not enter.

    >>> label_probability(torch.tensor([[0.0, 2.0]]), torch.tensor([0])).tolist()
    [0.5]
    """
    return torch.sigmoid(_pick(logits, target_ids).to(at_least_float32(logits.dtype))).to(
        logits.dtype
    )


def label_logprob(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """A multi-label classifier's log-probability of each target label, ``log sigmoid``.

    What ``objective="logprob"`` is for a multi-label head.

    Arguments:
        logits: ``[..., C]``, a logit per label.
        target_ids: ``[...]`` integer ids, the label to score at each position.

    Returns:
        A tensor ``[...]`` in ``logits``' dtype: ``logsigmoid(logits[..., target_id])``, computed
        in float32 at least.

    >>> round(label_logprob(torch.tensor([[0.0, 2.0]]), torch.tensor([0])).item(), 4)
    -0.6931
    """
    picked = _pick(logits, target_ids).to(at_least_float32(logits.dtype))
    return torch.nn.functional.logsigmoid(picked).to(logits.dtype)


def _pick(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return values.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


OBJECTIVES: dict[str, Objective] = {
    "probability": probability,
    "logprob": logprob,
    "logit": logit,
}


#: a multi-label head's named objectives: each label's sigmoid, not a softmax over the labels
LABEL_OBJECTIVES: dict[str, Objective] = {
    "probability": label_probability,
    "logprob": label_logprob,
    "logit": logit,
}


def resolve(objective: str | Objective, head: str | None = None) -> tuple[str, Objective]:
    """The objective's name and function; callables ``(logits, target_ids) -> scores`` pass.

    ``head`` (a classifier's :attr:`Model.head_type`) picks what a name means: a multi-label head's
    ``"probability"`` is the label's sigmoid; a regression head has no probability, and its
    (default) ``"probability"`` is its value, ``"logit"`` (an explicit one is refused before).
    The public functions ``ax.probability``... given as callables are their names."""
    objective = named(objective)
    if head == "regression" and objective == "probability":
        return "logit", logit
    if head == "multi-label" and isinstance(objective, str) and objective in LABEL_OBJECTIVES:
        return objective, LABEL_OBJECTIVES[objective]
    if callable(objective):
        name = getattr(objective, "__name__", type(objective).__name__)
        try:
            inspect.signature(objective).bind(None, None)
        except TypeError as err:
            raise OptionError(
                f"`objective` {name} must take (logits, target_ids), two arguments: {err}"
            ) from None
        except ValueError:  # a builtin without a signature: its call will tell
            pass
        return name, objective
    if isinstance(objective, str) and objective in OBJECTIVES:
        return objective, OBJECTIVES[objective]
    raise OptionError(
        f"`objective` must be one of {sorted(OBJECTIVES)} or a callable "
        f"(logits, target_ids) -> scores, got {objective!r}"
    )


def check_differentiable(objective: Objective, method: str, width: int) -> None:
    """Refuse a callable objective whose gradient with respect to the logits is zero at random
    logits (``width`` classes or vocabulary entries): it detaches them, runs under ``no_grad`` or
    is piecewise constant (argmax, comparisons), and every gradient of ``method`` would be zero.
    """
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, width, generator=generator)
    ids = torch.tensor([0, width - 1])
    try:
        # without has_aux, the pair (output, pullback): torch types the triple too
        value, pull = cast(
            "tuple[torch.Tensor, Callable[..., tuple[torch.Tensor, ...]]]",
            torch.func.vjp(lambda x: objective(x, ids), logits),
        )
        (gradient,) = pull(torch.ones_like(value))
    except Exception:  # the call itself checks the objective and says what is wrong
        return
    if not bool(gradient.any()):
        name = getattr(objective, "__name__", type(objective).__name__)
        raise OptionError(
            f"`objective` {name} has a zero gradient with respect to the logits (at random "
            f"logits): it detaches them, runs under no_grad or is piecewise constant (argmax, "
            f"comparisons), so every attribution of {method}, which differentiates it, would be "
            "zero; give a differentiable score, or use a perturbation method (occlusion, lime, "
            "kernel_shap), which only evaluates it"
        )


def named(objective: _Given) -> _Given | str:
    """``objective`` by name when it is one of the named objectives' functions: ``ax.probability``
    is ``"probability"``, which a multi-label or regression head reads its own way."""
    for name, function in OBJECTIVES.items():
        if objective is function:
            return name
    return objective


def _builtin(objective: Objective) -> bool:
    return any(objective is f for f in (*OBJECTIVES.values(), *LABEL_OBJECTIVES.values()))


def evaluate_objective(
    objective: Objective,
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    contrast_ids: torch.Tensor | None,
) -> torch.Tensor:
    """Objective per target, minus the same objective of the contrast token when given."""
    value = _checked(objective, logits, target_ids)
    if contrast_ids is not None:
        value = value - _checked(objective, logits, contrast_ids)
    return value


def _checked(objective: Objective, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    try:
        value = objective(logits, ids)
    except (IndexError, KeyError, TypeError, ValueError, AttributeError) as err:
        if _builtin(objective) or isinstance(err, OptionError):
            raise
        # the user's function failed on what it was given: said with the shapes, one line
        name = getattr(objective, "__name__", type(objective).__name__)
        first = first_line(err)
        raise OptionError(
            f"`objective` {name} raised {type(err).__name__} ({first}) on logits of shape "
            f"{tuple(logits.shape)} and target ids of shape {tuple(ids.shape)}: it must map "
            "(logits[..., V], ids[...]) to one score per id"
        ) from err
    if not isinstance(value, torch.Tensor) or value.shape != ids.shape:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise OptionError(
            f"`objective` must return one score per target token, shape {tuple(ids.shape)}, "
            f"got {shape}"
        )
    if not value.is_floating_point():  # nothing to differentiate; torch.func would say so raw
        raise OptionError(
            f"`objective` must return floating-point scores (of the logits), got {value.dtype}"
        )
    return value
