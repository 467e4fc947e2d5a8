"""The ``torchvision:<Name>`` source: torchvision's classification datasets as tlkit samples.

Most torchvision datasets keep their images either as one uint8 array (CIFAR, MNIST family, SVHN, STL10) or as a list
of files (Flowers102, OxfordIIITPet, Food101, DTD, ImageFolder-based ones such as EuroSAT). Both become ordinary tlkit
samples (arrays or paths), so they go through the same uint8 decode, bad-file scan and transforms as ``folder:``.
Anything else falls back to :class:`DatasetItem`, which indexes the dataset itself.

Splits: the dataset's own ``train`` split (``trainval`` where that is the name) is the training data; its ``val``
split is used when it has one, otherwise ``val_split`` of the training data is held out (stratified, like ``folder:``).
Test splits are never used for fitting or model selection.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tlkit.data.splits import Listing, Sample, SourceOptions, Split

DEFAULT_ROOT = "~/.cache/tlkit/datasets"
_TRAIN_SPLITS = ("train", "trainval")


@dataclass(frozen=True)
class DatasetItem:
    """A sample that is item ``index`` of a torchvision dataset (decoded by calling ``dataset[index]``)."""

    dataset: Dataset
    index: int

    def load(self) -> torch.Tensor:
        """The image as a uint8 (C, H, W) or (H, W) tensor."""
        from tlkit.data.decode import pil_to_rgb

        image = self.dataset[self.index][0]
        return image if isinstance(image, torch.Tensor) else pil_to_rgb(image)  # as a file of that image decodes


def dataset_name(name: str) -> str | None:
    """The ``torchvision.datasets`` class called ``name``, letter case aside (``cifar10`` is ``CIFAR10``); None if
    there is none, or several."""
    import torchvision.datasets as tvd

    matches = [n for n in dir(tvd) if n.lower() == name.lower() and _is_dataset(getattr(tvd, n))]
    return matches[0] if len(matches) == 1 else None


def _is_dataset(obj: object) -> bool:
    return isinstance(obj, type) and issubclass(obj, Dataset)


def _dataset_class(name: str) -> type:
    import torchvision.datasets as tvd

    cls = getattr(tvd, dataset_name(name) or name, None)
    if not _is_dataset(cls):
        examples = "CIFAR10, CIFAR100, FashionMNIST, MNIST, SVHN, STL10, Flowers102, OxfordIIITPet, Food101, DTD"
        raise ValueError(f"torchvision has no dataset {name!r}; use a class name of torchvision.datasets ({examples})")
    return cls


def _split_kwargs(cls: type, split: str) -> dict[str, Any] | None:
    """Constructor arguments selecting ``split`` ("train" or "val"), or None when the class has no such split."""
    params = inspect.signature(cls.__init__).parameters
    if "train" in params:
        return {"train": True} if split == "train" else None
    if "split" in params:
        return {"split": split}
    return {} if split == "train" else None  # one-split datasets (EuroSAT, FakeData, ...)


def _construct(cls: type, options: SourceOptions, kwargs: dict[str, Any]) -> Dataset:
    params = inspect.signature(cls.__init__).parameters
    if "root" in params:
        kwargs = {"root": str(Path(options.root or DEFAULT_ROOT).expanduser()), **kwargs}
        if "download" in params:
            kwargs["download"] = options.download
    try:
        return cls(**kwargs)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        where = kwargs.get("root", "")
        raise FileNotFoundError(
            f"torchvision:{cls.__name__} ({kwargs}) could not be loaded from {where}: {err} Pass the folder that "
            "holds it as the data module's data_root, or download=True (needs a network) to fetch it."
        ) from err


@functools.lru_cache(maxsize=8)
def _open(name: str, split: str, options: SourceOptions) -> Dataset | None:
    """The dataset's ``split``, or None when it has none. ``train`` falls back to ``trainval``."""
    cls = _dataset_class(name)
    names = _TRAIN_SPLITS if split == "train" else (split,)
    for candidate in names:
        kwargs = _split_kwargs(cls, candidate)
        if kwargs is None:
            return None
        try:
            return _construct(cls, options, kwargs)
        except ValueError:  # verify_str_arg: the class has no split of that name
            continue
    if split == "train":
        raise ValueError(f"torchvision:{name} has none of the splits {_TRAIN_SPLITS}")
    return None


def _targets(ds: Dataset) -> list[int] | None:
    for attr in ("targets", "labels", "_labels"):
        values = getattr(ds, attr, None)
        if values is not None and len(values) == len(ds):
            return [int(t) for t in (values.tolist() if hasattr(values, "tolist") else values)]
    return None


def _array_samples(ds: Dataset) -> list[Sample] | None:
    """In-memory uint8 images (``ds.data``) as a list of HWC arrays."""
    data = getattr(ds, "data", None)
    if data is None or not hasattr(data, "shape") or len(data) != len(ds) or data.ndim not in (3, 4):
        return None
    array = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if array.dtype != np.uint8:
        return None
    if array.ndim == 4 and array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(0, 2, 3, 1)  # SVHN and STL10 store CHW
    return list(array)


def _file_samples(ds: Dataset) -> tuple[list[Sample], list[int]] | None:
    for attr in ("samples", "_samples"):  # ImageFolder family, GTSRB, StanfordCars: [(path, label)]
        pairs = getattr(ds, attr, None)
        if isinstance(pairs, list) and pairs and isinstance(pairs[0], tuple) and len(pairs) == len(ds):
            return [str(p) for p, _ in pairs], [int(t) for _, t in pairs]
    for attr in ("_image_files", "_images"):  # Flowers102, Food101, DTD, OxfordIIITPet
        files = getattr(ds, attr, None)
        targets = _targets(ds)
        if isinstance(files, list) and targets is not None and len(files) == len(ds):
            return [str(p) for p in files], targets
    return None


def _to_split(ds: Dataset) -> Split:
    files = _file_samples(ds)
    if files is not None:
        return Split(samples=files[0], targets=files[1])
    targets = _targets(ds)
    arrays = _array_samples(ds)
    if arrays is not None and targets is not None:
        return Split(samples=arrays, targets=targets)
    # Generic path: index the dataset (targets read once here, images decoded lazily by the loader workers).
    items = [DatasetItem(ds, i) for i in range(len(ds))]
    return Split(samples=items, targets=targets or [int(ds[i][1]) for i in range(len(ds))])


def _names(ds: Dataset, targets: list[int]) -> list[str]:
    classes = getattr(ds, "classes", None)
    if classes is not None and len(classes) > max(targets, default=-1):
        return [str(c) for c in classes]
    return [str(i) for i in range(max(targets, default=-1) + 1)]


def _where(options: SourceOptions) -> SourceOptions:
    """Only what opening a dataset depends on, so that ``_open``'s cache serves ``class_names`` and ``load`` alike
    whatever ``val_split`` and ``seed`` the data module has."""
    return SourceOptions(root=options.root, download=options.download)


def class_names(name: str, options: SourceOptions) -> list[str]:
    ds = _open(name, "train", _where(options))
    return _names(ds, _targets(ds) or _to_split(ds).targets)


def load(name: str, options: SourceOptions) -> Listing:
    train_ds, val_ds = _open(name, "train", _where(options)), _open(name, "val", _where(options))
    train = _to_split(train_ds)
    return Listing(_names(train_ds, train.targets), train, _to_split(val_ds) if val_ds is not None else None)
