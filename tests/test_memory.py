"""Host memory reuse around attrax's computations (``attrax._memory``)."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import os
import re
import resource
from collections import Counter
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import attrax as ax
from attrax import _deeplift, _engine, _memory
from attrax._engine import Problem
from attrax._inputs import prepare
from attrax._names import METHODS
from attrax._objectives import resolve
from attrax.testing import corpus, tiny_classifier
from tests.conftest import PAIRS, QUICK, assert_close


class FakeLibc:
    """Records what attrax asks of glibc's malloc."""

    def __init__(self, free: int = 1 << 30) -> None:
        self.calls: list[tuple] = []
        self.free = free

    def mallinfo2(self) -> SimpleNamespace:
        return SimpleNamespace(fordblks=self.free)

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeLibc:
    libc = FakeLibc()
    monkeypatch.setattr(_memory, "_libc", libc)
    monkeypatch.setattr(_memory, "_measured", (-float("inf"), 0))
    monkeypatch.setattr(_memory, "CHECK_EVERY", 0.0)  # every block measures the free heap
    for name in _memory.TUNING_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return libc


def settings(parameters: dict[int, int]) -> list[tuple]:
    return [("mallopt", p, v) for p, v in parameters.items()]


def test_set_on_entry_restored_and_trimmed_on_exit(fake):
    with _memory.reuse_host_memory():
        assert fake.calls == settings(_memory.DURING)
        with _memory.reuse_host_memory():  # nested: nothing more until the outermost block ends
            pass
        assert fake.calls == settings(_memory.DURING)
    assert fake.calls == [*settings(_memory.DURING), *settings(_memory.AFTER), ("malloc_trim", 0)]
    assert _memory._depth == 0


def test_restored_when_the_block_raises(fake):
    with pytest.raises(ValueError), _memory.reuse_host_memory():
        raise ValueError("boom")
    assert fake.calls[-1] == ("malloc_trim", 0)
    assert _memory._depth == 0


def test_a_small_free_heap_is_kept(fake):
    fake.free = _memory.KEEP_FREE  # what glibc keeps anyway: releasing it costs the next call
    with _memory.reuse_host_memory():
        pass
    assert fake.calls == [*settings(_memory.DURING), *settings(_memory.AFTER)]


def test_the_free_heap_is_measured_once_a_second_unless_the_process_grew(fake, monkeypatch):
    resident = [1 << 30]  # the process's resident bytes, as /proc would give them
    monkeypatch.setattr(_memory, "_resident", lambda: resident[0])
    monkeypatch.setattr(_memory, "CHECK_EVERY", 3600.0)
    trims = lambda: fake.calls.count(("malloc_trim", 0))  # noqa: E731
    with _memory.reuse_host_memory():
        pass
    assert trims() == 1  # the first block measures
    with _memory.reuse_host_memory():
        resident[0] += _memory.GREW  # grown, but not by more than GREW
    assert trims() == 1  # within the hour: not measured
    with _memory.reuse_host_memory():
        resident[0] += 1
    assert trims() == 2  # now by more than GREW since the last measure
    with _memory.reuse_host_memory():
        pass
    assert trims() == 2
    monkeypatch.setattr(_memory, "CHECK_EVERY", 0.0)
    with _memory.reuse_host_memory():
        pass
    assert trims() == 3  # a second later, measured again


def test_a_stated_budget_gives_the_heap_back_between_passes_that_could_exceed_it(fake, monkeypatch):
    resident = [1 << 30]
    monkeypatch.setattr(_memory, "_resident", lambda: resident[0])
    trims = lambda: fake.calls.count(("malloc_trim", 0))  # noqa: E731
    cpu = torch.device("cpu")
    with _memory.reuse_host_memory():
        _memory.expect_passes(100 << 20, 60 << 20, cpu)  # a 60 MiB pass under 100 MiB
        _memory.between_passes()
        resident[0] += 40 << 20  # 40 MiB freed but resident: 40 + 60 fits exactly
        _memory.between_passes()
        assert trims() == 0
        resident[0] += 1  # one byte more could take the next pass over the budget
        _memory.between_passes()
        assert trims() == 1
    assert _memory._limit is None  # the budget ends with the call
    with _memory.reuse_host_memory():  # no passes announced: reuse is never interrupted
        resident[0] += 1 << 30
        _memory.between_passes()
    with _memory.reuse_host_memory():  # a budget on another device is not of host memory
        _memory.expect_passes(1, 1, torch.device("meta"))
        _memory.between_passes()
    assert trims() == 1 + 3  # the one between passes, and each call's own end
    monkeypatch.setattr(_memory, "memory_budget", lambda device: 100 << 20)
    with _memory.reuse_host_memory():  # no budget stated: the default one is held the same way
        _memory.expect_passes(None, 60 << 20, cpu)
        _memory.between_passes()
        assert trims() == 4
        resident[0] += 41 << 20
        _memory.between_passes()
        assert trims() == 5


def test_the_planner_states_each_pass_it_plans(fake, monkeypatch):
    seen = []
    monkeypatch.setattr(_memory, "expect_passes", lambda *a: seen.append(a[:2]))
    cpu = torch.device("cpu")
    _memory.plan(8, 32, "auto", "auto", _memory.Cost(per_cotangent=10), cpu, max_memory=640)
    _memory.plan_forwards(100, "auto", 10, cpu, max_memory=250, fixed=5)
    _memory.plan_forwards(100, 7, 10, cpu, max_memory=250)
    assert seen == [(640, 8 * 8 * 10), (250, 5 + 24 * 10), (250, 0)]
    seen.clear()  # without a budget: the default one the sizes were planned against
    monkeypatch.setattr(_memory, "memory_budget", lambda device: 320)
    _memory.plan(8, 32, "auto", "auto", _memory.Cost(per_cotangent=10), cpu)
    _memory.plan_forwards(100, "auto", 10, cpu, fixed=5)
    _memory.plan_forwards(100, 7, 10, cpu)
    assert seen == [(320, 4 * 8 * 10), (320, 5 + 31 * 10), (None, 0)]


def _cgroups(root, monkeypatch, membership: str, files: dict[str, str]) -> None:
    """A fake cgroup file system under ``root``: this process in ``membership`` (the text of
    ``/proc/self/cgroup``), ``files`` relative to the mount."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "self-cgroup").write_text(membership)
    monkeypatch.setattr(_memory, "CGROUP_MOUNT", str(root))
    monkeypatch.setattr(_memory, "CGROUP_OF_PROCESS", str(root / "self-cgroup"))
    monkeypatch.setattr(_memory, "_cgroups", None)
    monkeypatch.setattr(_memory, "_process_limit", None)


GiB = 2**30


def test_the_default_budget_is_half_the_tightest_headroom(tmp_path, monkeypatch):
    """A batch job's cgroup (v2) limits a step below it: its headroom counts its page cache as
    free, and /proc/meminfo's available memory, which does not see the limit, is larger."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(_memory, "_available", lambda: 20 * GiB)
    _cgroups(tmp_path, monkeypatch, "0::/job/step\n", {
        "cgroup.controllers": "cpu io memory pids\n",
        "job/memory.max": f"{4 * GiB}\n",
        "job/memory.current": f"{3 * GiB}\n",
        "job/memory.stat": f"anon {2 * GiB}\nfile {GiB}\ninactive_file {GiB // 2}\n",
        "job/step/memory.max": "max\n",
        "job/step/memory.current": f"{2 * GiB}\n",
        "job/step/memory.stat": "inactive_file 0\n",
    })  # fmt: skip
    assert _memory.memory_budget(cpu) == (4 - 3 + 0.5) * GiB / 2
    monkeypatch.setattr(_memory, "_resident", lambda: 5 * GiB)
    _memory.limit_process(5 * GiB + GiB)  # a Dask worker 1 GiB below its nanny's kill limit
    assert _memory.memory_budget(cpu) == GiB / 2
    _memory.limit_process(None)
    monkeypatch.setattr(_memory, "_available", lambda: GiB)  # the host is tighter still
    assert _memory.memory_budget(cpu) == GiB / 2


def test_a_v1_memory_cgroup_is_read_and_no_limit_is_none(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(_memory, "_available", lambda: 20 * GiB)
    unlimited = "9223372036854771712\n"  # what v1 writes where no limit is set
    _cgroups(tmp_path, monkeypatch, "5:cpu,cpuacct:/slurm/job_7\n4:memory:/slurm/job_7\n0::/\n", {
        "memory/memory.limit_in_bytes": unlimited,
        "memory/slurm/memory.limit_in_bytes": unlimited,
        "memory/slurm/job_7/memory.limit_in_bytes": f"{8 * GiB}\n",
        "memory/slurm/job_7/memory.usage_in_bytes": f"{7 * GiB}\n",
        "memory/slurm/job_7/memory.stat": f"inactive_file 1\ntotal_inactive_file {GiB}\n",
    })  # fmt: skip
    assert _memory.memory_budget(cpu) == (8 - 7 + 1) * GiB / 2
    (tmp_path / "memory/slurm/job_7/memory.limit_in_bytes").write_text(unlimited)
    monkeypatch.setattr(_memory, "_cgroups", None)
    assert _memory._cgroup_headroom() is None
    assert _memory.memory_budget(cpu) == 10 * GiB
    # a path of another cgroup namespace: the mount's root is this process's own cgroup
    _cgroups(tmp_path / "ns", monkeypatch, "0::/../elsewhere\n", {
        "cgroup.controllers": "memory\n",
        "memory.max": f"{2 * GiB}\n",
        "memory.current": f"{GiB}\n",
        "memory.stat": "inactive_file 0\n",
    })  # fmt: skip
    assert _memory.memory_budget(cpu) == GiB / 2
    (tmp_path / "ns" / "self-cgroup").write_text("0::/..\n")  # outside the mount, and a folder
    monkeypatch.setattr(_memory, "_cgroups", None)
    assert _memory.memory_budget(cpu) == GiB / 2


def test_user_tuning_wins(fake, monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    with _memory.reuse_host_memory():
        pass
    assert fake.calls == []


def test_methods_run_inside_the_block(fake, models):
    ax.saliency(models["gpt2"], "The capital of France is", " Paris")
    ax.occlusion(models["gpt2"], "The capital of France is", " Paris")
    ax.attention(models["gpt2"], "The capital of France is", " Paris")  # one forward: not needed
    starts = [c for c in fake.calls if c == settings(_memory.DURING)[0]]
    assert len(starts) == 2
    assert fake.calls[-1] == ("malloc_trim", 0)


@pytest.mark.skipif(not _memory._is_glibc(), reason="glibc only")
def test_large_blocks_are_reused_not_faulted_anew(monkeypatch):
    for name in _memory.TUNING_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    pages = (256 << 20) // resource.getpagesize()  # a 256 MiB block: far above mmap's threshold

    def faults_of_second_block() -> int:
        torch.ones(256 << 18).sum()  # allocated, touched, freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(256 << 18).sum()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    with _memory.reuse_host_memory():
        # a small block freed in between can split the large one, hence the best of three
        assert min(faults_of_second_block() for _ in range(3)) < pages // 20


def test_switched_off_by_the_environment(fake, monkeypatch):
    monkeypatch.setenv(_memory.SWITCH, "system")
    with _memory.reuse_host_memory():
        pass
    assert fake.calls == []


_KERNEL_CACHE_VARIABLES = [name for names in _memory.KERNEL_CACHES for name in names]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}),
        # oneDNN's older name for the same cache is the user's choice too
        ({"DNNL_PRIMITIVE_CACHE_CAPACITY": "7"}, {"LRU_CACHE_CAPACITY": "64"}),
        ({"LRU_CACHE_CAPACITY": "2048"}, {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}),
        ({_memory.SWITCH: "system"}, {}),
    ],
)
def test_loading_a_model_bounds_the_kernel_caches_the_user_left_alone(monkeypatch, given, expected):
    for name in [*_KERNEL_CACHE_VARIABLES, _memory.SWITCH]:
        monkeypatch.delenv(name, raising=False)
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    ax.load_model()
    assert {name: os.environ.get(name) for name in _KERNEL_CACHE_VARIABLES} == {
        name: given.get(name, expected.get(name)) for name in _KERNEL_CACHE_VARIABLES
    }


def test_staged_copies_from_two_threads_do_not_mix(monkeypatch):
    """The staging buffer is shared per device: two threads copying at once take turns."""
    import threading

    import numpy as np

    monkeypatch.setattr(_memory, "_STAGE_BYTES", 64)
    monkeypatch.setattr(_memory, "_stages", {})
    tensors = [torch.arange(4000, dtype=torch.float32) * (i + 1) for i in range(4)]
    results: dict[int, np.ndarray] = {}

    def copy(i: int) -> None:
        for _ in range(200):
            results[i] = _memory._staged_to_host(tensors[i])
            np.testing.assert_array_equal(results[i], tensors[i].numpy())

    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            copy(i)
        except AssertionError as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


