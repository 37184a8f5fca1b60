"""Throughput of ``attribute_dataset`` in process and on a local Dask cluster of 1 and 2 workers.

    PYTHONPATH=src python -m benchmarks.distributed [--records 96] [--shard-size 4] [--steps 32]
        [--dask-defaults]

Every configuration runs one torch thread per process on the same JSONL file (prompts of the
built-in model) with integrated gradients. The clusters are started (with attrax's settings,
``_distributed.QUIET``, or Dask's own with ``--dask-defaults``), and their workers' model caches
and netCDF writers warmed by a one-record run, before the clock starts: the examples/s reported
are those of the steady state, what a long run sees (the start-up, about a second per worker, is
printed apart). The results are checked equal to the in-process run before any time is reported.
CPU seconds per shard by process and thread: ``benchmarks/distributed_cpu.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import xarray as xr

import attrax as ax
from attrax._default_model_task import make_example


def _data(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        prompt, answer = make_example(rng, n_digits=6)
        lines.append(json.dumps({"input": prompt, "target": answer}))
    path.write_text("\n".join(lines) + "\n")
    return path


def parser() -> argparse.ArgumentParser:
    """The options this benchmark and ``distributed_cpu`` share."""
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, default=96)
    p.add_argument("--shard-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument(
        "--dask-defaults",
        action="store_true",
        help="Dask's own periodic bookkeeping (attrax before it set QUIET), for comparison",
    )
    return p


def setup(args: argparse.Namespace) -> tuple[Path, Path, Path, dict[str, Any]]:
    """One torch thread; ``(tmp dir, data file, one-record warm-up file, run options)``."""
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    data = _data(tmp / "data.jsonl", args.records)
    warm = _data(tmp / "warm.jsonl", 1, seed=1)
    options = {"method": "integrated_gradients", "steps": args.steps, "progress": False}
    options["shard_size"] = args.shard_size
    return tmp, data, warm, options


def main() -> None:
    import dask
    import distributed

    from attrax._distributed import QUIET, TRIM

    args = parser().parse_args()
    tmp, data, warm, options = setup(args)

    ax.attribute_dataset(None, warm, tmp / "warm-serial", **options)  # load the model here too
    start, cpu = time.perf_counter(), time.process_time()
    ax.attribute_dataset(None, data, tmp / "serial", **options)
    rates = {"in process": args.records / (time.perf_counter() - start)}
    # examples per CPU second: what the configuration costs, whatever else the machine runs
    per_cpu = {"in process": args.records / (time.process_time() - cpu)}
    busy, client_cpu = {}, {}
    shards = -(-args.records // args.shard_size)
    reference = ax.load_dataset_results(tmp / "serial")

    for workers in (1, 2):
        begun = time.perf_counter()
        with (
            # as attribute_dataset(workers=N) starts its cluster
            dask.config.set({TRIM: None} if args.dask_defaults else QUIET),
            distributed.LocalCluster(
                n_workers=workers, threads_per_worker=1, dashboard_address=None, silence_logs=50
            ) as cluster,
            distributed.Client(cluster) as client,
        ):
            threads = set(client.run(torch.get_num_threads).values())
            assert threads == {1}, f"workers run {threads} torch threads"
            where = {"scheduler": cluster.scheduler_address}
            # every worker loads the model and runs IG once (its first call is slower)
            client.run(_warm, str(warm), args.steps)
            print(
                f"{workers} worker(s): cluster up and warm in {time.perf_counter() - begun:.1f} s"
            )
            out = tmp / f"dask-{workers}"
            name = f"{workers} worker(s)"
            cpu_before = client.run(time.process_time)
            here = time.process_time()  # this process: the client loop, scheduler and nannies
            start = time.perf_counter()
            with distributed.get_task_stream(client) as stream:
                ax.attribute_dataset(None, data, out, **options, **where)
            wall = time.perf_counter() - start
            client_cpu[name] = 1e3 * (time.process_time() - here) / shards
            rates[name] = args.records / wall
            cpu_after = client.run(time.process_time)
            used = sum(cpu_after[w] - cpu_before[w] for w in cpu_after)
            per_cpu[name] = args.records / used
            computing = sum(
                part["stop"] - part["start"]
                for task in stream.data
                for part in task["startstops"]
                if part["action"] == "compute"
            )
            busy[name] = computing / (workers * wall)
        xr.testing.assert_identical(ax.load_dataset_results(out), reference)

    print(f"\n{args.records} records, shards of {args.shard_size}, IG steps={args.steps}")
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")
    for name, rate in rates.items():
        print(
            f"{name:>12}: {rate:7.2f} examples/s ({rate / rates['1 worker(s)']:.2f}x 1 worker), "
            f"{per_cpu[name]:6.2f} examples per CPU second"
            + (f", workers computing {busy[name]:.0%} of the wall time" if name in busy else "")
            + (
                f", client process {client_cpu[name]:.0f} CPU ms per shard"
                if name in client_cpu
                else ""
            )
        )
    shutil.rmtree(tmp, ignore_errors=True)


def _warm(warm: str, steps: int) -> None:
    """On a worker: fill its model cache, as the run's shard tasks will find it."""
    from attrax import _dataset, _distributed

    model = _distributed.worker_model((None, None, None, None))
    fn = _dataset.resolve_method("integrated_gradients")
    da = fn(model, ["3 1 4 0 5 9 ="], [" 9 5 0 4 1 3"], steps=steps)
    with tempfile.TemporaryDirectory() as tmp:  # and the netCDF writer, as shard writes use it
        ax.save(da, Path(tmp) / "warm.nc")


if __name__ == "__main__":
    main()
