#!/usr/bin/env bash
# The whole GPU session of deco-kernels: environment report, build, CUDA tests of both backends,
# microbenchmarks, end-to-end benchmarks. Run from the repository root with $OUT set (the device tool sets it):
#
#   bash scripts/gpu_run.sh test           # one device call (< 10 minutes); builds first unless a module is carried
#   bash scripts/gpu_run.sh bench          # one device call; repeat it to continue (below)
#   bash scripts/gpu_run.sh graph          # the target rows (fwd+bwd) again as CUDA graph replays: the kernels'
#                                          # device time without the host's launch work; one device call
#   bash scripts/gpu_run.sh e2e            # one device call; repeat it to continue
#   bash scripts/gpu_run.sh autotune       # optional: torch.compile max-autotune baselines on the target shapes
#   bash scripts/gpu_run.sh profile        # where the time goes: benchmarks.breakdown (ops, DECO-R18 steps with
#                                          # Chrome traces, ops per step) and ncu of the NCHW depthwise conv's
#                                          # kernels and of the max and avg pools; about 8 minutes
#   bash scripts/gpu_run.sh sanitize       # compute-sanitizer's memcheck and racecheck over the CUDA kernels' GPU
#                                          # tests (out-of-bounds accesses, shared-memory races); one device call
#   bash scripts/gpu_run.sh demo           # the README's main job (deco demo) on the GPU, fused kernels, 4 minutes;
#                                          # needs pycocotools: run scripts/device_wheels.sh here, carry .whl
#   bash scripts/gpu_run.sh all            # everything in order (only where no 10-minute limit applies)
#
# Every call prints the environment first and builds the CUDA extension if this machine has no build of it from
# these sources (a fresh machine is bare). Carry the module, deco_kernels/_C.cpython-312-*.so, to skip the build:
# scripts/device_module.sh builds it on the CPU machine for the GPU machine's Python and torch, and the build
# step returns the one it built. A module built from other csrc/ sources is refused and rebuilt. Each step runs
# under `timeout`, bounded by what is left of GPU_RUN_BUDGET_S (default 570 s) since the script started, so one
# call stays inside the device tool's 10 minutes.
# The benchmarks write their JSON after every measurement and measure the rows the speed targets need first, so
# a step cut off keeps what matters. Results accumulate across calls: copy the JSON files a call brought back
# into .gpu-run/ (git-ignored) and name `.gpu-run` in the next call's carry; the next bench / e2e / autotune
# step then continues those files (same GPU, torch, triton and measured sources) and measures only the rows they
# lack. A file not carried is continued from the committed results of this GPU instead
# (benchmarks/results/<gpu>-<date>.json, where measured with these sources; GPU_RUN_COMMITTED names another
# directory), so a later session goes on where an earlier one's commit stopped. Each call also leaves its results in
# .gpu-run/ on the machine: the next call on the same (still warm) machine continues them even where they were not
# carried. The host overhead is measured once per version of the sources: a carried or committed host-<gpu>.json
# measured with them is kept.
# Results and logs go to $OUT (at most 8 files come back per call): env.txt, build.log, test.log, bench.log,
# host-<gpu>.json (host overhead per call), micro-<gpu>.json (bench, graph and autotune), graph.log, e2e.log,
# e2e-<gpu>.json, autotune.log, profile.txt, traces.tar.gz, ncu.txt, sanitize.log, demo.log,
# demo-<gpu>.json; <gpu> is the GPU model, e.g. h100 (each file records its date).
# Extra arguments for the suites: BENCH_ARGS (pytest options of benchmarks/conftest.py), E2E_ARGS (options of
# python -m benchmarks.e2e), HOST_ARGS (of python -m benchmarks.host_overhead), PROFILE_OPS_ARGS,
# PROFILE_E2E_ARGS and PROFILE_COUNTS_ARGS (of python -m benchmarks.breakdown ops / e2e / counts);
# GPU_RUN_CARRIED names another directory of carried results.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/deco-gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
BUDGET_S=${GPU_RUN_BUDGET_S:-570}
START_S=$(date +%s)
STATUS=0

gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
GPU="$(echo "${gpu_name:-nogpu}" | sed -e 's/^NVIDIA //' | awk '{print tolower($1)}' | tr -cd 'a-z0-9-')"
MICRO_JSON=$OUT/micro-$GPU.json
E2E_JSON=$OUT/e2e-$GPU.json
CARRIED=${GPU_RUN_CARRIED:-.gpu-run}
# A file measured with other sources (another version of the kernels or the model) is not continued: its rows
# would be skipped, not re-measured. The step starts a new file instead. The digest is computed once: each
# Python that imports torch costs seconds of device time before the first measurement.
CODE_DIGEST=$(python -c 'from benchmarks.results import code_digest; print(code_digest())') || exit 1
measured_here() {
    python -c 'import json, sys; sys.exit(json.load(open(sys.argv[1])).get("code") != sys.argv[2])' "$1" "$CODE_DIGEST"
}
HOST_JSON=$OUT/host-$GPU.json
for f in "$CARRIED/micro-$GPU.json" "$CARRIED/e2e-$GPU.json" "$CARRIED/host-$GPU.json"; do
    [[ -s $f && ! -e $OUT/${f##*/} ]] || continue
    if measured_here "$f"; then
        cp "$f" "$OUT/" && echo "continuing $f"
    else
        echo "not continuing $f: measured with other sources (its code digest differs from this checkout's)"
    fi
done
# The whole matrix takes more device time than one session has, and a new session's checkout has no carried
# files: continue the committed results of this GPU (a merge of an earlier session's micro and e2e files) where
# they were measured with these sources, for each file not carried.
COMMITTED=${GPU_RUN_COMMITTED:-benchmarks/results}
if [[ ! -e $MICRO_JSON || ! -e $E2E_JSON ]]; then
    for f in $(compgen -G "$COMMITTED/$GPU-*.json" | grep -v -- '-host\.json$' | sort -r); do
        measured_here "$f" || continue
        parts=()
        [[ -e $MICRO_JSON ]] || parts+=(--micro "$MICRO_JSON")
        [[ -e $E2E_JSON ]] || parts+=(--e2e "$E2E_JSON")
        python -m benchmarks.report split "$f" "${parts[@]}" | sed -e 's/^wrote/continuing: wrote/'
        break
    done
fi
if [[ ! -e $HOST_JSON ]]; then
    for f in $(compgen -G "$COMMITTED/$GPU-*-host.json" | sort -r); do
        measured_here "$f" || continue
        cp "$f" "$HOST_JSON" && echo "continuing: host overhead of $f"
        break
    done
fi

# Seconds left for a step: the smaller of its own cap and what remains of the budget (minus 15 s of margin).
left() {
    local cap=$1 remaining
    remaining=$((BUDGET_S - ($(date +%s) - START_S) - 15))
    ((remaining < cap)) && cap=$remaining
    ((cap < 1)) && cap=1
    echo "$cap"
}

note() { echo "=== [$(($(date +%s) - START_S)) s] $*"; }

# cuda_tool NAME: the path of a CUDA tool (ncu, compute-sanitizer) on the PATH or in the toolkit's bin/; nothing
# (and status 1) where it is in neither.
cuda_tool() {
    local in_toolkit=${CUDA_HOME:-/usr/local/cuda}/bin/$1
    command -v "$1" || { [[ -x $in_toolkit ]] && echo "$in_toolkit"; }
}

# Wheels carried in .whl/ (scripts/device_wheels.sh): this machine has no network.
if compgen -G ".whl/*.whl" >/dev/null; then
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/deco-site .whl/*.whl \
        && export PYTHONPATH=/tmp/deco-site${PYTHONPATH:+:$PYTHONPATH}
fi

step_env() {
    note "environment (env.txt)"
    {
        nvidia-smi || echo "nvidia-smi failed"
        python - <<'EOF'
import importlib.util
import sys

import torch

print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton missing")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, "SMs", p.multi_processor_count, "L2 MB", getattr(p, "L2_cache_size", 0) / 2**20,
          "clock kHz", getattr(p, "clock_rate", "?"))
print("pycocotools", "present" if importlib.util.find_spec("pycocotools") else "absent")
EOF
        nvcc --version 2>/dev/null | tail -2 || echo "nvcc not on PATH"
    } 2>&1 | tee "$OUT/env.txt"
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
    else
        # The built module comes back with the call's files: put it into deco_kernels/ on the CPU machine and
        # name it in later calls' carry, and a fresh machine skips the build (minutes of device time).
        local module
        module=$(python -c 'import deco_kernels._C as m; print(m.__file__)' 2>/dev/null) && cp "$module" "$OUT/"
    fi
    check_imports
}

# The import check every later step relies on: nothing here may import pycocotools (absent on this machine).
# Its status says whether deco_kernels._C imports and was built from this checkout's csrc/ (deco_kernels._cuda
# compares the source digest).
check_imports() {
    python - <<'EOF' 2>&1 | tee -a "$OUT/env.txt"
import sys
import deco_kernels, deco.models, deco.losses, deco.matcher, deco.models.detr
import benchmarks.e2e, benchmarks.report, benchmarks.check_targets, benchmarks.providers
from deco_kernels import _cuda
from deco_kernels.backend import available_backends
print("deco_kernels._C:", "built" if _cuda.is_available() else f"NOT AVAILABLE: {_cuda.load_error()}")
print("backends on cuda:", available_backends("cuda"))
print("pycocotools imported by the model/benchmark modules:", "pycocotools" in sys.modules)
sys.exit(0 if _cuda.is_available() else 3)
EOF
    return "${PIPESTATUS[0]}"
}

ensure_build() {
    check_imports
    case $? in
        0) note "deco_kernels._C already built from these sources" ;;
        3) step_build ;;
        *) echo "the import check failed (env.txt)" && STATUS=1 ;;
    esac
}

step_test() {
    ensure_build
    note "tests of both backends on the GPU (log: test.log)"
    # Modules that need pycocotools fail to collect here; the selected kernel tests must still run. Triton's
    # compiles are CPU work: with pytest-xdist the test files run in parallel (whole files per worker).
    # "fused_", not "fused": that also matches "refused" (test_resume's seed test, which needs pycocotools).
    # Not here, as the CPU CI runs them and they use no GPU: the tests on CPU tensors ("cpu" in their ids; the
    # CPU build's conv + LayerNorm cases alone took minutes of device time) and the ahead-of-time Triton compiles
    # (test_triton_aot.py, 160 s of setup).
    local parallel=()
    python -c 'import xdist' 2>/dev/null && parallel=(-n 8 --dist loadfile)
    timeout "$(left 420)" python -m pytest tests -q -p no:cacheprovider --continue-on-collection-errors "${parallel[@]}" \
        -k "(cuda or triton or depthwise or upsample or pool or registration or fused_ or nn_modules) and not cpu and not aot" \
        --durations=15 2>&1 | tee "$OUT/test.log"
    local rc=${PIPESTATUS[0]}
    ((rc != 0)) && echo "tests: rc $rc" && STATUS=1
}

run_bench() {  # run_bench CAP_S extra pytest args...
    local cap=$1
    shift
    note "microbenchmarks -> ${MICRO_JSON##*/} (log: $LOG)"
    # benchmarks/conftest.py orders the rows: those the speed targets are judged on first.
    # shellcheck disable=SC2086
    timeout "$(left "$cap")" python -m pytest benchmarks -q -p no:cacheprovider \
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name --bench-out "$MICRO_JSON" --bench-resume \
        "$@" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/$LOG"
    local rc=${PIPESTATUS[0]}
    ((rc == 124)) && echo "microbenchmarks: cut off by the time budget (results so far are kept; run the step again)"
    ((rc != 0 && rc != 124)) && STATUS=1
}

step_bench() {
    ensure_build
    LOG=bench.log
    if [[ -e $HOST_JSON ]]; then
        # About a minute of device time per call, and it depends on the sources alone: measured once for them.
        note "host overhead per call: host-$GPU.json was measured with these sources already"
    else
        note "host overhead per call -> host-$GPU.json (log: bench.log)"
        # shellcheck disable=SC2086
        timeout "$(left 90)" python -m benchmarks.host_overhead --out "$HOST_JSON" ${HOST_ARGS:-} 2>&1 | tee -a "$OUT/$LOG"
        ((PIPESTATUS[0] != 0)) && STATUS=1
    fi
    run_bench 555 --bench-groups deco,stride8,deco-enc,stride16
    report_targets
}

step_graph() {
    ensure_build
    LOG=graph.log
    # Every provider of the target rows captured alike, so the ratios compare kernels where eager launches
    # compare host paths (batch 2); records carry "launch": "graph" and are judged as targets of their own.
    run_bench 540 --bench-groups deco,stride8 --bench-kernels 9 --bench-passes fwd+bwd --bench-launches graph
    report_targets
}

step_autotune() {
    ensure_build
    LOG=autotune.log
    run_bench 540 --bench-groups deco,stride8 --bench-kernels 9 --bench-batches 8 \
        --bench-providers compile-max-autotune --bench-dtypes bfloat16,float32
}

step_e2e() {
    ensure_build
    note "end-to-end benchmarks -> ${E2E_JSON##*/} (log: e2e.log)"
    # shellcheck disable=SC2086
    timeout "$(left 540)" python -m benchmarks.e2e --out "$E2E_JSON" --resume ${E2E_ARGS:-} 2>&1 | tee "$OUT/e2e.log"
    local rc=${PIPESTATUS[0]}
    ((rc == 124)) && echo "e2e: cut off by the time budget (results so far are kept; run the step again)"
    ((rc != 0 && rc != 124)) && STATUS=1
    report_targets
}

step_profile() {
    ensure_build
    note "breakdowns -> profile.txt, traces.tar.gz, ncu.txt"
    # Where the rows' time goes: op calls (wall vs device, kernels ranked), DECO-R18 steps (host vs device time,
    # launches; Chrome traces of each step), and Nsight Compute's view of the NCHW depthwise conv's kernels, the
    # adaptive max pool's backward and the adaptive average pool.
    local traces=/tmp/deco-traces
    {
        # shellcheck disable=SC2086
        timeout "$(left 150)" python -m benchmarks.breakdown ops ${PROFILE_OPS_ARGS:-}
        # shellcheck disable=SC2086
        timeout "$(left 200)" python -m benchmarks.breakdown e2e --trace-dir "$traces" ${PROFILE_E2E_ARGS:-}
        # The ops per training step on this machine's device (the README's table was counted on the CPU).
        # shellcheck disable=SC2086
        timeout "$(left 90)" python -m benchmarks.breakdown counts ${PROFILE_COUNTS_ARGS:---models deco-r18,deco-r50}
    } >"$OUT/profile.txt" 2>&1 || STATUS=1
    grep -E "^#####|fwd\+bwd: wall|^(deco|detr)-r[0-9]+ " "$OUT/profile.txt"
    [[ -d $traces ]] && tar czf "$OUT/traces.tar.gz" -C "$(dirname "$traces")" "$(basename "$traces")"
    NCU=$(cuda_tool ncu)
    if [[ -n $NCU ]]; then
        # The three conv kernels of a fwd+bwd call (forward, grad input, weight gradient): the third run measured
        # the 9x9 forward at 16% of the FP32 peak, where the counts of its inner loop allow several times that.
        ncu_kernels "conv_tiled_kernel|weight_grad_partials_kernel" depthwise_conv2d 3
        ncu_kernels MaxPoolBackwardOp adaptive_max_pool2d 1
        # Both kernels of a fwd+bwd call: the average pool at stride 8 ran 2-3x slower than Triton's (third run).
        ncu_kernels AvgPool adaptive_avg_pool2d 2
    fi
}

# ncu_kernels NAME_REGEX OP COUNT: Nsight Compute ($NCU) on COUNT launches of the CUDA backend's kernels whose name
# matches NAME_REGEX, after 3 (warm-up), in OP's fwd+bwd calls at stride 8 (fp32; kernel 9 for the convs),
# appended to ncu.txt (one file for all: a call brings back at most 8). The element-wise kernels are instances of
# one template (for_each_kernel<Op>): only the demangled name holds the op's name. The memory tables count
# shared-memory bank conflicts and the sectors per request.
ncu_kernels() {
    echo "##### ncu: $2, kernels matching $1" >>"$OUT/ncu.txt"
    timeout "$(left 120)" "$NCU" --kernel-name-base demangled --kernel-name "regex:$1" \
        --launch-skip 3 --launch-count "$3" --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section MemoryWorkloadAnalysis_Tables \
        --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats --section WarpStateStats \
        python -m benchmarks.breakdown ops --ops "$2" --groups stride8 --dtypes float32 \
        --providers deco-cuda --runs 2 >>"$OUT/ncu.txt" 2>&1 || echo "ncu ($2): rc $?"
}

step_sanitize() {
    ensure_build
    note "compute-sanitizer over the CUDA kernels' GPU tests -> sanitize.log"
    local sanitizer
    if ! sanitizer=$(cuda_tool compute-sanitizer); then
        echo "compute-sanitizer: not on the PATH, nor in ${CUDA_HOME:-/usr/local/cuda}/bin" | tee "$OUT/sanitize.log"
        return
    fi
    # The tests on CUDA tensors of tests/test_cuda_kernels.py (many shapes, every layout and dtype, outputs
    # poisoned), not their CPU twins nor the comparison with Triton (whose compiles would run under the sanitizer
    # too). memcheck: out-of-bounds and misaligned accesses of every kernel; racecheck: shared-memory hazards (the
    # NCHW conv, the weight gradient and conv + LayerNorm stage tiles and reuse them behind barriers). Each tool
    # gets at most 270 s; a cut-off run says so.
    local tool rc
    for tool in memcheck racecheck; do
        echo "##### compute-sanitizer --tool $tool" >>"$OUT/sanitize.log"
        timeout "$(left 270)" "$sanitizer" --tool "$tool" --error-exitcode 86 --print-limit 20 \
            python -m pytest tests/test_cuda_kernels.py -q -x -p no:cacheprovider -k "not cpu and not triton" \
            >>"$OUT/sanitize.log" 2>&1
        rc=$?
        tail -n 3 "$OUT/sanitize.log"
        ((rc == 124)) && echo "$tool: cut off by the time budget"
        ((rc != 0 && rc != 124)) && echo "$tool: rc $rc (86: the sanitizer reported errors)" && STATUS=1
    done
}

step_demo() {
    ensure_build
    note "deco demo on the GPU -> demo-$GPU.json (log: demo.log)"
    local work=/tmp/deco-demo
    timeout "$(left 330)" python -m deco.cli demo --minutes "${DEMO_MINUTES:-4}" --device cuda --out "$work" 2>&1 | tee "$OUT/demo.log"
    local rc=${PIPESTATUS[0]}
    ((rc != 0)) && echo "demo: rc $rc" && STATUS=1
    [[ -s $work/demo_result.json ]] && cp "$work/demo_result.json" "$OUT/demo-$GPU.json"
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
        graph) step_graph ;;
        autotune) step_autotune ;;
        e2e) step_e2e ;;
        profile) step_profile ;;
        sanitize) step_sanitize ;;
        demo) step_demo ;;
        all) step_test; step_bench; step_graph; step_e2e; step_autotune ;;
        *) echo "unknown step '$step'; expected build, test, bench, graph, e2e, autotune, profile, sanitize, demo or" \
               "all" >&2; exit 2 ;;
    esac
done
# The results also stay on this machine, in $CARRIED: while it is warm (held between calls), the next call
# continues them without their being carried back. $OUT is emptied before every call.
kept=()
for f in "$MICRO_JSON" "$E2E_JSON" "$HOST_JSON"; do
    [[ -s $f ]] && kept+=("$f")
done
if ((${#kept[@]})); then
    mkdir -p "$CARRIED" && cp -f "${kept[@]}" "$CARRIED/" && note "kept ${kept[*]##*/} in $CARRIED for the next call"
fi
note "done (status $STATUS); files in $OUT:"
ls -la "$OUT"
exit $STATUS
