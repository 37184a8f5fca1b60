"""Config sniffing in one place: what a Hugging Face config says about layers, heads, widths and
positions, under the many names architectures give them."""

from __future__ import annotations

from typing import Any

# config keys, in order of preference, per attention stack: "self" is a decoder-only model's,
# "cross" an encoder-decoder's decoder (self and cross), "encoder" its encoder
_LAYER_KEYS = {
    "self": ("num_hidden_layers", "n_layer", "num_layers"),
    "cross": ("decoder_layers", "num_decoder_layers", "num_layers", "num_hidden_layers"),
    "encoder": ("encoder_layers", "num_layers", "num_hidden_layers"),
}
_HEAD_KEYS = {
    "self": ("num_attention_heads", "n_head", "num_heads"),
    "cross": ("decoder_attention_heads", "num_heads", "num_attention_heads"),
    "encoder": ("encoder_attention_heads", "num_heads", "num_attention_heads"),
}
_MLP_KEYS = (
    "intermediate_size",
    "n_inner",
    "ffn_dim",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "d_ff",
)
_POSITION_KEYS = ("n_positions", "max_position_embeddings")


def _first_positive(config: Any, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def layers(config: Any, stack: str) -> int | None:
    """Number of layers of ``stack`` (``"self"``, ``"cross"`` or ``"encoder"``), if the config says.

    >>> from transformers import GPT2Config
    >>> layers(GPT2Config(n_layer=3), "self")
    3
    """
    return _first_positive(config, _LAYER_KEYS[stack])


def heads(config: Any, stack: str) -> int | None:
    """Attention heads per layer of ``stack``, if the config says."""
    return _first_positive(config, _HEAD_KEYS[stack])


def mlp_width(config: Any) -> int:
    """The widest MLP hidden layer the config names (0 when it names none); for a mixture of
    experts, the width of the dense MLP it is priced as (:func:`experts_width`).

    >>> from transformers import LlamaConfig, MixtralConfig
    >>> mlp_width(LlamaConfig(intermediate_size=688))
    688
    >>> mlp_width(MixtralConfig(hidden_size=256, intermediate_size=896, num_experts_per_tok=2))
    2304
    """
    routed = experts_width(config)
    if routed:
        return routed
    values = [getattr(config, key, None) for key in _MLP_KEYS]
    return max([v for v in values if isinstance(v, int) and not isinstance(v, bool)] or [0])


def _positive(config: Any, key: str) -> int:
    return max(per_layer(config, key))


def per_layer(config: Any, key: str) -> list[int]:
    """``key`` (a positive int, else 0) of each layer where a config's layers differ
    (transformers' ``per_layer_config``: Gemma 4's global layers' heads), else its one value.

    >>> from transformers import Gemma4TextConfig, LlamaConfig
    >>> per_layer(Gemma4TextConfig(num_hidden_layers=2, head_dim=8, global_head_dim=16,
    ...     layer_types=["sliding_attention", "full_attention"]), "head_dim")
    [8, 16]
    >>> per_layer(LlamaConfig(num_key_value_heads=2), "num_key_value_heads")
    [2]
    """
    try:
        values = [getattr(config, key, None)]
    except RuntimeError:  # transformers refuses a global value that differs by layer
        layers = config.per_layer_config
        values = [getattr(layers[i], key, None) for i in range(config.num_hidden_layers)]
    return [v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0 for v in values]


#: mixtures of experts with Llama's layout (their routed `mlp`, Granite MoE's `block_sparse_moe`,
#: is the module whose output the residual adds; GPT-OSS's attention has sinks)
EXPERTS = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "granitemoe",
    "gpt_oss",
    # multi-head latent attention (keys and values expanded from one latent per token by
    # `kv_b_proj`), shared experts beside the routed ones; GLM-4.7-Flash's is `glm4_moe_lite`
    "deepseek_v2",
    "deepseek_v3",
    "deepseek_v32",
    "glm4_moe_lite",
    "glm_moe_dsa",  # GLM-5: V3.2's indexer, some layers reusing the previous one's picks
    "glm4_moe",  # GLM-4.5: DeepSeek V3's experts beside Llama's attention
    "minimax_m2",  # a sigmoid router with a score correction, query and key norms
    "ernie4_5_moe",  # ERNIE 4.5's attention, shared experts
    "hunyuan_v1_moe",  # HunYuan's attention, a shared MLP inside its mixture
)


