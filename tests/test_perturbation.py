"""Perturbation methods: occlusion against a naive loop of masked forwards, LIME and KernelSHAP
against known linear functions, and their options."""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

import attrax as ax
from attrax import _perturbation
from attrax._perturbation import kernel_shap, lime, linear_surrogate, occlusion
from attrax.testing import train_tokenizer
from tests import _naive
from tests.conftest import PAIRS, assert_close

METHODS = {
    "occlusion": lambda m, s, t, **kw: occlusion(m, s, t, **kw),
    "lime": lambda m, s, t, **kw: lime(m, s, t, samples=24, **kw),
    "kernel_shap": lambda m, s, t, **kw: kernel_shap(m, s, t, samples=24, **kw),
}


def naive_occlusion(model, source: str, target: str, attribute_target: bool) -> np.ndarray:
    """[target, source(+decoder)]: one plain HF forward per zeroed token; future stays NaN."""
    source_ids, target_ids = _naive.token_ids(model, source, target)
    run = _naive.Runner(model, source_ids, target_ids)
    x = run.embeddings()
    sides = 2 if (model.is_encoder_decoder and attribute_target) else 1

    def scores(points: list[torch.Tensor]) -> np.ndarray:
        with torch.no_grad():
            logits = run.logits(points)
        return np.array(
            [float(_naive.probability(logits[t - 1], run.sequence[t])) for t in run.targets()]
        )

    full = scores(x)
    columns = []
    for side in range(sides):
        for s in range(x[side].shape[1]):
            points = [xi.clone() for xi in x]
            points[side][0, s] = 0.0
            columns.append(full - scores(points))
    out = np.stack(columns, axis=1)
    for k, t in enumerate(run.targets()):
        if not model.is_encoder_decoder:
            out[k, t:] = np.nan
        elif attribute_target:
            out[k, len(source_ids) + t :] = np.nan
    return out


@pytest.mark.parametrize(
    ("arch", "attribute_target"), [("gpt2", False), ("marian", False), ("bart", True)]
)
def test_occlusion_equals_naive_loop(models, arch, attribute_target):
    model = models[arch]
    source, target = PAIRS[2]
    got = occlusion(model, source, target, attribute_target=attribute_target)
    assert got.dims == ("target", "source")
    assert_close(
        got.values, naive_occlusion(model, source, target, attribute_target), rtol=1e-4, atol=1e-4
    )


def test_occlusion_token_baseline_uses_that_embedding(models):
    model = models["llama"]
    source, target = PAIRS[0]
    unk = model.tokenizer.unk_token_id
    ids = _naive.token_ids(model, source, target)
    run = _naive.Runner(model, *ids)
    x = run.embeddings()[0]
    replaced = x.clone()
    replaced[0, 2] = model.hf.get_input_embeddings().weight[unk]
    t = run.targets()[-1]
    want = run.score(t, [x], _naive.probability) - run.score(t, [replaced], _naive.probability)
    got = occlusion(model, source, target, baseline="unk").sel(target=t, source=2)
    np.testing.assert_allclose(float(got), want, rtol=1e-4, atol=1e-9)


# --- the estimator on known linear functions --------------------------------------------------


def linear_problem(seed: int = 0, n: int = 80, features: int = 7, targets: int = 5):
    g = torch.Generator().manual_seed(seed)
    masks = (torch.rand((n, features), generator=g) < 0.5).double()
    coefficients = torch.randn((targets, features), generator=g, dtype=torch.float64)
    intercept = torch.randn(targets, generator=g, dtype=torch.float64)
    return masks, coefficients, intercept


def test_surrogate_recovers_linear_function():
    masks, coefficients, intercept = linear_problem()
    scores = masks @ coefficients.T + intercept
    weights = torch.rand(masks.shape[0], generator=torch.Generator().manual_seed(1))
    got = linear_surrogate(masks, scores, weights)
    torch.testing.assert_close(got, coefficients, rtol=1e-9, atol=1e-9)
    bounds = (intercept, intercept + coefficients.sum(-1))
    got = linear_surrogate(masks, scores, weights, bounds=bounds)
    torch.testing.assert_close(got, coefficients, rtol=1e-9, atol=1e-9)


