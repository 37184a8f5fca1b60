"""Every gradient method against a plain per-target, per-point autograd loop, and its axioms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr

import attrax as ax
from attrax import _memory
from attrax._engine import Problem
from attrax._inputs import prepare
from attrax._objectives import resolve
from attrax.testing import tiny_model
from tests import _naive
from tests.conftest import PAIRS, assert_close, integrated_gradients

NAIVE_OBJECTIVES = {
    "probability": _naive.probability,
    "logprob": _naive.logprob,
    "logit": _naive.logit,
}


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def naive_attribution(
    model,
    source: str,
    target: str,
    method: str,
    *,
    objective: str = "probability",
    contrast: str | None = None,
    attribute_target: bool = False,
    steps: int = 8,
    quadrature: str = "gausslegendre",
    nodes: tuple[list[float], list[float]] | None = None,
    samples: int = 4,
    noise: float = 0.1,
    seed: int = 0,
    ids: tuple[list[int], list[int]] | None = None,
    baseline: list[torch.Tensor] | None = None,
) -> np.ndarray:
    """[target, source(+decoder), hidden] from a loop of single backwards; future stays NaN.

    IG integrates with ``nodes`` (points, weights) when given, else with the textbook rule
    ``quadrature`` built in ``_naive``, from ``baseline`` (per attributed side, broadcastable to
    ``[1, L, H]``; None: zeros)."""
    source_ids, target_ids = ids or _naive.token_ids(model, source, target)
    run = _naive.Runner(model, source_ids, target_ids)
    x = run.embeddings()
    base = [torch.zeros_like(xi) for xi in x]
    for side, b in enumerate(baseline or []):
        base[side] = b.expand_as(x[side])
    attributed = 2 if (model.is_encoder_decoder and attribute_target) else 1
    contrast_ids = None
    if contrast is not None:
        contrast_ids = _naive.token_ids(model, source, contrast)[1]
    obj = NAIVE_OBJECTIVES[objective]
    if method in ("saliency", "input_x_gradient"):
        alphas, weights = [None], [1.0]
    elif method == "integrated_gradients":
        alphas, weights = nodes or _naive.quadrature_nodes(quadrature, steps)
    else:
        alphas, weights = [None] * samples, [1.0 / samples] * samples
        draws = [
            torch.randn((samples, *xi.shape[1:]), generator=torch.Generator().manual_seed(seed))
            for xi in x[:attributed]
        ]
    targets = run.targets()
    totals = [[torch.zeros_like(xi[0]) for xi in x] for _ in targets]
    for i, (alpha, weight) in enumerate(zip(alphas, weights, strict=True)):
        points = list(x)
        for side in range(attributed):
            if method == "integrated_gradients":
                points[side] = base[side] + alpha * (x[side] - base[side])
            elif method == "smoothgrad":
                spread = x[side].max() - x[side].min()
                points[side] = x[side] + noise * spread * draws[side][i][None]
        for k, grads in enumerate(run.gradients(points, obj, contrast_ids)):
            totals[k] = [a + weight * g for a, g in zip(totals[k], grads, strict=True)]
    rows = []
    for t, total in zip(targets, totals, strict=True):
        if method == "input_x_gradient":
            total = [g * xi[0] for g, xi in zip(total, x, strict=True)]
        elif method == "integrated_gradients":
            total = [g * (xi - bi)[0] for g, xi, bi in zip(total, x, base, strict=True)]
        row = torch.cat(total[:attributed], dim=0).numpy().copy()
        _naive.future_to_nan(row, model, t, len(source_ids), attribute_target)
        rows.append(row)
    return np.stack(rows)


METHODS = {
    "saliency": lambda m, s, t, **kw: ax.saliency(m, s, t, **kw),
    "input_x_gradient": lambda m, s, t, **kw: ax.input_x_gradient(m, s, t, **kw),
    "integrated_gradients": lambda m, s, t, **kw: integrated_gradients(m, s, t, steps=8, **kw),
    "smoothgrad": lambda m, s, t, **kw: ax.smoothgrad(m, s, t, samples=4, noise=0.1, seed=0, **kw),
}


def assert_matches(got, want: np.ndarray) -> None:
    got = np.asarray(got)
    assert got.shape == want.shape
    assert np.array_equal(np.isnan(got), np.isnan(want)), "NaN (future/padding) pattern differs"
    finite = ~np.isnan(want)
    assert relative_error(got[finite], want[finite]) <= 1e-5
    scale = np.abs(want[finite]).max()
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("method", list(METHODS))
def test_methods_equal_naive_loop(model, method):
    source, target = PAIRS[0]
    got = METHODS[method](model, source, target)
    want = naive_attribution(model, source, target, method)
    assert got.dims == ("target", "source", "hidden")
    assert_matches(got.values, want)


@pytest.mark.parametrize("objective", ["logprob", "logit"])
@pytest.mark.parametrize("method", ["saliency", "integrated_gradients"])
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_objectives_equal_naive_loop(models, arch, method, objective):
    model = models[arch]
    source, target = PAIRS[1]
    got = METHODS[method](model, source, target, objective=objective)
    want = naive_attribution(model, source, target, method, objective=objective)
    assert got.attrs["objective"] == objective
    assert_matches(got.values, want)


def test_callable_objective_is_used(models):
    model = models["gpt2"]
    source, target = PAIRS[0]

    def neg_logit(logits, target_ids):
        return -logits.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)

    got = ax.saliency(model, source, target, objective=neg_logit)
    want = naive_attribution(model, source, target, "saliency", objective="logit")
    assert got.attrs["objective"] == "neg_logit"
    assert_matches(got.values, -want)


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients"])
@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_contrastive_equals_naive_loop(models, arch, method):
    model = models[arch]
    source, target, contrast = "The capital of France is", " Paris", " Rome"
    # a real second token, aligned with the target (a contrast equal to the target would give
    # all zeros, which a wrong sign or a dropped term gives too)
    contrast_ids = _naive.token_ids(model, source, contrast)[1]
    target_ids = _naive.token_ids(model, source, target)[1]
    assert len(contrast_ids) == len(target_ids) and contrast_ids != target_ids
    got = METHODS[method](model, source, target, contrast=contrast)
    want = naive_attribution(model, source, target, method, contrast=contrast)
    assert_matches(got.values, want)
    assert "contrast_token" in got.coords


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ["marian", "bart", "t5"])
def test_attribute_target_equals_naive_loop(models, arch, method):
    model = models[arch]
    source, target = PAIRS[2]
    got = METHODS[method](model, source, target, attribute_target=True)
    want = naive_attribution(model, source, target, method, attribute_target=True)
    assert set(got.indexes["source"].names) == {"side", "position"}
    assert_matches(got.values, want)
    assert set(got.side.values) == {"source", "target"}


BATCHED = [(arch, "saliency") for arch in ("gpt2", "llama", "marian", "bart", "t5")] + [
    ("gpt2", "input_x_gradient"),
    ("llama", "integrated_gradients"),
    ("t5", "integrated_gradients"),
    ("gpt2", "smoothgrad"),
    ("marian", "smoothgrad"),
]


@pytest.mark.parametrize(("arch", "method"), BATCHED)
def test_batched_equals_single(models, arch, method):
    model = models[arch]
    sources = [p[0] for p in PAIRS]
    targets = [p[1] for p in PAIRS]
    batched = METHODS[method](model, sources, targets, attribute_target=model.is_encoder_decoder)
    assert batched.dims[0] == "example"
    for i, (source, target) in enumerate(PAIRS):
        single = METHODS[method](model, source, target, attribute_target=model.is_encoder_decoder)
        row = batched.isel(example=i).sel(target=single.target, source=single.source)
        np.testing.assert_allclose(row.values, single.values, rtol=1e-5, atol=1e-7)
        assert list(row.source_token.values) == list(single.source_token.values)
        assert list(row.target_token.values) == list(single.target_token.values)
        # everything outside this example's own tokens is padding
        rest = batched.isel(example=i).drop_sel(target=single.target.values)
        assert bool(rest.isnull().all())


def test_no_attribution_to_the_future(models):
    da = ax.integrated_gradients(models["gpt2"], *PAIRS[1], steps=4).isel(hidden=0)
    future = (da.source >= da.target).transpose(*da.dims).values
    values = da.values
    assert np.isnan(values[future]).all()
    assert not np.isnan(values[~future]).any()


def test_encoder_decoder_future_is_nan_on_target_side(models):
    da = ax.saliency(models["marian"], *PAIRS[1], attribute_target=True).isel(hidden=0)
    decoder = da.sel(side="target")
    future = (decoder.position >= decoder.target).transpose(*decoder.dims).values
    assert np.isnan(decoder.values[future]).all()
    assert not np.isnan(decoder.values[~future]).any()
    assert not np.isnan(da.sel(side="source").values).any()


@pytest.mark.parametrize(
    ("quadrature", "steps"),
    [("gausslegendre", 64), ("riemann_trapezoid", 400), ("riemann_middle", 400)],
)
@pytest.mark.parametrize("arch", ["gpt2", "marian", "bart"])
def test_integrated_gradients_completeness(models, arch, quadrature, steps):
    # LayerNorm after position embeddings keeps the path smooth from the zero baseline; RMSNorm
    # models (llama, t5) are singular at zero embeddings, so completeness converges slowly there
    model = models[arch]
    da = integrated_gradients(model, *PAIRS[0], steps=steps, rule=quadrature)
    source_ids, target_ids = _naive.token_ids(model, *PAIRS[0])
    run = _naive.Runner(model, source_ids, target_ids)
    x = run.embeddings()
    zero = [torch.zeros_like(x[0]), *x[1:]]
    delta = np.array(
        [
            run.score(t, x, _naive.probability) - run.score(t, zero, _naive.probability)
            for t in run.targets()
        ]
    )
    total = da.sum(dim=("source", "hidden")).values
    scale = np.abs(delta).max()
    assert np.all(np.abs(total - delta) <= 2e-3 * scale + 1e-7)
    # the gaps are ~1e-8..1e-10 here: the coordinate is checked at the scale of f(x) - f(x'),
    # not at an absolute 1e-6 that a zero or sign-flipped gap would meet as well
    np.testing.assert_allclose(da.completeness_gap.values, total - delta, rtol=0, atol=1e-4 * scale)


RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_each_quadrature_rule_equals_naive_loop(models, arch, rule):
    # 3 points: the rules put them at different places, so a wrong rule cannot pass
    model = models[arch]
    source, target = PAIRS[1]
    got = integrated_gradients(model, source, target, steps=3, rule=rule)
    want = naive_attribution(
        model, source, target, "integrated_gradients", quadrature=rule, steps=3
    )
    assert_matches(got.values, want)


# (rule, steps) -> the integral written out by hand: points on the path from 0 to x, weights
CLOSED_FORMS = {
    ("riemann_right", 1): ([1.0], [1.0]),  # input x gradient
    ("riemann_left", 1): ([0.0], [1.0]),  # the gradient at the baseline
    ("riemann_middle", 1): ([0.5], [1.0]),
    ("gausslegendre", 1): ([0.5], [1.0]),  # one Gauss point is the midpoint
    ("riemann_trapezoid", 2): ([0.0, 1.0], [0.5, 0.5]),
    ("riemann_middle", 2): ([0.25, 0.75], [0.5, 0.5]),
    ("gausslegendre", 2): ([0.5 - 0.5 / 3**0.5, 0.5 + 0.5 / 3**0.5], [0.5, 0.5]),
}


@pytest.mark.parametrize(("rule", "steps"), list(CLOSED_FORMS))
def test_quadrature_rules_in_closed_form(models, rule, steps):
    model = models["gpt2"]
    source, target = PAIRS[0]
    got = integrated_gradients(model, source, target, steps=steps, rule=rule)
    nodes = CLOSED_FORMS[rule, steps]
    assert_matches(
        got.values, naive_attribution(model, source, target, "integrated_gradients", nodes=nodes)
    )
    if (rule, steps) == ("riemann_right", 1):
        assert_matches(got.values, naive_attribution(model, source, target, "input_x_gradient"))


def naive_token_embedding(run, side: int, token: int) -> torch.Tensor:
    """``[1, 1, H]``: the embedding module of ``side`` run on one token (the runner's modules)."""
    with torch.no_grad():
        return run.modules[side](torch.tensor([[token]]))


@pytest.mark.parametrize(
    ("arch", "baseline"),
    # (marian's and bart's pad embeddings are zero: marian takes unk)
    [("gpt2", "pad"), ("llama", "tensor"), ("marian", "unk"), ("t5", "tensor")],
)
def test_integrated_gradients_baselines_equal_naive_loop(models, arch, baseline):
    """A baseline moves the path's start and the multiplier (x - x'), and is the reference of
    ``completeness_gap``; encoder-decoder models attribute both sides from their own baseline."""
    model = models[arch]
    source, target = PAIRS[0]
    two = model.is_encoder_decoder
    run = _naive.Runner(model, *_naive.token_ids(model, source, target))
    x = run.embeddings()
    if baseline in ("pad", "unk"):
        token = model.pad_token_id if baseline == "pad" else model.tokenizer.unk_token_id
        base = [naive_token_embedding(run, side, token) for side in range(len(x))]
        assert all(float(b.abs().max()) > 0 for b in base)
        given = baseline
    else:
        g = torch.Generator().manual_seed(5)
        base = [torch.randn(xi.shape[-1], generator=g) * float(xi.std()) for xi in x]
        given = tuple(base) if two else base[0]
    got = integrated_gradients(model, source, target, steps=4, baseline=given, attribute_target=two)
    want = naive_attribution(
        model, source, target, "integrated_gradients", steps=4, baseline=base, attribute_target=two
    )
    assert_matches(got.values, want)
    # the gap's reference is the baseline: sum - (f(x) - f(x')), f(x') scored by the runner
    start = [b.expand_as(xi) for b, xi in zip(base, x, strict=True)]
    delta = np.array(
        [
            run.score(t, x, _naive.probability) - run.score(t, start, _naive.probability)
            for t in run.targets()
        ]
    )
    total = got.sum(dim=("source", "hidden")).values
    scale = np.abs(delta).max()
    np.testing.assert_allclose(
        got.completeness_gap.values, total - delta, rtol=0, atol=1e-4 * scale
    )


def test_saliency_abs_is_the_absolute_gradient(models):
    model = models["bart"]
    source, target = PAIRS[1]
    got = ax.saliency(model, source, target, abs=True, attribute_target=True)
    want = naive_attribution(model, source, target, "saliency", attribute_target=True)
    assert (want[~np.isnan(want)] < 0).any()  # abs has something to do
    assert_matches(got.values, np.abs(want))


def test_normalized_rows_sum_to_one(model):
    attribute = ax.pipe(ax.saliency, ax.l2_norm, ax.normalize)
    da = attribute(model, [p[0] for p in PAIRS], [p[1] for p in PAIRS])
    assert da.dims == ("example", "target", "source")
    sums = da.sum("source", min_count=1)
    real = sums.notnull()
    np.testing.assert_allclose(sums.where(real, drop=False).values[real.values], 1.0, rtol=1e-5)


def test_same_result_twice(model):
    a = ax.smoothgrad(model, *PAIRS[0], samples=3, seed=1)
    b = ax.smoothgrad(model, *PAIRS[0], samples=3, seed=1)
    c = ax.smoothgrad(model, *PAIRS[0], samples=3, seed=2)
    np.testing.assert_array_equal(a.values, b.values)
    assert not np.allclose(np.nan_to_num(a.values), np.nan_to_num(c.values))


def test_positions_select_rows(models):
    model = models["gpt2"]
    full = ax.input_x_gradient(model, *PAIRS[1])
    last = int(full.target[-1])
    some = ax.input_x_gradient(model, *PAIRS[1], positions=[int(full.target[0]), -1])
    assert list(some.target.values) == [int(full.target[0]), last]
    assert_close(some.values, full.sel(target=some.target).values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "marian"])
