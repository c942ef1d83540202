"""Microbenchmarks of ``scale_residual_max_pool``: every selected case x dtype x pass x provider (see conftest.py)."""

OP = "scale_residual_max_pool"


def test_scale_residual_max_pool(bench_run, bench_case, provider, dtype_name, bench_pass):
    record = bench_run(bench_case, provider, dtype_name, bench_pass)
    assert record["median_ms"] > 0