def test_surrogate_with_visible_features_per_target_and_batch_dims():
    masks, coefficients, intercept = linear_problem(features=5, targets=5)
    visible = torch.ones(5, 5, dtype=torch.bool).tril()  # target k sees features 0..k
    want = coefficients * visible
    scores = masks @ want.T + intercept
    weights = torch.rand((masks.shape[0], 5), generator=torch.Generator().manual_seed(2))
    stacked = (masks.expand(3, -1, -1), scores.expand(3, -1, -1), weights.expand(3, -1, -1))
    for bounds in (None, (intercept.expand(3, -1), (intercept + want.sum(-1)).expand(3, -1))):
        got = linear_surrogate(*stacked, visible=visible.expand(3, -1, -1), bounds=bounds)
        assert got.shape == (3, 5, 5)
        torch.testing.assert_close(got, want.expand(3, -1, -1), rtol=1e-9, atol=1e-9)


def test_surrogate_constraint_holds_for_nonlinear_scores():
    masks, coefficients, intercept = linear_problem()
    scores = torch.tanh(masks @ coefficients.T) + intercept
    empty, full = (
        torch.tanh(torch.zeros(5)) + intercept,
        torch.tanh(coefficients.sum(-1)) + intercept,
    )
    got = linear_surrogate(masks, scores, torch.ones(masks.shape[0]), bounds=(empty, full))
    torch.testing.assert_close(got.sum(-1), full - empty, rtol=1e-9, atol=1e-9)


def test_surrogate_rejects_mismatched_shapes():
    masks, coefficients, _ = linear_problem()
    with pytest.raises(ax.InputError, match="weights"):
        linear_surrogate(masks, masks @ coefficients.T, torch.ones(3))
    with pytest.raises(ax.InputError, match="masks"):
        linear_surrogate(masks[:5], masks @ coefficients.T, torch.ones(80))


# --- the full methods on a model whose objective is linear in the kept tokens -----------------


class LinearConfig(PretrainedConfig):
    model_type = "attrax-linear-toy"

    def __init__(self, vocab_size: int = 8, hidden_size: int = 4, positions: int = 32, **kw):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.max_position_embeddings = positions
        super().__init__(**kw)


class LinearLM(PreTrainedModel):
    """h_t = sum_{s<=t} mix[t, s] e_s, logits = head(h): each logit is linear in the embeddings,
    so with a zero baseline every target's logit is linear in the kept-token indicators."""

    config_class = LinearConfig

    def __init__(self, config: LinearConfig) -> None:
        super().__init__(config)
        size = config.max_position_embeddings
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.mix = torch.nn.Parameter(torch.randn(size, size).tril())
        self.head = torch.nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, **_) -> Any:
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        length = x.shape[1]
        return CausalLMOutput(
            logits=self.head(torch.einsum("ts,bsh->bth", self.mix[:length, :length], x))
        )


@pytest.fixture(scope="module")
def linear_model() -> ax.Model:
    tok = train_tokenizer("gpt2")
    torch.manual_seed(0)
    return ax.load_model(LinearLM(LinearConfig(vocab_size=len(tok))), tokenizer=tok)


