"""What the ``tlkit`` command runs (:mod:`tlkit.cli` parses the command name and imports this module only then):
LightningCLI for fit/validate/test/predict, small jsonargparse functions for the rest.

tlkit fit --config recipes/quickstart.yaml [--trainer.max_epochs 3 ...]
tlkit validate|test|predict --config ... --ckpt_path ...
tlkit backbones [--filter 'convnext*'] [--pretrained true]
tlkit extract --backbone resnet50 --data.source folder:imgs/ --out feats.safetensors
tlkit export --ckpt_path run/last.ckpt --format onnx|torchscript|safetensors [--fuse-bn]
tlkit plot-schedule --config recipes/quickstart.yaml -o lr.png [--trainer.max_epochs 10 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import importlib.util
import inspect
import logging
import math
import os
import re
import shlex
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import Namespace, lazy_instance
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from tlkit.backbones import backbone_data_config
from tlkit.data.datamodule import ImageDataModule
from tlkit.data.datamodule import check_arguments as check_data_arguments
from tlkit.io import PATH_TEXT, AtomicCheckpointIO, atomic_open, claim_version
from tlkit.loggers import scrub_logged_hyperparameters
from tlkit.module import CKPT_PATH_KEYWORDS, read_checkpoint
from tlkit.module import check_arguments as check_model_arguments
from tlkit.multilabel import joined_names
from tlkit.plots import lr_schedule_figure, save_figure
from tlkit.probe import LinearProbe
from tlkit.runs import run_directory, run_directory_on_every_rank
from tlkit.schedule import PlannedRun, module_lr_schedule
from tlkit.tracking import (
    ClassificationFigures,
    FitSummary,
    LoggerSaveConfigCallback,
    ModelSummaryTable,
    RunProgressBar,
    TrainingSpeed,
)

# Warnings that the libraries under tlkit raise on every run, about their own code: nothing a user of `tlkit` can
# change makes them go away. Each is ignored by its exact message, category and the module that raises it, only while
# a recipe command runs (:func:`quiet_library_noise`); `import tlkit` installs no filter.
LIBRARY_WARNINGS = (
    # Lightning 2.6 builds torch's LeafSpec, which torch 2.10 deprecated; Lightning's own code must change.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, "lightning.pytorch.utilities._pytree"),
    # torchdata 0.11's StatefulDataLoader (the resumable train loader) calls torch.set_vital, deprecated in torch.
    (
        r"'set_vital' is deprecated, please do not call",
        UserWarning,
        "torchdata.stateful_dataloader.stateful_dataloader",
    ),
    # LightningCLI calls jsonargparse methods that jsonargparse 4.49 deprecated (and its note on how many it shows).
    (r"\s*By default only one JsonargparseDeprecationWarning per type", DeprecationWarning, "lightning.pytorch.cli"),
    (r"\s*``ArgumentParser.add_instantiator`` was deprecated", DeprecationWarning, "lightning.pytorch.cli"),
    (r"\s*``instantiate_classes`` was deprecated", DeprecationWarning, "lightning.pytorch.cli"),
    (r"\s*skip_none parameter was deprecated", DeprecationWarning, "lightning.pytorch.cli"),
)
# Lightning's advertisements for its cloud services (litlogger, litmodels), printed on every run: not about the run.
LIBRARY_TIPS = ("💡 Tip: For seamless cloud logging and experiment tracking,", "💡 Tip: For seamless cloud uploads")
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def quiet_library_noise() -> Iterator[None]:
    """Within: :data:`LIBRARY_WARNINGS` ignored and :data:`LIBRARY_TIPS` not printed; on exit both as they were."""
    tips = _DropMessages(LIBRARY_TIPS)
    loggers = [logging.getLogger(name) for name in LIGHTNING_INFO_LOGGERS]
    with warnings.catch_warnings():
        for message, category, module in LIBRARY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=re.escape(module) + r"\Z")
        for logger in loggers:
            logger.addFilter(tips)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(tips)


class PredictionCSVWriter(BasePredictionWriter):
    """Writes ``path, predicted class name, probability`` per image to a CSV file (atomically) after predict; for a
    multi-label model ``path, labels`` (the names at or above their thresholds, ``;``-separated, as a multi-label
    CSV source reads them) and one probability column per class.

    Names are the model's ``class_names`` (the checkpoint's); a warning says when the images to predict come in
    class folders the model does not know (a subset of its classes, a labelled sample of a few, is as expected).
    """

    def __init__(self, out: str | None = None):
        super().__init__(write_interval="epoch")
        self.out = out

    def on_predict_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        names = getattr(trainer.datamodule, "predict_class_names", lambda: None)()
        if unknown := [name for name in names or [] if name not in pl_module.class_names]:
            rank_zero_warn(
                f"The images to predict are in class folders {unknown} that the model does not know; it was trained "
                f"on {list(pl_module.class_names)}, and predictions are labelled with those names."
            )

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: Any, predictions: Sequence, batch_indices: Any) -> None:
        probs = torch.cat(_flatten(predictions))
        indices = [i for batch in _flatten(batch_indices) for i in batch]
        split = trainer.datamodule.predict_split()
        names = pl_module.class_names
        paths = [_sample_name(split.samples[i], i) for i in indices]
        out = Path(self.out or Path(run_directory_on_every_rank(trainer)) / "predictions.csv")
        if pl_module.hparams.get("multilabel"):  # every class at or above its tuned threshold, and every probability
            found = [joined_names(row, names) for row in probs >= pl_module.thresholds.cpu()]
            rows = [(path, labels, *(f"{p:.6f}" for p in row))
                    for path, labels, row in zip(paths, found, probs.tolist(), strict=True)]  # fmt: skip
            _write_csv_atomic(out, ["path", "labels", *names], rows)
        else:
            confidence, predicted = probs.max(dim=-1)
            rows = [(path, names[p], f"{c:.6f}")
                    for path, p, c in zip(paths, predicted.tolist(), confidence.tolist(), strict=True)]  # fmt: skip
            _write_csv_atomic(out, ["path", "prediction", "probability"], rows)
        _say(f"Predictions for {len(rows)} images written to {out}")


@rank_zero_only
def _say(message: str) -> None:
    """A line for the person at the terminal (once per job, not once per process)."""
    print(message, flush=True)


def _sample_name(sample: Any, index: int) -> str:
    """A file's path; built-in sources hold images in memory, named by their index in the split."""
    return str(sample) if isinstance(sample, str | Path) else f"#{index}"


