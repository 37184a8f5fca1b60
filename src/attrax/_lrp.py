"""Layer-wise relevance propagation for transformers: AttnLRP (Achtibat et al., ICML 2024) and
CP-LRP (Ali et al., ICML 2022), on the vectorized engine.

LRP is computed in its "gradient x input" form (as LXT's ``lxt.efficient`` does): the forward is
run with each nonlinearity rewritten so that its *backward* is the LRP rule, and the relevance of
a source token's hidden unit is ``embedding * modified gradient``. The rewritten forward computes
the same values; only the backward changes. The rules:

- elementwise activations (GELU, tanh-GELU, SiLU, ReLU, tanh): identity rule, the backward
  multiplies by ``f(x) / x`` instead of ``f'(x)`` (so ``x * grad_in = f(x) * grad_out``);
  RoBERTa's and XLM-R's classification heads call ``torch.tanh`` as a function and run a
  patched forward that gives it the rule (a ReLU's gradient is already its identity rule);
- Gemma 2's soft-capping of attention scores and logits, ``c * tanh(x / c)``: the identity
  rule too;
- LayerNorm and RMSNorm: the normalising scale (``1 / std``, ``1 / rms``) held constant;
- products of two activations: uniform rule, half the relevance to each factor. In attention
  that is ``q . k`` and ``softmax . v`` (the query and key gradients are divided by 4, the
  value's by 2, as LXT does); in gated MLPs (Llama, Qwen2, Qwen3, Mistral, Gemma, Phi-3,
  SmolLM3) ``act(gate) * up``;
- the attention softmax: AttnLRP's rule, which in gradient x input form is the softmax's true
  gradient (``x_i (R_i - s_i sum_j R_j)``, the bias term of its Taylor expansion dropped);
  CP-LRP holds the attention weights constant (query and key get no relevance) and, as LXT's
  CP-LRP, the MLP gate too.

Linear layers keep their gradient (LRP-0): their biases, position embeddings, LayerNorm shifts
and the softmax absorb relevance, so the sum over sources and hidden is the explained logit
minus those terms (exactly the logit for a bias-free model under CP-LRP).

Rules are installed by :func:`lrp_rules`: attention runs as attrax's own implementation
registered with transformers' ``AttentionInterface``, norms and gated MLPs run patched forwards,
and activations the identity rule of :class:`~attrax._model._Activation`. Every rule is a
detach-product or an autograd function with a vmap rule, so ``torch.func.vjp`` + ``vmap`` give
every target's relevance from one forward. A model with a module attrax has no rule for is
refused with a :class:`~attrax.ModelError` naming it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
import xarray as xr
from transformers import PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN

from . import _routed
from . import _validate as check
from ._engine import Problem
from ._errors import ModelError
from ._gradients import GRADIENT, Rule
from ._memory import at_least_float32
from ._model import (
    Model,
    activation_kind,
    apply_activation,
    backward_rule,
    can_switch,
    instance_attributes,
    selected_keys,
)
from ._protocol import COMMON, Call, Param

#: LRP variants: AttnLRP (softmax rule, uniform rule on attention products) or CP-LRP
#: (attention weights and MLP gates held constant)
RULES = ("attnlrp", "cp-lrp")
#: the name attrax's LRP attention is registered under in transformers' AttentionInterface
IMPLEMENTATION = "attrax_lrp"

# the rule forwards run with (set by `lrp_rules`, read when a patched module runs)
_ACTIVE: contextvars.ContextVar[str | None] = contextvars.ContextVar("attrax_lrp", default=None)


def _with_gradient(value: torch.Tensor, x: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward, ``local * grad`` to ``x`` in the backward (and jvp)."""
    return value.detach() + local.detach() * (x - x.detach())


