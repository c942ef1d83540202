"""Microbenchmarks of ``upsample_add_conv``: every selected case x dtype x pass x provider (see conftest.py)."""

OP = "upsample_add_conv"


def test_upsample_add_conv(bench_run, bench_case, provider, dtype_name, bench_pass):
    record = bench_run(bench_case, provider, dtype_name, bench_pass)
    assert record["median_ms"] > 0
