"""The benchmark suite cannot rot: it runs on the CPU with tiny shapes, writes results files that follow the
schema, and its report and target checker work on them. Timings are never asserted (CPU numbers mean nothing).
"""

import json
import subprocess
import sys

import pytest
import torch

from subprocess_env import REPO, repo_environment

sys.path.insert(0, str(REPO))  # the benchmarks package lives beside the installed ones, not inside them

from benchmarks import breakdown, e2e, host_overhead, roofline  # noqa: E402
from benchmarks.cases import OPS, cases  # noqa: E402
from benchmarks.check_targets import evaluate  # noqa: E402
from benchmarks.report import compare, headline_table, render  # noqa: E402
from benchmarks.report import main as report_main  # noqa: E402
from benchmarks.microbench import BenchEnv, graph_unavailable, run_record  # noqa: E402
from benchmarks.providers import make_inputs  # noqa: E402
from benchmarks.results import (  # noqa: E402
    ResultsFile,
    add_speedups,
    code_digest,
    environment,
    load,
    merge,
    split,
    validate,
)
from benchmarks.timing import measure  # noqa: E402
from deco_kernels import depthwise_conv2d  # noqa: E402
from deco_kernels.backend import cuda_extension_available  # noqa: E402


def _run_benchmarks(*options):
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable", *options]
    environment = repo_environment(OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)


def test_microbenchmark_suite_runs_on_cpu(tmp_path):
    out = tmp_path / "micro.json"
    done = _run_benchmarks(
        "benchmarks",
        "--bench-smoke",
        "--bench-dtypes",
        "float32",
        "--bench-rep-ms",
        "1",
        "--bench-compile-backend",
        "eager",
        "--bench-launches",
        "eager,graph",
        "--bench-out",
        str(out),
        "-rs",
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    if not torch.cuda.is_available():
        # The GPU backends and CUDA graph replays are skipped on the CPU, and say so.
        assert "deco-triton needs a CUDA device" in done.stdout
        assert "deco-cuda needs a CUDA device" in done.stdout
        assert "CUDA graph replay needs a CUDA device" in done.stdout

    document = load(out)
    measured = {(r["op"], r["provider"], r["pass"]) for r in document["records"]}
    for op in OPS:
        for provider in ("deco-torch", "eager-nchw", "eager-cl", "compile"):
            for pass_ in roofline.PASSES:
                assert (op, provider, pass_) in measured
    for record in document["records"]:
        expected = roofline.cost(record["op"], record["shape"], torch.float32, record["pass"])
        assert record["model_bytes"] == expected.bytes and record["model_flops"] == expected.flops
        assert set(record["speedup"]) <= {"eager-nchw", "eager-cl", "compile", "compile-max-autotune"}
        assert record["provider"] not in record["speedup"]
        assert record["forward_error"] < 1e-5
        assert 0 < record["first_call_s"] < record["row_s"]
    markdown, _ = render(out)
    compiled = sum(r["provider"] == "compile" for r in document["records"])
    assert f"| compile | {compiled} |" in markdown.read_text().split("## Run time")[1]


def test_microbenchmarks_resume_a_results_file(tmp_path):
    out = tmp_path / "micro.json"
    common = ["benchmarks/test_bench_adaptive_max_pool2d.py", "--bench-smoke", "--bench-dtypes", "float32"]
    common += ["--bench-passes", "fwd", "--bench-rep-ms", "1", "--bench-out", str(out), "--bench-resume"]
    first = _run_benchmarks(*common, "--bench-providers", "eager-nchw")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    (measured,) = load(out)["records"]

    second = _run_benchmarks(*common, "--bench-providers", "eager-nchw,eager-cl", "-rs")
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-2000:]
    assert "measured already in" in second.stdout and "1 passed, 1 skipped" in second.stdout
    document = load(out)
    assert [r["provider"] for r in document["records"]] == ["eager-nchw", "eager-cl"]
    assert document["records"][0]["median_ms"] == measured["median_ms"]  # kept, not measured again
    assert document["records"][1]["speedup"] == {"eager-nchw": pytest.approx(measured["median_ms"] / document[
        "records"][1]["median_ms"])}

    out.write_text(json.dumps({**document, "device": "another GPU"}))
    refused = _run_benchmarks(*common, "--bench-providers", "eager-nchw")
    assert refused.returncode != 0 and "cannot resume: its device is 'another GPU'" in refused.stdout + refused.stderr
    assert json.loads(out.read_text())["records"] == document["records"]  # untouched


