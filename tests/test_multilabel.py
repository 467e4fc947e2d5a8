"""Multi-label classification: sources, thresholds, the model's loss and metrics, and every command on it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_trainer
from torchvision.io import write_png

from tlkit import ImageDataModule, TransferClassifier
from tlkit.cli import main
from tlkit.data.sources import TEXTURE_PHOTOS, load_source
from tlkit.features import FeatureSet
from tlkit.fewshot import few_shot_accuracy
from tlkit.mixup import BatchMixup
from tlkit.module import THRESHOLDS_KEY
from tlkit.multilabel import best_thresholds, check_pos_weight, multilabel_loss, predicted_names
from tlkit.pairing import check_pairing
from tlkit.probe import FeatureDataModule

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("red", "green", "blue")


def write_multilabel_images(root: Path, count: int = 36, size: int = 32, seed: int = 0) -> list[list[str]]:
    """``count`` PNGs in which each of red, green, blue is bright or not, by its label set (so a model can learn
    it); returns each image's label names, in file order."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    sets = []
    for i in range(count):
        flags = rng.random(3) < 0.5
        image = torch.randint(0, 50, (3, size, size), dtype=torch.uint8)
        image[torch.as_tensor(flags)] += 200
        write_png(image, str(root / f"{i:03d}.png"))
        sets.append([name for name, on in zip(CLASSES, flags, strict=True) if on])
    return sets


def write_labels_csv(tmp_path: Path, count: int = 36) -> Path:
    sets = write_multilabel_images(tmp_path / "img", count)
    path = tmp_path / "labels.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels"])
        writer.writerows([f"img/{i:03d}.png", ";".join(names)] for i, names in enumerate(sets))
    return path


# --------------------------------------------------------------------------------------------------- sources


def test_a_labels_column_makes_a_csv_multi_label(tmp_path):
    sets = write_multilabel_images(tmp_path / "img", 40)
    path = tmp_path / "labels.csv"
    rows = [f"img/{i:03d}.png,{' ; '.join(names)}" for i, names in enumerate(sets)]
    path.write_text("path,labels\n" + "\n".join(rows) + "\n")
    data = load_source(f"csv:{path}", val_split=0.25, seed=1)
    assert data.multilabel and data.class_names == sorted(CLASSES)
    assert len(data.train) + len(data.val) == 40 and len(data.val) == 10
    splits = (data.train, data.val)
    by_path = {Path(p).name: t for split in splits for p, t in zip(split.samples, split.targets, strict=True)}
    for i, names in enumerate(sets):  # an empty cell is an image of none of the classes
        assert [data.class_names[c] for c in np.flatnonzero(by_path[f"{i:03d}.png"])] == sorted(names)
    again = load_source(f"csv:{path}", val_split=0.25, seed=1)
    assert list(again.val.samples) == list(data.val.samples)  # the split is fixed by the seed


