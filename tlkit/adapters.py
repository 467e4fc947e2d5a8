"""Parameter-efficient fine-tuning: train a small part of the backbone (and the head) instead of all of it.

Three kinds, chosen with ``TransferClassifier(adapter={"kind": ...})``:

- ``lora``: low-rank updates ``W + (alpha / r) B A`` on the backbone's linear layers (a ViT's fused ``qkv``, ``proj``,
  ``fc1``, ``fc2``), or on its ungrouped convolutions when it has no linear layer (a CNN), from the ``peft`` library
  (``peft.inject_adapter_in_model``); the base weights stay frozen. ``targets``: ``"auto"`` or a list of module
  names / name suffixes as peft reads them; ``r``, ``alpha``, ``dropout``.
- ``bitfit``: only the backbone's biases train.
- ``norm``: only the backbone's normalisation layers (BatchNorm, LayerNorm, GroupNorm, RMSNorm) train.

The head always trains. A freeze spec or phase still applies on top: an adapter parameter in a frozen stage stays
frozen. :func:`adapter_state_dict` is what a run needs besides the pretrained weights (adapter and head), a small
file; :func:`merge_adapter` folds LoRA into the base weights for export.

Example:
    >>> model = TransferClassifier("vit_small_patch16_224", num_classes=10, adapter={"kind": "lora", "r": 8})
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from tlkit.backbones import Backbone
from tlkit.io import atomic_path

KINDS = ("lora", "bitfit", "norm")
LORA_DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "auto"}
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
# what peft puts between a wrapped layer's name and its parameters: `qkv.base_layer.weight`, `qkv.lora_A.default.weight`
_PEFT_PART = re.compile(r"\.(base_layer|lora_[A-Za-z_]+\.[^.]+)(?=\.)")


def check_adapter(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """The adapter spec with its defaults filled in; ``None`` for none. Unknown kinds and keys are errors."""
    if spec is None:
        return None
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in KINDS:
        raise ValueError(f"adapter kind {kind!r} is not one of {', '.join(KINDS)} (adapter: {{kind: lora, r: 8}}).")
    allowed = LORA_DEFAULTS if kind == "lora" else {}
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise ValueError(f"adapter kind {kind!r} takes {sorted(allowed) or 'no options'}, not {unknown}.")
    full = {"kind": kind, **allowed, **spec}
    if kind == "lora" and (int(full["r"]) < 1 or float(full["alpha"]) <= 0):
        raise ValueError(f"LoRA needs r >= 1 and alpha > 0, got r={full['r']}, alpha={full['alpha']}.")
    return full


def add_adapter(backbone: Backbone, spec: dict[str, Any]) -> None:
    """Put the adapter into ``backbone`` in place (LoRA layers; nothing for bitfit/norm, which only choose)."""
    if spec["kind"] != "lora":
        return
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:
        raise ImportError('LoRA adapters need the peft library: pip install "tlkit[adapters]"') from err
    targets = lora_targets(backbone.model) if spec["targets"] == "auto" else list(spec["targets"])
    config = LoraConfig(r=int(spec["r"]), lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                        target_modules=targets)  # fmt: skip
    before = {name: stage for stage, names in backbone.stage_params().items() for name in names}
    try:
        inject_adapter_in_model(config, backbone.model)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(
            f"LoRA targets {targets} match no layer of {backbone.name}: {str(err).rstrip('.')}. Use targets: auto, or "
            "names of its linear or convolution layers (print(model.backbone) lists them)."
        ) from None
    _restage(backbone, before)


def lora_targets(model: nn.Module) -> list[str]:
    """The layers ``targets: auto`` adapts: the attention layers (torchvision's ``nn.MultiheadAttention``, whose
    fused input projection and output projection bypass their own ``forward``) and linear layers, and the
    ungrouped convolutions when those hold more weights than the linear layers (a CNN; peft adapts no depthwise
    convolution). A ViT gets attention and MLP, never its patch embedding; a CNN its convolutions."""
    modules = dict(model.named_modules())
    attention = [name for name, m in modules.items() if isinstance(m, nn.MultiheadAttention)]
    inside = tuple(f"{name}." for name in attention)
    linear = [name for name, m in modules.items() if isinstance(m, nn.Linear) and not name.startswith(inside)]
    convs = [name for name, m in modules.items() if isinstance(m, nn.Conv2d) and m.groups == 1]

    def weights(names: list[str]) -> int:
        return sum(modules[name].weight.numel() for name in names)

    cnn = not attention and weights(convs) > weights(linear)
    found = attention + linear + (convs if cnn else [])
    if not found:
        raise ValueError(f"{type(model).__name__} has no linear or ungrouped convolution layer for LoRA to adapt.")
    return found


def _restage(backbone: Backbone, before: dict[str, str]) -> None:
    """After peft renamed wrapped layers' parameters (``qkv.weight`` -> ``qkv.base_layer.weight``) and added its
    own (``qkv.lora_A.default.weight``), give each parameter the stage of the layer it belongs to, so freeze specs
    and layer decay still hold."""
    stage_of_module = {name.rpartition(".")[0]: stage for name, stage in before.items()}
    stages: dict[str, list[str]] = {stage: [] for stage in backbone.stages}
    for name, _ in backbone.named_parameters():
        module = _PEFT_PART.sub("", name).rpartition(".")[0]
        while module not in stage_of_module:  # LoRA of an attention layer: the layer's own parameters name it
            module = module.rpartition(".")[0]
        stages[stage_of_module[module]].append(name.removeprefix("model."))
    backbone._stage_params = stages


def adapter_frozen(backbone: Backbone, spec: dict[str, Any] | None) -> set[str]:
    """Names (as in ``backbone.named_parameters()``) of the parameters the adapter keeps frozen."""
    if spec is None:
        return set()
    names = [name for name, _ in backbone.named_parameters()]
    if spec["kind"] == "lora":
        return {name for name in names if ".lora_" not in name}
    if spec["kind"] == "bitfit":
        return {name for name in names if not name.endswith(".bias")}
    norms = {f"{prefix}.{n}" for prefix, m in backbone.named_modules() if isinstance(m, _NORMS)
             for n, _ in m.named_parameters(recurse=False)}  # fmt: skip
    if not norms:
        raise ValueError(f"adapter kind 'norm': {backbone.name} has no normalisation layer; try bitfit or lora.")
    return set(names) - norms


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a run with an adapter trained besides the pretrained weights: the adapter's and the head's tensors
    (buffers of trainable normalisation layers included)."""
    params = dict(model.named_parameters())
    trainable = {name for name, p in params.items() if p.requires_grad}
    keep = {name.rpartition(".")[0] for name in trainable}  # a trainable norm layer's running statistics too

    def wanted(name: str) -> bool:
        buffer_of_kept = name not in params and name.rpartition(".")[0] in keep
        return name in trainable or name.startswith("head.") or ".lora_" in name or buffer_of_kept

    return {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items() if wanted(name)}


