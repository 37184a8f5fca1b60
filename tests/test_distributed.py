"""Dataset runs on Dask distributed: a worker killed mid-run loses nothing, lazy loading."""

from __future__ import annotations

import os
import random
import signal
import sys
from collections.abc import Iterator
from unittest import mock

import numpy as np
import pytest
import xarray as xr

import attrax as ax
from attrax import _dataset as D
from attrax._default_model_task import make_example
from tests import _naive

distributed = pytest.importorskip("distributed")


@pytest.fixture(autouse=True)
def _environment() -> Iterator[None]:
    """A cluster a test starts sets its nannies' variables in this process (``OMP_NUM_THREADS=1``,
    ``MALLOC_TRIM_THRESHOLD_``, which turns off attrax's malloc tuning): later tests, and the
    processes they measure, would inherit them."""
    with mock.patch.dict(os.environ):
        yield


def _records(n: int, seed: int = 5) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt, continuation = make_example(rng, n_digits=rng.randint(4, 6))
        out.append({"input": prompt, "target": continuation, "id": f"r{i}"})
    return out


def _die_once_on(line: int, marker: str) -> None:
    """Run on every worker: the shard task holding record ``line`` SIGKILLs its own process the
    first time any worker runs it (``marker`` created exclusively), before returning."""
    import attrax._dataset as dataset

    attribute = dataset.attribute_records

    def attribute_records(model, fn, steps, options, records, scan):  # type: ignore[no-untyped-def]
        if any(r["_line"] == line for r in records):
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return attribute(model, fn, steps, options, records, scan)

    dataset.attribute_records = attribute_records


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_a_worker_killed_mid_run_loses_nothing(tmp_path, default_model, write_jsonl):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers need not import us
    data = write_jsonl(_records(8))
    D.attribute_dataset(default_model, data, tmp_path / "serial", shard_size=2, progress=False)
    serial = ax.load_dataset_results(tmp_path / "serial")
    marker = tmp_path / "killed"
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, dashboard_address=None, silence_logs=50
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.run(_die_once_on, 4, str(marker))
        before = set(client.run(os.getpid).values())
        run = D.attribute_dataset(
            None,
            data,
            tmp_path / "dask",
            shard_size=2,
            progress=False,
            scheduler=cluster.scheduler_address,
        )
    assert marker.exists() and any(not _alive(pid) for pid in before)  # a worker really died
    assert (run.records, run.shards, run.skipped) == (8, 4, 0)
    result = ax.load_dataset_results(tmp_path / "dask")
    assert result.example.values.tolist() == list(range(8))  # every record exactly once
    # the client loaded the same model by path as the serial run held in memory: same run but name
    xr.testing.assert_identical(result, serial)
    _assert_records_equal_the_loop(result, default_model, _records(8))