def test_one_flag_column_per_class_makes_a_csv_multi_label_in_column_order(tmp_path):
    sets = write_multilabel_images(tmp_path / "img", 30)
    path = tmp_path / "flags.csv"
    lines = ["file,split,red,green,blue"]
    lines += [f"img/{i:03d}.png,{'val' if i % 3 == 0 else 'train'},"
              + ",".join("1" if c in names else "0" for c in CLASSES) for i, names in enumerate(sets)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    dm = ImageDataModule(f"csv:{path}", image_size=32)
    assert dm.multilabel and dm.class_names == list(CLASSES)  # the columns' order, not sorted
    train = np.stack(dm.data.train.targets)
    assert dm.class_counts == train.sum(axis=0).tolist() and len(dm.data.val) == 10
    lines[2] = lines[2].rsplit(",", 1)[0] + ",yes"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 3: column 'blue' holds 'yes'.*0 or 1"):
        load_source(f"csv:{path}")


def test_a_class_that_a_split_leaves_without_images_is_named(tmp_path):
    write_multilabel_images(tmp_path / "img", 12)
    path = tmp_path / "labels.csv"
    rows = [f"img/{i:03d}.png,{'red;rare' if i == 0 else 'red'}" for i in range(12)]
    path.write_text("path,labels\n" + "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"\['rare'\] with no (train|val) image"):
        load_source(f"csv:{path}", val_split=0.25)


def test_texture_pairs_is_multi_label_from_real_photos_without_leaks():
    data = load_source("texture-pairs")
    assert data.multilabel and data.class_names == list(TEXTURE_PHOTOS)
    train, val = np.stack(data.train.targets), np.stack(data.val.targets)
    assert len(train) == 480 and len(val) == 160 and data.train.samples[0].shape == (64, 64, 3)
    assert set(train.sum(axis=1)) == {1, 2} and (train.sum(axis=0) > 0).all() and (val.sum(axis=0) > 0).all()
    assert 0.15 < (train.sum(axis=1) == 1).mean() < 0.35  # about a quarter show one photo
    train_pixels = {s.tobytes() for s in data.train.samples}
    assert not any(s.tobytes() in train_pixels for s in data.val.samples)


def test_multi_label_loaders_yield_float_multi_hot_targets_and_refuse_a_balanced_sampler(tmp_path):
    dm = ImageDataModule("texture-pairs", image_size=32, batch_size=8, train_per_class=2)
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and targets.shape == (8, 10) and targets.dtype == torch.float32
    assert min(dm.class_counts) >= 2 and len(dm.data.train) < 480  # until every class has 2 images
    balanced = ImageDataModule("texture-pairs", image_size=32, sampler="balanced")
    balanced.setup("fit")
    with pytest.raises(ValueError, match="multi-label.*pos_weight"):
        balanced.train_dataloader()


# ------------------------------------------------------------------------------------------ thresholds, loss


@pytest.mark.parametrize("seed", range(5))
def test_best_thresholds_match_a_brute_force_search(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(40, 4, generator=generator).round(decimals=1)  # ties included
    labels = (torch.rand(40, 4, generator=generator) < 0.4).float()
    labels[:, 3] = 0  # a class without positives keeps 0.5
    thresholds, f1 = best_thresholds(scores, labels)

    def f1_at(c: int, t: float) -> float:
        predicted = scores[:, c] >= t
        tp = (predicted & labels[:, c].bool()).sum().item()
        return 2 * tp / (predicted.sum().item() + labels[:, c].sum().item())

    for c in range(3):
        best = max(f1_at(c, float(t)) for t in scores[:, c].unique())
        assert f1[c].item() == pytest.approx(best) and f1_at(c, float(thresholds[c])) == pytest.approx(best)
    assert thresholds[3] == 0.5 and torch.isnan(f1[3])


def test_pos_weight_weighs_positives_and_is_checked():
    logits, targets = torch.zeros(4, 3), torch.tensor([[1.0, 0, 0]] * 4)
    plain = multilabel_loss(logits, targets)
    weighted = multilabel_loss(logits, targets, check_pos_weight([3.0, 1.0, 1.0], 3, multilabel=True))
    assert weighted.item() == pytest.approx(plain.item() * 5 / 3)  # the positive column counts 3x
    assert check_pos_weight(2.0, 3, multilabel=True).tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="one number > 0 or 3"):
        check_pos_weight([1.0, 2.0], 3, multilabel=True)
    with pytest.raises(ValueError, match="single-label"):
        TransferClassifier("test_resnet", num_classes=3, pos_weight=2.0)
    with pytest.raises(ValueError, match="pos_weight instead"):
        TransferClassifier("test_resnet", num_classes=3, multilabel=True, class_weights="balanced")


def test_mixup_mixes_multi_hot_targets_by_the_images_factor():
    torch.manual_seed(0)
    mix = BatchMixup(3, mixup_alpha=0.4, multilabel=True)
    images = torch.stack([torch.full((3, 4, 4), float(i)) for i in range(5)])
    targets = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]])
    mixed, soft = mix(images.clone(), targets, epoch=0)
    lam = 1 - mixed[0, 0, 0, 0].item() / 3  # image 0 mixed with image 3 (its mirror among the first 4)
    assert soft[0].tolist() == pytest.approx([1.0, 1 - lam, 0.0])
    assert soft[4].tolist() == targets[4].tolist() and mixed[4].equal(images[4])  # the odd one out
    assert mix.loss(torch.zeros(5, 3), soft).item() == pytest.approx(np.log(2), rel=1e-5)


def test_predicted_names_are_the_classes_at_or_above_their_threshold():
    probabilities = torch.tensor([[0.9, 0.2, 0.4], [0.1, 0.1, 0.1]])
    assert predicted_names(probabilities, torch.tensor([0.5, 0.2, 0.5]), CLASSES) == [["red", "green"], []]


# -------------------------------------------------------------------------------------------- model and runs


