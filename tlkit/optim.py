"""Parameter groups, optimizers, per-step LR schedules and L1/L2 penalties for fine-tuning; the full-batch L-BFGS
of :class:`tlkit.LinearProbe` (:func:`create_lbfgs`, :func:`check_lbfgs_trainer`)."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import lr_scheduler

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES: tuple[str, ...] = ("constant", "step", "cosine", "linear")
NO_DECAY_SUFFIX = "/no_decay"


def _check_choice(kind: str, value: str, valid: Iterable[str]) -> None:
    valid = tuple(valid)
    if value not in valid:
        raise ValueError(f"Unknown {kind} {value!r}; valid options: {', '.join(valid)}")


def uses_weight_decay(param: Tensor) -> bool:
    """Returns whether ``param`` should get weight decay (and the optional L1 term).

    Biases and normalisation scales/shifts (``ndim <= 1``) are excluded, as in timm's ``param_groups_weight_decay``:
    shrinking them towards zero only hurts the normalisation and does not regularise the function.
    """
    return param.ndim > 1


def no_weight_decay_names(model: nn.Module, prefix: str = "") -> frozenset[str]:
    """The names a timm model excludes from weight decay (its ``no_weight_decay()``: ``cls_token``, ``pos_embed``, ...),
    prefixed with ``prefix`` so that they match names taken from a module that holds ``model``.

    timm's ``create_optimizer_v2`` reads the same method; models without it (torchvision, CNNs) exclude nothing.

    Example:
        >>> sorted(no_weight_decay_names(timm.create_model("test_vit"), "backbone.model."))[:2]
        ['backbone.model.cls_token', 'backbone.model.dist_token']
    """
    names = getattr(model, "no_weight_decay", None)
    return frozenset(prefix + name for name in names()) if callable(names) else frozenset()


def excluded_from_weight_decay(name: str, no_weight_decay: Collection[str]) -> bool:
    """Whether parameter ``name`` is one of ``no_weight_decay``: a parameter name, a module name (all its
    parameters, e.g. twins' ``pos_block.0``), or a wildcard pattern (xcit's ``pos_embed.*``).

    timm matches with ``fnmatch`` alone, which misses module names; the prefix match catches them as well.
    """
    return any(name.startswith(entry + ".") or fnmatch.fnmatchcase(name, entry) for entry in no_weight_decay)


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]] | Mapping[str, nn.Parameter],
    *,
    weight_decay: float,
    base_lr: float,
    group_of: Callable[[str], str] | None = None,
    lr_scale: Mapping[str, float] | None = None,
    no_weight_decay: Collection[str] = (),
) -> list[dict]:
    """Splits trainable parameters into optimizer param groups.

    Parameters with ``requires_grad=False`` are skipped. Each group ``g = group_of(name)`` (default: a single group
    ``"all"``) becomes up to two dicts, in order of first appearance: ``name=g`` with ``weight_decay`` for weights and
    ``name=g + "/no_decay"`` with ``weight_decay=0`` for ``ndim <= 1`` params (see ``uses_weight_decay``) and those
    named in ``no_weight_decay``. The names are distinct because Lightning's ``LearningRateMonitor`` rejects
    duplicate group names. Empty halves are omitted.

    Args:
        named_params: ``(name, param)`` pairs or a mapping, e.g. ``model.named_parameters()``.
        weight_decay: Weight decay for the decayed half of every group.
        base_lr: Learning rate before per-group scaling.
        group_of: Maps a parameter name to its group name, e.g. ``"head"`` or ``"layer1"``.
        lr_scale: Per-group LR multiplier; missing groups use 1.0.
        no_weight_decay: Parameter names, module names or ``fnmatch`` patterns (as in ``named_params``) that get no
            weight decay, e.g. :func:`no_weight_decay_names` of a ViT (its ``cls_token`` and ``pos_embed``).

    Returns:
        Dicts with keys ``params``, ``weight_decay``, ``lr`` (``base_lr * lr_scale``), ``name`` and ``lr_scale``.
        ``lr`` already includes ``lr_scale``; the key is informational (do not combine with timm schedulers, which
        would multiply by it again).
    """
    if isinstance(named_params, Mapping):
        named_params = named_params.items()
    lr_scale = lr_scale or {}
    groups: dict[str, dict] = {}  # dicts keep insertion order, so group order is stable
    for name, param in named_params:
        if not param.requires_grad:
            continue
        group = group_of(name) if group_of is not None else "all"
        decay = uses_weight_decay(param) and not excluded_from_weight_decay(name, no_weight_decay)
        key = group if decay else group + NO_DECAY_SUFFIX
        if key not in groups:
            scale = float(lr_scale.get(group, 1.0))
            groups[key] = {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr": base_lr * scale,
                "name": key,
                "lr_scale": scale,
            }
        groups[key]["params"].append(param)
    return list(groups.values())


def create_optimizer(
    groups: list[dict],
    name: str = "sgd",
    *,
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """Builds a torch optimizer over ``groups`` (e.g. from ``param_groups``).

    Per-group ``lr`` and ``weight_decay`` override the defaults; groups without ``weight_decay`` get 0 (AdamW's own
    default of 1e-2 is not used). With ``"adamw"`` the decay is decoupled, with ``"sgd"``, ``"adam"`` and
    ``"rmsprop"`` it is an L2 gradient term. Full-batch L-BFGS is :func:`create_lbfgs`.

    Args:
        groups: Param group dicts.
        name: One of ``OPTIMIZERS``.
        lr: Default LR for groups without an ``lr`` key.
        momentum: Momentum for ``"sgd"`` and ``"rmsprop"``.
        nesterov: Nesterov momentum (``"sgd"`` only).
        betas: Adam/AdamW betas.
        eps: Adam/AdamW/RMSprop epsilon.

    Returns:
        The optimizer.

    Raises:
        ValueError: If ``name`` is unknown, or ``nesterov`` is set for a non-SGD optimizer.
    """
    _check_choice("optimizer", name, OPTIMIZERS)
    if nesterov and name != "sgd":
        raise ValueError(f"nesterov=True is only supported by 'sgd', not {name!r}")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=0.0)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    return torch.optim.RMSprop(groups, lr=lr, momentum=momentum, eps=eps, weight_decay=0.0)


@dataclass
class _CosineFactor:
    """LR multiplier ``m + (1 - m) * (1 + cos(pi * t / T)) / 2``, held at ``m`` after ``T``.

    A callable object (not a lambda) so that ``LambdaLR.state_dict`` saves it.
    """

    total: int
    min_factor: float

    def __call__(self, step: int) -> float:
        progress = min(step, self.total) / self.total
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _main_scheduler(
    optimizer: torch.optim.Optimizer, name: str, steps: int, step_size: int | None, gamma: float, min_lr_factor: float
) -> lr_scheduler.LRScheduler:
    if name == "constant":
        return lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if name == "step":
        step_size = step_size if step_size is not None else max(1, steps // 3)
        if step_size < 1:
            raise ValueError(f"step_size must be >= 1, got {step_size}")
        return lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    if name == "linear":
        return lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=min_lr_factor, total_iters=steps)
    # CosineAnnealingLR's eta_min is one absolute LR for all groups, so a relative floor needs LambdaLR; the closed
    # form also avoids CosineAnnealingLR's recursive drift and its rise again after T_max.
    return lr_scheduler.LambdaLR(optimizer, _CosineFactor(steps, min_lr_factor))


def create_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = "cosine",
    *,
    total_steps: int,
    warmup_steps: int = 0,
    step_size: int | None = None,
    gamma: float = 0.1,
    warmup_start_factor: float = 0.01,
    min_lr_factor: float = 0.0,
) -> lr_scheduler.LRScheduler:
    """Builds a per-optimizer-step LR schedule with optional linear warmup.

    During warmup (steps ``0 .. W-1``) the LR rises linearly from ``lr * warmup_start_factor`` towards ``lr``.
    Afterwards, with ``t`` counted from the end of warmup, ``T = total_steps - warmup_steps`` and ``m = min_lr_factor``:

    - ``"constant"``: ``lr``
    - ``"step"``: ``lr * gamma ** (t // step_size)``; ``step_size`` defaults to ``max(1, T // 3)``
    - ``"cosine"``: ``lr * (m + (1 - m) * (1 + cos(pi * t / T)) / 2)``, held at ``lr * m`` after ``T``
    - ``"linear"``: ``lr * (1 - (1 - m) * t / T)``, held at ``lr * m`` after ``T``

    ``lr`` is each param group's own initial LR, so groups with different LR scales share the shape.
    Call ``scheduler.step()`` after every ``optimizer.step()``.

    Args:
        optimizer: The optimizer to schedule.
        name: One of ``SCHEDULES``.
        total_steps: Total optimizer steps, warmup included.
        warmup_steps: Linear warmup steps.
        step_size: Decay period of ``"step"``.
        gamma: Decay factor of ``"step"``.
        warmup_start_factor: LR multiplier at the first warmup step, in ``(0, 1]``.
        min_lr_factor: Final LR multiplier of ``"cosine"`` and ``"linear"``, in ``[0, 1]``.

    Returns:
        The scheduler.

    Raises:
        ValueError: On an unknown ``name`` or inconsistent step counts.
    """
    _check_choice("schedule", name, SCHEDULES)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps >= total_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) must be smaller than total_steps ({total_steps}) to leave steps to decay"
        )
    main = _main_scheduler(optimizer, name, total_steps - warmup_steps, step_size, gamma, min_lr_factor)
    if warmup_steps == 0:
        return main
    warmup = lr_scheduler.LinearLR(
        optimizer, start_factor=warmup_start_factor, end_factor=1.0, total_iters=warmup_steps
    )
    return lr_scheduler.SequentialLR(optimizer, schedulers=[warmup, main], milestones=[warmup_steps])


def layer_decay_scales(stages: Sequence[str], decay: float, head: str = "head") -> dict[str, float]:
    """Layer-wise LR multipliers ``decay ** d``, ``d`` = distance from the head (as in BEiT and timm's
    ``param_groups_layer_decay``): the head gets 1, the last stage ``decay``, the one before ``decay ** 2``, ...,
    the stem (``stages[0]``) ``decay ** len(stages)``. Pass the result as ``lr_scale`` to :func:`param_groups`.

    Example:
        >>> layer_decay_scales(["stem", "layer1", "layer2"], 0.5)
        {'head': 1.0, 'layer2': 0.5, 'layer1': 0.25, 'stem': 0.125}
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1] (1 = no decay), got {decay}")
    scales = {head: 1.0}
    for distance, stage in enumerate(reversed(stages), start=1):
        scales[stage] = decay**distance
    return scales