def test_microbenchmarks_measure_target_rows_first():
    done = _run_benchmarks("benchmarks", "--collect-only", "--bench-groups", "deco,stride8,stride16,deco-enc")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    ids = [line for line in done.stdout.splitlines() if "::test_" in line]
    assert len(ids) > 2000

    def is_target(test_id):
        op = test_id.split("::test_")[1].split("[")[0]
        if "-fwd+bwd-" not in test_id or op not in ("depthwise_conv2d", "upsample_add_conv", "adaptive_max_pool2d"):
            return False
        return op != "depthwise_conv2d" or ("kh9-kw9" in test_id and ("stride8-" in test_id or "H25-W42" in test_id))

    targets = [is_target(i) for i in ids]
    first_other = targets.index(False)
    assert first_other > 0 and not any(targets[first_other:])  # every target row before every other row
    assert ids[0].split("[")[1].startswith("deco-") and "-fwd+bwd-" in ids[0] and "kh9-kw9" in ids[0]
    rest = ids[first_other:]
    groups = ["stride16-" in i or "deco-enc-" in i for i in rest]
    assert not any(groups[: groups.index(True)]) and all(groups[groups.index(True):])  # other groups last


def test_results_file_resume(tmp_path):
    path = tmp_path / "r.json"
    header = {"device": "gpu", "torch": "2.11", "triton": "3.6", "date": "2026-01-01", "command": "first",
              "code": "aaaaaaaaaaaa"}
    first = ResultsFile(path, header, ("eager-nchw",))
    first.add(_micro("eager-nchw", 2.0))
    fresh = ResultsFile(path, {**header, "date": "2026-01-02", "command": "second"}, ("eager-nchw",))
    assert fresh.records == [] and not fresh.measured(_micro("eager-nchw", 1.0))  # without resume: a new file
    resumed = ResultsFile(path, {**header, "date": "2026-01-02", "command": "second"}, ("eager-nchw",), resume=True)
    assert resumed.measured(_micro("eager-nchw", 1.0)) and not resumed.measured(_micro("deco-triton", 1.0))
    assert not resumed.measured(_micro("eager-nchw", 1.0, pass_="fwd"))
    resumed.add(_micro("deco-triton", 0.5))
    document = load(path)
    assert document["date"] == "2026-01-01" and document["command"] == "first ; second"
    assert document["records"][1]["speedup"] == {"eager-nchw": 4.0}
    with pytest.raises(ValueError, match="cannot resume: its triton is '3.6', this run's is '3.8'"):
        ResultsFile(path, {**header, "triton": "3.8"}, ("eager-nchw",), resume=True)
    # Other kernels or model code: the rows would be stale, so the file is not continued, nor merged with.
    with pytest.raises(ValueError, match="cannot resume: its code is 'aaaaaaaaaaaa', this run's is 'bbbbbbbbbbbb'"):
        ResultsFile(path, {**header, "code": "bbbbbbbbbbbb"}, ("eager-nchw",), resume=True)
    with pytest.raises(ValueError, match="merge: results measured different sources"):
        merge([document, {**document, "code": "bbbbbbbbbbbb"}])


def test_results_record_the_measured_sources():
    header = environment(torch.device("cpu"))
    assert header["code"] == code_digest() and len(header["code"]) == 12


@pytest.fixture
def one_thread():
    # Tiny models: the OpenMP hand-off between threads costs more than the work (and stalls on a busy CPU).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_end_to_end_benchmark_runs_on_cpu(tmp_path, one_thread):
    out = tmp_path / "e2e.json"
    status = e2e.main(
        [
            "--out",
            str(out),
            "--smoke",
            "--models",
            "deco-r18,detr-r50",
            "--providers",
            "fused-eager-cl,stock-eager,fused-eager,eager",
            "--dtypes",
            "float32",
            "--batch",
            "2",
            "--image-size",
            "64",
            "64",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--rep-ms",
            "0",
        ]
    )
    assert status == 0
    document = load(out)
    got = [(r["model"], r["provider"], r["pass"]) for r in document["records"]]
    # NCHW rows of every model first, then the channels-last ones, whatever the order asked for.
    assert got == [
        (model, provider, pass_)
        for model, provider in (
            ("DECO-R18", "stock-eager"),
            ("DECO-R18", "fused-eager"),
            ("DETR-R50", "eager"),
            ("DECO-R18", "fused-eager-cl"),
        )
        for pass_ in ("train_step", "infer")
    ]
    for record in document["records"]:
        assert record["batch"] == (2 if record["pass"] == "train_step" else 1)
        assert record["peak_mem_gb"] is None  # only measured on a GPU
    for provider in ("fused-eager", "fused-eager-cl"):
        fused = next(r for r in document["records"] if r["provider"] == provider)
        assert set(fused["speedup"]) == {"stock-eager"}


