"""Freeze specs: which parameters each form freezes, the errors of bad ones, and a real fit that leaves them alone."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_trainer
from torch.utils.data import DataLoader, TensorDataset

from tlkit import TransferClassifier, create_backbone
from tlkit.freezing import frozen_parameter_names


@pytest.fixture(scope="module")
def resnet18():
    return create_backbone("resnet18")


def _stage_union(backbone, stages: list[str]) -> set[str]:
    params = backbone.stage_params()
    return {name for stage in stages for name in params[stage]}


# --- what each form freezes ----------------------------------------------------------------------------------


def test_none_and_backbone(resnet18):
    assert frozen_parameter_names(resnet18, "none") == set()
    assert frozen_parameter_names(resnet18, "backbone") == {name for name, _ in resnet18.named_parameters()}


@pytest.mark.parametrize("name", ["resnet18", "torchvision/mobilenet_v3_small", "test_vit"])
def test_stages_k_freezes_the_stem_and_the_first_k_stages(name):
    backbone = create_backbone(name)
    stages = backbone.stages
    for k in range(len(stages)):
        frozen = frozen_parameter_names(backbone, f"stages:{k}")
        assert frozen == _stage_union(backbone, stages[: k + 1]), f"stages:{k}"
    assert frozen_parameter_names(backbone, f"stages:{len(stages) - 1}") == {n for n, _ in backbone.named_parameters()}


def test_stages_on_resnet18_by_name(resnet18):
    frozen = frozen_parameter_names(resnet18, "stages:2")
    assert "model.conv1.weight" in frozen and "model.bn1.bias" in frozen
    assert "model.layer2.1.bn2.weight" in frozen
    assert not any(name.startswith(("model.layer3.", "model.layer4.")) for name in frozen)
    assert frozen_parameter_names(resnet18, "stages:0") == {"model.conv1.weight", "model.bn1.weight", "model.bn1.bias"}


def test_regex_matches_model_names_without_the_wrapper_prefix(resnet18):
    frozen = frozen_parameter_names(resnet18, r"regex:^layer1\.|bn1\.bias$")
    expected = {
        name for name, _ in resnet18.named_parameters() if name.startswith("model.layer1.") or name.endswith("bn1.bias")
    }
    assert frozen == expected
    assert "model.layer3.0.bn1.bias" in frozen and "model.layer3.0.bn1.weight" not in frozen


# --- bad specs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["stage:2", "stages:x", "stages:-1", "stages:", "regex:", "all", ""])
def test_bad_spec_names_the_valid_forms_and_the_stages(resnet18, spec):
    with pytest.raises(ValueError) as info:
        frozen_parameter_names(resnet18, spec)
    message = str(info.value)
    assert repr(spec) in message
    for form in ("none", "backbone", "stages:K", "regex:<pattern>"):
        assert form in message
    assert "['stem', 'layer1', 'layer2', 'layer3', 'layer4']" in message


def test_too_many_stages(resnet18):
    with pytest.raises(ValueError, match=r"stages:99.*'layer4'\].*stages:0 to stages:4, or 'backbone'"):
        frozen_parameter_names(resnet18, "stages:99")
    assert frozen_parameter_names(resnet18, "stages:4")  # the last valid K


def test_bad_regex(resnet18):
    with pytest.raises(ValueError, match=r"regex:\(.*not a valid regular expression"):
        frozen_parameter_names(resnet18, "regex:(")
    with pytest.raises(ValueError, match=r"regex:nomatch.*matches no parameter.*conv1\.weight"):
        frozen_parameter_names(resnet18, "regex:nomatch")


def test_transfer_classifier_rejects_a_bad_spec():
    with pytest.raises(ValueError, match="Bad freeze spec 'stage:2'"):
        TransferClassifier("resnet18", num_classes=3, freeze="stage:2")
    with pytest.raises(ValueError, match="Bad freeze spec True. Valid forms: none, backbone"):
        TransferClassifier("resnet18", num_classes=3, freeze=True)  # YAML's `freeze: true`: which part?


@pytest.mark.parametrize("nothing", [None, False])
def test_a_recipes_null_or_false_freeze_freezes_nothing(nothing):
    """`freeze: null` in a recipe crashed with "'NoneType' object has no attribute 'partition'"."""
    model = TransferClassifier("test_resnet", num_classes=3, freeze=nothing)
    assert all(p.requires_grad for p in model.parameters())
    phases = TransferClassifier("test_resnet", num_classes=3, freeze=nothing, freeze_epochs=1).configure_callbacks()
    assert [p.freeze for p in phases[-1].phases] == ["backbone", "none"]  # the shorthand still freezes first


# --- in the module, and through a real fit -------------------------------------------------------------------


def _frozen_names(model: TransferClassifier) -> set[str]:
    return {name for name, param in model.named_parameters() if not param.requires_grad}


def test_set_freeze_sets_requires_grad_and_batchnorm_modes():
    model = TransferClassifier("resnet18", num_classes=3, freeze="stages:1")
    expected = {f"backbone.{n}" for n in _stage_union(model.backbone, ["stem", "layer1"])}
    assert _frozen_names(model) == expected
    model.train()
    assert not model.backbone.model.bn1.training and not model.backbone.model.layer1[1].bn2.training
    assert model.backbone.model.layer2[0].bn1.training and model.head.training

    model.set_freeze("backbone")
    assert _frozen_names(model) == {f"backbone.{n}" for n, _ in model.backbone.named_parameters()}
    assert not model.backbone.model.layer4[1].bn2.training  # newly frozen BN goes to eval at once

    model.set_freeze("none")
    assert _frozen_names(model) == set()
    assert model.backbone.model.bn1.training  # unfrozen BN trains again

    model.eval()
    model.set_freeze("stages:1")
    assert not model.backbone.model.layer4[1].bn2.training  # set_freeze keeps eval mode eval


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(48, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 3, (48,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=16)


def _frozen_bn_buffers(model: TransferClassifier, frozen: set[str]) -> set[str]:
    """Buffers (running_mean/var, num_batches_tracked) of modules whose parameters are all frozen."""
    modules = {name.rpartition(".")[0] for name in frozen}
    trainable = {name.rpartition(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    return {name for name, _ in model.named_buffers() if name.rpartition(".")[0] in modules - trainable}


def _fit(tmp_path, freeze: str, freeze_bn: bool = True):
    torch.manual_seed(0)
    model = TransferClassifier("resnet18", num_classes=3, freeze=freeze, freeze_bn=freeze_bn, lr=0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = tiny_trainer(tmp_path, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, train_dataloaders=_loader())
    assert trainer.global_step == 3
    return model, trainer, before


def test_fit_leaves_frozen_parameters_and_batchnorm_statistics_untouched(tmp_path):
    model, trainer, before = _fit(tmp_path, "stages:2")
    after = model.state_dict()
    frozen = _frozen_names(model)
    assert frozen == {f"backbone.{n}" for n in _stage_union(model.backbone, ["stem", "layer1", "layer2"])}
    buffers = _frozen_bn_buffers(model, frozen)
    assert {"backbone.model.bn1.running_mean", "backbone.model.layer2.1.bn2.num_batches_tracked"} <= buffers
    assert len(buffers) == 3 * 10  # 3 buffers of 10 BNs: bn1; 2 blocks x 2 in layer1 and layer2; layer2's downsample

    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not changed & (frozen | buffers), sorted(changed & (frozen | buffers))
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable - changed == set(), "every trainable parameter should have moved"
    assert "backbone.model.layer3.0.bn1.running_mean" in changed  # BN of trained stages still updates

    in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    groups = {group["name"].split("/")[0] for group in trainer.optimizers[0].param_groups}
    assert groups == {"layer3", "layer4", "head"}


def test_freeze_bn_false_lets_frozen_batchnorm_statistics_move(tmp_path):
    model, _, before = _fit(tmp_path, "backbone", freeze_bn=False)
    after = model.state_dict()
    frozen = _frozen_names(model)
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # the parameters stay frozen
    for name in ("backbone.model.bn1.running_mean", "backbone.model.layer4.1.bn2.running_var"):
        assert not torch.equal(before[name], after[name]), name
    assert after["backbone.model.bn1.num_batches_tracked"] == before["backbone.model.bn1.num_batches_tracked"] + 3
    assert not torch.equal(before["head.fc.weight"], after["head.fc.weight"])
