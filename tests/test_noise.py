"""GradientSHAP, SquareGrad, VarGrad, feature ablation, Shapley value sampling and Sobol indices,
each against a plain loop written here (one backward or forward per target, sample, group), with
the random draws rebuilt here from each method's documented seeding rule."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import attrax as ax
from attrax.testing import tiny_classifier
from tests import _naive
from tests.conftest import PAIRS


def close(got, want: np.ndarray, rtol: float = 1e-4) -> None:
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape
    assert np.array_equal(np.isnan(got), np.isnan(want)), "NaN (future/padding) pattern differs"
    finite = ~np.isnan(want)
    scale = np.abs(want[finite]).max()
    np.testing.assert_allclose(got[finite], want[finite], rtol=rtol, atol=rtol * scale)


def future_nan(model, run, source_ids, rows: np.ndarray, attributed: int) -> np.ndarray:
    for k, t in enumerate(run.targets()):
        if not model.is_encoder_decoder:
            rows[k, t:] = np.nan
        elif attributed == 2:
            rows[k, len(source_ids) + t :] = np.nan
    return rows


# --------------------------------------------------------------------------------------------
# gradient methods
# --------------------------------------------------------------------------------------------
def naive_gradient_shap(model, source, target, base, samples, stdevs, seed, attributed):
    """Expected gradients: one backward per target and draw; draws rebuilt from the documented
    rule (randint, rand, randn per side from one generator seeded with ``seed``)."""
    source_ids, target_ids = _naive.token_ids(model, source, target)
    run = _naive.Runner(model, source_ids, target_ids)
    x = run.embeddings()
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(len(base), (samples,), generator=g)
    alpha = torch.rand(samples, generator=g)
    noise = [torch.randn((samples, *xi.shape[1:]), generator=g) for xi in x[:attributed]]
    targets = run.targets()
    totals = [[torch.zeros_like(xi[0]) for xi in x[:attributed]] for _ in targets]
    for i in range(samples):
        points, deltas = list(x), []
        for side in range(attributed):
            b = base[int(index[i])][side].expand_as(x[side])
            noisy = x[side] + stdevs * noise[side][i][None]
            points[side] = b + alpha[i] * (noisy - b)
            deltas.append((noisy - b)[0])
        for k, grads in enumerate(run.gradients(points, _naive.probability, None)):
            totals[k] = [
                t + d * gr / samples for t, d, gr in zip(totals[k], deltas, grads, strict=True)
            ]
    rows = np.stack([torch.cat(t, dim=0).numpy() for t in totals]).astype(np.float64)
    return future_nan(model, run, source_ids, rows, attributed)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "marian"])
def test_gradient_shap_equals_naive_loop(models, arch):
    model = models[arch]
    attributed = 2 if model.is_encoder_decoder else 1
    hidden = model.hf.config.d_model if model.is_encoder_decoder else None
    hidden = hidden or model.hf.get_input_embeddings().weight.shape[1]
    own = torch.randn(hidden, generator=torch.Generator().manual_seed(7))
    base = [[torch.zeros(1, 1, hidden)] * attributed, [own.view(1, 1, -1)] * attributed]
    given = ["zeros", tuple(own.view(1, 1, -1) for _ in range(attributed))]
    if attributed == 1:
        given = ["zeros", own.view(1, 1, -1)]
    got = ax.gradient_shap(
        model, *PAIRS[0], baselines=given, samples=4, stdevs=0.05, seed=3,
        attribute_target=attributed == 2,
    )  # fmt: skip
    want = naive_gradient_shap(model, *PAIRS[0], base, 4, 0.05, 3, attributed)
    assert got.dims == ("target", "source", "hidden")
    close(got.values, want)


def pad_embeddings(model, source, target, attributed) -> list[torch.Tensor]:
    """``[1, 1, H]`` per attributed side: that side's embedding module run on the pad token."""
    run = _naive.Runner(model, *_naive.token_ids(model, source, target))
    with torch.no_grad():
        pad = torch.tensor([[model.pad_token_id]])
        return [run.modules[s](pad) for s in range(attributed)]