@dataclass
class _FactorTable:
    """LR multiplier looked up in a precomputed table (held at its last value); saved by ``LambdaLR.state_dict``."""

    factors: list[float]

    def __call__(self, step: int) -> float:
        return self.factors[min(step, len(self.factors) - 1)]


def continued_scheduler(
    optimizer: torch.optim.Optimizer, name: str, *, total_steps: int, start_step: int, **kwargs: float
) -> lr_scheduler.LRScheduler:
    """The run-wide schedule of :func:`create_scheduler` (``total_steps`` long), picked up at ``start_step``.

    Used when a fine-tuning phase continues the schedule instead of restarting it: the new optimizer (with new
    param groups) gets the LR factors the schedule would have reached. The factors are read off the real scheduler
    on a one-parameter probe, so every schedule and warmup behaves exactly as it does when built directly.

    Args:
        optimizer: The phase's optimizer; each group's ``lr`` is its peak LR.
        name: One of ``SCHEDULES``.
        total_steps: Optimizer steps of the whole run.
        start_step: Steps already taken when this optimizer starts.
        **kwargs: ``warmup_steps``, ``step_size``, ``gamma``, ... of :func:`create_scheduler`.
    """
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = create_scheduler(probe, name, total_steps=total_steps, **kwargs)
    factors = []
    for _ in range(total_steps):
        factors.append(probe.param_groups[0]["lr"])
        probe.step()
        schedule.step()
    return lr_scheduler.LambdaLR(optimizer, _FactorTable(factors[min(start_step, total_steps - 1) :]))