def _evaluate_dying_on(text: str, marker: str, reruns: str):  # type: ignore[no-untyped-def]
    """An ``_evaluate_task`` for the client to submit (pickled by value): the task of the shard
    holding the record whose input is ``text`` SIGKILLs its worker process the first time any
    worker runs it (``marker`` created exclusively, holding that pid); a rerun appends its pid to
    ``reruns``."""

    def evaluate_task(where, records, methods, options):  # type: ignore[no-untyped-def]
        import attrax._evaluate as evaluation  # on the worker: the task as attrax defines it

        if any(r.input == text for r in records):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                with open(reruns, "a") as f:
                    f.write(f"{os.getpid()}\n")
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        return evaluation._evaluate_task(where, records, methods, options)

    return evaluate_task


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_an_evaluation_survives_a_killed_worker(tmp_path, default_model, monkeypatch):
    import functools

    import cloudpickle

    import attrax._evaluate as evaluation

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers need not import us
    records = _records(6, seed=7)  # 4 to 6 digits: shards of different widths, padded when joined
    methods = {"saliency": "saliency", "ig": functools.partial(ax.integrated_gradients, steps=4)}
    metrics = ["comprehensiveness", "sufficiency", "spearman"]
    serial = ax.evaluate(default_model, records, methods, metrics, attributions=True)
    marker, reruns = tmp_path / "killed", tmp_path / "reruns"
    # the client submits this wrapper in place of the task; the workers run it
    wrapper = _evaluate_dying_on(records[2]["input"], str(marker), str(reruns))
    monkeypatch.setattr(evaluation, "_evaluate_task", wrapper)
    ds = ax.evaluate(None, records, methods, metrics, attributions=True, workers=2, shard_size=2)
    killed = int(marker.read_text())  # the shard's first run killed its worker...
    rerun = [int(pid) for pid in reruns.read_text().split()]
    assert len(rerun) == 1 and rerun[0] != killed  # ...and another process ran it once more
    assert ds.example.values.tolist() == list(range(6))  # every record once, in record order
    # the inputs themselves, in record order: shard 1 (records 2, 3) is neither lost nor doubled
    assert serial.sizes["source"] > 0 and np.isnan(serial["attribution"].values).any()
    xr.testing.assert_identical(
        ds.drop_vars(list(ds.data_vars)), serial.drop_vars(list(serial.data_vars))
    )
    assert list(ds.data_vars) == list(serial.data_vars)
    # each record's saliency, as the workers computed it, is the plain loop's on that record
    saliency = ds["attribution"].sel({"method": "saliency"})  # not sel(method=): xarray's own
    _assert_records_equal_the_loop(saliency, default_model, records, ids=False)
    for name in ds.data_vars:
        # as the cluster-vs-in-process test (tests/test_experiments.py): a shard pads its batch to
        # its own longest record, which changes the order of float sums, not the result; padding
        # (NaN) is compared exactly
        np.testing.assert_allclose(ds[name].values, serial[name].values, rtol=1e-5, atol=1e-6)


def test_a_local_cluster_equals_a_serial_run_and_resumes(tmp_path, default_model, write_jsonl):
    data = write_jsonl(_records(4))
    D.attribute_dataset(default_model, data, tmp_path / "serial", shard_size=1, progress=False)
    out = tmp_path / "dask"
    environ = dict(os.environ)
    # one worker process: the cheapest cluster attrax starts itself (two: the test above)
    D.attribute_dataset(None, data, out, shard_size=1, progress=False, workers=1)
    assert dict(os.environ) == environ  # not the nannies' OMP_NUM_THREADS=1 for later processes
    xr.testing.assert_identical(
        ax.load_dataset_results(out), ax.load_dataset_results(tmp_path / "serial")
    )
    _assert_records_equal_the_loop(ax.load_dataset_results(out), default_model, _records(4))
    # the manifest is the truth: a lost shard is recomputed in process, the rest kept
    (out / "shard-00002.nc").unlink()
    again = D.attribute_dataset(None, data, out, shard_size=1, progress=False)
    assert again.skipped == 3
    xr.testing.assert_identical(
        ax.load_dataset_results(out), ax.load_dataset_results(tmp_path / "serial")
    )


def test_two_clients_on_one_output_are_refused(tmp_path, write_jsonl):
    fcntl = pytest.importorskip("fcntl")
    data = write_jsonl(_records(1))
    out = tmp_path / "out"
    D.attribute_dataset(None, data, out, progress=False)
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ax.InputError, match="in use by another attrax process"):
            # a finished run needs no cluster: the address is never dialled, the lock refuses
            D.attribute_dataset(None, data, out, progress=False, scheduler="tcp://127.0.0.1:1")