# --- budgets (max_memory) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [(4096, 4096), ("512MiB", 512 << 20), ("8GB", 8 * 10**9), ("1.5 kB", 1500), (None, None)],
)
def test_budgets_parse(given, expected):
    assert _memory.parse_bytes(given) == expected


def test_messages_round_a_smallest_budget_up():
    """A budget a message names, given back, is never below the one it rounds."""
    rng = np.random.default_rng(0)
    for n in [*rng.integers(1, 10**13, size=2000), 999, 1001, 999_999, 67_612_345]:
        named = _memory.format_bytes(int(n), up=True)
        assert int(n) <= _memory.parse_bytes(named.replace(" ", "")) < int(n) * 1.01 + 1, named
    assert _memory.format_bytes(999_999) == "1 MB"  # not "1e+03 kB"
    assert _memory.format_bytes(67_612_345) == "67.6 MB"
    assert _memory.format_bytes(67_612_345, up=True) == "67.7 MB"


# options small enough for the built-in model, per method
_SMALL = {
    **QUICK,
    "attribution_patching": {"corrupted": "1 2 4 ="},
    "activation_patching": {"corrupted": "1 2 4 ="},
    "edge_attribution_patching": {"corrupted": "1 2 4 ="},
    "edge_patching": {"corrupted": "1 2 4 =", "patch": [["input", "logits"]]},
}
_BUDGETED = [
    name for name in METHODS if "max_memory" in inspect.signature(getattr(ax, name)).parameters
]


# attribution patching's planned variants: the QK fix's held tensors, GradDrop's L rows a target
_VARIANTS = (
    [(name, _SMALL.get(name, {})) for name in _BUDGETED]
    + [
        ("attribution_patching", {**_SMALL["attribution_patching"], **extra})
        for extra in (
            {"site": "keys"},
            {"site": "values"},
            {"grad_drop": True},
            {"site": "neurons"},
            {"site": "neurons", "grad_drop": True},
        )
    ]
    + [
        ("activation_patching", {**_SMALL["activation_patching"], **extra})
        for extra in ({"site": "keys"}, {"site": "neurons", "layers": 1, "neurons": [0, 1]})
    ]
    + [
        # forward mode's jvps and every layer's gradients, each planned on its own terms
        ("input_x_gradient", {"mode": "forward", "reduce_hidden": "sum"}),
        ("integrated_gradients", {"steps": 3, "mode": "forward", "reduce_hidden": "sum"}),
        ("saliency", {"layers": "all"}),
        ("smoothgrad", {"samples": 2, "layers": "all"}),
        # the MLPs' neurons, wider than the residual stream; layer IG's start per layer
        ("saliency", {"layers": "all", "site": "neurons"}),
        ("integrated_gradients", {"steps": 3, "layers": "all", "site": "neurons"}),
        # each point's next node read at every layer (a forward without gradients)
        ("conductance", {"steps": 3, "layers": "all"}),
    ]
)


def _variant(value: object) -> str:
    if isinstance(value, str):
        return value
    assert isinstance(value, dict)
    return ",".join(f"{k}={v}" for k, v in value.items() if k != "corrupted") or "default"


@pytest.mark.parametrize(("name", "options"), _VARIANTS, ids=_variant)
def test_the_smallest_budget_a_refusal_names_is_met(name, options):
    """Every method with ``max_memory``: a budget too small for one pass is refused, naming the
    smallest that can be met, and that budget, given back as written, is accepted."""
    model, fn = ax.load_model(), getattr(ax, name)
    given = ("1 2 3 =", " 3 2 1")
    if name == "decompx":  # the sequence classifiers' method
        model, given = ax.load_model("attrax:classifier"), ("the plot was good", "all")
    with pytest.raises(ax.OptionError, match="cannot be met") as refused:
        fn(model, *given, max_memory=1, **options)
    named = re.search(r"estimated ([\d.]+ [kMGT]?B); give at least that", str(refused.value))
    assert named, str(refused.value)
    got = fn(model, *given, max_memory=named.group(1), **options)
    assert json.loads(got.attrs["options"])["max_memory"] == named.group(1)
    # and it is the smallest: the message rounds the estimate up by less than 1 %, so a budget
    # 1 % below the one named is below the estimate, refused with the same smallest budget
    below = _memory.parse_bytes(named.group(1).replace(" ", "")) * 100 // 101
    with pytest.raises(ax.OptionError, match="cannot be met") as again:
        fn(model, *given, max_memory=below, **options)
    assert f"estimated {named.group(1)};" in str(again.value), str(again.value)


def test_forward_mode_plans_its_jvps_a_source_token_each(models, monkeypatch):
    """Forward mode's passes are source tokens' jvps: planned as such, cut by the budget or by
    ``chunk_size``, and equal to reverse mode; ``"auto"`` takes reverse mode where only that
    meets the budget (until 2026-12-06 it planned every target's backward, then ran every
    token's jvp at once, 3-4x over the smallest budget it named)."""
    model = models["gpt2"]
    source, target = "The capital of France is", " Paris, and the capital of Italy is Rome."
    options = {"reduce_hidden": "sum", "steps": 4}
    reverse = ax.integrated_gradients(model, source, target, mode="reverse", **options)
    cost = _memory.Cost(per_cotangent=1000, per_point=500, fixed=10_000)
    monkeypatch.setattr(Problem, "forward_cost", lambda self: cost)
    jvps: list[int] = []
    real = _engine._token_tangents

    def tangents(flat, direction, side, tokens):  # each call: one chunk's jvps
        jvps.append(len(range(direction.shape[1])[tokens]))
        return real(flat, direction, side, tokens)

    monkeypatch.setattr(_engine, "_token_tangents", tangents)
    # the planner halves the tokens first (7, 4, 2): every point, two tokens a pass
    budget = 10_000 + 4 * (500 + 2 * 1000)
    got = ax.integrated_gradients(model, source, target, mode="forward", max_memory=budget,
                                  **options)  # fmt: skip
    assert_close(got.values, reverse.values, rtol=1e-4, atol=1e-6)
    tokens = got.sizes["source"]  # the prompt and the target: one pass of every point
    assert max(jvps) == 2 and sum(jvps) == tokens, jvps
    jvps.clear()
    ax.integrated_gradients(model, source, target, mode="forward", chunk_size=3, **options)
    assert max(jvps) == 3 and sum(jvps) == tokens, jvps
    with pytest.raises(ax.OptionError, match=r"the smallest passes with chunk_size=2 need"):
        ax.integrated_gradients(model, source, target, mode="forward", chunk_size=2,
                                max_memory=10_000, **options)  # fmt: skip
    with pytest.raises(ax.OptionError, match=r"\(one source token, one point\) need an esti"):
        ax.integrated_gradients(model, source, target, mode="forward", max_memory=10_000,
                                **options)  # fmt: skip
    # "auto", fewer source tokens than targets (an encoder-decoder's): forward mode where it
    # meets the budget, else reverse mode
    model = models["marian"]
    source, target = "a b", " the cat sat on the mat and the dog sat on the log"
    reverse = ax.integrated_gradients(model, source, target, mode="reverse", **options)
    assert reverse.sizes["source"] < reverse.sizes["target"]
    for fixed, mode_ran in ((10_000, "forward"), (1 << 40, "reverse")):
        monkeypatch.setattr(Problem, "forward_cost", lambda self, f=fixed: cost._replace(fixed=f))
        jvps.clear()
        auto = ax.integrated_gradients(model, source, target, max_memory="8GB", **options)
        assert bool(jvps) == (mode_ran == "forward"), (fixed, jvps)
        assert_close(auto.values, reverse.values, rtol=1e-4, atol=1e-6)


def test_vargrads_two_moments_are_priced_as_held_to_the_end(models, monkeypatch):
    """VarGrad keeps two [B, K, L, H] float32 sums (the gradients and their squares) to the end,
    then ``square - mean ** 2`` and the labelled result: three arrays more than SquareGrad's one
    sum and its copy. Priced as one, a 20-class classifier's VarGrad held 395 MiB under a 411
    MiB budget (96%; ``budgets-every-cpu.json``, C2)."""
    model = models["gpt2"]
    source, target = PAIRS[0]
    problem = Problem.build(model, prepare(model, source, target), resolve("probability")[1], False)
    x = problem.inputs[0]
    array = x.shape[0] * problem.tensors.valid.shape[1] * x.shape[1] * x.shape[2] * 4
    fixed_cost(monkeypatch, _memory.Cost(per_cotangent=1000, per_point=500, fixed=10_000))
    # one point, one target a pass; and both methods' two draws of noise, held to the end
    smallest = 10_000 + 500 + 1000 + 2 * x.numel() * x.element_size()
    ax.squaregrad(model, source, target, samples=2, max_memory=smallest)
    with pytest.raises(ax.OptionError, match="cannot be met"):
        ax.vargrad(model, source, target, samples=2, max_memory=smallest + 3 * array - 1)
    ax.vargrad(model, source, target, samples=2, max_memory=smallest + 3 * array)


