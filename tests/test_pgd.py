"""PGD per token against a plain loop: per target, per token, per step, one backward each."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attrax as ax
from tests import _naive
from tests.conftest import PAIRS, assert_close


def attack_loop(emb, token, score, epsilon, steps, step_size, norm, start=None) -> float:
    """Madry et al.'s PGD on row ``token`` of ``emb`` only, minimizing ``score``: the final
    objective. ``score(point [L, H]) -> scalar tensor``."""
    d = torch.zeros(emb.shape[1], dtype=emb.dtype) if start is None else start.clone()
    for _ in range(steps):
        d = d.detach().requires_grad_(True)
        point = emb.clone()
        point[token] = point[token] + d
        (g,) = torch.autograd.grad(score(point), d)
        with torch.no_grad():
            if norm == "l2":
                d = d - step_size * g / g.norm() if g.norm() > 0 else d
                if d.norm() > epsilon:
                    d = d * epsilon / d.norm()
            else:
                d = torch.clamp(d - step_size * torch.sign(g), -epsilon, epsilon)
    point = emb.clone()
    point[token] = point[token] + d.detach()
    with torch.no_grad():
        return float(score(point))


def naive_pgd(
    model,
    source,
    target,
    epsilon,
    steps,
    step_size,
    norm,
    starts=None,
    attribute_target=False,
) -> np.ndarray:
    """``[target, source(+decoder)]``: ``f(x) - f(x + d e_s)`` per target and token ``s``.

    With ``attribute_target`` the decoder prefix's tokens follow the encoder's (one token list),
    each target attacking those before its position; ``starts[k][s]`` is the attack's start."""
    source_ids, target_ids = _naive.token_ids(model, source, target)
    run = _naive.Runner(model, source_ids, target_ids)
    x = run.embeddings()
    sides = 2 if attribute_target else 1
    widths = [xi.shape[1] for xi in x[:sides]]
    emb = torch.cat([xi[0] for xi in x[:sides]])
    rows = []
    for k, t in enumerate(run.targets()):

        def score(point, t=t):
            points = [p[None] for p in point.split(widths)] + x[sides:]
            return _naive.probability(run.logits(points)[t - 1], run.sequence[t])

        full = float(score(emb))
        row = np.full(emb.shape[0], np.nan)
        if not model.is_encoder_decoder:
            visible = list(range(t))
        else:
            decoder = [widths[0] + j for j in range(t)] if attribute_target else []
            visible = list(range(widths[0])) + decoder
        for s in visible:
            start = None if starts is None else starts[k][s]
            row[s] = full - attack_loop(emb, s, score, epsilon, steps, step_size, norm, start)
        rows.append(row)
    return np.stack(rows)


@pytest.mark.parametrize("arch", ["gpt2", "marian"])
def test_pgd_equals_the_loop(doubles, arch):
    model = doubles[arch]
    source, target = PAIRS[0]
    da = ax.pgd(model, source, target, epsilon=0.5, steps=3)
    assert da.dims == ("target", "source")
    want = naive_pgd(model, source, target, 0.5, 3, 2.5 * 0.5 / 3, "l2")
    assert_close(da.values, want)
    # a perturbation that lowers the objective: drops are positive wherever a token is seen
    assert np.nanmin(da.values) > 0


def test_linf_with_random_starts_equals_the_loop(doubles):
    model = doubles["llama"]
    source, target = PAIRS[2]
    da = ax.pgd(model, source, target, epsilon=0.2, steps=2, step_size=0.15, norm="linf", seed=7)
    # the documented draws: per example, a CPU generator seeded with `seed`, then per side
    # uniform [-eps, eps] of shape (its targets, its tokens, hidden)
    source_ids, target_ids = _naive.token_ids(model, source, target)
    length, hidden = len(source_ids) + len(target_ids), model.hf.config.hidden_size
    generator = torch.Generator().manual_seed(7)
    shape = (len(target_ids), length, hidden)
    # drawn in float32 whatever the model's dtype, then cast to it
    starts = ((2 * torch.rand(shape, generator=generator) - 1) * 0.2).double()
    want = naive_pgd(model, source, target, 0.2, 2, 0.15, "linf", starts)
    assert_close(da.values, want)
    plain = ax.pgd(model, source, target, epsilon=0.2, steps=2, step_size=0.15, norm="linf")
    assert not np.allclose(np.nan_to_num(plain.values), np.nan_to_num(da.values))


def ball_starts(generator, shape, epsilon) -> torch.Tensor:
    """Uniform draws in the L2 ball, the textbook way: a normalized Gaussian direction, then a
    radius ``epsilon * U ** (1 / H)`` (``U`` uniform) per ``(target, token)``; in float32, as
    attrax draws whatever the model's dtype, then cast to float64."""
    direction = torch.randn(shape, generator=generator)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    radius = torch.rand((*shape[:2], 1), generator=generator)
    return (direction * epsilon * radius ** (1.0 / shape[-1])).double()


