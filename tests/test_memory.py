"""Host memory reuse around attrax's computations (``attrax._memory``)."""

from __future__ import annotations

import resource
from types import SimpleNamespace

import pytest
import torch

import attrax as ax
from attrax import _memory


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
