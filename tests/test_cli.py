"""End-to-end: the `tlkit` command on recipes, as a user runs it."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from tlkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = """
seed_everything: 0
trainer:
  max_epochs: 1
  limit_train_batches: 3
  limit_val_batches: 2
  default_root_dir: {root}
  enable_progress_bar: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {root}, name: ""}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{monitor: val/acc, mode: max}}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{filename: last, enable_version_counter: false}}
model:
  class_path: tlkit.TransferClassifier
  init_args: {{backbone: resnet18, freeze: "stages:2", lr: 0.05}}
data:
  class_path: tlkit.ImageDataModule
  init_args: {{source: digits, image_size: 32, batch_size: 16, preprocess: dataset}}
"""


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(root=tmp_path / "run"))
    return path


def test_fit_writes_checkpoint_and_resolved_config_and_reports_accuracy(recipe, tmp_path, capsys):
    main(["fit", "--config", str(recipe)])
    run = tmp_path / "run" / "version_0"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["init_args"]["backbone"] == "resnet18" and config["data"]["init_args"]["source"] == "digits"
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0 and last["global_step"] == 3  # the final state, to resume from
    hparams = last["hyper_parameters"]
    assert hparams["num_classes"] == 10  # taken from the data, not stated in the recipe
    assert hparams["class_names"] == [str(i) for i in range(10)]
    out = capsys.readouterr()
    assert "Best val/acc" in out.out + out.err and f"Run directory: {run}" in out.out + out.err


def test_predict_writes_a_csv_of_class_names(recipe, tmp_path):
    main(["fit", "--config", str(recipe)])
    ckpt = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    out = tmp_path / "preds.csv"
    writer = ["--trainer.callbacks+=tlkit.cli.PredictionCSVWriter", f"--trainer.callbacks.out={out}"]
    main(["predict", "--config", str(recipe), "--ckpt_path", str(ckpt), *writer])
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 359  # the digits val split
    assert {r["prediction"] for r in rows} <= {str(i) for i in range(10)}
    assert all(0.0 < float(r["probability"]) <= 1.0 for r in rows)


def test_print_config_works_on_every_recipe(capsys):
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        # an overlay recipe (ddp.yaml: the strategy alone) is used on top of a full one
        full = recipe if "model" in yaml.safe_load(recipe.read_text()) else ROOT / "recipes" / "quickstart.yaml"
        base = [] if full == recipe else ["--config", str(full)]
        model_class = yaml.safe_load(full.read_text())["model"]["class_path"]  # TransferClassifier or LinearProbe
        with pytest.raises(SystemExit) as exit_info:  # in-process: a subprocess per recipe costs ~9 s of imports
            main(["fit", *base, "--config", str(recipe), "--print_config"])
        captured = capsys.readouterr()
        assert exit_info.value.code in (0, None), f"{recipe.name}: {captured.err[-2000:]}"
        assert yaml.safe_load(captured.out)["model"]["class_path"] == model_class, recipe.name


def test_backbones_command_lists_matching_names(capsys):
    main(["backbones", "--filter", "torchvision/resnet1*"])
    assert capsys.readouterr().out.split() == ["torchvision/resnet101", "torchvision/resnet152", "torchvision/resnet18"]


def test_console_script_is_installed():
    result = subprocess.run(["tlkit", "backbones", "--filter", "resnet18"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "resnet18" in result.stdout.split()


def test_fit_with_a_fixed_size_backbone_at_the_recipes_image_size_names_the_setting(recipe):
    # A recipe's image_size (32 here, 64 in the shipped ones) with a ViT swapped in: timm's assertion from inside the
    # patch embedding, at the first batch, was all a user saw.
    with pytest.raises(ValueError, match=r"test_vit3 takes 160x160 images .* failed on 32x32: .*image_size: null"):
        main(["fit", "--config", str(recipe), "--model.init_args.backbone", "test_vit3"])


def test_predictions_of_files_whose_names_are_not_utf8(recipe, tmp_path):
    # An old Windows zip's Latin-1 name: predictions.csv raised "surrogates not allowed" and was lost.
    import os

    import numpy as np
    from PIL import Image

    main(["fit", "--config", str(recipe)])
    photos = tmp_path / "photos"
    photos.mkdir()
    name = os.fsdecode(os.fsencode(photos) + b"/caf\xe9.png")
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint8)).save(name)
    out = tmp_path / "preds.csv"
    writer = ["--trainer.callbacks+=tlkit.cli.PredictionCSVWriter", f"--trainer.callbacks.out={out}"]
    ckpt = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    main(["predict", "--config", str(recipe), "--ckpt_path", str(ckpt), "--data.init_args.predict_source",
          str(photos), *writer])  # fmt: skip
    with open(out, encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [name] and Path(rows[0]["path"]).exists()
