"""The evaluation transform equals the weights' own: timm's ``create_transform(is_training=False)`` and torchvision's
``weights.transforms()``, on real non-square photos (landscape and portrait)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torchvision
from conftest import tiny_trainer
from PIL import Image
from skimage import data as skimage_data
from torchvision.io import write_png
from torchvision.transforms import v2

from tlkit import ImageDataModule, TransferClassifier, backbone_data_config, create_backbone, extract_features
from tlkit.backbones import _torchvision_data_config
from tlkit.data.datamodule import eval_transform

# Tolerance, in grey levels of the uint8 image. torchvision's uint8 antialiased resize is Pillow's algorithm (its
# fixed-point kernels), so tlkit's tensor pipeline and timm's PIL pipeline differ by rounding only. Measured on these
# photos: landscape, and every shorter-side resize: a pixel by at most 1 level, 0.1-0.6% of the pixels at all (mean
# 0.001-0.006 levels). Squash mode on a portrait photo (both sides scaled by different factors): the installed Pillow
# runs its vertical pass first, torch always the horizontal one, so the rounded intermediates differ: 17-21% of the
# pixels by 1 level, 0.03% by up to 7 with bicubic overshoot (mean 0.17-0.21). torchvision's own tensor path (float
# resize) is 1-6 levels off PIL in 15-19% of the pixels. For scale: a resize one pixel too large (249 for 248) is
# 4.3-5.2 levels off on average, with 42-74% of the pixels more than 1 level off; bilinear for bicubic ~1.0 and
# 17-27%; the old square Resize([249, 249]) 28-41 levels.
MEAN_LEVELS = 0.25
MAX_SHARE_OFF_BY_MORE_THAN_ONE = 0.001

PHOTOS = {  # (H, W) uint8 RGB photos shipped with scikit-image: landscape, and one turned portrait
    "coffee": skimage_data.coffee(),  # 400 x 600
    "chelsea": skimage_data.chelsea(),  # 300 x 451
    "coffee-portrait": np.ascontiguousarray(np.rot90(skimage_data.coffee())),  # 600 x 400
}
TIMM_CONFIGS = {  # a timm data config's crop settings; the rest as resolve_data_config gives
    "center-0.875-bicubic": dict(crop_pct=0.875, interpolation="bicubic", crop_mode="center"),
    "center-0.9-bilinear": dict(crop_pct=0.9, interpolation="bilinear", crop_mode="center"),
    "center-0.95-bicubic": dict(crop_pct=0.95, interpolation="bicubic", crop_mode="center"),
    "center-1.0-bilinear": dict(crop_pct=1.0, interpolation="bilinear", crop_mode="center"),
    "center-non-square": dict(crop_pct=0.9, interpolation="bicubic", crop_mode="center", input_size=(3, 224, 160)),
    "squash-1.0-bicubic": dict(crop_pct=1.0, interpolation="bicubic", crop_mode="squash"),
    "squash-0.9-bilinear": dict(crop_pct=0.9, interpolation="bilinear", crop_mode="squash"),
    "border-1.0-bicubic": dict(crop_pct=1.0, interpolation="bicubic", crop_mode="border"),
    "border-0.9-bilinear": dict(crop_pct=0.9, interpolation="bilinear", crop_mode="border"),
}
TORCHVISION_WEIGHTS = {  # resize_size / crop_size / interpolation of each
    "resnet18": torchvision.models.ResNet18_Weights.DEFAULT,  # 256 / 224, bilinear
    "vit_b_16": torchvision.models.ViT_B_16_Weights.DEFAULT,  # 256 / 224, bilinear
    "vit_b_16-swag": torchvision.models.ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1,  # 384 / 384, bicubic
    "efficientnet_b1": torchvision.models.EfficientNet_B1_Weights.DEFAULT,  # 255 / 240: 240 / (240/255) != 255
}


def _tensor(photo: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(photo).permute(2, 0, 1).contiguous()


def _normalized(images: torch.Tensor, config: dict) -> torch.Tensor:
    """uint8 → what the model sees, as timm's ToTensor + Normalize (tlkit runs this step on the device)."""
    mean, std = torch.tensor(config["mean"])[:, None, None], torch.tensor(config["std"])[:, None, None]
    return (images.float() / 255 - mean) / std


