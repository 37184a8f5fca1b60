"""Discretized integrated gradients (Sanyal & Ren 2021): paths through the vocabulary's embeddings.

Each token walks from its baseline token's embedding to its own through *anchor* words: starting
from the token, the next anchor is, among the current word's nearest neighbours in the embedding
table, the one closest to its monotonic projection (every dimension between the baseline and
the current point). The path's points are those projections, in reverse. All tokens walk their
paths together, so a path of ``steps`` points is ``steps`` stacked copies of the embeddings: a
gradient method whose weights are the path's increments, run on the engine like IG.

The nearest-neighbour table (``neighbours`` per vocabulary entry) is computed once per model and
side and kept for the model's lifetime, or until the embedding table is edited (trained).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from . import _validate as check
from ._engine import Problem
from ._errors import OptionError
from ._gradients import GRADIENT, Rule, refuse_layers

BASELINE_TOKENS = ("pad", "unk")
# model.hf -> {(side, k): (the table's stamp, [V, k] neighbour ids)}; dropped with the model
_NEIGHBOURS: weakref.WeakKeyDictionary[Any, dict[tuple[str, int], tuple[Any, torch.Tensor]]] = (
    weakref.WeakKeyDictionary()
)


DEFAULT_NEIGHBOURS = 50  # Inseq's n_neighbors


def nearest_neighbours(table: torch.Tensor, k: int, rows: int = 1024) -> torch.Tensor:
    """``[V, k]``: each row's ``k`` nearest other rows of ``table`` (Euclidean), nearest first.

    Candidates come from float32 distances ``rows`` rows at a time; their order is settled in
    float64 so that the ``k``-th neighbour is the one an exact search finds.

    >>> table = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    >>> nearest_neighbours(table, 2).tolist()
    [[1, 2], [0, 2], [1, 0], [2, 1]]
    """
    vocabulary = table.shape[0]
    if not 0 < k < vocabulary:
        raise OptionError(
            f"`neighbours` must be in [1, {vocabulary - 1}] (the vocabulary), got {k}"
        )
    table32 = table.float()
    table64 = table.double()
    norms = (table32 * table32).sum(-1)
    extra = min(vocabulary, k + 1 + 8)  # margin for float32 rounding near the k-th distance
    out = []
    for start in range(0, vocabulary, rows):  # chunking only: bounds memory
        block = table32[start : start + rows]
        squared = norms[start : start + rows, None] + norms[None] - 2 * block @ table32.T
        candidates = squared.topk(extra, dim=-1, largest=False).indices
        exact = (table64[candidates] - table64[start : start + rows, None]).pow(2).sum(-1)
        own = candidates == torch.arange(start, start + block.shape[0])[:, None]
        exact = exact.masked_fill(own, torch.inf)
        order = exact.argsort(dim=-1, stable=True)[:, :k]
        out.append(candidates.gather(-1, order))
    return torch.cat(out)


def _neighbours(problem: Problem, side: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding table of ``side`` ``[V, H]`` and its cached neighbour ids ``[V, k]``."""
    model = problem.model
    vocabulary = model.hf.get_input_embeddings().weight.shape[0]  # classifiers have no LM head
    ids = torch.arange(vocabulary, device=model.device)[None]
    with torch.no_grad():
        table = model.embed(ids, side)[0].detach()
    # which tensors the table holds, and their in-place edits (an optimizer step, a load)
    module = model.embedding_module(side)
    stamp = tuple((id(p), p.data_ptr(), p._version) for p in module.parameters())
    cache = _NEIGHBOURS.setdefault(model.hf, {})
    if (side, k) not in cache or cache[(side, k)][0] != stamp:
        cache[(side, k)] = (stamp, nearest_neighbours(table.cpu(), k).to(table.device))
    return table, cache[(side, k)][1]