@pytest.mark.parametrize("arch", ["llama", "t5"])  # BART's, Marian's pad embeddings are zeros
def test_gradient_shap_default_pad_baseline_equals_naive_loop(models, arch):
    # the default baselines: zeros and each side's own pad embedding, drawn uniformly
    model = models[arch]
    attributed = 2 if model.is_encoder_decoder else 1
    source, target = PAIRS[1]
    options = dict(samples=6, stdevs=0.05, seed=4, attribute_target=attributed == 2)
    pad = pad_embeddings(model, source, target, attributed)
    zeros = [torch.zeros_like(p) for p in pad]
    got = ax.gradient_shap(model, source, target, **options)
    want = naive_gradient_shap(model, source, target, [zeros, pad], 6, 0.05, 4, attributed)
    close(got.values, want)
    # the pad baseline alone (one baseline, not a list): every draw starts from it
    alone = ax.gradient_shap(model, source, target, baselines="pad", **options)
    want_pad = naive_gradient_shap(model, source, target, [pad], 6, 0.05, 4, attributed)
    close(alone.values, want_pad)
    zero = naive_gradient_shap(model, source, target, [zeros], 6, 0.05, 4, attributed)
    finite = ~np.isnan(want_pad)
    assert not np.allclose(want_pad[finite], zero[finite], rtol=1e-2, atol=0), "pad == zeros?"


def test_gradient_shap_per_position_tensor_baseline_equals_naive_loop(models):
    # one tensor baseline, not a list, with a vector per position (no broadcast over length)
    model = models["llama"]
    source, target = PAIRS[0]
    run = _naive.Runner(model, *_naive.token_ids(model, source, target))
    shape = run.embeddings()[0].shape
    own = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    got = ax.gradient_shap(model, source, target, baselines=own, samples=3, stdevs=0.1, seed=2)
    close(got.values, naive_gradient_shap(model, source, target, [[own]], 3, 0.1, 2, 1))


def naive_noise_moments(model, source, target, samples, noise, seed):
    """Per-target mean and mean square of SmoothGrad's noisy gradients (decoder side not
    attributed), with the noise drawn as ``ax.smoothgrad`` documents it."""
    source_ids, target_ids = _naive.token_ids(model, source, target)
    run = _naive.Runner(model, source_ids, target_ids)
    x = run.embeddings()
    draws = torch.randn((samples, *x[0].shape[1:]), generator=torch.Generator().manual_seed(seed))
    spread = x[0].max() - x[0].min()
    first = second = 0.0
    for i in range(samples):
        points = [x[0] + noise * spread * draws[i][None], *x[1:]]
        grads = torch.stack([g[0] for g in run.gradients(points, _naive.probability, None)])
        first, second = first + grads / samples, second + grads**2 / samples
    return [future_nan(model, run, source_ids, m.double().numpy(), 1) for m in (first, second)]


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_squaregrad_and_vargrad_equal_naive_loop(models, arch):
    model = models[arch]
    mean, square = naive_noise_moments(model, *PAIRS[1], 4, 0.1, 5)
    options = dict(samples=4, noise=0.1, seed=5)
    close(ax.squaregrad(model, *PAIRS[1], **options).values, square)
    close(ax.vargrad(model, *PAIRS[1], **options).values, square - mean**2, rtol=1e-3)


