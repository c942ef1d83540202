"""The benchmark matrix: shapes per op, grouped by where they occur, and the options that select subsets.

Groups: ``deco`` (decoder maps of DECO at 800x1333: C 480, stride 32 = 25 x 42, batch 2/8/32; the SIM's
10 x 10 query map; for depthwise_conv2d_layernorm also the last encoder stage, C 480 7x7), ``deco-enc``
(encoder widths 120/240 at 25 x 42, 7x7), ``stride16`` (50 x 84) and ``stride8`` (100 x 167) maps of the
multi-scale DECO+ (C 256, batch 8) with kernels 7, 9, 13, 31 (7 and 9 for depthwise_conv2d_layernorm).
``smoke`` holds tiny shapes for the CPU run in CI. Each case's ``shape`` dict has the keys the cost model
of :mod:`benchmarks.roofline` reads.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Case", "GROUPS", "LARGE_GROUPS", "OPS", "cases", "comma_list"]

OPS = (
    "depthwise_conv2d",
    "depthwise_conv2d_layernorm",
    "upsample_add_conv",
    "adaptive_max_pool2d",
    "adaptive_avg_pool2d",
    "scale_residual_max_pool",
)
GROUPS = ("deco", "deco-enc", "stride16", "stride8", "smoke")
LARGE_GROUPS = ("stride16", "stride8")  # bandwidth/arithmetic-bound: where the roofline target applies

DECO_HW = (25, 42)
DECO_BATCHES = (2, 8, 32)
QUERY_GRID = (10, 10)
MULTISCALE = {"stride16": (50, 84), "stride8": (100, 167)}
MULTISCALE_BATCH, MULTISCALE_CHANNELS = 8, 256
MULTISCALE_KERNELS = (7, 9, 13, 31)


@dataclass(frozen=True)
class Case:
    op: str
    group: str
    shape: tuple[tuple[str, int], ...]  # ordered (key, value) pairs; hashable so a case can key caches

    @property
    def dims(self) -> dict[str, int]:
        return dict(self.shape)

    @property
    def kernel(self) -> int | None:
        return self.dims.get("kh")

    @property
    def batch(self) -> int:
        return self.dims["B"]

    @property
    def id(self) -> str:
        return f"{self.group}-" + "-".join(f"{k}{v}" for k, v in self.shape)


def _case(op: str, group: str, **shape: int) -> Case:
    return Case(op, group, tuple(shape.items()))


def _depthwise_cases() -> list[Case]:
    h, w = DECO_HW
    found = [_case("depthwise_conv2d", "deco", B=b, C=480, H=h, W=w, kh=9, kw=9) for b in DECO_BATCHES]
    found += [_case("depthwise_conv2d", "deco", B=b, C=480, H=10, W=10, kh=9, kw=9) for b in DECO_BATCHES]
    found += [
        _case("depthwise_conv2d", "deco-enc", B=b, C=c, H=h, W=w, kh=7, kw=7) for c in (120, 240) for b in DECO_BATCHES
    ]
    for group, (mh, mw) in MULTISCALE.items():
        found += [
            _case("depthwise_conv2d", group, B=MULTISCALE_BATCH, C=MULTISCALE_CHANNELS, H=mh, W=mw, kh=k, kw=k)
            for k in MULTISCALE_KERNELS
        ]
    found += [
        _case("depthwise_conv2d", "smoke", B=2, C=5, H=7, W=9, kh=3, kw=3),
        _case("depthwise_conv2d", "smoke", B=1, C=3, H=6, W=5, kh=9, kw=9),
    ]
    return found


def _depthwise_layernorm_cases() -> list[Case]:
    """The front of every encoder block (7x7 at C 120/240/480) and SIM (9x9 on the 10 x 10 query map), and the
    DECO+ encoder's blocks (C 256, 7x7) at the multi-scale sizes."""
    h, w = DECO_HW
    op = "depthwise_conv2d_layernorm"
    found = [_case(op, "deco", B=b, C=480, H=h, W=w, kh=7, kw=7) for b in DECO_BATCHES]
    found += [_case(op, "deco", B=b, C=480, H=10, W=10, kh=9, kw=9) for b in DECO_BATCHES]
    found += [_case(op, "deco-enc", B=b, C=c, H=h, W=w, kh=7, kw=7) for c in (120, 240) for b in DECO_BATCHES]
    found += [
        _case(op, group, B=MULTISCALE_BATCH, C=MULTISCALE_CHANNELS, H=mh, W=mw, kh=k, kw=k)
        for group, (mh, mw) in MULTISCALE.items()
        for k in (7, 9)
    ]
    found += [
        _case(op, "smoke", B=2, C=5, H=7, W=9, kh=3, kw=3),
        _case(op, "smoke", B=1, C=3, H=6, W=5, kh=9, kw=9),
    ]
    return found


def _upsample_add_conv_cases() -> list[Case]:
    qh, qw = QUERY_GRID
    h, w = DECO_HW
    op = "upsample_add_conv"
    found = [_case(op, "deco", B=b, C=480, Hq=qh, Wq=qw, H=h, W=w, kh=9, kw=9) for b in DECO_BATCHES]
    for group, (mh, mw) in MULTISCALE.items():
        found += [
            _case(op, group, B=MULTISCALE_BATCH, C=MULTISCALE_CHANNELS, Hq=qh, Wq=qw, H=mh, W=mw, kh=k, kw=k)
            for k in (9, 13)
        ]
    found.append(_case(op, "smoke", B=2, C=4, Hq=3, Wq=3, H=7, W=8, kh=3, kw=3))
    return found


# The pools and the CIM back end (max pool of z + gamma * ffn, z and ffn B x H x W x C) share these shapes.
def _pool_cases(op: str) -> list[Case]:
    qh, qw = QUERY_GRID
    h, w = DECO_HW
    found = [_case(op, "deco", B=b, C=480, H=h, W=w, oh=qh, ow=qw) for b in DECO_BATCHES]
    found += [
        _case(op, group, B=MULTISCALE_BATCH, C=MULTISCALE_CHANNELS, H=mh, W=mw, oh=qh, ow=qw)
        for group, (mh, mw) in MULTISCALE.items()
    ]
    found.append(_case(op, "smoke", B=2, C=3, H=13, W=11, oh=4, ow=4))
    return found


def cases(
    op: str,
    groups: tuple[str, ...],
    kernels: tuple[int, ...] | None = None,
    batches: tuple[int, ...] | None = None,
) -> list[Case]:
    """The cases of ``op`` in ``groups``, optionally only those with kernel size / batch in the given sets."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}; got {op!r}")
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"groups must be among {GROUPS}; got {sorted(unknown)}")
    every = {
        "depthwise_conv2d": _depthwise_cases,
        "depthwise_conv2d_layernorm": _depthwise_layernorm_cases,
        "upsample_add_conv": _upsample_add_conv_cases,
        "adaptive_max_pool2d": lambda: _pool_cases("adaptive_max_pool2d"),
        "adaptive_avg_pool2d": lambda: _pool_cases("adaptive_avg_pool2d"),
        "scale_residual_max_pool": lambda: _pool_cases("scale_residual_max_pool"),
    }[op]()
    return [
        c
        for c in every
        if c.group in groups
        and (kernels is None or c.kernel is None or c.kernel in kernels)
        and (batches is None or c.batch in batches)
    ]


def comma_list(text: str) -> list[str]:
    """The items of a comma-separated command-line value, stripped, empty ones dropped."""
    return [v.strip() for v in text.split(",") if v.strip()]
