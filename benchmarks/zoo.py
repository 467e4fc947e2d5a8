"""The zoo sweep: does tlkit handle *any* backbone? Every timm architecture and every torchvision classifier, checked.

For each model (random init, the smallest input its config allows) it runs five checks through tlkit's public API:

1. ``build``/``width``/``logits``: ``TransferClassifier(num_classes=3)`` builds (``create_backbone`` inside) with the
   data config that ``backbone_data_config`` gives before the build (what the CLI links to the data), ``num_features``
   equals the width of the backbone's output, and the logits are ``(N, 3)``;
2. ``freeze_backbone``/``freeze_stages1``: the freeze spec leaves exactly the intended parameters trainable, and one
   optimiser step (tlkit's own parameter groups and optimizer) changes only those; frozen BatchNorm statistics stay;
3. ``stages``: every backbone parameter is in exactly one stage, stage names are unique, and the stages run in forward
   order (the first call of a stage's leaf modules, in that order);
4. ``features``: ``extract_features`` equals the model's own pre-logits (timm ``forward_head(pre_logits=True)``; for
   torchvision the input of the final Linear of the full model with the same weights) within 1e-5;
5. ``onnx`` (models with BatchNorm): the BatchNorm-folded model exported to ONNX gives the PyTorch model's logits in
   onnxruntime (relative tolerance). It does not apply (``n/a``, listed with the reason) where torch's ONNX exporter
   cannot export the plain model either, or where the random-init model is numerically chaotic (its own float32 and
   float64 logits differ by more than the tolerance, so no comparison can judge a fold).

Each check records ``pass``, ``fail`` (the exception's last line) or ``n/a``; each model its time and peak RSS. Models
run in long-lived worker processes (importing torch + timm costs seconds), one model at a time each; a worker that
runs past ``--timeout``, grows past ``--max-rss-gb`` or crashes is killed, the model recorded as such, and a fresh
worker started. Results are appended to a JSONL file as they come, so a sweep resumes where it stopped.

    nice -n 10 python benchmarks/zoo.py --filter 'resnet*' --workers 2
    nohup nice -n 15 python benchmarks/zoo.py --workers 2 > zoo.log 2>&1 &
    python benchmarks/zoo.py --report docs/zoo.md            # rebuild the report from the results, no run
    python benchmarks/zoo.py --redo memory --workers 1 --max-rss-gb 18   # the big ones again, alone
    python benchmarks/zoo.py --redo memory,timeout --workers 1 --max-rss-gb 19 --timeout 1800 --batch 1  # giants

The optimiser step applies each parameter's update as soon as backward has its gradient and frees it, so a model's
peak memory is its weights plus one pass's activations: what lets a 2-billion-parameter model be checked in 19 GB.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fnmatch
import gc
import io
import json
import multiprocessing as mp
import os
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "benchmarks" / "zoo_results.jsonl"
DEFAULT_REPORT = ROOT / "docs" / "zoo.md"
TORCHVISION = "torchvision/"
CHECKS = ("build", "width", "logits", "freeze_backbone", "freeze_stages1", "stages", "features", "onnx")
PASS, FAIL, NA = "pass", "fail", "n/a"
BATCH = 2
NUM_CLASSES = 3
FEATURE_TOLERANCE = 1e-5  # |extracted - pre-logits| <= tol * (1 + |pre-logits|)
ONNX_TOLERANCE = 1e-4  # max |onnx - pytorch| <= tol * max(1, max |pytorch|)
CANDIDATE_SIZES = (32, 48, 64, 96, 128, 160, 192, 224, 256, 288, 320, 384)
REASON_CHARS = 240
WALL_FACTOR = 5  # a model is also stopped after this many times --timeout of wall time, however loaded the machine
# Outcomes that say the model could not be checked here, not that tlkit failed it (the brief's "valid reasons").
EXCLUDED = ("timeout", "memory", "timm")


# ------------------------------------------------------------------------------------------------- model names


def all_models() -> list[str]:
    """Every timm architecture, then every torchvision classification model as ``torchvision/<name>``."""
    import timm
    import torchvision

    return timm.list_models() + [TORCHVISION + n for n in torchvision.models.list_models(module=torchvision.models)]


def family(name: str) -> str:
    """Name prefix before the first ``_`` or digit run (``resnet18`` → ``resnet``); torchvision's keep their prefix."""
    bare = name.removeprefix(TORCHVISION)
    head = re.split(r"[_\d]", bare, maxsplit=1)[0] or bare
    return TORCHVISION + head if name.startswith(TORCHVISION) else head


def source(name: str) -> str:
    return "torchvision" if name.startswith(TORCHVISION) else "timm"


# ------------------------------------------------------------------------------------------------- the checks


class CheckFailed(AssertionError):
    """A check's condition does not hold (as opposed to an exception raised by tlkit, timm or torch)."""


class NotApplicable(Exception):
    """The check does not apply to this model (e.g. ONNX folding without BatchNorm)."""


