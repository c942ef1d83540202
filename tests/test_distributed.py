"""Data parallel training: `deco train` under torchrun with 2 Gloo processes at per-rank batch b gives the
same weights as one process at batch 2b on the same data."""

import json
import socket
import subprocess
import sys

import pytest
import torch
from subprocess_env import repo_environment

from deco.checkpoint import load_checkpoint
from deco.config import tiny_config
from deco.data.synthetic import write_synthetic_dataset
from deco.models import build_deco

STEPS = 3
PER_RANK_BATCH = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_deco_train(args: list[str], nproc: int, tmp_path) -> None:
    env = repo_environment(OMP_NUM_THREADS="1")
    if nproc == 1:
        command = [sys.executable, "-m", "deco.cli", "train", *args]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "-m", "deco.cli", "train", *args,
        ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_at_the_global_batch(tmp_path):
    data = tmp_path / "data"
    write_synthetic_dataset(data, num_images=10, seed=5, image_size=(64, 64), progress=False)
    config = tiny_config().replace(data=str(data), max_steps=STEPS, lr_drop_epochs=())
    config_file = tmp_path / "tiny.json"
    config_file.write_text(json.dumps(config.to_dict()))

    common = ["--config", str(config_file), "--eval-every", "0"]
    run_deco_train([*common, "--out", str(tmp_path / "ddp"), "--batch-size", str(PER_RANK_BATCH)], 2, tmp_path)
    run_deco_train([*common, "--out", str(tmp_path / "single"), "--batch-size", str(2 * PER_RANK_BATCH)], 1, tmp_path)

    ddp = load_checkpoint(tmp_path / "ddp" / "last.pt")
    single = load_checkpoint(tmp_path / "single" / "last.pt")
    assert ddp["step"] == single["step"] == STEPS
    for name, single_value in single["model"].items():
        ddp_value = ddp["model"][name]
        # Both runs see the same images and the same loss normalisation (num_boxes is averaged over ranks),
        # so the gradients agree up to summation order: DDP sums two per-rank gradients (each a sum over one
        # image) where one process sums both images in one backward. Those rounding differences (~1e-7
        # relative) pass through Adam's m / sqrt(v) normalisation, so a weight can move by a few ulps of
        # lr * steps more or less; rtol 1e-4 / atol 1e-6 (lr 1e-4, 3 steps) bounds that while a wrong
        # data split, batch or loss scale moves weights by ~lr per step (1e-4), far outside it.
        torch.testing.assert_close(ddp_value, single_value, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # Training moved the weights far beyond that tolerance, so the comparison is not trivially true. The
    # initial weights are rebuilt the way Trainer builds them: seed, then build_deco.
    torch.manual_seed(config.seed)
    initial = build_deco(**single["model_config"]).state_dict()
    largest_move = max((single["model"][n] - v).abs().max().item() for n, v in initial.items() if v.is_floating_point())
    assert largest_move > 1e-4
    # `deco train` ends with a COCO evaluation, sharded over the ranks; rank 0 logged it and kept best.pt.
    for run in ("ddp", "single"):
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
        (evaluation,) = [r["eval"] for r in records if "eval" in r]
        assert set(evaluation) >= {"AP", "AP50"} and -1 <= evaluation["AP"] <= 1
        assert load_checkpoint(tmp_path / run / "best.pt")["step"] == STEPS