def experts_width(config: Any) -> int:
    """A mixture of experts' layer priced as a dense MLP (0 for a dense model): each token's
    ``k`` experts keep their own copy of its input and of their output besides their activations,
    so ``k * (expert width + hidden)``, plus a shared expert's width (Qwen2-MoE, Granite MoE
    shared, DeepSeek); Llama 4's experts each run on every token, so all of them count.
    docs/memory.md says how it compares with what such layers save."""
    k = _positive(config, "num_experts_per_tok")
    pattern = getattr(config, "hybrid_override_pattern", None)  # Nemotron-H: "E" marks experts
    if not k or (isinstance(pattern, str) and "E" not in pattern):
        return 0
    hidden = _positive(config, "hidden_size")
    expert = _positive(config, "moe_intermediate_size") or _positive(config, "intermediate_size")
    shared = (
        _positive(config, "shared_expert_intermediate_size")
        or _positive(config, "shared_intermediate_size")
        or _positive(config, "n_shared_experts") * expert
    )
    if getattr(config, "model_type", None) == "llama4_text":
        # every expert runs on every token (the unchosen ones on zeros), beside a shared one
        return _positive(config, "num_local_experts") * (expert + hidden) + expert
    return k * (expert + hidden) + shared


def _first(config: Any, keys: tuple[str, ...]) -> int:
    return next((v for v in (_positive(config, key) for key in keys) if v), 0)