def _reason(err: BaseException) -> str:
    """The exception's last line, trimmed: enough to group failures and to start debugging."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    line = (
        lines[0] if len(lines) > 5 else lines[-1] if lines else ""
    )  # a long message is a dump (a graph): its head says why
    text = f"{type(err).__name__}: {line}" if line else type(err).__name__
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


def _run(checks: dict[str, dict[str, str]], name: str, check: Callable[[], str | None]) -> bool:
    """Run one check and record ``pass`` (with an optional note), ``fail`` (why) or ``n/a`` (why); True if passed."""
    try:
        note = check()
    except NotApplicable as err:
        checks[name] = {"status": NA, "reason": str(err)}
        return False
    except Exception as err:  # every failure is a result to record, whatever raised it
        checks[name] = {"status": FAIL, "reason": _reason(err)}
        return False
    checks[name] = {"status": PASS, **({"note": note} if note else {})}
    return True


def _size_candidates(backbone: Any, name: str) -> list[int]:
    """Input sizes to try, smallest first, from the model's own config (timm ``pretrained_cfg``, torchvision weights
    ``min_size`` up to the backbone's input size); a fixed-size model (ViTs & co.) gets only its ``input_size``."""
    import timm
    import torchvision

    if name.startswith(TORCHVISION):
        arch = name.removeprefix(TORCHVISION)
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        default = backbone.data_config["input_size"][-1]  # built without weights: vit_h_14 is 224 px, its weights 518
        smallest = min(max(weights.meta.get("min_size", (1, 1))), default)
        extra = {smallest} if smallest > 1 else set()  # (1, 1) means "anything": start at 32 px as for timm
        return sorted({s for s in (*CANDIDATE_SIZES, *extra, default) if smallest <= s <= default})
    cfg = timm.models.get_pretrained_cfg(name) or {}
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    default = cfg.get("input_size", (3, 224, 224))[-1]
    if cfg.get("fixed_input_size"):
        return [default]
    smallest = cfg.get("min_input_size", (3, 1, 1))[-1]
    sizes = {s for s in CANDIDATE_SIZES if smallest <= s <= default}
    sizes |= {default, cfg.get("test_input_size", (3, default, default))[-1]} | ({smallest} if smallest > 1 else set())
    return sorted(sizes)


def pick_input_size(backbone: Any, name: str) -> tuple[int, Any, Any]:
    """The smallest candidate size at which the backbone runs a batch of ``BATCH`` (eval mode, no grad), that batch
    and the backbone's output for it (the width check reads it: one forward pass less, up to minutes on a giant
    model)."""
    import torch

    errors = []
    for size in _size_candidates(backbone, name):
        x = torch.rand(BATCH, 3, size, size)
        try:
            with torch.no_grad():
                return size, x, backbone.eval()(x)
        except Exception as err:  # this size does not fit the model: try the next one
            errors.append(f"{size}px: {_reason(err)}")
    raise RuntimeError(f"no input size works for {name}; tried " + "; ".join(errors[-2:]))


def _timm_runs_alone(name: str) -> str | None:
    """If plain timm cannot build and run ``name`` on CPU either, why (then it is not tlkit's failure)."""
    import timm
    import torch

    try:
        model = timm.create_model(name, pretrained=False).eval()
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        with torch.no_grad():
            x = torch.rand(BATCH, 3, size, size)
            model(x)
            model.forward_head(model.forward_features(x))  # timm's multimodal encoders have no classifier head
    except Exception as err:
        return _reason(err)
    return None


def _frozen_bn_buffers(module: Any) -> set[str]:
    """State-dict keys of the buffers (running mean/var, batch count) of BatchNorm layers whose parameters are all
    frozen: tlkit must keep those layers in eval mode, so these must not change in a training step."""
    from torch.nn.modules.batchnorm import _BatchNorm  # the base class of every BatchNorm: nothing public covers all

    keys = set()
    for prefix, m in module.named_modules():
        params = list(m.parameters(recurse=False))
        if isinstance(m, _BatchNorm) and params and not any(p.requires_grad for p in params):
            keys |= {f"{prefix}.{b}" for b, _ in m.named_buffers(recurse=False)}
    return keys


def _optimizer_step(clf: Any, x: Any) -> None:
    """One training step with tlkit's own parameter groups and optimizer (what ``configure_optimizers`` builds,
    without the schedule, which needs a Trainer), each parameter stepped as soon as backward has its gradient."""
    import torch
    import torch.nn.functional as F

    from tlkit.optim import create_optimizer, param_groups

    # One optimizer per parameter (with its group's settings), stepped by a hook the moment backward has accumulated
    # that parameter's gradient, which is then freed: the same step as one optimizer over all groups, but at most a
    # few gradients exist at once instead of a copy of every trainable tensor (under stages:1 nearly the whole model,
    # which decided whether a giant model fits). PyTorch's own recipe: "optimizer step in backward". No momentum: a
    # first step with momentum is this same step, and its buffers would be one more copy.
    hooks = []
    for group in param_groups(clf.named_parameters(), weight_decay=1e-2, base_lr=0.1):
        for param in group["params"]:
            optimizer = create_optimizer([{**group, "params": [param]}], "sgd", lr=0.1, momentum=0.0)

            def step(_param: Any, optimizer: Any = optimizer) -> None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            hooks.append(param.register_post_accumulate_grad_hook(step))
    clf.train()
    try:
        F.cross_entropy(clf(x), torch.arange(len(x)) % NUM_CLASSES).backward()
    finally:
        for hook in hooks:
            hook.remove()


