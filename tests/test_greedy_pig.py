"""Greedy PIG against a plain loop: per target, per round, per quadrature node, one backward each."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import attrax as ax
from tests import _naive
from tests.conftest import PAIRS, assert_close


def greedy_loop(
    emb, base, gradient, score, visible, rounds, per_round, steps, rule="gausslegendre"
):
    """One target's Greedy PIG, written from the algorithm: ``(sum of rounds [L, H], sum over
    rounds of f(x) - f(b_r))``. ``gradient(point) -> [L, H]``, ``score(point) -> float``."""
    alphas, weights = _naive.quadrature_nodes(rule, steps)
    fixed: list[int] = []
    total = torch.zeros_like(emb)
    ends = 0.0
    for _ in range(rounds):
        start = base.clone()
        for i in fixed:
            start[i] = emb[i]
        grad = torch.zeros_like(emb)
        for a, w in zip(alphas, weights, strict=True):
            grad += w * gradient(start + a * (emb - start))
        attribution = grad * (emb - start)
        total += attribution
        ends += score(emb) - score(start)
        token = attribution.sum(-1)
        free = [i for i in visible if i not in fixed]
        fixed += sorted(free, key=lambda i: -float(token[i]))[:per_round]
    return total, ends


def naive_greedy(
    model,
    source,
    target,
    rounds,
    per_round,
    steps,
    rule="gausslegendre",
    baseline=None,
    attribute_target=False,
):
    """``[target, source(+decoder), hidden]`` and the per-target sums of ``f(x) - f(b_r)``.

    ``baseline``: per attributed side, broadcastable to ``[1, L, H]`` (None: zeros). With
    ``attribute_target`` the decoder prefix is attributed too: its tokens join the encoder's
    (one token list, sides concatenated), visible before the target's position."""
    source_ids, target_ids = _naive.token_ids(model, source, target)
    run = _naive.Runner(model, source_ids, target_ids)
    x = run.embeddings()
    sides = 2 if attribute_target else 1
    widths = [xi.shape[1] for xi in x[:sides]]
    emb = torch.cat([xi[0] for xi in x[:sides]])
    base = torch.zeros_like(emb)
    if baseline is not None:
        base = torch.cat([b.expand_as(xi)[0] for b, xi in zip(baseline, x, strict=False)])

    def split(point):
        return [p[None] for p in point.split(widths)] + x[sides:]

    rows, ends = [], []
    for t in run.targets():

        def gradient(point, t=t):
            return target_gradient(run, split(point), t, sides)

        def score(point, t=t):
            return run.score(t, split(point), _naive.probability)

        if not model.is_encoder_decoder:
            visible = list(range(t))
        else:
            decoder = [widths[0] + j for j in range(t)] if attribute_target else []
            visible = list(range(widths[0])) + decoder
        row, end = greedy_loop(emb, base, gradient, score, visible, rounds, per_round, steps, rule)
        row = row.numpy()
        _naive.future_to_nan(row, model, t, widths[0], attribute_target)
        rows.append(row)
        ends.append(end)
    return np.stack(rows), np.array(ends)


@pytest.mark.parametrize("arch", ["gpt2", "marian"])
def test_greedy_pig_equals_the_loop(doubles, arch):
    model = doubles[arch]
    source, target = PAIRS[0]
    da = ax.greedy_pig(model, source, target, rounds=3, per_round=1, steps=4)
    want, ends = naive_greedy(model, source, target, rounds=3, per_round=1, steps=4)
    assert_close(da.values, want)
    # the completeness gap is the sum against every round's f(x) - f(b_r), taken by the loop
    total = da.sum(("source", "hidden")).values
    np.testing.assert_allclose(da.completeness_gap.values, total - ends, atol=1e-9)


def test_greedy_pig_fixes_two_per_round_on_llama(doubles):
    model = doubles["llama"]
    source, target = PAIRS[1]
    da = ax.greedy_pig(model, source, target, rounds=2, per_round=2, steps=3, chunk_size=2)
    assert_close(da.values, naive_greedy(model, source, target, 2, 2, 3)[0])


def test_greedy_pig_equals_the_loop_on_a_classifier(doubles):
    model = doubles["bert"]
    text = "the capital of france is paris"
    da = ax.greedy_pig(model, text, "all", rounds=3, per_round=2, steps=3)
    tok, hf = model.tokenizer, model.hf
    ids = tok(text, return_tensors="pt")["input_ids"]
    emb = hf.get_input_embeddings()(ids)[0].detach()

    def probability(point, c):
        return torch.softmax(hf(inputs_embeds=point[None]).logits[0], -1)[c]

    for c in range(da.sizes["target"]):

        def gradient(point, c=c):
            point = point.clone().requires_grad_(True)
            return torch.autograd.grad(probability(point, c), point)[0]

        def score(point, c=c):
            with torch.no_grad():
                return float(probability(point, c))

        want, ends = greedy_loop(
            emb, torch.zeros_like(emb), gradient, score, range(emb.shape[0]), 3, 2, 3
        )
        assert_close(da.isel(target=c).values, want.numpy())
        gap = float(da.completeness_gap.isel(target=c))
        assert abs(gap - (float(da.isel(target=c).sum()) - ends)) < 1e-9


