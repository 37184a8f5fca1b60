"""The vmap-aware SDPA (``attrax._sdpa``): the op against ``F.scaled_dot_product_attention`` and a
per-cotangent loop written here, on the CPU kernels and on the recomputing path; attrax's gradient
methods through it against eager attention, with one fused backward per attention call; and the
routing confined to attrax's own forwards."""

from __future__ import annotations

import collections
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import vjp
from torch.utils._python_dispatch import TorchDispatchMode

import attrax as ax
from attrax._sdpa import attention, folded_sdpa
from attrax.testing import tiny_classifier, tiny_model
from tests.conftest import PAIRS, assert_close

FORWARD = "aten::_scaled_dot_product_flash_attention_for_cpu"
BACKWARD = "aten::_scaled_dot_product_flash_attention_for_cpu_backward"
COTANGENTS = 5


class KernelCalls(TorchDispatchMode):
    """Counts SDPA's fused CPU kernels as they run: a backward ``vmap`` runs once per cotangent
    shows up as that many calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name() in (FORWARD, BACKWARD):
            self.calls[func.name()] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_fallback() -> Iterator[list[warnings.WarningMessage]]:
    """Fails the test if ``vmap`` falls back to a per-sample loop for a missing batching rule."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    assert not [w for w in caught if "batching rule" in str(w.message)]


# name -> (B, heads, kv heads, Lq, Lk, mask shape or None, mask dtype, causal)
CASES = {
    "causal": (1, 4, 4, 12, 12, None, None, True),
    "causal, 3 examples": (3, 4, 4, 12, 12, None, None, True),
    "bool mask per example": (3, 4, 4, 12, 12, (3, 1, 12, 12), torch.bool, False),
    "bool mask shared": (3, 4, 4, 12, 12, (1, 1, 12, 12), torch.bool, False),
    "float mask per head": (3, 4, 4, 12, 9, (3, 4, 12, 9), torch.float64, False),
    "float mask 2-d": (2, 4, 4, 12, 9, (12, 9), torch.float64, False),
    "gqa causal": (2, 4, 2, 12, 12, None, None, True),
    "gqa bool mask": (2, 4, 2, 12, 12, (2, 1, 12, 12), torch.bool, False),
    "scaled causal": (2, 4, 4, 12, 12, None, None, True),
    "scaled bool mask per example": (3, 4, 4, 12, 12, (3, 1, 12, 12), torch.bool, False),
}
# a softmax scale other than 1/sqrt(head width), on the op itself: through the models only T5's
# (1.0) differs from it, and never on the recomputing path that GPUs run
SCALES = {"scaled causal": 0.3, "scaled bool mask per example": 1.7}


def _case(name: str) -> tuple[tuple[torch.Tensor, ...], dict]:
    b, heads, kv_heads, lq, lk, mask_shape, mask_dtype, causal = CASES[name]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, heads, lq, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, kv_heads, lk, 8, generator=g, dtype=torch.float64) for _ in "kv")
    mask = None
    if mask_dtype is torch.bool:
        mask = torch.rand(mask_shape, generator=g) > 0.3
        mask[..., 0] = True  # every query attends to something
    elif mask_dtype is not None:
        mask = torch.randn(mask_shape, generator=g, dtype=mask_dtype)
    options = dict(attn_mask=mask, is_causal=causal, enable_gqa=kv_heads != heads)
    if name in SCALES:
        options["scale"] = SCALES[name]
    return (q, k, v), options


