"""TransferClassifier: forward, metrics, loss options, checkpoints that reload offline."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_trainer

from tlkit import ImageDataModule, TransferClassifier


@pytest.fixture
def digits() -> ImageDataModule:
    return ImageDataModule(source="digits", image_size=32, batch_size=16, preprocess="dataset", augment="none")


def test_forward_gives_logits_per_class():
    model = TransferClassifier("resnet18", num_classes=7).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert model.class_names == [str(i) for i in range(7)]


def test_class_names_must_match_num_classes():
    with pytest.raises(ValueError, match="class_names has 2 names but num_classes=3"):
        TransferClassifier("resnet18", num_classes=3, class_names=["a", "b"])


def test_lbfgs_is_refused_with_the_linear_probe_as_the_fix():
    with pytest.raises(ValueError, match=r"optimizer='lbfgs'.*is tlkit\.LinearProbe"):
        TransferClassifier("test_efficientnet", num_classes=3, optimizer="lbfgs")


def test_bad_head_options_name_the_valid_ones():
    with pytest.raises(ValueError, match="hidden, dropout, activation and init"):
        TransferClassifier("resnet18", num_classes=3, head={"widht": 3})


def test_f1_rejects_logits_of_another_class_count():
    f1 = TransferClassifier("resnet18", num_classes=3).val_metrics["f1"]
    with pytest.raises(ValueError, match=r"logits \(N, 3\) or labels \(N,\).*\(4, 5\)"):
        f1.update(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="target of shape \\(4, 1\\)"):
        f1.update(torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long))


def test_fit_logs_metrics_and_learning_rates(tmp_path, digits):
    model = TransferClassifier("resnet18", num_classes=10, freeze="stages:3", lr=0.05)
    trainer = tiny_trainer(tmp_path)
    trainer.fit(model, digits)
    logged = trainer.callback_metrics
    for key in ("train/loss", "val/loss", "val/acc", "val/acc_top5", "val/f1", "lr/head", "lr/layer4"):
        assert key in logged, f"{key} not logged; got {sorted(logged)}"
    assert "lr/layer1" not in logged  # frozen stages have no parameter group


def test_top5_only_with_five_classes_or_more(tmp_path):
    model = TransferClassifier("resnet18", num_classes=3)
    assert not any("top5" in key for key in model.val_metrics.keys())
    assert any("top5" in key for key in TransferClassifier("resnet18", num_classes=5).val_metrics.keys())


def test_label_smoothing_and_l1_change_the_loss(digits):
    digits.setup()
    images, targets = next(iter(digits.train_dataloader()))
    images = digits.normalize(images)
    torch.manual_seed(0)
    plain = TransferClassifier("resnet18", num_classes=10)
    smooth = TransferClassifier("resnet18", num_classes=10, label_smoothing=0.3)
    smooth.load_state_dict(plain.state_dict())
    loss = torch.nn.functional.cross_entropy(plain(images), targets)
    smoothed = torch.nn.functional.cross_entropy(plain(images), targets, label_smoothing=0.3)
    assert not torch.isclose(loss, smoothed)
    # the module uses its own label_smoothing in the step
    smooth.log = lambda *a, **k: None
    smooth.log_dict = lambda *a, **k: None
    assert torch.isclose(smooth._shared_step((images, targets), smooth.train_metrics)[0], smoothed, atol=1e-5)


def test_l1_penalty_is_added_to_the_training_loss(tmp_path, digits):
    losses = {}
    for l1 in (0.0, 1e-3):
        torch.manual_seed(0)
        # lr must be > 0 (checked at construction); 1e-12 leaves the weights as they were for the comparison below
        model = TransferClassifier("resnet18", num_classes=10, l1=l1, lr=1e-12)
        trainer = tiny_trainer(tmp_path, limit_train_batches=1, limit_val_batches=0)
        trainer.fit(model, digits)
        losses[l1] = trainer.callback_metrics["train/loss"].item()
    weights = sum(p.abs().sum() for p in model.parameters() if p.ndim > 1).item()
    assert losses[1e-3] - losses[0.0] == pytest.approx(1e-3 * weights, rel=1e-3)


def test_checkpoint_reloads_offline_with_weights_and_class_names(tmp_path, digits):
    model = TransferClassifier("resnet18", num_classes=10, class_names=list("abcdefghij"), pretrained=False)
    trainer = tiny_trainer(tmp_path)
    trainer.fit(model, digits)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = TransferClassifier.load_from_checkpoint(path)
    assert loaded.class_names == list("abcdefghij")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert "ImageDataModule" in torch.load(path, weights_only=True)  # preprocessing statistics travel along


def test_checkpoint_of_hub_weights_reloads_without_the_hub(tmp_path, digits):
    """pretrained=True would download again on reload: the checkpoint already holds the weights."""
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    donor = TransferClassifier("resnet18", num_classes=10).backbone.model
    save_file(donor.state_dict(), weights)
    model = TransferClassifier("resnet18", num_classes=10, pretrained=str(weights))
    trainer = tiny_trainer(tmp_path, limit_train_batches=1)
    trainer.fit(model, digits)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    weights.unlink()  # the original file is gone; the checkpoint must still load
    loaded = TransferClassifier.load_from_checkpoint(tmp_path / "m.ckpt")
    assert torch.equal(loaded.head.fc.weight, model.head.fc.weight)


def test_packaged_data_config_survives_a_checkpoint(tmp_path, digits):
    model = TransferClassifier("tf_efficientnet_lite0", pretrained="packaged", num_classes=10)
    trainer = tiny_trainer(tmp_path, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(model, digits)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = TransferClassifier.load_from_checkpoint(tmp_path / "m.ckpt")
    assert loaded.data_config["interpolation"] == "bilinear"
    assert loaded.data_config["mean"] == (0.5, 0.5, 0.5)


def test_channels_last_runs_the_model_in_that_format():
    model = TransferClassifier("resnet18", num_classes=3, channels_last=True).eval()
    conv = model.backbone.model.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    eager = TransferClassifier("resnet18", num_classes=3).eval()
    eager.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), eager(x), atol=1e-4, rtol=1e-4)


def test_predict_step_returns_probabilities():
    model = TransferClassifier("resnet18", num_classes=4).eval()
    probs = model.predict_step((torch.randn(3, 3, 32, 32), torch.zeros(3)), 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_raw_pixels_that_skipped_the_data_module_are_named_with_the_fix(tmp_path, digits):
    model = TransferClassifier("test_resnet", num_classes=10).eval()
    digits.setup("fit")
    images, _ = next(iter(digits.val_dataloader()))  # uint8: normalised later, in the data module's hook
    with pytest.raises(TypeError, match=r"got torch.uint8 images: raw pixels.*datamodule=dm.*dm.normalize\(images\)"):
        tiny_trainer(tmp_path).predict(model, digits.val_dataloader())
    assert model(digits.normalize(images)).shape == (len(images), 10)


def test_import_leaves_warning_filters_and_fit_ignores_only_the_frozen_bn_eval_mode_warning(tmp_path, digits):
    """Frozen BatchNorms stay in eval mode on purpose: Lightning's warning about it is ignored while a
    TransferClassifier fits, and only then; importing tlkit changes no warning filter."""
    import subprocess
    import sys
    import warnings

    from tlkit.module import EVAL_MODE_WARNING

    code = (
        "import warnings, lightning, timm; old = list(warnings.filters); import tlkit; print(warnings.filters == old)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "True"
    model = TransferClassifier("test_resnet", num_classes=10, freeze="backbone")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_trainer(tmp_path).fit(model, digits)
        assert not [f for f in warnings.filters if f[1] and f[1].pattern == EVAL_MODE_WARNING]  # gone after the fit
    assert not [w for w in caught if "eval mode at the start of training" in str(w.message)]