def test_graphed_providers_are_skipped_without_a_gpu(tmp_path, caplog):
    out = tmp_path / "e2e.json"
    argv = ["--out", str(out), "--smoke", "--models", "deco-r18", "--providers", "fused-cudagraph", "--runs", "1"]
    with caplog.at_level("INFO", logger="benchmarks.e2e"):
        assert e2e.main([*argv, "--image-size", "64", "64", "--warmup", "0", "--rep-ms", "0"]) == 0
    for pass_ in ("train_step", "infer"):
        assert f"skipping deco-r18 fused-cudagraph {pass_} (CUDA graphs need a GPU)" in caplog.text
    assert load(out)["records"] == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kernels", ["stock", "fused"])
def test_cuda_graphed_training_steps_train_as_eager_ones(kernels):
    """Two training steps whose model forward and backward replay CUDA graphs (the cudagraph providers) leave the
    parameters where two eager steps from the same start leave them, and change them."""
    device = torch.device("cuda")
    images, mask, targets = e2e.synthetic_batch(2, (64, 96), device, torch.Generator().manual_seed(0))
    trained = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        model = e2e.build_model("deco-r18", f"{kernels}-eager", tiny=True).to(device)
        start = {name: p.detach().clone() for name, p in model.named_parameters()}
        runner = e2e.graphed_training_runner(model, images, mask) if graphed else model
        step = e2e.build_train_step("deco-r18", model, runner, (images, mask, targets), device)
        step()
        step()
        torch.cuda.synchronize()
        trained[graphed] = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert any(not torch.equal(start[name], p) for name, p in trained[False].items())
    for name, p in trained[False].items():
        torch.testing.assert_close(trained[True][name], p, rtol=1e-5, atol=1e-6, msg=name)


def test_end_to_end_benchmark_resumes(tmp_path, one_thread, caplog):
    out = tmp_path / "e2e.json"
    common = ["--out", str(out), "--resume", "--smoke", "--models", "deco-r18", "--passes", "infer"]
    common += ["--dtypes", "float32", "--image-size", "64", "64", "--runs", "1", "--warmup", "0", "--rep-ms", "0"]
    assert e2e.main([*common, "--providers", "stock-eager"]) == 0
    (measured,) = load(out)["records"]
    with caplog.at_level("INFO", logger="benchmarks.e2e"):
        assert e2e.main([*common, "--providers", "stock-eager,fused-eager"]) == 0
    assert "skipping deco-r18 stock-eager float32 infer (in" in caplog.text
    records = load(out)["records"]
    assert [r["provider"] for r in records] == ["stock-eager", "fused-eager"] and records[0] == measured


def test_host_overhead_runs_on_cpu(tmp_path, one_thread, capsys):
    out = tmp_path / "host.json"
    ops = "adaptive_max_pool2d,depthwise_conv2d_layernorm"
    options = ["--backends", "torch", "--ops", ops, "--calls", "2", "--repeats", "1", "--out", str(out)]
    assert host_overhead.main(options) == 0
    document = json.loads(out.read_text())
    measured = {(r["op"], r["provider"], r["pass"]) for r in document["records"]}
    assert measured == {
        (op, provider, pass_)
        for op in ops.split(",")
        for provider in ("deco-torch", "eager-nchw")
        for pass_ in ("fwd", "fwd+bwd")
    }
    assert all(r["us_per_call"] > 0 for r in document["records"])
    assert "adaptive_max_pool2d" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--ops: unknown"):
        host_overhead.main(["--backends", "torch", "--ops", "conv3d"])
    with pytest.raises(SystemExit, match="--backends: \\['tpu'\\] cannot run"):
        host_overhead.main(["--backends", "tpu"])


