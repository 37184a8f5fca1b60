"""ReAGent (Zhao & Shan 2024, "ReAGent: A Model-agnostic Feature Attribution Method for Generative
Language Models"): a token matters when replacing it drops the target's probability.

Each target runs ``probes`` independent chains of random replacements. A step of every chain of
every target is one sequence through the model; a block of steps of all of them runs as batched
forwards, since a chain's updates do not depend on its scores (only its stopping does): the
block's scores are cumulative sums, and each chain stops at the first step of the block that
meets the stopping rule, as a step-by-step run would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import xarray as xr

from . import _validate as check
from ._engine import DRAWS, Problem, all_finite, cut_length
from ._errors import InputError, OptionError
from ._memory import (
    Size,
    at_least_float32,
    between_passes,
    head_bytes,
    memory_budget,
    plan_forwards,
    reuse_host_memory,
)
from ._model import Model
from ._objectives import named
from ._protocol import COMMON, Call, Family, own_options

#: bytes a running chain's step holds per token besides the forwards: its draws, replacement
#: ids, score changes, cumulative scores, importances, ranks (int64) and masks
CHAIN = 160
#: the most steps a block of batched forwards runs ahead (blocks double up to it from 1): a
#: chain that stops early wastes at most the rest of its block
BLOCK = 64


def _check_ratio(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise OptionError(f"`{name}` must be a fraction in (0, 1], got {value!r}")


def _check_keep(value: object, name: str) -> None:
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise OptionError(
                f"`{name}` as a float is the share of tokens kept, in (0, 1], got {value!r}"
            )
        return
    check.positive_int(value, name)


def _check_replacements(value: object, name: str) -> None:
    if isinstance(value, str) and value == "uniform":
        return
    if (
        isinstance(value, torch.Tensor)
        and value.ndim == 1
        and value.numel() > 0
        and not value.is_floating_point()
        and not value.is_complex()
        and value.dtype != torch.bool
        and value.layout == torch.strided
        and not value.is_meta
    ):
        return
    got = (
        f"a {value.dtype} tensor of shape {tuple(value.shape)}"
        if isinstance(value, torch.Tensor)
        else repr(value)
    )
    raise OptionError(
        f"`{name}` must be 'uniform' or a 1-D integer tensor giving each token id its group "
        f"(a replacement is drawn from its token's group; negative: never drawn), got {got}"
    )


def _only_probability(arguments: Mapping[str, Any]) -> None:
    objective = named(arguments.get("objective", "probability"))
    if objective != "probability":
        raise OptionError(
            f"reagent scores the target's probability (its updates are probability drops, in "
            f"[-1, 1]), so `objective` must be 'probability', got {objective!r}"
        )


def _run(core: Any, call: Call, arguments: dict[str, Any]) -> xr.DataArray:
    problem = call.problem
    model = problem.model
    if model.head_type == "regression":
        raise OptionError(
            f"reagent needs the target's probability, and {model.name} is a regression head "
            "(a value, no class probability)"
        )
    top_k = arguments["top_k"]
    if top_k is None:  # Inseq's 3 for a language model; a classifier's prediction itself
        top_k = 3 if model.task == "generation" else 1
        arguments = {**arguments, "top_k": top_k}
    # a question-answering model predicts positions: its outputs are the sequence's
    outputs = problem.inputs[0].shape[1] if model.task == "question-answering" else None
    outputs = outputs or model.output_width
    if top_k >= outputs:
        raise OptionError(
            f"`top_k`={top_k} is not below the {outputs} outputs of {model.name}: every target "
            "would be in its top predictions and every probe would stop at its first step"
        )
    values, stopped = core(problem, call.options["batch_size"], **own_options(core, arguments))
    if not all_finite(values):
        raise InputError(
            "reagent: the scores are not finite (inf/NaN): the target's probability was 0 or 1, "
            "or the model's outputs overflowed; check the model's dtype and inputs"
        )
    widths = [x.shape[1] for x in problem.inputs]
    sides = values.to(problem.inputs[0].dtype).cpu().split(widths, dim=-1)
    return call.label(sides, trailing=(), target_coords={"stopped": stopped})


#: ReAGent: forwards only, of the target's probability, with no contrast (its stopping rule asks
#: whether the target is among the model's top predictions)
REAGENT = Family(
    name="perturbation",
    takes=tuple(n for n in COMMON if n not in ("chunk_size", "contrast")),
    refuses={
        "chunk_size": "reagent runs forwards only; `batch_size` bounds them",
        "contrast": "its stopping rule asks whether the target is among the model's top "
        "predictions, which a difference of two tokens' probabilities has no counterpart of",
    },
    run=_run,
)


@REAGENT.method(
    _only_probability,
    probes=check.positive_int,
    max_steps=check.positive_int,
    replace_ratio=_check_ratio,
    keep=_check_keep,
    invert_keep=check.boolean,
    top_k=check.optional(check.positive_int),
    replacements=_check_replacements,
    seed=check.seed,
)
@reuse_host_memory()  # its forwards' heap reused between chunks, as the engine's passes
def reagent(
    problem: Problem,
    batch_size: Size,
    *,
    probes: int = 16,
    max_steps: int = 3000,
    replace_ratio: float = 0.3,
    keep: int | float = 5,
    invert_keep: bool = False,
    top_k: int | None = None,
    replacements: str | torch.Tensor = "uniform",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ReAGent (Zhao & Shan 2024): how much replacing each source token drops the target's
    probability, learnt by random replacements until the top tokens alone keep the target.

    Each of a target's ``probes`` chains starts from scores ``s`` drawn uniformly in [0, 1). A
    step replaces each source token the target sees with probability ``replace_ratio`` by a
    token drawn from ``replacements``, and with ``d = p(x) - p(x~)`` the drop of the target's
    probability, adds ``logit((±d + 1) / 2)`` to ``s``: ``+d`` for the replaced tokens, ``-d``
    for the kept ones (a drop of exactly ±1 counts as ±(1 - 2**-52), ±(1 - 2**-23) on MPS).
    The chain stops at the first step where the target is among the model's ``top_k``
    predictions once every token but the ``keep`` ranked highest by ``s`` is replaced (the
    ranked ones replaced instead with ``invert_keep``), or after ``max_steps``.
    The result is the mean of ``softmax(s)`` over the chains that stopped (over all of them
    where none did; the ``stopped`` coordinate counts them). Inseq's ``reagent`` with a token
    sampler of its own; the paper draws replacements from a masked language model instead.

    Arguments (others as :func:`saliency`; ``objective`` must be ``"probability"``):
        probes: chains per target; max_steps: the most steps of a chain.
        replace_ratio: the chance of each token being replaced at a step.
        keep: the tokens kept when the stopping rule is checked: a count, or a float in (0, 1],
            the share of the tokens the target sees, ``ceil(keep * n)`` of the float64 product
            (``0.3`` of 10 keeps 4, as Inseq).
        invert_keep: replace the top tokens instead of keeping them when checking.
        top_k: the target must be among this many top predictions for a chain to stop (ties
            with the target count in its favour; None: 3 for a generating model, as Inseq's, 1,
            the prediction itself, for the other tasks). Below the model's outputs (a
            question-answering model's: the positions).
        replacements: ``"uniform"``, a draw from every token id of the vocabulary but the
            special ones, or an integer tensor ``[V]`` giving each id a group (a part-of-speech
            tag, as Inseq's sampler): a token is replaced by an id drawn uniformly from its own
            group (itself included); ids of a negative group are never drawn, and a token with
            none (or an id from ``V`` on) by one drawn from every id of a group.
        seed: each example draws from its own CPU generator seeded with ``seed``, in float32:
            ``rand(targets, probes, players)`` for the initial scores, then
            ``rand(3, targets, probes, players)`` per step (which tokens are replaced, their
            replacements, the replacements when checking), ``players`` the tokens any of its
            targets sees, targets in order; a draw ``u`` picks the
            ``floor(u * n)``-th of the ``n`` ids of a group, in increasing order.
        batch_size: sequences per forward (each a copy of an example for one target).

    Returns:
        DataArray ``(target, source)`` of importances (each target's sum to 1 over the tokens
        it sees), with the ``stopped`` coordinate, and ``example`` first for a list of inputs.

    >>> import attrax as ax
    >>> ax.reagent(ax.load_model(), "1 2 3 =", " 3 2 1", probes=4, max_steps=20).dims
    ('target', 'source')
    """
    model = problem.model
    t = problem.tensors
    visible = problem.visible()  # [B, K, L]
    device = visible.device
    batch, width, length = visible.shape
    acc = DRAWS if problem.inputs[0].dtype != torch.float64 else torch.float64
    # the drops and their logits: float64 where the device has it (MPS has not)
    wide = torch.float32 if device.type == "mps" else torch.float64
    edge = torch.finfo(wide).eps / 2  # a drop of +-1 would add an infinite score
    chains = batch * width * probes
    assert top_k is not None  # _run resolved None to the task's default
    forward = _Forward(problem, _attributed_ids(problem), batch_size, top_k, wide)
    # held through the call: the chains' scores, and their importances at the end
    problem.hold(3 * chains * length * acc.itemsize, "probes", probes, "the scores")
    # a step's draws for every chain, and its tensors for each running one
    step_bytes = chains * length * (3 * DRAWS.itemsize + CHAIN)
    forward.check(step_bytes)  # before anything is drawn: a budget one step cannot meet
    budget = problem.max_memory or memory_budget(device)
    forward.sampler = _Sampler(replacements, model, len(problem.inputs))
    original = problem.evaluate(tuple(x[None] for x in problem.inputs))[0]  # [B, K]
    if not all_finite(original):
        raise InputError(
            "reagent: the target's probability is not finite (inf/NaN) at the input; check the "
            "model's weights and dtype, and the inputs"
        )
    original = original.to(wide)
    draws = _Draws(visible, t.valid, probes, seed)
    scores = draws.initial().to(device=device, dtype=acc)  # [B, K, P, L]
    stopped = torch.zeros((batch, width, probes), dtype=torch.bool, device=device)
    active = t.valid[..., None].expand(-1, -1, probes).clone()
    seen = visible.sum(-1).cpu()  # [B, K]
    if isinstance(keep, float):
        # as a float64 product, rounded up: 0.3 * 10 keeps 4, as Inseq's ceil(ratio * n) does
        kept = torch.ceil(seen.double() * keep).long()
    else:
        kept = torch.full_like(seen, keep)
    kept = torch.minimum(kept, seen).to(device)
    done, block = 0, 1
    while done < max_steps and bool(active.any()):  # blocks: the stopping rule is sequential
        running = chains * length * 3 * DRAWS.itemsize + int(active.sum()) * length * CHAIN
        # half of what the forwards leave to the block's tensors
        room = (budget - forward.smallest(0)) // (2 * running)
        block = min(block, max_steps - done, max(1, min(BLOCK, room)))
        forward.block_bytes = block * running
        u = draws.steps(block)  # [S, 3, B, K, P, L] on the CPU
        b, k, p = active.nonzero(as_tuple=True)
        u = u[:, :, b.cpu(), k.cpu(), p.cpu()].to(device)  # [S, 3, n, L]
        sees = visible[b, k]  # [n, L]
        replaced = (u[:, 0] < replace_ratio) & sees
        drop = original[b, k] - forward.probability(b, k, replaced, u[:, 1])  # [S, n]
        signed = torch.where(replaced, drop[..., None], -drop[..., None])
        share = (signed * 0.5 + 0.5).clamp(edge, 1 - edge)
        change = torch.logit(share).to(acc).masked_fill(~sees, 0)
        chain = scores[b, k, p] + change.cumsum(0)  # [S, n, L]
        # ranked on the scores, not their softmax, which underflows to ties at 0 in long runs
        order = chain.masked_fill(~sees, -math.inf).argsort(dim=-1, descending=True, stable=True)
        top = order.argsort(dim=-1) < kept[b, k][:, None]
        checked = (top if invert_keep else ~top) & sees
        hit = forward.in_top_k(b, k, checked, u[:, 2])  # [S, n]
        first = torch.where(hit.any(0), hit.int().argmax(0), block - 1)
        scores[b, k, p] = chain[first, torch.arange(first.numel(), device=device)]
        stopped[b, k, p] = hit.any(0)
        active[b, k, p] = ~hit.any(0)
        done += block
        block *= 2
    importance = torch.softmax(scores.masked_fill(~visible[:, :, None], -math.inf), dim=-1)
    importance = importance.masked_fill(~visible[:, :, None], 0.0)  # padding targets see none
    count = stopped.sum(-1)  # [B, K]
    weights = torch.where(count[..., None] > 0, stopped.to(acc), torch.ones_like(scores[..., 0]))
    mean = (importance * weights[..., None]).sum(2) / weights.sum(2).clamp(min=1)[..., None]
    return mean, count


