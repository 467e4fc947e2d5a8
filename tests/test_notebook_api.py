"""The public API the notebooks use instead of tlkit's internals: a data module's images by split and index, a
few-label training set, and a recipe's learning-rate schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tlkit

ROOT = Path(__file__).resolve().parents[1]


def test_image_and_num_images_read_each_split_as_its_loader_orders_it():
    dm = tlkit.ImageDataModule("textures", image_size=32, batch_size=8)
    loader = dm.val_dataloader()
    assert dm.num_images("val") == len(loader.dataset) and dm.num_images("train") == len(dm.train_dataloader().dataset)
    images, _ = next(iter(loader))
    first = dm.image("val", 0)
    assert first.dtype == torch.uint8 and first.shape == (3, 64, 64)  # as the source holds it, before the resize
    assert torch.equal(dm.transform(train=False)(first), images[0])  # the loader's first image is that one
    with pytest.raises(ValueError, match="Unknown split 'test'.*train"):
        dm.image("test", 0)


def test_train_per_class_keeps_the_first_images_of_each_class_and_the_whole_val_split():
    full = tlkit.ImageDataModule("textures")
    few = tlkit.ImageDataModule("textures", train_per_class=3)
    assert few.class_counts == [3] * 10 and few.num_images("val") == full.num_images("val")
    targets = full.data.train.targets
    kept = sorted(i for c in range(10) for i in [j for j, t in enumerate(targets) if t == c][:3])
    assert all(torch.equal(few.image("train", k), full.image("train", i)) for k, i in enumerate(kept))
    with pytest.raises(ValueError, match="train_per_class=0"):
        tlkit.ImageDataModule("textures", train_per_class=0)


def test_recipe_lr_schedule_is_public(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    curves, run = tlkit.recipe_lr_schedule(
        ["--config", str(ROOT / "recipes" / "quickstart.yaml"), "--trainer.max_epochs", "2"]
    )
    assert run.max_epochs == 2 and all(len(v) == run.estimated_stepping_batches for v in curves.values())