def _flatten(items: Sequence) -> list:
    """Lightning nests predictions (and their indices) in a list per dataloader when there are several."""
    nested = items and isinstance(items[0], list) and items[0] and isinstance(items[0][0], torch.Tensor | list)
    return [x for per_loader in items for x in per_loader] if nested else list(items)


def _write_csv_atomic(path: Path, header: list[str], rows: list[tuple]) -> None:
    with atomic_open(path, "w", newline="", **PATH_TEXT) as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


class TlkitCLI(LightningCLI):
    """LightningCLI with the model's backbone configuring the data and the data's classes configuring the model,
    so a recipe states each once: the data module's ``data_config`` is computed from ``model.backbone`` and
    ``model.pretrained`` when the recipe is parsed (:func:`~tlkit.backbones.backbone_data_config`), and the model
    gets ``num_classes``, ``class_names``, ``class_counts`` and ``multilabel`` from the data module when it is built.

    Every run also gets the tracking callbacks (configurable as ``--figures.max_images 8``; see
    :mod:`tlkit.tracking`): throughput and phase (``speed``), confusion matrix and misclassified images
    (``figures``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """LightningCLI's, and a run that fails before writing anything (a class that refuses a value, a missing
        file, an interrupt) leaves no empty version folder behind."""
        self.claimed_folders: list[Path] = []
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            remove_empty_folders(self.claimed_folders)
            raise

    def add_arguments_to_parser(self, parser: Any) -> None:
        model_weights = ("model.init_args.backbone", "model.init_args.pretrained")
        parser.link_arguments(model_weights, "data.init_args.data_config", compute_fn=_data_config, apply_on="parse")
        for name in ("num_classes", "class_names", "class_counts", "multilabel"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        parser.add_lightning_class_args(TrainingSpeed, "speed")
        parser.add_lightning_class_args(ClassificationFigures, "figures")

    def init_parser(self, **kwargs: Any) -> Any:
        """Parsers that raise their errors (``tlkit.cli.main`` prints one paragraph) instead of printing the whole
        usage, hundreds of lines, before them and exiting."""
        return super().init_parser(**{"exit_on_error": False, **kwargs})

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse, then check ``--ckpt_path`` before LightningCLI reads its hyperparameters (which resolves the
        classes it names): a clear error for a bad file, and the Trainer loads it with ``weights_only=True``.

        ``args`` are always given (``tlkit.cli.main`` passes the command line on), so LightningCLI's warning about
        receiving both ``args`` and ``sys.argv`` would fire on every command; this parses as LightningCLI does
        without it."""
        is_object = isinstance(args, dict | Namespace)
        self.config = parser.parse_object(args) if is_object else parser.parse_args(args)
        config = self._subcommand_config()
        ckpt_path = config.get("ckpt_path")
        self.checkpoint_callback_states = None
        if ckpt_path and str(ckpt_path) not in CKPT_PATH_KEYWORDS:
            self.checkpoint_callback_states = read_checkpoint(ckpt_path).get("callbacks") or {}
        if "weights_only" in config:
            if config.weights_only is False:
                raise ValueError("--weights_only false would unpickle arbitrary objects; tlkit checkpoints need none.")
            config.weights_only = True  # Lightning's default (None) lets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD unpickle

    def before_instantiate_classes(self) -> None:
        """Check the recipe's values before the data module reads its source and before any run directory (the
        classes check them again when constructed; here they fail with the bare message, first), then give each
        CSV/TensorBoard logger of the recipe a version folder of its own, created atomically."""
        config = self._subcommand_config()
        for key, check in (("model", check_model_arguments), ("data", check_data_arguments)):
            init = dict((config.get(key) or {}).get("init_args") or {})
            names = inspect.signature(check).parameters
            if all(name in init for name in names):
                check(**{name: init[name] for name in names})
        # Only after the checks: a recipe with a bad value leaves no run directory behind.
        run_dir = evaluated_run_directory(config.get("ckpt_path")) if self.subcommand in EVALUATIONS else None
        if run_dir is not None:  # validate/test/predict a run's checkpoint: write next to it, in run/<command>/
            self.claimed_versions = []
            self.claimed_folders = evaluation_folders(config.get("trainer"), run_dir, self.subcommand)
            return
        self.claimed_versions = claim_version_folders(config.get("trainer"))
        self.claimed_folders = [version_folder(init_args) for init_args in self.claimed_versions]

    def _subcommand_config(self) -> Any:
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    def _subcommand_config_init(self) -> Any:
        return self.config_init[self.subcommand] if self.subcommand else self.config_init

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The Trainer, with atomic checkpoints (:class:`tlkit.AtomicCheckpointIO`, unless the recipe names its own
        ``CheckpointIO`` plugin) and loggers that scrub secrets from the hyperparameters they store.

        Unless the recipe chooses its own, the progress bar and model summary are tlkit's (no ``v_num``, no FLOPs
        column that nothing computed); ``fit`` measures the run for its closing summary (:class:`FitSummary`).
        """
        config = self._subcommand_config_init().get("trainer") or {}
        callbacks = [*_as_list(config.get("callbacks")), *progress_bar(config)]
        self.fit_summary = FitSummary() if self.subcommand == "fit" else None
        if self.fit_summary is not None:
            callbacks.append(self.fit_summary)
        given = list(callbacks)  # Lightning extends this very list with its defaults
        trainer = super().instantiate_trainer(**{"callbacks": callbacks, **kwargs})
        replace_default_summary(trainer, given)
        if self.subcommand in EVALUATIONS and self.checkpoint_callback_states is not None:
            keep_checkpoint_folders(trainer, self.checkpoint_callback_states)
        for init_args in getattr(self, "claimed_versions", []):
            init_args["version"] = None  # the saved config.yaml, run again, claims a new folder instead of this one
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default: not a user's choice
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        for logger in trainer.loggers:
            scrub_logged_hyperparameters(logger)
        return trainer

    def before_fit(self) -> None:
        self._features_for_a_probe()

    def before_validate(self) -> None:
        self._features_for_a_probe()

    def before_test(self) -> None:
        self._features_for_a_probe()

    def _features_for_a_probe(self) -> None:
        """A :class:`~tlkit.LinearProbe` trains and evaluates on features: extract them from the recipe's images
        once, with the probe's backbone (``predict`` keeps the images, which the probe classifies through it)."""
        if isinstance(self.model, LinearProbe) and isinstance(self.datamodule, ImageDataModule):
            self.datamodule = self.model.feature_data(self.datamodule)

    def before_predict(self) -> None:
        if not any(isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionCSVWriter())

    def after_fit(self) -> None:
        """One closing summary: the best validation score and its epoch, wall time and throughput, the run directory,
        and the commands that resume the run and evaluate its best checkpoint."""
        if self.trainer.is_global_zero and self.fit_summary is not None:
            _say(fit_report(self.trainer, self.fit_summary, run_directory(self.trainer)))


