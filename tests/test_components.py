"""Direct logit attribution and attribution patching against plain-torch references written here:
per-target loops over layers, heads and sources with hooks, the sum-back identity of DLA, and
real activation patching (one forward per layer, head and position) for AtP."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, FalconConfig

import attrax as ax
from attrax.cli import main
from attrax.testing import tiny_classifier, tiny_model
from tests.conftest import PAIRS, assert_close
from tests.test_architectures import CONFIGS, _family, _translator, built

SOURCE, TARGET = PAIRS[0]
CORRUPTED = "The capital of Spain is"  # as many tokens as SOURCE in both tiny tokenizers


@pytest.fixture(scope="module")
def models64() -> dict[str, ax.Model]:
    built = {}
    for arch in ("gpt2", "gpt_neo", "llama"):
        hf, tok = tiny_model(arch)
        built[arch] = ax.load_model(full_double(hf), tokenizer=tok)
    _, tok = tiny_model("llama")
    # Llama's layout; Qwen2's v_proj has a bias, Qwen3 norms queries and keys, SmolLM3 has NoPE
    # Granite: constant factors on the embeddings, the scores, each block's output, the logits
    # random biases (BioGPT's and Persimmon's too)
    kin = (*LLAMA_KIN, *EXPERTS, *NEOX_AND_OPT_KIN)
    for arch in ("mistral", "qwen2", "phi3", "qwen3", "smollm3", "granite", *kin):
        built[arch] = ax.load_model(full_double(llama_like(arch, tok)), tokenizer=tok)
    for arch in MORE_DECODERS:  # random biases, as Llama's relatives get
        built[arch] = ax.load_model(full_double(llama_like(arch, tok)), tokenizer=tok)
    # DeepSeek V3's attention without its experts, whose router rounds in float32 whatever the
    # model's dtype: the finite differences of the q/k/v tests would read that rounding. Wider
    # weights: at 0.02 the QK fix's effects are so small that its eager softmax's float32
    # rounding is 1e-4 of the largest (1e-6 at 0.1). V3.2: its indexer picks each query's keys
    for arch in ("deepseek_v3", "deepseek_v32"):
        config = CONFIGS[arch](len(tok))
        config.first_k_dense_replace, config.initializer_range = config.num_hidden_layers, 0.1
        config.mlp_layer_types = ["dense"] * config.num_hidden_layers
        config.pad_token_id, config.bos_token_id, config.eos_token_id = (
            tok.pad_token_id, tok.bos_token_id, tok.eos_token_id,
        )  # fmt: skip
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        built[f"{arch}-dense"] = ax.load_model(full_double(hf), tokenizer=tok)
    for layout in FALCONS:
        built[layout] = _falcon(layout)
    built["bloom"] = _bloom()  # its attention and MLP modules add the residual stream
    # GPT-BigCode without multi-query: each head's query, key and value side by side in c_attn
    built["gpt_bigcode-mha"] = ax.load_model(gpt_bigcode(tok, False).double(), tokenizer=tok)
    for arch in NEIGHBOURS:
        built[arch] = ax.load_model(neighbour(arch, tok).double(), tokenizer=tok)
    # norms on each attention's and MLP's output (Gemma 1: 1 + weight norms only)
    for arch in ("gemma", "gemma2", "vaultgemma", "gemma3", "olmo2", "olmo3", "glm4", "exaone4"):
        hf = _family(arch, tok, attn_implementation="eager")
        hf.config.final_logit_softcapping = None  # a linear readout (DLA refuses the cap)
        with torch.no_grad():  # random gains (Gemma's norms scale by 1 + weight, weight 0)
            for module in hf.modules():
                if type(module).__name__.endswith("RMSNorm"):
                    module.weight.normal_(0.0 if arch.startswith("gemma") else 1.0, 0.3)
        built[arch] = ax.load_model(full_double(hf), tokenizer=tok)
    return built


# GPT-NeoX (Pythia: parallel residual, per-head fused query/key/value) and OPT (its MLP no
# module, learned positions; with project_in/out where the embeddings are narrower)
NEIGHBOURS = {
    "pythia": ("pythia", {}),
    "pythia-sequential": ("pythia", {"use_parallel_residual": False}),
    "opt": ("opt", {}),
    "opt-projected": ("opt", {"word_embed_proj_dim": 16}),
}


def neighbour(arch: str, tok, **more: Any) -> torch.nn.Module:
    """A tiny random GPT-NeoX or OPT causal LM on ``tok``, its biases random; ``more``: more of
    its config."""
    family, changes = NEIGHBOURS[arch]
    changes = {**changes, **more}
    config = CONFIGS[family](len(tok))
    config.initializer_range = 0.3  # weights that make the patching effects far from 0
    for key, value in changes.items():
        setattr(config, key, value)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tok.pad_token_id, tok.bos_token_id, tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # random biases and norm weights: zeros and ones would test less
        for name, parameter in hf.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.5)
            elif "layer_norm" in name or "layernorm" in name:
                parameter.normal_(1, 0.3)
    return hf.eval()


def llama_like(arch: str, tok) -> torch.nn.Module:
    """A tiny random Mistral, Qwen2, Phi-3... causal LM on ``tok``, its biases random; a mixture
    of experts runs its experts in a loop (transformers' grouped matmul takes no float64)."""
    kw = {"experts_implementation": "eager"} if arch in EXPERTS else {}
    hf = _family(arch, tok, attn_implementation="eager", **kw)
    with torch.no_grad():  # random biases: the zeros Qwen2 starts with would test nothing
        for module in hf.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5)
            elif type(module).__name__ == "NemotronLayerNorm1P":  # its gain 1 + weight, not 1
                module.weight.normal_(0, 0.3)
    return hf.eval()


# Llama's layout: CWM (local layers), Seed-OSS (biased projections), ERNIE 4.5 and Helium (RoPE
# on interleaved pairs)
LLAMA_KIN = ("cwm", "seed_oss", "ernie4_5", "helium", "hunyuan_v1_dense")  # HunYuan: q/k norms
LLAMA_KIN += ("glm",)  # a fused gate/up projection, RoPE on interleaved pairs of half a head
LLAMA_KIN += ("arcee", "nemotron")  # an MLP without a gate; Nemotron's LayerNorms: 1 + weight
LLAMA_KIN += ("youtu",)  # DeepSeek V3's multi-head latent attention, dense MLPs
LLAMA_KIN += ("ministral3",)  # Mistral's, its queries scaled by a constant of their position
# OPT's pre-LN blocks (`self_attn`, `fc1`/`fc2`): BioGPT, its final norm `layer_norm`; GPT-NeoX's
# sequential blocks in `self_attn`: Persimmon
NEOX_AND_OPT_KIN = ("biogpt", "persimmon")
# mixtures of experts with Llama's layout: a routed `mlp` (Granite MoE's `block_sparse_moe`)
EXPERTS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "gpt_oss")
EXPERTS += ("deepseek_v2", "deepseek_v3")  # multi-head latent attention, shared experts
EXPERTS += ("deepseek_v32", "glm4_moe_lite")  # V3.2: an indexer picks each query's keys
EXPERTS += ("glm_moe_dsa",)  # GLM-5: V3.2's, a layer reusing the previous one's picks
EXPERTS += ("llama4",)  # its MLP `feed_forward`; a routing weight scales each expert's input
EXPERTS += ("glm4_moe", "minimax_m2")  # GLM-4.5, MiniMax M2: partial RoPE, q/k norms
EXPERTS += ("ernie4_5_moe", "hunyuan_v1_moe")  # shared experts; HunYuan's `shared_mlp`
# GPT-J, CodeGen and Phi (attention and MLP in parallel on one LayerNorm, a biased LM head;
# CodeGen's values in shards of a fused projection), StarCoder2 and OLMo (Llama's layout with
# LayerNorms; OLMo's without weights), Cohere (parallel, its LayerNorms without biases, its
# logits scaled)
MORE_DECODERS = ("gptj", "codegen", "phi", "starcoder2", "olmo", "cohere", "gpt_bigcode")
MORE_DECODERS += ("stablelm", "stablelm-parallel")  # LayerNorms; parallel, per-head q/k norms
MORE_DECODERS += ("cohere2",)  # Cohere's, RoPE and a window in its local layers only


# Falcon's three layouts of its fused query_key_value: Falcon-7B's (multi-query, parallel),
# each head's query, key and value side by side (sequential blocks here), Falcon-40B's groups
FALCONS = {
    "falcon": {},
    "falcon-heads": {"multi_query": False, "parallel_attn": False},
    "falcon-40b": {"new_decoder_architecture": True, "num_kv_heads": 2},
}


def vary(hf: torch.nn.Module, norms: bool = False) -> torch.nn.Module:
    """``hf`` with random biases (and, with ``norms``, LayerNorm weights near 1): the zeros and
    ones models start with would test less."""
    with torch.no_grad():
        for name, parameter in hf.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.5)
            elif norms and ("ln_" in name or "layernorm" in name):
                parameter.normal_(1, 0.3)
    return hf.eval()


def _falcon(layout: str) -> ax.Model:
    """A tiny random float64 Falcon of one of :data:`FALCONS`' layouts, its biases random."""
    _, tok = tiny_model("gpt2")
    config = FalconConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        bias=True, initializer_range=0.3, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **FALCONS[layout],
    )  # fmt: skip
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return ax.load_model(vary(hf).double(), tokenizer=tok)


def _bloom(**config: Any) -> ax.Model:
    """A tiny random float64 BLOOM (ALiBi, attention code of its own, each head's query, key and
    value side by side), weights large enough that its attention moves its outputs; ``config``:
    more of its config."""
    _, tok = tiny_model("gpt2")
    config = BloomConfig(
        vocab_size=len(tok), hidden_size=32, n_layer=2, n_head=4, initializer_range=0.3,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, **config,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return ax.load_model(vary(hf).double(), tokenizer=tok)


def gpt_bigcode(tok, multi_query: bool, random: bool = True) -> torch.nn.Module:
    """A tiny random GPT-BigCode causal LM on ``tok``, with multi-query attention (one key and one
    value head after the queries in `c_attn`) or without (each head's query, key and value side
    by side); ``random``: its biases and LayerNorm weights random too (:func:`vary`)."""
    config = CONFIGS["gpt_bigcode"](len(tok))
    config.multi_query = multi_query
    hf = built(config, tok, attn_implementation="eager")
    return vary(hf, norms=True) if random else hf.eval()


def falcon_values(attention, fused: torch.Tensor) -> torch.Tensor:
    """The value heads ``[..., L, kv, d]`` inside Falcon's fused output ``[..., L, F]``, read
    through the views its own forward takes (a view: writing to it writes to ``fused``)."""
    d = attention.head_dim
    x = fused.unflatten(-1, (-1, d))
    if attention.new_decoder_architecture:  # [kv, group queries + key + value, d]
        return x.unflatten(-2, (attention.num_kv_heads, -1))[..., -1, :]
    if attention.multi_query:  # [heads + key + value, d]
        return x[..., -1:, :]
    return x.unflatten(-2, (attention.num_heads, 3))[..., 2, :]  # [heads, (q, k, v), d]


def full_double(hf: torch.nn.Module) -> torch.nn.Module:
    """``hf`` in float64 throughout: LlamaRMSNorm normalizes in float32 even in a float64 model,
    which would leave float32 rounding in the logits the references compare with."""
    hf = hf.double()
    for module in hf.modules():
        if type(module).__name__.endswith("RMSNorm"):  # Llama's, Mistral's, Qwen2's, Gemma's

            def forward(x: torch.Tensor, m: torch.nn.Module = module) -> torch.Tensor:
                eps = getattr(m, "variance_epsilon", None) or m.eps
                return gain(m) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

            module.forward = forward
        elif type(module).__name__ in ("OlmoLayerNorm", "CohereLayerNorm", "Cohere2LayerNorm"):

            def centred(x: torch.Tensor, m: torch.nn.Module = module) -> torch.Tensor:
                eps = getattr(m, "variance_epsilon", 1e-5)  # OLMo's: 1e-5 in its forward
                y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, False, True) + eps)
                return gain(m) * y

            module.forward = centred
    return hf


def gain(norm: torch.nn.Module) -> torch.Tensor | float:
    """A norm's elementwise factor: ``weight``, the Gemma family's (VaultGemma's) and Nemotron's
    ``1 + weight``, 1 for OLMo's LayerNorm, which has none."""
    if getattr(norm, "weight", None) is None:
        return 1.0
    one_plus = type(norm).__name__.startswith(("Gemma", "VaultGemma", "Nemotron"))
    return 1.0 + norm.weight if one_plus else norm.weight


def output_norms(block) -> tuple | None:
    """A block's norms of its attention's and its MLP's outputs (Gemma 2, 3, OLMo 2, 3; GLM-4
    names them `post_self_attn_layernorm` and `post_mlp_layernorm`), or None."""
    if hasattr(block, "post_mlp_layernorm"):
        return block.post_self_attn_layernorm, block.post_mlp_layernorm
    if hasattr(block, "post_feedforward_layernorm"):
        return block.post_attention_layernorm, block.post_feedforward_layernorm
    return None


def sandwich(model: ax.Model) -> bool:
    """Whether each block norms its attention's and MLP's outputs (Gemma 2, Gemma 3, GLM-4)."""
    return output_norms(modules(model)[0][0]) is not None


def modules(model: ax.Model):
    """(blocks, attention modules, output projections, value modules, final norm)."""
    hf = model.hf
    if hf.config.model_type in ("gpt2", "gpt_bigcode"):  # GPT-BigCode: in Linear layers
        blocks = list(hf.base_model.h)
        attn = [b.attn for b in blocks]
        return blocks, attn, [a.c_proj for a in attn], [a.c_attn for a in attn], hf.base_model.ln_f
    if hf.config.model_type in ("falcon", "bloom"):
        blocks = list(hf.base_model.h)
        attn = [b.self_attention for b in blocks]
        values = [a.query_key_value for a in attn]
        return blocks, attn, [a.dense for a in attn], values, hf.base_model.ln_f
    if hf.config.model_type in ("gptj", "codegen"):  # CodeGen: one fused qkv_proj
        blocks = list(hf.base_model.h)
        attn = [b.attn for b in blocks]
        values = [getattr(a, "v_proj", None) or a.qkv_proj for a in attn]
        return blocks, attn, [a.out_proj for a in attn], values, hf.base_model.ln_f
    if hf.config.model_type == "phi":
        blocks = list(hf.base_model.layers)
        attn = [b.self_attn for b in blocks]
        values = [a.v_proj for a in attn]
        return blocks, attn, [a.dense for a in attn], values, hf.base_model.final_layernorm
    if hf.config.model_type == "gpt_neo":  # each block's attention wraps another
        blocks = list(hf.base_model.h)
        attn = [b.attn.attention for b in blocks]
        values = [a.v_proj for a in attn]
        return blocks, attn, [a.out_proj for a in attn], values, hf.base_model.ln_f
    if hf.config.model_type in ("gpt_neox", "persimmon"):  # Persimmon's in `self_attn`
        blocks = list(hf.base_model.layers)
        attn = [getattr(b, "attention", None) or b.self_attn for b in blocks]
        values = [a.query_key_value for a in attn]
        final = getattr(hf.base_model, "final_layer_norm", None) or hf.base_model.final_layernorm
        return blocks, attn, [a.dense for a in attn], values, final
    if hf.config.model_type in ("opt", "biogpt"):  # BioGPT's layers in its body itself
        decoder = getattr(hf.base_model, "decoder", hf.base_model)
        blocks = list(decoder.layers)
        attn = [b.self_attn for b in blocks]
        values = [a.v_proj for a in attn]
        final = getattr(decoder, "final_layer_norm", None) or decoder.layer_norm
        return blocks, attn, [a.out_proj for a in attn], values, final
    base = hf.model if hf.base_model is hf else hf.base_model  # Llama 4 names no body prefix
    blocks = list(base.layers)
    attn = [b.self_attn for b in blocks]
    # Phi-3: one fused projection; DeepSeek: the keys and values its latent expands into
    values = [
        getattr(a, "v_proj", None) or getattr(a, "kv_b_proj", None) or a.qkv_proj for a in attn
    ]
    return blocks, attn, [a.o_proj for a in attn], values, base.norm


