"""Dataset runs and evaluations on Dask distributed: a local cluster of worker processes or an
existing one.

:func:`attribute_dataset` and :func:`evaluate` with ``workers=N`` or ``scheduler=ADDRESS`` hand
one task per shard of records to Dask. Each worker process loads the model once (a cache keyed by
path, device and dtype), computes the shard and writes its file itself, atomically (temp name in
the output directory, fsync, rename), returning only the shard's name to the client, which lists
it in the manifest. The manifest stays the single truth: a shard file it does not list (a worker
wrote it, then it or the client died) is not part of the run and is rewritten on resume; a shard
that Dask reruns after a worker death writes the same file again, atomically, with the same
values. A worker that does not see the output directory (a cluster without a shared filesystem:
it finds no token file the client put there for this run) returns the array for the client to
write. Results are the same as a serial run's, since each shard is computed by one call on the
same records (an evaluation's shards are joined along ``example`` in record order, equal to one
batch up to float rounding).

Dask is an optional extra (``pip install 'attrax[distributed]'``), imported only here, on use.
This module knows clusters, not runs: :mod:`~attrax._dataset` and :mod:`~attrax._evaluate` hand
it their own worker tasks (:func:`reporting` functions of theirs), so imports go one way.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._errors import AttraxError, InputError, OptionError
from ._memory import limit_process

TRIM = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
# a local cluster that attrax starts: Dask's periodic bookkeeping, made rare. Measured on 2 cores:
# an idle 2-worker cluster took 0.14-0.24 of a core (event-loop health checks every 20 ms in every
# process, the workers' statistical profiler sampling every 10 ms, system and memory monitors);
# work stealing has nothing to balance when every task is one equal shard
QUIET = {
    TRIM: None,  # Dask's nannies would turn off attrax's own malloc tuning (_memory.reuse_host_memory)
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.admin.system-monitor.disk": False,
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.scheduler.work-stealing": False,
    "distributed.deploy.cluster-repr-interval": "10s",
}
# worker side: models loaded in this process, keyed by (path, device, dtype)
_MODELS: dict[tuple[str | None, str | None, str | None], Any] = {}
_MODELS_LOCK = threading.Lock()


def require() -> Any:
    """The ``distributed`` module, or an error saying how to install it."""
    try:
        import distributed
    except ImportError:
        raise OptionError(
            "`workers`/`scheduler` run on Dask distributed, which is not installed: "
            "pip install 'attrax[distributed]'"
        ) from None
    return distributed


def check(model: Any, workers: Any, scheduler: Any) -> None:
    """Refuse options that cannot work before anything starts."""
    if workers is not None and scheduler is not None:
        raise OptionError(
            "give `workers` (start a local cluster) or `scheduler` (use one), not both"
        )
    if workers not in (None, "auto") and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise OptionError(f"`workers` must be a positive integer or 'auto', got {workers!r}")
    if scheduler is not None and (not isinstance(scheduler, str) or not scheduler.strip()):
        raise OptionError(
            f"`scheduler` must be a scheduler address such as 'tcp://host:8786', got {scheduler!r}"
        )
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise OptionError(
            "`model` must be a path (or None, the built-in model) with `workers`/`scheduler`: "
            "each worker process loads it once; an in-memory Model is not shipped to workers, "
            f"got {type(model).__name__}"
        )
    require()
    if scheduler is not None:
        _check_address(scheduler)


def _check_address(scheduler: str) -> None:
    """A scheduler address that Dask cannot parse refused as an option, before any connection."""
    from distributed.comm import registry
    from distributed.comm.addressing import parse_address

    try:
        scheme, location = parse_address(scheduler)
        backend = registry.get_backend(scheme)
        with contextlib.suppress(NotImplementedError):  # inproc:// has no host and port to check
            backend.get_address_host_port(location)
    except ValueError as err:
        raise OptionError(
            f"`scheduler` {scheduler!r} is not a Dask scheduler address ({err}): expected "
            "'tcp://host:port'"
        ) from None


def picklable(methods: Mapping[str, Any]) -> None:
    """Refuse a method that cannot be sent to the workers, before anything starts."""
    from distributed.protocol import pickle

    for name, fn in methods.items():
        try:
            pickle.dumps(fn)
        except Exception as err:
            raise OptionError(
                f"`methods[{name!r}]` {fn!r} does not pickle, so it cannot be sent to Dask "
                f"workers ({type(err).__name__}: {err}); give a method name, a public attrax "
                "function, or a functools.partial or ax.pipe of them"
            ) from None


def local_workers(workers: int | str, device: str | None) -> int:
    """``workers`` as a count: ``"auto"`` is one per GPU when running on CUDA, else one per core."""
    if workers != "auto":
        return int(workers)
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return os.cpu_count() or 1


TOKEN = ".attrax-run-"  # + a run id: the file that tells workers they share the output directory


@contextlib.contextmanager
def _workers_ignore_interrupts() -> Iterator[None]:
    """Start worker processes with SIGINT ignored (they inherit it): a terminal's Ctrl-C
    reaches the whole process group, and each worker printed its KeyboardInterrupt traceback
    while this process, which closes them, said one line."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupts_ignored(distributed: Any) -> Any:
    """A worker plugin that ignores SIGINT in each worker process, restarted ones included."""

    class InterruptsIgnored(distributed.WorkerPlugin):
        def setup(self, worker: Any) -> None:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.SIG_IGN)

    return InterruptsIgnored()