def assert_same_images(ours: torch.Tensor, reference: torch.Tensor, config: dict) -> None:
    """Both normalised: on average within MEAN_LEVELS grey levels, and (nearly) no pixel more than one level off."""
    assert ours.shape == reference.shape
    levels = (ours - reference).abs() * torch.tensor(config["std"])[:, None, None] * 255
    assert levels.mean() <= MEAN_LEVELS, f"{levels.mean():.2f} grey levels off on average"
    off = (levels > 1.5).float().mean()
    assert off <= MAX_SHARE_OFF_BY_MORE_THAN_ONE, f"{off:.2%} of the pixels more than one grey level off"


def _timm_config(**crop) -> dict:
    """A full data config as timm's resolve_data_config resolves it, with the given crop settings."""
    return timm.data.resolve_data_config({"input_size": (3, 224, 224), **crop})


# --------------------------------------------------------------------------------------------------------- timm


@pytest.mark.parametrize("photo", list(PHOTOS))
@pytest.mark.parametrize("crop", list(TIMM_CONFIGS))
def test_eval_transform_equals_timm_create_transform(photo: str, crop: str) -> None:
    config = _timm_config(**TIMM_CONFIGS[crop])
    reference = timm.data.create_transform(**config, is_training=False)(Image.fromarray(PHOTOS[photo]))
    ours = _normalized(eval_transform(config)(_tensor(PHOTOS[photo])), config)
    assert_same_images(ours, reference, config)


def test_timm_backbone_data_config_carries_its_crop_mode() -> None:
    # A squash-mode pretrained config (as convnext *_384 weights have), set through timm's own overlay.
    backbone = create_backbone("resnet18", pretrained_cfg_overlay=dict(crop_mode="squash", crop_pct=1.0))
    config = backbone.data_config
    assert config == timm.data.resolve_model_data_config(backbone.model)
    photo = PHOTOS["chelsea"]
    reference = timm.data.create_transform(**config, is_training=False)(Image.fromarray(photo))
    assert_same_images(_normalized(eval_transform(config)(_tensor(photo)), config), reference, config)


def test_image_size_override_keeps_the_weights_crop_fraction() -> None:
    dm = ImageDataModule(image_size=96, data_config=create_backbone("resnet18").data_config)  # crop_pct 0.95, bicubic
    config = dm.data_config()
    assert config["crop_pct"] == 0.95 and config["input_size"] == (3, 96, 96)
    photo = PHOTOS["coffee-portrait"]
    reference = timm.data.create_transform(**config, is_training=False)(Image.fromarray(photo))  # Resize(101)
    assert_same_images(_normalized(dm.transform(train=False)(_tensor(photo)), config), reference, config)


# -------------------------------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize("photo", list(PHOTOS))
@pytest.mark.parametrize("weights", list(TORCHVISION_WEIGHTS))
def test_eval_transform_equals_torchvision_weights_transforms(photo: str, weights: str) -> None:
    config = _torchvision_data_config(TORCHVISION_WEIGHTS[weights])
    reference = TORCHVISION_WEIGHTS[weights].transforms()
    ours = _normalized(eval_transform(config)(_tensor(PHOTOS[photo])), config)
    assert_same_images(ours, reference(Image.fromarray(PHOTOS[photo])), config)  # PIL input
    assert_same_images(ours, reference(_tensor(PHOTOS[photo])), config)  # tensor input: torchvision's float resize


def test_torchvision_data_config_keeps_resize_size() -> None:
    config = create_backbone("torchvision/efficientnet_b1").data_config
    assert config["resize_size"] == 255 and config["input_size"] == (3, 240, 240) and config["crop_mode"] == "center"
    assert config["crop_pct"] == 240 / 255 and config["interpolation"] == "bilinear"


def test_torchvision_image_size_and_crop_pct_overrides() -> None:
    weights_config = _torchvision_data_config(TORCHVISION_WEIGHTS["efficientnet_b1"])
    dm = ImageDataModule(image_size=120, data_config=weights_config)
    assert dm.data_config()["resize_size"] == 127  # 120 * 255 / 240 = 127.5: the weights' fraction, floored
    dm = ImageDataModule(crop_pct=0.5, data_config=weights_config)  # an explicit crop fraction replaces resize_size
    assert "resize_size" not in dm.data_config()
    assert dm.transform(train=False)(_tensor(PHOTOS["chelsea"])[:, :, :300]).shape == (3, 240, 240)
    assert dm.transform(train=False).transforms[0].size == [480]


def test_weights_without_a_resize_and_crop_transform_are_refused() -> None:
    weights = SimpleNamespace(transforms=lambda: v2.Identity())
    with pytest.raises(ValueError, match="no resize \\+ crop evaluation transform \\(Identity\\)"):
        _torchvision_data_config(weights)


