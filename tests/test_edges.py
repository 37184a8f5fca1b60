"""Edge attribution patching (EAP, EAP-IG) against a loop that patches one edge at a time.

The loop's edge ``u -> v``: the clean run with ``s * (u(corrupted) - u(clean))`` added to
``v``'s own input only, and each target's derivative at ``s = 0`` by autograd (float64). A
head's input: the attention module run again on the norm of the shifted stream, its query, key
or value of that head (as the attention function receives them: no column layout assumed)
swapped into the clean run's; an MLP's: its norm's input; the logits: the last block's output.
EAP-IG's loop does the same at its own points between the corrupted and the clean embeddings.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import attrax as ax
from attrax.cli import main
from attrax.testing import save_tiny_model, tiny_classifier, tiny_model
from tests.test_components import (
    CORRUPTED,
    SOURCE,
    TARGET,
    _bloom,
    _falcon,
    full_double,
    gpt_bigcode,
    llama_like,
    neighbour,
)

CLEAN = SOURCE
KW = {"corrupted": CORRUPTED, "objective": "logit"}


@pytest.fixture(scope="module")
def edges_models() -> dict[str, ax.Model]:
    built = {}
    for arch in ("gpt2", "llama", "gpt_neo"):
        hf, tok = tiny_model(arch)
        built[arch] = ax.load_model(full_double(hf), tokenizer=tok)
    _, tok = tiny_model("llama")
    for arch in ("phi3", "qwen2", "qwen3", "mistral", "mixtral"):
        built[arch] = ax.load_model(full_double(llama_like(arch, tok)), tokenizer=tok)
    # norms on the attention's and the MLP's outputs too (Gemma 2's and 3's, GLM-4's); and
    # VaultGemma's, before them only, named as Gemma 2's; on the outputs only (OLMo 2's, with
    # query and key norms over all heads at once; EXAONE 4's, each head's alone); OLMoE's
    # query and key norms over all heads in pre-norm blocks
    for arch in ("gemma2", "gemma3", "glm4", "vaultgemma", "olmo2", "exaone4", "olmoe"):
        hf = llama_like(arch, tok)
        with torch.no_grad():  # random gains: Gemma's norms scale by 1 + weight, weight 0
            for module in hf.modules():
                if type(module).__name__.endswith("RMSNorm"):
                    module.weight.normal_(0.0 if arch.startswith("gemma") else 1.0, 0.3)
        built[arch] = ax.load_model(_large(full_double(hf)), tokenizer=tok)
    # Granite scales what each sublayer adds (residual_multiplier)
    built["granite"] = ax.load_model(_large(full_double(llama_like("granite", tok))), tokenizer=tok)
    # attention and MLP side by side on one norm: GPT-J's, Phi's, Cohere's
    for arch in ("gptj", "phi", "cohere"):
        built[arch] = ax.load_model(_large(full_double(llama_like(arch, tok))), tokenizer=tok)
    built["cohere-qk"] = ax.load_model(_cohere_qk(tok), tokenizer=tok)
    # multi-head latent attention: V2's queries straight from the stream, V3's through their
    # own latent and its RMSNorm; keys and values expanded from one latent, a rotated key part
    # every head shares
    for arch in ("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm_moe_dsa"):
        built[arch] = ax.load_model(_latent(arch, tok), tokenizer=tok)
    # projections whose output the attention does not read as GPT-2's or GPT-NeoX's layout
    # cuts it: CodeGen's shards (each of 4 holds queries, values and keys), OLMo's clamp of
    # its queries, keys and values (clip_qkv): the receivers are the attention call's
    built["codegen"] = ax.load_model(_large(full_double(llama_like("codegen", tok))), tokenizer=tok)
    built["olmo-clip"] = ax.load_model(_clipped(tok), tokenizer=tok)
    # GPT-NeoX: each head's query, key and value side by side, the MLP on its own norm beside
    # the attention (or after it)
    # OPT: its MLP no module (`fc1`, `fc2`), its positions flattened there; with project_in/out
    for arch in ("pythia", "pythia-sequential", "opt", "opt-projected"):
        built[arch] = ax.load_model(full_double(neighbour(arch, tok)), tokenizer=tok)
    # Falcon-7B's multi-query heads on one norm, Falcon-40B's groups side by side on two
    for layout in ("falcon", "falcon-40b"):
        built[layout] = _falcon(layout)
    # BLOOM: its attention and MLP modules add the residual stream themselves
    built["bloom"] = _bloom()
    # post-LN OPT (350m's blocks, with its narrower embeddings projected in and out)
    post_ln = neighbour("opt-projected", tok, do_layer_norm_before=False)
    built["opt-post-ln"] = ax.load_model(full_double(post_ln), tokenizer=tok)
    # multi-query attention: one key and one value head after the queries in `c_attn`; without
    # it, each head's query, key and value side by side
    for name, multi_query in (("gpt_bigcode", True), ("gpt_bigcode-mha", False)):
        built[name] = ax.load_model(_large(gpt_bigcode(tok, multi_query).double()), tokenizer=tok)
    return built


def _cohere_qk(tok, norm=None):
    """Command R+'s blocks: Cohere's with a LayerNorm of each head's query and key, gains
    ``[heads, head_dim]`` (random); ``norm(heads, head_dim)`` in place of the query's."""
    from tests.test_architectures import CONFIGS, built

    config = CONFIGS["cohere"](len(tok))
    config.use_qk_norm = True
    hf = built(config, tok, attn_implementation="eager")
    with torch.no_grad():
        for layer in hf.model.layers:
            attention = layer.self_attn
            if norm is not None:
                attention.q_norm = norm(config.num_attention_heads, attention.head_dim)
            for module in (attention.q_norm, attention.k_norm):
                module.weight.normal_(1.0, 0.3)
    return _large(full_double(hf.eval()))


def _latent(arch, tok):
    """A DeepSeek of ``arch``'s tiny config, float64 throughout, random norm gains."""
    from tests.test_architectures import CONFIGS, built

    hf = built(CONFIGS[arch](len(tok)), tok, attn_implementation="eager",
               experts_implementation="eager")  # fmt: skip
    with torch.no_grad():
        for module in hf.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.normal_(1.0, 0.3)
    return _large(full_double(hf.eval()))


def _clipped(tok):
    """OLMo with ``clip_qkv`` small enough that its clamp cuts many of the queries, keys and
    values (the clean run's values checked to be clipped)."""
    from tests.test_architectures import CONFIGS, built

    config = CONFIGS["olmo"](len(tok))
    config.clip_qkv = 0.5
    hf = _large(full_double(built(config, tok, attn_implementation="eager").eval()))
    seen = []
    handle = hf.model.layers[1].self_attn.v_proj.register_forward_hook(
        lambda _m, _a, out: seen.append(out.clone())
    )
    with torch.no_grad():
        hf(input_ids=tok(CLEAN, return_tensors="pt")["input_ids"])
    handle.remove()
    assert float((seen[0].abs() > 0.5).double().mean()) > 0.2  # the clamp cuts them
    return hf


def _large(hf):
    """``hf`` with GPT-2's scale of the tiny models: effects well above rounding."""
    with torch.no_grad():
        for module in hf.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0, 0.3)
    return hf


# --- the loop --------------------------------------------------------------------------------


