"""ImageDataModule: uint8 image loaders, with normalisation or whitening fitted on the train split, on the device."""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from litdata import StreamingDataLoader
from timm.data import ResizeKeepRatio
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision.transforms import InterpolationMode, v2

from tlkit.data import shards
from tlkit.data.decode import RandomResizedCropDecoder, read_image
from tlkit.data.preprocess import build_preprocess, needs_fit
from tlkit.data.sources import (
    BAD_IMAGE_POLICIES,
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    ImageDataset,
    SourceData,
    Split,
    list_class_names,
    list_files,
    load_source,
    scan_images,
    subfolders,
)
from tlkit.io import PATH_TEXT

AUGMENTATIONS = ("none", "basic", "randaugment", "trivialaugment")
SAMPLERS = (None, "balanced")
AFFINE_INTERPOLATIONS = (InterpolationMode.NEAREST, InterpolationMode.BILINEAR)  # what v2's affine ops take on tensors
SKIPPED_FILE = "skipped_files.csv"
# Paths named in the warning itself; the full list is in the run directory.
_WARN_MAX_PATHS = 20
IMAGENET_DATA_CONFIG = dict(
    input_size=(3, 224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bilinear",
    crop_pct=0.875, crop_mode="center",
)  # fmt: skip
# timm's evaluation crop modes (`timm.data.transforms_imagenet_eval`); a data_config without one means "center".
CROP_MODES = ("center", "squash", "border")
# The modes torchvision resizes uint8 tensors with (PIL's box/hamming/lanczos have no tensor kernel).
TENSOR_INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic")


class ImageDataModule(L.LightningDataModule):
    """Image classification data whose loaders yield ``(uint8 images (N, 3, H, W), int64 labels)``, or, for a
    multi-label source (:attr:`multilabel`), ``float`` multi-hot targets ``(N, num_classes)``.

    Normalisation runs on the device after the batch transfer (``on_after_batch_transfer``), with statistics that
    are part of the module's ``state_dict`` and so of every checkpoint. Sizes, mean/std and interpolation come from
    ``data_config``, the model's (``ImageDataModule(..., data_config=model.data_config)``; the CLI passes it from the
    recipe's backbone), so a recipe states them once, in the model.

    Args:
        source: ``folder:<dir>``, ``csv:<file>``, ``torchvision:<Name>``, ``textures`` or ``digits`` (see
            :mod:`tlkit.data.sources`), or ``litdata:<dir or URI>``: shards written by ``tlkit optimize`` (see
            :mod:`tlkit.data.shards`), streamed by litdata.
        image_size: training/evaluation size in pixels; default: the backbone's input size.
        batch_size: images per batch (per device).
        num_workers: loader worker processes.
        val_split: fraction of each class held out for validation when the source has no val split.
        seed: seed of the shuffling and augmentation (and of the split, for sources without a fixed one). ``None``:
            shuffling and augmentation follow the run's seed (``seed_everything``, ``PL_GLOBAL_SEED``), so runs with
            different seeds see different orders, and the split stays that of seed 0, so their val sets are equal.
        preprocess: ``"pretrained"`` (the backbone weights' mean/std), ``"dataset"`` (per-channel mean/std fitted
            on the train split), ``"pca"`` or ``"zca"`` (whitening fitted on the train split) or ``"none"``.
        whiten_scope: ``"channel"`` or ``"image"``, for ``pca``/``zca``.
        whiten_eps: regulariser of the whitening (default: per scope, see :mod:`tlkit.data.preprocess`).
        augment: ``"none"``, ``"basic"`` (random resized crop + flip), ``"randaugment"`` or ``"trivialaugment"``
            (basic, then the policy).
        crop_scale: area range of the random resized crop (fraction of the image).
        hflip: random horizontal flips.
        randaugment_ops: number of RandAugment operations per image.
        randaugment_magnitude: RandAugment magnitude (0-30).
        mean: overrides the backbone's mean for ``preprocess="pretrained"``.
        std: overrides the backbone's std.
        interpolation: resize interpolation (``bilinear``, ``bicubic``, ``nearest``); default: the backbone's.
        crop_pct: fraction of the resized image that the evaluation crop keeps (the resize is
            ``floor(image_size / crop_pct)``, as in timm); default: the backbone's.
        predict_source: a folder of images (searched recursively), or one image file, for ``predict``; default: the
            val split.
        on_bad_image: ``"skip"``: unreadable image files are left out, listed in one warning and written to
            ``skipped_files.csv`` in the run directory (so are dangling symlinks and images outside any class
            folder, and files that became unreadable after the scan, which the loaders replace by the next readable
            sample); ``"raise"``: stop with an error naming the file.
        sampler: ``None`` (shuffle) or ``"balanced"``: sample training images with probability inversely proportional
            to their class size (with replacement), so every class is seen equally often.
        data_root: folder of ``torchvision:`` datasets (default ``~/.cache/tlkit/datasets``).
        download: let ``torchvision:`` datasets download when missing (needs a network).
        max_image_pixels: image files declaring more pixels (width x height) are unreadable, before any decoding
            (a guard against decompression bombs); default ~179 MP (PIL's hard limit; fits 108 MP phone photos);
            None: no limit.
        data_config: what the backbone's weights expect (``input_size``, ``mean``, ``std``, ``interpolation``,
            ``crop_pct``, ``crop_mode``, optionally ``resize_size``): pass ``model.data_config``. None: ImageNet's
            defaults. The arguments above override its values.
        train_per_class: keep only the first N training images of each class (a few-label training set, e.g. to
            compare ImageNet weights with a random init); the validation split stays whole. None: all of them.
        reduced_jpeg_decode: decode a large JPEG at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, through PIL's
            ``draft``) when the random crop (training) or the resize (evaluation) needs no more pixels than that: a
            phone photo becomes a 224-px crop several times faster. Never below what the crop needs; False: always
            decode in full (pixel-exact with timm's and torchvision's PIL pipelines).
        index_dir: folder of the cached image index of ``folder:``/``csv:`` sources (see
            :func:`tlkit.data.sources.load_source`); ``""``: no cache.
    """

    def __init__(
        self,
        source: str = "textures",
        image_size: int | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        val_split: float = 0.2,
        seed: int | None = None,
        preprocess: str = "pretrained",
        whiten_scope: str = "channel",
        whiten_eps: float | None = None,
        augment: str = "basic",
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        interpolation: str | None = None,
        crop_pct: float | None = None,
        predict_source: str | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        hflip: bool = True,
        randaugment_ops: int = 2,
        randaugment_magnitude: int = 9,
        on_bad_image: str = "skip",
        sampler: str | None = None,
        data_root: str | None = None,
        download: bool = False,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
        data_config: dict[str, Any] | None = None,
        train_per_class: int | None = None,
        reduced_jpeg_decode: bool = True,
        index_dir: str | None = None,
    ):
        super().__init__()
        check_arguments(image_size=image_size, batch_size=batch_size)
        if train_per_class is not None and train_per_class < 1:
            raise ValueError(f"train_per_class={train_per_class!r} keeps no image; use a count >= 1 or None (all).")
        if augment not in AUGMENTATIONS:
            raise ValueError(f"Unknown augment={augment!r}; choose one of {AUGMENTATIONS}.")
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"Unknown on_bad_image={on_bad_image!r}; choose one of {BAD_IMAGE_POLICIES}.")
        if sampler not in SAMPLERS:
            raise ValueError(f"Unknown sampler={sampler!r}; choose one of {SAMPLERS}.")
        if sampler is not None and source.startswith(shards.SCHEME):
            raise ValueError(
                f"sampler={sampler!r} cannot draw from shards (source={source!r}): litdata streams each rank's chunks "
                "in its own order. Use class weights in the loss instead, or a folder: or csv: source."
            )
        self.save_hyperparameters()
        self.preprocess: torch.nn.Module | None = None
        self._pending_state: dict[str, Any] | None = None
        self._data: SourceData | None = None
        self._reported = False
        self._run_seed: int | None = None  # the run's seed, rank 0's under DDP (see shuffle_seed)

    @functools.cached_property
    def class_names(self) -> list[str]:
        """Sorted class names; index = label."""
        if self._shards is not None:
            return shards.read_meta(self._shards)["class_names"]
        return list_class_names(self.hparams.source, root=self.hparams.data_root, download=self.hparams.download)

    @property
    def _shards(self) -> str | None:
        """The folder or URI of a ``litdata:`` source; None for other sources."""
        source = self.hparams.source
        return source.removeprefix(shards.SCHEME) if source.startswith(shards.SCHEME) else None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def multilabel(self) -> bool:
        """Whether images carry several labels (a multi-label CSV, ``texture-pairs``): batches then hold ``float``
        multi-hot targets ``(N, num_classes)``. The CLI passes it to the model, as ``num_classes``."""
        return self._shards is None and self.data.multilabel

    @property
    def data(self) -> SourceData:
        if self._data is None and self._shards is not None:
            self._data = shards.shard_source_data(self._shards)
        if self._data is None:
            hp = self.hparams
            self._data = load_source(
                hp.source,
                val_split=hp.val_split,
                seed=0 if hp.seed is None else hp.seed,  # the run's seed must not move images between splits
                on_bad_image=hp.on_bad_image,
                root=hp.data_root,
                download=hp.download,
                max_image_pixels=hp.max_image_pixels,
                index_dir=hp.index_dir,
            )
            if hp.get("train_per_class"):
                self._data = _first_per_class(self._data, hp.train_per_class)
        return self._data

    def num_images(self, split: str) -> int:
        """Number of images in ``split``: ``"train"``, ``"val"`` (also what ``test`` evaluates) or ``"predict"``."""
        return len(self._split(split).samples)

    def image(self, split: str, index: int) -> torch.Tensor:
        """The ``index``-th image of ``split`` as its source holds it: ``uint8`` ``(3, H, W)``, before any transform
        (the order of :meth:`num_images` and of the split's loader without shuffling, and of ``FeatureSet`` rows)."""
        return read_image(self._split(split).samples[index], max_pixels=self.hparams.max_image_pixels)

    def _split(self, split: str) -> Split:
        splits = {"train": lambda: self.data.train, "val": lambda: self.data.val, "predict": self.predict_split}
        if split not in splits:
            raise ValueError(f"Unknown split {split!r}; choose one of {list(splits)}.")
        return splits[split]()

    @property
    def shuffle_seed(self) -> int:
        """``seed`` if given, else the run's (``PL_GLOBAL_SEED``, set by ``seed_everything``), else 0.

        Under DDP the run's seed is rank 0's (read in :meth:`setup`): ranks seeded differently (each its own
        augmentation stream) must still share one order, or their shares of it overlap and some images are never
        drawn."""
        if self.hparams.seed is not None:
            return self.hparams.seed
        if self._run_seed is not None:
            return self._run_seed
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    @property
    def class_counts(self) -> list[int]:
        """Number of training images per class (index = label; multi-label: images showing the class), after
        unreadable files were left out."""
        targets = self.data.train.targets
        if self.data.multilabel:
            return np.asarray(targets).sum(axis=0, dtype=np.int64).tolist()
        return torch.bincount(torch.as_tensor(targets), minlength=len(self.data.class_names)).tolist()

    # --------------------------------------------------------------------------------------------- configuration

    def data_config(self) -> dict[str, Any]:
        """The image size, mean/std, interpolation and crop (fraction, mode) in use: explicit arguments first, then
        the ``data_config`` given at construction (the model's), then ImageNet defaults.

        An ``image_size`` override keeps the weights' crop fraction: a torchvision ``resize_size`` scales with the
        crop, timm's ``crop_pct`` holds as it is. An explicit ``crop_pct`` replaces torchvision's ``resize_size``.
        """
        hp = self.hparams
        config = dict(hp.data_config or IMAGENET_DATA_CONFIG)
        overrides = dict(mean=hp.mean, std=hp.std, interpolation=hp.interpolation, crop_pct=hp.crop_pct)
        config.update({k: v for k, v in overrides.items() if v is not None})
        if hp.crop_pct is not None:
            config.pop("resize_size", None)
        if hp.image_size:
            config = _with_image_size(config, hp.image_size)
        return config

    def setup(self, stage: str | None = None) -> None:
        self._ensure_preprocess()
        self._report_skipped()
        self._run_seed = _rank_zero_value(int(os.environ.get("PL_GLOBAL_SEED", 0)))

    def _ensure_preprocess(self) -> torch.nn.Module:
        """The preprocessing module, built on first use: cheap enough for ``normalize`` to call on every batch."""
        if self.preprocess is None:
            self.preprocess = self._build_preprocess()
        return self.preprocess

    def _report_skipped(self) -> None:
        """One warning naming the unreadable (skipped) and non-image (ignored) files, and the full list written to
        ``skipped_files.csv`` in the run directory."""
        if self._reported:
            return
        self._reported = True
        data = self.data
        if not data.skipped and not data.ignored:
            return
        rows = [*data.skipped, *((path, "ignored: not an image file extension") for path in data.ignored)]
        where = self._write_skipped(rows)
        parts = []
        if data.skipped:
            named = ", ".join(f"{path} ({reason})" for path, reason in data.skipped[:_WARN_MAX_PATHS])
            more = f", and {len(data.skipped) - _WARN_MAX_PATHS} more" if len(data.skipped) > _WARN_MAX_PATHS else ""
            source = self.hparams.source
            parts.append(f"Skipped {len(data.skipped)} unreadable image file(s) of {source}: {named}{more}.")
        if data.ignored:
            parts.append(f"Ignored {len(data.ignored)} file(s) that are not images (by extension).")
        parts.append(f"The full list is in {where}." if where else "With a Trainer, the list goes to its run folder.")
        rank_zero_warn(" ".join(parts))

    def _skipped_path(self) -> Path | None:
        """``skipped_files.csv`` in the run directory, or None without a Trainer."""
        log_dir = self.trainer.log_dir if self.trainer is not None else None
        return Path(log_dir) / SKIPPED_FILE if log_dir else None

    def _write_skipped(self, rows: list[tuple[str, str]]) -> str | None:
        """Write ``path,reason`` rows to the run directory (rank 0, atomically); returns the file or None."""
        out = self._skipped_path()
        if out is None:
            return None
        if self.trainer.is_global_zero:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp")
            with open(tmp, "w", newline="", **PATH_TEXT) as f:
                writer = csv.writer(f)
                writer.writerow(["path", "reason"])
                writer.writerows(rows)
            os.replace(tmp, out)
        return str(out)

    def _build_preprocess(self) -> torch.nn.Module:
        config, hp = self.data_config(), self.hparams
        module = build_preprocess(
            hp.preprocess,
            mean=config["mean"],
            std=config["std"],
            scope=hp.whiten_scope,
            eps=hp.whiten_eps,
            image_size=config["input_size"][1:],
        )
        if self._pending_state is not None:
            module.load_state_dict(self._pending_state)
            self._pending_state = None
        return module

    def transform(self, train: bool) -> v2.Transform:
        """uint8 → uint8 transform of the train (augmenting) or evaluation images.

        The evaluation transform (val, test, predict, feature extraction, the preprocessing fit) is the weights'
        own: see :func:`eval_transform`.
        """
        config = self.data_config()
        if not train or self.hparams.augment == "none":
            return eval_transform(config)
        size = config["input_size"][1:]
        interpolation = interpolation_mode(config["interpolation"])
        hp = self.hparams
        steps = [v2.RandomResizedCrop(size, scale=tuple(hp.crop_scale), interpolation=interpolation, antialias=True)]
        if hp.hflip:
            steps.append(v2.RandomHorizontalFlip())
        # Their rotations and shears take only nearest or bilinear on tensors: torchvision raises for bicubic (the
        # interpolation of most ViT and ConvNeXt weights) in the first loader worker. The resize above keeps bicubic.
        geometric = interpolation if interpolation in AFFINE_INTERPOLATIONS else InterpolationMode.BILINEAR
        if hp.augment == "randaugment":
            steps.append(v2.RandAugment(hp.randaugment_ops, hp.randaugment_magnitude, interpolation=geometric))
        elif self.hparams.augment == "trivialaugment":
            steps.append(v2.TrivialAugmentWide(interpolation=geometric))
        return v2.Compose(steps)

    # ----------------------------------------------------------------------------------------------- dataloaders

    def train_dataloader(self) -> StatefulDataLoader | StreamingDataLoader:
        self.fit_preprocess()
        if self._shards is not None:
            return self._shard_loader("train", self.transform(train=True), shuffle=True)
        dataset = self._dataset(self.data.train, self.transform(train=True))
        rank, world = _rank_world()
        seed = self.shuffle_seed
        if self.hparams.sampler == "balanced":
            if self.data.multilabel:
                raise ValueError(
                    f"sampler='balanced' draws by each image's one class, but {self.hparams.source} is multi-label. "
                    "Leave sampler unset and weigh rare classes in the loss: TransferClassifier(pos_weight=...)."
                )
            counts = torch.tensor(self.class_counts, dtype=torch.float64)
            weights = (1.0 / counts)[torch.as_tensor(self.data.train.targets)]
            sampler: EpochSampler = BalancedSampler(dataset, weights, num_replicas=world, rank=rank, seed=seed)
        else:
            sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        return self._train_loader(dataset, sampler)

    def _train_loader(self, dataset: Dataset, sampler: EpochSampler) -> StatefulDataLoader:
        """The train loader: a ``StatefulDataLoader`` whose position Lightning saves in every checkpoint.

        What a resumed run needs to draw the same batches and augmentations as the uninterrupted one:

        - the order is a function of ``(seed, epoch)`` (:class:`EpochSampler`), so a run resumed at an epoch boundary
          needs no sampler state at all;
        - the workers' seeds come from ``sampler.generator``, which the sampler re-seeds at every epoch, and the
          workers start afresh every epoch (no ``persistent_workers``: a persistent worker's random state runs on
          across epochs, and no checkpoint holds it);
        - within an epoch, the loader snapshots its state only when the epoch's iterator starts
          (``snapshot_every_n_steps=None``); resuming mid-epoch replays the batches since then through the workers
          (loading only, no training), so each worker's random state reaches exactly where the interrupted run's
          was. A snapshot every step would restart the workers from their initial seeds mid-epoch: different
          augmentations.
        """
        workers = self.hparams.num_workers
        return StatefulDataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            generator=sampler.generator,
            snapshot_every_n_steps=None,
            drop_last=ends_in_one_image(len(sampler), self.hparams.batch_size),
        )

    def val_dataloader(self) -> DataLoader | StreamingDataLoader:
        self.fit_preprocess()
        if self._shards is not None:
            return self._shard_loader("val", self.transform(train=False), shuffle=False)
        return self._loader(self._dataset(self.data.val, self.transform(train=False)))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        self.fit_preprocess()
        return self._loader(self._dataset(self.predict_split(), self.transform(train=False)))

    def predict_split(self) -> Split:
        """The images ``predict`` runs on: ``predict_source`` (labels -1) or the val split."""
        if self.hparams.predict_source is None and self._shards is not None:
            raise ValueError(
                f"predict needs image files; source={self.hparams.source!r} holds shards. Pass predict_source=<folder>."
            )
        if self.hparams.predict_source is None:
            return self.data.val
        return self._predict_files

    def predict_class_names(self) -> list[str] | None:
        """Class names of the images ``predict`` runs on: the source's for its val split, the sub-folder names of a
        ``predict_source`` with class folders, None for a flat folder."""
        if self.hparams.predict_source is None:
            return self.class_names
        return (subfolders(self._predict_root) or None) if self._predict_root.is_dir() else None

    @property
    def _predict_root(self) -> Path:
        return Path(self.hparams.predict_source.removeprefix("folder:")).expanduser()

    @functools.cached_property
    def _predict_files(self) -> Split:
        """The readable images of ``predict_source`` (scanned once, like the training source)."""
        root = self._predict_root
        if root.is_file() and root.suffix.lower() in IMAGE_EXTENSIONS:  # "predict this photo"
            paths = [str(root)]
        elif root.is_dir():
            paths = sorted(list_files(root)[0])  # as a training folder is listed: hidden and tool folders skipped
        else:
            what = "a file of another kind" if root.is_file() else "not found"
            raise FileNotFoundError(
                f"predict_source {str(root)!r} is {what}; expected a folder of images (searched recursively) or one "
                f"image file ({', '.join(sorted(IMAGE_EXTENSIONS))})."
            )
        bad = scan_images(paths, max_pixels=self.hparams.max_image_pixels)
        if bad and self.hparams.on_bad_image == "raise":
            raise ValueError(f"Unreadable image {bad[0][0]}: {bad[0][1]} (predict_source; {len(bad)} unreadable)")
        if bad:
            listed = ", ".join(f"{path} ({reason})" for path, reason in bad[:_WARN_MAX_PATHS])
            rank_zero_warn(f"predict_source: skipped {len(bad)} unreadable image file(s): {listed}")
            paths = sorted(set(paths) - {path for path, _ in bad})
        if not paths:
            raise ValueError(f"predict_source {str(root)!r} holds no readable images ({', '.join(IMAGE_EXTENSIONS)}).")
        return Split(paths, [-1] * len(paths))

    def _dataset(self, split: Split, transform: v2.Compose) -> ImageDataset:
        """A split's dataset: files unreadable since the scan are replaced and appended to the skipped-files list."""
        hp = self.hparams
        transform, decode = self._decoding(transform)
        log = self._skipped_path()
        return ImageDataset(
            split,
            transform,
            max_pixels=hp.max_image_pixels,
            on_bad_image=hp.on_bad_image,
            skipped_log=log,
            decode=decode,
        )

    def _shard_loader(self, split: str, transform: v2.Compose, shuffle: bool) -> StreamingDataLoader:
        """A litdata loader over one split of the shards: each DDP rank and worker streams its own chunks, the order
        is a function of ``(seed, epoch)``, and Lightning saves the loader's position in every checkpoint."""
        transform, decode = self._decoding(transform)
        hp = self.hparams
        dataset = shards.ShardDataset(
            shards.split_dir(self._shards, split), transform, decode, shuffle=shuffle, seed=self.shuffle_seed
        )
        loader = ShardTrainLoader if split == "train" and shuffle else StreamingDataLoader
        return loader(
            dataset, batch_size=hp.batch_size, num_workers=hp.num_workers, pin_memory=torch.cuda.is_available()
        )

    def _decoding(self, transform: v2.Compose) -> tuple[v2.Compose, Callable[[Any], torch.Tensor] | None]:
        """``transform`` split into what the decoder does (a JPEG decoded at a reduced DCT scale, never below what
        the transform's first resize needs) and the steps after it; ``(transform, None)`` with
        ``reduced_jpeg_decode=False``."""
        hp = self.hparams
        if not hp.reduced_jpeg_decode:
            return transform, None
        first, *rest = transform.transforms
        if isinstance(first, v2.RandomResizedCrop):  # the crop is drawn from the header, then decoded to fit
            return v2.Compose(rest), RandomResizedCropDecoder(first, hp.max_image_pixels)
        min_size = EvalResizeSize(self.data_config())  # the evaluation transform: never below its resize
        return transform, functools.partial(read_image, max_pixels=hp.max_image_pixels, min_size=min_size)

    def _loader(self, dataset: Dataset) -> DataLoader:
        """An evaluation loader (in order).

        It has a generator of its own: without one, each new iterator draws its workers' seed from the global torch
        generator, so whether a validation starts new workers (a resumed run skips the sanity check) would change
        every random draw of the training that follows.
        """
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(self.shuffle_seed),
        )

    # ------------------------------------------------------------------------------------------------ preprocess

    def fit_preprocess(self) -> None:
        """Fit the statistics on the train split (evaluation transform, no augmentation), unless they were
        restored from a checkpoint. Under DDP each rank streams its own shard and the sums are all-reduced."""
        self.setup()
        if needs_fit(self.preprocess):
            self.preprocess.fit(self.train_eval_loader())  # fit takes (uint8 images, labels) batches as they come

    def train_eval_loader(self, max_images: int | None = None) -> DataLoader | StreamingDataLoader:
        """This rank's part of the train split (all of it without DDP) as uint8 ``(images, targets)`` batches with
        the evaluation transform (no augmentation), in a fixed order: what statistics and probe heads are fitted on.
        Under DDP the ranks' parts together are the whole split (litdata gives each rank its own).

        Args:
            max_images: at most this many images in all ranks' parts together: a random subset (seeded, so every
                run takes the same one) of a folder or CSV split. From shards, whose train split ``tlkit optimize``
                wrote in a random order, the loader is the whole part: stop after ``max_images / world`` images.
        """
        self.setup()
        if self._shards is not None:
            return self._shard_loader("train", self.transform(train=False), shuffle=False)
        rank, world = _rank_world()
        dataset = self._dataset(self.data.train, self.transform(train=False))
        rows = np.arange(len(dataset))
        if max_images is not None and max_images < len(rows):
            rows = np.sort(np.random.default_rng(self.shuffle_seed).choice(len(rows), max_images, replace=False))
        return self._loader(Subset(dataset, rows[rank::world].tolist()))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, targets = batch
        return self.normalize(images), targets

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images on any device → the float inputs the model trains on."""
        preprocess = self._ensure_preprocess().to(images.device)
        return preprocess(images)  # uint8 goes straight in: Normalize folds the 1/255 into its own pass

    def state_dict(self) -> dict[str, Any]:
        return {"preprocess": self.preprocess.state_dict()} if self.preprocess is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("preprocess")
        if state is None:
            return
        if self.preprocess is None:
            self._pending_state = state  # loaded into the module when setup() builds it
        else:
            self.preprocess.load_state_dict(state)


def _first_per_class(data: SourceData, per_class: int) -> SourceData:
    """``data`` with the first ``per_class`` training images of each class (in the split's order) and all of val."""
    seen = np.zeros(len(data.class_names), dtype=np.int64)
    keep = []
    for i, target in enumerate(data.train.targets):
        classes = np.flatnonzero(target) if data.multilabel else [target]  # multi-label: while any class needs it
        if (seen[classes] < per_class).any():
            seen[classes] += 1
            keep.append(i)
    return dataclasses.replace(data, train=data.train.take(keep))


def _with_image_size(config: dict[str, Any], image_size: int) -> dict[str, Any]:
    """``config`` at a square ``image_size``, with the weights' crop fraction kept."""
    config = dict(config)
    crop = config["input_size"][1]
    if "resize_size" in config and image_size != crop:
        config["resize_size"] = image_size * config["resize_size"] // crop  # integer: no float rounding of a ratio
    config["input_size"] = (3, image_size, image_size)
    return config


def interpolation_mode(name: str) -> InterpolationMode:
    """The torchvision mode of an interpolation name, checked to work on tensors (a bad one would otherwise fail
    only in a loader worker)."""
    if name not in TENSOR_INTERPOLATIONS:
        raise ValueError(f"interpolation={name!r} cannot resize tensors; use one of {TENSOR_INTERPOLATIONS}.")
    return InterpolationMode(name)


def eval_transform(config: dict[str, Any]) -> v2.Compose:
    """The evaluation transform of ``config``'s weights, on uint8 ``(3, H, W)`` tensors, without the float
    conversion and normalisation (the data module runs those on the device).

    It equals torchvision's ``weights.transforms()`` when ``config`` has a ``resize_size`` (shorter side to it,
    centre crop), and otherwise timm's ``create_transform(**resolve_data_config(...), is_training=False)`` with its
    ``crop_mode``: ``center`` (shorter side to ``floor(size / crop_pct)``, centre crop), ``squash`` (both sides to
    it, aspect ratio not kept) or ``border`` (longer side to it, centre crop, padded with the mean colour).

    torchvision's uint8 antialiased resize follows PIL's, so the result is within one grey level of timm's PIL
    transform (see tests/test_eval_transform.py).

    Args:
        config: ``input_size``, ``interpolation``, ``crop_pct`` and optionally ``crop_mode``, ``resize_size`` and
            ``mean`` (the ``border`` fill).
    """
    size = tuple(config["input_size"][1:])
    interpolation = interpolation_mode(config["interpolation"])
    crop_mode = config.get("crop_mode") or "center"
    if crop_mode not in CROP_MODES:
        raise ValueError(f"Unknown crop_mode={crop_mode!r} in data_config; timm's modes are {CROP_MODES}.")
    if "resize_size" in config:
        resize = v2.Resize(config["resize_size"], interpolation, antialias=True)
        return v2.Compose([resize, v2.CenterCrop(size)])
    scale = tuple(math.floor(s / config["crop_pct"]) for s in size)  # timm's formula: floor, not round
    if crop_mode == "squash":
        resize = v2.Resize(scale, interpolation, antialias=True)
    elif crop_mode == "border":
        fill = tuple(round(255 * m) for m in config["mean"])
        return v2.Compose([KeepRatioResize(scale, interpolation, longest=True), CenterCropOrPad(size, fill)])
    elif scale[0] == scale[1]:
        resize = v2.Resize(scale[0], interpolation, antialias=True)  # shorter side, as timm (torchvision's rule)
    else:
        resize = KeepRatioResize(scale, interpolation, longest=False)
    return v2.Compose([resize, v2.CenterCrop(size)])


class EvalResizeSize:
    """``(height, width) -> (height, width)`` that :func:`eval_transform`'s resize gives an image of that size: the
    smallest an image may be decoded at without changing what the evaluation crop sees (beyond rounding)."""

    def __init__(self, config: dict[str, Any]) -> None:
        crop = tuple(config["input_size"][1:])
        self.crop_mode = config.get("crop_mode") or "center"
        if "resize_size" in config:  # torchvision: shorter side to resize_size
            self.crop_mode, side = "center", config["resize_size"]
            self.target = (side, side) if isinstance(side, int) else tuple(side) * (2 // len(side))
        else:
            self.target = tuple(math.floor(s / config["crop_pct"]) for s in crop)

    def __call__(self, height: int, width: int) -> tuple[int, int]:
        target_h, target_w = self.target
        if self.crop_mode == "squash":
            return target_h, target_w
        pick = min if self.crop_mode == "border" else max  # border: longer side fits; center: shorter side fills
        ratio = pick(target_h / height, target_w / width)
        return math.ceil(height * ratio), math.ceil(width * ratio)


class KeepRatioResize(torch.nn.Module):
    """Resize keeping the aspect ratio so that the shorter (or longer) side fits ``size`` — timm's
    ``ResizeKeepRatio`` (its size rule, called here), with torchvision's uint8 tensor resize instead of PIL's."""

    def __init__(self, size: tuple[int, int], interpolation: InterpolationMode, longest: bool):
        super().__init__()
        self.size, self.interpolation, self.longest = size, interpolation, longest

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        new_size = ResizeKeepRatio.get_params(image, self.size, longest=float(self.longest))
        return v2.functional.resize(image, new_size, self.interpolation, antialias=True)

    def extra_repr(self) -> str:
        return f"size={self.size}, interpolation={self.interpolation.value}, longest={self.longest}"


class CenterCropOrPad(torch.nn.Module):
    """Centre crop to ``size``, padding a smaller image with ``fill`` first — timm's ``CenterCropOrPad``, whose
    tensor path takes only one fill value (``torchvision.transforms.functional.pad``), not a colour."""

    def __init__(self, size: tuple[int, int], fill: tuple[int, ...]):
        super().__init__()
        self.size, self.fill = size, fill

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        (height, width), (crop_h, crop_w) = image.shape[-2:], self.size
        pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
        if pad_w or pad_h:  # timm's split: the odd pixel goes right / bottom
            padding = [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2]
            image = v2.functional.pad(image, padding, fill=list(self.fill))
        return v2.functional.center_crop(image, list(self.size))

    def extra_repr(self) -> str:
        return f"size={self.size}, fill={self.fill}"


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _rank_zero_value(value: int) -> int:
    """Rank 0's ``value`` on every rank (``value`` itself outside DDP). Called from ``setup``, which every rank runs."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return int(shared[0])


class EpochSampler(DistributedSampler):
    """torch's ``DistributedSampler`` (order a function of ``seed`` and the epoch, this rank's share of it), plus a
    ``generator`` re-seeded from ``(seed, epoch)`` at every ``set_epoch`` for the loader's worker seeds.

    Why a ``DistributedSampler`` on one process too: an order that depends on the epoch alone (Lightning calls
    ``set_epoch`` at the start of every epoch) needs no state to resume at an epoch boundary, unlike a generator
    that runs on from epoch to epoch; and under DDP Lightning keeps a ``DistributedSampler`` as it is.
    """

    def __init__(self, dataset: Dataset, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.generator = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.generator.manual_seed(self._epoch_seed())

    def _epoch_seed(self, stream: int = 0) -> int:
        return hash((self.seed, self.epoch, stream)) & (2**63 - 1)  # a hash of ints is the same in every process


class BalancedSampler(EpochSampler):
    """Draws ``len(weights)`` images with replacement, each with probability proportional to its weight (as
    ``WeightedRandomSampler``), a new draw for every ``(seed, epoch)``; each rank takes every ``world``-th of it."""

    def __init__(self, dataset: Dataset, weights: torch.Tensor, **kwargs: Any) -> None:
        super().__init__(dataset, shuffle=True, **kwargs)
        self.weights = weights

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self._epoch_seed(stream=1))
        drawn = torch.multinomial(self.weights, self.total_size, replacement=True, generator=generator)
        return iter(drawn[self.rank : self.total_size : self.num_replicas].tolist())


class ShardTrainLoader(StreamingDataLoader):
    """The shards' train loader, without batches of one image (see :func:`ends_in_one_image`). Each loader worker
    streams its own share of the items and batches it, so a batch of one can end any worker's share, which no
    ``drop_last`` decided up front can tell; it is left out as it comes (at most one image per worker per epoch)."""

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            if len(batch[1]) > 1 or self.batch_size == 1:
                yield batch


def ends_in_one_image(samples: int, batch_size: int) -> bool:
    """Whether an epoch of ``samples`` (this rank's) ends in a batch of one image, which the train loader drops.

    A BatchNorm that sees one value per channel cannot train on it: the 1x1 maps of small images, or a BatchNorm1d
    head (LeViT) raise "Expected more than 1 value per channel when training" — after the whole epoch has run.
    timm's and fastai's train loaders drop every incomplete batch; only the one-image batch is dropped here, so no
    other data is left out, and that image is another one each epoch (the order is shuffled).
    """
    return samples > 1 and batch_size > 1 and samples % batch_size == 1


def check_arguments(image_size: Any, batch_size: Any) -> None:
    """Reject sizes that would silently fall back to a default (``image_size: 0`` trained at 224) or fail later.

    Raises:
        ValueError: naming the key, the value and what is valid.
    """
    _check_size("image_size", image_size, allow_none="None (the backbone weights' input size)")
    _check_size("batch_size", batch_size)


def _check_size(key: str, value: Any, allow_none: str = "") -> None:
    """A positive whole number (``0`` would silently fall back to a default), or None where ``allow_none`` says."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        valid = f"a whole number >= 1{f' or {allow_none}' if allow_none else ''}"
        raise ValueError(f"{key}={value!r}; use {valid}.")
