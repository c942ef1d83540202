"""Exact resumption: N steps straight == N1 steps + checkpoint + resume in a fresh Trainer + the rest,
bitwise on the CPU (weights, optimizer state, lr schedule); checkpoint contents; atomic writes; Ctrl-C."""

import os

import pytest
import torch

from deco.checkpoint import load_checkpoint, save_checkpoint
from deco.config import tiny_config
from deco.data.synthetic import write_synthetic_dataset
from deco.engine import Trainer

TOTAL_STEPS = 8  # 10 train images at batch 2: 5 steps per epoch, the lr drops at step 5
FIRST_STEPS = 3  # resume in the middle of epoch 0, before the drop


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, num_images=12, seed=3, image_size=(64, 64), progress=False)
    return root


def config_for(data_dir, out, **changes):
    # Random flips and random 56/64 px resizes, so the augmentation state matters for exactness.
    return tiny_config().replace(
        data=str(data_dir), out=str(out), train_scales=(56, 64), crop_range=(48, 64), **changes
    )


def assert_states_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), f"{what}: {key} differs"
        elif isinstance(a[key], dict):
            assert_states_equal(a[key], b[key], f"{what}.{key}")
        elif isinstance(a[key], list):
            assert len(a[key]) == len(b[key]), f"{what}: {key}"
            for i, (x, y) in enumerate(zip(a[key], b[key])):
                if isinstance(x, dict):
                    assert_states_equal(x, y, f"{what}.{key}[{i}]")
                else:
                    assert x == y, f"{what}: {key}[{i}]"
        else:
            assert a[key] == b[key], f"{what}: {key}"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_resume_is_bitwise_exact(data_dir, tmp_path, channels_last):
    straight = Trainer(config_for(data_dir, tmp_path / "straight", max_steps=TOTAL_STEPS, channels_last=channels_last))
    assert straight.steps_per_epoch == 5
    stem = next(p for p in straight.model.parameters() if p.dim() == 4)  # 64 x 3 x 7 x 7
    assert stem.is_contiguous(memory_format=torch.channels_last) == channels_last != stem.is_contiguous()
    straight.fit()
    assert straight.step == TOTAL_STEPS and straight.epoch == 1

    first = Trainer(config_for(data_dir, tmp_path / "split", max_steps=FIRST_STEPS, channels_last=channels_last))
    first.fit()
    checkpoint_path = tmp_path / "split" / "last.pt"
    checkpoint = load_checkpoint(checkpoint_path)
    assert (checkpoint["step"], checkpoint["epoch"], checkpoint["epoch_step"]) == (FIRST_STEPS, 0, FIRST_STEPS)
    assert checkpoint["sampler"] == {"seed": 42, "epoch": 0, "start": 2 * FIRST_STEPS, "shuffle": True}
    for key in ("model", "optimizer", "lr_scheduler", "rng", "model_config", "categories", "config"):
        assert key in checkpoint
    assert set(checkpoint["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert [c["name"] for c in checkpoint["categories"]] == ["rectangle", "ellipse", "triangle"]
    assert checkpoint["model_config"]["num_classes"] == 3 and checkpoint["model_config"]["d_model"] == 32

    del first
    torch.manual_seed(12345)  # a fresh process would not share the first run's generator state
    resumed = Trainer(
        config_for(data_dir, tmp_path / "split", max_steps=TOTAL_STEPS, channels_last=channels_last),
        resume=str(checkpoint_path),
    )
    assert resumed.step == FIRST_STEPS
    resumed.fit()
    assert resumed.step == TOTAL_STEPS and resumed.epoch == 1

    assert_states_equal(straight.model.state_dict(), resumed.model.state_dict(), "model")
    assert_states_equal(straight.optimizer.state_dict(), resumed.optimizer.state_dict(), "optimizer")
    assert straight.schedule.state_dict() == resumed.schedule.state_dict()
    # The lr dropped x0.1 at the start of epoch 1 (step 5) in both.
    assert resumed.optimizer.param_groups[-1]["lr"] == pytest.approx(1e-5)
    # Training actually moved the weights.
    untrained = Trainer(config_for(data_dir, tmp_path / "untrained"))
    assert not torch.equal(untrained.model.input_proj.weight, resumed.model.input_proj.weight)


def test_interrupt_saves_and_resumes(data_dir, tmp_path, monkeypatch):
    config = config_for(data_dir, tmp_path / "run", max_steps=4)
    trainer = Trainer(config)
    total = trainer.criterion.total

    def interrupt_at_step_two(losses):
        if trainer.step == 2:
            raise KeyboardInterrupt
        return total(losses)

    monkeypatch.setattr(trainer.criterion, "total", interrupt_at_step_two)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["step"] == 2 and checkpoint["epoch_step"] == 2
    assert_states_equal(checkpoint["model"], trainer.model.state_dict(), "model at the interrupt")
    resumed = Trainer(config, resume=str(tmp_path / "run" / "last.pt"))
    resumed.fit()
    assert resumed.step == 4
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4  # log_every=1: steps 1, 2 (first run) and 3, 4 (resumed)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"value": torch.tensor([1.0])})

    def failing_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"value": torch.tensor([2.0])})
    monkeypatch.undo()
    assert torch.load(path)["value"].item() == 1.0
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


def test_load_rejects_non_training_checkpoints(tmp_path):
    torch.save({"model": {}}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="lacks"):
        load_checkpoint(tmp_path / "weights.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_resume_with_another_seed_is_refused(data_dir, tmp_path):
    Trainer(config_for(data_dir, tmp_path / "a", max_steps=1)).fit()
    with pytest.raises(ValueError, match="seed"):
        Trainer(config_for(data_dir, tmp_path / "b", seed=7), resume=str(tmp_path / "a" / "last.pt"))