def mixer_width(config: Any, tokens: int) -> int:
    """Per token and layer, the widest activation of the state-space or linear-attention layers
    of a Mamba model or a hybrid (Jamba, Bamba, Granite 4, Nemotron-H, Qwen3-Next...) as
    transformers' torch path computes them; 0 for a model without. Mamba 2's chunked scan and
    Qwen3-Next's gated delta rule keep ``[heads, chunk, chunk]`` per chunk of the padded
    sequence; Mamba's selective scan ``[d_inner, d_state]`` per token.

    >>> from transformers import BambaConfig, JambaConfig, LlamaConfig
    >>> mixer_width(JambaConfig(hidden_size=256, mamba_expand=2, mamba_d_state=16), 100)
    8192
    >>> mixer_width(BambaConfig(hidden_size=256, mamba_n_heads=8, mamba_chunk_size=256), 128)
    5120
    >>> mixer_width(LlamaConfig(), 100)
    0
    """
    linear = _positive(config, "linear_num_value_heads")
    if linear:  # Qwen3-Next's gated delta rule: 64-token chunks, projections of 2 q, k, v, z
        keys = _positive(config, "linear_num_key_heads") * _positive(config, "linear_key_head_dim")
        values = linear * _positive(config, "linear_value_head_dim")
        padded = -(-max(tokens, 1) // 64) * 64
        return linear * 64 * padded // max(tokens, 1) + 4 * (keys + values)
    state = _first(config, ("mamba_d_state", "ssm_state_size", "state_size"))
    hidden = _positive(config, "hidden_size")
    if not state or not hidden:
        return 0
    inner = (
        _positive(config, "mamba_d_ssm")
        or (_first(config, ("mamba_expand", "expand")) or 2) * hidden
    )
    chunk = _first(config, ("mamba_chunk_size", "chunk_size"))
    if not chunk:  # Mamba: the discretized state of every token
        return inner * state
    heads = _first(config, ("mamba_n_heads", "mamba_num_heads", "n_mamba_heads", "num_heads"))
    padded = -(-max(tokens, 1) // chunk) * chunk  # the scan pads the sequence to whole chunks
    return heads * chunk * padded // max(tokens, 1) + 2 * inner


def relative_width(config: Any, tokens: int) -> int:
    """Per token and layer, the entries a layer keeps for the backward beyond what its widths
    price (0 for most models). DeBERTa-v2's relative-position terms, besides what a BERT layer
    keeps: each term (c2p, p2c)
    keeps its ``[heads, 2 * span]`` products with every relative position (the input of the
    gather that picks each pair's) and its ``[2 * span, hidden]`` projection of the positions,
    shared by the layer's tokens.

    >>> from transformers import BertConfig, DebertaV2Config
    >>> relative_width(DebertaV2Config(hidden_size=768, num_attention_heads=12,
    ...     relative_attention=True, position_buckets=256, pos_att_type=["p2c", "c2p"]), 128)
    18432
    >>> relative_width(BertConfig(), 128)
    0

    Gemma 4's per-layer embeddings (``hidden_size_per_layer_input`` wide) keep 8 hidden-wide
    entries and 4 of their own width more (measured on a 256-wide model with 64-wide ones: 4.5
    hidden-wide in float32, 7.5 in bfloat16), and heads wider than ``hidden / heads`` keep more
    (:func:`attention_width`).
    """
    extra = attention_width(config)
    per_layer_input = _positive(config, "hidden_size_per_layer_input")
    if per_layer_input:
        extra += 8 * _positive(config, "hidden_size") + 4 * per_layer_input
    return extra + _relative_terms(config, tokens)


def attention_width(config: Any) -> int:
    """Per token and layer (the mean over layers), the entries an attention keeps beyond what a
    model priced by its hidden width does: 4 for each query, key, value and output entry past
    ``hidden / heads`` a head. Qwen3-0.6B's heads are twice that wide, Gemma 4's global ones
    up to four times; on 256-wide models a Qwen3 with heads twice as wide saved 2.4 (float32)
    to 2.9 (bfloat16) entries more per such entry.

    >>> from transformers import LlamaConfig, Qwen3Config
    >>> attention_width(LlamaConfig(hidden_size=256, num_attention_heads=4))
    0
    >>> attention_width(Qwen3Config(hidden_size=256, num_attention_heads=4,
    ...     num_key_value_heads=2, head_dim=128))
    3072
    """
    heads, hidden = _positive(config, "num_attention_heads"), _positive(config, "hidden_size")
    dims = [d for d in per_layer(config, "head_dim") if d]
    if not heads or not hidden or not dims:
        return 0
    kv = max(per_layer(config, "num_key_value_heads")) or heads
    excess = sum(max(0, d - hidden // heads) for d in dims) / len(dims)
    return int(4 * excess * (2 * heads + 2 * kv))


def _relative_terms(config: Any, tokens: int) -> int:
    """DeBERTa-v2's relative-position terms (:func:`relative_width`), 0 for another model."""
    if getattr(config, "model_type", None) != "deberta-v2" or not getattr(
        config, "relative_attention", False
    ):
        return 0
    kinds = getattr(config, "pos_att_type", None) or []
    terms = ("c2p" in kinds) + ("p2c" in kinds)
    span = (
        _positive(config, "position_buckets")
        or _positive(config, "max_relative_positions")
        or _positive(config, "max_position_embeddings")
    )
    heads, hidden = _positive(config, "num_attention_heads"), _positive(config, "hidden_size")
    shared = -(-2 * span * hidden // max(tokens, 1))
    return terms * (heads * 2 * span + shared)


def kv_heads(config: Any) -> int:
    """Key/value heads of the self-attention: ``num_key_value_heads`` under grouped queries, one
    for GPT-BigCode's multi-query attention, else as many as the query heads (at least 1).

    >>> from transformers import GPTBigCodeConfig, LlamaConfig
    >>> kv_heads(LlamaConfig(num_attention_heads=8, num_key_value_heads=2))
    2
    >>> kv_heads(GPTBigCodeConfig(n_head=4, multi_query=True))
    1
    """
    if getattr(config, "new_decoder_architecture", False):  # Falcon-40B's groups
        return _positive(config, "num_kv_heads") or heads(config, "self") or 1
    if getattr(config, "multi_query", False) is True:  # GPT-BigCode's, Falcon-7B's
        return 1
    kv = _positive(config, "num_key_value_heads") or _positive(config, "num_kv_heads")
    return kv or heads(config, "self") or 1


def falcon_values(config: Any) -> list[int]:
    """Which features of Falcon's fused ``query_key_value`` output are its values, key/value
    head by key/value head: each group's queries then its key and value (``new_decoder_
    architecture``: Falcon-40B, 180B), every query head then one key and one value head
    (``multi_query``: Falcon-7B), or each head's query, key and value side by side.

    >>> from transformers import FalconConfig
    >>> falcon_values(FalconConfig(hidden_size=8, num_attention_heads=2, multi_query=True))
    [12, 13, 14, 15]
    >>> falcon_values(FalconConfig(hidden_size=8, num_attention_heads=2, multi_query=False))
    [8, 9, 10, 11, 20, 21, 22, 23]
    """
    count = heads(config, "self") or 1
    d = _positive(config, "hidden_size") // count
    kv = kv_heads(config)
    if getattr(config, "new_decoder_architecture", False):
        group = (count // kv + 2) * d  # a group's queries, its key, its value
        starts = [g * group + group - d for g in range(kv)]
    elif getattr(config, "multi_query", False):
        starts = [(count + 1) * d]
    else:
        starts = [h * 3 * d + 2 * d for h in range(count)]
    return [start + i for start in starts for i in range(d)]


def max_positions(config: Any, padding_idx: int | None = None) -> int | None:
    """Tokens the model's absolute positions hold; None for relative positions (T5, DeBERTa-v3
    without ``position_biased_input``): no hard limit. RoBERTa's family numbers positions from
    ``padding_idx + 1`` (its embeddings' ``padding_idx``): that many fewer tokens fit."""
    if getattr(config, "position_biased_input", True) is False:
        return None
    table = _first_positive(config, _POSITION_KEYS)
    if table is None or padding_idx is None:
        return table
    return table - padding_idx - 1


#: model types whose blocks also norm each attention's and MLP's output before the residual
#: adds it (Gemma 2, Gemma 3; OLMo 2 norms only there): more saved per layer, and a norm that
#: direct logit attribution and ALTI hold at its scale
SANDWICH = ("gemma2", "gemma3_text", "olmo2", "olmo3", "glm4", "exaone4")


def sandwich_norms(block: Any) -> tuple[Any, Any]:
    """A :data:`SANDWICH` block's norms of its attention's and its MLP's outputs (GLM-4 names
    them ``post_self_attn_layernorm`` and ``post_mlp_layernorm``; its ``post_attention_layernorm``
    is the MLP's input norm)."""
    if hasattr(block, "post_mlp_layernorm"):
        return block.post_self_attn_layernorm, block.post_mlp_layernorm
    return block.post_attention_layernorm, block.post_feedforward_layernorm


#: encoder-decoders of BART's layout with a LayerNorm before each sub-layer (inside it) and one
#: closing each stack: NLLB's M2M100, mBART, Pegasus
PRE_NORM_SEQ2SEQ = ("m2m_100", "mbart", "pegasus")


#: model types whose LM head divides its logits by ``config.logits_scaling`` and whose blocks scale
#: what they add to the residual stream by ``config.residual_multiplier`` (IBM Granite)
GRANITE = (
    "granite",
    "granite_swa",
    "granitemoe",
    "granitemoe_swa",
    "granitemoeshared",
    "granitemoehybrid",
)


def logit_scale(config: Any) -> float:
    """The factor a causal LM multiplies its head's output by: ``1 / logits_scaling`` for Granite,
    Cohere's (Command R's) ``logit_scale``, 1 for every other model.

    >>> from transformers import CohereConfig, GraniteConfig, LlamaConfig
    >>> logit_scale(GraniteConfig(logits_scaling=8.0)), logit_scale(LlamaConfig())
    (0.125, 1.0)
    >>> logit_scale(CohereConfig(logit_scale=0.0625))
    0.0625
    """
    kind = getattr(config, "model_type", None)
    if kind in GRANITE:
        return 1.0 / float(config.logits_scaling)
    if kind in ("cohere", "cohere2"):
        return float(config.logit_scale)
    return 1.0


def branch_scale(config: Any) -> float:
    """The factor a decoder block multiplies its attention's and its MLP's outputs by before the
    residual stream adds them: Granite's ``residual_multiplier``, 1 for every other model.

    >>> from transformers import GraniteConfig, LlamaConfig
    >>> branch_scale(GraniteConfig(residual_multiplier=0.22)), branch_scale(LlamaConfig())
    (0.22, 1.0)
    """
    if getattr(config, "model_type", None) in GRANITE:
        return float(config.residual_multiplier)
    return 1.0


def family(config: Any) -> str:
    """The memory-estimate family (``_memory.LIVE_TENSORS``): ``"encoder-decoder"``, ``"gemma"``
    (Llama's, with norms after attention and MLP as well: Gemma 2, 3 and 4, OLMo 2), ``"llama"``
    (RMSNorm and a gated MLP: Llama, Mistral, Qwen, Gemma...) or ``"gpt2"`` (everything else).

    >>> from transformers import Gemma3TextConfig, LlamaConfig
    >>> family(LlamaConfig()), family(Gemma3TextConfig())
    ('llama', 'gemma')
    """
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    # Gemma 4 norms attention's and MLP's outputs too (and adds its per-layer embeddings)
    if getattr(config, "model_type", None) in (*SANDWICH, "gemma4_text"):
        return "gemma"
    if getattr(config, "rms_norm_eps", None) is not None and _first_positive(
        config, ("intermediate_size",)
    ):
        return "llama"
    return "gpt2"


def total_layers(config: Any) -> int:
    """Layers a token's forward goes through: the encoder's and the decoder's, or the one stack."""
    if getattr(config, "is_encoder_decoder", False):
        return (layers(config, "encoder") or 1) + (layers(config, "cross") or 1)
    return layers(config, "self") or 1
