"""ReAGent against a step-by-step loop: per target, probe and step, one plain HF forward from token
ids for the probability drop and one for the stopping check, with the documented draws taken one
step at a time (attrax draws blocks of steps at once and runs them ahead)."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import attrax as ax
from attrax.testing import tiny_classifier
from tests import _naive
from tests.conftest import PAIRS, assert_close

Logits = Callable[[int, list[int]], torch.Tensor]


def sampler(groups: list[int]) -> Callable[[int, float], int]:
    """The documented rule: a token of group ``g >= 0`` is replaced by the ``floor(u * n)``-th of
    the ``n`` ids of ``g`` in increasing order; a token of a negative group, or an id past the
    groups, by the ``floor(u * n)``-th of every id that has a group, in increasing order."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        if g >= 0:
            members.setdefault(g, []).append(i)
    every = [i for i, g in enumerate(groups) if g >= 0]

    def draw(token: int, u: float) -> int:
        own = token < len(groups) and groups[token] >= 0
        pool = members[groups[token]] if own else every
        drawn = pool[math.floor(u * len(pool))]
        assert groups[drawn] >= 0  # ids of a negative group are never drawn
        return drawn

    return draw


def uniform_groups(model: ax.Model, tables: list[torch.nn.Embedding]) -> list[int]:
    """``"uniform"``: one group of every id below the embedding rows and the tokenizer's length,
    the special ids left out."""
    size = min([len(model.tokenizer)] + [t.num_embeddings for t in tables])
    special = set(model.tokenizer.all_special_ids)
    return [-1 if i in special else 0 for i in range(size)]


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    e = [math.exp(v - top) for v in values]
    return [x / sum(e) for x in e]


def probability(logits: torch.Tensor, token: int) -> float:
    e = (logits.double() - logits.double().max()).exp()
    return float(e[token] / e.sum())


def in_top_k(logits: torch.Tensor, token: int, k: int) -> bool:
    return token in torch.topk(logits, k).indices.tolist()


@dataclass
class Setup:
    """One example as the loop sees it: the players' ids (the tokens any target sees, in the
    order of attrax's ``source`` dim), per target the players it sees, its token, and its logits
    with the players' ids replaced; ``width`` is the ``source`` dim's length."""

    ids: list[int]
    sees: list[list[int]]
    targets: list[int]
    logits: Logits
    width: int
    groups: list[int]


def decoder_only(model: ax.Model, source: str, target: str) -> Setup:
    source_ids, target_ids = _naive.token_ids(model, source, target)
    sequence = source_ids + target_ids
    positions = list(range(len(source_ids), len(sequence)))

    def logits(k: int, ids: list[int]) -> torch.Tensor:
        t = positions[k]
        with torch.no_grad():
            return model.hf(input_ids=torch.tensor([ids[:t]])).logits[0, -1]

    return Setup(
        ids=sequence[: positions[-1]],
        sees=[list(range(t)) for t in positions],
        targets=[sequence[t] for t in positions],
        logits=logits,
        width=len(sequence),
        groups=uniform_groups(model, [model.hf.get_input_embeddings()]),
    )


def encoder_decoder(model: ax.Model, source: str, target: str, attribute_target: bool) -> Setup:
    source_ids, target_ids = _naive.token_ids(model, source, target)
    decoder = [model.hf.config.decoder_start_token_id, *target_ids]
    n, m = len(source_ids), len(target_ids)

    def logits(k: int, ids: list[int]) -> torch.Tensor:
        prefix = ids[n:] if attribute_target else decoder
        with torch.no_grad():
            out = model.hf(
                input_ids=torch.tensor([ids[:n]]), decoder_input_ids=torch.tensor([prefix[: k + 1]])
            )
        return out.logits[0, -1]

    tables = [model.hf.get_encoder().embed_tokens]
    if attribute_target:
        tables.append(model.hf.get_decoder().embed_tokens)
    prefix = list(range(n, n + m)) if attribute_target else []
    return Setup(
        ids=source_ids + (decoder[:m] if attribute_target else []),
        sees=[list(range(n)) + prefix[: k + 1] for k in range(m)],
        targets=target_ids,
        logits=logits,
        width=n + (m + 1 if attribute_target else 0),
        groups=uniform_groups(model, tables),
    )


