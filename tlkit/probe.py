"""Linear probes: a linear head trained with full-batch L-BFGS on features extracted once from a frozen backbone.

A frozen backbone without augmentation maps every image to the same features in every epoch, so a probe extracts
them once (:func:`~tlkit.features.extract_features`) and trains on the :class:`~tlkit.features.FeatureSet`:

>>> dm = ImageDataModule("textures", image_size=64, augment="none", data_config=backbone_data_config(name, "packaged"))
>>> probe = LinearProbe(name, pretrained="packaged", num_classes=dm.num_classes, weight_decay=1 / 480)
>>> L.Trainer(max_epochs=20).fit(probe, probe.feature_data(dm))

or, from features saved earlier (extract once, train many):

>>> feats = FeatureSet.load("textures.safetensors")
>>> probe = LinearProbe(num_features=feats.features.shape[1], num_classes=10, weight_decay=1 / 480)
>>> L.Trainer(max_epochs=20).fit(probe, FeatureDataModule(feats))

With ``weight_decay=1/N`` (N training rows) the objective is LogisticRegression(C=1)'s (mean cross-entropy plus
``|W|^2 / (2N)``), and L-BFGS converges to its optimum: the standard linear-probe protocol. The CLI trains a probe
from a recipe whose model is ``tlkit.LinearProbe`` (``recipes/linear_probe.yaml``): it turns the recipe's image
data into features with the probe's backbone before fitting.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from tlkit.backbones import Pretrained, create_backbone
from tlkit.data.datamodule import ImageDataModule
from tlkit.features import FeatureSet, check_single_label, extract_features
from tlkit.heads import ClassifierHead
from tlkit.module import class_weight_of, classification_metrics
from tlkit.optim import check_lbfgs_trainer, create_lbfgs, l2_penalty


class FeatureDataModule(L.LightningDataModule):
    """Loaders of a :class:`~tlkit.features.FeatureSet`'s ``train`` and ``val`` rows, as ``(features, labels)``.

    Args:
        features: the features (with ``train`` and ``val`` splits, as extracted from an ImageDataModule), or the
            path of a file written by ``FeatureSet.save`` / ``tlkit extract``.
        batch_size: rows per batch; None: the whole split in one batch (what L-BFGS needs).
    """

    def __init__(self, features: FeatureSet | str, batch_size: int | None = None):
        super().__init__()
        self.features = features if isinstance(features, FeatureSet) else FeatureSet.load(features)
        self.batch_size = batch_size
        check_single_label(self.features.labels, "LinearProbe")
        self.train_set, self.val_set = (self.features.split(name) for name in ("train", "val"))

    @property
    def class_names(self) -> list[str] | None:
        return self.features.metadata.get("class_names")

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else int(self.features.labels.max()) + 1

    @property
    def multilabel(self) -> bool:
        return False  # multi-label features are refused when loaded

    @property
    def class_counts(self) -> list[int]:
        return torch.bincount(self.train_set.labels, minlength=self.num_classes).tolist()

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)  # its own: shuffling draws nothing from the global generator
        return self._loader(self.train_set, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def _loader(self, rows: FeatureSet, **kwargs: Any) -> DataLoader:
        dataset = TensorDataset(rows.features.float(), rows.labels)
        return DataLoader(dataset, batch_size=self.batch_size or max(len(dataset), 1), **kwargs)


class LinearProbe(L.LightningModule):
    """A linear classifier on frozen backbone features, trained with full-batch L-BFGS (strong-Wolfe line search).

    Args:
        backbone: the backbone whose features it classifies (timm name or ``torchvision/<name>``); it is kept,
            frozen, for :meth:`feature_data` and to classify images (``predict``). None: features only, of
            width ``num_features``.
        pretrained: the backbone's weights, as for :func:`~tlkit.create_backbone`.
        num_features: feature width when there is no ``backbone``.
        num_classes: number of classes; the CLI takes it from the data module.
        class_names: names of the classes.
        class_weights: ``None`` or ``"balanced"`` (per-class weights of the training loss from ``class_counts``).
        class_counts: training rows per class, for ``class_weights="balanced"``; the CLI passes the data's.
        multilabel: must be False (the CLI passes the data's): a probe learns one class per image; for a
            multi-label one fine-tune a :class:`~tlkit.TransferClassifier` with ``freeze="backbone"``.
        weight_decay: L2 penalty ``weight_decay * |W|^2 / 2`` on the weights (not the bias) added to the mean
            cross-entropy; ``1/N`` for N training rows is LogisticRegression(C=1).
        lr: L-BFGS's first step length; its line search sets the rest.
        max_iter: L-BFGS iterations per optimiser step (one step per epoch).
        history_size: curvature pairs L-BFGS keeps.
    """

    def __init__(
        self,
        backbone: str | None = None,
        pretrained: Pretrained = False,
        num_features: int | None = None,
        num_classes: int = 2,
        class_names: list[str] | None = None,
        class_weights: str | None = None,
        class_counts: list[int] | None = None,
        multilabel: bool = False,
        weight_decay: float = 0.0,
        lr: float = 1.0,
        max_iter: int = 20,
        history_size: int = 10,
    ):
        super().__init__()
        if (backbone is None) == (num_features is None):
            raise ValueError("LinearProbe takes a backbone name or num_features (for features only), not both.")
        if multilabel:
            raise ValueError(
                "LinearProbe learns one class per image, but the data is multi-label; fine-tune a "
                "TransferClassifier with freeze='backbone' (recipes/multilabel.yaml) for a multi-label linear head."
            )
        if not weight_decay >= 0 or not lr > 0:
            raise ValueError(f"LinearProbe needs weight_decay >= 0 and lr > 0, got {weight_decay} and {lr}.")
        self.save_hyperparameters()
        self.backbone = create_backbone(backbone, pretrained=pretrained) if backbone else None
        if self.backbone is not None:
            self.backbone.requires_grad_(False).eval()
            num_features = self.backbone.num_features
        self.head = ClassifierHead(num_features, num_classes, dropout=0.0)
        self.register_buffer(
            "class_weight", class_weight_of(class_weights, class_counts, num_classes), persistent=False
        )
        self.train_metrics = classification_metrics(num_classes, "train/")
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = classification_metrics(num_classes, "test/")
        self._evaluated: int | None = None  # the global step whose batch was last evaluated

    @property
    def data_config(self) -> dict[str, Any]:
        """The backbone weights' preprocessing (for the image data the features are extracted from)."""
        if self.backbone is None:
            raise ValueError("This LinearProbe has no backbone (num_features only): it has no data_config.")
        return self.backbone.data_config

    @property
    def class_names(self) -> list[str]:
        return self.hparams.class_names or [str(i) for i in range(self.hparams.num_classes)]

    def feature_data(
        self, images: ImageDataModule, batch_size: int | None = None, device: str = "auto"
    ) -> FeatureDataModule:
        """The train and val features of ``images`` through the backbone (eval transform, its preprocessing),
        computed on ``device`` (as :func:`~tlkit.features.extract_features`'s).

        Raises:
            ValueError: the probe has no backbone, or ``images`` augments (each epoch would see other images).
        """
        if self.backbone is None:
            raise ValueError("feature_data needs a LinearProbe with a backbone; build a FeatureDataModule instead.")
        if images.hparams.augment != "none":
            raise ValueError(
                f"A linear probe trains on features extracted once, but the data has augment="
                f"{images.hparams.augment!r}: set augment='none', or fine-tune with tlkit.TransferClassifier "
                "(freeze='backbone') to train on augmented images."
            )
        features = extract_features(self.backbone, images, split="all", device=device)
        features.metadata["class_names"] = images.class_names
        return FeatureDataModule(features, batch_size=batch_size)

    def forward(self, features: Tensor) -> Tensor:
        """Logits of backbone features ``(N, num_features)``."""
        return self.head(features)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Class probabilities of preprocessed images ``(N, 3, H, W)`` (the data module's ``predict`` loader)."""
        images = batch[0] if isinstance(batch, list | tuple) else batch
        if self.backbone is None:
            raise ValueError("A LinearProbe without a backbone classifies features only: call it on features.")
        return self(self.backbone(images)).softmax(dim=-1)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()  # frozen BatchNorm statistics and no dropout: the features of extraction
        return self

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        # L-BFGS evaluates the batch again at every point of its line search, within one step. Metrics and logs
        # describe the weights the step starts from, once: not those trial points.
        first = self.global_step != self._evaluated
        self._evaluated = self.global_step
        loss, _ = self._shared_step(batch, self.train_metrics, count=first)
        loss = loss + self.hparams.weight_decay * l2_penalty([self.head.fc.weight])
        if first:
            self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(batch[1]))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        loss, logits = self._shared_step(batch, self.val_metrics)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch[1]))
        return {"loss": loss, "logits": logits.detach()}

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        loss, logits = self._shared_step(batch, self.test_metrics)
        self.log("test/loss", loss, batch_size=len(batch[1]))
        return {"loss": loss, "logits": logits.detach()}

    def _shared_step(self, batch: tuple[Tensor, Tensor], metrics: Any, count: bool = True) -> tuple[Tensor, Tensor]:
        features, targets = batch
        if features.ndim != 2:
            raise ValueError(
                f"LinearProbe trains on features (N, num_features), got a batch of shape {tuple(features.shape)}: "
                "give it a FeatureDataModule (probe.feature_data(image_data))."
            )
        logits = self(features)
        weight = self.class_weight if metrics is self.train_metrics else None
        loss = F.cross_entropy(logits, targets, weight=weight)
        if count:
            metrics.update(logits, targets)
            self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=metrics is self.val_metrics)
        return loss, logits

    def configure_optimizers(self) -> torch.optim.LBFGS:
        check_lbfgs_trainer(
            self.trainer, "LinearProbe", batch_hint="Leave FeatureDataModule's batch_size at None (the whole split).",
            precision_hint=" (a head on features is cheap in float32)",
        )  # fmt: skip
        hp = self.hparams
        return create_lbfgs(self.head.parameters(), lr=hp.lr, max_iter=hp.max_iter, history_size=hp.history_size)
