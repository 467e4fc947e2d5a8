"""Fine-tuning phases: gradual unfreezing with per-phase learning rates, schedules and BatchNorm policy.

A run of :class:`~tlkit.module.TransferClassifier` is a list of phases (``phases=[...]`` in a recipe, each a dict
with the fields of :class:`Phase`), or the shorthand ``freeze_epochs=N`` (train with ``freeze`` for N epochs, then
everything, with ``layer_decay`` if set — fastai's ``fine_tune``). :class:`FineTuningPhases` owns the parsed list
and the index of the current phase; the model brings it to the Trainer itself (``configure_callbacks``). At the
start of fitting it puts the model in the phase of the current epoch, and at the first epoch of each later phase it

1. tells the model to enter the phase (``module.enter_phase``: ``requires_grad`` and BatchNorm modes of the new
   freeze spec; the phase's learning rates and schedule for the next ``configure_optimizers``);
2. under DDP, wraps the model in a new ``DistributedDataParallel`` (see :func:`rewrap_ddp` for why);
3. rebuilds the optimizer and LR schedule through Lightning (``strategy.setup_optimizers``, which calls the
   module's ``configure_optimizers`` for the new phase). The optimizer state (momentum, Adam moments) of parameters
   that train in both phases is carried over; parameters the new phase freezes are not in the new optimizer at all,
   so no stale state can act on them; newly unfrozen ones start from zero state;
4. under ``torch.compile``, drops the compiled graphs (:func:`torch.compiler.reset`), so none traced with the old
   ``requires_grad`` set is reused (pytorch/pytorch#139476; recent versions guard on ``requires_grad`` themselves,
   and the reset costs one recompile per phase);
5. with ``recalibrate_bn``, re-estimates the BatchNorm running statistics on the train data (:func:`recalibrate_bn`).

The phase index (and the phases) are in the callback's ``state_dict``, so in every checkpoint; on resume the phase
is re-entered before Lightning wraps the model in DDP and builds the optimizer whose state it then loads.
``tlkit plot-schedule`` walks the phases with the same :meth:`FineTuningPhases.enter` (:mod:`tlkit.schedule`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.layer_sync import LayerSync, TorchSyncBatchNorm
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from timm.layers import BatchNormAct2d, SyncBatchNormAct, convert_sync_batchnorm
from torch import nn

from tlkit.freezing import freezes_nothing, is_batchnorm

# The module these callbacks drive (tlkit.module.TransferClassifier, which imports this module to bring them).
TransferClassifier = L.LightningModule


@dataclass(frozen=True)
class Phase:
    """One fine-tuning phase. Fields left out (``None``) take the module's value of the same name.

    Attributes:
        epochs: length in epochs. The last phase lasts until ``trainer.max_epochs`` (it may omit ``epochs``).
        freeze: freeze spec of the phase (``"backbone"``, ``"stages:K"``, ``"none"``, ``"regex:..."``).
        lr: peak learning rate of the head; a backbone stage gets ``lr * lr_scale[stage] * layer_decay ** d``.
        warmup_epochs: linear warmup at the start of the phase (with ``restart``).
        layer_decay: LR multiplier per stage of distance from the head (head 1, last stage ``decay``, ...).
        lr_scale: extra LR multiplier per group (``"head"`` or a stage name of the backbone, e.g. ``"layer4"``).
        restart: ``True``: the module's ``schedule`` restarts over this phase (warmup, then e.g. a cosine over its
            epochs). ``False``: the run-wide schedule continues where the run is (the phase's ``lr`` is its peak).
        train_bn: BatchNorm layers in frozen stages keep training (affine parameters and running statistics).
        recalibrate_bn: before the phase, re-estimate all BatchNorm running statistics on the train data.
    """

    epochs: int | None = None
    freeze: str | None = None
    lr: float | None = None
    warmup_epochs: float | None = None
    layer_decay: float | None = None
    lr_scale: dict[str, float] = field(default_factory=dict)
    restart: bool = True
    train_bn: bool = False
    recalibrate_bn: bool = False


INHERITED = ("freeze", "lr", "warmup_epochs", "layer_decay")


def parse_phases(specs: list[dict[str, Any]], defaults: dict[str, Any]) -> list[Phase]:
    """Phases from recipe dicts, with the fields they leave out taken from ``defaults`` (the module's values).

    Example:
        >>> parse_phases([{"epochs": 1, "freeze": "backbone"}, {"lr": 1e-3}], {"freeze": "none", "lr": 0.01})[1].freeze
        'none'
    """
    if not specs:
        raise ValueError("phases is empty; give at least one phase, e.g. [{'epochs': 1, 'freeze': 'backbone'}].")
    names = [f.name for f in dataclasses.fields(Phase)]
    phases = []
    for i, spec in enumerate(specs):
        unknown = sorted(set(spec) - set(names))
        if unknown:
            raise ValueError(f"Phase {i} has unknown keys {unknown}; a phase takes {names}.")
        values = {**{k: defaults.get(k) for k in INHERITED}, **{k: v for k, v in spec.items() if v is not None}}
        phases.append(Phase(**values))
        _check_phase(i, phases[-1], last=i == len(specs) - 1)
    return phases


def _check_phase(i: int, phase: Phase, last: bool) -> None:
    if phase.epochs is None and not last:
        raise ValueError(f"Phase {i} has no 'epochs'; only the last phase may omit it (it lasts until max_epochs).")
    if phase.epochs is not None and phase.epochs < 1:
        raise ValueError(f"Phase {i} has epochs={phase.epochs}; a phase lasts at least 1 epoch.")


def phase_specs(phases: list[dict[str, Any]] | None, freeze_epochs: int, freeze: str) -> list[dict[str, Any]]:
    """The phase dicts a recipe declares: ``phases``, the ``freeze_epochs`` shorthand, or one phase (``[{}]``)."""
    if phases and freeze_epochs:
        raise ValueError("Give either phases or freeze_epochs (a shorthand for two phases), not both.")
    return phases or (fine_tune_phases(freeze_epochs, freeze) if freeze_epochs else [{}])


def fine_tune_phases(freeze_epochs: int, freeze: str | None) -> list[dict[str, Any]]:
    """The ``freeze_epochs`` shorthand: ``freeze`` (``"backbone"`` if it freezes nothing) for N epochs, then all."""
    if freeze_epochs < 1:
        raise ValueError(f"freeze_epochs must be >= 1, got {freeze_epochs}.")
    return [{"epochs": freeze_epochs, "freeze": "backbone" if freezes_nothing(freeze) else freeze}, {"freeze": "none"}]


class FineTuningPhases(Callback):
    """Owns a run's phases and the index of the current one, and moves the model from phase to phase (see the
    module docstring).

    ``TransferClassifier.configure_callbacks`` builds it from the model's ``phases`` / ``freeze_epochs`` when there
    is more than one phase (or ``recalibrate_bn``), so recipes never list it. The model it drives needs one method,
    ``enter_phase(phase, index=, epochs=)``.

    Args:
        phases: the parsed phases (:func:`parse_phases`), in order.

    Example:
        >>> model = TransferClassifier("resnet18", num_classes=3, freeze_epochs=1, layer_decay=0.7)
        >>> L.Trainer(max_epochs=3).fit(model, dm)  # epoch 0: head only; epochs 1-2: everything
    """

    def __init__(self, phases: list[Phase]) -> None:
        if not phases:
            raise ValueError("FineTuningPhases needs at least one phase.")
        self.phases = list(phases)
        self.index = 0  # the phase the model is in
        self._entered = -1  # last phase whose start-of-phase work (recalibration) is done
        self._module: TransferClassifier | None = None
        self._max_epochs: int | None = None

    def index_at(self, epoch: int) -> int:
        """Index of the phase that trains epoch ``epoch`` (the last phase runs until the end)."""
        index, start = 0, 0
        for i, phase in enumerate(self.phases[:-1]):
            start += phase.epochs
            if epoch >= start:
                index = i + 1
        return index

    def epochs_of(self, index: int, max_epochs: int | None) -> tuple[int, int]:
        """First and end epoch of phase ``index``; the last phase ends at ``max_epochs``."""
        start = sum(p.epochs for p in self.phases[:index])
        if index < len(self.phases) - 1:
            return start, start + self.phases[index].epochs
        max_epochs = max_epochs or 0
        return start, max_epochs if max_epochs > start else start + (self.phases[index].epochs or 1)

    def enter(self, module: TransferClassifier, index: int, max_epochs: int | None) -> None:
        """Make phase ``index`` the current one and tell ``module`` to enter it, with its epochs in a run of
        ``max_epochs`` (its freeze spec applies now, its optimizer and schedule at the next ``configure_optimizers``).
        """
        if not 0 <= index < len(self.phases):
            raise ValueError(f"Phase {index} does not exist; this run has {len(self.phases)} phases.")
        self.index = index
        module.enter_phase(self.phases[index], index=index, epochs=self.epochs_of(index, max_epochs))

    def setup(self, trainer: L.Trainer, pl_module: TransferClassifier, stage: str) -> None:
        # load_state_dict (called after setup, before DDP wraps the model) needs the module and the run's length.
        self._module, self._max_epochs = pl_module, trainer.max_epochs
        if stage == "fit":  # the phase's epochs (so its schedule) depend on the run: enter it for this run
            self.enter(pl_module, self.index_at(trainer.current_epoch), trainer.max_epochs)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: TransferClassifier) -> None:
        index = self.index_at(trainer.current_epoch)
        if index != self.index:
            previous = list(trainer.optimizers)
            self.enter(pl_module, index, trainer.max_epochs)
            rewrap_ddp(trainer)
            trainer.strategy.setup_optimizers(trainer)  # runs configure_optimizers of the new phase
            for before, after in zip(previous, trainer.optimizers, strict=True):
                carry_optimizer_state(before, after)
            if pl_module.hparams.compile:
                torch.compiler.reset()  # no graph traced with the old requires_grad set survives (pytorch#139476)
        if index != self._entered and self.phases[index].recalibrate_bn:
            recalibrate_bn(trainer, pl_module)
        self._entered = index

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"phase": self.index, "entered": self._entered, "phases": _plain(self.phases)}
        if self._module is not None:
            state["frozen"] = _frozen_names(self._module)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict or self._module is None:
            return
        saved = state_dict.get("phases")  # (checkpoints written before tlkit saved the phases have none)
        if saved is not None and saved != _plain(self.phases):
            raise ValueError(
                f"The checkpoint was written by a run with other phases ({saved}) than this one "
                f"({_plain(self.phases)}). Resume with the recipe's phases and module arguments as they were "
                "(the checkpoint's hyper_parameters), or start a new run from its weights."
            )
        self._entered = state_dict["entered"]
        self.enter(self._module, state_dict["phase"], self._max_epochs)
        if "frozen" in state_dict and _frozen_names(self._module) != state_dict["frozen"]:
            raise RuntimeError(
                f"The checkpoint was written in phase {state_dict['phase']} with a different set of frozen "
                "parameters than this model's phase of that index freezes: resume with the same backbone and phases."
            )


def _plain(phases: list[Phase]) -> list[dict[str, Any]]:
    """The phases as plain dicts (a checkpoint loads with ``weights_only=True``)."""
    return [dataclasses.asdict(phase) for phase in phases]


def _frozen_names(module: nn.Module) -> list[str]:
    return sorted(name for name, p in module.named_parameters() if not p.requires_grad)


def rewrap_ddp(trainer: L.Trainer) -> None:
    """Wrap the model in a new ``DistributedDataParallel`` after its set of trainable parameters changed.

    Why this, and not ``find_unused_parameters=True``: DDP's reducer registers its gradient hooks and buckets for
    exactly the parameters that require grad when the wrapper is built. A parameter unfrozen later has no hook, so
    its gradient is never averaged and the ranks silently drift apart (Lightning-AI/pytorch-lightning#20340); one
    frozen later is waited for forever ("Expected to have finished reduction"). ``find_unused_parameters`` only
    hides the second case, pays a graph traversal every step, and does nothing for the first. A new wrapper over
    the new trainable set is exactly DDP's contract: every trainable parameter gets a gradient every step (the whole
    model is in the loss), and its constructor re-broadcasts parameters and buffers from rank 0. All ranks change
    phase at the same epoch, so they all build the wrapper (a collective) together.
    """
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy):
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()
    elif not isinstance(strategy, SingleDeviceStrategy):
        raise NotImplementedError(
            f"Fine-tuning phases that change the frozen set support single-device and DDP strategies, not "
            f"{type(strategy).__name__}; use strategy='ddp' or one phase."
        )


def carry_optimizer_state(before: torch.optim.Optimizer, after: torch.optim.Optimizer) -> None:
    """Copy the per-parameter state of ``before`` into ``after`` for the parameters ``after`` optimises.

    Parameters that are no longer optimised are left behind with the old optimizer: no stale state.
    """
    for group in after.param_groups:
        for param in group["params"]:
            if param in before.state:
                after.state[param] = before.state[param]


@torch.no_grad()
def recalibrate_bn(trainer: L.Trainer, module: TransferClassifier) -> None:
    """Re-estimate the running statistics of every BatchNorm in the backbone on the train data.

    A no-grad pass over one epoch of train batches (``limit_train_batches`` applies) with the BatchNorm layers in
    train mode and a cumulative average (``momentum=None``, as ``torch.optim.swa_utils.update_bn``); the rest of
    the model is in eval mode. Under DDP each rank sees its shard and the statistics are averaged over ranks.
    """
    norms = [m for m in module.backbone.modules() if is_batchnorm(m)]
    norms = [m for m in norms if m.track_running_stats]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    was_training = module.training
    module.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for i, batch in enumerate(trainer.train_dataloader):
        if i >= trainer.num_training_batches:
            break
        images = trainer.strategy.batch_to_device(batch)[0]  # with the transfer hooks: preprocessing on the device
        module.backbone.forward(images)  # .forward: the eager module, not its compiled graph
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
        _average_over_ranks(m.running_mean, m.running_var)
    module.train(was_training)


def _average_over_ranks(*tensors: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t)
            t.div_(dist.get_world_size())


class TimmSyncBatchNorm(LayerSync):
    """``sync_batchnorm`` that keeps timm's fused BatchNorm + activation layers intact.

    Lightning's ``Trainer(sync_batchnorm=True)`` uses ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, which turns
    timm's ``BatchNormAct2d`` into a plain ``SyncBatchNorm`` and so silently drops its activation (EfficientNet's
    ReLU6/SiLU). This plugin converts with ``timm.layers.convert_sync_batchnorm`` (to ``SyncBatchNormAct``, which
    keeps it) and reverts to ``BatchNormAct2d`` after fitting. Use it instead of ``sync_batchnorm=True``:
    ``Trainer(strategy="ddp", plugins=[TimmSyncBatchNorm()])``, or ``trainer.plugins`` in a recipe.
    """

    def apply(self, model: nn.Module) -> nn.Module:
        return convert_sync_batchnorm(model)

    def revert(self, model: nn.Module) -> nn.Module:
        if isinstance(model, SyncBatchNormAct):
            return _batchnorm_act(model)
        if isinstance(model, nn.SyncBatchNorm):
            return TorchSyncBatchNorm().revert(model)
        for name, child in model.named_children():
            model.add_module(name, self.revert(child))
        return model


def _batchnorm_act(sync: SyncBatchNormAct) -> BatchNormAct2d:
    """The ``BatchNormAct2d`` that ``timm.layers.convert_sync_batchnorm`` made ``sync`` from (same tensors)."""
    bn = BatchNormAct2d(sync.num_features, sync.eps, sync.momentum, sync.affine, sync.track_running_stats)
    bn.act, bn.drop = sync.act, sync.drop
    if sync.affine:
        bn.weight, bn.bias = sync.weight, sync.bias
    bn.running_mean, bn.running_var = sync.running_mean, sync.running_var
    bn.num_batches_tracked = sync.num_batches_tracked
    bn.train(sync.training)
    return bn


__all__ = [
    "TimmSyncBatchNorm",
    "FineTuningPhases",
    "Phase",
    "carry_optimizer_state",
    "parse_phases",
    "phase_specs",
    "recalibrate_bn",
    "rewrap_ddp",
]
