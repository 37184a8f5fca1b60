"""Edge attribution patching: EAP (Syed, Rager and Conmy 2023) and EAP-IG (Hanna, Pezzelle and
Belinkov 2024), every edge of a decoder-only model's or an encoder's computational graph from
one vectorized backward per pass.

The graph is ACDC's: the residual stream is a sum, so each node that writes to it (the
embeddings, each attention head through its slice of the output projection, each MLP) feeds
each node that reads it after (each head's query, key and value input, each MLP's input, the
logits). Patching one edge ``u -> v`` (only ``v`` sees ``u``'s corrupted output) changes the
objective by about ``(u_corrupted - u_clean) . d objective / d input_v``, summed over positions.

``input_v`` is ``v``'s own copy of the residual stream: a head reads it through its block's
norm and its rows of the query, key or value projection. Rather than one gradient per head's
copy, the deltas are pushed forward through the norm (a ``jvp`` per block, ``vmap``-ed over a
block of senders, the same for every target) and met, per head, by the gradient at the
projection's output pulled back through that head's rows of the weight: the projection is
linear, the norm is not, and the sum over positions and features is the same.

Pre-norm blocks ``x + attn(norm_1(x))`` then ``+ mlp(norm_2(.))``, as GPT-2's and Llama's, and
parallel ones ``x + attn(norm_1(x)) + mlp(norm_2(x))`` (GPT-NeoX's; GPT-J's, Phi's and Cohere's on
one norm: the MLP's input is then met as a head's, the deltas pushed through the norm) are
checked on the clean run: a block that does not add exactly what its output projection and its
MLP return (residual scales other than the config's), or that holds weights the edges do not
account for (an output gate, a norm over several heads' vectors), is a :class:`ModelError`.
Blocks with a norm on each sublayer's output too (Gemma 2's and 3's, GLM-4's) keep each head
and each MLP a sender, before that norm: its delta reaches the stream through the norm's
derivative at the point where the gradient is taken (a ``jvp`` there), as patching the edge
moves that norm's input; blocks with those norms and none before the sublayers (OLMo 2's and
3's, EXAONE 4's) take the same path, their heads reading the stream itself. A query or key norm
over all of a projection's heads at once (OLMo 2's, OLMoE's) makes a head's receiver its slice
of that norm's output, the deltas pushed through the projection and the norm's derivative.
Multi-head latent attention (DeepSeek V2's and V3's) holds no projection whose output is a
head's query, key or value: its receivers are the attention call's own, the probes added there
and the deltas pushed through the module's code up to the call (a ``jvp``).
Post-norm encoders' blocks (BERT's ``LN_2(h + mlp(h))``, ``h = LN_1(x + attn(x))``) carry a
sender's delta up through each LayerNorm between it and the receiver.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np
import torch
import xarray as xr

from . import _validate as check
from ._components import Ablation, GaussianNoise, _averaged_over, _corrupted, _corrupted_ids
from ._drop import pulled
from ._engine import vjp
from ._errors import InputError, ModelError, OptionError
from ._gradients import QUADRATURES, check_quadrature_steps, quadrature_nodes
from ._heads import IMPLEMENTATION, _placed, _probes_at, _probing, record_calls
from ._memory import between_passes, full_precision
from ._model import Model, refuse_seq2seq_classifier
from ._protocol import Call, Family
from ._routed import convolved
from ._schema import label_edges
from ._sites import decoder_stack, encoder_stack, named

METHOD = "edge_attribution_patching"

EDGES = Family(
    name="edges",
    differentiates=True,
    takes=(
        "objective",
        "contrast",
        "positions",
        "chunk_size",
        "batch_size",
        "max_new_tokens",
        "max_memory",
    ),
    refuses={
        "attribute_target": "edge attribution patching scores the model's edges, summed over "
        "the positions: there are no source positions to attribute",
    },
)

#: a block's norm before its attention, and before its MLP (GPT-2's; Llama's and its kin's and
#: GPT-NeoX's; Falcon-40B's; OPT's). A block without the second runs its MLP on the first's output,
#: beside its attention (GPT-J, CodeGen, Phi, Cohere, Falcon-7B, parallel StableLM)
NORMS = (
    ("ln_1", "ln_2"), ("input_layernorm", "post_attention_layernorm"), ("ln_attn", "ln_mlp"),
    ("self_attn_layer_norm", "final_layer_norm"),  # OPT's and BioGPT's (pre-LN)
    ("input_layernorm", "pre_feedforward_layernorm"),  # VaultGemma's (Gemma 2's, less its posts)
    ("attn_norm", "mlp_norm"),  # ModernBERT's (its first layer's attention norm an Identity)
)  # fmt: skip
#: encoders whose blocks are pre-norm, as a decoder-only model's (the rest are post-norm: BERT's
#: LayerNorm of each residual sum)
PRE_NORM_ENCODERS = ("modernbert",)
#: post-norm encoders' blocks, ``LN_2(h + mlp(h))`` with ``h = LN_1(x + attn(x))``: the module
#: whose input is the block's input the attention reads, the module holding the query, key and
#: value projections and their names, ``LN_1``, the MLP's first module (it reads ``h``) and
#: ``LN_2`` (the output projection and the MLP's last module are :data:`_sites.ENCODERS`')
POST_NORM_ENCODERS = {
    **dict.fromkeys(
        ("bert", "roberta", "xlm-roberta", "camembert", "electra"),
        ("attention", "attention.self", ("query", "key", "value"), "attention.output.LayerNorm",
         "intermediate", "output.LayerNorm"),
    ),
    "distilbert": ("attention", "attention", ("q_lin", "k_lin", "v_lin"), "sa_layer_norm", "ffn",
                   "output_layer_norm"),
    # its relative attention also runs the query and key projections (or their own position
    # projections) on the relative position embeddings: 2-D, no stream, not a receiver's input
    "deberta-v2": ("attention", "attention.self", ("query_proj", "key_proj", "value_proj"),
                   "attention.output.LayerNorm", "intermediate", "output.LayerNorm"),
}  # fmt: skip
#: post-LN OPT's blocks (OPT-350m's, `do_layer_norm_before=False`), as
#: :data:`POST_NORM_ENCODERS` lays them out
POST_NORM_OPT = ("self_attn", "self_attn", ("q_proj", "k_proj", "v_proj"), "self_attn_layer_norm",
                 "fc1", "final_layer_norm")  # fmt: skip
#: a DeBERTa attention's projections of the relative position embeddings alone
POSITION_PROJECTIONS = ("pos_key_proj", "pos_query_proj")
#: blocks with a norm on each sublayer's output too (before the attention, after it, before the
#: MLP, after it): Gemma 2's and 3's; GLM-4's
SANDWICH = (
    ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
     "post_feedforward_layernorm"),
    ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm",
     "post_mlp_layernorm"),
)  # fmt: skip
#: norms on the attention's and the MLP's outputs, with none before them (OLMo 2's and 3's,
#: EXAONE 4's; Llama's `post_attention_layernorm` is before its MLP, beside `input_layernorm`)
OUTPUT_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")
#: a block's attention module (GPT-NeoX's `attention`, Falcon's `self_attention`)
ATTENTIONS = ("attn", "self_attn", "attention", "self_attention")
#: config flags of blocks whose MLP reads the block's input beside the attention, each on its
#: own norm (GPT-NeoX, Falcon-40B)
PARALLEL = ("use_parallel_residual", "parallel_attn")
#: how far a check of the block's sums may be off in each dtype, relative to its terms' sizes
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}


@dataclass(frozen=True)
class Reader:
    """A projection a block's attention reads the normed residual stream through, its output
    cut into parts (``"q"``, ``"k"``, ``"v"``), each ``heads`` heads of ``head_dim``."""

    module: torch.nn.Module
    parts: tuple[tuple[str, int], ...]
    #: each key/value head's queries, key and value side by side (``[kv heads, queries per
    #: kv head + 2, head_dim]``: GPT-NeoX's and GPT-BigCode's without multi-query, one query
    #: each; Falcon-40B's) rather than the queries, then the keys, then the values
    grouped: bool = False
    #: a norm over all of the projection's heads at once, on its output (OLMo 2's and OLMoE's
    #: ``q_norm`` and ``k_norm``): a head's receiver is that norm's output's slice, its delta
    #: pushed through the projection and the norm's derivative
    norm: torch.nn.Module | None = None
    #: the receivers are the attention call's query, key and value themselves, made by the
    #: attention module (``module``) from what it reads, each part's heads ``dims`` wide
    #: (multi-head latent attention's: no projection's output holds them); their deltas are
    #: pushed through the module's code up to the call (a ``jvp``), the probes sit at the call
    dims: tuple[int, ...] = ()

    @property
    def call(self) -> bool:
        """Whether the receivers are the attention call's inputs (:attr:`dims` given)."""
        return bool(self.dims)

    @property
    def width(self) -> int:
        """The width of the receivers' probes: the projection's output, or the call's query,
        key and value heads side by side."""
        if self.call:
            return sum(h * d for (_, h), d in zip(self.parts, self.dims, strict=True))
        return _width(self.module, "out") or 0

    def weight(self) -> torch.Tensor:
        """``[out, in]``: a ``Linear``'s weight, or GPT-2's ``Conv1D``'s transposed."""
        w = cast("torch.Tensor", self.module.weight)
        return w.T if type(self.module).__name__ == "Conv1D" else w

    def blocked(self, t: torch.Tensor) -> torch.Tensor:
        """``t``'s last dim (the output's features) in the parts' order, each part's heads
        after each other, as the receivers are cut."""
        if not self.grouped:
            return t
        kv = self.parts[1][1]
        x = t.unflatten(-1, (kv, self.parts[0][1] // kv + 2, -1))
        return torch.cat((x[..., :-2, :].flatten(-3), x[..., -2, :].flatten(-2),
                          x[..., -1, :].flatten(-2)), -1)  # fmt: skip


@dataclass(frozen=True)
class Block:
    """One pre-norm block's nodes: what it reads the residual stream through and what it adds."""

    block: torch.nn.Module
    attn_norm: torch.nn.Module
    readers: tuple[Reader, ...]
    out_proj: torch.nn.Module
    mlp_norm: torch.nn.Module
    mlp: torch.nn.Module
    #: the MLP reads the block's input, beside the attention, not the input plus its output
    parallel: bool = False
    #: the module that reads the MLP's norm's output: the MLP, or OPT's `fc1` (its `fc2` adds)
    mlp_in: torch.nn.Module | None = None
    #: what the block scales the attention's and the MLP's outputs by as it adds them (Granite's
    #: `residual_multiplier`)
    scale: float = 1.0
    #: the norms on the attention's and the MLP's outputs, before the block adds them (Gemma 2's
    #: and 3's, GLM-4's), or None
    attn_post: torch.nn.Module | None = None
    mlp_post: torch.nn.Module | None = None
    #: a post-norm block (BERT's): ``attn_norm`` is the LayerNorm of the input plus the
    #: attention's output, ``mlp_norm`` that of its output plus the MLP's; the attention reads
    #: the input of ``attn_in``, the MLP that of ``mlp_in``
    post_ln: bool = False
    attn_in: torch.nn.Module | None = None
    #: no norm before the attention or the MLP, only on their outputs (OLMo 2's and 3's,
    #: EXAONE 4's): ``attn_norm`` and ``mlp_norm`` are identities of attrax's own (not in the
    #: model: no hook of theirs runs), the attention reads the input of ``attn_in``, the MLP
    #: its own input
    normless: bool = False
    #: norms in the attention whose gains are ``[heads, head_dim]`` (Cohere's query and key
    #: norms, Command R+'s): each head's alone, as the clean run checks
    head_norms: tuple[torch.nn.Module, ...] = ()
    #: the attention module that reads the stream and calls the attention function (a
    #: reader of its call's inputs stands in for projections laid out otherwise: CodeGen's)
    attention: torch.nn.Module | None = None

    @property
    def reads(self) -> torch.nn.Module:
        """The module whose input is the MLP's, past its norm."""
        return self.mlp_in or self.mlp

    @property
    def reads_itself(self) -> bool:
        """The attention reads the block's input, unnormed (post-norm and normless blocks)."""
        return self.post_ln or self.normless

    @property
    def shared(self) -> bool:
        """One norm before both the attention and the MLP (GPT-J, Phi, Cohere)."""
        return self.mlp_norm is self.attn_norm


@dataclass(frozen=True)
class Graph:
    """The blocks, the query heads per layer, each head's width, and the node names."""

    blocks: list[Block]
    heads: int
    head_dim: int
    #: the method whose graph it is, for its errors
    method: str = METHOD

    @property
    def width(self) -> int:
        """The residual stream's width (OPT's embeddings may be narrower, projected in)."""
        return cast("int", _width(self.blocks[0].out_proj, "out"))

    @property
    def senders(self) -> list[tuple[str, int, int]]:
        """``(name, layer, head)`` per sender: ``"input"``, then per layer ``"a{l}.h{h}"`` for
        each head and ``"m{l}"`` (-1: no layer or head), in the order they run, so the senders
        before a receiver are a prefix."""
        out = [("input", -1, -1)]
        for layer in range(len(self.blocks)):
            out += [(f"a{layer}.h{h}", layer, h) for h in range(self.heads)]
            out.append((f"m{layer}", layer, -1))
        return out

    @property
    def post_ln(self) -> bool:
        """Post-norm blocks (BERT's): a sender's delta reaches a receiver through each
        LayerNorm between them."""
        return self.blocks[0].post_ln

    @property
    def at_calls(self) -> bool:
        """Whether some receivers are attention calls' inputs: the passes run attrax's eager
        attention, which adds their probes."""
        return any(r.call for b in self.blocks for r in b.readers)

    @property
    def over_heads(self) -> list[int]:
        """The widths of the readers whose heads are made together: with a norm over all
        their heads, or by the attention's own code (latent attention's); none: []."""
        return [r.width for b in self.blocks for r in b.readers if r.norm or r.call]

    def first_head(self, layer: int) -> int:
        """The sender index of layer ``layer``'s head 0."""
        return 1 + layer * (self.heads + 1)

    @property
    def normed(self) -> list[tuple[slice, torch.nn.Module]]:
        """The senders that reach the stream through a norm on their sublayer's output (a
        layer's heads, its MLP), as their rows and that norm: their deltas are pushed through
        it where they are met, at the point's input to it."""
        out = []
        for layer, b in enumerate(self.blocks):
            first = self.first_head(layer)
            if b.attn_post is not None:
                out.append((slice(first, first + self.heads), b.attn_post))
            if b.mlp_post is not None:
                out.append((slice(first + self.heads, first + self.heads + 1), b.mlp_post))
        return out

    def before_attention(self, layer: int) -> int:
        """How many senders layer ``layer``'s attention reads: the input and earlier layers."""
        return 1 + layer * (self.heads + 1)

    def before_mlp(self, layer: int) -> int:
        """How many senders layer ``layer``'s MLP reads: its attention's heads too, unless it
        runs beside them."""
        return self.before_attention(layer) + (0 if self.blocks[layer].parallel else self.heads)

    def edges(self) -> torch.Tensor:
        """``[U, R]`` bool: the edges, each receiver reading the senders before it (a parallel
        block's MLP: not its own layer's heads)."""
        prefix = [
            len(self.senders) if part == "logits"
            else self.before_mlp(layer) if part == "mlp" else self.before_attention(layer)
            for _, layer, part, _ in self.receivers()
        ]  # fmt: skip
        return torch.arange(len(self.senders))[:, None] < torch.tensor(prefix)[None]

    def receivers(self) -> list[tuple[str, int, str, int]]:
        """``(name, layer, input, head)`` per receiver: each layer's heads' ``q``, ``k``, ``v``
        inputs (key/value heads under grouped-query attention), its MLP's, then the logits."""
        out = []
        for layer, block in enumerate(self.blocks):
            for reader in block.readers:
                for part, heads in reader.parts:
                    out += [(f"a{layer}.h{h}<{part}>", layer, part, h) for h in range(heads)]
            out.append((f"m{layer}", layer, "mlp", -1))
        out.append(("logits", len(self.blocks), "logits", -1))
        return out


#: subclasses of ``Linear`` (or GPT-2's ``Conv1D``) whose forward is ``x @ weight.T + bias``
LINEAR = ("Conv1D", "FalconLinear")


def exactly_linear(module: torch.nn.Module | None) -> bool:
    """Exactly a ``Linear``, GPT-2's ``Conv1D`` or Falcon's ``FalconLinear``: another subclass
    (a quantized one) may compute otherwise than its ``weight`` says."""
    return module is not None and (
        type(module) is torch.nn.Linear or type(module).__name__ in LINEAR
    )


def _width(module: torch.nn.Module, side: str) -> int | None:
    names = ("out_features", "nf") if side == "out" else ("in_features", "nx")
    return next(
        (getattr(module, n) for n in names if isinstance(getattr(module, n, None), int)), None
    )


def graph(model: Model, method: str = METHOD) -> Graph:
    """The blocks of a decoder-only model (GPT-2's, Llama's and its kin's layouts) or an encoder
    (:data:`PRE_NORM_ENCODERS`, :data:`POST_NORM_ENCODERS`), or a :class:`ModelError` naming
    what is missing (and ``method``)."""
    refuse_seq2seq_classifier(model, method)
    kind = type(model.hf).__name__
    encoder = not model.is_encoder_decoder and not model.causal
    known_encoder = (*PRE_NORM_ENCODERS, *POST_NORM_ENCODERS)
    if model.is_encoder_decoder or (encoder and model.hf.config.model_type not in known_encoder):
        what = (
            "an encoder-decoder"
            if model.is_encoder_decoder
            else "an encoder attrax has no edges of"
        )
        raise ModelError(
            f"{method}: {kind} is {what}; the edges attrax scores are those of decoder-only "
            "models (GPT-2, GPT-Neo, Llama, Mistral, Qwen2, Phi-3, ...) and of the encoders "
            f"{', '.join(known_encoder)}"
        )
    post_ln_opt = model.hf.config.model_type == "opt" and (
        getattr(model.hf.config, "do_layer_norm_before", True) is False
    )
    if post_ln_opt or (encoder and model.hf.config.model_type in POST_NORM_ENCODERS):
        return _post_norm_graph(model, method)
    stack = encoder_stack(model, method) if encoder else decoder_stack(model, method)
    config = model.hf.config
    found = []
    head_dims = set()
    for layer, (block, out_proj, mlp) in enumerate(
        zip(stack.blocks, stack.projections, stack.mlps, strict=True)
    ):
        attn_norm, attn_post, mlp_norm, mlp_post = _norms(block)
        # norms on the sublayers' outputs only: each sublayer reads the stream itself
        normless = attn_norm is None and attn_post is not None and mlp_post is not None
        # one norm for both: the MLP reads its output beside the attention
        parallel = any(getattr(config, f, False) is True for f in PARALLEL)
        parallel = parallel or (mlp_norm is None and not normless)
        attention = named(block, ATTENTIONS)
        assert out_proj is not None  # decoder_stack refuses a layer without attention here
        width = _width(out_proj, "in")
        where = f"{method}: {kind}'s layer {layer}"
        if getattr(config, "do_layer_norm_before", True) is False:  # BioGPT-like kin of OPT
            raise ModelError(
                f"{where} is post-LN (do_layer_norm_before=False; its norms follow the attention "
                "and the MLP): attrax scores the edges of post-LN OPT and encoders only"
            )
        if attn_norm is None and not normless:
            raise ModelError(
                f"{where} is not a pre-norm block attrax knows: no norm "
                f"{' / '.join(dict.fromkeys(a for a, _ in NORMS))} before its attention, nor "
                f"{' and '.join(OUTPUT_NORMS)} on its attention's and MLP's outputs (norms named "
                "otherwise have no edges attrax can score)"
            )
        if attention is None:
            raise ModelError(
                f"{where} is not a pre-norm block attrax knows: its attention module is not "
                f"{' / '.join(ATTENTIONS)}"
            )
        if not exactly_linear(out_proj) or width is None:
            raise ModelError(
                f"{where}: its attention's output projection is a {type(out_proj).__name__}, "
                "not exactly a Linear or GPT-2's Conv1D (a quantized one computes otherwise "
                "than its weight says)"
            )
        head_dim = width // stack.heads
        head_dims.add(head_dim)
        # GPT-Neo wraps its attention module in another (`attn.attention`)
        inner = named(attention, ("attention",)) or attention
        readers = _readers(inner, stack.heads, head_dim) or _latent(inner, stack.heads)
        if readers is None:
            raise ModelError(
                f"{where} reads its queries, keys and values through no projection attrax "
                "knows (exactly a Linear or Conv1D: GPT-2's fused `c_attn`, Phi-3's `qkv_proj`, "
                "GPT-NeoX's `query_key_value`, or `q_proj`, `k_proj` and `v_proj`; or "
                "multi-head latent attention's `kv_b_proj`)"
            )
        if attn_norm is None or mlp_norm is None:  # normless; or one norm for both
            attn_norm = attn_norm or torch.nn.Identity()
            mlp_norm = torch.nn.Identity() if normless else attn_norm
        # OPT's and BioGPT's MLP is no module: `fc1` reads the norm, `fc2` adds its output
        mlp_in = named(block, ("fc1",)) if mlp is named(block, ("fc2",)) else None
        outer = named(block, ("mlp",))
        if outer is not None and outer is not mlp and _inside(mlp, outer):
            # BLOOM's `mlp` adds the residual stream itself: what it adds of its own is its
            # last projection's output (the clean run checks the sums)
            mlp_in = outer
        # the clean run checks the blocks add their sublayers' outputs times this
        scale = getattr(config, "residual_multiplier", 1.0)
        scale = float(scale) if isinstance(scale, (int, float)) else 1.0
        if attn_post is not None or mlp_post is not None:
            scale = 1.0  # what the block adds is the norms' outputs: the checks see any scale
        known = [attn_norm, mlp_norm, mlp, attention, *([mlp_in] if mlp_in else [])]
        known += [m for m in (attn_post, mlp_post) if m is not None]
        _account(where, block, known, "block")
        reading = [
            m
            for r in readers
            for m in (_latent_parts(inner) if r.call else (r.module, r.norm))
            if m is not None
        ]
        head_norms = _per_head_gains(inner, head_dim)
        _account(where, inner, [*reading, *head_norms, out_proj], "attention", head_dim)
        found.append(
            Block(block, attn_norm, readers, out_proj, mlp_norm, mlp, parallel, mlp_in, scale,
                  attn_post, mlp_post, attn_in=attention if normless else None,
                  normless=normless, head_norms=head_norms, attention=inner)
        )  # fmt: skip
    if len(head_dims) > 1:
        raise ModelError(
            f"{method}: {kind}'s layers differ in their heads' width ({sorted(head_dims)} for "
            f"{stack.heads} heads a layer): the edges label every layer's heads alike"
        )
    return Graph(found, stack.heads, head_dims.pop(), method)


def _norms(block: torch.nn.Module) -> tuple[torch.nn.Module | None, ...]:
    """The block's norms before its attention, after it, before its MLP and after it (None
    where it has none; no second norm: the MLP reads the first's output, beside the attention)."""
    for names in SANDWICH:
        found = [named(block, (n,)) for n in names]
        if all(m is not None for m in found):
            return tuple(found)
    pairs = [(named(block, (a,)), named(block, (m,))) for a, m in NORMS]
    attn, mlp = next(
        (p for p in pairs if p[0] is not None and p[1] is not None),
        next((p for p in pairs if p[0] is not None), (None, None)),
    )
    outputs = [named(block, (n,)) for n in OUTPUT_NORMS]
    if attn is None and all(m is not None for m in outputs):
        return None, outputs[0], None, outputs[1]
    return attn, None, mlp, None


def _post_norm_graph(model: Model, method: str) -> Graph:
    """A post-norm model's blocks (:data:`POST_NORM_ENCODERS`; post-LN OPT's,
    :data:`POST_NORM_OPT`), its weights accounted for."""
    config = model.hf.config
    if config.model_type == "opt":
        attention, holder, names, ln_1, mlp_in, ln_2 = POST_NORM_OPT
        stack = decoder_stack(model, method)
    else:
        attention, holder, names, ln_1, mlp_in, ln_2 = POST_NORM_ENCODERS[config.model_type]
        if convolved(model.hf):
            raise ModelError(
                f"{method}: {type(model.hf).__name__} adds a convolution beside its first layer "
                "(conv_kernel_size > 0): it mixes tokens outside the edges' nodes"
            )
        stack = encoder_stack(model, method)
    found = []
    for layer, (block, out_proj, mlp) in enumerate(
        zip(stack.blocks, stack.projections, stack.mlps, strict=True)
    ):
        where = f"{method}: {type(model.hf).__name__}'s layer {layer}"
        assert out_proj is not None
        width = _width(out_proj, "in")
        try:
            projections = [block.get_submodule(f"{holder}.{n}") for n in names]
            attn, first = block.get_submodule(attention), block.get_submodule(mlp_in)
            norm_1, norm_2 = block.get_submodule(ln_1), block.get_submodule(ln_2)
        except AttributeError as err:  # a remote-code model of that type, laid out otherwise
            raise ModelError(
                f"{where} is not laid out as {config.model_type}'s blocks attrax knows ({err})"
            ) from None
        if not all(map(exactly_linear, [*projections, out_proj])) or width is None:
            raise ModelError(
                f"{where}: its query, key, value or output projection is not exactly a Linear "
                "(a quantized one computes otherwise than its weight says)"
            )
        head_dim = width // stack.heads
        widths = [_width(m, "out") for m in projections]
        if any(w != stack.heads * head_dim for w in widths):
            raise ModelError(f"{where}: its query, key and value are not {stack.heads} heads wide")
        readers = tuple(
            Reader(m, ((p, stack.heads),)) for p, m in zip("qkv", projections, strict=True)
        )
        _account(where, block, [attn, first, mlp, norm_1, norm_2], "block")
        # the position projections read the relative embeddings, not the stream
        inner = block.get_submodule(holder)
        positional = [m for n in POSITION_PROJECTIONS if (m := named(inner, (n,))) is not None]
        _account(where, attn, [*projections, out_proj, norm_1, *positional], "attention", head_dim)
        found.append(
            Block(block, norm_1, readers, out_proj, norm_2, mlp, mlp_in=first, post_ln=True,
                  attn_in=attn)
        )  # fmt: skip
    return Graph(found, stack.heads, head_dim, method)


#: parameters an attention may hold of its own: one per head (GPT-OSS's sinks)
OWN_PARAMETERS = ("sinks",)


def _account(
    where: str, module: torch.nn.Module, known: list[torch.nn.Module], what: str,
    head_dim: int | None = None,
) -> None:  # fmt: skip
    """A :class:`ModelError` where ``module`` holds weights the edges do not account for: a
    module with parameters beside ``known`` (an attention's output gate, a norm after a
    sublayer, a layer scale), or, in an attention, a norm over more than one head's vector
    that is not among ``known`` (a reader's norm over all its heads, OLMoE's, is; Qwen3's, one
    head wide, mix no heads)."""
    for name, sub in module.named_modules():
        if sub is module or any(sub is k or _inside(sub, k) for k in known):
            continue
        own = list(sub.parameters(recurse=False))
        if not own:
            continue
        per_head = head_dim is not None and "norm" in type(sub).__name__.lower()
        if per_head and all(p.numel() == head_dim for p in own):
            continue  # a norm of each head's query or key alone: it mixes no heads
        raise ModelError(
            f"{where}: its {what} holds `{name}` ({type(sub).__name__}), whose weights the "
            "edges do not account for (an output gate, a norm after a sublayer or over several "
            "heads' vectors): its edges would mean something else"
        )
    stray = [n for n, _ in module.named_parameters(recurse=False) if n not in OWN_PARAMETERS]
    if stray:
        raise ModelError(
            f"{where}: its {what} holds the parameters {stray} of its own, which the edges do "
            "not account for"
        )


def _per_head_gains(attention: torch.nn.Module, head_dim: int) -> tuple[torch.nn.Module, ...]:
    """The norms in ``attention`` whose gains are ``[heads, head_dim]`` (Cohere's ``q_norm``
    and ``k_norm``): per head by their gains' shape; the clean run checks they mix no heads."""
    return tuple(
        sub
        for sub in attention.modules()
        if "norm" in type(sub).__name__.lower()
        and (own := list(sub.parameters(recurse=False)))
        and all(p.dim() == 2 and p.shape[-1] == head_dim for p in own)
    )


def _inside(sub: torch.nn.Module, outer: torch.nn.Module) -> bool:
    return any(sub is m for m in outer.modules())


def _readers(attention: torch.nn.Module, heads: int, head_dim: int) -> tuple[Reader, ...] | None:
    """The query, key and value projections of one attention, their widths checked."""

    def fused(module: torch.nn.Module | None, mine: int) -> tuple[Reader, ...] | None:
        if module is None or not exactly_linear(module):
            return None
        out = _width(module, "out")
        if out is None or (out // head_dim - mine) % 2 or out % head_dim:
            return None
        kv = (out // head_dim - mine) // 2
        if kv <= 0:
            return None
        return (Reader(module, (("q", mine), ("k", kv), ("v", kv))),)

    if named(attention, ("q_attn",)) is None and (
        readers := fused(named(attention, ("c_attn", "qkv_proj", "query_key_value", "Wqkv")), heads)
    ):
        return readers
    separate = [named(attention, (f"{p}_proj",)) for p in "qkv"]
    if not all(map(exactly_linear, separate)):
        return None
    widths = [_width(cast("torch.nn.Module", m), "out") for m in separate]
    if any(w is None or w % head_dim for w in widths) or widths[0] != heads * head_dim:
        return None
    return tuple(
        Reader(cast("torch.nn.Module", m), ((p, cast("int", w) // head_dim),),
               norm=_over_heads(named(attention, (f"{p}_norm",)), cast("int", w), head_dim))
        for p, m, w in zip("qkv", separate, widths, strict=True)
    )  # fmt: skip


#: multi-head latent attention's modules (DeepSeek V2's and V3's kin): the latent that holds the
#: keys and values; the queries straight from the stream or through their own latent; and an
#: indexer (V3.2's, GLM-5's), whose picks are a mask of the call
LATENT = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj")
LATENT_QUERIES = ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "indexer")


def _latent_parts(attention: torch.nn.Module) -> list[torch.nn.Module | None]:
    """The modules a latent attention makes its call's inputs with: any other module with
    weights in it (an output gate: Dots3 Note's `g_proj`) is one the edges do not account for."""
    return [named(attention, (n,)) for n in (*LATENT, *LATENT_QUERIES)]


def _latent(attention: torch.nn.Module, heads: int) -> tuple[Reader, ...] | None:
    """Multi-head latent attention's one reader: the attention module, its receivers the
    call's queries, keys (each head's, its rotated part shared) and values; None for another
    attention. An indexer's picks (DeepSeek V3.2's, GLM-5's) are a mask of the call, made of
    what the module reads: no receiver."""
    if not all(named(attention, (n,)) is not None for n in LATENT):
        return None
    dims = [getattr(attention, n, None) for n in ("qk_nope_head_dim", "qk_rope_head_dim",
                                                   "v_head_dim")]  # fmt: skip
    if not all(isinstance(d, int) and d > 0 for d in dims):
        return None
    nope, rope, value = cast("list[int]", dims)
    if _width(cast("torch.nn.Module", named(attention, ("kv_b_proj",))), "out") != heads * (
        nope + value
    ):
        return None
    parts = (("q", heads), ("k", heads), ("v", heads))
    return (Reader(attention, parts, dims=(nope + rope, nope + rope, value)),)


def _over_heads(norm: torch.nn.Module | None, width: int, head_dim: int) -> torch.nn.Module | None:
    """``norm`` where it spans all of a projection's ``width`` at once, as OLMo 2's query and
    key norms do (Qwen3's, ``head_dim`` wide, norm each head alone: the receivers need
    nothing of them); None otherwise."""
    if norm is None or width == head_dim:
        return None
    own = list(norm.parameters())
    # one dim of the whole width: Cohere's `[heads, head_dim]` gains norm each head alone
    return norm if own and all(p.shape == (width,) for p in own) else None


# --- the runs --------------------------------------------------------------------------------


@contextlib.contextmanager
def _hooked(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _first(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


def _record(g: Graph, seen: dict[str, list[Any]]) -> list[Any]:
    """Hooks that record, per layer, the block's input, each norm's input and output, what
    each reader reads and returns, the heads (the output projection's input) and what the
    attention adds, what the MLP reads and adds; and the last block's output."""
    n = len(g.blocks)
    keys = ("block", "attn_norm", "norm_out", "heads", "attn", "mlp_norm", "mlp_in", "mlp_out")
    for key in (*keys, "mlp", *_POSTS):
        seen[key] = [None] * n
    seen["out"] = [None]
    for key in _NESTED:
        seen[key] = [[None] * len(b.readers) for b in g.blocks]
    seen["head_norm_in"] = [[None] * len(b.head_norms) for b in g.blocks]
    seen["call_in"] = [None] * n

    def keep(key: str, layer: int, output: bool = False, i: int = -1) -> Callable[..., Any]:
        def hook(_m: Any, args: Any, *rest: Any) -> None:
            kwargs = rest[0] if rest and isinstance(rest[0], dict) and not output else {}
            given = args[0] if args else kwargs.get("hidden_states")
            if i >= 0 and _positional(given):  # a reader run on position embeddings
                return
            value = cast("torch.Tensor", _first(rest[0]) if output else given)
            if value.dim() == 2:  # Llama 4's experts: [B * L, H] as [B, L, H]
                value = value.view(*seen["block"][layer].shape[:2], -1)
            value = value.detach().clone()
            if i >= 0:
                seen[key][layer][i] = value
            else:
                seen[key][layer] = value

        return hook

    handles = []
    for layer, b in enumerate(g.blocks):
        handles.append(b.block.register_forward_pre_hook(keep("block", layer), with_kwargs=True))
        if b.normless:  # no norm runs: each sublayer's input is its norms' input and output
            for key in ("attn_norm", "norm_out"):
                handles.append(cast("torch.nn.Module", b.attn_in).register_forward_pre_hook(
                    keep(key, layer), with_kwargs=True
                ))  # fmt: skip
            for key in ("mlp_norm", "mlp_in"):
                handles.append(b.reads.register_forward_pre_hook(keep(key, layer)))
        else:
            handles.append(b.attn_norm.register_forward_pre_hook(keep("attn_norm", layer)))
            handles.append(b.attn_norm.register_forward_hook(keep("norm_out", layer, True)))
            handles.append(b.mlp_norm.register_forward_pre_hook(keep("mlp_norm", layer)))
            handles.append(b.mlp_norm.register_forward_hook(keep("mlp_in", layer, True)))
        for i, r in enumerate(b.readers):
            if r.call:  # the attention module: what it reads (its receivers: the call's)
                handles.append(r.module.register_forward_pre_hook(
                    keep("read", layer, i=i), with_kwargs=True
                ))  # fmt: skip
                continue
            handles.append(r.module.register_forward_pre_hook(keep("read", layer, i=i)))
            handles.append(r.module.register_forward_hook(keep("returned", layer, True, i)))
            if r.norm is not None:
                handles.append(r.norm.register_forward_pre_hook(keep("norm_read", layer, i=i)))
        for i, norm in enumerate(b.head_norms):
            handles.append(norm.register_forward_pre_hook(keep("head_norm_in", layer, i=i)))
        if b.attention is not None:  # what it reads and its other arguments, as they run
            handles.append(b.attention.register_forward_pre_hook(
                _keeping_call(seen["call_in"], {}, layer, cloned=True), with_kwargs=True
            ))  # fmt: skip
        handles.append(b.out_proj.register_forward_pre_hook(keep("heads", layer)))
        handles.append(b.out_proj.register_forward_hook(keep("attn", layer, True)))
        handles.append(b.reads.register_forward_pre_hook(keep("mlp_out", layer)))
        handles.append(b.mlp.register_forward_hook(keep("mlp", layer, True)))
        for post, side in ((b.attn_post, "attn_post"), (b.mlp_post, "mlp_post")):
            if post is not None:
                handles.append(post.register_forward_pre_hook(keep(f"{side}_in", layer)))
                handles.append(post.register_forward_hook(keep(f"{side}_out", layer, True)))
    last = n - 1
    handles.append(g.blocks[last].block.register_forward_hook(_keep_out(seen)))
    return handles


def _keep_out(seen: dict[str, list[Any]]) -> Callable[..., None]:
    def hook(_m: Any, _args: Any, output: Any) -> None:
        seen["out"][0] = _first(output).detach().clone()

    return hook


def _check_blocks(g: Graph, seen: Mapping[str, list[Any]], kind: str) -> None:
    """A :class:`ModelError` unless every block is ``x + attn(norm_1(x))`` then ``+
    mlp(norm_2(.))``, its projections reading ``norm_1(x)`` and returning what their weights
    say, as the edges assume. Each sum is checked position by position against the size of its
    own terms: a residual stream's few huge entries must not hide a scale on a sublayer's."""

    def expected(key: str, layer: int) -> bool:  # a norm on an output: only where there is one
        if key == "call_in":
            return g.blocks[layer].attention is not None
        return key not in _POSTS or getattr(g.blocks[layer], key.rsplit("_", 1)[0]) is not None

    if any(
        v is None and expected(key, i) for key, values in seen.items() for i, v in enumerate(values)
    ) or any(
        v is None and _expected(g.blocks[layer], key, i)
        for key in _NESTED
        for layer, values in enumerate(seen[key])
        for i, v in enumerate(values)
    ):
        raise ModelError(f"{g.method}: {kind} did not run the modules attrax found in its blocks")
    recorded = [
        v
        for key, values in seen.items()
        for v in values
        if key not in (*_NESTED, "call_in") and v is not None
    ]
    recorded += [v for key in _NESTED for layer in seen[key] for v in layer if v is not None]
    if not all(bool(torch.isfinite(v).all()) for v in recorded):
        raise _not_finite(g.method)
    nxt = [*seen["block"][1:], seen["out"][0]]
    for layer, b in enumerate(g.blocks):
        for norm, given in zip(b.head_norms, seen["head_norm_in"][layer], strict=True):
            if not _each_head_alone(norm, given, g.head_dim):
                raise ModelError(
                    f"{g.method}: {kind}'s layer {layer} holds a {type(norm).__name__} with "
                    "gains per head that does not norm each head's vector alone (moving one "
                    "head's moves another's): its edges would mean something else"
                )
        x = seen["block"][layer]
        # each check: what the model made, and the terms it should be the sum of
        # what the block adds of each sublayer's output: past its norm, or times its scale
        attn, mlp = added(b, seen, layer, "attn"), added(b, seen, layer, "mlp")
        sums = {
            "the block's input is its first norm's": (seen["attn_norm"][layer], [x]),
            "the MLP reads the second norm's output": (
                seen["mlp_out"][layer], [seen["mlp_in"][layer]]
            ),
        }  # fmt: skip
        if b.attn_post is not None:
            sums["the attention's output norm reads the output projection's"] = (
                seen["attn_post_in"][layer], [seen["attn"][layer]]
            )  # fmt: skip
        if b.mlp_post is not None:
            sums["the MLP's output norm reads the MLP's"] = (
                seen["mlp_post_in"][layer], [seen["mlp"][layer]]
            )  # fmt: skip
        if b.post_ln:  # LN_2(h + mlp(h)), h = LN_1(x + attn(x))
            h = seen["norm_out"][layer]
            sums = {
                "the first LayerNorm reads the input plus the attention's output": (
                    seen["attn_norm"][layer], [x, seen["attn"][layer]]
                ),
                "the MLP reads the first LayerNorm's output": (seen["mlp_out"][layer], [h]),
                "the second LayerNorm reads the first's output plus the MLP's": (
                    seen["mlp_norm"][layer], [h, seen["mlp"][layer]]
                ),
                "the block's output is the second LayerNorm's": (nxt[layer], [seen["mlp_in"][layer]]),
            }  # fmt: skip
        elif b.parallel:
            sums["the MLP's norm reads the block's input"] = (seen["mlp_norm"][layer], [x])
            sums["the block's output adds the attention's and the MLP's"] = (
                nxt[layer], [x, attn, mlp]
            )  # fmt: skip
        else:
            sums["the second norm reads the input plus the attention's output"] = (
                seen["mlp_norm"][layer], [x, attn]
            )  # fmt: skip
            sums["the block's output adds the MLP's"] = (nxt[layer], [seen["mlp_norm"][layer], mlp])
        pairs = {what: (got, terms, _sizes(terms)) for what, (got, terms) in sums.items()}
        linear = [(b.out_proj, seen["heads"][layer], seen["attn"][layer], "output projection")]
        for i, r in enumerate(b.readers):
            read, returned = seen["read"][layer][i], seen["returned"][layer][i]
            # one key per reader: the query's, key's and value's Linears are each checked
            name = f"{type(r.module).__name__} ({', '.join(p for p, _ in r.parts)})"
            norm_out = [x if b.reads_itself else seen["norm_out"][layer]]
            what = "the block's input" if b.reads_itself else "the first norm's output"
            pairs[f"its {name} reads {what}"] = (read, norm_out, _sizes(norm_out))
            if r.call:  # its own code makes the receivers: the run checks the probes
                continue
            linear.append((r.module, read, returned, name))
            if r.norm is not None:
                normed = seen["norm_read"][layer][i]
                pairs[f"its {type(r.norm).__name__} reads its {name}'s output"] = (
                    normed, [returned], _sizes([returned])
                )  # fmt: skip
        for module, given, returned, name in linear:
            terms, sizes = _linear_terms(module, given)
            pairs[f"its {name} returns its weight times its input"] = (returned, terms, sizes)
        for what, (got, terms, sizes) in pairs.items():
            if not _sums(got, terms, sizes):
                layout = "post-norm" if b.post_ln else "parallel" if b.parallel else "sequential"
                raise ModelError(
                    f"{g.method}: {kind}'s layer {layer} is not a residual block as the "
                    f"edges assume ({layout} attention and "
                    f"MLP; {what}: it does not); residual scales other than the config's "
                    "`residual_multiplier` have no edges attrax can score"
                )


def _expected(b: Block, key: str, i: int) -> bool:
    """Whether :func:`_record` keeps ``key`` of block ``b``'s reader ``i`` (a norm's input only
    where it has one; what it returns not where the receivers are the attention call's)."""
    if key == "norm_read":
        return b.readers[i].norm is not None
    if key == "returned":
        return not b.readers[i].call
    return True


#: what :func:`_record` keeps per reader of each layer (``norm_read``: only where the reader
#: has a norm over its heads), and per norm of :attr:`Block.head_norms` (``head_norm_in``)
_NESTED = ("read", "returned", "norm_read", "head_norm_in")
#: what :func:`_record` keeps of the norms on the sublayers' outputs, where a block has them
_POSTS = ("attn_post_in", "attn_post_out", "mlp_post_in", "mlp_post_out")


def _each_head_alone(norm: torch.nn.Module, given: torch.Tensor, head_dim: int) -> bool:
    """Whether ``norm`` of what it read, ``given`` (``[..., heads, head_dim]``), moves no
    other head's output when the first head's input moves."""
    if given.dim() < 3 or given.shape[-1] != head_dim:
        return False
    moved = given.clone()
    moved[..., 0, :] = moved[..., 0, :] * 3 + 1
    with torch.no_grad():
        before, after = norm.forward(given), norm.forward(moved)  # not its hooks: no run's
    tol = TOLERANCE.get(before.dtype, 1e-4) * (float(before.abs().max()) or 1.0)
    return (
        bool((before[..., 1:, :] - after[..., 1:, :]).abs().max() <= tol)
        if given.shape[-2] > 1
        else True
    )


def added(b: Block, seen: Mapping[str, list[Any]], layer: int, side: str) -> torch.Tensor:
    """What block ``b`` adds to the stream of its attention's (``side="attn"``, the output
    projection's) or its MLP's output: past the norm on it, or times the block's scale."""
    if getattr(b, f"{side}_post") is not None:
        return cast("torch.Tensor", seen[f"{side}_post_out"][layer])
    return cast("torch.Tensor", seen[side][layer] * b.scale)


def _not_finite(method: str = METHOD) -> InputError:
    return InputError(
        f"{method}: the model's activations or the edges' scores are not finite (inf/NaN): "
        "the model's outputs overflowed or hold NaN; check the model's weights and dtype, and "
        "the inputs"
    )


def _sums(got: torch.Tensor, terms: list[torch.Tensor], sizes: list[torch.Tensor]) -> bool:
    """Whether ``got`` is the sum of ``terms`` at every position (the last dim: features),
    within the rounding of its dtype on ``sizes``, each term's size there."""
    want = terms[0] if len(terms) == 1 else torch.stack(terms).sum(0)
    if got.shape != want.shape:
        return False
    tol = TOLERANCE.get(got.dtype, 1e-4)
    size = sum(sizes) + torch.finfo(got.dtype).tiny
    return bool(((got - want).abs().amax(-1) <= tol * size).all())


def _sizes(terms: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.abs().amax(-1) for t in terms]


def _linear_terms(
    module: torch.nn.Module, x: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """An exact ``Linear``'s output for ``x`` as its terms (the product, the bias) and their
    sizes per position, the product's bounded by ``|x| |W|``, what its rounding grows with."""
    w = Reader(module, ()).weight().to(x.dtype)
    terms, sizes = [x @ w.T], [(x.abs() @ w.abs().T).amax(-1)]
    bias = getattr(module, "bias", None)
    if bias is not None:
        terms.append(bias.to(x.dtype).expand_as(terms[0]))
        sizes.append(bias.abs().amax().to(x.dtype).expand_as(sizes[0]))
    return terms, sizes


def _check_values(
    g: Graph, calls: Mapping[Any, Any], seen: Mapping[str, list[Any]], kind: str
) -> Graph:
    """``g`` with each fused reader's layout, the one by which the attention reads its values
    from the projection's output: the queries, then the keys, then the values (GPT-2's), or
    each key/value head's side by side (GPT-NeoX's, Falcon-40B's, GPT-BigCode's without
    multi-query); a :class:`ModelError` where neither is (CodeGen's shards, OLMo's
    clip_qkv)."""
    ordered = [call for _, call in sorted(calls.items(), key=lambda kv: kv[0][1])]
    if len(ordered) != len(g.blocks):
        raise ModelError(
            f"{g.method}: {kind} ran {len(ordered)} attention calls for {len(g.blocks)} layers"
        )
    blocks = []
    for layer, (b, made) in enumerate(zip(g.blocks, ordered, strict=True)):
        value = made.value
        readers: list[Reader] = []
        for i, r in enumerate(b.readers):
            if r.call:  # the call's inputs are its receivers as they are, at their widths
                if _at_call(b, made, r.dims) is None:
                    raise ModelError(
                        f"{g.method}: {kind}'s layer {layer} calls its attention from another "
                        f"module, or on queries, keys and values of other heads or widths than "
                        f"its parts {r.parts} of {r.dims} features"
                    )
                readers.append(r)
                continue
            returned = seen["returned"][layer][i]
            # a fused projection's queries, key and value side by side per key/value head
            fused = [p for p, _ in r.parts] == ["q", "k", "v"] and not r.parts[0][1] % r.parts[1][1]
            layouts = [r, replace(r, grouped=True)] if fused else [r]
            found = next((c for c in layouts if _reads_values(c, returned, value, g)), None)
            if found is None:  # the call's inputs themselves (CodeGen's shards, OLMo's clamp)
                at_call = _at_call(b, made)
                if at_call is None:
                    raise ModelError(
                        f"{g.method}: {kind}'s layer {layer} does not read its values as its "
                        f"{type(r.module).__name__} returns them, head after head (or each "
                        "key/value head's queries, key and value side by side), and its "
                        "attention call's queries, keys and values are not its receivers' "
                        "heads"
                    )
                readers = [at_call]
                break
            readers.append(found)
        blocks.append(replace(b, readers=tuple(readers)))
    return replace(g, blocks=blocks)


def _at_call(b: Block, made: Any, dims: tuple[int, ...] | None = None) -> Reader | None:
    """A reader of block ``b``'s attention call's query, key and value (``made``, the clean
    run's :class:`~attrax._heads.AttentionCall`) in place of its projections', with their
    parts (and the widths ``dims`` where given), or None where the call's heads (widths) are
    not those or its module not ``b``'s."""
    parts = tuple(p for r in b.readers for p in r.parts)
    given = (made.query, made.key, made.value)
    widths = dims or tuple(t.shape[-1] for t in given)
    if b.attention is not None and made.module is b.attention and [p for p, _ in parts] == [
        "q", "k", "v"
    ] and all(
        t.dim() == 4 and t.shape[1] == h and t.shape[-1] == d
        for t, (_, h), d in zip(given, parts, widths, strict=True)
    ):  # fmt: skip
        return Reader(b.attention, parts, dims=widths)
    return None


def _check_calls(
    model: Model, g: Graph, calls: Mapping[Any, Any], seen: Mapping[str, list[Any]], kind: str
) -> None:
    """A :class:`ModelError` unless each reader of an attention call's inputs, its module's
    code run (up to the call) on what the module read in the clean run, makes the query, key
    and value that call was given."""
    ordered = [call for _, call in sorted(calls.items(), key=lambda kv: kv[0][1])]
    for layer, (b, made) in enumerate(zip(g.blocks, ordered, strict=True)):
        for r in b.readers:
            if not r.call:
                continue
            x, kwargs = seen["call_in"][layer]
            with torch.no_grad():
                again = made_at_call(model, r, kwargs)(x)
            for name, got, want in zip(CALL_INPUTS, again, (made.query, made.key, made.value),
                                       strict=True):  # fmt: skip
                tol = TOLERANCE.get(want.dtype, 1e-4) * (float(want.abs().max()) or 1.0)
                if got.shape != want.shape or float((got - want).abs().max()) > tol:
                    raise ModelError(
                        f"{g.method}: {kind}'s layer {layer}: its {type(r.module).__name__} run "
                        f"again on what it read does not make the {name} its attention call "
                        "was given: the edges cannot remake its heads"
                    )


def _reads_values(r: Reader, returned: torch.Tensor, value: torch.Tensor, g: Graph) -> bool:
    """Whether the attention's values ``value`` (``[B, heads, L, head_dim]``) are ``r``'s
    output ``returned`` (``[B, L, out]``) cut into its parts as its layout says; True where it
    has no value part."""
    start = 0
    out = r.blocked(returned)
    for part, heads in r.parts:
        width = heads * g.head_dim
        if part == "v":
            got = out[..., start : start + width].unflatten(-1, (heads, g.head_dim))
            got = got.transpose(1, 2)
            tol = TOLERANCE.get(got.dtype, 1e-4) * (float(got.abs().max()) or 1.0)
            return got.shape == value.shape and float((got - value).abs().max()) <= tol
        start += width
    return True


def _senders(g: Graph, seen: Mapping[str, list[Any]]) -> torch.Tensor:
    """``[U, B, L, H]``: what each sender adds to the residual stream (the heads' each through
    its rows of the output projection, without its bias), times the block's scale; before a
    norm on its sublayer's output, through which :func:`_pass` pushes the deltas."""
    out = [seen["block"][0][None]]
    for layer, b in enumerate(g.blocks):
        out += [heads_added(g, b, seen["heads"][layer]), seen["mlp"][layer][None] * b.scale]
    return torch.cat(out)


def heads_added(g: Graph, b: Block, z: torch.Tensor) -> torch.Tensor:
    """``[heads, B, L, H]``: what each head adds to the stream from its output ``z`` (``[B, L,
    heads * head_dim]``, the output projection's input): through its rows of the projection,
    without its bias, times the block's scale."""
    w = Reader(b.out_proj, ()).weight()  # [H, heads * head_dim]
    per_head = torch.einsum(
        "blhd,Hhd->hblH",
        z.unflatten(-1, (g.heads, g.head_dim)),
        w.unflatten(-1, (g.heads, g.head_dim)).to(z.dtype),
    )
    return per_head * b.scale


def _deltas(
    call: Call, g: Graph, corrupted: Any, clean: torch.Tensor, run: Callable[..., Any]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[U, B, L, H]`` corrupted minus clean senders (full precision, zero on padding), and
    the corrupted input's embeddings (None for an ablation)."""
    problem = call.problem
    mask = problem.tensors.mask
    if isinstance(corrupted, Ablation):
        real = _averaged_over(call, corrupted, False)
        by_example = clean.transpose(0, 1)  # [B, U, L, H]: the mean over examples, positions
        after = corrupted.apply(by_example, real, positions=2).transpose(0, 1)
        embeds = None
    else:
        ids, corrupt_mask, types = _corrupted_ids(call.model, call, corrupted, True)
        with torch.no_grad():
            embeds = call.model.embed(ids, "source")
            seen: dict[str, list[Any]] = {}
            run(embeds, corrupt_mask, seen, types, ids)
        after = _senders(g, seen)
    delta = full_precision(after) - full_precision(clean)
    return delta * mask.to(delta.dtype)[None, :, :, None], embeds


def edge_scores(
    call: Call,
    g: Graph,
    delta: torch.Tensor,
    points: Callable[[slice], torch.Tensor],
    weights: torch.Tensor,
    moved: Callable[[slice], list[Shift]] | None = None,
) -> torch.Tensor:
    """``[B, K, U, R]``: each edge's estimate, ``sum_i weights[i] delta_u . grad_v`` over the
    points ``points(chunk)`` (``[n, B, L, H]``, the attributed side's embeddings, one per
    weight) at which the gradients are taken, ``batch_size`` points and ``chunk_size`` targets
    a pass, each point's nodes moved as ``moved(chunk)`` says (EAP-IG over activations); the
    scores and ``delta`` (``[U, B, L, H]``) held as :func:`hold_edges` priced."""
    problem = call.problem
    t = problem.tensors
    receivers = g.receivers()
    u_all, batch, length, hidden = delta.shape
    targets = t.valid.shape[1]
    acc = delta.dtype
    size = torch.finfo(acc).bits // 8
    # each layer's probes: its readers' outputs, its second norm's input; and the last output
    probes = sum(r.width for b in g.blocks for r in b.readers)
    probes += (len(g.blocks) + 1) * hidden
    # per layer: its readers' heads, and an MLP past a norm it shares with them
    per_head_rows = max(sum(h for r in b.readers for _, h in r.parts) + b.shared for b in g.blocks)
    one = batch * length * hidden * size
    # senders pushed through a norm at a time: as many bytes as a target's probe gradients
    senders = max(1, probes // hidden)
    # deltas past the norms on the sublayers' outputs: those norms' inputs, and a block of
    # senders pushed through one before the receiver's norm
    normed = len(g.normed) + senders if g.normed else 0
    if g.post_ln:  # the second LayerNorms' inputs, and a block of senders carried up
        normed = len(g.blocks) + senders
    # norms over a projection's heads: their inputs, and a block of senders projected and
    # pushed through one (with its tangents), the widest
    over = g.over_heads
    if over:
        normed += (sum(over) + 3 * senders * max(over)) // hidden + 1
    # per (target, point): its probes' gradients, cast, and a reader's pulled back through its
    # heads' rows with their product; per point: the probes, the norms' inputs, and a block of
    # senders pushed through a norm (with their tangents, and laid out for the product)
    total = weights.shape[0]
    # one forward a pass, every target chunk's backward from it (as attribution patching's)
    batch_size, chunk = problem.plan(
        total, call.options["batch_size"], call.options["chunk_size"], shared_forward=True,
        eager=g.at_calls,
        per_target=2 * probes * one // hidden + 2 * per_head_rows * one,
        per_point=(probes // hidden + len(g.blocks) + 3 * senders + 2 + normed
                   + (2 if moved else 0)) * one,
    )  # fmt: skip
    scores = delta.new_zeros(batch, targets, u_all, len(receivers))
    step = total if batch_size is None else batch_size
    columns = _columns(g)
    for first in range(0, total, step):  # chunking only: bounds memory
        between_passes()
        part = slice(first, min(first + step, total))
        w = weights[part].to(device=delta.device, dtype=acc)
        shifts = moved(part) if moved else []
        _pass(call, g, delta, points(part), w, chunk, senders, scores, columns, shifts)
    return scores


#: a node's output moved at some of a pass's points: the module (``"in"``: the first block,
#: whose input is moved), the points' indices in the pass and what each adds (``[k, B, L, H]``)
Shift = tuple[torch.nn.Module, str, torch.Tensor, torch.Tensor]


def _shifting(module: torch.nn.Module, side: str, rows: torch.Tensor, by: torch.Tensor, n: int
              ) -> Any:  # fmt: skip
    """Register the hook that adds ``by`` to ``module``'s output (its input: ``side="in"``) at
    the points ``rows`` of the ``n`` a pass stacks, copy-major, and makes it a constant there
    (as Hanna et al.'s code sets it: no gradient flows through the moved node)."""

    def moved(value: torch.Tensor) -> torch.Tensor:
        # OPT's MLP and Llama 4's experts hold their positions flattened: [n B L, H]
        stacked = value.reshape(n, *by.shape[1:])
        fixed = stacked.index_select(0, rows).detach() + by.to(value.dtype)
        return stacked.index_copy(0, rows, fixed).view_as(value)

    if side == "in":

        def pre(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if args:
                return (moved(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": moved(kwargs["hidden_states"])}

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def hook(_m: Any, _args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (moved(output[0]), *output[1:])
        return moved(output)

    return module.register_forward_hook(hook)


def hold_edges(call: Call, g: Graph) -> None:
    """Count the ``[B, K, U, R]`` scores and the senders' outputs and deltas (``[U, B, L, H]``,
    the clean, the corrupted and their difference at full precision) through the call."""
    problem = call.problem
    t = problem.tensors
    batch, length = t.ids.shape
    hidden = g.width
    size = torch.finfo(full_precision(problem.inputs[0]).dtype).bits // 8
    u_all, targets = len(g.senders), t.valid.shape[1]
    problem.hold(
        batch * targets * u_all * len(g.receivers()) * size + 4 * u_all * batch * length * hidden * size,
        "targets", targets, "the edges' scores and the senders' outputs and deltas",
    )  # fmt: skip


def _columns(g: Graph) -> list[tuple[list[tuple[Reader, int]], int]]:
    """Per layer: each reader with the receiver column of its first head, and the MLP's."""
    out = []
    column = 0
    for b in g.blocks:
        readers = []
        for r in b.readers:
            readers.append((r, column))
            column += sum(h for _, h in r.parts)
        out.append((readers, column))
        column += 1
    return out


def _pass(
    call: Call,
    g: Graph,
    delta: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    chunk: int | None,
    senders: int,
    scores: torch.Tensor,
    columns: list[tuple[list[tuple[Reader, int]], int]],
    shifts: list[Shift],
) -> None:
    """Add one pass's points' terms to ``scores`` ``[B, K, U, R]``, ``chunk`` targets a
    backward, ``senders`` senders pushed through a norm at a time, the nodes ``shifts`` names
    moved at their points."""
    problem = call.problem
    t = problem.tensors
    n, batch = x.shape[:2]
    acc = delta.dtype
    norm_inputs: list[Any] = [None] * len(g.blocks)
    ln_2_inputs: list[Any] = [None] * len(g.blocks)  # a post-norm block's second LayerNorm's
    normed = g.normed
    post_inputs: list[Any] = [None] * len(normed)
    # what each reader's norm over its heads reads, by (layer, reader); what an attention
    # whose receivers are its call's reads, and its other arguments
    reader_inputs: dict[tuple[int, int], Any] = {}
    call_inputs: dict[tuple[int, int], Any] = {}
    call_kwargs: dict[tuple[int, int], dict[str, Any]] = {}
    state = _probes_at(call.model) if g.at_calls else None

    def forward(*probes: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
        handles = []
        it = iter(probes)
        for layer, b in enumerate(g.blocks):
            for i, r in enumerate(b.readers):
                if r.call:  # the probes at the call; what the module reads, kept
                    assert state is not None
                    state.inputs.update(_at_call_probes(state.where[r.module], r, next(it)))
                    handles.append(r.module.register_forward_pre_hook(
                        _keeping_call(call_inputs, call_kwargs, (layer, i)), with_kwargs=True
                    ))  # fmt: skip
                    continue
                # a norm over the heads: the receivers are its output's slices
                handles.append((r.norm or r.module).register_forward_hook(_adding(next(it))))
                if r.norm is not None:
                    handles.append(r.norm.register_forward_pre_hook(
                        _keeping(reader_inputs, (layer, i))
                    ))  # fmt: skip
            # the MLP's own copy of the stream: its norm's input, or past a norm it shares (a
            # post-norm block's MLP reads the first LayerNorm's output, unnormed)
            reads = b.reads if b.shared or b.reads_itself else b.mlp_norm
            handles.append(reads.register_forward_pre_hook(_adding_input(next(it))))
            if not b.normless:  # a normless block's identity needs no input
                handles.append(b.attn_norm.register_forward_pre_hook(_keeping(norm_inputs, layer)))
            if b.post_ln:
                handles.append(b.mlp_norm.register_forward_pre_hook(_keeping(ln_2_inputs, layer)))
        for i, (_, post) in enumerate(normed):
            handles.append(post.register_forward_pre_hook(_keeping(post_inputs, i)))
        handles.append(g.blocks[-1].block.register_forward_hook(_adding(next(it))))
        handles += [_shifting(module, side, rows, by, n) for module, side, rows, by in shifts]
        probing = _probing(call.model, state) if state else contextlib.nullcontext()
        with _hooked(handles), probing:
            hidden = problem.hidden_of(
                x.flatten(0, 1),
                t.mask.repeat(n, 1),
                None,
                t.ids.repeat(n, 1),
            )
        kept = {k: v.detach() for k, v in reader_inputs.items()}
        # by layer: a normless block's identity keeps none
        before = {k: h.detach() for k, h in enumerate(norm_inputs) if h is not None}
        at_calls = {k: v.detach() for k, v in call_inputs.items()}
        return hidden, [before, [h.detach() for h in post_inputs], kept, at_calls]

    # the senders whose delta in the stream is the same at every point: not past a norm
    linear = torch.ones(len(g.senders), dtype=acc, device=delta.device)
    for span, _ in normed:
        linear[span] = 0
    shape = (n * batch, x.shape[2])
    zeros = []
    for b in g.blocks:
        zeros += [x.new_zeros(*shape, r.width) for r in b.readers]
        zeros.append(x.new_zeros(*shape, delta.shape[3]))
    zeros.append(x.new_zeros(*shape, delta.shape[3]))  # the stream's width, not the inputs'
    hidden, pullback, (inputs, normed_inputs, reader_at, call_at) = cast(
        "tuple[torch.Tensor, Callable[..., tuple[torch.Tensor, ...]], list[Any]]",
        torch.func.vjp(forward, *zeros, has_aux=True),
    )

    def at_points(part: slice) -> torch.Tensor:
        """``[u, n B, L, H]``: the senders' deltas in the stream at each point; past the norm
        on their sublayer's output, at that point's input to it."""
        tangents = delta[part].repeat(1, n, 1, 1)
        for (span, post), at in zip(normed, normed_inputs, strict=True):
            lo, hi = max(span.start, part.start), min(span.stop, part.stop)
            if lo < hi:
                mine = slice(lo - part.start, hi - part.start)
                tangents[mine] = _through_norm(post, at, tangents[mine]).to(tangents.dtype)
        return tangents

    def normed_met(grad: torch.Tensor, senders_before: int) -> Iterator[tuple[slice, torch.Tensor]]:
        """Per block of normed senders read by a receiver whose gradient is ``grad`` (``[k, n
        B, L, H]``): their rows, and ``[B, k, u]`` their deltas met by it point by point."""
        for span, _ in normed:
            stop = min(span.stop, senders_before)
            for lo in range(span.start, stop, senders):  # chunking only: bounds memory
                part = slice(lo, min(lo + senders, stop))
                yield part, _met_points(at_points(part), grad, w, n)

    _, head_pullback = vjp(problem.head_objective, hidden)
    (head_grad,) = head_pullback(t.valid.repeat(n, 1).to(hidden.dtype))
    width = hidden.shape[1]
    one_hot = torch.eye(width, dtype=hidden.dtype, device=hidden.device)

    def cotangent(slots: slice) -> torch.Tensor:
        return one_hot[slots, None, :, None] * head_grad[None]

    if g.post_ln:
        for slots, grads in pulled(pullback, cotangent, width, chunk, None):
            _post_norm_met(g, delta, grads, (inputs, ln_2_inputs), w, slots, senders, scores,
                           columns)  # fmt: skip
        return
    for slots, grads in pulled(pullback, cotangent, width, chunk, None):
        it = iter(grads)
        for layer, (readers, mlp_column) in enumerate(columns):
            b = g.blocks[layer]
            reader_grads = [next(it) for _ in readers]
            rows = [
                (column, _pulled_through(r, grad, n, acc, w))
                for (r, column), grad in zip(readers, reader_grads, strict=True)
                if r.norm is None and not r.call
            ]
            # the call's receivers: the deltas pushed through the attention's code, per point
            at_call = [
                (r, column, grad, made_at_call(call.model, r, call_kwargs[layer, i]),
                 call_at[layer, i])
                for i, ((r, column), grad) in enumerate(zip(readers, reader_grads, strict=True))
                if r.call
            ]  # fmt: skip
            # a norm over the heads: the deltas pushed through the projection and it, per point
            over_heads = [
                (r, column, grad, reader_at[layer, i])
                for i, ((r, column), grad) in enumerate(zip(readers, reader_grads, strict=True))
                if r.norm is not None
            ]
            del reader_grads
            mlp_grad = next(it)
            if b.shared:  # met past the norm, as a head's input, by the same pushed deltas
                rows.append((mlp_column, _weighed(mlp_grad.to(acc), n, w)))
            before = g.before_attention(layer)
            for first in range(0, before, senders):  # chunking only: bounds memory
                part = slice(first, min(first + senders, before))
                # the senders' deltas pushed through the norm: the same for every target
                pushed = at_points(part)
                if not b.normless:
                    pushed = _through_norm(b.attn_norm, inputs[layer], pushed)
                pushed = pushed.to(acc).unflatten(1, (n, -1))
                for column, per_head in rows:  # [B, n L H, k heads]
                    _add_heads(scores, slots, part, column, pushed, per_head)
                for r, column, grad, at in over_heads:
                    met = _met_over_heads(r, pushed, grad, at, w)  # [B, k, u, heads]
                    scores[:, slots, part, column : column + met.shape[-1]] += met
                for r, column, grad, made, at in at_call:
                    met = _met_at_call(r, made, pushed, grad, at, w)  # [B, k, u, heads]
                    scores[:, slots, part, column : column + met.shape[-1]] += met
            del rows, over_heads, at_call
            if not b.shared:
                mlp_senders = g.before_mlp(layer)
                met = _met(delta[:mlp_senders], mlp_grad, w)
                if normed:  # a normed head's delta is met point by point, below
                    met *= linear[:mlp_senders]
                scores[:, slots, :mlp_senders, mlp_column] += met
                for part, per_point in normed_met(mlp_grad, mlp_senders):
                    scores[:, slots, part, mlp_column] += per_point
        out_grad = next(it)
        met = _met(delta, out_grad, w)
        if normed:
            met *= linear
        scores[:, slots, :, -1] += met
        for part, per_point in normed_met(out_grad, len(linear)):
            scores[:, slots, part, -1] += per_point


def _post_norm_met(
    g: Graph,
    delta: torch.Tensor,
    grads: Any,
    norm_inputs: tuple[list[torch.Tensor], list[torch.Tensor]],
    w: torch.Tensor,
    slots: slice,
    senders: int,
    scores: torch.Tensor,
    columns: list[tuple[list[tuple[Reader, int]], int]],
) -> None:
    """Add to ``scores`` one chunk of targets' terms in a post-norm model: a sender's delta
    reaches a receiver through every LayerNorm between them (each block's ``LN_1`` and
    ``LN_2``), pushed through each at the point's input to it, a block of ``senders`` senders
    carried up the layers together (``grads``: the probes' gradients, as :func:`_pass`'s)."""
    acc = delta.dtype
    n = w.shape[0]
    grads = list(grads)
    per_layer = []
    at = 0
    for readers, mlp_column in columns:
        per_layer.append((readers, grads[at : at + len(readers)], grads[at + len(readers)],
                          mlp_column))  # fmt: skip
        at += len(readers) + 1
    out_grad = grads[at]
    total = len(g.senders)
    ln_1, ln_2 = norm_inputs
    for first in range(0, total, senders):  # chunking only: bounds memory
        part = slice(first, min(first + senders, total))
        carried = delta[part].to(acc).repeat(1, n, 1, 1)  # [u, n B, L, H]
        for layer, (readers, reader_grads, mlp_grad, mlp_column) in enumerate(per_layer):
            b = g.blocks[layer]
            # the heads read the block's input: the senders before it, past every LayerNorm
            before = min(part.stop, g.before_attention(layer)) - part.start
            if before > 0:
                pushed = carried[:before].unflatten(1, (n, -1))
                for (r, column), grad in zip(readers, reader_grads, strict=True):
                    per_head = _pulled_through(r, grad, n, acc, w)
                    _add_heads(
                        scores, slots, slice(first, first + before), column, pushed, per_head
                    )
            # LN_1 reads the input plus the attention's output: this layer's heads join
            upto = min(part.stop, g.before_mlp(layer)) - part.start
            if upto > 0:
                carried[:upto] = _through_norm(b.attn_norm, ln_1[layer], carried[:upto]).to(acc)
                scores[:, slots, first : first + upto, mlp_column] += _met_points(
                    carried[:upto], mlp_grad, w, n
                )
            # LN_2 reads LN_1's output plus the MLP's: the MLP joins
            upto = min(part.stop, g.before_attention(layer + 1)) - part.start
            if upto > 0:
                carried[:upto] = _through_norm(b.mlp_norm, ln_2[layer], carried[:upto]).to(acc)
        scores[:, slots, part, -1] += _met_points(carried, out_grad, w, n)


def _add_heads(
    scores: torch.Tensor, slots: slice, rows: slice, column: int, pushed: torch.Tensor,
    per_head: torch.Tensor,
) -> None:  # fmt: skip
    """Add to ``scores`` ``[B, K, U, R]`` the deltas ``pushed`` (``[u, n, B, L, H]``, the
    senders ``rows``, in the stream the receivers read) met by the gradients ``per_head`` (``[B,
    n L H, k heads]``, the targets ``slots``, each head from receiver ``column`` on)."""
    heads = per_head.shape[-1] // (slots.stop - slots.start)
    met = torch.bmm(pushed.permute(2, 0, 1, 3, 4).flatten(2), per_head)
    scores[:, slots, rows, column : column + heads] += met.unflatten(-1, (-1, heads)).transpose(
        1, 2
    )


def _met(delta: torch.Tensor, grad: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``[B, k, u]``: the deltas ``[u, B, L, H]`` (the same at every point) times the gradients
    ``[k, n * B, L, H]`` weighed by the points' weights ``w`` ``[n]``, summed over points,
    positions and features (one batched product)."""
    k, n = grad.shape[0], w.shape[0]
    summed = torch.einsum("knbLH,n->bkLH", grad.to(delta.dtype).unflatten(1, (n, -1)), w)
    return torch.bmm(summed.flatten(2), delta.permute(1, 2, 3, 0).flatten(1, 2)).view(
        delta.shape[1], k, -1
    )


def _pulled_through(
    r: Reader, grad: torch.Tensor, n: int, acc: torch.dtype, w: torch.Tensor
) -> torch.Tensor:
    """The gradient at ``r``'s output (``[k, n * B, L, out]``) pulled back through each head's
    rows of its weight, weighed by the points' weights ``w``: ``[B, n L H, k heads]``, laid out
    for one batched product with the pushed deltas (the projection is linear; its bias drops
    out of a difference)."""
    weight = r.blocked(r.weight().to(acc).T).T  # [out, H], the parts' heads in order
    heads = sum(h for _, h in r.parts)
    head_dim = weight.shape[0] // heads
    g_out = r.blocked(grad.to(acc)).unflatten(1, (n, -1)).unflatten(-1, (heads, head_dim))
    per_head = torch.einsum(
        "knbLhd,hdH,n->bnLHkh", g_out, weight.unflatten(0, (heads, head_dim)), w
    )
    return per_head.flatten(1, 3).flatten(2)


def _met_over_heads(
    r: Reader, pushed: torch.Tensor, grad: torch.Tensor, at: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """``[B, k, u, heads]``: the deltas ``pushed`` (``[u, n, B, L, H]``, in the stream the
    heads read) through ``r``'s projection (no bias: it drops out of a difference) and the
    derivative of its norm over all heads at the points' inputs to it ``at`` (``[n B, L,
    out]``), met by the gradients at that norm's output ``grad`` (``[k, n B, L, out]``), each
    head's slice alone, weighed by the points' weights ``w``."""
    n = w.shape[0]
    heads = sum(h for _, h in r.parts)
    projected = torch.einsum("unbLH,oH->unbLo", pushed, r.weight().to(pushed.dtype))
    moved = _through_norm(cast("torch.nn.Module", r.norm), at, projected.flatten(1, 2))
    moved = moved.to(w.dtype).unflatten(1, (n, -1)).unflatten(-1, (heads, -1))
    g = grad.to(w.dtype).unflatten(1, (n, -1)).unflatten(-1, (heads, -1))
    return torch.einsum("unbLhd,knbLhd,n->bkuh", moved, g, w)


def _met_at_call(
    r: Reader, made: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], pushed: torch.Tensor,
    grad: torch.Tensor, at: torch.Tensor, w: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """``[B, k, u, heads]``: the deltas ``pushed`` (``[u, n, B, L, H]``, in the stream the
    attention reads) through its code up to its call at the points' inputs ``at`` (``[n B, L,
    H]``; ``made``, :func:`made_at_call`'s), met by the gradients at the call's query, key and
    value ``grad`` (``[k, n B, L, width]``, :attr:`Reader.width`), each head alone, weighed by
    the points' weights ``w``."""
    n = w.shape[0]

    def push(tangent: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return cast("tuple[torch.Tensor, ...]", torch.func.jvp(made, (at,), (tangent,))[1])

    moved = torch.vmap(push)(pushed.flatten(1, 2).to(at.dtype))  # [u, n B, heads, L, d] each
    out, start = [], 0
    for (_, heads), d, m in zip(r.parts, r.dims, moved, strict=True):
        part = grad[..., start : start + heads * d].unflatten(-1, (heads, d))
        start += heads * d
        mine = full_precision(m).transpose(2, 3).to(w.dtype).unflatten(1, (n, -1))
        out.append(torch.einsum("unbLhd,knbLhd,n->bkuh", mine,
                                part.to(w.dtype).unflatten(1, (n, -1)), w))  # fmt: skip
    return torch.cat(out, -1)


#: the attention call's inputs, in the order of a reader's parts
CALL_INPUTS = ("query", "key", "value")


class _Made(Exception):
    """Raised at an attention call once its query, key and value are made: the rest of the
    attention is not needed."""


def made_at_call(
    model: Model, r: Reader, kwargs: Mapping[str, Any]
) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """``made(x)``: the query, key and value (``[B, heads, L, d]`` each) that ``r``'s attention
    module hands its attention call when it reads ``x`` with its other arguments ``kwargs``,
    its own code run up to that call (not its hooks)."""
    where = _placed(model)
    place = where[r.module]

    def made(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        got: dict[str, torch.Tensor] = {}

        def keep(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
            def kept(t: torch.Tensor) -> torch.Tensor:
                got[name] = t
                if len(got) == len(CALL_INPUTS):
                    raise _Made
                return t

            return kept

        state = _probes_at(model, where)
        state.inputs.update({(place, name): keep(name) for name in CALL_INPUTS})
        with _probing(model, state), model.attention_as(IMPLEMENTATION):
            try:
                rest = {k: v for k, v in kwargs.items() if k != _REST}
                r.module.forward(x, *kwargs.get(_REST, ()), **rest)
            except _Made:
                pass
        if len(got) != len(CALL_INPUTS):
            raise ModelError(
                f"{type(r.module).__name__} did not run its attention through transformers' "
                "AttentionInterface: attrax cannot make its heads' queries, keys and values"
            )
        return tuple(got[name] for name in CALL_INPUTS)

    return made


def _at_call_probes(
    place: Any, r: Reader, probe: torch.Tensor
) -> dict[tuple[Any, str], Callable[[torch.Tensor], torch.Tensor]]:
    """What adds ``probe`` (``[n B, L, width]``, :attr:`Reader.width`: each part's heads side
    by side) to the attention call's query, key and value (``[n B, heads, L, d]``)."""

    def adding(part: torch.Tensor, heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def add(t: torch.Tensor) -> torch.Tensor:
            return t + part.unflatten(-1, (heads, -1)).transpose(1, 2).to(t.dtype)

        return add

    out = {}
    start = 0
    for name, (_, heads), d in zip(CALL_INPUTS, r.parts, r.dims, strict=True):
        out[(place, name)] = adding(probe[..., start : start + heads * d], heads)
        start += heads * d
    return out


def _keeping_call(
    inputs: Any, kwargs: dict[Any, dict[str, Any]], key: Any, cloned: bool = False
) -> Callable[..., None]:
    """A pre-hook (with its keyword arguments) that keeps what an attention module reads and
    its other arguments (``cloned``: both, as a pair in ``inputs``, what it reads copied)."""

    def hook(_m: Any, args: tuple[Any, ...], given: dict[str, Any]) -> None:
        x = args[0] if args else given["hidden_states"]
        rest = {k: v for k, v in given.items() if k != "hidden_states"}
        rest[_REST] = args[1:]
        if cloned:
            inputs[key] = (x.detach().clone(), rest)
            return
        inputs[key] = x
        kwargs[key] = rest

    return hook


#: where :func:`_keeping_call` keeps an attention's positional arguments after its input
_REST = "attrax_positional"


def _over_activations(
    g: Graph, delta: torch.Tensor, clean_embeds: torch.Tensor, quadrature: str, steps: int
) -> tuple[torch.Tensor, Callable[[slice], torch.Tensor], Callable[[slice], list[Shift]]]:
    """EAP-IG over activations: the weights, the points (the clean embeddings) and what each
    moves, group by group (the first block's input, then each layer's attention output and its
    MLP's), ``alpha`` of the way from corrupted to clean at each of the quadrature's nodes: the
    clean run's output plus ``1 - alpha`` of the node's corrupted-minus-clean delta."""
    nodes, w = quadrature_nodes(quadrature, steps)
    groups: list[tuple[torch.nn.Module, str, torch.Tensor]] = [(g.blocks[0].block, "in", delta[0])]
    for layer, b in enumerate(g.blocks):
        first = g.first_head(layer)
        # a node's delta is taken times the block's scale: its module's output is not
        heads = delta[first : first + g.heads].sum(0) / b.scale
        groups += [(b.out_proj, "out", heads), (b.mlp, "out", delta[first + g.heads] / b.scale)]
    weights = torch.as_tensor(np.tile(w, len(groups)) / len(groups))
    rest = torch.as_tensor(1 - nodes, dtype=delta.dtype, device=delta.device)

    def points(part: slice) -> torch.Tensor:
        return clean_embeds[None].expand(part.stop - part.start, *clean_embeds.shape)

    def moved(part: slice) -> list[Shift]:
        out = []
        index = torch.arange(part.start, part.stop, device=delta.device)
        for i, (module, side, d) in enumerate(groups):
            mine = (index // steps == i).nonzero().squeeze(1)
            if len(mine):
                by = rest[(index[mine] % steps)].view(-1, 1, 1, 1) * d[None]
                out.append((module, side, mine, by))
        return out

    return weights, points, moved


def _weighed(grad: torch.Tensor, n: int, w: torch.Tensor) -> torch.Tensor:
    """The gradient at a shared norm's output as the MLP reads it (``[k, n * B, L, H]``),
    weighed by the points' weights: ``[B, n L H, k]``, laid out as :func:`_pulled_through`'s
    for one head."""
    return torch.einsum("knbLH,n->bnLHk", grad.unflatten(1, (n, -1)), w).flatten(1, 3)


def _through_norm(norm: torch.nn.Module, at: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
    """``[u, n B, L, H]`` at full precision: the norm's derivative at its inputs ``at`` (``[n
    B, L, H]``) applied to each sender's delta there (``tangents``, ``[u, n B, L, H]``)."""

    def push(tangent: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(norm, (at,), (tangent,))[1]

    return full_precision(torch.vmap(push)(tangents.to(at.dtype)))


def _met_points(
    tangents: torch.Tensor, grad: torch.Tensor, w: torch.Tensor, n: int
) -> torch.Tensor:
    """``[B, k, u]``: deltas that differ from point to point (``[u, n B, L, H]``) times the
    gradients there (``[k, n B, L, H]``), weighed by the points' weights ``w``, summed over
    points, positions and features."""
    d = tangents.to(w.dtype).unflatten(1, (n, -1)) * w.view(1, n, 1, 1, 1)
    return torch.einsum("unbLH,knbLH->bku", d, grad.to(w.dtype).unflatten(1, (n, -1)))


def _adding(probe: torch.Tensor) -> Callable[..., Any]:
    def hook(_m: Any, args: Any, output: Any) -> Any:
        if args and _positional(args[0]):
            return None
        if isinstance(output, tuple):
            return (output[0] + probe, *output[1:])
        return output + probe

    return hook


def _adding_input(probe: torch.Tensor) -> Callable[..., Any]:
    def hook(_m: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        # OPT's MLP reads its positions flattened, [B L, H]
        return (args[0] + probe.view_as(args[0]), *args[1:])

    return hook


def _positional(given: Any) -> bool:
    """Whether a projection's input is DeBERTa's relative position embeddings (``[2 * span,
    H]``, as attrax's own forward of its attention hands them; the stream is ``[B, L, H]``)."""
    return isinstance(given, torch.Tensor) and given.dim() == 2


def _keeping(kept: list[Any] | dict[Any, Any], key: Any) -> Callable[..., Any]:
    """A pre-hook that keeps its module's first input in ``kept`` at ``key``."""

    def hook(_m: Any, args: tuple[Any, ...]) -> None:
        kept[key] = args[0]

    return hook


# --- the method ------------------------------------------------------------------------------


def runs(
    call: Call, g: Graph, corrupted: Any
) -> tuple[Graph, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The clean run, its blocks checked, and the corrupted one: ``g`` with its fused readers'
    layouts (read from the clean run's values), the clean senders' outputs ``[U, B, L, H]``,
    the corrupted ones less them (full precision, zero on padding), the corrupted input's
    embeddings (None for an ablation), and the clean run's scores ``[B, K]``."""
    problem = call.problem
    t = problem.tensors
    kind = type(call.model.hf).__name__

    def run(
        embeds: torch.Tensor,
        mask: torch.Tensor,
        seen: dict[str, list[Any]],
        types: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # the attention the passes run where they probe calls (attrax's eager): their donors
        # and the clean scores rounded as they are
        probing = _probing(call.model, _probes_at(call.model)) if g.at_calls else None
        with _hooked(_record(g, seen)), probing or contextlib.nullcontext():
            hidden = problem.hidden_of(embeds, mask, types, ids)
        _check_blocks(g, seen, kind)
        return hidden

    clean_embeds = problem.inputs[0]
    seen: dict[str, list[Any]] = {}
    with torch.no_grad():
        scores = problem.head_objective(run(clean_embeds, t.mask, seen))
    calls = record_calls(problem, [], "edges", clean_embeds, t.mask).calls or {}
    checked = _check_values(g, calls, seen, kind)
    if checked.at_calls and not g.at_calls:  # the clean run again, as the passes will run it
        g, seen = checked, {}
        with torch.no_grad():
            scores = problem.head_objective(run(clean_embeds, t.mask, seen))
    g = checked
    _check_calls(call.model, g, calls, seen, kind)
    del calls
    clean = _senders(g, seen)
    del seen
    delta, corrupt_embeds = _deltas(call, g, corrupted, clean, run)
    return g, clean, delta, corrupt_embeds, scores


def _corrupted_input(value: object, name: str) -> None:
    if isinstance(value, GaussianNoise):
        raise OptionError(
            f"`{name}`: Gaussian noise (causal tracing) is activation patching's corruption; "
            "the edges take a corrupted text (a string, or a list aligned with `inputs`) or an "
            "ax.Ablation"
        )
    _corrupted(value, name)


def _together(options: Mapping[str, Any]) -> None:
    if options["steps"] is None and options["quadrature"] is not None:
        raise OptionError(
            "`quadrature` applies with `steps` (EAP-IG's path from the corrupted input to the "
            f"clean one), got quadrature={options['quadrature']!r} and steps=None"
        )
    if options["steps"] is None and options["interpolate"] != "inputs":
        raise OptionError(
            f"`interpolate` {options['interpolate']!r} chooses what EAP-IG interpolates: it "
            "applies with `steps`, got steps=None (EAP)"
        )
    activations = options["interpolate"] == "activations"
    if (
        options["steps"] is not None
        and isinstance(options["corrupted"], Ablation)
        and not activations
    ):
        raise OptionError(
            f"`steps` {options['steps']} (EAP-IG) integrates along the inputs from the "
            "corrupted text to the clean one; an ax.Ablation has no corrupted input: give a "
            "corrupted text, interpolate='activations' (between each node's clean and "
            "ablated outputs), or steps=None (EAP)"
        )
    if options["steps"] is not None:
        default = "riemann_right" if activations else "riemann_left"
        check_quadrature_steps(
            {"steps": options["steps"], "quadrature": options["quadrature"] or default}
        )


@EDGES.method(
    _together,
    corrupted=_corrupted_input,
    steps=check.optional(check.positive_int),
    quadrature=check.one_of(*QUADRATURES, none=True),
    interpolate=check.one_of("inputs", "activations"),
)
def edge_attribution_patching(
    call: Call,
    *,
    corrupted: Any = None,
    steps: int | None = None,
    quadrature: str | None = None,
    interpolate: str = "inputs",
) -> xr.DataArray:
    """Edge attribution patching: each edge's estimated effect on the target's objective, EAP
    (Syed et al. 2023) or, with ``steps``, EAP-IG (Hanna et al. 2024).

    An edge ``u -> v`` joins a node that writes to the residual stream (``"input"``, the
    embeddings; ``"a{l}.h{h}"``, head ``h`` of layer ``l`` through its rows of the output
    projection; ``"m{l}"``, layer ``l``'s MLP) to a later node that reads it
    (``"a{l}.h{h}<q>"``, ``<k>``, ``<v>``: a head's query, key or value input, key/value heads
    under grouped-query attention; ``"m{l}"``; ``"logits"``). Patching that edge alone changes
    the objective by about ``(u(corrupted) - u(clean)) . d objective / d input_v``, summed over
    positions. EAP takes the gradient on the clean input; EAP-IG averages it over ``steps``
    inputs on the straight path from the corrupted input's embeddings to the clean one's.
    A sender's estimates summed over every receiver are its attribution patching estimate
    (:func:`attribution_patching`, summed over positions). Where norms stand between a sender
    and a receiver (on a sublayer's output, as Gemma 2's; a post-norm encoder's LayerNorms, as
    BERT's), the delta goes through their derivatives.

    Arguments:
        model, inputs, targets, objective, contrast, positions, chunk_size, max_new_tokens,
            max_memory: as :func:`attrax.saliency`.
        corrupted: the corrupted input(s), aligned with ``inputs``, each with as many tokens as
            its clean input; or an :class:`Ablation` (EAP, and EAP-IG over activations): each
            sender set to zero or to its mean over the inputs' tokens.
        steps: None (the default) for EAP; EAP-IG's number of points on the path (over
            activations: on each node group's, ``(1 + 2 * layers) * steps`` in all).
        quadrature: EAP-IG's nodes (``riemann_left``, the default, is Hanna et al.'s:
            ``k / steps`` for ``k < steps``; or ``riemann_right|middle|trapezoid``,
            ``gausslegendre``; ``riemann_trapezoid`` with 2 steps averages the clean and
            corrupted inputs' gradients, their "clean-corrupted" method).
        interpolate: what EAP-IG moves from corrupted to clean: ``"inputs"`` (the default,
            the embeddings) or ``"activations"`` (MIB's EAP-IG-activations: one node group at
            a time, the input, each layer's attention output, each MLP's, set to ``alpha``
            of its clean output plus ``1 - alpha`` of its corrupted one, the rest of the
            clean run recomputed; the gradients averaged over every group and ``alpha``;
            its default nodes ``k / steps`` for ``k = 1 .. steps``, Hanna et al.'s; with an
            :class:`Ablation` too).
        batch_size: EAP-IG's points per forward (``"auto"``: planned).

    Returns:
        DataArray ``([example,] target, sender, receiver)``, NaN where the receiver runs
        before the sender or beside it (a parallel block's MLP and heads); coordinates
        ``sender_layer``, ``sender_head`` (-1 for the input and MLPs), ``receiver_layer``,
        ``receiver_input`` (``q``, ``k``, ``v``, ``mlp``, ``logits``) and ``receiver_head``.

    >>> import attrax as ax
    >>> da = ax.edge_attribution_patching(
    ...     ax.load_model(), "1 2 3 =", " 3 2 1", corrupted="1 2 4 =", objective="logit")
    >>> da.dims
    ('target', 'sender', 'receiver')
    >>> str(da.sender.values[0]), str(da.receiver.values[-1])
    ('input', 'logits')
    """
    model = call.model
    g = graph(model)
    problem = call.problem
    hold_edges(call, g)  # before the runs that make them: a refusal, not an exhausted device
    if steps is not None and interpolate == "activations":
        batch, length = problem.tensors.ids.shape
        size = torch.finfo(full_precision(problem.inputs[0]).dtype).bits // 8
        problem.hold(
            2 * len(g.blocks) * batch * length * g.width * size, "interpolate", interpolate,
            "each layer's attention's and MLP's deltas",
        )  # fmt: skip
    clean_embeds = problem.inputs[0]
    g, clean, delta, corrupt_embeds, _ = runs(call, g, corrupted)
    del clean
    moved = None
    points: Callable[[slice], torch.Tensor]
    if steps is None:
        weights = torch.ones(1, dtype=torch.float64)

        def points(part: slice) -> torch.Tensor:
            return clean_embeds[None]

    elif interpolate == "activations":
        weights, points, moved = _over_activations(
            g, delta, clean_embeds, quadrature or "riemann_right", steps
        )
    else:  # EAP-IG: the straight path from the corrupted embeddings to the clean ones
        assert corrupt_embeds is not None
        nodes, w = quadrature_nodes(quadrature or "riemann_left", steps)
        alpha = torch.as_tensor(nodes, dtype=clean_embeds.dtype, device=clean_embeds.device)
        start, span = corrupt_embeds, clean_embeds - corrupt_embeds
        weights = torch.as_tensor(w)

        def on_path(part: slice) -> torch.Tensor:  # a pass's points only, as it runs
            return start[None] + alpha[part].view(-1, 1, 1, 1) * span[None]

        points = on_path

    scores = edge_scores(call, g, delta, points, weights, moved)
    if not bool(torch.isfinite(scores).all()):  # NaN marks no edge: one the model made must not
        raise _not_finite()
    # a receiver reads only the senders before it: the rest are no edges
    scores.masked_fill_(~g.edges().to(scores.device), np.nan)
    return label_edges(
        model, call.batch, scores, g.senders, g.receivers(), call.options, METHOD,
        call.objective[0],
    )  # fmt: skip
