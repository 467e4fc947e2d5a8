"""TransferClassifier: a pretrained backbone, a fresh head, freezing, and the optimiser/schedule to fine-tune it."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from tlkit.backbones import Pretrained, create_backbone
from tlkit.freezing import apply_freeze, frozen_parameter_names, keep_frozen_bn_eval
from tlkit.heads import ClassifierHead
from tlkit.optim import create_optimizer, create_scheduler, l1_penalty, param_groups, uses_weight_decay


class TransferClassifier(L.LightningModule):
    """Fine-tune a timm or torchvision backbone with a freshly initialised classifier head.

    Args:
        backbone: timm name or ``torchvision/<name>`` (see ``tlkit backbones``).
        pretrained: ``True`` (hub weights), ``False``, ``"packaged"`` (offline ImageNet weights) or a weights file.
        num_classes: number of classes; the CLI takes it from the data module.
        class_names: names of the classes, saved with the model so predictions carry names.
        freeze: ``"none"``, ``"backbone"``, ``"stages:K"`` or ``"regex:<pattern>"`` (see :mod:`tlkit.freezing`).
        freeze_bn: keep BatchNorm layers whose parameters are frozen in eval mode (running statistics unchanged).
        head: options of :class:`~tlkit.heads.ClassifierHead`: ``hidden``, ``dropout``, ``activation``, ``init``.
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"`` or ``"rmsprop"``.
        lr: peak learning rate (after warmup).
        momentum: momentum of SGD/RMSprop.
        nesterov: Nesterov momentum for SGD.
        weight_decay: L2 penalty, not applied to biases and normalisation weights.
        l1: weight of an L1 penalty on the same parameters (0 disables it).
        schedule: ``"cosine"``, ``"step"``, ``"linear"`` or ``"constant"``, stepped every optimiser step.
        warmup_epochs: linear warmup before the schedule, in (possibly fractional) epochs.
        step_epochs: for ``schedule="step"``, epochs between decays (default: a third of the post-warmup steps).
        gamma: for ``schedule="step"``, the decay factor.
        label_smoothing: label smoothing of the cross-entropy loss.
        channels_last: run the model in channels-last memory format (faster convolutions on GPU).
        compile: ``torch.compile`` the backbone.

    Example:
        >>> model = TransferClassifier("resnet18", num_classes=3, freeze="stages:2")
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: Pretrained = False,
        num_classes: int = 2,
        class_names: list[str] | None = None,
        freeze: str = "none",
        freeze_bn: bool = True,
        head: dict[str, Any] | None = None,
        optimizer: str = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 1e-4,
        l1: float = 0.0,
        schedule: str = "cosine",
        warmup_epochs: float = 0.0,
        step_epochs: float | None = None,
        gamma: float = 0.1,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes={num_classes}.")
        self.backbone = create_backbone(backbone, pretrained=pretrained)
        self.head = _build_head(self.backbone.num_features, num_classes, head or {})
        self.set_freeze(freeze)
        self.train_metrics = _metrics(num_classes, "train/")
        self.val_metrics = _metrics(num_classes, "val/")
        self.test_metrics = _metrics(num_classes, "test/")
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if compile:
            self.backbone.compile()  # in place: parameter names (and so checkpoints) stay those of the eager model

    @property
    def data_config(self) -> dict[str, Any]:
        """Input size, mean/std, interpolation and crop fraction the backbone's weights expect."""
        return self.backbone.data_config

    @property
    def class_names(self) -> list[str]:
        return self.hparams.class_names or [str(i) for i in range(self.hparams.num_classes)]

    def set_freeze(self, spec: str) -> None:
        """Freeze the backbone parameters that ``spec`` names and unfreeze all others (the head always trains)."""
        frozen = frozen_parameter_names(self.backbone, spec)
        apply_freeze(self, {f"backbone.{name}" for name in frozen})
        self.train(self.training)  # re-applies the BatchNorm policy to the new frozen set

    def train(self, mode: bool = True) -> TransferClassifier:
        super().train(mode)
        if mode and self.hparams.freeze_bn:
            keep_frozen_bn_eval(self.backbone)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for preprocessed images ``(N, 3, H, W)``."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(images))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._shared_step(batch, self.train_metrics, "train/")
        if self.hparams.l1:
            penalised = (p for p in self.parameters() if p.requires_grad and uses_weight_decay(p))
            loss = loss + self.hparams.l1 * l1_penalty(penalised)
        for group in self._logged_groups():
            self.log(f"lr/{group['name']}", group["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Returns the logits, for callbacks (confusion matrix, misclassified images) to use without recomputing."""
        loss, logits = self._shared_step(batch, self.val_metrics, "val/")
        return {"loss": loss, "logits": logits.detach()}

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        loss, logits = self._shared_step(batch, self.test_metrics, "test/")
        return {"loss": loss, "logits": logits.detach()}

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Class probabilities ``(N, num_classes)``."""
        images = batch[0] if isinstance(batch, list | tuple) else batch
        return self(images).softmax(dim=-1)

    def _shared_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], metrics: MetricCollection, prefix: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = batch
        logits = self(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        metrics.update(logits, targets)
        on_step = prefix == "train/"
        self.log(f"{prefix}loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(targets))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=prefix == "val/")
        return loss, logits

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = param_groups(
            self.named_parameters(), weight_decay=hp.weight_decay, group_of=self._stage_of(), base_lr=hp.lr
        )
        optimizer = create_optimizer(groups, hp.optimizer, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov)
        total, per_epoch = self._schedule_steps()
        step_size = round(hp.step_epochs * per_epoch) if hp.step_epochs else None
        scheduler = create_scheduler(
            optimizer,
            hp.schedule,
            total_steps=total,
            warmup_steps=round(hp.warmup_epochs * per_epoch),
            step_size=step_size,
            gamma=hp.gamma,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _schedule_steps(self) -> tuple[int, float]:
        """Optimiser steps of the whole run, and per epoch."""
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        return total, total / epochs

    def _stage_of(self):
        stage_of = {f"backbone.{n}": stage for stage, names in self.backbone.stage_params().items() for n in names}
        return lambda name: stage_of.get(name, "head")

    def _logged_groups(self) -> list[dict[str, Any]]:
        seen: dict[str, dict[str, Any]] = {}
        for group in self.optimizers().optimizer.param_groups:
            seen.setdefault(group["name"].split("/")[0], {"name": group["name"].split("/")[0], "lr": group["lr"]})
        return list(seen.values())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The weights are in the checkpoint: reloading it must not download them again or need the original file.
        hparams = checkpoint.get("hyper_parameters", {})
        if hparams.get("pretrained") not in (False, "packaged"):
            checkpoint["hyper_parameters"] = {**hparams, "pretrained": False}
        checkpoint["tlkit_data_config"] = dict(self.backbone.data_config)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "tlkit_data_config" in checkpoint:
            self.backbone.data_config = dict(checkpoint["tlkit_data_config"])


def _build_head(in_features: int, num_classes: int, options: dict[str, Any]) -> ClassifierHead:
    try:
        return ClassifierHead(in_features, num_classes, **options)
    except TypeError as err:
        raise ValueError(
            f"Bad head options {options}: ClassifierHead takes hidden, dropout, activation and init ({err})."
        ) from err


def _metrics(num_classes: int, prefix: str) -> MetricCollection:
    metrics = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes >= 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix)
