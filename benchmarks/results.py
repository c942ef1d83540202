"""The results file: schema, writing (incremental, so a run cut off by a timeout keeps what it measured),
speed-ups between providers, merging and validation.

A results file is a JSON object::

    {"device": str, "torch": str, "triton": str | null, "date": "YYYY-MM-DD", "command": str, "code": str,
     "copy_gb_per_s": float | null, "peak_fp32_tflops": float | null, "records": [record, ...]}

``code`` is :func:`code_digest` of the measured sources (files written before it existed lack it): a file is
only continued, and files are only merged, where it is the same, so no table mixes rows of two versions of the
kernels or the model.

A microbenchmark record has ``op``, ``group``, ``provider``, ``shape`` (dict), ``dtype``, ``pass`` (fwd, bwd,
fwd+bwd), ``median_ms``, ``p20_ms``, ``p80_ms``, ``runs``, ``gb_per_s``, ``gflop_per_s``, ``roofline_pct``,
``forward_error`` (its output against the float64 stock composition) and ``speedup`` ({baseline provider:
baseline median / this median} for each baseline measured on the same op, shape, dtype, pass and launch);
``first_call_s`` (inputs and the first call: compilation included) and ``row_s`` (the row's measurement, the
first call included) say where a run's time went (files written before they existed lack them).
``launch`` is ``"graph"`` where the call was captured in a CUDA graph and replayed (device time without the
host's launch work; ``benchmarks.timing.measure(graph=True)``); a record without it was launched eagerly.
An end-to-end record has ``model``, ``provider``, ``batch``, ``image_size`` ([H, W]), ``dtype``, ``pass``
(train_step, infer), ``median_ms``, ``p20_ms``, ``p80_ms``, ``runs``, ``images_per_s``, ``peak_mem_gb``,
``first_call_s`` (compilation / capture included) and ``speedup`` (against the stock providers of the same
model).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch

from deco_kernels._source_digest import files_digest

__all__ = [
    "LAUNCHES",
    "ResultsFile",
    "add_speedups",
    "comparison_key",
    "environment",
    "launch_of",
    "load",
    "merge",
    "row_key",
    "split",
    "validate",
]

MICRO_PASSES = ("fwd", "bwd", "fwd+bwd")
# How a microbenchmark call was issued: eager launches (the default, no field) or a replayed CUDA graph.
LAUNCHES = ("eager", "graph")
E2E_PASSES = ("train_step", "infer")
# Fields of every timing record, micro or end to end.
_TIMING_FIELDS = {
    "dtype": str,
    "pass": str,
    "median_ms": float,
    "p20_ms": float,
    "p80_ms": float,
    "runs": int,
}
_MICRO_FIELDS = {
    "op": str,
    "group": str,
    "provider": str,
    "shape": dict,
    **_TIMING_FIELDS,
    "gb_per_s": float,
    "gflop_per_s": float,
    "roofline_pct": float,
    "forward_error": float,
    "speedup": dict,
}
_E2E_FIELDS = {
    "model": str,
    "provider": str,
    "batch": int,
    "image_size": list,
    **_TIMING_FIELDS,
    "images_per_s": float,
    "peak_mem_gb": (float, type(None)),
    "speedup": dict,
}
# A resumed file only takes records of the run it was started by: the same device and software.
_SAME_RUN_FIELDS = ("device", "torch", "triton", "code")
# What a run measures: the kernels (CUDA and Triton), the model, its loss and optimizer.
MEASURED_SOURCES = ("csrc", "deco_kernels", "deco")
_SOURCE_SUFFIXES = (".py", ".cpp", ".cu", ".h")


def code_digest() -> str:
    """The first 12 hex digits of :func:`files_digest` of the sources under :data:`MEASURED_SOURCES` (by path
    within the repository)."""
    root = Path(__file__).resolve().parents[1]
    paths = [path for top in MEASURED_SOURCES for path in (root / top).rglob("*") if path.suffix in _SOURCE_SUFFIXES]
    return files_digest(paths, lambda path: path.relative_to(root).as_posix())[:12]


_TOP_FIELDS = {
    "device": str,
    "torch": str,
    "triton": (str, type(None)),
    "date": str,
    "command": str,
    "records": list,
}


def environment(device: torch.device) -> dict:
    """The top-level fields that say where and how a run was made."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "code": code_digest(),
    }