def _soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(x / cap)`` (Gemma 2's attention scores and logits) with the identity rule:
    the backward multiplies by ``f(x) / x``, so the relevance passes through unchanged."""
    value = torch.tanh(x / cap) * cap
    ratio = torch.where(x == 0, torch.ones_like(x), value / torch.where(x == 0, 1.0, x))
    return _with_gradient(value, x, ratio)


def _scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` exactly, whose gradient is multiplied by ``factor``."""
    return x.detach() + factor * (x - x.detach())


def _uniform(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a * b`` whose relevance goes half to each factor (the uniform rule)."""
    return 0.5 * (a * b.detach()) + 0.5 * (a.detach() * b)


def _rule() -> str:
    rule = _ACTIVE.get()
    if rule is None:  # an attrax module patch outside `lrp_rules`: a programming error
        raise RuntimeError("attrax LRP rules used outside lrp_rules()")
    return rule


def _ruled(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An attention's query, key and value under the active rule: AttnLRP's uniform rule on
    ``q . k`` (1/2 each) after the uniform rule on ``softmax . v`` (1/2 each), or CP-LRP's
    weights held constant (the query and key detached)."""
    if _rule() == "attnlrp":
        return (
            _scale_gradient(query, 0.25),
            _scale_gradient(key, 0.25),
            _scale_gradient(value, 0.5),
        )
    return query.detach(), key.detach(), value


# kwargs of the attention interface that change its math in ways this attention does not know
_REFUSED_KWARGS = ("sinks", "head_mask")


def _attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (``[B, heads, L, d]`` in, ``[B, L, heads, d]`` out) with the LRP rules."""
    attention_mask = selected_keys(attention_mask, kwargs, query, key.shape[-2])
    for name in _REFUSED_KWARGS:
        if kwargs.get(name) is not None:
            raise ModelError(
                f"{type(module).__name__} passes `{name}` to its attention: attrax's LRP "
                "attention has no rule for it"
            )
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    query, key, value = _ruled(query, key, value)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if kwargs.get("softcap") is not None:  # Gemma 2: tanh-capped scores, the identity rule
        scores = _soft_cap(scores, kwargs["softcap"])
    if kwargs.get("position_bias") is not None:  # T5's relative bias: a constant, as ALiBi's
        scores = scores + kwargs["position_bias"].detach()
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    sinks = kwargs.get("s_aux")
    if sinks is not None:  # GPT-OSS: a learned logit per head beside the keys (a constant)
        column = sinks.detach().to(scores.dtype).reshape(1, -1, 1, 1)
        scores = torch.cat([scores, column.expand(*scores.shape[:-1], 1)], dim=-1)
    # in float32 at least, as transformers' eager attention (float64 stays float64)
    weights = torch.softmax(scores, dim=-1, dtype=at_least_float32(scores.dtype))
    if sinks is not None:  # the sink's probability: what the keys do not get
        weights = weights[..., :-1]
    weights = weights.to(query.dtype)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def _disentangled_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeBERTa-v2's disentangled attention with the LRP rules: as :func:`_attention` on ``q . k``
    and ``softmax . v``; each relative term, a query's (key's) product with the positions'
    projections (constants, as a linear layer's weights), passes the relevance it gets from the
    softmax's half to that query (key) whole."""
    if _rule() == "attnlrp":  # the softmax . v rule's half, whole to the query (key)
        positional = (_scale_gradient(query, 0.5), _scale_gradient(key, 0.5))
    else:  # CP-LRP: the attention weights are constants
        positional = (query.detach(), key.detach())
    query, key, value = _ruled(query, key, value)
    return _routed.eager(module)(
        module, query, key, value, attention_mask, positional=positional, **kwargs
    )


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPLEMENTATION, _attention)
    _routed.accept(IMPLEMENTATION, _disentangled_attention, ("DisentangledSelfAttention",))
    # GPT-Neo's band and BLOOM's ALiBi are in their additive masks: the interface's signature
    _routed.accept(IMPLEMENTATION, _attention, ("GPTNeoSelfAttention", "BloomAttention"))
    # masks as eager attention gets them (additive, -inf where masked)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)


_register()


def _layer_norm(module: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm with ``1 / std`` held constant: linear in ``x`` for the backward."""
    centered = x - x.mean(dim=-1, keepdim=True)
    variance = centered.pow(2).mean(dim=-1, keepdim=True)
    y = centered * torch.rsqrt(variance + module.eps).detach()
    if module.weight is not None:
        y = y * module.weight
    if module.bias is not None:
        y = y + module.bias
    return y


def _layer_norm_1p(module: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """Nemotron's LayerNorm, whose gain is ``1 + weight``, with ``1 / std`` held constant."""
    centered = x - x.mean(dim=-1, keepdim=True)
    variance = centered.pow(2).mean(dim=-1, keepdim=True)
    y = centered * torch.rsqrt(variance + module.eps).detach() * (module.weight + 1.0)
    return y + module.bias if module.bias is not None else y


def _olmo_layer_norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """OLMo's LayerNorm (no weight, no bias, epsilon 1e-5, in float32) with ``1 / std``
    constant."""
    h = x.to(at_least_float32(x.dtype))
    centered = h - h.mean(dim=-1, keepdim=True)
    scale = torch.rsqrt(centered.pow(2).mean(dim=-1, keepdim=True) + 1e-5).detach()
    return (centered * scale).to(x.dtype)


def _cohere_layer_norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Cohere's LayerNorm (``weight * (x - mean) / std``, no bias, in float32) with ``1 / std``
    constant."""
    h = x.to(at_least_float32(x.dtype))
    centered = h - h.mean(dim=-1, keepdim=True)
    variance = centered.pow(2).mean(dim=-1, keepdim=True)
    eps, weight = cast(float, module.variance_epsilon), cast(torch.Tensor, module.weight)
    scale = torch.rsqrt(variance + eps).detach()
    return (weight.to(h.dtype) * centered * scale).to(x.dtype)


def _rms_norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Llama-style RMSNorm (``weight * x / rms(x)``, in float32) with ``1 / rms`` constant."""
    eps = cast(float, getattr(module, "variance_epsilon", None) or module.eps)
    h = x.to(at_least_float32(x.dtype))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps).detach()
    return cast(torch.Tensor, module.weight) * h.to(x.dtype)


def _weightless_rms_norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Llama 4's RMSNorm of queries and keys (``x / rms(x)`` in float32, no weight) with
    ``1 / rms`` constant."""
    h = x.to(at_least_float32(x.dtype))
    eps = cast(float, module.variance_epsilon)
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps).detach()).to(x.dtype)


def _olmo2_rms_norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """OLMo 2's RMSNorm (``weight * x / rms(x)``, cast back after the weight) with ``1 / rms``
    constant."""
    h = x.to(at_least_float32(x.dtype))
    eps = cast(float, module.variance_epsilon)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps).detach()
    return (cast(torch.Tensor, module.weight) * h).to(x.dtype)


def _gemma_rms_norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gemma's RMSNorm (``x / rms(x) * (1 + weight)``) with ``1 / rms`` constant."""
    h = x.to(at_least_float32(x.dtype))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + cast(float, module.eps)).detach()
    return (h * (1.0 + cast(torch.Tensor, module.weight).to(h.dtype))).type_as(x)


def _gemma4_rms_norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gemma 4's RMSNorm (``x / rms(x)``, times ``weight`` unless built without one, in float32
    at least) with ``1 / rms`` constant."""
    h = x.to(at_least_float32(x.dtype))
    eps = cast(float, module.variance_epsilon)
    h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + eps, -0.5).detach()
    if module.with_scale:
        h = h * cast(torch.Tensor, module.weight).to(h.dtype)
    return h.type_as(x)


def _gemma4_layer(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    per_layer_input: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Gemma 4's decoder layer as transformers runs it, whose per-layer branch multiplies the
    layer's per-layer input by the gate ``act(per_layer_input_gate(h))``: the uniform rule
    (half of each gradient, the gate's half in :func:`_per_layer_gate`) or, under CP-LRP, the
    gate held constant, as a gated MLP's."""
    if per_layer_input is not None and _rule() == "attnlrp":
        per_layer_input = _scale_gradient(per_layer_input, 0.5)
    return type(module).forward(module, hidden_states, per_layer_input, **kwargs)


def _per_layer_gate(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Gemma 4's ``per_layer_input_gate``: the gate's half of the uniform rule (AttnLRP), or
    the gate held constant (CP-LRP); see :func:`_gemma4_layer`."""
    y = torch.nn.functional.linear(x, module.weight, module.bias)
    return y.detach() if _rule() == "cp-lrp" else _scale_gradient(y, 0.5)


def _children(module: torch.nn.Module, *names: str) -> list[torch.nn.Module]:
    """``module``'s submodules ``names`` (torch's stubs type an attribute ``Tensor | Module``)."""
    return [cast(torch.nn.Module, getattr(module, name)) for name in names]


def _tensors(module: torch.nn.Module, *names: str) -> list[torch.Tensor]:
    """``module``'s parameters or buffers ``names`` (as :func:`_children`, for tensors)."""
    return [cast(torch.Tensor, getattr(module, name)) for name in names]


def _gated_mlp(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))``: the uniform rule on the product (AttnLRP) or the gate
    held constant (CP-LRP, as LXT)."""
    gate_proj, up_proj, down_proj = _children(module, "gate_proj", "up_proj", "down_proj")
    gate = gate_proj(x)
    # Llama 4's `activation_fn`
    act = getattr(module, "act_fn", None) or cast(torch.nn.Module, module.activation_fn)
    if _rule() == "cp-lrp":
        return down_proj(act(gate.detach()) * up_proj(x))
    return down_proj(_uniform(act(gate), up_proj(x)))


def _fused_gated_mlp(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Phi-3's ``down(up * act(gate))``, gate and up from one fused projection: the rules of
    :func:`_gated_mlp`."""
    gate_up_proj, down_proj, act = _children(module, "gate_up_proj", "down_proj", "activation_fn")
    gate, up = gate_up_proj(x).chunk(2, dim=-1)
    if _rule() == "cp-lrp":
        return down_proj(up * act(gate.detach()))
    return down_proj(_uniform(act(gate), up))


