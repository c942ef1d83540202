"""Microbenchmarks of ``depthwise_conv2d``: every selected case x dtype x pass x provider (see conftest.py)."""

OP = "depthwise_conv2d"


def test_depthwise_conv2d(bench_run, bench_case, provider, dtype_name, bench_pass):
    record = bench_run(bench_case, provider, dtype_name, bench_pass)
    assert record["median_ms"] > 0