def exact_coefficients(model: ax.Model, source: str, target: str) -> np.ndarray:
    """[target, source]: logit_t = bias + sum_s z_s mix[t-1, s] (W[y_t] . e_s)."""
    source_ids, target_ids = _naive.token_ids(model, source, target)
    ids = torch.tensor(source_ids + target_ids)
    hf = model.hf
    with torch.no_grad():
        e = hf.embed(ids)
        rows = []
        for t in range(len(source_ids), len(ids)):
            row = hf.mix[t - 1, : len(ids)] * (e @ hf.head.weight[ids[t]])
            rows.append(row.numpy().copy())
    out = np.stack(rows)
    for k, t in enumerate(range(len(source_ids), len(ids))):
        out[k, t:] = np.nan
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_methods_recover_linear_model(linear_model, method):
    sources, targets = [p[0] for p in PAIRS[:2]], [p[1] for p in PAIRS[:2]]
    kwargs = {"samples": 96} if method != "occlusion" else {}
    fn = {"occlusion": occlusion, "lime": lime, "kernel_shap": kernel_shap}[method]
    got = fn(linear_model, sources, targets, objective="logit", **kwargs)
    for i, (source, target) in enumerate(zip(sources, targets, strict=True)):
        want = exact_coefficients(linear_model, source, target)
        first = want.shape[1] - want.shape[0]
        row = got.isel(example=i).sel(
            target=np.arange(first, want.shape[1]), source=np.arange(want.shape[1])
        )
        assert_close(row.values, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("arch", "attribute_target"), [("gpt2", False), ("bart", True)])
def test_kernel_shap_is_efficient(models, arch, attribute_target):
    # bart: both attributed sides (encoder source and decoder prefix) go to the baseline
    model = models[arch]
    source, target = PAIRS[1]
    da = kernel_shap(
        model, source, target, samples=16, objective="logprob", attribute_target=attribute_target
    )
    run = _naive.Runner(model, *_naive.token_ids(model, source, target))
    x = run.embeddings()
    zero = [torch.zeros_like(xi) for xi in x]
    if not attribute_target:
        zero[1:] = x[1:]
    want = [
        run.score(t, x, _naive.logprob) - run.score(t, zero, _naive.logprob) for t in run.targets()
    ]
    np.testing.assert_allclose(da.sum("source").values, want, rtol=1e-4, atol=1e-5)


def exact_shapley(model, source: str, target: str) -> np.ndarray:
    """[target, source]: Shapley values by enumerating every coalition of the earlier tokens."""
    run = _naive.Runner(model, *_naive.token_ids(model, source, target))
    x = run.embeddings()[0]
    targets = run.targets()
    players = targets[-1]  # the last position is never a source
    value = {}
    for z in itertools.product([False, True], repeat=players):
        points = x.clone()
        points[0, [i for i in range(players) if not z[i]]] = 0.0
        with torch.no_grad():
            logits = run.logits([points])
        value[z] = [float(_naive.logprob(logits[t - 1], run.sequence[t])) for t in targets]
    out = np.full((len(targets), x.shape[1]), np.nan)
    for k, t in enumerate(targets):
        for i in range(t):
            total = 0.0
            others = [j for j in range(t) if j != i]
            for size in range(t):
                weight = math.factorial(size) * math.factorial(t - size - 1) / math.factorial(t)
                for subset in itertools.combinations(others, size):
                    # players at or after t do not matter to target t: keep them
                    without = tuple(j in subset or j >= t for j in range(players))
                    with_i = tuple(j in subset or j == i or j >= t for j in range(players))
                    total += weight * (value[with_i][k] - value[without][k])
            out[k, i] = total
    return out


def test_kernel_shap_converges_to_exact_shapley_values(models):
    # targets see 2..5 earlier tokens: checks the importance weights of restricted coalitions
    model = models["gpt2"]
    want = exact_shapley(model, "def f", "(x): return")
    got = kernel_shap(model, "def f", "(x): return", samples=4096, objective="logprob").values
    finite = ~np.isnan(want)
    assert np.array_equal(np.isnan(got), ~finite)
    assert np.abs(got[finite] - want[finite]).max() <= 0.03 * np.abs(want[finite]).max()


