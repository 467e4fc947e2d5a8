"""Checkpoint soups: uniform and greedy averages, BatchNorm re-estimated, a checkpoint every command accepts."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import tiny_trainer, write_image_folder
from lightning.pytorch.callbacks import ModelCheckpoint

from tlkit import ImageDataModule, TransferClassifier
from tlkit.module import read_checkpoint
from tlkit.soup import average_weights, make_soup


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three epochs of one run (stages 1-2 frozen, the rest and its BatchNorm training), and an untrained model."""
    root = tmp_path_factory.mktemp("soup")
    folder = write_image_folder(root / "images", per_class=8, size=32)
    L.seed_everything(0)
    model = TransferClassifier("test_resnet", num_classes=3, freeze="stages:2", lr=0.05)
    dm = ImageDataModule(source=f"folder:{folder}", image_size=32, batch_size=6, preprocess="dataset")
    every_epoch = ModelCheckpoint(root, filename="{epoch}", save_top_k=-1)
    trainer = tiny_trainer(root, max_epochs=3, limit_train_batches=None, limit_val_batches=None,
                           callbacks=[every_epoch], enable_checkpointing=True)  # fmt: skip
    untrained = TransferClassifier("test_resnet", num_classes=3, freeze="stages:2", lr=0.05)
    trainer.fit(model, dm)
    trainer.strategy.connect(untrained)  # the same checkpoint format, weights never trained
    trainer.save_checkpoint(root / "untrained.ckpt")
    return [root / f"epoch={i}.ckpt" for i in range(3)] + [root / "untrained.ckpt"]


def test_weights_average_element_wise_and_counters_come_from_the_first():
    a = {"w": torch.tensor([1.0, 2.0]), "bn.num_batches_tracked": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "bn.num_batches_tracked": torch.tensor(9)}
    averaged = average_weights([a, b])
    assert torch.equal(averaged["w"], torch.tensor([2.0, 4.0])) and averaged["bn.num_batches_tracked"] == 3


def test_greedy_soup_never_scores_below_its_best_checkpoint_and_skips_the_untrained_one(checkpoints, tmp_path):
    soup = make_soup(checkpoints, tmp_path / "greedy.ckpt", greedy=True)
    assert soup.val_acc >= max(soup.scores.values())
    assert str(checkpoints[-1]) not in soup.ingredients  # adding the untrained weights lowers val, so it is left out
    assert soup.ingredients[0] == max(soup.scores, key=soup.scores.get)  # best first
    model = TransferClassifier.load_from_checkpoint(tmp_path / "greedy.ckpt")  # a normal checkpoint
    result = tiny_trainer(tmp_path, limit_val_batches=None).validate(
        model, datamodule=ImageDataModule(**read_checkpoint(checkpoints[0])["datamodule_hyper_parameters"])
    )
    assert result[0]["val/acc"] == pytest.approx(soup.val_acc)


def test_uniform_soup_averages_all_and_reestimates_only_the_batchnorm_that_trained(checkpoints, tmp_path):
    soup = make_soup(checkpoints[:3], tmp_path / "uniform.ckpt")
    assert soup.ingredients == [str(path) for path in checkpoints[:3]]
    saved = read_checkpoint(tmp_path / "uniform.ckpt")
    ingredients = [read_checkpoint(path)["state_dict"] for path in checkpoints[:3]]
    mean = average_weights(ingredients)
    torch.testing.assert_close(saved["state_dict"]["head.fc.weight"], mean["head.fc.weight"])
    frozen, trained = "backbone.model.bn1.running_mean", "backbone.model.layer4.0.bn1.running_mean"
    assert all(torch.equal(sd[frozen], ingredients[0][frozen]) for sd in ingredients)  # stem: frozen
    assert torch.equal(saved["state_dict"][frozen], ingredients[0][frozen])  # kept as it was
    assert not torch.allclose(saved["state_dict"][trained], mean[trained])  # re-estimated, not averaged
    assert "optimizer_states" not in saved and saved["tlkit_soup"]["val_acc"] == soup.val_acc


def test_checkpoints_of_different_models_are_refused_by_name(checkpoints, tmp_path):
    other = TransferClassifier("test_resnet", num_classes=5)
    trainer = tiny_trainer(tmp_path)
    trainer.strategy.connect(other)
    trainer.save_checkpoint(tmp_path / "five.ckpt")
    with pytest.raises(ValueError, match="five.ckpt is not the same model"):
        make_soup([checkpoints[0], tmp_path / "five.ckpt"], tmp_path / "out.ckpt")