def classifier(model: ax.Model, text: str) -> Setup:
    ids = model.tokenizer(text).input_ids
    classes = model.hf.config.num_labels

    def logits(k: int, replaced: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model.hf(input_ids=torch.tensor([replaced])).logits[0]

    return Setup(
        ids=ids,
        sees=[list(range(len(ids)))] * classes,
        targets=list(range(classes)),
        logits=logits,
        width=len(ids),
        groups=uniform_groups(model, [model.hf.get_input_embeddings()]),
    )


@dataclass
class Loop:
    values: np.ndarray  # [target, width]: NaN where a target sees nothing
    stopped: list[int]  # per target, the probes that stopped
    steps: list[list[int | None]]  # per target and probe, the step it stopped at


def naive_reagent(
    setup: Setup,
    *,
    probes: int,
    max_steps: int,
    replace_ratio: float = 0.3,
    keep: float = 5,
    invert_keep: bool = False,
    top_k: int = 3,
    seed: int = 0,
    groups: list[int] | None = None,
) -> Loop:
    """Inseq's sequential ReAGent, one target, probe and step at a time."""
    draw = sampler(setup.groups if groups is None else groups)
    ids, players = setup.ids, len(setup.ids)
    targets = len(setup.targets)
    generator = torch.Generator().manual_seed(seed)
    first = torch.rand((targets, probes, players), generator=generator).double()
    scores = [[first[k, p, setup.sees[k]].tolist() for p in range(probes)] for k in range(targets)]
    original = [probability(setup.logits(k, ids), y) for k, y in enumerate(setup.targets)]
    steps: list[list[int | None]] = [[None] * probes for _ in range(targets)]
    step = 0
    while step < max_steps and any(s is None for row in steps for s in row):
        u = torch.rand((3, targets, probes, players), generator=generator).double()
        step += 1
        for k, y in enumerate(setup.targets):
            sees = setup.sees[k]
            if isinstance(keep, float):
                kept = min(math.ceil(keep * len(sees)), len(sees))
            else:
                kept = min(keep, len(sees))
            for p in range(probes):
                if steps[k][p] is not None:
                    continue
                replaced = [bool(u[0, k, p, j] < replace_ratio) for j in sees]
                x = list(ids)
                for j, r in zip(sees, replaced, strict=True):
                    if r:
                        x[j] = draw(ids[j], float(u[1, k, p, j]))
                delta = original[k] - probability(setup.logits(k, x), y)
                for i, r in enumerate(replaced):
                    q = ((delta if r else -delta) + 1) / 2
                    scores[k][p][i] += math.log(q / (1 - q))
                ranked = sorted(range(len(sees)), key=lambda i: -scores[k][p][i])
                top = set(ranked[:kept])
                x = list(ids)
                for i, j in enumerate(sees):
                    if (i in top) == invert_keep:
                        x[j] = draw(ids[j], float(u[2, k, p, j]))
                if in_top_k(setup.logits(k, x), y, top_k):
                    steps[k][p] = step
    values = np.full((targets, setup.width), np.nan)
    for k in range(targets):
        chosen = [p for p in range(probes) if steps[k][p] is not None] or list(range(probes))
        mean = np.mean([softmax(scores[k][p]) for p in chosen], axis=0)
        values[k, setup.sees[k]] = mean
    stopped = [sum(s is not None for s in row) for row in steps]
    return Loop(values, stopped, steps)


def assert_exercised(loop: Loop, probes: int) -> None:
    """Some chains stop inside a block of steps that attrax ran ahead (its blocks double from 1:
    they end at steps 2**n - 1), some never stop."""
    assert any(s is not None and s & (s + 1) for row in loop.steps for s in row)
    assert any(n < probes for n in loop.stopped)
    assert len(set(loop.stopped)) > 1


def assert_matches(da, loop: Loop) -> None:
    # float64 models (Llama's softmax in float32: 1e-8 apart on an AVX2 CPU's kernels):
    # rounding only, while a wrong draw, rank or stop moves them by percents
    assert_close(da.values, loop.values, rtol=1e-7, atol=1e-10)
    np.testing.assert_array_equal(da.stopped.values, loop.stopped)


# --- against the loop -------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "keep", "top_k"), [("gpt2", 5, 60), ("llama", 2, 30)])
def test_decoder_only_equals_the_loop(doubles, arch, keep, top_k):
    # gpt2: the first target sees 4 tokens, fewer than `keep`: its check replaces none
    model = doubles[arch]
    source, target = PAIRS[2]
    options = dict(probes=4, max_steps=20, keep=keep, top_k=top_k, seed=5)
    da = ax.reagent(model, source, target, **options)
    assert da.dims == ("target", "source")
    loop = naive_reagent(decoder_only(model, source, target), **options)
    assert_exercised(loop, 4)
    assert_matches(da, loop)


@pytest.mark.parametrize("attribute_target", [False, True])
def test_encoder_decoder_equals_the_loop(doubles, attribute_target):
    # with attribute_target the players are the encoder's tokens, then the decoder prefix's
    model = doubles["marian"]
    source, target = PAIRS[2]
    options = dict(probes=4, max_steps=20, keep=3, top_k=10, seed=1)
    da = ax.reagent(model, source, target, attribute_target=attribute_target, **options)
    loop = naive_reagent(encoder_decoder(model, source, target, attribute_target), **options)
    assert_exercised(loop, 4)
    assert_matches(da, loop)
    if attribute_target:
        assert (
            np.isfinite(da.sel(side="target").values).sum()
            == da.sizes["target"] * (da.sizes["target"] + 1) // 2
        )


def test_classifier_equals_the_loop(doubles):
    # every class a target; top_k=1 of the 3 classes
    model = doubles["bert"]
    text = "hello world"
    options = dict(probes=4, max_steps=6, keep=2, top_k=1, seed=2)
    da = ax.reagent(model, text, "all", **options)
    assert da.target_class.values.tolist() == [0, 1, 2]
    loop = naive_reagent(classifier(model, text), **options)
    assert_exercised(loop, 4)
    assert_matches(da, loop)


def test_keep_share_and_invert_keep_equal_the_loop(doubles):
    # keep=0.3: ceil(0.3 * seen) tokens per target, as Inseq's keep_ratio; invert_keep replaces
    # those instead of keeping them
    model = doubles["llama"]
    source, target = PAIRS[1]
    options = dict(probes=3, max_steps=16, keep=0.3, invert_keep=True, top_k=10, seed=4)
    da = ax.reagent(model, source, target, **options)
    loop = naive_reagent(decoder_only(model, source, target), **options)
    assert_exercised(loop, 3)
    assert_matches(da, loop)
    plain = ax.reagent(model, source, target, **{**options, "invert_keep": False})
    assert not np.allclose(np.nan_to_num(plain.values), np.nan_to_num(da.values))


@contextlib.contextmanager
def watch_ids(model: ax.Model) -> Iterator[list[int]]:
    """Every token id the model's (decoder-only) embedding table looks up inside the block."""
    seen: list[int] = []
    table = model.hf.get_input_embeddings()
    handle = table.register_forward_hook(
        lambda _, args, out: seen.extend(args[0].flatten().tolist())
    )
    try:
        yield seen
    finally:
        handle.remove()


def test_uniform_draws_ids_the_tokenizer_has(doubles):
    # an embedding table with rows past the tokenizer's ids (padded to a multiple, as many
    # checkpoints are): "uniform" draws below len(tokenizer) only
    hf = copy.deepcopy(doubles["gpt2"].hf)
    hf.resize_token_embeddings(808, mean_resizing=False)
    model = ax.load_model(hf, tokenizer=doubles["gpt2"].tokenizer)
    assert len(model.tokenizer) == 800
    source, target = PAIRS[2]
    options = dict(probes=3, max_steps=10, keep=2, top_k=30, seed=7)
    with watch_ids(model) as seen:
        da = ax.reagent(model, source, target, **options)
    assert max(seen) < 800 and len(set(seen)) > 50
    setup = decoder_only(model, source, target)
    assert len(setup.groups) == 800
    assert_matches(da, naive_reagent(setup, **options))


def groups_mod_5(size: int = 800) -> torch.Tensor:
    """Groups by id mod 5, ids 600..699 in a negative group (in none of the tests' inputs)."""
    groups = torch.arange(size, dtype=torch.int32) % 5
    groups[600:700] = -1
    return groups


def run_with_groups(model: ax.Model, groups: torch.Tensor, options: dict) -> None:
    """attrax and the loop with ``groups``; attrax never looks up an id of a negative group."""
    source, target = PAIRS[2]
    setup = decoder_only(model, source, target)
    assert not set(range(600, 700)) & set(setup.ids)
    with watch_ids(model) as seen:
        da = ax.reagent(model, source, target, replacements=groups, **options)
    assert len(set(seen)) > 50  # the forwards ran from drawn ids
    assert not set(range(600, 700)) & set(seen)
    loop = naive_reagent(setup, groups=groups.tolist(), **options)
    assert_exercised(loop, options["probes"])
    assert_matches(da, loop)
    uniform = ax.reagent(model, source, target, **options)
    assert not np.allclose(np.nan_to_num(uniform.values), np.nan_to_num(da.values))


def test_replacement_groups_equal_the_loop(doubles):
    # every token of the input has a group: each is replaced by an id of its own group
    model = doubles["gpt2"]
    run_with_groups(model, groups_mod_5(), dict(probes=3, max_steps=12, keep=2, top_k=30, seed=6))


def test_positions_draw_for_the_chosen_targets_only(doubles):
    # the draws' shape is (chosen targets, probes, tokens they see): positions 5 and 7 of 4..8
    model = doubles["gpt2"]
    source, target = PAIRS[2]
    options = dict(probes=3, max_steps=12, keep=2, top_k=30, seed=8)
    da = ax.reagent(model, source, target, positions=[5, -2], **options)
    assert da.target.values.tolist() == [5, 7]
    whole = decoder_only(model, source, target)
    chosen = [1, 3]
    setup = Setup(
        ids=whole.ids[:7],
        sees=[whole.sees[k] for k in chosen],
        targets=[whole.targets[k] for k in chosen],
        logits=lambda k, ids: whole.logits(chosen[k], ids),
        width=whole.width,
        groups=whole.groups,
    )
    assert_matches(da, naive_reagent(setup, **options))


# --- batching ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "attribute_target"), [("gpt2", False), ("marian", True)])
def test_batched_equals_single(doubles, arch, attribute_target):
    # each example draws from its own generator: padding and neighbours change nothing
    model = doubles[arch]
    sources, targets = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    options = dict(probes=3, max_steps=10, keep=2, top_k=30, seed=3)
    options["attribute_target"] = attribute_target
    batched = ax.reagent(model, sources, targets, **options)
    assert batched.dims == ("example", "target", "source")
    counts = []
    for i, (source, target) in enumerate(PAIRS):
        single = ax.reagent(model, source, target, **options)
        row = batched.isel(example=i).sel(target=single.target, source=single.source)
        assert_close(row.values, single.values, rtol=1e-6, atol=1e-9)
        np.testing.assert_array_equal(row.stopped.values, single.stopped.values)
        rest = batched.isel(example=i).drop_sel(target=single.target.values)
        assert bool(rest.isnull().all())
        counts.extend(single.stopped.values.tolist())
    assert 0 in counts and 3 in counts and len(set(counts)) > 2


def test_batch_size_changes_nothing(doubles):
    model = doubles["llama"]
    source, target = PAIRS[2]
    options = dict(probes=3, max_steps=10, keep=2, top_k=10, seed=9)
    whole = ax.reagent(model, source, target, batch_size=None, **options)
    one = ax.reagent(model, source, target, batch_size=1, **options)
    assert_close(one.values, whole.values, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(one.stopped.values, whole.stopped.values)
    assert len(set(whole.stopped.values.tolist())) > 1


# --- properties -------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "attribute_target"), [("llama", False), ("t5", True)])
def test_importances_are_a_distribution_over_what_each_target_sees(models, arch, attribute_target):
    model = models[arch]
    source, target = PAIRS[1]
    da = ax.reagent(model, source, target, probes=3, max_steps=8, attribute_target=attribute_target)
    if model.is_encoder_decoder:
        # the decoder prefix from the target's own position on is its future
        decoder = (da.side == "target") & (da.position >= da.target)
        future = decoder.transpose("target", "source").values
    else:
        future = (da.source >= da.target).transpose(*da.dims).values
    assert np.isnan(da.values[future]).all()
    assert (da.values[~future] > 0).all()
    np.testing.assert_allclose(da.sum("source").values, 1.0, rtol=1e-5)
    assert ((da.stopped >= 0) & (da.stopped <= 3)).all()
    assert da.attrs["method"] == "reagent"


def test_seed_reproduces(models):
    model = models["gpt2"]
    options = dict(probes=3, max_steps=6)
    a = ax.reagent(model, *PAIRS[0], seed=3, **options)
    b = ax.reagent(model, *PAIRS[0], seed=3, **options)
    c = ax.reagent(model, *PAIRS[0], seed=4, **options)
    np.testing.assert_array_equal(a.values, b.values)
    assert not np.allclose(np.nan_to_num(a.values), np.nan_to_num(c.values))
    assert '"seed": 3' in a.attrs["options"]


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"objective": "logit"}, r"`objective` must be 'probability', got 'logit'"),
        ({"objective": "logprob"}, r"`objective` must be 'probability', got 'logprob'"),
        ({"contrast": " London"}, r"reagent does not take `contrast`: its stopping rule"),
        ({"chunk_size": 2}, r"reagent does not take `chunk_size`"),
        ({"top_k": 800}, r"`top_k`=800 is not below the 800 outputs of GPT2LMHeadModel"),
        ({"top_k": 0}, r"`top_k` .*positive integer.*, got 0"),
        ({"top_k": 2.0}, r"`top_k` .*positive integer.*, got 2.0"),
        ({"keep": 0}, r"`keep` must be a positive integer, got 0"),
        ({"keep": 1.5}, r"`keep` as a float is the share of tokens kept, in \(0, 1\], got 1.5"),
        ({"keep": 0.0}, r"`keep` as a float .* got 0.0"),
        ({"replace_ratio": 0}, r"`replace_ratio` must be a fraction in \(0, 1\], got 0"),
        ({"replace_ratio": 1.5}, r"`replace_ratio` .* got 1.5"),
        ({"replace_ratio": True}, r"`replace_ratio` .* got True"),
        ({"probes": 0}, r"`probes` must be a positive integer, got 0"),
        ({"max_steps": 2.5}, r"`max_steps` must be a positive integer, got 2.5"),
        ({"invert_keep": "yes"}, r"`invert_keep` must be a bool, got 'yes'"),
        ({"replacements": "pos"}, r"`replacements` must be 'uniform' or a 1-D integer .*'pos'"),
        ({"replacements": torch.zeros(800)}, r"`replacements` must be 'uniform' or a 1-D int"),
        ({"replacements": torch.zeros(800, dtype=torch.bool)}, r"`replacements` must be"),
        ({"replacements": torch.zeros((2, 400), dtype=torch.long)}, r"`replacements` must be"),
        ({"replacements": torch.full((800,), -1)}, r"`replacements` puts every token id in a"),
        ({"replacements": torch.zeros(801, dtype=torch.long)}, r"groups to 801 token ids, more"),
        ({"steps": 3}, r"reagent has no option 'steps'"),
    ],
)
def test_bad_options_raise(models, options, match):
    with pytest.raises(ax.OptionError, match=match):
        ax.reagent(models["gpt2"], *PAIRS[0], **{"probes": 2, "max_steps": 2, **options})


