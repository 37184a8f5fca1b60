"""More families than ``attrax.testing`` builds: saliency equals a plain autograd loop.

Each is a tiny random model from its config (offline), sharing the GPT-2 test tokenizer. They cover
what differs between families: rotary and ALiBi positions (Pythia, BLOOM, Falcon), GPT-Neo's
unscaled attention in its own code (attrax runs it) with a local layer, GPT-J's and Phi's parallel
blocks, CodeGen's sharded query/value/key projection, GPT-BigCode's multi-query attention, StarCoder2, OLMo's weightless LayerNorms, Cohere's
scaled logits, grouped-query
attention (Qwen2, Gemma 2), query and key norms (Qwen3, Gemma 3), layers without positions
(SmolLM3), norms after attention and MLP (Gemma 2, Gemma 3, OLMo 2), logit soft-capping and sliding
windows (Gemma 2, Gemma 3), learned positions with an offset (OPT), a fused QKV projection
(Phi-3), BLOOM's tanh-GELU written as an old-style ``autograd.Function`` (which ``torch.func``
cannot run), Falcon's attention, which cannot be switched after loading, Granite's constant
multipliers (its logits divided by ``logits_scaling``), mixtures of experts (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE, Granite MoE: top-k routers), and the state-space Mamba and Mamba 2 (Granite 4's
hybrid of both: attention-based methods refuse it). Translators: M2M100
(NLLB's architecture, positions that count non-pad tokens), Pegasus, mBART and mT5, with the
Marian test tokenizer.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import transformers as T

import attrax as ax
from attrax import _arch
from attrax.testing import tiny_model
from tests import _naive
from tests.conftest import PAIRS

SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
# Granite's multipliers, far from 1 (its released models' are 12, 0.22, 1 / 64 and 8)
GRANITE = {
    "embedding_multiplier": 3.0,
    "residual_multiplier": 0.4,
    "attention_multiplier": 0.2,
    "logits_scaling": 5.0,
}
MLA = {
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "num_key_value_heads": 4,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 6,
}
CONFIGS = {
    "pythia": lambda v: T.GPTNeoXConfig(vocab_size=v, intermediate_size=64, **SIZES),
    "qwen2": lambda v: T.Qwen2Config(
        vocab_size=v, intermediate_size=64, num_key_value_heads=2, **SIZES
    ),
    "gemma": lambda v: T.GemmaConfig(  # 1 + weight norms, scaled embeddings, tanh-GELU gate
        vocab_size=v, intermediate_size=64, num_key_value_heads=2, head_dim=8, **SIZES
    ),
    "gemma2": lambda v: T.Gemma2Config(
        vocab_size=v,
        intermediate_size=64,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        final_logit_softcapping=5.0,
        attn_logit_softcapping=3.0,
        **SIZES,
    ),
    "phi3": lambda v: T.Phi3Config(
        vocab_size=v, intermediate_size=64, num_key_value_heads=2, **SIZES
    ),
    "mistral": lambda v: T.MistralConfig(
        vocab_size=v, intermediate_size=64, num_key_value_heads=2, **SIZES
    ),
    "qwen3": lambda v: T.Qwen3Config(
        vocab_size=v, intermediate_size=64, num_key_value_heads=2, head_dim=8, **SIZES
    ),
    "gemma3": lambda v: T.Gemma3TextConfig(  # a local layer (3-token window), a global one
        vocab_size=v,
        intermediate_size=64,
        num_key_value_heads=2,
        head_dim=8,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=3,
        **SIZES,
    ),
    "olmo2": lambda v: T.Olmo2Config(  # norms after attention and MLP only
        vocab_size=v, intermediate_size=64, num_key_value_heads=2, **SIZES
    ),
    # CWM: Llama's layout, a global layer then a local one (a 3-token window)
    "cwm": lambda v: T.CwmConfig(
        vocab_size=v,
        intermediate_size=64,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=3,
        layer_types=["full_attention", "sliding_attention"],
        **SIZES,
    ),
    # ERNIE 4.5 and Helium: Llama's layout, RoPE on interleaved pairs
    "ernie4_5": lambda v: T.Ernie4_5Config(
        vocab_size=v, intermediate_size=64, num_key_value_heads=2, head_dim=8, **SIZES
    ),
    "helium": lambda v: T.HeliumConfig(
        vocab_size=v, intermediate_size=64, num_key_value_heads=2, head_dim=8, **SIZES
    ),
    # HunYuan (dense): Llama's layout, each head's query and key RMS-normed after RoPE
    "hunyuan_v1_dense": lambda v: T.HunYuanDenseV1Config(
        vocab_size=v, intermediate_size=64, num_key_value_heads=2, head_dim=8, **SIZES
    ),
    # GLM: a fused gate/up projection, RoPE on interleaved pairs of half of each head; GLM-4
    # also norms each attention's and MLP's output (as Gemma 2, under names of its own)
    "glm": lambda v: T.GlmConfig(
        vocab_size=v, intermediate_size=64, num_key_value_heads=2, head_dim=8, **SIZES
    ),
    "glm4": lambda v: T.Glm4Config(
        vocab_size=v, intermediate_size=64, num_key_value_heads=2, head_dim=8, **SIZES
    ),
    # EXAONE 4: OLMo 2's norms after attention and MLP only, query and key norms, a local layer
    # with RoPE, then a global one without
    "exaone4": lambda v: T.Exaone4Config(
        vocab_size=v,
        intermediate_size=64,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=3,
        layer_types=["sliding_attention", "full_attention"],
        **SIZES,
    ),
    # Arcee (AFM): Llama's layout, an MLP without a gate and relu(x) ** 2
    "arcee": lambda v: T.ArceeConfig(
        vocab_size=v, intermediate_size=64, num_key_value_heads=2, head_dim=8, **SIZES
    ),
    # Nemotron: Arcee's MLP, LayerNorms whose gain is 1 + weight, RoPE on half of each head
    "nemotron": lambda v: T.NemotronConfig(
        vocab_size=v, intermediate_size=64, num_key_value_heads=2, head_dim=8, **SIZES
    ),
    # VaultGemma: Gemma 2 without its norms after attention and MLP (capped scores, local layers)
    "vaultgemma": lambda v: T.VaultGemmaConfig(
        vocab_size=v,
        intermediate_size=64,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=3,
        layer_types=["sliding_attention", "full_attention"],
        **SIZES,
    ),
    # BioGPT: OPT's pre-LN blocks, scaled token embeddings, learned positions, GELU
    "biogpt": lambda v: T.BioGptConfig(vocab_size=v, intermediate_size=64, **SIZES),
    # Persimmon: GPT-NeoX's sequential blocks, per-head query/key LayerNorms, relu(x) ** 2
    "persimmon": lambda v: T.PersimmonConfig(vocab_size=v, intermediate_size=64, **SIZES),
    # Seed-OSS: Llama's layout with biased query, key and value projections
    "seed_oss": lambda v: T.SeedOssConfig(
        vocab_size=v, intermediate_size=64, num_key_value_heads=2, head_dim=8, **SIZES
    ),
    # OLMo 3: OLMo 2's layout, a local layer (a 3-token window, its own RoPE table) then a global
    "olmo3": lambda v: T.Olmo3Config(
        vocab_size=v,
        intermediate_size=64,
        num_key_value_heads=2,
        sliding_window=3,
        layer_types=["sliding_attention", "full_attention"],
        **SIZES,
    ),
    "smollm3": lambda v: T.SmolLM3Config(  # its second layer without RoPE
        vocab_size=v, intermediate_size=64, num_key_value_heads=2, no_rope_layers=[1, 0], **SIZES
    ),
    "opt": lambda v: T.OPTConfig(
        vocab_size=v, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=128, **SIZES
    ),
    "bloom": lambda v: T.BloomConfig(vocab_size=v, hidden_size=32, n_layer=2, n_head=4),
    "falcon": lambda v: T.FalconConfig(vocab_size=v, **SIZES),
    # CodeGen: GPT-J's block, its query, value and key projections fused in 4 shards
    "codegen": lambda v: T.CodeGenConfig(
        vocab_size=v, n_embd=32, n_layer=2, n_head=4, rotary_dim=4
    ),
    # GPT-J: attention and MLP in parallel on one LayerNorm, rotary on part of each head
    # (interleaved pairs), a biased head
    "gptj": lambda v: T.GPTJConfig(vocab_size=v, n_embd=32, n_layer=2, n_head=4, rotary_dim=4),
    # Phi-1/2: GPT-J's parallel block in Llama's naming, a partial rotary, a biased head
    "phi": lambda v: T.PhiConfig(
        vocab_size=v, intermediate_size=64, partial_rotary_factor=0.5, **SIZES
    ),
    # SantaCoder/StarCoder: GPT-2's block with one key-value head (multi-query) in Linear layers
    "gpt_bigcode": lambda v: T.GPTBigCodeConfig(
        vocab_size=v, n_embd=32, n_layer=2, n_head=4, multi_query=True
    ),
    # StarCoder2: Llama's layout with LayerNorms, biases and a plain GELU MLP
    "starcoder2": lambda v: T.Starcoder2Config(
        vocab_size=v, intermediate_size=64, num_key_value_heads=2, **SIZES
    ),
    # StableLM: Llama's layout with LayerNorms, rotary on a quarter of each head; its parallel
    # layout (StableLM 2 12B) with per-head query and key LayerNorms and q/k/v biases
    "stablelm": lambda v: T.StableLmConfig(
        vocab_size=v, intermediate_size=64, num_key_value_heads=2, **SIZES
    ),
    "stablelm-parallel": lambda v: T.StableLmConfig(
        vocab_size=v,
        intermediate_size=64,
        num_key_value_heads=2,
        use_parallel_residual=True,
        qk_layernorm=True,
        use_qkv_bias=True,
        **SIZES,
    ),
    # OLMo (1): Llama's layout with LayerNorms that have no weights
    "olmo": lambda v: T.OlmoConfig(vocab_size=v, intermediate_size=64, **SIZES),
    # Cohere (Command R): parallel attention and MLP, a bias-free LayerNorm, scaled logits
    "cohere": lambda v: T.CohereConfig(
        vocab_size=v, intermediate_size=64, logit_scale=0.25, **SIZES
    ),
    # Command R7B / A: Cohere's block, a local layer with RoPE over 3 positions, a global one
    # without RoPE
    "cohere2": lambda v: T.Cohere2Config(
        vocab_size=v,
        intermediate_size=64,
        logit_scale=0.25,
        sliding_window=3,
        layer_types=["sliding_attention", "full_attention"],
        **SIZES,
    ),
    # Ministral 3: Mistral's, YaRN RoPE, each query scaled by 1 + 0.5 log(1 + floor(p / 2)) after
    # it (its released models count p in 16384s)
    "ministral3": lambda v: T.Ministral3Config(
        vocab_size=v,
        intermediate_size=64,
        num_key_value_heads=2,
        head_dim=8,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 32.0,
            "original_max_position_embeddings": 2,
            "llama_4_scaling_beta": 0.5,
        },
        max_position_embeddings=64,
        **SIZES,
    ),
    # TinyStories' architecture: attention attrax runs itself, a local layer of 3 positions
    "gpt_neo": lambda v: T.GPTNeoConfig(
        vocab_size=v,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        window_size=3,
        attention_types=[[["global", "local"], 1]],
    ),
    # constant factors on the embeddings, attention scores, each block's output and the logits
    "granite": lambda v: T.GraniteConfig(
        vocab_size=v, intermediate_size=64, num_key_value_heads=2, **SIZES, **GRANITE
    ),
    # mixtures of experts: top-2 routers over 4 experts (Qwen2-MoE's with a shared expert)
    "mixtral": lambda v: T.MixtralConfig(
        vocab_size=v, intermediate_size=16, num_key_value_heads=2, num_local_experts=4, **SIZES
    ),
    "qwen2_moe": lambda v: T.Qwen2MoeConfig(
        vocab_size=v,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_key_value_heads=2,
        **SIZES,
    ),
    "qwen3_moe": lambda v: T.Qwen3MoeConfig(  # query and key norms per head, as Qwen3
        vocab_size=v,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        num_key_value_heads=2,
        head_dim=8,
        **SIZES,
    ),
    "olmoe": lambda v: T.OlmoeConfig(  # query and key norms over all heads, as OLMo 2
        vocab_size=v, intermediate_size=16, num_experts=4, num_experts_per_tok=2, **SIZES
    ),
    # GPT-OSS: attention sinks (a learned logit per head beside the keys), biased projections, a
    # local layer then a global one, experts with a clamped SwiGLU of interleaved gate and up
    "gpt_oss": lambda v: T.GptOssConfig(
        vocab_size=v,
        intermediate_size=16,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=3,
        layer_types=["sliding_attention", "full_attention"],
        swiglu_limit=1.0,
        **SIZES,
    ),
    # multi-head latent attention: keys and values expanded from one latent per token, value
    # heads (6) narrower than query and key heads (8 + 4 rotated); routed and shared experts
    # after a dense first layer. V2: queries straight from the stream, RoPE as complex
    # products, greedy routing; V3: queries through their own latent, RoPE on interleaved
    # pairs, routing limited to one of two groups of experts
    "deepseek_v2": lambda v: T.DeepseekV2Config(vocab_size=v, q_lora_rank=None, **MLA, **SIZES),
    "deepseek_v3": lambda v: T.DeepseekV3Config(
        vocab_size=v, q_lora_rank=16, n_group=2, topk_group=1, **MLA, **SIZES
    ),
    # V3's, its indexer picking 3 keys for each query (the first three queries see them all)
    "deepseek_v32": lambda v: T.DeepseekV32Config(
        vocab_size=v,
        q_lora_rank=16,
        n_group=2,
        topk_group=1,
        index_topk=3,
        index_head_dim=8,
        index_n_heads=8,
        **MLA,
        **SIZES,
    ),
    # GLM-4.7-Flash: V3's layout, its layers' MLPs named by `mlp_layer_types`
    "glm4_moe_lite": lambda v: T.Glm4MoeLiteConfig(
        vocab_size=v, q_lora_rank=16, mlp_layer_types=["dense", "sparse"], **MLA, **SIZES
    ),
    # GLM-5: V3.2's, its second layer reusing the first's picks of keys
    "glm_moe_dsa": lambda v: T.GlmMoeDsaConfig(
        vocab_size=v,
        q_lora_rank=16,
        mlp_layer_types=["dense", "sparse"],
        indexer_types=["full", "shared"],
        index_topk=3,
        index_head_dim=8,
        index_n_heads=8,
        **MLA,
        **SIZES,
    ),
    # Youtu-LLM: V3's attention, dense MLPs, tied embeddings
    "youtu": lambda v: T.YoutuConfig(vocab_size=v, q_lora_rank=16, **MLA, **SIZES),
    # GLM-4.5: biased q/k/v, per-head query and key norms, RoPE on half of each head; a dense
    # layer, then DeepSeek V3's experts (a sigmoid router over groups, a shared expert)
    "glm4_moe": lambda v: T.Glm4MoeConfig(
        vocab_size=v,
        intermediate_size=64,
        moe_intermediate_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        num_key_value_heads=2,
        head_dim=8,
        use_qk_norm=True,
        attention_bias=True,
        **SIZES,
    ),
    # ERNIE 4.5 MoE: ERNIE 4.5's attention (RoPE on interleaved pairs), a dense layer, then 2 of
    # 4 experts and a shared one
    "ernie4_5_moe": lambda v: T.Ernie4_5_MoeConfig(
        vocab_size=v,
        intermediate_size=64,
        moe_intermediate_size=16,
        moe_k=2,
        moe_num_experts=4,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
        num_key_value_heads=2,
        **SIZES,
    ),
    # HunYuan MoE: HunYuan's attention (query and key norms after RoPE), a shared MLP beside 2
    # of 4 experts
    "hunyuan_v1_moe": lambda v: T.HunYuanMoEV1Config(
        vocab_size=v,
        intermediate_size=16,
        num_experts=4,
        moe_topk=2,
        num_key_value_heads=2,
        head_dim=8,
        **SIZES,
    ),
    # MiniMax M2: query and key norms over all heads, RoPE on half of each head; experts behind
    # a sigmoid router with a score correction
    "minimax_m2": lambda v: T.MiniMaxM2Config(
        vocab_size=v,
        intermediate_size=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        num_key_value_heads=2,
        head_dim=8,
        rope_parameters={
            "rope_theta": 10000.0,
            "rope_type": "default",
            "partial_rotary_factor": 0.5,
        },
        **SIZES,
    ),
    # Llama 4: a dense layer, then experts (each chosen expert's input scaled by its routing
    # weight) beside a shared expert; RoPE as complex products in chunked local layers (3
    # tokens a chunk) with weightless query and key norms; a NoPE layer whose queries scale with
    # their position
    "llama4": lambda v: T.Llama4TextConfig(
        vocab_size=v,
        intermediate_size=16,
        intermediate_size_mlp=64,
        num_local_experts=4,
        num_key_value_heads=2,
        head_dim=8,
        moe_layers=[1],
        no_rope_layers=[1, 0],
        attention_chunk_size=3,
        floor_scale=2,
        attn_scale=0.5,
        **SIZES,
    ),
    # Gemma 4: per-layer embeddings (a second table, looked up by token id), a local layer,
    # then a global one with wider heads (16 against 8) and RoPE on a quarter of each head;
    # soft-capped logits
    "gemma4": lambda v: T.Gemma4TextConfig(
        vocab_size=v,
        intermediate_size=64,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=16,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=v,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=3,
        final_logit_softcapping=5.0,
        **SIZES,
    ),
    # state-space models: no attention; Mamba 2 scans in chunks (4 tokens here, so several)
    "mamba": lambda v: T.MambaConfig(
        vocab_size=v, hidden_size=32, num_hidden_layers=2, state_size=8
    ),
    "mamba2": lambda v: T.Mamba2Config(
        vocab_size=v,
        hidden_size=32,
        num_hidden_layers=2,
        num_heads=4,
        head_dim=16,
        state_size=8,
        n_groups=1,
        chunk_size=4,
    ),
    # a hybrid: a gated delta rule (linear attention) layer, then full attention; experts
    "qwen3_next": lambda v: T.Qwen3NextConfig(
        vocab_size=v,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        layer_types=["linear_attention", "full_attention"],
        **SIZES,
    ),
    # Qwen 3.5: Qwen3-Next's gated delta rule and gated full attention, dense MLPs
    "qwen3_5": lambda v: T.Qwen3_5TextConfig(
        vocab_size=v,
        intermediate_size=64,
        num_key_value_heads=2,
        head_dim=8,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        layer_types=["linear_attention", "full_attention"],
        **SIZES,
    ),
    "granitemoe": lambda v: T.GraniteMoeConfig(
        vocab_size=v,
        intermediate_size=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        **SIZES,
        **GRANITE,
    ),
}


SEQ2SEQ_SIZES = {
    "d_model": 32,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "max_position_embeddings": 1024,  # M2M100's sinusoidal table also holds the pad id's row
}
SEQ2SEQ = {
    "m2m100": lambda v: T.M2M100Config(vocab_size=v, **SEQ2SEQ_SIZES),
    "pegasus": lambda v: T.PegasusConfig(vocab_size=v, **SEQ2SEQ_SIZES),
    "mbart": lambda v: T.MBartConfig(vocab_size=v, **SEQ2SEQ_SIZES),
    "mt5": lambda v: T.MT5Config(
        vocab_size=v, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4
    ),
}


def _translator(family: str, start: str = "eos") -> ax.Model:
    """A tiny random translator; ``start``: its decoder start token (M2M100's is EOS)."""
    _, tok = tiny_model("marian")
    cfg = SEQ2SEQ[family](len(tok))
    cfg.pad_token_id, cfg.eos_token_id = tok.pad_token_id, tok.eos_token_id
    cfg.decoder_start_token_id = tok.eos_token_id if start == "eos" else tok.pad_token_id
    torch.manual_seed(0)
    return ax.load_model(T.AutoModelForSeq2SeqLM.from_config(cfg), tokenizer=tok)


def _family(name: str, tok, **kw) -> T.PreTrainedModel:
    """A tiny causal LM of family ``name`` on ``tok``'s vocabulary (``kw``: from_config's)."""
    return built(CONFIGS[name](len(tok)), tok, **kw)


def built(cfg, tok, **kw) -> T.PreTrainedModel:
    """A causal LM of ``cfg`` on ``tok``'s special ids, seeded (``kw``: from_config's)."""
    torch.manual_seed(0)
    # the families' default special ids point past a 800-token vocabulary
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    return T.AutoModelForCausalLM.from_config(cfg, **kw)


@pytest.fixture(scope="module")
def families() -> dict[str, ax.Model]:
    _, tok = tiny_model("gpt2")
    return {name: ax.load_model(_family(name, tok), tokenizer=tok) for name in CONFIGS}


def _loop_saliency(model: ax.Model, source: str, target: str) -> list[np.ndarray]:
    """Per target: the gradient of its probability w.r.t. the positions it can see."""
    source_ids, target_ids = _naive.token_ids(model, source, target)
    run = _naive.Runner(model, source_ids, target_ids)
    grads = run.gradients(run.embeddings(), _naive.probability, None)
    return [g.numpy()[: len(source_ids) + k] for k, (g,) in enumerate(grads)]


def _check(model: ax.Model, source: str, target: str, got=None) -> None:
    got = ax.saliency(model, source, target) if got is None else got
    refs = _loop_saliency(model, source, target)
    _check_labels(got, model, source, target)
    for k, ref in enumerate(refs):
        row = got.isel(target=k).values
        scale = np.abs(ref).max()
        np.testing.assert_allclose(row[: len(ref)], ref, rtol=0, atol=1e-5 * scale)
        assert np.isnan(row[len(ref) :]).all()  # nothing at or after the target


@pytest.mark.parametrize("family", list(CONFIGS))
def test_saliency_equals_the_loop(families, family):
    _check(families[family], *PAIRS[0])


@pytest.mark.parametrize("family", ["pythia", "qwen2", "phi3", "gemma2", "bloom"])
def test_saliency_through_sdpa_equals_the_loop(families, family, sdpa_always):
    """Where SDPA would run (every length here), it does, except for families without it."""
    model = families[family]
    seen = sdpa_always(model)
    got = ax.saliency(model, *PAIRS[1])
    ran = set(seen)  # before the loop's own (eager) forwards
    _check(model, *PAIRS[1], got=got)
    # transformers has no SDPA path for soft-capped attention (Gemma 2) nor for ALiBi BLOOM
    assert ran == ({"eager"} if family in ("gemma2", "bloom") else {"sdpa"})


def test_a_model_that_cannot_switch_attention_keeps_it_quietly(monkeypatch):
    """A model that cannot change attention after loading (Falcon before transformers 5.25; made
    so here where it can): attrax neither tries nor warns."""
    _, tok = tiny_model("gpt2")
    hf = _family("falcon", tok, attn_implementation="sdpa")
    monkeypatch.setattr(type(hf), "_can_set_attn_implementation", classmethod(lambda cls: False))
    loaded_with = hf.config._attn_implementation
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model = ax.load_model(hf, tokenizer=tok)
        got = ax.saliency(model, *PAIRS[1])  # short: "auto" would want eager
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "attention implementation" in r.getMessage()]
    assert hf.config._attn_implementation == loaded_with == "sdpa"
    _check(model, *PAIRS[1], got=got)