def check_freeze(clf: Any, spec: str, expected_trainable: set[str], x: Any) -> str:
    """``spec`` leaves exactly ``expected_trainable`` trainable, and one step changes only trainable parameters and
    the statistics of BatchNorm layers that train; raises :class:`CheckFailed` naming the offending tensors."""
    clf.set_freeze(spec)
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    if trainable != expected_trainable:
        extra, missing = sorted(trainable - expected_trainable), sorted(expected_trainable - trainable)
        raise CheckFailed(f"{spec}: trainable but should be frozen {extra[:3]}, frozen but should train {missing[:3]}")
    frozen = {n for n, _ in clf.named_parameters()} - trainable
    head = {n for n in trainable if n.startswith("head.")}
    # Digests of what must stay (frozen parameters, frozen BatchNorm statistics) and of the head, which must move;
    # digests, not copies: a copy of a frozen giant backbone is as large as the model itself.
    watched = frozen | _frozen_bn_buffers(clf) | head
    before = {k: fingerprint(v) for k, v in clf.state_dict().items() if k in watched}
    _optimizer_step(clf, x)
    after = clf.state_dict()
    changed = {k for k in before if fingerprint(after[k]) != before[k]}
    clf.zero_grad(set_to_none=True)
    if frozen_changed := sorted(changed - head):
        raise CheckFailed(f"{spec}: one step changed frozen tensors {frozen_changed[:3]} ({len(frozen_changed)})")
    if not changed & head:
        raise CheckFailed(f"{spec}: one step did not change the head")
    return f"{len(trainable)} trainable tensors, {len(frozen)} frozen unchanged"


def fingerprint(tensor: Any) -> bytes:
    """A digest of a tensor's shape, dtype and bytes: equal digests mean a bit-identical tensor (NaNs included)."""
    import hashlib

    import torch

    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    digest = hashlib.blake2b(f"{tuple(tensor.shape)} {tensor.dtype}".encode())
    digest.update(data)  # the tensor's memory as it is: no copy
    return digest.digest()


def expected_stages1_trainable(clf: Any) -> set[str]:
    """Under ``stages:1`` everything but the stem and the first stage trains; the model's first convolution (timm's
    ``pretrained_cfg['first_conv']``) must be in the stem, else the "stem" is not the model's input end."""
    stages = clf.backbone.stage_params()
    if len(stages) < 3:
        raise NotApplicable(f"only {len(stages)} stages ({list(stages)}): stages:1 would freeze the whole backbone")
    frozen = {f"backbone.{n}" for names in list(stages.values())[:2] for n in names}
    first_conv = getattr(clf.backbone.model, "pretrained_cfg", {}).get("first_conv")
    if isinstance(first_conv, str) and f"backbone.model.{first_conv}.weight" in dict(clf.named_parameters()):
        if f"backbone.model.{first_conv}.weight" not in frozen:
            raise CheckFailed(f"stages:1 leaves the first convolution {first_conv!r} trainable; stages {list(stages)}")
    return {n for n, _ in clf.named_parameters()} - frozen


def check_stages(backbone: Any, x: Any) -> str:
    """Every parameter in exactly one stage, unique names, stages in forward order."""
    stage_params = backbone.stage_params()
    names = list(stage_params)
    if len(set(names)) != len(names) or names[0] != "stem":
        raise CheckFailed(f"stage names not unique or first is not 'stem': {names}")
    owner: dict[str, list[str]] = defaultdict(list)
    for stage, params in stage_params.items():
        for p in params:
            owner[p].append(stage)
    all_params = [n for n, _ in backbone.named_parameters()]
    twice = [p for p, s in owner.items() if len(s) > 1]
    missing = [p for p in all_params if p not in owner]
    unknown = [p for p in owner if p not in set(all_params)]
    if twice or missing or unknown:
        raise CheckFailed(
            f"partition: in several stages {twice[:3]}, in none {missing[:3]}, not parameters {unknown[:3]}"
        )
    order = _forward_order(backbone, x)
    # A container is called before everything inside it: the parameters it owns directly (CoaT's cls_token2 on the
    # root module) say nothing of when they are used, so only modules without children place a stage in the order.
    containers = {n for n, m in backbone.named_modules() if any(True for _ in m.children())}
    firsts = {}
    for stage, modules in _stage_modules(stage_params).items():
        called = [order[m] for m in modules if m in order and m not in containers]
        if called:  # a stage whose modules never run (an unused branch) has no place in the order
            firsts[stage] = min(called)
    calls = sorted(firsts, key=firsts.get)
    listed = [s for s in names if s in calls]
    leaves = {
        stage: [m for m in modules if m not in containers] for stage, modules in _stage_modules(stage_params).items()
    }
    for i, stage in enumerate(listed):
        # A stage listed later may run earlier when nothing listed before it uses its output: EfficientViM's
        # per-stage norms feed only its multi-scale head (timm lists them last), so freezing a prefix of stages
        # still freezes the input side. Where an earlier-listed stage does use it, the listing is wrong.
        for later in (s for s in listed[i + 1 :] if firsts[s] < firsts[stage]):
            if _feeds(backbone, x, leaves[later], leaves[stage]):
                raise CheckFailed(
                    f"stages run in the order {calls}, listed as {listed}: {stage!r} uses the output of {later!r}, "
                    "which is listed after it"
                )
    if backbone.stages != names:
        raise CheckFailed(f"Backbone.stages {backbone.stages} differ from the keys of stage_params() {names}")
    return f"{len(names)} stages"


def _stage_modules(stage_params: dict[str, list[str]]) -> dict[str, list[str]]:
    """Module names (as in ``backbone.named_modules()``) that directly own each stage's parameters."""
    return {stage: sorted({p.rpartition(".")[0] for p in params}) for stage, params in stage_params.items()}


