"""DecompX (Modarressi et al. 2023): a sequence classifier's class logits split among its input
tokens by carrying every token's share of every position's representation through the model.

Each position's representation is held as a sum of one vector per input token (at the first
block's input, token ``k``'s vector at position ``k`` is the embedding output, the others are
zero). Every layer maps the shares as the model maps their sum: the attention (its weights held
as they ran), the residuals, each LayerNorm linear at the scale of its real input, the
feed-forward network's activation as the ratio ``act(z) / z`` of its real input and output, and
each bias shared among the tokens; then the classification head on the first token the same
way. The shares of a class logit then sum to the logit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import xarray as xr

from . import _arch
from ._errors import ModelError, OptionError
from ._inputs import Tensors, to_tensors
from ._memory import CALL_OVERHEAD, budget_after, parse_bytes
from ._mixing import _POST_NORM, _architecture, _layers, _parts
from ._model import Model
from ._protocol import Call, Family

#: how a bias is shared among the tokens' vectors it is added to
BIASES = ("absdot", "norm", "equal")

DECOMPX = Family(
    name="decompx",
    takes=("contrast", "max_memory"),
    refuses={
        "objective": "DecompX splits the class logit (with `contrast`: the logit difference "
        "target - contrast)",
        "positions": "DecompX explains a sequence classifier's class, read at one position",
        "attribute_target": "DecompX decomposes encoder-only classifiers",
        "chunk_size": "DecompX runs no backward",
        "batch_size": "DecompX decomposes one forward: `max_memory` bounds the examples and "
        "positions decomposed at once",
        "max_new_tokens": "DecompX explains classifiers, which generate nothing",
    },
)


@dataclass
class _Block:
    """What DecompX reads from one post-norm encoder block: the value projection (and which of
    its output features are values), the attention output projection and the two LayerNorms
    and feed-forward layers."""

    module: torch.nn.Module  # the block itself, whose first input is the embedding output
    values: torch.nn.Linear
    value_features: slice | torch.Tensor
    output: torch.Tensor  # [d, heads * hd]
    output_bias: torch.Tensor | None
    norm1: torch.nn.LayerNorm
    up: torch.nn.Linear
    down: torch.nn.Linear
    norm2: torch.nn.LayerNorm


def _blocks(model: Model) -> list[_Block]:
    """Each block's parts (a ModelError for the models DecompX has no decomposition for)."""
    kind = _architecture(model)
    if model.task != "sequence-classification" or kind not in _POST_NORM:
        raise ModelError(
            f"{model.name} ({kind}, {model.task}): DecompX decomposes the sequence classifiers "
            f"of post-norm encoders ({', '.join(_POST_NORM)}): each block's two LayerNorms and "
            "feed-forward network, then the classification head on the first token"
        )
    blocks = []
    for layer in _layers(model):
        block = layer.block
        parts = _parts(model, layer, what="DecompX")
        if kind == "distilbert":
            up, down = block.get_submodule("ffn.lin1"), block.get_submodule("ffn.lin2")
            norm2 = block.get_submodule("output_layer_norm")
        else:
            up, down = (
                block.get_submodule("intermediate.dense"),
                block.get_submodule("output.dense"),
            )
            norm2 = block.get_submodule("output.LayerNorm")
        blocks.append(
            _Block(
                block,
                cast(torch.nn.Linear, layer.values),
                layer.value_features,
                parts.weight,
                parts.bias,
                cast(torch.nn.LayerNorm, parts.norm),
                cast(torch.nn.Linear, up),
                cast(torch.nn.Linear, down),
                cast(torch.nn.LayerNorm, norm2),
            )
        )
    return blocks


def _head(model: Model) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """The classification head's two linear layers around its activation, on the first token:
    BERT's pooler and classifier, RoBERTa's and ELECTRA's ``classifier.dense`` and
    ``out_proj``, DistilBERT's ``pre_classifier`` and ``classifier``, DeBERTa-v2's pooler."""
    hf = model.hf
    kind = _architecture(model)
    if kind == "distilbert":
        first, second = hf.pre_classifier, hf.classifier
    elif kind in ("bert", "deberta-v2"):
        pooler = hf.bert.pooler if kind == "bert" else hf.pooler
        if pooler is None:
            raise ModelError(f"{model.name}: DecompX needs the classifier's pooler; it has none")
        first, second = pooler.dense, hf.classifier
    else:  # RoBERTa, XLM-R, CamemBERT, ELECTRA
        first, second = hf.classifier.dense, hf.classifier.out_proj
    return cast(torch.nn.Linear, first), cast(torch.nn.Linear, second)


