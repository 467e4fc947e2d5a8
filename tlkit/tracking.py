"""Experiment tracking: a W&B logger that goes offline by itself, callbacks that log what a run needs, no secrets.

- :class:`WandbLogger`: Lightning's ``WandbLogger``, offline (with one line saying how to upload later) when no
  API key is configured, quiet, and scrubbing secrets from what it logs as config.
- :class:`TrainingSpeed`: throughput in images per second and the fine-tuning phase (when the module has one).
- :class:`ClassificationFigures`: confusion matrix and a grid of misclassified images at the end of validation,
  and the test confusion matrix as a PNG next to the metrics, for W&B, TensorBoard or any other logger.
- :class:`LoggerSaveConfigCallback`: the full resolved recipe as the run's config (W&B config, ``hparams.yaml``...).
- :func:`read_wandb_history`, :func:`read_wandb_config`: the metrics and config of an (offline) run, read back
  from its ``.wandb`` transaction log.

Lightning's own ``WandbLogger`` only creates its run on global rank 0, and these callbacks only draw there, so a
DDP job has one W&B run.
"""

from __future__ import annotations

import contextlib
import json
import netrc
import os
import struct
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from matplotlib.figure import Figure
from torchmetrics.classification import MulticlassConfusionMatrix

from tlkit.io import atomic_open
from tlkit.plots import confusion_matrix_figure, display_images, figure_to_array, image_grid_figure, save_figure
from tlkit.secrets import scrub_secrets, secret_values

# ------------------------------------------------------------------------------------------------------------ W&B


def wandb_credentials_found() -> bool:
    """Whether W&B could authenticate without asking: ``WANDB_API_KEY``, an identity token file, or ``wandb login``
    (an entry for the W&B host in ``~/.netrc``)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` that never blocks: offline unless W&B credentials are configured.

    With ``offline=None`` (the default) the run goes online only when an API key is configured (``WANDB_API_KEY``
    or ``wandb login``) or ``WANDB_MODE`` says so; otherwise it is written to ``<save_dir>/wandb/offline-run-*`` and
    one line says how to upload it (``wandb sync <dir>``). W&B's own console output is silenced unless
    ``quiet=False``. Hyperparameters are scrubbed of secrets (:func:`scrub_secrets`) before they are logged.

    Args:
        project: W&B project.
        name: display name of the run.
        save_dir: folder that holds the ``wandb/`` run folders.
        version: run id, to resume a run.
        offline: ``True``/``False`` to force; ``None`` decides from the credentials (see above).
        log_model: upload checkpoints as artifacts: ``True`` (at the end, the best and last), ``"all"`` (as they are
            saved) or ``False``.
        entity: W&B team or user.
        group: group of runs (e.g. a sweep).
        tags: run tags.
        quiet: silence W&B's own console messages.
        **kwargs: passed to ``wandb.init``.

    Example:
        >>> logger = WandbLogger(project="tlkit", save_dir="runs/quickstart_wandb")  # offline without an API key
    """

    def __init__(
        self,
        project: str | None = "tlkit",
        name: str | None = None,
        save_dir: str = ".",
        version: str | None = None,
        offline: bool | None = None,
        log_model: bool | Literal["all"] = False,
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        quiet: bool = True,
        **kwargs: Any,
    ):
        self.auto_offline = offline is None and not os.environ.get("WANDB_MODE") and not wandb_credentials_found()
        if (self.auto_offline or offline) and kwargs.get("mode") is None:
            # wandb's own offline mode rather than Lightning's `offline=True`, which refuses `log_model`: offline
            # runs keep their artifacts, and `wandb sync` uploads them with the rest.
            kwargs["mode"] = "offline"
        if quiet and kwargs.get("settings") is None:  # the CLI passes every wandb.init argument, None if unset
            import wandb

            kwargs["settings"] = wandb.Settings(silent=True)
        Path(save_dir).mkdir(parents=True, exist_ok=True)  # wandb falls back to a temp dir if it does not exist
        extra = {k: v for k, v in dict(entity=entity, group=group, tags=tags).items() if v is not None}
        # wandb.init's own arguments (notes, name, tags, config...) go to the .wandb log as they are.
        name, extra, kwargs = scrub_secrets((name, extra, kwargs))
        super().__init__(
            name=name,
            save_dir=save_dir,
            version=version,
            offline=False,
            project=project,
            log_model=log_model,
            **extra,
            **kwargs,
        )
        self._wandb_init.pop("anonymous", None)  # Lightning always passes it; wandb warns that it has no effect

    @property
    def offline(self) -> bool:
        """Whether the run is (or will be) written offline, by this logger's choice or ``WANDB_MODE``."""
        mode = self._wandb_init.get("mode") or os.environ.get("WANDB_MODE")
        return mode in ("offline", "dryrun")

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        created = self._experiment is None
        with _scrubbed_argv():  # wandb records the command line with the run
            run = super().experiment
        if created and getattr(run, "offline", False) and getattr(run, "dir", None):
            run_dir = os.path.relpath(Path(run.dir).parent)
            why = "no API key found, " if self.auto_offline else ""
            rank_zero_info(f"W&B: {why}run saved offline to {run_dir}; upload it later with: wandb sync {run_dir}")
        return run

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        super().log_hyperparams(scrub_secrets(_as_dict(params)))


@contextlib.contextmanager
def _scrubbed_argv() -> Iterator[None]:
    original = sys.argv
    sys.argv = scrub_secrets(list(original))
    try:
        yield
    finally:
        sys.argv = original


