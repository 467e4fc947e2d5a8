"""Tests for tlkit.data.sources."""

from __future__ import annotations

import csv
import os
import struct
import subprocess
import sys
import unicodedata
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.io import write_jpeg, write_png
from torchvision.transforms.functional import pil_to_tensor

from tlkit.data import sources
from tlkit.data._tvsource import DatasetItem
from tlkit.data.sources import (
    PATCH,
    TEXTURE_PHOTOS,
    ImageDataset,
    Split,
    list_class_names,
    load_source,
    load_texture_photo,
    photo_patch_coords,
    read_image,
    texture_patch_coords,
    texture_split_row,
)

# torchvision 0.29 deprecates torchvision.io decoding in favour of torchcodec (not a dependency); the
# warning fires on every call and is hidden outside pytest by Python's default filters.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

# --------------------------------------------------------------------------- helpers


def _random_image(seed: int, size: int = 40) -> torch.Tensor:
    return torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _make_class_dir(root: Path, name: str, n: int, seed: int = 0) -> None:
    class_dir = root / name
    class_dir.mkdir(parents=True)
    for i in range(n):
        write_png(_random_image(seed * 100 + i), str(class_dir / f"img{i}.png"))


def _boxes_overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether any PATCH-sized box with corners in ``a`` intersects any with corners in ``b``."""
    dy = np.abs(a[:, None, 0] - b[None, :, 0])
    dx = np.abs(a[:, None, 1] - b[None, :, 1])
    return bool(np.any((dy < PATCH) & (dx < PATCH)))


@pytest.fixture
def flat_folder(tmp_path: Path) -> Path:
    """3 classes x 6 images of 40x40, created in unsorted order, plus noise that must be ignored."""
    for seed, name in enumerate(["zebra", "apple", "mango"]):
        _make_class_dir(tmp_path, name, 6, seed)
    write_jpeg(_random_image(99), str(tmp_path / "apple" / "extra.JPG"))  # upper-case extension counts
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    return tmp_path


# --------------------------------------------------------------------------- textures


def test_textures_classes_counts_and_dtype() -> None:
    data = load_source("textures")
    assert data.class_names == sorted(TEXTURE_PHOTOS) and len(data.class_names) == 10
    assert Counter(data.train.targets) == {i: sources.TEXTURE_TRAIN_PER_CLASS for i in range(10)}
    assert Counter(data.val.targets) == {i: sources.TEXTURE_VAL_PER_CLASS for i in range(10)}
    for sample in (data.train.samples[0], data.val.samples[-1]):
        assert sample.dtype == np.uint8 and sample.shape == (PATCH, PATCH, 3)
        image = read_image(sample)
        assert image.dtype == torch.uint8 and image.shape == (3, PATCH, PATCH)


@pytest.mark.parametrize("name", TEXTURE_PHOTOS)
def test_textures_train_val_regions_disjoint(name: str) -> None:
    photo = load_texture_photo(name)
    height = photo.shape[0]
    assert min(photo.shape[:2]) <= sources.TEXTURE_SHORT_SIDE
    train_yx, val_yx = photo_patch_coords(name)
    split = texture_split_row(height)
    assert np.all(train_yx[:, 0] + PATCH <= split)
    assert np.all(val_yx[:, 0] >= split) and np.all(val_yx[:, 0] + PATCH <= height)
    assert not _boxes_overlap(train_yx, val_yx)

    # The dataset patches are exactly the crops at these coordinates.
    data = load_source("textures")
    label = data.class_names.index(name)
    train = [s for s, t in zip(data.train.samples, data.train.targets, strict=True) if t == label]
    val = [s for s, t in zip(data.val.samples, data.val.targets, strict=True) if t == label]
    for patches, coords in ((train, train_yx), (val, val_yx)):
        for patch, (y, x) in zip(patches, coords, strict=True):
            np.testing.assert_array_equal(patch, photo[y : y + PATCH, x : x + PATCH])


@pytest.mark.parametrize(("height", "width", "seed"), [(300, 451, 0), (320, 320, 7), (256, 64, 3)])
def test_texture_patch_coords_stay_in_their_band(height: int, width: int, seed: int) -> None:
    train_yx, val_yx = texture_patch_coords(height, width, n_train=200, n_val=200, seed=seed)
    assert train_yx.shape == (200, 2) and val_yx.shape == (200, 2)
    assert np.all(train_yx >= 0) and np.all(val_yx[:, 1] + PATCH <= width)
    assert not _boxes_overlap(train_yx, val_yx)


def test_texture_patch_coords_rejects_small_photo() -> None:
    with pytest.raises(ValueError, match="too small"):
        texture_patch_coords(200, 300)


def test_textures_deterministic_and_seed_independent() -> None:
    first = load_source("textures")
    sources._build_textures.cache_clear()  # force a rebuild, as in a fresh process
    second = load_source("textures", val_split=0.5, seed=123)
    for a, b in ((first.train, second.train), (first.val, second.val)):
        assert a.targets == b.targets
        np.testing.assert_array_equal(np.stack(a.samples), np.stack(b.samples))


def test_textures_val_patches_differ_from_train() -> None:
    data = load_source("textures")
    train = {s.tobytes() for s in data.train.samples}
    assert not any(s.tobytes() in train for s in data.val.samples)


# --------------------------------------------------------------------------- digits


def test_digits_stratified_and_uint8() -> None:
    data = load_source("digits", val_split=0.2, seed=0)
    assert data.class_names == [str(d) for d in range(10)]
    total = Counter(data.train.targets) + Counter(data.val.targets)
    assert sum(total.values()) == 1797
    for label, n in total.items():
        assert Counter(data.val.targets)[label] == round(n * 0.2)
    sample = data.train.samples[0]
    assert sample.dtype == np.uint8 and sample.shape == (8, 8, 3)
    assert np.stack(data.train.samples).max() == 255


def test_digits_split_depends_on_seed() -> None:
    a, b, c = (load_source("digits", seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(np.stack(a.val.samples), np.stack(b.val.samples))
    assert a.val.targets == b.val.targets
    assert not np.array_equal(np.stack(a.val.samples), np.stack(c.val.samples))


# --------------------------------------------------------------------------- folder


def test_folder_stratified_split(flat_folder: Path) -> None:
    data = load_source(f"folder:{flat_folder}", val_split=0.34, seed=0)
    assert data.class_names == ["apple", "mango", "zebra"]
    assert Counter(data.val.targets) == {0: 2, 1: 2, 2: 2}  # apple has 7 images: round(2.38) = 2
    assert Counter(data.train.targets) == {0: 5, 1: 4, 2: 4}
    assert not set(data.train.samples) & set(data.val.samples)
    for path, target in zip(data.train.samples + data.val.samples, data.train.targets + data.val.targets, strict=True):
        assert Path(path).parent.name == data.class_names[target]
    assert all(p.lower().endswith((".png", ".jpg")) for p in data.train.samples + data.val.samples)


def test_folder_split_depends_on_seed(flat_folder: Path) -> None:
    spec = f"folder:{flat_folder}"
    a = load_source(spec, val_split=0.5, seed=0)
    assert load_source(spec, val_split=0.5, seed=0) == a
    assert load_source(spec, val_split=0.5, seed=1).val.samples != a.val.samples


def test_folder_presplit_layout(tmp_path: Path) -> None:
    for name in ("cat", "dog"):
        _make_class_dir(tmp_path / "train", name, 3)
    _make_class_dir(tmp_path / "val", "dog", 2)  # val may hold a subset of the classes
    data = load_source(f"folder:{tmp_path}")
    assert data.class_names == ["cat", "dog"] == list_class_names(f"folder:{tmp_path}")
    assert data.train.targets == [0, 0, 0, 1, 1, 1]
    assert data.val.targets == [1, 1]
    assert all("/val/dog/" in Path(p).as_posix() for p in data.val.samples)


@pytest.mark.parametrize(("train", "val"), [("train", "valid"), ("Training", "Validation"), ("train", "val")])
def test_folder_presplit_takes_the_split_names_tools_write(tmp_path: Path, train: str, val: str) -> None:
    # Roboflow's classification export (train/valid/test), Keras tutorials (training/validation, any case); the test
    # split is left for the user's evaluation.
    for split, n in ((train, 3), (val, 2), ("test", 4)):
        for name in ("cat", "dog"):
            _make_class_dir(tmp_path / split, name, n, seed=n)
    data = load_source(f"folder:{tmp_path}")
    assert data.class_names == ["cat", "dog"] == list_class_names(f"folder:{tmp_path}")
    assert len(data.train.samples) == 6 and len(data.val.samples) == 4
    assert all(f"/{val}/" in Path(p).as_posix() for p in data.val.samples)
    assert not any("/test/" in Path(p).as_posix() for p in data.train.samples + data.val.samples)


def test_folder_split_without_its_partner_names_the_fix(tmp_path: Path) -> None:
    for split in ("train", "test"):  # a Kaggle layout: no val/
        for name in ("cat", "dog"):
            _make_class_dir(tmp_path / split, name, 3)
    with pytest.raises(
        FileNotFoundError, match=rf"Found {tmp_path}/train but no validation folder.*'folder:{tmp_path}/train'"
    ):
        load_source(f"folder:{tmp_path}")
    (tmp_path / "valid").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match=r"2 val folders \(val, valid\); keep one"):
        load_source(f"folder:{tmp_path}")


def test_a_class_named_like_a_split_is_a_class(tmp_path: Path) -> None:
    # The vehicle: it holds the photos itself, so it is a class, not a train split without its val/.
    for name in ("bus", "car", "train"):
        _make_class_dir(tmp_path, name, 3)
    assert load_source(f"folder:{tmp_path}", val_split=0.34).class_names == ["bus", "car", "train"]


@pytest.mark.parametrize("splits", [("training_set", "test_set"), ("seg_train", "seg_test"), ("Train-Images", "dev")])
def test_split_folders_are_not_taken_for_classes(tmp_path: Path, splits: tuple[str, str]) -> None:
    # Kaggle's cats-and-dogs and Intel scenes layouts: pointed at the dataset's root, the splits would silently
    # become a two-class problem ("test_set" vs "training_set").
    for split in splits:
        for name in ("cat", "dog"):
            _make_class_dir(tmp_path / split, name, 3)
    with pytest.raises(ValueError, match=rf"look like a dataset's splits.*'folder:{tmp_path}/{splits[0]}'"):
        load_source(f"folder:{tmp_path}")
    with pytest.raises(ValueError, match="look like a dataset's splits"):
        list_class_names(f"folder:{tmp_path}")


def test_one_class_folder_holding_the_classes_names_the_folder_below(tmp_path: Path) -> None:
    for name in ("cat", "dog"):  # an archive unpacked into a folder of its own name
        _make_class_dir(tmp_path / "pets", name, 3)
    with pytest.raises(ValueError, match=rf"one level down: use 'folder:{tmp_path}/pets'"):
        load_source(f"folder:{tmp_path}")
    assert load_source(f"folder:{tmp_path}/pets").class_names == ["cat", "dog"]


def test_list_class_names_matches_load(flat_folder: Path) -> None:
    for spec in (f"folder:{flat_folder}", "digits", "textures"):
        assert list_class_names(spec) == load_source(spec).class_names


# --------------------------------------------------------------------------- errors


def test_error_missing_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_source(f"folder:{missing}")
    with pytest.raises(FileNotFoundError, match="nope"):
        list_class_names(f"folder:{missing}")


def test_folder_source_that_is_an_archive_or_a_file_says_so(tmp_path: Path) -> None:
    # The dataset as downloaded: "Image folder not found" for a file that is plainly there misled.
    archive = tmp_path / "photos.zip"
    archive.write_bytes(b"PK\x05\x06" + bytes(18))
    for spec in (archive, tmp_path / "photos"):  # the archive itself, or the folder it would unpack to
        with pytest.raises(FileNotFoundError, match=rf"{archive} is an archive, not a folder: unpack it \(python -m "
                           rf"zipfile -e {archive} <dir>\) and use 'folder:<dir>'"):  # fmt: skip
            load_source(f"folder:{spec}")
    (tmp_path / "shots.tar.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"shots.tar.gz is an archive.*tar xf"):
        load_source(f"folder:{tmp_path / 'shots.tar.gz'}")
    (tmp_path / "labels.csv").write_text("path,label\n")
    with pytest.raises(FileNotFoundError, match=r"labels.csv is a file, not a folder: it is a table, use 'csv:"):
        load_source(f"folder:{tmp_path / 'labels.csv'}")


def test_error_no_class_folders(tmp_path: Path) -> None:
    write_png(_random_image(0), str(tmp_path / "loose.png"))
    with pytest.raises(FileNotFoundError, match="No class sub-folders"):
        load_source(f"folder:{tmp_path}")


def test_error_empty_class(tmp_path: Path) -> None:
    _make_class_dir(tmp_path, "full", 5)
    (tmp_path / "hollow").mkdir()
    (tmp_path / "hollow" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="hollow.*no images"):
        load_source(f"folder:{tmp_path}")


def test_error_class_without_val_sample(tmp_path: Path) -> None:
    _make_class_dir(tmp_path, "big", 10)
    _make_class_dir(tmp_path, "tiny", 2)
    with pytest.raises(ValueError, match="'tiny'.*larger val_split"):
        load_source(f"folder:{tmp_path}", val_split=0.2)


def test_error_val_class_not_in_train(tmp_path: Path) -> None:
    _make_class_dir(tmp_path / "train", "cat", 2)
    _make_class_dir(tmp_path / "train", "dog", 2, seed=1)
    _make_class_dir(tmp_path / "val", "ghost", 2)
    with pytest.raises(ValueError, match="ghost"):
        load_source(f"folder:{tmp_path}")


def test_error_train_without_val(tmp_path: Path) -> None:
    _make_class_dir(tmp_path / "train", "cat", 2)
    with pytest.raises(FileNotFoundError, match="val"):
        load_source(f"folder:{tmp_path}")


@pytest.mark.parametrize("spec", ["imagenet", "csv:", "folder:", "digits:3"])
def test_error_bad_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="folder:<dir>|csv:<file>|takes no argument"):
        load_source(spec)


def test_error_unknown_spec_lists_forms() -> None:
    forms = "folder:<dir>, csv:<file>, torchvision:<Name>, textures, texture-pairs, digits"
    with pytest.raises(ValueError, match=forms):
        list_class_names("nope")


def test_a_spec_without_its_scheme_names_the_spec_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("cat", "dog"):
        _make_class_dir(tmp_path / "photos", name, 2, seed=len(name))
    (tmp_path / "labels.csv").write_text("path,label\n")
    for spec, fix in [("photos", "'folder:photos' .* or 'litdata:photos'"), ("labels.csv", "'csv:labels.csv'"),
                      ("cifar10", "'torchvision:CIFAR10'")]:  # fmt: skip
        with pytest.raises(ValueError, match=rf"Unknown source spec '{spec}': .*use {fix}"):
            load_source(spec)
    # The scheme's letter case does not matter.
    assert load_source("Folder:photos", val_split=0.5).class_names == ["cat", "dog"]


def test_error_bad_val_split() -> None:
    with pytest.raises(ValueError, match="val_split"):
        load_source("digits", val_split=1.0)


# --------------------------------------------------------------------------- read_image / ImageDataset


@pytest.mark.parametrize("ext", ["png", "jpg", "bmp", "tiff", "gif", "webp", "jp2"])
def test_read_image_files(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"x.{ext}"
    Image.fromarray(np.full((20, 30, 3), 128, dtype=np.uint8)).save(path)
    image = read_image(str(path))
    assert image.dtype == torch.uint8 and image.shape == (3, 20, 30)


def test_read_image_gray_and_16bit_files(tmp_path: Path) -> None:
    gray = tmp_path / "gray.png"
    write_png(torch.full((1, 10, 12), 77, dtype=torch.uint8), str(gray))
    image = read_image(gray)
    assert image.shape == (3, 10, 12) and torch.all(image == 77)

    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16)).save(deep)
    image = read_image(deep)
    assert image.dtype == torch.uint8 and torch.all(image == 255)


def test_read_image_float_tiff_is_scaled_from_0_to_1(tmp_path: Path) -> None:
    # A float TIFF (microscopy, remote sensing) holds 0..1; PIL's convert("RGB") clipped it to a black image.
    ramp = np.linspace(0.0, 1.0, 48 * 64, dtype=np.float32).reshape(48, 64)
    path = tmp_path / "float.tif"
    Image.fromarray(ramp, "F").save(path)
    image = read_image(path)
    assert image.shape == (3, 48, 64) and image.dtype == torch.uint8
    assert torch.equal(image[0], torch.from_numpy(np.rint(ramp.astype(np.float64) * 255).astype(np.uint8)))
    assert torch.equal(image[0], image[2])


@pytest.mark.parametrize(
    ("array", "mode", "shown"),
    [
        (np.full((4, 5), 255.0, dtype=np.float32), "F", r"float image \(PIL mode F\) with values in \[255, 255\]"),
        (np.full((4, 5), np.nan, dtype=np.float32), "F", r"float image \(PIL mode F\) with NaN or infinite values"),
        (np.full((4, 5), -1024, dtype=np.int32), "I", r"integer image \(PIL mode I\) with values in \[-1024"),
        (
            np.full((4, 5), 70000, dtype=np.int32),
            "I",
            r"integer image \(PIL mode I\) with values in \[70000, 70000\]: .* read as 0..65535",
        ),
    ],
)
def test_read_image_out_of_range_deep_images_are_named_not_clipped(
    tmp_path: Path, array: np.ndarray, mode: str, shown: str
) -> None:
    # No one right scale (CT numbers, a 32-bit count, floats in 0..255): clipping gave a flat image without a word.
    path = tmp_path / "deep.tif"
    Image.fromarray(array, mode).save(path)
    with pytest.raises(ValueError, match=rf"Could not decode image {path}: an? {shown}"):
        read_image(path)
    for name in ("a", "b"):  # in a source: listed as unreadable by the scan, the rest trains
        _make_class_dir(tmp_path / "src", name, 3)
    path.rename(tmp_path / "src" / "a" / path.name)
    data = load_source(f"folder:{tmp_path / 'src'}", val_split=0.34)
    assert [Path(p).name for p, _ in data.skipped] == ["deep.tif"]


@pytest.mark.parametrize(
    "sample",
    [
        np.full((6, 7), 9, dtype=np.uint8),
        np.full((6, 7, 1), 9, dtype=np.uint8),
        np.full((6, 7, 3), 9, dtype=np.uint8),
        torch.full((6, 7), 9, dtype=torch.uint8),
        torch.full((1, 6, 7), 9, dtype=torch.uint8),
    ],
)
def test_read_image_arrays(sample: np.ndarray | torch.Tensor) -> None:
    image = read_image(sample)
    assert image.dtype == torch.uint8 and image.shape == (3, 6, 7) and torch.all(image == 9)
    assert image.is_contiguous()


def test_read_image_hwc_order() -> None:
    hwc = np.zeros((2, 3, 3), dtype=np.uint8)
    hwc[..., 0] = 255  # pure red
    image = read_image(hwc)
    assert torch.all(image[0] == 255) and torch.all(image[1:] == 0)


def test_read_image_rejects_float_and_missing(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="uint8"):
        read_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(str(tmp_path / "missing.png"))


def test_image_dataset_applies_transform(flat_folder: Path) -> None:
    split = load_source(f"folder:{flat_folder}").train
    dataset = ImageDataset(split, transform=lambda x: x[:, :10, :20])
    image, target = dataset[0]
    assert len(dataset) == len(split)
    assert image.dtype == torch.uint8 and image.shape == (3, 10, 20)
    assert target == split.targets[0]
    assert torch.equal(image, read_image(split.samples[0])[:, :10, :20])


def test_image_dataset_batches_in_memory() -> None:
    split = Split(samples=[np.full((8, 8, 3), i, dtype=np.uint8) for i in range(4)], targets=[0, 1, 0, 1])
    images, targets = next(iter(torch.utils.data.DataLoader(ImageDataset(split), batch_size=4)))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 8, 8)
    assert targets.tolist() == [0, 1, 0, 1]


def test_split_length_mismatch() -> None:
    with pytest.raises(ValueError, match="targets"):
        Split(samples=["a.png"], targets=[])


# --------------------------------------------------------------------------- real-photo helpers


def _photo(seed: int, size: int = 48) -> np.ndarray:
    """A size x size RGB crop of a scikit-image photo (real image statistics), HWC uint8."""
    photo = load_texture_photo(TEXTURE_PHOTOS[seed % 3])
    rng = np.random.default_rng(seed)
    y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
    return np.ascontiguousarray(photo[y : y + size, x : x + size])


# --------------------------------------------------------------------------- csv:<file>


def test_csv_source_resolves_relative_paths_and_ignores_extra_columns(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    rows = ["Image,Label,notes"]
    for i in range(8):
        Image.fromarray(_photo(i)).save(tmp_path / "imgs" / f"{i}.png")
        rows.append(f"imgs/{i}.png,{['10', '2'][i % 2]},whatever")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    data = load_source(f"csv:{tmp_path / 'labels.csv'}", val_split=0.25, seed=0)
    assert data.class_names == ["2", "10"] == list_class_names(f"csv:{tmp_path / 'labels.csv'}")  # numeric order
    assert len(data.train) == 6 and Counter(data.val.targets) == {0: 1, 1: 1}
    for path, target in zip(data.train.samples, data.train.targets, strict=True):
        assert Path(path).is_absolute() and int(Path(path).stem) % 2 == 1 - target


def test_csv_source_split_column_and_missing_files(tmp_path: Path) -> None:
    rows = ["path,class,split"]
    for i in range(6):
        Image.fromarray(_photo(i)).save(tmp_path / f"{i}.jpg")
        rows.append(f"{i}.jpg,{'cat' if i < 3 else 'dog'},{'val' if i in (0, 3) else 'train'}")
    rows += ["gone.jpg,cat,train", "t.jpg,dog,test"]
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("\n".join(rows) + "\n")
    data = load_source(f"csv:{csv_file}")
    assert [Path(p).name for p in data.val.samples] == ["0.jpg", "3.jpg"]
    assert [Path(p).name for p in data.train.samples] == ["1.jpg", "2.jpg", "4.jpg", "5.jpg"]
    assert data.skipped == [(str(tmp_path / "gone.jpg"), "file not found")]  # listed, not a crash in a worker
    assert data.ignored == [str(tmp_path / "t.jpg")]  # test rows are not used for fit
    with pytest.raises(ValueError, match="gone.jpg: file not found"):
        load_source(f"csv:{csv_file}", on_bad_image="raise")


def test_csv_written_on_windows_reads_its_backslash_paths_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    rows = ["path,label"]
    for i in range(6):
        Image.fromarray(_photo(i)).save(tmp_path / "imgs" / "a" / f"{i}.png")
        rows.append(f"imgs\\a\\{i}.png,{'cat' if i % 2 else 'dog'}")
    (tmp_path / "labels.csv").write_text("\r\n".join(rows) + "\r\n")  # and Windows line ends
    with pytest.warns(UserWarning, match=r"6 path\(s\) use Windows separators \('imgs\\\\a\\\\0.png'\); read with '/' "
                      r"\('imgs/a/0.png'\)"):  # fmt: skip
        data = load_source(f"csv:{tmp_path / 'labels.csv'}", val_split=0.34)
    assert data.skipped == [] and len(data.train) + len(data.val) == 6
    assert all(Path(p).is_file() for p in data.train.samples)


def test_csv_rows_repeating_an_image_are_used_once(tmp_path: Path) -> None:
    # A CSV concatenated from two exports: kept, a random split put copies of an image in train and in val.
    rows = ["path,label"]
    for i in range(6):
        Image.fromarray(_photo(i)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'cat' if i % 2 else 'dog'}")
    rows += [f"./{i}.png,{'cat' if i % 2 else 'dog'}" for i in range(6)]  # the same files, spelled differently
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.warns(UserWarning, match=r"labels.csv: 6 row\(s\) repeat an earlier row's image and label \(line 8 "
                      r"repeats line 2\); each image is used once"):  # fmt: skip
        data = load_source(f"csv:{tmp_path / 'labels.csv'}", val_split=0.34)
    names = sorted(Path(p).name for p in [*data.train.samples, *data.val.samples])
    assert names == [f"{i}.png" for i in range(6)]


@pytest.mark.parametrize(
    ("second", "shown"),
    [
        ("0.png,dog,train", r"0.png is on line 2 and line 4, labelled 'cat' and 'dog'; .* a 'labels' column"),
        ("0.png,cat,val", r"0.png is on line 2 and line 4, in the splits 'train' and 'val'; .*validated on what"),
    ],
)
def test_csv_image_with_two_labels_or_splits_names_both_lines(tmp_path: Path, second: str, shown: str) -> None:
    # One row per (image, label), as a long-format export writes multi-label data, or an image in both splits.
    for i in range(2):
        Image.fromarray(_photo(i)).save(tmp_path / f"{i}.png")
    (tmp_path / "labels.csv").write_text(f"path,label,split\n0.png,cat,train\n1.png,dog,val\n{second}\n")
    with pytest.raises(ValueError, match=rf"labels.csv: .*{shown}"):
        load_source(f"csv:{tmp_path / 'labels.csv'}")
    with pytest.raises(ValueError, match=shown.split(";")[0]):
        list_class_names(f"csv:{tmp_path / 'labels.csv'}")


def test_csv_multilabel_repeats_compare_label_sets(tmp_path: Path) -> None:
    for i in range(4):
        Image.fromarray(_photo(i)).save(tmp_path / f"{i}.png")
    text = "path,labels\n0.png,cat;dog\n1.png,dog\n2.png,cat\n3.png,cat;dog\n0.png,dog;cat\n"
    (tmp_path / "labels.csv").write_text(text)
    with pytest.warns(UserWarning, match=r"1 row\(s\) repeat .* \(line 6 repeats line 2\)"):
        data = load_source(f"csv:{tmp_path / 'labels.csv'}", val_split=0.5)
    assert len(data.train) + len(data.val) == 4


def test_csv_names_a_file_in_the_other_unicode_form(tmp_path: Path) -> None:
    # Files unpacked from a Mac's zip carry decomposed names (NFD: "a" + combining diaeresis); a CSV typed on
    # Windows or Linux names them composed (NFC). Same name to a reader, other bytes: the files were "not found".
    decomposed = unicodedata.normalize("NFD", "Bär")
    (tmp_path / decomposed).mkdir()
    rows = ["path,label"]
    for i in range(4):
        Image.fromarray(_photo(i)).save(tmp_path / decomposed / f"{i}.png")
        rows.append(f"{unicodedata.normalize('NFC', 'Bär')}/{i}.png,{'cat' if i % 2 else 'dog'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    data = load_source(f"csv:{tmp_path / 'labels.csv'}", val_split=0.5)
    assert data.skipped == [] and len(data.train) + len(data.val) == 4
    assert all(Path(p).is_file() for p in [*data.train.samples, *data.val.samples])


def test_presplit_class_folders_match_in_either_unicode_form(tmp_path: Path) -> None:
    _make_class_dir(tmp_path / "train", unicodedata.normalize("NFD", "Bär"), 3)  # unpacked from a Mac's zip
    _make_class_dir(tmp_path / "train", "cat", 3)
    _make_class_dir(tmp_path / "val", unicodedata.normalize("NFC", "Bär"), 2)  # made here
    data = load_source(f"folder:{tmp_path}")
    assert data.val.targets == [0, 0] and data.class_names[0] == unicodedata.normalize("NFD", "Bär")


def test_csv_of_urls_says_so_and_file_urls_are_paths(tmp_path: Path) -> None:
    # Datasets published as a CSV of image URLs: read as relative paths they were "<csv folder>/https:/host/a.jpg:
    # file not found", then "class 'cat' has no readable training image".
    (tmp_path / "web.csv").write_text("path,label\nhttps://example.com/a.jpg,cat\nS3://bucket/b.jpg,dog\n")
    with pytest.raises(ValueError, match=r"web.csv, line 2: 'https://example.com/a.jpg' is a URL; .*download"):
        load_source(f"csv:{tmp_path / 'web.csv'}")
    rows = ["path,label"]
    for i in range(4):
        Image.fromarray(_photo(i)).save(tmp_path / f"photo {i}.png")
        rows.append(f"file://{tmp_path.as_posix().replace(' ', '%20')}/photo%20{i}.png,{'cat' if i % 2 else 'dog'}")
    (tmp_path / "local.csv").write_text("\n".join(rows) + "\n")
    data = load_source(f"csv:{tmp_path / 'local.csv'}", val_split=0.5)
    assert data.skipped == [] and sorted(Path(p).name for p in [*data.train.samples, *data.val.samples]) == [
        f"photo {i}.png" for i in range(4)
    ]


@pytest.mark.parametrize(
    ("header", "cell", "shown"),
    [
        ("label", "cat;dog", r"line 3: 'cat;dog' in the 'label' column holds several names; .* name it 'labels'"),
        ("labels", "Atelectasis|Effusion", r"line 3: 'Atelectasis\|Effusion' .* separated by '\|'; .* with ';'"),
    ],
)
def test_csv_label_combinations_are_not_taken_for_classes(tmp_path: Path, header: str, cell: str, shown: str) -> None:
    # Each combination would silently have been a class of its own ("cat;dog", "Atelectasis|Effusion").
    (tmp_path / "l.csv").write_text(f"path,{header}\na.png,cat\nb.png,{cell}\n")
    with pytest.raises(ValueError, match=rf"l.csv, {shown}"):
        load_source(f"csv:{tmp_path / 'l.csv'}")


def test_folders_of_macos_zips_and_nas_thumbnails_are_not_classes_or_images(tmp_path: Path) -> None:
    """Unzipped from a Mac: ``__MACOSX/<class>/._x.jpg`` (AppleDouble metadata, a ".jpg" that is not one) beside the
    classes; copied off a Synology NAS: ``<class>/@eaDir/x.jpg/SYNOFILE_THUMB_M.jpg``, real JPEGs of every photo."""
    for k, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(_photo(10 * k + i)).save(tmp_path / name / f"{i}.jpg")
            (tmp_path / name / f"._{i}.jpg").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
            thumbs = tmp_path / name / "@eaDir" / f"{i}.jpg"
            thumbs.mkdir(parents=True)
            Image.fromarray(_photo(10 * k + i, 16)).save(thumbs / "SYNOFILE_THUMB_S.jpg")
        (tmp_path / "__MACOSX" / name).mkdir(parents=True)
        (tmp_path / "__MACOSX" / name / "._0.jpg").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    (tmp_path / "._loose.jpg").write_bytes(b"\x00\x05\x16\x07")
    data = load_source(f"folder:{tmp_path}", val_split=0.34)
    assert data.class_names == ["cat", "dog"] == list_class_names(f"folder:{tmp_path}")
    listed = [*data.train.samples, *data.val.samples]
    assert sorted(Path(p).name for p in listed) == ["0.jpg", "0.jpg", "1.jpg", "1.jpg", "2.jpg", "2.jpg"]
    assert data.skipped == [] and data.ignored == []  # nothing of it is even worth a line in skipped_files.csv


@pytest.mark.parametrize("separator", [";", "\t"])
def test_csv_separated_by_semicolons_or_tabs_is_read_by_its_header(tmp_path: Path, separator: str) -> None:
    """Excel writes ';' where the decimal mark is a comma (with a BOM, as 'CSV UTF-8'); a .tsv uses tabs."""
    rows = [f"\ufeffpath{separator}label{separator}split"]
    for i in range(6):
        Image.fromarray(_photo(i)).save(tmp_path / f"{i}.png")
        label = '"cat, black"' if i % 2 else "Bär"  # a comma inside a quoted cell stays in the name
        rows.append(separator.join([f"{i}.png", label, "val" if i < 2 else "train"]))
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    data = load_source(f"csv:{tmp_path / 'labels.csv'}")
    assert data.class_names == ["Bär", "cat, black"]
    assert [Path(p).name for p in data.val.samples] == ["0.png", "1.png"] and data.val.targets == [0, 1]
    assert len(data.train) == 4 and data.skipped == []


def test_csv_in_a_windows_code_page_names_the_line_and_the_fix(tmp_path: Path) -> None:
    rows = ["path,label"] + [f"{i}.png,cat" for i in range(3000)] + ["x.png,Bär"]  # past the reader's first chunk
    (tmp_path / "labels.csv").write_bytes(("\n".join(rows) + "\n").encode("cp1252"))
    with pytest.raises(
        ValueError, match=r"labels.csv: line 3002: not UTF-8 text \(byte 0xe4\); save it as 'CSV UTF-8'"
    ):
        load_source(f"csv:{tmp_path / 'labels.csv'}")


@pytest.mark.parametrize("layout", ["folder", "csv"])
def test_classes_that_differ_only_in_case_or_spacing_are_named(tmp_path: Path, layout: str) -> None:
    """'Cat'/'cat' and 'golden_retriever'/'Golden Retriever' would train as four classes without a word."""
    labels = ["Cat", "cat", "golden_retriever", "Golden Retriever", "dog"]
    rows = ["path,label"]
    for k, label in enumerate(labels):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.fromarray(_photo(10 * k + i)).save(tmp_path / label / f"{i}.png")
            rows.append(f"{label}/{i}.png,{label}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    spec = f"folder:{tmp_path}" if layout == "folder" else f"csv:{tmp_path / 'labels.csv'}"
    with pytest.warns(UserWarning, match=r"classes 'Cat' and 'cat'; 'Golden Retriever' and 'golden_retriever' differ "
                      r"only in letter case.*trained as separate classes"):  # fmt: skip
        data = load_source(spec, val_split=0.5)
    assert len(data.class_names) == 5  # kept as they are: the data decides, the warning tells
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        (tmp_path / "labels.csv").write_text("\n".join(r for r in rows if "Cat/" not in r and "Golden" not in r))
        load_source(f"csv:{tmp_path / 'labels.csv'}", val_split=0.5)  # distinct names: no warning


def test_a_class_emptied_by_bad_files_names_one_and_why(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for i in range(2):
        Image.fromarray(_photo(i)).save(tmp_path / "b" / f"{i}.png")
    (tmp_path / "a" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"Class 'a' has no readable training image \(1 unreadable file\(s\) were "
                       r"skipped, e.g. .*a/x.png: empty file \(0 bytes\)\)"):  # fmt: skip
        load_source(f"folder:{tmp_path}")


def test_csv_source_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_source(f"csv:{tmp_path / 'nope.csv'}")
    (tmp_path / "a.csv").write_text("picture,y\nx.png,1\n")
    with pytest.raises(ValueError, match=r"no path column; its columns are \['picture', 'y'\]"):
        load_source(f"csv:{tmp_path / 'a.csv'}")


# --------------------------------------------------------------------------- torchvision:<Name>


def _write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's on-disk IDX format: magic (0, 0, 0x08 = ubyte, ndim), big-endian int32 dims, the raw bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_fashionmnist_from_local_files(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    labels = np.arange(40) % 10
    images = np.stack([_photo(i, 28)[..., 0] for i in range(40)])
    for prefix in ("train", "t10k"):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    data = load_source("torchvision:FashionMNIST", root=str(tmp_path), val_split=0.25)
    assert data.class_names[:2] == ["T-shirt/top", "Trouser"] and len(data.class_names) == 10
    assert len(data.train) == 30 and len(data.val) == 10 and sorted(data.val.targets) == list(range(10))
    index = next(i for i, s in enumerate(data.train.samples) if np.array_equal(s, images[0]))
    assert data.train.targets[index] == 0
    assert torch.equal(read_image(data.train.samples[index])[1], torch.from_numpy(images[0]))
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_source("torchvision:FashionMNIST", root=str(tmp_path / "empty"))
    lower = load_source("torchvision:fashionmnist", root=str(tmp_path), val_split=0.25)  # the class, letter case aside
    assert lower.class_names == data.class_names and lower.train.targets == data.train.targets


def test_torchvision_oxford_pets_files_and_fakedata_items(tmp_path: Path) -> None:
    base = tmp_path / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    lines = []
    for i in range(8):
        name = f"{['Abyssinian', 'great_pyrenees'][i % 2]}_{i}"
        Image.fromarray(_photo(i)).save(base / "images" / f"{name}.jpg")
        lines.append(f"{name} {i % 2 + 1} {i % 2 + 1} 1")
    (base / "annotations" / "trainval.txt").write_text("\n".join(lines) + "\n")
    data = load_source("torchvision:OxfordIIITPet", root=str(tmp_path), val_split=0.25)
    assert data.class_names == ["Abyssinian", "Great Pyrenees"]
    assert len(data.train) == 6 and all(Path(p).parent.name == "images" for p in data.train.samples)
    assert read_image(data.val.samples[0]).shape == (3, 48, 48)
    with pytest.raises(ValueError, match="torchvision has no dataset 'Nope'"):
        load_source("torchvision:Nope")


def test_torchvision_generic_dataset_items() -> None:
    from torchvision.datasets import FakeData

    from tlkit.data._tvsource import DatasetItem, _to_split

    dataset = FakeData(size=4, image_size=(3, 12, 10), num_classes=3)  # no arrays, no file list: indexed items
    split = _to_split(dataset)
    assert all(isinstance(s, DatasetItem) for s in split.samples)
    assert split.targets == [int(dataset[i][1]) for i in range(4)]
    assert torch.equal(read_image(split.samples[2]), pil_to_tensor(dataset[2][0]))


# --------------------------------------------------------------------------- bad files and odd modes


def _odd_mode_files(folder: Path) -> dict[str, np.ndarray]:
    """Write one image per odd mode; returns file name -> the 8-bit RGB it should decode to."""
    rgb = _photo(7)
    gray = rgb[..., 0]
    files = {
        "gray.png": (Image.fromarray(gray), np.repeat(gray[..., None], 3, -1)),
        # Alpha over white, as a viewer shows it: 200/255 of the photo, 55/255 of white.
        "rgba.png": (Image.fromarray(np.dstack([rgb, np.full_like(gray, 200)])), rgb * (200 / 255) + 55),
        # Black line art on transparent black: all black if alpha is dropped (PIL's convert("RGB")).
        "lineart.png": (
            Image.fromarray(np.dstack([np.zeros_like(rgb), np.where(gray > 128, 255, 0)]).astype(np.uint8)),
            np.repeat(np.where(gray > 128, 0, 255)[..., None], 3, -1),
        ),
        "gray_alpha.png": (
            Image.fromarray(np.dstack([gray, np.where(gray > 128, 255, 0)]).astype(np.uint8), "LA"),
            np.repeat(np.where(gray > 128, gray, 255)[..., None], 3, -1),
        ),
        "palette.png": (Image.fromarray(rgb).convert("P"), None),
        "cmyk.jpg": (Image.fromarray(rgb).convert("CMYK"), rgb),
        "gray16.png": (Image.fromarray(gray.astype(np.uint16) * 257), np.repeat(gray[..., None], 3, -1)),
        "gray16.tif": (Image.fromarray(gray.astype(np.uint16) * 257), np.repeat(gray[..., None], 3, -1)),
    }
    expected = {}
    for name, (image, want) in files.items():
        image.save(folder / name, **({"quality": 98} if name.endswith(".jpg") else {}))
        expected[name] = want if want is not None else np.asarray(image.convert("RGB"))
    return expected


def _bad_files(folder: Path) -> list[str]:
    """Corrupt, truncated, zero-byte and not-an-image files with image extensions; returns their names."""
    good = folder / "source.jpg"
    Image.fromarray(_photo(3)).save(good, quality=90)
    data = good.read_bytes()
    good.unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpeg").write_text("this is not an image")
    return ["corrupt.png", "empty.jpg", "text.jpeg", "truncated.jpg"]


def test_odd_modes_are_converted_to_rgb(tmp_path: Path) -> None:
    for name, want in _odd_mode_files(tmp_path).items():
        image = read_image(str(tmp_path / name))
        assert image.dtype == torch.uint8 and image.shape == (3, 48, 48), name
        error = (image.permute(1, 2, 0).float() - torch.tensor(want).float()).abs().mean()
        assert error < 3.0, f"{name}: mean abs error {error:.1f}"  # jpeg: small loss; others exact


def test_transparency_is_shown_over_white_for_files_and_arrays_alike(tmp_path: Path) -> None:
    alpha = np.tile(np.linspace(0, 255, 48).round().astype(np.uint8), (48, 1))  # transparent left, opaque right
    rgba = np.dstack([_photo(3), alpha])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    Image.fromarray(rgba).save(tmp_path / "a.webp", lossless=True)
    from_file = read_image(str(tmp_path / "a.png"))
    assert torch.equal(read_image(str(tmp_path / "a.webp")), from_file)
    assert torch.equal(read_image(rgba), from_file)  # an array in memory as the same image in a file
    assert torch.equal(read_image(torch.from_numpy(rgba).permute(2, 0, 1)), from_file)
    assert (from_file[:, :, 0] == 255).all()  # alpha 0: white
    assert torch.equal(from_file[:, :, -1], torch.from_numpy(rgba[:, -1, :3]).T)  # opaque: the photo itself
    # A GIF's transparent palette entry: white, not the colour the palette stores for it (black here).
    gif = Image.new("P", (48, 48), 0)
    gif.putpalette([0, 0, 0, 255, 0, 0])
    gif.paste(1, (0, 0, 24, 48))  # left half red, right half the transparent entry
    gif.save(tmp_path / "t.gif", transparency=0)
    decoded = read_image(str(tmp_path / "t.gif"))
    assert decoded[:, 0, 0].tolist() == [255, 0, 0] and decoded[:, 0, -1].tolist() == [255, 255, 255]
    item = DatasetItem([(Image.fromarray(rgba), 0)], 0)  # a torchvision dataset's item that is an RGBA image
    assert torch.equal(read_image(item), from_file)


def test_bad_files_are_skipped_with_reasons_or_raise(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(4):
            Image.fromarray(_photo(i + 10 * len(name))).save(tmp_path / name / f"{i}.png")
    bad = _bad_files(tmp_path / "a")
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    data = load_source(f"folder:{tmp_path}", val_split=0.25)
    assert sorted(Path(p).name for p, _ in data.skipped) == bad
    reasons = dict((Path(p).name, r) for p, r in data.skipped)
    assert reasons["empty.jpg"] == "empty file (0 bytes)" and all(reasons.values())
    assert data.ignored == [str(tmp_path / "b" / "notes.txt")]
    assert len(data.train) + len(data.val) == 8 and not {Path(p).name for p in data.train.samples} & set(bad)
    with pytest.raises(ValueError, match=r"Unreadable image .*a/corrupt.png: .*\(and 3 more"):
        load_source(f"folder:{tmp_path}", on_bad_image="raise")


def test_class_left_empty_by_bad_files_is_a_clear_error(tmp_path: Path) -> None:
    _make_class_dir(tmp_path, "good", 4)
    (tmp_path / "broken").mkdir()
    _bad_files(tmp_path / "broken")
    with pytest.raises(ValueError, match="Class 'broken' has no readable training image .4 unreadable"):
        load_source(f"folder:{tmp_path}")


def test_scan_images_reports_every_bad_file_in_order(tmp_path: Path) -> None:
    bad = _bad_files(tmp_path)
    _make_class_dir(tmp_path, "ok", 3)
    paths = sorted(str(p) for p in tmp_path.rglob("*.*"))
    assert [Path(p).name for p, _ in sources.scan_images(paths, workers=2)] == sorted(bad)


# --------------------------------------------------------------------------- damaged files, orientation, limits


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a child Python, so that a decoder that aborts (a signal) fails the test instead of pytest."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def _png_with_bad_idat_crc(path: Path) -> None:
    """A PNG whose IDAT data changed after its CRC was computed: libpng (torchvision.io) aborts on it."""
    Image.fromarray(_photo(5)).save(path)
    data = bytearray(path.read_bytes())
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF
    path.write_bytes(bytes(data))


def test_png_with_bad_idat_crc_is_listed_with_its_reason_not_a_crash(tmp_path: Path) -> None:
    for name in ("a", "b"):
        _make_class_dir(tmp_path, name, 3, seed=len(name) + ord(name))
    _png_with_bad_idat_crc(tmp_path / "a" / "bad_crc.png")
    code = f"from tlkit.data.sources import load_source; print(load_source('folder:{tmp_path}').skipped)"
    done = _run_isolated(code)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-500:]}"
    assert "bad_crc.png" in done.stdout and "crc" in done.stdout.lower()


def test_fuzzed_sample_is_listed_or_decoded_without_a_crash(tmp_path: Path) -> None:
    """63 files of the fuzz benchmark (every format x mutation) through the scan, in a child process."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    try:
        import fuzz_images
    finally:
        sys.path.pop(0)
    pairs = fuzz_images.make_files(tmp_path, len(fuzz_images.FORMATS) * len(fuzz_images.MUTATIONS), seed=3)
    code = (
        "import sys; from tlkit.data.sources import load_source, scan_images\n"
        f"data = load_source('folder:{tmp_path / 'fuzz'}', val_split=0.5)\n"
        "print(len(data.train) + len(data.val), len(data.skipped), all(r for _, r in data.skipped))"
    )
    done = _run_isolated(code)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-500:]}"
    kept, listed, all_have_reasons = done.stdout.split()
    assert int(kept) + int(listed) == len(pairs) and int(listed) >= 20 and all_have_reasons == "True"


