"""Value zeroing, ALTI and ALTI-Logit against naive per-layer, per-token references written here
(plain loops over layers, heads and tokens, hooks on the HF model), and their properties."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import transformers as T
from transformers import AutoModelForCausalLM

import attrax as ax
from attrax import _memory, _mixing
from attrax._inputs import prepare, to_tensors
from attrax.cli import main
from attrax.testing import tiny_classifier, tiny_model
from tests import _naive
from tests.test_architectures import CONFIGS, SEQ2SEQ_SIZES, _family, _translator
from tests.test_components import (
    EXPERTS,
    FALCONS,
    LLAMA_KIN,
    NEOX_AND_OPT_KIN,
    _bloom,
    _falcon,
    falcon_values,
    full_double,
    gain,
    gpt_bigcode,
    neighbour,
    output_norms,
    t5_double,
)

PROMPT, TARGET = "The capital of France is", " Paris."
ARCHS = ("gpt2", "gpt_neo", "llama", "bert")

# built by _fused besides Pythia and Phi-3 (test_components' builders, random biases and norm
# weights): GPT-NeoX with a sequential residual, OPT with and without project_in/out
NEIGHBOURS = ("pythia-sequential", "opt", "opt-projected")


@pytest.fixture(scope="module")
def mixing_models() -> dict[str, ax.Model]:
    built = {}
    for arch in ARCHS:
        hf, tok = tiny_classifier(arch) if arch == "bert" else tiny_model(arch)
        built[arch] = ax.load_model(hf.double(), tokenizer=tok)
    return built


def ids_and_queries(model: ax.Model, text: str, target: str | None):
    """The ids a user would build by hand, and the query rows each target is read from."""
    if model.task != "generation":
        ids = model.tokenizer(text).input_ids
        return torch.tensor([ids]), [0]  # BERT pools its first token ([CLS])
    source, target_ids = _naive.token_ids(model, text, target)
    ids = source + target_ids
    return torch.tensor([ids]), list(range(len(source) - 1, len(ids) - 1))


def is_bert(model: ax.Model) -> bool:
    """A post-norm encoder: BERT's layout (BERT, ELECTRA, CamemBERT...) or DistilBERT's."""
    base = model.hf.base_model
    return hasattr(getattr(base, "encoder", None) or getattr(base, "transformer", None), "layer")


def post_norm(block) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """A post-norm encoder block's (attention output projection, the LayerNorm of the residual
    sum, the module whose output is that norm's): BERT's `BertSelfOutput` or DistilBERT's."""
    if hasattr(block, "sa_layer_norm"):  # DistilBERT
        return block.attention.out_lin, block.sa_layer_norm, block.sa_layer_norm
    output = block.attention.output
    return output.dense, output.LayerNorm, output


def blocks(model: ax.Model):
    hf = model.hf
    if is_bert(model):
        base = hf.base_model
        return list((getattr(base, "encoder", None) or base.transformer).layer)
    if hasattr(hf, "gpt_neox"):
        return list(hf.gpt_neox.layers)
    if hasattr(hf.base_model, "decoder"):  # OPT
        return list(hf.base_model.decoder.layers)
    if hasattr(hf, "biogpt"):  # OPT's blocks in BioGPT's body
        return list(hf.biogpt.layers)
    return list(hf.transformer.h) if hasattr(hf, "transformer") else list(hf.model.layers)


def attention_of(block) -> torch.nn.Module:
    """A decoder block's attention module (GPT-2's `attn`, GPT-NeoX's `attention`, Llama's and
    OPT's `self_attn`)."""
    for name in ("attn", "attention", "self_attn", "self_attention"):  # Falcon's last
        if hasattr(block, name):
            return getattr(block, name)
    raise AssertionError(f"no attention in {type(block).__name__}")


