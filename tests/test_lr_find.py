"""LR finder: the three suggestions on known curves, a range test on a real model (phased too), --apply."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_trainer, write_image_folder
from lightning.pytorch.tuner.lr_finder import _LRFinder

from tlkit import ImageDataModule, TransferClassifier
from tlkit.lr_find import apply_lr, find_lr, first_phase, minimum_10, suggestions_of, valley

LRS = [float(lr) for lr in np.logspace(-6, 0, 61)]  # 10 points per decade; 1e-2 is LRS[40]


def test_valley_and_minimum_on_a_bowl():
    losses = [(math.log10(lr) + 2) ** 2 for lr in LRS]  # falls from 1e-6 to its minimum at 1e-2, then rises
    assert minimum_10(LRS, losses) == pytest.approx(1e-3)
    # fastai: the longest decreasing run ends at index 40 (start -1), and the valley is (40 + 1) / 3 + its half in
    assert valley(LRS, losses) == LRS[18]
    assert valley(LRS[:1], losses[:1]) is None and minimum_10([1.0], [math.nan]) is None


def test_valley_ignores_a_noisy_early_dip():
    losses = [(math.log10(lr) + 2) ** 2 for lr in LRS]
    losses[2] = -5.0  # one outlier: the lowest loss, but no long decreasing run through it
    assert minimum_10(LRS, losses) == pytest.approx(LRS[2] / 10)
    assert 1e-5 < valley(LRS, losses) < 1e-2


def test_steep_is_where_the_loss_falls_fastest():
    finder = _LRFinder("exponential", 1e-6, 1.0, len(LRS))
    losses = [2.0 if i <= 30 else 1.0 for i in range(len(LRS))]  # one cliff between LRS[30] and LRS[31]
    finder.results = {"lr": LRS, "loss": losses}
    found = suggestions_of(finder)
    assert found.steep in (LRS[30], LRS[31])  # at the cliff (its side depends on the gradient formula)
    assert found.pick("valley") == found.valley and found.pick("minimum_10") == pytest.approx(LRS[31] / 10)
    with pytest.raises(ValueError, match="use one of valley, steep, minimum_10"):
        found.pick("fastest")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("lr") / "images", per_class=8, size=32)


@pytest.mark.parametrize("phases", [None, [{"epochs": 1, "freeze": "backbone"}, {"freeze": "none"}]])
def test_a_range_test_on_a_model_suggests_rates_in_range_and_leaves_the_weights(folder, tmp_path, phases):
    L.seed_everything(0)
    model = TransferClassifier("test_resnet", num_classes=3, phases=phases)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    dm = ImageDataModule(source=f"folder:{folder}", image_size=32, batch_size=6, preprocess="dataset")
    found, figure = find_lr(model, dm, tiny_trainer(tmp_path, max_epochs=10, limit_train_batches=None),
                            min_lr=1e-5, max_lr=1.0, num_training=15)  # fmt: skip
    assert len(found.lrs) == 15 and 1e-5 <= found.steep <= 1.0 and 1e-5 <= found.valley <= 1.0
    assert found.minimum_10 in [lr / 10 for lr in found.lrs]
    assert any("valley" in text.get_text() for text in figure.axes[0].get_legend().get_texts())
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())


def test_the_first_phase_of_a_phased_model_is_searched():
    model = TransferClassifier("test_resnet", num_classes=3, freeze_epochs=1)
    model.hparams["_class_path"] = "tlkit.TransferClassifier"  # as LightningCLI leaves it
    single = first_phase(model)
    assert single.hparams.phases == [{"epochs": None, "freeze": "backbone"}]
    assert not any(p.requires_grad for p in single.backbone.parameters())  # the head-only first phase
    plain = TransferClassifier("test_resnet", num_classes=3)
    assert first_phase(plain) is plain


def test_apply_writes_the_lr_into_the_recipe_or_its_first_phase(tmp_path):
    out = apply_lr("recipes/quickstart.yaml", 0.003, tmp_path / "quick.yaml")
    assert yaml.safe_load(out.read_text())["model"]["init_args"]["lr"] == 0.003
    phased = yaml.safe_load(apply_lr("recipes/phased.yaml", 0.004, tmp_path / "phased.yaml").read_text())
    assert [phase["lr"] for phase in phased["model"]["init_args"]["phases"]] == [0.004, 0.01, 0.01]
    (tmp_path / "bad.yaml").write_text("trainer: {}\n")
    with pytest.raises(ValueError, match="bad.yaml has no model section"):
        apply_lr(tmp_path / "bad.yaml", 0.1, tmp_path / "x.yaml")