@pytest.mark.parametrize("recompute", [False, True], ids=["cpu-kernels", "recompute"])
@pytest.mark.parametrize("name", list(CASES))
def test_output_and_gradients_equal_torch_sdpa(name, recompute):
    qkv, options = _case(name)
    leaves = [x.clone().requires_grad_(True) for x in qkv]
    got = attention(*leaves, **options, recompute=recompute)
    assert got.grad_fn.name() == "_AttentionBackward"  # the op ran, not a fall-through
    want = F.scaled_dot_product_attention(*qkv, **options)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    cotangent = torch.randn(
        want.shape, dtype=want.dtype, generator=torch.Generator().manual_seed(1)
    )
    got_grads = torch.autograd.grad(got, leaves, cotangent)
    reference = [x.clone().requires_grad_(True) for x in qkv]
    out = F.scaled_dot_product_attention(*reference, **options)
    for a, b in zip(got_grads, torch.autograd.grad(out, reference, cotangent), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("recompute", [False, True], ids=["cpu-kernels", "recompute"])
@pytest.mark.parametrize("name", list(CASES))
def test_vmapped_pullback_equals_a_loop_in_one_backward(name, recompute, no_fallback):
    qkv, options = _case(name)
    out, pullback = vjp(lambda *x: attention(*x, **options, recompute=recompute), *qkv)
    g = torch.Generator().manual_seed(2)
    cotangents = torch.randn(COTANGENTS, *out.shape, generator=g, dtype=out.dtype)
    with KernelCalls() as kernels:
        got = torch.vmap(pullback)(cotangents)
    # the reference: torch's own SDPA, one plain autograd backward per cotangent
    for t, cotangent in enumerate(cotangents):
        leaves = [x.clone().requires_grad_(True) for x in qkv]
        ref = F.scaled_dot_product_attention(*leaves, **options)
        for a, b in zip(got, torch.autograd.grad(ref, leaves, cotangent), strict=True):
            torch.testing.assert_close(a[t], b, rtol=1e-10, atol=1e-12)
    # one fused backward for every cotangent (the recomputing path's backward is forward + backward)
    assert kernels.calls[BACKWARD] == 1
    assert kernels.calls[FORWARD] == (1 if recompute else 0)


@pytest.mark.parametrize("recompute", [False, True], ids=["cpu-kernels", "recompute"])
def test_vmapped_forward_folds_too(recompute, no_fallback):
    # a vmapped forward (stacked weights, say): one fused call for every slice, and its gradients
    qkv, options = _case("bool mask per example")
    stacked = [torch.stack([x, 2 * x]) for x in qkv]
    leaves = [x.clone().requires_grad_(True) for x in stacked]

    def one(q, k, v):
        return attention(q, k, v, **options, recompute=recompute)

    with KernelCalls() as kernels:
        got = torch.vmap(one)(*leaves)
    assert kernels.calls[FORWARD] == 1
    grads = torch.autograd.grad(got.square().sum(), leaves)
    for i in range(2):
        ref_leaves = [x[i].clone().requires_grad_(True) for x in stacked]
        ref = F.scaled_dot_product_attention(*ref_leaves, **options)
        torch.testing.assert_close(got[i], ref, rtol=1e-12, atol=1e-12)
        ref_grads = torch.autograd.grad(ref.square().sum(), ref_leaves)
        for a, b in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(a[i], b, rtol=1e-10, atol=1e-12)


def _softmax_attention_float64(q, k, v, causal: bool):
    """Attention written out in float64, grouped key/value heads repeated."""
    q, k, v = (x.double() for x in (q, k, v))
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        future = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(-1) @ v


# a unit roundoff of each dtype's mantissa, times 1.5: the inputs are exact in both, so what is left
# is the rounding of the results (the fused kernels' own half-precision backward: 2e-2 and 3e-3)
HALF_BOUND = {torch.bfloat16: 1.5 * 2.0**-8, torch.float16: 1.5 * 2.0**-11}


@pytest.mark.parametrize("dtype", list(HALF_BOUND), ids=str)
def test_half_precision_runs_a_float32_core(dtype, no_fallback):
    # values and output gradients that share an offset, as a model's do: the softmax gradient's row
    # sums then cancel, and a backward that takes them from the rounded output is off by that much
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 64, 16, generator=g).to(dtype)
    k = torch.randn(2, 2, 64, 16, generator=g).to(dtype)
    v = (torch.randn(2, 2, 64, 16, generator=g) + 5).to(dtype)
    cotangents = (torch.randn(3, 2, 4, 64, 16, generator=g) + 1).to(dtype)
    out, pullback = vjp(lambda *x: attention(*x, is_causal=True, enable_gqa=True), q, k, v)
    got = torch.vmap(pullback)(cotangents)
    assert out.dtype == dtype and all(x.dtype == dtype for x in got)
    leaves = [x.double().requires_grad_(True) for x in (q, k, v)]
    want = _softmax_attention_float64(*leaves, causal=True)
    bound = HALF_BOUND[dtype]
    assert (out.double() - want).abs().max() <= bound * want.abs().max()
    for t, cotangent in enumerate(cotangents):
        ref = torch.autograd.grad(want, leaves, cotangent.double(), retain_graph=True)
        for name, a, b in zip("qkv", got, ref, strict=True):
            err = ((a[t].double() - b).abs().max() / b.abs().max()).item()
            assert err <= bound, f"d{name}, cotangent {t}: {err:.2e} > {bound:.2e}"


def test_calls_it_does_not_serve_run_torch_sdpa():
    (q, k, v), _ = _case("causal")
    q = q.requires_grad_(True)
    torch.manual_seed(0)
    dropped = attention(q, k, v, dropout_p=0.5)
    assert dropped.grad_fn.name() != "_AttentionBackward"
    mask = torch.zeros(12, 12, dtype=torch.float64, requires_grad=True)
    assert attention(q, k, v, attn_mask=mask).grad_fn.name() != "_AttentionBackward"
    with pytest.raises(RuntimeError):  # torch's own error: grouped heads without enable_gqa
        attention(q, k[:, :2], v[:, :2])


