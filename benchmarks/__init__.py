"""The asv benchmark suite of wngkernels (see ``docs/benchmarks.md``).

``bench_kernels``, ``bench_estimator`` and ``bench_torch`` hold the asv classes; ``_backends``
builds arrays per backend, ``_problems`` builds the timed cases (shared with ``run_table``, the
plain script used where asv is not installed).
"""
