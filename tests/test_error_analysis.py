"""Error analysis: the highest-loss test images and the most confused class pairs, written by `test`."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import torch
from conftest import tiny_trainer, write_image_folder

from tlkit import ImageDataModule, TransferClassifier
from tlkit.error_analysis import MOST_CONFUSED_FILE, TOP_LOSSES_FILE, most_confused, top_losses


def test_top_losses_are_sorted_by_loss_with_true_and_predicted_classes():
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [1.0, 0.0], [0.0, 9.0]])
    targets = torch.tensor([0, 0, 0, 1])
    rows = top_losses(logits, targets, ["a.png", "b.png", "c.png", "d.png"], ["cat", "dog"], k=2)
    assert [row["image"] for row in rows] == ["b.png", "c.png"]  # wrong and confident first, then unsure
    assert rows[0]["true"] == "cat" and rows[0]["predicted"] == "dog" and rows[0]["probability"] == 0.982
    assert rows[0]["loss"] > rows[1]["loss"]


def test_most_confused_counts_mistaken_pairs_only_most_frequent_first():
    targets = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([1, 1, 0, 1, 2, 0, 2])
    assert most_confused(predicted, targets, ["a", "b", "c"]) == [
        {"true": "a", "predicted": "b", "count": 2},
        {"true": "b", "predicted": "c", "count": 1},
        {"true": "c", "predicted": "a", "count": 1},
    ]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as file:
        return list(csv.DictReader(file))


def test_test_writes_both_files_into_the_run_directory(tmp_path):
    folder = write_image_folder(tmp_path / "images", per_class=8, size=32)
    L.seed_everything(0)
    dm = ImageDataModule(source=f"folder:{folder}", image_size=32, batch_size=4, preprocess="dataset")
    model = TransferClassifier("test_resnet", num_classes=3, class_names=dm.class_names)
    trainer = tiny_trainer(tmp_path / "run", limit_test_batches=None)
    trainer.test(model, dm)
    top = _rows(tmp_path / "run" / TOP_LOSSES_FILE)
    assert len(top) == len(dm.data.val) and set(top[0]) >= {"image", "true", "predicted", "probability", "loss"}
    assert top[0]["image"].endswith(".png") and Path(top[0]["image"]).parent.name == top[0]["true"]
    losses = [float(row["loss"]) for row in top]
    assert losses == sorted(losses, reverse=True)
    confused = _rows(tmp_path / "run" / MOST_CONFUSED_FILE)
    assert sum(int(row["count"]) for row in confused) == sum(row["true"] != row["predicted"] for row in top)