@pytest.mark.parametrize("family", list(SEQ2SEQ))
def test_translator_saliency_equals_the_loop(family):
    model = _translator(family)
    source, target = PAIRS[0][0], PAIRS[0][1].strip()
    got = ax.saliency(model, source, target)
    _check_labels(got, model, source, target)
    source_ids, target_ids = _naive.token_ids(model, source, target)
    run = _naive.Runner(model, source_ids, target_ids)
    for k, (grad, _) in enumerate(run.gradients(run.embeddings(), _naive.probability, None)):
        ref = grad.numpy()
        np.testing.assert_allclose(got.isel(target=k).values, ref, atol=1e-5 * np.abs(ref).max())


def test_positions_that_embeddings_cannot_reproduce_are_refused():
    """M2M100 with a pad decoder start token numbers positions differently from embeddings: a
    silently shifted forward would give wrong attributions, so loading it is an error."""
    with pytest.raises(ax.ModelError, match="does not reproduce the forward from `input_ids`"):
        _translator("m2m100", start="pad")


def test_attention_maps_need_eager_on_a_model_that_cannot_switch(tmp_path, monkeypatch):
    """A model that cannot change its attention after loading (Falcon before transformers 5.25;
    made so here where it can), built with SDPA, gives no eager maps: attrax refuses instead of
    using what it has, and the same weights loaded from a directory (eager, as load_model asks)
    work."""
    _, tok = tiny_model("gpt2")
    hf = _family("falcon", tok, attn_implementation="sdpa")
    monkeypatch.setattr(type(hf), "_can_set_attn_implementation", classmethod(lambda cls: False))
    falcon = ax.load_model(hf, tokenizer=tok)
    assert falcon.hf.config._attn_implementation == "sdpa"
    with pytest.raises(ax.ModelError, match="cannot switch after loading; this needs 'eager'"):
        ax.attention(falcon, *PAIRS[0])
    falcon.hf.save_pretrained(tmp_path)
    falcon.tokenizer.save_pretrained(tmp_path)
    model = ax.load_model(tmp_path)
    sources, targets = [PAIRS[0][0], PAIRS[1][0]], [PAIRS[0][1], PAIRS[1][1]]
    both = ax.attention(model, sources, targets)
    for i in range(2):
        one = ax.attention(model, sources[i], targets[i])
        part = both.isel(example=i).sel(target=one.target, source=one.source)
        np.testing.assert_allclose(part.values, one.values, atol=1e-6)
        # and they are the eager model's own maps: target t's row is query t - 1
        source_ids, target_ids = _naive.token_ids(model, sources[i], targets[i])
        ids = torch.tensor([source_ids + target_ids])
        with torch.no_grad():
            maps = model.hf(input_ids=ids, output_attentions=True).attentions
        want = np.stack([m[0].numpy() for m in maps])  # [layer, head, query, key]
        assert one.dims == ("target", "source", "layer", "head")
        assert one.target.values.tolist() == list(range(len(source_ids), ids.shape[1]))
        for k, t in enumerate(one.target.values):
            row = want[:, :, t - 1, :t].transpose(2, 0, 1)  # [key, layer, head]
            np.testing.assert_allclose(one.values[k, :t], row, rtol=1e-5, atol=1e-6)
            assert np.isnan(one.values[k, t:]).all()