@pytest.mark.parametrize(
    ("name", "options", "per_sample"),
    [
        # the noise per sample: one [L, H] draw per example and side
        ("smoothgrad", {}, lambda x: x.numel() * x.element_size()),
        ("squaregrad", {}, lambda x: x.numel() * x.element_size()),
        # and a baseline index and a point on the path per example
        ("gradient_shap", {}, lambda x: x.numel() * x.element_size() + x.shape[0] * 12),
        ("deeplift_shap", {}, lambda x: x.numel() * x.element_size() + x.shape[0] * 8),
    ],
)
def test_draws_held_through_the_call_are_priced_and_refused_first(
    models, monkeypatch, name, options, per_sample
):
    """Methods that draw every sample before the first pass hold ``samples`` times a draw to
    the end: the planner adds them to each pass, and draws that alone exceed the budget are an
    OptionError naming ``samples`` before they are allocated (a raw allocator traceback, and
    draws missing from the estimate, until 2026-12-06)."""
    model = models["gpt2"]
    source, target = PAIRS[0]
    x = Problem.build(model, prepare(model, source, target), resolve("probability")[1], False)
    draw = per_sample(x.inputs[0])
    fixed_cost(monkeypatch, _memory.Cost(per_cotangent=1000, per_point=500, fixed=10_000))
    # DeepLIFT's problem adds the reference inputs it keeps per point to the estimate
    monkeypatch.setattr(_deeplift._Problem, "cost", Problem.cost)
    smallest = 10_000 + 500 + 1000  # one point, one target a pass
    fn, samples = getattr(ax, name), 3
    with pytest.raises(ax.OptionError, match="cannot be met: the smallest passes"):
        fn(model, source, target, samples=samples, max_memory=smallest + samples * draw - 1)
    fn(model, source, target, samples=samples, max_memory=smallest + samples * draw)
    monkeypatch.setattr(_engine, "memory_budget", lambda device: 10**6)  # 2 MB free
    too_many = (2 * 10**6 - 10_000) // draw + 1
    with pytest.raises(ax.OptionError, match=f"`samples`={too_many} needs .* free on cpu"):
        fn(model, source, target, samples=too_many)


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79 GiB total)"),
        RuntimeError(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 2000 bytes"
        ),
        MemoryError("Unable to allocate 745. GiB for an array with shape (10,)"),
        # sizes whose bytes overflow int64 (2**61 steps): numpy's and torch's own words
        ValueError("array is too big; `arr.size * arr.dtype.itemsize` is larger than ..."),
        RuntimeError("Storage size calculation overflowed with sizes=[2305843009213693952, 1]"),
    ],
)
def test_running_out_of_memory_is_one_line_naming_the_sizes(models, monkeypatch, failure):
    """An allocation that fails inside a method is a ResourceError (a MemoryError too) that
    names the method, what it tried and the sizes given; other errors pass unchanged."""
    model = models["gpt2"]

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(Problem, "gradient_sum_with_hidden", fail)
    with pytest.raises(ax.ResourceError) as raised:
        ax.integrated_gradients(model, *PAIRS[0], steps=7, batch_size=2)
    message = str(raised.value)
    assert isinstance(raised.value, MemoryError) and "\n" not in message
    assert message.startswith("integrated_gradients ran out of memory on cpu")
    if "allocate" in str(failure):
        assert re.search(r"\(it tried to allocate (20.00 GiB|2 kB|745 GiB)\)", message), message
    assert "with steps=7, batch_size=2:" in message
    assert raised.value.__context__ is None and raised.value.__cause__ is None
    monkeypatch.setattr(Problem, "gradient_sum_with_hidden", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        ax.integrated_gradients(model, *PAIRS[0])
    # out of memory while the problem is built: the message does not build it again
    built = []

    def build(*args, **kwargs):
        built.append(1)
        raise failure

    monkeypatch.setattr(Problem, "build", build)
    with pytest.raises(ax.ResourceError, match=r"^saliency ran out of memory on cpu.*: give"):
        ax.saliency(model, *PAIRS[0])
    assert built == [1]


@pytest.mark.parametrize(
    ("name", "option"),
    [("integrated_gradients", "steps"), ("lime", "samples"), ("shapley_sampling", "permutations"),
     ("saliency", "chunk_size")],
)  # fmt: skip
def test_counts_past_int64_are_refused_before_torch_overflows(models, name, option):
    # torch's C++ overflow ("Overflow when unpacking long long"), until 2026-12-06
    with pytest.raises(ax.OptionError, match=f"`{option}` must be at most 2\\*\\*62, got {2**70}"):
        getattr(ax, name)(models["gpt2"], *PAIRS[0], **{option: 2**70})


@pytest.mark.parametrize("bad", [0, -1, "", "8 GiBs", "GB", True, 1.5e9, "0.1B", "1.5", "2.5 B"])
def test_a_bad_budget_is_refused_before_the_model_runs(models, bad):
    with pytest.raises(ax.OptionError, match="`max_memory` must be a positive number of bytes"):
        ax.saliency(models["gpt2"], *PAIRS[0], max_memory=bad)


def test_budget_is_common_to_the_engine_families_and_refused_elsewhere(models):
    model = models["gpt2"]
    for method in (ax.saliency, ax.integrated_gradients, ax.occlusion, ax.lime):
        got = method(model, *PAIRS[0], max_memory="1GB")
        assert json.loads(got.attrs["options"])["max_memory"] == "1GB"
    relevance = ax.l2_norm(ax.saliency(model, *PAIRS[0]))
    curve = ax.deletion(model, relevance, *PAIRS[0], max_memory=10**9)
    assert json.loads(curve.attrs["options"])["max_memory"] == 10**9
    for method, why in (
        (ax.attention, "keeping only the attributed rows"),
        (ax.rollout, "keeping only the attributed rows"),
        (ax.step_scores, "no sizes to plan"),
    ):
        with pytest.raises(ax.OptionError, match=f"does not take `max_memory`.*{why}"):
            method(model, *PAIRS[0], max_memory="1GB")


def fixed_cost(monkeypatch, cost: _memory.Cost) -> None:
    """Every problem estimates ``cost``, whatever its shapes."""
    monkeypatch.setattr(Problem, "cost", lambda self, saved=True: cost)


def cut_at_every_target(monkeypatch) -> None:
    """Decoder-only chunks cut right after their last target (not at a multiple of a sixteenth of
    the sequence): each chunk here then has a length of its own for the work model to weigh."""
    monkeypatch.setattr(_engine, "CUT_SHAPES", 10**9)


def test_the_planner_fits_the_budget_it_is_given(models, monkeypatch):
    """With a patched estimate, max_memory decides the sizes, and a budget that even one target
    and one point exceed is an OptionError naming the smallest one that can be met."""
    model = models["llama"]
    sources, targets = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    whole = ax.integrated_gradients(model, sources, targets, steps=6, batch_size=None)
    fixed_cost(monkeypatch, _memory.Cost(per_cotangent=1000, per_point=500, fixed=10_000))
    cut_at_every_target(monkeypatch)
    problem = Problem.build(
        model, prepare(model, sources, targets), resolve("probability")[1], False
    )
    k = problem.tensors.valid.shape[1]
    # decoder-only, each target chunk runs a forward over its sequence up to its last target:
    # one target a chunk, the 5 sequences end after 7, 8, ..., 11 tokens
    assert k == 5 and [n for _, n in problem._target_chunks(1)] == [7, 8, 9, 10, 11]
    passes = _record_passes(monkeypatch)
    for budget, expected in [
        (10_000 + 6 * (500 + k * 1000), (None, None)),
        # the work model: all 5 targets (11 * (1 + 5) = 66) are less work than chunks of 3
        # (9 * 4 + 11 * 3 = 69), 2 (76) or 1 (90), and fit with 2 points (21,000 <= 25,000)
        (10_000 + 6 * (500 + 2 * 1000), (2, None)),
        # the work model: at one point at most 4 targets fit (14,500), so 3 (69) beats 2 (76)
        (10_000 + 3 * (500 + 1000), (1, 3)),
        (10_000 + 1 * (500 + 1000), (1, 1)),
    ]:
        bounded = dataclasses.replace(problem, max_memory=budget)
        assert bounded.plan(6, "auto", "auto") == expected, budget
        passes.clear()
        got = ax.integrated_gradients(model, sources, targets, steps=6, max_memory=budget)
        assert_close(got.values, whole.values, rtol=1e-5, atol=1e-6)
        # the call ran the planned passes, not just planned them: each (point, target) once,
        # no pass above the budget at the patched estimate, and as large as the plan allows
        points, chunk = expected[0] or 6, expected[1] or k
        assert sum(n * t for n, t in passes) == 6 * k, (budget, passes)
        assert max(n for n, _ in passes) == points and max(t for _, t in passes) == chunk
        assert all(10_000 + n * (500 + t * 1000) <= budget for n, t in passes), (budget, passes)
    with pytest.raises(ax.OptionError, match=r"`max_memory` of 11.5 kB cannot be met.*11.5 kB"):
        ax.integrated_gradients(model, sources, targets, steps=6, max_memory=11_499)
    with pytest.raises(ax.OptionError, match="the smallest passes with chunk_size=4"):
        ax.integrated_gradients(model, sources, targets, steps=6, chunk_size=4, max_memory=12_000)
    # both sizes given: checked, not dropped (they ran whatever the budget until 2026-12-05)
    given = {"steps": 6, "chunk_size": 1, "batch_size": 2}
    with pytest.raises(ax.OptionError, match=r"cannot be met with batch_size=2 and chunk_size=1"):
        ax.integrated_gradients(model, sources, targets, **given, max_memory=12_999)
    got = ax.integrated_gradients(model, sources, targets, **given, max_memory=13_000)
    assert_close(got.values, whole.values, rtol=1e-5, atol=1e-6)
    with pytest.raises(ax.OptionError, match=r"cannot be met with batch_size=4: its forwards"):
        ax.occlusion(model, sources, targets, batch_size=4, max_memory=11_999)
    ax.occlusion(model, sources, targets, batch_size=4, max_memory=12_000)  # 10,000 + 4 * 500


@pytest.mark.parametrize(
    ("name", "options", "points"),
    [
        ("greedy_pig", {"rounds": 2, "steps": 6}, 6),  # its quadrature nodes
        ("guided_integrated_gradients", {"steps": 4}, 1),  # one point at a time
        ("pgd", {"steps": 2}, "source"),  # one token moved per copy
    ],
)
def test_methods_with_a_copy_per_target_plan_every_copy(models, monkeypatch, name, options, points):
    """Greedy PIG's later rounds, guided IG and PGD run each (target, point) as a copy of the
    batch: under a budget, every forward's copies, each with what its forward saves, fit it.
    Planned as one forward with many cotangents, a budget for 2 targets at every point let in
    twice the copies (greedy PIG measured 573 MiB under 457), and the result does not change.
    Each copy sends its own target's row alone to the head: every target's row in every copy
    took guided IG 312 MiB under a 294 MiB budget on W1 (vocabulary 50,257, 32 targets)."""
    model = models["gpt2"]
    whole = getattr(ax, name)(model, *PAIRS[1], **options)
    points = whole.sizes["source"] if points == "source" else points
    fixed_cost(monkeypatch, _memory.Cost(per_cotangent=1000, per_point=500, fixed=10_000))
    copies: list[int] = []
    rows: set[int] = set()
    original = Problem.hidden_fn

    def counted(self, n, *args, **kwargs):
        h = original(self, n, *args, **kwargs)
        if not kwargs.get("own"):  # one forward for many cotangents (greedy PIG's first round)
            return h

        def recorded(*embeds):
            out = h(*embeds)
            copies.append(embeds[0].shape[0] // self.tensors.valid.shape[0])
            rows.add(out.shape[1])
            return out

        return recorded

    monkeypatch.setattr(Problem, "hidden_fn", counted)
    budget = 10_000 + points * (500 + 2 * 1000)
    got = getattr(ax, name)(model, *PAIRS[1], max_memory=budget, **options)
    assert copies and max(copies) * (500 + 1000) + 10_000 <= budget, copies
    assert rows == {1}, rows  # the head sees one row per copy
    assert_close(got.values, whole.values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["head_attribution", "attention_x_gradient"])
def test_head_methods_plan_eager_attention_and_every_targets_head_rows(monkeypatch, name):
    """The attention-gradient methods probe eager attention whatever the model runs, and one
    backward through the head serves all their target chunks: their estimate counts eager's
    ``[heads, L, L]`` weights on an SDPA model too, and per point every target's rows over the
    vocabulary, the rows the call's head computes (on W1, GPT-2's 50,257 tokens, head
    attribution took 301 MiB under a 250 MiB budget without them)."""
    from attrax import _heads
    from attrax.testing import corpus, tiny_model

    hf, tok = tiny_model("gpt2", n_head=8, vocab_size=50257)
    words = " ".join(corpus()).split()
    prompt, target = " ".join(words[:16]), " " + " ".join(words[16:20])
    costs: dict[str, _memory.Cost] = {}
    per_copy: list[int] = []
    plan, head = _heads.plan, ax.Model.head

    def recorded_head(self, hidden):
        out = head(self, hidden)
        per_copy.append(out[0].numel() * out.element_size())  # one copy's rows
        return out

    monkeypatch.setattr(ax.Model, "head", recorded_head)
    for attention in ("eager", "sdpa"):
        model = ax.load_model(hf, tokenizer=tok, attn_implementation=attention)
        monkeypatch.setattr(
            _heads, "plan", lambda *a, at=attention: costs.setdefault(at, a[4]) and plan(*a)
        )
        getattr(ax, name)(model, prompt, target, max_memory="1GB")
    assert costs["sdpa"] == costs["eager"], costs
    assert costs["eager"].per_point >= max(per_copy), (costs["eager"], max(per_copy))


@pytest.mark.parametrize(
    ("batch_size", "layers"), [("auto", 1), (None, 4), (1, 1), (8, 1), (9, 2), (20, 3)]
)
def test_head_attribution_plans_the_probes_of_one_forward(monkeypatch, batch_size, layers):
    """Each target holds the gradients of the attention maps its backward differentiates: those
    of the layers whose copies share a forward (one under ``"auto"``), not every layer's (on a
    32-layer model that would be 32 times too many)."""
    from attrax import _heads
    from attrax.testing import corpus, tiny_model

    hf, tok = tiny_model("gpt2", n_layer=4, n_head=4)
    model = ax.load_model(hf, tokenizer=tok, attn_implementation="eager")
    words = " ".join(corpus()).split()
    prompt, target = " ".join(words[:12]), " " + " ".join(words[12:15])
    plan, gradients = _heads.plan, _heads._gradients
    costs: list[_memory.Cost] = []
    maps_of_forward: list[dict] = []  # the maps each backward differentiates

    def recorded(problem, maps, *args, **kwargs):
        maps_of_forward.append(maps)
        return gradients(problem, maps, *args, **kwargs)

    monkeypatch.setattr(_heads, "plan", lambda *a: costs.append(a[4]) or plan(*a))
    monkeypatch.setattr(_heads, "_gradients", recorded)
    ax.head_attribution(model, prompt, target, steps=8, batch_size=batch_size)
    assert max(map(len, maps_of_forward)) == layers, [list(m) for m in maps_of_forward]
    one_map = max(a.numel() * a.element_size() for a in maps_of_forward[0].values())
    assert costs[0].per_target == 3 * layers * one_map, (costs[0], one_map)


def test_cpu_passes_take_fewer_points_not_fewer_targets(monkeypatch):
    """On the CPU, points are halved until a pass fits CPU_PASS, with or without max_memory
    (the targets keep the budget's plan: fewer targets per pass can cost a forward each); a
    given batch_size or another device keeps the budget's plan alone."""
    monkeypatch.setattr(_memory, "memory_budget", lambda device: 1 << 40)  # a huge host
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    cost = _memory.Cost(per_cotangent=_memory.CPU_PASS // 64, per_point=0, fixed=0)
    # 50 points x 32 targets: 25 passes' worth; 50 -> 25 -> 13 -> 7 -> 4 -> 2 points (one pass)
    assert _memory.plan(50, 32, "auto", "auto", cost, cpu) == (2, None)
    assert _memory.plan(50, 32, "auto", "auto", cost, gpu) == (None, None)
    assert _memory.plan(50, 32, 10, "auto", cost, cpu) == (10, None)
    assert _memory.plan(50, 32, "auto", "auto", cost, cpu, max_memory=1 << 40) == (2, None)
    assert _memory.plan(50, 32, "auto", "auto", cost, gpu, max_memory=1 << 40) == (None, None)
    assert _memory.plan(1, 32, "auto", "auto", cost, cpu) == (None, None)  # one point: as is


def test_cpu_forwards_take_at_most_a_pass_of_copies(monkeypatch):
    """On the CPU, perturbed copies per forward stop at what fits CPU_PASS, with or without
    max_memory; another device, or a given batch_size, keeps the budget's plan alone."""
    monkeypatch.setattr(_memory, "memory_budget", lambda device: 1 << 40)  # a huge host
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    per_copy, fixed = _memory.CPU_PASS // 64, 1 << 20
    # (CPU_PASS - 1 MiB) // (CPU_PASS / 64) = 63 copies a forward
    assert _memory.plan_forwards(1000, "auto", per_copy, cpu, fixed=fixed) == 63
    assert _memory.plan_forwards(1000, "auto", per_copy, cpu, 1 << 40, fixed) == 63
    assert _memory.plan_forwards(1000, "auto", per_copy, cpu, per_copy * 11 + fixed, fixed) == 11
    assert _memory.plan_forwards(1000, "auto", per_copy, gpu, 1 << 40, fixed) == 1000
    assert _memory.plan_forwards(1000, 500, per_copy, cpu, fixed=fixed) == 500
    # one copy above a pass still runs, one a forward
    assert _memory.plan_forwards(1000, "auto", 2 * _memory.CPU_PASS, cpu, fixed=fixed) == 1


def test_perturbation_batches_fit_the_budget(models, monkeypatch):
    """batch_size='auto' takes as many copies per forward as fit max_memory."""
    model = models["gpt2"]
    whole = ax.occlusion(model, *PAIRS[0], batch_size=None)
    fixed_cost(monkeypatch, _memory.Cost(per_cotangent=0, per_point=1000, fixed=0))
    sizes: list[int] = []
    evaluate = Problem.evaluate
    monkeypatch.setattr(
        Problem,
        "evaluate",
        lambda self, points: sizes.append(points[0].shape[0]) or evaluate(self, points),
    )
    got = ax.occlusion(model, *PAIRS[0], max_memory=3000)
    np.testing.assert_allclose(got.values, whole.values, rtol=1e-6, atol=1e-9)
    assert max(sizes) == 3 and len(sizes) > 1  # several forwards of at most 3 copies
    with pytest.raises(
        ax.OptionError, match="one perturbed copy per forward needs an estimated 1 kB"
    ):
        ax.occlusion(model, *PAIRS[0], max_memory=999)


# A model big enough that its passes dwarf the process's noise, and a long input
_BUDGET_MODEL = """
import attrax as ax
from attrax.testing import corpus, tiny_model
hf, tok = tiny_model("gpt2", n_embd=128, n_layer=4, n_head=4, n_positions=1024{config})
model = ax.load_model(hf{cast}, tokenizer=tok, attn_implementation="eager")
words = " ".join(corpus()).split()
prompt, target = " ".join(words[:100]), " " + " ".join(words[100:124])
def warm():
    ax.{method}(model, {warm}, {options})
def call():
    ax.{method}(model, prompt, target, {options})
"""


SHORT = '"a b c", " d e"'
# a warm-up whose heap, once trimmed, leaves holes the call's passes fault back in one by one:
# without the release between passes, 279-1012 MiB resident under this 300 MiB budget
MEDIUM = '" ".join(words[:40]), target'


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "options", "budget", "config", "warm"),
    [
        ("saliency", "", 110 << 20, "", SHORT),
        ("integrated_gradients", "steps=16", 200 << 20, "", SHORT),
        ("occlusion", "", 120 << 20, "", SHORT),
        # GPT-2's vocabulary: each copy's logits at the 24 target rows outweigh its body
        ("occlusion", "", 300 << 20, ", vocab_size=50257", SHORT),
        ("occlusion", "", 300 << 20, ", vocab_size=50257", MEDIUM),
        # the call's own overhead counts: value zeroing once planned its copies alone
        ("value_zeroing", "", 90 << 20, "", SHORT),
        # forward mode's jvps, a source token's each: until 2026-12-06 planned as the reverse
        # pass of every target, all tokens at once (1,078 MiB)
        ("input_x_gradient", "mode='forward', reduce_hidden='sum'", 110 << 20, "", SHORT),
        # every layer's gradients: until 2026-12-06 priced as one layer's (203 MiB)
        ("saliency", "layers='all'", 170 << 20, "", SHORT),
        # the MLPs' neurons, four times the residual stream's width
        ("saliency", "layers='all', site='neurons'", 260 << 20, "", SHORT),
        # layer IG runs each point once per layer: until 2026-12-07 planned as one copy (317 MiB
        # under a 300 MiB budget)
        ("integrated_gradients", "steps=16, layers='all', site='neurons'", 450 << 20, "", SHORT),
        ("integrated_gradients", "steps=16, layers='all'", 350 << 20, "", SHORT),
        # every layer's activations at each point's next node, besides its gradients
        ("conductance", "steps=16, layers='all'", 150 << 20, "", SHORT),
        # a block of steps' logits over GPT-2's vocabulary: until 2026-12-06 all of them at once
        ("reagent", "probes=8, max_steps=16, top_k=1", 150 << 20, ", vocab_size=50257", SHORT),
        # every (layer, node, target) a copy of the batch
        ("knowledge_neurons", "steps=4", 150 << 20, "", SHORT),
        # every token's path of 64 points, held through the call
        ("discretized_integrated_gradients", "steps=64, neighbours=8", 200 << 20, "", SHORT),
        # every layer's per-head edge weights and every target's route held; the query rows'
        # per-head, per-source vectors chunked
        ("information_flow", "per_head=True", 250 << 20, "", SHORT),
    ],
)
def test_the_measured_peak_stays_within_the_budget(
    peak_above_start, method, options, budget, config, warm, cast=""
):
    """On the CPU the call's peak RSS above its start stays within max_memory, where without a
    budget the same call takes more."""
    free, bounded = (
        peak_above_start(
            _BUDGET_MODEL.format(
                method=method,
                options=", ".join(filter(None, [options, extra])),
                config=config,
                warm=warm,
                cast=cast,
            )
        )
        for extra in ("", f"max_memory={budget}")
    )
    mib = 2**20
    print(f"{method}: unbounded {free['peak'] / mib:.0f} MiB, budget {budget / mib:.0f} MiB, "
          f"bounded {bounded['peak'] / mib:.0f} MiB")  # fmt: skip
    assert free["peak"] > budget, "the workload must need more than the budget unbounded"
    assert bounded["peak"] <= budget, (bounded["peak"] / 2**20, budget / 2**20)


# the edges' methods: against a corrupted prompt of as many tokens (its warm-up's too)
_EDGES_WARM = '" ".join(words[:3]), " d e", corrupted=" ".join(["x"] + words[1:3])'


def _edges_peaks(peak_above_start, method: str, options: str, warm: str, budget: int):
    """``method``'s peaks above its start without a budget and under ``budget``."""
    code = _BUDGET_MODEL.replace(
        "def warm():", "bad = ' '.join(['x'] + words[1:100])\ndef warm():"
    ).replace("ax.{method}(model, {warm}, {options})", "ax.{method}(model, {warm})")
    return (
        peak_above_start(
            code.format(
                method=method,
                options=", ".join(filter(None, ["corrupted=bad", options, extra])),
                config="",
                warm=warm,
                cast="",
            )
        )
        for extra in ("", f"max_memory={budget}")
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("options", "budget"),
    [("", 150 << 20), ("steps=16", 150 << 20),
     ("steps=2, interpolate='activations'", 150 << 20)],
)  # fmt: skip
def test_edge_attribution_patchings_measured_peak_stays_within_the_budget(
    peak_above_start, options, budget
):
    """EAP, EAP-IG (16 points, made a pass at a time) and EAP-IG over activations (2 points for
    each of 9 node groups) on the same model and input: 207-252, 814-957 and 790 MiB without
    a budget, 55-59, 56-65 and 60 MiB under 150 MiB when measured (2026-12-07)."""
    free, bounded = _edges_peaks(
        peak_above_start, "edge_attribution_patching", options, _EDGES_WARM, budget
    )
    mib = 2**20
    print(f"{options}: unbounded {free['peak'] / mib:.0f} MiB, bounded {bounded['peak'] / mib:.0f}")
    assert free["peak"] > budget, "the workload must need more than the budget unbounded"
    assert bounded["peak"] <= budget, (bounded["peak"] / 2**20, budget / 2**20)


@pytest.mark.slow
def test_edge_patchings_measured_peak_stays_within_the_budget(peak_above_start):
    """32 circuits, a copy of the batch each; measured (2026-12-07): 303-329 MiB without a
    budget, 66-91 MiB under 150 MiB."""
    budget = 150 << 20
    free, bounded = _edges_peaks(
        peak_above_start, "edge_patching", "circuit=[[]] * 32", _EDGES_WARM + ", patch=[]", budget
    )
    mib = 2**20
    print(f"unbounded {free['peak'] / mib:.0f} MiB, bounded {bounded['peak'] / mib:.0f} MiB")
    assert free["peak"] > budget, "the workload must need more than the budget unbounded"
    assert bounded["peak"] <= budget, (bounded["peak"] / 2**20, budget / 2**20)


# OLMo 2's blocks: norms on the sublayers' outputs only, query and key norms over all heads
_OLMO2_MODEL = """
import torch
import attrax as ax
from transformers import AutoModelForCausalLM, Olmo2Config
from attrax.testing import corpus, tiny_model
_, tok = tiny_model("gpt2")
config = Olmo2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=512,
                     num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                     max_position_embeddings=1024, pad_token_id=None, bos_token_id=None,
                     eos_token_id=None)
torch.manual_seed(0)
hf = AutoModelForCausalLM.from_config(config).eval()
model = ax.load_model(hf, tokenizer=tok, attn_implementation="eager")
words = " ".join(corpus()).split()
prompt, target = " ".join(words[:100]), " " + " ".join(words[100:124])
bad = " ".join(["x"] + words[1:100])
def warm():
    ax.{method}(model, {warm})
def call():
    ax.{method}(model, prompt, target, {options})
"""


# DeepSeek V3's multi-head latent attention (queries through their own latent), dense MLPs
_LATENT_MODEL = _OLMO2_MODEL.replace("Olmo2Config", "DeepseekV3Config").replace(
    "num_key_value_heads=8,",
    "num_key_value_heads=8, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, "
    "qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=4, n_routed_experts=4, "
    "moe_intermediate_size=64, num_experts_per_tok=2, n_group=1, topk_group=1,",
)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["OLMo 2", "DeepSeek V3"])
@pytest.mark.parametrize(
    ("method", "options", "warm"),
    [
        ("edge_attribution_patching", "", _EDGES_WARM),
        ("edge_attribution_patching", "steps=16", _EDGES_WARM),
        ("edge_patching", "circuit=[[]] * 32", _EDGES_WARM + ", patch=[]"),
    ],
)
def test_the_edges_through_a_readers_own_code_stay_within_the_budget(
    peak_above_start, family, method, options, warm
):
    """The deltas pushed through each query and key norm over all heads (OLMo 2) or each
    latent attention's code up to its call (DeepSeek V3) in EAP, and each remade head's whole
    projection or query, key and value made at the call in edge patching, are priced.
    Measured without a budget, then under 220 MiB: OLMo 2 (2026-12-07) 303, 830 and 711 MiB,
    then 78, 67 and 68 MiB (the smallest EAP accepts: 199 MB); DeepSeek V3 (2026-12-08) 301,
    878 and 1028 MiB, then 67, 74 and 101 MiB."""
    budget = 220 << 20
    script = _OLMO2_MODEL if family == "OLMo 2" else _LATENT_MODEL
    free, bounded = (
        peak_above_start(script.format(
            method=method, warm=warm,
            options=", ".join(filter(None, ["corrupted=bad", options, extra])),
        ))
        for extra in ("", f"max_memory={budget}")
    )  # fmt: skip
    mib = 2**20
    print(f"{family} {method} {options}: unbounded {free['peak'] / mib:.0f} MiB, bounded "
          f"{bounded['peak'] / mib:.0f} MiB")  # fmt: skip
    assert free["peak"] > budget, "the workload must need more than the budget unbounded"
    assert bounded["peak"] <= budget, (bounded["peak"] / 2**20, budget / 2**20)