@pytest.mark.skipif(not cuda_extension_available(), reason="needs the CUDA extension (its CPU build runs here)")
def test_host_overhead_measures_both_routes_of_the_cuda_backend(tmp_path, one_thread):
    out = tmp_path / "host.json"
    options = ["--backends", "cuda", "--ops", "adaptive_avg_pool2d", "--calls", "2", "--repeats", "1", "--out", str(out)]
    assert host_overhead.main(options) == 0
    providers = [r["provider"] for r in json.loads(out.read_text())["records"]]
    assert providers == ["deco-cuda", "deco-cuda-python-route", "eager-nchw"] * 2


def test_synthetic_batch_is_padded_and_valid():
    images, mask, targets = e2e.synthetic_batch(3, (40, 60), torch.device("cpu"), torch.Generator().manual_seed(0))
    assert images.shape == (3, 3, 40, 60) and mask.shape == (3, 40, 60)
    assert not mask[0].any() and mask[1:].any()
    assert (images[mask.unsqueeze(1).expand_as(images)] == 0).all()
    for target in targets:
        boxes = target["boxes"]
        assert 1 <= len(boxes) <= 20 and (target["labels"] < 91).all()
        assert (boxes[:, :2] - boxes[:, 2:] / 2 >= 0).all() and (boxes[:, :2] + boxes[:, 2:] / 2 <= 1).all()


def test_pool_windows_match_torch():
    for size, out in ((25, 10), (42, 10), (7, 3), (5, 10)):
        lengths = roofline.adaptive_pool_windows(size, out)
        # torch's average of 0, 1, ..., size-1 over a window [start, start + n) is start + (n - 1) / 2.
        averaged = torch.nn.functional.adaptive_avg_pool1d(torch.arange(size, dtype=torch.float64).view(1, 1, -1), out)
        starts = [i * size // out for i in range(out)]
        expected = [start + (n - 1) / 2 for start, n in zip(starts, lengths, strict=True)]
        torch.testing.assert_close(averaged.view(-1), torch.tensor(expected, dtype=torch.float64))


def test_cost_model_by_hand():
    shape = {"B": 2, "C": 3, "H": 4, "W": 5, "kh": 3, "kw": 3}
    n = 2 * 3 * 4 * 5
    params = 3 * 10 * 4
    forward = roofline.cost("depthwise_conv2d", shape, torch.bfloat16, "fwd")
    assert forward.bytes == 2 * n * 2 + params and forward.flops == 2 * n * 9 + n
    both = roofline.cost("depthwise_conv2d", shape, torch.float32, "fwd+bwd")
    assert both.bytes == 5 * n * 4 + 3 * params and both.flops == 6 * n * 9 + 2 * n
    layernorm = roofline.cost("depthwise_conv2d_layernorm", shape, torch.float32, "fwd+bwd")
    norm_params = 3 * 12 * 4  # conv weight (9) and bias, norm weight and bias: fp32
    assert layernorm.bytes == 5 * n * 4 + 3 * norm_params and layernorm.flops == (2 * n * 9 + 9 * n) + (
        6 * n * 9 + 16 * n)
    pool = roofline.cost(
        "adaptive_max_pool2d", {"B": 1, "C": 1, "H": 25, "W": 25, "oh": 10, "ow": 10}, torch.float32, "fwd"
    )
    # 25 -> 10: every window spans 3 rows (and 3 columns), e.g. [0, 3), [2, 5), [5, 8).
    assert pool.bytes == 625 * 4 + 100 * (4 + 8) and pool.flops == 30 * 30
    cim_tail = {"B": 1, "C": 2, "H": 25, "W": 25, "oh": 10, "ow": 10}
    forward = roofline.cost("scale_residual_max_pool", cim_tail, torch.bfloat16, "fwd")
    # Read z and ffn (2 x 1250 bf16) and gamma (2 fp32), write y (200 bf16) and its argmax (200 int64); one FMA
    # per input element and one compare per window element.
    assert forward.bytes == 2 * 1250 * 2 + 2 * 4 + 200 * (2 + 8) and forward.flops == 2 * 1250 + 2 * 30 * 30
    backward = roofline.cost("scale_residual_max_pool", cim_tail, torch.bfloat16, "bwd")
    # Read grad_y, ffn at the argmax (bf16), the argmax and gamma; write grad_z, grad_ffn (bf16) and grad_gamma.
    assert backward.bytes == 2 * 1250 * 2 + 2 * 2 * 4 + 200 * (2 * 2 + 8) and backward.flops == 1250 + 3 * 200
    assert roofline.roofline_floor_s(roofline.Cost(1e9, 1e9), 1e12, 1e13) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="pass_ must be one of"):
        roofline.cost("depthwise_conv2d", shape, torch.float32, "backward")


