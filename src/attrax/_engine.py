"""The vectorized gradient engine shared by every gradient method.

One teacher-forced forward over a batch of *points* (the embeddings themselves, interpolation
points, noisy copies), then the gradients of every attributed target's score through
``torch.func.vjp`` with ``vmap`` over one-hot cotangents. Methods differ only in the points, their
weights and what multiplies the weighted gradient sum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import vjp

from ._errors import OptionError
from ._inputs import Batch, Tensors, to_tensors
from ._model import Model
from ._objectives import Objective, scores

# points[i] for i in a chunk of indices -> one tensor [n, B, L, H] per attributed side
PointFn = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class Problem:
    """Everything fixed during one attribution call: model, tensors, objective, what is attributed.

    ``inputs`` are the attributed embeddings, one tensor ``[B, L, H]`` per side: the decoder-only
    sequence, or the encoder input (plus the decoder input when ``attribute_target``).
    """

    model: Model
    batch: Batch
    tensors: Tensors
    objective: Objective
    inputs: tuple[torch.Tensor, ...]
    decoder_embeds: torch.Tensor | None

    @classmethod
    def build(
        cls, model: Model, batch: Batch, objective: Objective, attribute_target: bool
    ) -> Problem:
        tensors = to_tensors(batch, model)
        with torch.no_grad():
            inputs = (model.embed(tensors.ids, "source"),)
            decoder_embeds = None
            if model.is_encoder_decoder:
                decoder_embeds = model.embed(tensors.decoder_ids, "target")
                if attribute_target:
                    inputs = (*inputs, decoder_embeds)
                    decoder_embeds = None
        return cls(model, batch, tensors, objective, inputs, decoder_embeds)

    def hidden_fn(self, n: int) -> Callable[..., torch.Tensor]:
        """``h(*embeds)``: head inputs ``[n * B, K, H]`` at the attributed positions, ``n`` copies."""
        t = self.tensors
        mask, index = t.mask.repeat(n, 1), t.index.repeat(n, 1)
        decoder_mask = None if t.decoder_mask is None else t.decoder_mask.repeat(n, 1)
        fixed_decoder = None
        if self.decoder_embeds is not None:
            fixed_decoder = self.decoder_embeds.repeat(n, 1, 1)

        def h(*embeds: torch.Tensor) -> torch.Tensor:
            decoder = embeds[1] if len(embeds) > 1 else fixed_decoder
            return self.model.hidden_at(embeds[0], mask, index, decoder, decoder_mask)

        return h

    def head_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Objective scores ``[n * B, K]`` from head inputs ``[n * B, K, H]``."""
        t = self.tensors
        n = hidden.shape[0] // t.target_ids.shape[0]
        contrast = None if t.contrast_ids is None else t.contrast_ids.repeat(n, 1)
        logits = self.model.head(hidden)
        return scores(self.objective, logits, t.target_ids.repeat(n, 1), contrast)

    def score_fn(self, n: int) -> Callable[..., torch.Tensor]:
        """``f(*embeds)`` for ``n`` stacked copies of the batch: scores ``[n * B, K]``."""
        hidden = self.hidden_fn(n)
        return lambda *embeds: self.head_scores(hidden(*embeds))

    @torch.no_grad()
    def evaluate(self, points: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Scores ``[n, B, K]`` of the targets at ``n`` stacked points (no gradients)."""
        n = points[0].shape[0]
        values = self.score_fn(n)(*(p.flatten(0, 1) for p in points))
        return values.unflatten(0, (n, -1))

    def gradient_sum(
        self,
        points: PointFn,
        weights: torch.Tensor,
        *,
        batch_size: int | None,
        chunk_size: int | None,
    ) -> tuple[torch.Tensor, ...]:
        """``sum_i weights[i] * d score_k / d points[i]`` per side, as ``[B, K, L, H]``.

        Points go through the model ``batch_size`` at a time (all at once when None); the targets'
        cotangents through ``vmap`` ``chunk_size`` at a time.
        """
        total = weights.shape[0]
        step = total if batch_size is None else batch_size
        t = self.tensors
        n_targets = t.valid.shape[1]
        valid = t.valid.to(self.inputs[0].dtype)
        sums: list[torch.Tensor] | None = None
        for start in range(0, total, step):  # chunking only: bounds memory
            chunk = torch.arange(start, min(start + step, total))
            stacked = points(chunk)
            n = stacked[0].shape[0]
            flat = tuple(p.flatten(0, 1) for p in stacked)
            hidden, pullback = vjp(self.hidden_fn(n), *flat)
            # score k depends on head input k only, so one backward through the head gives
            # every d score_k / d h_k; the vocabulary never enters the per-target backward
            _, head_pullback = vjp(self.head_scores, hidden)
            (head_grad,) = head_pullback(valid.repeat(n, 1))
            # cotangent k carries d score_k / d h_k at slot k of every example and copy
            one_hot = torch.eye(n_targets, dtype=hidden.dtype, device=hidden.device)
            cotangents = one_hot[:, None, :, None] * head_grad[None]
            grads = torch.vmap(pullback, chunk_size=chunk_size)(cotangents)
            w = weights[chunk].to(hidden.dtype)
            chunk_sums = [torch.einsum("knblh,n->bklh", g.unflatten(1, (n, -1)), w) for g in grads]
            if sums is None:
                sums = chunk_sums
            else:
                sums = [a + b for a, b in zip(sums, chunk_sums, strict=True)]
        assert sums is not None
        return tuple(sums)


def check_positive_int(value: object, name: str, allow_none: bool = False) -> None:
    """Raise an :class:`OptionError` unless ``value`` is a positive int (or None if allowed)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        extra = " or None" if allow_none else ""
        raise OptionError(f"`{name}` must be a positive integer{extra}, got {value!r}")
