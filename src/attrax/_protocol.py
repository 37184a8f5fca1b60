"""The method protocol: the parameters methods share are declared, checked and recorded here.

A method is written as a *core* ``core(call, *, own options...)`` and made public by a
:class:`Family`'s decorator (``@GRADIENT.method(steps=positive_int, ...)``). The family adds the
common parameters it takes (:data:`COMMON`), refuses the others with an :class:`OptionError`
that says why, checks every option before the model runs, and records every option (defaults
included) in the result's ``attrs["options"]``. A method declares only what is its own.

>>> import attrax as ax
>>> ax.saliency(ax.load_model(), "1 2 3 =", " 3 2 1", steps=4)
Traceback (most recent call last):
attrax._errors.OptionError: saliency has no option 'steps'; its options are: abs, objective, contrast, positions, attribute_target, chunk_size, batch_size, max_new_tokens, max_memory, reduce_hidden, mode, layers, site
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np
import torch
import xarray as xr

from . import _validate as check
from ._engine import Problem, all_finite
from ._errors import AttraxError, InputError, OptionError, ResourceError
from ._inputs import Batch, Texts, prepare, with_predictions
from ._memory import out_of_memory, parse_bytes
from ._model import Model, ModelLike, evaluating, frozen, load_model, whole_feed_forward
from ._objectives import Objective, check_differentiable, named, resolve
from ._schema import label
from ._validate import Check


@dataclass(frozen=True)
class Param:
    """A parameter: its default, type, check and one line of documentation."""

    default: Any
    annotation: Any
    check: Check | None
    doc: str


def _objective(value: object, name: str) -> None:
    resolve(value)  # type: ignore[arg-type]


#: The parameters attribution methods share, declared once.
COMMON: dict[str, Param] = {
    "objective": Param(
        "probability",
        "str | Objective",
        _objective,
        "'probability' (default; a regression head's: 'logit'), 'logprob', 'logit' or a "
        "callable (logits[..., V], ids[...]) -> one score per id",
    ),
    "contrast": Param(
        None,
        "Texts | None",
        None,
        "a text aligned token by token with the target (a classifier's: a second class): "
        "the objective of the target minus that of the contrast",
    ),
    "positions": Param(
        None,
        "int | Sequence[int] | None",
        None,
        "attribute only these target positions (negative: from the end)",
    ),
    "attribute_target": Param(
        False, "bool", check.boolean, "encoder-decoder: also attribute to the decoder prefix"
    ),
    "chunk_size": Param(
        "auto",
        "int | str | None",
        check.size,
        "targets per vectorized backward: 'auto' (default) as many as fit `max_memory`, None "
        "all at once",
    ),
    "batch_size": Param(
        "auto",
        "int | str | None",
        check.size,
        "model evaluations (points, samples, perturbed copies) per forward: 'auto' (default) "
        "as many as fit `max_memory`, None all at once",
    ),
    "max_new_tokens": Param(
        20, "int", check.positive_int, "tokens to generate greedily when `targets` is None"
    ),
    "max_memory": Param(
        None,
        "int | str | None",
        check.memory,
        "bytes the `\"auto\"` sizes may use, an int or a string such as '8GB' or '512MiB' "
        "(None: half the device's free memory)",
    ),
}


#: the method differentiating in this thread: a call from inside it (an objective that calls
#: attrax) would run under its transforms and patched modules, and fail in torch
_RUNNING: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "attrax_running", default=None
)


#: the leading arguments' documentation, for the methods that leave it to the protocol
LEADING = {
    "model": "a :class:`Model` (from :func:`load_model`) or a path to load",
    "inputs": "a text (a prompt, a source text, a classifier's input or (text, pair)), or a "
    "list of them",
    "targets": "what to explain: a continuation or translation, a classifier's class, "
    '"all" or None (a language model generates greedily, a classifier takes its prediction)',
    "attribution": "the attribution to score, from the same inputs and targets",
    "scores": "edge attribution patching's estimates whose top edges make the circuits",
}
_ENTRY = re.compile(r"^ {4}(\w[\w ,]*):(?:\s|$)")
_ALSO = re.compile(r"[;.] (\w+):")


def documented(doc: str | None) -> set[str]:
    """The argument names a docstring's ``Arguments`` sections describe (``a, b and c: ...``
    and ``...; seed: ...`` or ``... . out: ...`` within an entry included).

    >>> sorted(documented("What.\\n\\nArguments:\\n    a, b and c: x; d: y\\n\\nReturns: z"))
    ['a', 'b', 'c', 'd']
    """
    names: set[str] = set()
    section = False
    for line in inspect.cleandoc(doc or "").splitlines():
        if line and not line[0].isspace():
            section = line.startswith(("Arguments", "Shared arguments")) and line.endswith(":")
            continue
        if not section:
            continue
        entry = _ENTRY.match(line)
        if entry:
            names |= set(re.split(r",\s*|\s+and\s+", entry.group(1).strip()))
        names |= set(_ALSO.findall(line))
    return names


def _with_shared(doc: str | None, shared: Mapping[str, Param], leading: Sequence[str]) -> str:
    """``doc`` with a ``Shared arguments`` section for the leading arguments and shared options
    it does not describe itself, written from :data:`LEADING` and the :class:`Param` docs,
    before its ``Returns`` (``help(ax.method)`` is whole; each line is written once)."""
    doc = doc or ""
    told = documented(doc)
    docs = {name: LEADING[name] for name in leading if name in LEADING}
    docs |= {name: param.doc for name, param in shared.items()}
    missing = {name: text for name, text in docs.items() if name not in told}
    if not missing:
        return doc
    lines = ["    Shared arguments (as every method takes them):"]
    for name, text in missing.items():
        lines += textwrap.wrap(
            f"{name}: {text}.", 96, initial_indent=" " * 8, subsequent_indent=" " * 12
        )
    block = "\n".join(lines) + "\n\n"
    at = doc.find("\n    Returns:")
    at = at + 1 if at >= 0 else doc.find("\n    >>>") + 1
    return doc[:at] + block + doc[at:] if at > 0 else doc.rstrip() + "\n\n" + block


@dataclass(frozen=True)
class Call:
    """One call of a method: the model, the tokenized batch (built on first use), the options."""

    method: str
    model: Model
    inputs: Texts
    targets: Texts | None
    options: Mapping[str, Any]
    #: a classifier's prediction (given targets) waits for :meth:`label`, which takes the class
    #: logits of a forward the method ran anyway (:attr:`Family.lazy_prediction`)
    lazy_prediction: bool = False

    @cached_property
    def batch(self) -> Batch:
        """The tokenized inputs and targets (targets generated greedily when None)."""
        o = self.options
        return prepare(
            self.model,
            self.inputs,
            self.targets,
            contrast=o.get("contrast"),
            positions=o.get("positions"),
            max_new_tokens=o.get("max_new_tokens", COMMON["max_new_tokens"].default),
            predict=not self.lazy_prediction,
        )

    @cached_property
    def objective(self) -> tuple[str, Objective]:
        """The objective's name and function (``"none"`` for methods without one)."""
        if "objective" not in self.options:
            return "none", resolve("probability")[1]
        return resolve(self.options["objective"], self.model.head_type)

    @cached_property
    def problem(self) -> Problem:
        """The tensors, embeddings and objective of the call, for the engine."""
        attribute_target = bool(self.options.get("attribute_target", False))
        budget = parse_bytes(self.options.get("max_memory"))
        return Problem.build(self.model, self.batch, self.objective[1], attribute_target, budget)

    def label(
        self,
        sides: Sequence[torch.Tensor | np.ndarray],
        *,
        trailing: Sequence[str] = ("hidden",),
        target_coords: Mapping[str, torch.Tensor | np.ndarray] | None = None,
        trailing_coords: Mapping[str, Sequence[int]] | None = None,
        class_logits: torch.Tensor | None = None,
    ) -> xr.DataArray:
        """The labelled result of per-example values ``[B, K, L, *trailing]`` per side.

        ``class_logits``: a classifier's logits ``[B, K, classes]`` at the unperturbed input,
        for a batch whose prediction was left for later (one forward computes it when None)."""
        _check_finite(self, sides)
        return label(
            self.model,
            with_predictions(self.model, self.batch, class_logits),
            sides,
            method=self.method,
            objective=self.objective[0],
            options=self.options,
            trailing=trailing,
            target_coords=target_coords,
            trailing_coords=trailing_coords,
        )