# a state-space model and a mixture of experts, 128 wide, on the same 124-token input
_SCAN_MODEL = """
import torch
import transformers
import attrax as ax
from attrax.testing import corpus, tiny_model
_, tok = tiny_model("llama")
torch.manual_seed(0)
config = transformers.{config}(vocab_size=len(tok), hidden_size=128, num_hidden_layers=4, {layout})
hf = transformers.AutoModelForCausalLM.from_config(config)
model = ax.load_model(hf, tokenizer=tok)
words = " ".join(corpus()).split()
prompt, target = " ".join(words[:100]), " " + " ".join(words[100:124])
def warm():
    ax.saliency(model, "a b c", " d e", {options})
def call():
    ax.saliency(model, prompt, target, {options})
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "layout", "budget"),
    [
        ("Mamba2Config", "num_heads=4, head_dim=64, state_size=32, n_groups=1", 150 << 20),
        ("MambaConfig", "state_size=16", 300 << 20),
        ("MixtralConfig", "num_attention_heads=4, num_key_value_heads=2, intermediate_size=256, "
         "num_local_experts=8", 120 << 20),  # unbounded 149-205 MiB
    ],
)  # fmt: skip
def test_a_scan_or_experts_peak_stays_within_the_budget(peak_above_start, config, layout, budget):
    """Mamba's and Mamba 2's scans and Mixtral's experts, priced by ``_arch.mixer_width`` and
    ``_arch.experts_width``: the call's peak RSS above its start stays within max_memory, where
    without a budget it takes more."""
    script = _SCAN_MODEL.format(config=config, layout=layout, options="{options}")
    _holds_its_budget(peak_above_start, script, budget, config)


def _holds_its_budget(peak_above_start, script: str, budget: int, label: str) -> None:
    """``script`` (its ``{options}`` filled) needs more than ``budget`` unbounded and peaks
    within it under ``max_memory=budget``."""
    free, bounded = (
        peak_above_start(script.format(options=options)) for options in ("", f"max_memory={budget}")
    )
    mib = 2**20
    print(f"{label}: unbounded {free['peak'] / mib:.0f} MiB, budget {budget / mib:.0f} MiB, "
          f"bounded {bounded['peak'] / mib:.0f} MiB")  # fmt: skip
    assert free["peak"] > budget, "the workload must need more than the budget unbounded"
    assert bounded["peak"] <= budget, (bounded["peak"] / mib, budget / mib)


# a 20-class BERT over a batch of 16 texts: every class a target, every layer read
_LAYERS_OF_A_CLASSIFIER = """
import attrax as ax
from attrax.testing import corpus, tiny_classifier
hf, tok = tiny_classifier("bert", num_labels=20, hidden_size=256, num_hidden_layers=4,
                          num_attention_heads=4, intermediate_size=1024,
                          max_position_embeddings=128)
