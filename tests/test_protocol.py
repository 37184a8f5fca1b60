"""The method protocol: common parameters declared once, checked before the model runs,
refused with a reason where they do not apply, and recorded in attrs."""

from __future__ import annotations

import inspect
import json
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr

import attrax as ax
from attrax._gradients import GRADIENT, Rule
from attrax._names import METHODS
from attrax._protocol import COMMON

from .conftest import PAIRS, QUICK, assert_close

EVERY = (*METHODS, "step_scores", "deletion", "insertion", "comprehensiveness", "sufficiency",
         "circuit_faithfulness")  # fmt: skip
# methods that explain only classifiers (DecompX: the post-norm encoders' sequence classifiers)
_CLASSIFIER_ONLY = {"decompx"}
SMALL = {
    **QUICK,
    "attribution_patching": {"corrupted": "The capital of Spain is"},
    "activation_patching": {"corrupted": "The capital of Spain is", "layers": 0},
    "edge_attribution_patching": {"corrupted": "The capital of Spain is"},
    "edge_patching": {"corrupted": "The capital of Spain is", "patch": [["input", "logits"]]},
    "circuit_faithfulness": {"corrupted": "The capital of Spain is"},
}


def _options(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]


@pytest.mark.parametrize("name", EVERY)
def test_each_common_option_is_taken_or_refused_with_a_reason(models, name):
    fn = getattr(ax, name)
    taken = _options(fn)
    leading = [p for p in inspect.signature(fn).parameters if p not in taken]
    args = [models["gpt2"], *PAIRS[0]]
    if "attribution" in leading:
        args.insert(1, ax.pipe(ax.saliency, ax.l2_norm)(models["gpt2"], *PAIRS[0]))
    if "scores" in leading:
        args.insert(1, ax.edge_attribution_patching(models["gpt2"], *PAIRS[0], **SMALL[name]))
    for option in COMMON:
        if option in taken:
            continue
        with pytest.raises(ax.OptionError, match=rf"{name} does not take `{option}`: \w+"):
            fn(*args, **{option: COMMON[option].default})


@pytest.mark.parametrize("name", EVERY)
def test_unknown_options_are_named(models, name):
    fn = getattr(ax, name)
    with pytest.raises(ax.OptionError, match=rf"{name} has no option 'stepz'; its options are: "):
        fn(models["gpt2"], *PAIRS[0], stepz=3)