def test_distributed_options_are_checked(tmp_path, default_model, write_jsonl, monkeypatch):
    data = write_jsonl(_records(1))
    with pytest.raises(ax.OptionError, match="in-memory Model"):
        D.attribute_dataset(default_model, data, tmp_path / "o", workers=2)
    with pytest.raises(ax.OptionError, match="positive integer"):
        D.attribute_dataset(None, data, tmp_path / "o", workers=0)
    with pytest.raises(ax.OptionError, match="not both"):
        D.attribute_dataset(None, data, tmp_path / "o", workers=1, scheduler="tcp://x:1")
    monkeypatch.setitem(sys.modules, "distributed", None)  # the extra is not installed
    with pytest.raises(ax.OptionError, match=r"attrax\[distributed\]"):
        D.attribute_dataset(None, data, tmp_path / "o", workers=2)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("address", ["notanaddress", "foo://x:1", "tcp://x:port"])
def test_a_malformed_scheduler_address_is_an_option_error(tmp_path, write_jsonl, address):
    data = write_jsonl(_records(1))
    match = rf"`scheduler` '{address}' is not a Dask scheduler address \(.*\): expected 'tcp://"
    with pytest.raises(ax.OptionError, match=match):
        D.attribute_dataset(None, data, tmp_path / "o", progress=False, scheduler=address)
    with pytest.raises(ax.OptionError, match=match):
        ax.evaluate(None, data, {"s": "saliency"}, scheduler=address)
    assert not (tmp_path / "o").exists()


def test_results_open_lazily_as_one_array(tmp_path, default_model, write_jsonl):
    dask = pytest.importorskip("dask")
    data = write_jsonl(_records(5))
    out = tmp_path / "out"
    D.attribute_dataset(default_model, data, out, shard_size=2, progress=False)
    eager = ax.load_dataset_results(out)
    lazy = ax.load_dataset_results(out, lazy=True)
    assert isinstance(lazy.data, dask.array.Array)
    assert lazy.chunks[0] == (2, 2, 1)  # one chunk per shard along example
    assert np.isnan(eager.values).any()  # shards of different widths: padding is compared too
    xr.testing.assert_identical(lazy.compute(), eager)
    rechunked = ax.load_dataset_results(out, chunks={"source": -1})
    assert isinstance(rechunked.data, dask.array.Array)
    xr.testing.assert_identical(rechunked.compute(), eager)
    # a reduction over the run without loading it whole
    np.testing.assert_allclose(
        lazy.mean("example").compute().values, eager.mean("example").values, rtol=1e-6
    )


def test_an_evaluation_opens_lazily(tmp_path, default_model):
    dask = pytest.importorskip("dask")
    data = _records(3)
    ds = ax.evaluate(default_model, data, {"saliency": ax.saliency, "ixg": ax.input_x_gradient})
    ax.save(ds, tmp_path / "eval.nc")
    lazy = ax.load_dataset_results(tmp_path / "eval.nc", lazy=True)
    assert isinstance(lazy["comprehensiveness"].data, dask.array.Array)
    xr.testing.assert_identical(lazy.compute(), ds)


# --- workers write their own shards (d17speed): the manifest stays the single truth ----------


def test_a_shard_file_not_in_the_manifest_is_recomputed_on_resume(
    tmp_path, default_model, write_jsonl
):
    """What a worker that wrote its shard and died (or a client that died before listing it)
    leaves: a file the manifest does not list. It is not part of the run: rewritten on resume."""
    import json

    data = write_jsonl(_records(6))
    out = tmp_path / "out"
    D.attribute_dataset(default_model, data, out, shard_size=2, progress=False)
    serial = ax.load_dataset_results(out)
    manifest = json.loads((out / D.MANIFEST).read_text())
    manifest["done"].remove("shard-00001.nc")
    (out / D.MANIFEST).write_text(json.dumps(manifest))
    stale = ax.load(out / "shard-00001.nc")
    ax.save(stale * 0 + 7.0, out / "shard-00001.nc")  # readable, but not this run's values
    (out / ".shard-00001.nc.0123456789ab.tmp").write_bytes(b"half a write")
    (out / ".attrax-run-0123abcd").touch()  # the token of a Dask run that a kill ended
    run = D.attribute_dataset(default_model, data, out, shard_size=2, progress=False)
    assert run.skipped == 2
    xr.testing.assert_identical(ax.load_dataset_results(out), serial)
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock",
        "manifest.json",
        "shard-00000.nc",
        "shard-00001.nc",
        "shard-00002.nc",
    ]