def test_case_selection():
    deco_9x9 = cases("depthwise_conv2d", ("deco", "stride8"), kernels=(9,), batches=(8,))
    assert {(c.group, c.dims["H"], c.dims["W"]) for c in deco_9x9} == {
        ("deco", 25, 42),
        ("deco", 10, 10),
        ("stride8", 100, 167),
    }
    with pytest.raises(ValueError, match="groups must be among"):
        cases("depthwise_conv2d", ("stride4",))


def _micro(provider, median, op="depthwise_conv2d", group="deco", shape=None, pass_="fwd+bwd", roofline_pct=50.0):
    shape = shape or {"B": 8, "C": 480, "H": 25, "W": 42, "kh": 9, "kw": 9}
    return {
        "op": op,
        "group": group,
        "provider": provider,
        "shape": shape,
        "dtype": "float32",
        "pass": pass_,
        "median_ms": median,
        "p20_ms": median,
        "p80_ms": median,
        "runs": 10,
        "gb_per_s": 1.0,
        "gflop_per_s": 1.0,
        "roofline_pct": roofline_pct,
        "forward_error": 0.0,
        "speedup": {},
    }


def _document(records):
    return {"device": "test", "torch": "x", "triton": None, "date": "2026-01-01", "command": "c", "records": records}


def test_targets_are_judged_on_the_worst_row():
    stride8 = {"B": 8, "C": 256, "H": 100, "W": 167, "kh": 9, "kw": 9}
    records = [
        _micro("eager-nchw", 1.0),
        _micro("eager-cl", 0.8),
        _micro("compile", 0.6),
        _micro("deco-triton", 0.5),
        _micro("deco-triton-cl", 0.3),  # 0.8 / 0.3 = 2.67x over eager, 2x compile
        _micro("eager-nchw", 4.0, group="stride8", shape=stride8),
        _micro("compile", 3.0, group="stride8", shape=stride8),
        _micro("deco-triton", 2.5, group="stride8", shape=stride8, roofline_pct=75.0),  # 1.6x: the worst row
    ]
    outcomes = {(o.target, o.side): o for o in evaluate(records)}
    eager = outcomes[("depthwise 9x9 fwd+bwd >= 2x faster eager layout", "triton")]
    assert eager.status == "MISSED" and eager.worst == pytest.approx(1.6) and eager.rows == 2
    compiled = outcomes[("depthwise 9x9 fwd+bwd >= 1.5x torch.compile", "triton")]
    assert compiled.status == "MISSED" and compiled.worst == pytest.approx(3.0 / 2.5)  # DECO row: 0.6 / 0.3 = 2x
    assert outcomes[("depthwise 9x9 fwd+bwd >= 2x faster eager layout", "cuda")].status == "NO DATA"
    roof = outcomes[("large shapes >= 70% of the roofline floor", "triton")]
    assert roof.status == "MET" and roof.worst == 75.0


def test_speedups_schema_and_merge(tmp_path):
    records = [_micro("eager-nchw", 2.0), _micro("deco-triton", 0.5)]
    add_speedups(records, ("eager-nchw",))
    assert records[1]["speedup"] == {"eager-nchw": 4.0} and records[0]["speedup"] == {}
    validate(_document(records))
    broken = _document([{k: v for k, v in records[0].items() if k != "median_ms"}])
    with pytest.raises(ValueError, match="records\\[0\\]: missing field 'median_ms'"):
        validate(broken)
    with pytest.raises(ValueError, match="field 'pass' must be one of"):
        validate(_document([{**records[0], "pass": "train"}]))
    with pytest.raises(ValueError, match="different devices"):
        merge([_document(records), {**_document(records), "device": "other"}])
    path = tmp_path / "gpu-2026-01-01.json"
    path.write_text(json.dumps(merge([_document(records[:1]), _document(records[1:])])))
    markdown, plots = render(path)
    assert "depthwise_conv2d" in markdown.read_text() and [p.name for p in plots] == [
        "gpu-2026-01-01-depthwise_conv2d.png"
    ]
    assert "| depthwise_conv2d | B8 C480 H25 W42 kh9 kw9 | float32 | fwd+bwd | 0.500 |" in headline_table(records)


