"""TransferClassifier: a pretrained backbone, a fresh head, freezing, and the optimiser/schedule to fine-tune it."""

from __future__ import annotations

import functools
import os
import pickle
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MultilabelF1Score

from tlkit.adapters import AdapterFile, adapter_frozen, add_adapter, check_adapter
from tlkit.backbones import Pretrained, create_backbone
from tlkit.callbacks import FineTuningPhases, Phase, parse_phases, phase_specs
from tlkit.error_analysis import ErrorAnalysis
from tlkit.freezing import (
    apply_freeze,
    batchnorm_parameter_names,
    frozen_parameter_names,
    keep_all_bn_eval,
    keep_frozen_bn_eval,
)
from tlkit.heads import INITS, ClassifierHead
from tlkit.mixup import BatchMixup
from tlkit.multilabel import DEFAULT_THRESHOLD, ThresholdTuner, check_pos_weight, multilabel_loss, multilabel_metrics
from tlkit.optim import (
    OPTIMIZERS,
    SCHEDULES,
    continued_scheduler,
    create_optimizer,
    create_scheduler,
    excluded_from_weight_decay,
    l1_penalty,
    layer_decay_scales,
    no_weight_decay_names,
    param_groups,
    uses_weight_decay,
)
from tlkit.pairing import PairingCheck
from tlkit.probe_init import PROBE_INIT, ProbeHeadInit
from tlkit.resume import RngStateCheckpoint
from tlkit.tta import check_tta, tta_probabilities

# Lightning warns when modules are in eval mode as training starts; tlkit keeps frozen BatchNorm layers in eval mode
# on purpose (their running statistics are part of the pretrained weights). Ignored while a TransferClassifier fits,
# not from import on: importing tlkit leaves the process's warning filters alone.
EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"
EVAL_MODE_WARNING_MODULE = r"lightning\.pytorch\.loops\.fit_loop\Z"  # the module that warns, and no other

# Modules whose classes a checkpoint may name (``_class_path``, ``_instantiator``): resolving any other name would
# import code chosen by whoever wrote the file.
TRUSTED_CLASS_PREFIXES = ("tlkit.", "lightning.")
_CLASS_KEYS = ("_class_path", "class_path", "_instantiator")
# Where a multi-label model's tuned thresholds live in its checkpoints.
THRESHOLDS_KEY = "tlkit_thresholds"
# Lightning's own ``ckpt_path`` keywords, which name no file.
CKPT_PATH_KEYWORDS = ("last", "best", "hpc", "registry")