def _attributed_ids(problem: Problem) -> torch.Tensor:
    """The token ids of the attributed sides, concatenated ``[B, L]``."""
    t = problem.tensors
    if len(problem.inputs) == 1:
        return t.ids
    assert t.decoder_ids is not None
    return torch.cat([t.ids, t.decoder_ids], dim=1)


class _Draws:
    """Each example's own generator and its players (the tokens any of its targets sees)."""

    def __init__(self, visible: torch.Tensor, valid: torch.Tensor, probes: int, seed: int) -> None:
        self.shape = (*visible.shape[:2], probes, visible.shape[2])
        players = visible.any(dim=1).cpu()
        self.rows = [row.nonzero().squeeze(1) for row in valid.cpu()]
        self.columns = [row.nonzero().squeeze(1) for row in players]
        self.generators = [torch.Generator().manual_seed(seed) for _ in self.rows]

    def _draw(self, leading: tuple[int, ...]) -> torch.Tensor:
        out = torch.zeros((*leading, *self.shape), dtype=DRAWS)
        probes = self.shape[2]
        for b, generator in enumerate(self.generators):  # per example: independent of the batch
            rows, columns = self.rows[b], self.columns[b]
            shape = (*leading, rows.numel(), probes, columns.numel())
            draw = torch.rand(shape, generator=generator, dtype=DRAWS)
            out[..., b, rows[:, None, None], torch.arange(probes)[:, None], columns] = draw
        return out

    def initial(self) -> torch.Tensor:
        """``[B, K, P, L]``: the chains' first scores."""
        return self._draw(())

    def steps(self, n: int) -> torch.Tensor:
        """``[n, 3, B, K, P, L]``: the next ``n`` steps' draws."""
        return self._draw((n, 3))


