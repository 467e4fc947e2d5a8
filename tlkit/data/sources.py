"""Image sources: turn a spec string into train/val sample lists and class names.

Supported specs:

- ``folder:<dir>``: an ImageFolder tree (``<dir>/<class>/<img>``), optionally pre-split into
  ``<dir>/train`` and ``<dir>/val`` (or the other names of ``SPLIT_FOLDERS``: ``valid``, ``validation``, ...).
- ``csv:<file>``: a CSV file with a path column and a label column (optionally a ``split`` column); a ``labels``
  column of ``;``-separated names, or one 0/1 column per class, makes it multi-label.
- ``torchvision:<Name>``: a torchvision classification dataset (CIFAR10, FashionMNIST, Flowers102, ...).
- ``textures``: built-in, offline 64x64 patches of 10 scikit-image photos (one class per photo).
- ``texture-pairs``: built-in, offline, multi-label: 64x64 patches whose left and right parts come from two of those
  photos (a quarter from one), labelled with both.
- ``digits``: scikit-learn's 8x8 handwritten digits.

A sample is either a file path (``str``) or an in-memory ``uint8`` numpy array in **HWC** layout
(``H x W x 3``; ``H x W`` grayscale is also accepted). :func:`read_image` turns either into a
``uint8`` ``(3, H, W)`` RGB tensor; normalisation happens later, on the device.

Bad files: every image *file* of a source is checked once by :func:`load_source`, before the train/val split (so a
skipped file cannot empty a class's val set unnoticed), from its header and end marker, with the verdicts cached
on disk (:mod:`tlkit.data.index`). Unreadable files (corrupt header, truncated, zero-byte, not an image, missing,
over the pixel limit) are dropped and listed in ``SourceData.skipped`` with ``on_bad_image="skip"``, or stop the load
with an error naming the file with ``on_bad_image="raise"``; a file damaged inside its data, which only a full decode
finds, is replaced and listed by the loader (:class:`ImageDataset`). Odd modes (grayscale, palette, RGBA, CMYK,
16-bit) are converted to 8-bit RGB.

New schemes are added by writing one loader and one class-name function and registering them in
``_SOURCES``.
"""

from __future__ import annotations

import csv
import functools
import math
import operator
import os
import re
import unicodedata
import urllib.parse
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # Windows: no flock; loader workers' rows may then interleave
    fcntl = None
from torch.utils.data import Dataset

from tlkit.data.decode import MAX_IMAGE_PIXELS, ImageTooLargeError, read_image
from tlkit.data.index import PathList, check_files, thread_map
from tlkit.data.splits import LABEL_SEPARATOR, Listing, Sample, SourceData, SourceOptions, Split, multi_hot
from tlkit.io import PATH_TEXT

# torchvision's ImageFolder list, and what photos also come as: .jfif/.jpe (JPEGs saved from browsers), .heic/.heif
# (iPhone), .avif, .jp2/.j2k (JPEG 2000: satellite tiles, scanners; fuzzed like the others, see docs/data.md).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".heic",
     ".heif", ".avif", ".jp2", ".j2k"}
)  # fmt: skip
BAD_IMAGE_POLICIES = ("skip", "raise")
# Folders that tools write beside the photos and that never hold data: macOS's zip metadata (a class folder of "._*"
# AppleDouble files) and a Synology NAS's thumbnails of every photo (JPEGs: as images of their class they would put
# copies of validation photos into training). Skipped like hidden entries.
NOT_DATA_FOLDERS: frozenset[str] = frozenset({"__MACOSX", "@eaDir"})
# The folders of a pre-split tree, and a CSV's split values, as tools and tutorials name them (torchvision's and
# Keras's train/val and train/validation, Roboflow's train/valid/test); None: a test split, which fit never reads.
SPLIT_FOLDERS: dict[str, str | None] = {
    "train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": None,
    "testing": None,
}  # fmt: skip
# Words that mark a folder name as a split's (``training_set``, ``seg_train``, ``test-images``).
TRAIN_WORDS = frozenset({"train", "training", "trn", "trainset"})
SPLIT_WORDS = TRAIN_WORDS | {*SPLIT_FOLDERS, "dev", "eval", "evaluation", "valset", "testset"}

PATCH = 64
TEXTURE_TRAIN_PER_CLASS = 48
TEXTURE_VAL_PER_CLASS = 16
TEXTURE_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "brick",
    "chelsea",
    "coffee",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "retina",
)
# Photos are downscaled so the short side is at most this, so a 64-px patch still shows structure.
TEXTURE_SHORT_SIDE = 320
# Val patches come from the bottom rows below this fraction of the height, train from above it.
TEXTURE_TRAIN_FRACTION = 0.75
# Fixed so the textures val set is identical across runs, whatever seed the caller passes.
TEXTURE_SEED = 0
# What marks a folder written by `tlkit optimize` (tlkit.data.shards), never a class of a folder source.
SHARDS_META_FILE = "tlkit_shards.json"


class ImageDataset(Dataset):
    """Dataset over a :class:`Split` yielding ``(uint8 (3, H, W) image after transform, target)``.

    A file that fails to decode (damaged inside, where the source's header check cannot see, or changed or removed
    after the scan) does not stop the loader: with
    ``on_bad_image="skip"`` it is named in a warning, appended to ``skipped_log`` and replaced by the next readable
    sample of the split (with that sample's target), so a rerun sees the same batches; each file is listed and warned
    about once per run, whichever worker or epoch meets it. ``"raise"`` re-raises.

    Args:
        split: The samples and their targets.
        transform: uint8 → uint8 transform applied to each image.
        max_pixels: Pixel limit of decoded files (see :func:`read_image`).
        on_bad_image: ``"skip"`` or ``"raise"``, as for :func:`load_source`.
        skipped_log: CSV file (``path,reason``) that replaced files are appended to, e.g. the run's
            ``skipped_files.csv``; None: the warning only.
        decode: ``sample -> uint8 (3, H, W)`` image, before ``transform``; default :func:`read_image` with
            ``max_pixels`` (a decoder that also crops, e.g. :class:`tlkit.data.decode.RandomResizedCropDecoder`,
            takes the transform's first step).
    """

    def __init__(
        self,
        split: Split,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        max_pixels: int | None = MAX_IMAGE_PIXELS,
        on_bad_image: str = "skip",
        skipped_log: str | os.PathLike | None = None,
        decode: Callable[[Sample], torch.Tensor] | None = None,
    ) -> None:
        self.split = split
        self.decode = decode or functools.partial(read_image, max_pixels=max_pixels)
        self.transform = transform
        self.max_pixels = max_pixels
        self.on_bad_image = on_bad_image
        self.skipped_log = skipped_log
        self._reported: set[str] = set()  # per process (each loader worker has its own copy)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        unreadable: list[tuple[str, Exception]] = []
        for offset in range(len(self)):
            position = (index + offset) % len(self)  # deterministic substitute: the next readable sample
            sample = self.split.samples[position]
            try:
                image = self.decode(sample)
            except (ValueError, OSError) as err:
                if self.on_bad_image == "raise" or not isinstance(sample, str):
                    raise
                unreadable.append((sample, err))
                continue
            if unreadable:
                self._report_unreadable(unreadable, replacement=sample)
            if self.transform is not None:
                image = self.transform(image)
            return image, as_target(self.split.targets[position])
        raise ValueError(f"None of the {len(self)} images of this split can be read any more; see the warnings above")

    def _report_unreadable(self, unreadable: list[tuple[str, Exception]], replacement: Sample) -> None:
        """Warn about and list each file once per run: once per process here, and once in ``skipped_log`` across
        the loader's workers and epochs (the train loader starts new workers every epoch; two workers meet the same
        file, one at its own index and one looking for a substitute)."""
        # The scan reads headers and end markers only: damage inside the data shows first here (or the file changed).
        rows = [
            (path, f"unreadable when loaded (damaged inside, or changed after the scan): {short_reason(err)}")
            for path, err in unreadable
            if path not in self._reported
        ]
        self._reported.update(path for path, _ in rows)
        if rows and self.skipped_log is not None:
            try:
                rows = append_skipped(self.skipped_log, rows)
            except OSError as log_err:  # the list is a report; failing to write it must not stop training
                warnings.warn(f"Could not add {rows[0][0]} to {self.skipped_log}: {log_err}", stacklevel=3)
        named = f" by {replacement}" if isinstance(replacement, str) else ""
        for path, reason in rows:
            warnings.warn(f"Skipped {path} in the loader, replaced{named}: {reason}", stacklevel=3)


