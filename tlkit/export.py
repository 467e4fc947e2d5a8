"""Export a trained classifier with its preprocessing in front: ONNX, TorchScript or safetensors + JSON metadata.

At inference a BatchNorm is a fixed affine map per channel, so a convolution followed by one can absorb it:
``W' = W * g / sqrt(var + eps)``, ``b' = (b - mean) * g / sqrt(var + eps) + beta``. :func:`fold_batchnorm` finds
every such pair (and a BatchNorm after a concat of convolutions, per channel slice) by tracing the model with
``torch.fx`` (BatchNorms and convolutions kept as leaves, so timm's ``BatchNormAct2d`` counts as one) and falls back
to a walk of the module tree when a model cannot be traced. The export compares folded and unfolded logits and
refuses a fold that changes them by more than ``FOLD_RTOL * max |logits| + FOLD_ATOL``.

    tlkit export --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt --format onnx --fuse-bn
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, fx, nn

# torch has no public base classes of its BatchNorm and convolution layers: these private ones are what every
# dimension (and timm's BatchNormAct2d, Conv2dSame...) shares; timm's own layers check _BatchNorm the same way.
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from tlkit.adapters import merge_adapter
from tlkit.data.preprocess import build_preprocess
from tlkit.io import atomic_path
from tlkit.module import TransferClassifier, read_checkpoint

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "safetensors")
INPUTS = ("uint8", "float")
FOLD_RTOL = 1e-4  # float32 folds measured at <= 1e-5 relative (benchmarks/fold_bn_latency.py --coverage)
FOLD_ATOL = 1e-5
METADATA_KEY = "tlkit.export"
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}


# ------------------------------------------------------------------------------------------------- BN folding


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``model`` in eval mode with every BatchNorm that follows a convolution folded into it.

    Folded: a BatchNorm whose input is a convolution's output used nowhere else; one after a channel concat of such
    outputs (timm's ``MixedConv2d``), folded per channel slice; one after timm's ``CondConv2d``, whose experts take
    the scale (its routing weights need not sum to 1, so the shift stays, as a per-channel bias). Every BatchNorm
    left unfolded is logged (``logging.INFO``) with the reason.

    Args:
        model: any module (a timm or torchvision model, a backbone).

    Returns:
        The folded copy and the number of BatchNorms folded. A folded BatchNorm becomes ``Identity`` (timm's
        ``BatchNormAct2d`` becomes its dropout + activation).

    Example:
        >>> folded, count = fold_batchnorm(torchvision.models.resnet18().eval())
        >>> count
        20
    """
    model = copy.deepcopy(model).eval()
    plan = _conv_bn_pairs(model)
    for bn_name, conv_names in plan.items():
        bn = model.get_submodule(bn_name)
        scale, shift = _scale_shift(bn)
        leftover, start = torch.zeros_like(shift), 0
        for conv_name in conv_names:
            conv = model.get_submodule(conv_name)
            channels = slice(start, start + conv.out_channels)
            leftover[channels] = _fold(conv, scale[channels], shift[channels])
            start = channels.stop
        _replace(model, bn_name, _after_norm(bn, leftover))
    return model, len(plan)


class _LeafTracer(fx.Tracer):
    """Keeps convolutions, BatchNorms and timm's untraceable modules as single call_module nodes."""

    def __init__(self):
        from timm.layers import get_notrace_functions, get_notrace_modules

        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self.notrace = tuple(get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (_BatchNorm, _ConvNd, *self.notrace)) or super().is_leaf_module(m, qualname)


def _conv_bn_pairs(model: nn.Module) -> dict[str, list[str]]:
    """BatchNorm name -> the convolutions that make its whole input, in channel order, each used nowhere else."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception as err:  # data-dependent control flow etc.: fall back to the module order
        log.info("torch.fx cannot trace %s (%s); folding Conv+BN pairs found in module order.", type(model), err)
        return _sibling_pairs(model)
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    plan = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
            continue
        reason = _unfoldable(modules[node.target]) or ("it is called more than once" if calls[node.target] > 1 else "")
        convs = _producers(node.args[0], modules, calls) if node.args and not reason else None
        if convs and _covers(convs, modules, modules[node.target].num_features):
            plan[node.target] = convs
        else:
            log.info("BatchNorm %s not folded: %s.", node.target, reason or _NOT_A_CONV)
    return plan


_NOT_A_CONV = "its input is not the output of a convolution (or a concat of them) that is used nowhere else"


def _producers(src: Any, modules: dict[str, nn.Module], calls: Counter) -> list[str] | None:
    """The convolutions whose outputs are all of ``src`` in channel order, or None where one is not foldable."""
    if not isinstance(src, fx.Node) or len(src.users) != 1:
        return None
    if src.op == "call_module":
        ok = calls[src.target] == 1 and _foldable_conv(modules[src.target], src.target)
        return [src.target] if ok else None
    if src.op == "call_function" and src.target is torch.cat and _concat_dim(src) == 1:
        parts = [_producers(part, modules, calls) for part in src.args[0]]
        return None if any(p is None for p in parts) else [name for part in parts for name in part]
    return None


def _covers(convs: list[str], modules: dict[str, nn.Module], channels: int) -> bool:
    """Each convolution once (``cat([y, y])`` would fold twice into one), their channels exactly the BatchNorm's."""
    return len(set(convs)) == len(convs) and sum(modules[name].out_channels for name in convs) == channels


