"""Freeze specs: which backbone parameters stay fixed, and BatchNorm layers that stay in eval mode.

A spec is one string:

- ``"none"``: everything trains;
- ``"backbone"``: the whole backbone is frozen, only the head trains;
- ``"stages:K"``: the stem and the first K stages are frozen (``stages:0`` is the stem alone);
- ``"regex:<pattern>"``: parameters whose name (as in the timm/torchvision model, e.g. ``layer1.0.conv1.weight``)
  matches ``re.search(pattern, name)`` are frozen.

Frozen parameters get ``requires_grad=False`` and are never handed to the optimizer. A BatchNorm layer whose
parameters are all frozen is kept in eval mode, so its running statistics stay those of the pretrained weights
even while Lightning puts the model in train mode (unless ``freeze_bn=False``). With ``train_bn`` (a fine-tuning
phase option) the BatchNorm affine parameters of frozen stages stay trainable, so those layers train and update
their statistics while the convolutions stay fixed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

from tlkit.backbones import Backbone

FREEZE_FORMS = ("none", "backbone", "stages:K", "regex:<pattern>")


def freezes_nothing(spec: str | None) -> bool:
    """``"none"``, or a recipe's ``freeze: null`` / ``freeze: false``."""
    return spec in ("none", None, False)


def frozen_parameter_names(backbone: Backbone, spec: str | None) -> set[str]:
    """Names (as in ``backbone.named_parameters()``) of the parameters that ``spec`` freezes (None: none)."""
    names = [name for name, _ in backbone.named_parameters()]
    if freezes_nothing(spec):
        return set()
    if not isinstance(spec, str):
        raise ValueError(f"Bad freeze spec {spec!r}. Valid forms: {', '.join(FREEZE_FORMS)}.")
    kind, _, arg = spec.partition(":")
    if spec == "backbone":
        return set(names)
    if kind == "stages" and arg.strip().isdigit():
        return _stage_names(backbone, int(arg))
    if kind == "regex" and arg:
        return _regex_names(names, arg)
    raise ValueError(
        f"Bad freeze spec {spec!r}. Valid forms: {', '.join(FREEZE_FORMS)}; "
        f"the stages of {backbone.name!r} are {backbone.stages} (stages:K freezes the stem and the first K)."
    )


def _stage_names(backbone: Backbone, count: int) -> set[str]:
    stages = backbone.stage_params()
    if count > len(stages) - 1:
        raise ValueError(
            f"freeze='stages:{count}' asks for more stages than {backbone.name!r} has: its stages are "
            f"{backbone.stages} (stem + {len(stages) - 1}); use stages:0 to stages:{len(stages) - 1}, or 'backbone'."
        )
    return {name for stage in list(stages)[: count + 1] for name in stages[stage]}


def _regex_names(names: list[str], pattern: str) -> set[str]:
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"freeze='regex:{pattern}' is not a valid regular expression: {err}") from err
    frozen = {name for name in names if regex.search(name.removeprefix("model."))}
    if not frozen:
        examples = ", ".join(n.removeprefix("model.") for n in names[:3])
        raise ValueError(f"freeze='regex:{pattern}' matches no parameter; names look like: {examples}, ...")
    return frozen


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer of any dimension: torch's BatchNorm1d/2d/3d, SyncBatchNorm and lazy
    variants, and timm's BatchNormAct2d / SyncBatchNormAct.

    torch has no public base class of these; its private ``_BatchNorm`` is the one they share (timm checks the
    same class), so listing the public classes instead would miss the lazy ones.
    """
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def batchnorm_parameter_names(module: nn.Module) -> set[str]:
    """Names (as in ``module.named_parameters()``) of the affine parameters of its BatchNorm layers."""
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, m in module.named_modules()
        if is_batchnorm(m)
        for name, _ in m.named_parameters(recurse=False)
    }


def apply_freeze(module: nn.Module, frozen: Iterable[str]) -> None:
    """Set ``requires_grad`` of every parameter of ``module``: False for the names in ``frozen``, True otherwise."""
    frozen = set(frozen)
    for name, param in module.named_parameters():
        param.requires_grad_(name not in frozen)


def frozen_batchnorms(module: nn.Module) -> list[nn.Module]:
    """BatchNorm layers (timm's BatchNormAct2d included) whose affine parameters are all frozen."""
    return [
        m
        for m in module.modules()
        if is_batchnorm(m) and any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters())
    ]


def keep_frozen_bn_eval(module: nn.Module) -> None:
    """Put frozen BatchNorm layers back in eval mode (call after ``module.train()``)."""
    for bn in frozen_batchnorms(module):
        bn.eval()


def keep_all_bn_eval(module: nn.Module) -> None:
    """Put every BatchNorm layer back in eval mode, trainable or not (call after ``module.train()``): the running
    statistics stay those of the pretrained weights while the affine parameters train."""
    for bn in (m for m in module.modules() if is_batchnorm(m)):
        bn.eval()


@contextmanager
def modes_restored(module: nn.Module) -> Iterator[None]:
    """Gives every submodule its own train/eval mode back on exit. ``module.train()`` would not: it also wakes the
    frozen BatchNorm layers a TransferClassifier keeps in eval mode, which then update their running statistics."""
    modes = {m: m.training for m in module.modules()}
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training