def _check_finite(call: Call, sides: Sequence[torch.Tensor | np.ndarray]) -> None:
    """Refuse inf anywhere and NaN where a target can see its source: NaN marks the future and
    padding in results, and one the model made (NaN weights, a float16 overflow) must not pass
    as that."""
    values = [torch.as_tensor(side) for side in sides]
    if all_finite(*values):
        return
    bad = any(bool(v.isinf().any()) for v in values)
    if not bad:
        joined = torch.cat([v.reshape(*v.shape[:3], -1).isnan().any(-1) for v in values], 2)
        visible = call.problem.visible().to(joined.device)
        # sides laid out otherwise (a decoder's own stacks) cannot be told apart from padding
        bad = visible.shape == joined.shape and bool((joined & visible).any())
    if bad:
        raise InputError(
            f"{call.method}: the values are not finite (inf/NaN) where the targets see their "
            "sources: the model's outputs overflowed or hold NaN; check the model's weights and "
            "dtype, and the inputs"
        )


Core = Callable[..., Any]
Run = Callable[[Core, Call, dict[str, Any]], xr.DataArray]


def run_with_call(core: Core, call: Call, arguments: dict[str, Any]) -> xr.DataArray:
    """The default way to run: the core gets the call and its own options, and labels."""
    return core(call, **own_options(core, arguments))


