"""Learning-rate schedules simulated from a recipe (checked against a real run), `tlkit plot-schedule`, figures."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml

from tlkit import TransferClassifier
from tlkit.cli import main, recipe_lr_schedule
from tlkit.data.preprocess import Normalize
from tlkit.plots import (
    confusion_matrix_figure,
    display_images,
    figure_to_array,
    image_grid_figure,
    lr_schedule_figure,
)
from tlkit.schedule import PlannedRun, module_lr_schedule


def _recipe(tmp_path: Path, **model) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 2,
            "limit_train_batches": 2,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
        },
        "model": {
            "class_path": "tlkit.TransferClassifier",
            "init_args": {"backbone": "test_efficientnet", "freeze": "stages:2", **model},
        },
        "data": {"class_path": "tlkit.ImageDataModule", "init_args": {"image_size": 32, "batch_size": 8}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_simulated_schedule_matches_the_learning_rates_of_a_real_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(tmp_path, schedule="cosine", warmup_epochs=1, lr=0.05)
    curves, run = recipe_lr_schedule(["--config", str(recipe)])
    assert (run.steps_per_epoch, run.estimated_stepping_batches) == (2, 4)

    main(["fit", "--config", str(recipe)])
    with open(next(tmp_path.glob("lightning_logs/version_*/metrics.csv"))) as f:
        logged = [float(row["lr/head"]) for row in csv.DictReader(f) if row.get("lr/head")]
    assert logged == pytest.approx(curves["head"], rel=1e-6)
    assert max(curves["head"]) == pytest.approx(0.05)
    # frozen stages have no group; every trainable stage does, with and without weight decay
    assert "stem" not in curves and {"head", "head/no_decay", "blocks.4.0+"} <= set(curves)


def test_simulated_schedule_of_a_phased_run_matches_the_real_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    phases = [{"epochs": 1, "freeze": "backbone", "lr": 0.05}, {"freeze": "stages:2", "lr": 0.02}]
    recipe = _recipe(tmp_path, schedule="cosine", phases=phases)
    curves, _ = recipe_lr_schedule(["--config", str(recipe)])
    assert len(curves["head"]) == 4 and curves["head"][0] == pytest.approx(0.05)
    stage = "blocks.4.0+"
    assert all(math.isnan(v) for v in curves[stage][:2]) and not any(math.isnan(v) for v in curves[stage][2:])

    main(["fit", "--config", str(recipe)])
    with open(next(tmp_path.glob("lightning_logs/version_*/metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["lr/head"]) for r in rows if r.get("lr/head")] == pytest.approx(curves["head"], rel=1e-6)
    logged = [float(r[f"lr/{stage}"]) for r in rows if r.get(f"lr/{stage}")]
    assert logged == pytest.approx(curves[stage][2:], rel=1e-6)  # only trained, so only logged, in phase 2


def test_simulating_the_phases_leaves_the_model_in_its_phase():
    phases = [{"epochs": 1, "freeze": "backbone", "lr": 0.05}, {"freeze": "none", "lr": 0.02}]
    model = TransferClassifier("test_efficientnet", num_classes=3, phases=phases, schedule="constant")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    curves = module_lr_schedule(model, PlannedRun(steps_per_epoch=2, max_epochs=3))
    assert curves["head"] == pytest.approx([0.05] * 2 + [0.02] * 4)
    assert all(math.isnan(v) for v in curves["stem"][:2]) and curves["stem"][2:] == pytest.approx([0.02] * 4)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert (model.phase_index, model.phase.freeze, model.phase_epochs) == (0, "backbone", None)


def test_step_counting_follows_batches_limits_accumulation_and_max_steps(tmp_path):
    recipe = ["--config", str(_recipe(tmp_path))]
    # textures: 480 training images; batch 8 -> 60 batches; accumulation 4 -> 15 steps per epoch
    _, run = recipe_lr_schedule(
        [*recipe, "--trainer.limit_train_batches", "1.0", "--trainer.accumulate_grad_batches", "4"]
    )
    assert (run.steps_per_epoch, run.estimated_stepping_batches) == (15, 30)
    _, run = recipe_lr_schedule([*recipe, "--trainer.limit_train_batches", "0.5", "--trainer.max_steps", "20"])
    assert (run.steps_per_epoch, run.estimated_stepping_batches) == (30, 20)


@pytest.mark.parametrize(
    ("schedule", "distinct"),
    [("step", {1.0, 0.1, 0.01}), ("linear", None), ("cosine", None), ("constant", {1.0})],
)
def test_schedule_shapes(schedule, distinct):
    model = TransferClassifier("test_efficientnet", num_classes=3, schedule=schedule, lr=1.0)
    curves = module_lr_schedule(model, PlannedRun(steps_per_epoch=10, max_epochs=3))
    head = curves["head"]
    assert len(head) == 30 and head[0] == pytest.approx(1.0)
    if distinct is not None:
        assert {round(v, 6) for v in head} == distinct
    else:  # decreasing to zero: linear by equal steps, cosine slowly at both ends
        steps = [a - b for a, b in zip(head, head[1:], strict=False)]
        assert all(s > 0 for s in steps)
        assert head[-1] < 0.05
        if schedule == "linear":
            assert max(steps) == pytest.approx(min(steps))
        else:
            assert steps[0] < steps[15] > steps[-1]


def test_plot_schedule_command_writes_png(tmp_path, capsys):
    out = tmp_path / "plots" / "lr.png"
    main(["plot-schedule", "--config", str(_recipe(tmp_path)), "-o", str(out), "--model.init_args.schedule", "step"])
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "4 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["plot-schedule", "-o", str(out)])  # --config is required


def test_lr_schedule_figure_draws_one_line_per_distinct_curve():
    curves = {"head": [1.0, 0.5], "head/no_decay": [1.0, 0.5], "layer4": [0.1, 0.05]}
    ax = lr_schedule_figure(curves, steps_per_epoch=1).axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["head", "layer4"]


def test_confusion_matrix_figure_and_image_grid_render():
    matrix = torch.tensor([[5, 1], [0, 4]])
    image = figure_to_array(confusion_matrix_figure(matrix, ["cat", "dog"], "val"))
    assert image.dtype.name == "uint8" and image.ndim == 3 and image.shape[2] == 3
    assert "accuracy 0.900" in confusion_matrix_figure(matrix, ["cat", "dog"]).axes[0].get_title()
    with pytest.raises(ValueError, match="expected \\(3, 3\\)"):
        confusion_matrix_figure(matrix, ["a", "b", "c"])
    grid = image_grid_figure(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), ["a", "b", "c"], columns=2)
    assert sum(ax.get_title() != "" for ax in grid.axes) == 3


def test_display_images_inverts_normalisation_exactly():
    images = torch.rand(2, 3, 4, 4)
    norm = Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert torch.allclose(display_images(norm(images), norm), images, atol=1e-6)
    shown = display_images(torch.randn(2, 3, 4, 4) * 7)  # whitened: any range -> [0, 1]
    assert shown.min() >= 0 and shown.max() <= 1
    assert not math.isnan(shown.sum().item())


def test_a_module_without_a_schedule_is_refused_by_name():
    from tlkit import LinearProbe

    with pytest.raises(TypeError, match="A LinearProbe has no learning-rate schedule to simulate"):
        module_lr_schedule(LinearProbe(num_features=4, num_classes=2), PlannedRun(steps_per_epoch=1, max_epochs=1))