def _feeds(backbone: Any, x: Any, producers: list[str], consumers: list[str]) -> bool:
    """Whether an output of one of the ``producers`` modules reaches an input of one of the ``consumers`` during one
    forward pass (through any operations between them: the autograd graph links them)."""
    import torch

    modules = dict(backbone.named_modules())
    produced: set[Any] = set()
    reached = False

    def tensors(value: Any) -> list[Any]:
        if isinstance(value, torch.Tensor):
            return [value]
        if isinstance(value, list | tuple):
            return [t for v in value for t in tensors(v)]
        if isinstance(value, dict):
            return [t for v in value.values() for t in tensors(v)]
        return []

    def note_output(_module: Any, _args: Any, output: Any) -> None:
        produced.update(t.grad_fn for t in tensors(output) if t.grad_fn is not None)

    def check_input(_module: Any, args: Any) -> None:
        nonlocal reached
        if reached or not produced:
            return
        todo = [t.grad_fn for t in tensors(args) if t.grad_fn is not None]
        seen: set[Any] = set()
        while todo:
            node = todo.pop()
            if node in produced:
                reached = True
                return
            if node not in seen:
                seen.add(node)
                todo.extend(next_node for next_node, _ in node.next_functions if next_node is not None)

    handles = [modules[n].register_forward_hook(note_output) for n in producers]
    handles += [modules[n].register_forward_pre_hook(check_input) for n in consumers]
    try:
        with torch.enable_grad():
            backbone.eval()(x.clone().requires_grad_(True))
    finally:
        for h in handles:
            h.remove()
    return reached


def _forward_order(backbone: Any, x: Any) -> dict[str, int]:
    """Index of the first call of each module during one forward pass."""
    import torch

    order: dict[str, int] = {}

    def note_call(name: str) -> Callable[..., None]:
        def hook(_module: Any, _args: Any) -> None:  # returns None: a pre-hook's return value replaces the input
            order.setdefault(name, len(order))

        return hook

    handles = [m.register_forward_pre_hook(note_call(n)) for n, m in backbone.named_modules()]
    try:
        with torch.no_grad():
            backbone.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return order


def reference_pre_logits(backbone: Any, x: Any) -> Any:
    """The model's own pre-logits with the backbone's weights: timm ``forward_head(pre_logits=True)``; torchvision:
    the input of the final Linear of a full model loaded with the same weights."""
    import torch
    import torchvision

    from tlkit.backbones import _without_aux_logits

    with torch.no_grad():
        if not backbone.name.startswith(TORCHVISION):
            model = backbone.model.eval()
            return model.forward_head(model.forward_features(x), pre_logits=True)
        arch = backbone.name.removeprefix(TORCHVISION)
        # Built as tlkit builds it (googlenet/inception without their auxiliary heads), so the weights fit.
        full = torchvision.models.get_model(arch, weights=None, **_without_aux_logits(backbone.name, arch, {})).eval()
        result = full.load_state_dict(backbone.model.state_dict(), strict=False)
        # The classifier is the last module with parameters: a Linear, or SqueezeNet's 1x1 Conv2d (then averaged
        # over space: the pooling after a 1x1 convolution equals the convolution of the pooled input).
        last = [(n, m) for n, m in full.named_modules() if any(True for _ in m.parameters(recurse=False))][-1]
        if result.unexpected_keys or any(not k.startswith(last[0] + ".") for k in result.missing_keys):
            raise CheckFailed(f"backbone weights do not fit the full model: {result}")
        caught = []
        handle = last[1].register_forward_pre_hook(lambda _m, args: caught.append(args[0]))
        try:
            full(x)
        finally:
            handle.remove()
        return caught[-1].mean((2, 3)) if caught[-1].ndim == 4 else caught[-1]


def check_features(backbone: Any, x: Any) -> str:
    """``extract_features`` with its default pool (the model's own head, whatever its pool type; no preprocessing)
    equals the model's pre-logits."""

    from tlkit import extract_features
    from tlkit.features import FeatureExtractor

    pool_note = f"pool=model, own pool={FeatureExtractor(backbone).own_pool}"
    feats = extract_features(backbone, x, device="cpu", preprocess="none", batch_size=len(x)).features
    ref = reference_pre_logits(backbone, x).flatten(1)
    if feats.shape != ref.shape:
        raise CheckFailed(f"features {tuple(feats.shape)} but pre-logits {tuple(ref.shape)} ({pool_note})")
    diff = (feats - ref).abs()
    bad = diff > FEATURE_TOLERANCE * (1 + ref.abs())
    if bool(bad.any()):
        raise CheckFailed(f"features differ from pre-logits by up to {diff.max():.2e} ({pool_note})")
    return f"{pool_note}, max diff {diff.max():.1e}"


def check_onnx(clf: Any, x: Any, workdir: Path) -> str:
    """Fold BatchNorm (``tlkit.export.fuse``), export to ONNX, compare onnxruntime with the unfolded PyTorch model."""
    import onnxruntime as ort
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    from tlkit.export import InferenceModel, exportable_pools, fuse

    if not any(isinstance(m, _BatchNorm) for m in clf.backbone.modules()):
        raise NotApplicable("no BatchNorm")
    net = InferenceModel(torch.nn.Identity(), clf.backbone, clf.head, input="float").eval()
    with torch.no_grad():
        expected = net(x)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # fuse prints the difference it checks; the record keeps ours
            folded = fuse(net, x)
    except RuntimeError as err:
        if why := _chaotic(net, x, expected):
            raise NotApplicable(f"the random-init model is numerically chaotic: {why}") from err
        raise
    path = workdir / "model.onnx"
    axes = {"images": {0: "batch"}, "logits": {0: "batch"}}
    exportable = exportable_pools(folded, x)  # as tlkit's export does (VGG's 7x7 pool of a 1x1 map)
    try:
        torch.onnx.export(exportable, (x,), str(path), dynamo=False, opset_version=17, input_names=["images"],
                          output_names=["logits"], dynamic_axes=axes)  # fmt: skip
    except Exception as err:
        if why := _exporter_refuses_the_model_itself(clf.backbone.model, x, workdir):
            raise NotApplicable(f"torch's ONNX exporter cannot export the model itself, without tlkit: {why}") from err
        raise
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    scale = max(1.0, float(expected.abs().max()))
    diff = float((got - expected).abs().max())
    if not diff <= ONNX_TOLERANCE * scale:
        if why := _chaotic(net, x, expected):
            raise NotApplicable(f"the random-init model is numerically chaotic: {why}")
        raise CheckFailed(f"onnxruntime differs from PyTorch by {diff:.2e} (logit scale {scale:.2e})")
    return f"max diff {diff:.1e} (scale {scale:.1e})"


