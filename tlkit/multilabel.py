"""Multi-label classification: images that show several classes at once.

A multi-label source (a CSV with a ``labels`` column or one 0/1 column per class, or ``texture-pairs``) yields
multi-hot targets; :class:`~tlkit.TransferClassifier` with ``multilabel=True`` (the CLI sets it from the data
module) then trains one sigmoid per class with binary cross-entropy, reports mAP and F1, and keeps per-class
decision thresholds tuned on the validation set (saved in the checkpoint, used by predict, carried by export).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MultilabelAveragePrecision, MultilabelExactMatch, MultilabelF1Score

from tlkit.data.splits import LABEL_SEPARATOR

DEFAULT_THRESHOLD = 0.5


def multilabel_metrics(num_classes: int, prefix: str, average_precision: bool = True) -> MetricCollection:
    """``acc`` (exact match: every class right, at 0.5), ``f1_micro``, ``f1_macro`` (at 0.5) and ``map`` (macro
    average precision, threshold-free; it keeps every score of the epoch, so training leaves it out).

    ``acc`` keeps its name so that recipes monitoring ``val/acc`` work unchanged; ``val/map`` is the better monitor.
    """
    metrics: dict[str, Metric] = {
        "acc": MultilabelExactMatch(num_classes),
        "f1_micro": MultilabelF1Score(num_classes, average="micro"),
        "f1_macro": MultilabelF1Score(num_classes, average="macro"),
    }
    if average_precision:
        metrics["map"] = MultilabelAveragePrecision(num_classes, average="macro")
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


def multilabel_loss(
    logits: Tensor, targets: Tensor, pos_weight: Tensor | None = None, label_smoothing: float = 0.0
) -> Tensor:
    """Binary cross-entropy of each class's logit (mean over images and classes); ``label_smoothing`` moves the
    0/1 targets towards 1/2 (``t * (1 - s) + s / 2``); ``pos_weight`` weighs each class's positives."""
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / 2
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), pos_weight=pos_weight)


def check_pos_weight(pos_weight: float | Sequence[float] | None, num_classes: int, multilabel: bool) -> Tensor | None:
    """``pos_weight`` as a ``(num_classes,)`` tensor (a number applies to every class), or None.

    Raises:
        ValueError: ``pos_weight`` on a single-label model, a list of the wrong length, or a value <= 0.
    """
    if pos_weight is None:
        return None
    if not multilabel:
        raise ValueError(
            f"pos_weight={pos_weight!r} weighs the positives of a multi-label (sigmoid) loss, but this model is "
            "single-label; use class_weights='balanced' to weigh classes of a single-label model."
        )
    weight = torch.as_tensor(pos_weight, dtype=torch.float32).flatten()
    if weight.numel() == 1:
        weight = weight.expand(num_classes).clone()
    if len(weight) != num_classes or not bool((weight > 0).all()):
        raise ValueError(
            f"pos_weight={pos_weight!r}; give one number > 0 or {num_classes} of them (one per class), e.g. a "
            "class's negatives / positives in the training set to balance it."
        )
    return weight


def best_thresholds(probabilities: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per class, the decision threshold with the highest F1 on these scores, and that F1.

    Each threshold lies halfway between the lowest score it accepts and the highest it rejects (so a score equal to
    a validation score is not on the edge). A class without a positive example keeps :data:`DEFAULT_THRESHOLD`
    (its F1 is NaN: undefined).

    Args:
        probabilities: ``(N, C)`` sigmoid scores.
        targets: ``(N, C)`` 0/1 labels.
    """
    probabilities, targets = probabilities.double(), targets.double()
    n, classes = probabilities.shape
    scores, order = probabilities.sort(dim=0, descending=True)
    hits = targets.gather(0, order).cumsum(dim=0)  # true positives when accepting the top k + 1
    accepted = torch.arange(1, n + 1, dtype=torch.float64).unsqueeze(1)
    f1 = 2 * hits / (targets.sum(dim=0) + accepted)
    below = torch.cat([scores[1:], torch.full((1, classes), -1.0, dtype=scores.dtype)])
    f1[scores == below] = -1  # a cut between equal scores cannot be made: those are all accepted or all not
    best_f1, k = f1.max(dim=0)
    column = torch.arange(classes)
    thresholds = ((scores[k, column] + below[k, column].clamp(min=0)) / 2).float()
    no_positive = targets.sum(dim=0) == 0
    thresholds[no_positive] = DEFAULT_THRESHOLD
    best_f1 = best_f1.float()
    best_f1[no_positive] = float("nan")
    return thresholds, best_f1


class ThresholdTuner(Metric):
    """Collects a validation epoch's sigmoid scores and labels (from every process under DDP) and computes
    :func:`best_thresholds` from them."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, probabilities: Tensor, targets: Tensor) -> None:
        self.scores.append(probabilities.detach().float())
        self.labels.append(targets.detach().float())

    def compute(self) -> tuple[Tensor, Tensor]:
        scores = self.scores if isinstance(self.scores, Tensor) else torch.cat(self.scores)
        labels = self.labels if isinstance(self.labels, Tensor) else torch.cat(self.labels)
        return best_thresholds(scores, labels)


def predicted_names(probabilities: Tensor, thresholds: Tensor, class_names: Sequence[str]) -> list[list[str]]:
    """The names of the classes at or above their threshold, per image."""
    return [flagged_names(row, class_names) for row in probabilities >= thresholds]


def flagged_names(flags: Tensor, class_names: Sequence[str]) -> list[str]:
    """The names of the classes whose entry of a ``(C,)`` row is true (or 1)."""
    return [class_names[c] for c in flags.nonzero().flatten().tolist()]


def joined_names(flags: Tensor, class_names: Sequence[str], empty: str = "") -> str:
    """``"cat;dog"``: :func:`flagged_names` as a multi-label CSV cell (``empty`` when there are none)."""
    return LABEL_SEPARATOR.join(flagged_names(flags, class_names)) or empty


__all__ = [
    "DEFAULT_THRESHOLD",
    "ThresholdTuner",
    "best_thresholds",
    "check_pos_weight",
    "flagged_names",
    "joined_names",
    "multilabel_loss",
    "multilabel_metrics",
    "predicted_names",
]
