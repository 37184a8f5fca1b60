"""Tiny offline models, built once per test session."""

from __future__ import annotations

import pytest
import torch

import attrax as ax
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