class TransferClassifier(L.LightningModule):
    """Fine-tune a timm or torchvision backbone with a freshly initialised classifier head.

    Args:
        backbone: timm name or ``torchvision/<name>`` (see ``tlkit backbones``).
        pretrained: ``True`` (hub weights), ``False``, ``"packaged"`` (offline ImageNet weights) or a weights file.
        num_classes: number of classes; the CLI takes it from the data module.
        class_names: names of the classes, saved with the model so predictions carry names.
        multilabel: images may show several classes (:mod:`tlkit.multilabel`): one sigmoid per class, binary
            cross-entropy, metrics ``acc`` (exact match), ``f1_micro``, ``f1_macro`` (at 0.5) and ``map``, and
            per-class thresholds tuned on every validation (maximum F1; ``val/f1_macro_tuned``), kept in the
            checkpoint, used by predict and export, and by test (``test/f1_macro_tuned``). The CLI takes it from the
            data module (a multi-label source), as ``num_classes``.
        pos_weight: multi-label only: weight of each class's positive examples in the loss (one number, or one per
            class; e.g. negatives / positives of a rare class). ``None``: 1.
        freeze: ``"none"`` (or None), ``"backbone"``, ``"stages:K"`` or ``"regex:<pattern>"`` (see
            :mod:`tlkit.freezing`).
        freeze_bn: ``True``: BatchNorm layers whose parameters are frozen stay in eval mode (running statistics
            unchanged); ``"all"``: every BatchNorm layer keeps the pretrained running statistics, also where its
            weight and bias train (what a head started from the probe, ``head: {init: probe}``, needs: it was fitted
            on features computed with them); ``False``: every BatchNorm layer updates its statistics in training.
        head: options of :class:`~tlkit.heads.ClassifierHead`: ``hidden``, ``dropout``, ``activation``, ``init``.
            ``init: probe`` (LP-FT, :mod:`tlkit.probe_init`) starts a linear head as the linear probe of the train
            split's features, fitted at the start of ``fit`` (not when resuming).
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"`` or ``"rmsprop"``. A linear probe on a frozen backbone
            (full-batch L-BFGS on features computed once) is :class:`tlkit.LinearProbe`.
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
        class_weights: ``None`` or ``"balanced"``: weight the training loss of each class by
            ``n_images / (n_classes * n_images_of_class)``, with the counts of ``class_counts`` (validation and test
            losses stay unweighted, so they compare across runs).
        class_counts: training images per class (index = label), for ``class_weights="balanced"``; the CLI takes
            them from the data module, as ``num_classes`` (in Python: ``class_counts=dm.class_counts``).
        channels_last: run the model in channels-last memory format (faster convolutions on GPU).
        compile: ``torch.compile`` the backbone.
        layer_decay: layer-wise LR decay: a backbone stage at distance ``d`` from the head trains at
            ``lr * layer_decay ** d`` (head 0, last stage 1, ...). ``None``: one LR for all.
        phases: fine-tuning phases, each a dict of :class:`~tlkit.callbacks.Phase` fields (``epochs``, ``freeze``,
            ``lr``, ``warmup_epochs``, ``layer_decay``, ``lr_scale``, ``restart``, ``train_bn``, ``recalibrate_bn``);
            fields left out take this module's values. ``None``: one phase with the arguments above. The
            :class:`~tlkit.callbacks.FineTuningPhases` callback that owns them is added to the Trainer by
            :meth:`configure_callbacks`; the model starts in the first phase.
        freeze_epochs: shorthand for two phases: ``freeze`` (``"backbone"`` if ``"none"``) for this many epochs,
            then everything unfrozen (with ``layer_decay`` if set). 0: off.
        mixup_alpha: mixup (timm's ``Mixup``, on the preprocessed batch): Beta(alpha, alpha) of the mixing factor;
            0: off. The loss is a soft-target cross-entropy (with ``label_smoothing``); train metrics compare the
            predictions with the un-mixed labels.
        cutmix_alpha: CutMix's Beta(alpha, alpha) of the pasted area; 0: off.
        mixup_prob: probability that a batch is mixed.
        mixup_switch_prob: with mixup and CutMix both on, probability of CutMix for a batch.
        mixup_off_epoch: first epoch trained without mixing; ``None``: mix to the end.
        ema_decay: keep an exponential moving average of the weights (Lightning's ``EMAWeightAveraging``, updated
            every step): validation, checkpoints' ``state_dict`` (so test, predict, export and soups) and the model
            after ``fit`` use the averaged weights; the raw ones are saved beside them for resuming. ``None``: off.
        tta: test-time augmentation for validation, test and predict: ``"flip"``, ``"five_crop"`` or
            ``"ten_crop"`` (probabilities averaged over the views, see :mod:`tlkit.tta`), logged as ``val/tta_acc``
            etc. next to the plain metrics; predict returns the averaged probabilities. ``None``: off.
        adapter: parameter-efficient fine-tuning (:mod:`tlkit.adapters`): ``{"kind": "lora", "r": 8, "alpha": 16,
            "targets": "auto"}``, ``{"kind": "bitfit"}`` (biases) or ``{"kind": "norm"}`` (normalisation layers); only
            that part of the backbone (and the head) trains, in every phase. Fit writes the adapter and head to
            ``adapter.safetensors`` next to the checkpoints. ``None``: off.
        feature_cache: deprecated and ignored (with a warning): the checkpoints of tlkit before
            :class:`tlkit.LinearProbe` hold it, and load. A linear probe on features computed once is that class.

    Example:
        >>> model = TransferClassifier("resnet18", num_classes=3, freeze="stages:2")
        >>> model = TransferClassifier("resnet18", num_classes=3, freeze_epochs=1, layer_decay=0.7)
        >>> model = TransferClassifier("resnet18", num_classes=3, phases=[
        ...     {"epochs": 1, "freeze": "backbone", "lr": 1e-2},
        ...     {"epochs": 2, "freeze": "stages:2", "lr": 1e-3, "warmup_epochs": 0.2},
        ...     {"epochs": 2, "freeze": "none", "lr": 1e-3, "layer_decay": 0.7}])
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: Pretrained = False,
        num_classes: int = 2,
        class_names: list[str] | None = None,
        multilabel: bool = False,
        pos_weight: float | list[float] | None = None,
        freeze: str | None = "none",
        freeze_bn: bool | Literal["all"] = True,
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
        class_weights: str | None = None,
        class_counts: list[int] | None = None,
        channels_last: bool = False,
        compile: bool = False,
        layer_decay: float | None = None,
        phases: list[dict[str, Any]] | None = None,
        freeze_epochs: int = 0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_off_epoch: int | None = None,
        ema_decay: float | None = None,
        tta: str | None = None,
        adapter: dict[str, Any] | None = None,
        feature_cache: bool | None = None,
    ):
        super().__init__()
        check_arguments(lr=lr, optimizer=optimizer, schedule=schedule, warmup_epochs=warmup_epochs,
                        weight_decay=weight_decay)  # fmt: skip
        if feature_cache is not None:
            _warn_feature_cache_ignored(feature_cache)
        self.save_hyperparameters(ignore="feature_cache")  # new checkpoints no longer carry it
        if freeze_bn not in (True, False, "all"):
            raise ValueError(f"freeze_bn must be true, false or 'all', not {freeze_bn!r}.")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes={num_classes}.")
        if multilabel and class_weights is not None:
            raise ValueError(
                f"class_weights={class_weights!r} weighs the one class of each image, but this model is multi-label; "
                "weigh each class's positives with pos_weight instead (e.g. its negatives / positives)."
            )
        # Not persistent: a checkpoint's class weights are its hyperparameters' class counts (and pos_weight).
        self.register_buffer(
            "class_weight", class_weight_of(class_weights, class_counts, num_classes), persistent=False
        )
        self.register_buffer("pos_weight", check_pos_weight(pos_weight, num_classes, multilabel), persistent=False)
        if multilabel:
            # Tuned on every validation, saved in checkpoints by on_save_checkpoint. Not a buffer: weight averaging
            # (EMA) averages and swaps buffers, and would carry back stale thresholds after validation tuned them.
            self.thresholds = torch.full((num_classes,), DEFAULT_THRESHOLD)
            self.threshold_tuner = ThresholdTuner()
            self.test_tuned_f1 = MultilabelF1Score(num_classes, average="macro")  # at the validation's thresholds
        self.backbone = create_backbone(backbone, pretrained=pretrained)
        self.adapter = check_adapter(adapter)
        if self.adapter:
            add_adapter(self.backbone, self.adapter)
        self.head = _build_head(self.backbone.num_features, num_classes, head or {})
        self.enter_phase(self._declared_phases()[0])  # checks every phase now, not epochs into the run
        self.mixup = self._build_mixup()
        check_ema_decay(ema_decay)
        check_tta(tta)
        metrics = functools.partial(multilabel_metrics if multilabel else classification_metrics, num_classes)
        self.train_metrics = metrics("train/", **({"average_precision": False} if multilabel else {}))
        self.val_metrics = metrics("val/")
        self.test_metrics = metrics("test/")
        if tta:  # (metrics hold no checkpointed state: a checkpoint loads with TTA on or off)
            self.tta_metrics = torch.nn.ModuleDict({stage: metrics(f"{stage}/tta_") for stage in ("val", "test")})
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if compile:
            self.backbone.compile()  # in place: parameter names (and so checkpoints) stay those of the eager model

    def _build_mixup(self) -> BatchMixup | None:
        hp = self.hparams
        if not (hp.mixup_alpha or hp.cutmix_alpha):
            return None
        if hp.class_weights:  # soft targets have no class weights
            raise ValueError("mixup/cutmix cannot be combined with class_weights; set mixup_alpha=cutmix_alpha=0.")
        return BatchMixup(
            hp.num_classes, mixup_alpha=hp.mixup_alpha, cutmix_alpha=hp.cutmix_alpha, prob=hp.mixup_prob,
            switch_prob=hp.mixup_switch_prob, label_smoothing=hp.label_smoothing, off_epoch=hp.mixup_off_epoch,
            multilabel=hp.multilabel,
        )  # fmt: skip

    @property
    def data_config(self) -> dict[str, Any]:
        """Input size, mean/std, interpolation and crop fraction the backbone's weights expect."""
        return self.backbone.data_config

    @property
    def class_names(self) -> list[str]:
        return self.hparams.class_names or [str(i) for i in range(self.hparams.num_classes)]

    def set_freeze(self, spec: str, train_bn: bool = False) -> None:
        """Freeze the backbone parameters that ``spec`` names and unfreeze all others (the head always trains).

        With ``train_bn`` the BatchNorm affine parameters stay trainable (and those layers in train mode).
        """
        frozen = frozen_parameter_names(self.backbone, spec)
        if train_bn:
            frozen -= batchnorm_parameter_names(self.backbone)
        frozen |= adapter_frozen(self.backbone, self.adapter)  # an adapter trains its part only, in every phase
        apply_freeze(self, {f"backbone.{name}" for name in frozen})
        self.train(self.training)  # re-applies the BatchNorm policy to the new frozen set

    def enter_phase(self, phase: Phase, index: int = 0, epochs: tuple[int, int] | None = None) -> None:
        """Train as ``phase`` says: apply its freeze spec and BatchNorm policy now; the next
        ``configure_optimizers`` builds its optimizer and schedule. The phase list, and the trainer-side work of a
        phase change (DDP, optimizer rebuild, compile), are :class:`~tlkit.callbacks.FineTuningPhases`'.

        Args:
            phase: the phase (a :class:`~tlkit.callbacks.Phase` with every inherited field filled in).
            index: its position in the run (in messages, and logged as ``phase``).
            epochs: its first and end epoch, which its schedule spans; ``None``: the whole run.

        Example:
            >>> model.enter_phase(Phase(freeze="none", lr=1e-3), index=1, epochs=(2, 5))
        """
        self.phase, self.phase_index, self.phase_epochs = phase, index, epochs
        self.set_freeze(phase.freeze, train_bn=phase.train_bn)

    def _declared_phases(self) -> list[Phase]:
        """The phases the recipe declares (``phases`` or ``freeze_epochs``), each checked against this model."""
        hp = self.hparams
        parsed = parse_phases(phase_specs(hp.phases, hp.freeze_epochs, hp.freeze), hp)  # they inherit module values
        groups = {"head", *self.backbone.stages}
        for i, phase in enumerate(parsed):
            frozen_parameter_names(self.backbone, phase.freeze)  # a bad spec fails now, not epochs into the run
            if unknown := sorted(set(phase.lr_scale) - groups):
                raise ValueError(f"Phase {i} lr_scale names unknown groups {unknown}; groups are {sorted(groups)}.")
        return parsed

    def configure_callbacks(self) -> list[L.Callback]:
        # Every checkpoint resumes the same run; the data module at hand suits this model's weights.
        callbacks: list[L.Callback] = [RngStateCheckpoint(), PairingCheck()]
        # Recipes declare phases on the model (model.init_args.phases / freeze_epochs), where they have always been,
        # so existing recipes and checkpoints (whose hyper_parameters hold them) keep working; the callback that owns
        # them is built from those values here, one per fit, never listed in a recipe.
        phases = self._declared_phases()
        if len(phases) > 1 or phases[0].recalibrate_bn:
            callbacks.append(FineTuningPhases(phases))
        try:
            fn = self.trainer.state.fn
        except RuntimeError:  # no Trainer yet: the schedule of a planned run (tlkit plot-schedule)
            fn = None
        if self.hparams.ema_decay and fn == "fit":  # the average exists only while fitting
            callbacks.append(EMAWeightAveraging(decay=self.hparams.ema_decay))
        if fn == "test":  # the highest-loss images and most confused classes, as CSV files
            callbacks.append(ErrorAnalysis())
        if self.adapter and fn == "fit":
            callbacks.append(AdapterFile())
        if (self.hparams.head or {}).get("init") == PROBE_INIT and fn == "fit":
            callbacks.append(ProbeHeadInit())
        return callbacks

    def on_fit_start(self) -> None:
        warnings.filterwarnings(
            "ignore", message=EVAL_MODE_WARNING, category=PossibleUserWarning, module=EVAL_MODE_WARNING_MODULE
        )

    def teardown(self, stage: str) -> None:
        if stage == "fit":  # the filter on_fit_start added, and no other
            warnings.filters[:] = [f for f in warnings.filters if not (f[0] == "ignore" and f[1] and
                                   f[1].pattern == EVAL_MODE_WARNING and f[2] is PossibleUserWarning)]  # fmt: skip

    def train(self, mode: bool = True) -> TransferClassifier:
        super().train(mode)
        if mode and self.hparams.freeze_bn == "all":
            keep_all_bn_eval(self.backbone)
        elif mode and self.hparams.freeze_bn:
            keep_frozen_bn_eval(self.backbone)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for preprocessed images ``(N, 3, H, W)``."""
        if not images.is_floating_point():  # else torch's own error: "expected scalar type Byte but found Float"
            raise TypeError(
                f"TransferClassifier got {images.dtype} images: raw pixels, not yet preprocessed. tlkit's data "
                "modules normalise batches after they reach the device, in the data module's hook, so pass the data "
                "module itself (trainer.predict(model, datamodule=dm), not dm.val_dataloader()), or call "
                "dm.normalize(images) first."
            )
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(images))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        soft_targets = None
        if self.mixup is not None:  # on the device, after normalisation (the data module's on_after_batch_transfer)
            images, soft_targets = self.mixup(images, targets, epoch=self.current_epoch)
        loss, _ = self._shared_step((images, targets), self.train_metrics, soft_targets=soft_targets)
        if self.hparams.l1:  # (a pass over every parameter: not in every step when there is no penalty)
            skip = no_weight_decay_names(self.backbone.model, "backbone.model.")
            penalised = [p for n, p in self.named_parameters() if p.requires_grad and uses_weight_decay(p)
                         and not excluded_from_weight_decay(n, skip)]  # fmt: skip
            loss = loss + self.hparams.l1 * l1_penalty(penalised)
        # Lightning reads progress-bar values back to the host after every step (a host-device synchronisation that
        # stalls the queue of GPU work), so the loss goes to the bar only when there is one.
        bar = self.trainer.progress_bar_callback is not None
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=bar, batch_size=len(batch[1]))
        for group in self._logged_groups():
            # A CPU tensor: Lightning would copy a Python float to the module's device, which synchronises too.
            self.log(f"lr/{group['name']}", torch.tensor(group["lr"]), on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Returns the logits, for callbacks (confusion matrix, misclassified images) to use without recomputing."""
        loss, logits = self._shared_step(batch, self.val_metrics)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch[1]))
        self._tta_step(batch, "val")
        if self.hparams.multilabel:
            self.threshold_tuner.update(logits.sigmoid(), batch[1])
        return {"loss": loss, "logits": logits.detach()}

    def on_validation_epoch_start(self) -> None:
        if self.hparams.multilabel:
            self.threshold_tuner.reset()

    def on_validation_epoch_end(self) -> None:
        """Multi-label: each class's threshold becomes the one with the best F1 on this validation (not after the
        sanity check, whose few batches would tune it on a sample); ``val/f1_macro_tuned`` is the macro F1 at
        those thresholds (tuned and measured on the same images: an optimistic number)."""
        if not self.hparams.multilabel or self.trainer.sanity_checking:
            return
        thresholds, f1 = self.threshold_tuner.compute()  # every process's scores: the same thresholds everywhere
        self.thresholds = thresholds.cpu()
        self.log("val/f1_macro_tuned", f1.nanmean(), sync_dist=False)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        loss, logits = self._shared_step(batch, self.test_metrics)
        self.log("test/loss", loss, batch_size=len(batch[1]))
        self._tta_step(batch, "test")
        if self.hparams.multilabel:
            predicted = logits.sigmoid() >= self.thresholds.to(logits.device)
            self.test_tuned_f1.update(predicted.long(), batch[1].long())
            self.log("test/f1_macro_tuned", self.test_tuned_f1, on_step=False, on_epoch=True)
        return {"loss": loss, "logits": logits.detach()}

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Class probabilities ``(N, num_classes)`` (softmax; multi-label: each class's sigmoid)."""
        images = batch[0] if isinstance(batch, list | tuple) else batch
        return self.probabilities(images)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities of preprocessed images, averaged over the ``tta`` views if set: a softmax, or
        (multi-label) one sigmoid per class."""
        if self.hparams.tta:
            return tta_probabilities(self, images, self.hparams.tta, multilabel=self.hparams.multilabel)
        logits = self(images)
        return logits.sigmoid() if self.hparams.multilabel else logits.softmax(dim=-1)

    def _tta_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        """With ``tta``, the metrics of the averaged probabilities, logged as ``<stage>/tta_*``."""
        if not self.hparams.tta:
            return
        images, targets = batch
        metrics = self.tta_metrics[stage]
        metrics.update(self.probabilities(images), _metric_targets(targets))
        self.log_dict(metrics, on_step=False, on_epoch=True)

    def _shared_step(
        self,
        batch: tuple[torch.Tensor, torch.Tensor],
        metrics: MetricCollection,
        count: bool = True,
        soft_targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy (multi-label: binary cross-entropy) and logits of the batch (against ``soft_targets`` if
        given: mixup's); with ``count``, updates and logs the epoch metrics (always against the hard labels)."""
        images, targets = batch
        logits = self(images)
        training = metrics is self.train_metrics  # class weights shape the training loss, not the reported ones
        if soft_targets is not None:
            loss = self.mixup.loss(logits, soft_targets)
        elif self.hparams.multilabel:
            pos_weight = self.pos_weight if training else None
            loss = multilabel_loss(logits, targets, pos_weight, label_smoothing=self.hparams.label_smoothing)
        else:
            weight = self.class_weight if training else None
            # Before the metrics: it rejects labels outside [0, num_classes), which they do not check for logits.
            loss = F.cross_entropy(logits, targets, weight=weight, label_smoothing=self.hparams.label_smoothing)
        if count:
            metrics.update(logits, _metric_targets(targets))
            self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=metrics is self.val_metrics)
        return loss, logits

    def configure_optimizers(self) -> dict[str, Any]:
        """Lightning's hook: :meth:`optimizers_for` the run the Trainer is set up for."""
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        return self.optimizers_for(int(self.trainer.estimated_stepping_batches), max_epochs)

    def optimizers_for(self, total_steps: int, max_epochs: int) -> dict[str, Any]:
        """The optimizer and per-step schedule of the current phase in a run of ``total_steps`` optimiser steps over
        ``max_epochs`` epochs: one named group per stage (and head), at ``lr * lr_scale * layer_decay ** distance``;
        frozen parameters are not in it. The numbers are passed in (not read from a Trainer), so a planned run's
        schedule is this same code (:func:`tlkit.schedule.module_lr_schedule`).

        Example:
            >>> config = model.optimizers_for(total_steps=150, max_epochs=10)  # what configure_optimizers returns
        """
        hp, phase = self.hparams, self.phase
        scales = layer_decay_scales(self.backbone.stages, phase.layer_decay) if phase.layer_decay else {}
        scales = {g: scales.get(g, 1.0) * phase.lr_scale.get(g, 1.0) for g in ("head", *self.backbone.stages)}
        groups = param_groups(
            self.named_parameters(),
            weight_decay=hp.weight_decay,
            group_of=self._stage_of(),
            base_lr=phase.lr,
            lr_scale=scales,
            no_weight_decay=no_weight_decay_names(self.backbone.model, "backbone.model."),  # timm's, e.g. pos_embed
        )
        optimizer = create_optimizer(groups, hp.optimizer, lr=phase.lr, momentum=hp.momentum, nesterov=hp.nesterov)
        scheduler = self._scheduler(optimizer, max(total_steps, 1), max(max_epochs, 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _scheduler(
        self, optimizer: torch.optim.Optimizer, total: int, max_epochs: int
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """The schedule restarts over the phase (warmup included), or continues the run-wide one (``restart``)."""
        hp, phase = self.hparams, self.phase
        per_epoch = total / max_epochs
        start, end = self.phase_epochs or (0, round(total / per_epoch))  # None: the whole run
        step_size = round(hp.step_epochs * per_epoch) if hp.step_epochs else None
        if not phase.restart:
            warmup = round(hp.warmup_epochs * per_epoch)
            start_step = round(start * per_epoch)
            return continued_scheduler(
                optimizer, hp.schedule, total_steps=total, start_step=start_step, warmup_steps=min(warmup, total - 1),
                step_size=step_size, gamma=hp.gamma,
            )  # fmt: skip
        steps, warmup = max(round((end - start) * per_epoch), 1), round(phase.warmup_epochs * per_epoch)
        if warmup >= steps:  # e.g. a recipe shortened with --trainer.max_epochs 1: keep the run, say so
            rank_zero_warn(
                f"warmup_epochs={phase.warmup_epochs} covers the whole phase {self.phase_index} ({steps} steps); "
                f"warming up for {steps - 1} steps instead."
            )
            warmup = steps - 1
        return create_scheduler(
            optimizer, hp.schedule, total_steps=steps, warmup_steps=warmup, step_size=step_size, gamma=hp.gamma
        )

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
        if self.hparams.multilabel:
            checkpoint[THRESHOLDS_KEY] = self.thresholds.tolist()

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | os.PathLike | IO[bytes],
        map_location: Any = None,
        hparams_file: str | os.PathLike | None = None,
        strict: bool | None = None,
        weights_only: bool | None = True,
        **kwargs: Any,
    ) -> TransferClassifier:
        """Lightning's ``load_from_checkpoint``, always with ``weights_only=True``, after :func:`read_checkpoint`'s
        checks (a clear error for an empty, truncated or pickled-code file, or a class outside tlkit/Lightning).

        Example:
            >>> model = TransferClassifier.load_from_checkpoint("runs/quickstart/version_0/checkpoints/last.ckpt")
        """
        if weights_only is False:
            raise ValueError(
                "TransferClassifier.load_from_checkpoint(weights_only=False) would unpickle arbitrary objects; "
                "tlkit checkpoints hold only tensors and plain values, so load them with weights_only=True."
            )
        read_checkpoint(checkpoint_path)  # (memory-mapped: checks the file without reading its tensors)
        if not isinstance(checkpoint_path, str | os.PathLike):
            checkpoint_path.seek(0)
        return super().load_from_checkpoint(
            checkpoint_path, map_location=map_location, hparams_file=hparams_file, strict=strict, weights_only=True,
            **kwargs,
        )  # fmt: skip

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "tlkit_data_config" in checkpoint:
            self.backbone.data_config = dict(checkpoint["tlkit_data_config"])
        if self.hparams.multilabel and THRESHOLDS_KEY in checkpoint:
            self.thresholds = torch.tensor(checkpoint[THRESHOLDS_KEY], dtype=torch.float32)
        self._take_checkpoint_classes(checkpoint.get("hyper_parameters") or {})

    def _take_checkpoint_classes(self, saved: Mapping[str, Any]) -> None:
        """The trained head's classes are the checkpoint's: a model built for a Trainer's ``ckpt_path`` got its
        names from the data module at hand (``tlkit predict/test --data.source other/``), which may differ."""
        saved_count = saved.get("num_classes", self.hparams.num_classes)
        if saved_count != self.hparams.num_classes:
            raise ValueError(
                f"The checkpoint's head has {saved_count} classes {saved.get('class_names')}, but this model was "
                f"built for {self.hparams.num_classes} (from the data module's source). Use a data.source with "
                "the checkpoint's classes, and data.predict_source for the images to predict."
            )
        names = saved.get("class_names")
        if names is None or list(names) == list(self.class_names):
            return
        rank_zero_warn(
            f"The checkpoint was trained on classes {list(names)}, but the data module's classes are "
            f"{self.class_names}; outputs are labelled with the checkpoint's names (label indices of the data "
            "follow its own order)."
        )
        self.hparams.class_names = list(names)


def _metric_targets(targets: Tensor) -> Tensor:
    """Labels as torchmetrics takes them: multi-hot float targets as integers."""
    return targets.long() if targets.is_floating_point() else targets


def _warn_feature_cache_ignored(feature_cache: bool) -> None:
    """Checkpoints and recipes of tlkit before LinearProbe hold ``feature_cache`` (True by default): they still load,
    and train the head on images through the frozen backbone, the same model, only slower."""
    rank_zero_warn(
        f"TransferClassifier(feature_cache={feature_cache}) is deprecated and ignored: the model now always runs "
        "its backbone on images. For a linear probe on features computed once, use tlkit.LinearProbe "
        "(recipes/linear_probe.yaml); drop feature_cache from the recipe.",
        category=FutureWarning,
    )


def check_arguments(lr: float, optimizer: str, schedule: str, warmup_epochs: float, weight_decay: float) -> None:
    """Reject recipe values that could only fail later (after the data scan) or train something else than asked.

    Raises:
        ValueError: naming the key, the value and what is valid.
    """
    if optimizer == "lbfgs":
        raise ValueError(
            "TransferClassifier(optimizer='lbfgs') is gone: a head trained with full-batch L-BFGS on a frozen backbone "
            "is tlkit.LinearProbe, which extracts the features once (recipes/linear_probe.yaml; in Python "
            "LinearProbe(backbone, ...)). To fine-tune, use optimizer='sgd', 'adam', 'adamw' or 'rmsprop'."
        )
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer={optimizer!r}; valid values: {', '.join(OPTIMIZERS)}.")
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule={schedule!r}; valid values: {', '.join(SCHEDULES)}.")
    if not _number(lr) or not lr > 0:
        raise ValueError(f"lr={lr!r}; the learning rate must be a number > 0 (e.g. 0.01).")
    for key, value in (("warmup_epochs", warmup_epochs), ("weight_decay", weight_decay)):
        if not _number(value) or not value >= 0:
            raise ValueError(f"{key}={value!r}; it must be a number >= 0 (0 turns it off).")


def check_ema_decay(decay: float | None) -> None:
    """Raises a ``ValueError`` for an ``ema_decay`` outside (0, 1) (``None``: no EMA)."""
    if decay is not None and not (_number(decay) and 0 < decay < 1):
        raise ValueError(
            f"ema_decay={decay!r}; it must be in (0, 1): the weight of the old average at each step. The average "
            "spans about 1 / (1 - decay) steps, so pick it for the run's length (0.99 for a few hundred steps)."
        )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_checkpoint(source: str | os.PathLike | IO[bytes]) -> dict[str, Any]:
    """A checkpoint's contents, read with ``torch.load(weights_only=True)`` (tensors on the CPU, memory-mapped).

    ``weights_only=True`` is passed explicitly: torch (2.4+) then ignores ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``,
    which only overrides call sites that leave the argument out, so no pickled code runs whatever the environment.

    Raises:
        FileNotFoundError: no file at ``source``.
        ValueError: the file is empty, truncated or not a torch checkpoint, holds pickled objects other than tensors
            and plain values, or names a class outside ``tlkit.`` / ``lightning.``.
    """
    name = source if isinstance(source, str | os.PathLike) else getattr(source, "name", "<file object>")
    if isinstance(source, str | os.PathLike):
        _check_checkpoint_file(Path(source))
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=True, mmap=isinstance(source, str | Path))
    except pickle.UnpicklingError as err:
        detail = _refused_global(str(err))
        raise ValueError(
            f"Refusing to load checkpoint {name}: it holds pickled objects other than tensors and plain values, "
            f"which could run code ({detail or 'weights_only=True refused it'}). tlkit loads checkpoints written by "
            "`tlkit fit` / Lightning's ModelCheckpoint; re-save the weights with torch.save(state_dict)."
        ) from err
    except (RuntimeError, EOFError, KeyError, OSError) as err:
        raise ValueError(f"Checkpoint {name} is truncated or not a torch checkpoint ({err}).") from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"Checkpoint {name} holds a {type(checkpoint).__name__}, not a Lightning checkpoint dict.")
    check_class_paths(checkpoint, name)
    return checkpoint