@dataclass
class Pool:
    """A Dask client for one run, started on first use: a ``LocalCluster`` of ``workers``
    processes (one thread each) or a connection to ``scheduler``."""

    spec: str | None
    device: str | None
    dtype: torch.dtype | None
    workers: int | str | None = None
    scheduler: str | None = None
    name: str | None = None  # the model as the arrays name it (as given), when not ``spec``
    _client: Any = None
    _cluster: Any = None
    _owned: bool = True
    # the variables starting the cluster set in this process, with their values before (None:
    # unset); put back on close
    _environ: dict[str, str | None] | None = None

    @property
    def client(self) -> Any:
        if self._client is None:
            distributed = require()
            if self.scheduler is not None:
                # a client of this process on that scheduler is used as is: a second sync client
                # in one process trips over the first one's event loop
                self._client = _existing(distributed, self.scheduler)
                if self._client is not None:
                    self._owned = False
                    return self._client
                try:
                    self._client = distributed.Client(self.scheduler, timeout="30s")
                except OSError as err:
                    raise InputError(
                        f"`scheduler` {self.scheduler!r}: no Dask scheduler answers there ({err})"
                    ) from None
            else:
                import dask

                count = local_workers(self.workers or 1, self.device)
                # the nannies set OMP_NUM_THREADS=1 and others in this process to spawn workers
                before = dict(os.environ)
                # QUIET: without Dask's MALLOC_TRIM_THRESHOLD_ (measured 2x slower per shard with
                # it) and with its periodic bookkeeping made rare
                with dask.config.set(QUIET), _workers_ignore_interrupts():
                    self._cluster = distributed.LocalCluster(
                        n_workers=count,
                        threads_per_worker=1,  # one task, one torch thread per process
                        processes=True,
                        dashboard_address=None,
                        silence_logs=logging.ERROR,
                    )
                self._client = distributed.Client(self._cluster)
                # a worker its nanny restarts is spawned after SIGINT is restored here
                self._client.register_plugin(_interrupts_ignored(distributed), name="attrax-sigint")
                self._environ = {
                    name: before.get(name)
                    for name in set(before) | set(os.environ)
                    if before.get(name) != os.environ.get(name)
                }
        return self._client

    @property
    def _threads(self) -> int | None:
        return 1 if self.scheduler is None else None

    def close(self) -> None:
        if self._client is not None and self._owned:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()
        for name, value in (self._environ or {}).items():  # else in every later subprocess
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._client = self._cluster = self._environ = None

    def where(self) -> tuple[str | None, str | None, str | None, int | None]:
        """What a task's :func:`worker_model` loads: path, device, dtype, torch threads."""
        dtype = None if self.dtype is None else str(self.dtype).removeprefix("torch.")
        return self.spec, self.device, dtype, self._threads

    def map(self, task: Callable[..., Any], shards: Iterable[Any], *args: Any) -> list[Any]:
        """``task(where, shard, *args)`` for every shard on the workers, results in shard order
        (a task's :class:`Failed` raised here)."""
        run = uuid.uuid4().hex[:8]
        futures = [
            self.client.submit(
                task, self.where(), shard, *args, key=f"{_key(task)}-{k:05d}-{run}", pure=False
            )
            for k, shard in enumerate(shards)
        ]
        return self._gather(futures)

    def files(
        self,
        task: Callable[..., Any],
        shards: Iterable[tuple[int, Any]],
        args: tuple[Any, ...],
        out: Path,
        path: Callable[[int], str],
    ) -> Iterator[tuple[int, Any]]:
        """``(k, result)`` of ``task(where, *args, shard, out/path(k), token, name)`` for every
        ``(k, shard)``, in the order they complete. The task writes its file itself where it
        finds the ``token`` file this run puts in ``out`` (the client's filesystem), else returns
        what the client writes."""
        distributed = require()
        run = uuid.uuid4().hex[:8]
        token = out / f"{TOKEN}{run}"
        token.touch()
        futures = {}
        try:
            for k, shard in shards:
                future = self.client.submit(
                    task, self.where(), *args, shard, str(out / path(k)), token.name, self.name,
                    key=f"{_key(task)}-{k:05d}-{run}",
                )  # fmt: skip
                futures[future] = k
            for future in distributed.as_completed(futures):
                yield futures[future], self._result(future)
                future.release()
        finally:
            for future in futures:
                future.cancel()
            token.unlink(missing_ok=True)

    def _gather(self, futures: list[Any]) -> list[Any]:
        try:
            return [self._result(future) for future in futures]
        finally:
            for future in futures:
                future.cancel()

    @staticmethod
    def _result(future: Any) -> Any:
        distributed = require()
        try:
            result = future.result()
        except distributed.KilledWorker as err:
            raise InputError(
                f"a Dask worker died on every try of {err.task!r} (out of memory? a smaller "
                "`max_memory` or larger workers may help): rerun to resume"
            ) from None
        if isinstance(result, Failed):
            raise result.error
        return result