def _parts(hf):
    """Per block: (block, first norm, [(reader, [(part, heads)])], output projection, second
    norm (the first where the MLP reads it beside the attention), MLP), named by hand for
    GPT-2, GPT-Neo, GPT-J, GPT-NeoX, Falcon, and Llama's kin, Phi's and Cohere's."""
    base = getattr(hf, "transformer", None) or getattr(hf, "gpt_neox", None)
    base = base or getattr(hf, "model", None) or getattr(hf, hf.base_model_prefix)
    base = getattr(base, "decoder", base)  # OPT's
    base = getattr(base, "encoder", None) or getattr(
        base, "transformer", base
    )  # BERT's, DistilBERT's
    blocks = base.h if hasattr(base, "h") else getattr(base, "layers", None) or base.layer
    config = hf.config
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_heads", None)
    heads = heads or config.n_head
    kv = getattr(config, "num_key_value_heads", None) or heads
    if config.model_type == "gpt_bigcode":  # its num_key_value_heads follows multi_query late
        kv = 1 if config.multi_query else heads
    if config.model_type == "falcon":
        kv = 1 if config.multi_query else heads
    if config.model_type == "falcon" and config.new_decoder_architecture:
        kv = config.num_kv_heads
    out = []
    for b in blocks:
        if hasattr(b, "ln_1"):
            attn = b.attn.attention if hasattr(b.attn, "attention") else b.attn
            if hasattr(attn, "qkv_proj"):  # CodeGen's shards: the call's queries, keys, values
                readers = [(attn, [("q", heads), ("k", kv), ("v", kv)])]
                proj = attn.out_proj
            elif hasattr(attn, "c_attn"):
                readers = [(attn.c_attn, [("q", heads), ("k", kv), ("v", kv)])]
                proj = attn.c_proj
            else:
                readers = [(attn.q_proj, [("q", heads)]), (attn.k_proj, [("k", heads)]),
                           (attn.v_proj, [("v", heads)])]  # fmt: skip
                proj = attn.out_proj
            out.append((b, b.ln_1, readers, proj, getattr(b, "ln_2", b.ln_1), b.mlp))
        elif type(b).__name__ == "BloomBlock":
            readers = [(b.self_attention.query_key_value, [("q", heads), ("k", heads),
                                                            ("v", heads)])]  # fmt: skip
            # its `mlp` adds the residual itself: the MLP's own output is its last projection's
            out.append((b, b.input_layernorm, readers, b.self_attention.dense,
                        b.post_attention_layernorm, b.mlp.dense_4h_to_h))  # fmt: skip
        elif hasattr(b, "intermediate"):  # BERT's post-norm layers: the attention reads the input
            attn = b.attention.self
            names = (
                ("query_proj", "key_proj", "value_proj")
                if hasattr(attn, "query_proj")
                else ("query", "key", "value")
            )  # DeBERTa's, BERT's
            readers = [(getattr(attn, n), [(p, heads)]) for n, p in zip(names, "qkv", strict=True)]
            out.append((b, None, readers, b.attention.output.dense, b.intermediate, b.output.dense))
        elif hasattr(b, "sa_layer_norm"):  # DistilBERT's post-norm layers
            attn = b.attention
            readers = [(attn.q_lin, [("q", heads)]), (attn.k_lin, [("k", heads)]),
                       (attn.v_lin, [("v", heads)])]  # fmt: skip
            out.append((b, None, readers, attn.out_lin, b.ffn, b.ffn))
        elif hasattr(b, "attention") or hasattr(b, "self_attention"):  # GPT-NeoX, Falcon
            attn = getattr(b, "attention", None) or b.self_attention
            readers = [(attn.query_key_value, [("q", heads), ("k", kv), ("v", kv)])]
            norm = getattr(b, "ln_attn", None) or b.input_layernorm
            mlp_norm = getattr(b, "ln_mlp", None) or getattr(b, "post_attention_layernorm", norm)
            out.append((b, norm, readers, attn.dense, mlp_norm, b.mlp))
        elif hasattr(b, "self_attn_layer_norm"):  # OPT, BioGPT: `fc1` reads the norm, `fc2` adds
            attn = b.self_attn
            readers = [(attn.q_proj, [("q", heads)]), (attn.k_proj, [("k", heads)]),
                       (attn.v_proj, [("v", heads)])]  # fmt: skip
            if getattr(config, "do_layer_norm_before", True):
                out.append((b, b.self_attn_layer_norm, readers, attn.out_proj,
                            b.final_layer_norm, b.fc2))  # fmt: skip
            else:  # post-LN OPT (350m): the attention reads the input, `fc1` the first norm's
                out.append((b, None, readers, attn.out_proj, b.fc1, b.fc2))
        elif hasattr(b, "attn_norm"):  # ModernBERT's pre-norm encoder layers, `Wqkv` fused
            readers = [(b.attn.Wqkv, [("q", heads), ("k", kv), ("v", kv)])]
            out.append((b, b.attn_norm, readers, b.attn.Wo, b.mlp_norm, b.mlp))
        else:
            attn = b.self_attn
            if hasattr(attn, "kv_b_proj"):  # latent attention: its call's queries, keys, values
                readers = [(attn, [("q", heads), ("k", heads), ("v", heads)])]
            elif hasattr(attn, "qkv_proj"):
                readers = [(attn.qkv_proj, [("q", heads), ("k", kv), ("v", kv)])]
            else:
                readers = [(attn.q_proj, [("q", heads)]), (attn.k_proj, [("k", kv)]),
                           (attn.v_proj, [("v", kv)])]  # fmt: skip
            proj = getattr(attn, "o_proj", None) or attn.dense  # Phi's `dense`
            if not hasattr(b, "input_layernorm"):  # OLMo 2's, EXAONE 4's: no norm before either
                out.append((b, None, readers, proj, b.mlp, b.mlp))
                continue
            # Gemma 2's and VaultGemma's `pre_feedforward_layernorm`; GLM-4's before its MLP is
            # its `post_attention_layernorm`, as Llama's
            mlp_norm = getattr(b, "pre_feedforward_layernorm", None) or getattr(
                b, "post_attention_layernorm", b.input_layernorm
            )
            out.append((b, b.input_layernorm, readers, proj, mlp_norm, b.mlp))
    return out, heads


def _posts(hf):
    """Per block: the norms on its attention's and its MLP's outputs (None, None without),
    named by hand for Gemma 2 and 3, OLMo 2, EXAONE 4 and GLM-4."""
    blocks, _ = _parts(hf)
    out = []
    for b, *_ in blocks:
        if hasattr(b, "post_feedforward_layernorm"):  # Gemma 2's and 3's
            out.append((b.post_attention_layernorm, b.post_feedforward_layernorm))
        elif hasattr(b, "post_mlp_layernorm"):  # GLM-4's
            out.append((b.post_self_attn_layernorm, b.post_mlp_layernorm))
        else:
            out.append((None, None))
    return out


def _chain(hf):
    """A post-norm model's LayerNorms on the residual stream, in the order they run (each
    block's after its attention, then after its MLP: BERT's, DistilBERT's); None for others."""
    blocks, _ = _parts(hf)
    first = blocks[0][0]
    post_ln_opt = hasattr(first, "self_attn_layer_norm") and not getattr(
        hf.config, "do_layer_norm_before", True
    )
    if not (hasattr(first, "intermediate") or hasattr(first, "sa_layer_norm") or post_ln_opt):
        return None
    out = []
    for b, *_ in blocks:
        if hasattr(b, "intermediate"):
            out += [b.attention.output.LayerNorm, b.output.LayerNorm]
        elif hasattr(b, "self_attn_layer_norm"):  # post-LN OPT
            out += [b.self_attn_layer_norm, b.final_layer_norm]
        else:
            out += [b.sa_layer_norm, b.output_layer_norm]
    return out


def _through_chain(model, sender, receiver, delta, s):
    """``(hooks, shifted)`` in a post-norm model: ``receiver``'s input when ``sender``'s
    output moves by ``s * delta`` and nothing else does: each LayerNorm from the one the sender
    is added before up to the receiver's input run again on its own input plus the move of the
    stream it adds to, less that input as the run made it."""
    chain = _chain(model.hf)
    blocks, _ = _parts(model.hf)
    first = 0 if sender == "input" else 2 * int(sender[1:].split(".")[0]) + (sender[0] == "m")
    if receiver == "logits":
        last = len(chain) - 1
    else:
        layer = int(receiver[1:].split(".")[0].split("<")[0])
        last = 2 * layer - (not receiver.startswith("m"))
    seen = {}

    def keep(key):
        def hook(_m, args, *rest):
            value = rest[0] if rest and not isinstance(rest[0], dict) else None
            if value is None:
                value = args[0] if args else rest[0]["hidden_states"]
            seen.setdefault(key, value)  # the run's, not the shift's own calls of the norms

        return hook

    hooks = [lambda: blocks[0][0].register_forward_pre_hook(keep("x"), with_kwargs=True)]
    for k, norm in enumerate(chain):
        hooks.append(lambda n=norm, k=k: n.register_forward_pre_hook(keep(f"in{k}")))
        hooks.append(lambda n=norm, k=k: n.register_forward_hook(keep(f"out{k}")))

    def before(k):  # the stream LayerNorm k adds to: the block's input, or the last one's
        return seen["x"] if k == 0 else seen[f"out{k - 1}"]

    def shifted():
        y = seen["x"] + s * delta if sender == "input" else None
        for k in range(first, last + 1):
            moved = s * delta if y is None else y - before(k)
            y = chain[k](seen[f"in{k}"] + moved)
        return y - before(last + 1)

    return hooks, shifted