def _oriented_jpeg(path: Path, orientation: int = 6) -> torch.Tensor:
    """A 48x32 (w x h) JPEG stored sideways with an EXIF orientation tag; returns the upright image PIL sees."""
    stored = np.zeros((32, 48, 3), dtype=np.uint8)
    stored[:16, :24] = (255, 0, 0)  # one coloured corner, so a rotation or a flip shows
    stored[16:, 24:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    with Image.open(path) as img:
        return pil_to_tensor(ImageOps.exif_transpose(img).convert("RGB"))


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp"])
def test_exif_orientation_is_applied(tmp_path: Path, fmt: str) -> None:
    upright = _oriented_jpeg(tmp_path / "phone.jpg")
    path = tmp_path / f"phone.{fmt}"
    if fmt != "jpg":  # PNG eXIf chunk, WebP EXIF chunk: the same pixels and tag
        with Image.open(tmp_path / "phone.jpg") as img:
            img.save(path, exif=img.getexif(), **({"lossless": True} if fmt == "webp" else {}))
    image = read_image(str(path))
    assert image.shape == (3, 48, 32) == upright.shape  # sideways would be (3, 32, 48)
    assert (image.float() - upright.float()).abs().mean() < 2.0


@pytest.mark.parametrize("fmt", ["heic", "avif"])
def test_phone_formats_decode_upright(tmp_path: Path, fmt: str) -> None:
    """HEIC (iPhones; libheif through pillow-heif) and AVIF (PIL), stored sideways with orientation 6: upright, once
    (libheif rotates while decoding and reports orientation 1, so nothing turns it a second time)."""
    upright = _oriented_jpeg(tmp_path / "phone.jpg")
    stored = Image.fromarray(upright.rot90(1, dims=(1, 2)).permute(1, 2, 0).numpy())  # as the sensor wrote it
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / f"phone.{fmt}", quality=-1 if fmt == "heic" else 100, exif=exif.tobytes())
    image = read_image(str(tmp_path / f"phone.{fmt}"))
    assert image.shape == upright.shape == (3, 48, 32)
    assert (image.float() - upright.float()).abs().mean() < 4.0  # AVIF is lossy here: 2.4 levels
    assert (image.float().flip(1, 2) - upright.float()).abs().mean() > 60  # turned twice would look like this