def _data_config(backbone: str | None, pretrained: Any) -> dict[str, Any] | None:
    """The recipe backbone's data config (None for a model without a backbone name), with lists for timm's tuples:
    the resolved config.yaml holds lists, and jsonargparse warns on every run about a tuple that would come back
    from it as a list."""
    if not backbone:
        return None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in backbone_data_config(backbone, pretrained).items()}


# Loggers whose ``save_dir/name/version_<n>`` folders tlkit claims atomically when the recipe gives no version.
VERSIONED_LOGGERS = (CSVLogger, TensorBoardLogger)


def claim_version_folders(trainer_config: Any) -> list[Namespace]:
    """Sets ``version`` of each CSV/TensorBoard logger in a parsed ``trainer`` config that has none to a folder
    created for it now (:func:`tlkit.io.claim_version`), so runs started together never share one. Lightning's
    default logger (``logger`` unset or true) is written out as the TensorBoard (or CSV) logger it would be, so that
    its folder is claimed too. Returns the ``init_args`` whose version it set.

    Only global rank 0 claims (the rank is read from the environment, as Lightning does): under DDP the other
    processes are started with the same command line and get rank 0's directory from the Trainer.
    """
    if trainer_config is None or rank_zero_only.rank != 0:
        return []
    if trainer_config.get("logger") in (None, True):
        trainer_config["logger"] = default_logger(trainer_config.get("default_root_dir"))
    loggers = trainer_config.get("logger")
    if not loggers or isinstance(loggers, bool):
        return []
    claimed = []
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if not isinstance(logger, Namespace) or not _is_versioned_logger(logger.get("class_path")):
            continue
        args = logger.get("init_args") or Namespace()
        if args.get("version") is None:
            name = args.get("name", "lightning_logs")
            args["version"] = claim_version(Path(args.get("save_dir") or ".") / (name or ""))
            logger["init_args"] = args
            claimed.append(args)
    return claimed