def test_split_takes_a_merge_apart_again():
    micro = {**_document([_micro("eager-nchw", 2.0), _micro("deco-cuda", 1.0)]), "command": "pytest ; pytest again"}
    e2e_file = {**_document([{**_e2e("DECO-R18", "stock-eager", 10.0), "speedup": {}}]), "command": "e2e"}
    merged = merge([micro, e2e_file])
    assert merged["command"] == "pytest ; pytest again ; e2e"
    parts = split(merged)
    assert [r["provider"] for r in parts["micro"]["records"]] == ["eager-nchw", "deco-cuda"]
    assert parts["e2e"]["records"] == e2e_file["records"]
    # Continued from the merge, each part lists every command once when merged back.
    assert merge([parts["micro"], parts["e2e"]]) == merged
    assert set(split(micro)) == {"micro"}
    with pytest.raises(ValueError, match="is in more than one of the files"):
        merge([merged, parts["e2e"]])


def test_compare_sets_two_runs_side_by_side_row_by_row(tmp_path, capsys):
    base = _document([
        _micro("deco-cuda", 1.0),
        _micro("deco-cuda", 2.0, pass_="fwd"),
        {**_micro("deco-cuda", 0.5), "launch": "graph"},
        _micro("eager-nchw", 4.0),
        {**_e2e("DECO-R18", "fused-eager", 10.0), "speedup": {}},
    ])
    new = _document([
        _micro("deco-cuda", 0.5),
        {**_micro("deco-cuda", 3.0, pass_="fwd"), "p20_ms": 2.5, "p80_ms": 3.5},
        {**_micro("deco-cuda", 0.5), "launch": "graph"},
        _micro("eager-nchw", 4.2),  # 1.05x: within --slower's 1.1
        {**_e2e("DECO-R18", "fused-eager", 12.0), "speedup": {}},
        _micro("deco-triton", 1.0),  # not in the base run
    ])
    table = compare(base, new)
    assert table.startswith("5 of the 6 rows of the new run were measured in the base run")
    assert "| depthwise_conv2d | deco-cuda | eager | 2 | 1.00 | 0.50 | 1.50 |" in table  # fwd+bwd 0.5x, fwd 1.5x
    assert "| depthwise_conv2d | deco-cuda | graph | 1 | 1.00 | 1.00 | 1.00 |" in table  # launches apart
    assert "| DECO-R18 | fused-eager | - | 1 | 1.20 | 1.20 | 1.20 |" in table
    slow = table.split("Rows over 1.10x their base time: 2")[1]
    assert slow.index("| depthwise_conv2d | B8 C480 H25 W42 kh9 kw9 | float32 | fwd | deco-cuda | eager "
                      "| 2.000 (2.000-2.000) | 3.000 (2.500-3.500) | 1.50 |") < slow.index(
        "| DECO-R18 | B2 800x1333 | float32 | train_step | fused-eager | - | 10.000 (10.000-10.000) "
        "| 12.000 (12.000-12.000) | 1.20 |")
    assert "eager-nchw" not in slow
    with pytest.raises(ValueError, match="different devices"):
        compare(base, {**new, "device": "other"})
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert report_main(["compare", str(tmp_path / "base.json"), str(tmp_path / "new.json"), "--slower", "1.3"]) == 0
    assert "Rows over 1.30x their base time: 1" in capsys.readouterr().out


def test_every_provider_gets_the_same_inputs_and_its_own_tensors():
    for op in OPS:
        case = cases(op, ("smoke",))[0]
        nchw = make_inputs(case, torch.float32, "eager-nchw", torch.device("cpu"))
        with torch.no_grad():
            for tensor in nchw.tensors:
                tensor.zero_()  # a provider that wrote into its inputs must not change the next one's
        channels_last = make_inputs(case, torch.float32, "eager-cl", torch.device("cpu"))
        again = make_inputs(case, torch.float32, "eager-nchw", torch.device("cpu"))
        for cl, fresh in zip(channels_last.tensors, again.tensors):
            assert torch.equal(cl, fresh) and fresh.ne(0).all()
            assert cl.is_leaf and cl.requires_grad and fresh.data_ptr() != cl.data_ptr()
        activation = channels_last.tensors[0]
        if op == "scale_residual_max_pool":  # B x H x W x C views of channels-last maps: dense
            assert activation.is_contiguous()
        else:
            assert activation.is_contiguous(memory_format=torch.channels_last) and not activation.is_contiguous()
        assert make_inputs(case, torch.float32, "eager-nchw", torch.device("cpu"), seed=1).tensors[0].ne(
            again.tensors[0]).any()


