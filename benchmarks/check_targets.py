"""Check a results file against the speed targets of the kernels issue; prints each as met / missed / no data.

``python -m benchmarks.check_targets RESULTS.json [...]`` (several files are merged first). Exit status 0
whatever the outcome: this reports, it does not gate.

For each target the ratio is computed per row (op or model, shape, dtype) and the *worst* row decides, so
"met" means met everywhere the target applies. The fused side is each deco backend separately (Triton, CUDA),
each at its better memory layout; "eager" is the faster of the NCHW and channels-last eager runs; "compile"
the faster of the compile modes measured. End to end, "stock" and "fused" are each the fastest of their
providers (eager, compiled, graphed; NCHW or channels-last).

The microbenchmark targets are judged on eagerly launched calls, and again, marked "[graph replay]", on calls
replayed from CUDA graphs where those were measured (``--bench-launches graph``): the kernels' device time,
without the host work that bounds small batches in eager mode.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from benchmarks.cases import LARGE_GROUPS
from benchmarks.e2e import DECO_PROVIDERS, STOCK_PROVIDERS
from benchmarks.results import comparison_key, launch_of, load, merge

__all__ = ["Outcome", "evaluate", "is_target_row"]

EAGER = ("eager-nchw", "eager-cl")
COMPILE = ("compile", "compile-max-autotune")
BACKENDS = {"triton": ("deco-triton", "deco-triton-cl"), "cuda": ("deco-cuda", "deco-cuda-cl")}
FUSED_MODEL_PROVIDERS = tuple(provider for provider in DECO_PROVIDERS if provider not in STOCK_PROVIDERS)


@dataclass(frozen=True)
class Outcome:
    target: str
    threshold: float
    unit: str  # "x" (speed-up) or "%" (of the roofline floor)
    side: str  # which fused implementation
    worst: float | None
    worst_row: str
    rows: int

    @property
    def status(self) -> str:
        if self.worst is None:
            return "NO DATA"
        return "MET" if self.worst >= self.threshold else "MISSED"

    def line(self) -> str:
        if self.worst is None:
            return f"[NO DATA] {self.target} ({self.side}): nothing measured"
        measured = f"{self.worst:.2f}{self.unit}"
        return (
            f"[{self.status}] {self.target} ({self.side}): worst {measured} vs target {self.threshold:g}{self.unit} "
            f"over {self.rows} rows (worst: {self.worst_row})"
        )


def _best(records: list[dict], providers: tuple[str, ...]) -> dict[tuple, float]:
    """Least median per row over ``providers``."""
    best: dict[tuple, float] = {}
    for record in records:
        if record["provider"] in providers:
            key = comparison_key(record)
            best[key] = min(best.get(key, float("inf")), record["median_ms"])
    return best


def _row_text(key: tuple) -> str:
    """A comparison key as the worst row's text; the launch is in the target's label already."""
    return " ".join(map(str, key[1:-1] if key[0] == "op" else key[1:]))


def _speedup_outcomes(
    target: str, threshold: float, records: list[dict], baseline: tuple[str, ...], sides: dict[str, tuple[str, ...]]
) -> list[Outcome]:
    base = _best(records, baseline)
    outcomes = []
    for side, providers in sides.items():
        fused = _best(records, providers)
        ratios = {key: base[key] / fused[key] for key in fused if key in base}
        if not ratios:
            outcomes.append(Outcome(target, threshold, "x", side, None, "", 0))
            continue
        key = min(ratios, key=ratios.get)
        outcomes.append(Outcome(target, threshold, "x", side, ratios[key], _row_text(key), len(ratios)))
    return outcomes


# The microbenchmark rows each speed-up target is judged on (all fwd+bwd): depthwise 9x9 at the DECO decoder
# map (25 x 42) and the stride-8 map; the CIM front and the adaptive max pool wherever they are measured.
SPEEDUP_TARGET_OPS = ("depthwise_conv2d", "upsample_add_conv", "adaptive_max_pool2d")


def is_target_row(op: str, group: str, shape: dict, pass_: str) -> bool:
    """True for a microbenchmark row that a speed-up target of the issue is judged on."""
    if pass_ != "fwd+bwd" or op not in SPEEDUP_TARGET_OPS:
        return False
    if op != "depthwise_conv2d":
        return True
    at_deco_map = group == "deco" and (shape["H"], shape["W"]) == (25, 42)
    return shape["kh"] == shape["kw"] == 9 and (at_deco_map or group == "stride8")


def _target_rows(records: list[dict], op: str) -> list[dict]:
    return [r for r in records if r.get("op") == op and is_target_row(op, r["group"], r["shape"], r["pass"])]


def _roofline_outcomes(records: list[dict], suffix: str) -> list[Outcome]:
    target = "large shapes >= 70% of the roofline floor" + suffix
    outcomes = []
    for side, providers in BACKENDS.items():
        best: dict[tuple, float] = {}
        for r in records:
            if "op" in r and r["group"] in LARGE_GROUPS and r["provider"] in providers:
                key = comparison_key(r)
                best[key] = max(best.get(key, 0.0), r["roofline_pct"])
        if not best:
            outcomes.append(Outcome(target, 70, "%", side, None, "", 0))
            continue
        key = min(best, key=best.get)
        outcomes.append(
            Outcome(
                target,
                70,
                "%",
                side,
                best[key],
                _row_text(key),
                len(best),
            )
        )
    return outcomes


GRAPH_REPLAY = " [graph replay]"


def _micro_outcomes(records: list[dict], suffix: str) -> list[Outcome]:
    """The microbenchmark targets over ``records`` (of one launch mode), each label ending in ``suffix``."""
    depthwise, cim, max_pool = (_target_rows(records, op) for op in SPEEDUP_TARGET_OPS)
    outcomes = []
    for target, threshold, rows, baseline in (
        ("depthwise 9x9 fwd+bwd >= 2x faster eager layout", 2.0, depthwise, EAGER),
        ("depthwise 9x9 fwd+bwd >= 1.5x torch.compile", 1.5, depthwise, COMPILE),
        ("CIM front (upsample_add_conv) fwd+bwd >= 3x eager", 3.0, cim, EAGER),
        ("CIM front (upsample_add_conv) fwd+bwd >= 2x torch.compile", 2.0, cim, COMPILE),
        ("adaptive max pool fwd+bwd >= 2x eager", 2.0, max_pool, EAGER),
    ):
        outcomes += _speedup_outcomes(target + suffix, threshold, rows, baseline, BACKENDS)
    outcomes += _roofline_outcomes(records, suffix)
    return outcomes


def evaluate(records: list[dict]) -> list[Outcome]:
    """Every target of the issue over ``records`` (microbenchmark and end-to-end)."""
    micro = [r for r in records if "op" in r]
    outcomes = _micro_outcomes([r for r in micro if launch_of(r) == "eager"], "")
    graphed = [r for r in micro if launch_of(r) == "graph"]
    if graphed:
        outcomes += _micro_outcomes(graphed, GRAPH_REPLAY)

    r18_train = [r for r in records if r.get("model") == "DECO-R18" and r["pass"] == "train_step"]
    outcomes += _speedup_outcomes(
        "DECO-R18 train step >= 1.5x best stock",
        1.5,
        r18_train,
        STOCK_PROVIDERS,
        {"fused (eager, compiled or graphed; NCHW or channels-last)": FUSED_MODEL_PROVIDERS},
    )
    # DECO-R50 against DETR-R50 (its best provider): different models, so rows are matched on batch, image
    # size, dtype and pass.
    inference = []
    for r in records:
        if r.get("pass") == "infer" and r.get("model") in ("DECO-R50", "DETR-R50"):
            provider = "detr" if r["model"] == "DETR-R50" else r["provider"]
            inference.append({**r, "model": "R50 inference", "provider": provider})
    outcomes += _speedup_outcomes(
        "DECO-R50 inference >= 1.5x DETR-R50",
        1.5,
        inference,
        ("detr",),
        {"fused DECO-R50 (eager, compiled or graphed; NCHW or channels-last)": FUSED_MODEL_PROVIDERS},
    )
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.check_targets", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results JSON files (merged when several)")
    args = parser.parse_args(argv)
    document = merge([load(path) for path in args.results])
    print(f"targets on {document['device']} (torch {document['torch']}, triton {document['triton']}):")
    for outcome in evaluate(document["records"]):
        print(outcome.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
