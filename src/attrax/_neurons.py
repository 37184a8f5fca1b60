"""Knowledge neurons (Dai et al. 2022): integrated gradients of each target's score over the MLP
neurons at the position that predicts it, each layer's neurons scaled together from zero.

For block ``l`` and target ``k`` read at position ``p`` (the position whose output predicts
``k``: ``t - 1`` for a language model's token ``t``, the mask of a masked LM, a classifier's
pooled position), ``a`` is the vector of MLP neurons there (the input of the MLP's output
projection) and ``F(z)`` the target's score with ``a`` replaced by ``z`` at that one position
and layer, everything before it as it was. Neuron ``i``'s score is
``a_i * integral_0^1 dF/dz_i (alpha * a) d alpha``; summed over the neurons it is ``F(a) -
F(0)`` (completeness along the scaling path).

How: every (layer, node, target) is a copy of the batch in one stacked forward, copy ``c``
scaling its own layer's neurons at its own target's position by its node ``alpha_c``; a zero
probe added there is the ``vjp`` primal, and one backward in which each copy carries its own
target's objective gives every copy's gradient (copies are independent rows). Dai et al. and
EleutherAI's ``knowledge-neurons`` run one batch of nodes per layer and per target.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import cast

import torch
import xarray as xr

from . import _validate as check
from ._attention import Selection, check_selection, selection_indices
from ._engine import Problem
from ._errors import InputError
from ._gradients import QUADRATURES, check_quadrature_steps, quadrature_nodes
from ._memory import at_least_float32, between_passes
from ._model import refuse_no_query_row
from ._protocol import COMMON, Call, Family
from ._schema import label_neurons
from ._sites import Stack, neuron_width, patch_stack, site_hook

METHOD = "knowledge_neurons"

NEURONS = Family(
    name="knowledge_neurons",
    differentiates=True,
    takes=tuple(name for name in COMMON if name != "attribute_target"),
    refuses={
        "attribute_target": "knowledge neurons are scored inside the model, at the position "
        "that predicts each target: there are no source positions to attribute",
    },
)


@NEURONS.method(
    check_quadrature_steps,
    layers=check_selection,
    steps=check.positive_int,
    quadrature=check.one_of(*QUADRATURES),
)
def knowledge_neurons(
    call: Call,
    *,
    layers: Selection = None,
    steps: int = 20,
    quadrature: str = "riemann_right",
) -> xr.DataArray:
    """Knowledge neurons (Dai et al. 2022): each MLP neuron's integrated gradient at the position
    that predicts the target, its layer's neurons scaled together from zero.

    For block ``l``, ``a`` is the MLP's neurons (the input of its output projection: the
    activation times the gate in a gated MLP) at the position whose output predicts the target
    (``t - 1`` for a language model's token ``t``, the mask of a masked language model, a
    classifier's pooled position, a token classifier's token). Neuron ``i`` scores ``a_i *
    integral_0^1 dF/dz_i(alpha * a) d alpha``, ``F`` the target's objective with ``a`` replaced
    there (only there); each layer's scores sum to ``F(a) - F(0)``, up to the quadrature error
    reported as ``completeness_gap``. Dai et al. then keep the neurons above 0.2 of a prompt's
    largest score, and those most prompts of a fact share.

    Arguments:
        layers: the blocks whose neurons to score (an int, a list, a range, a slice; default
            every block); an encoder-decoder's are its decoder's.
        steps: quadrature nodes from 0 to 1 (Dai et al.'s ``m`` = 20).
        quadrature: ``riemann_right`` (default: Dai et al.'s ``sum_{j=1}^{m} F'(j/m a) / m``),
            ``riemann_left|middle|trapezoid`` or ``gausslegendre``.
        batch_size: (layer, node) pairs per forward; chunk_size: targets per forward; each
            pair and target is a copy of the batch (``"auto"``: as many as fit ``max_memory``).

    Returns:
        DataArray ``([example,] target, layer, neuron)`` with a ``completeness_gap``
        coordinate ``([example,] target, layer)``: the layer's summed scores minus ``F(a) -
        F(0)``.

    >>> import attrax as ax
    >>> kn = ax.knowledge_neurons(ax.load_model(), "1 2 3 =", " 3 2 1", steps=8)
    >>> kn.dims
    ('target', 'layer', 'neuron')
    """
    model = call.model
    refuse_no_query_row(model, METHOD)
    parts = patch_stack(model, METHOD, None, "neurons")  # an encoder-decoder's: its decoder's
    chosen = selection_indices(layers, len(parts.blocks), "layers", "layers")
    width = neuron_width(parts, chosen, METHOD)
    problem = call.problem
    t = problem.tensors
    batch, targets = t.valid.shape
    x = problem.inputs[0]
    acc = at_least_float32(x.dtype)
    alphas, weights = quadrature_nodes(quadrature, steps)
    # point p is node p % steps of layer chosen[p // steps]
    points = len(chosen) * steps
    one = batch * targets * len(chosen) * width * torch.finfo(acc).bits // 8
    # the scores, their labelled copy, and a chunk's per-copy products as they are summed
    problem.hold(3 * one, "layers", layers, "every chosen layer's neuron scores")
    decoder = t.decoder_ids
    length = decoder.shape[1] if parts.on_decoder and decoder is not None else x.shape[1]
    # each chosen layer's hook makes a scaled copy of its neurons in every copy's forward
    extra = 2 * batch * length * width * len(chosen) * x.element_size()
    per_forward, chunk = problem.plan(
        points, call.options["batch_size"], call.options["chunk_size"], copies=True,
        per_point=extra,
    )  # fmt: skip
    per_forward = points if per_forward is None else per_forward
    chunk = targets if chunk is None else chunk
    scaling = _Scaling(problem, parts, chosen, width)
    layer_of = torch.arange(points, device=x.device) // steps
    node = torch.as_tensor(alphas, dtype=x.dtype, device=x.device).repeat(len(chosen))
    weight = torch.as_tensor(weights, dtype=acc, device=x.device).repeat(len(chosen))
    scores = x.new_zeros(batch, targets, len(chosen), width, dtype=acc)
    at_zero = x.new_zeros(batch, targets, len(chosen), dtype=acc)
    every = torch.arange(len(chosen), device=x.device)
    for first in range(0, targets, chunk):  # chunking only: bounds memory
        slots = slice(first, min(first + chunk, targets))
        for start in range(0, points, per_forward):  # chunking only: bounds memory
            between_passes()
            span = slice(start, min(start + per_forward, points))
            grads, acts = scaling.gradients(slots, layer_of[span], node[span])  # [k, n, B, W]
            products = grads.to(acc) * acts.to(acc)
            # each node's weight, summed into its layer
            into = torch.nn.functional.one_hot(layer_of[span], len(chosen)).to(acc)
            into = into * weight[span, None]
            scores[:, slots] += torch.einsum("knbw,nl->bklw", products, into)
        # F(0) per layer: each layer's neurons zeroed at the targets' positions, a copy each
        for start in range(0, len(chosen), per_forward):  # chunking only: bounds memory
            between_passes()
            some = every[start : start + per_forward]
            values = scaling.objective(slots, some, torch.zeros_like(some, dtype=x.dtype))
            at_zero[:, slots, start : start + len(some)] = values.to(acc).permute(2, 0, 1)
    at_input = problem.evaluate((x[None],))[0].to(acc)  # F(a): the unchanged forward [B, K]
    gap = scores.sum(-1) - (at_input[..., None] - at_zero)
    valid = t.valid[..., None]
    if not bool(torch.isfinite(scores).all(-1).logical_or(~valid).all()):
        raise InputError(
            f"{METHOD}: the scores are not finite (inf/NaN): the model's outputs overflowed or "
            "hold NaN; check the model's weights and dtype, and the inputs"
        )
    return label_neurons(
        model, call.batch, scores, gap, chosen, call.options, METHOD, call.objective[0]
    )


class _Scaling:
    """The stacked forwards of :func:`knowledge_neurons`: copy ``(j, i, b)`` is example ``b``
    with layer ``layer[i]``'s neurons at target ``slots[j]``'s position scaled by
    ``alpha[i]``, scored on that target alone."""

    def __init__(self, problem: Problem, parts: Stack, chosen: list[int], width: int) -> None:
        self.problem = problem
        self.modules = [parts.module("neurons", layer) for layer in chosen]
        self.width = width

    def _copies(
        self, slots: slice, layer: torch.Tensor, alpha: torch.Tensor
    ) -> tuple[Callable[..., torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The forward to the copies' head inputs, each copy's layer, node and position, and
        the copies' embeddings (cut after the last position a causal target reads)."""
        problem, t = self.problem, self.problem.tensors
        k, n = t.valid[:, slots].shape[1], layer.shape[0]
        hidden = problem.hidden_fn(n, slots, own=True)

        def per_copy(values: torch.Tensor) -> torch.Tensor:  # [n] -> [k * n * B], (j, i, b)
            return values[None, :, None].expand(k, -1, t.ids.shape[0]).reshape(-1)

        position = problem.own(t.index, slots, n)[:, 0]
        length = problem.inputs[0].shape[1]
        if self.problem.model.task == "generation" and not self.problem.model.is_encoder_decoder:
            # causal: a target's score reads nothing after its own position
            length = int(t.index[:, slots].max()) + 1
        embeds = problem.inputs[0][:, :length].repeat(k * n, 1, 1)
        return hidden, per_copy(layer), per_copy(alpha), position, embeds

    @contextmanager
    def _hooked(
        self,
        layer: torch.Tensor,
        alpha: torch.Tensor,
        position: torch.Tensor,
        probe: torch.Tensor | None,
        seen: list[torch.Tensor | None],
    ) -> Iterator[None]:
        """Each chosen layer's neurons, at each copy of that layer, scaled by its node at its
        position (plus ``probe``); ``seen[0]`` gets each copy's unscaled neurons there."""
        copies = layer.shape[0]
        rows = torch.arange(copies, device=layer.device)

        def hook_for(q: int) -> Callable[[torch.Tensor], torch.Tensor]:
            def change(value: torch.Tensor) -> torch.Tensor:
                flat = value.dim() == 2  # OPT's fc2: [B * L, W] as [B, L, W]
                full = value.view(copies, -1, value.shape[-1]) if flat else value
                here = layer == q
                at = torch.nn.functional.one_hot(position, full.shape[1]).bool() & here[:, None]
                clean = full[rows, position]  # [copies, W]
                seen[0] = clean.detach() if seen[0] is None else torch.where(
                    here[:, None], clean.detach(), seen[0]
                )  # fmt: skip
                scaled = full * alpha.to(full.dtype)[:, None, None]
                if probe is not None:
                    scaled = scaled + probe[:, None, :]
                out = torch.where(at[..., None], scaled, full)
                return out.reshape(value.shape) if flat else out

            return change

        handles = [
            site_hook(module, "neurons", hook_for(q)) for q, module in enumerate(self.modules)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def gradients(
        self, slots: slice, layer: torch.Tensor, alpha: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``dF/dz`` at ``alpha * a`` and ``a`` itself, each ``[k, n, B, W]``: target
        ``slots[j]``'s, at node ``i`` of layer ``layer[i]``."""
        problem, t = self.problem, self.problem.tensors
        hidden, layers, alphas, position, embeds = self._copies(slots, layer, alpha)
        x = problem.inputs[0]
        k, n = t.valid[:, slots].shape[1], layer.shape[0]
        valid = t.valid[:, slots].T[:, None].expand(k, n, -1).reshape(-1, 1).to(x.dtype)

        def score(probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            seen: list[torch.Tensor | None] = [None]
            with self._hooked(layers, alphas, position, probe, seen):
                value = problem.head_objective(hidden(embeds), slots, own=True)
            assert seen[0] is not None  # the hooks ran
            return value, seen[0]  # the neurons as aux: a tensor must not escape vjp otherwise

        probe = x.new_zeros(layers.shape[0], self.width)
        _, pullback, acts = cast(
            "tuple[torch.Tensor, Callable[..., tuple[torch.Tensor]], torch.Tensor]",
            torch.func.vjp(score, probe, has_aux=True),
        )
        (grad,) = pullback(valid)
        return grad.view(k, n, -1, self.width), acts.view(k, n, -1, self.width)

    @torch.no_grad()
    def objective(self, slots: slice, layer: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """``F(alpha * a)`` ``[k, n, B]``: each target's objective with layer ``layer[i]``'s
        neurons scaled by ``alpha[i]`` at its position."""
        problem, t = self.problem, self.problem.tensors
        hidden, layers, alphas, position, embeds = self._copies(slots, layer, alpha)
        seen: list[torch.Tensor | None] = [None]
        with self._hooked(layers, alphas, position, None, seen):
            values = problem.head_objective(hidden(embeds), slots, own=True)
        k, n = t.valid[:, slots].shape[1], layer.shape[0]
        return values.view(k, n, -1)


__all__ = ["knowledge_neurons"]