def _concat_dim(node: fx.Node) -> Any:
    return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)


def _sibling_pairs(model: nn.Module) -> dict[str, list[str]]:
    """A convolution immediately followed, among its siblings, by a BatchNorm of matching width."""
    plan = {}
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        prefix = f"{parent_name}." if parent_name else ""
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
            if isinstance(bn, _BatchNorm) and not _unfoldable(bn) and _foldable_conv(conv, prefix + conv_name):
                if bn.num_features == conv.out_channels:
                    plan[prefix + bn_name] = [prefix + conv_name]
    return plan


def _linear_conv_forwards() -> set:
    from timm.layers import CondConv2d, Conv2dSame
    from timm.layers.conv2d_same import Conv2dSameExport

    return {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, Conv2dSame.forward, Conv2dSameExport.forward,
            CondConv2d.forward}  # fmt: skip


def _foldable_conv(m: nn.Module, name: str) -> bool:
    """A convolution whose output is linear in its weight and bias per output channel. Not a weight-standardising
    one (timm's ``StdConv2d``): it normalises the folded scale away."""
    if not isinstance(m, _ConvNd) and type(m).__name__ != "CondConv2d":
        return False
    if getattr(m, "transposed", False) or type(m).forward not in _linear_conv_forwards():
        log.info("%s (%s) not folded into: its forward is not a plain convolution.", name, type(m).__name__)
        return False
    return True


def _unfoldable(bn: _BatchNorm) -> str:
    """Why ``bn`` cannot be folded into anything, or ``""``."""
    if not bn.track_running_stats or bn.running_mean is None:
        return "it has no running statistics (it normalises with each batch's own)"
    return ""


def _scale_shift(bn: _BatchNorm) -> tuple[Tensor, Tensor]:
    """The per-channel ``y = scale * x + shift`` of ``bn`` in eval mode, in float64 (the folded weights round once)."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.affine:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale + (bn.bias.double() if bn.affine else 0)
    return scale, shift


@torch.no_grad()
def _fold(conv: nn.Module, scale: Tensor, shift: Tensor) -> Tensor:
    """Folds ``scale`` and ``shift`` into ``conv``'s output channels; returns the part of the shift it cannot take."""
    if not isinstance(conv, _ConvNd):  # CondConv2d: weight (experts, out * in * k * k), bias (experts, out)
        experts = conv.weight.shape[0]
        conv.weight.copy_((conv.weight.double().view(experts, len(scale), -1) * scale[:, None]).view_as(conv.weight))
        if conv.bias is not None:
            conv.bias.copy_(conv.bias.double() * scale)
        # The experts' biases are mixed with sigmoid routing weights whose sum varies per sample: a shift put into
        # each expert's bias would be scaled by that sum, so it stays outside (the BatchNorm's add, without its mul).
        return shift.to(conv.weight.dtype)
    weight = conv.weight.double() * scale.view(-1, *[1] * (conv.weight.ndim - 1))
    bias = conv.bias.double() * scale + shift if conv.bias is not None else shift
    conv.weight.copy_(weight.to(conv.weight.dtype))
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    return torch.zeros_like(shift)


class _ChannelShift(nn.Module):
    """Adds a per-channel constant: what is left of a BatchNorm folded into a convolution that cannot take it."""

    def __init__(self, shift: Tensor):
        super().__init__()
        self.register_buffer("shift", shift.float())

    def forward(self, x: Tensor) -> Tensor:
        return x + self.shift.view(-1, *[1] * (x.ndim - 2)).to(x.dtype)


