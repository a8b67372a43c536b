"""onnxserve's benchmark suite: ``make bench`` (or ``python -m bench.run``).

Every workload runs on loopback against a real ``onnxserve serve`` subprocess (and TorchServe), next
to a baseline measured in the same run; see ``bench/run.py`` for the order and ``bench/settings.py``
for the ``BENCH_*`` environment variables.
"""