# gradient methods through SDPA: the same attributions as eager attention, one backward per call
GRADIENT_METHODS = {
    "saliency": lambda m, s, t, **kw: ax.saliency(m, s, t, **kw),
    "input_x_gradient": lambda m, s, t, **kw: ax.input_x_gradient(m, s, t, **kw),
    "integrated_gradients": lambda m, s, t, **kw: ax.integrated_gradients(
        m, s, t, steps=4, batch_size=2, **kw
    ),
}


def _through_sdpa(hf, tok, call) -> tuple[np.ndarray, collections.Counter[str]]:
    """``call(model)`` with ``attn_implementation="sdpa"``: its values, and the kernels it ran."""
    model = ax.load_model(hf, tokenizer=tok, attn_implementation="sdpa")
    with KernelCalls() as kernels:
        got = call(model)
    return got.values, kernels.calls


@pytest.mark.parametrize("method", list(GRADIENT_METHODS))
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bart", "t5", "marian"])
def test_gradient_methods_through_sdpa_equal_eager(arch, method, no_fallback):
    hf, tok = tiny_model(arch)
    sources, targets = [p[0] for p in PAIRS[:2]], [p[1] for p in PAIRS[:2]]  # padded: a mask

    def call(model):
        return GRADIENT_METHODS[method](model, sources, targets)

    want = call(ax.load_model(hf, tokenizer=tok, attn_implementation="eager")).values
    got, kernels = _through_sdpa(hf, tok, call)
    assert_close(got, want, rtol=0, atol=1e-5)
    # at most one backward per attention call, for all targets (the fallback: one per target;
    # forwards without gradients, and attention no attributed input reaches, have none)
    assert 0 < kernels[BACKWARD] <= kernels[FORWARD]


@pytest.mark.parametrize(
    "arch, task", [("bert", "sequence"), ("llama", "sequence"), ("bert", "token")]
)
def test_classifiers_through_sdpa_equal_eager(arch, task, no_fallback):
    hf, tok = tiny_classifier(arch, task)

    def call(model):
        # every class of the sequence, or each token's predicted class: several targets
        targets = "all" if task == "sequence" else None
        return ax.saliency(model, "the capital of france is paris", targets=targets)

    want = call(ax.load_model(hf, tokenizer=tok, attn_implementation="eager")).values
    got, kernels = _through_sdpa(hf, tok, call)
    assert_close(got, want, rtol=0, atol=1e-5)
    assert 0 < kernels[BACKWARD] <= kernels[FORWARD]


@pytest.mark.parametrize("arch", ["llama", "bart"])
def test_the_recomputing_path_through_a_model(arch, monkeypatch, no_fallback):
    # what a GPU runs, forced on the CPU: the backward recomputes SDPA under autograd
    monkeypatch.setitem(attention.__kwdefaults__, "recompute", True)
    hf, tok = tiny_model(arch)
    sources, targets = [p[0] for p in PAIRS[:2]], [p[1] for p in PAIRS[:2]]

    def call(model):
        return ax.saliency(model, sources, targets)

    want = call(ax.load_model(hf, tokenizer=tok, attn_implementation="eager")).values
    got, kernels = _through_sdpa(hf, tok, call)
    assert_close(got, want, rtol=0, atol=1e-5)
    # each backward recomputes its forward: forwards = the passes' own + the backwards'
    assert 0 < kernels[BACKWARD] <= kernels[FORWARD] // 2


def test_layers_through_sdpa_equal_eager(no_fallback):
    hf, tok = tiny_model("gpt2")

    def call(model):
        return ax.saliency(model, *PAIRS[1], layers="all")

    want = call(ax.load_model(hf, tokenizer=tok, attn_implementation="eager")).values
    got, kernels = _through_sdpa(hf, tok, call)
    assert_close(got, want, rtol=0, atol=1e-5)
    assert 0 < kernels[BACKWARD] <= kernels[FORWARD]


def test_routing_is_scoped_to_attrax_forwards():
    hf, tok = tiny_model("gpt2")
    model = ax.load_model(hf, tokenizer=tok, attn_implementation="sdpa")
    ax.saliency(model, *PAIRS[0])
    assert torch._C._len_torch_function_stack() == 0  # no mode left behind
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    plain = F.scaled_dot_product_attention(q, q, q)
    assert plain.grad_fn.name() != "_AttentionBackward"
    with folded_sdpa():
        assert F.scaled_dot_product_attention(q, q, q).grad_fn.name() == "_AttentionBackward"
        assert torch.add(q, 1).grad_fn.name() == "AddBackward0"  # other functions untouched
    assert F.scaled_dot_product_attention(q, q, q).grad_fn.name() != "_AttentionBackward"
    # the user's own forward of the model runs torch's SDPA
    ids = tok("hello world", return_tensors="pt").input_ids
    embeds = hf.get_input_embeddings()(ids).detach().requires_grad_(True)
    with KernelCalls() as kernels:
        hf(inputs_embeds=embeds).logits[0, -1].softmax(-1)[0].backward()
    assert kernels.calls[FORWARD] == kernels.calls[BACKWARD] > 0
