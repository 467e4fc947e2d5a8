"""Error analysis after ``tlkit test`` (fastai's ``plot_top_losses`` / ``most_confused``): the images with the highest
loss and the class pairs most often confused, as two CSV files in the run directory."""

from __future__ import annotations

import csv
import io
import os
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from tlkit.io import PATH_TEXT, atomic_open
from tlkit.multilabel import joined_names
from tlkit.tracking import run_directory

TOP_LOSSES_FILE = "test_top_losses.csv"
MOST_CONFUSED_FILE = "test_most_confused.csv"


def top_losses(logits: Tensor, targets: Tensor, names: list[str], classes: list[str], k: int) -> list[dict[str, Any]]:
    """The ``k`` samples with the highest cross-entropy, highest first: image, true and predicted class, the
    predicted class's probability, the true class's probability and the loss."""
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    probabilities = logits.float().softmax(dim=1)
    confidence, predicted = probabilities.max(dim=1)
    rows = []
    for i in losses.argsort(descending=True)[:k].tolist():
        rows.append({
            "image": names[i], "true": classes[targets[i]], "predicted": classes[predicted[i]],
            "probability": round(confidence[i].item(), 4),
            "probability_true": round(probabilities[i, targets[i]].item(), 4), "loss": round(losses[i].item(), 4),
        })  # fmt: skip
    return rows


def most_confused(predicted: Tensor, targets: Tensor, classes: list[str], min_count: int = 1) -> list[dict[str, Any]]:
    """(true, predicted, count) of every mistaken pair seen at least ``min_count`` times, most frequent first."""
    k = len(classes)
    confusion = torch.bincount(targets * k + predicted, minlength=k * k).view(k, k)
    confusion.fill_diagonal_(0)
    mistaken = (confusion >= max(min_count, 1)).nonzero().tolist()  # (true, predicted) pairs
    pairs = [(int(confusion[t, p]), t, p) for t, p in mistaken]
    pairs.sort(key=lambda pair: (-pair[0], pair[1], pair[2]))
    return [{"true": classes[t], "predicted": classes[p], "count": count} for count, t, p in pairs]


def top_losses_multilabel(
    logits: Tensor, targets: Tensor, thresholds: Tensor, names: list[str], classes: list[str], k: int
) -> list[dict[str, Any]]:
    """Multi-label: the ``k`` samples with the highest binary cross-entropy (summed over classes), highest first:
    image, true and predicted classes (``;``-separated; predicted at ``thresholds``) and the loss."""
    losses = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none").sum(dim=1)
    predicted = logits.float().sigmoid() >= thresholds
    return [
        {"image": names[i], "true": joined_names(targets[i].bool(), classes),
         "predicted": joined_names(predicted[i], classes), "loss": round(losses[i].item(), 4)}
        for i in losses.argsort(descending=True)[:k].tolist()
    ]  # fmt: skip


def class_errors(predicted: Tensor, targets: Tensor, classes: list[str]) -> list[dict[str, Any]]:
    """Multi-label: per class, the images it was missed in and the images it was wrongly predicted in, classes
    with the most errors first (what ``most_confused`` is to a single-label model)."""
    truth = targets.bool()
    missed, extra = (truth & ~predicted).sum(dim=0), (~truth & predicted).sum(dim=0)
    rows = [{"class": name, "missed": int(missed[c]), "false_positives": int(extra[c]),
             "images": int(truth[:, c].sum())} for c, name in enumerate(classes)]  # fmt: skip
    return sorted(rows, key=lambda row: -(row["missed"] + row["false_positives"]))


class ErrorAnalysis(L.Callback):
    """Collects the test logits and writes :data:`TOP_LOSSES_FILE` (the ``top_k`` highest-loss images) and
    :data:`MOST_CONFUSED_FILE` into the run directory at the end of ``test`` (multi-label: the classes with the
    most misses and false positives, :func:`class_errors`).

    ``TransferClassifier`` adds it to every ``test`` run (its ``configure_callbacks``).
    """

    def __init__(self, top_k: int = 20):
        self.top_k = top_k
        self._logits: list[Tensor] = []
        self._targets: list[Tensor] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._logits, self._targets = [], []

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._logits.append(outputs["logits"].detach().cpu())
        self._targets.append(batch[1].detach().cpu())

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._logits:
            return
        if trainer.world_size > 1:  # each rank holds its shard in the sampler's order, not the data's
            rank_zero_warn("Error analysis (test_top_losses.csv, test_most_confused.csv) runs on one device only.")
            return
        logits, targets = torch.cat(self._logits), torch.cat(self._targets)
        names = sample_names(trainer.test_dataloaders, len(targets))
        classes = list(pl_module.class_names)
        folder = run_directory(trainer)
        if targets.ndim == 2:  # multi-label
            thresholds = pl_module.thresholds.cpu()
            losses = top_losses_multilabel(logits, targets, thresholds, names, classes, self.top_k)
            confused = class_errors(logits.float().sigmoid() >= thresholds, targets, classes)
        else:
            losses = top_losses(logits, targets, names, classes, self.top_k)
            confused = most_confused(logits.argmax(1), targets, classes)
        write_csv(os.path.join(folder, TOP_LOSSES_FILE), losses)
        write_csv(os.path.join(folder, MOST_CONFUSED_FILE), confused)


def sample_names(loader: Any, count: int) -> list[str]:
    """Each test image's file path, in loader order; ``#<index>`` for images held in memory (built-in sources)."""
    split = getattr(getattr(loader, "dataset", None), "split", None)
    samples = list(getattr(split, "samples", []))
    if len(samples) != count:
        samples = [None] * count
    return [str(sample) if isinstance(sample, str | os.PathLike) else f"#{i}" for i, sample in enumerate(samples)]


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    """``rows`` as a CSV file with a header, written atomically (an empty file with no header for no rows)."""
    text = io.StringIO()
    if rows:
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_open(path, "w", **PATH_TEXT) as file:
        file.write(text.getvalue())
