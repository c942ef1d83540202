"""Timing of one benchmarked call: CUDA events around each run with the L2 cache flushed before it.

``measure(run, setup=...)`` calls ``state = setup()`` outside the timed region (for a backward pass: the
forward that builds the graph), then flushes L2 (writes a buffer twice the L2 size), then times ``run(state)``
between two CUDA events. After warm-up it repeats until ``rep_ms`` of measured time or ``max_runs`` and
reports the median and the 20th/80th percentiles. On the CPU the same loop uses the host clock (for the smoke
run only: CPU timings are not benchmark results).

``measure(run, device=..., graph=True)`` times the same call captured once in a CUDA graph and replayed: the device
time of its kernels without the host's launch work in between, which is what a caller that captures its step
(CUDA graphs, ``torch.compile(mode="reduce-overhead")``) pays. Where one call's host work exceeds its kernels'
time (small batches), the two timings differ and say by how much the host decides.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["GraphCaptureError", "Stats", "capture_graph", "measure"]


@dataclass(frozen=True)
class Stats:
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int


def _percentile(sorted_values: list[float], q: float) -> float:
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _stats(times_ms: list[float]) -> Stats:
    ordered = sorted(times_ms)
    return Stats(statistics.median(ordered), _percentile(ordered, 0.2), _percentile(ordered, 0.8), len(ordered))


_flush_buffers: dict[torch.device, torch.Tensor] = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    if device not in _flush_buffers:
        l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20
        _flush_buffers[device] = torch.empty(2 * l2_bytes, dtype=torch.int8, device=device)
    return _flush_buffers[device]


def measure(
    run: Callable[[object], object],
    setup: Callable[[], object] | None = None,
    *,
    device: torch.device,
    rep_ms: float = 50.0,
    warmup_runs: int = 3,
    min_runs: int = 10,
    max_runs: int = 200,
    flush_l2: bool = True,
    graph: bool = False,
) -> Stats:
    """Median and spread of ``run(setup())`` over repeated runs; see the module docstring.

    With ``graph=True`` (a CUDA device, no ``setup``) the warm-up runs on a side stream, as capture requires
    (lazy initialisation, cuDNN and Triton autotuning, compilation happen there), then one ``run(None)`` is
    captured in a CUDA graph and its replays are timed like eager runs, L2 flushed before each; a call that
    cannot be captured raises :class:`GraphCaptureError`.
    """
    if graph:
        if device.type != "cuda" or setup is not None:
            raise ValueError(f"measure: graph=True needs a CUDA device and no setup; got {device}, setup={setup}")
        return _measure_graph(run, device, rep_ms, warmup_runs, min_runs, max_runs, flush_l2)
    setup = setup or (lambda: None)
    for _ in range(warmup_runs):
        run(setup())
    if device.type == "cuda":
        return _measure_cuda(run, setup, device, rep_ms, min_runs, max_runs, flush_l2)
    times = []
    started = time.perf_counter()
    while len(times) < min_runs or (len(times) < max_runs and (time.perf_counter() - started) * 1e3 < rep_ms):
        state = setup()
        begin = time.perf_counter()
        run(state)
        times.append((time.perf_counter() - begin) * 1e3)
    return _stats(times)


def _measure_cuda(run, setup, device, rep_ms, min_runs, max_runs, flush_l2) -> Stats:
    flush = _l2_flush_buffer(device) if flush_l2 else None
    times: list[float] = []
    total_ms = 0.0
    batch = min_runs
    while True:
        events = []
        for _ in range(batch):
            state = setup()
            if flush is not None:
                flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(state)
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        batch_times = [start.elapsed_time(end) for start, end in events]
        times.extend(batch_times)
        total_ms += sum(batch_times)
        if total_ms >= rep_ms or len(times) >= max_runs:
            return _stats(times)
        # Enough further runs to reach rep_ms at the rate seen so far, within max_runs.
        per_run = max(total_ms / len(times), 1e-3)
        batch = max(1, min(max_runs - len(times), int((rep_ms - total_ms) / per_run) + 1))


class GraphCaptureError(RuntimeError):
    """The call cannot be captured in a CUDA graph (it synchronises with the host, or allocates outside the
    graph's memory pool)."""


def capture_graph(run: Callable[[], object], device: torch.device, warmup_runs: int) -> torch.cuda.CUDAGraph:
    """``run()`` captured in a CUDA graph, after ``warmup_runs`` calls on a side stream (as capture requires: lazy
    initialisation, cuDNN and Triton autotuning and compilation happen there). Raises :class:`GraphCaptureError`
    when the call cannot be captured. Autograd and autocast modes are the caller's (autocast with
    ``cache_enabled=False``: its weight cache cannot outlive a capture)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup_runs):
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            run()
    except RuntimeError as error:
        raise GraphCaptureError(f"the call cannot be captured in a CUDA graph: {error}") from error
    return graph


def _measure_graph(run, device, rep_ms, warmup_runs, min_runs, max_runs, flush_l2) -> Stats:
    graph = capture_graph(lambda: run(None), device, warmup_runs)
    try:
        graph.replay()
        return _measure_cuda(lambda _: graph.replay(), lambda: None, device, rep_ms, min_runs, max_runs, flush_l2)
    finally:
        torch.cuda.synchronize(device)  # every replay done before the graph and its memory pool go