def l1_penalty(params: Iterable[Tensor]) -> Tensor:
    """Returns ``sum(|w|)`` over ``params`` (0 if empty), to be scaled and added to the loss.

    Apply it to the same parameters that receive weight decay, i.e. trainable ones where ``uses_weight_decay`` holds
    (the non-``/no_decay`` groups of ``param_groups``), so biases and norm parameters are not pushed to zero.
    """
    terms = [p.abs().sum() for p in params]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def l2_penalty(params: Iterable[Tensor]) -> Tensor:
    """Returns ``sum(w ** 2) / 2`` over ``params`` (0 if empty): times ``weight_decay``, its gradient is the
    ``weight_decay * w`` that SGD and Adam add to the gradient, for optimizers that take no weight decay (L-BFGS)."""
    terms = [p.pow(2).sum() for p in params]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum() / 2


def create_lbfgs(
    params: Iterable[Tensor], *, lr: float = 1.0, max_iter: int = 20, history_size: int = 10
) -> torch.optim.LBFGS:
    """torch's L-BFGS with a strong-Wolfe line search, for a full-batch problem (a linear probe's head).

    It takes no weight decay: add :func:`l2_penalty` to the loss. 10 curvature pairs is what scikit-learn's and
    SciPy's L-BFGS keep (torch's default of 100 holds 200 copies of the parameter vector).
    """
    return torch.optim.LBFGS(params, lr=lr, max_iter=max_iter, history_size=history_size, line_search_fn="strong_wolfe")


