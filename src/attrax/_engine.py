"""The vectorized engine: one call's tensors (:class:`Problem`) and its forwards and backwards.

Gradients: one teacher-forced forward over a batch of *points* (the embeddings themselves,
interpolation points, noisy copies), then the gradients of every attributed target's objective
through ``torch.func.vjp`` with ``vmap`` over one-hot cotangents. Perturbations: batched forwards
over masked copies of the embeddings, every target scored at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch.func import jvp

from . import _arch
from ._errors import OptionError
from ._inputs import Batch, Tensors, to_tensors
from ._memory import (
    CALL_OVERHEAD,
    JVP_STREAMS,
    Cost,
    Size,
    at_least_float32,
    backward_bytes,
    between_passes,
    format_bytes,
    forward_bytes,
    head_bytes,
    memory_budget,
    plan,
    plan_forwards,
    reuse_host_memory,
)
from ._model import Model, head_rows_only, one_backward, reading
from ._objectives import Objective, evaluate_objective, logit

#: random draws (noise, random starts) are made in this dtype, then cast to the model's: one
#: seed draws the same whatever the model's dtype (a float64 model drew another stream)
DRAWS = torch.float32
# points[i] for i in a chunk of indices -> one tensor [n, B, L, H] per attributed side
PointFn = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
Baseline = str | torch.Tensor | tuple[torch.Tensor, ...]
# A cotangent's backward with frozen weights costs about one forward (one product per weight
# product; on an H200, 2,048 tokens and 128 targets of a Llama-3-8B shape: 2 forwards and 128
# backwards took 12.3 s, ~320 TFLOP/s counting each as a forward): the planner's work per backward
BACKWARD_WORK = 1.0
# A decoder-only chunk's sequence is cut after its last target at a multiple of 1/CUT_SHAPES of
# the sequence (the positions kept after it change none of its targets): a call's chunks take at
# most this many lengths, where a cut per target gave oneDNN's bfloat16 kernels on the CPU a
# primitive, and memory, per pass that it kept (a first bfloat16 call took 341 MiB under a 172 MiB
# budget, 97 MiB now); a chunk runs at most 1/16 of the sequence more
CUT_SHAPES = 16


def vjp(
    func: Callable[..., Any], *primals: torch.Tensor
) -> tuple[Any, Callable[..., tuple[torch.Tensor, ...]]]:
    """``torch.func.vjp`` without ``has_aux``: ``func``'s output and its pullback, typed as the
    pair (torch types its return as that pair or the ``has_aux`` triple)."""
    return cast(
        "tuple[Any, Callable[..., tuple[torch.Tensor, ...]]]", torch.func.vjp(func, *primals)
    )


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
    # bytes the planner may use (None: half the device's free memory)
    max_memory: int | None = None
    # bytes a method keeps through the call besides the passes (its draws): see hold
    held: list[int] = field(default_factory=list, compare=False)

    @classmethod
    def build(
        cls,
        model: Model,
        batch: Batch,
        objective: Objective,
        attribute_target: bool,
        max_memory: int | None = None,
    ) -> Problem:
        tensors = to_tensors(batch, model)
        with torch.no_grad():
            inputs: tuple[torch.Tensor, ...] = (model.embed(tensors.ids, "source"),)
            decoder_embeds = None
            if tensors.decoder_ids is not None:  # a translator's; a classifier has none
                decoder_embeds = model.embed(tensors.decoder_ids, "target")
                if attribute_target:
                    inputs = (*inputs, decoder_embeds)
                    decoder_embeds = None
        return cls(model, batch, tensors, objective, inputs, decoder_embeds, max_memory)

    def hold(self, nbytes: int, option: str, value: object, what: str) -> None:
        """Count ``nbytes`` that a method keeps through the whole call (``what``: its random
        draws, its masks), made by its ``option`` of ``value``, in every pass's estimate. Without
        a ``max_memory`` (whose refusal names the smallest budget, these bytes included), first
        check that they fit the device's free memory."""
        if self.max_memory is None:
            device = self.inputs[0].device
            free = 2 * memory_budget(device)
            rest = self.cost().fixed + sum(self.held)  # the results, and what is held already
            if rest + nbytes > free:
                raise OptionError(
                    f"`{option}`={value!r} needs {format_bytes(nbytes, up=True)} for {what}, "
                    f"held through the call: with its results ({format_bytes(rest, up=True)}) "
                    f"more than the {format_bytes(free)} free on {device.type}; give fewer {option}"
                )
        self.held.append(nbytes)

    def hidden_fn(
        self, n: int, slots: slice = slice(None), forward_mode: bool = False, own: bool = False
    ) -> Callable[..., torch.Tensor]:
        """``h(*embeds)``: head inputs ``[n * B, k, H]`` at the attributed positions ``slots``.

        ``n`` stacked copies of the batch. A decoder-only sequence may be passed cut short: only
        positions up to the last attributed one matter (causal attention). ``forward_mode`` when
        ``h`` is differentiated with ``jvp``. With ``own``, ``n`` copies per target of ``slots``
        (``k * n`` copies, target-major), each at its own target's position only:
        ``[k * n * B, 1, H]`` (methods that move each target along points of its own).
        """
        t = self.tensors
        copies = n * t.valid[:, slots].shape[1] if own else n
        index = self.own(t.index, slots, n) if own else t.index[:, slots].repeat(n, 1)
        mask = t.mask.repeat(copies, 1)
        decoder_mask = None if t.decoder_mask is None else t.decoder_mask.repeat(copies, 1)
        token_types = None if t.token_types is None else t.token_types.repeat(copies, 1)
        fixed_decoder = None
        if self.decoder_embeds is not None:
            fixed_decoder = self.decoder_embeds.repeat(copies, 1, 1)

        def h(*embeds: torch.Tensor) -> torch.Tensor:
            decoder = embeds[1] if len(embeds) > 1 else fixed_decoder
            length = embeds[0].shape[1]
            types = None if token_types is None else token_types[:, :length]
            with reading(t.ids):
                return self.model.hidden_at(
                    embeds[0],
                    mask[:, :length],
                    index,
                    decoder,
                    decoder_mask,
                    forward_mode=forward_mode,
                    token_types=types,
                )

        return h

    def head_objective(
        self, hidden: torch.Tensor, slots: slice = slice(None), own: bool = False
    ) -> torch.Tensor:
        """The objective ``[n * B, k]`` from head inputs ``[n * B, k, H]`` at ``slots``; with
        ``own``, ``[k * n * B, 1]`` from ``hidden_fn(n, slots, own=True)``'s, each copy's own
        target alone (its head row only: every target's row in every copy cost k times more)."""
        t = self.tensors
        contrast = t.contrast_ids
        if own:
            n = hidden.shape[0] // t.target_ids[:, slots].numel()
            target_ids = self.own(t.target_ids, slots, n)
            contrast = None if contrast is None else self.own(contrast, slots, n)
        else:
            n = hidden.shape[0] // t.target_ids.shape[0]
            target_ids = t.target_ids[:, slots].repeat(n, 1)
            contrast = None if contrast is None else contrast[:, slots].repeat(n, 1)
        if self.objective is logit:
            # the logits need only their own rows of the projection, not the vocabulary
            value = self.model.head_rows(hidden, target_ids)
            if value is not None and contrast is not None:
                other = self.model.head_rows(hidden, contrast)
                value = None if other is None else value - other
            if value is not None:
                return value
        return evaluate_objective(self.objective, self.model.head(hidden), target_ids, contrast)

    def rows_fn(self, example: torch.Tensor, slot: torch.Tensor) -> Callable[..., torch.Tensor]:
        """``h(ids, *embeds)``: head inputs ``[m, 1, H]`` of ``m`` sequences, sequence ``i`` a copy
        of example ``example[i]`` (its masks, token types and fixed decoder input) read at target
        ``slot[i]``'s position only: for methods whose copies each serve one target and hold
        token ids of their own (``ids`` ``[m, L]``, the source ids the embeddings stand for). A
        decoder-only model's sequences may be passed cut after their last target's position."""
        t = self.tensors
        index = t.index[example, slot][:, None]
        mask = t.mask[example]
        decoder_mask = None if t.decoder_mask is None else t.decoder_mask[example]
        token_types = None if t.token_types is None else t.token_types[example]
        fixed = None if self.decoder_embeds is None else self.decoder_embeds[example]

        def h(ids: torch.Tensor, *embeds: torch.Tensor) -> torch.Tensor:
            decoder = embeds[1] if len(embeds) > 1 else fixed
            length = embeds[0].shape[1]  # a decoder-only sequence may be cut after its target
            types = None if token_types is None else token_types[:, :length]
            with reading(ids):
                return self.model.hidden_at(
                    embeds[0], mask[:, :length], index, decoder, decoder_mask, token_types=types
                )

        return h

    @staticmethod
    def own(a: torch.Tensor, slots: slice, n: int) -> torch.Tensor:
        """``a[B, K]`` at ``slots`` as ``[k * n * B, 1]``: copy ``(j, i, b)`` holds ``a[b, slots][j]``."""
        own = a[:, slots].T  # [k, B]
        return own[:, None].expand(-1, n, -1).reshape(-1, 1)

    def objective_fn(self, n: int) -> Callable[..., torch.Tensor]:
        """``f(*embeds)`` for ``n`` stacked copies of the batch: the objective ``[n * B, K]``."""
        hidden = self.hidden_fn(n)
        return lambda *embeds: self.head_objective(hidden(*embeds))

    def side_mask(self, side: int) -> torch.Tensor:
        """``[B, L]`` attention mask of attributed side ``side`` (0: the source or decoder-only
        sequence, 1: the decoder input)."""
        t = self.tensors
        mask = t.mask if side == 0 else t.decoder_mask
        assert mask is not None
        return mask

    def lengths(self, side: int) -> list[int]:
        """Each example's number of real tokens on attributed side ``side``."""
        return self.side_mask(side).sum(dim=1).tolist()

    def visible(self) -> torch.Tensor:
        """``[B, K, L]``: the real source columns (sides concatenated) target k can depend on."""
        t = self.tensors
        blocks = []
        for side, x in enumerate(self.inputs):
            mask = self.side_mask(side)
            columns = torch.arange(x.shape[1], device=mask.device)
            block = (columns[None, :] < mask.sum(dim=1)[:, None])[:, None, :] & t.valid[..., None]
            if side == 1 or self.model.causal:
                # index holds the position a target's logits come from: the last one it can see
                block = block & (columns[None, None, :] <= t.index[..., None])
            blocks.append(block)
        return torch.cat(blocks, dim=-1)

    @torch.no_grad()
    def evaluate(self, points: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The objective ``[n, B, K]`` of the targets at ``n`` stacked points (no gradients)."""
        n = points[0].shape[0]
        with head_rows_only():
            values = self.objective_fn(n)(*(p.flatten(0, 1) for p in points))
        return values.unflatten(0, (n, -1))

    @torch.no_grad()
    def evaluate_with_hidden(
        self, points: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`evaluate`, and the head inputs ``[n, B, K, H]`` it computed on the way (a
        classifier's class logits)."""
        n = points[0].shape[0]
        with head_rows_only():
            hidden = self.hidden_fn(n)(*(p.flatten(0, 1) for p in points))
        values = self.head_objective(hidden)
        return values.unflatten(0, (n, -1)), hidden.unflatten(0, (n, -1))

    @reuse_host_memory()
    def masked_objective(
        self,
        keep: torch.Tensor,
        baselines: tuple[torch.Tensor, ...],
        batch_size: Size,
    ) -> torch.Tensor:
        """The objective ``[N, B, K]`` of ``N`` copies of the batch; copy i keeps ``keep[i]``
        (sides concatenated) and puts ``baselines`` everywhere else, ``batch_size`` copies a forward.

        ``keep`` is bool ``[N, B, L]``, or real in [0, 1]: ``baseline + keep * (x - baseline)``
        per token (soft masks, as Sobol's).
        """
        widths = [x.shape[1] for x in self.inputs]
        total = keep.shape[0]
        # a forward holds no backward: "auto" takes as many copies as fit the budget
        cost = self.cost(saved=False)
        cost = cost._replace(fixed=cost.fixed + sum(self.held))
        device = self.inputs[0].device
        step = plan_forwards(total, batch_size, cost.per_point, device, self.max_memory, cost.fixed)
        out = []
        for start in range(0, total, step):  # chunking only: bounds memory
            between_passes()
            parts = keep[start : start + step].split(widths, dim=-1)
            points = tuple(
                torch.where(p[..., None], x[None], b[None])
                if p.dtype == torch.bool
                else b[None] + p[..., None].to(x.dtype) * (x[None] - b[None])
                for p, x, b in zip(parts, self.inputs, baselines, strict=True)
            )
            out.append(self.evaluate(points))
        return torch.cat(out)

    @reuse_host_memory()
    def gradient_sum_with_hidden(
        self,
        points: PointFn,
        weights: torch.Tensor,
        *,
        batch_size: Size,
        chunk_size: Size,
        multiplier: PointFn | None = None,
        moments: tuple[int, ...] = (1,),
    ) -> tuple[tuple[tuple[torch.Tensor, ...], ...], torch.Tensor]:
        """``sum_i weights[i] * (m_i * d score_k / d points[i]) ** p`` per moment ``p`` and side,
        as ``[B, K, L, H]``: one tuple of sides per entry of ``moments``.

        ``multiplier(indices)`` gives each point's ``m_i`` (``[n, B, L, H]`` per side; 1 when
        None). ``weights`` ``[N]`` weigh each point; ``[N, L]`` each point's gradient per source
        token (sides concatenated); ``[N, B, L, H]`` per feature. Points go through the model
        ``batch_size`` at a time (all at once when None); targets ``chunk_size`` at a time (all
        at once when None), each chunk in one vectorized backward whose gradients feed every
        moment. ``"auto"`` sizes fit the device's free memory (:meth:`plan`).

        Also returns the head inputs ``[B, K, H]`` at point 0 (detached), which the forward of
        the backward computed anyway: a classifier's class logits at the input when point 0 is
        the input itself (saliency, input x gradient), for its prediction.
        """
        total = weights.shape[0]
        batch_size, chunk_size = self.plan(total, batch_size, chunk_size, moments=len(moments))
        step = total if batch_size is None else batch_size
        # allocated where the model runs: copying a host tensor over costs a transfer per call
        acc = at_least_float32(self.inputs[0].dtype)  # 50 bf16 IG steps lose most digits
        width = self.tensors.valid.shape[1]
        # each side's sums [B, K, L, H], allocated at the first part that does not fill them
        sums: list[list[torch.Tensor | None]] = [[None] * len(self.inputs) for _ in moments]
        x0 = self.inputs[0]
        first = x0.new_zeros(x0.shape[0], width, 0)
        for start in range(0, total, step):  # chunking only: bounds memory
            chunk = torch.arange(start, min(start + step, total))
            stacked = points(chunk)
            scale = None if multiplier is None else multiplier(chunk)
            n = stacked[0].shape[0]
            # one point of weight 1 (saliency, input x gradient): its gradient is the sum
            unit = total == 1 and weights.ndim == 1 and bool(weights[0] == 1)
            w = weights[chunk].to(dtype=acc, device=self.inputs[0].device)
            per_side = _per_side(w, self.inputs)
            for slots, length in self._target_chunks(chunk_size):
                between_passes()
                grads, hidden = self._chunk_gradients(stacked, slots, length, chunk_size)
                if start == 0:
                    if first.shape[-1] == 0:
                        first = hidden.new_zeros(x0.shape[0], width, hidden.shape[-1])
                    first[:, slots] = hidden[: x0.shape[0]].detach()
                for side, g in enumerate(grads):
                    g = g.unflatten(1, (n, -1)).to(acc)  # [k, n, B, L', H]
                    if scale is not None:
                        g = g * scale[side][None, :, :, : g.shape[3]].to(acc)
                    ws = per_side[side]
                    for power, side_sums in zip(moments, sums, strict=True):
                        term = g if power == 1 else g**power
                        if unit:
                            part = term[:, 0].transpose(0, 1)
                        elif ws.ndim == 1:
                            part = torch.einsum("knblh,n->bklh", term, ws)
                        elif ws.ndim == 2:
                            part = torch.einsum("knblh,nl->bklh", term, ws[:, : g.shape[3]])
                        else:
                            part = torch.einsum("knblh,nblh->bklh", term, ws[:, :, : g.shape[3]])
                        full = (x0.shape[0], width, *self.inputs[side].shape[1:])
                        current = side_sums[side]
                        if current is None and part.shape == full and start + n == total:
                            side_sums[side] = part  # the only part: no zeros to add it to
                            continue
                        if current is None:
                            current = side_sums[side] = part.new_zeros(full)
                        current[:, slots, : part.shape[2]] += part
        # a side no chunk reached (none attributed) stays zero
        out = tuple(
            tuple(
                x.new_zeros(x.shape[0], width, *x.shape[1:], dtype=acc) if s is None else s
                for s, x in zip(side_sums, self.inputs, strict=True)
            )
            for side_sums in sums
        )
        return out, first

    def hidden_of(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        token_types: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
        copies: int = 1,
    ) -> torch.Tensor:
        """The head inputs ``[copies * B, K, H]`` of other source embeddings and mask (a
        corrupted run), with their own segment ids (``token_types``; None: this call's) and the
        token ids they stand for (``ids``; None: this call's), the rest of this call (target
        positions, decoder input) as it is; ``copies`` stacked copies of it all. Embeddings of
        ``S * B`` rows (``S`` samples of each example, sample-major, with ``mask`` and ``ids``
        as many) are read against this call's targets repeated ``S`` times."""
        t = self.tensors
        samples = embeds.shape[0] // t.ids.shape[0]

        def stacked(x: torch.Tensor | None, times: int = copies) -> Any:
            return x if x is None or times == 1 else x.repeat(times, *[1] * (x.dim() - 1))

        def each(x: torch.Tensor | None) -> Any:  # this call's own: once per sample and copy
            return stacked(x, copies * samples)

        types = each(t.token_types) if token_types is None else stacked(token_types)
        with reading(t.ids if ids is None else ids):
            return self.model.hidden_at(
                stacked(embeds),
                stacked(mask),
                each(t.index),
                each(self.decoder_embeds),
                each(t.decoder_mask),
                token_types=types,
            )

    def plan(
        self,
        points: int,
        batch_size: Size,
        chunk_size: Size,
        copies: bool = False,
        rows: int = 1,
        shared_forward: bool = False,
        moments: int = 1,
        layers: int = 1,
        per_target: int = 0,
        repeat: int = 1,
        per_point: int = 0,
        eager: bool = False,
    ) -> tuple[int | None, int | None]:
        """Sizes for ``points`` and every target: :func:`plan` on this call's shapes. With
        ``copies``, every (target, point) is a copy of the batch of its own with one cotangent
        (each target along its own path: guided IG, greedy PIG's later rounds, PGD), so a copy's
        forward counts once per target. ``rows``: cotangents per target in one backward
        (GradDrop's one per layer). Decoder-only, each target chunk is a forward of its own: of
        the chunks that fit, the least work (:meth:`_work`) is taken, unless the caller runs one
        ``shared_forward`` for every chunk (attribution patching). ``moments``: the gradient
        moments accumulated (VarGrad's two), each a ``[B, K, L, H]`` sum held to the end.
        ``layers``: gradients read at that many layers (``layers=``), each of a target's
        backwards giving ``[layers, B, L, H]`` and every result ``layers`` times as large.
        ``per_target``: bytes more per target of a backward (what a method reads from it).
        ``repeat``: each point runs as that many copies of the batch (layer IG's, one per
        layer), in its forward and its backward. ``per_point``: bytes more per point of a
        pass (what a method derives from each point's forward). ``eager``: the passes run
        eager attention whatever the model's (:meth:`cost`'s)."""
        targets = self.tensors.valid.shape[1]
        if points == targets == 1 and rows == 1 and self.max_memory is None:
            return None, None  # nothing to split, and no budget to check
        device = self.inputs[0].device
        cost = self.cost(eager=True) if eager else self.cost()
        cost = cost._replace(
            per_cotangent=repeat * cost.per_cotangent,
            per_point=repeat * cost.per_point + per_point,
            fixed=cost.fixed + sum(self.held),
        )
        if moments > 1:  # each moment's sums, and what combining them holds (VarGrad's mean ** 2)
            extra = (2 * moments - 1) * layers * self._result_bytes()
            cost = cost._replace(fixed=cost.fixed + extra)
        if layers > 1:
            # per layer: the sums, a multiplier's product with them and the labelled copy (the
            # cost's results count two, of one layer); a target's layer gradients, cast, scaled
            x = self.inputs[0]
            one = x.shape[0] * sum(xi.shape[1] for xi in self.inputs) * x.shape[-1] * 4
            cost = cost._replace(
                fixed=cost.fixed + (3 * layers - 2) * self._result_bytes(),
                per_cotangent=cost.per_cotangent + 3 * (layers - 1) * one,
            )
        if copies:
            cost = Cost(cost.per_point + cost.per_cotangent, 0, cost.fixed)
        cost = cost._replace(per_cotangent=rows * cost.per_cotangent + per_target)
        causal = self.model.causal and not copies and not shared_forward
        work = self._work(rows) if causal else None
        return plan(points, targets, batch_size, chunk_size, cost, device, self.max_memory, work)

    def _work(self, rows: int) -> Callable[[int], float]:
        """A decoder-only call's estimated work (in forwards of one token, per point) with
        ``chunk`` targets per backward: each chunk runs a forward and its targets' backwards
        (``rows`` cotangents each) over its sequence, cut after its last target."""

        def work(chunk: int) -> float:
            return sum(
                length * (1 + BACKWARD_WORK * rows * (slots.stop - slots.start))
                for slots, length in self._target_chunks(chunk)
                if length is not None
            )

        return work

    def cost(self, saved: bool = True, eager: bool = False) -> Cost:
        """Estimated memory of this call's passes (:class:`~attrax._memory.Cost`): per target
        and point of the vectorized backward, per point of the forward (what it keeps for the
        backward when ``saved``, else a forward's temporaries), and the results. ``eager``: the
        forwards run eager attention whatever the model's (methods that probe the weights)."""
        x = self.inputs[0]
        widths = [xi.shape[1] for xi in self.inputs]
        if self.decoder_embeds is not None:
            widths.append(self.decoder_embeds.shape[1])
        tokens = sum(widths)
        if self.model.seq2seq_classifier:  # its decoder reads the source again, shifted
            tokens += x.shape[1]
        config = self.model.hf.config
        heads = _arch.heads(config, "self") or _arch.heads(config, "encoder") or 1
        # the forwards pick their attention by their longest sequence, not by all tokens
        if not eager and self.model.attention_for(max(widths), x.device) != "eager":
            heads = 0  # fused attention never stores [heads, L, L] weights
        # a state-space layer's scan can be wider than any MLP (Mamba, hybrids)
        width = max(_arch.mlp_width(config), _arch.mixer_width(config, tokens))
        shape = (x.shape[0], tokens, x.shape[-1], x.element_size(), width, heads)
        family = _arch.family(config)
        # DeBERTa-v2's position terms, per-layer embeddings, heads wider than hidden / heads
        relative = _arch.relative_width(config, tokens)
        targets = self.tensors.valid.shape[1]
        attributed = sum(xi.shape[1] for xi in self.inputs)
        results = 2 * self._result_bytes()  # the float32 sums and the labelled copy of them
        if not saved:
            # a copy's embeddings, and its forward's temporaries (no backward), and its head rows
            per_copy = forward_bytes(
                *shape, 1, family, saved=False, device=x.device.type, relative=relative
            )
            per_copy += head_bytes(x.shape[0], targets, self.model.head_width, x.element_size())
            per_copy += x.shape[0] * attributed * x.shape[-1] * x.element_size()
            return Cost(0, per_copy, CALL_OVERHEAD + x.shape[0] * targets * attributed * 8)
        layers = _arch.total_layers(config)
        # a pass's forward scores only its chunk's target rows: the head costs per (point, target)
        head = head_bytes(x.shape[0], 1, self.model.head_width, x.element_size(), backward=True)
        return Cost(
            backward_bytes(*shape, family, x.device.type, relative) + head,
            forward_bytes(*shape, layers, family, device=x.device.type, relative=relative),
            CALL_OVERHEAD + results,
        )

    def _result_bytes(self) -> int:
        """Bytes of one float32 ``[B, K, L, H]`` array of every target's attributions."""
        x = self.inputs[0]
        attributed = sum(xi.shape[1] for xi in self.inputs)
        return x.shape[0] * self.tensors.valid.shape[1] * attributed * x.shape[-1] * 4

    def _target_chunks(self, chunk_size: int | None) -> list[tuple[slice, int | None]]:
        """Slices of target slots, each with the sequence length its targets need.

        Decoder-only targets at positions up to ``p`` read nothing at or after ``p``, so a chunk of
        early targets runs on a shorter sequence, cut at a multiple of 1/:data:`CUT_SHAPES` of it.
        One forward per chunk buys backwards through fewer positions. Chunks of bidirectional
        models (encoder-decoders, encoder classifiers) share one forward (``vmap``'s own chunking).
        """
        t = self.tensors
        width = t.valid.shape[1]
        if not self.model.causal or chunk_size is None:
            chunks = [slice(0, width)]
        else:
            chunks = [slice(k, min(k + chunk_size, width)) for k in range(0, width, chunk_size)]
        if not self.model.causal:
            return [(chunks[0], None)]
        full = self.inputs[0].shape[1]
        # no cut so short that its forward runs eager attention where the estimate priced the
        # full length's fused one: its [heads, L, L] weights could double a pass
        device = self.inputs[0].device
        floor = 1
        if self.model.attention_for(full, device) != self.model.attention_for(1, device):
            eager, floor = 1, full  # the shortest fused length, by bisection
            while floor - eager > 1:
                mid = (eager + floor) // 2
                if self.model.attention_for(mid, device) == "eager":
                    eager = mid
                else:
                    floor = mid
        return [(c, cut_length(max(int(t.index[:, c].max()) + 1, floor), full)) for c in chunks]

    def _chunk_gradients(
        self,
        stacked: tuple[torch.Tensor, ...],
        slots: slice,
        length: int | None,
        chunk_size: int | None,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Per-target gradients ``[k, n * B, L', H]`` for the targets in ``slots``, and the head
        inputs ``[n * B, k, H]`` of the forward."""
        n = stacked[0].shape[0]
        flat = [p.flatten(0, 1) for p in stacked]
        if length is not None:
            flat[0] = flat[0][:, :length]
        if self.tensors.valid.shape[1] == 1:
            return self._one_target_gradients(flat, n, slots)
        with head_rows_only():
            hidden, pullback = vjp(self.hidden_fn(n, slots), *flat)
        # score k depends on head input k only, so one backward through the head gives every
        # d score_k / d h_k; the vocabulary never enters the per-target backward
        _, head_pullback = vjp(lambda h: self.head_objective(h, slots), hidden)
        valid = self.tensors.valid[:, slots].to(hidden.dtype)
        (head_grad,) = head_pullback(valid.repeat(n, 1))
        # cotangent k carries d score_k / d h_k at slot k of every example and copy
        width = hidden.shape[1]
        if width == 1:
            # a chunk of one target (chunk_size=1): its backward without vmap's batching
            return tuple(g[None] for g in pullback(head_grad)), hidden
        one_hot = torch.eye(width, dtype=hidden.dtype, device=hidden.device)
        cotangents = one_hot[:, None, :, None] * head_grad[None]
        vmap_chunk = None if self.model.causal else chunk_size
        # SDPA runs attrax's own op here (Model.attention_as), whose backward batches over targets
        return torch.vmap(pullback, chunk_size=vmap_chunk)(cotangents), hidden

    def _one_target_gradients(
        self, flat: list[torch.Tensor], n: int, slots: slice
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """:meth:`_chunk_gradients` of a call with one target: one plain autograd backward (no
        ``vmap``, no ``torch.func`` wrapping: ~4% of a small classifier's call), activations
        with autograd's own fused backward (:func:`~attrax._model.one_backward`)."""
        leaves = [x.detach().requires_grad_(True) for x in flat]
        with torch.enable_grad(), one_backward(), head_rows_only():
            hidden = self.hidden_fn(n, slots)(*leaves)
            score = self.head_objective(hidden, slots)
            valid = self.tensors.valid[:, slots].to(score.dtype).repeat(n, 1)
            grads = torch.autograd.grad((score * valid).sum(), leaves, allow_unused=True)
        grads = tuple(
            torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True)
        )
        return tuple(g[None] for g in grads), hidden.detach()

    @reuse_host_memory()
    def directional_sum(
        self,
        points: PointFn,
        weights: torch.Tensor,
        directions: tuple[torch.Tensor, ...] | PointFn,
        *,
        batch_size: Size,
        chunk_size: Size,
    ) -> tuple[torch.Tensor, ...]:
        """``sum_i weights[i] * <d score_k / d points[i] at token s, directions at token s>``.

        ``directions``: one ``[B, L, H]`` tensor per side shared by every point, or a function
        of point indices giving each point its own (``[n, B, L, H]`` per side).

        Token-level results ``[B, K, L]`` per side, by forward mode: one ``jvp`` per source token
        (``vmap`` over tangents), each giving every target at once. Cheaper than the reverse path
        when there are fewer source tokens than targets.
        """
        total = weights.shape[0]
        batch_size, chunk_size = self.forward_plan(total, batch_size, chunk_size)
        step = total if batch_size is None else batch_size
        width = self.tensors.valid.shape[1]
        acc = at_least_float32(self.inputs[0].dtype)  # 50 bf16 IG steps lose most digits
        sums = [x.new_zeros(x.shape[0], width, x.shape[1], dtype=acc) for x in self.inputs]
        with head_rows_only():
            self._directional_chunks(points, weights, directions, sums, step, chunk_size, acc)
        return tuple(sums)

    def forward_plan(
        self, points: int, batch_size: Size, chunk_size: Size
    ) -> tuple[int | None, int | None]:
        """:func:`~attrax._memory.plan` of :meth:`directional_sum`: ``chunk_size`` counts source
        tokens (one ``jvp`` each), by :meth:`forward_cost`."""
        tokens = max(x.shape[1] for x in self.inputs)  # the sides' jvps run one after the other
        cost = self.forward_cost()
        cost = cost._replace(fixed=cost.fixed + sum(self.held))
        return plan(
            points, tokens, batch_size, chunk_size, cost, self.inputs[0].device, self.max_memory,
            chunked="source token",
        )  # fmt: skip

    def forward_cost(self) -> Cost:
        """Estimated memory of :meth:`directional_sum`'s passes: per source token's ``jvp`` and
        point (its tangent, the dual stream of a forward beside the primal's, the head inputs it
        moves), per point (a forward without gradients and the head's pullback), and the
        results; :class:`~attrax._memory.Cost`'s targets are the source tokens."""
        x = self.inputs[0]
        base = self.cost(saved=False)
        examples, hidden, size = x.shape[0], x.shape[-1], x.element_size()
        targets = self.tensors.valid.shape[1]
        tokens = max(xi.shape[1] for xi in self.inputs)
        # the primal's temporaries again for its tangent, and as many for jvp's products
        dual = JVP_STREAMS * (base.per_point - examples * tokens * hidden * size)
        per_tangent = dual + examples * (tokens + 2 * targets) * hidden * size
        head = head_bytes(examples, targets, self.model.head_width, size, backward=True)
        return Cost(per_tangent, base.per_point + head, base.fixed)

    def _directional_chunks(
        self,
        points: PointFn,
        weights: torch.Tensor,
        directions: tuple[torch.Tensor, ...] | PointFn,
        sums: list[torch.Tensor],
        step: int,
        chunk_size: int | None,
        acc: torch.dtype,
    ) -> None:
        """:meth:`directional_sum`'s chunks of ``step`` points, added to ``sums``."""
        total = weights.shape[0]
        for start in range(0, total, step):  # chunking only: bounds memory
            between_passes()
            chunk = torch.arange(start, min(start + step, total))
            stacked = points(chunk)
            n = stacked[0].shape[0]
            # jvp's duals cannot alias memory: points may be expanded views (DeepLIFT's inputs)
            flat = tuple(p.flatten(0, 1).contiguous() for p in stacked)
            body = self.hidden_fn(n, forward_mode=True)
            with torch.no_grad():
                hidden = body(*flat)
            _, head_pullback = vjp(self.head_objective, hidden)
            (head_grad,) = head_pullback(self.tensors.valid.to(hidden.dtype).repeat(n, 1))
            w = weights[chunk].to(dtype=acc, device=hidden.device)
            per_side = _per_side(w, self.inputs)
            if callable(directions):
                per_point = tuple(d.flatten(0, 1) for d in directions(chunk))
            else:
                per_point = tuple(d.repeat(n, 1, 1) for d in directions)
            for side, direction in enumerate(per_point):
                length = direction.shape[1]
                ws = per_side[side]
                every = length if chunk_size is None else chunk_size
                for first in range(0, length, every):  # chunking only: bounds memory
                    tokens = slice(first, min(first + every, length))
                    tangents, in_dims = _token_tangents(flat, direction, side, tokens)

                    def push(*tangent: torch.Tensor, body=body, flat=flat) -> torch.Tensor:
                        return jvp(body, flat, tangent)[1]

                    moved = torch.vmap(push, in_dims=in_dims)(*tangents)
                    # moved [c, nB, K, H]: how head input k moves along token s's direction
                    dots = (moved * head_grad[None]).sum(-1, dtype=acc).unflatten(1, (n, -1))
                    del moved
                    w = ws if ws.ndim == 1 else ws[:, tokens]
                    pattern = "lnbk,n->bkl" if ws.ndim == 1 else "lnbk,nl->bkl"
                    sums[side][..., tokens] += torch.einsum(pattern, dots, w)


def all_finite(*values: torch.Tensor) -> bool:
    """Whether every element of ``values`` is finite: one min/max pass each (NaN and inf
    propagate to them), ~7x cheaper on the CPU than ``isfinite(v).all()``.

    >>> all_finite(torch.ones(3), torch.tensor([1.0, float("nan")]))
    False
    """
    for v in values:
        if v.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(v))).all()):
            return False
    return True