def version_folder(logger_init_args: Namespace) -> Path:
    """The folder a CSV/TensorBoard logger writes to: ``save_dir/name/version_<n>``."""
    args = logger_init_args
    return Path(args.get("save_dir") or ".") / (args.get("name", "lightning_logs") or "") / f"version_{args.version}"


def remove_empty_folders(folders: list[Path]) -> None:
    """Removes each folder that holds no file (empty subfolders included); one with any file is a run's output."""
    for folder in folders:
        if folder.is_dir() and not any(path.is_file() for path in folder.rglob("*")):
            shutil.rmtree(folder, ignore_errors=True)


# The commands that evaluate a checkpoint; given one of a run's, they write into <run>/<command>/.
EVALUATIONS = ("validate", "test", "predict")


def evaluated_run_directory(ckpt_path: Any) -> Path | None:
    """The run directory a checkpoint file belongs to (``<run>/checkpoints/x.ckpt`` next to ``<run>/config.yaml``, as
    ``tlkit fit`` writes them), or None for a checkpoint kept elsewhere or one of Lightning's keywords."""
    if not ckpt_path or str(ckpt_path) in CKPT_PATH_KEYWORDS:
        return None
    folder = Path(ckpt_path).parent
    if folder.name == "checkpoints" and (folder.parent / "config.yaml").is_file():
        return folder.parent
    return None


def evaluation_folders(trainer_config: Any, run_dir: Path, command: str) -> list[Path]:
    """Points each CSV/TensorBoard logger of a parsed ``trainer`` config (Lightning's default one written out, as in
    :func:`claim_version_folders`) at ``run_dir/command``: an evaluation of a run lands in the run's own directory,
    replacing the previous evaluation of that kind, instead of in a new ``version_<n>``. Returns the folders."""
    if trainer_config is None or rank_zero_only.rank != 0:
        return []
    if trainer_config.get("logger") in (None, True):
        trainer_config["logger"] = default_logger(trainer_config.get("default_root_dir"))
    folders = []
    for logger in _as_list(trainer_config.get("logger")):
        if isinstance(logger, Namespace) and _is_versioned_logger(logger.get("class_path")):
            logger["init_args"] = Namespace(**{**vars(logger.get("init_args") or Namespace()),
                                               "save_dir": str(run_dir), "name": "", "version": command})  # fmt: skip
            folders.append(run_dir / command)
    return folders


def keep_checkpoint_folders(trainer: L.Trainer, states: dict[str, Any]) -> None:
    """Gives each ``ModelCheckpoint`` of an evaluation the folder that its state in a checkpoint (``states``: the
    checkpoint's ``callbacks``) was saved from, so that restoring it does not warn that "the dirpath has changed" (it
    saves nothing outside ``fit``; its state, such as the best score, stays as the run left it)."""
    for callback in trainer.checkpoint_callbacks:
        state = states.get(callback.state_key) if isinstance(callback, ModelCheckpoint) else None
        if isinstance(state, dict) and state.get("dirpath"):
            callback.dirpath = state["dirpath"]


