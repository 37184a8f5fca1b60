"""Scaled dot-product attention whose backward batches under ``vmap``: one fused call for every
cotangent, folded into the batch (or head) dim.

PyTorch has no ``vmap`` batching rule for SDPA's fused backward
(``aten::_scaled_dot_product_flash_attention_for_cpu_backward``, the CUDA ones), so the engine's
vectorized backward (``vmap`` over a ``vjp`` pullback) ran it once per target. :func:`attention`
computes what ``F.scaled_dot_product_attention`` computes, through an ``autograd.Function``
(:class:`_Attention`) whose backward is another (:class:`_Gradients`) with a ``vmap`` rule: every
vmapped dim moves into SDPA's batch dim (into its head dim when a per-example mask would otherwise
be copied per cotangent), one call runs, and the result is unfolded.

Backends: on the CPU, SDPA's own fused CPU kernels, forward and backward (what
``F.scaled_dot_product_attention`` runs there: the same numbers), in float32 for half-precision
inputs (see :data:`_CORE`); on other devices the forward is
``F.scaled_dot_product_attention`` and the backward recomputes it under autograd over all
cotangents at once, so torch picks the kernel (flash, efficient, cuDNN, math). Calls these cannot
serve (dropout, nested tensors, a mask that needs a gradient, shapes the CPU kernel refuses) run
``F.scaled_dot_product_attention`` itself.

:func:`folded_sdpa` routes ``F.scaled_dot_product_attention`` to :func:`attention` inside a block,
on this thread only; the model adapter enters it around forwards that run SDPA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

_aten = torch.ops.aten
# the dtypes SDPA's fused CPU kernel takes (torch's use_flash_attention_cpp)
_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# the dtype the fused CPU kernels run in for half-precision inputs (the output is cast back): their
# bfloat16 backward takes the softmax gradient's row sums from the rounded output, which put
# Llama-1B-shaped saliency sums over hidden 5.7% off float32 (0.7% with this), and query gradients
# up to 4% off where values share an offset (tests/test_sdpa.py)
_CORE = {torch.bfloat16: torch.float32, torch.float16: torch.float32}


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    recompute: bool | None = None,
) -> Tensor:
    """``F.scaled_dot_product_attention`` (same arguments) whose backward under ``vmap`` runs once
    over every vmapped cotangent instead of once per cotangent.

    Arguments:
        query, key, value: ``[B, heads, L, d]``; with ``enable_gqa``, key and value may have
            fewer heads, a divisor of the query's.
        attn_mask: bool (``True`` attends) or additive, broadcastable to ``[B, heads, Lq, Lk]``.
        recompute: the backward recomputes the forward through ``F.scaled_dot_product_attention``
            (any device); ``None``: everywhere but on the CPU, which runs SDPA's fused CPU kernels.

    Returns:
        ``[B, heads, Lq, d_value]``, as ``F.scaled_dot_product_attention``; with arguments the
        fused path does not take (see the module), it is that call.

    >>> q, k, v = torch.randn(3, 1, 2, 5, 8).unbind()
    >>> out = attention(q, k, v, is_causal=True)
    >>> torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    True
    """
    if recompute is None:
        recompute = query.device.type != "cpu"
    # with or without gradients: under vmap a tensor cannot tell whether autograd tracks it
    foldable = _foldable(query, key, value, attn_mask, dropout_p, enable_gqa)
    if not (foldable and (recompute or _fused_cpu(query, key, value))):
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    if attn_mask is not None and attn_mask.ndim < 4:
        attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.ndim) + attn_mask.shape)
    out = _Attention.apply(query, key, value, attn_mask, is_causal, scale, recompute)[0]
    return out.to(query.dtype)  # a half-precision input's float32 core (a no-op otherwise)


@contextlib.contextmanager
def folded_sdpa() -> Iterator[None]:
    """Inside the block, ``F.scaled_dot_product_attention`` runs as :func:`attention` (this
    thread only; other torch functions pass through untouched).

    >>> import torch.nn.functional as F
    >>> q = torch.randn(1, 2, 4, 8, requires_grad=True)
    >>> with folded_sdpa():
    ...     out = F.scaled_dot_product_attention(q, q, q)
    >>> out.grad_fn.name()
    '_AttentionBackward'
    """
    with _Route():
        yield


class _Route(TorchFunctionMode):
    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict | None = None
    ) -> Any:
        if func is F.scaled_dot_product_attention:
            return attention(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _foldable(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    dropout_p: float,
    enable_gqa: bool,
) -> bool:
    """Whether :class:`_Attention` computes this call: no dropout, dense ``[B, heads, L, d]``
    tensors of one dtype and device, heads that match (or group, with ``enable_gqa``), a mask
    that needs no gradient and broadcasts."""
    qkv = (query, key, value)
    if dropout_p != 0.0 or any(x.is_nested or x.ndim != 4 for x in qkv):
        return False
    if any(x.dtype != query.dtype or x.device != query.device for x in qkv):
        return False
    (b, heads, lq, _), (bk, kv_heads, lk, _) = query.shape, key.shape
    if value.shape[:3] != key.shape[:3] or bk != b or kv_heads == 0:
        return False
    if heads != kv_heads and not (enable_gqa and heads % kv_heads == 0):
        return False
    if mask is None:
        return True
    if mask.is_nested or mask.ndim > 4 or mask.requires_grad or mask.device != query.device:
        return False
    if mask.dtype not in (torch.bool, query.dtype):
        return False
    full = (b, heads, lq, lk)[4 - mask.ndim :]
    return all(m in (1, n) for m, n in zip(mask.shape, full, strict=True))


def _fused_cpu(query: Tensor, key: Tensor, value: Tensor) -> bool:
    """Whether SDPA's fused CPU kernel serves this call, as ``F.scaled_dot_product_attention``
    would pick it: a CPU dtype, one head width, non-empty sequences, the kernel not disabled."""
    return (
        query.device.type == "cpu"
        and query.dtype in _CPU_DTYPES
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and min(query.shape[-2], key.shape[-2]) > 0
        and torch.backends.cuda.flash_sdp_enabled()  # one switch for the CPU's flash kernel too
    )


def _upcast(
    dtype: torch.dtype, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Query, key, value and a float mask in ``dtype`` (a bool mask as it is)."""
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    return query.to(dtype), key.to(dtype), value.to(dtype), mask


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool mask as the additive one torch's SDPA passes its fused CPU kernel (-inf: masked)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf")
    )


