"""DeBERTa-v2's disentangled attention, run by attrax as any attention implementation.

transformers' ``DisentangledSelfAttention`` computes its scores, softmax and output in its own
code: it reaches no ``AttentionInterface`` and returns its weights only when asked. While attrax
runs a DeBERTa-v2 (or v3) model (:meth:`attrax._model.Model.attention_as`), :func:`routed`
gives each such module a forward that projects the queries, keys and values as transformers
does and hands them, ``[B, heads, L, d]``, to an attention function with the interface's
signature: :func:`eager` (for ``"eager"`` and ``"sdpa"``) or the function attrax registered
under that name (its probes). The relative-position terms travel as keyword arguments the
function reads: the positions' projections (``[heads, 2 * span, d]``) and, per query and key,
which relative position each pair reads (``[1, 1, Lq, Lk]``).

The scores are those of He et al. (2021), transformers' layout: ``(q_i . k_j + q_i . pk[c(i, j)]
+ k_j . pq[p(i, j)]) / sqrt(d * factor)``, ``factor`` one plus the number of relative terms.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ._errors import ModelError

#: the transformers module whose ``DisentangledSelfAttention`` attrax routes
_MODULE = "transformers.models.deberta_v2.modeling_deberta_v2"
#: attention implementations attrax computes with :func:`eager` (DeBERTa has no fused kernel)
_EAGER = ("eager", "sdpa")
# the registered attention functions that read the relative-position terms (:func:`accept`)
_ACCEPTED: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}


def accept(name: str, function: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Let DeBERTa-v2's attention run through ``function``, registered as ``name``: one that, like
    attrax's probes, computes its weights with the module's own eager attention (for these
    modules :func:`eager`, which reads the relative-position terms)."""
    _ACCEPTED[name] = function