def cut_length(length: int, full: int) -> int:
    """``length`` rounded up to a multiple of ``full / CUT_SHAPES`` (rounded up), at most ``full``.

    >>> cut_length(33, 64), cut_length(556, 599), cut_length(599, 599), cut_length(3, 8)
    (36, 570, 599, 3)
    """
    step = -(-full // CUT_SHAPES)
    return min(full, -(-length // step) * step)


def _per_side(w: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Point weights ``[n]`` for every side, or per-token ``[n, L]`` / per-feature ``[n, B, L, H]``
    weights split by side."""
    if w.ndim == 1:
        return tuple(w for _ in inputs)
    return w.split([x.shape[1] for x in inputs], dim=1 if w.ndim == 2 else 2)


def _token_tangents(
    flat: tuple[torch.Tensor, ...], direction: torch.Tensor, side: int, tokens: slice
) -> tuple[tuple[torch.Tensor, ...], tuple[int | None, ...]]:
    """Tangents for ``vmap``: token ``s`` of ``side`` moves along ``direction`` (``[n * B, L, H]``,
    one per point and example), nothing else, for the ``tokens`` ``s`` of one chunk.

    The attributed side gets ``[c, n * B, L, H]`` (one tangent per token of the chunk); other
    sides a shared zero tangent.
    """
    length = direction.shape[1]
    eye = torch.eye(length, dtype=direction.dtype, device=direction.device)[tokens]
    moving = eye[:, None, :, None] * direction[None]
    tangents = tuple(moving if i == side else torch.zeros_like(x) for i, x in enumerate(flat))
    return tangents, tuple(0 if i == side else None for i in range(len(flat)))


def _reference_embeddings(
    problem: Problem, ids: torch.Tensor, side: str, shape: torch.Size
) -> torch.Tensor:
    """The embeddings of a baseline given as token ids (a reference input, as Captum's layer
    methods take one): ``[length]`` or ``[batch, length]``, the length of the inputs' tokens."""
    model = problem.model
    rows = model.embedding_rows(side)
    wanted = f"[{shape[1]}] or [{shape[0]}, {shape[1]}] [batch, length]"
    if ids.dtype == torch.bool or ids.dim() not in (1, 2) or ids.shape[-1] != shape[1]:
        raise OptionError(
            f"`baseline` as token ids must be an int tensor of shape {wanted}, got "
            f"{ids.dtype} of shape {tuple(ids.shape)}"
        )
    if ids.dim() == 2 and ids.shape[0] not in (1, shape[0]):
        raise OptionError(
            f"`baseline` as token ids must be of shape {wanted}, got {tuple(ids.shape)}"
        )
    if bool(((ids < 0) | (ids >= rows)).any()):
        raise OptionError(
            f"`baseline` as token ids holds ids outside the {side} embedding's 0..{rows - 1}"
        )
    return model.embed(ids.reshape(-1, shape[1]).long(), side).detach()


def baseline_embeddings(problem: Problem, baseline: Baseline) -> tuple[torch.Tensor, ...]:
    """The baseline per attributed side, shaped like ``problem.inputs``: ``"zeros"``, the
    ``"pad"``/``"unk"``/``"mask"`` token's embedding at every position (``"mask"`` keeps a
    classifier's special tokens, as Captum's BERT tutorials do), tensors that broadcast, or int
    tensors of token ids (a reference input), embedded."""
    x = problem.inputs
    if isinstance(baseline, str):
        if baseline == "zeros":
            return tuple(torch.zeros_like(xi) for xi in x)
        model = problem.model
        token = {
            "pad": model.pad_token_id,
            "unk": model.tokenizer.unk_token_id,
            "mask": model.tokenizer.mask_token_id,
        }[baseline]
        if token is None:
            raise OptionError(f"`baseline={baseline!r}`: the tokenizer has no {baseline} token")
        ids = torch.full((1, 1), token, dtype=torch.long)
        sides = ("source", "target")
        out = tuple(
            model.embed(ids, side).detach().expand_as(xi)
            for side, xi in zip(sides, x, strict=False)
        )
        if baseline == "mask" and problem.batch.examples[0].special is not None:
            keep = torch.zeros(x[0].shape[:2], dtype=torch.bool)
            for b, example in enumerate(problem.batch.examples):
                keep[b, : len(example.special or ())] = torch.tensor(example.special or ())
            out = (torch.where(keep.to(x[0].device)[..., None], x[0], out[0]), *out[1:])
        return out
    given = baseline if isinstance(baseline, tuple) else (baseline,)
    if len(given) != len(x):
        expected = (
            "a tuple (encoder source, decoder prefix): attribute_target=True attributes both"
            if len(x) == 2
            else "one tensor for the source side"
        )
        raise OptionError(
            f"`baseline` must be {len(x)} tensor(s), one per attributed side, got {len(given)}: "
            f"give {expected}"
        )
    resolved = []
    for side, tensor, xi in zip(("source", "target"), given, x, strict=False):
        if isinstance(tensor, torch.Tensor) and tensor.is_meta:
            raise OptionError("`baseline` is a tensor on the 'meta' device, which holds no values")
        if isinstance(tensor, torch.Tensor) and not tensor.is_floating_point():
            tensor = _reference_embeddings(problem, tensor, side, xi.shape)
        tensor = torch.as_tensor(tensor, dtype=xi.dtype, device=xi.device)
        try:
            resolved.append(torch.broadcast_to(tensor, xi.shape))
        except RuntimeError:
            raise OptionError(
                f"`baseline` of shape {tuple(tensor.shape)} does not broadcast to the embeddings "
                f"of shape {tuple(xi.shape)} [batch, length, hidden]"
            ) from None
    return tuple(resolved)