def _flash_cpu(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, is_causal: bool, scale: Any
) -> tuple[Tensor, Tensor]:
    # the kernel reads the last dim contiguously (torch's own SDPA would run math otherwise)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (query, key, value))
    return _aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, attn_mask=_additive(mask, query.dtype), scale=scale
    )


class _Attention(torch.autograd.Function):
    """SDPA's output and logsumexp (``None`` when the backward recomputes); the backward is
    :class:`_Gradients`, which batches under ``vmap``.

    ``torch.library.custom_op``'s ``register_autograd`` does not compose with ``torch.func``
    transforms; an ``autograd.Function`` with ``setup_context`` and a ``vmap`` rule does.
    """

    @staticmethod
    def forward(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        mask: Tensor | None,
        is_causal: bool,
        scale: float | None,
        recompute: bool,
    ) -> tuple[Tensor, Tensor | None]:
        if recompute:
            out = F.scaled_dot_product_attention(
                query,
                key,
                value,
                attn_mask=mask,
                is_causal=is_causal,
                scale=scale,
                enable_gqa=key.shape[1] != query.shape[1],
            )
            return out, None
        core = _CORE.get(query.dtype)
        if core is not None:  # the output stays in float32 for the backward; attention() casts it
            query, key, value, mask = _upcast(core, query, key, value, mask)
        return _flash_cpu(query, key, value, mask, is_causal, scale)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        query, key, value, mask, is_causal, scale, _ = inputs
        out, lse = output
        if lse is not None:
            ctx.mark_non_differentiable(lse)
        # the recomputing backward needs neither the output nor the logsumexp
        ctx.save_for_backward(query, key, value, mask, None if lse is None else out, lse)
        ctx.is_causal, ctx.scale = is_causal, scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _grad_lse: Any) -> tuple[Any, ...]:
        query, key, value, mask, out, lse = ctx.saved_tensors
        grads = _Gradients.apply(grad, query, key, value, out, lse, mask, ctx.is_causal, ctx.scale)
        return (*grads, None, None, None, None)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], *args: Any) -> tuple[Any, Any]:
        query, key, value, mask, is_causal, scale, recompute = args
        fold = _Fold(info.batch_size, query, in_dims[0], mask, in_dims[3])
        tensors = (fold(x, d) for x, d in zip((query, key, value), in_dims[:3], strict=True))
        out, lse = _Attention.apply(*tensors, fold.mask, is_causal, scale, recompute)
        return (fold.unfold(out), None if lse is None else fold.unfold(lse)), (
            0,
            None if lse is None else 0,
        )


