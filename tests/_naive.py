"""Independent references: a plain autograd loop, one backward per target token and per point.

Nothing here calls attrax's engine. Attributions are taken with respect to the output of the
model's token-embedding modules, substituted through forward hooks while the model runs from ids.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

Objective = Callable[[torch.Tensor, int], torch.Tensor]


def probability(logits: torch.Tensor, token: int) -> torch.Tensor:
    # half precision: the softmax in float32, as transformers' losses take it
    return torch.softmax(logits, dim=-1, dtype=_at_least_float32(logits))[token]


def logprob(logits: torch.Tensor, token: int) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1, dtype=_at_least_float32(logits))[token]


def _at_least_float32(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def logit(logits: torch.Tensor, token: int) -> torch.Tensor:
    return logits[token]


def quadrature_nodes(rule: str, steps: int) -> tuple[list[float], list[float]]:
    """Points in [0, 1] and their weights, built here from the textbook rules (not attrax's)."""
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)  # on [-1, 1]
        return [(float(x) + 1) / 2 for x in nodes], [float(w) / 2 for w in weights]
    h = 1.0 / steps
    if rule in ("riemann_left", "riemann_right", "riemann_middle"):
        at = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[rule]
        return [(i + at) * h for i in range(steps)], [h] * steps
    if rule == "riemann_trapezoid":
        # each of the steps - 1 intervals gives half its width to each of its two ends
        width = 1.0 / (steps - 1)
        points = [i * width for i in range(steps)]
        weights = [0.0] * steps
        for i in range(steps - 1):
            weights[i] += width / 2
            weights[i + 1] += width / 2
        return points, weights
    raise ValueError(rule)


def token_ids(model, source: str, target: str) -> tuple[list[int], list[int]]:
    """Prompt/source ids and target ids, tokenized the way a user would by hand."""
    tok = model.tokenizer
    if model.is_encoder_decoder:
        return tok(source).input_ids, tok(text_target=target).input_ids
    prompt = tok(source, add_special_tokens=False).input_ids
    joint = tok(source + target, add_special_tokens=False).input_ids
    bos = tok(source).input_ids[: len(tok(source).input_ids) - len(prompt)]
    return bos + prompt, joint[len(prompt) :]


class Runner:
    """Runs the HF model from ids while replacing token-embedding outputs by given tensors."""

    def __init__(self, model, source_ids: list[int], target_ids: list[int]) -> None:
        self.hf = model.hf
        self.encdec = model.is_encoder_decoder
        if self.encdec:
            start = model.hf.config.decoder_start_token_id
            self.ids = torch.tensor([source_ids])
            self.decoder_ids = torch.tensor([[start, *target_ids]])
            self.modules = [
                model.hf.get_encoder().embed_tokens,
                model.hf.get_decoder().embed_tokens,
            ]
            self.first_target = 1
        else:
            self.ids = torch.tensor([source_ids + target_ids])
            self.decoder_ids = None
            self.modules = [model.hf.get_input_embeddings()]
            self.first_target = len(source_ids)
        self.sequence = (self.decoder_ids if self.encdec else self.ids)[0].tolist()

    def embeddings(self) -> list[torch.Tensor]:
        with torch.no_grad():
            out = [self.modules[0](self.ids)]
            if self.encdec:
                out.append(self.modules[1](self.decoder_ids))
        return out

    def logits(self, replacements: list[torch.Tensor]) -> torch.Tensor:
        queue = list(replacements)
        handles = []
        for module in dict.fromkeys(self.modules):  # shared modules are hooked once
            handles.append(module.register_forward_hook(lambda *_, q=queue: q.pop(0)))
        try:
            if self.encdec:
                out = self.hf(input_ids=self.ids, decoder_input_ids=self.decoder_ids)
            else:
                out = self.hf(input_ids=self.ids)
        finally:
            for handle in handles:
                handle.remove()
        return out.logits[0]

    def targets(self) -> list[int]:
        return list(range(self.first_target, len(self.sequence)))

    def gradients(
        self,
        points: list[torch.Tensor],
        objective: Objective,
        contrast: list[int] | None,
    ) -> list[list[torch.Tensor]]:
        """Per target position: gradients w.r.t. each replaced embedding, one backward each."""
        leaves = [p.clone().requires_grad_(True) for p in points]
        logits = self.logits(leaves)
        out = []
        for k, t in enumerate(self.targets()):
            score = objective(logits[t - 1], self.sequence[t])
            if contrast is not None:
                score = score - objective(logits[t - 1], contrast[k])
            grads = torch.autograd.grad(score, leaves, retain_graph=True)
            out.append([g[0] for g in grads])
        return out

    def score(self, t: int, points: list[torch.Tensor], objective: Objective) -> float:
        with torch.no_grad():
            return float(objective(self.logits(list(points))[t - 1], self.sequence[t]))


def future_to_nan(
    row: np.ndarray, model: Any, t: int, source_length: int = 0, attribute_target: bool = False
) -> np.ndarray:
    """``row`` (one target's, over sources) with what target ``t`` cannot see set to NaN: a
    decoder-only model's positions from ``t`` on, an attributed decoder prefix's from ``t`` on."""
    if not model.is_encoder_decoder:
        row[t:] = np.nan
    elif attribute_target:
        row[source_length + t :] = np.nan
    return row