def value_parts(model: ax.Model, block, x: torch.Tensor):
    """Per-head value vectors [L, H, hd] of a block's input x (computed by hand, by module)."""
    config = model.hf.config
    heads = config.num_attention_heads
    if is_bert(model):
        v = getattr(block.attention, "self", None) or block.attention
        # DistilBERT's `v_lin`, DeBERTa-v2's `value_proj`
        v = next(getattr(v, n) for n in ("value", "v_lin", "value_proj") if hasattr(v, n))(x)
    elif hasattr(getattr(block, "attn", None), "attention"):  # GPT-Neo: a wrapped attention
        v = block.attn.attention.v_proj(block.ln_1(x))
    elif hasattr(getattr(block, "attn", None), "mp_num"):  # CodeGen: shards of [q, v, k]
        qkv = block.attn.qkv_proj(block.ln_1(x))
        v = qkv.view(*qkv.shape[:-1], block.attn.mp_num, 3, -1)[..., 1, :].flatten(-2)
    elif hasattr(getattr(block, "attn", None), "v_proj"):  # GPT-J
        v = block.attn.v_proj(block.ln_1(x))
    elif type(block).__name__ == "GPTBigCodeBlock":
        qkv = block.attn.c_attn(block.ln_1(x))
        if config.multi_query:  # [queries, one key head, one value head]
            v = qkv[..., config.hidden_size :].chunk(2, -1)[1]
        else:  # each head's query, key and value side by side
            hd = config.hidden_size // heads
            v = qkv.unflatten(-1, (heads, 3 * hd))[..., 2 * hd :].flatten(-2)
    elif type(block).__name__ == "BloomBlock":  # each head's query, key and value side by side
        hd = config.hidden_size // heads
        qkv = block.self_attention.query_key_value(block.input_layernorm(x))
        v = qkv.unflatten(-1, (heads, 3 * hd))[..., 2 * hd :].flatten(-2)
    elif hasattr(block, "self_attention"):  # Falcon: one norm (or ln_attn), a fused projection
        norm = getattr(block, "ln_attn", None) or block.input_layernorm
        fused = block.self_attention.query_key_value(norm(x))
        v = falcon_values(block.self_attention, fused).flatten(-2)
    elif hasattr(block, "attn_norm"):  # ModernBERT: all queries, keys, then values in `Wqkv`
        v = block.attn.Wqkv(block.attn_norm(x))[..., 2 * config.hidden_size :]
    elif hasattr(block, "attn"):
        d = config.n_embd
        v = block.attn.c_attn(block.ln_1(x))[..., 2 * d :]
    elif hasattr(block, "attention") or hasattr(
        getattr(block, "self_attn", None), "query_key_value"
    ):
        # GPT-NeoX, Persimmon: each head's query, key, value side by side
        hd = config.hidden_size // heads
        att = getattr(block, "attention", None) or block.self_attn
        qkv = att.query_key_value(block.input_layernorm(x))
        v = qkv.unflatten(-1, (heads, 3 * hd))[..., 2 * hd :].flatten(-2)
    elif hasattr(block, "self_attn_layer_norm"):  # OPT
        v = block.self_attn.v_proj(block.self_attn_layer_norm(x))
    elif hasattr(block.self_attn, "kv_b_proj"):  # DeepSeek: per head a key part, then a value
        att = block.self_attn
        latent = att.kv_a_proj_with_mqa(block.input_layernorm(x))[..., : config.kv_lora_rank]
        keys_values = att.kv_b_proj(att.kv_a_layernorm(latent)).unflatten(-1, (heads, -1))
        v = keys_values[..., config.qk_nope_head_dim :].flatten(-2)
    elif hasattr(block.self_attn, "qkv_proj"):  # Phi-3: queries, keys, then values
        kv, hd = config.num_key_value_heads, config.hidden_size // heads
        v = block.self_attn.qkv_proj(block.input_layernorm(x))[..., (heads + kv) * hd :]
    else:  # OLMo 2 normalises no block input
        norm = getattr(block, "input_layernorm", torch.nn.Identity())
        v = block.self_attn.v_proj(norm(x))
    # key/value heads (grouped, multi-query); DeepSeek's value heads are narrower than the rest
    kv = v.shape[-1] // (getattr(config, "v_head_dim", None) or config.hidden_size // heads)
    v = v[0].view(x.shape[1], kv, -1)
    return torch.stack([v[:, h // (heads // kv)] for h in range(heads)], dim=1)


def project(model: ax.Model, block, z: torch.Tensor) -> torch.Tensor:
    """The attention output projection of a concatenated-heads vector, without its bias."""
    dense = output_projection(model, block)
    bias = dense.bias if dense.bias is not None else 0
    return dense(z) - bias


def after_attention(block, output: torch.Tensor, i: int) -> torch.Tensor | float:
    """Gemma 2's, 3's and OLMo 2's norm on the attention's output ``[1, L, d]``, as the factor it
    applies at query ``i`` (``gain / rms``); Granite's ``residual_multiplier``; 1 for the blocks
    that add the output as it is."""
    norms = output_norms(block)
    if norms is None:
        return getattr(block, "residual_multiplier", 1.0)
    norm = norms[0]
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    return gain(norm) / torch.sqrt(output[0, i].pow(2).mean() + eps)


def output_projection(model: ax.Model, block) -> torch.nn.Module:
    if is_bert(model):
        return post_norm(block)[0]
    attention = attention_of(block)
    attention = getattr(attention, "attention", attention)  # GPT-Neo's wrapped attention
    for name in ("c_proj", "dense", "out_proj", "o_proj", "Wo"):  # GPT-2, NeoX, OPT, Llama...
        if hasattr(attention, name):
            return getattr(attention, name)
    raise AssertionError(f"no output projection in {type(attention).__name__}")


def naive_alti_layers(model: ax.Model, ids: torch.Tensor):
    """Per layer: the contributions C [L, L] from plain loops, checking on the way that the
    decomposition adds up to the model's own attention block output."""
    hf = model.hf
    captured = []

    def grab(_m, _a, out):
        captured.append(out[0] if isinstance(out, tuple) else out)

    if is_bert(model):
        modules = [post_norm(b)[2] for b in blocks(model)]  # LN(x + attn)
    else:
        modules = [attention_of(b) for b in blocks(model)]
    handles = [m.register_forward_hook(grab) for m in modules]
    # the model's own eager forward (attrax runs DeBERTa's attention itself: not here)
    with torch.no_grad():
        out = hf(input_ids=ids, output_attentions=True, output_hidden_states=True)
    for h in handles:
        h.remove()
    per_layer = []
    length = ids.shape[1]
    for layer, block in enumerate(blocks(model)):
        x = out.hidden_states[layer]
        attn = out.attentions[layer][0]
        heads, width = attn.shape[0], x.shape[-1]
        with torch.no_grad():
            v = value_parts(model, block, x)
            hd = v.shape[-1]
            T = torch.zeros(length, length, width, dtype=x.dtype)
            for i in range(length):
                for j in range(length):
                    z = torch.zeros(heads * hd, dtype=x.dtype)
                    for h in range(heads):
                        z[h * hd : (h + 1) * hd] = attn[h, i, j] * v[j, h]
                    T[i, j] = project(model, block, z) * after_attention(block, captured[layer], i)
                    if i == j:
                        T[i, j] += x[0, j]
            if is_bert(model):
                dense, ln, _ = post_norm(block)
                pre = T.sum(1) + dense.bias
                sigma = torch.sqrt(pre.var(-1, unbiased=False) + ln.eps)
                for i in range(length):
                    for j in range(length):
                        T[i, j] = ln.weight * (T[i, j] - T[i, j].mean()) / sigma[i]
                y = captured[layer][0]
                bias = ln.weight * (dense.bias - dense.bias.mean()) / sigma[:, None] + ln.bias
                torch.testing.assert_close(T.sum(1) + bias, y, rtol=1e-9, atol=1e-9)
            else:
                proj = output_projection(model, block)
                branch = getattr(block, "residual_multiplier", 1.0)  # Granite
                bias = branch * proj.bias if proj.bias is not None else 0
                output = captured[layer][0]
                if output_norms(block) is not None:  # Gemma, OLMo 2, GLM-4: the norm's
                    output = output_norms(block)[0](output)
                y = x[0] + branch * output
                if type(block).__name__ == "BloomBlock":  # its attention adds the residual
                    y = output
                torch.testing.assert_close(T.sum(1) + bias, y, rtol=1e-9, atol=1e-9)
            C = torch.zeros(length, length, dtype=x.dtype)
            for i in range(length):
                for j in range(length):
                    C[i, j] = max(0.0, float(y[i].abs().sum() - (y[i] - T[i, j]).abs().sum()))
                C[i] = C[i] / C[i].sum()
        per_layer.append(C)
    return per_layer


ALTI_ARCHS = (*ARCHS, "phi3", "pythia", "qwen3", "smollm3", "gemma", "gemma2", "gemma3", "olmo2")
ALTI_ARCHS += ("olmo3", "glm4", "exaone4", "vaultgemma")  # local layers; output norms
# GPT-J, CodeGen, Phi and Cohere: attention and MLP in parallel on one norm (CodeGen's values in
# shards of a fused projection, Cohere's LayerNorm without a bias, its logits scaled); StarCoder2
# and OLMo: Llama's layout with LayerNorms (OLMo's without weights)
MORE_PRE_NORM = ("gptj", "codegen", "phi", "cohere", "starcoder2", "olmo", "gpt_bigcode")
MORE_PRE_NORM += ("stablelm", "stablelm-parallel")  # LayerNorms; parallel, per-head q/k norms
MORE_PRE_NORM += ("cohere2",)  # Cohere's, with local layers
# Falcon's layouts (test_components.FALCONS)
FALCON_LAYOUTS = ("falcon", "falcon-heads", "falcon-40b")


# BERT's layout in classes of their own (ELECTRA's embeddings projected to its width; DeBERTa-v2's
# disentangled attention: relative positions in its weights), and DistilBERT's blocks (`out_lin`,
# then `sa_layer_norm` of the residual sum)
BERT_LIKE = ("electra", "camembert", "distilbert", "deberta-v2")


def _encoder(arch: str) -> ax.Model:
    """A float64 tiny sequence classifier of ``arch`` (ModernBERT: pre-norm, `Wqkv`, `Wo`, local
    and global layers)."""
    hf, tok = tiny_classifier(arch)
    return ax.load_model(hf.double(), tokenizer=tok)


@pytest.mark.parametrize(
    "arch",
    [
        *ALTI_ARCHS,
        "granite",
        *LLAMA_KIN,
        *NEOX_AND_OPT_KIN,
        *EXPERTS,
        *BERT_LIKE,
        "modernbert",
        *NEIGHBOURS,
        *MORE_PRE_NORM,
        *FALCON_LAYOUTS,
        "bloom",  # its attention adds the residual; ALiBi
    ],
)
def test_alti_matches_naive_per_layer_and_rollout(mixing_models, arch):
    if arch == "bloom":
        model = _bloom()
    elif arch in FALCON_LAYOUTS:
        model = _falcon(arch)
    elif arch in (*BERT_LIKE, "modernbert"):
        model = _encoder(arch)
    else:
        model = mixing_models[arch] if arch in ARCHS else _fused(arch)
    target = None if model.task != "generation" else TARGET
    ids, queries = ids_and_queries(model, PROMPT, target)
    layers = naive_alti_layers(model, ids)
    got = ax.alti(model, PROMPT, target, aggregate=False)
    assert got.dims == ("target", "source", "layer")
    width = ids.shape[1]
    for k, q in enumerate(queries):
        for layer, C in enumerate(layers):
            row = got.values[k, :, layer]
            seen = q + 1 if model.causal else width
            np.testing.assert_allclose(row[:seen], C[q, :seen].numpy(), atol=1e-9)
    rolled = layers[0]
    for C in layers[1:]:
        rolled = C @ rolled
    agg = ax.alti(model, PROMPT, target)
    assert agg.dims == ("target", "source")
    for k, q in enumerate(queries):
        seen = q + 1 if model.causal else width
        np.testing.assert_allclose(agg.values[k, :seen], rolled[q, :seen].numpy(), atol=1e-9)


def naive_block_scores(T: torch.Tensor, bias: torch.Tensor, ln, actual: torch.Tensor, mask=None):
    """ALTI scores [q, n] of vectors T [q, n, d] whose sum plus ``bias`` is the block output
    before its LayerNorm ``ln``; checks the decomposition against the model's ``actual`` output."""
    pre = T.sum(1) + bias
    sigma = torch.sqrt(pre.var(-1, unbiased=False) + ln.eps)
    out = torch.zeros_like(T)
    for i in range(T.shape[0]):
        for j in range(T.shape[1]):
            out[i, j] = ln.weight * (T[i, j] - T[i, j].mean()) / sigma[i]
    rest = ln.weight * (bias - bias.mean()) / sigma[:, None] + ln.bias
    torch.testing.assert_close(out.sum(1) + rest, actual, rtol=1e-9, atol=1e-9)
    C = torch.zeros(T.shape[:2], dtype=T.dtype)
    for i in range(T.shape[0]):
        for j in range(T.shape[1]):
            C[i, j] = max(0.0, float(actual[i].abs().sum() - (actual[i] - out[i, j]).abs().sum()))
        C[i] = C[i] / C[i].sum()
    return C


def naive_attention_vectors(attention, attn, keys_in, residual=None):
    """T [q, n, d]: sum_h A^h_ij W_O^h v^h_j by loops (v from the module's own projection), plus
    the residual on the diagonal when given."""
    heads = attn.shape[0]
    v = attention.v_proj(keys_in)
    hd = v.shape[-1] // heads
    q, n = attn.shape[1], attn.shape[2]
    T = torch.zeros(q, n, v.shape[-1], dtype=v.dtype)
    for i in range(q):
        for j in range(n):
            z = torch.zeros(v.shape[-1], dtype=v.dtype)
            for h in range(heads):
                z[h * hd : (h + 1) * hd] = attn[h, i, j] * v[j, h * hd : (h + 1) * hd]
            T[i, j] = attention.out_proj(z) - attention.out_proj.bias
            if residual is not None and i == j:
                T[i, j] += residual[j]
    return T


@pytest.mark.parametrize("arch", ["marian", "bart"])
def test_alti_plus_matches_naive(arch):
    hf, tok = tiny_model(arch)
    model = ax.load_model(hf.double(), tokenizer=tok)
    source, target = "the capital of france", "paris is"
    source_ids, target_ids = _naive.token_ids(model, source, target)
    ids = torch.tensor([source_ids])
    decoder_ids = torch.tensor([[hf.config.decoder_start_token_id, *target_ids]])
    captured = {}

    def keep(name):
        def hook(_m, args, kwargs, output=None):
            captured[name] = output if output is not None else (args[0] if args else kwargs)

        return hook

    handles = []
    layers = hf.model.decoder.layers
    for i, layer in enumerate(layers):
        handles.append(
            layer.encoder_attn.register_forward_pre_hook(
                lambda _m, a, k, i=i: captured.__setitem__(
                    ("cross_in", i), a[0] if a else k["hidden_states"]
                ),
                with_kwargs=True,
            )
        )
        for name in ("self_attn_layer_norm", "encoder_attn_layer_norm"):
            handles.append(
                getattr(layer, name).register_forward_hook(
                    lambda _m, _a, o, key=(name, i): captured.__setitem__(key, o)
                )
            )
    for i, layer in enumerate(hf.model.encoder.layers):
        handles.append(
            layer.self_attn_layer_norm.register_forward_hook(
                lambda _m, _a, o, i=i: captured.__setitem__(("encoder", i), o)
            )
        )
    with torch.no_grad(), model.attention_as("eager"):
        out = hf(
            input_ids=ids,
            decoder_input_ids=decoder_ids,
            output_attentions=True,
            output_hidden_states=True,
        )
        for h in handles:
            h.remove()
        S, T_len = ids.shape[1], decoder_ids.shape[1]
        R_enc = torch.eye(S, dtype=torch.float64)
        for i, layer in enumerate(hf.model.encoder.layers):
            x = out.encoder_hidden_states[i][0]
            vec = naive_attention_vectors(layer.self_attn, out.encoder_attentions[i][0], x, x)
            C = naive_block_scores(
                vec,
                layer.self_attn.out_proj.bias,
                layer.self_attn_layer_norm,
                captured["encoder", i][0],
            )
            R_enc = C @ R_enc
        encoded = out.encoder_last_hidden_state[0]
        R = torch.cat(
            [torch.zeros(T_len, S, dtype=torch.float64), torch.eye(T_len, dtype=torch.float64)], 1
        )
        for i, layer in enumerate(layers):
            x = out.decoder_hidden_states[i][0]
            vec = naive_attention_vectors(layer.self_attn, out.decoder_attentions[i][0], x, x)
            C = naive_block_scores(
                vec,
                layer.self_attn.out_proj.bias,
                layer.self_attn_layer_norm,
                captured["self_attn_layer_norm", i][0],
            )
            R = C @ R
            y = captured["cross_in", i][0]
            cross = naive_attention_vectors(layer.encoder_attn, out.cross_attentions[i][0], encoded)
            vec = torch.cat([cross, y[:, None, :]], dim=1)
            c = naive_block_scores(
                vec,
                layer.encoder_attn.out_proj.bias,
                layer.encoder_attn_layer_norm,
                captured["encoder_attn_layer_norm", i][0],
            )
            new = c[:, -1:] * R
            new[:, :S] += c[:, :-1] @ R_enc
            R = new
    check_alti_plus(model, source, target, R, S)


def check_alti_plus(model: ax.Model, source: str, target: str, R: torch.Tensor, S: int) -> None:
    """ALTI+ equals the loops' rollout ``R [T, S + T]`` (encoder tokens, then decoder ones), on
    both sides and on the source side alone; each row sums to 1."""
    got = ax.alti(model, source, target, attribute_target=True)
    queries = list(range(got.sizes["target"]))
    np.testing.assert_allclose(got.sel(side="source").values, R[queries, :S].numpy(), atol=1e-9)
    want = R[queries, S:].numpy()
    mine = got.sel(side="target").values
    seen = ~np.isnan(mine)
    np.testing.assert_allclose(mine[seen], want[seen], atol=1e-9)
    assert np.abs(want[~seen]).max() < 1e-12  # NaN only where nothing flows (the future)
    np.testing.assert_allclose(np.nansum(got.values, -1), 1.0)
    source_only = ax.alti(model, source, target)
    np.testing.assert_allclose(source_only.values, R[queries, :S].numpy(), atol=1e-9)


def naive_plain_scores(T: torch.Tensor, bias: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """ALTI scores [q, n] of vectors T [q, n, d] whose sum plus ``bias`` is a pre-norm block's
    output (no norm after it); checks the decomposition against the model's ``actual`` one."""
    torch.testing.assert_close(T.sum(1) + bias, actual, rtol=1e-9, atol=1e-9)
    C = torch.zeros(T.shape[:2], dtype=T.dtype)
    for i in range(T.shape[0]):
        for j in range(T.shape[1]):
            C[i, j] = max(0.0, float(actual[i].abs().sum() - (actual[i] - T[i, j]).abs().sum()))
        C[i] = C[i] / C[i].sum()
    return C


@pytest.mark.parametrize("arch", ["m2m100", "mbart", "pegasus"])
def test_alti_plus_of_pre_norm_translators_matches_naive(arch):
    """NLLB's M2M100, mBART and Pegasus norm each attention's input: the values read
    ``LN(x)``, the block adds its output to ``x`` itself (the cross-attention's ``x`` is what
    reaches its norm), and the encoder's final norm is inside the cross-attention's values."""
    model = _translator(arch)
    hf = model.hf.double()
    source, target = "the capital of france", "paris is"
    source_ids, target_ids = _naive.token_ids(model, source, target)
    ids = torch.tensor([source_ids])
    decoder_ids = torch.tensor([[model.decoder_start_token_id, *target_ids]])
    captured = {}
    handles = []
    stacks = {"encoder": hf.model.encoder.layers, "decoder": hf.model.decoder.layers}
    for stack, layers in stacks.items():
        for i, layer in enumerate(layers):
            handles.append(
                layer.self_attn.register_forward_hook(
                    lambda _m, _a, o, key=(stack, i): captured.__setitem__(key, o[0][0])
                )
            )
            if stack == "decoder":
                handles.append(
                    layer.encoder_attn_layer_norm.register_forward_pre_hook(
                        lambda _m, a, i=i: captured.__setitem__(("cross_in", i), a[0][0])
                    )
                )
                handles.append(
                    layer.encoder_attn.register_forward_hook(
                        lambda _m, _a, o, i=i: captured.__setitem__(("cross", i), o[0][0])
                    )
                )
    with torch.no_grad(), model.attention_as("eager"):
        out = hf(
            input_ids=ids,
            decoder_input_ids=decoder_ids,
            output_attentions=True,
            output_hidden_states=True,
        )
        for h in handles:
            h.remove()
        S, T_len = ids.shape[1], decoder_ids.shape[1]
        R_enc = torch.eye(S, dtype=torch.float64)
        for i, layer in enumerate(stacks["encoder"]):
            x = out.encoder_hidden_states[i][0]
            normed = layer.self_attn_layer_norm(x)
            vec = naive_attention_vectors(layer.self_attn, out.encoder_attentions[i][0], normed, x)
            bias = layer.self_attn.out_proj.bias
            R_enc = naive_plain_scores(vec, bias, x + captured["encoder", i]) @ R_enc
        encoded = out.encoder_last_hidden_state[0]  # after the encoder's final norm
        R = torch.cat(
            [torch.zeros(T_len, S, dtype=torch.float64), torch.eye(T_len, dtype=torch.float64)], 1
        )
        for i, layer in enumerate(stacks["decoder"]):
            x = out.decoder_hidden_states[i][0]
            normed = layer.self_attn_layer_norm(x)
            vec = naive_attention_vectors(layer.self_attn, out.decoder_attentions[i][0], normed, x)
            bias = layer.self_attn.out_proj.bias
            R = naive_plain_scores(vec, bias, x + captured["decoder", i]) @ R
            y = captured["cross_in", i]
            cross = naive_attention_vectors(layer.encoder_attn, out.cross_attentions[i][0], encoded)
            vec = torch.cat([cross, y[:, None, :]], dim=1)
            c = naive_plain_scores(vec, layer.encoder_attn.out_proj.bias, y + captured["cross", i])
            new = c[:, -1:] * R
            new[:, :S] += c[:, :-1] @ R_enc
            R = new
    check_alti_plus(model, source, target, R, S)


def naive_t5_vectors(attention, attn, keys_in, residual=None):
    """T [q, n, d] of a T5 attention (``v``, ``o``, no biases) by loops, as
    :func:`naive_attention_vectors`."""
    heads = attn.shape[0]
    v = attention.v(keys_in)
    hd = v.shape[-1] // heads
    T = torch.zeros(attn.shape[1], attn.shape[2], attention.o.out_features, dtype=v.dtype)
    for i in range(attn.shape[1]):
        for j in range(attn.shape[2]):
            z = torch.zeros(v.shape[-1], dtype=v.dtype)
            for h in range(heads):
                z[h * hd : (h + 1) * hd] = attn[h, i, j] * v[j, h * hd : (h + 1) * hd]
            T[i, j] = attention.o(z)
            if residual is not None and i == j:
                T[i, j] += residual[j]
    return T


@pytest.mark.parametrize("arch", ["t5", "mt5"])
def test_alti_plus_of_t5_matches_naive(arch):
    """T5 and mT5: each attention in a sub-layer that norms its input (RMSNorm) and adds the
    attention's output to it; relative position biases inside the weights; no biases."""
    model = t5_double(arch)
    hf = model.hf
    source, target = "the capital of france", "paris is"
    source_ids, target_ids = _naive.token_ids(model, source, target)
    ids = torch.tensor([source_ids])
    decoder_ids = torch.tensor([[model.decoder_start_token_id, *target_ids]])
    captured, handles = {}, []
    stacks = {"encoder": hf.encoder.block, "decoder": hf.decoder.block}
    for stack, blocks in stacks.items():
        for i, block in enumerate(blocks):
            for k, sub in enumerate(block.layer[:-1]):  # self-, then (decoder) cross-attention
                handles.append(
                    sub.register_forward_pre_hook(
                        lambda _m, a, kw, key=(stack, i, k): captured.__setitem__(
                            (*key, "in"), (a[0] if a else kw["hidden_states"])[0]
                        ),
                        with_kwargs=True,
                    )
                )
                handles.append(
                    sub.register_forward_hook(
                        lambda _m, _a, o, key=(stack, i, k): captured.__setitem__(
                            (*key, "out"), o[0][0]
                        )
                    )
                )
    with torch.no_grad(), model.attention_as("eager"):
        out = hf(input_ids=ids, decoder_input_ids=decoder_ids, output_attentions=True)
        for h in handles:
            h.remove()
        S, T_len = ids.shape[1], decoder_ids.shape[1]
        R_enc = torch.eye(S, dtype=torch.float64)
        for i, block in enumerate(stacks["encoder"]):
            sub = block.layer[0]
            x = captured["encoder", i, 0, "in"]
            attn = out.encoder_attentions[i][0]
            vec = naive_t5_vectors(sub.SelfAttention, attn, sub.layer_norm(x), x)
            R_enc = naive_plain_scores(vec, 0.0, captured["encoder", i, 0, "out"]) @ R_enc
        encoded = out.encoder_last_hidden_state[0]  # after the encoder's final RMSNorm
        R = torch.cat(
            [torch.zeros(T_len, S, dtype=torch.float64), torch.eye(T_len, dtype=torch.float64)], 1
        )
        for i, block in enumerate(stacks["decoder"]):
            own, cross = block.layer[0], block.layer[1]
            x = captured["decoder", i, 0, "in"]
            attn = out.decoder_attentions[i][0]
            vec = naive_t5_vectors(own.SelfAttention, attn, own.layer_norm(x), x)
            R = naive_plain_scores(vec, 0.0, captured["decoder", i, 0, "out"]) @ R
            y = captured["decoder", i, 1, "in"]
            vec = naive_t5_vectors(cross.EncDecAttention, out.cross_attentions[i][0], encoded)
            vec = torch.cat([vec, y[:, None, :]], dim=1)
            c = naive_plain_scores(vec, 0.0, captured["decoder", i, 1, "out"])
            new = c[:, -1:] * R
            new[:, :S] += c[:, :-1] @ R_enc
            R = new
    check_alti_plus(model, source, target, R, S)


@pytest.mark.parametrize("arch", ARCHS)
def test_alti_rows_are_distributions_and_never_from_the_future(mixing_models, arch):
    model = mixing_models[arch]
    target = None if arch == "bert" else TARGET
    t = to_tensors(
        prepare(model, [PROMPT, "The capital"], None if target is None else [target, " of"]), model
    )
    seen = []

    def on_layer(index, weights, u, x, parts, _stack):
        seen.append(_mixing._contributions(weights, u, x, parts, t.mask, 1 << 30))

    _mixing._Decomposition(model, t, on_layer).run()
    assert len(seen) == model.hf.config.num_hidden_layers
    for C in seen:
        assert (C >= 0).all()
        torch.testing.assert_close(C.sum(-1), torch.ones_like(C.sum(-1)))
        if model.causal:
            assert (torch.triu(C, diagonal=1) == 0).all(), "no contribution from the future"


def naive_value_zeroing(
    model: ax.Model, ids: torch.Tensor, similarity: str = "cosine", heads=None, n_heads=1
):
    """distances[layer, query, zeroed token]: one forward per (layer, token), zeroing the value
    vectors of one token in one layer only, comparing that layer's output as the model reports
    it in hidden_states (no patching: the layers below run clean anyway)."""
    hf = model.hf
    base = hf.base_model
    with torch.no_grad():
        clean = base(input_ids=ids, output_hidden_states=True).hidden_states
    n_layers, length = len(blocks(model)), ids.shape[1]
    out = torch.zeros(n_layers, length, length, dtype=torch.float64)
    for layer, block in enumerate(blocks(model)):
        if is_bert(model):
            attention = block.attention.self
            module, lo = getattr(attention, "value", None) or attention.value_proj, 0
        elif hasattr(getattr(block, "attn", None), "attention"):  # GPT-Neo
            module, lo = block.attn.attention.v_proj, 0
        elif hasattr(getattr(block, "attn", None), "v_proj"):  # GPT-J
            module, lo = block.attn.v_proj, 0
        elif type(block).__name__ == "GPTBigCodeBlock":  # values after queries and keys
            assert hf.config.multi_query, "per-head layouts: naive_fused_zeroing"
            module = block.attn.c_attn
            lo = hf.config.n_embd + (module.out_features - hf.config.n_embd) // 2
        elif hasattr(block, "attn"):
            module, lo = block.attn.c_attn, 2 * hf.config.n_embd
        else:
            module, lo = block.self_attn.v_proj, 0
        for j in range(length):

            def zero(_m, _a, output, j=j, lo=lo):
                output = output.clone()
                if heads is None:
                    output[:, j, lo:] = 0
                    return output
                hd = (output.shape[-1] - lo) // n_heads
                for h in heads:
                    output[:, j, lo + h * hd : lo + (h + 1) * hd] = 0
                return output

            handle = module.register_forward_hook(zero)
            with torch.no_grad():
                states = base(input_ids=ids, output_hidden_states=True).hidden_states
            handle.remove()
            a, b = states[layer + 1][0], clean[layer + 1][0]
            for i in range(length):
                if similarity == "cosine":
                    out[layer, i, j] = 1 - torch.nn.functional.cosine_similarity(a[i], b[i], dim=0)
                else:
                    out[layer, i, j] = (a[i] - b[i]).norm()
    return out


# CodeGen's sharded values: test_value_zeroing_of_fused_projections_matches_naive
@pytest.mark.parametrize(
    "arch", [*ARCHS, "deberta-v2", *(a for a in MORE_PRE_NORM if a != "codegen")]
)
@pytest.mark.parametrize("similarity", ["cosine", "euclidean"])
def test_value_zeroing_matches_naive(mixing_models, arch, similarity):
    if arch in MORE_PRE_NORM:
        model = _fused(arch)
    else:
        model = mixing_models[arch] if arch in ARCHS else _encoder(arch)
    target = None if model.task != "generation" else TARGET
    ids, queries = ids_and_queries(model, PROMPT, target)
    raw = naive_value_zeroing(model, ids, similarity)
    got = ax.value_zeroing(model, PROMPT, target, similarity=similarity, normalize=False)
    norm = ax.value_zeroing(model, PROMPT, target, similarity=similarity)
    assert got.dims == ("target", "source", "layer")
    width = ids.shape[1]
    # GPT-Neo takes its attention scores in float32 even in a float64 model: float32 rounding,
    # which differs between the batched forwards and the reference's by the CPU's kernels
    atol = 1e-6 if arch == "gpt_neo" else 1e-9
    for k, q in enumerate(queries):
        seen = q + 1 if model.causal else width
        want = raw[:, q, :seen].T.numpy()  # [source, layer]
        want = np.where(want < 1e-5, 0.0, want)  # Inseq's threshold
        np.testing.assert_allclose(got.values[k, :seen], want, atol=atol)
        np.testing.assert_allclose(norm.values[k, :seen], want / want.sum(0), atol=atol)
        assert np.isnan(got.values[k, seen:]).all()


def _fused(family: str) -> ax.Model:
    """A tiny random Pythia (GPT-NeoX: each head's query, key and value side by side in one
    projection), Phi-3 (all queries, then keys, then values), another family of
    ``test_architectures`` or one of :data:`NEIGHBOURS` in float64, GPT-2's tokenizer."""
    _, tok = tiny_model("gpt2")
    if family in NEIGHBOURS:
        return ax.load_model(neighbour(family, tok).double(), tokenizer=tok)
    # transformers' grouped matmul of experts takes no float64: a loop over them does
    kw = {"experts_implementation": "eager"} if family in EXPERTS else {}
    hf = _family(family, tok, attn_implementation="eager", **kw)
    sandwiched = ("gemma", "gemma2", "vaultgemma", "gemma3", "olmo2", "olmo3", "glm4", "exaone4")
    if family in (*sandwiched, "granite", "granitemoe"):
        with torch.no_grad():  # random gains; Gemma's norms scale by 1 + weight, initialised at 0
            for module in hf.modules():
                if type(module).__name__.endswith("RMSNorm"):
                    module.weight.normal_(0.0 if family.startswith("gemma") else 1.0, 0.3)
                elif family.startswith("granite") and isinstance(module, torch.nn.Linear):
                    module.weight.mul_(4.0)  # terms far from 0 despite its multipliers
        return ax.load_model(full_double(hf).eval(), tokenizer=tok)  # its norms in float64
    return ax.load_model(hf.double().eval(), tokenizer=tok)


# where each family's block keeps its fused query/key/value projection (Phi-3's: self_attn.qkv_proj)
_FUSED = {
    "gpt_neox": "attention.query_key_value",
    "persimmon": "self_attn.query_key_value",
    "bloom": "self_attention.query_key_value",
    "falcon": "self_attention.query_key_value",
    "modernbert": "attn.Wqkv",
    "gpt_bigcode": "attn.c_attn",
    "codegen": "attn.qkv_proj",
    "deepseek_v2": "self_attn.kv_b_proj",  # the keys and values its latent expands into
    "deepseek_v3": "self_attn.kv_b_proj",
    "deepseek_v32": "self_attn.kv_b_proj",  # its indexer picks each query's keys
    "glm4_moe_lite": "self_attn.kv_b_proj",
    "youtu": "self_attn.kv_b_proj",
    "glm_moe_dsa": "self_attn.kv_b_proj",  # a layer reusing the previous one's picks
}


def naive_fused_zeroing(model: ax.Model, ids: torch.Tensor, heads=None) -> torch.Tensor:
    """distances[layer, query, zeroed token] (cosine), one forward per (layer, token), zeroing
    token j's values where each family's fused projection keeps them."""
    hf, config = model.hf, model.hf.config
    n, d = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    layers = getattr(hf.base_model, "layers", None) or hf.base_model.h  # GPT-BigCode's `h`
    with torch.no_grad():
        clean = hf.base_model(input_ids=ids, output_hidden_states=True).hidden_states
    length = ids.shape[1]
    out = torch.zeros(len(layers), length, length, dtype=torch.float64)
    for layer, block in enumerate(layers):
        module = block.get_submodule(_FUSED.get(config.model_type, "self_attn.qkv_proj"))
        for j in range(length):

            def zero(_m, _a, output, j=j, block=block):
                output = output.clone()
                chosen = range(n) if heads is None else heads
                per_head = config.model_type in ("gpt_neox", "bloom", "persimmon") or (
                    config.model_type == "gpt_bigcode" and not config.multi_query
                )
                if per_head:  # [heads, (q, k, v), d] a token
                    view = output.view(*output.shape[:2], n, 3, d)
                    for h in chosen:
                        view[:, j, h, 2] = 0
                elif config.model_type == "codegen":  # 4 shards of [queries, values, keys]
                    local = n * d // 4
                    for h in range(n) if heads is None else heads:
                        for f in range(h * d, (h + 1) * d):  # head h's values, flattened
                            shard, offset = divmod(f, local)
                            output[:, j, shard * 3 * local + local + offset] = 0
                elif hasattr(config, "kv_lora_rank"):  # [B, 1, L, heads (key part, value)]
                    view = output.view(*output.shape[:3], n, -1)
                    for h in chosen:
                        view[:, 0, j, h, config.qk_nope_head_dim :] = 0
                elif config.model_type == "falcon":
                    values = falcon_values(block.self_attention, output)
                    for h in range(values.shape[-2]) if heads is None else heads:
                        values[:, j, h] = 0
                else:  # [q (n d), k (kv d), v (kv d)]; GPT-BigCode's multi-query: kv = 1
                    kv = 1 if getattr(config, "multi_query", False) else n
                    kv = getattr(config, "num_key_value_heads", kv)
                    for h in chosen:
                        start = (n + kv) * d + h * d
                        output[:, j, start : start + d] = 0
                return output

            handle = module.register_forward_hook(zero)
            with torch.no_grad():
                states = hf.base_model(input_ids=ids, output_hidden_states=True).hidden_states
            handle.remove()
            a, b = states[layer + 1][0], clean[layer + 1][0]
            for i in range(length):
                out[layer, i, j] = 1 - torch.nn.functional.cosine_similarity(a[i], b[i], dim=0)
    return out


@pytest.mark.parametrize("multi_query", [True, False])
def test_value_zeroing_of_gpt_bigcodes_values_matches_naive(multi_query):
    """GPT-BigCode's `c_attn`: multi-query, every query head then one key head and one value
    head (read where GPT-2 keeps its values, past the output: all 0); without, each head's
    query, key and value side by side (read as GPT-2's: the wrong features)."""
    _, tok = tiny_model("gpt2")
    model = ax.load_model(gpt_bigcode(tok, multi_query, random=False).double(), tokenizer=tok)
    ids, queries = ids_and_queries(model, PROMPT, TARGET)
    got = ax.value_zeroing(model, PROMPT, TARGET, normalize=False)
    raw = naive_fused_zeroing(model, ids)
    for k, q in enumerate(queries):
        want = raw[:, q, : q + 1].T.numpy()  # [source, layer]
        want = np.where(want < 1e-5, 0.0, want)  # Inseq's threshold
        assert want.max() > 1e-3
        np.testing.assert_allclose(got.values[k, : q + 1], want, atol=1e-9)


@pytest.mark.parametrize(
    "family",
    [
        *("pythia", "phi3", "modernbert", "falcon-heads", "falcon-40b", "bloom", "codegen"),
        *("persimmon", "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "youtu"),
        "glm_moe_dsa",
    ],
)
def test_value_zeroing_of_fused_projections_matches_naive(family):
    if family == "bloom":
        model = _bloom()
    elif family in FALCONS:
        model = _falcon(family)
    else:
        model = _encoder(family) if family == "modernbert" else _fused(family)
    target = TARGET if model.task == "generation" else None
    ids, queries = ids_and_queries(model, PROMPT, target)
    got = ax.value_zeroing(model, PROMPT, target, normalize=False)
    one_head = ax.value_zeroing(model, PROMPT, target, normalize=False, heads=[1])
    for result, raw in ((got, naive_fused_zeroing(model, ids)), (one_head, None)):
        raw = naive_fused_zeroing(model, ids, heads=[1]) if raw is None else raw
        for k, q in enumerate(queries):
            want = raw[:, q, : q + 1].T.numpy()  # [source, layer]
            want = np.where(want < 1e-5, 0.0, want)  # Inseq's threshold
            np.testing.assert_allclose(result.values[k, : q + 1], want, atol=1e-9)
            if model.causal:
                assert np.isnan(result.values[k, q + 1 :]).all()
    assert not np.allclose(got.values, one_head.values, equal_nan=True)


def naive_seq2seq_zeroing(model: ax.Model, source_ids, target_ids, which: str):
    """distances[layer, query, zeroed token] of an encoder-decoder, one forward per (layer,
    token): ``which`` is "encoder" (encoder self-attention, encoder states), "cross" (the
    cross-attention's values of encoder tokens, decoder states) or "decoder" (decoder
    self-attention, decoder states)."""
    hf = model.hf
    ids = torch.tensor([source_ids])
    decoder_ids = torch.tensor([[hf.config.decoder_start_token_id, *target_ids]])

    def states(out):
        return out.encoder_hidden_states if which == "encoder" else out.decoder_hidden_states

    def forward():
        with torch.no_grad():
            return hf(input_ids=ids, decoder_input_ids=decoder_ids, output_hidden_states=True)

    clean = states(forward())
    if hasattr(hf.config, "num_decoder_layers"):  # T5
        layers = hf.encoder.block if which == "encoder" else hf.decoder.block
        sub = {"encoder": (0, "SelfAttention"), "decoder": (0, "SelfAttention")}
        sub["cross"] = (1, "EncDecAttention")
        index, name = sub[which]
        modules = [getattr(block.layer[index], name).v for block in layers]
    else:
        layers = hf.model.encoder.layers if which == "encoder" else hf.model.decoder.layers
        attr = "encoder_attn" if which == "cross" else "self_attn"
        modules = [getattr(layer, attr).v_proj for layer in layers]
    length = ids.shape[1] if which in ("encoder", "cross") else decoder_ids.shape[1]
    queries = clean[0].shape[1]
    out = torch.zeros(len(modules), queries, length, dtype=torch.float64)
    for layer, module in enumerate(modules):
        for j in range(length):

            def zero(_m, _a, output, j=j):
                output = output.clone()
                output[:, j] = 0
                return output

            handle = module.register_forward_hook(zero)
            zeroed = states(forward())
            handle.remove()
            a, b = zeroed[layer + 1][0], clean[layer + 1][0]
            out[layer, :, j] = 1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return out


def inseq_aggregation(raw: torch.Tensor, causal: bool) -> np.ndarray:
    """[layer, query, source] distances -> thresholded, row-normalized [query, source, layer]."""
    raw = raw.clone()
    if causal:
        future = torch.triu(torch.ones(raw.shape[1:], dtype=torch.bool), diagonal=1)
        raw[:, future] = torch.nan
    raw = torch.where(raw < 1e-5, 0.0, raw)
    return (raw / raw.nansum(-1, keepdim=True)).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("arch", ["marian", "t5"])
def test_value_zeroing_encoder_decoder_matches_naive(arch):
    hf, tok = tiny_model(arch)
    model = ax.load_model(hf.double(), tokenizer=tok)
    source, target = "the capital of france", "paris is"
    source_ids, target_ids = _naive.token_ids(model, source, target)
    queries = list(range(len(target_ids)))  # decoder position k predicts target k
    got = ax.value_zeroing(model, source, target, attribute_target=True)
    assert got.indexes["source"].names == ["side", "position"]
    cross = inseq_aggregation(naive_seq2seq_zeroing(model, source_ids, target_ids, "cross"), False)
    np.testing.assert_allclose(got.sel(side="source").values, cross[queries], atol=1e-9)
    own = inseq_aggregation(naive_seq2seq_zeroing(model, source_ids, target_ids, "decoder"), True)
    np.testing.assert_allclose(got.sel(side="target").values, own[queries], atol=1e-9)
    default = ax.value_zeroing(model, source, target)
    np.testing.assert_allclose(default.values, cross[queries], atol=1e-9)
    encoder = ax.value_zeroing(model, source, maps="encoder", layers=[0, -1])
    assert encoder.dims == ("query", "source", "layer")
    enc = inseq_aggregation(naive_seq2seq_zeroing(model, source_ids, target_ids, "encoder"), False)
    np.testing.assert_allclose(encoder.values, enc[..., [0, -1]], atol=1e-9)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_value_zeroing_of_some_heads_matches_naive(mixing_models, arch):
    model = mixing_models[arch]
    config = model.hf.config
    n_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    ids, queries = ids_and_queries(model, PROMPT, TARGET)
    raw = naive_value_zeroing(model, ids, heads=[1], n_heads=n_heads)
    got = ax.value_zeroing(model, PROMPT, TARGET, heads=[1], normalize=False)
    for k, q in enumerate(queries):
        want = raw[:, q, : q + 1].T.numpy()
        np.testing.assert_allclose(
            got.values[k, : q + 1], np.where(want < 1e-5, 0, want), atol=1e-9
        )
    every = ax.value_zeroing(model, PROMPT, TARGET, heads=range(n_heads))
    np.testing.assert_allclose(every.values, ax.value_zeroing(model, PROMPT, TARGET).values)
    with pytest.raises(ax.OptionError, match=f"the model has {n_heads} value heads per layer"):
        ax.value_zeroing(model, PROMPT, TARGET, heads=n_heads)


def test_value_zeroing_of_an_unseen_token_changes_nothing(mixing_models):
    model = mixing_models["gpt2"]
    t = to_tensors(prepare(model, [PROMPT], [TARGET]), model)
    t.mask[0, 2] = 0  # no query attends to token 2 now
    options = {"batch_size": None, "max_memory": None}
    scores = _mixing._zeroing_scores(model, _mixing._self_run(model, t), "cosine", options)
    others = [i for i in range(t.ids.shape[1]) if i != 2]
    assert (scores[0, others, 2].abs() < 1e-12).all()
    assert scores[0, others].sum() > 0
    # causal: zeroing a later token never moves an earlier query
    assert (torch.triu(scores[0].permute(2, 0, 1), diagonal=1).abs() < 1e-12).all()


@pytest.mark.parametrize("method", [ax.value_zeroing, ax.alti, ax.alti_logit])
def test_batched_equals_single(mixing_models, method):
    model = mixing_models["llama"]
    prompts, targets = [PROMPT, "The capital"], [TARGET, " of Italy is Rome"]
    both = method(model, prompts, targets)
    for b in range(2):
        one = method(model, prompts[b], targets[b])
        part = both.isel(example=b).sel(target=one.target.values, source=one.source.values)
        np.testing.assert_allclose(part.values, one.values, atol=1e-9)


@pytest.mark.parametrize("method", [ax.value_zeroing, ax.alti])
def test_encoder_decoder_batched_equals_single(method):
    hf, tok = tiny_model("marian")
    model = ax.load_model(hf.double(), tokenizer=tok)
    sources, targets = ["the capital of france", "a b"], ["paris is", "c d e f"]
    both = method(model, sources, targets, attribute_target=True)
    for b in range(2):
        one = method(model, sources[b], targets[b], attribute_target=True)
        part = both.isel(example=b).sel(target=one.target.values, source=one.source.values)
        np.testing.assert_allclose(part.values, one.values, atol=1e-9)


def test_value_zeroing_copies_per_forward_do_not_change_scores(mixing_models):
    model = mixing_models["gpt2"]
    whole = ax.value_zeroing(model, PROMPT, TARGET)
    chunked = ax.value_zeroing(model, PROMPT, TARGET, batch_size=2, layers=[-1])
    np.testing.assert_allclose(chunked.values[..., 0], whole.values[..., -1], atol=1e-12)
    assert chunked.layer.values.tolist() == [whole.sizes["layer"] - 1]


LOGIT_KINDS = (
    "lm",
    "llama_contrast",
    "phi3",
    "pythia",
    "opt-projected",
    "qwen3",
    "gemma3",
    "granite",
)


@pytest.mark.parametrize(
    "kind",
    [
        *LOGIT_KINDS,
        "olmo2",
        "olmo3",
        "glm4",
        "exaone4",
        "vaultgemma",
        "gemma",
        "gemma2",
        "classifier",
        "qwen2_moe",
        "granitemoe",
        "gpt_oss",  # attention sinks
        "deepseek_v2",  # multi-head latent attention
        "deepseek_v3",
        "deepseek_v32",  # an indexer picks each query's keys
        "glm4_moe_lite",
        "glm_moe_dsa",
        "llama4",  # chunked local layers, a NoPE layer whose queries scale with position
        "glm4_moe",  # biased q/k/v, RoPE on half of each head
        "minimax_m2",  # query and key norms over all heads
        "ernie4_5_moe",  # shared experts
        "hunyuan_v1_moe",  # query and key norms after RoPE
        *LLAMA_KIN,
        *NEOX_AND_OPT_KIN,
        "gpt_neo",
        *MORE_PRE_NORM,
        *FALCON_LAYOUTS,
        "bloom",
    ],
)
def test_alti_logit_matches_naive(mixing_models, kind):
    """GPT-2 (LayerNorm: centered direction), Llama with a contrast (RMSNorm: no centering; the
    unembedding row minus the contrast's), Phi-3 (values in a fused projection), Pythia
    (parallel residual), OPT (its head reads `project_out`) and a GPT-2 sequence classifier,
    against loops. Gemma 2 soft-caps its logits: the terms are those of the logit before the
    cap, which the result's ``logit_softcap`` attr says."""
    if kind != "classifier":
        if kind in ("lm", "llama_contrast", "gpt_neo"):
            model = mixing_models[{"lm": "gpt2", "llama_contrast": "llama"}.get(kind, kind)]
        elif kind in FALCON_LAYOUTS:
            model = _falcon(kind)
        elif kind == "bloom":
            model = _bloom()
        else:
            model = _fused(kind)
        contrast = " Rome." if kind == "llama_contrast" else None
        ids, queries = ids_and_queries(model, PROMPT, TARGET)
        got = ax.alti_logit(model, PROMPT, TARGET, contrast=contrast, aggregate=False)
        total = ax.alti_logit(model, PROMPT, TARGET, contrast=contrast)
        head = model.hf.get_output_embeddings().weight
        rows = [head[int(ids[0, q + 1])] for q in queries]
        if contrast is not None:
            other = _naive.token_ids(model, PROMPT, contrast)[1]
            assert len(other) == len(rows)
            assert all(int(ids[0, q + 1]) != c for q, c in zip(queries, other, strict=True))
            rows = [row - head[c] for row, c in zip(rows, other, strict=True)]
    else:  # a GPT-2 sequence classifier: the predicted class's row of its score head
        hf, tok = tiny_classifier("gpt2", task="sequence")
        model = ax.load_model(hf.double(), tokenizer=tok)
        ids = torch.tensor([tok(PROMPT).input_ids])
        queries = [ids.shape[1] - 1]  # the pooled (last) token
        got = ax.alti_logit(model, PROMPT, aggregate=False)
        total = ax.alti_logit(model, PROMPT)
        with torch.no_grad():
            predicted = int(model.hf(input_ids=ids).logits[0].argmax())
        rows = [model.hf.score.weight[predicted]]
    hf = model.hf
    layers = naive_alti_layers(model, ids)
    if hasattr(hf, "transformer"):
        final, project_out = hf.transformer.ln_f, None
    elif hasattr(hf, "gpt_neox"):
        final, project_out = hf.gpt_neox.final_layer_norm, None
    elif hasattr(hf.base_model, "decoder"):  # OPT: its head reads project_out's output
        final, project_out = hf.base_model.decoder.final_layer_norm, hf.model.decoder.project_out
    elif hasattr(hf, "biogpt"):
        final, project_out = hf.biogpt.layer_norm, None
    else:  # Phi's is `final_layernorm`
        final = getattr(hf.model, "final_layernorm", None) or hf.model.norm
        project_out = None
    # torch's, OLMo's (no weight) and Cohere's (no bias) LayerNorms centre; RMSNorms do not
    layer_norm = isinstance(final, torch.nn.LayerNorm) or type(final).__name__.endswith("LayerNorm")
    # OLMo's LayerNorm fixes its epsilon at 1e-5 in its forward
    final_eps = getattr(final, "variance_epsilon", None) or getattr(final, "eps", None) or 1e-5
    before_final, outputs = [], []
    handles = [final.register_forward_pre_hook(lambda _m, args: before_final.append(args[0]))]
    handles += [  # each attention's output (Gemma norms it before the residual adds it)
        attention_of(b).register_forward_hook(lambda _m, _a, o: outputs.append(o[0]))
        for b in blocks(model)
    ]
    with torch.no_grad():  # the model's own eager forward
        out = hf(input_ids=ids, output_attentions=True, output_hidden_states=True)
    for handle in handles:
        handle.remove()
    residual = before_final[0][0]  # the last block's output, before the final norm
    length = ids.shape[1]
    for k, q in enumerate(queries):
        if layer_norm:
            sigma = torch.sqrt(residual[q].var(unbiased=False) + final_eps)
        else:  # RMSNorm: the root mean square, no centering
            eps = getattr(final, "variance_epsilon", None) or final.eps
            sigma = torch.sqrt(residual[q].pow(2).mean() + eps)

        def read(y: torch.Tensor, k: int = k) -> float:  # the target's logit of norm output y
            logit = float((y if project_out is None else project_out(y)) @ rows[k])
            # Granite divides its logits, Cohere multiplies them
            return (
                logit
                / getattr(hf.config, "logits_scaling", 1.0)
                * getattr(hf.config, "logit_scale", 1.0)
            )

        below = torch.eye(length, dtype=torch.float64)
        expected_total = torch.zeros(length, dtype=torch.float64)
        for layer, block in enumerate(blocks(model)):
            x = out.hidden_states[layer]
            attn = out.attentions[layer][0]
            v = value_parts(model, block, x)
            hd = v.shape[-1]
            delta = torch.zeros(length, dtype=torch.float64)
            for j in range(q + 1):
                z = torch.zeros(attn.shape[0] * hd, dtype=torch.float64)
                for h in range(attn.shape[0]):
                    z[h * hd : (h + 1) * hd] = attn[h, q, j] * v[j, h]
                update = project(model, block, z) * after_attention(block, outputs[layer], q)
                if layer_norm:
                    update = update - update.mean()
                delta[j] = read(gain(final) * update.detach() / sigma)
            term = delta @ below
            np.testing.assert_allclose(got.values[k, : q + 1, layer], term[: q + 1], atol=1e-9)
            expected_total += term
            below = layers[layer] @ below
        np.testing.assert_allclose(total.values[k, : q + 1], expected_total[: q + 1], atol=1e-9)
        assert np.abs(expected_total.numpy()).max() > 1e-3  # a term that is all 0 tests nothing
    cap = getattr(hf.config, "final_logit_softcapping", None)
    assert total.attrs.get("logit_softcap") == cap and got.attrs.get("logit_softcap") == cap


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: ax.value_zeroing(m, PROMPT, TARGET, similarity="l1"), "`similarity` must be"),
        (lambda m: ax.value_zeroing(m, PROMPT, TARGET, normalize=1), "`normalize` must be"),
        (lambda m: ax.value_zeroing(m, PROMPT, TARGET, objective="logit"), "does not take"),
        (lambda m: ax.value_zeroing(m, PROMPT, TARGET, layers=9), "out of range"),
        (lambda m: ax.alti(m, PROMPT, TARGET, layers=0), "needs aggregate=False"),
        (lambda m: ax.alti(m, PROMPT, TARGET, chunk_size=2), "does not take"),
        (lambda m: ax.alti_logit(m, PROMPT, TARGET, objective="logprob"), "does not take"),
    ],
)
def test_option_errors(mixing_models, call, message):
    with pytest.raises(ax.OptionError, match=message.replace("(", r"\(")):
        call(mixing_models["gpt2"])


def test_unsupported_architectures_are_model_errors(mixing_models):
    hf, tok = tiny_model("marian")
    marian = ax.load_model(hf, tokenizer=tok)
    with pytest.raises(ax.ModelError, match=r"marian"):
        ax.alti_logit(marian, "a b", "c")
    with pytest.raises(ax.OptionError, match="an encoder-decoder's ALTI\\+ is the rollout"):
        ax.alti(marian, "a b", "c", aggregate=False)
    led = T.LEDConfig(vocab_size=len(marian.tokenizer), **SEQ2SEQ_SIZES)  # Longformer's encoder
    led.pad_token_id, led.eos_token_id = marian.pad_token_id, marian.eos_token_id
    led.decoder_start_token_id = marian.eos_token_id
    led = ax.load_model(T.AutoModelForSeq2SeqLM.from_config(led), tokenizer=marian.tokenizer)
    with pytest.raises(ax.ModelError, match=r"led.*ALTI\+ decomposes the post-norm"):
        ax.alti(led, "a b", "c")
    with pytest.raises(ax.OptionError, match="maps='self'"):
        ax.value_zeroing(marian, "a b", "c", maps="self")
    with pytest.raises(ax.OptionError, match="needs an encoder-decoder"):
        ax.value_zeroing(mixing_models["gpt2"], "a b", "c", maps="cross")
    with pytest.raises(ax.ModelError, match=r"bert.*ALTI-Logit decomposes.*post-norm"):
        ax.alti_logit(mixing_models["bert"], PROMPT)
    hf, tok = tiny_classifier("deberta-v2", conv_kernel_size=3)  # xlarge's convolution
    deberta = ax.load_model(hf, tokenizer=tok)
    for method in (ax.alti, ax.value_zeroing, ax.attention, ax.attention_x_gradient):
        with pytest.raises(ax.ModelError, match=r"convolution over neighbouring tokens"):
            method(deberta, PROMPT)
    _, tok = tiny_model("gpt2")
    config = CONFIGS["opt"](len(tok))
    config.do_layer_norm_before = False  # OPT-350m: a LayerNorm after each block
    post_ln = ax.load_model(AutoModelForCausalLM.from_config(config), tokenizer=tok)
    for method in (ax.alti, ax.alti_logit):
        with pytest.raises(ax.ModelError, match="normalises after each block"):
            method(post_ln, PROMPT, TARGET)


def test_cli_and_dataset_runs(tmp_path, capsys):
    for method in ("value_zeroing", "alti", "alti_logit"):
        nc = tmp_path / f"{method}.nc"
        args = ["attribute", "--method", method, "--input", "1 2 3 =", "--target", " 3 2 1"]
        assert main([*args, "--out", str(nc)]) == 0
        assert ax.load(nc).attrs["method"] == method
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"input": p, "target": " 1"}) for p in ["1 2 =", "3 ="]))
    out = tmp_path / "vz"
    run = ax.attribute_dataset(
        None, data, out, method="value_zeroing", reduce="none", progress=False
    )
    assert run.records == 2
    results = ax.load_dataset_results(out)
    assert results.dims == ("example", "target", "source", "layer")