class _Gradients(torch.autograd.Function):
    """The gradients of SDPA's output w.r.t. query, key and value, for the output gradient
    ``grad``: SDPA's fused CPU backward when the forward left its ``logsumexp``, else a
    recomputed ``F.scaled_dot_product_attention`` under autograd. Its ``vmap`` rule folds.

    An ``autograd.Function`` rather than a ``torch.library`` custom op: a custom op's kernel runs
    below autograd's dispatch key, where the recomputing backward could not run autograd.
    """

    @staticmethod
    def forward(
        grad: Tensor,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        out: Tensor | None,
        logsumexp: Tensor | None,
        mask: Tensor | None,
        is_causal: bool,
        scale: float | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        if logsumexp is None:
            with torch.enable_grad():  # a forward (and a backward) runs without grad mode
                q, k, v = (x.detach().requires_grad_(True) for x in (query, key, value))
                recomputed = F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=mask,
                    is_causal=is_causal,
                    scale=scale,
                    enable_gqa=key.shape[1] != query.shape[1],
                )
                dq, dk, dv = torch.autograd.grad(recomputed, (q, k, v), grad)
            return dq, dk, dv
        dtype = query.dtype
        if out is not None and out.dtype != dtype:  # the forward ran in its float32 core
            query, key, value, mask = _upcast(out.dtype, query, key, value, mask)
            grad = grad.to(out.dtype)
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (query, key, value))
        grads = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad,
            q,
            k,
            v,
            out,
            logsumexp,
            0.0,
            is_causal,
            attn_mask=_additive(mask, query.dtype),
            scale=scale,
        )
        return tuple(g.to(dtype) for g in grads)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass  # no double backward: attrax differentiates once

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], *args: Any) -> tuple[Any, Any]:
        # the engine's case: only the cotangent is batched; anything else is folded the same way
        grad, query, key, value, out, logsumexp, mask, is_causal, scale = args
        fold = _Fold(info.batch_size, query, in_dims[1], mask, in_dims[6])
        tensors = (grad, query, key, value, out, logsumexp)
        folded = [None if x is None else fold(x, d) for x, d in zip(tensors, in_dims, strict=False)]
        grads = _Gradients.apply(*folded, fold.mask, is_causal, scale)
        return tuple(fold.unfold(g) for g in grads), (0, 0, 0)


class _Fold:
    """One vmapped dim of ``size`` folded into SDPA's batch dim (``[S * B, heads, ...]``), or into
    its head dim (``[B, S * heads, ...]``) when the mask is per example but shared by the heads:
    the mask then broadcasts as it is, where the batch fold would copy it per cotangent.

    A per-head tensor ``[B, heads, ...]`` that is not batched is broadcast (a view, no copy, when
    ``B == 1``). ``fold.mask`` is the mask for the folded call.
    """

    def __init__(
        self, size: int, query: Tensor, query_dim: int | None, mask: Tensor | None, mask_dim: Any
    ) -> None:
        self.size = size
        # the logical batch: the physical dims without the vmapped one
        batch = query.shape[1] if query_dim == 0 else query.shape[0]
        shared = mask is None or mask_dim is not None or mask.shape[0] == 1
        self.heads = not shared and mask.shape[1] == 1  # type: ignore[union-attr]
        self.mask = mask
        if mask is not None and not self.heads and not (mask_dim is None and mask.shape[0] == 1):
            # a per-example (batched or per-head) mask: one copy per cotangent
            m = mask.expand(size, *mask.shape) if mask_dim is None else mask.movedim(mask_dim, 0)
            self.mask = m.expand(size, batch, *m.shape[2:]).flatten(0, 1)

    def __call__(self, x: Tensor, dim: int | None) -> Tensor:
        x = x.movedim(dim, 0) if dim is not None else x.expand(self.size, *x.shape)
        if self.heads:
            return x.transpose(0, 1).flatten(1, 2)
        return x.flatten(0, 1)

    def unfold(self, y: Tensor) -> Tensor:
        if self.heads:
            return y.unflatten(1, (self.size, -1)).transpose(0, 1)
        return y.unflatten(0, (self.size, -1))