def _after_norm(bn: nn.Module, leftover: Tensor) -> nn.Module:
    """What is left of a folded norm layer: nothing, an unabsorbed shift, and timm's BatchNormAct dropout + act."""
    parts = [_ChannelShift(leftover)] if leftover.any() else []
    if hasattr(bn, "act"):
        parts += [getattr(bn, "drop", nn.Identity()), bn.act]
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts) if parts else nn.Identity()


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# ---------------------------------------------------------------------------------------- the exported model


class InferenceModel(nn.Module):
    """Images → preprocessing → backbone → head: ``uint8`` (0..255) or float [0, 1] NCHW in, logits out.

    Args:
        preprocess: the data module's normalisation or whitening (on [0, 1] images).
        backbone: the (possibly folded) backbone.
        head: the classifier head.
        input: ``"uint8"`` or ``"float"``: what the exported graph takes.
        return_features: also return the pooled backbone features: ``(logits, features)``.
    """

    def __init__(self, preprocess: nn.Module, backbone: nn.Module, head: nn.Module, input: str = "uint8",
                 return_features: bool = False):  # fmt: skip
        super().__init__()
        if input not in INPUTS:
            raise ValueError(f"Unknown input={input!r}; choose one of {INPUTS}.")
        self.preprocess, self.backbone, self.head = preprocess, backbone, head
        self.uint8 = input == "uint8"
        self.return_features = return_features

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        x = images.float() / 255.0 if self.uint8 else images
        features = self.backbone(self.preprocess(x))
        logits = self.head(features)
        return (logits, features) if self.return_features else logits


def load_checkpoint(path: str | os.PathLike) -> tuple[TransferClassifier, nn.Module, dict[str, Any]]:
    """A TransferClassifier, its data module's preprocessing (fitted statistics included) and the preprocessing spec
    (``kind``, ``mean``, ``std``, ``scope``, ``eps``, ``image_size``: the size it was trained at) from a checkpoint."""
    path = Path(path)
    checkpoint = read_checkpoint(path)  # weights_only=True, and a clear error for a bad file, before anything else
    model = TransferClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()
    hp = checkpoint.get("datamodule_hyper_parameters") or {}
    state = _datamodule_state(checkpoint, path).get("preprocess")
    spec = _preprocess_spec(hp, model.data_config)
    if state is None:
        log.warning("No data module state in %s: using the backbone's mean/std.", path)
        spec |= {"kind": "pretrained"}
        return model, build_preprocess("pretrained", mean=spec["mean"], std=spec["std"]), spec
    return model, _build_preprocess(spec, state), spec


def _datamodule_state(checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
    """The data module's saved state. Lightning keeps it under the data module's class name, so a subclass of
    ImageDataModule saves it under its own name: look for the entry that holds a ``preprocess`` state."""
    found = {k: v for k, v in checkpoint.items() if isinstance(v, dict) and isinstance(v.get("preprocess"), dict)}
    if len(found) > 1:
        raise ValueError(f"{path} holds several data module states ({', '.join(found)}); expected one.")
    return next(iter(found.values()), {})


def _preprocess_spec(hp: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    size = hp.get("image_size") or config["input_size"][-1]
    return dict(kind=hp.get("preprocess", "pretrained"), mean=list(hp.get("mean") or config["mean"]),
                std=list(hp.get("std") or config["std"]), scope=hp.get("whiten_scope", "channel"),
                eps=hp.get("whiten_eps"), image_size=int(size))  # fmt: skip


def _build_preprocess(spec: dict[str, Any], state: dict[str, Tensor]) -> nn.Module:
    module = build_preprocess(spec["kind"], mean=spec["mean"], std=spec["std"], scope=spec["scope"],
                              eps=spec["eps"], image_size=spec["image_size"])  # fmt: skip
    module.load_state_dict(state)
    return module.eval()


# --------------------------------------------------------------------------------------------------- export


def export(
    ckpt_path: str | os.PathLike,
    format: str = "onnx",
    out: str | os.PathLike | None = None,
    fuse_bn: bool = False,
    input: str = "uint8",
    return_features: bool = False,
    opset: int = 17,
) -> Path:
    """Export a checkpoint to ``format`` with the data module's preprocessing in front; returns the file written.

    Args:
        ckpt_path: a ``.ckpt`` written by ``tlkit fit``.
        format: ``"onnx"``, ``"torchscript"`` or ``"safetensors"`` (weights + JSON metadata, reloadable with
            :func:`load_safetensors` into a TransferClassifier, without pickle).
        out: output path (default: next to the checkpoint, with the format's suffix).
        fuse_bn: fold BatchNorms into the convolutions before them (ONNX/TorchScript; safetensors keeps the
            trainable layout). The folded and unfolded outputs are compared and the difference printed.
        input: ``"uint8"`` (0..255) or ``"float"`` ([0, 1]) NCHW images.
        return_features: the graph returns ``(logits, features)``.
        opset: ONNX opset.
    """
    if format not in FORMATS:
        raise ValueError(f"Unknown format={format!r}; choose one of {FORMATS}.")
    model, preprocess, spec = load_checkpoint(ckpt_path)
    out = Path(out) if out else Path(ckpt_path).with_suffix(SUFFIXES[format])
    meta = export_metadata(model, spec, input, return_features, ckpt_path)
    if format == "safetensors":
        if fuse_bn:
            print("safetensors keeps the trainable layout (BatchNorm unfolded); fold at load time if needed.")
        return save_safetensors(model, preprocess, meta, out)
    backbone = merge_adapter(model.backbone)  # LoRA folded into the weights it adapts: a plain graph
    net = InferenceModel(preprocess, backbone, model.head, input, return_features).eval()
    example = example_input(meta["input_size"], input)
    if fuse_bn:
        net = fuse(net, example)
    writer = _write_onnx if format == "onnx" else _write_torchscript
    writer(net, example, out, meta, opset)
    print(f"Exported {format} to {out} (input {input} {meta['input_size']}, {len(meta['class_names'])} classes)")
    return out


def example_input(input_size: list[int], input: str, batch: int = 2) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, *input_size), dtype=torch.uint8, generator=generator)
    return images if input == "uint8" else images.float() / 255