class _Sampler:
    """Replacement ids: for a token of group ``g``, the ``floor(u * n_g)``-th id of ``g``."""

    def __init__(self, replacements: str | torch.Tensor, model: Model, sides: int) -> None:
        rows = min(model.embedding_rows(s) for s in ("source", "target")[:sides])
        if isinstance(replacements, str):  # "uniform": every ordinary id, one group
            size = min(rows, len(model.tokenizer))
            groups = torch.zeros(size, dtype=torch.long)
            special = [i for i in model.tokenizer.all_special_ids if 0 <= i < size]
            groups[special] = -1
        else:
            groups = replacements.detach().to("cpu", torch.long)
            if groups.numel() > rows:
                raise OptionError(
                    f"`replacements` gives groups to {groups.numel()} token ids, more than the "
                    f"{rows} rows of {model.name}'s embedding table"
                )
        drawn = groups >= 0
        if not bool(drawn.any()):
            raise OptionError(
                "`replacements` puts every token id in a negative group: none can be drawn"
            )
        # groups renumbered 0..G-1 as given; slot G, for tokens of no group, holds every drawn id
        _, slot = torch.unique(torch.where(drawn, groups, -1), return_inverse=True)
        slot = slot - int(not bool(drawn.all()))  # the negative group, if any, was slot 0
        n = int(slot.max()) + 1
        slot = torch.where(drawn, slot, n)
        size = groups.numel()
        grouped = torch.argsort(slot * size + torch.arange(size))[: int(drawn.sum())]
        everyone = drawn.nonzero().squeeze(1)  # slot n's ids, in increasing order
        order = torch.cat([grouped, everyone])
        count = torch.bincount(slot[drawn], minlength=n + 1)
        count[n] = everyone.numel()
        start = torch.cumsum(count, 0) - count
        device = model.device
        self.ids, self.count, self.start = order.to(device), count.to(device), start.to(device)
        self.slot = torch.cat([slot, torch.tensor([n])]).to(device)
        self.size = size

    def __call__(self, ids: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Replacements for ``ids`` ``[n, L]`` from draws ``u`` ``[S, n, L]``."""
        slot = self.slot[ids.clamp(max=self.size)]  # ids past V: every drawn id
        count, start = self.count[slot], self.start[slot]
        # a float32 draw is m / 2**24 exactly: floor(u * n) in integers, with no float64 (MPS)
        index = ((u * 2**24).long() * count) >> 24
        return self.ids[start + index]


class _Forward:
    """Sequences with replaced tokens through the model, each read at its own target."""

    sampler: _Sampler

    def __init__(
        self, problem: Problem, ids: torch.Tensor, batch_size: Size, top_k: int, wide: torch.dtype
    ) -> None:
        self.problem, self.ids, self.wide = problem, ids, wide
        self.batch_size, self.top_k = batch_size, top_k
        cost = problem.cost(saved=False)
        x = problem.inputs[0]
        rows, size = x.shape[0], x.element_size()
        vocabulary = problem.model.head_width
        # a sequence reads one target's row: the copy's head rows are its K targets'
        heads = head_bytes(rows, problem.tensors.valid.shape[1], vocabulary, size)
        body = -(-(cost.per_point - heads) // rows)
        # its row's logits, their float32 copy and the comparison with the target's
        self.per_row = body + head_bytes(1, 1, vocabulary, size) + 2 * vocabulary * 4
        self.fixed = cost.fixed
        self.block_bytes = 0
        self.widths = [x.shape[1] for x in problem.inputs]
        self.causal = problem.model.causal and len(problem.inputs) == 1
        self.index = problem.tensors.index

    def beside(self, block_bytes: int) -> int:
        """The bytes the forwards run beside: the call's, what it holds, a block's tensors."""
        return self.fixed + sum(self.problem.held) + block_bytes

    def smallest(self, block_bytes: int) -> int:
        """The bytes of one sequence's forward beside ``block_bytes`` of a block's tensors."""
        return self.beside(block_bytes) + self.per_row

    def check(self, step_bytes: int) -> None:
        """Refuse a ``max_memory`` that a one-step block of every chain and one sequence per
        forward cannot meet, naming the smallest that can."""
        budget = self.problem.max_memory
        if budget is not None and self.smallest(step_bytes) > budget:
            plan_forwards(
                1,
                "auto",
                self.per_row,
                self.problem.inputs[0].device,
                budget,
                self.beside(step_bytes),
            )

    def _run(
        self,
        b: torch.Tensor,
        k: torch.Tensor,
        where: torch.Tensor,
        u: torch.Tensor,
        read: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``read(logits, target_ids)`` ``[S, n]`` of the sequences of rows ``(b, k)`` with the
        tokens ``where`` ``[S, n, L]`` replaced by draws from ``u``, a chunk's logits at a time
        (a block's logits at once were 800 MiB on GPT-2's vocabulary)."""
        steps, n = where.shape[:2]
        source = self.ids[b]
        replaced = torch.where(where, self.sampler(source, u), source)
        # row-major: a chunk holds neighbouring targets, so a causal cut keeps it short
        replaced = replaced.transpose(0, 1).flatten(0, 1)
        example, slot = b.repeat_interleave(steps), k.repeat_interleave(steps)
        targets = self.problem.tensors.target_ids[example, slot]
        device = self.problem.inputs[0].device
        total = replaced.shape[0]
        step = plan_forwards(
            total,
            self.batch_size,
            self.per_row,
            device,
            self.problem.max_memory,
            self.beside(self.block_bytes),
        )
        model = self.problem.model
        out = []
        for start in range(0, total, step):  # chunking only: bounds memory
            between_passes()
            part = slice(start, start + step)
            sides = replaced[part].split(self.widths, dim=-1)
            if self.causal:  # the positions after a row's target change nothing it reads
                last = int(self.index[example[part], slot[part]].max()) + 1
                sides = (sides[0][:, : cut_length(last, sides[0].shape[1])],)
            names = ("source", "target")[: len(sides)]
            embeds = [model.embed(s, side) for s, side in zip(sides, names, strict=True)]
            h = self.problem.rows_fn(example[part], slot[part])
            with torch.no_grad():
                out.append(read(model.head(h(sides[0], *embeds))[:, 0], targets[part]))
        return torch.cat(out).view(n, steps).T

    def probability(
        self, b: torch.Tensor, k: torch.Tensor, where: torch.Tensor, u: torch.Tensor
    ) -> torch.Tensor:
        """The target's probability ``[S, n]`` with the tokens ``where`` replaced."""

        def read(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            # in float32 at least: a bfloat16 probability has 8 bits, and the drops are its
            # differences
            return self.problem.objective(logits.to(at_least_float32(logits.dtype)), targets)

        return self._run(b, k, where, u, read).to(self.wide)

    def in_top_k(
        self, b: torch.Tensor, k: torch.Tensor, where: torch.Tensor, u: torch.Tensor
    ) -> torch.Tensor:
        """Whether the target is among the ``top_k`` predictions ``[S, n]``, tokens replaced."""

        def read(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            own = logits.gather(-1, targets[:, None])
            return (logits > own).sum(-1) < self.top_k

        return self._run(b, k, where, u, read)


__all__ = ["reagent"]
