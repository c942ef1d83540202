"""Microbenchmarks of ``depthwise_conv2d_layernorm`` (the block front ``LN(dwconv(x))``, channels-last out): every
selected case x dtype x pass x provider (see conftest.py). The eager and compile baselines run the stock
composition ``F.layer_norm(dwconv(x).permute(0, 2, 3, 1))``."""

OP = "depthwise_conv2d_layernorm"


def test_depthwise_conv2d_layernorm(bench_run, bench_case, provider, dtype_name, bench_pass):
    record = bench_run(bench_case, provider, dtype_name, bench_pass)
    assert record["median_ms"] > 0
