"""Tables and plots from results files.

``python -m benchmarks.report render RESULTS.json`` writes ``RESULTS.md`` (every record, grouped by op / model)
and ``RESULTS-<op>.png`` / ``RESULTS-e2e.png`` beside the file, then prints the headline table (markdown,
for the README) and the target check. ``python -m benchmarks.report merge A.json B.json -o OUT.json`` joins
files of one device (e.g. the microbenchmark and end-to-end files of a GPU session) into one; ``python -m
benchmarks.report split RESULTS.json --micro M.json --e2e E.json`` takes such a file apart again, so that a
later GPU session continues it (``scripts/gpu_run.sh`` does that with the committed results). ``python -m
benchmarks.report compare BASE.json NEW.json`` sets two runs of one device side by side, row by row: what a
change to the kernels bought, and which rows got slower.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks.cases import OPS
from benchmarks.check_targets import BACKENDS, COMPILE, EAGER, evaluate
from benchmarks.results import launch_of, load, merge, row_key, split

__all__ = ["compare", "headline_table", "main", "render"]

HEADLINE_BATCH = 8


def _shape_text(shape: dict) -> str:
    return " ".join(f"{k}{v}" for k, v in shape.items())


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None:
        return "-"
    return f"{numerator / denominator:.2f}x"


def _speedup_text(speedup: dict, baseline: str) -> str:
    return f"{speedup[baseline]:.2f}x" if baseline in speedup else "-"


def _best(rows: list[dict], providers: tuple[str, ...]) -> float | None:
    times = [r["median_ms"] for r in rows if r["provider"] in providers]
    return min(times) if times else None


def headline_table(records: list[dict], launch: str = "eager") -> str:
    """Markdown: each op at DECO's 25 x 42 decoder map (batch 8, fwd+bwd, every dtype measured) as launched by
    ``launch`` (every provider alike), then (eager only) every end-to-end row. Times in ms (medians); speed-ups
    are the faster eager layout / compile over each backend."""
    lines = [
        "| op / model | shape or batch | dtype | pass | triton ms | cuda ms | best eager ms | compile ms "
        "| triton vs eager | cuda vs eager | triton vs compile | cuda vs compile |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    micro = [
        r
        for r in records
        if "op" in r
        and r["group"] == "deco"
        and r["shape"]["B"] == HEADLINE_BATCH
        and r["pass"] == "fwd+bwd"
        and (r["shape"]["H"], r["shape"]["W"]) == (25, 42)
        and launch_of(r) == launch
    ]
    rows: dict[tuple, list[dict]] = {}
    for r in micro:
        rows.setdefault((OPS.index(r["op"]), json.dumps(r["shape"]), r["dtype"]), []).append(r)
    for (_, shape, dtype), group in sorted(rows.items()):
        triton, cuda = _best(group, BACKENDS["triton"]), _best(group, BACKENDS["cuda"])
        eager, compiled = _best(group, EAGER), _best(group, COMPILE)
        lines.append(
            f"| {group[0]['op']} | {_shape_text(json.loads(shape))} | {dtype} | fwd+bwd | {_ms(triton)} | {_ms(cuda)} "
            f"| {_ms(eager)} | {_ms(compiled)} | {_ratio(eager, triton)} | {_ratio(eager, cuda)} "
            f"| {_ratio(compiled, triton)} | {_ratio(compiled, cuda)} |"
        )
    e2e_lines = [
        "",
        "| model | provider | pass | batch | image | dtype | median ms | images/s | peak GB "
        "| vs stock eager | vs stock compile | vs best stock |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in (r for r in records if "model" in r):
        peak = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.2f}"
        speedup = r.get("speedup", {})
        # Against the row's fastest stock provider; '-' on stock rows (their speedups leave themselves out).
        best_stock = f"{min(speedup.values()):.2f}x" if speedup and not r["provider"].startswith("stock-") else "-"
        e2e_lines.append(
            f"| {r['model']} | {r['provider']} | {r['pass']} | {r['batch']} "
            f"| {r['image_size'][0]}x{r['image_size'][1]} "
            f"| {r['dtype']} | {r['median_ms']:.2f} | {r['images_per_s']:.1f} | {peak} "
            f"| {_speedup_text(speedup, 'stock-eager')} | {_speedup_text(speedup, 'stock-compile')} "
            f"| {best_stock} |"
        )
    if len(e2e_lines) > 3 and launch == "eager":
        lines += e2e_lines
    return "\n".join(lines)


def _graph_headline(records: list[dict]) -> list[str]:
    """The headline's op rows again as CUDA graph replays, where those were measured."""
    if not any("op" in r and launch_of(r) == "graph" for r in records):
        return []
    return [
        "",
        "As CUDA graph replays (every provider captured alike: the kernels' device time, no launch work):",
        "",
        headline_table(records, "graph"),
    ]