def test_every_photo_extension_is_listed_and_loaded_and_a_damaged_heic_is_skipped(tmp_path: Path) -> None:
    """What photos come as besides .jpg/.png: .jfif/.jpe (saved from a browser), .heic/.heif (iPhone), .avif,
    .ppm/.pgm (torchvision's ImageFolder reads them): none is ignored as "not an image"."""
    formats = {"jfif": "JPEG", "jpe": "JPEG", "heic": "HEIF", "heif": "HEIF", "avif": "AVIF", "ppm": "PPM",
               "pgm": "PPM", "JPG": "JPEG"}  # fmt: skip
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i, (ext, kind) in enumerate(formats.items()):
            image = Image.fromarray(_photo(i + 20 * len(label)))
            (image.convert("L") if ext == "pgm" else image).save(tmp_path / label / f"{i}.{ext}", kind)
    whole = (tmp_path / "a" / "2.heic").read_bytes()
    (tmp_path / "a" / "cut.heic").write_bytes(whole[: len(whole) // 2])
    data = load_source(f"folder:{tmp_path}", val_split=0.25)
    assert data.ignored == []
    assert [Path(p).name for p, _ in data.skipped] == ["cut.heic"] and data.skipped[0][1]
    assert len(data.train) + len(data.val) == 2 * len(formats)
    for path in data.train.samples:
        assert read_image(path).shape == (3, 48, 48), path


def test_orientation_is_upright_in_val_loader_predict_and_extract_features(tmp_path: Path) -> None:
    from tlkit import ImageDataModule, create_backbone, extract_features

    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(2):
            _oriented_jpeg(tmp_path / "data" / name / f"{i}.jpg")
    (tmp_path / "upright").mkdir()
    (tmp_path / "rotated").mkdir()
    upright = _oriented_jpeg(tmp_path / "rotated" / "r.jpg")
    Image.fromarray(upright.permute(1, 2, 0).numpy()).save(tmp_path / "upright" / "u.png")

    def data_module(predict: str) -> ImageDataModule:
        spec = f"folder:{tmp_path / 'data'}"
        return ImageDataModule(spec, image_size=32, crop_pct=1.0, batch_size=4, val_split=0.5, predict_source=predict)

    dm = data_module(str(tmp_path / "rotated"))
    # Evaluation view of the upright image: resize to 32 on the short side, then centre-crop 32x32.
    expected = dm.transform(train=False)(upright).float()
    for loader in (dm.val_dataloader(), dm.predict_dataloader()):
        images, _ = next(iter(loader))
        assert (images[0].float() - expected).abs().mean() < 3.0
    sideways = dm.transform(train=False)(upright.rot90(1, dims=(1, 2))).float()
    assert (sideways - expected).abs().mean() > 30  # the check above can tell sideways from upright
    backbone = create_backbone("test_resnet", pretrained=False)  # one set of random weights for both
    rotated, straight = (
        extract_features(backbone, data_module(str(tmp_path / d)), split="predict").features
        for d in ("rotated", "upright")
    )
    torch.testing.assert_close(rotated, straight, atol=0.05, rtol=0.05)


def _png_declaring(path: Path, width: int, height: int) -> None:
    """A small PNG whose header declares ``width`` x ``height`` (CRC fixed): a decompression bomb's header."""
    Image.fromarray(_photo(1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def test_pixel_limit_names_the_file_and_the_setting(tmp_path: Path) -> None:
    _png_declaring(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(sources.ImageTooLargeError, match=r"bomb.png .*400,?000,?000 pixels.*raise max_image_pixels"):
        read_image(str(tmp_path / "bomb.png"))
    for name in ("a", "b"):
        _make_class_dir(tmp_path / "data", name, 3, seed=ord(name))  # 40x40 = 1,600 pixels each
    spec = f"folder:{tmp_path / 'data'}"
    with pytest.raises(ValueError, match=r"Unreadable image \S+/a/img0.png: .*1,600 pixels, over the limit of 1,000"):
        load_source(spec, on_bad_image="raise", max_image_pixels=1000)
    assert len(load_source(spec, max_image_pixels=1600).skipped) == 0
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "data" / "b" / "wide.png")  # 2,400 pixels
    data = load_source(spec, max_image_pixels=2000)
    assert [(Path(p).name, "max_image_pixels" in r) for p, r in data.skipped] == [("wide.png", True)]


def test_pixel_limit_above_pils_own_is_honoured(tmp_path: Path) -> None:
    """PIL refuses > 2 * Image.MAX_IMAGE_PIXELS on open; a higher max_image_pixels must still open the file."""
    _png_declaring(tmp_path / "big.png", 20000, 20000)
    with pytest.raises(ValueError, match="Could not decode image"):  # past the limit: the (short) data is the error
        read_image(str(tmp_path / "big.png"), max_pixels=400_000_000)


def test_dangling_symlink_and_loose_root_image_are_listed_in_skipped_files(tmp_path: Path) -> None:
    from conftest import tiny_trainer

    from tlkit import ImageDataModule

    root = tmp_path / "data"
    for name in ("a", "b"):
        _make_class_dir(root, name, 4, seed=ord(name))
    (root / "a" / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    Image.fromarray(_photo(2)).save(root / "loose.png")
    dm = ImageDataModule(f"folder:{root}", image_size=16, val_split=0.25)
    dm.trainer = tiny_trainer(tmp_path / "run")
    with pytest.warns(
        UserWarning, match="loose.png .outside any class folder.*gone.jpg .dangling symlink to .*deleted.jpg"
    ):
        dm.setup("fit")
    with open(tmp_path / "run" / "skipped_files.csv") as f:
        rows = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(f)}
    assert rows["gone.jpg"].startswith("dangling symlink") and rows["loose.png"].startswith("outside any class")


def test_one_class_folder_is_an_error_naming_the_folder(tmp_path: Path) -> None:
    _make_class_dir(tmp_path, "only", 4)
    with pytest.raises(ValueError, match=rf"{tmp_path} has only one class folder \('only'\).* at least 2 classes"):
        load_source(f"folder:{tmp_path}")
    with pytest.raises(ValueError, match="at least 2 classes"):
        list_class_names(f"folder:{tmp_path}")


def test_file_damaged_after_the_scan_is_replaced_and_reported(tmp_path: Path) -> None:
    from conftest import tiny_trainer

    from tlkit import ImageDataModule

    for name in ("a", "b"):
        _make_class_dir(tmp_path / "data", name, 4, seed=ord(name))
    dm = ImageDataModule(f"folder:{tmp_path / 'data'}", image_size=40, crop_pct=1.0, batch_size=8, val_split=0.5)
    dm.trainer = tiny_trainer(tmp_path / "run")
    val = dm.data.val.samples
    Path(val[1]).write_bytes(Path(val[1]).read_bytes()[:100])  # damaged (truncated) after the scan
    with pytest.warns(UserWarning, match=rf"Skipped {val[1]} in the loader, replaced by {val[2]}"):
        images, targets = next(iter(dm.val_dataloader()))
    assert torch.equal(images[1], images[2]) and targets[1] == targets[2]  # the next readable sample, every run
    assert torch.equal(images[0], read_image(val[0]))
    with open(tmp_path / "run" / "skipped_files.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [val[1]] and "changed after the scan" in rows[0]["reason"]
    Path(val[3]).unlink()  # removed after the scan: also replaced (by the first sample, wrapping around)
    with pytest.warns(UserWarning, match=rf"Skipped {val[3]}"):
        images, _ = next(iter(dm.val_dataloader()))
    assert torch.equal(images[3], images[0])
    strict = ImageDataModule(f"folder:{tmp_path / 'data'}", image_size=40, on_bad_image="raise", val_split=0.5)
    strict._data = dm.data  # the same scan result
    with pytest.raises(ValueError, match=f"Could not decode image {val[1]}: .*truncated"):
        next(iter(strict.val_dataloader()))


def _append_rows(csv_path: str, worker: int, start) -> None:
    start.wait()  # all at once: the first appends race to create the file
    for row in range(20):
        sources.append_skipped(csv_path, [(f"w{worker}/{row}.png", "changed after the scan")])


def test_skipped_list_appended_by_concurrent_workers_keeps_its_header_first(tmp_path: Path) -> None:
    context = torch.multiprocessing.get_context("fork")
    for attempt in range(6):  # the race is rare: try it a few times
        path = str(tmp_path / f"run{attempt}" / "skipped_files.csv")
        (tmp_path / f"run{attempt}").mkdir()
        start = context.Barrier(8)
        workers = [context.Process(target=_append_rows, args=(path, w, start)) for w in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        with open(path) as f:
            rows = list(csv.DictReader(f))
        expected = {f"w{w}/{r}.png" for w in range(8) for r in range(20)}
        assert len(rows) == 160 and {r["path"] for r in rows} == expected, f"attempt {attempt}"


def test_file_names_that_are_not_utf8_are_listed_as_the_bytes_they_are(tmp_path: Path) -> None:
    # Latin-1 names from an old Windows zip: Python holds them as surrogates, and writing skipped_files.csv raised
    # "surrogates not allowed" and ended the run. Written back as their bytes, the listed path opens the file.
    from conftest import tiny_trainer

    from tlkit import ImageDataModule

    root = tmp_path / "data"
    for name in ("a", "b"):
        _make_class_dir(root, name, 4, seed=ord(name))
    for i in range(2):
        Image.fromarray(_photo(i)).save(os.fsdecode(os.fsencode(root / "a") + b"/caf\xe9%d.png" % i))
    broken = os.fsdecode(os.fsencode(root / "b") + b"/d\xe9fect.png")
    Path(broken).write_bytes(b"not a png")
    dm = ImageDataModule(f"folder:{root}", image_size=16, val_split=0.25)
    dm.trainer = tiny_trainer(tmp_path / "run")
    with pytest.warns(UserWarning, match="unreadable"):
        dm.setup("fit")
    assert len(dm.data.train) + len(dm.data.val) == 10
    with open(tmp_path / "run" / "skipped_files.csv", encoding="utf-8", errors="surrogateescape") as f:
        assert [r["path"] for r in csv.DictReader(f)] == [broken] and Path(broken).exists()


def test_class_folder_name_that_is_not_utf8_is_refused_naming_its_bytes(tmp_path: Path) -> None:
    # As a class name it went into checkpoints, YAML and the confusion-matrix plot, which failed after an epoch.
    _make_class_dir(tmp_path, "cat", 2)
    latin = tmp_path / os.fsdecode(b"d\xe9j\xe0")
    latin.mkdir()
    for i in range(2):
        Image.fromarray(_photo(i)).save(latin / f"{i}.png")
    with pytest.raises(ValueError, match=r"Class folder name\(s\) \[b'd\\xe9j\\xe0'\] .* not UTF-8 text.*convmv"):
        load_source(f"folder:{tmp_path}")


def test_a_symlink_back_up_the_tree_is_listed_not_followed(tmp_path: Path) -> None:
    # cat/all -> .. listed the dog photos as cats, and every photo again at each level, until the OS refused
    # ("Too many levels of symbolic links": an OSError out of load_source).
    for name in ("cat", "dog"):
        _make_class_dir(tmp_path / "data", name, 3, seed=ord(name[0]))
    (tmp_path / "data" / "cat" / "all").symlink_to("..")
    (tmp_path / "data" / "dog" / "deeper").mkdir()
    (tmp_path / "data" / "dog" / "deeper" / "home").symlink_to(tmp_path)
    (tmp_path / "data" / "dog" / "more").symlink_to(tmp_path / "data" / "dog" / "deeper")  # not a loop: followed
    data = load_source(f"folder:{tmp_path / 'data'}", val_split=0.34)
    listed = [*data.train.samples, *data.val.samples]
    assert len(listed) == 6 and sorted(data.ignored) == sorted(
        [str(tmp_path / "data" / "cat" / "all"), str(tmp_path / "data" / "dog" / "deeper" / "home"),
         str(tmp_path / "data" / "dog" / "more" / "home")]
    )  # fmt: skip
    assert all("/all/" not in p for p in listed)


@pytest.mark.parametrize("header", ["Image Path,Class Name", "file_name,category_name", "img-path,Label"])
def test_csv_columns_as_exports_name_them(tmp_path: Path, header: str) -> None:
    # Were "no path column; its columns are ['Image Path', 'Class Name']".
    rows = [f"{header},notes"]
    for i in range(4):
        Image.fromarray(_photo(i)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'cat' if i % 2 else 'dog'},x")
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    data = load_source(f"csv:{tmp_path / 'l.csv'}", val_split=0.5)
    assert data.class_names == ["cat", "dog"] and len(data.train) + len(data.val) == 4


def test_csv_of_absolute_paths_from_another_machine_names_the_prefix_to_replace(tmp_path: Path) -> None:
    # Every image was "file not found", then "class 'cat' has no readable training image".
    rows = ["path,label"]
    for i in range(4):
        (tmp_path / "cat").mkdir(exist_ok=True)
        Image.fromarray(_photo(i)).save(tmp_path / "cat" / f"{i}.png")
        rows.append(f"/home/alice/data/cat/{i}.png,{'cat' if i % 2 else 'dog'}")
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    shown = r"none of the first 4 exists here \(e.g. /home/alice/data/cat/0.png\).*replace '/home/alice/data' with"
    with pytest.raises(FileNotFoundError, match=rf"l.csv: its paths are absolute and {shown} '{tmp_path}'"):
        load_source(f"csv:{tmp_path / 'l.csv'}")
    (tmp_path / "l.csv").write_text("\n".join(r.replace("/home/alice/data/", "") for r in rows) + "\n")
    assert len(load_source(f"csv:{tmp_path / 'l.csv'}", val_split=0.5).skipped) == 0


def test_a_file_unreadable_at_load_is_listed_once_whatever_worker_or_epoch_meets_it(tmp_path: Path) -> None:
    """The train loader starts new workers every epoch, and two workers meet the same file (one at its own index, one
    looking for a substitute): the file was appended to skipped_files.csv by each, 3 times in 3 epochs. The warning
    named the next file as the replacement even when that one could not be read either."""
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(_random_image(i).permute(1, 2, 0).numpy()).save(paths[-1])
    for gone in paths[:2]:
        Path(gone).unlink()  # removed after the scan
    split, log = Split(samples=paths, targets=[0, 1, 0, 1]), tmp_path / "run" / "skipped_files.csv"
    with pytest.warns(UserWarning) as warned:
        first = ImageDataset(split, skipped_log=log)  # a worker of epoch 1
        image, target = first[0]
        assert target == 0 and torch.equal(image, read_image(paths[2]))
    assert [str(w.message).split(" in the loader")[0] for w in warned] == [f"Skipped {paths[0]}", f"Skipped {paths[1]}"]
    assert all(f"replaced by {paths[2]}" in str(w.message) for w in warned)  # the one readable file, not paths[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already listed: no warning again
        for _epoch in range(3):
            worker = ImageDataset(split, skipped_log=log)  # another worker, another epoch
            assert [worker[i][1] for i in (1, 0, 1)] == [0, 0, 0]
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["path"] for row in rows] == paths[:2]