model = ax.load_model(hf, tokenizer=tok)
words = " ".join(corpus()).split()
texts = [" ".join(words[i * 40 : i * 40 + 40]) for i in range(16)]
def warm():
    ax.internal_influence(model, texts[:2], "all", steps=2, layers="all", {options})
def call():
    ax.internal_influence(model, texts, "all", steps=8, layers="all", {options})
"""


@pytest.mark.slow
def test_a_classifiers_layers_peak_stays_within_the_smallest_budget(peak_above_start):
    """A bidirectional model's targets share a forward, and their gradients at every layer were
    all held in each pass, whatever ``chunk_size``: 1,104 MiB here under the 886 MiB that the
    planner named as the smallest (2026-12-06; now 756). Each group of ``chunk_size`` targets is
    now summed before the next group's gradients are taken."""
    hf, tok = tiny_classifier(
        "bert", num_labels=20, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=1024, max_position_embeddings=128,
    )  # fmt: skip
    model = ax.load_model(hf, tokenizer=tok)
    words = " ".join(corpus()).split()
    texts = [" ".join(words[i * 40 : i * 40 + 40]) for i in range(16)]
    with pytest.raises(ax.OptionError, match="cannot be met") as refused:
        ax.internal_influence(model, texts, "all", steps=8, layers="all", max_memory=1)
    named = re.search(r"estimated ([\d.]+ [kMGT]?B); give at least", str(refused.value))
    assert named, str(refused.value)
    budget = _memory.parse_bytes(named.group(1).replace(" ", "")) + (1 << 20)
    _holds_its_budget(peak_above_start, _LAYERS_OF_A_CLASSIFIER, budget, "classifier layers")


def _ig_over_a_long_text(build: str) -> str:
    """A script (its ``{options}`` left open) that builds a classifier by ``build`` and runs IG
    over its three classes on ~160 tokens of the test corpus."""
    return (
        "import attrax as ax\n"
        "from attrax.testing import corpus, tiny_classifier\n"
        f"hf, tok = {build}\n"
        "model = ax.load_model(hf, tokenizer=tok)\n"
        'text = tok.decode(tok(" ".join(corpus()))["input_ids"][1:159])\n'
        "def warm():\n"
        '    ax.integrated_gradients(model, "a good day", [0, 1, 2], steps=4, {options})\n'
        "def call():\n"
        "    ax.integrated_gradients(model, text, [0, 1, 2], steps=64, {options})\n"
    )


# a DeBERTa-v3-shaped classifier (12 heads, 2 * 256 relative positions), 384 wide, 160 tokens
_DEBERTA_MODEL = _ig_over_a_long_text(
    'tiny_classifier("deberta-v2", hidden_size=384, intermediate_size=1536, '
    "num_hidden_layers=6, num_attention_heads=12, max_position_embeddings=1024, "
    "position_buckets=256)"
)


@pytest.mark.slow
def test_a_debertas_peak_stays_within_the_budget(peak_above_start):
    """DeBERTa-v2's relative terms, priced by ``_arch.relative_width``: IG over its three
    classes keeps its peak RSS above the call's start within max_memory, where without a budget
    it takes more."""
    _holds_its_budget(peak_above_start, _DEBERTA_MODEL, 400 << 20, "DeBERTa")


# a BART-MNLI-shaped classifier: its decoder reads the ~160 source tokens again
_BART_CLASSIFIER = _ig_over_a_long_text(
    'tiny_classifier("bart", d_model=256, encoder_layers=3, decoder_layers=3, '
    "encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=1024, "
    "decoder_ffn_dim=1024, max_position_embeddings=1024)"
)


@pytest.mark.slow
def test_an_encoder_decoder_classifiers_peak_stays_within_the_budget(peak_above_start):
    """An encoder-decoder classifier runs its decoder over the source as well: priced as a
    translator's two stacks over twice the source's tokens, IG over its three classes keeps its
    peak RSS above the call's start within max_memory, where without a budget it takes more."""
    _holds_its_budget(peak_above_start, _BART_CLASSIFIER, 300 << 20, "BART classifier")


@pytest.mark.slow
def test_a_bfloat16_models_head_rows_stay_within_the_budget(peak_above_start):
    """A bfloat16 model's logits are half a float32's, but its objective's log-softmax is float32
    and reads a float32 copy of them: priced at 2 bytes an entry, this call took 516 MiB under
    this 400 MiB budget (W1's occlusion in bfloat16: 500 MiB under 363 MiB)."""
    test_the_measured_peak_stays_within_the_budget(
        peak_above_start, "occlusion", "", 400 << 20, ", vocab_size=50257", SHORT,
        cast=".to(__import__('torch').bfloat16)",
    )  # fmt: skip


_BFLOAT16_LLAMA = """
import torch
import attrax as ax
from attrax.testing import corpus, tiny_model
hf, tok = tiny_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
model = ax.load_model(hf.to(torch.bfloat16), tokenizer=tok)
words = (" ".join(corpus()).split() * 8)[:400]
prompt, target = " ".join(words[:-24]), " " + " ".join(words[-24:])
def warm():
    ax.saliency(model, "a b c", " d e")
def call():
    ax.saliency(model, prompt, target{options})
"""


@pytest.mark.slow
def test_a_first_bfloat16_call_stays_within_the_budget(peak_above_start):
    """bfloat16 on the CPU runs oneDNN's kernels, which keep a primitive (and its memory) per
    shape: a first call on ~600 tokens whose passes took one target each, each cut after its
    target, took 341 MiB under a 172 MiB budget (its passes alone: 89 MiB). This budget is
    about the smallest the estimate accepts (200 MB: this length runs SDPA, whose bfloat16
    forward the CPU prices at 5 of its 8 units in float32): its passes take one target each too."""
    _held(peak_above_start, _BFLOAT16_LLAMA, 201 * 10**6)


def _held(peak_above_start: Any, script: str, budget: int) -> None:
    """``script`` (its call's ``{options}`` left open) needs more than ``budget`` unbounded,
    and its measured peak stays within it as ``max_memory``."""
    free = peak_above_start(script.format(options=""))
    bounded = peak_above_start(script.format(options=f", max_memory={budget}"))
    mib = 2**20
    print(f"unbounded {free['peak'] / mib:.0f} MiB, budget {budget / mib:.0f} MiB, "
          f"bounded {bounded['peak'] / mib:.0f} MiB")  # fmt: skip
    assert free["peak"] > budget, "the workload must need more than the budget unbounded"
    assert bounded["peak"] <= budget, (bounded["peak"] / mib, budget / mib)


_BFLOAT16_LLAMA_POINTS = """
import torch
import attrax as ax
from attrax.testing import corpus, tiny_model
hf, tok = tiny_model("llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
model = ax.load_model(hf.to(torch.bfloat16), tokenizer=tok)
words = " ".join(corpus()).split()
prompt, target = " ".join(words[:110]), " " + " ".join(words[110:134])
def warm():
    ax.integrated_gradients(model, "a b c", " d e", steps=32)
def call():
    ax.integrated_gradients(model, prompt, target, steps=32{options})
"""


@pytest.mark.slow
def test_a_bfloat16_llamas_points_stay_within_the_budget(peak_above_start):
    """A bfloat16 Llama's forward does not hold half a float32's: RMSNorm and eager attention's
    softmax stay float32 and its kernels hold more, 0.95 of float32 per point measured. Priced
    at half, IG over 234 tokens (eager) took 424-450 MiB under this 400 MiB budget."""
    _held(peak_above_start, _BFLOAT16_LLAMA_POINTS, 400 << 20)


_SDPA_LLAMA_RUN = """
import torch
import attrax as ax
from attrax.testing import corpus, tiny_model
hf, tok = tiny_model("llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
model = ax.load_model(hf.to(torch.bfloat16), tokenizer=tok, attn_implementation="sdpa")
words = " ".join(corpus()).split()
prompt, target = " ".join(words[:96]), " " + " ".join(words[96:128])
def warm():
    ax.{method}(model, "a b c", " d e", {options})
def call():
    return ax.{method}(model, prompt, target, {options}).sizes["target"]
"""


@pytest.mark.slow
def test_a_bfloat16_llamas_points_under_sdpa_are_priced_above_their_measured_slope(
    peak_above_start,
):
    """Under SDPA no float32 softmax weights sit beside their bfloat16 copy, so the CPU prices 5
    of the forward's 8 units at float32 there, not all 8. The measured bytes per point (a
    point's peak less a target's, as ``benchmarks.calibrate`` takes them) stay under that
    estimate; priced at 2 bytes throughout, they were above it (16.7 MiB against 14.3)."""
    from attrax.testing import corpus, tiny_model

    def peak(method: str, options: str) -> tuple[float, int]:
        got = peak_above_start(_SDPA_LLAMA_RUN.format(method=method, options=options))
        return got["peak"], got["result"]

    one, targets = peak("saliency", "chunk_size=1, batch_size=None")
    every, _ = peak("saliency", "chunk_size=None, batch_size=None")
    points, _ = peak("integrated_gradients", "steps=8, chunk_size=1, batch_size=None")
    per_target = (every - one) / (targets - 1)
    measured = (points - one) / 7 - per_target
    hf, tok = tiny_model(
        "llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )  # fmt: skip
    model = ax.load_model(hf.to(torch.bfloat16), tokenizer=tok, attn_implementation="sdpa")
    words = " ".join(corpus()).split()
    prompt, target = " ".join(words[:96]), " " + " ".join(words[96:128])
    problem = Problem.build(model, prepare(model, prompt, target), resolve("probability")[1], False)
    estimate = problem.cost().per_point
    print(f"per point: measured {measured / 2**20:.1f} MiB, estimated {estimate / 2**20:.1f} MiB")
    assert measured <= estimate, (measured / 2**20, estimate / 2**20)


_MANY_LENGTHS = """
import json, os, tempfile
from pathlib import Path
import torch
{user}
import attrax as ax
from attrax.testing import corpus, tiny_model
hf, tok = tiny_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
model = ax.load_model(hf.to(torch.bfloat16), tokenizer=tok)
words = (" ".join(corpus()).split() * 8)
data = Path(tempfile.mkdtemp())
with open(data / "texts.jsonl", "w") as f:
    for n in range(20, 300, 4):  # 70 records, each its own length
        f.write(json.dumps({{"input": " ".join(words[:n]), "target": " " + words[n]}}) + "\\n")
def warm():
    ax.saliency(model, " ".join(words[:300]), " " + words[300])
def call():
    ax.attribute_dataset(model, data / "texts.jsonl", data / "out", shard_size=1, progress=False)
"""


@pytest.mark.slow
@pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    reason="this CPU runs bfloat16 matmuls without oneDNN: no kernel cache",
)
def test_a_bfloat16_dataset_of_many_lengths_holds_a_bounded_kernel_cache(peak_above_start):
    """oneDNN keeps a compiled kernel (~1 MiB) per shape in two caches of 1,024 by default: 70
    records of 70 lengths grew the process by ~500 MiB; loading a model bounds them to 64."""
    mib = 2**20
    bounded = peak_above_start(_MANY_LENGTHS.format(user=""))["peak"] / mib
    # the user's own value wins: oneDNN's default capacity, as before attrax bounded it
    default = "os.environ.update(ONEDNN_PRIMITIVE_CACHE_CAPACITY='1024', LRU_CACHE_CAPACITY='1024')"
    unbounded = peak_above_start(_MANY_LENGTHS.format(user=default))["peak"] / mib
    print(f"70 lengths: {bounded:.0f} MiB with the caches bounded, {unbounded:.0f} MiB without")
    assert unbounded > 300, "the workload must grow the caches when they are not bounded"
    assert bounded < 200, bounded