def owns(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a DeBERTa-v2 attention module, which attrax runs itself."""
    kind = type(module)
    return kind.__name__ == "DisentangledSelfAttention" and kind.__module__ == _MODULE


def modules(hf: torch.nn.Module) -> list[torch.nn.Module]:
    """``hf``'s DeBERTa-v2 attention modules, in the order their layers run (none: empty)."""
    return [module for module in hf.modules() if owns(module)]


def convolved(hf: torch.nn.Module) -> bool:
    """Whether ``hf``'s encoder runs DeBERTa-v2's convolution beside its first layer
    (``conv_kernel_size > 0``: the xlarge and xxlarge checkpoints), which mixes tokens without
    attention weights."""
    return int(getattr(hf.config, "conv_kernel_size", 0) or 0) > 0


def eager(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    content_positions: torch.Tensor | None = None,
    position_keys: torch.Tensor | None = None,
    position_content: torch.Tensor | None = None,
    position_queries: torch.Tensor | None = None,
    positional: tuple[torch.Tensor, torch.Tensor] | None = None,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Disentangled attention on ``query`` ``[B, H, Lq, d]`` and ``key``/``value``
    ``[B, H, Lk, d]``: the output ``[B, Lq, H, d]`` and the weights ``[B, H, Lq, Lk]``.

    ``attention_mask`` is transformers' boolean ``[B, 1, Lq, Lk]`` (True: attend) or an additive
    one; ``content_positions`` (c2p) picks for each query and key the relative position whose
    projected key ``position_keys`` ``[H, 2 * span, d]`` the query meets, ``position_content``
    (p2c) the one whose projected query ``position_queries`` meets the key. ``positional``:
    the query and key those two terms read, where they differ from ``query`` and ``key`` in
    their backward alone (LRP's rules: the content term is a product of two activations, each
    relative term a product with constants).
    """
    scores = query @ key.transpose(-1, -2)
    shape = scores.shape
    query, key = positional if positional is not None else (query, key)
    if content_positions is not None and position_keys is not None:
        c2p = query @ position_keys.to(query.dtype).transpose(-1, -2)  # [B, H, Lq, 2 * span]
        scores = scores + torch.gather(c2p, -1, content_positions.expand(shape))
    if position_content is not None and position_queries is not None:
        p2c = position_queries.to(key.dtype) @ key.transpose(-1, -2)  # [B, H, 2 * span, Lk]
        scores = scores + torch.gather(p2c, -2, position_content.expand(shape))
    scores = scores * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask.to(scores.dtype)
    weights = torch.softmax(scores, dim=-1)
    return (weights @ value).transpose(1, 2), weights


def _forward(
    module: torch.nn.Module,
    attention: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    output_attentions: bool = False,
    query_states: torch.Tensor | None = None,
    relative_pos: torch.Tensor | None = None,
    rel_embeddings: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``DisentangledSelfAttention.forward`` through ``attention``; the weights always return (a
    hook reads them; the encoder keeps them only when asked)."""
    heads = module.num_attention_heads
    batch, length = hidden_states.shape[:2]

    def split(x: torch.Tensor) -> torch.Tensor:  # [..., L, H * d] -> [..., H, L, d]
        return x.unflatten(-1, (heads, -1)).transpose(-2, -3)

    queries = hidden_states if query_states is None else query_states
    query = split(module.query_proj(queries))
    key, value = split(module.key_proj(hidden_states)), split(module.value_proj(hidden_states))
    # the scale counts the configured terms even where relative attention is off, as transformers
    factor = 1 + ("c2p" in module.pos_att_type) + ("p2c" in module.pos_att_type)
    kinds = list(module.pos_att_type) if module.relative_attention else []
    # transformers' scale is a float32 square root, whatever the model's dtype
    scale = torch.sqrt(torch.tensor(query.shape[-1], dtype=torch.float32) * factor)
    kwargs: dict[str, Any] = {"scaling": 1.0 / float(scale)}
    if kinds:
        span = module.pos_ebd_size
        if relative_pos is None:
            build = sys.modules[_MODULE].build_relative_position
            relative_pos = build(
                query,
                key,
                bucket_size=module.position_buckets,
                max_position=module.max_relative_positions,
            )
        positions = relative_pos.to(device=query.device, dtype=torch.long)
        positions = positions.reshape(-1, 1, *positions.shape[-2:])  # [1 or B, 1, Lq, Lk]
        if positions.shape[-1] != positions.shape[-2]:
            raise ModelError(
                f"{type(module).__name__}: attrax runs DeBERTa's self-attention over one "
                f"sequence; got relative positions {tuple(relative_pos.shape)}"
            )
        rel = module.pos_dropout(rel_embeddings)[: 2 * span]

        def project(linear: torch.nn.Module) -> torch.Tensor:  # [H, 2 * span, d]
            return split(linear(rel))

        last = 2 * span - 1
        if "c2p" in kinds:
            keys = module.key_proj if module.share_att_key else module.pos_key_proj
            kwargs["position_keys"] = project(keys)
            kwargs["content_positions"] = torch.clamp(positions + span, 0, last)
        if "p2c" in kinds:
            queries_of = module.query_proj if module.share_att_key else module.pos_query_proj
            kwargs["position_queries"] = project(queries_of)
            # transformers reads key j's row at -relative_pos[j, i]: transposed to (query, key)
            kwargs["position_content"] = torch.clamp(-positions.transpose(-1, -2) + span, 0, last)
    mask = attention_mask.bool() if attention_mask.dtype != torch.bool else attention_mask
    out, weights = attention(module, query, key, value, mask, **kwargs)
    return out.reshape(batch, length, -1), weights


@contextlib.contextmanager
def routed(hf: torch.nn.Module, implementation: str) -> Iterator[None]:
    """``hf``'s DeBERTa-v2 attention modules run through :func:`eager` (``"eager"``,
    ``"sdpa"``) or the function :func:`accept` took as ``implementation`` inside the block;
    outside it, as they did before. A ModelError for any other implementation (LRP's rules,
    which have no terms for the relative positions)."""
    found = modules(hf)
    if not found:
        yield
        return
    attention = eager if implementation in _EAGER else _ACCEPTED.get(implementation)
    if attention is None:
        raise ModelError(
            f"{type(hf).__name__}: DeBERTa-v2's disentangled attention cannot run as "
            f"{implementation!r}; attrax runs it as {', '.join((*_EAGER, *_ACCEPTED))}"
        )
    saved = [module.__dict__.get("forward") for module in found]
    for module in found:
        module.forward = functools.partial(_forward, module, attention)
    try:
        yield
    finally:
        for module, forward in zip(found, saved, strict=True):
            if forward is None:
                del module.forward  # the class's forward again
            else:
                module.forward = forward


__all__ = ["accept", "convolved", "eager", "modules", "owns", "routed"]