# ------------------------------------------------------------------------------------------------ clear errors


def test_unknown_crop_mode_and_tensorless_interpolation_are_refused() -> None:
    with pytest.raises(ValueError, match="crop_mode='letterbox'.*'center', 'squash', 'border'"):
        eval_transform(_timm_config(crop_mode="letterbox"))
    with pytest.raises(ValueError, match="interpolation='lanczos' cannot resize tensors; use one of"):
        ImageDataModule(interpolation="lanczos").transform(train=False)


# ---------------------------------------------------------------------------------------- the path users take


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two classes of non-square real photos (landscape and portrait), four each."""
    root = tmp_path_factory.mktemp("photos")
    for label, name in enumerate(("cat", "coffee")):
        (root / name).mkdir()
        photo = _tensor(PHOTOS["chelsea" if label == 0 else "coffee"])
        for i in range(4):
            image = photo[:, i * 8 :, i * 12 :]
            write_png(image.transpose(1, 2) if i % 2 else image, str(root / name / f"{i}.png"))
    return str(root)


def _references(paths: list[str], config: dict) -> torch.Tensor:
    transform = timm.data.create_transform(**config, is_training=False)
    return torch.stack([transform(Image.open(path).convert("RGB")) for path in paths])


def test_data_module_with_a_model_evaluates_with_timms_transform(tmp_path, photo_folder: str) -> None:
    config = backbone_data_config("resnet18")  # timm cfg: crop_pct 0.95, bicubic
    dm = ImageDataModule(source=f"folder:{photo_folder}", image_size=64, batch_size=8, val_split=0.5, augment="basic",
                         predict_source=photo_folder, data_config=config)  # fmt: skip
    model = TransferClassifier("resnet18", num_classes=dm.num_classes)
    tiny_trainer(tmp_path, limit_train_batches=1, limit_val_batches=1).validate(model, dm)
    config = dm.data_config()
    assert config["crop_pct"] == 0.95 and config["interpolation"] == "bicubic"
    for loader, split in ((dm.val_dataloader(), dm.data.val), (dm.test_dataloader(), dm.data.val),
                          (dm.predict_dataloader(), dm.predict_split())):  # fmt: skip
        images, _ = next(iter(loader))
        assert_same_images(dm.normalize(images), _references(split.samples, config), config)


def test_extract_features_uses_the_weights_transform(photo_folder: str) -> None:
    backbone = create_backbone("torchvision/resnet18").eval()
    dm = ImageDataModule(source=f"folder:{photo_folder}", image_size=64, batch_size=8, val_split=0.5)
    feats = extract_features(backbone, dm, split="val", device="cpu")
    config = _torchvision_data_config(TORCHVISION_WEIGHTS["resnet18"])
    # torchvision's transform at 64 px with the weights' fraction 224/256: shorter side to 73, centre crop 64.
    reference = torchvision.transforms.Compose([
        torchvision.transforms.Resize(64 * 256 // 224), torchvision.transforms.CenterCrop(64),
        torchvision.transforms.ToTensor(), torchvision.transforms.Normalize(config["mean"], config["std"]),
    ])  # fmt: skip
    images = torch.stack([reference(Image.open(path).convert("RGB")) for path in dm.data.val.samples])
    with torch.no_grad():
        expected = backbone(images)
    torch.testing.assert_close(feats.features, expected, atol=0.05, rtol=0.02)
    stretched = torch.stack([reference(Image.open(p).convert("RGB").resize((73, 73))) for p in dm.data.val.samples])
    with torch.no_grad():
        assert not torch.allclose(feats.features, backbone(stretched), atol=0.05, rtol=0.02)


def test_the_sweep_of_every_pretrained_tag_on_its_unusual_configs() -> None:
    """A sample of benchmarks/eval_transforms.py (which checks all ~1,800 timm tags and every torchvision weight):
    the tags with timm's rarest settings, each through tlkit's data config and transform against timm's on the
    photos: crop_pct above 1 (the crop pads: volo_d5_512), a portrait input size (1024 x 768) squashed with bilinear
    interpolation (sapiens2), the border mode (deepseek_vit_412m), a plain one."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import eval_transforms

    tags = ["volo_d5_512.sail_in1k", "vit_base_patch16_sapiens2.fb", "deepseek_vit_412m.deepseek_v4_1_flash",
            "resnet18.a1_in1k"]  # fmt: skip
    matched, failures, refused, distinct = eval_transforms.timm_sweep(tags)
    assert (matched, failures, refused, distinct) == (4, [], [], 4)