def _chaotic(net: Any, x: Any, expected: Any) -> str | None:
    """Why no end-to-end comparison can judge a fold of this random-init model, if it cannot: its own float32 and
    float64 outputs already differ by more than the tolerance (efficientnetv2_xl: activations grow block after block
    and rounding errors with them, to O(1) of the logits), so any change of rounding (a fold) looks like an error."""
    import copy

    import torch

    with torch.no_grad():
        exact = copy.deepcopy(net).double()(x.double())
    scale = max(1.0, float(exact.abs().max()))
    rel = float((expected.double() - exact).abs().max()) / scale
    return (
        f"float32 and float64 logits of the unfolded model differ by {rel:.1e} of their scale"
        if rel > ONNX_TOLERANCE
        else None
    )


def _exporter_refuses_the_model_itself(model: Any, x: Any, workdir: Path) -> str | None:
    """Why torch's ONNX exporter cannot export the plain timm/torchvision model (no tlkit wrapper, no fold) either,
    if it cannot: then the failure is the exporter's (Unfold, CondConv's per-sample kernels, col2im), not tlkit's."""
    import torch

    try:
        torch.onnx.export(model.eval(), (x,), str(workdir / "plain.onnx"), dynamo=False, opset_version=17,
                          input_names=["images"], dynamic_axes={"images": {0: "batch"}})  # fmt: skip
    except Exception as err:
        return _reason(err)
    return None


def check_model(
    name: str, workdir: str | os.PathLike | None = None, max_weights_mb: float | None = None
) -> dict[str, Any]:
    """Run every check on one model; returns the result record (one JSONL line of the sweep). A model whose float32
    weights alone are over ``max_weights_mb`` is recorded as excluded at once, with its size, instead of being built
    until the memory cap kills it (minutes, for a 7-billion-parameter model)."""
    import tempfile

    import torch

    from tlkit import TransferClassifier

    if max_weights_mb is not None and (size_mb := weights_mb(name)) is not None and size_mb > max_weights_mb:
        detail = f"float32 weights alone {size_mb / 1024:.1f} GB, over the {max_weights_mb / 1024:.0f} GB cap"
        return _killed_record(name, "memory", detail, 0.0, 0.0)
    start, cpu_start = time.perf_counter(), time.process_time()
    _reset_peak_rss()
    torch.manual_seed(0)
    checks: dict[str, dict[str, str]] = {}
    record: dict[str, Any] = {"name": name, "source": source(name), "family": family(name), "checks": checks}
    box: dict[str, Any] = {}

    def build() -> str:
        try:
            box["clf"] = TransferClassifier(backbone=name, pretrained=False, num_classes=NUM_CLASSES)
            box["size"], box["x"], box["out"] = pick_input_size(box["clf"].backbone, name)
        except Exception:
            if not name.startswith(TORCHVISION) and (why := _timm_runs_alone(name)):
                record["excluded"] = f"timm: timm itself cannot run it as a classifier on CPU ({why})"
            raise
        record["input_size"], record["batch"] = box["size"], BATCH
        _check_config_before_build(name, box["clf"].backbone)
        return f"{box['size']}px, {sum(p.numel() for p in box['clf'].parameters()) / 1e6:.1f}M params"

    if _run(checks, "build", build):
        clf, x = box["clf"], box["x"]
        bb = clf.backbone
        record["num_features"] = bb.num_features
        _run(checks, "width", lambda: _check_width(bb, box.pop("out"), x))
        _run(checks, "logits", lambda: _check_logits(clf, x))
        _run(checks, "stages", lambda: check_stages(bb, x))
        _run(checks, "features", lambda: check_features(bb, x))
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            _run(checks, "onnx", lambda: check_onnx(clf, x, Path(tmp)))
        # Last: their optimiser steps change the weights (a step at lr 0.1 can overflow a random-init model).
        head = {n for n, _ in clf.named_parameters() if n.startswith("head.")}
        _run(checks, "freeze_backbone", lambda: check_freeze(clf, "backbone", head, x))
        _run(checks, "freeze_stages1", lambda: check_freeze(clf, "stages:1", expected_stages1_trainable(clf), x))
    for check in CHECKS:
        checks.setdefault(check, {"status": NA, "reason": "build failed"})
    record["checks"] = {check: checks[check] for check in CHECKS}  # in the documented order
    record["time_s"] = round(time.perf_counter() - start, 2)
    record["cpu_s"] = round(time.process_time() - cpu_start, 2)  # on shared cores, the cost that does not vary
    record["peak_rss_mb"] = _peak_rss_mb()
    return record


def _check_config_before_build(name: str, backbone: Any) -> None:
    """The data config known before the model exists (``backbone_data_config``, on the meta device: what the CLI
    links from the recipe's backbone to the data) is the built model's."""
    from tlkit import backbone_data_config

    known = backbone_data_config(name)
    if known != backbone.data_config:
        raise CheckFailed(f"backbone_data_config gives {known}, the built backbone {backbone.data_config}")