def _shift(model, sender, delta, s, receiver=None):
    """``(hooks, shifted)``: what a receiver's input moves by when ``sender``'s output moves
    by ``s * delta``; a head's or an MLP's under a norm on its sublayer's output: that norm of
    the sublayer's output moved, less the norm of it as the run made it."""
    if _chain(model.hf) is not None:
        return _through_chain(model, sender, receiver, delta, s)
    posts = _posts(model.hf)[int(sender[1:].split(".")[0])] if sender != "input" else (None,)
    post = posts[0] if ".h" in sender else posts[-1]
    if post is None:
        return [], lambda: s * delta
    seen = {}

    def keep(_m, args):
        seen.setdefault("a", args[0])  # the run's, not the shift's own calls of the norm

    return [lambda: post.register_forward_pre_hook(keep)], (
        lambda: post(seen["a"] + s * delta) - post(seen["a"])
    )


def _parallel(hf) -> bool:
    """Whether each block's MLP reads the block's input beside the attention."""
    config = hf.config
    one_norm = config.model_type in ("gptj", "phi", "cohere", "codegen")
    return one_norm or any(getattr(config, f, False) for f in ("use_parallel_residual",
                                                                "parallel_attn"))  # fmt: skip


def _project(module, x):
    """A Linear's or GPT-2 Conv1D's output for ``x`` without its bias."""
    w = module.weight
    return x @ w if type(module).__name__ == "Conv1D" else x @ w.T


def _run(model, embeds, hooks):
    hf = model.hf
    handles = [register() for register in hooks]
    saved = hf.config._attn_implementation
    hf.config._attn_implementation = "edges_naive"
    try:
        # an encoder's classifier keeps no cache
        kw = {"use_cache": False} if model.causal else {}
        return hf(inputs_embeds=embeds, **kw).logits
    finally:
        hf.config._attn_implementation = saved
        _NAIVE.clear()
        for h in handles:
            h.remove()


def _nodes(model, embeds):
    """Each sender's output ``[B, L, H]`` (the heads through their rows of the projection)."""
    blocks, heads = _parts(model.hf)
    seen = {}

    def pre(key):
        def hook(_m, args, kwargs):
            seen[key] = (args[0] if args else kwargs["hidden_states"]).clone()

        return hook

    def post(key, take_input=False):
        def hook(_m, args, output):
            value = args[0] if take_input else output[0] if isinstance(output, tuple) else output
            seen[key] = value.clone()

        return hook

    hooks = [lambda: blocks[0][0].register_forward_pre_hook(pre("input"), with_kwargs=True)]
    for layer, (_, _, _, proj, _, mlp) in enumerate(blocks):
        hooks.append(lambda p=proj, k=f"z{layer}": p.register_forward_hook(post(k, True)))
        hooks.append(lambda m=mlp, k=f"m{layer}": m.register_forward_hook(post(k)))
    with torch.no_grad():
        _run(model, embeds, hooks)
    nodes = {"input": seen["input"]}
    for layer, (block, _, _, proj, _, _) in enumerate(blocks):
        z = seen[f"z{layer}"]
        width = z.shape[-1] // heads
        scale = getattr(block, "residual_multiplier", 1.0)  # Granite's, on what its block adds
        for h in range(heads):
            only = torch.zeros_like(z)
            only[..., h * width : (h + 1) * width] = z[..., h * width : (h + 1) * width]
            nodes[f"a{layer}.h{h}"] = _project(proj, only) * scale
        # OPT's: [B L, H]
        nodes[f"m{layer}"] = seen[f"m{layer}"].view_as(nodes["input"]) * scale
    return nodes


def _edge_hook(model, receiver, shifted):
    """The hooks that add ``shifted()`` to ``receiver``'s own input."""
    blocks, _ = _parts(model.hf)
    if receiver == "logits":
        last = blocks[-1][0]

        def add_out(_m, _a, output):
            if isinstance(output, tuple):
                return (output[0] + shifted(), *output[1:])
            return output + shifted()

        return [lambda: last.register_forward_hook(add_out)]
    layer = int(receiver[1:].split(".")[0].split("<")[0])
    _, norm, _, _, mlp_norm, mlp = blocks[layer]
    if receiver.startswith("m") and mlp_norm is not norm:
        return [
            lambda: mlp_norm.register_forward_pre_hook(
                lambda _m, a: (a[0] + shifted().view_as(a[0]), *a[1:])
            )
        ]
    if receiver.startswith("m"):  # one norm before both: the MLP reads it of the shifted stream
        kept = {}

        def keep_x(_m, args):
            kept.setdefault("x", args[0])

        def moved(_m, args):
            return (norm(kept["x"] + shifted()), *args[1:])

        return [lambda: norm.register_forward_pre_hook(keep_x),
                lambda: mlp.register_forward_pre_hook(moved)]  # fmt: skip
    head = int(receiver.split(".h")[1].split("<")[0])
    if model.hf.config.model_type in ("deberta-v2", "bloom"):
        return _projected_head(model.hf.config.model_type, blocks[layer], head, receiver[-2],
                               shifted)  # fmt: skip
    name = {"q": "query", "k": "key", "v": "value"}[receiver[-2]]
    attention = _attention_of(blocks[layer][0])
    stream = {}

    def keep(_m, args, kwargs=None):
        if "busy" not in stream:
            stream["x"] = args[0] if args else kwargs["hidden_states"]

    def shadow(module, args, kwargs):
        # the attention run again on the norm of the shifted stream: its vectors, as the
        # model's own code makes them, recorded by the attention function (no column layout)
        if "busy" in stream:
            return
        stream["busy"] = True
        # a post-norm block's attention reads the stream itself
        moved = stream["x"] + shifted() if norm is None else norm(stream["x"] + shifted())
        _NAIVE["capture"] = {}
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        module(moved, *args[1:], **rest)
        _NAIVE["swap"] = (name, head, _NAIVE.pop("capture")[name][:, head])
        del stream["busy"]

    if norm is None:
        return [lambda: attention.register_forward_pre_hook(keep, with_kwargs=True),
                lambda: attention.register_forward_pre_hook(shadow, with_kwargs=True)]  # fmt: skip
    return [lambda: norm.register_forward_pre_hook(keep),
            lambda: attention.register_forward_pre_hook(shadow, with_kwargs=True)]  # fmt: skip


def _projected_head(kind, parts, head, part, shifted):
    """DeBERTa's and BLOOM's attention run outside the attention interface: the head's query,
    key or value columns of its projection's output computed from the shifted stream (BLOOM's:
    of its norm), in place of the run's, laid out as transformers cuts them (DeBERTa: each
    projection head after head; BLOOM: one projection, each head's query, key and value side by
    side). DeBERTa's projection of the relative position embeddings (``share_att_key``) is
    another tensor and left alone."""
    block, norm, readers, _, _, _ = parts
    proj = readers["qkv".index(part)][0] if kind == "deberta-v2" else readers[0][0]
    heads = readers[0][1][0][1]
    width = proj.weight.shape[0] // heads // (1 if kind == "deberta-v2" else 3)
    first = head * width if kind == "deberta-v2" else (3 * head + "qkv".index(part)) * width
    columns = slice(first, first + width)
    stream = {}

    def keep(_m, args, kwargs):
        stream.setdefault("x", args[0] if args else kwargs["hidden_states"])

    def swap(module, args, output):
        given = stream["x"] if norm is None else norm(stream["x"])
        if args[0] is not stream["x"] and not torch.equal(args[0], given):
            return None  # DeBERTa's position embeddings
        moved = stream["x"] + shifted()
        own = torch.nn.functional.linear(moved if norm is None else norm(moved), module.weight,
                                         module.bias)  # fmt: skip
        out = output.clone()
        out[..., columns] = own[..., columns]
        return out

    where = block.attention if norm is None else norm
    return [lambda: where.register_forward_pre_hook(keep, with_kwargs=True),
            lambda: proj.register_forward_hook(swap)]  # fmt: skip


def _attention_of(block):
    for name in ("attn", "attention", "self_attention"):  # GPT-2's, GPT-NeoX's, Falcon's
        if hasattr(block, name):
            return getattr(block, name)
    return block.self_attn


# what the test's attention function does: record a shadow run's vectors, or swap one head's
_NAIVE: dict = {}


