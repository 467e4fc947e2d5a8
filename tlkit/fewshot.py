"""Few-shot classification on features: nearest class mean and k nearest neighbours, by cosine similarity.

With a handful of labelled images per class, training anything (even a linear probe) overfits; comparing features
does not. Both classifiers here work on L2-normalised features (a pretrained backbone's pooled features differ mostly
in direction), as SimpleShot and DINO's k-NN evaluation do:

- :class:`NearestClassMean`: each class is the normalised mean of its images; an image goes to the closest one.
- :class:`KNearestNeighbors`: an image goes to the majority class of its ``k`` most similar support images; a tied
  vote goes to the class with the higher summed similarity.

:func:`few_shot_accuracy` draws ``shots`` images per class from a train :class:`~tlkit.features.FeatureSet` (several
seeds) and scores each classifier on another set. ``tlkit fewshot`` runs it from the command line.

Example:
    >>> import torch
    >>> support = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    >>> NearestClassMean().fit(support, torch.tensor([0, 0, 1])).predict(torch.tensor([[0.2, 1.0]]))
    tensor([1])
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from tlkit.features import FeatureSet, check_single_label

CLASSIFIERS = ("ncm", "knn")


def _rows(features: Tensor) -> Tensor:
    """``(N, D)`` float features, L2-normalised (pooled features of any shape are flattened per row)."""
    return F.normalize(features.flatten(1).float(), dim=1)


class NearestClassMean:
    """Nearest class mean by cosine similarity (the class means of the normalised features, normalised again)."""

    def fit(self, features: Tensor, labels: Tensor) -> NearestClassMean:
        """Learn one mean per class from ``features`` ``(N, ...)`` and ``labels`` ``(N,)`` (class indices >= 0)."""
        features, labels = _rows(features), _check_labels(features, labels)
        self.classes = labels.unique()
        means = torch.stack([features[labels == c].mean(0) for c in self.classes])
        self.means = F.normalize(means, dim=1)
        return self

    def scores(self, features: Tensor) -> Tensor:
        """``(N, len(classes))`` cosine similarity of each row to each class mean."""
        return _rows(features) @ self.means.T

    def predict(self, features: Tensor) -> Tensor:
        """The class index of each row."""
        return self.classes[self.scores(features).argmax(1)]


class KNearestNeighbors:
    """k nearest neighbours by cosine similarity, majority vote.

    Args:
        k: neighbours that vote; capped at the support set's size (with 1 image per class and ``k=5``, every class
            but the nearest gets at most one vote too, so the summed similarity decides).
    """

    def __init__(self, k: int = 5) -> None:
        if k < 1:
            raise ValueError(f"k-NN needs k >= 1 neighbours, got k={k}.")
        self.k = k

    def fit(self, features: Tensor, labels: Tensor) -> KNearestNeighbors:
        """Keep the normalised support set ``features`` ``(N, ...)`` and its ``labels`` ``(N,)``."""
        self.labels = _check_labels(features, labels)
        self.support = _rows(features)
        self.classes = self.labels.unique()
        return self

    def predict(self, features: Tensor) -> Tensor:
        """The class index of each row: most votes among its k nearest, ties to the higher summed similarity."""
        k = min(self.k, len(self.support))
        similarity, nearest = (_rows(features) @ self.support.T).topk(k, dim=1)
        columns = torch.searchsorted(self.classes, self.labels[nearest])  # class index -> column of `classes`
        votes = torch.zeros(len(features), len(self.classes)).scatter_add_(1, columns, torch.ones_like(similarity))
        summed = torch.zeros_like(votes).scatter_add_(1, columns, similarity)
        # A summed similarity lies in [-k, k], so dividing it by 2k + 1 moves a score by less than half a vote: it
        # only ever breaks ties between equal vote counts.
        return self.classes[(votes + summed / (2 * k + 1)).argmax(1)]


def _check_labels(features: Tensor, labels: Tensor) -> Tensor:
    labels = torch.as_tensor(labels).long()
    if labels.ndim != 1 or len(labels) != len(features):
        raise ValueError(
            f"Few-shot fit needs one label per feature row: got {len(features)} rows and labels of shape "
            f"{tuple(labels.shape)}."
        )
    if len(labels) == 0 or (labels < 0).any():
        raise ValueError("Few-shot fit needs a non-empty support set of labelled rows (class indices >= 0).")
    return labels


def make_classifier(name: str, k: int = 5) -> NearestClassMean | KNearestNeighbors:
    """``"ncm"`` or ``"knn"`` (with ``k`` neighbours)."""
    if name == "ncm":
        return NearestClassMean()
    if name == "knn":
        return KNearestNeighbors(k)
    raise ValueError(f"Unknown few-shot classifier {name!r}; choose from {', '.join(CLASSIFIERS)}.")


def sample_shots(labels: Tensor, shots: int, seed: int, class_names: Sequence[str] | None = None) -> Tensor:
    """Indices of ``shots`` rows per class, drawn without replacement with ``seed`` (rows labelled -1 never).

    Raises:
        ValueError: a class has fewer than ``shots`` labelled rows (named, with how many it has).
    """
    if shots < 1:
        raise ValueError(f"shots must be at least 1 image per class, got {shots}.")
    labels = torch.as_tensor(labels).long()
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for c in labels[labels >= 0].unique().tolist():
        rows = (labels == c).nonzero().flatten()
        if len(rows) < shots:
            name = class_names[c] if class_names is not None and c < len(class_names) else f"class {c}"
            raise ValueError(
                f"{shots} shots per class asked, but {name!r} has only {len(rows)} labelled train images; "
                f"use --shots up to {len(rows)} or add images of that class."
            )
        picked.append(rows[torch.randperm(len(rows), generator=generator)[:shots]])
    if not picked:
        raise ValueError("The train features have no labelled rows to draw shots from.")
    return torch.cat(picked)


@dataclass
class FewShotResult:
    """Accuracy of one classifier at one number of shots per class, over seeds."""

    classifier: str
    shots: int
    accuracies: list[float]

    @property
    def mean(self) -> float:
        return statistics.mean(self.accuracies)

    @property
    def std(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


def few_shot_accuracy(
    train: FeatureSet,
    test: FeatureSet,
    shots: Sequence[int] = (1, 5, 10),
    classifiers: Sequence[str] = CLASSIFIERS,
    seeds: int = 5,
    k: int = 5,
    class_names: Sequence[str] | None = None,
) -> list[FewShotResult]:
    """Accuracy on ``test`` of each classifier fitted on ``shots`` images per class of ``train``, over ``seeds``
    draws (the same draws for every classifier). ``class_names`` name a class that has too few images.

    Example:
        >>> feats = tlkit.extract_features("resnet18", dm)  # doctest: +SKIP
        >>> few_shot_accuracy(feats.split("train"), feats.split("val"), shots=[1, 5])  # doctest: +SKIP
    """
    for name in classifiers:
        make_classifier(name, k)  # an unknown name fails before any work
    check_single_label(train.labels, "Few-shot classification")
    labelled = test.labels >= 0
    if not labelled.any():
        raise ValueError("The test features have no labelled rows to score against.")
    test_x, test_y = test.features[labelled], test.labels[labelled]
    results = {(c, n): FewShotResult(c, n, []) for n in shots for c in classifiers}
    for n in shots:
        for seed in range(seeds):
            rows = sample_shots(train.labels, n, seed, class_names)
            for c in classifiers:
                predicted = make_classifier(c, k).fit(train.features[rows], train.labels[rows]).predict(test_x)
                results[c, n].accuracies.append((predicted == test_y).float().mean().item())
    return list(results.values())


def format_table(results: Sequence[FewShotResult]) -> str:
    """A Markdown table: one row per number of shots, one column per classifier (mean ± std over seeds)."""
    classifiers = list(dict.fromkeys(r.classifier for r in results))
    seeds = max(len(r.accuracies) for r in results)
    lines = [
        f"| shots per class | {' | '.join(classifiers)} |",
        f"|---|{'---|' * len(classifiers)}",
    ]
    for n in dict.fromkeys(r.shots for r in results):
        cells = [next(f"{r.mean:.3f} ± {r.std:.3f}" for r in results if r.shots == n and r.classifier == c)
                 for c in classifiers]  # fmt: skip
        lines.append(f"| {n} | {' | '.join(cells)} |")
    return "\n".join(lines) + f"\n(val accuracy, mean ± std over {seeds} draws of the shots)"