def _as_dict(params: Any) -> Any:
    if hasattr(params, "as_dict"):  # jsonargparse Namespace
        return params.as_dict()
    return dict(params) if not isinstance(params, dict) and hasattr(params, "keys") else params


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml``, scrubbed of secrets, in the run's own directory (:func:`run_directory`: next to its
    ``checkpoints/``, for W&B too), and logs the full resolved recipe as the hyperparameters of the run: the W&B
    config, TensorBoard's hparams, CSV's ``hparams.yaml``."""

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


def run_directory(trainer: L.Trainer) -> str:
    """The folder that belongs to this run: the first logger's ``save_dir/name/version`` (where ``ModelCheckpoint``
    puts ``checkpoints/``; for W&B ``save_dir/<project>/<run id>``), or ``default_root_dir`` without a logger.

    Lightning's ``trainer.log_dir`` is the shared ``save_dir`` for loggers other than CSV and TensorBoard. Call it on
    global rank 0 (it may create the W&B run).
    """
    if not trainer.loggers:
        return trainer.default_root_dir
    logger = trainer.loggers[0]
    if isinstance(logger, CSVLogger | TensorBoardLogger):
        return logger.log_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)


def run_directory_on_every_rank(trainer: L.Trainer) -> str:
    """Global rank 0's :func:`run_directory`, broadcast: call it on every rank (a collective under DDP, or rank 0
    waits forever)."""
    return trainer.strategy.broadcast(run_directory(trainer) if trainer.is_global_zero else None)


def scrub_logged_hyperparameters(logger: Logger) -> Logger:
    """Makes ``logger.log_hyperparams`` scrub secrets first (for any logger: Lightning logs the module's and data
    module's hyperparameters itself, e.g. into CSV's ``hparams.yaml``); returns the logger."""
    if isinstance(logger, WandbLogger) or getattr(logger.log_hyperparams, "scrubs_secrets", False):
        return logger  # already scrubs
    log_hyperparams = logger.log_hyperparams

    # An instance attribute, not a subclass: it works for whatever logger class a recipe names.
    def scrubbed(params: Any, *args: Any, **kwargs: Any) -> Any:
        return log_hyperparams(scrub_secrets(_as_dict(params)), *args, **kwargs)

    scrubbed.scrubs_secrets = True
    logger.log_hyperparams = scrubbed
    return logger


def read_wandb_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The logged metrics of a W&B run, one dict per ``wandb.log`` call, read from the run's ``.wandb`` file.

    Media come back as the dicts W&B stores (``{"_type": "images/separated", "filenames": [...]}``). The file is
    W&B's transaction log (what ``wandb sync`` uploads): a LevelDB-style log of
    ``wandb.proto.wandb_internal_pb2.Record`` messages. Works for offline runs without a network.

    Args:
        run_dir: the run folder (``.../wandb/offline-run-<time>-<id>``) or its ``.wandb`` file.
    """
    history = []
    for record in _wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set_nested(row, [item.key] if item.key else list(item.nested_key), json.loads(item.value_json))
            history.append(row)
    return history


def read_wandb_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The config of a W&B run (what ``run.config`` holds, without W&B's own ``_wandb`` entry), read back from its
    ``.wandb`` file like :func:`read_wandb_history`."""
    config: dict[str, Any] = {}
    for record in _wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        items = record.config.update if kind == "config" else record.run.config.update if kind == "run" else []
        for item in items:
            _set_nested(config, [item.key] if item.key else list(item.nested_key), json.loads(item.value_json))
    config.pop("_wandb", None)
    return config


def _wandb_records(run_dir: str | os.PathLike) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2

    for payload in _wandb_log_records(_wandb_file(Path(run_dir))):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _set_nested(row: dict[str, Any], keys: list[str], value: Any) -> None:
    # Media are logged as nested items: ["val/confusion_matrix", "_type"] -> row["val/confusion_matrix"]["_type"]
    for key in keys[:-1]:
        row = row.setdefault(key, {})
    row[keys[-1]] = value


def _wandb_file(path: Path) -> Path:
    if path.is_file():
        return path
    files = sorted(path.glob("*.wandb"))
    if not files:
        raise FileNotFoundError(f"No .wandb file in {str(path)!r}; pass a run folder like wandb/offline-run-*.")
    return files[0]


_BLOCK, _HEADER = 32768, 7  # LevelDB log block size and record header (crc32 u32, length u16, type u8)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_log_records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:_HEADER].ljust(_HEADER, b"\0"))
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{str(path)!r} is not a W&B transaction log (header {data[:_HEADER]!r}).")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # block trailer too small for a header: zero padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        if kind == 0 or len(chunk) < length:  # preallocated zeros, or a run that is still being written
            break
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"Corrupt record at byte {pos} of {str(path)!r} (checksum mismatch).")
        pos += _HEADER + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            yield pending


# ------------------------------------------------------------------------------------------------------ callbacks


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
    (:func:`run_directory`). W&B gets ``wandb.Image``s, TensorBoard images; other loggers (CSV) get PNG files in the
    run directory (``val_confusion_matrix.png``, ...), overwritten each epoch.

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
            if isinstance(logger, _LightningWandbLogger | TensorBoardLogger):
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
    if isinstance(logger, _LightningWandbLogger):
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
    "WandbLogger",
    "log_figure",
    "read_wandb_config",
    "read_wandb_history",
    "run_directory",
    "run_directory_on_every_rank",
    "scrub_logged_hyperparameters",
    "scrub_secrets",
    "secret_values",
    "wandb_credentials_found",
]