def test_vargrad_is_squaregrad_minus_squared_smoothgrad(models):
    model, options = models["llama"], dict(samples=5, noise=0.2, seed=1)
    mean = ax.smoothgrad(model, *PAIRS[0], **options)
    square = ax.squaregrad(model, *PAIRS[0], **options)
    variance = ax.vargrad(model, *PAIRS[0], **options)
    np.testing.assert_allclose(
        variance, square - mean**2, rtol=1e-4, atol=1e-6 * float(square.max())
    )
    assert bool((variance.fillna(0) >= -1e-6 * float(square.max())).all())
    # one draw, or no noise: no variance, refused (an all-zero array until 2026-12-05); the
    # square of the gradient
    one = dict(samples=1, noise=0.0)
    with pytest.raises(ax.OptionError, match="`samples` must be an integer of at least 2, got 1"):
        ax.vargrad(model, *PAIRS[0], samples=1)
    with pytest.raises(ax.OptionError, match="`noise` must be a positive number, got 0"):
        ax.vargrad(model, *PAIRS[0], noise=0.0)
    sal = ax.saliency(model, *PAIRS[0])
    np.testing.assert_allclose(ax.squaregrad(model, *PAIRS[0], **one), sal**2, rtol=1e-5)


GRADIENT_BATCHED = [
    ("gpt2", "gradient_shap"),
    ("marian", "gradient_shap"),
    ("gpt2", "vargrad"),
    ("t5", "squaregrad"),
]


@pytest.mark.parametrize(("arch", "method"), GRADIENT_BATCHED)
def test_gradient_methods_batched_equal_single(models, arch, method):
    model = models[arch]
    options = dict(samples=3, seed=2, attribute_target=model.is_encoder_decoder)
    if method == "gradient_shap":
        options["stdevs"] = 0.05
    fn = getattr(ax, method)
    batched = fn(model, [p[0] for p in PAIRS], [p[1] for p in PAIRS], **options)
    for i, pair in enumerate(PAIRS):
        single = fn(model, *pair, **options)
        row = batched.isel(example=i).sel(target=single.target, source=single.source)
        np.testing.assert_allclose(row.values, single.values, rtol=1e-5, atol=1e-7)


def test_gradient_shap_forward_mode_equals_reverse(models):
    model = models["llama"]
    options = dict(samples=3, stdevs=0.1, reduce_hidden="sum")
    forward = ax.gradient_shap(model, *PAIRS[0], mode="forward", **options)
    reverse = ax.gradient_shap(model, *PAIRS[0], mode="reverse", **options)
    np.testing.assert_allclose(forward, reverse, rtol=1e-4, atol=1e-7)
    with pytest.raises(ax.OptionError, match="has none"):
        ax.vargrad(model, *PAIRS[0], samples=2, reduce_hidden="sum", mode="forward")


@pytest.mark.parametrize("method", ["gradient_shap", "deeplift_shap"])
def test_a_lone_tuple_of_one_tensor_per_side_is_one_baseline(models, method):
    """With both sides attributed a lone tensor is no baseline, so a tuple of two tensors is one
    per-side baseline (the docstring's "or one of them"); it was refused as two baselines. With
    one side, a tuple of tensors is still a list of baselines."""
    fn, t5, llama = getattr(ax, method), models["t5"], models["llama"]
    g = torch.Generator().manual_seed(3)
    source, decoder = (torch.randn(1, 1, t5.hidden_size, generator=g) for _ in range(2))
    options = dict(samples=3, attribute_target=True)
    alone = fn(t5, *PAIRS[0], baselines=(source, decoder), **options)
    listed = fn(t5, *PAIRS[0], baselines=[(source, decoder)], **options)
    np.testing.assert_array_equal(alone.values, listed.values)
    two = fn(llama, *PAIRS[0], baselines=(source, decoder), samples=3)
    np.testing.assert_array_equal(
        two.values, fn(llama, *PAIRS[0], baselines=[source, decoder], samples=3).values
    )
    assert not np.allclose(
        two.values, fn(llama, *PAIRS[0], baselines=[source], samples=3).values, equal_nan=True
    )


def test_gradient_shap_options_are_checked(models):
    with pytest.raises(ax.OptionError, match="baselines"):
        ax.gradient_shap(models["gpt2"], *PAIRS[0], baselines=["zeros", "nope"])
    with pytest.raises(ax.OptionError, match="stdevs"):
        ax.gradient_shap(models["gpt2"], *PAIRS[0], stdevs=-1.0)