def token_ids(model: ax.Model, source: str, target: str) -> tuple[list[int], list[int]]:
    tok = model.tokenizer
    src = tok(source, add_special_tokens=True)["input_ids"]
    full = tok(source + target, add_special_tokens=True)["input_ids"]
    assert full[: len(src)] == src
    return src, full[len(src) :]


def traced(model: ax.Model, ids: list[int]) -> dict:
    """One plain HF forward with hooks: attention maps, values, head outputs z, MLP outputs, the
    final norm's input, logits (all for the one example)."""
    blocks, _attn, proj, value, norm = modules(model)
    found: dict = {"v": {}, "z": {}, "mlp": {}, "attention_output": {}, "final": None}
    handles = []
    for layer in range(len(blocks)):
        handles.append(
            value[layer].register_forward_hook(
                lambda m, a, o, layer=layer: found["v"].__setitem__(layer, o[0])
            )
        )
        handles.append(
            proj[layer].register_forward_pre_hook(
                lambda m, a, layer=layer: found["z"].__setitem__(layer, a[0][0])
            )
        )
        # OPT's MLP is fc1, ReLU, fc2 inline in its block, on [L, H] for one example; Gemma's
        # writes its norm's output
        mlp = mlp_of(blocks[layer])
        if sandwich(model):
            after, mlp = output_norms(blocks[layer])
            handles.append(  # the attention's output, before its norm
                after.register_forward_pre_hook(
                    lambda m, a, layer=layer: found["attention_output"].__setitem__(layer, a[0][0])
                )
            )
        # BLOOM's MLP adds the residual stream (its second argument) itself: what it adds is
        # its output minus that
        added = model.hf.config.model_type == "bloom"
        handles.append(  # a copy: Falcon's parallel block adds the attention to it in place
            mlp.register_forward_hook(
                lambda m, a, o, layer=layer, added=added: found["mlp"].__setitem__(
                    layer, mlp_output(o, a, added)
                )
            )
        )
    handles.append(norm.register_forward_pre_hook(lambda m, a: found.__setitem__("final", a[0][0])))
    with torch.no_grad():
        out = model.hf(input_ids=torch.tensor([ids]), output_attentions=True, use_cache=False)
    for h in handles:
        h.remove()
    found["attn"] = [a[0] for a in out.attentions]
    found["logits"] = out.logits[0]
    return found


def readout(model: ax.Model, i: int, found: dict, direction: torch.Tensor):
    """``proj(c)``: what residual piece ``c`` adds to ``direction . norm(x_i)`` with the norm's
    scale frozen at its value for ``x_i``."""
    norm = modules(model)[-1]
    x = found["final"][i]
    # torch's, Nemotron's (a subclass), OLMo's, Cohere's: they centre
    if isinstance(norm, torch.nn.LayerNorm) or type(norm).__name__.endswith("LayerNorm"):
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or 1e-5
        sigma = torch.sqrt(x.var(unbiased=False) + eps)
        return lambda c: head_read(model, gain(norm) * (c - c.mean()) / sigma, direction)
    rms = torch.sqrt(x.pow(2).mean() + (getattr(norm, "variance_epsilon", None) or norm.eps))
    return lambda c: float((gain(norm) * c / rms) @ direction)


def head_read(model: ax.Model, y: torch.Tensor, direction: torch.Tensor) -> float:
    """``direction`` read off the final norm's output ``y``: through OPT's ``project_out`` where
    it has one."""
    decoder = getattr(model.hf.base_model, "decoder", None)
    out = getattr(decoder, "project_out", None)
    return float((y if out is None else out(y)) @ direction)


def w_out(model: ax.Model, layer: int) -> torch.Tensor:
    """Layer ``layer``'s output projection as ``[in, hidden]`` (``z @ W``)."""
    projection = modules(model)[2][layer]
    return projection.weight if model.hf.config.model_type == "gpt2" else projection.weight.T