def _check_labels(got, model: ax.Model, source: str, target: str) -> None:
    """``got``'s targets and token labels are the tokenizer's own ids, tokenized by hand: one
    row per target token, labelled with the position it sits at and its id."""
    source_ids, target_ids = _naive.token_ids(model, source, target)
    first = 1 if model.is_encoder_decoder else len(source_ids)
    sources = source_ids if model.is_encoder_decoder else source_ids + target_ids
    assert got.target.values.tolist() == list(range(first, first + len(target_ids)))
    assert got.target_id.values.tolist() == target_ids
    assert got.source_id.values.tolist() == sources
    assert got.source_token.values.tolist() == model.tokenizer.convert_ids_to_tokens(sources)


def test_granites_scaled_logits_are_what_attrax_reads(monkeypatch):
    """Granite divides its LM head's output by ``logits_scaling``: the probability attributed is
    the model's own, and a head read without that factor would be refused at loading."""
    _, tok = tiny_model("gpt2")
    model = ax.load_model(_family("granite", tok), tokenizer=tok)
    got = ax.step_scores(model, *PAIRS[0], scores=["probability"])
    source_ids, target_ids = _naive.token_ids(model, *PAIRS[0])
    with torch.no_grad():
        logits = model.hf(input_ids=torch.tensor([source_ids + target_ids])).logits[0]
    start = len(source_ids) - 1
    want = [float(torch.softmax(logits[start + k], -1)[t]) for k, t in enumerate(target_ids)]
    np.testing.assert_allclose(got.sel(score="probability").values, want, rtol=1e-5)
    monkeypatch.setattr(_arch, "logit_scale", lambda config: 1.0)  # a head read unscaled
    with pytest.raises(ax.ModelError, match="not the output projection"):
        ax.load_model(model.hf, tokenizer=tok)