def _refused_global(message: str) -> str:
    """The line of torch's long weights-only error that names the refused object (``GLOBAL posix.system ...``)."""
    line = next((line for line in message.splitlines() if "GLOBAL" in line), "")
    return line.split(". Please")[0].removeprefix("\tWeightsUnpickler error: ").strip()


def _check_checkpoint_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}; pass the .ckpt written by `tlkit fit` (see its run dir).")
    if path.stat().st_size == 0:
        raise ValueError(f"Checkpoint {path} is an empty file (0 bytes); was it copied or written completely?")
    if not zipfile.is_zipfile(path):  # torch's own message for these is a bare EOFError/KeyError/miniz error
        raise ValueError(
            f"Checkpoint {path} is truncated or not a torch checkpoint (not a complete zip archive, "
            f"{path.stat().st_size} bytes); pass a .ckpt written by `tlkit fit`."
        )


def check_class_paths(checkpoint: Mapping[str, Any], name: Any = "checkpoint") -> None:
    """Refuse a checkpoint whose hyperparameters name a class (or instantiator) outside ``tlkit.`` / ``lightning.``:
    Lightning and jsonargparse import the module of such a name to resolve it. Nothing is imported here."""
    for key in ("hyper_parameters", "datamodule_hyper_parameters"):
        for found_key, class_path in _class_paths(checkpoint.get(key)):
            if not isinstance(class_path, str) or not class_path.startswith(TRUSTED_CLASS_PREFIXES):
                raise ValueError(
                    f"Checkpoint {name} names {key}.{found_key}={class_path!r}, outside tlkit and Lightning; "
                    f"refusing to import it. tlkit resolves only classes under {', '.join(TRUSTED_CLASS_PREFIXES)}"
                )


