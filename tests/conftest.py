"""Tiny offline models, built once per test session."""

from __future__ import annotations

import pytest
import torch

import attrax as ax
from attrax import _model
from attrax.testing import tiny_model

# tiny models gain nothing from intra-op threads, and on a busy 2-core machine a second thread
# per process makes every op wait (seen: 20x slower suites under load)
torch.set_num_threads(1)

DECODER_ONLY = ("gpt2", "llama")
ENCODER_DECODER = ("marian", "bart", "t5")
ARCHS = DECODER_ONLY + ENCODER_DECODER

# (prompt or source, target) pairs whose targets continue their prompts on a token boundary
PAIRS = [
    ("The capital of France is", " Paris"),
    ("def f(x):", " return x + 1"),
    ("Hello", " world, café"),
]


@pytest.fixture(scope="session")
def models() -> dict[str, ax.Model]:
    built = {}
    for arch in ARCHS:
        hf, tok = tiny_model(arch)
        built[arch] = ax.load_model(hf, tokenizer=tok)
    return built


@pytest.fixture(params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def model(models: dict[str, ax.Model], arch: str) -> ax.Model:
    return models[arch]


@pytest.fixture
def sdpa_always(monkeypatch):
    """``attn_implementation="auto"`` picks SDPA at every length. ``watch(model)`` returns the list
    of attention implementations the model's forwards run with from then on."""
    monkeypatch.setattr(_model, "SDPA_MIN_TOKENS", 1)
    hooks = []

    def watch(model: ax.Model) -> list[str]:
        seen: list[str] = []
        # every attention module reads its config when it runs; T5's stacks hold config copies
        configs = {id(m.config): m.config for m in model.hf.modules() if hasattr(m, "config")}

        def record(module, args):
            seen.extend({c._attn_implementation for c in configs.values()})

        hooks.append(model.hf.register_forward_pre_hook(record))
        return seen

    yield watch
    for hook in hooks:
        hook.remove()