def _as_list(value: Any) -> list:
    """A recipe entry that is one item or a list of them (``logger``, ``callbacks``) as a list; nothing: []."""
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def progress_bar(trainer_config: Any) -> list[L.Callback]:
    """tlkit's progress bar, for a Trainer whose recipe neither lists its own nor turns it off (Lightning adds its
    default only where none is given)."""
    callbacks = _as_list(trainer_config.get("callbacks"))
    wanted = trainer_config.get("enable_progress_bar") is not False
    return [RunProgressBar()] if wanted and not any(isinstance(c, ProgressBar) for c in callbacks) else []


def replace_default_summary(trainer: L.Trainer, given: list[L.Callback]) -> None:
    """Swaps the model summary Lightning added by default (one not in ``given``, the Trainer's callbacks argument)
    for :class:`ModelSummaryTable`. After construction, because a summary passed in makes Lightning say that it
    skips its own."""
    given_ids = {id(cb) for cb in given}
    trainer.callbacks = [
        ModelSummaryTable() if isinstance(cb, ModelSummary) and id(cb) not in given_ids else cb
        for cb in trainer.callbacks
    ]


def fit_report(trainer: L.Trainer, summary: FitSummary, run_dir: str) -> str:
    """The closing lines of ``tlkit fit``: best validation score and its epoch, time and throughput, run directory,
    and the commands to resume the run and to evaluate its best checkpoint."""
    checkpoints = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    monitored = next((cb for cb in checkpoints if cb.monitor), None)
    lines = [summary.timing_line(trainer.world_size)]
    if monitored is not None:
        lines.append(summary.best_line(monitored.monitor, monitored.mode))
    else:
        lines.append(summary.last_line())
    lines.append(f"Run directory: {run_dir}")
    config = shlex.quote(str(Path(run_dir) / "config.yaml"))
    last = _latest_checkpoint(checkpoints)
    if last:
        lines.append(f"Resume (add --trainer.max_epochs N to train on): tlkit fit --config {config} "
                     f"--ckpt_path {shlex.quote(last)}")  # fmt: skip
    else:
        lines.append("Resume: no checkpoint of the last epoch (a ModelCheckpoint with save_last: true writes one)")
    best = monitored.best_model_path if monitored is not None else last
    if best:
        lines.append(f"Evaluate: tlkit validate --config {config} --ckpt_path {shlex.quote(best)}  (or test, predict)")
    return "\n".join(lines)


def _latest_checkpoint(checkpoints: list[ModelCheckpoint]) -> str:
    """The checkpoint of the run's last epoch: a ``save_last`` file, else the newest file of a ModelCheckpoint
    without a monitor (which keeps the latest epoch), else ''."""
    for cb in checkpoints:
        if cb.last_model_path:
            return cb.last_model_path
    return next((cb.best_model_path for cb in checkpoints if cb.monitor is None and cb.best_model_path), "")


def default_logger(default_root_dir: str | None) -> Namespace:
    """The logger Lightning creates for ``logger: true`` (TensorBoard when installed, else CSV, in
    ``default_root_dir/lightning_logs``), as a recipe entry; a SLURM job keeps its job id as the version."""
    tensorboard = any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX"))
    cls = TensorBoardLogger if tensorboard else CSVLogger
    init_args = Namespace(save_dir=default_root_dir or os.getcwd(), version=SLURMEnvironment.job_id())
    return Namespace(class_path=f"{cls.__module__}.{cls.__name__}", init_args=init_args)


def _is_versioned_logger(class_path: str | None) -> bool:
    if not class_path:
        return False
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    return isinstance(cls, type) and issubclass(cls, VERSIONED_LOGGERS)


def extract(
    out: str = "features.safetensors",
    backbone: str | None = None,
    ckpt_path: str | None = None,
    pretrained: bool | str = True,
    data: ImageDataModule = lazy_instance(ImageDataModule),
    split: str = "all",
    layers: list[str] | None = None,
    pool: str = "model",
    batch_size: int | None = None,
    device: str = "auto",
    devices: int = 1,
    strategy: str = "auto",
    precision: str = "32-true",
    shard_size: int = 4096,
) -> None:
    """Extract backbone features of a data set into one safetensors file (rows in data order, labels aligned).

    Args:
        out: the .safetensors file to write.
        backbone: timm name or torchvision/<name> (or use ckpt_path).
        ckpt_path: a TransferClassifier checkpoint whose backbone to use.
        pretrained: weights of --backbone: true (hub), false, 'packaged' or a weights file.
        data: the images, as for fit (--data.source, --data.image_size, --data.preprocess ...).
        split: train, val, predict, or all (train then val).
        layers: intermediate layers instead of the final features (module/node names or stage indices).
        pool: model (the default: pooled as the model's own head pools, what a classifier on it sees), avg, max,
            token or none.
        batch_size: images per batch (default: the data's).
        device: auto, cpu, cuda, cuda:1, mps.
        devices: number of devices; several shard the data across ranks (one ordered file still).
        strategy: Lightning strategy for several devices (default ddp).
        precision: 32-true, bf16-mixed, 16-mixed.
        shard_size: rows per temporary shard, which bounds the memory used.
    """
    from lightning.pytorch.utilities import rank_zero_info

    from tlkit.features import extract_features

    if (backbone is None) == (ckpt_path is None):
        raise ValueError("Pass exactly one of --backbone NAME or --ckpt_path FILE.")
    with quiet_library_noise():
        feats = extract_features(
            ckpt_path or backbone, data, layers=layers, pool=pool, batch_size=batch_size, device=device,
            precision=precision, out=out, pretrained=pretrained, split=split, devices=devices, strategy=strategy,
            shard_size=shard_size, progress=True,
        )  # fmt: skip
    if feats is not None:
        shapes = {name: tuple(t.shape) for name, t in feats.layers.items()}
        rank_zero_info(f"Features {shapes} of {len(feats)} images written to {out}")


