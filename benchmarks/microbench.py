"""One microbenchmark measurement: a (case, provider, dtype, pass) -> a result record.

Passes: ``fwd`` times the forward with autograd recording (as in training); ``bwd`` times
``torch.autograd.grad`` of a forward made outside the timed region; ``fwd+bwd`` times both. The gradient of
the output is a fixed random tensor in the output's memory format. Launches: ``eager`` times the calls as
issued; ``graph`` times replays of one call captured in a CUDA graph (``fwd`` and ``fwd+bwd`` only: ``bwd``
needs a new forward before every run).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from deco_kernels import reference

from benchmarks import roofline
from benchmarks.cases import Case
from benchmarks.providers import make_inputs, provider_function
from benchmarks.results import LAUNCHES
from benchmarks.timing import measure

__all__ = ["BenchEnv", "forward_error", "graph_unavailable", "host_call", "prepare", "run_record"]


@dataclass
class BenchEnv:
    """What every measurement of a run shares."""

    device: torch.device
    copy_bytes_per_s: float
    peak_fp32_flops: float | None
    rep_ms: float = 25.0
    flush_l2: bool = True
    compile_backend: str = "inductor"


def _timed_calls(fn, inputs, grad_output, pass_):
    args = (*inputs.tensors, *inputs.extra)

    def forward(_=None):
        return fn(*args)

    def backward(output):
        return torch.autograd.grad(output, inputs.differentiable, grad_output)

    def forward_backward(_=None):
        return backward(fn(*args))

    if pass_ == "fwd":
        return forward, None
    if pass_ == "bwd":
        return backward, forward
    return forward_backward, None


def prepare(case: Case, provider: str, dtype: torch.dtype, pass_: str, env: BenchEnv):
    """``(run, setup, output)`` of one combination: ``run`` and ``setup`` (may be None) for
    :func:`benchmarks.timing.measure`, and the forward output of a first call."""
    if pass_ not in roofline.PASSES:
        raise ValueError(f"pass_ must be one of {roofline.PASSES}; got {pass_!r}")
    inputs = make_inputs(case, dtype, provider, env.device)
    fn = provider_function(provider, case, dtype, env.compile_backend)
    # With autograd on, like the timed calls: a no_grad call would make torch.compile build a second graph.
    output = fn(*inputs.tensors, *inputs.extra).detach()
    generator = torch.Generator().manual_seed(1)
    grad_output = torch.randn(output.shape, generator=generator).to(env.device, dtype)
    grad_output = grad_output.contiguous(memory_format=_memory_format(output))
    run, setup = _timed_calls(fn, inputs, grad_output, pass_)
    return run, setup, output


@functools.lru_cache(maxsize=1)
def _float64_reference(case: Case, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, float]:
    # Providers are the innermost loop and draw the same input values: one reference serves them all.
    inputs = make_inputs(case, dtype, "eager-nchw", device)
    upcast = [t.detach().to(torch.float64) for t in inputs.tensors]
    with torch.no_grad():
        expected = getattr(reference, case.op)(*upcast, *inputs.extra)
    return expected, max(1.0, expected.abs().max().item())


def forward_error(case: Case, dtype: torch.dtype, output: torch.Tensor) -> float:
    """max |output - ref| / max(1, max |ref|) against the float64 stock composition on the same inputs."""
    expected, scale = _float64_reference(case, dtype, output.device)
    return (output.to(torch.float64) - expected).abs().max().item() / scale


def host_call(case: Case, provider: str, dtype: torch.dtype, pass_: str, env: BenchEnv):
    """One call of the combination, setup included, as a zero-argument callable."""
    run, setup, _ = prepare(case, provider, dtype, pass_, env)
    return _with_setup(run, setup)


def _with_setup(run, setup):
    return lambda: run(setup() if setup else None)


def graph_unavailable(pass_: str, device: torch.device) -> str | None:
    """Why a ``pass_`` call cannot be timed as CUDA graph replays on ``device``, or None."""
    if device.type != "cuda":
        return "CUDA graph replay needs a CUDA device"
    if pass_ == "bwd":
        return "CUDA graph replay times fwd and fwd+bwd (bwd needs a new forward before every run)"
    return None


def run_record(
    case: Case, provider: str, dtype: torch.dtype, pass_: str, env: BenchEnv, launch: str = "eager"
) -> tuple[dict, Callable[[], object]]:
    """Measure one combination: its record (see :mod:`benchmarks.results` for the fields) and the measured call
    as a zero-argument callable, setup included (pytest-benchmark's cross-check runs it on the same inputs).

    ``launch="graph"`` times CUDA graph replays of the call (:func:`benchmarks.timing.measure`, which raises
    :class:`benchmarks.timing.GraphCaptureError` when the call cannot be captured).
    """
    if launch not in LAUNCHES:
        raise ValueError(f"launch must be one of {LAUNCHES}; got {launch!r}")
    reason = graph_unavailable(pass_, env.device) if launch == "graph" else None
    if reason:
        raise ValueError(f"launch='graph' for {case.id} {pass_}: {reason}")
    started = time.perf_counter()
    run, setup, output = prepare(case, provider, dtype, pass_, env)
    _synchronize(env.device)
    first_call_s = time.perf_counter() - started
    # A fast but wrong kernel must not make a benchmark row: every measured output is checked.
    error = forward_error(case, dtype, output)
    del output
    stats = measure(run, setup, device=env.device, rep_ms=env.rep_ms, flush_l2=env.flush_l2, graph=launch == "graph")
    _synchronize(env.device)
    row_s = time.perf_counter() - started

    model = roofline.cost(case.op, case.dims, dtype, pass_)
    seconds = stats.median_ms * 1e-3
    floor_s = roofline.roofline_floor_s(model, env.copy_bytes_per_s, env.peak_fp32_flops or float("inf"))
    record = {
        "op": case.op,
        "group": case.group,
        "provider": provider,
        "shape": case.dims,
        "dtype": str(dtype).removeprefix("torch."),
        "pass": pass_,
        "median_ms": stats.median_ms,
        "p20_ms": stats.p20_ms,
        "p80_ms": stats.p80_ms,
        "runs": stats.runs,
        "forward_error": error,
        "model_bytes": model.bytes,
        "model_flops": model.flops,
        "gb_per_s": model.bytes / seconds / 1e9,
        "gflop_per_s": model.flops / seconds / 1e9,
        "roofline_floor_ms": floor_s * 1e3,
        "roofline_pct": 100.0 * floor_s / seconds,
        **({"launch": launch} if launch != "eager" else {}),
        "first_call_s": first_call_s,
        "row_s": row_s,
    }
    return record, _with_setup(run, setup)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory_format(tensor: torch.Tensor) -> torch.memory_format:
    if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
