"""The data types a source loader returns: splits of samples, their class names, the options loaders take.

Their own module so that both :mod:`tlkit.data.sources` and the torchvision-datasets loader it imports lazily
(:mod:`tlkit.data._tvsource`) build on them without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tlkit.data.index import PathList

Sample = str | np.ndarray
# Between the names of a multi-label image's classes: in a CSV's ``labels`` column, predictions and reports.
LABEL_SEPARATOR = ";"


@dataclass
class Split:
    """One split of samples.

    Attributes:
        samples: File paths (``str``; a :class:`tlkit.data.index.PathList` for folder and CSV sources) or ``uint8``
            HWC numpy images.
        targets: Integer label per sample (index into ``SourceData.class_names``), or, for a multi-label source, a
            ``uint8`` array with a multi-hot row of ``len(class_names)`` per sample (1 where the image shows that
            class): one array, not an object per sample.
    """

    samples: Sequence[Sample]
    targets: list[int] | np.ndarray

    def __post_init__(self) -> None:
        if len(self.samples) != len(self.targets):
            raise ValueError(f"Split has {len(self.samples)} samples but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def multilabel(self) -> bool:
        """Whether the targets are multi-hot rows (several labels per image) rather than one label each."""
        return bool(len(self.targets)) and np.ndim(self.targets[0]) == 1

    def take(self, indices: Sequence[int]) -> Split:
        """The samples at ``indices``, in that order, with their targets (a PathList stays one, multi-hot rows stay
        one array)."""
        samples = self.samples
        picked = samples.take(indices) if isinstance(samples, PathList) else [samples[i] for i in indices]
        if self.multilabel:
            return Split(picked, np.asarray(self.targets)[np.asarray(indices, dtype=np.int64)])
        return Split(picked, np.asarray(self.targets, dtype=np.int64)[np.asarray(indices, dtype=np.int64)].tolist())


def multi_hot(label_sets: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """``(N, num_classes)`` ``uint8``: one row per sample, 1 at each of its labels."""
    rows = np.zeros((len(label_sets), num_classes), dtype=np.uint8)
    for row, labels in zip(rows, label_sets, strict=True):
        row[list(labels)] = 1
    return rows


@dataclass
class SourceData:
    """Train/val splits plus class names (index = label).

    Attributes:
        skipped: ``(path, reason)`` of every unreadable image file that was left out.
        ignored: Files in the source that are not images (by extension) and were not used.
    """

    train: Split
    val: Split
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def multilabel(self) -> bool:
        return self.train.multilabel


@dataclass
class Listing:
    """What a scheme loader returns: ``val=None`` asks :func:`load_source` for a stratified split of ``train``."""

    class_names: list[str]
    train: Split
    val: Split | None = None
    ignored: list[str] = field(default_factory=list)
    unusable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): listed, whatever the policy
    listed: bool = False  # the files were found by listing folders just now (a folder source): each exists
    links: frozenset[str] = frozenset()  # those of them that are symbolic links: their targets may have gone


@dataclass(frozen=True)
class SourceOptions:
    """Options every scheme loader receives (each uses the ones that apply to it)."""

    val_split: float = 0.2
    seed: int = 0
    root: str | None = None
    download: bool = False