def weights_mb(name: str) -> float | None:
    """MB of the model's float32 parameters and buffers, from a build on the meta device (no memory, no init); None
    where it cannot be built there (then the real build decides)."""
    import timm
    import torch
    import torchvision

    try:
        with torch.device("meta"):
            if name.startswith(TORCHVISION):
                model = torchvision.models.get_model(name.removeprefix(TORCHVISION), weights=None)
            else:
                model = timm.create_model(name, pretrained=False)
    except Exception:  # noqa: BLE001 - only an estimate: the build itself reports what is wrong
        return None
    return sum(t.numel() for t in (*model.parameters(), *model.buffers())) * 4 / 2**20


def _check_width(bb: Any, out: Any, x: Any) -> str:
    """``out``: the backbone's output for ``x`` (eval mode)."""
    if out.ndim != 2 or out.shape != (len(x), bb.num_features):
        raise CheckFailed(f"backbone output {tuple(out.shape)}, num_features={bb.num_features}")
    return f"{bb.num_features}"


def _check_logits(clf: Any, x: Any) -> None:
    import torch

    with torch.no_grad():
        out = clf.eval()(x)
    if out.shape != (len(x), NUM_CLASSES):
        raise CheckFailed(f"logits {tuple(out.shape)}, expected {(len(x), NUM_CLASSES)}")


# ------------------------------------------------------------------------------------------------- memory


def _reset_peak_rss() -> None:
    """Give the previous model's freed memory back to the OS and reset the kernel's peak-RSS mark of this process
    (Linux ``clear_refs`` 5), so each model gets its own peak (and the memory cap is not hit by a predecessor)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages resident until trimmed
    except (OSError, AttributeError):  # not glibc: the peak may include memory freed by the previous model
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the peak is then the worker's lifetime peak
        pass


def _peak_rss_mb() -> float:
    status = Path(f"/proc/{os.getpid()}/status")
    if status.exists():
        match = re.search(r"VmHWM:\s+(\d+) kB", status.read_text())
        if match:
            return round(int(match.group(1)) / 1024, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15 of stat


def rss_mb(pid: int) -> float:
    """Current resident memory of process ``pid`` in MB (0 if it is gone)."""
    try:
        match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return 0.0
    return int(match.group(1)) / 1024 if match else 0.0


# ------------------------------------------------------------------------------------------------- the pool


def _worker(conn: Connection, threads: int, batch: int, max_rss_mb: float) -> None:
    """A long-lived process: receives model names, sends result records, until it receives ``None``."""
    global BATCH
    import logging
    import warnings

    import torch

    torch.set_num_threads(threads)  # the cores shared among the workers: more threads only contend
    BATCH = batch
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    while (name := conn.recv()) is not None:
        try:
            record = check_model(name, max_weights_mb=max_rss_mb)
        except Exception as err:  # the harness itself broke on this model: record it rather than lose the worker
            record = {"name": name, "source": source(name), "family": family(name), "harness_error": _reason(err)}
        conn.send(record)


class Worker:
    """One worker process and the model it is running."""

    def __init__(self, ctx: Any, threads: int, batch: int, max_rss_mb: float):
        self.conn, child = ctx.Pipe()
        self.threads, self.batch, self.max_rss_mb = threads, batch, max_rss_mb
        self.process = ctx.Process(target=_worker, args=(child, threads, batch, max_rss_mb), daemon=True)
        self.process.start()
        child.close()
        self.name: str | None = None
        self.started = 0.0
        self.peak_mb = 0.0

    def send(self, name: str) -> None:
        self.name, self.started, self.peak_mb = name, time.monotonic(), 0.0
        self.cpu_start = cpu_seconds(self.process.pid)
        self.conn.send(name)

    def cpu_used(self) -> float:
        return cpu_seconds(self.process.pid) - self.cpu_start

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


def _killed_record(name: str, kind: str, detail: str, seconds: float, peak_mb: float) -> dict[str, Any]:
    checks = {c: {"status": NA, "reason": kind} for c in CHECKS}
    return {"name": name, "source": source(name), "family": family(name), "checks": checks,
            "excluded": f"{kind}: {detail}", "time_s": round(seconds, 1), "peak_rss_mb": round(peak_mb, 1)}  # fmt: skip


def sweep(
    names: list[str], workers: int, timeout: float, max_rss_mb: float, batch: int = BATCH
) -> Iterator[dict[str, Any]]:
    """Check ``names`` in ``workers`` processes; yields each record as it completes (killed models included)."""
    ctx = mp.get_context("spawn")  # a clean interpreter per worker: no torch state forked from the parent
    todo = list(reversed(names))
    # Each worker gets its share of the cores: one worker alone (the giant models) runs on all of them.
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    pool = [Worker(ctx, threads, batch, max_rss_mb) for _ in range(min(workers, len(names)))]
    try:
        while any(w.name for w in pool) or todo:
            for w in pool:
                if w.name is None and todo:
                    w.send(todo.pop())
            ready = wait([w.conn for w in pool if w.name], timeout=1.0)
            for i, w in enumerate(pool):
                if w.name is None:
                    continue
                seconds = time.monotonic() - w.started
                w.peak_mb = max(w.peak_mb, rss_mb(w.process.pid))
                if w.conn in ready:
                    try:
                        record = w.conn.recv()
                    except (EOFError, OSError):
                        record = _killed_record(w.name, "crash", f"worker died (exit {w.process.exitcode})", seconds,
                                                w.peak_mb)  # fmt: skip
                        pool[i] = _replace(w, ctx)
                    else:
                        w.name = None
                    yield record
                    continue
                # CPU time, not wall time: on shared cores a model must not be "too slow" because others ran.
                cpu = w.cpu_used()
                slow = cpu > timeout or seconds > WALL_FACTOR * timeout
                if slow or w.peak_mb > max_rss_mb or not w.process.is_alive():
                    kind = "timeout" if slow else "memory" if w.peak_mb > max_rss_mb else "crash"
                    detail = {"timeout": f"over {timeout:.0f} CPU s ({cpu:.0f} CPU s, {seconds:.0f} s wall)",
                              "memory": f"RSS over {max_rss_mb:.0f} MB",
                              "crash": f"worker died (exit {w.process.exitcode})"}[kind]  # fmt: skip
                    yield _killed_record(w.name, kind, detail, seconds, w.peak_mb)
                    pool[i] = _replace(w, ctx)
    finally:
        for w in pool:
            if w.name is None and w.process.is_alive():
                w.conn.send(None)
            w.process.join(timeout=5)
            if w.process.is_alive():
                w.kill()


def _replace(worker: Worker, ctx: Any) -> Worker:
    worker.kill()
    return Worker(ctx, worker.threads, worker.batch, worker.max_rss_mb)


# ------------------------------------------------------------------------------------------------- results + report


def load_results(path: Path) -> dict[str, dict[str, Any]]:
    """Records by model name (the last one wins, so a rerun of a model replaces its line's meaning)."""
    if not path.exists():
        return {}
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["name"]] = record
    return records