def launch_of(record: dict) -> str:
    """``"graph"`` for a microbenchmark record timed as CUDA graph replays, else ``"eager"``."""
    return record.get("launch", "eager")


def comparison_key(record: dict) -> tuple:
    """What a record is compared on across providers: the op (or model), shape (or batch and image size),
    dtype and pass, and for microbenchmarks how the call was launched (graph replays compare with graph
    replays)."""
    if "op" in record:
        shape = json.dumps(record["shape"], sort_keys=True)
        return ("op", record["op"], shape, record["dtype"], record["pass"], launch_of(record))
    return ("model", record["model"], record["batch"], tuple(record["image_size"]), record["dtype"], record["pass"])


def row_key(record: dict) -> tuple:
    """What identifies one measurement in a results file: its comparison key and provider."""
    return (*comparison_key(record), record["provider"])


def add_speedups(records: list[dict], baselines: tuple[str, ...]) -> None:
    """Set each record's ``speedup``: for every baseline provider measured on the same op/model, shape, dtype
    and pass, the baseline's median over this record's median."""
    by_key: dict[tuple, dict[str, float]] = {}
    for record in records:
        if record["provider"] in baselines:
            by_key.setdefault(comparison_key(record), {})[record["provider"]] = record["median_ms"]
    for record in records:
        base = by_key.get(comparison_key(record), {})
        record["speedup"] = {name: ms / record["median_ms"] for name, ms in base.items() if name != record["provider"]}


class ResultsFile:
    """Collects records and rewrites the JSON file after each one (atomically: write, then rename).

    With ``resume=True`` an existing file at ``path`` is read first and its records kept, so a run cut off by
    a time limit can be continued by the same command: :meth:`measured` tells which rows it already holds.
    Records are only ever combined from one device and one torch/triton pair; the file keeps the header of its
    first run (date, measured copy bandwidth) and ``command`` lists every run's command. Each microbenchmark
    record carries the roofline floor of its own run (``roofline_floor_ms``).
    """

    def __init__(self, path: str | os.PathLike, header: dict, baselines: tuple[str, ...], resume: bool = False):
        self.path = Path(path)
        self.header = dict(header)
        self.baselines = baselines
        self.records: list[dict] = []
        if resume and self.path.exists():
            previous = load(self.path)
            for field in _SAME_RUN_FIELDS:
                if previous.get(field) != self.header.get(field):
                    raise ValueError(
                        f"{self.path}: cannot resume: its {field} is {previous.get(field)!r}, this run's is "
                        f"{self.header.get(field)!r}; write to another file"
                    )
            command = _joined_commands([previous, self.header])
            self.header = {key: value for key, value in previous.items() if key != "records"}
            self.header["command"] = command
            self.records = previous["records"]
        self._keys = {row_key(record) for record in self.records}

    def measured(self, record: dict) -> bool:
        """True when the file already holds the row of ``record`` (any dict with the fields of :func:`row_key`)."""
        return row_key(record) in self._keys

    def add(self, record: dict) -> None:
        self.records.append(record)
        self._keys.add(row_key(record))
        self.write()

    def write(self) -> None:
        add_speedups(self.records, self.baselines)
        document = {**self.header, "records": self.records}
        validate(document)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(document, indent=1))
        partial.replace(self.path)


def _check_fields(where: str, obj: dict, fields: dict) -> None:
    for name, kind in fields.items():
        if name not in obj:
            raise ValueError(f"{where}: missing field {name!r}")
        value = obj[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, kinds):
            raise ValueError(f"{where}: field {name!r} must be {kind}, got {type(value).__name__} {value!r}")


