"""CPU seconds per shard of ``attribute_dataset`` on a local Dask cluster, by process and thread.

    PYTHONPATH=src python -m benchmarks.distributed_cpu [--records 96] [--shard-size 4]
        [--workers 2] [--profile FILE]

Wall-clock throughput on a shared machine is noisy; the CPU seconds each process spends per
shard are not. The cluster is started in this process as ``attribute_dataset(workers=N)`` starts
it (scheduler and nannies on this process's event-loop thread, one process per worker), warmed,
and then one run is measured: CPU of this process's threads (the main thread runs attrax's
client loop: receiving shards, writing files and the manifest; the others run the scheduler,
the nannies and the client's communication), and of each worker process. ``--profile`` writes a
cProfile of the main thread.
"""

from __future__ import annotations

import cProfile
import os
import shutil
import threading
import time
from pathlib import Path

import psutil

import attrax as ax
from benchmarks.distributed import _warm, parser, setup


def _threads() -> dict[int, float]:
    """CPU seconds (user + system) of each thread of this process, by native thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _names() -> dict[int, str]:
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    return names


def main() -> None:
    import dask
    import distributed

    from attrax._distributed import QUIET, TRIM

    arguments = parser()
    arguments.add_argument("--workers", type=int, default=2)
    arguments.add_argument("--profile", default=None)
    arguments.add_argument("--idle", type=float, default=5.0)
    args = arguments.parse_args()
    tmp, data, warm, options = setup(args)
    shards = -(-args.records // args.shard_size)
    me = psutil.Process()
    with (
        dask.config.set({TRIM: None} if args.dask_defaults else QUIET),
        distributed.LocalCluster(
            n_workers=args.workers, threads_per_worker=1, dashboard_address=None, silence_logs=50
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.run(_warm, str(warm), args.steps)
        # a first small run warms the client side too (imports, netCDF library)
        ax.attribute_dataset(
            None, warm, tmp / "warm-out", **options, scheduler=cluster.scheduler_address
        )
        workers = {p.pid: p for p in me.children(recursive=True)}
        pids = client.run(os.getpid)
        # what the cluster costs doing nothing (heartbeats, periodic callbacks), per second
        idle_t, idle_p = _threads(), sum(me.cpu_times()[:2])
        idle_w = {pid: sum(p.cpu_times()[:2]) for pid, p in workers.items()}
        time.sleep(args.idle)
        idle = {
            "client process": sum(me.cpu_times()[:2]) - idle_p,
            **{str(pid): sum(p.cpu_times()[:2]) - idle_w[pid] for pid, p in workers.items()},
        }
        for tid, cpu in _threads().items():
            idle[f"thread {tid}"] = cpu - idle_t.get(tid, 0.0)
        before_w = {pid: sum(p.cpu_times()[:2]) for pid, p in workers.items()}
        before_t, before_p = _threads(), sum(me.cpu_times()[:2])
        main_id = threading.main_thread().native_id
        profile = cProfile.Profile() if args.profile else None
        start = time.perf_counter()
        if profile:
            profile.enable()
        ax.attribute_dataset(
            None, data, tmp / "out", **options, scheduler=cluster.scheduler_address
        )
        if profile:
            profile.disable()
        wall = time.perf_counter() - start
        after_t, after_p = _threads(), sum(me.cpu_times()[:2])
        after_w = {pid: sum(p.cpu_times()[:2]) for pid, p in workers.items()}
        names = _names()
    if profile:
        profile.dump_stats(args.profile)
    print(f"{args.records} records, {shards} shards of {args.shard_size}, IG steps={args.steps}")
    print(f"wall {wall:.2f} s, load average {os.getloadavg()[0]:.2f}")
    print(f"{'process/thread':<40} {'CPU s':>8} {'CPU ms/shard':>13} {'idle CPU ms/s':>14}")

    def idle_rate(key: str) -> str:
        return f"{1e3 * idle.get(key, 0.0) / args.idle:14.1f}"

    used = after_p - before_p
    print(
        f"{'client process (all threads)':<40} {used:8.3f} {1e3 * used / shards:13.1f} "
        + idle_rate("client process")
    )
    for tid, cpu in sorted(after_t.items()):
        used = cpu - before_t.get(tid, 0.0)
        if used < 0.005:
            continue
        name = "main (attrax client loop)" if tid == main_id else names.get(tid, f"thread {tid}")
        print(f"  {name:<38} {used:8.3f} {1e3 * used / shards:13.1f} {idle_rate(f'thread {tid}')}")
    worker_pids = set(pids.values())
    for pid in sorted(after_w):
        used = after_w[pid] - before_w[pid]
        kind = "worker" if pid in worker_pids else workers[pid].name()
        print(
            f"{kind + ' ' + str(pid):<40} {used:8.3f} {1e3 * used / shards:13.1f} {idle_rate(str(pid))}"
        )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