@dataclass(frozen=True)
class Family:
    """Methods that share common parameters and a way to run (gradient, perturbation, ...).

    ``takes`` names the :data:`COMMON` parameters the family's methods accept, ``refuses`` says
    why each other one does not apply, ``extra`` adds the family's own parameters, and
    ``run(core, call, own)`` runs a core with its own options and returns the labelled result.
    """

    name: str
    takes: tuple[str, ...]
    refuses: Mapping[str, str]
    run: Run = run_with_call
    extra: Mapping[str, Param] = field(default_factory=dict)
    leading: tuple[str, ...] = ("model", "inputs", "targets")
    #: ``run`` leaves a classifier's prediction (when targets are given) to ``Call.label``, with
    #: the class logits of its own forward: only for runs whose forwards are the model's own
    #: (no activation taps), so that the logits are the prediction's
    lazy_prediction: bool = False
    #: the methods differentiate the objective (a callable one is checked to have a gradient)
    differentiates: bool = False

    def method(
        self, together: Callable[[Mapping[str, Any]], None] | None = None, **checks: Check
    ) -> Callable[[Core], Callable[..., xr.DataArray]]:
        """Decorator: the public method of a core, its own options checked by ``checks`` (one
        per option) and ``together`` (all options at once, for rules that join two)."""
        return functools.partial(_public, self, checks, together)

    def derive(self, run: Run, **extra: Param) -> Family:
        """This family's parameters plus ``extra`` (which may override one), run by ``run``:
        usually ``self.run`` inside a context that changes the backward (guided, DeepLIFT, LRP)."""
        return replace(self, run=run, extra={**self.extra, **extra})


