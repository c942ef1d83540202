"""A short `deco demo`: it creates the data, trains within its time budget, evaluates and writes its results
and a resumable checkpoint. (No AP threshold here: one minute on a tiny dataset; the full demo is in the README.)"""

import json
import time

from deco.checkpoint import load_checkpoint
from deco.cli import main


def test_short_demo_trains_evaluates_and_writes_results(tmp_path, capsys):
    out = tmp_path / "demo"
    started = time.perf_counter()
    assert main(["demo", "--out", str(out), "--minutes", "0.75", "--num-images", "20", "--image-size", "96"]) == 0
    wall = time.perf_counter() - started
    printed = capsys.readouterr().out
    assert "AP50" in printed and "kernels=stock" in printed

    assert (out / "data" / "instances_train.json").is_file() and (out / "data" / "instances_val.json").is_file()
    result = json.loads((out / "demo_result.json").read_text())
    assert result["steps"] > 0 and result["kernels"] == "stock" and result["device"] == "cpu"
    assert -1 <= result["AP"] <= 1 and -1 <= result["AP50"] <= 1 and len(result["metrics"]) == 12
    # The budget bounds the whole run (a generous margin for a loaded machine: evaluation is not cut short).
    assert result["wall_seconds"] <= wall and wall < 0.75 * 60 + 120

    checkpoint = load_checkpoint(out / "run" / "last.pt")
    assert checkpoint["step"] == result["steps"]
    assert checkpoint["model_config"]["backbone"] == "resnet18" and checkpoint["model_config"]["kernels"] == "stock"
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in records)
    assert [r["eval"]["AP50"] for r in records if "eval" in r] == [result["AP50"]]
    assert load_checkpoint(out / "run" / "best.pt")["step"] == result["steps"]