def _full_tables(document: dict) -> str:
    out = [
        f"# Benchmark results: {document['device']}",
        "",
        f"torch {document['torch']}, triton {document['triton']}, {document['date']}; "
        f"device-to-device copy {document.get('copy_gb_per_s') or float('nan'):.0f} GB/s, "
        f"FP32 peak {document.get('peak_fp32_tflops') or float('nan'):.1f} TFLOP/s.",
        "",
        f"Command: `{document['command']}`",
        "",
        "## Headline",
        "",
        headline_table(document["records"]),
        *_graph_headline(document["records"]),
        "",
        "## Targets",
        "",
        *[f"- {o.line()}" for o in evaluate(document["records"])],
    ]
    micro = [r for r in document["records"] if "op" in r]
    for op in OPS:
        rows = [r for r in micro if r["op"] == op]
        if not rows:
            continue
        out += [
            "",
            f"## {op}",
            "",
            "| group | shape | dtype | pass | provider | median ms | p20-p80 ms | GB/s | GFLOP/s | roofline % "
            "| fwd error | speed-ups |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            speedups = ", ".join(f"{k} {v:.2f}x" for k, v in r["speedup"].items())
            provider = r["provider"] + (" (graph)" if launch_of(r) == "graph" else "")
            out.append(
                f"| {r['group']} | {_shape_text(r['shape'])} | {r['dtype']} | {r['pass']} | {provider} "
                f"| {r['median_ms']:.4f} | {r['p20_ms']:.4f}-{r['p80_ms']:.4f} | {r['gb_per_s']:.0f} "
                f"| {r['gflop_per_s']:.0f} | {r['roofline_pct']:.1f} | {r['forward_error']:.1e} | {speedups} |"
            )
    out += _run_time_table(micro)
    return "\n".join(out) + "\n"


def _run_time_table(micro: list[dict]) -> list[str]:
    """Where the microbenchmark run's time went, per provider: what the next session's plan needs."""
    timed = [r for r in micro if "row_s" in r]
    if not timed:
        return []
    out = [
        "",
        "## Run time",
        "",
        "Wall time of the measured rows (the first call, compilation included, and the timing itself), per provider.",
        "",
        "| provider | rows | first calls s | rows s |",
        "| --- | --- | --- | --- |",
    ]
    for provider in dict.fromkeys(r["provider"] for r in timed):
        rows = [r for r in timed if r["provider"] == provider]
        out.append(
            f"| {provider} | {len(rows)} | {sum(r['first_call_s'] for r in rows):.0f} "
            f"| {sum(r['row_s'] for r in rows):.0f} |"
        )
    first_calls, whole = sum(r["first_call_s"] for r in timed), sum(r["row_s"] for r in timed)
    out.append(f"| all | {len(timed)} | {first_calls:.0f} | {whole:.0f} |")
    return out


def _plots(document: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    # The plots show eager launches, the calls as a user issues them.
    micro = [r for r in document["records"] if "op" in r and r["pass"] == "fwd+bwd" and launch_of(r) == "eager"]
    for op in OPS:
        rows = [r for r in micro if r["op"] == op]
        labels = sorted({(r["group"], _shape_text(r["shape"]), r["dtype"]) for r in rows})
        if not labels:
            continue
        figure, axis = plt.subplots(figsize=(max(6, 0.5 * len(labels)), 4.5))
        width = 0.8 / (len(BACKENDS) + 1)
        for index, (name, providers) in enumerate([*BACKENDS.items(), ("compile", COMPILE)]):
            ratios = []
            for label in labels:
                group = [r for r in rows if (r["group"], _shape_text(r["shape"]), r["dtype"]) == label]
                fused, eager = _best(group, providers), _best(group, EAGER)
                ratios.append(eager / fused if fused and eager else 0.0)
            axis.bar([i + index * width for i in range(len(labels))], ratios, width, label=name)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks([i + width for i in range(len(labels))])
        axis.set_xticklabels([f"{g}\n{s}\n{d}" for g, s, d in labels], fontsize=6, rotation=90)
        axis.set_ylabel("speed-up over the faster eager layout (fwd+bwd)")
        axis.set_title(f"{op} on {document['device']}")
        axis.legend()
        figure.tight_layout()
        path = stem.with_name(f"{stem.name}-{op}.png")
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    e2e = [r for r in document["records"] if "model" in r]
    if e2e:
        figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(e2e)), 4.5))
        axis.bar(range(len(e2e)), [r["images_per_s"] for r in e2e])
        axis.set_xticks(range(len(e2e)))
        axis.set_xticklabels(
            [f"{r['model']}\n{r['provider']}\n{r['pass']} {r['dtype']}" for r in e2e], fontsize=6, rotation=90
        )
        axis.set_ylabel("images / s")
        axis.set_title(f"end to end on {document['device']}")
        figure.tight_layout()
        path = stem.with_name(f"{stem.name}-e2e.png")
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written


def render(path: str | Path) -> tuple[Path, list[Path]]:
    """Write the markdown tables and plots beside ``path``; returns (markdown path, plot paths)."""
    path = Path(path)
    document = load(path)
    stem = path.with_suffix("")
    markdown = stem.with_suffix(".md")
    markdown.write_text(_full_tables(document))
    return markdown, _plots(document, stem)


