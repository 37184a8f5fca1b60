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
    the largest entry); summed in bfloat16 the results were 1.6e-2 away.
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
    for k, total in enumerate(totals):
        ref = (total * x[0].double()).numpy()
        row = got.isel(target=k).values
        visible = n + k  # positions the k-th target can see
        assert _rel(row[:visible], ref[:visible]) < 8e-3, k


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

    def scale(_module, _args, output):
        output.logits = output.logits * 1.05
        return output

    hf.register_forward_hook(scale)
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