def _hybrid(tok) -> T.PreTrainedModel:
    """A tiny Granite 4 hybrid: a Mamba 2 layer, then an attention layer."""
    torch.manual_seed(0)
    config = T.GraniteMoeHybridConfig(
        vocab_size=len(tok), intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, **SIZES, **GRANITE,
    )  # fmt: skip
    return T.AutoModelForCausalLM.from_config(config)


def test_a_hybrid_with_layers_that_do_not_attend():
    """Gradients run through its Mamba layer; methods that read every layer's attention refuse
    it: its one map would be labelled layer 0 and rollout would skip the Mamba layer's mixing."""
    _, tok = tiny_model("gpt2")
    model = ax.load_model(_hybrid(tok), tokenizer=tok)
    _check(model, *PAIRS[0])
    for method in (ax.attention, ax.rollout, ax.attention_x_gradient, ax.value_zeroing, ax.alti):
        with pytest.raises(ax.ModelError, match="only 1 of its 2 layers attend"):
            method(model, *PAIRS[0])


# hybrids whose every layer has attention, but whose token mixing is not all attention: layer
# types that mix beside it (Falcon-H1's Mamba in parallel), instead of it (MiniMax's lightning
# attention), or by a convolution (LFM2)
MIXERS = {
    "falcon_h1": (T.FalconH1Config, {}, "hybrid"),  # its layers are all "hybrid"
    "minimax": (
        T.MiniMaxConfig,
        {"layer_types": ["linear_attention", "full_attention"], "num_local_experts": 2},
        "linear_attention",
    ),
    "lfm2": (T.Lfm2Config, {"layer_types": ["conv", "full_attention"]}, "conv"),
}