def check_lbfgs_trainer(trainer: Any, who: str, *, batch_hint: str, precision_hint: str = "") -> None:
    """L-BFGS builds its curvature estimate and line search on one objective: it needs the whole training set in
    every step, its exact gradient (no clipping, no accumulation across batches) in float32 or better, on one device
    (each DDP rank would search its own shard's loss). Raises or warns naming ``who`` (the class), the warnings
    ending with the caller's hint of what to do instead."""
    if trainer.world_size > 1:
        raise ValueError(f"{who} runs on one device, not {trainer.world_size} processes: drop the DDP strategy.")
    if trainer.accumulate_grad_batches != 1 or trainer.gradient_clip_val:
        raise ValueError(
            f"{who} needs the exact gradient of each step: drop accumulate_grad_batches "
            f"(={trainer.accumulate_grad_batches}) and gradient_clip_val (={trainer.gradient_clip_val})."
        )
    trainer.estimated_stepping_batches  # noqa: B018  (reading it sets up the train loader and its length)
    if trainer.num_training_batches > 1:
        rank_zero_warn(
            f"{who} takes full-batch L-BFGS steps, but an epoch has {trainer.num_training_batches} batches: each "
            f"step sees one batch. {batch_hint}"
        )
    if "32" not in str(trainer.precision) and "64" not in str(trainer.precision):
        rank_zero_warn(
            f"{who} under precision={trainer.precision!r}: L-BFGS's line search compares losses rounded to that "
            f"precision; use precision 32{precision_hint}."
        )


__all__ = [
    "NO_DECAY_SUFFIX",
    "OPTIMIZERS",
    "SCHEDULES",
    "check_lbfgs_trainer",
    "continued_scheduler",
    "create_lbfgs",
    "create_optimizer",
    "create_scheduler",
    "excluded_from_weight_decay",
    "l1_penalty",
    "l2_penalty",
    "layer_decay_scales",
    "no_weight_decay_names",
    "param_groups",
    "uses_weight_decay",
]
