"""Mixup / CutMix on preprocessed batches, with timm's ``Mixup`` and ``SoftTargetCrossEntropy``."""

from __future__ import annotations

import torch
from timm.data.mixup import Mixup, mixup_target
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor

from tlkit.multilabel import multilabel_loss


class BatchMixup:
    """timm's ``Mixup`` (one mixing factor per batch) that takes odd batches and turns off after an epoch.

    Args:
        num_classes: classes of the soft targets.
        mixup_alpha: Beta(alpha, alpha) of mixup's factor; 0 disables mixup.
        cutmix_alpha: Beta(alpha, alpha) of CutMix's area; 0 disables CutMix.
        prob: probability that a batch is mixed at all.
        switch_prob: with both on, probability of CutMix rather than mixup.
        label_smoothing: smoothing of the soft targets (mixed or not).
        off_epoch: the first epoch trained without mixing (the last epochs on clean images); ``None``: never off.
        multilabel: targets are multi-hot rows ``(N, num_classes)``, mixed as they are (smoothing moves them
            towards 1/2), and the loss is binary cross-entropy.

    Example:
        >>> mix = BatchMixup(10, mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1, off_epoch=4)
        >>> images, soft_targets = mix(images, labels, epoch=0)
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
        off_epoch: int | None = None,
        multilabel: bool = False,
    ):
        check_mixup_arguments(mixup_alpha, cutmix_alpha, prob, switch_prob)
        self.mixup = Mixup(
            mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob, mode="batch",
            label_smoothing=label_smoothing, num_classes=num_classes,
        )  # fmt: skip
        self.off_epoch = off_epoch
        self.multilabel = multilabel
        self.loss = multilabel_loss if multilabel else SoftTargetCrossEntropy()

    def __call__(self, images: Tensor, targets: Tensor, epoch: int) -> tuple[Tensor, Tensor]:
        """Mixed images (in place) and their soft targets ``(N, num_classes)``, each row summing to 1 (multi-label:
        each entry the mixed share of that class)."""
        self.mixup.mixup_enabled = self.off_epoch is None or epoch < self.off_epoch
        # timm mixes each image with its mirror in the batch and asserts an even size; an odd last batch
        # (the train loader keeps incomplete batches of two or more) mixes all but its last image, which keeps its own
        # (smoothed) label.
        even = len(images) - len(images) % 2
        if self.multilabel:
            return images, self._mix_multilabel(images[:even], targets, even)
        mixed, soft = self.mixup(images[:even], targets[:even])
        if even == len(images):
            return mixed, soft
        last = mixup_target(targets[even:], self.mixup.num_classes, 1.0, self.mixup.label_smoothing)
        return torch.cat([mixed, images[even:]]), torch.cat([soft, last])

    def _mix_multilabel(self, images: Tensor, targets: Tensor, even: int) -> Tensor:
        """Mixes the first ``even`` images in place with timm's own factor (and CutMix box), and their multi-hot
        targets by the same factor. timm's ``mixup_target`` one-hot encodes its targets (its ``multi_label`` mode
        needs timm 1.0.31), so the targets are mixed here, as it mixes them."""
        lam = self.mixup._mix_batch(images)  # 1.0 when this batch is not mixed
        smoothing = self.mixup.label_smoothing
        soft = targets.float() * (1.0 - smoothing) + smoothing / 2
        head = soft[:even]
        return torch.cat([head * lam + head.flip(0) * (1.0 - lam), soft[even:]])


def check_mixup_arguments(mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float) -> None:
    """Reject values timm would take silently (a negative alpha never mixes) or only fail on later (a bare assert).

    Raises:
        ValueError: naming the key, its value and the valid range.
    """
    for key, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if value < 0:
            raise ValueError(f"{key}={value}; it must be >= 0 (0 turns it off; 0.2-1.0 is usual).")
    if mixup_alpha == 0 and cutmix_alpha == 0:
        raise ValueError("Mixup needs mixup_alpha > 0 or cutmix_alpha > 0 (e.g. mixup_alpha=0.2, cutmix_alpha=1.0).")
    for key, value in (("mixup_prob", prob), ("mixup_switch_prob", switch_prob)):
        if not 0 <= value <= 1:
            raise ValueError(f"{key}={value}; it is a probability, in [0, 1].")