def test_l2_random_starts_equal_the_loop(doubles):
    model = doubles["gpt2"]
    source, target = PAIRS[1]
    kw = dict(epsilon=0.3, steps=2, step_size=0.05)
    da = ax.pgd(model, source, target, seed=4, **kw)
    # the documented draws: per example a CPU generator seeded with `seed`, per side uniform in
    # the ball, of shape (its targets, its tokens, hidden)
    source_ids, target_ids = _naive.token_ids(model, source, target)
    shape = (len(target_ids), len(source_ids) + len(target_ids), model.hf.config.hidden_size)
    starts = ball_starts(torch.Generator().manual_seed(4), shape, 0.3)
    assert_close(da.values, naive_pgd(model, source, target, 0.3, 2, 0.05, "l2", starts))
    plain = ax.pgd(model, source, target, **kw)
    assert not np.allclose(np.nan_to_num(plain.values), np.nan_to_num(da.values))


def test_attribute_target_equals_the_loop(doubles):
    # decoder-prefix tokens are attacked like source tokens, each from its own random start
    model = doubles["t5"]
    source, target = PAIRS[0]
    kw = dict(epsilon=0.2, steps=2, step_size=0.08, norm="linf", seed=3)
    da = ax.pgd(model, source, target, attribute_target=True, **kw)
    source_ids, target_ids = _naive.token_ids(model, source, target)
    hidden = model.hf.config.d_model
    generator = torch.Generator().manual_seed(3)
    starts = torch.cat(
        [
            ((2 * torch.rand((len(target_ids), n, hidden), generator=generator) - 1)
             * 0.2).double()
            for n in (len(source_ids), len(target_ids) + 1)  # the decoder adds its start token
        ],
        dim=1,
    )  # fmt: skip
    want = naive_pgd(model, source, target, 0.2, 2, 0.08, "linf", starts, attribute_target=True)
    assert_close(da.values, want)
    decoder = da.sel(side="target").values
    assert np.abs(decoder[~np.isnan(decoder)]).max() > 1e-3 * np.nanmax(np.abs(want))


def test_pgd_on_a_classifier_equals_the_loop(doubles):
    model = doubles["bert"]
    text = "hello world"
    da = ax.pgd(model, text, "all", epsilon=0.3, steps=2)
    hf = model.hf
    ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
    emb = hf.get_input_embeddings()(ids)[0].detach()
    for c in range(da.sizes["target"]):

        def score(point, c=c):
            return torch.softmax(hf(inputs_embeds=point[None]).logits[0], -1)[c]

        full = float(score(emb))
        want = [
            full - attack_loop(emb, s, score, 0.3, 2, 2.5 * 0.3 / 2, "l2")
            for s in range(emb.shape[0])
        ]
        assert_close(da.isel(target=c).values, np.array(want))


def test_small_radius_is_the_gradient_norm(doubles):
    # one step of length epsilon along -g/|g|: f(x) - f(x - eps g/|g|) = eps |g| + O(eps^2)
    model = doubles["marian"]
    source, target = PAIRS[1]
    eps = 1e-5
    da = ax.pgd(model, source, target, epsilon=eps, steps=1, step_size=eps)
    grad = ax.pipe(ax.saliency, ax.l2_norm)(model, source, target)
    np.testing.assert_allclose(da.values / eps, grad.values, rtol=1e-3)


def test_batched_equals_single(doubles):
    model = doubles["t5"]
    sources, targets = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    kw = dict(epsilon=0.3, steps=2, seed=1, attribute_target=True)
    batched = ax.pgd(model, sources, targets, chunk_size=2, batch_size=3, **kw)
    for i, (source, target) in enumerate(PAIRS):
        single = ax.pgd(model, source, target, **kw)
        row = batched.isel(example=i).sel(target=single.target, source=single.source)
        np.testing.assert_allclose(row.values, single.values, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize(
    "options",
    [
        {"epsilon": 0},
        {"epsilon": float("inf")},
        {"steps": 0},
        {"step_size": -1.0},
        {"norm": "l1"},
        {"seed": 1.5},
        {"reduce_hidden": "sum"},
    ],
)
def test_bad_options(default_model, options):
    with pytest.raises(ax.OptionError):
        ax.pgd(default_model, "1 2 =", " 2 1", **options)


def test_cli_and_dataset_runs(default_model, write_jsonl, tmp_path, capsys):
    from attrax.cli import main

    raw = ax.pgd(default_model, "1 2 =", " 2 1", steps=2)
    data = write_jsonl([{"input": "1 2 =", "target": " 2 1"}, {"input": "3 =", "target": " 3"}])
    run = ax.attribute_dataset(
        default_model, data, tmp_path / "pgd", method="pgd", progress=False, steps=2
    )
    assert run.records == 2
    first = ax.load_dataset_results(tmp_path / "pgd").isel(example=0)
    expected = ax.normalize(raw)
    np.testing.assert_allclose(
        first.sel(target=expected.target, source=expected.source).values,
        expected.values,
        rtol=1e-4,
        atol=1e-6,
    )
    argv = ["attribute", "--method", "pgd", "--input", "1 2 =", "--target", " 2 1"]
    assert main([*argv, "--steps", "2", "-o", "norm=linf", "-o", "epsilon=0.1"]) == 0
    assert "target" in capsys.readouterr().out