def outcome(record: dict[str, Any]) -> str:
    """``pass`` (every applicable check passed), ``excluded`` (a valid reason: timeout, memory, timm) or ``fail``."""
    if record.get("harness_error"):
        return FAIL
    if record.get("excluded", "").split(":")[0] in EXCLUDED:
        return "excluded"
    statuses = [c["status"] for c in record["checks"].values()]
    return PASS if FAIL not in statuses and record["checks"]["build"]["status"] == PASS else FAIL


def summary_line(records: list[dict[str, Any]]) -> str:
    parts = []
    for src in ("timm", "torchvision"):
        mine = [r for r in records if r["source"] == src]
        counts = defaultdict(int, {k: 0 for k in (PASS, FAIL, "excluded")})
        for r in mine:
            counts[outcome(r)] += 1
        share = 100 * counts[PASS] / len(mine) if mine else 0.0
        parts.append(f"{src}: {counts[PASS]}/{len(mine)} pass every applicable check ({share:.1f}%), "
                     f"{counts[FAIL]} fail, {counts['excluded']} excluded (timeout/memory/timm)")  # fmt: skip
    return "; ".join(parts)


def render_report(records: list[dict[str, Any]], totals: dict[str, int] | None = None) -> str:
    """The Markdown report: summary, a table per family, every failure with its reason, and the exclusions."""
    lines = ["# The zoo: tlkit on every timm and torchvision classification model", "",
             "Generated by `benchmarks/zoo.py` from `benchmarks/zoo_results.jsonl` (random init, smallest input the "
             "model's config allows, batch 2, CPU, the cores shared among the workers). Checks: see the script's "
             "docstring. "
             f"{_batch_one_note(records)}"
             "Continue the sweep with `python benchmarks/zoo.py --workers 2`; rebuild this page with "
             "`python benchmarks/zoo.py --report docs/zoo.md`.", "",
             f"**{summary_line(records)}**", ""]  # fmt: skip
    if totals:
        done = defaultdict(int)
        for r in records:
            done[r["source"]] += 1
        lines += [f"Swept so far: timm {done['timm']}/{totals['timm']}, torchvision "
                  f"{done['torchvision']}/{totals['torchvision']} architectures.", ""]  # fmt: skip
    lines += ["## Per family (passed / applicable)", "",
              "| family | models | all pass | excluded | " + " | ".join(CHECKS) + " |",
              "|---" * (4 + len(CHECKS)) + "|"]  # fmt: skip
    by_family: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_family[r["family"]].append(r)
    for fam in sorted(by_family, key=lambda f: (f.startswith(TORCHVISION), f)):
        rs = by_family[fam]
        cells = []
        for check in CHECKS:
            statuses = [r["checks"].get(check, {}).get("status") for r in rs if "checks" in r]
            applicable = [s for s in statuses if s in (PASS, FAIL)]
            cells.append(f"{applicable.count(PASS)}/{len(applicable)}" if applicable else "–")
        outcomes = [outcome(r) for r in rs]
        lines.append(f"| {fam} | {len(rs)} | {outcomes.count(PASS)} | {outcomes.count('excluded')} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    lines += ["", "## Failures by cause", "", "| check | cause (numbers and names generalised) | models | examples |",
              "|---|---|---|---|"]  # fmt: skip
    for (check, cause), names in sorted(failure_causes(records).items(), key=lambda kv: -len(kv[1])):
        lines.append(f"| {check} | {_md(cause)} | {len(names)} | {', '.join(f'`{n}`' for n in names[:4])} |")
    lines += ["", "## Failures", ""]
    for r in sorted(records, key=lambda r: r["name"]):
        if outcome(r) != FAIL:
            continue
        if r.get("harness_error"):
            lines.append(f"- `{r['name']}`: harness error: {r['harness_error']}")
            continue
        for check, result in r["checks"].items():
            if result["status"] == FAIL:
                lines.append(f"- `{r['name']}` {check}: {_md(result['reason'])}")
    lines += ["", "## Checks that do not apply (other than ONNX without BatchNorm)", ""]
    lines += [f"- `{r['name']}` {check}: {_md(result['reason'])}" for r in sorted(records, key=lambda r: r["name"])
              if outcome(r) != "excluded" for check, result in r["checks"].items() if result["status"] == NA
              and result.get("reason") not in ("no BatchNorm", "build failed")]  # fmt: skip
    lines += ["", "## Excluded (could not be checked here: timeout, memory, timm itself cannot run it)", ""]
    lines += [f"- `{r['name']}`: {_md(r['excluded'])}" for r in sorted(records, key=lambda r: r["name"])
              if outcome(r) == "excluded"]  # fmt: skip
    return "\n".join(lines) + "\n"