def test_pad_baseline_and_trapezoid_equal_the_loop(doubles):
    # the baseline and the rule reach every round (the later ones run outside the IG engine),
    # and every round's f(b_r) starts from the pad baseline
    model = doubles["llama"]
    source, target = "Hello", " world, café"
    kw = dict(steps=5, quadrature="riemann_trapezoid", baseline="pad")
    run = _naive.Runner(model, *_naive.token_ids(model, source, target))
    with torch.no_grad():
        pad = run.modules[0](torch.tensor([[model.pad_token_id]]))
    for rounds in (1, 2):
        pig = ax.greedy_pig(model, source, target, rounds=rounds, **kw)
        want, ends = naive_greedy(
            model, source, target, rounds, 1, 5, rule="riemann_trapezoid", baseline=[pad]
        )
        assert_close(pig.values, want)
        total = pig.sum(("source", "hidden")).values
        scale = float(np.abs(ends).max())
        np.testing.assert_allclose(pig.completeness_gap, total - ends, rtol=0, atol=1e-6 * scale)
    # one round is integrated gradients, gap included
    one = ax.greedy_pig(model, source, target, rounds=1, **kw)
    ig = ax.integrated_gradients(model, source, target, **kw)
    np.testing.assert_allclose(one.values, ig.values, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(one.completeness_gap, ig.completeness_gap, atol=1e-12)


def test_attribute_target_equals_the_loop(doubles):
    # decoder-prefix tokens are fixed like source tokens, among those the target can see
    model = doubles["marian"]
    source, target = PAIRS[0]
    da = ax.greedy_pig(model, source, target, rounds=3, per_round=2, steps=3, attribute_target=True)
    want, ends = naive_greedy(model, source, target, 3, 2, 3, attribute_target=True)
    assert_close(da.values, want)
    total = da.sum(("source", "hidden")).values
    np.testing.assert_allclose(da.completeness_gap.values, total - ends, atol=1e-9)


def test_every_round_is_complete(doubles):
    # with enough nodes each round's sum is f(x) - f(b_r): the gap vanishes
    model = doubles["gpt2"]
    da = ax.greedy_pig(model, "The capital of France is", " Paris", rounds=3, steps=48)
    scale = float(abs(da.sum(("source", "hidden"))).max())
    assert float(abs(da.completeness_gap).max()) < 2e-4 * scale


def test_fixed_tokens_stop_earning(doubles):
    # a token fixed after round 1 keeps its round-1 attribution: more rounds leave it unchanged
    model = doubles["gpt2"]
    kw = dict(steps=4, per_round=1)
    one = ax.greedy_pig(model, "The capital of France is", " Paris", rounds=1, **kw)
    two = ax.greedy_pig(model, "The capital of France is", " Paris", rounds=2, **kw)
    first = int(np.nanargmax(one.sum("hidden", skipna=False).isel(target=0).values))
    np.testing.assert_allclose(
        two.isel(target=0, source=first).values, one.isel(target=0, source=first).values
    )
    assert not np.allclose(two.values[~np.isnan(two.values)], one.values[~np.isnan(one.values)])


def test_batched_equals_single(doubles):
    model = doubles["t5"]
    sources, targets = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    kw = dict(rounds=2, steps=2, attribute_target=True)
    batched = ax.greedy_pig(model, sources, targets, chunk_size=2, batch_size=1, **kw)
    for i, (source, target) in enumerate(PAIRS):
        single = ax.greedy_pig(model, source, target, **kw)
        row = batched.isel(example=i).sel(target=single.target, source=single.source)
        np.testing.assert_allclose(row.values, single.values, rtol=1e-7, atol=1e-10)
        gap = batched.completeness_gap.isel(example=i).sel(target=single.target)
        np.testing.assert_allclose(gap.values, single.completeness_gap.values, atol=1e-10)


@pytest.mark.parametrize(
    "options",
    [
        {"rounds": 0},
        {"per_round": -1},
        {"per_round": 1.5},
        {"steps": 0},
        {"steps": 1, "quadrature": "riemann_trapezoid"},
        {"quadrature": "simpson"},
        {"mode": "forward"},
        {"noise": 0.1},
    ],
)
def test_bad_options(default_model, options):
    with pytest.raises(ax.OptionError):
        ax.greedy_pig(default_model, "1 2 =", " 2 1", **options)


def test_pipe_cli_and_dataset_runs(default_model, write_jsonl, tmp_path, capsys):
    from attrax.cli import main

    options = {"rounds": 2, "steps": 3}
    raw = ax.greedy_pig(default_model, "1 2 =", " 2 1", **options)
    assert json.loads(raw.attrs["options"])["rounds"] == 2
    fused = ax.pipe(ax.greedy_pig, ax.l2_norm)(default_model, "1 2 =", " 2 1", **options)
    np.testing.assert_allclose(fused.values, ax.l2_norm(raw).values, rtol=1e-5, atol=1e-7)
    data = write_jsonl([{"input": "1 2 =", "target": " 2 1"}, {"input": "3 =", "target": " 3"}])
    run = ax.attribute_dataset(
        default_model, data, tmp_path / "pig", method="greedy_pig", progress=False, **options
    )
    assert run.records == 2
    first = ax.load_dataset_results(tmp_path / "pig").isel(example=0)
    expected = ax.normalize(ax.l2_norm(raw))
    np.testing.assert_allclose(
        first.sel(target=expected.target, source=expected.source).values,
        expected.values,
        rtol=1e-4,
        atol=1e-6,
    )
    argv = ["attribute", "--method", "greedy_pig", "--input", "1 2 =", "--target", " 2 1"]
    assert main([*argv, "-o", "rounds=2", "--steps", "2"]) == 0
    assert "target" in capsys.readouterr().out


def target_gradient(run, points, t: int, sides: int) -> torch.Tensor:
    """Target ``t``'s gradient w.r.t. the first ``sides`` points, sides concatenated: one
    backward of that target alone (``_naive.Runner.gradients`` takes every target's)."""
    leaves = [p.clone().requires_grad_(True) for p in points[:sides]]
    logits = run.logits(leaves + list(points[sides:]))
    score = _naive.probability(logits[t - 1], run.sequence[t])
    return torch.cat([g[0] for g in torch.autograd.grad(score, leaves)])