def _naive_attention(module, query, key, value, attention_mask, **kwargs):
    """The module's own eager attention, its inputs recorded (a shadow run) or one head's
    query, key or value swapped for the shadow run's (the patched run)."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    indices = kwargs.pop("indices", None)
    if indices is not None:  # DeepSeek V3.2's and GLM-5's indexer's picks: the rest masked
        allowed = torch.zeros(*indices.shape[:2], key.shape[2], dtype=torch.bool)
        for b, rows in enumerate(indices.tolist()):
            for q, picks in enumerate(rows):
                allowed[b, q, picks] = True
        low = torch.finfo(query.dtype).min
        attention_mask = (
            torch.zeros(allowed.shape, dtype=query.dtype)
            if attention_mask is None
            else attention_mask
        )
        attention_mask = attention_mask.masked_fill(~allowed[:, None], low)
    given = {"query": query, "key": key, "value": value}
    if "capture" in _NAIVE:
        _NAIVE["capture"].update(given)
    elif "swap" in _NAIVE:
        name, head, moved = _NAIVE.pop("swap")
        swapped = given[name].clone()
        swapped[:, head] = moved
        given[name] = swapped
    return eager(module, given["query"], given["key"], given["value"], attention_mask, **kwargs)


AttentionInterface.register("edges_naive", _naive_attention)
AttentionMaskInterface.register("edges_naive", eager_mask)  # eager's additive causal masks


def _naive_edges(model, clean_ids, corrupt_ids, targets, alphas, weights):
    """``{(sender, receiver): [per target]}``, edge by edge: the derivative at ``s = 0`` of
    each target's objective with ``s * delta`` on the receiver's input, by autograd per target
    at a zero leaf ``s`` (float32 softmaxes inside a float64 Llama would swamp finite
    differences)."""
    embed = model.hf.get_input_embeddings()
    with torch.no_grad():
        clean_e, corrupt_e = embed(clean_ids)[None], embed(corrupt_ids)[None]
    points = [(corrupt_e + a * (clean_e - corrupt_e), [], w) for a, w in zip(alphas, weights,
                                                                            strict=True)]  # fmt: skip
    return _naive_edges_at(model, clean_e, corrupt_e, targets, points)


def _naive_edges_at(model, clean_e, corrupt_e, targets, points, zero=False):
    """``_naive_edges`` at the points ``[(embeddings, hooks, weight)]``: each run is the
    embeddings' with the hooks on (``zero``: each sender's delta its clean output to zero)."""
    before = _nodes(model, clean_e)
    after = (
        {k: torch.zeros_like(v) for k, v in before.items()} if zero else _nodes(model, corrupt_e)
    )
    senders = list(before)
    _, heads = _parts(model.hf)
    out = {}
    for receiver in _receivers(model):
        for sender in senders[: _senders_before(receiver, heads, _parallel(model.hf))]:
            delta = after[sender] - before[sender]
            total = np.zeros(len(targets))
            for x, moved, w in points:
                s = torch.zeros((), dtype=x.dtype, requires_grad=True)
                kept, shift = _shift(model, sender, delta, s, receiver)
                logits = _run(model, x, [*moved, *kept, *_edge_hook(model, receiver, shift)])
                for k, (p, i) in enumerate(targets):
                    score = logits[0, p - 1, i] if p is not None else logits[0, i]  # a class
                    # a receiver whose every path out is a moved node's (a constant) has none
                    grad = 0.0
                    if score.requires_grad:
                        (grad,) = torch.autograd.grad(score, s, retain_graph=True)
                    total[k] += w * float(grad)
            out[sender, receiver] = total
    return out


def _naive_over_activations(model, clean_ids, corrupt_ids, targets, steps, zero=False,
                            nodes=None, weights=None):  # fmt: skip
    """EAP-IG over activations edge by edge: a run per node group (the first block's input,
    each layer's output projection's output, each MLP's) and ``alpha = k / steps``, ``k = 1 ..
    steps``, that group's module set to ``alpha`` of its clean run's output plus ``1 - alpha``
    of its corrupted run's (recorded here; ``zero``: of zeros, a zero ablation of a model whose
    output projections have no bias), every run weighed alike (or at ``nodes`` with
    ``weights``, shared by every group)."""
    nodes = nodes or [k / steps for k in range(1, steps + 1)]
    weights = weights or [1 / steps] * steps
    embed = model.hf.get_input_embeddings()
    with torch.no_grad():
        clean_e, corrupt_e = embed(clean_ids)[None], embed(corrupt_ids)[None]
    blocks, _ = _parts(model.hf)
    groups = [(blocks[0][0], "in")]
    for _, _, _, proj, _, mlp in blocks:
        groups += [(proj, "out"), (mlp, "out")]
    recorded = {}
    for name, x in (("clean", clean_e), ("bad", corrupt_e)):
        hooks = []
        for i, (module, side) in enumerate(groups):
            if side == "in":

                def keep(_m, args, kwargs, i=i, name=name):
                    recorded[name, i] = (args[0] if args else kwargs["hidden_states"]).clone()

                hooks.append(lambda m=module, k=keep: m.register_forward_pre_hook(
                    k, with_kwargs=True))  # fmt: skip
            else:

                def keep_out(_m, _a, output, i=i, name=name):
                    recorded[name, i] = (output[0] if isinstance(output, tuple) else output).clone()

                hooks.append(lambda m=module, k=keep_out: m.register_forward_hook(k))
        with torch.no_grad():
            _run(model, x, hooks)
    if zero:
        recorded.update(
            {key: torch.zeros_like(v) for key, v in recorded.items() if key[0] == "bad"}
        )
    points = []
    for i, (module, side) in enumerate(groups):
        for a, w in zip(nodes, weights, strict=True):
            mix = a * recorded["clean", i] + (1 - a) * recorded["bad", i]
            if side == "in":

                def put(_m, args, kwargs, mix=mix):
                    if args:
                        return (mix, *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": mix}

                hook = lambda m=module, h=put: m.register_forward_pre_hook(h, with_kwargs=True)  # noqa: E731
            else:

                def put_out(_m, _a, output, mix=mix):
                    return (mix, *output[1:]) if isinstance(output, tuple) else mix

                hook = lambda m=module, h=put_out: m.register_forward_hook(h)  # noqa: E731
            points.append((clean_e, [hook], w / len(groups)))
    return _naive_edges_at(model, clean_e, corrupt_e, targets, points, zero)


def _receivers(model):
    blocks, _ = _parts(model.hf)
    names = []
    for layer, (_, _, readers, _, _, _) in enumerate(blocks):
        for _, parts in readers:
            for part, count in parts:
                names += [f"a{layer}.h{h}<{part}>" for h in range(count)]
        names.append(f"m{layer}")
    return [*names, "logits"]


def _senders_before(receiver, heads, parallel):
    if receiver == "logits":
        return 10**9
    layer = int(receiver[1:].split(".")[0].split("<")[0])
    mlp_after_heads = receiver.startswith("m") and not parallel
    return 1 + layer * (heads + 1) + (heads if mlp_after_heads else 0)


def _compare(da, naive, atol=1e-9):
    assert set(map(str, da.receiver.values)) == {r for _, r in naive}
    checked = 0
    largest = max(np.abs(want).max() for want in naive.values())
    for (sender, receiver), want in naive.items():
        got = da.sel(sender=sender, receiver=receiver).values
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=atol * largest)
        checked += 1
    # every other entry is no edge: the receiver runs before the sender
    assert int(np.isfinite(da.values).sum()) == checked * da.sizes["target"]
    assert np.abs(np.array(list(naive.values()))).max() > 1e-3


def _ids(model, da, clean=CLEAN, corrupted=CORRUPTED, target=TARGET):
    tokens = ax.saliency(model, clean, target)
    good = torch.tensor(tokens.source_id.values[: len(tokens.source_id)])
    bad = ax.saliency(model, corrupted, target).source_id.values
    targets = list(zip(da.target.values.tolist(), da.target_id.values.tolist(), strict=True))
    return good, torch.tensor(bad), targets


@torch.no_grad()
def real_edges(model, da, clean, corrupted, target):
    """``[K, U, R]`` as ``da`` (an edge attribution patching result) orders them: each edge
    patched for real, the clean run with ``u(corrupted) - u(clean)`` added to ``v``'s input
    only, the objective (the logit) minus the clean run's; NaN where there is no edge
    (``benchmarks/edges.py`` ranks the estimates against these)."""
    good, bad, targets = _ids(model, da, clean, corrupted, target)
    embed = model.hf.get_input_embeddings()
    clean_e, corrupt_e = embed(good)[None], embed(bad)[None]
    before, after = _nodes(model, clean_e), _nodes(model, corrupt_e)
    base = _run(model, clean_e, [])

    def objective(logits):
        return np.array([float(logits[0, p - 1, i]) for p, i in targets])

    out = np.full((len(targets), da.sizes["sender"], da.sizes["receiver"]), np.nan)
    _, heads = _parts(model.hf)
    parallel = _parallel(model.hf)
    senders, receivers = list(da.sender.values), list(da.receiver.values)
    for r, receiver in enumerate(receivers):
        for u, sender in enumerate(senders[: _senders_before(receiver, heads, parallel)]):
            kept, shift = _shift(model, sender, after[sender] - before[sender], 1.0, receiver)
            patched = _run(model, clean_e, [*kept, *_edge_hook(model, receiver, shift)])
            out[:, u, r] = objective(patched) - objective(base)
    return out


# GPT-2's fused c_attn, Llama's grouped keys and values, Phi-3's fused qkv_proj, Qwen3's query
# and key norms, GPT-BigCode's multi-query c_attn (and without: each head's q, k, v side by
# side); parallel blocks: GPT-J (one norm, separate projections), GPT-NeoX (two norms, each
# head's side by side), Falcon-7B (one norm, multi-query) and Falcon-40B (two norms, groups)
@pytest.mark.parametrize(
    "arch",
    ["gpt2", "llama", "phi3", "qwen3", "gpt_bigcode", "gpt_bigcode-mha", "gptj", "pythia",
     "falcon", "falcon-40b", "opt", "opt-projected", "granite", "gemma2", "gemma3", "glm4",
     "vaultgemma", "bloom", "opt-post-ln", "olmo2", "exaone4", "olmoe", "cohere-qk",
     "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm_moe_dsa", "codegen", "olmo-clip"],
)  # fmt: skip
def test_eap_equals_patching_each_edge_to_first_order(edges_models, arch):
    model = edges_models[arch]
    da = ax.edge_attribution_patching(model, CLEAN, TARGET, **KW)
    assert da.dims == ("target", "sender", "receiver")
    clean, bad, targets = _ids(model, da)
    # BLOOM takes its softmax in float32 whatever the model's dtype (transformers and attrax
    # alike), and its derivative with it
    atol = 1e-7 if arch == "bloom" else 1e-9
    _compare(da, _naive_edges(model, clean, bad, targets, [1.0], [1.0]), atol)


@pytest.mark.parametrize(
    "arch",
    ["gpt2", "llama", "phi", "gemma2", "glm4", "opt-post-ln", "olmo2", "olmoe", "deepseek_v3"],
)
def test_eap_ig_averages_the_gradient_along_the_inputs_path(edges_models, arch):
    model = edges_models[arch]
    m = 3
    da = ax.edge_attribution_patching(model, CLEAN, TARGET, steps=m, **KW)
    clean, bad, targets = _ids(model, da)
    nodes = [k / m for k in range(m)]  # Hanna et al.'s: from the corrupted end, not the clean
    _compare(da, _naive_edges(model, clean, bad, targets, nodes, [1 / m] * m))
    eap = ax.edge_attribution_patching(model, CLEAN, TARGET, **KW)
    assert np.nanmax(np.abs(da.values - eap.values)) > 1e-3  # the path moves the gradients


@pytest.mark.parametrize(
    "arch",
    ["gpt2", "llama", "pythia", "gemma2", "olmo2", "opt", "opt-post-ln", "granite", "deepseek_v2"],
)
def test_eap_ig_over_activations_averages_over_each_node_groups_path(edges_models, arch):
    """MIB's EAP-IG-activations: one node group at a time between its corrupted and clean
    outputs, at ``k / steps`` for ``k = 1 .. steps``, a constant in that run; a GPT-NeoX's
    parallel blocks, Gemma 2's norms on the outputs, OLMo 2's query norms over all heads,
    OPT's MLP of two modules (its positions flattened), post-LN OPT's LayerNorms, Granite's
    residual scale."""
    model = edges_models[arch]
    da = ax.edge_attribution_patching(model, CLEAN, TARGET, steps=2, interpolate="activations",
                                      **KW)  # fmt: skip
    clean, bad, targets = _ids(model, da)
    _compare(da, _naive_over_activations(model, clean, bad, targets, 2))
    inputs = ax.edge_attribution_patching(model, CLEAN, TARGET, steps=2, **KW)
    assert np.nanmax(np.abs(da.values - inputs.values)) > 1e-3


def test_eap_ig_over_activations_weighs_each_node_as_its_quadrature_says(edges_models):
    """The trapezoid's nodes 0, 1/2, 1 weigh 1/4, 1/2, 1/4: a node paired with another's weight
    would not match; and its passes of 2 points, one target a backward, start inside a group."""
    model = edges_models["gpt2"]
    kw = {**KW, "steps": 3, "interpolate": "activations", "quadrature": "riemann_trapezoid"}
    da = ax.edge_attribution_patching(model, CLEAN, TARGET, **kw)
    clean, bad, targets = _ids(model, da)
    naive = _naive_over_activations(model, clean, bad, targets, 3, nodes=[0.0, 0.5, 1.0],
                                    weights=[0.25, 0.5, 0.25])  # fmt: skip
    _compare(da, naive)
    split = ax.edge_attribution_patching(model, CLEAN, TARGET, batch_size=2, chunk_size=1, **kw)
    np.testing.assert_allclose(split.values, da.values, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "olmo2", "deepseek_v3"])
def test_over_activations_batched_and_padded_equal_single(edges_models, arch):
    """Each example's node groups moved from its own corrupted run's outputs; OLMo 2's query
    and key norms over all heads taken at each example's own queries; a latent attention's
    code run at each example's own input, with its own mask and positions."""
    model = edges_models[arch]
    inputs, corrupted = [CLEAN, "The capital is"], [CORRUPTED, "A capital is"]
    for kw in ({"steps": 2, "interpolate": "activations"}, {}):
        batched = ax.edge_attribution_patching(model, inputs, [TARGET, " d"], corrupted=corrupted,
                                               objective="logit", **kw)  # fmt: skip
        for i in range(2):
            one = ax.edge_attribution_patching(model, inputs[i], [TARGET, " d"][i],
                                               corrupted=corrupted[i], objective="logit", **kw)  # fmt: skip
            got = batched.isel(example=i).dropna("target", how="all")
            np.testing.assert_allclose(got.values, one.values, rtol=1e-9, atol=1e-12)