@pytest.mark.parametrize(
    ("arch", "inputs", "top_k"), [("llama", PAIRS[2], 3), ("bert", ("hello world", "all"), 1)]
)
def test_default_top_k(doubles, arch, inputs, top_k):
    # 3 for a language model, as Inseq; 1 (the prediction) for a classifier
    model = doubles[arch]
    options = dict(probes=4, max_steps=6, keep=2, seed=2)
    default = ax.reagent(model, *inputs, **options)
    chosen = ax.reagent(model, *inputs, top_k=top_k, **options)
    np.testing.assert_array_equal(default.values, chosen.values)
    np.testing.assert_array_equal(default.stopped.values, chosen.stopped.values)
    above = ax.reagent(model, *inputs, top_k=top_k + 1, **options)
    assert int(above.stopped.sum()) > int(default.stopped.sum())


def test_top_k_must_leave_a_class_out(doubles):
    with pytest.raises(ax.OptionError, match=r"`top_k`=3 is not below the 3 outputs of Bert"):
        ax.reagent(doubles["bert"], "hello world", top_k=3)


def test_a_regression_head_is_refused():
    hf, tok = tiny_classifier("bert", "sequence", num_labels=1)
    model = ax.load_model(hf, tokenizer=tok)
    with pytest.raises(ax.OptionError, match=r"reagent needs the target's probability, and Bert"):
        ax.reagent(model, "hello world", probes=2, max_steps=2)


