"""pytest options and fixtures of the microbenchmark suite (``python -m pytest benchmarks``).

Each ``test_bench_<op>.py`` sets ``OP`` and is parametrized here over the selected cases x dtypes x passes x
providers x launches (``--bench-launches eager,graph``: as issued, or replayed from a CUDA graph). The timing
itself is :func:`benchmarks.timing.measure` (CUDA events, L2 flushed); pytest-benchmark runs each measured call a
few more times with host synchronisation (its table is a cross-check of launch overhead, not the result) and
stores the record in its ``extra_info``. Records go to ``--bench-out``.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Triton must not try to compile for a GPU that is absent (import order: before torch._dynamo imports it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from benchmarks import roofline  # noqa: E402
from benchmarks.cases import GROUPS, Case, cases, comma_list  # noqa: E402
from benchmarks.check_targets import is_target_row  # noqa: E402
from benchmarks.microbench import BenchEnv, graph_unavailable, run_record  # noqa: E402
from benchmarks.providers import BASELINES, DEFAULT_PROVIDERS, PROVIDERS, unavailable  # noqa: E402
from benchmarks.results import LAUNCHES, ResultsFile, environment  # noqa: E402
from benchmarks.timing import GraphCaptureError  # noqa: E402

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Bound of a record's forward_error (relative to max(1, max |reference|)): one rounding of the output to the
# storage dtype plus float32 accumulation over up to 31 x 31 taps. A sanity gate for the timings only; the
# kernels' correctness tests (tests/) are far stricter.
FORWARD_ERROR_BOUND = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
_SMOKE_PROVIDERS = ("deco-torch", "deco-triton", "deco-cuda", "eager-nchw", "eager-cl", "compile")


def _csv(value: str | None) -> tuple[str, ...] | None:
    return None if value in (None, "") else tuple(comma_list(value))


def pytest_addoption(parser):
    group = parser.getgroup("deco benchmarks")
    group.addoption("--bench-out", default=None, help="results JSON to write (default: none)")
    group.addoption(
        "--bench-resume",
        action="store_true",
        help="keep the records already in --bench-out (same device, torch and triton) and skip their rows",
    )
    group.addoption("--bench-smoke", action="store_true", help="tiny shapes for CI (timings are meaningless)")
    group.addoption("--bench-groups", default=None, help=f"comma list of shape groups, from {GROUPS}")
    group.addoption("--bench-providers", default=None, help=f"comma list, from {PROVIDERS}")
    group.addoption("--bench-dtypes", default="float32,bfloat16", help=f"comma list, from {tuple(_DTYPES)}")
    group.addoption("--bench-passes", default="fwd,bwd,fwd+bwd", help=f"comma list, from {roofline.PASSES}")
    group.addoption(
        "--bench-launches",
        default="eager",
        help=f"comma list, from {LAUNCHES}: calls as issued, and/or replays of one call captured in a CUDA graph",
    )
    group.addoption("--bench-kernels", default=None, help="comma list of kernel sizes to keep (e.g. 9)")
    group.addoption("--bench-batches", default=None, help="comma list of batch sizes to keep (e.g. 2,8)")
    group.addoption("--bench-rep-ms", type=float, default=25.0, help="measured milliseconds per combination")
    group.addoption("--bench-no-flush", action="store_true", help="keep L2 warm between runs")
    group.addoption(
        "--bench-compile-backend", default="inductor", help="torch.compile backend of the compile providers"
    )
    group.addoption("--bench-peak-tflops", type=float, default=None, help="FP32 peak, when not derivable")


def pytest_configure(config):
    if not (torch.cuda.is_available() or config.getoption("--bench-smoke") or config.getoption("--bench-groups")):
        raise pytest.UsageError(
            "the default benchmark matrix (full-size shapes) needs a CUDA device; on the CPU pass --bench-smoke "
            "(tiny shapes) or choose --bench-groups explicitly"
        )
    if config.getoption("--bench-resume") and not config.getoption("--bench-out"):
        raise pytest.UsageError("--bench-resume needs --bench-out (the results file to continue)")
    if config.getoption("--bench-smoke"):
        # Tiny shapes: one thread avoids the OpenMP hand-off that dominates (and, on a busy CPU, stalls) them.
        torch.set_num_threads(1)


def _selection(config) -> dict:
    smoke = config.getoption("--bench-smoke")
    groups = _csv(config.getoption("--bench-groups")) or (
        ("smoke",) if smoke else tuple(g for g in GROUPS if g != "smoke")
    )
    providers = _csv(config.getoption("--bench-providers")) or (_SMOKE_PROVIDERS if smoke else DEFAULT_PROVIDERS)
    dtypes = _csv(config.getoption("--bench-dtypes"))
    passes = _csv(config.getoption("--bench-passes"))
    launches = _csv(config.getoption("--bench-launches"))
    for name, values, allowed in (
        ("--bench-providers", providers, PROVIDERS),
        ("--bench-dtypes", dtypes, tuple(_DTYPES)),
        ("--bench-passes", passes, roofline.PASSES),
        ("--bench-launches", launches, LAUNCHES),
    ):
        bad = set(values) - set(allowed)
        if bad:
            raise pytest.UsageError(f"{name}: unknown {sorted(bad)}; expected among {allowed}")
    kernels = _csv(config.getoption("--bench-kernels"))
    batches = _csv(config.getoption("--bench-batches"))
    return {
        "groups": groups,
        "providers": providers,
        "dtypes": dtypes,
        "passes": passes,
        "launches": launches,
        "kernels": tuple(map(int, kernels)) if kernels else None,
        "batches": tuple(map(int, batches)) if batches else None,
    }


def pytest_generate_tests(metafunc):
    op = getattr(metafunc.module, "OP", None)
    if op is None or "bench_case" not in metafunc.fixturenames:
        return
    selection = _selection(metafunc.config)
    try:
        selected = cases(op, selection["groups"], selection["kernels"], selection["batches"])
    except ValueError as error:
        raise pytest.UsageError(str(error)) from error
    metafunc.parametrize("bench_case", selected, ids=[c.id for c in selected])
    metafunc.parametrize("dtype_name", selection["dtypes"])
    metafunc.parametrize("bench_pass", selection["passes"])
    metafunc.parametrize("provider", selection["providers"])
    metafunc.parametrize("bench_launch", selection["launches"])


# The order rows are measured in, so that a run cut off by its time limit has measured what matters most: the
# rows the speed targets are judged on, then the rest of fwd+bwd at the target sizes (DECO decoder, stride 8),
# then their fwd and bwd, then the other groups; ops in this order within each tier. Within a tier the rows
# keep pytest's order (case, dtype, pass, provider), so the providers of one case and dtype stay together and
# share its float64 reference.
_OP_ORDER = (
    "depthwise_conv2d",
    "upsample_add_conv",
    "adaptive_max_pool2d",
    "depthwise_conv2d_layernorm",
    "scale_residual_max_pool",
    "adaptive_avg_pool2d",
)
_TARGET_GROUPS = ("deco", "stride8")


def measurement_priority(op: str, group: str, shape: dict, pass_: str) -> tuple[int, int]:
    """Sort key of a row: (tier, op rank), smaller first."""
    if is_target_row(op, group, shape, pass_):
        tier = 0
    elif group in _TARGET_GROUPS:
        tier = 1 if pass_ == "fwd+bwd" else 2
    else:
        tier = 3
    return tier, _OP_ORDER.index(op)


def pytest_collection_modifyitems(config, items):
    def key(item):
        params = getattr(getattr(item, "callspec", None), "params", {})
        case = params.get("bench_case")
        if not isinstance(case, Case):  # not a benchmark, or an op with no case selected (pytest's empty marker)
            return (-1, 0)
        return measurement_priority(case.op, case.group, case.dims, params["bench_pass"])

    items.sort(key=key)  # stable


@pytest.fixture(scope="session")
def bench_env(pytestconfig) -> BenchEnv:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for limit in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
        # One static-shape compile per case and dtype: far more graphs than dynamo's default limit.
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 1024)
    copy = roofline.measure_copy_bandwidth(device, megabytes=1024 if device.type == "cuda" else 16)
    peak_tflops = pytestconfig.getoption("--bench-peak-tflops")
    peak = peak_tflops * 1e12 if peak_tflops else roofline.peak_fp32_flops(device)
    return BenchEnv(
        device=device,
        copy_bytes_per_s=copy,
        peak_fp32_flops=peak,
        rep_ms=pytestconfig.getoption("--bench-rep-ms"),
        flush_l2=not pytestconfig.getoption("--bench-no-flush"),
        compile_backend=pytestconfig.getoption("--bench-compile-backend"),
    )


@pytest.fixture(scope="session")
def bench_results(pytestconfig, bench_env) -> ResultsFile | None:
    path = pytestconfig.getoption("--bench-out")
    if path is None:
        return None
    header = {
        **environment(bench_env.device),
        "copy_gb_per_s": bench_env.copy_bytes_per_s / 1e9,
        "peak_fp32_tflops": None if bench_env.peak_fp32_flops is None else bench_env.peak_fp32_flops / 1e12,
    }
    try:
        return ResultsFile(path, header, BASELINES, resume=pytestconfig.getoption("--bench-resume"))
    except ValueError as error:
        raise pytest.UsageError(str(error)) from error


@pytest.fixture
def bench_run(bench_env, bench_results, benchmark, bench_launch):
    """Measure one parametrized combination, record it, and hand the call to pytest-benchmark."""

    def run(case, provider: str, dtype_name: str, pass_: str) -> dict:
        reason = unavailable(provider, bench_env.device)
        if not reason and bench_launch == "graph":
            reason = graph_unavailable(pass_, bench_env.device)
        if reason:
            pytest.skip(reason)
        row = {"op": case.op, "shape": case.dims, "dtype": dtype_name, "pass": pass_, "provider": provider,
               "launch": bench_launch}
        if bench_results is not None and bench_results.measured(row):
            pytest.skip(f"measured already in {bench_results.path} (--bench-resume)")
        dtype = _DTYPES[dtype_name]
        try:
            record, call = run_record(case, provider, dtype, pass_, bench_env, bench_launch)
        except GraphCaptureError as error:
            pytest.skip(f"{provider}: {error}")
        if bench_results is not None:
            bench_results.add(record)
        # Only deco's kernels are held to it: a stock baseline may legitimately use TF32 (cuDNN's default).
        assert not provider.startswith("deco-") or record["forward_error"] <= FORWARD_ERROR_BOUND[dtype], (
            f"{provider} computes a wrong forward for {case.id} {dtype_name}: error {record['forward_error']:.3g}"
        )
        benchmark.extra_info.update(record)
        benchmark.pedantic(_synchronized(call), rounds=3, iterations=1)
        return record

    return run


def _synchronized(call):
    def synchronized():
        call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    return synchronized