def fewshot(
    backbone: str | None = None,
    ckpt_path: str | None = None,
    pretrained: bool | str = True,
    data: ImageDataModule = lazy_instance(ImageDataModule),
    shots: str = "1,5,10",
    classifier: str = "ncm,knn",
    seeds: int = 5,
    k: int = 5,
    pool: str = "model",
    device: str = "auto",
) -> str:
    """Few-shot accuracy of a backbone's features: nearest class mean and k-NN (cosine) fitted on a few train images
    per class, scored on the val split; prints a table (mean ± std over seeds).

    Args:
        backbone: timm name or torchvision/<name> (or use ckpt_path).
        ckpt_path: a TransferClassifier checkpoint whose backbone to use.
        pretrained: weights of --backbone: true (hub), false, 'packaged' or a weights file.
        data: the images, as for fit (--data.source, --data.image_size ...); its train split gives the shots, its val
            split the score.
        shots: images per class, comma-separated (1,5,10).
        classifier: ncm, knn, or both comma-separated.
        seeds: draws of the shots per number of shots.
        k: neighbours of the k-NN classifier.
        pool: how the features are pooled (as for extract).
        device: auto, cpu, cuda, cuda:1, mps.
    """
    from tlkit.features import extract_features
    from tlkit.fewshot import few_shot_accuracy, format_table

    if (backbone is None) == (ckpt_path is None):
        raise ValueError("Pass exactly one of --backbone NAME or --ckpt_path FILE.")
    counts = [part.strip() for part in str(shots).strip("[]").split(",") if part.strip()]
    if not counts or not all(part.isdigit() and int(part) > 0 for part in counts):
        raise ValueError(
            f"--shots takes positive numbers of images per class, comma-separated (1,5,10); got {shots!r}."
        )
    with quiet_library_noise():
        feats = extract_features(ckpt_path or backbone, data, pool=pool, device=device, pretrained=pretrained)
    results = few_shot_accuracy(
        feats.split("train"), feats.split("val"), shots=[int(part) for part in counts],
        classifiers=[name.strip() for name in classifier.split(",")], seeds=seeds, k=k, class_names=data.class_names,
    )  # fmt: skip
    table = format_table(results)
    print(table)
    return table


def export(
    ckpt_path: str | None = None,
    format: str = "onnx",
    out: str | None = None,
    fuse_bn: bool = False,
    input: str = "uint8",
    return_features: bool = False,
) -> None:
    """Export a checkpoint with its preprocessing in front: images (uint8 or float [0, 1], NCHW) in, logits out.

    Args:
        ckpt_path: the .ckpt written by `tlkit fit`.
        format: onnx, torchscript or safetensors (weights + JSON metadata, reloadable without pickle).
        out: output file (default: the checkpoint path with the format's suffix).
        fuse_bn: fold BatchNorm layers into the convolutions before them (checked and printed).
        input: uint8 or float.
        return_features: also output the pooled features.
    """
    from tlkit.export import export as export_model

    if ckpt_path is None:
        raise ValueError("tlkit export needs --ckpt_path FILE (a checkpoint written by `tlkit fit`).")
    if format == "onnx":
        importlib.import_module("onnx")  # the optional extra: missing, fail now rather than after loading the model
    export_model(ckpt_path, format=format, out=out, fuse_bn=fuse_bn, input=input, return_features=return_features)