# --------------------------------------------------------------------------------------------
# perturbation methods
# --------------------------------------------------------------------------------------------
class Game:
    """The objective of every target for a token mask (1 keeps, 0 puts the zero baseline, soft
    values interpolate), one plain forward per mask; source side only."""

    def __init__(self, model, source: str, target: str) -> None:
        self.model = model
        self.source_ids, target_ids = _naive.token_ids(model, source, target)
        self.run = _naive.Runner(model, self.source_ids, target_ids)
        self.x = self.run.embeddings()

    def __call__(self, mask) -> np.ndarray:
        m = torch.as_tensor(np.asarray(mask, dtype=np.float32))[None, :, None]
        points = [self.x[0] * m, *self.x[1:]]
        with torch.no_grad():
            logits = self.run.logits(points)
        seq = self.run.sequence
        return np.array(
            [float(_naive.probability(logits[t - 1], seq[t])) for t in self.run.targets()]
        )

    @property
    def width(self) -> int:
        return self.x[0].shape[1]

    def nan_future(self, rows: np.ndarray) -> np.ndarray:
        return future_nan(self.model, self.run, self.source_ids, rows, 1)


def group_mask(groups: list[int], kept: set[int]) -> list[float]:
    return [1.0 if g in kept else 0.0 for g in groups]


def naive_feature_ablation(game: Game, groups: list[int]) -> np.ndarray:
    full = game(np.ones(game.width))
    ids = sorted(set(groups))
    drops = {g: full - game(group_mask(groups, set(ids) - {g})) for g in ids}
    return game.nan_future(np.stack([drops[g] for g in groups], axis=1))


def naive_shapley(game: Game, groups: list[int], orders: list[list[int]]) -> np.ndarray:
    ids = sorted(set(groups))
    phi = {g: 0.0 for g in ids}
    for order in orders:
        kept: set[int] = set()
        before = game(group_mask(groups, kept))
        for g in order:
            kept.add(g)
            after = game(group_mask(groups, kept))
            phi[g] = phi[g] + (after - before) / len(orders)
            before = after
    return game.nan_future(np.stack([phi[g] for g in groups], axis=1))


def exact_shapley(game: Game, players: int) -> np.ndarray:
    """Shapley values by enumerating every coalition (textbook weights)."""
    phi = []
    for i in range(players):
        others = [j for j in range(players) if j != i]
        total = 0.0
        for size in range(players):
            weight = math.factorial(size) * math.factorial(players - size - 1)
            weight /= math.factorial(players)
            for coalition in itertools.combinations(others, size):
                with_i = group_mask(list(range(players)), {*coalition, i})
                without = group_mask(list(range(players)), set(coalition))
                total = total + weight * (game(with_i) - game(without))
        phi.append(total)
    return np.stack(phi, axis=1)