class _Run:
    """The forward's values DecompX linearizes at: the first block's input; per layer the
    attention weights, the inputs of the two LayerNorms, the feed-forward's input to its
    activation and output of it; and the head's."""

    def __init__(self, model: Model, blocks: list[_Block]) -> None:
        self.model, self.blocks = model, blocks
        self.first: torch.Tensor | None = None
        self.maps: list[torch.Tensor] = []
        self.kept: dict[tuple[str, int], torch.Tensor] = {}

    def forward(self, t: Tensors) -> None:
        hooks: list[Any] = []

        def keep(name: str, index: int, output: bool = False) -> Callable[..., None]:
            def hook(_module: torch.nn.Module, args: Any, out: Any = None) -> None:
                self.kept[name, index] = (out if output else args[0]).detach()

            return hook

        def keep_first(_module: torch.nn.Module, args: Any, kwargs: Any) -> None:
            self.first = (args[0] if args else kwargs["hidden_states"]).detach()

        first_block = self.blocks[0].module
        hooks.append(first_block.register_forward_pre_hook(keep_first, with_kwargs=True))
        for i, block in enumerate(self.blocks):
            hooks.append(block.norm1.register_forward_pre_hook(keep("norm1", i)))
            hooks.append(block.up.register_forward_hook(keep("up", i, output=True)))
            hooks.append(block.down.register_forward_pre_hook(keep("act", i)))
            hooks.append(block.norm2.register_forward_pre_hook(keep("norm2", i)))
        first, second = _head(self.model)
        hooks.append(first.register_forward_hook(keep("head_up", 0, output=True)))
        hooks.append(second.register_forward_pre_hook(keep("head_act", 0)))
        try:  # the feed-forward runs whole in every call (_protocol), as these hooks read it
            self.model.stream_attention(t, lambda _stack, w: self.maps.append(w.detach()))
        finally:
            for hook in hooks:
                hook.remove()


def _biases(value: object, name: str) -> None:
    if value not in BIASES:
        raise OptionError(f"`{name}` must be one of {BIASES}, got {value!r}")


@DECOMPX.method(biases=_biases)
def decompx(call: Call, *, biases: str = "absdot") -> xr.DataArray:
    """DecompX (Modarressi et al. 2023): each input token's share of a sequence classifier's
    class logit, carried through every component of the model.

    Every position's representation is held as one vector per input token, summing to it; each
    layer maps the vectors as the model maps their sum: attention with its weights as they ran,
    residuals, each LayerNorm linear at the scale of its real input, the feed-forward
    activation as the ratio ``act(z) / z`` of its real input and output (the paper's
    zero-origin approximation, exact for the sum), and each bias shared among the vectors;
    then the classification head on the first token the same way (its ``tanh``, GELU or ReLU
    as a ratio too). In the first block each token's value keeps the values' bias, as the
    authors' code computes it; later blocks share it with the output projection's. A token's
    share of the logit is its vector through the head's last layer, so the shares of each
    class sum to its logit. Post-norm encoders' sequence classifiers:
    BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, DistilBERT, DeBERTa-v2.

    Arguments:
        model, inputs, targets, contrast: as :func:`attrax.saliency` (``contrast``: a second
            class; the shares of the logit difference).
        biases: how a bias (the attention's, the LayerNorms', the feed-forward's and the
            head's) is shared among the vectors it is added to: ``"absdot"`` (default, the
            paper's: by ``|<vector, bias>|``), ``"norm"`` (by the vectors' norms) or
            ``"equal"`` (equally among the non-zero ones).
        max_memory: bytes (or ``"8GB"``) the call may take: bounds the examples whose
            ``[L, L, d]`` vectors are held at once and the positions whose feed-forward
            vectors are built at once (None: half the device's free memory; on the CPU 2 GiB
            of vectors at most). Below one example and one position on top of the forward: an
            :class:`~attrax.OptionError` naming the smallest budget.

    Returns:
        DataArray ``([example,] target, source)`` in logit units: each source token's share of
        each target class's logit (minus the contrast's), summing over sources to the logit.

    >>> import attrax as ax
    >>> model = ax.load_model("attrax:classifier")
    >>> da = ax.decompx(model, "the plot was good", "all")
    >>> da.dims
    ('target', 'source')
    """
    model = call.model
    blocks = _blocks(model)
    t = to_tensors(call.batch, model)
    dtype = torch.float64 if model.dtype == torch.float64 else torch.float32
    group, rows = _sizes(model, t, blocks, call.options)  # a refused budget before any forward
    run = _Run(model, blocks)
    with torch.no_grad():
        run.forward(t)
        shares = torch.cat(
            [
                _decompose(run, slice(start, start + group), rows, biases, dtype)
                for start in range(0, t.ids.shape[0], group)  # memory chunking over examples
            ]
        )  # [B, L, classes]
    index = t.target_ids.clamp(min=0)  # [B, K] classes; padding targets are masked by label
    values = torch.gather(
        shares.transpose(1, 2), 1, index[..., None].expand(-1, -1, shares.shape[1])
    )
    if t.contrast_ids is not None:
        against = t.contrast_ids.clamp(min=0)[..., None].expand(-1, -1, shares.shape[1])
        values = values - torch.gather(shares.transpose(1, 2), 1, against)
    return call.label([values], trailing=())


