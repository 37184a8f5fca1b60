"""Component attributions: direct logit attribution, attribution and activation patching.

All read the model's own modules (attention heads, MLPs, residual stream). Direct logit
attribution knows GPT-2 (``Conv1D``, LayerNorm), Llama (``o_proj``, RMSNorm, RoPE, grouped
keys and values; Mistral, Qwen2, Qwen3, SmolLM3, Phi-3, Granite and the mixtures of experts of
``_arch.EXPERTS``), Gemma 2, Gemma 3 and OLMo 2 (norms on each attention's and MLP's output),
GPT-NeoX and pre-LN OPT, as causal LMs or as sequence classifiers whose ``score`` head reads the
final norm directly, and the pre-LN encoder-decoders T5, NLLB's M2M100, mBART and Pegasus (the
post-LN Marian and BART have no direct path); attribution and activation patching the stacks
:mod:`attrax._sites` finds: decoder-only models (GPT-2, Llama, Qwen2, Gemma, Phi-3, Pythia, OPT,
BLOOM, Falcon, Granite, the mixtures of experts), their classifiers, the encoder classifiers
(BERT and its kin, DistilBERT, ModernBERT), and Marian, BART and T5. Any other model is a
:class:`ModelError` naming its architecture.

* :func:`direct_logit_attribution` splits the residual stream the final norm reads into what each
  attention head (per source position, through its attention weights) and each MLP wrote, and
  projects every piece on the target's unembedding row with the final norm's scale held fixed:
  one eager forward, every target at once.
* :func:`activation_patching` patches for real: every (layer, position, head) a copy of the
  batch, the copies stacked in forwards within ``max_memory``, each replacing its one activation
  with the donor run's (noising: the corrupted run's into the clean one; denoising: back).
* :func:`attribution_patching` (AtP) estimates activation patching to first order: gradient times
  (corrupted - clean) activation, from one clean forward, one corrupted forward and one
  vectorized backward over targets, with zero probes on the chosen activations as the ``vjp``
  primals so that every layer and head comes out of that one backward. AtP*'s QK fix (queries
  and keys through their softmax, :mod:`attrax._heads`) and GradDrop (:mod:`attrax._drop`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import numpy as np
import torch
import xarray as xr

from . import _arch
from . import _validate as check
from ._attention import Selection, check_selection, selection_indices
from ._drop import Drop, averaged, dropping, pulled
from ._engine import DRAWS, Problem, vjp
from ._errors import InputError, ModelError, OptionError
from ._heads import (
    ATTENTION_INPUTS,
    Key,
    patch_attention_inputs,
    record_calls,
    replacing,
    stack_layers,
)
from ._inputs import Texts, contrast_batch, input_texts, padded_inputs, to_tensors
from ._memory import between_passes, full_precision, plan_forwards
from ._model import (
    Model,
    body,
    instance_attributes,
    norm_centers,
    norm_divisor,
    norm_gain,
    refuse_seq2seq_classifier,
)
from ._protocol import Call, Family
from ._sites import (
    NO_MLP,
    STACKS,
    Stack,
    decoder_blocks,
    encoder_decoder_stack,
    mlp_of,
    named,
    neuron_width,
    patch_stack,
    site_hook,
)

SITES = ("heads", "attention", "mlp", "neurons", "residual", *ATTENTION_INPUTS)

#: Direct logit attribution: one forward, the logit decomposed; no objective, nothing to plan.
COMPONENTS = Family(
    name="components",
    takes=("contrast", "positions", "max_new_tokens"),
    refuses={
        "objective": "direct logit attribution decomposes the logit (the target's unembedding "
        "row times the final norm's output), not an objective",
        "attribute_target": "direct logit attribution of an encoder-decoder covers both sides "
        "already (cross-attention heads on the encoder tokens, self-attention heads and MLPs on "
        "the decoder positions)",
        "chunk_size": "direct logit attribution runs one forward: there is no backward to chunk",
        "batch_size": "direct logit attribution runs one forward: there are no points to batch",
        "max_memory": "direct logit attribution runs one forward: there are no sizes to plan",
    },
)
#: Attribution patching: one clean and one corrupted forward, one vectorized backward.
PATCHING = Family(
    name="patching",
    differentiates=True,
    takes=("objective", "contrast", "positions", "chunk_size", "max_new_tokens", "max_memory"),
    refuses={
        "attribute_target": "attribution patching reports the positions of the stack it patches "
        "(an encoder-decoder's decoder and cross-attention heads live on the decoder positions: "
        "stack='decoder' / 'cross')",
        "batch_size": "attribution patching runs one clean and one corrupted forward: there are "
        "no points to batch",
    },
)


# the names architectures give the value projection inside their attention module (whose whole
# output is the values; GPT-2's fused c_attn is handled on its own)
_VALUE_PROJECTIONS = ("v_proj", "value", "v_lin", "v", "value_proj")


def value_projection(
    model: Model, attention: torch.nn.Module
) -> tuple[torch.nn.Module, slice | torch.Tensor]:
    """The module whose output holds ``attention``'s value vectors, and which of its output
    features they are, head by head: a slice, or their indices where a fused projection
    interleaves them with queries and keys (a ModelError where attrax finds none). Read its
    output through :func:`token_rows`."""
    # T5 records its sub-layer (T5LayerCrossAttention): the projections are one module down
    for owner in (attention, *attention.children()):
        for name in _VALUE_PROJECTIONS:
            module = getattr(owner, name, None)
            if isinstance(module, torch.nn.Module):
                return module, slice(None)
    latent = getattr(attention, "kv_b_proj", None)
    if isinstance(latent, torch.nn.Linear) and hasattr(attention, "v_head_dim"):
        # multi-head latent attention (DeepSeek V2, V3): each head's key part, then its value
        nope = _int_attribute(attention, "qk_nope_head_dim")
        d = _int_attribute(attention, "v_head_dim")
        heads = latent.out_features // (nope + d)
        within = torch.arange(nope, nope + d)
        return latent, (torch.arange(heads)[:, None] * (nope + d) + within).flatten()
    fused = getattr(attention, "c_attn", None)  # GPT-2: queries, keys, values in one projection
    if isinstance(fused, torch.nn.Module) and not getattr(attention, "is_cross_attention", False):
        width = int(getattr(attention, "split_size", model.hidden_size))
        if getattr(attention, "multi_query", None) is False:
            # GPT-BigCode without multi-query: each head's query, key and value side by side
            d = _int_attribute(attention, "head_dim")
            within = torch.arange(2 * d, 3 * d)
            return fused, (torch.arange(width // d)[:, None] * 3 * d + within).flatten()
        # GPT-BigCode's multi-query attention: one key and one value head after the queries
        kv = int(getattr(attention, "kv_dim", width))
        return fused, slice(width + kv, width + 2 * kv)
    config = model.hf.config
    kind = getattr(config, "model_type", None)
    heads = _arch.heads(config, "self") or 1
    head_dim = getattr(attention, "head_dim", None) or getattr(attention, "head_size", None)
    head_dim = int(head_dim or model.hidden_size // heads)
    # Phi-3's `qkv_proj`, ModernBERT's `Wqkv`: all queries, then keys, then values
    fused = getattr(attention, "qkv_proj", None) or getattr(attention, "Wqkv", None)
    shards = getattr(attention, "mp_num", None)
    if isinstance(fused, torch.nn.Linear) and isinstance(shards, int):
        # CodeGen: `mp_num` shards of [queries, values, keys], the heads split across them
        local = heads * head_dim // shards
        flat = torch.arange(heads * head_dim)
        return fused, (flat // local) * 3 * local + local + flat % local
    if isinstance(fused, torch.nn.Linear):
        kv = _arch.kv_heads(config)
        return fused, slice((heads + kv) * head_dim, None)
    fused = getattr(attention, "query_key_value", None)
    if isinstance(fused, torch.nn.Linear) and kind == "falcon":
        return fused, torch.tensor(_arch.falcon_values(config))
    if isinstance(fused, torch.nn.Linear) and kind in ("gpt_neox", "bloom", "persimmon"):
        # GPT-NeoX, BLOOM, Persimmon: each head's query, key and value side by side, values at 2d..3d
        within = torch.arange(2 * head_dim, 3 * head_dim)
        return fused, (torch.arange(heads)[:, None] * 3 * head_dim + within).flatten()
    raise ModelError(
        f"{model.name} ({kind}): attrax finds no value projection in "
        f"{type(attention).__name__} (looked for {', '.join(_VALUE_PROJECTIONS)}, c_attn, "
        "qkv_proj, and GPT-NeoX's query_key_value)"
    )


def _int_attribute(module: torch.nn.Module, name: str) -> int:
    """``int(module.<name>)``, a number the module keeps (torch types attributes Tensor | Module)."""
    return int(getattr(module, name))


def token_rows(output: torch.Tensor) -> torch.Tensor:
    """A value projection's output as ``[B, L, features]``: multi-head latent attention expands
    its latents viewed as one head, ``[B, 1, L, rank]``, so its output has that axis too."""
    return output.squeeze(1) if output.dim() == 4 else output


@dataclass(frozen=True)
class _Parts:
    """The modules of a supported architecture, layer by layer."""

    kind: str  # the config's model_type ("gpt2": a Conv1D output projection)
    blocks: list[torch.nn.Module]
    attentions: list[torch.nn.Module]
    # each attention's value projection and its value features (:func:`value_projection`)
    reads: list[tuple[torch.nn.Module, slice | torch.Tensor]]
    mlps: list[torch.nn.Module]  # OPT's: each block's `fc2`, whose output is the MLP's
    norm: torch.nn.Module
    heads: int
    head_dim: int
    # OPT's `project_out` (Linear, no bias) between the final norm and the head, or None
    readout: torch.nn.Module | None = None
    # Gemma 2's, 3's and OLMo 2's norms of each attention's and MLP's output, before the
    # residual adds it
    after_attention: list[torch.nn.Module] | None = None
    after_mlp: list[torch.nn.Module] | None = None

    @property
    def centered(self) -> bool:
        """Whether the final norm is a LayerNorm (centres), not an RMSNorm."""
        return norm_centers(self.norm)

    def output_projection(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer ``layer``'s output projection as ``W_O`` ``[heads, head_dim, hidden]`` (a head's
        output ``z_h`` writes ``z_h @ W_O[h]``) and its bias (None when it has none)."""
        attention = self.attentions[layer]
        projection: torch.nn.Module | None
        if self.kind == "gpt2":
            projection = attention.get_submodule("c_proj")  # Conv1D: out = z @ weight + bias
            weight = cast(torch.Tensor, projection.weight)
        else:  # Linear: out = z @ weight.T (+ bias); GPT-NeoX's and Phi's `dense`
            projection = named(attention, ("o_proj", "out_proj", "dense", "c_proj"))
            assert projection is not None, type(attention).__name__
            weight = cast(torch.Tensor, projection.weight).T
        bias = cast("torch.Tensor | None", projection.bias)
        return weight.reshape(self.heads, self.head_dim, -1), bias

    def value_module(self, layer: int) -> torch.nn.Module:
        """The module whose output holds layer ``layer``'s value vectors (:func:`value_projection`)."""
        return self.reads[layer][0]

    def values(self, layer: int, output: torch.Tensor) -> torch.Tensor:
        """Value vectors ``[B, L, heads, head_dim]`` from :meth:`value_module`'s output, key-value
        heads repeated for the query heads they serve."""
        features = self.reads[layer][1]
        output = token_rows(output)
        if isinstance(features, torch.Tensor):  # a fused projection's interleaved values
            output = output.index_select(-1, features.to(output.device))
        else:
            output = output[..., features]
        v = output.unflatten(-1, (-1, self.head_dim))
        return v.repeat_interleave(self.heads // v.shape[-2], dim=-2)

    def norm_scale(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm's divisor at residuals ``x`` ``[..., H]``: LayerNorm's standard
        deviation, RMSNorm's root mean square (each with its epsilon)."""
        return norm_divisor(self.norm, x, self.centered)


# Llama's layout (self_attn with v_proj / o_proj, mlp, RMSNorm; residual adds around both):
# Mistral's too, Qwen2's, whose v_proj has a bias (in the values, so in each head's share),
# Qwen3's (its query and key norms do not touch the values), SmolLM3's (RoPE in some layers
# only: queries and keys), and Phi-3's, whose values come out of one qkv_proj after the queries
# and keys, Granite's (constant factors on what each block adds and on the logits), and the
# mixtures of experts', whose routed MLP's output is what the block adds
_LLAMA_LIKE = (
    "llama",
    "mistral",
    "gemma",  # its norms scale by 1 + weight (`norm_gain`)
    "vaultgemma",  # Gemma 2's without its norms after attention and MLP
    "qwen2",
    "qwen3",
    "smollm3",
    "phi3",
    "granite",
    "cwm",  # local layers
    "seed_oss",  # biased projections
    "ernie4_5",  # RoPE on interleaved pairs
    "helium",  # RoPE on interleaved pairs
    "hunyuan_v1_dense",  # query and key norms after RoPE
    "glm",  # a fused gate/up projection, RoPE on interleaved pairs of half of each head
    "arcee",  # an MLP without a gate: down(relu(up(x)) ** 2)
    "nemotron",  # Arcee's MLP, LayerNorms with gain 1 + weight, RoPE on part of each head
    "youtu",  # multi-head latent attention (values in kv_b_proj), dense MLPs
    "llama4_text",  # its MLP `feed_forward`, experts in some layers; NoPE and chunked layers
    *_arch.EXPERTS,
    "starcoder2",  # LayerNorms and biases
    "olmo",  # LayerNorms without weights
    "cohere",  # attention and MLP in parallel, LayerNorms without biases, scaled logits
    "cohere2",  # Cohere's, with local layers
    "ministral3",  # Mistral's, its queries scaled by a constant of their position
    "stablelm",  # LayerNorms, attention and MLP in sequence or in parallel
)
# attention and MLP in parallel on one LayerNorm (Falcon's: one or two), both added to the
# stream: the same sum
_PARALLEL = ("gptj", "codegen", "phi", "falcon")
# GPT-NeoX's per-head fused query_key_value and LayerNorms; its attention and MLP modules add the
# residual stream themselves (what the MLP adds: `dense_4h_to_h`'s output, see mlp_of)
_BLOOM = ("bloom",)
# GPT-2's blocks in Linear layers (multi-query attention in GPT-BigCode)
_GPT2_LIKE = ("gpt_neo", "gpt_bigcode")
# where each layout keeps its blocks, each block its attention (a dotted path) and the model
# its final norm; any other: Llama's `layers`, `self_attn`, `norm`
_LAYOUTS = {
    "gpt2": ("h", "attn", "ln_f"),
    "gpt_neo": ("h", "attn.attention", "ln_f"),  # its attention module wrapped in another
    "gpt_bigcode": ("h", "attn", "ln_f"),
    "gptj": ("h", "attn", "ln_f"),
    "codegen": ("h", "attn", "ln_f"),
    "falcon": ("h", "self_attention", "ln_f"),
    "bloom": ("h", "self_attention", "ln_f"),
    "phi": ("layers", "self_attn", "final_layernorm"),
    "gpt_neox": ("layers", "attention", "final_layer_norm"),
    "persimmon": ("layers", "self_attn", "final_layernorm"),  # GPT-NeoX's sequential blocks
    "opt": ("layers", "self_attn", "final_layer_norm"),  # in its `decoder`
    "biogpt": ("layers", "self_attn", "layer_norm"),  # OPT's pre-LN blocks
}


def _parts(model: Model, method: str) -> _Parts:
    """The architecture's modules, or a ModelError naming it."""
    hf = model.hf
    kind = getattr(hf.config, "model_type", None)
    name = f"{type(hf).__name__} (model_type {kind!r})"
    if model.is_encoder_decoder:
        raise ModelError(
            f"{method} decomposes decoder-only models (GPT-2, Llama); {name} is an "
            "encoder-decoder, whose decoder also reads the encoder through cross-attention"
        )
    known: tuple[str, ...] = ("gpt2", *_GPT2_LIKE, "gpt_neox", "persimmon", "opt", "biogpt")
    known += (*_PARALLEL, *_BLOOM, *_LLAMA_LIKE, *_arch.SANDWICH)
    if kind not in known:
        raise ModelError(
            f"{method} has no rule for {name}: it knows the model types {', '.join(known)}, as "
            "causal LMs or sequence classifiers (GPT2ForSequenceClassification, "
            "LlamaForSequenceClassification...)"
        )
    if kind == "opt" and not (
        hf.config.do_layer_norm_before
        and body(hf).get_submodule("decoder").final_layer_norm is not None
    ):
        raise ModelError(
            f"{method}: {name} normalises after each block (OPT-350m's layout): no final norm "
            "reads the residual stream that the blocks write into"
        )
    if kind == "bloom" and hf.config.apply_residual_connection_post_layernorm:
        raise ModelError(
            f"{method}: {name} carries each block's normed input in its residual stream "
            "(apply_residual_connection_post_layernorm): the stream is no sum of what the "
            "blocks wrote"
        )
    if model.task == "token-classification" and method == "direct_logit_attribution":
        raise ModelError(
            f"{method} reads a causal LM's head or a sequence classifier's `score` head; {name} "
            "is a token classifier"
        )
    base = body(hf)
    config = hf.config
    readout = None
    stack, attention, final = _LAYOUTS.get(kind, ("layers", "self_attn", "norm"))
    if kind == "opt":  # its layers in its `decoder`; the head reads its `project_out` (or None)
        base = base.get_submodule("decoder")
        readout = named(base, ("project_out",))
    blocks = list(getattr(base, stack))
    attentions = [b.get_submodule(attention) for b in blocks]
    # OPT's MLP is no module: fc2 writes its output
    mlps = [m for m in map(mlp_of, blocks) if m is not None]
    if len(mlps) != len(blocks):
        raise ModelError(f"{method}: {name}'s MLP output is not one module's ({NO_MLP})")
    norm = getattr(base, final)
    heads = _arch.heads(config, "self") or 1
    # a value head's width: multi-head latent attention's differs from its queries' and keys'
    head_dim = getattr(attentions[0], "v_head_dim", None) or getattr(
        attentions[0], "head_dim", None
    )
    head_dim = head_dim or config.hidden_size // heads
    after_attention = after_mlp = None
    if kind in _arch.SANDWICH:
        after_attention = [_arch.sandwich_norms(b)[0] for b in blocks]
        after_mlp = [_arch.sandwich_norms(b)[1] for b in blocks]
    reads = [value_projection(model, module) for module in attentions]
    return _Parts(
        kind,
        blocks,
        attentions,
        reads,
        mlps,
        norm,
        heads,
        head_dim,
        readout,
        after_attention,
        after_mlp,
    )


def _readout(model: Model, method: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows the final norm's output is read with: the LM head's unembedding ``[V, H]`` or a
    sequence classifier's ``score`` ``[classes, H]``, and their bias."""
    head = model._head if model.task == "generation" else model._score
    weight = getattr(head, "weight", None)
    if head is None or not isinstance(weight, torch.Tensor):
        raise ModelError(
            f"{method}: {type(model.hf).__name__} has no linear head reading the final norm "
            "directly (a causal LM's head or a sequence classifier's `score`)"
        )
    return weight, getattr(head, "bias", None)


@contextlib.contextmanager
def _hooks(*handles: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- direct logit attribution ----------------------------------------------------------------


@COMPONENTS.method(layers=check_selection, heads=check_selection)
def direct_logit_attribution(
    call: Call, *, layers: Selection = None, heads: Selection = None
) -> xr.DataArray:
    """Direct logit attribution: what each attention head, per source position, and each MLP
    writes straight into the target's logit.

    The final norm reads the residual stream ``x`` at the position that predicts the target:
    ``logit = gamma * (x - mean(x)) / sigma . W_U[target]`` (LayerNorm; RMSNorm has no centering
    and divides by the root mean square). Holding ``sigma`` at its value for this input (the
    standard approximation: the only non-linear term), the logit is linear in ``x``, and ``x`` is
    the sum of what every component wrote. Head ``h`` of layer ``l`` writes ``sum_j A[h, i, j] *
    (v_j W_O^h)`` at position ``i``: source ``j`` gets ``A[h, i, j] * (v_j W_O^h) . u`` (the value
    bias rides along in ``v_j``). Each MLP writes at ``i`` itself: its share sits on ``source = i``
    (the position that predicts the target). ``contrast=`` takes ``W_U[target] - W_U[contrast]``.

    The whole logit is the sum over ``source``, ``layer`` and ``head`` (MLP included) plus the
    terms no head or MLP owns: the token and position embeddings, each layer's output-projection
    bias (GPT-2's ``c_proj``), the final norm's bias and the head's bias, all projected the same
    way. The final-norm centering is exact, not an approximation (it is linear).

    T5 encoder-decoders: the decoder's residual stream, with its cross-attention heads on the
    encoder tokens (``side="source"`` of the ``(side, position)`` source index) and its
    self-attention heads and MLPs on the decoder positions (``side="target"``); the output
    scale ``d_model ** -0.5`` rides in the direction. Post-LN Marian and BART are refused.

    Arguments:
        model, inputs, targets, contrast, positions, max_new_tokens: as :func:`attrax.saliency`.
        layers, heads: which layers / heads to keep (as :func:`attrax.attention`).

    Returns:
        DataArray ``([example,] target, source, layer, head)`` of logit shares. The ``head``
        dim holds the chosen heads and then the MLP at ``head = -1``; the ``component``
        coordinate along ``head`` says ``"attention"`` or ``"mlp"``.

    >>> import attrax as ax
    >>> da = ax.direct_logit_attribution(ax.load_model(), "1 2 3 =", " 3 2 1")
    >>> da.dims
    ('target', 'source', 'layer', 'head')
    >>> da.component.values[-2:].tolist()
    ['attention', 'mlp']
    """
    model = call.model
    method = "direct_logit_attribution"
    if model.is_encoder_decoder:
        return _encoder_decoder_dla(call, layers, heads)
    parts = _parts(model, method)
    unembed, _ = _readout(model, method)
    chosen_layers = selection_indices(layers, len(parts.blocks), "layers", "layers")
    chosen_heads = selection_indices(heads, parts.heads, "heads", "heads per layer")
    t = to_tensors(call.batch, model)
    rows = torch.arange(t.index.shape[0], device=t.index.device)[:, None]
    # u = gamma * W_U[target] (- W_U[contrast]), centered for LayerNorm; 1 / sigma comes later
    direction = unembed[t.target_ids]
    if t.contrast_ids is not None:
        direction = direction - unembed[t.contrast_ids]
    if parts.readout is not None:  # OPT's project_out: the head reads W x, so x is read by W^T
        readout = cast(torch.Tensor, parts.readout.weight)
        direction = full_precision(direction) @ full_precision(readout)
    u = full_precision(direction) * full_precision(norm_gain(parts.norm))
    if parts.centered:
        u = u - u.mean(-1, keepdim=True)
    # Granite scales what each block adds (heads and MLPs alike) and its LM head's logits
    u = u * _arch.branch_scale(model.hf.config)
    if model.task == "generation":
        u = u * _arch.logit_scale(model.hf.config)
    length = t.ids.shape[1]
    n_layers = len(parts.blocks)
    # each chosen layer's value vectors until its attention map, and the final norm's input
    layer_values: list[torch.Tensor | None] = [None] * n_layers
    found: dict[str, torch.Tensor] = {}
    heads_out: dict[int, torch.Tensor] = {}
    mlps_out: dict[int, torch.Tensor] = {}
    # Gemma 2 and 3: 1 / the divisor of the norm on each attention's output, at the targets
    attention_scale: dict[int, torch.Tensor] = {}
    order = iter(range(n_layers))

    def on_values(layer: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> None:
            if layer in chosen_layers:
                layer_values[layer] = parts.values(layer, output)

        return hook

    def on_mlp(layer: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            if isinstance(output, tuple):  # GPT-OSS's MLP also returns its routing weights
                output = output[0]
            if layer in chosen_layers:  # [B, K]: the MLP's output at each target's position
                # OPT's fc2 runs on [B * L, H]
                at = full_precision(output.reshape(*t.ids.shape, -1)[rows, t.index])
                mlps_out[layer] = torch.einsum("bkh,bkh->bk", at, u)

        return hook

    def on_map(_stack: str, weights: torch.Tensor) -> None:
        layer = next(order)
        if layer not in chosen_layers:
            return
        values = layer_values[layer]
        assert values is not None  # the value projection runs before the attention's map
        v = full_precision(values)[..., chosen_heads, :]  # [B, J, h, d]
        w_o, _ = parts.output_projection(layer)
        w_o = full_precision(w_o[chosen_heads])  # [h, d, H]
        # the norm on the attention's output (Gemma): its gain here, its divisor once it has run
        after = parts.after_attention
        gained = u if after is None else u * full_precision(norm_gain(after[layer]))
        # every target, head and source in two contractions: (v_j W_O^h) . u_k, then A[h, i_k, j]
        r = torch.einsum("hdx,bkx->bkhd", w_o, gained)
        vu = torch.einsum("bjhd,bkhd->bkjh", v, r)
        a = full_precision(weights[:, chosen_heads].permute(0, 2, 3, 1)[rows, t.index])
        heads_out[layer] = a * vu  # [B, K, J, h]
        layer_values[layer] = None

    def on_final(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        found["final"] = args[0][rows, t.index]

    def on_attention_norm(layer: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            if layer in chosen_layers:
                divisor = norm_divisor(module, args[0][rows, t.index], centered=False)
                attention_scale[layer] = 1.0 / divisor.to(u.dtype)

        return hook

    handles = [parts.value_module(i).register_forward_hook(on_values(i)) for i in range(n_layers)]
    # what each MLP writes: its output, or (Gemma) its norm's output
    writes = parts.mlps if parts.after_mlp is None else parts.after_mlp
    handles += [writes[i].register_forward_hook(on_mlp(i)) for i in range(n_layers)]
    if parts.after_attention is not None:
        handles += [
            norm.register_forward_pre_hook(on_attention_norm(i))
            for i, norm in enumerate(parts.after_attention)
        ]
    handles.append(parts.norm.register_forward_pre_hook(on_final))
    with _hooks(*handles):
        model.stream_attention(t, on_map)
    if len(heads_out) != len(chosen_layers) or "final" not in found:
        raise ModelError(f"{method}: {type(model.hf).__name__} did not run the modules it names")
    scale = 1.0 / parts.norm_scale(found["final"]).to(u.dtype)  # [B, K]
    at_index = torch.nn.functional.one_hot(t.index, length).to(u.dtype)  # [B, K, J]
    values = []
    for layer in chosen_layers:  # assembling the kept layers' results, not a computation
        mlp = at_index * mlps_out[layer][..., None]  # the MLP writes at the target's position
        shares = heads_out[layer]
        if parts.after_attention is not None:
            shares = shares * attention_scale[layer][:, :, None, None]
        values.append(torch.cat([shares, mlp[..., None]], dim=-1))
    stacked = torch.stack(values, dim=-2) * scale[:, :, None, None, None]
    da = call.label(
        [stacked],
        trailing=("layer", "head"),
        trailing_coords={"layer": chosen_layers, "head": [*chosen_heads, -1]},
    )
    component = ["attention"] * len(chosen_heads) + ["mlp"]
    return softcapped(da.assign_coords(component=("head", component)), model)


def softcapped(da: xr.DataArray, model: Model) -> xr.DataArray:
    """``da`` with a ``logit_softcap`` attr where the model soft-caps its logits (Gemma 2): the
    decomposition is of the logit ``z`` before the cap ``c``, the model's being
    ``c * tanh(z / c)`` (no linear readout of the residual stream decomposes that)."""
    cap = getattr(model.hf.config, "final_logit_softcapping", None)
    return da.assign_attrs(logit_softcap=float(cap)) if cap else da


@dataclass
class _Decoder:
    """An encoder-decoder's decoder as direct logit attribution reads it: per layer its self- and
    cross-attention (value projection, output projection ``[H, heads * d]``) and the module whose
    output its MLP adds; the final norm, whether it centers (LayerNorm), the factor on its output
    (T5's tied embeddings) and the head's bias."""

    values: dict[str, list[torch.nn.Module]]
    outputs: dict[str, list[torch.nn.Module]]
    mlps: list[torch.nn.Module]
    norm: torch.nn.Module
    centered: bool
    heads: int
    head_dim: int
    scale: float


def _decoder(model: Model, method: str) -> _Decoder:
    """T5's decoder (``block[i].layer``: RMSNorm sub-layers, no biases) or the pre-norm BART
    layout's (NLLB's M2M100, mBART, Pegasus: LayerNorm before each sub-layer, one closing the
    stack, biases); a ModelError for the post-norm Marian and BART and anything else."""
    hf = model.hf
    kind = getattr(hf.config, "model_type", None)
    name = f"{type(hf).__name__} (model_type {kind!r})"
    decoder = hf.get_decoder()
    if kind in _arch.PRE_NORM_SEQ2SEQ:
        blocks = list(decoder.layers)
        selfs, crosses = [b.self_attn for b in blocks], [b.encoder_attn for b in blocks]
        heads = selfs[0].num_heads if hasattr(selfs[0], "num_heads") else None
        heads = heads or _arch.heads(hf.config, "cross") or 1
        return _Decoder(
            {"decoder": [a.v_proj for a in selfs], "cross": [a.v_proj for a in crosses]},
            {"decoder": [a.out_proj for a in selfs], "cross": [a.out_proj for a in crosses]},
            [b.fc2 for b in blocks],  # fc1, the activation and fc2 are inline: fc2 writes
            decoder.layer_norm,
            True,
            heads,
            hf.config.d_model // heads,
            1.0,
        )
    blocks = list(getattr(decoder, "block", None) or [])
    norm = getattr(decoder, "final_layer_norm", None)
    if not blocks or not hasattr(blocks[0], "layer") or norm is None:
        layout = list(getattr(decoder, "layers", None) or [])
        post_norm = bool(layout) and hasattr(layout[0], "final_layer_norm")
        if post_norm and kind in ("marian", "bart"):
            raise ModelError(
                f"{method} has no direct path to decompose in {name}: a post-LN "
                "encoder-decoder (each decoder layer ends in LayerNorms, self_attn_layer_norm, "
                "encoder_attn_layer_norm and final_layer_norm, applied to the residual stream "
                "itself), so no head's or MLP's output reaches the logits through one final "
                "norm: every later LayerNorm rescales and recenters it. T5 and the pre-LN "
                "M2M100 (NLLB), mBART and Pegasus are supported"
            )
        raise ModelError(
            f"{method} has no rule for {name}: among encoder-decoders it knows T5 and the "
            "pre-LN M2M100 (NLLB), mBART and Pegasus (Marian and BART are post-LN and have no "
            "direct path)"
        )
    selfs = [getattr(b.layer[0], "SelfAttention", None) for b in blocks]
    crosses = [
        getattr(b.layer[1], "EncDecAttention", None) if len(b.layer) > 2 else None for b in blocks
    ]
    mlps = [m for b in blocks if (m := getattr(b.layer[-1], "DenseReluDense", None)) is not None]
    known = all(
        all(hasattr(a, key) for key in ("v", "o", "n_heads", "key_value_proj_dim"))
        for a in [*selfs, *crosses]
    )
    if not known or len(mlps) != len(blocks) or not hasattr(norm, "variance_epsilon"):
        raise ModelError(
            f"{method} has no rule for {name}: its decoder blocks are not T5's (SelfAttention, "
            "EncDecAttention with v / o, DenseReluDense, an RMS final_layer_norm)"
        )
    # T5 scales the decoder's output when its embeddings are tied (d_model ** -0.5)
    tied = getattr(hf.config, "scale_decoder_outputs", False)
    return _Decoder(
        {"decoder": [a.v for a in selfs], "cross": [a.v for a in crosses]},
        {"decoder": [a.o for a in selfs], "cross": [a.o for a in crosses]},
        mlps,
        norm,
        False,
        selfs[0].n_heads,
        selfs[0].key_value_proj_dim,
        hf.config.d_model**-0.5 if tied else 1.0,
    )


def _encoder_decoder_dla(call: Call, layers: Selection, heads: Selection) -> xr.DataArray:
    """Direct logit attribution of a pre-norm decoder (T5, NLLB's M2M100, mBART, Pegasus): the
    decoder's self-attention heads over the decoder positions, its cross-attention heads over
    the encoder tokens and its MLPs, each projected on ``gamma * W_U[target] * scale / sigma``
    (centered where the final norm is a LayerNorm)."""
    model = call.model
    method = "direct_logit_attribution"
    parts = _decoder(model, method)
    unembed, _ = _readout(model, method)  # a head bias (mBART's) is owned by no component
    n_layers, n_heads, head_dim = len(parts.mlps), parts.heads, parts.head_dim
    chosen_layers = selection_indices(layers, n_layers, "layers", "layers")
    chosen_heads = selection_indices(heads, n_heads, "heads", "heads per layer")
    t = to_tensors(call.batch, model)
    rows = torch.arange(t.index.shape[0], device=t.index.device)[:, None]
    direction = unembed[t.target_ids]
    if t.contrast_ids is not None:
        direction = direction - unembed[t.contrast_ids]
    u = full_precision(direction) * full_precision(norm_gain(parts.norm)) * parts.scale
    if parts.centered:
        u = u - u.mean(-1, keepdim=True)
    norm = parts.norm
    values: dict[tuple[str, int], torch.Tensor] = {}
    out: dict[tuple[str, int], torch.Tensor] = {}
    mlps_out: dict[int, torch.Tensor] = {}
    count = {"decoder": 0, "cross": 0}
    found: dict[str, torch.Tensor] = {}

    def on_values(key: tuple[str, int]) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> None:
            if key[1] in chosen_layers:  # [B, J, heads, d]
                values[key] = output.unflatten(-1, (n_heads, head_dim))

        return hook

    def on_mlp(layer: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            if isinstance(output, tuple):  # GPT-OSS's MLP also returns its routing weights
                output = output[0]
            if layer in chosen_layers:  # [B, K]: the MLP's output at each target's position
                mlps_out[layer] = torch.einsum(
                    "bkh,bkh->bk", full_precision(output[rows, t.index]), u
                )

        return hook

    def on_map(stack: str, weights: torch.Tensor) -> None:
        if stack not in count:  # the encoder's own maps: nothing of it writes to the decoder
            return
        layer = count[stack]
        count[stack] += 1
        if layer not in chosen_layers:
            return
        v = full_precision(values.pop((stack, layer)))[..., chosen_heads, :]  # [B, J, h, d]
        projection = cast(torch.Tensor, parts.outputs[stack][layer].weight)  # [H, heads * d]
        w_o = projection.T.reshape(n_heads, head_dim, -1)[chosen_heads]  # [h, d, H]
        r = torch.einsum("hdx,bkx->bkhd", full_precision(w_o), u)
        vu = torch.einsum("bjhd,bkhd->bkjh", v, r)
        a = full_precision(weights[:, chosen_heads].permute(0, 2, 3, 1)[rows, t.index])
        out[(stack, layer)] = a * vu  # [B, K, J, h]

    def on_final(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        found["final"] = args[0][rows, t.index]

    handles = []
    for layer in range(n_layers):
        for stack in ("decoder", "cross"):
            module = parts.values[stack][layer]
            handles.append(module.register_forward_hook(on_values((stack, layer))))
        handles.append(parts.mlps[layer].register_forward_hook(on_mlp(layer)))
    handles.append(norm.register_forward_pre_hook(on_final))
    with _hooks(*handles):
        model.stream_attention(t, on_map)
    if len(out) != 2 * len(chosen_layers) or "final" not in found:
        raise ModelError(f"{method}: {type(model.hf).__name__} did not run the modules it names")
    x = full_precision(found["final"])
    scale = 1.0 / norm_divisor(norm, x, centered=parts.centered).to(u.dtype)  # [B, K]
    assert t.decoder_ids is not None  # an encoder-decoder's batch
    at_index = torch.nn.functional.one_hot(t.index, t.decoder_ids.shape[1]).to(u.dtype)
    sources, targets = [], []
    for layer in chosen_layers:  # assembling the kept layers' results, not a computation
        cross = out[("cross", layer)]
        sources.append(torch.cat([cross, torch.zeros_like(cross[..., :1])], dim=-1))
        mlp = at_index * mlps_out[layer][..., None]  # the MLP writes at the target's position
        targets.append(torch.cat([out[("decoder", layer)], mlp[..., None]], dim=-1))
    per_side = [
        torch.stack(side, dim=-2) * scale[:, :, None, None, None] for side in (sources, targets)
    ]
    da = call.label(
        per_side,
        trailing=("layer", "head"),
        trailing_coords={"layer": chosen_layers, "head": [*chosen_heads, -1]},
    )
    component = ["attention"] * len(chosen_heads) + ["mlp"]
    return da.assign_coords(component=("head", component))


# --- attribution patching --------------------------------------------------------------------


def _site(value: object, name: str) -> None:
    if value not in SITES:
        raise OptionError(f"`{name}` must be one of {SITES}, got {value!r}")


def _stack(value: object, name: str) -> None:
    if value is not None and value not in STACKS:
        raise OptionError(f"`{name}` must be None or one of {STACKS}, got {value!r}")


def _qk_fix(value: object, name: str) -> None:
    if value is not None and not isinstance(value, bool):
        raise OptionError(f"`{name}` must be None, True or False, got {value!r}")


def _corrupted(value: object, name: str) -> None:
    if value is None:
        raise OptionError(
            f"`{name}` is required: the corrupted input(s), each with as many tokens as its "
            "clean input (a string, or a list aligned with `inputs`), or an ax.Ablation"
        )
    if isinstance(value, Ablation):
        return
    if isinstance(value, GaussianNoise):
        raise OptionError(
            f"`{name}`: Gaussian noise (causal tracing) is activation patching's corruption, "
            "whose effects it averages over the noise samples; attribution patching takes a "
            "corrupted text (a string, or a list aligned with `inputs`) or an ax.Ablation"
        )
    if not isinstance(value, (str, list, tuple)):
        raise OptionError(
            f"`{name}` must be a string, a list of strings or an ax.Ablation, got {value!r}"
        )


def _corrupted_or_noise(value: object, name: str) -> None:
    if not isinstance(value, GaussianNoise):
        _corrupted(value, name)


def _refuse_heads_or_neurons(site: str, heads: Selection, neurons: Selection) -> None:
    """``heads`` belongs to the sites of one head each, ``neurons`` to the MLP's neurons."""
    if heads is not None and site in ("attention", "mlp", "residual", "neurons"):
        raise OptionError(
            f"`heads` applies to the sites of one head each ('heads', 'queries', 'keys', "
            f"'values'), got site={site!r}"
        )
    if neurons is not None and site != "neurons":
        raise OptionError(f"`neurons` applies to site='neurons', got site={site!r}")


@PATCHING.method(
    corrupted=_corrupted,
    site=_site,
    stack=_stack,
    layers=check_selection,
    heads=check_selection,
    neurons=check_selection,
    qk_fix=_qk_fix,
    grad_drop=check.boolean,
)
def attribution_patching(
    call: Call,
    *,
    corrupted: Texts | Ablation | None = None,
    site: str = "heads",
    stack: str | None = None,
    layers: Selection = None,
    heads: Selection = None,
    neurons: Selection = None,
    qk_fix: bool | None = None,
    grad_drop: bool = False,
) -> xr.DataArray:
    """Attribution patching (AtP; Nanda 2023, Kramár et al. 2024): the first-order estimate of
    activation patching, ``grad . (corrupted - clean)`` per layer, position and head.

    Patching activation ``a`` (at one layer, position and head) from a run on ``corrupted`` into
    the clean run changes the target's score by about ``d score / d a . (a_corrupted -
    a_clean)``. One clean forward with zero probes added to the activations (the ``vjp``
    primals), one vectorized backward over the targets (every layer at once) and one corrupted
    forward give every estimate; real patching needs one forward per layer, head and position.

    Arguments:
        model, inputs, targets, objective, contrast, positions, chunk_size, max_new_tokens,
            max_memory: as :func:`attrax.saliency`. The corrupted run is scored on the same
            targets (an encoder-decoder's decoder input stays the clean one).
        corrupted: the corrupted input(s) (an encoder-decoder's source), aligned with
            ``inputs``, each with exactly as many tokens as its clean input (positions must
            match for patching to mean anything; an encoder-decoder's decoder stacks, whose
            positions are the decoder's, take a source of any length); or an
            :class:`Ablation`: each activation's corrupted value is zero or its mean.
        site: which activations: ``"heads"`` (each head's output before the output projection,
            ``(target, source, layer, head)``), ``"attention"`` (every head of a layer at once,
            the output projection's whole input: here the heads' sum), ``"mlp"`` (each MLP's
            output) or ``"residual"`` (the residual stream after each layer), these three
            ``(target, source, layer)``; ``"neurons"`` (each MLP neuron: the input of the MLP's
            output projection, the activation times the gate in a gated MLP, ``(target,
            source, layer, neuron)``; not a mixture of experts' layers); or the
            attention inputs, one head's vector at one position a node, ``(target, source,
            layer, head)``: ``"queries"`` (``source`` the query position), ``"keys"`` or
            ``"values"`` (``source`` the key position, ``head`` the key/value head under
            grouped-query attention). These run on any model whose attention goes through
            transformers' ``AttentionInterface`` (encoder-only classifiers too).
        qk_fix: queries and keys only: AtP*'s fix for attention saturation (Kramar et al.
            2024): a query's or key's effect through its softmax is computed exactly, ``sum
            dS/dA * (A' - A)`` with ``A'`` the pattern recomputed with that one vector
            corrupted; ``None`` (the default) is ``True``, ``False`` plain AtP.
        grad_drop: AtP*'s GradDrop: the estimate once per layer ``l`` with ``l``'s residual
            contribution dropped from the backward pass, reported as ``sum_l |estimate_l| / (L
            - 1)`` (nonnegative; every site but ``"residual"``; decoder-only models and their
            classifiers, ModernBERT's), all ``L`` backward rows of every target in one
            ``vmap``.
        stack: encoder-decoders: ``"encoder"`` (the encoder blocks; ``source`` = the encoder
            tokens), ``"decoder"`` (the decoder blocks, their self-attention heads) or
            ``"cross"`` (the decoder's cross-attention heads); both decoder stacks live on the
            decoder positions: ``source`` is the ``(side, position)`` index, side ``"target"``.
            ``None``: ``"cross"`` for heads and the attention inputs (cross-attention keys
            and values live on the encoder positions), ``"decoder"`` for MLPs and residual.
            Decoder-only
            models and classifiers have one stack (``None``).
        layers, heads: which layers / heads to keep (``heads`` with the sites of one head
            each).
        neurons: which neurons to keep (``site="neurons"``), as ``heads``.

    Returns:
        DataArray ``([example,] target, source, layer[, head | neuron])``: ``source`` is the
        position patched; the estimated change of the target's objective.

    >>> import attrax as ax
    >>> da = ax.attribution_patching(
    ...     ax.load_model(), "1 2 3 =", " 3 2 1", corrupted="1 2 4 =")
    >>> da.dims
    ('target', 'source', 'layer', 'head')
    """
    model = call.model
    method = "attribution_patching"
    refuse_seq2seq_classifier(model, method)
    if qk_fix is not None and site not in ("queries", "keys"):
        raise OptionError(
            f"`qk_fix` applies to site='queries' or 'keys' (whose effect goes through the "
            f"softmax), got site={site!r}"
        )
    drop = _grad_drop(model, method, site) if grad_drop else None
    _refuse_heads_or_neurons(site, heads, neurons)
    if site in ATTENTION_INPUTS:
        return _patch_attention_inputs(call, corrupted, site, stack, layers, heads, qk_fix, drop)
    # the attention output is the heads' sum through the projection: AtP is linear in it
    summed, site = site == "attention", "heads" if site == "attention" else site
    parts = patch_stack(model, method, stack, site)
    chosen_layers = selection_indices(layers, len(parts.blocks), "layers", "layers")
    chosen_heads = selection_indices(heads, parts.heads, "heads", "heads per layer")
    if site == "neurons":
        n_neurons = neuron_width(parts, chosen_layers)
        chosen_heads = selection_indices(neurons, n_neurons, "neurons", "neurons per layer")
    problem = call.problem
    t = problem.tensors
    assert corrupted is not None
    clean_embeds = problem.inputs[0]

    # the activation of each chosen layer at `site`, and how a probe is added to it
    def install(probes: list[torch.Tensor] | None, seen: list[Any]) -> list[Any]:
        handles = []
        for position, layer in enumerate(chosen_layers):
            probe = None if probes is None else probes[position]

            def add(
                value: torch.Tensor, probe: torch.Tensor | None = probe, position: int = position
            ) -> torch.Tensor:
                # by the caller's order, as the probes: the model runs its layers in its own
                if probe is None:  # a copy: the model may add to what it gets back in place
                    seen[position] = value.clone()
                    return value
                seen[position] = value
                return value + probe

            def rows(value: torch.Tensor, add: Callable[..., torch.Tensor] = add) -> torch.Tensor:
                if value.dim() == 2:  # OPT's fc2, Llama 4's experts: [B * L, H] as [B, L, H]
                    return add(value.view(t.ids.shape[0], -1, value.shape[-1])).reshape(value.shape)
                return add(value)

            handles.append(site_hook(parts.module(site, layer), site, rows))
        return handles

    def run(
        embeds: torch.Tensor,
        mask: torch.Tensor,
        probes: list[torch.Tensor] | None,
        types: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
    ) -> tuple[Any, ...]:
        seen: list[Any] = [None] * len(chosen_layers)
        with _hooks(*install(probes, seen)):
            hidden = problem.hidden_of(embeds, mask, types, ids)
        return hidden, seen

    if isinstance(corrupted, Ablation):  # the clean run's activations, ablated
        with torch.no_grad():
            _, corrupt_acts = run(clean_embeds, t.mask, None)
        real = _averaged_over(call, corrupted, parts.on_decoder)
        corrupt_acts = [a if a is None else corrupted.apply(a, real) for a in corrupt_acts]
    else:
        # only positions that are patched must align: the decoder's, for the decoder stacks
        corrupt_ids, corrupt_mask, corrupt_types = _corrupted_ids(
            model, call, corrupted, not parts.on_decoder
        )
        with torch.no_grad():  # the corrupted input with its own segments (a pair split elsewhere)
            corrupt_embeds = model.embed(corrupt_ids, "source")
            _, corrupt_acts = run(corrupt_embeds, corrupt_mask, None, corrupt_types, corrupt_ids)
    if any(a is None for a in corrupt_acts):
        raise ModelError(f"{method}: {type(model.hf).__name__} did not run the modules it names")
    per_target = 0
    if site == "neurons":  # every layer's neurons: the estimates, the runs' and the gradients
        batch, length = corrupt_acts[0].shape[:2]  # the stack's positions (a decoder's)
        size = full_precision(clean_embeds).element_size()
        one = batch * length * len(chosen_layers) * size  # [B, L, layers] of floats
        # the estimates, and their labelled copy; on a decoder's positions beside NaN for the
        # encoder's, joined with them, masked and sliced back
        copies = 2.0
        if parts.on_decoder:
            copies = 4 + 2 * t.ids.shape[1] / length
        estimates = int(copies * one * len(chosen_heads) * t.valid.shape[1])
        # and the clean, corrupted and changed neurons
        what = "the estimates and each layer's clean and corrupted neurons"
        problem.hold(estimates + 3 * one * n_neurons, "neurons", neurons, what)
        # a target's gradients (each GradDrop row's), full precision and chosen
        per_target = 3 * one * n_neurons * (1 if drop is None else len(drop.blocks))
    zeros = [torch.zeros_like(a) for a in corrupt_acts]

    def clean(*probes: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with dropping(drop):
            hidden, seen = run(clean_embeds, t.mask, list(probes))
        return hidden, [s.detach() for s in seen]

    # torch types vjp's return as the pair or the has_aux triple: this call has aux
    hidden, pullback, clean_acts = cast(
        "tuple[torch.Tensor, Callable[..., tuple[torch.Tensor, ...]], list[torch.Tensor]]",
        torch.func.vjp(clean, *zeros, has_aux=True),
    )
    # score k reads head input k only: one backward through the head, then one-hot cotangents
    _, head_pullback = vjp(problem.head_objective, hidden)
    (head_grad,) = head_pullback(t.valid.to(hidden.dtype))
    width = hidden.shape[1]
    one_hot = torch.eye(width, dtype=hidden.dtype, device=hidden.device)
    # "auto": the planner's estimate for gradients of the same model (targets per backward)
    rows = 1 if drop is None else len(drop.blocks)
    _, chunk = problem.plan(
        1, None, call.options["chunk_size"], rows=rows, shared_forward=True, per_target=per_target
    )
    deltas = []
    for before, after in zip(clean_acts, corrupt_acts, strict=True):
        delta = full_precision(after - before)
        if site == "heads":  # split the concatenated heads, keep the chosen ones
            delta = delta.unflatten(-1, (parts.heads, -1))[..., chosen_heads, :]
        elif site == "neurons":
            delta = delta[..., chosen_heads]
        deltas.append(delta)
    # [B, K, L, layer(, h)], each target chunk's estimates written in place as they come
    stacked: torch.Tensor | None = None

    def cotangent(slots: slice) -> torch.Tensor:
        return one_hot[slots, None, :, None] * head_grad[None]

    # per layer [k, B, L, ...] (with GradDrop [layers dropped, k, B, L, ...])
    for slots, grads in pulled(pullback, cotangent, width, chunk, drop):
        for i, (grad, delta) in enumerate(zip(grads, deltas, strict=True)):
            grad = full_precision(grad)
            if site == "heads":
                grad = grad.unflatten(-1, (parts.heads, -1))[..., chosen_heads, :]
                effect = torch.einsum("...kblhd,blhd->...bklh", grad, delta)
            elif site == "neurons":  # one product per neuron
                effect = torch.einsum("...kbln,bln->...bkln", grad[..., chosen_heads], delta)
            else:
                effect = torch.einsum("...kblx,blx->...bkl", grad, delta)
            estimate = averaged(effect, drop)  # [B, k, L(, h)]
            if stacked is None:
                b, _, positions, *rest = estimate.shape
                shape = (b, width, positions, len(deltas), *rest)
                stacked = estimate.new_empty(shape)
            stacked[:, slots, :, i] = estimate
    assert stacked is not None
    if site == "heads":
        coords = {"layer": chosen_layers, "head": chosen_heads}
    elif site == "neurons":
        coords = {"layer": chosen_layers, "neuron": chosen_heads}
    else:
        coords = {"layer": chosen_layers}
    da = _positions(call, stacked, coords, parts.on_decoder)
    return da.sum("head", skipna=False, keep_attrs=True) if summed else da


# --- activation patching ---------------------------------------------------------------------


#: what :class:`Ablation` sets a patched activation to
ABLATIONS = ("zero", "mean")


@dataclass(frozen=True)
class Ablation:
    """The activations set to zero or to their mean instead of taken from a corrupted run: zero
    and mean ablation, for :func:`attribution_patching`'s and :func:`activation_patching`'s
    ``corrupted``.

    ``"zero"``: each patched activation becomes 0. ``"mean"``: its mean over the clean batch's
    input tokens, every example's positions with padding left out: a decoder-only model's
    prompt, not the targets it is scored on; an encoder's source (one vector per layer, pooled
    over the positions, whose slices are the heads' and neurons'; queries and keys after their
    rotary embeddings). A batch of inputs is the reference set the mean is taken over; a
    dataset run's, each shard's. Not on an encoder-decoder's decoder stacks, whose positions
    are the targets'. Activation patching with an ablation noises only: there is no ablated
    run to restore into.

    >>> import attrax as ax
    >>> da = ax.attribution_patching(ax.load_model(), "1 2 3 =", " 3 2 1",
    ...     corrupted=ax.Ablation("mean"), site="mlp")
    >>> da.dims
    ('target', 'source', 'layer')
    """

    kind: str = "zero"

    def __post_init__(self) -> None:
        check.one_of(*ABLATIONS)(self.kind, "Ablation.kind")

    def apply(self, acts: torch.Tensor, mask: torch.Tensor, positions: int = 1) -> torch.Tensor:
        """``acts`` (``[B, ..., L, ...]``, positions along dim ``positions``) ablated: zeros, or
        the mean over the real (``mask`` ``[B, L]``) positions and examples, broadcast."""
        if self.kind == "zero":
            return torch.zeros_like(acts)
        shape = [1] * acts.dim()
        shape[0], shape[positions] = mask.shape
        weights = mask.to(full_precision(acts).dtype).view(shape)
        mean = (acts * weights).sum((0, positions), keepdim=True) / weights.sum()
        return mean.to(acts.dtype).expand_as(acts).clone()


def _averaged_over(call: Call, ablation: Ablation, on_decoder: bool) -> torch.Tensor:
    """``[B, L]``: the positions of the patched stack a mean ablation averages over, the
    inputs' own tokens: a decoder-only sequence's prompt, not the targets it is scored on
    (a target's effect would depend on the tokens after it), padding left out. A decoder
    stack's positions are the targets': a mean there is refused."""
    problem = call.problem
    if ablation.kind == "zero":
        return problem.side_mask(1 if on_decoder else 0)
    if on_decoder:
        raise OptionError(
            "`corrupted=Ablation('mean')`: an encoder-decoder's decoder positions are the "
            "targets, whose mean would make each target's effect depend on the tokens after "
            "it; take stack='encoder' (or cross-attention keys and values, on the encoder's "
            "positions), Ablation('zero') or a corrupted text"
        )
    mask = problem.side_mask(0).bool()
    lengths = [len(e.source_ids) for e in call.batch.examples]
    prompt = torch.tensor(lengths, device=mask.device)[:, None]
    return mask & (torch.arange(mask.shape[1], device=mask.device)[None] < prompt)


@dataclass(frozen=True)
class GaussianNoise:
    """A corrupted run of Gaussian noise on some source tokens' embeddings: causal tracing's
    (Meng et al. 2022, ROME), for :func:`activation_patching`'s ``corrupted``.

    Each of ``samples`` corrupted runs adds ``N(0, (scale * std)^2)`` to every entry of the
    embeddings of ``tokens``; the effects are averaged over the samples. ``std`` is the standard
    deviation of the embeddings' entries over the whole vocabulary (None: computed from
    :meth:`Model.embed`'s rows, any scale inside the embedding module included; ROME takes it
    over the subjects' token embeddings of its dataset, and ``scale=3``). Each example draws
    from a CPU generator seeded with ``seed`` (batched equals single).

    Arguments:
        tokens: the source positions to noise (ROME: the subject's tokens): an int or a list of
            ints (negative ones count from each example's last source token), or a text found
            in the input (``" Space Needle"``: the tokens its first occurrence overlaps; a fast
            tokenizer's offsets); for a batch, one of these per example as a list. None (a
            dataset run's): each record's ``"noise"`` field.
        scale: the noise's standard deviation in units of ``std`` (> 0).
        samples: how many noisy runs (ROME: 10).
        seed: the generators' seed.
        std: the unit (> 0), or None for the embeddings' own.

    >>> import attrax as ax
    >>> noise = ax.GaussianNoise(tokens=[0, 1], samples=4)
    >>> da = ax.activation_patching(ax.load_model(), "1 2 3 =", " 3 2 1", corrupted=noise,
    ...     site="residual", direction="denoising")
    >>> da.dims
    ('target', 'source', 'layer')
    """

    tokens: int | str | Sequence[int] | Sequence[int | str | Sequence[int]] | None = None
    scale: float = 3.0
    samples: int = 10
    seed: int = 0
    std: float | None = None

    def __post_init__(self) -> None:
        check.positive(self.scale, "GaussianNoise.scale")
        check.positive_int(self.samples, "GaussianNoise.samples")
        check.seed(self.seed, "GaussianNoise.seed")
        if self.std is not None:
            check.positive(self.std, "GaussianNoise.std")
        tokens = _frozen(self.tokens)
        object.__setattr__(self, "tokens", tokens)  # hashable, numpy's ints as ints
        if tokens is not None and (
            isinstance(tokens, bytes) or not isinstance(tokens, (int, str, Sequence))
        ):
            raise OptionError(
                "`GaussianNoise.tokens` must be an int, a list of ints, a text in the input or, "
                f"for a batch, a list of them per example, got {self.tokens!r}"
            )

    def per_example(
        self, model: Model, inputs: list[Any], sources: Sequence[Sequence[int]], single: bool
    ) -> list[list[int]]:
        """Each example's noised positions, non-negative, checked against its ``inputs`` (a
        text or a pair) and the ``sources`` ids it reads (``single``: one input, not a list)."""
        tokens = self.tokens
        if tokens is None:
            raise OptionError(
                "`corrupted` GaussianNoise(tokens=None) noises nothing: give `tokens`, the "
                "positions or a text in the input (a dataset run takes each record's 'noise')"
            )
        given: list[Any] = [tokens] * len(sources)
        nested = isinstance(tokens, Sequence) and not isinstance(tokens, str)
        if nested and any(isinstance(v, (str, Sequence)) for v in tokens):  # type: ignore[union-attr]
            given = list(tokens)  # type: ignore[arg-type]
            if len(given) != len(sources):
                raise OptionError(
                    f"`GaussianNoise.tokens` holds {len(given)} selections, one per example; "
                    f"the batch has {len(sources)} examples"
                )
        out = []
        for i, (each, text, ids) in enumerate(zip(given, inputs, sources, strict=True)):
            name = "GaussianNoise.tokens" + ("" if single else f"[{i}]")
            if isinstance(each, str):
                out.append(_subject_tokens(model, each, text, ids, name))
                continue
            if not _positions_given(each):
                raise OptionError(
                    f"`{name}` must be an int, a list of ints or a text in the input, got {each!r}"
                )
            try:
                out.append(selection_indices(each, len(ids), name, "source tokens in this input"))
            except OptionError as err:  # out of this input's range, repeated: the input's
                raise InputError(str(err)) from None
        return out

    def draw(self, model: Model, problem: Problem, chosen: list[list[int]]) -> torch.Tensor:
        """The noisy runs' source embeddings ``[samples * B, L, H]`` (sample-major), each
        example's ``chosen`` positions noised."""
        x = problem.inputs[0]
        std = self.std if self.std is not None else _table_std(model)
        noise = torch.zeros(self.samples, *x.shape, dtype=DRAWS)
        for b, positions in enumerate(chosen):
            generator = torch.Generator().manual_seed(self.seed)
            draws = torch.randn(
                self.samples, len(positions), x.shape[-1], generator=generator, dtype=DRAWS
            )
            noise[:, b, positions] = draws
        noisy = x[None] + noise.to(x.device, x.dtype) * (self.scale * std)
        return noisy.flatten(0, 1)


def _positions_given(value: Any) -> bool:
    """Whether ``value`` is an int or a sequence of ints (no bools, no None)."""

    def one(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    return one(value) or (
        isinstance(value, Sequence) and not isinstance(value, str) and all(map(one, value))
    )


def _frozen(value: Any) -> Any:
    """Lists (numpy arrays) as tuples and numpy's ints as ints, nested: a frozen field's."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _subject_tokens(
    model: Model, subject: str, text: Any, ids: Sequence[int], name: str
) -> list[int]:
    """The positions among ``ids`` (a text's source tokens) of the tokens that the first
    occurrence of ``subject`` in ``text`` overlaps."""
    if not isinstance(text, str):
        raise InputError(
            f"`{name}` {subject!r} names tokens by their text, which needs one text; this input "
            "is a (text, text_pair) pair: give its positions (ints)"
        )
    start = text.find(subject)
    if not subject.strip() or start < 0:
        raise InputError(f"`{name}` {subject!r} is not a text in the input {text!r}")
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(
            f"`{name}` {subject!r}: finding a text's tokens needs a fast tokenizer's offsets; "
            f"{type(tokenizer).__name__} has none: give the positions (ints)"
        )
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    plain, end = list(encoding["input_ids"]), start + len(subject)
    # where the text's own tokens sit among the source ids (after a BOS or a [CLS])
    first = next(
        (k for k in range(len(ids) - len(plain) + 1) if list(ids[k : k + len(plain)]) == plain),
        None,
    )
    chosen = [
        first + k
        for k, (low, high) in enumerate(encoding["offset_mapping"])
        if first is not None and low < end and high > start
    ]
    if not chosen:
        raise InputError(f"`{name}` {subject!r}: no token of the input {text!r} covers it")
    return chosen


def _table_std(model: Model) -> float:
    """The standard deviation of the entries of every source embedding :meth:`Model.embed`
    gives, the rows the noise is added to (Gemma's and BART's scale inside the embedding
    module included): float64 sums, a block of ids at a time (a large table is not copied
    whole). Kept per embedding module until its weight changes (a dataset's shards, a loop of
    calls pay one pass over the vocabulary)."""
    module = model.embedding_module("source")
    weight = cast("torch.Tensor", module.weight)
    key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
    kept = _STDS.get(module)
    if kept is not None and kept[0] == key:
        return kept[1]
    rows = model.embedding_rows("source")
    total = torch.zeros((), dtype=torch.float64)
    squares = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, rows, 4096):
            ids = torch.arange(start, min(start + 4096, rows))[None]
            block = model.embed(ids, "source").double()
            total += block.sum().cpu()
            squares += (block * block).sum().cpu()
    n = rows * model.embed(torch.zeros(1, 1, dtype=torch.long), "source").shape[-1]
    mean = total / n
    std = float((squares / n - mean * mean).clamp_min(0).sqrt())
    _STDS[module] = (key, std)
    return std


#: _table_std's result per embedding module, with what its weight was (pointer, version)
_STDS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[Any, float]] = weakref.WeakKeyDictionary()


#: Activation patching: forwards only, each a stack of patched copies of the batch.
ACTIVATION = Family(
    name="activation_patching",
    takes=("objective", "contrast", "positions", "batch_size", "max_new_tokens", "max_memory"),
    refuses={
        "attribute_target": "activation patching reports the positions of the stack it patches "
        "(an encoder-decoder's decoder and cross-attention heads live on the decoder positions: "
        "stack='decoder' / 'cross')",
        "chunk_size": "activation patching runs forwards only: there is no backward whose "
        "targets to chunk (batch_size sets the patched copies per forward)",
    },
)
DIRECTIONS = ("noising", "denoising")


def _direction(value: object, name: str) -> None:
    if value not in DIRECTIONS:
        raise OptionError(f"`{name}` must be one of {DIRECTIONS}, got {value!r}")


#: one run of the batch: its input embeddings, attention mask, segment ids (None: the call's)
#: and the token ids they stand for
_Run = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]
#: the activations' replacement for one chunk of copies, given per chosen layer the copies'
#: mask ``[n, positions(, heads)]`` (None: no copy of the chunk patches that layer)
_Replace = Callable[[list[torch.Tensor | None]], contextlib.AbstractContextManager[None]]


class _Patchable(NamedTuple):
    """What one site offers to patch: the layers whose activations a patch may set and the
    chosen heads (None: a site without heads), the positions and heads per layer a patch mask
    spans, the donor activations held, how a chunk's forward takes them, and where a donor
    equals the base run's activation exactly (``[layers, B, positions, head_total]``: that
    patch changes nothing)."""

    layers: list[int]
    heads: list[int] | None
    length: int
    head_total: int
    donors: list[torch.Tensor]
    replace: _Replace
    same: torch.Tensor
    #: the chosen layers (the result's), and which of ``layers`` each one's patch sets
    #: (``[centers, layers]``: ROME's window around it)
    centers: list[int]
    window: torch.Tensor
    #: the stack's blocks, ``layers`` indexing them from ``offset`` on (an encoder-decoder's
    #: decoder stacks: after the encoder's, which run as in the base run too): the blocks below
    #: a chunk's lowest patched layer run as in the base run, so they are not run again (None:
    #: every block runs)
    blocks: list[torch.nn.Module] | None = None
    offset: int = 0


def _noising_only(options: Mapping[str, Any]) -> None:
    if isinstance(options["corrupted"], Ablation) and options["direction"] != "noising":
        raise OptionError(
            f"`direction={options['direction']!r}` restores clean activations into the "
            "corrupted run; an ax.Ablation has no run of its own (each patch ablates one "
            "activation of the clean run): direction='noising'"
        )


@ACTIVATION.method(
    _noising_only,
    corrupted=_corrupted_or_noise,
    site=_site,
    stack=_stack,
    layers=check_selection,
    heads=check_selection,
    neurons=check_selection,
    sources=check_selection,
    direction=_direction,
    window=check.positive_int,
)
def activation_patching(
    call: Call,
    *,
    corrupted: Texts | GaussianNoise | Ablation | None = None,
    site: str = "heads",
    stack: str | None = None,
    layers: Selection = None,
    heads: Selection = None,
    neurons: Selection = None,
    sources: Selection = None,
    direction: str = "noising",
    window: int = 1,
) -> xr.DataArray:
    """Activation patching: the exact change of each target's score when one activation (one
    layer, position and head) is taken from a run on ``corrupted`` into the clean run.

    Every patch is a copy of the batch in one stacked forward: copies run ``batch_size`` at a
    time (``"auto"``: as many as fit ``max_memory``), one patch a copy, each at its own layer,
    position and head. It costs a forward per patch, ``layers x positions x heads`` of them at
    most (a patch whose donor equals the base run's activation, or at a position no target
    reads, changes nothing and does not run), and the blocks below a forward's lowest patched
    layer return the base run's outputs instead of running again:
    :func:`attribution_patching` estimates all of them from two forwards and one backward, to
    first order; this method confirms it where it matters (``layers``, ``heads``, ``sources``).

    Arguments:
        model, inputs, targets, objective, contrast, positions, batch_size, max_new_tokens,
            max_memory: as :func:`attrax.occlusion` (``batch_size``: patched copies of the batch
            per forward).
        corrupted: as :func:`attribution_patching` (a text, or an :class:`Ablation`: zero or
            mean ablation, ``direction="noising"``), or a :class:`GaussianNoise` (causal
            tracing: noise on some tokens' embeddings, the effects averaged over its samples).
        site, stack, layers, heads, neurons: as :func:`attribution_patching`
            (``site="attention"`` patches every head of a layer together, ROME's attention
            site; ``site="neurons"`` one neuron at one position a patch: choose them with
            ``neurons``, ``layers`` and ``sources``, as many forwards as patches).
        window: how many layers each patch sets at once, around its layer: ``[l - window //
            2, l + ceil(window / 2))`` clipped to the stack (ROME restores 10 for MLPs and
            attention); ``layer`` labels the window's layer ``l``.
        sources: which positions to patch (indices into the patched stack's positions, as
            ``layers``); None: every one.
        direction: ``"noising"`` (the default) patches the corrupted activation into the clean
            run, which is what attribution patching estimates; ``"denoising"`` patches the clean
            activation into the corrupted run (causal tracing's restoration, Meng et al. 2022).

    Returns:
        DataArray ``([example,] target, source, layer[, head | neuron])``: ``source`` is the
        position patched; the patched run's score less the unpatched run's (the clean run's
        when noising, the corrupted run's when denoising).

    >>> import attrax as ax
    >>> da = ax.activation_patching(
    ...     ax.load_model(), "1 2 3 =", " 3 2 1", corrupted="1 2 4 =", layers=0)
    >>> da.dims
    ('target', 'source', 'layer', 'head')
    """
    model = call.model
    method = "activation_patching"
    refuse_seq2seq_classifier(model, method)
    _refuse_heads_or_neurons(site, heads, neurons)
    problem = call.problem
    t = problem.tensors
    assert corrupted is not None
    if site in ATTENTION_INPUTS:
        on_decoder, stack_name = _attention_input_stack(model, site, stack)
    else:
        parts = patch_stack(model, method, stack, "heads" if site == "attention" else site)
        on_decoder, stack_name = parts.on_decoder, parts.name
    clean: _Run = (problem.inputs[0], t.mask, None, t.ids)
    samples = 1
    ablate = None
    if isinstance(corrupted, GaussianNoise):
        # both runs S * B rows, sample-major: each noisy run beside its own copy of the clean
        samples = corrupted.samples
        texts = input_texts(model, call.inputs)
        source_ids: list[Sequence[int]] = [e.source_ids for e in call.batch.examples]
        chosen = corrupted.per_example(model, texts, source_ids, call.batch.single)
        with torch.no_grad():
            noisy = corrupted.draw(model, problem, chosen)
        mask, ids = t.mask.repeat(samples, 1), t.ids.repeat(samples, 1)
        bad: _Run = (noisy, mask, None, ids)
        clean = (problem.inputs[0].repeat(samples, 1, 1), mask, None, ids)
    elif isinstance(corrupted, Ablation):  # the clean run's own activations, ablated
        real = _averaged_over(call, corrupted, on_decoder)
        queries_keys_values = 2 if site in ATTENTION_INPUTS else 1  # [B, heads, positions, d]
        ablate = functools.partial(corrupted.apply, mask=real, positions=queries_keys_values)
        bad = clean
    else:
        ids, mask, types = _corrupted_ids(model, call, corrupted, not on_decoder)
        with torch.no_grad():
            bad = (model.embed(ids, "source"), mask, types, ids)
    base, donor = (clean, bad) if direction == "noising" else (bad, clean)
    if site in ATTENTION_INPUTS:
        found = _attention_input_donors(
            call, stack_name, site, layers, heads, window, donor, base, ablate
        )
    else:
        picked = neurons if site == "neurons" else heads
        found = _module_donors(call, parts, site, layers, picked, window, donor, base, ablate)
    chosen_sources = selection_indices(sources, found.length, "sources", "patched positions")
    read = _read(problem, on_decoder, found.length).repeat(samples, 1)
    effects = _patched_effects(call, base, found, chosen_sources, read, site in ATTENTION_INPUTS)
    # [patches, S * B, K]: the mean over the noise samples
    effects = effects.unflatten(1, (samples, -1)).mean(1)
    # [layer, source, head, B, K] -> [B, K, positions, layer(, head)], unpatched positions 0
    n_heads = 1 if found.heads is None else len(found.heads)
    grid = effects.view(len(found.centers), len(chosen_sources), n_heads, *effects.shape[1:])
    grid = grid.permute(3, 4, 1, 0, 2)
    full = grid.new_zeros(*grid.shape[:2], found.length, *grid.shape[3:])
    full[:, :, chosen_sources] = grid
    coords: dict[str, list[int]] = {"layer": found.centers}
    if found.heads is None:
        full = full.squeeze(-1)
    else:
        coords["neuron" if site == "neurons" else "head"] = found.heads
    da = _positions(call, full, coords, on_decoder)
    return da if sources is None else da.isel(source=chosen_sources)


def _attention_input_stack(model: Model, site: str, stack: str | None) -> tuple[bool, str]:
    """Whether ``site``'s vectors on ``stack`` live on the decoder positions, and the stack's
    name as :mod:`attrax._heads` keys it: ``"self"`` for a model of one stack; ``None`` on an
    encoder-decoder is ``"cross"``, as for the heads. A ModelError for keys and values that
    later layers reuse (Gemma 3n's and Gemma 4's shared key-value layers): they are stored
    before the attention function attrax patches them in, so the reusing layers would keep the
    unpatched ones."""
    shared = getattr(model.hf.config, "num_kv_shared_layers", 0)
    if site in ("keys", "values") and isinstance(shared, int) and shared > 0:
        raise ModelError(
            f"{model.name}'s last {shared} layers reuse an earlier layer's keys and values "
            "(num_kv_shared_layers): attrax patches them inside each layer's attention, which "
            "those layers would not see; site='queries', 'heads', 'mlp' or 'residual' instead"
        )
    if not model.is_encoder_decoder:
        if stack is not None:
            raise OptionError(
                f"`stack={stack!r}` needs an encoder-decoder model; {model.name} has one stack "
                "(leave stack=None)"
            )
        return False, "self"
    stack = stack or "cross"
    return stack == "decoder" or (stack == "cross" and site == "queries"), stack


def _module_donors(
    call: Call,
    parts: Stack,
    site: str,
    layers: Selection,
    heads: Selection,
    window: int,
    donor: _Run,
    base: _Run,
    ablate: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> _Patchable:
    """The chosen layers and heads (neurons) of a head, attention, MLP, neuron or residual site,
    the donor run's activation at each layer a patch sets (``[B, positions, width]``; through
    ``ablate``, an ablation's), how a chunk's forward replaces it, and where it equals the
    ``base`` run's."""
    problem = call.problem
    centers = selection_indices(layers, len(parts.blocks), "layers", "layers")
    chosen_layers, spans = _windows(centers, len(parts.blocks), window)
    chosen_heads, total = None, parts.heads
    if site == "heads":
        chosen_heads = selection_indices(heads, parts.heads, "heads", "heads per layer")
    elif site == "neurons":  # each neuron a head of width 1
        total = neuron_width(parts, chosen_layers)
        chosen_heads = selection_indices(heads, total, "neurons", "neurons per layer")
    # the attention output, every head at once: the heads' site, not split into heads
    where = "heads" if site == "attention" else site
    modules = [parts.module(where, i, window=True) for i in chosen_layers]
    batch = donor[0].shape[0]

    # [B, L, width] -> [B, L, heads, d] (one head of width for the other sites)
    per_head = (total, -1) if chosen_heads is not None else (1, -1)

    def record(run: _Run, against: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Each layer's activation in ``run``; with ``against``, only where it equals that
        one's, ``[B, L, heads]`` (a second copy of every layer is never held)."""
        seen: list[torch.Tensor | None] = [None] * len(modules)

        def keep(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
            def change(value: torch.Tensor) -> torch.Tensor:
                # OPT's fc2 and Llama 4's experts run on the rows flattened: [B * L, H]
                rows = value.detach().reshape(batch, -1, value.shape[-1])
                if against is None:
                    seen[i] = rows.clone()
                else:
                    seen[i] = _same(against[i], rows, lambda a: a.unflatten(-1, per_head))
                return value

            return change

        hooks = (site_hook(m, where, keep(i)) for i, m in enumerate(modules))
        with torch.no_grad(), _hooks(*hooks):
            problem.hidden_of(*run)
        if any(s is None for s in seen):
            raise ModelError(
                f"activation_patching: {type(call.model.hf).__name__} did not run the modules "
                "it names"
            )
        return cast("list[torch.Tensor]", seen)

    donors = record(donor)
    if ablate is None:
        same = torch.stack(record(base, donors))
    else:  # the donor run is the base run: its activations are what each ablation replaces
        ablated = [ablate(d) for d in donors]
        same = torch.stack(
            [
                _same(a, d, lambda x: x.unflatten(-1, per_head))
                for a, d in zip(ablated, donors, strict=True)
            ]
        )
        donors = ablated

    @contextlib.contextmanager
    def replace(masks: list[torch.Tensor | None]) -> Iterator[None]:
        handles = []
        for i, (module, mask) in enumerate(zip(modules, masks, strict=True)):
            if mask is None:  # no copy of this chunk patches this layer
                continue

            def change(value: torch.Tensor, mask: torch.Tensor = mask, i: int = i) -> torch.Tensor:
                n = mask.shape[0]
                x = value.reshape(n, batch, *donors[i].shape[1:])
                given = donors[i].to(value.dtype)
                if chosen_heads is not None:  # [n, B, L, heads, d]
                    x = x.unflatten(-1, per_head)
                    given = given.unflatten(-1, per_head)
                    where = mask[:, None, :, :, None]
                else:
                    where = mask[:, None, :, None]
                return torch.where(where, given[None], x).reshape(value.shape)

            handles.append(site_hook(module, where, change))
        with _hooks(*handles):
            yield

    length, reuse = donors[0].shape[1], _reusable(call.model, parts)
    patches = (chosen_layers, chosen_heads, length, total, donors, replace, same, centers, spans)
    return _Patchable(*patches, *reuse)


def _reusable(model: Model, parts: Stack | None) -> tuple[list[torch.nn.Module] | None, int]:
    """The blocks whose outputs patched copies may reuse, ``parts``' indexed from the offset
    returned: after the encoder's on an encoder-decoder's decoder stacks (every copy's encoder
    runs the base run's). None where later layers read what earlier ones store (Gemma 3n's
    and 4's shared keys and values), or without ``parts``."""
    shared = getattr(model.hf.config, "num_kv_shared_layers", 0)
    if parts is None or (isinstance(shared, int) and shared > 0):
        return None, 0
    encoder = []
    if parts.on_decoder:
        encoder = encoder_decoder_stack(model, "activation_patching", "encoder").blocks
    return [*encoder, *parts.blocks], len(encoder)


def _windows(centers: list[int], total: int, window: int) -> tuple[list[int], torch.Tensor]:
    """The layers ``window``-wide patches around ``centers`` set (of ``total``), and which of
    them each center's sets, ``[centers, layers]``: ROME's ``[l - window // 2, l + ceil(window /
    2))``, clipped to the stack."""
    spans = [range(max(0, c - window // 2), min(total, c - (-window // 2))) for c in centers]
    layers = sorted({layer for span in spans for layer in span})
    where = torch.tensor([[layer in span for layer in layers] for span in spans])
    return layers, where.reshape(len(centers), len(layers))


def _same(
    given: torch.Tensor, had: torch.Tensor, heads: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``[B, positions, heads]``: where a layer's donor activation ``given`` equals the base
    run's ``had`` exactly (``heads`` views one as ``[B, positions, heads, d]``); nowhere where
    their shapes differ."""
    a = heads(given)
    if had.shape != given.shape:
        return torch.zeros(a.shape[:-1], dtype=torch.bool, device=a.device)
    return (a == heads(had)).all(-1)


def _attention_input_donors(
    call: Call,
    stack: str,
    site: str,
    layers: Selection,
    heads: Selection,
    window: int,
    donor: _Run,
    base: _Run,
    ablate: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> _Patchable:
    """As :func:`_module_donors`, for the queries, keys or values (``[B, heads, positions,
    d]``, after rotary embeddings), replaced inside the attention function."""
    problem = call.problem
    model = problem.model
    centers = stack_layers(model, stack, layers)
    chosen_layers, spans = _windows(centers, len(stack_layers(model, stack, None)), window)
    keys = [(stack, layer) for layer in chosen_layers]
    name = ATTENTION_INPUTS[site]

    def record(run: _Run) -> list[torch.Tensor]:
        calls = record_calls(problem, keys, site, *run).calls
        assert calls is not None
        # a copy: GPT-2's are views of its fused projection's output, three times as large
        return [getattr(calls[key], name).detach().clone() for key in keys]

    donors = record(donor)
    bases = record(base) if ablate is None else donors  # an ablation's donor run is the base
    if ablate is not None:
        donors = [ablate(d) for d in donors]
    same = torch.stack(
        [_same(d, b, lambda a: a.transpose(1, 2)) for d, b in zip(donors, bases, strict=True)]
    )
    del bases
    total = donors[0].shape[1]
    what = "heads per layer" if site == "queries" else "key/value heads per layer"
    chosen_heads = selection_indices(heads, total, "heads", what)
    batch = donors[0].shape[0]

    @contextlib.contextmanager
    def replace(masks: list[torch.Tensor | None]) -> Iterator[None]:
        changes: dict[tuple[Key, str], Callable[[torch.Tensor], torch.Tensor]] = {}
        for key, given, mask in zip(keys, donors, masks, strict=True):
            if mask is None:
                continue

            def change(
                value: torch.Tensor, given: torch.Tensor = given, mask: torch.Tensor = mask
            ) -> torch.Tensor:
                x = value.view(mask.shape[0], batch, *value.shape[1:])  # [n, B, h, L, d]
                # the mask is [n, positions, heads]: this site's [n, 1, h, L, 1]
                where = mask.transpose(1, 2)[:, None, :, :, None]
                return torch.where(where, given.to(value.dtype)[None], x).view(value.shape)

            changes[(key, name)] = change
        with replacing(model, changes):
            yield

    length = donors[0].shape[2]
    # the blocks below a patch, where the stack's attention layers are its blocks (not on a
    # hybrid model, whose blocks without attention count as layers of the other sites)
    parts: Stack | None = None
    with contextlib.suppress(ModelError):
        found = patch_stack(
            model, "activation_patching", None if stack == "self" else stack, "heads"
        )
        if len(found.blocks) == len(stack_layers(model, stack, None)):
            parts = found
    patches = (chosen_layers, chosen_heads, length, total, donors, replace, same, centers, spans)
    return _Patchable(*patches, *_reusable(model, parts))


def _read(problem: Problem, on_decoder: bool, length: int) -> torch.Tensor:
    """``[B, length]``: the patched stack's positions some target reads. A patch anywhere else
    (a decoder's future, padding) changes no score (its entries are labelled NaN)."""
    t = problem.tensors
    if not on_decoder:
        return problem.visible()[..., : problem.inputs[0].shape[1]].any(1)
    # the decoder's positions up to the last one each target's logits come from
    columns = torch.arange(length, device=t.index.device)
    seen = (columns[None, None, :] <= t.index[..., None]) & t.valid[..., None]
    real = columns[None, :] < problem.side_mask(1).sum(1)[:, None]
    return seen.any(1) & real


def _patched_effects(
    call: Call,
    base: _Run,
    site: _Patchable,
    sources: list[int],
    read: torch.Tensor,
    eager: bool,
) -> torch.Tensor:
    """``[patches, B, K]``: each patch's score less the unpatched run's, the patches ``(layer,
    source, head)`` in that order, ``batch_size`` copies of the batch a forward (``eager``: the
    forwards run eager attention). Only patches that change something run: where the donor
    equals the base run's activation, or no target reads the position (``read``, ``[B,
    positions]``), an example scores 0, exactly what a forward of its own would give."""
    problem = call.problem
    layers, heads = len(site.layers), site.heads
    n_heads = 1 if heads is None else len(heads)
    total = len(site.centers) * len(sources) * n_heads
    x = base[0]
    batch, targets = x.shape[0], problem.tensors.valid.shape[1]
    replace = site.replace
    window = site.window.to(x.device)
    # [layers, B, sources, heads]: where a patch at that layer changes the example
    chosen = torch.as_tensor(heads or [0], device=x.device)
    picked = torch.as_tensor(sources, device=x.device)
    same = site.same.index_select(2, picked).index_select(3, chosen)
    moved = ~same & read.index_select(1, picked)[None, :, :, None]
    del same
    # a center's patch changes something where a layer of its window does: its window is a run
    # of the layers (each center's first and how many), OR-ed a window offset at a time
    first, span = window.int().argmax(1), window.sum(1)
    per_center = moved[first]
    for offset in range(1, int(span.max())):
        per_center |= moved[torch.minimum(first + offset, first + span - 1)]
    del moved
    # [centers, B, sources, heads] -> [patches, B]: whether the patch changes that example
    changes = per_center.permute(0, 2, 3, 1).reshape(total, batch)
    run = changes.any(1).nonzero().squeeze(1)  # the patches that change some example
    # the scores' dtype (half precision as float32)
    effects = full_precision(x.new_zeros(total, batch, targets))
    if run.numel() == 0:
        return effects

    def scores(copies: int) -> torch.Tensor:  # [copies * B, K]
        return problem.head_objective(problem.hidden_of(*base[:3], base[3], copies))

    with torch.no_grad():
        # the unpatched run, through the same attention; the outputs of the blocks below some
        # chunk's lowest patched layer (a center's window's first), which copies reuse
        highest = site.offset + max(site.layers[i] for i in first.tolist())
        reusable = (site.blocks or [])[:highest]
        with replace([None] * layers), _outputs(reusable if SKIP_BELOW else [], batch) as outputs:
            unpatched = scores(1)
        # the stacked run's own shapes (denoising: a corrupted source of another length)
        cost = dataclasses.replace(problem, inputs=(x,)).cost(saved=False, eager=eager)
        # each chunk's replaced activation (one layer's, per copy) beside its forward, and its
        # masks (at most one per layer)
        widest = max(d.numel() * d.element_size() for d in site.donors)
        widest += layers * site.length * site.head_total
        reused = [output for output, _ in outputs]
        held = sum(d.numel() * d.element_size() for d in (*site.donors, *reused, site.same))
        fixed = cost.fixed + sum(problem.held) + held + total * batch * targets * 8
        step = plan_forwards(
            len(run),
            call.options["batch_size"],
            cost.per_point + widest,
            x.device,
            problem.max_memory,
            fixed,
        )
        layer = run // (len(sources) * n_heads)
        source = torch.as_tensor(sources, device=x.device)[(run // n_heads) % len(sources)]
        head = chosen[run % n_heads]
        out = []
        for start in range(0, len(run), step):  # chunking only: bounds memory
            between_passes()
            chunk = slice(start, min(start + step, len(run)))
            n = chunk.stop - chunk.start
            # the layers this chunk's copies set (each its window's), masks for those only
            hits = window[layer[chunk]]  # [n, layers]
            touched = hits.any(0).nonzero().squeeze(1)
            # copy c patches (layer, source, head) of its own: True in every[touched, c]
            every = torch.zeros(
                len(touched), n, site.length, site.head_total, dtype=torch.bool, device=x.device
            )
            copies = torch.arange(n, device=x.device)
            every[:, copies, source[chunk], head[chunk]] = hits[:, touched].T
            if heads is None:
                every = every[..., 0]
            masks: list[torch.Tensor | None] = [None] * layers
            for mask, hit in zip(every, touched.tolist(), strict=True):
                masks[hit] = mask
            # every copy runs the blocks below its lowest patched layer as the base run did
            lowest = site.offset + site.layers[int(touched[0])]
            below = min(lowest, len(outputs)) if SKIP_BELOW else 0
            with replace(masks), _reused((site.blocks or [])[:below], outputs, n):
                patched = scores(n)
            out.append((patched - unpatched.repeat(n, 1)).view(n, batch, targets))
        effects = effects.to(full_precision(unpatched).dtype)
        effects[run] = full_precision(torch.cat(out))
    return torch.where(changes[..., None], effects, 0.0)


#: whether activation patching reuses the base run's outputs of the blocks below a chunk's
#: patches (tests turn it off to compare)
SKIP_BELOW = True


#: a block's output ``[rows, L, H]`` and how many items its tuple held (None: no tuple)
_Output = tuple[torch.Tensor, int | None]


@contextlib.contextmanager
def _outputs(blocks: list[torch.nn.Module], rows: int) -> Iterator[list[_Output]]:
    """The outputs ``[rows, L, H]`` of the first of ``blocks`` while the context runs one
    forward, as long as each returns that tensor alone (or first, beside Nones): what
    :func:`_reused` can give back. A block that returns more (T5's position bias, GLM-5's
    top-k picks) or another shape (Gemma 3n's) ends the list; a block listed twice (shared
    layers) makes it empty. Each output is kept as the block returned it, before any other
    forward hook (a user's) changes it: those run again on what :func:`_reused` returns."""
    seen: list[Any] = [None] * len(blocks)

    def keep(i: int) -> Callable[..., None]:
        def hook(_m: torch.nn.Module, _args: Any, output: Any) -> None:
            # a copy: later hooks and blocks may change it in place
            first = output[0] if isinstance(output, tuple) else output
            kept = first.detach().clone() if isinstance(first, torch.Tensor) else None
            seen[i] = (kept, output) if isinstance(output, tuple) else kept

        return hook

    found: list[_Output] = []
    if len({id(block) for block in blocks}) < len(blocks):
        blocks = []
    handles = [block.register_forward_hook(keep(i), prepend=True) for i, block in enumerate(blocks)]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()
    for entry in seen[: len(blocks)]:
        alone, arity = entry, None
        if isinstance(entry, tuple):
            kept, output = entry
            alone = kept if all(o is None for o in output[1:]) else None
            arity = len(output)
        if not (isinstance(alone, torch.Tensor) and alone.dim() == 3 and alone.shape[0] == rows):
            break
        found.append((alone, arity))


def _reused(
    blocks: list[torch.nn.Module], outputs: list[_Output], copies: int
) -> contextlib.AbstractContextManager[None]:
    """``blocks`` return their ``outputs`` (:func:`_outputs`) for ``copies`` stacked copies of
    the batch instead of running, when their input has those copies' shape (else they run)."""

    def reuse(
        run: Callable[..., Any], output: torch.Tensor, arity: int | None
    ) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            x = args[0] if args else kwargs.get("hidden_states")
            wanted = (copies * output.shape[0], *output.shape[1:])
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != wanted:
                return run(*args, **kwargs)
            out = output.repeat(copies, 1, 1)
            return out if arity is None else (out, *[None] * (arity - 1))

        return forward

    return instance_attributes(
        [
            (block, "forward", reuse(block.forward, output, arity))
            for block, (output, arity) in zip(blocks, outputs, strict=False)
        ]
    )


def _patch_attention_inputs(
    call: Call,
    corrupted: Texts | Ablation | None,
    site: str,
    stack: str | None,
    layers: Selection,
    heads: Selection,
    qk_fix: bool | None,
    drop: Drop | None,
) -> xr.DataArray:
    """Attribution patching of the queries, keys or values (:func:`attrax._heads.
    patch_attention_inputs`), labelled: queries on their stack's query positions, keys and
    values on its key positions (the encoder's, for cross-attention)."""
    model = call.model
    on_decoder, stack = _attention_input_stack(model, site, stack)
    assert corrupted is not None
    if isinstance(corrupted, Ablation):  # [B, heads, positions, d] on the stack's positions
        real = _averaged_over(call, corrupted, on_decoder)
        given: Any = functools.partial(corrupted.apply, mask=real, positions=2)
    else:
        corrupt = _corrupted_ids(model, call, corrupted, not on_decoder)
        with torch.no_grad():
            embeds = model.embed(corrupt[0], "source")
        given = (embeds, corrupt[1], corrupt[2], corrupt[0])
    stacked, chosen_layers, chosen_heads = patch_attention_inputs(
        call,
        given,
        stack,
        site,
        qk_fix is not False,
        layers,
        heads,
        drop,
    )
    coords = {"layer": chosen_layers, "head": chosen_heads}
    return _positions(call, stacked, coords, on_decoder)


def _grad_drop(model: Model, method: str, site: str) -> Drop:
    """GradDrop's blocks: a decoder-only model's (or its classifier's) layers
    (:func:`decoder_blocks`)."""
    if site == "residual":
        raise OptionError(
            "`grad_drop=True` averages over the layers other than a node's own; the residual "
            "stream after a layer is no node inside one (site='heads', 'mlp', 'queries', "
            "'keys' or 'values')"
        )
    if model.is_encoder_decoder:
        raise OptionError(
            f"`grad_drop=True` drops the layers of one residual stream: decoder-only models and "
            f"classifiers; {model.name} is an encoder-decoder"
        )
    if getattr(model.hf.config, "do_layer_norm_before", True) is False:
        raise ModelError(
            f"`grad_drop=True` sends a layer's gradient down its skip connection; {model.name} "
            "normalises after each residual sum (OPT-350m's layout), so its blocks have none"
        )
    blocks = decoder_blocks(model, method)
    if len(blocks) < 2:
        raise OptionError(
            f"`grad_drop=True` averages over the layers other than a node's own: {model.name} "
            f"has {len(blocks)} layer"
        )
    return Drop(blocks)


def _positions(
    call: Call, stacked: torch.Tensor, coords: dict[str, list[int]], on_decoder: bool
) -> xr.DataArray:
    """``stacked`` ``[B, K, positions, layer(, head)]`` labelled: the positions are the source
    tokens, or on an encoder-decoder's decoder the ``(side, position)`` index of side
    ``"target"``."""
    trailing = tuple(coords)
    if not on_decoder:
        return call.label([stacked], trailing=trailing, trailing_coords=coords)
    # decoder positions: labelled as the target side of the (side, position) source index
    sources = call.problem.tensors.ids.shape[1]
    encoder = torch.full(
        (*stacked.shape[:2], sources, *stacked.shape[3:]), torch.nan, dtype=stacked.dtype
    )
    da = call.label([encoder, stacked], trailing=trailing, trailing_coords=coords)
    return da.isel(source=slice(sources, None))


def _corrupted_ids(
    model: Model, call: Call, corrupted: Texts, same_length: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Token ids ``[B, L]``, attention mask and segment ids (None: the model takes none) of the
    corrupted run, aligned position by position with the clean ones (same targets
    teacher-forced); an InputError when a corrupted input's length differs. Without
    ``same_length`` (an encoder-decoder's decoder stacks, patched on the decoder positions) the
    corrupted source keeps its own length and padding."""
    batch = call.batch
    t = to_tensors(batch, model)
    # each corrupted input as its clean one: a text, or a (text, text_pair) pair
    wanted = ["pair" if _paired(e) else "text" for e in batch.examples]
    given = [corrupted] if batch.single else corrupted
    if (
        isinstance(given, str)
        or not isinstance(given, (list, tuple))
        or [_shape(v) for v in given] != wanted
    ):
        what = (
            f"one {'(text, text_pair) pair' if wanted[0] == 'pair' else 'text'}"
            if batch.single
            else f"{len(wanted)} inputs, each a text or a (text, text_pair) pair as its clean one"
        )
        raise InputError(f"`corrupted` must align with `inputs` ({what}), got {corrupted!r}")
    texts = list(given)
    if model.task == "generation":
        other = contrast_batch(model, batch, corrupted, "corrupted")
        theirs = to_tensors(other, model)
        ids, mask, types = theirs.ids, theirs.mask, theirs.token_types
        lengths = [len(e.source_ids) for e in other.examples]
    else:  # only the tokens: a corrupted text needs no class, answer or mask of its own
        ids, mask, types = padded_inputs(model, corrupted, "corrupted")
        lengths = mask.sum(-1).tolist()
    if not same_length:
        return ids, mask, types
    clean_lengths = [len(e.source_ids) for e in batch.examples]
    for i, (clean, bad) in enumerate(zip(clean_lengths, lengths, strict=True)):
        if clean != bad:
            where = "" if batch.single else f"[{i}]"
            hint = (
                " (stack='decoder' or 'cross', patched on the decoder positions, take any length)"
                if model.is_encoder_decoder
                else ""
            )
            raise InputError(
                f"`corrupted{where}` {texts[i]!r} has {bad} tokens but its clean input has "
                f"{clean}: {call.method.replace('_', ' ')} patches position by position, so both "
                f"must have the same token length{hint}"
            )
    if ids.shape != t.ids.shape:
        raise InputError(
            f"`corrupted` tokenizes to shape {tuple(ids.shape)}, the clean inputs to "
            f"{tuple(t.ids.shape)}: they must align position by position"
        )
    # padded positions keep the clean ids: the mask hides them either way
    ids = torch.where(t.mask.bool(), ids, t.ids)
    return ids, t.mask, types


def _paired(example: Any) -> bool:
    """Whether a classifier's example is a (text, text_pair) pair."""
    return example.segments is not None and 1 in example.segments


def _shape(value: Any) -> str | None:
    if isinstance(value, str):
        return "text"
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return "pair"
    return None
