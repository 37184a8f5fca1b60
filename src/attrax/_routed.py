"""Attention attrax runs itself, for the transformers classes that compute theirs in their own
code: DeBERTa-v2's disentangled attention, GPT-Neo's and BLOOM's.

Such a class reaches no ``AttentionInterface``, so neither attrax's probes nor its LRP rules could
enter it, and DeBERTa's returns its weights only when asked. While attrax runs one of these models
(:meth:`attrax._model.Model.attention_as`), :func:`routed` gives each such module a forward that
projects the queries, keys and values as transformers does and hands them, ``[B, heads, L, d]``,
to an attention function with the interface's signature: the family's eager attention (for
``"eager"`` and ``"sdpa"``: none of these classes has a fused kernel) or the function attrax
accepted under that name (:func:`accept`: its probes, LRP). What a family adds to the scores travels as keyword
arguments, or in the additive mask:

- DeBERTa-v2 (and v3; He et al. 2021, transformers' layout): ``(q_i . k_j + q_i . pk[c(i, j)] +
  k_j . pq[p(i, j)]) / sqrt(d * factor)``, ``factor`` one plus the number of relative terms. The
  positions' projections (``[heads, 2 * span, d]``) and, per query and key, which relative
  position each pair reads (``[1, 1, Lq, Lk]``) are keyword arguments.
- GPT-Neo: unscaled ``q . k`` in float32, each layer's causal band (global, or a local window)
  folded into the additive mask.
- BLOOM: ``q . k / sqrt(d)`` plus ALiBi's per-head bias over the keys, folded into the additive
  mask; its module adds the residual stream to its output, as transformers' does.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ._errors import ModelError

if TYPE_CHECKING:
    from transformers.models.bloom.modeling_bloom import BloomAttention
    from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention
    from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoSelfAttention

Attention = Callable[..., tuple[torch.Tensor, torch.Tensor]]
_DEBERTA = "transformers.models.deberta_v2.modeling_deberta_v2"
_GPT_NEO = "transformers.models.gpt_neo.modeling_gpt_neo"
_BLOOM = "transformers.models.bloom.modeling_bloom"
#: attention implementations attrax computes with a family's eager attention
_EAGER = ("eager", "sdpa")


def _deberta_eager(
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


def _deberta_forward(
    module: DisentangledSelfAttention,
    attention: Attention,
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
            build = sys.modules[_DEBERTA].build_relative_position
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


def _gpt_neo_eager(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-Neo's attention as transformers computes it: ``q . k`` unscaled, in float32 (also in a
    float64 model), plus the additive mask (the causal band folded in; a float64 model's mask
    makes the sum float64), softmax, cast back to the values' dtype; the output
    ``[B, Lq, H, d]`` and the weights ``[B, H, Lq, Lk]``."""
    scores = query.to(torch.float32) @ key.to(torch.float32).transpose(-1, -2)
    if attention_mask is not None:  # in the wider of the two dtypes, as transformers adds them
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1).to(value.dtype)
    return (weights @ value).transpose(1, 2), weights