def fuse(net: InferenceModel, example: Tensor) -> InferenceModel:
    """Fold the backbone's BatchNorms; check (and print) that the logits stay within the fold tolerance.

    The check is relative to the output's scale, ``max |diff| <= FOLD_RTOL * max |logits| + FOLD_ATOL``: float32
    rounding grows with the logits, and a fixed bound refused correct folds of models with large logits.
    """
    folded_backbone, count = fold_batchnorm(net.backbone)
    input = "uint8" if net.uint8 else "float"
    folded = InferenceModel(net.preprocess, folded_backbone, net.head, input=input, return_features=net.return_features)
    folded.train(net.training)
    with torch.no_grad():
        before, after = _first(net(example)), _first(folded(example))
    diff, bound = fold_error(before, after)
    print(f"Folded {count} BatchNorm layers into convolutions: max abs diff of the logits {diff:.2e} "
          f"(max abs logit {before.abs().max().item():.2e}, tolerance {bound:.2e})")  # fmt: skip
    if not diff <= bound:
        raise RuntimeError(f"Folding BatchNorm changed the logits by {diff:.2e} (> {bound:.2e} = {FOLD_RTOL:g} * "
                           f"max |logit| + {FOLD_ATOL:g}); export without --fuse-bn and report the model.")  # fmt: skip
    return folded


def fold_error(before: Tensor, after: Tensor) -> tuple[float, float]:
    """``max |after - before|`` and the bound it must not exceed: ``FOLD_RTOL * max |before| + FOLD_ATOL``."""
    diff = (before - after).abs().max().item()
    return diff, FOLD_RTOL * before.abs().max().item() + FOLD_ATOL


def _first(output: Tensor | tuple[Tensor, ...]) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def export_metadata(model: TransferClassifier, spec: dict[str, Any], input: str, return_features: bool,
                    source: Any) -> dict[str, Any]:  # fmt: skip
    """What a consumer of an exported model needs: classes, input format, sizes, and how to rebuild the model."""
    hp = dict(model.hparams)
    hp["pretrained"] = False  # the weights are in the file
    size = spec["image_size"]
    return {
        "preprocess": spec,
        "class_names": model.class_names,
        # Multi-label: a class is predicted where sigmoid(logit) >= its threshold (tuned on validation); else argmax.
        "multilabel": bool(hp.get("multilabel")),
        "thresholds": model.thresholds.tolist() if hp.get("multilabel") else None,
        "input": input,
        "input_size": [3, size, size],
        "outputs": ["logits", "features"] if return_features else ["logits"],
        "hparams": hp,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in model.data_config.items()},
        "source": str(source),
    }


def _write_torchscript(net: nn.Module, example: Tensor, out: Path, meta: dict, opset: int) -> None:
    traced = torch.jit.trace(net, example)
    with atomic_path(out) as tmp:
        torch.jit.save(traced, str(tmp), _extra_files={"tlkit.json": json.dumps(meta)})