def test_eap_ig_over_activations_under_a_zero_ablation(edges_models):
    """Each node group between zero and its clean output (Llama's projections have no bias:
    its heads at zero are its attention's output at zero); the senders' deltas the ablation's."""
    model = edges_models["llama"]
    assert model.hf.model.layers[0].self_attn.o_proj.bias is None
    kw = {"corrupted": ax.Ablation("zero"), "objective": "logit"}
    da = ax.edge_attribution_patching(model, CLEAN, TARGET, steps=2, interpolate="activations",
                                      **kw)  # fmt: skip
    clean, _, targets = _ids(model, da)
    _compare(da, _naive_over_activations(model, clean, clean, targets, 2, zero=True))


def _adds_up(summed, heads, mlp):
    """Each head's and MLP's edges summed over receivers (``summed``) equal attribution
    patching's estimates of it summed over positions (``heads``, ``mlp``)."""
    for layer in heads["layer"].values:
        for h in heads["head"].values:  # `.head` is a method
            np.testing.assert_allclose(summed.sel(sender=f"a{layer}.h{h}").values,
                                       heads.sel(layer=layer, head=h).values, rtol=1e-7,
                                       atol=1e-10)  # fmt: skip
        np.testing.assert_allclose(summed.sel(sender=f"m{layer}").values,
                                   mlp.sel(layer=layer).values, rtol=1e-7, atol=1e-10)  # fmt: skip