def as_target(target: int | np.ndarray) -> int | torch.Tensor:
    """A sample's target as the loss takes it: an ``int`` label, or a multi-hot row as ``float32`` (BCE's)."""
    return torch.from_numpy(target.astype(np.float32)) if np.ndim(target) == 1 else int(target)


def append_skipped(csv_path: str | os.PathLike, rows: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Append the ``(path, reason)`` rows whose path the skipped-files CSV does not list yet (writing its
    ``path,reason`` header when new); returns the rows appended.

    Loader workers append at the same time: an exclusive ``flock`` (where the OS has one) makes the header come first,
    the rows whole, and each path listed once.
    """
    Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "a+", newline="", **PATH_TEXT) as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        f.seek(0)
        listed = {row[0] for row in csv.reader(f) if row}  # the file as it is now, under the lock
        new = [row for row in dict(rows).items() if row[0] not in listed]
        writer = csv.writer(f)
        if not listed:
            writer.writerow(["path", "reason"])
        writer.writerows(new)
    return new


# --------------------------------------------------------------------------- splitting


def stratified_split(
    targets: Sequence[int], class_names: Sequence[str], *, val_split: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split sample indices per class into train/val, fixed by ``seed``.

    Each class gets ``round(n * val_split)`` val samples (half rounds up). Classes are shuffled
    independently so adding a class does not change the split of the others.

    Args:
        targets: Label per sample.
        class_names: Names used in error messages (index = label).
        val_split: Fraction of each class that goes to val, in (0, 1).
        seed: Seed of the shuffle.

    Returns:
        Sorted train indices and sorted val indices.

    Raises:
        ValueError: If ``val_split`` is out of range or a class would end up with no train or val sample.
    """
    _check_val_split(val_split)
    targets_arr = np.asarray(targets)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for label, name in enumerate(class_names):
        members = np.flatnonzero(targets_arr == label)
        if len(members) < 2:
            raise ValueError(
                f"Class '{name}' has {len(members)} image(s); a train/val split needs at least 2 per class"
            )
        n_val = math.floor(len(members) * val_split + 0.5)
        if n_val == 0:
            raise ValueError(
                f"val_split={val_split} leaves class '{name}' ({len(members)} images) with no val sample; "
                "use a larger val_split or add more images"
            )
        if n_val == len(members):
            raise ValueError(
                f"val_split={val_split} leaves class '{name}' ({len(members)} images) with no train sample; "
                "use a smaller val_split or add more images"
            )
        shuffled = np.random.default_rng([seed, label]).permutation(members)
        val_idx.extend(shuffled[:n_val].tolist())
        train_idx.extend(shuffled[n_val:].tolist())
    return sorted(train_idx), sorted(val_idx)


def _check_val_split(val_split: float) -> None:
    if not 0.0 < val_split < 1.0:
        raise ValueError(f"val_split must be in (0, 1), got {val_split}")


def multilabel_split(
    targets: Sequence[np.ndarray], class_names: Sequence[str], *, val_split: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split multi-label samples into train/val, fixed by ``seed``: a seeded shuffle of all samples (a per-class
    split cannot hold for images in several classes), ``round(n * val_split)`` of them to val.

    Raises:
        ValueError: ``val_split`` out of range, or a class without a train image or without a val image (its
            average precision would be undefined).
    """
    _check_val_split(val_split)
    n_val = math.floor(len(targets) * val_split + 0.5)
    order = np.random.default_rng([seed, len(targets)]).permutation(len(targets))
    val_idx, train_idx = sorted(order[:n_val].tolist()), sorted(order[n_val:].tolist())
    rows = np.asarray(targets)
    for split_name, idx in (("train", train_idx), ("val", val_idx)):
        counts = rows[idx].sum(axis=0) if idx else np.zeros(len(class_names))
        if missing := [class_names[c] for c in np.flatnonzero(counts == 0)]:
            raise ValueError(
                f"val_split={val_split} (seed {seed}) leaves class(es) {missing} with no {split_name} image; add "
                "images of them, change val_split or seed, or give the CSV a split column"
            )
    return train_idx, val_idx


# --------------------------------------------------------------------------- folder:<dir>


ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".7z", ".rar")


def _folder_root(arg: str) -> Path:
    root = Path(arg).expanduser()
    if root.is_dir():
        return root
    layout = "expected 'folder:<dir>' with <dir>/<class>/<image> or <dir>/train/<class>/<image> and <dir>/val/..."
    archive = root if root.is_file() else next((a for a in _archives_named(root) if a.is_file()), None)
    if archive is not None and archive.name.lower().endswith(ARCHIVE_SUFFIXES):  # the dataset as downloaded
        name = archive.name.lower()
        unpack = (
            f"python -m zipfile -e {archive} <dir>"
            if name.endswith(".zip")
            else f"tar xf {archive} -C <dir>"
            if ".tar" in name or name.endswith(".tgz")
            else "7-Zip"
        )
        raise FileNotFoundError(
            f"{archive} is an archive, not a folder: unpack it ({unpack}) and use 'folder:<dir>'; {layout}"
        )
    if root.is_file():
        raise FileNotFoundError(f"{root} is a file, not a folder{_what_was_meant(str(root)) or ''}; {layout}")
    raise FileNotFoundError(f"Image folder not found: {root}; {layout}")


def _archives_named(root: Path) -> list[Path]:
    """``photos.zip``, ``photos.tar.gz``, ... beside a folder ``photos`` that does not exist."""
    return [root.with_name(root.name + suffix) for suffix in ARCHIVE_SUFFIXES]


def _presplit_dirs(root: Path) -> tuple[Path, Path] | None:
    """``(train, val)`` folders when ``root`` is pre-split (a train and a val folder by any name of
    ``SPLIT_FOLDERS``, letter case aside), else None. A test folder beside them is left for the user's evaluation.

    A lone split-named folder is a split with its validation folder missing (an error naming the fixes) when it holds
    sub-folders, and a class when it holds the images itself (the vehicle "train" of a bus/car/train dataset).
    """
    found: dict[str, list[Path]] = defaultdict(list)
    for name in subfolders(root):
        if (role := SPLIT_FOLDERS.get(name.lower())) is not None:
            found[role].append(root / name)
    for role, dirs in found.items():
        if len(dirs) > 1:
            raise ValueError(f"{root} has {len(dirs)} {role} folders ({', '.join(d.name for d in dirs)}); keep one")
    train, val = found.get("train", [None])[0], found.get("val", [None])[0]
    if train and val:
        return train, val
    if (have := train or val) and subfolders(have):
        fix = (
            f"use 'folder:{train}' (val_split of it is held out per class)"
            if train
            else f"add {root}/train/<class>/ beside it"
        )
        raise FileNotFoundError(
            f"Found {have} but no {'validation' if train else 'training'} folder beside it (train/ with val/, valid/ "
            f"or validation/); {fix}, or put class folders directly in {root}"
        )
    return None


def _name_words(name: str) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", name.lower()))


def _split_like(root: Path, names: Sequence[str]) -> list[str]:
    """Class folder names that look like a dataset's splits (``training_set``, ``seg_test``, ``test``) and hold
    sub-folders of their own: the classes are one level down."""
    return [name for name in names if _name_words(name) & SPLIT_WORDS and subfolders(root / name)]


def _is_data(name: str) -> bool:
    """Hidden entries (``.DS_Store``, ``.ipynb_checkpoints``, macOS's ``._*`` files) and tool folders are not data."""
    return not name.startswith(".") and name not in NOT_DATA_FOLDERS


def subfolders(root: str | os.PathLike) -> list[str]:
    """Sorted names of the sub-folders of ``root`` that can hold data (the class folders of a folder source)."""
    with os.scandir(root) as it:
        return sorted(e.name for e in it if e.is_dir() and _is_data(e.name))


def _class_dirs(root: Path) -> list[str]:
    """Sorted class sub-folder names (hidden and tool folders skipped); none is an error."""
    names = subfolders(root)
    if not names:
        raise FileNotFoundError(f"No class sub-folders in {root}; expected {root}/<class>/<image>")
    for name in names:  # `tlkit optimize --out` inside the source: its shards are not a class of images
        if (root / name / SHARDS_META_FILE).is_file():
            raise ValueError(
                f"{root / name} holds shards written by `tlkit optimize` ({SHARDS_META_FILE}), not a class of images: "
                f"move it out of {root} (train from it with source='litdata:<its new path>')"
            )
    return names


def _list_files(class_dir: Path, links: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Image paths under ``class_dir`` (recursive, like torchvision's ImageFolder), and the other files, both in the
    order of their path components (a folder's entries sorted by name, sub-folders walked where they sort).

    Hidden files (``.DS_Store``, ...) and tool folders (``NOT_DATA_FOLDERS``) are neither; an empty class folder is an
    error. ``os.scandir`` tells files from folders without a ``stat`` per entry, so listing a large folder costs little
    more than ImageFolder's.
    """
    images, others = list_files(class_dir, links)
    if not images:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise FileNotFoundError(f"Class folder {class_dir} has no images (accepted extensions: {exts})")
    return images, others


def list_files(folder: str | os.PathLike, links: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Image paths under ``folder`` (recursive, hidden and tool folders skipped) and the other files; the images that
    are symbolic links are also appended to ``links`` (the listing shows a link, not whether its target exists)."""
    images: list[str] = []
    others: list[str] = []
    # Every folder from the file system's root down to this one: a link to any of them is a loop.
    parents = [Path(folder).resolve(), *Path(folder).resolve().parents]
    above = frozenset((s.st_dev, s.st_ino) for s in map(os.stat, parents))
    _walk(os.fspath(folder), images, others, [] if links is None else links, above)
    return images, others


def _walk(
    folder: str, images: list[str], others: list[str], links: list[str], above: frozenset[tuple[int, int]]
) -> None:
    """List ``folder`` into ``images``, ``others`` and ``links`` (see :func:`list_files`); ``above`` holds the
    (device, inode) of every folder it is in."""
    here = os.stat(folder)
    above = above | {(here.st_dev, here.st_ino)}
    with os.scandir(folder) as it:
        entries = [e for e in it if _is_data(e.name)]
    entries.sort(key=_entry_name)  # (a key of C code: a folder of 100,000 files is sorted in ~0.03 s)
    for entry in entries:
        if entry.is_dir():  # follows symlinks, as Path.rglob's is_dir did
            if entry.is_symlink() and ((target := os.stat(entry.path)).st_dev, target.st_ino) in above:
                # A link back up the tree (cat/all -> ..) would list the images again under each level, other
                # classes' too, until the OS stops it ("Too many levels of symbolic links"): listed, not followed.
                others.append(entry.path)
                continue
            _walk(entry.path, images, others, links, above)
        # A dangling symlink is listed as an image (when its name says so), so the scan names it rather than losing it.
        elif entry.is_file() or entry.is_symlink():
            name = entry.name
            dot = name.rfind(".")
            if name[dot:].lower() in IMAGE_EXTENSIONS and dot > 0:
                images.append(entry.path)
                if entry.is_symlink():  # d_type: no stat
                    links.append(entry.path)
            else:
                others.append(entry.path)


_entry_name = operator.attrgetter("name")


def _scan_folder(
    root: Path, class_to_idx: dict[str, int], ignored: list[str], unusable: list[tuple[str, str]], links: list[str]
) -> Split:
    """List every image of every class dir in ``root`` with its label; non-image files go to ``ignored``, images
    lying in ``root`` itself (no class) to ``unusable``, images that are symbolic links also to ``links``."""
    unusable.extend(_loose_images(root))
    samples: list[str] = []
    targets: list[int] = []
    by_form = {unicodedata.normalize("NFC", name): index for name, index in class_to_idx.items()}
    for name in _class_dirs(root):
        # Compared in one Unicode form: val/Bär made on Linux is train/Bär unpacked from a Mac's zip (decomposed).
        if (label := by_form.get(unicodedata.normalize("NFC", name))) is None:
            known = ", ".join(class_to_idx)
            raise ValueError(f"Class folder {root / name} is not among the training classes ({known})")
        files, others = _list_files(root / name, links)
        samples.extend(files)
        targets.extend([label] * len(files))
        ignored.extend(others)
    return Split(samples=PathList.from_strings(samples), targets=targets)


def _loose_images(folder: Path) -> list[tuple[str, str]]:
    """Image files directly in ``folder``, outside any class folder, with the reason they are not used."""
    with os.scandir(folder) as it:
        loose = sorted(e.path for e in it if _is_data(e.name) and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS)
    return [(path, f"outside any class folder: move it to {folder}/<class>/ to use it") for path in loose]


def _is_text(name: str) -> bool:
    """Whether a file system name is real text (not bytes that are no UTF-8, which Python holds as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _training_classes(root: Path) -> list[str]:
    """Class folder names of a training folder; a classifier needs at least two, and folders named like a
    dataset's splits (``training_set/`` and ``test_set/``, each holding the class folders) are not classes."""
    names = _class_dirs(root)
    if undecodable := [os.fsencode(name) for name in names if not _is_text(name)]:
        # A Latin-1 name from an old Windows zip, held as surrogates: a class name goes into checkpoints, YAML,
        # plots and reports, each of which failed on it ("surrogates not allowed"), some after a whole epoch.
        raise ValueError(
            f"Class folder name(s) {undecodable[:3]} in {os.fsencode(root)!r} are not UTF-8 text (written by an old "
            f"Windows or zip tool); class names go into checkpoints, plots and reports: rename the folders, e.g. "
            f"convmv -f latin1 -t utf8 -r --notest <folder>"
        )
    if len(split_like := _split_like(root, names)) >= 2:
        train = next((n for n in split_like if _name_words(n) & TRAIN_WORDS), split_like[0])
        raise ValueError(
            f"The class folders {split_like} of {root} look like a dataset's splits, each holding class folders, not "
            f"classes; use 'folder:{root / train}' (val_split of it is held out per class), or name the splits "
            f"{root}/train/ and {root}/val/"
        )
    if len(names) < 2:
        wrapper = root / names[0]
        hint = (
            f"its classes are one level down: use 'folder:{wrapper}'"
            if subfolders(wrapper)
            else f"put each class's images in its own sub-folder {root}/<class>/"
        )
        raise ValueError(
            f"Image folder {root} has only one class folder ({names[0]!r}); a classifier needs at least 2 classes: "
            f"{hint}"
        )
    return names


def _folder_class_names(arg: str, options: SourceOptions) -> list[str]:
    root = _folder_root(arg)
    presplit = _presplit_dirs(root)
    return _training_classes(presplit[0] if presplit else root)


def _load_folder(arg: str, options: SourceOptions) -> Listing:
    root = _folder_root(arg)
    presplit = _presplit_dirs(root)
    class_names = _training_classes(presplit[0] if presplit else root)
    class_to_idx = {name: i for i, name in enumerate(class_names)}
    ignored: list[str] = []
    unusable: list[tuple[str, str]] = []
    links: list[str] = []
    if not presplit:
        everything = _scan_folder(root, class_to_idx, ignored, unusable, links)
        return Listing(class_names, everything, None, ignored, unusable, listed=True, links=frozenset(links))
    unusable.extend(_loose_images(root))
    train = _scan_folder(presplit[0], class_to_idx, ignored, unusable, links)
    val = _scan_folder(presplit[1], class_to_idx, ignored, unusable, links)
    return Listing(class_names, train, val, ignored, unusable, listed=True, links=frozenset(links))


# --------------------------------------------------------------------------- csv:<file>

# Column names as exports write them, compared without case, spaces, "_" and "-" ("Image Path", "file_name").
CSV_PATH_COLUMNS = (
    "path", "image", "file", "filename", "filepath", "image_path", "img_path", "img", "image_name", "image_file",
)  # fmt: skip
CSV_LABEL_COLUMNS = ("label", "class", "target", "category", "class_name", "label_name", "category_name")
CSV_LABELS_COLUMN = "labels"  # multi-label: the names of each image, separated by LABEL_SEPARATOR
_CSV_FLAGS = {"0": 0, "1": 1}
_URL = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]+)://")  # two letters at least: C://x on Windows is a drive
_CSV_LAYOUTS = (
    f"one label column (any of {list(CSV_LABEL_COLUMNS)}), a {CSV_LABELS_COLUMN!r} column of names separated by "
    f"{LABEL_SEPARATOR!r}, or one column of 0/1 per class"
)


@dataclass(frozen=True)
class _CsvRows:
    """A CSV source's rows: ``labels`` holds one name per row, or (``multilabel``) the list of names of each row."""

    paths: list[str]
    labels: list[str] | list[list[str]]
    splits: list[str] | None
    class_names: list[str]
    multilabel: bool

    def targets(self) -> list[int] | np.ndarray:
        index = {name: i for i, name in enumerate(self.class_names)}
        if self.multilabel:
            return multi_hot([[index[name] for name in names] for names in self.labels], len(self.class_names))
        return [index[label] for label in self.labels]


def _pick_column(header: Sequence[str], candidates: Sequence[str]) -> str | None:
    by_plain = {_plain_column(h): h for h in reversed(header)}  # reversed: the first of two alike columns wins
    return next((by_plain[name] for name in map(_plain_column, candidates) if name in by_plain), None)


def _plain_column(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


def _delimiter(header: str) -> str:
    """The header's separator: ``,``, else ``;`` (what Excel writes where the decimal mark is a comma) or a tab (a
    ``.tsv``). Read from the header alone, not guessed from the rows (``csv.Sniffer`` can take a ``;`` inside a
    multi-label cell for the separator); a header without a comma has no multi-label cells to confuse."""
    return "," if "," in header else next((d for d in (";", "\t") if d in header), ",")


def _not_utf8(data: bytes) -> str:
    """Where ``data`` stops being UTF-8 and what to do (the reader's error counts from its last chunk, not the file)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        return (
            f"line {line}: not UTF-8 text (byte {data[err.start]:#04x}); save it as 'CSV UTF-8' (Excel) or convert "
            "it, e.g. iconv -f cp1252 -t utf-8"
        )
    return "not UTF-8 text"


def _read_csv_rows(file: Path) -> _CsvRows:
    """Read a CSV source: a path column, then the labels in one of three layouts.

    - a ``label`` (or ``class``, ``target``, ``category``) column: one class per image;
    - a ``labels`` column of names separated by ``;`` (``cat;dog``; empty: none of the classes): multi-label;
    - one column of 0/1 per class, named after it: multi-label, classes in column order.

    An optional ``split`` column assigns rows to train, val (or valid/validation) or test (left out of fit).
    """
    if not file.is_file():
        raise FileNotFoundError(f"CSV file not found: {file}; expected 'csv:<file>' with path and label columns")
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a BOM
            reader = csv.DictReader(f, delimiter=_delimiter(f.readline()))
            f.seek(0)
            header = [h for h in reader.fieldnames or [] if h is not None]
            rows = list(enumerate(reader, start=2))
    except UnicodeDecodeError:  # Excel's plain "CSV" is the Windows code page: class names would be mojibake
        raise ValueError(f"{file}: {_not_utf8(file.read_bytes())}") from None
    path_col = _pick_column(header, CSV_PATH_COLUMNS)
    if path_col is None:
        expected = list(CSV_PATH_COLUMNS)
        raise ValueError(f"{file} has no path column; its columns are {header}, expected one of {expected}")
    split_col = next((h for h in header if h.strip().lower() == "split"), None)
    if not rows:
        raise ValueError(f"{file} has a header but no rows")
    paths, splits, windows, first_windows, relative = [], [], 0, "", 0
    for line, row in rows:
        path = (row.get(path_col) or "").strip()
        if not path:
            raise ValueError(f"{file}, line {line}: empty {path_col!r} cell")
        if (url := _URL.match(path)) and url[1].lower() == "file":  # file:///data/x.jpg, as browsers copy it
            path = urllib.parse.unquote(urllib.parse.urlparse(path).path)
        elif url:  # read as a relative path it became "<csv folder>/https:/host/x.jpg: file not found"
            raise ValueError(
                f"{file}, line {line}: {path!r} is a URL; tlkit reads image files: download the images (e.g. with "
                f"wget -x or a short script) and give their local paths, relative to the CSV's folder or absolute"
            )
        if os.sep == "/" and "\\" in path:  # written on Windows: images\cat\1.jpg is images/cat/1.jpg here
            first_windows = first_windows or path
            windows += 1
            path = path.replace("\\", "/")
        # Relative paths are relative to the CSV's folder, so the CSV and its images move together.
        relative += not Path(path).is_absolute()
        full = str((file.parent / path) if not Path(path).is_absolute() else Path(path))
        paths.append(full if full.isascii() else _as_on_disk(full))
        splits.append((row.get(split_col) or "").strip().lower() if split_col else "")
    if windows:
        warnings.warn(
            f"{file}: {windows} path(s) use Windows separators ({first_windows!r}); read with '/' "
            f"({first_windows.replace(chr(92), '/')!r}).",
            stacklevel=4,
        )
    if not relative:
        _check_absolute_paths_exist(file, paths)
    splits_or_none = splits if split_col else None
    label_col = _pick_column(header, CSV_LABEL_COLUMNS)
    names_col = _pick_column(header, (CSV_LABELS_COLUMN,))
    if label_col is not None:
        labels = []
        for line, row in rows:
            label = (row.get(label_col) or "").strip()
            if not label:
                raise ValueError(f"{file}, line {line}: empty {label_col!r} cell")
            if LABEL_SEPARATOR in label:  # each combination would silently become a class of its own
                raise ValueError(
                    f"{file}, line {line}: {label!r} in the {label_col!r} column holds several names; a "
                    f"{label_col!r} column is one class per image: for multi-label data name it "
                    f"{CSV_LABELS_COLUMN!r} (names separated by {LABEL_SEPARATOR!r})"
                )
            labels.append(label)
        parsed = _CsvRows(paths, labels, splits_or_none, _sorted_labels(labels), multilabel=False)
    elif names_col is not None:
        _check_separator(file, names_col, rows)
        sets = [_split_names(row.get(names_col) or "") for _, row in rows]
        names = _sorted_labels([name for names in sets for name in names])
        parsed = _CsvRows(paths, sets, splits_or_none, names, multilabel=True)
    else:
        flag_cols = [h for h in header if h not in (path_col, split_col)]
        if len(flag_cols) < 2:
            raise ValueError(f"{file} has no label column; its columns are {header}, expected {_CSV_LAYOUTS}")
        parsed = _CsvRows(paths, _read_flags(file, rows, flag_cols), splits_or_none, flag_cols, multilabel=True)
    return _one_row_per_image(file, [line for line, _ in rows], parsed)


def _check_absolute_paths_exist(file: Path, paths: list[str], sample: int = 20) -> None:
    """Refuse a CSV of absolute paths of which none of the first ``sample`` exists here: a CSV written on
    another machine (``/home/alice/data/cat/1.jpg``), which would otherwise list every image as missing. Where the
    files lie under the CSV's own folder, say which prefix to replace."""
    head = paths[:sample]
    if any(os.path.lexists(p) for p in head):
        return
    prefix = os.path.commonpath(head) if len(head) > 1 else os.path.dirname(head[0])
    parts = Path(prefix).parts
    # The shortest tail of the prefix under which the CSV's folder holds the files: /home/alice/data -> <csv dir>.
    moved = next(
        (os.path.join(*parts[: i + 1]) for i in range(len(parts)) if
         all((file.parent / os.path.relpath(p, os.path.join(*parts[: i + 1]))).exists() for p in head[:3])),
        None,
    )  # fmt: skip
    hint = f"; the files are under its folder: replace {moved!r} with {str(file.parent)!r}" if moved else ""
    raise FileNotFoundError(
        f"{file}: its paths are absolute and none of the first {len(head)} exists here (e.g. {head[0]}): written on "
        f"another machine? Relative paths are read from the CSV's folder{hint}"
    )


def _as_on_disk(path: str) -> str:
    """``path``, or its other Unicode normal form where only that exists: an accented name typed in a CSV (NFC, as
    Windows and Linux write it) names a file unpacked from a zip made on a Mac, which stores it decomposed (NFD),
    and the two are one name to a reader but different bytes to the file system."""
    if unicodedata.is_normalized("NFC", path) and unicodedata.is_normalized("NFD", path):
        return path  # one form only (no accents: CJK, Cyrillic, ...): nothing else to look for, no stat
    if os.path.lexists(path):
        return path
    for form in ("NFC", "NFD"):
        if (other := unicodedata.normalize(form, path)) != path and os.path.lexists(other):
            return other
    return path


def _one_row_per_image(file: Path, lines: list[int], rows: _CsvRows) -> _CsvRows:
    """``rows`` with each image once. A row repeating an earlier one (same image, label and split; paths compared
    normalised, ``a/./x.jpg`` is ``a/x.jpg``) is dropped with a warning: kept, a random split could put the copies
    in train and val, and validation would score images the model trained on. The same image with another label or
    in another split is an error naming both lines: no choice between them would be right."""
    first: dict[str, int] = {}
    keep, repeats = [], []
    for i, path in enumerate(rows.paths):
        j = first.setdefault(os.path.normpath(path), i)
        if j == i:
            keep.append(i)
            continue
        (label, earlier), where = (rows.labels[i], rows.labels[j]), f"{file}: {path} is on line {lines[j]} and line"
        if (sorted(label) if rows.multilabel else label) != (sorted(earlier) if rows.multilabel else earlier):
            raise ValueError(
                f"{where} {lines[i]}, labelled {earlier!r} and {label!r}; give each image one row: fix the label, or "
                f"list an image's classes in one row, in a {CSV_LABELS_COLUMN!r} column separated by "
                f"{LABEL_SEPARATOR!r} (multi-label)"
            )
        if rows.splits is not None and rows.splits[i] != rows.splits[j]:
            raise ValueError(
                f"{where} {lines[i]}, in the splits {rows.splits[j]!r} and {rows.splits[i]!r}; an image in both would "
                "be validated on what the model trained on: keep one row"
            )
        repeats.append((lines[i], lines[j]))
    if not repeats:
        return rows
    warnings.warn(
        f"{file}: {len(repeats)} row(s) repeat an earlier row's image and label (line {repeats[0][0]} repeats line "
        f"{repeats[0][1]}); each image is used once",
        stacklevel=5,
    )
    splits = None if rows.splits is None else [rows.splits[i] for i in keep]
    return replace(rows, paths=[rows.paths[i] for i in keep], labels=[rows.labels[i] for i in keep], splits=splits)


def _check_separator(file: Path, column: str, rows: list[tuple[int, dict[str, str]]]) -> None:
    """Refuse a ``labels`` column whose names are separated by ``|`` (as ChestX-ray14 and other medical sets write
    them) and never by ``;``: every combination would silently become one class. (Spaces and commas also occur in
    class names, so they are not taken for separators.)"""
    cells = [(line, (row.get(column) or "").strip()) for line, row in rows]
    if any(LABEL_SEPARATOR in cell for _, cell in cells):
        return
    if found := next(((line, cell) for line, cell in cells if "|" in cell), None):
        raise ValueError(
            f"{file}, line {found[0]}: {found[1]!r} in the {column!r} column looks like names separated by '|'; "
            f"tlkit separates them with {LABEL_SEPARATOR!r} (e.g. sed 's/|/;/g'), else each combination would be "
            "one class"
        )


def _split_names(cell: str) -> list[str]:
    """``"cat; dog"`` -> ``["cat", "dog"]``; repeated and empty names dropped."""
    return list(dict.fromkeys(part.strip() for part in cell.split(LABEL_SEPARATOR) if part.strip()))


def _read_flags(file: Path, rows: list[tuple[int, dict[str, str]]], columns: list[str]) -> list[list[str]]:
    """The class names flagged 1 in each row of a one-0/1-column-per-class CSV."""
    sets = []
    for line, row in rows:
        values = {column: (row.get(column) or "").strip() for column in columns}
        bad = next(((c, v) for c, v in values.items() if v not in _CSV_FLAGS), None)
        if bad is not None:
            raise ValueError(
                f"{file}, line {line}: column {bad[0]!r} holds {bad[1]!r}; with no label column every column but "
                f"the path and split is a class flagged 0 or 1. Expected {_CSV_LAYOUTS}"
            )
        sets.append([column for column, value in values.items() if _CSV_FLAGS[value]])
    return sets


def _sorted_labels(labels: Sequence[str]) -> list[str]:
    """Unique labels, numerically sorted when they are all integers ("2" before "10"), else alphabetically."""
    unique = set(labels)
    if all(label.lstrip("-").isdigit() for label in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def _csv_class_names(arg: str, options: SourceOptions) -> list[str]:
    return _read_csv_rows(Path(arg).expanduser()).class_names


def _load_csv(arg: str, options: SourceOptions) -> Listing:
    file = Path(arg).expanduser()
    rows = _read_csv_rows(file)
    paths, splits = rows.paths, rows.splits
    everything = Split(samples=PathList.from_strings(paths), targets=rows.targets())
    if splits is None:
        return Listing(rows.class_names, everything)
    unknown = sorted({s for s in splits if s not in SPLIT_FOLDERS})
    if unknown:
        raise ValueError(f"{file}: unknown split values {unknown}; use train, val (or valid/validation) or test")
    groups = {name: [i for i, s in enumerate(splits) if SPLIT_FOLDERS[s] == name] for name in ("train", "val")}
    ignored = [paths[i] for i, s in enumerate(splits) if SPLIT_FOLDERS[s] is None]  # test rows: not used by fit
    train, val = (everything.take(groups[k]) for k in ("train", "val"))
    return Listing(rows.class_names, train, val, ignored)


# --------------------------------------------------------------------------- textures


@functools.cache
def load_texture_photo(name: str) -> np.ndarray:
    """Return one scikit-image photo as read-only uint8 HxWx3, short side at most ``TEXTURE_SHORT_SIDE``."""
    if name not in TEXTURE_PHOTOS:
        raise ValueError(f"Unknown texture photo {name!r}; choose from {', '.join(TEXTURE_PHOTOS)}")
    import skimage.data
    from skimage.transform import resize

    photo = getattr(skimage.data, name)()
    if photo.ndim == 2:
        photo = np.stack([photo] * 3, axis=-1)
    scale = TEXTURE_SHORT_SIDE / min(photo.shape[:2])
    if scale < 1.0:
        shape = (round(photo.shape[0] * scale), round(photo.shape[1] * scale))
        resized = resize(photo, shape, anti_aliasing=True, preserve_range=True)
        photo = np.clip(np.rint(resized), 0, 255).astype(np.uint8)
    photo = np.ascontiguousarray(photo[..., :3])
    photo.flags.writeable = False
    return photo


def texture_split_row(height: int) -> int:
    """First row of the val region: train patches lie above it, val patches at or below it."""
    return int(height * TEXTURE_TRAIN_FRACTION)


def texture_patch_coords(
    height: int,
    width: int,
    *,
    n_train: int = TEXTURE_TRAIN_PER_CLASS,
    n_val: int = TEXTURE_VAL_PER_CLASS,
    seed: int = TEXTURE_SEED,
) -> tuple[np.ndarray, np.ndarray]:
    """Random top-left ``(y, x)`` corners of train and val patches from disjoint row bands.

    Train patches fit entirely in rows ``[0, split)`` and val patches in ``[split, height)`` with
    ``split = texture_split_row(height)``, so no patch straddles the border and nothing leaks.

    Returns:
        ``(train_yx, val_yx)`` int arrays of shape ``(n_train, 2)`` and ``(n_val, 2)``.
    """
    split = texture_split_row(height)
    if split < PATCH or height - split < PATCH or width < PATCH:
        raise ValueError(f"Photo of {height}x{width} is too small for {PATCH}-px train and val bands")
    rng = np.random.default_rng(seed)

    def corners(n: int, y_lo: int, y_hi: int) -> np.ndarray:
        ys = rng.integers(y_lo, y_hi - PATCH, size=n, endpoint=True)
        xs = rng.integers(0, width - PATCH, size=n, endpoint=True)
        return np.stack([ys, xs], axis=1)

    return corners(n_train, 0, split), corners(n_val, split, height)


def photo_patch_coords(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Top-left ``(y, x)`` corners of the train and val patches the ``textures`` source cuts from ``name``."""
    height, width = load_texture_photo(name).shape[:2]
    # Per-photo seed so each class's patches do not depend on the others.
    return texture_patch_coords(height, width, seed=TEXTURE_SEED + TEXTURE_PHOTOS.index(name))


def _crop(photo: np.ndarray, coords: np.ndarray) -> np.ndarray:
    return np.stack([photo[y : y + PATCH, x : x + PATCH] for y, x in coords])


@functools.lru_cache(maxsize=1)
def _build_textures() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Build ``(train_x, train_y, val_x, val_y)`` once per process; the arrays are read-only."""
    parts: dict[str, list[np.ndarray]] = {"tx": [], "ty": [], "vx": [], "vy": []}
    for label, name in enumerate(TEXTURE_PHOTOS):
        photo = load_texture_photo(name)
        train_yx, val_yx = photo_patch_coords(name)
        parts["tx"].append(_crop(photo, train_yx))
        parts["vx"].append(_crop(photo, val_yx))
        parts["ty"].append(np.full(len(train_yx), label))
        parts["vy"].append(np.full(len(val_yx), label))
    arrays = tuple(np.concatenate(parts[k]) for k in ("tx", "ty", "vx", "vy"))
    for arr in arrays:
        arr.flags.writeable = False
    return arrays  # type: ignore[return-value]


def _textures_class_names(arg: str, options: SourceOptions) -> list[str]:
    return list(TEXTURE_PHOTOS)


def _load_textures(arg: str, options: SourceOptions) -> Listing:
    # val_split and seed are ignored on purpose: the val set is fixed so results compare across runs.
    train_x, train_y, val_x, val_y = _build_textures()
    train = Split(samples=list(train_x), targets=train_y.tolist())
    return Listing(list(TEXTURE_PHOTOS), train, Split(samples=list(val_x), targets=val_y.tolist()))


# --------------------------------------------------------------------------- texture-pairs (multi-label)

# Of the texture-pairs patches, this fraction shows one photo only (so a class alone is learnt too).
PAIR_SINGLE_FRACTION = 0.25


def _pair_split(coords: list[np.ndarray], count: int, seed: int) -> tuple[np.ndarray, list[list[int]]]:
    """``count`` 64-px patches, each the left part of a patch of photo A and the right part of one of photo B
    (cut at a random column in the middle half), labelled ``{A, B}``; ``coords[k]``: the corners to cut photo k at."""
    rng = np.random.default_rng(seed)
    patches, label_sets = [], []
    for _ in range(count):
        a = int(rng.integers(len(TEXTURE_PHOTOS)))
        other = (a + rng.integers(1, len(TEXTURE_PHOTOS))) % len(TEXTURE_PHOTOS)  # any photo but a
        b = a if rng.random() < PAIR_SINGLE_FRACTION else int(other)
        halves = []
        for k in (a, b):
            y, x = coords[k][rng.integers(len(coords[k]))]
            halves.append(load_texture_photo(TEXTURE_PHOTOS[k])[y : y + PATCH, x : x + PATCH])
        cut = int(rng.integers(PATCH // 4, 3 * PATCH // 4 + 1))
        patches.append(np.concatenate([halves[0][:, :cut], halves[1][:, cut:]], axis=1))
        label_sets.append(sorted({a, b}))
    return np.stack(patches), label_sets


@functools.lru_cache(maxsize=1)
def _build_texture_pairs() -> tuple[Split, Split]:
    """Train patches from the photos' train bands, val patches from their val bands (as ``textures``: nothing
    leaks), as many as ``textures`` has."""
    bands = [photo_patch_coords(name) for name in TEXTURE_PHOTOS]
    splits = []
    for which, per_class in ((0, TEXTURE_TRAIN_PER_CLASS), (1, TEXTURE_VAL_PER_CLASS)):
        count = per_class * len(TEXTURE_PHOTOS)
        images, label_sets = _pair_split([band[which] for band in bands], count, seed=TEXTURE_SEED + which)
        images.flags.writeable = False
        splits.append(Split(samples=list(images), targets=multi_hot(label_sets, len(TEXTURE_PHOTOS))))
    return splits[0], splits[1]


def _load_texture_pairs(arg: str, options: SourceOptions) -> Listing:
    train, val = _build_texture_pairs()
    return Listing(list(TEXTURE_PHOTOS), train, val)


# --------------------------------------------------------------------------- digits


def _digits_class_names(arg: str, options: SourceOptions) -> list[str]:
    return [str(d) for d in range(10)]


def _load_digits(arg: str, options: SourceOptions) -> Listing:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Values are 0..16; scale to the full uint8 range and replicate to 3 channels (HWC).
    gray = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(gray[..., None], 3, axis=-1)
    return Listing(_digits_class_names(arg, options), Split(samples=list(images), targets=digits.target.tolist()))


# --------------------------------------------------------------------------- bad files


def _check_image(path: str, max_pixels: int | None = MAX_IMAGE_PIXELS) -> str | None:
    """Why ``path`` cannot be used as an image, or None when it decodes."""
    try:
        read_image(path, max_pixels)
    except FileNotFoundError:
        return f"dangling symlink to {os.readlink(path)}" if os.path.islink(path) else "file not found"
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        return short_reason(err)
    return None


def short_reason(err: Exception) -> str:
    """The decoder's own words, without the path (the listing names it) or C++ source locations."""
    if isinstance(err, ImageTooLargeError):
        return str(err)
    cause = err.__cause__ or err
    return str(cause).strip().splitlines()[-1][-200:] if str(cause).strip() else type(cause).__name__


def scan_images(
    paths: Sequence[str], workers: int | None = None, max_pixels: int | None = MAX_IMAGE_PIXELS
) -> list[tuple[str, str]]:
    """Decode every file in ``paths`` once, in parallel threads, and return ``(path, reason)`` of the bad ones.

    Decoding releases the GIL (libjpeg/libpng/PIL), so threads scale with cores without the cost of processes.

    Args:
        paths: Image file paths.
        workers: Threads; default ``min(32, cpu count)``.
        max_pixels: Pixel limit of a file (see :func:`read_image`).
    """
    if not paths:
        return []
    reasons = thread_map(functools.partial(_check_image, max_pixels=max_pixels), paths, workers)
    return [(p, r) for p, r in zip(paths, reasons, strict=True) if r is not None]


def _drop_bad(split: Split, bad: set[str]) -> Split:
    if not bad:
        return split
    keep = [i for i, s in enumerate(split.samples) if not (isinstance(s, str) and s in bad)]
    return split.take(keep) if len(keep) < len(split) else split


def _file_samples(*splits: Split | None) -> Sequence[str]:
    """The file paths of the splits: joined as arrays when they are PathLists (a folder or CSV source)."""
    present = [split.samples for split in splits if split is not None]
    if all(isinstance(samples, PathList) for samples in present):
        return PathList.concat(present)
    return [s for samples in present for s in samples if isinstance(s, str)]


def _check_bad_files(
    listing: Listing, on_bad_image: str, index_key: str, options: _CheckOptions
) -> list[tuple[str, str]]:
    """Check the listing's files (from their headers, cached: :mod:`tlkit.data.index`); raise on a bad one
    (``raise``) or return them to be dropped (``skip``)."""
    paths = _file_samples(listing.train, listing.val)
    full_check = functools.partial(_check_image, max_pixels=options.max_pixels)
    report = check_files(
        paths,
        key=index_key,
        full_check=full_check,
        max_pixels=options.max_pixels,
        workers=options.workers,
        index_dir=options.index_dir,
        listed=listing.listed,
        links=listing.links,
    )
    skipped = report.bad
    if skipped and on_bad_image == "raise":
        path, reason = skipped[0]
        more = f" (and {len(skipped) - 1} more unreadable file(s))" if len(skipped) > 1 else ""
        raise ValueError(
            f"Unreadable image {path}: {reason}{more}. Fix or remove it, or pass on_bad_image='skip' to leave "
            "unreadable files out (they are then listed in a warning and in the run directory)"
        )
    return skipped


@dataclass(frozen=True)
class _CheckOptions:
    workers: int | None
    max_pixels: int | None
    index_dir: str | None


def _check_classes(train: Split, class_names: Sequence[str], skipped: list[tuple[str, str]]) -> None:
    """Every class needs a train sample; say when skipping emptied it."""
    if train.multilabel:
        present = set(np.flatnonzero(np.asarray(train.targets).any(axis=0)).tolist())
    else:
        present = set(train.targets)
    for label, name in enumerate(class_names):
        if label not in present:
            first = f", e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
            note = f" ({len(skipped)} unreadable file(s) were skipped{first})" if skipped else ""
            raise ValueError(f"Class '{name}' has no readable training image{note}; add images or remove the class")


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Scheme:
    """How to load one spec scheme; ``form`` is shown in error messages."""

    form: str
    load: Callable[[str, SourceOptions], Listing]
    class_names: Callable[[str, SourceOptions], list[str]]
    takes_arg: bool


def _load_torchvision(arg: str, options: SourceOptions) -> Listing:
    from tlkit.data import _tvsource  # imported lazily: torchvision.datasets is only needed here

    return _tvsource.load(arg, options)


def _torchvision_class_names(arg: str, options: SourceOptions) -> list[str]:
    from tlkit.data import _tvsource

    return _tvsource.class_names(arg, options)


_SOURCES: dict[str, _Scheme] = {
    "folder": _Scheme("folder:<dir>", _load_folder, _folder_class_names, takes_arg=True),
    "csv": _Scheme("csv:<file>", _load_csv, _csv_class_names, takes_arg=True),
    "torchvision": _Scheme("torchvision:<Name>", _load_torchvision, _torchvision_class_names, takes_arg=True),
    "textures": _Scheme("textures", _load_textures, _textures_class_names, takes_arg=False),
    "texture-pairs": _Scheme("texture-pairs", _load_texture_pairs, _textures_class_names, takes_arg=False),
    "digits": _Scheme("digits", _load_digits, _digits_class_names, takes_arg=False),
}


def _parse_spec(spec: str) -> tuple[_Scheme, str]:
    """Split ``scheme[:arg]`` and look the scheme up, with a helpful error on misuse."""
    name, sep, arg = spec.strip().partition(":")
    scheme = _SOURCES.get(name.lower())  # Folder:, CSV: as well
    valid = ", ".join(s.form for s in _SOURCES.values())
    if scheme is None:
        raise ValueError(f"Unknown source spec {spec!r}{_what_was_meant(spec.strip())}; valid forms: {valid}")
    if scheme.takes_arg and not arg:
        raise ValueError(f"Source spec {spec!r} needs an argument: {scheme.form}")
    if not scheme.takes_arg and sep:
        raise ValueError(f"Source spec {spec!r} takes no argument: use {scheme.form!r}")
    return scheme, arg


def _what_was_meant(spec: str) -> str:
    """For a spec without its scheme (a bare path, a dataset name): the spec it most likely is, as a hint."""
    from tlkit.data import _tvsource

    path = Path(spec).expanduser()
    if path.is_dir():
        return f": it is a folder, use 'folder:{spec}' (a sub-folder per class) or 'litdata:{spec}' (tlkit optimize's)"
    if path.is_file() and path.suffix.lower() in (".csv", ".tsv", ".txt"):
        return f": it is a table, use 'csv:{spec}' (a path and a label column)"
    name = _tvsource.dataset_name(spec)
    return f": use 'torchvision:{name}'" if name else ""


def load_source(
    spec: str,
    *,
    val_split: float = 0.2,
    seed: int = 0,
    on_bad_image: str = "skip",
    root: str | None = None,
    download: bool = False,
    scan_workers: int | None = None,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    index_dir: str | None = None,
) -> SourceData:
    """Load train/val samples and class names for a source spec, leaving out (or stopping at) unreadable files.

    Args:
        spec: ``folder:<dir>``, ``csv:<file>``, ``torchvision:<Name>``, ``textures`` or ``digits``.
        val_split: Per-class val fraction for sources without a fixed split (ignored by ``textures``
            and by pre-split ``folder`` trees).
        seed: Seed of that split (ignored by ``textures``, whose split is fixed).
        on_bad_image: ``"skip"`` (leave unreadable files out, listed in ``SourceData.skipped``) or ``"raise"``.
        root: Folder of ``torchvision:`` datasets (default ``~/.cache/tlkit/datasets``).
        download: Let ``torchvision:`` datasets download themselves when missing (needs a network).
        scan_workers: Threads of the bad-file check (default: one per core, at most 32).
        max_image_pixels: Files declaring more pixels (width x height) are unreadable (listed, or an error with
            ``"raise"``); None: no limit. The default, ~179 MP, is PIL's hard limit.
        index_dir: Folder of the cached image index (default ``$TLKIT_CACHE_DIR/index``, else
            ``~/.cache/tlkit/index``); ``""``: no cache, every file checked every time.

    Files are checked from their headers (a damaged file that passes is caught when loaded, see
    :class:`ImageDataset`), and the verdicts are cached by path, size and mtime: see :mod:`tlkit.data.index`.

    Returns:
        The train and val splits, the class names and the skipped and ignored files.
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:  # before any I/O: a source may take long to load
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
    scheme, arg = _parse_spec(spec)
    options = SourceOptions(val_split=val_split, seed=seed, root=root, download=download)
    listing = scheme.load(arg, options)
    _warn_look_alike_classes(listing.class_names, spec)
    checks = _CheckOptions(scan_workers, max_image_pixels, index_dir)
    skipped = _check_bad_files(listing, on_bad_image, _index_key(spec, arg), checks)
    bad = {path for path, _ in skipped}
    train = _drop_bad(listing.train, bad)
    _check_classes(train, listing.class_names, skipped)
    if listing.val is None:
        split = multilabel_split if train.multilabel else stratified_split
        train_idx, val_idx = split(train.targets, listing.class_names, val_split=val_split, seed=seed)
        train, val = (train.take(idx) for idx in (train_idx, val_idx))
    else:
        val = _drop_bad(listing.val, bad)
    skipped = [*listing.unusable, *skipped]
    return SourceData(train, val, listing.class_names, skipped=skipped, ignored=listing.ignored)


def _warn_look_alike_classes(class_names: Sequence[str], spec: str) -> None:
    """Class names that differ only in letter case, spacing, ``_``/``-`` or Unicode form (``Cat``, ``cat``,
    ``golden_retriever``, ``Golden Retriever``) are nearly always one class labelled two ways. They train as separate
    classes, which no error would reveal: say so."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in class_names:
        plain = unicodedata.normalize("NFKC", name).casefold().replace("_", " ").replace("-", " ")
        groups[" ".join(plain.split())].append(name)
    if look_alike := [names for names in groups.values() if len(names) > 1]:
        shown = "; ".join(" and ".join(repr(n) for n in names) for names in look_alike[:5])
        more = f" (and {len(look_alike) - 5} more groups)" if len(look_alike) > 5 else ""
        warnings.warn(
            f"{spec}: classes {shown}{more} differ only in letter case, spacing or punctuation; they are trained as "
            "separate classes. If they are one class, give their images one label (rename the folder or fix the CSV).",
            stacklevel=3,
        )


def _index_key(spec: str, arg: str) -> str:
    """What names a source's index: its scheme and the real path of its folder or file."""
    scheme = spec.strip().partition(":")[0]
    return f"{scheme}:{os.path.realpath(os.path.expanduser(arg))}" if arg else scheme


def list_class_names(spec: str, *, root: str | None = None, download: bool = False) -> list[str]:
    """Return the class names of a source in label order, without decoding any image."""
    scheme, arg = _parse_spec(spec)
    return scheme.class_names(arg, SourceOptions(root=root, download=download))


__all__ = [
    "BAD_IMAGE_POLICIES",
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "PATCH",
    "TEXTURE_PHOTOS",
    "ImageDataset",
    "ImageTooLargeError",
    "SourceData",
    "SourceOptions",
    "Split",
    "append_skipped",
    "list_class_names",
    "load_source",
    "load_texture_photo",
    "photo_patch_coords",
    "read_image",
    "scan_images",
    "stratified_split",
    "texture_patch_coords",
    "texture_split_row",
]
