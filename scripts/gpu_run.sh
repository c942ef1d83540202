#!/usr/bin/env bash
# The whole GPU session of deco-kernels: environment report, build, CUDA tests of both backends,
# microbenchmarks, end-to-end benchmarks. Run from the repository root with $OUT set (the device tool sets it):
#
#   bash scripts/gpu_run.sh build test     # one device call (< 10 minutes)
#   bash scripts/gpu_run.sh bench          # one device call
#   bash scripts/gpu_run.sh e2e            # one device call
#   bash scripts/gpu_run.sh autotune       # optional: torch.compile max-autotune baselines on the target shapes
#   bash scripts/gpu_run.sh demo           # the README's main job (deco demo) on the GPU, fused kernels, 4 minutes;
#                                          # needs pycocotools: run scripts/device_wheels.sh here, carry .whl
#   bash scripts/gpu_run.sh all            # everything in order (only where no 10-minute limit applies)
#
# Every call prints the environment first and builds the CUDA extension if this machine has no build of it
# (a fresh machine is bare). Each step runs under `timeout`, bounded by what is left of GPU_RUN_BUDGET_S
# (default 570 s) since the script started, so one call stays inside the device tool's 10 minutes; the
# benchmarks write their JSON after every measurement, so a step cut off keeps what it measured.
# Results and logs go to $OUT (at most 8 files come back per call): env.txt, build.log, test.log,
# bench.log, micro-core-<tag>.json, micro-extra-<tag>.json, e2e.log, e2e-<tag>.json (autotune:
# autotune.log, micro-autotune-<tag>.json; demo: demo.log, demo-<tag>.json). <tag> = GPU model and date, e.g. h100-2026-11-23.
# Extra arguments for the suites: BENCH_ARGS (pytest options of benchmarks/conftest.py), E2E_ARGS
# (options of python -m benchmarks.e2e).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/deco-gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
BUDGET_S=${GPU_RUN_BUDGET_S:-570}
START_S=$(date +%s)
STATUS=0

gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
TAG="$(echo "${gpu_name:-nogpu}" | sed -e 's/^NVIDIA //' | awk '{print tolower($1)}' | tr -cd 'a-z0-9-')-$(date -u +%F)"

# Seconds left for a step: the smaller of its own cap and what remains of the budget (minus 15 s of margin).
left() {
    local cap=$1 remaining
    remaining=$((BUDGET_S - ($(date +%s) - START_S) - 15))
    ((remaining < cap)) && cap=$remaining
    ((cap < 1)) && cap=1
    echo "$cap"
}

note() { echo "=== [$(($(date +%s) - START_S)) s] $*"; }

