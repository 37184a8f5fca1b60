"""Shared set-up: tiny offline models and the built-in model (built once per session), a JSONL
writer, and the one place that names the integrated-gradients quadrature option."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import attrax as ax
from attrax import _model
from attrax.testing import tiny_classifier, tiny_model

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


# options small enough for a quick call of each method on the tiny models (attribution patching's
# `corrupted` text depends on the model: each test adds its own)
QUICK = {
    "integrated_gradients": {"steps": 3},
    "conductance": {"steps": 3},
    "internal_influence": {"steps": 3},
    "smoothgrad": {"samples": 2},
    "lime": {"samples": 8},
    "kernel_shap": {"samples": 8},
    "discretized_integrated_gradients": {"neighbours": 3, "steps": 3},
    "sequential_integrated_gradients": {"steps": 3},
    "guided_integrated_gradients": {"steps": 3},
    "greedy_pig": {"rounds": 2, "steps": 3},
    "pgd": {"steps": 2},
    "sobol": {"samples": 4},
    "reagent": {"probes": 2, "max_steps": 3},
    "shapley_sampling": {"permutations": 2},
    "squaregrad": {"samples": 2},
    "vargrad": {"samples": 2},
    "gradient_shap": {"samples": 2},
    "head_attribution": {"steps": 2},
}


# the integrated_gradients option that picks the quadrature rule; every test names it through here
IG_RULE = "quadrature"


def tiny_mixtral() -> ax.Model:
    """A tiny random Mixtral (4 experts, 2 a token) on the tiny GPT-2's tokenizer."""
    import transformers as T

    _, tok = tiny_model("gpt2")
    config = T.MixtralConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return ax.load_model(T.AutoModelForCausalLM.from_config(config), tokenizer=tok)


def integrated_gradients(model: Any, *args: Any, rule: str = "gausslegendre", **kw: Any) -> Any:
    """``ax.integrated_gradients`` with the quadrature rule given as ``rule``."""
    return ax.integrated_gradients(model, *args, **{IG_RULE: rule}, **kw)


@pytest.fixture(scope="session")
def default_model() -> ax.Model:
    """The built-in offline model (``ax.load_model()``), loaded once."""
    return ax.load_model()


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """``write_jsonl(rows, name="data.jsonl")`` writes one line per row under ``tmp_path``: a dict
    as JSON, a string as it is (``""`` is a blank line, ``"{oops"`` a broken one)."""

    def write(rows: Sequence[dict | str], name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
        path.write_text("\n".join(lines) + "\n")
        return path

    return write


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


@pytest.fixture
def modernbert_rotary_in_its_dtype(monkeypatch):
    """ModernBERT's rotary embedding in the model's dtype: transformers' takes it in float32,
    whose roundings a float64 reference (finite differences, explicit LRP) would amplify."""
    from transformers.models.modernbert import modeling_modernbert

    def rotate(q, k, cos, sin, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        half = modeling_modernbert.rotate_half
        return q * cos + half(q) * sin, k * cos + half(k) * sin

    monkeypatch.setattr(modeling_modernbert, "apply_rotary_pos_emb", rotate)


# Run in a fresh process by peak_above_start: ``call()`` is defined by the test's code; a warm-up
# call pages in code and lazy imports, malloc_trim returns its freed heap, then the peak RSS above
# the RSS before the call (VmHWM after clear_refs) is printed as JSON with what ``call`` returned.
_PEAK_HARNESS = """
import ctypes, json, re, sys
from pathlib import Path
import torch
torch.set_num_threads(1)

def status(field):
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{{field}}:\\s+(\\d+) kB", text, re.M).group(1)) * 1024

{code}

warm()
ctypes.CDLL(None).malloc_trim(0)
Path("/proc/self/clear_refs").write_text("5")
start = status("VmRSS")
result = call()
print(json.dumps({{"peak": status("VmHWM") - start, "result": result}}))
"""


@pytest.fixture
def peak_above_start() -> Callable[[str], dict[str, Any]]:
    """``peak_above_start(code)``: run ``code`` (defining ``warm()`` and ``call()``) in a fresh
    process; ``{"peak": bytes above the RSS before call(), "result": what call() returned}``."""
    import subprocess
    import sys

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak RSS needs Linux's /proc/self/clear_refs")

    def run(code: str) -> dict[str, Any]:
        script = _PEAK_HARNESS.format(code=code)
        src = str(Path(ax.__file__).resolve().parent.parent)
        env = {**__import__("os").environ, "PYTHONPATH": src}
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env
        )
        if out.returncode:
            raise AssertionError(f"the measured process failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    return run


def assert_close(got: Any, want: Any, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    """``got`` equals ``want`` where ``want`` is not NaN (NaN patterns equal), within ``rtol``
    and ``atol`` times the largest ``|want|``."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    assert np.array_equal(np.isnan(got), np.isnan(want)), "NaN (future/padding) pattern differs"
    ok = ~np.isnan(want)
    scale = np.abs(want[ok]).max()
    assert scale > 0
    np.testing.assert_allclose(got[ok], want[ok], rtol=rtol, atol=atol * scale)


@pytest.fixture(scope="session")
def doubles() -> dict[str, ax.Model]:
    """Tiny float64 models (GPT-2, Llama, Marian, T5, a BERT sequence classifier): tight
    tolerances against the tests' loops."""
    built = {}
    for arch in ("gpt2", "llama", "marian", "t5"):
        hf, tok = tiny_model(arch)
        built[arch] = ax.load_model(hf.double(), tokenizer=tok)
    hf, tok = tiny_classifier("bert", "sequence")
    built["bert"] = ax.load_model(hf.double(), tokenizer=tok)
    return built