_LONG_ALTI = """
import attrax as ax
from attrax.testing import corpus, tiny_model
hf, tok = tiny_model("gpt2", n_embd=256, n_layer=4, n_head=4, n_positions=2048)
model = ax.load_model(hf, tokenizer=tok)
words = (" ".join(corpus()).split() * 8)[:1000]
prompt, target = " ".join(words[:-8]), " " + " ".join(words[-8:])
def warm():
    ax.{method}(model, "a b c", " d e")
def call():
    ax.{method}(model, prompt, target{options})
    return model.tokenizer(prompt + target, return_length=True)["length"]
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["alti", "alti_logit", "attention_norm"])
def test_alti_on_a_long_input_stays_within_the_budget(peak_above_start, method):
    """~1,500 tokens: ALTI's (and the norm-based measures') ``[B, rows, L, d]`` vectors come in
    query-row chunks that max_memory bounds. Small chunks once fragmented the heap (their scores, kept for a final
    concatenation, sat between the next chunks' temporaries: 1.4-2.2 GiB in 64-128 MiB chunks)."""
    budget = 400 * 10**6
    free = peak_above_start(_LONG_ALTI.format(method=method, options=""))
    bounded = peak_above_start(_LONG_ALTI.format(method=method, options=f", max_memory={budget}"))
    length = free["result"][0] if isinstance(free["result"], list) else free["result"]
    mib = 2**20
    print(f"{method}, {length} tokens: unbounded {free['peak'] / mib:.0f} MiB, "
          f"budget {budget / mib:.0f} MiB, bounded {bounded['peak'] / mib:.0f} MiB")  # fmt: skip
    assert length > 1400, length
    assert free["peak"] > budget, "the workload must need more than the budget unbounded"
    assert bounded["peak"] <= budget, (bounded["peak"] / mib, budget / mib)


_DECOMPX_BATCH = """
import attrax as ax
from attrax.testing import corpus, tiny_classifier
hf, tok = tiny_classifier("bert", hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                          num_hidden_layers=2, max_position_embeddings=1024)
model = ax.load_model(hf, tokenizer=tok)
words = " ".join(corpus()).split() * 8
texts = [" ".join(words[i * 150:(i + 1) * 150]) for i in range(4)]
def warm():
    ax.decompx(model, "a b c")
def call():
    ax.decompx(model, texts, "all"{options})
    return max(len(ids) for ids in model.tokenizer(texts)["input_ids"])
"""


@pytest.mark.slow
def test_decompx_on_a_batch_of_long_inputs_stays_within_the_budget(peak_above_start):
    """DecompX holds an example's ``[L, L, d]`` vectors through every layer: max_memory bounds
    how many examples are decomposed at once (and the feed-forward's positions)."""
    budget = 500 * 10**6  # one example at a time: 441 MB (about 260 tokens)
    free = peak_above_start(_DECOMPX_BATCH.format(options=""))
    bounded = peak_above_start(_DECOMPX_BATCH.format(options=f", max_memory={budget}"))
    mib = 2**20
    print(f"decompx, 4 x {free['result']} tokens: unbounded {free['peak'] / mib:.0f} MiB, "
          f"budget {budget / mib:.0f} MiB, bounded {bounded['peak'] / mib:.0f} MiB")  # fmt: skip
    assert free["result"] > 200, free["result"]
    assert free["peak"] > budget, "the workload must need more than the budget unbounded"
    assert bounded["peak"] <= budget, (bounded["peak"] / mib, budget / mib)


_LIMITED = """
from attrax import _memory
""" + _BUDGET_MODEL.replace(
    "def call():\n",
    "def call():\n    _memory.limit_process(_memory._resident() + {limit} if {limit} else None)\n",
)


@pytest.mark.slow
def test_a_process_limit_holds_without_a_budget(peak_above_start):
    """A process whose resident memory must stay under a limit (a Dask worker's nanny kills it
    above one; :func:`attrax._memory.limit_process`) holds it in calls that state no
    ``max_memory``: they plan below it and give the heap back between passes."""
    limit = 600 << 20
    code = dict(method="occlusion", options="", config=", vocab_size=50257", warm=MEDIUM, cast="")
    free = peak_above_start(_LIMITED.format(limit=0, **code))
    limited = peak_above_start(_LIMITED.format(limit=limit, **code))
    mib = 2**20
    print(f"no limit {free['peak'] / mib:.0f} MiB, {limited['peak'] / mib:.0f} MiB "
          f"with {limit / mib:.0f} MiB of headroom")  # fmt: skip
    assert free["peak"] > limit, "the workload must need more than the limit without it"
    assert limited["peak"] <= limit, (limited["peak"] / mib, limit / mib)


def test_a_gpu_budget_counts_the_blocks_torch_caches_as_free(monkeypatch):
    """A previous call's freed blocks stay reserved by torch's caching allocator, so the
    driver no longer reports them free; torch reuses them, so the budget counts them."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 50 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 20 * GiB)  # model, results
    assert _memory.memory_budget(torch.device("cuda:0")) == (10 + 50 - 20) * GiB / 2


def _record_passes(monkeypatch) -> list[tuple[int, int]]:
    """``(points, targets)`` of every vectorized backward the engine runs from now on, read
    from the tensors it is given (not from the planner)."""
    passes: list[tuple[int, int]] = []
    original = Problem._chunk_gradients

    def recorded(self, stacked, slots, length, chunk_size):
        targets = len(range(self.tensors.valid.shape[1])[slots])
        passes.append((stacked[0].shape[0], targets))
        return original(self, stacked, slots, length, chunk_size)

    monkeypatch.setattr(Problem, "_chunk_gradients", recorded)
    return passes


# --- targets per backward: the least work (decoder-only) -------------------------------------


def _halvings(n: int) -> list[int]:
    """n, ceil(n / 2), ..., 1: the sizes the planner may pick for ``n``."""
    sizes = [n]
    while sizes[-1] > 1:
        sizes.append(-(-sizes[-1] // 2))
    return sizes


def _causal_work(prompt: int, targets: int):
    """A decoder-only call's work for ``chunk`` targets per backward: target i ends its
    chunk's sequence at ``prompt + i + 1`` tokens; a chunk costs a forward and a backward per
    target over that sequence."""
    ends = [prompt + i + 1 for i in range(targets)]
    return lambda chunk: sum(
        ends[min(start + chunk, targets) - 1] * (1 + min(chunk, targets - start))
        for start in range(0, targets, chunk)
    )


def test_the_planner_takes_the_least_work_among_the_target_chunks_that_fit():
    """With ``work``, of the halvings of the targets that fit at the fewest points the planner
    may pick, the one of least work (ties to the larger), then as many points as fit; a call
    that fits whole stays whole, and a budget nothing meets is the same refusal."""
    cpu = torch.device("cpu")
    cost = _memory.Cost(per_cotangent=10, per_point=25, fixed=100, per_target=3)
    points, targets = 12, 13
    works = {
        "long prompt": _causal_work(200, targets),  # forwards dominate: fewest chunks
        "short prompt": _causal_work(2, targets),  # least at 7 (9 * 8 + 15 * 7 = 177)
        "ties": {13: 5, 7: 3, 4: 3, 2: 4, 1: 8}.__getitem__,
    }
    assert min(_halvings(targets), key=works["short prompt"]) == 7
    chosen = set()
    for name, work in works.items():
        for batch_size in ("auto", None, 3):
            batches = _halvings(points) if batch_size == "auto" else [batch_size or points]
            for budget in range(cost.at(batches[-1], 1), cost.at(points, targets) + 2):
                got = _memory.plan(
                    points, targets, batch_size, "auto", cost, cpu, budget, work=work
                )
                where = (name, batch_size, budget, got)
                if cost.at(batches[0], targets) <= budget:
                    assert got == (None if batch_size == "auto" else batch_size, None), where
                    continue
                batch, chunk = got[0] or points, got[1] or targets
                assert cost.at(batch, chunk) <= budget, where
                # by brute force: no sizes that fit take less work, or as little with more
                # targets; and the most points that fit with the chosen targets
                for b, c in itertools.product(batches, _halvings(targets)):
                    if cost.at(b, c) <= budget:
                        assert (work(c), -c) >= (work(chunk), -chunk), (*where, b, c)
                assert batch == max(b for b in batches if cost.at(b, chunk) <= budget), where
                chosen.add((name, chunk))
    # the cases met: fewest chunks, a split, and ties to the larger
    assert {("long prompt", 13), ("short prompt", 7), ("ties", 7), ("ties", 4)} <= chosen
    # nothing fits: the same refusal as without work
    for batch_size in ("auto", None, 3):
        refusals = []
        for work in (None, works["ties"]):
            with pytest.raises(ax.OptionError, match="cannot be met") as refused:
                _memory.plan(points, targets, batch_size, "auto", cost, cpu, 120, work=work)
            refusals.append(str(refused.value))
        assert refusals[0] == refusals[1]
    # without work, the old rule: the targets halved first, then the points (by hand: 13 -> 7
    # -> 4 targets, 100 + 4 * 3 + 12 * (25 + 4 * 10) = 892 <= 916; at 173, 1 target and 12 ->
    # 6 -> 3 -> 2 points, 100 + 3 + 2 * (25 + 10) = 173)
    assert _memory.plan(points, targets, "auto", "auto", cost, cpu, 916) == (None, 4)
    assert _memory.plan(points, targets, "auto", "auto", cost, cpu, 173) == (2, 1)
    # with work (long prompt): at 916 every target fits with one point (294), the fewest
    # chunks, and 3 points (100 + 39 + 6 * 155 = 1,069 > 916 >= 604); at 173 2 targets fit with
    # one point (151; 4 need 177): 7 forwards a point rather than 13
    long = works["long prompt"]
    assert _memory.plan(points, targets, "auto", "auto", cost, cpu, 916, work=long) == (3, None)
    assert _memory.plan(points, targets, "auto", "auto", cost, cpu, 173, work=long) == (1, 2)


def _long_llama(words: int, target_words: int) -> tuple[ax.Model, str, str]:
    """A tiny Llama long enough for ``words`` words of prompt and ``target_words`` of target."""
    from attrax.testing import corpus, tiny_model

    hf, tok = tiny_model("llama", max_position_embeddings=128)
    tok.model_max_length = 128
    text = " ".join(corpus()).split()
    prompt = " ".join(text[:words])
    target = " " + " ".join(text[words : words + target_words])
    return ax.load_model(hf, tokenizer=tok), prompt, target


def _planned(monkeypatch, words: int, target_words: int):
    """``(model, prompt, target, problem)`` of :func:`_long_llama` for IG's probability, its
    estimate fixed: 1,000 per (point, target), 500 per point, 10,000 fixed."""
    model, prompt, target = _long_llama(words, target_words)
    fixed_cost(monkeypatch, _memory.Cost(per_cotangent=1000, per_point=500, fixed=10_000))
    cut_at_every_target(monkeypatch)
    problem = Problem.build(model, prepare(model, prompt, target), resolve("probability")[1], False)
    return model, prompt, target, problem


def _forwards(model: ax.Model) -> list[tuple[int, int]]:
    """``(rows, tokens)`` of every forward of ``model`` from now on (its final norm's input)."""
    seen: list[tuple[int, int]] = []
    model.hf.model.norm.register_forward_hook(
        lambda module, args, out: seen.append(tuple(out.shape[:2]))
    )
    return seen


def test_a_long_prompt_keeps_its_few_targets_together_and_halves_the_points(monkeypatch):
    """Decoder-only, every target chunk runs a forward of its own over the sequence up to its
    last target, for every point. A long prompt's few targets at the end save almost no backward
    work in chunks, so where one point with every target fits, the points are halved (no forward
    more) rather than the targets (a forward per chunk and point); the attributions are the
    same. (On an 8B model, 2,048 tokens and 128 targets under 100 GB: 40 forwards, not 2,560.)"""
    model, prompt, target, problem = _planned(monkeypatch, 46, 2)
    whole = ax.integrated_gradients(model, prompt, target, steps=8, batch_size=None)
    k = problem.tensors.valid.shape[1]
    # 4 targets after 68 tokens of prompt: their sequences end at 69, ..., 72 tokens
    assert k == 4 and [n for _, n in problem._target_chunks(1)] == [69, 70, 71, 72]
    budget = 10_000 + 2 * (500 + k * 1000)  # 2 points with every target
    bounded = dataclasses.replace(problem, max_memory=budget)
    forwards = _forwards(model)
    got = ax.integrated_gradients(model, prompt, target, steps=8, max_memory=budget)
    assert_close(got.values, whole.values, rtol=1e-5, atol=1e-6)
    least_work = list(forwards)
    # 72 * (1 + 4) = 360 is less work than 71 * 3 + 72 * 3 = 429 (2) or 70 + ... + 72 = 564 (1)
    assert bounded.plan(8, "auto", "auto") == (2, None)
    forwards.clear()
    monkeypatch.setattr(Problem, "_work", lambda self, rows: None)  # the old rule
    # 8 points: 1,500 a point even at one target, 4 points fit 9,000
    assert bounded.plan(8, "auto", "auto") == (4, 1)
    old = ax.integrated_gradients(model, prompt, target, steps=8, max_memory=budget)
    assert_close(old.values, whole.values, rtol=1e-5, atol=1e-6)
    # the gradients' forwards: 4 of 2 points over all 72 tokens, against 4 of 4 points (each
    # cut after its target) for each half of the points; the other forwards alike in both
    planned = Counter({(2, 72): 4}), Counter({(4, n): 2 for n in (69, 70, 71, 72)})
    assert planned[0] <= Counter(least_work) and planned[1] <= Counter(forwards)
    assert Counter(least_work) - planned[0] == Counter(forwards) - planned[1]
    assert len(least_work) < len(forwards)
    assert sum(r * n for r, n in least_work) < sum(r * n for r, n in forwards)


def test_targets_spanning_the_sequence_are_still_split_when_that_is_less_work(monkeypatch):
    """A short prompt's many targets: a chunk of early targets runs on a much shorter sequence,
    so chunks save more backward work than their forwards cost, and the planner splits the
    targets though every target fits with one point."""
    model, prompt, target, problem = _planned(monkeypatch, 2, 16)
    whole = ax.integrated_gradients(model, prompt, target, steps=8, batch_size=None)
    k = problem.tensors.valid.shape[1]
    assert k == 21 and [n for _, n in problem._target_chunks(6)] == [8, 14, 20, 23]
    budget = 10_000 + 1 * (500 + k * 1000)  # every target fits, at one point
    bounded = dataclasses.replace(problem, max_memory=budget)
    # chunks of 6: (8 + 14 + 20) * 7 + 23 * 4 = 386 against 23 * 22 = 506 all at once, 409 in
    # 11s, 392 in 3s; then 2 points (13,000 <= 21,500 < 4 * 6,500)
    assert bounded.plan(8, "auto", "auto") == (2, 6)
    work = problem._work(1)
    assert work(6) == 386 < work(k) == 506
    got = ax.integrated_gradients(model, prompt, target, steps=8, max_memory=budget)
    assert_close(got.values, whole.values, rtol=1e-5, atol=1e-6)


def test_attribution_patching_plans_without_the_work_model(monkeypatch):
    """Attribution patching runs one forward for every target chunk, so no chunk buys a shorter
    forward: it takes the largest halving of the targets that fits (11 of 21 here), where the
    engine's own calls take the least work (6)."""
    model, prompt, target, problem = _planned(monkeypatch, 2, 16)
    k = problem.tensors.valid.shape[1]
    assert k == 21
    budget = 10_000 + 500 + 11 * 1000  # 11 targets at one point, not 21
    bounded = dataclasses.replace(problem, max_memory=budget)
    work = problem._work(1)
    assert work(6) < work(11)  # (8 + 14 + 20) * 7 + 23 * 4 = 386 < 12 * 13 + 23 * 11 = 409
    assert bounded.plan(1, None, "auto") == (None, 6)
    assert bounded.plan(1, None, "auto", shared_forward=True) == (None, 11)
    planned = []
    original = Problem.plan

    def recorded(self, *args, **kwargs):
        planned.append((kwargs.get("shared_forward", False), original(self, *args, **kwargs)))
        return planned[-1][1]

    monkeypatch.setattr(Problem, "plan", recorded)
    corrupted = " ".join(["x"] * len(prompt.split()))
    ax.attribution_patching(
        model, prompt, target, corrupted=corrupted, site="residual", max_memory=budget
    )
    assert planned == [(True, (None, 11))]


def test_decoder_only_chunks_are_cut_at_a_sixteenth_of_the_sequence():
    """A chunk's sequence ends at the first multiple of ceil(L / 16) tokens at or after its last
    target (or at the sequence's end, L): a call's chunks take at most 16 lengths, where a cut per
    chunk gave oneDNN a primitive per pass to keep. The positions kept after a chunk's last
    target change none of its attributions."""
    from attrax.testing import corpus, tiny_model

    hf, tok = tiny_model("llama", max_position_embeddings=512)
    tok.model_max_length = 512
    words = " ".join(corpus()).split()
    prompt, target = " ".join(words[:60]), " " + " ".join(words[60:110])
    model = ax.load_model(hf, tokenizer=tok)
    problem = Problem.build(model, prepare(model, prompt, target), resolve("probability")[1], False)
    full = problem.inputs[0].shape[1]
    ends = [int(problem.tensors.index[:, c].max()) + 1 for c, _ in problem._target_chunks(1)]
    assert len(set(ends)) == len(ends) > 64 and ends[-1] >= full - 1  # a length per target uncut
    step = (full + 15) // 16
    got = [n for _, n in problem._target_chunks(1)]
    for end, n in zip(ends, got, strict=True):
        assert end <= n <= min(full, end + step - 1) and (n % step == 0 or n == full)
    assert 1 < len(set(got)) <= 16
    forwards = _forwards(model)
    cut = ax.saliency(model, prompt, target, chunk_size=1)
    assert {n for _, n in forwards} == set(got)
    whole = ax.saliency(model, prompt, target, chunk_size=None)
    assert_close(cut.values, whole.values, rtol=1e-5, atol=1e-6)


def _saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages one forward saves for its backward, the parameters'
    aside: counted by autograd's saved-tensor hooks, whatever the device or its allocator."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        body = model.model if model.base_model is model else model.base_model  # Llama 4's
        out = body(inputs_embeds=embeds).last_hidden_state
    del out
    return sum(saved.values())


# transformers configs beside attrax.testing's tiny models, 256 wide and 4 layers as theirs:
# Gemma 4's per-layer embeddings (a global layer of the local ones' head width, then one with
# heads 8 times hidden / heads as its released models' are), a Qwen3 whose heads are twice
# hidden / heads (Qwen3-0.6B's)
_GEMMA4 = dict(sliding_window=96, layer_types=["sliding_attention"] * 3 + ["full_attention"])
WIDER = {
    "gemma4": ("Gemma4TextConfig", dict(head_dim=64, global_head_dim=64,
               hidden_size_per_layer_input=64, **_GEMMA4)),
    "gemma4-wide": ("Gemma4TextConfig", dict(head_dim=128, global_head_dim=512,
                    hidden_size_per_layer_input=256, **_GEMMA4)),
    "qwen3-wide": ("Qwen3Config", dict(head_dim=128)),
}  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "gemma3", *WIDER])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_llamas_estimated_forward_covers_what_it_saves_on_any_device(dtype, arch):
    """HF Llama's eager attention keeps its softmax weights in float32 beside their bfloat16
    copy: priced at 2 bytes an entry, a bfloat16 forward's estimate (a GPU's: tensors alone)
    fell below what it saves, 15.3 MiB against 14.3. Gemma 3's norms after attention and MLP
    (in float32) save more again: priced as a Llama its bfloat16 forward saved 22.6 MiB against
    an estimated 17.8, its float32 one 28.5 against 28.5 (its own family, ``"gemma"``, since).
    Gemma 4 adds per-layer embeddings (64 wide here): priced as a Llama, 26.4 MiB against 17.8
    in bfloat16, as a Gemma 26.7, and under SDPA 21.8 against 19.6. Heads wider than hidden /
    heads keep more: a Qwen3 with heads twice that saved 21.2 MiB against 17.8 in bfloat16, the
    wide Gemma 4 41.7 against 26.7. ``_arch.relative_width`` prices both."""
    import transformers

    from attrax import _arch
    from attrax.testing import corpus, tiny_model

    shape = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)  # fmt: skip
    if arch == "gemma3":  # a local layer and a global one, twice
        shape |= dict(head_dim=64, sliding_window=96, layer_types=["sliding_attention", "full_attention"] * 2)  # fmt: skip
    if arch in WIDER:
        _, tok = tiny_model("llama")
        name, layout = WIDER[arch]
        if name.startswith("Gemma4"):
            layout = layout | {"vocab_size_per_layer_input": len(tok)}
        config = getattr(transformers, name)(vocab_size=len(tok), **shape, **layout)
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    else:
        hf, tok = tiny_model(arch, **shape)
    hf = hf.to(dtype)
    family = _arch.family(hf.config)
    ids = tok(" ".join(corpus()), return_tensors="pt")["input_ids"][:, :228]
    saved = _saved_bytes(hf, ids)
    extra = _arch.relative_width(hf.config, 228)  # per-layer embeddings, wider heads
    estimate = _memory.forward_bytes(
        1, 228, 256, dtype.itemsize, 688, 4, 4, family, device="cuda", relative=extra
    )
    print(f"{arch}, {dtype}: saved {saved / 2**20:.1f} MiB, estimated {estimate / 2**20:.1f} MiB")
    assert saved <= estimate
    # under SDPA, which saves no weights, the estimate (no [heads, L, L] width) still covers it
    hf.set_attn_implementation("sdpa")
    sdpa = _memory.forward_bytes(
        1, 228, 256, dtype.itemsize, 688, 0, 4, family, device="cuda", relative=extra
    )
    assert _saved_bytes(hf, ids) <= sdpa


