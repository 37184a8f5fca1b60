"""Where a transformer's components are, stack by stack: each block (its output is the residual
stream), the module whose input is the concatenated heads, the MLP (its output is what the MLP
adds) and the MLP's output projection (its input is the MLP's neurons).

Attribution and activation patching patch these sites, and the gradient methods' ``layers=``
read them (``site=``). Decoder-only models whose layers sit where :func:`decoder_blocks` looks,
their classifiers, the encoder classifiers of :data:`ENCODERS`, and the BART-like and T5
encoder-decoders; anything else is a :class:`ModelError` naming its architecture.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch

from . import _arch
from ._errors import ModelError, OptionError
from ._model import Model, body

#: an encoder-decoder's stacks: encoder blocks, decoder blocks (self-attention heads), and the
#: decoder's cross-attention heads
STACKS = ("encoder", "decoder", "cross")


@dataclass(frozen=True)
class Stack:
    """The patchable modules of one stack, layer by layer: each block (its output is the
    residual stream), the module whose input is the concatenated head outputs, the MLP (its
    output is what the MLP writes), and the heads per layer."""

    name: str  # "self" (decoder-only), "encoder", "decoder" or "cross"
    blocks: list[torch.nn.Module]
    #: None for a hybrid's layer that mixes tokens otherwise (linear attention, Mamba)
    projections: list[torch.nn.Module | None]
    mlps: list[torch.nn.Module]
    heads: int
    #: why the output projection's input does not split into ``heads`` heads (None: it does)
    unsplit: str | None = None

    def module(self, site: str, layer: int, window: bool = False) -> torch.nn.Module:
        """Where ``site``'s activation of ``layer`` is: the output projection (its input, the
        concatenated heads), the MLP's output projection (its input, the neurons), the MLP or
        the block (their outputs). ``window``: the caller's layers are windows around the
        chosen ones (activation patching's), which a refusal names."""
        if site == "neurons":
            return down_projection(self.mlps[layer], layer)
        if site == "heads":
            if self.unsplit is not None:
                raise ModelError(self.unsplit)
            projection = self.projections[layer]
            if projection is None:
                raise ModelError(
                    f"layer {layer} has no attention heads (its "
                    f"{type(self.blocks[layer]).__name__} mixes tokens otherwise: linear "
                    "attention or a state-space layer); choose attention layers with `layers`"
                    f"{' (and a `window` that stays within them)' if window else ''}, or the "
                    "MLPs' sites"
                )
            return projection
        return {"mlp": self.mlps, "residual": self.blocks}[site][layer]

    def neurons(self, layer: int, who: str = "site='neurons'") -> int:
        """How many neurons layer ``layer``'s MLP has (its output projection's inputs); ``who``
        reads them, for a refusal's message."""
        down = down_projection(self.mlps[layer], layer, who)
        width = in_width(down)
        assert width is not None, type(down).__name__
        return width

    @property
    def on_decoder(self) -> bool:
        """Whether the activations live on the decoder positions (else on the encoder's or the
        decoder-only sequence's)."""
        return self.name in ("decoder", "cross")


#: the names of an MLP's output projection, whose input is the MLP's neurons: Llama's, GPT-2's
#: and StarCoder's, OPT's and BART's, GPT-J's, GPT-NeoX's, T5's, DistilBERT's, ModernBERT's
DOWNS = ("down_proj", "c_proj", "fc2", "fc_out", "dense_4h_to_h", "wo", "lin2", "Wo")


def down_projection(
    mlp: torch.nn.Module, layer: int, who: str = "site='neurons'"
) -> torch.nn.Module:
    """The linear layer whose input is ``mlp``'s neurons (the activation times the gate, in a
    gated MLP): ``mlp`` itself where it is that layer (OPT's and BART's ``fc2``, BERT's
    ``output.dense``, BLOOM's ``dense_4h_to_h``); a ModelError for a mixture of experts, its
    message starting with ``who`` (the site, or the method that reads the neurons)."""
    if is_linear(mlp):
        return mlp
    down = named(mlp, DOWNS)
    if down is None or not is_linear(down):
        routed = any(hasattr(mlp, name) for name in ("experts", "router", "gate"))
        instead = " or site='mlp'" if who.startswith("site=") else ""
        raise ModelError(
            f"{who}: layer {layer}'s MLP ({type(mlp).__name__}) "
            + (
                "is a mixture of experts, whose neurons are each expert's; choose dense "
                f"layers with `layers`{instead}"
                if routed
                else f"has no output projection attrax knows ({' / '.join(DOWNS)})"
            )
        )
    return down


def in_width(module: torch.nn.Module) -> int | None:
    """A Linear's (or GPT-2's Conv1D's) input width; None for another module."""
    width = getattr(module, "in_features", None) or getattr(module, "nx", None)
    return width if isinstance(width, int) else None


def is_linear(module: torch.nn.Module) -> bool:
    """A ``Linear`` (or a subclass: Falcon's) or GPT-2's ``Conv1D``, whose input is 2-D."""
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def site_hook(
    module: torch.nn.Module, site: str, change: Callable[[torch.Tensor], torch.Tensor]
) -> torch.utils.hooks.RemovableHandle:
    """``change`` hooked on ``site``'s activation at ``module`` (:meth:`Stack.module`): the
    output projection's input for the heads and the MLP's neurons, else the module's output (a
    tuple's first: blocks, and GPT-OSS's and Llama 4's experts, which also return their
    routing)."""
    if site in ("heads", "neurons"):

        def pre(_m: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (change(args[0]), *args[1:])

        return module.register_forward_pre_hook(pre)

    def post(_m: torch.nn.Module, _args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (change(output[0]), *output[1:])
        return change(output)

    return module.register_forward_hook(post)


def neuron_width(parts: Stack, layers: list[int], who: str = "site='neurons'") -> int:
    """How many neurons each of ``layers``' MLPs has: one number, or a ModelError that starts
    with ``who`` (the site, or the method that reads the neurons)."""
    widths = {layer: parts.neurons(layer, who) for layer in layers}
    if len(set(widths.values())) > 1:
        raise ModelError(
            f"{who} labels every layer's neurons along one dim; these layers' MLPs "
            f"differ in width ({widths}): choose layers of one width with `layers`"
        )
    return next(iter(widths.values()))


def patch_stack(model: Model, method: str, stack: str | None, site: str) -> Stack:
    """The stack ``stack`` patches (checked against the model and ``site``)."""
    if not model.is_encoder_decoder:
        if stack is not None:
            raise OptionError(
                f"`stack={stack!r}` needs an encoder-decoder model; {model.name} has one stack "
                "(leave stack=None)"
            )
        kind = getattr(model.hf.config, "model_type", None)
        if kind in ENCODERS:
            return encoder_stack(model, method)
        # a hybrid's layers without attention (linear attention, Mamba) have MLP sites, and
        # their heads are refused layer by layer (Stack.module)
        return decoder_stack(model, method, attention=False)
    if stack is None:  # as `maps=None` elsewhere: the cross-attention, or the decoder's blocks
        stack = "cross" if site == "heads" else "decoder"
    if stack == "cross" and site != "heads":
        what = {"mlp": "MLPs", "neurons": "MLP neurons"}.get(site, "residual stream")
        raise OptionError(
            f"`stack='cross'` names the cross-attention heads (site='heads'); the decoder's "
            f"{what} are stack='decoder', got site={site!r}"
        )
    return encoder_decoder_stack(model, method, stack)


#: where decoder-only blocks keep their attention, and where it keeps its output projection
ATTENTIONS = ("self_attn", "attn", "attention", "self_attention")
PROJECTIONS = ("o_proj", "c_proj", "dense", "out_proj")


def decoder_blocks(model: Model, method: str) -> list[torch.nn.Module]:
    """A decoder-only model's (or its classifier's) layers, or ModernBERT's: its base model's
    ``layers`` or ``h``, each mapping the residual stream ``x`` to ``x + b(x)``."""
    base = body(model.hf)
    if not model.is_encoder_decoder:  # OPT keeps its layers in its `decoder`
        base = getattr(base, "decoder", base)
    blocks = getattr(base, "layers", None) or getattr(base, "h", None)
    if model.is_encoder_decoder or not isinstance(blocks, torch.nn.ModuleList):
        raise ModelError(
            f"{method}: {type(model.hf).__name__} keeps no decoder-only layers where attrax "
            "looks (the base model's `layers` or `h`: GPT-2, Llama, Qwen2, Gemma, Phi-3, "
            "Pythia, OPT, BLOOM, Falcon..., ModernBERT); of the post-LN encoders, attrax knows "
            f"where {', '.join(sorted(ENCODERS))} keep their blocks, and not "
            f"{getattr(model.hf.config, 'model_type', None)!r}"
        )
    return list(blocks)


def named(module: torch.nn.Module | None, names: tuple[str, ...]) -> torch.nn.Module | None:
    found = (getattr(module, name, None) for name in names)
    return next((m for m in found if isinstance(m, torch.nn.Module)), None)


# where a block keeps the module whose output its MLP adds: `mlp` (a mixture of experts' too),
# OPT's `fc2`, Granite MoE's `block_sparse_moe`, Llama 4's `feed_forward`
MLPS = ("mlp", "fc2", "block_sparse_moe", "feed_forward")
NO_MLP = (
    "`mlp` (BLOOM's: its `dense_4h_to_h`), `fc2`, `block_sparse_moe` or `feed_forward`; Granite "
    "MoE shared adds a `shared_mlp` beside it"
)


def mlp_of(block: torch.nn.Module) -> torch.nn.Module | None:
    """The module whose output is what ``block``'s MLP adds, or None where two modules add it."""
    if isinstance(getattr(block, "shared_mlp", None), torch.nn.Module):
        return None
    mlp = named(block, MLPS)
    # BLOOM's MLP adds the residual stream to its own output: its last projection's is what it adds
    if mlp is not None and "residual" in inspect.signature(mlp.forward).parameters:
        return named(mlp, ("dense_4h_to_h",))
    return mlp


#: models whose output projection's input is not one slice per query head, and what it is
UNSPLIT = {
    "diffllama": "differential heads (two query heads' outputs each, side by side)",
    "bitnet": "every head's output through one RMSNorm over all of them",
}

#: layer types (a config's ``layer_types``) that mix tokens without softmax attention heads
NOT_ATTENTION = frozenset({"linear_attention", "conv"})


def decoder_stack(model: Model, method: str, attention: bool = True) -> Stack:
    """A decoder-only model's blocks, each with its attention's output projection (its input:
    the concatenated heads) and its ``mlp`` (OPT's: ``fc2``, whose output is what the MLP
    adds); a ModelError when a block lacks either, or, without ``attention`` (sites that read
    no head), lacks its MLP: a hybrid's layers without attention have no projection (None)."""
    blocks = decoder_blocks(model, method)
    attentions = [named(block, ATTENTIONS) for block in blocks]
    # GPT-Neo wraps its attention module in another (`attn.attention`)
    projections = [
        named(attention, PROJECTIONS) or named(named(attention, ("attention",)), PROJECTIONS)
        for attention in attentions
    ]
    # some hybrids keep their linear attention (or convolution) where others keep attention
    # (Kimi Linear's and MiniMax's `self_attn`): the config's layer types tell them apart
    types = getattr(model.hf.config.get_text_config(), "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == len(blocks):
        projections = [
            None if t in NOT_ATTENTION else p for p, t in zip(projections, types, strict=True)
        ]
    mlps = [m for m in map(mlp_of, blocks) if m is not None]
    some = any(p is not None for p in projections)  # a model with no attention is no hybrid
    missing = attention or not some
    if (missing and None in projections) or len(mlps) != len(blocks):
        raise ModelError(
            f"{method}: {type(model.hf).__name__}'s layers lack an attention output projection "
            f"({' / '.join(PROJECTIONS)} of {' / '.join(ATTENTIONS)}) or one MLP module "
            f"({NO_MLP})"
        )
    heads = _arch.heads(model.hf.config, "self")
    if not isinstance(heads, int):
        raise ModelError(f"{method}: cannot tell how many heads {type(model.hf).__name__} has")
    unsplit = None
    if getattr(model.hf.config, "model_type", None) in UNSPLIT:
        unsplit = (
            f"{method}: {type(model.hf).__name__}'s output projection reads "
            f"{UNSPLIT[model.hf.config.model_type]}, not one slice per query head; its MLP and "
            "residual sites run"
        )
    return Stack("self", blocks, projections, mlps, heads, unsplit)


# encoder classifiers: where the base model keeps its blocks, where a block keeps the module
# whose input is the concatenated heads, and the module whose output is what its MLP adds (in
# BERT's post-norm blocks, before the LayerNorm of the residual sum)
BERT_BLOCKS = ("encoder.layer", "attention.output.dense", "output.dense")
ENCODERS = {
    **dict.fromkeys(
        ("bert", "roberta", "xlm-roberta", "camembert", "electra", "deberta-v2"), BERT_BLOCKS
    ),
    "distilbert": ("transformer.layer", "attention.out_lin", "ffn"),
    "modernbert": ("layers", "attn.Wo", "mlp"),  # pre-norm
}


def encoder_stack(model: Model, method: str) -> Stack:
    """An encoder classifier's blocks (:data:`ENCODERS`), each with the module whose input is
    the concatenated heads and the module whose output is what its MLP adds."""
    config = model.hf.config
    where, projection, mlp = ENCODERS[config.model_type]
    try:
        blocks = list(cast(torch.nn.ModuleList, body(model.hf).get_submodule(where)))
    except AttributeError as err:
        raise ModelError(
            f"{method}: {model.name} keeps no blocks at {config.model_type}'s `{where}` ({err})"
        ) from None
    heads = _arch.heads(config, "self")
    if not isinstance(heads, int):
        raise ModelError(f"{method}: cannot tell how many heads {model.name} has")
    try:
        projections = [block.get_submodule(projection) for block in blocks]
        mlps = [block.get_submodule(mlp) for block in blocks]
    except AttributeError as err:  # a remote-code model of that type, laid out otherwise
        raise ModelError(
            f"{method}: {model.name}'s blocks lack {config.model_type}'s `{projection}` or "
            f"`{mlp}` ({err})"
        ) from None
    return Stack("self", blocks, list[torch.nn.Module | None](projections), mlps, heads)


def encoder_decoder_stack(model: Model, method: str, stack: str) -> Stack:
    """An encoder-decoder's stack: BART-like layers (Marian, BART: ``self_attn`` /
    ``encoder_attn`` with ``out_proj``, ``fc2``) or T5 blocks (``SelfAttention`` /
    ``EncDecAttention`` with ``o``, ``DenseReluDense``); anything else is a ModelError."""
    hf = model.hf
    name = f"{type(hf).__name__} (model_type {getattr(hf.config, 'model_type', None)!r})"
    part = hf.get_encoder() if stack == "encoder" else hf.get_decoder()
    blocks = list(getattr(part, "layers", None) or getattr(part, "block", None) or [])
    first = blocks[0] if blocks else None
    if first is not None and hasattr(first, "fc2") and hasattr(first, "self_attn"):
        attribute = "encoder_attn" if stack == "cross" else "self_attn"
        modules = [getattr(b, attribute, None) for b in blocks]
        projections = [getattr(a, "out_proj", None) for a in modules]
        mlps = [b.fc2 for b in blocks]  # fc2's output: what the MLP adds to the residual
    elif first is not None and hasattr(first, "layer"):  # T5: [self, (cross,) feed-forward]
        inner = "EncDecAttention" if stack == "cross" else "SelfAttention"
        at = 1 if stack == "cross" else 0
        modules = [getattr(b.layer[at], inner, None) for b in blocks]
        projections = [getattr(a, "o", None) for a in modules]
        mlps = [getattr(b.layer[-1], "DenseReluDense", None) for b in blocks]
    else:
        raise ModelError(
            f"{method} has no rule for {name}: it knows BART-like encoder-decoders "
            "(Marian, BART: self_attn / encoder_attn with out_proj, fc2) and T5"
        )
    found = [p for p in projections if isinstance(p, torch.nn.Module)]
    found_mlps = [m for m in mlps if isinstance(m, torch.nn.Module)]
    if len(found) != len(projections) or len(found_mlps) != len(mlps):
        raise ModelError(
            f"{method}: {name}'s {stack} blocks lack the attention output projection or MLP "
            "attrax patches"
        )
    attention = modules[0]
    heads = getattr(attention, "num_heads", None) or getattr(attention, "n_heads", None)
    heads = heads or _arch.heads(hf.config, "encoder" if stack == "encoder" else "cross")
    if not isinstance(heads, int):
        raise ModelError(f"{method}: cannot tell how many heads {name}'s {stack} layers have")
    return Stack(stack, blocks, list[torch.nn.Module | None](found), found_mlps, heads)