def test_a_worker_without_the_output_directory_returns_the_shard(tmp_path, write_jsonl):
    """The token file tells a worker it shares the client's filesystem; without it (a cluster
    with no shared filesystem) the worker writes nothing and returns the array."""
    data = write_jsonl(_records(2))
    scan = D._scan(data)
    records = next(D.shard_records(data, 2))
    where = (None, None, None, None)
    args = (where, "saliency", {}, None, scan, records)
    out = tmp_path / "out"
    out.mkdir()
    shard = out / "shard-00000.nc"
    returned = D._shard_task(*args, str(shard), ".attrax-run-0000abcd")
    assert isinstance(returned, xr.DataArray) and not shard.exists()
    (out / ".attrax-run-0000abcd").touch()
    written = D._shard_task(*args, str(shard), ".attrax-run-0000abcd")
    assert written == D.Written("shard-00000.nc", (0, 1), tuple(returned.sizes.items()))
    xr.testing.assert_identical(ax.load(shard), returned)


def _write_then_die_once(marker: str):  # type: ignore[no-untyped-def]
    """A ``_shard_task`` for the client to submit (pickled by value): the first shard
    written anywhere SIGKILLs its worker right after its file is in place, before the client
    hears of it (``marker`` created exclusively, holding the pid); Dask reruns that shard."""

    def shard_task(*args):  # type: ignore[no-untyped-def]
        import attrax._dataset as dataset  # on the worker: the task as attrax defines it

        save = dataset.save

        def save_then_die(da, path):  # type: ignore[no-untyped-def]
            save(da, path)
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)

        dataset.save = save_then_die
        try:
            return dataset._shard_task(*args)
        finally:
            dataset.save = save

    return shard_task


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_a_shard_written_then_rerun_after_a_worker_death_is_one_copy(
    tmp_path, default_model, write_jsonl, monkeypatch
):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers need not import us
    data = write_jsonl(_records(6))
    D.attribute_dataset(default_model, data, tmp_path / "serial", shard_size=2, progress=False)
    serial = ax.load_dataset_results(tmp_path / "serial")

    def client_writes(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the client wrote a shard: the workers should have")

    monkeypatch.setattr(D, "save", client_writes)
    marker, out = tmp_path / "killed", tmp_path / "dask"
    # the client submits this wrapper in place of the task; the workers run it
    monkeypatch.setattr(D, "_shard_task", _write_then_die_once(str(marker)))
    # one worker, as attrax starts it: its nanny restarts it and Dask reruns the shard there
    run = D.attribute_dataset(None, data, out, shard_size=2, progress=False, workers=1)
    assert not _alive(int(marker.read_text()))  # the worker really died after writing
    assert (run.records, run.shards, run.skipped) == (6, 3, 0)
    names = ["shard-00000.nc", "shard-00001.nc", "shard-00002.nc"]
    assert sorted(p.name for p in out.iterdir()) == [".lock", "manifest.json", *names]
    assert D._read_manifest(out)["done"] == names  # each shard listed once
    result = ax.load_dataset_results(out)
    assert result.example.values.tolist() == list(range(6))
    xr.testing.assert_identical(result, serial)


def test_a_shard_write_takes_no_cluster_lock(tmp_path, monkeypatch):
    """With a Dask client active, xarray would guard each netCDF write call with a cluster-wide
    ``distributed.Lock`` (a scheduler round trip each, ~50 per shard); ``ax.save`` of values in
    memory takes a lock of this process instead."""

    def cluster_lock(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a shard write asked the scheduler for a lock")

    da = xr.DataArray(np.arange(6.0).reshape(2, 3), dims=("target", "source"), name="saliency")
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
    ):
        monkeypatch.setattr(distributed.Lock, "acquire", cluster_lock)
        ax.save(da, tmp_path / "a.nc")
    xr.testing.assert_identical(ax.load(tmp_path / "a.nc"), da)


def _process_limit_on_a_worker(terminate: float | bool) -> int | None:
    """``attrax._memory``'s process limit once a 3 GB worker with this ``terminate`` share
    loaded the model (in this process: ``processes=False``)."""
    import dask

    from attrax import _memory
    from attrax._distributed import worker_model

    with (
        dask.config.set({"distributed.worker.memory.terminate": terminate}),
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
            memory_limit="3GB",
        ) as cluster,
        distributed.Client(cluster) as client,
    ):  # fmt: skip
        task = client.submit(lambda: (worker_model((None, None, None, 1)), _memory._process_limit))
        return task.result()[1]