# --- shared behaviour --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lime", "kernel_shap"])
def test_seed_reproduces(models, method):
    model = models["gpt2"]
    a = METHODS[method](model, *PAIRS[0], seed=3)
    b = METHODS[method](model, *PAIRS[0], seed=3)
    c = METHODS[method](model, *PAIRS[0], seed=4)
    np.testing.assert_array_equal(a.values, b.values)
    assert not np.allclose(np.nan_to_num(a.values), np.nan_to_num(c.values))
    assert '"seed": 3' in a.attrs["options"]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_batched_equals_single(models, arch, method):
    model = models[arch]
    encdec = model.is_encoder_decoder
    sources, targets = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    batched = METHODS[method](model, sources, targets, attribute_target=encdec)
    assert batched.dims == ("example", "target", "source")
    for i, (source, target) in enumerate(PAIRS):
        single = METHODS[method](model, source, target, attribute_target=encdec)
        row = batched.isel(example=i).sel(target=single.target, source=single.source)
        assert_close(row.values, single.values, rtol=2e-4, atol=2e-4)
        rest = batched.isel(example=i).drop_sel(target=single.target.values)
        assert bool(rest.isnull().all())


@pytest.mark.parametrize("method", list(METHODS))
def test_batch_size_changes_nothing(models, method):
    model = models["gpt2"]
    whole = METHODS[method](model, *PAIRS[1])
    chunked = METHODS[method](model, *PAIRS[1], batch_size=5)
    assert_close(chunked.values, whole.values, rtol=1e-5, atol=1e-6)
    assert whole.attrs["method"] == method


def test_future_is_nan_and_past_is_finite(models):
    da = METHODS["lime"](models["gpt2"], *PAIRS[1], positions=[-2, -1])
    future = (da.source >= da.target).transpose(*da.dims).values
    assert np.isnan(da.values[future]).all()
    assert np.isfinite(da.values[~future]).all()


@pytest.mark.parametrize(
    ("method", "option", "value"),
    [
        ("occlusion", "baseline", "mean"),
        ("occlusion", "batch_size", 0),
        ("lime", "samples", 0),
        ("lime", "kernel_width", -1.0),
        ("lime", "kernel_width", True),
        ("lime", "seed", "x"),
        ("kernel_shap", "samples", 2.5),
        ("kernel_shap", "objective", "entropy"),
        ("kernel_shap", "attribute_target", "yes"),
    ],
)
def test_bad_options_raise(models, method, option, value):
    fn = {"occlusion": occlusion, "lime": lime, "kernel_shap": kernel_shap}[method]
    with pytest.raises(ax.OptionError, match=f"`{option}`"):
        fn(models["gpt2"], *PAIRS[0], **{option: value})


def test_lime_needs_a_second_coalition(models):
    """One coalition (the full input) has nothing to regress on: the minimum-norm fit split the
    objective evenly over the tokens, a flat row that looked like an answer."""
    with pytest.raises(ax.OptionError, match="`samples` must be an integer of at least 2, got 1"):
        lime(models["gpt2"], *PAIRS[0], samples=1)
    assert np.isfinite(lime(models["gpt2"], *PAIRS[0], samples=2).values).any()


def test_kernel_shap_and_sobol_need_enough_samples(models):
    """KernelSHAP draws coalitions in pairs with their complements: one pair fits the even split
    of the sum alone; Sobol's variance over one row of each design divides by noise (values up
    to 166 for indices in [0, 1]). Both returned them until 2026-12-05."""
    flat = kernel_shap(models["gpt2"], *PAIRS[0], samples=3).values[0]
    assert np.nanstd(flat) > 0
    with pytest.raises(ax.OptionError, match="`samples` must be an integer of at least 3, got 2"):
        kernel_shap(models["gpt2"], *PAIRS[0], samples=2)
    with pytest.raises(ax.OptionError, match="`samples` must be an integer of at least 2, got 1"):
        ax.sobol(models["gpt2"], *PAIRS[0], samples=1)


def test_bad_inputs_raise(models):
    with pytest.raises(ax.InputError, match="`inputs`"):
        occlusion(models["gpt2"], [], [])
    with pytest.raises(ax.InputError, match="`positions`"):
        lime(models["gpt2"], *PAIRS[0], positions=[0])