def _t5_gated_mlp(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """T5 v1.1's and mT5's ``wo(act(wi_0(x)) * wi_1(x))`` (FLAN-T5 keeps ``wo`` in float32): the
    rules of :func:`_gated_mlp`."""
    wi_0, wi_1, wo, act, dropout = _children(module, "wi_0", "wi_1", "wo", "act", "dropout")
    gate = wi_0(x)
    inner = act(gate.detach()) * wi_1(x) if _rule() == "cp-lrp" else _uniform(act(gate), wi_1(x))
    return wo(dropout(inner).to(cast(torch.Tensor, wo.weight).dtype))


def _glu_mlp(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ModernBERT's ``Wo(act(input) * gate)``, input and gate from one fused ``Wi``: the rules of
    :func:`_gated_mlp` (its activated half is the gating factor)."""
    wi, wo, act, drop = _children(module, "Wi", "Wo", "act", "drop")
    inner, gate = wi(x).chunk(2, dim=-1)
    if _rule() == "cp-lrp":
        return wo(drop(act(inner.detach()) * gate))
    return wo(drop(_uniform(act(inner), gate)))


def _experts(
    module: torch.nn.Module, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """A mixture's experts, ``sum_k w_k E_k(x)`` over each token's chosen experts (transformers'
    3-D ``gate_up_proj`` and ``down_proj``): the routing weights ``w`` are constants under both
    rules (relevance reaches the experts alone), and each expert's gated MLP gets the rules of
    :func:`_gated_mlp`. Its loop runs over the experts with tokens, as transformers' own."""
    out = torch.zeros_like(x)
    weights = top_k_weights.detach()
    experts = cast(int, module.num_experts)
    gate_up_proj, down_proj = _tensors(module, "gate_up_proj", "down_proj")
    act_fn = cast(torch.nn.Module, module.act_fn)
    with torch.no_grad():
        mask = torch.nn.functional.one_hot(top_k_index, experts + 1).permute(2, 1, 0)
        hit = [int(e) for e in (mask.sum(dim=(-1, -2)) > 0).nonzero()[:, 0]]
    for expert in hit:  # experts, not targets or points: which tokens each reads is data
        if expert == experts:
            continue
        slot, token = torch.where(mask[expert])
        gate, up = torch.nn.functional.linear(x[token], gate_up_proj[expert]).chunk(2, -1)
        z = act_fn(gate.detach()) * up if _rule() == "cp-lrp" else _uniform(act_fn(gate), up)
        y = torch.nn.functional.linear(z, down_proj[expert]) * weights[token, slot, None]
        out = out.index_add(0, token, y.to(out.dtype))
    return out


def _identity(x: torch.Tensor, value: torch.Tensor, at_zero: float) -> torch.Tensor:
    """``value = f(x)`` elementwise with the identity rule: the backward multiplies by ``f(x) /
    x`` (``at_zero``, its limit, at 0), so the relevance passes through unchanged."""
    zero = x == 0
    return _with_gradient(value, x, torch.where(zero, at_zero, value / torch.where(zero, 1.0, x)))


def _gpt_oss_experts(
    module: torch.nn.Module,
    x: torch.Tensor,
    router_indices: torch.Tensor,
    routing_weights: torch.Tensor,
) -> torch.Tensor:
    """GPT-OSS's experts, ``sum_k w_k E_k(x)``: each expert ``down((clamp(up) + 1) *
    glu(clamp(gate)))`` with ``glu(g) = g * sigmoid(alpha * g)``, biases, and its gate and up
    interleaved in one projection. The routing weights are constants (:func:`_experts`); the
    clamps and the GLU get the identity rule, the product the uniform rule (AttnLRP) or its GLU
    held constant (CP-LRP); the ``+ 1`` keeps its share, as a bias."""
    out = torch.zeros_like(x)
    weights = routing_weights.detach()
    limit, alpha = cast(float, module.limit), cast(float, module.alpha)
    gate_up_proj, gate_up_bias, down_proj, down_bias = _tensors(
        module, "gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"
    )
    with torch.no_grad():
        mask = torch.nn.functional.one_hot(router_indices, cast(int, module.num_experts))
        mask = mask.permute(2, 1, 0)
        hit = [int(e) for e in (mask.sum(dim=(-1, -2)) > 0).nonzero()[:, 0]]
    for expert in hit:  # experts, not targets or points: which tokens each reads is data
        slot, token = torch.where(mask[expert])
        z = x[token] @ gate_up_proj[expert] + gate_up_bias[expert]
        gate, up = z[..., ::2], z[..., 1::2]
        clamped = gate.clamp(max=limit)
        glu = _identity(gate, clamped * torch.sigmoid(clamped * alpha), 0.5)
        up = _identity(up, up.clamp(min=-limit, max=limit), 1.0)
        cp = _rule() == "cp-lrp"  # the GLU held constant, or the uniform rule
        inner = glu.detach() * (up + 1) if cp else _uniform(up + 1, glu)
        y = inner @ down_proj[expert] + down_bias[expert]
        out = out.index_add(0, token, (y * weights[token, slot, None]).to(out.dtype))
    return out


def _llama4_experts(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Llama 4's experts: each runs on every token's input, scaled before it by the token's
    routing weight for it (0 where it was not chosen; a constant, :func:`_llama4_router`), as
    ``down(up * act(gate))`` by batched matmuls: the rules of :func:`_gated_mlp`."""
    gate_up_proj, down_proj = _tensors(module, "gate_up_proj", "down_proj")
    hidden_size, act_fn = cast(int, module.hidden_size), cast(torch.nn.Module, module.act_fn)
    h = x.view(gate_up_proj.shape[0], -1, hidden_size)
    gate, up = torch.bmm(h, gate_up_proj).chunk(2, dim=-1)
    inner = up * act_fn(gate.detach()) if _rule() == "cp-lrp" else _uniform(act_fn(gate), up)
    return torch.bmm(inner, down_proj).view(-1, hidden_size)


def _llama4_router(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Llama 4's router as transformers computes it (a sigmoid of each chosen expert's logit),
    its routing weights held constant."""
    scores, logits = type(module).forward(module, x)
    return scores.detach(), logits


def _router(module: torch.nn.Module, x: torch.Tensor, *rest: Any) -> tuple[torch.Tensor, ...]:
    """A mixture's router as transformers computes it (MiniMax M2's also takes its experts'
    score correction), its routing weights held constant."""
    logits, weights, index = type(module).forward(module, x, *rest)
    return logits, weights.detach(), index


def _shared_experts(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Qwen2-MoE's block: the routed experts plus a shared expert scaled by a sigmoid gate, held
    constant as the routing weights are."""
    batch, length, width = x.shape
    rows = x.view(-1, width)
    router, experts, shared_gate, shared = _children(
        module, "gate", "experts", "shared_expert_gate", "shared_expert"
    )
    _, weights, index = router(rows)
    routed = experts(rows, index, weights)
    gate = torch.sigmoid(shared_gate(rows)).detach()
    return (routed + gate * shared(rows)).reshape(batch, length, width)


def _pooler_activation(module: torch.nn.Module) -> str:
    """The activation kind of DeBERTa-v2's pooler (a ModelError where it has no identity rule)."""
    name = cast(PretrainedConfig, module.config).pooler_hidden_act
    kind = activation_kind(ACT2FN[name]) if isinstance(name, str) and name in ACT2FN else None
    if kind not in IDENTITY_KINDS:
        raise ModelError(
            f"lrp: the pooler activation {name!r} of DeBERTa-v2 has no identity rule in attrax "
            f"(it covers {', '.join(IDENTITY_KINDS)})"
        )
    return str(kind)


def _gelu_lm_head(module: torch.nn.Module, features: torch.Tensor, **_: Any) -> torch.Tensor:
    """RoBERTa's, XLM-R's and CamemBERT's masked-LM head, ``decoder(norm(gelu(dense(x))))``,
    whose GELU is a call, not a child module: here it gets the identity rule."""
    decoder, layer_norm, dense = _children(module, "decoder", "layer_norm", "dense")
    return decoder(layer_norm(apply_activation(dense(features), "gelu")))


def _context_pooler(module: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """DeBERTa-v2's pooler, ``act(dense(hidden[:, 0]))``, whose activation transformers builds
    inside the call (no module): here it gets the identity rule."""
    dense, dropout = _children(module, "dense", "dropout")
    x = dense(dropout(hidden[:, 0]))
    return apply_activation(x, _pooler_activation(module))


def _tanh_head(module: torch.nn.Module, features: torch.Tensor, **_: Any) -> torch.Tensor:
    """RoBERTa's and XLM-R's classification head, ``out_proj(tanh(dense(features[:, 0])))``,
    whose ``torch.tanh`` is a function call, not a module: here it gets the identity rule."""
    dense, dropout, out_proj = _children(module, "dense", "dropout", "out_proj")
    x = dense(dropout(features[:, 0, :]))
    return out_proj(dropout(apply_activation(x, "tanh")))


def _pooled_tanh_head(
    module: torch.nn.Module, hidden_states: torch.Tensor, **_: Any
) -> torch.Tensor:
    """BART's, mBART's and T5's classification head on the pooled state (BART-MNLI's),
    ``out_proj(tanh(dense(h)))``, whose ``torch.tanh`` is a function call, not a module: here
    it gets the identity rule."""
    dense, dropout, out_proj = _children(module, "dense", "dropout", "out_proj")
    x = dense(dropout(hidden_states))
    return out_proj(dropout(apply_activation(x, "tanh")))


# class-name prefixes of DeepSeek V2's and V3's kin: multi-head latent attention (Youtu, GLM-4.7-
# Flash's `Glm4MoeLite`, V3.2's and GLM-5's with an indexer) or DeepSeek V3's experts beside
# Llama's attention (GLM-4.5's `Glm4Moe`)
_DEEPSEEK_KIN = (
    "DeepseekV2",
    "DeepseekV3",
    "DeepseekV32",
    "Glm4MoeLite",
    "Youtu",
    "GlmMoeDsa",
    "Glm4Moe",
)
# a module's forward under LRP, the module its first argument (a router's outputs: a tuple)
_Forward = Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
# module class name -> the forward it runs under LRP
_PATCHED: dict[str, _Forward] = {
    "LayerNorm": _layer_norm,
    "OlmoLayerNorm": _olmo_layer_norm,
    "CohereLayerNorm": _cohere_layer_norm,
    "Cohere2LayerNorm": _cohere_layer_norm,
    "NemotronLayerNorm1P": _layer_norm_1p,
    "LlamaRMSNorm": _rms_norm,
    "Qwen2RMSNorm": _rms_norm,
    "MistralRMSNorm": _rms_norm,
    "GemmaRMSNorm": _gemma_rms_norm,
    "Gemma2RMSNorm": _gemma_rms_norm,  # also after attention and MLP
    "VaultGemmaRMSNorm": _gemma_rms_norm,
    "Gemma3RMSNorm": _gemma_rms_norm,  # also after attention and MLP, and on queries and keys
    "Olmo2RMSNorm": _olmo2_rms_norm,  # after attention and MLP only, and on queries and keys
    "Phi3RMSNorm": _rms_norm,
    "Qwen3RMSNorm": _rms_norm,  # also its per-head query and key norms
    "SmolLM3RMSNorm": _rms_norm,
    "GraniteRMSNorm": _rms_norm,
    "CwmRMSNorm": _rms_norm,
    "Ernie4_5RMSNorm": _rms_norm,
    "HunYuanDenseV1RMSNorm": _rms_norm,  # also each head's query and key, after RoPE
    "GlmRMSNorm": _rms_norm,
    "Glm4RMSNorm": _rms_norm,  # also after attention and MLP
    "Exaone4RMSNorm": _rms_norm,  # after attention and MLP only, and on queries and keys
    "ArceeRMSNorm": _rms_norm,
    "HeliumRMSNorm": _olmo2_rms_norm,  # its weight in float32 before the cast back
    "SeedOssRMSNorm": _rms_norm,
    "LlamaMLP": _gated_mlp,
    "Qwen2MLP": _gated_mlp,
    "MistralMLP": _gated_mlp,
    "GemmaMLP": _gated_mlp,
    "Gemma2MLP": _gated_mlp,
    "VaultGemmaMLP": _gated_mlp,
    "Gemma3MLP": _gated_mlp,
    "Olmo2MLP": _gated_mlp,
    "Olmo3RMSNorm": _olmo2_rms_norm,  # OLMo 2's, with local layers
    "Olmo3MLP": _gated_mlp,
    "OlmoMLP": _gated_mlp,
    "CohereMLP": _gated_mlp,
    "Ministral3MLP": _gated_mlp,
    # ERNIE 4.5 MoE, HunYuan MoE: softmax routers, shared experts beside the routed ones
    "Ernie4_5_MoeRMSNorm": _rms_norm,
    "Ernie4_5_MoeMLP": _gated_mlp,
    "Ernie4_5_MoeExperts": _experts,
    "Ernie4_5_MoeTopKRouter": _router,
    "HunYuanMoEV1RMSNorm": _rms_norm,
    "HunYuanMoEV1MLP": _gated_mlp,
    "HunYuanMoEV1Experts": _experts,
    "HunYuanMoEV1Gate": _router,
    "Ministral3RMSNorm": _rms_norm,
    "Cohere2MLP": _gated_mlp,
    "StableLmMLP": _gated_mlp,
    "Phi3MLP": _fused_gated_mlp,
    "Qwen3MLP": _gated_mlp,
    "SmolLM3MLP": _gated_mlp,
    "GraniteMLP": _gated_mlp,
    "CwmMLP": _gated_mlp,
    "Ernie4_5MLP": _gated_mlp,
    "HunYuanDenseV1MLP": _gated_mlp,
    "GlmMLP": _fused_gated_mlp,  # Phi-3's: up * act(gate), one fused projection
    "Glm4MLP": _fused_gated_mlp,
    "Exaone4MLP": _gated_mlp,
    "HeliumMLP": _gated_mlp,
    "SeedOssMLP": _gated_mlp,  # its dropout the identity in eval mode
    "ModernBertMLP": _glu_mlp,
    "T5LayerNorm": _rms_norm,  # T5's and mT5's RMSNorm (float32 variance, as Llama's)
    "MT5LayerNorm": _rms_norm,
    "T5DenseGatedActDense": _t5_gated_mlp,
    "MT5DenseGatedActDense": _t5_gated_mlp,
    # mixtures of experts: Mixtral, Qwen2-MoE (a gated shared expert), Qwen3-MoE
    "MixtralRMSNorm": _rms_norm,
    "Qwen2MoeRMSNorm": _rms_norm,
    "Qwen3MoeRMSNorm": _rms_norm,  # also its per-head query and key norms
    "OlmoeRMSNorm": _rms_norm,  # also its query and key norms over all heads
    "GraniteMoeRMSNorm": _rms_norm,
    "Qwen2MoeMLP": _gated_mlp,  # the shared expert
    "Qwen3MoeMLP": _gated_mlp,  # its dense layers (`mlp_only_layers`)
    "MixtralExperts": _experts,
    "Qwen2MoeExperts": _experts,
    "Qwen3MoeExperts": _experts,
    "OlmoeExperts": _experts,
    "GraniteMoeExperts": _experts,
    "GptOssExperts": _gpt_oss_experts,
    "MixtralTopKRouter": _router,
    "Qwen2MoeTopKRouter": _router,
    "Qwen3MoeTopKRouter": _router,
    "OlmoeTopKRouter": _router,
    "GraniteMoeTopKRouter": _router,
    "GptOssTopKRouter": _router,
    # MiniMax M2: a sigmoid router with a score correction; query and key norms over all heads
    "MiniMaxM2TopKRouter": _router,
    "MiniMaxM2Experts": _experts,
    "MiniMaxM2RMSNorm": _rms_norm,
    "GptOssRMSNorm": _olmo2_rms_norm,  # the weight applied before the cast back
    # Llama 4: experts in some layers (each on every token, its routing weight scaling its
    # input), a shared expert, dense MLPs elsewhere; a weightless norm of queries and keys
    "Llama4TextRMSNorm": _rms_norm,
    "Llama4TextWeightlessRMSNorm": _weightless_rms_norm,
    "Llama4TextMLP": _gated_mlp,
    "Llama4TextExperts": _llama4_experts,
    "Llama4Router": _llama4_router,
    # Gemma 4: norms with and without weights (values', routers'), per-layer inputs gated into
    # each layer (the layer's and its gate's patches), a mixture beside the MLP in some layers
    "Gemma4RMSNorm": _gemma4_rms_norm,
    "Gemma4TextMLP": _gated_mlp,
    "Gemma4TextDecoderLayer": _gemma4_layer,
    "Gemma4TextExperts": _experts,
    "Gemma4TextRouter": _router,
    # DeepSeek V2, V3: also the query and key-value latents' norms; dense and shared MLPs
    **{
        f"{family}{part}": forward
        for family in _DEEPSEEK_KIN
        for part, forward in (
            ("RMSNorm", _rms_norm),
            ("MLP", _gated_mlp),
            ("Experts", _experts),
            ("TopkRouter", _router),
        )
    },
    "Qwen2MoeSparseMoeBlock": _shared_experts,
    "RobertaClassificationHead": _tanh_head,
    "XLMRobertaClassificationHead": _tanh_head,
    "CamembertClassificationHead": _tanh_head,
    "BartClassificationHead": _pooled_tanh_head,
    "MBartClassificationHead": _pooled_tanh_head,
    "T5ClassificationHead": _pooled_tanh_head,
    "MT5ClassificationHead": _pooled_tanh_head,
    "RobertaLMHead": _gelu_lm_head,
    "XLMRobertaLMHead": _gelu_lm_head,
    "CamembertLMHead": _gelu_lm_head,
    "ContextPooler": _context_pooler,
}
# activation kinds the identity rule covers (tanh: poolers, RoBERTa's head); sigmoid is not
# one (f(0) != 0)
IDENTITY_KINDS = ("gelu_tanh", "gelu", "silu", "relu", "relu2", "tanh")
# attention modules that call transformers' AttentionInterface (attrax's LRP attention runs)
_ATTENTION = frozenset(
    {
        "GPT2Attention",
        "LlamaAttention",
        "Qwen2Attention",
        "MistralAttention",
        "GemmaAttention",
        "Gemma2Attention",  # tanh-capped scores: the identity rule (``_soft_cap``)
        "VaultGemmaAttention",  # Gemma 2's, without norms after attention and MLP
        "Gemma3Attention",
        "Olmo2Attention",
        "Olmo3Attention",  # OLMo 2's, a sliding window in its local layers (in the mask)
        "OlmoAttention",  # no clip_qkv (refused)
        "Starcoder2Attention",  # biases on every projection
        "StableLmAttention",  # rotary on a share of each head; per-head LayerNorms (children)
        "PhiAttention",  # rotary on a share of each head; no q/k LayerNorm (a child if any)
        "GPTJAttention",  # rotary on interleaved pairs of a share of each head
        "CodeGenAttention",  # GPT-J's, its queries, values and keys in shards of one Linear
        "GPTBigCodeAttention",  # one fused Linear, multi-query keys and values (repeated)
        "CohereAttention",  # rotary on interleaved pairs; no query/key norms (children if any)
        "Cohere2Attention",  # Cohere's, RoPE and a window in its local layers only
        "Ministral3Attention",  # queries scaled by a constant of their position after RoPE
        "Ernie4_5_MoeAttention",  # ERNIE 4.5's: RoPE on interleaved pairs (constants)
        "HunYuanMoEV1Attention",  # HunYuan's: query and key norms after RoPE (patched)
        "FalconAttention",  # one fused projection (three layouts), rotary or ALiBi (a constant)
        "BloomAttention",  # run by attrax: ALiBi in the mask (a constant), the residual added
        "Phi3Attention",  # a fused q/k/v projection (a Linear), split by reshapes
        "Qwen3Attention",  # its query and key norms are Qwen3RMSNorm children (patched)
        "SmolLM3Attention",  # RoPE skipped in some layers (NoPE): nothing to give a rule
        "GraniteAttention",  # its `attention_multiplier` is the scores' scaling
        "CwmAttention",  # Llama's, a sliding window in some layers (in the mask)
        "Ernie4_5Attention",  # RoPE on interleaved pairs (constants)
        "HunYuanDenseV1Attention",  # query and key norms (children, patched) after RoPE
        "GlmAttention",  # RoPE on interleaved pairs of half of each head (constants)
        "Glm4Attention",
        "Exaone4Attention",  # query and key norms (children), RoPE in its local layers only
        "ArceeAttention",
        "NemotronAttention",  # RoPE on a share of each head (constants)
        "HeliumAttention",  # RoPE on interleaved pairs (constants)
        "SeedOssAttention",  # Llama's with biased q/k/v (and o) projections
        "GPTNeoXAttention",  # fused per head, rotary on a part of each head (constants)
        "PersimmonAttention",  # GPT-NeoX's, with per-head query and key LayerNorms (children)
        "OPTAttention",  # the query scaled before the call (a constant factor)
        "BioGptAttention",
        "BertSelfAttention",
        "RobertaSelfAttention",
        "XLMRobertaSelfAttention",
        "CamembertSelfAttention",
        "ModernBertAttention",  # fused Wqkv split by views, rotary tables, local windows: masks
        "MixtralAttention",
        "Qwen2MoeAttention",
        "Qwen3MoeAttention",  # its query and key norms are Qwen3MoeRMSNorm children (patched)
        "OlmoeAttention",  # query and key norms over all heads (patched); no clip_qkv
        "GraniteMoeAttention",
        "GptOssAttention",  # attention sinks (`s_aux`): a constant column in the softmax
        # multi-head latent attention: queries and the shared key-value latent through RMSNorms
        # (children, patched), keys and values expanded from the latent by a Linear
        "DeepseekV2Attention",  # RoPE as complex products (constants)
        "DeepseekV3Attention",
        "DeepseekV32Attention",  # the keys its indexer picks: in the mask (`selected_keys`)
        "Glm4MoeLiteAttention",
        "YoutuAttention",
        "GlmMoeDsaAttention",  # V3.2's, some layers reusing the previous indexer's picks
        # RoPE as complex products, queries scaled per position in NoPE layers (constants),
        # query and key norms (children, patched), chunked local layers (in the mask)
        "Llama4TextAttention",
        # query, key and value norms (children, patched; the value's without weight), keys
        # as values in some global layers, keys and values shared by later layers, unscaled
        "Gemma4TextAttention",
        "ElectraSelfAttention",
        "DistilBertSelfAttention",  # its output projection `out_lin` is a child Linear
        "DisentangledSelfAttention",  # DeBERTa-v2's, run by attrax (:mod:`attrax._routed`)
        "GPTNeoSelfAttention",  # run by attrax: unscaled scores, its causal band in the mask
        "MarianAttention",
        "BartAttention",
        "M2M100Attention",
        "MBartAttention",
        "PegasusAttention",
        "T5Attention",  # unscaled scores plus a relative position bias (a constant)
        "MT5Attention",
    }
)
# modules whose own computation is linear (their children get the rules): projections,
# embeddings, dropout (eval), containers, rotary tables (constants), and the model, block and
# residual classes of the supported architectures (sums and reshapes)
_LINEAR = frozenset(
    {
        "Linear",
        "Conv1D",
        "Embedding",
        "Dropout",
        "ModuleList",
        "ModuleDict",
        "Identity",
        "BartScaledWordEmbedding",
        "GemmaTextScaledWordEmbedding",
        "Gemma2TextScaledWordEmbedding",
        "VaultGemmaTextScaledWordEmbedding",
        "Gemma3TextScaledWordEmbedding",
        "Gemma3RotaryEmbedding",  # local and global tables: constants
        "MixtralSparseMoeBlock",  # its router and experts (patched), reshapes
        "Qwen3MoeSparseMoeBlock",
        "OlmoeSparseMoeBlock",
        "GraniteMoeMoE",
        "GptOssMLP",  # its router and experts (patched), reshapes
        "DeepseekV2Moe",  # its router and experts (patched) plus its shared experts (patched)
        "DeepseekV3MoE",
        "DeepseekV32MoE",
        "Glm4MoeLiteMoE",
        "GlmMoeDsaMoE",
        "Llama4TextMoe",  # its routing weights (patched) scale the experts' input: constants
        "Glm4MoeMoE",
        "MiniMaxM2SparseMoeBlock",
        "Ernie4_5_MoeSparseMoeBlock",
        "Ernie4_5_MoeStatics",  # its router's score correction: the routing is a constant
        "HunYuanMoEV1Moe",
        # GLM-4.5: biased q/k/v, RoPE on part of each head, optional per-head q/k norms
        "Glm4MoeAttention",
        "MiniMaxM2Attention",  # RoPE on part of each head, q/k norms over all heads (patched)
        "Llama4ForCausalLM",  # a Llama4TextModel and the LM head
        # DeepSeek V3.2's (and GLM-5's) choice of each query's keys: integer indices, computed
        # without gradients (a constant, as a mask)
        "DeepseekV32Indexer",
        "GlmMoeDsaIndexer",
        "ArceeMLP",  # down(act(up(x))): its activation (relu ** 2) a child module
        "NemotronMLP",  # the same
        "Gemma3DecoderLayer",  # norms after attention and MLP (patched), then residual sums
        # Gemma 4: the per-layer inputs, a projection of the embeddings (normed, patched) plus
        # a table looked up by token id (a constant), summed and scaled; rotary tables
        "Gemma4TextModel",
        "Gemma4ForCausalLM",
        "Gemma4TextScaledWordEmbedding",
        "Gemma4TextRotaryEmbedding",
        "Gemma3TextModel",
        "Gemma3ForCausalLM",
        "Gemma3ForSequenceClassification",
        "Gemma3TextForSequenceClassification",
        "BartLearnedPositionalEmbedding",
        "MarianSinusoidalPositionalEmbedding",
        "M2M100ScaledWordEmbedding",
        "MBartScaledWordEmbedding",
        "MBartLearnedPositionalEmbedding",
        # positions: constants (M2M100's count the non-pad tokens)
        "M2M100SinusoidalPositionalEmbedding",
        "PegasusSinusoidalPositionalEmbedding",
        # GPT-Neo, GPT-BigCode: GPT-2's blocks in Linear layers; BLOOM's MLP adds the residual
        # stream to its output (a sum), its GELU is a module
        *(
            f"{family}{part}"
            for family in ("GPTNeo", "GPTBigCode", "Bloom")
            for part in (
                "Attention",  # GPT-Neo's: a wrapper around GPTNeoSelfAttention
                "MLP",
                "Block",
                "Model",
                "ForCausalLM",
                "ForSequenceClassification",
                "ForTokenClassification",
            )
        ),
        # Falcon: parallel (one or two LayerNorms) or sequential blocks; its Linear subclass
        "FalconLinear",
        *(
            f"Falcon{part}"
            for part in (
                "RotaryEmbedding",
                "MLP",
                "DecoderLayer",
                "Model",
                "ForCausalLM",
                "ForSequenceClassification",
                "ForTokenClassification",
            )
        ),
        "GPT2MLP",
        "GPT2Block",
        "GPT2Model",
        "GPT2LMHeadModel",
        "GPT2ForSequenceClassification",
        "GPT2ForTokenClassification",
        *(
            f"{family}{part}"
            for family in (
                "Llama",
                "Qwen2",
                "Qwen3",
                "Mistral",
                "Gemma",
                "Phi3",
                "SmolLM3",
                "Olmo2",
                "Olmo3",  # a RoPE table per layer type (constants)
                "Olmo",  # LayerNorms without weights (patched)
                "Starcoder2",  # LayerNorms (patched), a plain GELU MLP
                "Cohere",  # parallel attention and MLP, its logits scaled (a constant)
                "Cohere2",  # Cohere's, RoPE in its local layers only
                "Ministral3",
                "Ernie4_5_Moe",
                "HunYuanMoEV1",
                "StableLm",  # LayerNorms (patched), parallel or sequential residuals
                "Gemma2",
                "VaultGemma",
                "Granite",  # constant factors on the embeddings, each block's output, the logits
                "Cwm",
                "SeedOss",
                "Ernie4_5",
                "Helium",
                "HunYuanDenseV1",
                "Glm",
                "Glm4",  # norms after attention and MLP (patched), then residual sums
                "Exaone4",
                "Arcee",
                "Nemotron",
                "Mixtral",
                "Qwen2Moe",
                "Qwen3Moe",
                "Olmoe",
                "GraniteMoe",
                "GptOss",
                *_DEEPSEEK_KIN,
                "Llama4Text",  # its RotaryEmbedding, DecoderLayer and Model
                "MiniMaxM2",
            )
            for part in (
                "RotaryEmbedding",
                "DecoderLayer",
                "Model",
                "ForCausalLM",
                "ForSequenceClassification",
                "ForTokenClassification",
            )
        ),
        "Starcoder2MLP",  # c_fc, its activation (a child module), c_proj
        "StableLmLayerNormPerHead",  # splits the heads, each its LayerNorm (patched), joins them
        # GPT-J, CodeGen and Phi (1, 2): attention and MLP in parallel on one LayerNorm, both
        # added to the stream
        *(
            f"{family}{part}"
            for family in ("GPTJ", "CodeGen", "Phi")
            for part in (
                "RotaryEmbedding",
                "MLP",
                "Block",  # GPT-J's
                "DecoderLayer",  # Phi's
                "Model",
                "ForCausalLM",
                "ForSequenceClassification",
                "ForTokenClassification",
            )
        ),
        # Persimmon: GPT-NeoX's sequential block, its MLP's activation (relu ** 2) a child module
        *(
            f"Persimmon{part}"
            for part in ("RotaryEmbedding", "DecoderLayer", "MLP", "Model", "ForCausalLM")
        ),
        "PersimmonForSequenceClassification",
        "PersimmonForTokenClassification",
        # GPT-NeoX (Pythia): its parallel residual adds both branches to the input (a sum)
        *(
            f"GPTNeoX{part}"
            for part in (
                "RotaryEmbedding",
                "Layer",
                "MLP",
                "Model",
                "ForCausalLM",
                "ForSequenceClassification",
                "ForTokenClassification",
            )
        ),
        # OPT: positions are an Embedding's rows (offset 2), project_in/out Linears
        *(
            f"OPT{part}"
            for part in (
                "LearnedPositionalEmbedding",
                "Decoder",
                "DecoderLayer",
                "Model",
                "ForCausalLM",
                "ForSequenceClassification",
            )
        ),
        # BioGPT: OPT's pre-LN blocks, scaled token embeddings, learned positions (constants)
        *(
            f"BioGpt{part}"
            for part in (
                "ScaledWordEmbedding",
                "LearnedPositionalEmbedding",
                "DecoderLayer",
                "Model",
                "ForCausalLM",
                "ForSequenceClassification",
                "ForTokenClassification",
            )
        ),
        # BERT and the encoders whose blocks are BERT's computation (RoBERTa, XLM-R and CamemBERT
        # differ in their position ids, ELECTRA in an embedding projection: constants, a Linear;
        # DeBERTa-v2's embeddings multiply by the 0/1 mask, its encoder normalises the relative
        # positions' embeddings: constants)
        *(
            f"{family}{part}"
            for family in ("Bert", "Roberta", "XLMRoberta", "Camembert", "Electra", "DebertaV2")
            for part in (
                "Embeddings",
                "Encoder",
                "Layer",
                "Attention",
                "SelfOutput",
                "Intermediate",
                "Output",
                "Model",
                "ForSequenceClassification",
                "ForTokenClassification",
                "ForQuestionAnswering",  # a Linear's start and end logits
                "ForMaskedLM",  # dense, activation (a module), LayerNorm, decoder
            )
        ),
        "BertOnlyMLMHead",
        "BertLMPredictionHead",
        "BertPredictionHeadTransform",
        "ElectraGeneratorPredictions",  # the same head, into ELECTRA's embedding width
        "LegacyDebertaV2OnlyMLMHead",
        "LegacyDebertaV2LMPredictionHead",
        "LegacyDebertaV2PredictionHeadTransform",
        "DebertaV2OnlyMLMHead",  # the newer head: the word embeddings' transpose as decoder
        "DebertaV2LMPredictionHead",
        "CrossEntropyLoss",  # DistilBERT's training loss, never run without labels
        "BertPooler",  # tanh as an nn.Tanh child, as RoBERTa's and XLM-R's
        "RobertaPooler",
        "XLMRobertaPooler",
        "CamembertPooler",
        # ModernBERT: pre-norm blocks, a final norm, then a dense-activation-norm head and the
        # classifier (its pooling, the first token's or the mean, is linear)
        *(
            f"ModernBert{part}"
            for part in (
                "Embeddings",
                "RotaryEmbedding",
                "EncoderLayer",
                "Model",
                "PredictionHead",
                "ForSequenceClassification",
                "ForTokenClassification",
                "ForQuestionAnswering",
                "ForMaskedLM",
            )
        ),
        "ElectraClassificationHead",  # its GELU is a child module (get_activation("gelu"))
        "DistilBertModel",
        "DistilBertForTokenClassification",
        "DistilBertForQuestionAnswering",
        "DistilBertForMaskedLM",
        # the post-norm Marian and BART, the pre-norm M2M100 (NLLB), mBART and Pegasus: norms
        # (patched), attention, residual sums
        *(
            f"{family}{part}"
            for family in ("Marian", "Bart", "M2M100", "MBart", "Pegasus")
            for part in ("Encoder", "Decoder", "EncoderLayer", "DecoderLayer", "Model")
        ),
        "MarianMTModel",
        *(f"{family}ForConditionalGeneration" for family in ("Bart", "M2M100", "MBart", "Pegasus")),
        # BART-MNLI's head and T5's: their forwards never run (attrax pools the last EOS
        # itself); T5's body is its two stacks. The question-answering heads: a Linear's start
        # and end logits at every decoder position
        *(
            f"{family}{part}"
            for family in ("Bart", "MBart", "T5", "MT5")
            for part in ("ForSequenceClassification", "ForQuestionAnswering", "Model")
        ),
        # T5 and mT5: RMSNorm sub-layers (patched) with residual sums, the decoder's output scaled
        # by a constant for tied embeddings; a float16 block clamps only at float16's overflow
        *(
            f"{family}{part}"
            for family in ("T5", "MT5")
            for part in (
                "LayerSelfAttention",
                "LayerCrossAttention",
                "LayerFF",
                "DenseActDense",  # wi, its activation (a child module), wo
                "Block",
                "Stack",
                "ForConditionalGeneration",
            )
        ),
    }
)
# attributes through which the allowed modules call their activation (BERT's
# `intermediate_act_fn`, ELECTRA's head and DistilBERT's FFN `activation`, GPT-2's and
# GPT-NeoX's `act`, gated MLPs' `act_fn`, OPT's and Phi-3's `activation_fn`): each must be a
# module, which the walk then checks
_ACTIVATION_SLOTS = ("intermediate_act_fn", "activation", "act", "act_fn", "activation_fn")
# modules with generic class names, allowed by qualified name only (module.qualname)
_QUALIFIED = frozenset(
    f"transformers.models.distilbert.modeling_distilbert.{name}"
    for name in ("Embeddings", "Transformer", "TransformerBlock", "FFN")
)
# modules whose own computation calls a nonlinearity functionally whose gradient IS its LRP
# rule: DistilBERT's sequence head runs `nn.ReLU()(x)` inline (not a child module), and
# relu(x) = x relu'(x), so ReLU's gradient is its identity rule exactly
_GRADIENT_IS_RULE = frozenset({"DistilBertForSequenceClassification"})
#: model types whose modules the tables above cover
ARCHITECTURES = (
    "gpt2",
    "gpt_neo",
    "gpt_bigcode",
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "gemma",
    "gemma2",
    "vaultgemma",
    "gemma3_text",
    "olmo2",
    "olmo3",
    "olmo",
    "starcoder2",
    "stablelm",
    "phi",
    "gptj",
    "codegen",
    "cohere",
    "cohere2",
    "ministral3",
    "ernie4_5_moe",
    "hunyuan_v1_moe",
    "falcon",
    "bloom",
    "phi3",
    "smollm3",
    "granite",
    "cwm",
    "seed_oss",
    "ernie4_5",
    "helium",
    "hunyuan_v1_dense",
    "glm",
    "glm4",
    "exaone4",
    "arcee",
    "nemotron",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "granitemoe",
    "gpt_oss",
    "deepseek_v2",
    "deepseek_v3",
    "deepseek_v32",
    "glm4_moe_lite",
    "youtu",
    "glm_moe_dsa",
    "llama4_text",
    "gemma4_text",
    "glm4_moe",
    "minimax_m2",
    "gpt_neox",
    "persimmon",
    "opt",
    "biogpt",
    "bert",
    "roberta",
    "xlm-roberta",
    "camembert",
    "modernbert",
    "electra",
    "distilbert",
    "deberta-v2",
    "marian",
    "bart",
    "m2m_100",
    "mbart",
    "pegasus",
    "t5",
    "mt5",
)


def _plan(hf: PreTrainedModel) -> list[tuple[torch.nn.Module, _Forward]]:
    """The modules to patch, after checking every module of ``hf`` has an LRP rule.

    Raises :class:`ModelError` naming the first module attrax has no rule for.
    """
    config = hf.config
    name = type(hf).__name__
    relative = getattr(config, "position_embedding_type", "absolute") not in ("absolute", None)
    # transformers 5's BERT ignores the field: the scores take them only where a module holds
    # their table (its distance_embedding)
    if relative and any(hasattr(m, "distance_embedding") for m in hf.modules()):
        raise ModelError(
            f"lrp: {name} uses {config.position_embedding_type!r} position embeddings in its "
            "attention scores; attrax's LRP attention has no rule for them"
        )
    if not can_switch(hf) and not _routed.modules(hf):
        raise ModelError(
            f"lrp: {name} does not route attention through transformers' AttentionInterface, "
            "so attrax cannot install its LRP attention"
        )
    if getattr(config, "clip_qkv", None) is not None:  # OLMoE's clamp, in place in its forward
        raise ModelError(
            f"lrp: {name} clips its queries, keys and values (clip_qkv={config.clip_qkv}); "
            "attrax has no LRP rule for that clamp"
        )
    patches: list[tuple[torch.nn.Module, _Forward]] = []
    unknown: dict[str, str] = {}  # module type -> where it first occurs
    for path, module in hf.named_modules():
        kind = type(module).__name__
        if kind in _PATCHED:
            if kind == "LayerNorm" and not isinstance(module, torch.nn.LayerNorm):
                unknown.setdefault(kind, path)
            if kind == "Gemma4TextDecoderLayer" and module.hidden_size_per_layer_input:
                patches.append((module.per_layer_input_gate, _per_layer_gate))
            if kind == "ContextPooler":
                _pooler_activation(module)  # refused before the forward, not inside it
            patches.append((module, _PATCHED[kind]))
        elif activation_kind(module) is not None:  # its own `act` may well be a function
            if activation_kind(module) not in IDENTITY_KINDS:
                unknown.setdefault(kind, path)
            continue
        elif not (
            kind in _ATTENTION
            or kind in _LINEAR
            or kind in _GRADIENT_IS_RULE
            or f"{type(module).__module__}.{type(module).__qualname__}" in _QUALIFIED
        ):
            unknown.setdefault(kind, path or "(the model)")
            continue
        for slot in _ACTIVATION_SLOTS:  # a function there runs unseen by the walk
            act = getattr(module, slot, None)
            if callable(act) and not isinstance(act, torch.nn.Module):
                raise ModelError(
                    f"lrp: `{path}.{slot}` of {name} is a Python function ({act!r}), not an "
                    "activation module: attrax cannot give it an LRP rule"
                )
    if unknown:
        shown = ", ".join(f"{kind} (`{path}`)" for kind, path in list(unknown.items())[:6])
        more = f" and {len(unknown) - 6} more" if len(unknown) > 6 else ""
        raise ModelError(
            f"lrp: attrax has no LRP rule for the modules {shown}{more} of {name}; supported "
            f"architectures: {', '.join(ARCHITECTURES)}"
        )
    return patches


@contextlib.contextmanager
def lrp_rules(model: Model, rule: str) -> Iterator[None]:
    """Forwards of ``model`` run inside compute the same values with LRP ``rule``'s backward.

    The rule is fixed at forward time and kept by autograd, so backwards (and vmapped
    backwards) run later still use it.
    """
    patches = _plan(model.hf)
    token = _ACTIVE.set(rule)
    original = Model.attention_as

    def attention_as(implementation: str, required: bool = False) -> Any:
        # whatever attrax would run (eager, SDPA, eager for jvp), LRP runs its own attention
        return original(model, IMPLEMENTATION, required=True)

    replaced = [
        (model, "attention_as", attention_as),
        # Gemma 2's logits: cap * tanh(z / cap), through which the identity rule passes relevance
        (model, "soft_cap", _soft_cap),
        # the memory planner then counts the [heads, L, L] weights this attention keeps
        (model, "attention_for", lambda tokens, device: "eager"),
        *((module, "forward", functools.partial(forward, module)) for module, forward in patches),
    ]
    try:
        with instance_attributes(replaced), backward_rule("identity", IDENTITY_KINDS):
            yield
    finally:
        _ACTIVE.reset(token)


def _run(core: Callable[..., Rule], call: Call, arguments: dict[str, Any]) -> xr.DataArray:
    with lrp_rules(call.model, arguments["rule"]):
        return GRADIENT.run(core, call, arguments)


#: LRP: the gradient family's options, run inside :func:`lrp_rules`, explaining the logit
LRP = GRADIENT.derive(
    _run,
    objective=Param(
        "logit",
        COMMON["objective"].annotation,
        COMMON["objective"].check,
        "'logit' (default: LRP explains a logit), 'probability', 'logprob' or a callable",
    ),
)


@LRP.method(rule=check.one_of(*RULES))
def lrp(problem: Problem, *, rule: str = "attnlrp") -> Rule:
    """Layer-wise relevance propagation: AttnLRP (Achtibat et al. 2024) or CP-LRP (Ali et al.
    2022), every target from one forward and one vectorized backward.

    Relevance of source token ``s``, hidden unit ``h`` for target ``k``: the embedding times the
    gradient of target ``k``'s objective taken through the LRP rules (identity rule for
    activations, norms' scale constant, uniform rule for products of two activations, the
    softmax per AttnLRP or held constant for CP-LRP; see docs/methods/propagation.md).

    Arguments as :func:`saliency` (no ``abs``), plus:
        rule: ``"attnlrp"`` (default) or ``"cp-lrp"``.
        objective: default ``"logit"``: LRP explains a logit (a classifier's class logit).

    Returns:
        DataArray ``(target, source, hidden)`` (``example`` first for a list of inputs). Summed
        over sources and hidden it is the logit minus what biases, position embeddings and (for
        AttnLRP) the softmaxes absorb.

    Raises:
        ModelError: the model has a module attrax has no LRP rule for (named in the message).

    >>> import attrax as ax
    >>> da = ax.lrp(ax.load_model(), "1 2 3 =", " 3 2 1")
    >>> da.dims, da.attrs["method"], da.attrs["objective"]
    (('target', 'source', 'hidden'), 'lrp', 'logit')
    """
    return Rule(multiplier=problem.inputs)


__all__ = ["ARCHITECTURES", "IMPLEMENTATION", "RULES", "lrp", "lrp_rules"]