def test_a_worker_plans_below_the_limit_its_nanny_kills_it_at(monkeypatch):
    """A worker's calls without ``max_memory`` plan below ``terminate`` times its memory limit,
    which /proc/meminfo (the host's memory) does not show."""
    from attrax import _memory
    from attrax._distributed import worker_model

    monkeypatch.setattr(_memory, "_process_limit", None)
    assert _process_limit_on_a_worker(0.9) == int(0.9 * 3e9)
    assert _process_limit_on_a_worker(False) is None  # a nanny that never kills
    worker_model((None, None, None, None))  # outside a worker: no limit
    assert _memory._process_limit is None


def test_a_task_that_kills_every_worker_is_one_error_that_names_a_budget():
    from attrax._distributed import Pool

    class Dead:  # a future whose task killed every worker that ran it
        def result(self):  # type: ignore[no-untyped-def]
            raise distributed.KilledWorker("attrax-shard-00003-ab", None, 3)

    with pytest.raises(ax.InputError) as died:
        Pool._result(Dead())
    assert str(died.value) == (
        "a Dask worker died on every try of 'attrax-shard-00003-ab' (out of memory? a smaller "
        "`max_memory` or larger workers may help): rerun to resume"
    )


@pytest.mark.slow
def test_a_worker_with_little_memory_completes_a_call_that_needs_more(tmp_path, write_jsonl):
    """Occlusion over GPT-2's vocabulary takes over 1 GiB without a budget; a 1.6 GB worker,
    killed by its nanny above 95% of that, completes it without ``max_memory``."""
    import logging

    from attrax.testing import corpus, tiny_model

    hf, tok = tiny_model("gpt2", n_embd=128, n_layer=4, n_head=4, n_positions=1024,
                         vocab_size=50257)  # fmt: skip
    hf.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    words = " ".join(corpus()).split()
    data = write_jsonl([{"input": " ".join(words[:100]), "target": " " + " ".join(words[100:124])}])
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, memory_limit="1.6GB", dashboard_address=None,
        silence_logs=logging.CRITICAL,
    ) as cluster:  # fmt: skip
        run = D.attribute_dataset(
            str(tmp_path / "model"), data, tmp_path / "out", method="occlusion", progress=False,
            scheduler=cluster.scheduler_address,
        )  # fmt: skip
    assert (run.records, run.shards, run.skipped) == (1, 1, 0)
    assert np.isfinite(ax.load_dataset_results(tmp_path / "out").values).any()