def _gpt_neo_forward(
    module: GPTNeoSelfAttention,
    attention: Attention,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    layer_past: Any = None,
    use_cache: bool = False,
    output_attentions: bool = False,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``GPTNeoSelfAttention.forward`` through ``attention``: its causal band (a local layer's
    window) becomes part of the additive mask, so that every function reads it alike."""
    batch, length = hidden_states.shape[:2]

    def split(x: torch.Tensor) -> torch.Tensor:  # [B, L, H * d] -> [B, H, L, d]
        return x.unflatten(-1, (module.num_heads, module.head_dim)).transpose(1, 2)

    query = split(module.q_proj(hidden_states))
    key, value = split(module.k_proj(hidden_states)), split(module.v_proj(hidden_states))
    if layer_past is not None:
        key, value = layer_past.update(key, value, module.layer_id)
    queries, keys = query.shape[2], key.shape[2]
    band = module.bias[:, :, keys - queries : keys, :keys]
    low = torch.finfo(torch.float32).min
    mask = torch.zeros(band.shape, dtype=torch.float32, device=band.device).masked_fill(~band, low)
    if attention_mask is not None:
        mask = mask + attention_mask
    out, weights = attention(module, query, key, value, mask, scaling=1.0, dropout=0.0)
    out = module.resid_dropout(module.out_proj(out.reshape(batch, length, -1)))
    return out, weights


def _bloom_eager(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BLOOM's attention as transformers computes it: ``q . k`` scaled, plus the additive mask
    (ALiBi's bias folded in), its softmax in float32 cast back to the queries' dtype; the output
    ``[B, Lq, H, d]`` and the weights ``[B, H, Lq, Lk]``."""
    scores = query @ key.transpose(-1, -2) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return (weights @ value).transpose(1, 2), weights


def _bloom_forward(
    module: BloomAttention,
    attention: Attention,
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
    alibi: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer_past: Any = None,
    use_cache: bool = False,
    output_attentions: bool = False,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``BloomAttention.forward`` through ``attention``: each head's query, key and value side
    by side in one projection, ALiBi's ``[B * H, 1, Lk]`` bias added to the mask, the residual
    stream added to the output projection's."""
    batch, length = hidden_states.shape[:2]
    heads, d = module.num_heads, module.head_dim
    fused = module.query_key_value(hidden_states).view(batch, length, heads, 3, d)
    query, key, value = (fused[..., i, :].transpose(1, 2) for i in range(3))
    if layer_past is not None:
        key, value = layer_past.update(key, value, module.layer_idx)
    mask = alibi.view(batch, heads, 1, -1)
    if attention_mask is not None:
        mask = mask + attention_mask
    out, weights = attention(
        module, query, key, value, mask, scaling=module.inv_norm_factor, dropout=0.0
    )
    return module.dense(out.reshape(batch, length, -1)) + residual, weights


@dataclass(frozen=True)
class _Family:
    """One transformers attention class attrax runs itself: its forward (the module, the
    attention function, then the class's own arguments) and its eager attention."""

    module: str
    name: str
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    eager: Attention


_FAMILIES = (
    _Family(_DEBERTA, "DisentangledSelfAttention", _deberta_forward, _deberta_eager),
    _Family(_GPT_NEO, "GPTNeoSelfAttention", _gpt_neo_forward, _gpt_neo_eager),
    _Family(_BLOOM, "BloomAttention", _bloom_forward, _bloom_eager),
)
# (implementation, class name) -> the attention function accepted for it (:func:`accept`)
_ACCEPTED: dict[tuple[str, str], Attention] = {}


def _family(module: torch.nn.Module) -> _Family | None:
    kind = type(module)
    return next(
        (f for f in _FAMILIES if kind.__name__ == f.name and kind.__module__ == f.module), None
    )


def owns(module: torch.nn.Module) -> bool:
    """Whether ``module`` is an attention module attrax runs itself."""
    return _family(module) is not None


def modules(hf: torch.nn.Module) -> list[torch.nn.Module]:
    """``hf``'s attention modules attrax runs itself, in the order their layers run."""
    return [module for module in hf.modules() if owns(module)]


def eager(module: torch.nn.Module) -> Attention:
    """The eager attention function of one of these modules (:func:`owns`)."""
    family = _family(module)
    if family is None:
        raise ModelError(f"{type(module).__name__}: attrax does not run its attention itself")
    return family.eager


def accept(implementation: str, function: Attention, names: tuple[str, ...] | None = None) -> None:
    """Let the classes ``names`` (None: all) run their attention through ``function``, registered
    as ``implementation``: attrax's probes (which call the module's eager attention, here
    :func:`eager`'s) or an LRP attention that reads the family's arguments."""
    for family in _FAMILIES:
        if names is None or family.name in names:
            _ACCEPTED[implementation, family.name] = function


def convolved(hf: torch.nn.Module) -> bool:
    """Whether ``hf``'s encoder runs DeBERTa-v2's convolution beside its first layer
    (``conv_kernel_size > 0``: the xlarge and xxlarge checkpoints), which mixes tokens without
    attention weights."""
    return int(getattr(hf.config, "conv_kernel_size", 0) or 0) > 0


@contextlib.contextmanager
def routed(hf: torch.nn.Module, implementation: str) -> Iterator[None]:
    """``hf``'s attention modules that attrax runs itself run through their family's eager
    attention (``"eager"``, ``"sdpa"``) or the function :func:`accept` took for
    ``implementation`` inside the block; outside it, as they did before. A ModelError for any
    other implementation."""
    found = modules(hf)
    forwards = []
    for module in found:
        family = _family(module)
        assert family is not None
        attention = (
            family.eager
            if implementation in _EAGER
            else _ACCEPTED.get((implementation, family.name))
        )
        if attention is None:
            accepted = [name for name, kind in _ACCEPTED if kind == family.name]
            raise ModelError(
                f"{type(hf).__name__}: attrax runs its {family.name} itself, which cannot run as "
                f"{implementation!r}; it runs as {', '.join((*_EAGER, *accepted))}"
            )
        forwards.append(functools.partial(family.forward, module, attention))
    saved = [module.__dict__.get("forward") for module in found]
    for module, forward in zip(found, forwards, strict=True):
        module.forward = forward
    try:
        yield
    finally:
        for module, previous in zip(found, saved, strict=True):
            if previous is None:
                del module.forward  # the class's forward again
            else:
                module.forward = previous


__all__ = ["accept", "convolved", "eager", "modules", "owns", "routed"]
