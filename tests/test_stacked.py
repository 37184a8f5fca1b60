"""ax.stack_models: checkpoints of one architecture in one vmapped call, equal to each alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr

import attrax as ax
from attrax.testing import tiny_model
from tests.conftest import assert_close

X = ["hello world", "the cat sat on"]
Y = [" again", " the mat"]


def _checkpoints(arch: str, count: int = 3) -> list[ax.Model]:
    """``count`` float64 models of one architecture whose weights differ (seeded noise)."""
    models = []
    for seed in range(count):
        hf, tok = tiny_model(arch)
        hf.double()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        model = ax.load_model(hf, tokenizer=tok)
        model.name = f"{arch}-seed{seed}"
        models.append(model)
    return models


# Gemma 3's embedding module scales its rows by sqrt(hidden): a stack read the raw tables, 1.26
# of the largest saliency off, until 2026-12-05
@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma3"])
def checkpoints(request) -> list[ax.Model]:
    return _checkpoints(request.param)


@pytest.mark.parametrize(
    "method",
    [
        ax.saliency,
        ax.input_x_gradient,
        lambda m, x, y: ax.integrated_gradients(m, x, y, steps=8),
        lambda m, x, y: ax.pipe(ax.saliency, ax.l2_norm)(m, x, y),
    ],
    ids=["saliency", "input_x_gradient", "integrated_gradients", "pipe"],
)
def test_a_stack_equals_each_model_alone(checkpoints, method):
    stack = ax.stack_models(checkpoints)
    names = [m.name for m in checkpoints]
    together = method(stack, X, Y)
    assert together.dims[0] == "model" and together["model"].values.tolist() == names
    alone = [method(m, X, Y) for m in checkpoints]
    assert not np.allclose(alone[0].values, alone[1].values, equal_nan=True)  # they differ
    for name, reference in zip(names, alone, strict=True):
        got = together.sel(model=name, drop=True)
        # values and every coordinate (tokens, IG's completeness_gap...) as the model alone gives
        xr.testing.assert_allclose(got, reference, rtol=1e-9, atol=1e-12)


def test_one_input_and_names(checkpoints, tmp_path):
    stack = ax.stack_models(checkpoints[:2], names=["early", "late"])
    da = ax.saliency(stack, X[0], Y[0])
    xr.testing.assert_identical(ax.load(ax.save(da, tmp_path / "stack.nc")), da)
    assert da.dims == ("model", "target", "source", "hidden")
    assert da["model"].values.tolist() == ["early", "late"]
    np.testing.assert_allclose(
        da.sel(model="late").values, ax.saliency(checkpoints[1], X[0], Y[0]).values, rtol=1e-9
    )


def test_what_a_stack_refuses(checkpoints):
    other = _checkpoints("llama" if checkpoints[0].name.startswith("gpt2") else "gpt2", 1)[0]
    with pytest.raises(ax.ModelError, match="architecture"):
        ax.stack_models([checkpoints[0], other])
    with pytest.raises(ax.OptionError, match="two or more"):
        ax.stack_models(checkpoints[:1])
    with pytest.raises(ax.OptionError, match="distinct names"):
        ax.stack_models(checkpoints[:2], names=["a", "a"])
    with pytest.raises(ax.OptionError, match="a list of 2 names, got the string 'ab'"):
        ax.stack_models(checkpoints[:2], names="ab")  # its letters, until 2026-12-06
    stack = ax.stack_models(checkpoints[:2])
    with pytest.raises(ax.OptionError, match="occlusion does not run on stacked models"):
        ax.occlusion(stack, X, Y)
    with pytest.raises(ax.OptionError, match="`targets` is required"):
        ax.saliency(stack, X)
    with pytest.raises(ax.OptionError, match="baseline='pad'"):
        ax.integrated_gradients(stack, X, Y, baseline="pad")
    # ids were "a token baseline is not supported", or a shape of models x batch rows
    with pytest.raises(ax.OptionError, match="`baseline` as token ids is not supported on stacked"):
        ax.integrated_gradients(stack, X[0], Y[0], baseline=torch.zeros(7, dtype=torch.long))
    with pytest.raises(ax.OptionError, match="`mode='forward'` is not supported on stacked"):
        ax.input_x_gradient(stack, X, Y, mode="forward", reduce_hidden="sum")
    # its hooks read the rows the vmapped forward splits: another model's values, or zeros
    with pytest.raises(ax.OptionError, match="`layers` is not supported on stacked models"):
        ax.saliency(stack, X, Y, layers=1)


def test_a_stack_names_the_config_keys_that_differ():
    models = []
    for epsilon in (1e-5, 1e-3):
        hf, tok = tiny_model("gpt2", layer_norm_epsilon=epsilon)
        models.append(ax.load_model(hf, tokenizer=tok))
    with pytest.raises(ax.ModelError, match=r"layer_norm_epsilon=0\.001 \(models\[0\]: 1e-05\)"):
        ax.stack_models(models)


def test_a_stack_refuses_another_tokenizer():
    a = _checkpoints("gpt2", 1)[0]
    hf, tok = tiny_model("gpt2")
    tok.add_tokens(["zzzz"])
    b = ax.load_model(hf, tokenizer=tok)
    with pytest.raises(ax.ModelError, match="tokenizer"):
        ax.stack_models([a, b])


def test_a_stack_refuses_an_encoder_decoder():
    hf, tok = tiny_model("marian")
    m = ax.load_model(hf, tokenizer=tok)
    with pytest.raises(ax.ModelError, match="decoder-only"):
        ax.stack_models([m, m])


def test_a_contrast_is_each_models_own(checkpoints):
    """A contrast (one text, or one per input) applies to every model: each slice equals that
    model alone, and the options record it as given."""
    tokenize = checkpoints[0].tokenizer.tokenize
    contrast = " the" * len(tokenize(Y[0]))  # aligned with the target token by token
    assert len(tokenize(contrast)) == len(tokenize(Y[0]))
    stack = ax.stack_models(checkpoints)
    for given in (contrast, [contrast]):
        inputs, targets = (X[0], Y[0]) if isinstance(given, str) else (X[:1], Y[:1])
        got = ax.saliency(stack, inputs, targets, contrast=given)
        for i, model in enumerate(checkpoints):
            alone = ax.saliency(model, inputs, targets, contrast=given)
            assert_close(got.isel(model=i).values, alone.values, rtol=1e-9)
        assert json.loads(got.attrs["options"])["contrast"] == given


def test_a_stack_used_from_threads_gives_each_calls_own_rows():
    """A stack set the examples per model of a call before it took the lock: threads' calls of
    1 and 3 examples read each other's count (wrong values or torch's unflatten error) until
    2026-12-06."""
    from concurrent.futures import ThreadPoolExecutor

    stack = ax.stack_models(_checkpoints("gpt2", 2))
    jobs = [(X[:1], Y[:1]), (X + X[:1], Y + Y[:1])] * 4
    alone = [ax.saliency(stack, x, y) for x, y in jobs[:2]]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda job: ax.saliency(stack, *job), jobs))
    for i, da in enumerate(got):
        xr.testing.assert_allclose(da, alone[i % 2])