@pytest.mark.parametrize("family", list(MIXERS))
def test_a_hybrid_whose_layers_mix_beside_attention(family):
    """Gradients run; the methods that read every layer's attention refuse it, naming the layer
    types whose mixing its attention maps leave out (Falcon-H1's every layer attends)."""
    config_class, layout, kind = MIXERS[family]
    _, tok = tiny_model("gpt2")
    config = config_class(
        vocab_size=len(tok), intermediate_size=32, num_key_value_heads=2, head_dim=8,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, **SIZES, **layout,
    )  # fmt: skip
    torch.manual_seed(0)
    model = ax.load_model(T.AutoModelForCausalLM.from_config(config), tokenizer=tok)
    _check(model, *PAIRS[0])
    for method in (ax.attention, ax.rollout, ax.attention_x_gradient, ax.value_zeroing, ax.alti):
        with pytest.raises(ax.ModelError, match=f"{kind}|only 1 of its 2 layers attend"):
            method(model, *PAIRS[0])


def test_a_causal_lm_whose_prefix_names_no_attribute():
    """Llama 4's causal LM names its body `language_model` but keeps it in `model`: value
    zeroing (which runs the body alone) equals the loop over zeroed values run on the model."""
    _, tok = tiny_model("gpt2")
    config = T.Llama4TextConfig(
        vocab_size=len(tok), intermediate_size=32, intermediate_size_mlp=32, num_local_experts=2,
        num_key_value_heads=2, head_dim=8, pad_token_id=tok.pad_token_id, **SIZES,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = T.AutoModelForCausalLM.from_config(config).double()
    assert hf.base_model is hf  # the prefix names no attribute
    model = ax.load_model(hf, tokenizer=tok)
    got = ax.value_zeroing(model, *PAIRS[0], normalize=False, layers=0)
    ids = torch.tensor([got.source_id.values.tolist()])
    values = hf.model.layers[0].self_attn.v_proj
    with torch.no_grad():
        clean = hf(input_ids=ids, output_hidden_states=True).hidden_states[1][0]
    for j in range(ids.shape[1]):
        zero = values.register_forward_hook(
            lambda m, a, o, j=j: o.index_fill(1, torch.tensor([j]), 0.0)
        )
        with torch.no_grad():
            moved = hf(input_ids=ids, output_hidden_states=True).hidden_states[1][0]
        zero.remove()
        for k, position in enumerate(got.target.values.tolist()):
            query = position - 1
            if j > query:
                continue
            want = 1 - torch.nn.functional.cosine_similarity(moved[query], clean[query], dim=0)
            want = float(want) if float(want) >= 1e-5 else 0.0
            assert float(got[k, j, 0]) == pytest.approx(want, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("family", ["deepseek_v32", "glm_moe_dsa"])
def test_a_sparse_attentions_picked_keys_hold_under_attraxs_attention(family):
    """DeepSeek V3.2's indexer (GLM-5's, reused by its second layer) picks 3 keys for each query. Transformers masks the others under
    eager and SDPA attention only and hands any other implementation the picks (`indices`):
    attrax's probed attention and its LRP attention mask them too, so each reproduces the
    model's logits (both ran every key before: 0.11 off on this model)."""
    from attrax import _heads
    from attrax._lrp import lrp_rules

    _, tok = tiny_model("gpt2")
    model = ax.load_model(_family(family, tok, attn_implementation="eager"), tokenizer=tok)
    ids = tok("The capital of France is Paris, and", return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 2 * model.hf.config.index_topk

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return model.hf(input_ids=ids, use_cache=False).logits

    want = logits()
    with model.attention_as(_heads.IMPLEMENTATION, required=True):
        torch.testing.assert_close(logits(), want, rtol=1e-6, atol=1e-6)
    with lrp_rules(model, "attnlrp"), model.attention_as("eager"):
        torch.testing.assert_close(logits(), want, rtol=1e-5, atol=1e-5)
    # the picks matter here: every key in reach moves the logits
    for layer in model.hf.model.layers:
        if layer.self_attn.indexer is not None:  # GLM-5's second layer reuses the first's
            layer.self_attn.indexer.index_topk = ids.shape[1]
    assert (logits() - want).abs().max() > 1e-3


def test_per_layer_embeddings_are_constants_of_the_input_tokens():
    """Gemma 4 looks its per-layer embeddings up by token id (transformers recovers the ids from
    `inputs_embeds` when it gets none: off the embedding table, an error). attrax holds them at
    the input's tokens, as positions: integrated gradients from the unk token's embedding sums
    to the logit at the input less the logit of a forward (the test's own) with the unk
    embedding at every position and the input's per-layer embeddings."""
    _, tok = tiny_model("gpt2")
    hf = _family("gemma4", tok).double().eval()
    hf.config.final_logit_softcapping = None  # the logit objective: the logit itself
    model = ax.load_model(hf, tokenizer=tok)
    source, target = PAIRS[0]
    kw = {"objective": "logit", "baseline": "unk", "steps": 200}  # 50 steps: 1.6% short
    got = ax.integrated_gradients(model, source, target, **kw)
    ids = torch.tensor([got.source_id.values.tolist()])
    with torch.no_grad():
        logits = hf(input_ids=ids).logits[0]
        unk = hf.model.embed_tokens(torch.full_like(ids, tok.unk_token_id))
        base = hf(inputs_embeds=unk, per_layer_inputs=hf.model.get_per_layer_inputs(ids)).logits
        moved = hf(input_ids=torch.full_like(ids, tok.unk_token_id)).logits[0]
    for k, position in enumerate(got.target.values.tolist()):
        t = int(got.target_id[k])
        want = float(logits[position - 1, t] - base[0, position - 1, t])
        # the per-layer embeddings matter: moved with the baseline, the difference is another
        assert abs(float(logits[position - 1, t] - moved[position - 1, t]) - want) > 1e-3
        total = float(got[k].sum())
        assert total == pytest.approx(want, rel=1e-5, abs=1e-7)
        # attrax's own baseline score is the test's
        assert float(got.completeness_gap[k]) == pytest.approx(total - want, abs=1e-12)