def test_chunking_changes_nothing(models, arch):
    model = models[arch]
    sources, targets = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    whole = ax.integrated_gradients(model, sources, targets, steps=6)
    for batch_size, chunk_size in ((4, 2), (None, 1), (5, 3)):
        chunked = ax.integrated_gradients(
            model, sources, targets, steps=6, batch_size=batch_size, chunk_size=chunk_size
        )
        assert_close(chunked.values, whole.values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "marian"])
def test_auto_sizes_fit_the_memory_budget(models, arch, monkeypatch):
    """ "auto" halves the targets per backward first, then the points per forward, until the
    estimate fits (decoder-only: the targets of least work that fit, then the points); given
    sizes are kept; the attributions do not change."""
    model = models[arch]
    sources, targets = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    whole = ax.integrated_gradients(
        model, sources, targets, steps=6, chunk_size=None, batch_size=None
    )
    problem = Problem.build(
        model, prepare(model, sources, targets), resolve("probability")[1], False
    )
    cost = problem.cost()
    k = problem.tensors.valid.shape[1]
    # decoder-only: (3, k) fits cost.at(6, 2) and (1, k) cost.at(3, 1)
    assert not model.causal or cost.per_cotangent <= cost.per_point
    for budget, expected in [
        (cost.at(6, k), (None, None)),  # everything fits
        # two targets at a time, all points; decoder-only, the least work (a forward per chunk)
        # is all k = 5 targets in one forward, 3 points fitting as per_cotangent <= per_point
        (cost.at(6, 2), (3, None) if model.causal else (None, 2)),
        # one target, half the points; decoder-only, all targets in one forward, one point
        (cost.at(3, 1), (1, None) if model.causal else (3, 1)),
        (cost.at(1, 1) - 1, (1, 1)),  # nothing fits: the smallest plan
    ]:
        monkeypatch.setattr(_memory, "memory_budget", lambda device, b=budget: b)
        assert problem.plan(6, "auto", "auto") == expected, budget
        assert problem.plan(6, 4, None) == (4, None)  # given sizes are kept
        auto = ax.integrated_gradients(model, sources, targets, steps=6)
        assert_close(auto.values, whole.values, rtol=1e-5, atol=1e-6)
    assert '"chunk_size": "auto"' in auto.attrs["options"]
    with pytest.raises(
        ax.OptionError, match="`chunk_size` must be a positive integer, None or 'auto'"
    ):
        ax.saliency(model, sources, targets, chunk_size="big")