def validate(document: dict) -> None:
    """Raise ValueError naming the first field that does not follow the schema of the module docstring."""
    if not isinstance(document, dict):
        raise ValueError(f"results: expected a JSON object, got {type(document).__name__}")
    _check_fields("results", document, _TOP_FIELDS)
    if not isinstance(document.get("code", ""), str):
        raise ValueError(f"results: field 'code' must be a string, got {document['code']!r}")
    try:
        datetime.date.fromisoformat(document["date"])
    except ValueError as error:
        raise ValueError(f"results: field 'date' must be YYYY-MM-DD, got {document['date']!r}") from error
    for index, record in enumerate(document["records"]):
        where = f"records[{index}]"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object")
        if "op" in record:
            _check_fields(where, record, _MICRO_FIELDS)
            allowed = MICRO_PASSES
        elif "model" in record:
            _check_fields(where, record, _E2E_FIELDS)
            allowed = E2E_PASSES
        else:
            raise ValueError(f"{where}: a record needs 'op' (microbenchmark) or 'model' (end-to-end)")
        if record["pass"] not in allowed:
            raise ValueError(f"{where}: field 'pass' must be one of {allowed}, got {record['pass']!r}")
        if "launch" in record and ("op" not in record or record["launch"] not in LAUNCHES):
            raise ValueError(f"{where}: field 'launch' is for microbenchmarks, one of {LAUNCHES}; got {record}")
        for name in ("median_ms", "p20_ms", "p80_ms"):
            if not record[name] > 0:
                raise ValueError(f"{where}: field {name!r} must be > 0, got {record[name]!r}")
        if not record["p20_ms"] <= record["median_ms"] <= record["p80_ms"]:
            raise ValueError(f"{where}: expected p20_ms <= median_ms <= p80_ms, got {record}")


def load(path: str | os.PathLike) -> dict:
    """Read and validate a results file."""
    document = json.loads(Path(path).read_text())
    try:
        validate(document)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    return document


def _joined_commands(documents: list[dict]) -> str:
    # A file continued from a merged one already lists the other file's commands: each command once.
    commands = [command for d in documents for command in d["command"].split(" ; ")]
    return " ; ".join(dict.fromkeys(commands))


def merge(documents: list[dict]) -> dict:
    """One results document from several of the same device (e.g. the microbenchmark and e2e files)."""
    if not documents:
        raise ValueError("merge: no results documents given")
    devices = {d["device"] for d in documents}
    if len(devices) != 1:
        raise ValueError(f"merge: results come from different devices {sorted(devices)}; compare within one device")
    codes = {d.get("code") for d in documents}
    if len(codes) != 1:
        raise ValueError(f"merge: results measured different sources (code {sorted(map(str, codes))}); re-measure")
    merged = {key: value for key, value in documents[0].items() if key != "records"}
    merged["command"] = _joined_commands(documents)
    merged["records"] = [record for d in documents for record in d["records"]]
    seen: set[tuple] = set()
    for record in merged["records"]:
        key = row_key(record)
        if key in seen:
            raise ValueError(f"merge: the row {key} is in more than one of the files; merge files of distinct rows")
        seen.add(key)
    validate(merged)
    return merged


def split(document: dict) -> dict[str, dict]:
    """The inverse of :func:`merge` for a GPU session's files: ``{"micro": ..., "e2e": ...}``, each the header
    with the microbenchmark (``op``) or end-to-end (``model``) records, for the kinds the document holds. A later
    session continues a committed results file from these."""
    header = {key: value for key, value in document.items() if key != "records"}
    parts = {
        "micro": [record for record in document["records"] if "op" in record],
        "e2e": [record for record in document["records"] if "model" in record],
    }
    return {kind: {**header, "records": records} for kind, records in parts.items() if records}
