"""The shipped offline default model: it solves its task, and attributions find the truth.

The attribution checks use plain autograd (not the attrax engine): for every answer token,
teacher-forced on the correct continuation, saliency (L2 norm over the hidden dimension of
the gradient of the target token's probability w.r.t. the input embeddings) and integrated
gradients (zeros baseline, 32-node Gauss-Legendre quadrature, summed over hidden) must put their
highest score on the ground-truth source token for at least 90% of target positions.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from attrax._default_model_task import (
    DEFAULT_MODEL_PATH,
    ground_truth,
    is_heldout,
    make_example,
    solve,
)

N_PROMPTS = 50
IG_STEPS = 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_PATH, local_files_only=True)
    return m.eval()


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL_PATH, local_files_only=True)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _heldout_examples(n: int, seed: int = 2024) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [make_example(rng, split="heldout") for _ in range(n)]


def test_shipped_files_are_small_and_complete():
    names = {p.name for p in DEFAULT_MODEL_PATH.iterdir()}
    for required in ("config.json", "model.safetensors", "tokenizer.json", "task.json"):
        assert required in names
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_PATH.iterdir() if p.is_file())
    assert size < 5_000_000


def test_task_helpers():
    assert solve("3 1 4 0 =") == " 0 4 1 3"
    prompt, continuation = make_example(7)
    assert (prompt, continuation) == make_example(7)
    assert prompt.endswith(" =") and continuation.startswith(" ")
    digits = prompt.split()[:-1]
    assert len(set(digits)) == len(digits)
    assert continuation.split() == digits[::-1]
    assert is_heldout(make_example(3, split="heldout")[0])
    assert not is_heldout(make_example(3, split="train")[0])
    # prompt "a b c =" (positions 0..3), continuation "c b a" (positions 4..6)
    assert ground_truth([5, 6, 7, 3], [7, 6, 5, 1]) == {4: 2, 5: 1, 6: 0}
    with pytest.raises(ValueError):
        ground_truth([5, 6, 7, 3], [7, 5, 6])


def test_tokenization_is_consistent(tok):
    for prompt, continuation in _heldout_examples(20, seed=1):
        p, c = _ids(tok, prompt), _ids(tok, continuation)
        assert _ids(tok, prompt + continuation) == p + c
        assert tok(prompt + continuation)["input_ids"] == p + c  # no special tokens added
        assert len(p) == len(prompt.split()) and len(c) == len(continuation.split())
        assert tok.unk_token_id not in p + c
    assert tok.eos_token is not None and tok.pad_token is not None


def test_greedy_generation_solves_heldout_prompts(model, tok):
    examples = _heldout_examples(N_PROMPTS, seed=11)
    hits = 0
    with torch.no_grad():
        for prompt, continuation in examples:
            ids = torch.tensor([_ids(tok, prompt)])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=12,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            new = out[0, ids.shape[1] :].tolist()
            hits += new == [*_ids(tok, continuation), tok.eos_token_id]
    assert hits / len(examples) >= 0.98


def _target_probs(model, embeds: torch.Tensor, targets: torch.Tensor, target_ids: torch.Tensor):
    """Row ``k`` of ``embeds`` -> probability of ``target_ids[k]`` at ``targets[k]``.

    Rows are independent sequences, so the gradient of the sum w.r.t. row ``k`` is the
    gradient of row ``k``'s own target probability.
    """
    logits = model(inputs_embeds=embeds).logits  # (rows, seq, vocab)
    rows = torch.arange(len(targets))
    return torch.softmax(logits[rows, targets - 1], dim=-1)[rows, target_ids]


def test_saliency_and_ig_find_the_ground_truth_source(model, tok):
    nodes, weights = np.polynomial.legendre.leggauss(IG_STEPS)  # on [-1, 1]
    alphas = torch.tensor((nodes + 1) / 2, dtype=torch.float32)
    weights = torch.tensor(weights / 2, dtype=torch.float32)
    sal_hits = ig_hits = total = 0
    completeness_errors = []
    for prompt, continuation in _heldout_examples(N_PROMPTS):
        p, c = _ids(tok, prompt), _ids(tok, continuation)
        ids = torch.tensor(p + c)
        truth = ground_truth(p, c)
        targets = torch.tensor(list(truth))
        sources = torch.tensor(list(truth.values()))
        target_ids = ids[targets]
        n_t, seq = len(targets), len(ids)
        with torch.no_grad():
            emb = model.get_input_embeddings()(ids)  # (seq, hidden)
        before = torch.arange(seq)[None, :] < targets[:, None]  # positions before each target

        # saliency: L2 norm of d p(target) / d embedding, one row per target
        x = emb.expand(n_t, -1, -1).clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_target_probs(model, x, targets, target_ids).sum(), x)
        assert grad[~before].abs().max() == 0  # causal: the target and later have no effect
        saliency = grad.norm(dim=-1).masked_fill(~before, -1.0)

        # integrated gradients from a zeros baseline: rows (target, step)
        path = (
            (alphas[None, :, None, None] * emb)
            .expand(n_t, -1, -1, -1)
            .reshape(-1, seq, emb.shape[-1])
        )
        path.requires_grad_(True)
        rep = IG_STEPS
        probs = _target_probs(
            model, path, targets.repeat_interleave(rep), target_ids.repeat_interleave(rep)
        )
        (g,) = torch.autograd.grad(probs.sum(), path)
        g = g.reshape(n_t, rep, seq, -1)
        ig = (emb * (weights[None, :, None, None] * g).sum(1)).sum(-1)  # (targets, seq)
        with torch.no_grad():  # completeness: sum of IG ~ f(x) - f(baseline)
            zeros = torch.zeros_like(x)
            delta = _target_probs(model, x, targets, target_ids) - _target_probs(
                model, zeros, targets, target_ids
            )
        completeness_errors += (ig.sum(-1) - delta).abs().tolist()
        ig = ig.masked_fill(~before, -torch.inf)

        sal_hits += int((saliency.argmax(-1) == sources).sum())
        ig_hits += int((ig.argmax(-1) == sources).sum())
        total += n_t
    sal_rate, ig_rate = sal_hits / total, ig_hits / total
    print(f"saliency {sal_rate:.1%}, IG {ig_rate:.1%} over {total} target positions")
    assert np.mean(completeness_errors) < 0.05
    assert sal_rate >= 0.9
    assert ig_rate >= 0.9