# mixtures of experts in a Llama body of 256 wide, 4 layers; the expert widths keep bfloat16 rows
# a multiple of 16 bytes, which torch's grouped matmul on the CPU asks
EXPERTS = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=896, num_local_experts=8)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(moe_intermediate_size=176, num_experts=8,
                  num_experts_per_tok=4, shared_expert_intermediate_size=352)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(moe_intermediate_size=96, num_experts=16,
                  num_experts_per_tok=8, head_dim=64)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=128, num_experts=16, num_experts_per_tok=8)),
    "granitemoeshared": ("GraniteMoeSharedConfig", dict(intermediate_size=344, num_local_experts=8,
                         shared_intermediate_size=512)),
    # GPT-OSS: its clamped SwiGLU keeps more per expert than a SiLU gate; sinks, biases
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=344, num_local_experts=8,
                num_experts_per_tok=4, head_dim=64, sliding_window=64)),
    # DeepSeek V3: multi-head latent attention in V3's proportions (query and key heads three
    # times hidden / heads wide, value heads twice), a dense layer, routed and shared experts
    "deepseek_v3": ("DeepseekV3Config", dict(intermediate_size=688, moe_intermediate_size=96,
                    n_routed_experts=16, num_experts_per_tok=8, n_shared_experts=1,
                    first_k_dense_replace=1, n_group=4, topk_group=2, num_key_value_heads=4,
                    q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=128, qk_rope_head_dim=64,
                    v_head_dim=128)),
    "glm4_moe": ("Glm4MoeConfig", dict(intermediate_size=688, moe_intermediate_size=96,
                 n_routed_experts=16, num_experts_per_tok=8, n_shared_experts=1, head_dim=64)),
    "minimax_m2": ("MiniMaxM2Config", dict(intermediate_size=96, num_local_experts=16,
                   num_experts_per_tok=8, head_dim=64)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(intermediate_size=688, moe_intermediate_size=96,
                     moe_num_experts=16, moe_k=8, moe_num_shared_experts=1)),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", dict(intermediate_size=96, num_experts=16,
                       moe_topk=8, head_dim=64)),
    # Llama 4: every expert runs on every token (unchosen ones on zeros), a shared expert
    "llama4": ("Llama4TextConfig", dict(intermediate_size=96, intermediate_size_mlp=688,
               num_local_experts=16, num_experts_per_tok=1, head_dim=64)),
}  # fmt: skip