def merge_adapter(module: nn.Module) -> nn.Module:
    """Fold every LoRA layer of ``module`` into its base layer and put the base layer back in its place (what
    peft's ``merge_and_unload`` does for a ``PeftModel``); in place, returns ``module``."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return module  # no peft: no LoRA layer can be in the model
    while layers := [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]:
        # outermost first: LoRA of an attention layer merges the LoRA of its output projection too
        outer = [(name, m) for name, m in layers if not any(name.startswith(f"{other}.") for other, _ in layers)]
        for name, layer in outer:
            layer.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, child, layer.get_base_layer())
    return module


class AdapterFile(L.Callback):
    """Writes :func:`adapter_state_dict` to ``adapter.safetensors`` beside the checkpoints after every training epoch
    (atomically; rank 0), and says its size at the end of fit. The full checkpoints stay what resuming reads."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            save_adapter(pl_module, self.path(trainer))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.path(trainer)
        if trainer.is_global_zero and path.is_file():
            rank_zero_info(f"Adapter and head ({path.stat().st_size / 1e6:.2f} MB): {path}")

    @staticmethod
    def path(trainer: L.Trainer) -> Path:
        folder = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
        return Path(folder) / "adapter.safetensors"


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write the adapter and head of ``model`` (:func:`adapter_state_dict`) to a safetensors file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(adapter_state_dict(model), str(tmp))
    return path


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter file into ``model`` (built with the same backbone, weights and ``adapter``); every tensor of
    the file must find its place."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    unknown = sorted(set(tensors) - set(model.state_dict()))
    if unknown:
        raise ValueError(f"{path} holds {unknown[:3]}... that this model lacks: build it with the adapter it was "
                         "trained with (the run's config.yaml has it).")  # fmt: skip
    model.load_state_dict(tensors, strict=False)
    return model
