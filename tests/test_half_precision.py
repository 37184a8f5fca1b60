"""Half-precision models (bfloat16, float16): every method runs, returns float32, and sums in float32.

The references are fp32 runs of the same weights and a plain autograd loop on the half-precision
model whose sums are taken in float64.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import attrax as ax
from attrax.testing import tiny_model
from tests import _naive
from tests.conftest import PAIRS

HALF = [torch.bfloat16, torch.float16]


def _pair(model) -> tuple[str, str]:
    return PAIRS[1] if model.is_encoder_decoder else PAIRS[0]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.nan_to_num(np.asarray(a, np.float64)), np.nan_to_num(np.asarray(b, np.float64))
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def pairs():
    """arch -> (fp32 model, {dtype: half model}) sharing one set of weights."""
    out = {}
    for arch in ("gpt2", "llama", "marian"):
        hf, tok = tiny_model(arch)
        half = {d: ax.load_model(copy.deepcopy(hf).to(d), tokenizer=tok) for d in HALF}
        out[arch] = (ax.load_model(hf, tokenizer=tok), half)
    return out


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("arch", ["gpt2", "llama", "marian"])
def test_half_precision_agrees_with_float32(pairs, arch, dtype, tmp_path):
    full, half = pairs[arch][0], pairs[arch][1][dtype]
    source, target = _pair(full)
    calls = {  # method, then what is compared
        "saliency": (ax.saliency, ax.pipe(ax.l2_norm, ax.normalize)),
        "smoothgrad": (ax.smoothgrad, ax.pipe(ax.l2_norm, ax.normalize)),
        "attention": (ax.attention, ax.mean("head")),
        "occlusion": (ax.occlusion, ax.normalize),
        "step_scores": (ax.step_scores, lambda da: da),
    }
    for name, (method, compared) in calls.items():
        got, ref = method(half, source, target), method(full, source, target)
        assert got.dtype == np.float32, name  # numpy has no bfloat16, netCDF no float16
        assert np.array_equal(np.isnan(got.values), np.isnan(ref.values)), name
        # a few roundings of an 8-bit (bfloat16) or 11-bit (float16) mantissa per layer
        assert _rel(compared(got).values, compared(ref).values) < 0.1, name
    ax.save(got, tmp_path / "half.nc")
    assert ax.load(tmp_path / "half.nc").equals(got)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_integrated_gradients_sums_in_float32(pairs, dtype):
    """50 quadrature points, one per forward, summed in float32 and not in the model's dtype.

    The per-point gradients of a half-precision model differ from the loop's by ~4e-3 (relative to
    the largest entry, float16) to ~1e-2 (bfloat16); summed in bfloat16 the results were 2.3e-2
    away.
    """
    model = pairs["gpt2"][1][dtype]
    source, target = PAIRS[0]
    steps = 50
    got = ax.integrated_gradients(model, source, target, steps=steps, batch_size=1)
    assert got.dtype == np.float32

    source_ids, target_ids = _naive.token_ids(model, source, target)
    run = _naive.Runner(model, source_ids, target_ids)
    x = run.embeddings()[0]
    alphas, weights = _naive.quadrature_nodes("gausslegendre", steps)
    totals = [torch.zeros(x.shape[1:], dtype=torch.float64) for _ in run.targets()]
    for alpha, weight in zip(alphas, weights, strict=True):
        point = (torch.tensor(alpha, dtype=torch.float32) * x.float()).to(dtype)
        for k, (grad,) in enumerate(run.gradients([point], _naive.probability, None)):
            totals[k] += weight * grad.double()
    n = len(source_ids)
    errors = []
    for k, total in enumerate(totals):
        ref = (total * x[0].double()).numpy()
        visible = n + k  # positions the k-th target can see
        errors.append(_rel(got.isel(target=k).values[:visible], ref[:visible]))
    # bfloat16: 1.1e-2 measured against 2.3e-2 with the sums in bfloat16 (the loop's own
    # per-point rounding, its softmax in float32 as attrax's, is most of the 1.1e-2)
    assert max(errors) < (1.6e-2 if dtype == torch.bfloat16 else 8e-3), errors


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_sums_over_points_run_in_float32(pairs, dtype):
    """Noise-free SmoothGrad, one point per forward: every point is the input, so the mean of
    the points' gradients is saliency's gradient up to float32 rounding of the sum (~1e-7).

    The IG test above cannot tell a half-precision sum from a float32 one in float16 (both
    ~3e-3 from the loop, whose own per-point gradients differ); here a bfloat16 sum is 3e-2
    away, a float16 one 5e-3.
    """
    model = pairs["gpt2"][1][dtype]
    source, target = PAIRS[0]
    got = ax.smoothgrad(model, source, target, samples=30, noise=0.0, batch_size=1)
    assert got.dtype == np.float32
    want = ax.saliency(model, source, target)
    assert np.array_equal(np.isnan(got.values), np.isnan(want.values))
    assert _rel(got.values, want.values) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_check_rejects_changed_logits(dtype):
    """A model whose logits are not its head applied to its last hidden states is refused."""
    hf, tok = tiny_model("gpt2")
    hf = hf.to(dtype)

    forward = hf.forward

    def scaled(*args, **kwargs):  # logits the head alone does not give (a hook is refused)
        output = forward(*args, **kwargs)
        output.logits = output.logits * 1.05
        return output

    hf.forward = scaled
    with pytest.raises(ax.ModelError, match="not the output projection"):
        ax.load_model(hf, tokenizer=tok)


def test_a_checkpoint_saved_in_bfloat16_loads_in_it(tmp_path):
    """transformers 5 loads a checkpoint in the dtype it was saved in (most hub LLMs: bfloat16)."""
    hf, tok = tiny_model("llama")
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = ax.load_model(tmp_path)
    assert model.dtype == torch.bfloat16
    da = ax.saliency(model, *PAIRS[0])
    assert da.dtype == np.float32 and np.isfinite(da.values[~np.isnan(da.values)]).all()


def test_dtype_is_a_floating_point_dtype_or_its_name():
    """A dtype by name works for a model instance too (it was read as a device); an integer
    dtype is an OptionError naming `dtype`, not a loading failure blamed on the model."""
    model = ax.load_model()
    again = ax.load_model(model.hf, tokenizer=model.tokenizer, dtype="bfloat16")
    assert again.dtype == torch.bfloat16
    for bad in (torch.int32, "int8", 3):
        with pytest.raises(ax.OptionError, match="`dtype` must be a floating-point torch dtype"):
            ax.load_model(dtype=bad)


@pytest.mark.parametrize("dtype", HALF)
def test_the_probability_objective_rounds_only_the_probability(dtype):
    """Over a 50k vocabulary log-probabilities sit near -11, where bfloat16 keeps 1/16: their
    ``exp`` would be off by up to 3% (float16, over 1k so that the probabilities stay normal:
    1/256 near -7, 0.2%). The objectives work in float32, so the probability and its gradient
    are off by one rounding of the half-precision result at most (as a loop's ``softmax`` is),
    against float64's."""
    from attrax._objectives import logprob, probability

    vocabulary = 50_000 if dtype == torch.bfloat16 else 1_000
    gen = torch.Generator().manual_seed(0)
    exact = torch.randn(64, vocabulary, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, vocabulary, (64,), generator=gen)
    half = exact.to(dtype)
    reference = torch.softmax(half.double(), -1).gather(-1, ids[:, None])[:, 0]
    eps = torch.finfo(dtype).eps  # the spacing at 1: twice the largest relative rounding
    got = probability(half, ids)
    assert got.dtype == dtype
    assert ((got.double() - reference).abs() / reference).max() <= eps
    log_reference = torch.log_softmax(half.double(), -1).gather(-1, ids[:, None])[:, 0]
    assert ((logprob(half, ids).double() - log_reference).abs() / log_reference.abs()).max() <= eps
    # d p_t / d logits = p_t (onehot - p), from the float32 probabilities
    grad = torch.func.grad(lambda x: probability(x, ids).float().sum())(half)
    p = torch.softmax(half.double(), -1)
    expected = p.gather(-1, ids[:, None]) * (torch.nn.functional.one_hot(ids, vocabulary) - p)
    scale = expected.abs().amax(-1, keepdim=True)
    assert ((grad.double() - expected).abs() / scale).max() <= 2 * eps


@pytest.mark.parametrize("dtype", HALF)
def test_step_scores_of_a_half_precision_model_are_its_logits_in_float64(pairs, dtype):
    """``probability`` and ``logprob`` step scores of a half-precision model against the test's
    own float64 softmax of the same model's logits: within one rounding of the result (a
    half-precision log-softmax would be off by 1-3% here, the log-probabilities are -5 to -10)."""
    _, half = pairs["llama"]
    model = half[dtype]
    prompt, target = _pair(model)
    scores = ax.step_scores(model, prompt, target, scores=["probability", "logprob"])
    ids, positions = scores.target_id.values, scores.target.values
    prompt_ids = model.tokenizer(prompt)["input_ids"]
    assert positions[0] == len(prompt_ids)
    with torch.no_grad():
        logits = model.hf(input_ids=torch.tensor([prompt_ids + list(ids)])).logits[0].double()
    logp = torch.log_softmax(logits[positions - 1], -1)
    logp = logp.gather(-1, torch.tensor(ids)[:, None])[:, 0].numpy()
    eps = torch.finfo(dtype).eps
    got = scores.sel(score="probability").values
    assert np.abs(got / np.exp(logp) - 1).max() <= eps
    assert np.abs(scores.sel(score="logprob").values / logp - 1).max() <= eps


@pytest.mark.parametrize("dtype", HALF)
def test_the_head_projects_gathered_rows_without_copying_the_projection(pairs, dtype):
    """Gathered head inputs ``[rows, 1, H]`` (a row's stride the whole sequence: guided IG's,
    PGD's copies) once made ``matmul`` expand the ``[V, H]`` projection per row into a ``bmm``,
    which half precision copies: 823 MiB for 32 rows of GPT-2's vocabulary, and 6x the time."""
    from torch.profiler import profile

    model = pairs["gpt2"][1][dtype]
    sequence = torch.randn(6, 5, model.hf.config.n_embd, dtype=dtype)
    rows = sequence[:, 2:3]  # strided, as a gather of one position per copy leaves them
    assert not rows.is_contiguous()
    with profile(record_shapes=True) as run:
        logits = model.head(rows)
    ops = {event.key for event in run.key_averages()}
    assert "aten::bmm" not in ops, ops
    want = rows[:, 0].float() @ model.hf.lm_head.weight.float().T
    assert logits.shape == (6, 1, want.shape[-1])
    np.testing.assert_allclose(logits[:, 0].float(), want, rtol=2e-2, atol=2e-2 * want.abs().max())
