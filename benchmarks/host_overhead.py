"""Host overhead per call: each op on tiny tensors, called back to back, against the stock composition.

``python -m benchmarks.host_overhead [--backends cuda,triton] [--out host.json]``

At DECO's own sizes a kernel runs for tens of microseconds, about as long as the Python that launches it, so
the cost of a call on the host decides whether a fused op is faster in practice. This measures it: every op
on its ``smoke`` case (a few hundred elements, so the kernels themselves take next to nothing), ``fwd`` (with
autograd recording) and ``fwd+bwd`` (``torch.autograd.grad``), as the median over repeated loops of
``--calls`` back-to-back calls (synchronised once per loop), in microseconds per call. Providers: the public
``deco_kernels`` op with each of ``--backends`` (``deco-<backend>``), with "cuda" also through the Python
``autograd.Function`` route instead of its C++ autograd nodes (``deco-cuda-python-route``, see
``deco_kernels/ops/_kernel_op.py``), and the stock composition in eager mode (``eager-nchw``). On a GPU machine
this is the host cost of the launches; on a CPU the kernel backends run their CPU builds, and the numbers compare
routes through Python, not kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from deco_kernels.backend import available_backends
from deco_kernels.ops._kernel_op import python_route

from benchmarks.cases import OPS, cases, comma_list
from benchmarks.providers import make_inputs, provider_function
from benchmarks.results import environment

__all__ = ["main", "measure_calls"]

PASSES = ("fwd", "fwd+bwd")
# The "cuda" backend's calls through the route its C++ autograd nodes replace.
PYTHON_ROUTE = "deco-cuda-python-route"


def measure_calls(call, device: torch.device, calls: int, repeats: int) -> float:
    """Median over ``repeats`` loops of ``calls`` back-to-back calls of the time per call, in microseconds."""
    per_call = []
    for _ in range(repeats + 1):  # the first loop warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(calls):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        per_call.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(per_call[1:])


def _call(op: str, provider: str, pass_: str, device: torch.device):
    (case,) = cases(op, ("smoke",))[:1]
    inputs = make_inputs(case, torch.float32, provider, device)
    fn = provider_function(provider, case, torch.float32)
    args = (*inputs.tensors, *inputs.extra)
    output = fn(*args)
    grad_output = torch.randn_like(output)
    if pass_ == "fwd":
        return lambda: fn(*args)
    return lambda: torch.autograd.grad(fn(*args), inputs.differentiable, grad_output)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backends", default=None, help="comma list of deco backends to measure (default: every kernel backend here)"
    )
    parser.add_argument("--calls", type=int, default=200, help="back-to-back calls per loop")
    parser.add_argument("--repeats", type=int, default=7, help="timed loops (the median is reported)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma list from {OPS}")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = available_backends(device)
    backends = comma_list(args.backends) if args.backends else [b for b in available if b != "torch"] or ["torch"]
    missing = sorted(set(backends) - set(available))
    if missing:
        raise SystemExit(f"--backends: {missing} cannot run on {device} here; available: {list(available)}")
    ops = comma_list(args.ops)
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise SystemExit(f"--ops: unknown {unknown}; expected among {OPS}")
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: thread hand-offs would dominate

    providers = [f"deco-{backend}" for backend in backends] + ["eager-nchw"]
    if "cuda" in backends:
        providers.insert(backends.index("cuda") + 1, PYTHON_ROUTE)
    records = []
    print(f"host overhead on {environment(device)['device']}: microseconds per call, back to back, tiny shapes")
    print(f"{'op':28s} {'pass':8s}" + "".join(f"{p:>24s}" for p in providers))
    for op in ops:
        for pass_ in PASSES:
            row = []
            for provider in providers:
                python = provider == PYTHON_ROUTE
                with python_route() if python else contextlib.nullcontext():
                    call = _call(op, "deco-cuda" if python else provider, pass_, device)
                    us = measure_calls(call, device, args.calls, args.repeats)
                records.append({"op": op, "provider": provider, "pass": pass_, "us_per_call": us})
                row.append(us)
            print(f"{op:28s} {pass_:8s}" + "".join(f"{us:24.1f}" for us in row))
    if args.out:
        document = {**environment(device), "calls": args.calls, "records": records}
        Path(args.out).write_text(json.dumps(document, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
