"""Training pieces: parameter groups, lr schedule, the resumable sharded data order, per-sample seeding,
config round trips, the `deco train` option handling and a bf16-autocast run."""

import json
import random

import numpy as np
import pytest
import torch

from deco.commands.train import config_from_args
from deco.config import TrainConfig, demo_config, preset, tiny_config
from deco.distributed import ResumableSampler, SeededSampleDataset, mean_num_boxes
from deco.optim import StepDecaySchedule, build_optimizer, parameter_group_name


def test_parameter_groups_follow_the_recipe():
    from deco.models import build_deco

    config = TrainConfig()
    model = build_deco(**tiny_config().model_kwargs(3, "stock"))
    optimizer = build_optimizer(model, config)
    by_name = {group["name"]: group for group in optimizer.param_groups}
    assert {name: group["lr"] for name, group in by_name.items()} == {"backbone": 1e-5, "encoder": 1e-5, "rest": 1e-4}
    assert all(group["weight_decay"] == 1e-4 for group in optimizer.param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("backbone.") for p in by_name["backbone"]["params"])
    assert all(".encoder." in f".{names[id(p)]}" for p in by_name["encoder"]["params"])
    # Frozen parameters (the release freezes the stem and layer1) are left out; everything else is in a group.
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable
    assert trainable != {id(p) for p in model.parameters()}


@pytest.mark.parametrize(
    "name,group",
    [("backbone.body.layer2.0.conv1.weight", "backbone"), ("encoder.stages.0.0.dwconv.weight", "encoder"),
     ("deco_convnet.encoder._encoder.stages.0.0.gamma", "encoder"), ("decoder.layers.0.dwconv1.weight", "rest"),
     ("input_proj.weight", "rest"), ("heads.class_embed.0.bias", "rest")],
)
def test_parameter_group_name(name, group):
    assert parameter_group_name(name) == group


def test_step_decay_schedule_with_warmup_and_added_milestone():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [parameter], "lr": 1.0}])
    schedule = StepDecaySchedule(optimizer, milestones=[6], gamma=0.1, warmup_steps=4)
    lrs = [schedule.get_last_lr()[0]]
    for _ in range(7):
        schedule.step()
        lrs.append(schedule.get_last_lr()[0])
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.1, 0.1])
    schedule.add_milestone(7)
    assert schedule.get_last_lr()[0] == pytest.approx(0.01)
    other = StepDecaySchedule(torch.optim.AdamW([{"params": [parameter], "lr": 1.0}]))
    other.load_state_dict(schedule.state_dict())
    assert other.get_last_lr() == schedule.get_last_lr() and other.state_dict() == schedule.state_dict()


def test_sampler_shards_pads_and_resumes():
    ranks = [ResumableSampler(7, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(4)
    shards = [[index for _, index in sampler] for sampler in ranks]
    assert all(len(shard) == 4 for shard in shards)  # 7 padded to 8
    assert set(shards[0] + shards[1]) == set(range(7))
    assert all(epoch == 4 for epoch, _ in ranks[0])
    # Interleaved: rank r takes every second index of the epoch's permutation, as DistributedSampler does.
    single = ResumableSampler(7, num_replicas=1, rank=0, seed=3)
    order = single.epoch_indices(4)
    assert shards[0] == (order + order)[0:8:2] and shards[1] == (order + order)[1:8:2]
    # The order is a function of (seed, epoch) only, differs between epochs, and resumes mid-epoch.
    assert single.epoch_indices(4) == ResumableSampler(7, 1, 0, seed=3).epoch_indices(4)
    assert single.epoch_indices(5) != order
    single.set_epoch(4, start=5)
    assert [index for _, index in single] == order[5:] and len(single) == 2
    with pytest.raises(ValueError, match="start"):
        single.set_epoch(0, start=8)
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(4, num_replicas=2, rank=2)


class RandomDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, index):
        return (random.random(), float(np.random.rand()), torch.rand(1).item())


def test_seeded_samples_depend_only_on_seed_epoch_and_index():
    dataset = SeededSampleDataset(RandomDataset(), seed=1)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    python_state = random.getstate()
    first = dataset[(2, 3)]
    assert torch.equal(torch.get_rng_state(), state) and random.getstate() == python_state  # caller's untouched
    random.random(), torch.rand(3), np.random.rand()  # whatever happened in between does not matter
    assert dataset[(2, 3)] == first
    assert dataset[(2, 4)] != first and dataset[(3, 3)] != first
    assert SeededSampleDataset(RandomDataset(), seed=2)[(2, 3)] != first
    assert len(set(first)) == 3


def test_mean_num_boxes_clamps_at_one():
    assert mean_num_boxes(0, torch.device("cpu")).item() == 1.0
    assert mean_num_boxes(7, torch.device("cpu")).item() == 7.0


def test_config_round_trips_and_presets(tmp_path):
    config = demo_config().replace(data="somewhere")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert TrainConfig.from_json(str(path)) == config
    assert preset("coco") == TrainConfig()
    assert (TrainConfig().lr, TrainConfig().lr_backbone, TrainConfig().lr_encoder) == (1e-4, 1e-5, 1e-5)
    with pytest.raises(ValueError, match="preset"):
        preset("huge")
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"learning_rate": 1.0})


def test_train_options_override_the_preset_or_the_checkpoint(tmp_path):
    from deco.cli import build_parser

    args = build_parser().parse_args(
        ["train", "--data", "d", "--preset", "demo", "--lr", "0.001", "--lr-drop", "3", "5", "--amp", "bf16"]
    )
    config = config_from_args(args)
    assert config.lr == 0.001 and config.lr_drop_epochs == (3, 5) and config.amp == "bf16"
    assert config.d_model == demo_config().d_model and config.data == "d" and not config.channels_last
    assert config_from_args(build_parser().parse_args(["train", "--data", "d", "--channels-last"])).channels_last
    on = demo_config().replace(channels_last=True)
    (tmp_path / "on.json").write_text(json.dumps(on.to_dict()))
    args = ["train", "--data", "d", "--config", str(tmp_path / "on.json")]
    assert config_from_args(build_parser().parse_args(args)).channels_last
    assert not config_from_args(build_parser().parse_args([*args, "--no-channels-last"])).channels_last
    with pytest.raises(SystemExit):
        config_from_args(build_parser().parse_args(["train"]))


def test_bf16_autocast_training_runs(tmp_path):
    from deco.data.synthetic import write_synthetic_dataset
    from deco.engine import Trainer

    write_synthetic_dataset(tmp_path / "data", num_images=5, seed=1, image_size=(64, 64), progress=False)
    config = tiny_config().replace(data=str(tmp_path / "data"), out=str(tmp_path / "run"), amp="bf16", max_steps=2)
    trainer = Trainer(config)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in records)
    after = dict(trainer.model.named_parameters())
    assert all(after[n].dtype == torch.float32 for n in before)  # autocast keeps fp32 master weights
    assert any(not torch.equal(before[n], after[n]) for n in before)
    with pytest.raises(ValueError, match="amp"):
        Trainer(config.replace(amp="fp8"))
