"""recipes/strong.yaml trains end to end through the CLI: its head starts as the linear probe, its BatchNorm layers
keep the pretrained statistics while their weights train, and flip TTA is logged next to the plain accuracy."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from tlkit.backbones import create_backbone
from tlkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_strong_recipe_starts_from_the_probe_keeps_batchnorm_statistics_and_logs_tta(tmp_path, monkeypatch):
    said: list[str] = []
    monkeypatch.setattr("tlkit.probe_init.rank_zero_info", said.append)
    main(["fit", "--config", str(ROOT / "recipes" / "strong.yaml"), "--trainer.max_epochs", "1",
          "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "1",
          "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
          "--data.init_args.num_workers", "0"])  # fmt: skip
    assert said and said[0].startswith("Head initialised as the linear probe of 480 training images' features")
    with open(tmp_path / "version_0" / "metrics.csv") as file:
        logged = {key for row in csv.DictReader(file) for key, value in row.items() if value}
    assert {"val/acc", "val/tta_acc"} <= logged
    state = torch.load(tmp_path / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    pretrained = create_backbone("tf_efficientnet_lite0", pretrained="packaged").state_dict()
    means = [k for k in pretrained if k.endswith("running_mean")]
    assert means and all(torch.equal(state[f"backbone.{k}"], pretrained[k]) for k in means)
    bn_weights = [k.replace("running_mean", "weight") for k in means]
    assert any(not torch.equal(state[f"backbone.{k}"], pretrained[k]) for k in bn_weights)  # they train
