"""Byte and FLOP models of every op and pass, and the roofline floor they imply on a device.

The models count the least traffic any implementation needs: each input read once, each output written once
(activations at the benchmark dtype, parameters and their gradients in float32, argmax indices in int64) and
the arithmetic the op defines (one multiply-add = 2 FLOP). The same model is used for every provider, so
"GB/s" and "GFLOP/s" in the results are *effective* rates (model / measured time): an implementation that
re-reads its input still gets credit only for the model's bytes.

The floor of a pass is ``max(bytes / copy_bandwidth, flops / peak_fp32_flops)``: the copy bandwidth is a
device-to-device copy measured in the same run (bytes read + bytes written per second); the FP32 rate is
the FMA peak of the device (all kernels accumulate in float32 with FMAs, bf16 storage included), taken
from the device properties (SMs x FP32 lanes per SM x 2 x clock) unless given explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "PASSES",
    "Cost",
    "adaptive_pool_windows",
    "cost",
    "measure_copy_bandwidth",
    "peak_fp32_flops",
    "roofline_floor_s",
]

PASSES = ("fwd", "bwd", "fwd+bwd")
_PARAM_BYTES = 4  # weight and bias are float32 inside the kernels; their gradients come back float32
_INDEX_BYTES = 8  # adaptive max pool argmax indices are int64 like torch's

# FP32 FMA lanes per SM by compute capability major.minor (CUDA C programming guide, arithmetic throughput).
_FP32_LANES_PER_SM = {(7, 0): 64, (8, 0): 64, (8, 6): 128, (8, 7): 128, (8, 9): 128, (9, 0): 128, (10, 0): 128}


@dataclass(frozen=True)
class Cost:
    """Least bytes moved through device memory and FLOPs of one pass."""

    bytes: float
    flops: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.bytes + other.bytes, self.flops + other.flops)


def adaptive_pool_windows(size: int, out: int) -> list[int]:
    """Lengths of PyTorch's adaptive pooling windows ``[floor(i*size/out), ceil((i+1)*size/out))``."""
    return [-(-(i + 1) * size // out) - (i * size // out) for i in range(out)]


def _depthwise(shape: dict, element_bytes: int, pass_: str) -> Cost:
    b, c, h, w, kh, kw = (shape[k] for k in ("B", "C", "H", "W", "kh", "kw"))
    n = b * c * h * w
    params = c * (kh * kw + 1) * _PARAM_BYTES
    # fwd: read x, write y. bwd: read grad_y and x, write grad_x, grad_weight, grad_bias.
    fwd = Cost(2 * n * element_bytes + params, 2 * n * kh * kw + n)
    bwd = Cost(3 * n * element_bytes + 2 * params, 4 * n * kh * kw + n)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def _depthwise_layernorm(shape: dict, element_bytes: int, pass_: str) -> Cost:
    b, c, h, w, kh, kw = (shape[k] for k in ("B", "C", "H", "W", "kh", "kw"))
    n = b * c * h * w
    params = c * (kh * kw + 3) * _PARAM_BYTES  # conv weight and bias, norm weight and bias
    # fwd: read x, write the B x H x W x C output (the conv output is never written); conv taps + bias, then
    # per element the mean (1 add), the variance (1 subtract + 1 multiply-add) and the normalised affine
    # output (1 subtract, 1 multiply, 1 multiply-add): 8 FLOP.
    fwd = Cost(2 * n * element_bytes + params, 2 * n * kh * kw + n + 8 * n)
    # bwd: read grad_out and x, write grad_x and the parameter gradients. The least-traffic backward
    # recomputes the conv output (taps + bias) and xhat (2), then per element g * norm_weight (1), the two
    # channel sums (1 add, 1 multiply-add), the conv output's gradient (3 + 1 multiply) and the norm
    # parameter sums (1 multiply-add, 1 add): 14 FLOP; then the depthwise backward (grad input + grad weight
    # taps, grad bias).
    bwd = Cost(3 * n * element_bytes + 2 * params, 2 * n * kh * kw + n + 14 * n + 4 * n * kh * kw + n)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def _upsample_add_conv(shape: dict, element_bytes: int, pass_: str) -> Cost:
    b, c, hq, wq, h, w, kh, kw = (shape[k] for k in ("B", "C", "Hq", "Wq", "H", "W", "kh", "kw"))
    n = b * c * h * w
    nq = b * c * hq * wq
    params = c * (kh * kw + 1) * _PARAM_BYTES
    # fwd: read query and memory, write y; conv taps + the two adds + bias.
    fwd = Cost((2 * n + nq) * element_bytes + params, 2 * n * kh * kw + 3 * n)
    # bwd: read grad_y, query, memory; write grad_memory, grad_query (+ parameter grads); transposed conv,
    # weight-gradient taps, and the window sums into the query grid.
    bwd = Cost((3 * n + 2 * nq) * element_bytes + 2 * params, 4 * n * kh * kw + 3 * n)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def _adaptive_pool(shape: dict, element_bytes: int, pass_: str, *, with_indices: bool) -> Cost:
    b, c, h, w, oh, ow = (shape[k] for k in ("B", "C", "H", "W", "oh", "ow"))
    n = b * c * h * w
    n_out = b * c * oh * ow
    window_elements = b * c * sum(adaptive_pool_windows(h, oh)) * sum(adaptive_pool_windows(w, ow))
    out_bytes = n_out * (element_bytes + (_INDEX_BYTES if with_indices else 0))
    # fwd: read x, write y (and argmax); one compare (max) or add (avg) per window element.
    fwd = Cost(n * element_bytes + out_bytes, window_elements)
    # bwd: read grad_y (and argmax), write grad_x; the max pool adds one value per window (routed to its
    # argmax), the average pool spreads every window's value over its elements.
    bwd = Cost(n * element_bytes + out_bytes, n_out if with_indices else window_elements)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def _scale_residual_max_pool(shape: dict, element_bytes: int, pass_: str) -> Cost:
    b, c, h, w, oh, ow = (shape[k] for k in ("B", "C", "H", "W", "oh", "ow"))
    n = b * c * h * w
    n_out = b * c * oh * ow
    window_elements = b * c * sum(adaptive_pool_windows(h, oh)) * sum(adaptive_pool_windows(w, ow))
    gamma = c * _PARAM_BYTES
    # fwd: read z, ffn and gamma, write y and the argmax; one multiply-add per input element (the sum, formed
    # once even where windows overlap) and one compare per window element.
    fwd = Cost(2 * n * element_bytes + gamma + n_out * (element_bytes + _INDEX_BYTES), 2 * n + window_elements)
    # bwd: read grad_y, the argmax, ffn at the argmax and gamma; write grad_z, grad_ffn and grad_gamma. One add
    # per routed window value, one multiply per grad_ffn element, one multiply-add per pooled value for gamma.
    bwd = Cost(2 * n * element_bytes + 2 * gamma + n_out * (2 * element_bytes + _INDEX_BYTES), n + 3 * n_out)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def cost(op: str, shape: dict, dtype: torch.dtype, pass_: str) -> Cost:
    """The byte/FLOP model of ``op`` on ``shape`` (the benchmark case's dict) for one pass."""
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}; got {pass_!r}")
    element_bytes = torch.empty((), dtype=dtype).element_size()
    if op == "depthwise_conv2d":
        return _depthwise(shape, element_bytes, pass_)
    if op == "depthwise_conv2d_layernorm":
        return _depthwise_layernorm(shape, element_bytes, pass_)
    if op == "upsample_add_conv":
        return _upsample_add_conv(shape, element_bytes, pass_)
    if op == "adaptive_max_pool2d":
        return _adaptive_pool(shape, element_bytes, pass_, with_indices=True)
    if op == "adaptive_avg_pool2d":
        return _adaptive_pool(shape, element_bytes, pass_, with_indices=False)
    if op == "scale_residual_max_pool":
        return _scale_residual_max_pool(shape, element_bytes, pass_)
    raise ValueError(f"op has no cost model: {op!r}")


def roofline_floor_s(c: Cost, copy_bytes_per_s: float, peak_flops: float) -> float:
    """Least time of a pass: the slower of moving its bytes and doing its FLOPs."""
    return max(c.bytes / copy_bytes_per_s, c.flops / peak_flops)


def measure_copy_bandwidth(device: torch.device, megabytes: int = 1024, runs: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), median of ``runs`` copies of ``megabytes``.

    The buffer is far larger than any L2, so this is DRAM bandwidth. On the CPU it is the host memcpy rate.
    """
    from benchmarks.timing import measure

    count = megabytes * 2**20 // 4
    source = torch.randn(count, device=device)
    destination = torch.empty_like(source)
    stats = measure(lambda _: destination.copy_(source), device=device, min_runs=runs, max_runs=runs, flush_l2=False)
    return 2 * source.numel() * source.element_size() / (stats.median_ms * 1e-3)


def peak_fp32_flops(device: torch.device) -> float | None:
    """FP32 FMA peak of a CUDA device in FLOP/s from its properties, or None when it cannot be derived."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    lanes = _FP32_LANES_PER_SM.get((props.major, props.minor))
    clock_khz = getattr(props, "clock_rate", None)
    if lanes is None or not clock_khz:
        return None
    return props.multi_processor_count * lanes * 2 * clock_khz * 1e3
