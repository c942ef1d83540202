"""Where the time of a benchmark row goes: torch.profiler breakdowns of op calls and end-to-end steps.

``python -m benchmarks.breakdown ops [--ops ...] [--groups deco,stride8] [--dtypes float32,bfloat16]``
``python -m benchmarks.breakdown e2e [--models deco-r18] [--providers stock-eager,fused-eager] [--trace-dir DIR]``
``python -m benchmarks.breakdown counts [--models deco-r18,deco-r50,detr-r50] [--kernels stock,fused]``

The microbenchmarks and ``benchmarks.e2e`` give one median per row; this says what is inside it, to decide
what to tune next (a diagnostic: it prints text, and nothing here is a result of record).

- ``ops``: each selected case, fwd+bwd, for each provider: the wall time per call back to back (host-bound
  when it exceeds the device time), the device time per call summed over its kernels, and the kernels ranked.
  Default cases: the fwd+bwd rows of batch <= 8 that the speed targets are judged on (kernel 9; 7 for the conv
  + LayerNorm op).
- ``e2e``: each (model, provider, pass) of ``benchmarks.e2e``'s steps: wall time per step, host CPU time and
  device time per step (the profiler's self totals), kernel launches per step, the calls that make the host wait
  for the device (one step under ``torch.cuda.set_sync_debug_mode``: a step whose wall time is its host time
  plus its device time has them), then the ops ranked by host time and the kernels by device time.
  ``--trace-dir`` writes one Chrome trace per row: gaps on the device timeline show where the host holds the
  device up.
- ``counts``: the aten ops one training step dispatches, by phase (forward, loss with matching, backward,
  clipping and optimizer), for the full-size models: the host's share of a step that no timing on a particular
  machine gives. Counted with a dispatch mode, so a fused op counts once (like a stock one, whatever kernels
  either launches); "computing" leaves out views. The counts hardly depend on the image size, so the CPU gives
  them too (its fused model runs the CPU build of the CUDA kernels).

On a machine without a GPU all three run on the CPU (host time only) so that the code path is tested.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import e2e
from benchmarks.cases import OPS, cases, comma_list
from benchmarks.host_overhead import measure_calls
from benchmarks.microbench import BenchEnv, host_call
from benchmarks.providers import unavailable

__all__ = ["OpCounter", "count_step_ops", "host_syncs", "main", "profile_step"]

OP_PROVIDERS = ("deco-cuda", "deco-cuda-cl", "deco-triton", "eager-nchw", "eager-cl")
_TARGET_KERNEL = {"depthwise_conv2d_layernorm": 7}


def _kernel_events(events) -> list:
    return [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]


def profile_step(step: Callable[[], None], device: torch.device, runs: int, trace: Path | None = None):
    """(wall ms per step over ``runs`` back-to-back steps, the profiler's key averages of ``runs`` more steps).

    ``step`` is warmed up first (``runs`` calls). With ``trace``, the profiled steps go to that Chrome trace file.
    """
    wall_ms = measure_calls(step, device, runs, repeats=1) / 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(runs):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if trace is not None:
        profiler.export_chrome_trace(str(trace))
    return wall_ms, profiler.key_averages()


def host_syncs(step: Callable[[], None], device: torch.device) -> collections.Counter:
    """The calls of one ``step`` that synchronise the host with the device, as ``"file:line: message"`` counts.

    torch.cuda's sync debug mode warns at each (``.item()``, a device-to-host copy, a pageable host-to-device
    copy, ...); the warning names the Python line that made the call. Empty on the CPU.
    """
    if device.type != "cuda":
        return collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return collections.Counter(
        f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in caught if "synchroniz" in str(w.message)
    )


def _device_ms(averages, runs: int) -> float:
    return sum(e.self_device_time_total for e in _kernel_events(averages)) / runs / 1e3


def _top_kernels(averages, runs: int, limit: int) -> list[str]:
    kernels = sorted(_kernel_events(averages), key=lambda e: -e.self_device_time_total)[:limit]
    return [f"    {e.self_device_time_total / runs / 1e3:8.3f} ms  x{e.count // runs:<3d} {e.key[:100]}" for e in kernels]


def _print_lines(lines: list[str]) -> None:
    if lines:
        print("\n".join(lines))


def _op_cases(ops: list[str], groups: tuple[str, ...], device: torch.device):
    if device.type != "cuda":
        return [case for op in ops for case in cases(op, ("smoke",))[:1]]
    selected = []
    for op in ops:
        kernel = _TARGET_KERNEL.get(op, 9)
        selected += [c for c in cases(op, groups, (kernel,)) if c.batch in (2, 8)]
    return selected


def profile_ops(args, device: torch.device) -> None:
    dtypes = [getattr(torch, name) for name in comma_list(args.dtypes)]
    # The microbenchmarks' own calls (inputs, output gradient); no roofline here, so no bandwidth or peak.
    env = BenchEnv(device, copy_bytes_per_s=0.0, peak_fp32_flops=None)
    for case in _op_cases(comma_list(args.ops), tuple(comma_list(args.groups)), device):
        for dtype in dtypes:
            for provider in comma_list(args.providers):
                reason = unavailable(provider, device)
                if reason:
                    print(f"{case.id} {provider}: skipped ({reason})")
                    continue
                step = host_call(case, provider, dtype, "fwd+bwd", env)
                wall_ms, averages = profile_step(step, device, args.runs)
                print(f"{case.op} {case.id} {str(dtype).removeprefix('torch.')} {provider} fwd+bwd: "
                      f"wall {wall_ms:.3f} ms/call, device {_device_ms(averages, args.runs):.3f} ms/call")
                _print_lines(_top_kernels(averages, args.runs, 6))


def profile_e2e(args, device: torch.device) -> None:
    if args.trace_dir:
        Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
    settings = argparse.Namespace(smoke=device.type != "cuda", batch=args.batch, image_size=args.image_size)
    for model_key in comma_list(args.models):
        for provider in comma_list(args.providers):
            for pass_ in comma_list(args.passes):
                step, _ = e2e.build_step(model_key, provider, "float32", pass_, settings, device)
                name = f"{model_key}-{provider}-{pass_}"
                trace = Path(args.trace_dir) / f"{name}.json" if args.trace_dir else None
                wall_ms, averages = profile_step(functools.partial(step, None), device, args.runs, trace)
                launches = sum(e.count for e in averages if e.key.startswith("cudaLaunch")) / args.runs
                host_ms = sum(e.self_cpu_time_total for e in averages) / args.runs / 1e3
                print(f"##### {name}: wall {wall_ms:.2f} ms/step; per step under the profiler: host "
                      f"{host_ms:.2f} ms, device {_device_ms(averages, args.runs):.2f} ms, {launches:.0f} launches")
                syncs = host_syncs(functools.partial(step, None), device)
                print(f"host syncs per step: {sum(syncs.values())}" if device.type == "cuda" else
                      "host syncs per step: not checked (CPU)")
                _print_lines([f"    {count:4d}x {where}" for where, count in syncs.most_common(8)])
                print(averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
                _print_lines(_top_kernels(averages, args.runs, 10))
                del step
                e2e.release_memory(device)


class OpCounter(TorchDispatchMode):
    """Counts the ops dispatched inside it: ``total`` and ``computing`` (the ops that are not views)."""

    def __init__(self):
        super().__init__()
        self.total = 0
        self.computing = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        self.computing += not func.is_view
        return func(*args, **(kwargs or {}))


def count_step_ops(model_key: str, kernels: str | None, batch: int, image_size: tuple[int, int],
                   device: torch.device) -> dict[str, OpCounter]:
    """The ops of one training step of a full-size ``model_key`` (``kernels`` "stock" | "fused"; None for DETR),
    by phase (:data:`benchmarks.e2e.STEP_PHASES`), after one uncounted step (lazy initialisation)."""
    torch.manual_seed(0)
    model = e2e.build_model(model_key, "eager" if kernels is None else f"{kernels}-eager").to(device)
    inputs = e2e.synthetic_batch(batch, image_size, device, torch.Generator().manual_seed(0))
    counters: dict[str, OpCounter] = {}
    counting = False

    def phase(name: str) -> contextlib.AbstractContextManager:
        if not counting:
            return contextlib.nullcontext()
        counters[name] = OpCounter()
        return counters[name]

    step = e2e.build_train_step(model_key, model, model, inputs, device, phase=phase)
    step()  # lazy initialisation, not counted
    counting = True
    step()
    return counters


def print_op_counts(args, device: torch.device) -> None:
    from deco_kernels import use_backend
    from deco_kernels.backend import cuda_extension_available

    print(f"aten ops per training step (batch {args.batch}, {args.image_size[0]}x{args.image_size[1]}, {device.type}): "
          "computing ops (all ops, views included)")
    print(f"{'model':10s} {'kernels':8s} " + " ".join(f"{name:>16s}" for name in (*e2e.STEP_PHASES, "step")))
    for model_key in comma_list(args.models):
        for kernels in [None] if model_key == "detr-r50" else comma_list(args.kernels):
            backend = "auto"
            if kernels == "fused" and device.type == "cpu":
                if not cuda_extension_available():
                    print(f"{model_key:10s} {kernels:8s} skipped: the CPU build of the CUDA kernels is not available")
                    continue
                backend = "cuda"  # on the CPU, "auto" would run the fused model's PyTorch reference
            with use_backend(backend):
                counters = count_step_ops(model_key, kernels, args.batch, tuple(args.image_size), device)
            totals = [(c.computing, c.total) for c in counters.values()]
            totals.append((sum(computing for computing, _ in totals), sum(total for _, total in totals)))
            print(f"{model_key:10s} {kernels or '-':8s} "
                  + " ".join(f"{f'{computing} ({total})':>16s}" for computing, total in totals))
            e2e.release_memory(device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.breakdown", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ops = commands.add_parser("ops", help="op calls, fwd+bwd: wall vs device time, kernels ranked")
    ops.add_argument("--ops", default=",".join(OPS), help=f"comma list from {OPS}")
    ops.add_argument("--groups", default="deco,stride8", help="shape groups (GPU; the CPU runs the smoke case)")
    ops.add_argument("--dtypes", default="float32,bfloat16")
    ops.add_argument("--providers", default=",".join(OP_PROVIDERS), help="comma list of benchmark providers")
    ops.add_argument("--runs", type=int, default=10, help="back-to-back calls timed, then profiled")
    steps = commands.add_parser("e2e", help="end-to-end steps: host vs device time, launches, ops and kernels")
    steps.add_argument("--models", default="deco-r18", help=f"comma list from {e2e.MODELS}")
    steps.add_argument("--providers", default="stock-eager,fused-eager", help="comma list of e2e providers")
    steps.add_argument("--passes", default="infer,train_step")
    steps.add_argument("--batch", type=int, default=2, help="training batch (inference uses 1)")
    steps.add_argument("--image-size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    steps.add_argument("--runs", type=int, default=3, help="steps timed, then profiled")
    steps.add_argument("--trace-dir", default=None, help="write one Chrome trace per row here")
    counts = commands.add_parser("counts", help="aten ops per training step of the full-size models, by phase")
    counts.add_argument("--models", default=",".join(e2e.MODELS), help=f"comma list from {e2e.MODELS}")
    counts.add_argument("--kernels", default="stock,fused", help="DECO's kernels: comma list from stock, fused")
    counts.add_argument("--batch", type=int, default=2)
    counts.add_argument("--image-size", type=int, nargs=2, default=(128, 160), metavar=("H", "W"),
                        help="small by default: the counts hardly depend on it")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.command == "ops":
        unknown = sorted(set(comma_list(args.ops)) - set(OPS))
        if unknown:
            raise SystemExit(f"--ops: unknown {unknown}; expected among {OPS}")
        profile_ops(args, device)
    elif args.command == "counts":
        for name, values, allowed in (("--models", comma_list(args.models), e2e.MODELS),
                                      ("--kernels", comma_list(args.kernels), ("stock", "fused"))):
            unknown = sorted(set(values) - set(allowed))
            if unknown:
                raise SystemExit(f"{name}: unknown {unknown}; expected among {allowed}")
        print_op_counts(args, device)
    else:
        if device.type != "cuda":
            args.image_size = (64, 96)
        profile_e2e(args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
