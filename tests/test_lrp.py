"""ax.lrp (AttnLRP, CP-LRP) against an explicit layer-by-layer LRP written here, and its axioms.

The reference propagates relevance *messages* (``R_in_j = sum_i x_j w_ij R_out_i / z_i`` and the
papers' rules written out per layer), one target at a time: nothing of attrax's
gradient-times-input formulation or its detach tricks.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
import transformers

import attrax as ax
from attrax._lrp import lrp_rules
from attrax._model import reading
from attrax.testing import tiny_classifier, tiny_model
from tests.test_architectures import GRANITE, _family
from tests.test_components import _bloom, _falcon, gain, gpt_bigcode, output_norms, vary

PROMPT, TARGET = "The capital of France", " is Paris."


def _double(hf, tok, zero_biases: bool = False) -> ax.Model:
    hf = hf.double()
    if zero_biases:
        with torch.no_grad():
            for name, parameter in hf.named_parameters():
                constant = ("position", "wpe", "token_type", "final_logits_bias")
                if name.endswith("bias") or any(part in name for part in constant):
                    parameter.zero_()
            for name, buffer in hf.named_buffers():  # M2M100's and Pegasus' sinusoid tables too
                if name.endswith("final_logits_bias") or "embed_positions" in name:
                    buffer.zero_()
    return ax.load_model(hf, tokenizer=tok)


# the explicit reference: a 2-layer Llama, relevance messages layer by layer


def _rms(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight


def _centred(h: torch.Tensor, eps: float) -> torch.Tensor:
    """OLMo's LayerNorm: centred and divided by the standard deviation, no weight, no bias."""
    c = h - h.mean(-1, keepdim=True)
    return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)


def _centred_messages(
    h: torch.Tensor, relevance: torch.Tensor, y: torch.Tensor, eps: float
) -> torch.Tensor:
    """LRP-0 through :func:`_centred` with ``1 / std`` a constant: ``R_j = h_j c (R_j / y_j -
    mean_i R_i / y_i)``, the centring's share of each output spread over the inputs."""
    c = torch.rsqrt(h.var(-1, unbiased=False, keepdim=True) + eps)
    ratio = relevance / y
    return h * c * (ratio - ratio.mean(-1, keepdim=True))