def multilabel_model(**kwargs) -> TransferClassifier:
    return TransferClassifier("test_efficientnet", num_classes=10, multilabel=True, lr=0.05, **kwargs)


def test_a_multi_label_fit_logs_map_and_f1_and_keeps_tuned_thresholds_in_its_checkpoint(tmp_path):
    dm = ImageDataModule("texture-pairs", image_size=32, batch_size=16)
    model = multilabel_model(ema_decay=0.9, tta="flip")  # EMA swaps weights around validation: thresholds stay
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=4)
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    for key in ("val/map", "val/f1_micro", "val/f1_macro", "val/f1_macro_tuned", "val/acc", "val/tta_map"):
        assert 0.0 <= float(metrics[key]) <= 1.0, key
    assert not torch.equal(model.thresholds, torch.full((10,), 0.5))  # tuned, not the default
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)[THRESHOLDS_KEY] == model.thresholds.tolist()
    reloaded = TransferClassifier.load_from_checkpoint(path)
    assert reloaded.hparams.multilabel and torch.equal(reloaded.thresholds, model.thresholds)
    probabilities = reloaded.eval().predict_step(torch.randn(2, 3, 32, 32), 0)
    assert probabilities.shape == (2, 10) and not torch.allclose(probabilities.sum(1), torch.ones(2))  # sigmoids


def test_a_model_and_data_of_different_label_kinds_are_refused():
    with pytest.raises(ValueError, match="multi-label.*multilabel=False.*multilabel=True"):
        check_pairing(TransferClassifier("test_resnet", num_classes=10), ImageDataModule("texture-pairs"))
    with pytest.raises(ValueError, match="single-label.*multilabel=True"):
        check_pairing(multilabel_model(), ImageDataModule("textures"))


def test_probes_and_few_shot_refuse_multi_label_features():
    features = FeatureSet({"features": torch.randn(6, 4)}, torch.eye(3).repeat(2, 1), torch.arange(6), {})
    with pytest.raises(ValueError, match="LinearProbe learns one class.*multi-label"):
        FeatureDataModule(features)
    with pytest.raises(ValueError, match="Few-shot classification learns one class.*multi-label"):
        few_shot_accuracy(features, features, shots=[1])


def test_shards_refuse_a_multi_label_source(tmp_path):
    from tlkit.data.shards import optimize

    with pytest.raises(ValueError, match="multi-label.*one label per image"):
        optimize(source="texture-pairs", out=str(tmp_path / "shards"))


RECIPE = """
seed_everything: 0
trainer:
  max_epochs: 2
  limit_train_batches: 3
  default_root_dir: {root}
  enable_progress_bar: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {root}, name: ""}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{monitor: val/map, mode: max, filename: best}}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{filename: last}}
model:
  class_path: tlkit.TransferClassifier
  init_args: {{backbone: test_efficientnet, lr: 0.05, freeze_epochs: 1}}  # two phases: head, then everything
data:
  class_path: tlkit.ImageDataModule
  init_args: {{source: "csv:{csv}", image_size: 32, batch_size: 8, val_split: 0.3}}
"""