def _class_paths(value: Any) -> Iterator[tuple[str, Any]]:
    """``(key, value)`` of every class-naming key in nested hyperparameters."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key in _CLASS_KEYS:
                yield key, item
            else:
                yield from _class_paths(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _class_paths(item)


def class_weight_of(class_weights: str | None, class_counts: list[int] | None, num_classes: int) -> Tensor | None:
    """Per-class weights of the training loss: ``None``, or for ``"balanced"`` ``n / (K * n_k)`` per class k
    (scikit-learn's "balanced") from the training images per class.

    Raises:
        ValueError: an unknown ``class_weights``, or ``"balanced"`` without ``num_classes`` non-zero counts.
    """
    if class_weights is None:
        return None
    if class_weights != "balanced":
        raise ValueError(f"class_weights={class_weights!r}; use None or 'balanced'.")
    if class_counts is None:
        raise ValueError(
            "class_weights='balanced' needs class_counts, the training images per class: the CLI passes the data "
            "module's; in Python pass class_counts=dm.class_counts."
        )
    counts = torch.as_tensor(class_counts, dtype=torch.float32)
    if len(counts) != num_classes or bool((counts == 0).any()):
        raise ValueError(f"class_weights='balanced' needs {num_classes} non-zero class counts, got {class_counts}.")
    return counts.sum() / (len(counts) * counts)


def _build_head(in_features: int, num_classes: int, options: dict[str, Any]) -> ClassifierHead:
    init = options.get("init", "auto")
    if init not in (*INITS, PROBE_INIT):
        raise ValueError(f"Unknown head init {init!r}; valid options: {', '.join((*INITS, PROBE_INIT))}.")
    if init == PROBE_INIT:  # fitted by ProbeHeadInit when the fit starts; until then the usual init
        if options.get("hidden"):
            raise ValueError(
                f"head init {PROBE_INIT!r} starts a linear head as a linear probe, but this head has hidden layers "
                f"{options['hidden']}; drop 'hidden', or choose init {', '.join(INITS)}."
            )
        options = {**options, "init": "auto"}
    try:
        return ClassifierHead(in_features, num_classes, **options)
    except TypeError as err:
        raise ValueError(
            f"Bad head options {options}: ClassifierHead takes hidden, dropout, activation and init ({err})."
        ) from err


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Accuracy, macro F1 and top-5 accuracy, updated without host-device synchronisations (see :class:`_MacroF1`).

    No compute groups: the collection merges metrics whose states are equal after the first batch (comparing them
    on the host), so a first batch without a top-1 mistake merged F1 into top-5 accuracy, and F1 was then computed
    from top-5 hits.
    """
    metrics = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1": _MacroF1(num_classes),
    }
    if num_classes >= 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