def _linear_messages(
    x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """LRP-0 through ``z = x @ weight.T`` (no bias): ``R_j = x_j sum_i w_ij R_i / z_i``."""
    return x * ((relevance / z) @ weight)


def _rotations(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as one matrix per position ``[T, d, d]``: ``q' = M q`` (HF's rotate_half)."""
    t, d = cos.shape
    half = d // 2
    m = torch.zeros(t, d, d, dtype=cos.dtype)
    idx = torch.arange(d)
    m[:, idx, idx] = cos
    m[:, idx[:half], idx[:half] + half] = -sin[:, :half]
    m[:, idx[half:], idx[half:] - half] = sin[:, half:]
    return m


def _attention_messages(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    a: torch.Tensor,
    o: torch.Tensor,
    r_o: torch.Tensor,
    scale: float,
    rule: str,
    capped: torch.Tensor | None = None,
    split=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Relevance of ``q, k, v`` ``[T, heads, d]`` from that of ``o[i] = sum_j a[i, j] v[j]``
    (``s`` the masked scores ``[heads, T, T]``, ``a`` their softmax), and what the softmax
    absorbs. Causal masking: ``s`` is ``-inf`` above the diagonal. ``capped``: Gemma 2's
    ``c * tanh(s / c)``, the softmax's input, through which the identity rule passes the
    relevance on to ``s`` unchanged. ``split(q, k, s, r_s)``: the relevance of ``q`` and ``k``
    from the scores' where they are more than ``q . k`` (DeBERTa-v2's relative terms)."""
    causal = torch.isfinite(s)
    # o[i,h,:] = sum_j a[h,i,j] v[j,h,:]: each term's share of R
    terms = torch.einsum("hij,jhd->ihjd", a, v)
    share = terms / o[:, :, None, :] * r_o[:, :, None, :]
    if rule == "cp-lrp":  # attention weights are constants: everything to v
        zero = torch.zeros_like(q)
        return zero, torch.zeros_like(k), share.sum(0).permute(1, 0, 2), 0.0
    r_a = 0.5 * share.sum(-1).permute(1, 0, 2)  # [h, i, j]
    r_v = 0.5 * share.sum(0).permute(1, 0, 2)  # [j, h, d]
    # softmax rule (AttnLRP, Prop. 3.1): R_S = S (R_A - A sum_j R_A)
    x = s if capped is None else capped  # the softmax's input
    r_s = torch.where(causal, x * (r_a - a * r_a.sum(-1, keepdim=True)), 0.0)
    absorbed = float(r_a.sum() - r_s.sum())
    if split is not None:
        return (*split(q, k, s, r_s), r_v, absorbed)
    # s[h,i,j] = scale * sum_d q[i,h,d] k[j,h,d]: uniform rule
    tq = torch.einsum("ihd,jhd->hijd", q, k) * scale
    part = torch.where(causal[..., None], tq / s[..., None] * r_s[..., None], 0.0)
    r_q = 0.5 * part.sum(2).permute(1, 0, 2)  # [i, h, d]
    r_k = 0.5 * part.sum(1).permute(1, 0, 2)  # [j, h, d]
    return r_q, r_k, r_v, absorbed


def _query_key_value(att, queries: int, keys: int) -> list[tuple]:
    """(weight, bias) of the query, key and value projections: three, or Phi-3's one fused
    ``qkv_proj`` cut in three (``queries`` rows, then ``keys`` and ``keys``)."""
    if hasattr(att, "qkv_proj"):
        return [(w, None) for w in att.qkv_proj.weight.split([queries, keys, keys])]
    return [(p.weight, p.bias) for p in (att.q_proj, att.k_proj, att.v_proj)]


def _gate_up(mlp) -> tuple:
    """(gate weight, up weight, activation) of a gated MLP: two projections, or Phi-3's fused
    ``gate_up_proj`` (gate rows first)."""
    if hasattr(mlp, "gate_up_proj"):
        return (*mlp.gate_up_proj.weight.chunk(2), mlp.activation_fn)
    act = getattr(mlp, "act_fn", None) or mlp.activation_fn  # Llama 4's `activation_fn`
    return mlp.gate_proj.weight, mlp.up_proj.weight, act


def _mlp_of(layer):
    """A block's MLP: `mlp`, Granite MoE's `block_sparse_moe` or Llama 4's `feed_forward`."""
    return next(
        getattr(layer, n) for n in ("mlp", "block_sparse_moe", "feed_forward") if hasattr(layer, n)
    )


@torch.no_grad()
def _gated_forward(n: torch.Tensor, w_gate, w_up, w_down, act) -> tuple[torch.Tensor, tuple]:
    """``act(n W_g^T) * (n W_u^T)`` then ``W_d``: a gated MLP (SiLU; Gemma: tanh-GELU)."""
    g, u = n @ w_gate.T, n @ w_up.T
    z = act(g) * u
    y = z @ w_down.T
    return y, (n, w_gate, w_up, w_down, g, u, z, y)


def _gated_backward(saved: tuple, r_y: torch.Tensor, rule: str) -> torch.Tensor:
    n, w_gate, w_up, w_down, g, u, z, y = saved
    r_z = _linear_messages(z, w_down, r_y, y)
    if rule == "attnlrp":  # uniform rule on act(g) * u, identity rule on act
        r_g, r_u = r_z / 2, r_z / 2
    else:  # CP-LRP: the gate is a constant, all to u
        r_g, r_u = torch.zeros_like(r_z), r_z
    return _linear_messages(n, w_gate, r_g, g) + _linear_messages(n, w_up, r_u, u)


@torch.no_grad()
def _gpt_oss_forward(experts, e: int, n: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """GPT-OSS's expert ``e``: gate and up interleaved in one biased projection, ``p = (clamp(up)
    + 1) * g * sigmoid(alpha * g)`` with ``g = clamp(gate)``, then a biased down projection."""
    w, b = experts.gate_up_proj[e], experts.gate_up_proj_bias[e]  # [H, 2I]: n @ w
    z = n @ w + b
    g = z[..., 0::2].clamp(max=experts.limit)
    u = z[..., 1::2].clamp(min=-experts.limit, max=experts.limit)
    glu = g * torch.sigmoid(experts.alpha * g)
    p = (u + 1) * glu
    y = p @ experts.down_proj[e] + experts.down_proj_bias[e]
    return y, ("gpt_oss", experts, e, n, z, u, glu, p, y)


def _gpt_oss_backward(saved: tuple, r_y: torch.Tensor, rule: str) -> torch.Tensor:
    """Relevance of the expert's input: LRP-0 through the projections (biases keep their
    shares), the uniform rule on ``(u + 1) * glu`` (CP-LRP: the GLU a constant), the ``+ 1``
    keeping its share of ``u + 1``, the identity rule through the clamps and the GLU."""
    _, experts, e, n, z, u, glu, p, y = saved
    # the relevance per unit of p, R_p / p, then of u + 1: (R_p / p) * glu times its share
    per_p = (r_y / y) @ experts.down_proj[e].T
    share = 0.5 if rule == "attnlrp" else 1.0  # the uniform rule, or the GLU a constant
    r_glu = (1 - share) * p * per_p
    r_u = u * share * glu * per_p  # LRP-0 through u + 1: the 1 keeps its share
    r_z = torch.empty_like(z)
    r_z[..., 0::2], r_z[..., 1::2] = r_glu, r_u
    return n * ((r_z / z) @ experts.gate_up_proj[e].T)


def _mlp_forward(mlp, n2: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """A gated MLP, or a mixture of experts: ``sum_k w_k E_k(x)`` over each token's chosen
    experts, their weights from the model's own router (constants for the rules), plus Qwen2-MoE's
    shared expert scaled by its sigmoid gate (a constant too)."""
    if hasattr(mlp, "c_fc"):  # StarCoder2: c_proj(act(c_fc(x))), biases keep their shares
        f = mlp.c_fc(n2)
        g = mlp.act(f)
        return mlp.c_proj(g), ("plain", (n2, f, g, mlp.c_proj(g)))
    if not hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj"):  # Arcee: no gate, relu ** 2
        f = mlp.up_proj(n2)
        g = torch.relu(f) ** 2
        return mlp.down_proj(g), ("ungated", (n2, f, g, mlp.down_proj(g)))
    experts = getattr(mlp, "experts", None)
    if experts is None:
        w_gate, w_up, act = _gate_up(mlp)
        out, dense = _gated_forward(n2, w_gate, w_up, mlp.down_proj.weight, act)
        return out, ("dense", dense)
    out, terms = torch.zeros_like(n2), []
    if hasattr(experts, "expert_dim"):  # Llama 4: the routing weight scales an expert's input
        scores, _ = mlp.router(n2)  # [T, experts]: a sigmoid of each chosen logit, 0 elsewhere
        width = experts.expert_dim
        for i, e in scores.nonzero().tolist():  # every token's chosen experts, one by one
            w_gate_up, w_down = experts.gate_up_proj[e], experts.down_proj[e]  # x @ W
            w_gate, w_up = w_gate_up[:, :width].T, w_gate_up[:, width:].T
            y, inner = _gated_forward(scores[i, e] * n2[i], w_gate, w_up, w_down.T, experts.act_fn)
            terms.append((i, y, inner))
            out[i] += y
        weights = index = torch.zeros(n2.shape[0], 0)  # no more experts below
    else:
        router = getattr(mlp, "gate", None) or mlp.router  # Granite MoE: `router`
        # MiniMax M2's router also takes its experts' score correction
        correction = getattr(mlp, "e_score_correction_bias", None)
        _, weights, index = router(n2) if correction is None else router(n2, correction)
    for i in range(n2.shape[0]):  # every token's chosen experts, one by one
        for slot in range(index.shape[1]):
            e = int(index[i, slot])
            if hasattr(experts, "alpha"):  # GPT-OSS's clamped SwiGLU
                y, inner = _gpt_oss_forward(experts, e, n2[i])
            else:
                w_gate, w_up = experts.gate_up_proj[e].chunk(2)
                y, inner = _gated_forward(n2[i], w_gate, w_up, experts.down_proj[e], experts.act_fn)
            terms.append((i, weights[i, slot] * y, inner))
            out[i] += weights[i, slot] * y
    # DeepSeek's, ERNIE 4.5's shared experts, HunYuan's shared MLP: every token, no gate
    shared = getattr(mlp, "shared_experts", None) or getattr(mlp, "shared_mlp", None)
    if shared is not None:
        w_gate, w_up, act = _gate_up(shared)
        y, inner = _gated_forward(n2, w_gate, w_up, shared.down_proj.weight, act)
        terms.append((None, y, inner))
        out = out + y
    if hasattr(mlp, "shared_expert"):  # Qwen2-MoE's gated, Llama 4's not
        gated = hasattr(mlp, "shared_expert_gate")
        gate = torch.sigmoid(mlp.shared_expert_gate(n2)) if gated else torch.ones(n2.shape[0], 1)
        w_gate, w_up, act = _gate_up(mlp.shared_expert)
        y, inner = _gated_forward(n2, w_gate, w_up, mlp.shared_expert.down_proj.weight, act)
        terms.append((None, gate * y, inner))
        out = out + gate * y
    return out, ("experts", (out, terms))


def _mlp_backward(mlp, saved: tuple, r_out: torch.Tensor, rule: str) -> torch.Tensor:
    """Relevance of the MLP's input: each expert's weighted output takes its share of the sum
    (its weight a constant), then its gated MLP's rules."""
    kind, inner = saved
    if kind == "plain":  # the identity rule through the activation
        n2, f, g, out = inner
        r_g = _linear_messages(g, mlp.c_proj.weight, r_out, out)
        return _linear_messages(n2, mlp.c_fc.weight, r_g, f)
    if kind == "ungated":  # the identity rule through relu(x) ** 2
        n2, f, g, out = inner
        r_g = _linear_messages(g, mlp.down_proj.weight, r_out, out)
        return _linear_messages(n2, mlp.up_proj.weight, r_g, f)
    if kind == "dense":
        return _gated_backward(inner, r_out, rule)
    out, terms = inner
    r_n2 = torch.zeros_like(out)
    for i, term, gated in terms:  # a constant weight passes a term's relevance on to its expert
        if i is None:  # the shared expert, every token
            r_n2 = r_n2 + _gated_backward(gated, term / out * r_out, rule)
        else:
            back = _gpt_oss_backward if gated[0] == "gpt_oss" else _gated_backward
            r_n2[i] += back(gated, term / out[i] * r_out[i], rule)
    return r_n2


# attention classes whose RoPE turns interleaved pairs of dims (GLM's style)
INTERLEAVED = ("Ernie4_5Attention", "HeliumAttention", "GlmAttention", "Glm4Attention")
INTERLEAVED += ("Ernie4_5_MoeAttention",)


def llama_lrp_reference(
    hf, ids: list[int], position: int, target: int, rule: str, head: torch.Tensor | None = None
) -> tuple[np.ndarray, float, float]:
    """Relevance ``[T, H]`` of the token embeddings for the logit of ``target`` read at
    ``position``, the relevance the softmaxes absorb, and the logit. The Llama family: Qwen2's
    query/key/value biases keep their shares, Gemma's norms scale by ``1 + weight``, Phi-3's
    projections are fused, Qwen3 and Gemma 3 normalise each query and key head (RMSNorm, its
    scale a constant: relevance passes through), SmolLM3 skips RoPE in some layers, Gemma 3
    normalises the attention's and the MLP's outputs too, and its sliding-window layers take
    another RoPE table; ``head``: the output projection's rows (default: the LM head's; a
    classifier's ``score``). OLMo's norms are LayerNorms without weights: they centre, so
    relevance passes them by :func:`_centred_messages`."""
    cfg = hf.config
    hidden, heads, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or hidden // heads
    group, eps = heads // kv, getattr(cfg, "rms_norm_eps", 1e-5)  # OLMo: 1e-5 in its forward
    centred = type(hf.model.norm).__name__ == "OlmoLayerNorm"
    layer_norm = isinstance(hf.model.norm, torch.nn.LayerNorm)  # StarCoder2's

    def norm(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        if layer_norm:
            return module(x)
        return _centred(x, eps) if centred else _rms(x, gain(module), eps)

    def back(x: torch.Tensor, module: torch.nn.Module, r: torch.Tensor, y: torch.Tensor):
        """Relevance of a norm's input ``x`` from that of its output ``y``: an RMSNorm (scale
        constant, elementwise) passes it on, a LayerNorm's centring spreads it."""
        if layer_norm:
            return _layer_norm_messages(x, module, r, y)
        return _centred_messages(x, r, y, eps) if centred else r

    t = len(ids)
    x = hf.model.embed_tokens(torch.tensor(ids))  # Gemma's scaled by sqrt(hidden)
    x = x * getattr(cfg, "embedding_multiplier", 1.0)  # Granite
    branch = getattr(cfg, "residual_multiplier", 1.0)  # Granite: what each block adds, scaled
    positions = torch.arange(t)
    saved, h = [], x
    for layer in hf.model.layers:
        att, mlp = layer.self_attn, _mlp_of(layer)
        scale = att.scaling  # Gemma: query_pre_attn_scalar ** -0.5
        # Gemma 3 and OLMo 3: a table per layer type
        kind = getattr(att, "layer_type", None) or getattr(att, "attention_type", None)
        tables = (kind,) if type(att).__name__ in ("Gemma3Attention", "Olmo3Attention") else ()
        table = hf.model.rotary_emb(x[None], positions[None], *tables)
        pairs = isinstance(table, torch.Tensor)  # Llama 4: one complex number per pair of dims
        cos, sin = (table[0].real, table[0].imag) if pairs else table
        if pairs:
            rot = _pair_rotations(sin.double(), cos.double(), d)
        elif hasattr(att, "rotary_ndims"):  # StableLM: RoPE on a share of each head
            rot = _partial_rotations(cos[0].double(), sin[0].double(), d)
        elif type(att).__name__ in INTERLEAVED:
            # dims 2i and 2i + 1 of the first r rotated together by angle i (the first half of
            # the table), the rest passed as they are (GLM rotates half of each head)
            r = cos.shape[-1]
            rot = torch.eye(d, dtype=torch.float64).repeat(t, 1, 1)
            pairs = _pair_rotations(sin[0, :, : r // 2].double(), cos[0, :, : r // 2].double(), r)
            rot[:, :r, :r] = pairs
        elif hasattr(att, "sinks"):  # GPT-OSS: one angle per pair of halves, not repeated
            cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
            rot = _rotations(cos[0].double(), sin[0].double())
        elif cos.shape[-1] < d:  # Nemotron: RoPE on a share of each head
            rot = _partial_rotations(cos[0].double(), sin[0].double(), d)
        else:
            rot = _rotations(cos[0].double(), sin[0].double())
        window = getattr(att, "sliding_window", None) or t
        # EXAONE 4's global layers keep the config's window but use neither it nor RoPE
        nope = window < t and not getattr(att, "is_sliding", True)
        window = t if nope else window
        if nope or not getattr(att, "use_rope", True):  # SmolLM3's NoPE layers too
            rot = torch.eye(d).double().repeat(t, 1, 1)
        causal = (positions[:, None] >= positions) & (positions[:, None] - positions < window)
        if getattr(att, "use_rope", 0) and getattr(cfg, "attention_chunk_size", None):
            # Llama 4's RoPE layers attend within chunks: keys in the query's own chunk only
            chunk = cfg.attention_chunk_size
            causal = causal & (positions[:, None] // chunk == positions // chunk)
        # OLMo 2 normalises no block input, only outputs
        pre = hasattr(layer, "input_layernorm")
        n1 = norm(h, layer.input_layernorm) if pre else h
        projections = _query_key_value(att, heads * d, kv * d)
        q, k, v = (n1 @ w.T + (0 if b is None else b) for w, b in projections)  # Qwen2: biases
        q, k, v = q.view(t, heads, d), k.view(t, kv, d), v.view(t, kv, d)
        qn, kn = q, k
        if getattr(att, "qk_layernorm", False):  # StableLM: a LayerNorm of each head's own
            qn = torch.stack([n(q[:, i]) for i, n in enumerate(att.q_layernorm.norms)], 1)
            kn = torch.stack([n(k[:, i]) for i, n in enumerate(att.k_layernorm.norms)], 1)
        elif hasattr(att, "q_norm") and att.q_norm.weight.shape[0] == d:  # per head: Qwen3
            qn, kn = _rms(q, gain(att.q_norm), eps), _rms(k, gain(att.k_norm), eps)
        elif hasattr(att, "q_norm"):  # OLMo 2: all queries' width at once, all keys'
            qn = _rms(q.reshape(t, -1), att.q_norm.weight, eps).view(t, heads, d)
            kn = _rms(k.reshape(t, -1), att.k_norm.weight, eps).view(t, kv, d)
        qr = torch.einsum("tnm,thm->thn", rot, qn)
        kr = torch.einsum("tnm,thm->thn", rot, kn)
        qs, ks = qr, kr  # what the scores read
        if hasattr(att, "query_layernorm"):  # HunYuan: each head RMS-normed after RoPE
            qs = _rms(qr, att.query_layernorm.weight, eps)
            ks = _rms(kr, att.key_layernorm.weight, eps)
        if hasattr(att, "qk_norm"):  # Llama 4: the same, without weights
            qs, ks = _rms(qr, 1.0, eps), _rms(kr, 1.0, eps)
        if getattr(att, "attn_temperature_tuning", False) and not att.use_rope:
            # Llama 4's NoPE layers: each query scaled by a constant of its position, through
            # which its relevance passes unchanged
            steps = torch.floor((positions.double() + 1) / att.floor_scale)
            qs = qs * (torch.log1p(steps) * att.attn_scale + 1)[:, None, None]
        rope = getattr(cfg, "rope_parameters", None) or {}
        if "llama_4_scaling_beta" in rope:  # Ministral 3: the same after RoPE, in every layer
            steps = torch.floor(positions.double() / rope["original_max_position_embeddings"])
            qs = qs * (1 + rope["llama_4_scaling_beta"] * torch.log1p(steps))[:, None, None]
        kf, vf = ks.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        s = torch.einsum("ihd,jhd->hij", qs, kf) * scale
        cap = getattr(att, "attn_logit_softcapping", None)  # Gemma 2
        # capped before the mask, as Gemma 2 does (tanh(-inf) would let masked keys in)
        capped = (
            None if cap is None else (cap * torch.tanh(s / cap)).masked_fill(~causal, -torch.inf)
        )
        s = s.masked_fill(~causal, -torch.inf)
        a = torch.softmax(s if cap is None else capped, -1)
        sinks = getattr(att, "sinks", None)  # GPT-OSS: one more logit per head, its share dropped
        if sinks is not None:
            a = torch.softmax(torch.cat([s, sinks[:, None, None].expand(-1, t, 1)], -1), -1)
            a = a[..., :-1]
        o = torch.einsum("hij,jhd->ihd", a, vf)
        attn = o.reshape(t, heads * d) @ att.o_proj.weight.T
        if att.o_proj.bias is not None:  # StarCoder2's
            attn = attn + att.o_proj.bias
        # Gemma 3's and OLMo 2's norms on the attention's and the MLP's outputs
        sandwich = output_norms(layer)  # the norms of the attention's and the MLP's outputs
        an = _rms(attn, gain(sandwich[0]), eps) if sandwich else attn
        h1 = h + branch * an
        n2 = h1  # OLMo 2: no norm before the MLP
        if getattr(layer, "use_parallel_residual", False):  # StableLM: the MLP reads n1 too
            n2 = n1
        elif pre:  # Llama's post_attention_layernorm is that norm; Gemma 3 has a norm there too
            before = getattr(layer, "pre_feedforward_layernorm", None)  # VaultGemma: only that
            before = layer.post_attention_layernorm if before is None else before
            n2 = norm(h1, before)
        out, ffn = _mlp_forward(mlp, n2)
        on = _rms(out, gain(sandwich[1]), eps) if sandwich else out
        h2 = h1 + branch * on
        saved.append((
            layer, rot, h, n1, q, k, v, qn, kn, qr, kr, qs, kf, vf, s, capped, a, o, attn, an,
            h1, n2, ffn, on, h2,
        ))  # fmt: skip
        h = h2
    final = norm(h, hf.model.norm)
    head = (hf.lm_head.weight if head is None else head)[target]
    relevance = torch.zeros(t, hidden, dtype=x.dtype)
    head = head / getattr(cfg, "logits_scaling", 1.0)  # Granite divides its logits
    relevance[position] = final[position] * head  # the logit's terms; RMSNorm passes them on
    logit = float(final[position] @ head)
    cap = getattr(hf.config, "final_logit_softcapping", None)  # Gemma 2: c * tanh(z / c)
    if cap:  # the identity rule: the capped logit's relevance, shared as z's terms are
        capped_logit = cap * math.tanh(logit / cap)
        relevance[position] *= capped_logit / logit
        logit = capped_logit
    absorbed = 0.0
    relevance = back(h, hf.model.norm, relevance, final)
    for (
        layer, rot, h, n1, q, k, v, qn, kn, qr, kr, qs, kf, vf, s, capped, a, o, attn, an, h1,
        n2, ffn, on, h2,
    ) in reversed(saved):  # fmt: skip
        att, mlp = layer.self_attn, _mlp_of(layer)
        # residual h2 = h1 + on: split in proportion to the summands; Gemma 3's norm of the MLP's
        # output (scale constant, elementwise) passes its share on to `out`
        r_h1, r_out = h1 / h2 * relevance, branch * on / h2 * relevance
        r_n2 = _mlp_backward(mlp, ffn, r_out, rule)
        parallel = getattr(layer, "use_parallel_residual", False)  # then n2 is n1: added below
        # RMSNorm with its scale constant: elementwise, passes R unchanged; a LayerNorm centres
        if not parallel:
            before = getattr(layer, "pre_feedforward_layernorm", None)  # VaultGemma: only that
            before = layer.post_attention_layernorm if before is None else before
            r_h1 = r_h1 + back(h1, before, r_n2, n2)
        r_h, r_attn = h / h1 * r_h1, branch * an / h1 * r_h1  # an: attn, or Gemma 3's norm
        r_o = _linear_messages(o.reshape(t, heads * d), att.o_proj.weight, r_attn, attn)
        r_o = r_o.view(t, heads, d)
        # HunYuan's norms after RoPE (their scale a constant) pass the relevance on to qr, kr
        r_qr, r_kf, r_vf, lost = _attention_messages(
            qs, kf, vf, s, a, o, r_o, att.scaling, rule, capped
        )
        absorbed += lost
        if rule == "attnlrp":
            r_kr = r_kf.reshape(t, kv, group, d).sum(2)  # copies of a kv head add up
            # RoPE: LRP-0 of a rotation; Qwen3's query and key norms pass relevance on
            r_q = qn * torch.einsum("tnm,thn->thm", rot, r_qr / qr)
            r_k = kn * torch.einsum("tnm,thn->thm", rot, r_kr / kr)
        else:
            r_q, r_k = torch.zeros_like(q), torch.zeros_like(k)
        if getattr(att, "qk_layernorm", False):  # StableLM: each head's LayerNorm centres it
            r_q, r_k = (
                torch.stack([_layer_norm_messages(x[:, i], n, r[:, i], y[:, i])
                             for i, n in enumerate(norms.norms)], 1)
                for x, r, y, norms in ((q, r_q, qn, att.q_layernorm), (k, r_k, kn, att.k_layernorm))
            )  # fmt: skip
        r_v = r_vf.reshape(t, kv, group, d).sum(2)  # copies of a kv head add up
        projections = _query_key_value(att, heads * d, kv * d)
        r_n1 = sum(
            _linear_messages(n1, w, r.reshape(t, -1), y.reshape(t, -1))
            for (w, _), r, y in zip(projections, (r_q, r_k, r_v), (q, k, v), strict=True)
        )
        r_n1 = r_n1 + r_n2 if parallel else r_n1
        relevance = r_h + back(h, getattr(layer, "input_layernorm", None), r_n1, n1)
    return relevance.numpy(), absorbed, logit


@torch.no_grad()
def mla_lrp_reference(
    hf, ids: list[int], position: int, target: int, rule: str
) -> tuple[np.ndarray, float, float]:
    """Relevance ``[T, H]`` of DeepSeek's token embeddings for the logit of ``target`` read at
    ``position``, the relevance the softmaxes absorb, and the logit. Multi-head latent attention
    by hand: a key-value latent per token (RMS-normed, its scale a constant) expanded into each
    head's key part and value, and one rotated key part every head's key repeats (its copies'
    relevance adds up); queries straight from the stream (V2) or through a latent of their own
    (V3, RMS-normed); RoPE on interleaved pairs (LRP-0 of a rotation). The MLPs are
    :func:`_mlp_forward`'s (V3's first layer dense, then routed and shared experts)."""
    cfg = hf.config
    heads, nope, rope, dv = (
        cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
    )  # fmt: skip
    rank, t = cfg.kv_lora_rank, len(ids)

    def norm(h: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        # each norm's own epsilon: the latents' are the class default, not the config's
        return _rms(h, module.weight, module.variance_epsilon)

    x = hf.model.embed_tokens(torch.tensor(ids))
    positions = torch.arange(t)
    table = hf.model.rotary_emb(x[None], positions[None])
    if isinstance(table, tuple):  # V3: cos, sin; each pair's angle in the first half
        cos, sin = (c[0, :, : rope // 2] for c in table)
    else:  # V2: one complex number per pair
        cos, sin = table[0].real, table[0].imag
    rot = _pair_rotations(sin.double(), cos.double(), rope)  # [T, rope, rope]
    causal = positions[:, None] >= positions
    saved, h = [], x
    for layer in hf.model.layers:
        att, mlp = layer.self_attn, layer.mlp
        n1 = norm(h, layer.input_layernorm)
        if att.q_lora_rank is None:
            qa = qan = None
            q = n1 @ att.q_proj.weight.T
        else:
            qa = n1 @ att.q_a_proj.weight.T
            qan = norm(qa, att.q_a_layernorm)
            q = qan @ att.q_b_proj.weight.T
        q = q.view(t, heads, nope + rope)
        c = n1 @ att.kv_a_proj_with_mqa.weight.T  # [T, rank + rope]
        latent = norm(c[:, :rank], att.kv_a_layernorm)
        kv = (latent @ att.kv_b_proj.weight.T).view(t, heads, nope + dv)
        keep = causal
        if hasattr(att, "indexer"):  # V3.2: the keys its indexer picks, the model's own choice
            if att.indexer is not None:  # GLM-5's layers without one reuse the last one's picks
                additive = torch.zeros(1, t, t, dtype=x.dtype).masked_fill(~causal, -torch.inf)
                picked = att.indexer(n1[None], qan[None], table, additive, positions[None])[0]
            keep = causal & torch.zeros_like(causal).scatter(-1, picked.long(), True)
        qr = torch.einsum("tnm,thm->thn", rot, q[..., nope:])
        kr = torch.einsum("tnm,tm->tn", rot, c[:, rank:])  # one rotated part, every head's
        qs = torch.cat([q[..., :nope], qr], -1)
        ks = torch.cat([kv[..., :nope], kr[:, None].expand(t, heads, rope)], -1)
        v = kv[..., nope:]
        s = torch.einsum("ihd,jhd->hij", qs, ks) * att.scaling
        s = s.masked_fill(~keep, -torch.inf)
        a = torch.softmax(s, -1)
        o = torch.einsum("hij,jhd->ihd", a, v)
        attn = o.reshape(t, heads * dv) @ att.o_proj.weight.T
        h1 = h + attn
        n2 = norm(h1, layer.post_attention_layernorm)
        out, ffn = _mlp_forward(mlp, n2)
        h2 = h1 + out
        saved.append((layer, h, n1, qa, qan, q, c, latent, kv, qr, kr, qs, ks, v, s, a, o))
        saved[-1] += (attn, h1, n2, out, ffn, h2)
        h = h2
    final = norm(h, hf.model.norm)
    head = hf.lm_head.weight[target]
    relevance = torch.zeros_like(x)
    relevance[position] = final[position] * head  # RMSNorm's constant scale passes it on
    logit, absorbed = float(final[position] @ head), 0.0
    for (
        layer, h, n1, qa, qan, q, c, latent, kv, qr, kr, qs, ks, v, s, a, o, attn, h1, _n2, out,
        ffn, h2,
    ) in reversed(saved):  # fmt: skip
        att = layer.self_attn
        r_h1, r_out = h1 / h2 * relevance, out / h2 * relevance
        r_h1 = r_h1 + _mlp_backward(layer.mlp, ffn, r_out, rule)  # through the norm unchanged
        r_h, r_attn = h / h1 * r_h1, attn / h1 * r_h1
        r_o = _linear_messages(o.reshape(t, -1), att.o_proj.weight, r_attn, attn)
        r_qs, r_ks, r_v, lost = _attention_messages(
            qs, ks, v, s, a, o, r_o.view(t, heads, dv), att.scaling, rule
        )
        absorbed += lost
        # LRP-0 of each rotation; the rotated key part's copies add up over the heads
        r_q_rope = q[..., nope:] * torch.einsum("tnm,thn->thm", rot, r_qs[..., nope:] / qr)
        r_k_rope = c[:, rank:] * torch.einsum("tnm,tn->tm", rot, r_ks[..., nope:].sum(1) / kr)
        r_kv = torch.cat([r_ks[..., :nope], r_v], -1).reshape(t, -1)
        r_latent = _linear_messages(latent, att.kv_b_proj.weight, r_kv, kv.reshape(t, -1))
        r_c = torch.cat([r_latent, r_k_rope], -1)  # the latent's norm passes its share on
        r_n1 = _linear_messages(n1, att.kv_a_proj_with_mqa.weight, r_c, c)
        r_q = torch.cat([r_qs[..., :nope], r_q_rope], -1).reshape(t, -1)
        if qa is None:
            r_n1 = r_n1 + _linear_messages(n1, att.q_proj.weight, r_q, q.reshape(t, -1))
        else:
            r_qa = _linear_messages(qan, att.q_b_proj.weight, r_q, q.reshape(t, -1))
            r_n1 = r_n1 + _linear_messages(n1, att.q_a_proj.weight, r_qa, qa)
        relevance = r_h + r_n1  # the input norm's constant scale passes it on
    return relevance.numpy(), absorbed, logit


def _affine_messages(
    x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """LRP-0 through ``z = x @ weight + bias`` (GPT-2's Conv1D): the bias keeps its share."""
    return x * ((relevance / z) @ weight.T)


def _layer_norm_messages(
    h: torch.Tensor, norm: torch.nn.LayerNorm, relevance: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """LRP-0 through ``y = (h - mean h) c w + b`` with ``c = 1 / std`` a constant:
    ``R_j = h_j c (w_j R_j / y_j - mean_i w_i R_i / y_i)``; ``b`` keeps its share."""
    c = torch.rsqrt(h.var(-1, unbiased=False, keepdim=True) + norm.eps)
    ratio = gain(norm) * relevance / y  # Nemotron's: 1 + weight
    return h * c * (ratio - ratio.mean(-1, keepdim=True))


@torch.no_grad()
def gpt2_lrp_reference(hf, ids: list[int], position: int, target: int, rule: str) -> np.ndarray:
    """Relevance ``[T, H]`` of GPT-2's token embeddings for the logit of ``target`` at
    ``position``: biases, LayerNorm shifts and position embeddings absorb their shares."""
    cfg, tr = hf.config, hf.transformer
    hidden, heads = cfg.n_embd, cfg.n_head
    d, t = hidden // heads, len(ids)
    x = tr.wte.weight[torch.tensor(ids)]
    h = x + tr.wpe.weight[:t]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    scale = d**-0.5

    def gelu(f: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(f, approximate="tanh")

    saved, h0 = [], h
    for block in tr.h:
        att, mlp = block.attn, block.mlp
        n1 = block.ln_1(h)
        qkv = n1 @ att.c_attn.weight + att.c_attn.bias
        q, k, v = (part.view(t, heads, d) for part in qkv.split(hidden, -1))
        s = torch.einsum("ihd,jhd->hij", q, k) * scale
        s = s.masked_fill(~causal, -torch.inf)
        a = torch.softmax(s, -1)
        o = torch.einsum("hij,jhd->ihd", a, v)
        attn = o.reshape(t, hidden) @ att.c_proj.weight + att.c_proj.bias
        h1 = h + attn
        n2 = block.ln_2(h1)
        f = n2 @ mlp.c_fc.weight + mlp.c_fc.bias
        out = gelu(f) @ mlp.c_proj.weight + mlp.c_proj.bias
        h2 = h1 + out
        saved.append((block, h, n1, qkv, q, k, v, s, a, o, attn, h1, n2, f, out, h2))
        h = h2
    final = tr.ln_f(h)
    head = hf.lm_head.weight[target]
    r_final = torch.zeros(t, hidden, dtype=x.dtype)
    r_final[position] = final[position] * head
    relevance = _layer_norm_messages(h, tr.ln_f, r_final, final)
    for block, h, n1, qkv, q, k, v, s, a, o, attn, h1, n2, f, out, h2 in reversed(saved):
        att, mlp = block.attn, block.mlp
        r_h1, r_out = h1 / h2 * relevance, out / h2 * relevance
        r_gelu = _affine_messages(gelu(f), mlp.c_proj.weight, r_out, out)
        # identity rule: R passes through GELU unchanged
        r_n2 = _affine_messages(n2, mlp.c_fc.weight, r_gelu, f)
        r_h1 = r_h1 + _layer_norm_messages(h1, block.ln_2, r_n2, n2)
        r_h, r_attn = h / h1 * r_h1, attn / h1 * r_h1
        r_o = _affine_messages(o.reshape(t, hidden), att.c_proj.weight, r_attn, attn)
        r_q, r_k, r_v, _ = _attention_messages(q, k, v, s, a, o, r_o.view(t, heads, d), scale, rule)
        r_qkv = torch.cat([r.reshape(t, hidden) for r in (r_q, r_k, r_v)], -1)
        r_n1 = _affine_messages(n1, att.c_attn.weight, r_qkv, qkv)
        relevance = r_h + _layer_norm_messages(h, block.ln_1, r_n1, n1)
    return (x / h0 * relevance).numpy()  # the position embeddings keep their share


@torch.no_grad()
def gpt_neo_lrp_reference(hf, ids: list[int], position: int, target: int, rule: str) -> np.ndarray:
    """Relevance ``[T, H]`` of GPT-Neo's token embeddings for the logit of ``target`` at
    ``position``: GPT-2's blocks with Linear projections (no query, key or value biases),
    unscaled scores and, in a local layer, only the last ``window_size`` positions."""
    cfg, tr = hf.config, hf.transformer
    hidden, heads = cfg.hidden_size, cfg.num_heads
    d, t = hidden // heads, len(ids)
    x = tr.wte.weight[torch.tensor(ids)]
    h = x + tr.wpe.weight[:t]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]

    def gelu(f: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(f, approximate="tanh")  # "gelu_new"

    saved, h0 = [], h
    for layer, block in enumerate(tr.h):
        att, mlp = block.attn.attention, block.mlp
        seen = j <= i
        if cfg.attention_layers[layer] == "local":
            seen = seen & (i - j < cfg.window_size)
        n1 = block.ln_1(h)
        q, k, v = (p.weight @ n1.T for p in (att.q_proj, att.k_proj, att.v_proj))
        q, k, v = (z.T.reshape(t, heads, d) for z in (q, k, v))
        s = torch.einsum("ihd,jhd->hij", q, k).masked_fill(~seen, -torch.inf)
        a = torch.softmax(s, -1)
        o = torch.einsum("hij,jhd->ihd", a, v)
        attn = o.reshape(t, hidden) @ att.out_proj.weight.T + att.out_proj.bias
        h1 = h + attn
        n2 = block.ln_2(h1)
        f = n2 @ mlp.c_fc.weight.T + mlp.c_fc.bias
        out = gelu(f) @ mlp.c_proj.weight.T + mlp.c_proj.bias
        h2 = h1 + out
        saved.append((block, h, n1, q, k, v, s, a, o, attn, h1, n2, f, out, h2))
        h = h2
    final = tr.ln_f(h)
    r_final = torch.zeros(t, hidden, dtype=x.dtype)
    r_final[position] = final[position] * hf.lm_head.weight[target]
    relevance = _layer_norm_messages(h, tr.ln_f, r_final, final)
    for block, h, n1, q, k, v, s, a, o, attn, h1, n2, f, out, h2 in reversed(saved):
        att, mlp = block.attn.attention, block.mlp
        r_h1, r_out = h1 / h2 * relevance, out / h2 * relevance
        r_gelu = _linear_messages(gelu(f), mlp.c_proj.weight, r_out, out)  # identity rule
        r_n2 = _linear_messages(n2, mlp.c_fc.weight, r_gelu, f)
        r_h1 = r_h1 + _layer_norm_messages(h1, block.ln_2, r_n2, n2)
        r_h, r_attn = h / h1 * r_h1, attn / h1 * r_h1
        r_o = _linear_messages(o.reshape(t, hidden), att.out_proj.weight, r_attn, attn)
        r_q, r_k, r_v, _ = _attention_messages(q, k, v, s, a, o, r_o.view(t, heads, d), 1.0, rule)
        r_n1 = sum(
            _linear_messages(n1, p.weight, r.reshape(t, hidden), z.reshape(t, hidden))
            for p, r, z in ((att.q_proj, r_q, q), (att.k_proj, r_k, k), (att.v_proj, r_v, v))
        )
        relevance = r_h + _layer_norm_messages(h, block.ln_1, r_n1, n1)
    return (x / h0 * relevance).numpy()  # the position embeddings keep their share


def check_lrp(model: ax.Model, reference, rule: str) -> list[int]:
    """``ax.lrp`` of PROMPT -> TARGET equals ``reference(hf, ids, position, target, rule)`` for
    every target (read at the position before it), to 1e-7; returns the ids."""
    got = ax.lrp(model, PROMPT, TARGET, rule=rule)
    ids = got.source_id.values.tolist()
    for k, position in enumerate(got.target.values.tolist()):
        want = reference(model.hf, ids, position - 1, int(got.target_id[k]), rule)
        np.testing.assert_allclose(got[k].fillna(0).values, want, rtol=1e-7, atol=1e-10)
    return ids


def _alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's slope per head for a power-of-two head count: ``2 ** (-8 (h + 1) / heads)``."""
    assert heads & (heads - 1) == 0, "this reference covers power-of-two head counts"
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])


@torch.no_grad()
def fused_lrp_reference(hf, ids: list[int], position: int, target: int, rule: str) -> np.ndarray:
    """Relevance ``[T, H]`` of the token embeddings for the logit of ``target`` at ``position``
    in GPT-2's sequential block with one fused query/key/value projection in Linear layers:
    GPT-BigCode (learned positions, which keep their share; every query head reading one key
    and one value head under multi-query, whose relevance is the sum over the heads that read
    it, or each head its own, side by side) and BLOOM (a LayerNorm on the embeddings, each
    head's query, key and value side by side, ALiBi's bias ``slope_h * j`` on the scores: a
    constant, it keeps its share); biases; the tanh-GELU's identity rule."""
    cfg, body = hf.config, hf.transformer
    bloom = cfg.model_type == "bloom"
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    d, t = hidden // heads, len(ids)
    multi_query = getattr(cfg, "multi_query", False)
    x = hf.get_input_embeddings().weight[torch.tensor(ids)]
    e = body.word_embeddings_layernorm(x) if bloom else x + body.wpe.weight[:t]
    bias = torch.zeros(heads, t, dtype=x.dtype)
    if bloom:  # ALiBi as transformers rounds it: the slopes times each key's position, bfloat16
        bias = (_alibi_slopes(heads)[:, None].bfloat16() * torch.arange(t)).to(x.dtype)
    causal = torch.ones(t, t, dtype=torch.bool).tril()

    def parts(block) -> tuple:  # (norm 1, fused qkv, output projection, norm 2, MLP in, out)
        if bloom:
            att, mlp = block.self_attention, block.mlp
            return (block.input_layernorm, att.query_key_value, att.dense,
                    block.post_attention_layernorm, mlp.dense_h_to_4h, mlp.dense_4h_to_h)  # fmt: skip
        att, mlp = block.attn, block.mlp
        return block.ln_1, att.c_attn, att.c_proj, block.ln_2, mlp.c_fc, mlp.c_proj

    def split(qkv: torch.Tensor) -> tuple:  # [T, heads, d] each, keys and values repeated
        if multi_query:
            q, k, v = qkv.split([hidden, d, d], -1)
            repeat = (t, heads, d)
            return (
                q.view(t, heads, d),
                k.view(t, 1, d).expand(repeat),
                v.view(t, 1, d).expand(repeat),
            )
        return qkv.view(t, heads, 3 * d).split(d, -1)

    def gelu(f: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(f, approximate="tanh")

    saved, h = [], e
    for block in body.h:
        ln1, fused, dense, ln2, fc_in, fc_out = parts(block)
        n1 = ln1(h)
        qkv = fused(n1)
        q, k, v = split(qkv)
        s = torch.einsum("ihd,jhd->hij", q, k) * d**-0.5 + bias[:, None, :]
        s = s.masked_fill(~causal, -torch.inf)
        a = torch.softmax(s, -1)
        o = torch.einsum("hij,jhd->ihd", a, v)
        attn = dense(o.reshape(t, hidden))
        h1 = h + attn
        n2 = ln2(h1)
        f = fc_in(n2)
        out = fc_out(gelu(f))
        h2 = h1 + out
        saved.append((block, h, n1, qkv, q, k, v, s, a, o, attn, h1, n2, f, out, h2))
        h = h2
    final = body.ln_f(h)
    r_final = torch.zeros(t, hidden, dtype=x.dtype)
    r_final[position] = final[position] * hf.lm_head.weight[target]
    relevance = _layer_norm_messages(h, body.ln_f, r_final, final)
    for block, h, n1, qkv, q, k, v, s, a, o, attn, h1, n2, f, out, h2 in reversed(saved):
        ln1, fused, dense, ln2, fc_in, fc_out = parts(block)
        r_h1, r_out = h1 / h2 * relevance, out / h2 * relevance
        r_gelu = _linear_messages(gelu(f), fc_out.weight, r_out, out)  # the identity rule
        r_n2 = _linear_messages(n2, fc_in.weight, r_gelu, f)
        r_h1 = r_h1 + _layer_norm_messages(h1, ln2, r_n2, n2)
        r_h, r_attn = h / h1 * r_h1, attn / h1 * r_h1
        r_o = _linear_messages(o.reshape(t, hidden), dense.weight, r_attn, attn)
        r_q, r_k, r_v, _ = _attention_messages(
            q, k, v, s, a, o, r_o.view(t, heads, d), d**-0.5, rule
        )
        if multi_query:  # the one key and value head: what every head gives it
            r_qkv = torch.cat([r_q.reshape(t, hidden), r_k.sum(1), r_v.sum(1)], -1)
        else:
            r_qkv = torch.cat([r_q, r_k, r_v], -1).reshape(t, 3 * hidden)
        r_n1 = _linear_messages(n1, fused.weight, r_qkv, qkv)
        relevance = r_h + _layer_norm_messages(h, ln1, r_n1, n1)
    if bloom:
        return _layer_norm_messages(x, body.word_embeddings_layernorm, relevance, e).numpy()
    return (x / e * relevance).numpy()  # the position embeddings keep their share


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("multi_query", [True, False])
def test_gpt_bigcode_equals_explicit_layer_by_layer_lrp(multi_query, rule):
    _, tok = tiny_model("gpt2")
    model = _double(gpt_bigcode(tok, multi_query), tok)
    check_lrp(model, fused_lrp_reference, rule)


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo"])
def test_gpt2_and_gpt_neo_equal_explicit_layer_by_layer_lrp(arch, rule):
    # biases, LayerNorm (centring and shift), tanh-GELU, position embeddings; GPT-Neo: GPT-2's
    # layout in Linear layers, no score scaling, a local layer narrower than the input
    model = _double(*tiny_model(arch))
    reference = gpt2_lrp_reference if arch == "gpt2" else gpt_neo_lrp_reference
    ids = check_lrp(model, reference, rule)
    assert arch == "gpt2" or len(ids) > model.hf.config.window_size


def _rotation_messages(q, k, qr, kr, r_qr, r_kr, rot: torch.Tensor, rule: str) -> tuple:
    """Relevance of the query and key ``[T, heads, d]`` before RoPE from that of the rotated ones
    (``qr = rot q``): LRP-0 of a rotation (the identity past its share); CP-LRP's queries and
    keys get none."""
    if rule != "attnlrp":
        return torch.zeros_like(q), torch.zeros_like(k)
    r_q = q * torch.einsum("tnm,thn->thm", rot, r_qr / qr)
    return r_q, k * torch.einsum("tnm,thn->thm", rot, r_kr / kr)


def _partial_rotations(cos: torch.Tensor, sin: torch.Tensor, d: int) -> torch.Tensor:
    """RoPE on the first ``cos.shape[-1]`` of ``d`` dims (GPT-NeoX's rotary share), the identity
    on the rest, as one matrix per position ``[T, d, d]``."""
    t, r = cos.shape
    m = torch.eye(d, dtype=cos.dtype).repeat(t, 1, 1)
    m[:, :r, :r] = _rotations(cos, sin)
    return m


@torch.no_grad()
def neox_lrp_reference(
    hf, ids: list[int], position: int, target: int, rule: str, head: torch.Tensor | None = None
) -> np.ndarray:
    """Relevance ``[T, H]`` of GPT-NeoX's (Pythia's) token embeddings for the logit of
    ``target`` at ``position``: parallel residual ``h + attention(ln1 h) + mlp(ln2 h)`` (or
    sequential, ``h1 = h + attention(ln1 h)``, ``h1 + mlp(ln2 h1)``), a query/key/value
    projection fused per head, RoPE on a share of each head, biases; ``head``: the output
    projection's rows (default: the LM head's; a classifier's ``score``). Persimmon: GPT-NeoX's
    sequential block with a LayerNorm on each head's query and key and ``relu(x) ** 2``."""
    cfg = hf.config
    persimmon = cfg.model_type == "persimmon"
    body = hf.model if persimmon else hf.gpt_neox
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    d, t = hidden // heads, len(ids)
    x = (body.embed_tokens if persimmon else body.embed_in).weight[torch.tensor(ids)]
    final_norm = body.final_layernorm if persimmon else body.final_layer_norm
    cos, sin = body.rotary_emb(x[None], torch.arange(t)[None])
    rot = _partial_rotations(cos[0].double(), sin[0].double(), d)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    saved, h = [], x
    for layer in body.layers:
        att, mlp = getattr(layer, "attention", None) or layer.self_attn, layer.mlp
        n1 = layer.input_layernorm(h)
        qkv = att.query_key_value(n1)
        q, k, v = qkv.view(t, heads, 3 * d).split(d, -1)  # per head: its query, key, value
        if persimmon:  # a LayerNorm of each head's query and key, before RoPE
            q, k = att.q_layernorm(q), att.k_layernorm(k)
        qr = torch.einsum("tnm,thm->thn", rot, q)
        kr = torch.einsum("tnm,thm->thn", rot, k)
        s = torch.einsum("ihd,jhd->hij", qr, kr) * d**-0.5
        s = s.masked_fill(~causal, -torch.inf)
        a = torch.softmax(s, -1)
        o = torch.einsum("hij,jhd->ihd", a, v)
        attn = att.dense(o.reshape(t, hidden))
        parallel = getattr(layer, "use_parallel_residual", False)
        h1 = h if parallel else h + attn  # what the MLP's norm reads
        n2 = layer.post_attention_layernorm(h1)
        f = mlp.dense_h_to_4h(n2)
        out = mlp.dense_4h_to_h(mlp.act(f))  # GELU; Persimmon's relu(x) ** 2
        h2 = h + attn + out
        saved.append((layer, h, n1, qkv, q, k, v, qr, kr, s, a, o, attn, h1, n2, f, out, h2))
        h = h2
    final = final_norm(h)
    head = (hf.get_output_embeddings().weight if head is None else head)[target]
    r_final = torch.zeros(t, hidden, dtype=x.dtype)
    r_final[position] = final[position] * head
    relevance = _layer_norm_messages(h, final_norm, r_final, final)
    for layer, h, n1, qkv, q, k, v, qr, kr, s, a, o, attn, h1, n2, f, out, h2 in reversed(saved):
        att, mlp = getattr(layer, "attention", None) or layer.self_attn, layer.mlp
        # h2 = h + attn + out: split in proportion to the three summands
        r_h, r_attn, r_out = (part / h2 * relevance for part in (h, attn, out))
        # the identity rule: R passes through the activation unchanged
        r_act = _linear_messages(mlp.act(f), mlp.dense_4h_to_h.weight, r_out, out)
        r_n2 = _linear_messages(n2, mlp.dense_h_to_4h.weight, r_act, f)
        r_h1 = _layer_norm_messages(h1, layer.post_attention_layernorm, r_n2, n2)
        if getattr(layer, "use_parallel_residual", False):
            r_h = r_h + r_h1
        else:  # h1 = h + attn: split in proportion
            r_h, r_attn = r_h + h / h1 * r_h1, r_attn + attn / h1 * r_h1
        r_o = _linear_messages(o.reshape(t, hidden), att.dense.weight, r_attn, attn)
        r_qr, r_kr, r_v, _ = _attention_messages(
            qr, kr, v, s, a, o, r_o.view(t, heads, d), d**-0.5, rule
        )
        r_q, r_k = _rotation_messages(q, k, qr, kr, r_qr, r_kr, rot, rule)
        if persimmon:  # through each head's query and key LayerNorm (their scales held)
            raw_q, raw_k, _ = qkv.view(t, heads, 3 * d).split(d, -1)
            r_q = _layer_norm_messages(raw_q, att.q_layernorm, r_q, q)
            r_k = _layer_norm_messages(raw_k, att.k_layernorm, r_k, k)
        r_qkv = torch.cat([r_q, r_k, r_v], -1).reshape(t, 3 * hidden)
        r_n1 = _linear_messages(n1, att.query_key_value.weight, r_qkv, qkv)
        relevance = r_h + _layer_norm_messages(h, layer.input_layernorm, r_n1, n1)
    return relevance.numpy()


def _pair_rotations(sin: torch.Tensor, cos: torch.Tensor, d: int) -> torch.Tensor:
    """GPT-J's RoPE as one matrix per position ``[T, d, d]``: dims ``2i`` and ``2i + 1`` of the
    first ``2 * sin.shape[-1]`` rotated together by angle ``i``, the identity on the rest."""
    t, pairs = sin.shape
    m = torch.eye(d, dtype=sin.dtype).repeat(t, 1, 1)
    for i in range(pairs):
        a, b = 2 * i, 2 * i + 1
        m[:, a, a], m[:, a, b] = cos[:, i], -sin[:, i]
        m[:, b, a], m[:, b, b] = sin[:, i], cos[:, i]
    return m


def _weighted_layer_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (h - mean) / std``: Cohere's LayerNorm (no bias), here in float64."""
    c = h - h.mean(-1, keepdim=True)
    return weight * c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def parallel_lrp_reference(hf, ids: list[int], position: int, target: int, rule: str) -> np.ndarray:
    """Relevance ``[T, H]`` of Phi's, GPT-J's, CodeGen's or Cohere's token embeddings for the
    logit of ``target`` at ``position``: ``h + attention(n) + mlp(n)`` with one LayerNorm ``n =
    ln(h)`` (the relevance both branches give ``n`` summed before it passes the norm), RoPE on a
    share of each head (Phi's on its first dims, GPT-J's, CodeGen's and Cohere's on interleaved
    pairs), biases (Phi's everywhere; GPT-J's in its MLP and LM head) keeping their shares.
    CodeGen: queries, values and keys in 4 shards of one projection. Cohere: a gated MLP,
    LayerNorms without biases, its logits scaled; Cohere 2's local layers with RoPE over a
    window, its global ones without."""
    cfg, kind = hf.config, hf.config.model_type
    cohere = kind in ("cohere", "cohere2")
    gptj = kind in ("gptj", "codegen")  # CodeGen: GPT-J's block with a fused projection
    body = hf.transformer if gptj else hf.model
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    d, t = hidden // heads, len(ids)
    x = hf.get_input_embeddings().weight[torch.tensor(ids)]
    first, second = body.rotary_emb(x[None], torch.arange(t)[None])
    if kind == "phi":  # (cos, sin) of the first dims' halves
        rot = _partial_rotations(first[0].double(), second[0].double(), d)
    elif gptj:  # (sin, cos) of each pair
        rot = _pair_rotations(first[0].double(), second[0].double(), d)
    else:  # Cohere: (cos, sin), each pair's angle twice
        rot = _pair_rotations(second[0, :, ::2].double(), first[0, :, ::2].double(), d)
    positions = torch.arange(t)

    def parts(block) -> tuple:  # (norm, attention, its output projection, MLP)
        if gptj:
            return block.ln_1, block.attn, block.attn.out_proj, block.mlp
        att = block.self_attn
        return block.input_layernorm, att, getattr(att, "dense", None) or att.o_proj, block.mlp

    def norm(ln, h: torch.Tensor) -> torch.Tensor:
        return _weighted_layer_norm(h, ln.weight, ln.variance_epsilon) if cohere else ln(h)

    def norm_messages(ln, h: torch.Tensor, r: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not cohere:
            return _layer_norm_messages(h, ln, r, y)
        c = torch.rsqrt(h.var(-1, unbiased=False, keepdim=True) + ln.variance_epsilon)
        ratio = ln.weight * r / y
        return h * c * (ratio - ratio.mean(-1, keepdim=True))

    def gelu(f: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(f, approximate="tanh")  # "gelu_new"

    def mlp_forward(mlp, n: torch.Tensor) -> tuple:
        if cohere:  # gated: down(act(gate n) * up n)
            w_gate, w_up, act = _gate_up(mlp)
            return _gated_forward(n, w_gate, w_up, mlp.down_proj.weight, act)
        fc_in, fc_out = (mlp.fc1, mlp.fc2) if kind == "phi" else (mlp.fc_in, mlp.fc_out)
        f = fc_in(n)
        out = fc_out(gelu(f))
        return out, (fc_in, fc_out, n, f, out)

    def mlp_backward(inner: tuple, r_out: torch.Tensor) -> torch.Tensor:
        if cohere:
            return _gated_backward(inner, r_out, rule)
        fc_in, fc_out, n, f, out = inner
        r_gelu = _linear_messages(gelu(f), fc_out.weight, r_out, out)  # the identity rule
        return _linear_messages(n, fc_in.weight, r_gelu, f)

    def weights(att) -> tuple:  # the query, key and value projections' weights
        if kind != "codegen":
            return att.q_proj.weight, att.k_proj.weight, att.v_proj.weight
        shards = att.qkv_proj.weight.view(att.mp_num, 3, -1, hidden)  # [queries, values, keys]
        return tuple(shards[:, part].reshape(hidden, hidden) for part in (0, 2, 1))

    def project(att, n: torch.Tensor) -> tuple:
        if kind != "codegen":
            return att.q_proj(n), att.k_proj(n), att.v_proj(n)
        return tuple(n @ w.T for w in weights(att))

    saved, h = [], x
    for block in body.h if gptj else body.layers:
        ln, att, dense, mlp = parts(block)
        n = norm(ln, h)
        zq, zk, zv = project(att, n)
        q, k, v = (z.view(t, heads, d) for z in (zq, zk, zv))
        # Cohere 2: RoPE and a window in its local layers, neither in its global ones
        window = getattr(att, "sliding_window", None)
        local = kind != "cohere2" or window is not None
        causal = (positions[:, None] >= positions) & (
            positions[:, None] - positions < (window or t)
        )
        layer_rot = rot if local else torch.eye(d, dtype=rot.dtype).repeat(t, 1, 1)
        qr = torch.einsum("tnm,thm->thn", layer_rot, q)
        kr = torch.einsum("tnm,thm->thn", layer_rot, k)
        s = torch.einsum("ihd,jhd->hij", qr, kr) * d**-0.5
        s = s.masked_fill(~causal, -torch.inf)
        a = torch.softmax(s, -1)
        o = torch.einsum("hij,jhd->ihd", a, v)
        attn = dense(o.reshape(t, hidden))
        out, inner = mlp_forward(mlp, n)
        h2 = h + attn + out
        saved.append((block, h, n, zq, zk, zv, q, k, v, qr, kr, s, a, o, attn, inner, out, h2))
        saved[-1] += (layer_rot,)
        h = h2
    final_norm = getattr(body, "final_layernorm" if kind == "phi" else "ln_f" if gptj else "norm")
    final = norm(final_norm, h)
    r_final = torch.zeros(t, hidden, dtype=x.dtype)
    scale = getattr(cfg, "logit_scale", 1.0)  # Cohere multiplies its logits
    r_final[position] = final[position] * hf.lm_head.weight[target] * scale
    relevance = norm_messages(final_norm, h, r_final, final)
    for (
        block,
        h,
        n,
        zq,
        zk,
        zv,
        q,
        k,
        v,
        qr,
        kr,
        s,
        a,
        o,
        attn,
        inner,
        out,
        h2,
        layer_rot,
    ) in reversed(saved):
        ln, att, dense, mlp = parts(block)
        r_h, r_attn, r_out = (part / h2 * relevance for part in (h, attn, out))
        r_n = mlp_backward(inner, r_out)
        r_o = _linear_messages(o.reshape(t, hidden), dense.weight, r_attn, attn)
        r_qr, r_kr, r_v, _ = _attention_messages(
            qr, kr, v, s, a, o, r_o.view(t, heads, d), d**-0.5, rule
        )
        r_q, r_k = _rotation_messages(q, k, qr, kr, r_qr, r_kr, layer_rot, rule)
        for weight, r, z in zip(weights(att), (r_q, r_k, r_v), (zq, zk, zv), strict=True):
            r_n = r_n + _linear_messages(n, weight, r.reshape(t, hidden), z)
        relevance = r_h + norm_messages(ln, h, r_n, n)
    return relevance.numpy()


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("arch", ["phi", "gptj", "codegen", "cohere", "cohere2"])
def test_parallel_blocks_equal_explicit_layer_by_layer_lrp(arch, rule):
    # one LayerNorm read by attention and MLP in parallel, partial RoPE (Phi's on the first
    # dims, GPT-J's and CodeGen's on interleaved pairs), biases, a biased head; CodeGen: one
    # sharded projection; Cohere: a gated MLP, RoPE on interleaved pairs, LayerNorms without
    # biases, scaled logits
    _, tok = tiny_model("gpt2")
    model = _double(vary(_family(arch, tok, attn_implementation="eager"), norms=True), tok)
    check_lrp(model, parallel_lrp_reference, rule)


@torch.no_grad()
def falcon_lrp_reference(hf, ids: list[int], position: int, target: int, rule: str) -> np.ndarray:
    """Relevance ``[T, H]`` of Falcon's token embeddings for the logit of ``target`` at
    ``position``, in its three layouts: Falcon-7B's parallel block on one LayerNorm with one
    key and value head (multi-query), Falcon-40B's on two LayerNorms with key-value groups, and
    a sequential block with each head's query, key and value side by side. A key or value head
    gets what every query head that reads it gives; RoPE over each whole head; biases keep
    their shares."""
    cfg, body = hf.config, hf.transformer
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    d, t = hidden // heads, len(ids)
    x = body.word_embeddings.weight[torch.tensor(ids)]
    cos, sin = body.rotary_emb(x[None], torch.arange(t)[None])
    rot = _rotations(cos[0].double(), sin[0].double())
    causal = torch.ones(t, t, dtype=torch.bool).tril()

    def split(att, qkv: torch.Tensor) -> tuple:  # q [T, H, d]; k, v [T, kv, d]
        fused = qkv.view(t, -1, d)
        if att.new_decoder_architecture:  # each group's queries, then its key and value
            grouped = fused.view(t, att.num_kv_heads, -1, d)
            return grouped[:, :, :-2].flatten(1, 2), grouped[:, :, -2], grouped[:, :, -1]
        if att.multi_query:
            return fused.split([heads, 1, 1], dim=1)
        q, k, v = fused.unflatten(1, (heads, 3)).unbind(2)
        return q, k, v

    def join(att, r_q, r_k, r_v) -> torch.Tensor:  # the fused layout of the three relevances
        if att.new_decoder_architecture:
            kv = att.num_kv_heads
            groups = r_q.view(t, kv, -1, d)
            return torch.cat([groups, r_k[:, :, None], r_v[:, :, None]], 2).reshape(t, -1)
        if att.multi_query:
            return torch.cat([r_q, r_k, r_v], 1).reshape(t, -1)
        return torch.stack([r_q, r_k, r_v], 2).reshape(t, -1)

    def gelu(f: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(f)

    saved, h = [], x
    for layer in body.h:
        att, mlp = layer.self_attention, layer.mlp
        two = cfg.new_decoder_architecture  # ln_attn, ln_mlp
        ln_attn = layer.ln_attn if two else layer.input_layernorm
        n1 = ln_attn(h)
        qkv = att.query_key_value(n1)
        q, k, v = split(att, qkv)
        group = heads // k.shape[1]
        qr = torch.einsum("tnm,thm->thn", rot, q)
        kr = torch.einsum("tnm,thm->thn", rot, k)
        kf, vf = kr.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        s = torch.einsum("ihd,jhd->hij", qr, kf) * d**-0.5
        s = s.masked_fill(~causal, -torch.inf)
        a = torch.softmax(s, -1)
        o = torch.einsum("hij,jhd->ihd", a, vf)
        attn = att.dense(o.reshape(t, hidden))
        parallel = cfg.parallel_attn or two
        h1 = h if parallel else h + attn  # what the MLP's norm reads
        ln_mlp = (
            layer.ln_mlp
            if two
            else (layer.input_layernorm if parallel else layer.post_attention_layernorm)
        )
        n2 = ln_mlp(h1)
        f = mlp.dense_h_to_4h(n2)
        out = mlp.dense_4h_to_h(gelu(f))
        h2 = h + attn + out
        saved.append((
            layer, ln_attn, ln_mlp, parallel, h, n1, qkv, q, k, qr, kr, kf, vf, s, a, o, attn, h1,
            n2, f, out, h2,
        ))  # fmt: skip
        h = h2
    final = body.ln_f(h)
    r_final = torch.zeros(t, hidden, dtype=x.dtype)
    r_final[position] = final[position] * hf.lm_head.weight[target]
    relevance = _layer_norm_messages(h, body.ln_f, r_final, final)
    for (
        layer, ln_attn, ln_mlp, parallel, h, n1, qkv, q, k, qr, kr, kf, vf, s, a, o, attn, h1, n2,
        f, out, h2,
    ) in reversed(saved):  # fmt: skip
        att, mlp = layer.self_attention, layer.mlp
        r_h, r_attn, r_out = (part / h2 * relevance for part in (h, attn, out))
        r_gelu = _linear_messages(gelu(f), mlp.dense_4h_to_h.weight, r_out, out)  # identity rule
        r_n2 = _linear_messages(n2, mlp.dense_h_to_4h.weight, r_gelu, f)
        r_h1 = _layer_norm_messages(h1, ln_mlp, r_n2, n2)
        if parallel:
            r_h = r_h + r_h1
        else:  # h1 = h + attn: split in proportion
            r_h, r_attn = r_h + h / h1 * r_h1, r_attn + attn / h1 * r_h1
        r_o = _linear_messages(o.reshape(t, hidden), att.dense.weight, r_attn, attn)
        r_qr, r_kf, r_vf, _ = _attention_messages(
            qr, kf, vf, s, a, o, r_o.view(t, heads, d), d**-0.5, rule
        )
        kv, group = k.shape[1], heads // k.shape[1]
        r_kr = r_kf.view(t, kv, group, d).sum(2)  # a key head: what its group's heads give it
        r_v = r_vf.view(t, kv, group, d).sum(2)
        r_q, r_k = _rotation_messages(q, k, qr, kr, r_qr, r_kr, rot, rule)
        r_n1 = _linear_messages(n1, att.query_key_value.weight, join(att, r_q, r_k, r_v), qkv)
        relevance = r_h + _layer_norm_messages(h, ln_attn, r_n1, n1)
    return relevance.numpy()


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
def test_bloom_equals_explicit_layer_by_layer_lrp(rule):
    check_lrp(_bloom(), fused_lrp_reference, rule)


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("layout", ["falcon", "falcon-heads", "falcon-40b"])
def test_falcon_equals_explicit_layer_by_layer_lrp(layout, rule):
    model = _falcon(layout)
    check_lrp(model, falcon_lrp_reference, rule)


@torch.no_grad()
def opt_lrp_reference(hf, ids: list[int], position: int, target: int, rule: str) -> np.ndarray:
    """Relevance ``[T, W]`` of OPT's token embeddings for the logit of ``target`` at
    ``position``: learned positions (rows offset by 2) keep their share, LayerNorms before each
    block's attention and MLP (or, as OPT-350m, after each residual sum, with no final norm),
    the query scaled after its projection, ReLU, and ``project_in``/``project_out`` between the
    embeddings' width ``W`` and the blocks' where they differ. BioGPT: OPT's pre-LN blocks with
    GELU, its token embeddings scaled by ``sqrt(hidden)``, its final norm ``layer_norm``."""
    cfg = hf.config
    bio = cfg.model_type == "biogpt"
    body = hf.biogpt if bio else hf.model.decoder
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    pre = getattr(cfg, "do_layer_norm_before", True)  # BioGPT's are all before
    d, t = hidden // heads, len(ids)
    x = body.embed_tokens.weight[torch.tensor(ids)] * getattr(body.embed_tokens, "embed_scale", 1)
    project_in = getattr(body, "project_in", None)
    project_out = getattr(body, "project_out", None)
    final_norm = body.layer_norm if bio else body.final_layer_norm
    e = x if project_in is None else x @ project_in.weight.T
    h = e + body.embed_positions.weight[torch.arange(t) + 2]
    h0 = h
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    act = torch.nn.functional.gelu if bio else torch.relu  # BioGPT's GELU is erf's

    def norm_before(ln, h: torch.Tensor) -> torch.Tensor:
        return ln(h) if pre else h

    def norm_after(ln, h: torch.Tensor) -> torch.Tensor:
        return h if pre else ln(h)

    saved = []
    for layer in body.layers:
        att, ln1, ln2 = layer.self_attn, layer.self_attn_layer_norm, layer.final_layer_norm
        n1 = norm_before(ln1, h)
        ql, k, v = att.q_proj(n1), att.k_proj(n1), att.v_proj(n1)
        q = ql * att.scaling
        s = torch.einsum("ihd,jhd->hij", q.view(t, heads, d), k.view(t, heads, d))
        s = s.masked_fill(~causal, -torch.inf)
        a = torch.softmax(s, -1)
        o = torch.einsum("hij,jhd->ihd", a, v.view(t, heads, d))
        attn = att.out_proj(o.reshape(t, hidden))
        s1 = h + attn
        h1 = norm_after(ln1, s1)
        n2 = norm_before(ln2, h1)
        f = layer.fc1(n2)
        out = layer.fc2(act(f))
        s2 = h1 + out
        h2 = norm_after(ln2, s2)
        saved.append((layer, h, n1, ql, q, k, v, s, a, o, attn, s1, h1, n2, f, out, s2, h2))
        h = h2
    final = h if final_norm is None else final_norm(h)
    projected = final if project_out is None else final @ project_out.weight.T
    head = hf.get_output_embeddings().weight[target]
    r_projected = torch.zeros_like(projected)
    r_projected[position] = projected[position] * head
    relevance = r_projected
    if project_out is not None:
        relevance = _linear_messages(final, project_out.weight, r_projected, projected)
    if final_norm is not None:
        relevance = _layer_norm_messages(h, final_norm, relevance, final)
    for layer, h, n1, ql, q, k, v, s, a, o, attn, s1, h1, n2, f, out, s2, h2 in reversed(saved):
        att, ln1, ln2 = layer.self_attn, layer.self_attn_layer_norm, layer.final_layer_norm
        r_s2 = relevance if pre else _layer_norm_messages(s2, ln2, relevance, h2)
        r_h1, r_out = h1 / s2 * r_s2, out / s2 * r_s2  # the residual sum, in proportion
        r_act = _linear_messages(act(f), layer.fc2.weight, r_out, out)
        r_n2 = _linear_messages(n2, layer.fc1.weight, r_act, f)  # ReLU, GELU: identity rule
        r_h1 = r_h1 + (_layer_norm_messages(h1, ln2, r_n2, n2) if pre else r_n2)
        r_s1 = r_h1 if pre else _layer_norm_messages(s1, ln1, r_h1, h1)
        r_h, r_attn = h / s1 * r_s1, attn / s1 * r_s1
        r_o = _linear_messages(o.reshape(t, hidden), att.out_proj.weight, r_attn, attn)
        r_q, r_k, r_v, _ = _attention_messages(
            q.view(t, heads, d), k.view(t, heads, d), v.view(t, heads, d), s, a, o,
            r_o.view(t, heads, d), 1.0, rule,
        )  # fmt: skip
        # q = scaling * ql: a constant factor passes relevance on unchanged
        r_n1 = sum(
            _linear_messages(n1, p.weight, r.reshape(t, hidden), y)
            for p, r, y in ((att.q_proj, r_q, ql), (att.k_proj, r_k, k), (att.v_proj, r_v, v))
        )
        relevance = r_h + (_layer_norm_messages(h, ln1, r_n1, n1) if pre else r_n1)
    r_e = e / h0 * relevance  # the position embeddings keep their share
    if project_in is None:
        return r_e.numpy()
    return _linear_messages(x, project_in.weight, r_e, e).numpy()


def _neighbour(family: str, **config) -> tuple:
    """A tiny random GPT-NeoX or OPT (not in attrax.testing; eager attention, weights large
    enough that the nonlinearities bend) on the tiny GPT-2's tokenizer."""

    _, tok = tiny_model("gpt2")
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    common = {"vocab_size": len(tok), "initializer_range": 0.3, "pad_token_id": tok.pad_token_id}
    if family == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(intermediate_size=64, **sizes, **common, **config)
    else:
        cfg = transformers.OPTConfig(
            ffn_dim=64, max_position_embeddings=64, **sizes, **common, **config
        )
    cfg.bos_token_id = cfg.eos_token_id = tok.eos_token_id
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval(), tok


NEIGHBOURS = {
    "pythia": lambda: _neighbour("gpt_neox"),  # a quarter of each head rotated
    "pythia-sequential": lambda: _neighbour(
        "gpt_neox", use_parallel_residual=False, partial_rotary_factor=1.0
    ),
    "opt": lambda: _neighbour("opt", word_embed_proj_dim=32),
    "opt-projected": lambda: _neighbour("opt", word_embed_proj_dim=16),  # project_in/out
    # OPT-350m's layout: a LayerNorm after each residual sum, no final norm
    "opt-post-ln": lambda: _neighbour("opt", word_embed_proj_dim=16, do_layer_norm_before=False),
}


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("arch", [*NEIGHBOURS, "biogpt", "persimmon"])
def test_neox_opt_and_their_kin_equal_explicit_layer_by_layer_lrp(arch, rule):
    # BioGPT: OPT's pre-LN blocks with GELU and scaled token embeddings; Persimmon: GPT-NeoX's
    # sequential block with per-head query/key LayerNorms and relu ** 2; random LayerNorms
    build = NEIGHBOURS.get(arch) or partial(_gpt2_vocabulary, arch, random=True)
    model = _double(*build())
    neox = arch.startswith("pythia") or arch == "persimmon"
    check_lrp(model, neox_lrp_reference if neox else opt_lrp_reference, rule)


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
def test_a_pythia_classifier_equals_explicit_layer_by_layer_lrp(rule):
    # GPT-NeoX's sequence head: its `score` rows read at the last token

    hf, tok = NEIGHBOURS["pythia"]()
    hf.config.num_labels = 3
    torch.manual_seed(1)
    hf = transformers.GPTNeoXForSequenceClassification(hf.config).eval()
    model = _double(hf, tok)
    got = ax.lrp(model, "the plot was good", [0, 1, 2], rule=rule)
    ids = got.source_id.values.tolist()
    for k in range(got.sizes["target"]):
        cls = int(got.target_class[k])
        want = neox_lrp_reference(hf, ids, len(ids) - 1, cls, rule, head=hf.score.weight)
        np.testing.assert_allclose(got[k].values, want, rtol=1e-7, atol=1e-10)


# the explicit reference for BERT-family classifiers (post-LayerNorm blocks, biases, a head)

#: the encoder classifiers attrax's tiny_classifier builds and LRP covers
ENCODERS = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "deberta-v2")


def _encoder_blocks(hf) -> tuple:
    """(embeddings module, projection or None, heads, blocks) of a BERT-family classifier; a
    block is ``(query, key, value, attention out, LayerNorm 1, FFN in, activation, FFN out,
    LayerNorm 2)``."""
    if hf.config.model_type == "distilbert":
        base = hf.distilbert
        blocks = [
            (b.attention.q_lin, b.attention.k_lin, b.attention.v_lin, b.attention.out_lin,
             b.sa_layer_norm, b.ffn.lin1, b.ffn.activation, b.ffn.lin2, b.output_layer_norm)
            for b in base.transformer.layer
        ]  # fmt: skip
        return base.embeddings, None, hf.config.n_heads, blocks
    base = getattr(hf, hf.base_model_prefix)
    suffix = "_proj" if hf.config.model_type == "deberta-v2" else ""  # DeBERTa's `query_proj`
    blocks = [
        (*(getattr(b.attention.self, f"{name}{suffix}") for name in ("query", "key", "value")),
         b.attention.output.dense, b.attention.output.LayerNorm, b.intermediate.dense,
         b.intermediate.intermediate_act_fn, b.output.dense, b.output.LayerNorm)
        for b in base.encoder.layer
    ]  # fmt: skip
    projection = getattr(base, "embeddings_project", None)  # ELECTRA's embedding_size -> hidden
    return base.embeddings, projection, hf.config.num_attention_heads, blocks


def _masked_lm_head(hf) -> tuple:
    """(dense, its LayerNorm, the decoder's weight ``[V, E]``) of a masked LM's head; a GELU
    sits between the dense and the norm."""
    kind = hf.config.model_type
    if kind == "distilbert":
        return hf.vocab_transform, hf.vocab_layer_norm, hf.vocab_projector.weight
    if kind in ("roberta", "xlm-roberta", "camembert"):
        return hf.lm_head.dense, hf.lm_head.layer_norm, hf.lm_head.decoder.weight
    if kind == "electra":
        head = hf.generator_predictions
        return head.dense, head.LayerNorm, hf.generator_lm_head.weight
    head = hf.cls.predictions  # BERT, DeBERTa-v2's legacy head
    return head.transform.dense, head.transform.LayerNorm, head.decoder.weight


def _sequence_head(hf) -> tuple:
    """(dense, its nonlinearity, output projection) of a sequence classifier's head."""
    kind = hf.config.model_type
    if kind == "distilbert":  # pre_classifier, an inline nn.ReLU(), classifier
        return hf.pre_classifier, torch.relu, hf.classifier
    if kind == "electra":  # gelu, as a module
        return hf.classifier.dense, hf.classifier.activation, hf.classifier.out_proj
    if kind == "deberta-v2":  # its pooler's GELU, then the classifier
        return hf.pooler.dense, torch.nn.functional.gelu, hf.classifier
    return hf.classifier.dense, torch.tanh, hf.classifier.out_proj  # RoBERTa, XLM-R: torch.tanh


class _Relative:
    """DeBERTa-v2's relative terms in one layer, by loops: query ``i`` meets key ``j``'s relative
    position ``i - j`` (unbucketed: inputs shorter than half its buckets) through the projected
    position keys ``pk`` (c2p) and key ``j`` meets it through the projected position queries
    ``pq`` (p2c), each row ``i - j + span`` of its ``[2 * span, heads, d]`` table."""

    def __init__(self, hf, attention, t: int, heads: int) -> None:
        config = hf.config
        span = config.position_buckets
        assert t < span // 2, "a longer input would reach the log buckets"
        rel = hf.base_model.encoder.get_rel_embedding()[: 2 * span]
        hd = config.hidden_size // heads
        self.kinds = config.pos_att_type
        self.pk = attention.pos_key_proj(rel).view(2 * span, heads, hd)
        self.pq = attention.pos_query_proj(rel).view(2 * span, heads, hd)
        self.row = torch.tensor([[i - j + span for j in range(t)] for i in range(t)])
        # transformers' scale: a float32 square root of d times (1 + the relative terms)
        factor = 1 + len(self.kinds)
        self.scale = float(torch.sqrt(torch.tensor(hd, dtype=torch.float32) * factor))

    def terms(self, q: torch.Tensor, k: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each term's products ``[heads, i, j, d]`` (divided by the scale): their sum over
        terms and ``d`` is the scores."""
        out = {"content": torch.einsum("ihd,jhd->hijd", q, k) / self.scale}
        t = q.shape[0]
        c2p, p2c = (torch.zeros_like(out["content"]) for _ in range(2))
        for i in range(t):
            for j in range(t):
                c2p[:, i, j] = q[i] * self.pk[self.row[i, j]] / self.scale
                p2c[:, i, j] = self.pq[self.row[i, j]] * k[j] / self.scale
        out |= {"c2p": c2p, "p2c": p2c}
        return {kind: term for kind, term in out.items() if kind in ("content", *self.kinds)}

    def messages(
        self, q: torch.Tensor, k: torch.Tensor, s: torch.Tensor, r_s: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Relevance of ``q`` and ``k`` ``[T, heads, d]`` from the scores' ``r_s``: each product
        its share ``term / s``; the content's half to each factor, a relative term's whole to
        its query (c2p) or key (p2c), the positions' projections being constants."""
        r_q, r_k = torch.zeros_like(q), torch.zeros_like(k)
        for kind, term in self.terms(q, k).items():
            part = term / s[..., None] * r_s[..., None]  # [h, i, j, d]
            to_q = {"content": 0.5, "c2p": 1.0, "p2c": 0.0}[kind]
            r_q += to_q * part.sum(2).permute(1, 0, 2)
            r_k += (1.0 - to_q) * part.sum(1).permute(1, 0, 2)
        return r_q, r_k


@torch.no_grad()
def encoder_lrp_reference(
    hf, ids: list[int], position: int | None, cls: int, rule: str, types: list[int] | None = None
):
    """Relevance ``[T, E]`` of the word embeddings for class ``cls``'s logit: of the sequence
    (``position=None``, the head reads the first token) or of token ``position``. Biases,
    LayerNorm shifts, position and segment embeddings (``types``: a pair's) keep their shares."""
    embeddings, projection, heads, blocks = _encoder_blocks(hf)
    t = len(ids)
    x = embeddings.word_embeddings.weight[torch.tensor(ids)]
    summed = []  # the embedding sum the LayerNorm normalises (positions, segments, x)
    hook = embeddings.LayerNorm.register_forward_pre_hook(lambda _m, a: summed.append(a[0][0]))
    segments = {} if types is None else {"token_type_ids": torch.tensor([types])}
    embeddings(input_ids=torch.tensor([ids]), **segments)
    hook.remove()
    e = summed[0]
    normed = embeddings.LayerNorm(e)
    h = projection(normed) if projection is not None else normed
    h0, saved = h, []
    deberta = hf.config.model_type == "deberta-v2"
    for n, block in enumerate(blocks):
        ql, kl, vl, out_l, ln1, fin, act, fout, ln2 = block
        hidden = h.shape[-1]
        d = hidden // heads
        zq, zk, zv = ql(h), kl(h), vl(h)
        q, k, v = (z.view(t, heads, d) for z in (zq, zk, zv))
        relative = None
        if deberta:
            relative = _Relative(hf, hf.base_model.encoder.layer[n].attention.self, t, heads)
            s = sum(term.sum(-1) for term in relative.terms(q, k).values())
        else:
            s = torch.einsum("ihd,jhd->hij", q, k) * d**-0.5
        a = torch.softmax(s, -1)
        o = torch.einsum("hij,jhd->ihd", a, v)
        att = out_l(o.reshape(t, hidden))
        r1 = att + h
        n1 = ln1(r1)
        f = fin(n1)
        g = act(f)
        out = fout(g)
        r2 = out + n1
        n2 = ln2(r2)
        saved.append(
            (block, relative, h, zq, zk, zv, q, k, v, s, a, o, att, r1, n1, f, g, out, r2, n2)
        )
        h = n2
    relevance = torch.zeros_like(h)
    if position is None:  # dense -> nonlinearity (identity rule) -> out_proj, on the first token
        dense, nonlinearity, out_proj = _sequence_head(hf)
        z = dense(h[0])
        r_z = nonlinearity(z) * out_proj.weight[cls]  # identity rule: passes on unchanged
        relevance[0] = _linear_messages(h[0], dense.weight, r_z, z)
    elif type(hf).__name__.endswith("ForMaskedLM"):  # dense -> GELU (identity) -> norm -> decoder
        dense, norm, decoder = _masked_lm_head(hf)
        z = dense(h[position])
        g = torch.nn.functional.gelu(z)
        y = norm(g)
        r_g = _layer_norm_messages(g[None], norm, (y * decoder[cls])[None], y[None])[0]
        relevance[position] = _linear_messages(h[position], dense.weight, r_g, z)
    else:
        head = getattr(hf, "qa_outputs", None) or hf.classifier  # cls 0, 1: start, end
        relevance[position] = h[position] * head.weight[cls]
    for step in reversed(saved):
        block, relative, h, zq, zk, zv, q, k, v, s, a, o, att, r1, n1, f, g, out, r2, n2 = step
        ql, kl, vl, out_l, ln1, fin, act, fout, ln2 = block
        r_r2 = _layer_norm_messages(r2, ln2, relevance, n2)
        r_out, r_n1 = out / r2 * r_r2, n1 / r2 * r_r2
        r_g = _linear_messages(g, fout.weight, r_out, out)  # identity rule through the GELU
        r_n1 = r_n1 + _linear_messages(n1, fin.weight, r_g, f)
        r_r1 = _layer_norm_messages(r1, ln1, r_n1, n1)
        r_att, r_h = att / r1 * r_r1, h / r1 * r_r1
        r_o = _linear_messages(o.reshape(t, -1), out_l.weight, r_att, att)
        r_q, r_k, r_v, _ = _attention_messages(
            q,
            k,
            v,
            s,
            a,
            o,
            r_o.view(q.shape),
            q.shape[-1] ** -0.5,
            rule,
            split=None if relative is None else relative.messages,
        )
        relevance = r_h + sum(
            _linear_messages(h, p.weight, r.reshape(t, -1), z)
            for p, r, z in ((ql, r_q, zq), (kl, r_k, zk), (vl, r_v, zv))
        )
    if projection is not None:
        relevance = _linear_messages(normed, projection.weight, relevance, h0)
    relevance = _layer_norm_messages(e, embeddings.LayerNorm, relevance, normed)
    return (x / e * relevance).numpy()  # position and segment embeddings keep their share


@torch.no_grad()
def modernbert_lrp_reference(hf, ids: list[int], position: int | None, cls: int, rule: str):
    """Relevance ``[T, H]`` of ModernBERT's token embeddings for class ``cls``'s logit, of the
    sequence (``position=None``: its head reads the first token) or of token ``position``:
    its embedding norm, pre-norm blocks (the first without a norm) with rotary queries and keys,
    local layers' windows (read from the model's own maps), a GLU MLP (``act(input) * gate``:
    the uniform rule, or the activated half held constant by CP-LRP), the final norm, and the
    dense-activation-norm head. Biases and norm shifts keep their shares."""
    base, cfg = hf.model, hf.config
    heads = cfg.num_attention_heads
    t = len(ids)
    with torch.no_grad():
        maps = hf(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    x = base.embeddings.tok_embeddings.weight[torch.tensor(ids)]
    e = base.embeddings.norm(x)
    positions = torch.arange(t)
    h, saved = e, []
    for n, layer in enumerate(base.layers):
        att, mlp = layer.attn, layer.mlp
        n1 = layer.attn_norm(h)
        qkv = att.Wqkv(n1)
        q, k, v = qkv.view(t, 3, heads, -1).unbind(1)
        d = q.shape[-1]
        cos, sin = base.rotary_emb(x[None], positions[None], cfg.layer_types[n])
        rot = _rotations(cos[0].double(), sin[0].double())
        qr, kr = torch.einsum("tnm,thm->thn", rot, q), torch.einsum("tnm,thm->thn", rot, k)
        seen = maps[n][0, 0] > 0  # the model's own pattern: its local layers' windows
        s = (torch.einsum("ihd,jhd->hij", qr, kr) * d**-0.5).masked_fill(~seen, -torch.inf)
        a = torch.softmax(s, -1)
        o = torch.einsum("hij,jhd->ihd", a, v)
        attn = att.Wo(o.reshape(t, -1))
        h1 = h + attn
        n2 = layer.mlp_norm(h1)
        wi = mlp.Wi(n2)
        inner, gate = wi.chunk(2, dim=-1)
        g = mlp.act(inner)
        z = g * gate
        out = mlp.Wo(z)
        h2 = h1 + out
        saved.append(
            (layer, h, n1, qkv, q, k, v, rot, qr, kr, s, a, o, attn, h1, n2, wi, z, out, h2)
        )
        h = h2
    final = base.final_norm(h)
    pooled = final[0] if position is None else final[position]
    dense = hf.head.dense(pooled)
    act = hf.head.act(dense)
    y = hf.head.norm(act)
    w = (getattr(hf, "classifier", None) or hf.decoder).weight[cls]  # a masked LM's decoder
    r_y = y * w  # the logit's terms; its bias keeps its share
    r_act = _layer_norm_messages(act[None], hf.head.norm, r_y[None], y[None])[0]
    r_pooled = _linear_messages(pooled, hf.head.dense.weight, r_act, dense)  # GELU: identity
    relevance = torch.zeros_like(final)
    relevance[0 if position is None else position] = r_pooled
    relevance = _layer_norm_messages(h, base.final_norm, relevance, final)
    for layer, h, n1, qkv, q, k, v, rot, qr, kr, s, a, o, attn, h1, n2, wi, z, out, h2 in reversed(
        saved
    ):
        att, mlp = layer.attn, layer.mlp
        r_h1, r_out = h1 / h2 * relevance, out / h2 * relevance
        r_z = _linear_messages(z, mlp.Wo.weight, r_out, out)
        if rule == "attnlrp":  # the uniform rule on act(input) * gate, the identity rule on act
            r_inner, r_gate = r_z / 2, r_z / 2
        else:  # CP-LRP: the activated half is a constant, all to the gate
            r_inner, r_gate = torch.zeros_like(r_z), r_z
        r_n2 = _linear_messages(n2, mlp.Wi.weight, torch.cat([r_inner, r_gate], -1), wi)
        r_h1 = r_h1 + _layer_norm_messages(h1, layer.mlp_norm, r_n2, n2)
        r_h, r_attn = h / h1 * r_h1, attn / h1 * r_h1
        r_o = _linear_messages(o.reshape(t, -1), att.Wo.weight, r_attn, attn).view(o.shape)
        r_qr, r_kr, r_v, _ = _attention_messages(qr, kr, v, s, a, o, r_o, q.shape[-1] ** -0.5, rule)
        r_q, r_k = _rotation_messages(q, k, qr, kr, r_qr, r_kr, rot, rule)
        r_qkv = torch.stack([r_q, r_k, r_v], 1).reshape(t, -1)
        r_n1 = _linear_messages(n1, att.Wqkv.weight, r_qkv, qkv)
        if isinstance(layer.attn_norm, torch.nn.LayerNorm):
            r_n1 = _layer_norm_messages(h, layer.attn_norm, r_n1, n1)
        relevance = r_h + r_n1
    return _layer_norm_messages(x, base.embeddings.norm, relevance, e).numpy()


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("task", ["sequence", "token", "question-answering", "fill-mask"])
@pytest.mark.usefixtures("modernbert_rotary_in_its_dtype")
def test_modernbert_equals_explicit_layer_by_layer_lrp(task, rule):
    hf, tok = tiny_classifier("modernbert", task=task)
    with torch.no_grad():  # random norm weights and biases: ones and zeros would test less
        for name, parameter in hf.named_parameters():
            if "norm" in name:
                parameter.normal_(1, 0.3)
            elif name.endswith("bias"):
                parameter.normal_(0, 0.5)
    model = _double(hf, tok)
    text = "the plot was good and the cast was great"  # longer than a local window
    targets = [0, 1, 2] if task == "sequence" else None
    if task == "question-answering":  # the start's logit (head row 0) and the end's (row 1)
        text, targets = ("what was good", text), "the cast was"
    if task == "fill-mask":  # two masks, each for its predicted token
        text = text.replace("good", tok.mask_token).replace("great", tok.mask_token)
    got = ax.lrp(model, text, targets, rule=rule)
    ids = got.source_id.values.tolist()
    for k, target in enumerate(got.target.values.tolist()):
        position = None if task == "sequence" else target
        cls = int(got.target_class[k]) if "target_class" in got.coords else k
        if task == "fill-mask":
            cls = int(got.target_id[k])
        if task == "question-answering":
            position = int(got.target_position[k])
        want = modernbert_lrp_reference(model.hf, ids, position, cls, rule)
        np.testing.assert_allclose(got[k].values, want, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize(
    ("arch", "task"),
    [
        ("roberta", "sequence"),  # torch.tanh in the head: the identity rule, not 1 - tanh^2
        ("xlm-roberta", "sequence"),
        ("camembert", "sequence"),  # RoBERTa's computation in classes of its own
        ("electra", "sequence"),  # GELU head, embedding projection
        ("distilbert", "sequence"),  # inline ReLU in the head
        ("deberta-v2", "sequence"),  # relative positions in the scores, GELU in its pooler
        ("roberta", "token"),
        ("distilbert", "token"),
        ("deberta-v2", "token"),
    ],
)
def test_encoder_classifiers_equal_explicit_layer_by_layer_lrp(arch, task, rule):
    # DeBERTa: buckets wide enough that the input's relative positions are not log-bucketed
    kw = {"position_buckets": 32} if arch == "deberta-v2" else {}
    model = _double(*tiny_classifier(arch, task=task, **kw))
    if task == "sequence":
        got = ax.lrp(model, "the plot was good", [0, 1, 2], rule=rule)
    else:
        got = ax.lrp(model, "the plot was good", rule=rule)
    ids = got.source_id.values.tolist()
    for k, target in enumerate(got.target.values.tolist()):
        position = None if task == "sequence" else target
        want = encoder_lrp_reference(model.hf, ids, position, int(got.target_class[k]), rule)
        np.testing.assert_allclose(got[k].values, want, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("arch", ["bert", "distilbert", "roberta", "electra", "deberta-v2"])
def test_masked_lms_equal_explicit_layer_by_layer_lrp(arch, rule):
    # each mask's predicted token's logit: the head's dense, GELU (the identity rule, a call
    # in RoBERTa's head), LayerNorm and decoder row
    kw = {"position_buckets": 32} if arch == "deberta-v2" else {}
    hf, tok = tiny_classifier(arch, task="fill-mask", **kw)
    model = _double(hf, tok)
    text = f"the plot was {tok.mask_token} and {tok.mask_token}"
    got = ax.lrp(model, text, rule=rule)
    ids = got.source_id.values.tolist()
    assert got.sizes["target"] == 2
    logits = model.hf(input_ids=torch.tensor([ids])).logits[0]
    for k, position in enumerate(got.target.values.tolist()):
        token = int(got.target_id[k])
        assert token == int(logits[position].argmax())  # the predicted token
        want = encoder_lrp_reference(model.hf, ids, position, token, rule)
        np.testing.assert_allclose(got[k].values, want, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("arch", ["bert", "distilbert", "deberta-v2"])
def test_question_answering_equals_explicit_layer_by_layer_lrp(arch, rule):
    # each target is the logit of the answer's start (head row 0) or end (row 1) at its token
    kw = {"position_buckets": 64} if arch == "deberta-v2" else {}
    model = _double(*tiny_classifier(arch, task="question-answering", **kw))
    pair = ("who was good", "the plot was good")
    got = ax.lrp(model, pair, (14, 20), rule=rule)
    assert got.target_position.values.tolist() == [14, 20]
    ids = got.source_id.values.tolist()
    # BERT's segment embeddings (DistilBERT has none)
    types = None if arch == "distilbert" else model.tokenizer(*pair).get("token_type_ids")
    for slot in (0, 1):
        position = int(got.target_position[slot])
        want = encoder_lrp_reference(model.hf, ids, position, slot, rule, types)
        np.testing.assert_allclose(got[slot].values, want, rtol=1e-7, atol=1e-10)


@pytest.fixture(scope="module")
def llama() -> ax.Model:
    return _double(*tiny_model("llama"))


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
def test_llama_equals_explicit_layer_by_layer_lrp(llama, rule):
    got = ax.lrp(llama, PROMPT, TARGET, rule=rule)
    ids = got.source_id.values.tolist()
    for k, position in enumerate(got.target.values.tolist()):
        want, _, _ = llama_lrp_reference(llama.hf, ids, position - 1, int(got.target_id[k]), rule)
        np.testing.assert_allclose(got[k].fillna(0).values, want, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
def test_llama_conservation(llama, rule):
    # sum of relevance + what the softmaxes absorb (AttnLRP; none for CP-LRP) = the logit, up to
    # float64 rounding: the model has no biases and no position embeddings (RoPE acts on q, k)
    got = ax.lrp(llama, PROMPT, TARGET, rule=rule)
    ids = got.source_id.values.tolist()
    for k, position in enumerate(got.target.values.tolist()):
        _, absorbed, logit = llama_lrp_reference(
            llama.hf, ids, position - 1, int(got.target_id[k]), rule
        )
        total = float(got[k].sum())
        if rule == "cp-lrp":
            assert absorbed == 0.0
        assert total + absorbed == pytest.approx(logit, rel=1e-9, abs=1e-9)


@torch.no_grad()
def _logits(model: ax.Model, da) -> np.ndarray:
    """The explained logits, from the Hugging Face model's own forward on the ids."""
    hf = model.hf
    ids = torch.tensor(da.source_id.values)
    if model.task == "sequence-classification":  # one logit per class
        return hf(input_ids=ids[None]).logits[0, da.target_class.values].numpy()
    if model.task == "token-classification":  # target = the token's position, and its class
        positions, classes = da.target.values.tolist(), da.target_class.values.tolist()
        return hf(input_ids=ids[None]).logits[0, positions, classes].numpy()
    if model.task == "question-answering":  # the start logit at the span's start, the end's
        out = hf(input_ids=ids[None])
        starts, ends = out.start_logits[0], out.end_logits[0]
        position = da.target_position.values.tolist()
        return np.array([float(starts[position[0]]), float(ends[position[1]])])
    if model.is_encoder_decoder:
        sides = da.side.values
        source, decoder = ids[sides == "source"][None], ids[sides == "target"][None]
        logits = hf(input_ids=source, decoder_input_ids=decoder).logits[0]
    else:
        logits = hf(input_ids=ids[None]).logits[0]
    # target k at position p is read from the logits at p - 1 of its sequence
    return logits[da.target.values - 1, da.target_id.values].numpy()


def _causal_lm(name: str) -> tuple:
    """A tiny Mistral, Gemma, Phi-3, Qwen3, SmolLM3, Gemma 3 or OLMo 2 (not in attrax.testing),
    with the tiny Llama's tokenizer and random norm weights."""

    _, tok = tiny_model("llama")
    config = getattr(transformers, f"{name}{'Text' if name == 'Gemma3' else ''}Config")(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )  # fmt: skip
    config._attn_implementation = "eager"
    if name == "SmolLM3":  # its second layer without RoPE (NoPE)
        config.no_rope_layers = [1, 0]
    if name in ("Gemma3", "Olmo3", "Cwm", "Exaone4", "VaultGemma"):  # a local, then a global layer
        config.layer_types, config.sliding_window = ["sliding_attention", "full_attention"], 3
    if name.startswith("Granite"):  # its multipliers, far from 1
        config.update(GRANITE)
    if name in ("Gemma2", "VaultGemma"):  # caps the small weights' scores and logits reach
        config.attn_logit_softcapping, config.final_logit_softcapping = 0.5, 2.0
        config.sliding_window = 3
    if name in ("Mixtral", "Qwen2Moe", "Qwen3Moe", "Olmoe", "GraniteMoe"):  # top-2 of 4 experts
        config.num_local_experts = config.num_experts = 4
        config.num_experts_per_tok, config.moe_intermediate_size = 2, 16
        config.shared_expert_intermediate_size = 32
        config._experts_implementation = "eager"  # transformers' grouped matmul takes no float64
    torch.manual_seed(0)
    hf = getattr(transformers, f"{name}ForCausalLM")(config).eval()
    with torch.no_grad():  # Gemma's norms scale by 1 + weight, initialised at 0
        for module in hf.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.normal_(0.0 if name.startswith("Gemma") else 1.0, 0.3)
    return hf, tok


def _classifier(name: str) -> tuple:
    """``_causal_lm(name)``'s body with a 3-class sequence head (Gemma 3's is
    Gemma3TextForSequenceClassification)."""

    hf, tok = _causal_lm(name)
    hf.config.num_labels = 3
    torch.manual_seed(1)
    head = transformers.AutoModelForSequenceClassification.from_config(hf.config).eval()
    head.load_state_dict(hf.state_dict(), strict=False)  # the body's weights, a new score
    return head, tok


def _gpt2_vocabulary(arch: str, random: bool = False, **kw: object) -> tuple:
    """A tiny random model of ``test_architectures``' family ``arch`` on GPT-2's tokenizer (with
    ``random``: random biases and LayerNorm weights, :func:`tests.test_components.vary`; ``kw``:
    from_config's)."""
    _, tok = tiny_model("gpt2")
    hf = _family(arch, tok, attn_implementation="eager", **kw)
    return (vary(hf, norms=True) if random else hf).eval(), tok


def _gpt_oss() -> tuple:
    """A tiny GPT-OSS on GPT-2's tokenizer (sinks, a local layer, experts with a SwiGLU limit of
    1): random biases and sinks, wide enough that some gates and ups pass the limit, random norm
    weights."""
    _, tok = tiny_model("gpt2")
    hf = _family("gpt_oss", tok, attn_implementation="eager", experts_implementation="eager")
    with torch.no_grad():
        for name, parameter in hf.named_parameters():
            if name.endswith("bias") or name.endswith("sinks"):
                parameter.normal_(0, 1.5)
            elif "norm" in name:
                parameter.normal_(1, 0.3)
    return hf.eval(), tok


def _translation_model(arch: str) -> tuple:
    """A tiny pre-norm translator of ``test_architectures`` (Marian's tokenizer)."""
    from tests.test_architectures import _translator

    translator = _translator(arch)
    return translator.hf, translator.tokenizer


BIAS_FREE = {
    "gpt2": lambda: tiny_model("gpt2"),
    "mistral": lambda: _causal_lm("Mistral"),
    "gemma": lambda: _causal_lm("Gemma"),
    "phi3": lambda: _causal_lm("Phi3"),
    "qwen3": lambda: _causal_lm("Qwen3"),
    "smollm3": lambda: _causal_lm("SmolLM3"),
    "gemma3": lambda: _causal_lm("Gemma3"),
    "gemma2": lambda: _causal_lm("Gemma2"),  # soft-capped scores and logits
    # mixtures of experts: routing weights held constant (Qwen2-MoE's shared expert gate too)
    "mixtral": lambda: _causal_lm("Mixtral"),
    "qwen2_moe": lambda: _causal_lm("Qwen2Moe"),
    "qwen3_moe": lambda: _causal_lm("Qwen3Moe"),
    "olmoe": lambda: _causal_lm("Olmoe"),  # query and key norms over all heads
    "granitemoe": lambda: _causal_lm("GraniteMoe"),  # experts in `block_sparse_moe`
    "olmo2": lambda: _causal_lm("Olmo2"),
    "olmo3": lambda: _causal_lm("Olmo3"),  # a local layer with its own RoPE table
    "olmo": lambda: _causal_lm("Olmo"),
    "starcoder2": lambda: _causal_lm("Starcoder2"),
    # LayerNorms (random weights and biases here), a quarter of each head rotated; in parallel,
    # per-head query and key LayerNorms, q/k/v biases
    "stablelm": lambda: _gpt2_vocabulary("stablelm", random=True),
    "stablelm-parallel": lambda: _gpt2_vocabulary("stablelm-parallel", random=True),
    "granite": lambda: _causal_lm("Granite"),  # scaled embeddings, blocks' outputs and logits
    "cwm": lambda: _causal_lm("Cwm"),  # a local layer
    "seed_oss": lambda: _causal_lm("SeedOss"),  # biased q/k/v projections
    "ernie4_5": lambda: _causal_lm("Ernie4_5"),  # RoPE on interleaved pairs
    "helium": lambda: _causal_lm("Helium"),  # RoPE on interleaved pairs
    "hunyuan_v1_dense": lambda: _causal_lm("HunYuanDenseV1"),  # q/k norms after RoPE
    "glm": lambda: _causal_lm("Glm"),  # RoPE on interleaved pairs of half of each head
    "glm4": lambda: _causal_lm("Glm4"),  # and norms after attention and MLP
    "exaone4": lambda: _causal_lm("Exaone4"),  # OLMo 2's norms, a local layer, NoPE globally
    "arcee": lambda: _causal_lm("Arcee"),  # no gate: relu(up x) ** 2, the identity rule
    "nemotron": lambda: _gpt2_vocabulary("nemotron", random=True),  # LayerNorms: 1 + weight
    "vaultgemma": lambda: _causal_lm("VaultGemma"),  # capped scores and logits, a local layer
    # a routing weight scaling each chosen expert's input, a shared expert; chunked local layers
    # with complex RoPE and weightless query and key norms; a NoPE layer with scaled queries
    "llama4": lambda: _gpt2_vocabulary("llama4", random=True),
    "ministral3": lambda: _gpt2_vocabulary("ministral3", random=True),  # position-scaled queries
    # biased q/k/v and per-head q/k norms; q/k norms over all heads (experts in float64: a loop)
    **{
        arch: partial(_gpt2_vocabulary, arch, random=True, experts_implementation="eager")
        for arch in ("glm4_moe", "minimax_m2", "ernie4_5_moe", "hunyuan_v1_moe")
    },
    "gemma3-classifier": lambda: _classifier("Gemma3"),
    **NEIGHBOURS,
    "marian": lambda: tiny_model("marian"),
    "bart": lambda: tiny_model("bart"),
    **{arch: partial(_translation_model, arch) for arch in ("m2m100", "mbart", "pegasus")},
    "t5": lambda: _t5("t5"),  # relative position biases: constants the weights hold
    "mt5": lambda: _t5("mt5"),
    "codegen": lambda: _gpt2_vocabulary("codegen"),  # one sharded q/v/k projection
    "bert": lambda: tiny_classifier("bert"),
    "roberta": lambda: tiny_classifier("roberta"),  # tanh called in its head: the patched head
    "xlm-roberta": lambda: tiny_classifier("xlm-roberta"),
    "electra": lambda: tiny_classifier("electra"),  # GELU head, embedding projection
    "distilbert": lambda: tiny_classifier("distilbert"),  # inline nn.ReLU() in its head
    "modernbert": lambda: tiny_classifier("modernbert"),  # GLU, rotary, local windows
    "modernbert-mean": lambda: tiny_classifier("modernbert", classifier_pooling="mean"),
    "roberta-token": lambda: tiny_classifier("roberta", task="token"),
    "electra-token": lambda: tiny_classifier("electra", task="token"),
    "distilbert-token": lambda: tiny_classifier("distilbert", task="token"),
    # encoder-decoder heads: the decoder reads the input again (BART's head: dense, tanh, out)
    **{f"{arch}-classifier": partial(tiny_classifier, arch) for arch in ("bart", "mbart", "t5")},
    **{
        f"{arch}-qa": partial(tiny_classifier, arch, "question-answering")
        for arch in ("bart", "bert")
    },
}


@pytest.mark.parametrize("arch", list(BIAS_FREE))
def test_cp_lrp_is_exactly_conservative_without_biases(arch):
    # CP-LRP makes every layer linear (attention weights, norm scales, f(x)/x constant): with the
    # biases and position embeddings zeroed the relevance sums to the logit (float64 rounding)
    model = _double(*BIAS_FREE[arch](), zero_biases=True)
    if arch in ("bart-classifier", "t5-classifier", "bart-qa"):
        # the decoder's start token is no input token and keeps its share, as a bias does
        with torch.no_grad():
            model.hf.get_input_embeddings().weight[model.hf.config.decoder_start_token_id] = 0
    if model.task == "generation":  # an encoder-decoder: both sides hold relevance
        both = model.is_encoder_decoder
        got = ax.lrp(model, PROMPT, TARGET, rule="cp-lrp", attribute_target=both)
    elif model.task == "token-classification":  # every token, its predicted class
        got = ax.lrp(model, "the plot was good", rule="cp-lrp")
    elif model.task == "question-answering":  # the span's start and end logits
        got = ax.lrp(model, ("where did the cat sit", "the cat sat on the mat"), "the mat",
                     rule="cp-lrp")  # fmt: skip
    else:
        got = ax.lrp(model, "the plot was good", [0, 1, 2], rule="cp-lrp")
    # float64 rounding; transformers' RMSNorm and GPT-NeoX's and OPT's eager softmax round
    # to float32 even in a float64 model, so there the explained logits (their forward, which
    # runs eager attention once attrax has loaded the model) carry float32 roundings (~1e-7
    # per layer)
    islands = ("mistral", "gemma", "phi3", "qwen3", "smollm3", "gemma3", "gemma3-classifier")
    islands += ("gemma2",)
    # OLMo's LayerNorm and StarCoder2's softmax run in float32 too
    islands += ("olmo2", "olmo3", "olmo", "starcoder2", "granite", *NEIGHBOURS)
    islands += ("stablelm", "stablelm-parallel")  # its eager softmax runs in float32
    islands += ("cwm", "seed_oss", "ernie4_5", "helium", "hunyuan_v1_dense", "glm", "glm4")
    islands += ("exaone4", "arcee", "nemotron", "vaultgemma")
    islands += ("llama4",)  # its RMSNorm and its complex RoPE run in float32
    islands += ("glm4_moe", "minimax_m2")  # RMSNorm in float32, float32 routers
    islands += ("ministral3", "ernie4_5_moe", "hunyuan_v1_moe")
    islands += ("modernbert", "modernbert-mean")  # its rotary embedding rounds q and k to float32
    islands += ("t5", "mt5", "t5-classifier")  # T5's RMSNorm takes its variance in float32
    islands += ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe")
    tolerance = 1e-5 if arch in islands else 1e-9
    np.testing.assert_allclose(
        got.sum(("source", "hidden")).values, _logits(model, got), rtol=tolerance, atol=tolerance
    )


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize(
    "arch",
    [
        "qwen2",
        "mistral",
        "gemma",
        "phi3",
        "qwen3",
        "smollm3",
        "gemma3",
        "olmo2",
        "olmo3",
        "olmo",
        "starcoder2",
        "gemma2",
        "granite",
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "olmoe",
        "granitemoe",
        "gpt_oss",
        "stablelm",
        "stablelm-parallel",
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
        "vaultgemma",
        "llama4",
        "glm4_moe",
        "minimax_m2",
        "ministral3",
        "ernie4_5_moe",
        "hunyuan_v1_moe",
    ],
)
def test_llama_family_equals_explicit_layer_by_layer_lrp(arch, rule):
    # Qwen2 (a classifier: biased q/k/v, the score head at the last token), Mistral, Gemma
    # (1 + weight norms, scaled embeddings, tanh-GELU gate, its own attention scaling), Phi-3
    # (fused q/k/v and gate/up projections), Qwen3 (query and key norms), SmolLM3 (NoPE layers),
    # Gemma 3 (norms after attention and MLP, query and key norms, local and global layers),
    # OLMo 2 (norms after attention and MLP only, query and key norms over all heads), Gemma 2
    # (tanh-capped scores and logits: the identity rule), Granite (constant factors on the
    # embeddings, the scores, each block's output and the logits), OLMo (LayerNorms without
    # weights, which centre), StarCoder2 (LayerNorms, biases everywhere, a plain GELU MLP),
    # GPT-OSS (attention sinks, biased projections, clamped SwiGLU experts)
    if arch == "qwen2":
        model = _double(*tiny_classifier("qwen2"))
        got = ax.lrp(model, "the plot was good", [0, 1, 2], rule=rule)
    else:
        model = _double(*(_gpt_oss() if arch == "gpt_oss" else BIAS_FREE[arch]()))
        got = ax.lrp(model, PROMPT, TARGET, rule=rule)
    ids = got.source_id.values.tolist()
    logits = _logits(model, got)  # the model's own forward
    for k, position in enumerate(got.target.values.tolist()):
        if arch == "qwen2":
            where, token, head = len(ids) - 1, int(got.target_class[k]), model.hf.score.weight
        else:
            where, token, head = position - 1, int(got.target_id[k]), None
        want, _, logit = llama_lrp_reference(model.hf, ids, where, token, rule, head=head)
        # the reference's forward is the model's (transformers' RMSNorm rounds to float32)
        assert logit == pytest.approx(logits[k], rel=1e-5, abs=1e-5)
        # ERNIE 4.5's and Llama 4's RoPE round queries and keys to float32 (1.2e-5 of an entry
        # seen)
        rtol = 1e-4 if arch in ("ernie4_5", "ernie4_5_moe", "llama4") else 1e-7
        np.testing.assert_allclose(got[k].fillna(0).values, want, rtol=rtol, atol=1e-10)


def _deepseek(arch: str) -> tuple:
    """A tiny DeepSeek V2 or V3 on GPT-2's tokenizer (a dense layer, then routed and shared
    experts), wide weights and random norm weights: effects far from 0."""
    _, tok = tiny_model("gpt2")
    torch.manual_seed(0)
    hf = _family(arch, tok, attn_implementation="eager", experts_implementation="eager")
    with torch.no_grad():
        for name, parameter in hf.named_parameters():
            if "norm" in name:
                parameter.normal_(1, 0.3)
            elif parameter.dim() > 1:
                parameter.mul_(5.0)
    return hf.eval(), tok


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize(
    "arch", ["deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "youtu", "glm_moe_dsa"]
)
def test_multi_head_latent_attention_equals_explicit_layer_by_layer_lrp(arch, rule):
    model = _double(*_deepseek(arch))
    got = ax.lrp(model, PROMPT, TARGET, rule=rule)
    ids = got.source_id.values.tolist()
    logits = _logits(model, got)
    for k, position in enumerate(got.target.values.tolist()):
        want, absorbed, logit = mla_lrp_reference(
            model.hf, ids, position - 1, int(got.target_id[k]), rule
        )
        assert logit == pytest.approx(logits[k], rel=1e-5, abs=1e-5)
        # no biases: the sources hold the logit less what the softmaxes absorb (none: CP-LRP)
        assert want.sum() + absorbed == pytest.approx(logit, rel=1e-6, abs=1e-6)
        assert absorbed == 0.0 if rule == "cp-lrp" else absorbed != 0.0
        # V2's RoPE rounds the rotated parts to float32
        rtol = 1e-4 if arch == "deepseek_v2" else 1e-7
        np.testing.assert_allclose(got[k].fillna(0).values, want, rtol=rtol, atol=1e-10)


def _gemma4(**layout) -> tuple:
    """A tiny Gemma 4 (its per-layer embeddings, a local then a global layer with wider heads and
    RoPE on a quarter of each) on GPT-2's tokenizer, with ``layout`` over its config, random norm
    weights and layer scalars: effects far from 0."""
    _, tok = tiny_model("gpt2")
    config = _family("gemma4", tok).config
    config.update(layout)
    torch.manual_seed(0)
    hf = transformers.Gemma4ForCausalLM._from_config(
        config, attn_implementation="eager", experts_implementation="eager"
    )
    with torch.no_grad():
        for name, parameter in hf.named_parameters():
            if "norm" in name or name.endswith("scale"):
                parameter.normal_(1, 0.3)
            elif parameter.dim() > 1:
                parameter.mul_(4.0)
        for name, buffer in hf.named_buffers():
            if name.endswith("layer_scalar"):
                buffer.uniform_(0.5, 1.5)
    return hf.eval(), tok


GEMMA4 = {
    "gemma4": {},
    # a third layer reusing the first's keys and values (twice as wide an MLP), keys as values
    # in the global layer, a mixture of 4 experts (top 2) beside every MLP
    "gemma4-shared-moe": dict(
        num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        num_kv_shared_layers=1, use_double_wide_mlp=True, attention_k_eq_v=True,
        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
    ),
}  # fmt: skip


@torch.no_grad()
def gemma4_lrp_reference(
    hf, ids: list[int], position: int, target: int, rule: str
) -> tuple[np.ndarray, float, float, float]:
    """Relevance ``[T, H]`` of the token embeddings for the logit of ``target`` read at
    ``position`` on Gemma 4, what the softmaxes absorb, what the per-layer embeddings looked up
    by token id absorb (constants), and the logit. Every layer adds a per-layer branch,
    ``norm(W_p (act(W_g h) * p_l))``, whose input ``p_l`` is a projection of the embeddings
    (through an RMSNorm) plus that table's row, and then scales its stream by a constant;
    values are RMS-normed without a weight; a shared layer reads an earlier layer's keys and
    values; a mixture of experts (its routing weights constants) beside the MLP."""
    cfg, model = hf.config, hf.model
    t, hidden, heads, eps = len(ids), cfg.hidden_size, cfg.num_attention_heads, cfg.rms_norm_eps
    layers, width = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
    index = torch.tensor(ids)
    x = model.embed_tokens(index)  # scaled by sqrt(hidden)
    # the per-layer inputs: (norm(x W^T / sqrt(H)) + table[ids]) / sqrt(2)
    projected = x @ model.per_layer_model_projection.weight.T  # then scaled by 1 / sqrt(H)
    pn = _rms(
        projected.view(t, layers, width) * hidden**-0.5, model.per_layer_projection_norm.weight, eps
    )
    table = model.embed_tokens_per_layer(index).view(t, layers, width)  # scaled by sqrt(width)
    per_layer = (pn + table) * 2**-0.5
    positions = torch.arange(t)
    act = lambda g: torch.nn.functional.gelu(g, approximate="tanh")  # noqa: E731
    saved, stored, h = [], {}, x
    for i, layer in enumerate(model.layers):
        att = layer.self_attn
        d, kind = att.head_dim, cfg.layer_types[i]
        cos, sin = model.rotary_emb(x[None], positions[None], kind)
        rot = _rotations(cos[0].double(), sin[0].double())
        window = att.sliding_window or t
        mask = (positions[:, None] >= positions) & (positions[:, None] - positions < window)
        n1 = _rms(h, layer.input_layernorm.weight, eps)
        q = (n1 @ att.q_proj.weight.T).view(t, heads, d)
        qn = _rms(q, att.q_norm.weight, eps)
        qr = torch.einsum("tnm,thm->thn", rot, qn)
        if att.is_kv_shared_layer:  # an earlier layer's normed, rotated keys and its values
            k = v = kn = None
            kr, vn = stored[kind][:2]
        else:
            k = (n1 @ att.k_proj.weight.T).view(t, -1, d)
            v = k if att.v_proj is None else (n1 @ att.v_proj.weight.T).view(t, -1, d)
            kn, vn = _rms(k, att.k_norm.weight, eps), _rms(v, 1.0, eps)
            kr = torch.einsum("tnm,thm->thn", rot, kn)
            if att.store_full_length_kv:
                stored[kind] = [kr, vn, torch.zeros_like(kr), torch.zeros_like(vn)]
        group = heads // kr.shape[1]
        kf, vf = kr.repeat_interleave(group, 1), vn.repeat_interleave(group, 1)
        s = torch.einsum("ihd,jhd->hij", qr, kf).masked_fill(~mask, -torch.inf)  # unscaled
        a = torch.softmax(s, -1)
        o = torch.einsum("hij,jhd->ihd", a, vf)
        attn = o.reshape(t, -1) @ att.o_proj.weight.T
        an = _rms(attn, layer.post_attention_layernorm.weight, eps)
        h1 = h + an
        n2 = _rms(h1, layer.pre_feedforward_layernorm.weight, eps)
        w_gate, w_up, _ = _gate_up(layer.mlp)
        dense, inner = _gated_forward(n2, w_gate, w_up, layer.mlp.down_proj.weight, act)
        moe = None
        if cfg.enable_moe_block:  # norm(MLP(n2)) + norm(experts(norm(h1))), then a norm
            d1 = _rms(dense, layer.post_feedforward_layernorm_1.weight, eps)
            n3 = _rms(h1, layer.pre_feedforward_layernorm_2.weight, eps)
            # the routing (constants): a softmax (in float32, as Gemma 4's) over the experts of
            # the weightless-normed stream's projection, its top k renormalised, then scaled
            router = layer.router
            scores = (_rms(h1, router.scale, eps) * hidden**-0.5) @ router.proj.weight.T
            weights, chosen = torch.softmax(scores, -1, dtype=torch.float32).topk(cfg.top_k_experts)
            weights = weights / weights.sum(-1, keepdim=True) * router.per_expert_scale[chosen]
            out, terms = torch.zeros_like(n3), []
            for j in range(t):
                for slot in range(chosen.shape[1]):
                    e = int(chosen[j, slot])
                    w_g, w_u = layer.experts.gate_up_proj[e].chunk(2)
                    y, gated = _gated_forward(n3[j], w_g, w_u, layer.experts.down_proj[e], act)
                    terms.append((j, weights[j, slot] * y, gated))
                    out[j] += weights[j, slot] * y
            d2 = _rms(out, layer.post_feedforward_layernorm_2.weight, eps)
            moe = (d1, out, terms, d2)
            ff = d1 + d2
        else:
            ff = dense
        fn = _rms(ff, layer.post_feedforward_layernorm.weight, eps)
        h2 = h1 + fn
        g = h2 @ layer.per_layer_input_gate.weight.T
        z = act(g) * per_layer[:, i]
        y = z @ layer.per_layer_projection.weight.T
        yn = _rms(y, layer.post_per_layer_input_norm.weight, eps)
        h3 = h2 + yn
        saved.append((layer, i, rot, h, n1, q, k, kn, qn, qr, kr, kf, vf, s, a, o, attn, an, h1,
                      inner, moe, ff, fn, h2, g, z, y, yn, h3))  # fmt: skip
        h = h3 * layer.layer_scalar
    final = _rms(h, model.norm.weight, eps)
    head = hf.lm_head.weight[target]
    logit = float(final[position] @ head)
    cap = cfg.final_logit_softcapping
    relevance = torch.zeros(t, hidden, dtype=x.dtype)
    relevance[position] = final[position] * head * (cap * math.tanh(logit / cap) / logit)
    logit = cap * math.tanh(logit / cap)  # the identity rule: the capped logit's relevance
    r_per_layer, absorbed = torch.zeros_like(per_layer), 0.0
    for (layer, i, rot, h, n1, q, k, kn, qn, qr, kr, kf, vf, s, a, o, attn, an, h1, inner, moe,
         ff, fn, h2, g, z, y, yn, h3) in reversed(saved):  # fmt: skip
        att = layer.self_attn
        # the layer's scalar and the norms (their scales constants) pass relevance unchanged
        r_h2, r_y = h2 / h3 * relevance, yn / h3 * relevance
        r_z = _linear_messages(z, layer.per_layer_projection.weight, r_y, y)
        # act(g) * p: uniform rule (identity rule through act), or the gate a constant
        r_g, r_p = (r_z / 2, r_z / 2) if rule == "attnlrp" else (torch.zeros_like(r_z), r_z)
        r_per_layer[:, i] = r_p
        r_h2 = r_h2 + _linear_messages(h2, layer.per_layer_input_gate.weight, r_g, g)
        r_h1, r_ff = h1 / h2 * r_h2, fn / h2 * r_h2
        if moe is None:
            r_h1 = r_h1 + _gated_backward(inner, r_ff, rule)
        else:
            d1, out, terms, d2 = moe
            r_h1 = r_h1 + _gated_backward(inner, d1 / ff * r_ff, rule)
            r_out, r_n3 = d2 / ff * r_ff, torch.zeros_like(out)
            for j, term, gated in terms:  # a constant weight passes a term's share on
                r_n3[j] += _gated_backward(gated, term / out[j] * r_out[j], rule)
            r_h1 = r_h1 + r_n3
        relevance, r_attn = h / h1 * r_h1, an / h1 * r_h1
        r_o = _linear_messages(o.reshape(t, -1), att.o_proj.weight, r_attn, attn).view(o.shape)
        r_qr, r_kf, r_vf, lost = _attention_messages(qr, kf, vf, s, a, o, r_o, 1.0, rule)
        absorbed += lost
        group = heads // kr.shape[1]
        r_kr = r_kf.reshape(*kr.shape[:2], group, -1).sum(2)  # copies of a kv head add up
        r_vn = r_vf.reshape(*kr.shape[:2], group, -1).sum(2)
        kind = cfg.layer_types[i]
        if att.is_kv_shared_layer:  # to the layer that computed them
            stored[kind][2] += r_kr
            stored[kind][3] += r_vn
            r_q_only = True
        else:
            r_q_only = False
            if att.store_full_length_kv:  # what the later layers read of them
                r_kr, r_vn = r_kr + stored[kind][2], r_vn + stored[kind][3]
        # RoPE: LRP-0 of a rotation; the norms of queries, keys and values pass relevance on
        r_q = qn * torch.einsum("tnm,thn->thm", rot, r_qr / qr)
        r_n1 = _linear_messages(n1, att.q_proj.weight, r_q.reshape(t, -1), q.reshape(t, -1))
        if not r_q_only:
            r_k = kn * torch.einsum("tnm,thn->thm", rot, r_kr / kr)
            if att.v_proj is None:  # the values are the keys before their norm and RoPE
                r_k = r_k + r_vn
            else:
                v = (n1 @ att.v_proj.weight.T).view(r_vn.shape)
                r_n1 = r_n1 + _linear_messages(
                    n1, att.v_proj.weight, r_vn.reshape(t, -1), v.reshape(t, -1)
                )
            r_n1 = r_n1 + _linear_messages(
                n1, att.k_proj.weight, r_k.reshape(t, -1), k.reshape(t, -1)
            )
        relevance = relevance + r_n1
    # the per-layer inputs' relevance: the projection's share to the embeddings, the table's
    # absorbed (a constant of the token)
    r_pn = pn / (pn + table) * r_per_layer
    looked_up = float((r_per_layer - r_pn).sum())
    w = model.per_layer_model_projection.weight  # its scale and the norm pass relevance on
    relevance = relevance + _linear_messages(x, w, r_pn.reshape(t, -1), projected)
    return relevance.numpy(), absorbed, looked_up, logit


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("arch", list(GEMMA4))
def test_gemma4_equals_explicit_layer_by_layer_lrp(arch, rule):
    model = _double(*_gemma4(**GEMMA4[arch]))
    got = ax.lrp(model, PROMPT, TARGET, rule=rule)
    ids = got.source_id.values.tolist()
    logits = _logits(model, got)
    for k, position in enumerate(got.target.values.tolist()):
        want, absorbed, looked_up, logit = gemma4_lrp_reference(
            model.hf, ids, position - 1, int(got.target_id[k]), rule
        )
        # transformers' Gemma 4 norms round to float32 (attrax's rules and the reference's
        # norms compute in the model's float64)
        assert logit == pytest.approx(logits[k], rel=1e-5, abs=1e-5)
        # no biases: the sources hold the logit less what the softmaxes and the per-layer
        # embeddings' table absorb
        assert want.sum() + absorbed + looked_up == pytest.approx(logit, rel=1e-6, abs=1e-6)
        assert abs(looked_up) > 1e-3 and (absorbed == 0.0) == (rule == "cp-lrp")
        np.testing.assert_allclose(got[k].fillna(0).values, want, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("arch", list(GEMMA4))
def test_gemma4_rules_keep_the_forward_batches_and_both_modes(arch):
    """The patched layers, gates and norms compute Gemma 4's own logits; a padded batch's
    relevance is each text's alone (their per-layer embeddings looked up at their own ids); jvp
    and vjp linearise the rules alike."""
    hf, tok = _gemma4(**GEMMA4[arch])
    model = ax.load_model(hf, tokenizer=tok)
    ids = tok(PROMPT + TARGET, return_tensors="pt")["input_ids"]
    embeds, mask, index = model.embed(ids), torch.ones_like(ids), torch.tensor([[2, 4]])
    with torch.no_grad():
        want = hf(input_ids=ids).logits[:, [2, 4]]
    for rule in ("attnlrp", "cp-lrp"):
        with lrp_rules(model, rule), reading(ids):
            got = model.logits_at(embeds, mask, index)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    model = _double(hf, tok)
    _batched_equals_single(model, [PROMPT, "def f(x):"], [TARGET, " return x + 1"])
    reverse = ax.lrp(model, PROMPT, TARGET, reduce_hidden="sum", mode="reverse")
    forward = ax.lrp(model, PROMPT, TARGET, reduce_hidden="sum", mode="forward")
    np.testing.assert_allclose(forward.values, reverse.values, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo", "llama", "phi3", "pythia", "opt-projected"])
def test_the_rules_keep_the_forward(arch):
    # the rewritten modules compute the same values (float32): only the backward changes
    hf, tok = tiny_model(arch) if arch in ("gpt2", "gpt_neo", "llama") else BIAS_FREE[arch]()
    llama = ax.load_model(hf, tokenizer=tok)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    embeds, mask = llama.embed(ids), torch.ones_like(ids)
    index = torch.tensor([[2, 4]])
    want = llama.logits_at(embeds, mask, index)
    for rule in ("attnlrp", "cp-lrp"):
        with lrp_rules(llama, rule):
            got = llama.logits_at(embeds, mask, index)
        # float32 roundings: the LayerNorm is spelt out instead of fused
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("arch", "task"),
    [("roberta", "sequence"), ("electra", "sequence"), ("distilbert", "sequence"),
     ("xlm-roberta", "token"), ("deberta-v2", "sequence")],
)  # fmt: skip
def test_the_rules_keep_the_classifiers_forward(arch, task):
    # the patched heads (RoBERTa's torch.tanh) and norms compute the model's own logits
    hf, tok = tiny_classifier(arch, task=task)
    model = ax.load_model(hf, tokenizer=tok)
    ids = tok("the plot was good", return_tensors="pt")["input_ids"]
    embeds, mask = model.embed(ids), torch.ones_like(ids)
    index = torch.tensor([[0]]) if task == "sequence" else torch.tensor([[1, 3]])
    with torch.no_grad():
        logits = hf(input_ids=ids).logits
    want = logits[:, None] if task == "sequence" else logits[:, [1, 3]]
    for rule in ("attnlrp", "cp-lrp"):
        with lrp_rules(model, rule):
            got = model.logits_at(embeds, mask, index)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "arch",
    [
        "gpt2",
        "gpt_neo",
        "bert",
        "roberta",
        "xlm-roberta",
        "electra",
        "distilbert",
        "deberta-v2",
        "marian",
        "t5",
        "pythia",
        "opt",
    ],
)
def test_batched_equals_single(arch):
    # padding is masked in attrax's LRP attention as in the model's own (causal, bidirectional);
    # OPT counts its positions from the mask
    if arch in ENCODERS:
        model = _double(*tiny_classifier(arch))
        prompts, targets = ["the plot was good", "bad"], [[0, 2], [1, 2]]
    else:
        model = _double(*(NEIGHBOURS[arch]() if arch in NEIGHBOURS else tiny_model(arch)))
        prompts, targets = [PROMPT, "def f(x):"], [TARGET, " return x + 1"]
    _batched_equals_single(model, prompts, targets)


def _batched_equals_single(model: ax.Model, prompts: list, targets: list) -> None:
    """Each example of a padded batch has the relevance it has alone."""
    batched = ax.lrp(model, prompts, targets)
    for b, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        single = ax.lrp(model, prompt, target)
        part = batched.isel(example=b).sel(target=single.target, source=single.source)
        np.testing.assert_allclose(part.values, single.values, rtol=1e-9, atol=1e-12)


def test_forward_mode_equals_reverse_mode(llama):
    reverse = ax.lrp(llama, PROMPT, TARGET, reduce_hidden="sum", mode="reverse")
    forward = ax.lrp(llama, PROMPT, TARGET, reduce_hidden="sum", mode="forward")
    np.testing.assert_allclose(forward.values, reverse.values, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "arch", ["gemma3", "olmo2", "pythia", "opt-post-ln", "mt5", "codegen", "gpt_oss"]
)
def test_forward_mode_equals_reverse_mode_on_the_other_families(arch):
    # their patched norms (after the blocks, on queries and keys), mT5's gated feed-forward,
    # GPT-OSS's sinks and clamped experts, linearised alike by jvp and vjp
    model = _double(*(_gpt_oss() if arch == "gpt_oss" else BIAS_FREE[arch]()))
    reverse = ax.lrp(model, PROMPT, TARGET, reduce_hidden="sum", mode="reverse")
    forward = ax.lrp(model, PROMPT, TARGET, reduce_hidden="sum", mode="forward")
    np.testing.assert_allclose(forward.values, reverse.values, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("arch", ["roberta", "deberta-v2"])
def test_forward_mode_equals_reverse_mode_through_the_patched_head(arch):
    # RoBERTa's tanh head, DeBERTa's pooler (patched forwards) and DeBERTa's relative terms
    # linearised the same way by jvp and vjp
    model = _double(*tiny_classifier(arch))
    kw = {"reduce_hidden": "sum", "rule": "attnlrp"}
    reverse = ax.lrp(model, "the plot was good", [0, 1, 2], mode="reverse", **kw)
    forward = ax.lrp(model, "the plot was good", [0, 1, 2], mode="forward", **kw)
    np.testing.assert_allclose(forward.values, reverse.values, rtol=1e-9, atol=1e-12)


def test_unsupported_modules_are_refused():
    # XGLM: its attention runs in its own code, outside transformers' attention interface
    _, tok = tiny_model("gpt2")
    config = transformers.XGLMConfig(
        vocab_size=len(tok), d_model=32, num_layers=2, attention_heads=4, ffn_dim=64,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.XGLMForCausalLM(config).eval()
    with pytest.raises(ax.ModelError, match=r"lrp: XGLMForCausalLM does not route attention"):
        ax.lrp(ax.load_model(hf, tokenizer=tok), "a b", " c")
    # one foreign nonlinearity in a supported model is named, never silently propagated
    hf, tok = tiny_model("gpt2")
    hf.transformer.h[1].mlp.act = torch.nn.Sigmoid()
    with pytest.raises(ax.ModelError, match=r"modules Sigmoid \(`transformer\.h\.1\.mlp\.act`\)"):
        ax.lrp(ax.load_model(hf, tokenizer=tok), "a b", " c")


def test_clipped_queries_keys_and_values_are_refused():
    """OLMoE's ``clip_qkv`` clamps them in place inside its attention: no rule, a ModelError."""
    hf, tok = _causal_lm("Olmoe")
    hf.config.clip_qkv = 1.0
    with pytest.raises(ax.ModelError, match=r"clips its queries, keys and values \(clip_qkv=1.0"):
        ax.lrp(ax.load_model(hf, tokenizer=tok), PROMPT, TARGET)


def test_unsupported_encoder_parts_are_refused():
    # what the BERT family's rules do not cover is named, never silently propagated
    # DeBERTa-v2's pooler calls an activation it builds in the call: one without an identity rule
    hf, tok = tiny_classifier("deberta-v2", pooler_hidden_act="sigmoid")
    with pytest.raises(ax.ModelError, match=r"pooler activation 'sigmoid' of DeBERTa-v2"):
        ax.lrp(ax.load_model(hf, tokenizer=tok), "good", 0)
    # a RoBERTa with cross-attention layers
    hf, tok = tiny_classifier("roberta", is_decoder=True, add_cross_attention=True)
    with pytest.raises(
        ax.ModelError, match=r"RobertaCrossAttention \(`roberta\.encoder\.layer\.0\.crossattention"
    ):
        ax.lrp(ax.load_model(hf, tokenizer=tok), "good", 0)
    # DistilBERT's generic class names are allowed from DistilBERT's module only
    hf, tok = tiny_classifier("distilbert")

    class FFN(torch.nn.Module):  # a gated feed-forward under DistilBERT's class name
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.sigmoid(x)

    hf.distilbert.transformer.layer[1].ffn = FFN()
    with pytest.raises(ax.ModelError, match=r"modules FFN \(`distilbert\.transformer\.layer\.1\."):
        ax.lrp(ax.load_model(hf, tokenizer=tok), "good", 0)
    # an activation that is a Python function is no module the walk can see
    hf, tok = tiny_classifier("electra")
    intermediate = hf.electra.encoder.layer[1].intermediate
    del intermediate.intermediate_act_fn  # a config with a callable hidden_act builds this
    intermediate.intermediate_act_fn = torch.nn.functional.silu
    where = r"`electra\.encoder\.layer\.1\.intermediate\.intermediate_act_fn` of Electra"
    with pytest.raises(ax.ModelError, match=where):
        ax.lrp(ax.load_model(hf, tokenizer=tok), "good", 0)


def test_options_are_checked(default_model):
    assert ax.lrp.attrax_resolve({})["objective"] == "logit"
    with pytest.raises(ax.OptionError, match="rule"):
        ax.lrp(default_model, "1 2 =", " 2 1", rule="lrp-0")


def test_cli_attribute_method_lrp(tmp_path):
    from attrax.cli import main

    out = tmp_path / "lrp.nc"
    args = ["attribute", "--method", "lrp", "--input", "1 2 3 =", "--target", " 3 2 1"]
    assert main([*args, "-o", "rule=cp-lrp", "--reduce", "sum", "--out", str(out)]) == 0
    da = ax.load(out)
    assert da.attrs["method"] == "lrp" and da.attrs["objective"] == "logit"
    assert '"rule": "cp-lrp"' in da.attrs["options"]
    direct = ax.lrp(ax.load_model(), "1 2 3 =", " 3 2 1", rule="cp-lrp")
    want = direct.sum("hidden", skipna=False).values
    np.testing.assert_allclose(da.values, want, rtol=1e-5, atol=1e-6)


def test_dataset_run(tmp_path, default_model):
    import json

    data = tmp_path / "data.jsonl"
    rows = [{"input": "1 2 3 =", "target": " 3 2 1"}, {"input": "4 5 =", "target": " 5 4"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    run = ax.attribute_dataset(
        default_model, data, out, method="lrp", reduce="sum", rule="cp-lrp", progress=False
    )
    assert run.records == 2
    got = ax.load_dataset_results(out).isel(example=1)
    direct = ax.lrp(default_model, "4 5 =", " 5 4", rule="cp-lrp", reduce_hidden="sum")
    part = got.sel(target=direct.target, source=direct.source)
    np.testing.assert_allclose(part.values, direct.values, rtol=1e-5, atol=1e-6)


def test_any_attention_implementation_gives_the_same_relevance():
    # the rules run attrax's own attention whatever the model was loaded with
    hf, tok = tiny_model("llama")
    eager = ax.load_model(hf, tokenizer=tok)
    hf, tok = tiny_model("llama", attn_implementation="sdpa")
    sdpa = ax.load_model(hf, tokenizer=tok, attn_implementation="sdpa")
    want = ax.lrp(eager, PROMPT, TARGET)
    np.testing.assert_allclose(ax.lrp(sdpa, PROMPT, TARGET).values, want.values, rtol=1e-5)
    assert sdpa.hf.config._attn_implementation == "sdpa"  # switched back afterwards


def test_contrastive_relevance_explains_the_logit_difference(llama):
    # CP-LRP on the bias-free Llama: relevance sums to logit(target) - logit(contrast) (float64)
    contrast = " is Rome."
    got = ax.lrp(llama, PROMPT, TARGET, contrast=contrast, rule="cp-lrp")
    ids = got.source_id.values.tolist()
    foil = llama.tokenizer(PROMPT + contrast)["input_ids"][-got.sizes["target"] :]
    for k, position in enumerate(got.target.values.tolist()):
        _, _, logit = llama_lrp_reference(
            llama.hf, ids, position - 1, int(got.target_id[k]), "cp-lrp"
        )
        _, _, other = llama_lrp_reference(llama.hf, ids, position - 1, foil[k], "cp-lrp")
        assert float(got[k].sum()) == pytest.approx(logit - other, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("arch", ["gpt2", "mistral", "bert", "roberta", "distilbert", "electra"])
def test_cp_lrp_is_conserved_at_every_layer(arch):
    # `layers=`: relevance read at each residual-stream layer (activation x modified gradient)
    # crosses only the blocks above it, each linear under CP-LRP: every layer sums to the logit
    model = _double(*BIAS_FREE[arch](), zero_biases=True)
    if model.task == "generation":
        got = ax.lrp(model, PROMPT, TARGET, rule="cp-lrp", layers="all")
    else:
        got = ax.lrp(model, "the plot was good", [0, 1], rule="cp-lrp", layers="all")
    assert got.sizes["layer"] == model.hf.config.num_hidden_layers + 1  # DistilBERT: n_layers
    tolerance = 1e-5 if arch == "mistral" else 1e-9
    logits = _logits(model, got.isel(layer=0))
    for layer in got["layer"].values:  # assertions only: one check per layer
        total = got.sel(layer=layer).sum(("source", "hidden")).values
        np.testing.assert_allclose(total, logits, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
def test_one_target_equals_the_same_target_among_many(default_model, rule):
    # a call with one target takes another backward path (no vmap): the rules must hold there too
    many = ax.lrp(default_model, "1 2 3 =", " 3 2 1", rule=rule)
    for position in many["target"].values:  # assertions only: one call per target position
        one = ax.lrp(default_model, "1 2 3 =", " 3 2 1", rule=rule, positions=[int(position)])
        np.testing.assert_allclose(
            one.values[0], many.sel(target=position).values, rtol=1e-5, atol=1e-7
        )


# the explicit reference for encoder-decoders (Marian, BART: post-LayerNorm blocks, biases,
# cross-attention), relevance messages layer by layer, both sides


def _attention_forward(att, hq: torch.Tensor, hkv: torch.Tensor, heads: int, causal: bool):
    """``att``'s multi-head attention of queries from ``hq`` over keys and values from ``hkv``,
    and what its messages need."""
    t, u = hq.shape[0], hkv.shape[0]
    d = hq.shape[-1] // heads
    zq, zk, zv = att.q_proj(hq), att.k_proj(hkv), att.v_proj(hkv)
    q, k, v = zq.view(t, heads, d), zk.view(u, heads, d), zv.view(u, heads, d)
    s = torch.einsum("ihd,jhd->hij", q, k) * d**-0.5
    if causal:
        s = s.masked_fill(~torch.ones(t, u, dtype=torch.bool).tril(), -torch.inf)
    a = torch.softmax(s, -1)
    o = torch.einsum("hij,jhd->ihd", a, v)
    y = att.out_proj(o.reshape(t, -1))
    return y, (hq, hkv, zq, zk, zv, q, k, v, s, a, o, y)


def _attention_backward(att, saved: tuple, r_y: torch.Tensor, rule: str):
    """Relevance of the attention's query input and of its key/value input."""
    hq, hkv, zq, zk, zv, q, k, v, s, a, o, y = saved
    t, u = hq.shape[0], hkv.shape[0]
    r_o = _linear_messages(o.reshape(t, -1), att.out_proj.weight, r_y, y)
    r_q, r_k, r_v, _ = _attention_messages(
        q, k, v, s, a, o, r_o.view(q.shape), q.shape[-1] ** -0.5, rule
    )
    r_hq = _linear_messages(hq, att.q_proj.weight, r_q.reshape(t, -1), zq)
    r_hkv = _linear_messages(hkv, att.k_proj.weight, r_k.reshape(u, -1), zk)
    return r_hq, r_hkv + _linear_messages(hkv, att.v_proj.weight, r_v.reshape(u, -1), zv)


def _residual_norm(h: torch.Tensor, update: torch.Tensor, norm) -> tuple[torch.Tensor, tuple]:
    """``norm(h + update)`` (post-LayerNorm) and what its messages need."""
    r = h + update
    n = norm(r)
    return n, (h, update, r, n)


def _residual_norm_backward(norm, saved: tuple, relevance: torch.Tensor):
    """Relevance of ``h`` and of ``update`` from that of ``norm(h + update)``."""
    h, update, r, n = saved
    r_r = _layer_norm_messages(r, norm, relevance, n)
    return h / r * r_r, update / r * r_r


def _feed_forward(layer, h: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    f = layer.fc1(h)
    g = layer.activation_fn(f)
    out = layer.fc2(g)
    return out, (h, f, g, out)


def _feed_forward_backward(layer, saved: tuple, r_out: torch.Tensor) -> torch.Tensor:
    h, f, g, out = saved
    r_g = _linear_messages(g, layer.fc2.weight, r_out, out)  # identity rule through the GELU
    return _linear_messages(h, layer.fc1.weight, r_g, f)


@torch.no_grad()
def _stack_inputs(hf, source: torch.Tensor, decoder: torch.Tensor) -> list[tuple]:
    """Per stack (encoder, decoder): the token-embedding part of the summed embeddings ``c x``,
    the sum ``e`` (with the positions) and the first block's input (``e``, or
    ``layernorm_embedding(e)``), read from the model's own forward by hooks."""
    stacks = [hf.get_encoder(), hf.get_decoder()]
    sums: list[list[torch.Tensor]] = [[], []]

    def run(zero_tokens: bool) -> list[torch.Tensor]:
        for kept in sums:
            kept.clear()
        handles = []
        for i, stack in enumerate(stacks):
            first = getattr(stack, "layernorm_embedding", None) or stack.layers[0]

            def keep(_m, args, kwargs, i=i):
                sums[i].append(args[0] if args else kwargs["hidden_states"])

            handles.append(first.register_forward_pre_hook(keep, with_kwargs=True))
            if zero_tokens:
                handles.append(
                    stack.embed_tokens.register_forward_hook(lambda _m, _a, y: torch.zeros_like(y))
                )
        try:
            hf(input_ids=source[None], decoder_input_ids=decoder[None])
        finally:
            for handle in handles:
                handle.remove()
        return [kept[0][0] for kept in sums]

    positions = run(zero_tokens=True)  # the summed embeddings without the tokens' share
    summed = run(zero_tokens=False)
    out = []
    for stack, e, p in zip(stacks, summed, positions, strict=True):
        norm = getattr(stack, "layernorm_embedding", None)
        out.append((e - p, e, norm, norm(e) if norm is not None else e))
    return out


@torch.no_grad()
def seq2seq_lrp_reference(
    hf, source: list[int], decoder: list[int], position: int, target: int, rule: str
) -> tuple[np.ndarray, np.ndarray, float]:
    """Relevance ``[S, H]`` of the source and ``[T, H]`` of the decoder token embeddings for the
    logit of ``target`` read at decoder position ``position``, and that logit (this forward's)."""
    encoder_stack, decoder_stack = hf.get_encoder(), hf.get_decoder()
    for stack in (encoder_stack, decoder_stack):
        assert getattr(stack, "layer_norm", None) is None  # post-norm: no final norm
    (x_src, e_src, ln_src, h_src), (x_dec, e_dec, ln_dec, h_dec) = _stack_inputs(
        hf, torch.tensor(source), torch.tensor(decoder)
    )
    heads = hf.config.encoder_attention_heads
    h, encoder_saved = h_src, []
    for layer in encoder_stack.layers:
        y, att = _attention_forward(layer.self_attn, h, h, heads, causal=False)
        n1, res1 = _residual_norm(h, y, layer.self_attn_layer_norm)
        out, ffn = _feed_forward(layer, n1)
        h, res2 = _residual_norm(n1, out, layer.final_layer_norm)
        encoder_saved.append((layer, att, res1, ffn, res2))
    memory = h
    heads = hf.config.decoder_attention_heads
    h, decoder_saved = h_dec, []
    for layer in decoder_stack.layers:
        y1, self_att = _attention_forward(layer.self_attn, h, h, heads, causal=True)
        n1, res1 = _residual_norm(h, y1, layer.self_attn_layer_norm)
        y2, cross = _attention_forward(layer.encoder_attn, n1, memory, heads, causal=False)
        n2, res2 = _residual_norm(n1, y2, layer.encoder_attn_layer_norm)
        out, ffn = _feed_forward(layer, n2)
        h, res3 = _residual_norm(n2, out, layer.final_layer_norm)
        decoder_saved.append((layer, self_att, res1, cross, res2, ffn, res3))
    relevance, logit = _head_relevance(hf, h, position, target)
    r_memory = torch.zeros_like(memory)
    for layer, self_att, res1, cross, res2, ffn, res3 in reversed(decoder_saved):
        r_n2, r_out = _residual_norm_backward(layer.final_layer_norm, res3, relevance)
        r_n2 = r_n2 + _feed_forward_backward(layer, ffn, r_out)
        r_n1, r_y2 = _residual_norm_backward(layer.encoder_attn_layer_norm, res2, r_n2)
        r_query, r_keys = _attention_backward(layer.encoder_attn, cross, r_y2, rule)
        r_memory = r_memory + r_keys
        r_h, r_y1 = _residual_norm_backward(layer.self_attn_layer_norm, res1, r_n1 + r_query)
        r_query, r_keys = _attention_backward(layer.self_attn, self_att, r_y1, rule)
        relevance = r_h + r_query + r_keys
    r_dec = relevance
    relevance = r_memory
    for layer, att, res1, ffn, res2 in reversed(encoder_saved):
        r_n1, r_out = _residual_norm_backward(layer.final_layer_norm, res2, relevance)
        r_n1 = r_n1 + _feed_forward_backward(layer, ffn, r_out)
        r_h, r_y = _residual_norm_backward(layer.self_attn_layer_norm, res1, r_n1)
        r_query, r_keys = _attention_backward(layer.self_attn, att, r_y, rule)
        relevance = r_h + r_query + r_keys
    r_src = relevance
    sides = _token_shares(
        ((x_src, e_src, ln_src, h_src, r_src), (x_dec, e_dec, ln_dec, h_dec, r_dec))
    )
    return sides[0], sides[1], logit


def _head_relevance(hf, h: torch.Tensor, position: int, target: int) -> tuple[torch.Tensor, float]:
    """Relevance of the decoder's last states ``h`` for the logit of ``target`` read at
    ``position``, and that logit: a language-model head's terms (its bias keeps its share), or
    a classifier's ``out_proj(tanh(dense(h)))`` (BART-MNLI's), the identity rule through tanh."""
    relevance = torch.zeros_like(h)
    head = getattr(hf, "classification_head", None)
    answers = getattr(hf, "qa_outputs", None)  # a Linear: row 0 the start logit, 1 the end's
    if answers is not None:
        z = answers(h[position])
        r_z = torch.zeros_like(z)
        r_z[target] = z[target]
        relevance[position] = _linear_messages(
            h[position][None], answers.weight, r_z[None], z[None]
        )[0]
        return relevance, float(z[target])
    if head is None:
        weight = hf.get_output_embeddings().weight[target]
        bias = getattr(hf, "final_logits_bias", None)
        logit = float(h[position] @ weight + (bias[0, target] if bias is not None else 0.0))
        relevance[position] = h[position] * weight
        return relevance, logit
    z1 = head.dense(h[position])
    g = torch.tanh(z1)
    z2 = head.out_proj(g)
    r_z2 = torch.zeros_like(z2)
    r_z2[target] = z2[target]  # the logit, which LRP distributes
    r_g = _linear_messages(g[None], head.out_proj.weight, r_z2[None], z2[None])
    relevance[position] = _linear_messages(h[position][None], head.dense.weight, r_g, z1[None])[0]
    return relevance, float(z2[target])


def _token_shares(stacks: tuple) -> list[np.ndarray]:
    """Per stack ``(x, e, norm, h0, r)``: the token embeddings' share ``x / e`` of the relevance
    of the summed embeddings ``e`` (through BART's or mBART's ``layernorm_embedding`` first). The
    position embeddings keep theirs (Marian's start token is the zero pad row, where ``e`` is a
    sinusoid's zero: nothing to share)."""
    sides = []
    for x, e, norm, h0, r in stacks:
        if norm is not None:
            r = _layer_norm_messages(e, norm, r, h0)
        sides.append(torch.where(x == 0, 0.0, x / e * r).numpy())
    return sides


def _pre_norm_block(norm, h: torch.Tensor, block) -> tuple[torch.Tensor, tuple]:
    """``h + block(norm(h))`` (a pre-LayerNorm sub-layer) and what its messages need."""
    n = norm(h)
    update, inner = block(n)
    return h + update, (norm, h, n, update, inner)


def _pre_norm_block_backward(saved: tuple, relevance: torch.Tensor, inner_backward):
    """Relevance of ``h`` from that of ``h + block(norm(h))``: the sum split in proportion to
    its summands, the block's share through ``inner_backward`` and the norm (its scale held)."""
    norm, h, n, update, inner = saved
    total = h + update
    r_n = inner_backward(inner, update / total * relevance)
    return h / total * relevance + _layer_norm_messages(h, norm, r_n, n)


@torch.no_grad()
def pre_norm_seq2seq_lrp_reference(
    hf, source: list[int], decoder: list[int], position: int, target: int, rule: str
) -> tuple[np.ndarray, np.ndarray, float]:
    """As :func:`seq2seq_lrp_reference` for the pre-norm M2M100 (NLLB), mBART and Pegasus: a
    LayerNorm before each attention and feed-forward (inside the block, the residual outside),
    and a final LayerNorm closing each stack (the encoder's read by the cross-attention)."""
    encoder_stack, decoder_stack = hf.get_encoder(), hf.get_decoder()
    (x_src, e_src, ln_src, h_src), (x_dec, e_dec, ln_dec, h_dec) = _stack_inputs(
        hf, torch.tensor(source), torch.tensor(decoder)
    )
    heads = hf.config.encoder_attention_heads
    h, encoder_saved = h_src, []
    for layer in encoder_stack.layers:
        attend = partial(_self_attention, layer.self_attn, heads, False)
        h, att = _pre_norm_block(layer.self_attn_layer_norm, h, attend)
        h, ffn = _pre_norm_block(layer.final_layer_norm, h, partial(_feed_forward, layer))
        encoder_saved.append((layer, att, ffn))
    encoder_last, memory = h, encoder_stack.layer_norm(h)
    h, decoder_saved = h_dec, []
    for layer in decoder_stack.layers:
        attend = partial(_self_attention, layer.self_attn, heads, True)
        h, own = _pre_norm_block(layer.self_attn_layer_norm, h, attend)
        read = partial(_cross_attention, layer.encoder_attn, heads, memory)
        h, cross = _pre_norm_block(layer.encoder_attn_layer_norm, h, read)
        h, ffn = _pre_norm_block(layer.final_layer_norm, h, partial(_feed_forward, layer))
        decoder_saved.append((layer, own, cross, ffn))
    final = decoder_stack.layer_norm(h)
    relevance, logit = _head_relevance(hf, final, position, target)
    relevance = _layer_norm_messages(h, decoder_stack.layer_norm, relevance, final)
    r_memory = torch.zeros_like(memory)
    for layer, own, cross, ffn in reversed(decoder_saved):
        relevance = _pre_norm_block_backward(ffn, relevance, partial(_feed_forward_backward, layer))
        # the cross-attention's query relevance to the decoder, its keys' to the encoder
        r_keys = []
        keys = partial(_cross_backward, layer.encoder_attn, rule, r_keys)
        relevance = _pre_norm_block_backward(cross, relevance, keys)
        r_memory = r_memory + r_keys[0]
        own_back = partial(_self_backward, layer.self_attn, rule)
        relevance = _pre_norm_block_backward(own, relevance, own_back)
    r_dec = relevance
    relevance = _layer_norm_messages(encoder_last, encoder_stack.layer_norm, r_memory, memory)
    for layer, att, ffn in reversed(encoder_saved):
        relevance = _pre_norm_block_backward(ffn, relevance, partial(_feed_forward_backward, layer))
        own_back = partial(_self_backward, layer.self_attn, rule)
        relevance = _pre_norm_block_backward(att, relevance, own_back)
    r_src = relevance
    sides = _token_shares(
        ((x_src, e_src, ln_src, h_src, r_src), (x_dec, e_dec, ln_dec, h_dec, r_dec))
    )
    return sides[0], sides[1], logit


def _self_attention(att, heads: int, causal: bool, n: torch.Tensor):
    return _attention_forward(att, n, n, heads, causal=causal)


def _cross_attention(att, heads: int, memory: torch.Tensor, n: torch.Tensor):
    return _attention_forward(att, n, memory, heads, causal=False)


def _self_backward(att, rule: str, saved: tuple, r_y: torch.Tensor) -> torch.Tensor:
    r_query, r_keys = _attention_backward(att, saved, r_y, rule)
    return r_query + r_keys


def _cross_backward(att, rule: str, keys: list, saved: tuple, r_y: torch.Tensor) -> torch.Tensor:
    r_query, r_keys = _attention_backward(att, saved, r_y, rule)
    keys.append(r_keys)
    return r_query


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("arch", ["marian", "bart", "m2m100", "mbart", "pegasus", "t5", "mt5"])
def test_encoder_decoders_equal_explicit_layer_by_layer_lrp(arch, rule):
    # cross-attention: under AttnLRP its query's relevance goes to the decoder, its keys' to
    # the encoder; attribute_target: both sides, against one reference (post-norm Marian and
    # BART; the pre-norm M2M100, mBART and Pegasus; T5 and mT5, whose relative position bias
    # is a constant in the scores: under AttnLRP it keeps its share of the softmax's relevance,
    # under CP-LRP the weights are constants and it keeps none)
    post_norm, t5 = arch in ("marian", "bart"), arch in ("t5", "mt5")
    if t5:
        model, reference = _double(*_t5(arch)), t5_lrp_reference
    elif post_norm:
        model, reference = _double(*tiny_model(arch)), seq2seq_lrp_reference
    else:
        model, reference = _double(*_translation_model(arch)), pre_norm_seq2seq_lrp_reference
    got = ax.lrp(model, PROMPT, TARGET, rule=rule, attribute_target=True)
    sides = got.side.values
    ids = got.source_id.values
    source, decoder = ids[sides == "source"].tolist(), ids[sides == "target"].tolist()
    with torch.no_grad():
        logits = model.hf(
            input_ids=torch.tensor([source]), decoder_input_ids=torch.tensor([decoder])
        ).logits[0]
    tolerance = 1e-5 if t5 else 1e-9  # T5's RMSNorm takes its variance in float32
    for k, position in enumerate(got.target.values.tolist()):
        target = int(got.target_id[k])
        r_src, r_dec, logit = reference(model.hf, source, decoder, position - 1, target, rule)
        # the reference's own forward is the model's
        want_logit = float(logits[position - 1, target])
        assert logit == pytest.approx(want_logit, rel=tolerance, abs=tolerance)
        want = np.concatenate([r_src, r_dec])
        np.testing.assert_allclose(got[k].fillna(0).values, want, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("arch", ["bart", "mbart", "t5"])
def test_encoder_decoder_classifiers_equal_explicit_layer_by_layer_lrp(arch, rule):
    # BART-MNLI's head: each token reaches the class through the encoder and, shifted right,
    # through the decoder: its relevance is the sum of its two embeddings' (the decoder's start
    # token, no input token, keeps its own); mBART's decoder starts with the last token
    model = _double(*tiny_classifier(arch))
    reference = {"bart": seq2seq_lrp_reference, "mbart": pre_norm_seq2seq_lrp_reference}.get(
        arch, t5_lrp_reference
    )
    tolerance = 1e-5 if arch == "t5" else 1e-9  # T5's RMSNorm takes its variance in float32
    for item in ("the plot was good", ("the plot was good", "it was")):
        got = ax.lrp(model, item, "all", rule=rule)
        source = got.source_id.values.tolist()
        first = source[-1] if arch == "mbart" else model.hf.config.decoder_start_token_id
        decoder = [first, *source[:-1]]
        eos = max(p for p, t in enumerate(source) if t == model.hf.config.eos_token_id)
        with torch.no_grad():
            logits = model.hf(input_ids=torch.tensor([source])).logits[0]
        for k in range(len(model.labels)):
            r_src, r_dec, logit = reference(model.hf, source, decoder, eos, k, rule)
            assert logit == pytest.approx(float(logits[k]), rel=tolerance, abs=tolerance)
            want = r_src.copy()
            want[:-1] += r_dec[1:]
            if arch == "mbart":
                want[-1] += r_dec[0]
            np.testing.assert_allclose(got[k].values, want, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("arch", ["bart", "mbart", "t5"])
def test_encoder_decoder_answerers_equal_explicit_layer_by_layer_lrp(arch, rule):
    # BartForQuestionAnswering and kin: the start logit at the answer's first token and the end
    # logit at its last, each read from the decoder there (a Linear: its bias keeps its share)
    model = _double(*tiny_classifier(arch, "question-answering"))
    reference = {"bart": seq2seq_lrp_reference, "mbart": pre_norm_seq2seq_lrp_reference}.get(
        arch, t5_lrp_reference
    )
    tolerance = 1e-5 if arch == "t5" else 1e-9
    got = ax.lrp(model, ("where did the cat sit", "the cat sat on the mat"), "the mat", rule=rule)
    source = got.source_id.values.tolist()
    first = source[-1] if arch == "mbart" else model.hf.config.decoder_start_token_id
    decoder = [first, *source[:-1]]
    with torch.no_grad():
        out = model.hf(input_ids=torch.tensor([source]))
    for k, name in enumerate(("start", "end")):
        position = int(got.target_position[k])
        r_src, r_dec, logit = reference(model.hf, source, decoder, position, k, rule)
        want_logit = float(getattr(out, f"{name}_logits")[0, position])
        assert logit == pytest.approx(want_logit, rel=tolerance, abs=tolerance)
        want = r_src.copy()
        want[:-1] += r_dec[1:]
        if arch == "mbart":
            want[-1] += r_dec[0]
        np.testing.assert_allclose(got[k].values, want, rtol=1e-7, atol=1e-10)


# the explicit reference for T5 and mT5: RMSNorm sub-layers (no biases), unscaled scores plus a
# relative position bias, ReLU or gated-GELU feed-forwards, the decoder's output scaled when tied


def _t5_attention(att, hq: torch.Tensor, hkv: torch.Tensor, bias: torch.Tensor, causal: bool):
    """T5's attention of queries from ``hq`` over ``hkv``: ``q . k`` unscaled plus ``bias``
    ``[heads, T, U]``, and what its messages need."""
    t, u, heads = hq.shape[0], hkv.shape[0], att.n_heads
    q, k, v = (p(h).view(-1, heads, att.key_value_proj_dim) for p, h in
               ((att.q, hq), (att.k, hkv), (att.v, hkv)))  # fmt: skip
    s = torch.einsum("ihd,jhd->hij", q, k) + bias
    if causal:
        s = s.masked_fill(~torch.ones(t, u, dtype=torch.bool).tril(), -torch.inf)
    a = torch.softmax(s, -1)
    o = torch.einsum("hij,jhd->ihd", a, v)
    return att.o(o.reshape(t, -1)), (hq, hkv, q, k, v, s, a, o)


def _t5_attention_backward(att, saved: tuple, r_y: torch.Tensor, rule: str) -> tuple:
    """Relevance of the query input and of the key/value input from that of the output."""
    hq, hkv, q, k, v, s, a, o = saved
    t, u = hq.shape[0], hkv.shape[0]
    o_flat = o.reshape(t, -1)
    r_o = _linear_messages(o_flat, att.o.weight, r_y, o_flat @ att.o.weight.T)
    r_q, r_k, r_v, _ = _attention_messages(q, k, v, s, a, o, r_o.view(o.shape), 1.0, rule)
    # q, k, v are bias-free projections of the inputs
    r_hq = _linear_messages(hq, att.q.weight, r_q.reshape(t, -1), q.reshape(t, -1))
    r_hkv = _linear_messages(hkv, att.k.weight, r_k.reshape(u, -1), k.reshape(u, -1))
    r_hkv = r_hkv + _linear_messages(hkv, att.v.weight, r_v.reshape(u, -1), v.reshape(u, -1))
    return r_hq, r_hkv


def _t5_feed_forward(ff, n: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    dense = ff.DenseReluDense
    if hasattr(dense, "wi_0"):  # gated GELU (T5 v1.1, mT5)
        out, saved = _gated_forward(n, dense.wi_0.weight, dense.wi_1.weight, dense.wo.weight,
                                    dense.act)  # fmt: skip
        return out, ("gated", saved)
    f = n @ dense.wi.weight.T
    g = torch.relu(f)
    out = g @ dense.wo.weight.T
    return out, ("relu", (n, f, g, out))


def _t5_feed_forward_backward(ff, saved: tuple, r_out: torch.Tensor, rule: str) -> torch.Tensor:
    kind, inner = saved
    if kind == "gated":
        return _gated_backward(inner, r_out, rule)
    n, f, g, out = inner  # the identity rule through the ReLU
    r_g = _linear_messages(g, ff.DenseReluDense.wo.weight, r_out, out)
    return _linear_messages(n, ff.DenseReluDense.wi.weight, r_g, f)


def _residual(h: torch.Tensor, update: torch.Tensor, relevance: torch.Tensor) -> tuple:
    """Relevance of ``h`` and of ``update`` from that of ``h + update``, in proportion."""
    total = h + update
    return h / total * relevance, update / total * relevance


@torch.no_grad()
def t5_lrp_reference(
    hf, source: list[int], decoder: list[int], position: int, target: int, rule: str
) -> tuple[np.ndarray, np.ndarray, float]:
    """Relevance ``[S, H]`` of the source and ``[T, H]`` of the decoder token embeddings for the
    logit of ``target`` at decoder position ``position``, and that logit. An RMSNorm with its
    ``1 / rms`` constant scales each unit by a constant: relevance passes it unchanged. The
    position biases (constants) keep what AttnLRP's softmax rule gives them."""
    config = hf.config
    encoder, decoder_stack = hf.get_encoder(), hf.get_decoder()
    embed = hf.get_input_embeddings().weight
    x_src, x_dec = embed[torch.tensor(source)], embed[torch.tensor(decoder)]
    norm = partial(_t5_norm)
    s, t = len(source), len(decoder)
    own = encoder.block[0].layer[0].SelfAttention.compute_bias(s, s)[0]
    h, encoder_saved = x_src, []
    for block in encoder.block:
        self_layer, ff = block.layer[0], block.layer[-1]
        y, att = _t5_attention(self_layer.SelfAttention, norm(self_layer.layer_norm, h),
                               norm(self_layer.layer_norm, h), own, causal=False)  # fmt: skip
        h1 = h + y
        out, inner = _t5_feed_forward(ff, norm(ff.layer_norm, h1))
        encoder_saved.append((block, h, y, att, h1, out, inner))
        h = h1 + out
    memory = norm(encoder.final_layer_norm, h)
    own = decoder_stack.block[0].layer[0].SelfAttention.compute_bias(t, t)[0]
    none = torch.zeros(config.num_heads, t, s, dtype=h.dtype)  # cross-attention: no bias
    h, decoder_saved = x_dec, []
    for block in decoder_stack.block:
        self_layer, cross_layer, ff = block.layer
        n = norm(self_layer.layer_norm, h)
        y1, att = _t5_attention(self_layer.SelfAttention, n, n, own, causal=True)
        h1 = h + y1
        y2, cross = _t5_attention(cross_layer.EncDecAttention, norm(cross_layer.layer_norm, h1),
                                  memory, none, causal=False)  # fmt: skip
        h2 = h1 + y2
        out, inner = _t5_feed_forward(ff, norm(ff.layer_norm, h2))
        decoder_saved.append((block, h, y1, att, h1, y2, cross, h2, out, inner))
        h = h2 + out
    final = norm(decoder_stack.final_layer_norm, h)
    classifier = any(hasattr(hf, head) for head in ("classification_head", "qa_outputs"))
    if getattr(config, "scale_decoder_outputs", False) and not classifier:  # T5's tied LM head
        final = final * config.d_model**-0.5
    # RMSNorm and the scale pass it unchanged
    relevance, logit = _head_relevance(hf, final, position, target)
    r_memory = torch.zeros_like(memory)
    for block, h, y1, att, h1, y2, cross, h2, out, inner in reversed(decoder_saved):
        self_layer, cross_layer, ff = block.layer
        r_h2, r_out = _residual(h2, out, relevance)
        r_h2 = r_h2 + _t5_feed_forward_backward(ff, inner, r_out, rule)
        r_h1, r_y2 = _residual(h1, y2, r_h2)
        r_query, r_keys = _t5_attention_backward(cross_layer.EncDecAttention, cross, r_y2, rule)
        r_memory = r_memory + r_keys
        r_h, r_y1 = _residual(h, y1, r_h1 + r_query)
        r_query, r_keys = _t5_attention_backward(self_layer.SelfAttention, att, r_y1, rule)
        relevance = r_h + r_query + r_keys
    r_dec, relevance = relevance, r_memory
    for block, h, y, att, h1, out, inner in reversed(encoder_saved):
        self_layer, ff = block.layer[0], block.layer[-1]
        r_h1, r_out = _residual(h1, out, relevance)
        r_h1 = r_h1 + _t5_feed_forward_backward(ff, inner, r_out, rule)
        r_h, r_y = _residual(h, y, r_h1)
        r_query, r_keys = _t5_attention_backward(self_layer.SelfAttention, att, r_y, rule)
        relevance = r_h + r_query + r_keys
    return relevance.numpy(), r_dec.numpy(), logit


def _t5_norm(norm, h: torch.Tensor) -> torch.Tensor:
    return _rms(h, norm.weight, norm.variance_epsilon)


def _t5(arch: str) -> tuple:
    """A tiny T5 (ReLU, its decoder's output scaled) or mT5 (gated GELU), random norm
    weights."""
    hf, tok = tiny_model("t5") if arch == "t5" else _translation_model("mt5")
    with torch.no_grad():
        for module in hf.modules():
            if type(module).__name__.endswith("LayerNorm"):
                module.weight.normal_(1.0, 0.3)
    return hf, tok


def test_a_position_embedding_type_transformers_ignores_does_not_refuse_lrp():
    """transformers 5's BERT has no relative-key scores: a config asking for them builds the
    same model (same parameters, same logits), which LRP refused (until 2026-12-06)."""
    plain, tok = tiny_classifier("bert", "sequence")
    asked, _ = tiny_classifier("bert", "sequence", position_embedding_type="relative_key")
    assert not any(hasattr(m, "distance_embedding") for m in asked.modules())
    text = "the plot was good"
    got = ax.lrp(ax.load_model(asked, tokenizer=tok), text, "all")
    np.testing.assert_array_equal(
        got.values, ax.lrp(ax.load_model(plain, tokenizer=tok), text, "all").values
    )
