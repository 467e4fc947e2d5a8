"""The ``tlkit`` command: LightningCLI for fit/validate/test/predict, small commands for the rest.

tlkit fit --config recipes/quickstart.yaml [--trainer.max_epochs 3 ...]
tlkit validate|test|predict --config ... --ckpt_path ...
tlkit backbones [--filter 'convnext*'] [--pretrained true]
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import CLI
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from tlkit.backbones import list_backbones
from tlkit.data.datamodule import ImageDataModule
from tlkit.module import TransferClassifier


class PredictionCSVWriter(BasePredictionWriter):
    """Writes ``path, predicted class name, probability`` per image to a CSV file (atomically) after predict."""

    def __init__(self, out: str | None = None):
        super().__init__(write_interval="epoch")
        self.out = out

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: Any, predictions: Sequence, batch_indices: Any) -> None:
        probs = torch.cat(_flatten(predictions))
        indices = [i for batch in _flatten(batch_indices) for i in batch]
        split = trainer.datamodule.predict_split()
        names = pl_module.class_names
        confidence, predicted = probs.max(dim=-1)
        out = Path(self.out or Path(trainer.log_dir or ".") / "predictions.csv")
        rows = [
            (_sample_name(split.samples[i], i), names[p], f"{c:.6f}")
            for i, p, c in zip(indices, predicted.tolist(), confidence.tolist(), strict=True)
        ]
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


class TlkitCLI(LightningCLI):
    """LightningCLI with the data module's classes feeding the model, so a recipe states them once."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")

    def before_predict(self) -> None:
        if not any(isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionCSVWriter())

    def after_fit(self) -> None:
        checkpoint = next((cb for cb in self.trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)
        metrics = {k: f"{v.item():.4f}" for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
        _say(f"Validation: {metrics}")
        if checkpoint is not None and checkpoint.best_model_path:
            score = checkpoint.best_model_score
            best = f" ({checkpoint.monitor}={score:.4f})" if score is not None else ""
            _say(f"Best checkpoint{best}: {checkpoint.best_model_path}")
        if self.trainer.log_dir:
            _say(f"Run directory (config.yaml, checkpoints): {self.trainer.log_dir}")


def backbones(filter: str | None = None, pretrained: bool = False) -> None:
    """List the backbones tlkit can create.

    Args:
        filter: shell-style pattern, e.g. 'convnext*' or 'torchvision/res*'.
        pretrained: only those with pretrained weights.
    """
    names = list_backbones(filter, pretrained=pretrained)
    print("\n".join(names) if names else f"No backbone matches {filter!r}.")


COMMANDS: dict[str, Callable[..., Any]] = {"backbones": backbones}


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``tlkit`` console script."""
    args = sys.argv[1:] if args is None else args
    if args and args[0] in COMMANDS:
        CLI(COMMANDS[args[0]], args=args[1:])
        return
    TlkitCLI(
        TransferClassifier,
        ImageDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