def plot_schedule(args: list[str]) -> str:
    """``tlkit plot-schedule --config recipe.yaml -o lr.png [overrides]``: draw the learning rate of every
    parameter group at every optimiser step of a recipe, without training (see :func:`recipe_lr_schedule`)."""
    parser = argparse.ArgumentParser(prog="tlkit plot-schedule", description=plot_schedule.__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, action="append", help="recipe YAML (repeatable, as in fit)")
    parser.add_argument("-o", "--out", default="lr.png", help="PNG to write (default: lr.png)")
    options, overrides = parser.parse_known_args(args)
    recipe = [arg for path in options.config for arg in ("--config", path)]
    curves, run = recipe_lr_schedule([*recipe, *overrides])
    names = ", ".join(Path(path).name for path in options.config)
    pairs = [part for arg in overrides for part in arg.split("=", 1)]  # --a.b=c and --a.b c alike
    changed = [f"{key.split('.')[-1]}={value}" for key, value in zip(pairs[::2], pairs[1::2], strict=False)]
    names += f" ({', '.join(changed)})" if changed else ""
    title = f"{names}: {run.estimated_stepping_batches} steps, {run.max_epochs} epochs"
    figure = lr_schedule_figure(curves, run.steps_per_epoch, title=title)
    path = save_figure(figure, options.out)
    # Groups on the same curve (a stage's weights and its no-weight-decay biases) share one line of the legend.
    lines, steps = len(figure.axes[0].get_lines()), len(next(iter(curves.values())))
    print(f"Learning-rate schedule: {lines} curves for {len(curves)} parameter groups, {steps} steps: {path}")
    return path


def recipe_lr_schedule(args: list[str]) -> tuple[dict[str, list[float]], PlannedRun]:
    """Learning rate of each parameter group at every optimiser step of the run a recipe describes.

    The model and data module are built from the recipe (``args`` as for ``tlkit fit``, without the subcommand),
    the step count comes from the train split size, batch size, devices, ``limit_train_batches``, gradient
    accumulation and ``max_epochs``, and the optimiser and scheduler from the model's own ``configure_optimizers``.
    Pretrained weights are not loaded: they do not change the schedule.
    """
    quiet = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    cli = lightning_cli([*args, "--model.init_args.pretrained", "false", *quiet], run=False)
    run = PlannedRun(_steps_per_epoch(cli.trainer, cli.datamodule), cli.trainer.max_epochs, cli.trainer.max_steps)
    return module_lr_schedule(cli.model, run), run


def _steps_per_epoch(trainer: L.Trainer, datamodule: ImageDataModule) -> int:
    """Optimiser steps per epoch, counted as the Trainer would (DistributedSampler pads each process's share)."""
    per_process = math.ceil(len(datamodule.data.train) / trainer.world_size)
    batches = math.ceil(per_process / datamodule.hparams.batch_size)
    limit = trainer.limit_train_batches
    batches = min(batches, int(limit)) if isinstance(limit, int) else int(batches * limit)
    return max(math.ceil(batches / trainer.accumulate_grad_batches), 1)


# Commands that read a recipe with ``--config`` parse their own arguments (jsonargparse's CLI owns ``--config``).
def soup(args: list[str]) -> str:
    """``tlkit soup --ckpt_path a.ckpt b.ckpt ... [--greedy] [-o soup.ckpt] [--config recipe.yaml]``: average
    checkpoints of one model into a new checkpoint (uniform, or greedy: best first, each kept only if val does not
    drop), BatchNorm statistics re-estimated (see :mod:`tlkit.soup`)."""
    from tlkit.soup import make_soup

    parser = argparse.ArgumentParser(prog="tlkit soup", description=soup.__doc__.split("\n")[0])
    parser.add_argument("--ckpt_path", nargs="+", required=True, help="checkpoints of the same model (2 or more)")
    parser.add_argument("--greedy", action="store_true", help="greedy soup (default: uniform)")
    parser.add_argument("-o", "--out", default="soup.ckpt", help="checkpoint to write (default: soup.ckpt)")
    parser.add_argument(
        "--config", action="append", help="recipe of the data to validate on (default: the checkpoint's data)"
    )
    options, overrides = parser.parse_known_args(args)
    datamodule = None
    if options.config:
        recipe = [arg for path in options.config for arg in ("--config", path)]
        quiet = ["--model.init_args.pretrained", "false", "--trainer.logger", "false"]
        datamodule = lightning_cli([*recipe, *overrides, *quiet], run=False).datamodule
    result = make_soup(options.ckpt_path, options.out, greedy=options.greedy, datamodule=datamodule)
    for path, acc in result.scores.items():
        print(f"{result.metric} {acc:.4f}  {path}{'  (in the soup)' if path in result.ingredients else ''}")
    kind = "Greedy" if options.greedy else "Uniform"
    count = len(result.ingredients)
    print(f"{kind} soup of {count} checkpoints: {result.metric} {result.val_acc:.4f}, in {options.out}")
    return options.out