def _batch_one_note(records: list[dict[str, Any]]) -> str:
    """Which models were checked one image at a time (``--batch 1``, the giant transformers that did not fit)."""
    names = sorted(r["name"] for r in records if r.get("batch") == 1)
    return f"Checked with batch 1 (`--batch 1`: half the memory and time): {', '.join(names)}. " if names else ""


def failure_causes(records: list[dict[str, Any]]) -> dict[tuple[str, str], list[str]]:
    """Failed checks grouped by their reason with numbers, lists and class names generalised, so one tlkit bug shows
    as one row however many models it hits."""
    causes: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in sorted(records, key=lambda r: r["name"]):
        if r.get("harness_error"):
            causes[("harness", _generalise(r["harness_error"]))].append(r["name"])
        for check, result in r.get("checks", {}).items():
            if result["status"] == FAIL and outcome(r) == FAIL:
                causes[(check, _generalise(result["reason"]))].append(r["name"])
    return causes


def _generalise(reason: str) -> str:
    reason = re.sub(r"\[[^\]]*\]", "[...]", reason)  # lists of parameter names, shapes
    reason = re.sub(r"'[A-Za-z_][\w.]*' object", "'<class>' object", reason)
    return re.sub(r"\d+(\.\d+)?(e[+-]?\d+)?", "#", reason)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_report(results: Path, report: Path) -> str:
    records = list(load_results(results).values())
    try:
        names = all_models()
        totals = {"timm": sum(source(n) == "timm" for n in names), "torchvision": sum(n.startswith(TORCHVISION)
                                                                                      for n in names)}  # fmt: skip
    except ImportError:
        totals = None
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(render_report(records, totals))
    return summary_line(records)


# ------------------------------------------------------------------------------------------------- command line


def done_names(recorded: dict[str, dict[str, Any]], redo: list[str]) -> set[str]:
    """The recorded models not to check again: all but those whose outcome or exclusion kind is in ``redo``."""
    return {name for name, r in recorded.items() if not set(redo) & {outcome(r), r.get("excluded", "").split(":")[0]}}


def select(names: list[str], pattern: str | None, done: set[str], limit: int | None) -> list[str]:
    """Names matching ``pattern`` (shell-style; several separated by commas), not yet in the results, in a fixed
    shuffled order, at most ``limit``."""
    patterns = pattern.split(",") if pattern else None
    chosen = [n for n in names if n not in done and (patterns is None or any(fnmatch.fnmatch(n, p) for p in patterns))]
    random.Random(0).shuffle(chosen)  # a partial sweep (or --limit) is then a fair sample of the zoo, not its "a"s
    return chosen[:limit] if limit else chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filter", help="shell-style pattern(s), comma-separated: 'resnet*,torchvision/*'")
    parser.add_argument("--limit", type=int, help="check at most N models (after --filter and resume)")
    parser.add_argument(
        "--redo",
        help="check again the models already recorded with these outcomes, comma-separated: 'fail', 'excluded', or "
        "an exclusion kind ('memory', 'timeout'); e.g. after a fix, or with a larger --max-rss-gb and one worker",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="CPU seconds per model before its worker is killed (also stopped at 5x this in wall time)",
    )
    parser.add_argument("--max-rss-gb", type=float, default=5.0, help="kill a worker whose memory grows past this")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--batch",
        type=int,
        default=BATCH,
        help=f"images per check (default {BATCH}, so BatchNorm layers can train); 1 halves the activations and the "
        "time of the giant transformers, which have no BatchNorm",
    )
    parser.add_argument("--nice", type=int, default=10, help="lower the sweep's priority by this (workers inherit it)")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="JSONL results, appended, resumable")
    parser.add_argument("--report", type=Path, nargs="?", const=DEFAULT_REPORT,
                        help="only regenerate this Markdown report from --results (no run)")  # fmt: skip
    parser.add_argument("--write-report", type=Path, default=DEFAULT_REPORT, help="report written after a run")
    args = parser.parse_args(argv)
    if args.report:
        print(write_report(args.results, args.report))
        return
    os.nice(args.nice)  # a sweep of hours on shared cores should yield to interactive work
    done = done_names(load_results(args.results), args.redo.split(",") if args.redo else [])
    names = select(all_models(), args.filter, done, args.limit)
    print(f"{len(names)} models to check ({len(done)} already in {args.results}), {args.workers} workers", flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with args.results.open("a") as out:
        for i, record in enumerate(sweep(names, args.workers, args.timeout, args.max_rss_gb * 1024, args.batch), 1):
            out.write(json.dumps(record) + "\n")
            out.flush()
            failed = [c for c, r in record.get("checks", {}).items() if r["status"] == FAIL]
            status = outcome(record) + (f" {failed}" if failed else "") + (f" ({record['excluded']})"
                                                                          if "excluded" in record else "")  # fmt: skip
            print(f"[{i}/{len(names)} {time.monotonic() - start:.0f}s] {record['name']}: {status} "
                  f"{record.get('time_s', '?')}s {record.get('peak_rss_mb', '?')}MB", flush=True)  # fmt: skip
    print(write_report(args.results, args.write_report))


if __name__ == "__main__":
    main()