def test_alti_row_chunks_do_not_change_contributions(mixing_models, monkeypatch):
    model = mixing_models["bert"]
    whole = ax.alti(model, [PROMPT, "a film"], aggregate=False)
    monkeypatch.setattr(_memory, "memory_budget", lambda device: 1)  # one query row at a time
    rows = ax.alti(model, [PROMPT, "a film"], aggregate=False)
    np.testing.assert_allclose(rows.values, whole.values, atol=1e-12)


def _chunks(monkeypatch) -> list[int]:
    """The query rows of each chunk ALTI scores, as the calls run."""
    sizes: list[int] = []
    for name in ("_row_scores", "_cross_row_scores"):
        original = getattr(_mixing, name)

        def spy(weights, *args, _original=original, **kwargs):
            sizes.append(weights.shape[2])
            return _original(weights, *args, **kwargs)

        monkeypatch.setattr(_mixing, name, spy)
    return sizes


@pytest.mark.parametrize("method", [ax.alti, ax.alti_logit])
def test_alti_max_memory_bounds_its_row_chunks_not_its_values(mixing_models, monkeypatch, method):
    """A budget just above the smallest builds few query rows' vectors at a time; the values
    are those of one chunk per layer."""
    model = mixing_models["gpt2"]
    sizes = _chunks(monkeypatch)
    whole = method(model, PROMPT, TARGET)
    length = max(sizes)
    assert sizes == [length] * len(sizes)  # one chunk per layer without a budget
    monkeypatch.setattr(_memory, "format_bytes", lambda n, up=False: f"{n} B")  # not rounded
    with pytest.raises(ax.OptionError, match="cannot be met") as refused:
        method(model, PROMPT, TARGET, max_memory=1)
    smallest = int(re.search(r"estimated (\d+) B;", str(refused.value))[1])
    row = _mixing._row_bytes(1, length, model.hidden_size, 8)  # float64 vectors
    sizes.clear()
    bounded = method(model, PROMPT, TARGET, max_memory=smallest + 2 * row)  # three rows
    layers = model.hf.config.n_layer
    assert sizes == ([3] * (length // 3) + [length % 3] * (length % 3 > 0)) * layers, sizes
    np.testing.assert_allclose(bounded.values, whole.values, atol=1e-12)


def test_alti_plus_row_chunks_do_not_change_contributions(monkeypatch):
    """ALTI+ chunks the encoder's, the decoder's and the cross-attention's query rows alike."""
    hf, tok = tiny_model("marian")
    model = ax.load_model(hf.double(), tokenizer=tok)
    source, target = "the capital of france is", "paris is a city"
    whole = ax.alti(model, source, target, attribute_target=True)
    sizes = _chunks(monkeypatch)
    monkeypatch.setattr(_memory, "memory_budget", lambda device: 1)  # one query row at a time
    rows = ax.alti(model, source, target, attribute_target=True)
    assert set(sizes) == {1} and len(sizes) > 2 * whole.sizes["target"], sizes
    np.testing.assert_allclose(rows.values, whole.values, atol=1e-12)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_only_classifiers_read_their_pooled_or_token_rows(arch):
    """A token classifier's target k is read at query k itself (not k - 1 as a language model's),
    a sequence classifier's at its pooled (last) token: both against the loops above."""
    for task in ("token", "sequence"):
        hf, tok = tiny_classifier(arch, task=task)
        model = ax.load_model(hf.double(), tokenizer=tok)
        ids = torch.tensor([tok(PROMPT).input_ids])
        length = ids.shape[1]
        # a tagger's targets: every token but the special ones (Llama's BOS)
        special = set(tok.all_special_ids)
        words = [p for p, i in enumerate(ids[0].tolist()) if i not in special]
        queries = words if task == "token" else [length - 1]
        vz = ax.value_zeroing(model, PROMPT, normalize=False)
        alti = ax.alti(model, PROMPT, aggregate=False)
        assert vz.sizes["source"] == alti.sizes["source"] == length
        if task == "token":
            assert vz.target.values.tolist() == alti.target.values.tolist() == queries
        raw = naive_value_zeroing(model, ids)
        layers = naive_alti_layers(model, ids)
        for k, q in enumerate(queries):
            want = raw[:, q, : q + 1].T.numpy()  # [source, layer]
            np.testing.assert_allclose(
                vz.values[k, : q + 1], np.where(want < 1e-5, 0.0, want), atol=1e-9
            )
            rows = np.stack([C[q, : q + 1].numpy() for C in layers], axis=-1)
            np.testing.assert_allclose(alti.values[k, : q + 1], rows, atol=1e-9)
            assert np.isnan(vz.values[k, q + 1 :]).all() and np.isnan(alti.values[k, q + 1 :]).all()
        np.testing.assert_allclose(alti.sum("source", skipna=True).values, 1.0)


@pytest.mark.parametrize("method", [ax.value_zeroing, ax.alti, ax.alti_logit])
def test_positions_keep_their_rows(mixing_models, method):
    model = mixing_models["gpt2"]
    full = method(model, PROMPT, TARGET)
    first = int(full.target.values[0])
    one = method(model, PROMPT, TARGET, positions=[first])
    assert one.target.values.tolist() == [first]
    np.testing.assert_allclose(one.values[0], full.values[0], atol=1e-12)


# a third layer (local) reading the first's keys and values; keys as values in the global one
SHARED = {"num_kv_shared_layers": 1, "num_hidden_layers": 3}
SHARED["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention"]


@pytest.mark.parametrize("layout", [SHARED, {"attention_k_eq_v": True}])
def test_value_zeroing_refuses_attention_without_its_own_values(layout):
    """Gemma 4's layers that reuse an earlier layer's keys and values, and its global layers
    that take their keys as values, have no value projection of their own: refused, naming
    the attention, as docs/architectures.md says."""
    _, tok = tiny_model("gpt2")
    hf = _family("gemma4", tok)
    config = hf.config
    config.update(layout)
    torch.manual_seed(0)
    model = ax.load_model(type(hf)(config), tokenizer=tok)
    with pytest.raises(ax.ModelError, match="no value projection in Gemma4TextAttention"):
        ax.value_zeroing(model, "The capital of France is", " Paris")


def test_alti_logit_names_modernberts_head_as_what_refuses_it():
    """The refusal said "attrax finds no final norm" (ModernBERT has one, `final_norm`), and
    the list of supported architectures named modernbert (until 2026-12-06)."""
    from attrax.testing import tiny_classifier

    hf, tok = tiny_classifier("modernbert", "sequence")
    with pytest.raises(
        ax.ModelError, match=r"its head \(dense, GELU and LayerNorm .*no linear path"
    ):
        ax.alti_logit(ax.load_model(hf, tokenizer=tok), "a b c")
    hf, tok = tiny_classifier("bert", "sequence")
    with pytest.raises(ax.ModelError, match=r"a post-norm encoder") as refused:
        ax.alti_logit(ax.load_model(hf, tokenizer=tok), "a b c")
    assert "modernbert" not in str(refused.value)
