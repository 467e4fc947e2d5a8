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

import inspect
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, RichModelSummary, RichProgressBar
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count
from matplotlib.figure import Figure
from rich import get_console
from rich.table import Table
from torchmetrics.classification import MulticlassConfusionMatrix, MultilabelPrecisionRecallCurve

from tlkit.io import atomic_open
from tlkit.loggers import WandbLogger
from tlkit.multilabel import joined_names
from tlkit.plots import (
    confusion_matrix_figure,
    display_images,
    figure_to_array,
    image_grid_figure,
    pr_curves_figure,
    save_figure,
)
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
        # The YAML dump is plain data (no Path objects), so every logger can store it. Unset values stay in it (as
        # null): jsonargparse 4.49 renamed the option that keeps them, and warns on the old name.
        keep_unset = "skip_unset" if "skip_unset" in inspect.signature(self.parser.dump).parameters else "skip_none"
        return scrub_secrets(yaml.safe_load(self.parser.dump(self.config, **{keep_unset: False})))

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


class FitSummary(Callback):
    """Measures a fit for its closing summary: wall time, training images per second (over the training batches
    only, data loading included, validation not), and each epoch's validation metrics.

    ``tlkit fit`` prints :meth:`timing_line` and :meth:`best_line` at the end; the numbers are this process's (under
    DDP, every process sees its share of each batch, so the rate counts ``world_size`` times the local images).
    """

    def __init__(self) -> None:
        self.started = self.ended = 0.0
        self.train_seconds = 0.0
        self.train_images = 0
        self.val_history: dict[int, dict[str, float]] = {}
        self._epoch_started = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        self.train_images += _batch_size(batch)
        self.train_seconds += now - self._epoch_started
        self._epoch_started = now  # the next batch's time starts here (validation runs between epochs)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
        self.val_history[trainer.current_epoch] = metrics

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ended = time.perf_counter()

    def timing_line(self, world_size: int = 1) -> str:
        """``Trained 2 epochs in 41.3 s (384 images at 12.1 img/s in the training steps).``"""
        wall = (self.ended or time.perf_counter()) - self.started
        epochs = len({*self.val_history}) or "no"
        rate = self.train_images * world_size / self.train_seconds if self.train_seconds > 0 else math.nan
        return (
            f"Trained in {wall:.1f} s: {self.train_images * world_size} training images at {rate:.1f} img/s "
            f"(training steps with data loading; {epochs} validation epochs)."
        )

    def best(self, monitor: str, mode: str = "max") -> tuple[int, float] | None:
        """The epoch with the best ``monitor`` value (the first of equals, as ``ModelCheckpoint`` keeps it) and the
        value, or None when no validation logged it."""
        scores = [(epoch, m[monitor]) for epoch, m in sorted(self.val_history.items()) if monitor in m]
        if not scores:
            return None
        return (max if mode == "max" else min)(scores, key=lambda item: item[1])

    def best_line(self, monitor: str, mode: str = "max") -> str:
        """``Best val/acc 0.8125 at epoch 3 (last epoch 4: 0.8000).``"""
        found = self.best(monitor, mode)
        if found is None:
            return f"No validation logged {monitor} (the metric the checkpoints monitor)."
        epoch, value = found
        last_epoch = max(self.val_history)
        last = self.val_history[last_epoch].get(monitor, math.nan)
        return f"Best {monitor} {value:.4f} at epoch {epoch} (last epoch {last_epoch}: {last:.4f})."

    def last_line(self) -> str:
        """The last validation epoch's metrics, for a run without a monitored checkpoint."""
        if not self.val_history:
            return "No validation ran."
        epoch = max(self.val_history)
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in self.val_history[epoch].items())
        return f"Validation at epoch {epoch}: {metrics}."