def _row_text(record: dict) -> str:
    if "op" in record:
        return f"{record['op']} | {_shape_text(record['shape'])} | {record['dtype']} | {record['pass']}"
    height, width = record["image_size"]
    return f"{record['model']} | B{record['batch']} {height}x{width} | {record['dtype']} | {record['pass']}"


def _launch_text(record: dict) -> str:
    return launch_of(record) if "op" in record else "-"  # end-to-end records have no launch


def _spread_text(record: dict) -> str:
    return f"{record['median_ms']:.3f} ({record['p20_ms']:.3f}-{record['p80_ms']:.3f})"


def compare(base: dict, new: dict, slower: float = 1.1) -> str:
    """Markdown: ``new``'s records against ``base``'s rows of the same op or model, shape, dtype, pass, launch and
    provider. Per op or model, provider and launch, the rows matched and the median, least and greatest ratio of
    new to base median time (below 1: faster now); then every row that took more than ``slower`` times its base
    time, with both runs' 20th-80th percentiles, as a host-bound row's spread can be that wide."""
    if base["device"] != new["device"]:
        raise ValueError(f"compare: the runs are of different devices ({base['device']!r}, {new['device']!r})")
    base_rows = {row_key(record): record for record in base["records"]}
    pairs = [(base_rows[row_key(record)], record) for record in new["records"] if row_key(record) in base_rows]
    groups: dict[tuple[str, str, str], list[float]] = {}
    for old, record in pairs:
        name = record.get("op") or record["model"]
        groups.setdefault((name, record["provider"], _launch_text(record)), []).append(
            record["median_ms"] / old["median_ms"]
        )
    lines = [
        f"{len(pairs)} of the {len(new['records'])} rows of the new run were measured in the base run; "
        "new / base median time (below 1: faster now):",
        "",
        "| op / model | provider | launch | rows | median | least | greatest |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (name, provider, launch), ratios in sorted(groups.items()):
        lines.append(
            f"| {name} | {provider} | {launch} | {len(ratios)} | {statistics.median(ratios):.2f} "
            f"| {min(ratios):.2f} | {max(ratios):.2f} |"
        )
    slow = sorted(
        ((record["median_ms"] / old["median_ms"], old, record) for old, record in pairs
         if record["median_ms"] > slower * old["median_ms"]),
        key=lambda item: -item[0],
    )
    lines += ["", f"Rows over {slower:.2f}x their base time: {len(slow)}"]
    if slow:
        lines += [
            "",
            "| op / model | shape or batch | dtype | pass | provider | launch | base ms (p20-p80) | new ms (p20-p80) "
            "| new / base |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {_row_text(record)} | {record['provider']} | {_launch_text(record)} "
            f"| {_spread_text(old)} | {_spread_text(record)} | {ratio:.2f} |"
            for ratio, old, record in slow
        ]
    return "\n".join(lines)


def _write_json(path: str, document: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(document, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    render_parser = commands.add_parser("render", help="markdown tables + PNG plots beside a results file")
    render_parser.add_argument("results")
    merge_parser = commands.add_parser("merge", help="join results files of one device")
    merge_parser.add_argument("inputs", nargs="+")
    merge_parser.add_argument("-o", "--out", required=True)
    split_parser = commands.add_parser("split", help="a merged file's microbenchmark and end-to-end records apart")
    split_parser.add_argument("results")
    split_parser.add_argument("--micro", help="where to write the microbenchmark records (left out: not written)")
    split_parser.add_argument("--e2e", help="where to write the end-to-end records (left out: not written)")
    compare_parser = commands.add_parser("compare", help="two runs of one device, row by row")
    compare_parser.add_argument("base")
    compare_parser.add_argument("new")
    compare_parser.add_argument(
        "--slower", type=float, default=1.1, help="list the rows over this many times their base time (1.1)"
    )
    args = parser.parse_args(argv)
    if args.command == "compare":
        try:
            print(compare(load(args.base), load(args.new), args.slower))
        except ValueError as error:
            parser.error(str(error))
        return 0
    if args.command == "split":
        parts = split(load(args.results))
        for kind, out in (("micro", args.micro), ("e2e", args.e2e)):
            if out and kind in parts:
                _write_json(out, parts[kind])
                print(f"wrote {out} ({len(parts[kind]['records'])} {kind} records of {args.results})")
        return 0
    if args.command == "merge":
        merged = merge([load(p) for p in args.inputs])
        _write_json(args.out, merged)
        print(f"wrote {args.out} ({len(merged['records'])} records)")
        return 0
    markdown, plots = render(args.results)
    document = load(args.results)
    print(headline_table(document["records"]))
    print("\n".join(_graph_headline(document["records"])))
    print()
    for outcome in evaluate(document["records"]):
        print(outcome.line())
    print(f"\nwrote {markdown} and {len(plots)} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
