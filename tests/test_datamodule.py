"""ImageDataModule: uint8 loaders, device-side normalisation fitted on the train split, saved in checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_trainer, write_image_folder

from tlkit import ImageDataModule, TransferClassifier


def test_loaders_yield_uint8_images_and_labels():
    dm = ImageDataModule(source="textures", image_size=48, batch_size=8, preprocess="none", augment="basic")
    dm.setup()
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 48, 48)
    assert labels.dtype == torch.int64
    assert dm.num_classes == 10 and dm.class_names == sorted(dm.class_names)


def test_pretrained_normalisation_uses_the_models_weights_config(tmp_path):
    dm = ImageDataModule(source="digits", image_size=32, batch_size=8)
    model = TransferClassifier("tf_efficientnet_lite0", pretrained="packaged", num_classes=dm.num_classes)
    trainer = tiny_trainer(tmp_path, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(model, dm)
    config = dm.data_config()
    assert config["mean"] == (0.5, 0.5, 0.5) and config["interpolation"] == "bilinear"
    white = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    torch.testing.assert_close(dm.normalize(white), torch.ones(1, 3, 2, 2))  # (1 - 0.5) / 0.5


def test_explicit_arguments_override_the_model():
    dm = ImageDataModule(source="digits", image_size=40, mean=(0.1, 0.2, 0.3), std=(1, 1, 1), crop_pct=0.5)
    config = dm.data_config()
    assert config["input_size"] == (3, 40, 40) and config["mean"] == (0.1, 0.2, 0.3) and config["crop_pct"] == 0.5


def test_evaluation_resizes_by_the_crop_fraction_then_centre_crops():
    dm = ImageDataModule(source="digits", image_size=32, crop_pct=0.5, preprocess="none")
    resize, crop = dm.transform(train=False).transforms
    assert list(resize.size) == [64, 64] and list(crop.size) == [32, 32]


def test_dataset_statistics_are_fitted_on_train_split_and_saved(tmp_path):
    dm = ImageDataModule(source="digits", image_size=32, batch_size=64, preprocess="dataset", augment="none")
    dm.setup()
    batches = [dm.normalize(images) for images, _ in dm.train_dataloader()]
    train = torch.cat(batches)
    torch.testing.assert_close(train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-3, rtol=0)
    torch.testing.assert_close(train.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-2, rtol=0)
    restored = ImageDataModule(source="digits", image_size=32, preprocess="dataset")
    restored.load_state_dict(dm.state_dict())
    restored.setup()
    images = next(iter(dm.val_dataloader()))[0]
    torch.testing.assert_close(restored.normalize(images), dm.normalize(images))


def test_a_checkpoint_restores_statistics_without_refitting(tmp_path, monkeypatch):
    dm = ImageDataModule(source="digits", image_size=32, batch_size=32, preprocess="dataset")
    model = TransferClassifier("resnet18", num_classes=10)
    trainer = tiny_trainer(tmp_path, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(model, dm)
    trainer.save_checkpoint(tmp_path / "m.ckpt")

    fresh = ImageDataModule(source="digits", image_size=32, batch_size=32, preprocess="dataset")
    monkeypatch.setattr("tlkit.data.preprocess.Normalize.fit", lambda *a: pytest.fail("refitted"))
    tiny_trainer(tmp_path, limit_val_batches=1).validate(model, fresh, ckpt_path=tmp_path / "m.ckpt")
    torch.testing.assert_close(fresh.preprocess.mean, dm.preprocess.mean)


def test_folder_source_predicts_over_a_flat_folder(tmp_path):
    root = write_image_folder(tmp_path / "data")
    flat = tmp_path / "new"
    flat.mkdir()
    for i, png in enumerate(sorted((tmp_path / "data" / "cat").glob("*.png"))[:3]):
        png.rename(flat / f"img{i}.png")
    dm = ImageDataModule(source=f"folder:{root}", image_size=32, val_split=0.34, predict_source=str(flat))
    split = dm.predict_split()
    assert [p.rsplit("/", 1)[1] for p in split.samples] == ["img0.png", "img1.png", "img2.png"]
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ImageDataModule(source=f"folder:{root}", predict_source=str(tmp_path / "nope")).predict_split()


def test_unknown_augmentation_is_refused():
    with pytest.raises(ValueError, match="randaugment"):
        ImageDataModule(source="digits", augment="heavy")