def _public(
    family: Family,
    checks: Mapping[str, Check],
    together: Callable[[Mapping[str, Any]], None] | None,
    core: Core,
) -> Callable[..., Any]:
    own = [p for p in inspect.signature(core).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = set(checks) - {p.name for p in own}
    if unknown:  # a programming error in attrax, not a user's
        raise TypeError(f"{core.__name__}: checks for no option: {sorted(unknown)}")
    shared = {name: COMMON[name] for name in family.takes} | dict(family.extra)
    parameters = [_leading(name) for name in family.leading]
    parameters += own
    parameters += [
        inspect.Parameter(
            n, inspect.Parameter.KEYWORD_ONLY, default=p.default, annotation=p.annotation
        )
        for n, p in shared.items()
    ]
    signature = inspect.Signature(parameters, return_annotation="xr.DataArray")
    option_names = [p.name for p in own] + list(shared)
    all_checks = {**{n: p.check for n, p in shared.items() if p.check}, **checks}
    name = core.__name__

    def check_names(kwargs: Mapping[str, Any]) -> None:
        for key in kwargs:
            if key in option_names or key in family.leading:
                continue
            if key in family.refuses:
                raise OptionError(f"{name} does not take `{key}`: {family.refuses[key]}")
            raise OptionError(
                f"{name} has no option {key!r}; its options are: {', '.join(option_names)}"
            )

    def python_scalars(arguments: Mapping[str, Any]) -> dict[str, Any]:
        # numpy's scalars (np.arange's, np.argmax's) as the Python ones the checks and attrs take
        return {k: v.item() if isinstance(v, np.generic) else v for k, v in arguments.items()}

    def check_values(arguments: Mapping[str, Any]) -> None:
        for key, value in arguments.items():
            if key in all_checks:
                all_checks[key](value, key)
        if together is not None:
            together(arguments)

    def resolve(options: Mapping[str, Any], checked: bool = True) -> dict[str, Any]:
        """Every option of the method, checked: those given and the defaults of the others
        (``checked=False``: the defaults as they are, a required one's None included)."""
        check_names(options)
        leading = [key for key in options if key in family.leading]
        if leading:
            raise OptionError(f"{name}: {leading} are arguments, not options")
        bound = signature.bind_partial(**options)
        bound.apply_defaults()
        resolved = python_scalars({k: v for k, v in bound.arguments.items() if k in option_names})
        if checked:
            check_values(resolved)
        return resolved

    @functools.wraps(core)
    def public(*args: Any, **kwargs: Any) -> xr.DataArray:
        outer = _RUNNING.get()
        if outer is not None:
            raise OptionError(
                f"{name} was called while {outer} runs (from its objective?): {outer} "
                "differentiates through the model with its modules patched for the call, and a "
                "call inside it cannot run; call it before or after"
            )
        check_names(kwargs)
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as err:
            raise OptionError(f"{name}: {err}") from None
        bound.apply_defaults()
        arguments = python_scalars(bound.arguments)
        check_values(arguments)
        if getattr(arguments.get("model"), "attrax_stacked", False):  # ax.stack_models
            return arguments["model"].run(public, name, arguments)
        call = _call(name, family, arguments)
        _check_applies(call.model, kwargs)
        objective = arguments.get("objective")
        hf = call.model.hf
        with call.model.call_lock, evaluating(hf), frozen(hf), whole_feed_forward(hf):
            call.model.check_unchanged()
            if family.differentiates and callable(objective):
                check_differentiable(objective, name, call.model.output_width)
            running = _RUNNING.set(name) if family.differentiates else None
            try:
                return family.run(core, call, arguments)
            except (MemoryError, RuntimeError, ValueError) as err:
                if isinstance(err, AttraxError) or (tried := out_of_memory(err)) is None:
                    raise
            finally:
                if running is not None:
                    _RUNNING.reset(running)
        # raised after the handler, so that the failed passes' tensors are freed first
        raise ResourceError(_out_of_memory_message(name, call, kwargs, tried))

    public.__signature__ = signature  # type: ignore[attr-defined]
    public.__doc__ = _with_shared(core.__doc__, shared, family.leading)
    public.attrax_family = family.name  # type: ignore[attr-defined]
    # what a call with these options would run with, checked without running anything
    public.attrax_resolve = resolve  # type: ignore[attr-defined]
    # ax.pipe(method, ax.l2_norm | ax.sum, ...) reduces over hidden on the device instead
    public.attrax_reduces_hidden = "reduce_hidden" in shared  # type: ignore[attr-defined]
    return public


#: the options that scale a call's memory, named when it runs out
_SIZES = ("steps", "samples", "permutations", "batch_size", "chunk_size", "max_memory")


def _out_of_memory_message(name: str, call: Call, given: Mapping[str, Any], tried: str) -> str:
    """One line for a call that ran out of memory: where, what it tried, the sizes it had."""
    sizes = ", ".join(f"{k}={given[k]!r}" for k in _SIZES if k in given)
    # the problem as built, if it was: building it again here could run out again
    problem = call.__dict__.get("problem")
    device = call.model.device if problem is None else problem.inputs[0].device
    shape = None if problem is None else problem.inputs[0].shape
    return (
        f"{name} ran out of memory on {device.type}"
        + (f" (it tried to allocate {tried})" if tried else "")
        + ("" if shape is None else f" on {shape[0]} input(s) of {shape[1]} tokens")
        + (f" with {sizes}" if sizes else "")
        + ": give fewer steps or samples, smaller batch_size or chunk_size, or a max_memory "
        "the planner bounds its passes by"
    )


def _leading(name: str) -> inspect.Parameter:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    if name == "targets":
        return inspect.Parameter(name, kind, default=None, annotation="Texts | None")
    annotation = {"model": "ModelLike", "inputs": "Texts", "attribution": "xr.DataArray",
                  "scores": "xr.DataArray"}[name]  # fmt: skip
    return inspect.Parameter(name, kind, annotation=annotation)


#: options given to a classifier that only a language model's generation or decoder reads
_GENERATION_ONLY = {
    "attribute_target": "it adds an encoder-decoder's decoder prefix to the sources",
    "max_new_tokens": "it bounds the targets a language model generates",
}


_KIND = {
    "sequence-classification": "classifier",
    "token-classification": "classifier",
    "question-answering": "question-answering model",
    "fill-mask": "masked language model",
}
_TARGETS = {
    "sequence-classification": "classes",
    "token-classification": "classes",
    "question-answering": "its answer's start and end",
    "fill-mask": "its masks' tokens",
}


def _check_applies(model: Model, given: Mapping[str, Any]) -> None:
    """Refuse options given to a classifier that it would ignore, and a regression head's
    probabilities, which it has none of."""
    if model.task == "generation":
        return
    objective = named(given.get("objective"))
    if model.head_type == "regression" and objective in ("probability", "logprob"):
        raise OptionError(
            f"`objective={objective!r}`: {model.name} is a regression head (one output, a value, "
            "not a class probability); its objective is objective='logit', the default for it"
        )
    for key, why in _GENERATION_ONLY.items():
        if key in given and (key != "attribute_target" or given[key]):
            raise OptionError(
                f"`{key}` does not apply to {model.name}, a {_KIND[model.task]}: {why}; its "
                f"targets are {_TARGETS[model.task]}"
            )


def _call(name: str, family: Family, arguments: dict[str, Any]) -> Call:
    options = {k: v for k, v in arguments.items() if k not in family.leading}
    model = load_model(arguments["model"])  # a Model passes through as is
    if model.head_type == "regression" and options.get("objective") == "probability":
        options["objective"] = "logit"  # its default: a value has no probability; as recorded
    return Call(
        name, model, arguments["inputs"], arguments.get("targets"), options, family.lazy_prediction
    )


def own_options(core: Core, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The options of ``arguments`` that are ``core``'s own (keyword-only in its signature)."""
    return {n: arguments[n] for n in _keyword_only(core)}


@functools.cache
def _keyword_only(core: Core) -> tuple[str, ...]:
    # once per core, not per call: inspect.signature costs ~0.1 ms
    parameters = inspect.signature(core).parameters.values()
    return tuple(p.name for p in parameters if p.kind is p.KEYWORD_ONLY)


__all__ = ["COMMON", "LEADING", "Call", "Family", "ModelLike", "Param", "documented", "own_options"]