def lr_find(args: list[str]) -> float:
    """``tlkit lr-find --config recipe.yaml [-o lr_find.png] [--apply tuned.yaml] [--suggestion valley]``: the
    learning-rate range test of Lightning's tuner on the recipe's first phase; prints the steep, valley and
    minimum/10 suggestions, saves the loss-vs-LR plot, and with --apply writes the recipe with the chosen lr."""
    from tlkit.lr_find import SUGGESTIONS, apply_lr, find_lr

    parser = argparse.ArgumentParser(prog="tlkit lr-find", description=lr_find.__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, action="append", help="recipe YAML (repeatable, as in fit)")
    parser.add_argument("-o", "--out", default="lr_find.png", help="PNG of the loss-vs-LR curve")
    parser.add_argument("--apply", help="write the last --config with the chosen lr to this YAML file")
    parser.add_argument("--suggestion", choices=SUGGESTIONS, default="valley", help="the lr --apply writes")
    parser.add_argument("--num_training", type=int, default=100, help="steps of the test")
    parser.add_argument("--min_lr", type=float, default=1e-6)
    parser.add_argument("--max_lr", type=float, default=1.0)
    options, overrides = parser.parse_known_args(args)
    recipe = [arg for path in options.config for arg in ("--config", path)]
    cli = lightning_cli([*recipe, *overrides, "--trainer.logger", "false"], run=False)
    found, figure = find_lr(cli.model, cli.datamodule, cli.trainer, min_lr=options.min_lr, max_lr=options.max_lr,
                            num_training=options.num_training)  # fmt: skip
    save_figure(figure, options.out)
    for name in SUGGESTIONS:
        value = getattr(found, name)
        print(f"{name:>10}: {'-' if value is None else f'{value:.3g}'}")
    chosen = found.pick(options.suggestion)
    if options.apply:
        apply_lr(options.config[-1], chosen, options.apply)
        print(f"{options.config[-1]} with lr {chosen:.3g} ({options.suggestion}) written to {options.apply}")
    print(f"Loss-vs-LR plot: {options.out}")
    return chosen


RECIPE_COMMANDS: dict[str, Callable[[list[str]], Any]] = {
    "plot-schedule": plot_schedule,
    "soup": soup,
    "lr-find": lr_find,
}


def lightning_cli(args: list[str] | None, **kwargs: Any) -> TlkitCLI:
    """The LightningCLI of ``tlkit fit|validate|test|predict`` (``run=False``: the model, data and Trainer of a
    recipe, built and not run; ``args`` then without the subcommand)."""
    return TlkitCLI(
        L.LightningModule,  # TransferClassifier or LinearProbe
        L.LightningDataModule,  # ImageDataModule (or a FeatureDataModule for a LinearProbe)
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_callback=LoggerSaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        **kwargs,
    )


def run(command: str, args: list[str]) -> None:
    """Runs ``tlkit <command> <args>`` for a recipe command (fit, validate, test, predict, plot-schedule); the
    one-function commands are run by :func:`tlkit.cli.main`."""
    if {"-h", "--help"} & set(args) and command not in RECIPE_COMMANDS:
        print(recipe_help(command))
        return
    with quiet_library_noise():
        if command in RECIPE_COMMANDS:
            RECIPE_COMMANDS[command](args)
        else:
            lightning_cli([command, *["--help" if arg == "--help-all" else arg for arg in args]])


def recipe_help(command: str) -> str:
    """``tlkit fit --help``: the options of the model and the data module first (LightningCLI's own help lists the
    Trainer's ~100 options first and the model's only under ``--model.help CLASS``), then where the rest are."""
    from jsonargparse import ArgumentParser

    from tlkit.module import TransferClassifier

    sections = []
    for key, cls in (("model", TransferClassifier), ("data", ImageDataModule)):
        parser = ArgumentParser(usage=argparse.SUPPRESS, add_help=False)
        parser.add_class_arguments(cls, key, fail_untyped=False)
        sections.append(f"{key}: {cls.__module__.split('.')[0]}.{cls.__name__}\n{parser.format_help().strip()}")
    return "\n\n".join(
        [
            f"usage: tlkit {command} --config RECIPE.yaml [--model.OPTION VALUE] [--data.OPTION VALUE] "
            "[--trainer.OPTION VALUE] ...",
            *sections,
            f"Every option (the Trainer's, callbacks, loggers, --ckpt_path, --print_config): tlkit {command} --help-all"
            f"\nAnother model or data class: tlkit {command} --model.help tlkit.LinearProbe",
        ]
    )