def naive_greedy(model, source_ids: list[int], n: int) -> list[int]:
    """Up to ``n`` argmax tokens from plain forwards on the whole sequence; stops after EOS.

    An EOS the generation config forces at the length limit (Marian, BART) is no argmax: the
    model's own greedy token is explained instead (since 2026-12-06).
    """
    new: list[int] = []
    start = [model.hf.config.decoder_start_token_id] if model.is_encoder_decoder else []
    while len(new) < n and (not new or new[-1] != model.tokenizer.eos_token_id):
        with torch.no_grad():
            if model.is_encoder_decoder:
                out = model.hf(
                    input_ids=torch.tensor([source_ids]),
                    decoder_input_ids=torch.tensor([start + new]),
                )
            else:
                out = model.hf(input_ids=torch.tensor([source_ids + new]))
        new.append(int(out.logits[0, -1].argmax()))
    return new


def test_generated_targets_equal_naive_greedy_decoding(model):
    source = PAIRS[0][0]
    generated = ax.saliency(model, source, max_new_tokens=4)
    source_ids = _naive.token_ids(model, source, "")[0]
    target_ids = naive_greedy(model, source_ids, 4)
    assert generated.target_id.values.tolist() == target_ids
    want = naive_attribution(model, source, None, "saliency", ids=(source_ids, target_ids))
    assert_matches(generated.values, want)


