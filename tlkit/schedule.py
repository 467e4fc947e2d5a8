"""The learning rate of every parameter group at every optimiser step of a planned run, without training.

:func:`module_lr_schedule` builds the optimiser and scheduler with the model's own code
(``TransferClassifier.optimizers_for``, what ``configure_optimizers`` returns in training) for the run's step
counts, walks the fine-tuning phases as :class:`~tlkit.callbacks.FineTuningPhases` does, and
:func:`simulate_lr_schedule` steps them without gradients. ``tlkit plot-schedule`` draws the result
(:func:`tlkit.plots.lr_schedule_figure`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tlkit.callbacks import FineTuningPhases


@dataclass(frozen=True)
class PlannedRun:
    """The step counts of a run that is only planned.

    Args:
        steps_per_epoch: optimiser steps per epoch (after gradient accumulation).
        max_epochs: epochs of the run.
        max_steps: a cap on the optimiser steps (-1: none).
    """

    steps_per_epoch: int
    max_epochs: int
    max_steps: int = -1

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1 or not self.max_epochs or self.max_epochs < 1:
            raise ValueError(
                f"Need steps_per_epoch >= 1 and max_epochs >= 1, got {self.steps_per_epoch}, {self.max_epochs}."
            )

    @property
    def estimated_stepping_batches(self) -> int:
        """Optimiser steps of the whole run (the Trainer's name for the same count)."""
        total = self.steps_per_epoch * self.max_epochs
        return min(total, self.max_steps) if self.max_steps > 0 else total


def module_lr_schedule(module: Any, run: PlannedRun) -> dict[str, list[float]]:
    """Learning rate of each parameter group of ``module`` at every step of ``run``.

    ``module`` is a :class:`~tlkit.TransferClassifier` (or any module with its ``optimizers_for(total_steps,
    max_epochs)``); one that brings fine-tuning phases (a :class:`~tlkit.callbacks.FineTuningPhases` among its
    ``configure_callbacks``) is walked through them as in training. No parameter changes, and the module ends in the
    phase it was in.

    Example:
        >>> curves = module_lr_schedule(TransferClassifier("resnet18"), PlannedRun(steps_per_epoch=15, max_epochs=5))
    """
    if not callable(getattr(module, "optimizers_for", None)):
        raise TypeError(
            f"A {type(module).__name__} has no learning-rate schedule to simulate (no optimizers_for(total_steps, "
            "max_epochs)); plot-schedule draws TransferClassifier recipes (a LinearProbe takes full-batch L-BFGS "
            "steps, no schedule)."
        )
    phases = next((c for c in module.configure_callbacks() if isinstance(c, FineTuningPhases)), None)
    if phases is not None:
        return _phased_lr_schedule(module, phases, run)
    config = module.optimizers_for(run.estimated_stepping_batches, run.max_epochs)
    return simulate_lr_schedule(config, run.estimated_stepping_batches, run.steps_per_epoch)


def _phased_lr_schedule(module: Any, phases: FineTuningPhases, run: PlannedRun) -> dict[str, list[float]]:
    """A run with fine-tuning phases gets a new optimiser and schedule at each phase start: enter each phase as
    :class:`~tlkit.callbacks.FineTuningPhases` does and simulate it over its own steps. A group that does not train
    in a phase (frozen, or not yet unfrozen) reads NaN there, which the plot leaves blank."""
    total, entered = run.estimated_stepping_batches, (module.phase, module.phase_index, module.phase_epochs)
    curves: dict[str, list[float]] = {}
    done = 0
    try:
        for index in range(len(phases.phases)):
            end = min(phases.epochs_of(index, run.max_epochs)[1] * run.steps_per_epoch, total)
            if end <= done:
                break
            phases.enter(module, index, run.max_epochs)
            config = module.optimizers_for(total, run.max_epochs)
            phase = simulate_lr_schedule(config, end - done, run.steps_per_epoch)
            for name in phase.keys() - curves.keys():
                curves[name] = [math.nan] * done
            for name, values in curves.items():
                values += phase.get(name, [math.nan] * (end - done))
            done = end
    finally:
        phase, index, epochs = entered
        module.enter_phase(phase, index=index, epochs=epochs)  # the phase (and freeze state) the module had
    return curves


def simulate_lr_schedule(
    optimizers: Any, total_steps: int, steps_per_epoch: int | None = None
) -> dict[str, list[float]]:
    """Steps an optimiser and its scheduler without gradients and records each parameter group's learning rate.

    Args:
        optimizers: what ``LightningModule.configure_optimizers`` returns: an optimiser, ``(optimiser, scheduler)``,
            ``([optimisers], [schedulers])`` or a dict with ``optimizer`` and ``lr_scheduler`` (scheduler or config
            dict with ``interval``).
        total_steps: optimiser steps to simulate.
        steps_per_epoch: optimiser steps per epoch, for schedulers stepped per epoch.

    Returns:
        Group name (``name`` key of the param group, else ``group<i>``) -> learning rate before each step.
    """
    optimizer, scheduler, interval = _unpack_optimizers(optimizers)
    names = [group.get("name", f"group{i}") for i, group in enumerate(optimizer.param_groups)]
    curves: dict[str, list[float]] = {name: [] for name in names}
    for step in range(total_steps):
        for name, group in zip(names, optimizer.param_groups, strict=True):
            curves[name].append(float(group["lr"]))
        optimizer.step()  # no gradients, so no parameter changes; keeps the scheduler's step-order check quiet
        epoch_ends = steps_per_epoch and (step + 1) % steps_per_epoch == 0
        if scheduler is not None and (interval == "step" or epoch_ends):
            scheduler.step()
    return curves


def _unpack_optimizers(config: Any) -> tuple[torch.optim.Optimizer, Any, str]:
    if isinstance(config, torch.optim.Optimizer):
        return config, None, "step"
    if isinstance(config, dict):
        optimizer, scheduler = config["optimizer"], config.get("lr_scheduler")
    elif isinstance(config, list | tuple) and len(config) == 2:
        optimizer, scheduler = (x[0] if isinstance(x, list | tuple) else x for x in config)
    else:
        raise TypeError(f"Cannot read an optimiser and scheduler from {type(config).__name__}: {config!r}")
    interval = "epoch"  # Lightning's default for a bare scheduler
    if isinstance(scheduler, dict):
        interval = scheduler.get("interval", "epoch")
        scheduler = scheduler["scheduler"]
    return optimizer, scheduler, interval


__all__ = ["PlannedRun", "module_lr_schedule", "simulate_lr_schedule"]
