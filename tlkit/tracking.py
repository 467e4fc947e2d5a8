"""Callbacks that track a run for every logger: throughput, classification figures, and the resolved recipe.

- :class:`TrainingSpeed`: throughput in images per second and the fine-tuning phase (when the module has one).
- :class:`ClassificationFigures`: confusion matrix and a grid of misclassified images at the end of validation,
  and the test confusion matrix as a PNG next to the metrics, for W&B, TensorBoard or any other logger.
- :class:`LoggerSaveConfigCallback`: the full resolved recipe as the run's config (W&B config, ``hparams.yaml``...).

The callbacks only draw on global rank 0, so a DDP job logs each figure once. The W&B logger is
:class:`tlkit.loggers.WandbLogger` and the run readers are in :mod:`tlkit.runs`; the README's names
``tlkit.tracking.WandbLogger``, ``read_wandb_history`` and ``read_wandb_config`` (and recipes naming
``class_path: tlkit.tracking.WandbLogger``) still import from here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info
from matplotlib.figure import Figure
from torchmetrics.classification import MulticlassConfusionMatrix

from tlkit.io import atomic_open
from tlkit.loggers import WandbLogger
from tlkit.plots import confusion_matrix_figure, display_images, figure_to_array, image_grid_figure, save_figure
from tlkit.runs import read_wandb_config, read_wandb_history, run_directory, run_directory_on_every_rank
from tlkit.secrets import scrub_secrets


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml``, scrubbed of secrets, in the run's own directory
    (:func:`~tlkit.runs.run_directory`: next to its ``checkpoints/``, for W&B too), and logs the full resolved recipe
    as the hyperparameters of the run: the W&B config, TensorBoard's hparams, CSV's ``hparams.yaml``."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning's version writes to trainer.log_dir, which for W&B is the save_dir every run shares.
        if self.already_saved:
            return
        if trainer.is_global_zero:
            if self.save_to_log_dir:
                self._write_config(Path(run_directory(trainer)) / self.config_filename)
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def _write_config(self, path: Path) -> None:
        if path.exists() and not self.overwrite:
            raise RuntimeError(f"{str(path)!r} exists; not overwriting the config of another run.")
        with atomic_open(path, "w") as f:
            yaml.safe_dump(self._scrubbed_config(), f, sort_keys=False)

    def _scrubbed_config(self) -> dict[str, Any]:
        # The YAML dump is plain data (no Path objects), so every logger can store it.
        return scrub_secrets(yaml.safe_load(self.parser.dump(self.config, skip_none=False)))

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = self._scrubbed_config()
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


class TrainingSpeed(Callback):
    """Logs training throughput (``perf/img_per_s``, over all processes) and the phase every
    ``log_every_n_steps``.

    The phase is logged as ``phase`` when the module has a numeric ``phase_index`` or ``phase`` attribute (gradual
    unfreezing: 0, 1, 2...).
    """

    def __init__(self) -> None:
        self._images = 0
        self._since = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._images, self._since = 0, time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += _batch_size(batch)
        if trainer.global_step % max(trainer.log_every_n_steps, 1) != 0:
            return
        elapsed = time.perf_counter() - self._since
        # CPU tensors: Lightning would copy a Python number to the module's device, a host-device synchronisation.
        if elapsed > 0:
            rate = self._images * trainer.world_size / elapsed  # every process sees its own share of the batch
            pl_module.log("perf/img_per_s", torch.tensor(rate), on_step=True, on_epoch=False, batch_size=1)
        phase = _phase(pl_module)
        if phase is not None:
            pl_module.log("phase", torch.tensor(float(phase)), on_step=True, on_epoch=False, batch_size=1)
        self._images, self._since = 0, time.perf_counter()


def _batch_size(batch: Any) -> int:
    images = batch[0] if isinstance(batch, list | tuple) else batch
    return len(images)


def _phase(pl_module: L.LightningModule) -> float | None:
    for name in ("phase_index", "phase"):
        value = getattr(pl_module, name, None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
    return None


class ClassificationFigures(Callback):
    """Draws the confusion matrix and the misclassified images of validation and test, for every logger.

    At the end of each validation epoch (not the sanity check): ``val/confusion_matrix`` and ``val/misclassified``
    (up to ``max_images`` images titled with true and predicted class names). At the end of ``test``:
    ``test/confusion_matrix``, also written as ``test_confusion_matrix.png`` in the run's own directory
    (:func:`~tlkit.runs.run_directory`). W&B gets ``wandb.Image``s, TensorBoard images; other loggers (CSV) get
    PNG files in the run directory (``val_confusion_matrix.png``, ...), overwritten each epoch.

    The matrix is a torchmetrics metric, so under DDP it counts every process's images.

    Args:
        max_images: misclassified images in the grid (0 disables the grid).
    """

    def __init__(self, max_images: int = 16) -> None:
        self.max_images = max_images
        self._matrix: MulticlassConfusionMatrix | None = None
        self._wrong: list[tuple[torch.Tensor, int, int]] = []
        self._features_only = False

    def _reset(self, pl_module: L.LightningModule) -> None:
        num_classes = len(_class_names(pl_module))
        self._matrix = MulticlassConfusionMatrix(num_classes).to(pl_module.device)
        self._wrong, self._features_only = [], False

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(pl_module)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._update(pl_module, outputs, batch, keep_images=not trainer.sanity_checking)

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._update(pl_module, outputs, batch, keep_images=False)

    def _update(self, pl_module: L.LightningModule, outputs: Any, batch: Any, keep_images: bool) -> None:
        images, targets = batch[0], batch[1]
        logits = outputs.get("logits") if isinstance(outputs, dict) else None
        if logits is None:  # a module whose eval step returns nothing: one more forward pass
            with torch.no_grad():
                logits = pl_module(images)
        predicted = logits.argmax(dim=-1)
        self._matrix.update(predicted, targets)
        room = self.max_images - len(self._wrong)
        self._features_only |= images.ndim != 4  # a LinearProbe validates on features, not images
        if keep_images and room > 0 and images.ndim == 4:
            wrong = (predicted != targets).nonzero().flatten()[:room].tolist()
            self._wrong += [(images[i].detach().cpu(), int(targets[i]), int(predicted[i])) for i in wrong]

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        matrix = self._matrix.compute()  # on every rank: it synchronises the counts
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        names = _class_names(pl_module)
        title = f"val, epoch {trainer.current_epoch}"
        log_figure(trainer, "val/confusion_matrix", confusion_matrix_figure(matrix, names, title))
        if self.max_images:
            log_figure(trainer, "val/misclassified", self._misclassified_figure(trainer, names))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        matrix = self._matrix.compute()
        run_dir = run_directory_on_every_rank(trainer)
        if not trainer.is_global_zero:
            return
        figure = confusion_matrix_figure(matrix, _class_names(pl_module), "test")
        path = save_figure(figure, Path(run_dir) / "test_confusion_matrix.png")
        rank_zero_info(f"Test confusion matrix: {path}")
        for logger in trainer.loggers:
            if isinstance(logger, LightningWandbLogger | TensorBoardLogger):
                _log_to(logger, "test/confusion_matrix", figure, trainer.global_step)

    def _misclassified_figure(self, trainer: L.Trainer, names: list[str]) -> Figure:
        if not self._wrong:
            note = "features (LinearProbe): no images to show" if self._features_only else "no misclassified images"
            return image_grid_figure(torch.zeros(1, 3, 8, 8), [note], title="val misclassified")
        images = torch.stack([image for image, _, _ in self._wrong])
        preprocess = getattr(trainer.datamodule, "preprocess", None) if trainer.datamodule is not None else None
        titles = [f"true: {names[t]}\npred: {names[p]}" for _, t, p in self._wrong]
        return image_grid_figure(display_images(images, preprocess), titles, title="val misclassified")


def _class_names(pl_module: L.LightningModule) -> list[str]:
    names = getattr(pl_module, "class_names", None)
    if names:
        return list(names)
    return [str(i) for i in range(int(pl_module.hparams["num_classes"]))]


def log_figure(trainer: L.Trainer, key: str, figure: Figure) -> None:
    """Sends a matplotlib figure to every logger of ``trainer``: a ``wandb.Image`` for W&B, an image for
    TensorBoard, and a PNG in the run directory for the others (``val/confusion_matrix`` ->
    ``val_confusion_matrix.png``)."""
    for logger in trainer.loggers:
        _log_to(logger, key, figure, trainer.global_step)
    if not trainer.loggers:
        save_figure(figure, Path(trainer.default_root_dir) / _png_name(key))


def _log_to(logger: Any, key: str, figure: Figure, step: int) -> None:
    if isinstance(logger, LightningWandbLogger):
        logger.log_image(key, [figure_to_array(figure)], step=step)
    elif isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(key, figure_to_array(figure), global_step=step, dataformats="HWC")
    else:
        save_figure(figure, Path(logger.log_dir or logger.save_dir or ".") / _png_name(key))


def _png_name(key: str) -> str:
    return f"{key.replace('/', '_')}.png"


__all__ = [
    "ClassificationFigures",
    "LoggerSaveConfigCallback",
    "TrainingSpeed",
    "WandbLogger",  # documented in the README as tlkit.tracking.WandbLogger (recipes name it)
    "log_figure",
    "read_wandb_config",  # documented in the README
    "read_wandb_history",  # documented in the README
]