def test_attrs_record_provenance(models):
    da = integrated_gradients(models["gpt2"], *PAIRS[0], steps=5, rule="riemann_left")
    assert da.attrs["method"] == "integrated_gradients"
    assert da.attrs["objective"] == "probability"
    assert '"steps": 5' in da.attrs["options"]
    assert da.attrs["model_type"] == "decoder-only"


@pytest.mark.parametrize(("arch", "attribute_target"), [("gpt2", False), ("marian", True)])
@pytest.mark.parametrize("method", ["input_x_gradient", "integrated_gradients"])
def test_forward_mode_equals_naive_token_sums(models, arch, attribute_target, method):
    model = models[arch]
    source, target = PAIRS[1]
    got = METHODS[method](
        model,
        source,
        target,
        reduce_hidden="sum",
        mode="forward",
        attribute_target=attribute_target,
    )
    want = naive_attribution(model, source, target, method, attribute_target=attribute_target)
    assert got.dims == ("target", "source")
    assert json.loads(got.attrs["options"])["mode"] == "forward"
    assert_matches(got.values, want.sum(-1))


def test_auto_mode_picks_forward_when_sources_are_fewer(models, monkeypatch):
    model = models["t5"]
    calls = []
    original = Problem.directional_sum

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Problem, "directional_sum", spy)
    short, long = "Hello", " return x + 1 and the capital of France is Paris"
    ax.input_x_gradient(model, short, long, reduce_hidden="sum")
    assert calls, "fewer source tokens than targets: forward mode expected"
    calls.clear()
    ax.input_x_gradient(model, long, short, reduce_hidden="sum")
    assert not calls