# Wheels carried in .whl/ (scripts/device_wheels.sh): this machine has no network.
if compgen -G ".whl/*.whl" >/dev/null; then
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/deco-site .whl/*.whl \
        && export PYTHONPATH=/tmp/deco-site${PYTHONPATH:+:$PYTHONPATH}
fi

step_env() {
    {
        nvidia-smi || echo "nvidia-smi failed"
        python -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
        python -c 'import triton; print("triton", triton.__version__)' || echo "triton missing"
        python -c 'import torch; p = torch.cuda.get_device_properties(0); print(p.name, "SMs", p.multi_processor_count, "L2 MB", getattr(p, "L2_cache_size", 0) / 2**20, "clock kHz", getattr(p, "clock_rate", "?"))' || true
        nvcc --version 2>/dev/null | tail -2 || echo "nvcc not on PATH"
        python -c 'import pycocotools' 2>/dev/null && echo "pycocotools present" || echo "pycocotools absent"
    } 2>&1 | tee "$OUT/env.txt"
}

extension_imports() {
    python -c 'import deco_kernels._C' 2>/dev/null
}

step_build() {
    note "build (log: build.log)"
    local t
    t=$(left 480)
    # The default arch list (sm_80 + sm_90a), the one tests/test_cuda_build.py checks the fatbin for: one GPU's
    # arch alone would save only one of kernels.cu's two device passes (about half a minute).
    MAX_JOBS=${MAX_JOBS:-16} timeout "$t" python -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
    local rc=$?
    tail -5 "$OUT/build.log"
    if ((rc != 0)); then
        echo "build failed (rc $rc); see build.log" && STATUS=1
    fi
    # The import check every later step relies on: nothing here may import pycocotools (absent on this machine).
    python - <<'EOF' 2>&1 | tee -a "$OUT/build.log"
import sys
import deco_kernels, deco.models, deco.losses, deco.matcher, deco.models.detr
import benchmarks.e2e, benchmarks.report, benchmarks.check_targets, benchmarks.providers
from deco_kernels import _cuda
from deco_kernels.backend import available_backends
print("deco_kernels._C:", "built" if _cuda.is_available() else f"NOT AVAILABLE: {_cuda.load_error()}")
print("backends on cuda:", available_backends("cuda"))
print("pycocotools imported by the model/benchmark modules:", "pycocotools" in sys.modules)
EOF
}

ensure_build() {
    if extension_imports; then
        note "deco_kernels._C already built"
    else
        step_build
    fi
}

step_test() {
    ensure_build
    note "tests of both backends on the GPU (log: test.log)"
    # Modules that need pycocotools fail to collect here; the selected kernel tests must still run. Triton's
    # compiles are CPU work: with pytest-xdist the test files run in parallel (whole files per worker, so each
    # module-scoped fixture, e.g. the AOT compile report, runs once).
    local parallel=()
    python -c 'import xdist' 2>/dev/null && parallel=(-n 8 --dist loadfile)
    timeout "$(left 420)" python -m pytest tests -q -p no:cacheprovider --continue-on-collection-errors "${parallel[@]}" \
        -k "cuda or triton or depthwise or upsample or pool or registration or fused or nn_modules" --durations=15 2>&1 | tee "$OUT/test.log"
    local rc=${PIPESTATUS[0]}
    ((rc != 0)) && echo "tests: rc $rc" && STATUS=1
}

# Priority order: the op files as listed, and the target shapes (DECO decoder, stride 8) before the rest.
BENCH_FILES=(
    benchmarks/test_bench_depthwise_conv2d.py
    benchmarks/test_bench_upsample_add_conv.py
    benchmarks/test_bench_adaptive_max_pool2d.py
    benchmarks/test_bench_depthwise_conv2d_layernorm.py
    benchmarks/test_bench_scale_residual_max_pool.py
    benchmarks/test_bench_adaptive_avg_pool2d.py
)

run_bench() {  # run_bench NAME CAP_S extra pytest args...
    local name=$1 cap=$2
    shift 2
    note "microbenchmarks $name -> micro-$name-$TAG.json"
    # shellcheck disable=SC2086
    timeout "$(left "$cap")" python -m pytest "${BENCH_FILES[@]}" -q -p no:cacheprovider \
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name --bench-out "$OUT/micro-$name-$TAG.json" \
        "$@" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/$LOG"
    local rc=${PIPESTATUS[0]}
    ((rc == 124)) && echo "microbenchmarks $name: cut off by the time budget (results so far are kept)"
    ((rc != 0 && rc != 124)) && STATUS=1
}

step_bench() {
    ensure_build
    LOG=bench.log
    run_bench core 420 --bench-groups deco,stride8
    run_bench extra 300 --bench-groups deco-enc,stride16
    report_targets
}

step_autotune() {
    ensure_build
    LOG=autotune.log
    run_bench autotune 540 --bench-groups deco,stride8 --bench-kernels 9 --bench-batches 8 \
        --bench-providers compile-max-autotune --bench-dtypes bfloat16,float32
}

step_e2e() {
    ensure_build
    note "end-to-end benchmarks -> e2e-$TAG.json (log: e2e.log)"
    # shellcheck disable=SC2086
    timeout "$(left 540)" python -m benchmarks.e2e --out "$OUT/e2e-$TAG.json" ${E2E_ARGS:-} 2>&1 | tee "$OUT/e2e.log"
    local rc=${PIPESTATUS[0]}
    ((rc == 124)) && echo "e2e: cut off by the time budget (results so far are kept)"
    ((rc != 0 && rc != 124)) && STATUS=1
    report_targets
}

step_demo() {
    ensure_build
    note "deco demo on the GPU -> demo-$TAG.json (log: demo.log)"
    local work=/tmp/deco-demo
    timeout "$(left 330)" python -m deco.cli demo --minutes "${DEMO_MINUTES:-4}" --device cuda --out "$work" 2>&1 | tee "$OUT/demo.log"
    local rc=${PIPESTATUS[0]}
    ((rc != 0)) && echo "demo: rc $rc" && STATUS=1
    [[ -s $work/demo_result.json ]] && cp "$work/demo_result.json" "$OUT/demo-$TAG.json"
}

report_targets() {
    local files=()
    for f in "$OUT"/micro-*.json "$OUT"/e2e-*.json; do [[ -s $f ]] && files+=("$f"); done
    ((${#files[@]})) && python -m benchmarks.check_targets "${files[@]}"
}

steps=("$@")
((${#steps[@]})) || steps=(all)
step_env
for step in "${steps[@]}"; do
    case $step in
        build) step_build ;;
        test) step_test ;;
        bench) step_bench ;;
        autotune) step_autotune ;;
        e2e) step_e2e ;;
        demo) step_demo ;;
        all) step_build; step_test; step_bench; step_e2e; step_autotune ;;
        *) echo "unknown step '$step'; expected build, test, bench, e2e, autotune, demo or all" >&2; exit 2 ;;
    esac
done
note "done (status $STATUS); files in $OUT:"
ls -la "$OUT"
exit $STATUS
