"""Test-time augmentation: class probabilities averaged over flipped or cropped views of each image."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

TTA_MODES = ("flip", "five_crop", "ten_crop")
# The crops of five_crop/ten_crop cover this fraction of the image's side (then are resized back to the model's
# input size): the four corners and the centre of an image the model saw whole.
CROP_FRACTION = 0.875


def tta_views(images: Tensor, mode: str) -> list[Tensor]:
    """The views of a preprocessed batch ``(N, C, H, W)`` that ``mode`` averages over, each of the batch's size.

    ``flip``: the images and their mirror images; ``five_crop``: torchvision's ``five_crop`` (corners and centre);
    ``ten_crop``: those five and their mirror images.

    Raises:
        ValueError: an unknown ``mode``.
    """
    check_tta(mode)
    if mode == "flip":
        return [images, TF.horizontal_flip(images)]
    height, width = images.shape[-2:]
    size = [max(round(height * CROP_FRACTION), 1), max(round(width * CROP_FRACTION), 1)]
    crops = TF.five_crop(images, size) if mode == "five_crop" else TF.ten_crop(images, size)
    return [F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False) for crop in crops]


def tta_probabilities(model: Callable[[Tensor], Tensor], images: Tensor, mode: str, multilabel: bool = False) -> Tensor:
    """Softmax probabilities ``(N, num_classes)`` of ``model`` (``multilabel``: each class's sigmoid) averaged over
    :func:`tta_views` (one forward pass)."""
    views = tta_views(images, mode)
    logits = model(torch.cat(views))
    probabilities = logits.sigmoid() if multilabel else logits.softmax(dim=-1)
    return probabilities.view(len(views), len(images), -1).mean(dim=0)


def check_tta(mode: str | None) -> None:
    """Raises a ``ValueError`` naming the valid modes for an unknown one (``None``: no TTA)."""
    if mode is not None and mode not in TTA_MODES:
        raise ValueError(f"Unknown tta={mode!r}; use one of {', '.join(TTA_MODES)} (or leave it unset).")