def test_batch_size_is_one_meaning_for_every_gradient_method(models):
    """``batch_size`` bounds points per forward; saliency has one point, so any bound holds."""
    model = models["gpt2"]
    for name in ("saliency", "input_x_gradient", "integrated_gradients", "smoothgrad"):
        fn = getattr(ax, name)
        whole = fn(model, *PAIRS[0], **SMALL.get(name, {}))
        bounded = fn(model, *PAIRS[0], batch_size=1, **SMALL.get(name, {}))
        assert_close(bounded.values, whole.values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_every_option_is_recorded_with_its_default(models, classifier, name):
    fn = getattr(ax, name)
    model, given = (
        (classifier, PAIRS[0][:1]) if name in _CLASSIFIER_ONLY else (models["gpt2"], PAIRS[0])
    )
    da = fn(model, *given, **SMALL.get(name, {}))
    recorded = json.loads(da.attrs["options"])
    assert sorted(recorded) == sorted(_options(fn))
    for option, value in SMALL.get(name, {}).items():
        assert recorded[option] == value
    defaults = {
        p.name: p.default for p in inspect.signature(fn).parameters.values() if p.name in recorded
    }
    for option, default in defaults.items():
        if option not in SMALL.get(name, {}) and isinstance(default, (str, int, bool, type(None))):
            assert recorded[option] == default, option


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("saliency", {"abs": "yes"}),
        ("saliency", {"chunk_size": 0}),
        ("saliency", {"reduce_hidden": "mean"}),
        ("saliency", {"mode": "sideways"}),
        ("integrated_gradients", {"quadrature": "simpson"}),
        ("integrated_gradients", {"quadrature": "riemann_trapezoid", "steps": 1}),
        ("integrated_gradients", {"steps": 1001}),  # gausslegendre: O(steps³) nodes
        ("greedy_pig", {"steps": 10**8}),  # a raw 71 PiB MemoryError from numpy before
        ("smoothgrad", {"noise": float("inf")}),
        ("occlusion", {"baseline": "mean"}),
        ("lime", {"kernel_width": 0}),
        ("kernel_shap", {"seed": 1.5}),
        ("attention", {"maps": "decoder"}),
        ("attention", {"layers": "first"}),
        ("rollout", {"attribute_target": 1}),
        ("step_scores", {"scores": ["entropy", "nope"]}),
    ],
)
def test_bad_options_are_refused_before_the_model_runs(models, monkeypatch, name, options):
    model = models["gpt2"]

    def boom(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(model.hf, "forward", boom)
    with pytest.raises(ax.OptionError, match=f"`{next(iter(options))}`|steps"):
        getattr(ax, name)(model, PAIRS[0][0], **options)  # no target: nothing generated either


@pytest.mark.parametrize("value", [2**70, -(2**63) - 1, 1.5, "x", None])
def test_every_seed_is_one_torch_can_take(models, monkeypatch, value):
    """Every method with a `seed` refuses one torch's generators cannot take (2**70 was a raw
    "Overflow when unpacking long long"), before the model runs. PGD's None is its own default."""
    model = models["gpt2"]

    def boom(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(model.hf, "forward", boom)
    seeded = [n for n in METHODS if "seed" in inspect.signature(getattr(ax, n)).parameters]
    assert len(seeded) >= 9, seeded
    for name in seeded:
        if value is None and name == "pgd":
            continue
        with pytest.raises(ax.OptionError, match="`seed` must be an integer"):
            getattr(ax, name)(model, PAIRS[0][0], seed=value)


def test_a_new_gradient_method_is_one_short_function(models):
    """A rule: the gradient at the midpoint between zero and the embeddings, times them; it
    must equal integrated gradients with one middle Riemann point, computed by another path."""

    @GRADIENT.method()
    def midpoint(problem) -> Rule:
        return Rule(
            points=lambda chunk: tuple(0.5 * x[None] for x in problem.inputs),
            multiplier=problem.inputs,
        )

    model = models["llama"]
    got = midpoint(model, *PAIRS[0])
    ig = ax.integrated_gradients(model, *PAIRS[0], steps=1, quadrature="riemann_middle")
    np.testing.assert_allclose(got.values, ig.values, rtol=1e-5, atol=1e-9)
    assert got.attrs["method"] == "midpoint"
    assert "chunk_size" in json.loads(got.attrs["options"])
    summed = ax.pipe(midpoint, ax.sum)(model, *PAIRS[0])
    assert summed.dims == ("target", "source")


def test_pipe_refuses_a_reduce_hidden_that_contradicts_the_chain(models):
    model = models["gpt2"]
    fused = ax.pipe(ax.saliency, ax.l2_norm)
    assert fused(model, *PAIRS[0], reduce_hidden="l2_norm").dims == ("target", "source")
    for given in ("sum", None):
        with pytest.raises(ax.OptionError, match="contradicts the chain"):
            fused(model, *PAIRS[0], reduce_hidden=given)


def test_forward_mode_needs_a_multiplier(models):
    with pytest.raises(ax.OptionError, match="saliency has none"):
        ax.saliency(models["gpt2"], *PAIRS[0], mode="forward", reduce_hidden="sum")


def test_positional_and_keyword_calls_agree(models):
    model = models["gpt2"]
    a = ax.saliency(model, *PAIRS[0])
    b = ax.saliency(model=model, inputs=PAIRS[0][0], targets=PAIRS[0][1])
    np.testing.assert_array_equal(a.values, b.values)
    with pytest.raises(ax.OptionError, match="saliency: "):
        ax.saliency(model, *PAIRS[0], torch.zeros(1))


def test_two_threads_calls_on_one_model_take_turns(models):
    """attrax patches a model's modules for the length of a call: a second thread's call on the
    same model waits for the first to end, and both equal their serial results."""
    import threading

    from attrax._objectives import logprob

    model = models["gpt2"]
    inside, go = threading.Event(), threading.Event()

    def waiting(logits, ids):  # an objective that holds its call open until told to go
        inside.set()
        go.wait(10)
        return logprob(logits, ids)  # the built-in's arithmetic: the results compare exactly

    got: dict[str, Any] = {}
    first = threading.Thread(
        target=lambda: got.update(first=ax.saliency(model, *PAIRS[0], objective=waiting))
    )
    second = threading.Thread(target=lambda: got.update(second=ax.lrp(model, *PAIRS[1])))
    first.start()
    assert inside.wait(10)
    second.start()
    second.join(1.0)
    assert second.is_alive() and "second" not in got  # waiting for the first call to end
    go.set()
    first.join(30)
    second.join(30)
    xr.testing.assert_allclose(got["first"], ax.saliency(model, *PAIRS[0], objective="logprob"))
    xr.testing.assert_allclose(got["second"], ax.lrp(model, *PAIRS[1]))


def test_a_copied_model_has_a_lock_of_its_own(models):
    """A copy (deepcopy, or pickle where the model's hooks allow it) gets its own lock: a lock
    itself neither copies nor pickles."""
    import copy as copying

    model = models["gpt2"]
    copy = copying.deepcopy(model)
    assert copy.call_lock is not model.call_lock
    xr.testing.assert_allclose(ax.saliency(copy, *PAIRS[0]), ax.saliency(model, *PAIRS[0]))


@pytest.fixture(scope="module")
def nan_model() -> ax.Model:
    """A tiny GPT-2 with one NaN weight in its first attention, set after loading (loading
    refuses it: below): NaN reaches every output."""
    from attrax.testing import tiny_model

    hf, tok = tiny_model("gpt2")
    model = ax.load_model(hf, tokenizer=tok)
    with torch.no_grad():
        hf.transformer.h[0].attn.c_attn.weight[0, 0] = float("nan")
    return model


@pytest.fixture(scope="module")
def nan_classifier() -> ax.Model:
    """A tiny BERT classifier with one NaN weight in its first attention's queries."""
    from attrax.testing import tiny_classifier

    hf, tok = tiny_classifier("bert", "sequence")
    model = ax.load_model(hf, tokenizer=tok)
    with torch.no_grad():
        hf.bert.encoder.layer[0].attention.self.query.weight[0, 0] = float("nan")
    return model


def test_loading_a_model_that_outputs_nan_says_so(nan_model):
    # it said "a forward from `inputs_embeds` does not reproduce the forward from `input_ids`"
    with pytest.raises(ax.ModelError, match="outputs on a probe input are not finite"):
        ax.load_model(nan_model.hf, tokenizer=nan_model.tokenizer)


@pytest.mark.parametrize("name", (*METHODS, "step_scores"))
def test_a_model_that_outputs_nan_is_an_input_error_for_every_method(
    nan_model, nan_classifier, name
):
    """NaN marks the future and padding in results, so a NaN the model made must not pass as
    one: attention, mixing, component and head methods returned all-NaN arrays, guided IG's
    path never ended, and step scores were NaN."""
    model, given = (
        (nan_classifier, PAIRS[0][:1]) if name in _CLASSIFIER_ONLY else (nan_model, PAIRS[0])
    )
    with pytest.raises(ax.InputError, match="not finite"):
        getattr(ax, name)(model, *given, **SMALL.get(name, {}))


# the data model's dtypes (docs/data-model.md): a half-precision model's results come back float32
_RESULT_DTYPE = {"float32": np.float32, "float64": np.float64, "bfloat16": np.float32}


@pytest.fixture(scope="module")
def typed_models() -> dict[tuple[str, str], ax.Model]:
    """A decoder-only and an encoder-decoder tiny model in float64 and bfloat16, built once."""
    from attrax.testing import tiny_model

    built = {}
    for arch in ("gpt2", "t5"):
        for dtype in ("float64", "bfloat16"):
            hf, tok = tiny_model(arch)
            built[arch, dtype] = ax.load_model(hf.to(getattr(torch, dtype)), tokenizer=tok)
    return built


@pytest.mark.parametrize("dtype", list(_RESULT_DTYPE))
@pytest.mark.parametrize("arch", ["gpt2", "t5"])
@pytest.mark.parametrize("name", (*METHODS, "step_scores"))
def test_every_method_returns_the_data_models_dtype(models, typed_models, name, arch, dtype):
    """float32, float64 for a float64 model: value zeroing returned float64 for every model,
    step scores and rollout float32 for a float64 one (and T5's rollout raised)."""
    model = models[arch] if dtype == "float32" else typed_models[arch, dtype]
    try:
        got = getattr(ax, name)(model, *PAIRS[0], **SMALL.get(name, {}))
    except ax.ModelError:  # the method does not apply to the architecture (ALTI-Logit: T5)
        pytest.skip(f"{name} does not apply to {arch}")
    assert got.dtype == _RESULT_DTYPE[dtype]


@pytest.mark.parametrize(
    "name", [n for n in METHODS if "attribute_target" in _options(getattr(ax, n))]
)
def test_attribute_target_on_a_decoder_only_model_changes_nothing(models, name):
    """Its sources hold the target prefix already, for every method alike: value zeroing and
    ALTI refused the option there while the others took it."""
    model = models["gpt2"]
    plain = getattr(ax, name)(model, *PAIRS[0], **SMALL.get(name, {}))
    both = getattr(ax, name)(model, *PAIRS[0], attribute_target=True, **SMALL.get(name, {}))
    assert both.dims == plain.dims
    np.testing.assert_array_equal(both.values, plain.values)


# methods that only evaluate the objective: a score without a gradient is theirs to take
_EVALUATE_ONLY = {
    "activation_patching",
    "edge_patching",
    "occlusion",
    "feature_ablation",
    "lime",
    "kernel_shap",
    "shapley_sampling",
    "sobol",
}


# methods whose updates need the target's probability itself (ReAGent's drops, in [-1, 1])
_PROBABILITY_ONLY = {"reagent"}


def _detached(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.detach(), dim=-1).gather(-1, ids[..., None])[..., 0]


def _under_no_grad(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return logits.gather(-1, ids[..., None])[..., 0]


def _is_argmax(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == ids).to(logits.dtype)


@pytest.fixture(scope="module")
def classifier() -> ax.Model:
    from attrax.testing import tiny_classifier

    hf, tok = tiny_classifier("bert", "sequence")
    return ax.load_model(hf, tokenizer=tok)


@pytest.mark.parametrize(
    "name", [n for n in METHODS if "objective" in inspect.signature(getattr(ax, n)).parameters]
)
def test_an_objective_without_a_gradient_is_refused_where_it_is_differentiated(
    models, classifier, name
):
    """A callable objective that detaches the logits gave all-zero gradient attributions
    without a word; methods that only evaluate it still take it."""
    fn = getattr(ax, name)
    for model, pair in ((models["gpt2"], PAIRS[0]), (classifier, (PAIRS[0][0], None))):
        for objective in (_detached, _under_no_grad, _is_argmax):
            if name in _PROBABILITY_ONLY:
                with pytest.raises(ax.OptionError, match="`objective` must be 'probability'"):
                    fn(model, *pair, objective=objective, **SMALL.get(name, {}))
                continue
            if name in _EVALUATE_ONLY:
                da = fn(model, *pair, objective=objective, **SMALL.get(name, {}))
                assert bool(da.notnull().any())  # NaN only marks the future
                continue
            with pytest.raises(
                ax.OptionError, match=f"`objective` {objective.__name__} has a zero"
            ):
                fn(model, *pair, objective=objective, **SMALL.get(name, {}))


def test_numpy_scalars_are_options_as_python_ones(default_model):
    """np.arange's and np.argmax's scalars are ints and floats: the call equals the one with
    Python's, and its attrs record Python's (np.int64 steps were refused as no positive integer
    until 2026-12-05)."""
    given = {"steps": np.int64(4), "baseline": "pad", "chunk_size": np.int32(2)}
    got = ax.integrated_gradients(default_model, "1 2 3 =", " 3 2 1", **given)
    want = ax.integrated_gradients(
        default_model, "1 2 3 =", " 3 2 1", steps=4, baseline="pad", chunk_size=2
    )
    xr.testing.assert_identical(got, want)


def test_an_objective_that_fails_is_named_with_the_shapes_it_got(default_model):
    """A callable objective that raised reached the user as torch's own IndexError (until
    2026-12-06)."""
    with pytest.raises(ax.OptionError, match=r"`objective` <lambda> raised IndexError .* logits"):
        ax.saliency(
            default_model, "1 2 3 =", " 3 2 1", objective=lambda logits, ids: logits[..., 10**9]
        )


def test_a_method_called_from_inside_a_differentiating_method_is_refused(default_model):
    """An objective that calls attrax ran the inner call under the outer one's transforms and
    patched modules: torch's RuntimeError (LRP's AttributeError) until 2026-12-06."""

    def nested(logits, ids):
        ax.saliency(default_model, "1 2 =", " 2 1")
        return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)

    before = ax.saliency(default_model, "1 2 3 =", " 3 2 1")
    for method in (ax.saliency, ax.lrp):
        with pytest.raises(ax.OptionError, match=f"saliency was called while {method.__name__}"):
            method(default_model, "1 2 3 =", " 3 2 1", objective=nested)
    # the refusal is this call's: the model runs on afterwards, as before
    xr.testing.assert_identical(ax.saliency(default_model, "1 2 3 =", " 3 2 1"), before)


def test_every_public_function_documents_every_argument():
    """``help(ax.x)`` describes each argument: its own Arguments section, the protocol's shared
    section (written from COMMON's docs), or the function it names ("others as :func:`y`")."""
    import re

    from attrax._protocol import documented

    def told(fn: Any, depth: int = 0) -> set[str]:
        doc = fn.__doc__ or ""
        names = documented(doc)
        if depth < 3:
            for ref in re.findall(r"as :func:`(?:attrax\.)?(\w+)`", doc):
                names |= told(getattr(ax, ref), depth + 1)
        return names

    missing = {}
    for name in ax.__all__:
        fn = getattr(ax, name)
        if not callable(fn) or isinstance(fn, type):
            continue
        parameters = inspect.signature(fn).parameters.values()
        named = {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if named - told(fn):
            missing[name] = sorted(named - told(fn))
    assert not missing, missing
