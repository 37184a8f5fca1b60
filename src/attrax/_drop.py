"""GradDrop (Kramár et al. 2024): gradients with one layer's residual contribution dropped from
the backward pass, every layer at once.

A layer ``l`` writes ``out = x + b(x)`` to the residual stream; dropping it keeps the forward and
sends the gradient at ``out`` to ``x`` alone (the skip path), so nothing reaches ``b`` or, through
``b``, anything before it. :func:`dropping` routes each block's output through :class:`_Route`,
whose backward splits the incoming gradient per ``vmap``-ed row (:class:`_Split`): a row that drops
this layer sends it down the skip path, every other row down the block. :func:`pulled` runs one
backward for every (dropped layer, target) pair, ``L`` rows per target, ``vmap``-ed together.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._errors import ModelError


@dataclass
class Drop:
    """The blocks whose contributions are dropped, one per row, in the model's order; ``layers``
    names the layer each row of the coming backward drops (set by :func:`pulled`)."""

    blocks: Sequence[torch.nn.Module]
    layers: Tensor | None = None


class _Route(torch.autograd.Function):
    """A block's output as is; its backward is :class:`_Split`'s, per row."""

    @staticmethod
    def forward(out: Tensor, x: Tensor, drop: Drop, layer: int) -> Tensor:
        return out.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.drop, ctx.layer = inputs[2], inputs[3]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        block, skip = _Split.apply(grad, ctx.drop.layers, ctx.layer)
        return block, skip, None, None


class _Split(torch.autograd.Function):
    """``(to the block, to the skip path)``: outside ``vmap`` nothing is dropped; under it, the
    rows whose ``layers`` entry is ``layer`` go to the skip path."""

    @staticmethod
    def forward(grad: Tensor, layers: Tensor | None, layer: int) -> tuple[Tensor, Tensor]:
        return grad.clone(), torch.zeros_like(grad)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass  # no double backward: attrax differentiates once

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], *args: Any) -> tuple[Any, Any]:
        grad, layers, layer = args
        dim = in_dims[0]
        if layers is None or layers.shape[0] != info.batch_size:
            raise ModelError(
                "GradDrop: the backward's rows do not match the layers they drop (a model that "
                "runs its blocks more than once or its own vmap)"
            )
        if dim is None:  # the same gradient on every row
            grad, dim = grad.expand(info.batch_size, *grad.shape), 0
        shape = [1] * grad.ndim
        shape[dim] = info.batch_size
        dropped = (layers == layer).view(shape).to(grad.dtype)
        return (grad * (1 - dropped), grad * dropped), (dim, dim)


@contextlib.contextmanager
def dropping(drop: Drop | None) -> Iterator[None]:
    """Forwards inside route every block of ``drop`` through :class:`_Route` (``None``:
    nothing)."""
    if drop is None:
        yield
        return
    handles = []
    for layer, block in enumerate(drop.blocks):

        def hook(
            _m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any,
            layer: int = layer,
        ) -> Any:  # fmt: skip
            x = args[0] if args else kwargs.get("hidden_states")
            out = output[0] if isinstance(output, tuple) else output
            if not isinstance(x, Tensor) or not isinstance(out, Tensor) or x.shape != out.shape:
                raise ModelError(
                    f"GradDrop: {type(_m).__name__} does not map the residual stream to itself"
                )
            routed = _Route.apply(out, x, drop, layer)
            return (routed, *output[1:]) if isinstance(output, tuple) else routed

        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def pulled(
    pullback: Callable[..., tuple[Tensor, ...]],
    cotangent: Callable[[slice], Tensor],
    targets: int,
    chunk: int | None,
    drop: Drop | None,
) -> Iterator[tuple[slice, tuple[Tensor, ...]]]:
    """``pullback`` ``vmap``-ed over the targets' cotangents (``cotangent(slots)``, ``[k, ...]``),
    ``chunk`` targets a backward (None: all): ``(slots, grads)`` with grads ``[k, ...]``; with
    ``drop``, one row per (dropped layer, target): ``[L, k, ...]``."""
    step = targets if chunk is None else chunk
    for start in range(0, targets, step):  # chunking only: bounds memory
        slots = slice(start, min(start + step, targets))
        rows = cotangent(slots)
        if drop is not None:
            n, count = rows.shape[0], len(drop.blocks)
            drop.layers = torch.arange(count, device=rows.device).repeat_interleave(n)
            rows = rows.repeat(count, *[1] * (rows.ndim - 1))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
            grads = torch.vmap(pullback)(rows)
        if drop is not None:
            grads = tuple(g.unflatten(0, (len(drop.blocks), -1)) for g in grads)
            drop.layers = None
        yield slots, grads


def averaged(effects: Tensor, drop: Drop | None) -> Tensor:
    """GradDrop's estimate from ``[L, ...]`` per-dropped-layer estimates: ``sum_l |e_l| / (L -
    1)`` (a node's own layer contributes nothing: its gradient is dropped there); without
    ``drop``, ``effects`` as they are."""
    if drop is None:
        return effects
    return effects.abs().sum(0) / (len(drop.blocks) - 1)