def _assert_records_equal_the_loop(
    result: xr.DataArray, model: ax.Model, records: list[dict], ids: bool = True
) -> None:
    """Each ``example`` of a run's ``(example, target, source)`` result against a plain autograd
    loop on its record alone, nothing of attrax's dataset, shard or reduction code: per target
    token, the gradient of its probability w.r.t. each earlier embedding, its L2 norm over the
    hidden size, divided by the sum over sources (the "auto" reduction); the rest is NaN."""
    assert result.dims == ("example", "target", "source")
    assert result.example.values.tolist() == list(range(len(records)))
    if ids:
        assert result.id.values.tolist() == [r["id"] for r in records]
    for i, record in enumerate(records):
        source_ids, target_ids = _naive.token_ids(model, record["input"], record["target"])
        run = _naive.Runner(model, source_ids, target_ids)
        grads = run.gradients(run.embeddings(), _naive.probability, None)
        sequence = source_ids + target_ids
        row = result.isel(example=i)
        width = row.sizes["source"]
        if "source_id" in row.coords:  # an evaluation's attributions carry none
            assert row.source_id.values.tolist() == sequence + [-1] * (width - len(sequence))
        positions = row.target.values.tolist()
        want = np.full((len(positions), width), np.nan)
        want_ids = [-1] * len(positions)
        for k, t in enumerate(run.targets()):
            norms = np.linalg.norm(grads[k][0].numpy()[:t], axis=-1)
            want[positions.index(t), :t] = norms / norms.sum()
            want_ids[positions.index(t)] = sequence[t]
        assert row.target_id.values.tolist() == want_ids
        values = row.values
        assert np.array_equal(np.isnan(values), np.isnan(want)), "NaN (future/padding) differs"
        ok = ~np.isnan(want)
        np.testing.assert_allclose(values[ok], want[ok], rtol=1e-4, atol=1e-6)


def test_a_workers_attrax_error_is_the_clis_one_line(tmp_path, write_jsonl, capfd):
    """An AttraxError on a worker (a model path that is not there, a record that cannot be
    attributed) is the client's one line: the worker logged it first as a failed computation
    with its traceback, a dozen lines (until 2026-12-06)."""
    from attrax.cli import main

    data = write_jsonl(_records(2))
    args = ["attribute-dataset", "--data", str(data), "--workers", "1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a"), "--model", str(tmp_path / "none")]) == 2
    err = capfd.readouterr().err
    assert err.startswith("attrax: error: `model`") and "does not exist locally" in err, err
    assert err.count("\n") == 1, err


@pytest.mark.skipif(not hasattr(signal, "SIGINT"), reason="needs POSIX signals")
def test_local_workers_leave_a_terminals_interrupt_to_this_process():
    """A terminal's Ctrl-C reaches the whole process group: the workers ignore it, and this
    process closes them and says one line (until 2026-12-06 each worker printed its
    KeyboardInterrupt traceback above it). This process's own handler is restored."""
    from attrax._distributed import Pool

    before = signal.getsignal(signal.SIGINT)
    pool = Pool(None, None, None, workers=1)

    def ignored() -> bool:
        return pool.client.submit(
            lambda: signal.getsignal(signal.SIGINT) == signal.SIG_IGN, pure=False
        ).result()

    try:
        first = ignored()
        # a worker its nanny restarts (after a crash) ignores it too: not until 2026-12-06
        pool.client.restart_workers(list(pool.client.scheduler_info()["workers"]))
        restarted = ignored()
    finally:
        pool.close()
    assert first and restarted
    assert signal.getsignal(signal.SIGINT) is before


def test_a_workers_threads_load_its_model_once(monkeypatch):
    """Threads of one worker each loaded the model when none was cached yet (transformers'
    concurrent loads can come back without tied weights) until 2026-12-06."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from attrax import _distributed, _model

    loads = []

    def slow_load(spec, **kwargs):
        loads.append(threading.get_ident())
        time.sleep(0.2)
        return object()

    monkeypatch.setattr(_model, "load_model", slow_load)
    monkeypatch.setattr(_distributed, "_MODELS", {})
    where = ("some/path", None, None, None)
    with ThreadPoolExecutor(4) as pool:
        models = list(pool.map(lambda _: _distributed.worker_model(where), range(4)))
    assert len(loads) == 1 and all(m is models[0] for m in models)
