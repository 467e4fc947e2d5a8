"""Test-time augmentation: the views, their averaged probabilities, and the module's tta metrics and predictions."""

from __future__ import annotations

import pytest
import torch

from tlkit import TransferClassifier
from tlkit.tta import tta_probabilities, tta_views


def _mirror_symmetric(images: torch.Tensor) -> torch.Tensor:
    return (images + images.flip(-1)) / 2


@pytest.mark.parametrize(("mode", "count"), [("flip", 2), ("five_crop", 5), ("ten_crop", 10)])
def test_views_keep_the_batch_and_image_size(mode, count):
    views = tta_views(torch.randn(3, 3, 32, 32), mode)
    assert len(views) == count and all(view.shape == (3, 3, 32, 32) for view in views)


def test_flip_views_are_the_image_and_its_mirror():
    images = torch.randn(2, 3, 8, 8)
    plain, mirrored = tta_views(images, "flip")
    assert torch.equal(plain, images) and torch.equal(mirrored, images.flip(-1))


@pytest.mark.parametrize("mode", ["flip", "five_crop", "ten_crop"])
def test_tta_of_an_invariant_model_equals_plain(mode):
    torch.manual_seed(0)
    head = torch.nn.Linear(3, 4)
    model = lambda x: head(x.mean(dim=(2, 3)))  # noqa: E731 - colour only: flip-invariant, and crop-invariant below
    images = torch.rand(5, 3, 1, 1).expand(5, 3, 16, 16)  # one colour per image
    torch.testing.assert_close(tta_probabilities(model, images, mode), model(images).softmax(dim=1))


def test_tta_of_a_position_sensitive_model_differs_from_plain():
    torch.manual_seed(0)
    head = torch.nn.Linear(3 * 16 * 16, 4)
    model = lambda x: head(x.flatten(1))  # noqa: E731
    images = torch.randn(5, 3, 16, 16)
    assert not torch.allclose(tta_probabilities(model, images, "flip"), model(images).softmax(dim=1))


def test_the_module_logs_tta_metrics_next_to_the_plain_ones_and_predicts_averaged_probabilities():
    torch.manual_seed(0)
    model = TransferClassifier("test_resnet", num_classes=3, tta="flip").eval()
    logged = {}
    model.log = lambda name, value, **k: logged.setdefault(name, value)
    model.log_dict = lambda metrics, **k: logged.update({name: m.compute() for name, m in metrics.items()})
    images, labels = _mirror_symmetric(torch.randn(6, 3, 32, 32)), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        model.validation_step((images, labels), 0)
        asymmetric = images[:, :, :, :20]
        predicted, plain = model.predict_step(asymmetric, 0), model(asymmetric).softmax(dim=1)
    assert {"val/acc", "val/tta_acc", "val/tta_f1"} <= set(logged)
    assert logged["val/tta_acc"] == logged["val/acc"]  # a mirror-symmetric image: the flip changes nothing
    torch.testing.assert_close(predicted, (plain + model(asymmetric.flip(-1)).softmax(dim=1)) / 2)
    assert not torch.allclose(predicted, plain)


def test_an_unknown_tta_mode_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="tta='flips'.*flip, five_crop, ten_crop"):
        TransferClassifier("test_resnet", num_classes=3, tta="flips")
