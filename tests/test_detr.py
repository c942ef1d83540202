"""DETR-R50 baseline: output shapes, the published parameter count, and that it learns on synthetic data."""

import pytest
import torch

from deco.losses import build_criterion
from deco.models.detr import build_detr, sine_position_encoding

# DETR's own training log prints this number of trainable parameters for DETR-R50 (91 classes, 100 queries;
# the frozen stem and layer1 of the backbone excluded).
DETR_R50_TRAINABLE_PARAMETERS = 41_302_368
STEPS = 6


@pytest.fixture(scope="module")
def detr():
    torch.manual_seed(0)
    return build_detr()


def test_parameter_count(detr):
    trainable = sum(p.numel() for p in detr.parameters() if p.requires_grad)
    assert trainable == DETR_R50_TRAINABLE_PARAMETERS
    transformer = sum(p.numel() for m in (detr.encoder_layers, detr.decoder_layers) for p in m.parameters())
    # 6 encoder layers of 1,315,072 and 6 decoder layers of 1,578,752 parameters.
    assert transformer == 6 * 1_315_072 + 6 * 1_578_752


def test_output_shapes_with_padding(detr):
    detr.eval()
    images = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 64:] = True  # second image padded on the right
    with torch.no_grad():
        outputs = detr(images, mask)
    assert outputs["pred_logits"].shape == (2, 100, 92)
    assert outputs["pred_boxes"].shape == (2, 100, 4)
    assert ((outputs["pred_boxes"] > 0) & (outputs["pred_boxes"] < 1)).all()
    assert len(outputs["aux_outputs"]) == 5
    for aux in outputs["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 100, 92) and aux["pred_boxes"].shape == (2, 100, 4)
    # Padding must change the result of the padded image only.
    with torch.no_grad():
        unpadded = detr(images, torch.zeros_like(mask))
    torch.testing.assert_close(unpadded["pred_logits"][0], outputs["pred_logits"][0])
    assert not torch.allclose(unpadded["pred_logits"][1], outputs["pred_logits"][1])


def test_bad_input_is_rejected(detr):
    with pytest.raises(ValueError, match="images must be a B x 3 x H x W"):
        detr(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        detr(torch.randn(1, 3, 64, 64), torch.zeros(1, 32, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        build_detr(num_classes=0)


def test_sine_position_encoding_matches_formula():
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    mask[0, :, 2] = True
    encoding = sine_position_encoding(mask, num_features=4)
    assert encoding.shape == (1, 8, 2, 3)
    # Pixel (row 1, column 0): y = 2/2 * 2pi, x = 1/2 * 2pi (two valid columns); frequencies 1, 1, 100, 100.
    y, x = 2 * torch.pi, torch.pi
    expected = torch.tensor(
        [
            torch.sin(torch.tensor(y)),
            torch.cos(torch.tensor(y)),
            torch.sin(torch.tensor(y / 100)),
            torch.cos(torch.tensor(y / 100)),
            torch.sin(torch.tensor(x)),
            torch.cos(torch.tensor(x)),
            torch.sin(torch.tensor(x / 100)),
            torch.cos(torch.tensor(x / 100)),
        ]
    )
    torch.testing.assert_close(encoding[0, :, 1, 0], expected, atol=1e-5, rtol=1e-5)


def test_training_steps_reduce_the_loss(tmp_path):
    from deco.data import build_dataset, collate_fn
    from deco.data.synthetic import write_synthetic_dataset
    from deco.data.transforms import make_transforms

    write_synthetic_dataset(tmp_path, num_images=4, seed=0, image_size=(64, 64), empty_fraction=0.0, progress=False)
    transforms = make_transforms(train=False, eval_size=64, max_size=64)
    dataset = build_dataset(tmp_path, "train", train=True, transforms=transforms)
    images, mask, targets = collate_fn([dataset[i] for i in range(2)])
    num_classes = len(dataset.categories)

    torch.manual_seed(0)
    model = build_detr(num_classes=num_classes, num_queries=20)
    # The backbone's backward is most of a step's CPU time; the transformer and heads are what is under test.
    model.backbone.requires_grad_(False)
    criterion = build_criterion(num_classes, num_aux_layers=5, class_loss="softmax_ce")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)

    def evaluation_loss() -> float:
        model.eval()
        with torch.no_grad():
            return criterion.total(criterion(model(images, mask), targets)).item()

    before = evaluation_loss()
    model.train()
    for _ in range(STEPS):
        loss = criterion.total(criterion(model(images, mask), targets))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        assert torch.isfinite(loss)
    after = evaluation_loss()
    assert after < 0.95 * before, f"loss went from {before:.3f} to {after:.3f} in {STEPS} steps on one batch"
