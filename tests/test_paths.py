"""Guided backprop, deconvolution, sequential and guided IG against plain per-target loops."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch

import attrax as ax
from attrax.testing import tiny_model
from tests import _naive, conftest
from tests.conftest import PAIRS

# the elementwise activation modules of the tiny models, named here (not read from attrax)
ACTIVATION_TYPES = (
    "ReLU",
    "GELU",
    "SiLU",
    "NewGELUActivation",
    "GELUActivation",
    "SiLUActivation",
    "GELUTanh",
    "PytorchGELUTanh",
    "FastGELUActivation",
)


# path methods' references take more quadrature and float steps than the others' loops
assert_close = functools.partial(conftest.assert_close, rtol=1e-4, atol=1e-5)


def _hooked(model, rule: str, only_relu: bool):
    """Backward hooks replacing each activation's input gradient, as Captum does on nn.ReLU."""
    handles = []
    for module in model.hf.modules():
        name = type(module).__name__
        if name not in (("ReLU",) if only_relu else ACTIVATION_TYPES):
            continue

        def hook(_m, grad_input, grad_output):
            chosen = grad_output if rule == "deconvolution" else grad_input
            return tuple(None if g is None else torch.relu(g) for g in chosen)

        handles.append(module.register_full_backward_hook(hook))
    return handles


def naive_rows(model, source, target, per_target_fn) -> np.ndarray:
    """``[target, source, hidden]``: ``per_target_fn(run, x, t) -> [L, H]``; future NaN."""
    source_ids, target_ids = _naive.token_ids(model, source, target)
    run = _naive.Runner(model, source_ids, target_ids)
    x = run.embeddings()
    rows = []
    for k, t in enumerate(run.targets()):
        row = np.array(per_target_fn(run, x, k, t), dtype=np.float64)
        _naive.future_to_nan(row, model, t)
        rows.append(row)
    return np.stack(rows)


def naive_modified_gradient(
    model, source, target, rule, only_relu=False, attribute_target=False
) -> np.ndarray:
    """``[target, source (+ decoder), hidden]``: one hooked backward per target; with
    ``attribute_target`` taken w.r.t. the encoder's and the decoder's embeddings alike."""
    handles = _hooked(model, rule, only_relu)
    try:
        source_ids, target_ids = _naive.token_ids(model, source, target)
        run = _naive.Runner(model, source_ids, target_ids)
        grads = run.gradients(run.embeddings(), _naive.probability, None)
    finally:
        for h in handles:
            h.remove()
    sides = 2 if attribute_target else 1
    rows = []
    for t, g in zip(run.targets(), grads, strict=True):
        row = torch.cat(g[:sides]).numpy().astype(np.float64)
        _naive.future_to_nan(row, model, t, len(source_ids), attribute_target)
        rows.append(row)
    return np.stack(rows)


# --------------------------------------------------------------------------------------------------
# guided backprop, deconvolution
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["guided", "deconvolution"])
def test_modified_backprop_equals_hooked_loop(model, rule):
    method = ax.guided_backprop if rule == "guided" else ax.deconvolution
    source, target = PAIRS[0]
    got = method(model, source, target)
    assert got.dims == ("target", "source", "hidden")
    want = naive_modified_gradient(model, source, target, rule)
    assert_close(got.values, want)
    # the rule changes something: it is not the plain gradient
    plain = ax.saliency(model, source, target).values
    assert not np.allclose(got.values[~np.isnan(want)], plain[~np.isnan(want)], atol=1e-6)


@pytest.fixture(scope="module")
def relu_models():
    built = {}
    for arch, key in (("gpt2", "activation_function"), ("llama", "hidden_act")):
        hf, tok = tiny_model(arch, **{key: "relu"})
        built[arch] = ax.load_model(hf, tokenizer=tok)
    return built


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("rule", ["guided", "deconvolution"])
def test_relu_models_as_captum(relu_models, arch, rule):
    model = relu_models[arch]
    method = ax.guided_backprop if rule == "guided" else ax.deconvolution
    source, target = PAIRS[1]
    want = naive_modified_gradient(model, source, target, rule, only_relu=True)
    for activations in ("all", "relu"):  # a ReLU model: both mean the same
        assert_close(method(model, source, target, activations=activations).values, want)