@pytest.mark.parametrize("reduction", [ax.l2_norm, ax.sum, ax.l2_norm("hidden")])
def test_pipe_reduces_hidden_inside_the_method(models, monkeypatch, reduction):
    model = models["llama"]
    seen = {}
    original = ax.saliency

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    spy.attrax_reduces_hidden = True
    fused = ax.pipe(spy, reduction, ax.normalize)(model, *PAIRS[0])
    plain = ax.normalize(reduction(ax.saliency(model, *PAIRS[0])))
    assert seen["reduce_hidden"] in ("l2_norm", "sum")
    xr.testing.assert_allclose(fused, plain, rtol=1e-5)
    assert fused.attrs["reductions"] == plain.attrs["reductions"]


def test_pipe_does_not_fuse_other_dims(models):
    da = ax.pipe(ax.saliency, ax.sum("source"))(models["gpt2"], *PAIRS[0])
    assert da.dims == ("target", "hidden")


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients"])
def test_sdpa_path_equals_naive_loop(models, arch, method, sdpa_always):
    # the naive loop runs the model as loaded (eager attention)
    model = models[arch]
    source, target = PAIRS[2]
    attribute_target = model.is_encoder_decoder
    seen = sdpa_always(model)
    got = METHODS[method](model, source, target, attribute_target=attribute_target)
    assert set(seen) == {"sdpa"}
    assert model.hf.config._attn_implementation == "eager"  # switched back
    want = naive_attribution(model, source, target, method, attribute_target=attribute_target)
    assert_matches(got.values, want)


