"""attrax vs Captum and Inseq: workloads, adapters, parity, one harness, a report.

Modules, each importing only those listed before it: ``workloads`` (offline models and texts),
``parity`` (numpy), ``baselines`` (Captum, Inseq), ``adapters`` (one runner for every library),
``gpu`` (device smoke test), ``report`` (results JSON -> docs, pure), ``harness`` (measurements),
``real_size``; ``python -m benchmarks`` is the command line.
"""