@pytest.mark.parametrize("arch", ["gpt2", "marian"])
def test_feature_ablation_equals_naive_loop(models, arch):
    model = models[arch]
    game = Game(model, *PAIRS[0])
    groups = [i // 2 for i in range(game.width)]  # pairs of tokens
    got = ax.feature_ablation(model, *PAIRS[0], groups=torch.tensor(groups))
    close(got.values, naive_feature_ablation(game, groups))
    tokens = ax.feature_ablation(model, *PAIRS[0])
    close(tokens.values, ax.occlusion(model, *PAIRS[0]).values.astype(np.float64), rtol=1e-6)


def test_word_groups_follow_merge_subwords(models):
    model = models["gpt2"]
    pair = ("The capitalisation of Francophones", " is unremarkable")
    got = ax.feature_ablation(model, *pair, groups="word")
    words = ax.merge_subwords(got, "mean", "source")
    starts = [*words.source.values.tolist(), got.sizes["source"]]
    assert len(starts) - 1 < got.sizes["source"], "the pair must have multi-token words"
    groups = np.zeros(got.sizes["source"], dtype=np.int64)
    for w, (a, b) in enumerate(itertools.pairwise(starts)):
        groups[a:b] = w
    explicit = ax.feature_ablation(model, *pair, groups=torch.tensor(groups))
    np.testing.assert_allclose(got.values, explicit.values, rtol=1e-6, atol=1e-9)
    game = Game(model, *pair)
    close(got.values, naive_feature_ablation(game, groups.tolist()))


@pytest.mark.parametrize("task", ["sequence", "token", "question-answering"])
def test_a_classifiers_word_groups_follow_merge_subwords_and_a_naive_loop(task):
    # a classifier's targets are classes (token positions, answer slots), not tokens: its
    # groups are its input's words alone (once, its targets were read as more tokens)
    hf, tok = tiny_classifier("bert", task)
    model = ax.load_model(hf, tokenizer=tok)
    item = (
        ("who was it", "the plot was good") if task == "question-answering" else "the plot was good"
    )
    got = ax.feature_ablation(model, item, groups="word", objective="logit")
    words = ax.merge_subwords(got, "mean", "source")
    starts = [*words.source.values.tolist(), got.sizes["source"]]
    assert len(starts) - 1 < got.sizes["source"], "the input must have multi-token words"
    enc = tok(*(item if isinstance(item, tuple) else (item,)), return_tensors="pt")
    table = hf.get_input_embeddings()

    def logits(zeroed: list[int]) -> np.ndarray:
        def hook(_module, _args, out):
            out = out.clone()
            out[:, zeroed] = 0.0  # the zeros baseline on those tokens' word embeddings
            return out

        handle = table.register_forward_hook(hook)
        try:
            with torch.no_grad():
                out = hf(**enc)
        finally:
            handle.remove()
        if task == "question-answering":
            return torch.stack((out.start_logits, out.end_logits), 1)[0].numpy()
        return out.logits[0].numpy()

    full = logits([])
    for a, b in itertools.pairwise(starts):
        drop = full - logits(list(range(a, b)))
        for k in range(got.sizes["target"]):
            row = got.isel(target=k)
            cls = int(row.target_class) if "target_class" in row.coords else None
            if task == "sequence":
                want = drop[cls]
            elif task == "token":
                want = drop[int(row.target.item()), cls]
            else:
                want = drop[k, int(row.target_position)]
            np.testing.assert_allclose(row.values[a:b], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_shapley_sampling_with_given_orders_equals_naive_loop(models, arch):
    model = models[arch]
    game = Game(model, *PAIRS[2])
    groups = [i // 2 for i in range(game.width)]
    n = max(groups) + 1
    g = torch.Generator().manual_seed(11)
    orders = torch.stack([torch.randperm(n, generator=g) for _ in range(3)])
    got = ax.shapley_sampling(model, *PAIRS[2], permutations=orders, groups=torch.tensor(groups))
    close(got.values, naive_shapley(game, groups, orders.tolist()))


def test_shapley_sampling_seeded_orders_follow_the_documented_rule(models):
    model = models["llama"]
    game = Game(model, *PAIRS[0])
    features = game.width - 1  # decoder-only: the last token is seen by no target
    g = torch.Generator().manual_seed(9)
    keys = torch.rand((2, features), generator=g, dtype=torch.float64)
    orders = [keys[p].argsort().tolist() for p in range(2)]
    got = ax.shapley_sampling(model, *PAIRS[0], permutations=2, seed=9)
    groups = list(range(game.width))
    orders = [[*o, features] for o in orders]
    close(got.values, naive_shapley(game, groups, orders))


def test_shapley_sampling_with_every_order_is_exact_shapley(models):
    """4 players: the 24 orders give the Shapley values that enumeration gives."""
    model = models["marian"]
    source, target = "a b c", " x y"
    game = Game(model, source, target)
    assert game.width == 4
    orders = torch.tensor(list(itertools.permutations(range(4))))
    got = ax.shapley_sampling(model, source, target, permutations=orders)
    close(got.values, exact_shapley(game, 4), rtol=1e-5)
    # efficiency: each target's values sum to f(x) - f(baseline)
    totals = got.sum("source").values
    close(totals, game(np.ones(4)) - game(np.zeros(4)), rtol=1e-5)


def test_shapley_sampling_is_efficient_with_random_orders(models):
    model = models["gpt2"]
    game = Game(model, *PAIRS[1])
    got = ax.shapley_sampling(model, *PAIRS[1], permutations=3, seed=1)
    full = game(np.ones(game.width))
    for k, t in enumerate(game.run.targets()):
        mask = (np.arange(game.width) >= t).astype(float)  # the future keeps x: it is unseen
        want = full[k] - game(mask)[k]
        np.testing.assert_allclose(float(got.isel(target=k).sum()), want, rtol=1e-4, atol=1e-7)


def naive_sobol(game: Game, features: int, samples: int, seed: int) -> np.ndarray:
    """Jansen's total indices from the documented designs (scrambled Sobol, 2 x features)."""
    draw = torch.quasirandom.SobolEngine(2 * features, scramble=True, seed=seed).draw(samples)
    a, b = draw[:, :features].double().numpy(), draw[:, features:].double().numpy()
    pad = np.ones(game.width - features)  # tokens no target sees are kept
    f_a = np.stack([game(np.r_[row, pad]) for row in a])
    f_b = np.stack([game(np.r_[row, pad]) for row in b])
    variance = np.concatenate([f_a, f_b]).var(axis=0)
    out = []
    for i in range(features):
        c = a.copy()
        c[:, i] = b[:, i]
        f_c = np.stack([game(np.r_[row, pad]) for row in c])
        out.append(((f_a - f_c) ** 2).mean(axis=0) / 2 / variance)
    out += [np.zeros_like(variance)] * (game.width - features)
    return game.nan_future(np.stack(out, axis=1))


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_sobol_equals_naive_loop(models, arch):
    model = models[arch]
    game = Game(model, *PAIRS[0])
    features = game.width - (0 if model.is_encoder_decoder else 1)
    got = ax.sobol(model, *PAIRS[0], samples=8, seed=4)
    close(got.values, naive_sobol(game, features, 8, 4), rtol=1e-3)


PERTURBATION_BATCHED = [
    ("gpt2", "feature_ablation", {"groups": "word"}),
    ("bart", "shapley_sampling", {"permutations": 2}),
    ("gpt2", "shapley_sampling", {"permutations": 2, "groups": "word"}),
    ("llama", "sobol", {"samples": 4}),
    ("marian", "sobol", {"samples": 4, "attribute_target": True}),
]


@pytest.mark.parametrize(("arch", "method", "options"), PERTURBATION_BATCHED)
def test_perturbation_methods_batched_equal_single(models, arch, method, options):
    model, fn = models[arch], getattr(ax, method)
    batched = fn(model, [p[0] for p in PAIRS], [p[1] for p in PAIRS], **options)
    for i, pair in enumerate(PAIRS):
        single = fn(model, *pair, **options)
        row = batched.isel(example=i).sel(target=single.target, source=single.source)
        # Sobol indices are ratios of variances of float32 objectives: padding's rounding shows
        if method == "sobol":
            rtol, atol = 1e-3, 1e-5 * float(np.nanmax(np.abs(single.values)))
        else:  # differences of probabilities: float32 logits move each p by ~1e-6 of itself
            game = Game(model, *pair)
            rtol, atol = 1e-5, 1e-5 * float(game(np.ones(game.width)).max())
        np.testing.assert_allclose(row.values, single.values, rtol=rtol, atol=atol)


def test_permutations_are_checked(models):
    model = models["gpt2"]
    with pytest.raises(ax.OptionError, match="permutation"):
        ax.shapley_sampling(model, *PAIRS[0], permutations=torch.tensor([[0, 0, 1]]))
    with pytest.raises(ax.InputError, match="orders 2 groups"):
        ax.shapley_sampling(model, *PAIRS[0], permutations=torch.tensor([[1, 0]]))
    with pytest.raises(ax.OptionError, match="groups"):
        ax.sobol(model, *PAIRS[0], groups="sentence")


# --------------------------------------------------------------------------------------------
# every surface: API, ax.pipe, the CLI, dataset runs
# --------------------------------------------------------------------------------------------
NEW = {
    "gradient_shap": {"samples": 2},
    "squaregrad": {"samples": 2},
    "vargrad": {"samples": 2},
    "feature_ablation": {"groups": "word"},
    "shapley_sampling": {"permutations": 2},
    "sobol": {"samples": 4},
}


@pytest.mark.parametrize("method", list(NEW))
def test_every_surface_runs_the_new_methods(default_model, tmp_path, write_jsonl, method):
    from attrax.cli import main

    direct = getattr(ax, method)(default_model, "1 2 3 =", " 3 2 1", **NEW[method])
    piped = ax.pipe(getattr(ax, method), ax.normalize)(
        default_model, "1 2 3 =", " 3 2 1", **NEW[method]
    )
    np.testing.assert_allclose(piped.values, ax.normalize(direct).values, rtol=1e-5, atol=1e-7)
    options = [arg for k, v in NEW[method].items() for arg in ("-o", f"{k}={v}")]
    args = ["attribute", "--input", "1 2 3 =", "--target", " 3 2 1", "--method", method]
    assert main([*args, *options, "--out", str(tmp_path / "a.nc")]) == 0
    data = write_jsonl(
        [{"input": "1 2 3 =", "target": " 3 2 1"}, {"input": "4 5 =", "target": " 5 4"}]
    )
    ax.attribute_dataset(
        default_model, data, tmp_path / "run", method=method, progress=False, **NEW[method]
    )
    stored = ax.load_dataset_results(tmp_path / "run")
    assert stored.sizes["example"] == 2
    # a dataset run stores the method's own values (with the options given), l2-reduced over
    # hidden where there is one, then normalized
    expected = ax.normalize(ax.l2_norm(direct) if "hidden" in direct.dims else direct)
    first = stored.isel(example=0).sel(target=expected.target, source=expected.source)
    np.testing.assert_allclose(first.values, expected.values, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["smoothgrad", "gradient_shap", "pgd"])
def test_one_seed_draws_the_same_whatever_the_models_dtype(method):
    """The draws are made in float32, then cast: a float64 copy of a model gets the float32
    model's noise, so the attributions agree to float32's rounding (a float64 model drew
    another stream until 2026-12-06: SmoothGrad's correlated 0.19 with float32's)."""
    from attrax.testing import tiny_model

    hf, tok = tiny_model("llama")
    single = ax.load_model(hf, tokenizer=tok)
    double = ax.load_model(tiny_model("llama")[0].double(), tokenizer=tok)
    source, target = PAIRS[0]
    options = {"seed": 3} if method == "pgd" else {"samples": 4, "seed": 3}
    a = getattr(ax, method)(single, source, target, **options).values
    b = getattr(ax, method)(double, source, target, **options).values
    scale = np.nanmax(np.abs(b))
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * scale)


def test_groups_that_leave_nothing_to_perturb_are_refused(default_model):
    """Groups only on tokens no target sees (the last token, or -1 everywhere) gave torch's
    index error, and an example of a batch without groups Sobol's dimension error (until
    2026-12-06)."""
    prompt, target = "1 2 3 =", " 3 2 1"
    width = len(ax.saliency(default_model, prompt, target).source)
    message = r"`groups` leaves no group of tokens the targets see"
    with pytest.raises(ax.InputError, match=message):
        ax.feature_ablation(
            default_model, prompt, target, groups=torch.tensor([-1] * (width - 1) + [0])
        )
    with pytest.raises(ax.InputError, match=message):
        ax.shapley_sampling(default_model, prompt, target, groups=torch.full((width,), -1))
    rows = torch.tensor([[-1] * width, list(range(width))])
    with pytest.raises(ax.InputError, match=message + r" \(example 0\)"):
        ax.sobol(default_model, [prompt, prompt], [target, target], samples=4, groups=rows)