def _key(task: Callable[..., Any]) -> str:
    """A task's name for Dask's dashboard and logs: ``attrax-shard`` for ``_shard_task``."""
    return "attrax-" + task.__name__.strip("_").removesuffix("_task").replace("_", "-")


@dataclass(frozen=True)
class Failed:
    """A task's AttraxError, returned rather than raised: the worker would log a raised one as
    a failed computation, many lines before the client's one."""

    error: AttraxError


def reporting(task: Callable[..., Any]) -> Callable[..., Any]:
    """``task``, returning its AttraxError as a :class:`Failed` for the client to raise."""

    @functools.wraps(task)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except AttraxError as err:
            return Failed(err)

    return run


def _existing(distributed: Any, address: str) -> Any:
    """This process's default client if it talks to the scheduler at ``address``, else None."""
    try:
        client = distributed.default_client()
    except ValueError:
        return None
    return client if client.scheduler.address == address else None


def worker_model(where: tuple[str | None, str | None, str | None, int | None]) -> Any:
    """The model on this worker, loaded on first use; a local cluster's worker ``i`` takes GPU
    ``i mod count`` when the device is ``cuda``."""
    from ._model import load_model

    spec, device, dtype, threads = where
    if threads is not None:
        torch.set_num_threads(threads)
    limit_process(_kill_limit())
    if device is not None and device == "cuda" and torch.cuda.device_count() > 1:
        device = f"cuda:{_rank() % torch.cuda.device_count()}"
    key = (spec, device, dtype)
    with _MODELS_LOCK:  # a worker's threads load its model once
        if key not in _MODELS:
            _MODELS[key] = load_model(
                spec, device=device, dtype=None if dtype is None else getattr(torch, dtype)
            )
        return _MODELS[key]


def _kill_limit() -> int | None:
    """The resident bytes above which this Dask worker's nanny kills it (a share, ``terminate``,
    of its memory limit), or None: calls without ``max_memory`` plan below it."""
    try:
        import dask
        import distributed

        limit = distributed.get_worker().memory_manager.memory_limit
        share = dask.config.get("distributed.worker.memory.terminate")
    except (ImportError, ValueError, AttributeError, KeyError):  # not in a worker
        return None
    return int(limit * share) if limit and share else None


def _rank() -> int:
    try:
        import distributed

        name = distributed.get_worker().name
        return int(name)
    except (ImportError, ValueError, TypeError):
        return 0
