"""W&B offline runs (read back with wandb's own record format), one run under DDP, no secrets in the run directory,
CSV and TensorBoard loggers, confusion matrix / misclassified figures, throughput and config logging."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from tlkit import ImageDataModule, TransferClassifier
from tlkit.cli import main
from tlkit.loggers import WandbLogger
from tlkit.runs import read_wandb_config, read_wandb_history
from tlkit.secrets import REDACTED, scrub_secrets, secret_values
from tlkit.tracking import ClassificationFigures, TrainingSpeed

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "dummy0wandb0key0" + "0123456789abcdef" * 2  # 48 chars, looks like a real key
TOKEN = "svc-token-4f1c9a7e2b"


def _recipe(tmp_path: Path, logger: dict | None, **trainer) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "devices": 1,
            "limit_train_batches": 2,
            "limit_val_batches": 2,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path),
            "logger": logger,
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"monitor": "val/acc"}}
            ],
            **trainer,
        },
        "model": {"class_path": "tlkit.TransferClassifier", "init_args": {"backbone": "test_efficientnet"}},
        "data": {
            "class_path": "tlkit.ImageDataModule",
            "init_args": {"source": "textures", "image_size": 32, "batch_size": 8, "augment": "none"},
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _files_containing(folder: Path, *needles: str) -> list[str]:
    hits = []
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path} contains {n[:6]}..." for n in needles if n.encode() in data]
    return hits


def test_ddp_fit_makes_one_offline_wandb_run_with_metrics_figures_config_and_no_secrets(tmp_path):
    """The real command line, 2 processes (gloo), secrets in the environment and in a command-line override."""
    logger = {"class_path": "tlkit.tracking.WandbLogger", "init_args": {"save_dir": str(tmp_path), "project": "t"}}
    recipe = _recipe(tmp_path, logger, devices=2, strategy="ddp", num_sanity_val_steps=0, limit_val_batches=1)
    env = {**os.environ, "WANDB_API_KEY": API_KEY, "MY_SERVICE_TOKEN": TOKEN, "WANDB_MODE": "offline"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HOME=str(tmp_path))
    override = ["--data.init_args.predict_source", f"folder:/data/{TOKEN}"]  # a secret in argv and in the config
    cmd = [sys.executable, "-m", "tlkit.cli", "fit", "--config", str(recipe), *override]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # rank 0 only
    assert _files_containing(tmp_path / "wandb", API_KEY, TOKEN) == []

    history = read_wandb_history(runs[0])
    logged = {key for row in history for key in row}
    expected = {"train/loss_step", "train/acc", "val/acc", "val/f1", "val/loss", "lr/head", "perf/img_per_s"}
    assert expected <= logged, logged
    images = [row[key] for row in history for key in ("val/confusion_matrix", "val/misclassified") if key in row]
    assert len(images) == 2 and all(image["_type"] == "images/separated" for image in images)
    assert all((runs[0] / "files" / name).is_file() for image in images for name in image["filenames"])
    assert all(row["perf/img_per_s"] > 0 for row in history if "perf/img_per_s" in row)

    config = read_wandb_config(runs[0])
    assert config["model"]["init_args"]["backbone"] == "test_efficientnet"  # the full recipe
    assert config["trainer"]["strategy"] == "ddp"
    assert config["data"]["init_args"]["predict_source"] == f"folder:/data/{REDACTED}"
    assert config["lr"] == 0.01  # and the module's hyperparameters


def test_ddp_test_writes_the_test_confusion_matrix_once(tmp_path):
    """`tlkit test` on 2 processes (gloo): the test figure's folder is asked of every rank (a broadcast), or rank 0
    waits for the others forever."""
    recipe = _recipe(tmp_path, None, devices=2, strategy="ddp", limit_test_batches=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tlkit.cli", "test", "--config", str(recipe)]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(tmp_path.rglob("test_confusion_matrix.png"))) == 1


def test_wandb_goes_offline_without_credentials_and_says_how_to_sync(tmp_path, monkeypatch, caplog):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    monkeypatch.chdir(tmp_path)
    logger = WandbLogger(save_dir=str(tmp_path / "runs"), project="t", log_model=True)  # no network: still fine
    assert logger.offline
    with caplog.at_level(logging.INFO):
        run = logger.experiment
    run.finish()
    lines = [r.getMessage() for r in caplog.records if "W&B" in r.getMessage()]
    assert len(lines) == 1, lines
    run_dir = next((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert f"wandb sync {os.path.relpath(run_dir)}" in lines[0]

    monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    assert WandbLogger(save_dir=str(tmp_path), offline=None).offline is False  # a key: online
    assert WandbLogger(save_dir=str(tmp_path), offline=True).offline is True
    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {API_KEY}\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert WandbLogger(save_dir=str(tmp_path)).offline is False  # `wandb login`: online


def test_scrub_secrets_by_environment_value_and_by_key():
    secrets = secret_values({"MY_SERVICE_TOKEN": TOKEN, "HOME": "/home/someone", "SHORT_KEY": "1"})
    assert secrets == {TOKEN: "MY_SERVICE_TOKEN"}
    config = {"a": [f"x{TOKEN}y", 3], "nested": {"api_key": "plain", "monitor": "val/acc"}, "home": "/home/someone"}
    assert scrub_secrets(config, secrets) == {
        "a": [f"x{REDACTED}y", 3],
        "nested": {"api_key": REDACTED, "monitor": "val/acc"},
        "home": "/home/someone",
    }


def _fit(tmp_path: Path, logger) -> L.Trainer:
    phases = [{"epochs": 1, "freeze": "backbone"}, {"epochs": 1, "freeze": "none"}]
    model = TransferClassifier(
        "test_efficientnet", num_classes=10, class_names=[f"c{i}" for i in range(10)], phases=phases
    )
    data = ImageDataModule("textures", image_size=32, batch_size=8, augment="none")
    trainer = L.Trainer(
        max_epochs=2, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0, log_every_n_steps=1,
        logger=logger,
        callbacks=[TrainingSpeed(), ClassificationFigures(max_images=4)], enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, data)
    return trainer


def test_csv_and_tensorboard_loggers_get_metrics_throughput_and_figures(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    csv_logger, tb_logger = CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")
    _fit(tmp_path, [csv_logger, tb_logger])

    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(row.get("perf/img_per_s") for row in rows)
    assert any(row.get("val/acc") for row in rows)
    assert {float(row["phase"]) for row in rows if row.get("phase")} == {0.0, 1.0}  # the phase of every step
    for name in ("val_confusion_matrix.png", "val_misclassified.png"):
        assert (Path(csv_logger.log_dir) / name).read_bytes()[:4] == b"\x89PNG"

    events = EventAccumulator(tb_logger.log_dir, size_guidance={"images": 0}).Reload()
    assert {"val/confusion_matrix", "val/misclassified"} <= set(events.Tags()["images"])
    assert {"perf/img_per_s", "val/acc", "lr/head"} <= set(events.Tags()["scalars"])


def test_cli_test_writes_confusion_matrix_png_next_to_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}}
    main(["test", "--config", str(_recipe(tmp_path, logger, limit_test_batches=2))])
    log_dir = next(tmp_path.glob("lightning_logs/version_*"))
    assert (log_dir / "metrics.csv").exists()
    assert (log_dir / "test_confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    hparams = yaml.safe_load((log_dir / "hparams.yaml").read_text())
    assert hparams["data"]["init_args"]["source"] == "textures"  # the recipe, logged as hyperparameters


def test_read_wandb_history_and_config_across_log_blocks(tmp_path, monkeypatch):
    """Records longer than a 32 KiB block (split into first/middle/last pieces) and many blocks, from wandb itself."""
    import wandb

    monkeypatch.chdir(tmp_path)
    note = "".join(f"{i:05d}" for i in range(16000))  # 80 kB: one config record over three blocks
    run = wandb.init(
        mode="offline", dir=tmp_path, project="t", config={"note": note}, settings=wandb.Settings(silent=True)
    )
    for step in range(200):
        run.log({"a": step, "b": step / 2, "nested/c": -step})
    run.finish()
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    assert next(run_dir.glob("*.wandb")).stat().st_size > 3 * 32768
    history = read_wandb_history(run_dir)
    assert [row["a"] for row in history] == list(range(200))
    assert history[-1]["b"] == 99.5 and history[-1]["nested/c"] == -199
    assert read_wandb_config(run_dir)["note"] == note


def test_read_wandb_history_rejects_a_file_that_is_not_a_wandb_log(tmp_path):
    (tmp_path / "run-x.wandb").write_bytes(b"not a log at all")
    with pytest.raises(ValueError, match="not a W&B transaction log"):
        read_wandb_history(tmp_path)
    with pytest.raises(FileNotFoundError, match="offline-run"):
        read_wandb_history(tmp_path / "missing")


def test_wandb_test_confusion_matrix_png_goes_to_the_run_folder_not_the_shared_save_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logger = WandbLogger(save_dir=str(tmp_path), project="t", offline=True)  # wandb.init's mode, whatever wandb cached
    model = TransferClassifier("test_efficientnet", num_classes=10, class_names=[f"c{i}" for i in range(10)])
    data = ImageDataModule("textures", image_size=32, batch_size=8, augment="none")
    trainer = L.Trainer(
        logger=logger, callbacks=[ClassificationFigures()], limit_test_batches=1, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.test(model, data)
    logger.experiment.finish()
    assert (tmp_path / "t" / logger.version / "test_confusion_matrix.png").is_file()
    assert not (tmp_path / "test_confusion_matrix.png").exists()  # trainer.log_dir: every W&B run's save_dir