class FixedAdaptiveAvgPool2d(nn.Module):
    """``AdaptiveAvgPool2d`` for one known input size, as two averaging matrices: ``rows @ x @ cols.T``.

    torch's ONNX exporter refuses adaptive average pooling whose output size does not divide the input size (VGG's
    7x7 pool on the 1x1 map of a 32-px image); the same averages as matrix products export everywhere.
    """

    def __init__(self, in_size: tuple[int, int], out_size: tuple[int, int]):
        super().__init__()
        self.register_buffer("rows", _averaging_matrix(in_size[0], out_size[0]), persistent=False)
        self.register_buffer("cols", _averaging_matrix(in_size[1], out_size[1]), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.rows @ x @ self.cols.T


def _averaging_matrix(n_in: int, n_out: int) -> Tensor:
    """Row ``i`` averages inputs ``floor(i * n_in / n_out)`` to ``ceil((i + 1) * n_in / n_out)`` (exclusive), the
    windows of torch's adaptive pooling."""
    matrix = torch.zeros(n_out, n_in)
    for i in range(n_out):
        start, stop = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        matrix[i, start:stop] = 1 / (stop - start)
    return matrix


def exportable_pools(net: nn.Module, example: Tensor) -> nn.Module:
    """``net`` with every ``AdaptiveAvgPool2d`` whose output size does not divide its input size (at ``example``'s
    size) replaced by :class:`FixedAdaptiveAvgPool2d`; ``net`` itself if there is none (a copy otherwise)."""
    sizes: dict[str, tuple[int, int]] = {}

    def note_size(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:  # None: a returned value replaces the input
            sizes.setdefault(name, tuple(args[0].shape[-2:]))

        return hook

    pools = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    hooks = [m.register_forward_pre_hook(note_size(name)) for name, m in pools]
    try:
        with torch.no_grad():
            net(example)
    finally:
        for hook in hooks:
            hook.remove()
    fixed = {}
    for name, in_size in sizes.items():
        out = net.get_submodule(name).output_size
        out = (
            (out, out)
            if isinstance(out, int)
            else tuple(i if o is None else o for o, i in zip(out, in_size, strict=True))
        )
        if any(i % o for i, o in zip(in_size, out, strict=True)):
            fixed[name] = FixedAdaptiveAvgPool2d(in_size, out)
    if not fixed or "" in fixed:  # none to replace, or net is the pool itself
        return fixed.get("", net)
    net = copy.deepcopy(net)
    for name, module in fixed.items():
        _replace(net, name, module)
    return net


def _write_onnx(net: nn.Module, example: Tensor, out: Path, meta: dict, opset: int) -> None:
    with atomic_path(out) as tmp:  # removed if the exporter fails
        _export_onnx(net, example, tmp, meta, opset)


def _export_onnx(net: nn.Module, example: Tensor, path: Path, meta: dict, opset: int) -> None:
    import onnx

    outputs = meta["outputs"]
    axes = {name: {0: "batch"} for name in ["images", *outputs]}
    try:
        torch.onnx.export(
            exportable_pools(net, example), (example,), str(path), dynamo=False, opset_version=opset,
            input_names=["images"], output_names=outputs, dynamic_axes=axes,
        )  # fmt: skip
    except Exception as err:  # the exporter's errors have no common base class (SymbolicValueError, TypeError...)
        backbone = meta.get("hparams", {}).get("backbone", type(net).__name__)
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise RuntimeError(
            f"torch's ONNX exporter (opset {opset}) cannot export {backbone!r}: {type(err).__name__}: {first_line} "
            "Export it as torchscript or safetensors instead (--format torchscript|safetensors)."
        ) from err
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(meta), "class_names": json.dumps(meta["class_names"])})
    onnx.save(proto, str(path))


def save_safetensors(model: TransferClassifier, preprocess: nn.Module, meta: dict, out: Path) -> Path:
    """Model weights and preprocessing buffers (``preprocess.*``) in one safetensors file, metadata as JSON."""
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors |= {f"preprocess.{k}": v.contiguous() for k, v in preprocess.state_dict().items()}
    with atomic_path(out) as tmp:
        save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(meta)})
    print(f"Exported safetensors to {out} ({len(meta['class_names'])} classes)")
    return out


def load_safetensors(path: str | os.PathLike) -> tuple[TransferClassifier, nn.Module]:
    """Rebuild the TransferClassifier and its preprocessing from :func:`save_safetensors` output (no pickle)."""
    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {})[METADATA_KEY])
    tensors = load_file(path)
    model = TransferClassifier(**meta["hparams"]).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    model.backbone.data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["data_config"].items()}
    state = {k.removeprefix("preprocess."): v for k, v in tensors.items() if k.startswith("preprocess.")}
    return model, _build_preprocess(meta["preprocess"], state)
