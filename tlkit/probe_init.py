"""LP-FT: a classifier head that starts as the linear probe of the backbone's features, then fine-tunes.

A freshly initialised head sends large, random gradients into the pretrained backbone in the first steps of
fine-tuning, and the backbone's features move to fit a head that is still wrong (Kumar et al., 2022, "Fine-Tuning can
Distort Pretrained Features and Underperform Out-of-Distribution"). Starting from the head a linear probe would learn
— logistic regression on the train split's features, solved to convergence with L-BFGS — fine-tuning starts at the
probe's accuracy instead of chance. The probe's head was fitted on features computed with the pretrained BatchNorm
statistics, so LP-FT goes with ``freeze_bn="all"`` (``recipes/lp_ft.yaml``); with train-mode BatchNorm the features
shift under the head (measured in docs/techniques.md).

``head: {init: probe}`` on a :class:`~tlkit.TransferClassifier` adds :class:`ProbeHeadInit` to the fit.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from tlkit.freezing import modes_restored
from tlkit.optim import create_lbfgs, l2_penalty

PROBE_INIT = "probe"
MAX_PROBE_IMAGES = 100_000


class ProbeHeadInit(Callback):
    """At the start of a fit that does not resume, replaces the model's (linear) head with the linear probe of the
    train split's features (evaluation transform, the data module's preprocessing, the backbone in eval mode).

    Single-label: multinomial logistic regression (cross-entropy, with the model's class weights); multi-label: one
    logistic regression per class (binary cross-entropy, with its ``pos_weight``). Under DDP each rank extracts its
    part of the split, every rank fits on all of it, and rank 0's head is broadcast so every replica starts equal.

    The features are held in memory (``N x D`` float32 on every rank), so at most ``max_images`` training images
    are used: a seeded random subset of a larger split (100,000 images of 2,048 features are 0.8 GB).

    Args:
        weight_decay: L2 penalty ``weight_decay * |W|^2 / 2`` added to the mean loss; ``None``: ``1/N`` for N
            training images (scikit-learn's LogisticRegression(C=1), the usual linear-probe protocol).
        max_iter: L-BFGS iterations at most (it stops earlier when converged).
        max_images: training images the probe is fitted on, at most.
    """

    def __init__(self, weight_decay: float | None = None, max_iter: int = 1000, max_images: int = MAX_PROBE_IMAGES):
        self.weight_decay, self.max_iter, self.max_images = weight_decay, max_iter, max_images

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.ckpt_path is not None:  # resuming: the head (and everything else) comes from the checkpoint
            return
        data = trainer.datamodule
        if not hasattr(data, "train_eval_loader"):
            raise ValueError(
                f"head init {PROBE_INIT!r} fits the head on the train split's features, which it reads from a tlkit "
                f"ImageDataModule; this fit has {type(data).__name__ if data is not None else 'no data module'}. "
                "Pass datamodule=ImageDataModule(...) to fit, or use head init 'auto'."
            )
        world = trainer.world_size
        loader = data.train_eval_loader(max_images=self.max_images)
        features, targets = _split_features(pl_module, loader, limit=-(-self.max_images // world))
        features, targets = _gathered(features), _gathered(targets)
        fc = pl_module.head.fc
        state, train_acc = fit_linear_head(
            features.to(fc.weight.device), targets.to(fc.weight.device), fc.out_features,
            multilabel=pl_module.hparams.multilabel, class_weight=pl_module.class_weight,
            pos_weight=pl_module.pos_weight, weight_decay=self.weight_decay, max_iter=self.max_iter,
        )  # fmt: skip
        state = trainer.strategy.broadcast({k: v.cpu() for k, v in state.items()}, src=0)
        with torch.no_grad():
            fc.weight.copy_(state["weight"])
            fc.bias.copy_(state["bias"])
        subset = " (a random subset: max_images)" if len(features) >= self.max_images else ""
        rank_zero_info(
            f"Head initialised as the linear probe of {len(features)} training images' features{subset} "
            f"(train {'exact-match ' if pl_module.hparams.multilabel else ''}accuracy {train_acc:.3f}); fine-tuning "
            "starts from it."
        )


def fit_linear_head(
    features: Tensor,
    targets: Tensor,
    num_classes: int,
    *,
    multilabel: bool = False,
    class_weight: Tensor | None = None,
    pos_weight: Tensor | None = None,
    weight_decay: float | None = None,
    max_iter: int = 1000,
) -> tuple[dict[str, Tensor], float]:
    """Logistic regression of ``targets`` on ``features`` with full-batch L-BFGS: returns the ``weight`` and
    ``bias`` of an ``nn.Linear(features.shape[1], num_classes)`` and its train accuracy (exact match for
    multi-label).

    Args:
        features: ``(N, D)`` features.
        targets: ``(N,)`` class indices, or ``(N, num_classes)`` 0/1 rows with ``multilabel``.
        num_classes: output width.
        multilabel: one binary logistic regression per class instead of a multinomial one.
        class_weight: per-class weights of the cross-entropy (single-label).
        pos_weight: weights of each class's positives in the binary cross-entropy (multi-label).
        weight_decay: L2 penalty on the weight (not the bias); ``None``: ``1/N``.
        max_iter: L-BFGS iterations at most.
    """
    features = features.float()
    if len(features) == 0:
        raise ValueError("The train split has no images, so there is no linear probe to start the head from.")
    weight_decay = 1.0 / len(features) if weight_decay is None else weight_decay
    layer = torch.nn.Linear(features.shape[1], num_classes, device=features.device)
    torch.nn.init.zeros_(layer.weight)  # the objective is convex: zeros converge to the same optimum as any start
    torch.nn.init.zeros_(layer.bias)
    optimizer = create_lbfgs(layer.parameters(), max_iter=max_iter)

    def loss_fn() -> Tensor:
        logits = layer(features)
        if multilabel:
            # Summed over classes, averaged over images: each class's problem is LogisticRegression(C=1)'s.
            loss = F.binary_cross_entropy_with_logits(logits, targets.float(), pos_weight=pos_weight, reduction="sum")
            loss = loss / len(features)
        else:
            loss = F.cross_entropy(logits, targets.long(), weight=class_weight)
        return loss + weight_decay * l2_penalty([layer.weight])

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    with torch.enable_grad():  # also when called under no_grad (Lightning's hooks may be)
        optimizer.step(closure)
    with torch.no_grad():
        logits = layer(features)
        if multilabel:
            acc = ((logits > 0) == targets.bool()).all(dim=1).float().mean().item()
        else:
            acc = (logits.argmax(dim=1) == targets).float().mean().item()
    return {"weight": layer.weight.detach(), "bias": layer.bias.detach()}, acc


@torch.no_grad()
def _split_features(pl_module: Any, loader: Any, limit: int) -> tuple[Tensor, Tensor]:
    """The pooled features (what the head sees: the backbone's output) and targets of ``loader``'s first ``limit``
    images, with the data module's preprocessing, in eval mode, on the model's device."""
    features, targets, count = [], [], 0
    with modes_restored(pl_module.backbone):
        pl_module.backbone.eval()
        for images, batch_targets in loader:
            if count >= limit:
                break
            images, batch_targets = images[: limit - count], batch_targets[: limit - count]
            count += len(images)
            inputs = pl_module.trainer.datamodule.normalize(images.to(pl_module.device))
            if pl_module.hparams.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            features.append(pl_module.backbone(inputs).float().cpu())
            targets.append(batch_targets)
    if not features:
        return torch.empty(0, pl_module.backbone.num_features), torch.empty(0, dtype=torch.long)
    return torch.cat(features), torch.cat(targets)


def _gathered(rows: Tensor) -> Tensor:
    """Every DDP rank's ``rows``, concatenated in rank order (``rows`` itself without DDP)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)  # the ranks' parts may differ in length (litdata's chunks)
    return torch.cat(parts)


__all__ = ["MAX_PROBE_IMAGES", "PROBE_INIT", "ProbeHeadInit", "fit_linear_head"]