# --- identities and axioms -------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch",
    ["gpt2", "gpt_neo", "llama", "phi3", "qwen2", "qwen3", "mistral", "mixtral", "cohere",
     "pythia-sequential", "opt", "granite", "gemma2", "gemma3", "glm4", "vaultgemma", "olmo2",
     "exaone4", "olmoe", "deepseek_v2", "deepseek_v3"],
)  # fmt: skip
def test_a_senders_edges_add_up_to_its_attribution_patching_estimate(edges_models, arch):
    """The residual stream is a sum: the gradient at a sender's output is the sum of its
    readers' gradients, so its edges add up to AtP's node estimate (summed over positions)."""
    model = edges_models[arch]
    da = ax.edge_attribution_patching(model, CLEAN, TARGET, **KW)
    summed = da.sum("receiver", skipna=True)
    heads = ax.attribution_patching(model, CLEAN, TARGET, site="heads", **KW).sum("source")
    mlp = ax.attribution_patching(model, CLEAN, TARGET, site="mlp", **KW).sum("source")
    for layer in range(heads.sizes["layer"]):
        for h in range(heads.sizes["head"]):
            want = heads.sel(layer=layer, head=h).values
            np.testing.assert_allclose(summed.sel(sender=f"a{layer}.h{h}").values, want,
                                       rtol=1e-7, atol=1e-10)  # fmt: skip
        np.testing.assert_allclose(summed.sel(sender=f"m{layer}").values,
                                   mlp.sel(layer=layer).values, rtol=1e-7, atol=1e-10)  # fmt: skip
    assert np.abs(heads.values).max() > 1e-4


#: encoder classifiers of 3 layers of 4 heads
ENCODERS = {
    "modernbert": {"num_hidden_layers": 3, "num_attention_heads": 4},
    "bert": {"num_hidden_layers": 3, "num_attention_heads": 4},
    "distilbert": {"n_layers": 3, "n_heads": 4},
    # relative attention (c2p and p2c) through its own position projections, and DeBERTa-v3's
    # through the query and key projections (`share_att_key`)
    "deberta-v2": {"num_hidden_layers": 3, "num_attention_heads": 4},
    "deberta-v3": {"num_hidden_layers": 3, "num_attention_heads": 4, "share_att_key": True},
}


#: a text past ModernBERT's local window of 8 tokens, and its corrupted twin
ENCODER_TEXTS = (
    "the plot was good and the cast was fine and the end was too",
    "the story was good and the cast was fine and the end was too",
)


def encoder_classifier(arch: str) -> ax.Model:
    hf, tok = tiny_classifier(arch.replace("v3", "v2"), **ENCODERS[arch])
    return ax.load_model(full_double(hf), tokenizer=tok)


@pytest.mark.parametrize("arch", list(ENCODERS))
def test_an_encoder_classifiers_edges_equal_patching_each_edge_to_first_order(arch):
    """ModernBERT is a pre-norm encoder (its first attention norm an Identity; local attention
    on a window of 8 tokens beside global layers). BERT's and DistilBERT's blocks are
    post-norm: the loop moves a sender's output and runs every LayerNorm from there up to the
    receiver again on its own input plus the stream's move. Every edge into every receiver,
    each class a target; and EAP-IG at the loop's own nodes."""
    model = encoder_classifier(arch)
    tok = model.tokenizer
    text, bad = ENCODER_TEXTS
    ids = [torch.tensor(tok(t)["input_ids"]) for t in (text, bad)]
    assert len(ids[0]) == len(ids[1]) > 8  # beyond the local window
    for steps, nodes in ((None, [1.0]), (3, [0.0, 1 / 3, 2 / 3])):
        da = ax.edge_attribution_patching(model, text, [0, 2], corrupted=bad, objective="logit",
                                          steps=steps)  # fmt: skip
        assert da.dims == ("target", "sender", "receiver") and da.sizes["sender"] == 16
        weights = [1 / len(nodes)] * len(nodes)
        _compare(da, _naive_edges(model, *ids, [(None, 0), (None, 2)], nodes, weights))


@pytest.mark.parametrize("arch", ["bert", "distilbert", "deberta-v3"])
def test_a_post_norm_encoders_padded_batch_and_ablation(arch):
    """A padded batch of BERT inputs equals each alone (the LayerNorms' derivatives taken at
    each example's own inputs), and a mean ablation's edges add up to AtP's estimates."""
    model = encoder_classifier(arch)
    inputs = ["the plot was good", "the end was fine too"]
    bad = ["the story was good", "the cast was fine too"]
    batched = ax.edge_attribution_patching(model, inputs, [[0, 2], [0, 2]], corrupted=bad,
                                           objective="logit", steps=2)  # fmt: skip
    assert "example" in batched.dims
    for i in range(2):
        one = ax.edge_attribution_patching(model, inputs[i], [0, 2], corrupted=bad[i],
                                           objective="logit", steps=2)  # fmt: skip
        np.testing.assert_allclose(batched.isel(example=i).values, one.values, rtol=1e-9,
                                   atol=1e-12)  # fmt: skip
    kw = {"corrupted": ax.Ablation("mean"), "objective": "logit"}
    summed = ax.edge_attribution_patching(model, inputs[0], [0, 2], **kw).sum("receiver")
    heads = ax.attribution_patching(model, inputs[0], [0, 2], **kw).sum("source")
    mlp = ax.attribution_patching(model, inputs[0], [0, 2], site="mlp", **kw).sum("source")
    _adds_up(summed, heads, mlp)
    assert np.abs(heads.values).max() > 1e-4


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_decoder_only_classifiers_edges_add_up_to_its_estimates(arch):
    """The logits receiver is the score head's input: every class a target, every sender's
    edges adding up to its attribution patching estimate."""
    hf, tok = tiny_classifier(arch)
    model = ax.load_model(full_double(hf), tokenizer=tok)
    kw = {"corrupted": "a good dog", "objective": "logit"}
    da = ax.edge_attribution_patching(model, "a bad day", [0, 1], **kw)
    assert da.dims == ("target", "sender", "receiver")
    mlp = ax.attribution_patching(model, "a bad day", [0, 1], site="mlp", **kw).sum("source")
    summed = da.sum("receiver")
    for layer in range(mlp.sizes["layer"]):
        np.testing.assert_allclose(summed.sel(sender=f"m{layer}").values,
                                   mlp.sel(layer=layer).values, rtol=1e-7, atol=1e-10)  # fmt: skip
    assert np.abs(mlp.values).max() > 1e-6


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_ablated_edges_add_up_to_the_ablated_estimate(edges_models, arch, kind):
    model = edges_models[arch]
    kw = {"corrupted": ax.Ablation(kind), "objective": "logit"}
    summed = ax.edge_attribution_patching(model, CLEAN, TARGET, **kw).sum("receiver")
    heads = ax.attribution_patching(model, CLEAN, TARGET, site="heads", **kw).sum("source")
    mlp = ax.attribution_patching(model, CLEAN, TARGET, site="mlp", **kw).sum("source")
    _adds_up(summed, heads, mlp)
    assert np.abs(heads.values).max() > 1e-4


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_batched_and_padded_equal_single(edges_models, arch):
    model = edges_models[arch]
    inputs, corrupted = [CLEAN, "The capital is"], [CORRUPTED, "A capital is"]
    batched = ax.edge_attribution_patching(model, inputs, [TARGET, " d"], corrupted=corrupted,
                                           objective="logit")  # fmt: skip
    for i, (text, bad, target) in enumerate(zip(inputs, corrupted, [TARGET, " d"], strict=True)):
        one = ax.edge_attribution_patching(model, text, target, corrupted=bad, objective="logit")
        got = batched.isel(example=i).dropna("target", how="all")
        np.testing.assert_allclose(got.values, one.values, rtol=1e-9, atol=1e-12)


def test_a_budget_splits_the_passes_not_the_result():
    """Points a pass, targets a backward and senders a push through the norm: a GPT-2 of 4
    layers of 8 heads has 37 senders, pushed 17 at a time, and 3 targets here."""
    hf, tok = tiny_model("gpt2", n_layer=4, n_head=8)
    model = ax.load_model(full_double(hf), tokenizer=tok)
    _splits_and_adds_up(model, 4, 37)
    with pytest.raises(ax.OptionError, match="max_memory"):
        ax.edge_attribution_patching(model, CLEAN, TARGET, max_memory=1000, **KW, steps=4)


def _splits_and_adds_up(model, steps, senders):
    """EAP-IG with one point a pass and one target a backward equals it whole (3 targets), and
    EAP's pushed blocks of senders add up as one: each sender's edges, its AtP estimate."""
    kw = {**KW, "steps": steps}
    target = TARGET + " and more"
    whole = ax.edge_attribution_patching(model, CLEAN, target, **kw)
    assert whole.sizes["target"] > 2 and whole.sizes["sender"] == senders
    split = ax.edge_attribution_patching(model, CLEAN, target, batch_size=1, chunk_size=1, **kw)
    np.testing.assert_allclose(split.values, whole.values, rtol=1e-9, atol=1e-12)
    eap = ax.edge_attribution_patching(model, CLEAN, target, **KW).sum("receiver")
    heads = ax.attribution_patching(model, CLEAN, target, **KW).sum("source")
    mlp = ax.attribution_patching(model, CLEAN, target, site="mlp", **KW).sum("source")
    _adds_up(eap, heads, mlp)
    assert np.abs(heads.values).max() > 1e-4