@pytest.mark.parametrize("arch", ["llama", "bart"])
def test_sdpa_path_batched_equals_single(models, arch, sdpa_always):
    # padded batches give SDPA an attention mask, single examples may not
    model = models[arch]
    sources, targets = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    seen = sdpa_always(model)
    batched = ax.saliency(model, sources, targets)
    assert set(seen) == {"sdpa"}
    for i, (source, target) in enumerate(PAIRS):
        single = ax.saliency(model, source, target)
        row = batched.isel(example=i).sel(target=single.target, source=single.source)
        assert_matches(row.values, naive_attribution(model, source, target, "saliency"))


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_forward_mode_runs_eager_attention(models, arch, sdpa_always):
    # SDPA's fused kernels have no forward-mode derivative; a model loaded with "sdpa" still works
    model = models[arch]
    source, target = PAIRS[1]
    seen = sdpa_always(model)
    got = ax.input_x_gradient(model, source, target, reduce_hidden="sum", mode="forward")
    assert set(seen) == {"eager"}
    want = naive_attribution(model, source, target, "input_x_gradient")
    assert_matches(got.values, want.sum(-1))
    hf, tok = tiny_model(arch)  # an explicit "sdpa" model, as a user loads it
    explicit = ax.load_model(hf, tokenizer=tok, attn_implementation="sdpa")
    seen = sdpa_always(explicit)
    again = ax.input_x_gradient(explicit, source, target, reduce_hidden="sum", mode="forward")
    assert_matches(again.values, want.sum(-1))
    assert set(seen) == {"eager"}
    assert explicit.hf.config._attn_implementation == "sdpa"
