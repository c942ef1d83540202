"""scripts/gpu_run.sh, the whole GPU session, runs its bench and e2e steps here on tiny shapes: a mistake in
the script must not first show up in the few minutes of a lent GPU. Two calls, the second continuing the
first's carried results as the device tool's calls do."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from subprocess_env import REPO, repo_environment

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

_SMOKE_BENCH = "--bench-groups smoke --bench-dtypes float32 --bench-rep-ms 1 --bench-compile-backend eager"
_SMOKE_E2E = (
    "--smoke --models deco-r18 --providers stock-eager --passes infer --image-size 64 64 --runs 1 --warmup 0 "
    "--rep-ms 0"
)


def _gpu_run(out, carried, *steps, providers, committed=None):
    environment = repo_environment(
        # The repository's own committed results are another GPU's: only a test's own are continued.
        GPU_RUN_COMMITTED=str(committed or Path(out) / "no-committed-results"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the script runs `python`
        OUT=str(out),
        GPU_RUN_CARRIED=str(carried),
        GPU_RUN_BUDGET_S="400",
        OMP_NUM_THREADS="1",
        BENCH_ARGS=f"{_SMOKE_BENCH} --bench-providers {providers}",
        E2E_ARGS=_SMOKE_E2E,
        HOST_ARGS="--calls 2 --repeats 1 --ops adaptive_max_pool2d --backends torch",
        PROFILE_OPS_ARGS="--ops adaptive_max_pool2d --dtypes float32 --runs 1",
        PROFILE_E2E_ARGS="--providers fused-eager --passes infer --runs 1",
        PROFILE_COUNTS_ARGS="--models deco-r18 --kernels stock --image-size 64 64",
    )
    done = subprocess.run(
        ["bash", "scripts/gpu_run.sh", *steps], cwd=REPO, env=environment, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    return done.stdout


def test_bench_and_e2e_steps_continue_carried_results(tmp_path):
    probe = subprocess.run([sys.executable, "-c", "import deco_kernels._C"], cwd=REPO, env=repo_environment())
    if probe.returncode != 0:
        pytest.skip("deco_kernels._C is not built here: the script would build it first (minutes)")
    # The script's name for this machine's GPU: the model, lower case ("h100"), or "nogpu".
    gpu = torch.cuda.get_device_name(0).removeprefix("NVIDIA ").split()[0].lower() if torch.cuda.is_available() else (
        "nogpu"
    )
    first_out, second_out, carried = tmp_path / "first", tmp_path / "second", tmp_path / "carried"

    log = _gpu_run(first_out, carried, "bench", providers="eager-nchw")
    files = sorted(path.name for path in first_out.iterdir())
    assert files == ["bench.log", "env.txt", f"host-{gpu}.json", f"micro-{gpu}.json"], files
    first = json.loads((first_out / f"micro-{gpu}.json").read_text())["records"]
    assert first and {r["provider"] for r in first} == {"eager-nchw"}
    assert "targets on" in log  # the target report ran

    # The call left its results in the carried directory too, as on a device machine still warm for the next
    # call (the device tool empties $OUT before each call).
    assert sorted(path.name for path in carried.iterdir()) == [f"host-{gpu}.json", f"micro-{gpu}.json"]
    assert (carried / f"micro-{gpu}.json").read_bytes() == (first_out / f"micro-{gpu}.json").read_bytes()
    log = _gpu_run(second_out, carried, "bench", "e2e", providers="eager-nchw,eager-cl")
    assert f"continuing {carried}/micro-{gpu}.json" in log
    assert f"continuing {carried}/host-{gpu}.json" in log
    second = json.loads((second_out / f"micro-{gpu}.json").read_text())["records"]
    assert second[: len(first)] == [{**r, "speedup": second[i]["speedup"]} for i, r in enumerate(first)]
    assert {r["provider"] for r in second[len(first):]} == {"eager-cl"}  # only the missing rows were measured
    e2e = json.loads((second_out / f"e2e-{gpu}.json").read_text())["records"]
    assert [(r["model"], r["provider"], r["pass"]) for r in e2e] == [("DECO-R18", "stock-eager", "infer")]

    # A carried file measured with other sources is left alone: the step starts a new one.
    stale = json.loads((second_out / f"micro-{gpu}.json").read_text())
    (carried / f"micro-{gpu}.json").write_text(json.dumps({**stale, "code": "0123456789ab"}))
    third_out = tmp_path / "third"
    log = _gpu_run(third_out, carried, "bench", providers="eager-cl")
    assert f"not continuing {carried}/micro-{gpu}.json: measured with other sources" in log
    third = json.loads((third_out / f"micro-{gpu}.json").read_text())
    assert third["code"] == stale["code"] and {r["provider"] for r in third["records"]} == {"eager-cl"}

    # A new session's checkout has no carried files: it continues the committed merge of an earlier session's
    # files where that was measured with these sources (here the second call's), skipping one measured with
    # others (a later date, so looked at first) and the host-overhead file.
    committed = tmp_path / "committed"
    merged = committed / f"{gpu}-2026-01-01.json"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.report", "merge", second_out / f"micro-{gpu}.json",
         second_out / f"e2e-{gpu}.json", "-o", merged],
        cwd=REPO, env=repo_environment(), check=True, capture_output=True,
    )
    (committed / f"{gpu}-2026-02-01.json").write_text(json.dumps({**stale, "code": "0123456789ab"}))
    (committed / f"{gpu}-2026-03-01-host.json").write_text("{}")  # no code: measured with other sources
    shutil.copy(second_out / f"host-{gpu}.json", committed / f"{gpu}-2026-01-01-host.json")
    fourth_out = tmp_path / "fourth"
    log = _gpu_run(fourth_out, tmp_path / "none", "bench", "e2e", providers="eager-nchw,eager-cl", committed=committed)
    assert f"continuing: wrote {fourth_out}/micro-{gpu}.json ({len(second)} micro records of {merged})" in log
    assert f"continuing: wrote {fourth_out}/e2e-{gpu}.json (1 e2e records of {merged})" in log
    fourth = json.loads((fourth_out / f"micro-{gpu}.json").read_text())["records"]
    assert fourth == second  # every row was measured already: nothing new
    assert json.loads((fourth_out / f"e2e-{gpu}.json").read_text())["records"] == e2e
    # The host overhead depends on the sources alone: the committed one is taken, not measured again.
    assert f"continuing: host overhead of {committed}/{gpu}-2026-01-01-host.json" in log
    assert f"host-{gpu}.json was measured with these sources already" in log
    assert (fourth_out / f"host-{gpu}.json").read_text() == (second_out / f"host-{gpu}.json").read_text()


def test_profile_step_writes_breakdowns_and_traces(tmp_path):
    log = _gpu_run(tmp_path, tmp_path / "none", "profile", providers="eager-nchw")
    assert "adaptive_max_pool2d smoke" in log and "eager-nchw fwd+bwd: wall" in log
    assert "##### deco-r18-fused-eager-infer: wall" in log
    assert any(line.split()[:2] == ["deco-r18", "stock"] for line in log.splitlines())  # the ops per step
    with tarfile.open(tmp_path / "traces.tar.gz") as archive:
        assert archive.getnames() == ["deco-traces", "deco-traces/deco-r18-fused-eager-infer.json"]


def test_graph_step_replays_the_target_rows(tmp_path):
    """The graph step selects the target rows with --bench-launches graph; without a GPU each is skipped, saying
    why, and the step still succeeds."""
    log = _gpu_run(tmp_path, tmp_path / "none", "graph", providers="eager-nchw")
    assert (tmp_path / "graph.log").is_file()
    if not torch.cuda.is_available():
        assert "CUDA graph replay needs a CUDA device" in (tmp_path / "graph.log").read_text() + log