def test_a_budget_splits_the_heads_behind_a_norm_on_their_output():
    """Gemma 2's heads reach the stream through the norm on the attention's output, pushed
    through it at each point: blocks of senders pushed at a time that cut a layer's heads and
    lie within them (3 layers of 16 heads: 52 senders, 10 a push), points a pass and targets a
    backward give the same edges, and they add up to AtP's estimates."""
    from tests.test_architectures import CONFIGS, built

    _, tok = tiny_model("llama")
    config = CONFIGS["gemma2"](len(tok))
    config.num_hidden_layers, config.num_attention_heads = 3, 16
    config.num_key_value_heads, config.head_dim = 8, 2
    config.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    hf = built(config, tok, attn_implementation="eager")
    with torch.no_grad():
        for module in hf.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.normal_(0.0, 0.3)
    model = ax.load_model(_large(full_double(hf)), tokenizer=tok)
    _splits_and_adds_up(model, 3, 52)


def test_llama_4s_flattened_experts_batched_equal_single():
    """Llama 4's mixture of experts returns its rows flattened, ``[B * L, H]``."""
    from tests.test_support import FAMILIES

    model = FAMILIES["Llama 4"]()
    inputs, bad = [CLEAN, "The capital is"], [CORRUPTED, "A capital is"]
    kw = {"objective": "logit"}
    both = ax.edge_attribution_patching(model, inputs, [TARGET, " d"], corrupted=bad, **kw)
    for i in range(2):
        one = ax.edge_attribution_patching(model, inputs[i], [TARGET, " d"][i], corrupted=bad[i],
                                           **kw)  # fmt: skip
        got = both.isel(example=i).dropna("target", how="all")
        np.testing.assert_allclose(got.values, one.values, rtol=1e-4, atol=1e-6)


def test_bfloat16_stays_near_float32():
    """A bfloat16 model's edges (float32 results) within a few percent of its float32 copy's,
    as the data model says of half precision."""
    hf, tok = tiny_model("llama")
    full = ax.edge_attribution_patching(ax.load_model(hf, tokenizer=tok), CLEAN, TARGET, **KW)
    hf, tok = tiny_model("llama")
    half = ax.load_model(hf.to(torch.bfloat16), tokenizer=tok)
    got = ax.edge_attribution_patching(half, CLEAN, TARGET, **KW)
    assert got.dtype == np.float32
    scale = np.nanmax(np.abs(full.values))
    assert np.nanmax(np.abs(got.values - full.values)) < 0.06 * scale


def test_the_labels(edges_models):
    model = edges_models["llama"]  # 4 query heads, 2 key/value heads
    da = ax.edge_attribution_patching(model, CLEAN, TARGET, **KW)
    assert list(da.sender.values[:6]) == ["input", "a0.h0", "a0.h1", "a0.h2", "a0.h3", "m0"]
    receivers = list(da.receiver.values)
    assert receivers[:9] == [*(f"a0.h{h}<q>" for h in range(4)), "a0.h0<k>", "a0.h1<k>",
                             "a0.h0<v>", "a0.h1<v>", "m0"]  # fmt: skip
    assert receivers[-1] == "logits"
    assert da.sel(sender="a0.h2").sender_layer == 0 and da.sel(sender="a0.h2").sender_head == 2
    assert str(da.sel(receiver="a1.h1<k>").receiver_input.values) == "k"
    # an edge into an earlier receiver is none: NaN
    assert np.isnan(da.sel(sender="m0", receiver="a0.h0<q>")).all()
    assert np.isnan(da.sel(sender="a0.h0", receiver="a0.h1<v>")).all()
    assert np.isfinite(da.sel(sender="a0.h0", receiver="m0")).all()
    assert da.attrs["method"] == "edge_attribution_patching"


# --- refusals --------------------------------------------------------------------------------


def test_blocks_the_edges_do_not_describe_are_refused():
    """A block with a norm on its MLP's output and none before its sublayers or on its
    attention's output has neither layout the edges know."""
    hf, tok = tiny_model("llama")
    model = ax.load_model(hf, tokenizer=tok)
    block = hf.model.layers[1]
    block.post_feedforward_layernorm = block.post_attention_layernorm
    del block.input_layernorm, block.post_attention_layernorm
    with pytest.raises(ax.ModelError, match="layer 1 is not a pre-norm block attrax knows"):
        ax.edge_attribution_patching(model, CLEAN, TARGET, **KW)


@pytest.mark.parametrize(("arch", "parallel"), [("pythia", True), ("pythia-sequential", False)])
def test_a_block_laid_out_otherwise_than_its_config_says_is_refused(edges_models, arch, parallel):
    """GPT-NeoX's blocks keep the layout they were built with: a config that says otherwise
    would cut the edges between a layer's heads and its MLP wrongly, and is refused."""
    model = edges_models[arch]
    config = model.hf.config
    config.use_parallel_residual = not parallel
    try:
        with pytest.raises(ax.ModelError, match="is not a residual block as the edges assume"):
            ax.edge_attribution_patching(model, CLEAN, TARGET, **KW)
    finally:
        config.use_parallel_residual = parallel


def test_a_parallel_blocks_mlp_reads_no_head_of_its_layer(edges_models):
    parallel = ax.edge_attribution_patching(edges_models["pythia"], CLEAN, TARGET, **KW)
    assert np.isnan(parallel.sel(sender="a0.h0", receiver="m0")).all()
    assert np.isfinite(parallel.sel(sender="a0.h0", receiver="m1")).all()
    assert np.isfinite(parallel.sel(sender="input", receiver="m0")).all()
    after = ax.edge_attribution_patching(edges_models["pythia-sequential"], CLEAN, TARGET, **KW)
    assert np.isfinite(after.sel(sender="a0.h0", receiver="m0")).all()
    # its heads' receivers: each head's query, key and value, cut side by side
    assert [str(r) for r in parallel.receiver.values[:3]] == ["a0.h0<q>", "a0.h1<q>", "a0.h2<q>"]


def test_a_residual_scale_is_refused_beside_a_huge_entry(edges_models):
    """Granite's blocks scale what each sublayer adds by the multiplier they were built with: a
    config that says another is refused, though one huge entry of the residual stream (as
    trained models have) dwarfs the difference."""
    hf = edges_models["granite"].hf
    tok = edges_models["granite"].tokenizer
    huge = ax.load_model(llama_like("granite", tok), tokenizer=tok)  # float32
    ids = tok(CLEAN)["input_ids"]
    with torch.no_grad():
        huge.hf.get_input_embeddings().weight[ids[0], 0] = 1e4 / hf.config.embedding_multiplier
    ax.edge_attribution_patching(huge, CLEAN, TARGET, **KW)  # as built: its scale accounted
    huge.hf.config.residual_multiplier = 1.0
    with pytest.raises(ax.ModelError, match="the second norm reads the input plus"):
        ax.edge_attribution_patching(huge, CLEAN, TARGET, **KW)


def test_a_norm_with_gains_per_head_that_mixes_the_heads_is_refused():
    """Cohere's query norm has gains ``[heads, head_dim]`` and norms each head alone; a
    LayerNorm over ``(heads, head_dim)`` has the same gains and norms them all at once: the
    clean run tells them apart."""

    def whole(heads, head_dim):
        return torch.nn.LayerNorm((heads, head_dim), bias=False)

    _, tok = tiny_model("llama")
    model = ax.load_model(_cohere_qk(tok, whole), tokenizer=tok)
    with pytest.raises(ax.ModelError, match="does not norm each head's vector alone"):
        ax.edge_attribution_patching(model, CLEAN, TARGET, **KW)


