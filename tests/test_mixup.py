"""Mixup / CutMix: soft targets, the loss the module trains on, train metrics against the un-mixed labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_trainer

from tlkit import ImageDataModule, TransferClassifier
from tlkit.mixup import BatchMixup


@pytest.mark.parametrize("size", [8, 7])  # an odd last batch too
@pytest.mark.parametrize("alphas", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixed_targets_are_distributions_over_the_two_mixed_labels(size, alphas):
    np.random.seed(0)
    mix = BatchMixup(5, mixup_alpha=alphas[0], cutmix_alpha=alphas[1], label_smoothing=0.1)
    labels = torch.arange(size) % 5
    images, soft = mix(torch.randn(size, 3, 16, 16), labels, epoch=0)
    assert images.shape == (size, 3, 16, 16) and soft.shape == (size, 5)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(size))
    even = size - size % 2
    partner = labels[:even].flip(0)  # timm mixes each image with its mirror in the batch
    mass = soft[torch.arange(even), labels[:even]] + soft[torch.arange(even), partner]
    mass = torch.where(labels[:even] == partner, soft[torch.arange(even), labels[:even]], mass)
    assert bool((mass > 0.9 - 1e-6).all())  # all but the smoothing's share on the two mixed labels
    assert not torch.allclose(soft[:even].max(dim=1).values, torch.full((even,), 0.92))  # some mixing happened


def test_mixing_stops_at_the_off_epoch():
    mix = BatchMixup(4, mixup_alpha=1.0, label_smoothing=0.0, off_epoch=2)
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    mixed, soft = mix(images.clone(), labels, epoch=2)
    torch.testing.assert_close(mixed, images)
    torch.testing.assert_close(soft, torch.nn.functional.one_hot(labels, 4).float())
    assert not torch.equal(mix(images.clone(), labels, epoch=1)[0], images)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mixup_alpha=-1.0), "mixup_alpha=-1.0"),
        (dict(mixup_alpha=0.2, mixup_prob=2.0), "mixup_prob=2.0"),
        (dict(mixup_alpha=0.2, class_weights="balanced", class_counts=[2, 2, 2]), "class_weights"),
    ],
)
def test_bad_mixup_settings_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransferClassifier("test_resnet", num_classes=3, **kwargs)


def test_training_uses_the_soft_target_loss_and_scores_the_unmixed_labels(monkeypatch):
    model = TransferClassifier("test_resnet", num_classes=4, mixup_alpha=1.0, label_smoothing=0.1)
    model.log = model.log_dict = lambda *a, **k: None
    model._logged_groups = lambda: []
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    seen = {}

    def record(preds, targets):
        seen["targets"] = targets

    monkeypatch.setattr(model.train_metrics, "update", record)
    np.random.seed(1)
    loss = model.training_step((images.clone(), labels), 0)
    np.random.seed(1)
    mixed, soft = BatchMixup(4, mixup_alpha=1.0, label_smoothing=0.1)(images.clone(), labels, epoch=0)
    expected = -(soft * model(mixed).log_softmax(dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(loss, expected)
    assert torch.equal(seen["targets"], labels)


def test_a_mixup_model_fits(tmp_path):
    dm = ImageDataModule(source="digits", image_size=32, batch_size=8, preprocess="dataset", augment="none")
    model = TransferClassifier("test_resnet", num_classes=10, mixup_alpha=0.2, cutmix_alpha=1.0, mixup_off_epoch=1)
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and "train/acc" in trainer.callback_metrics