class _MacroF1(MulticlassF1Score):
    """``MulticlassF1Score(average="macro")`` that counts each batch's confusion matrix with a scatter-add:
    torchmetrics counts it with ``torch.bincount``, which on CUDA reads its input's min and max back to the host, two
    synchronisations in every step."""

    def __init__(self, num_classes: int):
        super().__init__(num_classes, average="macro")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """``preds``: logits ``(N, C)`` or labels ``(N,)``; ``target``: labels ``(N,)``."""
        k = self.num_classes
        logits = preds.ndim == target.ndim + 1
        # Shapes only: checking label values would read them back to the host (the loss rejects bad labels first).
        if self.validate_args and (target.ndim != 1 or preds.shape != ((len(target), k) if logits else target.shape)):
            raise ValueError(
                f"Macro F1 takes logits (N, {k}) or labels (N,) as preds and labels (N,) as target, got preds of "
                f"shape {tuple(preds.shape)} and target of shape {tuple(target.shape)}."
            )
        predicted = preds.argmax(dim=1) if logits else preds
        cells = (target.long() * k + predicted.long()).flatten()  # (true, predicted) -> cell of the k x k matrix
        counts = torch.zeros(k * k, dtype=torch.long, device=cells.device)
        confusion = counts.scatter_add_(0, cells, torch.ones_like(cells)).view(k, k)
        tp = confusion.diag()
        fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
        # The metric's states (``add_state``), summed as torchmetrics sums them for multidim_average="global".
        self.tp, self.fp, self.fn = self.tp + tp, self.fp + fp, self.fn + fn
        self.tn = self.tn + (cells.numel() - (tp + fp + fn))