# state-space models and hybrids, 256 wide, 4 layers; transformers' torch path (no CUDA kernels)
STATE_SPACE = {
    "mamba": ("MambaConfig", dict(state_size=16, expand=2)),
    "mamba2": ("Mamba2Config", dict(num_heads=8, head_dim=64, state_size=64, n_groups=1)),
    "jamba": ("JambaConfig", dict(intermediate_size=688, attn_layer_period=2, attn_layer_offset=1,
              expert_layer_period=2, expert_layer_offset=1, num_experts=4, mamba_d_state=16,
              use_mamba_kernels=False)),
    "bamba": ("BambaConfig", dict(intermediate_size=688, attn_layer_indices=[1, 3],
              mamba_n_heads=8, mamba_d_head=64, mamba_d_state=64)),
    "granitemoehybrid": ("GraniteMoeHybridConfig", dict(intermediate_size=344,
                         num_local_experts=4, num_experts_per_tok=2, mamba_n_heads=8,
                         mamba_d_head=64, mamba_d_state=64,
                         layer_types=["mamba", "attention", "mamba", "attention"])),
    "nemotron_h": ("NemotronHConfig", dict(intermediate_size=688, hybrid_override_pattern="M*M-",
                   mamba_num_heads=8, mamba_head_dim=64, ssm_state_size=64, chunk_size=128,
                   n_groups=1, use_mamba_kernels=False)),
    # gated delta rule (linear attention) and full attention, experts in every layer
    "qwen3_next": ("Qwen3NextConfig", dict(head_dim=64, num_experts=8, num_experts_per_tok=2,
                   moe_intermediate_size=128, shared_expert_intermediate_size=256,
                   linear_num_value_heads=8, linear_num_key_heads=4, linear_key_head_dim=64,
                   linear_value_head_dim=64, layer_types=["linear_attention", "full_attention"] * 2)),
    # Qwen 3.5: Qwen3-Next's layers with dense MLPs
    "qwen3_5": ("Qwen3_5TextConfig", dict(head_dim=64, intermediate_size=688,
                linear_num_value_heads=8, linear_num_key_heads=4, linear_key_head_dim=64,
                linear_value_head_dim=64, layer_types=["linear_attention", "full_attention"] * 2)),
}  # fmt: skip


@pytest.mark.parametrize("arch", list(STATE_SPACE))
@pytest.mark.parametrize("tokens", [228, 40])
def test_a_state_space_models_estimated_forward_covers_what_it_saves(tokens, arch):
    """A Mamba layer's scan keeps more per token than an MLP: priced as a Llama, a Bamba forward
    of 40 tokens saved 23.9 MiB against an estimated 5.0 (Mamba 2 pads the sequence to whole
    256-token chunks and keeps ``[heads, chunk, chunk]`` for each), Qwen3-Next's (its gated
    delta rule) 9.3 against 5.0. ``_arch.mixer_width`` prices the scan."""
    import transformers

    from attrax import _arch
    from attrax.testing import corpus, tiny_model

    _, tok = tiny_model("llama")
    name, layout = STATE_SPACE[arch]
    attention = (
        {} if arch.startswith("mamba") else dict(num_attention_heads=4, num_key_value_heads=2)
    )
    config = getattr(transformers, name)(
        vocab_size=len(tok), hidden_size=256, num_hidden_layers=4, max_position_embeddings=1024,
        **attention, **layout,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    ids = tok(" ".join(corpus()), return_tensors="pt")["input_ids"][:, :tokens]
    saved = _saved_bytes(hf, ids)
    width = max(_arch.mlp_width(config), _arch.mixer_width(config, tokens))
    heads = _arch.heads(config, "self") or 0
    family = _arch.family(config)
    estimate = _memory.forward_bytes(1, tokens, 256, 4, width, heads, 4, family, device="cuda")
    print(f"{arch}, {tokens}: saved {saved / 2**20:.1f} MiB, estimated {estimate / 2**20:.1f} MiB")
    assert saved <= estimate


@pytest.mark.parametrize("arch", list(EXPERTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_mixture_of_experts_estimated_forward_covers_what_it_saves(dtype, arch):
    """Each token's experts keep its input and their outputs besides their activations: priced
    by the widest expert alone, Mixtral's float32 forward saved 41.2 MiB against an estimated
    28.5, OLMoE's 44.1. ``_arch.experts_width`` prices them as a wider dense MLP."""
    import transformers

    from attrax import _arch
    from attrax.testing import corpus, tiny_model

    _, tok = tiny_model("llama")
    name, experts = EXPERTS[arch]
    body = dict(vocab_size=len(tok), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024)  # fmt: skip
    config = getattr(transformers, name)(**(body | experts))
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    hf = hf.to(dtype)
    ids = tok(" ".join(corpus()), return_tensors="pt")["input_ids"][:, :228]
    saved = _saved_bytes(hf, ids)
    width, family = _arch.mlp_width(config), _arch.family(config)
    estimate = _memory.forward_bytes(
        1, 228, 256, dtype.itemsize, width, 4, 4, family, device="cuda"
    )
    print(f"{arch}, {dtype}: saved {saved / 2**20:.1f} MiB, estimated {estimate / 2**20:.1f} MiB")
    assert saved <= estimate


@pytest.mark.parametrize("tokens", [40, 228])
def test_a_debertas_estimated_forward_covers_what_it_saves(tokens):
    """DeBERTa-v2's relative terms keep each query's (key's) products with all ``2 * span``
    relative positions, the input of the gather that picks each pair's, and the positions'
    projections: priced as a BERT layer, a forward of 40 tokens saved 8.2 MiB against an
    estimated 6.2. ``_arch.relative_width`` prices them."""
    from attrax import _arch
    from attrax.testing import corpus, tiny_classifier

    hf, tok = tiny_classifier(
        "deberta-v2", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=1024, position_buckets=256,
    )  # fmt: skip  # DeBERTa-v3's 2 * 256 relative positions
    model = ax.load_model(hf, tokenizer=tok)
    ids = tok(" ".join(corpus()), return_tensors="pt")["input_ids"][:, :tokens]
    with model.attention_as("eager"):  # attrax's disentangled attention, as a call runs it
        saved = _saved_bytes(hf, ids)
    config, family = hf.config, _arch.family(hf.config)
    shape = (1, tokens, 256, 4, _arch.mlp_width(config), 4, 4, family)
    relative = _arch.relative_width(config, tokens)
    estimate = _memory.forward_bytes(*shape, device="cuda", relative=relative)
    print(f"{tokens}: saved {saved / 2**20:.1f} MiB, estimated {estimate / 2**20:.1f} MiB")
    assert saved <= estimate
    if tokens == 40:  # the terms' share, the larger the shorter the input
        assert _memory.forward_bytes(*shape, device="cuda") < saved


def test_no_cut_is_so_short_that_it_runs_attention_the_estimate_did_not_price(monkeypatch):
    """The estimate prices the attention a call's full length runs (fused SDPA from
    SDPA_MIN_TOKENS tokens: no [heads, L, L] weights). A target chunk cut shorter than that ran
    eager attention, which keeps them (until 2026-12-06): cuts now stop at the shortest fused
    length, and the attributions are those of one forward over every target."""
    from attrax import _model

    model, prompt, target = _long_llama(30, 12)
    cut_at_every_target(monkeypatch)
    monkeypatch.setattr(_model, "SDPA_MIN_TOKENS", 50)
    problem = Problem.build(model, prepare(model, prompt, target), resolve("probability")[1], False)
    full, first = problem.inputs[0].shape[1], int(problem.tensors.index[0, 0]) + 1
    assert first < 50 < full  # the early targets' cuts would run eager attention
    lengths = [n for _, n in problem._target_chunks(1)]
    assert min(lengths) == 50 and lengths[-1] == full - 1  # the last token predicts nothing
    assert all(model.attention_for(n, torch.device("cpu")) == "sdpa" for n in lengths)
    seen = _forwards(model)
    got = ax.saliency(model, prompt, target, chunk_size=1)
    assert sorted({tokens for _, tokens in seen}) == sorted(set(lengths))
    whole = ax.saliency(model, prompt, target, chunk_size=None)
    assert_close(got.values, whole.values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["attention_x_gradient", "guided_integrated_gradients"])
def test_a_refusal_names_no_size_the_method_does_not_take(models, name):
    # "the smallest passes with batch_size=None", of methods without batch_size (until 2026-12-06)
    with pytest.raises(ax.OptionError, match=r"the smallest passes \(one target, one point\)"):
        getattr(ax, name)(models["gpt2"], *PAIRS[0], max_memory=1)


# GPT-2 with MLPs 128 times as wide as its residual stream: the neurons outweigh the rest
_NEURONS = """
import torch
import transformers
import attrax as ax
from attrax.testing import tiny_model
_, tok = tiny_model("gpt2")
torch.manual_seed(0)
config = transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer={layers}, n_head=4,
                                 n_inner=4096, n_positions=1024)
model = ax.load_model(transformers.GPT2LMHeadModel(config).eval(), tokenizer=tok)
clean, bad = "the cat sat on the mat and " * {repeat}, "the dog sat on the mat and " * {repeat}
kw = dict(site="neurons", objective="logit", {given})
def warm():
    ax.{method}(model, "the cat", " sat", corrupted="the dog", **kw)
def call():
    ax.{method}(model, clean, {target}, corrupted=bad, **kw, {{options}})
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "given", "layers", "repeat", "target"),
    [
        # every target's estimate of every neuron at every position: until 2026-12-07 held
        # three times over (joined and stacked), 3,905 MiB under a 3,862 MiB smallest budget
        ("attribution_patching", "", 4, 10, '" the cat sat on the mat and" * 2'),
        ("attribution_patching", "grad_drop=True", 4, 10, '" the cat sat on the mat and" * 2'),
        # one neuron at one position: until 2026-12-07 a [layers, layers, B, L, N] mask of
        # every neuron, 1,698 MiB under a 583 MB smallest budget
        ("activation_patching", "neurons=[0], sources=[3]", 16, 40, '" the"'),
    ],
)
def test_patching_neurons_peak_stays_within_the_smallest_budget(
    peak_above_start, method, given, layers, repeat, target
):
    script = _NEURONS.format(
        method=method, given=given, layers=layers, repeat=repeat, target=target
    )
    namespace: dict[str, Any] = {}
    exec(script.format(options="max_memory=1").replace("def warm", "def _warm"), namespace)
    with pytest.raises(ax.OptionError, match="cannot be met") as refused:
        namespace["call"]()
    named = re.search(r"estimated ([\d.]+ [kMGT]?B); give at least", str(refused.value))
    assert named, str(refused.value)
    budget = _memory.parse_bytes(named.group(1).replace(" ", "")) + (1 << 20)
    _holds_its_budget(peak_above_start, script, budget, f"{method} {given}")


@pytest.mark.parametrize("family", ["deepseek_v3", "olmo"])
@pytest.mark.parametrize("method", ["edge_attribution_patching", "edge_patching"])
def test_edges_at_attention_calls_price_the_eager_attention_they_run(method, family):
    """The edges of a latent attention (and of OLMo's clamped projections, found so on the
    clean run) probe its calls, so their passes run attrax's eager attention whatever the
    model's: past SDPA's threshold ("auto" picks SDPA from 256 tokens on the CPU) the smallest
    budget they accept is the one they need with "eager" (the attention's weights priced), not
    SDPA's smaller one."""
    from attrax.testing import tiny_model
    from tests.test_architectures import CONFIGS, built

    _, tok = tiny_model("llama")
    config = CONFIGS[family](len(tok))
    if family == "olmo":
        config.clip_qkv = 0.05
    hf = built(config, tok, experts_implementation="eager")
    words = " ".join(corpus()).split()
    prompt, bad = " ".join(words[:300]), " ".join(["x", *words[1:300]])
    options = {"corrupted": bad, "max_memory": "1MB"}
    if method == "edge_patching":
        options["patch"] = [["input", "logits"]]
    smallest = {}
    for implementation in ("auto", "eager"):
        model = ax.load_model(hf, tokenizer=tok, attn_implementation=implementation)
        assert model.attention_for(300, torch.device("cpu")) == (
            "sdpa" if implementation == "auto" else "eager"
        )
        with pytest.raises(ax.OptionError, match="cannot be met") as refused:
            getattr(ax, method)(model, prompt, " " + words[300], **options)
        smallest[implementation] = re.search(r"estimated ([\d.]+ [KMG]B)", str(refused.value))[1]
    if smallest["auto"] != smallest["eager"]:
        # OLMo's call readers are found on the clean run: a budget the plan before it takes
        # (SDPA's) is refused after it, when it is below eager's
        assert family == "olmo" and method == "edge_patching", smallest
        model = ax.load_model(hf, tokenizer=tok, attn_implementation="auto")
        between = (_megabytes(smallest["auto"]) + _megabytes(smallest["eager"])) / 2
        with pytest.raises(ax.OptionError, match="cannot be met"):
            getattr(ax, method)(model, prompt, " " + words[300],
                                **{**options, "max_memory": f"{between}MB"})  # fmt: skip


def _megabytes(text: str) -> float:
    number, unit = text.split()
    return float(number) * {"KB": 1e-3, "MB": 1.0, "GB": 1e3}[unit]