def test_relu_only_leaves_gelu_gradients(models):
    # Captum hooks nn.ReLU only: on a GELU GPT-2 its GuidedBackprop is the plain gradient
    model = models["gpt2"]
    got = ax.guided_backprop(model, *PAIRS[0], activations="relu")
    np.testing.assert_allclose(got.values, ax.saliency(model, *PAIRS[0]).values, rtol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_modified_backprop_batched_equals_single(models, arch):
    model = models[arch]
    sources, targets = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    batched = ax.guided_backprop(model, sources, targets)
    for i, (source, target) in enumerate(PAIRS):
        single = ax.guided_backprop(model, source, target)
        row = batched.isel(example=i).sel(target=single.target, source=single.source)
        np.testing.assert_allclose(row.values, single.values, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ["t5", "bart"])  # ReLU, GELU
@pytest.mark.parametrize("rule", ["guided", "deconvolution"])
def test_modified_backprop_decoder_side_equals_hooked_loop(models, arch, rule):
    # with attribute_target the decoder prefix's gradients pass the same modified backward
    model = models[arch]
    method = ax.guided_backprop if rule == "guided" else ax.deconvolution
    source, target = PAIRS[0]
    got = method(model, source, target, attribute_target=True)
    assert "side" in got.indexes["source"].names
    want = naive_modified_gradient(model, source, target, rule, attribute_target=True)
    assert_close(got.values, want)
    # the decoder side is there, and the rule changes it: it is not the plain gradient there
    decoder = got.sel(side="target").values
    seen = ~np.isnan(decoder)
    assert np.abs(decoder[seen]).max() > 1e-3 * np.nanmax(np.abs(want))
    plain = ax.saliency(model, source, target, attribute_target=True).sel(side="target").values
    assert not np.allclose(decoder[seen], plain[seen], rtol=1e-3, atol=1e-6)


def test_modified_backprop_refuses_forward_mode(default_model):
    with pytest.raises(ax.OptionError, match="multiplier"):
        ax.deconvolution(default_model, "1 2 =", " 2 1", reduce_hidden="sum", mode="forward")
    with pytest.raises(ax.OptionError, match="activations"):
        ax.guided_backprop(default_model, "1 2 =", " 2 1", activations="gelu")


# --------------------------------------------------------------------------------------------------
# sequential integrated gradients
# --------------------------------------------------------------------------------------------------
def naive_sig(
    model,
    source,
    target,
    steps: int,
    baseline: str = "zeros",
    attribute_target: bool = False,
    rule: str = "gausslegendre",
) -> np.ndarray:
    """Per token, per node: that token alone moved from its baseline, one backward per target.

    With ``attribute_target`` the decoder prefix's tokens move too, one at a time, each from
    its own side's baseline (``"pad"``: that side's embedding module run on the pad token)."""
    alphas, weights = _naive.quadrature_nodes(rule, steps)
    source_ids, target_ids = _naive.token_ids(model, source, target)
    run = _naive.Runner(model, source_ids, target_ids)
    x = run.embeddings()
    sides = 2 if attribute_target else 1
    base = [torch.zeros_like(xi) for xi in x[:sides]]
    if baseline == "pad":
        with torch.no_grad():
            pad = torch.tensor([[model.pad_token_id]])
            base = [run.modules[s](pad).expand_as(x[s]) for s in range(sides)]
    targets = run.targets()
    sums = [[torch.zeros_like(xi[0]) for xi in x[:sides]] for _ in targets]
    for side in range(sides):
        for i in range(x[side].shape[1]):
            for a, w in zip(alphas, weights, strict=True):
                points = [xi.clone() for xi in x]
                points[side][0, i] = base[side][0, i] + a * (x[side][0, i] - base[side][0, i])
                for k, grads in enumerate(run.gradients(points, _naive.probability, None)):
                    sums[k][side][i] += w * grads[side][i]
    rows = []
    for t, per_side in zip(targets, sums, strict=True):
        moved = [g * (xi - bi)[0] for g, xi, bi in zip(per_side, x, base, strict=False)]
        row = torch.cat(moved).numpy().astype(np.float64)
        _naive.future_to_nan(row, model, t, len(source_ids), attribute_target)
        rows.append(row)
    return np.stack(rows)


@pytest.mark.parametrize("arch", ["gpt2", "marian"])
def test_sig_equals_naive_loop(models, arch):
    model = models[arch]
    source, target = PAIRS[2]
    got = ax.sequential_integrated_gradients(model, source, target, steps=3, baseline="zeros")
    assert_close(got.values, naive_sig(model, source, target, 3))


def test_sig_pad_baseline_and_forward_mode(models):
    model = models["llama"]
    source, target = PAIRS[2]
    got = ax.sequential_integrated_gradients(model, source, target, steps=2)  # "pad"
    assert_close(got.values, naive_sig(model, source, target, 2, baseline="pad"))
    forward = ax.sequential_integrated_gradients(
        model, source, target, steps=2, reduce_hidden="sum", mode="forward"
    )
    assert_close(forward.values, got.sum("hidden", skipna=False).values)


def test_sig_completeness_per_token(models):
    # sum over hidden of token i's attribution = f(x) - f(x with token i at its baseline)
    model = models["gpt2"]
    source, target = PAIRS[0]
    da = ax.sequential_integrated_gradients(model, source, target, steps=24, baseline="zeros")
    source_ids, target_ids = _naive.token_ids(model, source, target)
    run = _naive.Runner(model, source_ids, target_ids)
    x = run.embeddings()
    total = da.sum("hidden", skipna=False).values
    want = np.full(total.shape, np.nan)
    for k, t in enumerate(run.targets()):
        full = run.score(t, x, _naive.probability)
        for i in range(t):
            moved = x[0].clone()
            moved[0, i] = 0
            want[k, i] = full - run.score(t, [moved], _naive.probability)
    # the objective is a probability of ~1e-4 here: an absolute 1e-4 would accept anything, so
    # each token is held to its own value (24 Gauss nodes: ~1e-3 where the path bends most)
    seen = ~np.isnan(want)
    assert np.array_equal(seen, ~np.isnan(total))
    scale = np.abs(want[seen]).max()
    np.testing.assert_allclose(total[seen], want[seen], rtol=3e-3, atol=1e-5 * scale)


def test_sig_decoder_side_and_riemann_rule_equal_naive_loop(models):
    # the decoder prefix's tokens move one at a time from the decoder's own pad embedding
    model = models["t5"]
    source, target = PAIRS[0]
    got = ax.sequential_integrated_gradients(
        model, source, target, steps=2, quadrature="riemann_middle", attribute_target=True
    )
    want = naive_sig(
        model, source, target, 2, baseline="pad", attribute_target=True, rule="riemann_middle"
    )
    assert_close(got.values, want)


def test_sig_batched_equals_single(models):
    model = models["t5"]
    sources, targets = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    kw = dict(steps=2, attribute_target=True)
    batched = ax.sequential_integrated_gradients(model, sources, targets, **kw)
    for i, (source, target) in enumerate(PAIRS):
        single = ax.sequential_integrated_gradients(model, source, target, **kw)
        row = batched.isel(example=i).sel(target=single.target, source=single.source)
        np.testing.assert_allclose(row.values, single.values, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# guided integrated gradients
# --------------------------------------------------------------------------------------------------
def pair_guided_ig(x_input, x_baseline, grad_func, steps, fraction, max_dist) -> np.ndarray:
    """PAIR saliency's ``guided_ig_impl``, transcribed (numpy, float64)."""
    x_input = np.asarray(x_input, dtype=np.float64)
    x_baseline = np.asarray(x_baseline, dtype=np.float64)
    x = x_baseline.copy()
    l1_total = np.abs(x_input - x_baseline).sum()
    attr = np.zeros_like(x_input)
    if np.abs(x_input - x_baseline).sum() == 0:
        return attr
    diff = x_input - x_baseline

    def to_alpha(v):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(diff != 0, (v - x_baseline) / diff, np.nan)

    for step in range(steps):
        grad_actual = grad_func(x)
        grad = grad_actual.copy()
        alpha = (step + 1.0) / steps
        alpha_min, alpha_max = max(alpha - max_dist, 0.0), min(alpha + max_dist, 1.0)
        x_min = x_baseline + diff * alpha_min
        x_max = x_baseline + diff * alpha_max
        l1_target = l1_total * (1 - (step + 1) / steps)
        gamma = np.inf
        while gamma > 1.0:
            x_old = x.copy()
            x_alpha = to_alpha(x)
            x_alpha[np.isnan(x_alpha)] = alpha_max
            x[x_alpha < alpha_min] = x_min[x_alpha < alpha_min]
            l1_current = np.abs(x - x_input).sum()
            if math.isclose(l1_target, l1_current, rel_tol=1e-9, abs_tol=1e-9):
                attr += (x - x_old) * grad_actual
                break
            grad[x == x_max] = np.inf
            threshold = np.quantile(np.abs(grad), fraction, method="lower")
            s = np.logical_and(np.abs(grad) <= threshold, grad != np.inf)
            l1_s = (np.abs(x - x_max) * s).sum()
            gamma = (l1_current - l1_target) / l1_s if l1_s > 0 else np.inf
            if gamma > 1.0:
                x[s] = x_max[s]
            else:
                x[s] = (x + (x_max - x) * gamma)[s]
            attr += (x - x_old) * grad_actual
    return attr


def naive_guided_ig(
    model, source, target, steps, fraction=0.25, max_dist=0.02, attribute_target=False
) -> np.ndarray:
    """PAIR's loop per target on the flattened features (both sides' with
    ``attribute_target``), zero baseline; one backward of that target per gradient."""
    source_ids, target_ids = _naive.token_ids(model, source, target)
    run = _naive.Runner(model, source_ids, target_ids)
    x = run.embeddings()
    sides = 2 if attribute_target else 1
    shapes = [xi.shape for xi in x[:sides]]
    sizes = [xi.numel() for xi in x[:sides]]
    flat = torch.cat([xi.ravel() for xi in x[:sides]]).double().numpy()
    rows = []
    for t in run.targets():

        def grad_func(v, t=t):
            parts = torch.as_tensor(v, dtype=torch.float32).split(sizes)
            points = [p.view(shape) for p, shape in zip(parts, shapes, strict=True)]
            grads = target_gradient(run, points + x[sides:], t, sides)
            return torch.cat([g.ravel() for g in grads]).double().numpy()

        out = pair_guided_ig(flat, np.zeros_like(flat), grad_func, steps, fraction, max_dist)
        parts = np.split(out, np.cumsum(sizes)[:-1])
        row = np.concatenate([o.reshape(s[1:]) for o, s in zip(parts, shapes, strict=True)])
        _naive.future_to_nan(row, model, t, len(source_ids), attribute_target)
        rows.append(row)
    return np.stack(rows)


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_guided_ig_equals_pair_loop(models, arch):
    model = models[arch]
    source, target = PAIRS[2]
    got = ax.guided_integrated_gradients(
        model, source, target, steps=5, fraction=0.3, baseline="zeros"
    )
    assert_close(got.values, naive_guided_ig(model, source, target, 5, fraction=0.3), rtol=1e-3)


def test_guided_ig_decoder_side_equals_pair_loop(models):
    # with attribute_target the decoder prefix's features join the path (and its quantiles)
    model = models["bart"]
    source, target = PAIRS[2]
    got = ax.guided_integrated_gradients(
        model, source, target, steps=4, fraction=0.3, baseline="zeros", attribute_target=True
    )
    want = naive_guided_ig(model, source, target, 4, fraction=0.3, attribute_target=True)
    assert_close(got.values, want, rtol=1e-3)
    decoder = got.sel(side="target").values
    assert np.abs(decoder[~np.isnan(decoder)]).max() > 1e-3 * np.nanmax(np.abs(want))


def test_guided_ig_completeness_and_batches(models):
    model = models["llama"]
    sources, targets = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    batched = ax.guided_integrated_gradients(model, sources, targets, steps=64, chunk_size=2)
    total = batched.sum(("source", "hidden"))
    source_ids, target_ids = _naive.token_ids(model, *PAIRS[0])
    run = _naive.Runner(model, source_ids, target_ids)
    x = run.embeddings()
    pad = run.modules[0](torch.tensor([[model.pad_token_id]])).detach().expand_as(x[0])
    want = np.array([run.score(t, x, _naive.probability) - run.score(t, [pad], _naive.probability)
                     for t in run.targets()])  # fmt: skip
    gap = batched.completeness_gap.isel(example=0).values
    got = total.isel(example=0).values[~np.isnan(gap)]
    scale = np.abs(want).max()
    # the axiom: the path's own gap (left Riemann sums on a non-smooth path) is small, not zero
    np.testing.assert_allclose(got, want, rtol=0, atol=0.2 * scale)
    # the coordinate is that gap exactly: the sum minus f(x) - f(pad), scored by the runner
    np.testing.assert_allclose(gap[~np.isnan(gap)], got - want, rtol=0, atol=1e-4 * scale)
    every = float(abs(total).max())
    assert float(abs(batched.completeness_gap).max()) < 0.2 * every
    for i, (source, target) in enumerate(PAIRS):
        single = ax.guided_integrated_gradients(model, source, target, steps=64)
        row = batched.isel(example=i).sel(target=single.target, source=single.source)
        np.testing.assert_allclose(row.values, single.values, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# the API around them: pipe, dataset runs
# --------------------------------------------------------------------------------------------------
PATH_METHODS = {
    "guided_backprop": {},
    "deconvolution": {"activations": "relu"},
    "sequential_integrated_gradients": {"steps": 2},
    "guided_integrated_gradients": {"steps": 4},
    "discretized_integrated_gradients": {"steps": 3, "neighbours": 4},
}


@pytest.mark.parametrize("name", list(PATH_METHODS))
def test_pipe_and_dataset_runs(default_model, write_jsonl, tmp_path, name):
    method, options = getattr(ax, name), PATH_METHODS[name]
    raw = method(default_model, "1 2 =", " 2 1", **options)
    assert json.loads(raw.attrs["options"])["chunk_size"] == "auto"
    fused = ax.pipe(method, ax.l2_norm)(default_model, "1 2 =", " 2 1", **options)
    np.testing.assert_allclose(fused.values, ax.l2_norm(raw).values, rtol=1e-5, atol=1e-7)
    data = write_jsonl([{"input": "1 2 =", "target": " 2 1"}, {"input": "3 =", "target": " 3"}])
    run = ax.attribute_dataset(
        default_model, data, tmp_path / name, method=name, progress=False, **options
    )
    assert run.records == 2
    first = ax.load_dataset_results(tmp_path / name).isel(example=0)
    expected = ax.normalize(ax.l2_norm(raw))
    np.testing.assert_allclose(
        first.sel(target=expected.target, source=expected.source).values,
        expected.values,
        rtol=1e-4,
        atol=1e-6,
    )


# --------------------------------------------------------------------------------------------------
# discretized integrated gradients
# --------------------------------------------------------------------------------------------------
def naive_dig_path(table, word: int, base: int, special: bool, k: int, steps: int):
    """One token's path, as the DIG paper's code builds it, one token and one anchor at a time."""
    distances = torch.cdist(table.double(), table.double())
    distances.fill_diagonal_(float("inf"))

    def monotonic(anchor, b, point):
        return (
            ((b > point) & (b >= anchor) & (anchor >= point))
            | ((b < point) & (b <= anchor) & (anchor <= point))
            | ((b == point) & (b == anchor))
        )

    def project(anchor, b, point):
        keep = monotonic(anchor, b, point)
        return torch.where(keep, anchor, point - (point - b) / steps)

    path = [word]
    for _ in range(steps - 2):
        current = path[-1]
        if special:
            path.append(word)
            continue
        if current == base:
            path.append(base)
            continue
        near = distances[current].argsort()[:k].tolist()
        options = [a for a in near if a not in path and a != base]
        if not options:
            path.append(base)
            continue
        scores = [
            float((table[a] - project(table[a], table[base], table[current])).norm())
            for a in options
        ]
        path.append(options[int(np.argmin(scores))])
    points = [table[word]]
    for anchor in path[1:]:
        points.append(project(table[anchor], table[base], points[-1]))
    points.append(table[base])
    return points[::-1]


def naive_dig(
    model, source, target, steps, k, attribute_target=False, baseline="pad"
) -> np.ndarray:
    """``[target, source(+decoder), hidden]``: every token's path (each side through its own
    embedding module's table), one backward per target and path point; future NaN. Each path
    starts at the ``baseline`` token (``"pad"`` or ``"unk"``), EOS tokens at EOS."""
    tok = model.tokenizer
    special = set(tok.all_special_ids)
    start = {"pad": model.pad_token_id, "unk": tok.unk_token_id}[baseline]
    source_ids, target_ids = _naive.token_ids(model, source, target)
    run = _naive.Runner(model, source_ids, target_ids)
    x = run.embeddings()
    sides = [run.ids] + ([run.decoder_ids] if attribute_target else [])
    paths = []  # per side: [steps, L, H]
    for side, ids in enumerate(sides):
        table = run.modules[side].weight.detach()
        per_token = [
            naive_dig_path(table, w, w if w == tok.eos_token_id else start, w in special, k, steps)
            for w in ids[0].tolist()
        ]
        paths.append(torch.stack([torch.stack(p) for p in per_token], dim=1))
    rows = []
    for index, t in enumerate(run.targets()):
        out = [torch.zeros_like(xi[0]) for xi in x[: len(sides)]]
        for j in range(steps - 1):
            points = [p[j][None] for p in paths] + x[len(sides) :]
            grads = run.gradients(points, _naive.probability, None)[index]
            out = [o + g * (p[j + 1] - p[j]) for o, g, p in zip(out, grads, paths, strict=False)]
        row = torch.cat(out).numpy().astype(np.float64)
        _naive.future_to_nan(row, model, t, len(source_ids), attribute_target)
        rows.append(row)
    return np.stack(rows)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bart"])
def test_dig_equals_naive_loop(models, arch):
    model = models[arch]
    source, target = PAIRS[2]
    got = ax.discretized_integrated_gradients(model, source, target, steps=5, neighbours=6)
    assert_close(got.values, naive_dig(model, source, target, 5, 6))


@pytest.mark.parametrize(("arch", "attribute_target"), [("gpt2", False), ("bart", True)])
def test_dig_forward_mode_equals_the_naive_loop_summed_over_hidden(models, arch, attribute_target):
    # each point's path increment is a direction: one jvp per source token gives every target
    model = models[arch]
    source, target = PAIRS[2]
    options = dict(steps=5, neighbours=6, attribute_target=attribute_target, reduce_hidden="sum")
    forward = ax.discretized_integrated_gradients(model, source, target, mode="forward", **options)
    want = naive_dig(model, source, target, 5, 6, attribute_target).sum(-1)
    assert_close(forward.values, want)


def test_dig_batched_equals_single_and_completeness(models):
    model = models["gpt2"]
    sources, targets = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    batched = ax.discretized_integrated_gradients(model, sources, targets, steps=6, neighbours=8)
    for i, (source, target) in enumerate(PAIRS):
        single = ax.discretized_integrated_gradients(model, source, target, steps=6, neighbours=8)
        row = batched.isel(example=i).sel(target=single.target, source=single.source)
        np.testing.assert_allclose(row.values, single.values, rtol=1e-5, atol=1e-7)
        total = single.sum(("source", "hidden")).values
        # completeness_gap is the sum minus f(x) - f(x'): check it against the naive runner
        source_ids, target_ids = _naive.token_ids(model, source, target)
        run = _naive.Runner(model, source_ids, target_ids)
        x = run.embeddings()
        base = torch.where(
            run.ids == model.tokenizer.eos_token_id,
            run.ids,
            torch.full_like(run.ids, model.pad_token_id),
        )
        b = [run.modules[0](base).detach()]
        delta = [run.score(t, x, _naive.probability) - run.score(t, b, _naive.probability)
                 for t in run.targets()]  # fmt: skip
        np.testing.assert_allclose(single.completeness_gap.values, total - delta, atol=1e-6)


@pytest.mark.parametrize(("arch", "attribute_target"), [("llama", False), ("bart", True)])
def test_dig_unk_baseline_equals_naive_loop(models, arch, attribute_target):
    # every path starts at the unk token's embedding (EOS at EOS); unk is neither pad nor EOS
    model = models[arch]
    tok = model.tokenizer
    assert tok.unk_token_id not in (model.pad_token_id, tok.eos_token_id)
    source, target = PAIRS[2]
    options = dict(steps=4, neighbours=5, attribute_target=attribute_target)
    got = ax.discretized_integrated_gradients(model, source, target, baseline="unk", **options)
    want = naive_dig(model, source, target, 4, 5, attribute_target, baseline="unk")
    assert_close(got.values, want)
    pad = ax.discretized_integrated_gradients(model, source, target, **options)
    assert not np.allclose(got.values[~np.isnan(want)], pad.values[~np.isnan(want)], atol=1e-6)
    # completeness_gap: the sum minus f(x) - f(x'), x' the unk embedding (EOS kept), scored here
    source_ids, target_ids = _naive.token_ids(model, source, target)
    run = _naive.Runner(model, source_ids, target_ids)
    x = run.embeddings()
    sides = [run.ids, run.decoder_ids][: 2 if attribute_target else 1]
    bases = [
        run.modules[s](torch.where(ids == tok.eos_token_id, ids, tok.unk_token_id)).detach()
        for s, ids in enumerate(sides)
    ]
    bases += x[len(bases) :]
    delta = [run.score(t, x, _naive.probability) - run.score(t, bases, _naive.probability)
             for t in run.targets()]  # fmt: skip
    total = got.sum(("source", "hidden")).values
    np.testing.assert_allclose(got.completeness_gap.values, total - delta, atol=1e-6)


def test_nearest_neighbours_exact(models):
    from attrax._discrete import nearest_neighbours

    table = models["t5"].hf.get_input_embeddings().weight.detach()
    got = nearest_neighbours(table, 7, rows=100)
    distances = torch.cdist(table.double(), table.double())
    distances.fill_diagonal_(float("inf"))
    assert torch.equal(got, distances.argsort(dim=-1, stable=True)[:, :7])


@pytest.mark.parametrize("arch", ["t5", "marian"])
def test_dig_attributes_the_decoder_side(models, arch):
    # the decoder prefix walks its own paths (its own table, start token and EOS kept)
    model = models[arch]
    da = ax.discretized_integrated_gradients(
        model, *PAIRS[0], steps=4, neighbours=5, attribute_target=True
    )
    assert set(da.indexes["source"].names) >= {"side"}
    want = naive_dig(model, *PAIRS[0], 4, 5, attribute_target=True)
    assert_close(da.values, want)
    decoder = da.sel(side="target").values
    assert np.abs(decoder[~np.isnan(decoder)]).max() > 1e-3 * np.nanmax(np.abs(want))


@pytest.mark.parametrize("name", ["guided_backprop", "sequential_integrated_gradients"])
def test_cli_runs_them(name, capsys):
    from attrax.cli import main

    steps = ["--steps", "2"] if "integrated" in name else []
    argv = ["attribute", "--method", name, "--input", "1 2 =", "--target", " 2 1", *steps]
    assert main(argv) == 0
    assert "target" in capsys.readouterr().out


def target_gradient(run, points, t: int, sides: int) -> list[torch.Tensor]:
    """Target ``t``'s gradients ``[1, L, H]`` w.r.t. the first ``sides`` points: one backward
    of that target alone (``_naive.Runner.gradients`` takes every target's)."""
    leaves = [p.clone().requires_grad_(True) for p in points[:sides]]
    logits = run.logits(leaves + list(points[sides:]))
    score = _naive.probability(logits[t - 1], run.sequence[t])
    return list(torch.autograd.grad(score, leaves))


def test_dig_default_neighbours_fit_a_small_vocabulary(default_model):
    # Inseq's 50 neighbours, or every other entry of a smaller vocabulary (the built-in has 13)
    vocabulary = default_model.hf.get_input_embeddings().weight.shape[0]
    assert vocabulary - 1 < 50
    got = ax.discretized_integrated_gradients(default_model, "1 2 3 =", " 3 2 1", steps=4)
    want = naive_dig(default_model, "1 2 3 =", " 3 2 1", 4, vocabulary - 1)
    assert_close(got.values, want)
    with pytest.raises(ax.OptionError, match="positive integer or None, got 0"):
        ax.discretized_integrated_gradients(default_model, "1 2 =", " 2 1", neighbours=0)


def test_dig_refuses_paths_that_cannot_fit_before_building_them():
    """Every token's path of ``steps`` points is held through the call: too many steps for the
    free memory, or for ``max_memory``, is an OptionError at once (it built the paths first)."""
    model = ax.load_model()
    with pytest.raises(ax.OptionError, match=r"`steps`=100000000 needs .* free on"):
        ax.discretized_integrated_gradients(model, "1 2 3 =", " 3 2 1", steps=10**8)
    with pytest.raises(ax.OptionError, match=r"`max_memory` of 200 MB cannot be met: .* give at"):
        ax.discretized_integrated_gradients(
            model, "1 2 3 =", " 3 2 1", steps=10**6, max_memory="200MB"
        )