class RunProgressBar(RichProgressBar):
    """Lightning's rich progress bar without ``v_num``: the logger's version number, shown as ``v_num: 0.000``, says
    less than the run directory that ``tlkit fit`` prints at the end."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class ModelSummaryTable(RichModelSummary):
    """Lightning's rich model summary, without the FLOPs column and total when nothing counted FLOPs (Lightning
    counts them only for a module with an ``example_input_array``, and shows zeros otherwise)."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        columns = [(name, values) for name, values in summary_data if name != "FLOPs" or total_flops]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name, justify="right" if name in ("Params", "FLOPs") else "left", no_wrap=name == "Name")
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        frozen = total_parameters - trainable_parameters
        lines = [
            f"[bold]Trainable params[/]: {get_human_readable_count(int(trainable_parameters))}",
            f"[bold]Non-trainable params[/]: {get_human_readable_count(int(frozen))}",
            f"[bold]Total params[/]: {get_human_readable_count(int(total_parameters))}",
            f"[bold]Total estimated model params size (MB)[/]: {get_formatted_model_size(model_size)}",
            f"[bold]Modules in train mode[/]: {total_training_modes['train']}",
            f"[bold]Modules in eval mode[/]: {total_training_modes['eval']}",
        ]
        if total_flops:
            lines.append(f"[bold]Total FLOPs[/]: {get_human_readable_count(total_flops)}")
        console = get_console()
        console.print(table)
        console.print("\n".join(lines))


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

    A multi-label model gets per-class precision-recall curves instead of the matrix (``val/pr_curves``,
    ``test_pr_curves.png``), and its misclassified images are those whose predicted set of classes (at the tuned
    thresholds) differs from the true one.

    The matrix and curves are torchmetrics metrics, so under DDP they count every process's images.

    Args:
        max_images: misclassified images in the grid (0 disables the grid).
    """

    def __init__(self, max_images: int = 16) -> None:
        self.max_images = max_images
        self._matrix: MulticlassConfusionMatrix | MultilabelPrecisionRecallCurve | None = None
        self._wrong: list[tuple[torch.Tensor, str]] = []  # (image, "true: ... / pred: ...")
        self._features_only = False

    def _reset(self, pl_module: L.LightningModule) -> None:
        num_classes = len(_class_names(pl_module))
        self._multilabel = bool(pl_module.hparams.get("multilabel"))
        kind = MultilabelPrecisionRecallCurve if self._multilabel else MulticlassConfusionMatrix
        self._matrix = kind(num_classes).to(pl_module.device)
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
        names = _class_names(pl_module)
        if self._multilabel:
            scores = logits.sigmoid()
            self._matrix.update(scores, targets.long())
            predicted = scores >= pl_module.thresholds.to(scores.device)
            mistaken = (predicted != targets.bool()).any(dim=1)
        else:
            predicted = logits.argmax(dim=-1)
            self._matrix.update(predicted, targets)
            mistaken = predicted != targets
        room = self.max_images - len(self._wrong)
        self._features_only |= images.ndim != 4  # a LinearProbe validates on features, not images
        if keep_images and room > 0 and images.ndim == 4:
            wrong = mistaken.nonzero().flatten()[:room].tolist()
            self._wrong += [(images[i].detach().cpu(), self._title(targets[i], predicted[i], names)) for i in wrong]

    def _title(self, target: torch.Tensor, predicted: torch.Tensor, names: list[str]) -> str:
        """``true: ...`` and ``pred: ...`` of one image: class names, or (multi-label) sets of them."""
        if self._multilabel:
            return f"true: {joined_names(target.bool(), names, '-')}\npred: {joined_names(predicted, names, '-')}"
        return f"true: {names[int(target)]}\npred: {names[int(predicted)]}"

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        computed = self._matrix.compute()  # on every rank: it synchronises the counts
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        names = _class_names(pl_module)
        key, figure = self._figure(computed, names, f"val, epoch {trainer.current_epoch}")
        log_figure(trainer, f"val/{key}", figure)
        if self.max_images:
            log_figure(trainer, "val/misclassified", self._misclassified_figure(trainer))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        computed = self._matrix.compute()
        run_dir = run_directory_on_every_rank(trainer)
        if not trainer.is_global_zero:
            return
        key, figure = self._figure(computed, _class_names(pl_module), "test")
        path = save_figure(figure, Path(run_dir) / f"test_{key}.png")
        rank_zero_info(f"Test {key.replace('_', ' ')}: {path}")
        for logger in trainer.loggers:
            if isinstance(logger, LightningWandbLogger | TensorBoardLogger):
                _log_to(logger, f"test/{key}", figure, trainer.global_step)

    def _figure(self, computed: Any, names: list[str], title: str) -> tuple[str, Figure]:
        """The epoch's confusion matrix, or (multi-label) its per-class precision-recall curves, and its key."""
        if self._multilabel:
            precision, recall, _ = computed
            return "pr_curves", pr_curves_figure(precision, recall, names, title)
        return "confusion_matrix", confusion_matrix_figure(computed, names, title)

    def _misclassified_figure(self, trainer: L.Trainer) -> Figure:
        if not self._wrong:
            note = "features (LinearProbe): no images to show" if self._features_only else "no misclassified images"
            return image_grid_figure(torch.zeros(1, 3, 8, 8), [note], title="val misclassified")
        images = torch.stack([image for image, _ in self._wrong])
        preprocess = getattr(trainer.datamodule, "preprocess", None) if trainer.datamodule is not None else None
        titles = [title for _, title in self._wrong]
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
    "FitSummary",
    "LoggerSaveConfigCallback",
    "ModelSummaryTable",
    "RunProgressBar",
    "TrainingSpeed",
    "WandbLogger",  # documented in the README as tlkit.tracking.WandbLogger (recipes name it)
    "log_figure",
    "read_wandb_config",  # documented in the README
    "read_wandb_history",  # documented in the README
]