def _monotonic(anchor: torch.Tensor, base: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """Where ``anchor`` lies between ``point`` and ``base``, dimension by dimension."""
    return (
        ((base > point) & (base >= anchor) & (anchor >= point))
        | ((base < point) & (base <= anchor) & (anchor <= point))
        | ((base == point) & (base == anchor))
    )


def _project(anchor: torch.Tensor, base: torch.Tensor, point: torch.Tensor, steps: int):
    """The anchor, with its non-monotonic dimensions moved ``1/steps`` from ``point`` to ``base``."""
    return torch.where(_monotonic(anchor, base, point), anchor, point - (point - base) / steps)


def word_paths(
    table: torch.Tensor,
    neighbours: torch.Tensor,
    words: torch.Tensor,
    bases: torch.Tensor,
    fixed: torch.Tensor,
    steps: int,
) -> torch.Tensor:
    """``[steps, T, H]``: the monotonic path of every token ``T`` from its baseline to itself.

    ``words``/``bases`` ``[T]`` ids; ``fixed`` ``[T]`` marks tokens whose anchors stay the word
    (special tokens). Every token's greedy search runs at once; the loop is over path steps.
    """
    base = table[bases]
    visited = [words]
    current = words
    for _ in range(steps - 2):  # each anchor depends on the last
        candidates = neighbours[current]  # [T, k]
        anchors = table[candidates]
        point = table[current][:, None]
        distance = (anchors - _project(anchors, base[:, None], point, steps)).pow(2).sum(-1).sqrt()
        seen = torch.stack(visited, dim=-1)  # [T, s]
        excluded = (candidates[..., None] == seen[:, None, :]).any(-1)
        excluded |= candidates == bases[:, None]
        distance = distance.masked_fill(excluded, torch.inf)
        best = candidates.gather(-1, distance.argmin(-1, keepdim=True))[:, 0]
        done = excluded.all(-1) | (current == bases)
        nxt = torch.where(done, bases, best)
        nxt = torch.where(fixed, words, nxt)
        visited.append(nxt)
        current = nxt
    points = [table[words]]
    for anchor in visited[1:]:  # each projection starts from the last
        points.append(_project(table[anchor], base, points[-1], steps))
    points.append(base)
    return torch.stack(points[::-1])


def _baseline_ids(problem: Problem, ids: torch.Tensor, baseline: str) -> torch.Tensor:
    model = problem.model
    token = model.pad_token_id if baseline == "pad" else model.tokenizer.unk_token_id
    if token is None:
        raise OptionError(f"`baseline={baseline!r}`: the tokenizer has no {baseline} token")
    bases = torch.full_like(ids, token)
    if model.eos_token_id is not None:  # EOS stays EOS, as Inseq's baselines
        bases = torch.where(ids == model.eos_token_id, ids, bases)
    return bases


@GRADIENT.method(
    refuse_layers(
        "discretized_integrated_gradients",
        "its paths run through the vocabulary's embeddings, which no layer has",
    ),
    steps=check.at_least(2),
    neighbours=check.optional(check.positive_int),
    baseline=check.one_of(*BASELINE_TOKENS),
)
def discretized_integrated_gradients(
    problem: Problem, *, steps: int = 50, neighbours: int | None = None, baseline: str = "pad"
) -> Rule:
    """Discretized integrated gradients (Sanyal & Ren 2021; Inseq's DIG, greedy strategy).

    ``sum_j grad f(p_j) * (p_{j+1} - p_j)`` along each token's monotonic path ``p_0 = x'`` ...
    ``p_{steps-1} = x`` through anchor words of the vocabulary (module docstring). Attributions
    add up to ``f(x) - f(x')`` up to the path's discretisation (``completeness_gap``).

    Cost: the neighbour table once per model (``V^2 H`` flops, chunked), then ``steps`` points as
    for integrated gradients.

    Arguments (others as :func:`saliency`):
        steps: points on each path (at least 2).
        neighbours: nearest neighbours searched at each step; None: Inseq's 50, or one fewer
            than the vocabulary where it is smaller.
        baseline: ``"pad"`` (default) or ``"unk"``: the baseline token of every position (EOS
            tokens keep EOS); the tokenizer's special tokens do not take anchors.

    Returns:
        DataArray ``([example,] target, source, hidden)`` (``([example,] target, source)`` with
        ``reduce_hidden``) with a ``completeness_gap`` coordinate along ``([example,] target)``:
        the sum of attributions minus ``f(x) - f(x')``. ``layers`` is refused.

    >>> import attrax as ax
    >>> da = ax.discretized_integrated_gradients(ax.load_model(), "1 2 =", " 2 1", steps=6,
    ...                                          neighbours=4)
    >>> "completeness_gap" in da.coords
    True
    """
    t = problem.tensors
    special = torch.tensor(sorted(problem.model.tokenizer.all_special_ids), dtype=torch.long)
    sides = [("source", t.ids)]
    if len(problem.inputs) > 1:  # the decoder's side attributed too: a translator has it
        assert t.decoder_ids is not None
        sides.append(("target", t.decoder_ids))
    # each token's path ([steps, B, L, H] per side, built as a list, then stacked) and its
    # increments, held through the call: counted before any is built
    floats = steps * sum(x.numel() for x in problem.inputs)
    problem.hold(3 * floats * max(problem.inputs[0].element_size(), 4), "steps", steps,
                 "each token's path and its increments")  # fmt: skip
    problem.plan(steps, "auto", "auto")  # a max_memory they leave no pass is refused here
    paths = []
    if neighbours is None:
        vocabulary = problem.model.hf.get_input_embeddings().weight.shape[0]
        neighbours = min(DEFAULT_NEIGHBOURS, vocabulary - 1)
    for (side, ids), x in zip(sides, problem.inputs, strict=True):
        table, near = _neighbours(problem, side, neighbours)
        flat = ids.reshape(-1).to(table.device)
        bases = _baseline_ids(problem, flat, baseline)
        fixed = torch.isin(flat, special.to(flat.device))
        path = word_paths(table, near, flat, bases, fixed, steps)
        paths.append(path.view(steps, *x.shape).to(x.dtype))
    increments = tuple(
        torch.cat([p[1:] - p[:-1], torch.zeros_like(p[:1])]) for p in paths
    )  # the last point's gradient has nothing to move

    def points(chunk: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(p[chunk.to(p.device)] for p in paths)

    def moves(chunk: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(d[chunk.to(d.device)] for d in increments)

    # each point's increment as its multiplier (weight 1): a direction, so forward mode runs too
    weights = torch.ones(steps, dtype=torch.float64)
    return Rule(points, weights, multiplier=moves, reference=tuple(p[0] for p in paths))


__all__ = ["discretized_integrated_gradients", "nearest_neighbours", "word_paths"]