def test_cli_fit_test_predict_export_on_a_multi_label_csv(tmp_path):
    """The CSV alone makes the run multi-label; each command then does what a multi-label model needs."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(root=tmp_path / "run", csv=write_labels_csv(tmp_path)))
    main(["fit", "--config", str(recipe)])
    run = tmp_path / "run" / "version_0"
    ckpt = run / "checkpoints" / "best.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["hyper_parameters"]["multilabel"] is True and len(saved[THRESHOLDS_KEY]) == 3
    phases = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["FineTuningPhases"]
    assert phases["phase"] == 1 and phases["frozen"] == []  # the second phase trains everything
    assert (run / "val_pr_curves.png").stat().st_size > 0 and not (run / "val_confusion_matrix.png").exists()

    main(["test", "--config", str(recipe), "--ckpt_path", str(ckpt)])
    test_dir = next(p for p in (tmp_path / "run").rglob("test_pr_curves.png")).parent
    errors = list(csv.DictReader((test_dir / "test_most_confused.csv").open()))
    assert {row["class"] for row in errors} == set(CLASSES) and set(errors[0]) == {
        "class", "missed", "false_positives", "images"}  # fmt: skip
    top = list(csv.DictReader((test_dir / "test_top_losses.csv").open()))
    assert top and set(top[0]) == {"image", "true", "predicted", "loss"}

    out = tmp_path / "preds.csv"
    writer = ["--trainer.callbacks+=tlkit.cli.PredictionCSVWriter", f"--trainer.callbacks.out={out}"]
    main(["predict", "--config", str(recipe), "--ckpt_path", str(ckpt), *writer])
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "labels", "blue", "green", "red"]
    thresholds = dict(zip(["blue", "green", "red"], saved[THRESHOLDS_KEY], strict=True))
    for row in rows:  # exactly the classes at or above their saved thresholds
        assert set(filter(None, row["labels"].split(";"))) == {c for c, t in thresholds.items() if float(row[c]) >= t}

    onnx_file = tmp_path / "model.onnx"
    main(["export", "--ckpt_path", str(ckpt), "--format", "onnx", "--out", str(onnx_file)])
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    meta = json.loads(props["tlkit.export"])
    assert meta["multilabel"] is True and meta["thresholds"] == pytest.approx(saved[THRESHOLDS_KEY])


def test_a_soup_of_multi_label_checkpoints_is_chosen_by_map_and_keeps_its_own_thresholds(tmp_path):
    from tlkit.soup import make_soup

    dm = ImageDataModule("texture-pairs", image_size=32, batch_size=16)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = multilabel_model()
        trainer = tiny_trainer(tmp_path, limit_val_batches=4)
        trainer.fit(model, dm)
        paths.append(tmp_path / f"seed{seed}.ckpt")
        trainer.save_checkpoint(paths[-1])
    soup = make_soup(paths, tmp_path / "soup.ckpt", greedy=True, datamodule=dm,
                     trainer_kwargs={"limit_val_batches": 4})  # fmt: skip
    assert soup.metric == "val/map" and 0 < soup.val_acc <= 1
    saved = torch.load(tmp_path / "soup.ckpt", weights_only=True)
    reloaded = TransferClassifier.load_from_checkpoint(tmp_path / "soup.ckpt")
    assert saved[THRESHOLDS_KEY] == reloaded.thresholds.tolist()
    ingredients = [torch.load(path, weights_only=True)[THRESHOLDS_KEY] for path in paths]
    assert len(soup.ingredients) == 1 or saved[THRESHOLDS_KEY] not in ingredients  # tuned on the soup


def test_ddp_fit_tunes_thresholds_on_every_ranks_images_and_logs_map_and_pr_curves_to_wandb(tmp_path):
    """2 processes (gloo), the W&B logger offline: the thresholds in the checkpoint are those of the whole val set
    (both ranks' halves), as one process finds them from the same weights."""
    import os
    import subprocess
    import sys

    from tlkit.runs import read_wandb_history

    root = Path(__file__).resolve().parents[1]
    logger = {"class_path": "tlkit.tracking.WandbLogger", "init_args": {"save_dir": str(tmp_path), "project": "t"}}
    recipe = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 2, "strategy": "ddp", "limit_train_batches": 2,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False, "default_root_dir": str(tmp_path),
                    "logger": logger, "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                                     "init_args": {"filename": "last"}}]},
        "model": {"class_path": "tlkit.TransferClassifier", "init_args": {"backbone": "test_efficientnet", "lr": 0.1}},
        "data": {"class_path": "tlkit.ImageDataModule",
                 "init_args": {"source": "texture-pairs", "image_size": 32, "batch_size": 8, "augment": "none"}},
    }  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "HOME": str(tmp_path)}
    env["WANDB_MODE"] = "offline"
    cmd = [sys.executable, "-m", "tlkit.cli", "fit", "--config", str(tmp_path / "recipe.yaml")]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    history = read_wandb_history(run)
    logged = {key for row in history for key in row}
    assert {"val/map", "val/f1_micro", "val/f1_macro", "val/f1_macro_tuned", "val/pr_curves"} <= logged, logged
    assert "val/confusion_matrix" not in logged

    (ckpt,) = tmp_path.rglob("last.ckpt")
    saved = torch.load(ckpt, weights_only=True)[THRESHOLDS_KEY]
    model = TransferClassifier.load_from_checkpoint(ckpt)
    dm = ImageDataModule("texture-pairs", image_size=32, batch_size=8, augment="none", data_config=model.data_config)
    tiny_trainer(tmp_path, limit_val_batches=1.0).validate(model, dm, verbose=False)  # all 160 images, one process
    assert model.thresholds.tolist() == pytest.approx(saved, abs=1e-5)