def _log_if_likely(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(target), -inf where p <= 0.5: finite on the clean input, not on every coalition."""
    p = logits.float().softmax(-1).gather(-1, ids[..., None])[..., 0]
    return torch.log(torch.where(p > 0.5, p, torch.zeros_like(p)))


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("occlusion", {}),
        ("feature_ablation", {}),
        ("lime", {"samples": 8}),
        ("kernel_shap", {"samples": 8}),
        ("shapley_sampling", {"permutations": 2}),
        ("sobol", {"samples": 8}),
    ],
)
def test_non_finite_objective_values_are_an_input_error(method, options):
    """Every perturbation method refuses objective values that are not finite, whether the
    method differences them (occlusion), fits them (LIME: LAPACK failed inside torch) or divides
    their variances (Sobol: a NaN variance read as 0 gave all-zero indices)."""
    model = ax.load_model()
    clean = ax.step_scores(model, "3 1 4 0 5 9 =", " 9 5 0 4 1 3", scores="probability")
    assert float(clean.min()) > 0.5  # the unperturbed objective is finite
    with pytest.raises(ax.InputError, match=f"{method}: the objective values are not finite"):
        getattr(ax, method)(
            model, "3 1 4 0 5 9 =", " 9 5 0 4 1 3", objective=_log_if_likely, **options
        )


# --- LIME against a naive weighted fit on the test's own coalitions -----------------------------


def naive_lime(model, source: str, target: str, masks: np.ndarray, width: float) -> np.ndarray:
    """[target, source]: one plain HF forward per coalition (removed tokens zeroed), then per
    target a numpy weighted least squares with an intercept over the tokens it sees, weighted by
    exp(-d^2 / (2 width^2)) with d the cosine distance of the coalition to the full input."""
    run = _naive.Runner(model, *_naive.token_ids(model, source, target))
    x = run.embeddings()[0]
    targets = run.targets()
    values = []
    for z in masks:
        points = x.clone()
        points[0, [i for i in range(len(z)) if not z[i]]] = 0.0
        with torch.no_grad():
            logits = run.logits([points])
        values.append([float(_naive.probability(logits[t - 1], run.sequence[t])) for t in targets])
    values = np.array(values)
    out = np.full((len(targets), x.shape[1]), np.nan)
    for k, t in enumerate(targets):
        seen = masks[:, :t].astype(np.float64)  # a target sees the tokens before it
        ones = np.ones(t)
        norms = np.linalg.norm(seen, axis=1) * np.linalg.norm(ones)
        similarity = np.divide(seen @ ones, norms, out=np.zeros(len(seen)), where=norms > 0)
        w = np.exp(-((1 - similarity) ** 2) / (2 * width**2))
        design = np.hstack([seen, np.ones((len(seen), 1))])
        root = np.sqrt(w)[:, None]
        solution, *_ = np.linalg.lstsq(root * design, root[:, 0] * values[:, k], rcond=None)
        out[k, :t] = solution[:t]
    return out


def test_lime_equals_a_naive_weighted_fit_on_its_coalitions(models, monkeypatch):
    """The test draws the coalitions (fed to attrax through its draw function); the kernel on the
    cosine distance, the intercept and the per-target visible tokens are checked, which a model
    whose objective is linear in the kept tokens cannot see."""
    hf = copy.deepcopy(models["gpt2"].hf).double()  # float64: a tight comparison
    model = ax.load_model(hf, tokenizer=models["gpt2"].tokenizer)
    source, target = PAIRS[1]
    samples, width = 40, 0.5  # a non-default kernel width
    players = sum(map(len, _naive.token_ids(model, source, target))) - 1  # never the last token
    masks = np.random.default_rng(11).random((samples, players)) < 0.5
    masks[0] = True  # LIME's first coalition is the full input

    def draw(n: int, m: int, generator: torch.Generator) -> torch.Tensor:
        assert (n, m) == (samples, players)
        return torch.as_tensor(masks)

    monkeypatch.setattr(_perturbation, "_bernoulli", draw)
    got = lime(model, source, target, samples=samples, kernel_width=width)
    want = naive_lime(model, source, target, masks, width)
    assert_close(got.values, want, rtol=1e-6, atol=1e-9)