# --- tokens without a group ----------------------------------------------------------------


def test_a_token_without_a_group_draws_from_every_grouped_id_in_increasing_order(doubles):
    # 76 (in the input) in a negative group, 791 (in the input) past the groups given: both are
    # replaced by the floor(u * n)-th of the n ids that have a group, in increasing order
    model = doubles["gpt2"]
    groups = groups_mod_5()[:700]
    groups[76] = -3
    assert {76, 791} <= set(decoder_only(model, *PAIRS[2]).ids)
    run_with_groups(model, groups, dict(probes=3, max_steps=12, keep=2, top_k=30, seed=6))


def test_a_long_run_in_blocks_up_to_the_cap_equals_the_loop(doubles):
    """70 steps of chains that never stop: blocks of 1, 2, 4, 8, 16 and 32 steps, then the rest
    (7), each block's scores summed ahead of its checks."""
    model = doubles["gpt2"]
    source, target = PAIRS[0]
    options = dict(probes=2, max_steps=70, keep=2, top_k=1, seed=3)
    da = ax.reagent(model, source, target, **options)
    loop = naive_reagent(decoder_only(model, source, target), **options)
    assert min(loop.stopped) == 0  # some target's chains all ran every step
    assert_matches(da, loop)


def test_a_confident_model_keeps_finite_scores_in_float32():
    """A target's probability rounded to 1.0 that a replacement drops below float32's smallest
    made logit((d + 1) / 2) infinite: the call failed where the same weights in float64 ran."""
    from attrax.testing import tiny_model

    hf, tok = tiny_model("gpt2")
    with torch.no_grad():
        hf.transformer.ln_f.weight.mul_(20.0)  # tied: the logits x20
    source = "def f(x): return x + 1 and the capital of France is Paris"
    options = dict(probes=8, max_steps=200, seed=0, top_k=1, keep=1, max_new_tokens=6)
    got = {
        dtype: ax.reagent(ax.load_model(hf.to(dtype), tokenizer=tok), source, **options)
        for dtype in (torch.float32, torch.float64)
    }
    for da in got.values():
        seen = da.values[~np.isnan(da.values)]
        assert np.isfinite(seen).all() and (seen >= 0).all()
        np.testing.assert_allclose(np.nansum(da.values, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(got[torch.float32].stopped, got[torch.float64].stopped)


def test_a_question_answering_model_ranks_positions():
    """Its outputs are the positions: top_k=2 is below them (it was refused as not below the
    two labels, start and end)."""
    from attrax.testing import tiny_classifier

    hf, tok = tiny_classifier("bert", task="question-answering")
    model = ax.load_model(hf, tokenizer=tok)
    da = ax.reagent(model, ("Who lives here?", "Ada lives here."), probes=2, max_steps=3, top_k=2)
    np.testing.assert_allclose(np.nansum(da.values, axis=-1), 1.0, rtol=1e-5)
    with pytest.raises(ax.OptionError, match="not below the"):
        ax.reagent(model, ("Who?", "Ada."), probes=2, max_steps=3, top_k=100)


@pytest.mark.parametrize(
    "groups",
    [torch.zeros(800, dtype=torch.complex64), torch.zeros(800, dtype=torch.long).to_sparse()],
)
def test_complex_and_sparse_groups_are_refused(models, groups):
    with pytest.raises(ax.OptionError, match="`replacements` must be 'uniform' or a 1-D int"):
        ax.reagent(models["gpt2"], *PAIRS[0], probes=2, max_steps=2, replacements=groups)
