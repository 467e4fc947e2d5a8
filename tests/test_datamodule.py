"""Tests for tlkit.data.datamodule.ImageDataModule with real tiny Trainers: whitening end to end (fit, checkpoint,
DDP), the frozen-backbone warning, transforms and their config, bad images, class imbalance."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import sys
import warnings
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from conftest import tiny_trainer, write_image_folder
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms import InterpolationMode

import tlkit.module
from tlkit import ImageDataModule, TransferClassifier, create_backbone
from tlkit.backbones import backbone_data_config
from tlkit.cli import main
from tlkit.data.preprocess import Normalize, Whitening
from tlkit.data.sources import TEXTURE_PHOTOS, load_texture_photo, read_image

pytestmark = [
    pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*(is smaller than the logging interval|GPU available):UserWarning"),
]
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


@pytest.fixture(scope="module", autouse=True)
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _photo(seed: int, size: int) -> np.ndarray:
    """A size x size crop of a scikit-image photo, one photo per class (``seed // 100``)."""
    photo = load_texture_photo(TEXTURE_PHOTOS[seed // 100])
    rng = np.random.default_rng(seed)
    y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
    return np.ascontiguousarray(photo[y : y + size, x : x + size])


def _make_folder(root: Path, counts: dict[str, int], size: int = 24) -> Path:
    for label, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(_photo(label * 100 + i, size)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_folder(tmp_path_factory.mktemp("photos"), {"astronaut": 12, "brick": 12, "chelsea": 12})


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return tiny_trainer(tmp_path, limit_train_batches=2, limit_val_batches=1, **kwargs)


def _zca_dm(folder: Path) -> ImageDataModule:
    return ImageDataModule(
        source=f"folder:{folder}",
        image_size=8,
        batch_size=8,
        val_split=0.25,
        preprocess="zca",
        whiten_scope="image",
        whiten_eps=1e-3,
        augment="none",
    )


# ------------------------------------------------------------------------------------------- whitening end to end


def test_image_zca_fits_on_train_split_trains_and_restores_without_refit(
    photo_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dm = _zca_dm(photo_folder)
    model = TransferClassifier("test_resnet", num_classes=3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, callbacks=[checkpoint], enable_checkpointing=True).fit(model, dm)

    # Fitted on the train split only, on the evaluation view of the images (no augmentation).
    assert isinstance(dm.preprocess, Whitening) and dm.preprocess.scope == "image" and dm.preprocess.is_fitted
    eval_view = dm.transform(train=False)
    train = torch.stack([eval_view(read_image(p)) for p in dm.data.train.samples])
    direct = Whitening("zca", scope="image", image_size=8, eps=1e-3).fit([train])
    torch.testing.assert_close(dm.preprocess.matrix, direct.matrix, rtol=1e-4, atol=1e-4)
    whitened, _ = dm.on_after_batch_transfer((train, torch.zeros(len(train))), 0)
    torch.testing.assert_close(whitened, direct(train.float() / 255), rtol=1e-4, atol=1e-4)
    assert whitened.flatten(1).mean(0).abs().max() < 1e-4  # train data centred by the fitted mean

    saved = torch.load(checkpoint.last_model_path, weights_only=False)  # our own file, written just above
    torch.testing.assert_close(saved["ImageDataModule"]["preprocess"]["matrix"], dm.preprocess.matrix)

    # A resumed run restores the statistics from the checkpoint: fitting again would fail loudly here.
    def no_refit(self, batches):  # noqa: ANN001, ANN202
        raise AssertionError("the whitening was refitted although the checkpoint holds it")

    monkeypatch.setattr(Whitening, "fit", no_refit)
    dm2, model2 = _zca_dm(photo_folder), TransferClassifier("test_resnet", num_classes=3)
    _trainer(tmp_path, max_epochs=2).fit(model2, dm2, ckpt_path=checkpoint.last_model_path)
    assert torch.equal(dm2.preprocess.matrix, dm.preprocess.matrix) and torch.equal(
        dm2.preprocess.mean, dm.preprocess.mean
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_dm(folder: str) -> ImageDataModule:
    return ImageDataModule(source=f"folder:{folder}", image_size=8, preprocess="zca", whiten_scope="image")


def _ddp_worker(rank: int, world_size: int, port: int, data: str, folder: str) -> None:
    """Each rank fits through the data module (its own shard of the train split, sums all-reduced) and saves."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        dm = _ddp_dm(data)
        dm.setup("fit")
        dm.train_dataloader()
        torch.save(dm.state_dict(), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_fit_identical_statistics_through_the_datamodule(photo_folder: Path, tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(photo_folder), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt")["preprocess"] for r in range(2))
    single = _ddp_dm(str(photo_folder))
    single.train_dataloader()
    assert bool(rank0["fitted"])
    for key, value in single.state_dict()["preprocess"].items():
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs across ranks"
        torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-5, msg=key)


# ------------------------------------------------------------------------------------ frozen pretrained backbone


def test_warns_once_when_whitening_in_front_of_a_frozen_pretrained_backbone(photo_folder: Path, tmp_path: Path) -> None:
    weights = tmp_path / "test_resnet.safetensors"
    save_file(create_backbone("test_resnet").model.state_dict(), weights)

    def frozen_warnings(preprocess: str, freeze: str, runs: int = 1) -> list[str]:
        dm = ImageDataModule(source=f"folder:{photo_folder}", image_size=16, batch_size=8, preprocess=preprocess,
                             data_config=backbone_data_config("test_resnet"))  # fmt: skip
        model = TransferClassifier("test_resnet", pretrained=str(weights), num_classes=3, freeze=freeze)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(runs):
                _trainer(tmp_path).validate(model, dm, verbose=False)
        return [str(w.message) for w in caught if "frozen" in str(w.message)]

    messages = frozen_warnings("zca", "backbone", runs=2)
    assert len(messages) == 1
    assert (
        "preprocess='zca'" in messages[0] and "pretrained" in messages[0] and "preprocess='pretrained'" in messages[0]
    )
    assert len(frozen_warnings("dataset", "stages:1")) == 1
    assert frozen_warnings("pretrained", "backbone") == []
    assert frozen_warnings("zca", "none") == []


# ------------------------------------------------------------------------------------ transforms and their config


def test_eval_transform_resizes_by_crop_fraction_then_centre_crops() -> None:
    image = torch.zeros(3, 128, 128, dtype=torch.uint8)
    image[:, 32:96, 32:96] = 255  # bright centre half
    half = ImageDataModule(image_size=32, crop_pct=0.5, interpolation="bilinear").transform(train=False)
    whole = ImageDataModule(image_size=32, crop_pct=1.0, interpolation="bilinear").transform(train=False)
    # crop_pct=0.5: resize to 64, keep the central 32 = exactly the bright centre of the original (its edge, blurred
    # by the antialiased resize, lies on the crop's border).
    out = half(image)
    assert out.shape == (3, 32, 32) and out[:, 1:-1, 1:-1].min() >= 250 and out.min() >= 128
    out = whole(image)  # the whole image, shrunk: dark border, bright middle
    assert out.shape == (3, 32, 32) and out[:, :6, :6].max() <= 5 and out[:, 12:20, 12:20].min() >= 250


def test_train_transform_follows_augment_settings() -> None:
    dm = ImageDataModule(
        image_size=16, augment="randaugment", crop_scale=(0.5, 1.0), hflip=False, randaugment_magnitude=5
    )
    steps = dm.transform(train=True).transforms
    assert [type(s).__name__ for s in steps] == ["RandomResizedCrop", "RandAugment"]
    assert steps[0].scale == (0.5, 1.0) and steps[1].magnitude == 5 and steps[1].num_ops == 2
    out = dm.transform(train=True)(torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8))
    assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)
    trivial = ImageDataModule(image_size=16, augment="trivialaugment").transform(train=True).transforms
    assert [type(s).__name__ for s in trivial] == ["RandomResizedCrop", "RandomHorizontalFlip", "TrivialAugmentWide"]
    with pytest.raises(ValueError, match="on_bad_image='ignore'"):
        ImageDataModule(on_bad_image="ignore")
    with pytest.raises(ValueError, match="sampler='weighted'"):
        ImageDataModule(sampler="weighted")


@pytest.mark.parametrize("augment", ["randaugment", "trivialaugment"])
def test_augmentation_runs_with_bicubic_weights(augment: str) -> None:
    """Most ViT and ConvNeXt weights resize bicubic; RandAugment's rotations and shears on tensors refused it, so
    `augment: randaugment` with such a backbone failed in the first loader worker."""
    dm = ImageDataModule(image_size=16, augment=augment, interpolation="bicubic", randaugment_ops=8)
    transform = dm.transform(train=True)
    assert transform.transforms[0].interpolation == InterpolationMode.BICUBIC  # the resize keeps the weights' own
    torch.manual_seed(0)
    for _ in range(30):  # 8 of RandAugment's 14 ops per image: rotations and shears come up many times
        assert transform(torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)).shape == (3, 16, 16)


def test_augmentation_settings_appear_in_the_resolved_config(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["tlkit"])  # pytest's own arguments are not the CLI's
    args = ["fit", "--config", str(RECIPE), "--data.augment", "randaugment", "--data.randaugment_magnitude", "5"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    data = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert data["augment"] == "randaugment" and data["randaugment_magnitude"] == 5 and data["randaugment_ops"] == 2
    assert data["crop_scale"] == [0.08, 1.0] and data["hflip"] is True
    assert data["on_bad_image"] == "skip" and data["sampler"] is None and data["preprocess"] == "pretrained"


# --------------------------------------------------------------------------------------------------- bad images


def _messy_folder(root: Path) -> list[str]:
    """Two classes of real photos plus every odd mode and every kind of unreadable file; returns the bad names."""
    _make_folder(root, {"astronaut": 6, "brick": 6}, size=20)
    rgb = _photo(7, 20)
    Image.fromarray(rgb[..., 0]).save(root / "astronaut" / "gray.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(root / "astronaut" / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "brick" / "cmyk.jpg")
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(root / "brick" / "gray16.png")
    jpeg = root / "brick" / "0.jpg"
    Image.fromarray(rgb).save(jpeg, quality=90)
    (root / "astronaut" / "truncated.jpg").write_bytes(jpeg.read_bytes()[:200])
    (root / "astronaut" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    (root / "brick" / "empty.jpg").write_bytes(b"")
    (root / "brick" / "notes.jpeg").write_text("not an image")
    (root / "brick" / "README.txt").write_text("not an image either")
    return ["corrupt.png", "empty.jpg", "notes.jpeg", "truncated.jpg"]


def test_messy_folder_trains_with_one_warning_and_the_list_in_the_run_dir(tmp_path: Path) -> None:
    bad = _messy_folder(tmp_path / "data")
    dm = ImageDataModule(source=f"folder:{tmp_path / 'data'}", image_size=16, batch_size=4, val_split=0.25,
                         data_config=backbone_data_config("test_resnet"))  # fmt: skip
    trainer = _trainer(tmp_path, logger=CSVLogger(tmp_path / "runs", name=""))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TransferClassifier("test_resnet", num_classes=2), dm)
    reports = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert len(reports) == 1 and "Skipped 4 unreadable image file(s)" in reports[0]
    assert all(name in reports[0] for name in bad) and "Ignored 1 file(s)" in reports[0]
    listed = Path(trainer.log_dir) / "skipped_files.csv"
    assert str(listed) in reports[0]
    with open(listed) as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["path"]).name for r in rows) == sorted([*bad, "README.txt"]) and all(r["reason"] for r in rows)
    assert trainer.state.finished and len(dm.data.train) + len(dm.data.val) == 17  # 13 photos + 4 odd modes

    strict = ImageDataModule(source=f"folder:{tmp_path / 'data'}", image_size=16, on_bad_image="raise")
    with pytest.raises(ValueError, match=r"Unreadable image \S+astronaut/corrupt.png"):
        _trainer(tmp_path).fit(TransferClassifier("test_resnet", num_classes=2), strict)


# ----------------------------------------------------------------------------------------------- class imbalance


@pytest.fixture(scope="module")
def imbalanced_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_folder(tmp_path_factory.mktemp("imbalanced"), {"astronaut": 20, "brick": 4}, size=16)


def test_balanced_sampler_draws_every_class_equally_often(imbalanced_folder: Path) -> None:
    dm = ImageDataModule(source=f"folder:{imbalanced_folder}", image_size=16, val_split=0.25, sampler="balanced")
    assert dm.class_counts == [15, 3]
    sampler = dm.train_dataloader().sampler
    draws: Counter = Counter()
    for epoch in range(50):  # a new draw every epoch (Lightning calls set_epoch)
        sampler.set_epoch(epoch)
        draws.update(dm.data.train.targets[i] for i in sampler)
    assert 0.45 < draws[1] / (draws[0] + draws[1]) < 0.55  # 900 draws; unbalanced would give 1/6
    plain = ImageDataModule(source=f"folder:{imbalanced_folder}", image_size=16, val_split=0.25)
    plain_draws = Counter(plain.data.train.targets[i] for i in plain.train_dataloader().sampler)
    assert plain_draws == {0: 15, 1: 3}


def test_balanced_class_weights_weight_the_training_loss_only(
    imbalanced_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[torch.Tensor | None] = []
    real = tlkit.module.F.cross_entropy

    def spy(*args, weight=None, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(weight)
        return real(*args, weight=weight, **kwargs)

    monkeypatch.setattr(tlkit.module.F, "cross_entropy", spy)
    dm = ImageDataModule(source=f"folder:{imbalanced_folder}", image_size=16, batch_size=6, val_split=0.25,
                         data_config=backbone_data_config("test_resnet"))  # fmt: skip
    model = TransferClassifier("test_resnet", num_classes=2, class_weights="balanced", class_counts=dm.class_counts)
    _trainer(tmp_path, num_sanity_val_steps=0).fit(model, dm)
    expected = torch.tensor([18 / (2 * 15), 18 / (2 * 3)])
    torch.testing.assert_close(model.class_weight, expected)
    assert len(calls) == 3 and calls[2] is None  # two training steps, one validation step
    assert all(torch.equal(w, expected) for w in calls[:2])
    with pytest.raises(ValueError, match="class_weights='balanced' needs class_counts.*class_counts=dm.class_counts"):
        TransferClassifier("test_resnet", num_classes=2, class_weights="balanced")
    with pytest.raises(ValueError, match="needs 2 non-zero class counts"):
        TransferClassifier("test_resnet", num_classes=2, class_weights="balanced", class_counts=[3, 0])
    with pytest.raises(ValueError, match="class_weights='inverse'"):
        TransferClassifier("test_resnet", num_classes=2, class_weights="inverse")


def test_normalize_is_part_of_the_state_dict_for_dataset_preprocess(photo_folder: Path) -> None:
    dm = ImageDataModule(source=f"folder:{photo_folder}", image_size=16, preprocess="dataset", augment="none")
    dm.train_dataloader()
    state = dm.state_dict()
    restored = ImageDataModule(source=f"folder:{photo_folder}", image_size=16, preprocess="dataset")
    restored.load_state_dict(state)
    restored.setup("fit")
    assert isinstance(restored.preprocess, Normalize) and restored.preprocess.is_fitted
    assert torch.equal(restored.preprocess.mean, dm.preprocess.mean)


def test_predict_source_skips_unreadable_files_with_a_warning(tmp_path: Path) -> None:
    for i in range(2):
        Image.fromarray(_photo(i, 16)).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    dm = ImageDataModule(image_size=16, predict_source=str(tmp_path))
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\): \S+broken.jpg"):
        split = dm.predict_split()
    assert [Path(p).name for p in split.samples] == ["0.png", "1.png"] and dm.predict_split() is split
    strict = ImageDataModule(image_size=16, predict_source=str(tmp_path), on_bad_image="raise")
    with pytest.raises(ValueError, match="broken.jpg"):
        strict.predict_split()


def test_loaders_yield_uint8_images_and_labels():
    dm = ImageDataModule(source="textures", image_size=48, batch_size=8, preprocess="none", augment="basic")
    dm.setup()
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 48, 48)
    assert labels.dtype == torch.int64
    assert dm.num_classes == 10 and dm.class_names == sorted(dm.class_names)


def test_pretrained_normalisation_uses_the_data_config_it_is_given(tmp_path):
    model = TransferClassifier("tf_efficientnet_lite0", pretrained="packaged", num_classes=10)
    dm = ImageDataModule(source="digits", image_size=32, batch_size=8, data_config=model.data_config)
    trainer = tiny_trainer(tmp_path, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(model, dm)
    config = dm.data_config()
    assert config["mean"] == (0.5, 0.5, 0.5) and config["interpolation"] == "bilinear"
    white = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    torch.testing.assert_close(dm.normalize(white), torch.ones(1, 3, 2, 2))  # (1 - 0.5) / 0.5


def test_a_data_module_without_the_models_data_config_is_refused_when_it_would_normalise_wrongly(tmp_path):
    model = TransferClassifier("tf_efficientnet_lite0", pretrained="packaged", num_classes=10)
    dm = ImageDataModule(source="digits", image_size=32, batch_size=8)  # ImageNet mean/std; the weights want 0.5
    with pytest.raises(ValueError, match="built without data_config.*data_config=model.data_config"):
        tiny_trainer(tmp_path, limit_train_batches=1, limit_val_batches=1).fit(model, dm)


def test_the_cli_computes_the_data_config_of_the_recipes_backbone_without_weights():
    assert (
        backbone_data_config("tf_efficientnet_lite0", "packaged")
        == create_backbone("tf_efficientnet_lite0", pretrained="packaged").data_config
    )
    assert backbone_data_config("torchvision/resnet18") == create_backbone("torchvision/resnet18").data_config


def test_explicit_arguments_override_the_model():
    dm = ImageDataModule(source="digits", image_size=40, mean=(0.1, 0.2, 0.3), std=(1, 1, 1), crop_pct=0.5)
    config = dm.data_config()
    assert config["input_size"] == (3, 40, 40) and config["mean"] == (0.1, 0.2, 0.3) and config["crop_pct"] == 0.5


def test_dataset_statistics_are_fitted_on_train_split_and_saved(tmp_path):
    dm = ImageDataModule(source="digits", image_size=32, batch_size=64, preprocess="dataset", augment="none")
    dm.setup()
    batches = [dm.normalize(images) for images, _ in dm.train_dataloader()]
    train = torch.cat(batches)
    torch.testing.assert_close(train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-3, rtol=0)
    torch.testing.assert_close(train.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-2, rtol=0)
    restored = ImageDataModule(source="digits", image_size=32, preprocess="dataset")
    restored.load_state_dict(dm.state_dict())
    restored.setup()
    images = next(iter(dm.val_dataloader()))[0]
    torch.testing.assert_close(restored.normalize(images), dm.normalize(images))


def test_a_checkpoint_restores_statistics_without_refitting(tmp_path, monkeypatch):
    dm = ImageDataModule(source="digits", image_size=32, batch_size=32, preprocess="dataset")
    model = TransferClassifier("resnet18", num_classes=10)
    trainer = tiny_trainer(tmp_path, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(model, dm)
    trainer.save_checkpoint(tmp_path / "m.ckpt")

    fresh = ImageDataModule(source="digits", image_size=32, batch_size=32, preprocess="dataset")
    monkeypatch.setattr("tlkit.data.preprocess.Normalize.fit", lambda *a: pytest.fail("refitted"))
    tiny_trainer(tmp_path, limit_val_batches=1).validate(model, fresh, ckpt_path=tmp_path / "m.ckpt")
    torch.testing.assert_close(fresh.preprocess.mean, dm.preprocess.mean)


def test_folder_source_predicts_over_a_flat_folder(tmp_path):
    root = write_image_folder(tmp_path / "data")
    flat = tmp_path / "new"
    flat.mkdir()
    for i, png in enumerate(sorted((tmp_path / "data" / "cat").glob("*.png"))[:3]):
        png.rename(flat / f"img{i}.png")
    dm = ImageDataModule(source=f"folder:{root}", image_size=32, val_split=0.34, predict_source=str(flat))
    (flat / ".ipynb_checkpoints").mkdir()  # a notebook's copies and a NAS's thumbnails are not images to predict
    shutil.copy(flat / "img0.png", flat / ".ipynb_checkpoints" / "img0-checkpoint.png")
    (flat / "@eaDir" / "img0.png").mkdir(parents=True)
    shutil.copy(flat / "img0.png", flat / "@eaDir" / "img0.png" / "SYNOFILE_THUMB_S.png")
    split = dm.predict_split()
    assert [p.rsplit("/", 1)[1] for p in split.samples] == ["img0.png", "img1.png", "img2.png"]
    assert dm.predict_class_names() is None  # a flat folder, though tools left folders in it
    with pytest.raises(FileNotFoundError, match=r"'.*nope' is not found; expected a folder of images .* or one image"):
        ImageDataModule(source=f"folder:{root}", predict_source=str(tmp_path / "nope")).predict_split()


def test_predict_source_may_be_one_photo(tmp_path):
    root = write_image_folder(tmp_path / "data")
    photo = sorted((tmp_path / "data" / "dog").glob("*.png"))[0]
    dm = ImageDataModule(source=f"folder:{root}", image_size=32, val_split=0.34, predict_source=str(photo))
    assert dm.predict_split().samples == [str(photo)] and dm.predict_class_names() is None
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    with pytest.raises(FileNotFoundError, match=r"notes.txt' is a file of another kind; expected a folder"):
        ImageDataModule(source=f"folder:{root}", predict_source=str(notes)).predict_split()


def test_unknown_augmentation_is_refused():
    with pytest.raises(ValueError, match="randaugment"):
        ImageDataModule(source="digits", augment="heavy")


def test_the_shuffle_order_follows_the_runs_seed_unless_the_data_seed_is_set(
    imbalanced_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def order_and_split(seed_everything: int, **kwargs) -> tuple[list[int], list[str]]:
        L.seed_everything(seed_everything)  # sets PL_GLOBAL_SEED, as the CLI's seed_everything does
        dm = ImageDataModule(source=f"folder:{imbalanced_folder}", image_size=16, val_split=0.25, **kwargs)
        return list(dm.train_dataloader().sampler), [str(p) for p in dm.data.val.samples]

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    (order_1, val_1), (order_2, val_2) = order_and_split(1), order_and_split(2)
    assert order_1 != order_2 and val_1 == val_2  # new order per seed; the split stays put
    assert order_and_split(1) == (order_1, val_1)  # still exactly reproducible
    assert order_and_split(1, seed=5)[0] == order_and_split(2, seed=5)[0]  # an explicit seed wins


def test_an_epoch_ending_in_one_image_drops_it_instead_of_failing_batchnorm(tmp_path):
    # 12 training images in batches of 11: the last batch, one image, reached test_resnet's 1x1 maps at 32 px and
    # raised "Expected more than 1 value per channel when training" after the epoch had run (LeViT's BatchNorm1d
    # head at any size).
    from tlkit import TransferClassifier
    from tlkit.data.datamodule import ends_in_one_image

    root = write_image_folder(tmp_path / "data", per_class=5)  # 3 classes: 12 train, 3 val
    model = TransferClassifier("test_resnet", num_classes=3)
    dm = ImageDataModule(f"folder:{root}", image_size=32, batch_size=11, data_config=model.backbone.data_config)
    trainer = tiny_trainer(tmp_path, limit_train_batches=None, limit_val_batches=None)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 1 and len(dm.train_dataloader()) == 1
    assert len(ImageDataModule(f"folder:{root}", image_size=32, batch_size=5).train_dataloader()) == 3  # 5 + 5 + 2
    assert [ends_in_one_image(n, b) for n, b in [(12, 11), (12, 12), (13, 4), (1, 4), (7, 1)]] == [
        True, False, True, False, False
    ]  # fmt: skip