def test_graph_replays_compare_with_graph_replays():
    """Records timed as CUDA graph replays carry launch="graph": their speed-ups, target checks and headline
    rows use graph-replayed baselines only, and the eager ones stay as they were."""
    eager = [_micro("eager-nchw", 1.0), _micro("compile", 0.9), _micro("deco-cuda", 1.0)]
    graphed = [{**_micro("eager-nchw", 0.8), "launch": "graph"}, {**_micro("deco-cuda", 0.2), "launch": "graph"}]
    records = eager + graphed
    add_speedups(records, ("eager-nchw", "compile"))
    assert records[2]["speedup"] == {"eager-nchw": 1.0, "compile": 0.9}
    assert records[4]["speedup"] == {"eager-nchw": pytest.approx(4.0)}
    validate(_document(records))
    with pytest.raises(ValueError, match="field 'launch'"):
        validate(_document([{**eager[0], "launch": "replay"}]))
    with pytest.raises(ValueError, match="field 'launch'"):
        validate(_document([{**_e2e("DECO-R18", "stock-eager", 1.0), "speedup": {}, "launch": "graph"}]))

    outcomes = {(o.target, o.side): o for o in evaluate(records)}
    assert outcomes[("depthwise 9x9 fwd+bwd >= 2x faster eager layout", "cuda")].worst == pytest.approx(1.0)
    graph = outcomes[("depthwise 9x9 fwd+bwd >= 2x faster eager layout [graph replay]", "cuda")]
    assert graph.status == "MET" and graph.worst == pytest.approx(4.0) and graph.rows == 1
    assert outcomes[("depthwise 9x9 fwd+bwd >= 1.5x torch.compile [graph replay]", "cuda")].status == "NO DATA"
    assert not any("[graph replay]" in o.target for o in evaluate(eager))

    assert "| 1.000 | 1.000 | 0.900 |" in headline_table(records)  # cuda, eager, compile: eager launches
    assert "| 0.200 | 0.800 | - |" in headline_table(records, "graph")


def test_graph_replay_needs_a_gpu_and_a_forward_in_the_call():
    case = cases("depthwise_conv2d", ("smoke",))[0]
    env = BenchEnv(torch.device("cpu"), copy_bytes_per_s=1e9, peak_fp32_flops=None, rep_ms=1.0)
    with pytest.raises(ValueError, match="launch must be one of"):
        run_record(case, "eager-nchw", torch.float32, "fwd", env, launch="replay")
    with pytest.raises(ValueError, match="CUDA graph replay needs a CUDA device"):
        run_record(case, "eager-nchw", torch.float32, "fwd", env, launch="graph")
    assert "bwd needs a new forward" in graph_unavailable("bwd", torch.device("cuda"))
    assert graph_unavailable("fwd+bwd", torch.device("cuda")) is None
    with pytest.raises(ValueError, match="graph=True needs a CUDA device"):
        measure(lambda _: None, device=torch.device("cpu"), graph=True)


def _e2e(model, provider, median, pass_="train_step"):
    return {"model": model, "provider": provider, "batch": 2 if pass_ == "train_step" else 1,
            "image_size": [800, 1333], "dtype": "float32", "pass": pass_, "median_ms": median, "p20_ms": median,
            "p80_ms": median, "runs": 10, "images_per_s": 1.0, "peak_mem_gb": None}