def test_weights_the_edges_do_not_account_for_are_refused():
    """A query norm over two heads' vectors at once (neither each head's nor all of them, as
    OLMo 2's) mixes the heads; an output gate reads the stream beside the projections."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf, tok = tiny_model("llama")
    attention = hf.model.layers[0].self_attn
    attention.q_norm = LlamaRMSNorm(2 * attention.head_dim)
    with pytest.raises(ax.ModelError, match="layer 0: its attention holds `q_norm`"):
        ax.edge_attribution_patching(ax.load_model(hf, tokenizer=tok), CLEAN, TARGET, **KW)
    hf, tok = tiny_model("llama")
    hf.model.layers[1].self_attn.g_proj = torch.nn.Linear(32, 32)
    with pytest.raises(ax.ModelError, match="layer 1: its attention holds `g_proj`"):
        ax.edge_attribution_patching(ax.load_model(hf, tokenizer=tok), CLEAN, TARGET, **KW)
    # a latent attention's receivers are its call's: a gate beside them (Dots3 Note's g_proj)
    # reads the stream too
    latent = _latent("deepseek_v3", tok)
    latent.model.layers[1].self_attn.g_proj = torch.nn.Linear(32, 4)
    with pytest.raises(ax.ModelError, match="layer 1: its attention holds `g_proj`"):
        ax.edge_attribution_patching(ax.load_model(latent, tokenizer=tok), CLEAN, TARGET, **KW)


def test_a_call_its_attentions_code_does_not_remake_is_refused(edges_models, monkeypatch):
    """Where the receivers are the attention call's (CodeGen's shards), the clean run checks the
    attention's code, run again on what it read, makes what its call was given: a call given
    another query (as a hook or state outside that code would make it) is refused."""
    from dataclasses import replace

    from attrax import _edges

    recorded = _edges.record_calls

    def moved(*args, **kwargs):
        state = recorded(*args, **kwargs)
        key = sorted(state.calls)[1]
        state.calls[key] = replace(state.calls[key], query=state.calls[key].query + 0.1)
        return state

    monkeypatch.setattr(_edges, "record_calls", moved)
    with pytest.raises(ax.ModelError, match="layer 1: its CodeGenAttention run again on what it "
                       "read does not make the query"):  # fmt: skip
        ax.edge_attribution_patching(edges_models["codegen"], CLEAN, TARGET, **KW)


def test_a_block_that_adds_no_sum_of_its_nodes_is_refused():
    """A BLOOM whose residual is its normed input (`apply_residual_connection_post_layernorm`)
    adds no sum of the nodes' outputs."""
    with pytest.raises(ax.ModelError, match="not a residual block as the edges assume"):
        ax.edge_attribution_patching(
            _bloom(apply_residual_connection_post_layernorm=True), CLEAN, TARGET, **KW
        )
    # BLOOM's exact tensor-parallel layers multiply slices of their weights, outside the modules
    # the edges hook: refused (its logits, too, are no projection attrax can read)
    with pytest.raises(ax.ModelError, match="BloomForCausalLM"):
        ax.edge_attribution_patching(
            _bloom(pretraining_tp=2, slow_but_exact=True), CLEAN, TARGET, **KW
        )


class _Scaled(torch.nn.Linear):
    """A Linear that computes otherwise than its weight says (as quantized ones do)."""

    def forward(self, x):
        return super().forward(x) * 2.0


@pytest.mark.parametrize("where", ["o_proj", "v_proj"])
def test_a_linear_that_computes_otherwise_is_refused(where):
    hf, tok = tiny_model("llama")
    attention = hf.model.layers[1].self_attn
    old = getattr(attention, where)
    new = _Scaled(old.in_features, old.out_features, bias=old.bias is not None)
    new.load_state_dict(old.state_dict())
    setattr(attention, where, new)
    with pytest.raises(ax.ModelError, match="layer 1"):
        ax.edge_attribution_patching(ax.load_model(hf, tokenizer=tok), CLEAN, TARGET, **KW)


def test_other_models_are_refused():
    # DeBERTa-v2 xlarge's convolution beside its first layer mixes tokens outside the nodes
    hf, tok = tiny_classifier("deberta-v2", conv_kernel_size=3)
    with pytest.raises(ax.ModelError, match=r"edge_attribution_patching: .* a convolution"):
        ax.edge_attribution_patching(ax.load_model(hf, tokenizer=tok), "a b", 1, corrupted="a c")
    hf, tok = tiny_model("t5")
    with pytest.raises(ax.ModelError, match="edge_attribution_patching"):
        ax.edge_attribution_patching(ax.load_model(hf, tokenizer=tok), "a b", " c", corrupted="a c")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"corrupted": None}, "`corrupted` is required"),
        ({"corrupted": "a b"}, "tokens"),
        ({"corrupted": CORRUPTED, "quadrature": "riemann_right"}, "`quadrature` applies with"),
        ({"corrupted": ax.Ablation("zero"), "steps": 3}, "`steps` 3"),
        ({"corrupted": CORRUPTED, "steps": 0}, "`steps`"),
        ({"corrupted": CORRUPTED, "attribute_target": True}, "attribute_target"),
        ({"corrupted": CORRUPTED, "interpolate": "activations"}, "`interpolate` 'activations'"),
        ({"corrupted": CORRUPTED, "steps": 2, "interpolate": "layers"}, "`interpolate`"),
    ],
)
def test_bad_options_are_clear_errors(edges_models, options, match):
    with pytest.raises((ax.OptionError, ax.InputError), match=match):
        ax.edge_attribution_patching(edges_models["gpt2"], CLEAN, TARGET, **options)


def test_the_cli_writes_the_edges(tmp_path, capsys):
    path = save_tiny_model("gpt2", tmp_path / "model")
    out = tmp_path / "edges.nc"
    code = main([
        "attribute", "--method", "edge_attribution_patching", "--model", str(path), "--input",
        CLEAN, "--target", TARGET, "-o", f"corrupted={json.dumps(CORRUPTED)}", "-o",
        "objective=logit", "--out", str(out),
    ])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed
    da = ax.load(out)
    assert da.dims == ("target", "sender", "receiver")
    # each target's largest edge, as the saved array ranks it
    first = da.isel(target=0).stack(edge=["sender", "receiver"]).dropna("edge")
    sender, receiver = first.sortby(abs(first), ascending=False).edge.values[0]
    assert f"{sender} → {receiver}: " in printed.out
    code = main([
        "attribute", "--method", "edge_attribution_patching", "--model", str(path), "--input",
        CLEAN, "--target", TARGET, "-o", f"corrupted={json.dumps(CORRUPTED)}", "--png",
        str(tmp_path / "a.png"),
    ])  # fmt: skip
    assert code == 2 and "no source" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def _supported() -> list[str]:
    from tests.test_support import _table

    columns, rows = _table()
    return [family for family, cells in rows.items() if cells[columns.index("EAP")] == "✓"]


@pytest.mark.parametrize("family", _supported())
def test_every_supported_rows_edges_add_up_to_its_estimates(family):
    """On every row docs/architectures.md marks ✓ (float32 tiny models, mixtures of experts
    and multi-query attention among them), each head's and MLP's edges add up to its AtP
    estimate summed over positions: a mislaid head, part or sender would not."""
    from tests.test_support import FAMILIES, _corrupted, _inputs

    model = FAMILIES[family]()
    given = {**_inputs(model), "corrupted": _corrupted(model), "objective": "logit"}
    summed = ax.edge_attribution_patching(model, **given).sum("receiver")
    heads = ax.attribution_patching(model, **given, site="heads").sum("source")
    mlp = ax.attribution_patching(model, **given, site="mlp").sum("source")
    want = np.concatenate([heads.values.reshape(*heads.shape[:-2], -1), mlp.values], -1)
    layers, per_layer = heads["layer"].values, heads["head"].values  # `.head` is a method
    names = [f"a{layer}.h{h}" for layer in layers for h in per_layer]
    got = summed.sel(sender=names + [f"m{layer}" for layer in mlp["layer"].values]).values
    scale = np.abs(want).max()
    assert scale > 1e-6
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize(
    ("family", "holds"),
    [("DiffLlama", "lambda_q1"), ("BitNet", "attn_sub_norm")],  # heads that are no slices
)
def test_attention_that_mixes_its_heads_is_refused(family, holds):
    """DiffLlama's differential heads and BitNet's norm over every head's output: the output
    projection reads no one slice per head, so no head is a sender; refused by the parameters."""
    import transformers as T

    _, tok = tiny_model("llama")
    config = getattr(T, f"{family}Config")(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = getattr(T, f"{family}ForCausalLM")(config).eval()
    model = ax.load_model(hf, tokenizer=tok)
    with pytest.raises(ax.ModelError, match=holds):
        ax.edge_attribution_patching(
            model, "The capital of France is", " Paris", corrupted="The capital of Spain is"
        )