def _decompose(
    run: _Run, examples: slice, rows: int, biases: str, dtype: torch.dtype
) -> torch.Tensor:
    """The shares ``[b, L, classes]`` of the examples ``examples``' class logits."""
    assert run.first is not None
    x = run.first[examples].to(dtype)
    length = x.shape[1]
    eye = torch.eye(length, dtype=dtype, device=x.device)
    shares = x[:, :, None, :] * eye[None, :, :, None]  # [b, i, k, d]: token k's part of h_i
    for index, block in enumerate(run.blocks):
        maps = run.maps[index][examples].to(dtype)  # [b, heads, i, j]
        shares = _attention(shares, maps, block, biases, first=index == 0)
        for start in range(0, length, rows):  # memory chunking over positions
            part = slice(start, start + rows)
            shares[:, part] = _position_wise(
                shares[:, part], run, index, examples, part, block, biases
            )
    first, second = _head(run.model)
    head = shares[:, 0]  # [b, k, d]: the first token, which the head reads
    up = _shared(head @ _w(first, dtype).T, _b(first, dtype), biases)
    up = (
        up
        * _ratio(run.kept["head_act", 0][examples], run.kept["head_up", 0][examples], dtype)[
            :, None
        ]
    )
    return _shared(up @ _w(second, dtype).T, _b(second, dtype), biases)


def _attention(
    shares: torch.Tensor, maps: torch.Tensor, block: _Block, biases: str, first: bool
) -> torch.Tensor:
    """The vectors of the attention block's residual sum: each token's vectors through the
    values, the weights and the output projection, plus the residual, the biases shared. In the
    ``first`` block each token's value holds the values' bias, as the authors' code has it (its
    first layer reads the values as they ran); later blocks share it with the output's."""
    heads = maps.shape[1]
    weight = _w(block.values, shares.dtype)[block.value_features]  # [heads * hd, d]
    values = shares @ weight.T  # [b, j, k, heads * hd]
    value_bias = _b(block.values, shares.dtype)
    value_bias = None if value_bias is None else value_bias[block.value_features]
    bias = None if block.output_bias is None else block.output_bias.to(shares.dtype)
    output = block.output.to(shares.dtype).unflatten(1, (heads, -1))  # [d, h, e]
    if value_bias is not None and first:
        own = torch.arange(values.shape[1], device=values.device)
        values[:, own, own] += value_bias
    elif value_bias is not None:  # each row of weights sums to 1: the values' bias passes whole
        bias = output.flatten(1) @ value_bias + (0 if bias is None else bias)
    mixed = torch.einsum("bhij,bjkhe->bikhe", maps, values.unflatten(-1, (heads, -1)))
    del values  # [b, L, L, d] each: at most three alive at once
    attended = torch.einsum("bikhe,dhe->bikd", mixed, output)
    del mixed
    return _shared(attended.add_(shares), bias, biases)