def naive_dla(model: ax.Model, source: str, target: str, contrast: str | None = None):
    """Per target, layer, head and source: ``A[h, i, j] * (v_j W_O^h)`` projected; the MLP at
    ``i``; plus the rest of the logit (embeddings and biases) for the sum-back identity."""
    src, tgt = token_ids(model, source, target)
    ids = src + tgt
    found = traced(model, ids)
    config = model.hf.config
    heads = config.num_attention_heads
    d = getattr(config, "v_head_dim", None) or config.hidden_size // heads  # DeepSeek's: 6
    n_layers = len(found["attn"])
    unembed = model.hf.get_output_embeddings().weight
    con = None if contrast is None else token_ids(model, source, contrast)[1]
    out = np.full((len(tgt), len(ids), n_layers, heads + 1), np.nan)
    rest = np.zeros(len(tgt))
    logits = np.zeros(len(tgt))
    branch = getattr(config, "residual_multiplier", 1.0)  # Granite: what each block adds
    for k in range(len(tgt)):
        i = len(src) + k - 1
        direction = unembed[tgt[k]] - (0 if con is None else unembed[con[k]])
        # Granite divides its logits, Cohere multiplies them
        direction = direction / getattr(config, "logits_scaling", 1.0)
        direction = direction * getattr(config, "logit_scale", 1.0)
        proj = readout(model, i, found, direction)
        logits[k] = float(found["logits"][i, tgt[k]])
        if con is not None:
            logits[k] -= float(found["logits"][i, con[k]])
        for layer in range(n_layers):
            v_all = found["v"][layer]
            if config.model_type == "gpt2":
                v_all = v_all[:, 2 * config.hidden_size :]
            elif config.model_type == "gpt_bigcode" and config.multi_query:
                # after the queries: one key head, then one value head, read by every head
                v_all = v_all[:, config.hidden_size :].chunk(2, -1)[1]
                v_all = v_all.repeat(1, heads)
            elif config.model_type == "gpt_bigcode":  # per head: query, key, value
                v_all = v_all.unflatten(-1, (heads, 3 * d))[..., 2 * d :].flatten(1)
            elif config.model_type == "falcon":  # its value heads, each read by its group
                v_all = falcon_values(modules(model)[1][layer], v_all)
                v_all = v_all.repeat_interleave(heads // v_all.shape[1], dim=1).flatten(1)
            elif config.model_type in ("gpt_neox", "bloom", "persimmon"):  # per head: q, k, v
                v_all = v_all.unflatten(-1, (heads, 3 * d))[..., 2 * d :].flatten(1)
            elif config.model_type == "codegen":  # mp_num shards of [queries, values, keys]
                shards = modules(model)[1][layer].mp_num
                v_all = v_all.view(len(ids), shards, 3, -1)[:, :, 1].flatten(1)
            elif hasattr(config, "kv_lora_rank"):  # [1, L, heads (key part, value)]
                v_all = v_all[0].unflatten(-1, (heads, -1))[..., config.qk_nope_head_dim :]
                v_all = v_all.flatten(1)
            elif config.model_type != "opt":
                # grouped values: query head h reads key-value head h // group
                if config.model_type == "phi3":  # [q (heads d), k (kv d), v (kv d)]
                    v_all = v_all[:, (heads + config.num_key_value_heads) * d :]
                v_all = v_all.unflatten(-1, (-1, d))
                v_all = v_all.repeat_interleave(heads // v_all.shape[1], dim=1).flatten(1)
            w = w_out(model, layer)
            after = 1.0  # Gemma: the norm on the attention's output, at its scale for x_i
            if sandwich(model):
                norm = output_norms(modules(model)[0][layer])[0]
                y = found["attention_output"][layer][i]
                eps = getattr(norm, "variance_epsilon", None) or norm.eps
                after = gain(norm) / torch.sqrt(y.pow(2).mean() + eps)
            for h in range(heads):
                for j in range(i + 1):
                    a = found["attn"][layer][h, i, j]
                    piece = a * v_all[j, h * d : (h + 1) * d] @ w[h * d : (h + 1) * d]
                    out[k, j, layer, h] = proj(branch * after * piece)
                out[k, i + 1 :, layer, h] = 0.0
            out[k, : i + 1, layer, heads] = 0.0
            out[k, i, layer, heads] = proj(branch * found["mlp"][layer][i])
            bias = modules(model)[2][layer].bias
            if bias is not None:
                rest[k] += proj(branch * bias)
        # the embeddings: the residual stream before the first layer
        emb = model.hf.get_input_embeddings()(torch.tensor(ids[i]))
        emb = emb * getattr(config, "embedding_multiplier", 1.0)  # Granite
        if config.model_type in ("gpt2", "gpt_neo", "gpt_bigcode"):
            emb = emb + model.hf.base_model.wpe(torch.tensor(i))
        if config.model_type == "bloom":  # a LayerNorm on the embeddings
            emb = model.hf.base_model.word_embeddings_layernorm(emb)
        if config.model_type == "biogpt":  # positions are rows 2, 3, ... of their table
            emb = emb + model.hf.base_model.embed_positions.weight[i + 2]
        if config.model_type == "opt":  # positions are rows 2, 3, ... of their table
            decoder = model.hf.base_model.decoder
            if decoder.project_in is not None:
                emb = decoder.project_in(emb)
            emb = emb + decoder.embed_positions.weight[i + 2]
        if getattr(modules(model)[-1], "bias", None) is not None:  # the final norm's shift
            rest[k] += head_read(model, modules(model)[-1].bias, direction)
        head_bias = model.hf.get_output_embeddings().bias  # GPT-J's and Phi's
        if head_bias is not None:
            rest[k] += float(head_bias[tgt[k]] - (0 if con is None else head_bias[con[k]]))
        rest[k] += proj(emb)
    return out, rest, logits, len(src)


DLA_ARCHS = (
    "gpt2", "gpt_neo", "llama", "mistral", "qwen2", "phi3", "qwen3", "smollm3", "gemma", "gemma2", "gemma3",
    "olmo2",
    "olmo3",
    "glm4",
    "exaone4",
    "vaultgemma",
    "granite", *LLAMA_KIN, *EXPERTS, *MORE_DECODERS, *FALCONS, "gpt_bigcode-mha", "bloom", *NEOX_AND_OPT_KIN,
)  # fmt: skip


@pytest.mark.parametrize("arch", [*DLA_ARCHS, *NEIGHBOURS])
@pytest.mark.parametrize("contrast", [None, " Rome"])
def test_dla_equals_naive_and_sums_back(models64, arch, contrast):
    model = models64[arch]
    target = TARGET if contrast is None else " Paris"
    if contrast is not None and len(token_ids(model, SOURCE, contrast)[1]) != len(
        token_ids(model, SOURCE, target)[1]
    ):
        pytest.skip("contrast does not align in this tokenizer")
    got = ax.direct_logit_attribution(model, SOURCE, target, contrast=contrast)
    want, rest, logits, first = naive_dla(model, SOURCE, target, contrast)
    assert got.dims == ("target", "source", "layer", "head")
    assert got["head"].values.tolist()[-1] == -1
    assert got.component.values.tolist()[-1] == "mlp"
    values = got.values
    for k in range(want.shape[0]):
        t = first + k
        # past the predicting position: NaN on the target side, exact 0 elsewhere; BLOOM's MLP
        # share is its output minus the residual, which rounds as large as the residual is
        atol = 1e-9 if arch == "bloom" else 1e-10
        np.testing.assert_allclose(values[k, :t], want[k, :t], rtol=1e-9, atol=atol)
    # the identity: components + embeddings + biases = the logit (difference)
    total = np.nansum(values, axis=(1, 2, 3)) + rest
    np.testing.assert_allclose(total, logits, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("arch", ["llama", "pythia", "opt-projected"])
def test_dla_selection_and_batched_equals_single(models64, arch):
    # OPT's fc2 runs on [B * L, H]: each example's MLP rows are cut back out of it
    model = models64[arch]
    pairs = PAIRS[:2]
    full = ax.direct_logit_attribution(model, [s for s, _ in pairs], [t for _, t in pairs])
    for e, (s, t) in enumerate(pairs):
        single = ax.direct_logit_attribution(model, s, t)
        part = full.isel(example=e).dropna("target", how="all")
        part = part.isel(source=slice(0, single.sizes["source"]))
        # their eager attention takes its softmax in float32 even in this float64 model, and
        # padding changes that float32 sum's order (1.4e-6 relative seen on an AMD EPYC)
        assert_close(part.values, single.values, rtol=1e-5, atol=1e-6)
    picked = ax.direct_logit_attribution(model, SOURCE, TARGET, layers=-1, heads=[2, 0])
    assert picked.layer.values.tolist() == [1]
    assert picked["head"].values.tolist() == [2, 0, -1]
    whole = full.isel(example=0).dropna("target", how="all")
    whole = whole.isel(source=slice(0, picked.sizes["source"]))
    assert_close(picked.values, whole.sel(layer=[1], head=[2, 0, -1]).values, 1e-5, 1e-6)


def test_dla_of_a_soft_capped_gemma2_decomposes_the_logit_before_its_cap():
    # Gemma 2's logits are c * tanh(z / c): the heads' and MLPs' shares sum back to z, and the
    # result says so
    _, tok = tiny_model("gpt2")
    hf = _family("gemma2", tok, attn_implementation="eager")
    with torch.no_grad():
        for module in hf.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.normal_(0, 0.3)
    hf.config.final_logit_softcapping = cap = 1e-3  # this tiny model's logits are ~1e-3
    model = ax.load_model(full_double(hf), tokenizer=tok)
    got = ax.direct_logit_attribution(model, SOURCE, TARGET)
    assert got.attrs["logit_softcap"] == cap
    want, rest, logits, first = naive_dla(model, SOURCE, TARGET)
    for k in range(want.shape[0]):
        np.testing.assert_allclose(
            got.values[k, : first + k], want[k, : first + k], rtol=1e-9, atol=1e-10
        )
    z = np.nansum(got.values, axis=(1, 2, 3)) + rest
    np.testing.assert_allclose(cap * np.tanh(z / cap), logits, rtol=1e-9, atol=1e-9)
    assert not np.allclose(z, logits, rtol=1e-3)  # the cap bends these logits


def test_dla_refuses_a_post_layer_norm_opt():
    # OPT-350m's layout: a LayerNorm after each block rescales the stream before the head
    _, tok = tiny_model("llama")
    config = CONFIGS["opt"](len(tok))
    config.do_layer_norm_before = False
    model = ax.load_model(AutoModelForCausalLM.from_config(config), tokenizer=tok)
    with pytest.raises(ax.ModelError, match="normalises after each block"):
        ax.direct_logit_attribution(model, SOURCE, TARGET)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_dla_sequence_classifier_sums_back(arch):
    hf, tok = tiny_classifier(arch)
    model = ax.load_model(full_double(hf), tokenizer=tok)
    got = ax.direct_logit_attribution(model, "a good day", targets=1)
    ids = tok("a good day")["input_ids"]
    found = traced_classifier(model, ids)
    i = len(ids) - 1
    direction = model.hf.score.weight[1]
    proj = readout(model, i, found, direction)
    base = model.hf.base_model
    if arch == "gpt2":
        emb = base.wte(torch.tensor(ids[i])) + base.wpe(torch.tensor(i))
        rest = proj(emb) + float(base.ln_f.bias @ direction)
        rest += sum(proj(b.attn.c_proj.bias) for b in base.h)
    else:  # RMSNorm has no bias, Qwen2's o_proj none
        rest = proj(base.embed_tokens(torch.tensor(ids[i])))
    total = float(np.nansum(got.values)) + rest
    np.testing.assert_allclose(total, float(found["logits"][1]), rtol=1e-9)


def traced_classifier(model: ax.Model, ids: list[int]) -> dict:
    norm = modules(model)[-1]
    found: dict = {}
    handle = norm.register_forward_pre_hook(lambda m, a: found.__setitem__("final", a[0][0]))
    with torch.no_grad():
        found["logits"] = model.hf(input_ids=torch.tensor([ids])).logits[0]
    handle.remove()
    return found


# --- attribution patching ----------------------------------------------------------------


def reference_forward(model: ax.Model, ids: list[int]):
    """The plain HF forward on one example; GPT-NeoX and OPT under SDPA, as their eager
    attention takes its softmax in float32 even in a float64 model (finite differences of
    float32 roundings would swamp the effects)."""
    exact = model.hf.config.model_type in ("gpt_neox", "opt")
    with torch.no_grad(), model.attention_as("sdpa") if exact else contextlib.nullcontext():
        return model.hf(input_ids=torch.tensor([ids]), use_cache=False)


def score(model: ax.Model, ids: list[int], i: int, t: int, objective: str) -> float:
    logits = reference_forward(model, ids).logits[0, i]
    if objective == "logit":
        return float(logits[t])
    return float(torch.softmax(logits, -1)[t])


def capture(model: ax.Model, ids: list[int], site: str) -> list[torch.Tensor]:
    """Each layer's activation at ``site`` for one example, ``[L, width]``."""
    blocks, _, proj, _, _ = modules(model)
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for layer in range(len(blocks)):
        if site == "heads":
            hook = proj[layer].register_forward_pre_hook(
                lambda m, a, layer=layer: seen.__setitem__(layer, a[0][0].clone())
            )
        else:
            module = mlp_of(blocks[layer]) if site == "mlp" else blocks[layer]
            hook = module.register_forward_hook(
                lambda m, a, o, layer=layer: seen.__setitem__(
                    layer, one_example(o[0] if isinstance(o, tuple) else o)[0].clone()
                )
            )
        handles.append(hook)
    reference_forward(model, ids)
    for h in handles:
        h.remove()
    return [seen[layer] for layer in range(len(blocks))]


def mlp_output(output, args: tuple, added: bool) -> torch.Tensor:
    """What an MLP adds, for one example ``[L, H]``: its output (GPT-OSS's: the first of two),
    less the residual stream where it adds that itself (BLOOM's second argument)."""
    o = output[0] if isinstance(output, tuple) else output
    o = o - args[1] if added else o
    return o.view(-1, *o.shape[-2:])[0].clone()


def mlp_of(block) -> torch.nn.Module:
    """What a block's MLP writes: its `mlp`, OPT's `fc2` (fc1, ReLU and fc2 are inline) or
    Granite MoE's `block_sparse_moe`."""
    for name in ("mlp", "fc2", "block_sparse_moe", "feed_forward"):  # Llama 4: `feed_forward`
        if hasattr(block, name):
            return getattr(block, name)
    raise AssertionError(f"no MLP in {type(block).__name__}")


def one_example(x: torch.Tensor) -> torch.Tensor:
    """``[1, L, H]``: OPT's fc2 runs on the rows flattened, ``[L, H]`` for one example."""
    return x[None] if x.dim() == 2 else x


def patched(model, ids, i, t, objective, site, layer, position, cols, value) -> float:
    """The score with activation ``[position, cols]`` of ``layer`` at ``site`` set to ``value``."""
    blocks, _, proj, _, _ = modules(model)

    def put(x: torch.Tensor) -> torch.Tensor:
        y = one_example(x).clone()
        y[0, position, cols] = value
        return y.view(x.shape)

    if site == "heads":
        handle = proj[layer].register_forward_pre_hook(lambda m, a: (put(a[0]), *a[1:]))
    else:
        module = mlp_of(blocks[layer]) if site == "mlp" else blocks[layer]
        handle = module.register_forward_hook(
            lambda m, a, o: (put(o[0]), *o[1:]) if isinstance(o, tuple) else put(o)
        )
    try:
        return score(model, ids, i, t, objective)
    finally:
        handle.remove()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def patching_effects(model, objective, eps=None, texts=(SOURCE, TARGET, CORRUPTED)):
    """Real activation patching of every (layer, head, position) for every target; with ``eps``
    the central difference of patching ``clean + s * (corrupted - clean)`` at ``s = +-eps``."""
    source, target, corrupted = texts
    src, tgt = token_ids(model, source, target)
    bad = token_ids(model, corrupted, target)[0]
    ids, bad_ids = src + tgt, bad + tgt
    clean, corrupt = capture(model, ids, "heads"), capture(model, bad_ids, "heads")
    heads = model.hf.config.num_attention_heads
    d = model.hf.config.hidden_size // heads
    out = np.zeros((len(tgt), len(ids), len(clean), heads))
    for k in range(len(tgt)):
        i, t = len(src) + k - 1, tgt[k]
        base = score(model, ids, i, t, objective)
        for layer in range(len(clean)):
            for h in range(heads):
                cols = slice(h * d, (h + 1) * d)
                for p in range(i + 1):
                    a, b = clean[layer][p, cols], corrupt[layer][p, cols]
                    if eps is None:
                        value = patched(model, ids, i, t, objective, "heads", layer, p, cols, b)
                        out[k, p, layer, h] = value - base
                    else:
                        up = patched(
                            model, ids, i, t, objective, "heads", layer, p, cols, a + eps * (b - a)
                        )
                        down = patched(
                            model, ids, i, t, objective, "heads", layer, p, cols, a - eps * (b - a)
                        )
                        out[k, p, layer, h] = (up - down) / (2 * eps)
    return out, len(src)


def test_corrupted_aligns(models64):
    for model in models64.values():
        assert len(token_ids(model, CORRUPTED, TARGET)[0]) == len(
            token_ids(model, SOURCE, TARGET)[0]
        )


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo", "llama", "pythia", "opt-projected"])
@pytest.mark.parametrize("objective", ["logit", "probability"])
def test_atp_is_the_first_order_patching_effect(models64, arch, objective):
    model = models64[arch]
    got = ax.attribution_patching(model, SOURCE, TARGET, corrupted=CORRUPTED, objective=objective)
    # Llama's eager attention takes its softmax in float32 even in a float64 model: its finite
    # differences carry float32 rounding / eps, so a wider step and a looser tolerance there
    # (GPT-Neo's scores are float32 alike). GPT-NeoX's and OPT's references run SDPA (float64),
    # but attrax's eager forward keeps that float32 rounding in their effects (~4e-8 absolute
    # against effects up to 2e-3)
    # GPT-Neo's float32 scores over 2e-3 leave ~3e-5 of rounding in its differences (effects
    # up to 0.32; how much depends on the CPU's kernels)
    eps, rtol, atol = {
        "llama": (1e-3, 2e-3, 2e-5),
        "gpt_neo": (1e-3, 2e-3, 1e-4),
        "gpt2": (1e-4, 1e-6, 1e-8),
    }.get(arch, (1e-4, 1e-6, 1e-7))
    want, first = patching_effects(model, objective, eps=eps)
    assert got.dims == ("target", "source", "layer", "head")
    for k in range(want.shape[0]):
        t = first + k
        np.testing.assert_allclose(got.values[k, :t], want[k, :t], rtol=rtol, atol=atol)


@pytest.mark.parametrize("objective", ["logit", "probability"])
def test_atp_ranks_like_real_patching(default_model, objective):
    """Rank agreement (Spearman) of AtP with real activation patching on the built-in (trained)
    model, over every layer, head and position whose activation the corruption changes."""
    texts = ("1 2 3 =", " 3 2 1", "1 2 4 =")
    got = ax.attribution_patching(
        default_model, texts[0], texts[1], corrupted=texts[2], objective=objective
    )
    want, first = patching_effects(default_model, objective, texts=texts)
    # "3" -> "4": earlier positions see the same tokens, both are exactly 0 there
    clean_ids = token_ids(default_model, texts[0], texts[1])[0]
    bad_ids = token_ids(default_model, texts[2], texts[1])[0]
    changed = next(p for p, (a, b) in enumerate(zip(clean_ids, bad_ids, strict=True)) if a != b)
    per_target = []
    for k in range(want.shape[0]):
        a, b = got.values[k, changed : first + k], want[k, changed : first + k]
        assert np.abs(a).max() > 0 and np.abs(b).max() > 0
        per_target.append(spearman(a.ravel(), b.ravel()))
    # measured: logit 1.0, 0.999, 0.999; probability 0.997, 0.683, 1.0 (the docs quote these)
    assert min(per_target) > (0.99 if objective == "logit" else 0.6), per_target
    assert np.mean(per_target) > (0.99 if objective == "logit" else 0.85), per_target


@pytest.mark.parametrize("arch", ["gpt2", "opt-projected"])
@pytest.mark.parametrize("site", ["mlp", "residual"])
def test_atp_sites_first_order(models64, site, arch):
    # OPT: its MLP is fc2's output, on the rows flattened
    model = models64[arch]
    got = ax.attribution_patching(
        model, SOURCE, TARGET, corrupted=CORRUPTED, site=site, objective="logit", layers=[0, 1]
    )
    assert got.dims == ("target", "source", "layer")
    src, tgt = token_ids(model, SOURCE, TARGET)
    ids, bad_ids = src + tgt, token_ids(model, CORRUPTED, TARGET)[0] + tgt
    clean, corrupt = capture(model, ids, site), capture(model, bad_ids, site)
    eps = 1e-4
    for k in (0, len(tgt) - 1):
        i, t = len(src) + k - 1, tgt[k]
        for layer in range(len(clean)):
            for p in range(i + 1):
                a, b = clean[layer][p], corrupt[layer][p]
                args = (model, ids, i, t, "logit", site, layer, p, slice(None))
                up = patched(*args, a + eps * (b - a))
                down = patched(*args, a - eps * (b - a))
                want = (up - down) / (2 * eps)
                np.testing.assert_allclose(got.values[k, p, layer], want, rtol=1e-6, atol=1e-9)


def test_atp_batched_equals_single_and_selection(models64):
    model = models64["gpt2"]
    inputs = [SOURCE, "Hello"]
    targets = [TARGET, " world"]
    # aligned with "Hello" in the tiny GPT-2 tokenizer ("Howdy" is not): a corruption equal to
    # its clean input would make the second example all zeros, equal whatever the batching does
    corrupted = [CORRUPTED, "Hallo"]
    for clean, bad in zip(inputs, corrupted, strict=True):
        assert len(token_ids(model, bad, " world")[0]) == len(token_ids(model, clean, " world")[0])
    full = ax.attribution_patching(model, inputs, targets, corrupted=corrupted, chunk_size=1)
    for e in range(2):
        single = ax.attribution_patching(model, inputs[e], targets[e], corrupted=corrupted[e])
        assert np.nanmax(np.abs(single.values)) > 1e-6
        part = full.isel(example=e).dropna("target", how="all")
        part = part.isel(source=slice(0, single.sizes["source"]))
        np.testing.assert_allclose(part.values, single.values, rtol=1e-9, atol=1e-12)
    picked = ax.attribution_patching(
        model, SOURCE, TARGET, corrupted=CORRUPTED, layers=[1], heads=-1
    )
    assert picked.layer.values.tolist() == [1] and picked["head"].values.tolist() == [1]
    whole = full.isel(example=0).dropna("target", how="all")
    whole = whole.isel(source=slice(0, picked.sizes["source"]))
    np.testing.assert_allclose(
        picked.values, whole.sel(layer=[1], head=[1]).values, rtol=1e-9, atol=1e-12
    )


def test_atp_of_opts_mlp_batched_equals_single(models64):
    # OPT's fc2 runs on [B * L, H]: each example's rows are patched and read where they are
    model = models64["opt-projected"]
    inputs, targets = [SOURCE, "The capital of Italy is"], [TARGET, " Rome."]
    corrupted = [CORRUPTED, "The capital of Germany is"]  # 7 tokens each, 6 in the first
    for clean, bad, target in zip(inputs, corrupted, targets, strict=True):
        assert len(token_ids(model, bad, target)[0]) == len(token_ids(model, clean, target)[0])
    kw = {"site": "mlp", "objective": "logit"}
    full = ax.attribution_patching(model, inputs, targets, corrupted=corrupted, **kw)
    for e in range(2):
        single = ax.attribution_patching(model, inputs[e], targets[e], corrupted=corrupted[e], **kw)
        assert np.nanmax(np.abs(single.values)) > 1e-5
        part = full.isel(example=e).dropna("target", how="all")
        part = part.isel(source=slice(0, single.sizes["source"]))
        # the eager attention's float32 softmax sums padded rows in another order
        np.testing.assert_allclose(part.values, single.values, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("site", ["heads", "mlp", "residual"])
def test_atp_layers_in_any_order_are_those_layers(models64, encdec64, site):
    """`layers=[1, 0]`: each layer's gradient times its own activation difference (the
    activations were gathered in the model's order, the probes in the caller's: layer 0's
    gradient met layer 1's difference), labelled as asked."""
    for model, stack in ((models64["gpt2"], None), (encdec64["marian"], "cross")):
        if stack is not None and site != "heads":
            continue  # cross-attention patches heads only
        target = TARGET if stack is None else ED_TARGET
        kwargs = {"corrupted": CORRUPTED, "site": site, **({"stack": stack} if stack else {})}
        whole = ax.attribution_patching(model, SOURCE, target, **kwargs)
        picked = ax.attribution_patching(model, SOURCE, target, layers=[1, 0], **kwargs)
        assert picked.layer.values.tolist() == [1, 0]
        np.testing.assert_allclose(
            picked.values, whole.sel(layer=[1, 0]).values, rtol=1e-9, atol=1e-12
        )


def test_atp_sequence_classifier_first_order():
    hf, tok = tiny_classifier("gpt2")
    model = ax.load_model(full_double(hf), tokenizer=tok)
    text, bad = "a bad day", "a good dog"
    ids, bad_ids = tok(text)["input_ids"], tok(bad)["input_ids"]
    assert len(ids) == len(bad_ids)
    got = ax.attribution_patching(model, text, targets=1, corrupted=bad, objective="logit")
    blocks, _, proj, _, _ = modules(model)
    seen: dict = {}

    def run(x, layer=None, value=None):
        handles = []
        for n, p in enumerate(proj):

            def pre(m, a, n=n):
                if layer is None:  # the unpatched runs record their activations
                    seen.setdefault(tuple(x), {})[n] = a[0][0].clone()
                if n == layer:
                    z = a[0].clone()
                    z[0] = value
                    return (z,)
                return None

            handles.append(p.register_forward_pre_hook(pre))
        with torch.no_grad():
            out = model.hf(input_ids=torch.tensor([x])).logits[0, 1]
        for h in handles:
            h.remove()
        return float(out)

    run(ids)
    run(bad_ids)
    clean, corrupt = seen[tuple(ids)], seen[tuple(bad_ids)]
    eps = 1e-4
    heads = model.hf.config.num_attention_heads
    d = model.hf.config.hidden_size // heads
    for layer in range(len(blocks)):
        for h in range(heads):
            for p in range(len(ids)):
                moved = []
                for s in (eps, -eps):
                    z = clean[layer].clone()
                    cols = slice(h * d, (h + 1) * d)
                    z[p, cols] = z[p, cols] + s * (corrupt[layer][p, cols] - clean[layer][p, cols])
                    moved.append(run(ids, layer, z))
                want = (moved[0] - moved[1]) / (2 * eps)
                np.testing.assert_allclose(got.values[0, p, layer, h], want, rtol=1e-6, atol=1e-9)


def central_patching(
    modules_: list,
    site: str,
    score,
    ids: list[int],
    bad: list[int],
    positions: int,
    heads: int,
    eps: float,
    added: bool = False,
) -> np.ndarray:
    """``[positions, layers(, heads)]``: per layer (``modules_``), head and position, the central
    difference of ``score(ids)`` as that activation really moves along ``clean + s * (corrupted
    - clean)``, ``s = +-eps``. ``site``: "heads" (the module's input), else its output;
    ``added``: the module adds its second argument to its output (BLOOM's MLP), which is then no
    part of the activation. ``score(ids)`` runs the model, the hooks in place."""

    def run(x, layer=None, position=None, cols=None, value=None):
        seen = {}

        def hook(m, args, output, n):
            a = args[0] if site == "heads" else (output[0] if isinstance(output, tuple) else output)
            a = a - args[1] if added else a
            flat = a.dim() == 2  # Llama 4's experts: the rows flattened, [L, H] for one example
            a = a[None] if flat else a
            seen[n] = a[0].detach().clone()
            if n != layer:
                return None
            a = a.clone()
            a[0, position, cols] = value
            a = a[0] if flat else a
            if site == "heads":
                return (a, *args[1:])
            if added:
                return a + args[1]
            return (a, *output[1:]) if isinstance(output, tuple) else a

        handles = [
            m.register_forward_pre_hook(lambda m, a, n=n: hook(m, a, None, n))
            if site == "heads"
            else m.register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n))
            for n, m in enumerate(modules_)
        ]
        try:
            with torch.no_grad():
                return score(x), seen
        finally:
            for h in handles:
                h.remove()

    _, clean = run(ids)
    _, corrupt = run(bad)
    layers = len(modules_)
    want = np.zeros((positions, layers) + ((heads,) if site == "heads" else ()))
    for layer in range(layers):
        width = clean[layer].shape[-1]
        for h in range(heads) if site == "heads" else [None]:
            cols = slice(None) if h is None else slice(h * width // heads, (h + 1) * width // heads)
            for p in range(positions):
                a, b = clean[layer][p, cols], corrupt[layer][p, cols]
                up = run(ids, layer, p, cols, a + eps * (b - a))[0]
                down = run(ids, layer, p, cols, a - eps * (b - a))[0]
                want[(p, layer) if h is None else (p, layer, h)] = (up - down) / (2 * eps)
    return want


#: the test's own table for encoder classifiers: per block, the module whose input is the
#: concatenated heads and the module whose output is what the MLP adds (BERT's before the
#: LayerNorm of its residual sum)
ENCODER_MODULES = {
    "bert": (lambda b: b.attention.output.dense, lambda b: b.output.dense),
    "roberta": (lambda b: b.attention.output.dense, lambda b: b.output.dense),
    "electra": (lambda b: b.attention.output.dense, lambda b: b.output.dense),
    "deberta-v2": (lambda b: b.attention.output.dense, lambda b: b.output.dense),
    "distilbert": (lambda b: b.attention.out_lin, lambda b: b.ffn),
    "modernbert": (lambda b: b.attn.Wo, lambda b: b.mlp),  # pre-norm
}


@pytest.mark.usefixtures("modernbert_rotary_in_its_dtype")
@pytest.mark.parametrize("site", ["heads", "mlp", "residual"])
@pytest.mark.parametrize("arch", list(ENCODER_MODULES))
def test_atp_encoder_classifiers_first_order(arch, site):
    # each (layer, [head,] position) of a class logit equals the central difference of really
    # patching it along clean + s * (corrupted - clean); every position sees every other
    hf, tok = tiny_classifier(arch)
    model = ax.load_model(full_double(hf), tokenizer=tok)
    text, bad = "a bad day", "a sad day"
    ids, bad_ids = tok(text)["input_ids"], tok(bad)["input_ids"]
    assert len(ids) == len(bad_ids)
    got = ax.attribution_patching(model, text, 2, corrupted=bad, site=site, objective="logit")
    base = hf.base_model
    stack = base.transformer.layer if arch == "distilbert" else getattr(base, "layers", None)
    blocks = list(stack if stack is not None else base.encoder.layer)
    heads_of, mlp_of_block = ENCODER_MODULES[arch]
    where = {"heads": heads_of, "mlp": mlp_of_block, "residual": lambda b: b}[site]
    modules_ = [where(b) for b in blocks]

    def score(x: list[int]) -> float:
        return float(model.hf(input_ids=torch.tensor([x])).logits[0, 2])

    heads = model.hf.config.num_attention_heads
    # ModernBERT's softmax is float32 even in a float64 model: a step between its roundings
    # (1e-3 fails) and the truncation error (1e-2 fails)
    eps = 3e-3 if arch == "modernbert" else 1e-4
    want = central_patching(modules_, site, score, ids, bad_ids, len(ids), heads, eps)
    assert np.abs(want).max() > 1e-6
    rtol, atol = (1e-3, 1e-5) if arch == "modernbert" else (1e-6, 1e-9)
    np.testing.assert_allclose(got.values[0], want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("site", ["heads", "mlp", "residual"])
@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_atp_question_answering_first_order(arch, site):
    # the answer's start and end logits, each at its own token, patched at every position of a
    # (question, context) pair against a corrupted pair of the same length
    hf, tok = tiny_classifier(arch, "question-answering")
    model = ax.load_model(full_double(hf), tokenizer=tok)
    clean, bad = ("who was good", "the plot was good"), ("who was good", "the slot was good")
    encoding = tok(*clean)
    ids, bad_ids = encoding["input_ids"], tok(*bad)["input_ids"]
    assert len(ids) == len(bad_ids) and ids != bad_ids
    span = (14, 20)
    got = ax.attribution_patching(model, clean, span, corrupted=bad, site=site, objective="logit")
    assert got.target.values.tolist() == ["start", "end"]
    types = {}
    if arch == "bert":  # its segment embeddings
        types = {"token_type_ids": torch.tensor([encoding["token_type_ids"]])}
    base = hf.base_model
    blocks = list(base.transformer.layer if arch == "distilbert" else base.encoder.layer)
    heads_of, mlp_of_block = ENCODER_MODULES[arch]
    where = {"heads": heads_of, "mlp": mlp_of_block, "residual": lambda b: b}[site]
    modules_ = [where(b) for b in blocks]
    heads = model.hf.config.num_attention_heads
    for slot, name in enumerate(("start_logits", "end_logits")):

        def score(x: list[int], name: str = name, position: int = span[slot]) -> float:
            return float(getattr(model.hf(input_ids=torch.tensor([x]), **types), name)[0, position])

        want = central_patching(modules_, site, score, ids, bad_ids, len(ids), heads, 1e-4)
        assert np.abs(want).max() > 1e-6
        np.testing.assert_allclose(got.values[slot], want, rtol=1e-6, atol=1e-9)


def test_atp_corrupted_pairs_keep_their_own_segments():
    """A corrupted pair of the clean one's length, split elsewhere between its two texts, runs
    with its own segment ids (it ran with the clean pair's until 2026-12-06)."""
    hf, tok = tiny_classifier("bert", "sequence")
    model = ax.load_model(hf, tokenizer=tok)
    clean, bad = ("a b c", "d"), ("a b", "c d")  # 7 tokens each, segments 0000011 and 0000111
    got = ax.attribution_patching(
        model, clean, "label_0", corrupted=bad, site="residual", objective="logit"
    )
    encodings = [tok(*pair, return_tensors="pt") for pair in (clean, bad)]
    assert encodings[0]["token_type_ids"].tolist() != encodings[1]["token_type_ids"].tolist()

    def layers(encoding, grad: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outs: list[torch.Tensor] = []
        hooks = [
            block.register_forward_hook(
                lambda _m, _a, o: outs.append(o[0] if isinstance(o, tuple) else o)
            )
            for block in hf.bert.encoder.layer
        ]
        embeds = hf.get_input_embeddings()(encoding["input_ids"]).detach().requires_grad_(grad)
        try:
            logit = hf(inputs_embeds=embeds, token_type_ids=encoding["token_type_ids"]).logits[0, 0]
        finally:
            for hook in hooks:
                hook.remove()
        return logit, outs

    logit, clean_acts = layers(encodings[0], True)
    grads = torch.autograd.grad(logit, clean_acts)
    with torch.no_grad():
        _, bad_acts = layers(encodings[1], False)
    want = np.stack(
        [
            (g[0] * (b[0] - a[0].detach())).sum(-1).numpy()
            for g, a, b in zip(grads, clean_acts, bad_acts, strict=True)
        ],
        -1,
    )
    np.testing.assert_allclose(got.isel(target=0).values, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("site", ["heads", "mlp", "residual"])
def test_atp_masked_lm_first_order(site):
    # the predicted token's logit at the mask, patched at every position
    hf, tok = tiny_classifier("bert", "fill-mask")
    model = ax.load_model(full_double(hf), tokenizer=tok)
    clean, bad = f"the plot was {tok.mask_token}", f"the slot was {tok.mask_token}"
    ids, bad_ids = tok(clean)["input_ids"], tok(bad)["input_ids"]
    assert len(ids) == len(bad_ids) and ids != bad_ids
    got = ax.attribution_patching(model, clean, corrupted=bad, site=site, objective="logit")
    position, token = int(got.target[0]), int(got.target_id[0])
    assert ids[position] == tok.mask_token_id
    blocks = list(hf.base_model.encoder.layer)
    heads_of, mlp_of_block = ENCODER_MODULES["bert"]
    where = {"heads": heads_of, "mlp": mlp_of_block, "residual": lambda b: b}[site]

    def score(x: list[int]) -> float:
        return float(model.hf(input_ids=torch.tensor([x])).logits[0, position, token])

    heads = model.hf.config.num_attention_heads
    want = central_patching(
        [where(b) for b in blocks], site, score, ids, bad_ids, len(ids), heads, 1e-4
    )
    assert np.abs(want).max() > 1e-6
    np.testing.assert_allclose(got.values[0], want, rtol=1e-6, atol=1e-9)


# --- errors, CLI, dataset ------------------------------------------------------------------


def _gemma2() -> ax.Model:
    """A tiny random Gemma 2 (norms before and after each block, soft-capped logits) on the GPT-2
    test tokenizer."""
    _, tok = tiny_model("gpt2")
    return ax.load_model(_family("gemma2", tok), tokenizer=tok)


def test_errors(models, models64):
    gpt2 = models64["gpt2"]
    hf, tok = tiny_classifier("bert")
    bert = ax.load_model(hf, tokenizer=tok)
    with pytest.raises(ax.ModelError, match="BertForSequenceClassification"):
        ax.direct_logit_attribution(bert, "a good day", targets=0)
    hf, tok = tiny_classifier("gpt2", task="token")
    with pytest.raises(ax.ModelError, match="token classifier"):
        ax.direct_logit_attribution(ax.load_model(hf, tokenizer=tok), "a good day", targets=0)
    with pytest.raises(ax.OptionError, match="objective"):
        ax.direct_logit_attribution(gpt2, SOURCE, TARGET, objective="logit")
    with pytest.raises(ax.OptionError, match="`corrupted` is required"):
        ax.attribution_patching(gpt2, SOURCE, TARGET)
    with pytest.raises(ax.InputError, match="same token length"):
        ax.attribution_patching(gpt2, SOURCE, TARGET, corrupted="The capital is")
    with pytest.raises(ax.InputError, match="`corrupted` is empty"):  # not `contrast_inputs`
        ax.attribution_patching(gpt2, SOURCE, TARGET, corrupted="")
    with pytest.raises(ax.InputError, match="align"):
        ax.attribution_patching(gpt2, SOURCE, TARGET, corrupted=[CORRUPTED, CORRUPTED])
    with pytest.raises(ax.OptionError, match="site"):
        ax.attribution_patching(gpt2, SOURCE, TARGET, corrupted=CORRUPTED, site="key")
    with pytest.raises(ax.OptionError, match="heads"):
        ax.attribution_patching(gpt2, SOURCE, TARGET, corrupted=CORRUPTED, site="mlp", heads=0)
    with pytest.raises(ax.OptionError, match="layers"):
        ax.direct_logit_attribution(gpt2, SOURCE, TARGET, layers=5)


def test_cli_and_dataset(tmp_path, write_jsonl):
    out = tmp_path / "dla.nc"
    args = ["attribute", "--input", "1 2 3 =", "--target", " 3 2 1", "--reduce", "none"]
    assert main([*args, "--method", "direct_logit_attribution", "--out", str(out)]) == 0
    saved = ax.load(out)
    direct = ax.direct_logit_attribution(ax.load_model(), "1 2 3 =", " 3 2 1")
    np.testing.assert_allclose(saved.values, direct.values, rtol=1e-6)
    out = tmp_path / "atp.nc"
    corrupted = ["--option", "corrupted=1 2 4 ="]
    assert main([*args, "--method", "attribution_patching", *corrupted, "--out", str(out)]) == 0
    patched_da = ax.attribution_patching(ax.load_model(), "1 2 3 =", " 3 2 1", corrupted="1 2 4 =")
    np.testing.assert_allclose(ax.load(out).values, patched_da.values, rtol=1e-6)
    data = write_jsonl(
        [{"input": "1 2 3 =", "target": " 3 2 1"}, {"input": "4 5 6 =", "target": " 6 5 4"}]
    )
    ax.attribute_dataset(
        None,
        data,
        tmp_path / "run",
        method="direct_logit_attribution",
        reduce="sum:head,sum:layer",
        progress=False,
    )
    with pytest.raises(ax.OptionError, match="`corrupted` is required"):
        # records without a 'corrupted' field and no option: nothing to patch from
        ax.attribute_dataset(
            None, data, tmp_path / "atp", method="attribution_patching", progress=False
        )
    # each record's own corrupted input, from its 'corrupted' field
    rows = [
        {"input": "1 2 3 =", "target": " 3 2 1", "corrupted": "1 2 4 ="},
        {"input": "4 5 6 =", "target": " 6 5 4", "corrupted": "4 7 6 ="},
    ]
    per_record = write_jsonl(rows, name="corrupted.jsonl")
    ax.attribute_dataset(
        None, per_record, tmp_path / "atp", method="attribution_patching",
        reduce="sum:head,sum:layer", shard_size=2, progress=False,
    )  # fmt: skip
    got = ax.load_dataset_results(tmp_path / "atp")
    for b, row in enumerate(rows):  # assertions only: one check per record
        alone = ax.attribution_patching(
            ax.load_model(), row["input"], row["target"], corrupted=row["corrupted"]
        )
        want = alone.sum(["head", "layer"], skipna=False)
        mine = got.isel(example=b).sel(target=want.target, source=want.source)
        np.testing.assert_allclose(mine.values, want.values, rtol=1e-5, atol=1e-7)
    with pytest.raises(ax.OptionError, match="both as an option"):
        ax.attribute_dataset(
            None, per_record, tmp_path / "both", method="attribution_patching",
            corrupted="1 2 4 =", progress=False,
        )  # fmt: skip
    rows[1].pop("corrupted")
    with pytest.raises(ax.InputError, match="1 of 2 records have a 'corrupted'"):
        ax.attribute_dataset(
            None, write_jsonl(rows, name="some.jsonl"), tmp_path / "some",
            method="attribution_patching", progress=False,
        )  # fmt: skip
    loaded = ax.load_dataset_results(tmp_path / "run")
    assert loaded.dims == ("example", "target", "source")
    first = loaded.isel(example=0).dropna("target", how="all").dropna("source", how="all")
    want = direct.sum(["head", "layer"], skipna=False)
    np.testing.assert_allclose(first.values, want.values[:, : first.sizes["source"]], rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("attribution_patching", {"site": "key", "corrupted": "x"}),
        ("attribution_patching", {"qk_fix": "yes", "corrupted": "x"}),
        ("attribution_patching", {"corrupted": None}),
        ("attribution_patching", {"corrupted": 3}),
        ("attribution_patching", {"corrupted": "x", "stack": "both"}),
        ("direct_logit_attribution", {"layers": "first"}),
        ("direct_logit_attribution", {"heads": "last"}),
    ],
)
def test_bad_options_are_refused_before_the_model_runs(models, monkeypatch, name, options):
    model = models["gpt2"]

    def boom(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(model.hf, "forward", boom)
    with pytest.raises(ax.OptionError):
        getattr(ax, name)(model, SOURCE, **options)


def test_atp_contrast_is_the_difference_of_logit_estimates(models64):
    """With the logit objective AtP is linear in the score: contrast = target minus contrast."""
    model = models64["gpt2"]
    contrast = " Rome"
    if len(token_ids(model, SOURCE, contrast)[1]) != len(token_ids(model, SOURCE, TARGET)[1]):
        pytest.skip("contrast does not align in this tokenizer")
    kw = {"corrupted": CORRUPTED, "objective": "logit"}
    both = ax.attribution_patching(model, SOURCE, TARGET, contrast=contrast, **kw)
    one = ax.attribution_patching(model, SOURCE, TARGET, **kw)
    other = ax.attribution_patching(model, SOURCE, contrast, **kw)
    np.testing.assert_allclose(both.values, one.values - other.values, rtol=1e-9, atol=1e-12)


def test_atp_token_classifier_equals_per_token_autograd():
    hf, tok = tiny_classifier("gpt2", task="token")
    model = ax.load_model(full_double(hf), tokenizer=tok)
    text, bad = "a bad day", "a good dog"
    got = ax.attribution_patching(model, text, 1, corrupted=bad, objective="logit")
    ids, bad_ids = tok(text)["input_ids"], tok(bad)["input_ids"]
    _, _, proj, _, _ = modules(model)
    clean, corrupt = capture(model, ids, "heads"), capture(model, bad_ids, "heads")
    heads = model.hf.config.num_attention_heads
    assert got["target"].values.tolist() == list(range(len(ids)))
    for position in range(len(ids)):  # the naive loop: one backward per token
        probes = [torch.zeros_like(z, requires_grad=True) for z in clean]
        handles = [
            p.register_forward_pre_hook(lambda m, a, n=n, ps=probes: (a[0] + ps[n], *a[1:]))
            for n, p in enumerate(proj)
        ]
        logit = model.hf(input_ids=torch.tensor([ids])).logits[0, position, 1]
        for h in handles:
            h.remove()
        grads = torch.autograd.grad(logit, probes)
        want = np.stack(
            [
                (g * (corrupt[n] - clean[n])).unflatten(-1, (heads, -1)).sum(-1).numpy()
                for n, g in enumerate(grads)
            ],
            axis=1,
        )  # [source, layer, head]
        seen = position + 1  # causal: later tokens are NaN, and their gradients exactly 0
        assert np.isnan(got.values[position, seen:]).all() and not want[seen:].any()
        np.testing.assert_allclose(got.values[position, :seen], want[:seen], rtol=1e-9, atol=1e-12)


# --- attribution patching on encoder-decoders ----------------------------------------------

ED_TARGET = " Paris is a city"


@pytest.fixture(scope="module")
def encdec64() -> dict[str, ax.Model]:
    built = {}
    for arch in ("marian", "bart"):
        hf, tok = tiny_model(arch)
        built[arch] = ax.load_model(hf.double(), tokenizer=tok)
    return built


def ed_module(model: ax.Model, stack: str, layer: int, site: str) -> torch.nn.Module:
    """The module hooked, read from the HF layout by hand: the head outputs enter ``out_proj``,
    the MLP's output is ``fc2``'s, the residual stream is the layer's output."""
    hf = model.hf
    part = hf.get_encoder() if stack == "encoder" else hf.get_decoder()
    if hf.config.model_type == "t5":  # T5 blocks: [self-attention, (cross-attention,) MLP]
        block = part.block[layer]
        if site == "heads":
            at = (
                block.layer[1].EncDecAttention if stack == "cross" else block.layer[0].SelfAttention
            )
            return at.o
        return block.layer[-1].DenseReluDense if site == "mlp" else block
    block = part.layers[layer]
    if site == "heads":
        return (block.encoder_attn if stack == "cross" else block.self_attn).out_proj
    return block.fc2 if site == "mlp" else block


def ed_run(model, ids, decoder_ids, hook=None) -> tuple[torch.Tensor, dict]:
    """One plain HF forward from ids (logits ``[T, V]``); ``hook`` = (module, site, edit) with
    ``edit(x)`` the replaced activation of the one example (``[L, width]``)."""
    handles = []
    if hook is not None:
        module, site, edit = hook

        def put(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            x[0] = edit(x[0])
            return x

        if site == "heads":
            handles.append(module.register_forward_pre_hook(lambda m, a: (put(a[0]), *a[1:])))
        else:
            handles.append(
                module.register_forward_hook(
                    lambda m, a, o: (put(o[0]), *o[1:]) if isinstance(o, tuple) else put(o)
                )
            )
    try:
        with torch.no_grad():
            out = model.hf(
                input_ids=torch.tensor([ids]),
                decoder_input_ids=torch.tensor([decoder_ids]),
                use_cache=False,
            )
    finally:
        for h in handles:
            h.remove()
    return out.logits[0]


def ed_capture(model, ids, decoder_ids, stack, site, layers) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}

    def keep(layer):
        def edit(x):
            seen[layer] = x.clone()
            return x

        return edit

    for layer in range(layers):
        ed_run(model, ids, decoder_ids, (ed_module(model, stack, layer, site), site, keep(layer)))
    return [seen[layer] for layer in range(layers)]


def ed_patching(model, source, target, corrupted, stack, site, objective="logit", eps=1e-5):
    """Per (layer, head, position): the central difference of the target scores under patching
    ``clean + s * (corrupted - clean)`` at ``s = +-eps`` (every target read from one forward)."""
    tok = model.tokenizer
    ids, bad = tok(source).input_ids, tok(corrupted).input_ids
    target_ids = tok(text_target=target).input_ids
    decoder_ids = [model.hf.config.decoder_start_token_id, *target_ids]
    config = model.hf.config
    if config.model_type == "t5":
        n_layers = config.num_layers if stack == "encoder" else config.num_decoder_layers
        heads = config.num_heads
    else:
        n_layers = config.encoder_layers if stack == "encoder" else config.decoder_layers
        heads = (
            config.encoder_attention_heads if stack == "encoder" else config.decoder_attention_heads
        )
    clean = ed_capture(model, ids, decoder_ids, stack, site, n_layers)
    corrupt = ed_capture(model, bad, decoder_ids, stack, site, n_layers)
    rows = torch.arange(len(target_ids))  # target k is predicted at decoder position k

    def scores(logits: torch.Tensor) -> np.ndarray:
        values = logits if objective == "logit" else torch.softmax(logits, -1)
        return values[rows, torch.tensor(target_ids)].numpy()

    groups = [slice(None)]
    if site == "heads":
        d = clean[0].shape[-1] // heads
        groups = [slice(h * d, (h + 1) * d) for h in range(heads)]
    out = np.zeros((len(target_ids), clean[0].shape[0], n_layers, len(groups)))
    for layer in range(n_layers):
        module = ed_module(model, stack, layer, site)
        for g, cols in enumerate(groups):
            for p in range(clean[0].shape[0]):
                moved = []
                for s in (eps, -eps):

                    def edit(x, s=s, p=p, cols=cols, layer=layer):
                        step = corrupt[layer][p, cols] - clean[layer][p, cols]
                        x[p, cols] = clean[layer][p, cols] + s * step
                        return x

                    moved.append(scores(ed_run(model, ids, decoder_ids, (module, site, edit))))
                out[:, p, layer, g] = (moved[0] - moved[1]) / (2 * eps)
    return out if site == "heads" else out[..., 0]


@pytest.mark.parametrize("arch", ["marian", "bart"])
@pytest.mark.parametrize("stack", ["encoder", "decoder", "cross"])
def test_atp_encoder_decoder_heads_first_order(encdec64, arch, stack):
    model = encdec64[arch]
    got = ax.attribution_patching(
        model, SOURCE, ED_TARGET, corrupted=CORRUPTED, stack=stack, objective="logit"
    )
    want = ed_patching(model, SOURCE, ED_TARGET, CORRUPTED, stack, "heads")
    assert got.dims == ("target", "source", "layer", "head")
    values = got.values
    if stack == "encoder":  # encoder heads live on the encoder positions: every target sees all
        assert "side" not in got.indexes["source"].names
        assert got.source_id.values.tolist() == model.tokenizer(SOURCE).input_ids
        np.testing.assert_allclose(values, want, rtol=1e-6, atol=1e-9)
        return
    # decoder self and cross heads live on the decoder positions: the target side
    assert set(got["side"].values) == {"target"}
    assert got["position"].values.tolist() == list(range(want.shape[1]))
    for k in range(want.shape[0]):  # target k (decoder position k + 1) is read at position k
        np.testing.assert_allclose(values[k, : k + 1], want[k, : k + 1], rtol=1e-6, atol=1e-9)
        assert np.isnan(values[k, k + 1 :]).all() and not want[k, k + 1 :].any()


@pytest.mark.parametrize("stack", ["encoder", "decoder", "cross"])
def test_atp_t5_heads_first_order(stack):
    model = t5_double()
    got = ax.attribution_patching(
        model, SOURCE, ED_TARGET, corrupted=CORRUPTED, stack=stack, objective="logit"
    )
    want = ed_patching(model, SOURCE, ED_TARGET, CORRUPTED, stack, "heads")
    values = np.where(np.isnan(got.values), 0.0, got.values)  # the future: exactly 0 in the loop
    np.testing.assert_allclose(values, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(("stack", "site"), [("encoder", "mlp"), ("decoder", "residual")])
def test_atp_encoder_decoder_sites_first_order(encdec64, stack, site):
    model = encdec64["marian"]
    got = ax.attribution_patching(
        model, SOURCE, ED_TARGET, corrupted=CORRUPTED, stack=stack, site=site,
        objective="probability",
    )  # fmt: skip
    want = ed_patching(model, SOURCE, ED_TARGET, CORRUPTED, stack, site, "probability")
    assert got.dims == ("target", "source", "layer")
    values = got.values
    if stack == "decoder":
        values = np.where(np.isnan(values), 0.0, values)  # the future: exactly 0 in the loop
    np.testing.assert_allclose(values, want, rtol=1e-6, atol=1e-10)


def test_atp_decoder_stacks_take_a_corrupted_source_of_any_length(encdec64):
    """Patched on the decoder positions, the corrupted source need not align with the clean one."""
    model = encdec64["bart"]
    shorter = "The capital is"
    assert len(model.tokenizer(shorter).input_ids) != len(model.tokenizer(SOURCE).input_ids)
    got = ax.attribution_patching(
        model, SOURCE, ED_TARGET, corrupted=shorter, stack="cross", objective="logit"
    )
    want = ed_patching(model, SOURCE, ED_TARGET, shorter, "cross", "heads")
    for k in range(want.shape[0]):
        np.testing.assert_allclose(got.values[k, : k + 1], want[k, : k + 1], rtol=1e-6, atol=1e-9)
    with pytest.raises(ax.InputError, match="same token length"):
        ax.attribution_patching(model, SOURCE, ED_TARGET, corrupted=shorter, stack="encoder")


@pytest.mark.parametrize("stack", ["encoder", "cross"])
def test_atp_encoder_decoder_batched_equals_single(encdec64, stack):
    model = encdec64["marian"]
    inputs, targets = [SOURCE, "Hello"], [ED_TARGET, " world"]
    corrupted = [CORRUPTED, "Howdy"]  # both 7 tokens in the tiny Marian tokenizer
    full = ax.attribution_patching(
        model, inputs, targets, corrupted=corrupted, stack=stack, chunk_size=1
    )
    for e in range(2):
        single = ax.attribution_patching(
            model, inputs[e], targets[e], corrupted=corrupted[e], stack=stack
        )
        part = full.isel(example=e).dropna("target", how="all")
        part = part.isel(source=slice(0, single.sizes["source"]))
        np.testing.assert_allclose(part.values, single.values, rtol=1e-9, atol=1e-12)
    picked = ax.attribution_patching(
        model, SOURCE, ED_TARGET, corrupted=CORRUPTED, stack=stack, layers=-1, heads=[1]
    )
    assert picked.layer.values.tolist() == [1] and picked["head"].values.tolist() == [1]
    whole = full.isel(example=0).dropna("target", how="all")
    whole = whole.isel(source=slice(0, picked.sizes["source"]))
    np.testing.assert_allclose(
        picked.values, whole.sel(layer=[1], head=[1]).values, rtol=1e-9, atol=1e-12
    )


def test_atp_encoder_decoder_defaults_and_errors(models, encdec64):
    model = encdec64["marian"]
    kw = {"corrupted": CORRUPTED, "objective": "logit"}
    heads = ax.attribution_patching(model, SOURCE, ED_TARGET, **kw)
    cross = ax.attribution_patching(model, SOURCE, ED_TARGET, stack="cross", **kw)
    np.testing.assert_array_equal(heads.values, cross.values)
    mlp = ax.attribution_patching(model, SOURCE, ED_TARGET, site="mlp", **kw)
    decoder = ax.attribution_patching(model, SOURCE, ED_TARGET, site="mlp", stack="decoder", **kw)
    np.testing.assert_array_equal(mlp.values, decoder.values)
    t5 = ax.attribution_patching(models["t5"], SOURCE, ED_TARGET, corrupted=CORRUPTED)
    assert t5.dims == ("target", "source", "layer", "head")
    assert np.isfinite(t5.values[0, 0]).all()
    t5_cross = ax.attribution_patching(
        models["t5"], SOURCE, ED_TARGET, corrupted=CORRUPTED, stack="cross"
    )
    np.testing.assert_array_equal(t5.values, t5_cross.values)
    with pytest.raises(ax.OptionError, match="stack='decoder'"):
        ax.attribution_patching(model, SOURCE, ED_TARGET, stack="cross", site="mlp", **kw)
    with pytest.raises(ax.OptionError, match="needs an encoder-decoder"):
        ax.attribution_patching(models["gpt2"], SOURCE, TARGET, stack="encoder", **kw)
    with pytest.raises(ax.OptionError, match="stack"):
        ax.attribution_patching(model, SOURCE, ED_TARGET, stack="self", **kw)
    with pytest.raises(ax.OptionError, match="attribute_target"):
        ax.attribution_patching(model, SOURCE, ED_TARGET, attribute_target=True, **kw)


# --- direct logit attribution on encoder-decoders ------------------------------------------


def t5_double(arch: str = "t5") -> ax.Model:
    """A float64 tiny T5 (or mT5: gated-GELU MLPs, no scaling of the decoder's output) whose
    RMSNorms also run in float64 (T5LayerNorm takes its variance in float32 even in a float64
    model)."""
    if arch == "t5":
        hf, tok = tiny_model("t5")
    else:
        translator = _translator(arch)
        hf, tok = translator.hf, translator.tokenizer
    hf = hf.double()
    for module in hf.modules():
        if type(module).__name__ in ("T5LayerNorm", "MT5LayerNorm"):

            def forward(x: torch.Tensor, m: torch.nn.Module = module) -> torch.Tensor:
                return (
                    m.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)
                )

            module.forward = forward
    return ax.load_model(hf, tokenizer=tok)


def traced_translation(model: ax.Model, ids: list[int], decoder_ids: list[int], handles: list):
    """One eager forward of a translator with its attention maps; ``handles`` removed after."""
    try:
        with torch.no_grad(), model.attention_as("eager", required=True):
            return model.hf(
                input_ids=torch.tensor([ids]),
                decoder_input_ids=torch.tensor([decoder_ids]),
                output_attentions=True,
                use_cache=False,
            )
    finally:
        for handle in handles:
            handle.remove()


def naive_t5_dla(model: ax.Model, source: str, target: str):
    """Per target, decoder layer, head and source, from one plain HF forward: cross heads over the
    encoder tokens, self heads over the decoder positions, the MLP at the predicting position;
    and the embedding's share (the only term no component owns: T5 has no biases)."""
    hf, tok = model.hf, model.tokenizer
    ids = tok(source).input_ids
    target_ids = tok(text_target=target).input_ids
    decoder_ids = [hf.config.decoder_start_token_id, *target_ids]
    blocks = hf.get_decoder().block
    norm = hf.get_decoder().final_layer_norm
    found: dict = {"decoder": {}, "cross": {}, "mlp": {}}
    handles = []
    for layer, block in enumerate(blocks):
        for stack, attention in (
            ("decoder", block.layer[0].SelfAttention),
            ("cross", block.layer[1].EncDecAttention),
        ):
            handles.append(
                attention.v.register_forward_hook(
                    lambda m, a, o, s=stack, n=layer: found[s].__setitem__(n, o[0])
                )
            )
        handles.append(
            block.layer[2].DenseReluDense.register_forward_hook(
                lambda m, a, o, n=layer: found["mlp"].__setitem__(n, o[0])
            )
        )
    handles.append(norm.register_forward_pre_hook(lambda m, a: found.__setitem__("final", a[0][0])))
    out = traced_translation(model, ids, decoder_ids, handles)
    heads = hf.config.num_heads
    d = hf.config.d_kv
    n_layers = len(blocks)
    # T5 scales the decoder's output when its embeddings are tied; mT5 never does
    scale = hf.config.d_model**-0.5 if getattr(hf.config, "scale_decoder_outputs", False) else 1.0
    unembed = hf.get_output_embeddings().weight
    cross = np.zeros((len(target_ids), len(ids), n_layers, heads + 1))
    own = np.full((len(target_ids), len(decoder_ids), n_layers, heads + 1), np.nan)
    rest, logits = np.zeros(len(target_ids)), np.zeros(len(target_ids))
    for k in range(len(target_ids)):
        i = k  # target k + 1 of the decoder sequence is predicted at position k
        x = found["final"][i]
        rms = torch.sqrt(x.pow(2).mean() + norm.variance_epsilon)
        direction = unembed[target_ids[k]]

        def proj(c, rms=rms, direction=direction):
            return float((norm.weight * c / rms * scale) @ direction)

        logits[k] = float(out.logits[0, i, target_ids[k]])
        for layer in range(n_layers):
            for stack, maps, block in (
                ("cross", out.cross_attentions, cross),
                ("decoder", out.decoder_attentions, own),
            ):
                attention = blocks[layer].layer[0 if stack == "decoder" else 1]
                w = (
                    attention.SelfAttention if stack == "decoder" else attention.EncDecAttention
                ).o.weight.T
                for h in range(heads):
                    for j in range(len(ids) if stack == "cross" else i + 1):
                        a = maps[layer][0, h, i, j]
                        v = found[stack][layer][j, h * d : (h + 1) * d]
                        block[k, j, layer, h] = proj(a * v @ w[h * d : (h + 1) * d])
            own[k, : i + 1, layer, heads] = 0.0
            own[k, i, layer, heads] = proj(found["mlp"][layer][i])
        rest[k] = proj(hf.get_decoder().embed_tokens(torch.tensor(decoder_ids[i])))
    return cross, own, rest, logits


def naive_pre_norm_dla(model: ax.Model, source: str, target: str):
    """As :func:`naive_t5_dla` for the pre-norm BART layout (NLLB's M2M100, mBART, Pegasus): the
    final LayerNorm recenters, and the rest holds the decoder's input embeddings, each
    attention's output-projection bias, the final norm's bias and the head's bias."""
    hf, tok = model.hf, model.tokenizer
    ids = tok(source).input_ids
    target_ids = tok(text_target=target).input_ids
    decoder_ids = [model.decoder_start_token_id, *target_ids]
    decoder = hf.get_decoder()
    layers, norm = decoder.layers, decoder.layer_norm
    found: dict = {"decoder": {}, "cross": {}, "mlp": {}}
    handles = []
    for n, layer in enumerate(layers):
        for stack, attention in (("decoder", layer.self_attn), ("cross", layer.encoder_attn)):
            handles.append(
                attention.v_proj.register_forward_hook(
                    lambda m, a, o, s=stack, n=n: found[s].__setitem__(n, o[0])
                )
            )
        handles.append(  # fc1, the activation and fc2 run inline: fc2 writes the MLP's output
            layer.fc2.register_forward_hook(lambda m, a, o, n=n: found["mlp"].__setitem__(n, o[0]))
        )
    handles.append(norm.register_forward_pre_hook(lambda m, a: found.__setitem__("final", a[0][0])))
    handles.append(  # the decoder's input: its embeddings and positions (mBART: their norm too)
        layers[0].register_forward_pre_hook(
            lambda m, a, kw: found.__setitem__("input", (a[0] if a else kw["hidden_states"])[0]),
            with_kwargs=True,
        )
    )
    out = traced_translation(model, ids, decoder_ids, handles)
    heads = hf.config.decoder_attention_heads
    d = hf.config.d_model // heads
    unembed = hf.get_output_embeddings().weight
    head_bias = getattr(hf, "final_logits_bias", None)
    n_layers = len(layers)
    cross = np.zeros((len(target_ids), len(ids), n_layers, heads + 1))
    own = np.full((len(target_ids), len(decoder_ids), n_layers, heads + 1), np.nan)
    rest, logits = np.zeros(len(target_ids)), np.zeros(len(target_ids))
    for k in range(len(target_ids)):
        i = k  # target k + 1 of the decoder sequence is predicted at position k
        x = found["final"][i]
        sigma = torch.sqrt(x.var(unbiased=False) + norm.eps)
        direction = unembed[target_ids[k]]

        def proj(c, sigma=sigma, direction=direction):
            return float((norm.weight * (c - c.mean()) / sigma) @ direction)

        logits[k] = float(out.logits[0, i, target_ids[k]])
        for n in range(n_layers):
            for stack, maps, block in (
                ("cross", out.cross_attentions, cross),
                ("decoder", out.decoder_attentions, own),
            ):
                attention = layers[n].encoder_attn if stack == "cross" else layers[n].self_attn
                w = attention.out_proj.weight.T
                for h in range(heads):
                    for j in range(len(ids) if stack == "cross" else i + 1):
                        a = maps[n][0, h, i, j]
                        v = found[stack][n][j, h * d : (h + 1) * d]
                        block[k, j, n, h] = proj(a * v @ w[h * d : (h + 1) * d])
                rest[k] += proj(attention.out_proj.bias)
            own[k, : i + 1, n, heads] = 0.0
            own[k, i, n, heads] = proj(found["mlp"][n][i])
        rest[k] += proj(found["input"][i]) + float(norm.bias @ direction)
        if head_bias is not None:
            rest[k] += float(head_bias[0, target_ids[k]])
    return cross, own, rest, logits


@pytest.mark.parametrize("arch", ["m2m100", "mbart", "pegasus"])
def test_dla_of_pre_norm_translators_equals_naive_and_sums_back(arch):
    translator = _translator(arch)
    model = ax.load_model(translator.hf.double(), tokenizer=translator.tokenizer)
    with torch.no_grad():  # random biases and norm weights: zeros and ones would test less
        for name, parameter in model.hf.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.5)
            elif "layer_norm" in name or "layernorm" in name:
                parameter.normal_(1, 0.3)
    got = ax.direct_logit_attribution(model, SOURCE, ED_TARGET)
    cross, own, rest, logits = naive_pre_norm_dla(model, SOURCE, ED_TARGET)
    np.testing.assert_allclose(got.sel(side="source").values, cross, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.sel(side="target").values, own, rtol=1e-9, atol=1e-12)
    # the identity: heads of both sides + MLPs + embeddings and biases = the logit
    total = np.nansum(got.values, axis=(1, 2, 3)) + rest
    np.testing.assert_allclose(total, logits, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("arch", ["t5", "mt5"])
def test_dla_t5_equals_naive_and_sums_back(arch):
    model = t5_double(arch)
    got = ax.direct_logit_attribution(model, SOURCE, ED_TARGET)
    cross, own, rest, logits = naive_t5_dla(model, SOURCE, ED_TARGET)
    assert got.dims == ("target", "source", "layer", "head")
    assert got.indexes["source"].names == ["side", "position"]
    assert got.component.values.tolist()[-1] == "mlp"
    np.testing.assert_allclose(got.sel(side="source").values, cross, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.sel(side="target").values, own, rtol=1e-9, atol=1e-12)
    # the identity: heads of both sides + MLPs + the decoder embedding = the logit
    total = np.nansum(got.values, axis=(1, 2, 3)) + rest
    np.testing.assert_allclose(total, logits, rtol=1e-9, atol=1e-9)
    picked = ax.direct_logit_attribution(model, SOURCE, ED_TARGET, layers=[1], heads=[1])
    np.testing.assert_allclose(
        picked.values, got.sel(layer=[1], head=[1, -1]).values, rtol=1e-12, atol=1e-14
    )


def test_dla_post_norm_encoder_decoders_are_refused(models):
    for arch in ("marian", "bart"):
        with pytest.raises(ax.ModelError, match="post-LN"):
            ax.direct_logit_attribution(models[arch], SOURCE, ED_TARGET)


def test_dla_t5_batched_equals_single_and_contrast():
    model = t5_double()
    inputs, targets = [SOURCE, "Hello"], [ED_TARGET, " world"]
    full = ax.direct_logit_attribution(model, inputs, targets)
    for e in range(2):
        single = ax.direct_logit_attribution(model, inputs[e], targets[e])
        part = full.isel(example=e).dropna("target", how="all")
        for side in ("source", "target"):
            mine = part.sel(side=side)  # the dim is now `position`
            mine = mine.isel(position=slice(0, single.sel(side=side).sizes["position"]))
            np.testing.assert_allclose(
                mine.values, single.sel(side=side).values, rtol=1e-9, atol=1e-12
            )
    # the logit difference is linear in the direction: target minus contrast (first target only:
    # later ones are teacher-forced on different prefixes in the contrast's own run)
    both = ax.direct_logit_attribution(model, SOURCE, " Paris", contrast=" Rome").isel(target=0)
    one = ax.direct_logit_attribution(model, SOURCE, " Paris").isel(target=0)
    other = ax.direct_logit_attribution(model, SOURCE, " Rome").isel(target=0)
    assert np.nanmax(np.abs(both.values - one.values)) > 1e-3  # the contrast counts
    np.testing.assert_allclose(both.values, one.values - other.values, rtol=1e-9, atol=1e-12)


def test_atp_encoder_decoder_dataset(encdec64, tmp_path, write_jsonl):
    model = encdec64["marian"]
    rows = [
        {"input": SOURCE, "target": " Paris is", "corrupted": CORRUPTED},
        {"input": "Hello", "target": " world", "corrupted": "Howdy"},
    ]
    ax.attribute_dataset(
        model, write_jsonl(rows), tmp_path / "atp", method="attribution_patching",
        stack="encoder", reduce="sum:head,sum:layer", progress=False,
    )  # fmt: skip
    got = ax.load_dataset_results(tmp_path / "atp")
    for b, row in enumerate(rows):  # assertions only: one check per record
        alone = ax.attribution_patching(
            model, row["input"], row["target"], corrupted=row["corrupted"], stack="encoder"
        ).sum(["head", "layer"], skipna=False)
        mine = got.isel(example=b).sel(target=alone.target, source=alone.source)
        np.testing.assert_allclose(mine.values, alone.values, rtol=1e-5, atol=1e-9)


# --- attribution patching of the attention inputs (AtP*: queries, keys, values) ------------
#
# The references read the q / k / v vectors where the projections write them (GPT-2: the thirds of
# `c_attn`'s output; Llama: q_proj / k_proj / v_proj, before RoPE, a fixed rotation of each
# position that leaves `grad . delta` and the patched attention pattern as they are; the
# encoder-decoders' and BERT's own projections), patch one head's columns at one position with
# forward hooks, and run an eager attention written here (`mixing`) that records every layer's
# weights and can move one layer's weights along a direction: the QK fix's value of a node is the
# derivative of the score along (the weights under a real patch of that node - the clean weights).

QKV_TARGET = " Paris is"  # two targets in both tiny tokenizers
MIX = "attrax_test_mix"


# what the attention written here reads and writes: every attention module's weights of the last
# forward ("seen"), the direction added to the weights of one module ("module", "delta")
MIXED: dict = {"module": None, "delta": None, "seen": {}, "inputs": {}, "put": []}


@dataclasses.dataclass(frozen=True)
class Interface:
    """A site's vectors where :func:`_mixed_attention` receives them: DeepSeek's keys are in no
    one module's output (each head's key repeats the one rotary part its latent writes)."""

    attention: torch.nn.Module
    site: str


def _mixed_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Plain eager attention (softmax in the inputs' own dtype, float64 here), grouped keys and
    values repeated for their query heads (query head h reads key-value head h // group);
    GPT-OSS's sinks: one more logit per head in each row's softmax, whose share is dropped."""
    given = {"queries": query, "keys": key, "values": value}
    for where, position, head, vector in MIXED["put"]:  # Interface patches: [B, heads, L, d]
        if where.attention is module:
            given[where.site] = given[where.site].clone()
            given[where.site][0, head, position] = vector
    for site, tensor in given.items():
        MIXED["inputs"][Interface(module, site)] = tensor[0].transpose(0, 1).detach().clone()
    query, key, value = given.values()
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    logits = query @ key.transpose(-1, -2) * scale
    if attention_mask is not None:
        logits = logits + attention_mask[..., : key.shape[-2]]
    indices = kwargs.get("indices")  # DeepSeek V3.2: the keys its indexer picked, no others
    if indices is not None:
        picked = torch.zeros(logits.shape[0], *logits.shape[2:], dtype=torch.bool)
        for b, i in np.ndindex(*indices.shape[:2]):
            picked[b, i, indices[b, i].long()] = True
        logits = logits.masked_fill(~picked[:, None], -torch.inf)
    sinks = kwargs.get("s_aux")
    if sinks is not None:
        sink = sinks.reshape(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
        logits = torch.cat([logits, sink], dim=-1)
    weights = torch.softmax(logits, dim=-1)
    if sinks is not None:
        weights = weights[..., :-1]
    if module is MIXED["module"]:
        weights = weights + MIXED["delta"]
    MIXED["seen"][module] = weights[0].detach().clone()
    return (weights @ value).transpose(1, 2), weights


def _register_mix() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(MIX, _mixed_attention)
    AttentionMaskInterface.register(MIX, eager_mask)


_register_mix()


class mixing:
    """``with mixing(model):`` the model's attention is :func:`_mixed_attention`. DeBERTa-v2's
    disentangled attention runs its own code: its weights are read, and moved, where that code
    hands them to its dropout (the identity in eval mode)."""

    def __init__(self, model: ax.Model) -> None:
        self.hf = model.hf
        self.disentangled = [
            m for m in model.hf.modules() if type(m).__name__ == "DisentangledSelfAttention"
        ]

    def __enter__(self) -> None:
        self.handles = []
        for attention in self.disentangled:

            def weights(_m, _a, probabilities, module=attention):
                if module is MIXED["module"]:
                    probabilities = probabilities + MIXED["delta"]
                MIXED["seen"][module] = probabilities[0].detach().clone()
                return probabilities

            self.handles.append(attention.dropout.register_forward_hook(weights))
        self.previous = self.hf.config._attn_implementation
        if not self.disentangled:
            self.hf.set_attn_implementation(MIX)

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        if not self.disentangled:
            self.hf.set_attn_implementation(self.previous)
        MIXED.update(module=None, delta=None, seen={}, inputs={}, put=[])


class replaced:
    """``with replaced([(module, position, cols, value), ...]):`` each module's output (of the one
    example) at ``[position, cols]`` is ``value``."""

    def __init__(self, patches) -> None:
        self.patches = patches

    def __enter__(self) -> None:
        self.handles = []
        for module, position, cols, value in self.patches:
            if isinstance(module, Interface):  # cols: the head
                MIXED["put"].append((module, position, cols, value))
                continue

            def put(m, a, o, position=position, cols=cols, value=value):
                o = o.clone()
                o[0, position, cols] = value
                return o

            self.handles.append(module.register_forward_hook(put))

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        MIXED["put"] = []


def outputs(mods, run) -> dict:
    """Each module's output (of the one example) in the forward ``run()``; an
    :class:`Interface`'s ``[L, heads, d]`` (the forward under :class:`mixing` then)."""
    if all(isinstance(m, Interface) for m in mods):
        run()
        return {m: MIXED["inputs"][m] for m in mods}
    seen: dict = {}
    handles = [
        m.register_forward_hook(lambda m, a, o: seen.__setitem__(m, o[0].detach().clone()))
        for m in mods
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def qkv_node(model: ax.Model, layer: int, site: str, head: int):
    """(the module writing ``site``'s vector of ``head`` in ``layer``, its columns, the attention
    module); keys and values name key-value heads."""
    attn = modules(model)[1][layer]
    if hasattr(attn, "kv_b_proj"):  # DeepSeek: the vectors its attention function receives
        return Interface(attn, site), head, attn
    d = attn.head_dim
    if model.hf.config.model_type == "gpt2":
        start = {"queries": 0, "keys": 1, "values": 2}[site] * model.hf.config.hidden_size
        return attn.c_attn, slice(start + head * d, start + (head + 1) * d), attn
    module = {"queries": attn.q_proj, "keys": attn.k_proj, "values": attn.v_proj}[site]
    return module, slice(head * d, (head + 1) * d), attn


def site_heads(model: ax.Model, site: str) -> int:
    config = model.hf.config
    if site == "queries":
        return config.num_attention_heads
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def collect(where, forward, clean_input, corrupt_input, positions) -> dict:
    """``(layer, head, position)`` -> ``(module, position, cols, clean vector, corrupted vector,
    attention module)`` for ``where[(layer, head)] = (module, cols, attention module)``."""
    mods = {m for m, _, _ in where.values()}
    clean = outputs(mods, lambda: forward(clean_input))
    corrupt = outputs(mods, lambda: forward(corrupt_input))
    return {
        (n, h, p): (m, p, cols, clean[m][p, cols], corrupt[m][p, cols], attn)
        for (n, h), (m, cols, attn) in where.items()
        for p in range(positions)
    }


def read_scores(logits: torch.Tensor, target_ids, objective: str) -> np.ndarray:
    """``logits[k, target_ids[k]]`` (or its probability) of each row ``k``."""
    values = logits if objective == "logit" else torch.softmax(logits, -1)
    return values[torch.arange(len(target_ids)), torch.tensor(target_ids)].numpy()


def decoder_only_nodes(model, site, objective, texts=(SOURCE, QKV_TARGET, CORRUPTED)):
    """``(nodes, scores, shape)`` of a decoder-only LM on ``texts`` (source, target, corrupted):
    ``nodes`` by :func:`collect`; ``scores(patches)`` every target's score from one forward."""
    source, target, corrupted = texts
    src, tgt = token_ids(model, source, target)
    ids, bad = src + tgt, token_ids(model, corrupted, target)[0] + tgt

    def forward(x):
        with torch.no_grad():
            return model.hf(input_ids=torch.tensor([x]), use_cache=False).logits[0]

    def scores(patches=()):
        with replaced(patches):
            return read_scores(forward(ids)[len(src) - 1 : -1], tgt, objective)

    layers, heads = len(modules(model)[0]), site_heads(model, site)
    where = {(n, h): qkv_node(model, n, site, h) for n in range(layers) for h in range(heads)}
    interface = isinstance(where[0, 0][0], Interface)  # read in the mixing forward
    with mixing(model) if interface else contextlib.nullcontext():
        nodes = collect(where, forward, ids, bad, len(ids))
    return nodes, scores, (len(tgt), len(ids), layers, heads)


def cross_nodes(model, site, objective):
    """As :func:`decoder_only_nodes` for the cross-attention of an encoder-decoder on
    ``SOURCE -> ED_TARGET``: queries on the decoder positions, keys and values on the encoder's."""
    tok = model.tokenizer
    ids, bad = tok(SOURCE).input_ids, tok(CORRUPTED).input_ids
    target_ids = tok(text_target=ED_TARGET).input_ids
    decoder_ids = [model.hf.config.decoder_start_token_id, *target_ids]

    def scores(patches=()):
        with replaced(patches):
            return read_scores(ed_run(model, ids, decoder_ids)[:-1], target_ids, objective)

    heads = model.hf.config.decoder_attention_heads
    layers = model.hf.get_decoder().layers
    where = {}
    for n, layer in enumerate(layers):
        attn = layer.encoder_attn
        module = {"queries": attn.q_proj, "keys": attn.k_proj, "values": attn.v_proj}[site]
        for h in range(heads):
            where[n, h] = (module, slice(h * attn.head_dim, (h + 1) * attn.head_dim), attn)
    positions = len(decoder_ids) if site == "queries" else len(ids)
    nodes = collect(where, lambda x: ed_run(model, x, decoder_ids), ids, bad, positions)
    return nodes, scores, (len(target_ids), positions, len(layers), heads)


def first_order(nodes, scores, shape, eps):
    """Per node: the central difference of the scores as the node moves along
    ``clean + s * (corrupted - clean)``, ``s = +-eps``."""
    out = np.zeros(shape)
    for (n, h, p), (m, position, cols, a, b, _) in nodes.items():
        up = scores([(m, position, cols, a + eps * (b - a))])
        down = scores([(m, position, cols, a - eps * (b - a))])
        out[:, p, n, h] = (up - down) / (2 * eps)
    return out


def real_patching(nodes, scores, shape):
    """Per node: the scores with the node set to its corrupted vector, minus the clean scores."""
    out = np.zeros(shape)
    base = scores()
    for (n, h, p), (m, position, cols, _a, b, _) in nodes.items():
        out[:, p, n, h] = scores([(m, position, cols, b)]) - base
    return out


def qk_fixed(model, nodes, scores, shape, site, eps=1e-5):
    """Per query / key node, under :func:`mixing`: the weights ``A'`` of its layer with the node
    really patched (softmax recomputed), then the central difference of the scores with that
    layer's weights ``A + s * (A' - A)``, ``s = +-eps``: ``sum dS/dA * (A' - A)`` to first order."""
    out = np.zeros(shape)
    with mixing(model):
        scores()
        clean = dict(MIXED["seen"])
        for (n, h, p), (m, position, cols, a, b, attn) in nodes.items():
            if torch.equal(a, b):
                continue  # the same vector: the same weights
            scores([(m, position, cols, b)])
            delta = MIXED["seen"][attn] - clean[attn]  # [heads, queries, keys]
            # this reference's wiring: a query moves its own row of its head; a key, the rows of
            # the heads of its group
            rest = delta.clone()
            if site == "queries":
                rest[h, p] = 0.0
            else:
                group = delta.shape[0] // shape[-1]
                rest[h * group : (h + 1) * group] = 0.0
            assert not rest.any()
            if not delta.any():  # a key no query picks (DeepSeek V3.2's indexer) moves nothing
                continue
            MIXED["module"] = attn
            moved = []
            for s in (eps, -eps):
                MIXED["delta"] = s * delta
                moved.append(scores())
            MIXED.update(module=None, delta=None)
            out[:, p, n, h] = (moved[0] - moved[1]) / (2 * eps)
    return out


def assert_causal_close(got, want: np.ndarray, rtol: float, atol: float) -> None:
    """``got`` (a decoder-only LM's ``[target, source, ...]``) is NaN past each target's predicting
    position, where the loops' effects are exactly 0, and equals ``want`` everywhere else."""
    values = got.values
    first = want.shape[1] - want.shape[0]  # the prompt's length: target k is read at first + k - 1
    for k in range(want.shape[0]):
        assert np.isnan(values[k, first + k :]).all() and not want[k, first + k :].any()
        assert np.isfinite(values[k, : first + k]).all()
    assert_close(np.nan_to_num(values, nan=0.0), want, rtol, atol)


# Llama's own eager softmax runs in float32 even in a float64 model: the loops run under
# `mixing` (float64 throughout), and the tolerance for Llama covers attrax's float32 softmax
QKV_TOL = {"gpt2": (1e-6, 1e-8), "llama": (1e-4, 3e-6), "gpt_oss": (1e-4, 3e-6)}
QKV_TOL["deepseek_v3-dense"] = QKV_TOL["deepseek_v32-dense"] = QKV_TOL["llama"]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "deepseek_v3-dense", "deepseek_v32-dense"])
@pytest.mark.parametrize("site", ["queries", "keys", "values"])
def test_atp_qkv_plain_first_order(models64, arch, site):
    """Plain AtP of each query, key and value vector (``qk_fix=False``; values have no fix): the
    central difference of every target's score as that one vector (one head, one position, one
    layer; a key-value head on Llama's grouped attention) moves toward its corrupted value."""
    model = models64[arch]
    objective = "logit" if arch == "gpt2" else "probability"
    options = {} if site == "values" else {"qk_fix": False}
    got = ax.attribution_patching(
        model, SOURCE, QKV_TARGET, corrupted=CORRUPTED, site=site, objective=objective, **options
    )
    nodes, scores, shape = decoder_only_nodes(model, site, objective)
    with mixing(model):
        want = first_order(nodes, scores, shape, eps=1e-5)
    assert got.dims == ("target", "source", "layer", "head")
    assert got["head"].values.tolist() == list(range(shape[-1]))
    assert got.layer.values.tolist() == list(range(shape[2]))
    assert_causal_close(got, want, *QKV_TOL[arch])


@pytest.mark.parametrize(
    "arch", ["gpt2", "llama", "gpt_oss", "deepseek_v3-dense", "deepseek_v32-dense"]
)
@pytest.mark.parametrize("site", ["queries", "keys"])
def test_atp_qk_fix_equals_naive(models64, arch, site):
    """AtP*'s QK fix (the default for queries and keys): per node, the derivative of the score
    along ``A' - A`` of its layer's attention probabilities, ``A'`` read from a real forward with
    that one query (key) patched; on Llama a key moves both query heads of its group. GPT-OSS:
    its sinks take a share of each row. Plain AtP differs from it: the fix is not the plain
    estimate."""
    model = models64[arch]
    objective = "probability" if arch == "gpt2" else "logit"
    kw = {"corrupted": CORRUPTED, "site": site, "objective": objective}
    got = ax.attribution_patching(model, SOURCE, QKV_TARGET, **kw)
    nodes, scores, shape = decoder_only_nodes(model, site, objective)
    want = qk_fixed(model, nodes, scores, shape, site)
    assert got.dims == ("target", "source", "layer", "head")
    assert got["head"].values.tolist() == list(range(shape[-1]))
    assert_causal_close(got, want, *QKV_TOL[arch])
    fixed = ax.attribution_patching(model, SOURCE, QKV_TARGET, qk_fix=True, **kw)
    np.testing.assert_array_equal(fixed.values, got.values)
    plain = ax.attribution_patching(model, SOURCE, QKV_TARGET, qk_fix=False, **kw)
    gap = np.nanmax(np.abs(plain.values - got.values)) / np.nanmax(np.abs(got.values))
    # measured 0.37 to 2.3 of the largest value; 0.0086 for GPT-OSS's queries, whose tiny random
    # scores leave its softmax near linear, 0.0075 and 0.043 for DeepSeek V3.2's queries and keys
    # (three keys a row)
    near = (arch == "gpt_oss" and site == "queries") or arch == "deepseek_v32-dense"
    assert gap > (0.005 if near else 0.05), gap


@pytest.mark.parametrize("site", ["queries", "keys"])
@pytest.mark.parametrize("objective", ["logit", "probability"])
def test_atp_qk_fix_ranks_like_real_patching(default_model, site, objective):
    """On the built-in (trained) model, per target: rank agreement (Spearman) of the QK fix with
    real activation patching of each query (key) over the nodes the corruption moves (the others
    are exactly 0 in both), and on the logit its error, well below plain AtP's."""
    texts = ("1 2 3 =", " 3 2 1", "1 2 4 =")
    kw = {"corrupted": texts[2], "site": site, "objective": objective}
    fixed = ax.attribution_patching(default_model, texts[0], texts[1], **kw).values
    plain = ax.attribution_patching(default_model, texts[0], texts[1], qk_fix=False, **kw).values
    nodes, scores, shape = decoder_only_nodes(default_model, site, objective, texts)
    want = real_patching(nodes, scores, shape)
    moved = np.zeros(shape[1:], dtype=bool)
    for (n, h, p), (_, _, _, a, b, _) in nodes.items():
        moved[p, n, h] = not torch.equal(a, b)
    first = shape[1] - shape[0]
    ranks, errors = [], []
    for k in range(shape[0]):
        seen = moved.copy()
        seen[first + k :] = False
        real = want[k][seen]
        assert np.abs(real).max() > 0
        ranks.append(spearman(fixed[k][seen], real))
        errors.append(
            [np.linalg.norm(e[k][seen] - real) / np.linalg.norm(real) for e in (fixed, plain)]
        )
    # measured (queries, keys): Spearman 1.0 for every target but keys' probability (1.0, 0.997,
    # 0.998); plain AtP 0.988 to 1.0. Logit error of the fix 0.006 to 0.062, of plain AtP 0.09
    # to 0.63
    assert min(ranks) > 0.99, ranks
    if objective == "logit":
        assert all(fix < 0.1 and fix < plain / 2 for fix, plain in errors), errors


@pytest.mark.parametrize("arch", ["marian", "bart"])
@pytest.mark.parametrize("site", ["queries", "keys"])
def test_atp_cross_attention_inputs(encdec64, arch, site):
    """Cross-attention (the default stack): queries on the decoder positions, keys on the
    encoder's. Plain AtP against central differences through the hooked `encoder_attn`
    projections, the QK fix against the naive fix."""
    model = encdec64[arch]
    kw = {"corrupted": CORRUPTED, "site": site, "objective": "logit"}
    plain = ax.attribution_patching(model, SOURCE, ED_TARGET, stack="cross", qk_fix=False, **kw)
    fixed = ax.attribution_patching(model, SOURCE, ED_TARGET, **kw)
    nodes, scores, shape = cross_nodes(model, site, "logit")
    want_plain = first_order(nodes, scores, shape, eps=1e-5)
    want_fixed = qk_fixed(model, nodes, scores, shape, site)
    assert not np.allclose(want_plain, want_fixed, rtol=0.05)  # the fix is no plain AtP here
    for got in (plain, fixed):
        assert got.dims == ("target", "source", "layer", "head")
        assert got.layer.values.tolist() == list(range(shape[2]))
        assert got["head"].values.tolist() == list(range(shape[3]))
    if site == "keys":  # the encoder positions: every target sees all of them
        assert "side" not in plain.indexes["source"].names
        assert plain.source_id.values.tolist() == model.tokenizer(SOURCE).input_ids
        np.testing.assert_allclose(plain.values, want_plain, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(fixed.values, want_fixed, rtol=1e-6, atol=1e-9)
        return
    assert set(plain["side"].values) == {"target"}  # the decoder positions
    assert plain["position"].values.tolist() == list(range(shape[1]))
    for got, want in ((plain, want_plain), (fixed, want_fixed)):
        for k in range(shape[0]):  # target k (decoder position k + 1) is read at position k
            assert np.isnan(got.values[k, k + 1 :]).all() and not want[k, k + 1 :].any()
        np.testing.assert_allclose(np.nan_to_num(got.values), want, rtol=1e-6, atol=1e-9)


def classifier_nodes(model, site, text, bad, target):
    """As :func:`decoder_only_nodes` for a BERT or DeBERTa-v2 sequence classifier's class
    ``target`` (DeBERTa names its projections `query_proj`, `key_proj`, `value_proj`)."""
    tok = model.tokenizer
    ids, bad_ids = tok(text).input_ids, tok(bad).input_ids
    assert len(ids) == len(bad_ids)

    def forward(x):
        with torch.no_grad():
            return model.hf(input_ids=torch.tensor([x])).logits

    def scores(patches=()):
        with replaced(patches):
            return read_scores(forward(ids), [target], "logit")

    layers = model.hf.base_model.encoder.layer
    where = {}
    for n, layer in enumerate(layers):
        attn = layer.attention.self
        name = {"queries": "query", "keys": "key", "values": "value"}[site]
        module = getattr(attn, name, None) or getattr(attn, f"{name}_proj")
        d = attn.attention_head_size
        for h in range(attn.num_attention_heads):
            where[n, h] = (module, slice(h * d, (h + 1) * d), attn)
    nodes = collect(where, forward, ids, bad_ids, len(ids))
    return nodes, scores, (1, len(ids), len(layers), model.hf.config.num_attention_heads)


@pytest.mark.parametrize(
    ("arch", "site"),
    [
        ("bert", "values"),
        ("bert", "keys"),
        ("deberta-v2", "values"),
        ("deberta-v2", "keys"),
        ("deberta-v2", "queries"),
    ],
)
def test_atp_attention_inputs_of_encoder_classifiers(arch, site):
    """An encoder-only classifier: plain AtP of the values against central differences through
    the hooked value Linears; the keys' and queries' QK fix against the naive fix (no causal
    mask: a key moves every row). DeBERTa-v2's queries and keys also meet its relative
    positions' projections."""
    hf, tok = tiny_classifier(arch)
    model = ax.load_model(hf.double(), tokenizer=tok)
    text, bad = "a good day", "the good day"
    got = ax.attribution_patching(model, text, 1, corrupted=bad, site=site, objective="logit")
    nodes, scores, shape = classifier_nodes(model, site, text, bad, 1)
    if site == "values":
        want = first_order(nodes, scores, shape, eps=1e-5)
    else:
        want = qk_fixed(model, nodes, scores, shape, site)
    assert got.dims == ("target", "source", "layer", "head")
    assert got.source_id.values.tolist() == tok(text).input_ids
    np.testing.assert_allclose(got.values, want, rtol=1e-6, atol=1e-9)


def test_atp_attention_inputs_batched_selection_and_errors(models64, monkeypatch):
    """Llama (4 query heads, 2 key-value heads): a padded batch equals its examples alone;
    `heads` picks query heads for queries, key-value heads for keys and values; `layers` in any
    order; `qk_fix` only for queries and keys."""
    model = models64["llama"]
    inputs, targets = [SOURCE, "The dog is"], [QKV_TARGET, " big"]
    corrupted = [CORRUPTED, "The cat is"]  # as many tokens as its clean input
    for clean, bad in zip(inputs, corrupted, strict=True):
        assert len(token_ids(model, clean, " big")[0]) == len(token_ids(model, bad, " big")[0])
    for site in ("queries", "keys"):
        kw = {"corrupted": corrupted, "site": site}
        full = ax.attribution_patching(model, inputs, targets, chunk_size=1, **kw)
        for e in range(2):
            single = ax.attribution_patching(
                model, inputs[e], targets[e], corrupted=corrupted[e], site=site
            )
            assert np.nanmax(np.abs(single.values)) > 1e-6
            part = full.isel(example=e).dropna("target", how="all")
            part = part.isel(source=slice(0, single.sizes["source"]))
            # Llama's float32 softmax: padding changes its sums' order (by 2e-6 of the largest
            # on an AVX2 CPU's kernels)
            assert_close(part.values, single.values, rtol=1e-4, atol=1e-5)
    kw = {"corrupted": CORRUPTED, "objective": "logit"}
    for site, heads, total in (("queries", [3, 0], 4), ("keys", [1], 2), ("values", -1, 2)):
        whole = ax.attribution_patching(model, SOURCE, QKV_TARGET, site=site, **kw)
        assert whole["head"].values.tolist() == list(range(total))
        picked = ax.attribution_patching(
            model, SOURCE, QKV_TARGET, site=site, layers=[1, 0], heads=heads, **kw
        )
        chosen = [h % total for h in np.atleast_1d(heads)]
        assert picked.layer.values.tolist() == [1, 0]
        assert picked["head"].values.tolist() == chosen
        np.testing.assert_allclose(
            picked.values, whole.sel(layer=[1, 0], head=chosen).values, rtol=1e-9, atol=1e-12
        )
    for site, heads in (("keys", 2), ("values", 5), ("queries", 4)):
        with pytest.raises(ax.OptionError, match="heads"):
            ax.attribution_patching(model, SOURCE, QKV_TARGET, site=site, heads=heads, **kw)

    def boom(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(model.hf, "forward", boom)  # refused before the model runs
    for site in ("heads", "mlp", "residual", "values"):
        with pytest.raises(ax.OptionError, match="qk_fix"):
            ax.attribution_patching(model, SOURCE, QKV_TARGET, site=site, qk_fix=True, **kw)
    with pytest.raises(ax.OptionError, match="qk_fix"):
        ax.attribution_patching(model, SOURCE, QKV_TARGET, site="keys", qk_fix="yes", **kw)


# --- attribution patching on other decoder-only families -----------------------------------

#: the test's own table: where each family keeps its attention and that attention's output
#: projection (whose input is the concatenated heads)
FAMILY_MODULES = {
    "pythia": ("attention", "dense"),
    "qwen2": ("self_attn", "o_proj"),
    "gemma2": ("self_attn", "o_proj"),
    "phi3": ("self_attn", "o_proj"),
    "bloom": ("self_attention", "dense"),
    "falcon": ("self_attention", "dense"),
    "granite": ("self_attn", "o_proj"),
    "mixtral": ("self_attn", "o_proj"),  # a routed MLP
    "granitemoe": ("self_attn", "o_proj"),  # a routed MLP, `block_sparse_moe`
    "gpt_oss": ("self_attn", "o_proj"),  # attention sinks; its MLP returns its routing too
    "deepseek_v3": ("self_attn", "o_proj"),  # value heads narrower than the hidden / heads
    "llama4": ("self_attn", "o_proj"),  # its MLP returns its routing too, its rows flattened
}


@pytest.mark.parametrize("site", ["heads", "mlp", "residual"])
@pytest.mark.parametrize("family", list(FAMILY_MODULES))
def test_atp_other_decoder_families_first_order(family, site):
    """Heads, MLPs and the residual stream of Pythia (parallel residual), Qwen2, Gemma 2
    (sandwich norms, softcapping), Phi-3 (fused qkv), BLOOM (ALiBi), Falcon, Granite (its
    multipliers), Mixtral and Granite MoE (routed MLPs): each (layer,
    head, position) equals the central difference of really patching it along ``clean + s *
    (corrupted - clean)``, hooks on the modules of the table above. BLOOM's MLP adds the
    residual stream (its second argument) itself: what it adds is its output minus that."""

    _, tok = tiny_model("gpt2")
    # RMSNorm's float32 island would round Granite's small MLP effects' central differences
    kw = {"experts_implementation": "eager"} if family in EXPERTS else {}  # float64 experts
    model = ax.load_model(full_double(_family(family, tok, **kw)), tokenizer=tok)
    kw = {"corrupted": CORRUPTED, "site": site, "objective": "logit"}
    got = ax.attribution_patching(model, SOURCE, TARGET, **kw)
    base = model.hf.model if model.hf.base_model is model.hf else model.hf.base_model
    blocks = list(getattr(base, "layers", None) or base.h)
    attention, projection = FAMILY_MODULES[family]
    if site == "heads":
        where = [getattr(getattr(b, attention), projection) for b in blocks]
    else:
        where = [mlp_of(b) if site == "mlp" else b for b in blocks]
    src, tgt = token_ids(model, SOURCE, TARGET)
    ids, bad = src + tgt, token_ids(model, CORRUPTED, TARGET)[0] + tgt
    i, t, k = len(src) - 1, tgt[0], 0

    def score(x: list[int]) -> float:
        return float(model.hf(input_ids=torch.tensor([x]), use_cache=False).logits[0, i, t])

    heads = model.hf.config.num_attention_heads
    added = family == "bloom" and site == "mlp"  # its output minus the residual
    want = central_patching(where, site, score, ids, bad, i + 1, heads, 1e-2, added)
    want = np.concatenate([want, np.zeros((len(ids) - i - 1, *want.shape[1:]))])
    assert np.abs(want).max() > 0
    # the families' norms and eager softmax run in float32 even in a float64 model, hence the
    # wide step; measured at most 1.6e-4 of the largest value
    assert_close(np.nan_to_num(got.values[k]), want, 1e-3, 1e-3)


def test_a_bloom_whose_stream_carries_the_normed_input_is_refused():
    # apply_residual_connection_post_layernorm: each block adds to its normed input, not to the
    # stream it read, so the stream is no sum of what the blocks wrote
    model = _bloom(apply_residual_connection_post_layernorm=True)
    for method in (ax.direct_logit_attribution, ax.alti, ax.alti_logit):
        with pytest.raises(ax.ModelError, match="normed input"):
            method(model, SOURCE, TARGET)


# --- MLP neurons ---------------------------------------------------------------------------


DENSE_MLPS = ("gpt2", "gpt_neo", "llama", "pythia", "opt-projected", "bloom", "phi3", "gemma2")
DENSE_MLPS += ("gptj", "codegen", "phi", "starcoder2", "gpt_bigcode-mha", "arcee", "glm")
DENSE_MLPS += ("deepseek_v3-dense", *FALCONS)


@pytest.mark.parametrize("arch", DENSE_MLPS)
def test_atp_neurons_add_up_to_the_mlps_output(models64, arch):
    """An MLP's output is its output projection of the neurons (plus a bias, which patching
    moves not at all): each position's neuron estimates add up to the MLP's. The neurons are
    read where the module ends in that projection (OPT's and BLOOM's, which are it)."""
    model = models64[arch]
    kw = {"corrupted": CORRUPTED, "objective": "logit"}
    neurons = ax.attribution_patching(model, SOURCE, TARGET, site="neurons", **kw)
    mlp = ax.attribution_patching(model, SOURCE, TARGET, site="mlp", **kw)
    assert neurons.dims == ("target", "source", "layer", "neuron")
    summed = neurons.sum("neuron", skipna=False)
    assert np.nanmax(np.abs(mlp.values)) > 1e-6
    np.testing.assert_allclose(summed.values, mlp.values, rtol=1e-7, atol=1e-12)
    # one neuron's estimates move on their own: not every neuron carries the same share
    assert np.std(np.nan_to_num(neurons.values), axis=-1).max() > 0


@pytest.mark.usefixtures("modernbert_rotary_in_its_dtype")
@pytest.mark.parametrize("arch", list(ENCODER_MODULES))
def test_atp_encoder_classifier_neurons_add_up_to_the_mlps_output(arch):
    hf, tok = tiny_classifier(arch)
    model = ax.load_model(full_double(hf), tokenizer=tok)
    kw = {"corrupted": "a sad day", "objective": "logit"}
    neurons = ax.attribution_patching(model, "a bad day", 2, site="neurons", **kw)
    mlp = ax.attribution_patching(model, "a bad day", 2, site="mlp", **kw)
    assert np.abs(mlp.values).max() > 1e-8
    rtol = 1e-5 if arch == "modernbert" else 1e-9  # its float32 softmax
    np.testing.assert_allclose(neurons.sum("neuron").values, mlp.values, rtol=rtol, atol=1e-13)


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
@pytest.mark.parametrize("arch", ["marian", "bart", "t5"])
def test_atp_encoder_decoder_neurons_add_up_to_the_mlps_output(encdec64, arch, stack):
    if arch == "t5":
        hf, tok = tiny_model("t5")
        model = ax.load_model(hf.double(), tokenizer=tok)
    else:
        model = encdec64[arch]
    kw = {"corrupted": CORRUPTED, "objective": "logit", "stack": stack}
    neurons = ax.attribution_patching(model, SOURCE, ED_TARGET, site="neurons", **kw)
    mlp = ax.attribution_patching(model, SOURCE, ED_TARGET, site="mlp", **kw)
    assert np.nanmax(np.abs(mlp.values)) > 1e-8
    summed = neurons.sum("neuron", skipna=False)
    np.testing.assert_allclose(summed.values, mlp.values, rtol=1e-9, atol=1e-13)
    with pytest.raises(ax.OptionError, match="the decoder's MLP neurons are stack='decoder'"):
        ax.attribution_patching(
            model, SOURCE, ED_TARGET, corrupted=CORRUPTED, site="neurons", stack="cross"
        )


# --- the gradient methods' layers at the MLPs' neurons -----------------------------------------


def _ig_sites_agree(model: ax.Model, inputs: Any, targets: Any, rtol: float = 1e-7) -> None:
    """Layer IG at the neurons and at the MLP's output walk one path (the output projection is
    affine, its bias in both ends): each position's neuron attributions add up to its MLP's."""
    kw = {"layers": "all", "steps": 4, "objective": "logit"}
    neurons = ax.integrated_gradients(model, inputs, targets, site="neurons", **kw)
    mlp = ax.integrated_gradients(model, inputs, targets, site="mlp", **kw)
    per_position = mlp.sum("hidden", skipna=False).values
    assert np.nanmax(np.abs(per_position)) > 1e-8
    summed = neurons.sum("neuron", skipna=False).values
    np.testing.assert_allclose(summed, per_position, rtol=rtol, atol=1e-12)
    assert np.std(np.nan_to_num(neurons.values), axis=-1).max() > 0


@pytest.mark.parametrize("arch", DENSE_MLPS)
def test_layer_ig_at_neurons_adds_up_to_the_mlps_output(models64, arch):
    _ig_sites_agree(models64[arch], SOURCE, TARGET)


@pytest.mark.usefixtures("modernbert_rotary_in_its_dtype")
@pytest.mark.parametrize("arch", list(ENCODER_MODULES))
def test_encoder_classifier_layer_ig_at_neurons_adds_up_to_the_mlps_output(arch):
    hf, tok = tiny_classifier(arch)
    model = ax.load_model(full_double(hf), tokenizer=tok)
    _ig_sites_agree(model, "a bad day", 2, rtol=1e-5 if arch == "modernbert" else 1e-7)


@pytest.mark.parametrize("arch", ["marian", "bart", "t5"])
def test_encoder_decoder_layer_ig_at_neurons_adds_up_to_the_mlps_output(encdec64, arch):
    if arch == "t5":
        hf, tok = tiny_model("t5")
        model = ax.load_model(hf.double(), tokenizer=tok)
    else:
        model = encdec64[arch]
    _ig_sites_agree(model, SOURCE, ED_TARGET)


def _hooked_effects(hf, modules, ids, bad, reads, pre=False, eps=1e-2):
    """``[position, layer]`` central differences of the logit at ``reads = (row, token)`` with
    each module's activation (its input with ``pre``, else its output, a tuple's first) at each
    position moved ``+-eps`` of the way to its value on ``bad``: real patches, hooked here."""

    def run(ids, at=None, position=None, value=None):
        seen = {}

        def swap(x, n):
            seen[n] = x[0].clone()
            if n != at:
                return None
            x = x.clone()
            x[0, position] = value
            return x

        def post(m, a, o, n):
            x = swap(o[0] if isinstance(o, tuple) else o, n)
            return None if x is None else ((x, *o[1:]) if isinstance(o, tuple) else x)

        def before(m, a, n):
            x = swap(a[0], n)
            return None if x is None else (x, *a[1:])

        handles = [
            m.register_forward_pre_hook(lambda m, a, n=n: before(m, a, n))
            if pre
            else m.register_forward_hook(lambda m, a, o, n=n: post(m, a, o, n))
            for n, m in enumerate(modules)
        ]
        try:
            with torch.no_grad():
                return hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0], seen
        finally:
            for h in handles:
                h.remove()

    clean, corrupt = run(ids)[1], run(bad)[1]
    row, token = reads
    out = np.zeros((row + 1, len(modules)))
    for n in range(len(modules)):
        for p in range(row + 1):
            a, b = clean[n][p], corrupt[n][p]
            up = run(ids, n, p, a + eps * (b - a))[0][row, token]
            down = run(ids, n, p, a - eps * (b - a))[0][row, token]
            out[p, n] = float(up - down) / (2 * eps)
    return out


def test_atp_hybrid_sites_first_order():
    """Qwen 3.5 alternates linear-attention and attention layers, each with an MLP: its MLP,
    neuron and residual sites run in every layer, its heads in its attention layer only; each
    against central differences of real patches (``eps`` 1e-2: its linear attention's delta
    rule runs in float32 whatever the model's dtype)."""
    _, tok = tiny_model("gpt2")
    hf = _family("qwen3_5", tok, attn_implementation="eager").double()
    model = ax.load_model(hf, tokenizer=tok)
    src, tgt = token_ids(model, SOURCE, TARGET)
    ids, bad = src + tgt, token_ids(model, CORRUPTED, TARGET)[0] + tgt
    kw = {"corrupted": CORRUPTED, "objective": "logit"}
    layers = list(hf.model.layers)
    cases = [
        ("mlp", {}, [b.mlp for b in layers], False),
        ("residual", {}, layers, False),
        ("attention", {"layers": [1]}, [layers[1].self_attn.o_proj], True),  # o_proj's input
    ]
    for site, extra, modules, pre in cases:
        got = ax.attribution_patching(model, SOURCE, TARGET, site=site, **kw, **extra)
        want = _hooked_effects(hf, modules, ids, bad, (len(src) - 1, tgt[0]), pre)
        first = got.values[0, : len(src)]
        largest = np.abs(want).max()
        assert largest > 1e-4 and np.abs(first - want).max() < 5e-3 * largest, site
    mlp = ax.attribution_patching(model, SOURCE, TARGET, site="mlp", **kw)
    neurons = ax.attribution_patching(model, SOURCE, TARGET, site="neurons", **kw)
    np.testing.assert_allclose(neurons.sum("neuron", skipna=False), mlp, rtol=1e-7, atol=1e-12)
    heads = ax.attribution_patching(model, SOURCE, TARGET, layers=[1], **kw)
    whole = ax.attribution_patching(model, SOURCE, TARGET, site="attention", layers=[1], **kw)
    np.testing.assert_allclose(heads.sum("head", skipna=False), whole, rtol=1e-7, atol=1e-12)
    with pytest.raises(ax.ModelError, match="layer 0 has no attention heads") as refused:
        ax.attribution_patching(model, SOURCE, TARGET, corrupted=CORRUPTED)
    assert "window" not in str(refused.value)  # attribution patching takes none
    with pytest.raises(ax.ModelError, match="stays within them"):  # activation patching's
        ax.activation_patching(
            model, SOURCE, TARGET, corrupted=CORRUPTED, site="heads", layers=[1], window=3
        )
