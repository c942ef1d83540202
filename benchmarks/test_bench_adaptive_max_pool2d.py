"""Microbenchmarks of ``adaptive_max_pool2d``: every selected case x dtype x pass x provider (see conftest.py)."""

OP = "adaptive_max_pool2d"


def test_adaptive_max_pool2d(bench_run, bench_case, provider, dtype_name, bench_pass):
    record = bench_run(bench_case, provider, dtype_name, bench_pass)
    assert record["median_ms"] > 0