def _position_wise(
    shares: torch.Tensor,
    run: _Run,
    index: int,
    examples: slice,
    part: slice,
    block: _Block,
    biases: str,
) -> torch.Tensor:
    """The positions ``part``'s vectors through the first LayerNorm, the feed-forward network,
    the residual and the second LayerNorm."""
    dtype = shares.dtype
    kept = run.kept

    def norm(vectors: torch.Tensor, module: torch.nn.LayerNorm, real: torch.Tensor) -> torch.Tensor:
        real = real[examples, part].to(dtype)
        scale = torch.sqrt(real.var(-1, unbiased=False) + module.eps)[:, :, None, None]
        normed = _w(module, dtype) * (vectors - vectors.mean(-1, keepdim=True)) / scale
        return _shared(normed, _b(module, dtype), biases)

    normed = norm(shares, block.norm1, kept["norm1", index])
    up = _shared(normed @ _w(block.up, dtype).T, _b(block.up, dtype), biases)
    ratio = _ratio(kept["act", index][examples, part], kept["up", index][examples, part], dtype)
    down = _shared(
        (up * ratio[:, :, None]) @ _w(block.down, dtype).T, _b(block.down, dtype), biases
    )
    return norm(normed + down, block.norm2, kept["norm2", index])


def _ratio(output: torch.Tensor, given: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An activation's ``act(z) / z`` where it ran; 0 where ``z`` is 0 (the vectors there sum to
    0 and ``act(0)`` is 0: the shares still sum to the output)."""
    output, given = output.to(dtype), given.to(dtype)
    return torch.where(given != 0, output / torch.where(given != 0, given, 1), 0)


def _shared(vectors: torch.Tensor, bias: torch.Tensor | None, biases: str) -> torch.Tensor:
    """``vectors [..., k, d]`` plus ``bias [d]`` shared among the ``k`` vectors of each row."""
    if bias is None:
        return vectors
    if biases == "absdot":
        weights = (vectors @ bias).abs()
    elif biases == "norm":
        weights = torch.linalg.vector_norm(vectors, dim=-1)
    else:
        weights = (vectors != 0).any(-1).to(vectors.dtype)
    total = weights.sum(-1, keepdim=True)
    # a row whose weights are all 0 takes the bias on no token
    weights = weights / torch.where(total == 0, 1, total)
    return vectors.addcmul_(weights[..., None], bias)  # in place: no second [..., k, d]


def _w(module: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    return cast(torch.Tensor, module.weight).to(dtype)


def _b(module: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    bias = cast("torch.Tensor | None", getattr(module, "bias", None))
    return None if bias is None else bias.to(dtype)


def _sizes(model: Model, t: Tensors, blocks: list[_Block], options: Any) -> tuple[int, int]:
    """Examples decomposed at once and positions whose feed-forward vectors are built at once,
    within ``max_memory`` (None: half the free memory; on the CPU :data:`CPU_PASS` at most)."""
    batch, length = t.ids.shape
    width = blocks[0].up.in_features  # the blocks' width (ELECTRA's embeddings are narrower)
    inner = max(block.up.out_features for block in blocks)
    size = 8 if model.dtype == torch.float64 else 4
    layers = len(blocks)
    # the forward's kept values: two LayerNorm inputs, the feed-forward's two, each layer's maps
    heads = _arch.heads(model.hf.config, "self") or 1
    kept = size * batch * layers * (length * (2 * width + 2 * inner) + heads * length * length)
    fixed = CALL_OVERHEAD + kept
    # per example: the vectors, the values, their mix, the einsum's copy of one and the
    # attended ([L, L, d] each; 4.2 of them measured at the attention's peak on a d=256 BERT
    # over 542 tokens, a whole call's growth)
    example = 5 * size * length * length * width
    # per position of one example: the feed-forward's vectors and their temporaries ([L, 4d])
    row = 3 * size * length * inner
    smallest = fixed + example + row
    max_memory = parse_bytes(options.get("max_memory"))
    one = "DecompX with one example and one position at a time"
    left = budget_after(model.device, max_memory, fixed, smallest, one)
    group = max(1, min(batch, left // (example + length * row)))
    rows = max(1, min(length, (left - group * example) // (group * row)))
    return int(group), int(rows)


__all__ = ["decompx"]