def test_end_to_end_targets_take_the_best_provider_of_each_side():
    records = [
        _e2e("DECO-R18", "stock-eager", 10.0),
        _e2e("DECO-R18", "stock-eager-cl", 8.0),  # the best stock variant
        _e2e("DECO-R18", "fused-eager", 7.0),
        _e2e("DECO-R18", "fused-eager-cl", 5.0),  # the best fused one: 8 / 5 = 1.6x
        _e2e("DECO-R50", "fused-cudagraph-cl", 2.0, "infer"),
        _e2e("DETR-R50", "eager-cl", 5.0, "infer"),
        _e2e("DETR-R50", "cudagraph", 4.0, "infer"),  # 4 / 2 = 2x
    ]
    add_speedups(records, e2e.STOCK_PROVIDERS)
    outcomes = {o.target: o for o in evaluate(records)}
    train = outcomes["DECO-R18 train step >= 1.5x best stock"]
    assert train.status == "MET" and train.worst == pytest.approx(1.6)
    inference = outcomes["DECO-R50 inference >= 1.5x DETR-R50"]
    assert inference.status == "MET" and inference.worst == pytest.approx(2.0)
    table = headline_table(records)
    row = "| DECO-R18 | {} | train_step | 2 | 800x1333 | float32 | {} | 1.0 | - | {} |"
    assert row.format("fused-eager-cl", "5.00", "2.00x | - | 1.60x") in table  # vs eager, compile, best stock
    assert row.format("stock-eager", "10.00", "- | - | -") in table


COMMITTED_RESULTS = sorted(p for p in (REPO / "benchmarks" / "results").glob("*.json") if not p.stem.endswith("-host"))


@pytest.mark.parametrize("path", COMMITTED_RESULTS, ids=lambda p: p.name)
def test_committed_results_follow_the_schema(path):
    """Every results file under benchmarks/results/ loads and validates, names the run's GPU, and has its rendered
    tables beside it, whose headline is the one its records give now."""
    document = load(path)
    assert document["device"].startswith("NVIDIA "), "committed results come from a real GPU run"
    assert document["date"] in path.stem
    tables = path.with_suffix(".md")
    assert tables.is_file(), f"{tables.name} missing: run python -m benchmarks.report render {path}"
    assert headline_table(document["records"]) in tables.read_text()


def test_op_breakdown_runs_on_cpu(one_thread, capsys):
    """On the CPU the breakdown runs each op's smoke case; the kernel providers are skipped with the reason."""
    assert breakdown.main(["ops", "--ops", "depthwise_conv2d", "--dtypes", "float32", "--runs", "1",
                           "--providers", "deco-cuda,eager-nchw"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("depthwise_conv2d smoke-") and "eager-nchw fwd+bwd: wall" in line for line in lines)
    assert any("deco-cuda: skipped (deco-cuda needs a CUDA device" in line for line in lines)
    with pytest.raises(SystemExit, match="--ops: unknown"):
        breakdown.main(["ops", "--ops", "conv3d"])


def test_op_counter_counts_views_apart_and_a_fused_op_once():
    x = torch.randn(2, 3, 4, 4)
    with breakdown.OpCounter() as counter:
        (x.view(2, 48) * 2).sum()
    assert (counter.total, counter.computing) == (3, 2)
    if not cuda_extension_available():
        pytest.skip("the CPU build of the CUDA kernels is not available")
    weight = torch.randn(3, 1, 3, 3)
    with breakdown.OpCounter() as counter:
        depthwise_conv2d(x, weight, backend="cuda")
    assert counter.computing == 1


def test_step_op_counts_by_phase(one_thread, capsys):
    """The full-size DECO-R18 step's ops by phase: every phase runs ops, and the printed step total is their sum."""
    counters = breakdown.count_step_ops("deco-r18", "stock", 2, (64, 64), torch.device("cpu"))
    assert list(counters) == list(e2e.STEP_PHASES)
    assert all(0 < c.computing <= c.total for c in counters.values())
    assert breakdown.main(["counts", "--models", "deco-r18", "--kernels", "stock", "--image-size", "64", "64"]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("deco-r18")]
    assert row.split()[-2] == str(sum(c.computing for c in counters.values()))
    with pytest.raises(SystemExit, match="--kernels: unknown"):
        breakdown.main(["counts", "--kernels", "triton"])


def test_step_breakdown_writes_a_trace_per_row(tmp_path, one_thread, capsys):
    assert breakdown.main(["e2e", "--providers", "stock-eager", "--passes", "train_step", "--runs", "1",
                           "--trace-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "##### deco-r18-stock-eager-train_step: wall" in out and "launches" in out
    trace = json.loads((tmp_path / "deco-r18-stock-eager-train_step.json").read_text())
    assert any(event.get("name") == "aten::convolution" for event in trace["traceEvents"])
    assert "host syncs per step: not checked (CPU)" in out
    assert not breakdown.host_syncs(lambda: torch.ones(2).sum().item(), torch.device("cpu"))

